//! Shared harness for the integration tests: a fresh database per test, Kafka topics,
//! the relay binary as a child process, and a consumer that reads topics back.
//!
//! Services come from `scripts/services.sh up` (what `make test` runs); the URLs can be
//! overridden with OUTBOX_TEST_DATABASE_URL and OUTBOX_TEST_KAFKA_BROKERS (and, for the
//! TLS tests, OUTBOX_TEST_KAFKA_SASL_BROKERS and OUTBOX_TEST_CERTS_DIR).
//!
//! Every suite compiles this module (`mod common;`) and uses a part of it, hence the allow.
//! [`load`] is the writer and checker of the delivery tests; the fault suite's own harness is
//! `tests/faults/harness.rs`, compiled into that suite only.
#![allow(dead_code)]

pub mod load;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

pub fn database_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:54329/postgres".into())
}

pub fn kafka_brokers() -> String {
    std::env::var("OUTBOX_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// The broker's SASL_SSL (SCRAM-SHA-512) listener: `scripts/kafka.sh url-sasl`.
pub fn kafka_sasl_brokers() -> String {
    std::env::var("OUTBOX_TEST_KAFKA_SASL_BROKERS").unwrap_or_else(|_| "127.0.0.1:19094".into())
}

/// Where `scripts/certs.sh` put the test CA (`ca.pem`) and the unrelated CA (`other-ca.pem`):
/// OUTBOX_TEST_CERTS_DIR, relative to the crate root unless absolute; default `.local/certs`.
pub fn certs_dir() -> PathBuf {
    let dir = std::env::var("OUTBOX_TEST_CERTS_DIR").unwrap_or_else(|_| ".local/certs".into());
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir)
}

/// Host and port of the test PostgreSQL (from [`database_url`]).
pub fn database_host_port() -> (String, u16) {
    let opts: PgConnectOptions = database_url().parse().unwrap();
    (opts.get_host().to_string(), opts.get_port())
}

/// A short random suffix for names, so tests can run in parallel and re-run.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::random::<u32>())
}

