//! The relay loop: wait for a wake-up, read a batch, prepare it (poison rules), publish it
//! holding the lease, settle each row by its own delivery report, set poison aside, record
//! progress. While reads come back full (a backlog), the next batch is read and published
//! before the earlier ones' reports are in: up to `--in-flight-batches` batches' worth of
//! rows (and `--batch-bytes` in all) are published or being recorded at once. Batches settle
//! in publish order and their progress is written in that order by one background writer.
//! The invariant, kept by the types: **progress is recorded for a row only after its own
//! delivery report ([`crate::settle::Delivered`]), and never ahead of an earlier row of the
//! same key that is still unsettled**, in its batch or an earlier one in flight.
//!
//! The loop knows no read mode: the [`Reader`] holds its mode's state, the [`Sink`] is Kafka,
//! the [`Leadership`] is the lease. With a transactional sink (`--delivery exactly-once`) each
//! batch is committed in Kafka with the reader's position before its progress is queued, and a
//! new lease epoch first takes Kafka's position over (`take_over_transactions`).

mod flight;
mod marking;
mod pace;
pub mod poison;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::event::{Message, MessageRules};
use crate::kafka::{Published, Sink};
use crate::lease::Leadership;
use crate::read::{BatchLimit, Fence, Ledger, Reader};
use crate::settle::{settle_after, Settlement};
use crate::spans::Tracer;
use crate::table::TableName;
use crate::telemetry::{Health, Metrics};
use flight::{message_bytes, Flight, Sent};
use marking::{retry_backoff, sleep_or_cancel, Marks, Writer};
pub use pace::Pace;
pub use poison::PoisonPolicy;

