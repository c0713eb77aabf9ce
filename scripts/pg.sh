#!/usr/bin/env bash
# Local PostgreSQL (Debian packages) for tests, the demo and benchmarks.
# Own cluster in .local/pg, listening on 127.0.0.1:${OUTBOX_PG_PORT:-54329} (and 127.0.0.2, for
# host name verification tests), trust auth for every role but one:
# TLS is always on (certificates from scripts/certs.sh); plaintext clients keep working, but
# the role relay_tls (password relay-tls-secret, SCRAM) may log in only over TLS (hostssl).
# `start` on a running cluster re-applies this configuration (reload) and the role.
# Usage: scripts/pg.sh {start|stop|status|kill9|restart-fast|url|url-tls}
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PORT=${OUTBOX_PG_PORT:-54329}
PG=$(realpath -m "${OUTBOX_PG_DIR:-$LOCAL/pg}")  # a second, independent cluster: set OUTBOX_PG_DIR and OUTBOX_PG_PORT
DATA=$PG/data
SOCK=$PG/run
LOG=$PG/log
TIMEOUT=${OUTBOX_PG_START_TIMEOUT:-60}
TLS=$PG/tls  # copies of the server certificate and key, owned by the server's OS user
TLS_ROLE=relay_tls
TLS_PASSWORD=relay-tls-secret

# The server refuses to run as root: as root, run it as the `postgres` OS user.
if [ "$(id -u)" = 0 ]; then OWNER=postgres; else OWNER=$(id -un); fi
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
give() { if [ "$(id -u)" = 0 ]; then chown "$OWNER:" "$@"; fi; }

find_bin() {
  BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$BIN" ] || [ ! -x "$BIN/postgres" ]; then
    # Installing must not create and start Debian's default cluster on 5432.
    apt_install postgresql-common
    sed -ri 's/^#?(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf
    apt_install postgresql postgresql-contrib
    BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
}

running() { live "$(postmaster_pid)"; }
postmaster_pid() { head -n 1 "$DATA/postmaster.pid" 2>/dev/null || true; }

init_cluster() {
  mkdir -p "$PG" && give "$PG"
  as_owner test -w "$PG" || die "$OWNER cannot write $PG; fix: make every parent of $ROOT searchable (chmod o+x) and $PG owned by $OWNER"
  mkdir -p "$SOCK" && give "$SOCK"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    note "initdb $DATA"
    as_owner "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --no-locale >"$PG/initdb.log" 2>&1 \
      || { tail_log "$PG/initdb.log"; die "initdb failed; fix the cause above, then rm -rf $PG and retry"; }
    echo "include_if_exists = 'outbox-relay.conf'" >> "$DATA/postgresql.conf"
  fi
}

# put FILE MODE < content: write FILE as the server's user if its content changed;
# sets CHANGED=1 when it did.
put() {
  local tmp; tmp=$(mktemp)
  cat > "$tmp"
  if ! cmp -s "$tmp" "$1" 2>/dev/null; then
    as_owner tee "$1" < "$tmp" >/dev/null
    CHANGED=1
  fi
  as_owner chmod "$2" "$1"
  rm -f "$tmp"
}

# Rewritten on every start, so changes here reach existing clusters (a running one reloads).
configure() {
  CHANGED=0
  "$ROOT/scripts/certs.sh" >/dev/null 9>&-
  # The server wants its key owned by itself with mode 0600: copy it next to the data dir.
  mkdir -p "$TLS" && give "$TLS" && chmod 700 "$TLS"
  put "$TLS/server.pem" 644 < "$CERTS/server.pem"
  put "$TLS/server.key" 600 < "$CERTS/server.key"
  put "$DATA/outbox-relay.conf" 600 <<CONF
listen_addresses = '127.0.0.1,127.0.0.2'
port = $PORT
unix_socket_directories = '$SOCK'
max_connections = 300
wal_level = logical
max_wal_senders = 16
max_replication_slots = 16
track_commit_timestamp = on
shared_preload_libraries = 'pg_stat_statements'
ssl = on
ssl_cert_file = '$TLS/server.pem'
ssl_key_file = '$TLS/server.key'
password_encryption = 'scram-sha-256'
CONF
  put "$DATA/pg_hba.conf" 600 <<HBA
# Local test stack: trust on loopback and the private socket, except for the TLS test role:
# $TLS_ROLE (and roles granted it) log in only over TLS with a SCRAM password.
hostssl all         +$TLS_ROLE 127.0.0.1/32 scram-sha-256
hostssl all         +$TLS_ROLE 127.0.0.2/32 scram-sha-256
host    all         +$TLS_ROLE all          reject
local   all         +$TLS_ROLE              reject
local   all         all              trust
local   replication all              trust
host    all         all 127.0.0.1/32 trust
host    replication all 127.0.0.1/32 trust
host    all         all 127.0.0.2/32 trust
HBA
}

