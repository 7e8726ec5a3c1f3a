//! The stateful decoder: one pgoutput message in, one [`LogicalMessage`] out.

use bytes::Bytes;

use super::error::DecodeError;
use super::message::{
    tag, Begin, BeginPrepare, Commit, CommitPrepared, Delete, Insert, LogicalMessage, Message,
    Origin, Prepare, Relation, RelationColumn, RollbackPrepared, StreamAbort, StreamCommit,
    StreamStart, Truncate, Tuple, TupleValue, TypeMessage, Update,
};
use crate::lsn::Lsn;

/// Decodes pgoutput messages of one replication stream.
///
/// The decoder is stateful because, from protocol version 2 on, Relation,
/// Type, Insert, Update, Delete, Truncate and Message carry a leading
/// transaction id only when they are sent inside a streamed block (between
/// Stream Start and Stream Stop). Feed it every message of the stream, in
/// order, and make a new one for each replication connection (a walsender
/// always starts outside a streamed block).
///
/// A message that fails to decode leaves the state unchanged. The decoder
/// never panics and never allocates in proportion to a count it has not
/// checked against the bytes that are left.
#[derive(Debug, Clone)]
pub struct Decoder {
    proto_version: u32,
    in_stream: bool,
}

impl Decoder {
    /// The newest protocol version this decoder understands.
    pub const MAX_PROTOCOL_VERSION: u32 = 4;

    /// A decoder for the `proto_version` given to `START_REPLICATION` (or to
    /// `pg_logical_slot_get_binary_changes`). A version outside
    /// `1..=`[`Decoder::MAX_PROTOCOL_VERSION`] makes every
    /// [`decode`](Decoder::decode) fail with
    /// [`DecodeError::UnsupportedProtocolVersion`].
    pub fn new(proto_version: u32) -> Self {
        Decoder {
            proto_version,
            in_stream: false,
        }
    }

    /// The protocol version this decoder was made for.
    pub fn proto_version(&self) -> u32 {
        self.proto_version
    }

    /// True between a Stream Start and its Stream Stop.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Decodes one whole message. Text and binary column values and Message
    /// content are zero-copy slices of `data`.
    pub fn decode(&mut self, data: Bytes) -> Result<LogicalMessage, DecodeError> {
        if !(1..=Self::MAX_PROTOCOL_VERSION).contains(&self.proto_version) {
            return Err(DecodeError::UnsupportedProtocolVersion(self.proto_version));
        }
        let &tag = data.first().ok_or(DecodeError::Empty)?;
        let kind = Kind::of(tag).ok_or(DecodeError::UnknownTag { tag })?;
        if self.proto_version < kind.min_version {
            return Err(DecodeError::TagNotInProtocol {
                tag,
                message: kind.name,
                min_version: kind.min_version,
                proto_version: self.proto_version,
            });
        }
        if self.in_stream && !kind.allowed_in_stream {
            return Err(DecodeError::UnexpectedInStream { message: kind.name });
        }
        if !self.in_stream && tag == tag::STREAM_STOP {
            return Err(DecodeError::UnexpectedOutsideStream { message: kind.name });
        }

        let mut r = Reader {
            buf: &data,
            pos: 1,
            message: kind.name,
        };
        let message = self.body(tag, &mut r)?;
        r.finish()?;

        match tag {
            tag::STREAM_START => self.in_stream = true,
            tag::STREAM_STOP => self.in_stream = false,
            _ => {}
        }
        Ok(message)
    }

