#!/usr/bin/env python3
"""Tests on the Helm chart's rendered objects (run by scripts/helm-check.sh).

Usage: helm-check.py HELM CHART_DIR RELAY_BINARY
Renders the chart with `helm template` (default values, ci/full-values.yaml, an existing-Secret
setup, and variants) and checks the objects against the relay itself: env var names against
`outbox-relay run|migrate --help`, alert and dashboard metric names against src/telemetry.rs,
and the binary started with each container's rendered configuration (it must accept it).
Prints one line per check and closes with "N passed, M failed".
"""

import base64
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

HELM, CHART, BINARY = sys.argv[1:4]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE, NAMESPACE = "ci", "outbox"
FULLNAME = f"{RELEASE}-outbox-relay"
SECRET_ENV = {  # flags whose literal value is a secret: only their *_FILE forms may appear
    "OUTBOX_RELAY_DATABASE_URL",
    "OUTBOX_RELAY_DATABASE_PASSWORD",
    "OUTBOX_RELAY_KAFKA_SASL_PASSWORD",
}
FILE_ENV = {f"{name}_FILE" for name in SECRET_ENV} | {"OUTBOX_RELAY_KAFKA_CONFIG_FILE"}
EXISTING = [
    "--set", "secrets.existingSecret=relay-db",
    "--set", "secrets.keys.databaseUrl=uri",
    "--set", "secrets.keys.kafkaConfigFile=kafka.conf",
    "--set", "caCertificate.configMapName=ca-bundle",
    "--set", "relay.kafkaBrokers=kafka:9092",
    "--set", "migrate.enabled=true",
]

passed, failed = 0, 0


