//! Durable writes from the loop: settled batches' progress, written in the background by one
//! writer in batch order (consecutive batches waiting together go in one write), and the
//! retrying writer every ledger write goes through.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::read::{Fence, Ledger, Progress, Recorded};
use crate::store::errors;
use crate::table::TableName;
use crate::telemetry::{Health, Metrics};

/// One settled batch's progress, and its delivered rows' creation times (for the latency
/// metric, observed once the write is durable).
struct Write<P> {
    seq: u64,
    progress: Progress<P>,
    fence: Fence,
    created: Vec<DateTime<Utc>>,
}

/// Progress writes in flight, in batch order. The rows they record still look pending, so
/// reads leave them out ([`Marks::ids`]).
pub struct Marks<P> {
    queue: mpsc::UnboundedSender<Write<P>>,
    /// The last batch whose write has ended (durable, fenced, or given up at shutdown).
    done: watch::Receiver<u64>,
    pending: VecDeque<(u64, Vec<i64>)>,
    next: u64,
}

impl<P: Copy + Send + Sync + std::fmt::Debug + 'static> Marks<P> {
    /// Start the writer for `ledger`; it ends when `self` is dropped and its queue is written.
    pub fn start<L: Ledger<Position = P>>(
        writer: Writer<L>,
        metrics: Metrics,
        cancel: CancellationToken,
    ) -> Marks<P> {
        let (queue, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = watch::channel(0);
        tokio::spawn(write_in_order(rx, done_tx, writer, metrics, cancel));
        Marks {
            queue,
            done,
            pending: VecDeque::new(),
            next: 1,
        }
    }

    /// Queue a settled batch's progress (written after every batch queued before it).
    pub fn push(&mut self, progress: Progress<P>, fence: Fence, created: Vec<DateTime<Utc>>) {
        if progress.is_empty() {
            return;
        }
        let seq = self.next;
        self.next += 1;
        self.pending.push_back((seq, progress.mark.clone()));
        let write = Write {
            seq,
            progress,
            fence,
            created,
        };
        if self.queue.send(write).is_err() {
            tracing::error!("the progress writer has stopped; the rows stay pending and will be published again");
        }
    }

    /// Forget writes that have ended, without waiting.
    pub fn reap(&mut self) {
        let done = *self.done.borrow();
        while self.pending.front().is_some_and(|(seq, _)| *seq <= done) {
            self.pending.pop_front();
        }
    }

    /// Rows whose progress is being written.
    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.pending.iter().flat_map(|(_, ids)| ids.iter().copied())
    }

    /// How many rows are waiting for their write.
    pub fn rows(&self) -> usize {
        self.pending.iter().map(|(_, ids)| ids.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Wait until every queued write has ended. Cancel-safe: dropped mid-wait (the lease was
    /// lost), the writes go on.
    pub async fn finish(&mut self) {
        let last = self.next - 1;
        // Err: the writer is gone (it logged why); nothing is left to wait for.
        let _ = self.done.wait_for(|done| *done >= last).await;
        self.reap();
        self.pending.clear();
    }
}

/// The writer: records queued progress in order, retrying each write until it is durable
/// (giving up would publish the rows again). Batches queued together are recorded in one
/// write when they share a fence.
async fn write_in_order<L: Ledger>(
    mut rx: mpsc::UnboundedReceiver<Write<L::Position>>,
    done: watch::Sender<u64>,
    writer: Writer<L>,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    while let Some(mut write) = rx.recv().await {
        let mut next = None;
        while let Ok(later) = rx.try_recv() {
            if later.fence.epoch != write.fence.epoch {
                next = Some(later);
                break;
            }
            write.seq = later.seq;
            write.progress.merge(later.progress);
            write.created.extend(later.created);
        }
        record(&writer, &metrics, &cancel, &write).await;
        done.send_replace(write.seq);
        if let Some(later) = next {
            record(&writer, &metrics, &cancel, &later).await;
            done.send_replace(later.seq);
        }
    }
}

/// Record one write (retrying); count and time its delivered rows once it is durable.
async fn record<L: Ledger>(
    writer: &Writer<L>,
    metrics: &Metrics,
    cancel: &CancellationToken,
    write: &Write<L::Position>,
) {
    let timer = metrics
        .phase_seconds
        .with_label_values(&["mark"])
        .start_timer();
    let recorded = writer
        .write_retrying("mark", cancel, |ledger| async move {
            ledger.record(&write.progress, &write.fence).await
        })
        .await;
    timer.observe_duration();
    let delivered = write.progress.delivered.len();
    match recorded {
        Some(Recorded::Done) => {}
        Some(Recorded::Fenced) => {
            tracing::warn!(
                epoch = write.fence.epoch,
                "progress not recorded: another replica leads now; it publishes these rows again"
            );
            return;
        }
        None => {
            tracing::error!(
                rows = delivered,
                "could not record delivered rows before shutdown; they will be published again"
            );
            return;
        }
    }
    let now = Utc::now();
    for created_at in &write.created {
        let age = (now - *created_at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
        metrics.latency.observe(age.max(0.0));
    }
    metrics.published.inc_by(delivered as u64);
}

pub fn retry_backoff() -> backoff::ExponentialBackoff {
    backoff::ExponentialBackoff {
        initial_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(10),
        max_elapsed_time: None,
        ..Default::default()
    }
}

/// Ledger writes the loop must not give up on; cheap to clone into a task.
#[derive(Clone)]
pub struct Writer<L> {
    pub ledger: L,
    pub health: Arc<Health>,
    pub table: TableName,
}

impl<L: Ledger> Writer<L> {
    /// Run a write until it succeeds (its result) or shutdown interrupts it (`None`: the rows
    /// stay pending and the next run handles them again). Giving up earlier would republish them.
    pub async fn write_retrying<T, F, Fut>(
        &self,
        what: &str,
        cancel: &CancellationToken,
        write: F,
    ) -> Option<T>
    where
        F: Fn(L) -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let mut backoff = retry_backoff();
        loop {
            match write(self.ledger.clone()).await {
                Ok(done) => return Some(done),
                Err(_) if cancel.is_cancelled() => return None,
                Err(e) => self.database_failed(what, &e, &mut backoff, cancel).await,
            }
        }
    }

    /// Log a database error with its hint, mark the database unhealthy, back off.
    pub async fn database_failed(
        &self,
        what: &str,
        e: &sqlx::Error,
        backoff: &mut backoff::ExponentialBackoff,
        cancel: &CancellationToken,
    ) {
        let wait = backoff.next_backoff();
        let diagnosis = errors::diagnose(e, &self.table);
        self.health
            .database_failed(diagnosis.kind, what, &diagnosis.hint);
        let retry_in = humantime::format_duration(wait.unwrap_or(Duration::from_secs(10)));
        tracing::warn!(step = what, error = %errors::describe(e), kind = diagnosis.kind, hint = %diagnosis.hint,
            retry_in = %retry_in, "database error; retrying");
        sleep_or_cancel(wait, cancel).await;
    }
}

pub async fn sleep_or_cancel(wait: Option<Duration>, cancel: &CancellationToken) {
    let wait = wait.unwrap_or(Duration::from_secs(10));
    tokio::select! { _ = cancel.cancelled() => {}, _ = tokio::time::sleep(wait) => {} }
}
