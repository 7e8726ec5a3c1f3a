//! Status updates the CDC relay leaves on rows after Kafka's verdict:
//! `COMPLETED` with `processed_at`, or `DEAD_LETTER` with `last_error`.
//!
//! Updates are batched (one statement per batch, up to `OUTBOX_BATCH_SIZE`
//! rows) on a connection of their own, retried until they succeed, and each
//! row's ticket is reported back once its update has committed: only then
//! does the relay count the event as durable and let the flush LSN pass it.
//!
//! When the database cannot be reached the writer says so on the same
//! channel. The relay then ends its session: holding the replication
//! connection open while unable to confirm would block PostgreSQL's own
//! shutdown, which waits for the client to confirm everything sent.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::quote_ident;

/// A row's primary key, as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowKey {
    /// `id` as text.
    pub id: Bytes,
    /// `created_at` as text.
    pub created_at: Bytes,
}

/// What to write on a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MarkKind {
    /// Delivered: `status = 'COMPLETED', processed_at = now()`.
    Completed,
    /// Never publishable: `status = 'DEAD_LETTER', last_error = …`.
    DeadLetter(String),
}

/// One status update, identified by the relay's ticket.
#[derive(Clone, Debug)]
pub struct Mark {
    /// Reported back once the update commits.
    pub ticket: u64,
    /// The row.
    pub key: RowKey,
    /// The update.
    pub kind: MarkKind,
}

/// Handle to the background task that applies [`Mark`]s.
#[derive(Clone)]
pub struct StatusWriter {
    marks: mpsc::UnboundedSender<Mark>,
}

impl StatusWriter {
    /// Starts the writer for `schema.table`. Committed tickets are sent on
    /// `done` as `Ok`, a lost database as `Err`; the task ends when every
    /// handle is dropped or `done` is closed.
    pub fn spawn(
        pg: tokio_postgres::Config,
        schema: &str,
        table: &str,
        batch_size: usize,
        done: mpsc::UnboundedSender<Result<u64, String>>,
    ) -> StatusWriter {
        let (tx, rx) = mpsc::unbounded_channel();
        let target = format!("{}.{}", quote_ident(schema), quote_ident(table));
        tokio::spawn(run(pg, target, batch_size.max(1), rx, done));
        StatusWriter { marks: tx }
    }

    /// Queues an update. Returns false if the writer has stopped.
    pub fn mark(&self, mark: Mark) -> bool {
        self.marks.send(mark).is_ok()
    }
}

async fn run(
    pg: tokio_postgres::Config,
    target: String,
    batch_size: usize,
    mut rx: mpsc::UnboundedReceiver<Mark>,
    done: mpsc::UnboundedSender<Result<u64, String>>,
) {
    let completed_sql = format!(
        "UPDATE {target} AS o SET status = 'COMPLETED', processed_at = now() \
         FROM unnest($1::text[], $2::text[]) AS k(id, created_at) \
         WHERE o.id = k.id::bigint AND o.created_at = k.created_at::timestamptz \
           AND o.status IN ('PENDING', 'PROCESSING', 'FAILED')"
    );
    let dead_sql = format!(
        "UPDATE {target} AS o SET status = 'DEAD_LETTER', processed_at = now(), last_error = k.err, \
           locked_until = NULL, lock_token = NULL \
         FROM unnest($1::text[], $2::text[], $3::text[]) AS k(id, created_at, err) \
         WHERE o.id = k.id::bigint AND o.created_at = k.created_at::timestamptz"
    );
    let mut client: Option<tokio_postgres::Client> = None;
    let mut batch: Vec<Mark> = Vec::with_capacity(batch_size);
    let mut backoff = Duration::from_millis(100);
    loop {
        if done.is_closed() {
            return;
        }
        if batch.is_empty() {
            match rx.recv().await {
                Some(m) => batch.push(m),
                None => return,
            }
            while batch.len() < batch_size {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            match crate::database::connect(&pg).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    let text = crate::error::postgres_text(&e);
                    tracing::warn!(error = %text, "status writer cannot connect; retrying");
                    let _ = done.send(Err(format!(
                        "cannot reach PostgreSQL to update row statuses: {text}"
                    )));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        match apply(c, &completed_sql, &dead_sql, &batch).await {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                for m in batch.drain(..) {
                    let _ = done.send(Ok(m.ticket));
                }
            }
            Err(e) => {
                let text = crate::error::postgres_text(&e);
                tracing::warn!(error = %text, rows = batch.len(), "status update failed; retrying");
                if c.is_closed() {
                    let _ = done.send(Err(format!(
                        "lost PostgreSQL while updating row statuses: {text}"
                    )));
                }
                client = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn text(b: &Bytes) -> &str {
    std::str::from_utf8(b).unwrap_or("")
}

async fn apply(
    client: &tokio_postgres::Client,
    completed_sql: &str,
    dead_sql: &str,
    batch: &[Mark],
) -> Result<(), tokio_postgres::Error> {
    let (mut ids, mut ats) = (Vec::new(), Vec::new());
    let (mut dead_ids, mut dead_ats, mut errs) = (Vec::new(), Vec::new(), Vec::new());
    for m in batch {
        match &m.kind {
            MarkKind::Completed => {
                ids.push(text(&m.key.id));
                ats.push(text(&m.key.created_at));
            }
            MarkKind::DeadLetter(err) => {
                dead_ids.push(text(&m.key.id));
                dead_ats.push(text(&m.key.created_at));
                errs.push(err.as_str());
            }
        }
    }
    if !ids.is_empty() {
        client.execute(completed_sql, &[&ids, &ats]).await?;
    }
    if !dead_ids.is_empty() {
        let n = client
            .execute(dead_sql, &[&dead_ids, &dead_ats, &errs])
            .await?;
        tracing::warn!(rows = n, "dead-lettered rows that can never be published");
    }
    Ok(())
}
