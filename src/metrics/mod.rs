//! Prometheus metrics: the names, the one registry, and the health state
//! every layer reports to (served by `crate::operate`).
//!
//! Every metric name is a constant in [`names`] (the contract the
//! dashboards and alert rules are built from; `docs/metrics.md` describes
//! each). All metrics live in one registry ([`metrics()`]), created on first
//! use, so instrumented code anywhere in the crate records with one atomic
//! operation and no plumbing. The HTTP endpoint
//! ([`serve`](crate::operate::serve)) answers `/metrics`, `/healthz` and
//! `/readyz`; readiness is decided by [`health()`] (see [`mod@health`] for
//! what "connected" means). The [`sampler`](crate::operate::sampler) runs
//! cheap queries on a connection of its own.
//!
//! Labels never carry secrets or unbounded values: `mode` is `cdc` or
//! `poll`, `topic` is a rendered Kafka topic (bounded by the deployment's
//! templates; `""` for events no topic could be rendered for), `slot` the
//! configured slot, `status` and `kind` fixed sets.

pub mod condition;
pub mod health;
mod register;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{LazyLock, Mutex};

use prometheus::{
    Gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};

use crate::config::Mode;
use crate::Lsn;
use register::Registrar;

pub use health::{health, Health};
pub use register::Transactions as TransactionMetrics;

