//! `run`: start the relay's parts in order, run the loop until shutdown, then drain: the loop
//! settles and records its in-flight batch (flushing the producer), background tasks stop,
//! the pool closes, the HTTP server stops last.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::kafka::{Publisher, Sink};
use crate::lease::{Leadership, Lease};
use crate::read::log;
use crate::read::{ClaimReader, LogReader, Reader, ToClaim};
use crate::relay::{PoisonPolicy, Relay};
use crate::settings::RelayConfig;
use crate::store::slot::{self, Condition, Slot};
use crate::store::{self, errors, OutboxStore};
use crate::table::ReadMode;
use crate::telemetry::{Health, Metrics};
use crate::{replica, spans};

/// Run the relay until `cancel` fires, then drain.
pub async fn run(
    mut config: RelayConfig,
    publisher: Publisher,
    http: std::net::TcpListener,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    crate::install_tls_provider();
    let metrics = Metrics::new();
    let health = Arc::new(Health::new(config.relay.stall_timeout));
    let tasks = CancellationToken::new();
    tokio::spawn({
        let (health, cancel) = (health.clone(), cancel.clone());
        async move {
            cancel.cancelled().await;
            health.stopping.store(true, Ordering::Relaxed);
        }
    });
    let http = tokio::net::TcpListener::from_std(http)?;
    let server = tokio::spawn(crate::http::serve(
        http,
        metrics.clone(),
        health.clone(),
        tasks.clone().cancelled_owned(),
    ));

    let pool = store::pool(&config.db.connect, 4);
    let table = config.db.table.clone();
    let store = OutboxStore::new(
        pool.clone(),
        table.clone(),
        config.on_publish,
        config.read_mode,
    );
    warn_without_read_index(&store).await;
    if config.read_mode == ReadMode::Log {
        if let Err(why) = log::preflight(&pool, &table, &config.log).await {
            tasks.cancel();
            let _ = server.await;
            return Err(std::io::Error::other(why));
        }
    }
    let wake = Arc::new(Notify::new());
    // In log mode the stream wakes the loop: no LISTEN, and no asking writers to NOTIFY (the
    // lease row's wake_wanted is left alone: no write per idle spell).
    if config.read_mode == ReadMode::Log {
        config.relay.listen = false;
    }
    let listener = config.relay.listen.then(|| {
        tokio::spawn(store::listen(
            pool.clone(),
            table.channel(),
            wake.clone(),
            tasks.clone(),
        ))
    });
    let (publisher_tx, publisher_rx) = watch::channel(publisher);
    // Log mode: the monitor watches the slot (the WAL it holds, whether it is lost).
    let slot = (config.read_mode == ReadMode::Log).then(|| {
        metrics.register_slot_metrics();
        config.log.slot.clone()
    });
    let monitor = tokio::spawn(monitor(
        store.clone(),
        slot,
        publisher_rx,
        metrics.clone(),
        health.clone(),
        tasks.clone(),
    ));
    let cleanup = tokio::spawn(cleanup(
        store.clone(),
        config.retention,
        config.cleanup_interval,
        metrics.clone(),
        tasks.clone(),
    ));

    let identity = replica::Identity::of_this_process();
    let lease = Lease::new(
        pool.clone(),
        &table,
        config.lease_duration,
        identity.id.clone(),
    );
    let (heartbeat, beats) = crate::lease::Heartbeat::new(lease.renew_every());
    let registry = replica::Registry::new(
        pool.clone(),
        &table,
        identity.clone(),
        config.lease_duration,
    );
    let heartbeat_task = tokio::spawn(replica::heartbeat(registry, beats, tasks.clone()));

    tracing::info!(database = %config.db.display, table = %table, kafka = %config.kafka.brokers,
        read_mode = config.read_mode.as_str(), batch_size = config.relay.batch_size,
        in_flight_batches = config.relay.in_flight_batches,
        delivery = if config.transactional.is_some() { "exactly-once" } else { "at-least-once" },
        poll_interval = ?config.relay.poll_interval, listen = config.relay.listen,
        replica = %identity.id, "outbox-relay started");
    let (spans, exporter) =
        spans::Tracer::new(config.otlp.clone(), table.to_string(), metrics.clone());
    let exporter = exporter.map(tokio::spawn);
    let lease = lease.with_heartbeat(heartbeat);
    let source_delay = metrics.source_delay.clone();
    let parts = (
        publisher_tx,
        lease,
        metrics,
        health.clone(),
        wake.clone(),
        spans,
    );
    // The one place a read mode is chosen: each reader holds its own state.
    match config.read_mode {
        ReadMode::Claim => {
            let block_keys = config.relay.poison_policy == PoisonPolicy::BlockKey;
            // If log mode led last, its tail is read from its slot first.
            let log = (config.db.log_source(&config.log), wake);
            let claim = ClaimReader::new(store.clone(), block_keys);
            let reader = ToClaim::new(claim, store, Some(log));
            run_loop(config.relay, reader, parts, cancel).await
        }
        ReadMode::Log => {
            let source = config.db.log_source(&config.log);
            let reader = LogReader::new(store, source, wake).observing(source_delay);
            run_loop(config.relay, reader, parts, cancel).await
        }
    }

    tasks.cancel();
    // The loop (and with it the span sender) is gone: the exporter sends what is left, within
    // one --otlp-timeout.
    for task in [
        Some(monitor),
        Some(cleanup),
        Some(heartbeat_task),
        listener,
        exporter,
    ]
    .into_iter()
    .flatten()
    {
        let _ = task.await;
    }
    pool.close().await;
    let _ = server.await;
    Ok(())
}

