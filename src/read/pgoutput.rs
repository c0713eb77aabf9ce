//! Decoding of the pgoutput messages the log reader needs beyond what the replication crate
//! decodes itself (BEGIN, COMMIT, MESSAGE): RELATION and INSERT, with `binary 'true'` (each
//! column in its type's binary send format). Pure: bytes in, values or a reason out, never a
//! panic on what the server sends.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::event::OutboxRow;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

const INT8: u32 = 20;
const INT4: u32 = 23;
const TEXT: u32 = 25;
const VARCHAR: u32 = 1043;
const BPCHAR: u32 = 1042;
const NAME: u32 = 19;
const BYTEA: u32 = 17;
const JSON: u32 = 114;
const JSONB: u32 = 3802;
const TIMESTAMPTZ: u32 = 1184;
const TIMESTAMP: u32 = 1114;

/// A malformed message: the stream cannot go on past it.
#[derive(Debug, thiserror::Error)]
#[error("malformed pgoutput {what} message: {why}")]
pub struct Malformed {
    what: &'static str,
    why: String,
}

fn malformed(what: &'static str, why: impl Into<String>) -> Malformed {
    Malformed {
        what,
        why: why.into(),
    }
}

/// A cursor over one message's bytes; every read is checked.
struct Bytes<'a> {
    what: &'static str,
    rest: &'a [u8],
}

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.rest.len() < n {
            return Err(malformed(
                self.what,
                format!("needs {n} more bytes, has {}", self.rest.len()),
            ));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, Malformed> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> Result<i32, Malformed> {
        Ok(self.u32()? as i32)
    }
    fn cstring(&mut self) -> Result<String, Malformed> {
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| malformed(self.what, "unterminated string"))?;
        let s = String::from_utf8_lossy(&self.rest[..end]).into_owned();
        self.rest = &self.rest[end + 1..];
        Ok(s)
    }
}

/// A relation as announced by a RELATION message.
#[derive(Debug, Clone)]
pub struct Relation {
    pub schema: String,
    pub table: String,
    /// Column names and type OIDs, in tuple order.
    pub columns: Vec<(String, u32)>,
}

/// The relations announced so far on this stream (the server sends a RELATION before the
/// first change of a relation in a session, and again after its definition changed).
#[derive(Debug, Default)]
pub struct Relations(HashMap<u32, Relation>);

impl Relations {
    /// Decode a RELATION message (`R`) and remember it.
    pub fn relation(&mut self, data: &[u8]) -> Result<(), Malformed> {
        let mut b = Bytes {
            what: "RELATION",
            rest: data,
        };
        if b.u8()? != b'R' {
            return Err(malformed("RELATION", "wrong tag"));
        }
        let oid = b.u32()?;
        let schema = b.cstring()?;
        let table = b.cstring()?;
        let _replica_identity = b.u8()?;
        let n = b.i16()?;
        let mut columns = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n.max(0) {
            let _flags = b.u8()?;
            let name = b.cstring()?;
            let type_oid = b.u32()?;
            let _typmod = b.i32()?;
            columns.push((name, type_oid));
        }
        let schema = if schema.is_empty() {
            "pg_catalog".into()
        } else {
            schema
        };
        self.0.insert(
            oid,
            Relation {
                schema,
                table,
                columns,
            },
        );
        Ok(())
    }

    /// Decode an INSERT message (`I`): the relation it is for and the new row's columns by
    /// name (`None` for NULL). An INSERT for a relation never announced is malformed.
    pub fn insert(&self, data: &[u8]) -> Result<(&Relation, Tuple), Malformed> {
        let mut b = Bytes {
            what: "INSERT",
            rest: data,
        };
        if b.u8()? != b'I' {
            return Err(malformed("INSERT", "wrong tag"));
        }
        let oid = b.u32()?;
        let relation = self
            .0
            .get(&oid)
            .ok_or_else(|| malformed("INSERT", format!("relation {oid} was never announced")))?;
        if b.u8()? != b'N' {
            return Err(malformed("INSERT", "expected a new tuple ('N')"));
        }
        let n = b.i16()?;
        if n < 0 || n as usize > relation.columns.len() {
            return Err(malformed(
                "INSERT",
                format!("{n} columns, the relation has {}", relation.columns.len()),
            ));
        }
        let mut values = Vec::with_capacity(n as usize);
        for (name, type_oid) in relation.columns.iter().take(n as usize) {
            let value = match b.u8()? {
                b'n' => None,
                kind @ (b'b' | b't') => {
                    let len = b.i32()?;
                    if len < 0 {
                        return Err(malformed("INSERT", "negative length"));
                    }
                    Some(Value {
                        binary: kind == b'b',
                        type_oid: *type_oid,
                        bytes: b.take(len as usize)?.to_vec(),
                    })
                }
                b'u' => return Err(malformed("INSERT", "unchanged TOAST value in an insert")),
                other => return Err(malformed("INSERT", format!("column kind {other:#x}"))),
            };
            values.push((name.clone(), value));
        }
        Ok((relation, Tuple(values)))
    }
}

