//! Hostile inputs against the real binary, PostgreSQL and Kafka: one bad setting or one stuck
//! dependency costs that command, never a secret and never a hang. One test per class:
//! values in Kafka settings never printed, a server that never answers (connect or statement),
//! settings that make no sense or conflict, and errors and terminal output that say what
//! happened and nothing else.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{kafka_brokers, log_dir, relay_command, unique, TestDb};

/// A 0600-style scratch file under the test target directory.
fn scratch_file(content: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-hostile");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(unique("file"));
    std::fs::write(&path, content).unwrap();
    path
}

/// What one run of the binary did.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Outcome {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Run `command` to its exit (killed and reported after `limit`).
fn run(mut command: Command, limit: Duration) -> Outcome {
    let base = log_dir().join(unique("hostile"));
    let (out, err) = (base.with_extension("stdout"), base.with_extension("stderr"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code,
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
        took: start.elapsed(),
    }
}

/// Run every (label, command) at once, each killed after `limit`.
fn run_all(cases: Vec<(String, Command)>, limit: Duration) -> Vec<(String, Outcome)> {
    let handles: Vec<_> = cases
        .into_iter()
        .map(|(label, command)| std::thread::spawn(move || (label, run(command, limit))))
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Extra environment for a command: (variable, value).
type Env<'a> = [(&'a str, &'a str)];

/// A command line that must be refused: (arguments, environment, what the error says).
type Refusal<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, String);

fn sentinel() -> String {
    format!("S3ntinel-{:016x}", rand::random::<u64>())
}

/// (1) A value in a Kafka setting is never printed: not for an unknown (misspelt) key, a
/// value librdkafka refuses, a Java JAAS line, a problem found when the producer is built, or
/// two sources for the SASL password; `run` and `doctor` alike, against the real stack. Each
/// error names the key and where it was set (the file and line, or the flag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_setting_errors_name_key_and_place_never_the_value() {
    let db = TestDb::new().await;
    let secret = sentinel();
    let brokers = kafka_brokers();
    let jaas = scratch_file(&format!(
        "# SASL\nsecurity.protocol=SASL_PLAINTEXT\nsasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"relay\" password=\"{secret}\";\n"
    ));
    let misspelt = scratch_file(&format!("linger.ms=5\nssl.key.pasword={secret}\n"));
    let with_password = scratch_file(&format!("sasl.password={secret}\n"));
    let (jaas, misspelt, with_password) = (
        jaas.to_str().unwrap().to_string(),
        misspelt.to_str().unwrap().to_string(),
        with_password.to_str().unwrap().to_string(),
    );
    let bad_value = format!("linger.ms={secret}");
    let bad_list = format!("debug=broker,{secret}");
    let bad_bool = format!("enable.ssl.certificate.verification={secret}");
    // (args, env, what the error must say)
    let usage_errors: Vec<Refusal> = vec![
        (
            vec!["--kafka-config-file", &jaas],
            vec![],
            format!("--kafka-config-file {jaas} line 3: sasl.jaas.config: librdkafka does not support Java JAAS"),
        ),
        (
            vec!["--kafka-config-file", &misspelt],
            vec![],
            format!("--kafka-config-file {misspelt} line 2: ssl.key.pasword: no such librdkafka property"),
        ),
        (
            vec!["--kafka-config", &bad_value],
            vec![],
            "--kafka-config: linger.ms: librdkafka refused the value".into(),
        ),
        (
            vec![],
            vec![("OUTBOX_RELAY_KAFKA_CONFIG", bad_list.as_str())],
            "--kafka-config: debug: librdkafka refused the value".into(),
        ),
        (
            vec!["--kafka-config", &bad_bool],
            vec![],
            "--kafka-config: enable.ssl.certificate.verification: expects true or false".into(),
        ),
        (
            vec!["--kafka-config-file", &with_password],
            vec![("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", secret.as_str())],
            format!("--kafka-sasl-password and sasl.password in --kafka-config-file {with_password} line 1 both set the SASL password"),
        ),
    ];
    let mut cases = Vec::new();
    for (i, (args, env, expect)) in usage_errors.iter().enumerate() {
        for command in ["run", "doctor"] {
            let mut argv = vec![command, "--kafka-brokers", &brokers];
            if command == "run" {
                argv.extend(["--metrics-addr", "127.0.0.1:0"]);
            }
            argv.extend(args.iter().copied());
            let mut c = relay_command(&argv);
            c.env("OUTBOX_RELAY_DATABASE_URL", &db.url)
                .env("RUST_LOG", "debug");
            c.envs(env.iter().copied());
            cases.push((format!("{i}:{command}:{expect}"), c));
        }
    }
    // Found only when the producer is built (the properties together): a CA file that does not
    // exist, in a path holding the secret, beside a key password.
    let missing_ca = format!("ssl.ca.location=/nonexistent/{secret}/ca.pem");
    let key_password = format!("ssl.key.password={secret}");
    for command in ["run", "doctor"] {
        let mut argv = vec![command, "--kafka-brokers", &brokers];
        if command == "run" {
            argv.extend(["--metrics-addr", "127.0.0.1:0"]);
        }
        argv.extend([
            "--kafka-config",
            "security.protocol=SSL",
            "--kafka-config",
            &missing_ca,
            "--kafka-config",
            &key_password,
        ]);
        let mut c = relay_command(&argv);
        c.env("OUTBOX_RELAY_DATABASE_URL", &db.url);
        cases.push((format!("build:{command}"), c));
    }
    for (label, out) in run_all(cases, Duration::from_secs(60)) {
        let all = out.all();
        assert!(
            !all.contains(&secret),
            "{label}: the value was printed: {all}"
        );
        assert!(
            !all.contains("(--kafka-config)"),
            "{label}: a file's error blamed --kafka-config: {all}"
        );
        if let Some(expect) = label.strip_prefix("build:") {
            // run refuses to start (exit 2); doctor reports a failed check (exit 1).
            let code = if expect == "run" { 2 } else { 1 };
            assert_eq!(out.code, Some(code), "{label}: {all}");
            assert!(
                all.contains("ssl.ca.location")
                    && all.contains("ssl.ca.location is set by --kafka-config"),
                "{label}: {all}"
            );
            continue;
        }
        let expect = label.splitn(3, ':').nth(2).unwrap();
        assert_eq!(out.code, Some(2), "{label}: {all}");
        assert!(
            out.stderr.contains(&format!("error: {expect}")),
            "{label}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("not shown") || expect.contains("both set"),
            "{label}: {}",
            out.stderr
        );
    }
}

