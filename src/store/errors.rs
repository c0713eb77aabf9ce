//! The one database-error policy: each error is a passing fault (retry with backoff) or one
//! an operator must fix (schema, privileges, credentials, TLS), with the hint that says how.
//! `main` (connect), the relay loop, the background tasks and `doctor` all ask here.
//!
//! One-shot commands bound their waits ([`Deadlines`], [`within`]): a timeout is an error of
//! its own ([`TimedOut`]) that says which bound was hit. [`describe`] is an error as an
//! operator reads it: the server's message and SQLSTATE, without sqlx's wrapping.

use std::fmt;
use std::future::Future;
use std::time::Duration;

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
    /// unreachable | timeout | schema | permission | authentication | tls | database
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
    if let Some(t) = timed_out(e) {
        return Diagnosis {
            action: Retry,
            kind: "timeout",
            hint: t.hint(),
        };
    }
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
        ("53300", _) => (Retry, "unreachable", "PostgreSQL refused a new connection: max_connections, or the \
            role's or the database's CONNECTION LIMIT, is reached; close idle sessions or raise the limit".into()),
        ("57014", _) => (Retry, "timeout", "PostgreSQL cancelled the statement: it ran longer than its statement_timeout \
            (--statement-timeout for one-shot commands), usually waiting for a lock another transaction holds \
            (see pg_locks and pg_stat_activity), or an operator cancelled it".into()),
        (_, sqlx::Error::Tls(_)) => (Fix, "tls", "TLS handshake failed: check sslmode and sslrootcert in --database-url".into()),
        _ if is_tls_failure(e) => (Fix, "tls", "the server's TLS certificate was rejected: check sslrootcert (the CA) and that \
            the host in --database-url matches the certificate".into()),
        (_, sqlx::Error::Io(_)) | (_, sqlx::Error::PoolTimedOut) => (Retry, "unreachable",
            "cannot reach PostgreSQL: check the host and port in --database-url and that the server is up".into()),
        // Connection exceptions, shutdown or start-up, too many connections, conflicts.
        (c, _) if c.starts_with("08") || c.starts_with("57P") || c.starts_with("53")
            || matches!(c, "40001" | "40P01" | "55P03") => (Retry, "unreachable",
            "PostgreSQL is restarting, overloaded or dropped the connection".into()),
        (_, sqlx::Error::Database(_)) => (Fix, "database", "the statement failed; the error names the cause".into()),
        _ => (Retry, "database", "an unexpected database client error; the error names it".into()),
    };
    Diagnosis { action, kind, hint }
}

/// The operator hint alone (for a log line).
pub fn hint(e: &sqlx::Error, table: &TableName) -> String {
    diagnose(e, table).hint
}

/// An error as an operator reads it: the server's message with its SQLSTATE and the server's
/// own hint (not sqlx's "error returned from database:" nor PostgreSQL's source line), a
/// timeout as [`TimedOut`] says it, any other error as sqlx says it.
pub fn describe(e: &sqlx::Error) -> String {
    if let Some(t) = timed_out(e) {
        return t.to_string();
    }
    match e {
        sqlx::Error::Database(d) => {
            let mut out = d.message().to_string();
            if let Some(code) = d.code() {
                out.push_str(&format!(" (SQLSTATE {code})"));
            }
            if let Some(hint) = d
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .and_then(|pg| pg.hint())
            {
                out.push_str(&format!("; server hint: {hint}"));
            }
            out
        }
        sqlx::Error::Io(io) => format!("I/O error talking to PostgreSQL: {io}"),
        other => other.to_string(),
    }
}

/// How long a one-shot command waits for PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// To connect (TCP, TLS, authentication), retries included.
    pub connect: Duration,
    /// For one statement (PostgreSQL's statement_timeout) and for the server to answer it.
    pub statement: Duration,
}

impl Deadlines {
    /// `connect` with PostgreSQL's statement_timeout set to the statement bound, so the server
    /// cancels a statement that runs too long (a lock wait) with a clean error.
    pub fn apply(
        &self,
        connect: &sqlx::postgres::PgConnectOptions,
    ) -> sqlx::postgres::PgConnectOptions {
        connect.clone().options([(
            "statement_timeout",
            format!("{}ms", self.statement.as_millis()),
        )])
    }
}

/// Which bound a command hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    Statement,
}

/// A bound hit: the server did not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut {
    pub phase: Phase,
    pub after: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let after = humantime::format_duration(self.after);
        match self.phase {
            Phase::Connect => write!(
                f,
                "connect timeout: no connection within {after} (--connect-timeout)"
            ),
            Phase::Statement => write!(
                f,
                "statement timeout: PostgreSQL did not answer within {after} (--statement-timeout)"
            ),
        }
    }
}

impl std::error::Error for TimedOut {}

impl TimedOut {
    fn hint(&self) -> String {
        match self.phase {
            Phase::Connect => "the server accepted no connection in time, or accepted TCP and never completed \
                the PostgreSQL handshake: check the host and port in --database-url (is it PostgreSQL, or a \
                proxy or firewall that holds connections?), sslmode, and the server's load"
                .into(),
            Phase::Statement => "the connection was made but PostgreSQL did not answer the statement in time: \
                the server is stalled or overloaded, or the network dropped the connection silently; \
                raise --statement-timeout if the statement is simply long"
                .into(),
        }
    }

    /// As a `sqlx::Error` (an I/O error of kind `TimedOut` that carries this), so a command's
    /// error type stays sqlx's and [`diagnose`] still sees which bound was hit.
    pub fn into_sqlx(self) -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, self))
    }
}

/// The bound `e` hit, if it is a [`TimedOut`].
pub fn timed_out(e: &sqlx::Error) -> Option<TimedOut> {
    match e {
        sqlx::Error::Io(io) => io.get_ref()?.downcast_ref::<TimedOut>().copied(),
        _ => None,
    }
}

/// `f`, or a [`TimedOut`] error for `phase` if it does not finish within `after`.
pub async fn within<T>(
    phase: Phase,
    after: Duration,
    f: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    match tokio::time::timeout(after, f).await {
        Ok(result) => result,
        Err(_) => Err(TimedOut { phase, after }.into_sqlx()),
    }
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

    #[tokio::test]
    async fn timeouts_say_which_bound_was_hit() {
        let t = TableName::parse("outbox").unwrap();
        let hang = std::future::pending::<Result<(), sqlx::Error>>();
        let e = within(Phase::Connect, Duration::from_millis(10), hang)
            .await
            .unwrap_err();
        let d = diagnose(&e, &t);
        assert_eq!((d.action, d.kind), (Action::Retry, "timeout"));
        assert!(describe(&e).starts_with("connect timeout: no connection within 10ms"));
        assert!(d.hint.contains("handshake"), "{}", d.hint);
        let e = TimedOut {
            phase: Phase::Statement,
            after: Duration::from_secs(2),
        }
        .into_sqlx();
        assert!(describe(&e).contains("did not answer within 2s (--statement-timeout)"));
        assert!(!diagnose(&e, &t).hint.contains("retrying"));
    }

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
