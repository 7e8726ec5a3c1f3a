//! The messages of the pgoutput protocol, as decoded values.
//!
//! Field names follow PostgreSQL's "Logical Replication Message Formats".
//! Timestamps are PostgreSQL `TimestampTz` values: microseconds since
//! 2000-01-01 00:00:00 UTC. Transaction ids are raw 32-bit xids.

use bytes::Bytes;

use crate::lsn::Lsn;

/// One decoded pgoutput message.
///
/// The variants are the message types of protocol versions 1 to 4. A
/// [`Decoder`](super::Decoder) returns exactly one of them per replication
/// message (one `XLogData` payload, or one row of
/// `pg_logical_slot_get_binary_changes`).
#[derive(Debug, Clone, PartialEq)]
pub enum LogicalMessage {
    /// `B`: a transaction starts. Its changes follow, then [`Commit`].
    Begin(Begin),
    /// `C`: the transaction opened by the last [`Begin`] committed.
    Commit(Commit),
    /// `O`: the changes of this transaction came from a replication origin.
    Origin(Origin),
    /// `R`: the shape of a relation, sent before its first change (and again
    /// after it changed). Later changes refer to it by [`Relation::id`].
    Relation(Relation),
    /// `Y`: the name of a non-built-in data type used by a relation column.
    Type(TypeMessage),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: one or more relations were truncated.
    Truncate(Truncate),
    /// `M`: a logical decoding message (`pg_logical_emit_message`).
    Message(Message),
    /// `S` (protocol 2+): a block of changes of an in-progress transaction
    /// starts. Until [`LogicalMessage::StreamStop`], changes carry an xid.
    StreamStart(StreamStart),
    /// `E` (protocol 2+): the block opened by the last `StreamStart` ends.
    StreamStop,
    /// `c` (protocol 2+): a streamed transaction committed.
    StreamCommit(StreamCommit),
    /// `A` (protocol 2+): a streamed transaction or subtransaction aborted.
    StreamAbort(StreamAbort),
    /// `b` (protocol 3+): a two-phase transaction starts; `Prepare` ends it.
    BeginPrepare(BeginPrepare),
    /// `P` (protocol 3+): the transaction opened by `BeginPrepare` was
    /// prepared (`PREPARE TRANSACTION`).
    Prepare(Prepare),
    /// `K` (protocol 3+): a prepared transaction was committed.
    CommitPrepared(CommitPrepared),
    /// `r` (protocol 3+): a prepared transaction was rolled back.
    RollbackPrepared(RollbackPrepared),
    /// `p` (protocol 3+): a streamed transaction was prepared. Same fields
    /// as [`Prepare`].
    StreamPrepare(Prepare),
}

impl LogicalMessage {
    /// The message type byte that identifies this message on the wire.
    pub fn tag(&self) -> u8 {
        match self {
            LogicalMessage::Begin(_) => tag::BEGIN,
            LogicalMessage::Commit(_) => tag::COMMIT,
            LogicalMessage::Origin(_) => tag::ORIGIN,
            LogicalMessage::Relation(_) => tag::RELATION,
            LogicalMessage::Type(_) => tag::TYPE,
            LogicalMessage::Insert(_) => tag::INSERT,
            LogicalMessage::Update(_) => tag::UPDATE,
            LogicalMessage::Delete(_) => tag::DELETE,
            LogicalMessage::Truncate(_) => tag::TRUNCATE,
            LogicalMessage::Message(_) => tag::MESSAGE,
            LogicalMessage::StreamStart(_) => tag::STREAM_START,
            LogicalMessage::StreamStop => tag::STREAM_STOP,
            LogicalMessage::StreamCommit(_) => tag::STREAM_COMMIT,
            LogicalMessage::StreamAbort(_) => tag::STREAM_ABORT,
            LogicalMessage::BeginPrepare(_) => tag::BEGIN_PREPARE,
            LogicalMessage::Prepare(_) => tag::PREPARE,
            LogicalMessage::CommitPrepared(_) => tag::COMMIT_PREPARED,
            LogicalMessage::RollbackPrepared(_) => tag::ROLLBACK_PREPARED,
            LogicalMessage::StreamPrepare(_) => tag::STREAM_PREPARE,
        }
    }
}

