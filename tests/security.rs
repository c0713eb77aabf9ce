//! Transport security for real: the relay against PostgreSQL over verified TLS with a
//! password role, and against Kafka's SASL_SSL listener with SCRAM-SHA-512; the failures an
//! operator can cause (wrong CA, wrong host name, wrong password, plaintext under
//! --require-secure-transport); and a sentinel check that no secret ever shows up in what the
//! relay prints or serves.
//!
//! Needs the stack of `scripts/services.sh up`: PostgreSQL with ssl=on and the role relay_tls
//! (scripts/pg.sh), Kafka's SASL_SSL listener with the SCRAM user relay (scripts/kafka.sh) and
//! the certificates of scripts/certs.sh. Endpoints: OUTBOX_TEST_DATABASE_URL (the trust
//! superuser URL; TLS connections go to the same host and port), OUTBOX_TEST_KAFKA_BROKERS
//! (plaintext: topics and the checking consumer), OUTBOX_TEST_KAFKA_SASL_BROKERS (default
//! 127.0.0.1:19094) and OUTBOX_TEST_CERTS_DIR (default .local/certs).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    certs_dir, create_topics, database_host_port, event_ids_on, kafka_brokers, kafka_sasl_brokers,
    log_dir, relay_command, strs, unique, Relay, TestDb,
};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// Made by scripts/pg.sh: may log in only over TLS (hostssl), with a SCRAM password.
const PG_ROLE: &str = "relay_tls";
const PG_PASSWORD: &str = "relay-tls-secret";
/// Made by scripts/kafka.sh on the SASL_SSL listener.
const SASL_USER: &str = "relay";
const SASL_PASSWORD: &str = "relay-scram-secret";

const PASSWORD_FILE_ENV: &str = "OUTBOX_RELAY_DATABASE_PASSWORD_FILE";
const SASL_PASSWORD_FILE_ENV: &str = "OUTBOX_RELAY_KAFKA_SASL_PASSWORD_FILE";

fn ca() -> PathBuf {
    certs_dir().join("ca.pem")
}

fn other_ca() -> PathBuf {
    certs_dir().join("other-ca.pem")
}

/// A PostgreSQL URL for `database` as `user`, without a password.
fn tls_url(database: &str, user: &str, host: &str, sslmode: &str, root: &Path) -> String {
    let (_, port) = database_host_port();
    format!(
        "postgres://{user}@{host}:{port}/{database}?sslmode={sslmode}&sslrootcert={}",
        root.display()
    )
}

/// The librdkafka properties for SASL_SSL + SCRAM-SHA-512 (no password: that comes separately).
fn sasl_config(user: &str, root: &Path) -> Vec<String> {
    [
        "security.protocol=SASL_SSL".to_string(),
        "sasl.mechanisms=SCRAM-SHA-512".to_string(),
        format!("sasl.username={user}"),
        format!("ssl.ca.location={}", root.display()),
    ]
    .into_iter()
    .flat_map(|p| ["--kafka-config".to_string(), p])
    .collect()
}

/// A relay reaching PostgreSQL at `url` as the password role, and Kafka over SASL_SSL + SCRAM
/// as the SCRAM user with `sasl_password`, both passwords only in files; then `extra` flags.
fn secured_relay(db: &TestDb, url: &str, sasl_password: &str, extra: &[&str]) -> Relay {
    let pg_password = secret_file(PG_PASSWORD);
    let sasl_password = secret_file(sasl_password);
    let mut args = sasl_config(SASL_USER, &ca());
    args.extend(extra.iter().map(|a| a.to_string()));
    Relay::spawn(
        &db.name,
        url,
        &kafka_sasl_brokers(),
        &strs(&args),
        &[
            (PASSWORD_FILE_ENV, pg_password.to_str().unwrap()),
            (SASL_PASSWORD_FILE_ENV, sasl_password.to_str().unwrap()),
        ],
    )
}

/// A 0600 file holding `content` (with a trailing newline, as editors and Secrets leave it).
fn secret_file(content: &str) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-secrets");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(unique("secret"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    writeln!(f, "{content}").unwrap();
    path
}

