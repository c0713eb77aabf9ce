//! The database's own limit for a relay read mode, with no Kafka, for the benchmark
//! (bench/bench.py, arms `db-limit-*`): how fast PostgreSQL serves the relay's read and
//! progress write of a backlog, through the relay's own code. The reader is the relay's
//! ([`ClaimReader`], `--batch-size` rows per read), the progress write is its ledger's
//! [`Ledger::record`] (the per-row mark, or the delete with `--on-publish delete`), fenced by
//! a real lease
//! ([`outbox_relay::lease::Lease`]). Every row counts as delivered the moment it is read:
//! Kafka takes no time.
//!
//! The overlap is the relay loop's (`src/relay/mod.rs`): one progress write in flight,
//! written in the background while the next batch is read, and the read leaves out the rows
//! that write is marking; the next write starts once the previous one has finished.
//!
//! Stops when a read finds nothing with no write in flight (the backlog is drained) or after
//! `--max-seconds`; prints one JSON line (rows, batches, wall time, rows/s, read and write
//! times). `cargo build --release --example db_limit`, then
//! `target/release/examples/db_limit --database-url postgresql://... --mode claim`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use clap::Parser;
use sqlx::postgres::PgConnectOptions;
use tokio::task::JoinHandle;

use outbox_relay::event::{Message, OutboxRow};
use outbox_relay::lease::{Leadership, Lease};
use outbox_relay::read::{BatchLimit, ClaimReader, Fence, Ledger, Reader, Recorded};
use outbox_relay::settle::settle;
use outbox_relay::store::{self, OnPublish, OutboxStore};
use outbox_relay::table::{ReadMode, TableName};

#[derive(Parser)]
struct Args {
    #[arg(long, env = "OUTBOX_RELAY_DATABASE_URL")]
    database_url: String,
    #[arg(long, default_value = "outbox")]
    table: String,
    #[arg(long, value_enum, default_value_t = ReadMode::Claim)]
    mode: ReadMode,
    #[arg(long, value_enum, default_value_t = OnPublish::Mark)]
    on_publish: OnPublish,
    /// The relay's default.
    #[arg(long, default_value_t = 1000)]
    batch_size: u32,
    /// The relay's default (2 MiB).
    #[arg(long, default_value_t = 2 << 20)]
    batch_bytes: u64,
    /// Stop after this long even if rows remain (the result says so).
    #[arg(long, default_value_t = 600.0)]
    max_seconds: f64,
    /// The relay's default lease duration (renewed every third of it, as the relay does).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
}

/// Per-batch timings, in milliseconds.
#[derive(Default)]
struct Times(Vec<f64>);

