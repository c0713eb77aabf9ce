#!/usr/bin/env bash
# End-to-end demo on the local stack: migrate, start the relay, insert sample events in a
# transaction, read them back from Kafka with kcat, show metrics and readiness, stop gracefully.
# Usage: make demo   (brings the services up first)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

DB_URL="$(scripts/pg.sh url | sed 's#/postgres$#/outbox_demo#')"
BROKERS="$(scripts/kafka.sh url)"
METRICS="127.0.0.1:${OUTBOX_DEMO_METRICS_PORT:-9464}"
TOPIC=demo.orders.$(date +%s)  # a fresh topic per run, so the consumer shows only this run

note "building the relay (release)"
cargo build --release --locked --quiet
BIN=target/release/outbox-relay

psql "$(scripts/pg.sh url)" -qtAc "SELECT 1 FROM pg_database WHERE datname = 'outbox_demo'" | grep -q 1 \
  || psql "$(scripts/pg.sh url)" -qc "CREATE DATABASE outbox_demo"
"$BIN" migrate --database-url "$DB_URL"
scripts/kafka.sh create-topic "$TOPIC" 3 >/dev/null

note "starting the relay (log: .local/demo-relay.log)"
OUTBOX_RELAY_DATABASE_URL="$DB_URL" "$BIN" run --kafka-brokers "$BROKERS" --metrics-addr "$METRICS" \
  >"$LOCAL/demo-relay.log" 2>&1 &
RELAY=$!
trap 'kill $RELAY 2>/dev/null || true' EXIT

note "inserting 3 events in one application transaction"
psql "$DB_URL" -q -v ON_ERROR_STOP=1 <<SQL
\\o /dev/null
BEGIN;
INSERT INTO outbox (topic, key, payload, headers)
  VALUES ('$TOPIC', 'order-1', convert_to('{"status":"created"}', 'UTF8'), '{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}');
SELECT outbox_enqueue_json('$TOPIC', 'order-1', '{"status":"paid"}');
SELECT outbox_enqueue_json('$TOPIC', 'order-2', '{"status":"created"}', '{"tenant":"acme"}');
COMMIT;
SQL

note "consuming $TOPIC from Kafka"
timeout 30 kcat -C -b "$BROKERS" -t "$TOPIC" -o beginning -e -q -c 3 \
  -f 'partition=%p offset=%o key=%k headers=%h\n  payload=%s\n'

for _ in $(seq 50); do
  curl -fsS "http://$METRICS/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
note "readiness: $(curl -sS "http://$METRICS/readyz")"
note "metrics:"
curl -sS "http://$METRICS/metrics" | grep -E '^outbox_relay_(published_total|pending_rows|leader) '
psql "$DB_URL" -c "SELECT id, topic, key, published_at IS NOT NULL AS published FROM outbox ORDER BY id DESC LIMIT 3"

note "stopping the relay with SIGTERM"
kill -TERM $RELAY
wait $RELAY && note "relay exited 0 (graceful)"
trap - EXIT