/// The message type bytes (`LogicalRepMsgType` in PostgreSQL).
pub(crate) mod tag {
    pub const BEGIN: u8 = b'B';
    pub const COMMIT: u8 = b'C';
    pub const ORIGIN: u8 = b'O';
    pub const RELATION: u8 = b'R';
    pub const TYPE: u8 = b'Y';
    pub const INSERT: u8 = b'I';
    pub const UPDATE: u8 = b'U';
    pub const DELETE: u8 = b'D';
    pub const TRUNCATE: u8 = b'T';
    pub const MESSAGE: u8 = b'M';
    pub const STREAM_START: u8 = b'S';
    pub const STREAM_STOP: u8 = b'E';
    pub const STREAM_COMMIT: u8 = b'c';
    pub const STREAM_ABORT: u8 = b'A';
    pub const BEGIN_PREPARE: u8 = b'b';
    pub const PREPARE: u8 = b'P';
    pub const COMMIT_PREPARED: u8 = b'K';
    pub const ROLLBACK_PREPARED: u8 = b'r';
    pub const STREAM_PREPARE: u8 = b'p';

    /// Tuple data part markers inside Insert, Update and Delete.
    pub const TUPLE_NEW: u8 = b'N';
    pub const TUPLE_KEY: u8 = b'K';
    pub const TUPLE_OLD: u8 = b'O';

    /// Column kinds inside a tuple.
    pub const COLUMN_NULL: u8 = b'n';
    pub const COLUMN_UNCHANGED_TOAST: u8 = b'u';
    pub const COLUMN_TEXT: u8 = b't';
    pub const COLUMN_BINARY: u8 = b'b';
}

/// `B`: the start of a (non-streamed) transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the commit record: where the transaction will end.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    /// The transaction id.
    pub xid: u32,
}

/// `C`: the end of the transaction opened by the last [`Begin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Flags; currently unused by PostgreSQL (0).
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The end LSN of the transaction: the position to confirm as flushed
    /// once everything up to this transaction is durable downstream.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// `O`: the replication origin of the current transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    /// The name of the origin.
    pub name: String,
}

/// `R`: the description of a relation (table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The (sub)transaction, inside a streamed block only: see
    /// [`Insert::xid`].
    pub xid: Option<u32>,
    /// The relation's OID; changes refer to it as `relation_id`.
    pub id: u32,
    /// The schema; PostgreSQL sends an empty string for `pg_catalog`.
    pub namespace: String,
    /// The relation name.
    pub name: String,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// The columns, in the order tuple values are sent.
    pub columns: Vec<RelationColumn>,
}

impl Relation {
    /// `relreplident` of a relation whose replica identity is its primary key.
    pub const REPLICA_IDENTITY_DEFAULT: u8 = b'd';
    /// `relreplident` of a relation that logs no old values.
    pub const REPLICA_IDENTITY_NOTHING: u8 = b'n';
    /// `relreplident` of a relation that logs the whole old row.
    pub const REPLICA_IDENTITY_FULL: u8 = b'f';
    /// `relreplident` of a relation whose replica identity is an index.
    pub const REPLICA_IDENTITY_INDEX: u8 = b'i';
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Flags: [`RelationColumn::FLAG_KEY`] marks a replica identity column.
    pub flags: u8,
    /// The column name.
    pub name: String,
    /// The OID of the column's data type.
    pub type_oid: u32,
    /// The type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
}

impl RelationColumn {
    /// Flag bit: the column is part of the replica identity (the key).
    pub const FLAG_KEY: u8 = 1;

