#!/usr/bin/env bash
# Chart CI for helm/outbox-relay, offline:
#   1. helm (built once with `go install` from the Go module proxy into .local/bin; Go caches in
#      .local/go), unless the right version is already there;
#   2. helm lint --strict with the default values and with ci/full-values.yaml (everything on);
#   3. helm template | scripts/k8s-validate (Go, built into .local/bin): every built-in object
#      decoded strictly into its k8s.io/api type, so an unknown or misplaced field fails. It
#      stands in for kubeconform, which downloads its JSON schemas from GitHub at run time (only
#      package registries are reachable here); custom resources are not schema-checked;
#   4. scripts/helm-check.py: tests on the rendered objects, checked against the relay binary's
#      own flags (`run --help`) and metric names (src/telemetry.rs), and the binary started with
#      each container's rendered configuration (it must accept it; a negative control must fail).
# Usage: scripts/helm-check.sh   (OUTBOX_RELAY_BIN=path skips building the debug binary)
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

# Newest Helm 3 release on the Go module proxy that builds with `go install` here (Go 1.26).
HELM_VERSION=v3.22.0
HELM=$LOCAL/bin/helm
CHART=$ROOT/helm/outbox-relay

use_go() {
  [ -x /usr/local/go/bin/go ] && export PATH=$PATH:/usr/local/go/bin
  command -v go >/dev/null || die "go not found (expected /usr/local/go/bin/go): it builds helm and k8s-validate"
  export GOMODCACHE=$LOCAL/go/mod GOCACHE=$LOCAL/go/cache GOTOOLCHAIN=local
}

install_helm() {
  if [ -x "$HELM" ] && [ "$("$HELM" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
    return 0
  fi
  use_go
  note "building helm $HELM_VERSION with go install (once; cached in .local/bin, Go caches in .local/go)"
  export GOBIN=$LOCAL/bin GOFLAGS=-mod=mod
  mkdir -p "$GOBIN"
  # Link the same version data as helm's Makefile: its version, and the Kubernetes version that
  # `helm template` assumes (otherwise v1.20, below the chart's kubeVersion): client-go v0.N -> 1.N.
  local gomod k8s_minor ldflags
  mkdir -p "$LOCAL/go"
  gomod=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
  k8s_minor=$(sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod")
  [ -n "$k8s_minor" ] || die "cannot read the k8s.io/client-go version from $gomod"
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in chartutil lint/rules; do
    ldflags+=" -X helm.sh/helm/v3/pkg/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/$pkg.k8sVersionMinor=$k8s_minor"
  done
  local log=$LOCAL/go/install.log
  if ! go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION failed (full output: $log)"
  fi
  note "helm $("$HELM" version --short) installed at $HELM"
}

# k8s-validate: rebuilt when its sources are newer (go.sum pins its k8s.io/api version).
VALIDATE=$LOCAL/bin/k8s-validate
build_validator() {
  local src=$ROOT/scripts/k8s-validate
  if [ -x "$VALIDATE" ] && [ -z "$(find "$src" -newer "$VALIDATE" -type f)" ]; then return 0; fi
  use_go
  note "building scripts/k8s-validate"
  (cd "$src" && GOFLAGS=-mod=readonly go build -trimpath -o "$VALIDATE" .) || die "building scripts/k8s-validate failed (see above)"
}

# python3 with PyYAML: the machine's, or Debian's python3-yaml.
python_with_yaml() {
  local py
  for py in python3 /usr/bin/python3; do
    command -v "$py" >/dev/null && "$py" -c 'import yaml' 2>/dev/null && { echo "$py"; return 0; }
  done
  apt_install python3 python3-yaml
  echo /usr/bin/python3
}

t0=$SECONDS
install_helm
build_validator
PY=$(python_with_yaml)

bin=${OUTBOX_RELAY_BIN:-}
if [ -z "$bin" ]; then
  cargo build --locked --quiet --bin outbox-relay  # a no-op right after `cargo test`
  bin=$ROOT/target/debug/outbox-relay
fi

note "helm lint --strict (default values, then ci/full-values.yaml)"
"$HELM" lint --strict "$CHART"
"$HELM" lint --strict "$CHART" -f "$CHART/ci/full-values.yaml"

note "helm template | k8s-validate (strict decoding into the Kubernetes API types)"
"$HELM" template ci "$CHART" | "$VALIDATE" | tail -n 1
"$HELM" template ci "$CHART" -f "$CHART/ci/full-values.yaml" | "$VALIDATE" | grep -v '^ok'

note "examples/sidecar.md: its pod spec snippet, wrapped in a Pod | k8s-validate"
"$PY" - "$CHART/examples/sidecar.md" <<'EOF' | "$VALIDATE" | tail -n 1
import re, sys, yaml
spec = yaml.safe_load(re.search(r"```yaml\n(.*?)```", open(sys.argv[1]).read(), re.S).group(1))
spec.setdefault("containers", [{"name": "app", "image": "app:1"}])
print(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sidecar-example"}, "spec": spec}))
EOF

note "helm template + tests on the rendered objects"
"$PY" "$ROOT/scripts/helm-check.py" "$HELM" "$CHART" "$bin"
note "done in $((SECONDS - t0))s"
