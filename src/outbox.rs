//! The outbox store: every SQL statement the relay runs against PostgreSQL.
//!
//! `--read-mode claim` reads rows by state (`published_at IS NULL AND failed_at IS NULL`),
//! never by an id cursor, so a row whose transaction commits late with a lower id is simply
//! read on the next pass. `--read-mode append` reads by a cursor on (writing transaction's
//! xid8, id), only below the oldest transaction still running (`pg_snapshot_xmin`): every
//! transaction there has ended, so no row can still appear behind the cursor. No statement
//! holds a transaction or a row lock while Kafka is awaited: each read, mark, park and cursor
//! write is a single autocommit statement.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{OnPublish, ReadMode};
use crate::event::OutboxRow;
use crate::replica::Heartbeat;
use crate::table::TableName;

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
pub async fn migrate(
    conn: &mut PgConnection,
    table: &TableName,
    notify_trigger: bool,
    mode: ReadMode,
) -> Result<(), sqlx::Error> {
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
    tx.commit().await
}

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
    fetch_sql: Arc<str>,
    load_cursor_sql: Arc<str>,
    save_cursor_sql: Arc<str>,
    close_cursor_sql: Arc<str>,
    cleanup_passed_sql: Arc<str>,
    mark_sql: Arc<str>,
    park_sql: Arc<str>,
    retry_sql: Arc<str>,
    dead_lettered_sql: Arc<str>,
    backlog_sql: Arc<str>,
    cleanup_sql: Arc<str>,
}

const PENDING: &str = "published_at IS NULL AND failed_at IS NULL";

/// (pid, seconds open, state, start of its query) of a running transaction.
pub type OldestTransaction = (i32, Option<f64>, String, String);

/// A position in append mode's read order: (writing transaction's xid8, row id). Rows at or
/// before it are published; `(0, 0)` is before every row.
pub type Cursor = (i64, i64);

/// Rows the relay has yet to publish, in either read mode: pending by state and not behind
/// append mode's cursor (NULL in claim mode). The table's alias must be `o`.
pub fn unpublished(table: &TableName) -> String {
    format!(
        "o.published_at IS NULL AND o.failed_at IS NULL \
         AND NOT coalesce((o.xid, o.id) <= (SELECT cursor_xid, cursor_id FROM {} WHERE id = 1), false)",
        table.lease_table()
    )
}

