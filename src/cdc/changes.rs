//! From decoded pgoutput messages to pipeline work: which inserts and
//! logical messages are outbox events, in which transaction, and what is held
//! back.
//!
//! - Inserts into a published relation that has the outbox columns become
//!   events (routed by that table's template); other relations are ignored.
//! - Logical messages whose prefix is the configured one (or matches one of
//!   `cdc.message_prefixes`) carry an outbox envelope (see
//!   [`crate::outbox::envelope`]); a malformed one is recorded in
//!   `pgoutbox_dead_letters` with its LSN and skipped. Non-transactional
//!   messages are ignored unless enabled. A message that is not relayed
//!   but whose prefix looks like an outbox's is never dropped silently: it
//!   is counted (`pgoutbox_messages_ignored_total`) and logged, once per
//!   prefix and reason.
//! - Streamed in-progress transactions (protocol 2+, `streaming` on) are held
//!   per transaction until Stream Commit, and dropped on Stream Abort (whole
//!   transaction or one subtransaction), so nothing is published before its
//!   commit.

use std::collections::{HashMap, HashSet};

use crate::config::ColumnMap;
use crate::error::Error;
use crate::outbox::{envelope, OutboxColumns, OutboxEvent};
use crate::pgoutput::{Insert, LogicalMessage, Message};
use crate::pipeline::{Pipeline, Source, TxId};
use crate::replication::system_time;
use crate::Lsn;

/// Which logical messages are outbox events.
#[derive(Clone, Debug)]
pub(super) struct MessageFilter {
    /// The prefix marking an outbox envelope (what `outbox_emit` writes).
    pub prefix: String,
    /// Further prefixes: exact, or a stem followed by `*`.
    pub patterns: Vec<String>,
    /// Whether non-transactional messages are relayed too.
    pub non_transactional: bool,
}

impl MessageFilter {
    /// Whether messages with `prefix` are outbox events.
    pub fn accepts(&self, prefix: &str) -> bool {
        prefix == self.prefix
            || self.patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(stem) => prefix.starts_with(stem),
                None => prefix == p,
            })
    }

    /// Whether a message with `prefix` that is not relayed deserves a word:
    /// it starts with the configured prefix or names an outbox.
    fn looks_like_outbox(&self, prefix: &str) -> bool {
        prefix.starts_with(&self.prefix) || prefix.to_ascii_lowercase().contains("outbox")
    }
}

/// How many distinct (prefix, reason) pairs of ignored messages are logged
/// per session; past that they are only counted.
const IGNORED_LOGGED: usize = 100;

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
    /// Which column plays which role (`[outbox.columns]`).
    map: ColumnMap,
    /// The open transaction's commit LSN (from its Begin), for the dead
    /// letters of rows that cannot be marked.
    final_lsn: Lsn,
    open_tx: Option<TxId>,
    in_stream: Option<u32>,
    /// Held streamed changes by top-level xid, each with its (sub)xid.
    streamed: HashMap<u32, Vec<(u32, Item)>>,
    messages: Option<MessageFilter>,
    /// (prefix, reason) of the ignored messages already logged.
    ignored: HashSet<(String, &'static str)>,
    /// The relay's own outbox table (schema, table): rows of any other
    /// outbox table are marked in their own table.
    home: (String, String),
}

