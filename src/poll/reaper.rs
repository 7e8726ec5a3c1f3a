//! The reaper: every lease/2, rows whose lease expired go back to
//! `PENDING` (or to `DEAD_LETTER` when they used their attempts, so a row
//! that kills every worker taking it still ends). One statement, safe with
//! any number of relays running it at once. Each run also looks for rows
//! another poller holds under live leases (`crate::outbox::lease`) and
//! warns, at most once a minute, while there are any.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::Stats;
use crate::config::Mode;
use crate::metrics::metrics;
use crate::outbox::journal::{self, Journal};
use crate::outbox::OutboxEvent;
use crate::pipeline::RecordBuilder;

/// The reaper's period for a lease of `lease_seconds`.
pub fn period(lease_seconds: u32) -> Duration {
    (Duration::from_secs(u64::from(lease_seconds)) / 2).max(Duration::from_millis(500))
}

/// The topic a row of `table` with these types is published to (`""` when
/// none can be rendered), for the metrics' `topic` label.
fn topic_of(
    builder: &RecordBuilder,
    table: &str,
    aggregate_type: &str,
    event_type: &str,
) -> String {
    let event = OutboxEvent {
        table: Bytes::copy_from_slice(table.as_bytes()),
        aggregate_type: Bytes::copy_from_slice(aggregate_type.as_bytes()),
        event_type: Bytes::copy_from_slice(event_type.as_bytes()),
        id: Bytes::new(),
        created_at: Bytes::new(),
        tracking_id: Bytes::new(),
        aggregate_id: Bytes::new(),
        payload: Bytes::new(),
        payload_null: false,
        metadata: None,
        additional: Vec::new(),
    };
    builder.topic(&event).unwrap_or_default()
}

/// What the reaper needs besides its statement.
pub(super) struct Reaper {
    pub pg: crate::database::Settings,
    pub sql: String,
    pub every: Duration,
    pub stats: Arc<Stats>,
    /// For the topic label of rows it dead-letters.
    pub builder: RecordBuilder,
    /// The outbox table's name.
    pub table: String,
    /// The outbox table's schema.
    pub schema: String,
}

/// How often the warning about another poller's leases may repeat.
const FOREIGN_LEASE_WARNING: Duration = Duration::from_secs(60);

/// Runs the reaper until shutdown. Database errors are logged and retried
/// at the next period.
pub(super) async fn run(reaper: Reaper, mut shutdown: watch::Receiver<bool>) {
    let Reaper {
        pg,
        sql,
        every,
        stats,
        builder,
        table,
        schema,
    } = reaper;
    let mut warned: Option<tokio::time::Instant> = None;
    let mut client: Option<tokio_postgres::Client> = None;
    // The delivery journal, once this connection found it usable (asked
    // each round until then: a schema may be migrated while polling).
    let mut journal: Option<Journal> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = crate::database::connect(&pg).await.ok();
            journal = None;
        }
        let Some(c) = &client else { continue };
        match c.query_one(&sql, &[]).await {
            Ok(row) => {
                let pending: i64 = row.get(0);
                let dead_types: Vec<String> = row.get(1);
                let dead_events: Vec<String> = row.get(2);
                let dead = dead_types.len() as i64;
                for (a, e) in dead_types.iter().zip(&dead_events) {
                    metrics().dead_lettered(Mode::Poll, &topic_of(&builder, &table, a, e), 1);
                }
                if pending + dead > 0 {
                    stats.reaped.fetch_add(pending as u64, Relaxed);
                    metrics().poll_reaped.inc_by(pending as u64);
                    stats.dead_lettered.fetch_add(dead as u64, Relaxed);
                    tracing::warn!(
                        returned = pending,
                        dead_lettered = dead,
                        "reaper: leases expired (a worker stopped or stalled); rows returned"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::postgres_text(&e), "reaper run failed; retrying");
                client = None;
                continue;
            }
        }
        // Deliveries a CDC relay journaled while it was losing the serving
        // lock: folded, so no worker claims them again.
        if journal.is_none() {
            journal = match journal::usable(c, &schema).await {
                Ok(true) => Some(Journal::new(&schema, &table)),
                Ok(false) => None,
                Err(e) => {
                    tracing::warn!(error = %crate::error::postgres_text(&e), "looking for the delivery journal failed; retrying");
                    None
                }
            };
        }
        let folded = match &journal {
            Some(j) => j.fold_all(c).await,
            None => Ok(0),
        };
        match folded {
            Ok(0) => {}
            Ok(rows) => tracing::info!(rows, "folded late delivery journal entries of a CDC relay"),
            Err(e) => {
                tracing::warn!(error = %crate::error::postgres_text(&e), "folding the delivery journal failed; retrying");
                journal = None;
            }
        }
        if warned.is_some_and(|at| at.elapsed() < FOREIGN_LEASE_WARNING) {
            continue;
        }
        if let Ok(Some(held)) = crate::outbox::lease::foreign_leases(c, &schema, &table).await {
            warned = Some(tokio::time::Instant::now());
            tracing::warn!(
                rows = held.rows,
                until = %held.until,
                "rows are held under live leases by another poller (not pgoutbox: the polling framework's worker still running?); pgoutbox leaves them to it, but two pollers on one table split the work and lose event order: stop it (docs/migrating-from-polling.md)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_lettered_rows_are_counted_under_their_topic() {
        let cfg = crate::config::KafkaConfig {
            topic: "{aggregate_type}.{event_type}".into(),
            ..Default::default()
        };
        let builder =
            RecordBuilder::from_config(&cfg, &crate::config::ColumnMap::pgoutbox()).unwrap();
        assert_eq!(
            topic_of(&builder, "outbox", "Order", "Created"),
            "Order.Created"
        );
        assert_eq!(topic_of(&builder, "outbox", "Or der", "Created"), "");
    }

    #[test]
    fn the_reaper_runs_every_half_lease() {
        assert_eq!(period(30), Duration::from_secs(15));
        assert_eq!(period(3), Duration::from_millis(1500));
        // Never a busy loop, whatever the lease.
        assert_eq!(period(0), Duration::from_millis(500));
    }
}
