//! Marks: the row statuses the CDC relay leaves after Kafka's verdict,
//! `COMPLETED` with `processed_at`, or `DEAD_LETTER` with `last_error`.
//! (Not to be confused with `pgoutbox status`, the operator's overview in
//! `crate::operate::overview`.)
//!
//! Updates are batched (one statement per up to `cdc.mark_batch_size` rows,
//! gathered for up to `cdc.mark_linger_ms`; journal entries of several
//! statements at once when marks are queued, see [`PIPELINED_ENTRIES`]) on
//! a connection of their own, retried until they succeed, and each
//! row's ticket is reported back once its update has committed and the
//! server's WAL is flushed past that commit ([`super::wal_flush`]: the
//! connection commits without waiting for the flush): only then does the
//! relay count the event as durable and let the flush LSN pass it.
//!
//! With `cdc.mark_with = "journal"` (the default) a batch's `COMPLETED`
//! marks of the relay's own table are one insert into the delivery journal
//! instead ([`super::journal`], ARCHITECTURE.md, invariant 14), durable once
//! it commits; the writer folds the journal into the rows' statuses behind
//! the marks, when a batch was not full or it has waited [`FOLD_IDLE`] for
//! marks, provided the relay has decoded its stream to near the server's
//! WAL end ([`StreamProgress`]: no backlog to drain), and
//! at once while the journal holds more than [`FOLD_AT_ROWS`] rows.
//!
//! When the database cannot be reached the writer says so on the same
//! channel. The relay then ends its session: holding the replication
//! connection open while unable to confirm would block PostgreSQL's own
//! shutdown, which waits for the client to confirm everything sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a row the relay has delivered may stay invisible to the status
/// writer (its commit not yet visible) before the writer gives up on it.
const UNSEEN_PATIENCE: Duration = Duration::from_secs(30);

use bytes::Bytes;
use tokio::sync::mpsc;

mod statements;

use statements::{apply, text, PreparedByTable, Sql};

use super::journal::{self, Journal, FOLD_AT_ROWS, FOLD_ENTRIES};
use super::wal_flush::{self, Unflushed};
use super::RowKey;
use crate::config::{quote_ident, MarkWith};
use crate::Lsn;

/// How long the writer waits for marks before it folds the journal while
/// idle.
const FOLD_IDLE: Duration = Duration::from_millis(50);

/// How often the writer asks whether its walsender is caught up.
const CAUGHT_UP_EVERY: Duration = Duration::from_millis(250);

/// Journal entries the writer sends at once, pipelined: when marks are
/// queued it takes up to this many statements' worth of them
/// (`cdc.mark_batch_size` rows each) and writes them in one round trip,
/// each entry still one statement of at most `cdc.mark_batch_size` rows
/// (so a fold's size does not change). An exactly-once commit hands over
/// all its rows at once, and a writer that waited for each 2,000-row entry
/// in turn took 5–50 ms per entry on a busy machine: its marks, not Kafka,
/// then paced the commits (BENCHMARKS.md, session 20).
const PIPELINED_ENTRIES: usize = 5;

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
        mark_with: MarkWith,
        stream: Option<StreamProgress>,
    ) -> (MarkWriter, mpsc::UnboundedReceiver<Result<u64, String>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (done, durable) = mpsc::unbounded_channel();
        let target = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let dead = format!("{}.pgoutbox_dead_letters", quote_ident(schema));
        let journal = (mark_with == MarkWith::Journal).then(|| JournalUse {
            schema: schema.to_owned(),
            journal: Journal::new(schema, table),
            stream,
        });
        tokio::spawn(run(pg, target, dead, journal, batching, rx, done));
        (MarkWriter { marks: tx }, durable)
    }

    /// Queues an update. Returns false if the writer has stopped.
    pub fn mark(&self, mark: Mark) -> bool {
        self.marks.send(mark).is_ok()
    }
}

/// How far the relay has decoded its replication stream, shared by the
/// session (which moves it) with the mark writer (which folds the delivery
/// journal only when no backlog waits: ARCHITECTURE.md, invariant 14).
#[derive(Clone, Debug, Default)]
pub struct StreamProgress(Arc<AtomicU64>);

