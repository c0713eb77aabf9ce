//! `--read-mode claim`: pending rows by state (`published_at IS NULL AND failed_at IS NULL`)
//! in id order, never by an id cursor, so a row whose transaction commits late with a lower
//! id is simply read on the next pass. Progress marks (or deletes) each delivered row.

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::AssertSqlSafe;

use super::{
    explain_in_index_order, read_in_index_order, BatchLimit, Fence, Ledger, Progress, Reader,
    Recorded,
};
use crate::event::{OutboxRow, ROW_COLUMNS};
use crate::settle::Delivered;
use crate::store::{errors, OutboxStore, PENDING};
use crate::table::ReadMode;

pub struct ClaimReader {
    store: OutboxStore,
    fetch_sql: Arc<str>,
    close_cursor_sql: Arc<str>,
    /// The mean size of the rows last read (0: none yet): a read asks for as many rows as fit
    /// the byte bound at that size, so few rows past the bound are sent and dropped.
    row_bytes: u64,
    /// Exactly-once: the table's `oid/relfilenode` when this leader took over (a position
    /// names the table its ids belong to).
    incarnation: Option<String>,
}

impl ClaimReader {
    /// `block_parked_keys` (`--poison-policy block-key`): skip pending rows whose topic and
    /// key have a parked row.
    pub fn new(store: OutboxStore, block_parked_keys: bool) -> ClaimReader {
        ClaimReader::reading(store, block_parked_keys, "")
    }

    /// Only the pending rows whose writing transaction is visible in `snapshot` (text form of a
    /// `pg_snapshot`), or that have no xid (written before the column existed): log mode's
    /// catch-up of what the stream does not hold.
    pub fn visible_in(store: OutboxStore, snapshot: &str) -> Result<ClaimReader, String> {
        if snapshot.is_empty()
            || !snapshot
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b':' || b == b',')
        {
            return Err(format!("{snapshot:?} is not a pg_snapshot"));
        }
        let only = format!(
            " AND (o.xid IS NULL OR pg_visible_in_snapshot(o.xid, '{snapshot}'::pg_snapshot))"
        );
        Ok(ClaimReader::reading(store, false, &only))
    }

    /// The reader of pending rows that also meet `only` (SQL appended to the condition).
    fn reading(store: OutboxStore, block_parked_keys: bool, only: &str) -> ClaimReader {
        let t = store.table().quoted();
        let lease = store.table().lease_table();
        let blocked = if block_parked_keys {
            format!(
                " AND NOT EXISTS (SELECT 1 FROM {t} AS f WHERE f.failed_at IS NOT NULL AND f.published_at IS NULL AND f.topic = o.topic AND f.key = o.key)"
            )
        } else {
            String::new()
        };
        ClaimReader {
            // No xid: claim mode runs on a table migrated before that column existed.
            fetch_sql: format!(
                "SELECT {ROW_COLUMNS}, NULL::int8 AS xid FROM {t} AS o \
                 WHERE {PENDING}{blocked}{only} AND o.id <> ALL($2) ORDER BY o.id LIMIT $1"
            )
            .into(),
            // Taking over from an earlier release's append mode (removed): rows behind its
            // cursor were published; mark them so they are not published again, and drop the
            // cursor (one statement). The upgrade path for its tables, in claim and log mode.
            close_cursor_sql: format!(
                "WITH c AS (SELECT cursor_xid, cursor_id FROM {lease} WHERE id = 1 AND cursor_xid IS NOT NULL FOR UPDATE), \
                 m AS (UPDATE {t} AS o SET published_at = now() FROM c \
                       WHERE o.published_at IS NULL AND o.failed_at IS NULL \
                       AND (o.xid, o.id) <= (c.cursor_xid, c.cursor_id) RETURNING 1), \
                 x AS (UPDATE {lease} AS l SET cursor_xid = NULL, cursor_id = NULL FROM c WHERE l.id = 1) \
                 SELECT count(*) FROM m"
            )
            .into(),
            store,
            row_bytes: 0,
            incarnation: None,
        }
    }
}

impl ClaimReader {
    /// The batch read's plan as the relay runs it (`EXPLAIN`, same planner settings, no rows
    /// in flight): one index scan of the read index in id order, whatever the statistics.
    pub async fn read_plan(&self, limit: BatchLimit) -> Result<String, sqlx::Error> {
        let explain = sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN {}", self.fetch_sql)))
            .bind(i64::from(limit.rows))
            .bind(Vec::<i64>::new());
        explain_in_index_order(self.store.pool(), explain).await
    }
}

impl Reader for ClaimReader {
    type Position = ();
    type Ledger = OutboxStore;

    fn ledger(&self) -> OutboxStore {
        self.store.clone()
    }

