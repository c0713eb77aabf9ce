#!/usr/bin/env bash
# Checks the container image without a container engine (there is none on the build machines):
#   1. the Dockerfile, statically: pinned (non-`latest`) base images, the runtime stage is the
#      base image the library list below describes, runs no shell, has a numeric non-root USER,
#      an exec-form ENTRYPOINT/CMD, EXPOSE 9464 and the OCI labels; .dockerignore drops target/,
#      .local/ and .git/;
#   2. the binary: every shared library ldd resolves belongs to a Debian package that the
#      runtime base image installs, and no glibc symbol is newer than Debian 12's glibc;
#   3. the binary in an image-like root filesystem holding only those packages' files, as uid
#      65532 with nothing writable (chroot): `--version`, and when the local stack is up
#      (scripts/services.sh up), `migrate` plus `run` until /readyz answers 200, then SIGTERM
#      and a clean exit. Skipped when not root (--no-rootfs skips it too).
# Usage: scripts/image-check.sh [--profile release|dev] [--binary FILE] [--dockerfile FILE] [--no-rootfs]
#   --profile  which cargo build to check (default release, what the Dockerfile ships). Linking
#              is decided by features and build scripts, not the profile, so `make test` checks
#              the dev binary that `cargo test` has just built instead of adding a release build.
#   --binary   check this file instead of building.
# shellcheck disable=SC2015  # `cond && ok ... || fail ...`: ok never fails
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

# The runtime base image and what it provides. From GoogleContainerTools/distroless:
# base/config.bzl BASE_PACKAGES["debian12"] = libc6, libssl3; cc/config.bzl
# CC_PACKAGES["debian12"] = libgomp1, libstdc++6, libgcc-s1, gcc-12-base (no libraries); the
# static layer below them adds base-files, netbase, tzdata and CA certificates (no libraries).
# There is no zlib1g in the debian12 images (debian13 has it): zlib must be linked statically
# (rdkafka feature `libz-static` in Cargo.toml). Keep this in step with the Dockerfile.
RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot
RUNTIME_PACKAGES=(libc6 libssl3 libgcc-s1 libstdc++6 libgomp1)
RUNTIME_GLIBC=2.36 # Debian 12 (bookworm)
RUNTIME_UID=65532  # distroless "nonroot"
BIN_IN_IMAGE=/usr/local/bin/outbox-relay

profile=release bin='' dockerfile=$ROOT/Dockerfile rootfs_check=1
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?}; shift 2 ;;
    --binary) bin=${2:?}; shift 2 ;;
    --dockerfile) dockerfile=${2:?}; shift 2 ;;
    --no-rootfs) rootfs_check=0; shift ;;
    *) die "unknown argument $1 (usage: $0 [--profile release|dev] [--binary FILE] [--dockerfile FILE] [--no-rootfs])" ;;
  esac
done

failures=()
fail() { failures+=("$*"); echo "  FAIL: $*" >&2; }
ok() { echo "  ok: $*" >&2; }

