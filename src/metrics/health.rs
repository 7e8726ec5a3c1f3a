//! Liveness and readiness.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` answers 200 only
//! when the relay delivers: it holds the serving lock (not a standby), is
//! connected to PostgreSQL and streaming (CDC) or polling (poll), and is
//! connected to Kafka. Otherwise 503 with one line saying why.
//!
//! - **PostgreSQL** — CDC: the replication session is streaming
//!   (`START_REPLICATION` answered; any error ends the session, and with it
//!   readiness, until it is streaming again). Poll: the serving lock is held
//!   and at least one worker's last claim statement succeeded (a worker whose
//!   connection fails drops out until a claim succeeds again). In both modes
//!   the serving lock's connection ending (PostgreSQL restarted) ends the
//!   session at once.
//! - **Kafka** — the relay's own producer heard from the cluster within
//!   [`KAFKA_STALE_AFTER`]: an acknowledged event, or, when no event was
//!   acknowledged for [`KAFKA_PROBE_INTERVAL`], an answered metadata request
//!   (the producer probes the cluster on that period; see
//!   [`crate::sink::Sink::probe_cluster`]). A failed probe makes the relay
//!   unready at once; an acknowledgement or an answered probe makes it
//!   ready again. Connection state from librdkafka's statistics was not
//!   used: librdkafka and the brokers close idle connections, so "no broker
//!   UP" happens on a healthy idle relay.
//! - **Kafka acknowledging** — a cluster that answers metadata may still
//!   accept nothing: a partition without a leader, or fewer in-sync
//!   replicas than `min.insync.replicas` (librdkafka retries those sends
//!   until `message.timeout.ms`). While events are in flight and none was
//!   acknowledged for [`KAFKA_STALE_AFTER`] (counted from the last
//!   acknowledgement, or from the moment the relay had events in flight
//!   again), the relay is unready and says how many events wait.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::config::Mode;

/// How often the producer asks the cluster for metadata when no event was
/// acknowledged meanwhile.
pub const KAFKA_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Without an acknowledgement or an answered probe for this long, Kafka
/// counts as unreachable.
pub const KAFKA_STALE_AFTER: Duration = Duration::from_secs(15);

/// What the relay is doing, as far as readiness is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before the first session.
    Starting,
    /// Setting up a session (connections, slot, serving lock taken).
    Connecting,
    /// CDC: publishing the rows already pending when the slot was created.
    Backfilling,
    /// Streaming (CDC) or polling (poll).
    Serving,
    /// A session ended; backing off before the next.
    Reconnecting,
}

#[derive(Clone, Debug)]
struct State {
    phase: Phase,
    detail: String,
}

/// The process's readiness inputs. One per process ([`health()`]).
pub struct Health {
    started: Instant,
    state: Mutex<State>,
    standby: AtomicBool,
    stopping: AtomicBool,
    workers_connected: AtomicI64,
    /// Milliseconds since `started` (+1; 0 = never) of the last sign of
    /// life from Kafka.
    kafka_ok: AtomicU64,
    /// The same for the last failed probe.
    kafka_failed: AtomicU64,
    kafka_error: Mutex<String>,
    /// The same for the last acknowledgement.
    kafka_acked: AtomicU64,
    /// The same for the moment events were in flight after none were.
    kafka_busy_since: AtomicU64,
}

/// The process's health.
pub fn health() -> &'static Health {
    static HEALTH: LazyLock<Health> = LazyLock::new(Health::new);
    &HEALTH
}

/// Everything readiness is decided from, at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// `cdc` or `poll` once resolved.
    pub mode: Option<Mode>,
    /// The current phase.
    pub phase: Phase,
    /// Why the phase is what it is (the last error when reconnecting).
    pub detail: String,
    /// Waiting on the serving lock.
    pub standby: bool,
    /// Shutdown was requested.
    pub stopping: bool,
    /// Poll workers whose last claim succeeded.
    pub workers_connected: i64,
    /// Milliseconds since the last sign of life from Kafka (`None`: never).
    pub kafka_ok_ago: Option<u64>,
    /// Whether a probe failed after that sign of life.
    pub kafka_failed_since: bool,
    /// The failed probe's error.
    pub kafka_error: String,
    /// Events handed to the producer and not yet reported.
    pub kafka_in_flight: i64,
    /// Milliseconds since the later of the last acknowledgement and the
    /// moment events were in flight again (`None`: nothing in flight).
    pub kafka_unacked_ago: Option<u64>,
}