    /// If an earlier release's append mode ran before, mark the rows behind its cursor
    /// published (so they are not published again) and drop the cursor.
    async fn on_new_epoch(&mut self) -> Result<(), sqlx::Error> {
        let closed: Result<i64, _> =
            sqlx::query_scalar(AssertSqlSafe(self.close_cursor_sql.clone()))
                .fetch_one(self.store.pool())
                .await;
        match closed {
            Ok(0) => super::take_over_from_table_mode(&self.store, ReadMode::Claim).await,
            Ok(rows) => {
                tracing::info!(rows, "taking over from append mode (removed): marked the rows behind its cursor published");
                super::take_over_from_table_mode(&self.store, ReadMode::Claim).await
            }
            // An older schema has no cursor columns (and so no append mode ever ran).
            Err(e) if errors::is_undefined_column(&e) => {
                tracing::warn!(error = %e, "run `outbox-relay migrate` to upgrade the table; publishing goes on");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn next_batch(
        &mut self,
        limit: BatchLimit,
        in_flight: &[i64],
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let rows = match self.row_bytes {
            0 => limit.rows,
            size => (limit.bytes / size + 1).min(u64::from(limit.rows)) as u32,
        };
        let read = sqlx::query_as(AssertSqlSafe(self.fetch_sql.clone()))
            .bind(i64::from(rows))
            .bind(in_flight);
        let rows = read_in_index_order(self.store.pool(), read, limit.bytes).await?;
        if !rows.is_empty() {
            self.row_bytes =
                (rows.iter().map(OutboxRow::bytes).sum::<u64>() / rows.len() as u64).max(1);
        }
        Ok(rows)
    }

    /// The ids Kafka has committed and the table may not show yet: this batch's delivered
    /// rows and those still being marked, as inclusive ranges, with the table they are ids of
    /// (`{"table":"<oid>/<relfilenode>","claim":[[first,last],...]}`).
    fn position(&self, progress: &Progress<()>, unrecorded: &[i64]) -> Option<Vec<u8>> {
        let ids = progress.mark.iter().chain(unrecorded).copied();
        Some(claim_position(self.incarnation.as_deref()?, ids))
    }

    /// Mark the rows of Kafka's last committed position published (those the previous leader
    /// committed and did not mark before it stopped).
    /// A position written for another incarnation of the table (dropped and created again, or
    /// truncated: its ids may be reused) is not applied.
    async fn adopt(&mut self, position: Option<&[u8]>) -> Result<(), sqlx::Error> {
        let incarnation: String = sqlx::query_scalar(
            "SELECT oid::text || '/' || relfilenode::text FROM pg_class WHERE oid = $1::regclass",
        )
        .bind(self.store.table().quoted())
        .fetch_one(self.store.pool())
        .await?;
        self.incarnation = Some(incarnation.clone());
        let Some(position) = position else {
            return Ok(());
        };
        let (table, ranges) = claim_ranges(position).ok_or_else(|| {
            sqlx::Error::Protocol(format!(
                "the positions topic holds a position this relay does not understand ({} bytes): \
                 was it written by log mode or another program? Use another --transactional-id",
                position.len()
            ))
        })?;
        // Bounded: the rows of one batch and of the progress writes behind it.
        let rows: i64 = ranges.iter().map(|&[a, b]| (b - a).saturating_add(1)).sum();
        if !(0..=10_000_000).contains(&rows) {
            return Err(sqlx::Error::Protocol(format!(
                "the committed position covers {rows} rows: not a position this relay wrote"
            )));
        }
        if table != incarnation {
            tracing::warn!(
                position_table = table,
                table = incarnation,
                "Kafka's committed position is for an earlier incarnation of the table (truncated or created again): not applied"
            );
            return Ok(());
        }
        let ids: Vec<i64> = ranges.iter().flat_map(|&[a, b]| a..=b).collect();
        let marked = self.store.mark_published(&ids).await?;
        tracing::info!(
            rows = ids.len(),
            marked,
            "took over Kafka's committed position: marked the rows it covers"
        );
        Ok(())
    }

    /// Every delivered row is marked; rows to retry stay pending and are read again.
    fn progress(&mut self, delivered: Delivered, _set_aside: &HashSet<i64>) -> Progress<()> {
        Progress {
            mark: delivered.ids().to_vec(),
            delivered,
            position: None,
        }
    }
}

/// A claim-mode position: `table`'s ids as sorted inclusive ranges.
fn claim_position(table: &str, ids: impl Iterator<Item = i64>) -> Vec<u8> {
    let mut ids: Vec<i64> = ids.collect();
    ids.sort_unstable();
    ids.dedup();
    let mut ranges: Vec<[i64; 2]> = Vec::new();
    for id in ids {
        match ranges.last_mut() {
            Some(r) if r[1] + 1 == id => r[1] = id,
            _ => ranges.push([id, id]),
        }
    }
    serde_json::json!({ "table": table, "claim": ranges })
        .to_string()
        .into_bytes()
}

/// The table and id ranges of a claim-mode position, if `position` is one.
fn claim_ranges(position: &[u8]) -> Option<(String, Vec<[i64; 2]>)> {
    #[derive(serde::Deserialize)]
    struct Claim {
        table: String,
        claim: Vec<[i64; 2]>,
    }
    let c: Claim = serde_json::from_slice(position).ok()?;
    Some((c.table, c.claim))
}

/// Claim mode's ledger: progress is a mark (or delete) per delivered row.
impl Ledger for OutboxStore {
    type Position = ();

    async fn record(
        &self,
        progress: &Progress<()>,
        _fence: &Fence,
    ) -> Result<Recorded, sqlx::Error> {
        self.mark_published(&progress.mark).await?;
        Ok(Recorded::Done)
    }

    async fn park(&self, rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        OutboxStore::park(self, rows).await
    }

    async fn dead_lettered(&self, rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        self.mark_dead_lettered(rows).await
    }

    async fn note_retry(&self, rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        OutboxStore::note_retry(self, rows).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_position_is_the_sorted_id_ranges_of_its_table() {
        let p = claim_position("16384/16390", [7, 3, 4, 5, 9, 4, 10].into_iter());
        assert_eq!(
            String::from_utf8(p.clone()).unwrap(),
            r#"{"claim":[[3,5],[7,7],[9,10]],"table":"16384/16390"}"#
        );
        let (table, ranges) = claim_ranges(&p).unwrap();
        assert_eq!(table, "16384/16390");
        assert_eq!(ranges, vec![[3, 5], [7, 7], [9, 10]]);
        assert!(
            claim_ranges(b"{\"lsn\": 5}").is_none(),
            "another mode's position"
        );
        assert!(claim_ranges(b"garbage").is_none());
    }
}
