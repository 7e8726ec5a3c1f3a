//! The delivery pipeline, shared by the snapshot backfill and the stream:
//! events go out as Kafka records through a [`RecordSink`], Kafka's verdicts
//! come back, rows are marked in the table through a [`Marker`], and the
//! pipeline's [`Progress`] learns when each event is durable, which is what
//! moves the flush LSN (ARCHITECTURE.md, invariants 1 and 2).
//!
//! The pipeline owns the in-flight window (bounded in events and bytes) and
//! the progress tracker. It knows neither rdkafka nor PostgreSQL: the Kafka
//! sink and the mark writer plug in through the two small traits below, and
//! the unit tests (`tests.rs`) drive it with in-memory fakes. When the
//! window is full the CDC session stops reading the replication socket
//! (backpressure), but never stops sending feedback (ARCHITECTURE.md, invariant 3).

pub mod exactly_once;
mod kafka_transaction;
pub mod progress;
pub mod record;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
mod window;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::Mode;
use crate::error::Error;
use crate::metrics::metrics;
use crate::outbox::{Mark, MarkKind, OutboxEvent, RowKey};
use crate::Lsn;

use exactly_once::Transactions;
pub use exactly_once::{
    CommitFuture, ExactlyOnceStart, Position, ProgressRecord, RowRef, RowSet, StreamIdentity,
    TxnFailure,
};
use kafka_transaction::row_id;
pub use progress::{Progress, TxId};
pub use record::{header, KafkaRecord, RecordBuilder, RecordError};
use window::Window;

/// Why a record could not be published.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// Never publishable as it is (too large, invalid topic): dead-letter it.
    #[error("{0}")]
    Permanent(String),
    /// Kafka is unavailable or the producer failed: restart the session.
    #[error("{0}")]
    Transient(String),
}

/// The outcome of one record, as the sink reports it.
#[derive(Debug)]
pub struct Delivery {
    /// The ticket passed to [`RecordSink::send`].
    pub ticket: u64,
    /// `Ok` once the broker has acknowledged it durably (`acks=all`).
    pub result: Result<(), Failure>,
}

/// Why [`RecordSink::send`] did not take the record.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The sink's local queue is full: wait for deliveries and retry.
    #[error("producer queue is full")]
    QueueFull,
    /// The record was refused.
    #[error(transparent)]
    Failed(#[from] Failure),
}

/// Where records go. Each record taken is answered later by exactly one
/// [`Delivery`] with its ticket, on the channel handed to
/// [`Pipeline::new`] beside the sink.
pub trait RecordSink: Send + Sync {
    /// Enqueues `record`; its outcome arrives later as a [`Delivery`].
    fn send(&self, ticket: u64, record: &KafkaRecord) -> Result<(), SendError>;
    /// True once the sink failed for good and must be rebuilt.
    fn is_fatal(&self) -> bool;
    /// Waits up to `timeout` for everything enqueued to be delivered.
    fn flush(&self, timeout: Duration) -> bool;
    /// Exactly-once: opens a Kafka transaction (local; records sent until
    /// the commit belong to it) and sends `progress` in it at once, so
    /// that the progress topic's partition joins the transaction with the
    /// first records' partitions rather than in a round trip of its own
    /// at commit; the progress record the commit sends supersedes it.
    fn begin_transaction(&self, progress: KafkaRecord) -> Result<(), TxnFailure> {
        let _ = progress;
        Err(TxnFailure::Fatal("this sink has no transactions".into()))
    }
    /// Exactly-once: sends `progress` in the open transaction and commits
    /// it; resolves once Kafka has committed (or refused) it.
    fn commit_transaction(&self, progress: KafkaRecord) -> CommitFuture {
        let _ = progress;
        tokio::spawn(async { Err(TxnFailure::Fatal("this sink has no transactions".into())) })
    }
    /// Exactly-once: aborts the open transaction (best effort).
    fn abort_transaction(&self) -> CommitFuture {
        tokio::spawn(async { Ok(()) })
    }
}

