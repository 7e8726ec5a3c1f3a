//! From decoded pgoutput messages to pipeline work: which inserts and
//! logical messages are outbox events, in which transaction, and what is held
//! back.
//!
//! - Inserts into a published relation that has the outbox columns become
//!   events (routed by that table's template); other relations are ignored.
//! - Logical messages whose prefix is the configured one carry an outbox
//!   envelope (see [`crate::outbox::envelope`]); a malformed one is recorded
//!   in `pgoutbox_dead_letters` with its LSN and skipped. Non-transactional
//!   messages are ignored unless enabled.
//! - Streamed in-progress transactions (protocol 2+, `streaming` on) are held
//!   per transaction until Stream Commit, and dropped on Stream Abort (whole
//!   transaction or one subtransaction), so nothing is published before its
//!   commit.

use std::collections::HashMap;

use crate::error::Error;
use crate::outbox::{envelope, OutboxColumns, OutboxEvent, RowKey};
use crate::pgoutput::{Insert, LogicalMessage, Message};
use crate::pipeline::{Pipeline, Source, TxId};

/// Which logical messages are outbox events.
#[derive(Clone, Debug)]
pub(super) struct MessageFilter {
    /// The prefix marking an outbox envelope.
    pub prefix: String,
    /// Whether non-transactional messages are relayed too.
    pub non_transactional: bool,
}

/// One change that matters to the relay.
// Nearly every item is an Event; boxing it would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
enum Item {
    /// An event to publish.
    Event(OutboxEvent, Source),
    /// Something that can never be published: dead-letter it.
    Unreadable(Source, String),
}

/// Decoding state of one replication session.
pub(super) struct Changes {
    relations: HashMap<u32, Option<OutboxColumns>>,
    open_tx: Option<TxId>,
    in_stream: Option<u32>,
    /// Held streamed changes by top-level xid, each with its (sub)xid.
    streamed: HashMap<u32, Vec<(u32, Item)>>,
    messages: Option<MessageFilter>,
}

impl Changes {
    /// A fresh state; `messages` enables the table-less outbox.
    pub(super) fn new(messages: Option<MessageFilter>) -> Changes {
        Changes {
            relations: HashMap::new(),
            open_tx: None,
            in_stream: None,
            streamed: HashMap::new(),
            messages,
        }
    }

    /// Events held for streamed transactions not yet committed.
    pub(super) fn held(&self) -> usize {
        self.streamed.values().map(Vec::len).sum()
    }

