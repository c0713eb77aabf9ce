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
//! - **Writers** ([`Load`]) that commit events under load while faults happen: each
//!   transaction bumps the key's sequence number first (serializing a key's writers, so a
//!   key's commit order is its sequence order), some roll back, some stay open a while (so
//!   they commit out of id order); connection errors are retried, and a COMMIT whose outcome
//!   is unknown is resolved by looking the row up.
//! - **One checker** ([`verify`]) every scenario ends with.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::common::{
    create_topics_on, http_get, log_dir, metric, relay_command, strs, unique, Relay,
};

pub const PG_PORT: u16 = 55433;
pub const KAFKA_PORT: u16 = 29192;
pub const KAFKA_CONTROLLER_PORT: u16 = 29193;
pub const KAFKA_SASL_PORT: u16 = 29194;
/// Partitions of every topic the suite creates.
pub const PARTITIONS: i32 = 3;
/// The header every writer event carries its token in (the token also starts the payload).
pub const TOKEN_HEADER: &str = "fault-event";
const NOTE: &str = "naïve ü 日本 🚀";

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
    let out = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        script(name, &refs)
    })
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

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// The relay's read mode a scenario runs in: the table is migrated for it and every replica
/// runs with it (`--read-mode`; claim mode passes no flag, the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Claim,
    Append,
}

impl Mode {
    /// The flags `migrate` and `run` get.
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Mode::Claim => &[],
            Mode::Append => &["--read-mode", "append"],
        }
    }
}

/// Rows published in either read mode: marked (claim mode, and append mode's rows delivered
/// past a row to retry), or at or behind append mode's cursor in the lease row.
pub const PUBLISHED: &str = "failed_at IS NULL AND (published_at IS NOT NULL \
     OR (xid, id) <= (SELECT cursor_xid, cursor_id FROM outbox_lease WHERE id = 1))";
/// Rows still to publish in either read mode (claim mode has no cursor: NULL, so not behind it).
pub const PENDING: &str = "published_at IS NULL AND failed_at IS NULL \
     AND NOT coalesce((xid, id) <= (SELECT cursor_xid, cursor_id FROM outbox_lease WHERE id = 1), false)";

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
pub struct FaultDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    pub opts: PgConnectOptions,
}

