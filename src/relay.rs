//! The relay loop: wait for a wake-up, read a batch, publish it, settle each row by its own
//! delivery report, mark. One batch is published at a time; its mark is written in the
//! background while the next batch is read and published (at most one mark in flight, marks in
//! batch order). The invariant stays easy to read: **a row is marked published only after its
//! own delivery report, and never ahead of an earlier row of the same key that is still
//! unsettled.**

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{PoisonPolicy, ReadMode, RelayConfig};
use crate::event::{dead_letter, to_message, Message, OutboxRow, Poisoned};
use crate::outbox::{Cursor, Lease, OutboxStore};
use crate::publisher::{Failure, Publisher};
use crate::telemetry::{Health, Metrics};

/// What to do with each row of a published batch.
#[derive(Debug, Default, PartialEq)]
pub struct Settlement {
    /// Delivered, and no earlier row of the same key is unsettled: mark published.
    pub delivered: Vec<i64>,
    /// Can never be published as is: park with (reason kind, message).
    pub park: Vec<(i64, &'static str, String)>,
    /// Failed transiently: stays pending; its (topic, key) is blocked for the rest of the batch.
    pub retry: Vec<(i64, String)>,
    /// The producer reported a fatal error and must be recreated.
    pub fatal: bool,
}

/// Decide each row's fate from its delivery outcome, keeping per-key order: after a row of a
/// (topic, key) fails transiently (or is poison, with `poison_blocks`), later rows of that
/// topic and key stay pending even if Kafka acknowledged them (they are published again
/// after it: a duplicate, never a reordering of marks).
pub fn settle(
    messages: &[Message],
    outcomes: Vec<Result<(), Failure>>,
    poison_blocks: bool,
) -> Settlement {
    let mut s = Settlement::default();
    let mut blocked: HashSet<(&str, &str)> = HashSet::new();
    for (m, outcome) in messages.iter().zip(outcomes) {
        let stream = m.key.as_deref().map(|k| (m.topic.as_str(), k));
        let key_blocked = stream.is_some_and(|s| blocked.contains(&s));
        match outcome {
            _ if key_blocked => {}
            Ok(()) => s.delivered.push(m.id),
            Err(Failure::Poison { kind, reason }) => {
                s.park.push((m.id, kind, reason));
                if poison_blocks {
                    blocked.extend(stream);
                }
            }
            Err(failure) => {
                s.fatal |= matches!(failure, Failure::Fatal(_));
                s.retry.push((m.id, failure.into_reason()));
                blocked.extend(stream);
            }
        }
    }
    s
}

pub struct Relay {
    pub config: RelayConfig,
    pub store: OutboxStore,
    pub publisher: watch::Sender<Publisher>,
    pub lease: Lease,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub wake: Arc<Notify>,
    pub spans: crate::spans::Tracer,
    /// Append mode: the last row published or set aside in read order (ahead of the durable
    /// cursor by at most the batch whose write is in flight).
    pub cursor: Cursor,
    /// The lease epoch this replica last took over in (the cursor is reloaded on a new one).
    pub led_epoch: Option<i64>,
    /// Append mode: the batch after the last one, read while that one was being published.
    pub read_ahead: Option<Vec<OutboxRow>>,
}

fn retry_backoff() -> backoff::ExponentialBackoff {
    backoff::ExponentialBackoff {
        initial_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(10),
        max_elapsed_time: None,
        ..Default::default()
    }
}

impl Relay {
    /// The loop. Returns when `cancel` fires, after the in-flight batch is settled and marked.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = retry_backoff();
        let (mut pace, mut wakeups) = (Pace::start(), None);
        let mut marking = None;
        self.check_read_index().await;
        while !cancel.is_cancelled() {
            let wait = pace.wait(self.config.poll_interval);
            if !wait.is_zero() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            match self.lease.ensure().await {
                Ok(true) => {
                    self.metrics.leader.set(1);
                    if self.led_epoch != Some(self.lease.epoch()) {
                        finish_marking(&mut marking).await;
                        self.read_ahead = None;
                        if let Err(e) = self.take_over().await {
                            self.writer()
                                .database_failed("take over", &e, &mut backoff, &cancel)
                                .await;
                            continue;
                        }
                    }
                }
                Ok(false) => {
                    self.metrics.leader.set(0);
                    self.health.progressed(); // a standby is healthy by definition
                    (pace, wakeups) = (Pace::Idle { confirmed: true }, None);
                    continue;
                }
                Err(e) => {
                    self.metrics.leader.set(0);
                    self.writer()
                        .database_failed("lease", &e, &mut backoff, &cancel)
                        .await;
                    continue;
                }
            }
            match self.step(&cancel, &mut marking).await {
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
        finish_marking(&mut marking).await;
        self.lease.release().await;
        self.metrics.leader.set(0);
        tracing::info!("relay loop stopped");
    }

    /// On becoming leader (a new lease epoch). Append mode: resume from the durable cursor
    /// (another leader may have moved it). Claim mode: if append mode ran before, mark the rows
    /// behind its cursor published, so they are not published again.
    async fn take_over(&mut self) -> Result<(), sqlx::Error> {
        match self.config.read_mode {
            ReadMode::Append => {
                self.cursor = self.store.load_cursor().await?.unwrap_or((0, 0));
                tracing::info!(cursor_xid = self.cursor.0, cursor_id = self.cursor.1, "append mode: reading after the cursor");
            }
            ReadMode::Claim => match self.store.close_cursor().await {
                Ok(0) => {}
                Ok(rows) => tracing::info!(rows, "claim mode after append mode: marked the rows behind the append cursor published"),
                // An older schema has no cursor columns (and so no append mode ever ran).
                Err(e) if crate::outbox::is_undefined_column(&e) => {
                    tracing::warn!(error = %e, "run `outbox-relay migrate` to upgrade the table; publishing goes on")
                }
                Err(e) => return Err(e),
            },
        }
        self.led_epoch = Some(self.lease.epoch());
        Ok(())
    }

    /// Warn once at start when the read mode's index is missing (every read would scan the table).
    async fn check_read_index(&self) {
        if let Ok(false) = self.store.has_read_index().await {
            let mode = format!("{:?}", self.config.read_mode).to_lowercase();
            tracing::warn!(table = %self.store.table(),
                "the table lacks the index --read-mode {mode} reads through; every read scans the table: \
                 run `outbox-relay migrate --read-mode {mode}`");
        }
    }

    /// Tell the writers' insert trigger whether to NOTIFY: only while idle (and listening). Written
    /// on a change only; `known` is what the lease row says as far as this leader knows.
    async fn ask_for_wakeups(&self, idle: bool, known: &mut Option<bool>) {
        let want = idle && self.config.listen;
        if *known == Some(want) {
            return;
        }
        if let Err(e) = self.lease.want_wakeups(want).await {
            tracing::warn!(error = %e, hint = crate::outbox::hint(&e, self.store.table()),
                "could not set wake_wanted on the lease row (run `outbox-relay migrate` to add it); polling still finds every row");
        }
        *known = Some(want);
    }

    /// One batch: read, publish, settle, then start its mark (after the previous batch's mark
    /// has finished). Returns how many rows were read.
    async fn step(
        &mut self,
        cancel: &CancellationToken,
        marking: &mut Option<Marking>,
    ) -> Result<usize, StepError> {
        let m = &self.metrics.clone(); // shared handles: cheap to clone
        if marking.as_ref().is_some_and(|mk| mk.task.is_finished()) {
            finish_marking(marking).await;
        }
        // Rows whose mark is still being written look pending: leave them out of the read.
        let marked_soon = marking.as_ref().map_or(&[][..], |mk| mk.ids.as_slice());
        let rows = match self.read_ahead.take() {
            Some(rows) => rows,
            None => {
                let read =
                    self.store
                        .fetch_pending(self.config.batch_size, marked_soon, self.cursor);
                timed(m, "fetch", read).await?
            }
        };
        self.health.database_ok.store(true, Ordering::Relaxed);
        let read = rows.len();
        if read == 0 {
            return Ok(0);
        }
        m.batch_size.observe(read as f64);
        let positions: Vec<(i64, Cursor)> = rows
            .iter()
            .map(|r| (r.id, (r.xid.unwrap_or(0), r.id)))
            .collect();

        let (mut messages, mut poison) = self.prepare(rows);
        let stamps = self.spans.stamp(&mut messages);
        let publisher = self.publisher.borrow().clone();
        let publish = publisher.publish_with_receipts(&messages, cancel, self.flush_timeout());
        // Append mode, after a full batch: read the next one while this one is published.
        let batch_end = positions.last().map(|(_, at)| *at);
        let ahead = (self.config.read_mode == ReadMode::Append
            && read == self.config.batch_size as usize)
            .then(|| {
                let (store, limit) = (self.store.clone(), self.config.batch_size);
                let exclude = marked_soon.to_vec();
                async move {
                    store
                        .fetch_pending(limit, &exclude, batch_end.unwrap_or_default())
                        .await
                        .ok()
                }
            });
        let ahead = async move {
            match ahead {
                Some(read) => timed(m, "fetch", read).await,
                None => None,
            }
        };
        let (published, ahead) = tokio::join!(
            timed(m, "publish", self.await_holding_lease(publish)),
            ahead
        );
        let outcomes = match published {
            Ok((outcomes, receipts)) => {
                self.spans.record(&messages, &stamps, &outcomes, &receipts);
                outcomes
            }
            Err(why) => {
                // Nothing is marked: the rows stay pending for whoever leads next (duplicates
                // at most, never a reordering). A fresh producer drops the stuck queue.
                tracing::warn!(
                    reason = why,
                    rows = messages.len(),
                    "abandoning the in-flight batch"
                );
                self.recreate_producer(&publisher, cancel).await;
                return Err(StepError::Kafka);
            }
        };
        let block = self.config.poison_policy == PoisonPolicy::BlockKey;
        let mut settlement = settle(&messages, outcomes, block);
        poison.extend(rejected(&messages, std::mem::take(&mut settlement.park)));
        let set_aside = self.set_aside(poison, cancel).await;
        timed(m, "mark_wait", finish_marking(marking)).await;
        let delivered = std::mem::take(&mut settlement.delivered);
        let progress = match self.config.read_mode {
            ReadMode::Claim => Progress {
                mark: delivered.clone(),
                delivered,
                cursor: None,
            },
            ReadMode::Append => advance(&positions, delivered, &set_aside),
        };
        if let Some(cursor) = progress.cursor {
            self.cursor = cursor;
        }
        // The rows read ahead follow this batch: valid only if the cursor passed all of it.
        if progress.cursor.is_some() && progress.cursor == batch_end {
            self.read_ahead = ahead;
        }
        *marking = self.start_marking(&messages, progress, cancel);
        if settlement.retry.is_empty() {
            return Ok(read);
        }
        self.retry_later(&publisher, &settlement, cancel).await;
        Err(StepError::Kafka)
    }

    /// Await a batch's delivery reports while renewing the lease, so a leader waiting on a slow
    /// or absent Kafka keeps leading instead of handing the same rows to a standby. Gives up if
    /// the lease is lost (someone else leads now) or nothing completes within --stall-timeout
    /// (a stuck producer: recreating it is the cure).
    async fn await_holding_lease<T>(
        &mut self,
        publish: impl std::future::Future<Output = T>,
    ) -> Result<T, &'static str> {
        tokio::pin!(publish);
        let started = tokio::time::Instant::now();
        loop {
            tokio::select! {
                outcomes = &mut publish => return Ok(outcomes),
                _ = tokio::time::sleep(self.lease.renew_every()) => {}
            }
            match self.lease.ensure().await {
                Ok(true) => {}
                Ok(false) => {
                    self.metrics.leader.set(0);
                    return Err("lost the lease to another replica");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the lease while waiting for Kafka")
                }
            }
            if started.elapsed() > self.config.stall_timeout {
                return Err("no delivery report within --stall-timeout; recreating the producer");
            }
        }
    }

