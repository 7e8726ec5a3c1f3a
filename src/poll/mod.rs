//! Poll mode: for databases without logical replication. Workers claim
//! batches of due `PENDING` rows with `FOR UPDATE SKIP LOCKED` under a lease
//! (`PROCESSING`, `locked_until`, a fresh `lock_token`, the attempt counted
//! at claim time), publish them through the same router and idempotent
//! producer as CDC, and settle them with the token. A reaper returns rows
//! whose lease expired; a `LISTEN` connection wakes idle workers when the
//! optional insert trigger notifies.
//!
//! The statuses are the ones CDC leaves, so a table can move from polling to
//! CDC and back on a live system; the runner's serving lock
//! (`crate::runner::serving`) makes sure only one mode serves it at a time.

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

use crate::config::{Config, Mode};
use crate::error::Error;
use crate::metrics::health;
use crate::metrics::health::Phase;
use crate::pipeline::{Delivery, RecordBuilder};
use crate::sink::Sink;

pub use statements::Statements;

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

/// The poll relay between session restarts: what each session needs.
pub struct Poll {
    shared: Arc<worker::Shared>,
}

impl Poll {
    /// A poll relay for `config`, publishing with `builder`'s records;
    /// `bytea_payload` says the table's payload column is bytea. Rows an
    /// earlier poller left `FAILED` should be adopted first
    /// ([`Poll::adopt_failed`]).
    pub fn new(
        config: Config,
        pg: crate::database::Settings,
        builder: RecordBuilder,
        bytea_payload: bool,
    ) -> Poll {
        let statements = Statements::new(&config);
        Poll {
            shared: Arc::new(worker::Shared {
                config,
                pg,
                statements,
                bytea_payload,
                builder,
                stats: Arc::new(Stats::default()),
            }),
        }
    }

    /// Makes rows an earlier poller left `FAILED` `PENDING` again; returns
    /// how many.
    pub async fn adopt_failed(&self, client: &tokio_postgres::Client) -> Result<u64, Error> {
        client
            .execute(&self.shared.statements.adopt_failed, &[])
            .await
            .map_err(|e| Error::postgres("adopting FAILED rows", &e))
    }

    /// One session: builds the producer, runs the workers, the reaper and
    /// the listener until `shutdown` turns true (`Ok`, after the workers
    /// settled their batches) or a worker fails (`Err`).
    pub async fn serve(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Error> {
        fold_journal(&self.shared).await?;
        let (mut sink, deliveries) = Sink::new(&self.shared.config.kafka, Mode::Poll)
            .map_err(|e| Error::Fatal(e.to_string()))?;
        sink.probe_cluster();
        let sink = Arc::new(sink);
        // Ready once a worker's claim succeeds too (see metrics::health).
        health().set_phase(Phase::Serving, "polling");
        tracing::info!(
            workers = self.shared.config.poll.concurrency,
            "polling with a new Kafka producer"
        );
        let outcome = serve(&self.shared, &sink, deliveries, shutdown).await;
        sink.flush(Duration::from_secs(5));
        outcome
    }
}

/// Folds the delivery journal a CDC relay left (ARCHITECTURE.md,
/// invariant 14) into the rows before any claim: a row CDC delivered is
/// `COMPLETED` then, never claimed and sent again. Runs under the serving
/// lock, so no CDC relay of this table journals anything after it (the
/// reaper folds what one that was just losing the lock still wrote).
async fn fold_journal(shared: &worker::Shared) -> Result<(), Error> {
    let config = &shared.config;
    let client = crate::database::connect(&shared.pg)
        .await
        .map_err(|e| Error::postgres("connecting to PostgreSQL", &e))?;
    let folded =
        crate::outbox::journal::fold_all(&client, &config.outbox.schema, &config.outbox.table)
            .await
            .map_err(|e| Error::postgres("folding the delivery journal", &e))?;
    if folded > 0 {
        tracing::info!(
            rows = folded,
            "rows a CDC relay delivered (delivery journal) are COMPLETED now, before polling"
        );
    }
    Ok(())
}

/// Runs the workers, the reaper and the listener until shutdown or the
/// first worker failure. Dropping it (a lost serving lock) aborts them all.
async fn serve(
    shared: &Arc<worker::Shared>,
    sink: &Arc<Sink>,
    mut deliveries: mpsc::UnboundedReceiver<Delivery>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Error> {
    let config = &shared.config;
    // The workers see `stop` turn true on shutdown and on a failed worker;
    // the reaper and the listener end when it is dropped.
    let (stop_tx, stop) = watch::channel(false);
    let (wake_tx, wake_rx) = watch::channel(0u64);
    let mut tasks = JoinSet::new();
    let mut routes = Vec::new();
    for index in 0..config.poll.concurrency {
        let (tx, rx) = mpsc::unbounded_channel();
        routes.push(tx);
        let w = worker::Worker {
            index,
            shared: shared.clone(),
            sink: sink.clone(),
            deliveries: rx,
            wake: wake_rx.clone(),
            shutdown: stop.clone(),
        };
        tasks.spawn(w.run());
    }
    let mut helpers = JoinSet::new();
    // Delivery reports to the worker that sent the record.
    helpers.spawn(async move {
        while let Some(d) = deliveries.recv().await {
            let index = (d.ticket >> worker::TICKET_BITS) as usize;
            if let Some(route) = routes.get(index) {
                let _ = route.send(d);
            }
        }
    });
    helpers.spawn(reaper::run(
        reaper::Reaper {
            pg: shared.pg.clone(),
            sql: shared.statements.reap.clone(),
            every: reaper::period(config.outbox.lease_seconds),
            stats: shared.stats.clone(),
            builder: shared.builder.clone(),
            table: config.outbox.table.clone(),
            schema: config.outbox.schema.clone(),
        },
        stop.clone(),
    ));
    helpers.spawn(wakeup::run(
        shared.pg.clone(),
        wakeup::channel(config),
        wake_tx,
        stop.clone(),
    ));
    let mut report = tokio::time::interval(Duration::from_secs(10));
    report.tick().await;
    let mut outcome: Option<Result<(), Error>> = None;
    loop {
        tokio::select! {
            joined = tasks.join_next() => {
                let failure = match joined {
                    None => break,
                    Some(Ok(Ok(()))) => None,
                    Some(Ok(Err(e))) => Some(e),
                    Some(Err(e)) => Some(Error::Transient(format!("a poll worker failed: {e}"))),
                };
                if let Some(e) = failure {
                    let _ = stop_tx.send(true);
                    outcome.get_or_insert(Err(e));
                }
            }
            _ = shutdown.changed(), if outcome.is_none() => {
                let _ = stop_tx.send(true);
                outcome = Some(Ok(()));
            }
            _ = report.tick() => log_progress(&shared.stats),
        }
    }
    outcome.unwrap_or(Ok(()))
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