    /// Decodes everything after the type byte.
    fn body(&self, tag: u8, r: &mut Reader<'_>) -> Result<LogicalMessage, DecodeError> {
        Ok(match tag {
            tag::BEGIN => LogicalMessage::Begin(Begin {
                final_lsn: r.lsn("final LSN")?,
                commit_time: r.i64("commit timestamp")?,
                xid: r.u32("xid")?,
            }),
            tag::COMMIT => LogicalMessage::Commit(Commit {
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit LSN")?,
                end_lsn: r.lsn("end LSN")?,
                commit_time: r.i64("commit timestamp")?,
            }),
            tag::ORIGIN => LogicalMessage::Origin(Origin {
                commit_lsn: r.lsn("origin commit LSN")?,
                name: r.cstr("origin name")?.to_owned(),
            }),
            tag::RELATION => LogicalMessage::Relation(self.relation(r)?),
            tag::TYPE => LogicalMessage::Type(TypeMessage {
                xid: self.stream_xid(r)?,
                id: r.u32("type OID")?,
                namespace: r.cstr("type namespace")?.to_owned(),
                name: r.cstr("type name")?.to_owned(),
            }),
            tag::INSERT => {
                let xid = self.stream_xid(r)?;
                let relation_id = r.u32("relation OID")?;
                r.expect_marker(&[tag::TUPLE_NEW], "'N' (new tuple)")?;
                LogicalMessage::Insert(Insert {
                    xid,
                    relation_id,
                    new: r.tuple()?,
                })
            }
            tag::UPDATE => {
                let xid = self.stream_xid(r)?;
                let relation_id = r.u32("relation OID")?;
                let (mut key, mut old) = (None, None);
                let marker = r.expect_marker(
                    &[tag::TUPLE_KEY, tag::TUPLE_OLD, tag::TUPLE_NEW],
                    "'K' (key), 'O' (old tuple) or 'N' (new tuple)",
                )?;
                if marker != tag::TUPLE_NEW {
                    let tuple = r.tuple()?;
                    if marker == tag::TUPLE_KEY {
                        key = Some(tuple);
                    } else {
                        old = Some(tuple);
                    }
                    r.expect_marker(&[tag::TUPLE_NEW], "'N' (new tuple)")?;
                }
                LogicalMessage::Update(Update {
                    xid,
                    relation_id,
                    key,
                    old,
                    new: r.tuple()?,
                })
            }
            tag::DELETE => {
                let xid = self.stream_xid(r)?;
                let relation_id = r.u32("relation OID")?;
                let marker = r.expect_marker(
                    &[tag::TUPLE_KEY, tag::TUPLE_OLD],
                    "'K' (key) or 'O' (old tuple)",
                )?;
                let tuple = Some(r.tuple()?);
                let (key, old) = if marker == tag::TUPLE_KEY {
                    (tuple, None)
                } else {
                    (None, tuple)
                };
                LogicalMessage::Delete(Delete {
                    xid,
                    relation_id,
                    key,
                    old,
                })
            }
            tag::TRUNCATE => LogicalMessage::Truncate(self.truncate(r)?),
            tag::MESSAGE => {
                let xid = self.stream_xid(r)?;
                let flags_at = r.pos;
                let flags = r.u8("flags")?;
                if flags & !1 != 0 {
                    return Err(r.invalid_flags("flags", flags, flags_at));
                }
                let lsn = r.lsn("message LSN")?;
                let prefix = r.cstr("prefix")?.to_owned();
                let content = r.counted("content length", "content")?;
                LogicalMessage::Message(Message {
                    xid,
                    transactional: flags == 1,
                    lsn,
                    prefix,
                    content,
                })
            }
            tag::STREAM_START => {
                let xid = r.u32("xid")?;
                let flag_at = r.pos;
                let first = r.u8("first-segment flag")?;
                if first > 1 {
                    return Err(r.invalid_flags("first-segment flag", first, flag_at));
                }
                LogicalMessage::StreamStart(StreamStart {
                    xid,
                    first_segment: first == 1,
                })
            }
            tag::STREAM_STOP => LogicalMessage::StreamStop,
            tag::STREAM_COMMIT => LogicalMessage::StreamCommit(StreamCommit {
                xid: r.u32("xid")?,
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit LSN")?,
                end_lsn: r.lsn("end LSN")?,
                commit_time: r.i64("commit timestamp")?,
            }),
            tag::STREAM_ABORT => {
                let xid = r.u32("xid")?;
                let subxid = r.u32("subtransaction xid")?;
                // Protocol 4 adds the abort LSN and time, but PostgreSQL sends
                // them only with `streaming = parallel`: both or neither.
                let (abort_lsn, abort_time) = if self.proto_version >= 4 && r.remaining() > 0 {
                    (Some(r.lsn("abort LSN")?), Some(r.i64("abort timestamp")?))
                } else {
                    (None, None)
                };
                LogicalMessage::StreamAbort(StreamAbort {
                    xid,
                    subxid,
                    abort_lsn,
                    abort_time,
                })
            }
            tag::BEGIN_PREPARE => LogicalMessage::BeginPrepare(BeginPrepare {
                prepare_lsn: r.lsn("prepare LSN")?,
                end_lsn: r.lsn("end LSN")?,
                prepare_time: r.i64("prepare timestamp")?,
                xid: r.u32("xid")?,
                gid: r.cstr("gid")?.to_owned(),
            }),
            tag::PREPARE => LogicalMessage::Prepare(prepare(r)?),
            tag::STREAM_PREPARE => LogicalMessage::StreamPrepare(prepare(r)?),
            tag::COMMIT_PREPARED => LogicalMessage::CommitPrepared(CommitPrepared {
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit LSN")?,
                end_lsn: r.lsn("end LSN")?,
                commit_time: r.i64("commit timestamp")?,
                xid: r.u32("xid")?,
                gid: r.cstr("gid")?.to_owned(),
            }),
            tag::ROLLBACK_PREPARED => LogicalMessage::RollbackPrepared(RollbackPrepared {
                flags: r.u8("flags")?,
                prepare_end_lsn: r.lsn("prepare end LSN")?,
                rollback_end_lsn: r.lsn("rollback end LSN")?,
                prepare_time: r.i64("prepare timestamp")?,
                rollback_time: r.i64("rollback timestamp")?,
                xid: r.u32("xid")?,
                gid: r.cstr("gid")?.to_owned(),
            }),
            // Kind::of accepted only the tags above.
            other => return Err(DecodeError::UnknownTag { tag: other }),
        })
    }

