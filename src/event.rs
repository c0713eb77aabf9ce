//! An outbox row and the Kafka message it becomes: validation and the standard headers.
//!
//! Pure logic, no I/O. A row that cannot become a valid message (bad topic name, headers that
//! are not an object of strings, a reserved header name) yields a reason, and the relay parks
//! the row with that reason instead of dropping it.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::config::TopicAllowList;

/// Header carrying the row id: a stable event id for consumer-side deduplication.
pub const HEADER_EVENT_ID: &str = "outbox-event-id";
/// Header carrying the row's `created_at` (RFC 3339, microseconds, UTC).
pub const HEADER_CREATED_AT: &str = "outbox-created-at";
/// Header naming the source table (`schema.table`).
pub const HEADER_SOURCE: &str = "outbox-source";

const RESERVED_HEADERS: [&str; 3] = [HEADER_EVENT_ID, HEADER_CREATED_AT, HEADER_SOURCE];

/// A committed, unpublished outbox row, as read from the table.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub topic: String,
    pub key: Option<String>,
    pub payload: Option<Vec<u8>>,
    pub headers: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
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

/// Turn a row into its Kafka message, or say why it cannot be published.
pub fn to_message(
    row: OutboxRow,
    source: &str,
    allowed: &TopicAllowList,
) -> Result<Message, String> {
    check_topic(&row.topic)?;
    if !allowed.allows(&row.topic) {
        return Err(format!(
            "topic {:?} is not allowed by --allowed-topics; fix the row's topic or extend the list",
            row.topic
        ));
    }
    let mut headers = Vec::new();
    match &row.headers {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(map)) => {
            for (name, value) in map {
                if RESERVED_HEADERS.contains(&name.as_str()) {
                    return Err(format!(
                        "header {name:?} is reserved for the relay; rename it"
                    ));
                }
                match value {
                    serde_json::Value::String(s) => headers.push((name.clone(), s.clone())),
                    other => {
                        return Err(format!(
                            "header {name:?} is {}; header values must be JSON strings",
                            json_kind(other)
                        ))
                    }
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "headers is {}; it must be a JSON object of string values, or NULL",
                json_kind(other)
            ))
        }
    }
    headers.push((HEADER_EVENT_ID.into(), row.id.to_string()));
    headers.push((
        HEADER_CREATED_AT.into(),
        row.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
    ));
    headers.push((HEADER_SOURCE.into(), source.to_string()));
    Ok(Message {
        id: row.id,
        topic: row.topic,
        key: row.key,
        payload: row.payload,
        headers,
        created_at: row.created_at,
    })
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

    fn row(topic: &str, headers: Option<serde_json::Value>) -> OutboxRow {
        OutboxRow {
            id: 42,
            topic: topic.into(),
            key: Some("k".into()),
            payload: Some(b"p".to_vec()),
            headers,
            created_at: DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap(),
        }
    }

    #[test]
    fn valid_row_gets_user_and_standard_headers() {
        let m = to_message(
            row("orders.v1", Some(json!({"trace": "ü-42"}))),
            "public.outbox",
            &TopicAllowList::default(),
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
        assert!(to_message(row("orders.v1", None), "s", &list).is_ok());
        let err = to_message(row("payments", None), "s", &list).unwrap_err();
        assert!(err.contains("--allowed-topics"), "{err}");
    }

    #[test]
    fn null_headers_are_fine() {
        assert!(to_message(row("t", None), "s", &TopicAllowList::default()).is_ok());
        assert!(to_message(
            row("t", Some(serde_json::Value::Null)),
            "s",
            &TopicAllowList::default()
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
            let err = to_message(row(topic, None), "s", &TopicAllowList::default()).unwrap_err();
            assert!(err.contains(needle), "{topic:?}: {err}");
        }
        assert!(check_topic(&"x".repeat(249)).is_ok());
    }

    #[test]
    fn bad_headers_are_rejected_with_reason() {
        let err = to_message(
            row("t", Some(json!(["a"]))),
            "s",
            &TopicAllowList::default(),
        )
        .unwrap_err();
        assert!(err.contains("headers is an array"), "{err}");
        let err = to_message(
            row("t", Some(json!({"n": 1}))),
            "s",
            &TopicAllowList::default(),
        )
        .unwrap_err();
        assert!(err.contains("\"n\" is a number"), "{err}");
        let err = to_message(
            row("t", Some(json!({HEADER_EVENT_ID: "x"}))),
            "s",
            &TopicAllowList::default(),
        )
        .unwrap_err();
        assert!(err.contains("reserved"), "{err}");
    }
}
