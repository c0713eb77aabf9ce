//! The one writer and the one checker, for every suite that checks delivery (tests/relay.rs
//! and the fault harness, tests/faults/harness.rs).
//!
//! - **Writers** ([`Load`]): concurrent connections committing transactions, each event of a
//!   key taking the key's next sequence number in `key_seq` under the key's lock, so a key's
//!   commit order is its sequence order. Two [`Shape`]s: [`Shape::EarlyLock`], one event a
//!   transaction whose key's advisory lock is taken before the transaction's first write (one
//!   key, one lock: the simplest load); [`Shape::LateLocks`], ordinary application transactions (an audit event
//!   first, then 1-5 aggregates in random order, each locked right before its event; deadlocks
//!   abort some). As the [`LoadSpec`] says, some roll back, some stay open a while (so they
//!   commit out of id order), some events have no key or no payload. Connection errors are
//!   retried, and a COMMIT whose outcome is unknown is resolved by looking a row up. Every
//!   event carries a token (header [`TOKEN_HEADER`], and the payload's `tok:<token>|` prefix)
//!   naming it in the [`Ledger`].
//! - **The checker** ([`consume_and_check`]): reads the topics back from the beginning
//!   (read_committed: nothing of an aborted or open Kafka transaction) and checks every
//!   committed event arrived byte for byte (topic, key, payload, headers, the relay's
//!   `outbox-*` headers), no rolled-back or unknown event did, a key stays on one partition,
//!   and per key the first occurrences of the events with a sequence number are in sequence
//!   order (audit and unkeyed events have none: no order is defined for them); it counts
//!   duplicates.
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

/// What one writer transaction does, and where it takes its locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One event a transaction. Its key's advisory lock (and sequence bump) is the
    /// transaction's first write ([`BUMP_SQL`]).
    EarlyLock,
    /// An ordinary application transaction: an audit event first (keys `audit-0` ..
    /// `audit-3`, or none; not order-checked: see [`Expected::seq`]), then 1 aggregate (80%) or
    /// 2-5 (20%) in random order, not sorted, each locked right before its event is inserted
    /// (a row lock by the `key_seq` upsert, or `pg_advisory_xact_lock` then the upsert) and its
    /// sequence number taken under that lock, so a key's commit order is its sequence order.
    /// Locks are taken after earlier writes, so concurrent transactions may deadlock: PostgreSQL
    /// aborts one, recorded as rolled back ([`Ledger::deadlocks`]), and its writer goes on.
    LateLocks,
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
    /// Share of transactions held open 100-500 ms (they commit out of id order): before COMMIT
    /// ([`Shape::EarlyLock`]), or at a random point after the audit event ([`Shape::LateLocks`]:
    /// before an aggregate's lock, or before COMMIT with the locks held).
    pub hold: f64,
    /// Share of events without a key (not ordered; for [`Shape::LateLocks`], of audit events),
    /// and of tombstones (NULL payload).
    pub null_key: f64,
    pub tombstone: f64,
    pub shape: Shape,
    /// [`Shape::LateLocks`]: share of transactions writing 2-5 aggregates (the others write 1).
    pub multi: f64,
}

