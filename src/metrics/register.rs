//! Creating and registering the metrics of [`Metrics`](super::Metrics), in
//! three groups: the relay and its events, WAL positions and the slot, and
//! the sampled rows with the poll and session counters.

use prometheus::{
    exponential_buckets, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

use super::names::*;

/// Creates metrics and registers them in one registry.
pub(super) struct Registrar<'a> {
    registry: &'a Registry,
}

impl<'a> Registrar<'a> {
    /// Registers in `registry`.
    pub(super) fn new(registry: &'a Registry) -> Registrar<'a> {
        Registrar { registry }
    }

    fn reg<T: prometheus::core::Collector + Clone + 'static>(&self, m: T) -> T {
        self.registry
            .register(Box::new(m.clone()))
            .expect("metric names are unique and valid");
        m
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.reg(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.reg(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.reg(IntGauge::with_opts(Opts::new(name, help)).expect("valid metric"))
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.reg(IntCounter::with_opts(Opts::new(name, help)).expect("valid metric"))
    }
}

/// The relay's state and its events.
pub(super) struct Relay {
    pub(super) build_info: IntGaugeVec,
    pub(super) mode_gauge: IntGaugeVec,
    pub(super) ready: IntGauge,
    pub(super) standby: IntGauge,
    pub(super) events_read: IntCounterVec,
    pub(super) events_published: IntCounterVec,
    pub(super) events_failed: IntCounterVec,
    pub(super) events_dead_lettered: IntCounterVec,
    pub(super) kafka_in_flight: IntGauge,
    pub(super) kafka_ack_latency: Histogram,
    pub(super) event_latency: HistogramVec,
    pub(super) batch_size: HistogramVec,
}

impl Relay {
    /// Creates and registers the group.
    pub(super) fn register(r: &Registrar<'_>) -> Relay {
        Relay {
            build_info: r.gauge_vec(
                BUILD_INFO,
                "Always 1: the build's version and git revision",
                &["version", "revision"],
            ),
            mode_gauge: r.gauge_vec(MODE, "1 for the mode this relay runs in", &["mode"]),
            ready: r.gauge(READY, "1 when /readyz answers 200, else 0"),
            standby: r.gauge(
                STANDBY,
                "1 while waiting on the serving lock (another relay serves the table)",
            ),
            events_read: r.counter_vec(
                EVENTS_READ,
                "Outbox events read: decoded from WAL (cdc) or claimed (poll)",
                &["mode"],
            ),
            events_published: r.counter_vec(
                EVENTS_PUBLISHED,
                "Events acknowledged by Kafka",
                &["mode", "topic"],
            ),
            events_failed: r.counter_vec(
                EVENTS_FAILED,
                "Sends that failed with a retriable error",
                &["mode", "topic"],
            ),
            events_dead_lettered: r.counter_vec(
                EVENTS_DEAD_LETTERED,
                "Events dead-lettered (never publishable, or out of attempts)",
                &["mode", "topic"],
            ),
            kafka_in_flight: r.gauge(
                KAFKA_IN_FLIGHT,
                "Events handed to the Kafka producer and not yet acknowledged or failed",
            ),
            kafka_ack_latency: r.reg(
                Histogram::with_opts(
                    HistogramOpts::new(
                        KAFKA_ACK_LATENCY,
                        "Time from handing an event to the producer to Kafka's acknowledgement",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0, 60.0, 120.0, 300.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            // 0.5 ms to ~10 min in steps of 1.5×: fine enough for a p99 of
            // tens of milliseconds, wide enough for a catch-up.
            event_latency: r.reg(
                HistogramVec::new(
                    HistogramOpts::new(
                        EVENT_LATENCY,
                        "Time from an event's PostgreSQL commit until the server sent it (stage sent), the relay read it (stage read) and Kafka had it for consumers (stage delivered)",
                    )
                    .buckets(exponential_buckets(0.0005, 1.5, 35).expect("valid buckets")),
                    &["stage"],
                )
                .expect("valid metric"),
            ),
            batch_size: r.reg(
                HistogramVec::new(
                    HistogramOpts::new(BATCH_SIZE, "Items per batch")
                        .buckets(exponential_buckets(1.0, 2.0, 18).expect("valid buckets")),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
        }
    }
}

/// WAL positions (CDC) and the replication slot (sampled).
pub(super) struct Wal {
    pub(super) received_lsn: IntGauge,
    pub(super) flushed_lsn: IntGauge,
    pub(super) server_lsn: IntGauge,
    pub(super) replication_lag: IntGauge,
    pub(super) slot_retained_wal: IntGaugeVec,
    pub(super) slot_wal_status: IntGaugeVec,
    pub(super) slot_safe_wal_size: IntGaugeVec,
    pub(super) slot_retention_warning: IntGaugeVec,
    pub(super) slot_recoveries: IntCounterVec,
    pub(super) slot_failover: IntGaugeVec,
    pub(super) slot_standby_synced: IntGaugeVec,
}

impl Wal {
    /// Creates and registers the group.
    pub(super) fn register(r: &Registrar<'_>) -> Wal {
        Wal {
            received_lsn: r.gauge(
                RECEIVED_LSN,
                "Last WAL position received from the replication stream (bytes)",
            ),
            flushed_lsn: r.gauge(
                FLUSHED_LSN,
                "Last WAL position confirmed to PostgreSQL as flushed (bytes)",
            ),
            server_lsn: r.gauge(
                SERVER_LSN,
                "The server's WAL end, from the stream and the sampler (bytes)",
            ),
            replication_lag: r.gauge(
                REPLICATION_LAG,
                "Server WAL end minus the confirmed (flushed) position, in bytes",
            ),
            slot_retained_wal: r.gauge_vec(
                SLOT_RETAINED_WAL,
                "WAL the replication slot keeps: pg_current_wal_lsn() - restart_lsn (sampled)",
                &["slot"],
            ),
            slot_wal_status: r.gauge_vec(
                SLOT_WAL_STATUS,
                "1 for the slot's current wal_status (sampled)",
                &["slot", "status"],
            ),
            slot_safe_wal_size: r.gauge_vec(
                SLOT_SAFE_WAL_SIZE,
                "pg_replication_slots.safe_wal_size; -1 when max_slot_wal_keep_size is unlimited",
                &["slot"],
            ),
            slot_retention_warning: r.gauge_vec(
                SLOT_RETENTION_WARNING,
                "1 while the slot's retained WAL is above the configured warning threshold",
                &["slot"],
            ),
            slot_recoveries: r.counter_vec(
                SLOT_RECOVERIES,
                "Lost replication slots the relay recreated, backfilling the rows not yet COMPLETED",
                &["slot"],
            ),
            slot_failover: r.gauge_vec(
                SLOT_FAILOVER,
                "1 when the replication slot is a failover slot (PostgreSQL 17+, sampled)",
                &["slot"],
            ),
            slot_standby_synced: r.gauge_vec(
                SLOT_STANDBY_SYNCED,
                "1 when a standby of DATABASE_URL holds a synced, valid copy of the failover slot (sampled every minute)",
                &["slot", "standby"],
            ),
        }
    }
}

/// The sampled outbox rows, the poll counters and the session counters.
pub(super) struct Rows {
    pub(super) outbox_rows: IntGaugeVec,
    pub(super) oldest_pending_age: Gauge,
    pub(super) poll_claims: IntCounter,
    pub(super) poll_stale_completions: IntCounter,
    pub(super) poll_reaped: IntCounter,
    pub(super) poll_leases_lost: IntCounter,
    pub(super) reconnects: IntCounterVec,
    pub(super) sample_errors: IntCounter,
    pub(super) messages_ignored: IntCounter,
    pub(super) health_level: IntGauge,
    pub(super) health_check_level: IntGaugeVec,
    pub(super) dead_letters_recent: IntGauge,
}

impl Rows {
    /// Creates and registers the group.
    pub(super) fn register(r: &Registrar<'_>) -> Rows {
        Rows {
            outbox_rows: r.gauge_vec(OUTBOX_ROWS, "Outbox rows by status (sampled)", &["status"]),
            oldest_pending_age: r.reg(
                Gauge::with_opts(Opts::new(
                    OLDEST_PENDING_AGE,
                    "Age of the oldest PENDING row in seconds, 0 when none (sampled)",
                ))
                .expect("valid metric"),
            ),
            poll_claims: r.counter(POLL_CLAIMS, "Claim statements that returned rows"),
            poll_stale_completions: r.counter(
                POLL_STALE_COMPLETIONS,
                "Completions that touched no row because the lease had expired",
            ),
            poll_reaped: r.counter(
                POLL_REAPED,
                "Rows whose lease expired that the reaper returned to PENDING",
            ),
            poll_leases_lost: r.counter(
                POLL_LEASES_LOST,
                "Rows whose lease renewal found them no longer held",
            ),
            reconnects: r.counter_vec(
                RECONNECTS,
                "Sessions restarted after a transient failure",
                &["mode"],
            ),
            sample_errors: r.counter(SAMPLE_ERRORS, "Sampler queries that failed"),
            messages_ignored: r.counter(
                MESSAGES_IGNORED,
                "Logical messages with an outbox-like prefix that were not relayed",
            ),
            health_level: r.gauge(
                HEALTH_LEVEL,
                "The outbox's condition from the [health] thresholds: 0 healthy, 1 degraded, 2 unhealthy (sampled)",
            ),
            health_check_level: r.gauge_vec(
                HEALTH_CHECK_LEVEL,
                "Each health check's level: 0 healthy, 1 degraded, 2 unhealthy (sampled)",
                &["check"],
            ),
            dead_letters_recent: r.gauge(
                DEAD_LETTERS_RECENT,
                "Rows dead-lettered within health.dead_letter_window_s (sampled)",
            ),
        }
    }
}

/// Exactly-once delivery: Kafka transactions and what they skipped.
pub struct Transactions {
    /// [`KAFKA_TRANSACTIONS`].
    pub transactions: IntCounterVec,
    /// [`KAFKA_TRANSACTION_EVENTS`].
    pub events: Histogram,
    /// [`KAFKA_COMMIT_LATENCY`].
    pub commit_latency: Histogram,
    /// [`KAFKA_COMMITTED_LSN`].
    pub committed_lsn: IntGauge,
    /// [`KAFKA_FENCED`].
    pub fenced: IntCounter,
    /// [`EVENTS_SKIPPED`].
    pub skipped: IntCounter,
}

impl Transactions {
    /// Creates and registers the group.
    pub(super) fn register(r: &Registrar<'_>) -> Transactions {
        Transactions {
            transactions: r.counter_vec(
                KAFKA_TRANSACTIONS,
                "Kafka transactions by outcome (exactly-once delivery)",
                &["outcome"],
            ),
            events: r.reg(
                Histogram::with_opts(
                    HistogramOpts::new(
                        KAFKA_TRANSACTION_EVENTS,
                        "Events per committed Kafka transaction",
                    )
                    .buckets(exponential_buckets(1.0, 4.0, 10).expect("valid buckets")),
                )
                .expect("valid metric"),
            ),
            commit_latency: r.reg(
                Histogram::with_opts(
                    HistogramOpts::new(
                        KAFKA_COMMIT_LATENCY,
                        "Time commit_transaction took (flushing the transaction's records and committing it)",
                    )
                    // 0.5 ms to ~64 s in steps of 1.5×: a commit's p99 is
                    // tens of milliseconds.
                    .buckets(exponential_buckets(0.0005, 1.5, 30).expect("valid buckets")),
                )
                .expect("valid metric"),
            ),
            committed_lsn: r.gauge(
                KAFKA_COMMITTED_LSN,
                "Commit LSN of the last stream position recorded by a committed Kafka transaction",
            ),
            fenced: r.counter(
                KAFKA_FENCED,
                "Times this relay's transactional producer was fenced by another relay",
            ),
            skipped: r.counter(
                EVENTS_SKIPPED,
                "Replayed events not sent again because a committed Kafka transaction holds them",
            ),
        }
    }
}
