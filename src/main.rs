//! The `outbox-relay` binary: parse flags, finish fallible setup, then hand over to the library.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

mod cli;

use cli::{
    AdoptArgs, CleanupArgs, Cli, Command, DatabaseArgs, DoctorArgs, FailedAction, FailedArgs,
    MigrateArgs, RunArgs, StatusArgs, TimeoutArgs,
};
use outbox_relay::kafka::Publisher;
use outbox_relay::settings::DatabaseConfig;
use outbox_relay::shutdown;
use outbox_relay::store;
use outbox_relay::store::errors::{self, Deadlines, Phase};
use outbox_relay::table::ReadMode;
use outbox_relay::telemetry::{self, LogFormat};

fn main() -> ExitCode {
    outbox_relay::keep_freed_memory();
    outbox_relay::install_tls_provider();
    let cli = Cli::parse(); // a bad flag exits 2 with a message naming it
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Migrate(args) => migrate(args),
        Command::Cleanup(args) => cleanup(args),
        Command::Doctor(args) => doctor(args),
        Command::Status(args) => status(args),
        Command::Failed(args) => failed(args),
        Command::Adopt(args) => adopt(args),
    }
}

/// A configuration error found after parsing: same exit code as a bad flag.
fn usage_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

/// One worker thread. The relay's tasks (the loop, the replication stream, the delivery-report
/// waiters, the progress writer) wake one another many times per batch; on one thread that
/// costs no thread switch, and librdkafka's own threads do the Kafka I/O. Measured against two
/// workers in ARCHITECTURE.md ("Runtime").
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

fn run(args: RunArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    telemetry::init_logging(args.log_format);
    let findings = outbox_relay::settings::transport_findings(&config.db, &config.kafka);
    if args.require_secure_transport && !findings.is_empty() {
        return usage_error(format!(
            "--require-secure-transport: {}",
            findings.join("; ")
        ));
    }
    for finding in &findings {
        tracing::warn!("insecure transport: {finding} (--require-secure-transport refuses this)");
    }
    let publisher = match Publisher::with(&config.kafka, config.transactional.clone()) {
        Ok(p) => p,
        Err(rdkafka::error::KafkaError::ClientCreation(why)) => {
            return usage_error(format!("invalid Kafka configuration: {why}"))
        }
        Err(e) => {
            return usage_error(format!(
                "invalid Kafka configuration: {}",
                config.kafka.describe_error(&e)
            ))
        }
    };
    let http = match std::net::TcpListener::bind(config.metrics_addr)
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
    {
        Ok(l) => l,
        Err(e) => {
            return usage_error(format!(
                "--metrics-addr {}: cannot listen ({e}); pick a free address:port",
                config.metrics_addr
            ))
        }
    };
    let shutdown_timeout = config.relay.shutdown_timeout;
    runtime().block_on(async move {
        let cancel = CancellationToken::new();
        if let Err(e) = shutdown::on_signal(cancel.clone()) {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
        let deadline = async {
            cancel.cancelled().await;
            tokio::time::sleep(shutdown_timeout).await;
        };
        // On the worker, beside the tasks it wakes (see `runtime`).
        let relay = tokio::spawn(outbox_relay::run(config, publisher, http, cancel.clone()));
        tokio::select! {
            result = relay => match result {
                Ok(Ok(())) => {
                    tracing::info!("stopped cleanly");
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "relay failed");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    tracing::error!(error = %e, "the relay task ended abnormally");
                    ExitCode::FAILURE
                }
            },
            _ = deadline => {
                tracing::error!(timeout = ?shutdown_timeout, "shutdown timed out; unmarked rows will be published again on restart");
                ExitCode::FAILURE
            }
        }
    })
}

/// The defaults of `--connect-timeout` and `--statement-timeout`: `migrate` and `adopt` may
/// wait for a database that is still starting (an init container) and `migrate` may build an
/// index; the inspection commands answer an operator at a terminal.
const SETUP: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(600));
const INSPECT: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(60));

/// How much longer than the statement bound the client waits for the command's database work:
/// PostgreSQL cancels a long statement itself (a clean error); this catches a server that
/// stopped answering.
const CLIENT_GRACE: Duration = Duration::from_secs(5);

