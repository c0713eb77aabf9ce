//! The table's replicas: who this process is (the id its lease uses), its heartbeat row in
//! `<table>_replicas`, and how `status` turns those rows into "who runs, who owns what".
//!
//! Informational only: no publishing decision reads the replicas table, and the heartbeat
//! runs in its own task. The lease hands it a beat on its renewal cadence (no timer of its
//! own); the task upserts one row. A failing heartbeat is logged (rate-limited) and never
//! stops or slows the relay loop.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgPool;
use sqlx::AssertSqlSafe;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::lease::LeaseState;
use crate::table::TableName;

/// A replica unseen for this many lease durations is shown as stale (it beats every third
/// of a lease, so this is nine missed beats).
pub const STALE_AFTER_LEASES: f64 = 3.0;

/// Rows of replicas unseen (or gone) for this long are deleted by the other replicas'
/// heartbeats, so the table stays a handful of rows.
const EXPIRE_AFTER: &str = "1 hour";

/// Marking this replica gone on shutdown must not hold the drain up for long.
const GONE_TIMEOUT: Duration = Duration::from_secs(2);

/// Heartbeat failures are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// This process as a replica: the id the lease records as holder, and where it runs.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `host:pid:nonce`, unique per process start.
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub version: &'static str,
}

impl Identity {
    /// Host (pod) name from `HOSTNAME`, else /etc/hostname.
    pub fn of_this_process() -> Identity {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".into());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let pid = std::process::id();
        Identity {
            id: format!("{host}:{pid}:{nanos:08x}"),
            host,
            pid,
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// The replicas table's statements for this process.
pub struct Registry {
    pool: PgPool,
    identity: Identity,
    lease_seconds: f64,
    table: TableName,
    beat_sql: String,
    gone_sql: String,
}

impl Registry {
    pub fn new(pool: PgPool, table: &TableName, identity: Identity, lease: Duration) -> Self {
        let r = table.replicas_table();
        Registry {
            beat_sql: format!(
                "WITH expired AS (DELETE FROM {r} WHERE last_seen < clock_timestamp() - interval '{EXPIRE_AFTER}' AND holder <> $1) \
                 INSERT INTO {r} AS r (holder, host, pid, version, lease_seconds, started_at, last_seen, epoch, leader_since) \
                 VALUES ($1, $2, $3, $4, $5, clock_timestamp(), clock_timestamp(), $6, \
                 CASE WHEN $6::bigint IS NULL THEN NULL ELSE clock_timestamp() END) \
                 ON CONFLICT (holder) DO UPDATE SET last_seen = EXCLUDED.last_seen, lease_seconds = EXCLUDED.lease_seconds, \
                 epoch = EXCLUDED.epoch, stopped_at = NULL, leader_since = CASE WHEN r.epoch IS NOT DISTINCT FROM EXCLUDED.epoch \
                 THEN r.leader_since ELSE EXCLUDED.leader_since END"
            ),
            gone_sql: format!(
                "UPDATE {r} SET stopped_at = clock_timestamp(), last_seen = clock_timestamp(), epoch = NULL, leader_since = NULL \
                 WHERE holder = $1"
            ),
            pool,
            identity,
            lease_seconds: lease.as_secs_f64(),
            table: table.clone(),
        }
    }

    async fn beat(&self, epoch: Option<i64>) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.beat_sql.clone()))
            .bind(&self.identity.id)
            .bind(&self.identity.host)
            .bind(i64::from(self.identity.pid))
            .bind(self.identity.version)
            .bind(self.lease_seconds)
            .bind(epoch)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    async fn gone(&self) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.gone_sql.clone()))
            .bind(&self.identity.id)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }
}

/// The heartbeat task: one upsert per beat the lease sends; on shutdown (cancel, or the
/// lease dropped after releasing) the row is marked gone.
pub async fn heartbeat(
    registry: Registry,
    mut beats: watch::Receiver<Option<i64>>,
    cancel: CancellationToken,
) {
    let mut warn = RateLimit::new(WARN_EVERY);
    let (mut failing, mut registered) = (false, false);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = beats.changed() => if changed.is_err() { break },
        }
        let epoch = *beats.borrow_and_update();
        let beat = registry.beat(epoch).await;
        registered |= beat.is_ok();
        match beat {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("replica heartbeat recovered");
            }
            Ok(()) => {}
            Err(e) => {
                failing = true;
                if let Some(suppressed) = warn.allow(Instant::now()) {
                    tracing::warn!(error = %e, hint = crate::store::errors::hint(&e, &registry.table), suppressed,
                        "replica heartbeat failed (`status` may show this replica as stale); relaying continues");
                }
            }
        }
    }
    if !registered {
        return; // no row to mark (and no reason to wait on an unreachable database)
    }
    match tokio::time::timeout(GONE_TIMEOUT, registry.gone()).await {
        Ok(Ok(())) => tracing::debug!("replica marked gone"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not mark this replica gone; `status` shows it stale later")
        }
        Err(_) => {
            tracing::warn!("marking this replica gone timed out; `status` shows it stale later")
        }
    }
}

