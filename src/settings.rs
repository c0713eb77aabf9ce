//! The validated settings the library runs with, produced once from the command line (the
//! binary's `cli` module) or built directly by an embedding program. Secrets inside are
//! wrapped so `Debug` never shows them.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::kafka::KafkaConfig;
use crate::read::log::{LogNames, LogSource};
use crate::store::OnPublish;
use crate::table::{ReadMode, TableName};

/// Database connection settings.
#[derive(Clone)]
pub struct DatabaseConfig {
    pub connect: sqlx::postgres::PgConnectOptions,
    /// What a replication connection (log mode) needs that `connect` does not expose.
    pub password: Option<crate::secret::Secret>,
    pub ssl_root_cert: Option<std::path::PathBuf>,
    pub table: TableName,
    /// Host, port and database, for logs (never the password).
    pub display: String,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("server", &self.display)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl DatabaseConfig {
    /// The replication connection of this database, to `names` (log mode).
    pub fn log_source(&self, names: &LogNames) -> LogSource {
        use sqlx::postgres::PgSslMode;
        let c = &self.connect;
        LogSource {
            host: c.get_host().to_string(),
            port: c.get_port(),
            user: c.get_username().to_string(),
            password: self.password.clone(),
            database: c.get_database().unwrap_or(c.get_username()).to_string(),
            ssl_mode: match c.get_ssl_mode() {
                PgSslMode::Disable => "disable",
                PgSslMode::Allow | PgSslMode::Prefer => "prefer",
                PgSslMode::Require => "require",
                PgSslMode::VerifyCa => "verify-ca",
                PgSslMode::VerifyFull => "verify-full",
            }
            .to_string(),
            ssl_root_cert: self.ssl_root_cert.clone(),
            slot: names.slot.clone(),
            publication: names.publication.clone(),
        }
    }
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub db: DatabaseConfig,
    pub kafka: KafkaConfig,
    /// `--delivery exactly-once`: Kafka transactions and the positions topic.
    pub transactional: Option<crate::kafka::Transactional>,
    /// The loop's own settings.
    pub relay: crate::relay::Settings,
    pub read_mode: ReadMode,
    /// Log mode's slot and publication.
    pub log: LogNames,
    pub on_publish: OnPublish,
    /// Published rows older than this are deleted by the built-in cleanup (zero: never).
    pub retention: Duration,
    pub cleanup_interval: Duration,
    pub lease_duration: Duration,
    pub metrics_addr: SocketAddr,
    /// Span export; `None` (the default) records spans only as debug log events.
    pub otlp: Option<crate::spans::OtlpConfig>,
}

/// Problems with how the relay would connect: plaintext or unverified TLS.
pub fn transport_findings(db: &DatabaseConfig, kafka: &KafkaConfig) -> Vec<String> {
    use sqlx::postgres::PgSslMode;
    let mut findings = Vec::new();
    match db.connect.get_ssl_mode() {
        PgSslMode::VerifyFull => {}
        PgSslMode::VerifyCa => findings.push(
            "PostgreSQL: sslmode=verify-ca checks the CA but not the host name; use sslmode=verify-full".into(),
        ),
        mode => findings.push(format!(
            "PostgreSQL: sslmode={} may send credentials and data in plaintext or to an unverified server; \
             use sslmode=verify-full&sslrootcert=/path/ca.pem",
            format!("{mode:?}").to_lowercase()
        )),
    }
    let protocol = kafka
        .property("security.protocol")
        .unwrap_or_else(|| "plaintext".into());
    if !matches!(protocol.as_str(), "ssl" | "sasl_ssl") {
        findings.push(format!(
            "Kafka: security.protocol={protocol} is not encrypted; use --kafka-config security.protocol=SASL_SSL (or SSL)"
        ));
    } else if kafka
        .property("enable.ssl.certificate.verification")
        .as_deref()
        == Some("false")
    {
        findings.push(
            "Kafka: enable.ssl.certificate.verification=false accepts any broker certificate"
                .into(),
        );
    }
    findings
}
