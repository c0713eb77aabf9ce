#!/usr/bin/env bash
# End-to-end demo on the local stack: migrate, start the relay, insert sample events in a
# transaction, read them back from Kafka with kcat, show metrics and readiness, stop gracefully.
# Usage: make demo   (brings the services up first)
# Uses the services the scripts point at (OUTBOX_PG_PORT, OUTBOX_KAFKA_PORT, ...: see
# scripts/pg.sh and scripts/kafka.sh), the relay's metrics on OUTBOX_DEMO_METRICS_PORT (9464).
# A stack that has just started is slow at first (the broker loads its coordinators before the
# relay's idempotent producer may write), so each wait below lasts up to OUTBOX_DEMO_TIMEOUT
# seconds (120) and every figure is printed once it is true.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ROOT"

DB_URL="$(scripts/pg.sh url | sed 's#/postgres$#/outbox_demo#')"
BROKERS="$(scripts/kafka.sh url)"
METRICS="127.0.0.1:${OUTBOX_DEMO_METRICS_PORT:-9464}"
TIMEOUT=${OUTBOX_DEMO_TIMEOUT:-120}
TOPIC=demo.orders.$(date +%s)  # a fresh topic per run, so the consumer shows only this run
LOG=$LOCAL/demo-relay.log

note "building the relay (release)"
cargo build --release --locked --quiet
BIN=target/release/outbox-relay

psql "$(scripts/pg.sh url)" -qtAc "SELECT 1 FROM pg_database WHERE datname = 'outbox_demo'" | grep -q 1 \
  || psql "$(scripts/pg.sh url)" -qc "CREATE DATABASE outbox_demo"
"$BIN" migrate --database-url "$DB_URL"
scripts/kafka.sh create-topic "$TOPIC" 3 >/dev/null

note "starting the relay (log: ${LOG#"$ROOT"/})"
mkdir -p "$LOCAL"
OUTBOX_RELAY_DATABASE_URL="$DB_URL" "$BIN" run --kafka-brokers "$BROKERS" --metrics-addr "$METRICS" \
  >"$LOG" 2>&1 &
RELAY=$!
trap 'kill $RELAY 2>/dev/null || true' EXIT
relay_died() { live "$RELAY" || { tail_log "$LOG"; die "the relay exited (log above)"; }; }

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

# Until 3 messages arrived (-c 3), not until the end of the partitions (-e): on a cold stack
# the partitions are still empty while the relay's producer waits for its producer id.
note "consuming $TOPIC from Kafka until the 3 events arrived (up to ${TIMEOUT}s)"
timeout "$TIMEOUT" kcat -C -b "$BROKERS" -t "$TOPIC" -o beginning -q -c 3 \
  -f 'partition=%p offset=%o key=%k headers=%h\n  payload=%s\n' \
  || { relay_died; die "the 3 events did not reach $TOPIC within ${TIMEOUT}s; see $LOG"; }

# Kafka has them; the relay marks the rows once their deliveries are confirmed, refreshes its
# backlog gauge and its readiness every few seconds. Print what one pass found, once the
# table, the metrics and /readyz agree.
deadline=$((SECONDS + TIMEOUT))
metric() { awk -v m="outbox_relay_$1" '$1 == m { print $2 }' <<<"$scrape"; }
while :; do
  marked=$(psql "$DB_URL" -qtAc "SELECT count(*) FROM outbox WHERE topic = '$TOPIC' AND published_at IS NOT NULL")
  scrape=$(curl -fsS "http://$METRICS/metrics" 2>/dev/null || true)
  ready=$(curl -fsS "http://$METRICS/readyz" 2>/dev/null) || ready=
  agree=no
  [ "$marked" = 3 ] && [ "$(metric pending_rows)" = 0 ] && [ "$(metric published_total)" -ge 3 ] 2>/dev/null && agree=yes
  [ $agree = yes ] && [ -n "$ready" ] && break
  relay_died
  if [ $SECONDS -ge $deadline ]; then
    [ $agree = yes ] || die "after ${TIMEOUT}s: $marked of 3 rows marked, metrics: $(grep -E '^outbox_relay_(published_total|pending_rows) ' <<<"$scrape" | tr '\n' ' ')"
    ready="not ready: $(curl -sS "http://$METRICS/readyz" 2>&1 || true)"
    break
  fi
  sleep 0.5
done
note "readiness: $ready"
note "metrics (the 3 rows are marked published):"
grep -E '^outbox_relay_(published_total|pending_rows|leader) ' <<<"$scrape"
psql "$DB_URL" -c "SELECT id, topic, key, published_at IS NOT NULL AS published FROM outbox WHERE topic = '$TOPIC' ORDER BY id"

note "stopping the relay with SIGTERM"
kill -TERM $RELAY
wait $RELAY && note "relay exited 0 (graceful)"
trap - EXIT