/// One column's value as sent.
#[derive(Debug, Clone)]
pub struct Value {
    binary: bool,
    type_oid: u32,
    bytes: Vec<u8>,
}

/// A decoded row: (column name, value or NULL).
#[derive(Debug, Default)]
pub struct Tuple(Vec<(String, Option<Value>)>);

impl Tuple {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_ref())
    }

    /// Whether the row was inserted already published or parked (`published_at` or
    /// `failed_at` set): not pending, so not an event, as in claim mode. The relay inserts such
    /// rows itself when it sets aside an emitted event (which has no row of its own).
    pub fn set_aside(&self) -> bool {
        self.get("published_at").is_some() || self.get("failed_at").is_some()
    }

    /// The outbox row this tuple is. `id` must be readable (without it there is no event id);
    /// any other column that cannot be used is named in `unreadable` (the row is poison).
    pub fn outbox_row(&self) -> Result<OutboxRow, String> {
        let id = match self.get("id") {
            Some(v) => int(v).ok_or_else(|| format!("column id: {}", v.describe()))?,
            None => return Err("the row has no id".into()),
        };
        let mut unreadable = Vec::new();
        let mut text_of = |name: &str| -> Option<String> {
            let v = self.get(name)?;
            match text(v) {
                Some(s) => Some(s),
                None => {
                    unreadable.push(format!("column {name}: {}", v.describe()));
                    None
                }
            }
        };
        let topic = text_of("topic");
        let key = text_of("key");
        let headers = text_of("headers");
        let payload = self.get("payload").map(|v| v.bytes_value());
        let created_at = match self.get("created_at") {
            None => DateTime::UNIX_EPOCH,
            Some(v) => timestamp(v).unwrap_or_else(|| {
                unreadable.push(format!("column created_at: {}", v.describe()));
                DateTime::UNIX_EPOCH
            }),
        };
        if topic.is_none() && unreadable.is_empty() {
            unreadable.push("column topic is NULL".into());
        }
        Ok(OutboxRow {
            id,
            topic: topic.unwrap_or_default(),
            key,
            payload,
            headers,
            created_at,
            xid: None,
            unreadable: (!unreadable.is_empty()).then(|| unreadable.join("; ")),
        })
    }
}

impl Value {
    fn describe(&self) -> String {
        format!(
            "type {} ({} bytes, {}) is not supported",
            self.type_oid,
            self.bytes.len(),
            if self.binary { "binary" } else { "text" }
        )
    }

    /// A bytea column's bytes (binary format: as is; text format: hex or escape).
    fn bytes_value(&self) -> Vec<u8> {
        if self.binary || self.type_oid != BYTEA {
            return self.bytes.clone();
        }
        match self.bytes.strip_prefix(b"\\x") {
            Some(hex) => hex
                .chunks(2)
                .filter_map(|p| std::str::from_utf8(p).ok())
                .filter_map(|p| u8::from_str_radix(p, 16).ok())
                .collect(),
            None => self.bytes.clone(),
        }
    }
}