# --- 1. Dockerfile -----------------------------------------------------------------------
# instructions FILE: one logical instruction per line (continuations joined, comments and
# blank lines dropped, as Docker does inside continuations too).
instructions() {
  sed -e 's/\r$//' "$1" | awk '
    /^[[:space:]]*#/ || /^[[:space:]]*$/ { next }
    { line = (cont != "") ? cont " " $0 : $0 }
    /\\[[:space:]]*$/ { sub(/\\[[:space:]]*$/, "", line); cont = line; next }
    { cont = ""; sub(/^[[:space:]]+/, "", line); print line }'
}
is_exec_form() { [[ $1 =~ ^\[[[:space:]]*\"[^\"]*\"([[:space:]]*,[[:space:]]*\"[^\"]*\")*[[:space:]]*\]$ ]]; }

check_dockerfile() {
  local file=$1 keyword args stage=-1 image name ref
  local -A global_args=() stage_names=()
  local final_from='' final_user='' final_entrypoint='' final_cmd='' final_expose='' final_labels='' final_copy=0 final_shell_run=()
  note "Dockerfile checks: $file"
  [ -f "$file" ] || { fail "no Dockerfile at $file"; return; }
  while IFS= read -r line; do
    keyword=${line%%[[:space:]]*}; keyword=${keyword^^}
    args=${line#*[[:space:]]}; [ "$args" = "$line" ] && args=
    case "$keyword" in
      ARG)
        if [ $stage -lt 0 ]; then
          name=${args%%=*}
          [[ $args == *=* ]] && global_args[$name]=${args#*=} || global_args[$name]=
        fi ;;
      FROM)
        stage=$((stage + 1))
        final_user='' final_entrypoint='' final_cmd='' final_expose='' final_labels='' final_copy=0 final_shell_run=()
        read -r -a words <<<"$args"
        [[ ${words[0]} == --* ]] && words=("${words[@]:1}")  # --platform=...
        ref=${words[0]}
        for name in "${!global_args[@]}"; do
          ref=${ref//\$\{$name\}/${global_args[$name]}}
          ref=${ref//\$$name/${global_args[$name]}}
        done
        ref=${ref//\"/}
        if [ ${#words[@]} -ge 3 ] && [ "${words[1]^^}" = AS ]; then stage_names[${words[2]}]=1; fi
        final_from=$ref
        if [ -n "${stage_names[$ref]:-}" ]; then
          :  # FROM an earlier stage
        elif [[ $ref == *\$* ]]; then
          fail "FROM $ref: unresolved variable (give the ARG a default before the first FROM)"
        else
          image=${ref%@sha256:*}
          local tag=
          [[ ${image##*/} == *:* ]] && tag=${image##*:}
          if [[ $ref == *@sha256:* ]]; then ok "FROM $ref (digest)"
          elif [ -z "$tag" ]; then fail "FROM $ref: no tag (implies latest); pin a version"
          elif [ "$tag" = latest ]; then fail "FROM $ref: the latest tag is not reproducible; pin a version"
          else ok "FROM $ref"
          fi
        fi ;;
      USER) final_user=$args ;;
      ENTRYPOINT) final_entrypoint=$args ;;
      CMD) final_cmd=$args ;;
      EXPOSE) final_expose+=" $args" ;;
      LABEL) final_labels+=" $args" ;;
      COPY)
        [[ $args == *--from=* && $args =~ [[:space:]]$BIN_IN_IMAGE$ ]] && final_copy=1 ;;
      RUN)
        local run=$args
        while [[ $run == --* ]]; do run=${run#*[[:space:]]}; done  # --mount=..., --network=...
        is_exec_form "$run" || final_shell_run+=("$run") ;;
      SHELL) final_shell_run+=("SHELL $args") ;;
    esac
  done < <(instructions "$file")

  [ $stage -ge 1 ] && ok "multi-stage ($((stage + 1)) stages)" || fail "not a multi-stage build"
  local base=${final_from%@sha256:*}
  [ "$base" = "$RUNTIME_BASE" ] && ok "runtime stage FROM $RUNTIME_BASE" \
    || fail "runtime stage is FROM $final_from, but this script's library list describes $RUNTIME_BASE (update RUNTIME_BASE/RUNTIME_PACKAGES together with the Dockerfile)"
  if [[ $final_user =~ ^([0-9]+)(:([0-9]+))?$ ]] && [ "${BASH_REMATCH[1]}" != 0 ]; then
    ok "USER $final_user (numeric, non-root)"
  else
    fail "runtime stage USER is '${final_user:-unset}': use a numeric non-root uid[:gid] (e.g. $RUNTIME_UID:$RUNTIME_UID) so runAsNonRoot can verify it"
  fi
  if is_exec_form "$final_entrypoint" && [[ $final_entrypoint =~ ^\[[[:space:]]*\"$BIN_IN_IMAGE\"[[:space:]]*\]$ ]]; then
    ok "ENTRYPOINT $final_entrypoint (exec form)"
  else
    fail "ENTRYPOINT is '${final_entrypoint:-unset}': use the exec form [\"$BIN_IN_IMAGE\"] (no shell in the image; signals reach the relay)"
  fi
  is_exec_form "$final_cmd" && ok "CMD $final_cmd (exec form)" || fail "CMD is '${final_cmd:-unset}': use the exec form, e.g. [\"run\"]"
  [ ${#final_shell_run[@]} -eq 0 ] && ok "runtime stage runs no shell" \
    || fail "runtime stage has shell-form RUN/SHELL (the base image has no shell): ${final_shell_run[*]}"
  [[ " $final_expose " =~ [[:space:]]9464(/tcp)?[[:space:]] ]] && ok "EXPOSE 9464" || fail "runtime stage does not EXPOSE 9464"
  [ $final_copy = 1 ] && ok "binary copied from the builder to $BIN_IN_IMAGE" || fail "runtime stage does not COPY --from=<builder> ... $BIN_IN_IMAGE"
  local label gap=0
  for label in version source title licenses revision; do
    [[ $final_labels == *org.opencontainers.image.$label=* ]] || { fail "missing LABEL org.opencontainers.image.$label"; gap=1; }
  done
  [ $gap = 0 ] && ok "OCI labels version, source, title, licenses, revision"
  local ignore pattern
  ignore=$(dirname "$file")/.dockerignore
  gap=0
  for pattern in target .local .git; do
    if [ -f "$ignore" ] && sed -e 's#^/##' -e 's#/$##' "$ignore" | grep -qxF "$pattern"; then :; else
      fail "$ignore does not exclude $pattern/ (a large or secret build context)"; gap=1
    fi
  done
  [ $gap = 0 ] && ok ".dockerignore excludes target/, .local/, .git/"
}

# --- 2. shared libraries -----------------------------------------------------------------
# package_of PATH: the Debian package owning a library file (dpkg records /lib or /usr/lib).
package_of() {
  local p candidates=("$1" "$(readlink -f "$1")") out
  for p in "${candidates[@]}"; do
    case "$p" in /usr/*) candidates+=("${p#/usr}") ;; *) candidates+=("/usr$p") ;; esac
  done
  for p in "${candidates[@]}"; do
    out=$(dpkg -S "$p" 2>/dev/null | head -n 1) || continue
    [ -n "$out" ] && { out=${out%%: *}; echo "${out%%:*}"; return 0; }
  done
  return 1
}

check_libraries() {
  local bin=$1 line soname path pkg allowed
  note "shared libraries of $bin (must come from ${RUNTIME_PACKAGES[*]})"
  # shellcheck disable=SC1091
  . /etc/os-release
  [ "${VERSION_CODENAME:-}" = bookworm ] \
    || fail "this machine is ${PRETTY_NAME:-unknown}, but the image is Debian 12 based: build and check on bookworm (the package names and glibc version below are bookworm's)"
  echo "  direct (NEEDED): $(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')" >&2
  while IFS= read -r line; do
    line=${line#"${line%%[![:space:]]*}"}
    case "$line" in
      linux-vdso.so*|'') continue ;;
      *"=> not found"*) fail "${line%% *}: not found by ldd"; continue ;;
      *" => "*) soname=${line%% =>*}; path=${line#*=> }; path=${path%% (*} ;;
      /*) path=${line%% (*}; soname=$(basename "$path") ;;
      *) fail "cannot read ldd line: $line"; continue ;;
    esac
    if ! pkg=$(package_of "$path"); then
      fail "$soname ($path) belongs to no Debian package: the runtime image cannot have it"
      continue
    fi
    allowed=0
    for p in "${RUNTIME_PACKAGES[@]}"; do [ "$p" = "$pkg" ] && allowed=1; done
    if [ $allowed = 1 ]; then ok "$soname -> $path ($pkg)"; else
      fail "$soname -> $path comes from $pkg, which $RUNTIME_BASE does not install: link it statically (a -static/-vendored cargo feature) or change the base image"
    fi
  done < <(ldd "$bin")
  local newest
  newest=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)
  if [ "$(printf '%s\n%s\n' "$newest" "$RUNTIME_GLIBC" | sort -V | tail -n 1)" = "$RUNTIME_GLIBC" ]; then
    ok "newest glibc symbol version GLIBC_$newest <= $RUNTIME_GLIBC"
  else
    fail "the binary needs GLIBC_$newest, newer than Debian 12's $RUNTIME_GLIBC"
  fi
}

# --- 3. image-like root filesystem -------------------------------------------------------
ROOTFS='' RELAY_PID=''
cleanup_rootfs() {
  [ -n "$RELAY_PID" ] && live "$RELAY_PID" && kill -KILL "$RELAY_PID" 2>/dev/null
  [ -n "$ROOTFS" ] && rm -rf --one-file-system "$ROOTFS" "$ROOTFS.relay.log"
  return 0
}

make_rootfs() {
  local bin=$1 pkg f dir
  ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/outbox-image-rootfs.XXXXXX")
  chmod 0755 "$ROOTFS"  # mktemp makes it 0700: the image user must reach /
  trap cleanup_rootfs EXIT
  mkdir -p "$ROOTFS"/usr/{bin,lib,lib64,sbin} "$ROOTFS"/{etc/ssl/certs,run/secrets,tmp,home/nonroot,dev,proc}
  ln -s usr/bin "$ROOTFS/bin"; ln -s usr/lib "$ROOTFS/lib"; ln -s usr/lib64 "$ROOTFS/lib64"; ln -s usr/sbin "$ROOTFS/sbin"
  for pkg in "${RUNTIME_PACKAGES[@]}"; do
    # Not installed here: nothing the binary links can come from it (ldd resolved everything).
    dpkg -s "$pkg" >/dev/null 2>&1 || continue
    while IFS= read -r f; do
      [ -f "$f" ] || [ -L "$f" ] || continue
      case "$f" in /usr/share/doc/*|/usr/share/lintian/*|/usr/share/man/*) continue ;; esac
      dir=$(readlink -f "$(dirname "$f")")
      mkdir -p "$ROOTFS$dir"
      cp -a "$f" "$ROOTFS$dir/"
    done < <(dpkg -L "$pkg")
  done
  # What distroless' static layer adds: CA bundle, passwd/group with nonroot, nsswitch.conf.
  cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$ROOTFS/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$ROOTFS/etc/group"
  printf 'hosts: files dns\n' >"$ROOTFS/etc/nsswitch.conf"
  cp /etc/hosts /etc/resolv.conf "$ROOTFS/etc/" 2>/dev/null || true  # the container runtime adds these
  install -D -m 0755 "$bin" "$ROOTFS$BIN_IN_IMAGE" || { fail "cannot copy $bin into the test root filesystem"; return 1; }
  # Everything is root-owned and not writable by 65532: a read-only root filesystem in effect.
  chmod 0755 "$ROOTFS/tmp"
  [ -e "$ROOTFS/bin/sh" ] && fail "the test root filesystem has a shell: the package list is wrong"
  return 0
}

# rootfs_command CMD...: sets ROOTFS_CMD to run CMD as the image's user inside the root
# filesystem, with an empty environment plus the OUTBOX_RELAY_* variables exported here. env and
# chroot exec, so the pid of `"${ROOTFS_CMD[@]}" &` is the relay's own (signals reach it).
rootfs_command() {
  local v
  ROOTFS_CMD=(env -i PATH=/usr/local/bin:/usr/bin)
  for v in $(compgen -e | grep '^OUTBOX_RELAY_' || true); do ROOTFS_CMD+=("$v=${!v}"); done
  ROOTFS_CMD+=("$(command -v chroot)" --userspec="$RUNTIME_UID:$RUNTIME_UID" "$ROOTFS" "$@")
}

check_rootfs() {
  local bin=$1 out
  note "running the binary in an image-like root filesystem (only ${RUNTIME_PACKAGES[*]}; uid $RUNTIME_UID; nothing writable)"
  make_rootfs "$bin" || return 0
  rootfs_command "$BIN_IN_IMAGE" --version
  if out=$("${ROOTFS_CMD[@]}" 2>&1); then ok "--version: $out"; else fail "--version in the root filesystem failed: $out"; return 0; fi

  local db brokers
  if ! "$ROOT/scripts/services.sh" status >/dev/null 2>&1 || ! db=$("$ROOT/scripts/pg.sh" url 2>/dev/null) || ! brokers=$("$ROOT/scripts/kafka.sh" url 2>/dev/null); then
    note "local stack not running: skipping migrate/run in the root filesystem (scripts/services.sh up enables it)"
    return 0
  fi
  local port
  for port in $(seq 19465 19485); do port_busy "$port" || break; done
  # The database URL reaches the relay as a file readable by the image's group only, like the
  # Helm chart's Secret volume (defaultMode 0440, fsGroup 65532).
  printf '%s\n' "$db" >"$ROOTFS/run/secrets/database-url"
  chgrp "$RUNTIME_UID" "$ROOTFS/run/secrets/database-url"; chmod 0440 "$ROOTFS/run/secrets/database-url"
  export OUTBOX_RELAY_DATABASE_URL_FILE=/run/secrets/database-url OUTBOX_RELAY_TABLE=outbox_image_check.outbox
  rootfs_command "$BIN_IN_IMAGE" migrate
  if out=$("${ROOTFS_CMD[@]}" 2>&1); then ok "migrate ($OUTBOX_RELAY_TABLE)"; else fail "migrate in the root filesystem failed: $out"; return 0; fi
  export OUTBOX_RELAY_KAFKA_BROKERS=$brokers OUTBOX_RELAY_METRICS_ADDR=127.0.0.1:$port OUTBOX_RELAY_LOG_FORMAT=json
  local log=$ROOTFS.relay.log pid ready=0
  rootfs_command "$BIN_IN_IMAGE" run
  "${ROOTFS_CMD[@]}" >"$log" 2>&1 &
  pid=$! RELAY_PID=$!
  for _ in $(seq 150); do
    curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && { ready=1; break; }
    live "$pid" || break
    sleep 0.2
  done
  if [ $ready = 1 ]; then
    ok "run: /readyz 200 (database and Kafka reachable from the root filesystem)"
    curl -fsS "http://127.0.0.1:$port/metrics" | grep -q '^outbox_relay_leader ' && ok "run: /metrics serves outbox_relay_leader" || fail "run: /metrics lacks outbox_relay_leader"
  else
    fail "run: /readyz never answered 200 within 30s"
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local rc=0
  wait "$pid" || rc=$?
  RELAY_PID=
  [ $rc = 0 ] && ok "run: SIGTERM -> exit 0" || fail "run: exit $rc after SIGTERM"
  [ ${#failures[@]} -gt 0 ] && { echo "--- relay log ---" >&2; tail -n 30 "$log" >&2; }
  rm -f "$log"
  unset OUTBOX_RELAY_DATABASE_URL_FILE OUTBOX_RELAY_TABLE OUTBOX_RELAY_KAFKA_BROKERS OUTBOX_RELAY_METRICS_ADDR OUTBOX_RELAY_LOG_FORMAT
}

# --- main --------------------------------------------------------------------------------
check_dockerfile "$dockerfile"

if [ -z "$bin" ]; then
  case "$profile" in
    release) cargo build --release --locked --quiet --bin outbox-relay; bin=target/release/outbox-relay ;;
    dev) cargo build --locked --quiet --bin outbox-relay; bin=target/debug/outbox-relay ;;
    *) die "--profile must be release or dev" ;;
  esac
fi
[ -x "$bin" ] || die "no executable at $bin"
for tool in ldd readelf objdump dpkg; do command -v "$tool" >/dev/null || die "$tool not found (apt-get install binutils libc-bin dpkg)"; done
check_libraries "$bin"

if [ $rootfs_check = 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v chroot >/dev/null; then check_rootfs "$bin"
  else note "not root: skipping the root filesystem run (chroot needs root)"
  fi
fi

if [ ${#failures[@]} -gt 0 ]; then
  echo "image-check: ${#failures[@]} problem(s):" >&2
  printf '  - %s\n' "${failures[@]}" >&2
  exit 1
fi
echo "image-check: ok ($bin; runtime base $RUNTIME_BASE)"
