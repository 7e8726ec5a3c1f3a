//! Fuzzes the pgoutput decoder with a stream of messages.
//!
//! Input: one byte that selects the protocol version (`1 + byte % 4`), then
//! messages, each a big-endian `u16` length and that many bytes, all fed in
//! order to one `Decoder` so that its streaming state (the xid prefix
//! between Stream Start and Stream Stop) is exercised. Whatever is left when
//! no whole length-prefixed message remains is decoded as one more message,
//! and everything after the version byte is also decoded whole by a fresh
//! decoder.
//!
//! Besides "never panics" (and, under `-malloc_limit_mb`, "never allocates
//! in proportion to a count it has not checked"), it checks the decoder's
//! documented contract: a failed decode leaves the state unchanged, only
//! Stream Start and Stream Stop change it, the decoded message has the type
//! byte it was read from, values are zero-copy slices of the input, and
//! error offsets lie inside the message.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgoutbox::pgoutput::{DecodeError, Decoder, LogicalMessage, Tuple, TupleValue};

fuzz_target!(|data: &[u8]| {
    let Some((&version, rest)) = data.split_first() else {
        return;
    };
    let version = 1 + u32::from(version % 4);
    let input = Bytes::copy_from_slice(rest);

    let mut decoder = Decoder::new(version);
    let mut at = 0;
    while let Some(len) = input.get(at..at + 2) {
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let Some(end) = (at + 2).checked_add(len).filter(|&e| e <= input.len()) else {
            break;
        };
        decode_checked(&mut decoder, input.slice(at + 2..end));
        at = end;
    }
    if at < input.len() {
        decode_checked(&mut decoder, input.slice(at..));
    }

    decode_checked(&mut Decoder::new(version), input);
});

fn decode_checked(decoder: &mut Decoder, data: Bytes) {
    let before = decoder.clone();
    match decoder.decode(data.clone()) {
        Ok(message) => {
            assert_eq!(message.tag(), data[0], "tag of {message:?}");
            let in_stream = match message {
                LogicalMessage::StreamStart(_) => true,
                LogicalMessage::StreamStop => false,
                _ => before.in_stream(),
            };
            assert_eq!(decoder.in_stream(), in_stream, "state after {message:?}");
            for slice in slices(&message) {
                assert!(is_within(slice, &data), "{message:?} copied a value");
            }
        }
        Err(e) => {
            assert_eq!(decoder.in_stream(), before.in_stream(), "state after {e}");
            check_error(&e, data.len());
        }
    }
    assert_eq!(decoder.proto_version(), before.proto_version());
}

/// Every byte slice a decoded message holds.
fn slices(message: &LogicalMessage) -> Vec<&Bytes> {
    let tuples: Vec<&Tuple> = match message {
        LogicalMessage::Insert(m) => vec![&m.new],
        LogicalMessage::Update(m) => m.key.iter().chain(&m.old).chain([&m.new]).collect(),
        LogicalMessage::Delete(m) => m.key.iter().chain(&m.old).collect(),
        LogicalMessage::Message(m) => return vec![&m.content],
        _ => return Vec::new(),
    };
    tuples
        .into_iter()
        .flat_map(|t| &t.0)
        .filter_map(|v| match v {
            TupleValue::Text(b) | TupleValue::Binary(b) => Some(b),
            TupleValue::Null | TupleValue::UnchangedToast => None,
        })
        .collect()
}

fn is_within(inner: &[u8], outer: &[u8]) -> bool {
    let (start, end) = (inner.as_ptr() as usize, outer.as_ptr() as usize);
    inner.is_empty() || (start >= end && start + inner.len() <= end + outer.len())
}

/// The error's offsets point into the message, and it displays.
fn check_error(e: &DecodeError, len: usize) {
    let _ = e.to_string();
    match *e {
        DecodeError::Truncated {
            offset,
            needed,
            remaining,
            ..
        } => {
            assert!(needed > remaining, "{e}");
            assert_eq!(offset + remaining, len, "{e}");
        }
        DecodeError::UnknownTupleKind { offset, .. }
        | DecodeError::UnexpectedTupleMarker { offset, .. }
        | DecodeError::NegativeCount { offset, .. }
        | DecodeError::ImplausibleCount { offset, .. }
        | DecodeError::InvalidUtf8 { offset, .. }
        | DecodeError::InvalidFlags { offset, .. } => assert!(offset < len, "{e}"),
        // A string may start right at the end of the message.
        DecodeError::MissingNulTerminator { offset, .. } => assert!(offset <= len, "{e}"),
        DecodeError::TrailingBytes { count, offset, .. } => {
            assert!(count > 0, "{e}");
            assert_eq!(offset + count, len, "{e}");
        }
        DecodeError::Empty => assert_eq!(len, 0),
        DecodeError::UnknownTag { .. }
        | DecodeError::TagNotInProtocol { .. }
        | DecodeError::UnsupportedProtocolVersion(_)
        | DecodeError::UnexpectedInStream { .. }
        | DecodeError::UnexpectedOutsideStream { .. } => {}
    }
}
