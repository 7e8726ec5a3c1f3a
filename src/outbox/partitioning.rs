//! The outbox table's partitions ahead of time: the relay creates the
//! partitions the coming weeks need through the SECURITY DEFINER function
//! `pgoutbox_ensure_partitions` (migration 10), at start and on a timer.
//! Archiving and retiring old partitions is an operator's command
//! (`crate::operate::partitions`).

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::{quote_ident, Config};
use crate::error::postgres_text;

/// `"schema"."table"` of the configured outbox.
pub fn parent(config: &Config) -> String {
    format!(
        "{}.{}",
        quote_ident(&config.outbox.schema),
        quote_ident(&config.outbox.table)
    )
}

/// Creates the partitions ahead through the relay's SECURITY DEFINER
/// function, on the server's clock, in the configured interval. Returns how
/// many were created (0 for a table that is not partitioned, such as an
/// adopted one: nothing to do).
pub async fn ensure_ahead(client: &Client, config: &Config) -> Result<i32, tokio_postgres::Error> {
    let partitioned = client
        .query_one(
            "SELECT coalesce((SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)), false)",
            &[&parent(config)],
        )
        .await?
        .get::<_, bool>(0);
    if !partitioned {
        return Ok(0);
    }
    let sql = format!(
        "SELECT {}.pgoutbox_ensure_partitions($1::text::regclass, $2, $3)",
        quote_ident(&config.outbox.schema)
    );
    let ahead = config.partitions.ahead as i32;
    let step = config.partitions.interval.as_str();
    let row = client
        .query_one(&sql, &[&parent(config), &ahead, &step])
        .await?;
    Ok(row.get(0))
}

/// Aborts the task when dropped.
pub struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the relay's create-ahead task (every
/// `partitions.maintain_interval_s`; `None` when that is 0). It only ever
/// creates partitions, as the relay's role, through
/// `pgoutbox_ensure_partitions`; failures are logged and retried at the next
/// tick. It ends when `shutdown` turns true or the guard is dropped.
pub fn spawn_create_ahead(
    config: &Config,
    mut shutdown: watch::Receiver<bool>,
) -> Option<TaskGuard> {
    let period = config.partitions.maintain_interval()?;
    let pg = crate::database::settings(config).ok()?;
    let config = config.clone();
    Some(TaskGuard(tokio::spawn(async move {
        let start = tokio::time::Instant::now() + period;
        let mut ticks = tokio::time::interval_at(start, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            let outcome = match crate::database::connect(&pg).await {
                Ok(client) => ensure_ahead(&client, &config).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(0) => tracing::debug!("outbox partitions ahead: nothing to create"),
                Ok(created) => tracing::info!(created, "created outbox partitions ahead"),
                Err(e) => tracing::warn!(
                    error = %postgres_text(&e),
                    "could not ensure outbox partitions ahead; retrying at the next tick"
                ),
            }
        }
    })))
}
