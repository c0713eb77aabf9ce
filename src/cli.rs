//! Command line and environment: raw clap flags, parsed once into the library's validated
//! settings ([`outbox_relay::settings`]). Only `main` uses this module.
//!
//! Every flag is also an environment variable `OUTBOX_RELAY_<FLAG>`. Secrets (the database
//! URL or password, Kafka SASL/TLS secrets) can come from the environment or from a file
//! (`*_FILE`), so they never have to appear in argv, and are wrapped in [`Secret`] so that
//! `Debug` output never shows them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use outbox_relay::adopt;
use outbox_relay::event::{check_topic, MessageRules, TopicAllowList};
use outbox_relay::kafka::config::{Compression, KafkaConfig};
use outbox_relay::read::log::LogNames;
use outbox_relay::relay::PoisonPolicy;
use outbox_relay::secret::Secret;
use outbox_relay::settings::{DatabaseConfig, RelayConfig};
use outbox_relay::store::errors::Deadlines;
use outbox_relay::store::OnPublish;
use outbox_relay::table::{ReadMode, TableName};
use outbox_relay::telemetry::LogFormat;

/// `--delivery`: what a crash may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Delivery {
    /// A crash publishes the rows in flight again (consumers deduplicate by event id).
    AtLeastOnce,
    /// Kafka transactions with the relay's position: read_committed consumers see each event
    /// once.
    ExactlyOnce,
}

#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Relays a PostgreSQL transactional outbox table to Apache Kafka"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay: read committed outbox rows, publish them to Kafka, mark them published.
    Run(Box<RunArgs>),
    /// Create or upgrade the outbox table (idempotent, safe from several replicas at once).
    Migrate(MigrateArgs),
    /// Delete published rows older than the retention, in small batches, then exit.
    Cleanup(CleanupArgs),
    /// Preflight: check the database, the table, privileges, Kafka, topics and limits.
    Doctor(DoctorArgs),
    /// Backlog per topic, oldest pending age, parked rows, and which replica leads.
    Status(StatusArgs),
    /// Inspect and act on parked (failed) rows: list, retry, skip, purge.
    Failed(FailedArgs),
    /// Publish an existing outbox table (Debezium's layout by default) unchanged: install a
    /// trigger that copies each inserted row into the relay's table, in the same transaction.
    Adopt(AdoptArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    // With --delivery exactly-once, doctor also checks what it needs: the brokers' transaction
    // settings, the positions topic, and that this principal may use transactions.
    #[command(flatten)]
    pub delivery: DeliveryArgs,
    /// The relay's read mode, whose needs are checked (log: wal_level, REPLICATION, the
    /// publication, the slot and the WAL it may retain). Default: the mode the table is
    /// migrated for.
    #[arg(long, env = "OUTBOX_RELAY_READ_MODE", value_parser = ReadMode::parse)]
    pub read_mode: Option<ReadMode>,
    #[command(flatten)]
    pub log: LogArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
    /// The relay's read mode (log: the backlog is in the WAL; the slot is shown). Default: the
    /// mode the table is migrated for.
    #[arg(long, env = "OUTBOX_RELAY_READ_MODE", value_parser = ReadMode::parse)]
    pub read_mode: Option<ReadMode>,
    #[command(flatten)]
    pub log: LogArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct FailedArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
    #[command(subcommand)]
    pub action: FailedAction,
}

/// Which parked rows an action applies to: one id, one key (optionally of one topic), or all.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct RowSelector {
    /// One row, by id.
    #[arg(long)]
    pub id: Option<i64>,
    /// Every parked row with this key (narrow with --topic).
    #[arg(long)]
    pub key: Option<String>,
    /// Every parked row.
    #[arg(long)]
    pub all: bool,
}

impl RowSelector {
    pub fn rows(&self) -> outbox_relay::admin::Rows {
        use outbox_relay::admin::Rows;
        match (self.id, &self.key) {
            (Some(id), _) => Rows::Id(id),
            (None, Some(key)) => Rows::Key(key.clone()),
            (None, None) => Rows::All,
        }
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum FailedAction {
    /// List parked rows with their error and attempts, oldest first.
    List {
        /// Only rows of this topic.
        #[arg(long)]
        topic: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
        limit: i64,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make parked rows pending again (after fixing the cause); the relay publishes them.
    Retry {
        #[command(flatten)]
        rows: RowSelector,
        /// With --key: only rows of this topic.
        #[arg(long)]
        topic: Option<String>,
    },
    /// Give up on parked rows: mark them handled without publishing, recording the reason.
    Skip {
        #[command(flatten)]
        rows: RowSelector,
        /// With --key: only rows of this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Why (kept in last_error).
        #[arg(long)]
        reason: String,
    },
    /// Delete parked and skipped rows that failed longer ago than --older-than.
    Purge {
        #[arg(long, value_parser = duration_within("0s", "3650d"))]
        older_than: Duration,
    },
}

/// The database flags, accepted anywhere after the command word (`failed list --table t`
/// as well as `failed --table t list`).
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://relay@db:5432/app?sslmode=verify-full&sslrootcert=/ca.pem.
    /// Prefer the environment variable or --database-url-file: argv is visible to every local user.
    #[arg(
        long,
        global = true,
        env = "OUTBOX_RELAY_DATABASE_URL",
        hide_env_values = true,
        help_heading = "Database"
    )]
    pub database_url: Option<Secret>,
    /// File holding the PostgreSQL URL (e.g. a mounted Kubernetes Secret).
    #[arg(
        long,
        global = true,
        env = "OUTBOX_RELAY_DATABASE_URL_FILE",
        help_heading = "Database"
    )]
    pub database_url_file: Option<PathBuf>,
    /// Password for the database role; overrides any password in the URL.
    #[arg(
        long,
        global = true,
        env = "OUTBOX_RELAY_DATABASE_PASSWORD",
        hide_env_values = true,
        help_heading = "Database"
    )]
    pub database_password: Option<Secret>,
    /// File holding the database password.
    #[arg(
        long,
        global = true,
        env = "OUTBOX_RELAY_DATABASE_PASSWORD_FILE",
        help_heading = "Database"
    )]
    pub database_password_file: Option<PathBuf>,
    /// Outbox table, optionally schema-qualified: `outbox` or `events.outbox`.
    #[arg(long, global = true, env = "OUTBOX_RELAY_TABLE", default_value = "outbox", value_parser = TableName::parse, help_heading = "Database")]
    pub table: TableName,
}