    /// The leading xid of a change message, present only inside a streamed
    /// block (and so only from protocol 2 on).
    fn stream_xid(&self, r: &mut Reader<'_>) -> Result<Option<u32>, DecodeError> {
        if self.in_stream {
            r.u32("xid").map(Some)
        } else {
            Ok(None)
        }
    }

    fn relation(&self, r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
        let xid = self.stream_xid(r)?;
        let id = r.u32("relation OID")?;
        let namespace = r.cstr("namespace")?.to_owned();
        let name = r.cstr("relation name")?.to_owned();
        let replica_identity = r.u8("replica identity")?;
        // flags, name NUL, type OID, type modifier
        let count = r.count16("column count", 1 + 1 + 4 + 4)?;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            columns.push(RelationColumn {
                flags: r.u8("column flags")?,
                name: r.cstr("column name")?.to_owned(),
                type_oid: r.u32("column type OID")?,
                type_modifier: r.i32("column type modifier")?,
            });
        }
        Ok(Relation {
            xid,
            id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn truncate(&self, r: &mut Reader<'_>) -> Result<Truncate, DecodeError> {
        let xid = self.stream_xid(r)?;
        let count_at = r.pos;
        let count = r.i32("relation count")?;
        let options = r.u8("options")?;
        let count = r.checked_count(i64::from(count), "relation count", 4, count_at)?;
        let mut relation_ids = Vec::with_capacity(count);
        for _ in 0..count {
            relation_ids.push(r.u32("relation OID")?);
        }
        Ok(Truncate {
            xid,
            options,
            relation_ids,
        })
    }
}

/// Prepare and Stream Prepare share one layout.
fn prepare(r: &mut Reader<'_>) -> Result<Prepare, DecodeError> {
    Ok(Prepare {
        flags: r.u8("flags")?,
        prepare_lsn: r.lsn("prepare LSN")?,
        end_lsn: r.lsn("end LSN")?,
        prepare_time: r.i64("prepare timestamp")?,
        xid: r.u32("xid")?,
        gid: r.cstr("gid")?.to_owned(),
    })
}

/// What the protocol says about one message type.
struct Kind {
    name: &'static str,
    min_version: u32,
    allowed_in_stream: bool,
}

impl Kind {
    fn of(tag: u8) -> Option<Kind> {
        // (name, first protocol version, may appear inside a streamed block)
        let (name, min_version, allowed_in_stream) = match tag {
            tag::BEGIN => ("Begin", 1, false),
            tag::COMMIT => ("Commit", 1, false),
            tag::ORIGIN => ("Origin", 1, true),
            tag::RELATION => ("Relation", 1, true),
            tag::TYPE => ("Type", 1, true),
            tag::INSERT => ("Insert", 1, true),
            tag::UPDATE => ("Update", 1, true),
            tag::DELETE => ("Delete", 1, true),
            tag::TRUNCATE => ("Truncate", 1, true),
            tag::MESSAGE => ("Message", 1, true),
            tag::STREAM_START => ("Stream Start", 2, false),
            tag::STREAM_STOP => ("Stream Stop", 2, true),
            tag::STREAM_COMMIT => ("Stream Commit", 2, false),
            tag::STREAM_ABORT => ("Stream Abort", 2, false),
            tag::BEGIN_PREPARE => ("Begin Prepare", 3, false),
            tag::PREPARE => ("Prepare", 3, false),
            tag::COMMIT_PREPARED => ("Commit Prepared", 3, false),
            tag::ROLLBACK_PREPARED => ("Rollback Prepared", 3, false),
            tag::STREAM_PREPARE => ("Stream Prepare", 3, false),
            _ => return None,
        };
        Some(Kind {
            name,
            min_version,
            allowed_in_stream,
        })
    }
}

/// A bounds-checked big-endian cursor over one message.
///
/// Invariant: `pos <= buf.len()`; every read checks its length first.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    #[inline]
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        match self.rest().first_chunk::<N>() {
            Some(bytes) => {
                self.pos += N;
                Ok(*bytes)
            }
            None => Err(self.truncated(field, N)),
        }
    }