    /// True when the column is part of the replica identity.
    pub fn is_key(&self) -> bool {
        self.flags & Self::FLAG_KEY != 0
    }
}

/// `Y`: the name of a data type, sent before a relation that uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    /// The (sub)transaction, inside a streamed block only: see
    /// [`Insert::xid`].
    pub xid: Option<u32>,
    /// The type's OID.
    pub id: u32,
    /// The schema; empty for `pg_catalog`.
    pub namespace: String,
    /// The type name.
    pub name: String,
}

/// `I`: an inserted row.
#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    /// Present only between Stream Start and Stream Stop (protocol 2+): the
    /// transaction that made the change, which is the streamed
    /// transaction's xid or, for a change made in a subtransaction, the
    /// subtransaction's xid (so that a Stream Abort of that subxid can drop
    /// it). `None` outside a streamed block.
    pub xid: Option<u32>,
    /// The [`Relation::id`] of the table.
    pub relation_id: u32,
    /// The new row.
    pub new: Tuple,
}

/// `U`: an updated row.
///
/// At most one of `key` and `old` is present: `key` when the update changed
/// a replica identity column (only the key columns are non-null), `old` when
/// the table has `REPLICA IDENTITY FULL`.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The (sub)transaction, inside a streamed block only: see
    /// [`Insert::xid`].
    pub xid: Option<u32>,
    /// The [`Relation::id`] of the table.
    pub relation_id: u32,
    /// The old key (`K`), when the key changed.
    pub key: Option<Tuple>,
    /// The whole old row (`O`), with `REPLICA IDENTITY FULL`.
    pub old: Option<Tuple>,
    /// The new row. Columns whose TOASTed value did not change are
    /// [`TupleValue::UnchangedToast`].
    pub new: Tuple,
}

/// `D`: a deleted row. Exactly one of `key` and `old` is present.
#[derive(Debug, Clone, PartialEq)]
pub struct Delete {
    /// The (sub)transaction, inside a streamed block only: see
    /// [`Insert::xid`].
    pub xid: Option<u32>,
    /// The [`Relation::id`] of the table.
    pub relation_id: u32,
    /// The key of the deleted row (`K`).
    pub key: Option<Tuple>,
    /// The whole deleted row (`O`), with `REPLICA IDENTITY FULL`.
    pub old: Option<Tuple>,
}

/// `T`: truncated relations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// The (sub)transaction, inside a streamed block only: see
    /// [`Insert::xid`].
    pub xid: Option<u32>,
    /// Option bits: [`Truncate::CASCADE`], [`Truncate::RESTART_IDENTITY`].
    pub options: u8,
    /// The [`Relation::id`]s of the truncated tables.
    pub relation_ids: Vec<u32>,
}

impl Truncate {
    /// Option bit: `TRUNCATE ... CASCADE`.
    pub const CASCADE: u8 = 1;
    /// Option bit: `TRUNCATE ... RESTART IDENTITY`.
    pub const RESTART_IDENTITY: u8 = 2;

    /// True for `TRUNCATE ... CASCADE`.
    pub fn cascade(&self) -> bool {
        self.options & Self::CASCADE != 0
    }

    /// True for `TRUNCATE ... RESTART IDENTITY`.
    pub fn restart_identity(&self) -> bool {
        self.options & Self::RESTART_IDENTITY != 0
    }
}

/// `M`: a logical decoding message from `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The (sub)transaction, inside a streamed block only: see
    /// [`Insert::xid`].
    pub xid: Option<u32>,
    /// True when the message was emitted transactionally (it is sent inside
    /// its transaction, and not at all if that transaction aborts).
    pub transactional: bool,
    /// The LSN of the message.
    pub lsn: Lsn,
    /// The prefix given to `pg_logical_emit_message`.
    pub prefix: String,
    /// The content, a zero-copy slice of the decoded message.
    pub content: Bytes,
}

