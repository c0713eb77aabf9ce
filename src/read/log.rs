//! `--read-mode log`: the outbox from the write-ahead log. The relay consumes a logical
//! replication slot (pgoutput, on a publication of the outbox table's inserts) and publishes
//! each transaction's events in commit order, statement order within a transaction: per-key
//! order is commit order for every transaction shape. Events come as table inserts or as
//! transactional messages written by the table's emit function (`pg_logical_emit_message`),
//! which leave no row behind.
//!
//! Nothing is written per event. Progress is the slot's confirmed position, which moves only
//! past transactions whose every event has its own delivery report (or was set aside): the
//! reader counts each transaction's unsettled events; the ledger raises the confirmed LSN the
//! stream task reports to the server. While nothing is in flight, a keepalive's WAL end is
//! confirmed too, so an idle outbox in a busy database pins no WAL.
//!
//! An event that has to be read again (a transient failure, an abandoned batch, a new lease
//! epoch) restarts the stream from the confirmed position: the server sends every transaction
//! after it again (duplicates within the in-flight window, never a gap or a reordering).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, SslMode, TlsConfig,
};
use prometheus::Histogram;
use serde::Deserialize;
use sqlx::AssertSqlSafe;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::pgoutput::{pg_time, Relations};
use super::{BatchLimit, ClaimReader, Fence, Ledger, Progress, Reader, Recorded};
use crate::event::OutboxRow;
use crate::secret::Secret;
use crate::settle::Delivered;
use crate::store::slot::LogServer;
use crate::store::{OutboxStore, SetAside};
pub use crate::table::{check_name, default_name, LogNames, MESSAGE_PREFIX};
use crate::table::{ReadMode, TableName};

/// Events buffered between the stream task and the reader (the crate buffers as many again;
/// past that the server is held back by TCP).
const BUFFERED: usize = 4096;

/// Where the replication connection goes: the database URL's parts, the slot, the publication.
#[derive(Clone)]
pub struct LogSource {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    pub database: String,
    /// libpq's sslmode (disable, prefer, require, verify-ca, verify-full).
    pub ssl_mode: String,
    pub ssl_root_cert: Option<PathBuf>,
    pub slot: String,
    pub publication: String,
}

impl std::fmt::Debug for LogSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LogSource({}@{}:{}/{} slot {} publication {})",
            self.user, self.host, self.port, self.database, self.slot, self.publication
        )
    }
}

impl LogSource {
    fn config(&self, start: u64) -> ReplicationConfig {
        let tls = match self.ssl_mode.as_str() {
            "disable" => TlsConfig::disabled(),
            "require" => TlsConfig::require(),
            "verify-ca" => TlsConfig::verify_ca(self.ssl_root_cert.clone()),
            // The pool (sqlx, like libpq) checks an IP address host against the certificate's
            // IP addresses; the crate refuses an IP host unless it is also given as the name
            // to verify, which rustls then checks the same way.
            "verify-full" if self.host.parse::<std::net::IpAddr>().is_ok() => {
                TlsConfig::verify_full(self.ssl_root_cert.clone()).with_sni_hostname(&self.host)
            }
            "verify-full" => TlsConfig::verify_full(self.ssl_root_cert.clone()),
            _ => TlsConfig {
                mode: SslMode::Prefer,
                ..TlsConfig::default()
            },
        };
        let password = self.password.as_ref().map(|p| p.expose()).unwrap_or("");
        ReplicationConfig::new(
            self.host.clone(),
            self.user.clone(),
            password,
            self.database.clone(),
            self.slot.clone(),
            self.publication.clone(),
        )
        .with_port(self.port)
        .with_tls(tls)
        .with_start_lsn(Lsn(start))
        .with_binary(true)
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(5))
        .with_buffer_size(BUFFERED)
        .with_max_message_size(256 << 20)
        .with_application_name("outbox-relay-log")
    }
}

/// What the stream task hands the reader, in stream order.
#[derive(Debug)]
enum Item {
    /// A transaction starts; `final_lsn` is its commit's LSN (which names it).
    Begin {
        final_lsn: u64,
    },
    Row(OutboxRow),
    Commit {
        end: u64,
    },
    /// The server's WAL end: everything committed before it was sent.
    KeepAlive {
        wal_end: u64,
    },
    /// The stream ended; it must be started again.
    Failed(String),
}

/// A transaction read from the stream and not yet past the confirmed position.
#[derive(Debug)]
struct Txn {
    /// Its commit's LSN, known from its start: the transaction's name in a position.
    final_lsn: u64,
    /// Its commit's end (unknown until the commit arrives).
    end: Option<u64>,
    /// Events handed out and not yet delivered or set aside, plus events not yet handed out.
    unsettled: usize,
    /// Events handed out (and, after a take-over, events Kafka already holds).
    handed: usize,
    /// Exactly-once: its first events Kafka already committed, still to skip.
    skip: usize,
}