/// How long a one-shot command waits for PostgreSQL (`run` paces and retries on its own).
#[derive(Debug, Clone, Args)]
pub struct TimeoutArgs {
    /// Give up connecting after this long (TCP, TLS and authentication). `migrate` and `adopt`
    /// retry a refused or dropped connection within it. Default: 60s for migrate and adopt
    /// (an init container may start before the database), 10s for the other commands.
    #[arg(long, global = true, env = "OUTBOX_RELAY_CONNECT_TIMEOUT", value_parser = duration_within("1s", "1h"), help_heading = "Database")]
    pub connect_timeout: Option<Duration>,
    /// Give up on a statement after this long: PostgreSQL cancels it (statement_timeout), and
    /// the command stops waiting for a server that does not answer. Default: 10m for migrate
    /// (it may build an index), 60s for the other commands.
    #[arg(long, global = true, env = "OUTBOX_RELAY_STATEMENT_TIMEOUT", value_parser = duration_within("1s", "1d"), help_heading = "Database")]
    pub statement_timeout: Option<Duration>,
}

impl TimeoutArgs {
    /// The bounds of a command whose defaults are `connect` and `statement`.
    pub fn deadlines(&self, connect: Duration, statement: Duration) -> Deadlines {
        Deadlines {
            connect: self.connect_timeout.unwrap_or(connect),
            statement: self.statement_timeout.unwrap_or(statement),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "OUTBOX_RELAY_KAFKA_BROKERS", help_heading = "Kafka")]
    pub kafka_brokers: String,
    /// Any librdkafka producer property as key=value; repeatable (in the environment,
    /// separate several with `;`). Put secrets in --kafka-config-file, not here.
    #[arg(
        long = "kafka-config",
        env = "OUTBOX_RELAY_KAFKA_CONFIG",
        hide_env_values = true,
        value_delimiter = ';',
        help_heading = "Kafka"
    )]
    pub kafka_config: Vec<Secret>,
    /// File of librdkafka properties, one key=value per line (# comments). Use it for SASL and TLS secrets.
    #[arg(long, env = "OUTBOX_RELAY_KAFKA_CONFIG_FILE", help_heading = "Kafka")]
    pub kafka_config_file: Option<PathBuf>,
    /// SASL password (sets sasl.password). Prefer the environment variable or the _FILE flag.
    #[arg(
        long,
        env = "OUTBOX_RELAY_KAFKA_SASL_PASSWORD",
        hide_env_values = true,
        help_heading = "Kafka"
    )]
    pub kafka_sasl_password: Option<Secret>,
    /// File holding the SASL password.
    #[arg(
        long,
        env = "OUTBOX_RELAY_KAFKA_SASL_PASSWORD_FILE",
        help_heading = "Kafka"
    )]
    pub kafka_sasl_password_file: Option<PathBuf>,
    /// Compression codec for produced batches.
    #[arg(long, env = "OUTBOX_RELAY_COMPRESSION", value_enum, default_value_t = Compression::Lz4, help_heading = "Kafka")]
    pub compression: Compression,
}

/// `--delivery` and what exactly-once is configured with: `run` uses them, `doctor` checks
/// what they need.
#[derive(Debug, Clone, Args)]
pub struct DeliveryArgs {
    /// at-least-once: a crash publishes the rows in flight again. exactly-once: each batch is
    /// published in one Kafka transaction with the relay's position, so a read_committed
    /// consumer sees every event once through crashes and take-overs (claim mode; one batch
    /// in flight).
    #[arg(long, env = "OUTBOX_RELAY_DELIVERY", value_enum, default_value_t = Delivery::AtLeastOnce, help_heading = "Relay")]
    pub delivery: Delivery,
    /// exactly-once: the compacted topic that holds the relay's committed position (created,
    /// one partition, if missing).
    #[arg(
        long,
        env = "OUTBOX_RELAY_POSITIONS_TOPIC",
        default_value = "__outbox_relay_positions",
        help_heading = "Relay"
    )]
    pub positions_topic: String,
    /// exactly-once: Kafka's transactional.id, the same for every replica of one outbox table
    /// (that is what fences a paused former leader). Default:
    /// outbox-relay.<database>.<schema>.<table>.
    #[arg(long, env = "OUTBOX_RELAY_TRANSACTIONAL_ID", help_heading = "Relay")]
    pub transactional_id: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Maximum rows read, published and marked per batch.
    #[arg(long, env = "OUTBOX_RELAY_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000), help_heading = "Relay")]
    pub batch_size: u32,
    /// Maximum bytes per batch (keys, payloads and headers as JSON text; a larger row is published
    /// alone): bounds memory at any backlog. Suffixes KiB, MiB, GiB.
    #[arg(long, env = "OUTBOX_RELAY_BATCH_BYTES", default_value = "2MiB", value_parser = parse_bytes, help_heading = "Relay")]
    pub batch_bytes: u64,
    /// While a backlog drains, read and publish the next batches before the earlier ones'
    /// delivery reports are in: at most this many batches' worth of rows published or being
    /// recorded at once (--batch-bytes bounds their bytes together). A crash publishes these
    /// again; 1 publishes and records one batch at a time (always, with --delivery
    /// exactly-once: one batch per transaction).
    #[arg(long, env = "OUTBOX_RELAY_IN_FLIGHT_BATCHES", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64), help_heading = "Relay")]
    pub in_flight_batches: u32,
    #[command(flatten)]
    pub delivery: DeliveryArgs,
    /// Safety-net poll interval when no notification arrives (e.g. 250ms, 1s).
    #[arg(long, env = "OUTBOX_RELAY_POLL_INTERVAL", default_value = "250ms", value_parser = duration_within("10ms", "1h"), help_heading = "Relay")]
    pub poll_interval: Duration,
    /// Wake on LISTEN/NOTIFY from the table's insert trigger (poll-only when false).
    #[arg(long, env = "OUTBOX_RELAY_LISTEN", default_value_t = true, action = clap::ArgAction::Set, help_heading = "Relay")]
    pub listen: bool,
    /// Published rows older than this are deleted by the built-in cleanup (0s disables it).
    #[arg(long, env = "OUTBOX_RELAY_RETENTION", default_value = "1h", value_parser = duration_within("0s", "3650d"), help_heading = "Relay")]
    pub retention: Duration,
    /// What to do with a row once Kafka acknowledged it: mark it published (kept for
    /// --retention) or delete it at once (the fastest, lightest mode).
    #[arg(long, env = "OUTBOX_RELAY_ON_PUBLISH", value_enum, default_value_t = OnPublish::Mark, help_heading = "Relay")]
    pub on_publish: OnPublish,
    /// How events are found and settled: claim (by state, with a per-row mark) or log (from the
    /// WAL through a replication slot, in commit order, with no per-row write). Run `migrate
    /// --read-mode <mode>` first.
    #[arg(long, env = "OUTBOX_RELAY_READ_MODE", value_parser = ReadMode::parse, default_value = "claim", help_heading = "Relay")]
    pub read_mode: ReadMode,
    #[command(flatten)]
    pub log: LogArgs,
    /// How often the built-in cleanup runs.
    #[arg(long, env = "OUTBOX_RELAY_CLEANUP_INTERVAL", default_value = "1m", value_parser = duration_within("1s", "1d"), help_heading = "Relay")]
    pub cleanup_interval: Duration,
    /// Readiness fails when pending rows exist and no batch completed for this long.
    #[arg(long, env = "OUTBOX_RELAY_STALL_TIMEOUT", default_value = "60s", value_parser = duration_within("1s", "1d"), help_heading = "Relay")]
    pub stall_timeout: Duration,
    /// What to do with a row that can never be published (bad topic or headers, too large,
    /// unknown topic, not authorized).
    #[arg(long, env = "OUTBOX_RELAY_POISON_POLICY", value_enum, default_value_t = PoisonPolicy::Park, help_heading = "Relay")]
    pub poison_policy: PoisonPolicy,
    /// Topic for --poison-policy dead-letter.
    #[arg(long, env = "OUTBOX_RELAY_DEAD_LETTER_TOPIC", help_heading = "Relay")]
    pub dead_letter_topic: Option<String>,
    /// Leader lease: a replica that stops renewing (killed, paused, cut off) loses leadership
    /// after this long and a standby takes over. Graceful shutdown hands over at once.
    #[arg(long, env = "OUTBOX_RELAY_LEASE_DURATION", default_value = "10s", value_parser = duration_within("1s", "1h"), help_heading = "Relay")]
    pub lease_duration: Duration,
    /// Topics rows may name: exact names or prefixes ending in `*` (e.g. `orders.*,audit`).
    /// A row naming any other topic is parked. Empty allows every legal topic name.
    #[arg(
        long,
        env = "OUTBOX_RELAY_ALLOWED_TOPICS",
        value_delimiter = ',',
        help_heading = "Relay"
    )]
    pub allowed_topics: Vec<String>,
    /// Add CloudEvents 1.0 binary-mode headers (ce_specversion, ce_id, ce_source, ce_type,
    /// ce_time, ce_subject) to every message.
    #[arg(long, env = "OUTBOX_RELAY_CLOUDEVENTS", default_value_t = false, action = clap::ArgAction::Set, help_heading = "Relay")]
    pub cloudevents: bool,
    /// Refuse to start unless PostgreSQL uses sslmode=verify-full and Kafka uses verified TLS
    /// (without it, a plaintext or unverified connection only logs a warning).
    #[arg(long, env = "OUTBOX_RELAY_REQUIRE_SECURE_TRANSPORT", default_value_t = false, action = clap::ArgAction::Set, help_heading = "Operations")]
    pub require_secure_transport: bool,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "OUTBOX_RELAY_METRICS_ADDR",
        default_value = "0.0.0.0:9464",
        help_heading = "Operations"
    )]
    pub metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "OUTBOX_RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, help_heading = "Operations")]
    pub log_format: LogFormat,
    /// Time allowed after SIGTERM/SIGINT to finish in-flight work, flush and mark.
    #[arg(long, env = "OUTBOX_RELAY_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = duration_within("1s", "1h"), help_heading = "Operations")]
    pub shutdown_timeout: Duration,
    #[command(flatten)]
    pub otlp: OtlpArgs,
}

