//! The one writer and the one checker, for every suite that checks delivery (tests/relay.rs
//! and the fault harness, tests/faults/harness.rs).
//!
//! - **Writers** ([`Load`]): concurrent connections committing events, each transaction
//!   bumping its key's sequence number in `key_seq` first (under the key's advisory lock, taken
//!   before the transaction's first write, so a key's commit order is its sequence order); as
//!   the [`LoadSpec`] says, some roll back, some stay open a while (so they commit out of id
//!   order), some have no key or no payload. Connection errors are retried, and a COMMIT whose
//!   outcome is unknown is resolved by looking the row up. Every event carries a token (header
//!   [`TOKEN_HEADER`], and the payload's `tok:<token>|` prefix) naming it in the [`Ledger`].
//! - **The checker** ([`consume_and_check`]): reads the topics back from the beginning and
//!   checks every committed event arrived byte for byte (topic, key, payload, headers, the
//!   relay's `outbox-*` headers), no rolled-back or unknown event did, per-key first
//!   occurrences are in sequence order on one partition; it counts duplicates.
//!
//! (bench/bench.py has a checker of its own: Python, reading the benchmark's pgbench rows.)

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::unique;

/// The header every writer event carries its token in (the token also starts the payload).
pub const TOKEN_HEADER: &str = "test-event";
const NOTE: &str = "naïve ü 日本 🚀";

/// What the writers need from the test that runs them.
pub trait Scenario: Send + Sync + 'static {
    /// Starts the token of every event the writers commit: unique among the events that one
    /// checker reads.
    fn label(&self) -> String;
    /// A reproducible random stream for one purpose.
    fn rng(&self, purpose: &str) -> StdRng;
    /// Report progress.
    fn say(&self, line: &str);
    /// Ends every assertion message: how to reproduce.
    fn tag(&self) -> String;
}

/// The [`Scenario`] of a test outside the fault suite: events named `<label>-…` after a fresh
/// label, the same random choices in every run, progress on stderr.
pub struct Plain {
    label: String,
}

impl Plain {
    pub fn new() -> Arc<Plain> {
        Arc::new(Plain {
            label: unique("events"),
        })
    }
}

impl Scenario for Plain {
    fn label(&self) -> String {
        self.label.clone()
    }

    fn rng(&self, purpose: &str) -> StdRng {
        StdRng::seed_from_u64(fnv(purpose))
    }

    fn say(&self, line: &str) {
        eprintln!("[{}] {line}", self.label);
    }

    fn tag(&self) -> String {
        format!("[events {}-*]", self.label)
    }
}

/// FNV-1a: a stable hash of a name, to derive seeds.
pub fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// The shape of the load.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub writers: usize,
    pub keys: usize,
    pub topics: Vec<String>,
    /// Transactions per writer, at most (bounded loop).
    pub max_per_writer: usize,
    /// Writers stop by themselves after this long (time limit).
    pub time_limit: Duration,
    /// Pause between a writer's transactions, in ms (uniform in the range; none for `(0, 0)`).
    pub gap_ms: (u64, u64),
    /// Share of transactions that roll back.
    pub rollback: f64,
    /// Share of transactions held open 100-500 ms before committing (they commit out of id order).
    pub hold: f64,
    /// Share of events without a key (not ordered), and of tombstones (NULL payload).
    pub null_key: f64,
    pub tombstone: f64,
}

impl LoadSpec {
    /// The mixed load the fault scenarios run under.
    pub fn new(topics: &[String]) -> LoadSpec {
        LoadSpec {
            writers: 6,
            keys: 40,
            topics: topics.to_vec(),
            max_per_writer: 50_000,
            time_limit: Duration::from_secs(600),
            gap_ms: (2, 25),
            rollback: 0.10,
            hold: 0.05,
            null_key: 0.03,
            tombstone: 0.02,
        }
    }

