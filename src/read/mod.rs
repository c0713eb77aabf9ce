//! The read boundary: where committed events come from, and how progress is made durable.
//!
//! A [`Reader`] yields batches of committed rows in publish order and keeps whatever state its
//! mode needs (log mode's stream and open transactions). After a batch is settled it turns the
//! delivered and set-aside rows into [`Progress`], which its [`Ledger`] writes in the
//! background. [`Delivered`] can only be made by [`crate::settle`], from delivery reports:
//! that is how the types keep the invariant **a row is recorded as published only after its
//! own delivery report**.
//!
//! - [`claim`]: pending rows by state; progress marks each delivered row.
//! - [`log`]: a logical replication slot, in commit order; progress moves the slot's
//!   confirmed position past wholly settled transactions.
//! - [`switch`]: claim mode after log mode (the stream's tail first).

pub mod claim;
pub mod log;
mod pgoutput;
pub mod switch;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use futures::TryStreamExt;
use sqlx::AssertSqlSafe;

use crate::event::OutboxRow;
use crate::settle::Delivered;

pub use claim::ClaimReader;
pub use log::LogReader;
pub use switch::ToClaim;

/// How much one batch may hold: rows, and bytes of keys, payloads and headers as stored (a
/// row larger than `bytes` comes alone). Memory stays bounded at any backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimit {
    pub rows: u32,
    pub bytes: u64,
}

/// Run a batch read with the planner held to the read index, in read order, whatever the
/// table's statistics say. A backlog nobody has analyzed (a bulk load; rows piled up during an
/// outage) makes the planner expect a handful of pending rows and read each batch with a
/// bitmap scan of the whole backlog plus a sort: 160 ms instead of 1 ms per batch at 200,000
/// rows. `SET LOCAL` (not connection options) so it holds behind transaction-pooling proxies
/// and touches no other statement; a custom plan per read lets `<> ALL(in-flight ids)` be
/// hashed.
///
/// The rows stop at `bytes` ([`OutboxRow::bytes`]; the first row always comes, alone if it is
/// larger): the relay takes rows off the stream until the next one would cross the bound and
/// drops the rest unread, so memory stays bounded whatever the rows hold. The bound is kept
/// here, not in SQL: a running sum in the statement (a window) makes the server copy every
/// row, payload included, into the window's buffer.
pub(crate) async fn read_in_index_order(
    pool: &sqlx::PgPool,
    read: sqlx::query::QueryAs<'_, sqlx::Postgres, OutboxRow, sqlx::postgres::PgArguments>,
    bytes: u64,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let mut tx = pool.begin_with(IN_INDEX_ORDER).await?;
    let (mut rows, mut taken) = (Vec::new(), 0);
    {
        let mut stream = read.fetch(&mut *tx);
        while let Some(row) = stream.try_next().await? {
            taken += row.bytes();
            if !rows.is_empty() && taken > bytes {
                break;
            }
            rows.push(row);
        }
    }
    tx.commit().await?;
    Ok(rows)
}

/// `EXPLAIN` of a batch read under the read's planner settings (for tests and operators).
pub(crate) async fn explain_in_index_order(
    pool: &sqlx::PgPool,
    explain: sqlx::query::QueryScalar<'_, sqlx::Postgres, String, sqlx::postgres::PgArguments>,
) -> Result<String, sqlx::Error> {
    let mut tx = pool.begin_with(IN_INDEX_ORDER).await?;
    let lines = explain.fetch_all(&mut *tx).await?;
    tx.commit().await?;
    Ok(lines.join("\n"))
}

/// The batch read's planner settings (see [`read_in_index_order`]). `jit = off`: a node the
/// settings disable still appears where nothing else can produce the read's order, at a cost
/// of 10^10 that crosses every JIT threshold, and the read then compiles itself with LLVM
/// first (250 ms per read instead of 1 ms, seen with the removed append mode's sort). Sent with
/// the `BEGIN`, one round trip.
pub(crate) const IN_INDEX_ORDER: &str = "BEGIN; SET LOCAL enable_seqscan = off; \
     SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off; \
     SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL jit = off";

