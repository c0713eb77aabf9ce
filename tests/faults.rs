//! Fault injection: per-key order and zero loss with several replicas, under every fault we
//! can inject, against a real PostgreSQL and a real Kafka that this suite starts as its own
//! instances (see `tests/faults/harness.rs`), so it can kill and restart them freely.
//!
//! The scenarios run in claim mode (the default); those that matter for log mode's slot
//! (`--read-mode log`: relay kill -9 with standbys, SIGTERM, a paused leader, PostgreSQL
//! restart and crash, broker kill and pause, terminated connections and walsender) also run as
//! `log_<scenario>` (`cargo test --test faults log_`, which also runs the two backlog
//! scenarios). Those where a crash costs duplicates at least once (replica kill -9, a paused
//! leader, broker kill, PostgreSQL restart and crash) also run with `--delivery exactly-once`
//! as `exactly_once_<scenario>` and `log_exactly_once_<scenario>` (`cargo test --test faults
//! exactly_once`), where the bound is zero: each batch goes in one Kafka transaction with the relay's position, and the checker
//! reads read_committed. `kill9_mid_backlog_duplicates_only_at_least_once` kills the leader
//! once in each delivery, to show the difference.
//!
//! Every scenario runs writers concurrently with its faults (ordinary application transactions:
//! an audit event, then 1-5 aggregates each locked right before its event), then ends with the same checker (`verify`): every committed event in Kafka byte for byte, no
//! rolled-back event, per-key first occurrences of the aggregates' events in sequence order
//! (audit events have no defined order), duplicates within the scenario's bound (zero for
//! graceful scenarios, the in-flight window x faults for crashes, plus in log mode what the
//! slot's lagging position costs: see [`crash_cost`]), nothing left pending (log mode: the
//! slot confirmed past every commit), parked rows only where expected. Scenarios run one at a
//! time (a process-wide lock).
//!
//! `cargo test --test faults` runs the default suite; `OUTBOX_SOAK=1` runs longer scenarios with
//! more faults and the 1,000,000-row backlog; `OUTBOX_FAULT_SEED=N` replays a seed (printed at
//! the start of each scenario and in every assertion message). Relay logs are in
//! `target/tmp/test-logs/faults-<scenario>-<seed>-r<replica>.<generation>.log` (a scenario with
//! two fleets names each after the seed), and a summary of every run in
//! `target/tmp/test-logs/faults-summary.log`.

mod common;
/// The fault harness: compiled into this suite only (every suite shares `tests/common`).
#[path = "faults/harness.rs"]
mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use common::load::{Expected, Ledger, Load, LoadSpec, Reading, TOKEN_HEADER};
use common::unique;
use common::{delete_topics, metric, wait_topic_ready};
use harness::{
    brokers, create_topics, run_scenario, run_scenario_in, service, soak, vm_hwm_kb, Bursts, Ctx,
    Expect, FaultDb, Fleet, LongTx, Mode, Watermarks, PARTITIONS, PUBLISHED, TOPIC_READY,
};

/// `--batch-size` of the fault scenarios: the unit of the duplicate bound.
const BATCH: usize = 200;
const BATCH_ARG: &str = "200";
/// `--in-flight-batches` of the fault scenarios (the default).
const IN_FLIGHT: usize = 4;
const IN_FLIGHT_ARG: &str = "4";
/// Duplicates one fault may cost: every row in flight, published or being recorded, which
/// `--in-flight-batches` bounds to that many batches' worth of rows.
const DUP_WINDOW: usize = IN_FLIGHT * BATCH;
/// Log mode: how far the slot's position on the server may lag the relay's confirmed one. The
/// relay hands its confirmed position to the client library every 100 ms, which sends it to
/// the server at most once a second; 1.5 s with slack.
const REPORT_LAG: Duration = Duration::from_millis(1500);
/// Generous waits: a 2-core machine running Kafka, PostgreSQL, three relays and the writers.
const READY: Duration = Duration::from_secs(60);
const PROGRESS: Duration = Duration::from_secs(90);
const DRAIN: Duration = Duration::from_secs(180);

