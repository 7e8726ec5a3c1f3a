//! Poll mode: for databases without logical replication. Workers claim
//! batches of due `PENDING` rows with `FOR UPDATE SKIP LOCKED` under a lease
//! (`PROCESSING`, `locked_until`, a fresh `lock_token`, the attempt counted
//! at claim time), publish them through the same router and idempotent
//! producer as CDC, and settle them with the token. A reaper returns rows
//! whose lease expired; a `LISTEN` connection wakes idle workers when the
//! optional insert trigger notifies.
//!
//! The statuses are the ones CDC leaves, so a table can move from polling to
//! CDC and back on a live system; [`crate::serving`] makes sure only one
//! mode serves it at a time.

mod reaper;
pub mod schema;
mod statements;
mod wakeup;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::config::{Config, Mode, PollOrdering};
use crate::error::Error;
use crate::metrics::health::Phase;
use crate::metrics::{health, metrics};
use crate::route::Router;
use crate::serving::ServingLock;
use crate::sink::Sink;

pub use reaper::period as reaper_period;
pub use statements::Statements;
pub use wakeup::channel as notify_channel;
pub use worker::retry_delay;

/// Counters of one poll relay, logged periodically.
#[derive(Debug, Default)]
pub struct Stats {
    /// Claim statements that returned rows.
    pub claims: AtomicU64,
    /// Rows claimed.
    pub claimed: AtomicU64,
    /// Rows acknowledged by Kafka.
    pub published: AtomicU64,
    /// Rows returned to `PENDING` after a failed send.
    pub retried: AtomicU64,
    /// Rows dead-lettered (permanent failure, attempts used, or reaped on
    /// their last attempt).
    pub dead_lettered: AtomicU64,
    /// Completions that touched no row: the lease had expired.
    pub stale_completions: AtomicU64,
    /// Rows whose lease renewal found them no longer held.
    pub leases_lost: AtomicU64,
    /// Rows the reaper returned to `PENDING`.
    pub reaped: AtomicU64,
}

/// Checks what only an operator can fix before polling.
async fn preflight(client: &tokio_postgres::Client, config: &Config) -> Result<(), Error> {
    crate::relay::check_migrations(client, config).await?;
    if config.poll.ordering == PollOrdering::Aggregate
        && !schema::has_ordering_index(client, config)
            .await
            .map_err(|e| Error::postgres("checking the ordering index", &e))?
    {
        return Err(Error::Fatal(format!(
            "poll.ordering = \"aggregate\" needs the index {}: run `pgoutbox migrate` with the same configuration",
            schema::ordering_index(config)
        )));
    }
    let slot = client
        .query_opt(
            "SELECT active, pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.cdc.slot],
        )
        .await;
    if let Ok(Some(row)) = slot {
        let retained: Option<String> = row.get(1);
        tracing::warn!(
            slot = %config.cdc.slot,
            retained = retained.as_deref().unwrap_or("unknown"),
            "the CDC replication slot still exists and keeps WAL while polling; drop it if CDC is not coming back soon (see docs/switching-modes.md)"
        );
    }
    Ok(())
}