    fn flush_timeout(&self) -> Duration {
        self.config.shutdown_timeout.mul_f32(0.8)
    }

    /// After transient or fatal failures: count and record them, recreate a poisoned producer.
    /// The rows stay pending; the caller backs off before the next read.
    async fn retry_later(
        &mut self,
        publisher: &Publisher,
        s: &Settlement,
        cancel: &CancellationToken,
    ) {
        let kind = if s.fatal { "fatal" } else { "transient" };
        self.metrics
            .publish_errors
            .with_label_values(&[kind])
            .inc_by(s.retry.len() as u64);
        tracing::warn!(rows = s.retry.len(), first_id = s.retry[0].0, error = %s.retry[0].1,
            "delivery failed; rows stay pending and are retried with backoff");
        if let Err(e) = self.store.note_retry(&s.retry).await {
            tracing::warn!(error = %e, "could not record the retry on the rows");
        }
        if s.fatal || publisher.fatal_error().is_some() {
            self.recreate_producer(publisher, cancel).await;
        }
    }

    /// Record a batch's progress in the background (mark rows, move the cursor), retrying until
    /// it succeeds: giving up would publish the rows again.
    fn start_marking(
        &self,
        messages: &[Message],
        progress: Progress,
        cancel: &CancellationToken,
    ) -> Option<Marking> {
        if progress.delivered.is_empty() && progress.cursor.is_none() {
            return None;
        }
        let delivered: HashSet<i64> = progress.delivered.iter().copied().collect();
        let created: Vec<_> = messages
            .iter()
            .filter(|m| delivered.contains(&m.id))
            .map(|m| m.created_at)
            .collect();
        let (writer, metrics, cancel) = (self.writer(), self.metrics.clone(), cancel.clone());
        let (holder, epoch) = (self.lease.holder().to_string(), self.lease.epoch());
        let ids = progress.mark.clone();
        let task = tokio::spawn(async move {
            let timer = metrics.phase_seconds.with_label_values(&["mark"]);
            let timer = timer.start_timer();
            let rows = &progress.mark;
            let marked = rows.is_empty()
                || writer
                    .write_retrying("mark", &cancel, |store| async move {
                        store.mark_published(rows).await
                    })
                    .await
                    .is_some();
            let moved = match progress.cursor {
                Some(cursor) if marked => {
                    let holder = &holder;
                    let moved = writer
                        .write_retrying("cursor", &cancel, |store| async move {
                            store.save_cursor(holder, epoch, cursor).await
                        })
                        .await;
                    if moved == Some(false) {
                        tracing::warn!(epoch, "cursor not moved: another replica leads now; it publishes these rows again");
                    }
                    moved.is_some()
                }
                _ => marked,
            };
            timer.observe_duration();
            if !moved {
                tracing::error!(
                    rows = progress.delivered.len(),
                    "could not record delivered rows before shutdown; they will be published again"
                );
                return;
            }
            let now = chrono::Utc::now();
            for created_at in created {
                let age = (now - created_at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
                metrics.latency.observe(age.max(0.0));
            }
            metrics.published.inc_by(progress.delivered.len() as u64);
        });
        Some(Marking { ids, task })
    }

    /// Rows to messages. Invalid rows become poison; with block-key, later rows of an invalid
    /// row's topic and key are left pending (the next read skips them while it is parked).
    fn prepare(&self, rows: Vec<OutboxRow>) -> (Vec<Message>, Vec<Poison>) {
        let block = self.config.poison_policy == PoisonPolicy::BlockKey;
        let mut blocked: HashSet<(String, String)> = HashSet::new();
        let mut messages = Vec::with_capacity(rows.len());
        let mut poison = Vec::new();
        for row in rows {
            let stream = row.key.clone().map(|k| (row.topic.clone(), k));
            if block && stream.as_ref().is_some_and(|s| blocked.contains(s)) {
                continue;
            }
            match to_message(row, &self.config.rules) {
                Ok(m) => messages.push(m),
                Err(invalid) => {
                    let (row, reason) = *invalid;
                    if block {
                        blocked.extend(stream);
                    }
                    poison.push(Poison {
                        id: row.id,
                        kind: "invalid_row",
                        reason,
                        original: Poisoned::Row(row),
                    });
                }
            }
        }
        (messages, poison)
    }

    /// Apply the poison policy: dead-letter (then mark published) or park, with the reason in
    /// the row, a log line naming the row, and a metric. Writes are retried like a mark.
    /// Returns the rows set aside for good (a row whose dead-letter copy failed transiently
    /// stays pending).
    async fn set_aside(&self, poison: Vec<Poison>, cancel: &CancellationToken) -> HashSet<i64> {
        if poison.is_empty() {
            return HashSet::new();
        }
        let mut park = Vec::new();
        let mut dead_lettered = HashSet::new();
        match self.config.dead_letter_topic.clone() {
            None => park.extend(poison.into_iter().map(|p| (p.id, p.kind, p.reason))),
            Some(dlq) => {
                let copies: Vec<Message> = poison
                    .iter()
                    .map(|p| {
                        dead_letter(
                            p.original.clone(),
                            p.kind,
                            &p.reason,
                            &dlq,
                            &self.config.rules.source,
                        )
                    })
                    .collect();
                let publisher = self.publisher.borrow().clone();
                let outcomes = publisher
                    .publish(&copies, cancel, self.config.shutdown_timeout.mul_f32(0.8))
                    .await;
                let mut sent = Vec::new();
                for (p, outcome) in poison.into_iter().zip(outcomes) {
                    match outcome {
                        Ok(()) => {
                            tracing::error!(row_id = p.id, kind = p.kind, reason = %p.reason, topic = %dlq, "row sent to the dead-letter topic");
                            self.metrics
                                .dead_lettered
                                .with_label_values(&[p.kind])
                                .inc();
                            self.metrics
                                .publish_errors
                                .with_label_values(&["poison"])
                                .inc();
                            sent.push((p.id, format!("dead-lettered to {dlq}: {}", p.reason)));
                        }
                        Err(Failure::Poison { reason, .. }) => park.push((
                            p.id,
                            p.kind,
                            format!("{}; the dead-letter copy failed too: {reason}", p.reason),
                        )),
                        // Kafka trouble: leave the row pending; it is retried with the next read.
                        Err(other) => {
                            tracing::warn!(row_id = p.id, error = %other.into_reason(), "dead-letter publish failed; will retry")
                        }
                    }
                }
                let marked = self
                    .writer()
                    .write_retrying("dead-letter mark", cancel, |store| {
                        let sent = sent.clone();
                        async move { store.mark_dead_lettered(&sent).await }
                    })
                    .await
                    .is_some();
                if marked {
                    dead_lettered.extend(sent.iter().map(|(id, _)| *id));
                }
            }
        }
        for (id, kind, reason) in &park {
            tracing::error!(row_id = id, kind, reason = %reason, "row parked as failed; fix it and retry it, or skip it");
            self.metrics.parked.with_label_values(&[kind]).inc();
            self.metrics
                .publish_errors
                .with_label_values(&["poison"])
                .inc();
        }
        let failures: Vec<(i64, String)> = park
            .into_iter()
            .map(|(id, _, reason)| (id, reason))
            .collect();
        let parked = self
            .writer()
            .write_retrying("park", cancel, |store| {
                let failures = failures.clone();
                async move { store.park(&failures).await }
            })
            .await
            .is_some();
        let mut done: HashSet<i64> = dead_lettered;
        if parked {
            done.extend(failures.iter().map(|(id, _)| *id));
        }
        done
    }

    fn writer(&self) -> Writer {
        Writer {
            store: self.store.clone(),
            health: self.health.clone(),
        }
    }

    async fn recreate_producer(&mut self, old: &Publisher, cancel: &CancellationToken) {
        tracing::error!(error = ?old.fatal_error(), "fatal producer error; recreating the producer and replaying unacknowledged rows");
        match Publisher::new(&self.config.kafka) {
            Ok(p) => {
                self.publisher.send_replace(p);
            }
            Err(e) => tracing::error!(error = %e, "could not recreate the producer; retrying"),
        }
        sleep_or_cancel(Some(Duration::from_millis(100)), cancel).await;
    }
}

/// When the loop reads next. A busy leader polls on its own so that writers need not NOTIFY (a
/// notifying commit takes a database-wide lock that serializes all commits): it reads again at
/// once after a read that found rows, and after empty reads waits 1, 2, 4, then 8 ms. After
/// `IDLE_AFTER` of empty reads it turns idle: it asks the insert trigger to NOTIFY again, reads
/// once more (a row committed just before the request took effect is not left waiting), then
/// sleeps until a notification or --poll-interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    Busy {
        empty_for: Duration,
        next_wait: Duration,
    },
    /// `confirmed`: the read after asking for notifications has been done.
    Idle { confirmed: bool },
}

