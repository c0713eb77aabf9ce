//! `--read-mode log` end to end: the real relay binary reading a logical replication slot of
//! the real PostgreSQL (wal_level = logical, scripts/pg.sh), publishing to the real Kafka.
//!
//! Slots are cluster-wide and pin WAL until dropped, and a database with a slot cannot be
//! dropped: every test uses its own slot name and drops the slot when it passes.

mod common;

use std::time::{Duration, Instant};

use common::load::{self, Ledger, LoadSpec, Reading, Report, Shape};
use common::{create_topics, read_back, strs, unique, Relay, TestDb};

const PARTITIONS: i32 = 3;

/// A test database migrated for log mode, with its own slot and publication.
struct LogDb {
    db: TestDb,
    slot: String,
}

impl LogDb {
    async fn new() -> LogDb {
        let slot = unique("slot");
        let db = TestDb::migrated_for_log(&slot).await;
        LogDb { db, slot }
    }

    /// `run` flags for this database's slot, then `extra`.
    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "--read-mode",
            "log",
            "--slot",
            &self.slot,
            "--publication",
            &self.slot,
        ];
        args.extend_from_slice(extra);
        args
    }

    fn relay(&self, extra: &[&str]) -> Relay {
        Relay::start(&self.db, &self.args(extra))
    }

    async fn slot_lsn(&self, column: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT ({column} - '0/0'::pg_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1"
        )))
        .bind(&self.slot)
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }

    /// The slot's confirmed position, as bytes of WAL.
    async fn confirmed(&self) -> i64 {
        self.slot_lsn("confirmed_flush_lsn").await
    }

    /// A passing test leaves no slot behind (a failing one keeps it, with its database).
    async fn finish(self) {
        let start = Instant::now();
        loop {
            let dropped = sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&self.slot)
                .execute(&self.db.pool)
                .await;
            match dropped {
                Ok(_) => return,
                // Still active for a moment after the relay exited.
                Err(e) if start.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot drop slot {}: {e}", self.slot),
            }
        }
    }
}