/// Ready, or the one-line reason why not.
pub fn evaluate(s: &Snapshot) -> Result<(), String> {
    if s.stopping {
        return Err("shutting down".into());
    }
    if s.standby {
        return Err(
            "standby: waiting on the serving lock (another relay serves this table)".into(),
        );
    }
    let doing = match s.mode {
        Some(Mode::Poll) => "polling",
        _ => "streaming",
    };
    match s.phase {
        Phase::Serving => {}
        Phase::Starting => return Err(format!("not {doing} yet: starting")),
        Phase::Connecting => return Err(format!("not {doing} yet: connecting ({})", s.detail)),
        Phase::Backfilling => {
            return Err("not streaming yet: initial backfill of the pending rows".into())
        }
        Phase::Reconnecting => {
            return Err(format!("not {doing}: reconnecting after: {}", s.detail))
        }
    }
    if s.mode == Some(Mode::Poll) && s.workers_connected <= 0 {
        return Err("not polling: no poll worker has a working PostgreSQL connection".into());
    }
    let stale = KAFKA_STALE_AFTER.as_millis() as u64;
    if let Some(ago) = s.kafka_unacked_ago.filter(|&ago| ago > stale) {
        let mut why = format!(
            "Kafka not acknowledging: none of {} events in flight acknowledged for {}s \
             (brokers down, a partition without a leader, or fewer in-sync replicas than \
             min.insync.replicas?)",
            s.kafka_in_flight,
            ago / 1000
        );
        if s.kafka_failed_since {
            why.push_str(&format!("; the last metadata request: {}", s.kafka_error));
        }
        return Err(why);
    }
    match s.kafka_ok_ago {
        None if s.kafka_failed_since => Err(format!("Kafka unreachable: {}", s.kafka_error)),
        None => Err("Kafka: no answer from the cluster yet".into()),
        Some(_) if s.kafka_failed_since => Err(format!("Kafka unreachable: {}", s.kafka_error)),
        Some(ago) if ago > stale => Err(format!(
            "Kafka unreachable: no acknowledgement or metadata answer for {}s",
            ago / 1000
        )),
        Some(_) => Ok(()),
    }
}

/// Held by a poll worker while its connection works; dropping it (or the
/// worker) takes the worker out of the count.
#[must_use]
pub struct WorkerConnected(());

impl Drop for WorkerConnected {
    fn drop(&mut self) {
        health().workers_connected.fetch_sub(1, Relaxed);
    }
}

impl Health {
    fn new() -> Health {
        Health {
            started: Instant::now(),
            state: Mutex::new(State {
                phase: Phase::Starting,
                detail: String::new(),
            }),
            standby: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            workers_connected: AtomicI64::new(0),
            kafka_ok: AtomicU64::new(0),
            kafka_failed: AtomicU64::new(0),
            kafka_error: Mutex::new(String::new()),
            kafka_acked: AtomicU64::new(0),
            kafka_busy_since: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// Enters `phase`; `detail` says why (one line is kept).
    pub fn set_phase(&self, phase: Phase, detail: impl Into<String>) {
        let detail = one_line(&detail.into());
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.phase = phase;
        s.detail = detail;
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).phase
    }

    /// Waiting on the serving lock (or not any more).
    pub fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Relaxed);
        super::metrics().standby.set(i64::from(standby));
    }

    /// Shutdown was requested: never ready again.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Relaxed);
    }

    /// A poll worker's claim succeeded on a fresh connection.
    pub fn worker_connected(&self) -> WorkerConnected {
        self.workers_connected.fetch_add(1, Relaxed);
        WorkerConnected(())
    }

    /// Kafka acknowledged an event or answered a probe.
    pub fn kafka_ok(&self) {
        self.kafka_ok.store(self.now(), Relaxed);
    }

    /// Kafka acknowledged an event.
    pub fn kafka_acked(&self) {
        let now = self.now();
        self.kafka_ok.store(now, Relaxed);
        self.kafka_acked.store(now, Relaxed);
    }

    /// An event was handed to the producer while `in_flight_before` others
    /// were in flight.
    pub fn kafka_sent(&self, in_flight_before: i64) {
        if in_flight_before <= 0 {
            self.kafka_busy_since.store(self.now(), Relaxed);
        }
    }

    /// A probe of the cluster failed with `error`.
    pub fn kafka_failed(&self, error: &str) {
        *self.kafka_error.lock().unwrap_or_else(|p| p.into_inner()) = one_line(error);
        self.kafka_failed.store(self.now(), Relaxed);
    }

    /// Whether the producer should ask the cluster for metadata: nothing
    /// was acknowledged for `every`, or the last probe failed.
    pub fn kafka_probe_due(&self, every: Duration) -> bool {
        let ok = self.kafka_ok.load(Relaxed);
        let failed = self.kafka_failed.load(Relaxed);
        ok == 0 || failed >= ok || self.now().saturating_sub(ok) >= every.as_millis() as u64
    }

    /// The inputs of readiness, now.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let now = self.now();
        let ok = self.kafka_ok.load(Relaxed);
        let failed = self.kafka_failed.load(Relaxed);
        let in_flight = super::metrics().kafka_in_flight.get();
        let since = self
            .kafka_acked
            .load(Relaxed)
            .max(self.kafka_busy_since.load(Relaxed));
        Snapshot {
            mode: super::metrics().mode(),
            phase: state.phase,
            detail: state.detail,
            standby: self.standby.load(Relaxed),
            stopping: self.stopping.load(Relaxed),
            workers_connected: self.workers_connected.load(Relaxed),
            kafka_ok_ago: (ok > 0).then(|| now.saturating_sub(ok)),
            kafka_failed_since: failed > 0 && failed >= ok,
            kafka_error: self
                .kafka_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            kafka_in_flight: in_flight,
            kafka_unacked_ago: (in_flight > 0).then(|| now.saturating_sub(since)),
        }
    }

    /// Ready, or why not; also sets the `pgoutbox_ready` gauge.
    pub fn readiness(&self) -> Result<(), String> {
        let verdict = evaluate(&self.snapshot());
        super::metrics().ready.set(i64::from(verdict.is_ok()));
        verdict
    }
}