/// Connect within `deadlines.connect`. With `retry`, a passing fault (connection refused, the
/// server starting up) is retried until that bound; a fault to fix, or a server that never
/// answers, ends at once.
async fn connect(
    db: &DatabaseConfig,
    deadlines: Deadlines,
    retry: bool,
) -> Result<sqlx::PgConnection, sqlx::Error> {
    let options = deadlines.apply(&db.connect);
    let start = Instant::now();
    let mut wait = Duration::from_millis(500);
    loop {
        let left = deadlines.connect.saturating_sub(start.elapsed());
        let e = match errors::within(
            Phase::Connect,
            left,
            sqlx::PgConnection::connect_with(&options),
        )
        .await
        {
            Ok(conn) => return Ok(conn),
            Err(e) if errors::timed_out(&e).is_some() => {
                return Err(errors::TimedOut {
                    phase: Phase::Connect,
                    after: deadlines.connect,
                }
                .into_sqlx())
            }
            Err(e) => e,
        };
        let left = deadlines.connect.saturating_sub(start.elapsed());
        if !retry || errors::diagnose(&e, &db.table).action == errors::Action::Fix {
            return Err(e);
        }
        if left <= wait {
            eprintln!(
                "giving up connecting to {}: --connect-timeout {} would pass before the next attempt",
                db.display,
                humantime::format_duration(deadlines.connect)
            );
            return Err(e);
        }
        eprintln!(
            "cannot connect to {} yet: {}; trying again in {} (for up to --connect-timeout {})",
            db.display,
            errors::describe(&e),
            humantime::format_duration(wait),
            humantime::format_duration(deadlines.connect)
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// A one-shot command's database error, printed once: what happened and the hint. Exit 1.
fn database_error(command: &str, e: &sqlx::Error, db: &DatabaseConfig) -> ExitCode {
    eprintln!(
        "error: {command}: {}\n  hint: {}",
        errors::describe(e),
        errors::hint(e, &db.table)
    );
    ExitCode::FAILURE
}

/// The connection could not be made: where to, what happened, the hint. Exit 1.
fn connect_error(command: &str, e: &sqlx::Error, db: &DatabaseConfig) -> ExitCode {
    eprintln!(
        "error: {command}: cannot connect to {}: {}\n  hint: {}",
        db.display,
        errors::describe(e),
        errors::hint(e, &db.table)
    );
    ExitCode::FAILURE
}

/// The command's database work `f`, bounded on the client by the statement bound (plus
/// [`CLIENT_GRACE`]).
async fn bounded<T, E: From<sqlx::Error>>(
    deadlines: Deadlines,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let after = deadlines.statement + CLIENT_GRACE;
    match tokio::time::timeout(after, f).await {
        Ok(result) => result,
        Err(_) => Err(errors::TimedOut {
            phase: Phase::Statement,
            after: deadlines.statement,
        }
        .into_sqlx()
        .into()),
    }
}

/// A pool of one connection for the pool-based commands (`status`, `failed`, `cleanup`), made
/// after one direct connection attempt that reports exactly why it failed (the pool would
/// retry and say only "timed out"). The pool's hooks record when the statement in flight
/// started, for [`watched`].
async fn pool(
    db: &DatabaseConfig,
    deadlines: Deadlines,
) -> Result<(PgPool, InFlight), sqlx::Error> {
    let probe = connect(db, deadlines, false).await?;
    let _ = probe.close().await;
    let in_flight = InFlight::default();
    let (on_connect, on_acquire, on_release) =
        (in_flight.clone(), in_flight.clone(), in_flight.clone());
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(deadlines.connect)
        .after_connect(move |_, _| {
            on_connect.set(Some(Instant::now()));
            Box::pin(async { Ok(()) })
        })
        .before_acquire(move |_, _| {
            on_acquire.set(Some(Instant::now()));
            Box::pin(async { Ok(true) })
        })
        .after_release(move |_, _| {
            on_release.set(None);
            Box::pin(async { Ok(true) })
        })
        .connect_lazy_with(deadlines.apply(&db.connect));
    Ok((pool, in_flight))
}

/// Since when the pool's connection has been out for a statement (None: idle).
#[derive(Clone, Default)]
struct InFlight(std::sync::Arc<std::sync::Mutex<Option<Instant>>>);

impl InFlight {
    fn set(&self, since: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = since;
    }

    fn since(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `f`, the work of a pool-based command, ended with a statement [`errors::TimedOut`] if one
/// statement stays unanswered for the statement bound plus [`CLIENT_GRACE`] (PostgreSQL
/// cancels a merely long statement first, with its own error): however many statements `f`
/// runs (cleanup deletes batch after batch), each one is bounded, not their sum.
async fn watched<T>(
    in_flight: &InFlight,
    deadlines: Deadlines,
    f: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    let stalled = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if in_flight
                .since()
                .is_some_and(|t| t.elapsed() > deadlines.statement + CLIENT_GRACE)
            {
                return;
            }
        }
    };
    tokio::select! {
        result = f => result,
        () = stalled => Err(errors::TimedOut { phase: Phase::Statement, after: deadlines.statement }.into_sqlx()),
    }
}

/// `migrate` and `adopt`: resolve the database flags, log as text, connect (retrying within
/// the connect bound), run `f` on the connection within the statement bound, and let `done`
/// turn the outcome into the exit code.
fn with_connection<T, E: From<sqlx::Error>>(
    command: &str,
    args: &DatabaseArgs,
    timeouts: &TimeoutArgs,
    f: impl AsyncFnOnce(&mut sqlx::PgConnection, &DatabaseConfig) -> Result<T, E>,
    done: impl FnOnce(Result<T, E>, &DatabaseConfig) -> ExitCode,
) -> ExitCode {
    let db = match args.resolve() {
        Ok(d) => d,
        Err(e) => return usage_error(e),
    };
    let deadlines = timeouts.deadlines(SETUP.0, SETUP.1);
    telemetry::init_logging(LogFormat::Text);
    runtime().block_on(async {
        let mut conn = match connect(&db, deadlines, true).await {
            Ok(c) => c,
            Err(e) => return connect_error(command, &e, &db),
        };
        let result = bounded(deadlines, f(&mut conn, &db)).await;
        done(result, &db)
    })
}

fn migrate(args: MigrateArgs) -> ExitCode {
    let log = match args.log.resolve(&args.db.table) {
        Ok(names) => names,
        Err(e) => return usage_error(e),
    };
    // Log mode never wants the NOTIFY trigger: the stream wakes the relay.
    let notify = args.notify_trigger && args.read_mode != ReadMode::Log;
    let mode = args.read_mode;
    if args.print_sql {
        print!("{}", args.db.table.ddl(notify, mode));
        if mode == ReadMode::Log {
            print!("{}", args.db.table.log_ddl(&log.publication));
            println!(
                "\n-- After the above commits (a slot must not start before its publication exists):\n\
                 SELECT pg_create_logical_replication_slot('{}', 'pgoutput');\n{};",
                log.slot,
                store::record_slot_snapshot(&args.db.table)
            );
        }
        return ExitCode::SUCCESS;
    }
    with_connection(
        "migrate",
        &args.db,
        &args.timeouts,
        async |conn, db| store::migrate(conn, &db.table, notify, mode, &log).await,
        |result, db| match result {
            Ok(()) => {
                println!(
                    "outbox table {} is up to date (notify trigger: {notify}, read mode: {})",
                    db.table,
                    mode.as_str()
                );
                ExitCode::SUCCESS
            }
            Err(e) => database_error("migrate", &e, db),
        },
    )
}

fn adopt(args: AdoptArgs) -> ExitCode {
    use outbox_relay::adopt::{self, AdoptError};
    if args.remove && args.print_sql {
        print!("{}", adopt::remove_ddl(&args.source_table));
        return ExitCode::SUCCESS;
    }
    let source = &args.source_table;
    with_connection(
        "adopt",
        &args.db,
        &args.timeouts,
        async |conn, db| {
            if args.remove {
                adopt::remove(conn, source).await?;
                return Ok(None);
            }
            adopt::install(conn, args.mapping(), &db.table, args.print_sql)
                .await
                .map(Some)
        },
        |result, db| match result {
            Ok(Some(sql)) if args.print_sql => {
                print!("{sql}");
                ExitCode::SUCCESS
            }
            Ok(Some(_)) => {
                tracing::info!(action = "adopt", source = %source, table = %db.table, "adoption trigger installed");
                println!(
                    "adopted {source}: each inserted row is copied into {} in the same transaction",
                    db.table
                );
                ExitCode::SUCCESS
            }
            Ok(None) => {
                tracing::info!(action = "adopt-remove", source = %source, "adoption trigger removed");
                println!(
                    "removed the adoption trigger from {source}: rows inserted from now on are not copied"
                );
                ExitCode::SUCCESS
            }
            Err(AdoptError::Database(e)) => database_error("adopt", &e, db),
            Err(e) => usage_error(e),
        },
    )
}

fn cleanup(args: CleanupArgs) -> ExitCode {
    let db = match args.db.resolve() {
        Ok(d) => d,
        Err(e) => return usage_error(e),
    };
    if args.retention.is_zero() {
        println!(
            "--retention 0s keeps published rows forever, as it does for `run`: nothing deleted"
        );
        return ExitCode::SUCCESS;
    }
    let deadlines = args.timeouts.deadlines(INSPECT.0, INSPECT.1);
    telemetry::init_logging(LogFormat::Text);
    runtime().block_on(async {
        let (pool, in_flight) = match pool(&db, deadlines).await {
            Ok(p) => p,
            Err(e) => return connect_error("cleanup", &e, &db),
        };
        let store = store::OutboxStore::new(
            pool,
            db.table.clone(),
            store::OnPublish::Mark,
            args.read_mode,
        );
        match watched(&in_flight, deadlines, store.cleanup(args.retention, 5000)).await {
            Ok(n) => {
                println!(
                    "deleted {n} published rows older than {}",
                    humantime::format_duration(args.retention)
                );
                ExitCode::SUCCESS
            }
            Err(e) => database_error("cleanup", &e, &db),
        }
    })
}

fn status(args: StatusArgs) -> ExitCode {
    let (db, log) = match (args.db.resolve(), args.log.resolve(&args.db.table)) {
        (Ok(db), Ok(log)) => (db, log),
        (Err(e), _) | (_, Err(e)) => return usage_error(e),
    };
    let deadlines = args.timeouts.deadlines(INSPECT.0, INSPECT.1);
    runtime().block_on(async {
        let (pool, in_flight) = match pool(&db, deadlines).await {
            Ok(p) => p,
            Err(e) => return connect_error("status", &e, &db),
        };
        let admin = outbox_relay::admin::Admin::new(pool, db.table.clone());
        match watched(&in_flight, deadlines, admin.status(args.read_mode, &log)).await {
            Ok(s) if args.json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).expect("status serializes")
                );
                ExitCode::SUCCESS
            }
            Ok(s) => {
                print!("{}", outbox_relay::admin::status_text(&s));
                ExitCode::SUCCESS
            }
            Err(e) => database_error("status", &e, &db),
        }
    })
}