/// The read mode the last leader published in (`None`: none recorded, a table that only
/// older releases led) and, after a switch to log mode, the position up to which the stream is
/// checked against rows already marked.
pub(crate) async fn last_mode(
    store: &crate::store::OutboxStore,
) -> Result<(Option<String>, Option<u64>), sqlx::Error> {
    let lease = store.table().lease_table();
    let row: Option<(Option<String>, Option<i64>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT read_mode, (log_check_until - '0/0'::pg_lsn)::int8 FROM {lease} WHERE id = 1"
    )))
    .fetch_optional(store.pool())
    .await?;
    let (mode, check) = row.unwrap_or_default();
    Ok((mode, check.map(|c| c as u64)))
}

/// The snapshot `migrate --read-mode log` took when it created the slot (`None`: the slot was
/// made another way).
pub(crate) async fn slot_snapshot(
    store: &crate::store::OutboxStore,
) -> Result<Option<String>, sqlx::Error> {
    let lease = store.table().lease_table();
    let snapshot: Option<Option<String>> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT log_snapshot FROM {lease} WHERE id = 1"
    )))
    .fetch_optional(store.pool())
    .await?;
    Ok(snapshot.flatten())
}

/// A leader in a mode that reads the table takes over: refused while the table was last
/// published in log mode (the stream's tail would be lost or published twice; see the README's
/// "Switching read modes"); otherwise recorded. A table whose lease has no such column yet (an
/// older schema) has never run log mode.
pub(crate) async fn take_over_from_table_mode(
    store: &crate::store::OutboxStore,
    mode: crate::table::ReadMode,
) -> Result<(), sqlx::Error> {
    match last_mode(store).await {
        Ok((Some(last), _)) if last == "log" => Err(sqlx::Error::Configuration(
            format!(
                "{} was last published in --read-mode log; --read-mode {} cannot take over here: \
                 keep log mode, or follow the README (\"Switching read modes\")",
                store.table(),
                mode.as_str()
            )
            .into(),
        )),
        Ok(_) => set_mode(store, mode, None).await,
        Err(e) if crate::store::errors::is_undefined_column(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Record the mode this leader publishes in (and log mode's check position).
pub(crate) async fn set_mode(
    store: &crate::store::OutboxStore,
    mode: crate::table::ReadMode,
    log_check_until: Option<u64>,
) -> Result<(), sqlx::Error> {
    let lease = store.table().lease_table();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {lease} SET read_mode = $1, log_check_until = ('0/0'::pg_lsn + $2::numeric) WHERE id = 1"
    )))
    .bind(mode.as_str())
    .bind(log_check_until.map(|c| c as i64))
    .execute(store.pool())
    .await?;
    Ok(())
}

/// Who may record progress: the lease holder in its epoch (a deposed leader's late write
/// changes nothing where the mode can check it).
#[derive(Debug, Clone)]
pub struct Fence {
    pub holder: Arc<str>,
    pub epoch: i64,
}

/// What a settled batch lets the reader record.
#[derive(Debug)]
pub struct Progress<P> {
    /// Rows with their own delivery report (counted and timed once the write is done).
    pub delivered: Delivered,
    /// Rows to mark published one by one.
    pub mark: Vec<i64>,
    /// The reader's new durable position, if it moved.
    pub position: Option<P>,
}

impl<P> Progress<P> {
    /// Add a later batch's progress, to record both in one write: its marks after these, and
    /// its position (if it moved) as the new one.
    pub fn merge(&mut self, later: Progress<P>) {
        self.delivered.extend(later.delivered);
        self.mark.extend(later.mark);
        if later.position.is_some() {
            self.position = later.position;
        }
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.delivered.is_empty() && self.mark.is_empty() && self.position.is_none()
    }
}

/// How a progress write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Done,
    /// Not written: another replica leads now (it publishes these rows again).
    Fenced,
}