impl OutboxStore {
    /// `block_parked_keys`: skip pending rows whose topic and key have a parked row.
    /// `on_publish`: whether a delivered row is marked or deleted (claim mode).
    pub fn new(
        pool: PgPool,
        table: TableName,
        block_parked_keys: bool,
        on_publish: OnPublish,
        mode: ReadMode,
    ) -> Self {
        let t = table.quoted();
        let lease = table.lease_table();
        // The cursor as two initplans, so the row comparison is an index condition.
        let cursor = format!(
            "((SELECT cursor_xid FROM {lease} WHERE id = 1), (SELECT cursor_id FROM {lease} WHERE id = 1))"
        );
        let after_cursor = format!(
            "(o.xid, o.id) > (coalesce((SELECT cursor_xid FROM {lease} WHERE id = 1), '0'::xid8), \
             coalesce((SELECT cursor_id FROM {lease} WHERE id = 1), 0))"
        );
        // Claim mode never needs the xid (and so runs on a table migrated before it existed).
        let columns = match mode {
            ReadMode::Claim => "id, topic, key, payload, headers, created_at, NULL::int8 AS xid",
            ReadMode::Append => {
                "id, topic, key, payload, headers, created_at, xid::text::int8 AS xid"
            }
        };
        let blocked = if block_parked_keys {
            format!(
                " AND NOT EXISTS (SELECT 1 FROM {t} AS f WHERE f.failed_at IS NOT NULL AND f.topic = o.topic AND f.key = o.key)"
            )
        } else {
            String::new()
        };
        let errors = "unnest($1::bigint[], $2::text[]) AS f(id, error)";
        OutboxStore {
            fetch_sql: match mode {
                ReadMode::Claim => format!(
                    "SELECT {columns} FROM {t} AS o WHERE {PENDING}{blocked} \
                     AND o.id <> ALL($2) ORDER BY id LIMIT $1"
                ),
                // Below the horizon every writing transaction has ended: nothing can still
                // appear behind the cursor. $3, $4: the cursor.
                ReadMode::Append => format!(
                    "SELECT {columns} FROM {t} AS o WHERE (o.xid, o.id) > ($3::int8::text::xid8, $4) \
                     AND o.xid < pg_snapshot_xmin(pg_current_snapshot()) AND {PENDING} \
                     AND o.id <> ALL($2) ORDER BY o.xid, o.id LIMIT $1"
                ),
            }
            .into(),
            load_cursor_sql: format!(
                "SELECT cursor_xid::text::int8, cursor_id FROM {lease} WHERE id = 1 AND cursor_xid IS NOT NULL"
            )
            .into(),
            // Only the current leader (holder and epoch) moves the cursor, and only forward.
            save_cursor_sql: format!(
                "UPDATE {lease} SET cursor_xid = $3::int8::text::xid8, cursor_id = $4 \
                 WHERE id = 1 AND holder = $1 AND epoch = $2 \
                 AND (cursor_xid IS NULL OR (cursor_xid, cursor_id) < ($3::int8::text::xid8, $4))"
            )
            .into(),
            // Leaving append mode: rows behind the cursor were published; mark them so claim
            // mode does not publish them again, and drop the cursor (one statement).
            close_cursor_sql: format!(
                "WITH c AS (SELECT cursor_xid, cursor_id FROM {lease} WHERE id = 1 AND cursor_xid IS NOT NULL FOR UPDATE), \
                 m AS (UPDATE {t} AS o SET published_at = now() FROM c \
                       WHERE o.published_at IS NULL AND o.failed_at IS NULL \
                       AND (o.xid, o.id) <= (c.cursor_xid, c.cursor_id) RETURNING 1), \
                 x AS (UPDATE {lease} AS l SET cursor_xid = NULL, cursor_id = NULL FROM c WHERE l.id = 1) \
                 SELECT count(*) FROM m"
            )
            .into(),
            cleanup_passed_sql: format!(
                "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} AS o WHERE {PENDING} AND (o.xid, o.id) <= {cursor} \
                 AND o.created_at < now() - make_interval(secs => $1) ORDER BY o.xid, o.id LIMIT $2)"
            )
            .into(),
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
                ReadMode::Claim => format!(
                    "SELECT (SELECT count(*) FROM {t} WHERE {PENDING}), \
                     (SELECT extract(epoch FROM now() - created_at)::float8 FROM {t} WHERE {PENDING} ORDER BY id LIMIT 1), \
                     (SELECT count(*) FROM {t} WHERE failed_at IS NOT NULL)"
                ),
                ReadMode::Append => format!(
                    "SELECT (SELECT count(*) FROM {t} AS o WHERE {PENDING} AND {after_cursor}), \
                     (SELECT extract(epoch FROM now() - created_at)::float8 FROM {t} AS o WHERE {PENDING} AND {after_cursor} \
                      ORDER BY o.xid, o.id LIMIT 1), \
                     (SELECT count(*) FROM {t} WHERE failed_at IS NOT NULL)"
                ),
            }
            .into(),
            cleanup_sql: format!(
                "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE published_at < now() - make_interval(secs => $1) \
                 ORDER BY published_at LIMIT $2)"
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

    /// The next committed, pending rows in read order, leaving out `exclude` (delivered rows
    /// whose mark is still being written). Append mode reads after `cursor` only.
    pub async fn fetch_pending(
        &self,
        limit: u32,
        exclude: &[i64],
        cursor: Cursor,
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let query = sqlx::query_as(AssertSqlSafe(self.fetch_sql.clone()))
            .bind(i64::from(limit))
            .bind(exclude);
        match self.mode {
            ReadMode::Claim => query,
            ReadMode::Append => query.bind(cursor.0).bind(cursor.1),
        }
        .fetch_all(&self.pool)
        .await
    }

    /// Append mode's durable cursor (`None`: start before every row).
    pub async fn load_cursor(&self) -> Result<Option<Cursor>, sqlx::Error> {
        sqlx::query_as(AssertSqlSafe(self.load_cursor_sql.clone()))
            .fetch_optional(&self.pool)
            .await
    }

    /// Move the durable cursor forward, only while `holder` leads in `epoch` (a deposed
    /// leader's late write changes nothing). Returns false when it was not moved.
    pub async fn save_cursor(
        &self,
        holder: &str,
        epoch: i64,
        cursor: Cursor,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(self.save_cursor_sql.clone()))
            .bind(holder)
            .bind(epoch)
            .bind(cursor.0)
            .bind(cursor.1)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Claim mode taking over from append mode: mark the rows behind the cursor published and
    /// drop the cursor. Returns how many rows were marked (0 when there was no cursor).
    pub async fn close_cursor(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(AssertSqlSafe(self.close_cursor_sql.clone()))
            .fetch_one(&self.pool)
            .await
    }

    /// The oldest transaction still running with an xid (what holds append mode's horizon
    /// back), as far as this role may see: (pid, seconds open, state, start of its query).
    pub async fn oldest_transaction(&self) -> Result<Option<OldestTransaction>, sqlx::Error> {
        sqlx::query_as(
            "SELECT pid, extract(epoch FROM clock_timestamp() - xact_start)::float8, coalesce(state, ''), \
             left(coalesce(query, ''), 120) FROM pg_stat_activity WHERE backend_xid IS NOT NULL \
             ORDER BY age(backend_xid) DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
    }

    /// Whether the index this read mode needs exists (without it every read scans the table).
    pub async fn has_read_index(&self) -> Result<bool, sqlx::Error> {
        let suffix = match self.mode {
            ReadMode::Claim => "pending_idx",
            ReadMode::Append => "xid_idx",
        };
        let index = format!(
            "{}.{}",
            crate::table::quote_ident(self.table.schema()),
            crate::table::quote_ident(&format!("{}_{suffix}", self.table.table()))
        );
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(index)
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

    /// Delete published rows older than `retention` (in append mode also the rows behind the
    /// cursor created before then), in batches of `batch` rows (each its own short statement,
    /// so no long locks). Returns how many rows were deleted.
    pub async fn cleanup(&self, retention: Duration, batch: i64) -> Result<u64, sqlx::Error> {
        let mut total = 0;
        let statements = match self.mode {
            ReadMode::Claim => vec![&self.cleanup_sql],
            ReadMode::Append => vec![&self.cleanup_sql, &self.cleanup_passed_sql],
        };
        for sql in statements {
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

/// Single-leader election with a time-bounded lease in `<table>_lease`: only the holder
/// publishes, so per-key order holds when several replicas run. The leader renews the lease
/// (one small UPDATE) once a third of it has passed; a replica that stops renewing (killed,
/// paused, partitioned) loses it after `duration`, and a standby takes over. All lease times
/// are the database's clock; the holder's own view of validity uses its monotonic clock, which
/// keeps running while the process is paused, so a resumed zombie knows it must re-check.
pub struct Lease {
    pool: PgPool,
    acquire_sql: Arc<str>,
    release_sql: Arc<str>,
    wake_sql: Arc<str>,
    holder: String,
    duration: Duration,
    /// When the last successful acquire/renew started (the lease is valid for `duration` after).
    renewed_at: Option<std::time::Instant>,
    epoch: i64,
    /// Told the outcome of every lease statement (the replicas table's heartbeat).
    heartbeat: Option<Heartbeat>,
}

impl Lease {
    /// `holder`: this process's replica id ([`crate::replica::Identity`]).
    pub fn new(pool: PgPool, table: &TableName, duration: Duration, holder: String) -> Self {
        let lease = table.lease_table();
        Lease {
            acquire_sql: format!(
                "INSERT INTO {lease} AS l (id, holder, epoch, expires_at) \
                 VALUES (1, $1, 1, clock_timestamp() + make_interval(secs => $2)) \
                 ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, \
                 epoch = l.epoch + (l.holder <> EXCLUDED.holder)::int, expires_at = EXCLUDED.expires_at \
                 WHERE l.holder = EXCLUDED.holder OR l.expires_at < clock_timestamp() \
                 RETURNING epoch"
            )
            .into(),
            release_sql: format!(
                "UPDATE {lease} SET expires_at = clock_timestamp() - interval '1 second' WHERE holder = $1"
            )
            .into(),
            wake_sql: format!(
                "UPDATE {lease} SET wake_wanted = $2 WHERE holder = $1 AND wake_wanted <> $2"
            )
            .into(),
            holder,
            pool,
            duration,
            renewed_at: None,
            epoch: 0,
            heartbeat: None,
        }
    }

    /// Beat `heartbeat` on this lease's cadence (renewals while leading, attempts while standing by).
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    /// This replica's id, as written in the lease row.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The epoch of the current leadership (valid while `ensure` returns true).
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// How often a leader should call `ensure` to keep the lease while it is busy.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// True while this process holds the lease; renews or tries to take it as needed.
    pub async fn ensure(&mut self) -> Result<bool, sqlx::Error> {
        let now = std::time::Instant::now();
        if let Some(at) = self.renewed_at {
            if now < at + self.duration / 3 {
                return Ok(true);
            }
            if now >= at + self.duration {
                tracing::warn!(
                    epoch = self.epoch,
                    "lease expired before it was renewed (paused or slow?); re-checking"
                );
            }
        }
        let epoch: Option<i64> = match sqlx::query_scalar(AssertSqlSafe(self.acquire_sql.clone()))
            .bind(&self.holder)
            .bind(self.duration.as_secs_f64())
            .fetch_optional(&self.pool)
            .await
        {
            Ok(epoch) => epoch,
            Err(e) => {
                if self.renewed_at.is_some_and(|at| now >= at + self.duration) {
                    self.lost();
                }
                return Err(e);
            }
        };
        if let Some(heartbeat) = &mut self.heartbeat {
            heartbeat.report(epoch, now);
        }
        match epoch {
            Some(epoch) => {
                if self.renewed_at.is_none() || epoch != self.epoch {
                    tracing::info!(epoch, holder = %self.holder, "leader: this replica now publishes");
                }
                self.epoch = epoch;
                self.renewed_at = Some(now);
                Ok(true)
            }
            None => {
                self.lost();
                Ok(false)
            }
        }
    }

    fn lost(&mut self) {
        if self.renewed_at.take().is_some() {
            tracing::warn!(
                epoch = self.epoch,
                "leadership lost: another replica holds the lease; standing by"
            );
        }
    }

    /// Ask writers' insert trigger to NOTIFY (the leader is idle) or not (it is busy polling).
    pub async fn want_wakeups(&self, wanted: bool) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.wake_sql.clone()))
            .bind(&self.holder)
            .bind(wanted)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Give the lease up at once (graceful shutdown), so a standby takes over without waiting.
    pub async fn release(&mut self) {
        if self.renewed_at.take().is_none() {
            return;
        }
        match sqlx::query(AssertSqlSafe(self.release_sql.clone()))
            .bind(&self.holder)
            .execute(&self.pool)
            .await
        {
            Ok(_) => tracing::info!("lease released"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the lease; a standby takes over when it expires")
            }
        }
    }
}

/// An operator hint for a database error: what is probably wrong and how to fix it.
pub fn hint(e: &sqlx::Error, table: &TableName) -> String {
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .unwrap_or_default();
    match (code.as_ref(), e) {
        ("42P01", _) => format!(
            "table {table} or its {t}_lease or {t}_replicas table does not exist: run `outbox-relay migrate` (or apply migrations/)",
            t = table.table()
        ),
        ("42703", _) => format!("table {table} lacks a relay column: run `outbox-relay migrate` to upgrade it"),
        ("42501", _) => format!(
            "the role lacks privileges: GRANT SELECT, UPDATE, DELETE ON {table}; GRANT SELECT, INSERT, UPDATE ON {}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON {}",
            table.lease_table(),
            table.replicas_table()
        ),
        ("28P01", _) | ("28000", _) => "authentication failed: check the user and password".into(),
        ("3D000", _) => "the database in --database-url does not exist".into(),
        (_, sqlx::Error::Tls(_)) => "TLS handshake failed: check sslmode and sslrootcert in --database-url".into(),
        _ if is_tls_failure(e) => "the server's TLS certificate was rejected: check sslrootcert (the CA) and that \
            the host in --database-url matches the certificate"
            .into(),
        (_, sqlx::Error::Io(_)) | (_, sqlx::Error::PoolTimedOut) => {
            "cannot reach PostgreSQL: check the host and port in --database-url and that the server is up".into()
        }
        _ => "retrying".into(),
    }
}

/// The table or lease row lacks a column (an older schema: `migrate` adds it).
pub fn is_undefined_column(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42703")
}

/// sqlx reports rustls certificate failures as I/O errors of kind `InvalidData`.
pub fn is_tls_failure(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::InvalidData || io.to_string().contains("certificate")
        }
        _ => false,
    }
}