    #[inline]
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    #[inline]
    fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        self.array(field).map(i16::from_be_bytes)
    }

    #[inline]
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    #[inline]
    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    #[inline]
    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    #[inline]
    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// A NUL-terminated UTF-8 string (a protocol `String`).
    fn cstr(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let start = self.pos;
        let rest = self.rest();
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::MissingNulTerminator {
                message: self.message,
                field,
                offset: start,
            });
        };
        let text = std::str::from_utf8(&rest[..len]).map_err(|_| DecodeError::InvalidUtf8 {
            message: self.message,
            field,
            offset: start,
        })?;
        self.pos += len + 1;
        Ok(text)
    }

    /// An `Int32` length followed by that many bytes, as a zero-copy slice.
    #[inline]
    fn counted(
        &mut self,
        length_field: &'static str,
        field: &'static str,
    ) -> Result<Bytes, DecodeError> {
        let at = self.pos;
        let len = self.i32(length_field)?;
        let Ok(len) = usize::try_from(len) else {
            return Err(self.negative(length_field, i64::from(len), at));
        };
        if len > self.remaining() {
            return Err(self.truncated(field, len));
        }
        let start = self.pos;
        self.pos += len;
        Ok(self.buf.slice(start..self.pos))
    }

    /// An `Int16` item count, checked against the bytes left.
    #[inline]
    fn count16(&mut self, field: &'static str, min_item_size: usize) -> Result<usize, DecodeError> {
        let at = self.pos;
        let count = self.i16(field)?;
        self.checked_count(i64::from(count), field, min_item_size, at)
    }

    /// Rejects a negative count, or one whose items cannot all fit in the
    /// bytes left, before anything is allocated for them.
    #[inline]
    fn checked_count(
        &self,
        count: i64,
        field: &'static str,
        min_item_size: usize,
        at: usize,
    ) -> Result<usize, DecodeError> {
        let Ok(count) = usize::try_from(count) else {
            return Err(self.negative(field, count, at));
        };
        let remaining = self.remaining();
        if count.saturating_mul(min_item_size) > remaining {
            return Err(DecodeError::ImplausibleCount {
                message: self.message,
                field,
                count,
                min_item_size,
                remaining,
                offset: at,
            });
        }
        Ok(count)
    }

    /// Reads a one-byte marker that must be one of `allowed`.
    fn expect_marker(&mut self, allowed: &[u8], expected: &'static str) -> Result<u8, DecodeError> {
        let at = self.pos;
        let marker = self.u8("tuple marker")?;
        if allowed.contains(&marker) {
            Ok(marker)
        } else {
            Err(DecodeError::UnexpectedTupleMarker {
                message: self.message,
                expected,
                found: marker,
                offset: at,
            })
        }
    }

    /// `TupleData`: an `Int16` column count, then one value per column.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        // Every column takes at least its kind byte.
        let count = self.count16("tuple column count", 1)?;
        let mut values = Vec::with_capacity(count);
        for column in 0..count {
            let at = self.pos;
            let value = match self.u8("tuple column kind")? {
                tag::COLUMN_NULL => TupleValue::Null,
                tag::COLUMN_UNCHANGED_TOAST => TupleValue::UnchangedToast,
                tag::COLUMN_TEXT => {
                    TupleValue::Text(self.counted("column value length", "text column value")?)
                }
                tag::COLUMN_BINARY => {
                    TupleValue::Binary(self.counted("column value length", "binary column value")?)
                }
                kind => {
                    return Err(DecodeError::UnknownTupleKind {
                        message: self.message,
                        kind,
                        column,
                        offset: at,
                    })
                }
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    /// Succeeds only when the whole message was read.
    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                message: self.message,
                count,
                offset: self.pos,
            }),
        }
    }

    #[cold]
    fn truncated(&self, field: &'static str, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            field,
            offset: self.pos,
            needed,
            remaining: self.remaining(),
        }
    }

    #[cold]
    fn negative(&self, field: &'static str, value: i64, offset: usize) -> DecodeError {
        DecodeError::NegativeCount {
            message: self.message,
            field,
            value,
            offset,
        }
    }

    #[cold]
    fn invalid_flags(&self, field: &'static str, value: u8, offset: usize) -> DecodeError {
        DecodeError::InvalidFlags {
            message: self.message,
            field,
            value,
            offset,
        }
    }
}