/// Fail early, with the fix, when PostgreSQL is not the TLS-enabled one.
async fn preflight(db: &TestDb) {
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        ssl,
        "on",
        "PostgreSQL at {} runs without TLS: run `scripts/services.sh up` (pg.sh turns ssl on and reloads a running server)",
        common::database_url()
    );
    let role: bool = sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)")
        .bind(PG_ROLE)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        role,
        "role {PG_ROLE} is missing: run `scripts/services.sh up`"
    );
    assert!(
        ca().is_file() && other_ca().is_file(),
        "no test CA in {}: run scripts/certs.sh (or set OUTBOX_TEST_CERTS_DIR)",
        certs_dir().display()
    );
}

/// Fail early, with the fix, when Kafka has no SASL_SSL listener.
fn require_sasl_listener() {
    let sasl = kafka_sasl_brokers();
    let first = sasl.split(',').next().unwrap().to_string();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&first)
        .unwrap()
        .any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    assert!(
        reachable,
        "nothing listens on {first} (Kafka SASL_SSL): run `scripts/services.sh up`; a broker started \
         before the listener existed needs `scripts/kafka.sh stop && scripts/kafka.sh start`"
    );
}

/// A fresh database the TLS role may relay, checked for a TLS-ready stack.
async fn tls_db() -> TestDb {
    let db = TestDb::new().await;
    preflight(&db).await;
    db.grant_relay(PG_ROLE).await;
    db
}

async fn insert_rows(db: &TestDb, topic: &str, n: usize) -> Vec<i64> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(topic)
        .bind(format!("k{}", i % 5))
        .bind(format!("payload {i}").into_bytes())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        ids.push(id);
    }
    ids
}

async fn connect(url: &str, password: &str) -> Result<PgConnection, sqlx::Error> {
    // As the relay's main does: two TLS providers are compiled in (see install_tls_provider).
    outbox_relay::install_tls_provider();
    let opts: PgConnectOptions = url.parse()?;
    PgConnection::connect_with(&opts.password(password)).await
}

fn listening(host: &str) -> bool {
    let (_, port) = database_host_port();
    std::net::TcpStream::connect_timeout(
        &format!("{host}:{port}").parse().unwrap(),
        Duration::from_secs(2),
    )
    .is_ok()
}

/// Run a command that should exit on its own: (exit code, stdout, stderr).
fn run_to_exit(command: &mut Command, timeout: Duration) -> (Option<i32>, String, String) {
    let base = log_dir().join(unique("cmd"));
    let (out, err) = (base.with_extension("stdout"), base.with_extension("stderr"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} did not exit within {timeout:?}; stderr: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code(),
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&err).unwrap(),
    )
}

/// The certificate matrix, straight from sqlx (rustls), before any relay is involved: which
/// connections the stack accepts and which it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_accepts_only_verified_tls_for_the_password_role() {
    let db = tls_db().await;
    let name = &db.name;

    // verify-full by IP address: rustls checks the certificate's IP SAN.
    let mut c = connect(
        &tls_url(name, PG_ROLE, "127.0.0.1", "verify-full", &ca()),
        PG_PASSWORD,
    )
    .await
    .expect("verify-full to 127.0.0.1 with the test CA");
    let (user, ssl): (String, bool) = sqlx::query_as(
        "SELECT current_user::text, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!((user.as_str(), ssl), (PG_ROLE, true));
    c.close().await.unwrap();

    // verify-full by DNS name.
    connect(
        &tls_url(name, PG_ROLE, "localhost", "verify-full", &ca()),
        PG_PASSWORD,
    )
    .await
    .expect("verify-full to localhost with the test CA")
    .close()
    .await
    .unwrap();

    // A CA that did not sign the server's certificate.
    let e = connect(
        &tls_url(name, PG_ROLE, "127.0.0.1", "verify-full", &other_ca()),
        PG_PASSWORD,
    )
    .await
    .expect_err("an unrelated CA must be refused");
    eprintln!("other CA: {e}");
    // (sqlx 0.9 reports rustls' certificate errors as Error::Io(InvalidData), not Error::Tls.)
    assert!(
        e.to_string()
            .contains("invalid peer certificate: UnknownIssuer"),
        "{e:?}"
    );

    // The host name matters: 127.0.0.2 reaches the same server, but is not in the certificate.
    if listening("127.0.0.2") {
        let e = connect(
            &tls_url(name, PG_ROLE, "127.0.0.2", "verify-full", &ca()),
            PG_PASSWORD,
        )
        .await
        .expect_err("verify-full must refuse a name the certificate does not carry");
        eprintln!("127.0.0.2 verify-full: {e}");
        assert!(
            e.to_string()
                .contains("certificate not valid for name \"127.0.0.2\""),
            "{e:?}"
        );
        // ...while verify-ca (chain only) accepts it: the name was the only problem.
        connect(
            &tls_url(name, PG_ROLE, "127.0.0.2", "verify-ca", &ca()),
            PG_PASSWORD,
        )
        .await
        .expect("verify-ca to 127.0.0.2")
        .close()
        .await
        .unwrap();
    } else {
        eprintln!(
            "SKIPPED the 127.0.0.2 host-name check: PostgreSQL does not listen there yet \
             (a server started before this change: scripts/pg.sh restart-fast)"
        );
    }

    // The role may not log in without TLS, nor with a wrong password.
    let (_, port) = database_host_port();
    let e = connect(
        &format!("postgres://{PG_ROLE}@127.0.0.1:{port}/{name}?sslmode=disable"),
        PG_PASSWORD,
    )
    .await
    .expect_err("plaintext login of the TLS role must be refused");
    eprintln!("plaintext: {e}");
    assert!(e.to_string().contains("no encryption"), "{e}");
    let e = connect(
        &tls_url(name, PG_ROLE, "127.0.0.1", "verify-full", &ca()),
        "not-the-password",
    )
    .await
    .expect_err("wrong password");
    assert_eq!(
        e.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("28P01"),
        "{e}"
    );
}

