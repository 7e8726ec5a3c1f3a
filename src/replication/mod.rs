//! The streaming replication client: connects in logical walsender mode,
//! runs replication commands, and streams a logical slot over CopyBoth.
//!
//! tokio-postgres has no replication protocol support, so this module speaks
//! it itself on top of `postgres-protocol` (frontend encoding and the md5 and
//! SCRAM-SHA-256 computations). TLS (the `SSLRequest` negotiation, rustls,
//! and the `tls-server-end-point` data for SCRAM-SHA-256-PLUS) is shared
//! with the ordinary connections, in `crate::database`. See the PostgreSQL
//! documentation, "Streaming Replication Protocol" and "Message Formats".
//!
//! ```text
//! ReplicationClient::connect      TLS + startup (replication=database) + auth
//!   .identify_system()            IDENTIFY_SYSTEM
//!   .create_logical_slot(..)      CREATE_REPLICATION_SLOT … LOGICAL pgoutput
//!   .start_logical_replication()  START_REPLICATION SLOT … LOGICAL X/Y (…)
//!        │ CopyBothResponse: the socket is split
//!        ├─ reader task ──bounded channel──▶ ReplicationStream::recv
//!        │    (XLogData 'w', keepalive 'k'; errors as the last item)
//!        └─ writer task ◀── FeedbackHandle::send_status (standby status 'r')
//! ```
//!
//! # Progress
//!
//! The server uses the `flush` position of a status update as the slot's
//! `confirmed_flush_lsn`: it never streams WAL before it again and may
//! recycle it. This client sends whatever it is given; deciding what is safe
//! to confirm (only what Kafka has acknowledged, never moving backwards) is
//! the relay's job. The server asks for a reply with `reply_requested` in a
//! keepalive and ends the connection when none arrives within
//! `wal_sender_timeout`; status updates go out through their own task so
//! that a consumer that is slow to receive (backpressure) never delays them.
//!
//! # Errors
//!
//! [`ReplicationError::is_transient`] tells whether to reconnect after a delay
//! or stop for an operator. No error or log line contains a password.

mod client;
mod command;
mod connection;
mod error;
mod message;
mod stream;
mod wire;

pub use client::{CreatedSlot, ReplicationClient, SystemIdentity};
pub use command::{SnapshotAction, PG17};
pub use error::{ReplicationError, ServerError};
pub use message::{system_time, ReplicationMessage, StandbyStatus};
pub use stream::{FeedbackHandle, ReplicationStream};

/// The pure framing and parsing behind the replication connection, for the
/// fuzz targets in `fuzz/` only. Not part of the API: it may change at any
/// time.
#[doc(hidden)]
pub mod fuzzing {
    use bytes::{Bytes, BytesMut};

    use super::{message, wire, ReplicationError, ReplicationMessage};

    /// Splits one complete backend message (tag and body) off the front of
    /// `buf`; `Ok(None)` while it is incomplete.
    pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, ReplicationError> {
        Ok(wire::decode_frame(buf)?.map(|f| (f.tag, f.body)))
    }

    /// Grows `buf` before a read, as the connection's readers do.
    pub fn reserve_for_frame(buf: &mut BytesMut) -> Result<(), ReplicationError> {
        wire::reserve_for_frame(buf)
    }

    /// Interprets a backend message; returns its `Debug` text.
    pub fn parse_message(tag: u8, body: Bytes) -> Result<String, ReplicationError> {
        wire::parse_message(wire::Frame { tag, body }).map(|m| format!("{m:?}"))
    }

    /// Parses the payload of a CopyData message received while streaming.
    pub fn parse_copy_data(payload: Bytes) -> Result<ReplicationMessage, ReplicationError> {
        message::parse_copy_data(payload)
    }
}