const BUSY_POLL_MAX: Duration = Duration::from_millis(8);
const IDLE_AFTER: Duration = Duration::from_millis(50);

impl Pace {
    pub fn start() -> Pace {
        Pace::Busy {
            empty_for: Duration::ZERO,
            next_wait: Duration::ZERO,
        }
    }

    /// How long to wait (for a notification at most) before the next read.
    pub fn wait(&self, poll_interval: Duration) -> Duration {
        match *self {
            Pace::Busy { next_wait, .. } => next_wait,
            Pace::Idle { confirmed: false } => Duration::ZERO,
            Pace::Idle { confirmed: true } => poll_interval,
        }
    }

    /// The pace after a read that found `rows` rows.
    pub fn after_read(self, rows: usize) -> Pace {
        match self {
            _ if rows > 0 => Pace::start(),
            Pace::Busy {
                empty_for,
                next_wait,
            } => {
                let empty_for = empty_for + next_wait;
                if empty_for >= IDLE_AFTER {
                    Pace::Idle { confirmed: false }
                } else {
                    let next_wait = (next_wait * 2).clamp(Duration::from_millis(1), BUSY_POLL_MAX);
                    Pace::Busy {
                        empty_for,
                        next_wait,
                    }
                }
            }
            Pace::Idle { .. } => Pace::Idle { confirmed: true },
        }
    }

