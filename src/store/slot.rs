//! Log mode's server side, as `run` (the preflight and the monitor), `doctor` and `status` see
//! it: the replication slot's row in `pg_replication_slots`, the publication, the settings
//! that decide how much WAL a slot may hold, and the requirements the relay refuses to start
//! without ([`LogServer::refusals`]).

use std::fmt;

use serde::Serialize;
use sqlx::{PgConnection, PgExecutor};

use crate::table::{LogNames, TableName};

/// The runbook for a slot that is lost or gone while the relay needs it.
pub const RUNBOOK: &str = "follow the README runbook \"A lost slot\"";

/// What `migrate` does for log mode, as a fix.
pub const MIGRATE: &str =
    "run `outbox-relay migrate --read-mode log` (or apply `migrate --read-mode log --print-sql`)";

/// The server's WAL position now (on a standby, the replayed position).
const WAL_NOW: &str =
    "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END";

/// One replication slot as the server reports it, with the WAL it holds in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Slot {
    pub name: String,
    /// The output plugin (log mode needs `pgoutput`); NULL for a physical slot.
    pub plugin: Option<String>,
    /// The database it decodes (NULL for a physical slot).
    pub database: Option<String>,
    /// Whether that is the database this connection is on.
    pub same_database: bool,
    /// Whether a session streams from it now, and which.
    pub active: bool,
    pub active_pid: Option<i32>,
    /// `reserved` (its WAL is within max_wal_size), `extended` (beyond, kept for it),
    /// `unreserved` (removed at the next checkpoint unless it catches up), `lost` (removed:
    /// the slot cannot be used).
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is in danger of being lost;
    /// NULL when max_slot_wal_keep_size = -1 (no limit) or once it is lost.
    pub safe_wal_size: Option<i64>,
    pub restart_lsn: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    /// The server's WAL position minus `restart_lsn`: the WAL the server keeps for this slot
    /// (NULL when it keeps none, e.g. once lost).
    pub retained_wal_bytes: Option<i64>,
    /// The server's WAL position minus `confirmed_flush_lsn`: WAL written since the relay's
    /// last confirmed position (how far behind the relay is, in bytes).
    pub confirmed_lag_bytes: Option<i64>,
}

impl Slot {
    /// The slot named `name`, if it exists.
    pub async fn read<'e>(
        executor: impl PgExecutor<'e>,
        name: &str,
    ) -> Result<Option<Slot>, sqlx::Error> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT slot_name::text AS name, plugin::text AS plugin, database::text AS database, \
             coalesce(database = current_database(), false) AS same_database, active, active_pid, \
             wal_status, safe_wal_size, restart_lsn::text AS restart_lsn, \
             confirmed_flush_lsn::text AS confirmed_flush_lsn, \
             ({WAL_NOW} - restart_lsn)::int8 AS retained_wal_bytes, \
             ({WAL_NOW} - confirmed_flush_lsn)::int8 AS confirmed_lag_bytes \
             FROM pg_replication_slots WHERE slot_name = $1"
        )))
        .bind(name)
        .fetch_optional(executor)
        .await
    }

    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

/// Whether log mode can read from a slot, for readiness and the monitor's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Usable,
    /// Usable now, but about to be lost: a warning.
    AtRisk(String),
    /// Missing or lost: the relay cannot publish from it (readiness fails).
    Unusable(String),
}

/// The condition of the slot named `name` (`None`: it does not exist).
pub fn condition(name: &str, slot: Option<&Slot>) -> Condition {
    let Some(slot) = slot else {
        return Condition::Unusable(format!(
            "the replication slot {name:?} does not exist: if it was dropped while events were \
             unpublished, {RUNBOOK}; otherwise {MIGRATE}"
        ));
    };
    match slot.wal_status.as_deref() {
        Some("lost") => Condition::Unusable(format!(
            "the replication slot {name:?} is lost (its WAL was removed past max_slot_wal_keep_size): {RUNBOOK}"
        )),
        Some("unreserved") => Condition::AtRisk(format!(
            "the replication slot {name:?} is past max_slot_wal_keep_size (wal_status unreserved): \
             the next checkpoint removes WAL it needs and it is lost unless the relay catches up now"
        )),
        _ => Condition::Usable,
    }
}

