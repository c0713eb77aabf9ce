//! In-process tests of the loop: an in-memory reader by state (as claim mode reads), a
//! scripted sink and a scripted lease, for interleavings that real services reach only by
//! luck: the lease lost mid-batch, a failed row with later batches in flight, a progress write
//! failing and retried.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::{PoisonPolicy, Relay, Settings};
use crate::event::{Message, MessageRules, OutboxRow};
use crate::kafka::{Failure, Published, Receipt, Reports, Sink};
use crate::lease::Leadership;
use crate::read::{BatchLimit, Fence, Ledger, Progress, Reader, Recorded};
use crate::settle::Delivered;
use crate::table::TableName;
use crate::telemetry::{Health, Metrics};

/// The shared world: the table, what Kafka acknowledged, the lease.
#[derive(Default)]
struct World {
    rows: Vec<OutboxRow>,
    /// Durable progress: rows marked one by one.
    marked: HashSet<i64>,
    /// Every acknowledged message, in order, as (id, key).
    acked: Vec<(i64, String)>,
    /// Ids to fail transiently the first time they are published.
    fail_once: HashSet<i64>,
    /// Publish calls left to hang (never report) before publishing works again.
    hang: usize,
    publish_calls: usize,
    /// Progress writes left to fail before writes succeed.
    record_failures: usize,
    records: usize,
    leading: bool,
    epoch: i64,
    /// Lease checks left to fail (the database unreachable).
    lease_errors: usize,
    /// Whether the reader holds a stream it drops when the lease cannot be checked (log
    /// mode), and how many times it did.
    streams: bool,
    released: usize,
    /// How long a batch's delivery reports take.
    report_delay: Duration,
    /// Batches handed over whose reports are not in yet, now and at most.
    unreported: usize,
    max_unreported: usize,
    /// How long a progress write takes.
    record_delay: Duration,
    /// The sink is transactional (exactly-once): its transactions, in order.
    transactional: bool,
    txns: Vec<Txn>,
}

type Shared = Arc<Mutex<World>>;

fn world(rows: usize, keys: usize) -> Shared {
    let rows = (1..=rows as i64)
        .map(|id| OutboxRow {
            id,
            topic: "t".into(),
            key: Some(format!("k{}", id % keys as i64)),
            payload: Some(b"{}".to_vec()),
            headers: None,
            created_at: chrono::Utc::now(),
            xid: None,
            unreadable: None,
        })
        .collect();
    Arc::new(Mutex::new(World {
        rows,
        leading: true,
        epoch: 1,
        ..World::default()
    }))
}

/// Reads pending rows by state in id order, leaving out the rows in flight, as claim mode does.
struct MemReader {
    w: Shared,
}

impl Reader for MemReader {
    type Position = ();
    type Ledger = MemLedger;

    fn ledger(&self) -> MemLedger {
        MemLedger(self.w.clone())
    }

    async fn on_new_epoch(&mut self) -> Result<(), sqlx::Error> {
        Ok(())
    }

    async fn next_batch(
        &mut self,
        limit: BatchLimit,
        in_flight: &[i64],
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let w = self.w.lock().unwrap();
        Ok(w.rows
            .iter()
            .filter(|r| !w.marked.contains(&r.id) && !in_flight.contains(&r.id))
            .take(limit.rows as usize)
            .cloned()
            .collect())
    }

    async fn release_server(&mut self) -> bool {
        let mut w = self.w.lock().unwrap();
        w.released += 1;
        w.streams
    }

    /// The ids this batch marks, as text (the scripted sink keeps it per transaction).
    fn position(&self, progress: &Progress<()>, _unrecorded: &[i64]) -> Option<Vec<u8>> {
        let ids: Vec<String> = progress.mark.iter().map(i64::to_string).collect();
        Some(ids.join(",").into_bytes())
    }

    fn progress(&mut self, delivered: Delivered, _set_aside: &HashSet<i64>) -> Progress<()> {
        let mark = delivered.ids().to_vec();
        Progress {
            delivered,
            mark,
            position: None,
        }
    }
}

#[derive(Clone)]
struct MemLedger(Shared);

impl Ledger for MemLedger {
    type Position = ();

