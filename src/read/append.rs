//! `--read-mode append`: a cursor on (writing transaction's xid8, row id), read only below the
//! oldest transaction still running (`pg_snapshot_xmin`): every transaction there has ended,
//! so no row can still appear behind the cursor. No row is written per event; the cursor in
//! the lease row moves once per batch, only by the current leader and only forward.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::AssertSqlSafe;
use tokio::task::JoinHandle;

use super::{
    bytes_bounded, read_in_index_order, BatchLimit, Fence, Ledger, Progress, Reader, Recorded,
    ROW_BYTES,
};
use crate::event::OutboxRow;
use crate::settle::Delivered;
use crate::store::{OutboxStore, PENDING};

/// A position in append mode's read order: (writing transaction's xid8, row id). Rows at or
/// before it are published; `(0, 0)` is before every row.
pub type Cursor = (i64, i64);

pub struct AppendReader {
    store: OutboxStore,
    fetch_sql: Arc<str>,
    load_cursor_sql: Arc<str>,
    ledger: AppendLedger,
    /// The last row published or set aside in read order (ahead of the durable cursor by at
    /// most the batch whose write is in flight).
    cursor: Cursor,
    /// The current batch's rows and read positions, in read order.
    batch: Vec<(i64, Cursor)>,
    /// After a full batch: the next one, read while this one is published.
    read_ahead: Option<JoinHandle<Result<Vec<OutboxRow>, sqlx::Error>>>,
    /// The read-ahead follows the cursor (the whole last batch was passed).
    ahead_valid: bool,
}

/// Append mode's ledger: marks (rows delivered past one that must be retried), then the cursor.
#[derive(Clone)]
pub struct AppendLedger {
    store: OutboxStore,
    save_cursor_sql: Arc<str>,
}

impl AppendReader {
    pub fn new(store: OutboxStore) -> AppendReader {
        let t = store.table().quoted();
        let lease = store.table().lease_table();
        AppendReader {
            // Below the horizon every writing transaction has ended: nothing can still
            // appear behind the cursor. $3, $4: the cursor.
            fetch_sql: bytes_bounded(
                &format!(
                    "SELECT o.*, {ROW_BYTES} AS row_bytes, o.xid::text::int8 AS read_xid FROM {t} AS o \
                     WHERE (o.xid, o.id) > ($3::int8::text::xid8, $4) \
                     AND o.xid < pg_snapshot_xmin(pg_current_snapshot()) AND {PENDING} \
                     AND o.id <> ALL($2) ORDER BY o.xid, o.id LIMIT $1"
                ),
                "xid, id",
                "$5",
            )
            .into(),
            load_cursor_sql: format!(
                "SELECT cursor_xid::text::int8, cursor_id FROM {lease} WHERE id = 1 AND cursor_xid IS NOT NULL"
            )
            .into(),
            ledger: AppendLedger {
                // Only the current leader (holder and epoch) moves the cursor, and only forward.
                save_cursor_sql: format!(
                    "UPDATE {lease} SET cursor_xid = $3::int8::text::xid8, cursor_id = $4 \
                     WHERE id = 1 AND holder = $1 AND epoch = $2 \
                     AND (cursor_xid IS NULL OR (cursor_xid, cursor_id) < ($3::int8::text::xid8, $4))"
                )
                .into(),
                store: store.clone(),
            },
            store,
            cursor: (0, 0),
            batch: Vec::new(),
            read_ahead: None,
            ahead_valid: false,
        }
    }

    fn fetch(
        &self,
        limit: BatchLimit,
        in_flight: &[i64],
        after: Cursor,
    ) -> impl std::future::Future<Output = Result<Vec<OutboxRow>, sqlx::Error>> + Send + 'static
    {
        let (pool, sql, exclude) = (
            self.store.pool().clone(),
            self.fetch_sql.clone(),
            in_flight.to_vec(),
        );
        async move {
            let read = sqlx::query_as(AssertSqlSafe(sql))
                .bind(i64::from(limit.rows))
                .bind(exclude)
                .bind(after.0)
                .bind(after.1)
                .bind(limit.bytes as i64);
            read_in_index_order(&pool, read).await
        }
    }