/// Where row marks go. Each mark taken is answered later by its ticket
/// (`Ok`) once the mark is durable, or by `Err` when the marker lost its
/// database, on the channel handed to [`Pipeline::new`] beside it.
pub trait Marker: Send + Sync {
    /// Queues a mark. Returns false if the marker has stopped.
    fn mark(&self, mark: Mark) -> bool;
}

impl Marker for crate::outbox::MarkWriter {
    fn mark(&self, mark: Mark) -> bool {
        crate::outbox::MarkWriter::mark(self, mark)
    }
}

/// The answers of a [`Marker`]: a durable ticket, or why marking stopped.
pub type MarkVerdict = Result<u64, String>;

/// How many waiting acknowledgements (and as many marks) one
/// [`Pipeline::next`] applies after the one it waited for.
const VERDICT_BATCH: usize = 1024;

/// Where an event came from: what to mark once Kafka has its verdict.
#[derive(Clone, Debug)]
pub enum Source {
    /// An outbox row: marked `COMPLETED` or `DEAD_LETTER`.
    Row(RowKey),
    /// A logical message: nothing to mark when delivered; recorded in
    /// `pgoutbox_dead_letters` when it can never be.
    Message {
        /// Its LSN.
        lsn: Lsn,
        /// Its prefix.
        prefix: String,
        /// Its content as sent.
        content: Bytes,
    },
    /// A row of a table that cannot be marked (no status column): nothing
    /// to mark when delivered; recorded in `pgoutbox_dead_letters` (as a
    /// JSON object of the event, prefix `row:<table>`) when it can never be.
    Unmarked {
        /// Its transaction's commit LSN, when known (0/0 otherwise).
        lsn: Lsn,
        /// The event, for the dead letter.
        event: Box<OutboxEvent>,
    },
}

/// One event in the window.
struct InFlight {
    tx: TxId,
    source: Source,
    /// Its topic, once built (`""` if it has none), for the metrics.
    topic: String,
    /// Its stream position (exactly-once delivery; `None` in a backfill).
    at: Option<Position>,
}

/// Counters for one session, logged periodically.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Events handed to Kafka.
    pub sent: u64,
    /// Events acknowledged by Kafka.
    pub acked: u64,
    /// Rows dead-lettered.
    pub dead_lettered: u64,
    /// Replayed events Kafka already had (exactly-once delivery).
    pub skipped: u64,
    /// Kafka transactions committed (exactly-once delivery).
    pub transactions: u64,
}

/// How big the in-flight window may grow, and whether rows are marked.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Events in flight, at most.
    pub max_events: usize,
    /// Bytes in flight, about at most.
    pub max_bytes: usize,
    /// Mark acknowledged rows `COMPLETED` before they count as durable.
    pub mark_completed: bool,
}

/// Events between "read" and "durable", and the position that is safe to
/// confirm.
pub struct Pipeline {
    sink: Box<dyn RecordSink>,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    marker: Box<dyn Marker>,
    durable: mpsc::UnboundedReceiver<MarkVerdict>,
    mark_completed: bool,
    builder: RecordBuilder,
    window: Window<InFlight>,
    progress: Progress,
    /// Counters since the session began.
    pub counters: Counters,
    /// `pgoutbox_events_read_total{mode="cdc"}`.
    read: prometheus::IntCounter,
    /// Exactly-once delivery's state (`None`: at least once).
    eos: Option<Transactions>,
    /// When the server sent the replication message being applied (its
    /// clock), for the `sent` stage of the events' latency.
    sent_at: Option<SystemTime>,
}

