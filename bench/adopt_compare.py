#!/usr/bin/env python3
"""`outbox-relay adopt` side by side with a real Debezium Server, byte for byte.

Run through bench/adopt-compare.sh (`make adopt-compare`), which starts this script's own
PostgreSQL and Kafka and sets OUTBOX_PG_PORT / OUTBOX_KAFKA_PORT.

Three Debezium-style outbox tables (payload jsonb, json and text; a nullable `version integer`
column placed as a header; DEFAULTs on some header columns, `type` nullable in one) are captured by Debezium Server
(EventRouter, pgoutput, Kafka sink) and adopted by the relay at the same time, so every committed
row becomes one message on each side: topic `dbz.<aggregatetype>` from Debezium, `relay.<aggregatetype>`
from the relay. The rows cover ASCII, BMP and non-BMP text (emoji) in keys, values and headers,
JSON escapes, raw control characters, NULL, empty and blank payloads, a NULL header column and
integer headers. Each pass runs Debezium with one configuration and the relay with the adopt flags
that claim to reproduce it (see PASSES). For every event, matched by its id, the script compares
the topic (after the prefix), the partition, the key bytes, the value bytes (or tombstone) and the
headers Debezium writes (names and value bytes, in order; the relay's own `outbox-*` headers are
left out), prints one line per message (both sides in full where they differ), and exits 1 on
any difference. Event ids are fixed, so runs are comparable; Debezium's messages are kept in
.local/adopt-compare-logs/debezium-messages.json (tests/adopt.rs pins some of them).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_PORT = int(os.environ.get("OUTBOX_PG_PORT", "25442"))
BROKERS = f"127.0.0.1:{os.environ.get('OUTBOX_KAFKA_PORT', '25492')}"
DBZ_HTTP_PORT = int(os.environ.get("ADOPT_COMPARE_DEBEZIUM_HTTP_PORT", "25480"))
METRICS_PORT = int(os.environ.get("ADOPT_COMPARE_RELAY_METRICS_PORT", "25464"))
DB, SLOT, PUBLICATION = "adopt_compare", "adopt_cmp", "adopt_cmp_pub"
PARTITIONS = 6
LOGDIR = os.path.join(ROOT, ".local", "adopt-compare-logs")

# table -> payload column type, and column definitions that differ: nullability and defaults
# (Debezium writes both into a header's schema).
TABLES = {
    "dbz_jsonb": ("jsonb", {"id": "uuid PRIMARY KEY DEFAULT gen_random_uuid()"}),
    "dbz_json": ("json", {"version": "integer DEFAULT 0", "payload": """json DEFAULT '{"empty": true}'"""}),
    "dbz_text": ("text", {"type": "varchar(255) DEFAULT '🎉 new'"}),
}

JSON_KV = {"debezium.format.key": "json", "debezium.format.value": "json",
           "debezium.format.key.schemas.enable": "false", "debezium.format.value.schemas.enable": "false"}
# (name, Debezium properties on top of the base, adopt flags that claim to reproduce them)
PASSES = [
    ("json", dict(JSON_KV), []),
    ("schemaless", dict(JSON_KV, **{"debezium.format.header.schemas.enable": "false",
                                    "debezium.transforms.outbox.route.tombstone.on.empty.payload": "true"}),
     ["--header-schemas-enable", "false", "--route-tombstone-on-empty-payload", "true"]),
    ("string", {"debezium.format.key": "simplestring", "debezium.format.value": "simplestring"},
     ["--key-format", "raw", "--payload-format", "raw"]),
]

ESCAPES = r'{"q": "a \"quoted\" \\ back\nslash\ttab \u001f \ud83d\ude00 \u00e9"}'
# (label, aggregate, key, type, payload text or None for NULL, version)
COMMON = [
    ("ascii", "Order", "order-1", "OrderCreated",
     '{"id": 1, "customerId": 123, "orderDate": "2019-01-31T12:13:01"}', 1),
    ("BMP non-ASCII", "Customer", "zoë-✓", "KundeÄnderung", '{"name": "Zoë Ämter", "mark": "✓ — €"}', None),
    ("non-BMP value", "Order", "order-1", "OrderPaid", '{"note": "party 🎉 time 😀", "flag": "🇩🇪"}', 2),
    ("non-BMP header", "Order", "order-2", "Order😀Shipped", '{"id": 2}', None),
    ("non-BMP key+header+value", "Customer", "🎉", "🎉", '"🎉"', 3),
    ("JSON escapes", "Order", "order-2", "OrderNoted", ESCAPES, None),
    ("NULL payload", "Order", "order-1", "OrderDeleted", None, 4),
    ("JSON null", "Order", "order-3", "OrderNull", "null", None),
    ("JSON empty string", "Customer", "c-1", "CustomerBlank", '""', None),
    ("JSON number", "Customer", "c-1", "CustomerCount", "42", -7),
] + [(f"non-BMP key {e}", "Customer", f"cust-{e}", "CustomerCreated", f'{{"id": "{e}"}}', None)
     for e in ["🎉", "😀", "🚀", "🦀"]]
TEXT_ONLY = [
    ("empty text", "Order", "order-4", "OrderEmpty", "", None),
    ("blank text", "Order", "order-4", "OrderBlank", " \t\n ", None),
    ("control chars", "Order", "order-5", "OrderControl", "bell\x07 unit\x1f del\x7f ls\u2028 end", None),
    ("plain text", "Order", "order-5", "OrderText", "hello 🎉 world", None),
    ("NULL type (DEFAULT)", "Order", "order-5", None, '{"id": 5}', None),
]


def log(msg):
    print(msg, flush=True)


def show(b, limit=90):
    """Bytes as text: UTF-8 as is, control characters as <xx>, None as a tombstone."""
    if b is None:
        return "(tombstone)"
    s = "".join(f"<{ord(c):02x}>" if ord(c) < 0x20 or ord(c) == 0x7F else c
                for c in b.decode("utf-8", "backslashreplace"))
    return s if len(s) <= limit else s[:limit] + f"... ({len(b)} B)"


class Pg:
    def __init__(self):
        admin = psycopg.connect(f"postgresql://postgres@127.0.0.1:{PG_PORT}/postgres", autocommit=True)
        admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (SLOT,))
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DB}")
        admin.close()
        self.url = f"postgresql://postgres@127.0.0.1:{PG_PORT}/{DB}"
        self.c = psycopg.connect(self.url, autocommit=True)
        for table, (ptype, custom) in TABLES.items():
            cols = dict(id="uuid PRIMARY KEY", aggregatetype="varchar(255) NOT NULL",
                        aggregateid="varchar(255) NOT NULL", type="varchar(255) NOT NULL", payload=ptype,
                        version="integer") | custom
            self.c.execute(f"CREATE TABLE {table} ({', '.join(f'{k} {v}' for k, v in cols.items())})")
        self.c.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {', '.join(TABLES)} WITH (publish = 'insert')")

    def insert(self, table, rows):
        """One transaction per table: [(id, aggregatetype, key, type, payload, version)]."""
        ptype = TABLES[table][0]
        with self.c.transaction():
            for r in rows:
                self.c.execute(f"INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload, version) "
                               f"VALUES (%s, %s, %s, %s, %s::{ptype}, %s)", r)

    def drop_slot(self):
        for _ in range(60):
            active = self.c.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)).fetchone()
            if active is None:
                return
            if not active[0]:
                self.c.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
                return
            time.sleep(1)
        raise RuntimeError(f"replication slot {SLOT} still active")


class Kafka:
    def __init__(self):
        self.admin = AdminClient({"bootstrap.servers": BROKERS})

    def create(self, topics):
        fs = self.admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in topics], operation_timeout=30)
        for f in fs.values():
            f.result(60)
        # Created is not yet served: wait until every partition has a leader that answers.
        deadline = time.time() + 60
        while True:
            try:
                self.high(topics)
                return
            except KafkaException:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def high(self, topics):
        c = Consumer({"bootstrap.servers": BROKERS, "group.id": "adopt-compare-hw"})
        try:
            return sum(c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                       for t in topics for p in range(PARTITIONS))
        finally:
            c.close()

    def read(self, topics):
        """Every record of the topics: [(topic, partition, key, value, headers)]."""
        want = self.high(topics)
        c = Consumer({"bootstrap.servers": BROKERS, "group.id": f"adopt-compare-{uuid.uuid4()}",
                      "enable.auto.commit": False})
        c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in range(PARTITIONS)])
        out, deadline = [], time.time() + 60
        while len(out) < want and time.time() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            out.append((m.topic(), m.partition(), m.key(), m.value(), m.headers() or []))
        c.close()
        return out


class Process:
    def __init__(self, name, argv, **kw):
        os.makedirs(LOGDIR, exist_ok=True)
        self.name, self.logfile = name, os.path.join(LOGDIR, f"{name}.log")
        self.p = subprocess.Popen(argv, stdout=open(self.logfile, "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True, **kw)

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        if self.alive():
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)


def debezium_config(args, extra):
    p = {
        "debezium.sink.type": "kafka",
        "debezium.sink.kafka.producer.bootstrap.servers": BROKERS,
        "debezium.sink.kafka.producer.key.serializer": "org.apache.kafka.common.serialization.StringSerializer",
        "debezium.sink.kafka.producer.value.serializer": "org.apache.kafka.common.serialization.StringSerializer",
        "debezium.source.connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "debezium.source.offset.storage.file.filename": os.path.join(LOGDIR, "debezium-offsets.dat"),
        "debezium.source.database.hostname": "127.0.0.1",
        "debezium.source.database.port": str(PG_PORT),
        "debezium.source.database.user": "postgres",
        "debezium.source.database.password": "unused",
        "debezium.source.database.dbname": DB,
        "debezium.source.topic.prefix": "cmp",
        "debezium.source.plugin.name": "pgoutput",
        "debezium.source.slot.name": SLOT,
        "debezium.source.publication.name": PUBLICATION,
        "debezium.source.publication.autocreate.mode": "disabled",
        "debezium.source.table.include.list": ",".join(f"public.{t}" for t in TABLES),
        "debezium.source.snapshot.mode": "no_data",
        "debezium.source.poll.interval.ms": "100",
        "debezium.transforms": "outbox",
        "debezium.transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
        # `$$` is a literal `$` in this file.
        "debezium.transforms.outbox.route.topic.replacement": "dbz.$${routedByValue}",
        "debezium.transforms.outbox.table.fields.additional.placement": "type:header:type,version:header:version",
        "quarkus.http.port": str(DBZ_HTTP_PORT),
        "quarkus.http.host": "127.0.0.1",
        "quarkus.log.console.json": "false",
    }
    p.update(extra)
    return "".join(f"{k}={v}\n" for k, v in p.items())


def start_debezium(args, pg, kafka, name, extra, canary_agg):
    pg.drop_slot()
    try:
        os.remove(os.path.join(LOGDIR, "debezium-offsets.dat"))
    except FileNotFoundError:
        pass
    with open(os.path.join(args.debezium_home, "config", "application.properties"), "w") as f:
        f.write(debezium_config(args, extra))
    env = dict(os.environ, JAVA_HOME=args.java_home)
    env.pop("JAVA_OPTS", None)
    dbz = Process(f"debezium-{name}", ["./run.sh"], cwd=args.debezium_home, env=env)
    # Streaming has begun once a canary row inserted after the start reaches Kafka (a row
    # committed before the slot existed is never streamed: insert again every 10 s).
    deadline, next_insert, t0 = time.time() + 300, 0.0, time.time()
    while True:
        if not dbz.alive():
            raise RuntimeError(f"Debezium exited with {dbz.p.returncode}; see {dbz.logfile}")
        if time.time() > deadline:
            dbz.stop()
            raise RuntimeError(f"Debezium did not stream a canary within 300 s; see {dbz.logfile}")
        if time.time() >= next_insert:
            pg.insert("dbz_jsonb", [(str(uuid.uuid4()), canary_agg, "canary", "canary", "{}", None)])
            next_insert = time.time() + 10
        if kafka.high([f"dbz.{canary_agg}"]) >= 1:
            log(f"   Debezium Server streaming after {time.time() - t0:.0f} s (log: {os.path.relpath(dbz.logfile, ROOT)})")
            return dbz
        time.sleep(0.5)


def header_id(headers):
    for k, v in headers:
        if k == "id" and v is not None:
            s = v.decode("utf-8", "replace")
            try:
                j = json.loads(s)
            except ValueError:
                return s
            return j.get("payload") if isinstance(j, dict) else j
    return None


def dump(path, events, records):
    """Debezium's messages, by event, for the record (UTF-8 text; tests/adopt.rs pins some)."""
    by_id = {header_id(r[4]): r for r in records}
    text = lambda b: None if b is None else b.decode("utf-8", "backslashreplace")  # noqa: E731
    out = []
    for pass_name, table, label, eid in events:
        r = by_id.get(eid)
        if r:
            out.append({"pass": pass_name, "table": table, "label": label, "id": eid, "partition": r[1],
                        "key": text(r[2]), "value": text(r[3]), "headers": [[k, text(v)] for k, v in r[4]]})
    with open(path, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)


