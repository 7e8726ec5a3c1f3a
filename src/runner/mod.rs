//! The runner: one `pgoutbox run`, above both modes. It resolves
//! `mode = "auto"`, runs the preflight checks of the chosen mode, creates
//! partitions ahead, and hands the mode's relay to the one supervisor,
//! which holds the serving lock and restarts sessions by one backoff and
//! one error policy ([`crate::error::Error::action`]). A CDC relay whose
//! slot was lost falls back to polling when `cdc.fallback_to_poll` allows.
//!
//! Transient failures (PostgreSQL or Kafka restarts, network errors) end a
//! session; the supervisor backs off, reconnects and resumes (CDC from the
//! slot, re-sending at most the unconfirmed tail). Definite failures
//! (credentials, configuration, a lost slot) stop the relay.

mod preflight;
pub mod serving;
mod supervisor;

use tokio::sync::watch;

use crate::cdc::Cdc;
use crate::config::{Config, ConfigError, Mode, PollOrdering, SlotLostPolicy};
use crate::error::Error;
use crate::metrics::metrics;
use crate::pipeline::RecordBuilder;
use crate::poll::Poll;
use supervisor::{supervise, Service};

/// Options of one `pgoutbox run`.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Create a new slot (and backfill pending rows) even though the relay
    /// recorded one that is now lost. Only an operator sets this.
    pub recreate_slot: bool,
}

/// Runs the relay in the configured mode (resolving `auto` first) until
/// `shutdown` turns true or a definite error occurs.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    // Partitions ahead while the relay runs (partitions.maintain_interval_s).
    let _create_ahead = crate::outbox::partitioning::spawn_create_ahead(&config, shutdown.clone());
    let mode = match config.mode {
        Mode::Auto => {
            let pg = crate::database::settings(&config)?;
            let client = crate::database::connect(&pg)
                .await
                .map_err(|e| Error::postgres("connecting to PostgreSQL", &e).at_start())?;
            let (mode, why) = preflight::choose_mode(&client, &config).await?;
            tracing::info!(%mode, reason = %why, "mode auto");
            mode
        }
        m => m,
    };
    metrics().set_mode(if mode == Mode::Poll {
        Mode::Poll
    } else {
        Mode::Cdc
    });
    match mode {
        Mode::Poll => run_poll(config, shutdown).await,
        Mode::Cdc | Mode::Auto => {
            let policy = config
                .cdc
                .slot_lost_policy(config.outbox.mark_completed, config.mode == Mode::Auto);
            match run_cdc(config.clone(), options, shutdown.clone()).await {
                Err(Error::SlotLost(why)) if policy == SlotLostPolicy::Poll => {
                    metrics().set_mode(Mode::Poll);
                    tracing::error!(
                        reason = %why,
                        "the replication slot was lost; falling back to poll mode (cdc.on_slot_lost = \"poll\"): \
                         every row not COMPLETED is delivered by polling"
                    );
                    run_poll(config, shutdown).await
                }
                other => other,
            }
        }
    }
}

/// The record builder for the configured topics.
fn record_builder(config: &Config) -> Result<RecordBuilder, Error> {
    RecordBuilder::from_config(&config.kafka, &config.event_columns()?)
        .map_err(|e| ConfigError::new("kafka.topic", e.to_string()).into())
}

/// What a lost slot leads to, given the table: recreating needs a table
/// whose rows are marked (a new slot's backfill reads the rows not yet
/// COMPLETED). Asked for explicitly on a table that cannot be marked, it is
/// refused; by default it falls back to stopping.
fn slot_lost_policy(
    config: &Config,
    shape: &crate::outbox::TableShape,
) -> Result<SlotLostPolicy, Error> {
    let policy = config
        .cdc
        .slot_lost_policy(config.outbox.mark_completed, config.mode == Mode::Auto);
    let marking = shape.marking_gap();
    if policy != SlotLostPolicy::Recreate || marking.is_empty() {
        return Ok(policy);
    }
    if config.cdc.on_slot_lost == Some(SlotLostPolicy::Recreate) {
        return Err(Error::Fatal(format!(
            "cdc.on_slot_lost = \"recreate\" backfills the rows not yet COMPLETED from a new slot, but {} cannot be marked: {marking}; set on_slot_lost = \"stop\"",
            shape.qualified
        )));
    }
    Ok(SlotLostPolicy::Stop)
}

