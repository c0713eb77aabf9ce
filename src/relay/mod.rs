//! The relay loop: wait for a wake-up, read a batch, prepare it (poison rules), publish it
//! holding the lease, settle each row by its own delivery report, set poison aside, record
//! progress. One batch is published at a time; its progress is written in the background
//! while the next batch is read and published (one write in flight, in batch order). The
//! invariant, kept by the types: **progress is recorded for a row only after its own delivery
//! report ([`crate::settle::Delivered`]), and never ahead of an earlier row of the same key
//! that is still unsettled.**
//!
//! The loop knows no read mode: the [`Reader`] holds its mode's state, the [`Sink`] is Kafka,
//! the [`Leadership`] is the lease.

mod marking;
mod pace;
pub mod poison;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::event::{Message, MessageRules};
use crate::kafka::{Published, Sink};
use crate::lease::Leadership;
use crate::read::{BatchLimit, Fence, Ledger, Progress, Reader, Recorded};
use crate::settle::{settle, Settlement};
use crate::spans::Tracer;
use crate::table::TableName;
use crate::telemetry::{Health, Metrics};
use marking::{retry_backoff, sleep_or_cancel, InFlight, Writer};
pub use pace::Pace;
pub use poison::PoisonPolicy;

/// The loop's settings, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub table: TableName,
    pub batch_size: u32,
    /// A batch's bound in bytes of keys, payloads and headers (a larger row comes alone).
    pub batch_bytes: u64,
    pub poll_interval: Duration,
    /// Ask writers to NOTIFY while idle (LISTEN is on).
    pub listen: bool,
    pub stall_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub poison_policy: PoisonPolicy,
    /// Set exactly when the policy is dead-letter.
    pub dead_letter_topic: Option<String>,
    /// How rows become messages (source header, allowed topics, CloudEvents).
    pub rules: MessageRules,
}

impl Settings {
    pub fn batch_limit(&self) -> BatchLimit {
        BatchLimit {
            rows: self.batch_size,
            bytes: self.batch_bytes,
        }
    }
}

pub struct Relay<R: Reader, S: Sink, L: Leadership> {
    pub settings: Settings,
    pub reader: R,
    pub sink: watch::Sender<S>,
    pub lease: L,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub wake: Arc<Notify>,
    pub spans: Tracer,
    ledger: R::Ledger,
    /// The lease epoch this replica last took over in.
    led_epoch: Option<i64>,
}

#[derive(Debug)]
enum StepError {
    Database(sqlx::Error),
    Kafka,
}

impl From<sqlx::Error> for StepError {
    fn from(e: sqlx::Error) -> Self {
        StepError::Database(e)
    }
}