impl Pipeline {
    /// A pipeline that starts from `confirmed` (the slot's confirmed flush
    /// position), sends through `sink` and marks through `marker`, each
    /// with the channel its verdicts arrive on. Dead-lettered rows always
    /// go through the marker; acknowledged rows only with
    /// [`Limits::mark_completed`].
    pub fn new(
        sink: (Box<dyn RecordSink>, mpsc::UnboundedReceiver<Delivery>),
        marker: (Box<dyn Marker>, mpsc::UnboundedReceiver<MarkVerdict>),
        builder: RecordBuilder,
        limits: Limits,
        confirmed: Lsn,
    ) -> Pipeline {
        Pipeline {
            sink: sink.0,
            deliveries: sink.1,
            marker: marker.0,
            durable: marker.1,
            mark_completed: limits.mark_completed,
            builder,
            window: Window::new(limits.max_events, limits.max_bytes),
            progress: Progress::new(confirmed),
            counters: Counters::default(),
            read: metrics()
                .events_read
                .with_label_values(&[Mode::Cdc.as_str()]),
            eos: None,
            sent_at: None,
        }
    }

    /// Delivers exactly once from `start`: events go out in Kafka
    /// transactions with a progress record, replayed events Kafka already
    /// has are skipped (ARCHITECTURE.md, invariant 13).
    pub fn exactly_once(mut self, start: ExactlyOnceStart) -> Pipeline {
        self.eos = Some(Transactions::new(start));
        self
    }

    /// A transaction committing at `commit_lsn` began (in stream order);
    /// its events follow.
    pub fn begin(&mut self, commit_lsn: Lsn) -> TxId {
        if let Some(t) = &mut self.eos {
            t.next = Position {
                lsn: commit_lsn,
                index: 0,
            };
        }
        self.progress.begin()
    }

    /// A new slot's backfill begins: its rows are one transaction
    /// committing at `consistent_point` (see `cdc::backfill`).
    pub fn begin_backfill(&mut self, consistent_point: Lsn) -> TxId {
        if let Some(t) = &mut self.eos {
            t.backfill = Some((consistent_point, 0));
        }
        self.progress.begin()
    }

    /// The backfill's rows are all offered: commit the Kafka transaction
    /// holding the last of them now rather than at the cadence.
    pub fn end_backfill(&mut self) {
        self.commit_now();
    }

    /// The backfill is durable: later events are the stream's.
    pub fn backfill_done(&mut self) {
        if let Some(t) = &mut self.eos {
            t.backfill = None;
            t.skip_rows = None;
            t.force = false;
        }
    }

    /// Commits the open Kafka transaction as soon as it may (shutdown).
    pub fn commit_now(&mut self) {
        if let Some(t) = &mut self.eos {
            t.force = true;
        }
    }

    /// The position of the next stream event (`None` in a backfill or at
    /// least once), counted.
    fn take_position(&mut self) -> Option<Position> {
        let t = self.eos.as_mut()?;
        if t.backfill.is_some() {
            return None;
        }
        let at = t.next;
        t.next.index += 1;
        Some(at)
    }

    /// The transaction `tx` committed in PostgreSQL at `at` (its Begin's
    /// commit time): its events' latency is counted from there
    /// ([`crate::metrics::names::EVENT_LATENCY`]).
    pub fn committed_at(&mut self, tx: TxId, at: SystemTime) {
        self.progress.committed_at(tx, at);
    }

    /// The replication message applied next was sent by the server at `at`
    /// (its clock).
    pub fn sent_at(&mut self, at: SystemTime) {
        self.sent_at = Some(at);
    }

    /// Observes, in `histogram`, the time from `tx`'s PostgreSQL commit
    /// to `now` (nothing when the commit time is unknown; a clock behind
    /// PostgreSQL's counts as zero).
    fn observe_since_commit(&self, histogram: &prometheus::Histogram, tx: TxId, now: SystemTime) {
        if let Some(at) = self.progress.commit_time(tx) {
            let seconds = now.duration_since(at).unwrap_or_default().as_secs_f64();
            histogram.observe(seconds);
        }
    }

    /// The transaction `tx` committed at `end_lsn`: once its events (and
    /// every earlier transaction's) are durable, the flush position passes
    /// it.
    pub fn commit(&mut self, tx: TxId, end_lsn: Lsn) {
        self.progress.commit(tx, end_lsn);
    }