impl FaultDb {
    pub async fn create(ctx: &Ctx) -> FaultDb {
        let name = unique(&format!("fault_{}", ctx.name));
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
        migrate.args(ctx.mode.args());
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
        sqlx::query("CREATE TABLE key_seq (key text PRIMARY KEY, seq bigint NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        ctx.say(&format!("database {name}"));
        FaultDb {
            name,
            url,
            pool,
            opts,
        }
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

    /// Wait until `by` more rows are published than now: publishing works (again).
    pub async fn wait_progress(&self, ctx: &Ctx, by: i64, timeout: Duration) -> Duration {
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

    /// Wait until no committed row is left pending (published or parked).
    pub async fn wait_drained(&self, ctx: &Ctx, timeout: Duration) -> Duration {
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

    /// Drop the database (only after a passing scenario: a failed one is kept to inspect).
    pub async fn drop_database(self) {
        self.pool.close().await;
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
}

impl Fleet {
    /// `args` are added to the suite's defaults (poll 100ms as every [`Relay::launch`], lease 3s
    /// when supported, the scenario's read mode).
    pub fn new(ctx: &Arc<Ctx>, db: &FaultDb, args: &[&str]) -> Fleet {
        let mut all: Vec<String> = vec![];
        if ctx.lease {
            all.extend(["--lease-duration".into(), "3s".into()]);
        }
        all.extend(ctx.mode.args().iter().map(|a| a.to_string()));
        all.extend(args.iter().map(|a| a.to_string()));
        Fleet {
            ctx: ctx.clone(),
            db_url: db.url.clone(),
            args: all,
            slots: Vec::new(),
            generation: Vec::new(),
            paused: Vec::new(),
        }
    }

    fn launch(&self, slot: usize, generation: usize) -> Relay {
        let log = log_dir().join(format!(
            "faults-{}-{}-r{slot}.{generation}.log",
            self.ctx.name, self.ctx.seed
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
    /// Pause between a writer's transactions, in ms (uniform in the range).
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

/// What the writers did: committed events by token, and tokens that must never be seen.
#[derive(Debug, Default)]
pub struct Ledger {
    pub committed: HashMap<String, Expected>,
    /// Rolled back, failed before COMMIT, or COMMIT failed and the row is not there.
    pub not_committed: HashSet<String>,
    /// Unknown COMMIT outcomes not resolved yet (the database was down): resolved by `verify`.
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
}

/// Writers running in the background until [`Load::stop`].
pub struct Load {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Ledger>>,
    committed: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    ctx: Arc<Ctx>,
}

/// The key's lock is taken before the transaction's first write (the README's ordering contract
/// for append mode: two upserts creating a new key take their xids before either holds the row).
const BUMP_SQL: &str = "WITH l AS (SELECT pg_advisory_xact_lock(hashtext($1))) \
     INSERT INTO key_seq SELECT $1, 1 FROM l ON CONFLICT (key) DO UPDATE SET seq = key_seq.seq + 1 RETURNING seq";
const INSERT_SQL: &str =
    "INSERT INTO outbox (topic, key, payload, headers) VALUES ($1, $2, $3, $4) RETURNING id";
const EXISTS_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM outbox WHERE id = $1 AND headers->>'fault-event' = $2)";

/// One transaction's plan.
struct Attempt {
    token: String,
    topic: String,
    key: Option<String>,
    tombstone: bool,
    noise: Vec<u8>,
    hold: Option<Duration>,
    rollback: bool,
}

impl Attempt {
    fn expected(&self, seq: Option<i64>) -> Expected {
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
async fn insert_event<'c>(
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
        .fetch_one(pool)
        .await
}

async fn writer(
    ctx: Arc<Ctx>,
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
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(gap)) => {}
        }
        let keyed = !rng.random_bool(spec.null_key);
        let k = rng.random_range(0..spec.keys);
        let a = Attempt {
            token: format!("{}-{}-w{w}-n{n}", ctx.name, ctx.seed),
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
                    Some(e) => {
                        // COMMIT was sent and no answer came back: look the row up.
                        let deadline = Instant::now() + Duration::from_secs(60);
                        loop {
                            match committed(&pool, &e).await {
                                Ok(true) => {
                                    ledger.ambiguous_committed += 1;
                                    committed_count.fetch_add(1, Ordering::Relaxed);
                                    ledger.add(e);
                                    break;
                                }
                                Ok(false) => {
                                    ledger.ambiguous_aborted += 1;
                                    ledger.not_committed.insert(e.token);
                                    break;
                                }
                                Err(_) if Instant::now() < deadline => {
                                    tokio::time::sleep(Duration::from_millis(250)).await
                                }
                                Err(_) => {
                                    ledger.unresolved.push(e);
                                    break;
                                }
                            }
                        }
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
    pub fn start(ctx: &Arc<Ctx>, db: &FaultDb, spec: LoadSpec) -> Load {
        let pool = PgPoolOptions::new()
            .max_connections(spec.writers as u32 + 2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(db.opts.clone().application_name("fault-writer"));
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
            ctx: ctx.clone(),
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
        let mut ledger = Ledger {
            check_key_seq: true,
            ..Ledger::default()
        };
        for t in self.tasks {
            ledger.merge(t.await.expect("writer task panicked"));
        }
        self.ctx.say(&format!(
            "load stopped: {} committed ({} after an unknown COMMIT outcome), {} rolled back, {} failed, {} unknown outcomes not committed, {} unresolved, {} errors",
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
            let mut payload = format!("tok:{token}|").into_bytes();
            payload.extend_from_slice(&[0x00, 0xff, 0xfe]);
            self.ledger.add(Expected {
                id,
                topic: self.topics[k as usize % self.topics.len()].clone(),
                key: Some(format!("burst-{k}")),
                seq: Some(seq),
                payload: Some(payload),
                headers: vec![
                    (TOKEN_HEADER.to_string(), token.clone().into_bytes()),
                    ("seq".to_string(), seq.to_string().into_bytes()),
                ],
                token,
            });
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
        let attempt = Attempt {
            token: format!("{}-{}-long-tx", ctx.name, ctx.seed),
            topic: topic.to_string(),
            key: Some("long-tx".into()),
            tombstone: false,
            noise: Vec::new(),
            hold: None,
            rollback: false,
        };
        let mut event = attempt.expected(Some(1));
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

#[derive(Debug, Default)]
pub struct Report {
    pub records: usize,
    pub distinct: usize,
    pub duplicates: usize,
    pub max_copies: usize,
    pub drain: Duration,
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
    for e in std::mem::take(&mut ledger.unresolved) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match committed(&db.pool, &e).await {
                Ok(true) => {
                    ledger.ambiguous_committed += 1;
                    ledger.add(e);
                    break;
                }
                Ok(false) => {
                    ledger.ambiguous_aborted += 1;
                    ledger.not_committed.insert(e.token);
                    break;
                }
                Err(err) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot resolve a COMMIT outcome: {err} {tag}"
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    let drain = db.wait_drained(ctx, expect.drain_timeout).await;
    ctx.say(&format!(
        "drained {:.1}s after the load stopped",
        drain.as_secs_f64()
    ));

    // The table: no row left pending, parked rows exactly the expected ones, every committed
    // row published, and no row the writers do not know about.
    let pending = db.pending(ctx).await;
    assert_eq!(pending, 0, "rows left pending {tag}");
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
    if ledger.check_key_seq {
        check_key_seq(db, ledger, &tag).await;
    }

    // Kafka.
    let committed = std::mem::take(&mut ledger.committed);
    let not_committed = std::mem::take(&mut ledger.not_committed);
    let topics = expect.topics.to_vec();
    let timeout = Duration::from_secs(if ctx.soak { 900 } else { 180 });
    let (committed, not_committed, report, violations) = tokio::task::spawn_blocking(move || {
        let (report, violations) = consume_and_check(&topics, &committed, &not_committed, timeout);
        (committed, not_committed, report, violations)
    })
    .await
    .unwrap();
    ledger.committed = committed;
    ledger.not_committed = not_committed;
    let report = Report { drain, ..report };
    ctx.say(&format!(
        "checked: {} committed events, {} records read, {} duplicates (allowed {}), at most {} copies of one event",
        ledger.committed.len(),
        report.records,
        report.duplicates,
        expect.max_duplicates,
        report.max_copies
    ));
    if !violations.is_empty() {
        let mut msg = format!("{} violations {tag}:\n", violations.len());
        for v in violations.iter().take(40) {
            let _ = writeln!(msg, "  {v}");
        }
        panic!("{msg}");
    }
    assert!(
        report.duplicates <= expect.max_duplicates,
        "{} duplicate records exceed the bound of {} {tag}",
        report.duplicates,
        expect.max_duplicates
    );
    report
}

/// Per key, the committed sequence numbers are exactly 1..=n and n is the key's `key_seq`:
/// the writers' own bookkeeping (commits, rollbacks, unknown outcomes) is right.
async fn check_key_seq(db: &FaultDb, ledger: &Ledger, tag: &str) {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT key, seq FROM key_seq")
        .fetch_all(&db.pool)
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

/// Read `topics` from the beginning up to their ends and check every record against the
/// committed events (see [`verify`]): (report, violations).
pub fn consume_and_check(
    topics: &[String],
    committed: &HashMap<String, Expected>,
    not_committed: &HashSet<String>,
    timeout: Duration,
) -> (Report, Vec<String>) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("fault-checker"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for t in topics {
        for p in 0..PARTITIONS {
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
            std::thread::sleep(Duration::from_secs(1));
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
    let report = Report {
        records,
        distinct,
        duplicates: copies.values().map(|n| n - 1).sum(),
        max_copies: copies.values().copied().max().unwrap_or(0),
        drain: Duration::ZERO,
    };
    (report, violations)
}
