//! The one database-error policy: each error is a passing fault (retry with backoff) or one
//! an operator must fix (schema, privileges, credentials, TLS), with the hint that says how.
//! `main` (connect), the relay loop, the background tasks and `doctor` all ask here.

use crate::table::TableName;

/// What to do about a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A passing fault (server down or restarting, connection dropped, a conflict): retry.
    Retry,
    /// Retrying alone will not help: the hint names the fix. The relay keeps retrying (the
    /// fix may come while it runs); one-shot commands stop.
    Fix,
}

/// An error's [`Action`], a short kind (for readiness and logs) and the operator hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    pub action: Action,
    /// unreachable | schema | permission | authentication | tls | database
    pub kind: &'static str,
    pub hint: String,
}

/// Sort a database error. The one place this decision is made.
pub fn diagnose(e: &sqlx::Error, table: &TableName) -> Diagnosis {
    use Action::{Fix, Retry};
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .unwrap_or_default();
    let (action, kind, hint) = match (code.as_ref(), e) {
        ("42P01", _) => (Fix, "schema", format!(
            "table {table} or its {t}_lease or {t}_replicas table does not exist: run `outbox-relay migrate` (or apply migrations/)",
            t = table.table()
        )),
        ("42703", _) => (Fix, "schema", format!("table {table} lacks a relay column: run `outbox-relay migrate` to upgrade it")),
        ("42501", _) => (Fix, "permission", format!(
            "the role lacks privileges: GRANT SELECT, UPDATE, DELETE ON {table}; GRANT SELECT, INSERT, UPDATE ON {}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON {}",
            table.lease_table(),
            table.replicas_table()
        )),
        ("28P01", _) | ("28000", _) => (Fix, "authentication", "authentication failed: check the user and password".into()),
        ("3D000", _) => (Fix, "database", "the database in --database-url does not exist".into()),
        (_, sqlx::Error::Tls(_)) => (Fix, "tls", "TLS handshake failed: check sslmode and sslrootcert in --database-url".into()),
        _ if is_tls_failure(e) => (Fix, "tls", "the server's TLS certificate was rejected: check sslrootcert (the CA) and that \
            the host in --database-url matches the certificate".into()),
        (_, sqlx::Error::Io(_)) | (_, sqlx::Error::PoolTimedOut) => (Retry, "unreachable",
            "cannot reach PostgreSQL: check the host and port in --database-url and that the server is up".into()),
        // Connection exceptions, shutdown or start-up, too many connections, conflicts.
        (c, _) if c.starts_with("08") || c.starts_with("57P") || c.starts_with("53")
            || matches!(c, "40001" | "40P01" | "55P03") => (Retry, "unreachable",
            "PostgreSQL is restarting, overloaded or dropped the connection; retrying".into()),
        (_, sqlx::Error::Database(_)) => (Fix, "database", "the statement failed; the error names the cause".into()),
        _ => (Retry, "database", "retrying".into()),
    };
    Diagnosis { action, kind, hint }
}

/// The operator hint alone (for a log line).
pub fn hint(e: &sqlx::Error, table: &TableName) -> String {
    diagnose(e, table).hint
}

/// The table or lease row lacks a column (an older schema: `migrate` adds it).
pub fn is_undefined_column(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42703")
}

/// sqlx reports rustls certificate failures as I/O errors of kind `InvalidData`.
pub fn is_tls_failure(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::InvalidData || io.to_string().contains("certificate")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_is_retried_and_tls_is_not() {
        let t = TableName::parse("outbox").unwrap();
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let d = diagnose(&io, &t);
        assert_eq!((d.action, d.kind), (Action::Retry, "unreachable"));
        assert!(d.hint.contains("cannot reach PostgreSQL"), "{}", d.hint);
        let cert = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid peer certificate",
        ));
        assert_eq!(diagnose(&cert, &t).action, Action::Fix);
        assert_eq!(
            diagnose(&sqlx::Error::PoolTimedOut, &t).action,
            Action::Retry
        );
    }
}