/// The slot gauges' values: retained WAL bytes, confirmed lag bytes, safe WAL bytes. A
/// missing slot gives NaN for all three; a slot that retains no WAL (lost) 0 retained bytes;
/// `safe_wal_size` NULL is -1 with no limit (max_slot_wal_keep_size = -1, as PostgreSQL
/// writes it) and 0 once lost.
pub fn gauges(slot: Option<&Slot>) -> [f64; 3] {
    let Some(slot) = slot else {
        return [f64::NAN; 3];
    };
    let bytes = |b: Option<i64>| b.map_or(f64::NAN, |b| b as f64);
    [
        slot.retained_wal_bytes.map_or(0.0, |b| b as f64),
        bytes(slot.confirmed_lag_bytes),
        match slot.safe_wal_size {
            Some(b) => b as f64,
            None if slot.is_lost() => 0.0,
            None => -1.0,
        },
    ]
}

/// The log mode publication as the server has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publication {
    /// Whether it includes the outbox table.
    pub covers_table: bool,
    /// Whether it publishes inserts (the relay's events).
    pub publishes_insert: bool,
    /// How many tables it includes (the relay decodes and skips the others' rows).
    pub tables: i64,
}

/// What log mode needs of the server, as found.
#[derive(Debug, Clone, PartialEq)]
pub struct LogServer {
    pub wal_level: String,
    /// Whether the role may stream: REPLICATION, superuser, or member of `rds_replication`.
    pub replication: bool,
    pub publication: Option<Publication>,
    pub slot: Option<Slot>,
    /// max_slot_wal_keep_size in MB (-1: no limit); NULL before PostgreSQL 13.
    pub max_slot_wal_keep_size_mb: Option<i64>,
    /// wal_sender_timeout in milliseconds (0: never).
    pub wal_sender_timeout_ms: Option<i64>,
}

/// Something the relay refuses to start without in log mode, and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The doctor check it belongs to: wal_level, replication, publication or slot.
    pub check: &'static str,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.problem, self.fix)
    }
}