/// The loop's settings, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub table: TableName,
    pub batch_size: u32,
    /// A batch's bound in bytes of keys, payloads and headers (a larger row comes alone), and
    /// the bound of all batches in flight together.
    pub batch_bytes: u64,
    /// At most this many batches' worth of rows published or being recorded at once.
    pub in_flight_batches: u32,
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
    /// Exactly-once: rows Kafka refused in an aborted transaction, set aside before publishing
    /// when read again.
    refused: HashMap<i64, poison::Refused>,
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
            refused: HashMap::new(),
        }
    }

    /// The loop. Returns when `cancel` fires, after the batches in flight are settled and
    /// recorded.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = retry_backoff();
        let (mut pace, mut wakeups) = (Pace::start(), None);
        let marks = Marks::start(self.writer(), self.metrics.clone(), cancel.clone());
        let mut flight = Flight::new(marks);
        while !cancel.is_cancelled() {
            let wait = pace.wait(self.settings.poll_interval);
            if !wait.is_zero() && flight.sent.is_empty() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            match self.lead(&mut flight).await {
                Ok(true) => {}
                Ok(false) => {
                    (pace, wakeups) = (Pace::Idle { confirmed: true }, None);
                    continue;
                }
                Err(e) => {
                    if self.reader.release_server().await {
                        let rows = self.abandon_flight(&mut flight);
                        tracing::warn!(rows, "closed the replication stream until the lease can be checked; unconfirmed events come again");
                    }
                    self.writer()
                        .database_failed("lease", &e, &mut backoff, &cancel)
                        .await;
                    continue;
                }
            }
            match self.step(&cancel, &mut flight).await {
                Ok(read) => {
                    backoff.reset();
                    self.health.progressed();
                    // A step that only settled (no room to read) says nothing about new rows.
                    if let Some(rows) = read {
                        pace = pace.after_read(rows);
                        self.ask_for_wakeups(pace.is_idle(), &mut wakeups).await;
                    }
                }
                Err(StepError::Database(e)) => {
                    self.writer()
                        .database_failed("read", &e, &mut backoff, &cancel)
                        .await
                }
                Err(StepError::Kafka) => sleep_or_cancel(backoff.next_backoff(), &cancel).await,
            }
        }
        // Shutdown: the sink flushes what is in flight; settle and record what it delivered.
        self.finish_unit(&mut flight).await;
        while !flight.sent.is_empty() {
            let _ = self.settle_oldest(&mut flight, &cancel).await;
        }
        flight.marks.finish().await;
        self.reader.close().await;
        self.lease.release().await;
        self.metrics.leader.set(0);
        tracing::info!("relay loop stopped");
    }

    /// Stopping inside a unit the reader records whole (log mode: a transaction, of which some
    /// events are published): read and publish the rest of it first, within half of
    /// --shutdown-timeout, so the position can pass it and nothing is published again.
    async fn finish_unit(&mut self, flight: &mut Flight<R::Position>) {
        let (limit, batches) = (self.settings.batch_limit(), self.settings.in_flight_batches);
        let deadline = tokio::time::Instant::now() + self.settings.shutdown_timeout / 2;
        // The stop signal has fired; publishing goes on until the unit ends.
        let live = CancellationToken::new();
        while self.reader.finish_unit() && tokio::time::Instant::now() < deadline {
            let done = match flight.room(limit, batches) {
                Some(room) => match self.read_and_send(room, flight, &live).await {
                    // The rest has not arrived yet.
                    Ok(0) if flight.sent.is_empty() => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        Ok(())
                    }
                    Ok(0) => self.settle_oldest(flight, &live).await,
                    read => read.map(|_| ()),
                },
                None => self.settle_oldest(flight, &live).await,
            };
            if done.is_err() {
                tracing::warn!("could not finish the transaction in hand before stopping: its published events come again after a restart");
                return;
            }
        }
    }

    /// Whether this replica leads; on a new lease epoch, the reader starts over from durable
    /// progress (after the writes in flight have finished).
    async fn lead(&mut self, flight: &mut Flight<R::Position>) -> Result<bool, sqlx::Error> {
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
            flight.abandon();
            if self
                .holding_lease(flight.marks.finish(), None)
                .await
                .is_err()
            {
                return Ok(false);
            }
            self.reader.on_new_epoch().await?;
            if !self.take_over_transactions().await? {
                return Ok(false);
            }
            self.led_epoch = Some(self.lease.epoch());
        }
        Ok(true)
    }

    /// Exactly-once, in a new lease epoch: a fresh producer fences every earlier one of the
    /// transactional id (a paused former leader can no longer commit), then Kafka's last
    /// committed position is recorded before anything is read. Returns whether that worked
    /// (if not, this replica tries again on its next turn).
    async fn take_over_transactions(&mut self) -> Result<bool, sqlx::Error> {
        let old = self.sink.borrow().clone();
        if !old.transactional() {
            return Ok(true);
        }
        let fresh = match old.recreate() {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::error!(error = %e, "could not create the transactional producer");
                return Ok(false);
            }
        };
        self.sink.send_replace(fresh.clone());
        let timeout = self.settings.stall_timeout;
        let position = match self.holding_lease(fresh.take_over(timeout), None).await {
            Ok(Ok(position)) => position,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not take over Kafka transactions; trying again");
                return Ok(false);
            }
            Err(why) => {
                tracing::warn!(
                    reason = why,
                    "lost the lease while taking over Kafka transactions"
                );
                return Ok(false);
            }
        };
        self.reader.adopt(position.as_deref()).await?;
        Ok(true)
    }

    /// Settle the batches whose reports are in; read and publish the next batch if there is
    /// room; unless that read came back full (a backlog: keep reading ahead), wait for the
    /// oldest batch in flight and settle it. Returns how many rows were read (`None`: no read,
    /// for want of room).
    async fn step(
        &mut self,
        cancel: &CancellationToken,
        flight: &mut Flight<R::Position>,
    ) -> Result<Option<usize>, StepError> {
        flight.marks.reap();
        while flight.sent.front().is_some_and(|s| s.reports.is_finished()) {
            self.settle_oldest(flight, cancel).await?;
        }
        let (limit, batches) = (self.settings.batch_limit(), self.settings.in_flight_batches);
        if flight.sent.is_empty() && flight.room(limit, batches).is_none() {
            // Only progress writes fill the bound (a slow database): wait for them, not as
            // an empty read (which would turn the pace idle).
            let finished = self.holding_lease(flight.marks.finish(), None).await;
            finished.map_err(|_| StepError::Kafka)?;
        }
        // Exactly-once: a transaction holds one batch (its position covers exactly that), so
        // nothing more is read while a batch is in flight, whatever room its rows leave.
        let one_at_a_time = self.sink.borrow().transactional() && !flight.sent.is_empty();
        let room = flight.room(limit, batches).filter(|_| !one_at_a_time);
        let (read, full) = match room {
            Some(limit) => {
                let read = self.read_and_send(limit, flight, cancel).await?;
                (Some(read), read >= limit.rows as usize)
            }
            None => (None, false),
        };
        if !full && !flight.sent.is_empty() {
            self.settle_oldest(flight, cancel).await?;
        }
        Ok(read)
    }

    /// Read the next batch (leaving out the rows in flight), prepare it and hand it to the
    /// sink; its reports are awaited in the background. Returns how many rows were read.
    async fn read_and_send(
        &mut self,
        limit: BatchLimit,
        flight: &mut Flight<R::Position>,
        cancel: &CancellationToken,
    ) -> Result<usize, StepError> {
        let m = &self.metrics.clone(); // shared handles: cheap to clone
        let in_flight = flight.ids();
        let rows = timed(m, "fetch", self.reader.next_batch(limit, &in_flight)).await?;
        self.health.database_ok.store(true, Ordering::Relaxed);
        let read = rows.len();
        if read == 0 {
            return Ok(0);
        }
        m.batch_size.observe(read as f64);
        let block_key = self.settings.poison_policy == PoisonPolicy::BlockKey;
        let (mut messages, mut poison) = poison::prepare(rows, &self.settings.rules, block_key);
        poison::refused_before(&mut messages, &mut poison, &self.refused, block_key);
        let stamps = self.spans.stamp(&mut messages);
        let messages: Arc<[Message]> = messages.into();
        let bytes = messages.iter().map(message_bytes).sum();
        let sink = self.sink.borrow().clone();
        let flush_timeout = self.settings.shutdown_timeout.mul_f32(0.8);
        let stall = Some(self.settings.stall_timeout);
        let handed = self.holding_lease(sink.send(messages.clone(), cancel, flush_timeout), stall);
        let reports = match timed(m, "send", handed).await {
            Ok(reports) => reports,
            Err(why) => return Err(self.abandon(flight, &sink, why, read, cancel).await),
        };
        let timer = m
            .phase_seconds
            .with_label_values(&["publish"])
            .start_timer();
        let reports = tokio::spawn(async move {
            let published = reports.await;
            timer.observe_duration();
            published
        });
        flight.sent.push_back(Sent {
            messages,
            stamps,
            poison,
            bytes,
            reports,
        });
        Ok(read)
    }

    /// Wait (holding the lease) for the oldest batch's reports, settle each row, set poison
    /// aside and queue its progress. After a failure, the batches published after it are
    /// settled too (rows of the failed rows' keys stay pending) before the loop backs off.
    async fn settle_oldest(
        &mut self,
        flight: &mut Flight<R::Position>,
        cancel: &CancellationToken,
    ) -> Result<(), StepError> {
        let Some(batch) = flight.sent.front_mut() else {
            return Ok(());
        };
        let stall = Some(self.settings.stall_timeout);
        let (sink, m) = (self.sink.borrow().clone(), self.metrics.clone());
        let reports = self.holding_lease(&mut batch.reports, stall);
        let published = match timed(&m, "wait", reports).await {
            Ok(Ok(published)) => published,
            Ok(Err(e)) => return Err(self.abandon(flight, &sink, &e.to_string(), 0, cancel).await),
            Err(why) => return Err(self.abandon(flight, &sink, why, 0, cancel).await),
        };
        let Some(Sent {
            messages,
            stamps,
            mut poison,
            ..
        }) = flight.sent.pop_front()
        else {
            return Ok(());
        };
        let Published { outcomes, receipts } = published;
        self.spans.record(&messages, &stamps, &outcomes, &receipts);
        let block_key = self.settings.poison_policy == PoisonPolicy::BlockKey;
        let mut settlement = settle_after(&messages, outcomes, block_key, &mut flight.blocked);
        let rejected = poison::rejected(&messages, std::mem::take(&mut settlement.park));
        // Exactly-once: Kafka's refusal of a row dooms its transaction. It is aborted, and the
        // refused rows are set aside before publishing when read again.
        let doomed = sink.transactional() && !rejected.is_empty();
        let (set_aside, dead_lettered) = if doomed {
            self.refuse(rejected);
            Default::default()
        } else {
            poison.extend(rejected);
            self.set_aside(poison, cancel).await
        };
        let delivered = std::mem::take(&mut settlement.delivered);
        let created = created_at(&messages, delivered.ids());
        let progress = self.reader.progress(delivered, &set_aside);
        let failed = doomed || !settlement.retry.is_empty() || settlement.fatal;
        let dead: Vec<i64> = dead_lettered.iter().map(|(id, _)| *id).collect();
        if sink.transactional() && !self.commit(&sink, &progress, flight, &dead, failed).await {
            // Aborted: nothing of the batch reaches a read_committed consumer; it is read again.
            if !settlement.retry.is_empty() {
                self.note_retries(&settlement).await;
            }
            // A fresh producer takes over (fencing, Kafka's position) before publishing again.
            self.led_epoch = None;
            return Err(StepError::Kafka);
        }
        self.record_dead_letters(&dead_lettered, cancel).await;
        self.refused.retain(|id, _| !set_aside.contains(id));
        let fence = Fence {
            holder: self.lease.holder().into(),
            epoch: self.lease.epoch(),
        };
        flight.marks.push(progress, fence, created);
        if flight.sent.is_empty() {
            flight.blocked.clear();
        }
        if settlement.retry.is_empty() {
            return Ok(());
        }
        self.note_retries(&settlement).await;
        while !flight.sent.is_empty() {
            let _ = Box::pin(self.settle_oldest(flight, cancel)).await;
        }
        if settlement.fatal || sink.fatal_error().is_some() {
            self.recreate_sink(&sink, cancel).await;
        }
        Err(StepError::Kafka)
    }

    /// Exactly-once: commit the batch's Kafka transaction with the reader's position after it,
    /// or abort it if a row `failed` (or the commit does). Returns whether it committed.
    /// `dead_lettered`: rows whose dead-letter copy is in the transaction (recorded after it).
    async fn commit(
        &mut self,
        sink: &S,
        progress: &crate::read::Progress<R::Position>,
        flight: &Flight<R::Position>,
        dead_lettered: &[i64],
        failed: bool,
    ) -> bool {
        let timeout = self.settings.stall_timeout;
        if !failed {
            let unrecorded: Vec<i64> = flight
                .marks
                .ids()
                .chain(dead_lettered.iter().copied())
                .collect();
            let Some(position) = self.reader.position(progress, &unrecorded) else {
                tracing::error!("this read mode cannot publish exactly-once");
                return false;
            };
            let timer = self.metrics.transaction_seconds.start_timer();
            match self
                .holding_lease(sink.commit(position, timeout), None)
                .await
            {
                Ok(Ok(())) => {
                    timer.observe_duration();
                    self.metrics
                        .transactions
                        .with_label_values(&["committed"])
                        .inc();
                    return true;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "the Kafka transaction did not commit"),
                Err(why) => tracing::warn!(reason = why, "lost the lease while committing"),
            }
        }
        self.metrics
            .transactions
            .with_label_values(&["aborted"])
            .inc();
        if let Err(e) = sink.abort(timeout).await {
            tracing::warn!(error = %e, "could not abort the Kafka transaction; recreating the producer");
        }
        false
    }

    /// Give up on every batch in flight, and on the `handing` rows of a batch whose hand-over
    /// stalled (the lease was lost, or nothing completed within --stall-timeout): nothing is
    /// recorded, the rows stay pending for whoever leads next (duplicates at most, never a
    /// reordering). A fresh producer drops the stuck queue, part of that batch included.
    async fn abandon(
        &mut self,
        flight: &mut Flight<R::Position>,
        sink: &S,
        why: &str,
        handing: usize,
        cancel: &CancellationToken,
    ) -> StepError {
        let rows = self.abandon_flight(flight) + handing;
        tracing::warn!(reason = why, rows, "abandoning the batches in flight");
        if !sink.transactional() {
            self.recreate_sink(sink, cancel).await;
        }
        StepError::Kafka
    }

    /// Drop the batches in flight (their rows are read again). Exactly-once: their messages
    /// are in the open Kafka transaction, so a take-over (a fresh producer, whose
    /// initialization aborts it) comes before anything is published again.
    fn abandon_flight(&mut self, flight: &mut Flight<R::Position>) -> usize {
        if self.sink.borrow().transactional() {
            self.led_epoch = None;
        }
        flight.abandon()
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

    /// Exactly-once: rows Kafka refused in the transaction about to be aborted; they are set
    /// aside before publishing when read again.
    fn refuse(&mut self, rejected: Vec<poison::Poison>) {
        for p in rejected {
            tracing::warn!(row_id = p.id, kind = p.kind, reason = %p.reason,
                "Kafka refused the row, which dooms its transaction: aborting it; the row is set aside (poison policy) when read again");
            let (kind, reason, park) = (p.kind, p.reason, false);
            self.refused
                .insert(p.id, poison::Refused { kind, reason, park });
        }
    }

    /// After transient or fatal failures: count them and note them on the rows, which stay
    /// pending; the caller backs off before the next read.
    async fn note_retries(&mut self, s: &Settlement) {
        // A producer with a fatal error fails its queue with assorted codes: count them fatal.
        let fatal = s.fatal || self.sink.borrow().fatal_error().is_some();
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

/// The creation times of the `delivered` rows (for the latency metric).
fn created_at(messages: &[Message], delivered: &[i64]) -> Vec<chrono::DateTime<chrono::Utc>> {
    let delivered: HashSet<i64> = delivered.iter().copied().collect();
    messages
        .iter()
        .filter(|m| delivered.contains(&m.id))
        .map(|m| m.created_at)
        .collect()
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
