//! `outbox-relay doctor`: a preflight against the real database and Kafka. Every finding has
//! a severity and, when something is wrong, the fix.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::Serialize;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::kafka::{client_config, KafkaConfig, Transactional};
use crate::settings::{transport_findings, DatabaseConfig};
use crate::store::errors::{self, Deadlines, Phase};
use crate::store::slot::{bytes_text, LogServer, Slot, RUNBOOK};
use crate::table::{LogNames, ReadMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub check: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Default)]
struct Report(Vec<Finding>);

impl Report {
    fn add(
        &mut self,
        severity: Severity,
        check: &'static str,
        message: impl Into<String>,
        fix: Option<String>,
    ) {
        self.0.push(Finding {
            severity,
            check,
            message: message.into(),
            fix,
        });
    }
    fn ok(&mut self, check: &'static str, message: impl Into<String>) {
        self.add(Severity::Ok, check, message, None);
    }
    fn info(&mut self, check: &'static str, message: impl Into<String>) {
        self.add(Severity::Info, check, message, None);
    }
    fn warn(&mut self, check: &'static str, message: impl Into<String>, fix: impl Into<String>) {
        self.add(Severity::Warn, check, message, Some(fix.into()));
    }
    fn error(&mut self, check: &'static str, message: impl Into<String>, fix: impl Into<String>) {
        self.add(Severity::Error, check, message, Some(fix.into()));
    }
}

/// What the database side learned that the Kafka side needs.
#[derive(Default)]
struct Pending {
    /// Which rows the topics and payload come from: `pending`, or in log mode `recent` (its
    /// backlog is in the WAL; the table's latest rows stand for the topics in use).
    rows: &'static str,
    topics: Vec<String>,
    largest_payload: Option<i64>,
}

/// Which read mode to check: `--read-mode` if given (else the one the table is migrated for),
/// and log mode's slot and publication.
struct Mode<'a> {
    wanted: Option<ReadMode>,
    log: &'a LogNames,
}

/// Every check, each database wait bounded by `deadlines` (a server that never answers is a
/// finding, not a hang); Kafka requests time out after 10s each. `mode`: `--read-mode`, or
/// `None` for the mode the table is migrated for; `log`: log mode's slot and publication;
/// `transactional`: `--delivery exactly-once`'s settings, whose needs are checked too.
pub async fn run(
    db: &DatabaseConfig,
    kafka: &KafkaConfig,
    mode: Option<ReadMode>,
    log: &LogNames,
    transactional: Option<&Transactional>,
    deadlines: Deadlines,
) -> Vec<Finding> {
    let mut r = Report::default();
    for finding in transport_findings(db, kafka) {
        r.warn(
            "transport",
            finding,
            "see README \"Security\"; --require-secure-transport enforces it",
        );
    }
    let mode = Mode { wanted: mode, log };
    let pending = database(db, &mode, deadlines, &mut r).await;
    self::kafka(kafka, &pending, transactional, &mut r).await;
    r.0
}

async fn database(
    db: &DatabaseConfig,
    mode: &Mode<'_>,
    deadlines: Deadlines,
    r: &mut Report,
) -> Pending {
    let options = deadlines.apply(&db.connect);
    let connect = PgConnection::connect_with(&options);
    let mut conn = match errors::within(Phase::Connect, deadlines.connect, connect).await {
        Ok(c) => c,
        Err(e) => {
            r.error(
                "database",
                format!("cannot connect to {}: {}", db.display, errors::describe(&e)),
                errors::hint(&e, &db.table),
            );
            return Pending::default();
        }
    };
    // PostgreSQL bounds each query (statement_timeout); the client bounds them together, a
    // little later, against a server that stops answering.
    let checks = database_checks(&mut conn, db, mode, r);
    let checked = match tokio::time::timeout(deadlines.statement + CLIENT_GRACE, checks).await {
        Ok(checked) => checked,
        Err(_) => Err(errors::TimedOut {
            phase: Phase::Statement,
            after: deadlines.statement,
        }
        .into_sqlx()),
    };
    // A stalled server would not answer a polite close either: just drop the connection.
    let stalled = matches!(&checked, Err(e) if errors::timed_out(e).is_some());
    if !stalled {
        let _ = conn.close().await;
    }
    match checked {
        Ok(p) => p,
        Err(e) => {
            r.error(
                "database",
                format!("a check query failed: {}", errors::describe(&e)),
                errors::hint(&e, &db.table),
            );
            Pending::default()
        }
    }
}

/// How much longer than the statement bound the client waits for all the checks.
const CLIENT_GRACE: Duration = Duration::from_secs(5);

