"""Turns bench/results/<mode>/results.json into PNG plots and a Markdown report:
BENCHMARKS.md for the full mode (keeping its hand-written notes block), SMOKE.md beside the
smoke results. Numbers only from the one run in results.json: ratios compare arms of that run."""
import json
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"
ARM_ORDER = ["db-only", "db-only-dbz", "db-only-nonotify", "kafka-only", "kafka-only-loaded", "kafka-only-bare", "kafka-only-py", "db-limit-claim", "db-limit-delete",
             "db-limit-log", "relay", "relay-eos", "relay-delete", "relay-log", "relay-log-eos", "relay-nonotify", "naive",
             "debezium-defaults", "debezium-tuned"]
COLORS = {"relay": "tab:blue", "relay-eos": "royalblue", "relay-delete": "tab:pink", "relay-log": "teal", "relay-log-eos": "darkcyan", "relay-nonotify": "tab:cyan", "db-only-nonotify": "tab:brown", "naive": "tab:gray", "debezium-defaults": "tab:red", "debezium-tuned": "tab:orange",
          "db-only": "tab:green", "db-only-dbz": "tab:olive", "kafka-only": "tab:purple", "kafka-only-py": "tab:purple", "kafka-only-bare": "tab:purple",
          "kafka-only-loaded": "mediumpurple",
          "db-limit-claim": "navy", "db-limit-delete": "purple", "db-limit-log": "darkcyan"}
# Each relay arm's two limits: the database's for its read mode (examples/db_limit.rs; log mode's:
# pg_recvlogical streaming the same backlog from a copy of the slot) and Kafka's producer-only
# ceiling (examples/kafka_ceiling.rs, arm kafka-only).
DB_LIMIT = {"relay": "db-limit-claim", "relay-eos": "db-limit-claim", "relay-delete": "db-limit-delete",
            "relay-log": "db-limit-log", "relay-log-eos": "db-limit-log"}
# Every relay arm, in report order.
RELAY_ARMS = ["relay", "relay-eos", "relay-delete", "relay-log", "relay-log-eos"]


