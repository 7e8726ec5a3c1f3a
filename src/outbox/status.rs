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
use crate::Lsn;

/// A row's primary key, as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowKey {
    /// `id` as text.
    pub id: Bytes,
    /// `created_at` as text.
    pub created_at: Bytes,
}

/// What to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MarkKind {
    /// Delivered: `status = 'COMPLETED', processed_at = now()` on the row.
    Completed(RowKey),
    /// Never publishable: `status = 'DEAD_LETTER', last_error = …` on the row.
    DeadLetter(RowKey, String),
    /// A logical message that can never be published: recorded with its LSN
    /// in `pgoutbox_dead_letters`.
    DeadMessage {
        /// The message's LSN.
        lsn: Lsn,
        /// Its prefix.
        prefix: String,
        /// Its content, as sent.
        content: Bytes,
        /// Why it cannot be published.
        error: String,
    },
}

/// One status update, identified by the relay's ticket.
#[derive(Clone, Debug)]
pub struct Mark {
    /// Reported back once the update commits.
    pub ticket: u64,
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
        let dead = format!("{}.pgoutbox_dead_letters", quote_ident(schema));
        tokio::spawn(run(pg, target, dead, batch_size.max(1), rx, done));
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
    dead_table: String,
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
    let message_sql = format!(
        "INSERT INTO {dead_table} (lsn, prefix, content, error) \
         SELECT k.lsn::pg_lsn, k.prefix, k.content, k.err \
           FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[]) AS k(lsn, prefix, content, err)"
    );
    let sql = Statements {
        completed: completed_sql,
        dead: dead_sql,
        message: message_sql,
    };
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
        match apply(c, &sql, &batch).await {
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

struct Statements {
    completed: String,
    dead: String,
    message: String,
}

async fn apply(
    client: &tokio_postgres::Client,
    sql: &Statements,
    batch: &[Mark],
) -> Result<(), tokio_postgres::Error> {
    let (mut ids, mut ats) = (Vec::new(), Vec::new());
    let (mut dead_ids, mut dead_ats, mut errs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut lsns, mut prefixes, mut contents, mut msg_errs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for m in batch {
        match &m.kind {
            MarkKind::Completed(key) => {
                ids.push(text(&key.id));
                ats.push(text(&key.created_at));
            }
            MarkKind::DeadLetter(key, err) => {
                dead_ids.push(text(&key.id));
                dead_ats.push(text(&key.created_at));
                errs.push(err.as_str());
            }
            MarkKind::DeadMessage {
                lsn,
                prefix,
                content,
                error,
            } => {
                lsns.push(lsn.to_string());
                prefixes.push(prefix.as_str());
                contents.push(&content[..]);
                msg_errs.push(error.as_str());
            }
        }
    }
    if !ids.is_empty() {
        client.execute(&sql.completed, &[&ids, &ats]).await?;
    }
    if !dead_ids.is_empty() {
        let n = client
            .execute(&sql.dead, &[&dead_ids, &dead_ats, &errs])
            .await?;
        tracing::warn!(rows = n, "dead-lettered rows that can never be published");
    }
    if !lsns.is_empty() {
        let n = client
            .execute(&sql.message, &[&lsns, &prefixes, &contents, &msg_errs])
            .await?;
        tracing::warn!(
            messages = n,
            "recorded logical messages that can never be published in pgoutbox_dead_letters"
        );
    }
    Ok(())
}