async fn database_checks(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    mode: &Mode<'_>,
    r: &mut Report,
) -> Result<Pending, sqlx::Error> {
    let (version, user, tls): (String, String, Option<bool>) = sqlx::query_as(
        "SELECT current_setting('server_version'), current_user::text, \
         (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
    )
    .fetch_one(&mut *conn)
    .await?;
    let tls = if tls == Some(true) {
        "TLS on"
    } else {
        "TLS off"
    };
    r.ok(
        "database",
        format!(
            "connected to {} as {user} (PostgreSQL {version}, {tls})",
            db.display
        ),
    );

    let t = db.table.quoted();
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(&t)
        .fetch_one(&mut *conn)
        .await?;
    if exists.is_none() {
        r.error(
            "table",
            format!("table {} does not exist", db.table),
            "run `outbox-relay migrate` (or apply migrations/)",
        );
        return Ok(Pending::default());
    }
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
    )
    .bind(&t)
    .fetch_all(&mut *conn)
    .await?;
    let required = [
        "id",
        "topic",
        "key",
        "payload",
        "headers",
        "created_at",
        "published_at",
        "attempts",
        "last_error",
        "failed_at",
        "xid",
    ];
    let missing: Vec<&str> = required
        .into_iter()
        .filter(|c| !columns.iter().any(|have| have == c))
        .collect();
    if missing.is_empty() {
        r.ok(
            "table",
            format!("{} has every column the relay needs", db.table),
        );
    } else {
        r.error(
            "table",
            format!("{} lacks columns {missing:?}", db.table),
            "run `outbox-relay migrate` to upgrade it",
        );
    }
    let (lease, replicas): (bool, bool) =
        sqlx::query_as("SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL")
            .bind(db.table.lease_table())
            .bind(db.table.replicas_table())
            .fetch_one(&mut *conn)
            .await?;
    if !lease {
        r.error(
            "table",
            "the lease table is missing",
            "run `outbox-relay migrate`",
        );
    }
    if !replicas {
        r.warn(
            "table",
            "the replicas table is missing: the relay runs, but `status` cannot list replicas",
            "run `outbox-relay migrate`",
        );
    }
    // The table is migrated for one read mode: its read index tells which (neither, with log
    // mode's publication: log).
    let migrated_for =
        crate::store::migrated_mode(&mut *conn, &db.table, &mode.log.publication).await?;
    let read_mode = mode.wanted.or(migrated_for);
    // `migrate` without the relay's read mode would migrate the table for claim mode.
    let migrate_fix = format!(
        "run `outbox-relay migrate --read-mode {}`",
        read_mode.map_or("<the mode the relay runs with>", |m| m.as_str())
    );
    match (read_mode, migrated_for) {
        (Some(ReadMode::Log), None | Some(ReadMode::Log)) => r.ok(
            "indexes",
            "no read index, as --read-mode log wants: it reads the WAL, and rows are never marked \
             (a pending-rows index would hold every row)",
        ),
        (Some(want), Some(have)) if want == have => r.ok(
            "indexes",
            format!(
                "read index {} present: the table is migrated for --read-mode {}",
                db.table.read_index(have),
                have.as_str()
            ),
        ),
        (Some(want), Some(have)) => r.warn(
            "indexes",
            format!(
                "the table is migrated for --read-mode {}, not for --read-mode {}",
                have.as_str(),
                want.as_str()
            ),
            &migrate_fix,
        ),
        (Some(want), None) => r.warn(
            "indexes",
            format!(
                "no read index for --read-mode {}: every read scans the table",
                want.as_str()
            ),
            &migrate_fix,
        ),
        (None, _) => r.warn(
            "indexes",
            "no read index (claim mode's <table>_pending_idx) and no log mode publication: every read scans the table",
            &migrate_fix,
        ),
    }
    if !columns.iter().any(|have| have == "emitted_lsn") {
        r.warn(
            "table",
            format!(
                "{} lacks the column emitted_lsn (added by this release's migrate): the relay runs, \
                 but in log mode an emitted event set aside (parked or dead-lettered) is found by its \
                 last_error and may be set aside twice after `failed retry` or a crash",
                db.table
            ),
            &migrate_fix,
        );
    }
    let log_mode = read_mode == Some(ReadMode::Log);

    // The replicas table only feeds `status`: lacking rights there is a warning.
    let replicas = db.table.replicas_table();
    let mut privileges = vec![
        (t.clone(), "SELECT", true),
        (t.clone(), "UPDATE", true),
        (t.clone(), "DELETE", true),
        (db.table.lease_table(), "INSERT", true),
        (db.table.lease_table(), "UPDATE", true),
        (replicas.clone(), "INSERT", false),
        (replicas.clone(), "UPDATE", false),
        (replicas.clone(), "DELETE", false),
    ];
    if log_mode {
        // Parking an emitted event (it has no row) inserts it as a parked row.
        privileges.push((t.clone(), "INSERT", true));
    }
    for (object, privilege, needed) in privileges {
        let granted: Option<bool> =
            sqlx::query_scalar("SELECT has_table_privilege(current_user, to_regclass($1), $2)")
                .bind(&object)
                .bind(privilege)
                .fetch_one(&mut *conn)
                .await?;
        if granted == Some(false) {
            let fix = format!("GRANT {privilege} ON {object} TO {user}");
            if needed {
                r.error(
                    "privileges",
                    format!("{user} lacks {privilege} on {object}"),
                    fix,
                );
            } else {
                r.warn(
                    "privileges",
                    format!("{user} lacks {privilege} on {object}: heartbeats fail and `status` shows the replicas as stale"),
                    fix,
                );
            }
        }
    }

    let trigger: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname = $2)",
    )
    .bind(&t)
    .bind(format!("{}_notify", db.table.table()))
    .fetch_one(&mut *conn)
    .await?;
    if log_mode {
        if trigger {
            r.info(
                "wake-up",
                "a NOTIFY trigger is installed, which log mode does not use (the replication stream \
                 wakes the relay): `outbox-relay migrate --read-mode log` drops it",
            );
        } else {
            r.ok(
                "wake-up",
                "log mode: the replication stream wakes the relay (no NOTIFY trigger needed)",
            );
        }
    } else if trigger {
        r.ok(
            "wake-up",
            "NOTIFY trigger installed: the relay wakes within milliseconds of a commit",
        );
    } else {
        r.info(
            "wake-up",
            "no NOTIFY trigger: the relay finds rows by polling every --poll-interval",
        );
    }

    let adopted: Vec<String> = sqlx::query_scalar(
        "SELECT n.nspname || '.' || c.relname FROM pg_trigger t \
         JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE t.tgname = $1 \
         AND obj_description(t.tgfoid, 'pg_proc') = $2 || n.nspname || '.' || c.relname || ' -> ' || $3",
    )
    .bind(crate::adopt::TRIGGER)
    .bind(crate::adopt::COMMENT_PREFIX)
    .bind(db.table.to_string())
    .fetch_all(&mut *conn)
    .await?;
    for source in adopted {
        r.info(
            "adopt",
            format!("{source} is adopted: its inserts are copied into this table (`adopt --remove` stops it)"),
        );
    }

    let (wal_level, reloptions): (String, Option<Vec<String>>) =
        sqlx::query_as("SELECT current_setting('wal_level'), (SELECT reloptions FROM pg_class WHERE oid = $1::regclass)")
            .bind(&t)
            .fetch_one(&mut *conn)
            .await?;
    let slot = if log_mode {
        log_checks(conn, db, mode.log, &user, r).await?
    } else {
        r.info("wal_level", format!("wal_level={wal_level}"));
        slot_outside_log_mode(conn, db, mode.log, read_mode, r).await?;
        None
    };
    if reloptions
        .unwrap_or_default()
        .iter()
        .any(|o| o.starts_with("autovacuum_vacuum_scale_factor="))
    {
        r.ok("autovacuum", "autovacuum is tuned for a queue table");
    } else {
        r.warn(
            "autovacuum",
            "autovacuum uses the global defaults: dead tuples from marking can pile up",
            "run `outbox-relay migrate` (it sets autovacuum_vacuum_scale_factor=0.01 on the table)",
        );
    }

    if log_mode {
        return log_backlog(conn, db, slot.as_ref(), r).await;
    }
    let unpublished = crate::store::unpublished(&db.table);
    let (pending, parked, largest): (i64, i64, Option<i64>) =
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT (SELECT count(*) FROM {t} AS o WHERE {unpublished}), \
         (SELECT count(*) FROM {t} WHERE failed_at IS NOT NULL AND published_at IS NULL), \
         (SELECT max(octet_length(payload))::int8 FROM {t} AS o WHERE {unpublished})"
        )))
        .fetch_one(&mut *conn)
        .await?;
    r.info("backlog", format!("{pending} pending rows"));
    if parked > 0 {
        r.warn(
            "parked",
            format!("{parked} parked rows"),
            "inspect with `outbox-relay failed list`",
        );
    }
    let topics: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT DISTINCT topic FROM (SELECT topic FROM {t} AS o WHERE {unpublished} LIMIT 100000) p LIMIT 100"
    )))
    .fetch_all(&mut *conn)
    .await?;
    Ok(Pending {
        rows: "pending",
        topics,
        largest_payload: largest,
    })
}

