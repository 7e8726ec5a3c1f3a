//! Marks: the row statuses the CDC relay leaves after Kafka's verdict,
//! `COMPLETED` with `processed_at`, or `DEAD_LETTER` with `last_error`.
//! (Not to be confused with `pgoutbox status`, the operator's overview in
//! `crate::operate::overview`.)
//!
//! Updates are batched (one statement per batch, up to `cdc.mark_batch_size`
//! rows, gathered for up to `cdc.mark_linger_ms`) on a connection of their own, retried until they succeed, and each
//! row's ticket is reported back once its update has committed: only then
//! does the relay count the event as durable and let the flush LSN pass it.
//!
//! When the database cannot be reached the writer says so on the same
//! channel. The relay then ends its session: holding the replication
//! connection open while unable to confirm would block PostgreSQL's own
//! shutdown, which waits for the client to confirm everything sent.

use std::time::{Duration, Instant};

/// How long a row the relay has delivered may stay invisible to the status
/// writer (its commit not yet visible) before the writer gives up on it.
const UNSEEN_PATIENCE: Duration = Duration::from_secs(30);

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

/// How the writer groups marks into statements.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    /// Rows per statement, at most.
    pub size: usize,
    /// How long to gather marks for a statement that is not full yet. The
    /// writer sleeps rather than waking for every mark that arrives.
    pub linger: Duration,
}

/// Handle to the background task that applies [`Mark`]s.
#[derive(Clone)]
pub struct MarkWriter {
    marks: mpsc::UnboundedSender<Mark>,
}

impl MarkWriter {
    /// Starts the writer for `schema.table`. Committed tickets arrive on
    /// the returned channel as `Ok`, a lost database as `Err`; the task ends
    /// when every handle is dropped or the channel is closed.
    pub fn spawn(
        pg: crate::database::Settings,
        schema: &str,
        table: &str,
        batching: Batching,
    ) -> (MarkWriter, mpsc::UnboundedReceiver<Result<u64, String>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (done, durable) = mpsc::unbounded_channel();
        let target = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let dead = format!("{}.pgoutbox_dead_letters", quote_ident(schema));
        tokio::spawn(run(pg, target, dead, batching, rx, done));
        (MarkWriter { marks: tx }, durable)
    }

    /// Queues an update. Returns false if the writer has stopped.
    pub fn mark(&self, mark: Mark) -> bool {
        self.marks.send(mark).is_ok()
    }
}

/// The statements of the writer for `target` and its dead-letter table.
fn statements(target: &str, dead_table: &str) -> Statements {
    // Logical decoding can send a transaction a moment before its commit is
    // visible to other sessions, so an update may not see a row yet. Each
    // statement therefore also returns the keys it could not see at all;
    // those are retried (see `run`), never silently counted as marked. Only
    // keys the update did not change are looked up again (rows already
    // COMPLETED, or not visible): a second index probe for every row cost
    // about a sixth of the statement.
    let completed_sql = format!(
        "WITH k AS (SELECT * FROM unnest($1::text[], $2::text[]) AS k(id, created_at)), \
              u AS (UPDATE {target} AS o SET status = 'COMPLETED', processed_at = now() FROM k \
                     WHERE o.id = k.id::bigint AND o.created_at = k.created_at::timestamptz \
                       AND o.status IN ('PENDING', 'PROCESSING', 'FAILED') RETURNING o.id) \
         SELECT k.id FROM k WHERE k.id::bigint NOT IN (SELECT id FROM u) \
            AND NOT EXISTS (SELECT 1 FROM {target} AS o \
                WHERE o.id = k.id::bigint AND o.created_at = k.created_at::timestamptz)"
    );
    let dead_sql = format!(
        "WITH k AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k(id, created_at, err)), \
              u AS (UPDATE {target} AS o SET status = 'DEAD_LETTER', processed_at = now(), last_error = k.err, \
                       locked_until = NULL, lock_token = NULL FROM k \
                     WHERE o.id = k.id::bigint AND o.created_at = k.created_at::timestamptz RETURNING 1) \
         SELECT k.id FROM k WHERE NOT EXISTS (SELECT 1 FROM {target} AS o \
                WHERE o.id = k.id::bigint AND o.created_at = k.created_at::timestamptz)"
    );
    let message_sql = format!(
        "INSERT INTO {dead_table} (lsn, prefix, content, error) \
         SELECT k.lsn::pg_lsn, k.prefix, k.content, k.err \
           FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[]) AS k(lsn, prefix, content, err)"
    );
    Statements {
        completed: completed_sql,
        dead: dead_sql,
        message: message_sql,
    }
}

/// Waits for the next marks: the first one, then whatever arrives within
/// the linger, up to the batch size. `false` when every sender is gone.
async fn gather(
    rx: &mut mpsc::UnboundedReceiver<Mark>,
    batch: &mut Vec<Mark>,
    batching: Batching,
) -> bool {
    let size = batching.size.max(1);
    match rx.recv().await {
        Some(m) => batch.push(m),
        None => return false,
    }
    take_queued(rx, batch, size);
    if batch.len() < size && !batching.linger.is_zero() {
        tokio::time::sleep(batching.linger).await;
        take_queued(rx, batch, size);
    }
    true
}

