//! Fuzzes the framing and parsing of the replication connection, the way its
//! stream reader uses them.
//!
//! Input: one byte that picks how the stream is cut into reads (0: one read;
//! otherwise reads of 1 to that many bytes, in a pattern derived from it),
//! one byte that selects the pgoutput protocol version (`1 + byte % 4`),
//! then the bytes the server sends. Each read is appended to a buffer,
//! complete frames are split off and the buffer is grown for the next read,
//! as the reader does; CopyData
//! payloads are parsed as replication messages (XLogData, keepalive) and
//! XLogData payloads are decoded as pgoutput; every other frame is parsed as
//! a backend message.
//!
//! Besides "never panics" and, under `-malloc_limit_mb`, "never allocates
//! in proportion to a length it has not received", it checks that how the
//! stream is cut into reads makes no difference: the frames, the framing
//! error and the bytes left over are those of one read of everything.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use pgoutbox::pgoutput::Decoder;
use pgoutbox::replication::fuzzing::{
    decode_frame, parse_copy_data, parse_message, reserve_for_frame,
};
use pgoutbox::replication::ReplicationMessage;

fuzz_target!(|data: &[u8]| {
    let [cut, version, stream @ ..] = data else {
        return;
    };
    let mut decoder = Decoder::new(1 + u32::from(version % 4));

    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut failed = false;
    for read in Reads::new(stream, *cut) {
        buf.extend_from_slice(read);
        // The reader splits off every whole frame, then makes room for the
        // next read.
        if split_frames(&mut buf, &mut frames).is_err() || reserve_for_frame(&mut buf).is_err() {
            failed = true;
            break;
        }
    }

    // The same stream in one read.
    let mut whole = BytesMut::from(stream);
    let mut whole_frames = Vec::new();
    let whole_failed = split_frames(&mut whole, &mut whole_frames).is_err();
    assert_eq!(frames, whole_frames, "frames depend on how reads are cut");
    assert_eq!(failed, whole_failed, "framing errors depend on reads");
    if !failed {
        assert_eq!(buf, whole, "bytes left over depend on reads");
    }

    for (tag, body) in frames {
        if tag == b'd' {
            if let Ok(ReplicationMessage::XLogData { data, .. }) = parse_copy_data(body) {
                let _ = decoder.decode(data);
            }
        } else if let Err(e) = parse_message(tag, body) {
            let _ = e.to_string();
        }
    }
});

/// Splits every complete frame off `buf`; `Err` on a framing error.
fn split_frames(buf: &mut BytesMut, frames: &mut Vec<(u8, Bytes)>) -> Result<(), ()> {
    loop {
        match decode_frame(buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return Ok(()),
            Err(e) => {
                let _ = e.to_string();
                return Err(());
            }
        }
    }
}

/// The stream cut into reads: one read when `cut` is 0, otherwise reads of
/// 1 to `cut` bytes whose sizes follow a xorshift sequence seeded by `cut`.
struct Reads<'a> {
    rest: &'a [u8],
    cut: u8,
    state: u32,
}

impl<'a> Reads<'a> {
    fn new(stream: &'a [u8], cut: u8) -> Self {
        Reads {
            rest: stream,
            cut,
            state: 0x9E37_79B9 ^ u32::from(cut),
        }
    }
}

impl<'a> Iterator for Reads<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let size = if self.cut == 0 {
            self.rest.len()
        } else {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 17;
            self.state ^= self.state << 5;
            1 + self.state as usize % usize::from(self.cut)
        };
        let (read, rest) = self.rest.split_at(size.min(self.rest.len()));
        self.rest = rest;
        Some(read)
    }
}