/// Log mode's backlog is in the WAL (the slot's lag); the table's latest rows name the topics
/// in use.
async fn log_backlog(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    slot: Option<&Slot>,
    r: &mut Report,
) -> Result<Pending, sqlx::Error> {
    let t = db.table.quoted();
    match slot.and_then(|s| s.confirmed_lag_bytes) {
        Some(lag) => r.info(
            "backlog",
            format!(
                "log mode: the backlog is in the WAL, {} after the slot's confirmed position",
                bytes_text(lag)
            ),
        ),
        None => r.info(
            "backlog",
            "log mode: the backlog is in the WAL, behind the slot",
        ),
    }
    let parked: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {t} WHERE {}",
        crate::store::PARKED
    )))
    .fetch_one(&mut *conn)
    .await?;
    if parked > 0 {
        r.warn(
            "parked",
            format!("{parked} parked rows"),
            "inspect with `outbox-relay failed list`",
        );
    }
    let recent = format!(
        "SELECT topic, payload FROM {t} WHERE failed_at IS NULL ORDER BY id DESC LIMIT {RECENT_ROWS}"
    );
    let (topics, largest): (Vec<String>, Option<i64>) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT coalesce((SELECT array_agg(topic) FROM (SELECT DISTINCT topic FROM ({recent}) r LIMIT 100) d), '{{}}'), \
         (SELECT max(octet_length(payload))::int8 FROM ({recent}) r)"
    )))
    .fetch_one(&mut *conn)
    .await?;
    Ok(Pending {
        rows: "recent",
        topics,
        largest_payload: largest,
    })
}

/// How many of the table's latest rows stand for log mode's topics in use.
const RECENT_ROWS: i64 = 10_000;