    /// `events` events from `writers` writers (an equal share each, as fast as they go) on
    /// `keys` keys: every transaction commits, every event has a key and a payload.
    pub fn counted(topics: &[String], writers: usize, keys: usize, events: usize) -> LoadSpec {
        assert_eq!(
            events % writers,
            0,
            "{events} events in equal shares of {writers}"
        );
        LoadSpec {
            writers,
            keys,
            max_per_writer: events / writers,
            gap_ms: (0, 0),
            rollback: 0.0,
            hold: 0.0,
            null_key: 0.0,
            tombstone: 0.0,
            ..LoadSpec::new(topics)
        }
    }

    /// The key of index `k`: some ASCII, some not (keys are compared byte for byte).
    pub fn key(k: usize) -> String {
        if k % 2 == 0 {
            format!("key-{k}")
        } else {
            format!("ключ-{k}")
        }
    }

    /// Every key of the load lives on one topic.
    pub fn topic_of(&self, k: usize) -> &str {
        &self.topics[k % self.topics.len()]
    }
}

/// A committed event as its writer knows it: what Kafka must carry, byte for byte.
#[derive(Debug, Clone)]
pub struct Expected {
    pub id: i64,
    pub token: String,
    pub topic: String,
    pub key: Option<String>,
    /// The key's sequence number (bumped in the same transaction); None for unkeyed events.
    pub seq: Option<i64>,
    pub payload: Option<Vec<u8>>,
    /// The row's own headers, sorted by name (the relay adds its `outbox-*` ones).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Expected {
    /// An event of a bulk insert (`INSERT ... SELECT FROM generate_series`): payload
    /// `tok:<token>|`, bytes 00 ff fe, then `tail`; headers the token and `seq`.
    pub fn bulk(
        id: i64,
        token: String,
        topic: &str,
        key: String,
        seq: i64,
        tail: &[u8],
    ) -> Expected {
        let mut payload = format!("tok:{token}|").into_bytes();
        payload.extend_from_slice(&[0x00, 0xff, 0xfe]);
        payload.extend_from_slice(tail);
        let mut headers = vec![
            (TOKEN_HEADER.to_string(), token.clone().into_bytes()),
            ("seq".to_string(), seq.to_string().into_bytes()),
        ];
        headers.sort();
        Expected {
            id,
            topic: topic.to_string(),
            key: Some(key),
            seq: Some(seq),
            payload: Some(payload),
            headers,
            token,
        }
    }
}

/// What the writers did: committed events by token, and tokens that must never be seen.
#[derive(Debug, Default)]
pub struct Ledger {
    pub committed: HashMap<String, Expected>,
    /// Rolled back, failed before COMMIT, or COMMIT failed and the row is not there.
    pub not_committed: HashSet<String>,
    /// Unknown COMMIT outcomes not resolved yet (the database was down): the fault suite's
    /// `verify` resolves them.
    pub unresolved: Vec<Expected>,
    pub rolled_back: usize,
    pub failed: usize,
    pub ambiguous_committed: usize,
    pub ambiguous_aborted: usize,
    /// Check the committed sequence numbers of each key against `key_seq` (1..=n, no gaps).
    pub check_key_seq: bool,
}

impl Ledger {
    pub fn merge(&mut self, other: Ledger) {
        self.committed.extend(other.committed);
        self.not_committed.extend(other.not_committed);
        self.unresolved.extend(other.unresolved);
        self.rolled_back += other.rolled_back;
        self.failed += other.failed;
        self.ambiguous_committed += other.ambiguous_committed;
        self.ambiguous_aborted += other.ambiguous_aborted;
    }

    pub fn add(&mut self, e: Expected) {
        self.committed.insert(e.token.clone(), e);
    }

    /// An unknown COMMIT outcome, found out (see [`resolve`]).
    pub fn resolved(&mut self, e: Expected, committed: bool) {
        if committed {
            self.ambiguous_committed += 1;
            self.add(e);
        } else {
            self.ambiguous_aborted += 1;
            self.not_committed.insert(e.token);
        }
    }
}

/// Writers running in the background until [`Load::stop`] (or, for a counted load, until
/// they are done: [`Load::finish`]).
pub struct Load {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Ledger>>,
    committed: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    ctx: Arc<dyn Scenario>,
}