#[derive(Debug, Clone, Args)]
pub struct OtlpArgs {
    /// Export trace spans (outbox wait + publish, in the writer's trace from the row's
    /// `traceparent` header) over OTLP/HTTP (protobuf) to this collector, e.g.
    /// http://127.0.0.1:4318 or https://collector:4318 (`/v1/traces` is appended unless the
    /// path ends with it). Overrides OTEL_EXPORTER_OTLP_TRACES_ENDPOINT and
    /// OTEL_EXPORTER_OTLP_ENDPOINT; export is off when none is set. Headers (e.g. auth) come
    /// from OTEL_EXPORTER_OTLP_HEADERS, the CA for https from OTEL_EXPORTER_OTLP_CERTIFICATE.
    #[arg(long, env = "OUTBOX_RELAY_OTLP_ENDPOINT", value_parser = outbox_relay::spans::OtlpEndpoint::parse, help_heading = "Tracing")]
    pub otlp_endpoint: Option<outbox_relay::spans::OtlpEndpoint>,
    /// `service.name` of the exported spans [default: OTEL_SERVICE_NAME, else outbox-relay].
    #[arg(long, env = "OUTBOX_RELAY_OTLP_SERVICE_NAME", value_parser = parse_service_name, help_heading = "Tracing")]
    pub otlp_service_name: Option<String>,
    /// Time allowed for one export, retries included (spans are dropped, and counted, when it
    /// expires) [default: OTEL_EXPORTER_OTLP_TIMEOUT (milliseconds), else 5s].
    #[arg(long, env = "OUTBOX_RELAY_OTLP_TIMEOUT", value_parser = duration_within("100ms", "5m"), help_heading = "Tracing")]
    pub otlp_timeout: Option<Duration>,
}

impl OtlpArgs {
    /// The flags over the standard OTEL_* variables; `None`: export is off.
    pub fn resolve(&self) -> Result<Option<outbox_relay::spans::OtlpConfig>, ConfigError> {
        outbox_relay::spans::OtlpConfig::resolve(
            self.otlp_endpoint.clone(),
            self.otlp_service_name.clone(),
            self.otlp_timeout,
            &|name| std::env::var(name).ok(),
        )
        .map_err(ConfigError::Invalid)
    }
}

fn parse_service_name(s: &str) -> Result<String, String> {
    match s.trim() {
        "" => Err("must not be empty".into()),
        name => Ok(name.to_string()),
    }
}

/// Log mode's replication slot and publication.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// The logical replication slot --read-mode log consumes (a-z, 0-9, _). Default:
    /// outbox_relay_<schema>_<table>.
    #[arg(long, env = "OUTBOX_RELAY_SLOT", help_heading = "Log mode")]
    pub slot: Option<String>,
    /// The publication of the outbox table's inserts that the slot reads (a-z, 0-9, _).
    /// Default: the same name as the slot's default.
    #[arg(long, env = "OUTBOX_RELAY_PUBLICATION", help_heading = "Log mode")]
    pub publication: Option<String>,
}

impl LogArgs {
    pub fn resolve(&self, table: &TableName) -> Result<LogNames, ConfigError> {
        LogNames::new(table, self.slot.as_deref(), self.publication.as_deref())
            .map_err(ConfigError::Invalid)
    }
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
    /// Install the statement-level NOTIFY trigger (false drops it: poll-only, no commit-time lock).
    #[arg(long, env = "OUTBOX_RELAY_NOTIFY_TRIGGER", default_value_t = true, action = clap::ArgAction::Set)]
    pub notify_trigger: bool,
    /// What the relay's read mode needs: claim (an index of pending rows by id) or log (a
    /// publication, the emit function and a replication slot; no read index). The other mode's
    /// index is dropped, and what an earlier release's append mode added.
    #[arg(long, env = "OUTBOX_RELAY_READ_MODE", value_parser = ReadMode::parse, default_value = "claim")]
    pub read_mode: ReadMode,
    #[command(flatten)]
    pub log: LogArgs,
    /// Print the SQL for --table instead of applying it (to feed your own migration tool).
    #[arg(long)]
    pub print_sql: bool,
}