/// A slot left behind (a failed test) would pin WAL and use up `max_replication_slots` for the
/// tests after it: drop it however the test ends (best effort; the relay, declared after the
/// database, is already killed).
impl Drop for LogDb {
    fn drop(&mut self) {
        let (url, slot) = (self.db.url.clone(), self.slot.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::Connection;
                let Ok(mut conn) = sqlx::PgConnection::connect(&url).await else {
                    return;
                };
                for _ in 0..50 {
                    let dropped = sqlx::query(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    )
                    .bind(&slot)
                    .execute(&mut conn)
                    .await
                    .and(
                        sqlx::query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1")
                            .bind(&slot)
                            .execute(&mut conn)
                            .await,
                    );
                    if dropped.is_ok() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .join();
    }
}

/// `migrate --read-mode log` of a table claim mode (or append mode) published, with `slot` as
/// the slot's and the publication's name.
fn migrate_to_log(db: &TestDb, slot: &str) {
    let (code, _, err) = db.run(&[
        "migrate",
        "--read-mode",
        "log",
        "--slot",
        slot,
        "--publication",
        slot,
    ]);
    assert_eq!(code, 0, "{err}");
}

async fn topics(n: usize) -> Vec<String> {
    let t: Vec<String> = (0..n).map(|i| unique(&format!("log{i}"))).collect();
    create_topics(&strs(&t), PARTITIONS).await;
    t
}

async fn write_events(
    db: &TestDb,
    topics: &[String],
    keys: usize,
    transactions: usize,
    writers: usize,
) -> Ledger {
    let spec = LoadSpec {
        shape: Shape::LateLocks,
        ..LoadSpec::counted(topics, writers, keys, transactions)
    };
    load::write(db.pool.clone(), spec).await
}

async fn check_delivery(topics: &[String], ledger: &Ledger, max_duplicates: usize) -> Report {
    let read = Reading {
        brokers: common::kafka_brokers(),
        topics: topics.to_vec(),
        partitions: PARTITIONS,
        settle: Duration::from_secs(2),
        timeout: Duration::from_secs(90),
    };
    let (report, violations) = load::check(read, ledger).await;
    load::assert_checked(&report, &violations, max_duplicates, "[log mode]");
    report
}

/// Wait until the relay has published `n` events (its counter moves once the confirmed
/// position is recorded).
fn wait_published(relay: &Relay, n: usize, timeout: Duration) {
    let start = Instant::now();
    loop {
        // Not yet listening right after a start: try again.
        let published = common::http_get(&relay.metrics_addr, "/metrics", None)
            .ok()
            .and_then(|(_, body)| common::metric(&body, "outbox_relay_published_total"));
        if published.is_some_and(|v| v >= n as f64) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "published fewer than {n} within {timeout:?}; log: {}",
            relay.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ordinary application transactions (an audit event, then 1-5 aggregates each locked right
/// before its event, in random order; some roll back, some commit late) from 16 writers while
/// the relay streams: every committed event once, per-key order = commit order, and not one
/// row written by the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_lock_transactions_arrive_exactly_once_in_commit_order_with_no_row_written() {
    let log = LogDb::new().await;
    let topics = topics(3).await;
    let relay = log.relay(&["--batch-size", "500"]);
    let written = write_events(&log.db, &topics, 100, 4_000, 16).await;
    let report = check_delivery(&topics, &written, 0).await;
    assert_eq!(report.records, written.committed.len());
    assert_eq!(
        log.db
            .count("published_at IS NOT NULL OR attempts > 0")
            .await,
        0,
        "log mode wrote to a row"
    );
    wait_published(&relay, written.committed.len(), Duration::from_secs(10));
    // Each committed transaction (an audit event and 1-5 aggregates' events) is timed once
    // from its commit to its arrival; the server skips the lease's and other tables'.
    let (committed, delays) = (
        written.committed.len() as f64,
        relay.metric("outbox_relay_source_delay_seconds_count"),
    );
    let delays = delays.expect("log mode exports the source delay");
    assert!(
        (committed / 6.0..=committed).contains(&delays),
        "{delays} source delays timed for {committed} events"
    );
    let mean = relay
        .metric("outbox_relay_source_delay_seconds_sum")
        .unwrap()
        / delays;
    assert!((0.0..10.0).contains(&mean), "mean source delay {mean} s");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    log.finish().await;
}

/// Events emitted with the table's emit function (no row) and rows, mixed in the same
/// transactions, under a per-key lock: all arrive once, per-key in commit order, with the
/// emitted event's LSN as its event id; a rolled-back emit never arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn emitted_events_and_rows_mix_in_commit_order() {
    let log = LogDb::new().await;
    let topics = topics(1).await;
    let topic = topics[0].clone();
    let relay = log.relay(&[]);
    sqlx::query("CREATE TABLE agg (key text PRIMARY KEY, seq int NOT NULL)")
        .execute(&log.db.pool)
        .await
        .unwrap();
    let keys = 8;
    let mut writers = Vec::new();
    for w in 0..4 {
        let (pool, topic) = (log.db.pool.clone(), topic.clone());
        writers.push(tokio::spawn(async move {
            let mut emitted = 0;
            for i in 0..150 {
                let key = format!("k{}", (i * 7 + w) % keys);
                let mut tx = pool.begin().await.unwrap();
                // An audit row first, then the aggregate's lock, then its two events.
                sqlx::query("INSERT INTO outbox (topic, key, payload) VALUES ($1, 'audit', 'audit')")
                    .bind(&topic)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let seq: i32 = sqlx::query_scalar(
                    "INSERT INTO agg VALUES ($1, 2) ON CONFLICT (key) DO UPDATE SET seq = agg.seq + 2 RETURNING seq",
                )
                .bind(&key)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
                // The row takes the odd number, the emitted event the even one after it.
                let first = seq - 1;
                sqlx::query("INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3)")
                    .bind(&topic)
                    .bind(&key)
                    .bind(format!("{key}:{first}").into_bytes())
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                sqlx::query("SELECT outbox_emit($1, $2, $3, '{\"kind\": \"emitted\"}')")
                    .bind(&topic)
                    .bind(&key)
                    .bind(format!("{key}:{}", first + 1).into_bytes())
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                if i % 10 == 9 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    emitted += 1;
                }
            }
            emitted
        }));
    }
    let mut committed = 0;
    for w in writers {
        committed += w.await.unwrap();
    }
    // Each committed transaction: an audit row, a row and an emitted event.
    let records = read_back(
        &topics,
        PARTITIONS,
        committed * 3,
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(records.len(), committed * 3, "every committed event once");
    let mut last: std::collections::HashMap<String, i32> = Default::default();
    let mut emitted_ids = std::collections::HashSet::new();
    for r in &records {
        let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
        if key == "audit" {
            continue;
        }
        let payload = String::from_utf8(r.payload.clone().unwrap()).unwrap();
        let seq: i32 = payload.rsplit_once(':').unwrap().1.parse().unwrap();
        // Per key, sequence numbers rise (a rolled-back transaction leaves a gap of 2).
        let prev = last.insert(key.clone(), seq).unwrap_or(0);
        assert!(seq > prev, "key {key}: {seq} after {prev}");
        if r.header("kind").as_deref() == Some("emitted") {
            let id = r.header("outbox-event-id").unwrap();
            assert!(id.starts_with("lsn-"), "emitted event id {id}");
            assert!(emitted_ids.insert(id), "an emitted event id repeats");
            assert_eq!(seq % 2, 0, "emitted events carry the even numbers");
        }
    }
    assert_eq!(emitted_ids.len(), committed);
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    log.finish().await;
}

/// kill -9 mid-stream, then start again: nothing lost, nothing reordered; what was published
/// after the last confirmed position comes again (bounded by the in-flight window).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_stream_then_restart_loses_nothing() {
    let log = LogDb::new().await;
    let topics = topics(2).await;
    let written = write_events(&log.db, &topics, 50, 8_000, 8).await;
    let args = ["--batch-size", "500"];
    let relay = log.relay(&args);
    wait_published(&relay, 2_000, Duration::from_secs(60));
    relay.kill9();
    let relay = log.relay(&args);
    wait_published(&relay, 1, Duration::from_secs(60));
    // The in-flight window (4 batches of 500) plus what was confirmed but not yet reported to
    // the server (the status interval, 1 s).
    let report = check_delivery(&topics, &written, written.committed.len()).await;
    assert!(
        report.duplicates <= 2_000 + 6_000,
        "{} duplicates",
        report.duplicates
    );
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    log.finish().await;
}

/// SIGTERM mid-stream: the relay settles what is in flight and reports the confirmed position
/// before it exits, so the next one publishes nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_stream_then_restart_duplicates_nothing() {
    let log = LogDb::new().await;
    let topics = topics(2).await;
    let written = write_events(&log.db, &topics, 50, 8_000, 8).await;
    let args = ["--batch-size", "500", "--shutdown-timeout", "10s"];
    let relay = log.relay(&args);
    wait_published(&relay, 2_000, Duration::from_secs(60));
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    let relay = log.relay(&args);
    let report = check_delivery(&topics, &written, 0).await;
    assert_eq!(report.records, written.committed.len());
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    log.finish().await;
}

/// Two replicas: one streams; when it is killed the standby takes the slot over within the
/// lease and goes on from the confirmed position.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_takes_over_the_slot_when_the_leader_dies() {
    let log = LogDb::new().await;
    let topics = topics(2).await;
    let args = ["--batch-size", "200", "--lease-duration", "3s"];
    let a = log.relay(&args);
    a.wait_http("/readyz", 200, Duration::from_secs(30));
    let b = log.relay(&args);
    let first = write_events(&log.db, &topics, 40, 1_000, 8).await;
    wait_published(&a, first.committed.len(), Duration::from_secs(60));
    assert_eq!(b.metric("outbox_relay_leader"), Some(0.0));
    a.kill9();
    let second = write_events(&log.db, &topics, 40, 1_000, 8).await;
    wait_published(&b, second.committed.len(), Duration::from_secs(60));
    let mut all = first;
    all.committed.extend(second.committed);
    check_delivery(&topics, &all, 2_000).await;
    assert_eq!(b.terminate(Duration::from_secs(15)), Some(0));
    log.finish().await;
}