/// Runs the poll relay until `shutdown` turns true or a definite error.
pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let pg = crate::database::settings(&config)?;
    let router = Router::from_config(&config.kafka)
        .map_err(|e| crate::config::ConfigError::new("kafka.topic", e.to_string()))?;
    let statements = Statements::new(&config);
    {
        let client = crate::database::connect(&pg).await.map_err(|e| {
            crate::relay::fatal_at_start(Error::postgres("connecting to PostgreSQL", &e))
        })?;
        preflight(&client, &config).await?;
        crate::relay::ensure_partitions(&client, &config).await;
        let adopted = client
            .execute(&statements.adopt_failed, &[])
            .await
            .map_err(|e| Error::postgres("adopting FAILED rows", &e))?;
        if adopted > 0 {
            tracing::info!(
                adopted,
                "rows left FAILED by an earlier poller are PENDING again"
            );
        }
    }
    if config.poll.concurrency > 1 && config.poll.ordering == PollOrdering::None {
        tracing::warn!(
            concurrency = config.poll.concurrency,
            "event order is NOT preserved with more than one worker (nor across retries); set poll.ordering = \"aggregate\" for per-aggregate order"
        );
    }
    tracing::info!(
        table = %format!("{}.{}", config.outbox.schema, config.outbox.table),
        workers = config.poll.concurrency,
        batch_size = config.outbox.batch_size,
        lease_seconds = config.outbox.lease_seconds,
        poll_interval_ms = config.outbox.poll_interval_ms,
        ordering = ?config.poll.ordering,
        topic = %router,
        brokers = %config.kafka.brokers,
        database = %config.database.url,
        "starting poll relay"
    );
    let stats = Arc::new(Stats::default());
    let mut backoff = Duration::from_millis(200);
    loop {
        health().set_phase(Phase::Connecting, "taking the serving lock");
        let mut lock = match ServingLock::acquire(&pg, &config, Mode::Poll, &mut shutdown).await {
            Ok(Some(lock)) => lock,
            Ok(None) => return Ok(()),
            Err(e @ (Error::Fatal(_) | Error::Config(_))) => return Err(e),
            Err(e) => {
                health().set_phase(Phase::Reconnecting, e.to_string());
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot take the serving lock; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let (mut sink, deliveries) =
            Sink::new(&config.kafka, Mode::Poll).map_err(|e| Error::Fatal(e.to_string()))?;
        sink.probe_cluster();
        let shared = Arc::new(worker::Shared {
            config: config.clone(),
            pg: pg.clone(),
            statements: statements.clone(),
            router: router.clone(),
            sink: Arc::new(sink),
            stats: stats.clone(),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let served_since = tokio::time::Instant::now();
        // Ready once a worker's claim succeeds too (see metrics::health).
        health().set_phase(Phase::Serving, "polling");
        let outcome = serve(&shared, deliveries, stop_rx, &mut lock, &mut shutdown).await;
        if served_since.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(200);
        }
        let _ = stop_tx.send(true);
        shared.sink.flush(Duration::from_secs(5));
        match outcome {
            Served::Shutdown => return Ok(()),
            Served::Failed(e @ (Error::Fatal(_) | Error::Config(_))) => return Err(e),
            Served::Failed(e) => {
                health().set_phase(Phase::Reconnecting, e.to_string());
                metrics().reconnects.with_label_values(&["poll"]).inc();
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "poll relay restarting");
            }
            Served::LockLost => {
                health().set_phase(
                    Phase::Reconnecting,
                    "the serving lock was lost (its connection ended)",
                );
                metrics().reconnects.with_label_values(&["poll"]).inc();
                tracing::warn!("the serving lock was lost (its connection ended); taking it again");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

enum Served {
    Shutdown,
    Failed(Error),
    LockLost,
}

/// Runs the workers, the reaper and the listener under the serving lock.
async fn serve(
    shared: &Arc<worker::Shared>,
    mut deliveries: mpsc::UnboundedReceiver<crate::sink::Delivery>,
    stop: watch::Receiver<bool>,
    lock: &mut ServingLock,
    shutdown: &mut watch::Receiver<bool>,
) -> Served {
    let config = &shared.config;
    // The workers see `stop` turn true on shutdown as well as on a lost lock.
    let (worker_stop_tx, worker_stop) = watch::channel(false);
    let (wake_tx, wake_rx) = watch::channel(0u64);
    let mut tasks = JoinSet::new();
    let mut routes = Vec::new();
    for index in 0..config.poll.concurrency {
        let (tx, rx) = mpsc::unbounded_channel();
        routes.push(tx);
        let w = worker::Worker {
            index,
            shared: shared.clone(),
            deliveries: rx,
            wake: wake_rx.clone(),
            shutdown: worker_stop.clone(),
        };
        tasks.spawn(w.run());
    }
    // Delivery reports to the worker that sent the record.
    tokio::spawn(async move {
        while let Some(d) = deliveries.recv().await {
            let index = (d.ticket >> worker::TICKET_BITS) as usize;
            if let Some(route) = routes.get(index) {
                let _ = route.send(d);
            }
        }
    });
    tokio::spawn(reaper::run(
        reaper::Reaper {
            pg: shared.pg.clone(),
            sql: shared.statements.reap.clone(),
            every: reaper::period(config.outbox.lease_seconds),
            stats: shared.stats.clone(),
            router: shared.router.clone(),
            table: config.outbox.table.clone(),
        },
        stop.clone(),
    ));
    tokio::spawn(wakeup::run(
        shared.pg.clone(),
        wakeup::channel(config),
        wake_tx,
        stop.clone(),
    ));
    let mut report = tokio::time::interval(Duration::from_secs(10));
    report.tick().await;
    let mut outcome: Option<Served> = None;
    loop {
        tokio::select! {
            joined = tasks.join_next() => {
                match joined {
                    None => return outcome.unwrap_or(Served::Shutdown),
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => {
                        let _ = worker_stop_tx.send(true);
                        outcome.get_or_insert(Served::Failed(e));
                    }
                    Some(Err(e)) => {
                        let _ = worker_stop_tx.send(true);
                        outcome.get_or_insert(Served::Failed(Error::Transient(format!("a poll worker failed: {e}"))));
                    }
                }
            }
            _ = lock.lost(), if outcome.is_none() => {
                // Another relay may take over at once: stop delivering now.
                tasks.abort_all();
                outcome = Some(Served::LockLost);
            }
            _ = shutdown.changed(), if outcome.is_none() => {
                let _ = worker_stop_tx.send(true);
                outcome = Some(Served::Shutdown);
            }
            _ = report.tick() => log_progress(&shared.stats),
        }
    }
}

fn log_progress(stats: &Stats) {
    tracing::info!(
        claimed = stats.claimed.load(Relaxed),
        published = stats.published.load(Relaxed),
        retried = stats.retried.load(Relaxed),
        dead_lettered = stats.dead_lettered.load(Relaxed),
        reaped = stats.reaped.load(Relaxed),
        stale_completions = stats.stale_completions.load(Relaxed),
        "poll progress"
    );
}
