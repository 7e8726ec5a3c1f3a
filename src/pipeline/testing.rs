//! In-memory fakes of the sink and the marker, and a rig that holds a
//! pipeline between them, for unit tests of the pipeline and of the
//! sources that drive it. Nothing here talks to Kafka or PostgreSQL.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{
    CommitFuture, Delivery, Failure, KafkaRecord, Limits, MarkVerdict, Marker, Pipeline,
    RecordBuilder, RecordSink, SendError, TxnFailure,
};
use crate::config::TopicTemplate;
use crate::outbox::{Mark, MarkKind};
use crate::Lsn;

type Shared<T> = Arc<Mutex<T>>;

/// A sink that keeps what it was sent; refuses sends from a queue of
/// prepared errors first; acknowledges at once when `auto_ack` is set.
pub(crate) struct FakeSink {
    sent: Shared<Vec<(u64, KafkaRecord)>>,
    refusals: Shared<VecDeque<SendError>>,
    auto_ack: Option<mpsc::UnboundedSender<Delivery>>,
    /// Transactions: "begin", and the progress record of each commit.
    transactions: Shared<Vec<Option<KafkaRecord>>>,
    /// The progress record each transaction was opened with.
    opened_with: Shared<Vec<KafkaRecord>>,
    /// Outcomes of the next commits (`Ok` when none is queued).
    commit_outcomes: Shared<VecDeque<Result<(), TxnFailure>>>,
    /// How long each commit takes.
    commit_time: Shared<Duration>,
}

impl RecordSink for FakeSink {
    fn send(&self, ticket: u64, record: &KafkaRecord) -> Result<(), SendError> {
        if let Some(e) = self.refusals.lock().unwrap().pop_front() {
            return Err(e);
        }
        self.sent.lock().unwrap().push((ticket, record.clone()));
        if let Some(acks) = &self.auto_ack {
            let _ = acks.send(Delivery {
                ticket,
                result: Ok(()),
            });
        }
        Ok(())
    }

    fn is_fatal(&self) -> bool {
        false
    }

    fn flush(&self, _timeout: Duration) -> bool {
        true
    }

    fn begin_transaction(&self, progress: KafkaRecord) -> Result<(), TxnFailure> {
        self.opened_with.lock().unwrap().push(progress);
        self.transactions.lock().unwrap().push(None);
        Ok(())
    }

    fn commit_transaction(&self, progress: KafkaRecord) -> CommitFuture {
        self.transactions.lock().unwrap().push(Some(progress));
        let outcome = self
            .commit_outcomes
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(()));
        let takes = *self.commit_time.lock().unwrap();
        tokio::spawn(async move {
            if !takes.is_zero() {
                tokio::time::sleep(takes).await;
            }
            outcome
        })
    }
}

/// A marker that keeps the marks; makes each durable at once when
/// `auto_durable` is set.
pub(crate) struct FakeMarker {
    marks: Shared<Vec<Mark>>,
    auto_durable: Option<mpsc::UnboundedSender<MarkVerdict>>,
}

impl Marker for FakeMarker {
    fn mark(&self, mark: Mark) -> bool {
        if let Some(done) = &self.auto_durable {
            let _ = done.send(Ok(mark.ticket));
        }
        self.marks.lock().unwrap().push(mark);
        true
    }
}

/// A pipeline between a [`FakeSink`] and a [`FakeMarker`], with the
/// handles a test needs to play Kafka and the database.
pub(crate) struct Rig {
    /// The pipeline under test.
    pub pipeline: Pipeline,
    sent: Shared<Vec<(u64, KafkaRecord)>>,
    refusals: Shared<VecDeque<SendError>>,
    marks: Shared<Vec<Mark>>,
    acks: mpsc::UnboundedSender<Delivery>,
    durable: mpsc::UnboundedSender<MarkVerdict>,
    transactions: Shared<Vec<Option<KafkaRecord>>>,
    opened_with: Shared<Vec<KafkaRecord>>,
    commit_outcomes: Shared<VecDeque<Result<(), TxnFailure>>>,
    commit_time: Shared<Duration>,
}

/// How a rig's fakes behave.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RigOptions {
    /// The window's event limit.
    pub max_events: usize,
    /// Mark acknowledged rows before they count as durable.
    pub mark_completed: bool,
    /// The sink acknowledges every send at once, the marker makes every
    /// mark durable at once.
    pub instant: bool,
    /// The slot's confirmed position the pipeline starts from.
    pub start: Lsn,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            max_events: 1000,
            mark_completed: true,
            instant: false,
            start: Lsn(100),
        }
    }
}