impl StreamProgress {
    /// The stream has been decoded up to `lsn`.
    pub fn set(&self, lsn: Lsn) {
        self.0.fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// Where decoding stands: [`Lsn::ZERO`] until the session streams
    /// (while it starts or backfills), then where its stream started, then
    /// the latest message it decoded.
    pub fn received(&self) -> Lsn {
        Lsn(self.0.load(Ordering::Relaxed))
    }
}

/// Waits for the next marks: the first one, then whatever is queued or
/// arrives within the linger, up to `most`; the linger only while the
/// batch would not fill one statement. `false` when every sender is gone.
async fn gather(
    rx: &mut mpsc::UnboundedReceiver<Mark>,
    batch: &mut Vec<Mark>,
    batching: Batching,
    most: usize,
) -> bool {
    match rx.recv().await {
        Some(m) => batch.push(m),
        None => return false,
    }
    take_queued(rx, batch, most);
    if batch.len() < batching.size.max(1) && !batching.linger.is_zero() {
        tokio::time::sleep(batching.linger).await;
        take_queued(rx, batch, most);
    }
    true
}

/// Splits an applied batch into the marks that are done once their commit
/// is flushed and the rows the update could not see yet (`unseen`), which
/// are tried again (unless the writer has waited for them for
/// [`UNSEEN_PATIENCE`]).
fn sort_applied(
    batch: &mut Vec<Mark>,
    unseen: Vec<(Option<Arc<str>>, String)>,
    gave_up: bool,
    sql: &Sql,
) -> (Vec<Mark>, Vec<Mark>) {
    if unseen.is_empty() {
        // Every row was there: the common case, without a lookup per mark.
        return (std::mem::take(batch), Vec::new());
    }
    let unseen: std::collections::HashSet<(Option<Arc<str>>, String)> =
        unseen.into_iter().collect();
    let (mut applied, mut retry) = (Vec::new(), Vec::new());
    for m in batch.drain(..) {
        let missing = match &m.kind {
            MarkKind::Completed(k) | MarkKind::DeadLetter(k, _) => {
                let id = text(&k.id);
                unseen
                    .contains(&(sql.table_of(k), id.to_owned()))
                    .then_some(id)
            }
            MarkKind::DeadMessage { .. } => None,
        };
        match missing {
            Some(_) if !gave_up => retry.push(m),
            Some(id) => {
                tracing::warn!(id, "outbox row not found after {UNSEEN_PATIENCE:?}; was it deleted? not marking it");
                applied.push(m);
            }
            None => applied.push(m),
        }
    }
    (applied, retry)
}

/// Reports marks durable.
fn report(marks: Vec<Mark>, done: &mpsc::UnboundedSender<Result<u64, String>>) {
    for m in marks {
        let _ = done.send(Ok(m.ticket));
    }
}

/// Reports the marks whose commits the WAL flush has passed; with `force`,
/// first flushes the WAL itself if anything still waits.
async fn settle(
    c: &tokio_postgres::Client,
    unflushed: &mut Unflushed<Mark>,
    force: Option<&Journal>,
    done: &mpsc::UnboundedSender<Result<u64, String>>,
) -> Result<(), tokio_postgres::Error> {
    let flushed: i64 = c.query_one(wal_flush::FLUSHED_SQL, &[]).await?.get(0);
    report(unflushed.release(Lsn::from_position(flushed)), done);
    if let Some(journal) = force.filter(|_| !unflushed.is_empty()) {
        c.batch_execute(&journal.flush_sql()).await?;
        let marks = unflushed.take_all();
        crate::metrics::metrics().batch(crate::metrics::batch::FORCED_FLUSH, marks.len());
        report(marks, done);
    }
    Ok(())
}

/// The journal a writer records its own table's deliveries in
/// (`cdc.mark_with = "journal"`).
struct JournalUse {
    schema: String,
    journal: Journal,
    /// How far the relay has decoded its stream: folding waits while it is
    /// far behind the server's WAL end (a backlog to drain). `None`: never
    /// waits.
    stream: Option<StreamProgress>,
}

/// The writer's journal once connected: the statements, and how many rows
/// it holds (what a previous run left, plus what this one journaled, less
/// what was folded).
struct JournalState {
    journal: Journal,
    insert: String,
    fold: String,
    /// Rows journaled and not folded yet; `None` until read at connect.
    unfolded: Option<u64>,
    /// The schema has no journal (migration 13 not applied): marks are
    /// updates, as with `mark_with = "update"`.
    missing: bool,
    schema: String,
    stream: Option<StreamProgress>,
    /// Whether the relay was caught up when last asked, and when.
    caught_up: Option<(Instant, bool)>,
}

impl JournalState {
    fn new(u: JournalUse) -> JournalState {
        JournalState {
            insert: u.journal.insert_sql(),
            fold: u.journal.fold_sql(),
            journal: u.journal,
            unfolded: None,
            missing: false,
            schema: u.schema,
            stream: u.stream,
            caught_up: None,
        }
    }