/// Log mode's needs: the refusals the relay would start with (each a failure with its fix),
/// then the slot's state and the settings that bound the WAL it may hold. Returns the slot.
async fn log_checks(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    names: &LogNames,
    user: &str,
    r: &mut Report,
) -> Result<Option<Slot>, sqlx::Error> {
    let server = LogServer::read(conn, &db.table, names).await?;
    let refusals = server.refusals(&db.table, names);
    let refused = |check: &str| refusals.iter().any(|f| f.check == check);
    let (slot_name, publication) = (&names.slot, &names.publication);
    if !refused("wal_level") {
        r.ok("wal_level", "wal_level=logical");
    }
    if !refused("replication") {
        r.ok(
            "replication",
            format!("{user} may stream from a replication slot (REPLICATION, superuser or rds_replication)"),
        );
    }
    match server.publication {
        Some(p) if !refused("publication") => {
            r.ok(
                "publication",
                format!("{publication} publishes the inserts of {}", db.table),
            );
            if p.tables > 1 {
                r.warn(
                    "publication",
                    format!(
                        "{publication} also includes {} other tables: the relay decodes their rows and skips them",
                        p.tables - 1
                    ),
                    format!("ALTER PUBLICATION {publication} SET TABLE {}", db.table.quoted()),
                );
            }
        }
        _ => {}
    }
    for refusal in &refusals {
        r.error(refusal.check, refusal.problem.clone(), refusal.fix.clone());
    }
    let slot = server.slot.clone().filter(|_| !refused("slot"));
    if let Some(s) = &slot {
        r.ok(
            "slot",
            format!(
                "{slot_name}: pgoutput on this database, {}",
                match s.active_pid {
                    Some(pid) if s.active => format!("active (pid {pid}): a relay streams from it"),
                    _ => "inactive: no relay streams from it now (normal while none leads; it holds WAL meanwhile)".into(),
                }
            ),
        );
        slot_wal(s, r);
    }
    keep_size(conn, &server, slot.as_ref(), r).await;
    match server.wal_sender_timeout_ms {
        Some(0) => r.warn(
            "wal_sender_timeout",
            "wal_sender_timeout=0: the server never ends a replication connection that went silent, \
             so a relay cut off without closing it keeps the slot active (the next leader ends that session itself)",
            "ALTER SYSTEM SET wal_sender_timeout = '60s'; SELECT pg_reload_conf();",
        ),
        Some(ms) if ms < 5_000 => r.warn(
            "wal_sender_timeout",
            format!("wal_sender_timeout={ms}ms: close to the relay's status interval (1s); a busy relay or network is cut off and reconnects"),
            "ALTER SYSTEM SET wal_sender_timeout = '60s'; SELECT pg_reload_conf();",
        ),
        Some(ms) => r.ok(
            "wal_sender_timeout",
            format!(
                "wal_sender_timeout={}s: the relay reports every second; a relay gone silent is cut off after this long",
                ms / 1000
            ),
        ),
        None => {}
    }
    Ok(server.slot)
}

/// The slot's WAL: its wal_status, what it retains, how far behind it is, how much more
/// before it is lost.
fn slot_wal(s: &Slot, r: &mut Report) {
    let bytes = |b: Option<i64>| b.map_or("-".into(), bytes_text);
    let facts = format!(
        "retains {} of WAL (restart_lsn {}); confirmed_flush_lsn {}, {} behind the server; safe_wal_size {}",
        bytes(s.retained_wal_bytes),
        s.restart_lsn.as_deref().unwrap_or("-"),
        s.confirmed_flush_lsn.as_deref().unwrap_or("-"),
        bytes(s.confirmed_lag_bytes),
        s.safe_wal_size
            .map_or("unlimited (max_slot_wal_keep_size = -1)".into(), bytes_text),
    );
    match s.wal_status.as_deref() {
        Some("reserved") => r.ok("slot wal", format!("wal_status=reserved (within max_wal_size): {facts}")),
        Some("extended") => r.warn(
            "slot wal",
            format!("wal_status=extended: the slot holds more WAL than max_wal_size, the relay is behind or was down: {facts}"),
            "start the relay, or find why it is behind (its log, `outbox-relay status`); the WAL is freed as it confirms",
        ),
        Some("unreserved") => r.error(
            "slot wal",
            format!("wal_status=unreserved: the slot is past max_slot_wal_keep_size; the next checkpoint removes WAL it needs and it is lost: {facts}"),
            format!("get the relay streaming now, or raise max_slot_wal_keep_size at once (ALTER SYSTEM SET ...; SELECT pg_reload_conf()); once lost, {RUNBOOK}"),
        ),
        other => r.info("slot wal", format!("wal_status={}: {facts}", other.unwrap_or("-"))),
    }
}