    pub fn is_idle(&self) -> bool {
        matches!(self, Pace::Idle { .. })
    }
}

/// A batch's mark, being written while the next batch is read and published.
struct Marking {
    ids: Vec<i64>,
    task: tokio::task::JoinHandle<()>,
}

/// What a batch's background write records.
#[derive(Debug, Default, PartialEq)]
pub struct Progress {
    /// Rows Kafka acknowledged (counted and timed once the write is done).
    pub delivered: Vec<i64>,
    /// Rows to mark published one by one (claim mode: all delivered; append mode: only those
    /// past a row that must be retried, which the cursor cannot pass yet).
    pub mark: Vec<i64>,
    /// Append mode: the new cursor, the last row of the batch's settled prefix.
    pub cursor: Option<Cursor>,
}

/// Append mode: the cursor moves past the longest prefix of the batch (in read order) whose
/// rows are all delivered or set aside; delivered rows after it are marked individually so
/// the retry that reads them again skips them. `positions`: each row's id and read position.
pub fn advance(
    positions: &[(i64, Cursor)],
    delivered: Vec<i64>,
    set_aside: &HashSet<i64>,
) -> Progress {
    let settled: HashSet<i64> = delivered.iter().chain(set_aside).copied().collect();
    let prefix = positions
        .iter()
        .take_while(|(id, _)| settled.contains(id))
        .count();
    let beyond: HashSet<i64> = positions[prefix..].iter().map(|(id, _)| *id).collect();
    Progress {
        mark: delivered
            .iter()
            .copied()
            .filter(|id| beyond.contains(id))
            .collect(),
        delivered,
        cursor: prefix.checked_sub(1).map(|last| positions[last].1),
    }
}

