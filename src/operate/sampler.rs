//! The sampler: every `[metrics] sample_interval_s`, a few cheap queries on
//! a connection of its own (application name `pgoutbox-metrics`, statement
//! timeout of at most 10 s):
//!
//! - the replication slot (when it exists, in either mode: a slot left
//!   behind while polling keeps WAL too): retained WAL
//!   (`pg_current_wal_lsn() - restart_lsn`), `wal_status`, `safe_wal_size`,
//!   and the retention warning (see [`retention_warning`]); in CDC also the
//!   server's WAL end, so the lag stays current while the stream is idle;
//! - rows by status (`PENDING`, `PROCESSING`, `DEAD_LETTER`), each a
//!   `count(*)` matching one of the migrations' partial indexes, and the
//!   oldest pending row's age (the first entry of the pending index).
//!   Each count reads its partial index: the cost grows with the rows in
//!   that status, not with the table (docs/metrics.md). Rows the delivery
//!   journal lists are delivered, so the pending count and age leave them
//!   out, at a cost bounded by the journal's size
//!   ([`Journal::pending_count_sql`], [`Journal::oldest_pending_sql`]).
//!
//! The connection runs without parallel workers or JIT: a sample never
//! takes more than one core from the database it watches.
//!
//! A failed query is counted in `pgoutbox_sample_errors_total` and logged
//! at debug level; the sampler never stops the relay.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::overview::PendingSql;
use crate::config::{quote_ident, Config, Mode};
use crate::metrics::condition::{self, Level, Measures};
use crate::metrics::{metrics, WAL_STATUSES};
use crate::outbox::journal::Journal;
use crate::Lsn;

/// The share of `max_slot_wal_keep_size` (or, when that is -1, the byte
/// count) above which the slot's retained WAL is worth a warning.
pub fn retention_threshold(max_slot_wal_keep_bytes: i64, ratio: f64, warn_bytes: u64) -> u64 {
    if max_slot_wal_keep_bytes < 0 {
        warn_bytes
    } else {
        (max_slot_wal_keep_bytes as f64 * ratio) as u64
    }
}

/// Whether the slot is in danger: it retains more than `threshold` bytes,
/// or PostgreSQL already says its WAL is `unreserved` (removed at the next
/// checkpoint) or `lost`.
pub fn retention_warning(retained: Option<i64>, wal_status: Option<&str>, threshold: u64) -> bool {
    matches!(wal_status, Some("unreserved" | "lost"))
        || retained.is_some_and(|r| r > 0 && r as u64 > threshold)
}

/// Remembers whether the warning is raised, so that it is logged once per
/// crossing rather than at every sample.
#[derive(Debug, Default)]
pub struct RetentionAlarm {
    raised: bool,
}

impl RetentionAlarm {
    /// The new state when it changed.
    pub fn update(&mut self, warning: bool) -> Option<bool> {
        if warning == self.raised {
            return None;
        }
        self.raised = warning;
        Some(warning)
    }
}

/// One sample of the slot.
#[derive(Debug)]
struct SlotSample {
    wal_end: i64,
    max_keep_bytes: i64,
    exists: bool,
    retained: Option<i64>,
    wal_status: Option<String>,
    safe_wal_size: Option<i64>,
    /// PostgreSQL 17+: a failover slot (`None` before 17).
    failover: Option<bool>,
    /// The server's WAL end minus the slot's confirmed position.
    lag: Option<i64>,
}