#[derive(Debug, Clone, Args)]
pub struct AdoptArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
    /// The existing outbox table, `table` or `schema.table` (case-sensitive, quoted).
    #[arg(long, env = "OUTBOX_RELAY_SOURCE_TABLE", value_parser = TableName::parse, help_heading = "Adopt")]
    pub source_table: TableName,
    /// Column holding the event id, published as header `id` (Debezium table.field.event.id).
    #[arg(long, env = "OUTBOX_RELAY_ID_COLUMN", default_value = "id", value_parser = parse_column, help_heading = "Adopt")]
    pub id_column: String,
    /// Column holding the Kafka key (Debezium table.field.event.key).
    #[arg(long, env = "OUTBOX_RELAY_KEY_COLUMN", default_value = "aggregateid", value_parser = parse_column, help_heading = "Adopt")]
    pub key_column: String,
    /// Column holding the Kafka value (Debezium table.field.event.payload).
    #[arg(long, env = "OUTBOX_RELAY_PAYLOAD_COLUMN", default_value = "payload", value_parser = parse_column, help_heading = "Adopt")]
    pub payload_column: String,
    /// Topic: literal parts and ${column} placeholders (Debezium route.topic.replacement with
    /// route.by.field aggregatetype).
    #[arg(long, env = "OUTBOX_RELAY_TOPIC_TEMPLATE", default_value = "outbox.event.${aggregatetype}", value_parser = adopt::TopicTemplate::parse, help_heading = "Adopt")]
    pub topic_template: adopt::TopicTemplate,
    /// More headers, comma-separated `column[:header-name]` (Debezium
    /// table.fields.additional.placement=column:header:name); empty for none.
    #[arg(long, env = "OUTBOX_RELAY_HEADER_COLUMNS", default_value = "type", value_parser = parse_header_columns, help_heading = "Adopt")]
    pub header_columns: HeaderColumns,
    /// Key bytes: `json` as Kafka Connect's JsonConverter writes them (a string key quoted), `raw`
    /// as StringConverter does.
    #[arg(long, env = "OUTBOX_RELAY_KEY_FORMAT", value_enum, default_value_t = adopt::Encoding::Json, help_heading = "Adopt")]
    pub key_format: adopt::Encoding,
    /// Value bytes: `json` as JsonConverter writes a JSON column without
    /// table.expand.json.payload (a JSON-encoded string), `raw` the column's text (StringConverter).
    #[arg(long, env = "OUTBOX_RELAY_PAYLOAD_FORMAT", value_enum, default_value_t = adopt::Encoding::Json, help_heading = "Adopt")]
    pub payload_format: adopt::Encoding,
    /// Header values: `json` as Debezium Server's default header format (debezium.format.header=json),
    /// `string` the column's text (Kafka Connect's SimpleHeaderConverter).
    #[arg(long, env = "OUTBOX_RELAY_HEADER_FORMAT", value_enum, default_value_t = adopt::HeaderFormat::Json, help_heading = "Adopt")]
    pub header_format: adopt::HeaderFormat,
    /// With --header-format json: the schema envelope around each value (debezium.format.header.schemas.enable).
    #[arg(long, env = "OUTBOX_RELAY_HEADER_SCHEMAS_ENABLE", default_value_t = true, action = clap::ArgAction::Set, help_heading = "Adopt")]
    pub header_schemas_enable: bool,
    /// A NULL or blank payload becomes a tombstone (Debezium route.tombstone.on.empty.payload).
    #[arg(long, env = "OUTBOX_RELAY_ROUTE_TOMBSTONE_ON_EMPTY_PAYLOAD", default_value_t = false, action = clap::ArgAction::Set, help_heading = "Adopt")]
    pub route_tombstone_on_empty_payload: bool,
    /// Print the SQL instead of applying it (still reads the table's columns to check the mapping).
    #[arg(long, env = "OUTBOX_RELAY_PRINT_SQL", help_heading = "Adopt")]
    pub print_sql: bool,
    /// Remove the trigger from --source-table: rows inserted from then on are not copied.
    #[arg(long, env = "OUTBOX_RELAY_ADOPT_REMOVE", help_heading = "Adopt")]
    pub remove: bool,
}

/// The parsed `--header-columns` list.
#[derive(Debug, Clone, Default)]
pub struct HeaderColumns(pub Vec<adopt::HeaderColumn>);

fn parse_header_columns(s: &str) -> Result<HeaderColumns, String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(adopt::HeaderColumn::parse)
        .collect::<Result<_, _>>()
        .map(HeaderColumns)
}

fn parse_column(s: &str) -> Result<String, String> {
    adopt::check_column(s).map(|()| s.to_string())
}

impl AdoptArgs {
    pub fn mapping(&self) -> adopt::Mapping {
        adopt::Mapping {
            source: self.source_table.clone(),
            id_column: self.id_column.clone(),
            key_column: self.key_column.clone(),
            payload_column: self.payload_column.clone(),
            topic: self.topic_template.clone(),
            headers: self.header_columns.0.clone(),
            key_format: self.key_format,
            payload_format: self.payload_format,
            header_format: self.header_format,
            header_schemas: self.header_schemas_enable,
            tombstone_on_empty_payload: self.route_tombstone_on_empty_payload,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
    /// Delete published rows older than this (0s keeps them forever, as for `run`). Parked and
    /// skipped rows are never deleted here (`failed purge` does that).
    #[arg(long, env = "OUTBOX_RELAY_RETENTION", default_value = "1h", value_parser = duration_within("0s", "3650d"))]
    pub retention: Duration,
    /// The relay's read mode: claim deletes published rows, log every row but parked ones.
    #[arg(long, env = "OUTBOX_RELAY_READ_MODE", value_parser = ReadMode::parse, default_value = "claim")]
    pub read_mode: ReadMode,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (use a duration such as 250ms, 5s or 1m)"))
}

/// A size in bytes: a number, optionally with KiB, MiB or GiB; from 1 KiB to 1 GiB.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => s.split_at(at),
        None => (s, ""),
    };
    let unit = match unit.trim() {
        "" | "B" => 1u64,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit {other:?}: use a number of bytes, or KiB, MiB, GiB"
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| "expected a size such as 16MiB".to_string())?;
    match n.checked_mul(unit) {
        Some(b) if (1 << 10..=1 << 30).contains(&b) => Ok(b),
        _ => Err("must be between 1KiB and 1GiB".into()),
    }
}

