//! Leadership: one replica publishes at a time, holding a time-bounded lease in the table's
//! `<table>_lease` row. The lease row is also where the leader asks writers to NOTIFY and
//! where the read mode it publishes in is recorded. [`Leadership`] is what the relay loop
//! needs of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgPool;
use sqlx::AssertSqlSafe;
use tokio::sync::watch;

use crate::table::TableName;

/// What the loop needs of leadership (the database lease, or a fake in the loop's tests).
pub trait Leadership: Send {
    /// True while this replica leads; renews or tries to take the lease as needed.
    fn ensure(&mut self) -> impl std::future::Future<Output = Result<bool, sqlx::Error>> + Send;
    /// The epoch of the current leadership (valid while `ensure` returns true).
    fn epoch(&self) -> i64;
    /// This replica's id, as written in the lease row.
    fn holder(&self) -> &str;
    /// How often a leader should call `ensure` to keep the lease while it is busy.
    fn renew_every(&self) -> Duration;
    /// Ask writers' insert trigger to NOTIFY (the leader is idle) or not (it is busy polling).
    fn want_wakeups(
        &self,
        wanted: bool,
    ) -> impl std::future::Future<Output = Result<(), sqlx::Error>> + Send;
    /// Give the lease up at once (graceful shutdown), so a standby takes over without waiting.
    fn release(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

/// The lease row as `status` shows it.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct LeaseState {
    pub holder: String,
    pub epoch: i64,
    pub expires_at: DateTime<Utc>,
    pub valid: bool,
}

impl LeaseState {
    /// The lease row, if any replica ever led.
    pub async fn read(pool: &PgPool, table: &TableName) -> Result<Option<LeaseState>, sqlx::Error> {
        sqlx::query_as(AssertSqlSafe(format!(
            // Epoch 0: the row `migrate --read-mode log` made to hold the slot's snapshot.
            "SELECT holder, epoch, expires_at, expires_at > clock_timestamp() AS valid FROM {} WHERE epoch > 0",
            table.lease_table()
        )))
        .fetch_optional(pool)
        .await
    }
}

/// Single-leader election with a time-bounded lease in `<table>_lease`: only the holder
/// publishes, so per-key order holds when several replicas run. The leader renews the lease
/// (one small UPDATE) once a third of it has passed; a replica that stops renewing (killed,
/// paused, partitioned) loses it after `duration`, and a standby takes over. All lease times
/// are the database's clock; the holder's own view of validity uses its monotonic clock, which
/// keeps running while the process is paused, so a resumed zombie knows it must re-check.
pub struct Lease {
    pool: PgPool,
    acquire_sql: Arc<str>,
    release_sql: Arc<str>,
    wake_sql: Arc<str>,
    holder: String,
    duration: Duration,
    /// When the last successful acquire/renew started (the lease is valid for `duration` after).
    renewed_at: Option<std::time::Instant>,
    epoch: i64,
    /// Told the outcome of every lease statement (the replicas table's heartbeat).
    heartbeat: Option<Heartbeat>,
}

impl Lease {
    /// `holder`: this process's replica id ([`crate::replica::Identity`]).
    pub fn new(pool: PgPool, table: &TableName, duration: Duration, holder: String) -> Self {
        let lease = table.lease_table();
        Lease {
            acquire_sql: format!(
                "INSERT INTO {lease} AS l (id, holder, epoch, expires_at) \
                 VALUES (1, $1, 1, clock_timestamp() + make_interval(secs => $2)) \
                 ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, \
                 epoch = l.epoch + (l.holder <> EXCLUDED.holder)::int, expires_at = EXCLUDED.expires_at \
                 WHERE l.holder = EXCLUDED.holder OR l.expires_at < clock_timestamp() \
                 RETURNING epoch"
            )
            .into(),
            release_sql: format!(
                "UPDATE {lease} SET expires_at = clock_timestamp() - interval '1 second' WHERE holder = $1"
            )
            .into(),
            wake_sql: format!(
                "UPDATE {lease} SET wake_wanted = $2 WHERE holder = $1 AND wake_wanted <> $2"
            )
            .into(),
            holder,
            pool,
            duration,
            renewed_at: None,
            epoch: 0,
            heartbeat: None,
        }
    }

    /// Beat `heartbeat` on this lease's cadence (renewals while leading, attempts while standing by).
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    fn lost(&mut self) {
        if self.renewed_at.take().is_some() {
            tracing::warn!(
                epoch = self.epoch,
                "leadership lost: another replica holds the lease; standing by"
            );
        }
    }
}

impl Leadership for Lease {
    fn holder(&self) -> &str {
        &self.holder
    }

