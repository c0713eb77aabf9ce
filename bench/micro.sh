#!/usr/bin/env bash
# Micro-measurements quoted in README.md and ARCHITECTURE.md, on the local stack
# (`make services-up`; PostgreSQL on $OUTBOX_PG_PORT, default 54329). Usage: bench/micro.sh
#  1. mark vs delete: time and WAL bytes per row of the relay's UPDATE and DELETE by id = ANY.
#  2. the NOTIFY commit lock: pgbench, 16 clients, single-row inserts into a table whose trigger
#     notifies on every commit, against the same table without the trigger.
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${OUTBOX_TEST_DATABASE_URL:-$(scripts/pg.sh url)}
BIN=${OUTBOX_RELAY_BIN:-target/debug/outbox-relay}
PGBENCH=$(ls /usr/lib/postgresql/*/bin/pgbench | tail -1)
[ -x "$BIN" ] || cargo build --locked
q() { PGOPTIONS="-c client_min_messages=warning" psql -qtAX "$DB" "$@"; }
for t in micro_mark micro_notify micro_quiet; do q -c "DROP TABLE IF EXISTS $t, ${t}_lease, ${t}_replicas CASCADE"; done

echo "== 1. mark (UPDATE) vs delete (DELETE), 50,000 rows of 200 B each"
"$BIN" migrate --database-url "$DB" --table micro_mark >/dev/null
q -c "INSERT INTO micro_mark (topic, key, payload) SELECT 't', 'k'||(g%1000), convert_to(rpad('x',200,'x'),'UTF8') FROM generate_series(1,100000) g" \
  -c "VACUUM ANALYZE micro_mark"
q <<'SQL'
SELECT pg_current_wal_lsn() AS a, clock_timestamp() AS ta \gset
UPDATE micro_mark SET published_at = now() WHERE id = ANY(ARRAY(SELECT generate_series(1,50000)::bigint)) AND published_at IS NULL;
SELECT pg_current_wal_lsn() AS b, clock_timestamp() AS tb \gset
DELETE FROM micro_mark WHERE id = ANY(ARRAY(SELECT generate_series(50001,100000)::bigint)) AND published_at IS NULL;
SELECT pg_current_wal_lsn() AS c, clock_timestamp() AS tc \gset
SELECT format('UPDATE: %s us and %s WAL bytes per row', round(extract(epoch FROM :'tb'::timestamptz - :'ta'::timestamptz) * 1e6 / 50000, 1), round(pg_wal_lsn_diff(:'b', :'a') / 50000)),
       format('DELETE: %s us and %s WAL bytes per row', round(extract(epoch FROM :'tc'::timestamptz - :'tb'::timestamptz) * 1e6 / 50000, 1), round(pg_wal_lsn_diff(:'c', :'b') / 50000));
SQL

echo "== 2. single-row commits, 16 clients, 8 s: trigger notifying on every commit vs no trigger"
"$BIN" migrate --database-url "$DB" --table micro_notify >/dev/null
"$BIN" migrate --database-url "$DB" --table micro_quiet --notify-trigger false >/dev/null
# An idle relay's request for notifications, held for the whole run.
q -c "INSERT INTO micro_notify_lease (id, holder, epoch, expires_at, wake_wanted) VALUES (1, 'micro', 1, now(), true)"
for t in micro_notify micro_quiet; do
  echo "INSERT INTO $t (topic, key, payload) VALUES ('t', 'k', 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx');" > "/tmp/$t.sql"
  printf '%s: ' "$t"; "$PGBENCH" -n -c 16 -j 2 -T 8 -f "/tmp/$t.sql" "$DB" 2>&1 | grep -E '^tps'
done
for t in micro_mark micro_notify micro_quiet; do q -c "DROP TABLE IF EXISTS $t, ${t}_lease, ${t}_replicas CASCADE"; done