impl LoadSpec {
    /// The mixed load the fault scenarios run under ([`Shape::EarlyLock`]; see
    /// [`LoadSpec::late_locks`]).
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
            shape: Shape::EarlyLock,
            multi: 0.2,
        }
    }

    /// `transactions` transactions from `writers` writers (an equal share each, as fast as
    /// they go) on `keys` keys: none rolls back (but a [`Shape::LateLocks`] one may deadlock),
    /// every event has a key and a payload. [`Shape::EarlyLock`]: one event a transaction.
    pub fn counted(
        topics: &[String],
        writers: usize,
        keys: usize,
        transactions: usize,
    ) -> LoadSpec {
        assert_eq!(
            transactions % writers,
            0,
            "{transactions} transactions in equal shares of {writers}"
        );
        LoadSpec {
            writers,
            keys,
            max_per_writer: transactions / writers,
            gap_ms: (0, 0),
            rollback: 0.0,
            hold: 0.0,
            null_key: 0.0,
            tombstone: 0.0,
            ..LoadSpec::new(topics)
        }
    }

    /// The same load in [`Shape::LateLocks`]: ordinary application transactions.
    pub fn late_locks(self) -> LoadSpec {
        LoadSpec {
            shape: Shape::LateLocks,
            ..self
        }
    }

    /// The key of index `k`: some ASCII, some not (keys are compared byte for byte).
    pub fn key(k: usize) -> String {
        if k.is_multiple_of(2) {
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

/// Keys of the audit events of [`Shape::LateLocks`] (`audit-0` ..): shared by every writer,
/// written before any lock, so their order between transactions is not defined.
pub const AUDIT_KEYS: usize = 4;

/// A committed event as its writer knows it: what Kafka must carry, byte for byte.
#[derive(Debug, Clone)]
pub struct Expected {
    pub id: i64,
    pub token: String,
    pub topic: String,
    pub key: Option<String>,
    /// The key's sequence number, taken under the key's lock in the same transaction: the
    /// checker checks per-key order (first occurrences in sequence order) exactly for the
    /// events that have one. None for unkeyed events and for audit events (written before any
    /// lock, so nothing orders them): those are checked for everything but order.
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
    /// Unknown COMMIT outcomes not resolved yet (the database was down), one transaction's
    /// events each: the fault suite's `verify` resolves them.
    pub unresolved: Vec<Vec<Expected>>,
    /// Transactions committed (a [`Shape::LateLocks`] one commits several events).
    pub transactions: usize,
    /// Transactions rolled back: by plan, or aborted by a deadlock.
    pub rolled_back: usize,
    /// Of `rolled_back`: aborted by PostgreSQL's deadlock detector ([`Shape::LateLocks`]).
    pub deadlocks: usize,
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
        self.transactions += other.transactions;
        self.rolled_back += other.rolled_back;
        self.deadlocks += other.deadlocks;
        self.failed += other.failed;
        self.ambiguous_committed += other.ambiguous_committed;
        self.ambiguous_aborted += other.ambiguous_aborted;
    }

    pub fn add(&mut self, e: Expected) {
        self.committed.insert(e.token.clone(), e);
    }

    /// A committed transaction's events.
    pub fn add_transaction(&mut self, events: Vec<Expected>) {
        self.transactions += 1;
        for e in events {
            self.add(e);
        }
    }

    /// An unknown COMMIT outcome of a transaction, found out (see [`resolve`]).
    pub fn resolved(&mut self, events: Vec<Expected>, committed: bool) {
        if committed {
            self.ambiguous_committed += 1;
            self.add_transaction(events);
        } else {
            self.ambiguous_aborted += 1;
            self.not_committed
                .extend(events.into_iter().map(|e| e.token));
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

/// [`Shape::EarlyLock`]: the key's lock is taken before the transaction's first write (two
/// upserts creating a new key would otherwise both run before either holds the row).
const BUMP_SQL: &str = "WITH l AS (SELECT pg_advisory_xact_lock(hashtext($1))) \
     INSERT INTO key_seq SELECT $1, 1 FROM l ON CONFLICT (key) DO UPDATE SET seq = key_seq.seq + 1 RETURNING seq";
/// [`Shape::LateLocks`]: the aggregate's row lock (`UPDATE ... RETURNING seq` once the row
/// exists; a second creator of a new key waits for the first one's transaction) and its next
/// sequence number, after the transaction's earlier writes.
const UPSERT_SQL: &str = "INSERT INTO key_seq VALUES ($1, 1) \
     ON CONFLICT (key) DO UPDATE SET seq = key_seq.seq + 1 RETURNING seq";
/// [`Shape::LateLocks`]: an advisory lock taken right before the aggregate's update.
const ADVISORY_SQL: &str = "SELECT pg_advisory_xact_lock(hashtext($1))";
const INSERT_SQL: &str =
    "INSERT INTO outbox (topic, key, payload, headers) VALUES ($1, $2, $3, $4) RETURNING id";
const EXISTS_SQL: &str = "SELECT EXISTS (SELECT 1 FROM outbox WHERE id = $1 AND headers->>$3 = $2)";

/// One event's plan.
pub struct Planned {
    pub token: String,
    pub topic: String,
    pub key: Option<String>,
    pub tombstone: bool,
    pub noise: Vec<u8>,
}

impl Planned {
    /// The event as committed, its key's sequence number being `seq`.
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

/// How a step of a transaction takes its key's sequence number before inserting its event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lock {
    /// No sequence number: an unkeyed or audit event.
    None,
    /// [`BUMP_SQL`]: advisory lock and bump in one statement (the transaction's first write).
    Early,
    /// [`UPSERT_SQL`] alone: the aggregate's row lock.
    Row,
    /// [`ADVISORY_SQL`], then [`UPSERT_SQL`].
    Advisory,
}

/// One transaction's plan: its events in insert order, each with how it is sequenced.
struct Transaction {
    steps: Vec<(Planned, Lock)>,
    /// Stay open this long before step `.1` (`steps.len()`: before COMMIT).
    hold: Option<(Duration, usize)>,
    rollback: bool,
}

impl Transaction {
    fn tokens(&self) -> impl Iterator<Item = String> + '_ {
        self.steps.iter().map(|(p, _)| p.token.clone())
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

/// Run one transaction. `commit_sent` holds its events once COMMIT was sent: if an error
/// follows, the outcome is unknown.
async fn run_transaction(
    pool: &PgPool,
    t: &Transaction,
    commit_sent: &mut Vec<Expected>,
) -> Result<Option<Vec<Expected>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut events = Vec::with_capacity(t.steps.len());
    for (i, (planned, lock)) in t.steps.iter().enumerate() {
        if let Some((hold, at)) = t.hold {
            if at == i {
                tokio::time::sleep(hold).await;
            }
        }
        let key = || planned.key.as_deref().expect("a sequenced event has a key");
        let bump = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql).bind(key());
        let seq = match lock {
            Lock::None => None,
            Lock::Early => Some(bump(BUMP_SQL).fetch_one(&mut *tx).await?),
            Lock::Row => Some(bump(UPSERT_SQL).fetch_one(&mut *tx).await?),
            Lock::Advisory => {
                sqlx::query(ADVISORY_SQL)
                    .bind(key())
                    .execute(&mut *tx)
                    .await?;
                Some(bump(UPSERT_SQL).fetch_one(&mut *tx).await?)
            }
        };
        let mut e = planned.expected(seq);
        e.id = insert_event(&mut *tx, &e).await?;
        events.push(e);
    }
    if let Some((hold, at)) = t.hold {
        if at >= t.steps.len() {
            tokio::time::sleep(hold).await;
        }
    }
    if t.rollback {
        tx.rollback().await?;
        return Ok(None);
    }
    *commit_sent = events.clone();
    tx.commit().await?;
    Ok(Some(events))
}

/// Did PostgreSQL abort the transaction to break a deadlock?
fn is_deadlock(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("40P01"))
}

/// Did this transaction commit? Asked of its first event. (The id alone is not proof: after
/// a crash PostgreSQL may hand out a sequence value again, so the row must also carry the
/// event's token.)
async fn committed(pool: &PgPool, events: &[Expected]) -> Result<bool, sqlx::Error> {
    let e = events.first().expect("a transaction writes an event");
    sqlx::query_scalar(EXISTS_SQL)
        .bind(e.id)
        .bind(&e.token)
        .bind(TOKEN_HEADER)
        .fetch_one(pool)
        .await
}

/// [`committed`], asked again through errors (the database may be restarting) until `within`
/// passed: then the last error.
pub async fn resolve(
    pool: &PgPool,
    events: &[Expected],
    within: Duration,
) -> Result<bool, sqlx::Error> {
    let deadline = Instant::now() + within;
    loop {
        match committed(pool, events).await {
            Ok(committed) => return Ok(committed),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(err) => return Err(err),
        }
    }
}

fn noise(rng: &mut StdRng) -> Vec<u8> {
    let mut v = vec![0u8; rng.random_range(0..48)];
    rng.fill(&mut v[..]);
    v
}

/// [`Shape::EarlyLock`]: one event; its key (if any) locked and bumped first.
fn plan_early_lock(spec: &LoadSpec, rng: &mut StdRng, token: String) -> Transaction {
    let keyed = !rng.random_bool(spec.null_key);
    let k = rng.random_range(0..spec.keys);
    let planned = Planned {
        token,
        topic: if keyed {
            spec.topic_of(k).to_string()
        } else {
            spec.topics[rng.random_range(0..spec.topics.len())].clone()
        },
        key: keyed.then(|| LoadSpec::key(k)),
        tombstone: rng.random_bool(spec.tombstone),
        noise: noise(rng),
    };
    let hold = rng
        .random_bool(spec.hold)
        .then(|| (Duration::from_millis(rng.random_range(100..500)), 1));
    let lock = if keyed { Lock::Early } else { Lock::None };
    Transaction {
        steps: vec![(planned, lock)],
        hold,
        rollback: rng.random_bool(spec.rollback),
    }
}

/// [`Shape::LateLocks`]: an audit event, then 1-5 distinct aggregates in random order, each
/// locked right before its event.
fn plan_late_locks(spec: &LoadSpec, rng: &mut StdRng, token: String) -> Transaction {
    let audit_key = (!rng.random_bool(spec.null_key)).then(|| rng.random_range(0..AUDIT_KEYS));
    // One topic per audit key (a key lives on one topic), any topic without a key.
    let topic = match audit_key {
        Some(a) => a % spec.topics.len(),
        None => rng.random_range(0..spec.topics.len()),
    };
    let audit = Planned {
        token: format!("{token}-audit"),
        topic: spec.topics[topic].clone(),
        key: audit_key.map(|a| format!("audit-{a}")),
        tombstone: rng.random_bool(spec.tombstone),
        noise: noise(rng),
    };
    let n = if rng.random_bool(spec.multi) {
        rng.random_range(2..=5)
    } else {
        1
    };
    assert!(spec.keys >= 5, "LateLocks needs at least 5 keys");
    let mut keys: Vec<usize> = Vec::with_capacity(n);
    while keys.len() < n {
        let k = rng.random_range(0..spec.keys);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut steps = vec![(audit, Lock::None)];
    for (j, k) in keys.into_iter().enumerate() {
        let lock = if rng.random_bool(0.5) {
            Lock::Row
        } else {
            Lock::Advisory
        };
        let planned = Planned {
            token: format!("{token}-a{j}"),
            topic: spec.topic_of(k).to_string(),
            key: Some(LoadSpec::key(k)),
            tombstone: rng.random_bool(spec.tombstone),
            noise: noise(rng),
        };
        steps.push((planned, lock));
    }
    // After the audit event: before one of the aggregates' locks, or before COMMIT.
    let hold = rng.random_bool(spec.hold).then(|| {
        (
            Duration::from_millis(rng.random_range(100..500)),
            rng.random_range(1..=steps.len()),
        )
    });
    Transaction {
        steps,
        hold,
        rollback: rng.random_bool(spec.rollback),
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
        let token = format!("{}-w{w}-n{n}", ctx.label());
        let t = match spec.shape {
            Shape::EarlyLock => plan_early_lock(&spec, &mut rng, token),
            Shape::LateLocks => plan_late_locks(&spec, &mut rng, token),
        };
        let mut commit_sent = Vec::new();
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            run_transaction(&pool, &t, &mut commit_sent),
        )
        .await
        .unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut));
        match outcome {
            Ok(Some(events)) => {
                committed_count.fetch_add(events.len() as u64, Ordering::Relaxed);
                ledger.add_transaction(events);
            }
            Ok(None) => {
                ledger.rolled_back += 1;
                ledger.not_committed.extend(t.tokens());
            }
            // PostgreSQL aborted it to break a deadlock (locks taken late): rolled back.
            Err(e) if commit_sent.is_empty() && is_deadlock(&e) => {
                ledger.rolled_back += 1;
                ledger.deadlocks += 1;
                ledger.not_committed.extend(t.tokens());
            }
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                if commit_sent.is_empty() {
                    ledger.failed += 1;
                    ledger.not_committed.extend(t.tokens());
                } else {
                    // COMMIT was sent and no answer came back: look the rows up.
                    let events = commit_sent;
                    match resolve(&pool, &events, Duration::from_secs(60)).await {
                        Ok(committed) => {
                            if committed {
                                committed_count.fetch_add(events.len() as u64, Ordering::Relaxed);
                            }
                            ledger.resolved(events, committed);
                        }
                        Err(_) => ledger.unresolved.push(events),
                    }
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
            "load: {} writers, {} keys on {} topics, {:?}",
            spec.writers,
            spec.keys,
            spec.topics.len(),
            spec.shape
        ));
        Load {
            stop,
            tasks,
            committed,
            errors,
            ctx,
        }
    }

    /// Events committed so far.
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
            "load ended: {} events in {} transactions committed ({} after an unknown COMMIT outcome), {} rolled back ({} by a deadlock), {} failed, {} unknown outcomes not committed, {} unresolved, {} errors",
            ledger.committed.len(),
            ledger.transactions,
            ledger.ambiguous_committed,
            ledger.rolled_back,
            ledger.deadlocks,
            ledger.failed,
            ledger.ambiguous_aborted,
            ledger.unresolved.len(),
            self.errors.load(Ordering::Relaxed)
        ));
        ledger
    }
}