    /// Whether the relay has room to fold: it has decoded its stream to
    /// within [`journal::FOLD_LAG_BYTES`] of the server's WAL end
    /// ([`journal::room_to_fold`]; asked at most every
    /// [`CAUGHT_UP_EVERY`]). A relay that does not stream yet (starting,
    /// reconnecting, backfilling) is not caught up, and one that starts
    /// with a backlog folds once it has drained it, not before.
    async fn caught_up(
        &mut self,
        c: &tokio_postgres::Client,
    ) -> Result<bool, tokio_postgres::Error> {
        let Some(stream) = &self.stream else {
            return Ok(true);
        };
        if let Some((at, yes)) = self.caught_up {
            if at.elapsed() < CAUGHT_UP_EVERY {
                return Ok(yes);
            }
        }
        let end: i64 = c.query_one(journal::WAL_END_SQL, &[]).await?.get(0);
        let yes = journal::room_to_fold(stream.received(), Lsn::from_position(end));
        self.caught_up = Some((Instant::now(), yes));
        Ok(yes)
    }

    /// Whether the home table's deliveries go to the journal.
    fn active(&self) -> bool {
        !self.missing
    }

    /// Reads, on a new connection, whether the journal exists and what it
    /// holds.
    async fn connected(&mut self, c: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
        if !journal::usable(c, &self.schema).await? {
            if !self.missing {
                tracing::warn!(schema = %self.schema, "no usable delivery journal (pgoutbox_delivered missing, or this role may not SELECT, INSERT and DELETE on it): marking rows COMPLETED one by one; run `pgoutbox migrate` (with --relay-role for a least-privilege role) or `pgoutbox adopt`");
            }
            self.missing = true;
            return Ok(());
        }
        self.missing = false;
        let row = c
            .query_one(&self.journal.rows_sql(), &[&self.journal.outbox()])
            .await?;
        self.unfolded = Some(row.get::<_, i64>(0).max(0) as u64);
        Ok(())
    }

    fn has_unfolded(&self) -> bool {
        self.active() && self.unfolded.is_some_and(|n| n > 0)
    }

