//! What the `pgoutbox` subcommands do, kept out of `main.rs` so they can be
//! tested and reused.

use tokio::sync::watch;

use crate::config::Config;
use crate::error::Error;
use crate::outbox::{migrate as apply_migrations, MigrationTarget};
use crate::relay::{self, RunOptions};

/// The version string: crate version and the git revision it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("PGOUTBOX_GIT_REVISION"),
    ")"
);

/// Sets up `tracing` from the config (`RUST_LOG` wins over `log.filter`).
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `pgoutbox migrate`.
pub async fn migrate(config: &Config) -> Result<(), Error> {
    let pg = crate::database::settings(config)?;
    let mut client = crate::database::connect(&pg)
        .await
        .map_err(|e| Error::postgres("connecting to PostgreSQL", &e))
        .map_err(|e| match e {
            Error::Transient(m) => Error::Fatal(format!(
                "{m}; check that PostgreSQL is running and reachable at the host and port in DATABASE_URL"
            )),
            other => other,
        })?;
    let target = MigrationTarget {
        schema: config.outbox.schema.clone(),
        table: config.outbox.table.clone(),
        publication: config.cdc.publication.clone(),
        message_prefix: config.cdc.message_prefix.clone(),
    };
    let applied = apply_migrations(&mut client, &target)
        .await
        .map_err(|e| Error::postgres("applying migrations", &e))?;
    if applied.is_empty() {
        tracing::info!("migrations: already up to date");
    } else {
        tracing::info!(?applied, "migrations applied");
    }
    Ok(())
}

/// `pgoutbox run`: the relay until SIGTERM/SIGINT.
pub async fn run(config: Config, recreate_slot: bool) -> Result<(), Error> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        let _ = tx.send(true);
        wait_for_signal().await;
        tracing::warn!("second signal: exiting at once");
        std::process::exit(130);
    });
    // On a worker thread rather than the runtime's main thread: the
    // replication reader hands messages to this task, and wake-ups between
    // workers are cheaper than waking the thread blocked in `block_on`.
    tokio::spawn(relay::run(config, RunOptions { recreate_slot }, rx))
        .await
        .map_err(|e| Error::Fatal(format!("the relay task failed: {e}")))?
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