struct Stream {
    items: mpsc::Receiver<Item>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

pub struct LogReader {
    store: OutboxStore,
    source: LogSource,
    prefix: String,
    wake: Arc<Notify>,
    /// Observes each transaction's delay from its commit to its arrival here.
    source_delay: Option<Histogram>,
    confirmed: Arc<AtomicU64>,
    stream: Option<Stream>,
    /// Transactions read and not yet confirmed, oldest first; `first_seq` is the front's number.
    txns: VecDeque<Txn>,
    first_seq: u64,
    /// The batches handed out and not yet settled.
    handed: VecDeque<Handed>,
    /// Taking over from another read mode: its pending rows are published (and marked) first.
    catch_up: Option<ClaimReader>,
    /// Stream rows of transactions committed before this position may have been published by
    /// the mode before (and marked): they are checked and skipped.
    check_until: u64,
    /// The end of the last commit read from the stream.
    last_end: u64,
    /// Read only up to this position (the tail of log mode, when another mode takes over).
    stop_at: Option<u64>,
    /// The stream has passed `stop_at`.
    reached: bool,
    /// Stopping: batches end at the next commit.
    finishing: bool,
    /// An item taken from the stream that did not fit the last batch.
    held: Option<Item>,
    /// Read again from the confirmed position before the next batch.
    restart: bool,
    /// Emitted events in flight (they have no row): what parking one needs.
    emitted: Emitted,
    /// The end of the last transaction read and wholly settled (or where the stream started).
    passed: u64,
    /// Exactly-once, after a take-over: how many first events of the transaction with this
    /// commit LSN Kafka already holds.
    split: Option<(u64, usize)>,
    /// The last settled batch came from the catch-up (its position is claim mode's).
    caught_up_last: bool,
}

type Emitted = Arc<Mutex<HashMap<i64, OutboxRow>>>;

/// A batch handed out: by the catch-up, or from the stream (each row's id and transaction).
enum Handed {
    CatchUp,
    Stream(Vec<(i64, u64)>),
}

impl LogReader {
    pub fn new(store: OutboxStore, source: LogSource, wake: Arc<Notify>) -> LogReader {
        let prefix = format!("{MESSAGE_PREFIX}{}", store.table());
        LogReader {
            store,
            source,
            prefix,
            wake,
            source_delay: None,
            confirmed: Arc::new(AtomicU64::new(0)),
            stream: None,
            txns: VecDeque::new(),
            first_seq: 0,
            handed: VecDeque::new(),
            catch_up: None,
            check_until: 0,
            last_end: 0,
            stop_at: None,
            reached: false,
            finishing: false,
            held: None,
            restart: false,
            emitted: Arc::default(),
            passed: 0,
            split: None,
            caught_up_last: false,
        }
    }

    /// Observe in `delay` how long after its commit each transaction arrives.
    pub fn observing(mut self, delay: Histogram) -> LogReader {
        self.source_delay = Some(delay);
        self
    }

    /// Read only what was committed before `end` (and skip rows already marked published up
    /// to there): log mode's tail, published by the read mode that takes over.
    pub fn until(mut self, end: u64) -> LogReader {
        self.stop_at = Some(end);
        self
    }

    /// With [`LogReader::until`]: everything committed before the end is read and settled.
    pub fn drained(&self) -> bool {
        self.reached && self.settled() && self.held.is_none()
    }

    /// Stop the stream (reporting the confirmed position first) and forget what was read.
    async fn stop(&mut self) {
        if let Some(stream) = self.stream.take() {
            stream.stop.cancel();
            drop(stream.items);
            let _ = stream.task.await;
        }
        self.txns.clear();
        self.handed.clear();
        self.last_end = 0;
        self.reached = false;
        self.held = None;
        self.restart = false;
        self.emitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    async fn start(&mut self) -> Result<(), sqlx::Error> {
        let start = self.confirmed.load(Ordering::Acquire);
        self.passed = start;
        let client = match self.connect(start).await {
            Err(e) if sqlstate(&e) == Some("55006") => {
                // The slot is held by another session: a previous leader's stream (a deposed
                // or paused replica). The lease is ours, so end that stream: this is the fence.
                let ended: Vec<i32> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(active_pid)::int FROM pg_replication_slots \
                     WHERE slot_name = $1 AND active_pid IS NOT NULL AND active_pid <> pg_backend_pid()",
                )
                .bind(&self.source.slot)
                .fetch_all(self.store.pool())
                .await?;
                tracing::warn!(slot = %self.source.slot, sessions = ended.len(),
                    "the replication slot was in use by another session; ended it (this replica holds the lease)");
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.connect(start).await
            }
            other => other,
        }
        .map_err(|e| stream_error(&self.source, &e))?;
        let (tx, items) = mpsc::channel(BUFFERED);
        let stop = CancellationToken::new();
        let task = tokio::spawn(pump(
            client,
            tx,
            self.wake.clone(),
            self.source_delay.clone(),
            self.confirmed.clone(),
            self.prefix.clone(),
            self.store.table().clone(),
            stop.clone(),
        ));
        self.stream = Some(Stream { items, stop, task });
        tracing::info!(slot = %self.source.slot, from = %Lsn(start), "reading the outbox from the replication slot");
        Ok(())
    }

    async fn connect(&self, start: u64) -> Result<ReplicationClient, PgWireError> {
        let mut client = ReplicationClient::connect(self.source.config(start)).await?;
        client.wait_started().await?;
        Ok(client)
    }

    /// Pop the transactions at the front whose events are all settled; the last one's commit
    /// end is the new position.
    fn advance(&mut self) -> Option<u64> {
        let mut position = None;
        while let Some(Txn {
            end: Some(end),
            unsettled: 0,
            ..
        }) = self.txns.front()
        {
            position = Some(*end);
            self.passed = *end;
            self.txns.pop_front();
            self.first_seq += 1;
        }
        position
    }