/// One scenario body run in claim mode (the default read mode), as `$claim`; a body that takes
/// a [`Delivery`] is given the one after it. Doc comments go on the test.
macro_rules! claim_mode {
    ($(#[$doc:meta])* $claim:ident, $limit:expr, $body:path $(, $delivery:expr)?) => {
        $(#[$doc])*
        #[test]
        fn $claim() {
            run_scenario_in(stringify!($claim), Mode::Claim, $limit, |ctx| {
                $body(ctx $(, $delivery)?)
            });
        }
    };
}

/// One scenario body run in log mode, as `$log` (`migrate` and every replica with
/// `--read-mode log` and the scenario's own `--slot` and `--publication`); a body that takes a
/// [`Delivery`] is given the one after it.
macro_rules! log_mode {
    ($(#[$doc:meta])* $log:ident, $limit:expr, $body:path $(, $delivery:expr)?) => {
        $(#[$doc])*
        #[test]
        fn $log() {
            run_scenario_in(stringify!($log), Mode::Log, $limit, |ctx| {
                $body(ctx $(, $delivery)?)
            });
        }
    };
}

/// How a scenario's replicas deliver (`--delivery`), and so what a crash may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    /// The default: a crash publishes again what was in flight (duplicates, within a bound).
    AtLeastOnce,
    /// `--delivery exactly-once` (one batch in flight): each batch in one Kafka
    /// transaction with the relay's position, a new leader fences older producers and adopts
    /// Kafka's committed position. A read_committed consumer sees no duplicate, whatever fails.
    ExactlyOnce,
}

impl Delivery {
    /// The replicas' flags (`--delivery exactly-once` forces `--in-flight-batches 1`).
    fn flags(self) -> &'static [&'static str] {
        match self {
            Delivery::AtLeastOnce => &[],
            Delivery::ExactlyOnce => &["--delivery", "exactly-once"],
        }
    }

    /// What a fault costing `at_least_once` duplicates at least once may cost here: zero
    /// exactly once.
    fn cost(self, at_least_once: usize) -> usize {
        match self {
            Delivery::AtLeastOnce => at_least_once,
            Delivery::ExactlyOnce => 0,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "at-least-once",
            Delivery::ExactlyOnce => "exactly-once",
        }
    }
}

fn minutes(n: u64) -> Duration {
    Duration::from_secs(60 * n)
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

async fn setup(ctx: &Ctx, topics: usize) -> (FaultDb, Vec<String>) {
    (FaultDb::create(ctx).await, create_topics(ctx, topics).await)
}

/// A passing scenario leaves nothing behind (a failing one keeps its database and topics).
async fn finish(db: FaultDb, topics: &[String]) {
    db.drop_database().await;
    delete_topics(&brokers(), topics).await;
}

/// `n` replicas with the fault suite's batch size (plus `extra` flags), all ready.
async fn fleet(ctx: &Arc<Ctx>, db: &FaultDb, n: usize, extra: &[&str]) -> Fleet {
    let mut fleet = replicas(ctx, db, extra);
    for _ in 0..n {
        fleet.spawn();
    }
    fleet.wait_all_ready(READY).await;
    fleet
}

/// A fleet with the fault suite's batch size (plus `extra` flags), no replica started yet.
fn replicas(ctx: &Arc<Ctx>, db: &FaultDb, extra: &[&str]) -> Fleet {
    let mut args = vec![
        "--batch-size",
        BATCH_ARG,
        "--in-flight-batches",
        IN_FLIGHT_ARG,
        "--shutdown-timeout",
        "20s",
    ];
    args.extend_from_slice(extra);
    Fleet::new(ctx, db, &args)
}

/// The load of a scenario: ordinary application transactions (an audit event first, then 1-5
/// aggregates, each locked right before its event: `Shape::LateLocks`), whose per-key commit
/// order every read mode must keep.
fn spec(topics: &[String]) -> LoadSpec {
    LoadSpec::new(topics).late_locks()
}

/// Writers started, and publishing seen to work before any fault.
async fn load(ctx: &Arc<Ctx>, db: &FaultDb, spec: LoadSpec) -> Load {
    let load = Load::start(ctx.clone(), db.writer_pool(spec.writers), spec);
    load.wait_committed(100, PROGRESS).await;
    db.wait_progress(ctx, 50, PROGRESS).await;
    load
}

/// Maybe (with probability `p`) commit a burst of 4000 events (20 batches) and let the leader
/// start on it, so the fault that follows lands while it drains a backlog, mid-batch.
async fn maybe_burst(bursts: &mut Bursts, db: &FaultDb, rng: &mut impl Rng, p: f64) {
    if rng.random_bool(p) {
        bursts.fire(db, 4000).await;
        sleep_ms(rng.random_range(10..200)).await;
    }
}

/// Log mode: the topics' record counts, sampled, to bound what a fault may cost ([`crash_cost`]).
fn watch(ctx: &Ctx, topics: &[String]) -> Option<Watermarks> {
    (ctx.mode == Mode::Log).then(|| Watermarks::start(topics))
}

/// Duplicates one crash of the publisher (its process, its stream or its lease) at `at` may
/// cost. Claim mode: the in-flight window (`DUP_WINDOW`). Log mode: the in-flight
/// window plus every record published in the `REPORT_LAG` before the fault: a new leader (or
/// the same one in a new lease epoch) starts from the slot's position on the server, which
/// lags what the relay confirmed by up to a second (measured from the topics' watermarks,
/// which also count earlier duplicates: an overestimate).
async fn crash_cost(marks: Option<&Watermarks>, at: Instant) -> usize {
    match marks {
        Some(m) => {
            let from = at.checked_sub(REPORT_LAG).unwrap_or(at);
            DUP_WINDOW + m.written_between(from, at).await
        }
        None => DUP_WINDOW,
    }
}

/// Stop the writers; everything committed (writers and bursts) goes to the checker.
async fn stop(load: Load, bursts: Bursts) -> Ledger {
    let mut ledger = load.stop().await;
    ledger.merge(bursts.ledger);
    ledger
}

/// The common end of a scenario: stop the load, check every event (loss, rolled-back rows,
/// per-key order, bytes, at most `max_duplicates` duplicates), leave one leader, stop the
/// fleet, drop the database and topics.
async fn conclude(
    ctx: &Ctx,
    db: FaultDb,
    mut fleet: Fleet,
    (load, bursts): (Load, Bursts),
    topics: &[String],
    max_duplicates: usize,
) {
    let mut ledger = stop(load, bursts).await;
    harness::verify(ctx, &db, &mut ledger, expect(topics, max_duplicates)).await;
    fleet.wait_single_leader(Duration::from_secs(30)).await;
    fleet.stop_all().await;
    finish(db, topics).await;
}

fn expect(topics: &[String], max_duplicates: usize) -> Expect<'_> {
    Expect {
        topics,
        max_duplicates,
        parked: &[],
        drain_timeout: DRAIN,
    }
}

/// 1. Three replicas; random replicas (mostly the leader) are killed with SIGKILL and
///    restarted, under load. Each kill may cost the in-flight window at least once (plus log
///    mode's lag), nothing exactly once.
async fn replicas_sigkilled(ctx: Arc<Ctx>, delivery: Delivery) {
    let (db, topics) = setup(&ctx, 2).await;
    let mut fleet = fleet(&ctx, &db, 3, delivery.flags()).await;
    let load = load(&ctx, &db, spec(&topics)).await;
    let kills = if ctx.soak { 40 } else { 6 };
    let mut rng = ctx.rng("kills");
    let mut bursts = Bursts::new(&ctx, &topics);
    let marks = watch(&ctx, &topics);
    // Per kill (of the leader or a standby: counted for each) what a crash may cost.
    let mut bound = 0;
    for k in 1..=kills {
        sleep_ms(rng.random_range(300..2500)).await;
        maybe_burst(&mut bursts, &db, &mut rng, 0.6).await;
        let leaders = fleet.leaders().await;
        let victim = match leaders.first() {
            Some(&leader) if rng.random_bool(0.7) => leader,
            _ => rng.random_range(0..3),
        };
        let at = Instant::now();
        fleet.kill9(victim);
        fleet.respawn(victim);
        let resumed = db.wait_progress(&ctx, 50, PROGRESS).await;
        let cost = delivery.cost(crash_cost(marks.as_ref(), at).await);
        bound += cost;
        ctx.say(&format!(
            "kill {k}/{kills}: replica {victim} (led: {}); publishing {:.1}s later; may cost {cost} duplicates",
            leaders.contains(&victim),
            resumed.as_secs_f64()
        ));
    }
    fleet.assert_all_running();
    conclude(&ctx, db, fleet, (load, bursts), &topics, bound).await;
}

claim_mode!(
    replicas_sigkilled_under_load,
    minutes(5),
    replicas_sigkilled,
    Delivery::AtLeastOnce
);
log_mode!(
    log_replicas_sigkilled_under_load,
    minutes(5),
    replicas_sigkilled,
    Delivery::AtLeastOnce
);
claim_mode!(
    /// 1x. Replicas killed with SIGKILL under load, every replica with `--delivery
    /// exactly-once`: not a single duplicate, through every take-over (a new leader fences
    /// the killed one's transactional id, aborting its open transaction, and marks the rows
    /// of Kafka's last committed position before it reads).
    exactly_once_replicas_sigkilled_under_load,
    minutes(5),
    replicas_sigkilled,
    Delivery::ExactlyOnce
);
log_mode!(
    /// 1x, log mode: a new leader streams from Kafka's position (the slot's lags it) and skips
    /// the events Kafka holds of a transaction the killed leader published part of.
    log_exactly_once_replicas_sigkilled_under_load,
    minutes(5),
    replicas_sigkilled,
    Delivery::ExactlyOnce
);

/// 2. Rolling restart under load: SIGTERM each replica in turn (it must exit 0; a leader hands
///    over) and start a new one. Graceful, so not a single duplicate.
async fn rolling_restart(ctx: Arc<Ctx>) {
    let (db, topics) = setup(&ctx, 2).await;
    let mut fleet = fleet(&ctx, &db, 3, &[]).await;
    let load = load(&ctx, &db, spec(&topics)).await;
    let rounds = if ctx.soak { 18 } else { 6 };
    let mut rng = ctx.rng("restarts");
    let mut bursts = Bursts::new(&ctx, &topics);
    let mut leader_stops = 0;
    for r in 0..rounds {
        let slot = r % 3;
        maybe_burst(&mut bursts, &db, &mut rng, 0.5).await;
        let led = fleet.leaders().await.contains(&slot);
        let log = fleet.log(slot);
        let t = Instant::now();
        let code = fleet.terminate(slot, Duration::from_secs(45)).await;
        assert_eq!(
            code,
            Some(0),
            "replica {slot} did not exit 0 on SIGTERM; log {log:?} {}",
            ctx.tag()
        );
        let stopped = t.elapsed();
        let mut handover = String::new();
        if led {
            leader_stops += 1;
            let t = Instant::now();
            let next = fleet.wait_single_leader(Duration::from_secs(30)).await;
            handover = format!(
                "; replica {next} leads {:.2}s after the exit",
                t.elapsed().as_secs_f64()
            );
        }
        fleet.respawn(slot);
        fleet.wait_ready(slot, READY).await;
        db.wait_progress(&ctx, 50, PROGRESS).await;
        ctx.say(&format!(
            "restart {}/{rounds}: replica {slot} (it led: {led}) exited 0 in {:.2}s{handover}",
            r + 1,
            stopped.as_secs_f64()
        ));
        sleep_ms(rng.random_range(300..1500)).await;
    }
    assert!(
        leader_stops > 0,
        "no round stopped the leader {}",
        ctx.tag()
    );
    conclude(&ctx, db, fleet, (load, bursts), &topics, 0).await;
}

claim_mode!(rolling_restart_under_load, minutes(5), rolling_restart);
// Log mode too: a stopping leader reports its confirmed position before its stream closes, so
// not a single duplicate is allowed: a stop in the middle of a transaction (a burst: 4000 events
// in one transaction, batches of at most 2 x 200) reads and publishes the rest of it before the
// relay exits (`Reader::finish_unit`), so the slot's position passes it (seed 2523628441
// republished 3600 burst events before that).
log_mode!(log_rolling_restart_under_load, minutes(5), rolling_restart);

/// 3. A paused leader: SIGSTOP the current leader, wait past the lease until another replica
///    takes over, keep writing, then SIGCONT it. Whatever it still had in flight must not
///    break per-key first-occurrence order; duplicates stay within a crash's cost per pause
///    (at least once; none exactly once).
async fn paused_leader(ctx: Arc<Ctx>, delivery: Delivery) {
    assert!(
                ctx.lease,
                "outbox-relay has no --lease-duration flag: this scenario needs the lease-based leader election {}",
                ctx.tag()
            );
    let (db, topics) = setup(&ctx, 2).await;
    let mut fleet = fleet(&ctx, &db, 3, delivery.flags()).await;
    let load = load(&ctx, &db, spec(&topics)).await;
    let pauses = if ctx.soak { 8 } else { 2 };
    let mut rng = ctx.rng("pauses");
    let mut bursts = Bursts::new(&ctx, &topics);
    let marks = watch(&ctx, &topics);
    let mut bound = 0;
    for p in 1..=pauses {
        let old = fleet.wait_single_leader(Duration::from_secs(30)).await;
        maybe_burst(&mut bursts, &db, &mut rng, 0.7).await;
        fleet.pause(old);
        let t = Instant::now();
        // The new leader starts from the slot's position on the server (log mode): a crash's
        // cost, from the moment the old leader stopped confirming.
        bound += delivery.cost(crash_cost(marks.as_ref(), t).await);
        // The lease is 3 s and standbys poll every 100 ms: another replica must take over.
        let new = fleet.wait_single_leader(Duration::from_secs(30)).await;
        let takeover = t.elapsed();
        assert_ne!(new, old);
        assert!(
            takeover < Duration::from_secs(15),
            "takeover took {takeover:?} with a 3s lease {}",
            ctx.tag()
        );
        db.wait_progress(&ctx, 100, PROGRESS).await;
        sleep_ms(rng.random_range(500..2500)).await;
        let paused_for = t.elapsed();
        fleet.resume(old);
        // The woken replica must find it lost the lease: one leader again, and progress.
        sleep_ms(1000).await;
        let leader = fleet.wait_single_leader(Duration::from_secs(30)).await;
        db.wait_progress(&ctx, 50, PROGRESS).await;
        ctx.say(&format!(
                    "pause {p}/{pauses}: leader {old} stopped for {:.1}s; replica {new} took over after {:.2}s; leader now {leader}",
                    paused_for.as_secs_f64(),
                    takeover.as_secs_f64()
                ));
    }
    fleet.assert_all_running();
    conclude(&ctx, db, fleet, (load, bursts), &topics, bound).await;
}

claim_mode!(
    paused_leader_loses_lease_and_order_holds,
    minutes(5),
    paused_leader,
    Delivery::AtLeastOnce
);
log_mode!(
    log_paused_leader_loses_lease_and_order_holds,
    minutes(5),
    paused_leader,
    Delivery::AtLeastOnce
);
claim_mode!(
    /// 3x. A paused leader loses its lease, every replica with `--delivery exactly-once`: the
    /// new leader's producer fences the paused one (its open transaction is aborted, its next
    /// commit fails once it wakes), so not a single duplicate, and per-key order holds.
    exactly_once_paused_leader_loses_lease,
    minutes(5),
    paused_leader,
    Delivery::ExactlyOnce
);
log_mode!(
    /// 3x, log mode.
    log_exactly_once_paused_leader_loses_lease,
    minutes(5),
    paused_leader,
    Delivery::ExactlyOnce
);

/// A broker outage during load, `times` times (`soak_times` in a soak): after `before_ms`,
/// kafka.sh's `down` action, `down_ms` later its `up` action, with the relays started with
/// `flags`. Each outage may cost the in-flight window of duplicates (at least once).
struct Outage {
    what: &'static str,
    down: &'static str,
    up: &'static str,
    before_ms: std::ops::Range<u64>,
    down_ms: std::ops::RangeInclusive<u64>,
    times: usize,
    soak_times: usize,
    flags: &'static [&'static str],
}

async fn broker_outages(ctx: Arc<Ctx>, o: Outage, delivery: Delivery) {
    let (db, topics) = setup(&ctx, 2).await;
    let mut fleet = fleet(&ctx, &db, 2, o.flags).await;
    let load = load(&ctx, &db, spec(&topics)).await;
    let times = if ctx.soak { o.soak_times } else { o.times };
    let mut rng = ctx.rng(o.what);
    let mut bursts = Bursts::new(&ctx, &topics);
    for n in 1..=times {
        sleep_ms(rng.random_range(o.before_ms.clone())).await;
        maybe_burst(&mut bursts, &db, &mut rng, 0.7).await;
        service(&ctx, "kafka.sh", &[o.down]).await;
        let down = rng.random_range(o.down_ms.clone());
        sleep_ms(down).await;
        service(&ctx, "kafka.sh", &[o.up]).await;
        let resumed = db.wait_progress(&ctx, 100, PROGRESS).await;
        ctx.say(&format!(
            "{} {n}/{times} ({down} ms): publishing again {:.1}s after `kafka.sh {}`",
            o.what,
            resumed.as_secs_f64(),
            o.up
        ));
    }
    fleet.assert_all_running();
    let bound = delivery.cost(DUP_WINDOW * times);
    conclude(&ctx, db, fleet, (load, bursts), &topics, bound).await;
}

/// 4. The broker is killed with SIGKILL and restarted during load (at least once: the in-flight
///    window per kill; exactly once: nothing). The relay lives on and leads on, and log mode's
///    stream, if it restarts (a fatal producer error), starts from the relay's own confirmed
///    position, not the server's lagging one.
async fn broker_sigkilled(ctx: Arc<Ctx>, delivery: Delivery) {
    let kill = Outage {
        what: "broker-kills",
        down: "kill9",
        up: "start",
        before_ms: 1000..3000,
        down_ms: 1000..=4000,
        times: 2,
        soak_times: 6,
        flags: delivery.flags(),
    };
    broker_outages(ctx, kill, delivery).await
}

claim_mode!(
    broker_sigkilled_and_restarted_under_load,
    minutes(5),
    broker_sigkilled,
    Delivery::AtLeastOnce
);
log_mode!(
    log_broker_sigkilled_and_restarted_under_load,
    minutes(5),
    broker_sigkilled,
    Delivery::AtLeastOnce
);
claim_mode!(
    /// 4x. The broker killed with SIGKILL and restarted under load, every replica with
    /// `--delivery exactly-once`: whatever the leader had sent, in an open transaction or
    /// being committed, when the broker died, not a single duplicate (nor a loss).
    exactly_once_broker_sigkilled,
    minutes(5),
    broker_sigkilled,
    Delivery::ExactlyOnce
);
log_mode!(
    /// 4x, log mode.
    log_exactly_once_broker_sigkilled,
    minutes(5),
    broker_sigkilled,
    Delivery::ExactlyOnce
);

/// 5. The broker is paused (SIGSTOP) for ~10 s, then resumed, during load.
async fn broker_paused(ctx: Arc<Ctx>) {
    let pause = Outage {
        what: "broker-pauses",
        down: "pause",
        up: "resume",
        before_ms: 500..2000,
        down_ms: 10_000..=10_000,
        times: 1,
        soak_times: 4,
        flags: &[],
    };
    broker_outages(ctx, pause, Delivery::AtLeastOnce).await
}

claim_mode!(
    broker_paused_and_resumed_under_load,
    minutes(4),
    broker_paused
);
log_mode!(
    log_broker_paused_and_resumed_under_load,
    minutes(4),
    broker_paused
);

/// 6. The broker is down for ~15 s, three times `--stall-timeout 5s`: the leader gives up on
///    its batches in flight and recreates its producer, again and again, while the rows wait.
///    (A finite `message.timeout.ms` is refused: librdkafka would skip a timed-out message and
///    send the key's later ones first.) Nothing may be lost, and per-key first-occurrence
///    order must hold.
async fn broker_down(ctx: Arc<Ctx>) {
    let outage = Outage {
        what: "broker-outages",
        down: "stop",
        up: "start",
        before_ms: 500..2000,
        down_ms: 15_000..=15_000,
        times: 1,
        soak_times: 3,
        flags: &["--stall-timeout", "5s"],
    };
    broker_outages(ctx, outage, Delivery::AtLeastOnce).await
}

claim_mode!(
    broker_down_longer_than_the_stall_timeout,
    minutes(4),
    broker_down
);

/// 7. PostgreSQL restarted (fast shutdown) and crashed (SIGKILL of the postmaster, then start)
///    under load. Writers retry their transactions and resolve unknown COMMIT outcomes. At
///    least once, each fault may cost what a crash of the publisher does; exactly once,
///    nothing (rows Kafka committed whose marks the database lost are in Kafka's position).
async fn postgres_restarted(ctx: Arc<Ctx>, delivery: Delivery) {
    let (db, topics) = setup(&ctx, 2).await;
    let mut fleet = fleet(&ctx, &db, 2, delivery.flags()).await;
    let load = load(&ctx, &db, spec(&topics)).await;
    let rounds = if ctx.soak { 4 } else { 1 };
    let mut rng = ctx.rng("postgres-faults");
    let mut bursts = Bursts::new(&ctx, &topics);
    let marks = watch(&ctx, &topics);
    let mut bound = 0;
    for r in 1..=rounds {
        sleep_ms(rng.random_range(1000..3000)).await;
        maybe_burst(&mut bursts, &db, &mut rng, 0.7).await;
        let fast = Instant::now();
        service(&ctx, "pg.sh", &["restart-fast"]).await;
        let resumed = db.wait_progress(&ctx, 100, PROGRESS).await;
        ctx.say(&format!(
            "round {r}/{rounds}: fast restart; publishing again after {:.1}s",
            resumed.as_secs_f64()
        ));
        sleep_ms(rng.random_range(1000..3000)).await;
        maybe_burst(&mut bursts, &db, &mut rng, 0.7).await;
        // Log mode: where the slot is before the crash, and after it (back to where it was last
        // saved: at a checkpoint, or when its restart position moved).
        let before = match ctx.mode {
            Mode::Log => Some((db.confirmed(&ctx).await, checkpoint_lsn(&ctx, &db).await)),
            _ => None,
        };
        service(&ctx, "pg.sh", &["kill9"]).await;
        let crash = Instant::now();
        sleep_ms(rng.random_range(500..2000)).await;
        service(&ctx, "pg.sh", &["start"]).await;
        if let Some((confirmed, checkpoint)) = before {
            let after = db.confirmed(&ctx).await;
            ctx.say(&format!(
                "round {r}/{rounds}: the slot's confirmed position was {confirmed} before the crash \
                 (last checkpoint at {checkpoint}) and is {after} after it: {} bytes back",
                confirmed - after
            ));
        }
        let resumed = db.wait_progress(&ctx, 100, PROGRESS).await;
        // Claim mode: the in-flight window per fault. Log mode: the fast restart
        // costs what a crash of the publisher does; after the crash the slot resumes where it
        // was last saved, in the worst case at the last checkpoint: the fast restart's
        // shutdown checkpoint, so everything published since shortly before the fast restart.
        bound += delivery.cost(match &marks {
            Some(m) => {
                let from = fast.checked_sub(REPORT_LAG).unwrap_or(fast);
                2 * DUP_WINDOW + m.written_between(from, crash).await
            }
            None => 2 * DUP_WINDOW,
        });
        ctx.say(&format!(
            "round {r}/{rounds}: crash and start; publishing again after {:.1}s; {bound} duplicates allowed so far",
            resumed.as_secs_f64()
        ));
    }
    fleet.assert_all_running();
    conclude(&ctx, db, fleet, (load, bursts), &topics, bound).await;
}

/// The WAL position of the server's last checkpoint (bytes).
async fn checkpoint_lsn(ctx: &Ctx, db: &FaultDb) -> i64 {
    db.scalar(
        ctx,
        "SELECT (checkpoint_lsn - '0/0'::pg_lsn)::int8 FROM pg_control_checkpoint()",
    )
    .await
}

claim_mode!(
    postgres_restarted_and_crashed_under_load,
    minutes(5),
    postgres_restarted,
    Delivery::AtLeastOnce
);
log_mode!(
    log_postgres_restarted_and_crashed_under_load,
    minutes(5),
    postgres_restarted,
    Delivery::AtLeastOnce
);
claim_mode!(
    /// 7x. PostgreSQL restarted and crashed under load, every replica with `--delivery
    /// exactly-once`: rows Kafka committed whose marks the database lost (or never got) are
    /// covered by the relay's position committed with them: not a single duplicate.
    exactly_once_postgres_restarted,
    minutes(5),
    postgres_restarted,
    Delivery::ExactlyOnce
);
log_mode!(
    /// 7x, log mode: after the crash the slot resumes from its last saved position, far behind
    /// Kafka's; the relay streams from Kafka's: not a single duplicate.
    log_exactly_once_postgres_restarted,
    minutes(5),
    postgres_restarted,
    Delivery::ExactlyOnce
);

/// 8. `pg_terminate_backend` of every connection of the relays (application_name
///    'outbox-relay', and log mode's walsender, 'outbox-relay-log') a few times under load.
async fn connections_terminated(ctx: Arc<Ctx>) {
    let (db, topics) = setup(&ctx, 2).await;
    let mut fleet = fleet(&ctx, &db, 2, &[]).await;
    let load = load(&ctx, &db, spec(&topics)).await;
    let rounds = if ctx.soak { 25 } else { 4 };
    let mut rng = ctx.rng("terminations");
    let mut bursts = Bursts::new(&ctx, &topics);
    let marks = watch(&ctx, &topics);
    // Per round what a crash of the publisher may cost: the leader may lose its lease with its
    // connections (log mode: a new epoch reads from the server's slot position).
    let mut bound = 0;
    let mut walsenders_ended = 0;
    for r in 1..=rounds {
        sleep_ms(rng.random_range(500..3000)).await;
        maybe_burst(&mut bursts, &db, &mut rng, 0.6).await;
        let at = Instant::now();
        let walsenders = db
            .scalar(
                &ctx,
                "SELECT count(*) FILTER (WHERE backend_type = 'walsender') \
                 FROM pg_stat_activity WHERE application_name = 'outbox-relay-log' \
                 AND datname = current_database()",
            )
            .await;
        let killed = db
            .scalar(
                &ctx,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                         WHERE application_name IN ('outbox-relay', 'outbox-relay-log') \
                         AND datname = current_database()",
            )
            .await;
        let resumed = db.wait_progress(&ctx, 50, PROGRESS).await;
        let cost = crash_cost(marks.as_ref(), at).await;
        bound += cost;
        ctx.say(&format!(
            "termination {r}/{rounds}: {killed} relay connections ({walsenders} walsenders); publishing again after {:.1}s; may cost {cost} duplicates",
            resumed.as_secs_f64()
        ));
        assert!(killed > 0, "no relay connection to terminate {}", ctx.tag());
        walsenders_ended += walsenders;
    }
    if ctx.mode == Mode::Log {
        assert!(
            walsenders_ended > 0,
            "no round ended the leader's walsender {}",
            ctx.tag()
        );
    }
    fleet.assert_all_running();
    conclude(&ctx, db, fleet, (load, bursts), &topics, bound).await;
}

claim_mode!(
    relay_connections_terminated_under_load,
    minutes(4),
    connections_terminated
);
log_mode!(
    log_relay_connections_terminated_under_load,
    minutes(4),
    connections_terminated
);

/// A poison row and what must become of it.
struct Poison {
    id: i64,
    what: &'static str,
    /// `last_error` must contain this.
    error: &'static str,
    /// The `outbox_relay_parked_total` reason it is counted under.
    reason: &'static str,
}

/// 9. Poison rows (payload larger than the topic allows, unknown topic, malformed headers,
///    illegal topic names, a reserved header) interleaved with the load, some on the load's
///    own keys: each is parked with a reason, counted, the process stays up, everything else
///    keeps flowing in order. (Authorization failures need an authorizer, which the local
///    broker does not run: not covered.)
#[test]
fn poison_rows_parked_while_others_flow() {
    run_scenario(
        "poison_rows_parked_while_others_flow",
        minutes(5),
        |ctx| async move {
            let (db, topics) = setup(&ctx, 2).await;
            let big = unique("fault_poison_small_max");
            service(
                &ctx,
                "kafka.sh",
                &[
                    "create-topic",
                    &big,
                    "3",
                    "--config",
                    "max.message.bytes=1024",
                ],
            )
            .await;
            wait_topic_ready(&brokers(), &big, 3, TOPIC_READY, &ctx.tag()).await;
            let missing = unique("fault_poison_never_created");
            let long_topic = "t".repeat(250);
            let mut fleet = fleet(&ctx, &db, 1, &[]).await;
            let spec = LoadSpec {
                writers: 4,
                ..spec(&topics)
            };
            let load = load(&ctx, &db, spec.clone()).await;
            let mut rng = ctx.rng("poison");
            let mut poison: Vec<Poison> = Vec::new();
            let waves = if ctx.soak { 4 } else { 2 };
            for wave in 0..waves {
                // (what, topic, headers, payload size, expected error, parked reason)
                let kinds: Vec<(
                    &'static str,
                    String,
                    serde_json::Value,
                    usize,
                    &'static str,
                    &'static str,
                )> = vec![
                    (
                        "too large",
                        big.clone(),
                        serde_json::json!({}),
                        4000,
                        "max.message.bytes",
                        "too_large",
                    ),
                    (
                        "unknown topic",
                        missing.clone(),
                        serde_json::json!({}),
                        10,
                        "does not exist",
                        "unknown_topic",
                    ),
                    (
                        "headers array",
                        String::new(),
                        serde_json::json!(["a", "b"]),
                        10,
                        "headers is an array",
                        "invalid_row",
                    ),
                    (
                        "headers string",
                        String::new(),
                        serde_json::json!("just a string"),
                        10,
                        "headers is a string",
                        "invalid_row",
                    ),
                    (
                        "number header",
                        String::new(),
                        serde_json::json!({"n": 5}),
                        10,
                        "\"n\" is a number",
                        "invalid_row",
                    ),
                    (
                        "object header",
                        String::new(),
                        serde_json::json!({"n": {"x": "y"}}),
                        10,
                        "\"n\" is an object",
                        "invalid_row",
                    ),
                    (
                        "null header",
                        String::new(),
                        serde_json::json!({"n": null}),
                        10,
                        "\"n\" is null",
                        "invalid_row",
                    ),
                    (
                        "reserved header",
                        String::new(),
                        serde_json::json!({"outbox-event-id": "1"}),
                        10,
                        "is reserved",
                        "invalid_row",
                    ),
                    (
                        "illegal topic",
                        "bad topic!".into(),
                        serde_json::json!({}),
                        10,
                        "contains ' '",
                        "invalid_row",
                    ),
                    (
                        "long topic",
                        long_topic.clone(),
                        serde_json::json!({}),
                        10,
                        "250 characters long",
                        "invalid_row",
                    ),
                ];
                for (what, topic, headers, size, error, reason) in kinds {
                    // Half of them on a key of the load (its stream must flow on past them).
                    let k = rng.random_range(0..spec.keys);
                    let (topic, key) = if rng.random_bool(0.5) {
                        let topic = if topic.is_empty() {
                            spec.topic_of(k).to_string()
                        } else {
                            topic
                        };
                        (topic, LoadSpec::key(k))
                    } else {
                        let topic = if topic.is_empty() {
                            topics[0].clone()
                        } else {
                            topic
                        };
                        (topic, format!("poison-{wave}-{what}"))
                    };
                    let mut payload = format!("tok:poison-{wave}-{what}|").into_bytes();
                    let mut noise = vec![0u8; size];
                    rng.fill(&mut noise[..]);
                    payload.extend_from_slice(&noise);
                    let id: i64 = sqlx::query_scalar(
                        "INSERT INTO outbox (topic, key, payload, headers) VALUES ($1, $2, $3, $4) RETURNING id",
                    )
                    .bind(&topic)
                    .bind(&key)
                    .bind(&payload)
                    .bind(&headers)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
                    poison.push(Poison {
                        id,
                        what,
                        error,
                        reason,
                    });
                    sleep_ms(rng.random_range(50..400)).await;
                }
                ctx.say(&format!("poison wave {}/{waves} inserted", wave + 1));
            }
            let ids: Vec<i64> = poison.iter().map(|p| p.id).collect();
            let start = Instant::now();
            loop {
                let parked: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM outbox WHERE id = ANY($1) AND failed_at IS NOT NULL",
                )
                .bind(&ids)
                .fetch_one(&db.pool)
                .await
                .unwrap();
                if parked as usize == ids.len() {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "only {parked} of {} poison rows parked {}",
                    ids.len(),
                    ctx.tag()
                );
                sleep_ms(200).await;
            }
            ctx.say(&format!(
                "all {} poison rows parked {:.1}s after the last insert",
                ids.len(),
                start.elapsed().as_secs_f64()
            ));
            db.wait_progress(&ctx, 50, PROGRESS).await;
            fleet.assert_all_running();
            let mut ledger = load.stop().await;
            let mut all_topics = topics.clone();
            all_topics.push(big.clone());
            harness::verify(
                &ctx,
                &db,
                &mut ledger,
                Expect {
                    topics: &all_topics,
                    max_duplicates: 0,
                    parked: &ids,
                    drain_timeout: DRAIN,
                },
            )
            .await;
            // Each parked row says why, and was tried.
            for p in &poison {
                let (attempts, error): (i32, Option<String>) = sqlx::query_as(
                    "SELECT attempts, last_error FROM outbox WHERE id = $1 AND failed_at IS NOT NULL",
                )
                .bind(p.id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
                let error = error.unwrap_or_default();
                assert!(
                    error.contains(p.error),
                    "{} (row {}): last_error {error:?} does not say {:?} {}",
                    p.what,
                    p.id,
                    p.error,
                    ctx.tag()
                );
                assert!(
                    attempts >= 1,
                    "{} (row {}): attempts {attempts} {}",
                    p.what,
                    p.id,
                    ctx.tag()
                );
            }
            // Metrics count them, by reason; the gauge refreshes every 5 s.
            let start = Instant::now();
            let metrics = loop {
                let m = fleet.metrics(0).await.unwrap_or_default();
                if metric(&m, "outbox_relay_parked_rows") == Some(ids.len() as f64) {
                    break m;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "outbox_relay_parked_rows never showed {}:\n{m} {}",
                    ids.len(),
                    ctx.tag()
                );
                sleep_ms(250).await;
            };
            for reason in ["invalid_row", "too_large", "unknown_topic"] {
                let want = poison.iter().filter(|p| p.reason == reason).count() as f64;
                let series = format!("outbox_relay_parked_total{{reason=\"{reason}\"}}");
                assert_eq!(
                    metric(&metrics, &series),
                    Some(want),
                    "{series}:\n{metrics} {}",
                    ctx.tag()
                );
            }
            fleet.assert_all_running();
            fleet.stop_all().await;
            finish(db, &all_topics).await;
        },
    );
}

/// 10. A backlog of `rows` rows (inserted with INSERT ... SELECT FROM generate_series in a few
///     chunks) drained by one relay with `--batch-size 5000`: peak RSS under 128 MB; the drain
///     time and rate are printed.
async fn backlog(ctx: Arc<Ctx>, rows: i64) {
    const KEYS: i64 = 100;
    let (db, topics) = setup(&ctx, 2).await;
    let prefix = format!("{}-{}-", ctx.name, ctx.seed);
    let chunk = (rows / 4).max(1);
    let t = Instant::now();
    let mut from = 0;
    while from < rows {
        let to = (from + chunk).min(rows) - 1;
        sqlx::query(
            "INSERT INTO outbox (topic, key, payload, headers) \
             SELECT CASE WHEN i % 2 = 0 THEN $1 ELSE $2 END, 'bk-' || (i % $6), \
                    convert_to('tok:' || $3 || i || '|', 'UTF8') || '\\x00fffe'::bytea || convert_to(repeat('x', 64), 'UTF8'), \
                    jsonb_build_object($7::text, $3 || i, 'seq', (i / $6 + 1)::text) \
             FROM generate_series($4::bigint, $5::bigint) AS i ORDER BY i",
        )
        .bind(&topics[0])
        .bind(&topics[1])
        .bind(&prefix)
        .bind(from)
        .bind(to)
        .bind(KEYS)
        .bind(TOKEN_HEADER)
        .execute(&db.pool)
        .await
        .unwrap();
        from = to + 1;
    }
    ctx.say(&format!(
        "{rows} rows inserted in {:.1}s",
        t.elapsed().as_secs_f64()
    ));
    // What each row must look like in Kafka (mirrors the SQL above).
    let ids: Vec<(i64, String)> = sqlx::query_as("SELECT id, headers->>$1 FROM outbox")
        .bind(TOKEN_HEADER)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let mut ledger = Ledger::default();
    for (id, token) in ids {
        let i: i64 = token.strip_prefix(&prefix).unwrap().parse().unwrap();
        let seq = i / KEYS + 1;
        let topic = &topics[(i % 2) as usize];
        ledger.add(Expected::bulk(
            id,
            token,
            topic,
            format!("bk-{}", i % KEYS),
            seq,
            &[b'x'; 64],
        ));
    }
    let t = Instant::now();
    let mut fleet = Fleet::new(&ctx, &db, &["--batch-size", "5000"]);
    fleet.spawn();
    let drain = db
        .wait_drained(&ctx, Duration::from_secs(if ctx.soak { 1800 } else { 300 }))
        .await;
    let secs = t.elapsed().as_secs_f64();
    let hwm = vm_hwm_kb(fleet.pid(0)).expect("VmHWM of the relay");
    ctx.say(&format!(
        "drained {rows} rows in {secs:.1}s from the relay's start ({:.0} rows/s); peak RSS (VmHWM) {:.1} MB",
        rows as f64 / secs,
        hwm as f64 / 1024.0
    ));
    let _ = drain;
    assert!(
        hwm < 128 * 1024,
        "the relay's peak RSS {hwm} kB exceeds 128 MB draining {rows} rows {}",
        ctx.tag()
    );
    fleet.assert_all_running();
    harness::verify(
        &ctx,
        &db,
        &mut ledger,
        Expect {
            topics: &topics,
            max_duplicates: 0,
            parked: &[],
            drain_timeout: Duration::from_secs(60),
        },
    )
    .await;
    fleet.stop_all().await;
    finish(db, &topics).await;
}

#[test]
fn backlog_100k_drained_in_bounded_memory() {
    run_scenario(
        "backlog_100k_drained_in_bounded_memory",
        minutes(5),
        |ctx| backlog(ctx, 100_000),
    );
}

/// The 1,000,000-row backlog: OUTBOX_SOAK=1 only (it takes a few minutes).
#[test]
fn soak_backlog_1m_drained_in_bounded_memory() {
    if !soak() {
        eprintln!("soak_backlog_1m_drained_in_bounded_memory: skipped (set OUTBOX_SOAK=1)");
        return;
    }
    run_scenario(
        "soak_backlog_1m_drained_in_bounded_memory",
        minutes(5),
        |ctx| backlog(ctx, 1_000_000),
    );
}

/// 11. A write transaction stays open ~15 s (on a side table, plus one outbox event of its own)
///     while the load runs. Claim mode publishes on meanwhile; the held transaction's own event
///     (a late commit with a low id) arrives, and the usual checks hold (no fault: not a single
///     duplicate).
async fn long_transaction(ctx: Arc<Ctx>) {
    const HELD: Duration = Duration::from_secs(15);
    let (db, topics) = setup(&ctx, 2).await;
    let fleet = fleet(&ctx, &db, 2, &[]).await;
    let load = load(&ctx, &db, spec(&topics)).await;
    let mut bursts = Bursts::new(&ctx, &topics);
    let held = LongTx::begin(&ctx, &db, &topics[0]).await;
    let opened = Instant::now();
    db.wait_progress(&ctx, 200, PROGRESS).await;
    tokio::time::sleep(HELD.saturating_sub(opened.elapsed() + Duration::from_secs(1))).await;
    // Rows of transactions that began after the held one, committed and published so far.
    let later = |what: &str| {
        format!(
            "SELECT count(*) FROM outbox WHERE xid > '{}'::xid8{what}",
            held.xid
        )
    };
    let committed = db.scalar(&ctx, &later("")).await;
    let published = db.scalar(&ctx, &later(&format!(" AND {PUBLISHED}"))).await;
    ctx.say(&format!(
        "{:.1}s into the long transaction: {published} of {committed} rows committed after it began are published",
        opened.elapsed().as_secs_f64()
    ));
    assert!(
        committed > 0,
        "the writers committed nothing while the long transaction was open {}",
        ctx.tag()
    );
    assert!(
        published > 0,
        "claim mode was held back by a long transaction {}",
        ctx.tag()
    );
    tokio::time::sleep(HELD.saturating_sub(opened.elapsed())).await;
    bursts.ledger.merge(held.commit().await);
    let resumed = db
        .wait_progress(&ctx, (committed - published).max(50), PROGRESS)
        .await;
    ctx.say(&format!(
        "publishing on {:.1}s after the commit",
        resumed.as_secs_f64()
    ));
    conclude(&ctx, db, fleet, (load, bursts), &topics, 0).await;
}

claim_mode!(
    long_transaction_open_under_load,
    minutes(4),
    long_transaction
);

/// Rows of scenario 12's backlog: seconds to drain in either delivery.
const BACKLOG: i64 = 40_000;

/// 12. The difference `--delivery exactly-once` makes, shown deterministically, once per
///     delivery: a leader and a standby, a backlog of [`BACKLOG`] rows committed at once; a
///     quarter of it published, the leader is stopped (SIGSTOP: what it wrote to Kafka and
///     to the table can then be counted) at a moment when Kafka holds records of rows the
///     table does not show published (stopped again until it does), killed with SIGKILL, and
///     the standby drains the rest. At least once, exactly those rows come again: more than
///     none, at most the in-flight window. Exactly once (those are the records of its open
///     transaction): not a single duplicate.
#[test]
fn kill9_mid_backlog_duplicates_only_at_least_once() {
    run_scenario(
        "kill9_mid_backlog_duplicates_only_at_least_once",
        minutes(6),
        |ctx| async move {
            let at_least_once = leader_killed_mid_backlog(&ctx, Delivery::AtLeastOnce).await;
            let exactly_once = leader_killed_mid_backlog(&ctx, Delivery::ExactlyOnce).await;
            ctx.say(&format!(
                "the leader killed mid-backlog: {at_least_once} duplicates at least once, \
                 {exactly_once} exactly once"
            ));
        },
    );
}

/// The topics' end offsets, summed, as a consumer of `isolation` sees them: read_committed up
/// to the first open Kafka transaction of each partition, read_uncommitted everything written.
async fn end_offsets(topics: &[String], isolation: &'static str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("isolation.level", isolation)
            .create()
            .unwrap();
        let mut sum = 0;
        for t in &topics {
            for p in 0..PARTITIONS {
                let (_, high) = consumer
                    .fetch_watermarks(t, p, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("end offset of {t}/{p}: {e}"));
                sum += high;
            }
        }
        sum
    })
    .await
    .unwrap()
}