const SLOT_SQL: &str = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8, \
        (SELECT CASE WHEN setting::int8 < 0 THEN -1 ELSE pg_size_bytes(setting || coalesce(unit, '')) END \
           FROM pg_settings WHERE name = 'max_slot_wal_keep_size'), \
        s.slot_name IS NOT NULL, \
        (pg_current_wal_lsn() - s.restart_lsn)::int8, s.wal_status, s.safe_wal_size, \
        (to_jsonb(s) ->> 'failover')::bool, \
        (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8 \
   FROM (SELECT 1) AS one LEFT JOIN pg_replication_slots AS s ON s.slot_name = $1";

/// The row-count statement for `schema.table` (the pending rows' subqueries
/// are `pgoutbox status`'s, [`PendingSql`]); `journal`: whether the schema
/// has a usable delivery journal, whose rows are delivered, not pending.
fn rows_sql(config: &Config, journal: bool) -> String {
    let (schema, table) = (&config.outbox.schema, &config.outbox.table);
    let t = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let journal = journal.then(|| Journal::new(schema, table));
    let pending = PendingSql::new(&t, journal.as_ref());
    format!(
        "SELECT {}, \
                (SELECT count(*) FROM {t} WHERE status = 'PROCESSING'), \
                (SELECT count(*) FROM {t} WHERE status = 'DEAD_LETTER'), \
                coalesce(extract(epoch FROM now() - {}), 0)::float8",
        pending.count, pending.oldest
    )
}

/// Samples until `shutdown` turns true.
pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_secs(config.metrics.sample_interval_s);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut rows = rows_sql(&config, false);
    let mut pg = match crate::database::settings(&config) {
        Ok(pg) => pg,
        Err(e) => {
            // Validated before the relay started; never expected.
            tracing::warn!(error = %e, "metrics sampler not started");
            return;
        }
    };
    pg.pg_mut().application_name("pgoutbox-metrics");
    let mut client: Option<tokio_postgres::Client> = None;
    let mut alarm = RetentionAlarm::default();
    // Whether the table says which rows wait (known once connected).
    let mut tracks_rows: Option<bool> = None;
    let mut dead_letters_sql: Option<String> = None;
    let mut standbys_asked: Option<Instant> = None;
    let mut leases_warned: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match connect(&pg, every).await {
                Ok(c) => Some(c),
                Err(e) => {
                    failed("connecting", &e);
                    continue;
                }
            };
        }
        let Some(c) = &client else { continue };
        let mut measures = Measures::default();
        match sample_slot(c, &config.cdc.slot).await {
            Ok(s) => {
                record_slot(&config, &s, &mut alarm);
                measures.slot_lag_bytes = s.lag;
                if s.failover == Some(true)
                    && standbys_asked.is_none_or(|t| t.elapsed() >= STANDBY_EVERY)
                {
                    standbys_asked = Some(Instant::now());
                    sample_standbys(&pg, &config.cdc.slot);
                }
            }
            Err(e) => failed("reading the replication slot", &e),
        }
        if tracks_rows.is_none() {
            match crate::outbox::TableShape::inspect(c, &config.outbox.schema, &config.outbox.table)
                .await
            {
                Ok(shape) => {
                    tracks_rows = Some(shape.as_ref().is_some_and(super::overview::tracks_rows));
                    match crate::outbox::journal::usable(c, &config.outbox.schema).await {
                        Ok(journal) => rows = rows_sql(&config, journal),
                        Err(e) => failed("looking for the delivery journal", &e),
                    }
                    dead_letters_sql = shape
                        .is_some_and(|s| s.type_of("processed_at").is_some())
                        .then(|| {
                            super::overview::recent_dead_letters_sql(
                                &format!(
                                    "{}.{}",
                                    quote_ident(&config.outbox.schema),
                                    quote_ident(&config.outbox.table)
                                ),
                                config.health.dead_letter_window_s,
                            )
                        });
                }
                Err(e) => failed("reading the outbox table's columns", &e),
            }
        }
        if tracks_rows != Some(true) {
            // No status column (an adopted table): no row gauges.
            judge(&config, &measures);
            continue;
        }
        match c.query_one(&rows, &[]).await {
            Ok(r) => {
                let m = metrics();
                for (i, status) in crate::metrics::ROW_STATUSES.iter().enumerate() {
                    m.outbox_rows
                        .with_label_values(&[status])
                        .set(r.get::<_, i64>(i));
                }
                let age = r.get::<_, f64>(3).max(0.0);
                m.oldest_pending_age.set(age);
                // Without marks every row stays PENDING: the age says nothing.
                measures.oldest_pending_s = config.outbox.mark_completed.then_some(age);
            }
            Err(e) => failed("counting outbox rows", &e),
        }
        if let Some(sql) = &dead_letters_sql {
            match c.query_one(sql, &[]).await {
                Ok(r) => {
                    let n: i64 = r.get(0);
                    metrics().dead_letters_recent.set(n);
                    measures.recent_dead_letters = Some(n);
                }
                Err(e) => failed("counting recent dead letters", &e),
            }
        }
        judge(&config, &measures);
        // While streaming, another poller on the table (the polling
        // framework's worker started again after the switch) sends what
        // CDC sends too. Poll mode's reaper says the same for poll mode.
        if metrics().mode() == Some(crate::config::Mode::Cdc)
            && crate::metrics::health::health().phase() == crate::metrics::health::Phase::Serving
            && leases_warned.is_none_or(|t| t.elapsed() >= FOREIGN_LEASE_WARNING)
        {
            if let Ok(Some(held)) =
                crate::outbox::lease::foreign_leases(c, &config.outbox.schema, &config.outbox.table)
                    .await
            {
                leases_warned = Some(Instant::now());
                tracing::warn!(
                    rows = held.rows,
                    until = %held.until,
                    "rows are held under live leases by another poller while CDC streams this table (the polling framework's worker running again?): it sends what CDC sends, so consumers see duplicates; stop it (docs/migrating-from-polling.md)"
                );
            }
        }
    }
}