/// Wait for the mark in flight, if any (marks finish in batch order, one at a time).
async fn finish_marking(marking: &mut Option<Marking>) {
    if let Some(mk) = marking.take() {
        if let Err(e) = mk.task.await {
            tracing::error!(error = %e, rows = mk.ids.len(), "mark task failed; the rows stay pending and will be published again");
        }
    }
}

/// Database writes the loop must not give up on; cheap to clone into a task.
#[derive(Clone)]
struct Writer {
    store: OutboxStore,
    health: Arc<Health>,
}

impl Writer {
    /// Run a write until it succeeds (its result) or shutdown interrupts it (`None`: the rows
    /// stay pending and the next run handles them again). Giving up earlier would republish them.
    async fn write_retrying<T, F, Fut>(
        &self,
        what: &str,
        cancel: &CancellationToken,
        write: F,
    ) -> Option<T>
    where
        F: Fn(OutboxStore) -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let mut backoff = retry_backoff();
        loop {
            match write(self.store.clone()).await {
                Ok(done) => return Some(done),
                Err(_) if cancel.is_cancelled() => return None,
                Err(e) => self.database_failed(what, &e, &mut backoff, cancel).await,
            }
        }
    }

    async fn database_failed(
        &self,
        what: &str,
        e: &sqlx::Error,
        backoff: &mut backoff::ExponentialBackoff,
        cancel: &CancellationToken,
    ) {
        self.health.database_ok.store(false, Ordering::Relaxed);
        let wait = backoff.next_backoff();
        tracing::warn!(step = what, error = %e, hint = crate::outbox::hint(e, self.store.table()), retry_in = ?wait, "database error");
        sleep_or_cancel(wait, cancel).await;
    }
}