/// The writers' sequence numbers, one row a key.
pub const KEY_SEQ_SQL: &str =
    "CREATE TABLE IF NOT EXISTS key_seq (key text PRIMARY KEY, seq bigint NOT NULL)";

/// The key's lock is taken before the transaction's first write (the README's ordering contract
/// for append mode: two upserts creating a new key take their xids before either holds the row).
const BUMP_SQL: &str = "WITH l AS (SELECT pg_advisory_xact_lock(hashtext($1))) \
     INSERT INTO key_seq SELECT $1, 1 FROM l ON CONFLICT (key) DO UPDATE SET seq = key_seq.seq + 1 RETURNING seq";
const INSERT_SQL: &str =
    "INSERT INTO outbox (topic, key, payload, headers) VALUES ($1, $2, $3, $4) RETURNING id";
const EXISTS_SQL: &str = "SELECT EXISTS (SELECT 1 FROM outbox WHERE id = $1 AND headers->>$3 = $2)";

/// One transaction's plan.
pub struct Attempt {
    pub token: String,
    pub topic: String,
    pub key: Option<String>,
    pub tombstone: bool,
    pub noise: Vec<u8>,
    pub hold: Option<Duration>,
    pub rollback: bool,
}

impl Attempt {
    /// The event this transaction commits, its key's sequence number being `seq`.
    pub fn expected(&self, seq: Option<i64>) -> Expected {
        let payload = (!self.tombstone).then(|| {
            let mut p = format!(
                "tok:{}|{}|{}|",
                self.token,
                self.key.as_deref().unwrap_or("-"),
                seq.unwrap_or(0)
            )
            .into_bytes();
            p.extend_from_slice(&[0x00, 0xff, 0xfe]);
            p.extend_from_slice(&self.noise);
            p
        });
        let mut headers = vec![
            (TOKEN_HEADER.to_string(), self.token.clone().into_bytes()),
            ("note".to_string(), NOTE.as_bytes().to_vec()),
            ("empty".to_string(), Vec::new()),
        ];
        if let Some(seq) = seq {
            headers.push(("seq".to_string(), seq.to_string().into_bytes()));
        }
        headers.sort();
        Expected {
            id: 0,
            token: self.token.clone(),
            topic: self.topic.clone(),
            key: self.key.clone(),
            seq,
            payload,
            headers,
        }
    }
}

fn headers_json(e: &Expected) -> serde_json::Value {
    serde_json::Value::Object(
        e.headers
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    serde_json::Value::String(String::from_utf8(v.clone()).unwrap()),
                )
            })
            .collect(),
    )
}

/// Insert the event's row; returns its id.
pub async fn insert_event<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    e: &Expected,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(INSERT_SQL)
        .bind(&e.topic)
        .bind(&e.key)
        .bind(&e.payload)
        .bind(headers_json(e))
        .fetch_one(conn)
        .await
}

/// Run one transaction. `commit_sent` holds the event once COMMIT was sent: if an error
/// follows, the outcome is unknown.
async fn run_attempt(
    pool: &PgPool,
    a: &Attempt,
    commit_sent: &mut Option<Expected>,
) -> Result<Option<Expected>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let seq = match &a.key {
        Some(key) => Some(
            sqlx::query_scalar::<_, i64>(BUMP_SQL)
                .bind(key)
                .fetch_one(&mut *tx)
                .await?,
        ),
        None => None,
    };
    let mut e = a.expected(seq);
    e.id = insert_event(&mut *tx, &e).await?;
    if let Some(hold) = a.hold {
        tokio::time::sleep(hold).await;
    }
    if a.rollback {
        tx.rollback().await?;
        return Ok(None);
    }
    *commit_sent = Some(e.clone());
    tx.commit().await?;
    Ok(Some(e))
}

/// Did this event's transaction commit? (The id alone is not proof: after a crash PostgreSQL
/// may hand out a sequence value again, so the row must also carry the event's token.)
async fn committed(pool: &PgPool, e: &Expected) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(EXISTS_SQL)
        .bind(e.id)
        .bind(&e.token)
        .bind(TOKEN_HEADER)
        .fetch_one(pool)
        .await
}