/// (a) The whole path secured: verify-full to PostgreSQL as a password role, SASL_SSL +
/// SCRAM-SHA-512 to Kafka, both passwords only in files, under --require-secure-transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_over_verified_tls_and_scram_publishes_and_marks() {
    require_sasl_listener();
    let db = tls_db().await;
    let topic = unique("sec_ok");
    create_topics(&[&topic], 3).await;
    let mut ids = insert_rows(&db, &topic, 40).await;

    let url = tls_url(&db.name, PG_ROLE, "127.0.0.1", "verify-full", &ca());
    let relay = secured_relay(
        &db,
        &url,
        SASL_PASSWORD,
        &["--require-secure-transport", "true"],
    );
    relay.wait_http("/readyz", 200, Duration::from_secs(30));
    // Rows committed while it runs (the NOTIFY path) as well as the backlog.
    ids.extend(insert_rows(&db, &topic, 10).await);
    db.wait_count("published_at IS NOT NULL", 50, Duration::from_secs(30))
        .await;

    // Every connection the relay holds is TLS, as the password role.
    let conns: Vec<(String, bool)> = sqlx::query_as(
        "SELECT a.usename::text, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = $1 AND a.application_name = 'outbox-relay'",
    )
    .bind(&db.name)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(!conns.is_empty(), "the relay holds no connection?");
    assert!(
        conns.iter().all(|(u, ssl)| u == PG_ROLE && *ssl),
        "{conns:?}"
    );

    assert_arrived_once(&topic, ids).await;

    let logs = relay.logs();
    assert!(!logs.contains("insecure transport"), "{logs}");
    assert!(!logs.contains("database error"), "{logs}");
    assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0), "{logs}");
}

/// (a) Log mode over verified TLS: the replication connection, not only the pool, checks the
/// server's certificate and host name (`sslmode=verify-full`) and authenticates with SCRAM as
/// a password role with REPLICATION (pg_hba lets that role in over TLS only), and streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_mode_streams_over_verified_tls_and_scram() {
    let slot = unique("slot");
    let db = TestDb::migrated_for_log(&slot).await;
    preflight(&db).await;
    let role = unique("log_tls");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{PG_PASSWORD}' IN ROLE {PG_ROLE}"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    db.grant_relay(&role).await;
    let topic = unique("sec_log");
    create_topics(&[&topic], 3).await;
    let pg_password = secret_file(PG_PASSWORD);
    let url = tls_url(&db.name, &role, "127.0.0.1", "verify-full", &ca());
    let relay = Relay::spawn(
        &db.name,
        &url,
        &kafka_brokers(),
        &[
            "--read-mode",
            "log",
            "--slot",
            &slot,
            "--publication",
            &slot,
        ],
        &[(PASSWORD_FILE_ENV, pg_password.to_str().unwrap())],
    );
    relay.wait_http("/readyz", 200, Duration::from_secs(30));
    let ids = db.write_plain(&topic, 5, 10).await;
    assert_arrived_once(&topic, ids).await;
    // The stream's walsender is the password role's, over TLS.
    let streams: Vec<(String, bool)> = sqlx::query_as(
        "SELECT r.usename::text, s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) \
         WHERE r.usename = $1",
    )
    .bind(&role)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        !streams.is_empty() && streams.iter().all(|(_, ssl)| *ssl),
        "{streams:?}"
    );
    let logs = relay.logs();
    assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0), "{logs}");
    // Leave no slot (it would pin WAL) and no role behind.
    let drop_slot = "SELECT pg_drop_replication_slot($1)";
    let start = Instant::now();
    while let Err(e) = sqlx::query(drop_slot).bind(&slot).execute(&db.pool).await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "cannot drop {slot}: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for sql in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&db.pool)
            .await
            .unwrap();
    }
}

