//! Wake-ups: a `LISTEN` connection on the table's channel. The optional
//! AFTER INSERT trigger (`poll.notify`, installed by `pgoutbox migrate`)
//! notifies it, and every idle worker claims at once instead of waiting for
//! the poll interval. Without the trigger, or while this connection is down,
//! workers simply poll.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;

use crate::config::{quote_ident, Config};
use crate::database::Settings;

/// The notification channel of the configured table (at most 63 bytes, the
/// server's limit).
pub fn channel(config: &Config) -> String {
    let mut name = format!("pgoutbox.{}.{}", config.outbox.schema, config.outbox.table);
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// Listens until shutdown, bumping `wake` on every notification; reconnects
/// with a backoff when the connection drops.
pub(super) async fn run(
    pg: Settings,
    channel: String,
    wake: watch::Sender<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let session = listen(&pg, &channel, &wake);
        tokio::select! {
            r = session => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "wake-up listener disconnected; workers poll meanwhile");
                }
            }
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn listen(pg: &Settings, channel: &str, wake: &watch::Sender<u64>) -> Result<(), String> {
    let (client, mut connection) = crate::database::connect_raw(pg)
        .await
        .map_err(|e| e.to_string())?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
        "connection closed".to_string()
    });
    client
        .batch_execute(&format!("LISTEN {}", quote_ident(channel)))
        .await
        .map_err(|e| e.to_string())?;
    // Rows may have arrived while not listening.
    wake.send_modify(|g| *g += 1);
    while rx.recv().await.is_some() {
        wake.send_modify(|g| *g += 1);
    }
    drop(client);
    Err(driver.await.unwrap_or_else(|e| e.to_string()))
}
