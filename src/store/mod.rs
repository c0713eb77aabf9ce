//! The outbox store: the table's statements shared by every read mode (marks, parking,
//! backlog, cleanup), the connection pool, `migrate` and LISTEN. Each read mode's own
//! statements live with its reader (`crate::read`). No statement holds a transaction or a row
//! lock while Kafka is awaited: each is a single autocommit statement.

pub mod errors;
pub mod slot;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::event::OutboxRow;
use crate::table::{LogNames, ReadMode, TableName};

/// What the relay does with a row once Kafka has acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnPublish {
    /// Set published_at; the built-in cleanup deletes the row after --retention (an audit
    /// trail for inspection and replays).
    Mark,
    /// Delete the row at once: about a quarter of the statement time and a sixth of the WAL of a
    /// mark per event, and no table growth; nothing published is left to inspect.
    Delete,
}

/// A lazily connecting pool: the relay starts (and serves /healthz) even when the database
/// is down, and every statement reconnects as needed.
pub fn pool(connect: &PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy_with(connect.clone())
}

/// Apply the table's DDL in one transaction under an advisory lock, so several replicas
/// can run `migrate` at once. A short lock timeout keeps a busy table's writers from
/// queueing behind the migration.
/// In log mode, also the publication and the emit function, then (after that commits) the
/// replication slot, unless they exist.
pub async fn migrate(
    conn: &mut PgConnection,
    table: &TableName,
    notify_trigger: bool,
    mode: ReadMode,
    log: &LogNames,
) -> Result<(), sqlx::Error> {
    if mode == ReadMode::Log {
        let level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
            .fetch_one(&mut *conn)
            .await?;
        if level != "logical" {
            return Err(sqlx::Error::Configuration(
                format!("--read-mode log needs wal_level = logical, the server has {level}: set it \
                         (ALTER SYSTEM SET wal_level = logical; or the managed service's logical replication \
                         parameter) and restart PostgreSQL")
                .into(),
            ));
        }
    }
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '10s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(table.lock_key())
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(AssertSqlSafe(table.ddl(notify_trigger, mode)))
        .execute(&mut *tx)
        .await?;
    if mode == ReadMode::Log {
        sqlx::raw_sql(AssertSqlSafe(table.log_ddl(&log.publication)))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    if mode == ReadMode::Log {
        // Waits for the transactions running now to end (the slot's consistent start).
        let created = sqlx::query(CREATE_SLOT)
            .bind(&log.slot)
            .fetch_optional(&mut *conn)
            .await?;
        if created.is_some() {
            sqlx::query(AssertSqlSafe(record_slot_snapshot(table)))
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// Record, right after the slot is created, a snapshot in which every transaction committed
/// before the slot's start is visible (see `read::log`: what log mode publishes from the table
/// when it takes over).
pub fn record_slot_snapshot(table: &TableName) -> String {
    format!(
        "INSERT INTO {} AS l (id, holder, epoch, expires_at, log_snapshot) \
         VALUES (1, '', 0, clock_timestamp(), pg_current_snapshot()::text) \
         ON CONFLICT (id) DO UPDATE SET log_snapshot = EXCLUDED.log_snapshot",
        table.lease_table()
    )
}

/// The read mode `table` is migrated for: claim mode's read index says claim; without it, a
/// publication named `publication` that includes the table says log (`migrate --read-mode
/// log` drops the index). `None`: neither (a table an older release migrated for append mode
/// has neither: `migrate` for the mode it runs in now takes it over).
pub async fn migrated_mode<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    table: &TableName,
    publication: &str,
) -> Result<Option<ReadMode>, sqlx::Error> {
    let (claim, log): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass($1) IS NOT NULL, \
         EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $2 AND schemaname = $3 AND tablename = $4)",
    )
    .bind(table.read_index(ReadMode::Claim))
    .bind(publication)
    .bind(table.schema())
    .bind(table.table())
    .fetch_one(executor)
    .await?;
    Ok(match (claim, log) {
        (true, _) => Some(ReadMode::Claim),
        (_, true) => Some(ReadMode::Log),
        _ => None,
    })
}

/// Create log mode's slot unless it exists ($1: its name).
pub const CREATE_SLOT: &str = "SELECT pg_create_logical_replication_slot($1, 'pgoutput') \
     WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)";

/// Backlog figures for metrics and readiness.
#[derive(Debug, Clone, Copy, Default)]
pub struct Backlog {
    pub pending: i64,
    pub oldest_pending_age: Option<f64>,
    pub parked: i64,
}

/// The relay's statements for one table, built once with the quoted table name.
#[derive(Clone)]
pub struct OutboxStore {
    pool: PgPool,
    table: TableName,
    mode: ReadMode,
    mark_sql: Arc<str>,
    park_sql: Arc<str>,
    retry_sql: Arc<str>,
    dead_lettered_sql: Arc<str>,
    backlog_sql: Arc<str>,
    cleanup_sql: Arc<str>,
    cleanup_log_sql: Arc<str>,
}

/// Rows pending by state (neither published nor parked).
pub const PENDING: &str = "published_at IS NULL AND failed_at IS NULL";

/// Parked rows: set aside, waiting for an operator. A skipped row (`failed skip`) keeps its
/// `failed_at` and gets a `published_at`: handled, never published, never deleted by cleanup.
pub const PARKED: &str = "failed_at IS NOT NULL AND published_at IS NULL";

/// Rows a table-reading mode has yet to publish: pending by state and not behind the cursor an
/// older release's append mode left (NULL once claim or log mode has taken over: see
/// [`crate::read::ClaimReader`]). The table's alias must be `o`.
pub fn unpublished(table: &TableName) -> String {
    format!(
        "o.published_at IS NULL AND o.failed_at IS NULL \
         AND NOT coalesce((o.xid, o.id) <= (SELECT cursor_xid, cursor_id FROM {} WHERE id = 1), false)",
        table.lease_table()
    )
}

/// How a row was set aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetAside {
    Parked,
    DeadLettered,
}