/// Run a counted load ([`LoadSpec::counted`]) to its end on `pool`: every transaction must
/// commit at the first try, but for those a deadlock aborted ([`Shape::LateLocks`]).
pub async fn write(pool: PgPool, spec: LoadSpec) -> Ledger {
    sqlx::query(KEY_SEQ_SQL).execute(&pool).await.unwrap();
    let transactions = spec.writers * spec.max_per_writer;
    let ctx = Plain::new();
    let tag = ctx.tag();
    let ledger = Load::start(ctx, pool, spec).finish().await;
    let unknown = ledger.ambiguous_committed + ledger.ambiguous_aborted + ledger.unresolved.len();
    assert_eq!(
        (
            ledger.transactions + ledger.deadlocks,
            ledger.rolled_back - ledger.deadlocks,
            ledger.failed,
            unknown
        ),
        (transactions, 0, 0, 0),
        "(committed + deadlocked transactions, rolled back otherwise, failed, unknown outcomes) {tag}"
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
    /// Of `distinct`: events with no sequence number (audit and unkeyed events), checked for
    /// everything but order.
    pub unordered: usize,
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
        // librdkafka's default, stated: records of aborted Kafka transactions (and of open
        // ones) are never read, which is what `--delivery exactly-once` promises consumers.
        .set("isolation.level", "read_committed")
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
    let mut unordered = 0usize;
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
            None => {
                // Nothing to read for now: the consumer's own positions, which pass what it
                // never hands out (transaction markers, aborted records), so a partition that
                // ends with a marker counts as read to its end.
                if let Ok(at) = consumer.position() {
                    for e in at.elements() {
                        if let Offset::Offset(o) = e.offset() {
                            let tp = (e.topic().to_string(), e.partition());
                            let known = position.entry(tp).or_insert(0);
                            *known = (*known).max(o);
                        }
                    }
                }
                continue;
            }
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
        if let Some(key) = e.key.as_deref() {
            let home = key_home.entry(key).or_insert_with(|| tp.clone());
            if *home != tp {
                fail(format!("key {key} on {tp:?} and on {home:?}"));
            }
        }
        // Per-key order is checked for the events whose sequence number was taken under their
        // key's lock, and only for them: an audit event (written before any lock) or an unkeyed
        // event has no defined order among concurrent transactions. Each is still checked
        // above (bytes, partition) and below (exactly once, never if not committed).
        match (e.key.as_deref(), e.seq) {
            (Some(key), Some(seq)) if first => {
                let last = last_seq.entry(key).or_insert(0);
                if seq <= *last {
                    fail(format!(
                        "key {key}: first occurrence of seq {seq} after seq {last} (per-key order broken)"
                    ));
                }
                *last = (*last).max(seq);
            }
            (_, None) if first => unordered += 1,
            _ => {}
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
        unordered,
        duplicates: copies.values().map(|n| n - 1).sum(),
        max_copies: copies.values().copied().max().unwrap_or(0),
        duplicated,
    };
    (report, violations)
}