    /// Taking over from another read mode: publish the rows it left pending, claim-style (read
    /// by state, marked once delivered), until none is left and nothing is in flight. Then
    /// record log mode with the current WAL position: stream rows committed before it may be
    /// among those marked, and are skipped ([`LogReader::skip_published`]). Rows committed
    /// before the slot was created are not in the stream: the catch-up is what publishes them.
    async fn catch_up(
        &mut self,
        limit: BatchLimit,
        in_flight: &[i64],
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let Some(claim) = self.catch_up.as_mut() else {
            return Ok(Vec::new());
        };
        let rows = claim.next_batch(limit, in_flight).await?;
        if !rows.is_empty() {
            self.handed.push_back(Handed::CatchUp);
            return Ok(rows);
        }
        if !in_flight.is_empty() {
            return Ok(rows);
        }
        super::set_mode(&self.store, ReadMode::Log, Some(self.check_until)).await?;
        self.catch_up = None;
        tracing::info!(check_until = %Lsn(self.check_until), "caught up: streaming from the slot");
        Ok(rows)
    }

    /// Leave out the table rows of `rows` that are already marked published or parked (by the
    /// read mode before log mode); they count as settled.
    async fn skip_published(
        &mut self,
        rows: &mut Vec<OutboxRow>,
        handed: &mut Vec<(i64, u64)>,
    ) -> Result<(), sqlx::Error> {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).filter(|id| *id > 0).collect();
        let t = self.store.table().quoted();
        let marked: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT id FROM {t} WHERE id = ANY($1) AND (published_at IS NOT NULL OR failed_at IS NOT NULL)"
        )))
        .bind(&ids)
        .fetch_all(self.store.pool())
        .await?;
        if marked.is_empty() {
            return Ok(());
        }
        let marked: HashSet<i64> = marked.into_iter().collect();
        for (id, seq) in handed.iter() {
            if marked.contains(id) {
                self.settle_in(*seq);
            }
        }
        handed.retain(|(id, _)| !marked.contains(id));
        rows.retain(|r| !marked.contains(&r.id));
        tracing::info!(
            rows = marked.len(),
            "skipped stream rows the previous read mode had published"
        );
        if let Some(position) = self.advance() {
            self.confirm(position);
        }
        Ok(())
    }

    /// One event of transaction `seq` is settled.
    fn settle_in(&mut self, seq: u64) {
        let txn = seq
            .checked_sub(self.first_seq)
            .and_then(|i| self.txns.get_mut(i as usize));
        if let Some(txn) = txn {
            txn.unsettled = txn.unsettled.saturating_sub(1);
        }
    }

    fn confirm(&self, lsn: u64) {
        self.confirmed.fetch_max(lsn, Ordering::AcqRel);
    }

    /// Whether every event read so far is settled (nothing handed out, nothing open).
    fn settled(&self) -> bool {
        self.txns.is_empty() && self.handed.is_empty()
    }

    /// Apply one stream item. Returns a row to hand out.
    fn apply(&mut self, item: Item) -> Result<Option<OutboxRow>, sqlx::Error> {
        match item {
            Item::Begin { final_lsn } => self.txns.push_back(Txn {
                final_lsn,
                end: None,
                unsettled: 0,
                handed: 0,
                skip: self
                    .split
                    .filter(|(lsn, _)| *lsn == final_lsn)
                    .map_or(0, |(_, events)| events),
            }),
            Item::Row(row) => {
                let txn = self
                    .txns
                    .back_mut()
                    .filter(|t| t.end.is_none())
                    .ok_or_else(|| protocol("an event outside a transaction"))?;
                txn.handed += 1;
                if txn.skip > 0 {
                    // Kafka committed it before the take-over.
                    txn.skip -= 1;
                    return Ok(None);
                }
                txn.unsettled += 1;
                return Ok(Some(row));
            }
            Item::Commit { end } => {
                self.last_end = end;
                self.reached |= self.stop_at.is_some_and(|at| end >= at);
                let txn = self
                    .txns
                    .back_mut()
                    .filter(|t| t.end.is_none())
                    .ok_or_else(|| protocol("a commit outside a transaction"))?;
                txn.end = Some(end);
                if let Some(position) = self.advance() {
                    self.confirm(position);
                }
            }
            Item::KeepAlive { wal_end } => {
                self.reached |= self.stop_at.is_some_and(|at| wal_end >= at);
                if self.settled() {
                    self.confirm(wal_end);
                }
            }
            Item::Failed(why) => {
                self.restart = true;
                return Err(sqlx::Error::Protocol(why));
            }
        }
        Ok(None)
    }
}

fn protocol(what: &str) -> sqlx::Error {
    sqlx::Error::Protocol(format!("replication stream: {what}"))
}

impl Reader for LogReader {
    type Position = u64;
    type Ledger = LogLedger;

    fn ledger(&self) -> LogLedger {
        LogLedger {
            store: self.store.clone(),
            confirmed: self.confirmed.clone(),
            emitted: self.emitted.clone(),
        }
    }

