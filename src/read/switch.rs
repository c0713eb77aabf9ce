//! Leaving log mode for claim mode with nothing published twice and nothing lost. The lease
//! row records the read mode the last leader published in. (The other way, into log mode, the
//! [`LogReader`] itself first publishes what claim mode, or an earlier release's append mode,
//! left pending.)
//!
//! Log mode marks no row, so claim mode cannot tell by a row's state whether log mode
//! published it. [`ToClaim`] takes a snapshot S and then the WAL position W, and reads the
//! stream's tail up to W (marking each table row it publishes). Every row visible in S was
//! committed before W, so it is published now, by log mode earlier or by the tail: those rows
//! are marked, then the slot is dropped and claim mode reads by state as always.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use sqlx::AssertSqlSafe;
use tokio::sync::Notify;

use super::log::{LogPosition, LogReader, LogSource};
use super::{BatchLimit, ClaimReader, Progress, Reader};
use crate::event::OutboxRow;
use crate::settle::Delivered;
use crate::store::OutboxStore;
use crate::table::ReadMode;

/// Claim mode, after first publishing log mode's tail if log mode led last.
pub struct ToClaim {
    claim: ClaimReader,
    store: OutboxStore,
    /// How to read the slot log mode left (none: taking over from log mode is refused).
    log: Option<(LogSource, Arc<Notify>)>,
    tail: Option<Tail>,
    /// For each batch in flight, whether the tail handed it out.
    from_tail: VecDeque<bool>,
    /// The last settled batch came from the tail (its position is log mode's).
    tail_last: bool,
}

struct Tail {
    reader: LogReader,
    /// Rows visible in it were committed before the tail's end.
    snapshot: String,
}

impl ToClaim {
    pub fn new(
        claim: ClaimReader,
        store: OutboxStore,
        log: Option<(LogSource, Arc<Notify>)>,
    ) -> ToClaim {
        ToClaim {
            claim,
            store,
            log,
            tail: None,
            from_tail: VecDeque::new(),
            tail_last: false,
        }
    }

    /// The tail is published and settled: mark every row committed before it, record claim
    /// mode, drop the slot (it would hold WAL for good).
    async fn finish_tail(&mut self) -> Result<(), sqlx::Error> {
        let Some(mut tail) = self.tail.take() else {
            return Ok(());
        };
        tail.reader.close().await;
        let t = self.store.table().quoted();
        let mark = format!(
            "UPDATE {t} SET published_at = now() WHERE id IN (SELECT id FROM {t} \
             WHERE published_at IS NULL AND failed_at IS NULL AND pg_visible_in_snapshot(xid, $1::pg_snapshot) LIMIT 10000)"
        );
        let mut marked = 0;
        loop {
            let done = sqlx::query(AssertSqlSafe(mark.clone()))
                .bind(&tail.snapshot)
                .execute(self.store.pool())
                .await?;
            marked += done.rows_affected();
            if done.rows_affected() < 10000 {
                break;
            }
        }
        super::set_mode(&self.store, ReadMode::Claim, None).await?;
        let slot = self.log.as_ref().map(|(s, _)| s.slot.clone());
        let dropped = sqlx::query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&slot)
            .execute(self.store.pool())
            .await;
        if let Err(e) = dropped {
            tracing::warn!(error = %e, slot = ?slot, "could not drop log mode's replication slot: drop it by hand, it holds WAL");
        }
        tracing::info!(rows = marked, slot = ?slot,
            "log mode's tail is published: rows it had published marked, slot dropped; claim mode reads on");
        Ok(())
    }
}

impl Reader for ToClaim {
    type Position = ();
    type Ledger = OutboxStore;

    fn ledger(&self) -> OutboxStore {
        self.claim.ledger()
    }

