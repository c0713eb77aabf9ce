//! The `outbox-relay` binary: parse flags, finish fallible setup, then hand over to the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

mod cli;

use cli::{
    AdoptArgs, CleanupArgs, Cli, Command, DatabaseArgs, DoctorArgs, FailedAction, FailedArgs,
    MigrateArgs, RunArgs, StatusArgs,
};
use outbox_relay::kafka::Publisher;
use outbox_relay::settings::DatabaseConfig;
use outbox_relay::shutdown;
use outbox_relay::store::{self, errors};
use outbox_relay::telemetry::{self, LogFormat};

fn main() -> ExitCode {
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
    let publisher = match Publisher::new(&config.kafka) {
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
        tokio::select! {
            result = outbox_relay::run(config, publisher, http, cancel.clone()) => match result {
                Ok(()) => {
                    tracing::info!("stopped cleanly");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(error = %e, "relay failed");
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

/// Connect, retrying for up to a minute (an init container may start before the database).
async fn connect(db: &DatabaseConfig) -> Result<sqlx::PgConnection, sqlx::Error> {
    let policy = backoff::ExponentialBackoff {
        max_elapsed_time: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    backoff::future::retry(policy, || async {
        sqlx::PgConnection::connect_with(&db.connect)
            .await
            .map_err(|e| {
                let diagnosis = errors::diagnose(&e, &db.table);
                eprintln!("connecting to {}: {e} ({})", db.display, diagnosis.hint);
                match diagnosis.action {
                    errors::Action::Retry => backoff::Error::transient(e),
                    errors::Action::Fix => backoff::Error::permanent(e),
                }
            })
    })
    .await
}

/// `migrate` and `adopt`: resolve the database flags, log as text, connect (with retries),
/// run `f` on the connection, and let `done` turn the outcome into the exit code.
fn with_connection<T, E: From<sqlx::Error>>(
    args: &DatabaseArgs,
    f: impl AsyncFnOnce(&mut sqlx::PgConnection, &DatabaseConfig) -> Result<T, E>,
    done: impl FnOnce(Result<T, E>, &DatabaseConfig) -> ExitCode,
) -> ExitCode {
    let db = match args.resolve() {
        Ok(d) => d,
        Err(e) => return usage_error(e),
    };
    telemetry::init_logging(LogFormat::Text);
    runtime().block_on(async {
        let result = async {
            let mut conn = connect(&db).await?;
            f(&mut conn, &db).await
        }
        .await;
        done(result, &db)
    })
}

fn migrate(args: MigrateArgs) -> ExitCode {
    if args.print_sql {
        print!("{}", args.db.table.ddl(args.notify_trigger, args.read_mode));
        return ExitCode::SUCCESS;
    }
    let (notify, mode) = (args.notify_trigger, args.read_mode);
    with_connection(
        &args.db,
        async |conn, db| store::migrate(conn, &db.table, notify, mode).await,
        |result, db| match result {
            Ok(()) => {
                println!(
                    "outbox table {} is up to date (notify trigger: {notify}, read mode: {})",
                    db.table,
                    mode.as_str()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "error: migrate failed: {e} ({})",
                    errors::hint(&e, &db.table)
                );
                ExitCode::FAILURE
            }
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
        &args.db,
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
            Err(AdoptError::Database(e)) => {
                eprintln!("error: adopt failed: {e} ({})", errors::hint(&e, &db.table));
                ExitCode::FAILURE
            }
            Err(e) => usage_error(e),
        },
    )
}

fn cleanup(args: CleanupArgs) -> ExitCode {
    let db = match args.db.resolve() {
        Ok(d) => d,
        Err(e) => return usage_error(e),
    };
    telemetry::init_logging(LogFormat::Text);
    runtime().block_on(async {
        let pool = store::pool(&db.connect, 1);
        let store = store::OutboxStore::new(
            pool,
            db.table.clone(),
            store::OnPublish::Mark,
            args.read_mode,
        );
        match store.cleanup(args.retention, 5000).await {
            Ok(n) => {
                println!(
                    "deleted {n} published rows older than {}",
                    humantime::format_duration(args.retention)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "error: cleanup failed: {e} ({})",
                    errors::hint(&e, &db.table)
                );
                ExitCode::FAILURE
            }
        }
    })
}

fn status(args: StatusArgs) -> ExitCode {
    let db = match args.db.resolve() {
        Ok(d) => d,
        Err(e) => return usage_error(e),
    };
    runtime().block_on(async {
        let admin = outbox_relay::admin::Admin::new(store::pool(&db.connect, 1), db.table.clone());
        match admin.status().await {
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
            Err(e) => {
                eprintln!(
                    "error: status failed: {e} ({})",
                    errors::hint(&e, &db.table)
                );
                ExitCode::FAILURE
            }
        }
    })
}

fn failed(args: FailedArgs) -> ExitCode {
    let db = match args.db.resolve() {
        Ok(d) => d,
        Err(e) => return usage_error(e),
    };
    telemetry::init_logging(LogFormat::Text);
    runtime().block_on(async {
        let admin = outbox_relay::admin::Admin::new(store::pool(&db.connect, 1), db.table.clone());
        let result = match &args.action {
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
                tracing::info!(action = "purge", rows = n, older_than = ?older_than, "parked rows deleted");
                println!("{n} parked rows deleted");
            }),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: failed {:?}: {e} ({})", args.action, errors::hint(&e, &db.table));
                ExitCode::FAILURE
            }
        }
    })
}

fn doctor(args: DoctorArgs) -> ExitCode {
    let (db, kafka) = match (args.db.resolve(), args.kafka.resolve()) {
        (Ok(db), Ok(kafka)) => (db, kafka),
        (Err(e), _) | (_, Err(e)) => return usage_error(e),
    };
    runtime().block_on(async {
        let findings = outbox_relay::doctor::run(&db, &kafka).await;
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