/// Serve PostgreSQL's start-up on `listener` (no TLS, no password), then never answer: every
/// query waits forever. With `handshake` false, not even the start-up is answered.
fn silent_postgres(handshake: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                if handshake {
                    let _ = start_up(stream);
                } else {
                    // Hold the connection, read nothing, answer nothing.
                    std::thread::sleep(Duration::from_secs(300));
                    drop(stream);
                }
            });
        }
    });
    port
}

fn start_up(mut s: TcpStream) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let mut body = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
        s.read_exact(&mut body)?;
        let code = u32::from_be_bytes(body[..4].try_into().unwrap());
        if code == 80877103 || code == 80877104 {
            s.write_all(b"N")?; // no TLS, no GSS: the client goes on in plaintext
            continue;
        }
        break;
    }
    let mut reply = Vec::new();
    reply.extend_from_slice(b"R\0\0\0\x08\0\0\0\0"); // AuthenticationOk
    for (k, v) in [("server_version", "15.0"), ("client_encoding", "UTF8")] {
        let body = format!("{k}\0{v}\0");
        reply.push(b'S');
        reply.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        reply.extend_from_slice(body.as_bytes());
    }
    reply.extend_from_slice(b"K\0\0\0\x0c\0\0\0\x01\0\0\0\x02"); // BackendKeyData
    reply.extend_from_slice(b"Z\0\0\0\x05I"); // ReadyForQuery
    s.write_all(&reply)?;
    // Swallow whatever comes (queries, Terminate) and answer nothing.
    let mut sink = [0u8; 4096];
    while s.read(&mut sink)? > 0 {}
    Ok(())
}

/// Every one-shot command, with `extra` flags, against `url`.
fn one_shot_commands(url: &str, extra: &[&str]) -> Vec<(String, Command)> {
    let brokers = kafka_brokers();
    let commands: [&[&str]; 8] = [
        &["migrate"],
        &["adopt", "--source-table", "outboxevent"],
        &["doctor", "--kafka-brokers", &brokers],
        &["status"],
        &["failed", "list"],
        &["failed", "retry", "--all"],
        &["failed", "purge", "--older-than", "1d"],
        &["cleanup"],
    ];
    commands
        .iter()
        .map(|argv| {
            let mut all = argv.to_vec();
            all.extend_from_slice(extra);
            let mut c = relay_command(&all);
            c.env("OUTBOX_RELAY_DATABASE_URL", url);
            (argv.join(" "), c)
        })
        .collect()
}