impl OutboxStore {
    /// `on_publish`: whether a delivered row is marked or deleted (claim mode). `mode`: how
    /// the backlog is counted and what cleanup may delete.
    pub fn new(pool: PgPool, table: TableName, on_publish: OnPublish, mode: ReadMode) -> Self {
        let t = table.quoted();
        let errors = "unnest($1::bigint[], $2::text[]) AS f(id, error)";
        OutboxStore {
            mark_sql: match on_publish {
                OnPublish::Mark => format!("UPDATE {t} SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL"),
                OnPublish::Delete => format!("DELETE FROM {t} WHERE id = ANY($1) AND published_at IS NULL"),
            }
            .into(),
            park_sql: format!(
                "UPDATE {t} AS o SET failed_at = now(), attempts = o.attempts + 1, last_error = f.error FROM {errors} WHERE o.id = f.id"
            )
            .into(),
            retry_sql: format!(
                "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = f.error FROM {errors} WHERE o.id = f.id"
            )
            .into(),
            dead_lettered_sql: format!(
                "UPDATE {t} AS o SET published_at = now(), attempts = o.attempts + 1, last_error = f.error FROM {errors} WHERE o.id = f.id"
            )
            .into(),
            backlog_sql: match mode {
                // The backlog is in the WAL (see the slot's retained WAL), not the table.
                ReadMode::Log => format!(
                    "SELECT 0::int8, NULL::float8, (SELECT count(*) FROM {t} WHERE {PARKED})"
                ),
                ReadMode::Claim => format!(
                    "SELECT (SELECT count(*) FROM {t} WHERE {PENDING}), \
                     (SELECT extract(epoch FROM now() - created_at)::float8 FROM {t} WHERE {PENDING} ORDER BY id LIMIT 1), \
                     (SELECT count(*) FROM {t} WHERE {PARKED})"
                ),
            }
            .into(),
            cleanup_sql: format!(
                "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE published_at < now() - make_interval(secs => $1) AND failed_at IS NULL \
                 ORDER BY published_at LIMIT $2)"
            )
            .into(),
            cleanup_log_sql: format!(
                "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE created_at < now() - make_interval(secs => $1) \
                 AND failed_at IS NULL LIMIT $2)"
            )
            .into(),
            pool,
            table,
            mode,
        }
    }

    pub fn mode(&self) -> ReadMode {
        self.mode
    }

    pub fn table(&self) -> &TableName {
        &self.table
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether the index this read mode needs exists (without it every read scans the table).
    pub async fn has_read_index(&self) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(self.table.read_index(self.mode))
            .fetch_one(&self.pool)
            .await
    }

    /// Mark rows published (only after each one's own delivery report).
    pub async fn mark_published(&self, ids: &[i64]) -> Result<u64, sqlx::Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(AssertSqlSafe(self.mark_sql.clone()))
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Set rows aside as failed, with the reason; the relay will not read them again.
    pub async fn park(&self, failures: &[(i64, String)]) -> Result<(), sqlx::Error> {
        self.record_errors(&self.park_sql, failures).await
    }