/// The metric names (see `docs/metrics.md`).
pub mod names {
    /// Gauge 1 with `version`, `revision`: the build.
    pub const BUILD_INFO: &str = "pgoutbox_build_info";
    /// Gauge 1 with `mode`: the mode this relay runs in.
    pub const MODE: &str = "pgoutbox_mode";
    /// Gauge 0/1: the same verdict as `/readyz`.
    pub const READY: &str = "pgoutbox_ready";
    /// Gauge 0/1: waiting on the serving lock.
    pub const STANDBY: &str = "pgoutbox_standby";
    /// Counter by `mode`: events read (decoded from WAL / claimed).
    pub const EVENTS_READ: &str = "pgoutbox_events_read_total";
    /// Counter by `mode`, `topic`: acknowledged by Kafka.
    pub const EVENTS_PUBLISHED: &str = "pgoutbox_events_published_total";
    /// Counter by `mode`, `topic`: failed sends (retriable).
    pub const EVENTS_FAILED: &str = "pgoutbox_events_failed_total";
    /// Counter by `mode`, `topic`: dead-lettered.
    pub const EVENTS_DEAD_LETTERED: &str = "pgoutbox_events_dead_lettered_total";
    /// Gauge: sent, not yet acknowledged.
    pub const KAFKA_IN_FLIGHT: &str = "pgoutbox_kafka_in_flight_events";
    /// Histogram: send → acknowledgement, in seconds.
    pub const KAFKA_ACK_LATENCY: &str = "pgoutbox_kafka_ack_latency_seconds";
    /// Histogram by `stage` (`sent`, `read`, `delivered`), CDC: seconds
    /// from an event's PostgreSQL commit until the server sent it on the
    /// replication stream (both PostgreSQL's clock), until the relay read
    /// it, and until Kafka had it for consumers (acknowledged; with
    /// exactly-once delivery, its Kafka transaction committed); the last
    /// two are PostgreSQL's clock against the relay's.
    pub const EVENT_LATENCY: &str = "pgoutbox_event_latency_seconds";
    /// Histogram by `kind`: items per batch.
    pub const BATCH_SIZE: &str = "pgoutbox_batch_size";
    /// Gauge: last WAL position received (CDC).
    pub const RECEIVED_LSN: &str = "pgoutbox_received_lsn";
    /// Gauge: last position confirmed to PostgreSQL (CDC).
    pub const FLUSHED_LSN: &str = "pgoutbox_flushed_lsn";
    /// Gauge: the server's WAL end (keepalives, sampled).
    pub const SERVER_LSN: &str = "pgoutbox_server_lsn";
    /// Gauge: server LSN - flushed LSN.
    pub const REPLICATION_LAG: &str = "pgoutbox_replication_lag_bytes";
    /// Gauge by `slot`: WAL the slot keeps (sampled).
    pub const SLOT_RETAINED_WAL: &str = "pgoutbox_slot_retained_wal_bytes";
    /// Gauge by `slot`, `status`: 1 for the slot's current `wal_status`.
    pub const SLOT_WAL_STATUS: &str = "pgoutbox_slot_wal_status";
    /// Gauge by `slot`: `safe_wal_size` (-1 when unlimited).
    pub const SLOT_SAFE_WAL_SIZE: &str = "pgoutbox_slot_safe_wal_size_bytes";
    /// Gauge 0/1 by `slot`: retained WAL above the warning threshold.
    pub const SLOT_RETENTION_WARNING: &str = "pgoutbox_slot_retention_warning";
    /// Counter by `slot`: lost slots the relay recreated (with a backfill of
    /// the rows not yet COMPLETED), `cdc.on_slot_lost = "recreate"`.
    pub const SLOT_RECOVERIES: &str = "pgoutbox_slot_recoveries_total";
    /// Gauge 0/1 by `slot`: the slot is a failover slot (PostgreSQL 17+,
    /// sampled; absent on older servers).
    pub const SLOT_FAILOVER: &str = "pgoutbox_slot_failover";
    /// Gauge 0/1 by `slot`, `standby` (`host:port` of the host list): the
    /// standby holds a synced, valid copy of the failover slot (asked every
    /// minute; only for a failover slot and a multi-host `DATABASE_URL`).
    pub const SLOT_STANDBY_SYNCED: &str = "pgoutbox_slot_standby_synced";
    /// Gauge by `status`: sampled row counts.
    pub const OUTBOX_ROWS: &str = "pgoutbox_outbox_rows";
    /// Gauge: age of the oldest `PENDING` row, sampled.
    pub const OLDEST_PENDING_AGE: &str = "pgoutbox_outbox_oldest_pending_age_seconds";
    /// Counter: claim statements that returned rows.
    pub const POLL_CLAIMS: &str = "pgoutbox_poll_claims_total";
    /// Counter: completions that touched no row (lease expired).
    pub const POLL_STALE_COMPLETIONS: &str = "pgoutbox_poll_stale_completions_total";
    /// Counter: rows the reaper returned.
    pub const POLL_REAPED: &str = "pgoutbox_poll_reaped_total";
    /// Counter: rows whose lease renewal found them gone.
    pub const POLL_LEASES_LOST: &str = "pgoutbox_poll_leases_lost_total";
    /// Counter by `mode`: sessions restarted after a transient failure.
    pub const RECONNECTS: &str = "pgoutbox_reconnects_total";
    /// Counter: failed sampling queries.
    pub const SAMPLE_ERRORS: &str = "pgoutbox_sample_errors_total";
    /// Counter: logical messages with an outbox-like prefix that the CDC
    /// relay did not relay (a prefix not configured, or non-transactional
    /// messages not enabled).
    pub const MESSAGES_IGNORED: &str = "pgoutbox_messages_ignored_total";
    /// Gauge: the outbox's condition from the `[health]` thresholds, 0
    /// healthy, 1 degraded, 2 unhealthy (sampled; `/health` says why).
    pub const HEALTH_LEVEL: &str = "pgoutbox_health_level";
    /// Gauge by `check` (`oldest_pending`, `slot_lag`, `dead_letters`):
    /// each measure's level, 0, 1 or 2 (sampled).
    pub const HEALTH_CHECK_LEVEL: &str = "pgoutbox_health_check_level";
    /// Gauge: rows dead-lettered within `health.dead_letter_window_s`
    /// (sampled).
    pub const DEAD_LETTERS_RECENT: &str = "pgoutbox_outbox_dead_letters_recent";
    /// Counter by `outcome` (`committed`, `aborted`): Kafka transactions
    /// (exactly-once delivery).
    pub const KAFKA_TRANSACTIONS: &str = "pgoutbox_kafka_transactions_total";
    /// Histogram: events per committed Kafka transaction.
    pub const KAFKA_TRANSACTION_EVENTS: &str = "pgoutbox_kafka_transaction_events";
    /// Histogram: commit_transaction's duration, in seconds.
    pub const KAFKA_COMMIT_LATENCY: &str = "pgoutbox_kafka_transaction_commit_seconds";
    /// Gauge: the commit LSN of the last stream position a committed Kafka
    /// transaction recorded in the progress topic.
    pub const KAFKA_COMMITTED_LSN: &str = "pgoutbox_kafka_committed_position_lsn";
    /// Counter: this relay's producer was fenced by another relay with the
    /// same `transactional.id`.
    pub const KAFKA_FENCED: &str = "pgoutbox_kafka_fenced_total";
    /// Counter: replayed events not sent again because a committed Kafka
    /// transaction already holds them (exactly-once delivery).
    pub const EVENTS_SKIPPED: &str = "pgoutbox_events_skipped_total";
}

