//! An outbox row and the Kafka message it becomes: validation and the standard headers.
//!
//! Pure logic, no I/O. A row that cannot become a valid message (bad topic name, headers that
//! are not an object of strings, a reserved header name) yields a reason, and the relay parks
//! the row with that reason instead of dropping it.

use chrono::{DateTime, SecondsFormat, Utc};

/// Header carrying the row id: a stable event id for consumer-side deduplication.
pub const HEADER_EVENT_ID: &str = "outbox-event-id";
/// Header carrying the row's `created_at` (RFC 3339, microseconds, UTC).
pub const HEADER_CREATED_AT: &str = "outbox-created-at";
/// Header naming the source table (`schema.table`).
pub const HEADER_SOURCE: &str = "outbox-source";

/// Dead-letter headers: why the row could not be published, and where it was meant to go.
pub const HEADER_ERROR: &str = "outbox-error";
pub const HEADER_ERROR_KIND: &str = "outbox-error-kind";
pub const HEADER_ORIGINAL_TOPIC: &str = "outbox-original-topic";
pub const HEADER_ORIGINAL_HEADERS: &str = "outbox-original-headers";
pub const HEADER_PAYLOAD_OMITTED: &str = "outbox-payload-omitted";

const RESERVED_HEADERS: [&str; 8] = [
    HEADER_EVENT_ID,
    HEADER_CREATED_AT,
    HEADER_SOURCE,
    HEADER_ERROR,
    HEADER_ERROR_KIND,
    HEADER_ORIGINAL_TOPIC,
    HEADER_ORIGINAL_HEADERS,
    HEADER_PAYLOAD_OMITTED,
];

/// Whether a header name is reserved for the relay (a row setting it is poison).
pub fn is_reserved_header(name: &str) -> bool {
    RESERVED_HEADERS.contains(&name)
}

/// A committed, unpublished outbox row, as read from the table. Decoding never fails on a
/// column's value: what cannot be used is named in `unreadable`, and the row is poison.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub topic: String,
    pub key: Option<String>,
    pub payload: Option<Vec<u8>>,
    /// The `headers` column as stored (JSON text); parsed when the message is built.
    pub headers: Option<String>,
    /// `created_at` (the Unix epoch when it is unreadable).
    pub created_at: DateTime<Utc>,
    /// The writing transaction's xid8 (NULL for rows older than the column).
    pub xid: Option<i64>,
    /// Why a column's value cannot be used, if so.
    pub unreadable: Option<String>,
}

impl OutboxRow {
    /// The row's size as the batch bound counts it: topic, key, payload and headers.
    pub fn bytes(&self) -> u64 {
        (self.topic.len()
            + self.key.as_ref().map_or(0, String::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + self.headers.as_ref().map_or(0, String::len)) as u64
    }
}

/// The columns a reader selects, in the form [`OutboxRow`] decodes without failing: headers as
/// text, created_at as microseconds since the epoch (a float, so `infinity` comes through).
pub const ROW_COLUMNS: &str = "id, topic, key, payload, headers::text AS headers, \
     (extract(epoch FROM created_at) * 1000000)::float8 AS created_us";

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for OutboxRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let created_us: Option<f64> = row.try_get("created_us")?;
        let created_at = created_us
            .filter(|us| us.is_finite() && us.abs() < 9.0e18)
            .and_then(|us| DateTime::from_timestamp_micros(us.round() as i64));
        let xid = match row.try_get::<Option<i64>, _>("xid") {
            Ok(xid) => xid,
            Err(sqlx::Error::ColumnNotFound(_)) => None,
            Err(e) => return Err(e),
        };
        Ok(OutboxRow {
            id: row.try_get("id")?,
            topic: row.try_get("topic")?,
            key: row.try_get("key")?,
            payload: row.try_get("payload")?,
            headers: row.try_get("headers")?,
            unreadable: created_at.is_none().then(|| {
                format!(
                    "created_at is not a usable timestamp ({}); set it to a real time, then retry the row",
                    created_us.map_or("NULL".to_string(), |us| format!("{us} microseconds since 1970"))
                )
            }),
            created_at: created_at.unwrap_or(DateTime::UNIX_EPOCH),
            xid,
        })
    }
}

/// The Kafka record for a row. `payload: None` is a tombstone.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: i64,
    pub topic: String,
    pub key: Option<String>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    pub created_at: DateTime<Utc>,
}