/// max_slot_wal_keep_size: how much WAL a slot may hold before it is lost. Unlimited is a
/// warning with a size to set (about 4 hours of this server's WAL when pg_stat_wal knows it).
async fn keep_size(
    conn: &mut PgConnection,
    server: &LogServer,
    slot: Option<&Slot>,
    r: &mut Report,
) {
    const CHECK: &str = "max_slot_wal_keep_size";
    let trade_off = "a slot that falls further behind is lost (wal_status lost: the relay refuses to start, \
         and events written meanwhile are recovered as the README runbook \"A lost slot\" says), where no limit \
         keeps WAL until the disk fills and the whole database stops; alert on \
         outbox_relay_slot_retained_wal_bytes either way";
    match server.max_slot_wal_keep_size_mb {
        None => {}
        Some(-1) => {
            // The server's average WAL rate since its statistics were reset (PostgreSQL 14+).
            let rate: Option<f64> = sqlx::query_scalar(
                "SELECT wal_bytes::float8 / greatest(extract(epoch FROM now() - stats_reset)::float8, 1) FROM pg_stat_wal",
            )
            .fetch_optional(&mut *conn)
            .await
            .ok()
            .flatten();
            r.warn(
                CHECK,
                "max_slot_wal_keep_size=-1: no limit on the WAL a slot may hold: a relay that is down or \
                 stuck makes the server keep WAL until its disk fills, and a full WAL disk stops the database",
                format!(
                    "ALTER SYSTEM SET max_slot_wal_keep_size = '{}'; SELECT pg_reload_conf(); {}. The trade-off: {trade_off}",
                    suggested_keep_size(rate),
                    match rate {
                        Some(rate) => format!(
                            "(about 4 hours of WAL at this server's average rate, {}/h; size it to the longest relay outage to survive, within the WAL disk's free space)",
                            bytes_text((rate * 3600.0) as i64)
                        ),
                        None => "(size it to about 4 hours of this server's WAL, the longest relay outage to survive, within the WAL disk's free space)".into(),
                    }
                ),
            );
        }
        Some(mb) => {
            let limit = mb.saturating_mul(1 << 20);
            match slot.and_then(|s| s.safe_wal_size) {
                Some(safe) if safe < limit / 4 => r.warn(
                    CHECK,
                    format!(
                        "max_slot_wal_keep_size={mb}MB ({}): the slot may fall only {} further behind before it is lost",
                        bytes_text(limit),
                        bytes_text(safe)
                    ),
                    format!("get the relay streaming and caught up; raise the limit if the WAL disk has room. {trade_off}"),
                ),
                _ => r.ok(
                    CHECK,
                    format!(
                        "max_slot_wal_keep_size={mb}MB ({}): {trade_off}",
                        bytes_text(limit)
                    ),
                ),
            }
        }
    }
}

/// About 4 hours of WAL at `rate` bytes/s, in whole GB (at least 1); `4GB` unknown.
fn suggested_keep_size(rate: Option<f64>) -> String {
    match rate {
        Some(rate) if rate.is_finite() && rate > 0.0 => {
            let gb = (rate * 4.0 * 3600.0 / (1u64 << 30) as f64).ceil().max(1.0);
            format!("{gb:.0}GB")
        }
        _ => "4GB".into(),
    }
}

/// In claim mode, log mode's slot: while log mode published last, a claim-mode relay first
/// publishes the rest of the slot and then drops it; otherwise a slot of this table's log mode
/// holds WAL for nothing.
async fn slot_outside_log_mode(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    names: &LogNames,
    read_mode: Option<ReadMode>,
    r: &mut Report,
) -> Result<(), sqlx::Error> {
    // The mode the last leader published in (no such column before log mode: not log).
    let last: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT read_mode FROM {} WHERE id = 1",
        db.table.lease_table()
    )))
    .fetch_optional(&mut *conn)
    .await
    .ok()
    .flatten()
    .flatten();
    let slot = Slot::read(&mut *conn, &names.slot)
        .await?
        .filter(|s| s.same_database);
    let held = |s: &Slot| s.retained_wal_bytes.map_or("-".into(), bytes_text);
    let name = &names.slot;
    if last.as_deref() == Some("log") {
        match (read_mode, &slot) {
            (_, Some(s)) if !s.is_lost() => r.info(
                "slot",
                format!(
                    "log mode published last: a --read-mode claim relay first publishes the rest of the \
                     replication slot {name} (it holds {} of WAL until then), then drops it",
                    held(s)
                ),
            ),
            (_, found) => r.error(
                "slot",
                format!(
                    "{} was last published in --read-mode log, and its replication slot {name:?} is {}: \
                     a --read-mode claim relay refuses to start",
                    db.table,
                    if found.is_none() { "missing" } else { "lost" }
                ),
                format!("pass the --slot log mode used, or {RUNBOOK}"),
            ),
        }
        return Ok(());
    }
    if let Some(s) = slot.filter(|s| !s.active) {
        r.warn(
            "slot",
            format!(
                "the replication slot {name} of --read-mode log exists, but the table is read with --read-mode {}: \
                 nothing reads the slot, and it holds {} of WAL, more every minute",
                read_mode.map_or("(unknown)", ReadMode::as_str),
                held(&s)
            ),
            format!(
                "if log mode is no longer used: SELECT pg_drop_replication_slot('{name}'); DROP PUBLICATION IF EXISTS {};",
                names.publication
            ),
        );
    }
    Ok(())
}

