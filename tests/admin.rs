//! Operator commands against the real database: status, failed list|retry|skip|purge.

mod common;

use std::time::Duration;

use common::{create_topics, relay_command, unique, Relay, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_failed_commands_inspect_and_repair_parked_rows() {
    let db = TestDb::new().await;
    let topic = unique("adm");
    create_topics(&[&topic], 1).await;
    let relay = Relay::start(&db, &[]);
    for (key, headers) in [
        ("good", None),
        ("fixable", Some(serde_json::json!(["bad"]))),
        ("hopeless", Some(serde_json::json!({"n": 1}))),
        ("old", Some(serde_json::json!(7))),
    ] {
        sqlx::query("INSERT INTO outbox (topic, key, payload, headers) VALUES ($1, $2, 'p', $3)")
            .bind(&topic)
            .bind(key)
            .bind(headers)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    db.wait_count("failed_at IS NOT NULL", 3, Duration::from_secs(20))
        .await;
    db.wait_count("published_at IS NOT NULL", 1, Duration::from_secs(20))
        .await;

    let (code, out, err) = db.run(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["parked"], 3, "{out}");
    assert_eq!(status["pending"], 0, "{out}");
    assert_eq!(status["leader"]["valid"], true, "{out}");
    assert_eq!(status["topics"][0]["topic"], topic.as_str());

    let (code, out, _) = db.run(&["failed", "list", "--json"]);
    assert_eq!(code, 0);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert!(rows[0]["last_error"]
        .as_str()
        .unwrap()
        .contains("headers is an array"));
    let fixable = rows[0]["id"].as_i64().unwrap();

    // Fix the row, then retry it by id: the relay publishes it.
    sqlx::query("UPDATE outbox SET headers = NULL WHERE id = $1")
        .bind(fixable)
        .execute(&db.pool)
        .await
        .unwrap();
    let (code, out, err) = db.run(&["failed", "retry", "--id", &fixable.to_string()]);
    assert_eq!(
        (code, out.trim()),
        (0, "1 parked rows are pending again"),
        "{err}"
    );
    assert!(
        err.contains("action=\"retry\""),
        "every action is logged: {err}"
    );
    db.wait_count("published_at IS NOT NULL", 2, Duration::from_secs(20))
        .await;

    let (code, out, _) = db.run(&[
        "failed",
        "skip",
        "--key",
        "hopeless",
        "--reason",
        "obsolete event",
    ]);
    assert_eq!(
        (code, out.trim()),
        (0, "1 parked rows skipped (marked handled, not published)")
    );
    let note: String = sqlx::query_scalar(
        "SELECT last_error FROM outbox WHERE key = 'hopeless' AND published_at IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        note.starts_with("skipped by an operator: obsolete event (was: header"),
        "{note}"
    );

    // The skipped row keeps failed_at (cleanup never deletes it): purge deletes it with the
    // parked one, as asked.
    let (code, out, _) = db.run(&["failed", "purge", "--older-than", "0s"]);
    assert_eq!((code, out.trim()), (0, "2 parked or skipped rows deleted"));
    assert_eq!(db.count("failed_at IS NOT NULL").await, 0);

    // A selector is required for actions; a bad one is a usage error.
    let (code, _, err) = db.run(&["failed", "retry"]);
    assert_eq!(code, 2);
    assert!(err.contains("--id") && err.contains("--all"), "{err}");
    let (code, out, _) = db.run(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("0 pending, 0 parked"), "{out}");
    drop(relay);
}

fn status_json(db: &TestDb) -> serde_json::Value {
    let (code, out, err) = db.run(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Poll `status --json` until `until` holds (panics with the last status after 30 s).
fn wait_status(
    db: &TestDb,
    what: &str,
    until: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let status = status_json(db);
        if until(&status) {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "status never showed {what}: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn replica<'a>(status: &'a serde_json::Value, host: &str) -> &'a serde_json::Value {
    status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["host"] == host)
        .unwrap_or_else(|| panic!("no replica on {host}: {status:#}"))
}

/// Two `run` processes on one table: `status` lists both and what each owns, then shows a
/// SIGTERMed replica as gone at once and a kill -9ed one as stale after three leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_every_replica_and_what_it_owns() {
    let db = TestDb::new().await;
    let brokers = common::kafka_brokers();
    let start = |host: &str| {
        Relay::spawn(
            &db.name,
            &db.url,
            &brokers,
            &["--lease-duration", "2s"],
            &[("HOSTNAME", host)],
        )
    };
    let a = start("replica-a");
    a.wait_log(
        "leader: this replica now publishes",
        Duration::from_secs(20),
    );
    let b = start("replica-b");
    let status = wait_status(&db, "a leader and a standby", |s| {
        let roles: Vec<&str> = s["replicas"]
            .as_array()
            .map(|r| r.iter().filter_map(|r| r["role"].as_str()).collect())
            .unwrap_or_default();
        roles == ["leader", "standby"]
    });
    let (leader, standby) = (replica(&status, "replica-a"), replica(&status, "replica-b"));
    assert_eq!(leader["role"], "leader", "{status:#}");
    assert_eq!(
        leader["id"], status["leader"]["holder"],
        "the lease's holder id: {status:#}"
    );
    assert!(
        leader["id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("replica-a:{}:", a.child.id())),
        "{status:#}"
    );
    assert_eq!(leader["pid"], a.child.id());
    assert_eq!(leader["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(leader["owns"], "all topics of public.outbox");
    assert_eq!(leader["epoch"], status["leader"]["epoch"]);
    assert!(
        leader["leader_since"].is_string() && leader["lease_expires_at"].is_string(),
        "{status:#}"
    );
    assert_eq!(standby["role"], "standby");
    assert_eq!(standby["owns"], "nothing (standby)");
    assert!(
        standby["id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("replica-b:{}:", b.child.id())),
        "{status:#}"
    );
    assert!(
        standby["epoch"].is_null() && standby["lease_expires_at"].is_null(),
        "{status:#}"
    );
    let (_, text, _) = db.run(&["status"]);
    let line = |host: &str| {
        text.lines()
            .find(|l| l.starts_with(host))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line("replica-a").contains(" leader ")
            && line("replica-a").contains(" all topics of public.outbox "),
        "{text}"
    );
    assert!(
        line("replica-b").contains(" standby ")
            && line("replica-b").contains(" nothing (standby) "),
        "{text}"
    );

    // A graceful stop marks the replica gone before it exits.
    assert_eq!(b.terminate(Duration::from_secs(20)), Some(0));
    let status = status_json(&db);
    assert_eq!(replica(&status, "replica-b")["role"], "gone", "{status:#}");
    assert_eq!(
        replica(&status, "replica-a")["role"],
        "leader",
        "{status:#}"
    );

    // A killed replica says nothing: it turns stale after three lease durations (6 s).
    a.kill9();
    let killed = std::time::Instant::now();
    let status = status_json(&db);
    assert_ne!(
        replica(&status, "replica-a")["role"],
        "stale",
        "too early: {status:#}"
    );
    let status = wait_status(&db, "replica-a stale", |s| {
        replica(s, "replica-a")["role"] == "stale"
    });
    assert!(
        killed.elapsed() > Duration::from_secs(4),
        "stale after only {:?}",
        killed.elapsed()
    );
    assert_eq!(replica(&status, "replica-a")["owns"], "nothing (stale)");
    let (_, text, _) = db.run(&["status"]);
    assert!(text.contains("leader: none (last: replica-a:"), "{text}");
}

/// An install migrated before the replicas table existed: the relay publishes anyway (the
/// failing heartbeat is a rate-limited warning with the fix), `status` says the table is
/// missing, and `migrate` under the running relay brings the replica into `status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_replicas_table_never_stops_the_relay_and_migrate_adds_it() {
    let db = TestDb::new().await;
    let topic = unique("repl");
    create_topics(&[&topic], 1).await;
    sqlx::query("DROP TABLE outbox_replicas")
        .execute(&db.pool)
        .await
        .unwrap();
    let relay = Relay::spawn(
        &db.name,
        &db.url,
        &common::kafka_brokers(),
        &["--lease-duration", "1s"],
        &[("HOSTNAME", "old-install")],
    );
    sqlx::query("INSERT INTO outbox (topic, key, payload) SELECT $1, 'k' || i, 'p' FROM generate_series(1, 50) i")
        .bind(&topic)
        .execute(&db.pool)
        .await
        .unwrap();
    db.wait_count("published_at IS NOT NULL", 50, Duration::from_secs(30))
        .await;
    relay.wait_log("replica heartbeat failed", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2)); // six more failing beats
    let logs = relay.logs();
    assert_eq!(
        logs.matches("replica heartbeat failed").count(),
        1,
        "rate-limited: {logs}"
    );
    assert!(
        logs.contains("outbox_replicas table does not exist: run `outbox-relay migrate`"),
        "{logs}"
    );
    let (code, text, _) = db.run(&["status"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("leader: old-install:")
            && text.contains(
                "replicas: unknown (public.outbox_replicas is missing: run `outbox-relay migrate`)"
            ),
        "{text}"
    );
    assert!(status_json(&db)["replicas"].is_null());
    let brokers = common::kafka_brokers();
    let (_, doctor, _) = db.run(&["doctor", "--kafka-brokers", &brokers]);
    assert!(
        doctor.contains("[WARN] table: the replicas table is missing"),
        "{doctor}"
    );

    let (code, _, err) = db.run(&["migrate"]);
    assert_eq!(code, 0, "{err}");
    relay.wait_log("replica heartbeat recovered", Duration::from_secs(10));
    let status = status_json(&db);
    assert_eq!(
        replica(&status, "old-install")["role"],
        "leader",
        "{status:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_missing_topics_and_oversized_payloads_with_fixes() {
    let db = TestDb::new().await;
    let topic = unique("doc");
    create_topics(&[&topic], 2).await;
    let missing = unique("doc_missing");
    sqlx::query("INSERT INTO outbox (topic, key, payload) VALUES ($1, 'k', $2), ($3, 'k', 'x')")
        .bind(&topic)
        .bind(vec![b'x'; 1_200_000])
        .bind(&missing)
        .execute(&db.pool)
        .await
        .unwrap();
    let brokers = common::kafka_brokers();
    let (code, out, err) = db.run(&["doctor", "--kafka-brokers", &brokers, "--json"]);
    assert_eq!(code, 1, "an error finding exits 1: {out} {err}");
    let findings: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let find = |check: &str, severity: &str, needle: &str| {
        findings.iter().any(|f| {
            f["check"] == check
                && f["severity"] == severity
                && f["message"].as_str().unwrap().contains(needle)
        })
    };
    assert!(find("database", "ok", "connected to"), "{out}");
    assert!(find("table", "ok", "every column"), "{out}");
    assert!(find("wake-up", "ok", "NOTIFY trigger installed"), "{out}");
    assert!(find("producer", "ok", "enable.idempotence=true"), "{out}");
    assert!(
        find("topics", "ok", &format!("{topic}: 2 partitions")),
        "{out}"
    );
    assert!(find("topics", "error", &missing), "{out}");
    assert!(find("limits", "error", "1200000 bytes"), "{out}");
    assert!(find("transport", "warn", "sslmode"), "{out}");
    let (code, text, _) = db.run(&["doctor", "--kafka-brokers", &brokers]);
    assert_eq!(code, 1);
    assert!(
        text.contains("[FAIL] topics:") && text.contains("fix: create it"),
        "{text}"
    );
    // An unreachable database is an error finding, not a crash.
    let (code, out, _) = relay_command(&["doctor", "--kafka-brokers", &brokers])
        .env(
            "OUTBOX_RELAY_DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/none",
        )
        .output()
        .map(|o| {
            (
                o.status.code().unwrap(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                (),
            )
        })
        .unwrap();
    assert_eq!(code, 1);
    assert!(out.contains("[FAIL] database: cannot connect"), "{out}");
}

/// `doctor` checks the read index of the mode the table is migrated for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_read_index_of_the_migrated_mode() {
    let brokers = common::kafka_brokers();
    let db = TestDb::migrated(&["--read-mode", "claim"]).await;
    let (_, out, err) = db.run(&["doctor", "--kafka-brokers", &brokers, "--json"]);
    let findings: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    let index_finding = findings
        .iter()
        .find(|f| f["check"] == "indexes")
        .unwrap_or_else(|| panic!("no index finding: {out}"));
    let message = index_finding["message"].as_str().unwrap();
    assert_eq!(index_finding["severity"], "ok", "{out}");
    assert!(
        message.contains("_pending_idx") && message.contains("--read-mode claim"),
        "{message}"
    );
    // No read index (as an earlier release's append mode left the table): a warning that
    // names the fix for the mode in use.
    let db = TestDb::new().await;
    sqlx::query("DROP INDEX outbox_pending_idx")
        .execute(&db.pool)
        .await
        .unwrap();
    let (_, out, _) = db.run(&["doctor", "--kafka-brokers", &brokers]);
    assert!(
        out.contains("[WARN] indexes: no read index") && out.contains("migrate --read-mode"),
        "{out}"
    );
}

/// `doctor --delivery exactly-once` checks what exactly-once needs against the test broker:
/// its transaction settings (read here with describe_configs: single node, replication factor
/// 1), the positions topic (compacted, missing, not compacted) and a transaction of its own,
/// begun and aborted under a probe id, so a relay running with the real id is not fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_what_exactly_once_needs_without_fencing_the_relay() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;

    let brokers = common::kafka_brokers();
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let broker = metadata.brokers()[0].id();
    let described = admin
        .describe_configs(
            &[ResourceSpecifier::Broker(broker)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    let setting = |key: &str| {
        let value = described.get(key).and_then(|e| e.value.clone());
        value.unwrap_or_else(|| panic!("broker {broker} does not show {key}"))
    };
    let (factor, min_isr) = (
        setting("transaction.state.log.replication.factor"),
        setting("transaction.state.log.min.isr"),
    );
    assert!(
        factor.parse::<usize>().unwrap() <= metadata.brokers().len(),
        "the test broker's transactions cannot work: replication factor {factor}"
    );

    let db = TestDb::new().await;
    let (topic, positions) = (unique("eo_doc"), unique("eo_positions"));
    create_topics(&[&topic], 1).await;
    common::create_topics_with_config(&[&positions], 1, &[("cleanup.policy", "compact")]).await;
    let id = unique("eo_doctor");
    let exactly_once = ["--delivery", "exactly-once", "--transactional-id", &id];
    // A relay publishing exactly-once with the same transactional id and positions topic.
    let mut flags = exactly_once.to_vec();
    flags.extend(["--positions-topic", &positions]);
    let relay = Relay::start(&db, &flags);
    let insert = |key: &'static str| {
        sqlx::query("INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, 'p')")
            .bind(&topic)
            .bind(key)
            .execute(&db.pool)
    };
    insert("before").await.unwrap();
    db.wait_count("published_at IS NOT NULL", 1, Duration::from_secs(30))
        .await;

    let doctor = |positions: &str| {
        let mut args = vec!["doctor", "--kafka-brokers", &brokers, "--json"];
        args.extend_from_slice(&exactly_once);
        args.extend(["--positions-topic", positions]);
        let (code, out, err) = db.run(&args);
        let findings: Vec<serde_json::Value> =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
        let found: Vec<serde_json::Value> = findings
            .into_iter()
            .filter(|f| f["check"] == "exactly-once")
            .collect();
        (code, found, out)
    };
    let (code, found, out) = doctor(&positions);
    assert_eq!(code, 0, "no error finding: {out}");
    assert_eq!(found.len(), 3, "{out}");
    assert!(found.iter().all(|f| f["severity"] == "ok"), "{out}");
    let message = |i: usize| found[i]["message"].as_str().unwrap().to_string();
    assert!(
        message(0).contains(&format!(
            "transaction.state.log.replication.factor={factor}, transaction.state.log.min.isr={min_isr}"
        )),
        "{out}"
    );
    assert!(
        message(1).contains(&format!(
            "positions topic {positions}: cleanup.policy=compact, 1 partitions"
        )),
        "{out}"
    );
    assert!(
        message(2).contains(&format!("as {id}.doctor-probe"))
            && message(2).contains("and write its positions"),
        "the probe wrote to the positions topic in its transaction: {out}"
    );

    // The relay was not fenced: it commits its next transaction with the producer it had.
    insert("after").await.unwrap();
    db.wait_count("published_at IS NOT NULL", 2, Duration::from_secs(30))
        .await;
    let committed = relay.metric("outbox_relay_transactions_total{outcome=\"committed\"}");
    let aborted = relay.metric("outbox_relay_transactions_total{outcome=\"aborted\"}");
    assert_eq!(
        (committed, aborted.unwrap_or(0.0)),
        (Some(2.0), 0.0),
        "{}",
        relay.logs()
    );
    let logs = relay.logs();
    assert!(
        !logs.contains("recreating the producer") && !logs.contains("did not commit"),
        "{logs}"
    );
    drop(relay);

    // A missing positions topic is the relay's to create; one that is not compacted is a
    // warning with the fix.
    // The finding of `severity` whose message contains `needle`, if any.
    let finding = |found: &[serde_json::Value], severity: &str, needle: &str| {
        let text = |f: &serde_json::Value, k: &str| f[k].as_str().unwrap_or_default().to_string();
        found
            .iter()
            .find(|f| f["severity"] == severity && text(f, "message").contains(needle))
            .map(|f| text(f, "fix"))
    };
    let (code, found, out) = doctor(&unique("eo_missing"));
    assert_eq!(code, 0, "{out}");
    let missing = finding(&found, "info", "created by the relay at start");
    assert!(missing.is_some(), "{out}");
    let (code, found, out) = doctor(&topic);
    assert_eq!(code, 0, "a warning is not a failure: {out}");
    let fix = finding(&found, "warn", "is not compacted (cleanup.policy=delete)");
    assert!(
        fix.is_some_and(|fix| fix.contains("cleanup.policy=compact")),
        "{out}"
    );
}

/// Drops a replication slot when the test ends, passed or not: slots are cluster-wide, hold
/// WAL while they exist, and keep their database from being dropped.
struct DropSlot(String);

impl Drop for DropSlot {
    fn drop(&mut self) {
        let slot = self.0.clone();
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&common::database_url()).await?;
                for _ in 0..50 {
                    // A relay's stream holds it active: end that session, then drop it.
                    let gone: bool = sqlx::query_scalar(
                        "SELECT NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                    )
                    .bind(&slot)
                    .fetch_one(&mut conn)
                    .await?;
                    if gone {
                        return Ok::<_, sqlx::Error>(());
                    }
                    let _ = sqlx::query(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                         WHERE slot_name = $1 AND active_pid IS NOT NULL",
                    )
                    .bind(&slot)
                    .execute(&mut conn)
                    .await;
                    let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
                        .bind(&slot)
                        .execute(&mut conn)
                        .await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(sqlx::Error::Protocol(format!("slot {slot} is still there")))
            })
        })
        .join()
        .unwrap();
        if let Err(e) = dropped {
            eprintln!("could not drop replication slot {}: {e}", self.0);
        }
    }
}

fn findings(out: &str, err: &str) -> Vec<serde_json::Value> {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out} {err}"))
}

fn finding<'a>(
    findings: &'a [serde_json::Value],
    check: &str,
    needle: &str,
) -> &'a serde_json::Value {
    findings
        .iter()
        .find(|f| f["check"] == check && f["message"].as_str().unwrap().contains(needle))
        .unwrap_or_else(|| panic!("no {check} finding with {needle:?}: {findings:#?}"))
}

/// Log mode: `doctor` reports wal_level, REPLICATION, the publication, the slot (state and the
/// WAL it holds) and the settings bounding that WAL, recommending max_slot_wal_keep_size when it
/// is unlimited; `status` shows the slot. Both find the mode from the publication when
/// --read-mode is not given; a slot left behind after switching to claim mode is a warning, a
/// missing one a failure naming the fix and the runbook. Needs no Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mode_doctor_and_status_report_the_slot() {
    let (slot, publication) = (unique("slot"), unique("pub"));
    let names = [
        "--slot",
        slot.as_str(),
        "--publication",
        publication.as_str(),
    ];
    let mut migrate = vec!["--read-mode", "log"];
    migrate.extend_from_slice(&names);
    let db = TestDb::migrated(&migrate).await;
    let drop_slot = DropSlot(slot.clone());
    sqlx::query("INSERT INTO outbox (topic, key, payload) SELECT 'log.t', 'k' || i, 'p' FROM generate_series(1, 100) i")
        .execute(&db.pool)
        .await
        .unwrap();
    let unlimited: bool =
        sqlx::query_scalar("SELECT current_setting('max_slot_wal_keep_size') = '-1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    // Kafka's findings are not looked at: a closed port fails them at once.
    let doctor = |extra: &[&str]| {
        let mut args = vec!["doctor", "--kafka-brokers", "127.0.0.1:1"];
        args.extend_from_slice(&names);
        args.extend_from_slice(extra);
        db.run(&args)
    };

    let (_, out, err) = doctor(&["--read-mode", "log", "--json"]);
    let f = findings(&out, &err);
    for (check, needle) in [
        ("wal_level", "wal_level=logical"),
        ("replication", "may stream from a replication slot"),
        (
            "publication",
            &format!("{publication} publishes the inserts of public.outbox"),
        ),
        (
            "slot",
            &format!("{slot}: pgoutput on this database, inactive"),
        ),
        ("slot wal", "wal_status=reserved"),
        ("indexes", "--read-mode log"),
        ("wake-up", "log mode"),
        ("wal_sender_timeout", "wal_sender_timeout="),
    ] {
        assert_eq!(
            finding(&f, check, needle)["severity"],
            "ok",
            "{check}: {out}"
        );
    }
    let wal = finding(&f, "slot wal", "retains")["message"]
        .as_str()
        .unwrap();
    assert!(
        !wal.contains("retains 0 B") && wal.contains("confirmed_flush_lsn"),
        "{wal}"
    );
    assert_eq!(finding(&f, "backlog", "in the WAL")["severity"], "info");
    let keep = finding(&f, "max_slot_wal_keep_size", "max_slot_wal_keep_size=");
    if unlimited {
        assert_eq!(keep["severity"], "warn", "{keep}");
        let fix = keep["fix"].as_str().unwrap();
        assert!(
            fix.contains("ALTER SYSTEM SET max_slot_wal_keep_size = '")
                && fix.contains("is lost")
                && fix.contains("disk fills")
                && fix.contains("\"A lost slot\""),
            "{fix}"
        );
    }
    assert!(
        !f.iter()
            .any(|f| f["severity"] == "error" && f["check"] != "kafka"),
        "only Kafka fails: {out}"
    );
    let (_, text, _) = doctor(&["--read-mode", "log"]);
    assert!(
        text.contains(&format!("[ OK ] slot: {slot}: pgoutput")),
        "{text}"
    );
    if unlimited {
        assert!(
            text.contains("[WARN] max_slot_wal_keep_size: max_slot_wal_keep_size=-1")
                && text.contains("fix: ALTER SYSTEM SET max_slot_wal_keep_size"),
            "{text}"
        );
    }
    // Without --read-mode: the publication says log.
    let (_, out, err) = doctor(&["--json"]);
    let f = findings(&out, &err);
    assert_eq!(finding(&f, "slot", &slot)["severity"], "ok", "{out}");

    let mut args = vec!["status", "--json"];
    args.extend_from_slice(&names);
    let (code, out, err) = db.run(&args);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["read_mode"], "log", "{out}");
    assert_eq!(
        status["pending"], 0,
        "rows are never marked in log mode: {out}"
    );
    let s = &status["slot"];
    assert_eq!(
        (&s["name"], &s["exists"], &s["active"], &s["wal_status"]),
        (
            &serde_json::json!(slot),
            &serde_json::json!(true),
            &serde_json::json!(false),
            &serde_json::json!("reserved")
        ),
        "{out}"
    );
    assert!(s["retained_wal_bytes"].as_i64().unwrap() > 0, "{out}");
    assert!(
        s["confirmed_flush_lsn"].as_str().unwrap().contains('/'),
        "{out}"
    );
    assert!(s["problem"].is_null(), "{out}");
    let mut args = vec!["status", "--read-mode", "log"];
    args.extend_from_slice(&names);
    let (code, text, _) = db.run(&args);
    assert_eq!(code, 0);
    assert!(
        text.contains("(read mode log): 0 parked; the backlog is in the WAL")
            && text.contains(&format!(
                "slot {slot}: inactive, wal_status reserved, confirmed_flush_lsn "
            )),
        "{text}"
    );

    // Back to claim mode, while log mode published last: the rest of the slot is for the
    // claim relay (which drops it).
    let (code, _, err) = db.run(&["migrate", "--read-mode", "claim"]);
    assert_eq!(code, 0, "{err}");
    sqlx::query(
        "INSERT INTO outbox_lease (id, holder, epoch, expires_at, read_mode) \
         VALUES (1, 'log-relay', 1, now(), 'log') ON CONFLICT (id) DO UPDATE SET read_mode = 'log'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (_, out, err) = doctor(&["--json"]);
    let f = findings(&out, &err);
    let tail = finding(
        &f,
        "slot",
        "a --read-mode claim relay first publishes the rest",
    );
    assert_eq!(tail["severity"], "info", "{out}");
    // Once claim mode has published, a slot left behind is a warning naming the drop.
    sqlx::query("UPDATE outbox_lease SET read_mode = 'claim'")
        .execute(&db.pool)
        .await
        .unwrap();
    let (_, out, err) = doctor(&["--json"]);
    let f = findings(&out, &err);
    let left = finding(
        &f,
        "slot",
        "exists, but the table is read with --read-mode claim",
    );
    assert_eq!(left["severity"], "warn");
    assert!(
        left["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("pg_drop_replication_slot('{slot}')")),
        "{left}"
    );

    // The slot gone: doctor fails with the fix, status names the runbook.
    drop(drop_slot);
    let (code, out, err) = doctor(&["--read-mode", "log", "--json"]);
    assert_eq!(code, 1);
    let f = findings(&out, &err);
    let missing = finding(&f, "slot", "does not exist");
    assert_eq!(missing["severity"], "error", "{out}");
    assert!(
        missing["fix"]
            .as_str()
            .unwrap()
            .contains("migrate --read-mode log"),
        "{missing}"
    );
    assert_eq!(
        finding(
            &f,
            "indexes",
            "migrated for --read-mode claim, not for --read-mode log"
        )["severity"],
        "warn"
    );
    let mut args = vec!["status", "--read-mode", "log"];
    args.extend_from_slice(&names);
    let (code, text, _) = db.run(&args);
    assert_eq!(code, 0);
    assert!(
        text.contains(&format!("slot {slot}: does not exist\nslot problem: "))
            && text.contains("\"A lost slot\""),
        "{text}"
    );
}

/// Log mode's monitor: the slot gauges while the slot exists; when it is dropped under the
/// running relay, NaN gauges and /readyz failing with the runbook, logged once. Works with
/// Kafka down (readiness then names both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_slot_fails_readiness_with_the_runbook() {
    let (slot, publication) = (unique("slot"), unique("pub"));
    let log = [
        "--read-mode",
        "log",
        "--slot",
        slot.as_str(),
        "--publication",
        publication.as_str(),
    ];
    let db = TestDb::migrated(&log).await;
    let drop_slot = DropSlot(slot.clone());
    let relay = Relay::spawn(&db.name, &db.url, &common::kafka_brokers(), &log, &[]);
    relay.wait_http("/healthz", 200, Duration::from_secs(10));
    // The first monitor tick sets the gauges.
    let start = std::time::Instant::now();
    let retained = loop {
        if let Some(v) = relay.metric("outbox_relay_slot_retained_wal_bytes") {
            if v.is_finite() {
                break v;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no slot gauge: {}",
            relay.http_get("/metrics").1
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(retained >= 0.0, "{retained}");
    assert!(relay
        .metric("outbox_relay_slot_confirmed_lag_bytes")
        .is_some_and(|v| v >= 0.0));
    let safe = relay.metric("outbox_relay_slot_safe_wal_bytes").unwrap();
    assert!(safe == -1.0 || safe > 0.0, "{safe}");
    let (_, ready) = relay.http_get("/readyz");
    assert!(!ready.contains("replication slot"), "{ready}");

    // Dropped under the relay (its stream ended first): readiness names the runbook.
    drop(drop_slot);
    let start = std::time::Instant::now();
    let ready = loop {
        let (code, body) = relay.http_get("/readyz");
        if body.contains("replication slot") {
            assert_eq!(code, 503);
            break body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "readiness never named the slot: {body}; log: {}",
            relay.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        ready.contains(&format!("the replication slot \"{slot}\" does not exist"))
            && ready.contains("\"A lost slot\""),
        "{ready}"
    );
    assert!(relay
        .metric("outbox_relay_slot_retained_wal_bytes")
        .unwrap()
        .is_nan());
    std::thread::sleep(Duration::from_secs(6)); // another monitor tick
    let logs = relay.logs();
    assert_eq!(
        logs.matches("readiness fails until it is fixed").count(),
        1,
        "logged once per change: {logs}"
    );
}
