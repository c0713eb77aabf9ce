//! Exactly-once delivery, Kafka's side (`--delivery exactly-once`): the producer is
//! transactional, each batch is published in one Kafka transaction together with the relay's
//! position after it (a record keyed by the transactional id on the positions topic), and a
//! leader taking over first fences every earlier producer of the same transactional id
//! (`init_transactions` bumps its epoch: a paused former leader can no longer commit), then
//! reads the last committed position (read_committed) and trusts it over the database's.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::{Message as _, Offset, TopicPartitionList};

use super::{client_config, KafkaConfig, Publisher};

/// How far back from the end of each partition of the positions topic the last position is
/// looked for first (then from the start).
const RECENT: i64 = 1000;

/// How long a commit waits for the producer's queue to be empty before committing anyway.
const SETTLE_BEFORE_COMMIT: Duration = Duration::from_millis(50);

/// How long after a transaction ends the next one begins at the earliest. Kafka's transaction
/// coordinator acknowledges the end of a transaction before it has written its markers, and a
/// partition added to the next transaction until then is refused (CONCURRENT_TRANSACTIONS),
/// which librdkafka asks again only after a fixed 20 ms, a step in the latency tail
/// (ARCHITECTURE.md, "Exactly-once", has the measurements).
const AFTER_TRANSACTION: Duration = Duration::from_millis(2);

/// The transactional settings of a publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transactional {
    /// `transactional.id`: one per outbox table, shared by its replicas (that is what fences).
    pub id: String,
    /// The compacted topic holding each relay's position, keyed by `id`.
    pub positions_topic: String,
}

impl Publisher {
    /// Take over as the only producer of this transactional id: fence earlier ones (their open
    /// transaction is aborted, their next commit fails) and return the last committed position
    /// (`None` if this id never committed one).
    pub async fn take_over(&self, timeout: Duration) -> Result<Option<Vec<u8>>, String> {
        let Some(t) = self.transactional.clone() else {
            return Ok(None);
        };
        ensure_positions_topic(&self.config, &t.positions_topic).await?;
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.init_transactions(timeout))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("could not initialize Kafka transactions: {e}"))?;
        self.in_transaction
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let cfg = (*self.config).clone();
        tokio::task::spawn_blocking(move || last_position(&cfg, &t, timeout))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Open a transaction unless one is open (before the first message of a batch), no sooner
    /// than [`AFTER_TRANSACTION`] after the last one ended.
    pub(super) async fn begin_if_needed(&self) -> Result<(), KafkaError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.transactional.is_none() || self.in_transaction.load(SeqCst) {
            return Ok(());
        }
        let ended = *self.txn_ended.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(begin) = ended.map(|at| at + AFTER_TRANSACTION) {
            if begin > Instant::now() {
                tokio::time::sleep_until(begin.into()).await;
            }
        }
        self.in_transaction.store(true, SeqCst);
        self.producer
            .begin_transaction()
            .inspect_err(|_| self.in_transaction.store(false, SeqCst))
    }

    /// Publish `position` in the open transaction and commit it: the batch and the position
    /// become visible to read_committed consumers together, or neither does.
    pub async fn commit_with(&self, position: Vec<u8>, timeout: Duration) -> Result<(), String> {
        let Some(t) = &self.transactional else {
            return Ok(());
        };
        self.begin_if_needed().await.map_err(|e| e.to_string())?;
        let record = FutureRecord::to(&t.positions_topic)
            .key(t.id.as_str())
            .payload(position.as_slice());
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| format!("could not publish the position: {e}"))?;
        // Its report first: the client's commit flushes before committing, and a flush with a
        // message in flight waits out a 100 ms poll (the reports are served by another thread).
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(format!("the position was not delivered: {e}")),
            Err(_) => return Err("the position's delivery report was lost".into()),
        }
        let producer = self.producer.clone();
        let committed = tokio::task::spawn_blocking(move || {
            // rdkafka's commit first flushes, and its flush waits out a whole 100 ms poll
            // whenever anything is still counted in the producer's queue, even a delivery
            // report the polling thread is still handing over. Every message of this
            // transaction has its report, so the count reaches zero within microseconds: wait
            // for that first (bounded; the commit flushes anyway).
            let settled = Instant::now();
            while producer.in_flight_count() > 0 && settled.elapsed() < SETTLE_BEFORE_COMMIT {
                std::thread::sleep(Duration::from_micros(50));
            }
            producer.commit_transaction(timeout)
        })
        .await;
        self.ended_transaction();
        committed
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("could not commit the Kafka transaction: {e}"))
    }

    /// Abort the open transaction, if any: nothing of it reaches a read_committed consumer.
    pub async fn abort(&self, timeout: Duration) -> Result<(), String> {
        if self.transactional.is_none()
            || !self
                .in_transaction
                .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        let producer = self.producer.clone();
        let aborted =
            tokio::task::spawn_blocking(move || producer.abort_transaction(timeout)).await;
        self.ended_transaction();
        aborted
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("could not abort the Kafka transaction: {e}"))
    }

    fn ended_transaction(&self) {
        self.in_transaction
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let mut ended = self.txn_ended.lock().unwrap_or_else(|e| e.into_inner());
        *ended = Some(Instant::now());
    }
}