    /// A new leader reads from the slot's confirmed position (the previous leader's stream,
    /// if still open, is ended when the slot is taken).
    /// After another read mode (or none), its pending rows are published first (see
    /// [`LogReader::catch_up`]).
    async fn on_new_epoch(&mut self) -> Result<(), sqlx::Error> {
        self.stop().await;
        self.confirmed.store(0, Ordering::Release);
        (self.passed, self.split) = (0, None);
        let (last, check_until) = super::last_mode(&self.store).await?;
        self.check_until = check_until.unwrap_or(0).max(self.stop_at.unwrap_or(0));
        self.catch_up = None;
        if last.as_deref() == Some("log") {
            return Ok(());
        }
        // Taking over: the previous mode may have published stream rows committed up to now
        // (its relay has stopped: the lease is ours).
        let now: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8")
            .fetch_one(self.store.pool())
            .await?;
        self.check_until = now as u64;
        let mut claim = match super::slot_snapshot(&self.store).await? {
            Some(snapshot) => ClaimReader::visible_in(self.store.clone(), &snapshot)
                .map_err(|e| sqlx::Error::Configuration(e.into()))?,
            None => {
                tracing::warn!("no snapshot of the slot's start was recorded (the slot was not made by \
                    `migrate --read-mode log`): every pending row is published from the table first, \
                    which can put a row ahead of an emitted event of its key committed before it");
                ClaimReader::new(self.store.clone(), false)
            }
        };
        claim.on_new_epoch().await?;
        tracing::info!(previous = last.as_deref().unwrap_or("none"),
            "log mode takes over: publishing the rows committed before the slot's start and left pending, then streaming");
        self.catch_up = Some(claim);
        Ok(())
    }