# The password-authenticated role for TLS tests (idempotent; the password is sent on stdin).
ensure_role() {
  as_owner "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PORT" -U postgres -d postgres >/dev/null <<SQL \
    || die "could not create the role $TLS_ROLE (see above)"
SELECT format('CREATE ROLE %I', '$TLS_ROLE') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$TLS_ROLE')
\\gexec
ALTER ROLE $TLS_ROLE LOGIN NOSUPERUSER PASSWORD '$TLS_PASSWORD';
SQL
}

start() {
  find_bin
  if running; then
    configure
    if [ "$CHANGED" = 1 ]; then
      note "configuration changed: reloading the running server"
      as_owner "$BIN/pg_ctl" -D "$DATA" reload >/dev/null || die "pg_ctl reload failed"
      sleep 0.5
    fi
    ensure_role
    local pending
    pending=$(as_owner "$BIN/psql" -X -At -h "$SOCK" -p "$PORT" -U postgres -d postgres \
      -c "SELECT string_agg(name, ', ') FROM pg_settings WHERE pending_restart" 2>/dev/null || true)
    [ -z "$pending" ] || note "settings waiting for a restart: $pending; apply them with: scripts/pg.sh restart-fast"
    echo "postgres already running on 127.0.0.1:$PORT (pid $(postmaster_pid))"; return 0
  fi
  local old; old=$(postmaster_pid)
  if zombie "$old" && ! wait_gone 10 "$old"; then die "the killed postmaster (pid $old) is still a zombie: init has not reaped it"; fi
  port_busy "$PORT" && die "127.0.0.1:$PORT is already in use by another process; stop it or set OUTBOX_PG_PORT"
  init_cluster
  configure
  touch "$LOG" && give "$LOG"
  as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -W start >/dev/null 9>&- \
    || { tail_log "$LOG"; die "pg_ctl start failed (see log above)"; }
  local deadline=$((SECONDS + TIMEOUT))
  until "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres; do
    if [ $SECONDS -ge $deadline ]; then tail_log "$LOG"; die "postgres not ready on 127.0.0.1:$PORT after ${TIMEOUT}s (raise OUTBOX_PG_START_TIMEOUT if it is still recovering)"; fi
    if ! running; then sleep 1; running || { tail_log "$LOG"; die "postgres exited during startup (see log above)"; }; fi
    sleep 0.2
  done
  ensure_role
  echo "postgres running on 127.0.0.1:$PORT (pid $(postmaster_pid)), data $DATA, log $LOG, TLS on (CA $CERTS/ca.pem)"
}

stop() {
  find_bin
  if ! running; then echo "postgres already stopped"; return 0; fi
  as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null \
    || { tail_log "$LOG"; die "postgres did not stop within 60s; try: scripts/pg.sh kill9"; }
  echo "postgres stopped"
}

kill9() {
  find_bin
  if ! running; then echo "postgres not running"; return 0; fi
  local pid procs
  pid=$(postmaster_pid)
  procs="$pid $(children "$pid" | tr '\n' ' ')"
  kill -9 "$pid"
  # Backends exit on their own once the postmaster is gone. Wait until all are reaped:
  # a new postmaster refuses to start while the old pid (even a zombie) or its shared memory lingers.
  # shellcheck disable=SC2086
  wait_gone 30 $procs || die "postgres processes not reaped 30s after SIGKILL: $procs (zombies are reaped by init)"
  echo "postgres postmaster $pid killed with SIGKILL"
}

status() {
  find_bin
  if running; then echo "postgres running on 127.0.0.1:$PORT (pid $(postmaster_pid))"; else echo "postgres stopped"; exit 3; fi
}

case "${1:-}" in start|stop|kill9|restart-fast) lock "$PG" ;; esac
case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  kill9) kill9 ;;
  restart-fast) stop; start ;;
  url) echo "postgres://postgres@127.0.0.1:$PORT/postgres" ;;
  # Verified TLS as the password role (give the password separately, never in the URL).
  url-tls) echo "postgres://$TLS_ROLE@127.0.0.1:$PORT/postgres?sslmode=verify-full&sslrootcert=$CERTS/ca.pem" ;;
  *) echo "usage: $0 {start|stop|status|kill9|restart-fast|url|url-tls}" >&2; exit 2 ;;
esac