/// The rows `ids` arrived on `topic` (3 partitions), each exactly once.
async fn assert_arrived_once(topic: &str, mut ids: Vec<i64>) {
    ids.sort();
    assert_eq!(
        event_ids_on(topic, 3, ids.len()).await,
        ids,
        "every row arrived exactly once"
    );
}

/// (b) The database's certificate is signed by a CA the relay does not trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn untrusted_postgres_certificate_keeps_the_relay_up_and_not_ready() {
    require_sasl_listener();
    let db = tls_db().await;
    let topic = unique("sec_badca");
    create_topics(&[&topic], 1).await;
    insert_rows(&db, &topic, 3).await;
    let url = tls_url(&db.name, PG_ROLE, "127.0.0.1", "verify-full", &other_ca());
    let mut relay = secured_relay(&db, &url, SASL_PASSWORD, &[]);
    relay.wait_http("/healthz", 200, Duration::from_secs(10));
    relay.wait_log(
        "invalid peer certificate: UnknownIssuer",
        Duration::from_secs(20),
    );
    // Not ready from the start ("unreachable" until the first attempt is diagnosed), then
    // naming the TLS failure.
    let start = Instant::now();
    let body = loop {
        let body = relay.wait_http("/readyz", 503, Duration::from_secs(10));
        if body.contains("postgres tls error") || start.elapsed() > Duration::from_secs(10) {
            break body;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        body.contains("postgres tls error") && body.contains("sslrootcert"),
        "{body}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "must keep running"
    );
    assert_eq!(db.count("published_at IS NOT NULL").await, 0);
}

/// (b) verify-full checks the host name: 127.0.0.2 reaches the same server, whose
/// certificate names only localhost and 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_host_name_mismatch_is_refused() {
    let db = tls_db().await;
    if !listening("127.0.0.2") {
        eprintln!(
            "SKIPPED: PostgreSQL does not listen on 127.0.0.2 yet (a server started before this \
             change: scripts/pg.sh restart-fast)"
        );
        return;
    }
    let pg_password = secret_file(PG_PASSWORD);
    let url = tls_url(&db.name, PG_ROLE, "127.0.0.2", "verify-full", &ca());
    let relay = Relay::spawn(
        &db.name,
        &url,
        &kafka_brokers(),
        &[],
        &[(PASSWORD_FILE_ENV, pg_password.to_str().unwrap())],
    );
    relay.wait_log(
        "certificate not valid for name \"127.0.0.2\"",
        Duration::from_secs(20),
    );
    let body = relay.wait_http("/readyz", 503, Duration::from_secs(10));
    assert!(
        body.contains("postgres tls error") && body.contains("matches the certificate"),
        "{body}"
    );
}

/// (b) A wrong SCRAM password: not ready, an authentication error in the log, nothing marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_scram_password_is_not_ready_and_marks_nothing() {
    require_sasl_listener();
    let db = tls_db().await;
    let topic = unique("sec_badpw");
    create_topics(&[&topic], 1).await;
    insert_rows(&db, &topic, 5).await;
    let url = tls_url(&db.name, PG_ROLE, "127.0.0.1", "verify-full", &ca());
    let mut relay = secured_relay(&db, &url, "not-the-scram-password", &[]);
    relay.wait_log("Authentication failed", Duration::from_secs(20));
    relay.wait_log("Kafka metadata request failed", Duration::from_secs(20));
    let body = relay.wait_http("/readyz", 503, Duration::from_secs(10));
    assert!(body.contains("kafka unreachable"), "{body}");
    assert!(
        !body.contains("postgres"),
        "the database side is fine: {body}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "must keep running"
    );
    assert_eq!(db.count("published_at IS NOT NULL").await, 0);
    assert_eq!(db.count("failed_at IS NOT NULL").await, 0, "nothing parked");
}