    async fn next_batch(
        &mut self,
        limit: BatchLimit,
        in_flight: &[i64],
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        if !in_flight.is_empty() && self.restart {
            // Read again once the batches in flight are settled (their transactions' counts
            // are still needed).
            return Ok(Vec::new());
        }
        // Nothing in flight but batches handed out without progress: they were abandoned.
        let abandoned = in_flight.is_empty() && !self.handed.is_empty();
        if self.restart || abandoned {
            self.stop().await;
        }
        if self.catch_up.is_some() {
            return self.catch_up(limit, in_flight).await;
        }
        if self.stream.is_none() {
            self.start().await?;
        }
        let (mut rows, mut bytes, mut handed) = (Vec::new(), 0u64, Vec::new());
        // A batch ends at a commit where it can: past the bound only to finish the transaction
        // in hand (up to twice the bound), so a graceful stop leaves no transaction half
        // published (its published part would come again after a restart).
        let (max_rows, max_bytes) = (limit.rows as usize, limit.bytes);
        while !self.reached {
            let open = self.txns.back().is_some_and(|t| t.end.is_none());
            let full = rows.len() >= max_rows || bytes >= max_bytes || self.finishing;
            if rows.len() >= 2 * max_rows || bytes >= 2 * max_bytes || (full && !open) {
                break;
            }
            let item = match self.held.take() {
                Some(item) => item,
                None => match self.stream.as_mut().map(|s| s.items.try_recv()) {
                    Some(Ok(item)) => item,
                    // The rest of a transaction is on its way (the server sends it whole).
                    Some(Err(mpsc::error::TryRecvError::Empty)) if open && !rows.is_empty() => {
                        let next = self.stream.as_mut().map(|s| s.items.recv());
                        match tokio::time::timeout(Duration::from_millis(20), next.unwrap()).await {
                            Ok(Some(item)) => item,
                            Ok(None) => Item::Failed("the replication stream ended".into()),
                            Err(_) => break,
                        }
                    }
                    Some(Err(mpsc::error::TryRecvError::Empty)) | None => break,
                    Some(Err(mpsc::error::TryRecvError::Disconnected)) => {
                        Item::Failed("the replication stream ended".into())
                    }
                },
            };
            if let Item::Row(row) = &item {
                let size = row.bytes();
                if !rows.is_empty() && bytes + size > 2 * max_bytes {
                    self.held = Some(item);
                    break;
                }
                bytes += size;
            }
            match self.apply(item) {
                Ok(Some(row)) => {
                    let seq = self.first_seq + self.txns.len() as u64 - 1;
                    if row.id < 0 {
                        let mut emitted = self.emitted.lock().unwrap_or_else(|e| e.into_inner());
                        emitted.insert(row.id, row.clone());
                    }
                    handed.push((row.id, seq));
                    rows.push(row);
                }
                Ok(None) => {}
                // Hand out what was read; the stream starts again before the next batch.
                Err(e) if !rows.is_empty() => {
                    tracing::warn!(error = %e, "replication stream ended; reading again from the confirmed position");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if self.last_end < self.check_until && rows.iter().any(|r| r.id > 0) {
            self.skip_published(&mut rows, &mut handed).await?;
        }
        if !handed.is_empty() {
            self.handed.push_back(Handed::Stream(handed));
        }
        Ok(rows)
    }

    /// Settle the oldest batch's events in their transactions; the position moves past the
    /// transactions now wholly settled. An event neither delivered nor set aside is read again:
    /// from the confirmed position, after the batches in flight.
    fn progress(&mut self, delivered: Delivered, set_aside: &HashSet<i64>) -> Progress<u64> {
        let batch = self.handed.pop_front();
        self.caught_up_last = matches!(batch, Some(Handed::CatchUp));
        let batch = match batch {
            Some(Handed::CatchUp) => {
                let Some(claim) = self.catch_up.as_mut() else {
                    return Progress {
                        delivered,
                        mark: Vec::new(),
                        position: None,
                    };
                };
                let p = claim.progress(delivered, set_aside);
                return Progress {
                    delivered: p.delivered,
                    mark: p.mark,
                    position: None,
                };
            }
            Some(Handed::Stream(batch)) => Some(batch),
            None => None,
        };
        let done: HashSet<i64> = delivered.ids().iter().copied().collect();
        if let Some(batch) = batch {
            let emitted = self.emitted.clone();
            let mut emitted = emitted.lock().unwrap_or_else(|e| e.into_inner());
            for (id, seq) in batch {
                if done.contains(&id) || set_aside.contains(&id) {
                    self.settle_in(seq);
                    if !set_aside.contains(&id) {
                        emitted.remove(&id);
                    }
                } else {
                    self.restart = true;
                }
            }
        }
        Progress {
            delivered,
            mark: Vec::new(),
            position: self.advance(),
        }
    }

    /// Exactly-once: `{"log":{"after":A,"split":[F,N]}}`: every transaction whose commit ends
    /// at or before LSN A is in Kafka, and so are the first N events of the transaction whose
    /// commit is at LSN F (the one a batch ended inside; no `split` when the batch ended at a
    /// commit). Called when every event handed out is settled. During the catch-up from
    /// another read mode, claim mode's position.
    fn position(&self, progress: &Progress<u64>, unrecorded: &[i64]) -> Option<Vec<u8>> {
        if self.caught_up_last {
            let claim = self.catch_up.as_ref()?;
            let p = Progress {
                delivered: Delivered::default(),
                mark: progress.mark.clone(),
                position: None,
            };
            return claim.position(&p, unrecorded);
        }
        let split = self
            .txns
            .front()
            .filter(|t| t.handed > 0)
            .map(|t| [t.final_lsn, t.handed as u64]);
        Some(
            LogPosition {
                after: self.passed,
                split,
            }
            .to_bytes(),
        )
    }

    /// Exactly-once, on taking over: stream from Kafka's position (the slot's confirmed
    /// position follows it, lazily) and skip the events of a split transaction that Kafka
    /// holds. A claim-mode position (from the catch-up, or from claim mode before a switch)
    /// has its rows marked.
    async fn adopt(&mut self, position: Option<&[u8]>) -> Result<(), sqlx::Error> {
        let Some(bytes) = position else {
            return Ok(());
        };
        let Some(p) = LogPosition::parse(bytes) else {
            return match self.catch_up.as_mut() {
                Some(claim) => claim.adopt(position).await,
                None => {
                    ClaimReader::new(self.store.clone(), false)
                        .adopt(position)
                        .await
                }
            };
        };
        self.confirm(p.after);
        self.split = p.split.map(|[lsn, events]| (lsn, events as usize));
        tracing::info!(after = %Lsn(p.after), split = ?p.split.map(|[lsn, n]| (Lsn(lsn).to_string(), n)),
            "took over Kafka's committed position: streaming after it");
        Ok(())
    }

    /// Inside a transaction some of whose events were handed out: the slot's position cannot
    /// pass it until it is read and published to its commit.
    fn finish_unit(&mut self) -> bool {
        self.finishing = true;
        self.txns
            .back()
            .is_some_and(|t| t.end.is_none() && t.handed > 0)
    }

    /// Close the stream (its walsender then ends) and forget what was read; the next read
    /// starts it again from the confirmed position.
    async fn release_server(&mut self) -> bool {
        let streaming = self.stream.is_some();
        self.stop().await;
        streaming
    }

    /// Report the confirmed position to the server before the stream closes: a graceful stop
    /// sends nothing again.
    async fn close(&mut self) {
        self.stop().await;
    }
}

/// Log mode's ledger: the confirmed position (reported by the stream task), and the failed
/// rows' state in the table (an emitted event that fails is written to the table as a
/// parked row, so `failed` lists it like any other).
/// Log mode's position in a Kafka transaction (see [`LogReader::position`]).
#[derive(Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub(crate) struct LogPosition {
    pub after: u64,
    pub split: Option<[u64; 2]>,
}

impl LogPosition {
    fn to_bytes(&self) -> Vec<u8> {
        serde_json::json!({ "log": self }).to_string().into_bytes()
    }

    /// `None` if `bytes` is not a log-mode position.
    pub(crate) fn parse(bytes: &[u8]) -> Option<LogPosition> {
        #[derive(Deserialize)]
        struct Tagged {
            log: LogPosition,
        }
        serde_json::from_slice::<Tagged>(bytes).ok().map(|t| t.log)
    }
}

#[derive(Clone)]
pub struct LogLedger {
    store: OutboxStore,
    confirmed: Arc<AtomicU64>,
    emitted: Emitted,
}

impl LogLedger {
    /// Emitted events among `rows` are inserted as rows set aside `how` (once: see
    /// [`OutboxStore::insert_set_aside`]); the rest are returned (they are rows of the table).
    async fn insert_emitted(
        &self,
        rows: &[(i64, String)],
        how: SetAside,
    ) -> Result<Vec<(i64, String)>, sqlx::Error> {
        let (emitted, table_rows): (Vec<_>, Vec<_>) =
            rows.iter().cloned().partition(|(id, _)| *id < 0);
        for (id, error) in emitted {
            let row = self
                .emitted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            let Some(row) = row else { continue };
            self.store.insert_set_aside(&row, how, &error).await?;
        }
        Ok(table_rows)
    }
}

impl Ledger for LogLedger {
    type Position = u64;

    async fn record(
        &self,
        progress: &Progress<u64>,
        _fence: &Fence,
    ) -> Result<Recorded, sqlx::Error> {
        // Marks come only from the catch-up after another read mode.
        self.store.mark_published(&progress.mark).await?;
        if let Some(lsn) = progress.position {
            self.confirmed.fetch_max(lsn, Ordering::AcqRel);
        }
        Ok(Recorded::Done)
    }

    async fn park(&self, rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        let table_rows = self.insert_emitted(rows, SetAside::Parked).await?;
        self.store.park(&table_rows).await
    }

    async fn dead_lettered(&self, rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        let table_rows = self.insert_emitted(rows, SetAside::DeadLettered).await?;
        self.store.mark_dead_lettered(&table_rows).await
    }

    async fn note_retry(&self, rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
        let table_rows: Vec<_> = rows.iter().filter(|(id, _)| *id > 0).cloned().collect();
        self.store.note_retry(&table_rows).await
    }
}

/// The stream task: decode what the server sends into items for the reader (waiting when the
/// reader is behind, which holds the server back), report the confirmed position, and on
/// stop report it once more before closing.
#[allow(clippy::too_many_arguments)]
async fn pump(
    mut client: ReplicationClient,
    items: mpsc::Sender<Item>,
    wake: Arc<Notify>,
    source_delay: Option<Histogram>,
    confirmed: Arc<AtomicU64>,
    prefix: String,
    table: TableName,
    stop: CancellationToken,
) {
    let mut relations = Relations::default();
    let mut commit_time = 0i64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                report(&client, &confirmed);
                continue;
            }
            event = client.recv() => event,
        };
        report(&client, &confirmed);
        let item = match event {
            Ok(Some(event)) => {
                match decode(event, &mut relations, &mut commit_time, &prefix, &table) {
                    Ok(Some(item)) => item,
                    Ok(None) => continue,
                    Err(why) => Item::Failed(why),
                }
            }
            Ok(None) => Item::Failed("the server ended the replication stream".into()),
            Err(e) => Item::Failed(format!("replication stream: {e}")),
        };
        if let (Item::Commit { .. }, Some(delay)) = (&item, &source_delay) {
            let since = chrono::Utc::now() - pg_time(commit_time);
            delay.observe(since.num_microseconds().unwrap_or(0).max(0) as f64 / 1e6);
        }
        let failed = matches!(item, Item::Failed(_));
        // Room for it (the reader is behind: the server waits), still reporting progress.
        let permit = loop {
            tokio::select! {
                _ = stop.cancelled() => break None,
                _ = tick.tick() => report(&client, &confirmed),
                permit = items.reserve() => break permit.ok(),
            }
        };
        let Some(permit) = permit else { break };
        permit.send(item);
        wake.notify_one();
        if failed {
            return;
        }
    }
    // Report the last confirmed position and wait (briefly) until it is sent.
    let last = confirmed.load(Ordering::Acquire);
    report(&client, &confirmed);
    let metrics = client.metrics();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while last > 0 && metrics.last_applied_lsn().0 < last && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), client.shutdown()).await;
}