/// One delivery's run of scenario 12: the duplicates the checker counted.
async fn leader_killed_mid_backlog(ctx: &Arc<Ctx>, delivery: Delivery) -> usize {
    let what = delivery.name();
    let (db, topics) = setup(ctx, 2).await;
    let mut fleet = replicas(ctx, &db, delivery.flags()).labelled(what);
    fleet.spawn();
    fleet.wait_all_ready(READY).await;
    let leader = fleet.wait_single_leader(Duration::from_secs(30)).await;
    let standby = fleet.spawn();
    fleet.wait_ready(standby, READY).await;
    let mut bursts = Bursts::new(ctx, &topics);
    bursts.fire(&db, BACKLOG).await;
    let start = Instant::now();
    while db.published(ctx).await < BACKLOG / 4 {
        assert!(
            start.elapsed() < PROGRESS,
            "{what}: a quarter of the backlog not published within {PROGRESS:?} {}",
            ctx.tag()
        );
        sleep_ms(20).await;
    }
    // Stop the leader, give what it sent a second to land (Kafka, PostgreSQL), and count the
    // records in Kafka of rows the table does not show published: what a leader starting from
    // the table publishes again. At least once (no transactions: both ends are the same), all
    // records but the marked rows'; exactly once, those of its open transaction (beyond the
    // read_committed end; a transaction's rows are marked once it committed). Until there are.
    let mut rng = ctx.rng(what);
    let mut stops = 0;
    let (marked, exposed) = loop {
        stops += 1;
        fleet.pause(leader);
        sleep_ms(1000).await;
        let marked = db.published(ctx).await;
        let visible = end_offsets(&topics, "read_committed").await;
        let written = end_offsets(&topics, "read_uncommitted").await;
        assert!(
            marked < BACKLOG,
            "{what}: the backlog was drained before the leader was stopped {}",
            ctx.tag()
        );
        let exposed = match delivery {
            Delivery::AtLeastOnce => visible - marked,
            Delivery::ExactlyOnce => written - visible,
        };
        ctx.say(&format!(
            "{what}: leader {leader} stopped (stop {stops}): {marked} of {BACKLOG} rows marked \
             published; end offsets {visible} read_committed, {written} read_uncommitted: \
             {exposed} records in Kafka of rows not marked"
        ));
        if exposed > 0 || stops == 10 {
            break (marked, exposed);
        }
        fleet.resume(leader);
        sleep_ms(rng.random_range(20..200)).await;
    };
    assert!(
        exposed > 0,
        "{what}: the leader was never stopped with records in Kafka of rows not marked \
         ({stops} stops) {}",
        ctx.tag()
    );
    let killed = Instant::now();
    fleet.kill9(leader);
    let next = fleet.wait_single_leader(Duration::from_secs(30)).await;
    let took_over = killed.elapsed();
    let drained = db.wait_drained(ctx, DRAIN).await;
    ctx.say(&format!(
        "{what}: leader {leader} killed with {marked} rows marked; replica {next} led {:.1}s \
         later and drained the backlog in {:.1}s",
        took_over.as_secs_f64(),
        drained.as_secs_f64()
    ));
    let adopted = fleet
        .relay(next)
        .logs()
        .lines()
        .filter(|l| l.contains("took over Kafka's committed position"))
        .map(str::to_string)
        .collect::<Vec<_>>()
        .join(" | ");
    if !adopted.is_empty() {
        ctx.say(&format!("{what}: replica {next}: {adopted}"));
    }
    let report = harness::verify(
        ctx,
        &db,
        &mut bursts.ledger,
        expect(&topics, delivery.cost(DUP_WINDOW)),
    )
    .await;
    // Exactly once, `verify` allowed none.
    if delivery == Delivery::AtLeastOnce {
        assert_eq!(
            report.duplicates,
            exposed as usize,
            "{what}: the duplicates are not exactly the {exposed} rows in Kafka and not marked \
             when the leader died {}",
            ctx.tag()
        );
    }
    fleet.stop_all().await;
    finish(db, &topics).await;
    report.duplicates
}