/// Kafka's rule for topic names: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("topic is empty".into());
    }
    if topic.len() > 249 {
        return Err(format!(
            "topic is {} characters long; Kafka allows at most 249",
            topic.len()
        ));
    }
    if topic == "." || topic == ".." {
        return Err(format!("topic {topic:?} is not a legal Kafka topic name"));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic {topic:?} contains {c:?}; Kafka topic names use only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Which topics rows may name (`--allowed-topics`): exact names, or prefixes ending in `*`.
#[derive(Debug, Clone, Default)]
pub struct TopicAllowList(Vec<String>);

impl TopicAllowList {
    pub fn new(entries: &[String]) -> Result<TopicAllowList, String> {
        let entries: Vec<String> = entries
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        for e in &entries {
            let name = e.strip_suffix('*').unwrap_or(e);
            if name.contains('*') || (!name.is_empty() && check_topic(name).is_err()) {
                return Err(format!(
                    "{e:?} is not a topic name or a prefix ending in '*'"
                ));
            }
        }
        Ok(TopicAllowList(entries))
    }

    pub fn allows(&self, topic: &str) -> bool {
        self.0.is_empty()
            || self.0.iter().any(|e| match e.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => topic == e,
            })
    }
}

/// How rows become messages, fixed at startup.
#[derive(Debug, Clone, Default)]
pub struct MessageRules {
    /// `schema.table`, for the `outbox-source` header.
    pub source: String,
    /// `--allowed-topics`.
    pub allowed_topics: TopicAllowList,
    /// `--cloudevents`: add CloudEvents binary-mode `ce_*` headers.
    pub cloudevents: bool,
}

/// Turn a row into its Kafka message, or give the row back with why it cannot be published.
pub fn to_message(
    row: OutboxRow,
    rules: &MessageRules,
) -> Result<Message, Box<(OutboxRow, String)>> {
    let headers = match (&row.unreadable, parse_headers(row.headers.as_deref())) {
        (Some(reason), _) => Err(reason.clone()),
        (None, Err(reason)) => Err(reason),
        (None, Ok(headers)) => {
            check_row(&row, headers.as_ref(), &rules.allowed_topics).map(|()| headers)
        }
    };
    match headers {
        Ok(headers) => Ok(build(row, headers, rules)),
        Err(reason) => Err(Box::new((row, reason))),
    }
}

/// The headers column's JSON, or why it cannot be read (e.g. a number beyond f64).
fn parse_headers(text: Option<&str>) -> Result<Option<serde_json::Value>, String> {
    text.map(serde_json::from_str).transpose().map_err(|e| {
        format!("headers cannot be read ({e}); fix the row's headers, then retry the row")
    })
}

fn check_row(
    row: &OutboxRow,
    headers: Option<&serde_json::Value>,
    allowed: &TopicAllowList,
) -> Result<(), String> {
    check_topic(&row.topic)?;
    if !allowed.allows(&row.topic) {
        return Err(format!(
            "topic {:?} is not allowed by --allowed-topics; fix the row's topic or extend the list",
            row.topic
        ));
    }
    match headers {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::Object(map)) => {
            for (name, value) in map {
                if RESERVED_HEADERS.contains(&name.as_str()) {
                    return Err(format!(
                        "header {name:?} is reserved for the relay; rename it"
                    ));
                }
                if !value.is_string() {
                    return Err(format!(
                        "header {name:?} is {}; header values must be JSON strings",
                        json_kind(value)
                    ));
                }
            }
            Ok(())
        }
        Some(other) => Err(format!(
            "headers is {}; it must be a JSON object of string values, or NULL",
            json_kind(other)
        )),
    }
}

