//! `outbox-relay adopt` against the real services: a Debezium-style outbox table written by
//! application transactions, published message for message as Debezium's outbox event router
//! documents it (topic `outbox.event.<aggregatetype>`, key `aggregateid`, value `payload`,
//! header `id`, and `type` as header `type`), converted as Kafka Connect's JsonConverter
//! (`schemas.enable=false`) or StringConverter writes them.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{consume, create_topics, unique, Consumed, Relay, TestDb};

/// The table Debezium's documentation expects (`id, aggregatetype, aggregateid, type, payload`).
const DEBEZIUM_TABLE: &str = "CREATE TABLE outboxevent (
    id uuid PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid varchar(255) NOT NULL,
    type varchar(255) NOT NULL,
    payload jsonb)";

fn adopt(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    let mut argv = vec!["adopt", "--source-table", "outboxevent"];
    argv.extend_from_slice(args);
    db.run(&argv)
}

/// One application event, as inserted into the Debezium-style table.
struct Event {
    id: String,
    aggregatetype: String,
    aggregateid: String,
    kind: &'static str,
    payload: Option<serde_json::Value>,
}

impl Event {
    fn new(
        aggregatetype: &str,
        aggregateid: &str,
        kind: &'static str,
        payload: Option<serde_json::Value>,
    ) -> Event {
        Event {
            id: uuid(),
            aggregatetype: aggregatetype.into(),
            aggregateid: aggregateid.into(),
            kind,
            payload,
        }
    }

    async fn insert(&self, tx: &mut sqlx::PgConnection) {
        sqlx::query("INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload) VALUES ($1::uuid, $2, $3, $4, $5)")
            .bind(&self.id)
            .bind(&self.aggregatetype)
            .bind(&self.aggregateid)
            .bind(self.kind)
            .bind(&self.payload)
            .execute(tx)
            .await
            .unwrap();
    }
}

fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The record the router documents for an event: the payload as Debezium reads a jsonb column
/// (its text form, which pgoutput sends), then JSON-encoded by JsonConverter (`json`) or
/// passed through by StringConverter (`raw`).
async fn expected(db: &TestDb, e: &Event, json: bool) -> (String, Vec<u8>, Option<Vec<u8>>) {
    let text: Option<String> = sqlx::query_scalar("SELECT $1::jsonb::text")
        .bind(&e.payload)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let encode = |s: &str| {
        if json {
            serde_json::to_string(s).unwrap().into_bytes()
        } else {
            s.as_bytes().to_vec()
        }
    };
    (
        format!("outbox.event.{}", e.aggregatetype),
        encode(&e.aggregateid),
        text.as_deref().map(encode),
    )
}

/// Where a record landed: (partition, offset, event id).
type Placed = (i32, i64, String);

