//! The pipeline's half of exactly-once delivery (see [`super::exactly_once`]):
//! opening Kafka transactions, skipping what a committed one already holds,
//! committing on cadence with the progress record, and marking rows only
//! once their transaction committed (ARCHITECTURE.md, invariant 13).

use bytes::Bytes;

use super::exactly_once::{self, Committing, OpenTxn, Position, RowRef, TxnFailure};
use super::{Delivery, Failure, InFlight, KafkaRecord, Pipeline, Source, TxId};
use crate::error::Error;
use crate::metrics::metrics;
use crate::outbox::{Mark, MarkKind, RowKey};

impl Pipeline {
    /// Exactly-once: makes sure a Kafka transaction is open for the next
    /// record.
    pub(super) fn open_transaction(&mut self) -> Result<(), Error> {
        let Some(t) = &mut self.eos else {
            return Ok(());
        };
        if t.open.is_some() {
            return Ok(());
        }
        debug_assert!(t.committing.is_none(), "offered while a commit runs");
        let opened = t
            .held_since
            .take()
            .unwrap_or_else(tokio::time::Instant::now);
        let open = OpenTxn {
            opened,
            tickets: Vec::new(),
            rows: Vec::new(),
        };
        // What the last commit recorded, again: the commit of this one
        // supersedes it in the same transaction.
        let progress = progress_record(t, &open);
        if let Err(e) = self.sink.begin_transaction(progress) {
            return Err(transaction_error("beginning a Kafka transaction", e));
        }
        t.open = Some(open);
        Ok(())
    }

    /// Exactly-once: the record with `ticket` was sent in the open Kafka
    /// transaction.
    pub(super) fn joined_transaction(&mut self, ticket: u64) {
        let Some(t) = &mut self.eos else { return };
        let (row, at) = match self.window.get(ticket) {
            Some(f) => (row_id(&f.source), f.at),
            None => (None, None),
        };
        if let Some(open) = &mut t.open {
            open.tickets.push(ticket);
            open.rows.extend(row);
        }
        self.offered(at);
    }

    /// Exactly-once: the event at `at` was offered (sent, dead-lettered or
    /// skipped): the next progress record may pass it.
    pub(super) fn offered(&mut self, at: Option<Position>) {
        if let (Some(t), Some(p)) = (&mut self.eos, at) {
            t.offered = t.offered.max(Some(p));
        }
    }

    /// Exactly-once: an event a committed Kafka transaction already holds
    /// is not sent again, but its row is still marked `COMPLETED`
    /// (ARCHITECTURE.md, invariant 13).
    pub(super) fn skip(&mut self, tx: TxId, source: Source, at: Option<Position>) {
        metrics().transactions.skipped.inc();
        self.counters.skipped += 1;
        let key = match &source {
            Source::Row(key) if self.mark_completed => Some(key.clone()),
            _ => None,
        };
        let ticket = self.push_unsent(tx, source, at);
        self.offered(at);
        match key {
            Some(key) => self.mark(Mark {
                ticket,
                kind: MarkKind::Completed(key),
            }),
            None => self.release(ticket),
        }
    }

    /// Exactly-once: when the open Kafka transaction is due, if one is.
    pub(super) fn commit_due(&self) -> Option<tokio::time::Instant> {
        self.eos.as_ref()?.due(!self.window.has_room())
    }

    /// Exactly-once: starts committing the open Kafka transaction with its
    /// progress record.
    pub(super) fn start_commit(&mut self) {
        let Some(t) = &mut self.eos else { return };
        let Some(open) = t.open.take() else { return };
        t.reached = t.reached.max(t.offered);
        let progress = progress_record(t, &open);
        if let Some((_, rows)) = &mut t.backfill {
            *rows += open.rows.len() as u64;
        }
        let future = self.sink.commit_transaction(progress);
        t.committing = Some(Committing {
            started: tokio::time::Instant::now(),
            tickets: open.tickets,
            position: t.reached,
            future,
        });
    }