/// (b) The broker's certificate is signed by a CA the relay does not trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn untrusted_kafka_certificate_is_not_ready() {
    require_sasl_listener();
    let db = tls_db().await;
    let sasl_password = secret_file(SASL_PASSWORD);
    let mut relay = Relay::spawn(
        &db.name,
        &db.url,
        &kafka_sasl_brokers(),
        &strs(&sasl_config(SASL_USER, &other_ca())),
        &[(SASL_PASSWORD_FILE_ENV, sasl_password.to_str().unwrap())],
    );
    relay.wait_log("certificate verify failed", Duration::from_secs(20));
    relay.wait_log("Kafka metadata request failed", Duration::from_secs(20));
    let body = relay.wait_http("/readyz", 503, Duration::from_secs(10));
    assert!(body.contains("kafka unreachable"), "{body}");
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "must keep running"
    );
}

/// (c) --require-secure-transport refuses plaintext or unverified connections up front
/// (exit 2, naming the setting); without it the relay runs and warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn require_secure_transport_refuses_plaintext_and_warns_without_it() {
    let db = tls_db().await;
    let verified = tls_url(&db.name, PG_ROLE, "127.0.0.1", "verify-full", &ca());
    let sasl = sasl_config(SASL_USER, &ca());
    let refused = |url: &str, kafka: &[String], expect: &str| {
        let mut args = vec![
            "run",
            "--kafka-brokers",
            "127.0.0.1:1",
            "--metrics-addr",
            "127.0.0.1:0",
            "--require-secure-transport",
            "true",
        ];
        args.extend(strs(kafka));
        let (code, _, stderr) = run_to_exit(
            relay_command(&args).env("OUTBOX_RELAY_DATABASE_URL", url),
            Duration::from_secs(20),
        );
        assert_eq!(code, Some(2), "{url} {kafka:?}: {stderr}");
        assert!(
            stderr.contains("--require-secure-transport") && stderr.contains(expect),
            "{url} {kafka:?}: {stderr}"
        );
    };
    // Plaintext (sslmode defaults to prefer) database URL, secure Kafka.
    refused(&db.url, &sasl, "sslmode=prefer");
    refused(
        &format!("{}?sslmode=require", db.url),
        &sasl,
        "sslmode=require",
    );
    refused(
        &tls_url(&db.name, PG_ROLE, "127.0.0.1", "verify-ca", &ca()),
        &sasl,
        "sslmode=verify-ca",
    );
    // Verified database, plaintext or unverified Kafka.
    refused(&verified, &[], "security.protocol=plaintext");
    let mut unverified = sasl.clone();
    unverified.extend([
        "--kafka-config".into(),
        "enable.ssl.certificate.verification=false".into(),
    ]);
    refused(
        &verified,
        &unverified,
        "enable.ssl.certificate.verification",
    );

    // Without the flag: runs (and works) over plaintext, with a warning naming sslmode.
    let topic = unique("sec_plain");
    create_topics(&[&topic], 1).await;
    let relay = Relay::start(&db, &[]);
    insert_rows(&db, &topic, 3).await;
    db.wait_count("published_at IS NOT NULL", 3, Duration::from_secs(20))
        .await;
    let logs = relay.logs();
    assert!(
        logs.contains("insecure transport") && logs.contains("sslmode=prefer"),
        "{logs}"
    );
    assert!(
        logs.contains("security.protocol=plaintext"),
        "the Kafka side is warned about too: {logs}"
    );
}

