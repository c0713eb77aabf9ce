//! Where messages go: the [`Sink`] boundary and its Kafka implementation, an idempotent
//! producer with one delivery report per message. [`classify`] sorts Kafka errors;
//! [`config`] holds the producer's properties and refuses the ones that void a guarantee.

pub mod classify;
pub mod config;
pub mod txn;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;

use crate::event::Message;
pub use classify::{classify, Failure};
pub use config::{client_config, KafkaConfig};
pub use txn::{ensure_positions_topic, Transactional};

/// The outcomes of messages handed over by [`Sink::send`], once they are all known.
pub type Reports = BoxFuture<'static, Published>;

/// Every message's outcome and [`Receipt`], in the order the messages were given.
#[derive(Debug, Default)]
pub struct Published {
    pub outcomes: Vec<Result<(), Failure>>,
    pub receipts: Vec<Receipt>,
}

/// Where messages go. The contract the loop relies on: `publish` returns exactly one outcome
/// per message, in order, and `Ok(())` only once the destination has durably acknowledged
/// that message (for Kafka: its own delivery report, with acks=all). Messages of one key are
/// handed over in order, and the destination keeps that order (idempotent producer).
pub trait Sink: Clone + Send + Sync + 'static {
    /// Hand `messages` over in order; resolves once every one is handed over (so a later
    /// `send` keeps per-key order behind them) to the future of their outcomes. On
    /// cancellation that future flushes within `flush_timeout` and reports what was
    /// acknowledged by then.
    fn send(
        &self,
        messages: Arc<[Message]>,
        cancel: &CancellationToken,
        flush_timeout: Duration,
    ) -> impl std::future::Future<Output = Reports> + Send;
    /// Publish `messages` in order and wait for each one's outcome.
    fn publish(
        &self,
        messages: &[Message],
        cancel: &CancellationToken,
        flush_timeout: Duration,
    ) -> impl std::future::Future<Output = Published> + Send {
        let sent = self.send(messages.into(), cancel, flush_timeout);
        async move { sent.await.await }
    }
    /// A fatal error that makes this sink unusable, if one was raised.
    fn fatal_error(&self) -> Option<String>;
    /// A fresh sink with the same settings (after a fatal error, or to drop a stuck queue).
    fn recreate(&self) -> Result<Self, String>;
    /// Whether batches go in Kafka transactions (`--delivery exactly-once`).
    fn transactional(&self) -> bool {
        false
    }
    /// Fence every earlier producer of this transactional id and return the last position it
    /// committed (`None`: none, or not transactional). A fresh sink, once per lease epoch.
    fn take_over(
        &self,
        _timeout: Duration,
    ) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, String>> + Send {
        async { Ok(None) }
    }
    /// Publish `position` in the open transaction and commit it (no-op unless transactional).
    fn commit(
        &self,
        _position: Vec<u8>,
        _timeout: Duration,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }
    /// Abort the open transaction, if any.
    fn abort(
        &self,
        _timeout: Duration,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }
    /// Whether the destination answers within `timeout` (for readiness).
    fn check_connection(
        &self,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// Routes librdkafka's own log lines into `tracing`.
pub struct RelayContext;

impl ClientContext for RelayContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
    }
}

/// When and where a message went, for trace spans (`spans`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Receipt {
    /// When the message was handed to the producer.
    pub handed_off: SystemTime,
    /// When the relay had its delivery report (or gave up waiting for it).
    pub reported: SystemTime,
    /// Partition and offset Kafka assigned; `None` unless delivered.
    pub position: Option<(i32, i64)>,
}

/// The Kafka [`Sink`].
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer<RelayContext>,
    config: std::sync::Arc<KafkaConfig>,
    /// `--delivery exactly-once`: batches go in Kafka transactions ([`txn`]).
    transactional: Option<Transactional>,
    /// Whether a transaction is open.
    in_transaction: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// When the last transaction ended (committed or aborted).
    txn_ended: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
    /// Topics the cluster said exist, and when it said so.
    known_topics: std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>>,
}

/// How long a topic's existence is trusted before it is checked again.
const TOPIC_CHECK_EVERY: Duration = Duration::from_secs(60);

impl Publisher {
    /// Build the producer. Fails only on invalid configuration (no connection is made here),
    /// with [`KafkaError::ClientCreation`] carrying [`KafkaConfig::describe_error`]'s text:
    /// librdkafka's own message may echo a property's value (a secret), this one never does.
    pub fn new(cfg: &KafkaConfig) -> Result<Publisher, KafkaError> {
        Publisher::with(cfg, None)
    }

