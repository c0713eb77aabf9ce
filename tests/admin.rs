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

/// `doctor` checks the read index of the mode the table is migrated for: an append-mode table
/// has no pending-rows index and must not be told to migrate (which would drop its index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_read_index_of_the_migrated_mode() {
    let brokers = common::kafka_brokers();
    for (mode, index) in [("claim", "_pending_idx"), ("append", "_xid_idx")] {
        let db = TestDb::migrated(&["--read-mode", mode]).await;
        let (_, out, err) = db.run(&["doctor", "--kafka-brokers", &brokers, "--json"]);
        let findings: Vec<serde_json::Value> =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
        let index_finding = findings
            .iter()
            .find(|f| f["check"] == "indexes")
            .unwrap_or_else(|| panic!("no index finding: {out}"));
        let message = index_finding["message"].as_str().unwrap();
        assert_eq!(index_finding["severity"], "ok", "{mode}: {out}");
        assert!(
            message.contains(index) && message.contains(&format!("--read-mode {mode}")),
            "{mode}: {message}"
        );
    }
    // Neither index: a warning that names the fix for the mode in use.
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
