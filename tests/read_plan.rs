//! The batch read stays one index scan in id order whatever the planner statistics say (real
//! PostgreSQL): a backlog bulk-loaded by one statement and never analyzed (as an outage leaves
//! it), and the same table full of dead tuples after most of it was marked. Without the read's
//! planner settings the same statement is a bitmap scan of the whole backlog plus a sort,
//! which the test also shows, so it can tell the difference. And the read stops at the byte
//! bound without losing or reordering a row.

mod common;

use common::TestDb;
use outbox_relay::read::{BatchLimit, ClaimReader, Reader};
use outbox_relay::store::{OnPublish, OutboxStore};
use outbox_relay::table::{ReadMode, TableName};

const LIMIT: BatchLimit = BatchLimit {
    rows: 1000,
    bytes: 2 << 20, // the default --batch-bytes
};

async fn exec(db: &TestDb, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn assert_index_scan(plan: &str, when: &str) {
    assert!(
        plan.contains("Index Scan using outbox_pending_idx"),
        "{when}: the read must scan the pending index in id order:\n{plan}"
    );
    for bad in ["Bitmap", "Sort", "Seq Scan", "JIT"] {
        assert!(
            !plan.contains(bad),
            "{when}: {bad} in the read's plan:\n{plan}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_is_an_index_scan_on_a_backlog_nobody_analyzed() {
    let db = TestDb::new().await;
    // Keep autovacuum from analyzing the table behind the test's back.
    exec(&db, "ALTER TABLE outbox SET (autovacuum_enabled = false)").await;
    exec(
        &db,
        "INSERT INTO outbox (topic, key, payload) SELECT 't', (g % 100)::text, \
         convert_to(repeat('x', 200), 'UTF8') FROM generate_series(1, 200000) g",
    )
    .await;
    let analyzed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_statistic WHERE starelid = 'outbox'::regclass")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(analyzed, 0, "the backlog has no statistics");

    let table = TableName::parse("outbox").unwrap();
    let store = OutboxStore::new(db.pool.clone(), table, OnPublish::Mark, ReadMode::Claim);
    let reader = ClaimReader::new(store, false);
    assert_index_scan(&reader.read_plan(LIMIT).await.unwrap(), "unanalyzed");

    // The same statement as the planner picks it on its own: the case the settings prevent.
    let unguided: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT * FROM outbox WHERE published_at IS NULL AND failed_at IS NULL \
         ORDER BY id LIMIT 1000",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let unguided = unguided.join("\n");
    assert!(
        unguided.contains("Bitmap") || unguided.contains("Sort"),
        "without the settings the planner chooses a scan of the whole backlog plus a sort \
         (if this changes, the settings may no longer be needed):\n{unguided}"
    );

    // Most of the backlog marked: the index still holds its dead entries until vacuum.
    exec(
        &db,
        "UPDATE outbox SET published_at = now() WHERE id <= 150000",
    )
    .await;
    assert_index_scan(&reader.read_plan(LIMIT).await.unwrap(), "dead tuples");
}

/// Rows of mixed sizes read with a 1,000-byte bound on one connection: each batch stays within
/// the bound (a larger row comes alone), rows past the bound are read again by the next read,
/// and every row comes exactly once, in id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stop_at_the_byte_bound_and_lose_nothing() {
    let db = TestDb::new().await;
    // 30 rows of 100 bytes, one of 5,000, 30 more of 100, one of 900: the estimate of how
    // many rows fit is wrong after each size change, so rows are cut and read again.
    exec(
        &db,
        "INSERT INTO outbox (topic, key, payload) SELECT 't', 'k', \
         convert_to(repeat('x', CASE g WHEN 31 THEN 5000 WHEN 62 THEN 900 ELSE 100 END), 'UTF8') \
         FROM generate_series(1, 62) g ORDER BY g",
    )
    .await;
    // One connection: a read that stops early leaves the rest of its rows on it, unread.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let table = TableName::parse("outbox").unwrap();
    let store = OutboxStore::new(pool, table, OnPublish::Mark, ReadMode::Claim);
    let mut reader = ClaimReader::new(store, false);
    let limit = BatchLimit {
        rows: 1000,
        bytes: 1000,
    };
    let (mut read, mut batches) = (Vec::new(), 0);
    loop {
        let batch = reader.next_batch(limit, &read).await.unwrap();
        if batch.is_empty() {
            break;
        }
        batches += 1;
        let bytes: u64 = batch.iter().map(|r| r.bytes()).sum();
        assert!(
            bytes <= limit.bytes || batch.len() == 1,
            "batch {batches}: {} rows, {bytes} bytes",
            batch.len()
        );
        read.extend(batch.iter().map(|r| r.id));
    }
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(read, ids, "every row once, in id order");
    // 102 bytes a row (topic, key, payload): 9 to a batch; the 5,000-byte row alone.
    assert!(batches > 62 / 9, "{batches} batches");
}