/// The last position `t.id` committed on `t.positions_topic` (read_committed), or `None`.
fn last_position(
    cfg: &KafkaConfig,
    t: &Transactional,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, String> {
    let mut config = client_config(cfg);
    for producer_only in [
        "enable.idempotence",
        "acks",
        "partitioner",
        "message.timeout.ms",
        "linger.ms",
        "compression.type",
        "transactional.id",
    ] {
        config.remove(producer_only);
    }
    let consumer: BaseConsumer = config
        .set("group.id", format!("{}.position-reader", t.id))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(|e| format!("could not create the positions reader: {e}"))?;
    let topic = t.positions_topic.as_str();
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("could not read the metadata of {topic}: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|m| m.name() == topic)
        .map(|m| m.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(format!(
            "the positions topic {topic} does not exist: create it (compacted) or let the relay create it"
        ));
    }
    for from_start in [false, true] {
        let mut latest: Option<(i32, i64, Vec<u8>)> = None;
        let mut assignment = TopicPartitionList::new();
        let mut ends = Vec::new();
        for &p in &partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, timeout)
                .map_err(|e| format!("could not read the end of {topic}: {e}"))?;
            if high > low {
                let from = if from_start {
                    low
                } else {
                    (high - RECENT).max(low)
                };
                assignment
                    .add_partition_offset(topic, p, Offset::Offset(from))
                    .map_err(|e| e.to_string())?;
                ends.push((p, high));
            }
        }
        if ends.is_empty() {
            return Ok(None);
        }
        consumer.assign(&assignment).map_err(|e| e.to_string())?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let position = consumer.position().map_err(|e| e.to_string())?;
            let done = ends.iter().all(|&(p, high)| {
                matches!(position.find_partition(topic, p).map(|e| e.offset()),
                    Some(Offset::Offset(o)) if o >= high)
            });
            if done {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "could not read {topic} to its end within {timeout:?} (an open transaction of another relay on it holds read_committed readers back)"
                ));
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) if m.key() == Some(t.id.as_bytes()) => {
                    let newer = latest
                        .as_ref()
                        .is_none_or(|(p, o, _)| *p != m.partition() || *o < m.offset());
                    if newer {
                        latest = Some((
                            m.partition(),
                            m.offset(),
                            m.payload().unwrap_or_default().to_vec(),
                        ));
                    }
                }
                Some(Ok(_)) | None => {}
                Some(Err(e)) => return Err(format!("could not read {topic}: {e}")),
            }
        }
        if let Some((.., payload)) = latest {
            return Ok(Some(payload));
        }
    }
    Ok(None)
}

/// Create the positions topic (compacted, one partition) if it is missing.
pub async fn ensure_positions_topic(cfg: &KafkaConfig, topic: &str) -> Result<(), String> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = client_config(cfg)
        .create()
        .map_err(|e| format!("could not create a Kafka admin client: {e}"))?;
    let brokers = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| format!("could not read the cluster's metadata: {e}"))?
        .brokers()
        .len()
        .clamp(1, 3) as i32;
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(brokers))
        .set("cleanup.policy", "compact")
        .set("min.compaction.lag.ms", "0")
        .set("segment.ms", "600000");
    let created = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .map_err(|e| format!("could not create {topic}: {e}"))?;
    for result in created {
        match result {
            Ok(_) => tracing::info!(topic, "created the positions topic"),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(format!("could not create {topic}: {code}")),
        }
    }
    Ok(())
}
