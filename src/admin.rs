//! Operator commands: `status` and `failed list|retry|skip|purge`. Each is a short statement
//! against the outbox table (never a long lock), and each action is logged by the caller.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgPool;
use sqlx::AssertSqlSafe;

use crate::lease::LeaseState;
use crate::read::log::LogNames;
use crate::replica::{self, Replica};
use crate::store::slot::{self, bytes_text, Condition, Slot};
use crate::table::{ReadMode, TableName};

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct TopicBacklog {
    pub topic: String,
    pub pending: i64,
    pub oldest_pending_age_seconds: Option<f64>,
    pub parked: i64,
}

/// Which parked rows an action applies to. `All` selects every parked row (with the
/// action's topic filter, if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rows {
    Id(i64),
    Key(String),
    All,
}

impl Rows {
    /// The selector's `$1` (id) and `$2` (key).
    fn binds(&self) -> (Option<i64>, Option<&str>) {
        match self {
            Rows::Id(id) => (Some(*id), None),
            Rows::Key(key) => (None, Some(key.as_str())),
            Rows::All => (None, None),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub table: String,
    pub topics: Vec<TopicBacklog>,
    pub pending: i64,
    pub parked: i64,
    pub oldest_pending_age_seconds: Option<f64>,
    /// The replica holding the publishing lease (others stand by), if any ever held it.
    pub leader: Option<LeaseState>,
    /// Every replica that heartbeats on this table (leader first), or null if the replicas
    /// table does not exist yet (run `migrate`).
    pub replicas: Option<Vec<Replica>>,
    /// The read mode the counts follow: `--read-mode`, else the one the table is migrated for
    /// (null: none). In log mode the backlog is in the WAL, not the table: `pending` is 0.
    pub read_mode: Option<&'static str>,
    /// Log mode only: the replication slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<SlotStatus>,
}

/// Log mode's replication slot as `status` shows it.
#[derive(Debug, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub exists: bool,
    /// Whether a relay streams from it now (and its server process).
    pub active: bool,
    pub active_pid: Option<i32>,
    /// reserved | extended | unreserved | lost
    pub wal_status: Option<String>,
    /// What the relay has confirmed: everything before it is published or set aside.
    pub confirmed_flush_lsn: Option<String>,
    /// WAL the server keeps for the slot, and WAL written since its confirmed position.
    pub retained_wal_bytes: Option<i64>,
    pub confirmed_lag_bytes: Option<i64>,
    /// WAL that can still be written before the slot is lost; null: no limit
    /// (max_slot_wal_keep_size = -1), or lost.
    pub safe_wal_size: Option<i64>,
    /// Why the relay cannot read it (missing, lost) or soon may not (unreserved), with the fix.
    pub problem: Option<String>,
}

impl SlotStatus {
    fn new(name: &str, found: Option<Slot>) -> SlotStatus {
        let problem = match slot::condition(name, found.as_ref()) {
            Condition::Usable => None,
            Condition::AtRisk(why) | Condition::Unusable(why) => Some(why),
        };
        let s = found.as_ref();
        SlotStatus {
            name: name.to_string(),
            exists: s.is_some(),
            active: s.is_some_and(|s| s.active),
            active_pid: s.and_then(|s| s.active_pid),
            wal_status: s.and_then(|s| s.wal_status.clone()),
            confirmed_flush_lsn: s.and_then(|s| s.confirmed_flush_lsn.clone()),
            retained_wal_bytes: s.and_then(|s| s.retained_wal_bytes),
            confirmed_lag_bytes: s.and_then(|s| s.confirmed_lag_bytes),
            safe_wal_size: s.and_then(|s| s.safe_wal_size),
            problem,
        }
    }
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct FailedRow {
    pub id: i64,
    pub topic: String,
    pub key: Option<String>,
    pub attempts: i32,
    /// NULL when the stored value is no usable timestamp (e.g. `infinity`).
    pub created_at: Option<DateTime<Utc>>,
    pub failed_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

pub struct Admin {
    pool: PgPool,
    table: TableName,
}

/// Parked rows matching a selector: $1 id, $2 key, $3 topic (NULL = any).
const SELECTED: &str =
    "failed_at IS NOT NULL AND published_at IS NULL AND ($1::bigint IS NULL OR id = $1) \
     AND ($2::text IS NULL OR key = $2) AND ($3::text IS NULL OR topic = $3)";

impl Admin {
    pub fn new(pool: PgPool, table: TableName) -> Admin {
        Admin { pool, table }
    }

    /// The backlog, the lease and the replicas; in log mode the slot. `mode`: `--read-mode`,
    /// or `None` for the mode the table is migrated for.
    pub async fn status(
        &self,
        mode: Option<ReadMode>,
        log: &LogNames,
    ) -> Result<Status, sqlx::Error> {
        let mode = match mode {
            Some(mode) => Some(mode),
            None => crate::store::migrated_mode(&self.pool, &self.table, &log.publication).await?,
        };
        let t = self.table.quoted();
        // Log mode's backlog is in the WAL: rows are never marked, only parked ones count.
        let unpublished = match mode {
            Some(ReadMode::Log) => "false".to_string(),
            _ => crate::store::unpublished(&self.table),
        };
        let topics: Vec<TopicBacklog> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT topic, sum(pending)::int8 AS pending, max(age) AS oldest_pending_age_seconds, sum(parked)::int8 AS parked FROM (
               SELECT topic, count(*) AS pending, extract(epoch FROM now() - min(created_at))::float8 AS age, 0 AS parked
                 FROM {t} AS o WHERE {unpublished} GROUP BY topic
               UNION ALL
               SELECT topic, 0, NULL, count(*) FROM {t} WHERE {parked} GROUP BY topic
             ) s GROUP BY topic ORDER BY topic",
            parked = crate::store::PARKED,
        )))
        .fetch_all(&self.pool)
        .await?;
        let leader = LeaseState::read(&self.pool, &self.table).await?;
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&self.pool)
            .await?;
        let replicas = replica::rows(&self.pool, &self.table)
            .await?
            .map(|rows| replica::view(rows, leader.as_ref(), now, &self.table));
        let slot = match mode {
            Some(ReadMode::Log) => Some(SlotStatus::new(
                &log.slot,
                Slot::read(&self.pool, &log.slot).await?,
            )),
            _ => None,
        };
        Ok(Status {
            table: self.table.to_string(),
            pending: topics.iter().map(|t| t.pending).sum(),
            parked: topics.iter().map(|t| t.parked).sum(),
            oldest_pending_age_seconds: topics
                .iter()
                .filter_map(|t| t.oldest_pending_age_seconds)
                .reduce(f64::max),
            topics,
            leader,
            replicas,
            read_mode: mode.map(ReadMode::as_str),
            slot,
        })
    }

    pub async fn list_failed(
        &self,
        topic: Option<&str>,
        limit: i64,
    ) -> Result<Vec<FailedRow>, sqlx::Error> {
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT id, topic, key, attempts, \
             CASE WHEN created_at BETWEEN '0001-01-01' AND '9999-12-31' THEN created_at END AS created_at, \
             failed_at, last_error FROM {} \
             WHERE {SELECTED} ORDER BY id LIMIT $4",
            self.table.quoted()
        )))
        .bind(None::<i64>)
        .bind(None::<String>)
        .bind(topic)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// Make the selected parked rows pending again. Returns how many. Each gets this
    /// transaction's xid: a hand-over between read modes tells by it whether the row was
    /// committed before its snapshot.
    /// In log mode (the lease says log mode published last), the stream carries inserts only:
    /// each row is also emitted into the WAL again, with its id (so its event id), in id order,
    /// and the relay publishes it at this statement's commit.
    pub async fn retry(&self, rows: &Rows, topic: Option<&str>) -> Result<u64, sqlx::Error> {
        let t = self.table.quoted();
        let update =
            format!("UPDATE {t} SET failed_at = NULL, xid = pg_current_xact_id() WHERE {SELECTED}");
        if !self.log_mode().await? {
            return self.act(update, rows, topic, None).await;
        }
        let emit = self
            .table
            .emit_message_sql(Some("id"), ["topic", "key", "payload", "headers"]);
        let sql = format!(
            "WITH r AS ({update} RETURNING id, topic, key, payload, headers), \
             e AS (SELECT {emit} AS lsn FROM r ORDER BY id) SELECT count(*) FROM e"
        );
        let (id, key) = rows.binds();
        let q = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
            .bind(id)
            .bind(key)
            .bind(topic);
        Ok(q.fetch_one(&self.pool).await? as u64)
    }

    /// Whether log mode published last (an older schema has no such column: it did not).
    async fn log_mode(&self) -> Result<bool, sqlx::Error> {
        let read: Result<Option<Option<String>>, _> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT read_mode FROM {} WHERE id = 1",
            self.table.lease_table()
        )))
        .fetch_optional(&self.pool)
        .await;
        match read {
            Ok(mode) => Ok(mode.flatten().as_deref() == Some("log")),
            Err(e) if crate::store::errors::is_undefined_column(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Mark the selected parked rows handled without publishing them. Returns how many.
    pub async fn skip(
        &self,
        rows: &Rows,
        topic: Option<&str>,
        reason: &str,
    ) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "UPDATE {} SET published_at = now(), \
             last_error = 'skipped by an operator: ' || $4 || ' (was: ' || coalesce(last_error, '') || ')' \
             WHERE {SELECTED}",
            self.table.quoted()
        );
        self.act(sql, rows, topic, Some(reason)).await
    }

    async fn act(
        &self,
        sql: String,
        rows: &Rows,
        topic: Option<&str>,
        reason: Option<&str>,
    ) -> Result<u64, sqlx::Error> {
        let (id, key) = rows.binds();
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .bind(key)
            .bind(topic);
        if let Some(reason) = reason {
            q = q.bind(reason);
        }
        Ok(q.execute(&self.pool).await?.rows_affected())
    }

    /// Delete parked and skipped rows that failed longer ago than `older_than` (the one way
    /// rows never published are deleted). Returns how many.
    pub async fn purge(&self, older_than: Duration) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE failed_at < now() - make_interval(secs => $1)",
            self.table.quoted()
        )))
        .bind(older_than.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

/// `s` safe to print on a terminal: control characters (escape sequences, carriage returns,
/// tabs, newlines) and the invisible characters that reorder text (bidi controls) are shown
/// escaped, `\u{1b}`, never sent raw. Rows, topics, keys and replica names come from the
/// database: anyone who can insert a row chooses them.
pub fn printable(s: &str) -> Cow<'_, str> {
    let hostile = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(hostile) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if hostile(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `status` as text for a terminal (every name from the database through [`printable`]).
pub fn status_text(s: &Status) -> String {
    let mut out = match &s.slot {
        Some(_) => format!(
            "table {} (read mode log): {} parked; the backlog is in the WAL, behind the slot\n",
            printable(&s.table),
            s.parked,
        ),
        None => format!(
            "table {}: {} pending, {} parked, oldest pending {}\n",
            printable(&s.table),
            s.pending,
            s.parked,
            s.oldest_pending_age_seconds
                .map_or("-".to_string(), |a| format!("{a:.1}s ago"))
        ),
    };
    if let Some(slot) = &s.slot {
        out.push_str(&slot_text(slot));
    }
    match &s.leader {
        Some(l) if l.valid => out.push_str(&format!(
            "leader: {} (epoch {}, lease until {})\n",
            printable(&l.holder),
            l.epoch,
            l.expires_at
        )),
        Some(l) => out.push_str(&format!(
            "leader: none (last: {} epoch {}, lease expired {})\n",
            printable(&l.holder),
            l.epoch,
            l.expires_at
        )),
        None => out.push_str("leader: none yet\n"),
    }
    out.push_str(&replicas_text(s));
    if !s.topics.is_empty() {
        out.push_str(&format!(
            "{:<40} {:>10} {:>10} {:>12}\n",
            "TOPIC", "PENDING", "PARKED", "OLDEST(s)"
        ));
        for t in &s.topics {
            out.push_str(&format!(
                "{:<40} {:>10} {:>10} {:>12}\n",
                printable(&t.topic),
                t.pending,
                t.parked,
                t.oldest_pending_age_seconds
                    .map_or("-".into(), |a| format!("{a:.1}"))
            ));
        }
    }
    out
}

/// The slot line of `status` in log mode, and its problem if it has one.
fn slot_text(s: &SlotStatus) -> String {
    let mut out = format!("slot {}: ", printable(&s.name));
    if s.exists {
        let or_dash = |v: &Option<String>| v.as_deref().map_or("-".into(), printable).into_owned();
        let bytes = |b: Option<i64>| b.map_or("-".into(), bytes_text);
        out.push_str(&format!(
            "{}, wal_status {}, confirmed_flush_lsn {}, retains {} of WAL ({} behind the server), safe_wal_size {}\n",
            match s.active_pid {
                Some(pid) if s.active => format!("active (pid {pid})"),
                _ if s.active => "active".into(),
                _ => "inactive".into(),
            },
            or_dash(&s.wal_status),
            or_dash(&s.confirmed_flush_lsn),
            bytes(s.retained_wal_bytes),
            bytes(s.confirmed_lag_bytes),
            match s.safe_wal_size {
                Some(b) => bytes_text(b),
                None if s.wal_status.as_deref() == Some("lost") => "0 B".into(),
                None => "unlimited (max_slot_wal_keep_size = -1)".into(),
            },
        ));
    } else {
        out.push_str("does not exist\n");
    }
    if let Some(problem) = &s.problem {
        out.push_str(&format!("slot problem: {}\n", printable(problem)));
    }
    out
}

/// The replicas block of `status`: one line per replica, leader first.
fn replicas_text(s: &Status) -> String {
    let Some(replicas) = &s.replicas else {
        return format!(
            "replicas: unknown ({}_replicas is missing: run `outbox-relay migrate`)\n",
            printable(&s.table)
        );
    };
    if replicas.is_empty() {
        return "replicas: none registered\n".into();
    }
    let mut rows = vec![[
        "REPLICA", "HOST", "ROLE", "OWNS", "LEASE", "SEEN", "VERSION",
    ]
    .map(String::from)];
    for r in replicas {
        rows.push([
            printable(&r.id).into_owned(),
            printable(&r.host).into_owned(),
            r.role.as_str().into(),
            printable(&r.owns).into_owned(),
            r.lease_seconds_left
                .map_or("-".into(), |left| format!("{left:.1}s left")),
            format!("{:.1}s ago", r.last_seen_age_seconds),
            printable(&r.version).into_owned(),
        ]);
    }
    // Columns as wide as their widest cell (pod names are long); the last one unpadded.
    let widths: Vec<usize> = (0..7)
        .map(|c| {
            rows.iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &rows {
        for (c, cell) in row.iter().enumerate().take(6) {
            out.push_str(&format!("{cell:<w$}  ", w = widths[c]));
        }
        out.push_str(&row[6]);
        out.push('\n');
    }
    out
}

/// One parked row as a text line: tab-separated, so a tab inside a field is escaped too.
pub fn failed_text(r: &FailedRow) -> String {
    format!(
        "{}\t{}\t{}\tattempts={}\tfailed_at={}\t{}",
        r.id,
        printable(&r.topic),
        r.key.as_deref().map_or(Cow::Borrowed("<null>"), printable),
        r.attempts,
        r.failed_at.to_rfc3339(),
        printable(r.last_error.as_deref().unwrap_or(""))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::Role;

    fn status(replicas: Option<Vec<Replica>>) -> Status {
        Status {
            table: "public.outbox".into(),
            topics: vec![],
            pending: 0,
            parked: 0,
            oldest_pending_age_seconds: None,
            leader: None,
            replicas,
            read_mode: Some("claim"),
            slot: None,
        }
    }

    fn replica(id: &str, role: Role, left: Option<f64>) -> Replica {
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        Replica {
            id: id.into(),
            host: id.split(':').next().unwrap().into(),
            pid: 1,
            version: "0.1.0".into(),
            role,
            owns: "x".into(),
            epoch: None,
            leader_since: None,
            lease_expires_at: None,
            lease_seconds_left: left,
            started_at: t,
            last_seen: t,
            last_seen_age_seconds: 1.25,
        }
    }

    #[test]
    fn terminal_output_escapes_control_and_bidi_characters() {
        assert!(matches!(printable("orders.created é"), Cow::Borrowed(_)));
        assert_eq!(
            printable("a\u{1b}]0;pwned\u{7}b\r\n\tc\u{202e}d\u{9b}"),
            "a\\u{1b}]0;pwned\\u{7}b\\r\\n\\tc\\u{202e}d\\u{9b}"
        );
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let row = FailedRow {
            id: 1,
            topic: "t\u{1b}[2J".into(),
            key: Some("k\tx".into()),
            attempts: 1,
            created_at: Some(t),
            failed_at: t,
            last_error: Some("bad\u{1b}[31m".into()),
        };
        let line = failed_text(&row);
        assert!(!line.contains('\u{1b}'), "{line:?}");
        assert_eq!(line.matches('\t').count(), 5, "{line:?}");
        let mut s = status(Some(vec![replica(
            "evil\u{1b}[1A:1:ab",
            Role::Leader,
            None,
        )]));
        s.topics.push(TopicBacklog {
            topic: "x\u{1b}[2K".into(),
            pending: 1,
            oldest_pending_age_seconds: None,
            parked: 0,
        });
        let text = status_text(&s);
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert!(text.contains("x\\u{1b}[2K"), "{text:?}");
    }

    #[test]
    fn replicas_text_aligns_columns_and_names_a_missing_table() {
        let text = status_text(&status(Some(vec![
            replica("a-long-pod-name-0:1:ab", Role::Leader, Some(8.04)),
            replica("b:2:cd", Role::Standby, None),
        ])));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[2].starts_with("REPLICA "), "{text}");
        let col = |l: &str| l.find("0.1.0").unwrap();
        assert_eq!(col(lines[3]), col(lines[4]), "{text}");
        assert!(
            lines[3].contains("  leader   x     8.0s left  1.2s ago  0.1.0"),
            "{text}"
        );
        assert!(status_text(&status(None)).contains(
            "replicas: unknown (public.outbox_replicas is missing: run `outbox-relay migrate`)"
        ));
        assert!(status_text(&status(Some(vec![]))).contains("replicas: none registered"));
    }

    #[test]
    fn log_mode_status_shows_the_slot_and_its_problem() {
        let found = Slot {
            name: "outbox_relay_public_outbox".into(),
            plugin: Some("pgoutput".into()),
            database: Some("app".into()),
            same_database: true,
            active: true,
            active_pid: Some(4242),
            wal_status: Some("reserved".into()),
            safe_wal_size: None,
            restart_lsn: Some("0/16B3748".into()),
            confirmed_flush_lsn: Some("0/16B3780".into()),
            retained_wal_bytes: Some(3 << 20),
            confirmed_lag_bytes: Some(56),
        };
        let mut s = status(Some(vec![]));
        s.parked = 2;
        s.read_mode = Some("log");
        s.slot = Some(SlotStatus::new("outbox_relay_public_outbox", Some(found)));
        let text = status_text(&s);
        assert!(
            text.starts_with(
                "table public.outbox (read mode log): 2 parked; the backlog is in the WAL"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "slot outbox_relay_public_outbox: active (pid 4242), wal_status reserved, \
                 confirmed_flush_lsn 0/16B3780, retains 3.0 MiB of WAL (56 B behind the server), \
                 safe_wal_size unlimited (max_slot_wal_keep_size = -1)\n"
            ),
            "{text}"
        );
        assert!(!text.contains("slot problem"), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["slot"]["retained_wal_bytes"], 3 << 20);
        assert_eq!(json["slot"]["wal_status"], "reserved");
        assert_eq!(json["read_mode"], "log");

        s.slot = Some(SlotStatus::new("gone", None));
        let text = status_text(&s);
        assert!(
            text.contains("slot gone: does not exist\nslot problem: the replication slot \"gone\" does not exist"),
            "{text}"
        );
        assert!(text.contains("A lost slot"), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["slot"]["exists"], false);
        assert!(json["slot"]["problem"]
            .as_str()
            .unwrap()
            .contains("runbook"));
        // The other modes have no slot key at all.
        assert!(serde_json::to_value(status(None))
            .unwrap()
            .get("slot")
            .is_none());
    }
}
