//! The CDC relay: replication slot → pgoutput decoder → router → Kafka →
//! acknowledgements → flush LSN.
//!
//! One task owns the session. Its loop gives acknowledgements priority over
//! new input (`select!` with `biased`), sends standby status updates on a
//! timer of their own, and stops reading the replication stream while the
//! in-flight window is full — backpressure that never stops feedback
//! (invariant 3). Transient failures (PostgreSQL or Kafka restarts, network
//! errors) end the session; the relay backs off, reconnects and resumes from
//! the slot, re-sending at most the unconfirmed tail. Definite failures
//! (credentials, configuration, a lost slot) stop the relay.

mod backfill;
mod changes;
mod pipeline;
pub mod progress;
mod slot;
mod stream;

use std::time::Duration;

use tokio::sync::watch;

use crate::config::{quote_ident, Config, Mode};
use crate::error::{Action, Error};
use crate::metrics::health::Phase;
use crate::metrics::{health, metrics};
use crate::route::Router;
use crate::serving::ServingLock;

pub use slot::SlotState;

/// Options of one `pgoutbox run`.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Create a new slot (and backfill pending rows) even though the relay
    /// recorded one that is now lost. Only an operator sets this.
    pub recreate_slot: bool,
}

/// Checks what only an operator can fix before streaming: reachability,
/// credentials, `wal_level`, the publication and the table.
async fn preflight(client: &tokio_postgres::Client, config: &Config) -> Result<Duration, Error> {
    let wal_level: String = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(|e| Error::postgres("reading wal_level", &e))?
        .get(0);
    if wal_level != "logical" {
        return Err(Error::Fatal(format!(
            "wal_level is {wal_level:?} but CDC needs \"logical\": set wal_level = logical in postgresql.conf and restart PostgreSQL"
        )));
    }
    let publication = &config.cdc.publication;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(|e| Error::postgres("reading pg_publication", &e))?
        .is_some();
    if !exists {
        return Err(Error::Fatal(format!(
            "publication {publication:?} does not exist: run `pgoutbox migrate`, or CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert', publish_via_partition_root = true)",
            quote_ident(publication),
            quote_ident(&config.outbox.table)
        )));
    }
    let covered = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[publication, &config.outbox.schema, &config.outbox.table],
        )
        .await
        .map_err(|e| Error::postgres("reading pg_publication_tables", &e))?
        .is_some();
    if !covered {
        tracing::warn!(
            publication = %publication,
            table = %config.outbox.table,
            "the publication does not include the configured outbox table; only its own tables will be relayed"
        );
    }
    check_migrations(client, config).await?;
    let timeout_ms: i64 = client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("reading wal_sender_timeout", &e))?
        .get(0);
    Ok(Duration::from_millis(timeout_ms.max(0) as u64))
}

/// Stops with a clear message when the table's schema is behind this
/// binary's migrations.
pub(crate) async fn check_migrations(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<(), Error> {
    let target = format!("{}.{}", config.outbox.schema, config.outbox.table);
    let applied: Option<i32> = client
        .query_one(
            "SELECT max(version) FROM public.pgoutbox_migrations WHERE target = $1",
            &[&target],
        )
        .await
        .map_err(|e| Error::postgres("reading pgoutbox_migrations", &e))?
        .get(0);
    let latest = crate::outbox::MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if applied.unwrap_or(0) < latest {
        return Err(Error::Fatal(format!(
            "the schema of {target} is at migration {} but this pgoutbox needs {latest}: run `pgoutbox migrate`",
            applied.unwrap_or(0)
        )));
    }
    Ok(())
}

/// Why `auto` chose a mode, for the log.
async fn choose_mode(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<(Mode, String), Error> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), \
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
                    EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
            &[&config.cdc.publication, &config.outbox.schema, &config.outbox.table],
        )
        .await
        .map_err(|e| Error::postgres("checking whether CDC is possible", &e))?;
    let (wal_level, replication, published): (String, Option<bool>, bool) =
        (row.get(0), row.get(1), row.get(2));
    if wal_level != "logical" {
        return Ok((
            Mode::Poll,
            format!("wal_level is {wal_level:?}, not \"logical\""),
        ));
    }
    if replication != Some(true) {
        return Ok((Mode::Poll, "the role has no REPLICATION privilege".into()));
    }
    if !published {
        return Ok((
            Mode::Poll,
            format!(
                "publication {:?} does not include {}.{}",
                config.cdc.publication, config.outbox.schema, config.outbox.table
            ),
        ));
    }
    Ok((
        Mode::Cdc,
        "wal_level is logical, the role may replicate and the publication covers the table".into(),
    ))
}