    /// A keepalive reported the server's WAL end.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        self.progress.keepalive(wal_end);
    }

    /// The position safe to confirm to PostgreSQL.
    pub fn flushed(&self) -> Lsn {
        self.progress.flushed()
    }

    /// True while more events may be read: the window has room and, with
    /// exactly-once delivery, the next Kafka transaction is not full
    /// (events read while a commit runs wait for the next one).
    pub fn has_room(&self) -> bool {
        self.window.has_room() && self.eos.as_ref().is_none_or(|t| !t.full())
    }

    /// Events sent and not yet durable.
    pub fn in_flight(&self) -> usize {
        self.window.len()
    }

    /// True when the sink failed for good: the session must end.
    pub fn sink_failed(&self) -> bool {
        self.sink.is_fatal()
    }

    /// Waits, applying verdicts, until the window has room for another
    /// event. The one place anything waits for room.
    pub async fn wait_for_room(&mut self) -> Result<(), Error> {
        while !self.window.has_room() {
            if !self.next().await? {
                return Err(Error::Transient(
                    "the Kafka producer went away while the in-flight window was full".into(),
                ));
            }
        }
        Ok(())
    }

    /// Sends `event` (of transaction `tx`), or dead-letters it when it can
    /// never be published. Errors only for transient Kafka failures.
    pub async fn offer(
        &mut self,
        tx: TxId,
        event: OutboxEvent,
        source: Source,
    ) -> Result<(), Error> {
        self.read.inc();
        self.progress.add_event(tx);
        let m = metrics();
        if let Some(sent) = self.sent_at {
            self.observe_since_commit(&m.event_sent_latency, tx, sent);
        }
        self.observe_since_commit(&m.event_read_latency, tx, SystemTime::now());
        let at = self.take_position();
        if let Some(t) = &self.eos {
            let row = row_id(&source);
            if t.already_sent(at, row.as_ref()) {
                self.skip(tx, source, at);
                return Ok(());
            }
            if at.is_some_and(|p| exactly_once::refused().lock().is_ok_and(|r| r.contains(&p))) {
                let ticket = self.push_unsent(tx, source, at);
                self.dead_letter(ticket, "Kafka refused this record for good inside a transaction (an earlier attempt); see the relay's log for the broker's reason".into());
                return Ok(());
            }
        }
        let record = match self.builder.build_owned(event) {
            Ok(r) => r,
            Err((e, topic)) => {
                // Counted under its topic when it has one (too large, say).
                let ticket = self.window.push(
                    0,
                    InFlight {
                        tx,
                        source,
                        topic,
                        at,
                    },
                );
                self.dead_letter(ticket, e.to_string());
                return Ok(());
            }
        };
        let ticket = self.window.push(
            record.size(),
            InFlight {
                tx,
                source,
                topic: String::new(),
                at,
            },
        );
        match &mut self.eos {
            // Kafka cannot take records while a commit runs (nor, usefully,
            // until its markers are written): they wait for the next
            // transaction, and reading goes on.
            Some(t) if t.holding() => {
                if t.held.is_empty() {
                    t.held_since = Some(tokio::time::Instant::now());
                }
                t.held.push_back((ticket, record));
                Ok(())
            }
            _ => {
                self.open_transaction()?;
                self.send_record(ticket, record).await
            }
        }
    }

    /// Hands the record of window entry `ticket` to the sink (in the open
    /// Kafka transaction, with exactly-once delivery), or dead-letters it
    /// when the sink refuses it for good.
    async fn send_record(&mut self, ticket: u64, record: KafkaRecord) -> Result<(), Error> {
        let refused = loop {
            match self.sink.send(ticket, &record) {
                Ok(()) => break None,
                Err(SendError::QueueFull) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(SendError::Failed(Failure::Permanent(why))) => break Some(why),
                Err(SendError::Failed(Failure::Transient(why))) => {
                    return Err(self.kafka_failed("kafka refused an event", why));
                }
            }
        };
        if let Some(f) = self.window.get_mut(ticket) {
            f.topic = record.topic;
        }
        match refused {
            None => {
                self.counters.sent += 1;
                self.joined_transaction(ticket);
            }
            Some(why) => self.dead_letter(ticket, why),
        }
        Ok(())
    }

    /// The session-ending error for a transient Kafka failure, naming a
    /// fatal producer error (the next session builds a new producer).
    fn kafka_failed(&self, what: &str, why: String) -> Error {
        if self.sink.is_fatal() {
            Error::Transient(format!(
                "the Kafka producer failed fatally ({what}: {why}); rebuilding it"
            ))
        } else {
            Error::Transient(format!("{what}: {why}"))
        }
    }

    /// Dead-letters an event that could not even be read (unreadable row
    /// columns, a malformed message envelope).
    pub fn dead_letter_unread(&mut self, tx: TxId, source: Source, why: String) {
        self.read.inc();
        self.progress.add_event(tx);
        let at = self.take_position();
        let ticket = self.push_unsent(tx, source, at);
        self.dead_letter(ticket, why);
    }

    /// Lets an event that is not sent (dead-lettered or skipped) into the
    /// window; returns its ticket.
    fn push_unsent(&mut self, tx: TxId, source: Source, at: Option<Position>) -> u64 {
        self.window.push(
            0,
            InFlight {
                tx,
                source,
                topic: String::new(),
                at,
            },
        )
    }

    fn dead_letter(&mut self, ticket: u64, why: String) {
        let Some(f) = self.window.get(ticket) else {
            return;
        };
        let kind = match &f.source {
            Source::Row(key) => {
                tracing::warn!(id = %String::from_utf8_lossy(&key.id), error = %why, "dead-lettering a row that can never be published");
                MarkKind::DeadLetter(key.clone(), why)
            }
            Source::Message {
                lsn,
                prefix,
                content,
            } => {
                tracing::warn!(%lsn, error = %why, "recording a logical message that can never be published");
                MarkKind::DeadMessage {
                    lsn: *lsn,
                    prefix: prefix.clone(),
                    content: content.clone(),
                    error: why,
                }
            }
            Source::Unmarked { lsn, event } => {
                tracing::warn!(table = %String::from_utf8_lossy(&event.table), tracking_id = %String::from_utf8_lossy(&event.tracking_id), error = %why, "recording a row that can never be published in pgoutbox_dead_letters (its table has no status to mark)");
                MarkKind::DeadMessage {
                    lsn: *lsn,
                    prefix: format!("row:{}", String::from_utf8_lossy(&event.table)),
                    content: event_json(event),
                    error: why,
                }
            }
        };
        metrics().dead_lettered(Mode::Cdc, &f.topic, 1);
        let at = f.at;
        self.offered(at);
        self.counters.dead_lettered += 1;
        self.mark(Mark { ticket, kind });
    }

    fn mark(&mut self, mark: Mark) {
        if let (Some(t), MarkKind::Completed(key)) = (&mut self.eos, &mark.kind) {
            if let Some(id) = kafka_transaction::key_id(key) {
                t.unmarked.insert(mark.ticket, id);
            }
        }
        let queued = self.marker.mark(mark);
        debug_assert!(queued, "the marker stopped");
    }

    /// Waits for the next verdict (delivery or durable mark) and applies it.
    /// Returns `Ok(false)` if neither channel can deliver any more.
    pub async fn next(&mut self) -> Result<bool, Error> {
        let due = self.commit_due();
        let settle = self.eos.as_ref().and_then(|t| t.settle_until);
        let committing = self
            .eos
            .as_mut()
            .and_then(|t| t.committing.as_mut())
            .map(|c| &mut c.future);
        let has_commit = committing.is_some();
        tokio::select! {
            biased;
            Some(d) = self.deliveries.recv() => { self.on_delivery(d)?; self.drain_some()?; Ok(true) }
            Some(t) = self.durable.recv() => { self.on_durable(t)?; self.drain_some()?; Ok(true) }
            r = async { committing.expect("guarded").await }, if has_commit => {
                let r = r.unwrap_or_else(|e| Err(TxnFailure::Abort(format!("the commit task failed: {e}"))));
                self.on_committed(r).await?;
                Ok(true)
            }
            _ = tokio::time::sleep_until(settle.unwrap_or_else(tokio::time::Instant::now)), if settle.is_some() => {
                self.send_held().await?;
                Ok(true)
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                self.start_commit();
                Ok(true)
            }
            else => Ok(false),
        }
    }

    /// Applies up to [`VERDICT_BATCH`] more acknowledgements and marks that
    /// are already waiting: verdicts come one per event, and taking each
    /// through its own `select!` (here and in the session's loop) cost more
    /// than handling it.
    fn drain_some(&mut self) -> Result<(), Error> {
        for _ in 0..VERDICT_BATCH {
            match self.deliveries.try_recv() {
                Ok(d) => self.on_delivery(d)?,
                Err(_) => break,
            }
        }
        for _ in 0..VERDICT_BATCH {
            match self.durable.try_recv() {
                Ok(t) => self.on_durable(t)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Applies every verdict already waiting, without blocking.
    pub fn drain(&mut self) -> Result<(), Error> {
        while let Ok(d) = self.deliveries.try_recv() {
            self.on_delivery(d)?;
        }
        while let Ok(t) = self.durable.try_recv() {
            self.on_durable(t)?;
        }
        Ok(())
    }

    fn on_durable(&mut self, t: MarkVerdict) -> Result<(), Error> {
        match t {
            Ok(ticket) => {
                if let Some(eos) = &mut self.eos {
                    eos.unmarked.remove(&ticket);
                }
                self.release(ticket);
                Ok(())
            }
            Err(why) => Err(Error::Transient(why)),
        }
    }

    fn on_delivery(&mut self, d: Delivery) -> Result<(), Error> {
        if self.eos.is_some() {
            return self.on_transactional_delivery(d);
        }
        match d.result {
            Ok(()) => {
                self.counters.acked += 1;
                if let Some(f) = self.window.get(d.ticket) {
                    let h = &metrics().event_delivered_latency;
                    self.observe_since_commit(h, f.tx, SystemTime::now());
                }
                let row = match self.window.get(d.ticket) {
                    Some(InFlight {
                        source: Source::Row(key),
                        ..
                    }) => Some(key.clone()),
                    _ => None,
                };
                match row {
                    Some(key) if self.mark_completed => {
                        self.mark(Mark {
                            ticket: d.ticket,
                            kind: MarkKind::Completed(key),
                        });
                    }
                    _ => self.release(d.ticket),
                }
                Ok(())
            }
            Err(Failure::Permanent(why)) => {
                self.dead_letter(d.ticket, why);
                Ok(())
            }
            Err(Failure::Transient(why)) => Err(self.kafka_failed("kafka delivery failed", why)),
        }
    }

    fn release(&mut self, ticket: u64) {
        if let Some(f) = self.window.release(ticket) {
            self.progress.done(f.tx);
        }
    }

    /// Waits until every event sent is durable, or `deadline` passes.
    /// Returns whether the window emptied.
    pub async fn settle(&mut self, deadline: tokio::time::Instant) -> Result<bool, Error> {
        while self.window.len() > 0 {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return Ok(false),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Flushes the sink for at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.sink.flush(timeout)
    }
}

/// An event as a JSON object of its fields' text, for the dead letter of a
/// row that cannot be marked.
fn event_json(event: &OutboxEvent) -> Bytes {
    let text = |b: &Bytes| serde_json::Value::String(String::from_utf8_lossy(b).into_owned());
    let json = serde_json::json!({
        "table": text(&event.table),
        "event_id": text(&event.tracking_id),
        "aggregate_type": text(&event.aggregate_type),
        "aggregate_id": text(&event.aggregate_id),
        "event_type": text(&event.event_type),
        "timestamp": text(&event.created_at),
        "payload": text(&event.payload),
    });
    Bytes::from(json.to_string())
}