/// The checker itself: fed records with a gap, a per-key reordering, a duplicate, a rolled-back
/// event, an unknown event and a corrupted payload (produced straight to Kafka, no relay), it
/// must report each one, and nothing else: audit events of one key arriving against id order
/// are not an order violation. Guards the suite against a checker that passes everything.
#[test]
fn checker_catches_loss_disorder_duplicates_and_strangers() {
    run_scenario(
        "checker_catches_loss_disorder_duplicates_and_strangers",
        minutes(2),
        |ctx| async move {
            use rdkafka::message::{Header, OwnedHeaders};
            use rdkafka::producer::{FutureProducer, FutureRecord};
            use std::collections::{HashMap, HashSet};

            let topics = create_topics(&ctx, 1).await;
            let event = |id: i64, seq: i64| {
                let token = format!("self-{}-{id}", ctx.seed);
                let mut payload = format!("tok:{token}|").into_bytes();
                payload.push(0xff);
                Expected {
                    id,
                    topic: topics[0].clone(),
                    key: Some("k".into()),
                    seq: Some(seq),
                    payload: Some(payload),
                    headers: vec![(TOKEN_HEADER.to_string(), token.clone().into_bytes())],
                    token,
                }
            };
            let mut committed: Vec<Expected> = (1..=5).map(|i| event(i, i)).collect();
            let rolled_back = event(6, 6);
            let stranger = event(7, 7);
            let mut corrupted = committed[3].clone();
            corrupted.payload = Some(b"tok:corrupted|".to_vec());
            // Two audit events of one key (no sequence number: written before any lock, their
            // order is not defined), arriving against id order: not a violation.
            let audit = |id: i64| Expected {
                key: Some("audit-k".into()),
                seq: None,
                ..event(id, 0)
            };
            committed.extend([audit(8), audit(9)]);
            // Arrival order: 1, 3, 2 (order broken), 4 with a wrong payload, 1 again (duplicate),
            // the rolled-back event, a stranger, audit 9 then 8; 5 never arrives.
            let sent = [
                &committed[0],
                &committed[2],
                &committed[1],
                &corrupted,
                &committed[0],
                &rolled_back,
                &stranger,
                &committed[6],
                &committed[5],
            ];
            let producer: FutureProducer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .set("enable.idempotence", "true")
                .set("partitioner", "murmur2_random")
                .create()
                .unwrap();
            for e in sent {
                let mut headers = OwnedHeaders::new();
                for (k, v) in &e.headers {
                    headers = headers.insert(Header {
                        key: k,
                        value: Some(v),
                    });
                }
                let id = e.id.to_string();
                for (k, v) in [
                    ("outbox-event-id", id.as_str()),
                    ("outbox-created-at", "2026-01-01T00:00:00.000000Z"),
                    ("outbox-source", "public.outbox"),
                ] {
                    headers = headers.insert(Header {
                        key: k,
                        value: Some(v),
                    });
                }
                producer
                    .send(
                        FutureRecord::to(&e.topic)
                            .key(e.key.as_deref().unwrap())
                            .payload(e.payload.as_deref().unwrap())
                            .headers(headers),
                        Duration::from_secs(30),
                    )
                    .await
                    .unwrap();
            }
            let committed: HashMap<String, Expected> = committed
                .into_iter()
                .map(|e| (e.token.clone(), e))
                .collect();
            let not_committed: HashSet<String> = [rolled_back.token.clone()].into();
            let read = Reading {
                brokers: brokers(),
                topics: topics.clone(),
                partitions: PARTITIONS,
                settle: Duration::from_secs(1),
                timeout: Duration::from_secs(10),
            };
            let (report, violations) = tokio::task::spawn_blocking(move || {
                common::load::consume_and_check(&read, &committed, &not_committed)
            })
            .await
            .unwrap();
            let all = violations.join("\n");
            for needle in [
                "first occurrence of seq 2 after seq 3 (per-key order broken)",
                "payload differs",
                "was rolled back (or never committed) but reached Kafka",
                "unknown event",
                "1 committed events never reached Kafka",
            ] {
                assert!(
                    all.contains(needle),
                    "the checker missed {needle:?}; it said:\n{all} {}",
                    ctx.tag()
                );
            }
            assert!(
                !all.contains("audit-k"),
                "the checker order-checked audit events:\n{all} {}",
                ctx.tag()
            );
            // The five above, and the read timing out while it waited for the missing event.
            assert_eq!(violations.len(), 6, "{all} {}", ctx.tag());
            assert_eq!(report.unordered, 2, "{report:?} {}", ctx.tag());
            assert_eq!(report.duplicates, 1, "{report:?} {}", ctx.tag());
            delete_topics(&brokers(), &topics).await;
        },
    );
}