async fn kafka(
    cfg: &KafkaConfig,
    pending: &Pending,
    transactional: Option<&Transactional>,
    r: &mut Report,
) {
    let config = client_config(cfg);
    for (key, want) in [("enable.idempotence", "true"), ("acks", "all")] {
        let have = config.get(key).unwrap_or("");
        if have == want || (key == "acks" && have == "-1") {
            r.ok("producer", format!("{key}={have}"));
        } else {
            r.warn(
                "producer",
                format!("{key}={have}: per-key order or durability is weakened"),
                format!("remove the --kafka-config override of {key}"),
            );
        }
    }
    r.info(
        "producer",
        format!(
            "partitioner={}, message.timeout.ms={}, compression.type={}, linger.ms={}",
            config.get("partitioner").unwrap_or("?"),
            config.get("message.timeout.ms").unwrap_or("?"),
            config.get("compression.type").unwrap_or("?"),
            config.get("linger.ms").unwrap_or("?"),
        ),
    );
    let admin: AdminClient<DefaultClientContext> = match config.create() {
        Ok(a) => a,
        Err(e) => {
            return r.error(
                "kafka",
                format!("invalid Kafka configuration: {}", cfg.describe_error(&e)),
                "fix the property it names (--kafka-config or the line of --kafka-config-file)",
            )
        }
    };
    let metadata = {
        let admin = &admin;
        tokio::task::block_in_place(|| admin.inner().fetch_metadata(None, Duration::from_secs(10)))
    };
    let metadata = match metadata {
        Ok(m) => m,
        Err(e) => {
            return r.error(
                "kafka",
                format!("cannot reach {}: {e}", cfg.brokers),
                "check --kafka-brokers, the network and the TLS/SASL settings",
            )
        }
    };
    r.ok(
        "kafka",
        format!(
            "connected: {} brokers, {} topics",
            metadata.brokers().len(),
            metadata.topics().len()
        ),
    );
    let mut present = Vec::new();
    for topic in &pending.topics {
        match metadata.topics().iter().find(|t| t.name() == topic && t.error().is_none()) {
            Some(t) => {
                r.ok("topics", format!("{topic}: {} partitions", t.partitions().len()));
                present.push(topic.as_str());
            }
            None => r.error("topics", format!("{} rows name topic {topic:?}, which does not exist", pending.rows), format!("create it (e.g. kafka-topics --create --topic {topic}); those rows will be parked otherwise")),
        }
    }
    limits(&admin, &present, pending, r).await;
    if let Some(t) = transactional {
        exactly_once(cfg, &admin, &metadata, t, r).await;
    }
}

/// The largest payload against each present topic's max.message.bytes.
async fn limits(
    admin: &AdminClient<DefaultClientContext>,
    present: &[&str],
    pending: &Pending,
    r: &mut Report,
) {
    let Some(largest) = pending.largest_payload.filter(|_| !present.is_empty()) else {
        return;
    };
    let specifiers: Vec<ResourceSpecifier> = present
        .iter()
        .map(|t| ResourceSpecifier::Topic(t))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    match admin.describe_configs(&specifiers, &opts).await {
        Ok(results) => {
            for resource in results.into_iter().flatten() {
                let limit = resource
                    .get("max.message.bytes")
                    .and_then(|e| e.value.as_deref())
                    .and_then(|v| v.parse::<i64>().ok());
                if let Some(limit) = limit {
                    if largest > limit {
                        r.error("limits", format!("{:?}: the largest {} payload is {largest} bytes, above max.message.bytes={limit}", resource.specifier, pending.rows), "raise the topic's max.message.bytes or shrink the payload; such rows are parked");
                    } else {
                        r.ok(
                            "limits",
                            format!(
                                "{:?}: max.message.bytes={limit} >= largest {} payload {largest}",
                                resource.specifier, pending.rows
                            ),
                        );
                    }
                }
            }
        }
        Err(e) => r.warn(
            "limits",
            format!("cannot read topic configs: {e}"),
            "grant DESCRIBE_CONFIGS to the relay's principal to let doctor compare limits",
        ),
    }
}

/// The check name of every `--delivery exactly-once` finding.
const EXACTLY_ONCE: &str = "exactly-once";

/// How long each step of the transaction probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// `--delivery exactly-once`: the brokers' transaction settings, the positions
/// topic, and a transaction begun and aborted by this principal.
async fn exactly_once(
    cfg: &KafkaConfig,
    admin: &AdminClient<DefaultClientContext>,
    metadata: &Metadata,
    t: &Transactional,
    r: &mut Report,
) {
    transaction_settings(admin, metadata, r).await;
    positions_topic(admin, metadata, &t.positions_topic, r).await;
    let topic = t.positions_topic.as_str();
    let exists = metadata
        .topics()
        .iter()
        .any(|m| m.name() == topic && m.error().is_none());
    transaction_probe(cfg, &t.id, exists.then_some(topic), r).await;
}