/// Judges the outbox's condition from this sample: `/health`, the
/// `pgoutbox_health_*` gauges, and a log line when the level changes.
fn judge(config: &Config, measures: &Measures) {
    let condition = condition::judge(&config.health, measures);
    let m = metrics();
    m.health_level.set(condition.level.gauge());
    for check in condition::CHECKS {
        m.health_check_level
            .with_label_values(&[check])
            .set(condition.level_of(check).gauge());
    }
    let before = condition::latest().map(|c| c.level);
    if before.is_some_and(|b| b != condition.level)
        || (before.is_none() && condition.level != Level::Healthy)
    {
        match condition.level {
            Level::Healthy => tracing::info!(health = %condition, "the outbox is healthy again"),
            _ => {
                tracing::warn!(health = %condition, "outbox health changed (thresholds: [health])")
            }
        }
    }
    condition::record(condition);
}

/// How often the warning about another poller's leases may repeat.
const FOREIGN_LEASE_WARNING: Duration = Duration::from_secs(60);

/// How often the standbys of the host list are asked for their copy of a
/// failover slot (a connection to each).
const STANDBY_EVERY: Duration = Duration::from_secs(60);

/// Asks the standbys, in the background (one that does not answer must not
/// hold up the sampling), and sets `pgoutbox_slot_standby_synced`.
fn sample_standbys(pg: &crate::database::Settings, slot: &str) {
    if crate::database::each_host(pg).is_empty() {
        return;
    }
    let (pg, slot) = (pg.clone(), slot.to_owned());
    tokio::spawn(async move {
        let m = metrics();
        for copy in crate::database::standby::copies(&pg, &slot).await {
            m.slot_standby_synced
                .with_label_values(&[slot.as_str(), copy.host.as_str()])
                .set(i64::from(copy.usable()));
        }
    });
}

fn failed(doing: &str, e: &tokio_postgres::Error) {
    metrics().sample_errors.inc();
    tracing::debug!(error = %crate::error::postgres_text(e), "metrics sampler: {doing} failed");
}

async fn connect(
    pg: &crate::database::Settings,
    every: Duration,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let client = crate::database::connect(pg).await?;
    let timeout_ms = every.min(Duration::from_secs(10)).as_millis();
    // A sample is a background chore: one core at most, and no JIT
    // compilation for statements that run once per interval.
    client
        .batch_execute(&format!(
            "SET statement_timeout = {timeout_ms}; SET max_parallel_workers_per_gather = 0; SET jit = off"
        ))
        .await?;
    Ok(client)
}