fn report(client: &ReplicationClient, confirmed: &AtomicU64) {
    let lsn = confirmed.load(Ordering::Acquire);
    if lsn > 0 {
        client.update_applied_lsn(Lsn(lsn));
    }
}

/// The metadata part of an emitted event (see the table's emit function): JSON, then a zero
/// byte, then the payload's bytes as they are.
#[derive(Deserialize)]
struct EmittedMeta {
    /// A parked row sent again by `failed retry` keeps its row id (its event id).
    id: Option<i64>,
    topic: Option<String>,
    key: Option<String>,
    headers: Option<serde_json::Value>,
    #[serde(default)]
    null_payload: bool,
}

fn decode(
    event: ReplicationEvent,
    relations: &mut Relations,
    commit_time: &mut i64,
    prefix: &str,
    table: &TableName,
) -> Result<Option<Item>, String> {
    Ok(match event {
        ReplicationEvent::Begin {
            final_lsn,
            commit_time_micros,
            ..
        } => {
            *commit_time = commit_time_micros;
            Some(Item::Begin {
                final_lsn: final_lsn.0,
            })
        }
        ReplicationEvent::Commit { end_lsn, .. } => Some(Item::Commit { end: end_lsn.0 }),
        ReplicationEvent::KeepAlive { wal_end, .. } => Some(Item::KeepAlive { wal_end: wal_end.0 }),
        ReplicationEvent::XLogData { data, .. } => match data.first() {
            Some(b'R') => {
                relations.relation(&data).map_err(|e| e.to_string())?;
                None
            }
            Some(b'I') => {
                let (relation, tuple) = relations.insert(&data).map_err(|e| e.to_string())?;
                if relation.schema != table.schema() || relation.table != table.table() {
                    tracing::warn!(schema = %relation.schema, table = %relation.table,
                        "the publication covers another table; its rows are not events (publish only the outbox table)");
                    return Ok(None);
                }
                if tuple.set_aside() {
                    return Ok(None);
                }
                let row = tuple
                    .outbox_row()
                    .map_err(|why| format!("an outbox row without a usable id: {why}"))?;
                Some(Item::Row(row))
            }
            // Updates, deletes, truncates, types, origins: not events.
            _ => None,
        },
        ReplicationEvent::Message {
            transactional,
            lsn,
            prefix: p,
            content,
        } => {
            if p != prefix {
                return Ok(None);
            }
            if !transactional {
                tracing::error!(lsn = %lsn, "an event was emitted outside a transaction (transactional = false): it cannot be ordered or confirmed and is not published; emit with the table's emit function");
                return Ok(None);
            }
            Some(Item::Row(emitted_row(
                lsn.0,
                &content,
                pg_time(*commit_time),
            )))
        }
        ReplicationEvent::StoppedAt { .. } => Some(Item::Failed("the stream stopped".into())),
    })
}