    async fn on_new_epoch(&mut self) -> Result<(), sqlx::Error> {
        if let Some(mut tail) = self.tail.take() {
            tail.reader.close().await;
        }
        self.from_tail.clear();
        let last = match super::last_mode(&self.store).await {
            Ok((last, _)) => last,
            Err(e) if crate::store::errors::is_undefined_column(&e) => None,
            Err(e) => return Err(e),
        };
        let Some((source, wake)) = self.log.clone().filter(|_| last.as_deref() == Some("log"))
        else {
            return self.claim.on_new_epoch().await;
        };
        let found: Option<Option<String>> =
            sqlx::query_scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1")
                .bind(&source.slot)
                .fetch_optional(self.store.pool())
                .await?;
        if found.is_none() || found == Some(Some("lost".into())) {
            return Err(sqlx::Error::Configuration(
                format!(
                    "{} was last published in --read-mode log, and its replication slot {:?} is {}: \
                     pass the --slot log mode used, or follow the README runbook \"a lost slot\"",
                    self.store.table(),
                    source.slot,
                    if found.is_none() { "missing" } else { "lost" }
                )
                .into(),
            ));
        }
        let publication: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
                .bind(&source.publication)
                .fetch_one(self.store.pool())
                .await?;
        if !publication {
            return Err(sqlx::Error::Configuration(
                format!(
                    "{} was last published in --read-mode log, and its publication {:?} does not exist: \
                     pass the --publication log mode used",
                    self.store.table(),
                    source.publication
                )
                .into(),
            ));
        }
        // The snapshot is the statement's, taken before the position is read.
        let (snapshot, end): (String, i64) = sqlx::query_as(
            "SELECT pg_current_snapshot()::text, (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8",
        )
        .fetch_one(self.store.pool())
        .await?;
        let mut reader = LogReader::new(self.store.clone(), source, wake).until(end as u64);
        reader.on_new_epoch().await?;
        tracing::info!(
            "claim mode after log mode: publishing the stream's tail from the slot first"
        );
        self.tail = Some(Tail { reader, snapshot });
        Ok(())
    }

    async fn next_batch(
        &mut self,
        limit: BatchLimit,
        in_flight: &[i64],
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        if let Some(tail) = self.tail.as_mut() {
            if !(tail.reader.drained() && in_flight.is_empty()) {
                let rows = tail.reader.next_batch(limit, in_flight).await?;
                if !rows.is_empty() {
                    self.from_tail.push_back(true);
                }
                return Ok(rows);
            }
            self.finish_tail().await?;
        }
        let rows = self.claim.next_batch(limit, in_flight).await?;
        if !rows.is_empty() {
            self.from_tail.push_back(false);
        }
        Ok(rows)
    }

    /// Claim mode's position, or log mode's after a batch of the tail (which also has emitted
    /// events: they have no row to mark).
    fn position(&self, progress: &Progress<()>, unrecorded: &[i64]) -> Option<Vec<u8>> {
        match self.tail.as_ref() {
            Some(tail) if self.tail_last => {
                let p = Progress {
                    delivered: Delivered::default(),
                    mark: Vec::new(),
                    position: None,
                };
                tail.reader.position(&p, unrecorded)
            }
            _ => self.claim.position(progress, unrecorded),
        }
    }

    /// Kafka's position: log mode's goes to the tail. Without a tail, log mode's tail was
    /// published and its rows marked before claim mode was recorded: nothing to do.
    async fn adopt(&mut self, position: Option<&[u8]>) -> Result<(), sqlx::Error> {
        if position.is_none_or(|p| LogPosition::parse(p).is_none()) {
            return self.claim.adopt(position).await;
        }
        // Claim mode learns the table's incarnation for its own positions either way.
        self.claim.adopt(None).await?;
        match self.tail.as_mut() {
            Some(tail) => tail.reader.adopt(position).await,
            None => {
                tracing::info!("Kafka's committed position is log mode's tail, published and marked before claim mode took over");
                Ok(())
            }
        }
    }

    /// A tail batch settles in the stream's transactions, and its delivered rows are marked
    /// (so neither claim mode nor a restarted tail publishes them again).
    fn progress(&mut self, delivered: Delivered, set_aside: &HashSet<i64>) -> Progress<()> {
        let tail = self.from_tail.pop_front() == Some(true);
        self.tail_last = tail;
        match self.tail.as_mut() {
            Some(t) if tail => {
                let p = t.reader.progress(delivered, set_aside);
                Progress {
                    mark: p.delivered.ids().to_vec(),
                    delivered: p.delivered,
                    position: None,
                }
            }
            _ => self.claim.progress(delivered, set_aside),
        }
    }

    async fn close(&mut self) {
        if let Some(tail) = self.tail.as_mut() {
            tail.reader.close().await;
        }
    }
}
