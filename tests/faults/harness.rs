//! Harness for the fault-injection suite (`tests/faults.rs`).
//!
//! - **Dedicated services.** The suite starts its own PostgreSQL (127.0.0.1:55433, data in
//!   `.local/fault-pg`) and Kafka (127.0.0.1:29192, controller 29193, SASL 29194, data in
//!   `.local/fault-kafka`) through `scripts/pg.sh` and `scripts/kafka.sh`, so it may kill,
//!   pause and restart them without disturbing the services other test files use. They are
//!   started lazily (the scripts are idempotent) and left running; stop them with
//!   `OUTBOX_PG_DIR=.local/fault-pg OUTBOX_PG_PORT=55433 scripts/pg.sh stop` and
//!   `OUTBOX_KAFKA_DIR=.local/fault-kafka OUTBOX_KAFKA_PORT=29192 OUTBOX_KAFKA_CONTROLLER_PORT=29193
//!   OUTBOX_KAFKA_SASL_PORT=29194 scripts/kafka.sh stop`.
//! - **One scenario at a time** ([`run_scenario`] holds a lock within the process, and one
//!   across processes: the listening socket 127.0.0.1:29195, so two `cargo test` runs in one
//!   checkout take turns), each with a fresh database and fresh topics, and a seed
//!   (`OUTBOX_FAULT_SEED`, else random) printed at the start and in every assertion message.
//! - **Replicas** of the relay binary ([`Fleet`]), found as leader through `/metrics`.
//! - **Writers**: the shared ones (`tests/common/load.rs`, as tests/relay.rs uses them) commit
//!   events under load while faults happen (`LoadSpec::new`; in claim and log mode
//!   `late_locks()`, ordinary application transactions), plus [`Bursts`] of events and a
//!   [`LongTx`] held open.
//! - **Log mode** ([`Mode::Log`]) marks no row: progress and the drain are the slot's confirmed
//!   position passing the WAL position of the moment ([`FaultDb::wait_progress`]), and the
//!   topics' watermarks ([`Watermarks`]) measure what a fault may cost in duplicates.
//! - **One checker** ([`verify`]) every scenario ends with: the table, then Kafka through the
//!   shared checker ([`consume_and_check`](crate::common::load::consume_and_check)).

use std::fmt::Write as _;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgPool};

use crate::common::load::{
    assert_checked, check, check_key_seq, fnv, insert_event, resolve, Expected, Ledger, Planned,
    Reading, Report, Scenario, KEY_SEQ_SQL, TOKEN_HEADER,
};
use crate::common::{
    create_topics_on, http_get, log_dir, metric, relay_command, strs, unique, Relay,
};

pub const PG_PORT: u16 = 55433;
pub const KAFKA_PORT: u16 = 29192;
pub const KAFKA_CONTROLLER_PORT: u16 = 29193;
pub const KAFKA_SASL_PORT: u16 = 29194;
/// Partitions of every topic the suite creates.
pub const PARTITIONS: i32 = 3;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The environment that points scripts/pg.sh and scripts/kafka.sh at this suite's instances.
fn instance_env() -> Vec<(&'static str, String)> {
    let local = root().join(".local");
    let path = |p: &str| local.join(p).to_string_lossy().into_owned();
    vec![
        ("OUTBOX_PG_DIR", path("fault-pg")),
        ("OUTBOX_PG_PORT", PG_PORT.to_string()),
        ("OUTBOX_KAFKA_DIR", path("fault-kafka")),
        ("OUTBOX_KAFKA_PORT", KAFKA_PORT.to_string()),
        (
            "OUTBOX_KAFKA_CONTROLLER_PORT",
            KAFKA_CONTROLLER_PORT.to_string(),
        ),
        ("OUTBOX_KAFKA_SASL_PORT", KAFKA_SASL_PORT.to_string()),
        ("OUTBOX_CERTS_DIR", path("fault-certs")),
    ]
}

pub fn brokers() -> String {
    format!("127.0.0.1:{KAFKA_PORT}")
}

fn admin_url() -> String {
    format!("postgres://postgres@127.0.0.1:{PG_PORT}/postgres")
}