/// [`committed`], asked again through errors (the database may be restarting) until `within`
/// passed: then the last error.
pub async fn resolve(pool: &PgPool, e: &Expected, within: Duration) -> Result<bool, sqlx::Error> {
    let deadline = Instant::now() + within;
    loop {
        match committed(pool, e).await {
            Ok(committed) => return Ok(committed),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(err) => return Err(err),
        }
    }
}

async fn writer(
    ctx: Arc<dyn Scenario>,
    pool: PgPool,
    spec: Arc<LoadSpec>,
    w: usize,
    stop: CancellationToken,
    committed_count: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) -> Ledger {
    let mut rng = ctx.rng(&format!("writer-{w}"));
    let mut ledger = Ledger::default();
    let start = Instant::now();
    for n in 0..spec.max_per_writer {
        if stop.is_cancelled() || start.elapsed() > spec.time_limit {
            break;
        }
        let gap = rng.random_range(spec.gap_ms.0..=spec.gap_ms.1);
        if gap > 0 {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(gap)) => {}
            }
        }
        let keyed = !rng.random_bool(spec.null_key);
        let k = rng.random_range(0..spec.keys);
        let a = Attempt {
            token: format!("{}-w{w}-n{n}", ctx.label()),
            topic: if keyed {
                spec.topic_of(k).to_string()
            } else {
                spec.topics[rng.random_range(0..spec.topics.len())].clone()
            },
            key: keyed.then(|| LoadSpec::key(k)),
            tombstone: rng.random_bool(spec.tombstone),
            noise: {
                let mut v = vec![0u8; rng.random_range(0..48)];
                rng.fill(&mut v[..]);
                v
            },
            hold: rng
                .random_bool(spec.hold)
                .then(|| Duration::from_millis(rng.random_range(100..500))),
            rollback: rng.random_bool(spec.rollback),
        };
        let mut commit_sent = None;
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            run_attempt(&pool, &a, &mut commit_sent),
        )
        .await
        .unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut));
        match outcome {
            Ok(Some(e)) => {
                committed_count.fetch_add(1, Ordering::Relaxed);
                ledger.add(e);
            }
            Ok(None) => {
                ledger.rolled_back += 1;
                ledger.not_committed.insert(a.token);
            }
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                match commit_sent {
                    None => {
                        ledger.failed += 1;
                        ledger.not_committed.insert(a.token);
                    }
                    // COMMIT was sent and no answer came back: look the row up.
                    Some(e) => match resolve(&pool, &e, Duration::from_secs(60)).await {
                        Ok(committed) => {
                            if committed {
                                committed_count.fetch_add(1, Ordering::Relaxed);
                            }
                            ledger.resolved(e, committed);
                        }
                        Err(_) => ledger.unresolved.push(e),
                    },
                }
                // Back off a little on errors (the database may be restarting).
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..300))).await;
            }
        }
    }
    ledger
}