impl Rig {
    /// A rig whose records go to topic `{aggregate_type}.{event_type}`.
    pub fn new(options: RigOptions) -> Rig {
        let sent = Shared::default();
        let refusals = Shared::default();
        let marks = Shared::default();
        let (acks, deliveries) = mpsc::unbounded_channel();
        let (durable, verdicts) = mpsc::unbounded_channel();
        let transactions = Shared::default();
        let opened_with = Shared::default();
        let commit_outcomes = Shared::default();
        let commit_time = Shared::default();
        let sink = FakeSink {
            sent: sent.clone(),
            refusals: refusals.clone(),
            auto_ack: options.instant.then(|| acks.clone()),
            transactions: Arc::clone(&transactions),
            opened_with: Arc::clone(&opened_with),
            commit_outcomes: Arc::clone(&commit_outcomes),
            commit_time: Arc::clone(&commit_time),
        };
        let marker = FakeMarker {
            marks: marks.clone(),
            auto_durable: options.instant.then(|| durable.clone()),
        };
        let builder = RecordBuilder::new(
            TopicTemplate::parse("{aggregate_type}.{event_type}").expect("template"),
            vec![],
        );
        let pipeline = Pipeline::new(
            (Box::new(sink), deliveries),
            (Box::new(marker), verdicts),
            builder,
            Limits {
                max_events: options.max_events,
                max_bytes: usize::MAX,
                mark_completed: options.mark_completed,
            },
            options.start,
        );
        Rig {
            pipeline,
            sent,
            refusals,
            marks,
            acks,
            durable,
            transactions,
            opened_with,
            commit_outcomes,
            commit_time,
        }
    }

    /// The same rig delivering exactly once from `start`.
    pub fn exactly_once(mut self, start: super::ExactlyOnceStart) -> Rig {
        let placeholder = Rig::new(RigOptions::default()).pipeline;
        let pipeline = std::mem::replace(&mut self.pipeline, placeholder);
        self.pipeline = pipeline.exactly_once(start);
        self
    }

    /// Begins (`None`) and the progress record of each commit, in order.
    pub fn transactions(&self) -> Vec<Option<KafkaRecord>> {
        self.transactions.lock().unwrap().clone()
    }

    /// The progress record each transaction was opened with, in order.
    pub fn opened_with(&self) -> Vec<KafkaRecord> {
        self.opened_with.lock().unwrap().clone()
    }

    /// Every commit from now on takes `time` before it ends.
    pub fn commit_takes(&self, time: Duration) {
        *self.commit_time.lock().unwrap() = time;
    }

    /// Queues the outcome of the next commit (`Ok` once the queue is empty).
    pub fn commit_outcome(&self, outcome: Result<(), TxnFailure>) {
        self.commit_outcomes.lock().unwrap().push_back(outcome);
    }

    /// Tickets and records sent so far.
    pub fn sent(&self) -> Vec<(u64, KafkaRecord)> {
        self.sent.lock().unwrap().clone()
    }

    /// Marks queued so far.
    pub fn marks(&self) -> Vec<Mark> {
        self.marks.lock().unwrap().clone()
    }

    /// The tickets of the marks of `kind`'s variant (`"completed"`,
    /// `"dead_letter"`, `"dead_message"`).
    pub fn marked(&self, kind: &str) -> Vec<u64> {
        self.marks()
            .iter()
            .filter(|m| {
                matches!(
                    (&m.kind, kind),
                    (MarkKind::Completed(_), "completed")
                        | (MarkKind::DeadLetter(..), "dead_letter")
                        | (MarkKind::DeadMessage { .. }, "dead_message")
                )
            })
            .map(|m| m.ticket)
            .collect()
    }

    /// The next send is refused with `e`.
    pub fn refuse_next(&self, e: SendError) {
        self.refusals.lock().unwrap().push_back(e);
    }

    /// Kafka acknowledges `ticket`.
    pub fn ack(&self, ticket: u64) {
        self.deliver(ticket, Ok(()));
    }

    /// Kafka's verdict on `ticket`.
    pub fn deliver(&self, ticket: u64, result: Result<(), Failure>) {
        self.acks
            .send(Delivery { ticket, result })
            .expect("pipeline alive");
    }

    /// The mark of `ticket` committed.
    pub fn durable(&self, ticket: u64) {
        self.durable.send(Ok(ticket)).expect("pipeline alive");
    }

    /// The marker lost its database.
    pub fn marker_failed(&self, why: &str) {
        self.durable.send(Err(why.into())).expect("pipeline alive");
    }

    /// Applies every verdict sent so far; returns the flush position.
    pub fn settle(&mut self) -> Result<Lsn, crate::error::Error> {
        self.pipeline.drain()?;
        Ok(self.pipeline.flushed())
    }
}

/// An outbox event of aggregate `aggregate`, row `id`.
pub(crate) fn event(id: u64, aggregate: &str) -> crate::outbox::OutboxEvent {
    let mut e = crate::outbox::sample_event();
    e.id = bytes::Bytes::from(id.to_string());
    e.aggregate_id = bytes::Bytes::from(aggregate.to_owned());
    e
}

/// The source of row `id`.
pub(crate) fn row(id: u64) -> super::Source {
    let e = event(id, "a");
    super::Source::Row(crate::outbox::RowKey {
        table: None,
        id: e.id,
        created_at: e.created_at,
    })
}

/// A stream identity for exactly-once tests.
pub(crate) fn stream() -> super::StreamIdentity {
    super::StreamIdentity {
        system_identifier: "7300000000000000001".into(),
        database: "app".into(),
        slot: "pgoutbox".into(),
        timeline: 1,
    }
}