/// Every broker's transaction.state.log.replication.factor and .min.isr: the transaction
/// coordinator's log (__transaction_state) is created on first use with them, and is never
/// created while the replication factor exceeds the brokers (every transaction times out).
async fn transaction_settings(
    admin: &AdminClient<DefaultClientContext>,
    metadata: &Metadata,
    r: &mut Report,
) {
    const FACTOR: &str = "transaction.state.log.replication.factor";
    const MIN_ISR: &str = "transaction.state.log.min.isr";
    let brokers = metadata.brokers().len() as i64;
    let state_log = metadata
        .topics()
        .iter()
        .find(|t| t.name() == "__transaction_state" && t.error().is_none());
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    // One broker per request: librdkafka sends a broker's configuration request to that broker.
    let described = futures::future::join_all(metadata.brokers().iter().map(|b| {
        let specifier = [ResourceSpecifier::Broker(b.id())];
        let opts = &opts;
        async move {
            let result = admin.describe_configs(&specifier, opts).await;
            (b.id(), result)
        }
    }))
    .await;
    let mut settings = Vec::new();
    let mut unreadable = Vec::new();
    for (id, result) in described {
        let resource = match result {
            Ok(mut results) => match results.pop() {
                Some(Ok(resource)) => resource,
                Some(Err(code)) => {
                    unreadable.push(format!("broker {id}: {code}"));
                    continue;
                }
                None => continue,
            },
            Err(e) => {
                unreadable.push(format!("broker {id}: {e}"));
                continue;
            }
        };
        let value = |key: &str| {
            resource
                .get(key)
                .and_then(|e| e.value.as_deref())
                .and_then(|v| v.trim().parse::<i64>().ok())
        };
        match (value(FACTOR), value(MIN_ISR)) {
            (Some(factor), Some(min_isr)) => settings.push((id, factor, min_isr)),
            _ => unreadable.push(format!("broker {id}: {FACTOR} or {MIN_ISR} not shown")),
        }
    }
    if !unreadable.is_empty() {
        r.warn(
            EXACTLY_ONCE,
            format!(
                "cannot read the brokers' transaction settings ({})",
                unreadable.join("; ")
            ),
            format!(
                "grant DESCRIBE_CONFIGS on the cluster to the relay's principal to let doctor check them, \
                 or check yourself that {FACTOR} is at most the broker count ({brokers})"
            ),
        );
    }
    // One finding for the cluster when every broker agrees, else one per broker.
    let agree = settings
        .windows(2)
        .all(|w| (w[0].1, w[0].2) == (w[1].1, w[1].2));
    let shown = if agree {
        settings.get(..1).unwrap_or_default()
    } else {
        &settings[..]
    };
    for &(id, factor, min_isr) in shown {
        let who = if agree {
            "the brokers".to_string()
        } else {
            format!("broker {id}")
        };
        let values = format!("{FACTOR}={factor}, {MIN_ISR}={min_isr}");
        if factor > brokers {
            let fix = format!(
                "set {FACTOR} to at most {brokers} (the broker count) in the brokers' configuration and restart them"
            );
            match state_log {
                None => r.error(
                    EXACTLY_ONCE,
                    format!(
                        "{who}: {values}, but the cluster has {brokers} brokers: the transaction coordinator \
                         can never start (its log, __transaction_state, cannot be created), so every transaction times out"
                    ),
                    fix,
                ),
                Some(_) => r.warn(
                    EXACTLY_ONCE,
                    format!(
                        "{who}: {values}, more than the cluster's {brokers} brokers (__transaction_state exists \
                         already, so the coordinator runs while its replicas are in sync)"
                    ),
                    fix,
                ),
            }
        } else if min_isr > factor {
            r.error(
                EXACTLY_ONCE,
                format!(
                    "{who}: {values}: more in-sync replicas required than there are replicas, so the \
                     transaction coordinator cannot write its log and every transaction fails"
                ),
                format!("set {MIN_ISR} to at most {FACTOR} ({factor}) on the brokers"),
            );
        } else {
            r.ok(
                EXACTLY_ONCE,
                format!(
                    "{who}: {values} ({brokers} brokers): the transaction coordinator can start"
                ),
            );
        }
    }
}

