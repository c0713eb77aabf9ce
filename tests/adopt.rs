//! `outbox-relay adopt` against the real services: a Debezium-style outbox table written by
//! application transactions, published message for message as Debezium's outbox event router
//! documents it (topic `outbox.event.<aggregatetype>`, key `aggregateid`, value `payload`,
//! header `id`, and `type` as header `type`), converted as Debezium Server 3.0 writes them:
//! key and value with JsonConverter (`schemas.enable=false`) or StringConverter, headers with
//! its default header format (JSON with a schema envelope). The last test pins bytes that a
//! real Debezium Server wrote for the same rows (`make adopt-compare`).

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

/// A JSON string as Jackson (JsonConverter) writes it: characters outside the BMP as a pair of
/// surrogate escapes, other control characters than \b \t \n \f \r as upper-case `\u00XX`.
fn jackson(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => {
                let mut units = [0u16; 2];
                match c.encode_utf16(&mut units) {
                    [hi, lo] => out.push_str(&format!("\\u{hi:04X}\\u{lo:04X}")),
                    _ => out.push(c),
                }
            }
        }
    }
    out.push('"');
    out
}

/// The event id inside header `id`, whatever the header format.
fn debezium_id(r: &Consumed) -> Option<String> {
    let raw = r.header("id")?;
    match serde_json::from_str::<serde_json::Value>(&raw) {
        Ok(serde_json::Value::Object(envelope)) => envelope["payload"].as_str().map(str::to_string),
        Ok(serde_json::Value::String(s)) => Some(s),
        _ => Some(raw),
    }
}

