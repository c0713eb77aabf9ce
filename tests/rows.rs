//! One bad row costs that row, never the pipeline, another row, or leadership (real
//! PostgreSQL and Kafka): values the read cannot decode, a row whose contents once made the
//! park statement fail, a broker rejecting a whole record batch for one record, a row to a
//! topic that does not exist, rows too large to batch many at once, a park that fails (the
//! leader must keep its lease meanwhile), and rows `cleanup` must not delete.

mod common;

use std::time::{Duration, Instant};

use common::{
    create_topics, create_topics_with_config, event_ids_on, read_back, unique, Relay, TestDb,
};

async fn insert(db: &TestDb, topic: &str, key: Option<&str>, payload: &[u8]) -> i64 {
    db.insert(topic, key, payload, None).await
}

async fn exec(db: &TestDb, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn last_error(db: &TestDb, id: i64) -> String {
    sqlx::query_scalar(
        "SELECT coalesce(last_error, '') FROM outbox WHERE id = $1 AND failed_at IS NOT NULL",
    )
    .bind(id)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
    .unwrap_or_else(|| format!("row {id} is not parked"))
}

/// Headers with a number beyond f64, a created_at of infinity, a 3 KB key with invalid
/// headers: each is parked with a reason naming the problem, the process stays up, and the
/// valid rows around them are published once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_values_are_parked_by_id_and_the_rest_flow() {
    let db = TestDb::new().await;
    let topic = unique("rows_bad");
    create_topics(&[&topic], 2).await;
    let mut valid = Vec::new();
    for i in 0..5 {
        valid.push(insert(&db, &topic, Some(&format!("k{i}")), b"ok").await);
    }
    let huge_number = insert(&db, &topic, Some("k0"), b"x").await;
    exec(
        &db,
        &format!("UPDATE outbox SET headers = '{{\"a\": 1e400}}' WHERE id = {huge_number}"),
    )
    .await;
    let infinite = insert(&db, &topic, Some("k1"), b"x").await;
    exec(
        &db,
        &format!("UPDATE outbox SET created_at = 'infinity' WHERE id = {infinite}"),
    )
    .await;
    let long_key = insert(&db, &topic, Some(&"k".repeat(3000)), b"x").await;
    exec(
        &db,
        &format!("UPDATE outbox SET headers = '[1]' WHERE id = {long_key}"),
    )
    .await;
    for i in 0..5 {
        valid.push(insert(&db, &topic, Some(&format!("k{i}")), b"ok").await);
    }

    let mut relay = Relay::start(&db, &[]);
    db.wait_count(
        "published_at IS NOT NULL",
        valid.len() as i64,
        Duration::from_secs(30),
    )
    .await;
    db.wait_count("failed_at IS NOT NULL", 3, Duration::from_secs(30))
        .await;
    assert!(last_error(&db, huge_number)
        .await
        .contains("headers cannot be read"));
    assert!(last_error(&db, infinite)
        .await
        .contains("created_at is not a usable timestamp"));
    assert!(
        last_error(&db, long_key)
            .await
            .contains("headers is an array"),
        "{}",
        last_error(&db, long_key).await
    );
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay must not exit: {}",
        relay.logs()
    );
    let ids = event_ids_on(&topic, 2, valid.len()).await;
    assert_eq!(
        ids, valid,
        "each valid row exactly once, none of the bad ones"
    );
    // The operator can list them, infinity included.
    let (code, out, err) = db.run(&["failed", "list"]);
    assert_eq!(code, 0, "{out} {err}");
    for id in [huge_number, infinite, long_key] {
        assert!(out.contains(&id.to_string()), "{out}");
    }
}

/// A compacted topic rejects a record batch holding a NULL-key record (InvalidRecord): only
/// that row is set aside; the keyed rows that shared its batch are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_record_batch_costs_only_the_offending_row() {
    let db = TestDb::new().await;
    let topic = unique("rows_compact");
    create_topics_with_config(&[&topic], 1, &[("cleanup.policy", "compact")]).await;
    let mut keyed = Vec::new();
    for i in 0..4 {
        keyed.push(insert(&db, &topic, Some(&format!("k{i}")), b"v").await);
    }
    let no_key = insert(&db, &topic, None, b"v").await;
    for i in 0..4 {
        keyed.push(insert(&db, &topic, Some(&format!("k{i}")), b"w").await);
    }
    let _relay = Relay::start(&db, &[]);
    db.wait_count("failed_at IS NOT NULL", 1, Duration::from_secs(30))
        .await;
    db.wait_count(
        "published_at IS NOT NULL",
        keyed.len() as i64,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        last_error(&db, no_key)
            .await
            .to_lowercase()
            .contains("invalid"),
        "{}",
        last_error(&db, no_key).await
    );
    assert_eq!(
        db.count("failed_at IS NOT NULL").await,
        1,
        "only the NULL-key row is parked"
    );
    let mut ids = event_ids_on(&topic, 1, keyed.len()).await;
    ids.dedup();
    assert_eq!(ids, keyed);
}

/// A row to a topic that does not exist is parked without holding the others back for
/// librdkafka's topic.metadata.propagation.max.ms (set to 30 s here: the old behaviour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_topic_costs_only_its_row() {
    let db = TestDb::new().await;
    let topic = unique("rows_known");
    create_topics(&[&topic], 2).await;
    let missing = insert(&db, &unique("rows_missing"), Some("k"), b"v").await;
    let good: Vec<i64> = {
        let mut v = Vec::new();
        for i in 0..10 {
            v.push(insert(&db, &topic, Some(&format!("k{i}")), b"v").await);
        }
        v
    };
    let started = Instant::now();
    let _relay = Relay::start(
        &db,
        &["--kafka-config", "topic.metadata.propagation.max.ms=30000"],
    );
    db.wait_count(
        "published_at IS NOT NULL",
        good.len() as i64,
        Duration::from_secs(60),
    )
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "the known topic waited {took:?} behind the unknown one"
    );
    db.wait_count("failed_at IS NOT NULL", 1, Duration::from_secs(10))
        .await;
    assert!(
        last_error(&db, missing).await.contains("does not exist"),
        "{}",
        last_error(&db, missing).await
    );
}