/// (2) No command waits forever: a server that accepts TCP and never answers costs each
/// command its --connect-timeout; one that completes the start-up and never answers a query
/// costs it its --statement-timeout (plus a few seconds); a statement waiting for a lock is
/// cancelled by PostgreSQL at --statement-timeout. Each error says which bound was hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_give_up_on_a_server_that_never_answers() {
    // Accepts TCP, answers nothing.
    let mute = format!("postgres://relay@127.0.0.1:{}/app", silent_postgres(false));
    let mut cases = one_shot_commands(&mute, &["--connect-timeout", "1s"]);
    // The defaults are bounded too (10s for status).
    let mut c = relay_command(&["status"]);
    c.env("OUTBOX_RELAY_DATABASE_URL", &mute);
    cases.push(("status (default)".into(), c));
    for (label, out) in run_all(cases, Duration::from_secs(40)) {
        let all = out.all();
        assert_eq!(out.code, Some(1), "{label} (took {:?}): {all}", out.took);
        let limit = if label.contains("default") { 16 } else { 6 };
        assert!(
            out.took < Duration::from_secs(limit),
            "{label} took {:?}",
            out.took
        );
        assert!(
            all.contains("connect timeout: no connection within")
                && all.contains("--connect-timeout")
                && all.contains("never completed the PostgreSQL handshake"),
            "{label}: {all}"
        );
        assert!(!all.contains("retrying"), "{label}: {all}");
    }

    // Completes the start-up, then never answers a statement.
    let stalled = format!("postgres://relay@127.0.0.1:{}/app", silent_postgres(true));
    let cases = one_shot_commands(
        &stalled,
        &["--statement-timeout", "1s", "--connect-timeout", "5s"],
    );
    for (label, out) in run_all(cases, Duration::from_secs(40)) {
        let all = out.all();
        assert_eq!(out.code, Some(1), "{label} (took {:?}): {all}", out.took);
        assert!(
            out.took < Duration::from_secs(12),
            "{label} took {:?}",
            out.took
        );
        assert!(
            all.contains(
                "statement timeout: PostgreSQL did not answer within 1s (--statement-timeout)"
            ),
            "{label}: {all}"
        );
    }

    // The real server, with the outbox table locked by another transaction.
    let db = TestDb::new().await;
    let mut lock = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let cases: Vec<_> = one_shot_commands(&db.url, &["--statement-timeout", "1s"])
        .into_iter()
        .filter(|(label, _)| !label.starts_with("adopt"))
        .collect();
    for (label, out) in run_all(cases, Duration::from_secs(40)) {
        let all = out.all();
        assert_eq!(out.code, Some(1), "{label} (took {:?}): {all}", out.took);
        assert!(
            out.took < Duration::from_secs(12),
            "{label} took {:?}",
            out.took
        );
        assert!(
            all.contains("canceling statement due to statement timeout (SQLSTATE 57014)")
                && all.contains("--statement-timeout"),
            "{label}: {all}"
        );
    }
    lock.rollback().await.unwrap();
}