    fn epoch(&self) -> i64 {
        self.epoch
    }

    fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    async fn ensure(&mut self) -> Result<bool, sqlx::Error> {
        let now = std::time::Instant::now();
        if let Some(at) = self.renewed_at {
            if now < at + self.duration / 3 {
                return Ok(true);
            }
            if now >= at + self.duration {
                tracing::warn!(
                    epoch = self.epoch,
                    "lease expired before it was renewed (paused or slow?); re-checking"
                );
            }
        }
        let epoch: Option<i64> = match sqlx::query_scalar(AssertSqlSafe(self.acquire_sql.clone()))
            .bind(&self.holder)
            .bind(self.duration.as_secs_f64())
            .fetch_optional(&self.pool)
            .await
        {
            Ok(epoch) => epoch,
            Err(e) => {
                if self.renewed_at.is_some_and(|at| now >= at + self.duration) {
                    self.lost();
                }
                return Err(e);
            }
        };
        if let Some(heartbeat) = &mut self.heartbeat {
            heartbeat.report(epoch, now);
        }
        match epoch {
            Some(epoch) => {
                if self.renewed_at.is_none() || epoch != self.epoch {
                    tracing::info!(epoch, holder = %self.holder, "leader: this replica now publishes");
                }
                self.epoch = epoch;
                self.renewed_at = Some(now);
                Ok(true)
            }
            None => {
                self.lost();
                Ok(false)
            }
        }
    }

    async fn want_wakeups(&self, wanted: bool) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.wake_sql.clone()))
            .bind(&self.holder)
            .bind(wanted)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    async fn release(&mut self) {
        if self.renewed_at.take().is_none() {
            return;
        }
        match sqlx::query(AssertSqlSafe(self.release_sql.clone()))
            .bind(&self.holder)
            .execute(&self.pool)
            .await
        {
            Ok(_) => tracing::info!("lease released"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the lease; a standby takes over when it expires")
            }
        }
    }
}

/// The lease's side of the heartbeat: after each acquire/renew attempt that reached the
/// database it reports its role (`Some(epoch)` while leading); a beat goes to the heartbeat
/// task when the role changed or a renewal interval has passed since the last one.
pub struct Heartbeat {
    tx: watch::Sender<Option<i64>>,
    every: Duration,
    last: Option<(Instant, Option<i64>)>,
}

impl Heartbeat {
    pub fn new(every: Duration) -> (Heartbeat, watch::Receiver<Option<i64>>) {
        let (tx, rx) = watch::channel(None);
        (
            Heartbeat {
                tx,
                every,
                last: None,
            },
            rx,
        )
    }

    /// `now` is when the lease statement started (the lease's own clock), so a leader that
    /// renews every `every` also beats every `every`.
    pub fn report(&mut self, epoch: Option<i64>, now: Instant) {
        if beat_due(self.last, epoch, now, self.every) {
            self.last = Some((now, epoch));
            self.tx.send_replace(epoch); // never blocks; the task coalesces
        }
    }
}

fn beat_due(
    last: Option<(Instant, Option<i64>)>,
    epoch: Option<i64>,
    now: Instant,
    every: Duration,
) -> bool {
    match last {
        None => true,
        Some((at, was)) => was != epoch || now >= at + every,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_follow_the_renewal_cadence_and_role_changes() {
        let every = Duration::from_secs(3);
        let t0 = Instant::now();
        assert!(beat_due(None, None, t0, every), "the first report beats");
        let last = Some((t0, None));
        assert!(
            !beat_due(last, None, t0 + Duration::from_millis(250), every),
            "a standby polls often but beats once per interval"
        );
        assert!(beat_due(last, None, t0 + every, every));
        assert!(
            beat_due(last, Some(1), t0 + Duration::from_millis(1), every),
            "becoming leader beats at once"
        );
        assert!(
            beat_due(Some((t0, Some(1))), Some(2), t0, every),
            "a new epoch beats at once"
        );
    }

    #[test]
    fn heartbeat_sends_only_due_beats() {
        let (mut hb, mut rx) = Heartbeat::new(Duration::from_secs(3));
        let t0 = Instant::now();
        hb.report(None, t0);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        hb.report(None, t0 + Duration::from_secs(1));
        assert!(!rx.has_changed().unwrap());
        hb.report(Some(3), t0 + Duration::from_secs(2));
        assert_eq!(
            (rx.has_changed().unwrap(), *rx.borrow_and_update()),
            (true, Some(3))
        );
    }
}