/// The server ends the relay's replication session (pg_terminate_backend of the walsender):
/// the relay reconnects from the confirmed position and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminated_walsender_is_reconnected() {
    let log = LogDb::new().await;
    let topics = topics(1).await;
    let relay = log.relay(&["--batch-size", "200"]);
    let writing = {
        let (pool, topics) = (log.db.pool.clone(), topics.clone());
        tokio::spawn(async move {
            let spec = LoadSpec {
                shape: Shape::LateLocks,
                ..LoadSpec::counted(&topics, 4, 20, 3_000)
            };
            load::write(pool, spec).await
        })
    };
    for _ in 0..3 {
        wait_published(&relay, 200, Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(700)).await;
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
        )
        .bind(&log.slot)
        .fetch_all(&log.db.pool)
        .await
        .unwrap();
        assert_eq!(ended, vec![true], "the relay's walsender was running");
    }
    let written = writing.await.unwrap();
    check_delivery(&topics, &written, written.committed.len()).await;
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    log.finish().await;
}

/// An idle outbox in a busy database: the relay confirms the server's keepalive positions, so
/// the slot retains (almost) no WAL while another table takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_outbox_pins_no_wal_while_other_tables_are_written() {
    let log = LogDb::new().await;
    let relay = log.relay(&[]);
    relay.wait_http("/readyz", 200, Duration::from_secs(30));
    sqlx::query("CREATE TABLE busy (id bigserial PRIMARY KEY, filler text)")
        .execute(&log.db.pool)
        .await
        .unwrap();
    let before = log.confirmed().await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        sqlx::query(
            "INSERT INTO busy (filler) SELECT repeat('x', 500) FROM generate_series(1, 2000)",
        )
        .execute(&log.db.pool)
        .await
        .unwrap();
    }
    let written: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8")
        .fetch_one(&log.db.pool)
        .await
        .unwrap();
    // Keepalives come every wal_sender_timeout / 2 at the latest, or when the server is asked.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let confirmed = log.confirmed().await;
        if confirmed > before && written - confirmed < 16 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot still pins {} bytes of WAL",
            written - confirmed
        );
        // Nudge: the server sends a keepalive when WAL is flushed with nothing to decode.
        sqlx::query("INSERT INTO busy (filler) VALUES ('nudge')")
            .execute(&log.db.pool)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    log.finish().await;
}