/// The positions topic: compacted (a position is a key's latest value; without compaction
/// the topic grows without bound), or missing (the relay creates it).
async fn positions_topic(
    admin: &AdminClient<DefaultClientContext>,
    metadata: &Metadata,
    topic: &str,
    r: &mut Report,
) {
    let Some(found) = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
    else {
        return r.info(
            EXACTLY_ONCE,
            format!(
                "positions topic {topic} is missing: created by the relay at start; needs CREATE on the \
                 cluster or create it yourself: compacted, one partition"
            ),
        );
    };
    let partitions = found.partitions().len();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let policy = match admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &opts)
        .await
    {
        Ok(mut results) => match results.pop() {
            Some(Ok(resource)) => resource
                .get("cleanup.policy")
                .and_then(|e| e.value.clone())
                .ok_or_else(|| "cleanup.policy not shown".to_string()),
            Some(Err(code)) => Err(code.to_string()),
            None => Err("no answer".to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    match policy {
        Ok(policy) if policy.contains("compact") => r.ok(
            EXACTLY_ONCE,
            format!("positions topic {topic}: cleanup.policy={policy}, {partitions} partitions"),
        ),
        Ok(policy) => r.warn(
            EXACTLY_ONCE,
            format!(
                "positions topic {topic} is not compacted (cleanup.policy={policy}): it grows without \
                 bound, and retention may delete the last position of a relay that commits rarely"
            ),
            format!(
                "set cleanup.policy=compact on it (kafka-configs --alter --entity-type topics \
                 --entity-name {topic} --add-config cleanup.policy=compact)"
            ),
        ),
        Err(e) => r.warn(
            EXACTLY_ONCE,
            format!("positions topic {topic} ({partitions} partitions): cannot read its cleanup.policy: {e}"),
            "grant DESCRIBE_CONFIGS on the topic to the relay's principal to let doctor check it",
        ),
    }
}

/// Begin a transaction as this principal, write a record to the positions topic in it (if the
/// topic exists: the relay creates it otherwise), and abort it, with the brokers' answer as the
/// finding. The aborted record is invisible to read_committed readers, and its key (the probe
/// id) is not the relay's, so the relay's position is untouched.
///
/// The probe's transactional id is the relay's plus `.doctor-probe`, never the relay's own:
/// init_transactions with the relay's id would bump that id's epoch and so fence the running
/// leader (its open transaction aborted, its next commit refused) - a preflight must not
/// disturb a relay at work. A prefixed ACL on the relay's id covers the probe's id too. The
/// brokers keep the probe id's (empty) state until transactional.id.expiration.ms after its use.
async fn transaction_probe(cfg: &KafkaConfig, id: &str, positions: Option<&str>, r: &mut Report) {
    let probe = format!("{id}.doctor-probe");
    let (key, topic) = (probe.clone(), positions.map(str::to_string));
    let (wrote, may) = match positions {
        Some(t) => (
            format!(" wrote a record to the positions topic {t} in it and"),
            " and write its positions",
        ),
        None => (String::new(), ""),
    };
    let producer_config = {
        let mut c = client_config(cfg);
        c.set("transactional.id", &probe);
        c
    };
    let described = cfg.clone();
    let outcome = tokio::task::spawn_blocking(move || -> Result<(), (&'static str, KafkaError)> {
        let producer: FutureProducer = producer_config
            .create()
            .map_err(|e| ("create a transactional producer", e))?;
        producer
            .init_transactions(PROBE_TIMEOUT)
            .map_err(|e| ("initialize transactions", e))?;
        producer
            .begin_transaction()
            .map_err(|e| ("begin a transaction", e))?;
        if let Some(topic) = &topic {
            let record = FutureRecord::<str, [u8]>::to(topic).key(&key).payload(&[]);
            let delivery = producer
                .send_result(record)
                .map_err(|(e, _)| ("write to the positions topic", e))?;
            match futures::executor::block_on(delivery) {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(("write to the positions topic", e)),
                Err(_) => return Err(("write to the positions topic", KafkaError::Canceled)),
            }
        }
        producer
            .abort_transaction(PROBE_TIMEOUT)
            .map_err(|e| ("abort the transaction", e))
    })
    .await;
    let (step, e) = match outcome {
        Ok(Ok(())) => {
            return r.ok(
                EXACTLY_ONCE,
                format!(
                    "began a transaction as {probe} (a probe id of its own: a running relay of \
                     {id} is not fenced),{wrote} aborted it: this principal may use transactions{may}"
                ),
            )
        }
        Ok(Err(failed)) => failed,
        Err(e) => {
            return r.error(
                EXACTLY_ONCE,
                format!("the transaction probe did not finish: {e}"),
                "run doctor again",
            )
        }
    };
    // As every Kafka error doctor prints: never a property's value (it may be a secret).
    let shown = described.describe_error(&e);
    let acl = format!(
        "grant the relay's principal WRITE and DESCRIBE on transactional ids prefixed {id} \
         (kafka-acls --add --allow-principal User:<relay> --operation Write --operation Describe \
         --transactional-id {id} --resource-pattern-type prefixed; a literal ACL on {id} alone does \
         not cover this probe's id)"
    );
    let fix = match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed) => acl,
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => format!(
            "grant the relay's principal WRITE and DESCRIBE on the positions topic {} \
             (kafka-acls --add --allow-principal User:<relay> --operation Write --operation Describe --topic {})",
            positions.unwrap_or_default(),
            positions.unwrap_or_default()
        ),
        Some(RDKafkaErrorCode::ClusterAuthorizationFailed) => format!(
            "{acl}; brokers before Kafka 3.0 also want IDEMPOTENT_WRITE on the cluster"
        ),
        _ => format!(
            "check the brokers' transaction settings (transaction.state.log.replication.factor and \
             .min.isr at most the brokers alive; the findings above), their logs, and any transaction \
             property in --kafka-config; if the brokers refuse this principal, {acl}"
        ),
    };
    r.error(
        EXACTLY_ONCE,
        format!("could not {step} as {probe}: {shown}"),
        fix,
    );
}

/// The findings as text lines: `[SEVERITY] check: message (fix: ...)`.
pub fn text(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(|f| {
            let tag = match f.severity {
                Severity::Ok => " OK ",
                Severity::Info => "INFO",
                Severity::Warn => "WARN",
                Severity::Error => "FAIL",
            };
            // Messages name topics and tables from the database: never raw control characters.
            let message = crate::admin::printable(&f.message);
            match &f.fix {
                Some(fix) => format!(
                    "[{tag}] {}: {message}\n       fix: {}\n",
                    f.check,
                    crate::admin::printable(fix)
                ),
                None => format!("[{tag}] {}: {message}\n", f.check),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suggested_keep_size_is_about_four_hours_of_wal() {
        // 1 MiB/s: 14,400 MiB in 4 hours, rounded up to 15 GB.
        assert_eq!(suggested_keep_size(Some(1048576.0)), "15GB");
        assert_eq!(suggested_keep_size(Some(10.0)), "1GB");
        assert_eq!(suggested_keep_size(None), "4GB");
        assert_eq!(suggested_keep_size(Some(f64::NAN)), "4GB");
    }

    #[test]
    fn findings_print_with_their_fix() {
        let mut r = Report::default();
        r.warn(
            "max_slot_wal_keep_size",
            "max_slot_wal_keep_size=-1",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '4GB'",
        );
        r.ok("slot", "s\u{1b}[2J");
        assert_eq!(
            text(&r.0),
            "[WARN] max_slot_wal_keep_size: max_slot_wal_keep_size=-1\n       \
             fix: ALTER SYSTEM SET max_slot_wal_keep_size = '4GB'\n[ OK ] slot: s\\u{1b}[2J\n"
        );
    }
}