def compare(events, dbz_records, relay_records):
    """One line per event; returns the number of differences."""
    def index(records, prefix):
        by_id, dup = {}, []
        for topic, part, key, value, headers in records:
            rid = header_id(headers)
            rec = (topic[len(prefix):], part, key, value, [(k, v) for k, v in headers if not k.startswith("outbox-")])
            if rid in by_id:
                dup.append(rid)
            else:
                by_id[rid] = rec
        return by_id, dup

    dbz, dbz_dup = index(dbz_records, "dbz.")
    relay, relay_dup = index(relay_records, "relay.")
    diffs = 0
    for pass_name, table, label, eid in events:
        d, r = dbz.pop(eid, None), relay.pop(eid, None)
        head = f"{pass_name:<10} {table:<9} {label:<26}"
        if d is None or r is None:
            diffs += 1
            log(f"[DIFF] {head} missing from {'Debezium' if d is None else 'the relay'}")
            continue
        problems = []
        for what, a, b in (("topic", d[0], r[0]), ("partition", d[1], r[1]), ("key", d[2], r[2]),
                           ("value", d[3], r[3])):
            if a != b:
                problems.append(f"       {what:<9} Debezium {show(a) if isinstance(a, (bytes, type(None))) else a}\n"
                                f"       {'':<9} relay    {show(b) if isinstance(b, (bytes, type(None))) else b}")
        if d[4] != r[4]:
            fmt = lambda hs: "  ".join(f"{k}={show(v, 400)}" for k, v in hs)  # noqa: E731
            problems.append(f"       headers   Debezium {fmt(d[4])}\n       {'':<9} relay    {fmt(r[4])}")
        status = "same" if not problems else "DIFF"
        diffs += bool(problems)
        value = "tombstone" if d[3] is None else f"value {len(d[3])} B"
        log(f"[{status}] {head} p{d[1]}/p{r[1]}  key {show(d[2], 28):<28}  {value:<13} "
            f"headers {' '.join(f'{k}:{len(v) if v is not None else None}B' for k, v in d[4])}")
        for p in problems:
            log(p)
    for side, left, dup in (("Debezium", dbz, dbz_dup), ("relay", relay, relay_dup)):
        for rid in left:
            diffs += 1
            log(f"[DIFF] a message from {side} for no inserted event (id {rid})")
        for rid in dup:
            diffs += 1
            log(f"[DIFF] {side} published event {rid} more than once")
    return diffs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--relay-bin", required=True)
    ap.add_argument("--debezium-home", required=True)
    ap.add_argument("--java-home", required=True)
    ap.add_argument("--passes", default=",".join(p[0] for p in PASSES),
                    help="comma-separated subset of: " + ", ".join(p[0] for p in PASSES))
    args = ap.parse_args()
    args.debezium_home = os.path.abspath(args.debezium_home)
    passes = [p for p in PASSES if p[0] in args.passes.split(",")]
    run = time.strftime("%H%M%S")

    pg, kafka = Pg(), Kafka()
    env = dict(os.environ, OUTBOX_RELAY_DATABASE_URL=pg.url, RUST_LOG="warn")
    subprocess.run([args.relay_bin, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)

    plan = []  # (pass, aggregatetype prefix, table, label, row)
    for name, _, _ in passes:
        for table in TABLES:
            for row in COMMON + (TEXT_ONLY if table == "dbz_text" else []):
                plan.append((name, table, row))
    aggs = sorted({f"cmp{run}-{name}-{row[1]}" for name, _, row in plan} |
                  {f"cmp{run}-{name}-canary" for name, _, _ in passes})
    kafka.create([f"{side}.{a}" for a in aggs for side in ("dbz", "relay")])

    relay = Process("relay", [args.relay_bin, "run", "--kafka-brokers", BROKERS,
                              "--metrics-addr", f"127.0.0.1:{METRICS_PORT}"], env=env)
    events, dbz = [], None
    try:
        for name, extra, flags in passes:
            log(f"== pass {name}: Debezium {' '.join(f'{k}={v}' for k, v in extra.items())}")
            log(f"   relay: outbox-relay adopt {' '.join(flags) or '(defaults)'}")
            for table in TABLES:
                subprocess.run([args.relay_bin, "adopt", "--source-table", table,
                                "--topic-template", "relay.${aggregatetype}", "--header-columns", "type,version",
                                *flags], env=env, check=True, stdout=subprocess.DEVNULL)
            dbz = start_debezium(args, pg, kafka, name, extra, f"cmp{run}-{name}-canary")
            for table in TABLES:
                rows = []
                for pname, ptable, (label, agg, key, kind, payload, version) in plan:
                    if (pname, ptable) == (name, table):
                        # The same ids on every run: tests/adopt.rs pins some of these messages.
                        eid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"outbox-relay-adopt-compare/{name}/{table}/{label}"))
                        rows.append((eid, f"cmp{run}-{name}-{agg}", key, kind, payload, version))
                        events.append((name, table, label, eid))
                pg.insert(table, rows)
            topics = [a for a in aggs if f"-{name}-" in a and not a.endswith("-canary")]
            n = sum(1 for e in events if e[0] == name)
            deadline = time.time() + 180
            while time.time() < deadline:
                got = (kafka.high([f"dbz.{a}" for a in topics]), kafka.high([f"relay.{a}" for a in topics]))
                if got == (n, n) or not dbz.alive():
                    break
                time.sleep(1)
            log(f"   {n} events inserted; Kafka holds {got[0]} from Debezium, {got[1]} from the relay")
            dbz.stop()
            dbz = None
    finally:
        if dbz:
            dbz.stop()
        relay.stop()

    log("")
    topics = [a for a in aggs if not a.endswith("-canary")]
    dbz_records = kafka.read([f"dbz.{a}" for a in topics])
    dump(os.path.join(LOGDIR, "debezium-messages.json"), events, dbz_records)
    diffs = compare(events, dbz_records, kafka.read([f"relay.{a}" for a in topics]))
    log("")
    log(f"{len(events)} messages compared ({', '.join(f'{p[0]}: {sum(1 for e in events if e[0] == p[0])}' for p in passes)}), "
        f"{diffs} difference{'s' if diffs != 1 else ''}")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