def fmt(v, d=0, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "-"
    if isinstance(v, (int, float)):
        s = f"{v:,.{d}f}"
        return s + unit
    return str(v)


def arm_key(r):
    return ARM_ORDER.index(r["arm"]) if r["arm"] in ARM_ORDER else 99


def write(outdir, mode):
    with open(os.path.join(outdir, "results.json")) as f:
        data = json.load(f)
    meta, res = data["meta"], data["results"]
    if mode == "full" and os.path.basename(outdir) == "full":
        target = os.path.join(ROOT, "BENCHMARKS.md")
    else:
        target = os.path.join(outdir, "SMOKE.md" if mode == "smoke" else "REPORT.md")
    plots = {k: os.path.relpath(os.path.join(ROOT, v), os.path.dirname(target)) for k, v in make_plots(outdir, res).items()}
    md = render(meta, res, plots, outdir, mode)
    notes = ""
    if os.path.exists(target):
        old = open(target).read()
        m = re.search(re.escape(NOTES_BEGIN) + r"(.*?)" + re.escape(NOTES_END), old, re.S)
        notes = m.group(1) if m else ""
    md = md.replace(f"{NOTES_BEGIN}{NOTES_END}", f"{NOTES_BEGIN}{notes or chr(10)}{NOTES_END}")
    with open(target, "w") as f:
        f.write(md)
    print(f"report: {os.path.relpath(target, ROOT)}")


def steps(res, arm=None, wl=None, kind="step"):
    return [r for r in res if r.get("kind") == kind and (arm is None or r["arm"] == arm)
            and (wl is None or r["workload"] == wl)]


def sustained(res, arm, wl):
    for r in res:
        if r.get("kind") == "sustained" and r["arm"] == arm and r["workload"] == wl:
            return r.get("sustained_rate")
    return None


def at_rate(res, arm, wl, rate):
    for r in steps(res, arm, wl):
        if r.get("offered") == rate:
            return r
    return None


def drain(res, arm, wl, kind="drain"):
    for r in res:
        if r.get("kind") == kind and r["arm"] == arm and r["workload"] == wl:
            return r
    return None


def rate_of(r):
    return r.get("drain_rate") if r else None


def limit(res, ra, wl, kind):
    """The lower of a relay arm's two limits for a 200 B workload: (events/s, which), or (None, why).
    `kind`: the database limit measured the same way (drain: no statistics; drain-analyzed)."""
    db = rate_of(drain(res, DB_LIMIT.get(ra), "1x200B", kind))
    kafka = rate_of(drain(res, "kafka-only", "1x200B"))
    if not (db and kafka):
        return None, "not measured in this run"
    return (db, f"{DB_LIMIT[ra]}, {kind}") if db <= kafka else (kafka, "kafka-only")


def wal_above(res, r):
    """WAL per event above the app-only baseline: minus the db-only arm's (db-only-dbz for
    Debezium) at the same workload and rate; None without a baseline."""
    base = at_rate(res, "db-only-dbz" if r["arm"].startswith("debezium") else "db-only", r["workload"], r["offered"])
    if base and base.get("wal_bytes_per_event") and r.get("wal_bytes_per_event") and not r["arm"].startswith("db-only"):
        return r["wal_bytes_per_event"] - base["wal_bytes_per_event"]
    return None


def log_targets(res, w, rd, main):
    """relay-log's own targets (issue #15): p99 within 5 ms of the producer alone at the same rate,
    drain >= 2x Debezium-tuned's, WAL above the app's own < 5 B/event, its PostgreSQL CPU reported."""
    ra = "relay-log"
    for rate in sorted({r["offered"] for r in steps(res, ra, main)} & {r["offered"] for r in steps(res, "kafka-only", main)}):
        rr, kr = at_rate(res, ra, main, rate), at_rate(res, "kafka-only", main, rate)
        if rr.get("lat_p99_ms") is not None and kr.get("lat_p99_ms") is not None:
            d = rr["lat_p99_ms"] - kr["lat_p99_ms"]
            w(f"| [{ra}] p99 at {rate:,}/s ({main}) within 5 ms of the producer-only arm's p99 | relay {fmt(rr['lat_p99_ms'], 1)} ms "
              f"vs kafka-only {fmt(kr['lat_p99_ms'], 1)} ms ({'+' if d >= 0 else '-'}{fmt(abs(d), 1)} ms) | {verdict(d <= 5)} |")
            lr = at_rate(res, "kafka-only-loaded", main, rate)
            if lr and lr.get("lat_p99_ms") is not None:
                d = rr["lat_p99_ms"] - lr["lat_p99_ms"]
                w(f"| [{ra}] (context, not a target) the same beside the same insert load | relay {fmt(rr['lat_p99_ms'], 1)} ms "
                  f"vs kafka-only-loaded {fmt(lr['lat_p99_ms'], 1)} ms ({'+' if d >= 0 else '-'}{fmt(abs(d), 1)} ms; machine "
                  f"{fmt(lr.get('machine_busy_pct'), 0)}% busy) | - |")
    dt = drain(res, "debezium-tuned", main)
    if rd and rate_of(dt):
        w(f"| [{ra}] drain >= 2x debezium-tuned's drain (200 B) | relay {fmt(rate_of(rd))} vs {fmt(rate_of(dt))} events/s "
          f"({fmt((rate_of(rd) or 0) / rate_of(dt), 1)}x) | {verdict((rate_of(rd) or 0) >= 2 * rate_of(dt))} |")
    elif rd:
        w(f"| [{ra}] drain >= 2x debezium-tuned's drain (200 B) | debezium-tuned's drain is not in this run | n/a |")
    if rd:
        w(f"| [{ra}] drain: where the time goes (walsender, relay, broker) | walsender {fmt(rd.get('pg_walsender_cpu_s_per_1k'), 3)}, "
          f"relay {fmt(rd.get('arm_cpu_s_per_1k'), 3)}, broker {fmt(rd.get('kafka_cpu_s_per_1k'), 3)} CPU-s/1k events "
          "(table under the backlog drain) | reported |")
    # WAL: the relay's own statements' (pg_stat_statements wal_bytes, exact), and all the server's
    # WAL minus the app-only baseline's (the report's usual figure, which also carries each cell's
    # checkpoint full-page images). The verdict is on the first when the run has it.
    cells = [r for r in steps(res, ra) if wal_above(res, r) is not None or r.get("arm_wal_bytes_per_event") is not None]
    if any(r["offered"] in (1000, 5000) for r in cells):
        cells = [r for r in cells if r["offered"] in (1000, 5000)]
    if cells:
        cells.sort(key=lambda r: (r["workload"] != main, r["workload"], r["offered"]))
        own = [r.get("arm_wal_bytes_per_event") for r in cells]
        above = [wal_above(res, r) for r in cells]
        judged = own if None not in own else above if None not in above else None
        at = lambda r: f"{r['workload']} at {fmt(r['offered'])}/s"  # noqa: E731
        w(f"| [{ra}] WAL written by the relay per event (above the application's own) < 5 B | "
          + (("its statements (pg_stat_statements): " + ", ".join(f"{at(r)} {fmt(v, 1)} B" for r, v in zip(cells, own))
              + "; ") if None not in own else "")
          + "all WAL minus the app-only baseline: " + ", ".join(f"{at(r)} {fmt(v, 1)} B" for r, v in zip(cells, above))
          + f" | {verdict(None if judged is None else max(judged) < 5)} |")
    pg = [r for r in steps(res, ra, main) if r["offered"] in (1000, 5000) and r.get("pg_arm_cpu_s_per_1k") is not None]
    if pg or (rd and rd.get("pg_arm_cpu_s_per_1k") is not None):
        w(f"| [{ra}] PostgreSQL CPU per event for the relay's own work (its sessions and walsender) | "
          + "; ".join([f"{main} at {fmt(r['offered'])}/s: {fmt(r['pg_arm_cpu_s_per_1k'], 3)} (walsender "
                       f"{fmt(r.get('pg_walsender_cpu_s_per_1k'), 3)})" for r in sorted(pg, key=lambda r: r["offered"])]
                      + ([f"drain: {fmt(rd['pg_arm_cpu_s_per_1k'], 3)} (walsender {fmt(rd.get('pg_walsender_cpu_s_per_1k'), 3)})"]
                         if rd and rd.get("pg_arm_cpu_s_per_1k") is not None else []))
          + " CPU-s/1k events | reported |")


def log_drain_profile(res, w):
    """Where relay-log's drain time goes: each component's CPU over the cell (start to last
    message) against the wall time, beside the Debezium drains of the same backlog (both stream
    it from a slot through pgoutput)."""
    rows = [r for r in res if r.get("kind") == "drain" and r["arm"] in ("relay-log", "debezium-defaults", "debezium-tuned")
            and r.get("wall_s")]
    if not any(r["arm"] == "relay-log" for r in rows):
        return
    w("Where the time of a drain from a slot goes: CPU-seconds of each component over the cell (from the start to the "
      "last message), per 1,000 events and as a share of the cell's wall time (100% = one core busy throughout; the "
      "walsender is one process, so near 100% it is the bottleneck). The walsender decodes the slot's WAL into "
      "pgoutput messages; the arm's other PostgreSQL sessions are its connections besides the walsender (the relay's: "
      "lease, heartbeat, checks). The drain's rate is in the table above, the relay's own phases in the profile below.\n")
    w("| arm | workload | events | wall s | slot WAL at start MiB | walsender CPU-s/1k (% of wall) | arm process (% of wall) | "
      "arm's other PG sessions (% of wall) | broker (% of wall) | all PostgreSQL (% of wall) | machine busy % |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|")

    def part(r, secs):
        n, wall = r.get("events") or r.get("delivered_unique"), r["wall_s"]
        if secs is None or not n:
            return "-"
        return f"{fmt(1000 * secs / n, 3)} ({fmt(100 * secs / wall, 0)}%)"

    for r in sorted(rows, key=lambda r: (r["workload"], arm_key(r))):
        ws, pa = r.get("cpu_pg_walsender_s"), r.get("cpu_pg_arm_s")
        other = pa - ws if pa is not None and ws is not None else None
        slot = r.get("slot_wal_at_start")
        w(f"| {r['arm']} | {r['workload']} | {fmt(r.get('events'))} | {fmt(r['wall_s'], 1)} | "
          f"{fmt(slot / 2**20 if slot is not None else None, 1)} | {part(r, ws)} | {part(r, r.get('cpu_arm_s'))} | "
          f"{part(r, other)} | {part(r, r.get('cpu_kafka_s'))} | {part(r, r.get('cpu_postgres_s'))} | "
          f"{fmt(r.get('machine_busy_pct'), 0)} |")
    w("")


def pct(a, b):
    return f"{fmt(100 * a / b, 0)}%" if a and b else "-"


def make_plots(outdir, res):
    out = {}
    # Latency against offered rate (every step of every ladder, main workload).
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm in ARM_ORDER:
        pts = sorted((r["offered"], r.get("lat_p50_ms"), r.get("lat_p99_ms")) for r in steps(res, arm, "1x200B")
                     if r.get("lat_p99_ms") is not None)
        if pts:
            x = [p[0] for p in pts]
            ax.plot(x, [p[2] for p in pts], "o-", color=COLORS.get(arm), label=f"{arm} p99")
            ax.plot(x, [p[1] for p in pts], "x--", color=COLORS.get(arm), alpha=0.6, label=f"{arm} p50")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (events/s), 1 row/tx, 200 B")
    ax.set_ylabel("commit -> LogAppendTime (ms)")
    ax.set_title("Latency against offered rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    out["latency"] = save(fig, outdir, "latency_vs_rate.png")
    # Drain over time.
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in res:
        if r.get("kind") in ("drain", "drain-analyzed") and r.get("samples"):
            s = [x for x in r["samples"] if x.get("delivered") is not None]
            if not s:
                continue
            ax.plot([x["t"] for x in s], [x["delivered"] for x in s], color=COLORS.get(r["arm"]),
                    linestyle=":" if r["kind"] == "drain-analyzed" else "-" if "200B" in r["workload"] else "--",
                    label=f"{r['arm']} {r['workload']}" + (" (analyzed)" if r["kind"] == "drain-analyzed" else ""))
    ax.set_xlabel("seconds since the arm started (backlog pre-loaded; dotted: after ANALYZE)")
    ax.set_ylabel("messages in Kafka")
    ax.set_title("Backlog drain")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    out["drain"] = save(fig, outdir, "drain.png")
    # RSS over time (drains and the soak).
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in res:
        if r.get("kind") in ("drain", "soak") and r.get("samples"):
            s = [x for x in r["samples"] if x.get("VmRSS")]
            if s:
                ax.plot([x["t"] for x in s], [x["VmRSS"] for x in s], color=COLORS.get(r["arm"]),
                        linestyle="-" if r["kind"] == "drain" else ":", label=f"{r['arm']} {r['kind']} {r['workload']}")
    ax.set_yscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Resident memory of each arm")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    out["rss"] = save(fig, outdir, "rss.png")
    # Soak: dead tuples and table size, per arm.
    soak = [r for r in res if r.get("kind") == "soak" and r.get("samples")]
    if soak:
        fig, ax = plt.subplots(figsize=(8, 5))
        ax2 = ax.twinx()
        for r in soak:
            s = [x for x in r["samples"] if "dead" in x]
            c = COLORS.get(r["arm"])
            ax.plot([x["t"] for x in s], [x["dead"] for x in s], color=c, linestyle=":", label=f"{r['arm']} n_dead_tup")
            ax2.plot([x["t"] for x in s], [x["table_bytes"] / 2**20 for x in s], color=c, label=f"{r['arm']} size (MiB)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("dead tuples (dotted)")
        ax2.set_ylabel("table + indexes, MiB (solid)")
        ax.set_title(f"Soak at {soak[0]['offered']}/s for {soak[0]['seconds']:.0f}s (retention 1h: no cleanup yet)")
        fig.legend(loc="upper left", fontsize=7)
        ax.grid(True, alpha=0.3)
        out["soak"] = save(fig, outdir, "soak.png")
    return out


def save(fig, outdir, name):
    path = os.path.join(outdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.relpath(path, ROOT)


def verdict(ok):
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def render(meta, res, plots, outdir, mode):
    L = []
    w = L.append
    arms_present = sorted({r["arm"] for r in res if r.get("kind") != "error"}, key=lambda a: ARM_ORDER.index(a) if a in ARM_ORDER else 99)
    has_log = "relay-log" in arms_present
    labels = {}
    for r in res:
        if r.get("label"):
            labels.setdefault(r["arm"], r["label"])
    w("# Benchmarks: outbox-relay side by side with its baselines and Debezium Server\n")
    w(f"Generated by `bench/report.py` from `{os.path.relpath(outdir, ROOT)}/results.json` "
      f"({meta['mode']} run, {meta['started']} to {meta.get('finished', '(unfinished)')}). "
      "Every number below comes from that one run; ratios compare arms measured in it. "
      f"The hand-written analysis is in the notes block at the end (kept across regenerations).\n")
    w("## Machine and software\n")
    w(f"- {meta['nproc']} cores ({meta['cpu']}), {meta['mem_gib']} GiB memory, Debian {meta['os']}, kernel {meta['kernel']}")
    loads = [t["loadavg"][0] for t in json.load(open(os.path.join(outdir, "results.json")))["timeline"]]
    w(f"- Load average (1 min) at start {meta['loadavg_start'][0]:.2f}, at end {fmt((meta.get('loadavg_end') or [None])[0], 2)}, "
      f"during the run min {fmt(min(loads) if loads else None, 2)} / median {fmt(sorted(loads)[len(loads)//2] if loads else None, 2)} "
      f"/ max {fmt(max(loads) if loads else None, 2)} (sampled after each cell: the arms, the load generator and the services count; "
      "whether anything else ran is said in the notes below; each cell's own load and machine-wide CPU busy % are in results.json)")
    w(f"- PostgreSQL {meta['postgres']} (scripts/pg.sh: wal_level=logical, track_commit_timestamp=on, pg_stat_statements, "
      f"default shared_buffers, fsync on, TLS on: clients use the default sslmode=prefer), Kafka {meta['kafka']} single node KRaft "
      f"(scripts/kafka.sh), topics 6 partitions, RF 1, message.timestamp.type=LogAppendTime")
    w(f"- outbox-relay {meta['relay_rev']}, `{meta['relay_bin']}`; load generator `pgbench` ({meta['pgbench']}); "
      f"harness Python {meta['python']}; Debezium: {meta.get('debezium') or 'not run'}"
      + (f" on Java 21 ({meta['debezium_java']})" if meta.get("debezium") else ""))
    w("")
    w("## Commands\n")
    w("```sh\nmake bench        # full: bench/run.sh full (about an hour, printed at its start); writes this file and bench/results/full/*.png\n"
      "make bench-smoke  # seconds per arm, tiny loads, no thresholds, no Debezium (CI)\n"
      "# knobs: BENCH_STEP_SECONDS, BENCH_SOAK_SECONDS, BENCH_SOAK_RATE, BENCH_DRAIN_ROWS, BENCH_LADDER=1000,5000,...,\n"
      "#        BENCH_BISECTIONS, BENCH_WORKLOADS=1x200B,..., BENCH_ARMS=relay,db-only,..., BENCH_DEBEZIUM=0, BENCH_KEEP_SERVICES=1\n"
      "# re-render the report and plots from results.json:\n"
      ".local/bench-venv/bin/python bench/bench.py --mode full --report-only\n```\n")
    w("## Method\n")
    w("- **Load**: `pgbench --rate` (open loop: a Poisson schedule of transaction start times that does not slow down when "
      "the database or relay lags), 40 client connections, `-M prepared`. One host-app transaction = one INSERT of 1 or 10 rows "
      "(autocommit). Keys over 1,000 aggregates; each key belongs to one client connection, so a key's writers are serialized "
      "(the README's ordering contract) and the per-key sequence written into the payload (`k=<key> s=<seq> xxxx...`, padded "
      "to 200 B or 1 KB) increases in commit order.")
    w("- **Arms**: " + "; ".join(f"`{a}`: {labels.get(a, '')}" for a in arms_present) + ".")
    w("- **Sustained throughput**: a search over offered rates, each step "
      f"{fmt(next((r['seconds'] for r in steps(res)), None))} s on a fresh topic and a truncated table; a step is sustained when "
      "the load generator achieved >= 95% of the offered rate, the backlog (committed rows not yet in Kafka) at the end of the "
      "load was <= 2 s of offered load, and did not grow over the second half of the step (slope < 5% of the rate). "
      "Coarse steps (1,000, 5,000, then doubling) run until one fails (a failing coarse step is run once more, and "
      "the second attempt counts: on a shared machine one hiccup would otherwise end a ladder, and cap every "
      "publishing arm at it), then bisections halve the gap between the highest "
      "sustained and the lowest failing rate; the sustained throughput is the highest sustained step. A publishing arm "
      "is not offered more than the insert-only ceiling of the same workload: that ceiling is its last coarse step.")
    w("- **Insert-only ceiling** (`db-only`): the load generator alone on the relay's table *without* the NOTIFY "
      "trigger that `outbox-relay migrate` installs (the app before the relay is enabled); the relay arm runs with the "
      "trigger, so its cost is the relay's."
      + (" `relay-log` runs without it, as log mode does (`migrate --read-mode log` drops it: the stream wakes the "
         "relay)." if has_log else ""))
    w("- **Latency**: from the row's true commit time (`pg_xact_commit_timestamp`; for the relay's table the harness adds a "
      "column `bench_xid xid8 DEFAULT pg_current_xact_id()` because the relay's UPDATE replaces `xmin`; the db-only baseline "
      "pays the same column) to the broker's LogAppendTime (millisecond resolution), for every event of the step at 1,000 "
      "and 5,000 events/s. For `kafka-only`, from the moment the message is handed to the producer (paced open-loop).")
    w("- **Drain**: N rows pre-loaded in 1,000-row transactions with the arm stopped, then the arm is started; rate = "
      "messages / (last - first LogAppendTime). The backlog has **no planner statistics**, as after an outage: the "
      "harness deletes the table's old ones (TRUNCATE keeps them) and holds autovacuum's analyze off for the cell "
      "(`autovacuum_analyze_threshold`; vacuum still runs), and checks nothing analyzed the table before the start "
      "(`column_stats_at_start`, `analyzes_during` in results.json). `drain-analyzed`: the same drain after `ANALYZE`, "
      "side by side. Debezium's slot is created before the pre-load (snapshot.mode=no_data), so it streams the backlog "
      "from WAL."
      + (" So does `relay-log`: its slot (`migrate --read-mode log`) stays while the relay is stopped, so the "
         "pre-load waits in the slot's WAL (the publication is `publish = 'insert'`: the TRUNCATE before it is not "
         "streamed); it has no `drain-analyzed` cell, as the stream never reads the table." if has_log else ""))
    w("- **Limits** (the relay's two ceilings): Kafka's producer-only ceiling is `examples/kafka_ceiling.rs`, a Rust "
      "librdkafka producer built from the relay's own producer properties (`kafka::client_config`: idempotence, acks=all, "
      "lz4, linger.ms, murmur2_random) with messages built as the relay builds them (`event::to_message`: the same "
      "headers), no batch barrier. A read mode's database limit is `examples/db_limit.rs`: the relay's reader and ledger "
      "(`ClaimReader`, `Ledger::record`) draining the same kind of pre-loaded backlog in 1,000-row "
      "batches with one progress write in flight beside the next read, as the relay loop does, with every row counted "
      "delivered at once (no Kafka). A relay is at its physical limit when it reaches the lower of the two."
      + (" Log mode's database limit (`db-limit-log`) is PostgreSQL's own C client, `pg_recvlogical`, streaming the "
         "`relay-log` drain's backlog from a copy of the relay's slot (same position, same pgoutput options: proto_version 1, "
         "binary, messages) to /dev/null: what the walsender can decode and send, no Kafka. It runs on the same backlog "
         "just before the relay's drain of it." if has_log else ""))
    w("- **Per event**: CPU-seconds of the arm's process (and of all PostgreSQL processes, and of the broker) from /proc over "
      "the cell including catch-up (the examples': the kernel's accounting at exit); peak RSS = VmHWM, reset at the start of the cell (clear_refs); page faults = the arm process's minor page faults over the cell "
      "(/proc/<pid>/stat: memory the kernel mapped in again); statements = "
      "pg_stat_statements calls by the arm's role (the walsender's replication protocol is not counted); WAL = "
      "pg_current_wal_lsn() difference, and above the app-only baseline = minus the db-only arm's WAL per event at the "
      "same workload and rate (same table layout)."
      + (" The arm's PostgreSQL CPU includes its walsender (`relay-log`, Debezium: decoding the WAL for its slot), "
         "also reported on its own." if has_log else ""))
    w("- **Checker** (every cell, every arm): the topic is read back in full; the payload's (key, seq) identifies an event; "
      "reported: missing (committed but not in Kafka), duplicates, per-key order violations of first occurrences, keys seen "
      "on two partitions.\n")

    # ---- targets
    main, side = "1x200B", "10x200B"
    kd = drain(res, "kafka-only", main)
    dbz_arms = [a for a in ("debezium-defaults", "debezium-tuned") if any(r["arm"] == a and r.get("kind") != "error" for r in res)]
    # ---- limits
    lim = [r for r in res if r["arm"] in ("kafka-only", "kafka-only-bare", "kafka-only-py") + tuple(DB_LIMIT.values())
           and r.get("kind") in ("drain", "drain-analyzed")]
    if lim:
        w("## Limits: Kafka's producer-only ceiling and each read mode's database limit\n")
        w("| limit | workload | statistics | events | events/s | arm CPU-s/1k | PG CPU-s/1k | Kafka CPU-s/1k | "
          "read mean / p99 ms | write mean / p99 ms | complete |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(lim, key=lambda r: (arm_key(r), r["workload"], r["kind"])):
            d = r.get("db_limit") or {}
            rd, wr = d.get("read") or {}, d.get("write") or {}
            stats = "-" if not r["arm"].startswith("db-limit") else ("analyzed" if r["kind"] == "drain-analyzed" else "none")
            w(f"| {r['arm']} | {r['workload']} | {stats} | {fmt(r.get('drained', r.get('delivered_unique')))} | "
              f"{fmt(r.get('drain_rate'))} | {fmt(r.get('arm_cpu_s_per_1k'), 3)} | {fmt(r.get('pg_cpu_s_per_1k'), 3)} | "
              f"{fmt(r.get('kafka_cpu_s_per_1k'), 3)} | "
              + (f"{fmt(rd.get('mean_ms'), 1)} / {fmt(rd.get('p99_ms'), 1)} | {fmt(wr.get('mean_ms'), 1)} / {fmt(wr.get('p99_ms'), 1)} | "
                 f"{'yes' if r.get('complete') else 'no (time cap)'} |" if d else "- | - | - |"))
        w("\nKafka's events/s are on the broker's clock (first to last LogAppendTime); a database limit's are rows read and "
          "recorded per second of its run. `kafka-only` sends the relay's messages, headers included: the ceiling a relay is "
          "held to. `kafka-only-bare` is the same producer without the relay's three headers (librdkafka allocates each "
          "header: their cost). `kafka-only-py` is the same load from Python confluent-kafka. Neither is used as a limit.\n")
        rows = []
        for ra in DB_LIMIT:
            if any(r["arm"] == ra for r in res):
                for kind in ("drain", "drain-analyzed"):
                    lo, which = limit(res, ra, "1x200B", kind)
                    db = rate_of(drain(res, DB_LIMIT[ra], "1x200B", kind))
                    if db:
                        stats = "- (the stream never reads the table)" if ra.startswith("relay-log") else "none" if kind == "drain" else "analyzed"
                        rows.append(f"| {ra} | {stats} | {fmt(db)} | "
                                    f"{fmt(rate_of(drain(res, 'kafka-only', '1x200B')))} | {fmt(lo)} ({which}) |")
        if rows:
            w("| relay arm | table statistics | its database limit | Kafka's ceiling | the lower |\n|---|---|---|---|---|")
            w("\n".join(rows) + "\n")

    w("## Targets\n")
    w("| target | measured | verdict |\n|---|---|---|")
    relay_arms = [a for a in RELAY_ARMS if any(r["arm"] == a and r.get("kind") != "error" for r in res)]
    for ra in relay_arms:
        rd = drain(res, ra, main)
        r1k = at_rate(res, ra, main, 1000)
        r5k = at_rate(res, ra, side, 5000) or at_rate(res, ra, main, 5000)
        peak_rss = max([r.get("peak_rss_mib") or 0 for r in res if r["arm"] == ra] or [0]) or None

        def cpu1k(arm):
            """Arm CPU per 1k events at the highest offered rate both it and the relay sustained (10x200B first)."""
            for wl in (side, main):
                for rate in sorted({r["offered"] for r in steps(res, arm, wl)}, reverse=True):
                    a, b = at_rate(res, arm, wl, rate), at_rate(res, ra, wl, rate)
                    if a and b and a.get("sustained") and b.get("sustained") and a.get("arm_cpu_s_per_1k") and b.get("arm_cpu_s_per_1k"):
                        return a["arm_cpu_s_per_1k"], b["arm_cpu_s_per_1k"], f"{wl} at {rate:,}/s"
            return None, None, None

        if rd:
            w(f"| [{ra}] backlog drain >= 50,000 events/s at 200 B | {fmt(rd.get('drain_rate'))} events/s | {verdict((rd.get('drain_rate') or 0) >= 50000)} |")
            if kd and kd.get("drain_rate"):
                w(f"| [{ra}] drain >= half of Kafka's producer-only ceiling (200 B) | {fmt(rd.get('drain_rate'))} vs ceiling {fmt(kd['drain_rate'])} "
                  f"({fmt(100 * (rd.get('drain_rate') or 0) / kd['drain_rate'], 0)}%) | {verdict((rd.get('drain_rate') or 0) >= kd['drain_rate'] / 2)} |")
        for wl in ("1x200B", "10x200B", "1x1KB", "10x1KB"):
            rs, ds = sustained(res, ra, wl), sustained(res, "db-only", wl)
            if rs is not None or ds is not None:
                ok = None if not ds else (rs or 0) >= 0.9 * ds
                w(f"| [{ra}] live >= 90% of the DB insert-only ceiling ({wl}) | relay {fmt(rs)} vs insert-only {fmt(ds)} events/s "
                  f"({fmt(100 * (rs or 0) / ds, 0) if ds else '-'}%) | {verdict(ok)} |")
        if r1k:
            w(f"| [{ra}] latency at 1k/s ({main}): p50 < 5 ms | {fmt(r1k.get('lat_p50_ms'), 1)} ms | {verdict((r1k.get('lat_p50_ms') or 1e9) < 5)} |")
            w(f"| [{ra}] latency at 1k/s ({main}): p99 < 25 ms | {fmt(r1k.get('lat_p99_ms'), 1)} ms | {verdict((r1k.get('lat_p99_ms') or 1e9) < 25)} |")
        if peak_rss:
            w(f"| [{ra}] peak RSS < 64 MB (max over its cells) | {fmt(peak_rss, 1)} MiB | {verdict(peak_rss * 1.048576 < 64)} |")
        if ra == "relay-log":
            log_targets(res, w, rd, main)
        for a in dbz_arms:
            dc, rc, where = cpu1k(a)
            w(f"| [{ra}] CPU per event >= 10x lower than {a} | relay {fmt(rc, 3)} vs {fmt(dc, 3)} CPU-s/1k events ({where or 'no common sustained step'}: "
              f"{fmt(dc / rc if rc and dc else None, 1)}x) | {verdict(None if not (rc and dc) else dc / rc >= 10)} |")
            for wl in (main, side):
                rs, ds = sustained(res, ra, wl), sustained(res, a, wl)
                if not steps(res, a, wl):
                    continue
                w(f"| [{ra}] >= 3x {a}'s sustained throughput ({wl}) | relay {fmt(rs)} vs {fmt(ds)} events/s "
                  f"({fmt(rs / ds if rs and ds else None, 1)}x) | {verdict(None if not (rs and ds) else rs >= 3 * ds)} |")
            for rate, wl in ((1000, main), (5000, side)):
                rr, dr = at_rate(res, ra, wl, rate), at_rate(res, a, wl, rate)
                if rr and dr and rr.get("lat_p99_ms") and dr.get("lat_p99_ms"):
                    w(f"| [{ra}] <= 1/10 of {a}'s p99 at {rate:,}/s ({wl}) | relay {fmt(rr['lat_p99_ms'], 1)} ms vs {fmt(dr['lat_p99_ms'], 1)} ms "
                      f"({fmt(dr['lat_p99_ms'] / rr['lat_p99_ms'], 1)}x) | {verdict(rr['lat_p99_ms'] * 10 <= dr['lat_p99_ms'])} |")
    if not dbz_arms:
        w("| Debezium comparisons (CPU 10x, throughput 3x, p99 1/10) | Debezium did not run in this run | n/a |")
    w("\nA step the load generator could not offer (the database's insert ceiling) is not a relay result: "
      "see the throughput table for which limit each ladder hit.\n")

    # ---- relay against its limits
    rows = []
    for ra in RELAY_ARMS:
        if not any(r["arm"] == ra and r.get("kind") != "error" for r in res):
            continue
        for kind in ("drain", "drain-analyzed"):
            rd = drain(res, ra, "1x200B", kind)
            if rd:
                lo, which = limit(res, ra, "1x200B", kind)
                how = "from the slot's WAL" if ra.startswith("relay-log") else "no statistics" if kind == "drain" else "analyzed"
                rows.append(f"| {ra} | {kind} 1x200B ({how}) | "
                            f"{fmt(rate_of(rd))} | {fmt(lo)} ({which}) | {pct(rate_of(rd), lo)} |")
        for wl in ("1x200B", "10x200B"):
            rs = sustained(res, ra, wl)
            if rs is None and not steps(res, ra, wl):
                continue
            lo, which = limit(res, ra, wl, "drain-analyzed")
            if lo is None:
                lo, which = limit(res, ra, wl, "drain")
            ins = sustained(res, "db-only", wl)
            rows.append(f"| {ra} | sustained live {wl} | {fmt(rs)} | {fmt(lo)} ({which}) | {pct(rs, lo)}"
                        + (f"; insert-only ceiling {fmt(ins)}: {pct(rs, ins)}" if ins else "") + " |")
    if rows:
        w("## The relay against its limits\n")
        w("Each relay result as a share of the lower of its two limits (the database's for its read mode, measured the "
          "same way: no statistics or analyzed; Kafka's producer-only ceiling). A live ladder is compared with the "
          "analyzed database limit (autovacuum analyzes a live table) and with the insert-only ceiling, which bounds "
          "any live rate."
          + "\n")
        w("| relay arm | cell | events/s | the lower limit (which) | share |\n|---|---|---|---|---|")
        w("\n".join(rows) + "\n")

    # ---- throughput per workload
    w("## Sustained throughput (events/s) per workload\n")
    wls = sorted({r["workload"] for r in res if r.get("kind") == "sustained"}, key=lambda x: ["1x200B", "10x200B", "1x1KB", "10x1KB"].index(x) if x in ["1x200B", "10x200B", "1x1KB", "10x1KB"] else 9)
    arms = [a for a in ARM_ORDER if any(r.get("kind") == "sustained" and r["arm"] == a for r in res)]
    w("| arm | " + " | ".join(wls) + " |\n|---|" + "---|" * len(wls))
    for a in arms:
        cells = []
        for wl in wls:
            s = sustained(res, a, wl)
            fail = [r for r in steps(res, a, wl) if not r.get("sustained")]
            note = ""
            if fail:
                f = fail[0]
                note = (f" (failed {fmt(f['offered'])}: inserted {fmt(f['achieved_insert_rate'])}/s"
                        + (f", backlog {fmt(f.get('backlog_at_load_end'))}" if f.get("backlog_at_load_end") is not None else "") + ")")
            elif any(r.get("kind") == "sustained" and r["arm"] == a and r["workload"] == wl and r.get("capped_at") for r in res):
                note = " (= the insert-only ceiling: not offered more)"
            elif steps(res, a, wl):
                note = " (top of the ladder)"
            cells.append(fmt(s) + note if steps(res, a, wl) else "-")
        w(f"| {a} | " + " | ".join(cells) + " |")
    for ra in RELAY_ARMS:
        if ra in arms and "db-only" in arms:
            w(f"| {ra} / db-only | " + " | ".join(
                (fmt(100 * (sustained(res, ra, wl) or 0) / sustained(res, "db-only", wl), 0) + "%")
                if sustained(res, "db-only", wl) and steps(res, ra, wl) else "-"
                for wl in wls) + " |")
    w("")

    # ---- latency
    w("## Latency, commit to LogAppendTime (ms)\n")
    w("| arm | workload | offered/s | achieved insert/s | p50 | p99 | p99.9 | max | samples | sustained |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted([r for r in res if r.get("kind") == "step" and r.get("offered") in (1000, 5000) and r.get("lat_p50_ms") is not None],
                    key=lambda r: (r["workload"] != main, r["workload"], r["offered"], arm_key(r))):
        w(f"| {r['arm']} | {r['workload']} | {fmt(r['offered'])} | {fmt(r.get('achieved_insert_rate'))} | {fmt(r['lat_p50_ms'], 1)} | "
          f"{fmt(r['lat_p99_ms'], 1)} | {fmt(r['lat_p999_ms'], 1)} | {fmt(r['lat_max_ms'], 0)} | {fmt(r['lat_samples'])} | "
          f"{'yes' if r.get('sustained') else 'no'} |")
    w(f"\n![latency against offered rate]({plots['latency']})\n")

    # ---- drain
    w("## Backlog drain\n")
    pairs = [(r, drain(res, r["arm"], r["workload"], "drain-analyzed")) for r in res
             if r.get("kind") == "drain" and drain(res, r["arm"], r["workload"], "drain-analyzed")]
    if pairs:
        w("The same backlog with no planner statistics (what an outage leaves) and after `ANALYZE`, side by side "
          "(events/s, broker clock; database limits: rows/s):\n")
        w("| arm | workload | rows | no statistics | analyzed | no statistics / analyzed |\n|---|---|---|---|---|---|")
        for u, a in sorted(pairs, key=lambda p: (p[0]["workload"], arm_key(p[0]))):
            w(f"| {u['arm']} | {u['workload']} | {fmt(u.get('rows'))} | {fmt(rate_of(u))} | {fmt(rate_of(a))} | "
              f"{pct(rate_of(u), rate_of(a))} |")
        w("")
    w("| arm | workload | statistics | rows | drained | rate (broker clock) events/s | rate incl. start (wall) | first message after s | "
      "arm CPU-s/1k | PG CPU-s/1k | arm's PG CPU-s/1k | Kafka CPU-s/1k | peak RSS MiB | missing | dup | order |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted([r for r in res if r.get("kind") in ("drain", "drain-analyzed")
                     and not r["arm"].startswith(("db-limit", "kafka-only"))],
                    key=lambda r: (r["workload"], arm_key(r), r["kind"])):
        stats = "analyzed" if r["kind"] == "drain-analyzed" else ("none" if r.get("analyzed") is False else "-")
        w(f"| {r['arm']} | {r['workload']} | {stats} | {fmt(r.get('rows'))} | {fmt(r.get('delivered_unique'))}"
          + (f" (stopped after {fmt(r['capped_s'])} s)" if r.get("capped_s") else "") +
          f" | {fmt(r.get('drain_rate'))} | {fmt(r.get('drain_rate_wall'))} | {fmt(r.get('first_message_after_s'), 1)} | "
          f"{fmt(r.get('arm_cpu_s_per_1k'), 3)} | {fmt(r.get('pg_cpu_s_per_1k'), 3)} | {fmt(r.get('pg_arm_cpu_s_per_1k'), 3)} | "
          f"{fmt(r.get('kafka_cpu_s_per_1k'), 3)} | {fmt(r.get('peak_rss_mib'), 1)} | {fmt(r.get('missing'))} | "
          f"{fmt(r.get('duplicates'))} | {fmt(r.get('order_violations'))} |")
    w("\nCPU per 1k events: the arm's process, all PostgreSQL processes, the arm's own backends, the broker. "
      "The limits' (database and Kafka alone) are in the limits table above.")
    w("\n`missing` in a capped (naive) drain counts rows still pending when it was stopped, not loss.\n")
    log_drain_profile(res, w)
    w(f"![drain over time]({plots['drain']})\n")

    # ---- resources
    w("## Cost per event (steps at 1,000 and 5,000 events/s)\n")
    sampled = any(r.get("pg_cpu_sampled") for r in res)
    w("PG CPU: " + ("all PostgreSQL processes (sampled every second, so the load generator's backends count); "
                    "'arm's PG' = the arm's own backends (its sessions, " + ("the walsender of Debezium and of relay-log)."
                                                                            if has_log else "Debezium's walsender).") if sampled else
                    "in this run the PostgreSQL processes alive at both ends of the cell: the arm's own connections "
                    "(and Debezium's walsender) plus background workers; the load generator's backends (connected "
                    "after the start snapshot) are not in it, so it approximates the database CPU spent serving the arm.") + "\n")
    w("| arm | workload | offered/s | arm CPU-s/1k ev | PG CPU-s/1k ev | arm's PG CPU-s/1k ev | Kafka CPU-s/1k ev | peak RSS MiB | arm page faults/event | arm stmts/event | "
      "WAL B/event | WAL above app-only B/event | machine busy % | load 1m |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted([r for r in res if r.get("kind") == "step" and r.get("offered") in (1000, 5000) and r["arm"] != "kafka-only-py"],
                    key=lambda r: (r["workload"] != main, r["workload"], r["offered"], arm_key(r))):
        base_arm = "db-only-dbz" if r["arm"].startswith("debezium") else "db-only"
        base = at_rate(res, base_arm, r["workload"], r["offered"])
        above = (r.get("wal_bytes_per_event") - base["wal_bytes_per_event"]) if base and base.get("wal_bytes_per_event") and r.get("wal_bytes_per_event") and not r["arm"].startswith("db-only") else None
        w(f"| {r['arm']} | {r['workload']} | {fmt(r['offered'])} | {fmt(r.get('arm_cpu_s_per_1k'), 3)} | {fmt(r.get('pg_cpu_s_per_1k'), 3)} | "
          f"{fmt(r.get('pg_arm_cpu_s_per_1k'), 3)} | {fmt(r.get('kafka_cpu_s_per_1k'), 3)} | {fmt(r.get('peak_rss_mib'), 1)} | "
          f"{fmt(r.get('arm_minor_faults_per_event'), 2)} | {fmt(r.get('arm_statements_per_event'), 3)} | "
          f"{fmt(r.get('wal_bytes_per_event'), 0)} | {fmt(above, 0)} | {fmt(r.get('machine_busy_pct'), 0)} | {fmt(r.get('loadavg_1m'), 2)} |")
    ws = [r for r in res if r.get("kind") == "step" and r["arm"] == "relay-log" and r.get("offered") in (1000, 5000)
          and r.get("pg_walsender_cpu_s_per_1k") is not None]
    if ws:
        w("\nOf relay-log's PG CPU, its walsender alone (decoding the WAL for its slot): " + ", ".join(
            f"{r['workload']} at {fmt(r['offered'])}/s {fmt(r['pg_walsender_cpu_s_per_1k'], 3)}"
            for r in sorted(ws, key=lambda r: (r["workload"] != main, r["workload"], r["offered"]))) + " CPU-s/1k events.")
    w(f"\n![RSS]({plots['rss']})\n")

    # ---- exactly-once beside at-least-once
    pairs = [(a, e) for a, e in (("relay", "relay-eos"), ("relay-log", "relay-log-eos"))
             if any(r["arm"] == e for r in res)]
    if pairs:
        w("## Exactly-once beside at-least-once\n")
        w("Same run, same workload (1x200B). Exactly-once: one batch in flight, each in a Kafka transaction with the "
          "relay's position; latency is to LogAppendTime (a read_committed consumer sees an event once its transaction "
          "commits, a few ms later); commit is the relay's outbox_relay_transaction_commit_seconds.\n")
        w("| arms | drain events/s (exactly-once / at-least-once) | 1k/s p50 / p99 ms | 5k/s p50 / p99 ms | commit mean ms (drain) |\n"
          "|---|---|---|---|---|")
        for a, e in pairs:
            da, de = rate_of(drain(res, a, "1x200B")), rate_of(drain(res, e, "1x200B"))
            ratio = f" ({fmt(de / da, 2)})" if da and de else ""

            def lat(arm, rate):
                r = at_rate(res, arm, "1x200B", rate) or {}
                return f"{fmt(r.get('lat_p50_ms'), 1)} / {fmt(r.get('lat_p99_ms'), 1)}"
            commit = ((drain(res, e, "1x200B") or {}).get("relay_profile") or {}).get("commit") or {}
            w(f"| {e} / {a} | {fmt(de)} / {fmt(da)}{ratio} | {lat(e, 1000)} vs {lat(a, 1000)} | "
              f"{lat(e, 5000)} vs {lat(a, 5000)} | {fmt(commit.get('mean_ms'), 1)} |")
        w("")

    # ---- soak
    soak = [r for r in res if r.get("kind") == "soak"]
    if soak:
        w("## Soak: dead tuples and table size over a run\n")
    for r in soak:
        s = [x for x in r.get("samples", []) if "dead" in x]
        w(f"{r['arm']} at {fmt(r['offered'])} events/s ({r['workload']}) for {fmt(r['seconds'])} s: achieved {fmt(r.get('achieved_insert_rate'))}/s, "
          f"p50 {fmt(r.get('lat_p50_ms'), 1)} ms, p99 {fmt(r.get('lat_p99_ms'), 1)} ms, p99.9 {fmt(r.get('lat_p999_ms'), 1)} ms, "
          f"missing {fmt(r.get('missing'))}, duplicates {fmt(r.get('duplicates'))}, order violations {fmt(r.get('order_violations'))}; "
          f"relay CPU {fmt(r.get('arm_cpu_s_per_1k'), 3)} s/1k events, peak RSS {fmt(r.get('peak_rss_mib'), 1)} MiB, "
          f"{fmt(r.get('arm_statements_per_event'), 3)} statements/event, WAL {fmt(r.get('wal_bytes_per_event'), 0)} B/event.")
        if s:
            w(f"Dead tuples: max {fmt(max(x['dead'] for x in s))}, at end {fmt(s[-1]['dead'])}; "
              f"table + indexes {fmt(s[0]['table_bytes'] / 2**20, 1)} -> {fmt(s[-1]['table_bytes'] / 2**20, 1)} MiB; "
              f"autovacuum runs {fmt(s[-1]['autovacuums'])}. (Retention 1 h: the built-in cleanup deletes nothing in a shorter run.)\n")
    if soak:
        if plots.get("soak"):
            w(f"![soak]({plots['soak']})\n")

    # ---- profile
    prof = [r for r in res if r.get("relay_profile") and r["arm"] in ("relay", "relay-log")]
    if prof:
        w("## Where the relay's time goes (outbox_relay_batch_phase_seconds, per cell)\n")
        w("| cell | batches | mean rows/batch | fetch mean ms (p99 <=) | publish mean ms (p99 <=) | mark mean ms (p99 <=) | "
          "busy % of wall (fetch/publish/mark) |\n|---|---|---|---|---|---|---|")
        for r in prof:
            p = r["relay_profile"]
            wall = r.get("wall_s") or ((r.get("seconds") or 0) + (r.get("catch_up_s") or 0))
            share = "/".join(fmt(100 * (p[ph]["seconds"] or 0) / wall, 0) if wall else "-" for ph in ("fetch", "publish", "mark"))
            cell = f"{r['arm']}: {r['kind']} {r['workload']} {fmt(r.get('offered') or r.get('rows'))}"
            w(f"| {cell} | {fmt(p['fetch']['batches'])} | {fmt(p.get('batch_rows_mean'), 0)} | "
              + " | ".join(f"{fmt(p[ph]['mean_ms'], 2)} ({fmt(p[ph]['p99_le_ms'], 1)})" for ph in ("fetch", "publish", "mark"))
              + f" | {share} |")
        w("")
        if any(r["arm"] == "relay-log" for r in prof):
            w("In log mode, fetch takes the events the stream task has decoded from the walsender (without waiting for "
              "more), publish is Kafka, and mark settles the slot's confirmed position in memory (no statement).\n")
        # Not in a drain: there it is the backlog's age.
        delays = [r for r in prof if r["relay_profile"].get("source_delay") and r["kind"] != "drain"]
        if delays:
            w("Log mode's source delay (outbox_relay_source_delay_seconds): from a transaction's commit timestamp to its "
              "arrival in the relay (the commit's WAL flush, the walsender's decoding and sending), beside the same "
              "events' end-to-end latency (commit to LogAppendTime). The rest is the relay and Kafka.\n")
            w("| cell | transactions | source delay mean ms | p50 <= ms | p99 <= ms | end to end p50 / p99 ms |\n"
              "|---|---|---|---|---|---|")
            for r in delays:
                s = r["relay_profile"]["source_delay"]
                cell = f"{r['arm']}: {r['kind']} {r['workload']} {fmt(r.get('offered') or r.get('rows'))}"
                w(f"| {cell} | {fmt(s['transactions'])} | {fmt(s['mean_ms'], 2)} | {fmt(s['p50_le_ms'], 1)} | "
                  f"{fmt(s['p99_le_ms'], 1)} | {fmt(r.get('lat_p50_ms'), 1)} / {fmt(r.get('lat_p99_ms'), 1)} |")
            w("")
        tops = [r for r in res if r["arm"] == "relay" and r.get("kind") == "drain" and r.get("top_statements")]
        if tops:
            w(f"Relay statements during the {tops[0]['workload']} drain (pg_stat_statements, by total time):\n")
            w("| statement | calls | mean ms | rows |\n|---|---|---|---|")
            for t in tops[0]["top_statements"]:
                w(f"| `{t['query'].replace('|', '/')}` | {fmt(t['calls'])} | {fmt(t['mean_ms'], 2)} | {fmt(t['rows'])} |")
            w("")

    # ---- correctness
    w("## Checker summary (every cell)\n")
    w("| arm | cells | events checked | missing after catch-up | duplicates | order violations | key on two partitions |\n|---|---|---|---|---|---|---|")
    for a in ARM_ORDER:
        rs = [r for r in res if r["arm"] == a and "expected" in r]
        if rs:
            w(f"| {a} | {len(rs)} | {fmt(sum(r['expected'] for r in rs))} | {fmt(sum(r['missing'] for r in rs))} | "
              f"{fmt(sum(r['duplicates'] for r in rs))} | {fmt(sum(r['order_violations'] for r in rs))} | "
              f"{fmt(sum(r.get('key_on_two_partitions', 0) for r in rs))} |")
    errs = [r for r in res if r.get("kind") == "error"]
    if errs or meta.get("errors"):
        w("\nCells that failed to run: " + "; ".join(meta.get("errors") or [e["error"] for e in errs]))
    w("\n## Arms that could not run\n")
    lines = [f"- **could not run**: {arms}: {why}" for arms, why in meta.get("skipped") or []]
    for a in ARM_ORDER:
        bad = [e["error"] for e in errs if e["arm"] == a]
        if bad and not any(r["arm"] == a and r.get("kind") not in ("error", "sustained") for r in res):
            lines.append(f"- **could not run**: {a}: {bad[0]}")
    w("\n".join(lines) if lines else "None: every arm of this run produced measurements.")
    w("\nMissing events in a step that was not sustained are rows still pending when the harness stopped waiting "
      "(the arm was behind), not loss: see `delivered_after_wait` in results.json.\n")
    w("## Notes\n")
    w(f"{NOTES_BEGIN}{NOTES_END}\n")
    return "\n".join(L) + "\n"