    /// The batch read's plan as the relay runs it (`EXPLAIN`, same planner settings, from the
    /// start, nothing in flight).
    pub async fn read_plan(&self, limit: BatchLimit) -> Result<String, sqlx::Error> {
        let explain = sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN {}", self.fetch_sql)))
            .bind(i64::from(limit.rows))
            .bind(Vec::<i64>::new())
            .bind(0i64)
            .bind(0i64)
            .bind(limit.bytes as i64);
        super::explain_in_index_order(self.store.pool(), explain).await
    }

    fn drop_read_ahead(&mut self) {
        if let Some(ahead) = self.read_ahead.take() {
            ahead.abort();
        }
        self.ahead_valid = false;
    }
}

impl Reader for AppendReader {
    type Position = Cursor;
    type Ledger = AppendLedger;

    /// The cursor and read-ahead follow the last settled batch: one batch at a time.
    fn reads_past_unsettled(&self) -> bool {
        false
    }

    fn ledger(&self) -> AppendLedger {
        self.ledger.clone()
    }

    /// Resume from the durable cursor (another leader may have moved it).
    async fn on_new_epoch(&mut self) -> Result<(), sqlx::Error> {
        super::take_over_from_table_mode(&self.store, crate::table::ReadMode::Append).await?;
        self.drop_read_ahead();
        self.cursor = sqlx::query_as(AssertSqlSafe(self.load_cursor_sql.clone()))
            .fetch_optional(self.store.pool())
            .await?
            .unwrap_or((0, 0));
        tracing::info!(
            cursor_xid = self.cursor.0,
            cursor_id = self.cursor.1,
            "append mode: reading after the cursor"
        );
        Ok(())
    }

    async fn next_batch(
        &mut self,
        limit: BatchLimit,
        in_flight: &[i64],
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let ahead = if self.ahead_valid {
            self.read_ahead.take()
        } else {
            None
        };
        self.drop_read_ahead();
        let rows = match ahead {
            Some(ahead) => match ahead.await {
                Ok(Ok(rows)) => rows,
                _ => self.fetch(limit, in_flight, self.cursor).await?,
            },
            None => self.fetch(limit, in_flight, self.cursor).await?,
        };
        self.batch = rows
            .iter()
            .map(|r| (r.id, (r.xid.unwrap_or(0), r.id)))
            .collect();
        // A full batch: read the next one while this one is published (kept only if the
        // cursor passes the whole batch).
        if let (true, Some(&(_, end))) = (rows.len() == limit.rows as usize, self.batch.last()) {
            self.read_ahead = Some(tokio::spawn(self.fetch(limit, in_flight, end)));
        }
        Ok(rows)
    }

    fn progress(&mut self, delivered: Delivered, set_aside: &HashSet<i64>) -> Progress<Cursor> {
        let progress = advance(&self.batch, delivered, set_aside);
        if let Some(cursor) = progress.position {
            self.cursor = cursor;
        }
        self.ahead_valid = progress.position.is_some()
            && progress.position == self.batch.last().map(|(_, at)| *at);
        progress
    }
}

/// The cursor moves past the longest prefix of the batch (in read order) whose rows are all
/// delivered or set aside; delivered rows after it are marked individually so the retry that
/// reads them again skips them. `batch`: each row's id and read position.
pub fn advance(
    batch: &[(i64, Cursor)],
    delivered: Delivered,
    set_aside: &HashSet<i64>,
) -> Progress<Cursor> {
    let settled: HashSet<i64> = delivered.ids().iter().chain(set_aside).copied().collect();
    let prefix = batch
        .iter()
        .take_while(|(id, _)| settled.contains(id))
        .count();
    let beyond: HashSet<i64> = batch[prefix..].iter().map(|(id, _)| *id).collect();
    Progress {
        mark: delivered
            .ids()
            .iter()
            .copied()
            .filter(|id| beyond.contains(id))
            .collect(),
        delivered,
        position: prefix.checked_sub(1).map(|last| batch[last].1),
    }
}

impl Ledger for AppendLedger {
    type Position = Cursor;

