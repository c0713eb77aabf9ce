#!/usr/bin/env python3
"""outbox-relay benchmark harness: the relay side by side with baselines and Debezium Server.

Run through bench/run.sh (`make bench`, `make bench-smoke`), which starts this harness's own
PostgreSQL and Kafka instances with scripts/pg.sh and scripts/kafka.sh and sets the env below.

Arms (each a way of getting outbox rows from PostgreSQL into Kafka, or a ceiling):
  db-only       the load generator alone on the relay's table (insert-only ceiling, app baseline)
  db-only-dbz   the load generator alone on the Debezium-style table (its app baseline)
  kafka-only    examples/kafka_ceiling.rs alone: a Rust librdkafka producer with the relay's own
                producer properties and headers (Kafka's producer-only ceiling; and its latency floor)
  kafka-only-bare  the same without the relay's three headers (what they cost the producer)
  kafka-only-py the same load from Python confluent-kafka (a client-bound figure, for comparison)
  db-limit-claim / db-limit-delete   examples/db_limit.rs: PostgreSQL alone serving a read
                mode's own read and progress write of a backlog, no Kafka (the database's limit
                for that mode)
  db-limit-log  pg_recvlogical (PostgreSQL's own C client) streaming the relay-log drain's
                backlog from a copy of its slot to /dev/null: the walsender's limit, no Kafka
  relay         target/release/outbox-relay with its defaults (`migrate`, then `run`)
  relay-delete / relay-log   the same with --on-publish delete, --read-mode log (a logical
                replication slot, LOG_SLOT, through pgoutput)
  relay-eos     the same with --delivery exactly-once (a Kafka transaction per batch with the
                relay's position; the checker reads read_committed)
  relay-log-eos --read-mode log with --delivery exactly-once
  naive         bench/naive_relay.py: one row at a time, synchronous send, UPDATE per row
  debezium-defaults / debezium-tuned   Debezium Server, outbox EventRouter, Kafka sink, pgoutput

Cells: `step` (open-loop load at a fixed offered rate; the ladder of steps gives the sustained
throughput and the latency at 1k and 5k events/s), `drain` (a pre-loaded backlog), `soak`
(a long fixed-rate run sampling dead tuples and table size). A drain's backlog has no planner
statistics (none left from earlier cells, autovacuum's analyze held off for the cell): what an
outage leaves behind; `drain-analyzed` is the same drain after `ANALYZE`, side by side. Every
cell writes to its own topic
(6 partitions, message.timestamp.type=LogAppendTime) and is checked for loss, duplicates and
per-key order by the same checker.
"""
import argparse
import atexit
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass

import numpy as np
import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_PORT = int(os.environ.get("OUTBOX_PG_PORT", "56432"))
PG_DIR = os.path.realpath(os.path.join(ROOT, os.environ.get("OUTBOX_PG_DIR", ".local/bench-pg")))
KAFKA_PORT = int(os.environ.get("OUTBOX_KAFKA_PORT", "39092"))
KAFKA_DIR = os.path.realpath(os.path.join(ROOT, os.environ.get("OUTBOX_KAFKA_DIR", ".local/bench-kafka")))
BROKERS = f"127.0.0.1:{KAFKA_PORT}"
# Below Linux's ephemeral range (32768-60999): a port the arms bind again and again must not be
# taken meanwhile by some client's outgoing connection (a CI run's smoke once failed so).
METRICS_PORT = int(os.environ.get("BENCH_RELAY_METRICS_PORT", "29464"))
DBZ_HTTP_PORT = int(os.environ.get("BENCH_DEBEZIUM_HTTP_PORT", "29080"))
PGBIN = sorted(d for d in (os.path.join("/usr/lib/postgresql", v, "bin") for v in
                           (os.listdir("/usr/lib/postgresql") if os.path.isdir("/usr/lib/postgresql") else []))
               if os.path.exists(os.path.join(d, "pgbench")))
PGBENCH = os.path.join(PGBIN[-1], "pgbench") if PGBIN else shutil.which("pgbench")
DB = "bench"
PARTITIONS = 6
KEYS = 1000
CLK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
RX = re.compile(rb"k=(\d+) s=(\d+)")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def url(role="postgres", db=DB):
    # Default sslmode (prefer): every client, like the relay's own default, talks TLS to this server.
    return f"postgresql://{role}@127.0.0.1:{PG_PORT}/{db}"


# ---------------------------------------------------------------------------------------------
# Modes and workloads

@dataclass
class Workload:
    name: str
    rows_per_tx: int
    payload: int


WORKLOADS = {w.name: w for w in (Workload("1x200B", 1, 200), Workload("10x200B", 10, 200),
                                  Workload("1x1KB", 1, 1024), Workload("10x1KB", 10, 1024))}
MAIN = "1x200B"


@dataclass
class Mode:
    name: str
    step_seconds: float
    ladder: list
    naive_ladder: list
    drain_rows: int
    naive_drain_seconds: float
    soak_seconds: float
    soak_rate: int
    workloads: list
    clients: int
    drain_wait: float
    sample_every: float


def mode_config(name):
    env = os.environ.get
    if name == "smoke":
        m = Mode("smoke", 3, [200, 500], [100], 3000, 4, 4, 200, ["1x200B", "10x1KB"], 10, 15, 0.5)
    else:
        # 10 s steps: the backlog criterion (<= 2 s of load at the end, no growth over the second
        # half, sampled every second) still has 5 samples to judge; the ladder is a coarse doubling
        # search then two bisections (see Harness.ladder), so about 6 steps find a ceiling.
        m = Mode("full", 10, [1000, 5000, 10000, 20000, 40000, 80000, 160000],
                 [100, 200, 400, 800, 1600], 1_000_000, 30, 600, 5000, list(WORKLOADS), 40, 60, 1.0)
    m.bisections = int(env("BENCH_BISECTIONS", 2 if name == "full" else 1))
    m.step_seconds = float(env("BENCH_STEP_SECONDS", m.step_seconds))
    m.soak_seconds = float(env("BENCH_SOAK_SECONDS", m.soak_seconds))
    m.soak_rate = int(env("BENCH_SOAK_RATE", m.soak_rate))
    m.drain_rows = int(env("BENCH_DRAIN_ROWS", m.drain_rows))
    if env("BENCH_LADDER"):
        m.ladder = [int(x) for x in env("BENCH_LADDER").split(",")]
    if env("BENCH_WORKLOADS"):
        m.workloads = env("BENCH_WORKLOADS").split(",")
    return m


# ---------------------------------------------------------------------------------------------
# /proc readings

