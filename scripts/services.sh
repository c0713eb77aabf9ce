#!/usr/bin/env bash
# The local test stack: PostgreSQL + Kafka, plus the Debian packages the Rust build needs.
# Usage: scripts/services.sh {up|down|status|deps}
#   up     install what is missing, make the test certificates (scripts/certs.sh), start both
#          services (PostgreSQL with TLS, Kafka with a SASL_SSL listener), print the test
#          environment as assignments
#   deps   only install the build prerequisites (used by `make lint`)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
S=$ROOT/scripts

# rdkafka builds the bundled librdkafka (C, cmake, zlib, OpenSSL); the demo uses kcat and curl.
# certs.sh needs openssl.
deps() { apt_install build-essential pkg-config libssl-dev zlib1g-dev cmake python3 kcat curl openssl; }

case "${1:-}" in
  deps) deps ;;
  up)
    deps
    "$S/certs.sh"  # before both services: they load the server certificate at start
    "$S/pg.sh" start
    "$S/kafka.sh" start
    echo "OUTBOX_TEST_DATABASE_URL=$("$S/pg.sh" url)"
    echo "OUTBOX_TEST_KAFKA_BROKERS=$("$S/kafka.sh" url)"
    echo "OUTBOX_TEST_KAFKA_SASL_BROKERS=$("$S/kafka.sh" url-sasl)"
    echo "OUTBOX_TEST_CERTS_DIR=$("$S/certs.sh" dir)" ;;
  down)
    "$S/kafka.sh" stop
    "$S/pg.sh" stop ;;
  status)
    rc=0
    "$S/pg.sh" status || rc=$?
    "$S/kafka.sh" status || rc=$?
    exit $rc ;;
  *) echo "usage: $0 {up|down|status|deps}" >&2; exit 2 ;;
esac