    async fn record(
        &self,
        progress: &Progress<Cursor>,
        fence: &Fence,
    ) -> Result<Recorded, sqlx::Error> {
        self.store.mark_published(&progress.mark).await?;
        let Some(cursor) = progress.position else {
            return Ok(Recorded::Done);
        };
        let moved = sqlx::query(AssertSqlSafe(self.save_cursor_sql.clone()))
            .bind(&*fence.holder)
            .bind(fence.epoch)
            .bind(cursor.0)
            .bind(cursor.1)
            .execute(self.store.pool())
            .await?;
        Ok(if moved.rows_affected() == 1 {
            Recorded::Done
        } else {
            Recorded::Fenced
        })
    }

    async fn park(&self, rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        self.store.park(rows).await
    }

    async fn dead_lettered(&self, rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        self.store.mark_dead_lettered(rows).await
    }

    async fn note_retry(&self, rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        self.store.note_retry(rows).await
    }
}

/// Append mode warns when committed rows have waited this long (a long transaction holds the
/// horizon back, or the relay is slow).
pub const HORIZON_WARN_AFTER: Duration = Duration::from_secs(10);

/// Append mode reads only below the oldest running transaction: name it when rows wait.
/// It may be any session in the cluster, so only who and how long are logged (pid, database,
/// user, age, state), never its query text: that can hold anything, passwords included
/// (`ALTER ROLE ... PASSWORD '...'`).
pub async fn warn_about_horizon(store: &OutboxStore) {
    type Oldest = (i32, Option<f64>, String, String, String);
    let oldest: Result<Option<Oldest>, _> = sqlx::query_as(
        "SELECT pid, extract(epoch FROM clock_timestamp() - xact_start)::float8, coalesce(state, ''), \
         coalesce(datname::text, ''), coalesce(usename::text, '') FROM pg_stat_activity \
         WHERE backend_xid IS NOT NULL ORDER BY age(backend_xid) DESC LIMIT 1",
    )
    .fetch_optional(store.pool())
    .await;
    match oldest {
        Ok(Some((pid, open_for, state, database, user))) if open_for.unwrap_or(0.0) >= 5.0 => {
            tracing::warn!(pid, database = %database, user = %user, open_seconds = open_for.unwrap_or(0.0).round(), state = %state,
                "publishing waits for a transaction to end: --read-mode append reads only rows older than the \
                 oldest running write transaction in the cluster; end that transaction (pg_terminate_backend) \
                 or run the relay with --read-mode claim")
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "could not read pg_stat_activity"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Message;

    /// Rows 1..n delivered, as only `settle` can say.
    fn delivered(ids: &[i64]) -> Delivered {
        let messages: Vec<Message> = ids
            .iter()
            .map(|&id| Message {
                id,
                topic: "t".into(),
                key: None,
                payload: None,
                headers: vec![],
                created_at: chrono::Utc::now(),
            })
            .collect();
        crate::settle::settle(&messages, ids.iter().map(|_| Ok(())).collect(), false).delivered
    }

    #[test]
    fn append_cursor_stops_before_the_first_row_to_retry() {
        let pos = |ids: &[i64]| -> Vec<(i64, Cursor)> {
            ids.iter().map(|&id| (id, (100 + id, id))).collect()
        };
        let none = HashSet::new();
        let all = advance(&pos(&[3, 1, 2]), delivered(&[3, 1, 2]), &none);
        assert_eq!(all.position, Some((102, 2)), "the last row in read order");
        assert!(
            all.mark.is_empty(),
            "no per-row write when all went through"
        );

        // 2 failed transiently: the cursor stops at 1; 4 was delivered after it and is marked
        // so the retry that reads 2 again does not publish 4 twice; 5 (retry) stays pending.
        let parked: HashSet<i64> = [3].into();
        let p = advance(&pos(&[1, 2, 3, 4, 5]), delivered(&[1, 4]), &parked);
        assert_eq!(p.position, Some((101, 1)));
        assert_eq!(p.mark, vec![4]);
        assert_eq!(p.delivered.ids(), &[1, 4]);

        let stuck = advance(&pos(&[1, 2]), delivered(&[2]), &none);
        assert_eq!(stuck.position, None, "the head must be retried: no move");
        assert_eq!(stuck.mark, vec![2]);

        let poison_only = advance(&pos(&[7]), delivered(&[]), &[7].into());
        assert_eq!(
            poison_only.position,
            Some((107, 7)),
            "a parked row is passed"
        );
    }
}
