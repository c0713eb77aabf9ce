//! Durable writes from the loop: the single progress write in flight (written in the
//! background while the next batch is read and published, one at a time, in batch order),
//! and the retrying writer every ledger write goes through.

use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::read::Ledger;
use crate::store::errors;
use crate::table::TableName;
use crate::telemetry::Health;

/// The batch progress being written, if any.
#[derive(Default)]
pub struct InFlight {
    /// Rows it marks: they still look pending, so reads leave them out.
    ids: Vec<i64>,
    task: Option<JoinHandle<()>>,
}

impl InFlight {
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    /// Start writing the next batch's progress (after [`InFlight::finish`]).
    pub fn start(&mut self, ids: Vec<i64>, task: JoinHandle<()>) {
        debug_assert!(self.task.is_none(), "one progress write at a time");
        (self.ids, self.task) = (ids, Some(task));
    }

    /// Collect a write that has already finished, without waiting.
    pub async fn reap(&mut self) {
        if self.task.as_ref().is_some_and(|t| t.is_finished()) {
            self.finish().await;
        }
    }

    /// Wait for the write in flight, if any (writes finish in batch order, one at a time).
    /// Cancel-safe: dropped mid-wait (the lease was lost), the write stays in flight.
    pub async fn finish(&mut self) {
        if let Some(task) = self.task.as_mut() {
            if let Err(e) = task.await {
                tracing::error!(error = %e, rows = self.ids.len(), "progress write failed; the rows stay pending and will be published again");
            }
            self.task = None;
        }
        self.ids.clear();
    }
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