/// An emitted event as a row: its id is minus its LSN (the event id header says `lsn-…`).
fn emitted_row(lsn: u64, content: &[u8], created_at: chrono::DateTime<chrono::Utc>) -> OutboxRow {
    let id = -(lsn.min(i64::MAX as u64) as i64);
    let mut row = OutboxRow {
        id,
        topic: String::new(),
        key: None,
        payload: None,
        headers: None,
        created_at,
        xid: None,
        unreadable: None,
    };
    let Some(split) = content.iter().position(|&b| b == 0) else {
        row.unreadable = Some(
            "the emitted event is not the emit function's format (no zero byte after the JSON)"
                .into(),
        );
        return row;
    };
    match serde_json::from_slice::<EmittedMeta>(&content[..split]) {
        Ok(meta) => {
            if let Some(id) = meta.id.filter(|id| *id > 0) {
                row.id = id;
            }
            row.topic = meta.topic.unwrap_or_default();
            row.key = meta.key;
            row.headers = meta.headers.filter(|h| !h.is_null()).map(|h| h.to_string());
            row.payload = (!meta.null_payload).then(|| content[split + 1..].to_vec());
            if row.topic.is_empty() {
                row.unreadable = Some("the emitted event has no topic".into());
            }
        }
        Err(e) => {
            row.unreadable = Some(format!(
                "the emitted event's metadata is not the emit function's JSON: {e}"
            ))
        }
    }
    row
}

/// What log mode needs of the server, checked before the relay starts: `Err` names what is
/// missing and the fix (the first of [`LogServer::refusals`]; `doctor` reports them all). A
/// database that cannot be asked is not a finding (the relay waits for it like in every mode).
pub async fn preflight(
    pool: &sqlx::PgPool,
    table: &TableName,
    names: &LogNames,
) -> Result<(), String> {
    let checked = match pool.acquire().await {
        Ok(mut conn) => LogServer::read(&mut conn, table, names).await,
        Err(e) => Err(e),
    };
    match checked {
        Ok(server) => match server.refusals(table, names).into_iter().next() {
            Some(refusal) => Err(refusal.to_string()),
            None => Ok(()),
        },
        Err(e) => {
            tracing::warn!(error = %e, "could not check the server's log mode settings now; the relay retries");
            Ok(())
        }
    }
}

/// The SQLSTATE of a server error (the crate puts it at the end of the text).
fn sqlstate(e: &PgWireError) -> Option<&str> {
    match e {
        PgWireError::Server(s) => s.rsplit_once("(SQLSTATE ")?.1.strip_suffix(')'),
        _ => None,
    }
}

