//! `pgoutbox run`: the relay until SIGTERM/SIGINT.

use tokio::sync::watch;

use crate::config::Config;
use crate::error::Error;
use crate::runner::{self, RunOptions};

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
    // /metrics, /healthz, /readyz from the start (a standby answers too);
    // served until this function returns.
    let _metrics = crate::operate::serve(&config.metrics, rx.clone()).await?;
    // The gauges read from the database, for as long as the relay runs.
    let sampler = tokio::spawn(crate::operate::sampler::run(config.clone(), rx.clone()));
    let _sampler = AbortOnDrop(sampler);
    // On a worker thread rather than the runtime's main thread: the
    // replication reader hands messages to this task, and wake-ups between
    // workers are cheaper than waking the thread blocked in `block_on`.
    tokio::spawn(runner::run(config, RunOptions { recreate_slot }, rx))
        .await
        .map_err(|e| Error::Fatal(format!("the relay task failed: {e}")))?
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Returns on the next SIGTERM or SIGINT (never, if they cannot be caught).
pub(super) async fn wait_for_signal() {
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