/// With --batch-bytes 1MiB and rows of 600 KB, every batch holds one row: memory is bounded by
/// bytes, not only by --batch-size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_bounded_by_bytes() {
    let db = TestDb::new().await;
    let topic = unique("rows_big");
    create_topics(&[&topic], 1).await;
    for i in 0..6 {
        insert(&db, &topic, Some(&format!("k{i}")), &vec![b'x'; 600_000]).await;
    }
    let relay = Relay::start(&db, &["--batch-bytes", "1MiB", "--batch-size", "1000"]);
    db.wait_count("published_at IS NOT NULL", 6, Duration::from_secs(30))
        .await;
    let batches = relay.metric("outbox_relay_batch_rows_count").unwrap();
    let single = relay
        .metric("outbox_relay_batch_rows_bucket{le=\"1\"}")
        .unwrap();
    assert!(batches >= 6.0, "{batches} batches for 6 rows of 600 KB");
    assert_eq!(single, batches, "every batch held one row");
    let (code, _, err) = db.run(&["run", "--kafka-brokers", "x:1", "--batch-bytes", "2TiB"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--batch-bytes"), "{err}");
}

/// A park that keeps failing (a trigger refuses it) stalls publishing but not leadership: the
/// leader renews its lease while it retries, the standby never takes over, and each row
/// reaches Kafka once. When the cause is removed, the row is parked and the rest flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_park_keeps_the_lease_renewed_and_one_leader() {
    let db = TestDb::new().await;
    let topic = unique("rows_stuck");
    create_topics(&[&topic], 1).await;
    exec(
        &db,
        "CREATE FUNCTION refuse_park() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'park refused by the test'; END $$",
    )
    .await;
    exec(
        &db,
        "CREATE TRIGGER refuse_park BEFORE UPDATE ON outbox FOR EACH ROW \
         WHEN (NEW.failed_at IS NOT NULL AND OLD.failed_at IS NULL) EXECUTE FUNCTION refuse_park()",
    )
    .await;
    let poison = insert(&db, "bad topic!", Some("k"), b"v").await;
    let mut good = Vec::new();
    for i in 0..10 {
        good.push(insert(&db, &topic, Some(&format!("k{i}")), b"v").await);
    }
    let lease = ["--lease-duration", "2s"];
    let a = Relay::start(&db, &lease);
    a.wait_log("park refused by the test", Duration::from_secs(20));
    let b = Relay::start(&db, &lease);
    b.wait_http("/healthz", 200, Duration::from_secs(10));
    // Three lease durations: a leader that stopped renewing would have lost it by now.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let leaders = [&a, &b]
            .iter()
            .filter(|r| r.metric("outbox_relay_leader") == Some(1.0))
            .count();
        assert!(leaders <= 1, "two replicas report leading");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        b.metric("outbox_relay_leader"),
        Some(0.0),
        "the standby took over from a live leader"
    );
    exec(&db, "DROP TRIGGER refuse_park ON outbox").await;
    db.wait_count(
        "published_at IS NOT NULL",
        good.len() as i64,
        Duration::from_secs(30),
    )
    .await;
    db.wait_count("failed_at IS NOT NULL", 1, Duration::from_secs(10))
        .await;
    assert!(last_error(&db, poison).await.contains("topic"));
    let records = read_back(
        &[topic],
        1,
        good.len(),
        Duration::from_secs(2),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        records.len(),
        good.len(),
        "each valid row reached Kafka once"
    );
}

/// `--retention 0s` keeps published rows forever in `cleanup` as in `run`, and `cleanup`
/// never deletes a row an operator skipped (it was never published); skipped rows leave the
/// parked count and `failed list`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_only_published_rows_and_zero_retention_keeps_them() {
    let db = TestDb::new().await;
    let topic = unique("rows_clean");
    create_topics(&[&topic], 1).await;
    for i in 0..3 {
        insert(&db, &topic, Some(&format!("k{i}")), b"v").await;
    }
    let skipped = insert(&db, "bad topic!", Some("k"), b"v").await;
    let relay = Relay::start(&db, &["--retention", "0s"]);
    db.wait_count("published_at IS NOT NULL", 3, Duration::from_secs(30))
        .await;
    db.wait_count("failed_at IS NOT NULL", 1, Duration::from_secs(30))
        .await;
    drop(relay);
    let (code, out, err) = db.run(&[
        "failed",
        "skip",
        "--id",
        &skipped.to_string(),
        "--reason",
        "test",
    ]);
    assert_eq!(code, 0, "{out} {err}");
    let (code, out, _) = db.run(&["cleanup", "--retention", "0s"]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing deleted"), "{out}");
    assert_eq!(db.count("true").await, 4);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, out, err) = db.run(&["cleanup", "--retention", "1s"]);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(db.count("true").await, 1, "the skipped row stays: {out}");
    assert_eq!(db.count(&format!("id = {skipped}")).await, 1);
    let (_, list, _) = db.run(&["failed", "list"]);
    assert!(
        !list.contains(&format!("{skipped}")),
        "a skipped row is no longer parked: {list}"
    );
    let (_, status, _) = db.run(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["parked"], 0, "{status:#}");
}