/// `S`: the start of a block of changes of an in-progress transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamStart {
    /// The streamed (top-level) transaction.
    pub xid: u32,
    /// True for the first block of this transaction. A walsender that
    /// decodes the transaction again (after a reconnect) starts over with a
    /// first block: discard what was buffered for the xid.
    pub first_segment: bool,
}

/// `c`: a streamed transaction committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCommit {
    /// The transaction.
    pub xid: u32,
    /// Flags; currently unused by PostgreSQL (0).
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The end LSN of the transaction.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// `A`: a streamed transaction, or one of its subtransactions, aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAbort {
    /// The top-level transaction.
    pub xid: u32,
    /// The aborted subtransaction; equal to `xid` when the whole
    /// transaction aborted.
    pub subxid: u32,
    /// The LSN of the abort (protocol 4+, only with `streaming = parallel`).
    pub abort_lsn: Option<Lsn>,
    /// Abort time, microseconds since 2000-01-01 UTC (protocol 4+, only with
    /// `streaming = parallel`).
    pub abort_time: Option<i64>,
}

/// `b`: the start of a transaction prepared for two-phase commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPrepare {
    /// The LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// The end LSN of the prepared transaction.
    pub end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// The transaction id.
    pub xid: u32,
    /// The user-defined global transaction identifier (GID).
    pub gid: String,
}

/// `P` (and `p`, Stream Prepare): a transaction was prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    /// Flags; currently unused by PostgreSQL (0).
    pub flags: u8,
    /// The LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// The end LSN of the prepared transaction.
    pub end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// The transaction id.
    pub xid: u32,
    /// The global transaction identifier (GID).
    pub gid: String,
}

/// `K`: a prepared transaction was committed (`COMMIT PREPARED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPrepared {
    /// Flags; currently unused by PostgreSQL (0).
    pub flags: u8,
    /// The LSN of the commit prepared record.
    pub commit_lsn: Lsn,
    /// The end LSN of the commit prepared transaction.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    /// The transaction id.
    pub xid: u32,
    /// The global transaction identifier (GID).
    pub gid: String,
}

/// `r`: a prepared transaction was rolled back (`ROLLBACK PREPARED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    /// Flags; currently unused by PostgreSQL (0).
    pub flags: u8,
    /// The end LSN of the prepared transaction.
    pub prepare_end_lsn: Lsn,
    /// The end LSN of the rollback prepared transaction.
    pub rollback_end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// Rollback time, microseconds since 2000-01-01 UTC.
    pub rollback_time: i64,
    /// The transaction id.
    pub xid: u32,
    /// The global transaction identifier (GID).
    pub gid: String,
}

/// The column values of one row, in [`Relation::columns`] order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tuple(pub Vec<TupleValue>);

impl Tuple {
    /// The number of columns.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the tuple has no columns.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of column `index`, if the tuple has that many columns.
    pub fn get(&self, index: usize) -> Option<&TupleValue> {
        self.0.get(index)
    }
}

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value; PostgreSQL does not send it.
    UnchangedToast,
    /// `t`: the value in the type's text format, a zero-copy slice of the
    /// decoded message. PostgreSQL sends it in the server encoding.
    Text(Bytes),
    /// `b`: the value in the type's binary (send/recv) format, when the
    /// `binary` option is on and the type has a send function.
    Binary(Bytes),
}

impl TupleValue {
    /// The text-format bytes, for a [`TupleValue::Text`] value.
    pub fn as_text(&self) -> Option<&[u8]> {
        match self {
            TupleValue::Text(b) => Some(b),
            _ => None,
        }
    }

    /// The binary-format bytes, for a [`TupleValue::Binary`] value.
    pub fn as_binary(&self) -> Option<&[u8]> {
        match self {
            TupleValue::Binary(b) => Some(b),
            _ => None,
        }
    }
}
