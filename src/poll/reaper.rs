//! The reaper: every lease/2, rows whose lease expired go back to
//! `PENDING` (or to `DEAD_LETTER` when they used their attempts, so a row
//! that kills every worker taking it still ends). One statement, safe with
//! any number of relays running it at once.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Stats;

/// The reaper's period for a lease of `lease_seconds`.
pub fn period(lease_seconds: u32) -> Duration {
    (Duration::from_secs(u64::from(lease_seconds)) / 2).max(Duration::from_millis(500))
}

/// Runs the reaper until shutdown. Database errors are logged and retried
/// at the next period.
pub(super) async fn run(
    pg: crate::database::Settings,
    sql: String,
    every: Duration,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = crate::database::connect(&pg).await.ok();
        }
        let Some(c) = &client else { continue };
        match c.query_one(&sql, &[]).await {
            Ok(row) => {
                let (pending, dead): (i64, i64) = (row.get(0), row.get(1));
                if pending + dead > 0 {
                    stats.reaped.fetch_add(pending as u64, Relaxed);
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
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reaper_runs_every_half_lease() {
        assert_eq!(period(30), Duration::from_secs(15));
        assert_eq!(period(3), Duration::from_millis(1500));
        // Never a busy loop, whatever the lease.
        assert_eq!(period(0), Duration::from_millis(500));
    }
}