impl<R: Reader, S: Sink, L: Leadership> Relay<R, S, L> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        reader: R,
        sink: watch::Sender<S>,
        lease: L,
        metrics: Metrics,
        health: Arc<Health>,
        wake: Arc<Notify>,
        spans: Tracer,
    ) -> Self {
        let ledger = reader.ledger();
        Relay {
            settings,
            reader,
            sink,
            lease,
            metrics,
            health,
            wake,
            spans,
            ledger,
            led_epoch: None,
        }
    }

    /// The loop. Returns when `cancel` fires, after the in-flight batch is settled and recorded.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = retry_backoff();
        let (mut pace, mut wakeups) = (Pace::start(), None);
        let mut in_flight = InFlight::default();
        while !cancel.is_cancelled() {
            let wait = pace.wait(self.settings.poll_interval);
            if !wait.is_zero() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            match self.lead(&mut in_flight).await {
                Ok(true) => {}
                Ok(false) => {
                    (pace, wakeups) = (Pace::Idle { confirmed: true }, None);
                    continue;
                }
                Err(e) => {
                    self.writer()
                        .database_failed("lease", &e, &mut backoff, &cancel)
                        .await;
                    continue;
                }
            }
            match self.step(&cancel, &mut in_flight).await {
                Ok(rows) => {
                    backoff.reset();
                    self.health.progressed();
                    pace = pace.after_read(rows);
                    self.ask_for_wakeups(pace.is_idle(), &mut wakeups).await;
                }
                Err(StepError::Database(e)) => {
                    self.writer()
                        .database_failed("read", &e, &mut backoff, &cancel)
                        .await
                }
                Err(StepError::Kafka) => sleep_or_cancel(backoff.next_backoff(), &cancel).await,
            }
        }
        in_flight.finish().await;
        self.lease.release().await;
        self.metrics.leader.set(0);
        tracing::info!("relay loop stopped");
    }

    /// Whether this replica leads; on a new lease epoch, the reader starts over from durable
    /// progress (after the write in flight has finished).
    async fn lead(&mut self, in_flight: &mut InFlight) -> Result<bool, sqlx::Error> {
        let leading = self
            .lease
            .ensure()
            .await
            .inspect_err(|_| self.metrics.leader.set(0))?;
        self.metrics.leader.set(i64::from(leading));
        if !leading {
            self.health.progressed(); // a standby is healthy by definition
            return Ok(false);
        }
        if self.led_epoch != Some(self.lease.epoch()) {
            if self.holding_lease(in_flight.finish(), None).await.is_err() {
                return Ok(false);
            }
            self.reader.on_new_epoch().await?;
            self.led_epoch = Some(self.lease.epoch());
        }
        Ok(true)
    }

    /// One batch: read, prepare, publish, settle, set aside, then start recording its progress
    /// (after the previous batch's). Returns how many rows were read.
    async fn step(
        &mut self,
        cancel: &CancellationToken,
        in_flight: &mut InFlight,
    ) -> Result<usize, StepError> {
        let m = &self.metrics.clone(); // shared handles: cheap to clone
        in_flight.reap().await;
        // Rows whose progress is still being written look pending: the read leaves them out.
        let rows = timed(
            m,
            "fetch",
            self.reader
                .next_batch(self.settings.batch_limit(), in_flight.ids()),
        )
        .await?;
        self.health.database_ok.store(true, Ordering::Relaxed);
        let read = rows.len();
        if read == 0 {
            return Ok(0);
        }
        m.batch_size.observe(read as f64);
        let block_key = self.settings.poison_policy == PoisonPolicy::BlockKey;
        let (mut messages, mut poison) = poison::prepare(rows, &self.settings.rules, block_key);
        let stamps = self.spans.stamp(&mut messages);
        let sink = self.sink.borrow().clone();
        let published = timed(
            m,
            "publish",
            self.publish_holding_lease(&sink, &messages, cancel),
        )
        .await;
        let Published { outcomes, receipts } = match published {
            Ok(published) => published,
            Err(why) => {
                // Nothing is recorded: the rows stay pending for whoever leads next (duplicates
                // at most, never a reordering). A fresh producer drops the stuck queue.
                tracing::warn!(
                    reason = why,
                    rows = messages.len(),
                    "abandoning the in-flight batch"
                );
                self.recreate_sink(&sink, cancel).await;
                return Err(StepError::Kafka);
            }
        };
        self.spans.record(&messages, &stamps, &outcomes, &receipts);
        let mut settlement = settle(&messages, outcomes, block_key);
        poison.extend(poison::rejected(
            &messages,
            std::mem::take(&mut settlement.park),
        ));
        let set_aside = self.set_aside(poison, cancel).await;
        let waited = timed(m, "mark_wait", self.holding_lease(in_flight.finish(), None)).await;
        if let Err(why) = waited {
            tracing::warn!(
                reason = why,
                rows = messages.len(),
                "not recording the batch: another replica publishes it again"
            );
            return Err(StepError::Kafka);
        }
        let progress = self
            .reader
            .progress(std::mem::take(&mut settlement.delivered), &set_aside);
        self.record_in_background(&messages, progress, cancel, in_flight);
        if settlement.retry.is_empty() {
            return Ok(read);
        }
        self.retry_later(&sink, &settlement, cancel).await;
        Err(StepError::Kafka)
    }

    /// Publish while renewing the lease, so a leader waiting on a slow or absent Kafka keeps
    /// leading instead of handing the same rows to a standby. Gives up if the lease is lost
    /// (someone else leads now) or nothing completes within --stall-timeout (a stuck producer:
    /// recreating it is the cure).
    async fn publish_holding_lease(
        &mut self,
        sink: &S,
        messages: &[Message],
        cancel: &CancellationToken,
    ) -> Result<Published, &'static str> {
        let flush_timeout = self.settings.shutdown_timeout.mul_f32(0.8);
        let stall = Some(self.settings.stall_timeout);
        self.holding_lease(sink.publish(messages, cancel, flush_timeout), stall)
            .await
    }

    /// Await `work` while renewing the lease: no step (a publish, a write retried through a
    /// database outage) holds the lease without renewing it. Gives up when the lease is lost,
    /// or, with `stall`, when `work` has not completed within it.
    async fn holding_lease<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
        stall: Option<Duration>,
    ) -> Result<T, &'static str> {
        tokio::pin!(work);
        let started = tokio::time::Instant::now();
        loop {
            tokio::select! {
                done = &mut work => return Ok(done),
                _ = tokio::time::sleep(self.lease.renew_every()) => {}
            }
            match self.lease.ensure().await {
                Ok(true) => {}
                Ok(false) => {
                    self.metrics.leader.set(0);
                    return Err("lost the lease to another replica");
                }
                Err(e) => tracing::warn!(error = %e, "could not renew the lease while waiting"),
            }
            if stall.is_some_and(|stall| started.elapsed() > stall) {
                return Err("no delivery report within --stall-timeout; recreating the producer");
            }
        }
    }

    /// Record a batch's progress in the background, retrying until it succeeds (giving up
    /// would publish the rows again); count and time the delivered rows once it is durable.
    fn record_in_background(
        &self,
        messages: &[Message],
        progress: Progress<R::Position>,
        cancel: &CancellationToken,
        in_flight: &mut InFlight,
    ) {
        if progress.is_empty() {
            return;
        }
        let delivered: HashSet<i64> = progress.delivered.ids().iter().copied().collect();
        let created: Vec<_> = messages
            .iter()
            .filter(|m| delivered.contains(&m.id))
            .map(|m| m.created_at)
            .collect();
        let (writer, metrics, cancel) = (self.writer(), self.metrics.clone(), cancel.clone());
        let fence = Fence {
            holder: self.lease.holder().into(),
            epoch: self.lease.epoch(),
        };
        let ids = progress.mark.clone();
        let task = tokio::spawn(async move {
            let timer = metrics
                .phase_seconds
                .with_label_values(&["mark"])
                .start_timer();
            let recorded = writer
                .write_retrying("mark", &cancel, |ledger| {
                    let (progress, fence) = (&progress, &fence);
                    async move { ledger.record(progress, fence).await }
                })
                .await;
            timer.observe_duration();
            match recorded {
                Some(Recorded::Done) => {}
                Some(Recorded::Fenced) => {
                    tracing::warn!(epoch = fence.epoch, "progress not recorded: another replica leads now; it publishes these rows again");
                    return;
                }
                None => {
                    tracing::error!(rows = progress.delivered.len(), "could not record delivered rows before shutdown; they will be published again");
                    return;
                }
            }
            let now = chrono::Utc::now();
            for created_at in created {
                let age = (now - created_at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
                metrics.latency.observe(age.max(0.0));
            }
            metrics.published.inc_by(progress.delivered.len() as u64);
        });
        in_flight.start(ids, task);
    }

    /// After transient or fatal failures: count and record them, recreate a poisoned producer.
    /// The rows stay pending; the caller backs off before the next read.
    async fn retry_later(&mut self, sink: &S, s: &Settlement, cancel: &CancellationToken) {
        // A producer with a fatal error fails its queue with assorted codes: count them fatal.
        let fatal = s.fatal || sink.fatal_error().is_some();
        let kind = if fatal { "fatal" } else { "transient" };
        self.metrics
            .publish_errors
            .with_label_values(&[kind])
            .inc_by(s.retry.len() as u64);
        tracing::warn!(rows = s.retry.len(), first_id = s.retry[0].0, error = %s.retry[0].1,
            "delivery failed; rows stay pending and are retried with backoff");
        if let Err(e) = self.ledger.note_retry(&s.retry).await {
            tracing::warn!(error = %e, "could not record the retry on the rows");
        }
        if fatal {
            self.recreate_sink(sink, cancel).await;
        }
    }

    async fn recreate_sink(&mut self, old: &S, cancel: &CancellationToken) {
        tracing::error!(error = ?old.fatal_error(), "recreating the producer; unacknowledged rows are published again");
        match old.recreate() {
            Ok(fresh) => {
                self.sink.send_replace(fresh);
            }
            Err(e) => tracing::error!(error = %e, "could not recreate the producer; retrying"),
        }
        sleep_or_cancel(Some(Duration::from_millis(100)), cancel).await;
    }

    /// Tell the writers' insert trigger whether to NOTIFY: only while idle (and listening). Written
    /// on a change only; `known` is what the lease row says as far as this leader knows.
    async fn ask_for_wakeups(&self, idle: bool, known: &mut Option<bool>) {
        let want = idle && self.settings.listen;
        if *known == Some(want) {
            return;
        }
        if let Err(e) = self.lease.want_wakeups(want).await {
            tracing::warn!(error = %e, hint = %crate::store::errors::hint(&e, &self.settings.table),
                "could not set wake_wanted on the lease row (run `outbox-relay migrate` to add it); polling still finds every row");
        }
        *known = Some(want);
    }

    fn writer(&self) -> Writer<R::Ledger> {
        Writer {
            ledger: self.ledger.clone(),
            health: self.health.clone(),
            table: self.settings.table.clone(),
        }
    }
}

/// Await `fut`, recording its duration as a batch phase.
async fn timed<T>(metrics: &Metrics, phase: &str, fut: impl std::future::Future<Output = T>) -> T {
    let timer = metrics
        .phase_seconds
        .with_label_values(&[phase])
        .start_timer();
    let out = fut.await;
    timer.observe_duration();
    out
}

#[cfg(test)]
mod tests;
