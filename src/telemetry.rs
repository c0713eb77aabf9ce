//! Metrics (explicit Prometheus registry), health state and log setup. [`crate::http`] serves
//! them on `/metrics`, `/healthz` and `/readyz`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every metric the relay exports. Names are `outbox_relay_*` with units; labels are bounded.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// How many events reached Kafka? (rows marked published after their delivery report)
    pub published: IntCounter,
    /// Is Kafka or the data failing us, and how? (kind = transient | poison | fatal)
    pub publish_errors: IntCounterVec,
    /// Which rows did we set aside, and why? (reason = invalid_row | too_large | unknown_topic | ...)
    pub parked: IntCounterVec,
    /// Are batches full (backlog) or tiny (idle)?
    pub batch_size: Histogram,
    /// How late do events arrive? (row created_at to Kafka acknowledgement)
    pub latency: Histogram,
    /// How much is waiting?
    pub pending_rows: IntGauge,
    /// How far behind are we? (age of the oldest pending row; 0 when none)
    pub oldest_pending_age: prometheus::Gauge,
    /// Which poison rows went to the dead-letter topic, and why?
    pub dead_lettered: IntCounterVec,
    /// How many rows need an operator?
    pub parked_rows: IntGauge,
    /// Is this replica the one publishing? (1 leader, 0 standby)
    pub leader: IntGauge,
    /// How many published rows did cleanup delete?
    pub cleaned: IntCounter,
    /// Where does a batch's time go? (phase = fetch | send | publish | wait | mark)
    pub phase_seconds: prometheus::HistogramVec,
    /// Does the trace collector get our spans? (only with span export on)
    pub spans_exported: IntCounter,
    /// Which spans were lost, and why? (reason = queue_full | export_failed); delivery is unaffected
    pub spans_dropped: IntCounterVec,
    /// Log mode: how much WAL does the slot keep on the server? (registered by
    /// [`Metrics::register_slot_metrics`], in log mode only)
    pub slot_retained_wal: prometheus::Gauge,
    /// Log mode: how far behind the server's WAL is the slot's confirmed position?
    pub slot_confirmed_lag: prometheus::Gauge,
    /// Log mode: how much more WAL before the slot is lost (max_slot_wal_keep_size)?
    pub slot_safe_wal: prometheus::Gauge,
    /// Log mode: how long after its commit does a transaction reach the relay?
    pub source_delay: Histogram,
    /// Exactly-once: how many Kafka transactions committed or aborted? (outcome)
    pub transactions: IntCounterVec,
    /// Exactly-once: how long does committing a batch's transaction take?
    pub transaction_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 300.0,
        ];
        let m = Metrics {
            published: IntCounter::new(
                "outbox_relay_published_total",
                "Rows published to Kafka and marked",
            )
            .unwrap(),
            publish_errors: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_publish_errors_total",
                    "Failed deliveries by kind",
                ),
                &["kind"],
            )
            .unwrap(),
            parked: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_parked_total",
                    "Rows set aside as failed, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
            dead_lettered: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_dead_lettered_total",
                    "Poison rows published to the dead-letter topic, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
            batch_size: Histogram::with_opts(
                HistogramOpts::new("outbox_relay_batch_rows", "Rows read per batch").buckets(vec![
                    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
                ]),
            )
            .unwrap(),
            latency: Histogram::with_opts(
                HistogramOpts::new(
                    "outbox_relay_delivery_latency_seconds",
                    "From the row's created_at to its Kafka acknowledgement",
                )
                .buckets(latency_buckets.clone()),
            )
            .unwrap(),
            pending_rows: IntGauge::new(
                "outbox_relay_pending_rows",
                "Committed rows not yet published",
            )
            .unwrap(),
            oldest_pending_age: prometheus::Gauge::new(
                "outbox_relay_oldest_pending_age_seconds",
                "Age of the oldest pending row (0 when none)",
            )
            .unwrap(),
            parked_rows: IntGauge::new(
                "outbox_relay_parked_rows",
                "Rows parked as failed, awaiting an operator",
            )
            .unwrap(),
            leader: IntGauge::new(
                "outbox_relay_leader",
                "1 when this replica holds the publishing lock",
            )
            .unwrap(),
            cleaned: IntCounter::new(
                "outbox_relay_cleanup_deleted_total",
                "Published rows deleted by cleanup",
            )
            .unwrap(),
            phase_seconds: prometheus::HistogramVec::new(
                HistogramOpts::new("outbox_relay_batch_phase_seconds", "Time per batch phase")
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
                    ]),
                &["phase"],
            )
            .unwrap(),
            spans_exported: IntCounter::new(
                "outbox_relay_spans_exported_total",
                "Trace spans accepted by the OTLP collector",
            )
            .unwrap(),
            spans_dropped: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_spans_dropped_total",
                    "Trace spans not exported, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
            slot_retained_wal: prometheus::Gauge::new(
                "outbox_relay_slot_retained_wal_bytes",
                "Log mode: WAL the server keeps for the replication slot (current WAL position - restart_lsn; \
                 NaN while the slot does not exist). Alert when it nears the WAL disk's free space or \
                 max_slot_wal_keep_size",
            )
            .unwrap(),
            slot_confirmed_lag: prometheus::Gauge::new(
                "outbox_relay_slot_confirmed_lag_bytes",
                "Log mode: WAL written since the slot's confirmed position (current WAL position - \
                 confirmed_flush_lsn; NaN while the slot does not exist): how far behind the relay is. \
                 Alert when it keeps growing for minutes",
            )
            .unwrap(),
            slot_safe_wal: prometheus::Gauge::new(
                "outbox_relay_slot_safe_wal_bytes",
                "Log mode: WAL that can still be written before the slot is lost (safe_wal_size; -1 \
                 when max_slot_wal_keep_size = -1, i.e. no limit; 0 once lost; NaN while the slot does \
                 not exist). Alert when it is at or above 0 and below an hour of WAL (>= 0 < bytes)",
            )
            .unwrap(),
            source_delay: Histogram::with_opts(
                HistogramOpts::new(
                    "outbox_relay_source_delay_seconds",
                    "Log mode: from a transaction's commit (the server's commit timestamp) to its \
                     arrival in the relay: the server's WAL flush, decoding and sending, and the \
                     network. The database's clock and the relay's must agree",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1,
                    0.25, 1.0, 5.0, 30.0,
                ]),
            )
            .unwrap(),
            transactions: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_transactions_total",
                    "Exactly-once: Kafka transactions by outcome (committed | aborted)",
                ),
                &["outcome"],
            )
            .unwrap(),
            transaction_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "outbox_relay_transaction_commit_seconds",
                    "Exactly-once: from a batch's last delivery report to its Kafka transaction \
                     committed, position included",
                )
                .buckets(latency_buckets),
            )
            .unwrap(),
            registry,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 16] = [
            Box::new(m.published.clone()),
            Box::new(m.publish_errors.clone()),
            Box::new(m.parked.clone()),
            Box::new(m.dead_lettered.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.latency.clone()),
            Box::new(m.pending_rows.clone()),
            Box::new(m.oldest_pending_age.clone()),
            Box::new(m.parked_rows.clone()),
            Box::new(m.leader.clone()),
            Box::new(m.cleaned.clone()),
            Box::new(m.phase_seconds.clone()),
            Box::new(m.spans_exported.clone()),
            Box::new(m.spans_dropped.clone()),
            Box::new(m.transactions.clone()),
            Box::new(m.transaction_seconds.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// Register log mode's metrics: the slot gauges (in the other modes there is no slot, and
    /// a 0 would read as "about to be lost") and the source delay. Call once.
    pub fn register_slot_metrics(&self) {
        for gauge in [
            &self.slot_retained_wal,
            &self.slot_confirmed_lag,
            &self.slot_safe_wal,
        ] {
            self.registry
                .register(Box::new(gauge.clone()))
                .expect("metric names are unique");
        }
        self.registry
            .register(Box::new(self.source_delay.clone()))
            .expect("metric names are unique");
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Readiness inputs, shared between the relay's tasks and the HTTP server.
pub struct Health {
    pub database_ok: AtomicBool,
    /// What readiness says while `database_ok` is false (which kind of error, and the fix).
    database_error: std::sync::Mutex<Option<String>>,
    /// Log mode: why the replication slot cannot be read (missing or lost), if it cannot.
    slot_error: std::sync::Mutex<Option<String>>,
    pub kafka_ok: AtomicBool,
    pub has_pending: AtomicBool,
    /// Set once shutdown starts: readiness turns off so traffic and scrapes move on.
    pub stopping: AtomicBool,
    /// Unix millis of the last batch that completed (or found nothing to do).
    last_progress_ms: AtomicU64,
    stall_timeout: Duration,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Health {
    pub fn new(stall_timeout: Duration) -> Health {
        Health {
            database_ok: AtomicBool::new(false),
            database_error: std::sync::Mutex::new(None),
            slot_error: std::sync::Mutex::new(None),
            kafka_ok: AtomicBool::new(false),
            has_pending: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            last_progress_ms: AtomicU64::new(now_ms()),
            stall_timeout,
        }
    }

    pub fn progressed(&self) {
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// `Ok` when ready; otherwise the reasons, for the /readyz body.
    /// A database error of this `kind` (from the one error policy) in `step`: readiness says
    /// which, and the fix, instead of calling every error "unreachable".
    pub fn database_failed(&self, kind: &str, step: &str, hint: &str) {
        self.database_ok.store(false, Ordering::Relaxed);
        let error = match kind {
            "unreachable" => "postgres unreachable".to_string(),
            kind => format!("postgres {kind} error ({step}): {hint}"),
        };
        if let Ok(mut e) = self.database_error.lock() {
            *e = Some(error);
        }
    }

    /// Log mode: the replication slot cannot be read (`Some`: why, and the fix), or can again.
    pub fn slot_unusable(&self, why: Option<String>) {
        if let Ok(mut e) = self.slot_error.lock() {
            *e = why;
        }
    }

    pub fn readiness(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.stopping.load(Ordering::Relaxed) {
            problems.push("shutting down".to_string());
        }
        if !self.database_ok.load(Ordering::Relaxed) {
            let error = self
                .database_error
                .lock()
                .map(|e| e.clone())
                .unwrap_or(None);
            problems.push(error.unwrap_or_else(|| "postgres unreachable".to_string()));
        }
        if let Some(why) = self.slot_error.lock().ok().and_then(|e| e.clone()) {
            problems.push(why);
        }
        if !self.kafka_ok.load(Ordering::Relaxed) {
            problems.push("kafka unreachable".to_string());
        }
        let idle_ms = now_ms().saturating_sub(self.last_progress_ms.load(Ordering::Relaxed));
        if self.has_pending.load(Ordering::Relaxed)
            && idle_ms > self.stall_timeout.as_millis() as u64
        {
            problems.push(format!(
                "stalled: rows pending and no batch completed for {}s",
                idle_ms / 1000
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Log to stderr as text or JSON; RUST_LOG filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_both_services_and_progress() {
        let h = Health::new(Duration::from_millis(50));
        assert!(h.readiness().unwrap_err().contains("postgres"));
        h.database_ok.store(true, Ordering::Relaxed);
        h.kafka_ok.store(true, Ordering::Relaxed);
        assert!(h.readiness().is_ok());
        h.has_pending.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(80));
        assert!(h.readiness().unwrap_err().contains("stalled"));
        h.progressed();
        assert!(h.readiness().is_ok());
    }

    #[test]
    fn readiness_names_the_kind_of_database_error() {
        let h = Health::new(Duration::from_secs(60));
        h.kafka_ok.store(true, Ordering::Relaxed);
        h.database_failed("unreachable", "read", "cannot reach PostgreSQL");
        assert_eq!(h.readiness().unwrap_err(), "postgres unreachable");
        h.database_failed("permission", "park", "GRANT UPDATE ON outbox");
        let why = h.readiness().unwrap_err();
        assert!(
            why.contains("permission error (park)") && why.contains("GRANT"),
            "{why}"
        );
        h.database_ok.store(true, Ordering::Relaxed);
        assert!(h.readiness().is_ok());
    }

    #[test]
    fn readiness_fails_while_the_slot_is_unusable() {
        let h = Health::new(Duration::from_secs(60));
        h.database_ok.store(true, Ordering::Relaxed);
        h.kafka_ok.store(true, Ordering::Relaxed);
        h.slot_unusable(Some(
            "the replication slot \"s\" is lost: follow the runbook".into(),
        ));
        assert_eq!(
            h.readiness().unwrap_err(),
            "the replication slot \"s\" is lost: follow the runbook"
        );
        h.slot_unusable(None);
        assert!(h.readiness().is_ok());
    }

    #[test]
    fn slot_gauges_are_exported_in_log_mode_only() {
        let names = |m: &Metrics| -> Vec<String> {
            m.registry
                .gather()
                .iter()
                .map(|f| f.name().to_string())
                .collect()
        };
        let m = Metrics::new();
        assert!(!names(&m).iter().any(|n| n.contains("slot")));
        m.register_slot_metrics();
        m.slot_safe_wal.set(-1.0);
        m.slot_retained_wal.set(f64::NAN);
        let exported = names(&m);
        for name in [
            "outbox_relay_slot_retained_wal_bytes",
            "outbox_relay_slot_confirmed_lag_bytes",
            "outbox_relay_slot_safe_wal_bytes",
        ] {
            assert!(exported.iter().any(|n| n == name), "{name}: {exported:?}");
        }
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&m.registry.gather())
            .unwrap();
        assert!(
            text.contains("outbox_relay_slot_safe_wal_bytes -1\n"),
            "{text}"
        );
        // NaN as the exposition format spells it.
        assert!(
            text.contains("outbox_relay_slot_retained_wal_bytes NaN\n"),
            "{text}"
        );
        assert!(text.contains("Alert when"), "{text}");
    }

    #[test]
    fn the_grafana_dashboard_uses_only_real_metrics() {
        let dashboard = include_str!("../helm/outbox-relay/dashboards/outbox-relay.json");
        let m = Metrics::new();
        m.register_slot_metrics();
        m.publish_errors.with_label_values(&["x"]);
        m.parked.with_label_values(&["x"]);
        m.dead_lettered.with_label_values(&["x"]);
        m.phase_seconds.with_label_values(&["x"]);
        m.transactions.with_label_values(&["x"]);
        let known: Vec<String> = m
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let mut used = 0;
        for (i, _) in dashboard.match_indices("outbox_relay_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                known.iter().any(|k| k == base),
                "dashboard uses unknown metric {name}"
            );
            used += 1;
        }
        assert!(used >= 10, "the dashboard should chart the relay's metrics");
    }
}