/// Where committed events come from. Implementations hold their mode's state; the loop holds
/// none and checks no mode.
pub trait Reader: Send {
    /// The reader's durable position (an LSN; `()` when progress is per row).
    type Position: Copy + Send + Sync + std::fmt::Debug + 'static;
    /// Writes this reader's progress and settles failed rows.
    type Ledger: Ledger<Position = Self::Position>;

    /// A handle for the background writes.
    fn ledger(&self) -> Self::Ledger;

    /// This replica leads in a new lease epoch: reload durable state (another leader may
    /// have moved it) and drop anything read before.
    fn on_new_epoch(&mut self) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// The next committed rows to publish, in publish order, within `limit`, leaving out
    /// `in_flight` (rows published and not yet settled, or whose progress is being written).
    /// Called again before the earlier batches are settled (up to `--in-flight-batches`).
    fn next_batch(
        &mut self,
        limit: BatchLimit,
        in_flight: &[i64],
    ) -> impl Future<Output = Result<Vec<OutboxRow>, sqlx::Error>> + Send;

    /// Exactly-once: the position to commit in a settled batch's Kafka transaction, from its
    /// progress and the rows whose progress is still being written (`unrecorded`): what a
    /// leader taking over must record before it reads ([`Reader::adopt`]). `None`: this mode
    /// cannot run exactly-once.
    fn position(
        &self,
        _progress: &Progress<Self::Position>,
        _unrecorded: &[i64],
    ) -> Option<Vec<u8>> {
        None
    }

    /// Exactly-once, on taking over: record the last position Kafka committed (`None`: it has
    /// none), so nothing it covers is read (and published) again.
    fn adopt(
        &mut self,
        _position: Option<&[u8]>,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send {
        async { Ok(()) }
    }

    /// The last batch is settled: what may be recorded. Rows neither delivered nor set aside
    /// (to be retried) stay unrecorded and are read again. If this is not called (the batch
    /// was abandoned), the next `next_batch` reads from the last recorded progress again.
    fn progress(
        &mut self,
        delivered: Delivered,
        set_aside: &HashSet<i64>,
    ) -> Progress<Self::Position>;

    /// The loop is stopping: whether the last batch ended inside a unit the reader records
    /// whole (log mode: a transaction), which would be published again after a restart. If
    /// so, from now on batches end where that unit ends, and the loop reads it to its end.
    fn finish_unit(&mut self) -> bool {
        false
    }

    /// The lease could not be checked (the database is unreachable or shutting down): release
    /// what the reader holds on the server. Log mode closes its stream: its walsender would
    /// otherwise wait for a confirmation this relay cannot give without its lease, and a fast
    /// shutdown of the server waits for the walsender. Returns whether what was read is
    /// dropped (the loop then gives up the batches in flight; they are read again).
    fn release_server(&mut self) -> impl Future<Output = bool> + Send {
        async { false }
    }

    /// The loop has stopped and every progress write is done: release what the reader holds
    /// (log mode reports its confirmed position and closes its stream).
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The durable writes of the loop's outcomes. Each write is retried by the caller until it
/// succeeds: giving up would publish the rows again.
pub trait Ledger: Clone + Send + Sync + 'static {
    type Position: Copy + Send + Sync + std::fmt::Debug + 'static;

    /// Record a settled batch's progress (marks, then the position), fenced by the lease.
    fn record(
        &self,
        progress: &Progress<Self::Position>,
        fence: &Fence,
    ) -> impl Future<Output = Result<Recorded, sqlx::Error>> + Send;

    /// Set rows aside as failed, with the reason; they are not read again.
    fn park(&self, rows: &[(i64, String)]) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Rows whose dead-letter copy was delivered: recorded as handled, with why.
    fn dead_lettered(
        &self,
        rows: &[(i64, String)],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Note a transient failure on rows that stay pending (visible to operators).
    fn note_retry(
        &self,
        rows: &[(i64, String)],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}
