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

/// Who creates the outbox table's partitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Creator {
    /// The table is not partitioned.
    NotPartitioned,
    /// pgoutbox: the table `pgoutbox migrate` made, with its partition
    /// functions.
    Pgoutbox,
    /// pg_partman: its `part_config` lists the table.
    PgPartman,
    /// Someone else: a partitioned table pgoutbox did not make (adopted;
    /// the polling framework's, made by hand or by a script of its own).
    Other,
}

impl Creator {
    /// How `pgoutbox status` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Creator::NotPartitioned => "not partitioned",
            Creator::Pgoutbox => "pgoutbox",
            Creator::PgPartman => "pg_partman",
            Creator::Other => "outside pgoutbox",
        }
    }
}

/// Who creates the partitions of the configured outbox table. pgoutbox
/// does for a table `pgoutbox migrate` created (migration 1 recorded for
/// it; an adopted table is not, even with pgoutbox's functions in its
/// schema for another table); pg_partman's configuration wins over that (a
/// table pgoutbox made can be handed to pg_partman, docs/partitioning.md);
/// a `part_config` the role may not read counts as not listing the table.
pub async fn creator(client: &Client, config: &Config) -> Result<Creator, tokio_postgres::Error> {
    let schema = config.outbox.schema.as_str();
    let parent = parent(config);
    let row = client
        .query_one(
            "SELECT coalesce((SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)), false), \
                    to_regprocedure(format('%I.pgoutbox_ensure_partitions(regclass, int, text)', $2::text)) IS NOT NULL, \
                    (SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
                      WHERE e.extname = 'pg_partman')",
            &[&parent, &schema],
        )
        .await?;
    let (partitioned, functions, partman): (bool, bool, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    if !partitioned {
        return Ok(Creator::NotPartitioned);
    }
    if let Some(ns) = partman {
        let listed = client
            .query_opt(
                &format!(
                    "SELECT 1 FROM {}.part_config WHERE parent_table = (SELECT n.nspname || '.' || c.relname \
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1))",
                    quote_ident(&ns)
                ),
                &[&parent],
            )
            .await
            .ok()
            .flatten()
            .is_some();
        if listed {
            return Ok(Creator::PgPartman);
        }
    }
    Ok(
        if functions && partitions_are_pgoutbox(client, config).await? {
            Creator::Pgoutbox
        } else {
            Creator::Other
        },
    )
}

/// Whether pgoutbox made the configured table's partitions: `pgoutbox
/// migrate` created the table, or `pgoutbox partitions convert` made an
/// adopted one partitioned ([`super::convert::CONVERTED`] recorded).
async fn partitions_are_pgoutbox(
    client: &Client,
    config: &Config,
) -> Result<bool, tokio_postgres::Error> {
    if created_by_migrate(client, config).await? {
        return Ok(true);
    }
    Ok(client
        .query_opt(
            "SELECT 1 FROM public.pgoutbox_migrations WHERE target = $1 AND version = $2",
            &[
                &format!("{}.{}", config.outbox.schema, config.outbox.table),
                &super::convert::CONVERTED,
            ],
        )
        .await?
        .is_some())
}

/// Whether `pgoutbox migrate` created the configured table (migration 1
/// recorded for it), rather than `pgoutbox adopt` adopting it.
pub async fn created_by_migrate(
    client: &Client,
    config: &Config,
) -> Result<bool, tokio_postgres::Error> {
    let ledger: bool = client
        .query_one(
            "SELECT to_regclass('public.pgoutbox_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    Ok(ledger
        && client
            .query_opt(
                "SELECT 1 FROM public.pgoutbox_migrations WHERE target = $1 AND version = 1",
                &[&format!("{}.{}", config.outbox.schema, config.outbox.table)],
            )
            .await?
            .is_some())
}

/// Creates the partitions ahead through the relay's SECURITY DEFINER
/// function, on the server's clock, in the configured interval. Returns how
/// many were created: 0 unless pgoutbox creates this table's partitions
/// ([`creator`]) — a table that is not partitioned, or whose partitions
/// pg_partman or another scheme creates (the polling framework's, made in
/// its own time zone), is left alone, so no range ever overlaps theirs.
pub async fn ensure_ahead(client: &Client, config: &Config) -> Result<i32, tokio_postgres::Error> {
    if creator(client, config).await? != Creator::Pgoutbox {
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