/// Compare consumed records with the events, one for one, in order per key.
async fn assert_published(db: &TestDb, got: &[Consumed], events: &[&Event], json: bool) {
    assert_eq!(
        got.len(),
        events.len(),
        "one record per committed event: {got:#?}"
    );
    let by_id: HashMap<String, &Consumed> = got
        .iter()
        .map(|r| (r.header("id").expect("id header"), r))
        .collect();
    for e in events {
        let r = by_id
            .get(&e.id)
            .unwrap_or_else(|| panic!("event {} ({}) not published", e.id, e.kind));
        let (topic, key, value) = expected(db, e, json).await;
        assert_eq!(r.topic, topic);
        assert_eq!(r.key.as_deref(), Some(key.as_slice()), "key of {}", e.kind);
        assert_eq!(
            r.payload.as_deref().map(String::from_utf8_lossy),
            value.as_deref().map(String::from_utf8_lossy),
            "value of {}",
            e.kind
        );
        assert_eq!(r.header("type").as_deref(), Some(e.kind));
        let mut names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "id",
                "outbox-created-at",
                "outbox-event-id",
                "outbox-source",
                "type"
            ],
            "headers of {}",
            e.kind
        );
    }
    // Per-key order is insert order: within a partition, a key's events by offset.
    let mut keys: HashMap<(String, Vec<u8>), Vec<Placed>> = HashMap::new();
    for r in got {
        keys.entry((r.topic.clone(), r.key.clone().unwrap()))
            .or_default()
            .push((r.partition, r.offset, r.header("id").unwrap()));
    }
    for e in events {
        let (topic, key, _) = expected(db, e, json).await;
        let seq = &keys[&(topic, key)];
        assert!(
            seq.iter().all(|(p, _, _)| *p == seq[0].0),
            "one partition per key"
        );
    }
    let mut order: Vec<(&String, &String)> = Vec::new();
    for e in events {
        order.push((&e.aggregateid, &e.id));
    }
    for seq in keys.values_mut() {
        seq.sort();
        let ids: Vec<&String> = seq.iter().map(|(_, _, id)| id).collect();
        let want: Vec<&String> = order
            .iter()
            .filter(|(_, id)| ids.contains(id))
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(ids, want, "a key's events arrive in insert order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debezium_table_is_published_as_the_outbox_router_documents() {
    let db = TestDb::new().await;
    sqlx::raw_sql(DEBEZIUM_TABLE)
        .execute(&db.pool)
        .await
        .unwrap();
    let (order, customer) = (unique("Order"), unique("Customer"));
    let topics = [
        format!("outbox.event.{order}"),
        format!("outbox.event.{customer}"),
    ];
    create_topics(&[&topics[0], &topics[1]], 3).await;

    let (code, out, err) = adopt(&db, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "adopted public.outboxevent: each inserted row is copied into public.outbox in the same transaction"
    );

    let created = Event::new(
        &order,
        "order-1",
        "OrderCreated",
        Some(serde_json::json!({
            "id": 1, "customer": "Zoë Ämter", "note": "a \"quoted\" \\ back\nslash ✓ 🎉", "lines": [{"sku": "B-1", "qty": 2}], "total": 39.98
        })),
    );
    let paid = Event::new(
        &order,
        "order-1",
        "OrderPaid",
        Some(serde_json::json!({"id": 1, "paid": true})),
    );
    let shipped = Event::new(
        &order,
        "order-1",
        "OrderShipped",
        Some(serde_json::json!({"id": 1})),
    );
    let renamed = Event::new(
        &customer,
        "c-1",
        "CustomerRenamed",
        Some(serde_json::json!("just a string")),
    );
    let other = Event::new(
        &order,
        "order-2",
        "OrderCreated",
        Some(serde_json::json!({"id": 2})),
    );
    let rolled_back = Event::new(
        &order,
        "order-9",
        "OrderCreated",
        Some(serde_json::json!({"id": 9})),
    );
    let forgotten = Event::new(&customer, "c-2", "CustomerForgotten", None);

    // Application transactions: business write + event insert (here: the event alone).
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    created.insert(&mut conn).await;
    paid.insert(&mut conn).await;
    sqlx::query("COMMIT").execute(&mut *conn).await.unwrap();
    for e in [&renamed, &shipped, &other] {
        e.insert(&mut conn).await;
    }
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    rolled_back.insert(&mut conn).await;
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    // Debezium's recommended pattern: insert then delete in the same transaction.
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    forgotten.insert(&mut conn).await;
    sqlx::query("DELETE FROM outboxevent WHERE id = $1::uuid")
        .bind(&forgotten.id)
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut *conn).await.unwrap();

    let relay = Relay::start(&db, &[]);
    let events = [&created, &paid, &renamed, &shipped, &other, &forgotten];
    let got = consume(
        &[&topics[0], &topics[1]],
        3,
        events.len(),
        Duration::from_secs(1),
        Duration::from_secs(30),
    );
    assert_published(&db, &got, &events, true).await;
    assert!(
        got.iter()
            .any(|r| r.header("id") == Some(forgotten.id.clone()) && r.payload.is_none()),
        "a NULL payload is a tombstone"
    );
    assert!(got
        .iter()
        .all(|r| r.header("id") != Some(rolled_back.id.clone())));

    // Installing again replaces the mapping: now raw bytes (StringConverter).
    let (code, _, err) = adopt(&db, &["--key-format", "raw", "--payload-format", "raw"]);
    assert_eq!(code, 0, "{err}");
    let raw = Event::new(
        &order,
        "order-3",
        "OrderCreated",
        Some(serde_json::json!({"id": 3, "ö": [true, null]})),
    );
    raw.insert(&mut conn).await;
    let got = consume(
        &[&topics[0]],
        3,
        5,
        Duration::from_secs(1),
        Duration::from_secs(30),
    );
    let got: Vec<Consumed> = got
        .into_iter()
        .filter(|r| r.header("id") == Some(raw.id.clone()))
        .collect();
    assert_published(&db, &got, &[&raw], false).await;

    // --remove: later inserts are no longer copied (checked in the relay's table itself).
    let before = db.count("true").await;
    let (code, out, err) = adopt(&db, &["--remove"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("removed the adoption trigger from public.outboxevent"),
        "{out}"
    );
    Event::new(&order, "order-4", "OrderCreated", None)
        .insert(&mut conn)
        .await;
    assert_eq!(
        db.count("true").await,
        before,
        "nothing copied after --remove"
    );
    assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_checks_the_mapping_before_changing_anything() {
    let db = TestDb::new().await;
    sqlx::raw_sql(DEBEZIUM_TABLE)
        .execute(&db.pool)
        .await
        .unwrap();
    let installed = async || -> bool {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'outbox_relay_adopt')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };

    let (code, _, err) = adopt(&db, &["--key-column", "aggregate_id"]);
    assert_eq!(code, 2, "a mapping error is a usage error: {err}");
    assert_eq!(
        err.trim(),
        "error: --key-column: table public.outboxevent has no column \"aggregate_id\"; its columns are: \
         id (uuid), aggregatetype (varchar), aggregateid (varchar), type (varchar), payload (jsonb)"
    );
    let (code, _, err) = adopt(&db, &["--topic-template", "events.${kind}"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--topic-template: table public.outboxevent has no column \"kind\""),
        "{err}"
    );
    let (code, _, err) = adopt(&db, &["--topic-template", "bad topic.${aggregatetype}"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--topic-template") && err.contains("contains ' '"),
        "{err}"
    );
    assert!(
        !installed().await,
        "nothing installed after a refused mapping"
    );

    // --print-sql with a relay table that does not exist yet: its DDL, then the trigger; nothing changes.
    let table = unique("relay_box");
    let (code, sql, err) = adopt(&db, &["--table", &table, "--print-sql"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        sql.contains(&format!(
            "CREATE TABLE IF NOT EXISTS \"public\".\"{table}\""
        )),
        "{sql}"
    );
    assert!(
        sql.contains(
            "CREATE TRIGGER \"outbox_relay_adopt\" AFTER INSERT ON \"public\".\"outboxevent\""
        ),
        "{sql}"
    );
    assert!(!installed().await, "--print-sql changes nothing");
    let exists = async |t: &str| -> bool {
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(t)
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert!(!exists(&table).await);

    // The printed SQL is what adopt runs: applied by hand, it creates the table and the trigger.
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(exists(&table).await && installed().await);
    let (code, _, err) = adopt(&db, &["--table", &table]);
    assert_eq!(code, 0, "installing over an existing install works: {err}");
    Event::new("Order", "o-1", "OrderCreated", None)
        .insert(&mut db.pool.acquire().await.unwrap())
        .await;
    let copied: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{table}\""
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(copied, 1, "exactly one copy, even after installing twice");
    let (_, out, _) = db.run(&[
        "doctor",
        "--table",
        &table,
        "--kafka-brokers",
        &common::kafka_brokers(),
    ]);
    assert!(
        out.contains(
            "[INFO] adopt: public.outboxevent is adopted: its inserts are copied into this table"
        ),
        "{out}"
    );
    let (_, out, _) = db.run(&["doctor", "--kafka-brokers", &common::kafka_brokers()]);
    assert!(
        !out.contains("adopt:"),
        "the default table is not fed by it: {out}"
    );
}