impl Load {
    /// Start the writers on `pool` (which needs a connection per writer, and a `key_seq` table:
    /// [`KEY_SEQ_SQL`]).
    pub fn start(ctx: Arc<dyn Scenario>, pool: PgPool, spec: LoadSpec) -> Load {
        let spec = Arc::new(spec);
        let stop = CancellationToken::new();
        let committed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let tasks = (0..spec.writers)
            .map(|w| {
                tokio::spawn(writer(
                    ctx.clone(),
                    pool.clone(),
                    spec.clone(),
                    w,
                    stop.clone(),
                    committed.clone(),
                    errors.clone(),
                ))
            })
            .collect();
        ctx.say(&format!(
            "load: {} writers, {} keys on {} topics",
            spec.writers,
            spec.keys,
            spec.topics.len()
        ));
        Load {
            stop,
            tasks,
            committed,
            errors,
            ctx,
        }
    }

    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Wait until the writers committed `n` more events than now (the load is flowing).
    pub async fn wait_committed(&self, n: u64, timeout: Duration) {
        let from = self.committed();
        let start = Instant::now();
        while self.committed() < from + n {
            assert!(
                start.elapsed() < timeout,
                "writers committed only {} events in {timeout:?} ({} errors) {}",
                self.committed() - from,
                self.errors.load(Ordering::Relaxed),
                self.ctx.tag()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop the writers and collect what they did.
    pub async fn stop(self) -> Ledger {
        self.stop.cancel();
        self.finish().await
    }

    /// Wait for the writers to end by themselves (a counted load) and collect what they did.
    pub async fn finish(self) -> Ledger {
        let mut ledger = Ledger {
            check_key_seq: true,
            ..Ledger::default()
        };
        for t in self.tasks {
            ledger.merge(t.await.expect("writer task panicked"));
        }
        self.ctx.say(&format!(
            "load ended: {} committed ({} after an unknown COMMIT outcome), {} rolled back, {} failed, {} unknown outcomes not committed, {} unresolved, {} errors",
            ledger.committed.len(),
            ledger.ambiguous_committed,
            ledger.rolled_back,
            ledger.failed,
            ledger.ambiguous_aborted,
            ledger.unresolved.len(),
            self.errors.load(Ordering::Relaxed)
        ));
        ledger
    }
}

/// Run a counted load ([`LoadSpec::counted`]) to its end on `pool`: every transaction must
/// commit at the first try.
pub async fn write(pool: PgPool, spec: LoadSpec) -> Ledger {
    sqlx::query(KEY_SEQ_SQL).execute(&pool).await.unwrap();
    let events = spec.writers * spec.max_per_writer;
    let ctx = Plain::new();
    let tag = ctx.tag();
    let ledger = Load::start(ctx, pool, spec).finish().await;
    let unknown = ledger.ambiguous_committed + ledger.ambiguous_aborted + ledger.unresolved.len();
    assert_eq!(
        (
            ledger.committed.len(),
            ledger.rolled_back,
            ledger.failed,
            unknown
        ),
        (events, 0, 0, 0),
        "(committed, rolled back, failed, unknown outcomes) {tag}"
    );
    ledger
}

// ---------------------------------------------------------------------------------------
// The checker

/// What the checker read.
#[derive(Debug, Default)]
pub struct Report {
    pub records: usize,
    pub distinct: usize,
    pub duplicates: usize,
    pub max_copies: usize,
    /// Ids of events read more than once (at most 20, lowest first).
    pub duplicated: Vec<i64>,
}

/// Where the checker reads, and how patiently.
#[derive(Clone, Debug)]
pub struct Reading {
    pub brokers: String,
    pub topics: Vec<String>,
    pub partitions: i32,
    /// Once every committed event arrived, wait this long and read to the (possibly grown) ends
    /// once more, so a late duplicate is counted too.
    pub settle: Duration,
    /// Reading longer than this is a violation (events missing).
    pub timeout: Duration,
}

/// Per key, the committed sequence numbers are exactly 1..=n and n is the key's `key_seq`:
/// the writers' own bookkeeping (commits, rollbacks, unknown outcomes) is right.
pub async fn check_key_seq(pool: &PgPool, ledger: &Ledger, tag: &str) {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT key, seq FROM key_seq")
        .fetch_all(pool)
        .await
        .unwrap();
    let mut by_key: HashMap<&str, BTreeSet<i64>> = HashMap::new();
    for e in ledger.committed.values() {
        if let (Some(k), Some(s)) = (&e.key, e.seq) {
            assert!(
                by_key.entry(k).or_default().insert(s),
                "key {k}: seq {s} committed twice {tag}"
            );
        }
    }
    for (key, seq) in rows {
        let seqs = by_key.remove(key.as_str()).unwrap_or_default();
        let want: BTreeSet<i64> = (1..=seq).collect();
        assert_eq!(
            seqs, want,
            "key {key}: the writers' committed sequence numbers are not 1..={seq} {tag}"
        );
    }
    // Keys left in `by_key` are sequenced by their writer without key_seq (bursts).
}

/// The token of a record: its header, else the payload's `tok:<token>|` prefix.
fn token_of(headers: &[(String, Option<Vec<u8>>)], payload: Option<&[u8]>) -> Option<String> {
    if let Some((_, Some(v))) = headers.iter().find(|(k, _)| k == TOKEN_HEADER) {
        return String::from_utf8(v.clone()).ok();
    }
    let p = payload?.strip_prefix(b"tok:")?;
    let end = p.iter().position(|&b| b == b'|')?;
    String::from_utf8(p[..end].to_vec()).ok()
}

/// [`consume_and_check`] off the async runtime, for the events of `ledger`.
pub async fn check(read: Reading, ledger: &Ledger) -> (Report, Vec<String>) {
    let committed = ledger.committed.clone();
    let not_committed = ledger.not_committed.clone();
    tokio::task::spawn_blocking(move || consume_and_check(&read, &committed, &not_committed))
        .await
        .unwrap()
}

/// Panic, ending with `tag`, on any violation or on more than `max_duplicates` duplicates.
pub fn assert_checked(report: &Report, violations: &[String], max_duplicates: usize, tag: &str) {
    if !violations.is_empty() {
        let mut msg = format!("{} violations {tag}:\n", violations.len());
        for v in violations.iter().take(40) {
            let _ = writeln!(msg, "  {v}");
        }
        panic!("{msg}");
    }
    assert!(
        report.duplicates <= max_duplicates,
        "{} duplicate records exceed the bound of {max_duplicates} (event ids e.g. {:?}) {tag}",
        report.duplicates,
        report.duplicated
    );
}

/// Read the topics from the beginning up to their ends and check every record against the
/// committed events (see the module's doc): (report, violations).
pub fn consume_and_check(
    read: &Reading,
    committed: &HashMap<String, Expected>,
    not_committed: &HashSet<String>,
) -> (Report, Vec<String>) {
    let timeout = read.timeout;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &read.brokers)
        .set("group.id", unique("checker"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for t in &read.topics {
        for p in 0..read.partitions {
            tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
            let (_, high) = consumer
                .fetch_watermarks(t, p, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("watermarks of {t}/{p}: {e}"));
            ends.insert((t.clone(), p), high);
        }
    }
    consumer.assign(&tpl).unwrap();

    let mut violations: Vec<String> = Vec::new();
    let mut copies: HashMap<&str, usize> = HashMap::new();
    let mut last_seq: HashMap<&str, i64> = HashMap::new();
    let mut key_home: HashMap<&str, (String, i32)> = HashMap::new();
    let mut position: HashMap<(String, i32), i64> = HashMap::new();
    let mut records = 0usize;
    let start = Instant::now();
    let mut rechecked = false;
    loop {
        let caught_up = ends
            .iter()
            .all(|(tp, end)| position.get(tp).copied().unwrap_or(0) >= *end);
        if caught_up && copies.len() >= committed.len() {
            if rechecked {
                break;
            }
            // Everything expected is in: read up to the (possibly grown) ends once more, so a
            // late duplicate is counted too.
            std::thread::sleep(read.settle);
            for ((t, p), end) in ends.iter_mut() {
                if let Ok((_, high)) = consumer.fetch_watermarks(t, *p, Duration::from_secs(30)) {
                    *end = high;
                }
            }
            rechecked = true;
            continue;
        }
        if start.elapsed() > timeout {
            let missing: Vec<i64> = committed
                .values()
                .filter(|e| !copies.contains_key(e.token.as_str()))
                .map(|e| e.id)
                .take(20)
                .collect();
            violations.push(format!(
                "timed out after {timeout:?}: {} of {} committed events read (positions {position:?}, ends {ends:?}); missing ids e.g. {missing:?}",
                copies.len(),
                committed.len()
            ));
            break;
        }
        let m = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(e)) => {
                violations.push(format!("consumer error: {e}"));
                continue;
            }
            Some(Ok(m)) => m,
        };
        records += 1;
        let tp = (m.topic().to_string(), m.partition());
        position.insert(tp.clone(), m.offset() + 1);
        let headers: Vec<(String, Option<Vec<u8>>)> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        let at = format!("{}/{}@{}", tp.0, tp.1, m.offset());
        let Some(token) = token_of(&headers, m.payload()) else {
            violations.push(format!("{at}: a record with no event token"));
            continue;
        };
        let Some(e) = committed.get(&token) else {
            if not_committed.contains(&token) {
                violations.push(format!(
                    "{at}: event {token} was rolled back (or never committed) but reached Kafka"
                ));
            } else {
                violations.push(format!("{at}: unknown event {token}"));
            }
            continue;
        };
        let n = copies.entry(e.token.as_str()).or_default();
        *n += 1;
        let first = *n == 1;
        let mut fail = |what: String| {
            violations.push(format!("{at}: event {} (id {}): {what}", e.token, e.id))
        };
        if m.topic() != e.topic {
            fail(format!("topic {} instead of {}", m.topic(), e.topic));
        }
        if m.key() != e.key.as_deref().map(str::as_bytes) {
            fail(format!(
                "key {:?} instead of {:?}",
                m.key().map(String::from_utf8_lossy),
                e.key
            ));
        }
        if m.payload() != e.payload.as_deref() {
            fail(format!(
                "payload differs: {:?} instead of {:?}",
                m.payload().map(|p| String::from_utf8_lossy(p).into_owned()),
                e.payload
                    .as_deref()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
            ));
        }
        let mut own: Vec<(String, Vec<u8>)> = Vec::new();
        let mut relay_headers: HashMap<&str, Vec<u8>> = HashMap::new();
        for (k, v) in &headers {
            let v = v.clone().unwrap_or_default();
            match k.as_str() {
                "outbox-event-id" | "outbox-created-at" | "outbox-source" => {
                    relay_headers.insert(k.as_str(), v);
                }
                _ => own.push((k.clone(), v)),
            }
        }
        own.sort();
        if own != e.headers {
            fail(format!("headers {own:?} instead of {:?}", e.headers));
        }
        if relay_headers.get("outbox-event-id") != Some(&e.id.to_string().into_bytes()) {
            fail(format!(
                "outbox-event-id {:?} instead of {}",
                relay_headers
                    .get("outbox-event-id")
                    .map(|v| String::from_utf8_lossy(v)),
                e.id
            ));
        }
        if relay_headers.get("outbox-source").map(Vec::as_slice) != Some(b"public.outbox") {
            fail("outbox-source is not public.outbox".into());
        }
        let created = relay_headers
            .get("outbox-created-at")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
        if created.is_none() {
            fail("outbox-created-at missing or not RFC 3339".into());
        }
        if let (Some(key), Some(seq)) = (e.key.as_deref(), e.seq) {
            let home = key_home.entry(key).or_insert_with(|| tp.clone());
            if *home != tp {
                fail(format!("key {key} on {tp:?} and on {home:?}"));
            }
            if first {
                let last = last_seq.entry(key).or_insert(0);
                if seq <= *last {
                    fail(format!(
                        "key {key}: first occurrence of seq {seq} after seq {last} (per-key order broken)"
                    ));
                }
                *last = (*last).max(seq);
            }
        }
    }
    let distinct = copies.len();
    let missing: Vec<(i64, &str)> = committed
        .values()
        .filter(|e| !copies.contains_key(e.token.as_str()))
        .map(|e| (e.id, e.token.as_str()))
        .collect();
    if !missing.is_empty() {
        violations.push(format!(
            "{} committed events never reached Kafka, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    let mut duplicated: Vec<i64> = copies
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(token, _)| committed[*token].id)
        .collect();
    duplicated.sort();
    duplicated.truncate(20);
    let report = Report {
        records,
        distinct,
        duplicates: copies.values().map(|n| n - 1).sum(),
        max_copies: copies.values().copied().max().unwrap_or(0),
        duplicated,
    };
    (report, violations)
}
