//! A pgoutput encoder for tests only: the inverse of the decoder, written
//! from the same documented layouts, so property tests can round-trip
//! arbitrary messages. A change message's xid is written when it is `Some`
//! (which is only right inside a streamed block).

use super::message::{tag, LogicalMessage, Prepare, Tuple, TupleValue};

/// The wire bytes of one message.
pub(crate) fn encode(message: &LogicalMessage) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64));
    w.u8(message.tag());
    match message {
        LogicalMessage::Begin(m) => {
            w.u64(m.final_lsn.0);
            w.i64(m.commit_time);
            w.u32(m.xid);
        }
        LogicalMessage::Commit(m) => {
            w.u8(m.flags);
            w.u64(m.commit_lsn.0);
            w.u64(m.end_lsn.0);
            w.i64(m.commit_time);
        }
        LogicalMessage::Origin(m) => {
            w.u64(m.commit_lsn.0);
            w.cstr(&m.name);
        }
        LogicalMessage::Relation(m) => w.relation(m),
        LogicalMessage::Type(m) => {
            w.xid(m.xid);
            w.u32(m.id);
            w.cstr(&m.namespace);
            w.cstr(&m.name);
        }
        LogicalMessage::Insert(m) => {
            w.xid(m.xid);
            w.u32(m.relation_id);
            w.u8(tag::TUPLE_NEW);
            w.tuple(&m.new);
        }
        LogicalMessage::Update(m) => w.update(m),
        LogicalMessage::Delete(m) => w.delete(m),
        LogicalMessage::Truncate(m) => w.truncate(m),
        LogicalMessage::Message(m) => w.message(m),
        LogicalMessage::StreamStart(m) => {
            w.u32(m.xid);
            w.u8(u8::from(m.first_segment));
        }
        LogicalMessage::StreamStop => {}
        LogicalMessage::StreamCommit(m) => {
            w.u32(m.xid);
            w.u8(m.flags);
            w.u64(m.commit_lsn.0);
            w.u64(m.end_lsn.0);
            w.i64(m.commit_time);
        }
        LogicalMessage::StreamAbort(m) => w.stream_abort(m),
        LogicalMessage::BeginPrepare(m) => {
            w.u64(m.prepare_lsn.0);
            w.u64(m.end_lsn.0);
            w.i64(m.prepare_time);
            w.u32(m.xid);
            w.cstr(&m.gid);
        }
        LogicalMessage::Prepare(m) | LogicalMessage::StreamPrepare(m) => w.prepare(m),
        LogicalMessage::CommitPrepared(m) => w.commit_prepared(m),
        LogicalMessage::RollbackPrepared(m) => w.rollback_prepared(m),
    }
    w.0
}

struct Writer(Vec<u8>);

impl Writer {
    fn relation(&mut self, m: &super::message::Relation) {
        self.xid(m.xid);
        self.u32(m.id);
        self.cstr(&m.namespace);
        self.cstr(&m.name);
        self.u8(m.replica_identity);
        self.i16(m.columns.len());
        for c in &m.columns {
            self.u8(c.flags);
            self.cstr(&c.name);
            self.u32(c.type_oid);
            self.i32(c.type_modifier);
        }
    }

    /// The head Update and Delete share: xid, relation, and the key or
    /// old tuple when present.
    fn old_row(
        &mut self,
        xid: Option<u32>,
        relation_id: u32,
        key: &Option<Tuple>,
        old: &Option<Tuple>,
    ) {
        self.xid(xid);
        self.u32(relation_id);
        if let Some(key) = key {
            self.u8(tag::TUPLE_KEY);
            self.tuple(key);
        }
        if let Some(old) = old {
            self.u8(tag::TUPLE_OLD);
            self.tuple(old);
        }
    }

    fn update(&mut self, m: &super::message::Update) {
        self.old_row(m.xid, m.relation_id, &m.key, &m.old);
        self.u8(tag::TUPLE_NEW);
        self.tuple(&m.new);
    }

    fn delete(&mut self, m: &super::message::Delete) {
        self.old_row(m.xid, m.relation_id, &m.key, &m.old);
    }

    fn truncate(&mut self, m: &super::message::Truncate) {
        self.xid(m.xid);
        self.i32(i32::try_from(m.relation_ids.len()).expect("test truncate size"));
        self.u8(m.options);
        for id in &m.relation_ids {
            self.u32(*id);
        }
    }

    fn message(&mut self, m: &super::message::Message) {
        self.xid(m.xid);
        self.u8(u8::from(m.transactional));
        self.u64(m.lsn.0);
        self.cstr(&m.prefix);
        self.i32(i32::try_from(m.content.len()).expect("test content size"));
        self.0.extend_from_slice(&m.content);
    }

    fn stream_abort(&mut self, m: &super::message::StreamAbort) {
        self.u32(m.xid);
        self.u32(m.subxid);
        if let Some(lsn) = m.abort_lsn {
            self.u64(lsn.0);
        }
        if let Some(time) = m.abort_time {
            self.i64(time);
        }
    }

    fn commit_prepared(&mut self, m: &super::message::CommitPrepared) {
        self.u8(m.flags);
        self.u64(m.commit_lsn.0);
        self.u64(m.end_lsn.0);
        self.i64(m.commit_time);
        self.u32(m.xid);
        self.cstr(&m.gid);
    }

    fn rollback_prepared(&mut self, m: &super::message::RollbackPrepared) {
        self.u8(m.flags);
        self.u64(m.prepare_end_lsn.0);
        self.u64(m.rollback_end_lsn.0);
        self.i64(m.prepare_time);
        self.i64(m.rollback_time);
        self.u32(m.xid);
        self.cstr(&m.gid);
    }

    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn i16(&mut self, count: usize) {
        let v = i16::try_from(count).expect("test count fits Int16");
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn xid(&mut self, xid: Option<u32>) {
        if let Some(xid) = xid {
            self.u32(xid);
        }
    }

    fn cstr(&mut self, s: &str) {
        assert!(!s.contains('\0'), "test strings have no NUL");
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
    }

    fn tuple(&mut self, tuple: &Tuple) {
        self.i16(tuple.0.len());
        for value in &tuple.0 {
            match value {
                TupleValue::Null => self.u8(tag::COLUMN_NULL),
                TupleValue::UnchangedToast => self.u8(tag::COLUMN_UNCHANGED_TOAST),
                TupleValue::Text(b) | TupleValue::Binary(b) => {
                    let kind = if matches!(value, TupleValue::Text(_)) {
                        tag::COLUMN_TEXT
                    } else {
                        tag::COLUMN_BINARY
                    };
                    self.u8(kind);
                    self.i32(i32::try_from(b.len()).expect("test value size"));
                    self.0.extend_from_slice(b);
                }
            }
        }
    }

    fn prepare(&mut self, m: &Prepare) {
        self.u8(m.flags);
        self.u64(m.prepare_lsn.0);
        self.u64(m.end_lsn.0);
        self.i64(m.prepare_time);
        self.u32(m.xid);
        self.cstr(&m.gid);
    }
}