type Parts<S, L> = (
    watch::Sender<S>,
    L,
    Metrics,
    Arc<Health>,
    Arc<Notify>,
    spans::Tracer,
);

async fn run_loop<R: Reader, S: Sink, L: Leadership>(
    settings: crate::relay::Settings,
    reader: R,
    (sink, lease, metrics, health, wake, spans): Parts<S, L>,
    cancel: CancellationToken,
) {
    Relay::new(settings, reader, sink, lease, metrics, health, wake, spans)
        .run(cancel)
        .await
}

/// Warn once at start when the read mode's index is missing (every read would scan the table).
async fn warn_without_read_index(store: &OutboxStore) {
    if let Ok(false) = store.has_read_index().await {
        let mode = store.mode().as_str();
        tracing::warn!(table = %store.table(),
            "the table lacks the index --read-mode {mode} reads through; every read scans the table: \
             run `outbox-relay migrate --read-mode {mode}`");
    }
}

/// Every few seconds: backlog gauges, database and Kafka reachability (for /readyz); in log
/// mode (`slot`: its name) the slot's gauges and whether it can be read.
async fn monitor<S: Sink>(
    store: OutboxStore,
    slot: Option<String>,
    sink: watch::Receiver<S>,
    metrics: Metrics,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    let mut slot_condition = Condition::Usable;
    while !cancel.is_cancelled() {
        if let Some(name) = &slot {
            watch_slot(&store, name, &metrics, &health, &mut slot_condition).await;
        }
        match store.backlog().await {
            Ok(b) => {
                health.database_ok.store(true, Ordering::Relaxed);
                health.has_pending.store(b.pending > 0, Ordering::Relaxed);
                metrics.pending_rows.set(b.pending);
                metrics
                    .oldest_pending_age
                    .set(b.oldest_pending_age.unwrap_or(0.0).max(0.0));
                metrics.parked_rows.set(b.parked);
            }
            Err(e) => {
                let diagnosis = errors::diagnose(&e, store.table());
                health.database_failed(diagnosis.kind, "backlog", &diagnosis.hint);
                tracing::warn!(error = %e, kind = diagnosis.kind, hint = %diagnosis.hint, "backlog query failed");
            }
        }
        let s = sink.borrow().clone();
        let kafka = s.check_connection(Duration::from_secs(5)).await;
        if let Err(e) = &kafka {
            tracing::warn!(error = %e, "Kafka metadata request failed: check --kafka-brokers and the network");
        }
        health.kafka_ok.store(kafka.is_ok(), Ordering::Relaxed);
        tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(5)) => {} }
    }
}

/// Log mode: the slot's gauges, and readiness fails while the slot is missing or lost. Each
/// change of its condition is logged once (an error when it cannot be read, a warning when it
/// is about to be lost).
async fn watch_slot(
    store: &OutboxStore,
    name: &str,
    metrics: &Metrics,
    health: &Health,
    last: &mut Condition,
) {
    let found = match Slot::read(store.pool(), name).await {
        Ok(found) => found,
        // The backlog query reports the database's trouble (and readiness says it).
        Err(e) => return tracing::debug!(error = %e, "replication slot query failed"),
    };
    let [retained, lag, safe] = slot::gauges(found.as_ref());
    metrics.slot_retained_wal.set(retained);
    metrics.slot_confirmed_lag.set(lag);
    metrics.slot_safe_wal.set(safe);
    let now = slot::condition(name, found.as_ref());
    if now == *last {
        return;
    }
    match &now {
        Condition::Usable => tracing::info!(slot = %name, "the replication slot can be read again"),
        Condition::AtRisk(why) => tracing::warn!(slot = %name, "{why}"),
        Condition::Unusable(why) => {
            tracing::error!(slot = %name, "{why}; readiness fails until it is fixed")
        }
    }
    health.slot_unusable(match &now {
        Condition::Unusable(why) => Some(why.clone()),
        _ => None,
    });
    *last = now;
}

/// Delete old published rows on a schedule (only while this replica leads).
async fn cleanup(
    store: OutboxStore,
    retention: Duration,
    every: Duration,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    if retention.is_zero() {
        return;
    }
    loop {
        tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(every) => {} }
        if metrics.leader.get() != 1 {
            continue;
        }
        match store.cleanup(retention, 5000).await {
            Ok(0) => {}
            Ok(n) => {
                metrics.cleaned.inc_by(n);
                tracing::info!(rows = n, retention = ?retention, "cleanup deleted published rows");
            }
            Err(e) => tracing::warn!(error = %e, "cleanup failed; will retry"),
        }
    }
}