def proc_cpu(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK
    except (OSError, IndexError, ValueError):
        return None


def proc_minflt(pid):
    """Minor page faults of the process so far (memory the kernel had to map in again)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return None


def proc_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0]) / 1024  # MiB
    except OSError:
        pass
    return out


def reset_peak_rss(pid):
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


PIDFILE = os.path.join(ROOT, ".local", "bench-logs", "arms.pids")


def proc_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def stop_strays():
    """Arms an interrupted earlier run left behind (listed in PIDFILE with their command line,
    so a recycled pid is never hit): each would hold the relay's lease or Debezium's slot."""
    try:
        lines = open(PIDFILE).read().splitlines()
    except OSError:
        return
    for line in lines:
        pid, _, cmd = line.partition(" ")
        if pid.isdigit() and cmd and proc_cmdline(int(pid)) == cmd:
            log(f"!! stopping pid {pid} left running by an interrupted run: {cmd[:100]}")
            try:
                os.killpg(int(pid), signal.SIGTERM)
            except OSError:
                pass
            for _ in range(100):
                if proc_cmdline(int(pid)) != cmd:
                    break
                time.sleep(0.1)
    os.remove(PIDFILE)


def stop_live(*_):
    for p in list(LIVE):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
    LIVE.clear()


def postmaster_pid():
    with open(os.path.join(PG_DIR, "data", "postmaster.pid")) as f:
        return int(f.readline())


def kafka_pid():
    with open(os.path.join(KAFKA_DIR, "kafka.pid")) as f:
        return int(f.read().strip())


def machine_busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


class CpuMeter:
    """CPU-seconds of groups of processes over a window (processes that appear later count from 0)."""

    def __init__(self, groups):
        self.groups = groups  # name -> callable returning pids
        self.first, self.last = {}, {}
        for name, fn in groups.items():
            for pid in fn():
                t = proc_cpu(pid)
                if t is not None:
                    self.first[(name, pid)] = self.last[(name, pid)] = t
        self.busy0 = machine_busy()
        self.load0 = os.getloadavg()

    def sample(self):
        for name, fn in self.groups.items():
            for pid in fn():
                t = proc_cpu(pid)
                if t is not None:
                    self.first.setdefault((name, pid), 0.0)
                    self.last[(name, pid)] = t

    def totals(self):
        self.sample()
        out = {name: 0.0 for name in self.groups}
        for (name, pid), t in self.last.items():
            out[name] += t - self.first[(name, pid)]
        b1 = machine_busy()
        out["machine_busy_frac"] = (b1[0] - self.busy0[0]) / max(1, b1[1] - self.busy0[1])
        out["loadavg_1m_end"] = os.getloadavg()[0]
        return out


# ---------------------------------------------------------------------------------------------
# Kafka

class Kafka:
    def __init__(self):
        self.admin = AdminClient({"bootstrap.servers": BROKERS})
        self.wm = Consumer({"bootstrap.servers": BROKERS, "group.id": "bench-watermarks",
                            "enable.auto.commit": False})
        self.lock = threading.Lock()

    def create_topic(self, name):
        fs = self.admin.create_topics([NewTopic(name, PARTITIONS, 1, config={
            "message.timestamp.type": "LogAppendTime"})], operation_timeout=30)
        fs[name].result()
        deadline = time.time() + 30
        while time.time() < deadline:
            md = self.admin.list_topics(name, timeout=10).topics.get(name)
            if md and not md.error and len(md.partitions) == PARTITIONS and all(
                    p.leader >= 0 for p in md.partitions.values()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"topic {name} not ready")

    def delete_topic(self, name):
        try:
            self.admin.delete_topics([name], operation_timeout=30)[name].result()
        except Exception as e:  # noqa: BLE001 - best effort: only frees disk
            log(f"  (could not delete topic {name}: {e})")

    def high(self, name):
        return sum(self.highs(name))

    def highs(self, name):
        """High watermarks of the topic's partitions (retried: a new topic's leaders settle)."""
        for attempt in range(50):
            try:
                with self.lock:
                    return [self.wm.get_watermark_offsets(TopicPartition(name, p), timeout=10, cached=False)[1]
                            for p in range(PARTITIONS)]
            except Exception:  # noqa: BLE001 - e.g. NOT_LEADER_FOR_PARTITION right after creation
                if attempt == 49:
                    raise
                time.sleep(0.2)


def check_topic(kafka, topic, expected, timeout=600):
    """Consume the whole topic; expected maps (k << 40 | s) -> start time (commit or send, epoch s).
    Returns loss / duplicates / per-key order of first occurrences, latencies and broker times."""
    highs = kafka.highs(topic)
    c = Consumer({"bootstrap.servers": BROKERS, "group.id": f"bench-check-{uuid.uuid4()}",
                  "isolation.level": "read_committed", "enable.auto.commit": False, "fetch.max.bytes": 64 << 20,
                  "max.partition.fetch.bytes": 16 << 20, "queued.max.messages.kbytes": 256 << 10})
    parts = [p for p in range(PARTITIONS) if highs[p] > 0]
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    remaining = set(parts)
    seen, last_seq = set(), {}
    dups = order = unparsed = unexpected = 0
    lat, append_ms, partition_of = [], [], {}
    key_partition_violations = 0
    deadline = time.time() + timeout
    while remaining and time.time() < deadline:
        for m in c.consume(20000, 1.0):
            if m.error():
                continue
            p = m.partition()
            if m.offset() + 1 >= highs[p]:
                remaining.discard(p)
            mm = RX.search(m.value() or b"", 0, 80)
            if not mm:
                unparsed += 1
                continue
            k, s = int(mm.group(1)), int(mm.group(2))
            ident = k << 40 | s
            if ident in seen:
                dups += 1
                continue
            seen.add(ident)
            if partition_of.setdefault(k, p) != p:
                key_partition_violations += 1
            if s < last_seq.get(k, -1):
                order += 1
            else:
                last_seq[k] = s
            ts = m.timestamp()[1]
            start = expected.get(ident)
            if start is None:
                unexpected += 1
                continue
            append_ms.append(ts)
            lat.append(ts / 1000.0 - start)
        # A transactional topic (relay-eos) ends in a commit marker no consumer receives: the
        # consumer's position passes it.
        if remaining:
            for tp in c.position([TopicPartition(topic, p) for p in remaining]):
                if tp.offset >= highs[tp.partition]:
                    remaining.discard(tp.partition)
    c.close()
    delivered = len(seen) - unexpected
    return {"expected": len(expected), "delivered_unique": delivered, "missing": len(expected) - delivered,
            "duplicates": dups, "order_violations": order, "unparsed": unparsed, "unexpected": unexpected,
            "key_on_two_partitions": key_partition_violations, "complete": not remaining,
            "_lat": np.array(lat), "_append_ms": np.array(append_ms, dtype=np.int64)}


def lat_stats(lat_s):
    """Commit (or send) to LogAppendTime. The broker stamps milliseconds: +-1 ms resolution."""
    a = lat_s
    if not len(a):
        return {}
    ms = a * 1000.0
    return {"lat_p50_ms": float(np.percentile(ms, 50)), "lat_p99_ms": float(np.percentile(ms, 99)),
            "lat_p999_ms": float(np.percentile(ms, 99.9)), "lat_max_ms": float(ms.max()),
            "lat_samples": int(len(ms))}


# ---------------------------------------------------------------------------------------------
# PostgreSQL

RELAY_TABLE, DBZ_TABLE = "outbox", "dbz_outbox"
# Rows the relay has yet to publish (claim mode; log mode marks none).
UNPUBLISHED = "published_at IS NULL AND failed_at IS NULL"
AUDIT_TABLE = "bench_published"
RELAY_ROWS = (f"(SELECT topic, key, payload, bench_xid FROM {RELAY_TABLE} "
              f"UNION ALL SELECT topic, key, payload, bench_xid FROM {AUDIT_TABLE})")
PUBLICATION, SLOT = "bench_dbz_pub", "bench_dbz"
# The relay-log arm's slot and publication on the relay's table (explicit names, given to both
# `migrate --read-mode log` and `run --read-mode log`).
LOG_SLOT = LOG_PUBLICATION = "bench_relay_log"


class Pg:
    def __init__(self):
        self.c = psycopg.connect(url("postgres", "postgres"), autocommit=True)
        for role in ("bench_app", "bench_relay", "bench_naive", "bench_dbz", "bench_dblimit"):
            self.c.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
                           f"CREATE ROLE {role} LOGIN SUPERUSER REPLICATION PASSWORD 'bench'; END IF; END $$")
        if not self.c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,)).fetchone():
            self.c.execute(f"CREATE DATABASE {DB}")
        self.c.close()
        self.c = psycopg.connect(url(), autocommit=True)
        self.x("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.x("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        self.lock = threading.Lock()

    def x(self, sql, args=None):
        with self.c.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else None

    def one(self, sql, args=None):
        r = self.x(sql, args)
        return r[0] if r else None

    def setup_relay_table(self, relay_bin):
        env = dict(os.environ, OUTBOX_RELAY_DATABASE_URL=url("bench_relay"))
        subprocess.run([relay_bin, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        # The relay's UPDATE replaces xmin; keep the inserting transaction's id to find its true
        # commit time (pg_xact_commit_timestamp) after the row was marked. Costs app and baseline alike.
        self.x(f"ALTER TABLE {RELAY_TABLE} ADD COLUMN IF NOT EXISTS bench_xid xid8 DEFAULT pg_current_xact_id()")
        # `run --on-publish delete` deletes delivered rows: the checker's ledger of committed rows
        # keeps a copy of what it deletes (a statement-level trigger on the relay's DELETE, so the
        # cost lands on the relay's mark, never on the application's inserts).
        self.x(f"CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (topic text, key text, payload bytea, bench_xid xid8)")
        self.x(f"""CREATE OR REPLACE FUNCTION bench_audit() RETURNS trigger LANGUAGE plpgsql AS $$
                   BEGIN
                       INSERT INTO {AUDIT_TABLE} SELECT topic, key, substring(payload from 1 for 40), bench_xid FROM old_rows;
                       RETURN NULL;
                   END $$""")
        self.x(f"DROP TRIGGER IF EXISTS bench_audit ON {RELAY_TABLE}")
        self.x(f"CREATE TRIGGER bench_audit AFTER DELETE ON {RELAY_TABLE} REFERENCING OLD TABLE AS old_rows "
               "FOR EACH STATEMENT EXECUTE FUNCTION bench_audit()")
        self.x(f"GRANT SELECT, INSERT ON {AUDIT_TABLE} TO PUBLIC")

    def setup_dbz_table(self):
        self.x(f"""CREATE TABLE IF NOT EXISTS {DBZ_TABLE} (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            aggregatetype varchar(255) NOT NULL,
            aggregateid varchar(255) NOT NULL,
            type varchar(255) NOT NULL,
            payload text)""")
        if not self.one("SELECT 1 FROM pg_publication WHERE pubname = %s", (PUBLICATION,)):
            # Inserts only: TRUNCATE between cells is not streamed.
            self.x(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {DBZ_TABLE} WITH (publish = 'insert')")

    def drop_slot(self, name=SLOT):
        for _ in range(30):
            r = self.one("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,))
            if r is None:
                return
            if r[0] is None:
                self.x("SELECT pg_drop_replication_slot(%s)", (name,))
                return
            time.sleep(1)
        raise RuntimeError(f"replication slot {name} still active")

    def slot_state(self, name):
        """A slot's state: whether a session streams it, the WAL it has not confirmed (bytes from
        its confirmed position to the server's), wal_status; None when there is no such slot."""
        r = self.one("SELECT active, (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, wal_status "
                     "FROM pg_replication_slots WHERE slot_name = %s", (name,))
        return dict(zip(("active", "unconfirmed_wal_bytes", "wal_status"), r)) if r else None

    def reset_table(self, table):
        self.x(f"TRUNCATE {table}")
        if table == RELAY_TABLE:
            self.x(f"TRUNCATE {AUDIT_TABLE}")
        self.x(f"SELECT pg_stat_reset_single_table_counters('{table}'::regclass)")
        left = self.one(f"SELECT count(*) FROM {table}")[0]
        if left:
            raise RuntimeError(f"{table} still holds {left} rows after TRUNCATE: is another load generator "
                               "writing to this benchmark database? (stop it, or use other BENCH ports)")

    def stray_sessions(self, arm):
        """Sessions of the arm's role while this harness runs no such arm: a relay (or naive
        relay, or Debezium) left running by an interrupted run. It would hold the lease, or the
        slot, and the canary would never arrive: end those sessions and say so."""
        if not arm.role or arm.running():
            return
        pids = [r[0] for r in self.x("SELECT pid FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()",
                                     (arm.role,))]
        if pids:
            log(f"  !! {len(pids)} stray session(s) of {arm.role} (a process left by an interrupted run?): terminating them")
            for pid in pids:
                self.x("SELECT pg_terminate_backend(%s)", (pid,))

    def table_stats(self, table):
        r = self.one("SELECT n_tup_ins, n_live_tup, n_dead_tup, pg_total_relation_size(relid), "
                     "pg_relation_size(relid), autovacuum_count FROM pg_stat_user_tables WHERE relname = %s",
                     (table,))
        return dict(zip(("n_tup_ins", "n_live_tup", "n_dead_tup", "total_bytes", "heap_bytes",
                         "autovacuum_count"), r))

    def forget_statistics(self, table):
        """Leave `table` with no planner statistics, as if nobody had ever analyzed it (TRUNCATE
        keeps the old ones), and hold autovacuum's analyze off until allow_analyze(): the cell
        then measures the unanalyzed case from start to end, not wherever autovacuum (naptime
        1 min, the relay's table analyzed after 2% changed) happens to come by. Vacuum still runs."""
        self.x(f"ALTER TABLE {table} SET (autovacuum_analyze_threshold = 2000000000)")
        self.x("DELETE FROM pg_statistic WHERE starelid = %s::regclass", (table,))

    def allow_analyze(self, table):
        self.x(f"ALTER TABLE {table} RESET (autovacuum_analyze_threshold)")

    def analyze_state(self, table):
        """ANALYZE runs so far (manual and autovacuum's), and the table's column statistics."""
        r = self.one("SELECT analyze_count + autoanalyze_count, (SELECT count(*) FROM pg_statistic "
                     "WHERE starelid = relid) FROM pg_stat_user_tables WHERE relname = %s", (table,))
        return {"analyzes": int(r[0]), "column_stats": int(r[1])}

    def wal_lsn(self):
        return int(self.one("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0])

    def statements(self):
        rows = self.x("""SELECT r.rolname, sum(s.calls)::bigint, sum(s.total_exec_time)::float8, sum(s.wal_bytes)::int8
                         FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
                         WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                         GROUP BY 1""")
        return {r[0]: {"calls": int(r[1]), "exec_ms": r[2], "wal_bytes": int(r[3] or 0)} for r in rows}

    def top_statements(self, role, n=6):
        rows = self.x("""SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 110), calls, mean_exec_time, rows
                         FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
                         WHERE r.rolname = %s AND s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                         ORDER BY total_exec_time DESC LIMIT %s""", (role, n))
        return [{"query": q, "calls": int(c), "mean_ms": m, "rows": int(rw)} for q, c, m, rw in rows]

    def expected(self, layout, topic):
        if layout == "relay":
            sql = (f"SELECT key::int, split_part(split_part(convert_from(substring(payload from 1 for 40), 'UTF8'), ' ', 2), '=', 2)::bigint, "
                   f"extract(epoch FROM pg_xact_commit_timestamp((bench_xid::text::bigint %% 4294967296)::text::xid))::float8 "
                   f"FROM {RELAY_ROWS} AS t WHERE topic = %s")
        else:
            sql = (f"SELECT aggregateid::int, split_part(split_part(left(payload, 40), ' ', 2), '=', 2)::bigint, "
                   f"extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 FROM {DBZ_TABLE} WHERE aggregatetype = %s")
        with psycopg.connect(url()) as c, c.cursor() as cur:
            cur.execute(sql, (topic,))
            return {k << 40 | s: t for k, s, t in cur}

    def count(self, layout, topic):
        if layout == "relay":
            return self.one(f"SELECT count(*) FROM {RELAY_ROWS} AS t WHERE topic = %s", (topic,))[0]
        return self.one(f"SELECT count(*) FROM {DBZ_TABLE} WHERE aggregatetype = %s", (topic,))[0]

    def preload(self, layout, topic, n, payload):
        """n rows in 1,000-row transactions; key g % 1000, sequence g (increasing per key, in id order)."""
        with psycopg.connect(url("bench_app"), autocommit=True) as c:
            for lo in range(1, n + 1, 1000):
                hi = min(n, lo + 999)
                if layout == "relay":
                    c.execute(f"INSERT INTO {RELAY_TABLE} (topic, key, payload) SELECT %s, (g %% 1000)::text, "
                              f"convert_to(rpad('k=' || (g %% 1000) || ' s=' || g || ' ', %s, 'x'), 'UTF8') "
                              f"FROM generate_series(%s::bigint, %s::bigint) g ORDER BY g", (topic, payload, lo, hi))
                else:
                    c.execute(f"INSERT INTO {DBZ_TABLE} (aggregatetype, aggregateid, type, payload) SELECT %s, "
                              f"(g %% 1000)::text, 'bench', rpad('k=' || (g %% 1000) || ' s=' || g || ' ', %s, 'x') "
                              f"FROM generate_series(%s::bigint, %s::bigint) g ORDER BY g", (topic, payload, lo, hi))


def pgbench_script(layout, wl, path):
    """One host-app transaction: rows_per_tx rows in one INSERT (autocommit). Keys over 1,000
    aggregates; each key belongs to one client (client_id + nclients * r), so a key's writers are
    serialized and its per-key sequence (a per-client counter) increases in commit order."""
    lines = []
    values = []
    for i in range(1, wl.rows_per_tx + 1):
        lines.append(f"\\set k{i} :client_id + :nclients * random(0, :per - 1)")
        lines.append(f"\\set s{i} :s + {i}")
        body = f"rpad('k=' || :k{i} || ' s=' || :s{i} || ' ', {wl.payload}, 'x')"
        if layout == "relay":
            values.append(f"(:topic, :k{i}, convert_to({body}, 'UTF8'))")
        else:
            values.append(f"(:topic, :k{i}, 'bench', {body})")
    lines.append(f"\\set s :s + {wl.rows_per_tx}")
    if layout == "relay":
        lines.append(f"INSERT INTO {RELAY_TABLE} (topic, key, payload) VALUES " + ", ".join(values) + ";")
    else:
        lines.append(f"INSERT INTO {DBZ_TABLE} (aggregatetype, aggregateid, type, payload) VALUES "
                     + ", ".join(values) + ";")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run_pgbench(layout, wl, topic, rate, seconds, clients, workdir):
    script = os.path.join(workdir, f"pgbench-{layout}-{wl.name}.sql")
    pgbench_script(layout, wl, script)
    tx_rate = max(1.0, rate / wl.rows_per_tx)
    per = -(-KEYS // clients)
    cmd = [PGBENCH, "-n", "-M", "prepared", "-c", str(clients), "-j", "2", "-R", f"{tx_rate:.1f}",
           "-T", str(max(1, int(round(seconds)))), "-D", f"topic={topic}", "-D", "s=0", "-D", f"per={per}",
           "-D", f"nclients={clients}", "-f", script, "-h", "127.0.0.1", "-p", str(PG_PORT), "-U", "bench_app", DB]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    elapsed = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"pgbench failed ({p.returncode}): {p.stderr[-2000:]}")
    out = p.stdout
    g = lambda rx: (m.group(1) if (m := re.search(rx, out)) else None)  # noqa: E731
    return {"pgbench_tx": int(g(r"actually processed: (\d+)") or 0),
            "pgbench_tps": float(g(r"tps = ([\d.]+)") or 0),
            "pgbench_lag_avg_ms": float(g(r"schedule lag: avg ([\d.]+)") or 0),
            "pgbench_lag_max_ms": float(g(r"schedule lag: avg [\d.]+ \(max ([\d.]+)") or 0),
            "pgbench_latency_avg_ms": float(g(r"latency average = ([\d.]+)") or 0),
            "pgbench_seconds": elapsed}


# ---------------------------------------------------------------------------------------------
# Arms

LIVE = set()  # every arm process this harness started and has not stopped (stopped on exit, too)


class Arm:
    layout = "relay"
    role = None
    label = ""
    process = None
    dirty = False  # a step left rows undelivered: they may reach the next cell (or name a deleted topic)
    transactional = False  # its topics hold transaction markers (relay-eos)

    def __init__(self, h):
        self.h = h

    def pid(self):
        return self.process.pid if self.process and self.process.poll() is None else None

    def running(self):
        return self.pid() is not None

    def start(self, canary=True):
        pass

    def spawn(self, *a, **kw):
        self.process = subprocess.Popen(*a, **kw, start_new_session=True)
        LIVE.add(self.process)
        with open(PIDFILE, "a") as f:
            f.write(f"{self.process.pid} {proc_cmdline(self.process.pid)}\n")

    def stop(self):
        p = self.process
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        LIVE.discard(p)
        self.process = None

    def canary(self, timeout):
        topic = f"bench.canary.{self.h.run_id}.{self.name}.{uuid.uuid4().hex[:6]}"
        self.h.kafka.create_topic(topic)
        deadline, next_insert = time.time() + timeout, 0.0
        while time.time() < deadline:
            if time.time() >= next_insert:  # again every 10 s: a row committed before the slot existed is never streamed
                if self.layout == "relay":
                    self.h.pg.x(f"INSERT INTO {RELAY_TABLE} (topic, key, payload) VALUES (%s, '0', 'canary')", (topic,))
                else:
                    self.h.pg.x(f"INSERT INTO {DBZ_TABLE} (aggregatetype, aggregateid, type, payload) "
                                f"VALUES (%s, '0', 'canary', 'canary')", (topic,))
                next_insert = time.time() + 10
            if self.h.kafka.high(topic) >= 1:
                return
            if self.process and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.logfile}")
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: canary not delivered within {timeout}s ({self.h.diagnose(self)}); see {self.logfile}")

    def extra_start(self):
        return {}

    def extra_end(self, start):
        return {}


class DbOnly(Arm):
    def __init__(self, h, layout):
        super().__init__(h)
        self.layout = layout
        self.name = "db-only" if layout == "relay" else "db-only-dbz"
        self.label = ("load generator alone, relay's table" if layout == "relay"
                      else "load generator alone, Debezium-style table")


def relay_settings():
    """The relay arms' settings: its defaults, or the OUTBOX_RELAY_* flags set in the
    environment (every relay flag is also an environment variable, and the arms inherit it)."""
    changed = sorted(f"{k}={v}" for k, v in os.environ.items()
                     if k.startswith("OUTBOX_RELAY_") and k != "OUTBOX_RELAY_DATABASE_URL")
    return ", ".join(changed) or "defaults"


class Relay(Arm):
    name = "relay"
    role = "bench_relay"
    extra_args = []

    def __init__(self, h):
        super().__init__(h)
        self.label = f"outbox-relay ({h.relay_profile} build, {relay_settings()})"
        self.logfile = os.path.join(h.logdir, "relay.log")

    def start(self, canary=True):
        if self.running():
            return
        env = dict(os.environ, OUTBOX_RELAY_DATABASE_URL=url("bench_relay"), RUST_LOG="info")
        self.spawn([self.h.relay_bin, "run", "--kafka-brokers", BROKERS, "--metrics-addr", f"127.0.0.1:{METRICS_PORT}",
                    *self.extra_args],
                   env=env, stdout=subprocess.DEVNULL, stderr=open(self.logfile, "a"))
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/healthz", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        if canary:
            self.canary(60)

    def scrape(self):
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            m = re.match(r'^(outbox_relay_\w+?)(\{[^}]*\})? (\S+)$', line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    def extra_start(self):
        return self.scrape()

    def extra_end(self, start):
        end = self.scrape()
        d = {k: end[k] - start.get(k, 0.0) for k in end}
        prof = {}
        for phase in ("fetch", "send", "publish", "wait", "mark"):
            cnt = d.get(f'outbox_relay_batch_phase_seconds_count{{phase="{phase}"}}', 0)
            tot = d.get(f'outbox_relay_batch_phase_seconds_sum{{phase="{phase}"}}', 0)
            buckets = _buckets(d, "outbox_relay_batch_phase_seconds", f'phase="{phase}"')
            prof[phase] = {"batches": cnt, "seconds": tot, "mean_ms": 1000 * tot / cnt if cnt else None,
                           "p50_le_ms": _bucket_q(buckets, cnt, 0.5), "p99_le_ms": _bucket_q(buckets, cnt, 0.99)}
        # Log mode: each transaction's delay from its commit to its arrival in the relay.
        cnt = d.get("outbox_relay_source_delay_seconds_count", 0)
        buckets = _buckets(d, "outbox_relay_source_delay_seconds")
        if cnt:
            prof["source_delay"] = {"transactions": cnt,
                                    "mean_ms": 1000 * d.get("outbox_relay_source_delay_seconds_sum", 0) / cnt,
                                    "p50_le_ms": _bucket_q(buckets, cnt, 0.5), "p99_le_ms": _bucket_q(buckets, cnt, 0.99)}
        rows_cnt = d.get("outbox_relay_batch_rows_count", 0)
        prof["batch_rows_mean"] = d.get("outbox_relay_batch_rows_sum", 0) / rows_cnt if rows_cnt else None
        prof["published"] = d.get("outbox_relay_published_total", 0)
        # Exactly-once: a batch is visible to read_committed consumers once its transaction
        # commits, after its LogAppendTime: this is the extra wait.
        cnt = d.get("outbox_relay_transaction_commit_seconds_count", 0)
        if cnt:
            buckets = _buckets(d, "outbox_relay_transaction_commit_seconds")
            prof["commit"] = {"transactions": cnt,
                              "mean_ms": 1000 * d.get("outbox_relay_transaction_commit_seconds_sum", 0) / cnt,
                              "p50_le_ms": _bucket_q(buckets, cnt, 0.5), "p99_le_ms": _bucket_q(buckets, cnt, 0.99)}
        return {"relay_profile": prof}


def _buckets(d, histogram, label=""):
    """A histogram's (upper bound, cumulative count) pairs from scraped series, by bound."""
    return sorted((float(re.search(r'le="([^"]+)"', k).group(1).replace("+Inf", "inf")), v)
                  for k, v in d.items() if k.startswith(histogram + "_bucket") and label in k)


def _bucket_q(buckets, count, q):
    if not count:
        return None
    for le, v in buckets:
        if v >= q * count:
            return le * 1000
    return None


class RelayDelete(Relay):
    """outbox-relay with `--on-publish delete` (delivered rows deleted instead of marked)."""
    name = "relay-delete"
    extra_args = ["--on-publish", "delete"]

    def __init__(self, h):
        super().__init__(h)
        self.label = f"outbox-relay ({h.relay_profile} build), --on-publish delete"


class RelayEos(Relay):
    """outbox-relay with `--delivery exactly-once` (claim mode: each batch and the relay's
    position in one Kafka transaction, one batch in flight)."""
    name = "relay-eos"
    extra_args = ["--delivery", "exactly-once"]
    transactional = True

    def __init__(self, h):
        super().__init__(h)
        self.label = f"outbox-relay ({h.relay_profile} build), --delivery exactly-once"


class RelayLog(Relay):
    """outbox-relay with `--read-mode log` (a logical replication slot through pgoutput: commit
    order, no per-row write). The table is migrated to log mode before (Harness.log_mode: the
    publication, publish = 'insert', and the slot LOG_SLOT) and back after (leave_log_mode)."""
    name = "relay-log"
    walsender = True  # its replication connection is a walsender backend, metered on its own
    extra_args = ["--read-mode", "log", "--slot", LOG_SLOT, "--publication", LOG_PUBLICATION]

    def __init__(self, h):
        super().__init__(h)
        self.label = f"outbox-relay ({h.relay_profile} build), --read-mode log"

    def fresh(self):
        """A fresh slot: unlike a truncated table, the slot still holds the events a cell left
        undelivered (their topics deleted), and the next cell would stream them first. The
        lease forgets log mode, so the next start records it again from an empty table (its
        hand-over publishes every row it finds unmarked, and log mode marks none)."""
        self.stop()
        self.h.pg.drop_slot(LOG_SLOT)
        self.h.pg.x(f"UPDATE {RELAY_TABLE}_lease SET read_mode = NULL, log_check_until = NULL WHERE id = 1")
        self.h.pg.reset_table(RELAY_TABLE)
        self.h.log_mode()
        self.dirty = False


class RelayLogEos(RelayLog):
    """--read-mode log with --delivery exactly-once (each batch and the relay's LSN position in
    one Kafka transaction). Its own transactional id: relay-eos's positions are claim mode's.
    Log mode marks no row, so its delivered count is the relay's published counter, which
    moves once a batch's transaction has committed (Harness.committed)."""
    name = "relay-log-eos"
    transactional = True
    extra_args = RelayLog.extra_args + ["--delivery", "exactly-once", "--transactional-id", "bench-relay-log-eos"]

    def __init__(self, h):
        super().__init__(h)
        self.label = f"outbox-relay ({h.relay_profile} build), --read-mode log --delivery exactly-once"

    def published(self):
        return self.scrape().get("outbox_relay_published_total", 0.0)


class RelayNoNotify(Relay):
    """Supplementary (only with BENCH_ARMS=...,relay-nonotify): the relay polling every 250 ms,
    with the NOTIFY trigger dropped (`migrate --notify-trigger false`, `run --listen false`)."""
    name = "relay-nonotify"

    def __init__(self, h):
        super().__init__(h)
        self.label = f"outbox-relay ({h.relay_profile} build), --listen false, no NOTIFY trigger"

    def start(self, canary=True):
        if self.running():
            return
        env = dict(os.environ, OUTBOX_RELAY_DATABASE_URL=url("bench_relay"), RUST_LOG="info")
        self.spawn([self.h.relay_bin, "run", "--kafka-brokers", BROKERS, "--metrics-addr", f"127.0.0.1:{METRICS_PORT}",
                    "--listen", "false"], env=env, stdout=subprocess.DEVNULL, stderr=open(self.logfile, "a"))
        time.sleep(1)
        if canary:
            self.canary(60)


class Naive(Arm):
    name = "naive"
    role = "bench_naive"
    label = "naive relay (Python: row at a time, sync send, UPDATE per row)"

    def __init__(self, h):
        super().__init__(h)
        self.logfile = os.path.join(h.logdir, "naive.log")

    def start(self, canary=True):
        if self.running():
            return
        self.spawn([sys.executable, os.path.join(ROOT, "bench", "naive_relay.py"), url("bench_naive"), BROKERS],
                   stdout=subprocess.DEVNULL, stderr=open(self.logfile, "a"))
        if canary:
            self.canary(60)


class Debezium(Arm):
    layout = "dbz"
    role = "bench_dbz"
    walsender = True

    def __init__(self, h, tuned):
        super().__init__(h)
        self.tuned = tuned
        self.name = "debezium-tuned" if tuned else "debezium-defaults"
        self.label = (f"Debezium Server {h.dbz_version}, " +
                      ("tuned: poll.interval.ms=10, max.batch.size=8192, max.queue.size=32768, producer lz4 + linger.ms=2"
                       if tuned else "defaults (poll.interval.ms=500, max.batch.size=2048, offset flush 60 s)"))
        self.logfile = os.path.join(h.logdir, f"{self.name}.log")
        self.data = os.path.join(h.dbz_dir, "bench-data")

    def fresh(self):
        """A fresh start: no offsets, no slot (the next start creates it, snapshot.mode=no_data)."""
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)
        self.h.pg.drop_slot()
        self.dirty = False

    def config(self):
        p = {
            "debezium.sink.type": "kafka",
            "debezium.sink.kafka.producer.bootstrap.servers": BROKERS,
            "debezium.sink.kafka.producer.key.serializer": "org.apache.kafka.common.serialization.StringSerializer",
            "debezium.sink.kafka.producer.value.serializer": "org.apache.kafka.common.serialization.StringSerializer",
            "debezium.sink.kafka.producer.acks": "all",
            "debezium.sink.kafka.producer.enable.idempotence": "true",
            "debezium.source.connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "debezium.source.offset.storage.file.filename": os.path.join(self.data, "offsets.dat"),
            "debezium.source.database.hostname": "127.0.0.1",
            "debezium.source.database.port": str(PG_PORT),
            "debezium.source.database.user": "bench_dbz",
            "debezium.source.database.password": "bench",
            "debezium.source.database.dbname": DB,
            "debezium.source.topic.prefix": "dbz",
            "debezium.source.plugin.name": "pgoutput",
            "debezium.source.slot.name": SLOT,
            "debezium.source.publication.name": PUBLICATION,
            "debezium.source.publication.autocreate.mode": "disabled",
            "debezium.source.table.include.list": f"public.{DBZ_TABLE}",
            "debezium.source.snapshot.mode": "no_data",
            "debezium.transforms": "outbox",
            "debezium.transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
            # The topic is the aggregatetype column itself (`$$` is a literal `$` in this file).
            "debezium.transforms.outbox.route.topic.replacement": "$${routedByValue}",
            "debezium.format.key": "json",
            "debezium.format.value": "json",
            "debezium.format.key.schemas.enable": "false",
            "debezium.format.value.schemas.enable": "false",
            "quarkus.http.port": str(DBZ_HTTP_PORT),
            "quarkus.http.host": "127.0.0.1",
            "quarkus.log.console.json": "false",
        }
        if self.tuned:
            p.update({"debezium.source.poll.interval.ms": "10", "debezium.source.max.batch.size": "8192",
                      "debezium.source.max.queue.size": "32768",
                      "debezium.sink.kafka.producer.compression.type": "lz4",
                      "debezium.sink.kafka.producer.linger.ms": "2"})
        return "".join(f"{k}={v}\n" for k, v in p.items())

    def start(self, canary=True):
        if self.running():
            return
        os.makedirs(self.data, exist_ok=True)
        with open(os.path.join(self.h.dbz_home, "config", "application.properties"), "w") as f:
            f.write(self.config())
        env = dict(os.environ, JAVA_HOME=self.h.dbz_java_home)
        env.pop("JAVA_OPTS", None)
        self.spawn(["./run.sh"], cwd=self.h.dbz_home, env=env, stdout=open(self.logfile, "a"), stderr=subprocess.STDOUT)
        if canary:
            self.canary(240)


class Example(Arm):
    """A program of examples/, built beside the relay's binary (`cargo build --examples`), run
    once to its end: kafka_ceiling (Kafka's producer-only ceiling) or db_limit (a read mode's
    database limit). Its CPU comes from the kernel's accounting at exit (wait4), exactly; its
    peak RSS from /proc (VmHWM) while it runs (wait4's maxrss counts the forked harness)."""

    def __init__(self, h, name, label, program, role=None):
        super().__init__(h)
        self.name, self.label, self.role = name, label, role
        self.program = os.path.join(os.path.dirname(h.relay_bin), "examples", program)
        self.logfile = os.path.join(h.logdir, f"{name}.log")

    def run(self, args, timeout, env=None):
        """Run to the end; returns its JSON line and what the kernel accounted for it (CPU-seconds,
        peak RSS)."""
        if not os.path.exists(self.program):
            raise RuntimeError(f"{self.program} is missing: build it with `cargo build --examples` "
                               "(bench/run.sh does)")
        out = os.path.join(self.h.logdir, f"{self.name}.{uuid.uuid4().hex[:6]}.out")
        with open(out, "w") as stdout:
            self.spawn([self.program, *args], env=dict(os.environ, **(env or {})), stdout=stdout,
                       stderr=open(self.logfile, "a"))
        p = self.process

        def kill():  # (not p.poll(): that would reap the child under wait4)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        done, peak = threading.Event(), [0.0]

        def watch_rss():
            while not done.wait(0.1):
                peak[0] = max(peak[0], proc_status(p.pid).get("VmHWM", 0.0))

        watcher = threading.Thread(target=watch_rss)
        watcher.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            watchdog.cancel()
            done.set()
            watcher.join()
        p.returncode = os.waitstatus_to_exitcode(status)
        LIVE.discard(p)
        self.process = None
        lines = open(out).read().splitlines()
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"{self.name}: {os.path.basename(self.program)} exited with {p.returncode} "
                               f"(killed after {timeout:.0f} s?); see {self.logfile}")
        return json.loads(lines[-1]), {"cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": peak[0] or None}


