//! The messages carried inside CopyData once streaming has started: what the
//! server sends (`XLogData`, primary keepalive) and what we send back
//! (standby status update). Pure code, no I/O.
//!
//! Formats from the PostgreSQL documentation, "Streaming Replication
//! Protocol", `START_REPLICATION`. All integers are big-endian; timestamps
//! are microseconds since 2000-01-01 00:00:00 UTC (PostgreSQL's epoch).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use super::error::ReplicationError;
use super::wire::Cursor;
use crate::lsn::Lsn;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// One message of the replication stream, as sent by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `w`: a chunk of output from the logical decoding plugin (for
    /// `pgoutput`, exactly one pgoutput message).
    XLogData {
        /// WAL position where the data starts (for logical decoding: the LSN
        /// of the record that produced it, `0/0` for some messages).
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The server's clock when it sent this, in microseconds since
        /// 2000-01-01 UTC.
        server_time: i64,
        /// The plugin's output, a zero-copy slice of the read buffer. Holding
        /// on to it keeps that whole read buffer alive, so decode and drop.
        data: Bytes,
    },
    /// `k`: the server's keepalive.
    PrimaryKeepAlive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The server's clock when it sent this, in microseconds since
        /// 2000-01-01 UTC.
        server_time: i64,
        /// The server asks for a status update soon, or it will end the
        /// connection after `wal_sender_timeout`.
        reply_requested: bool,
    },
}

/// The positions reported to the server in a standby status update.
///
/// For logical replication the server uses `flush` as the slot's
/// `confirmed_flush_lsn`: WAL before it may be recycled and will not be sent
/// again after a reconnect. Send only positions whose data is durable
/// downstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StandbyStatus {
    /// Last WAL position received and written.
    pub write: Lsn,
    /// Last WAL position durably handled (what the slot confirms).
    pub flush: Lsn,
    /// Last WAL position applied.
    pub apply: Lsn,
    /// Ask the server to answer at once with a keepalive.
    pub reply_requested: bool,
}

impl StandbyStatus {
    /// A status that reports `lsn` as written, flushed and applied.
    pub fn confirmed(lsn: Lsn) -> Self {
        StandbyStatus {
            write: lsn,
            flush: lsn,
            apply: lsn,
            reply_requested: false,
        }
    }
}

/// Parses the payload of one CopyData message received while streaming.
/// Unknown message types fail closed.
pub(crate) fn parse_copy_data(payload: Bytes) -> Result<ReplicationMessage, ReplicationError> {
    let mut c = Cursor::new(payload, "replication CopyData");
    match c.u8()? {
        b'w' => {
            let mut c = Cursor::new(c.rest(), "XLogData");
            let wal_start = lsn(c.i64()?);
            let wal_end = lsn(c.i64()?);
            let server_time = c.i64()?;
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data: c.rest(),
            })
        }
        b'k' => {
            let mut c = Cursor::new(c.rest(), "primary keepalive");
            let wal_end = lsn(c.i64()?);
            let server_time = c.i64()?;
            let reply_requested = c.u8()? != 0;
            c.finish()?;
            Ok(ReplicationMessage::PrimaryKeepAlive {
                wal_end,
                server_time,
                reply_requested,
            })
        }
        other => Err(ReplicationError::protocol(format!(
            "unknown replication message type {:?} in CopyData",
            char::from(other)
        ))),
    }
}

fn lsn(raw: i64) -> Lsn {
    // XLogRecPtr is unsigned on the server; the wire carries its bits.
    Lsn(u64::from_be_bytes(raw.to_be_bytes()))
}

fn wire_lsn(l: Lsn) -> i64 {
    i64::from_be_bytes(l.0.to_be_bytes())
}

/// Appends a CopyData message holding a standby status update (`r`) to `out`:
/// 39 bytes in all.
pub(crate) fn encode_status(status: &StandbyStatus, client_time: i64, out: &mut BytesMut) {
    out.reserve(39);
    out.put_u8(b'd');
    out.put_i32(4 + 1 + 8 * 4 + 1);
    out.put_u8(b'r');
    out.put_i64(wire_lsn(status.write));
    out.put_i64(wire_lsn(status.flush));
    out.put_i64(wire_lsn(status.apply));
    out.put_i64(client_time);
    out.put_u8(u8::from(status.reply_requested));
}

/// Appends a CopyDone message (`c`) to `out`.
pub(crate) fn encode_copy_done(out: &mut BytesMut) {
    out.put_u8(b'c');
    out.put_i32(4);
}

/// Converts a system time to PostgreSQL's timestamp: microseconds since
/// 2000-01-01 UTC.
pub(crate) fn pg_timestamp(t: SystemTime) -> i64 {
    let unix_micros = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    };
    unix_micros.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// The inverse of `pg_timestamp`: a PostgreSQL timestamp (microseconds