/// Values of the `kind` label of [`names::BATCH_SIZE`].
pub mod batch {
    /// Replication messages taken from the reader in one wake-up (CDC).
    pub const REPLICATION_READ: &str = "replication_read";
    /// Rows one claim statement returned (poll).
    pub const CLAIM: &str = "claim";
    /// Rows one status update statement wrote, or one delivery journal
    /// entry recorded (CDC).
    pub const STATUS_UPDATE: &str = "status_update";
    /// Rows one fold of the delivery journal set `COMPLETED` (CDC).
    pub const JOURNAL_FOLD: &str = "journal_fold";
    /// Marks one synchronous commit of the mark writer made durable, when
    /// nothing else flushed the WAL past them in time (CDC).
    pub const FORCED_FLUSH: &str = "forced_wal_flush";
}

/// The `status` values of [`names::OUTBOX_ROWS`].
pub const ROW_STATUSES: [&str; 3] = ["PENDING", "PROCESSING", "DEAD_LETTER"];

/// The `status` values of [`names::SLOT_WAL_STATUS`].
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// The `mode` label values.
const MODES: [&str; 2] = ["cdc", "poll"];

/// The three counters of one (mode, topic).
#[derive(Clone)]
pub struct TopicCounters {
    /// Acknowledged by Kafka.
    pub published: IntCounter,
    /// Failed sends (retriable).
    pub failed: IntCounter,
    /// Dead-lettered.
    pub dead_lettered: IntCounter,
}

/// Every metric, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// [`names::BUILD_INFO`].
    pub build_info: IntGaugeVec,
    mode_gauge: IntGaugeVec,
    current_mode: AtomicU8,
    /// [`names::READY`].
    pub ready: IntGauge,
    /// [`names::STANDBY`].
    pub standby: IntGauge,
    /// [`names::EVENTS_READ`].
    pub events_read: IntCounterVec,
    events_published: IntCounterVec,
    events_failed: IntCounterVec,
    events_dead_lettered: IntCounterVec,
    /// [`names::KAFKA_IN_FLIGHT`].
    pub kafka_in_flight: IntGauge,
    /// [`names::KAFKA_ACK_LATENCY`].
    pub kafka_ack_latency: Histogram,
    /// [`names::EVENT_LATENCY`], stage `sent`.
    pub event_sent_latency: Histogram,
    /// [`names::EVENT_LATENCY`], stage `read`.
    pub event_read_latency: Histogram,
    /// [`names::EVENT_LATENCY`], stage `delivered`.
    pub event_delivered_latency: Histogram,
    /// [`names::BATCH_SIZE`].
    pub batch_size: HistogramVec,
    received_lsn: IntGauge,
    flushed_lsn: IntGauge,
    server_lsn: IntGauge,
    replication_lag: IntGauge,
    lsns: Lsns,
    /// [`names::SLOT_RETAINED_WAL`].
    pub slot_retained_wal: IntGaugeVec,
    /// [`names::SLOT_WAL_STATUS`].
    pub slot_wal_status: IntGaugeVec,
    /// [`names::SLOT_SAFE_WAL_SIZE`].
    pub slot_safe_wal_size: IntGaugeVec,
    /// [`names::SLOT_RETENTION_WARNING`].
    pub slot_retention_warning: IntGaugeVec,
    /// [`names::SLOT_RECOVERIES`].
    pub slot_recoveries: IntCounterVec,
    /// [`names::SLOT_FAILOVER`].
    pub slot_failover: IntGaugeVec,
    /// [`names::SLOT_STANDBY_SYNCED`].
    pub slot_standby_synced: IntGaugeVec,
    /// [`names::OUTBOX_ROWS`].
    pub outbox_rows: IntGaugeVec,
    /// [`names::OLDEST_PENDING_AGE`].
    pub oldest_pending_age: Gauge,
    /// [`names::POLL_CLAIMS`].
    pub poll_claims: IntCounter,
    /// [`names::POLL_STALE_COMPLETIONS`].
    pub poll_stale_completions: IntCounter,
    /// [`names::POLL_REAPED`].
    pub poll_reaped: IntCounter,
    /// [`names::POLL_LEASES_LOST`].
    pub poll_leases_lost: IntCounter,
    /// [`names::RECONNECTS`].
    pub reconnects: IntCounterVec,
    /// [`names::SAMPLE_ERRORS`].
    pub sample_errors: IntCounter,
    /// [`names::MESSAGES_IGNORED`].
    pub messages_ignored: IntCounter,
    /// [`names::HEALTH_LEVEL`].
    pub health_level: IntGauge,
    /// [`names::HEALTH_CHECK_LEVEL`].
    pub health_check_level: IntGaugeVec,
    /// [`names::DEAD_LETTERS_RECENT`].
    pub dead_letters_recent: IntGauge,
    /// Exactly-once delivery's Kafka transactions.
    pub transactions: TransactionMetrics,
    /// Per mode (`cdc`, `poll`): the counters of each topic seen.
    topics: [Mutex<HashMap<Box<str>, TopicCounters>>; 2],
}