/// The record the router documents for an event: the payload as Debezium reads a jsonb column
/// (its text form, which pgoutput sends), then JSON-encoded by JsonConverter (`json`, a NULL
/// payload is `null`) or passed through by StringConverter (`raw`, a NULL is a tombstone).
async fn expected(db: &TestDb, e: &Event, json: bool) -> (String, Vec<u8>, Option<Vec<u8>>) {
    let text: Option<String> = sqlx::query_scalar("SELECT $1::jsonb::text")
        .bind(&e.payload)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let encode = |s: &str| {
        if json {
            jackson(s).into_bytes()
        } else {
            s.as_bytes().to_vec()
        }
    };
    let value = match (text, json) {
        (Some(t), _) => Some(encode(&t)),
        (None, true) => Some(b"null".to_vec()),
        (None, false) => None,
    };
    (
        format!("outbox.event.{}", e.aggregatetype),
        encode(&e.aggregateid),
        value,
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
        .map(|r| (debezium_id(r).expect("id header"), r))
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
        assert_eq!(
            r.header("type"),
            Some(format!(
                r#"{{"schema":{{"type":"string","optional":false}},"payload":{}}}"#,
                jackson(e.kind)
            )),
            "header type of {} (Debezium Server's default header format)",
            e.kind
        );
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
            .push((r.partition, r.offset, debezium_id(r).unwrap()));
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
            .any(|r| debezium_id(r) == Some(forgotten.id.clone())
                && r.payload.as_deref() == Some(b"null".as_slice())),
        "a NULL payload is `null` (route.tombstone.on.empty.payload=false)"
    );
    assert!(got
        .iter()
        .all(|r| debezium_id(r) != Some(rolled_back.id.clone())));

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
        .filter(|r| debezium_id(r) == Some(raw.id.clone()))
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

/// A row of bench/adopt_compare.py and the message Debezium Server 3.0.0.Final published for it
/// (`make adopt-compare`: EventRouter, pgoutput, Kafka sink, 6 partitions, ids fixed by the
/// script; `.local/adopt-compare-logs/debezium-messages.json` holds them all).
struct Pinned {
    table: &'static str,
    id: &'static str,
    aggregateid: &'static str,
    kind: Option<&'static str>,
    payload: Option<&'static str>,
    version: Option<i32>,
    partition: i32,
    key: &'static str,
    /// None: a tombstone.
    value: Option<&'static str>,
    /// Headers `id`, `type`, `version`, in this order.
    headers: [&'static str; 3],
}

/// The comparison's tables: `version` placed as a header, defaults that Debezium puts in the
/// header schemas (and reads for a NULL column).
const PINNED_TABLES: &str = "
    CREATE TABLE dbz_jsonb (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        aggregatetype varchar(255) NOT NULL, aggregateid varchar(255) NOT NULL,
        type varchar(255) NOT NULL, payload jsonb, version integer);
    CREATE TABLE dbz_text (id uuid PRIMARY KEY,
        aggregatetype varchar(255) NOT NULL, aggregateid varchar(255) NOT NULL,
        type varchar(255) DEFAULT '🎉 new', payload text, version integer);";

/// Debezium Server's defaults for headers: `debezium.format.header=json` (schemas on);
/// key and value `json` with `schemas.enable=false`; `route.tombstone.on.empty.payload=false`.
const PINNED_JSON: &[Pinned] = &[
    Pinned {
        table: "dbz_jsonb",
        id: "e97bedd2-f855-582e-afd6-081d5f3b1902",
        aggregateid: "🎉",
        kind: Some("🎉"),
        payload: Some(r#""🎉""#),
        version: Some(3),
        partition: 5,
        key: r#""\uD83C\uDF89""#,
        value: Some(r#""\"\uD83C\uDF89\"""#),
        headers: [
            r#"{"schema":{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1,"default":"00000000-0000-0000-0000-000000000000"},"payload":"e97bedd2-f855-582e-afd6-081d5f3b1902"}"#,
            r#"{"schema":{"type":"string","optional":false},"payload":"\uD83C\uDF89"}"#,
            r#"{"schema":{"type":"int32","optional":true},"payload":3}"#,
        ],
    },
    Pinned {
        table: "dbz_jsonb",
        id: "9acd33b6-850e-5e0e-945e-2fc53404029a",
        aggregateid: "order-1",
        kind: Some("OrderDeleted"),
        payload: None,
        version: Some(4),
        partition: 2,
        key: r#""order-1""#,
        value: Some("null"),
        headers: [
            r#"{"schema":{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1,"default":"00000000-0000-0000-0000-000000000000"},"payload":"9acd33b6-850e-5e0e-945e-2fc53404029a"}"#,
            r#"{"schema":{"type":"string","optional":false},"payload":"OrderDeleted"}"#,
            r#"{"schema":{"type":"int32","optional":true},"payload":4}"#,
        ],
    },
    Pinned {
        table: "dbz_text",
        id: "96d3c3c0-6dcd-5043-80cc-6c4ea2f48623",
        aggregateid: "order-4",
        kind: Some("OrderEmpty"),
        payload: Some(""),
        version: None,
        partition: 4,
        key: r#""order-4""#,
        value: Some(r#""""#),
        headers: [
            r#"{"schema":{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1},"payload":"96d3c3c0-6dcd-5043-80cc-6c4ea2f48623"}"#,
            r#"{"schema":{"type":"string","optional":true,"default":"\uD83C\uDF89 new"},"payload":"OrderEmpty"}"#,
            r#"{"schema":{"type":"int32","optional":true},"payload":null}"#,
        ],
    },
    Pinned {
        table: "dbz_text",
        id: "8126504b-a95a-5747-a30c-1cbf24ed2eee",
        aggregateid: "order-5",
        kind: None,
        payload: Some(r#"{"id": 5}"#),
        version: None,
        partition: 0,
        key: r#""order-5""#,
        value: Some(r#""{\"id\": 5}""#),
        headers: [
            r#"{"schema":{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1},"payload":"8126504b-a95a-5747-a30c-1cbf24ed2eee"}"#,
            r#"{"schema":{"type":"string","optional":true,"default":"\uD83C\uDF89 new"},"payload":"\uD83C\uDF89 new"}"#,
            r#"{"schema":{"type":"int32","optional":true},"payload":null}"#,
        ],
    },
];

/// `debezium.format.header.schemas.enable=false` and `route.tombstone.on.empty.payload=true`.
const PINNED_SCHEMALESS_TOMBSTONES: &[Pinned] = &[
    Pinned {
        table: "dbz_jsonb",
        id: "d3488017-d3de-5d8b-8cda-7ec4def84595",
        aggregateid: "🎉",
        kind: Some("🎉"),
        payload: Some(r#""🎉""#),
        version: Some(3),
        partition: 5,
        key: r#""\uD83C\uDF89""#,
        value: Some(r#""\"\uD83C\uDF89\"""#),
        headers: [
            r#""d3488017-d3de-5d8b-8cda-7ec4def84595""#,
            r#""\uD83C\uDF89""#,
            "3",
        ],
    },
    Pinned {
        table: "dbz_jsonb",
        id: "8ce0a50a-3511-57bf-8bac-2e34dfb1154e",
        aggregateid: "order-1",
        kind: Some("OrderDeleted"),
        payload: None,
        version: Some(4),
        partition: 2,
        key: r#""order-1""#,
        value: None,
        headers: [
            r#""8ce0a50a-3511-57bf-8bac-2e34dfb1154e""#,
            r#""OrderDeleted""#,
            "4",
        ],
    },
    Pinned {
        table: "dbz_text",
        id: "97b8563a-4c32-5c15-989f-afa2a2c7091a",
        aggregateid: "order-4",
        kind: Some("OrderEmpty"),
        payload: Some(""),
        version: None,
        partition: 4,
        key: r#""order-4""#,
        value: None,
        headers: [
            r#""97b8563a-4c32-5c15-989f-afa2a2c7091a""#,
            r#""OrderEmpty""#,
            "null",
        ],
    },
    Pinned {
        table: "dbz_text",
        id: "4fd60d20-dbf3-506e-9107-052354b99de7",
        aggregateid: "order-4",
        kind: Some("OrderBlank"),
        payload: Some(" \t\n "),
        version: None,
        partition: 4,
        key: r#""order-4""#,
        value: None,
        headers: [
            r#""4fd60d20-dbf3-506e-9107-052354b99de7""#,
            r#""OrderBlank""#,
            "null",
        ],
    },
];

/// `debezium.format.key=simplestring`, `debezium.format.value=simplestring` (StringConverter).
const PINNED_STRING: &[Pinned] = &[
    Pinned {
        table: "dbz_jsonb",
        id: "f799fe4c-48a9-5e6a-a4a9-45a9f48f7b58",
        aggregateid: "🎉",
        kind: Some("🎉"),
        payload: Some(r#""🎉""#),
        version: Some(3),
        partition: 0,
        key: "🎉",
        value: Some(r#""🎉""#),
        headers: [
            r#"{"schema":{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1,"default":"00000000-0000-0000-0000-000000000000"},"payload":"f799fe4c-48a9-5e6a-a4a9-45a9f48f7b58"}"#,
            r#"{"schema":{"type":"string","optional":false},"payload":"\uD83C\uDF89"}"#,
            r#"{"schema":{"type":"int32","optional":true},"payload":3}"#,
        ],
    },
    Pinned {
        table: "dbz_text",
        id: "35e0ada3-a316-525c-99ea-29299a6d4b20",
        aggregateid: "order-4",
        kind: Some("OrderEmpty"),
        payload: Some(""),
        version: None,
        partition: 2,
        key: "order-4",
        value: Some(""),
        headers: [
            r#"{"schema":{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1},"payload":"35e0ada3-a316-525c-99ea-29299a6d4b20"}"#,
            r#"{"schema":{"type":"string","optional":true,"default":"\uD83C\uDF89 new"},"payload":"OrderEmpty"}"#,
            r#"{"schema":{"type":"int32","optional":true},"payload":null}"#,
        ],
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_publishes_the_bytes_debezium_server_published() {
    let db = TestDb::new().await;
    sqlx::raw_sql(PINNED_TABLES)
        .execute(&db.pool)
        .await
        .unwrap();
    let cases: [(&str, &[&str], &[Pinned]); 3] = [
        ("json", &[], PINNED_JSON),
        (
            "schemaless",
            &[
                "--header-schemas-enable",
                "false",
                "--route-tombstone-on-empty-payload",
                "true",
            ],
            PINNED_SCHEMALESS_TOMBSTONES,
        ),
        (
            "string",
            &["--key-format", "raw", "--payload-format", "raw"],
            PINNED_STRING,
        ),
    ];
    let aggregates: Vec<String> = cases.iter().map(|(name, ..)| unique(name)).collect();
    let topics: Vec<String> = aggregates
        .iter()
        .map(|a| format!("outbox.event.{a}"))
        .collect();
    create_topics(&common::strs(&topics), 6).await;
    let mut relay = None;
    for (((name, flags, pinned), aggregate), topic) in cases.iter().zip(&aggregates).zip(&topics) {
        for table in ["dbz_jsonb", "dbz_text"] {
            let mut argv = vec![
                "adopt",
                "--source-table",
                table,
                "--header-columns",
                "type,version",
            ];
            argv.extend_from_slice(flags);
            let (code, _, err) = db.run(&argv);
            assert_eq!(code, 0, "{err}");
        }
        for p in *pinned {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {} (id, aggregatetype, aggregateid, type, payload, version) \
                 VALUES ($1::uuid, $2, $3, $4, $5::text::{}, $6)",
                p.table,
                if p.table == "dbz_jsonb" {
                    "jsonb"
                } else {
                    "text"
                }
            )))
            .bind(p.id)
            .bind(aggregate)
            .bind(p.aggregateid)
            .bind(p.kind)
            .bind(p.payload)
            .bind(p.version)
            .execute(&db.pool)
            .await
            .unwrap();
        }
        relay.get_or_insert_with(|| Relay::start(&db, &[]));
        let got = consume(
            &[topic],
            6,
            pinned.len(),
            Duration::from_secs(1),
            Duration::from_secs(30),
        );
        assert_eq!(got.len(), pinned.len(), "{name}: {got:#?}");
        for p in *pinned {
            let r = got
                .iter()
                .find(|r| debezium_id(r).as_deref() == Some(p.id))
                .unwrap_or_else(|| panic!("{name}: {} not published: {got:#?}", p.id));
            let headers: Vec<(&str, Option<&[u8]>)> = r
                .headers
                .iter()
                .filter(|(k, _)| !k.starts_with("outbox-"))
                .map(|(k, v)| (k.as_str(), v.as_deref()))
                .collect();
            let want: Vec<(&str, Option<&[u8]>)> = ["id", "type", "version"]
                .into_iter()
                .zip(p.headers.map(|h| Some(h.as_bytes())))
                .collect();
            let what = format!("{name}: {} ({:?})", p.id, p.payload);
            assert_eq!(headers, want, "headers of {what}");
            assert_eq!(r.key.as_deref(), Some(p.key.as_bytes()), "key of {what}");
            assert_eq!(
                r.payload.as_deref(),
                p.value.map(str::as_bytes),
                "value of {what}"
            );
            assert_eq!(r.partition, p.partition, "partition of {what}");
        }
    }
    let relay = relay.expect("the relay ran");
    assert_eq!(relay.terminate(Duration::from_secs(20)), Some(0));
}
