//! Kafka's producer-only ceiling, for the benchmark (bench/bench.py, arm `kafka-only`): a
//! librdkafka producer built from the relay's own producer properties
//! ([`outbox_relay::kafka::client_config`] with the relay's default compression, lz4) sends
//! `--messages` messages made the way the relay makes them ([`outbox_relay::event::to_message`]:
//! the same standard headers), keys spread over `--keys` keys, payloads `k=<key> s=<seq> `
//! padded to `--payload` bytes (what the benchmark's checker reads back).
//!
//! No database and no batch barrier: messages are handed over as fast as librdkafka takes them
//! (or at `--rate` per second, for the latency step), and each one's delivery report is
//! counted. Prints one JSON line: counts and wall time. `--no-headers` leaves the relay's
//! three headers out, to show what they cost. With `--send-times FILE`, writes one
//! `key seq unix_seconds` line per message (when it was handed to the producer), so the
//! checker can measure hand-over to the broker's LogAppendTime.
//!
//! `cargo build --release --example kafka_ceiling`, then
//! `target/release/examples/kafka_ceiling --brokers 127.0.0.1:39092 --topic t --messages 1000000`.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use outbox_relay::event::{to_message, MessageRules, OutboxRow};
use outbox_relay::kafka::config::Compression;
use outbox_relay::kafka::{client_config, KafkaConfig};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    topic: String,
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Payload bytes per message (the `k=.. s=.. ` prefix included).
    #[arg(long, default_value_t = 200)]
    payload: usize,
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Messages per second, paced open-loop from the start (0: as fast as the producer takes them).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Write `key seq unix_seconds` per message, the time it was handed to the producer.
    #[arg(long)]
    send_times: Option<std::path::PathBuf>,
    /// An existing topic to produce one message to before the clock starts (connections and
    /// the idempotent producer id are set up first).
    #[arg(long, default_value = "bench.warmup")]
    warmup_topic: String,
    /// The `outbox-source` header's value (the relay's table).
    #[arg(long, default_value = "public.outbox")]
    source: String,
    /// Leave out the relay's three headers (what they cost: librdkafka allocates each one).
    #[arg(long)]
    no_headers: bool,
}

/// Counts delivery reports (librdkafka's background thread calls `delivery`).
#[derive(Default)]
struct Reports {
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    outbox_relay::keep_freed_memory(); // the relay's allocator settings
    let args = Args::parse();
    let config = KafkaConfig::new(&args.brokers, Compression::Lz4, Vec::new())?;
    let producer: ThreadedProducer<Reports> =
        client_config(&config).create_with_context(Reports::default())?;
    let rules = MessageRules {
        source: args.source.clone(),
        ..MessageRules::default()
    };

    // Connect, get the producer id and the topic's metadata before the clock starts.
    send(&producer, &warm_message(&args, &rules))?;
    producer.flush(Duration::from_secs(60))?;
    producer
        .client()
        .fetch_metadata(Some(&args.topic), Duration::from_secs(30))?;
    let warm = producer.context().delivered.load(Ordering::Relaxed);

    let mut times = args
        .send_times
        .is_some()
        .then(|| Vec::with_capacity(args.messages as usize));
    let pad = vec![b'x'; args.payload];
    let started = Instant::now();
    for seq in 1..=args.messages {
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64(seq as f64 / args.rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let key = seq % args.keys;
        let mut payload = format!("k={key} s={seq} ").into_bytes();
        if payload.len() < pad.len() {
            payload.extend_from_slice(&pad[payload.len()..]);
        }
        let row = OutboxRow {
            id: seq as i64,
            topic: args.topic.clone(),
            key: Some(key.to_string()),
            payload: Some(payload),
            headers: None,
            created_at: chrono::Utc::now(),
            xid: None,
            unreadable: None,
        };
        let mut message = to_message(row, &rules).map_err(|e| e.1)?;
        if args.no_headers {
            message.headers.clear();
        }
        if let Some(times) = times.as_mut() {
            let at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
            times.push((key, seq, at));
        }
        send(&producer, &message)?;
    }
    let handed_over = started.elapsed();
    producer.flush(Duration::from_secs(600))?;
    let wall = started.elapsed();

    if let (Some(path), Some(times)) = (&args.send_times, &times) {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (key, seq, at) in times {
            writeln!(out, "{key} {seq} {at:.6}")?;
        }
        out.flush()?;
    }
    let reports = producer.context();
    let delivered = reports.delivered.load(Ordering::Relaxed) - warm;
    let failed = reports.failed.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "messages": args.messages,
            "delivered": delivered,
            "failed": failed,
            "payload": args.payload,
            "headers": !args.no_headers,
            "rate_offered": args.rate,
            "handed_over_s": handed_over.as_secs_f64(),
            "wall_s": wall.as_secs_f64(),
            "rate": delivered as f64 / wall.as_secs_f64(),
        })
    );
    if failed > 0 || delivered != args.messages {
        return Err(format!(
            "{delivered} of {} delivered, {failed} failed",
            args.messages
        )
        .into());
    }
    Ok(())
}

fn warm_message(args: &Args, rules: &MessageRules) -> outbox_relay::event::Message {
    let row = OutboxRow {
        id: 0,
        topic: args.warmup_topic.clone(),
        key: None,
        payload: Some(b"warm-up".to_vec()),
        headers: None,
        created_at: chrono::Utc::now(),
        xid: None,
        unreadable: None,
    };
    // A fixed, valid row: to_message cannot refuse it.
    to_message(row, rules).unwrap_or_else(|e| panic!("warm-up message: {}", e.1))
}

/// Hand one message to librdkafka as the relay does (topic, key, payload, its headers),
/// waiting while librdkafka's queue is full.
fn send(
    producer: &ThreadedProducer<Reports>,
    m: &outbox_relay::event::Message,
) -> Result<(), KafkaError> {
    let mut headers = OwnedHeaders::new_with_capacity(m.headers.len());
    for (k, v) in &m.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&m.topic).headers(headers);
    if let Some(key) = &m.key {
        record = record.key(key.as_str());
    }
    if let Some(payload) = &m.payload {
        record = record.payload(payload.as_slice());
    }
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}