    /// A publisher that puts every batch in a Kafka transaction (`transactional.id` set);
    /// [`Publisher::take_over`] before the first batch.
    pub fn with(
        cfg: &KafkaConfig,
        transactional: Option<Transactional>,
    ) -> Result<Publisher, KafkaError> {
        let mut config = client_config(cfg);
        if let Some(t) = &transactional {
            config.set("transactional.id", &t.id);
        }
        let producer = config
            .create_with_context(RelayContext)
            .map_err(|e| KafkaError::ClientCreation(cfg.describe_error(&e)))?;
        Ok(Publisher {
            producer,
            config: std::sync::Arc::new(cfg.clone()),
            transactional,
            in_transaction: Default::default(),
            txn_ended: Default::default(),
            known_topics: Default::default(),
        })
    }

    /// Enqueue every message, then return the future awaiting each delivery report in order
    /// ([`Sink::send`]).
    async fn send_all(
        &self,
        messages: Arc<[Message]>,
        cancel: &CancellationToken,
        flush_timeout: Duration,
    ) -> Reports {
        // A message to a topic the cluster says does not exist is not produced: librdkafka would
        // hold the whole batch for topic.metadata.propagation.max.ms first.
        let missing = self.missing_topics(&messages).await;
        let begun = self.begin_if_needed().await;
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages.iter() {
            let enqueued = if let Err(e) = &begun {
                Err(classify(e))
            } else if missing.contains(m.topic.as_str()) {
                Err(classify(&KafkaError::MessageProduction(
                    RDKafkaErrorCode::UnknownTopic,
                )))
            } else {
                self.enqueue(m, cancel).await
            };
            pending.push((enqueued, SystemTime::now()));
        }
        let (this, cancel) = (self.clone(), cancel.clone());
        Box::pin(async move {
            this.await_reports(&messages, pending, &cancel, flush_timeout)
                .await
        })
    }

    /// Await each enqueued message's delivery report, in order.
    async fn await_reports(
        &self,
        messages: &[Message],
        pending: Vec<(Result<DeliveryFuture, Failure>, SystemTime)>,
        cancel: &CancellationToken,
        flush_timeout: Duration,
    ) -> Published {
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut receipts = Vec::with_capacity(messages.len());
        let mut flushed = false;
        for (p, handed_off) in pending {
            let report = match p {
                Err(f) => Err(f),
                Ok(mut delivery) if !flushed => tokio::select! {
                    biased;
                    report = &mut delivery => report_outcome(report),
                    _ = cancel.cancelled() => {
                        flushed = true;
                        self.flush(flush_timeout).await;
                        delivery.now_or_never().map_or_else(|| Err(shutdown_failure()), report_outcome)
                    }
                },
                Ok(delivery) => delivery
                    .now_or_never()
                    .map_or_else(|| Err(shutdown_failure()), report_outcome),
            };
            receipts.push(Receipt {
                handed_off,
                reported: SystemTime::now(),
                position: report.as_ref().ok().copied(),
            });
            outcomes.push(report.map(|_| ()));
        }
        let mut published = Published { outcomes, receipts };
        if !flushed && !cancel.is_cancelled() {
            self.isolate_rejected(messages, &mut published).await;
        }
        published
    }

    /// Of the batch's topics, those the cluster says do not exist. A topic confirmed within
    /// [`TOPIC_CHECK_EVERY`] is not asked about; when the cluster cannot be asked, nothing is
    /// presumed missing.
    async fn missing_topics(&self, messages: &[Message]) -> HashSet<String> {
        let unchecked: HashSet<String> = {
            let known = self.known_topics.lock().unwrap_or_else(|e| e.into_inner());
            messages
                .iter()
                .filter(|m| {
                    known
                        .get(&m.topic)
                        .is_none_or(|at| at.elapsed() > TOPIC_CHECK_EVERY)
                })
                .map(|m| m.topic.clone())
                .collect()
        };
        let mut missing = HashSet::new();
        for topic in unchecked {
            let producer = self.producer.clone();
            let asked = topic.clone();
            let exists = tokio::task::spawn_blocking(move || {
                let metadata = producer
                    .client()
                    .fetch_metadata(Some(&asked), Duration::from_secs(5))
                    .ok()?;
                let t = metadata.topics().iter().find(|t| t.name() == asked)?;
                Some(t.error().is_none() && !t.partitions().is_empty())
            })
            .await
            .ok()
            .flatten();
            match exists {
                Some(true) => {
                    let mut known = self.known_topics.lock().unwrap_or_else(|e| e.into_inner());
                    known.insert(topic, Instant::now());
                }
                Some(false) => {
                    missing.insert(topic);
                }
                None => {}
            }
        }
        missing
    }