/// The stable event id of a row: its id; for an event emitted into the WAL (log mode, no row;
/// a negative id), its LSN as `lsn-<hex>/<hex>`.
pub fn event_id(id: i64) -> String {
    if id >= 0 {
        return id.to_string();
    }
    let lsn = id.unsigned_abs();
    format!("lsn-{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

fn standard_headers(id: i64, created_at: DateTime<Utc>, source: &str) -> [(String, String); 3] {
    [
        (HEADER_EVENT_ID.into(), event_id(id)),
        (
            HEADER_CREATED_AT.into(),
            created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        ),
        (HEADER_SOURCE.into(), source.to_string()),
    ]
}

/// Build the message of a row that passed `check_row`.
fn build(row: OutboxRow, headers: Option<serde_json::Value>, rules: &MessageRules) -> Message {
    let mut headers: Vec<(String, String)> = match headers {
        Some(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::String(s) => Some((k, s)),
                _ => None, // unreachable: check_row accepts string values only
            })
            .collect(),
        _ => Vec::new(),
    };
    headers.extend(standard_headers(row.id, row.created_at, &rules.source));
    if rules.cloudevents {
        let key = row.key.as_deref();
        add_cloudevents(
            &mut headers,
            row.id,
            &row.topic,
            key,
            row.created_at,
            &rules.source,
        );
    }
    Message {
        id: row.id,
        topic: row.topic,
        key: row.key,
        payload: row.payload,
        headers,
        created_at: row.created_at,
    }
}

/// CloudEvents 1.0 Kafka binary mode: `ce_*` headers, the payload as the event data. Headers
/// the row already sets win; `ce_type` comes from the row's `type` header, else the topic.
fn add_cloudevents(
    headers: &mut Vec<(String, String)>,
    id: i64,
    topic: &str,
    key: Option<&str>,
    created_at: DateTime<Utc>,
    source: &str,
) {
    let has = |h: &[(String, String)], name: &str| h.iter().any(|(k, _)| k == name);
    let ce_type = headers
        .iter()
        .find(|(k, _)| k == "type")
        .map_or_else(|| topic.to_string(), |(_, v)| v.clone());
    let mut add = vec![
        ("ce_specversion", "1.0".to_string()),
        ("ce_id", event_id(id)),
        ("ce_source", format!("/outbox/{source}")),
        ("ce_type", ce_type),
        (
            "ce_time",
            created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        ),
    ];
    if let Some(key) = key {
        add.push(("ce_subject", key.to_string()));
    }
    for (name, value) in add {
        if !has(headers, name) {
            headers.push((name.to_string(), value));
        }
    }
}

/// The dead-letter copy of a row that could not be published: same key, payload (unless the
/// payload itself was the problem), the row's headers, and headers naming the error.
pub fn dead_letter(
    original: Poisoned,
    kind: &str,
    reason: &str,
    dlq_topic: &str,
    source: &str,
) -> Message {
    let (id, topic, key, payload, created_at, mut headers) = match original {
        Poisoned::Message(m) => (m.id, m.topic, m.key, m.payload, m.created_at, m.headers),
        Poisoned::Row(r) => {
            let mut headers = Vec::new();
            if let Some(h) = &r.headers {
                // Compact JSON as before; the stored text when it cannot be parsed at all.
                let original = serde_json::from_str::<serde_json::Value>(h)
                    .map_or_else(|_| h.clone(), |v| v.to_string());
                headers.push((HEADER_ORIGINAL_HEADERS.to_string(), original));
            }
            headers.extend(standard_headers(r.id, r.created_at, source));
            (r.id, r.topic, r.key, r.payload, r.created_at, headers)
        }
    };
    let payload = if kind == "too_large" {
        headers.push((
            HEADER_PAYLOAD_OMITTED.into(),
            format!("{} bytes", payload.as_ref().map_or(0, Vec::len)),
        ));
        None
    } else {
        payload
    };
    headers.push((HEADER_ERROR.into(), reason.to_string()));
    headers.push((HEADER_ERROR_KIND.into(), kind.to_string()));
    headers.push((HEADER_ORIGINAL_TOPIC.into(), topic));
    Message {
        id,
        topic: dlq_topic.to_string(),
        key,
        payload,
        headers,
        created_at,
    }
}

/// What is left of a row that could not be published: the row itself (it failed validation)
/// or its message (Kafka refused it).
#[derive(Debug, Clone)]
pub enum Poisoned {
    Row(OutboxRow),
    Message(Message),
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(source: &str, allowed: TopicAllowList) -> MessageRules {
        MessageRules {
            source: source.into(),
            allowed_topics: allowed,
            cloudevents: false,
        }
    }

    fn row(topic: &str, headers: Option<serde_json::Value>) -> OutboxRow {
        OutboxRow {
            id: 42,
            topic: topic.into(),
            key: Some("k".into()),
            payload: Some(b"p".to_vec()),
            headers: headers.map(|h| h.to_string()),
            created_at: DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap(),
            xid: None,
            unreadable: None,
        }
    }

    #[test]
    fn valid_row_gets_user_and_standard_headers() {
        let m = to_message(
            row("orders.v1", Some(json!({"trace": "ü-42"}))),
            &rules("public.outbox", TopicAllowList::default()),
        )
        .unwrap();
        assert_eq!(
            m.headers,
            vec![
                ("trace".to_string(), "ü-42".to_string()),
                (HEADER_EVENT_ID.to_string(), "42".to_string()),
                (
                    HEADER_CREATED_AT.to_string(),
                    "2023-11-14T22:13:20.123456Z".to_string()
                ),
                (HEADER_SOURCE.to_string(), "public.outbox".to_string()),
            ]
        );
        assert_eq!(m.payload.as_deref(), Some(&b"p"[..]));
    }

    #[test]
    fn topics_outside_the_allow_list_are_rejected() {
        let list = TopicAllowList::new(&["orders.*".into()]).unwrap();
        assert!(to_message(row("orders.v1", None), &rules("s", list.clone())).is_ok());
        let err = to_message(row("payments", None), &rules("s", list.clone()))
            .unwrap_err()
            .1;
        assert!(err.contains("--allowed-topics"), "{err}");
    }

    #[test]
    fn dead_letter_copies_carry_the_error_and_drop_oversized_payloads() {
        let m = to_message(
            row("orders", Some(json!({"a": "b"}))),
            &rules("s", TopicAllowList::default()),
        )
        .unwrap();
        let d = dead_letter(Poisoned::Message(m), "too_large", "way too big", "dlq", "s");
        assert_eq!(
            (d.topic.as_str(), d.key.as_deref(), d.payload.as_deref()),
            ("dlq", Some("k"), None)
        );
        let h = |n: &str| {
            d.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h("a"), Some("b"));
        assert_eq!(h(HEADER_ERROR), Some("way too big"));
        assert_eq!(h(HEADER_ERROR_KIND), Some("too_large"));
        assert_eq!(h(HEADER_ORIGINAL_TOPIC), Some("orders"));
        assert_eq!(h(HEADER_PAYLOAD_OMITTED), Some("1 bytes"));
        assert_eq!(h(HEADER_EVENT_ID), Some("42"));

        let bad = row("bad topic", Some(json!([1])));
        let d = dead_letter(Poisoned::Row(bad), "invalid_row", "illegal", "dlq", "s");
        assert_eq!(d.payload.as_deref(), Some(&b"p"[..]), "the payload is kept");
        let h = |n: &str| {
            d.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h(HEADER_ORIGINAL_HEADERS), Some("[1]"));
        assert_eq!(h(HEADER_ORIGINAL_TOPIC), Some("bad topic"));
    }

    #[test]
    fn cloudevents_headers_follow_the_kafka_binary_mode() {
        let mut r = rules("public.outbox", TopicAllowList::default());
        r.cloudevents = true;
        let m = to_message(row("orders", Some(json!({"type": "order.paid"}))), &r).unwrap();
        let h = |n: &str| {
            m.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h("ce_specversion"), Some("1.0"));
        assert_eq!(h("ce_id"), Some("42"));
        assert_eq!(h("ce_source"), Some("/outbox/public.outbox"));
        assert_eq!(h("ce_type"), Some("order.paid"));
        assert_eq!(h("ce_subject"), Some("k"));
        assert_eq!(h("ce_time"), Some("2023-11-14T22:13:20.123456Z"));
        let m = to_message(row("orders", Some(json!({"ce_id": "mine"}))), &r).unwrap();
        let h = |n: &str| {
            m.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h("ce_id"), Some("mine"), "the row's own ce_ header wins");
        assert_eq!(
            h("ce_type"),
            Some("orders"),
            "the topic when no type header"
        );
    }

    #[test]
    fn null_headers_are_fine() {
        assert!(to_message(row("t", None), &rules("s", TopicAllowList::default())).is_ok());
        assert!(to_message(
            row("t", Some(serde_json::Value::Null)),
            &rules("s", TopicAllowList::default())
        )
        .is_ok());
    }

    #[test]
    fn bad_topics_are_rejected_with_reason() {
        for (topic, needle) in [
            ("", "empty"),
            ("a b", "' '"),
            ("..", "not a legal"),
            ("ordérs", "'é'"),
            (&"x".repeat(250), "249"),
        ] {
            let err = to_message(row(topic, None), &rules("s", TopicAllowList::default()))
                .unwrap_err()
                .1;
            assert!(err.contains(needle), "{topic:?}: {err}");
        }
        assert!(check_topic(&"x".repeat(249)).is_ok());
    }

    #[test]
    fn bad_headers_are_rejected_with_reason() {
        let err = to_message(
            row("t", Some(json!(["a"]))),
            &rules("s", TopicAllowList::default()),
        )
        .unwrap_err()
        .1;
        assert!(err.contains("headers is an array"), "{err}");
        let err = to_message(
            row("t", Some(json!({"n": 1}))),
            &rules("s", TopicAllowList::default()),
        )
        .unwrap_err()
        .1;
        assert!(err.contains("\"n\" is a number"), "{err}");
        let err = to_message(
            row("t", Some(json!({HEADER_EVENT_ID: "x"}))),
            &rules("s", TopicAllowList::default()),
        )
        .unwrap_err()
        .1;
        assert!(err.contains("reserved"), "{err}");
    }
}