# ---------------------------------------------------------------------------------------------
# The harness

class Harness:
    def __init__(self, args):
        self.mode = mode_config(args.mode)
        self.args = args
        self.run_id = time.strftime("%m%d%H%M%S")
        self.outdir = os.path.join(ROOT, "bench", "results", os.environ.get("BENCH_OUT", self.mode.name))
        self.logdir = os.path.join(ROOT, ".local", "bench-logs", self.run_id)
        os.makedirs(self.outdir, exist_ok=True)
        os.makedirs(self.logdir, exist_ok=True)
        self.relay_bin = args.relay_bin
        # Cargo's profile from the binary's directory; a binary given from
        # elsewhere (a copy of another build) is labelled as the BENCH_RELAY_BIN build.
        self.relay_profile = next((p for p in ("release", "debug") if f"/{p}/" in self.relay_bin),
                                  "BENCH_RELAY_BIN")
        self.dbz_home = args.debezium_home
        self.dbz_dir = os.path.dirname(os.path.dirname(self.dbz_home)) if self.dbz_home else None
        self.dbz_java_home = args.debezium_java_home
        self.dbz_version = args.debezium_version
        self.dbz_reason = args.debezium_skip_reason or "no Debezium Server given (--debezium-home)"
        self.skipped = []  # (arms, why): arms this run could not run at all
        self.results = []
        self.timeline = []
        self.pg = Pg()
        self.kafka = Kafka()
        self.pg.setup_relay_table(self.relay_bin)
        self.pg.setup_dbz_table()
        self.pg.drop_slot()
        self.leave_log_mode(migrate=False)  # what an interrupted relay-log arm left (setup migrated to claim)
        self.kafka.create_topic("bench.warmup") if "bench.warmup" not in self.kafka.admin.list_topics(timeout=10).topics else None
        self.meta = self.machine()

    def machine(self):
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1))
        cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
        pgv = self.pg.one("SHOW server_version")[0]
        kv = re.search(r"<kafka.version>(.*)</kafka.version>", open(os.path.join(ROOT, "scripts/kafka/pom.xml")).read())
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "src", "Cargo.toml", "Cargo.lock"],
                               capture_output=True, text=True).stdout.strip()
        return {"nproc": os.cpu_count(), "mem_gib": round(mem_kb / 1024 / 1024, 1),
                "cpu": cpu.group(1) if cpu else "?", "kernel": platform.release(),
                "os": open("/etc/debian_version").read().strip() if os.path.exists("/etc/debian_version") else "?",
                "postgres": pgv, "kafka": kv.group(1) if kv else "?",
                "relay_rev": rev + (" (src modified in work tree)" if dirty else ""),
                "relay_bin": os.path.relpath(self.relay_bin, ROOT), "python": platform.python_version(),
                "debezium": self.dbz_version if self.dbz_home else None,
                "debezium_java": self.dbz_java_home, "pgbench": PGBENCH, "loadavg_start": os.getloadavg(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "mode": self.mode.name}

    def notify_trigger(self, on):
        env = dict(os.environ, OUTBOX_RELAY_DATABASE_URL=url("bench_relay"))
        subprocess.run([self.relay_bin, "migrate", "--notify-trigger", "true" if on else "false"], env=env, check=True,
                       stdout=subprocess.DEVNULL)

    def read_mode(self, mode, *extra):
        """Migrate the relay's table to a read mode's index (claim: pending by id; log: none)."""
        env = dict(os.environ, OUTBOX_RELAY_DATABASE_URL=url("bench_relay"))
        subprocess.run([self.relay_bin, "migrate", "--read-mode", mode, *extra], env=env, check=True,
                       stdout=subprocess.DEVNULL)

    def log_mode(self):
        """Migrate the relay's table to log mode: the publication of its inserts (publish =
        'insert': the TRUNCATE between cells is not streamed), the emit function, the slot
        LOG_SLOT (which then holds the WAL of every insert until the relay confirms it); the
        claim index and the NOTIFY trigger are dropped."""
        self.read_mode("log", "--slot", LOG_SLOT, "--publication", LOG_PUBLICATION)
        return True

    def leave_log_mode(self, migrate=True):
        """Undo log_mode() once the relay-log arm is stopped, so the arms after it run as before:
        drop the slot (it would keep WAL for good) and the publication, let the lease forget log
        mode (a claim-mode relay takes over a table last published in log mode through its slot),
        and migrate back to claim mode's index and NOTIFY trigger."""
        self.pg.drop_slot(LOG_SLOT)
        self.pg.x(f"DROP PUBLICATION IF EXISTS {LOG_PUBLICATION}")
        if self.pg.one(f"SELECT to_regclass('{RELAY_TABLE}_lease')")[0]:
            self.pg.x(f"UPDATE {RELAY_TABLE}_lease SET read_mode = NULL, log_check_until = NULL WHERE id = 1")
        if migrate:
            self.read_mode("claim")

    def diagnose(self, arm):
        """Why an arm may not deliver: what waits in its table, and the last error in its log."""
        out = []
        try:
            if isinstance(arm, RelayLog):
                # Log mode marks no row: what waits is in the slot, not in the table's state.
                rows, parked = self.pg.one(f"SELECT count(*), count(*) FILTER (WHERE failed_at IS NOT NULL) "
                                           f"FROM {RELAY_TABLE}")
                out.append(f"slot {LOG_SLOT}: {self.pg.slot_state(LOG_SLOT) or 'missing'}")
                out.append(f"table: {rows} rows (log mode marks none), {parked} parked")
            elif arm.layout == "relay":
                rows = self.pg.x(f"SELECT topic, count(*) FILTER (WHERE {UNPUBLISHED}), "
                                 f"count(*) FILTER (WHERE failed_at IS NOT NULL) FROM {RELAY_TABLE} GROUP BY 1 "
                                 f"ORDER BY 2 DESC LIMIT 3")
                out.append("table: " + (", ".join(f"{t}: {p} pending, {f} parked" for t, p, f in rows) or "empty"))
            if arm.layout == "relay":
                lease = self.pg.x(f"SELECT * FROM {RELAY_TABLE}_lease") if self.pg.one(
                    f"SELECT to_regclass('{RELAY_TABLE}_lease')")[0] else None
                if lease:
                    out.append(f"lease: {lease[0]}")
        except Exception as e:  # noqa: BLE001 - a diagnosis must not hide the failure it explains
            out.append(f"(table not readable: {e})")
        try:
            errs = [ln for ln in open(arm.logfile, errors="replace").read().splitlines()[-400:]
                    if " ERROR " in ln or " WARN " in ln and "insecure transport" not in ln]
            if errs:
                out.append(f"last log warning: {errs[-1][:300]}")
        except OSError:
            pass
        return "; ".join(out)

    def save(self):
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.results]
        with open(os.path.join(self.outdir, "results.json"), "w") as f:
            json.dump({"meta": dict(self.meta, skipped=self.skipped), "results": clean, "timeline": self.timeline},
                      f, indent=1, default=str)

    # -- measurement plumbing ----------------------------------------------------------------

    def meter(self, arm):
        groups = {"postgres": lambda: [postmaster_pid()] + children(postmaster_pid()), "kafka": lambda: [kafka_pid()]}
        if arm.role:
            # The arm's own backends (its sessions and, for Debezium, its walsender).
            groups["pg_arm"] = lambda: [r[0] for r in self.pg_arm_pids(arm.role)]
        if getattr(arm, "walsender", False):
            # Of those, the walsender alone (decoding the WAL for the arm's slot).
            groups["pg_walsender"] = lambda: [r[0] for r in self.pg_arm_pids(arm.role, walsender=True)]
        if arm.process is not None or isinstance(arm, (Relay, Naive, Debezium, Example)):
            groups["arm"] = lambda: [p] if (p := arm.pid()) else []
        return CpuMeter(groups)

    def pg_arm_pids(self, role, walsender=False):
        with psycopg.connect(url(), autocommit=True) as c:
            return c.execute("SELECT pid FROM pg_stat_activity WHERE usename = %s"
                             + (" AND backend_type = 'walsender'" if walsender else ""), (role,)).fetchall()

    def sampler(self, arm, topic, table, every, stop, samples, t0, meter=None):
        pg = psycopg.connect(url(), autocommit=True)
        ins0 = None
        while True:
            try:
                r = pg.execute("SELECT n_tup_ins, n_dead_tup, n_live_tup, pg_total_relation_size(relid), autovacuum_count "
                               "FROM pg_stat_user_tables WHERE relname = %s", (table,)).fetchone()
                ins0 = r[0] if ins0 is None else ins0
                s = {"t": time.time() - t0, "inserted": r[0] - ins0, "dead": r[1], "live": r[2], "table_bytes": r[3],
                     "autovacuums": r[4], "delivered": self.kafka.high(topic) if topic else None}
                pid = arm.pid()
                if pid:
                    s.update(proc_status(pid))
                if meter is not None:
                    meter.sample()  # short-lived backends (the load generator's) are caught here
                samples.append(s)
            except Exception as e:  # noqa: BLE001 - a missed sample is not fatal
                samples.append({"t": time.time() - t0, "error": str(e)})
            if stop.wait(every):
                break
        pg.close()

    def begin(self, arm, table):
        self.pg.x("CHECKPOINT")
        self.pg.x("SELECT pg_stat_statements_reset()")
        if arm.pid():
            reset_peak_rss(arm.pid())
        return {"wal": self.pg.wal_lsn(), "meter": self.meter(arm), "extra": arm.extra_start(), "t": time.time(),
                "loadavg": os.getloadavg(), "minflt": proc_minflt(arm.pid()) if arm.pid() else None}

    def end(self, arm, table, b, events):
        out = {"wal_bytes": self.pg.wal_lsn() - b["wal"], "events": events}
        cpu = b["meter"].totals()
        out.update({f"cpu_{k}_s": v for k, v in cpu.items() if k in ("arm", "postgres", "kafka", "pg_arm", "pg_walsender")})
        out["pg_cpu_sampled"] = True
        out["machine_busy_pct"] = 100 * cpu["machine_busy_frac"]
        out["loadavg_1m"] = max(b["loadavg"][0], cpu["loadavg_1m_end"])
        pid = arm.pid()
        if pid:
            st = proc_status(pid)
            out["peak_rss_mib"] = st.get("VmHWM")
            out["rss_end_mib"] = st.get("VmRSS")
            minflt = proc_minflt(pid)
            if minflt is not None and b["minflt"] is not None and minflt >= b["minflt"]:
                out["arm_minor_faults"] = minflt - b["minflt"]
        stm = self.pg.statements()
        out["statements"] = {r: v["calls"] for r, v in stm.items()}
        if arm.role:
            out["arm_statements"] = stm.get(arm.role, {}).get("calls", 0)
            out["arm_statement_ms"] = stm.get(arm.role, {}).get("exec_ms", 0.0)
            # The WAL the arm's own statements wrote (pg_stat_statements wal_bytes): the relay's
            # writes alone, without the rest of the server's WAL (checkpoints' full-page images).
            out["arm_wal_bytes"] = stm.get(arm.role, {}).get("wal_bytes", 0)
            out["top_statements"] = self.pg.top_statements(arm.role)
        out["app_statements"] = stm.get("bench_app", {}).get("calls", 0)
        out["table"] = self.pg.table_stats(table)
        out.update(arm.extra_end(b["extra"]))
        if events:
            out["wal_bytes_per_event"] = out["wal_bytes"] / events
            if "cpu_arm_s" in out:
                out["arm_cpu_s_per_1k"] = 1000 * out["cpu_arm_s"] / events
            if "arm_minor_faults" in out:
                out["arm_minor_faults_per_event"] = out["arm_minor_faults"] / events
            out["pg_cpu_s_per_1k"] = 1000 * out["cpu_postgres_s"] / events
            if "cpu_pg_arm_s" in out:
                out["pg_arm_cpu_s_per_1k"] = 1000 * out["cpu_pg_arm_s"] / events
            if "cpu_pg_walsender_s" in out:
                out["pg_walsender_cpu_s_per_1k"] = 1000 * out["cpu_pg_walsender_s"] / events
            out["kafka_cpu_s_per_1k"] = 1000 * out["cpu_kafka_s"] / events
            if arm.role:
                out["arm_statements_per_event"] = out["arm_statements"] / events
                out["arm_wal_bytes_per_event"] = out["arm_wal_bytes"] / events
        return out

    def wait_delivered(self, topic, n, timeout, stall=20):
        deadline, last, last_change = time.time() + timeout, -1, time.time()
        while time.time() < deadline:
            hw = self.kafka.high(topic)
            if hw >= n:
                return hw
            if hw != last:
                last, last_change = hw, time.time()
            elif time.time() - last_change > stall:
                return hw
            time.sleep(0.2)
        return self.kafka.high(topic)

    # -- cells -------------------------------------------------------------------------------

    def pending_rows(self):
        return self.pg.one(f"SELECT count(*) FROM {RELAY_TABLE} WHERE {UNPUBLISHED}")[0]

    def committed(self, arm, n, base):
        """How many of `n` rows a transactional arm has committed: its topic's offsets include
        one commit marker per transaction and partition, so the high watermark overcounts.
        Claim mode marks a row only after its transaction committed; log mode marks none, and
        its published counter (from `base`, taken at the cell's start) moves after the commit."""
        if isinstance(arm, RelayLogEos):
            return int(arm.published() - base)
        return n - self.pending_rows()

    def wait_committed(self, arm, n, deadline, base):
        """Wait until a transactional arm has committed `n` rows (or the deadline); returns how
        many it has."""
        while time.time() < deadline and self.committed(arm, n, base) < n:
            time.sleep(0.05)
        return self.committed(arm, n, base)

    def step(self, arm, wl, rate, seconds, kind="step"):
        """Open-loop load at a fixed offered rate; the arm publishes; everything checked."""
        m = self.mode
        table = RELAY_TABLE if arm.layout == "relay" else DBZ_TABLE
        publishes = not isinstance(arm, DbOnly)
        # Empty the table first: rows left by an earlier cell name deleted topics (a starting
        # relay would spend its first seconds, or minutes, parking them).
        self.pg.reset_table(table)
        if publishes:
            self.pg.stray_sessions(arm)
            if isinstance(arm, RelayLog) and arm.dirty:
                arm.fresh()
            arm.start()
        base = arm.published() if isinstance(arm, RelayLogEos) else 0
        topic = f"bench.{self.run_id}.{arm.name}.{wl.name}.{kind}{rate}"
        self.kafka.create_topic(topic)
        self.pg.reset_table(table)
        b = self.begin(arm, table)
        stop, samples = threading.Event(), []
        th = threading.Thread(target=self.sampler, args=(arm, topic if publishes else None, table,
                                                         m.sample_every if kind != "soak" else 5.0, stop, samples, b["t"], b["meter"]))
        th.start()
        log(f"{arm.name} {wl.name} {kind} {rate}/s for {seconds:.0f}s")
        pb = run_pgbench(arm.layout, wl, topic, rate, seconds, m.clients, self.logdir)
        t_load_end = time.time()
        inserted = self.pg.count(arm.layout, topic)
        res = {"arm": arm.name, "label": arm.label, "workload": wl.name, "kind": kind, "offered": rate,
               "seconds": seconds, "inserted": inserted, "achieved_insert_rate": inserted / seconds, **pb}
        if publishes:
            delivered_at_end = self.kafka.high(topic)
            if arm.transactional:
                delivered_at_end = self.committed(arm, inserted, base)
            res["backlog_at_load_end"] = inserted - delivered_at_end
            hw = self.wait_delivered(topic, inserted, m.drain_wait)
            res["catch_up_s"] = time.time() - t_load_end
            res["delivered_after_wait"] = hw
            arm.dirty = arm.dirty or hw < inserted
        stop.set()
        th.join()
        res.update(self.end(arm, table, b, inserted))
        res["_samples"] = samples
        res["samples"] = samples if kind == "soak" else samples[:: max(1, len(samples) // 60)]
        if publishes:
            chk = check_topic(self.kafka, topic, self.pg.expected(arm.layout, topic))
            res.update({k: v for k, v in chk.items() if not k.startswith("_")})
            res.update(lat_stats(chk["_lat"]))
            res["backlog_slope_per_s"] = backlog_slope(samples)
            res["sustained"] = self.sustained(res)
        else:
            res["sustained"] = insert_ok(res) and res["pgbench_lag_avg_ms"] < 1000
        self.kafka.delete_topic(topic)
        if kind != "warmup":
            self.record(res)
        return res

    def warm(self, arm):
        """10 s at 1,000 events/s, not recorded: a JVM's JIT (and every arm's connections) warm up first."""
        self.step(arm, WORKLOADS[MAIN], 1000, 10 if self.mode.name == "full" else 2, "warmup")

    def sustained(self, r):
        rate = r["offered"]
        ok_insert = insert_ok(r)
        ok_backlog = r["backlog_at_load_end"] <= max(2 * rate, 500)
        # The slope comes from n_tup_ins (flushed about once a second): judge it only when the
        # backlog is not already small.
        ok_slope = (r["backlog_slope_per_s"] or 0) < 0.05 * rate or r["backlog_at_load_end"] <= 0.5 * rate
        ok_all = r["missing"] == 0 or r["delivered_after_wait"] >= r["inserted"]
        r["limited_by"] = None if ok_insert else "insert"
        return bool(ok_insert and ok_backlog and ok_slope and ok_all)

    def ladder(self, arm, wl, rates=None, cap=None):
        """Sustained throughput by a coarse search then bisection. The coarse rates run in order
        (the first ones, 1,000 and 5,000/s, are the latency points) until a step is not sustained;
        for a publishing arm they stop at `cap`, the insert-only ceiling of the same workload (the
        database, not the arm, limits above it), which is offered last. Then `bisections` steps
        halve the gap between the highest sustained and the lowest failing rate."""
        rates = list(rates or self.mode.ladder)
        if cap:
            rates = [r for r in rates if r < cap] + [cap]
        best = fail = None
        for rate in rates:
            r = self.ladder_step(arm, wl, rate)
            if not r["sustained"]:
                # Once more: a hiccup of the shared machine must not end the ladder (and, for
                # db-only, cap every publishing arm at it). The first attempt stays in
                # results.json under another kind, so the report counts the second.
                r["kind"] = "step-retried"
                self.save()
                r = self.ladder_step(arm, wl, rate, "retry")
            if not r["sustained"]:
                fail = rate
                break
            best = rate
        for _ in range(self.mode.bisections if fail else 0):
            mid = nice_rate(((best or 0) + fail) / 2)
            if not (best or 0) < mid < fail:
                break
            if self.ladder_step(arm, wl, mid, "bisect")["sustained"]:
                best = mid
            else:
                fail = mid
        self.record({"arm": arm.name, "label": arm.label, "workload": wl.name, "kind": "sustained",
                     "sustained_rate": best, "first_failed": fail, "capped_at": cap if fail is None and cap else None})
        return best

    def ladder_step(self, arm, wl, rate, what="step"):
        r = self.step(arm, wl, rate, self.mode.step_seconds)
        log(f"  -> {what} {rate}/s: inserted {r['achieved_insert_rate']:.0f}/s" +
            (f", backlog {r.get('backlog_at_load_end')}, p99 {r.get('lat_p99_ms', float('nan')):.1f} ms, "
             f"missing {r.get('missing')}, dup {r.get('duplicates')}, order {r.get('order_violations')}"
             if "missing" in r else "") + f": {'sustained' if r['sustained'] else 'NOT sustained'}")
        return r

    def drain(self, arm, wl, n, cap_seconds=None, analyzed=False):
        """A pre-loaded backlog, then the arm started. By default the backlog has no planner
        statistics (Harness.backlog): what an outage leaves; `analyzed`: after ANALYZE."""
        table = RELAY_TABLE if arm.layout == "relay" else DBZ_TABLE
        kind = "drain-analyzed" if analyzed else "drain"
        topic = f"bench.{self.run_id}.{arm.name}.{wl.name}.{kind}"
        if isinstance(arm, Debezium):
            # A fresh server and slot, positioned before the pre-load: a restart from stored
            # offsets would first re-stream earlier cells' rows, whose topics are deleted.
            arm.fresh()
            arm.start()
        elif isinstance(arm, RelayLog) and arm.dirty:
            # The slot would stream an earlier cell's leftovers before the backlog: a fresh one,
            # recorded in the lease by a start (RelayLog.fresh).
            arm.fresh()
            arm.start()
        # Log mode: the relay stops and the slot stays, so the pre-load's WAL waits in the slot
        # (the TRUNCATE below is not streamed: the publication is publish = 'insert').
        arm.stop()
        self.kafka.create_topic(topic)
        self.pg.reset_table(table)
        log(f"{arm.name} {kind}:")
        try:
            before = self.backlog(table, topic, n, wl, analyzed)
            if isinstance(arm, RelayLog):
                # The WAL the walsender decodes to stream the backlog (from the slot's confirmed position).
                before["slot_wal_at_start"] = (self.pg.slot_state(LOG_SLOT) or {}).get("unconfirmed_wal_bytes")
                if not arm.transactional:  # relay-log's drain measures the walsender's limit
                    self.db_limit_log(wl, n)
            log(f"  starting {arm.name}")
            b = self.begin(arm, table)
            stop, samples = threading.Event(), []
            t0 = time.time()
            arm.start(canary=False)
            reset_peak_rss(arm.pid())
            th = threading.Thread(target=self.sampler, args=(arm, topic, table, 0.5, stop, samples, t0, b["meter"]))
            th.start()
            timeout = cap_seconds or max(600.0, n / 1000.0)
            hw = self.wait_delivered(topic, n, timeout, stall=90 if isinstance(arm, Debezium) else 30)
            if arm.transactional:
                hw = self.wait_committed(arm, n, t0 + timeout, 0)
            t_done = time.time()
            stop.set()
            th.join()
            res = {"arm": arm.name, "label": arm.label, "workload": wl.name, "kind": kind, "rows": n,
                   "analyzed": analyzed, "capped_s": cap_seconds, "wall_s": t_done - t0, "delivered_at_stop": hw, **before}
            res.update(self.end(arm, table, b, hw))
            res["analyzes_during"] = self.pg.analyze_state(table)["analyzes"] - before["analyzes_before"]
        finally:
            self.pg.allow_analyze(table)
        arm.stop()
        arm.dirty = arm.dirty or hw < n
        chk = check_topic(self.kafka, topic, self.pg.expected(arm.layout, topic))
        res.update({k: v for k, v in chk.items() if not k.startswith("_")})
        if isinstance(arm, RelayLog):
            # Log mode marks no row (every row would count as pending): what it has not
            # published is the checker's `missing`, and the WAL its slot has not confirmed.
            res["slot_unconfirmed_wal_bytes"] = (self.pg.slot_state(LOG_SLOT) or {}).get("unconfirmed_wal_bytes")
        elif arm.layout == "relay":
            res["pending_in_db"] = self.pending_rows()
        ap = chk["_append_ms"]
        if len(ap) > 1:
            span = (ap.max() - ap.min()) / 1000.0
            res["first_message_after_s"] = ap.min() / 1000.0 - t0
            res["drain_span_s"] = span
            res["drain_rate"] = (len(ap) - 1) / span if span > 0 else None
        res["drain_rate_wall"] = hw / res["wall_s"]
        res["samples"] = samples
        self.kafka.delete_topic(topic)
        log(f"  -> {arm.name} {kind}: {hw}/{n} in {res['wall_s']:.1f}s: {res.get('drain_rate') or 0:.0f}/s "
            f"(broker clock), missing {res['missing']}, dup {res['duplicates']}, order {res['order_violations']}")
        self.record(res)
        return res

    def kafka_ceiling(self, wl, n, headers=True):
        """Kafka's producer-only ceiling: examples/kafka_ceiling.rs, a Rust librdkafka producer
        built from the relay's own producer properties, messages built as the relay builds them
        (`headers=False`: without the relay's three headers, arm kafka-only-bare)."""
        name = "kafka-only" if headers else "kafka-only-bare"
        topic = f"bench.{self.run_id}.{name}.{wl.name}.drain"
        self.kafka.create_topic(topic)
        ex = Example(self, name, "producer alone (Rust librdkafka, relay's producer settings)" if headers else
                     "producer alone (Rust librdkafka, relay's producer settings) without the relay's headers", "kafka_ceiling")
        meter = CpuMeter({"postgres": lambda: [postmaster_pid()] + children(postmaster_pid()),
                          "kafka": lambda: [kafka_pid()]})
        log(f"{name}: producing {n} messages of {wl.payload} B (Rust, relay's producer settings)")
        t0 = time.time()
        out, used = ex.run(["--brokers", BROKERS, "--topic", topic, "--messages", str(n), "--payload", str(wl.payload),
                            "--keys", str(KEYS), *([] if headers else ["--no-headers"])], timeout=300 + n / 1000)
        cpu = meter.totals()
        chk = check_topic(self.kafka, topic, {(i % KEYS) << 40 | i: t0 for i in range(1, n + 1)})
        res = {"arm": ex.name, "label": ex.label, "workload": wl.name, "kind": "drain", "rows": n,
               "wall_s": out["wall_s"], "drain_rate_wall": out["rate"], **drain_span(chk),
               "cpu_arm_s": used["cpu_s"], "peak_rss_mib": used["peak_rss_mib"], "cpu_postgres_s": cpu["postgres"],
               "cpu_kafka_s": cpu["kafka"],
               "machine_busy_pct": 100 * cpu["machine_busy_frac"], "loadavg_1m": cpu["loadavg_1m_end"],
               **{k: v for k, v in chk.items() if not k.startswith("_")}}
        per_1k(res, n)
        self.kafka.delete_topic(topic)
        log(f"  -> {name} {wl.name}: {res.get('drain_rate') or 0:.0f}/s (broker clock), {res['drain_rate_wall']:.0f}/s wall, "
            f"missing {res['missing']}, dup {res['duplicates']}, order {res['order_violations']}")
        self.record(res)
        return res

    def kafka_ceiling_py(self, wl, n):
        """The same load from Python confluent-kafka (bundled librdkafka), the relay's settings:
        bound by the Python loop, kept beside the Rust figure for comparison."""
        topic = f"bench.{self.run_id}.kafka-only-py.{wl.name}.drain"
        self.kafka.create_topic(topic)
        meter = CpuMeter({"kafka": lambda: [kafka_pid()], "arm": lambda: [os.getpid()],
                          "postgres": lambda: [postmaster_pid()] + children(postmaster_pid())})
        p = Producer({"bootstrap.servers": BROKERS, "enable.idempotence": True, "acks": "all",
                      "compression.type": "lz4", "linger.ms": 1, "partitioner": "murmur2_random",
                      "message.timeout.ms": 0, "queue.buffering.max.messages": 1000000})
        warm_up(p)
        keys = [str(k).encode() for k in range(KEYS)]
        pad = b"x" * wl.payload
        log(f"kafka-only-py: producing {n} messages of {wl.payload} B")
        expected = {}
        t0 = time.time()
        for i in range(1, n + 1):
            k = i % KEYS
            head = b"k=%d s=%d " % (k, i)
            hdrs = [("outbox-event-id", str(i)), ("outbox-created-at", "2026-01-01T00:00:00.000000Z"),
                    ("outbox-source", "public.outbox")]
            while True:
                try:
                    p.produce(topic, value=head + pad[len(head):], key=keys[k], headers=hdrs)
                    break
                except BufferError:
                    p.poll(0.01)
            if i % 1000 == 0:
                p.poll(0)
            expected[k << 40 | i] = t0
        p.flush()
        wall = time.time() - t0
        cpu = meter.totals()
        chk = check_topic(self.kafka, topic, expected)
        res = {"arm": "kafka-only-py", "label": "producer alone (Python confluent-kafka, relay's producer settings)",
               "workload": wl.name, "kind": "drain", "rows": n, "wall_s": wall, "drain_rate_wall": n / wall,
               **drain_span(chk), "cpu_arm_s": cpu["arm"], "cpu_postgres_s": cpu["postgres"], "cpu_kafka_s": cpu["kafka"],
               "machine_busy_pct": 100 * cpu["machine_busy_frac"], "loadavg_1m": cpu["loadavg_1m_end"],
               **{k: v for k, v in chk.items() if not k.startswith("_")}}
        per_1k(res, n)
        self.kafka.delete_topic(topic)
        log(f"  -> kafka-only-py {wl.name}: {res['drain_rate'] or 0:.0f}/s (broker clock), {res['drain_rate_wall']:.0f}/s wall")
        self.record(res)
        return res

    def kafka_latency(self, wl, rate, seconds, loaded=False):
        """Kafka alone at a fixed rate (examples/kafka_ceiling.rs --rate, paced open-loop): from
        the moment a message is handed to the producer to its LogAppendTime, the floor under any
        relay's commit-to-LogAppendTime latency. `loaded` (arm kafka-only-loaded): the same while
        pgbench inserts the same workload at the same rate into the relay's table with no relay
        running: the producer's floor on a machine as busy as a relay arm's step finds it."""
        name = "kafka-only-loaded" if loaded else "kafka-only"
        topic = f"bench.{self.run_id}.{name}.{wl.name}.step{rate}"
        self.kafka.create_topic(topic)
        label = ("producer alone beside the same insert load (pgbench, same workload and rate, no relay)" if loaded
                 else "producer alone (Rust librdkafka, relay's producer settings)")
        ex = Example(self, name, label, "kafka_ceiling")
        meter = CpuMeter({"postgres": lambda: [postmaster_pid()] + children(postmaster_pid()),
                          "kafka": lambda: [kafka_pid()]})
        n = int(rate * seconds)
        times = os.path.join(self.logdir, f"{name}.{rate}.times")
        log(f"{name} {wl.name} step {rate}/s for {seconds:.0f}s (Rust, relay's producer settings)")
        load = None
        if loaded:
            self.pg.reset_table(RELAY_TABLE)
            load = threading.Thread(target=run_pgbench, args=("relay", wl, f"{topic}.unrelayed", rate, seconds,
                                                              self.mode.clients, self.logdir))
            load.start()
        try:
            out, used = ex.run(["--brokers", BROKERS, "--topic", topic, "--messages", str(n), "--payload",
                                str(wl.payload), "--keys", str(KEYS), "--rate", str(rate), "--send-times", times],
                               timeout=seconds + 300)
        finally:
            if load:
                load.join()
                self.pg.reset_table(RELAY_TABLE)
        cpu = meter.totals()
        expected = {}
        with open(times) as f:
            for line in f:
                k, s, t = line.split()
                expected[int(k) << 40 | int(s)] = float(t)
        os.remove(times)
        chk = check_topic(self.kafka, topic, expected)
        achieved = n / out["handed_over_s"]
        res = {"arm": ex.name, "label": ex.label, "workload": wl.name, "kind": "step", "offered": rate, "seconds": seconds,
               "inserted": n, "achieved_insert_rate": achieved, **lat_stats(chk["_lat"]),
               "cpu_arm_s": used["cpu_s"], "peak_rss_mib": used["peak_rss_mib"], "cpu_postgres_s": cpu["postgres"],
               "cpu_kafka_s": cpu["kafka"],
               "machine_busy_pct": 100 * cpu["machine_busy_frac"], "loadavg_1m": cpu["loadavg_1m_end"],
               **{k: v for k, v in chk.items() if not k.startswith("_")}}
        res["sustained"] = achieved >= 0.95 * rate and res["missing"] == 0
        per_1k(res, n)
        self.kafka.delete_topic(topic)
        log(f"  -> {name} {rate}/s: p50 {res.get('lat_p50_ms', 0):.2f} ms, p99 {res.get('lat_p99_ms', 0):.2f} ms, "
            f"missing {res['missing']}, dup {res['duplicates']}, order {res['order_violations']}")
        self.record(res)
        return res

    def db_limit(self, mode, on_publish, wl, n, analyzed=False):
        """The database's own limit for a read mode, no Kafka: examples/db_limit.rs drains a
        pre-loaded backlog through the relay's reader and ledger (its SQL, its 1,000-row batches,
        one progress write in flight beside the next read), every row counted delivered at once."""
        name = {("claim", "mark"): "db-limit-claim", ("claim", "delete"): "db-limit-delete"}[(mode, on_publish)]
        what = {"db-limit-claim": "read + mark", "db-limit-delete": "read + delete"}[name]
        ex = Example(self, name, f"PostgreSQL alone serving the relay's {what} ({mode} mode, 1,000-row batches, no Kafka)",
                     "db_limit", role="bench_dblimit")
        kind = "drain-analyzed" if analyzed else "drain"
        table = RELAY_TABLE
        self.pg.reset_table(table)
        before = self.backlog(table, f"bench.{self.run_id}.{name}.{wl.name}.{kind}", n, wl, analyzed)
        b = self.begin(ex, table)
        stop, samples = threading.Event(), []
        th = threading.Thread(target=self.sampler, args=(ex, None, table, 0.25, stop, samples, b["t"], b["meter"]))
        th.start()
        log(f"{name} {kind}: {n} rows through the relay's {mode}-mode statements")
        try:
            out, used = ex.run(["--table", table, "--mode", mode, "--on-publish", on_publish,
                                   "--max-seconds", str(max(600.0, n / 1000.0))],
                                  timeout=max(600.0, n / 1000.0) + 120, env={"OUTBOX_RELAY_DATABASE_URL": url("bench_dblimit")})
        finally:
            stop.set()
            th.join()
            self.pg.allow_analyze(table)
        res = {"arm": name, "label": ex.label, "workload": wl.name, "kind": kind, "rows": n, "analyzed": analyzed,
               "wall_s": out["wall_s"], "drained": out["rows"], "complete": out["complete"], "drain_rate": out["rate"],
               "drain_rate_wall": out["rate"], "batches": out["batches"], "db_limit": out, **before}
        res.update(self.end(ex, table, b, out["rows"]))
        res["cpu_arm_s"], res["peak_rss_mib"] = used["cpu_s"], used["peak_rss_mib"]
        res["analyzes_during"] = self.pg.analyze_state(table)["analyzes"] - before["analyzes_before"]
        res["pending_in_db"] = self.pending_rows()
        res["samples"] = samples[:: max(1, len(samples) // 120)]
        per_1k(res, out["rows"])
        log(f"  -> {name} {kind}: {out['rows']}/{n} rows in {out['wall_s']:.1f}s: {out['rate']:.0f}/s "
            f"(read mean {(out.get('read') or {}).get('mean_ms') or 0:.1f} ms, write mean "
            f"{(out.get('write') or {}).get('mean_ms') or 0:.1f} ms), {res['pending_in_db']} left pending")
        self.record(res)
        return res

    def db_limit_log(self, wl, n):
        """Log mode's database limit, no Kafka: pg_recvlogical (PostgreSQL's own C client) streams
        the backlog just loaded, from a copy of the relay's slot at the same position and with the
        relay's options (pgoutput, proto_version 1, binary, messages), to /dev/null, up to the WAL
        position after the load. What the walsender can decode and send; the relay's drain of the
        same backlog from the original slot follows."""
        name, copy = "db-limit-log", "bench_dblimit_log"
        recv = os.path.join(PGBIN[-1], "pg_recvlogical") if PGBIN else shutil.which("pg_recvlogical")
        self.pg.drop_slot(copy)
        self.pg.x(f"SELECT pg_copy_logical_replication_slot('{LOG_SLOT}', '{copy}')")
        end = self.pg.one("SELECT pg_current_wal_lsn()::text")[0]
        arm = Arm(self)
        arm.name, arm.label, arm.role, arm.walsender = name, "pg_recvlogical from a copy of the relay's slot, to /dev/null", "bench_relay", True
        log(f"{name} drain: {n} rows decoded by the walsender for pg_recvlogical")
        b = self.begin(arm, RELAY_TABLE)
        stop, samples = threading.Event(), []
        th = threading.Thread(target=self.sampler, args=(arm, None, RELAY_TABLE, 0.25, stop, samples, b["t"], b["meter"]))
        th.start()
        t0 = time.time()
        try:
            p = subprocess.Popen([recv, "-d", url("bench_relay"), "-S", copy, "--start", "-E", end, "--no-loop",
                                  "-f", "/dev/null", "-o", "proto_version=1", "-o", f"publication_names={LOG_PUBLICATION}",
                                  "-o", "binary=true", "-o", "messages=true"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                _, err = p.communicate(timeout=max(600.0, n / 1000.0))
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            wall = time.time() - t0
        finally:
            stop.set()
            th.join()
        complete = p.returncode == 0  # (it exits 0 only once it has received the WAL up to `end`)
        res = {"arm": name, "label": arm.label, "workload": wl.name, "kind": "drain", "rows": n, "wall_s": wall,
               "drained": n if complete else None, "complete": complete, "drain_rate": n / wall if complete else None,
               "drain_rate_wall": n / wall if complete else None, "recvlogical_exit": p.returncode,
               "recvlogical_stderr": err.decode(errors="replace")[-500:]}
        res.update(self.end(arm, RELAY_TABLE, b, n))
        res["samples"] = samples[:: max(1, len(samples) // 120)]
        self.pg.drop_slot(copy)
        log(f"  -> {name}: {n} rows in {wall:.1f}s: {n / wall:.0f}/s, exit {p.returncode}"
            + ("" if complete else f", INCOMPLETE: {res['recvlogical_stderr']}"))
        self.record(res)
        return res

    def backlog(self, table, topic, n, wl, analyzed):
        """Pre-load n rows for a drain; `analyzed`: then ANALYZE, else leave the table with no
        statistics (forget_statistics; the caller calls allow_analyze after the cell). Returns
        what the planner had at the start, for the result."""
        layout = "relay" if table == RELAY_TABLE else "dbz"
        if layout == "relay" and not analyzed:
            self.pg.forget_statistics(table)
        a0 = self.pg.analyze_state(table)
        log(f"  pre-loading {n} rows of {wl.payload} B" + (", then ANALYZE" if analyzed else ", not analyzed"))
        t = time.time()
        self.pg.preload(layout, topic, n, wl.payload)
        if analyzed:
            self.pg.x(f"ANALYZE {table}")
        a1 = self.pg.analyze_state(table)
        log(f"  pre-loaded in {time.time() - t:.1f}s")
        if layout == "relay" and not analyzed and (a1["analyzes"] > a0["analyzes"] or a1["column_stats"]):
            raise RuntimeError(f"{table} was analyzed during the pre-load: the unanalyzed cell would not be one")
        return {"analyzes_before": a1["analyzes"], "column_stats_at_start": a1["column_stats"]}

    def record(self, res):
        self.results.append(res)
        self.timeline.append({"t": time.strftime("%H:%M:%S"), "loadavg": os.getloadavg(),
                              "what": f"{res['arm']} {res['workload']} {res['kind']} {res.get('offered', '')}"})
        self.save()


def insert_ok(r):
    """The load generator achieved >= 95% of the offered rate (pgbench's tps excludes its connection setup)."""
    wl = WORKLOADS[r["workload"]]
    achieved = max(r["achieved_insert_rate"], r.get("pgbench_tps", 0) * wl.rows_per_tx)
    return achieved >= 0.95 * r["offered"]


def per_1k(res, events):
    """CPU-seconds per 1,000 events of each metered component (from the cell's cpu_<name>_s)."""
    if events:
        for name, key in (("arm", "arm_cpu_s_per_1k"), ("postgres", "pg_cpu_s_per_1k"),
                          ("pg_arm", "pg_arm_cpu_s_per_1k"), ("pg_walsender", "pg_walsender_cpu_s_per_1k"),
                          ("kafka", "kafka_cpu_s_per_1k")):
            if res.get(f"cpu_{name}_s") is not None:
                res[key] = 1000 * res[f"cpu_{name}_s"] / events
    return res


def drain_span(chk):
    """A drain's rate on the broker's clock: messages / (last - first LogAppendTime)."""
    ap = chk["_append_ms"]
    span = (ap.max() - ap.min()) / 1000.0 if len(ap) > 1 else 0
    return {"drain_span_s": span, "drain_rate": (len(ap) - 1) / span if span else None}


def nice_rate(x):
    """A bisection midpoint rounded to a readable rate."""
    q = 250 if x >= 2000 else 50 if x >= 200 else 10
    return int(round(x / q) * q)


def warm_up(producer):
    """Connect and get the idempotent producer id before timing anything."""
    warm = "bench.warmup"
    producer.produce(warm, b"warm-up")
    producer.flush(60)


def backlog_slope(samples):
    """Backlog growth (events/s) over the second half of the load, from inserted - delivered."""
    pts = [(s["t"], s["inserted"] - s["delivered"]) for s in samples
           if "inserted" in s and s.get("delivered") is not None]
    if len(pts) < 4:
        return None
    pts = pts[len(pts) // 2:]
    t = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    if t.max() - t.min() <= 0:
        return None
    return float(np.polyfit(t, y, 1)[0])


# ---------------------------------------------------------------------------------------------
# The plan

def estimate(m, arms, dbz):
    """Seconds the plan below should take on a quiet machine (from timed runs: a step costs its
    load plus ~4 s of set-up and checking; a ladder is about 4 coarse steps plus the bisections)."""
    want = lambda name: not arms or name in arms  # noqa: E731
    step, quiet_step = m.step_seconds + 4, m.step_seconds + 2
    ladder = min(4, len(m.ladder)) + m.bisections
    drain = 5 + m.drain_rows / 10000  # pre-load, drain, read back
    t = 20
    full = m.name == "full"
    if want("kafka-only"):
        t += 4 * (10 + m.drain_rows / 40000) + (4 if full else 2) * step
    for name, relay_arm in (("db-limit-claim", "relay"), ("db-limit-delete", "relay-delete")):
        if want(name) or want(relay_arm):
            t += (2 if full or name == "db-limit-claim" else 1) * drain
    if want("db-only"):
        t += len(m.workloads) * (ladder + 1) * quiet_step
    if want("relay"):
        t += 15 + len(m.workloads) * ladder * step + 3 * drain + m.soak_seconds + 20
    if want("relay-delete"):
        t += 15 + 2 * ladder * step + (2 if full else 1) * drain
    if want("relay-log"):
        t += 30 + 2 * ladder * step + 1.5 * drain + 20
    if want("relay-eos"):
        t += 15 + ladder * step + drain
    if want("relay-log-eos"):
        t += 30 + ladder * step + drain + 20
    if want("naive"):
        t += ladder * step + m.naive_drain_seconds + 20
    if dbz and (want("debezium-defaults") or want("debezium-tuned")):
        t += 4 * quiet_step
        t += sum(60 + 2 * ladder * (step + 2) + drain + 40 for a in ("debezium-defaults", "debezium-tuned") if want(a))
    return t


def plan(h, arms_filter):
    m = h.mode
    want = lambda name: not arms_filter or name in arms_filter  # noqa: E731
    wls = [WORKLOADS[w] for w in m.workloads]
    main = WORKLOADS[MAIN]
    big = WORKLOADS["1x1KB"]
    # Second workload for the side-by-side cells: 10 rows/tx lets the database insert several
    # times more events/s than 1 row/tx on this machine, so the arms (not the inserts) are the limit.
    side = [main] + ([WORKLOADS["10x200B"]] if "10x200B" in m.workloads else [])
    soak_wl = WORKLOADS["10x200B"] if "10x200B" in m.workloads else main
    ceilings = {}
    errors = []

    def guarded(what, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - one broken cell must not lose the others
            log(f"!! {what} failed: {e}")
            errors.append(f"{what}: {e}")
            h.record({"arm": what.split()[0], "workload": "-", "kind": "error", "error": str(e)})
            return None

    if arms_filter and "relay-nonotify" in arms_filter:
        # Supplementary experiment: the same ladder with the NOTIFY trigger dropped, against an
        # insert-only baseline on the same trigger-less table.
        env = dict(os.environ, OUTBOX_RELAY_DATABASE_URL=url("bench_relay"))
        subprocess.run([h.relay_bin, "migrate", "--notify-trigger", "false"], env=env, check=True, stdout=subprocess.DEVNULL)
        try:
            side_wl = WORKLOADS["10x200B"]
            nn = DbOnly(h, "relay")
            nn.name, nn.label = "db-only-nonotify", "load generator alone, relay's table without the NOTIFY trigger"
            guarded("db-only-nonotify ladder", h.ladder, nn, side_wl)
            rp = RelayNoNotify(h)
            try:
                guarded("relay-nonotify warm-up", h.warm, rp)
                guarded("relay-nonotify ladder", h.ladder, rp, side_wl)
            finally:
                rp.stop()
            if "relay" in arms_filter:
                r = Relay(h)
                try:
                    subprocess.run([h.relay_bin, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
                    guarded("relay warm-up", h.warm, r)
                    guarded("relay ladder 10x200B", h.ladder, r, side_wl)
                    d = DbOnly(h, "relay")
                    guarded("db-only ladder 10x200B", h.ladder, d, side_wl)
                finally:
                    r.stop()
        finally:
            subprocess.run([h.relay_bin, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        h.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        h.meta["loadavg_end"] = os.getloadavg()
        h.meta["errors"] = errors
        h.save()
        return errors
    if want("kafka-only"):
        for wl in (main, big):
            guarded("kafka-only ceiling", h.kafka_ceiling, wl, m.drain_rows)
        for rate in (1000, 5000) if m.name == "full" else (200,):
            guarded("kafka-only latency", h.kafka_latency, main, rate, m.step_seconds)
            if m.name == "full":
                guarded("kafka-only-loaded latency", h.kafka_latency, main, rate, m.step_seconds, loaded=True)
    if want("kafka-only-bare") or want("kafka-only"):
        guarded("kafka-only-bare ceiling", h.kafka_ceiling, main, m.drain_rows, headers=False)
    if want("kafka-only-py") or want("kafka-only"):
        guarded("kafka-only-py ceiling", h.kafka_ceiling_py, main, m.drain_rows)
    # The database's limit of each read mode (no Kafka), for the relay arm of that mode: from a
    # backlog nobody analyzed (the drains' case), and after ANALYZE (in smoke, claim mode only).
    # (Log mode's, db-limit-log, is measured on the relay-log drain's own backlog: Harness.drain.)
    for name, relay_arm, mode, on_publish in (("db-limit-claim", "relay", "claim", "mark"),
                                              ("db-limit-delete", "relay-delete", "claim", "delete")):
        if not (want(name) or want(relay_arm)):
            continue
        for analyzed in (False, True) if m.name == "full" or name == "db-limit-claim" else (False,):
            guarded(f"{name} {'drain-analyzed' if analyzed else 'drain'}", h.db_limit, mode, on_publish, main,
                    m.drain_rows, analyzed)
    if want("db-only"):
        # The application without the relay: the relay's table without the NOTIFY trigger that
        # `migrate` installs (the trigger is part of enabling the relay, so the relay arm pays it).
        h.notify_trigger(False)
        try:
            db = DbOnly(h, "relay")
            for wl in wls:
                ceilings[wl.name] = guarded(f"db-only ladder {wl.name}", h.ladder, db, wl)
        finally:
            h.notify_trigger(True)
    if want("relay"):
        relay = Relay(h)
        try:
            guarded("relay warm-up", h.warm, relay)
            guarded("relay ladder", h.ladder, relay, main, cap=ceilings.get(main.name))
            for wl in (main, big):
                guarded(f"relay drain {wl.name}", h.drain, relay, wl, m.drain_rows)
            guarded(f"relay drain-analyzed {main.name}", h.drain, relay, main, m.drain_rows, analyzed=True)
            for wl in wls:
                if wl.name != main.name:
                    guarded(f"relay ladder {wl.name}", h.ladder, relay, wl, cap=ceilings.get(wl.name))
            guarded("relay soak", h.step, relay, soak_wl, m.soak_rate, m.soak_seconds, "soak")
        finally:
            relay.stop()
    if want("relay-eos"):
        re_ = RelayEos(h)
        try:
            guarded("relay-eos warm-up", h.warm, re_)
            guarded("relay-eos ladder", h.ladder, re_, main, cap=ceilings.get(main.name))
            guarded("relay-eos drain", h.drain, re_, main, m.drain_rows)
        finally:
            re_.stop()
    if want("relay-delete"):
        rd = RelayDelete(h)
        try:
            guarded("relay-delete warm-up", h.warm, rd)
            for wl in side:
                guarded(f"relay-delete ladder {wl.name}", h.ladder, rd, wl, cap=ceilings.get(wl.name))
            guarded("relay-delete drain", h.drain, rd, main, m.drain_rows)
            if m.name == "full":
                guarded("relay-delete drain-analyzed", h.drain, rd, main, m.drain_rows, analyzed=True)
        finally:
            rd.stop()
    if want("relay-log") or want("relay-log-eos"):
        # No drain-analyzed cell (the stream reads the WAL, never the table: planner statistics
        # play no part) and no soak (it watches the dead tuples of per-row writes; log mode
        # writes nothing per row).
        rl, rle = RelayLog(h), RelayLogEos(h)
        try:
            # An empty table first: the first start in log mode publishes every row it finds
            # unmarked (the hand-over from the mode before), and rows left by earlier arms name
            # deleted topics.
            h.pg.reset_table(RELAY_TABLE)
            if guarded("relay-log migrate", h.log_mode):
                if want("relay-log"):
                    guarded("relay-log warm-up", h.warm, rl)
                    for wl in side:
                        guarded(f"relay-log ladder {wl.name}", h.ladder, rl, wl, cap=ceilings.get(wl.name))
                    guarded("relay-log drain", h.drain, rl, main, m.drain_rows)
                    rl.stop()
                if want("relay-log-eos"):
                    rle.dirty = rl.dirty  # the same slot
                    guarded("relay-log-eos warm-up", h.warm, rle)
                    guarded("relay-log-eos ladder", h.ladder, rle, main, cap=ceilings.get(main.name))
                    guarded("relay-log-eos drain", h.drain, rle, main, m.drain_rows)
        finally:
            rl.stop()
            rle.stop()
            guarded("relay-log leave log mode", h.leave_log_mode)
    if want("naive"):
        naive = Naive(h)
        try:
            guarded("naive ladder", h.ladder, naive, main, m.naive_ladder, cap=ceilings.get(main.name))
            guarded("naive drain", h.drain, naive, main, min(m.drain_rows, 50000), m.naive_drain_seconds)
        finally:
            naive.stop()
    if want("db-only-dbz") or (h.dbz_home and (want("debezium-defaults") or want("debezium-tuned"))):
        # The Debezium-style table alone at the latency points: the app-only WAL baseline of the
        # Debezium cells. (Its insert ceiling is not a target; a Debezium step the database could
        # not offer is marked limited by the insert rate, like every arm's.)
        dbo = DbOnly(h, "dbz")
        for wl in side:
            for rate in m.ladder[:2]:
                guarded(f"db-only-dbz step {wl.name}", h.step, dbo, wl, rate, m.step_seconds)
    if h.dbz_home and (want("debezium-defaults") or want("debezium-tuned")):
        for tuned in (False, True):
            d = Debezium(h, tuned)
            if not want(d.name):
                continue
            try:
                d.fresh()
                for wl in side:
                    # A fresh, warmed-up start only when a step left a backlog in the slot (its rows
                    # name deleted topics); otherwise the server keeps running between ladders.
                    if d.dirty or not d.running():
                        d.fresh()
                        guarded(f"{d.name} warm-up", h.warm, d)
                    guarded(f"{d.name} ladder {wl.name}", h.ladder, d, wl)
                guarded(f"{d.name} drain", h.drain, d, main, m.drain_rows)
            finally:
                d.stop()
                guarded("drop slot", h.pg.drop_slot)
    elif not h.dbz_home and not (arms_filter and not (want("debezium-defaults") or want("debezium-tuned"))):
        h.skipped.append(("debezium-defaults, debezium-tuned", h.dbz_reason))
    h.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    h.meta["loadavg_end"] = os.getloadavg()
    h.meta["errors"] = errors
    h.save()
    return errors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("full", "smoke"), default="smoke")
    ap.add_argument("--relay-bin", default=os.path.join(ROOT, "target", "release", "outbox-relay"))
    ap.add_argument("--debezium-home", default=None, help="unpacked debezium-server directory (omit: skip Debezium)")
    ap.add_argument("--debezium-java-home", default=None)
    ap.add_argument("--debezium-version", default="?")
    ap.add_argument("--debezium-skip-reason", default=None, help="why Debezium is not run (written into the report)")
    ap.add_argument("--arms", default=os.environ.get("BENCH_ARMS", ""), help="comma-separated subset of arms")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    import report  # noqa: PLC0415 - bench/report.py, beside this file
    outdir = os.path.join(ROOT, "bench", "results", os.environ.get("BENCH_OUT", args.mode))
    if args.report_only:
        report.write(outdir, args.mode)
        return 0
    if args.mode == "full" and relay_settings() != "defaults" and not os.environ.get("BENCH_OUT"):
        # A tuning experiment must not write BENCHMARKS.md (its report names the settings).
        sys.exit(f"bench.py: error: {relay_settings()} is set: a run with settings other than "
                 "the relay's defaults needs BENCH_OUT")
    # An interrupted run (Ctrl-C, SIGTERM from make or CI) stops the arms it started: they run in
    # their own sessions, and a relay or Debezium left behind would skew the next run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    atexit.register(stop_live)
    stop_strays()
    arms = [a for a in args.arms.split(",") if a]
    log(f"expected duration: about {estimate(mode_config(args.mode), arms, bool(args.debezium_home)) / 60:.0f} min "
        f"(the machine's load stretches it)")
    h = Harness(args)
    errors = plan(h, arms)
    report.write(outdir, args.mode)
    if errors:
        log(f"{len(errors)} cell(s) failed: " + "; ".join(errors))
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