/// A fresh database with the outbox table migrated by the real binary.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
    pub name: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        TestDb::migrated(&[]).await
    }

    /// A fresh database migrated for `--read-mode log`, with `slot` as the name of its slot and
    /// of its publication.
    pub async fn migrated_for_log(slot: &str) -> TestDb {
        TestDb::migrated(&["--read-mode", "log", "--slot", slot, "--publication", slot]).await
    }

    /// A fresh database migrated with `outbox-relay migrate <migrate_args>`.
    pub async fn migrated(migrate_args: &[&str]) -> TestDb {
        let admin_url = database_url();
        let name = unique("outbox_test");
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin_url}: {e}; run `scripts/services.sh up` first"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        let opts: PgConnectOptions = admin_url.parse().unwrap();
        let opts = opts.database(&name);
        let url = format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0);
        let mut args = vec!["migrate", "--database-url", &url];
        args.extend_from_slice(migrate_args);
        let status = relay_command(&args).status().unwrap();
        assert!(status.success(), "outbox-relay migrate failed");
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(opts)
            .await
            .unwrap();
        TestDb { url, pool, name }
    }

    /// Run the relay binary with `args` on this database: (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = relay_command(args)
            .env("OUTBOX_RELAY_DATABASE_URL", &self.url)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub async fn count(&self, filter: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM outbox WHERE {filter}"
        )))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Let `role` run the relay on this database (it does not own it): connect, read, mark
    /// and clean the outbox, take the leader lease and heartbeat. LISTEN needs no grant.
    pub async fn grant_relay(&self, role: &str) {
        for sql in [
            format!("GRANT CONNECT ON DATABASE \"{}\" TO \"{role}\"", self.name),
            format!("GRANT USAGE ON SCHEMA public TO \"{role}\""),
            format!("GRANT SELECT, UPDATE, DELETE ON outbox TO \"{role}\""),
            format!("GRANT SELECT, INSERT, UPDATE ON outbox_lease TO \"{role}\""),
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_replicas TO \"{role}\""),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&self.pool)
                .await
                .unwrap();
        }
    }

    /// Insert one row; returns its id.
    pub async fn insert(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
        headers: Option<serde_json::Value>,
    ) -> i64 {
        sqlx::query_scalar(
            "INSERT INTO outbox (topic, key, payload, headers) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(topic)
        .bind(key)
        .bind(payload)
        .bind(headers)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// `transactions` transactions of `rows` rows each on `topic` (keys k0-k9), one after
    /// another. Returns the ids in insert order.
    pub async fn write_plain(&self, topic: &str, transactions: usize, rows: i32) -> Vec<i64> {
        let mut ids = Vec::new();
        for _ in 0..transactions {
            let batch: Vec<i64> = sqlx::query_scalar(
                "INSERT INTO outbox (topic, key, payload) \
                 SELECT $1, 'k' || (g % 10), convert_to('e' || g, 'UTF8') FROM generate_series(1, $2) AS g RETURNING id",
            )
            .bind(topic)
            .bind(rows)
            .fetch_all(&self.pool)
            .await
            .unwrap();
            ids.extend(batch);
        }
        ids
    }

    /// Leave the table as an earlier release's `--read-mode append` (removed) left it: its read
    /// index instead of claim mode's, and the lease's cursor on the `passed`-th row in
    /// (xid, id) order, the rows up to which that mode had published (it marked none), under an
    /// expired lease. Returns the ids of those rows.
    pub async fn leave_as_append_mode_did(&self, passed: i64) -> Vec<i64> {
        for sql in [
            "DROP INDEX IF EXISTS outbox_pending_idx",
            "CREATE INDEX outbox_xid_idx ON outbox (xid, id) WHERE published_at IS NULL AND failed_at IS NULL",
        ] {
            sqlx::query(sql).execute(&self.pool).await.unwrap();
        }
        sqlx::query(
            "INSERT INTO outbox_lease (id, holder, epoch, expires_at, cursor_xid, cursor_id) \
             SELECT 1, 'an-older-release', 7, now() - interval '1 minute', xid, id FROM outbox \
             ORDER BY xid, id OFFSET $1 - 1 LIMIT 1 \
             ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, epoch = EXCLUDED.epoch, \
             expires_at = EXCLUDED.expires_at, cursor_xid = EXCLUDED.cursor_xid, cursor_id = EXCLUDED.cursor_id",
        )
        .bind(passed)
        .execute(&self.pool)
        .await
        .unwrap();
        sqlx::query_scalar("SELECT id FROM outbox ORDER BY xid, id LIMIT $1")
            .bind(passed)
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    /// Whether append mode's cursor is gone (claim or log mode took over).
    pub async fn append_cursor_dropped(&self) -> bool {
        sqlx::query_scalar(
            "SELECT cursor_xid IS NULL AND cursor_id IS NULL FROM outbox_lease WHERE id = 1",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Wait until `filter` matches at least `n` rows.
    pub async fn wait_count(&self, filter: &str, n: i64, timeout: Duration) {
        let start = Instant::now();
        loop {
            let c = self.count(filter).await;
            if c >= n {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {n} rows WHERE {filter} (have {c})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub async fn create_topics(names: &[&str], partitions: i32) {
    create_topics_with_config(names, partitions, &[]).await
}

/// [`create_topics`] with topic configs, e.g. `("message.timestamp.type", "LogAppendTime")`.
pub async fn create_topics_with_config(names: &[&str], partitions: i32, config: &[(&str, &str)]) {
    create_topics_on(
        &kafka_brokers(),
        names,
        partitions,
        config,
        Duration::from_secs(30),
        "",
    )
    .await
}

fn kafka_admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

/// Create topics on `brokers` and wait until they are ready (see [`wait_topic_ready`]); `tag`
/// ends every panic message.
pub async fn create_topics_on(
    brokers: &str,
    names: &[&str],
    partitions: i32,
    config: &[(&str, &str)],
    ready_within: Duration,
    tag: &str,
) {
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| {
            config.iter().fold(
                NewTopic::new(n, partitions, TopicReplication::Fixed(1)),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let results = kafka_admin(brokers)
        .create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .unwrap_or_else(|e| panic!("create topics: {e} {tag}"));
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e} {tag}"));
    }
    for name in names {
        wait_topic_ready(brokers, name, partitions, ready_within, tag).await;
    }
}

/// The broker loads new topics asynchronously: wait until the topic has `partitions`
/// partitions, each with a leader (panics, with `tag`, after `within`).
pub async fn wait_topic_ready(
    brokers: &str,
    name: &str,
    partitions: i32,
    within: Duration,
    tag: &str,
) {
    let admin = kafka_admin(brokers);
    let start = Instant::now();
    loop {
        let ready = admin
            .inner()
            .fetch_metadata(Some(name), Duration::from_secs(5))
            .is_ok_and(|md| {
                md.topics().iter().any(|t| {
                    t.error().is_none()
                        && t.partitions().len() == partitions as usize
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                })
            });
        if ready {
            return;
        }
        assert!(
            start.elapsed() < within,
            "topic {name} never became ready {tag}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Delete topics on `brokers` (best effort).
pub async fn delete_topics(brokers: &str, topics: &[String]) {
    let _ = kafka_admin(brokers)
        .delete_topics(
            &strs(topics),
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await;
}

pub fn relay_command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    c.args(args);
    c.env_remove("RUST_LOG");
    c
}

/// A port nothing listens on now (another process may still take it before it is bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// target/tmp/test-logs: relay logs and command output.
pub fn log_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-logs");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// GET `path` from `addr` over HTTP/1.0: (status code, body). `timeout` bounds connecting,
/// writing and each read (a SIGSTOPped relay accepts connections but never answers).
pub fn http_get(
    addr: &str,
    path: &str,
    timeout: Option<Duration>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = match timeout {
        Some(t) => {
            let s = std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), t)?;
            s.set_read_timeout(Some(t))?;
            s.set_write_timeout(Some(t))?;
            s
        }
        None => std::net::TcpStream::connect(addr)?,
    };
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The value of one exact series (`name` or `name{labels}`) in a Prometheus text body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// The relay binary running as a child process, logging to target/test-logs/.
pub struct Relay {
    pub child: Child,
    pub metrics_addr: String,
    pub log: PathBuf,
}

impl Relay {
    pub fn start(db: &TestDb, extra: &[&str]) -> Relay {
        Relay::spawn(&db.name, &db.url, &kafka_brokers(), extra, &[])
    }

    /// Like [`Relay::start`] with any database URL and brokers, and extra environment (see
    /// [`Relay::launch`]); the log is named after `label`.
    pub fn spawn(
        label: &str,
        database_url: &str,
        brokers: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Relay {
        let log = log_dir().join(format!("{}.log", unique(label)));
        Relay::launch(log, database_url, brokers, extra, env)
    }

    /// `outbox-relay run` on a free metrics port, with `--poll-interval 100ms` unless `extra`
    /// sets it, then `extra`; RUST_LOG=info,librdkafka=warn, then `env` (applied last: it may
    /// override RUST_LOG). Stderr goes to `log`, stdout to `<log>.stdout`.
    pub fn launch(
        log: PathBuf,
        database_url: &str,
        brokers: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Relay {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "run",
            "--kafka-brokers",
            brokers,
            "--metrics-addr",
            &metrics_addr,
        ];
        if !extra.contains(&"--poll-interval") {
            args.extend_from_slice(&["--poll-interval", "100ms"]);
        }
        args.extend_from_slice(extra);
        let mut command = relay_command(&args);
        command
            .env("OUTBOX_RELAY_DATABASE_URL", database_url)
            .env("RUST_LOG", "info,librdkafka=warn");
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .stdout(std::fs::File::create(log.with_extension("stdout")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Relay {
            child,
            metrics_addr,
            log,
        }
    }

    /// Everything the relay wrote to stdout.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("stdout")).unwrap_or_default()
    }

    /// Wait until the log contains `needle` (panics with the log after `timeout`).
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.logs().contains(needle) {
            assert!(
                start.elapsed() < timeout,
                "the log never showed {needle:?}: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit (panics after `timeout`). Returns the exit code.
    pub fn terminate(mut self, timeout: Duration) -> Option<i32> {
        self.signal("-TERM");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < timeout,
                "relay did not exit within {timeout:?} of SIGTERM; log: {:?}",
                self.log
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path from the relay's HTTP endpoint: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        self.try_http_get(path).unwrap()
    }

    fn try_http_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(&self.metrics_addr, path, None)
    }

    /// One series of the relay's /metrics (see [`metric`]).
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric(&self.http_get("/metrics").1, series)
    }

    /// Poll an HTTP path until it answers with `code`.
    pub fn wait_http(&self, path: &str, code: u16, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Ok((c, body)) = self.try_http_get(path) {
                if c == code {
                    return body;
                }
            }
            assert!(
                start.elapsed() < timeout,
                "{path} never answered {code}; log: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Record timestamp in Unix milliseconds (the broker's clock on LogAppendTime topics).
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Consumed {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_ref())
            .map(|v| String::from_utf8(v.clone()).unwrap())
    }

    pub fn event_id(&self) -> i64 {
        self.header("outbox-event-id")
            .expect("event id header")
            .parse()
            .unwrap()
    }
}

/// Read every record of `topics` from the beginning until `expected` arrived and then
/// `quiet` passed with nothing new (so duplicates show up), or `timeout` ran out.
pub fn consume(
    topics: &[&str],
    partitions: i32,
    expected: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<Consumed> {
    consume_from(
        &kafka_brokers(),
        topics,
        partitions,
        expected,
        quiet,
        timeout,
    )
}

/// [`consume`] off the async runtime.
pub async fn read_back(
    topics: &[String],
    partitions: i32,
    expected: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<Consumed> {
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        consume(&strs(&topics), partitions, expected, quiet, timeout)
    })
    .await
    .unwrap()
}

/// `--delivery exactly-once` with a transactional id and a positions topic of the test's own.
pub fn exactly_once_flags() -> Vec<String> {
    [
        "--delivery".into(),
        "exactly-once".into(),
        "--transactional-id".into(),
        unique("eos-test"),
        "--positions-topic".into(),
        unique("positions"),
    ]
    .into()
}

/// The event ids read back from `topic` (`partitions` partitions) once `expected` records
/// have arrived (or 30 s passed), sorted, duplicates kept.
pub async fn event_ids_on(topic: &str, partitions: i32, expected: usize) -> Vec<i64> {
    let consumed = read_back(
        &[topic.to_string()],
        partitions,
        expected,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await;
    let mut ids: Vec<i64> = consumed.iter().map(|c| c.event_id()).collect();
    ids.sort();
    ids
}

/// `consume`, from the given bootstrap servers (e.g. a librdkafka mock cluster).
pub fn consume_from(
    brokers: &str,
    topics: &[&str],
    partitions: i32,
    expected: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("checker"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..partitions {
            tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
        }
    }
    consumer.assign(&tpl).unwrap();
    let start = Instant::now();
    let mut last_new = Instant::now();
    let mut out = Vec::new();
    while start.elapsed() < timeout {
        if out.len() >= expected && last_new.elapsed() >= quiet {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last_new = Instant::now();
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.map(|v| v.to_vec())))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Consumed {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp: m.timestamp().to_millis(),
                    key: m.key().map(|k| k.to_vec()),
                    payload: m.payload().map(|p| p.to_vec()),
                    headers,
                });
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {}
        }
    }
    out
}

/// Event ids seen more than once.
pub fn duplicates(records: &[Consumed]) -> Vec<i64> {
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for r in records {
        *seen.entry(r.event_id()).or_default() += 1;
    }
    let mut d: Vec<i64> = seen
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, _)| id)
        .collect();
    d.sort();
    d
}