/// A duration flag's parser: a duration from `min` to `max` (both humantime literals), so
/// that no value makes the process hammer the database (`--poll-interval 0s`) or overflow a
/// timestamp (`--lease-duration 300000000years`). clap names the flag in the error.
fn duration_within(
    min: &'static str,
    max: &'static str,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let bound = |b: &str| humantime::parse_duration(b).unwrap_or_default();
        let d = parse_duration(s)?;
        if d < bound(min) || d > bound(max) {
            Err(format!("must be from {min} to {max}"))
        } else {
            Ok(d)
        }
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err("expected key=value (a librdkafka property)".to_string()),
    }
}

/// A configuration problem found after flag parsing (reading a file, a bad URL...).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag}: cannot read {path}: {source}")]
    ReadFile {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--database-url (or OUTBOX_RELAY_DATABASE_URL / --database-url-file) is required")]
    MissingDatabaseUrl,
    #[error("--database-url: not a valid PostgreSQL URL ({0}); expected postgres://user@host:5432/dbname")]
    BadDatabaseUrl(String),
    #[error("--kafka-config-file {path}: line {line}: expected key=value")]
    BadKafkaConfigLine { path: PathBuf, line: usize },
    #[error(
        "{value} and {file} are both set (as flags, or as {env} and {env}_FILE): set only one"
    )]
    Conflict {
        value: &'static str,
        file: &'static str,
        env: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
}

fn read_secret_file(flag: &'static str, path: &Path) -> Result<Secret, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| Secret::new(s.trim_end_matches(['\n', '\r'])))
        .map_err(|source| ConfigError::ReadFile {
            flag,
            path: path.to_path_buf(),
            source,
        })
}

impl DatabaseArgs {
    pub fn resolve(&self) -> Result<DatabaseConfig, ConfigError> {
        let url = match (&self.database_url, &self.database_url_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict {
                    value: "--database-url",
                    file: "--database-url-file",
                    env: "OUTBOX_RELAY_DATABASE_URL",
                })
            }
            (Some(url), None) => url.clone(),
            (None, Some(path)) => read_secret_file("--database-url-file", path)?,
            (None, None) => return Err(ConfigError::MissingDatabaseUrl),
        };
        let mut connect: sqlx::postgres::PgConnectOptions =
            url.expose().parse().map_err(|e: sqlx::Error| {
                ConfigError::BadDatabaseUrl(redact_url_error(&e.to_string(), &url))
            })?;
        let password = match (&self.database_password, &self.database_password_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict {
                    value: "--database-password",
                    file: "--database-password-file",
                    env: "OUTBOX_RELAY_DATABASE_PASSWORD",
                })
            }
            (Some(p), None) => Some(p.clone()),
            (None, Some(path)) => Some(read_secret_file("--database-password-file", path)?),
            (None, None) => None,
        };
        // A replication connection (log mode) is not made by sqlx: keep what it needs.
        let parsed = url::Url::parse(url.expose()).ok();
        let query = |name: &str| {
            parsed.as_ref().and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.into_owned())
            })
        };
        let ssl_root_cert = query("sslrootcert")
            .or_else(|| std::env::var("PGSSLROOTCERT").ok())
            .map(PathBuf::from);
        let password = password
            .or_else(|| {
                let p = parsed.as_ref()?.password()?;
                // Percent-decoding (a literal '+' in userinfo is a '+', not a space).
                let p = p.replace('+', "%2B");
                let p = url::form_urlencoded::parse(format!("p={p}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())?;
                Some(Secret::new(p))
            })
            .or_else(|| std::env::var("PGPASSWORD").ok().map(Secret::new));
        if let Some(p) = &password {
            connect = connect.password(p.expose());
        }
        connect = connect.application_name("outbox-relay");
        let display = format!(
            "{}:{}/{}",
            connect.get_host(),
            connect.get_port(),
            connect.get_database().unwrap_or("(default)")
        );
        Ok(DatabaseConfig {
            connect,
            password,
            ssl_root_cert,
            table: self.table.clone(),
            display,
        })
    }
}

fn redact_url_error(message: &str, url: &Secret) -> String {
    // A parse error may echo the URL back; never let the password through.
    if url.expose().is_empty() {
        message.to_string()
    } else {
        message.replace(url.expose(), "<database url>")
    }
}

impl KafkaArgs {
    pub fn resolve(&self) -> Result<KafkaConfig, ConfigError> {
        let mut overrides = Vec::new();
        if let Some(path) = &self.kafka_config_file {
            let text = read_secret_file("--kafka-config-file", path)?;
            for (i, line) in text.expose().lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (k, v) =
                    parse_key_value(line).map_err(|_| ConfigError::BadKafkaConfigLine {
                        path: path.clone(),
                        line: i + 1,
                    })?;
                let origin = format!("--kafka-config-file {} line {}", path.display(), i + 1);
                overrides.push((origin, k, Secret::new(v)));
            }
        }
        for (i, entry) in self.kafka_config.iter().enumerate() {
            // Parsed here, not by clap: clap echoes a rejected value, and it may be a secret.
            let (k, v) = parse_key_value(entry.expose()).map_err(|_| {
                ConfigError::Invalid(format!(
                    "--kafka-config entry {} is not key=value (a librdkafka property); \
                     the value is not shown as it may hold a secret",
                    i + 1
                ))
            })?;
            overrides.push(("--kafka-config".to_string(), k, Secret::new(v)));
        }
        let password = match (&self.kafka_sasl_password, &self.kafka_sasl_password_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict {
                    value: "--kafka-sasl-password",
                    file: "--kafka-sasl-password-file",
                    env: "OUTBOX_RELAY_KAFKA_SASL_PASSWORD",
                })
            }
            (Some(p), None) => Some(("--kafka-sasl-password", p.clone())),
            (None, Some(path)) => Some((
                "--kafka-sasl-password-file",
                read_secret_file("--kafka-sasl-password-file", path)?,
            )),
            (None, None) => None,
        };
        // Two sources for the SASL password: refused (after the properties were checked),
        // rather than one silently winning.
        let in_properties = overrides
            .iter()
            .find(|(_, k, _)| k == "sasl.password")
            .map(|(origin, _, _)| origin.clone());
        let flag = password.as_ref().map(|(flag, _)| *flag);
        if let Some((flag, p)) = password {
            overrides.push((flag.to_string(), "sasl.password".into(), p));
        }
        let config = KafkaConfig::new(&self.kafka_brokers, self.compression, overrides)
            .map_err(ConfigError::Invalid)?;
        if let (Some(flag), Some(origin)) = (flag, in_properties) {
            return Err(ConfigError::Invalid(format!(
                "{flag} and sasl.password in {origin} both set the SASL password: set it in one place only"
            )));
        }
        Ok(config)
    }
}

