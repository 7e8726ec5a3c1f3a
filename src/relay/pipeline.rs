//! The delivery pipeline shared by the snapshot backfill and the stream:
//! events go out to Kafka through the [`Sink`], Kafka's verdicts come back,
//! rows are marked in the table, and each event's transaction is told when
//! the event is durable.
//!
//! The in-flight window is bounded in events and bytes; when it is full the
//! relay stops reading the replication socket (backpressure), but never
//! stops sending feedback.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::progress::{Progress, TxId};
use crate::config::Mode;
use crate::error::Error;
use crate::metrics::metrics;
use crate::outbox::{Mark, MarkKind, RowKey, StatusWriter};
use crate::route::{OutboxEvent, Router};
use crate::sink::{Delivery, Failure, SendError, Sink};
use crate::Lsn;

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
}

struct InFlight {
    tx: TxId,
    bytes: usize,
    source: Source,
    /// Its topic, once rendered (`""` if it has none), for the metrics.
    topic: String,
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
}

/// Events between "read" and "durable".
pub struct Pipeline {
    sink: Sink,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    writer: StatusWriter,
    durable: mpsc::UnboundedReceiver<Result<u64, String>>,
    mark_completed: bool,
    router: Router,
    window: VecDeque<Option<InFlight>>,
    base: u64,
    events: usize,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
    /// Counters since the session began.
    pub counters: Counters,
    /// `pgoutbox_events_read_total{mode="cdc"}`.
    read: prometheus::IntCounter,
}

impl Pipeline {
    /// A pipeline over `sink`. `writer_for` starts the status writer that
    /// reports durable tickets on the channel it is given. With
    /// `mark_completed`, acknowledged rows are marked `COMPLETED` before they
    /// count as durable; dead-lettered rows always go through the writer.
    pub fn new(
        sink: (Sink, mpsc::UnboundedReceiver<Delivery>),
        router: Router,
        max_events: usize,
        max_bytes: usize,
        writer_for: impl FnOnce(mpsc::UnboundedSender<Result<u64, String>>) -> StatusWriter,
        mark_completed: bool,
    ) -> Pipeline {
        let (durable_tx, durable) = mpsc::unbounded_channel();
        let writer = writer_for(durable_tx);
        Pipeline {
            sink: sink.0,
            deliveries: sink.1,
            writer,
            durable,
            mark_completed,
            router,
            window: VecDeque::new(),
            base: 0,
            events: 0,
            bytes: 0,
            max_events,
            max_bytes,
            counters: Counters::default(),
            read: metrics()
                .events_read
                .with_label_values(&[Mode::Cdc.as_str()]),
        }
    }

    /// True while more events may be sent.
    pub fn has_room(&self) -> bool {
        self.events < self.max_events && self.bytes < self.max_bytes
    }

    /// Events sent and not yet durable.
    pub fn in_flight(&self) -> usize {
        self.events
    }

    /// True when librdkafka reported a fatal error: the session must end.
    pub fn sink_failed(&self) -> bool {
        self.sink.is_fatal()
    }