/// The LSN gauges' values, kept as `u64` so the server's WAL end only
/// moves forward and the lag is computed from consistent values.
#[derive(Default)]
struct Lsns {
    received: AtomicU64,
    flushed: AtomicU64,
    server: AtomicU64,
}

/// The registry and every metric of this process.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// `version` and `revision` from a version string such as
/// `0.1.0 (abc1234)` ([`crate::VERSION`]).
pub fn version_parts(version: &str) -> (&str, &str) {
    match version.split_once(" (") {
        Some((v, rest)) => (v.trim(), rest.trim_end_matches(')').trim()),
        None => (version.trim(), "unknown"),
    }
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let r = Registrar::new(&registry);
        let relay = register::Relay::register(&r);
        let wal = register::Wal::register(&r);
        let rows = register::Rows::register(&r);
        let transactions = register::Transactions::register(&r);
        let m = Metrics {
            build_info: relay.build_info,
            mode_gauge: relay.mode_gauge,
            current_mode: AtomicU8::new(0),
            ready: relay.ready,
            standby: relay.standby,
            events_read: relay.events_read,
            events_published: relay.events_published,
            events_failed: relay.events_failed,
            events_dead_lettered: relay.events_dead_lettered,
            kafka_in_flight: relay.kafka_in_flight,
            kafka_ack_latency: relay.kafka_ack_latency,
            event_sent_latency: relay.event_latency.with_label_values(&["sent"]),
            event_read_latency: relay.event_latency.with_label_values(&["read"]),
            event_delivered_latency: relay.event_latency.with_label_values(&["delivered"]),
            batch_size: relay.batch_size,
            received_lsn: wal.received_lsn,
            flushed_lsn: wal.flushed_lsn,
            server_lsn: wal.server_lsn,
            replication_lag: wal.replication_lag,
            lsns: Lsns::default(),
            slot_retained_wal: wal.slot_retained_wal,
            slot_wal_status: wal.slot_wal_status,
            slot_safe_wal_size: wal.slot_safe_wal_size,
            slot_retention_warning: wal.slot_retention_warning,
            slot_recoveries: wal.slot_recoveries,
            slot_failover: wal.slot_failover,
            slot_standby_synced: wal.slot_standby_synced,
            outbox_rows: rows.outbox_rows,
            oldest_pending_age: rows.oldest_pending_age,
            poll_claims: rows.poll_claims,
            poll_stale_completions: rows.poll_stale_completions,
            poll_reaped: rows.poll_reaped,
            poll_leases_lost: rows.poll_leases_lost,
            reconnects: rows.reconnects,
            sample_errors: rows.sample_errors,
            messages_ignored: rows.messages_ignored,
            health_level: rows.health_level,
            health_check_level: rows.health_check_level,
            dead_letters_recent: rows.dead_letters_recent,
            transactions,
            topics: [Mutex::new(HashMap::new()), Mutex::new(HashMap::new())],
            registry,
        };
        m.create_fixed_series();
        #[cfg(target_os = "linux")]
        {
            let _ = m.registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        m
    }

    /// Sets the build information and creates the series whose labels are
    /// known in advance, so they are exposed from the start.
    fn create_fixed_series(&self) {
        let (version, revision) = version_parts(crate::VERSION);
        self.build_info
            .with_label_values(&[version, revision])
            .set(1);
        for mode in MODES {
            self.mode_gauge.with_label_values(&[mode]).set(0);
        }
        for status in ROW_STATUSES {
            self.outbox_rows.with_label_values(&[status]);
        }
        for outcome in ["committed", "aborted"] {
            self.transactions.transactions.with_label_values(&[outcome]);
        }
        for kind in [
            batch::REPLICATION_READ,
            batch::CLAIM,
            batch::STATUS_UPDATE,
            batch::JOURNAL_FOLD,
        ] {
            self.batch_size.with_label_values(&[kind]);
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::with_capacity(16 * 1024);
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::debug!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Records the mode this relay runs in (`cdc` or `poll`), and creates
    /// the mode's series at zero so that rates start from the beginning.
    pub fn set_mode(&self, mode: Mode) {
        let label = mode.as_str();
        for m in MODES {
            self.mode_gauge
                .with_label_values(&[m])
                .set(i64::from(m == label));
        }
        self.current_mode.store(
            match mode {
                Mode::Cdc => 1,
                Mode::Poll => 2,
                Mode::Auto => 0,
            },
            Ordering::Relaxed,
        );
        self.events_read.with_label_values(&[label]);
        self.reconnects.with_label_values(&[label]);
    }

    /// The mode recorded by [`Metrics::set_mode`], if any yet.
    pub fn mode(&self) -> Option<Mode> {
        match self.current_mode.load(Ordering::Relaxed) {
            1 => Some(Mode::Cdc),
            2 => Some(Mode::Poll),
            _ => None,
        }
    }

    /// Runs `f` on the counters of `topic` in `mode` (`Auto` counts as
    /// `cdc`). The first use of a topic creates all three at zero, so a
    /// dashboard sees a failure rate of 0 rather than no series.
    pub fn with_topic<R>(&self, mode: Mode, topic: &str, f: impl FnOnce(&TopicCounters) -> R) -> R {
        let index = usize::from(mode == Mode::Poll);
        let mut topics = self.topics[index].lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = topics.get(topic) {
            return f(c);
        }
        let labels = [MODES[index], topic];
        let c = TopicCounters {
            published: self.events_published.with_label_values(&labels),
            failed: self.events_failed.with_label_values(&labels),
            dead_lettered: self.events_dead_lettered.with_label_values(&labels),
        };
        let r = f(&c);
        topics.insert(Box::from(topic), c);
        r
    }

    /// Counts `n` events dead-lettered in `mode` for `topic` (`""` when no
    /// topic could be rendered).
    pub fn dead_lettered(&self, mode: Mode, topic: &str, n: u64) {
        if n > 0 {
            self.with_topic(mode, topic, |c| c.dead_lettered.inc_by(n));
        }
    }

    /// Observes one batch of `kind` with `n` items.
    pub fn batch(&self, kind: &str, n: usize) {
        self.batch_size.with_label_values(&[kind]).observe(n as f64);
    }

    /// The last WAL position received on the replication stream.
    pub fn received_lsn(&self, lsn: Lsn) {
        self.lsns.received.store(lsn.0, Ordering::Relaxed);
        self.received_lsn.set(lsn_gauge(lsn.0));
    }

    /// The position confirmed to PostgreSQL.
    pub fn flushed_lsn(&self, lsn: Lsn) {
        self.lsns.flushed.store(lsn.0, Ordering::Relaxed);
        self.flushed_lsn.set(lsn_gauge(lsn.0));
        self.update_lag();
    }

    /// The server's WAL end, from a keepalive, XLogData or the sampler; the
    /// gauge keeps the highest seen.
    pub fn server_lsn(&self, lsn: Lsn) {
        let prev = self.lsns.server.fetch_max(lsn.0, Ordering::Relaxed);
        if lsn.0 > prev {
            self.server_lsn.set(lsn_gauge(lsn.0));
            self.update_lag();
        }
    }

    fn update_lag(&self) {
        let flushed = self.lsns.flushed.load(Ordering::Relaxed);
        let server = self.lsns.server.load(Ordering::Relaxed);
        // Only once this relay has confirmed something: a standby's lag
        // against position 0 would mean nothing.
        if flushed > 0 && server > 0 {
            self.replication_lag
                .set(lsn_gauge(server.saturating_sub(flushed)));
        }
    }
}

fn lsn_gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parts_split_the_cli_version() {
        assert_eq!(version_parts("0.1.0 (abc1234)"), ("0.1.0", "abc1234"));
        assert_eq!(
            version_parts("1.2.3 (abc1234-dirty)"),
            ("1.2.3", "abc1234-dirty")
        );
        assert_eq!(version_parts("0.1.0"), ("0.1.0", "unknown"));
        let (v, r) = version_parts(crate::VERSION);
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        assert!(!r.is_empty() && !r.contains(')'), "{r}");
    }

    #[test]
    fn every_contract_name_is_registered_once() {
        let m = metrics();
        m.set_mode(Mode::Cdc);
        m.with_topic(Mode::Cdc, "t", |_| ());
        m.received_lsn(Lsn(1));
        m.flushed_lsn(Lsn(1));
        m.server_lsn(Lsn(2));
        m.slot_retained_wal.with_label_values(&["s"]).set(0);
        m.slot_wal_status
            .with_label_values(&["s", "reserved"])
            .set(1);
        m.slot_safe_wal_size.with_label_values(&["s"]).set(-1);
        m.slot_retention_warning.with_label_values(&["s"]).set(0);
        m.health_check_level
            .with_label_values(&["oldest_pending"])
            .set(0);
        let text = m.encode();
        use names::*;
        for name in [
            BUILD_INFO,
            MODE,
            READY,
            STANDBY,
            EVENTS_READ,
            EVENTS_PUBLISHED,
            EVENTS_FAILED,
            EVENTS_DEAD_LETTERED,
            KAFKA_IN_FLIGHT,
            KAFKA_ACK_LATENCY,
            BATCH_SIZE,
            RECEIVED_LSN,
            FLUSHED_LSN,
            SERVER_LSN,
            REPLICATION_LAG,
            SLOT_RETAINED_WAL,
            SLOT_WAL_STATUS,
            SLOT_SAFE_WAL_SIZE,
            SLOT_RETENTION_WARNING,
            OUTBOX_ROWS,
            OLDEST_PENDING_AGE,
            POLL_CLAIMS,
            POLL_STALE_COMPLETIONS,
            POLL_REAPED,
            POLL_LEASES_LOST,
            RECONNECTS,
            SAMPLE_ERRORS,
            HEALTH_LEVEL,
            HEALTH_CHECK_LEVEL,
            DEAD_LETTERS_RECENT,
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name} in:\n{text}"
            );
        }
    }

    #[test]
    fn the_server_lsn_only_moves_forward_and_the_lag_follows() {
        // A private instance: the global one is shared with other tests.
        let m = Metrics::new();
        m.server_lsn(Lsn(1000));
        m.flushed_lsn(Lsn(400));
        assert_eq!(m.replication_lag.get(), 600);
        m.server_lsn(Lsn(900));
        assert_eq!(m.server_lsn.get(), 1000);
        m.flushed_lsn(Lsn(1000));
        assert_eq!(m.replication_lag.get(), 0);
    }
}