fn int(v: &Value) -> Option<i64> {
    if !v.binary {
        return std::str::from_utf8(&v.bytes).ok()?.parse().ok();
    }
    match (v.type_oid, v.bytes.as_slice()) {
        (INT8, b) => Some(i64::from_be_bytes(b.try_into().ok()?)),
        (INT4, b) => Some(i64::from(i32::from_be_bytes(b.try_into().ok()?))),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    let bytes = match (v.binary, v.type_oid) {
        (false, _) | (true, TEXT | VARCHAR | BPCHAR | NAME | JSON) => v.bytes.as_slice(),
        // jsonb's binary format: a version byte (1), then the text.
        (true, JSONB) => v.bytes.strip_prefix(&[1])?,
        _ => return None,
    };
    String::from_utf8(bytes.to_vec()).ok()
}

fn timestamp(v: &Value) -> Option<DateTime<Utc>> {
    if !v.binary || !matches!(v.type_oid, TIMESTAMPTZ | TIMESTAMP) {
        return None;
    }
    let micros = i64::from_be_bytes(v.bytes.as_slice().try_into().ok()?);
    DateTime::from_timestamp_micros(micros.checked_add(PG_EPOCH_MICROS)?)
}

/// A commit time from the stream (microseconds since 2000-01-01) as UTC.
pub fn pg_time(micros: i64) -> DateTime<Utc> {
    micros
        .checked_add(PG_EPOCH_MICROS)
        .and_then(DateTime::from_timestamp_micros)
        .unwrap_or(DateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_msg() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(16384u32.to_be_bytes());
        m.extend(b"public\0outbox\0");
        m.push(b'd');
        let cols: [(&str, u32); 6] = [
            ("id", INT8),
            ("topic", TEXT),
            ("key", TEXT),
            ("payload", BYTEA),
            ("headers", JSONB),
            ("created_at", TIMESTAMPTZ),
        ];
        m.extend((cols.len() as i16).to_be_bytes());
        for (name, oid) in cols {
            m.push(1);
            m.extend(name.as_bytes());
            m.push(0);
            m.extend(oid.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        m
    }

    fn col(m: &mut Vec<u8>, bytes: &[u8]) {
        m.push(b'b');
        m.extend((bytes.len() as i32).to_be_bytes());
        m.extend(bytes);
    }

    fn insert_msg() -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend(16384u32.to_be_bytes());
        m.push(b'N');
        m.extend(6i16.to_be_bytes());
        col(&mut m, &42i64.to_be_bytes());
        col(&mut m, b"orders");
        m.push(b'n');
        col(&mut m, &[0, 1, 2, 255]);
        col(&mut m, b"\x01{\"a\": \"b\"}");
        col(&mut m, &(1_000_000i64).to_be_bytes());
        m
    }

    #[test]
    fn decodes_a_relation_and_an_insert() {
        let mut rels = Relations::default();
        rels.relation(&relation_msg()).unwrap();
        let (rel, tuple) = rels.insert(&insert_msg()).unwrap();
        assert_eq!(
            (rel.schema.as_str(), rel.table.as_str()),
            ("public", "outbox")
        );
        let row = tuple.outbox_row().unwrap();
        assert_eq!(row.id, 42);
        assert_eq!(row.topic, "orders");
        assert_eq!(row.key, None);
        assert_eq!(row.payload.as_deref(), Some(&[0u8, 1, 2, 255][..]));
        assert_eq!(row.headers.as_deref(), Some("{\"a\": \"b\"}"));
        assert_eq!(row.created_at.timestamp(), 946_684_801);
        assert!(row.unreadable.is_none());
    }

    #[test]
    fn truncated_or_unknown_input_is_an_error_never_a_panic() {
        let mut rels = Relations::default();
        let rel = relation_msg();
        for cut in 0..rel.len() {
            let _ = Relations::default().relation(&rel[..cut]);
        }
        rels.relation(&rel).unwrap();
        let ins = insert_msg();
        for cut in 0..ins.len() {
            assert!(rels.insert(&ins[..cut]).is_err(), "cut at {cut}");
        }
        assert!(
            Relations::default().insert(&ins).is_err(),
            "unknown relation"
        );
    }

    #[test]
    fn an_unusable_column_makes_the_row_poison_not_an_error() {
        let mut rels = Relations::default();
        rels.relation(&relation_msg()).unwrap();
        let mut m = vec![b'I'];
        m.extend(16384u32.to_be_bytes());
        m.push(b'N');
        m.extend(6i16.to_be_bytes());
        col(&mut m, &7i64.to_be_bytes());
        col(&mut m, &[0xff, 0xfe]); // not UTF-8
        m.push(b'n');
        m.push(b'n');
        m.push(b'n');
        col(&mut m, &[1, 2]); // a timestamp of 2 bytes
        let (_, tuple) = rels.insert(&m).unwrap();
        let row = tuple.outbox_row().unwrap();
        assert_eq!(row.id, 7);
        let why = row.unreadable.unwrap();
        assert!(
            why.contains("column topic") && why.contains("column created_at"),
            "{why}"
        );
    }
}
