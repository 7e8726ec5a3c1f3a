//! A pure decoder of pgoutput, PostgreSQL's logical replication protocol.
//!
//! Bytes in, messages out, no I/O: the replication client hands each
//! `XLogData` payload to a [`Decoder`], which returns one [`LogicalMessage`]
//! or a [`DecodeError`] that says what was wrong and at which byte.
//!
//! The format is PostgreSQL's "Logical Replication Message Formats"
//! (<https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>),
//! written by `src/backend/replication/logical/proto.c`. Protocol versions:
//!
//! - **1** (PostgreSQL 10+): Begin, Commit, Origin, Relation, Type, Insert,
//!   Update, Delete, Truncate (11+) and Message (14+, `messages` option).
//!   Tuple values may be binary (`b`) when the `binary` option is on (14+).
//! - **2** (14+): streaming of in-progress transactions: Stream Start,
//!   Stream Stop, Stream Commit, Stream Abort. Between Stream Start and
//!   Stream Stop, Relation, Type, Insert, Update, Delete, Truncate and
//!   Message carry a leading xid, which is why the decoder keeps state.
//! - **3** (15+): two-phase commit: Begin Prepare, Prepare, Commit Prepared,
//!   Rollback Prepared, Stream Prepare.
//! - **4** (16+): parallel streaming: Stream Abort also carries the abort
//!   LSN and time, but only when `streaming = parallel`.
//!
//! The decoder fails closed: an unknown message type, an unknown tuple
//! column kind, a message not valid for the negotiated version or for the
//! streaming state, a negative or impossible count, a string without its
//! NUL or not UTF-8, a truncated field and trailing bytes are all errors.
//! Column values and Message content are zero-copy [`bytes::Bytes`] slices
//! of the input; only names (in Relation, Type, Origin, Message prefixes and
//! two-phase GIDs) are copied into `String`s.
//!
//! Golden fixtures captured from real servers by
//! `scripts/capture-pgoutput-fixtures` live in `tests/fixtures/pgoutput/`.

mod decode;
#[cfg(test)]
mod encode;
mod error;
mod message;
#[cfg(test)]
mod tests;

pub use decode::Decoder;
pub use error::DecodeError;
pub use message::{
    Begin, BeginPrepare, Commit, CommitPrepared, Delete, Insert, LogicalMessage, Message, Origin,
    Prepare, Relation, RelationColumn, RollbackPrepared, StreamAbort, StreamCommit, StreamStart,
    Truncate, Tuple, TupleValue, TypeMessage, Update,
};