    /// Write an event that has no row (log mode's emitted events) into the table as set aside
    /// (`failed_at` set, or for a dead-lettered one `published_at`), with `error` and the
    /// event's id at the end of `last_error`. An event is inserted once (`emitted_lsn`, unique):
    /// if its batch is read again (a crash before the slot's position passed it, or,
    /// exactly-once, an aborted transaction) and it is set aside again, the row already there
    /// stands for it, even after `failed retry` sent that row, so the event is published once,
    /// under one event id. Returns whether a row was inserted.
    pub async fn insert_set_aside(
        &self,
        row: &OutboxRow,
        how: SetAside,
        error: &str,
    ) -> Result<bool, sqlx::Error> {
        let t = self.table.quoted();
        let column = match how {
            SetAside::Parked => "failed_at",
            SetAside::DeadLettered => "published_at",
        };
        let insert = format!(
            "INSERT INTO {t} (topic, key, payload, headers, created_at, attempts, last_error, {column}"
        );
        let values = "$1, $2, $3, $4::jsonb, $5, 1, $6 || ' ' || $7, now()";
        let once = format!(
            "{insert}, emitted_lsn) VALUES ({values}, '0/0'::pg_lsn + $8::numeric) \
             ON CONFLICT (emitted_lsn) WHERE emitted_lsn IS NOT NULL DO NOTHING"
        );
        let done = match self
            .set_aside_query(&once, row, error)
            .bind(-row.id)
            .execute(&self.pool)
            .await
        {
            Err(e) if errors::is_undefined_column(&e) => {
                // A table migrated by an older release: a parked event is found by its id at
                // the end of last_error instead (a dead-lettered one is not looked for).
                tracing::warn!(table = %self.table, "the table has no emitted_lsn column: run `outbox-relay migrate --read-mode log` to add it");
                let parked = format!("{PARKED} AND right(last_error, char_length($7)) = $7");
                let missing = match how {
                    SetAside::Parked => {
                        format!(" WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE {parked})")
                    }
                    SetAside::DeadLettered => String::new(),
                };
                let old = format!("{insert}) SELECT {values}{missing}");
                self.set_aside_query(&old, row, error)
                    .execute(&self.pool)
                    .await?
            }
            done => done?,
        };
        Ok(done.rows_affected() == 1)
    }

    /// An emitted event's insert as a set-aside row: its contents, the reason and its event id
    /// (`$1`-`$7`).
    fn set_aside_query<'q>(
        &self,
        sql: &'q str,
        row: &'q OutboxRow,
        error: &'q str,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let headers = row
            .headers
            .as_ref()
            .filter(|h| serde_json::from_str::<serde_json::Value>(h).is_ok());
        sqlx::query(AssertSqlSafe(sql))
            .bind(&row.topic)
            .bind(&row.key)
            .bind(&row.payload)
            .bind(headers)
            .bind(row.created_at)
            .bind(error)
            .bind(format!(
                "(emitted event {})",
                crate::event::event_id(row.id)
            ))
    }

    /// Mark rows published whose dead-letter copy was delivered, noting why in `last_error`.
    pub async fn mark_dead_lettered(&self, rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        self.record_errors(&self.dead_lettered_sql, rows).await
    }

    /// Record a transient failure on rows that stay pending (visible to operators).
    pub async fn note_retry(&self, failures: &[(i64, String)]) -> Result<(), sqlx::Error> {
        self.record_errors(&self.retry_sql, failures).await
    }

    async fn record_errors(
        &self,
        sql: &Arc<str>,
        failures: &[(i64, String)],
    ) -> Result<(), sqlx::Error> {
        if failures.is_empty() {
            return Ok(());
        }
        let (ids, errors): (Vec<i64>, Vec<String>) = failures.iter().cloned().unzip();
        sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(ids)
            .bind(errors)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn backlog(&self) -> Result<Backlog, sqlx::Error> {
        let (pending, oldest_pending_age, parked): (i64, Option<f64>, i64) =
            sqlx::query_as(AssertSqlSafe(self.backlog_sql.clone()))
                .fetch_one(&self.pool)
                .await?;
        Ok(Backlog {
            pending,
            oldest_pending_age,
            parked,
        })
    }

    /// Delete published rows older than `retention` (in log mode every row created before then
    /// but parked ones), in batches of `batch` rows (each its own short statement,
    /// so no long locks). Returns how many rows were deleted.
    pub async fn cleanup(&self, retention: Duration, batch: i64) -> Result<u64, sqlx::Error> {
        if retention.is_zero() {
            return Ok(0); // 0 keeps published rows forever, everywhere
        }
        let mut total = 0;
        let sql = match self.mode {
            ReadMode::Claim => &self.cleanup_sql,
            // The stream does not need the rows: they go after --retention (parked ones stay).
            ReadMode::Log => &self.cleanup_log_sql,
        };
        loop {
            let done = sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(retention.as_secs_f64())
                .bind(batch)
                .execute(&self.pool)
                .await?;
            total += done.rows_affected();
            if done.rows_affected() < batch as u64 {
                break;
            }
        }
        Ok(total)
    }
}

/// Forward LISTEN/NOTIFY wake-ups into `wake` until cancelled. A lost connection also wakes
/// the relay (notifications sent while disconnected are gone, so it must poll at once).
pub async fn listen(pool: PgPool, channel: String, wake: Arc<Notify>, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "LISTEN connection failed; polling meanwhile");
                tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        if let Err(e) = listener.listen(&channel).await {
            tracing::warn!(error = %e, "LISTEN failed; polling meanwhile");
            tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
            continue;
        }
        tracing::debug!(%channel, "listening for outbox notifications");
        backoff = Duration::from_millis(100);
        wake.notify_one();
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return,
                next = listener.try_recv() => next,
            };
            match next {
                Ok(_) => wake.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                    wake.notify_one();
                    break;
                }
            }
        }
    }
}