impl DeliveryArgs {
    /// `--delivery exactly-once`: the transactional id and positions topic; `None` for
    /// at-least-once.
    pub fn resolve(
        &self,
        db: &DatabaseConfig,
    ) -> Result<Option<outbox_relay::kafka::Transactional>, ConfigError> {
        if self.delivery == Delivery::AtLeastOnce {
            return Ok(None);
        }
        let id = match &self.transactional_id {
            Some(id) if id.trim().is_empty() => {
                return Err(ConfigError::Invalid("--transactional-id is empty".into()))
            }
            Some(id) => id.clone(),
            None => format!(
                "outbox-relay.{}.{}",
                db.connect.get_database().unwrap_or("postgres"),
                db.table
            ),
        };
        if self.positions_topic.is_empty() || self.positions_topic.len() > 249 {
            return Err(ConfigError::Invalid(
                "--positions-topic must be 1 to 249 characters".into(),
            ));
        }
        Ok(Some(outbox_relay::kafka::Transactional {
            id,
            positions_topic: self.positions_topic.clone(),
        }))
    }
}

impl RunArgs {
    fn dead_letter_topic(&self) -> Result<Option<String>, ConfigError> {
        match (self.poison_policy, &self.dead_letter_topic) {
            (PoisonPolicy::DeadLetter, Some(t)) => match check_topic(t) {
                Ok(()) => Ok(Some(t.clone())),
                Err(e) => Err(ConfigError::Invalid(format!("--dead-letter-topic: {e}"))),
            },
            (PoisonPolicy::DeadLetter, None) => Err(ConfigError::Invalid(
                "--poison-policy dead-letter needs --dead-letter-topic".into(),
            )),
            (_, Some(_)) => Err(ConfigError::Invalid(
                "--dead-letter-topic is only used with --poison-policy dead-letter".into(),
            )),
            (_, None) => Ok(None),
        }
    }

    fn read_mode(&self) -> Result<ReadMode, ConfigError> {
        if self.read_mode == ReadMode::Log {
            if self.on_publish == OnPublish::Delete {
                return Err(ConfigError::Invalid(
                    "--on-publish delete needs --read-mode claim: log mode writes no row per event \
                     (the slot's position moves instead) and the built-in cleanup deletes rows after --retention"
                        .into(),
                ));
            }
            if self.poison_policy == PoisonPolicy::BlockKey {
                return Err(ConfigError::Invalid(
                    "--poison-policy block-key needs --read-mode claim: log mode reads a stream that cannot \
                     hold one key back; use park or dead-letter"
                        .into(),
                ));
            }
        }
        Ok(self.read_mode)
    }