    /// The broker rejects a whole record batch for one bad record (e.g. a NULL key on a
    /// compacted topic: InvalidRecord), so every row that shared its batch comes back rejected.
    /// Publish each rejected message again alone (awaiting each report before the next), with
    /// every later message of its key, so only the offending row stays rejected; a key's later
    /// messages follow it again in order (duplicates, never a reordering).
    async fn isolate_rejected(&self, messages: &[Message], published: &mut Published) {
        let rejected: Vec<usize> = (0..messages.len())
            .filter(|&i| {
                matches!(
                    &published.outcomes[i],
                    Err(Failure::Poison {
                        kind: "rejected",
                        ..
                    })
                )
            })
            .collect();
        let shared = |i: usize| {
            messages
                .iter()
                .filter(|m| m.topic == messages[i].topic)
                .count()
                > 1
        };
        if !rejected.iter().any(|&i| shared(i)) {
            return;
        }
        let mut again: Vec<usize> = Vec::new();
        for &i in &rejected {
            again.push(i);
            if let Some(key) = &messages[i].key {
                again.extend((i + 1..messages.len()).filter(|&j| {
                    messages[j].topic == messages[i].topic && messages[j].key.as_ref() == Some(key)
                }));
            }
        }
        again.sort_unstable();
        again.dedup();
        tracing::info!(rows = again.len(), "the broker rejected a record batch: publishing its rows one by one to find the bad one");
        let never = CancellationToken::new();
        for i in again {
            let handed_off = SystemTime::now();
            let report = match self.enqueue(&messages[i], &never).await {
                Ok(delivery) => report_outcome(delivery.await),
                Err(f) => Err(f),
            };
            published.receipts[i] = Receipt {
                handed_off,
                reported: SystemTime::now(),
                position: report.as_ref().ok().copied(),
            };
            published.outcomes[i] = report.map(|_| ());
        }
    }

    async fn enqueue(
        &self,
        m: &Message,
        cancel: &CancellationToken,
    ) -> Result<DeliveryFuture, Failure> {
        let mut headers = OwnedHeaders::new_with_capacity(m.headers.len());
        for (k, v) in &m.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&m.topic).headers(headers);
        if let Some(key) = &m.key {
            record = record.key(key.as_str());
        }
        if let Some(payload) = &m.payload {
            record = record.payload(payload.as_slice());
        }
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Back-pressure: librdkafka's queue is full; let it drain.
                    if cancel.is_cancelled() {
                        return Err(shutdown_failure());
                    }
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(classify(&e)),
            }
        }
    }

    /// Flush explicitly (dropping a producer purges what it still holds).
    pub async fn flush(&self, timeout: Duration) {
        let producer = self.producer.clone();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        match flushed {
            Ok(Ok(())) => tracing::info!("producer flushed"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "producer flush did not finish; undelivered rows stay pending")
            }
            Err(e) => tracing::warn!(error = %e, "producer flush task failed"),
        }
    }

    /// A fatal producer error, if librdkafka has raised one.
    pub fn fatal_error(&self) -> Option<String> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    /// Ask a broker for cluster metadata: Ok if Kafka answers within `timeout`.
    pub async fn check_connection(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, timeout).map(|_| ())
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled))
    }
}

impl Sink for Publisher {
    async fn send(
        &self,
        messages: Arc<[Message]>,
        cancel: &CancellationToken,
        flush_timeout: Duration,
    ) -> Reports {
        self.send_all(messages, cancel, flush_timeout).await
    }

    fn fatal_error(&self) -> Option<String> {
        Publisher::fatal_error(self)
    }

    fn recreate(&self) -> Result<Self, String> {
        Publisher::with(&self.config, self.transactional.clone()).map_err(|e| e.to_string())
    }

    fn transactional(&self) -> bool {
        self.transactional.is_some()
    }

    async fn take_over(&self, timeout: Duration) -> Result<Option<Vec<u8>>, String> {
        Publisher::take_over(self, timeout).await
    }

    async fn commit(&self, position: Vec<u8>, timeout: Duration) -> Result<(), String> {
        self.commit_with(position, timeout).await
    }

    async fn abort(&self, timeout: Duration) -> Result<(), String> {
        Publisher::abort(self, timeout).await
    }

    async fn check_connection(&self, timeout: Duration) -> Result<(), String> {
        Publisher::check_connection(self, timeout)
            .await
            .map_err(|e| e.to_string())
    }
}

fn report_outcome(
    report: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<(i32, i64), Failure> {
    match report {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, _))) => Err(classify(&e)),
        Err(_) => Err(Failure::Transient(
            "delivery report lost (producer closed)".into(),
        )),
    }
}

fn shutdown_failure() -> Failure {
    Failure::Transient("shutting down before the delivery report arrived".into())
}