/// A row that can never be published as it is.
struct Poison {
    id: i64,
    kind: &'static str,
    reason: String,
    original: Poisoned,
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

/// The poison that Kafka rejected, with a copy of each message (for a dead-letter copy).
fn rejected(messages: &[Message], park: Vec<(i64, &'static str, String)>) -> Vec<Poison> {
    park.into_iter()
        .map(|(id, kind, reason)| {
            let m = messages.iter().find(|m| m.id == id);
            Poison {
                id,
                kind,
                reason,
                original: Poisoned::Message(m.expect("settle names only batch rows").clone()),
            }
        })
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

async fn sleep_or_cancel(wait: Option<Duration>, cancel: &CancellationToken) {
    let wait = wait.unwrap_or(Duration::from_secs(10));
    tokio::select! { _ = cancel.cancelled() => {}, _ = tokio::time::sleep(wait) => {} }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: i64, key: Option<&str>) -> Message {
        Message {
            id,
            topic: "t".into(),
            key: key.map(Into::into),
            payload: None,
            headers: vec![],
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn all_delivered_are_marked() {
        let m = [msg(1, Some("a")), msg(2, Some("b")), msg(3, None)];
        let s = settle(&m, vec![Ok(()), Ok(()), Ok(())], false);
        assert_eq!(s.delivered, vec![1, 2, 3]);
        assert!(s.park.is_empty() && s.retry.is_empty() && !s.fatal);
    }

    #[test]
    fn transient_failure_blocks_later_rows_of_its_key_only() {
        let m = [
            msg(1, Some("a")),
            msg(2, Some("a")),
            msg(3, Some("b")),
            msg(4, Some("a")),
            msg(5, None),
        ];
        let outcomes = vec![
            Err(Failure::Transient("timed out".into())),
            Ok(()),
            Ok(()),
            Err(Failure::Poison {
                kind: "too_large",
                reason: "big".into(),
            }),
            Ok(()),
        ];
        let s = settle(&m, outcomes, false);
        assert_eq!(
            s.delivered,
            vec![3, 5],
            "2 was acked after 1 failed: it must not be marked ahead of 1"
        );
        assert_eq!(s.retry, vec![(1, "timed out".to_string())]);
        assert!(
            s.park.is_empty(),
            "4 waits behind 1; its poison is decided on its own turn"
        );
    }

    #[test]
    fn poison_is_parked_and_does_not_block() {
        let m = [msg(1, Some("a")), msg(2, Some("a"))];
        let s = settle(
            &m,
            vec![
                Err(Failure::Poison {
                    kind: "unknown_topic",
                    reason: "x".into(),
                }),
                Ok(()),
            ],
            false,
        );
        assert_eq!(s.park, vec![(1, "unknown_topic", "x".to_string())]);
        assert_eq!(s.delivered, vec![2]);
    }

    #[test]
    fn the_same_key_on_another_topic_is_another_stream() {
        let mut other = msg(2, Some("a"));
        other.topic = "u".into();
        let m = [msg(1, Some("a")), other];
        let s = settle(&m, vec![Err(Failure::Transient("x".into())), Ok(())], false);
        assert_eq!(s.delivered, vec![2]);
    }

    #[test]
    fn with_block_key_poison_holds_back_its_stream() {
        let m = [msg(1, Some("a")), msg(2, Some("a")), msg(3, Some("b"))];
        let poison = Failure::Poison {
            kind: "too_large",
            reason: "big".into(),
        };
        let s = settle(&m, vec![Err(poison), Ok(()), Ok(())], true);
        assert_eq!(s.park, vec![(1, "too_large", "big".to_string())]);
        assert_eq!(s.delivered, vec![3], "2 waits until the operator handles 1");
    }

    #[test]
    fn null_keys_never_block_each_other() {
        let m = [msg(1, None), msg(2, None)];
        let s = settle(&m, vec![Err(Failure::Transient("x".into())), Ok(())], false);
        assert_eq!(s.delivered, vec![2]);
    }

    #[test]
    fn pace_polls_fast_while_busy_and_turns_idle_after_empty_reads() {
        let poll = Duration::from_secs(1);
        let mut p = Pace::start();
        assert_eq!(p.wait(poll), Duration::ZERO, "read at once on start");
        p = p.after_read(5);
        assert_eq!(
            p.wait(poll),
            Duration::ZERO,
            "rows found: read again at once"
        );
        let mut waits = vec![];
        while !p.is_idle() {
            p = p.after_read(0);
            waits.push(p.wait(poll).as_millis());
        }
        assert_eq!(&waits[..5], &[1, 2, 4, 8, 8], "backs off to 8 ms");
        let polled: u128 = waits.iter().sum();
        assert!(
            (50..70).contains(&polled),
            "idle after ~50 ms of empty reads: {waits:?}"
        );
        assert_eq!(
            p.wait(poll),
            Duration::ZERO,
            "one more read after asking for NOTIFY"
        );
        p = p.after_read(0);
        assert!(p.is_idle());
        assert_eq!(
            p.wait(poll),
            poll,
            "then sleep until NOTIFY or the poll interval"
        );
        p = p.after_read(1);
        assert_eq!(p, Pace::start(), "rows while idle: busy again");
    }

    #[test]
    fn append_cursor_stops_before_the_first_row_to_retry() {
        let pos = |ids: &[i64]| -> Vec<(i64, Cursor)> {
            ids.iter().map(|&id| (id, (100 + id, id))).collect()
        };
        let none = HashSet::new();
        let all = advance(&pos(&[3, 1, 2]), vec![3, 1, 2], &none);
        assert_eq!(all.cursor, Some((102, 2)), "the last row in read order");
        assert!(
            all.mark.is_empty(),
            "no per-row write when all went through"
        );

        // 2 failed transiently: the cursor stops at 1; 4 was delivered after it and is marked
        // so the retry that reads 2 again does not publish 4 twice; 5 (retry) stays pending.
        let parked: HashSet<i64> = [3].into();
        let p = advance(&pos(&[1, 2, 3, 4, 5]), vec![1, 4], &parked);
        assert_eq!(p.cursor, Some((101, 1)));
        assert_eq!(p.mark, vec![4]);
        assert_eq!(p.delivered, vec![1, 4]);

        let stuck = advance(&pos(&[1, 2]), vec![2], &none);
        assert_eq!(stuck.cursor, None, "the head must be retried: no move");
        assert_eq!(stuck.mark, vec![2]);

        let poison_only = advance(&pos(&[7]), vec![], &[7].into());
        assert_eq!(poison_only.cursor, Some((107, 7)), "a parked row is passed");
    }

    #[test]
    fn fatal_is_flagged() {
        let m = [msg(1, Some("a"))];
        let s = settle(
            &m,
            vec![Err(Failure::Fatal("Fatal: out of order sequence".into()))],
            false,
        );
        assert!(s.fatal);
    }
}