/// Runs the relay in the configured mode (resolving `auto` first) until
/// `shutdown` turns true or a definite error occurs.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    // Partitions ahead while the relay runs (partitions.maintain_interval_s).
    let _create_ahead = crate::partitions::spawn_create_ahead(&config, shutdown.clone());
    let mode = match config.mode {
        Mode::Auto => {
            let pg = crate::database::settings(&config)?;
            let client = crate::database::connect(&pg)
                .await
                .map_err(|e| fatal_at_start(Error::postgres("connecting to PostgreSQL", &e)))?;
            let (mode, why) = choose_mode(&client, &config).await?;
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
    // The sampler ends with the relay (shutdown, or this function returns).
    let sampler = tokio::spawn(crate::metrics::sampler::run(
        config.clone(),
        shutdown.clone(),
    ));
    let _sampler = AbortOnDrop(sampler);
    match mode {
        Mode::Poll => crate::poll::run(config, shutdown).await,
        Mode::Cdc | Mode::Auto => {
            let fallback = config.mode == Mode::Auto && config.cdc.fallback_to_poll;
            match run_cdc(config.clone(), options, shutdown.clone()).await {
                Err(Error::SlotLost(why)) if fallback => {
                    metrics().set_mode(Mode::Poll);
                    tracing::error!(
                        reason = %why,
                        "the replication slot was lost; falling back to poll mode (cdc.fallback_to_poll = true): \
                         every row not COMPLETED is delivered by polling"
                    );
                    crate::poll::run(config, shutdown).await
                }
                other => other,
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the CDC relay until `shutdown` turns true (exit 0 after a graceful
/// drain) or a definite error occurs.
async fn run_cdc(
    config: Config,
    options: RunOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let pg = crate::database::settings(&config)?;
    let router = Router::from_config(&config.kafka)
        .map_err(|e| crate::config::ConfigError::new("kafka.topic", e.to_string()))?;
    let client = crate::database::connect(&pg)
        .await
        .map_err(|e| fatal_at_start(Error::postgres("connecting to PostgreSQL", &e)))?;
    let sender_timeout = preflight(&client, &config).await?;
    ensure_partitions(&client, &config).await;
    drop(client);
    let status_interval = config.status_interval(sender_timeout);
    tracing::info!(
        slot = %config.cdc.slot,
        publication = %config.cdc.publication,
        topic = %router,
        brokers = %config.kafka.brokers,
        database = %config.database.url,
        status_interval_ms = status_interval.as_millis() as u64,
        mark_completed = config.outbox.mark_completed,
        "starting CDC relay"
    );
    let mut recreate = options.recreate_slot;
    let max_backoff = Duration::from_millis(config.cdc.max_backoff_ms);
    let mut backoff = Duration::from_millis(100);
    let mut lock: Option<ServingLock> = None;
    loop {
        if lock.is_none() {
            // Waits while pollers (or another CDC relay: a standby) serve
            // the table.
            health().set_phase(Phase::Connecting, "taking the serving lock");
            match ServingLock::acquire(&pg, &config, Mode::Cdc, &mut shutdown).await {
                Ok(Some(l)) => lock = Some(l),
                Ok(None) => return Ok(()),
                Err(e) if e.action() == Action::Stop => return Err(e),
                Err(e) => {
                    health().set_phase(Phase::Reconnecting, e.to_string());
                    tracing::warn!(error = %e, "cannot take the serving lock; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(max_backoff);
                    continue;
                }
            }
        }
        let started = tokio::time::Instant::now();
        let ctx = stream::Session {
            config: &config,
            pg: &pg,
            router: router.clone(),
            status_interval,
        };
        let outcome = {
            let held = lock.as_mut().expect("taken above");
            tokio::select! {
                r = ctx.run(&mut recreate, &mut shutdown) => Some(r),
                _ = held.lost() => None,
            }
        };
        let outcome = outcome.unwrap_or_else(|| {
            lock = None;
            Err(Error::Transient(
                "the serving lock was lost (its connection ended); stopped delivering until it is taken again".into(),
            ))
        });
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) => match e.action() {
                Action::Stop => return Err(e),
                Action::Reconnect => {
                    if *shutdown.borrow() {
                        tracing::info!(error = %e, "stopped during a session restart");
                        return Ok(());
                    }
                    health().set_phase(Phase::Reconnecting, e.to_string());
                    metrics().reconnects.with_label_values(&["cdc"]).inc();
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_millis(100);
                    }
                    let jitter = Duration::from_millis(rand::random::<u64>() % 100);
                    tracing::warn!(error = %e, retry_in_ms = (backoff + jitter).as_millis() as u64, "session ended; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff + jitter) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            },
        }
        if *shutdown.borrow() {
            return Ok(());
        }
    }
}

/// At start-up every error is reported and the relay exits: an unreachable
/// host or a wrong password is for the operator to fix, not to retry forever.
pub(crate) fn fatal_at_start(e: Error) -> Error {
    match e {
        Error::Transient(msg) => Error::Fatal(format!(
            "{msg}; check that PostgreSQL is running and reachable at the host and port in DATABASE_URL"
        )),
        other => other,
    }
}

/// Creates the partitions ahead (`partitions.interval`, `partitions.ahead`)
/// through the SECURITY DEFINER function. Failing here must not stop
/// delivery, so problems are logged.
pub(crate) async fn ensure_partitions(client: &tokio_postgres::Client, config: &Config) {
    match crate::partitions::ensure_ahead(client, config).await {
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