/// (3) Settings that make no sense, or that come from two places, are refused before anything
/// runs: exit 2 naming the flag(s), the way a bad flag is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonsense_and_conflicting_settings_are_refused_naming_the_flag() {
    let db = TestDb::new().await;
    let brokers = kafka_brokers();
    let secret = sentinel();
    let password_file = scratch_file(&format!("{secret}\n"));
    let password_file = password_file.to_str().unwrap();
    let run_with = |flag: &'static str, value: &'static str| {
        let mut c = relay_command(&[
            "run",
            "--kafka-brokers",
            &brokers,
            "--metrics-addr",
            "127.0.0.1:0",
            flag,
            value,
        ]);
        c.env("OUTBOX_RELAY_DATABASE_URL", &db.url);
        (format!("run {flag} {value}"), flag, c)
    };
    let mut cases = vec![
        run_with("--poll-interval", "0s"),
        run_with("--poll-interval", "10h"),
        run_with("--lease-duration", "300000000years"),
        run_with("--retention", "300000000years"),
        run_with("--cleanup-interval", "0s"),
        run_with("--stall-timeout", "0s"),
        run_with("--shutdown-timeout", "0s"),
        run_with("--otlp-timeout", "0s"),
        run_with("--batch-size", "0"),
    ];
    for argv in [
        &["failed", "list", "--limit", "0"][..],
        &["failed", "purge", "--older-than", "300000000years"],
        &["cleanup", "--retention", "300000000years"],
        &["migrate", "--connect-timeout", "0s"],
        &["status", "--statement-timeout", "0s"],
    ] {
        let mut c = relay_command(argv);
        c.env("OUTBOX_RELAY_DATABASE_URL", &db.url);
        cases.push((argv.join(" "), argv[argv.len() - 2], c));
    }
    // Two sources: refused even though one of them names a file that does not exist.
    let conflicts: [(&[&str], &Env, &str, &str); 4] = [
        (
            &["status", "--database-url-file", "/nonexistent/url"],
            &[],
            "--database-url",
            "--database-url-file",
        ),
        (
            &[
                "failed",
                "list",
                "--database-password-file",
                "/nonexistent/pw",
            ],
            &[("OUTBOX_RELAY_DATABASE_PASSWORD", "pw")],
            "--database-password",
            "--database-password-file",
        ),
        (
            &["doctor", "--kafka-sasl-password-file", "/nonexistent/pw"],
            &[("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", "pw")],
            "--kafka-sasl-password",
            "--kafka-sasl-password-file",
        ),
        (
            &[
                "run",
                "--kafka-sasl-password-file",
                password_file,
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &[("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", "pw")],
            "--kafka-sasl-password",
            "--kafka-sasl-password-file",
        ),
    ];
    let mut conflict_cases = Vec::new();
    for (argv, env, a, b) in conflicts {
        let mut c = relay_command(argv);
        c.env("OUTBOX_RELAY_DATABASE_URL", &db.url)
            .env("OUTBOX_RELAY_KAFKA_BROKERS", &brokers)
            .envs(env.iter().copied());
        conflict_cases.push((format!("{a}|{b}|{}", argv.join(" ")), c));
    }
    let labelled: Vec<(String, Command)> = cases
        .into_iter()
        .map(|(label, flag, c)| (format!("{flag}|{label}"), c))
        .collect();
    for (label, out) in run_all(labelled, Duration::from_secs(30)) {
        let (flag, _) = label.split_once('|').unwrap();
        assert_eq!(out.code, Some(2), "{label}: {}", out.all());
        assert!(
            out.stderr.contains(&format!("'{flag} <"))
                && (out.stderr.contains("must be from") || out.stderr.contains("is not in")),
            "{label}: {}",
            out.stderr
        );
    }
    for (label, out) in run_all(conflict_cases, Duration::from_secs(30)) {
        let mut parts = label.splitn(3, '|');
        let (a, b) = (parts.next().unwrap(), parts.next().unwrap());
        assert_eq!(out.code, Some(2), "{label}: {}", out.all());
        assert!(
            out.stderr
                .contains(&format!("error: {a} and {b} are both set"))
                && !out.stderr.contains("cannot read"),
            "{label}: {}",
            out.stderr
        );
        assert!(!out.all().contains(&secret), "{label}: {}", out.all());
    }
}