fn one_line(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.chars().count() > 300 {
        let mut cut: String = line.chars().take(299).collect();
        cut.push('…');
        cut
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving(mode: Mode) -> Snapshot {
        Snapshot {
            mode: Some(mode),
            phase: Phase::Serving,
            detail: String::new(),
            standby: false,
            stopping: false,
            workers_connected: 1,
            kafka_ok_ago: Some(100),
            kafka_failed_since: false,
            kafka_error: String::new(),
            kafka_in_flight: 0,
            kafka_unacked_ago: None,
        }
    }

    #[test]
    fn ready_only_when_serving_and_both_services_answer() {
        assert_eq!(evaluate(&serving(Mode::Cdc)), Ok(()));
        assert_eq!(evaluate(&serving(Mode::Poll)), Ok(()));

        let mut s = serving(Mode::Cdc);
        s.standby = true;
        assert!(evaluate(&s).unwrap_err().starts_with("standby"));

        let mut s = serving(Mode::Cdc);
        s.phase = Phase::Reconnecting;
        s.detail = "the replication stream closed".into();
        assert_eq!(
            evaluate(&s).unwrap_err(),
            "not streaming: reconnecting after: the replication stream closed"
        );

        let mut s = serving(Mode::Poll);
        s.workers_connected = 0;
        assert!(evaluate(&s).unwrap_err().contains("no poll worker"));
        // Workers do not matter in CDC.
        let mut s = serving(Mode::Cdc);
        s.workers_connected = 0;
        assert_eq!(evaluate(&s), Ok(()));

        let mut s = serving(Mode::Cdc);
        s.stopping = true;
        assert_eq!(evaluate(&s).unwrap_err(), "shutting down");
    }

    #[test]
    fn kafka_is_unreachable_after_a_failed_probe_or_a_long_silence() {
        let mut s = serving(Mode::Cdc);
        s.kafka_failed_since = true;
        s.kafka_error = "Local: Broker transport failure".into();
        assert_eq!(
            evaluate(&s).unwrap_err(),
            "Kafka unreachable: Local: Broker transport failure"
        );
        let mut s = serving(Mode::Cdc);
        s.kafka_ok_ago = Some(KAFKA_STALE_AFTER.as_millis() as u64 + 1);
        assert!(evaluate(&s).unwrap_err().contains("no acknowledgement"));
        s.kafka_ok_ago = None;
        assert!(evaluate(&s).unwrap_err().contains("no answer"));
    }

    #[test]
    fn a_cluster_that_answers_but_acknowledges_nothing_is_not_ready() {
        let stale = KAFKA_STALE_AFTER.as_millis() as u64;
        let mut s = serving(Mode::Cdc);
        s.kafka_in_flight = 42;
        s.kafka_unacked_ago = Some(stale);
        assert_eq!(evaluate(&s), Ok(()), "not yet stale");
        s.kafka_unacked_ago = Some(stale + 1_000);
        let why = evaluate(&s).unwrap_err();
        assert!(
            why.starts_with("Kafka not acknowledging: none of 42 events"),
            "{why}"
        );
        assert!(why.contains("min.insync.replicas"), "{why}");
        // A failed probe (the broker's connection busy with held sends)
        // is added, not put first.
        s.kafka_failed_since = true;
        s.kafka_error = "OperationTimedOut".into();
        let why = evaluate(&s).unwrap_err();
        assert!(why.starts_with("Kafka not acknowledging"), "{why}");
        assert!(
            why.ends_with("the last metadata request: OperationTimedOut"),
            "{why}"
        );
        s.kafka_failed_since = false;
        // Nothing in flight: an idle relay is ready however old its last
        // acknowledgement.
        s.kafka_in_flight = 0;
        s.kafka_unacked_ago = None;
        assert_eq!(evaluate(&s), Ok(()));
    }

    #[test]
    fn the_stall_clock_starts_when_events_are_in_flight_again() {
        let h = Health::new();
        h.kafka_acked();
        let acked = h.kafka_acked.load(Relaxed);
        std::thread::sleep(Duration::from_millis(5));
        h.kafka_sent(0);
        assert!(h.kafka_busy_since.load(Relaxed) > acked);
        let busy = h.kafka_busy_since.load(Relaxed);
        std::thread::sleep(Duration::from_millis(5));
        h.kafka_sent(3);
        assert_eq!(h.kafka_busy_since.load(Relaxed), busy, "already busy");
    }

    #[test]
    fn reasons_are_one_line() {
        assert_eq!(one_line("a\nb\r\tc"), "a b  c");
        assert_eq!(one_line(&"x".repeat(400)).chars().count(), 300);
    }
}