impl Changes {
    /// A fresh state reading tables through `map`; `messages` enables the
    /// table-less outbox.
    pub(super) fn new(
        map: ColumnMap,
        messages: Option<MessageFilter>,
        home: (String, String),
    ) -> Changes {
        Changes {
            home,
            relations: HashMap::new(),
            map,
            final_lsn: Lsn(0),
            open_tx: None,
            in_stream: None,
            streamed: HashMap::new(),
            messages,
            ignored: HashSet::new(),
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
            LogicalMessage::Begin(b) => {
                self.final_lsn = b.final_lsn;
                let tx = pipeline.begin(b.final_lsn);
                pipeline.committed_at(tx, system_time(b.commit_time));
                self.open_tx = Some(tx);
            }
            LogicalMessage::Commit(c) => {
                let tx = self.open_tx.take().ok_or_else(|| {
                    Error::Fatal(format!("Commit at {} without Begin", c.end_lsn))
                })?;
                pipeline.commit(tx, c.end_lsn);
            }
            LogicalMessage::Relation(r) => {
                let cols = match OutboxColumns::from_relation(
                    &r,
                    &self.map,
                    (&self.home.0, &self.home.1),
                ) {
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
                if let Some(item) = self.insert(ins)? {
                    self.route(sub, item, pipeline).await?;
                }
            }
            LogicalMessage::Message(m) => {
                let Some(filter) = &self.messages else {
                    return Ok(());
                };
                if !filter.accepts(&m.prefix) {
                    if filter.looks_like_outbox(&m.prefix) {
                        self.ignore(&m, "prefix");
                    }
                    return Ok(());
                }
                if !m.transactional {
                    if !filter.non_transactional {
                        self.ignore(&m, "non_transactional");
                        return Ok(());
                    }
                    // Outside any transaction: confirmable at its own LSN,
                    // and positioned there.
                    let tx = pipeline.begin(m.lsn);
                    self.publish(tx, message_item(&m), pipeline).await?;
                    pipeline.commit(tx, m.lsn);
                    return Ok(());
                }
                let sub = m.xid;
                self.route(sub, message_item(&m), pipeline).await?;
            }
            LogicalMessage::StreamStart(s) => {
                self.final_lsn = Lsn(0);
                self.in_stream = Some(s.xid);
                self.streamed.entry(s.xid).or_default();
            }
            LogicalMessage::StreamStop => {
                self.in_stream = None;
            }
            LogicalMessage::StreamCommit(c) => {
                let items = self.streamed.remove(&c.xid).unwrap_or_default();
                let tx = pipeline.begin(c.commit_lsn);
                pipeline.committed_at(tx, system_time(c.commit_time));
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
    fn insert(&self, mut ins: Insert) -> Result<Option<Item>, Error> {
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
        let key = cols.row_key(&ins.new);
        // With a key, an unreadable row is dead-lettered by its key alone,
        // so the event may take the tuple's values; without one, the dead
        // letter holds the row's text.
        let event = match key {
            Some(_) => cols.take_event(&mut ins.new),
            None => cols.event(&ins.new),
        };
        Ok(Some(match (event, key) {
            (Ok(event), Some(key)) => Item::Event(event, Source::Row(key)),
            (Ok(event), None) => {
                let source = Source::Unmarked {
                    lsn: self.final_lsn,
                    event: Box::new(event.clone()),
                };
                Item::Event(event, source)
            }
            (Err(e), Some(key)) => Item::Unreadable(Source::Row(key), e.to_string()),
            (Err(e), None) => Item::Unreadable(
                Source::Message {
                    lsn: self.final_lsn,
                    prefix: format!("row:{}", cols.qualified()),
                    content: cols.row_json(&ins.new),
                },
                e.to_string(),
            ),
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

impl Changes {
    /// Counts a logical message that looks like an outbox event but is not
    /// relayed, and says why the first time a prefix is ignored so.
    fn ignore(&mut self, m: &Message, reason: &'static str) {
        crate::metrics::metrics().messages_ignored.inc();
        if self.ignored.len() >= IGNORED_LOGGED || !self.ignored.insert((m.prefix.clone(), reason))
        {
            return;
        }
        let fix = match reason {
            "prefix" => "add it to cdc.message_prefixes (OUTBOX_MESSAGE_PREFIXES; a trailing * matches every prefix that starts the same) if it is an outbox event",
            _ => "set cdc.non_transactional_messages = true to relay such messages (they are sent even when the writer's transaction rolls back)",
        };
        tracing::warn!(
            prefix = %m.prefix,
            lsn = %m.lsn,
            reason,
            "not relaying logical messages with this prefix (counted in pgoutbox_messages_ignored_total; logged once per prefix): {fix}"
        );
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::pgoutput::{
        Begin, Commit, Relation, RelationColumn, StreamAbort, StreamCommit, StreamStart, Tuple,
        TupleValue,
    };
    use crate::pipeline::testing::{Rig, RigOptions};
    use crate::Lsn;

    /// The outbox columns, then `status`.
    fn outbox_columns() -> Vec<&'static str> {
        crate::outbox::OUTBOX_COLUMNS
            .iter()
            .copied()
            .chain(["status"])
            .collect()
    }

    fn relation(id: u32, name: &str, columns: &[&str]) -> LogicalMessage {
        LogicalMessage::Relation(Relation {
            xid: None,
            id,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: b'd',
            columns: columns
                .iter()
                .map(|c| RelationColumn {
                    flags: 0,
                    name: (*c).into(),
                    type_oid: if *c == "id" { 20 } else { 25 },
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    fn insert(relation_id: u32, id: u64, status: &str, xid: Option<u32>) -> LogicalMessage {
        let text = |s: String| TupleValue::Text(Bytes::from(s));
        LogicalMessage::Insert(Insert {
            xid,
            relation_id,
            new: Tuple(vec![
                text(id.to_string()),
                text("2026-12-02 10:00:00+00".into()),
                text(format!("00000000-0000-4000-8000-{id:012}")),
                text("11111111-1111-4111-8111-111111111111".into()),
                text("Order".into()),
                text("Created".into()),
                text("{}".into()),
                TupleValue::Null,
                text(status.into()),
            ]),
        })
    }

    fn begin(xid: u32) -> LogicalMessage {
        LogicalMessage::Begin(Begin {
            final_lsn: Lsn(0),
            commit_time: 0,
            xid,
        })
    }

    fn commit(end: u64) -> LogicalMessage {
        LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(end - 8),
            end_lsn: Lsn(end),
            commit_time: 0,
        })
    }

    fn message(transactional: bool, prefix: &str, lsn: u64) -> LogicalMessage {
        let content = r#"{"tracking_id": "0b6b7d5e-8c1a-4a51-9a3b-2f8d3c1e9f00", "aggregate_type": "Cart", "aggregate_id": "8f14e45f-ceea-467f-a0e6-1c7a5f9d2b11", "event_type": "Emptied", "payload": {}}"#;
        LogicalMessage::Message(Message {
            xid: transactional.then_some(7),
            transactional,
            lsn: Lsn(lsn),
            prefix: prefix.into(),
            content: Bytes::from_static(content.as_bytes()),
        })
    }

    fn changes() -> Changes {
        Changes::new(
            ColumnMap::pgoutbox(),
            Some(MessageFilter {
                prefix: "outbox".into(),
                patterns: vec!["app.*".into()],
                non_transactional: false,
            }),
            ("public".into(), "outbox".into()),
        )
    }

    async fn apply_all(c: &mut Changes, r: &mut Rig, msgs: Vec<LogicalMessage>) {
        for m in msgs {
            c.apply(m, &mut r.pipeline).await.expect("applied");
        }
    }

    #[tokio::test]
    async fn prefix_patterns_relay_the_frameworks_messages_and_outbox_like_strays_are_counted() {
        let mut r = Rig::new(RigOptions::default());
        let mut c = changes();
        let framework = r#"{"tracking_id": "0b6b7d5e-8c1a-4a51-9a3b-2f8d3c1e9f01", "aggregate_id": "8f14e45f-ceea-467f-a0e6-1c7a5f9d2b12", "aggregate_type": "Invoice", "event_type": "Paid", "payload": {"n": 1}, "metadata": {"emitted_at": "2026-12-03T10:00:00Z", "schema_version": 1}}"#;
        let fw = |prefix: &str, transactional: bool, lsn: u64| {
            let mut m = message(transactional, prefix, lsn);
            if let LogicalMessage::Message(m) = &mut m {
                m.content = Bytes::copy_from_slice(framework.as_bytes());
            }
            m
        };
        let msgs = vec![
            begin(7),
            fw("app.Invoice.Paid", true, 150),
            fw("outbox.Invoice.Paid", true, 160),
            fw("outbox.Invoice.Paid", true, 165),
            fw("unrelated", true, 170),
            commit(200),
            fw("app.Invoice.Paid", false, 300),
        ];
        let ignored = || crate::metrics::metrics().messages_ignored.get();
        let before = ignored();
        apply_all(&mut c, &mut r, msgs).await;
        let topics: Vec<String> = r.sent().into_iter().map(|(_, rec)| rec.topic).collect();
        assert_eq!(
            topics,
            ["Invoice.Paid"],
            "only the pattern's prefix is relayed"
        );
        assert!(
            ignored() - before >= 3,
            "two outbox.* messages and a non-transactional one counted, 'unrelated' not"
        );
        assert_eq!(
            c.ignored.len(),
            2,
            "logged once per prefix and reason: {:?}",
            c.ignored
        );
        let f = MessageFilter {
            prefix: "outbox".into(),
            patterns: vec!["outbox.*".into(), "exact".into()],
            non_transactional: false,
        };
        assert!(f.accepts("outbox") && f.accepts("outbox.A.B") && f.accepts("exact"));
        assert!(!f.accepts("exactly") && !f.accepts("outbo"));
    }

    #[tokio::test]
    async fn a_message_and_a_row_in_one_transaction_confirm_together() {
        let mut r = Rig::new(RigOptions::default());
        let mut c = changes();
        let msgs = vec![
            relation(1, "outbox", &outbox_columns()),
            begin(7),
            insert(1, 1, "PENDING", None),
            message(true, "outbox", 150),
            message(true, "not-ours", 160),
            commit(200),
        ];
        apply_all(&mut c, &mut r, msgs).await;
        let sent = r.sent();
        let topics: Vec<&str> = sent.iter().map(|(_, rec)| rec.topic.as_str()).collect();
        assert_eq!(
            topics,
            ["Order.Created", "Cart.Emptied"],
            "other prefixes are not events"
        );
        r.ack(1);
        assert_eq!(r.settle().unwrap(), Lsn(100));
        r.ack(0);
        assert_eq!(r.settle().unwrap(), Lsn(100), "the row is not marked yet");
        assert_eq!(
            r.marked("completed"),
            [0],
            "the row is marked, the message is not"
        );
        r.durable(0);
        assert_eq!(r.settle().unwrap(), Lsn(200));
    }

    #[tokio::test]
    async fn tables_without_outbox_columns_and_rows_not_pending_are_skipped() {
        let mut r = Rig::new(RigOptions::default());
        let mut c = changes();
        let msgs = vec![
            relation(1, "outbox", &outbox_columns()),
            relation(2, "orders", &["id", "total"]),
            begin(7),
            LogicalMessage::Insert(Insert {
                xid: None,
                relation_id: 2,
                new: Tuple(vec![TupleValue::Null, TupleValue::Null]),
            }),
            insert(1, 1, "COMPLETED", None),
            commit(200),
        ];
        apply_all(&mut c, &mut r, msgs).await;
        assert!(r.sent().is_empty());
        assert_eq!(
            r.settle().unwrap(),
            Lsn(200),
            "an empty transaction confirms"
        );
    }

    #[tokio::test]
    async fn an_unreadable_row_is_dead_lettered_and_its_transaction_waits_for_it() {
        let mut r = Rig::new(RigOptions::default());
        let mut c = changes();
        let mut bad = insert(1, 5, "PENDING", None);
        if let LogicalMessage::Insert(i) = &mut bad {
            i.new.0[4] = TupleValue::Null; // aggregate_type
        }
        apply_all(
            &mut c,
            &mut r,
            vec![
                relation(1, "outbox", &outbox_columns()),
                begin(7),
                bad,
                commit(200),
            ],
        )
        .await;
        assert!(r.sent().is_empty());
        assert_eq!(r.marked("dead_letter"), [0]);
        assert_eq!(r.settle().unwrap(), Lsn(100));
        r.durable(0);
        assert_eq!(r.settle().unwrap(), Lsn(200));
    }

    #[tokio::test]
    async fn streamed_transactions_publish_at_commit_and_drop_aborted_subtransactions() {
        let mut r = Rig::new(RigOptions {
            max_events: 2,
            instant: true,
            ..RigOptions::default()
        });
        let mut c = changes();
        let start = || {
            LogicalMessage::StreamStart(StreamStart {
                xid: 9,
                first_segment: true,
            })
        };
        let msgs = vec![
            relation(1, "outbox", &outbox_columns()),
            start(),
            insert(1, 1, "PENDING", Some(9)),
            insert(1, 2, "PENDING", Some(10)),
            insert(1, 3, "PENDING", Some(9)),
            insert(1, 4, "PENDING", Some(9)),
            LogicalMessage::StreamStop,
        ];
        apply_all(&mut c, &mut r, msgs).await;
        assert!(r.sent().is_empty(), "nothing before the commit");
        assert_eq!(c.held(), 4);
        let msgs = vec![
            LogicalMessage::StreamAbort(StreamAbort {
                xid: 9,
                subxid: 10,
                abort_lsn: None,
                abort_time: None,
            }),
            LogicalMessage::StreamCommit(StreamCommit {
                xid: 9,
                flags: 0,
                commit_lsn: Lsn(290),
                end_lsn: Lsn(300),
                commit_time: 0,
            }),
        ];
        apply_all(&mut c, &mut r, msgs).await;
        let ids: Vec<_> = r
            .sent()
            .iter()
            .map(|(_, rec)| rec.headers[0].1.clone().unwrap_or_default())
            .collect();
        assert_eq!(ids.len(), 3, "the aborted subtransaction's row is dropped");
        assert!(!ids.contains(&Bytes::from("00000000-0000-4000-8000-000000000002")));
        assert_eq!(c.held(), 0);
        assert_eq!(
            r.settle().unwrap(),
            Lsn(300),
            "three events through a window of two"
        );
    }
}