async fn sample_slot(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<SlotSample, tokio_postgres::Error> {
    let r = client.query_one(SLOT_SQL, &[&slot]).await?;
    Ok(SlotSample {
        wal_end: r.get(0),
        max_keep_bytes: r.get::<_, Option<i64>>(1).unwrap_or(-1),
        exists: r.get(2),
        retained: r.get(3),
        wal_status: r.get(4),
        safe_wal_size: r.get(5),
        failover: r.get(6),
        lag: r.get(7),
    })
}

fn record_slot(config: &Config, s: &SlotSample, alarm: &mut RetentionAlarm) {
    let m = metrics();
    if metrics().mode() == Some(Mode::Cdc) {
        m.server_lsn(Lsn::from_position(s.wal_end));
    }
    let slot = config.cdc.slot.as_str();
    if !s.exists {
        // Gone (or never created, in poll mode): no stale series.
        let _ = m.slot_retained_wal.remove_label_values(&[slot]);
        let _ = m.slot_safe_wal_size.remove_label_values(&[slot]);
        let _ = m.slot_retention_warning.remove_label_values(&[slot]);
        let _ = m.slot_failover.remove_label_values(&[slot]);
        for status in WAL_STATUSES {
            let _ = m.slot_wal_status.remove_label_values(&[slot, status]);
        }
        alarm.update(false);
        return;
    }
    m.slot_retained_wal
        .with_label_values(&[slot])
        .set(s.retained.unwrap_or(0));
    for status in WAL_STATUSES {
        m.slot_wal_status
            .with_label_values(&[slot, status])
            .set(i64::from(s.wal_status.as_deref() == Some(status)));
    }
    m.slot_safe_wal_size
        .with_label_values(&[slot])
        .set(s.safe_wal_size.unwrap_or(-1));
    if let Some(failover) = s.failover {
        m.slot_failover
            .with_label_values(&[slot])
            .set(i64::from(failover));
    }
    let cfg = &config.metrics;
    let threshold = retention_threshold(
        s.max_keep_bytes,
        cfg.slot_wal_warn_ratio,
        cfg.slot_wal_warn_bytes,
    );
    let warning = retention_warning(s.retained, s.wal_status.as_deref(), threshold);
    m.slot_retention_warning
        .with_label_values(&[slot])
        .set(i64::from(warning));
    let limit = if s.max_keep_bytes < 0 {
        format!(
            "max_slot_wal_keep_size is -1 (unlimited); warning above metrics.slot_wal_warn_bytes = {}",
            bytes(cfg.slot_wal_warn_bytes as i64)
        )
    } else {
        format!(
            "max_slot_wal_keep_size = {}; warning above {} of it ({})",
            bytes(s.max_keep_bytes),
            cfg.slot_wal_warn_ratio,
            bytes(threshold as i64)
        )
    };
    match alarm.update(warning) {
        Some(true) => tracing::warn!(
            slot,
            retained = %bytes(s.retained.unwrap_or(0)),
            wal_status = s.wal_status.as_deref().unwrap_or("unknown"),
            safe_wal_size = s.safe_wal_size.unwrap_or(-1),
            limit = %limit,
            "slot WAL retention warning: the replication slot retains WAL close to the limit; \
             PostgreSQL invalidates the slot when it passes max_slot_wal_keep_size (an invalidated \
             slot is a lost slot). Check that the relay is streaming and Kafka accepts events"
        ),
        Some(false) => tracing::info!(
            slot,
            retained = %bytes(s.retained.unwrap_or(0)),
            limit = %limit,
            "slot WAL retention back below the warning threshold"
        ),
        None => {}
    }
}

/// `1.5 GiB`, `512.0 MiB`, `42 B` (also `pgoutbox status`).
pub(crate) fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: i64 = 1 << 30;

    #[test]
    fn the_threshold_is_a_share_of_the_limit_or_the_byte_count_when_unlimited() {
        assert_eq!(retention_threshold(10 * GIB, 0.8, 1), (8 * GIB) as u64);
        assert_eq!(retention_threshold(-1, 0.8, 5 * GIB as u64), 5 * GIB as u64);
        assert_eq!(retention_threshold(0, 0.8, 5), 0);
        assert_eq!(retention_threshold(1000, 1.0, 5), 1000);
    }

    #[test]
    fn warning_above_the_threshold_or_when_postgres_says_unreserved_or_lost() {
        let t = retention_threshold(10 * GIB, 0.8, 0);
        assert!(!retention_warning(Some(8 * GIB), Some("reserved"), t));
        assert!(retention_warning(Some(8 * GIB + 1), Some("extended"), t));
        assert!(!retention_warning(None, Some("reserved"), t));
        assert!(retention_warning(Some(0), Some("unreserved"), t));
        assert!(retention_warning(None, Some("lost"), t));
        // Unlimited: the byte count decides.
        let t = retention_threshold(-1, 0.8, 1 << 20);
        assert!(!retention_warning(Some(1 << 20), Some("reserved"), t));
        assert!(retention_warning(Some((1 << 20) + 1), Some("reserved"), t));
    }

    #[test]
    fn the_alarm_reports_each_crossing_once() {
        let mut a = RetentionAlarm::default();
        assert_eq!(a.update(false), None);
        assert_eq!(a.update(true), Some(true));
        assert_eq!(a.update(true), None);
        assert_eq!(a.update(true), None);
        assert_eq!(a.update(false), Some(false));
        assert_eq!(a.update(false), None);
        assert_eq!(a.update(true), Some(true));
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(42), "42 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(10 * GIB), "10.0 GiB");
    }
}