def check(ok, what, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {what}")
    else:
        failed += 1
        print(f"FAIL {what}" + (f": {detail}" if detail else ""))
    return ok


def helm_template(*args):
    """Rendered objects as {(kind, name): obj}, or the error text when helm fails."""
    cmd = [HELM, "template", RELEASE, CHART, "--namespace", NAMESPACE, *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return r.stderr.strip()
    objs = {}
    for doc in yaml.safe_load_all(r.stdout):
        if doc:
            objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def flags_env(subcommand):
    """OUTBOX_RELAY_* names from `outbox-relay SUBCOMMAND --help` ([env: NAME] or [env: NAME=...])."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
    out = subprocess.run([BINARY, subcommand, "--help"], capture_output=True, text=True, env=env, check=True).stdout
    return set(re.findall(r"\[env:\s+(OUTBOX_RELAY_[A-Z0-9_]+)", " ".join(out.split())))


def seconds(duration):
    m = re.fullmatch(r"(\d+)(s|m)", duration)
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1) if m else None


def by_kind(objs, kind):
    return [o for (k, _), o in objs.items() if k == kind]


RUN_ENV, MIGRATE_ENV = flags_env("run"), flags_env("migrate")
check(len(RUN_ENV) >= 20 and "OUTBOX_RELAY_KAFKA_BROKERS" in RUN_ENV,
      f"`{os.path.basename(BINARY)} run --help` lists the relay's env vars ({len(RUN_ENV)})", sorted(RUN_ENV))
telemetry = open(os.path.join(ROOT, "src", "telemetry.rs")).read()
METRICS = set(re.findall(r'"(outbox_relay_[a-z0-9_]+)"', telemetry))
check(len(METRICS) >= 5, f"src/telemetry.rs defines outbox_relay_* metrics ({len(METRICS)})")


DUMMY_SECRETS = {  # for an existing Secret, whose content the chart never sees
    "OUTBOX_RELAY_DATABASE_URL_FILE": "postgres://relay@127.0.0.1:1/app",
    "OUTBOX_RELAY_DATABASE_PASSWORD_FILE": "x",
    "OUTBOX_RELAY_KAFKA_SASL_PASSWORD_FILE": "x",
    "OUTBOX_RELAY_KAFKA_CONFIG_FILE": "linger.ms=5\n",
}


def relay_accepts(label, objs, expect=True):
    """Start the relay binary with each container's rendered configuration: the ConfigMap and
    env, the Secret's files and a CA written under a temporary directory standing in for
    /etc/outbox-relay, brokers and metrics on unreachable/ephemeral local addresses. The relay
    refuses bad configuration at once (exit 2); accepted, it keeps running (retrying the
    unreachable database and Kafka) until stopped."""
    spec = objs[("Deployment", FULLNAME)]["spec"]["template"]["spec"]
    cm = objs.get(("ConfigMap", FULLNAME), {}).get("data", {})
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    with tempfile.TemporaryDirectory() as tmp:
        def local(value):
            return value.replace("/etc/outbox-relay", tmp)
        if "ca" in volumes:
            ca = volumes["ca"].get("secret") or volumes["ca"]["configMap"]
            os.makedirs(os.path.join(tmp, "ca"))
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                            "-keyout", os.path.join(tmp, "ca.key"), "-out", os.path.join(tmp, "ca", ca["items"][0]["path"]),
                            "-subj", "/CN=helm-check", "-days", "1"], check=True, capture_output=True)
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
            if c.get("envFrom"):
                env.update({k: local(v) for k, v in cm.items()})
            for e in c.get("env", []):
                env[e["name"]] = local(e["value"])
                if e["name"].endswith("_FILE"):
                    secret = volumes["secrets"]["secret"]
                    item = next(i for i in secret["items"] if i["path"] == os.path.basename(e["value"]))
                    data = objs.get(("Secret", secret["secretName"]), {}).get("data", {})
                    text = base64.b64decode(data[item["key"]]).decode() if item["key"] in data else DUMMY_SECRETS[e["name"]]
                    os.makedirs(os.path.dirname(local(e["value"])), exist_ok=True)
                    with open(local(e["value"]), "w") as f:
                        f.write(local(text))
            if "OUTBOX_RELAY_KAFKA_BROKERS" in env:
                env["OUTBOX_RELAY_KAFKA_BROKERS"] = "127.0.0.1:1"
            if "OUTBOX_RELAY_METRICS_ADDR" in env:
                env["OUTBOX_RELAY_METRICS_ADDR"] = "127.0.0.1:0"
            p = subprocess.Popen([BINARY, *c["args"]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                out, _ = p.communicate(timeout=2)
                accepted = p.returncode != 2  # migrate ends by itself; exit 2 = usage/configuration error
            except subprocess.TimeoutExpired:
                p.terminate()
                out, _ = p.communicate(timeout=30)
                accepted = True
            verb = "accepts" if expect else "refuses"
            check(accepted == expect, f"[{label}] the relay {verb} container {c['name']}'s rendered configuration (`{' '.join(c['args'])}`)",
                  out.strip().splitlines()[-3:] if out.strip() else f"exit {p.returncode}")

def check_render(label, objs, expect_files=()):
    """Checks that hold for every successful render."""
    dep = objs.get(("Deployment", FULLNAME))
    if not check(dep is not None, f"[{label}] renders Deployment {FULLNAME}"):
        return
    cm = objs.get(("ConfigMap", FULLNAME), {}).get("data", {})
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    relay = next(c for c in spec["containers"] if c["name"] == "relay")
    inits = spec.get("initContainers", [])

    # Probes and the metrics port.
    port = int(cm.get("OUTBOX_RELAY_METRICS_ADDR", "0.0.0.0:9464").rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in relay.get("ports", [])}
    check(ports.get("metrics") == port, f"[{label}] container port 'metrics' is --metrics-addr's port {port}", ports)
    lp, rp = relay.get("livenessProbe", {}).get("httpGet", {}), relay.get("readinessProbe", {}).get("httpGet", {})
    check(lp.get("path") == "/healthz" and lp.get("port") == "metrics", f"[{label}] liveness probe GET /healthz on metrics", lp)
    check(rp.get("path") == "/readyz" and rp.get("port") == "metrics", f"[{label}] readiness probe GET /readyz on metrics", rp)

    # Security contexts.
    psc = spec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532 and isinstance(psc.get("fsGroup"), int)
          and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
          f"[{label}] pod securityContext: runAsNonRoot, runAsUser 65532, fsGroup, seccomp RuntimeDefault", psc)
    for c in [relay, *inits]:
        sc = c.get("securityContext", {})
        check(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
              and "ALL" in sc.get("capabilities", {}).get("drop", []),
              f"[{label}] container {c['name']}: read-only root, no privilege escalation, capabilities drop ALL", sc)
    check(spec.get("automountServiceAccountToken") is False, f"[{label}] no service account token mounted")

    # Secrets: never a literal value; *_FILE variables point into a mounted Secret volume's items.
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    check(not (SECRET_ENV & set(cm)), f"[{label}] ConfigMap holds no secret variable", SECRET_ENV & set(cm))
    for c in [relay, *inits]:
        env = c.get("env", [])
        literal = [e["name"] for e in env if e["name"] in SECRET_ENV]
        check(not literal, f"[{label}] {c['name']}: no {'/'.join(sorted(SECRET_ENV))} env var (only *_FILE)", literal)
        mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts", [])}
        files = [e for e in env if e["name"].endswith("_FILE")]
        for e in files:
            path = e.get("value", "")
            d, f = os.path.dirname(path), os.path.basename(path)
            m = mounts.get(d)
            vol = volumes.get(m["name"]) if m else None
            secret = (vol or {}).get("secret")
            ok = bool(secret) and m.get("readOnly") is True and f in [i["path"] for i in secret.get("items", [])]
            if ok:
                name = secret["secretName"]
                rendered = objs.get(("Secret", name))
                key = next(i["key"] for i in secret["items"] if i["path"] == f)
                ok = name == "relay-db" if rendered is None else key in rendered.get("data", {})
            check(ok and e["name"] in FILE_ENV, f"[{label}] {c['name']}: {e['name']}={path} is an item of a mounted Secret volume", e)
        for want in expect_files if c is relay else [x for x in expect_files if "DATABASE" in x]:
            check(want in [e["name"] for e in files], f"[{label}] {c['name']}: sets {want}")

    # Grace period and checksum.
    shutdown = seconds(cm.get("OUTBOX_RELAY_SHUTDOWN_TIMEOUT", ""))
    grace = spec.get("terminationGracePeriodSeconds")
    check(shutdown is not None and isinstance(grace, int) and grace > shutdown,
          f"[{label}] terminationGracePeriodSeconds {grace} > --shutdown-timeout {shutdown}s")
    checksum = pod["metadata"].get("annotations", {}).get("checksum/config", "")
    check(re.fullmatch(r"[0-9a-f]{64}", checksum) is not None, f"[{label}] checksum/config annotation is a sha256", checksum)

    # Every OUTBOX_RELAY_* name is a real flag of the command its container runs.
    relay_names = {k for k in cm if k.startswith("OUTBOX_RELAY_")} | {
        e["name"] for e in relay.get("env", []) if e["name"].startswith("OUTBOX_RELAY_")}
    check(relay.get("args") == ["run"] and relay_names <= RUN_ENV,
          f"[{label}] relay: all {len(relay_names)} OUTBOX_RELAY_* names are `run` flags", relay_names - RUN_ENV)
    check(relay.get("envFrom", [{}])[0].get("configMapRef", {}).get("name") == FULLNAME, f"[{label}] relay reads the ConfigMap")
    for c in inits:
        names = {e["name"] for e in c.get("env", []) if e["name"].startswith("OUTBOX_RELAY_")}
        check(c.get("args") == ["migrate"] and names <= MIGRATE_ENV and not c.get("envFrom"),
              f"[{label}] init {c['name']}: runs migrate, all OUTBOX_RELAY_* names are `migrate` flags", names - MIGRATE_ENV)

    # Service, PDB, ServiceMonitor, PrometheusRule.
    svc = objs.get(("Service", FULLNAME), {})
    check([p.get("targetPort") for p in svc.get("spec", {}).get("ports", [])] == ["metrics"], f"[{label}] Service targets the metrics port")
    pdb = objs.get(("PodDisruptionBudget", FULLNAME))
    check(pdb is not None and pdb["spec"].get("maxUnavailable") == 1, f"[{label}] PodDisruptionBudget maxUnavailable 1")
    for sm in by_kind(objs, "ServiceMonitor"):
        check([e.get("port") for e in sm["spec"]["endpoints"]] == ["metrics"]
              and sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items(),
              f"[{label}] ServiceMonitor scrapes the Service's metrics port")
    for rule in by_kind(objs, "PrometheusRule"):
        exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
        used = set(re.findall(r"\b(outbox_relay_[a-z0-9_]+)", " ".join(exprs)))
        base = {re.sub(r"_(bucket|sum|count)$", "", m) if m not in METRICS else m for m in used}
        check(used and base <= METRICS, f"[{label}] PrometheusRule uses only metrics the relay defines ({', '.join(sorted(used))})",
              base - METRICS)
        text = " ".join(exprs)
        for needle in ["outbox_relay_oldest_pending_age_seconds", "rate(outbox_relay_publish_errors_total[",
                       "outbox_relay_parked_rows", "max(outbox_relay_leader", "kube_deployment_status_replicas_available"]:
            check(needle.replace("[", "{") in text or needle in text, f"[{label}] PrometheusRule has an alert on {needle.rstrip('([{')}")
    # Labels everywhere.
    for (kind, name), o in objs.items():
        labels = o["metadata"].get("labels", {})
        if not check(labels.get("app.kubernetes.io/instance") == RELEASE and "helm.sh/chart" in labels,
                     f"[{label}] {kind}/{name} has the chart's labels", labels):
            break
    return dep


def main():
    full_values = os.path.join(CHART, "ci", "full-values.yaml")
    default = helm_template()
    full = helm_template("-f", full_values)
    existing = helm_template(*EXISTING)
    for label, objs in [("default", default), ("full", full), ("existing-secret", existing)]:
        if not check(isinstance(objs, dict), f"[{label}] helm template succeeds", objs):
            return
    check_render("default", default)
    check_render("full", full, expect_files=sorted(FILE_ENV))
    check_render("existing-secret", existing, expect_files=["OUTBOX_RELAY_DATABASE_URL_FILE", "OUTBOX_RELAY_KAFKA_CONFIG_FILE"])
    relay_accepts("full", full)
    relay_accepts("existing-secret", existing)
    bad = helm_template("--set", "relay.kafkaBrokers=k:9092", "--set", "secrets.databaseUrl=postgres://u@h/d",
                        "--set", "relay.kafkaConfig={acks=sometimes}")
    relay_accepts("negative control: relay.kafkaConfig acks=sometimes", bad, expect=False)

    # Defaults the issue asks for.
    dspec = default[("Deployment", FULLNAME)]["spec"]
    relay = dspec["template"]["spec"]["containers"][0]
    check(dspec["replicas"] == 2, "default replicas 2")
    check(dspec["template"]["spec"]["terminationGracePeriodSeconds"] == 45, "default grace period = 30s shutdown + 15s")
    check(relay["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
          "default resources 50m/64Mi, limit 256Mi", relay["resources"])
    check(default[("ConfigMap", FULLNAME)]["data"]["OUTBOX_RELAY_LOG_FORMAT"] == "json", "default log format json")
    check(not dspec["template"]["spec"].get("initContainers"), "migrate init container off by default")
    check(not any(k in ("ServiceMonitor", "PrometheusRule", "NetworkPolicy", "Secret") for k, _ in default),
          "default values create no ServiceMonitor, PrometheusRule, NetworkPolicy or Secret", sorted(default))
    check(all(k in [kk for kk, _ in full] for k in ("ServiceMonitor", "PrometheusRule", "NetworkPolicy", "Secret", "ServiceAccount")),
          "full values create every optional object", sorted(full))
    dash = full.get(("ConfigMap", f"{FULLNAME}-dashboard"), {}).get("data", {}).get("outbox-relay.json", "")
    try:
        dash_ok = bool(json.loads(dash).get("panels"))
    except ValueError:
        dash_ok = False
    dash_metrics = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\b(outbox_relay_[a-z0-9_]+)", dash)}
    check(dash_ok and dash_metrics and dash_metrics <= METRICS,
          "grafanaDashboard: the ConfigMap holds the dashboard JSON, with metrics the relay defines", dash_metrics - METRICS)
    check(("Secret", "relay-db") not in existing and not any(k == "Secret" for k, _ in existing),
          "existingSecret: the chart creates no Secret")

    # Every run flag can be set from values (secret ones through their *_FILE form).
    full_names = set(full[("ConfigMap", FULLNAME)]["data"]) | {
        e["name"] for e in full[("Deployment", FULLNAME)]["spec"]["template"]["spec"]["containers"][0].get("env", [])}
    check(RUN_ENV - SECRET_ENV <= full_names, "full values set every `run` flag (secrets via *_FILE)", sorted(RUN_ENV - SECRET_ENV - full_names))
    cfg = full[("ConfigMap", FULLNAME)]["data"]["OUTBOX_RELAY_KAFKA_CONFIG"]
    check(cfg.endswith(";ssl.ca.location=/etc/outbox-relay/ca/ca.crt") and "security.protocol=SASL_SSL" in cfg,
          "kafkaConfig joined with ';' plus ssl.ca.location of the mounted CA", cfg)

    # Checksum: changes with the relay's configuration or the chart's Secret, not with replicas.
    def checksum(*args):
        objs = helm_template(*args)
        dep = objs.get(("Deployment", FULLNAME), {}) if isinstance(objs, dict) else {}
        return dep.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {}).get("checksum/config")
    base = checksum()
    check(base is not None, "checksum/config present with default values")
    check(checksum("--set", "relay.batchSize=500") != base, "checksum changes when a relay value changes")
    check(checksum("--set", "secrets.databaseUrl=postgres://relay@db/app") != base, "checksum changes when a chart Secret value changes")
    check(checksum("--set", "replicaCount=5") == base, "checksum stays when only replicaCount changes")

    # Grace period derived from the shutdown timeout; refusals.
    two_min = helm_template("--set", "relay.shutdownTimeout=2m")
    check(isinstance(two_min, dict) and two_min[("Deployment", FULLNAME)]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 135,
          "shutdownTimeout 2m -> grace period 135s")
    refusals = [
        (["--set", "terminationGracePeriodSeconds=30"], "longer than relay.shutdownTimeout", "grace period not above the shutdown timeout"),
        (["--set", "replicaCont=3"], "additional properties", "a typo in a top-level key (schema)"),
        (["--set", "relay.batchSise=3"], "additional properties", "a typo in a relay key (schema)"),
        (["--set", "relay.compression=brotli"], "compression", "an unknown compression codec (schema)"),
        (["--set", "relay.shutdownTimeout=30"], "shutdownTimeout", "a shutdown timeout without unit (schema)"),
        (["--set", "relay.kafkaConfig={sasl.password=hunter2}"], "looks secret", "a secret in relay.kafkaConfig"),
        (["--set", "extraEnv[0].name=OUTBOX_RELAY_DATABASE_URL", "--set", "extraEnv[0].value=postgres://u:p@h/d"],
         "literal value", "a literal database URL in extraEnv"),
        (["--set", "relay.metricsAddr=127.0.0.1:9464"], "loopback", "a loopback metrics address"),
        (["--set", "caCertificate.secretName=a", "--set", "caCertificate.configMapName=b"], "not both", "two CA sources"),
        (["--set", "relay.poisonPolicy=dead-letter"], "deadLetterTopic", "poisonPolicy dead-letter without a topic"),
        (["--set", "relay.readMode=append"], "append was removed", "the removed readMode append, naming the upgrade"),
        (["--set", "relay.readMode=log", "--set", "relay.onPublish=delete"], "readMode claim", "readMode log with onPublish delete"),
        (["--set", "relay.readMode=log", "--set", "relay.poisonPolicy=block-key"], "readMode claim", "readMode log with block-key"),
    ]
    for args, needle, what in refusals:
        r = helm_template(*args)
        check(isinstance(r, str) and needle in r, f"refuses {what}", r if isinstance(r, str) else "rendered")

    # README documents every value.
    readme = open(os.path.join(CHART, "README.md")).read()
    values = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))

    def leaves(d, prefix=""):
        for k, v in d.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and v and not k.endswith(("resources", "SecurityContext", "securityContext", "strategy",
                                                             "labels", "annotations")) \
                    and path not in ("prometheusRule.for",):
                yield from leaves(v, path + ".")
            else:
                yield path
    missing = [p for p in leaves(values) if f"`{p}`" not in readme]
    check(not missing, "README.md documents every value", missing)


main()
print(f"helm-check: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