/// Run `scripts/<name> args...` against this suite's instances: Ok(stdout) or Err(output).
pub fn script(name: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(root().join("scripts").join(name))
        .args(args)
        .envs(instance_env())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/{name}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "scripts/{name} {} exited with {}:\n{stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `script`, off the async runtime, panicking (with the scenario tag) on failure.
pub async fn service(ctx: &Ctx, name: &'static str, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || script(name, &strs(&args)))
        .await
        .unwrap();
    match out {
        Ok(out) => {
            ctx.say(&format!(
                "{name}: {} ({:.1}s)",
                out.lines().last().unwrap_or(""),
                started.elapsed().as_secs_f64()
            ));
            out
        }
        Err(e) => panic!("{} {e}", ctx.tag()),
    }
}

/// Bring both instances up (and un-pause Kafka: a failed scenario may have left it paused).
fn ensure_services() {
    if let Ok(status) = script("kafka.sh", &["status"]) {
        if status.contains("paused") {
            script("kafka.sh", &["resume"]).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    script("pg.sh", &["start"]).unwrap_or_else(|e| panic!("fault-suite PostgreSQL: {e}"));
    script("kafka.sh", &["start"]).unwrap_or_else(|e| panic!("fault-suite Kafka: {e}"));
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Held while a scenario runs, across processes: two test processes (say, two `cargo test`
/// runs in the same checkout) would otherwise kill and restart each other's services. A bound
/// listening socket is exclusive and is released when the process dies, however it dies.
pub const LOCK_PORT: u16 = 29195;

fn cross_process_lock(ctx: &Ctx) -> std::net::TcpListener {
    let start = Instant::now();
    let mut told = false;
    loop {
        match std::net::TcpListener::bind(("127.0.0.1", LOCK_PORT)) {
            Ok(lock) => return lock,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if !told {
                    ctx.say(&format!(
                        "waiting: another process runs the fault suite (it holds 127.0.0.1:{LOCK_PORT})"
                    ));
                    told = true;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(3600),
                    "another process held the fault-suite lock (127.0.0.1:{LOCK_PORT}) for an hour"
                );
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("cannot take the fault-suite lock 127.0.0.1:{LOCK_PORT}: {e}"),
        }
    }
}

/// The seed for this test process: OUTBOX_FAULT_SEED, or random.
pub fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| match std::env::var("OUTBOX_FAULT_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("OUTBOX_FAULT_SEED={s:?} is not an unsigned integer")),
        Err(_) => rand::random::<u32>() as u64,
    })
}

/// OUTBOX_SOAK=1: longer scenarios with more faults, and the 1,000,000-row backlog.
pub fn soak() -> bool {
    std::env::var("OUTBOX_SOAK").is_ok_and(|v| v == "1")
}

/// The relay's read mode a scenario runs in: the table is migrated for it and every replica
/// runs with it (`--read-mode`; claim mode passes no flag, the default). Log mode also names
/// the scenario's own slot and publication ([`FaultDb::mode_args`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Claim,
    Log,
}

/// Rows claim mode has published (marked).
pub const PUBLISHED: &str = "failed_at IS NULL AND published_at IS NOT NULL";
/// Rows still to publish in claim mode.
pub const PENDING: &str = "published_at IS NULL AND failed_at IS NULL";

/// The running scenario: its name, read mode, seed and clock.
pub struct Ctx {
    pub name: &'static str,
    pub mode: Mode,
    pub seed: u64,
    pub soak: bool,
    pub started: Instant,
    /// `--lease-duration 3s` when the binary has the flag (the lease-based leader election).
    pub lease: bool,
}

impl Ctx {
    /// Appended to every assertion message: how to reproduce.
    pub fn tag(&self) -> String {
        format!(
            "[scenario {} seed {} (rerun: OUTBOX_FAULT_SEED={} cargo test --test faults {} -- --exact)]",
            self.name, self.seed, self.seed, self.name
        )
    }

    /// A reproducible random stream for one purpose of this scenario.
    pub fn rng(&self, purpose: &str) -> StdRng {
        StdRng::seed_from_u64(self.seed ^ fnv(self.name) ^ fnv(purpose).rotate_left(17))
    }

    /// Print a line even when libtest captures output, and keep it in test-logs/faults-summary.log.
    pub fn say(&self, line: &str) {
        let line = format!(
            "[faults {} +{:.1}s] {line}\n",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir().join("faults-summary.log"))
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

impl Scenario for Ctx {
    fn label(&self) -> String {
        format!("{}-{}", self.name, self.seed)
    }

    fn rng(&self, purpose: &str) -> StdRng {
        Ctx::rng(self, purpose)
    }

    fn say(&self, line: &str) {
        Ctx::say(self, line)
    }

    fn tag(&self) -> String {
        Ctx::tag(self)
    }
}

fn supports_lease() -> bool {
    static LEASE: OnceLock<bool> = OnceLock::new();
    *LEASE.get_or_init(|| {
        let out = relay_command(&["run", "--help"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("--lease-duration")
    })
}

/// Run one scenario in claim mode (the default read mode): see [`run_scenario_in`].
pub fn run_scenario<F, Fut>(name: &'static str, limit: Duration, body: F)
where
    F: FnOnce(Arc<Ctx>) -> Fut,
    Fut: Future<Output = ()>,
{
    run_scenario_in(name, Mode::Claim, limit, body)
}

/// Run one scenario in `mode`: take the suite's lock (scenarios never overlap), make sure the
/// dedicated services are up, then run `body` on a fresh multi-threaded runtime within `limit`.
pub fn run_scenario_in<F, Fut>(name: &'static str, mode: Mode, limit: Duration, body: F)
where
    F: FnOnce(Arc<Ctx>) -> Fut,
    Fut: Future<Output = ()>,
{
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut ctx = Ctx {
        name,
        mode,
        seed: seed(),
        soak: soak(),
        started: Instant::now(),
        lease: supports_lease(),
    };
    let _lock = cross_process_lock(&ctx);
    ctx.started = Instant::now();
    let ctx = Arc::new(ctx);
    ctx.say(&format!(
        "start: {:?} mode, seed {} (OUTBOX_FAULT_SEED={}), soak {}, lease flag {}",
        ctx.mode, ctx.seed, ctx.seed, ctx.soak, ctx.lease
    ));
    ensure_services();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let limit = if ctx.soak { limit * 6 } else { limit };
    let tag = ctx.tag();
    rt.block_on(async {
        if tokio::time::timeout(limit, body(ctx.clone()))
            .await
            .is_err()
        {
            panic!("scenario did not finish within {limit:?} {tag}");
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    ctx.say(&format!(
        "passed in {:.1}s",
        ctx.started.elapsed().as_secs_f64()
    ));
}

// ---------------------------------------------------------------------------------------
// Database

/// A fresh database on the suite's PostgreSQL, migrated by the real binary for the scenario's
/// read mode, with the writers' `key_seq` table.
///
/// Log mode: the replication slot and the publication are named after the database. Slots
/// are cluster-wide, pin WAL until dropped, and a database with a slot cannot be dropped:
/// [`FaultDb::drop_database`] drops the slot first, and a failed scenario (which keeps its
/// database to inspect) still drops its slot when the `FaultDb` is dropped (best effort).
pub struct FaultDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    pub opts: PgConnectOptions,
    pub mode: Mode,
    /// Log mode's slot (and publication), until dropped.
    pub slot: Option<String>,
}

impl FaultDb {
    pub async fn create(ctx: &Ctx) -> FaultDb {
        let name = unique(&format!("fault_{}", ctx.name));
        assert!(
            name.len() <= 63,
            "database (and slot) name {name} is longer than 63 bytes {}",
            ctx.tag()
        );
        let slot = (ctx.mode == Mode::Log).then(|| name.clone());
        let mut admin = sqlx::PgConnection::connect(&admin_url())
            .await
            .unwrap_or_else(|e| panic!("fault-suite PostgreSQL unreachable: {e} {}", ctx.tag()));
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        let _ = admin.close().await;
        let url = format!("postgres://postgres@127.0.0.1:{PG_PORT}/{name}");
        let mut migrate = relay_command(&["migrate", "--database-url", &url]);
        migrate.args(mode_args(ctx.mode, slot.as_deref()));
        let out = tokio::task::spawn_blocking(move || migrate.output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "outbox-relay migrate failed: {} {}",
            String::from_utf8_lossy(&out.stderr),
            ctx.tag()
        );
        let opts: PgConnectOptions = url.parse().unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(opts.clone().application_name("fault-checker"));
        sqlx::query(KEY_SEQ_SQL).execute(&pool).await.unwrap();
        ctx.say(&format!("database {name}"));
        FaultDb {
            name,
            url,
            pool,
            opts,
            mode: ctx.mode,
            slot,
        }
    }

    /// The flags `migrate` and every replica's `run` get for the scenario's read mode.
    pub fn mode_args(&self) -> Vec<String> {
        mode_args(self.mode, self.slot.as_deref())
    }

    /// Log mode: the slot's confirmed position (bytes of WAL); -1 without the slot.
    pub async fn confirmed(&self, ctx: &Ctx) -> i64 {
        let slot = self.slot.as_deref().expect("log mode only");
        self.scalar(
            ctx,
            &format!(
                "SELECT coalesce((SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 \
                 FROM pg_replication_slots WHERE slot_name = '{slot}'), -1)"
            ),
        )
        .await
    }

    /// The server's current WAL position (bytes).
    pub async fn wal_lsn(&self, ctx: &Ctx) -> i64 {
        self.scalar(ctx, "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8")
            .await
    }

    /// Log mode: wait until the slot's confirmed position passes the WAL position of now, i.e.
    /// every event committed before this call was delivered (the relay confirms only past
    /// transactions whose every event has a delivery report). Returns the wait.
    async fn wait_confirmed_past_now(&self, ctx: &Ctx, what: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        let target = self.wal_lsn(ctx).await;
        let from = self.confirmed(ctx).await;
        loop {
            let now = self.confirmed(ctx).await;
            if now >= target {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "{what}: the slot's confirmed position did not pass the WAL position {target} within {timeout:?} \
                 ({from} -> {now}, {} bytes behind) {}",
                target - now,
                ctx.tag()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A pool for `writers` writers (`Load::start`): named fault-writer, failing fast while
    /// the database is down.
    pub fn writer_pool(&self, writers: usize) -> PgPool {
        PgPoolOptions::new()
            .max_connections(writers as u32 + 2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(self.opts.clone().application_name("fault-writer"))
    }

    /// A single-number query, retried through database outages (up to 2 minutes).
    pub async fn scalar(&self, ctx: &Ctx, sql: &str) -> i64 {
        let start = Instant::now();
        loop {
            match sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql.to_string()))
                .fetch_one(&self.pool)
                .await
            {
                Ok(v) => return v,
                Err(_) if start.elapsed() < Duration::from_secs(120) => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                Err(e) => panic!("{sql}: {e} {}", ctx.tag()),
            }
        }
    }

    pub async fn pending(&self, ctx: &Ctx) -> i64 {
        self.scalar(ctx, &format!("SELECT count(*) FROM outbox WHERE {PENDING}"))
            .await
    }

    pub async fn published(&self, ctx: &Ctx) -> i64 {
        self.scalar(
            ctx,
            &format!("SELECT count(*) FROM outbox WHERE {PUBLISHED}"),
        )
        .await
    }

    /// Wait until `by` more rows are published than now: publishing works (again). Log mode
    /// marks no row: there, until everything committed before the call is confirmed (a
    /// stronger condition; `by` is not used).
    pub async fn wait_progress(&self, ctx: &Ctx, by: i64, timeout: Duration) -> Duration {
        if self.mode == Mode::Log {
            return self
                .wait_confirmed_past_now(ctx, "publishing made no progress", timeout)
                .await;
        }
        let start = Instant::now();
        let from = self.published(ctx).await;
        loop {
            let now = self.published(ctx).await;
            if now >= from + by {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "publishing made no progress for {timeout:?} ({from} -> {now} published, {} pending) {}",
                self.pending(ctx).await,
                ctx.tag()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until no committed row is left pending (published or parked). Log mode: until
    /// the slot's confirmed position passes everything committed before the call.
    pub async fn wait_drained(&self, ctx: &Ctx, timeout: Duration) -> Duration {
        if self.mode == Mode::Log {
            return self
                .wait_confirmed_past_now(ctx, "not drained", timeout)
                .await;
        }
        let start = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let pending = self.pending(ctx).await;
            if pending == 0 {
                return start.elapsed();
            }
            if last_report.elapsed() > Duration::from_secs(15) {
                ctx.say(&format!("draining: {pending} rows still pending"));
                last_report = Instant::now();
            }
            assert!(
                start.elapsed() < timeout,
                "{pending} committed rows still pending {timeout:?} after the load stopped {}",
                ctx.tag()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Drop the database (only after a passing scenario: a failed one is kept to inspect),
    /// log mode's slot first (a database with a slot cannot be dropped).
    pub async fn drop_database(mut self) {
        self.pool.close().await;
        if let Some(slot) = self.slot.take() {
            drop_slot(&slot).await;
        }
        if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url()).await {
            let _ = sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

/// A failed scenario keeps its database, but not its slot: a slot left behind would pin WAL
/// for good and use up `max_replication_slots` (16) for the scenarios after it. The replicas,
/// declared after the database in every scenario, are killed by then.
impl Drop for FaultDb {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(drop_slot(&slot));
            })
            .join();
        }
    }
}

fn mode_args(mode: Mode, slot: Option<&str>) -> Vec<String> {
    match (mode, slot) {
        (Mode::Claim, _) => vec![],
        (Mode::Log, Some(slot)) => ["--read-mode", "log", "--slot", slot, "--publication", slot]
            .iter()
            .map(|a| a.to_string())
            .collect(),
        (Mode::Log, None) => panic!("log mode without a slot"),
    }
}

/// Drop a replication slot, ending the session that holds it (a relay that just exited may
/// hold it for a moment); best effort, for up to 10 s.
async fn drop_slot(slot: &str) {
    let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url()).await else {
        return;
    };
    for _ in 0..100 {
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
        )
        .bind(slot)
        .execute(&mut admin)
        .await;
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(slot)
        .execute(&mut admin)
        .await;
        if dropped.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Kafka topics

/// `n` fresh topics of PARTITIONS partitions on the suite's Kafka, ready (every partition led).
pub async fn create_topics(ctx: &Ctx, n: usize) -> Vec<String> {
    let names: Vec<String> = (0..n)
        .map(|i| unique(&format!("fault_{}_{i}", ctx.name)))
        .collect();
    create_topics_on(
        &brokers(),
        &strs(&names),
        PARTITIONS,
        &[],
        TOPIC_READY,
        &ctx.tag(),
    )
    .await;
    names
}

/// The records in the scenario's topics (their high watermarks, summed), sampled every
/// 100 ms in a thread of its own: what was published around a fault, for log mode's
/// duplicate bound ("what was published in the last second before the fault").
pub struct Watermarks {
    samples: Arc<Mutex<Vec<(Instant, i64)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Watermarks {
    pub fn start(topics: &[String]) -> Watermarks {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let samples: Arc<Mutex<Vec<(Instant, i64)>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .unwrap();
        let (topics, into, stopped) = (topics.to_vec(), samples.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let at = Instant::now();
                let mut sum = Some(0);
                for t in &topics {
                    for p in 0..PARTITIONS {
                        sum = match (sum, consumer.fetch_watermarks(t, p, Duration::from_secs(1))) {
                            (Some(s), Ok((_, high))) => Some(s + high),
                            _ => None,
                        };
                    }
                }
                // A sample counts at the time it was asked (the watermarks only grow).
                if let Some(sum) = sum {
                    into.lock().unwrap().push((at, sum));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Watermarks { samples, stop }
    }

    /// At least the records written between `from` and `to`: the first sample at or after `to`
    /// (waited for, up to 30 s) minus the last one at or before `from` (0 before the first).
    pub async fn written_between(&self, from: Instant, to: Instant) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            {
                let samples = self.samples.lock().unwrap();
                if let Some(&(_, high)) = samples.iter().find(|(t, _)| *t >= to) {
                    let low = samples
                        .iter()
                        .rev()
                        .find(|(t, _)| *t <= from)
                        .map_or(0, |s| s.1);
                    return (high - low).max(0) as usize;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no watermark sample of the topics for 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Watermarks {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How long a new topic may take to be ready on the suite's Kafka.
pub const TOPIC_READY: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Relay replicas

/// Peak resident set size (VmHWM) of a process, in kB.
pub fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Replicas of the relay on one database. A slot holds the current process of that replica;
/// a killed replica's slot gets a new process (a new log file) when it is restarted.
pub struct Fleet {
    ctx: Arc<Ctx>,
    db_url: String,
    args: Vec<String>,
    pub slots: Vec<Option<Relay>>,
    generation: Vec<usize>,
    paused: Vec<bool>,
    /// In the log files' names after the seed (see [`Fleet::labelled`]); empty by default.
    label: String,
}

impl Fleet {
    /// `args` are added to the suite's defaults (poll 100ms as every [`Relay::launch`], lease 3s
    /// when supported, the scenario's read mode).
    pub fn new(ctx: &Arc<Ctx>, db: &FaultDb, args: &[&str]) -> Fleet {
        let mut all: Vec<String> = vec![];
        if ctx.lease {
            all.extend(["--lease-duration".into(), "3s".into()]);
        }
        all.extend(db.mode_args());
        all.extend(args.iter().map(|a| a.to_string()));
        Fleet {
            ctx: ctx.clone(),
            db_url: db.url.clone(),
            args: all,
            slots: Vec::new(),
            generation: Vec::new(),
            paused: Vec::new(),
            label: String::new(),
        }
    }

    /// Name the log files `faults-<scenario>-<seed>-<label>-r<replica>.<generation>.log`: for
    /// a scenario that runs more than one fleet (before the first replica is spawned).
    pub fn labelled(mut self, label: &str) -> Fleet {
        assert!(self.slots.is_empty(), "label a fleet before spawning it");
        self.label = format!("-{label}");
        self
    }

    fn launch(&self, slot: usize, generation: usize) -> Relay {
        let log = log_dir().join(format!(
            "faults-{}-{}{}-r{slot}.{generation}.log",
            self.ctx.name, self.ctx.seed, self.label
        ));
        let args = strs(&self.args);
        Relay::launch(
            log,
            &self.db_url,
            &brokers(),
            &args,
            &[("RUST_LOG", "info")],
        )
    }

    /// Start a new replica; returns its slot.
    pub fn spawn(&mut self) -> usize {
        let slot = self.slots.len();
        let relay = self.launch(slot, 0);
        self.slots.push(Some(relay));
        self.generation.push(0);
        self.paused.push(false);
        slot
    }

    /// Start a new process in `slot` (whose previous process is gone).
    pub fn respawn(&mut self, slot: usize) {
        assert!(
            self.slots[slot].is_none(),
            "slot {slot} still has a process"
        );
        self.generation[slot] += 1;
        self.slots[slot] = Some(self.launch(slot, self.generation[slot]));
        self.paused[slot] = false;
    }

    pub fn relay(&self, slot: usize) -> &Relay {
        self.slots[slot].as_ref().expect("no process in this slot")
    }

    pub fn pid(&self, slot: usize) -> u32 {
        self.relay(slot).child.id()
    }

    pub fn log(&self, slot: usize) -> PathBuf {
        self.relay(slot).log.clone()
    }

    /// Live slots (a process is there).
    pub fn live(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&s| self.slots[s].is_some())
            .collect()
    }

    /// GET from a replica, off the runtime; None if it does not answer within 2 s.
    pub async fn get(&self, slot: usize, path: &str) -> Option<(u16, String)> {
        let addr = self.slots[slot].as_ref()?.metrics_addr.clone();
        let path = path.to_string();
        tokio::task::spawn_blocking(move || {
            http_get(&addr, &path, Some(Duration::from_secs(2))).ok()
        })
        .await
        .unwrap()
    }

    pub async fn metrics(&self, slot: usize) -> Option<String> {
        self.get(slot, "/metrics").await.map(|(_, body)| body)
    }

    /// Does this replica say it leads? (`outbox_relay_leader 1`, the whole line.)
    pub async fn says_leader(&self, slot: usize) -> Option<bool> {
        self.metrics(slot)
            .await
            .map(|m| metric(&m, "outbox_relay_leader") == Some(1.0))
    }

    /// The slots (not paused) that say they lead.
    pub async fn leaders(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for slot in self.live() {
            if !self.paused[slot] && self.says_leader(slot).await == Some(true) {
                out.push(slot);
            }
        }
        out
    }

    /// Wait until exactly one unpaused replica says it leads (and none other does).
    pub async fn wait_single_leader(&self, timeout: Duration) -> usize {
        let start = Instant::now();
        loop {
            let leaders = self.leaders().await;
            if leaders.len() == 1 {
                return leaders[0];
            }
            if start.elapsed() >= timeout {
                panic!(
                    "expected exactly one leader within {timeout:?}, have {leaders:?}\n{} {}",
                    self.diagnose().await,
                    self.ctx.tag()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Each replica's state, for failure messages: leader gauge, counters, readiness, log tail.
    pub async fn diagnose(&self) -> String {
        let mut out = String::new();
        for slot in self.live() {
            let relay = self.relay(slot);
            let _ = writeln!(
                out,
                "replica {slot} (pid {}, paused {}, log {:?}):",
                relay.child.id(),
                self.paused[slot],
                relay.log
            );
            if self.paused[slot] {
                continue;
            }
            match self.metrics(slot).await {
                Some(m) => {
                    for l in m.lines().filter(|l| {
                        l.starts_with("outbox_relay_leader")
                            || l.starts_with("outbox_relay_published_total")
                            || l.starts_with("outbox_relay_pending_rows")
                            || l.starts_with("outbox_relay_publish_errors_total")
                    }) {
                        let _ = writeln!(out, "    {l}");
                    }
                }
                None => {
                    let _ = writeln!(out, "    /metrics does not answer");
                }
            }
            if let Some((code, body)) = self.get(slot, "/readyz").await {
                let _ = writeln!(out, "    /readyz {code} {}", body.trim());
            }
            let logs = relay.logs();
            let lines: Vec<&str> = logs.lines().collect();
            for l in &lines[lines.len().saturating_sub(6)..] {
                let _ = writeln!(out, "    | {}", l.chars().take(300).collect::<String>());
            }
        }
        out
    }

    /// Wait until the replica serves /readyz 200 (restarting it on a metrics-port clash).
    pub async fn wait_ready(&mut self, slot: usize, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some((200, _)) = self.get(slot, "/readyz").await {
                return;
            }
            let exited = self.slots[slot].as_mut().unwrap().child.try_wait().unwrap();
            if let Some(status) = exited {
                let logs = self.relay(slot).logs();
                if status.code() == Some(2) && logs.contains("--metrics-addr") {
                    // Another process took the port between free_port() and the bind: retry.
                    self.slots[slot] = None;
                    self.respawn(slot);
                    continue;
                }
                panic!(
                    "replica {slot} exited with {status} while starting; log {:?}:\n{logs} {}",
                    self.log(slot),
                    self.ctx.tag()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "replica {slot} not ready within {timeout:?}; log {:?} {}",
                self.log(slot),
                self.ctx.tag()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_all_ready(&mut self, timeout: Duration) {
        for slot in self.live() {
            self.wait_ready(slot, timeout).await;
        }
    }

    /// Assert the replica's process is still running (it must never exit on faults).
    pub fn assert_running(&mut self, slot: usize) {
        let tag = self.ctx.tag();
        let relay = self.slots[slot].as_mut().unwrap();
        if let Some(status) = relay.child.try_wait().unwrap() {
            panic!(
                "replica {slot} exited ({status}) during the scenario; log {:?} {tag}",
                relay.log
            );
        }
    }

    pub fn assert_all_running(&mut self) {
        for slot in self.live() {
            self.assert_running(slot);
        }
    }

    /// kill -9 (and reap) the replica's process; the slot is empty afterwards.
    pub fn kill9(&mut self, slot: usize) {
        self.assert_running(slot);
        self.slots[slot].take().unwrap().kill9();
        self.paused[slot] = false;
    }

    pub fn pause(&mut self, slot: usize) {
        self.relay(slot).signal("-STOP");
        self.paused[slot] = true;
    }

    pub fn resume(&mut self, slot: usize) {
        self.relay(slot).signal("-CONT");
        self.paused[slot] = false;
    }

    /// SIGTERM the replica and wait for it to exit; the slot is empty afterwards.
    pub async fn terminate(&mut self, slot: usize, timeout: Duration) -> Option<i32> {
        self.assert_running(slot);
        let relay = self.slots[slot].take().unwrap();
        tokio::task::spawn_blocking(move || relay.terminate(timeout))
            .await
            .unwrap()
    }

    /// SIGTERM every replica: each must exit 0 (a graceful stop).
    pub async fn stop_all(&mut self) {
        for slot in self.live() {
            if self.paused[slot] {
                self.resume(slot);
            }
            let log = self.log(slot);
            let code = self.terminate(slot, Duration::from_secs(45)).await;
            assert_eq!(
                code,
                Some(0),
                "replica {slot} did not stop cleanly on SIGTERM; log {log:?} {}",
                self.ctx.tag()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writers

/// Bursts: `n` events committed by one statement (INSERT ... SELECT FROM generate_series) on
/// keys of their own (`burst-0` .. `burst-19`, sequence numbers continuing across bursts), so a
/// fault injected right after one lands while the leader drains a backlog, mid-batch.
pub struct Bursts {
    ctx: Arc<Ctx>,
    topics: Vec<String>,
    fired: usize,
    seq_base: i64,
    pub ledger: Ledger,
}

const BURST_KEYS: i64 = 20;
const BURST_SQL: &str = "INSERT INTO outbox (topic, key, payload, headers) \
     SELECT ($1::text[])[((i % $2) % array_length($1::text[], 1) + 1)::int], 'burst-' || (i % $2), \
            convert_to('tok:' || $3 || i || '|', 'UTF8') || '\\x00fffe'::bytea, \
            jsonb_build_object($6::text, $3 || i, 'seq', ($4 + i / $2 + 1)::text) \
     FROM generate_series(0, $5 - 1) AS i ORDER BY i \
     RETURNING id, headers->>$6";

impl Bursts {
    pub fn new(ctx: &Arc<Ctx>, topics: &[String]) -> Bursts {
        Bursts {
            ctx: ctx.clone(),
            topics: topics.to_vec(),
            fired: 0,
            seq_base: 0,
            ledger: Ledger::default(),
        }
    }

    /// Commit a burst of `n` events (a multiple of 20) and record them.
    pub async fn fire(&mut self, db: &FaultDb, n: i64) {
        assert_eq!(
            n % BURST_KEYS,
            0,
            "a burst is a multiple of {BURST_KEYS} events"
        );
        let prefix = format!("{}-{}-b{}-", self.ctx.name, self.ctx.seed, self.fired);
        let deadline = Instant::now() + Duration::from_secs(60);
        let rows = loop {
            let inserted = sqlx::query_as::<_, (i64, String)>(BURST_SQL)
                .bind(&self.topics)
                .bind(BURST_KEYS)
                .bind(&prefix)
                .bind(self.seq_base)
                .bind(n)
                .bind(TOKEN_HEADER)
                .fetch_all(&db.pool)
                .await;
            let error = match inserted {
                Ok(rows) => break rows,
                Err(e) => e,
            };
            // The connection may have died under the statement (a restarted database): the
            // burst committed entirely or not at all. Look, and insert again only if not.
            let found = loop {
                let found = sqlx::query_as::<_, (i64, String)>(
                    "SELECT id, headers->>$2 FROM outbox WHERE headers->>$2 LIKE $1 || '%'",
                )
                .bind(&prefix)
                .bind(TOKEN_HEADER)
                .fetch_all(&db.pool)
                .await;
                match found {
                    Ok(rows) => break rows,
                    Err(e) if Instant::now() > deadline => {
                        panic!("burst: {error}, then {e} {}", self.ctx.tag())
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            };
            if found.len() as i64 == n {
                break found;
            }
            assert!(
                found.is_empty() && Instant::now() < deadline,
                "burst insert failed ({error}); {} of {n} rows exist {}",
                found.len(),
                self.ctx.tag()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert_eq!(rows.len() as i64, n);
        for (id, token) in rows {
            let i: i64 = token.strip_prefix(&prefix).unwrap().parse().unwrap();
            let k = i % BURST_KEYS;
            let seq = self.seq_base + i / BURST_KEYS + 1;
            let topic = &self.topics[k as usize % self.topics.len()];
            self.ledger.add(Expected::bulk(
                id,
                token,
                topic,
                format!("burst-{k}"),
                seq,
                &[],
            ));
        }
        self.fired += 1;
        self.seq_base += n / BURST_KEYS;
        self.ctx
            .say(&format!("burst {}: {n} events committed", self.fired));
    }
}

/// A write transaction held open (see [`LongTx::begin`]).
pub struct LongTx {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    /// Its transaction id (xid8 as a number): rows of transactions that began later have higher ones.
    pub xid: i64,
    event: Expected,
    ctx: Arc<Ctx>,
}

impl LongTx {
    /// Open a transaction on its own connection that writes a side table (so it has a
    /// transaction id and holds `pg_snapshot_xmin` back for the whole cluster) and one outbox
    /// event of its own (key `long-tx` on `topic`): a late commit, with a lower id and xid than
    /// every row committed while it stays open.
    pub async fn begin(ctx: &Arc<Ctx>, db: &FaultDb, topic: &str) -> LongTx {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(db.opts.clone().application_name("fault-long-tx"))
            .await
            .unwrap_or_else(|e| panic!("long transaction: {e} {}", ctx.tag()));
        sqlx::query("CREATE TABLE IF NOT EXISTS long_tx_side (at timestamptz NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO long_tx_side VALUES (now())")
            .execute(&mut *tx)
            .await
            .unwrap();
        let xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::int8")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let planned = Planned {
            token: format!("{}-{}-long-tx", ctx.name, ctx.seed),
            topic: topic.to_string(),
            key: Some("long-tx".into()),
            tombstone: false,
            noise: Vec::new(),
        };
        let mut event = planned.expected(Some(1));
        event.id = insert_event(&mut *tx, &event).await.unwrap();
        ctx.say(&format!(
            "long transaction open: xid {xid}, its own event id {}",
            event.id
        ));
        LongTx {
            tx,
            xid,
            event,
            ctx: ctx.clone(),
        }
    }

    /// Commit it; its event goes to the checker.
    pub async fn commit(self) -> Ledger {
        self.tx
            .commit()
            .await
            .unwrap_or_else(|e| panic!("long transaction commit: {e} {}", self.ctx.tag()));
        self.ctx.say("long transaction committed");
        let mut ledger = Ledger::default();
        ledger.add(self.event);
        ledger
    }
}

// ---------------------------------------------------------------------------------------
// The checker

/// What a scenario allows.
pub struct Expect<'a> {
    /// Every topic the scenario's rows could reach (all are read from the beginning).
    pub topics: &'a [String],
    /// Most duplicate records allowed (batch size x crashes; 0 for graceful scenarios).
    pub max_duplicates: usize,
    /// Ids of the rows that must end parked (and no others).
    pub parked: &'a [i64],
    /// How long the relay may take to publish what is left after the load stopped.
    pub drain_timeout: Duration,
}

/// The one checker. After the load stopped: every committed row is published (or parked where
/// expected) and nothing is left pending; then every topic is read from the beginning and
///
/// - every committed event arrived, with topic, key, payload and headers byte-identical and
///   the relay's `outbox-*` headers right;
/// - no rolled-back (or otherwise uncommitted) event arrived, nor anything unknown;
/// - per key, first occurrences arrive in strictly increasing sequence order (and a key
///   stays on one partition);
/// - duplicates stay within `max_duplicates`.
pub async fn verify(ctx: &Ctx, db: &FaultDb, ledger: &mut Ledger, expect: Expect<'_>) -> Report {
    let tag = ctx.tag();
    // Unknown COMMIT outcomes the writers could not resolve while the database was down.
    for events in std::mem::take(&mut ledger.unresolved) {
        let committed = resolve(&db.pool, &events, Duration::from_secs(120))
            .await
            .unwrap_or_else(|err| panic!("cannot resolve a COMMIT outcome: {err} {tag}"));
        ledger.resolved(events, committed);
    }

    let drain = db.wait_drained(ctx, expect.drain_timeout).await;
    ctx.say(&format!(
        "drained {:.1}s after the load stopped",
        drain.as_secs_f64()
    ));

    // The table: no row left pending, parked rows exactly the expected ones, every committed
    // row published, and no row the writers do not know about. (Log mode: nothing is pending
    // once the slot's confirmed position passed every commit, which the drain waited for.)
    if db.mode != Mode::Log {
        let pending = db.pending(ctx).await;
        assert_eq!(pending, 0, "rows left pending {tag}");
    }
    let parked: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM outbox WHERE failed_at IS NOT NULL ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let mut want_parked = expect.parked.to_vec();
    want_parked.sort();
    assert_eq!(
        parked, want_parked,
        "parked rows differ from the expected ones {tag}"
    );
    let total = db.scalar(ctx, "SELECT count(*) FROM outbox").await;
    assert_eq!(
        total as usize,
        ledger.committed.len() + expect.parked.len(),
        "the table holds rows the writers did not commit (or lost some) {tag}"
    );
    if db.mode == Mode::Log {
        // Log mode writes nothing per event (no row predates the slot here, so no catch-up
        // marks any); Kafka below is what says everything was published.
        let marked = db
            .scalar(
                ctx,
                "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
            )
            .await;
        assert_eq!(marked, 0, "log mode marked rows published {tag}");
    } else {
        let ids: Vec<i64> = ledger.committed.values().map(|e| e.id).collect();
        let published: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM outbox WHERE id = ANY($1) AND {PUBLISHED}"
        )))
        .bind(&ids)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            published as usize,
            ledger.committed.len(),
            "committed rows not marked published {tag}"
        );
    }
    if ledger.check_key_seq {
        check_key_seq(&db.pool, ledger, &tag).await;
    }

    // Kafka.
    let read = Reading {
        brokers: brokers(),
        topics: expect.topics.to_vec(),
        partitions: PARTITIONS,
        settle: Duration::from_secs(1),
        timeout: Duration::from_secs(if ctx.soak { 900 } else { 180 }),
    };
    let (report, violations) = check(read, ledger).await;
    ctx.say(&format!(
        "checked: {} committed events, {} records read, {} duplicates (allowed {}), at most {} copies of one event",
        ledger.committed.len(),
        report.records,
        report.duplicates,
        expect.max_duplicates,
        report.max_copies
    ));
    assert_checked(&report, &violations, expect.max_duplicates, &tag);
    report
}