impl LogServer {
    pub async fn read(
        conn: &mut PgConnection,
        table: &TableName,
        names: &LogNames,
    ) -> Result<LogServer, sqlx::Error> {
        // `rds_replication` is named through pg_roles: pg_has_role by name fails where it
        // does not exist (every server but RDS).
        let (wal_level, replication, max_slot_wal_keep_size_mb, wal_sender_timeout_ms): (
            String,
            bool,
            Option<i64>,
            Option<i64>,
        ) = sqlx::query_as(
            "SELECT current_setting('wal_level'), \
             coalesce((SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), false) \
             OR EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = 'rds_replication' \
                        AND pg_has_role(current_user, r.oid, 'member')), \
             (SELECT setting::int8 FROM pg_settings WHERE name = 'max_slot_wal_keep_size'), \
             (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_sender_timeout')",
        )
        .fetch_one(&mut *conn)
        .await?;
        let publication: Option<(bool, bool, i64)> = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables t WHERE t.pubname = p.pubname \
                            AND t.schemaname = $2 AND t.tablename = $3), \
             p.pubinsert, (SELECT count(*) FROM pg_publication_tables t WHERE t.pubname = p.pubname) \
             FROM pg_publication p WHERE p.pubname = $1",
        )
        .bind(&names.publication)
        .bind(table.schema())
        .bind(table.table())
        .fetch_optional(&mut *conn)
        .await?;
        let slot = Slot::read(&mut *conn, &names.slot).await?;
        Ok(LogServer {
            wal_level,
            replication,
            publication: publication.map(|(covers_table, publishes_insert, tables)| Publication {
                covers_table,
                publishes_insert,
                tables,
            }),
            slot,
            max_slot_wal_keep_size_mb,
            wal_sender_timeout_ms,
        })
    }

    /// Every requirement of log mode the server does not meet, in the order the relay checks
    /// them at start (it names the first); empty when it can start.
    pub fn refusals(&self, table: &TableName, names: &LogNames) -> Vec<Refusal> {
        let mut out = Vec::new();
        let mut refuse = |check, problem: String, fix: String| {
            out.push(Refusal {
                check,
                problem,
                fix,
            })
        };
        let (slot, name) = (&names.slot, &names.publication);
        if self.wal_level != "logical" {
            refuse(
                "wal_level",
                format!(
                    "--read-mode log needs wal_level = logical, the server has {}",
                    self.wal_level
                ),
                "set it (ALTER SYSTEM SET wal_level = logical, or the managed service's logical \
                 replication parameter) and restart PostgreSQL"
                    .into(),
            );
        }
        if !self.replication {
            refuse(
                "replication",
                "--read-mode log needs a role with the REPLICATION attribute".into(),
                "ALTER ROLE <role> REPLICATION (on managed services, grant the provider's replication role)".into(),
            );
        }
        match self.publication {
            None => refuse(
                "publication",
                format!("the publication {name:?} does not exist"),
                MIGRATE.into(),
            ),
            Some(p) if !p.covers_table => refuse(
                "publication",
                format!("the publication {name:?} does not include {table}"),
                format!("ALTER PUBLICATION {name} ADD TABLE {}", table.quoted()),
            ),
            Some(p) if !p.publishes_insert => refuse(
                "publication",
                format!("the publication {name:?} does not publish inserts: the table's rows would never reach the relay"),
                format!("ALTER PUBLICATION {name} SET (publish = 'insert')"),
            ),
            Some(_) => {}
        }
        match &self.slot {
            None => refuse(
                "slot",
                format!("the replication slot {slot:?} does not exist"),
                MIGRATE.into(),
            ),
            Some(s) if s.plugin.as_deref() != Some("pgoutput") => refuse(
                "slot",
                format!(
                    "the replication slot {slot:?} uses the plugin {:?}, log mode needs pgoutput",
                    s.plugin.as_deref().unwrap_or("none (a physical slot)")
                ),
                format!("drop it or pick another --slot, then {MIGRATE}"),
            ),
            Some(s) if !s.same_database => refuse(
                "slot",
                format!("the replication slot {slot:?} belongs to another database"),
                format!("pick another --slot, then {MIGRATE}"),
            ),
            Some(s) if s.is_lost() => refuse(
                "slot",
                format!("the replication slot {slot:?} is lost (its WAL was removed past max_slot_wal_keep_size)"),
                RUNBOOK.into(),
            ),
            Some(_) => {}
        }
        out
    }
}

