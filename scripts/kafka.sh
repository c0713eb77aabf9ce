#!/usr/bin/env bash
# Local Apache Kafka (single-node KRaft, broker+controller in one JVM) from Maven Central jars.
# Broker on 127.0.0.1:${OUTBOX_KAFKA_PORT:-19092} (PLAINTEXT), controller on ${OUTBOX_KAFKA_CONTROLLER_PORT:-19093},
# and a SASL_SSL listener on ${OUTBOX_KAFKA_SASL_PORT:-19094}: SCRAM-SHA-512, user relay / relay-scram-secret,
# certificate from scripts/certs.sh (clients trust .local/certs/ca.pem).
# Data, log and pid in .local/kafka (or $OUTBOX_KAFKA_DIR); jars in .local/kafka/libs.
# Usage: scripts/kafka.sh {start|stop|status|kill9|pause|resume|create-topic NAME [PARTITIONS] [TopicCommand args...]|list-topics|url|url-sasl|add-scram-user NAME [BOOTSTRAP] (password on stdin)}
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PORT=${OUTBOX_KAFKA_PORT:-19092}
CPORT=${OUTBOX_KAFKA_CONTROLLER_PORT:-19093}
SPORT=${OUTBOX_KAFKA_SASL_PORT:-19094}
SCRAM_USER=relay
SCRAM_PASSWORD=relay-scram-secret
TIMEOUT=${OUTBOX_KAFKA_START_TIMEOUT:-120}
# A second, independent broker (e.g. for fault tests): set OUTBOX_KAFKA_DIR and the three ports
# (OUTBOX_KAFKA_PORT, OUTBOX_KAFKA_CONTROLLER_PORT, OUTBOX_KAFKA_SASL_PORT); OUTBOX_CERTS_DIR optionally.
K=$(realpath -m "${OUTBOX_KAFKA_DIR:-$LOCAL/kafka}")
LIBS=$LOCAL/kafka/libs
PIDF=$K/kafka.pid
LOG=$K/kafka.log
PROPS=$K/server.properties
POM=$ROOT/scripts/kafka/pom.xml
BOOT=127.0.0.1:$PORT
SASL_BOOT=127.0.0.1:$SPORT

ensure_java() {
  command -v java >/dev/null && command -v mvn >/dev/null || apt_install openjdk-17-jre-headless maven
  local major
  major=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
  [ "${major:-0}" -ge 17 ] || die "Kafka 4 needs Java >= 17, found '${major:-?}'; fix: apt-get install openjdk-17-jre-headless and make it the default java"
}

# Gather the broker's jars once per pom content (the version lives in the pom).
ensure_libs() {
  ensure_java
  local want
  want=$(sha256sum "$POM" | cut -d' ' -f1)
  [ "$(cat "$LIBS/.pom.sha256" 2>/dev/null)" = "$want" ] && return 0
  note "gathering Kafka $(version) jars from Maven Central into $LIBS"
  rm -rf "$LIBS" "$LIBS.tmp"
  mkdir -p "$LOCAL/kafka"
  mvn -B -f "$POM" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS.tmp" > "$LOCAL/kafka/mvn.log" 2>&1 \
    || { tail_log "$LOCAL/kafka/mvn.log"; die "mvn could not fetch the Kafka jars from Maven Central (see above; proxy settings go in ~/.m2/settings.xml)"; }
  echo "$want" > "$LIBS.tmp/.pom.sha256"
  mv "$LIBS.tmp" "$LIBS"
}

version() { sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM"; }

# A short-lived JVM for the command-line tools: small heap, quick start, warnings only.
tool() {
  java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
    -cp "$LIBS/*" "$@"
}
topics() {
  printf 'request.timeout.ms=10000\ndefault.api.timeout.ms=15000\n' > "$K/admin.properties"
  tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOT" --command-config "$K/admin.properties" "$@"
}

# scram_user NAME PASSWORD: create or update a SCRAM-SHA-512 user (admin API over PLAINTEXT).
# The password goes through a 0600 file, never argv. (In the file the value has no [...]:
# ConfigCommand matches `[iterations=N,]password=...` against it; a `\` would need doubling.)
scram_user() {
  local f rc=0; f=$(mktemp)
  printf 'SCRAM-SHA-512=password=%s\n' "$2" > "$f"
  printf 'request.timeout.ms=10000\ndefault.api.timeout.ms=15000\n' > "$f.admin"
  tool kafka.admin.ConfigCommand --bootstrap-server "$BOOT" --command-config "$f.admin" \
    --alter --entity-type users --entity-name "$1" --add-config-file "$f" >/dev/null || rc=$?
  rm -f "$f" "$f.admin"
  return $rc
}

# The relay's SCRAM user: added at format time (--add-scram); a data dir formatted before that
# existed gets it through the admin API. The marker names the cluster it was done for.
cluster_id() { sed -n 's/^cluster.id=//p' "$K/data/meta.properties" 2>/dev/null; }
scram_marker() { echo "$(cluster_id) $SCRAM_USER $(printf %s "$SCRAM_PASSWORD" | sha256sum | cut -c1-16)"; }
ensure_scram_user() {
  [ "$(cat "$K/.scram-user" 2>/dev/null)" = "$(scram_marker)" ] && return 0
  scram_user "$SCRAM_USER" "$SCRAM_PASSWORD" || die "could not create the SCRAM user $SCRAM_USER (see above)"
  scram_marker > "$K/.scram-user"
  note "SCRAM-SHA-512 user $SCRAM_USER ready"
}

pid() { cat "$PIDF" 2>/dev/null || true; }
# Our broker is alive (running or paused): the pid file names a live kafka.Kafka on our config.
alive() {
  local p; p=$(pid)
  [ -n "$p" ] && tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline" | grep -q "kafka.Kafka $PROPS"
}
paused() { [ "$(state "$(pid)")" = T ]; }

props() {
  cat <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT,SASL_SSL://127.0.0.1:$SPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT,SASL_SSL://127.0.0.1:$SPORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
# SASL_SSL for the TLS/SCRAM tests: PEM key and chain from scripts/certs.sh, no client certificates.
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$CERTS/server-keystore.pem
listener.name.sasl_ssl.ssl.truststore.type=PEM
listener.name.sasl_ssl.ssl.truststore.location=$CERTS/ca.pem
listener.name.sasl_ssl.ssl.client.auth=none
log.dirs=$K/data
num.partitions=3
default.replication.factor=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# After a kill -9 the restarted broker waits for its old session to expire before it is
# unfenced (default 9 s); a short session keeps fault-test restarts quick.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
PROPS
}
write_props() { props > "$PROPS"; }

start() {
  local p deadline
  if alive; then
    paused && die "kafka (pid $(pid)) is paused; run: scripts/kafka.sh resume"
    ensure_libs
    "$ROOT/scripts/certs.sh" >/dev/null 9>&-
    if [ "$(props)" != "$(cat "$PROPS" 2>/dev/null || true)" ]; then
      note "kafka (pid $(pid)) runs with an older $PROPS (e.g. without the SASL_SSL listener on $SASL_BOOT);" \
        "apply the new one with: scripts/kafka.sh stop && scripts/kafka.sh start"
    elif [ "$CERTS/server-keystore.pem" -nt "$PIDF" ]; then
      note "the server certificate in $CERTS changed after kafka (pid $(pid)) started;" \
        "it serves the old one until: scripts/kafka.sh stop && scripts/kafka.sh start"
    fi
    ensure_scram_user
    echo "kafka already running on $BOOT (pid $(pid))"; return 0
  fi
  for p in "$PORT" "$CPORT" "$SPORT"; do
    port_busy "$p" && die "127.0.0.1:$p is already in use by another process; stop it or set OUTBOX_KAFKA_PORT / OUTBOX_KAFKA_CONTROLLER_PORT / OUTBOX_KAFKA_SASL_PORT"
  done
  ensure_libs
  "$ROOT/scripts/certs.sh" >/dev/null 9>&-
  mkdir -p "$K"
  write_props
  if [ ! -f "$K/data/meta.properties" ]; then
    tool kafka.tools.StorageTool format -t "$(tool kafka.tools.StorageTool random-uuid)" -c "$PROPS" --ignore-formatted \
      --add-scram "SCRAM-SHA-512=[name=$SCRAM_USER,password=$SCRAM_PASSWORD]" >/dev/null \
      || die "formatting $K/data failed; fix the cause above or rm -rf $K/data"
    scram_marker > "$K/.scram-user"
  fi
  p=$(pid)
  if zombie "$p" && ! wait_gone 10 "$p"; then die "the killed broker (pid $p) is still a zombie: init has not reaped it"; fi
  rm -f "$PIDF"
  echo "=== start $(date -Is)" >> "$LOG"
  # setsid: the broker outlives this script and ignores the caller's Ctrl-C.
  setsid bash -c 'echo $$ > "$0"; exec java -Xms256m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -Djava.awt.headless=true -Dorg.slf4j.simpleLogger.showDateTime=true \
      -Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd_HH:mm:ss.SSS \
      -cp "$1/*" kafka.Kafka "$2"' "$PIDF" "$LIBS" "$PROPS" >> "$LOG" 2>&1 < /dev/null 9>&- &
  deadline=$((SECONDS + TIMEOUT))
  while :; do
    sleep 0.5
    p=$(pid)
    [ -z "$p" ] || live "$p" || { tail_log "$LOG"; die "kafka exited during startup (see log above)"; }
    # Listening is not enough: the broker must answer a metadata request.
    port_busy "$PORT" && port_busy "$SPORT" && topics --list >/dev/null 2>&1 && break
    [ $SECONDS -lt $deadline ] || { tail_log "$LOG"; die "kafka not serving metadata on $BOOT after ${TIMEOUT}s (raise OUTBOX_KAFKA_START_TIMEOUT)"; }
  done
  ensure_scram_user
  echo "kafka $(version) running on $BOOT (pid $(pid)), SASL_SSL on $SASL_BOOT, data $K/data, log $LOG"
}

stop() {
  alive || { echo "kafka already stopped"; return 0; }
  local p; p=$(pid)
  kill -CONT "$p"  # a paused broker cannot handle SIGTERM
  kill -TERM "$p"
  if ! wait_gone 60 "$p"; then note "kafka did not stop within 60s; sending SIGKILL"; kill9; return; fi
  rm -f "$PIDF"
  echo "kafka stopped"
}

kill9() {
  alive || { echo "kafka not running"; return 0; }
  local p; p=$(pid)
  kill -KILL "$p"
  # Reaped, not just dead: only then are its ports and the data dir lock released.
  wait_gone 30 "$p" || die "kafka pid $p not reaped 30s after SIGKILL (zombies are reaped by init)"
  rm -f "$PIDF"
  echo "kafka pid $p killed with SIGKILL"
}

signal() {  # signal SIG WORD
  alive || die "kafka is not running; run: scripts/kafka.sh start"
  kill -"$1" "$(pid)"; echo "kafka (pid $(pid)) $2"
}

need_running() { alive && ! paused || die "kafka is not running (or paused); run: scripts/kafka.sh start"; ensure_libs; }

case "${1:-}" in start|stop|kill9) lock "$K" ;; esac
case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status)
    if ! alive; then echo "kafka stopped"; exit 3; fi
    if paused; then echo "kafka paused (SIGSTOP) on $BOOT (pid $(pid))"; else echo "kafka running on $BOOT (pid $(pid))"; fi ;;
  kill9) kill9 ;;
  pause) signal STOP paused ;;
  resume) signal CONT resumed ;;
  create-topic)
    [ -n "${2:-}" ] || die "usage: $0 create-topic NAME [PARTITIONS] [--config k=v ...]"
    need_running
    name=$2; parts=3; shift 2
    if [ -n "${1:-}" ] && [[ $1 != -* ]]; then parts=$1; shift; fi
    topics --create --if-not-exists --topic "$name" --partitions "$parts" --replication-factor 1 "$@"
    echo "topic $name ready ($parts partitions)" ;;
  list-topics) need_running; topics --list ;;
  url) echo "$BOOT" ;;
  url-sasl) echo "$SASL_BOOT" ;;
  add-scram-user)  # add-scram-user NAME [PLAINTEXT_BOOTSTRAP]; the password on stdin
    [ -n "${2:-}" ] || die "usage: $0 add-scram-user NAME [BOOTSTRAP] (the password is read from stdin)"
    if [ -n "${3:-}" ]; then BOOT=$3; ensure_libs; else need_running; fi
    IFS= read -r password || [ -n "$password" ] || die "add-scram-user: no password on stdin"
    scram_user "$2" "$password"
    echo "SCRAM-SHA-512 user $2 ready (added through $BOOT)" ;;
  *) echo "usage: $0 {start|stop|status|kill9|pause|resume|create-topic NAME [PARTITIONS] [--config k=v ...]|list-topics|url|url-sasl|add-scram-user NAME [BOOTSTRAP]}" >&2; exit 2 ;;
esac