    /// Applies one decoded message.
    pub(super) async fn apply(
        &mut self,
        message: LogicalMessage,
        pipeline: &mut Pipeline,
    ) -> Result<(), Error> {
        match message {
            LogicalMessage::Begin(_) => {
                self.open_tx = Some(pipeline.begin());
            }
            LogicalMessage::Commit(c) => {
                let tx = self.open_tx.take().ok_or_else(|| {
                    Error::Fatal(format!("Commit at {} without Begin", c.end_lsn))
                })?;
                pipeline.commit(tx, c.end_lsn);
            }
            LogicalMessage::Relation(r) => {
                let cols = match OutboxColumns::from_relation(&r) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring inserts into a published table that is not an outbox");
                        None
                    }
                };
                self.relations.insert(r.id, cols);
            }
            LogicalMessage::Insert(ins) => {
                let sub = ins.xid;
                if let Some(item) = self.insert(&ins)? {
                    self.route(sub, item, pipeline).await?;
                }
            }
            LogicalMessage::Message(m) => {
                let Some(filter) = &self.messages else {
                    return Ok(());
                };
                if m.prefix != filter.prefix {
                    return Ok(());
                }
                if !m.transactional {
                    if !filter.non_transactional {
                        tracing::debug!(lsn = %m.lsn, "ignoring a non-transactional outbox message (not enabled)");
                        return Ok(());
                    }
                    // Outside any transaction: confirmable at its own LSN.
                    let tx = pipeline.begin();
                    self.publish(tx, message_item(&m), pipeline).await?;
                    pipeline.commit(tx, m.lsn);
                    return Ok(());
                }
                let sub = m.xid;
                self.route(sub, message_item(&m), pipeline).await?;
            }
            LogicalMessage::StreamStart(s) => {
                self.in_stream = Some(s.xid);
                self.streamed.entry(s.xid).or_default();
            }
            LogicalMessage::StreamStop => {
                self.in_stream = None;
            }
            LogicalMessage::StreamCommit(c) => {
                let items = self.streamed.remove(&c.xid).unwrap_or_default();
                let tx = pipeline.begin();
                for (_, item) in items {
                    pipeline.wait_for_room().await?;
                    self.publish(tx, item, pipeline).await?;
                }
                pipeline.commit(tx, c.end_lsn);
            }
            LogicalMessage::StreamAbort(a) => {
                if a.subxid == a.xid {
                    self.streamed.remove(&a.xid);
                } else if let Some(items) = self.streamed.get_mut(&a.xid) {
                    items.retain(|(sub, _)| *sub != a.subxid);
                }
            }
            LogicalMessage::Update(_)
            | LogicalMessage::Delete(_)
            | LogicalMessage::Truncate(_)
            | LogicalMessage::Origin(_)
            | LogicalMessage::Type(_) => {}
            LogicalMessage::BeginPrepare(_)
            | LogicalMessage::Prepare(_)
            | LogicalMessage::CommitPrepared(_)
            | LogicalMessage::RollbackPrepared(_)
            | LogicalMessage::StreamPrepare(_) => {
                return Err(Error::Fatal(
                    "the server sent two-phase messages that were not requested".into(),
                ));
            }
        }
        Ok(())
    }

    /// The item an insert stands for, if any.
    fn insert(&self, ins: &Insert) -> Result<Option<Item>, Error> {
        let cols = self.relations.get(&ins.relation_id).ok_or_else(|| {
            Error::Fatal(format!(
                "Insert for relation {} before its Relation message",
                ins.relation_id
            ))
        })?;
        let Some(cols) = cols else { return Ok(None) };
        if !cols.is_pending(&ins.new) {
            return Ok(None);
        }
        Ok(Some(match cols.event(&ins.new) {
            Ok(event) => {
                let key = RowKey { id: event.id.clone(), created_at: event.created_at.clone() };
                Item::Event(event, Source::Row(key))
            }
            Err(e) => match cols.row_key(&ins.new) {
                Some(key) => Item::Unreadable(Source::Row(key), e.to_string()),
                None => {
                    return Err(Error::Fatal(format!(
                        "an outbox row without id or created_at cannot be published or dead-lettered: {e}"
                    )))
                }
            },
        }))
    }

    /// Holds the item when inside a streamed block, else publishes it in the
    /// open transaction.
    async fn route(
        &mut self,
        sub: Option<u32>,
        item: Item,
        pipeline: &mut Pipeline,
    ) -> Result<(), Error> {
        if let Some(top) = self.in_stream {
            self.streamed
                .entry(top)
                .or_default()
                .push((sub.unwrap_or(top), item));
            return Ok(());
        }
        let tx = self
            .open_tx
            .ok_or_else(|| Error::Fatal("a change arrived outside a transaction".into()))?;
        self.publish(tx, item, pipeline).await
    }

    async fn publish(&self, tx: TxId, item: Item, pipeline: &mut Pipeline) -> Result<(), Error> {
        match item {
            Item::Event(event, source) => pipeline.offer(tx, event, source).await,
            Item::Unreadable(source, why) => {
                pipeline.dead_letter_unread(tx, source, why);
                Ok(())
            }
        }
    }
}

fn message_item(m: &Message) -> Item {
    let source = Source::Message {
        lsn: m.lsn,
        prefix: m.prefix.clone(),
        content: m.content.clone(),
    };
    match envelope::parse_with_row(&m.prefix, &m.content) {
        // A redriven row: delivered like any row, then marked.
        Ok((event, Some(key))) => Item::Event(event, Source::Row(key)),
        Ok((event, None)) => Item::Event(event, source),
        Err(e) => Item::Unreadable(source, e.to_string()),
    }
}