/// Bytes as an operator reads them: `512 B`, `1.5 MiB`, `3.2 GiB`.
pub fn bytes_text(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes.unsigned_abs() < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(wal_status: &str) -> Slot {
        Slot {
            name: "s".into(),
            plugin: Some("pgoutput".into()),
            database: Some("app".into()),
            same_database: true,
            active: true,
            active_pid: Some(42),
            wal_status: Some(wal_status.into()),
            safe_wal_size: None,
            restart_lsn: Some("0/16B3748".into()),
            confirmed_flush_lsn: Some("0/16B3780".into()),
            retained_wal_bytes: Some(4096),
            confirmed_lag_bytes: Some(56),
        }
    }

    fn server() -> LogServer {
        LogServer {
            wal_level: "logical".into(),
            replication: true,
            publication: Some(Publication {
                covers_table: true,
                publishes_insert: true,
                tables: 1,
            }),
            slot: Some(slot("reserved")),
            max_slot_wal_keep_size_mb: Some(-1),
            wal_sender_timeout_ms: Some(60_000),
        }
    }

    fn names() -> LogNames {
        LogNames {
            slot: "s".into(),
            publication: "p".into(),
        }
    }

    #[test]
    fn refusals_come_in_the_order_the_relay_checks_them_with_the_fix() {
        let t = TableName::parse("outbox").unwrap();
        assert!(server().refusals(&t, &names()).is_empty());
        let mut s = server();
        s.wal_level = "replica".into();
        s.replication = false;
        s.publication = None;
        s.slot = None;
        let all = s.refusals(&t, &names());
        let checks: Vec<_> = all.iter().map(|r| r.check).collect();
        assert_eq!(checks, ["wal_level", "replication", "publication", "slot"]);
        assert_eq!(
            all[0].to_string(),
            "--read-mode log needs wal_level = logical, the server has replica: set it (ALTER SYSTEM SET \
             wal_level = logical, or the managed service's logical replication parameter) and restart PostgreSQL"
        );
        assert_eq!(
            all[2].to_string(),
            format!("the publication \"p\" does not exist: {MIGRATE}")
        );

        let mut s = server();
        s.publication = Some(Publication {
            covers_table: false,
            publishes_insert: true,
            tables: 1,
        });
        assert_eq!(
            s.refusals(&t, &names())[0].to_string(),
            "the publication \"p\" does not include public.outbox: ALTER PUBLICATION p ADD TABLE \"public\".\"outbox\""
        );
        s.publication = Some(Publication {
            covers_table: true,
            publishes_insert: false,
            tables: 1,
        });
        assert!(s.refusals(&t, &names())[0]
            .fix
            .contains("SET (publish = 'insert')"));

        let mut s = server();
        s.slot.as_mut().unwrap().plugin = Some("wal2json".into());
        assert!(s.refusals(&t, &names())[0]
            .problem
            .contains("uses the plugin \"wal2json\""));
        s.slot = Some(slot("reserved"));
        s.slot.as_mut().unwrap().same_database = false;
        assert!(s.refusals(&t, &names())[0]
            .problem
            .contains("another database"));
        s.slot = Some(slot("lost"));
        let lost = s.refusals(&t, &names());
        assert_eq!(lost.len(), 1);
        assert!(
            lost[0].problem.contains("is lost") && lost[0].fix == RUNBOOK,
            "{lost:?}"
        );
    }

    #[test]
    fn a_missing_or_lost_slot_is_unusable_and_names_the_runbook() {
        assert_eq!(condition("s", Some(&slot("reserved"))), Condition::Usable);
        assert_eq!(condition("s", Some(&slot("extended"))), Condition::Usable);
        assert!(matches!(
            condition("s", Some(&slot("unreserved"))),
            Condition::AtRisk(why) if why.contains("unreserved")
        ));
        for c in [condition("s", Some(&slot("lost"))), condition("s", None)] {
            let Condition::Unusable(why) = c else {
                panic!("{c:?}")
            };
            assert!(why.contains(RUNBOOK) && why.contains("\"s\""), "{why}");
        }
    }

    #[test]
    fn gauges_document_missing_unlimited_and_lost() {
        assert!(gauges(None).iter().all(|g| g.is_nan()));
        let mut s = slot("reserved");
        assert_eq!(gauges(Some(&s)), [4096.0, 56.0, -1.0]);
        s.safe_wal_size = Some(1 << 30);
        assert_eq!(gauges(Some(&s))[2], (1u64 << 30) as f64);
        let mut lost = slot("lost");
        lost.restart_lsn = None;
        lost.retained_wal_bytes = None;
        assert_eq!(gauges(Some(&lost)), [0.0, 56.0, 0.0]);
    }

    #[test]
    fn bytes_read_as_an_operator_reads_them() {
        assert_eq!(bytes_text(0), "0 B");
        assert_eq!(bytes_text(1023), "1023 B");
        assert_eq!(bytes_text(1536), "1.5 KiB");
        assert_eq!(bytes_text(3 << 30), "3.0 GiB");
        assert_eq!(bytes_text(-2048), "-2.0 KiB");
    }
}
