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

    let (code, out, _) = db.run(&["failed", "purge", "--older-than", "0s"]);
    assert_eq!((code, out.trim()), (0, "1 parked rows deleted"));
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