/// Reports the marks of an applied batch durable, except rows the update
/// could not see yet (`unseen`), which are returned to be tried again
/// (unless the writer has waited for them for [`UNSEEN_PATIENCE`]).
fn report_applied(
    batch: &mut Vec<Mark>,
    unseen: Vec<String>,
    gave_up: bool,
    done: &mpsc::UnboundedSender<Result<u64, String>>,
) -> Vec<Mark> {
    let unseen: std::collections::HashSet<String> = unseen.into_iter().collect();
    let mut retry = Vec::new();
    for m in batch.drain(..) {
        let id = match &m.kind {
            MarkKind::Completed(k) | MarkKind::DeadLetter(k, _) => Some(text(&k.id)),
            MarkKind::DeadMessage { .. } => None,
        };
        match id {
            Some(id) if unseen.contains(id) && !gave_up => retry.push(m),
            Some(id) if unseen.contains(id) => {
                tracing::warn!(id, "outbox row not found after {UNSEEN_PATIENCE:?}; was it deleted? not marking it");
                let _ = done.send(Ok(m.ticket));
            }
            _ => {
                let _ = done.send(Ok(m.ticket));
            }
        }
    }
    retry
}

async fn run(
    pg: crate::database::Settings,
    target: String,
    dead_table: String,
    batching: Batching,
    mut rx: mpsc::UnboundedReceiver<Mark>,
    done: mpsc::UnboundedSender<Result<u64, String>>,
) {
    let sql = statements(&target, &dead_table);
    let mut client: Option<(tokio_postgres::Client, Prepared)> = None;
    let mut batch: Vec<Mark> = Vec::with_capacity(batching.size.max(1));
    let mut backoff = Duration::from_millis(100);
    let mut unseen_since: Option<Instant> = None;
    loop {
        if done.is_closed() {
            return;
        }
        if batch.is_empty() && !gather(&mut rx, &mut batch, batching).await {
            return;
        }
        if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            match connect(&pg).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    let text = crate::error::postgres_text(&e);
                    tracing::warn!(error = %text, "mark writer cannot connect; retrying");
                    let _ = done.send(Err(format!(
                        "cannot reach PostgreSQL to update row statuses: {text}"
                    )));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        let Some((c, statements)) = client.as_mut() else {
            continue;
        };
        match apply(c, statements, &sql, &batch).await {
            Ok(unseen) => {
                backoff = Duration::from_millis(100);
                let gave_up = unseen_since.is_some_and(|t: Instant| t.elapsed() > UNSEEN_PATIENCE);
                let retry = report_applied(&mut batch, unseen, gave_up, &done);
                if retry.is_empty() {
                    unseen_since = None;
                } else {
                    unseen_since.get_or_insert_with(Instant::now);
                    batch = retry;
                    tokio::time::sleep(Duration::from_millis(5)).await;
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

/// Moves marks already queued into `batch`, up to `size` in all.
fn take_queued(rx: &mut mpsc::UnboundedReceiver<Mark>, batch: &mut Vec<Mark>, size: usize) {
    while batch.len() < size {
        match rx.try_recv() {
            Ok(m) => batch.push(m),
            Err(_) => break,
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

/// The statements, each prepared once per connection on its first use: a
/// table that cannot be marked (no status column, invariant 12) only ever
/// gets `message`, the others would not even prepare.
#[derive(Default)]
struct Prepared {
    completed: Option<tokio_postgres::Statement>,
    dead: Option<tokio_postgres::Statement>,
    message: Option<tokio_postgres::Statement>,
}

async fn prepared<'a>(
    client: &tokio_postgres::Client,
    slot: &'a mut Option<tokio_postgres::Statement>,
    sql: &str,
) -> Result<&'a tokio_postgres::Statement, tokio_postgres::Error> {
    if slot.is_none() {
        *slot = Some(client.prepare(sql).await?);
    }
    Ok(slot.as_ref().expect("prepared just above"))
}

async fn connect(
    pg: &crate::database::Settings,
) -> Result<(tokio_postgres::Client, Prepared), tokio_postgres::Error> {
    let client = crate::database::connect(pg).await?;
    Ok((client, Prepared::default()))
}

/// Applies a batch; returns the ids of rows the statements could not see
/// yet (to retry).
async fn apply(
    client: &tokio_postgres::Client,
    statements: &mut Prepared,
    sql: &Statements,
    batch: &[Mark],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut unseen = Vec::new();
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
    let m = crate::metrics::metrics();
    for n in [ids.len(), dead_ids.len(), lsns.len()] {
        if n > 0 {
            m.batch(crate::metrics::batch::STATUS_UPDATE, n);
        }
    }
    if !ids.is_empty() {
        let st = prepared(client, &mut statements.completed, &sql.completed).await?;
        for row in client.query(st, &[&ids, &ats]).await? {
            unseen.push(row.get::<_, String>(0));
        }
    }
    if !dead_ids.is_empty() {
        let st = prepared(client, &mut statements.dead, &sql.dead).await?;
        let rows = client.query(st, &[&dead_ids, &dead_ats, &errs]).await?;
        tracing::warn!(
            rows = dead_ids.len() - rows.len(),
            "dead-lettered rows that can never be published"
        );
        for row in rows {
            unseen.push(row.get::<_, String>(0));
        }
    }
    if !lsns.is_empty() {
        let st = prepared(client, &mut statements.message, &sql.message).await?;
        let n = client
            .execute(st, &[&lsns, &prefixes, &contents, &msg_errs])
            .await?;
        tracing::warn!(
            messages = n,
            "recorded logical messages that can never be published in pgoutbox_dead_letters"
        );
    }
    Ok(unseen)
}
