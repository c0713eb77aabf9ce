//! End-to-end tests: the real relay binary against the real PostgreSQL and Kafka.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::load::{self, Ledger, LoadSpec, Reading, Report, Shape};
use common::{create_topics, duplicates, metric, strs, unique, Consumed, Relay, TestDb};
use serde_json::json;

const PARTITIONS: i32 = 3;

/// `transactions` transactions over `keys` keys spread on `topics`, from `writers` concurrent
/// connections, every one committed (but those a deadlock aborted): the shared writers
/// (tests/common/load.rs), each event of a key taking the key's next sequence number under the
/// key's lock, so per-key commit order is sequence order. `shape`:
/// - [`Shape::LateLocks`]: ordinary application transactions, about 2.5 events each: an audit
///   event, then 1-5 aggregates in random order, each locked right before its event (what
///   claim mode must keep in commit order);
/// - [`Shape::EarlyLock`]: one event a transaction, its key locked and bumped first.
async fn write_events(
    db: &TestDb,
    topics: &[String],
    keys: usize,
    transactions: usize,
    writers: usize,
    shape: Shape,
) -> Ledger {
    let spec = LoadSpec {
        shape,
        ..LoadSpec::counted(topics, writers, keys, transactions)
    };
    load::write(db.pool.clone(), spec).await
}

/// Wait (up to 60 s) until every row the writers committed is marked published.
async fn wait_all_marked(db: &TestDb, written: &Ledger) {
    db.wait_count(
        "published_at IS NOT NULL",
        rows(written),
        Duration::from_secs(60),
    )
    .await;
}

/// Rows committed by the writers (all of them published, eventually).
fn rows(ledger: &Ledger) -> i64 {
    ledger.committed.len() as i64
}

/// Read `topics` back and check every committed event of `ledger` with the shared checker:
/// arrived with identical topic, key, payload and headers, no other record, each key's first
/// occurrences in sequence order, at most `max_duplicates` duplicates (it panics otherwise).
async fn check_delivery(
    topics: &[String],
    ledger: &Ledger,
    max_duplicates: usize,
    timeout_secs: u64,
) -> Report {
    let read = Reading {
        brokers: common::kafka_brokers(),
        topics: topics.to_vec(),
        partitions: PARTITIONS,
        settle: Duration::from_secs(2),
        timeout: Duration::from_secs(timeout_secs),
    };
    let (report, violations) = load::check(read, ledger).await;
    load::assert_checked(&report, &violations, max_duplicates, "");
    report
}

async fn topics(n: usize) -> Vec<String> {
    let t: Vec<String> = (0..n).map(|i| unique(&format!("t{i}"))).collect();
    create_topics(&strs(&t), PARTITIONS).await;
    t
}

/// Read `n` messages back from `topics`: done once `n` arrived and `idle_secs` passed without
/// more, or after `timeout_secs`.
async fn read_back(
    topics: &[String],
    n: usize,
    idle_secs: u64,
    timeout_secs: u64,
) -> Vec<Consumed> {
    common::read_back(
        topics,
        PARTITIONS,
        n,
        Duration::from_secs(idle_secs),
        Duration::from_secs(timeout_secs),
    )
    .await
}