    async fn record(
        &self,
        progress: &Progress<()>,
        fence: &Fence,
    ) -> Result<Recorded, sqlx::Error> {
        let delay = self.0.lock().unwrap().record_delay;
        tokio::time::sleep(delay).await;
        let mut w = self.0.lock().unwrap();
        if w.record_failures > 0 {
            w.record_failures -= 1;
            return Err(sqlx::Error::PoolTimedOut);
        }
        if fence.epoch != w.epoch {
            return Ok(Recorded::Fenced);
        }
        // The invariant: nothing is recorded without its own acknowledgement.
        let acked: HashSet<i64> = w.acked.iter().map(|(id, _)| *id).collect();
        for id in progress.delivered.ids().iter().chain(&progress.mark) {
            assert!(
                acked.contains(id),
                "row {id} recorded without a delivery report"
            );
        }
        // ...and never ahead of an earlier row of its key.
        let key = |id: i64| w.rows[id as usize - 1].key.clone();
        for id in &progress.mark {
            let earlier_unmarked = w.rows[..*id as usize - 1].iter().any(|r| {
                r.key == key(*id) && !w.marked.contains(&r.id) && !progress.mark.contains(&r.id)
            });
            assert!(
                !earlier_unmarked,
                "row {id} recorded ahead of an earlier row of its key"
            );
        }
        w.marked.extend(&progress.mark);
        w.records += 1;
        Ok(Recorded::Done)
    }

    async fn park(&self, _rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        Ok(())
    }
    async fn dead_lettered(&self, _rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        Ok(())
    }
    async fn note_retry(&self, _rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        Ok(())
    }
}

#[derive(Clone)]
struct ScriptedSink(Shared);

/// A Kafka transaction as the scripted transactional sink saw it: the ids sent in it, and the
/// position committed with it.
#[derive(Debug, Default)]
struct Txn {
    sent: Vec<i64>,
    position: Option<Vec<u8>>,
}