/// A replication error as a database error, naming the fix where there is one.
fn stream_error(source: &LogSource, e: &PgWireError) -> sqlx::Error {
    let hint = match sqlstate(e) {
        Some("42704") => format!(
            "the replication slot {:?} does not exist: run `outbox-relay migrate --read-mode log`",
            source.slot
        ),
        Some("55000") => format!(
            "the replication slot {:?} cannot be used (invalidated: its WAL was removed, see the README runbook \"A lost slot\")",
            source.slot
        ),
        Some("42501") | Some("28000") => "the role needs the REPLICATION attribute (ALTER ROLE ... REPLICATION), or the managed service's replication role".into(),
        Some("55006") => format!("the replication slot {:?} is in use by another session", source.slot),
        _ => String::new(),
    };
    let message = if hint.is_empty() {
        format!("replication connection failed: {e}")
    } else {
        format!("replication connection failed: {e}: {hint}")
    };
    match e {
        // Diagnosed as the pool's TLS failures are (not ready, naming sslmode and sslrootcert).
        PgWireError::Tls(_) => sqlx::Error::Tls(message.into()),
        _ => sqlx::Error::Protocol(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64) -> OutboxRow {
        emitted_row(id as u64, b"{\"topic\":\"t\"}\0x", chrono::Utc::now())
    }

    /// Exactly-once: the position names the transaction a batch ended inside by its commit LSN
    /// and counts its events Kafka holds; a leader taking over skips exactly those.
    #[tokio::test]
    async fn a_split_transaction_is_named_in_the_position_and_skipped_after_a_take_over() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nowhere/app")
            .unwrap();
        let table = TableName::parse("public.outbox").unwrap();
        let store = OutboxStore::new(pool, table, crate::store::OnPublish::Mark, ReadMode::Log);
        let source = LogSource {
            host: "nowhere".into(),
            port: 5432,
            user: "relay".into(),
            password: None,
            database: "app".into(),
            ssl_mode: "disable".into(),
            ssl_root_cert: None,
            slot: "s".into(),
            publication: "p".into(),
        };
        let position = |r: &LogReader| {
            let none = Progress {
                delivered: Delivered::default(),
                mark: Vec::new(),
                position: None,
            };
            LogPosition::parse(&r.position(&none, &[]).unwrap()).unwrap()
        };
        let mut r = LogReader::new(store.clone(), source.clone(), Arc::default());
        r.apply(Item::Begin { final_lsn: 100 }).unwrap();
        for id in 1..=3 {
            assert!(r.apply(Item::Row(row(id))).unwrap().is_some());
        }
        let split = LogPosition {
            after: 0,
            split: Some([100, 3]),
        };
        assert_eq!(position(&r), split, "three events of the open transaction");
        r.settle_in(0);
        r.apply(Item::Commit { end: 120 }).unwrap();
        assert_eq!(position(&r).after, 0, "two events unsettled");
        r.settle_in(0);
        r.settle_in(0);
        assert_eq!(r.advance(), Some(120));
        assert_eq!(
            position(&r),
            LogPosition {
                after: 120,
                split: None
            }
        );

        // A new leader adopts the split position: the first three events of transaction 100
        // are skipped, the fourth is handed out, and another transaction is not touched.
        let mut next = LogReader::new(store, source, Arc::default());
        next.adopt(Some(&split.to_bytes())).await.unwrap();
        next.apply(Item::Begin { final_lsn: 100 }).unwrap();
        let handed: Vec<bool> = (1..=4)
            .map(|id| next.apply(Item::Row(row(id))).unwrap().is_some())
            .collect();
        assert_eq!(handed, [false, false, false, true]);
        assert_eq!(position(&next).split, Some([100, 4]));
        next.apply(Item::Commit { end: 120 }).unwrap();
        next.apply(Item::Begin { final_lsn: 130 }).unwrap();
        assert!(next.apply(Item::Row(row(5))).unwrap().is_some());
        assert_eq!(
            next.confirmed.load(Ordering::Acquire),
            0,
            "the split is not confirmed"
        );
    }

    #[test]
    fn a_tls_failure_of_the_stream_is_diagnosed_as_one_naming_the_fix() {
        let source = LogSource {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "relay".into(),
            password: None,
            database: "app".into(),
            ssl_mode: "verify-full".into(),
            ssl_root_cert: None,
            slot: "s".into(),
            publication: "p".into(),
        };
        let table = crate::table::TableName::parse("outbox").unwrap();
        let tls = PgWireError::Tls("TLS handshake failed: invalid peer certificate".into());
        let d = crate::store::errors::diagnose(&stream_error(&source, &tls), &table);
        assert_eq!(d.kind, "tls");
        assert!(d.hint.contains("sslrootcert"), "{}", d.hint);
        let other = PgWireError::Server("boom (SQLSTATE XX000)".into());
        let d = crate::store::errors::diagnose(&stream_error(&source, &other), &table);
        assert_ne!(d.kind, "tls");
    }

    #[test]
    fn names_are_checked_and_derived() {
        assert!(check_name("slot", "outbox_relay_public_outbox").is_ok());
        assert!(check_name("slot", "Bad").is_err());
        assert!(check_name("slot", "a b").is_err());
        assert!(check_name("slot", "").is_err());
        assert!(check_name("slot", &"a".repeat(64)).is_err());
        let t = TableName::parse("Events.My\"Box").unwrap();
        assert_eq!(default_name(&t), "outbox_relay_events_my_box");
        assert!(check_name(
            "slot",
            &default_name(&TableName::parse(&"x".repeat(48)).unwrap())
        )
        .is_ok());
    }

    #[test]
    fn emitted_events_decode_or_name_the_problem() {
        let t = chrono::DateTime::UNIX_EPOCH;
        let mut content =
            br#"{"v":1,"topic":"orders","key":"k1","headers":{"a":"b"},"null_payload":false}"#
                .to_vec();
        content.push(0);
        content.extend([0, 1, 255]);
        let row = emitted_row(0x16B3748, &content, t);
        assert_eq!(row.id, -0x16B3748);
        assert_eq!(
            (row.topic.as_str(), row.key.as_deref()),
            ("orders", Some("k1"))
        );
        assert_eq!(row.payload.as_deref(), Some(&[0u8, 1, 255][..]));
        assert_eq!(row.headers.as_deref(), Some(r#"{"a":"b"}"#));
        assert!(row.unreadable.is_none());
        let again = emitted_row(9, b"{\"id\":42,\"topic\":\"t\"}\0x", t);
        assert_eq!((again.id, again.payload.as_deref()), (42, Some(&b"x"[..])));
        let null = emitted_row(1, b"{\"topic\":\"t\",\"null_payload\":true}\0", t);
        assert_eq!((null.payload, null.unreadable), (None, None));
        assert!(emitted_row(1, b"not json\0", t).unreadable.is_some());
        assert!(emitted_row(1, b"{\"topic\":\"t\"}", t).unreadable.is_some());
        assert!(emitted_row(1, b"{\"key\":\"k\"}\0", t).unreadable.is_some());
    }
}