/// About 10,000 rows: 4,000 ordinary application transactions (an audit event, then 1-5
/// aggregates each locked right before its event) from 16 writers, published while they run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_rows_from_sixteen_writers_arrive_exactly_once_in_key_order() {
    let db = TestDb::new().await;
    let topics = topics(3).await;
    let relay = Relay::start(&db, &["--batch-size", "500"]);
    let written = write_events(&db, &topics, 100, 4_000, 16, Shape::LateLocks).await;
    wait_all_marked(&db, &written).await;
    assert_exactly_once_in_key_order(&topics, &written, &relay).await;
    assert_eq!(relay.terminate(Duration::from_secs(10)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_publish_delete_deletes_each_row_after_its_delivery() {
    let db = TestDb::new().await;
    let topics = topics(2).await;
    let relay = Relay::start(&db, &["--batch-size", "300", "--on-publish", "delete"]);
    let written = write_events(&db, &topics, 50, 2_000, 8, Shape::LateLocks).await;
    assert_exactly_once_in_key_order(&topics, &written, &relay).await;
    let start = std::time::Instant::now();
    while db.count("true").await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "delivered rows were not deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(relay.terminate(Duration::from_secs(10)), Some(0));
}

/// Every written event arrives exactly once, in per-key order, and the relay counted them.
async fn assert_exactly_once_in_key_order(topics: &[String], written: &Ledger, relay: &Relay) {
    let report = check_delivery(topics, written, 0, 60).await;
    assert_eq!(report.records, written.committed.len());
    // The counter moves when a batch's mark commits, which may trail the broker's ack.
    let start = std::time::Instant::now();
    loop {
        let (code, metrics) = relay.http_get("/metrics");
        assert_eq!(code, 200);
        if metric(&metrics, "outbox_relay_published_total") == Some(written.committed.len() as f64)
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Insert a row with payload `late` in a transaction left open: (the transaction, the row id).
async fn open_late_row(
    db: &TestDb,
    topic: &str,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, i64) {
    let mut late = db.pool.begin().await.unwrap();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (topic, key, payload) VALUES ($1, 'late', 'late') RETURNING id",
    )
    .bind(topic)
    .fetch_one(&mut *late)
    .await
    .unwrap();
    (late, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_commit_with_a_lower_id_is_delivered() {
    let db = TestDb::new().await;
    let topics = topics(1).await;
    let relay = Relay::start(&db, &[]);
    // Take a low id and hold the transaction open.
    let (late, late_id) = open_late_row(&db, &topics[0]).await;
    // Later ids commit and are published while it is open.
    for i in 0..50 {
        sqlx::query("INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, 'early')")
            .bind(&topics[0])
            .bind(format!("k{i}"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    db.wait_count("published_at IS NOT NULL", 50, Duration::from_secs(20))
        .await;
    // The later ids are in Kafka; the open, lower id is not (it is not committed).
    let before = read_back(&topics, 50, 2, 30).await;
    assert_eq!(before.len(), 50);
    assert!(before.iter().all(|c| c.event_id() > late_id));
    late.commit().await.unwrap();
    db.wait_count("published_at IS NOT NULL", 51, Duration::from_secs(20))
        .await;
    let consumed = read_back(&topics, 51, 1, 30).await;
    assert_eq!(consumed.len(), 51);
    let late_msg = consumed
        .iter()
        .find(|c| c.event_id() == late_id)
        .expect("late row delivered");
    assert_eq!(late_msg.payload.as_deref(), Some(&b"late"[..]));
    assert!(duplicates(&consumed).is_empty());
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolled_back_rows_never_appear() {
    let db = TestDb::new().await;
    let topics = topics(1).await;
    let relay = Relay::start(&db, &[]);
    for i in 0..200 {
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3)")
            .bind(&topics[0])
            .bind(format!("k{}", i % 10))
            .bind(if i % 2 == 0 {
                b"commit".to_vec()
            } else {
                b"rollback".to_vec()
            })
            .execute(&mut *tx)
            .await
            .unwrap();
        if i % 2 == 0 {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
    }
    db.wait_count("published_at IS NOT NULL", 100, Duration::from_secs(20))
        .await;
    let consumed = read_back(&topics, 100, 2, 30).await;
    assert_eq!(consumed.len(), 100);
    assert!(consumed
        .iter()
        .all(|c| c.payload.as_deref() == Some(&b"commit"[..])));
    drop(relay);
}

/// Kill -9 the relay mid-stream and start it again: nothing is lost, and at most the rows in
/// flight (published or being marked) are published twice. About 20,000 rows of ordinary
/// application transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_stream_then_restart_loses_nothing() {
    let db = TestDb::new().await;
    let (batch, in_flight) = (500, 4);
    let (batch_arg, in_flight_arg) = (batch.to_string(), in_flight.to_string());
    let args = [
        "--batch-size",
        &batch_arg,
        "--in-flight-batches",
        &in_flight_arg,
    ];
    let published = "published_at IS NOT NULL";
    let topics = topics(2).await;
    let written = write_events(&db, &topics, 50, 8_000, 8, Shape::LateLocks).await;
    let relay = Relay::start(&db, &args);
    db.wait_count(published, 2_000, Duration::from_secs(60))
        .await;
    relay.kill9();
    let published_at_kill = db.count(published).await;
    assert!(
        published_at_kill < rows(&written),
        "the kill should land mid-stream"
    );
    let relay = Relay::start(&db, &args);
    wait_all_marked(&db, &written).await;
    // At most the rows in flight: --in-flight-batches batches of --batch-size.
    check_delivery(&topics, &written, in_flight * batch, 60).await;
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_batch_then_restart_loses_nothing_and_duplicates_nothing() {
    let db = TestDb::new().await;
    let topics = topics(2).await;
    let written = write_events(&db, &topics, 50, 8_000, 8, Shape::LateLocks).await;
    let relay = Relay::start(&db, &["--batch-size", "500", "--shutdown-timeout", "10s"]);
    db.wait_count("published_at IS NOT NULL", 2_000, Duration::from_secs(60))
        .await;
    let started = std::time::Instant::now();
    let log = relay.log.clone();
    assert_eq!(
        relay.terminate(Duration::from_secs(15)),
        Some(0),
        "log: {log:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        db.count("published_at IS NOT NULL").await < rows(&written),
        "SIGTERM should land mid-stream"
    );
    let relay = Relay::start(&db, &["--batch-size", "500"]);
    wait_all_marked(&db, &written).await;
    // A graceful stop must not duplicate.
    let report = check_delivery(&topics, &written, 0, 60).await;
    assert_eq!(report.records, written.committed.len());
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tombstones_null_keys_and_json_helper() {
    let db = TestDb::new().await;
    let topics = topics(1).await;
    let relay = Relay::start(&db, &[]);
    sqlx::query(
        "INSERT INTO outbox (topic, key, payload) VALUES ($1, 'gone', NULL), ($1, NULL, 'no key')",
    )
    .bind(&topics[0])
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("SELECT outbox_enqueue_json($1, 'j', '{\"a\": 1}')")
        .bind(&topics[0])
        .execute(&db.pool)
        .await
        .unwrap();
    db.wait_count("published_at IS NOT NULL", 3, Duration::from_secs(20))
        .await;
    let consumed = read_back(&topics, 3, 1, 30).await;
    assert_eq!(consumed.len(), 3);
    let tomb = consumed
        .iter()
        .find(|c| c.key.as_deref() == Some(&b"gone"[..]))
        .unwrap();
    assert_eq!(tomb.payload, None, "NULL payload must be a tombstone");
    let nokey = consumed.iter().find(|c| c.key.is_none()).unwrap();
    assert_eq!(nokey.payload.as_deref(), Some(&b"no key"[..]));
    let json = consumed
        .iter()
        .find(|c| c.key.as_deref() == Some(&b"j"[..]))
        .unwrap();
    assert_eq!(json.payload.as_deref(), Some(&br#"{"a": 1}"#[..]));
    assert_eq!(
        json.header("content-type").as_deref(),
        Some("application/json")
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_rows_are_parked_with_a_reason_and_others_flow() {
    let db = TestDb::new().await;
    let topics = topics(1).await;
    let missing_topic = unique("never_created");
    let relay = Relay::start(&db, &[]);
    let t = &topics[0];
    let rows: Vec<(&str, Option<serde_json::Value>, &str)> = vec![
        (t, None, "ok-1"),
        ("", None, "empty topic"),
        ("bad topic!", None, "illegal topic"),
        (t, Some(json!(["not", "an", "object"])), "array headers"),
        (t, Some(json!({"n": 5})), "number header"),
        (&missing_topic, None, "unknown topic"),
        (t, None, "ok-2"),
    ];
    for (topic, headers, payload) in &rows {
        sqlx::query(
            "INSERT INTO outbox (topic, key, payload, headers) VALUES ($1, 'same-key', $2, $3)",
        )
        .bind(topic)
        .bind(payload.as_bytes())
        .bind(headers)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    db.wait_count("published_at IS NOT NULL", 2, Duration::from_secs(20))
        .await;
    db.wait_count("failed_at IS NOT NULL", 5, Duration::from_secs(40))
        .await;
    let reasons: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT convert_from(payload, 'UTF8'), last_error, attempts FROM outbox WHERE failed_at IS NOT NULL ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let expect = [
        ("empty topic", "topic is empty"),
        ("illegal topic", "contains ' '"),
        ("array headers", "headers is an array"),
        ("number header", "\"n\" is a number"),
        ("unknown topic", "does not exist"),
    ];
    for ((payload, error, attempts), (want_payload, want_error)) in reasons.iter().zip(expect) {
        assert_eq!(payload, want_payload);
        assert!(error.contains(want_error), "{payload}: {error}");
        // Invalid rows are parked on sight; an unknown topic may first be retried while
        // librdkafka waits for the topic to appear.
        if payload == "unknown topic" {
            assert!(*attempts >= 1);
        } else {
            assert_eq!(*attempts, 1, "{payload}");
        }
    }
    let logs = relay.logs();
    assert!(logs.contains("row parked as failed"), "{logs}");
    let (_, metrics) = relay.http_get("/metrics");
    assert_eq!(
        metric(
            &metrics,
            "outbox_relay_parked_total{reason=\"invalid_row\"}"
        ),
        Some(4.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "outbox_relay_parked_total{reason=\"unknown_topic\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    let consumed = read_back(&topics, 2, 1, 30).await;
    let payloads: Vec<_> = consumed
        .iter()
        .map(|c| c.payload.clone().unwrap())
        .collect();
    assert_eq!(payloads, vec![b"ok-1".to_vec(), b"ok-2".to_vec()]);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_publish_each_row_once_in_order() {
    let db = TestDb::new().await;
    let topics = topics(2).await;
    let a = Relay::start(&db, &["--batch-size", "200"]);
    let b = Relay::start(&db, &["--batch-size", "200"]);
    let written = write_events(&db, &topics, 40, 1_600, 8, Shape::LateLocks).await;
    wait_all_marked(&db, &written).await;
    check_delivery(&topics, &written, 0, 60).await;
    let leaders = [&a, &b]
        .iter()
        .filter(|r| r.metric("outbox_relay_leader") == Some(1.0))
        .count();
    assert_eq!(leaders, 1, "exactly one replica publishes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_database_keeps_the_process_up_and_not_ready() {
    let db = TestDb::new().await;
    // Pointed at a port where nothing listens.
    let dead = TestDb {
        url: "postgres://postgres@127.0.0.1:1/nothing".into(),
        pool: db.pool.clone(),
        name: db.name.clone(),
    };
    let mut relay = Relay::start(&dead, &[]);
    assert_eq!(
        relay.wait_http("/healthz", 200, Duration::from_secs(10)),
        "ok\n"
    );
    let body = relay.wait_http("/readyz", 503, Duration::from_secs(10));
    assert!(body.contains("postgres unreachable"), "{body}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay must not exit when the database is down"
    );
    let start = std::time::Instant::now();
    while !relay.logs().contains("cannot reach PostgreSQL") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no hint in the log: {}",
            relay.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bad_flags_exit_2_and_name_the_flag() {
    let out = common::relay_command(&[
        "run",
        "--kafka-brokers",
        "x:1",
        "--database-url",
        "postgres://h/d",
        "--poll-interval",
        "often",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--poll-interval"));
    let out = common::relay_command(&["run", "--kafka-brokers", "x:1"])
        .env_remove("OUTBOX_RELAY_DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--database-url"));
    let out = common::relay_command(&[
        "run",
        "--kafka-brokers",
        "x:1",
        "--database-url",
        "postgres://h/d",
        "--kafka-config",
        "no.such.property=1",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no.such.property"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn block_key_policy_holds_a_key_until_its_parked_row_is_fixed() {
    let db = TestDb::new().await;
    let topics = topics(1).await;
    let relay = Relay::start(&db, &["--poison-policy", "block-key"]);
    let insert = |key: &'static str, payload: &'static str, headers: Option<serde_json::Value>| {
        let (db, topic) = (&db, topics[0].clone());
        async move {
            db.insert(&topic, Some(key), payload.as_bytes(), headers)
                .await
        }
    };
    let mut tx_rows = vec![insert("a", "a-1", None).await];
    let bad = insert("a", "a-2", Some(json!(["not an object"]))).await;
    tx_rows.push(insert("a", "a-3", None).await);
    tx_rows.push(insert("b", "b-1", None).await);
    db.wait_count("failed_at IS NOT NULL", 1, Duration::from_secs(20))
        .await;
    db.wait_count("published_at IS NOT NULL", 2, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        db.count("published_at IS NOT NULL").await,
        2,
        "a-3 must wait behind the parked a-2"
    );
    assert_eq!(
        db.count(&format!("id = {} AND published_at IS NULL", tx_rows[1]))
            .await,
        1
    );
    // The operator fixes the row and sends it again: the key resumes in order.
    sqlx::query("UPDATE outbox SET headers = NULL, failed_at = NULL WHERE id = $1")
        .bind(bad)
        .execute(&db.pool)
        .await
        .unwrap();
    db.wait_count("published_at IS NOT NULL", 4, Duration::from_secs(20))
        .await;
    let consumed = read_back(&topics, 4, 1, 30).await;
    let a: Vec<Vec<u8>> = consumed
        .iter()
        .filter(|c| c.key.as_deref() == Some(&b"a"[..]))
        .map(|c| c.payload.clone().unwrap())
        .collect();
    assert_eq!(a, vec![b"a-1".to_vec(), b"a-2".to_vec(), b"a-3".to_vec()]);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letter_policy_sends_poison_rows_to_the_dead_letter_topic() {
    let db = TestDb::new().await;
    let topics = topics(2).await;
    let (main, dlq) = (&topics[0], &topics[1]);
    let relay = Relay::start(
        &db,
        &[
            "--poison-policy",
            "dead-letter",
            "--dead-letter-topic",
            dlq,
            "--kafka-config",
            "message.max.bytes=4000",
        ],
    );
    for (payload, headers) in [
        (b"fine".to_vec(), None),
        (b"bad headers".to_vec(), Some(json!({"n": 1}))),
        (vec![b'x'; 10_000], None),
    ] {
        db.insert(main, Some("k"), &payload, headers).await;
    }
    db.wait_count("published_at IS NOT NULL", 3, Duration::from_secs(20))
        .await;
    assert_eq!(db.count("failed_at IS NOT NULL").await, 0);
    assert_eq!(db.count("last_error LIKE 'dead-lettered to %'").await, 2);
    let dead = read_back(std::slice::from_ref(dlq), 2, 1, 30).await;
    assert_eq!(dead.len(), 2);
    let invalid = dead
        .iter()
        .find(|c| c.header("outbox-error-kind").as_deref() == Some("invalid_row"))
        .unwrap();
    assert_eq!(invalid.payload.as_deref(), Some(&b"bad headers"[..]));
    assert_eq!(
        invalid.header("outbox-original-headers").as_deref(),
        Some(r#"{"n":1}"#)
    );
    assert_eq!(
        invalid.header("outbox-original-topic").as_deref(),
        Some(main.as_str())
    );
    assert!(invalid
        .header("outbox-error")
        .unwrap()
        .contains("must be JSON strings"));
    let big = dead
        .iter()
        .find(|c| c.header("outbox-error-kind").as_deref() == Some("too_large"))
        .unwrap();
    assert_eq!(big.payload, None);
    assert_eq!(
        big.header("outbox-payload-omitted").as_deref(),
        Some("10000 bytes")
    );
    let (_, metrics) = relay.http_get("/metrics");
    assert_eq!(
        metric(
            &metrics,
            "outbox_relay_dead_lettered_total{reason=\"too_large\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    drop(relay);
}

/// librdkafka's mock cluster (a real Kafka-protocol server inside this test process) injects a
/// fatal idempotent-producer error: the relay must recreate its producer and deliver every
/// row, without exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fatal_producer_error_recreates_the_producer_and_loses_nothing() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let db = TestDb::new().await;
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("mocked", PARTITIONS, 1).unwrap();
    // The broker refuses the producer id: librdkafka raises a fatal error.
    mock.request_errors(
        RDKafkaApiKey::InitProducerId,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED; 3],
    );
    let relay = common::Relay::spawn(&db.name, &db.url, &mock.bootstrap_servers(), &[], &[]);
    for i in 0..20 {
        sqlx::query("INSERT INTO outbox (topic, key, payload) VALUES ('mocked', $1, $2)")
            .bind(format!("k{}", i % 4))
            .bind(format!("p{i}").into_bytes())
            .execute(&db.pool)
            .await
            .unwrap();
    }
    relay.wait_log("recreating the producer", Duration::from_secs(30));
    mock.clear_request_errors(RDKafkaApiKey::InitProducerId);
    db.wait_count("published_at IS NOT NULL", 20, Duration::from_secs(60))
        .await;
    let brokers = mock.bootstrap_servers();
    let consumed = tokio::task::spawn_blocking(move || {
        common::consume_from(
            &brokers,
            &["mocked"],
            PARTITIONS,
            20,
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
    })
    .await
    .unwrap();
    let mut ids: Vec<i64> = consumed.iter().map(|c| c.event_id()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        20,
        "every row delivered after the producer was recreated"
    );
    let (_, metrics) = relay.http_get("/metrics");
    assert!(
        metric(
            &metrics,
            "outbox_relay_publish_errors_total{kind=\"fatal\"}"
        )
        .is_some(),
        "{metrics}"
    );
    drop(relay);
}

/// The insert trigger NOTIFYs only while the relay is idle and asked for it: a notifying commit
/// takes a database-wide lock that serializes commits, which would cap the application's write
/// rate. An idle relay still wakes at once (the poll interval here is far longer than the test),
/// and a busy one polls on its own, so a burst of commits sends only a few notifications.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_relay_wakes_on_notify_and_a_busy_one_is_not_notified() {
    let db = TestDb::new().await;
    let topics = topics(1).await;
    let notified = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener.listen("outbox_relay.outbox").await.unwrap();
    let counter = notified.clone();
    let counting = tokio::spawn(async move {
        while listener.recv().await.is_ok() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let relay = Relay::start(&db, &["--poll-interval", "60s"]);
    let wake_wanted = || async {
        sqlx::query_scalar::<_, bool>("SELECT wake_wanted FROM outbox_lease")
            .fetch_optional(&db.pool)
            .await
            .unwrap()
    };
    let start = std::time::Instant::now();
    while wake_wanted().await != Some(true) || start.elapsed() < Duration::from_secs(1) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "relay never went idle"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let insert = |payload: String| {
        sqlx::query("INSERT INTO outbox (topic, key, payload) VALUES ($1, 'k', $2)")
            .bind(topics[0].clone())
            .bind(payload.into_bytes())
            .execute(&db.pool)
    };

    // Idle: one commit, one notification, delivered long before the 60 s poll.
    insert("first".into()).await.unwrap();
    db.wait_count("published_at IS NOT NULL", 1, Duration::from_secs(5))
        .await;
    assert_eq!(notified.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Busy: back-to-back single-row commits; the relay polls and the trigger stays quiet.
    let before = notified.load(std::sync::atomic::Ordering::SeqCst);
    for i in 0..400 {
        insert(format!("burst {i}")).await.unwrap();
    }
    db.wait_count("published_at IS NOT NULL", 401, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await; // late notifications arrive
    let during = notified.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(
        during < 40,
        "{during} notifications for 400 commits: a busy relay should not be notified"
    );
    counting.abort();
    assert_eq!(relay.terminate(Duration::from_secs(10)), Some(0));
}

/// The upgrade path from the removed append mode: `run --read-mode append` is refused with
/// the way out; on a table as append mode left it (its index, and the lease's cursor past rows
/// it published without marking them), `migrate` and `run` in claim mode publish the rows
/// after the cursor once and never the rows behind it, and append mode's index and cursor go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_append_mode_left_is_taken_over_without_publishing_twice() {
    let db = TestDb::new().await;
    let topics = topics(1).await;
    let ids = db.write_plain(&topics[0], 20, 10).await;
    let passed = db.leave_as_append_mode_did(120).await;
    for env in [None, Some("append")] {
        let mut cmd = common::relay_command(&["run", "--kafka-brokers", "x:1"]);
        cmd.env("OUTBOX_RELAY_DATABASE_URL", &db.url);
        match env {
            Some(mode) => cmd.env("OUTBOX_RELAY_READ_MODE", mode),
            None => cmd.args(["--read-mode", "append"]),
        };
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("append mode was removed")
                && err.contains("migrate --read-mode log")
                && err.contains("Upgrading from append mode"),
            "{err}"
        );
    }
    let (code, _, err) = db.run(&["migrate"]);
    assert_eq!(code, 0, "{err}");
    let append_index: bool = sqlx::query_scalar("SELECT to_regclass('outbox_xid_idx') IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!append_index, "migrate drops append mode's index");
    let relay = Relay::start(&db, &[]);
    relay.wait_log("taking over from append mode", Duration::from_secs(30));
    db.wait_count("published_at IS NOT NULL", 200, Duration::from_secs(30))
        .await;
    let consumed = read_back(&topics, 80, 2, 30).await;
    let got: Vec<i64> = consumed.iter().map(|c| c.event_id()).collect();
    let mut want: Vec<i64> = ids
        .iter()
        .filter(|id| !passed.contains(id))
        .copied()
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    want.sort();
    assert_eq!(sorted, want, "exactly the rows after the cursor, once each");
    assert!(db.append_cursor_dropped().await);
    assert_eq!(relay.terminate(Duration::from_secs(10)), Some(0));
}

/// A relay upgraded before `migrate` ran (the table lacks the xid column and the lease row's
/// wake_wanted and cursor columns) keeps publishing in claim mode and says to run migrate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claim_mode_publishes_on_a_table_migrated_by_an_older_release() {
    let db = TestDb::new().await;
    for sql in [
        "ALTER TABLE outbox DROP COLUMN xid",
        "ALTER TABLE outbox_lease DROP COLUMN wake_wanted, DROP COLUMN cursor_xid, DROP COLUMN cursor_id",
        "DROP TABLE outbox_replicas",
        // The older release's insert trigger notified on every commit.
        "CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_notify('outbox_relay.outbox', ''); RETURN NULL; END $$",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    let topics = topics(1).await;
    let relay = Relay::start(&db, &[]);
    let written = write_events(&db, &topics, 10, 500, 4, Shape::EarlyLock).await;
    db.wait_count("published_at IS NOT NULL", 500, Duration::from_secs(30))
        .await;
    check_delivery(&topics, &written, 0, 30).await;
    relay.wait_log("outbox-relay migrate", Duration::from_secs(10));
    assert_eq!(relay.terminate(Duration::from_secs(10)), Some(0));
}

/// Exactly-once: the leader dies after Kafka committed a batch and its position, before the
/// batch's marks reached the table (a trigger refuses every mark, so the relay retries them
/// and reads no further). The next leader takes Kafka's committed position over: it marks
/// those rows before reading, and a read_committed consumer sees every event once. Without
/// the take-over the batch would be published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_a_kill_between_kafka_commit_and_the_marks_publishes_nothing_twice() {
    let db = TestDb::new().await;
    let topics = topics(1).await;
    let eos = common::exactly_once_flags();
    let mut args = strs(&eos);
    args.extend(["--batch-size", "100", "--lease-duration", "3s"]);
    let written = write_events(&db, &topics, 10, 300, 4, Shape::LateLocks).await;
    assert!(rows(&written) > 100, "more than one batch");
    for sql in [
        "CREATE FUNCTION refuse_marks() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'marks refused by the test'; END $$",
        // Per row: the take-over's statements that update no row pass.
        "CREATE TRIGGER refuse_marks BEFORE UPDATE ON outbox FOR EACH ROW \
         EXECUTE FUNCTION refuse_marks()",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    let relay = Relay::start(&db, &args);
    let committed = r#"outbox_relay_transactions_total{outcome="committed"}"#;
    // A mark is tried only after its batch's transaction committed.
    relay.wait_log("marks refused by the test", Duration::from_secs(60));
    assert_eq!(
        relay.metric(committed),
        Some(1.0),
        "one batch committed; its unmarked rows fill the bound"
    );
    relay.kill9();
    assert_eq!(
        db.count("published_at IS NOT NULL").await,
        0,
        "no mark got through"
    );
    sqlx::query("DROP TRIGGER refuse_marks ON outbox")
        .execute(&db.pool)
        .await
        .unwrap();
    let relay = Relay::start(&db, &args);
    relay.wait_log("marked=100", Duration::from_secs(60));
    wait_all_marked(&db, &written).await;
    check_delivery(&topics, &written, 0, 60).await;
    drop(relay);
}

/// Exactly-once with the dead-letter policy: a row the relay finds invalid, and one Kafka
/// rejects after it was sent (larger than its topic's max.message.bytes: the broker's refusal
/// dooms the open transaction), are each copied to the dead-letter topic once, in a
/// transaction that commits, and recorded as dead-lettered; every other row arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_dead_letters_invalid_and_broker_rejected_rows_once() {
    let db = TestDb::new().await;
    let topics = topics(2).await;
    let (main, dlq) = (&topics[0], &topics[1]);
    let small = unique("small");
    common::create_topics_with_config(&[&small], PARTITIONS, &[("max.message.bytes", "1024")])
        .await;
    let eos = common::exactly_once_flags();
    let mut args = strs(&eos);
    args.extend(["--poison-policy", "dead-letter", "--dead-letter-topic", dlq]);
    let relay = Relay::start(&db, &args);
    let rows: [(&str, &str, Vec<u8>, Option<serde_json::Value>); 5] = [
        (main, "a", b"a-1".to_vec(), None),
        (main, "a", b"bad headers".to_vec(), Some(json!({"n": 1}))),
        // Incompressible: the broker checks the compressed batch.
        (&small, "b", noise(4000), None),
        (main, "a", b"a-2".to_vec(), None),
        (&small, "c", b"fits".to_vec(), None),
    ];
    for (topic, key, payload, headers) in rows {
        db.insert(topic, Some(key), &payload, headers).await;
    }
    db.wait_count("published_at IS NOT NULL", 5, Duration::from_secs(60))
        .await;
    assert_eq!(db.count("failed_at IS NOT NULL").await, 0);
    assert_eq!(db.count("last_error LIKE 'dead-lettered to %'").await, 2);
    let dead = read_back(std::slice::from_ref(dlq), 2, 2, 30).await;
    let mut kinds: Vec<String> = dead
        .iter()
        .filter_map(|c| c.header("outbox-error-kind"))
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["invalid_row", "too_large"], "each copy once");
    let good = read_back(&[main.clone(), small.clone()], 3, 2, 30).await;
    let mut payloads: Vec<Vec<u8>> = good.iter().filter_map(|c| c.payload.clone()).collect();
    payloads.sort();
    assert_eq!(
        payloads,
        [b"a-1".to_vec(), b"a-2".to_vec(), b"fits".to_vec()]
    );
    drop(relay);
}

/// `n` bytes that do not compress.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