    pub fn resolve(&self) -> Result<RelayConfig, ConfigError> {
        let db = self.db.resolve()?;
        let read_mode = self.read_mode()?;
        let transactional = self.delivery.resolve(&db)?;
        // One batch per transaction: a transaction holds exactly the rows its position covers.
        let in_flight_batches = match transactional {
            Some(_) => 1,
            None => self.in_flight_batches,
        };
        Ok(RelayConfig {
            transactional,
            kafka: self.kafka.resolve()?,
            relay: outbox_relay::relay::Settings {
                table: db.table.clone(),
                batch_size: self.batch_size,
                batch_bytes: self.batch_bytes,
                in_flight_batches,
                poll_interval: self.poll_interval,
                listen: self.listen,
                stall_timeout: self.stall_timeout,
                shutdown_timeout: self.shutdown_timeout,
                poison_policy: self.poison_policy,
                dead_letter_topic: self.dead_letter_topic()?,
                rules: MessageRules {
                    source: self.db.table.to_string(),
                    allowed_topics: TopicAllowList::new(&self.allowed_topics)
                        .map_err(|e| ConfigError::Invalid(format!("--allowed-topics: {e}")))?,
                    cloudevents: self.cloudevents,
                },
            },
            db,
            read_mode,
            log: self.log.resolve(&self.db.table)?,
            on_publish: self.on_publish,
            retention: self.retention,
            cleanup_interval: self.cleanup_interval,
            lease_duration: self.lease_duration,
            metrics_addr: self.metrics_addr,
            otlp: self.otlp.resolve()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<Cli, clap::Error> {
        let mut argv = vec!["outbox-relay", "run", "--kafka-brokers", "k:9092"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv)
    }

    #[test]
    fn log_mode_refuses_settings_it_cannot_honour() {
        let resolve = |extra: &[&str]| {
            let mut argv = vec!["--database-url", "postgres://db/a"];
            argv.extend_from_slice(extra);
            let Command::Run(args) = run_args(&argv).unwrap().command else {
                panic!("not run")
            };
            args.resolve().map(|c| c.read_mode)
        };
        assert_eq!(resolve(&["--read-mode", "log"]).unwrap(), ReadMode::Log);
        assert_eq!(resolve(&[]).unwrap(), ReadMode::Claim);
        for bad in [["--on-publish", "delete"], ["--poison-policy", "block-key"]] {
            let err = resolve(&["--read-mode", "log", bad[0], bad[1]])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(bad[0]) && err.contains("--read-mode claim"),
                "{err}"
            );
        }
    }

    #[test]
    fn exactly_once_runs_in_every_read_mode_and_doctor_takes_its_flags() {
        let resolve = |extra: &[&str]| {
            let mut argv = vec!["--database-url", "postgres://db/app", "--table", "s.t"];
            argv.extend_from_slice(extra);
            let Command::Run(args) = run_args(&argv).unwrap().command else {
                panic!("not run")
            };
            args.resolve()
        };
        let c = resolve(&["--delivery", "exactly-once"]).unwrap();
        assert_eq!(
            c.transactional,
            Some(outbox_relay::kafka::Transactional {
                id: "outbox-relay.app.s.t".into(),
                positions_topic: "__outbox_relay_positions".into(),
            })
        );
        assert_eq!(c.relay.in_flight_batches, 1, "one batch per transaction");
        let c = resolve(&["--in-flight-batches", "8"]).unwrap();
        assert_eq!((c.transactional, c.relay.in_flight_batches), (None, 8));
        let c = resolve(&["--delivery", "exactly-once", "--read-mode", "log"]).unwrap();
        assert!(c.transactional.is_some(), "log mode runs exactly-once too");

        let cli = Cli::try_parse_from([
            "outbox-relay",
            "doctor",
            "--kafka-brokers",
            "k:9092",
            "--database-url",
            "postgres://db/app",
            "--delivery",
            "exactly-once",
            "--transactional-id",
            "relay-a",
            "--positions-topic",
            "positions",
        ])
        .unwrap();
        let Command::Doctor(args) = cli.command else {
            panic!("not doctor")
        };
        let db = args.db.resolve().unwrap();
        assert_eq!(
            args.delivery.resolve(&db).unwrap(),
            Some(outbox_relay::kafka::Transactional {
                id: "relay-a".into(),
                positions_topic: "positions".into(),
            })
        );
    }

    #[test]
    fn the_removed_append_mode_is_refused_with_the_way_out() {
        for argv in [vec!["--read-mode", "append"], vec!["--read-mode", "APPEND"]] {
            let err = run_args(&argv).unwrap_err().to_string();
            assert!(
                err.contains("append mode was removed")
                    && err.contains("migrate --read-mode log")
                    && err.contains("nothing is lost"),
                "{err}"
            );
        }
        for sub in ["migrate", "cleanup", "doctor", "status"] {
            let err = Cli::try_parse_from(["outbox-relay", sub, "--read-mode", "append"])
                .unwrap_err()
                .to_string();
            assert!(err.contains("append mode was removed"), "{sub}: {err}");
        }
        let err = run_args(&["--read-mode", "poll"]).unwrap_err().to_string();
        assert!(err.contains("claim or log"), "{err}");
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let err = run_args(&["--poll-interval", "soon"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--poll-interval"), "{err}");
        let err = run_args(&["--batch-size", "0"]).unwrap_err();
        assert!(err.to_string().contains("--batch-size"), "{err}");
        let err = run_args(&["--table", "a.b.c"]).unwrap_err();
        assert!(err.to_string().contains("--table"), "{err}");
        let cli = run_args(&[
            "--database-url",
            "postgres://db/a",
            "--kafka-config",
            "sasl.password:hunter2",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let err = args.resolve().unwrap_err().to_string();
        assert!(err.contains("entry 1 is not key=value"), "{err}");
        assert!(
            !err.contains("hunter2"),
            "a malformed entry must not be echoed: {err}"
        );
    }

    #[test]
    fn durations_and_sizes_out_of_their_range_are_refused_naming_the_flag() {
        for (flag, bad) in [
            ("--poll-interval", "0s"),
            ("--poll-interval", "2h"),
            ("--lease-duration", "300000000years"),
            ("--lease-duration", "500ms"),
            ("--retention", "300000000years"),
            ("--cleanup-interval", "0s"),
            ("--stall-timeout", "0s"),
            ("--shutdown-timeout", "5d"),
            ("--otlp-timeout", "1ms"),
            ("--batch-size", "100001"),
        ] {
            let err = run_args(&[flag, bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{flag} {bad}");
            let shown = err.to_string();
            assert!(shown.contains(flag), "{flag} {bad}: {shown}");
        }
        let err = run_args(&["--poll-interval", "0s"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be from 10ms to 1h"), "{err}");
        for (flag, argv) in [
            ("--limit", &["failed", "list", "--limit", "0"][..]),
            ("--limit", &["failed", "list", "--limit=-1"]),
            (
                "--older-than",
                &["failed", "purge", "--older-than", "300000000years"],
            ),
            ("--retention", &["cleanup", "--retention", "300000000years"]),
            ("--connect-timeout", &["status", "--connect-timeout", "0s"]),
            (
                "--statement-timeout",
                &["migrate", "--statement-timeout", "2d"],
            ),
        ] {
            let mut full = vec!["outbox-relay"];
            full.extend_from_slice(argv);
            let err = Cli::try_parse_from(full).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{argv:?}");
            assert!(err.to_string().contains(flag), "{err}");
        }
        // Every default is inside its own range (clap parses defaults with the same parser).
        let Command::Run(args) = run_args(&["--database-url", "postgres://db/a"])
            .unwrap()
            .command
        else {
            panic!("not run")
        };
        assert_eq!(args.poll_interval, Duration::from_millis(250));
        for argv in [
            &["cleanup"][..],
            &["failed", "list"],
            &["migrate"],
            &["doctor", "--kafka-brokers", "k:1"],
        ] {
            let mut full = vec!["outbox-relay"];
            full.extend_from_slice(argv);
            assert!(Cli::try_parse_from(full).is_ok(), "{argv:?}");
        }
    }

    #[test]
    fn two_sources_for_one_setting_are_refused() {
        let dir =
            std::env::temp_dir().join(format!("outbox-relay-conflict-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let file = file.to_str().unwrap();
        // The file named does not exist: the conflict is reported, not a missing file.
        for argv in [
            [
                "--database-url",
                "postgres://db/a",
                "--database-url-file",
                "/nonexistent/url",
            ],
            [
                "--database-url",
                "postgres://db/a",
                "--database-password",
                "pw",
            ],
        ] {
            let mut argv = argv.to_vec();
            if argv.contains(&"--database-password") {
                argv.extend(["--database-password-file", "/nonexistent/pw"]);
            }
            let (a, b) = (argv[argv.len() - 4], argv[argv.len() - 2]);
            let Command::Run(args) = run_args(&argv).unwrap().command else {
                panic!("not run")
            };
            let err = args.resolve().unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("{a} and {b} are both set"))
                    && err.contains("set only one"),
                "{err}"
            );
        }
        let kafka = |extra: &[&str]| {
            let mut argv = vec!["--database-url", "postgres://db/a"];
            argv.extend_from_slice(extra);
            let Command::Run(args) = run_args(&argv).unwrap().command else {
                panic!("not run")
            };
            args.kafka.resolve().map(|_| ())
        };
        let err = kafka(&[
            "--kafka-sasl-password",
            "hunter2-sentinel",
            "--kafka-sasl-password-file",
            "/nonexistent",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--kafka-sasl-password-file") && err.contains("set only one"),
            "{err}"
        );
        let err = kafka(&[
            "--kafka-sasl-password-file",
            file,
            "--kafka-config",
            "sasl.password=hunter2-sentinel",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--kafka-sasl-password-file and sasl.password in --kafka-config"),
            "{err}"
        );
        assert!(
            !err.contains("hunter2-sentinel") && !err.contains("from-file"),
            "{err}"
        );
        assert!(kafka(&["--kafka-sasl-password-file", file]).is_ok());
    }

    #[test]
    fn database_flags_are_accepted_after_the_subcommand_word() {
        for argv in [
            &[
                "failed",
                "list",
                "--database-url",
                "postgres://db/a",
                "--table",
                "s.t",
            ][..],
            &[
                "failed",
                "--database-url",
                "postgres://db/a",
                "--table",
                "s.t",
                "list",
            ],
            &[
                "failed",
                "--table",
                "s.t",
                "retry",
                "--database-url",
                "postgres://db/a",
                "--all",
            ],
        ] {
            let mut full = vec!["outbox-relay"];
            full.extend_from_slice(argv);
            let cli = Cli::try_parse_from(full).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let Command::Failed(args) = cli.command else {
                panic!("not failed")
            };
            let db = args.db.resolve().unwrap();
            assert_eq!(
                (db.table.to_string().as_str(), db.display.as_str()),
                ("s.t", "db:5432/a"),
                "{argv:?}"
            );
        }
        let cli =
            Cli::try_parse_from(["outbox-relay", "failed", "list", "--connect-timeout", "3s"])
                .unwrap();
        let Command::Failed(args) = cli.command else {
            panic!("not failed")
        };
        let d = args
            .timeouts
            .deadlines(Duration::from_secs(10), Duration::from_secs(60));
        assert_eq!(
            (d.connect, d.statement),
            (Duration::from_secs(3), Duration::from_secs(60))
        );
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let cli = run_args(&[
            "--database-url",
            "postgres://u:hunter2-sentinel@db/app",
            "--kafka-config",
            "sasl.password=hunter2-sentinel",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let config = args.resolve().unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2-sentinel"), "{shown}");
        assert!(shown.contains("sasl.password=***"), "{shown}");
        assert!(shown.contains("db:5432/app"), "{shown}");
    }

    #[test]
    fn password_file_overrides_url_password() {
        let dir = std::env::temp_dir().join(format!("outbox-relay-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pw");
        std::fs::write(&path, "from-file\n").unwrap();
        let cli = run_args(&[
            "--database-url",
            "postgres://u@db/app",
            "--database-password-file",
            path.to_str().unwrap(),
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert!(args.resolve().is_ok());
        let missing = run_args(&["--database-url-file", "/nonexistent/url"]).unwrap();
        let Command::Run(args) = missing.command else {
            panic!("not run")
        };
        let err = args.resolve().unwrap_err().to_string();
        assert!(
            err.contains("--database-url-file") && err.contains("/nonexistent/url"),
            "{err}"
        );
    }

    #[test]
    fn otlp_flags_are_off_by_default_and_accept_https() {
        let Command::Run(args) = run_args(&["--database-url", "postgres://db/a"])
            .unwrap()
            .command
        else {
            panic!("not run")
        };
        let no_env = |_: &str| None;
        let otlp = &args.otlp;
        let resolved = outbox_relay::spans::OtlpConfig::resolve(None, None, None, &no_env).unwrap();
        assert!(otlp.otlp_endpoint.is_none() && resolved.is_none());
        let err = run_args(&["--otlp-endpoint", "grpc://collector:4317"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let shown = err.to_string();
        assert!(
            shown.contains("--otlp-endpoint") && shown.contains("not supported"),
            "{shown}"
        );
        let err = run_args(&["--otlp-service-name", " "]).unwrap_err();
        assert!(err.to_string().contains("--otlp-service-name"), "{err}");
        let Command::Run(args) = run_args(&[
            "--database-url",
            "postgres://db/a",
            "--otlp-endpoint",
            "https://collector:4318",
            "--otlp-service-name",
            "relay-a",
            "--otlp-timeout",
            "2s",
        ])
        .unwrap()
        .command
        else {
            panic!("not run")
        };
        let otlp = &args.otlp;
        if cfg!(feature = "otlp") {
            let resolved = outbox_relay::spans::OtlpConfig::resolve(
                otlp.otlp_endpoint.clone(),
                otlp.otlp_service_name.clone(),
                otlp.otlp_timeout,
                &no_env,
            )
            .unwrap()
            .unwrap();
            assert_eq!(
                resolved.endpoint.to_string(),
                "https://collector:4318/v1/traces"
            );
            assert_eq!(
                (resolved.service_name.as_deref(), resolved.timeout),
                (Some("relay-a"), Duration::from_secs(2))
            );
        } else {
            let err = args.resolve().unwrap_err().to_string();
            assert!(err.contains("--otlp-endpoint"), "{err}");
        }
    }

    #[test]
    fn allow_list_matches_names_and_prefixes() {
        let list = TopicAllowList::new(&["orders.*".into(), "audit".into()]).unwrap();
        assert!(list.allows("orders.created") && list.allows("audit"));
        assert!(!list.allows("audit2") && !list.allows("payments"));
        assert!(TopicAllowList::new(&[]).unwrap().allows("anything"));
        assert!(TopicAllowList::new(&["bad topic".into()]).is_err());
        assert!(TopicAllowList::new(&["a*b".into()]).is_err());
    }

    #[test]
    fn transport_findings_flag_plaintext_and_unverified() {
        let resolve = |url: &str, kafka: &[&str]| {
            let mut argv = vec![
                "outbox-relay",
                "run",
                "--kafka-brokers",
                "k:9092",
                "--database-url",
                url,
            ];
            for k in kafka {
                argv.extend_from_slice(&["--kafka-config", k]);
            }
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!()
            };
            let c = args.resolve().unwrap();
            outbox_relay::settings::transport_findings(&c.db, &c.kafka)
        };
        let f = resolve("postgres://db/app", &[]);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(
            f[0].contains("sslmode=prefer") && f[1].contains("plaintext"),
            "{f:?}"
        );
        let f = resolve(
            "postgres://db/app?sslmode=verify-full",
            &["security.protocol=SASL_SSL"],
        );
        assert!(f.is_empty(), "{f:?}");
        let f = resolve(
            "postgres://db/app?sslmode=verify-full",
            &[
                "security.protocol=SSL",
                "enable.ssl.certificate.verification=false",
            ],
        );
        assert_eq!(f.len(), 1, "{f:?}");
    }

    #[test]
    fn kafka_properties_keep_order_and_refuse_what_voids_a_guarantee() {
        let kafka = |entries: &str| {
            let cli = run_args(&[
                "--database-url",
                "postgres://db/app",
                "--kafka-config",
                entries,
            ])
            .unwrap();
            let Command::Run(args) = cli.command else {
                panic!("not run")
            };
            args.kafka.resolve()
        };
        let k = kafka("linger.ms=2;acks=all").unwrap();
        let keys: Vec<&str> = k.properties().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["compression.type", "linger.ms", "acks"]);
        for refused in ["bootstrap.servers=x", "acks=1", "enable.idempotence=false"] {
            let err = kafka(refused).unwrap_err().to_string();
            let key = refused.split('=').next().unwrap();
            assert!(err.contains(&format!("--kafka-config: {key}")), "{err}");
        }
    }

    #[test]
    fn a_refused_property_in_the_file_names_the_file_and_line() {
        let path = std::env::temp_dir().join(format!(
            "outbox-relay-kafka-{}.properties",
            std::process::id()
        ));
        std::fs::write(&path, "# producer\nlinger.ms=5\nacks=1\n").unwrap();
        let file = path.to_str().unwrap();
        let cli = run_args(&[
            "--database-url",
            "postgres://db/app",
            "--kafka-config-file",
            file,
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let err = args.kafka.resolve().unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            err.contains(&format!("--kafka-config-file {file} line 3: acks")),
            "{err}"
        );
    }
}