impl Sink for ScriptedSink {
    async fn send(
        &self,
        messages: Arc<[Message]>,
        _cancel: &CancellationToken,
        _flush: Duration,
    ) -> Reports {
        let (w, delay) = (self.0.clone(), self.0.lock().unwrap().report_delay);
        let hang = {
            let mut w = self.0.lock().unwrap();
            w.unreported += 1;
            w.max_unreported = w.max_unreported.max(w.unreported);
            w.publish_calls += 1;
            let hang = w.hang > 0;
            w.hang = w.hang.saturating_sub(1);
            hang
        };
        let mut published = Published::default();
        if !hang {
            let mut w = self.0.lock().unwrap();
            if w.transactional {
                let open = w.txns.last().is_some_and(|t| t.position.is_none());
                if !open {
                    w.txns.push(Txn::default());
                }
                let t = w.txns.last_mut().unwrap();
                t.sent.extend(messages.iter().map(|m| m.id));
            }
            for m in messages.iter() {
                let outcome = if w.fail_once.remove(&m.id) {
                    Err(Failure::Transient("scripted timeout".into()))
                } else {
                    w.acked.push((m.id, m.key.clone().unwrap_or_default()));
                    Ok(())
                };
                published.outcomes.push(outcome);
                let now = std::time::SystemTime::now();
                published.receipts.push(Receipt {
                    handed_off: now,
                    reported: now,
                    position: None,
                });
            }
        }
        Box::pin(async move {
            if hang {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(delay).await;
            w.lock().unwrap().unreported -= 1;
            published
        })
    }
    fn fatal_error(&self) -> Option<String> {
        None
    }
    fn recreate(&self) -> Result<Self, String> {
        Ok(self.clone())
    }
    async fn check_connection(&self, _timeout: Duration) -> Result<(), String> {
        Ok(())
    }
    fn transactional(&self) -> bool {
        self.0.lock().unwrap().transactional
    }
    async fn commit(&self, position: Vec<u8>, _timeout: Duration) -> Result<(), String> {
        let mut w = self.0.lock().unwrap();
        match w.txns.last_mut() {
            Some(t) if t.position.is_none() => {
                t.position = Some(position);
                Ok(())
            }
            _ => Err("no open transaction".into()),
        }
    }
}

struct ScriptedLease(Shared);

impl Leadership for ScriptedLease {
    async fn ensure(&mut self) -> Result<bool, sqlx::Error> {
        let mut w = self.0.lock().unwrap();
        if w.lease_errors > 0 {
            w.lease_errors -= 1;
            return Err(sqlx::Error::PoolTimedOut);
        }
        Ok(w.leading)
    }
    fn epoch(&self) -> i64 {
        self.0.lock().unwrap().epoch
    }
    fn holder(&self) -> &str {
        "test"
    }
    fn renew_every(&self) -> Duration {
        Duration::from_millis(100)
    }
    async fn want_wakeups(&self, _wanted: bool) -> Result<(), sqlx::Error> {
        Ok(())
    }
    async fn release(&mut self) {}
}

/// Run the loop over `w` until `done` holds (or 60 s of virtual time), then stop it.
async fn run_until(w: &Shared, batch_size: u32, done: impl Fn(&World) -> bool) -> Metrics {
    let metrics = Metrics::new();
    let settings = Settings {
        table: TableName::parse("outbox").unwrap(),
        batch_size,
        batch_bytes: 1 << 20,
        in_flight_batches: 4,
        poll_interval: Duration::from_millis(50),
        listen: false,
        stall_timeout: Duration::from_secs(30),
        shutdown_timeout: Duration::from_secs(5),
        poison_policy: PoisonPolicy::Park,
        dead_letter_topic: None,
        rules: MessageRules::default(),
    };
    let reader = MemReader { w: w.clone() };
    let (sink, _) = watch::channel(ScriptedSink(w.clone()));
    let (spans, _) = crate::spans::Tracer::new(None, "outbox".into(), metrics.clone());
    let relay = Relay::new(
        settings,
        reader,
        sink,
        ScriptedLease(w.clone()),
        metrics.clone(),
        Arc::new(Health::new(Duration::from_secs(60))),
        Arc::new(Notify::new()),
        spans,
    );
    let cancel = CancellationToken::new();
    let task = tokio::spawn(relay.run(cancel.clone()));
    let started = tokio::time::Instant::now();
    while !done(&w.lock().unwrap()) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the loop did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    task.await.unwrap();
    metrics
}

/// Every row acknowledged at least once, and per key in id order by each row's last
/// acknowledgement: a resent suffix follows the gap it fills (duplicates, never a row
/// overtaken for good). The scripted sink's gap is like librdkafka's timed-out message.
fn assert_all_in_key_order(w: &World) {
    let mut last: HashMap<i64, usize> = HashMap::new();
    for (at, (id, _)) in w.acked.iter().enumerate() {
        last.insert(*id, at);
    }
    assert_eq!(last.len(), w.rows.len(), "every row acknowledged");
    let mut by_key: HashMap<&str, Vec<(usize, i64)>> = HashMap::new();
    for (id, key) in &w.acked {
        by_key.entry(key).or_default().push((last[id], *id));
    }
    for (key, mut ids) in by_key {
        ids.sort();
        ids.dedup();
        assert!(
            ids.windows(2).all(|p| p[0].1 < p[1].1),
            "key {key} out of order: {ids:?}"
        );
    }
}

/// Rows acknowledged more than once.
fn acked_again(w: &World) -> HashSet<i64> {
    let mut seen = HashSet::new();
    w.acked
        .iter()
        .filter(|(id, _)| !seen.insert(*id))
        .map(|(id, _)| *id)
        .collect()
}

fn recorded_all(w: &World) -> bool {
    w.marked.len() == w.rows.len()
}

#[tokio::test(start_paused = true)]
async fn a_failing_progress_write_is_retried_until_it_is_durable() {
    let w = world(250, 7);
    w.lock().unwrap().record_failures = 3;
    let metrics = run_until(&w, 100, recorded_all).await;
    let w = w.lock().unwrap();
    assert_all_in_key_order(&w);
    assert_eq!(w.acked.len(), 250, "a retried write republishes nothing");
    assert_eq!(
        metrics.published.get(),
        250,
        "counted once each, after the write"
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_abandoned_when_the_lease_is_lost_is_published_again_by_the_next_epoch() {
    let w = world(300, 5);
    w.lock().unwrap().hang = 1; // the first batch gets no delivery report
    let (w2, lost) = (w.clone(), CancellationToken::new());
    let flip = tokio::spawn({
        let lost = lost.clone();
        async move {
            while w2.lock().unwrap().publish_calls == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            w2.lock().unwrap().leading = false; // another replica takes over mid-batch
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut w = w2.lock().unwrap();
            assert_eq!(w.records, 0, "nothing recorded while deposed");
            (w.leading, w.epoch) = (true, 2); // and this replica leads again, in a new epoch
            lost.cancel();
        }
    });
    run_until(&w, 100, |w| w.epoch == 2 && recorded_all(w)).await;
    flip.await.unwrap();
    assert!(lost.is_cancelled());
    let w = w.lock().unwrap();
    assert_all_in_key_order(&w);
    // The first batch had no report: published once, by the new epoch. Later batches
    // acknowledged before the lease was lost were not recorded: published again.
    let again = acked_again(&w);
    assert!(again.iter().all(|id| *id > 100), "{again:?}");
    assert!(
        w.publish_calls >= 4,
        "the abandoned batch was published again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backlog_is_published_several_batches_at_a_time_within_the_bound() {
    let w = world(2000, 7);
    w.lock().unwrap().report_delay = Duration::from_millis(20);
    run_until(&w, 100, |w| w.marked.len() == w.rows.len()).await;
    let w = w.lock().unwrap();
    assert_all_in_key_order(&w);
    assert_eq!(w.acked.len(), 2000, "no failure, no duplicate");
    assert_eq!(
        w.max_unreported, 4,
        "batches overlap up to --in-flight-batches (4), never more"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_row_holds_back_its_key_in_the_later_batches_in_flight() {
    let w = world(1000, 7);
    {
        let mut w = w.lock().unwrap();
        w.report_delay = Duration::from_millis(20);
        w.fail_once.insert(150);
    }
    // The ledger asserts that no row is marked ahead of an earlier row of its key.
    run_until(&w, 100, |w| w.marked.len() == w.rows.len()).await;
    let w = w.lock().unwrap();
    assert_all_in_key_order(&w);
    assert!(
        w.max_unreported >= 2,
        "later batches were in flight when 150 failed"
    );
    let again = acked_again(&w);
    assert!(
        again.iter().any(|id| *id > 200),
        "rows of 150's key in later batches were published again after it: {again:?}"
    );
    assert!(
        again.iter().all(|id| id % 7 == 150 % 7),
        "only 150's key is published again: {again:?}"
    );
}

/// The lease cannot be checked while batches are in flight. A reader holding a stream (log
/// mode) releases it, and the batches in flight are given up and published again; any other
/// reader keeps them (nothing published twice). Either way every row is recorded, in key order.
#[tokio::test(start_paused = true)]
async fn an_unreachable_lease_releases_the_readers_stream_and_only_then_the_batches_in_flight() {
    for streams in [true, false] {
        let w = world(600, 5);
        {
            let mut w = w.lock().unwrap();
            w.report_delay = Duration::from_millis(50);
            w.streams = streams;
        }
        let w2 = w.clone();
        let fail = tokio::spawn(async move {
            while w2.lock().unwrap().publish_calls < 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            w2.lock().unwrap().lease_errors = 1;
        });
        run_until(&w, 100, recorded_all).await;
        fail.await.unwrap();
        let w = w.lock().unwrap();
        assert_all_in_key_order(&w);
        assert_eq!(w.released, 1, "released once, on the failed check");
        let again = acked_again(&w);
        if streams {
            assert!(
                !again.is_empty(),
                "the batches in flight were published again"
            );
        } else {
            assert!(again.is_empty(), "nothing published twice: {again:?}");
        }
    }
}

/// Exactly-once: a transaction holds one batch and commits the position of exactly the rows
/// sent in it, even when a short batch (a trickle, not a backlog) leaves room for more rows
/// within --in-flight-batches' row bound.
#[tokio::test(start_paused = true)]
async fn a_transaction_commits_the_position_of_exactly_the_rows_it_sent() {
    let w = world(250, 7);
    {
        let mut w = w.lock().unwrap();
        w.transactional = true;
        w.report_delay = Duration::from_millis(20);
        // Marks lag, so the bound's room is sometimes what a short batch exactly fills.
        w.record_delay = Duration::from_millis(30);
    }
    let w2 = w.clone();
    // Rows arrive in small groups, so batches are short and the bound leaves room beside them.
    let visible = tokio::spawn(async move {
        let all = std::mem::take(&mut w2.lock().unwrap().rows);
        for chunk in all.chunks(7) {
            w2.lock().unwrap().rows.extend_from_slice(chunk);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        w2.lock().unwrap().rows.len()
    });
    run_until(&w, 10, |w| w.rows.len() == 250 && recorded_all(w)).await;
    assert_eq!(visible.await.unwrap(), 250);
    let w = w.lock().unwrap();
    assert_all_in_key_order(&w);
    assert!(w.txns.len() > 5, "{} transactions", w.txns.len());
    for t in &w.txns {
        let position =
            String::from_utf8(t.position.clone().expect("every transaction committed")).unwrap();
        let sent: Vec<String> = t.sent.iter().map(i64::to_string).collect();
        assert_eq!(
            position,
            sent.join(","),
            "the position covers what the transaction sent"
        );
    }
}