    /// Exactly-once: the commit finished. Committed events count as
    /// delivered: rows are marked now (durable once the mark is), the rest
    /// are durable.
    pub(super) async fn on_committed(
        &mut self,
        result: Result<(), TxnFailure>,
    ) -> Result<(), Error> {
        let Some(t) = &mut self.eos else {
            return Ok(());
        };
        let Some(done) = t.committing.take() else {
            return Ok(());
        };
        let m = metrics();
        match result {
            Ok(()) => {
                m.transactions
                    .commit_latency
                    .observe(done.started.elapsed().as_secs_f64());
                m.transactions
                    .transactions
                    .with_label_values(&["committed"])
                    .inc();
                m.transactions.events.observe(done.tickets.len() as f64);
                if let Some(p) = done.position {
                    m.transactions.committed_lsn.set(p.lsn.0 as i64);
                }
                self.counters.transactions += 1;
                let now = std::time::SystemTime::now();
                for &ticket in &done.tickets {
                    if let Some(f) = self.window.get(ticket) {
                        self.observe_since_commit(&m.event_delivered_latency, f.tx, now);
                    }
                }
                for ticket in done.tickets {
                    let key = match self.window.get(ticket) {
                        Some(InFlight {
                            source: Source::Row(key),
                            ..
                        }) if self.mark_completed => Some(key.clone()),
                        _ => None,
                    };
                    match key {
                        Some(key) => self.mark(Mark {
                            ticket,
                            kind: MarkKind::Completed(key),
                        }),
                        None => self.release(ticket),
                    }
                }
                // The records read meanwhile go out once the markers had
                // time to be written (`send_held`).
                if let Some(t) = &mut self.eos {
                    t.settle_until =
                        Some(tokio::time::Instant::now() + exactly_once::MARKER_SETTLE);
                }
                Ok(())
            }
            Err(e) => {
                m.transactions
                    .transactions
                    .with_label_values(&["aborted"])
                    .inc();
                if let TxnFailure::Abort(_) = e {
                    let _ = self.sink.abort_transaction().await;
                }
                Err(transaction_error("committing a Kafka transaction", e))
            }
        }
    }

    /// Exactly-once: sends the records read while the last commit ran and
    /// its markers settled, in a new Kafka transaction.
    pub(super) async fn send_held(&mut self) -> Result<(), Error> {
        if let Some(t) = &mut self.eos {
            t.settle_until = None;
        }
        loop {
            let Some((ticket, record)) = self.eos.as_mut().and_then(|t| t.held.pop_front()) else {
                return Ok(());
            };
            self.open_transaction()?;
            self.send_record(ticket, record).await?;
        }
    }

    /// Exactly-once: an acknowledgement means little until the commit; a
    /// failure dooms the open Kafka transaction. A record refused for good
    /// is dead-lettered and remembered, so that the replay after the abort
    /// does not send it again.
    pub(super) fn on_transactional_delivery(&mut self, d: Delivery) -> Result<(), Error> {
        match d.result {
            Ok(()) => {
                self.counters.acked += 1;
                Ok(())
            }
            Err(Failure::Permanent(why)) => {
                let at = self.window.get(d.ticket).and_then(|f| f.at);
                if let Some(p) = at {
                    if let Ok(mut refused) = exactly_once::refused().lock() {
                        refused.insert(p);
                    }
                }
                self.dead_letter(d.ticket, why.clone());
                Err(Error::Transient(format!(
                    "Kafka refused a record for good ({why}); it is dead-lettered, and the Kafka transaction holding it is aborted: resuming from the last committed position"
                )))
            }
            Err(Failure::Transient(why)) => Err(self.kafka_failed(
                "kafka delivery failed; the open Kafka transaction is aborted and the relay resumes from the last committed position",
                why,
            )),
        }
    }
}

/// The progress record a commit of `open` writes, as a Kafka record.
fn progress_record(t: &exactly_once::Transactions, open: &OpenTxn) -> KafkaRecord {
    let value = serde_json::to_vec(&t.record(open)).unwrap_or_default();
    KafkaRecord {
        topic: t.start.topic.clone(),
        key: Bytes::from(t.start.key.clone().into_bytes()),
        value: Bytes::from(value),
        tombstone: false,
        headers: Vec::new(),
        partition: None,
        timestamp: None,
    }
}

/// The integer id of an outbox row (what a progress record lists).
pub(super) fn row_id(source: &Source) -> Option<RowRef> {
    match source {
        Source::Row(key) => key_id(key),
        _ => None,
    }
}

/// The table and integer id of the row `key` names.
pub(super) fn key_id(key: &RowKey) -> Option<RowRef> {
    let id = std::str::from_utf8(&key.id).ok()?.parse().ok()?;
    Some((key.table.clone(), id))
}

/// The relay's action for a Kafka transaction that failed while `doing`.
pub(super) fn transaction_error(doing: &str, e: TxnFailure) -> Error {
    match e {
        TxnFailure::Abort(why) => Error::Transient(format!(
            "{doing}: {why}; the Kafka transaction is aborted and the relay resumes from the last committed position"
        )),
        TxnFailure::Fenced(why) => {
            metrics().transactions.fenced.inc();
            tracing::warn!(reason = %why, "another relay with the same transactional.id took over this stream: this relay stops serving and stands by");
            Error::Transient(format!(
                "{doing}: fenced by another relay with the same transactional.id ({why}); standing by"
            ))
        }
        TxnFailure::Fatal(why) => Error::Fatal(format!("{doing}: {why}")),
    }
}

/// A session that ends with a Kafka transaction open or committing leaves
/// it to be aborted (by the broker, or by the next session's
/// `init_transactions`): counted as aborted.
impl Drop for Pipeline {
    fn drop(&mut self) {
        if let Some(t) = &self.eos {
            if t.open.is_some() || t.committing.is_some() {
                metrics()
                    .transactions
                    .transactions
                    .with_label_values(&["aborted"])
                    .inc();
            }
        }
    }
}