    /// Sends `event` (of transaction `tx`), or dead-letters it when it can
    /// never be published. Errors only for transient Kafka failures.
    pub async fn offer(
        &mut self,
        progress: &mut Progress,
        tx: TxId,
        event: OutboxEvent,
        source: Source,
    ) -> Result<(), Error> {
        self.read.inc();
        let bytes = event.wire_size();
        let ticket = self.base + self.window.len() as u64;
        self.window.push_back(Some(InFlight {
            tx,
            bytes,
            source,
            topic: String::new(),
        }));
        self.events += 1;
        self.bytes += bytes;
        progress.add_event(tx);
        let topic = match self.router.render(&event) {
            Ok(t) => t,
            Err(e) => {
                self.dead_letter(ticket, e.to_string());
                return Ok(());
            }
        };
        let refused = loop {
            match self.sink.send(ticket, &topic, &event) {
                Ok(()) => break None,
                Err(SendError::QueueFull) => {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                Err(SendError::Failed(Failure::Permanent(why))) => break Some(why),
                Err(SendError::Failed(Failure::Transient(why))) => {
                    return Err(self.kafka_failed("kafka refused an event", why));
                }
            }
        };
        // Nothing else touched the window meanwhile (`&mut self`).
        if let Some(Some(f)) = self.window.back_mut() {
            f.topic = topic;
        }
        match refused {
            None => self.counters.sent += 1,
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
    pub fn dead_letter_unread(
        &mut self,
        progress: &mut Progress,
        tx: TxId,
        source: Source,
        why: String,
    ) {
        self.read.inc();
        let ticket = self.base + self.window.len() as u64;
        self.window.push_back(Some(InFlight {
            tx,
            bytes: 0,
            source,
            topic: String::new(),
        }));
        self.events += 1;
        progress.add_event(tx);
        self.dead_letter(ticket, why);
    }

    fn dead_letter(&mut self, ticket: u64, why: String) {
        let Some(Some(f)) = self.slot(ticket) else {
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
        };
        metrics().dead_lettered(Mode::Cdc, &f.topic, 1);
        self.counters.dead_lettered += 1;
        self.mark(Mark { ticket, kind });
    }

    fn mark(&mut self, mark: Mark) {
        let queued = self.writer.mark(mark);
        debug_assert!(queued, "status writer stopped");
    }

    fn slot(&self, ticket: u64) -> Option<&Option<InFlight>> {
        let idx = usize::try_from(ticket.checked_sub(self.base)?).ok()?;
        self.window.get(idx)
    }

    /// Waits for the next verdict (delivery or durable mark) and applies it.
    /// Returns `Ok(false)` if neither channel can deliver any more.
    pub async fn next(&mut self, progress: &mut Progress) -> Result<bool, Error> {
        tokio::select! {
            biased;
            Some(d) = self.deliveries.recv() => { self.on_delivery(progress, d)?; Ok(true) }
            Some(t) = self.durable.recv() => { self.on_durable(progress, t)?; Ok(true) }
            else => Ok(false),
        }
    }

    /// Applies every verdict already waiting, without blocking.
    pub fn drain(&mut self, progress: &mut Progress) -> Result<(), Error> {
        while let Ok(d) = self.deliveries.try_recv() {
            self.on_delivery(progress, d)?;
        }
        while let Ok(t) = self.durable.try_recv() {
            self.on_durable(progress, t)?;
        }
        Ok(())
    }

    fn on_durable(&mut self, progress: &mut Progress, t: Result<u64, String>) -> Result<(), Error> {
        match t {
            Ok(ticket) => {
                self.release(progress, ticket);
                Ok(())
            }
            Err(why) => Err(Error::Transient(why)),
        }
    }

    fn on_delivery(&mut self, progress: &mut Progress, d: Delivery) -> Result<(), Error> {
        match d.result {
            Ok(()) => {
                self.counters.acked += 1;
                let row = match self.slot(d.ticket) {
                    Some(Some(InFlight {
                        source: Source::Row(key),
                        ..
                    })) => Some(key.clone()),
                    _ => None,
                };
                match row {
                    Some(key) if self.mark_completed => {
                        self.mark(Mark {
                            ticket: d.ticket,
                            kind: MarkKind::Completed(key),
                        });
                    }
                    _ => self.release(progress, d.ticket),
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

    fn release(&mut self, progress: &mut Progress, ticket: u64) {
        let Some(idx) = ticket
            .checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        let Some(slot) = self.window.get_mut(idx) else {
            return;
        };
        let Some(f) = slot.take() else { return };
        self.events -= 1;
        self.bytes -= f.bytes;
        progress.done(f.tx);
        while matches!(self.window.front(), Some(None)) {
            self.window.pop_front();
            self.base += 1;
        }
    }

    /// Waits until every event sent is durable, or `deadline` passes.
    /// Returns whether the window emptied.
    pub async fn settle(
        &mut self,
        progress: &mut Progress,
        deadline: tokio::time::Instant,
    ) -> Result<bool, Error> {
        while self.events > 0 {
            match tokio::time::timeout_at(deadline, self.next(progress)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return Ok(false),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Flushes the producer for at most `timeout`.
    pub fn flush(&self, timeout: std::time::Duration) -> bool {
        self.sink.flush(timeout)
    }
}