fn failed(args: FailedArgs) -> ExitCode {
    let db = match args.db.resolve() {
        Ok(d) => d,
        Err(e) => return usage_error(e),
    };
    let deadlines = args.timeouts.deadlines(INSPECT.0, INSPECT.1);
    let command = match &args.action {
        FailedAction::List { .. } => "failed list",
        FailedAction::Retry { .. } => "failed retry",
        FailedAction::Skip { .. } => "failed skip",
        FailedAction::Purge { .. } => "failed purge",
    };
    telemetry::init_logging(LogFormat::Text);
    runtime().block_on(async {
        let (pool, in_flight) = match pool(&db, deadlines).await {
            Ok(p) => p,
            Err(e) => return connect_error(command, &e, &db),
        };
        let admin = outbox_relay::admin::Admin::new(pool, db.table.clone());
        let work = async {
            match &args.action {
                FailedAction::List { topic, limit, json } => admin.list_failed(topic.as_deref(), *limit).await.map(|rows| {
                    for r in &rows {
                        if *json {
                            println!("{}", serde_json::to_string(r).expect("row serializes"));
                        } else {
                            println!("{}", outbox_relay::admin::failed_text(r));
                        }
                    }
                }),
                FailedAction::Retry { rows, topic } => admin.retry(&rows.rows(), topic.as_deref()).await.map(|n| {
                    tracing::info!(action = "retry", rows = n, id = ?rows.id, key = ?rows.key, topic = ?topic, "parked rows made pending again");
                    println!("{n} parked rows are pending again");
                }),
                FailedAction::Skip { rows, topic, reason } => admin.skip(&rows.rows(), topic.as_deref(), reason).await.map(|n| {
                    tracing::info!(action = "skip", rows = n, id = ?rows.id, key = ?rows.key, topic = ?topic, reason = %reason, "parked rows skipped");
                    println!("{n} parked rows skipped (marked handled, not published)");
                }),
                FailedAction::Purge { older_than } => admin.purge(*older_than).await.map(|n| {
                    tracing::info!(action = "purge", rows = n, older_than = ?older_than, "parked and skipped rows deleted");
                    println!("{n} parked or skipped rows deleted");
                }),
            }
        };
        match watched(&in_flight, deadlines, work).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => database_error(command, &e, &db),
        }
    })
}

fn doctor(args: DoctorArgs) -> ExitCode {
    let (db, kafka, log) = match (
        args.db.resolve(),
        args.kafka.resolve(),
        args.log.resolve(&args.db.table),
    ) {
        (Ok(db), Ok(kafka), Ok(log)) => (db, kafka, log),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => return usage_error(e),
    };
    let transactional = match args.delivery.resolve(&db) {
        Ok(t) => t,
        Err(e) => return usage_error(e),
    };
    let deadlines = args.timeouts.deadlines(INSPECT.0, INSPECT.1);
    runtime().block_on(async {
        let findings = outbox_relay::doctor::run(
            &db,
            &kafka,
            args.read_mode,
            &log,
            transactional.as_ref(),
            deadlines,
        )
        .await;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&findings).expect("findings serialize")
            );
        } else {
            print!("{}", outbox_relay::doctor::text(&findings));
        }
        let failed = findings
            .iter()
            .any(|f| f.severity == outbox_relay::doctor::Severity::Error);
        if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    })
}