/// From claim mode to log mode while writers go on: rows claim mode published before and after
/// the slot was created, rows left pending when it stopped, and rows written after log mode
/// started all arrive exactly once, in per-key order; and back to claim mode the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_claim_to_log_and_back_publishes_each_row_once() {
    switch_claim_to_log_and_back(&[]).await;
}

/// The same with `--delivery exactly-once` throughout, one transactional id: each mode takes
/// over the other's last committed position (claim's catch-up in log mode, log's tail in claim
/// mode) and publishes nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_read_modes_exactly_once_publishes_each_row_once() {
    let eos = common::exactly_once_flags();
    switch_claim_to_log_and_back(&strs(&eos)).await;
}

async fn switch_claim_to_log_and_back(delivery: &[&str]) {
    let with = |args: &[&'static str]| [args, delivery].concat();
    // Exactly-once: every batch commits the first time (a take-over has the position it needs).
    let stop = |relay: Relay| {
        let logs = relay.logs();
        assert!(
            !logs.contains("cannot publish exactly-once") && !logs.contains("did not commit"),
            "{logs}"
        );
        assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    };
    let db = TestDb::new().await;
    let slot = unique("slot");
    let topics = topics(2).await;
    let claim = Relay::start(&db, &with(&["--batch-size", "200"]));
    let mut all = write_events(&db, &topics, 30, 600, 4).await;
    db.wait_count(
        "published_at IS NOT NULL",
        all.committed.len() as i64,
        Duration::from_secs(60),
    )
    .await;
    // The slot starts while claim mode still publishes.
    migrate_to_log(&db, &slot);
    let during = write_events(&db, &topics, 30, 600, 4).await;
    let n = (all.committed.len() + during.committed.len()) as i64;
    db.wait_count("published_at IS NOT NULL", n, Duration::from_secs(60))
        .await;
    stop(claim);
    // Left pending by claim mode, and in the stream too.
    let pending = write_events(&db, &topics, 30, 600, 4).await;
    let log = LogDb { db, slot };
    let relay = log.relay(&with(&["--batch-size", "200"]));
    let after = write_events(&log.db, &topics, 30, 600, 4).await;
    for ledger in [during, pending, after] {
        all.committed.extend(ledger.committed);
    }
    let report = check_delivery(&topics, &all, 0).await;
    assert_eq!(report.records, all.committed.len());
    assert!(
        relay.logs().contains("skipped stream rows"),
        "{}",
        relay.logs()
    );
    // Back to claim mode, with rows written while log mode runs, after it stopped (its tail)
    // and after claim mode started.
    let more = write_events(&log.db, &topics, 30, 600, 4).await;
    wait_published(&relay, more.committed.len(), Duration::from_secs(60));
    stop(relay);
    let tail = write_events(&log.db, &topics, 30, 600, 4).await;
    let slot: &[&str] = &["--slot", &log.slot, "--publication", &log.slot];
    let back = Relay::start(&log.db, &[slot, &with(&["--batch-size", "200"])].concat());
    let last = write_events(&log.db, &topics, 30, 600, 4).await;
    for ledger in [more, tail, last] {
        all.committed.extend(ledger.committed);
    }
    let report = check_delivery(&topics, &all, 0).await;
    assert_eq!(report.records, all.committed.len());
    back.wait_log("slot dropped", Duration::from_secs(10));
    let marked = all.committed.len() as i64;
    log.db
        .wait_count("published_at IS NOT NULL", marked, Duration::from_secs(30))
        .await;
    let slots: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&log.slot)
            .fetch_one(&log.db.pool)
            .await
            .unwrap();
    assert_eq!(slots, 0, "claim mode dropped log mode's slot");
    stop(back);
}