    /// Folds the oldest entries once, if the relay has room (`forced`:
    /// whether or not).
    async fn fold(
        &mut self,
        c: &tokio_postgres::Client,
        forced: bool,
    ) -> Result<(), tokio_postgres::Error> {
        if !forced && !self.caught_up(c).await? {
            return Ok(());
        }
        let f = self.journal.fold(c, &self.fold, FOLD_ENTRIES, true).await?;
        crate::metrics::metrics()
            .batch(crate::metrics::batch::JOURNAL_FOLD, f.rows.max(0) as usize);
        if f.entries == 0 {
            self.unfolded = Some(0);
        } else if let Some(n) = &mut self.unfolded {
            *n = n.saturating_sub(f.listed.max(1) as u64) + f.kept.max(0) as u64;
        }
        Ok(())
    }
}

async fn run(
    pg: crate::database::Settings,
    target: String,
    dead_table: String,
    journal: Option<JournalUse>,
    batching: Batching,
    mut rx: mpsc::UnboundedReceiver<Mark>,
    done: mpsc::UnboundedSender<Result<u64, String>>,
) {
    let mut journal = journal.map(JournalState::new);
    let mut sql = Sql::new(target, dead_table);
    let mut client: Option<(tokio_postgres::Client, PreparedByTable)> = None;
    let mut batch: Vec<Mark> = Vec::with_capacity(batching.size.max(1));
    // Marks taken at once: several statements' worth when they go to the
    // journal (pipelined, see `PIPELINED_ENTRIES`), one otherwise.
    let most = |journal: &Option<JournalState>| match journal {
        Some(j) if j.active() => batching.size.max(1) * PIPELINED_ENTRIES,
        _ => batching.size.max(1),
    };
    let mut backoff = Duration::from_millis(100);
    let mut unseen_since: Option<Instant> = None;
    let mut unflushed: Unflushed<Mark> = Unflushed::default();
    loop {
        if done.is_closed() {
            return;
        }
        let mut fold_now = false;
        // What the journal holds is read at connect: a writer that has not
        // connected yet does so at once rather than on its first mark, or
        // a relay with nothing new to deliver would never fold what an
        // earlier one left.
        let unread = journal
            .as_ref()
            .is_some_and(|j| j.active() && j.unfolded.is_none());
        // Marks have waited long enough for someone else to flush the WAL.
        let mut flush_now = unflushed
            .oldest()
            .is_some_and(|t| t.elapsed() >= wal_flush::FLUSH_PATIENCE);
        if batch.is_empty() && !unread && !flush_now {
            // Idle with journal entries to fold: fold unless marks come.
            // With marks waiting for the WAL flush: flush it unless it is
            // flushed by then.
            let fold_at = journal
                .as_ref()
                .is_some_and(JournalState::has_unfolded)
                .then(|| Instant::now() + FOLD_IDLE);
            let flush_at = unflushed.oldest().map(|t| t + wal_flush::FLUSH_PATIENCE);
            match fold_at.into_iter().chain(flush_at).min() {
                Some(at) => tokio::select! {
                    more = gather(&mut rx, &mut batch, batching, most(&journal)) => if !more { return },
                    _ = tokio::time::sleep_until(at.into()) => {
                        flush_now = flush_at.is_some_and(|f| f <= at);
                        fold_now = !flush_now;
                    }
                },
                None => {
                    if !gather(&mut rx, &mut batch, batching, most(&journal)).await {
                        return;
                    }
                }
            }
        }
        if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            // Marks committed on a connection that is gone may be gone with
            // the server: apply them again (wal_flush).
            let again = unflushed.take_all();
            if !again.is_empty() {
                batch.splice(0..0, again);
            }
            match connect(&pg, journal.as_mut()).await {
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
        if flush_now || (batch.is_empty() && !unflushed.is_empty()) {
            let force = journal.as_ref().filter(|_| flush_now).map(|j| &j.journal);
            if let Err(e) = settle(c, &mut unflushed, force, &done).await {
                tracing::warn!(error = %crate::error::postgres_text(&e), "waiting for the WAL flush failed; marking again");
                client = None;
                tokio::time::sleep(backoff).await;
                continue;
            }
            if batch.is_empty() && !fold_now {
                continue;
            }
        }
        if fold_now || batch.is_empty() {
            let folded = match journal.as_mut().filter(|j| j.has_unfolded()) {
                Some(j) => j.fold(c, false).await,
                None => Ok(()),
            };
            if let Err(e) = folded {
                tracing::warn!(error = %crate::error::postgres_text(&e), "folding the delivery journal failed; retrying");
                client = None;
                tokio::time::sleep(backoff).await;
            }
            continue;
        }
        let full = batch.len() >= batching.size.max(1);
        match apply(
            c,
            statements,
            &mut sql,
            journal.as_mut(),
            &batch,
            batching.size,
        )
        .await
        {
            Ok(unseen) => {
                backoff = Duration::from_millis(100);
                let gave_up = unseen_since.is_some_and(|t: Instant| t.elapsed() > UNSEEN_PATIENCE);
                let (applied, retry) = sort_applied(&mut batch, unseen, gave_up, &sql);
                let positions = if journal.as_ref().is_some_and(JournalState::active) {
                    // Committed without waiting for the flush (wal_flush).
                    c.query_one(wal_flush::POSITIONS_SQL, &[]).await.map(Some)
                } else {
                    // Committed and flushed.
                    Ok(None)
                };
                match positions {
                    Ok(None) => report(applied, &done),
                    Ok(Some(row)) => {
                        let (committed, flushed) = (row.get(0), row.get(1));
                        unflushed.push(Lsn::from_position(committed), applied, Instant::now());
                        report(unflushed.release(Lsn::from_position(flushed)), &done);
                    }
                    Err(e) => {
                        tracing::warn!(error = %crate::error::postgres_text(&e), "reading the WAL position after marking failed; marking again");
                        batch = applied;
                        batch.extend(retry);
                        client = None;
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                }
                if retry.is_empty() {
                    unseen_since = None;
                } else {
                    unseen_since.get_or_insert_with(Instant::now);
                    batch = retry;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                // Fold behind the marks when they leave room (a batch that
                // was not full: the relay keeps up), or when the journal
                // outgrew its bound.
                let folded = match journal.as_mut().filter(|j| j.has_unfolded()) {
                    Some(j) if j.unfolded.is_some_and(|n| n > FOLD_AT_ROWS) => {
                        j.fold(c, true).await
                    }
                    Some(j) if !full => j.fold(c, false).await,
                    _ => Ok(()),
                };
                if let Err(e) = folded {
                    tracing::warn!(error = %crate::error::postgres_text(&e), "folding the delivery journal failed; retrying");
                    client = None;
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

async fn connect(
    pg: &crate::database::Settings,
    journal: Option<&mut JournalState>,
) -> Result<(tokio_postgres::Client, PreparedByTable), tokio_postgres::Error> {
    let client = crate::database::connect(pg).await?;
    if let Some(j) = journal {
        j.connected(&client).await?;
        if j.active() {
            client.batch_execute(wal_flush::ASYNC_COMMIT_SQL).await?;
        }
    }
    Ok((client, HashMap::new()))
}