/// since 2000-01-01 UTC, such as a commit or send time) as a system time;
/// one the platform's clock cannot hold comes out as the Unix epoch.
pub fn system_time(pg_micros: i64) -> SystemTime {
    let unix_micros = pg_micros.saturating_add(PG_EPOCH_OFFSET_MICROS);
    let offset = Duration::from_micros(unix_micros.unsigned_abs());
    let t = if unix_micros >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    };
    t.unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn xlogdata_parses_with_zero_copy_data() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(0x16_B374_D848);
        b.put_u64(0x16_B374_D900);
        b.put_i64(774_000_000_000_000);
        b.put_slice(b"B\0\0");
        let payload = b.freeze();
        let base = payload.as_ptr() as usize;
        let msg = parse_copy_data(payload).unwrap();
        let ReplicationMessage::XLogData {
            wal_start,
            wal_end,
            server_time,
            data,
        } = msg
        else {
            panic!("not XLogData");
        };
        assert_eq!(wal_start, Lsn(0x16_B374_D848));
        assert_eq!(wal_end, "16/B374D900".parse().unwrap());
        assert_eq!(server_time, 774_000_000_000_000);
        assert_eq!(&data[..], b"B\0\0");
        assert_eq!(
            data.as_ptr() as usize,
            base + 25,
            "data must be a slice, not a copy"
        );
    }

    #[test]
    fn xlogdata_with_empty_data_is_fine_but_a_short_header_is_not() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_bytes(0, 24);
        assert!(matches!(
            parse_copy_data(b.clone().freeze()),
            Ok(ReplicationMessage::XLogData { data, .. }) if data.is_empty()
        ));
        b.truncate(24);
        assert!(matches!(
            parse_copy_data(b.freeze()),
            Err(ReplicationError::Protocol(_))
        ));
    }

    #[test]
    fn keepalive_parses_and_rejects_wrong_sizes() {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(u64::MAX);
        b.put_i64(-5);
        b.put_u8(1);
        assert_eq!(
            parse_copy_data(b.clone().freeze()).unwrap(),
            ReplicationMessage::PrimaryKeepAlive {
                wal_end: Lsn(u64::MAX),
                server_time: -5,
                reply_requested: true
            }
        );
        let mut long = b.clone();
        long.put_u8(0);
        assert!(parse_copy_data(long.freeze()).is_err(), "trailing byte");
        b.truncate(17);
        assert!(parse_copy_data(b.freeze()).is_err(), "missing reply flag");
    }

    #[test]
    fn empty_and_unknown_copy_data_fail_closed() {
        assert!(parse_copy_data(Bytes::new()).is_err());
        assert!(matches!(
            parse_copy_data(Bytes::from_static(b"h123")),
            Err(ReplicationError::Protocol(_))
        ));
    }

    #[test]
    fn status_update_encoding_is_byte_exact() {
        let status = StandbyStatus {
            write: Lsn(0x0000_0001_0000_0002),
            flush: Lsn(0x16_B374_D848),
            apply: Lsn(0xFFFF_FFFF_FFFF_FFFF),
            reply_requested: true,
        };
        let mut out = BytesMut::new();
        encode_status(&status, 0x0102_0304_0506_0708, &mut out);
        let expected: Vec<u8> = [
            &[b'd', 0, 0, 0, 38, b'r'][..],
            &[0, 0, 0, 1, 0, 0, 0, 2],
            &[0, 0, 0, 0x16, 0xB3, 0x74, 0xD8, 0x48],
            &[0xFF; 8],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            &[1],
        ]
        .concat();
        assert_eq!(&out[..], &expected[..]);
        assert_eq!(out.len(), 39);

        out.clear();
        encode_status(&StandbyStatus::confirmed(Lsn(7)), -1, &mut out);
        assert_eq!(out[38], 0, "reply_requested false");
        assert_eq!(&out[6..14], &7u64.to_be_bytes());
        assert_eq!(&out[30..38], &[0xFF; 8]);
    }

    #[test]
    fn copy_done_encoding() {
        let mut out = BytesMut::new();
        encode_copy_done(&mut out);
        assert_eq!(&out[..], &[b'c', 0, 0, 0, 4]);
    }

    #[test]
    fn pg_timestamps_count_from_2000() {
        let y2k = UNIX_EPOCH + Duration::from_secs(946_684_800);
        assert_eq!(pg_timestamp(y2k), 0);
        assert_eq!(
            pg_timestamp(y2k + Duration::from_micros(1_500_000)),
            1_500_000
        );
        assert_eq!(pg_timestamp(UNIX_EPOCH), -PG_EPOCH_OFFSET_MICROS);
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_micros();
        assert_eq!(unix(system_time(0)), 946_684_800_000_000);
        assert_eq!(unix(system_time(1_500_000)), 946_684_801_500_000);
        assert_eq!(unix(system_time(-1_000_000)), 946_684_799_000_000);
        let t = UNIX_EPOCH + Duration::from_micros(1_764_000_000_123_456);
        assert_eq!(
            system_time(pg_timestamp(t)),
            t,
            "the inverse of pg_timestamp"
        );
        // Beyond the platform clock: no panic.
        let _ = system_time(i64::MIN);
        let _ = system_time(i64::MAX);
    }
}
