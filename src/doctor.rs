//! `outbox-relay doctor`: a preflight against the real database and Kafka. Every finding has
//! a severity and, when something is wrong, the fix.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use serde::Serialize;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::kafka::{client_config, KafkaConfig};
use crate::settings::{transport_findings, DatabaseConfig};
use crate::store::errors::{self, Deadlines, Phase};
use crate::table::ReadMode;

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
    topics: Vec<String>,
    largest_payload: Option<i64>,
}

/// Every check, each database wait bounded by `deadlines` (a server that never answers is a
/// finding, not a hang); Kafka requests time out after 10s each.
pub async fn run(db: &DatabaseConfig, kafka: &KafkaConfig, deadlines: Deadlines) -> Vec<Finding> {
    let mut r = Report::default();
    for finding in transport_findings(db, kafka) {
        r.warn(
            "transport",
            finding,
            "see README \"Security\"; --require-secure-transport enforces it",
        );
    }
    let pending = database(db, deadlines, &mut r).await;
    self::kafka(kafka, &pending, &mut r).await;
    r.0
}

async fn database(db: &DatabaseConfig, deadlines: Deadlines, r: &mut Report) -> Pending {
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
    let checks = database_checks(&mut conn, db, r);
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
    // The table is migrated for one read mode: its read index tells which.
    let mut migrated_for = None;
    for mode in ReadMode::ALL {
        let present: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(db.table.read_index(mode))
            .fetch_one(&mut *conn)
            .await?;
        if present {
            migrated_for = Some(mode);
            break;
        }
    }
    match migrated_for {
        Some(mode) => r.ok(
            "indexes",
            format!(
                "read index {} present: the table is migrated for --read-mode {}",
                db.table.read_index(mode),
                mode.as_str()
            ),
        ),
        None => r.warn(
            "indexes",
            "no read index (claim: <table>_pending_idx, append: <table>_xid_idx): every read scans the table",
            "run `outbox-relay migrate --read-mode <the mode the relay runs with>`",
        ),
    }

    // The replicas table only feeds `status`: lacking rights there is a warning.
    let replicas = db.table.replicas_table();
    for (object, privilege, needed) in [
        (t.clone(), "SELECT", true),
        (t.clone(), "UPDATE", true),
        (t.clone(), "DELETE", true),
        (db.table.lease_table(), "INSERT", true),
        (db.table.lease_table(), "UPDATE", true),
        (replicas.clone(), "INSERT", false),
        (replicas.clone(), "UPDATE", false),
        (replicas.clone(), "DELETE", false),
    ] {
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
    if trigger {
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
    r.info("wal_level", format!("wal_level={wal_level}"));
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
        topics,
        largest_payload: largest,
    })
}

async fn kafka(cfg: &KafkaConfig, pending: &Pending, r: &mut Report) {
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
            None => r.error("topics", format!("pending rows name topic {topic:?}, which does not exist"), format!("create it (e.g. kafka-topics --create --topic {topic}); those rows will be parked otherwise")),
        }
    }
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
                        r.error("limits", format!("{:?}: the largest pending payload is {largest} bytes, above max.message.bytes={limit}", resource.specifier), "raise the topic's max.message.bytes or shrink the payload; such rows are parked");
                    } else {
                        r.ok("limits", format!("{:?}: max.message.bytes={limit} >= largest pending payload {largest}", resource.specifier));
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