/// Fits the record layout to the outbox table's column types.
fn fit_table(
    builder: &mut RecordBuilder,
    config: &Config,
    shape: &crate::outbox::TableShape,
) -> Result<(), Error> {
    let type_of = |c: &str| shape.type_of(c).map(str::to_string);
    builder
        .fit_table(&config.event_columns()?, &type_of)
        .map_err(Error::from)
}

/// Runs the CDC relay until `shutdown` turns true (exit 0 after a graceful
/// drain) or a definite error occurs.
async fn run_cdc(
    config: Config,
    options: RunOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let pg = crate::database::settings(&config)?;
    let mut builder = record_builder(&config)?;
    let client = crate::database::connect(&pg)
        .await
        .map_err(|e| Error::postgres("connecting to PostgreSQL", &e).at_start())?;
    let (sender_timeout, shape) = preflight::cdc(&client, &config).await?;
    fit_table(&mut builder, &config, &shape)?;
    ensure_partitions(&client, &config).await;
    drop(client);
    let status_interval = config.status_interval(sender_timeout);
    tracing::info!(
        slot = %config.cdc.slot,
        publication = %config.cdc.publication,
        topic = %builder,
        brokers = %config.kafka.brokers,
        database = %config.database.url,
        status_interval_ms = status_interval.as_millis() as u64,
        mark_completed = config.outbox.mark_completed,
        "starting CDC relay"
    );
    let policy = slot_lost_policy(&config, &shape)?;
    let cdc = Cdc::new(
        config.clone(),
        pg.clone(),
        builder,
        status_interval,
        options.recreate_slot,
    )
    .on_slot_lost(policy);
    supervise(&pg, &config, Service::Cdc(Box::new(cdc)), &mut shutdown).await
}

/// Runs the poll relay until `shutdown` turns true or a definite error.
async fn run_poll(config: Config, mut shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let pg = crate::database::settings(&config)?;
    let mut builder = record_builder(&config)?;
    let poll = {
        let client = crate::database::connect(&pg)
            .await
            .map_err(|e| Error::postgres("connecting to PostgreSQL", &e).at_start())?;
        let shape = preflight::poll(&client, &config).await?;
        fit_table(&mut builder, &config, &shape)?;
        let poll = Poll::new(
            config.clone(),
            pg.clone(),
            builder.clone(),
            shape.bytea_payload(&config.event_columns()?),
        );
        ensure_partitions(&client, &config).await;
        let adopted = poll.adopt_failed(&client).await?;
        if adopted > 0 {
            tracing::info!(
                adopted,
                "rows left FAILED by an earlier poller are PENDING again"
            );
        }
        poll
    };
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
        topic = %builder,
        brokers = %config.kafka.brokers,
        database = %config.database.url,
        "starting poll relay"
    );
    supervise(&pg, &config, Service::Poll(poll), &mut shutdown).await
}

/// Creates the partitions ahead (`partitions.interval`, `partitions.ahead`)
/// through the SECURITY DEFINER function. Failing here must not stop
/// delivery, so problems are logged.
async fn ensure_partitions(client: &tokio_postgres::Client, config: &Config) {
    match crate::outbox::partitioning::ensure_ahead(client, config).await {
        Ok(created) => {
            if created > 0 {
                tracing::info!(created, "created outbox partitions ahead");
            }
        }
        Err(e) => tracing::warn!(
            error = %crate::error::postgres_text(&e),
            "could not ensure outbox partitions ahead"
        ),
    }
}