/// At most one event per `every`; counts the ones it suppressed in between.
struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    fn new(every: Duration) -> Self {
        RateLimit {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last allowed)` if this one may be logged.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|at| now < at + self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// A row of the replicas table as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReplicaRow {
    pub holder: String,
    pub host: String,
    pub pid: i64,
    pub version: String,
    pub lease_seconds: f64,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub epoch: Option<i64>,
    pub leader_since: Option<DateTime<Utc>>,
    pub stopped_at: Option<DateTime<Utc>>,
}

/// Rows of the replicas table, or `None` if the table does not exist (not migrated yet).
pub async fn rows(
    pool: &PgPool,
    table: &TableName,
) -> Result<Option<Vec<ReplicaRow>>, sqlx::Error> {
    let r = table.replicas_table();
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(&r)
        .fetch_one(pool)
        .await?;
    if exists.is_none() {
        return Ok(None);
    }
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT holder, host, pid, version, lease_seconds, started_at, last_seen, epoch, leader_since, stopped_at FROM {r}"
    )))
    .fetch_all(pool)
    .await
    .map(Some)
}

/// What a replica is doing, as `status` sees it (sorted in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Holds the valid lease: publishes every topic of the table.
    Leader,
    /// Heartbeating, not holding the lease.
    Standby,
    /// No heartbeat for `STALE_AFTER_LEASES` lease durations (killed, hung or cut off).
    Stale,
    /// Stopped gracefully.
    Gone,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Standby => "standby",
            Role::Stale => "stale",
            Role::Gone => "gone",
        }
    }
}

/// One replica in `status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replica {
    /// The same id the lease records as its holder (`host:pid:nonce`).
    pub id: String,
    pub host: String,
    pub pid: i64,
    pub version: String,
    pub role: Role,
    pub owns: String,
    /// Leader only: the lease epoch, since when this replica leads, and when its lease ends.
    pub epoch: Option<i64>,
    pub leader_since: Option<DateTime<Utc>>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub lease_seconds_left: Option<f64>,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub last_seen_age_seconds: f64,
}

/// Rows -> replicas as `status` shows them. The lease row decides who leads (a heartbeat can
/// lag a takeover by one beat); the heartbeat's age decides who is stale. `now` is the
/// database's clock, like every stored time.
pub fn view(
    rows: Vec<ReplicaRow>,
    lease: Option<&LeaseState>,
    now: DateTime<Utc>,
    table: &TableName,
) -> Vec<Replica> {
    let mut replicas: Vec<Replica> = rows
        .into_iter()
        .map(|row| {
            let age = seconds(now - row.last_seen);
            let held = lease.filter(|l| l.valid && l.holder == row.holder);
            let role = match held {
                _ if row.stopped_at.is_some() => Role::Gone,
                Some(_) => Role::Leader,
                None if age > STALE_AFTER_LEASES * row.lease_seconds => Role::Stale,
                None => Role::Standby,
            };
            let held = held.filter(|_| role == Role::Leader);
            let owns = match role {
                Role::Leader => format!("all topics of {table}"),
                other => format!("nothing ({})", other.as_str()),
            };
            Replica {
                owns,
                role,
                epoch: held.map(|l| l.epoch),
                // Only if the heartbeat already saw this epoch (else it is about to).
                leader_since: held
                    .and_then(|l| row.leader_since.filter(|_| row.epoch == Some(l.epoch))),
                lease_expires_at: held.map(|l| l.expires_at),
                lease_seconds_left: held.map(|l| seconds(l.expires_at - now)),
                id: row.holder,
                host: row.host,
                pid: row.pid,
                version: row.version,
                started_at: row.started_at,
                last_seen: row.last_seen,
                last_seen_age_seconds: age,
            }
        })
        .collect();
    replicas.sort_by(|a, b| (a.role, a.started_at, &a.id).cmp(&(b.role, b.started_at, &b.id)));
    replicas
}

fn seconds(d: chrono::TimeDelta) -> f64 {
    (d.num_milliseconds() as f64 / 1e3).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn row(holder: &str, seen_ago: f64, epoch: Option<i64>) -> ReplicaRow {
        let now = at(0.0);
        ReplicaRow {
            holder: holder.into(),
            host: holder.split(':').next().unwrap().into(),
            pid: 7,
            version: "0.1.0".into(),
            lease_seconds: 10.0,
            started_at: now - TimeDelta::hours(1),
            last_seen: now - TimeDelta::milliseconds((seen_ago * 1e3) as i64),
            epoch,
            leader_since: epoch.map(|_| now - TimeDelta::minutes(5)),
            stopped_at: None,
        }
    }

    fn at(secs: f64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
            + TimeDelta::milliseconds((secs * 1e3) as i64)
    }

    fn lease(holder: &str, epoch: i64, valid: bool) -> LeaseState {
        LeaseState {
            holder: holder.into(),
            epoch,
            expires_at: at(if valid { 8.0 } else { -2.0 }),
            valid,
        }
    }

    fn table() -> TableName {
        TableName::parse("outbox").unwrap()
    }

    #[test]
    fn the_lease_holder_leads_and_the_others_stand_by() {
        let l = lease("a:1:x", 4, true);
        let v = view(
            vec![row("b:2:y", 1.0, None), row("a:1:x", 2.0, Some(4))],
            Some(&l),
            at(0.0),
            &table(),
        );
        assert_eq!(v[0].id, "a:1:x", "leader listed first");
        assert_eq!(v[0].role, Role::Leader);
        assert_eq!(v[0].owns, "all topics of public.outbox");
        assert_eq!(v[0].epoch, Some(4));
        assert_eq!(v[0].lease_expires_at, Some(at(8.0)));
        assert_eq!(v[0].lease_seconds_left, Some(8.0));
        assert_eq!(v[0].leader_since, Some(at(0.0) - TimeDelta::minutes(5)));
        assert_eq!(v[0].last_seen_age_seconds, 2.0);
        assert_eq!(v[1].role, Role::Standby);
        assert_eq!(v[1].owns, "nothing (standby)");
        assert_eq!((v[1].epoch, v[1].lease_expires_at), (None, None));
    }

    #[test]
    fn the_lease_decides_when_a_heartbeat_lags_a_takeover() {
        // a lost the lease to b; neither heartbeat has caught up yet.
        let l = lease("b:2:y", 5, true);
        let v = view(
            vec![row("a:1:x", 1.0, Some(4)), row("b:2:y", 1.0, None)],
            Some(&l),
            at(0.0),
            &table(),
        );
        assert_eq!((v[0].id.as_str(), v[0].role), ("b:2:y", Role::Leader));
        assert_eq!(
            v[0].leader_since, None,
            "its heartbeat has not seen epoch 5 yet"
        );
        assert_eq!((v[1].id.as_str(), v[1].role), ("a:1:x", Role::Standby));
    }

    #[test]
    fn an_expired_lease_means_nobody_leads() {
        let l = lease("a:1:x", 4, false);
        let v = view(
            vec![row("a:1:x", 1.0, Some(4))],
            Some(&l),
            at(0.0),
            &table(),
        );
        assert_eq!(v[0].role, Role::Standby);
        let v = view(vec![row("a:1:x", 1.0, None)], None, at(0.0), &table());
        assert_eq!(v[0].role, Role::Standby);
    }

    #[test]
    fn silence_beyond_three_leases_is_stale_and_a_stop_is_gone() {
        let v = view(
            vec![row("a:1:x", 29.0, None), row("b:2:y", 31.0, None)],
            None,
            at(0.0),
            &table(),
        );
        assert_eq!(v[0].role, Role::Standby);
        assert_eq!(
            (v[1].role, v[1].owns.as_str()),
            (Role::Stale, "nothing (stale)")
        );
        let mut stopped = row("a:1:x", 0.5, Some(4));
        stopped.stopped_at = Some(at(-0.5));
        let l = lease("a:1:x", 4, true);
        let v = view(vec![stopped], Some(&l), at(0.0), &table());
        assert_eq!(
            (v[0].role, v[0].epoch),
            (Role::Gone, None),
            "a stopped replica owns nothing"
        );
    }

    #[test]
    fn a_replica_renewing_its_lease_leads_even_if_its_heartbeat_fails() {
        let l = lease("a:1:x", 4, true);
        let v = view(
            vec![row("a:1:x", 600.0, Some(4))],
            Some(&l),
            at(0.0),
            &table(),
        );
        assert_eq!(
            v[0].role,
            Role::Leader,
            "the lease is the authority on ownership"
        );
        assert_eq!(v[0].last_seen_age_seconds, 600.0);
    }

    #[test]
    fn failures_are_logged_at_most_once_per_interval() {
        let mut limit = RateLimit::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(limit.allow(t0), Some(0));
        assert_eq!(limit.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.allow(t0 + Duration::from_secs(59)), None);
        assert_eq!(limit.allow(t0 + Duration::from_secs(60)), Some(2));
        assert_eq!(limit.allow(t0 + Duration::from_secs(61)), None);
    }
}