/// The upgrade path from the removed append mode to its write-free successor: on a table as
/// append mode left it (the lease's cursor past rows it published without marking them),
/// `migrate --read-mode log` and `run --read-mode log` publish the rows after the cursor and
/// the rows written since once each, and never the rows behind the cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_append_mode_left_is_taken_over_by_log_mode_without_publishing_twice() {
    let db = TestDb::new().await;
    let slot = unique("slot");
    let topics = topics(1).await;
    let ids = db.write_plain(&topics[0], 20, 10).await;
    let passed = db.leave_as_append_mode_did(120).await;
    migrate_to_log(&db, &slot);
    let log = LogDb { db, slot };
    let relay = log.relay(&[]);
    let later = log.db.write_plain(&topics[0], 5, 10).await;
    let consumed = read_back(
        &topics,
        PARTITIONS,
        130,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    let mut got: Vec<i64> = consumed.iter().map(|c| c.event_id()).collect();
    let mut want: Vec<i64> = ids
        .iter()
        .filter(|id| !passed.contains(id))
        .copied()
        .collect();
    want.extend(later);
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "the rows after the cursor and the new ones, once each"
    );
    assert!(log.db.append_cursor_dropped().await);
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    log.finish().await;
}

/// One transaction of 1,000,000 rows: the relay publishes it while it streams in (bounded
/// buffers, no transaction held whole), with bounded memory, and confirms it once all is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_row_transaction_streams_in_bounded_memory() {
    const ROWS: usize = 1_000_000;
    let log = LogDb::new().await;
    let topics = topics(1).await;
    let relay = log.relay(&[]);
    relay.wait_http("/readyz", 200, Duration::from_secs(30));
    sqlx::query(
        "INSERT INTO outbox (topic, key, payload)          SELECT $1, 'k' || (g % 1000), convert_to(rpad(g::text, 200, 'x'), 'UTF8') FROM generate_series(1, $2) g",
    )
    .bind(&topics[0])
    .bind(ROWS as i64)
    .execute(&log.db.pool)
    .await
    .unwrap();
    let end: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8")
        .fetch_one(&log.db.pool)
        .await
        .unwrap();
    wait_published(&relay, ROWS, Duration::from_secs(600));
    let hwm_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", relay.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!(
        "peak RSS while streaming a {ROWS}-row transaction: {} MiB",
        hwm_kb / 1024
    );
    assert!(hwm_kb < 96 * 1024, "peak RSS {hwm_kb} kB");
    // Every row once: the topic holds exactly that many records.
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::kafka_brokers())
        .create()
        .unwrap();
    let records: i64 = (0..PARTITIONS)
        .map(|p| {
            use rdkafka::consumer::Consumer;
            let (low, high) = consumer
                .fetch_watermarks(&topics[0], p, Duration::from_secs(30))
                .unwrap();
            high - low
        })
        .sum();
    assert_eq!(records, ROWS as i64);
    let deadline = Instant::now() + Duration::from_secs(20);
    while log.confirmed().await < end {
        assert!(
            Instant::now() < deadline,
            "the slot was not confirmed past the transaction"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    log.finish().await;
}

/// Without the slot (or publication) the relay refuses to start, naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_slot_or_publication_is_refused_with_the_fix() {
    let log = LogDb::new().await;
    let (code, _, err) = log.db.run(&[
        "run",
        "--read-mode",
        "log",
        "--slot",
        "no_such_slot",
        "--publication",
        &log.slot,
        "--kafka-brokers",
        &common::kafka_brokers(),
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("\"no_such_slot\" does not exist") && err.contains("migrate --read-mode log"),
        "{err}"
    );
    let (code, _, err) = log.db.run(&[
        "run",
        "--read-mode",
        "log",
        "--slot",
        &log.slot,
        "--publication",
        "no_such_pub",
        "--kafka-brokers",
        &common::kafka_brokers(),
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("\"no_such_pub\" does not exist"), "{err}");
    let (code, _, err) = log
        .db
        .run(&["run", "--read-mode", "log", "--slot", "Bad-Name"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--slot"), "{err}");
    log.finish().await;
}

/// A row parked in log mode (its topic did not exist) is published again by `failed retry`
/// once the cause is fixed: the stream carries only inserts, so the command emits it into the
/// WAL again, with its id as its event id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_retry_publishes_a_parked_row_again_with_its_id() {
    let log = LogDb::new().await;
    let topic = unique("later");
    let relay = log.relay(&[]);
    relay.wait_http("/readyz", 200, Duration::from_secs(30));
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (topic, key, payload) VALUES ($1, 'k', 'again') RETURNING id",
    )
    .bind(&topic)
    .fetch_one(&log.db.pool)
    .await
    .unwrap();
    log.db
        .wait_count("failed_at IS NOT NULL", 1, Duration::from_secs(60))
        .await;
    create_topics(&[&topic], PARTITIONS).await;
    let (code, out, err) = log.db.run(&["failed", "retry", "--id", &id.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let records = read_back(
        std::slice::from_ref(&topic),
        PARTITIONS,
        1,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(records.len(), 1, "the retried row once");
    assert_eq!(records[0].event_id(), id);
    assert_eq!(records[0].payload.as_deref(), Some(&b"again"[..]));
    assert_eq!(log.db.count("failed_at IS NOT NULL").await, 0);
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    log.finish().await;
}

/// Exactly-once in log mode, where the slot can only confirm whole transactions: a relay is
/// killed inside a 200,000-row transaction after Kafka committed part of it. The next relay
/// streams that transaction again from its start and skips the events Kafka holds (its
/// position names the transaction by its commit LSN and counts them): every event once. At
/// least once, the same kill publishes that part again (the slot cannot confirm it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_a_kill_inside_a_split_transaction_publishes_nothing_twice() {
    const ROWS: usize = 200_000;
    let log = LogDb::new().await;
    let topics = topics(1).await;
    let eos = common::exactly_once_flags();
    let mut args = strs(&eos);
    args.extend(["--batch-size", "500", "--lease-duration", "3s"]);
    let relay = log.relay(&args);
    relay.wait_http("/readyz", 200, Duration::from_secs(30));
    sqlx::query(
        "INSERT INTO outbox (topic, key, payload) \
         SELECT $1, 'k' || (g % 100), convert_to(g::text, 'UTF8') FROM generate_series(1, $2) g",
    )
    .bind(&topics[0])
    .bind(ROWS as i64)
    .execute(&log.db.pool)
    .await
    .unwrap();
    let committed = r#"outbox_relay_transactions_total{outcome="committed"}"#;
    let start = Instant::now();
    while relay.metric(committed).unwrap_or(0.0) < 5.0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            relay.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    relay.kill9();
    let relay = log.relay(&args);
    relay.wait_log(
        "took over Kafka's committed position",
        Duration::from_secs(60),
    );
    assert!(
        relay.logs().contains("split=Some"),
        "the position is inside the transaction: {}",
        relay.logs()
    );
    let consumed = read_back(
        &topics,
        PARTITIONS,
        ROWS,
        Duration::from_secs(2),
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(
        common::duplicates(&consumed).len(),
        0,
        "no event twice for a read_committed consumer"
    );
    assert_eq!(consumed.len(), ROWS, "every event");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    log.finish().await;
}

/// An emitted event that is poison (an illegal topic name) is parked as a row of the table,
/// its event id in the reason, and the stream goes on: the next event arrives. The parked
/// row's own insert comes through the stream too: it is not an event (it is not pending), so
/// it is not set aside a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_emitted_event_is_parked_once_and_the_stream_goes_on() {
    poison_emitted_event_set_aside_once(None).await;
}

/// The same with the dead-letter policy: one dead-letter copy, and the row recording it
/// (inserted published) is not an event either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_emitted_event_is_dead_lettered_once_and_the_stream_goes_on() {
    let dlq = topics(1).await.remove(0);
    poison_emitted_event_set_aside_once(Some(&dlq)).await;
    let copies = read_back(
        &[dlq],
        PARTITIONS,
        1,
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(copies.len(), 1, "one dead-letter copy");
}

async fn poison_emitted_event_set_aside_once(dead_letter_topic: Option<&str>) {
    let log = LogDb::new().await;
    let topics = topics(1).await;
    let (set_aside, relay) = match dead_letter_topic {
        None => ("failed_at IS NOT NULL", log.relay(&[])),
        Some(dlq) => (
            "published_at IS NOT NULL",
            log.relay(&["--poison-policy", "dead-letter", "--dead-letter-topic", dlq]),
        ),
    };
    let emit = |topic: String| {
        let pool = log.db.pool.clone();
        async move {
            sqlx::query("SELECT outbox_emit($1, 'k', 'p', NULL)")
                .bind(topic)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    emit("bad topic".into()).await;
    emit(topics[0].clone()).await;
    log.db
        .wait_count(set_aside, 1, Duration::from_secs(60))
        .await;
    // Committed after the set-aside row's insert: once it arrives, the stream is past it.
    emit(topics[0].clone()).await;
    let records = read_back(
        &topics,
        PARTITIONS,
        2,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(records.len(), 2, "the good events around it");
    let rows: Vec<(String, String, i32)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT topic, last_error, attempts FROM outbox WHERE {set_aside}"
    )))
    .fetch_all(&log.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "one row stands for the event: {rows:?}");
    let (topic, error, attempts) = &rows[0];
    assert_eq!(topic, "bad topic");
    assert!(error.contains("(emitted event lsn-"), "{error}");
    assert_eq!(*attempts, 1, "set aside once");
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    log.finish().await;
}

/// An emitted event has no row: parking it inserts one. If its batch is read again before the
/// slot's position passes it (a crash; exactly-once, an aborted transaction), it is parked
/// again: that must not insert a second row, or `failed retry` would publish the event twice
/// under two event ids; nor after `failed retry` has sent the row. The same for a dead-letter
/// record. A table migrated by an older release (no `emitted_lsn`) still parks it once, and
/// `doctor` says to migrate it until `migrate` has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emitted_event_parked_twice_is_one_parked_row() {
    use outbox_relay::event::OutboxRow;
    use outbox_relay::store::{OnPublish, OutboxStore, SetAside};
    use outbox_relay::table::{ReadMode, TableName};

    let log = LogDb::new().await;
    let table = TableName::parse("outbox").unwrap();
    let store = OutboxStore::new(log.db.pool.clone(), table, OnPublish::Mark, ReadMode::Log);
    let emitted = |lsn: i64| OutboxRow {
        id: -lsn,
        topic: "bad topic".into(),
        key: Some("k".into()),
        payload: Some(b"p".to_vec()),
        headers: Some(r#"{"h":"v"}"#.into()),
        created_at: chrono::Utc::now(),
        xid: None,
        unreadable: None,
    };
    let why = "the topic name is not legal";
    let (first, other) = (emitted(0x1_0000_0A00), emitted(0x1_0000_0B00));
    assert!(store
        .insert_set_aside(&first, SetAside::Parked, why)
        .await
        .unwrap());
    assert!(
        !store
            .insert_set_aside(&first, SetAside::Parked, why)
            .await
            .unwrap(),
        "parked again: the row already there stands for it"
    );
    assert!(
        store
            .insert_set_aside(&other, SetAside::Parked, why)
            .await
            .unwrap(),
        "another event with the same error is parked too"
    );
    assert_eq!(log.db.count("failed_at IS NOT NULL").await, 2);
    let errors: Vec<String> =
        sqlx::query_scalar("SELECT last_error FROM outbox WHERE failed_at IS NOT NULL ORDER BY id")
            .fetch_all(&log.db.pool)
            .await
            .unwrap();
    assert_eq!(
        errors,
        [
            format!("{why} (emitted event lsn-1/A00)"),
            format!("{why} (emitted event lsn-1/B00)"),
        ]
    );
    let lsns: Vec<String> = sqlx::query_scalar(
        "SELECT emitted_lsn::text FROM outbox WHERE failed_at IS NOT NULL ORDER BY id",
    )
    .fetch_all(&log.db.pool)
    .await
    .unwrap();
    assert_eq!(lsns, ["1/A00", "1/B00"]);

    // `failed retry` sent the row (it is pending again): the event, read again, is still it.
    let id: i64 = sqlx::query_scalar("SELECT id FROM outbox WHERE emitted_lsn = '1/A00'")
        .fetch_one(&log.db.pool)
        .await
        .unwrap();
    let (code, out, err) = log.db.run(&["failed", "retry", "--id", &id.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(log.db.count("failed_at IS NOT NULL").await, 1, "retried");
    let again = store.insert_set_aside(&first, SetAside::Parked, why).await;
    assert!(
        !again.unwrap(),
        "after failed retry: the row still stands for it"
    );
    let dead = emitted(0x1_0000_0C00);
    for (n, inserted) in [(1, true), (2, false)] {
        let done = store.insert_set_aside(&dead, SetAside::DeadLettered, why);
        assert_eq!(done.await.unwrap(), inserted, "dead-lettered, time {n}");
    }
    assert_eq!(log.db.count("true").await, 3);

    // An older schema: found by the event id at the end of last_error, as before.
    sqlx::query("ALTER TABLE outbox DROP COLUMN emitted_lsn")
        .execute(&log.db.pool)
        .await
        .unwrap();
    let old = emitted(0x1_0000_0D00);
    for (n, inserted) in [(1, true), (2, false)] {
        let done = store.insert_set_aside(&old, SetAside::Parked, why);
        assert_eq!(done.await.unwrap(), inserted, "older schema, time {n}");
    }
    assert_eq!(log.db.count("true").await, 4);
    // doctor with the relay's flags, as an operator runs it.
    let brokers = common::kafka_brokers();
    let doctor = || {
        let flags = [
            "--read-mode",
            "log",
            "--slot",
            &log.slot,
            "--publication",
            &log.slot,
        ];
        let args = [&["doctor", "--kafka-brokers", &brokers][..], &flags[..]].concat();
        log.db.run(&args).1
    };
    let warning = "[WARN] table: public.outbox lacks the column emitted_lsn";
    let before = doctor();
    // The fix keeps the table in log mode (a bare `migrate` would migrate it for claim mode).
    let fix = before
        .split(warning)
        .nth(1)
        .and_then(|rest| rest.lines().nth(1));
    assert_eq!(
        fix.map(str::trim),
        Some("fix: run `outbox-relay migrate --read-mode log`"),
        "{before}"
    );
    migrate_to_log(&log.db, &log.slot);
    let after = doctor();
    assert!(!after.contains("emitted_lsn"), "{after}");
    log.finish().await;
}