impl Times {
    fn summary(&mut self) -> serde_json::Value {
        if self.0.is_empty() {
            return serde_json::Value::Null;
        }
        self.0.sort_by(f64::total_cmp);
        let at = |q: f64| self.0[((self.0.len() - 1) as f64 * q).round() as usize];
        serde_json::json!({
            "mean_ms": self.0.iter().sum::<f64>() / self.0.len() as f64,
            "p50_ms": at(0.5),
            "p99_ms": at(0.99),
            "max_ms": at(1.0),
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    outbox_relay::keep_freed_memory(); // the relay's allocator settings
    let args = Args::parse();
    let connect: PgConnectOptions = args.database_url.parse()?;
    // The relay's pool: 4 connections, application_name as the relay sets it.
    let pool = store::pool(&connect.application_name("outbox-relay-db-limit"), 4);
    let table = TableName::parse(&args.table)?;
    let store = OutboxStore::new(pool.clone(), table.clone(), args.on_publish, args.mode);
    let mut lease = Lease::new(
        pool.clone(),
        &table,
        args.lease_duration,
        "bench-db-limit".into(),
    );
    let out = match args.mode {
        ReadMode::Claim => drain(ClaimReader::new(store, false), &mut lease, &args).await,
        // Log mode reads the WAL through a replication slot, not the table: its limit is the
        // walsender's, measured with pg_recvlogical (bench/bench.py, db-limit-log).
        ReadMode::Log => Err(
            "--mode log: log mode's database limit is the walsender's decoding of a replication \
             slot, not statements (bench/bench.py measures it with pg_recvlogical: db-limit-log)"
                .into(),
        ),
    };
    lease.release().await;
    println!("{}", out?);
    Ok(())
}

/// A progress write in the background: the rows it leaves out of reads, and the write (how it
/// ended, and how long it took in milliseconds).
type Write = (Vec<i64>, JoinHandle<Result<(Recorded, f64), sqlx::Error>>);

async fn drain<R: Reader>(
    mut reader: R,
    lease: &mut Lease,
    args: &Args,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    if !lease.ensure().await? {
        return Err("another process holds the relay's lease: stop the relay first".into());
    }
    reader.on_new_epoch().await?;
    let ledger = reader.ledger();
    let limit = BatchLimit {
        rows: args.batch_size,
        bytes: args.batch_bytes,
    };
    let (mut rows_done, mut batches) = (0u64, 0u64);
    let (mut reads, mut writes, mut waits) = (Times::default(), Times::default(), Times::default());
    let mut in_flight: Option<Write> = None;
    let started = Instant::now();
    let mut complete = false;
    while started.elapsed().as_secs_f64() < args.max_seconds {
        if !lease.ensure().await? {
            return Err("lost the lease to another process".into());
        }
        let exclude = in_flight
            .as_ref()
            .map_or(&[][..], |(ids, _)| ids.as_slice());
        let t = Instant::now();
        let rows = reader.next_batch(limit, exclude).await?;
        reads.0.push(ms(t));
        // As the relay: the previous batch's write must finish before this batch's starts.
        let had_write = in_flight.is_some();
        if let Some((_, write)) = in_flight.take() {
            let t = Instant::now();
            let (recorded, took) = write.await??;
            if recorded == Recorded::Fenced {
                return Err("progress write fenced: another process leads".into());
            }
            waits.0.push(ms(t));
            writes.0.push(took);
        }
        if rows.is_empty() {
            if had_write {
                continue; // the rows it left out may still be pending
            }
            complete = true;
            break;
        }
        batches += 1;
        rows_done += rows.len() as u64;
        let messages: Vec<Message> = rows.into_iter().map(delivered_message).collect();
        let outcomes = messages.iter().map(|_| Ok(())).collect();
        let delivered = settle(&messages, outcomes, false).delivered;
        let progress = reader.progress(delivered, &HashSet::new());
        // As the relay: reads leave out the rows this write marks.
        let ids = progress.mark.clone();
        let fence = Fence {
            holder: lease.holder().into(),
            epoch: lease.epoch(),
        };
        let ledger = ledger.clone();
        let write = tokio::spawn(async move {
            let t = Instant::now();
            let recorded = ledger.record(&progress, &fence).await?;
            Ok((recorded, ms(t)))
        });
        in_flight = Some((ids, write));
    }
    if let Some((_, write)) = in_flight.take() {
        writes.0.push(write.await??.1);
    }
    let wall = started.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "mode": args.mode.as_str(),
        "on_publish": format!("{:?}", args.on_publish).to_lowercase(),
        "batch_size": args.batch_size,
        "rows": rows_done,
        "batches": batches,
        "complete": complete,
        "wall_s": wall,
        "rate": rows_done as f64 / wall,
        "read": reads.summary(),
        "write": writes.summary(),
        "write_wait": waits.summary(),
    }))
}

/// The message a row would become; only its id, topic and key matter to `settle`.
fn delivered_message(row: OutboxRow) -> Message {
    Message {
        id: row.id,
        topic: row.topic,
        key: row.key,
        payload: None,
        headers: Vec::new(),
        created_at: row.created_at,
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}
