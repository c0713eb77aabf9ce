//! outbox-relay: publishes a PostgreSQL transactional outbox table to Apache Kafka,
//! at-least-once, per-key order kept, never a rolled-back or lost row.
//!
//! # Layout
//! - [`config`]: flags and environment parsed once into a validated config; secrets redacted.
//! - [`table`]: the outbox table's name (always quoted) and its DDL.
//! - [`event`]: a row and the Kafka message it becomes (validation, standard headers).
//! - [`outbox`]: every SQL statement: read pending, mark, park, backlog, cleanup, LISTEN, leader lock.
//! - [`publisher`]: the idempotent Kafka producer and the error classifier.
//! - [`replica`]: this process's replica id and heartbeat row; how `status` lists replicas.
//! - [`relay`]: the loop (read, publish, settle, mark) and its invariant.
//! - [`telemetry`]: metrics, health, logging.
//! - [`http`]: the `/metrics`, `/healthz` and `/readyz` server.
//! - [`spans`]: W3C trace context: outbox-wait and publish spans, optional OTLP export.
//! - [`shutdown`]: signals to a cancellation token.
//! - [`doctor`]: preflight checks against the real database and Kafka.
//! - [`admin`]: operator commands (`status`, `failed list|retry|skip|purge`).
//! - [`adopt`]: a trigger that copies rows of an existing (Debezium-style) outbox table into ours.

pub mod admin;
pub mod adopt;
pub mod config;
pub mod doctor;
pub mod event;
pub mod http;
pub mod outbox;
pub mod publisher;
pub mod relay;
pub mod replica;
pub mod shutdown;
pub mod spans;
pub mod table;
pub mod telemetry;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use config::RelayConfig;
use outbox::{Lease, OutboxStore};
use publisher::Publisher;
use telemetry::{Health, Metrics};

/// Run the relay until `cancel` fires, then drain: the loop settles and marks its in-flight
/// batch (flushing the producer), background tasks stop, the pool closes.
pub async fn run(
    config: RelayConfig,
    publisher: Publisher,
    http: std::net::TcpListener,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let metrics = Metrics::new();
    let health = Arc::new(Health::new(config.stall_timeout));
    let tasks = CancellationToken::new();
    tokio::spawn({
        let (health, cancel) = (health.clone(), cancel.clone());
        async move {
            cancel.cancelled().await;
            health.stopping.store(true, Ordering::Relaxed);
        }
    });
    let http = tokio::net::TcpListener::from_std(http)?;
    let server = tokio::spawn(http::serve(
        http,
        metrics.clone(),
        health.clone(),
        tasks.clone().cancelled_owned(),
    ));

    let pool = outbox::pool(&config.db.connect, 4);
    let block_keys = config.poison_policy == config::PoisonPolicy::BlockKey;
    let store = OutboxStore::new(
        pool.clone(),
        config.db.table.clone(),
        block_keys,
        config.on_publish,
        config.read_mode,
    );
    let wake = Arc::new(Notify::new());
    let listener = config.listen.then(|| {
        tokio::spawn(outbox::listen(
            pool.clone(),
            config.db.table.channel(),
            wake.clone(),
            tasks.clone(),
        ))
    });
    let (publisher_tx, publisher_rx) = watch::channel(publisher);
    let monitor = tokio::spawn(monitor(
        store.clone(),
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
        &config.db.table,
        config.lease_duration,
        identity.id.clone(),
    );
    let (heartbeat, beats) = replica::Heartbeat::new(lease.renew_every());
    let registry = replica::Registry::new(
        pool.clone(),
        &config.db.table,
        identity.clone(),
        config.lease_duration,
    );
    let heartbeat_task = tokio::spawn(replica::heartbeat(registry, beats, tasks.clone()));

    tracing::info!(database = %config.db.display, table = %config.db.table, kafka = %config.kafka.brokers,
        batch_size = config.batch_size, poll_interval = ?config.poll_interval, listen = config.listen,
        replica = %identity.id, "outbox-relay started");
    let (spans, exporter) = spans::Tracer::new(
        config.otlp.clone(),
        config.db.table.to_string(),
        metrics.clone(),
    );
    let exporter = exporter.map(tokio::spawn);
    let relay = relay::Relay {
        lease: lease.with_heartbeat(heartbeat),
        spans,
        config,
        store,
        publisher: publisher_tx,
        metrics,
        health: health.clone(),
        wake,
        cursor: (0, 0),
        led_epoch: None,
        read_ahead: None,
    };
    relay.run(cancel).await;

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

/// Every few seconds: backlog gauges, database and Kafka reachability (for /readyz).
async fn monitor(
    store: OutboxStore,
    publisher: watch::Receiver<Publisher>,
    metrics: Metrics,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    let mut warned_at: Option<std::time::Instant> = None;
    while !cancel.is_cancelled() {
        match store.backlog().await {
            Ok(b) => {
                if store.mode() == config::ReadMode::Append
                    && metrics.leader.get() == 1
                    && b.oldest_pending_age.unwrap_or(0.0) > HORIZON_WARN_AFTER.as_secs_f64()
                    && warned_at.is_none_or(|at| at.elapsed() > Duration::from_secs(30))
                {
                    warn_about_horizon(&store).await;
                    warned_at = Some(std::time::Instant::now());
                }
                health.database_ok.store(true, Ordering::Relaxed);
                health.has_pending.store(b.pending > 0, Ordering::Relaxed);
                metrics.pending_rows.set(b.pending);
                metrics
                    .oldest_pending_age
                    .set(b.oldest_pending_age.unwrap_or(0.0).max(0.0));
                metrics.parked_rows.set(b.parked);
            }
            Err(e) => {
                health.database_ok.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, hint = outbox::hint(&e, store.table()), "backlog query failed");
            }
        }
        let p = publisher.borrow().clone();
        let kafka = p.check_connection(Duration::from_secs(5)).await;
        if let Err(e) = &kafka {
            tracing::warn!(error = %e, "Kafka metadata request failed: check --kafka-brokers and the network");
        }
        health.kafka_ok.store(kafka.is_ok(), Ordering::Relaxed);
        tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(5)) => {} }
    }
}

/// Append mode warns when committed rows have waited this long (a long transaction holds the
/// horizon back, or the relay is slow).
const HORIZON_WARN_AFTER: Duration = Duration::from_secs(10);

/// Append mode reads only below the oldest running transaction: name it when rows wait.
async fn warn_about_horizon(store: &OutboxStore) {
    match store.oldest_transaction().await {
        Ok(Some((pid, open_for, state, query))) if open_for.unwrap_or(0.0) >= 5.0 => {
            tracing::warn!(pid, open_seconds = open_for.unwrap_or(0.0).round(), state = %state, query = %query,
                "publishing waits for a transaction to end: --read-mode append reads only rows older than the \
                 oldest running write transaction in the cluster; end that transaction (pg_terminate_backend) \
                 or run the relay with --read-mode claim")
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "could not read pg_stat_activity"),
    }
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