/// Grep for the sentinel, naming where it showed up.
fn leaks(sentinel: &str, captured: &[(String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (place, text) in captured {
        for (n, line) in text.lines().enumerate() {
            if line.contains(sentinel) {
                found.push(format!("{place} line {}: {line}", n + 1));
            }
        }
    }
    found
}

/// Hit every endpoint, stop the relay, and keep everything it printed or served.
fn observe(relay: Relay, run: &str, captured: &mut Vec<(String, String)>) {
    for path in ["/metrics", "/healthz", "/readyz", "/nope"] {
        let (code, body) = relay.http_get(path);
        captured.push((format!("{run}: GET {path} ({code})"), body));
    }
    let stdout = relay.stdout();
    let log = relay.log.clone();
    let _ = relay.terminate(Duration::from_secs(40));
    captured.push((
        format!("{run}: stderr"),
        std::fs::read_to_string(&log).unwrap(),
    ));
    captured.push((format!("{run}: stdout"), stdout));
}

/// Create a Kafka SCRAM user through scripts/kafka.sh (the password on stdin, never in argv).
fn add_scram_user(name: &str, password: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh");
    let mut child = Command::new(script)
        .args(["add-scram-user", name, &kafka_brokers()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    assert!(
        child.wait().unwrap().success(),
        "kafka.sh add-scram-user failed"
    );
}

/// (d) A distinctive password planted everywhere a secret can enter (environment, URL,
/// files), through success and failure paths, debug logs, both log formats, the HTTP
/// endpoints, --help and flag errors: it must never come out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_never_appear_in_output_logs_or_http() {
    require_sasl_listener();
    let db = tls_db().await;
    let sentinel = format!("S3ntinel-{:016x}", rand::random::<u64>());
    let topic = unique("sec_sentinel");
    create_topics(&[&topic], 1).await;

    // A database role and a Kafka user whose real password is the sentinel, so the success
    // paths carry it too. Granted relay_tls: pg_hba lets it in over TLS only, with SCRAM.
    let user = unique("sentinel");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {user} LOGIN PASSWORD '{sentinel}' IN ROLE {PG_ROLE}"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let scram_user = user.clone();
    let scram_password = sentinel.clone();
    tokio::task::spawn_blocking(move || add_scram_user(&scram_user, &scram_password))
        .await
        .unwrap();

    let sasl = kafka_sasl_brokers();
    let verified = tls_url(&db.name, &user, "127.0.0.1", "verify-full", &ca());
    let (_, port) = database_host_port();
    let with_password_in_url = format!(
        "postgres://{user}:{sentinel}@127.0.0.1:{port}/{}?sslmode=verify-full&sslrootcert={}",
        db.name,
        ca().display()
    );
    let debug = ("RUST_LOG", "debug");
    let mut captured: Vec<(String, String)> = Vec::new();
    let mut published = 0;

    // 1. Success, text, debug: both passwords from the environment.
    let mut args = sasl_config(&user, &ca());
    args.extend(["--kafka-config".into(), "debug=conf,security,broker".into()]);
    let relay = Relay::spawn(
        &db.name,
        &verified,
        &sasl,
        &strs(&args),
        &[
            debug,
            ("OUTBOX_RELAY_DATABASE_PASSWORD", sentinel.as_str()),
            ("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", sentinel.as_str()),
        ],
    );
    relay.wait_http("/readyz", 200, Duration::from_secs(30));
    insert_rows(&db, &topic, 5).await;
    published += 5;
    db.wait_count(
        "published_at IS NOT NULL",
        published,
        Duration::from_secs(30),
    )
    .await;
    observe(relay, "run 1 (success, text, env passwords)", &mut captured);

    // 2. Success, JSON, debug: the password inside the URL, the SASL password in a config file.
    let config_file = secret_file(&format!(
        "# SASL\nsecurity.protocol=SASL_SSL\nsasl.mechanisms=SCRAM-SHA-512\nsasl.username={user}\n\
         sasl.password={sentinel}\nssl.ca.location={}",
        ca().display()
    ));
    let relay = Relay::spawn(
        &db.name,
        &with_password_in_url,
        &sasl,
        &["--log-format", "json"],
        &[
            debug,
            (
                "OUTBOX_RELAY_KAFKA_CONFIG_FILE",
                config_file.to_str().unwrap(),
            ),
        ],
    );
    relay.wait_http("/readyz", 200, Duration::from_secs(30));
    insert_rows(&db, &topic, 5).await;
    published += 5;
    db.wait_count(
        "published_at IS NOT NULL",
        published,
        Duration::from_secs(30),
    )
    .await;
    observe(relay, "run 2 (success, json, URL password)", &mut captured);

    // 3 and 4. Wrong passwords on both sides (the error paths), text and JSON: the sentinel is
    // in the URL and in the password variable for relay_tls, and the SASL password for relay.
    let wrong_url = format!(
        "postgres://{PG_ROLE}:{sentinel}@127.0.0.1:{port}/{}?sslmode=verify-full&sslrootcert={}",
        db.name,
        ca().display()
    );
    for format in ["text", "json"] {
        let mut args = sasl_config(SASL_USER, &ca());
        args.extend(["--log-format", format, "--shutdown-timeout", "5s"].map(String::from));
        let relay = Relay::spawn(
            &db.name,
            &wrong_url,
            &sasl,
            &strs(&args),
            &[
                debug,
                ("OUTBOX_RELAY_DATABASE_PASSWORD", sentinel.as_str()),
                ("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", sentinel.as_str()),
            ],
        );
        relay.wait_log("password authentication failed", Duration::from_secs(20));
        relay.wait_log("Authentication failed", Duration::from_secs(20));
        relay.wait_log("Kafka metadata request failed", Duration::from_secs(20));
        relay.wait_http("/readyz", 503, Duration::from_secs(5));
        observe(
            relay,
            &format!("run wrong passwords ({format})"),
            &mut captured,
        );
    }

    // 5. --help and flag errors with every secret variable set.
    let env = [
        ("OUTBOX_RELAY_DATABASE_URL", wrong_url.as_str()),
        ("OUTBOX_RELAY_DATABASE_PASSWORD", sentinel.as_str()),
        ("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", sentinel.as_str()),
        ("OUTBOX_RELAY_KAFKA_BROKERS", sasl.as_str()),
        ("RUST_LOG", "debug"),
    ];
    let kafka_config_env =
        format!("sasl.username={SASL_USER};sasl.password={sentinel};no.such.property=1");
    let bad_config_file = secret_file(&format!("sasl.password={sentinel}\nnot a property line"));
    let unknown_property_file =
        secret_file(&format!("sasl.password={sentinel}\nno.such.property=1"));
    let bad_port = format!("postgres://u:{sentinel}@127.0.0.1:notaport/db");
    let bad_sslmode = format!("postgres://u:{sentinel}@127.0.0.1:{port}/db?sslmode=bogus");
    let plaintext = format!("postgres://u:{sentinel}@127.0.0.1:{port}/db");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let config_path = bad_config_file.to_str().unwrap();
    let unknown_path = unknown_property_file.to_str().unwrap();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("--help", vec!["--help"]),
        ("run --help", vec!["run", "--help"]),
        ("run -h", vec!["run", "-h"]),
        ("migrate --help", vec!["migrate", "--help"]),
        ("cleanup --help", vec!["cleanup", "--help"]),
        ("bad duration", vec!["run", "--poll-interval", "often"]),
        ("bad batch size", vec!["run", "--batch-size", "0"]),
        ("unknown flag", vec!["run", "--no-such-flag", "1"]),
        ("bad URL port", vec!["run", "--database-url", &bad_port]),
        ("bad sslmode", vec!["run", "--database-url", &bad_sslmode]),
        (
            "require secure transport",
            vec![
                "run",
                "--database-url",
                &plaintext,
                "--require-secure-transport",
                "true",
            ],
        ),
        (
            "unknown librdkafka property (OUTBOX_RELAY_KAFKA_CONFIG)",
            vec!["run", "--metrics-addr", "127.0.0.1:0"],
        ),
        (
            "bad line in --kafka-config-file",
            vec!["run", "--kafka-config-file", config_path],
        ),
        (
            "unknown property in --kafka-config-file",
            vec!["run", "--kafka-config-file", unknown_path],
        ),
        (
            "bootstrap.servers in --kafka-config",
            vec!["run", "--kafka-config", "bootstrap.servers=x:1"],
        ),
        (
            "busy --metrics-addr",
            vec!["run", "--metrics-addr", &busy_addr],
        ),
        ("migrate, wrong password", vec!["migrate"]),
        ("cleanup, wrong password", vec!["cleanup"]),
    ];
    for (name, args) in &cases {
        let mut command = relay_command(args);
        command.envs(env);
        if name.contains("OUTBOX_RELAY_KAFKA_CONFIG") {
            command.env("OUTBOX_RELAY_KAFKA_CONFIG", &kafka_config_env);
        }
        let (code, stdout, stderr) = run_to_exit(&mut command, Duration::from_secs(30));
        let expect_success = args.iter().any(|a| *a == "--help" || *a == "-h");
        assert_eq!(
            code == Some(0),
            expect_success,
            "{name}: exit {code:?}; {stderr}"
        );
        captured.push((format!("{name}: stdout (exit {code:?})"), stdout));
        captured.push((format!("{name}: stderr (exit {code:?})"), stderr));
    }
    drop(busy);

    // 6. The operator commands (doctor, status, failed), with the sentinel as the working
    // passwords and as wrong ones.
    let sasl_env = |user: &str| {
        format!(
            "security.protocol=SASL_SSL;sasl.mechanisms=SCRAM-SHA-512;sasl.username={user};ssl.ca.location={}",
            ca().display()
        )
    };
    let (sentinel_sasl, relay_sasl) = (sasl_env(&user), sasl_env(SASL_USER));
    let working = [
        ("OUTBOX_RELAY_DATABASE_URL", verified.as_str()),
        ("OUTBOX_RELAY_DATABASE_PASSWORD", sentinel.as_str()),
        ("OUTBOX_RELAY_KAFKA_BROKERS", sasl.as_str()),
        ("OUTBOX_RELAY_KAFKA_CONFIG", sentinel_sasl.as_str()),
        ("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", sentinel.as_str()),
        ("RUST_LOG", "debug"),
    ];
    let wrong = [
        ("OUTBOX_RELAY_DATABASE_URL", wrong_url.as_str()),
        ("OUTBOX_RELAY_DATABASE_PASSWORD", sentinel.as_str()),
        ("OUTBOX_RELAY_KAFKA_BROKERS", sasl.as_str()),
        ("OUTBOX_RELAY_KAFKA_CONFIG", relay_sasl.as_str()),
        ("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", sentinel.as_str()),
        ("RUST_LOG", "debug"),
    ];
    let commands: [&[&str]; 6] = [
        &["doctor"],
        &["doctor", "--json"],
        &["status"],
        &["status", "--json"],
        &["failed", "list"],
        &["failed", "list", "--json"],
    ];
    for (label, env) in [("working passwords", &working), ("wrong passwords", &wrong)] {
        for args in commands {
            let mut command = relay_command(args);
            command.envs(env.iter().copied());
            let (code, stdout, stderr) = run_to_exit(&mut command, Duration::from_secs(60));
            assert_ne!(code, Some(2), "{args:?} ({label}): a usage error? {stderr}");
            let name = format!("{} ({label})", args.join(" "));
            captured.push((format!("{name}: stdout (exit {code:?})"), stdout));
            captured.push((format!("{name}: stderr (exit {code:?})"), stderr));
        }
    }

    // The runs really logged at debug level, and the error paths really ran.
    let all: String = captured.iter().map(|(_, t)| t.as_str()).collect();
    assert!(all.contains("DEBUG"), "no debug output captured");
    assert!(all.contains("\"level\":\"DEBUG\""), "no JSON debug output");
    assert!(all.contains("password authentication failed"));
    assert!(all.contains("SASL authentication error"));
    assert!(
        all.contains("OUTBOX_RELAY_DATABASE_PASSWORD"),
        "help lists the variables"
    );

    let found = leaks(&sentinel, &captured);
    assert!(
        found.is_empty(),
        "the secret sentinel leaked in {} place(s):\n{}",
        found.len(),
        found.join("\n")
    );

    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {user}")))
        .execute(&db.pool)
        .await;
}

/// A --kafka-config entry without `=` (a typo such as `sasl.password:secret`) must be rejected
/// without echoing it: the error names only the entry's position.
#[test]
fn malformed_kafka_config_entries_do_not_echo_secrets() {
    let sentinel = format!("S3ntinel-{:016x}", rand::random::<u64>());
    let mut captured = Vec::new();
    for entry in [
        format!("sasl.password {sentinel}"),
        format!("sasl.password:{sentinel}"),
    ] {
        let mut command = relay_command(&["run", "--kafka-brokers", "x:1"]);
        command
            .env("OUTBOX_RELAY_DATABASE_URL", "postgres://u@127.0.0.1:1/db")
            .env("OUTBOX_RELAY_KAFKA_CONFIG", &entry);
        let (code, stdout, stderr) = run_to_exit(&mut command, Duration::from_secs(10));
        assert_eq!(code, Some(2), "{stderr}");
        captured.push((
            format!("OUTBOX_RELAY_KAFKA_CONFIG={entry:?}: stderr"),
            stderr,
        ));
        captured.push((
            format!("OUTBOX_RELAY_KAFKA_CONFIG={entry:?}: stdout"),
            stdout,
        ));
        let mut command =
            relay_command(&["run", "--kafka-brokers", "x:1", "--kafka-config", &entry]);
        command.env("OUTBOX_RELAY_DATABASE_URL", "postgres://u@127.0.0.1:1/db");
        let (_, _, stderr) = run_to_exit(&mut command, Duration::from_secs(10));
        captured.push((format!("--kafka-config {entry:?}: stderr"), stderr));
    }
    let found = leaks(&sentinel, &captured);
    assert!(found.is_empty(), "leaked:\n{}", found.join("\n"));
}