/// (4) Errors say what happened: the server's message and SQLSTATE with the hint, no sqlx
/// wrapping, no PostgreSQL source line, no retry wording where nothing retries; database flags
/// work after the subcommand word; `failed list` and `status` never print a row's control
/// characters raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_clean_and_terminal_output_is_escaped() {
    let db = TestDb::new().await;
    // A parked row whose topic, key and error carry terminal escape sequences.
    let topic = "t\u{1b}]0;owned\u{7}\u{1b}[2J";
    sqlx::query(
        "INSERT INTO outbox (topic, key, payload, failed_at, last_error, attempts) \
         VALUES ($1, $2, 'p', now(), $3, 1)",
    )
    .bind(topic)
    .bind("k\u{1b}[31m\r\u{202e}")
    .bind("bad\u{1b}[1A\nline")
    .execute(&db.pool)
    .await
    .unwrap();
    // A role that may never connect: PostgreSQL refuses it with "too many connections"
    // (53300), a fault the connect loop treats as passing.
    let role = unique("hostile_limited");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let limited = db
        .url
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    assert_ne!(limited, db.url);

    let after = |argv: &[&str]| {
        // Database flags after the subcommand word, not in the environment.
        let mut all = argv.to_vec();
        all.extend(["--database-url", &db.url, "--table", "public.outbox"]);
        relay_command(&all)
    };
    let mut cases = vec![
        ("failed list".to_string(), after(&["failed", "list"])),
        ("status".to_string(), after(&["status"])),
        ("status --json".to_string(), after(&["status", "--json"])),
    ];
    let mut missing = relay_command(&[
        "failed",
        "list",
        "--database-url",
        &db.url,
        "--table",
        "nope",
    ]);
    missing.env_remove("OUTBOX_RELAY_DATABASE_URL");
    cases.push(("missing table".into(), missing));
    let mut c = relay_command(&["status"]);
    c.env("OUTBOX_RELAY_DATABASE_URL", &limited);
    cases.push(("limited status".into(), c));
    let mut c = relay_command(&["migrate", "--connect-timeout", "3s"]);
    c.env("OUTBOX_RELAY_DATABASE_URL", &limited);
    cases.push(("limited migrate".into(), c));
    let mut results = std::collections::HashMap::new();
    for (label, out) in run_all(cases, Duration::from_secs(30)) {
        results.insert(label, out);
    }

    let list = &results["failed list"];
    assert_eq!(list.code, Some(0), "{}", list.all());
    assert!(
        !list.stdout.contains('\u{1b}') && !list.stdout.contains('\r'),
        "{:?}",
        list.stdout
    );
    assert!(!list.stdout.contains('\u{202e}'), "{:?}", list.stdout);
    assert!(
        list.stdout
            .contains("t\\u{1b}]0;owned\\u{7}\\u{1b}[2J\tk\\u{1b}[31m\\r\\u{202e}\t"),
        "{:?}",
        list.stdout
    );
    assert!(
        list.stdout.contains("bad\\u{1b}[1A\\nline"),
        "{:?}",
        list.stdout
    );
    assert_eq!(list.stdout.lines().count(), 1, "{:?}", list.stdout);
    let status = &results["status"];
    assert_eq!(status.code, Some(0), "{}", status.all());
    assert!(!status.stdout.contains('\u{1b}'), "{:?}", status.stdout);
    assert!(
        status.stdout.contains("t\\u{1b}]0;owned"),
        "{:?}",
        status.stdout
    );
    let json = &results["status --json"];
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(
        parsed["topics"][0]["topic"], topic,
        "JSON keeps the exact value"
    );

    let missing = &results["missing table"];
    assert_eq!(missing.code, Some(1), "{}", missing.all());
    assert!(
        missing.stderr.starts_with(
            "error: failed list: relation \"public.nope\" does not exist (SQLSTATE 42P01)\n  hint: "
        ) && missing.stderr.contains("outbox-relay migrate"),
        "{}",
        missing.stderr
    );
    for (label, out) in &results {
        for noise in [
            "at line",
            "retrying",
            "retry_in",
            "error returned from database",
            "Some(",
        ] {
            assert!(
                !out.all().contains(noise),
                "{label}: {noise:?} in {}",
                out.all()
            );
        }
    }
    // Nothing retries in status: one error, no "trying again".
    let status = &results["limited status"];
    assert_eq!(status.code, Some(1), "{}", status.all());
    assert!(
        status.stderr.contains("error: status: cannot connect to")
            && status.stderr.contains("(SQLSTATE 53300)")
            && !status.stderr.contains("trying again"),
        "{}",
        status.stderr
    );
    // migrate retries a passing fault within --connect-timeout, says so while it does, then
    // gives up with the last error.
    let migrate = &results["limited migrate"];
    assert_eq!(migrate.code, Some(1), "{}", migrate.all());
    assert!(
        migrate.took < Duration::from_secs(8),
        "took {:?}",
        migrate.took
    );
    assert!(
        migrate
            .stderr
            .contains("trying again in 500ms (for up to --connect-timeout 3s)")
            && migrate.stderr.contains("giving up connecting")
            && migrate.stderr.contains("error: migrate: cannot connect to")
            && migrate.stderr.contains("(SQLSTATE 53300)"),
        "{}",
        migrate.stderr
    );
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
        .execute(&db.pool)
        .await;
}
