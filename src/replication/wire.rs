//! Backend message framing and parsing: bytes in, messages out, no I/O.
//!
//! Every backend message is a one-byte tag, a big-endian `i32` length that
//! counts itself but not the tag, and a body (PostgreSQL documentation,
//! "Message Formats"). [`decode_frame`] checks the header before anything is
//! consumed, returns `Ok(None)` while a frame is incomplete, and only then
//! splits the whole frame off the buffer, so a body is a zero-copy [`Bytes`]
//! slice of what was read from the socket.
//!
//! `postgres_protocol::message::backend::Message::parse` cannot be used here:
//! it does not know `CopyBothResponse` (`W`), which starts streaming.

use bytes::{Buf, Bytes, BytesMut};

use super::error::{ReplicationError, ServerError};

/// The largest frame we accept, tag and length included. PostgreSQL's own
/// allocation limit (`MaxAllocSize`) is just under 1 GiB, so anything larger
/// is a corrupt length, not a big row.
pub(crate) const MAX_FRAME_LEN: usize = 1 << 30;

/// Bytes of tag plus length word in front of every backend message.
pub(crate) const HEADER_LEN: usize = 5;

pub(crate) const AUTHENTICATION: u8 = b'R';
pub(crate) const BACKEND_KEY_DATA: u8 = b'K';
pub(crate) const COMMAND_COMPLETE: u8 = b'C';
pub(crate) const COPY_BOTH_RESPONSE: u8 = b'W';
pub(crate) const COPY_DATA: u8 = b'd';
pub(crate) const COPY_DONE: u8 = b'c';
pub(crate) const COPY_IN_RESPONSE: u8 = b'G';
pub(crate) const COPY_OUT_RESPONSE: u8 = b'H';
pub(crate) const DATA_ROW: u8 = b'D';
pub(crate) const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub(crate) const ERROR_RESPONSE: u8 = b'E';
pub(crate) const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub(crate) const NOTICE_RESPONSE: u8 = b'N';
pub(crate) const NOTIFICATION_RESPONSE: u8 = b'A';
pub(crate) const PARAMETER_STATUS: u8 = b'S';
pub(crate) const READY_FOR_QUERY: u8 = b'Z';
pub(crate) const ROW_DESCRIPTION: u8 = b'T';

/// One complete backend message, not yet interpreted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    /// The message type byte.
    pub(crate) tag: u8,
    /// The body, without tag and length.
    pub(crate) body: Bytes,
}

/// Looks at the header at the front of `buf`, without consuming anything.
///
/// Returns the total size of the frame (tag and length included) once the
/// five header bytes are there, `None` before that, and an error for a length
/// below 4 or above [`MAX_FRAME_LEN`].
pub(crate) fn frame_len(buf: &[u8]) -> Result<Option<usize>, ReplicationError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ReplicationError::protocol(format!(
            "message {:?} has invalid length {len}",
            char::from(buf[0])
        )));
    }
    // `len` is positive, so the conversion cannot fail on 32- or 64-bit targets.
    let total = usize::try_from(len).map_or(usize::MAX, |l| l.saturating_add(1));
    if total > MAX_FRAME_LEN {
        return Err(ReplicationError::protocol(format!(
            "message {:?} of {len} bytes exceeds the {MAX_FRAME_LEN}-byte limit",
            char::from(buf[0])
        )));
    }
    Ok(Some(total))
}

/// Splits one complete frame off the front of `buf`.
///
/// `Ok(None)` means "need more bytes"; nothing is consumed until a whole
/// frame is buffered.
pub(crate) fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ReplicationError> {
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    let tag = frame[0];
    frame.advance(HEADER_LEN);
    Ok(Some(Frame { tag, body: frame }))
}

/// The most [`reserve_for_frame`] reserves ahead of the bytes of a frame
/// that have arrived.
pub(crate) const MAX_FRAME_RESERVE: usize = 1 << 20;

/// Makes room in `buf` for more of the frame whose header is at its front,
/// so that a large frame is not read through many small reallocations.
///
/// The length word is not trusted with memory: at most
/// [`MAX_FRAME_RESERVE`] bytes are reserved beyond what has arrived. A
/// large frame still takes few reallocations, because `BytesMut` at least
/// doubles its capacity whenever it grows, but a corrupt or hostile header
/// of up to [`MAX_FRAME_LEN`] costs memory only as its bytes arrive.
pub(crate) fn reserve_for_frame(buf: &mut BytesMut) -> Result<(), ReplicationError> {
    if let Some(total) = frame_len(buf)? {
        buf.reserve(total.saturating_sub(buf.len()).min(MAX_FRAME_RESERVE));
    }
    Ok(())
}

/// A bounds-checked reader over a message body. Strings and byte runs are
/// zero-copy slices of the body.
pub(crate) struct Cursor {
    buf: Bytes,
    what: &'static str,
}

impl Cursor {
    /// Reads `buf`, naming it `what` in error messages.
    pub(crate) fn new(buf: Bytes, what: &'static str) -> Self {
        Cursor { buf, what }
    }

    fn short(&self, need: usize) -> ReplicationError {
        ReplicationError::protocol(format!(
            "{} is truncated: needed {need} more bytes, {} left",
            self.what,
            self.buf.len()
        ))
    }

    /// Takes the next `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, ReplicationError> {
        if self.buf.len() < n {
            return Err(self.short(n));
        }
        Ok(self.buf.split_to(n))
    }

    /// Reads one byte.
    pub(crate) fn u8(&mut self) -> Result<u8, ReplicationError> {
        if self.buf.is_empty() {
            return Err(self.short(1));
        }
        Ok(self.buf.get_u8())
    }

    /// Reads a big-endian `i16`.
    pub(crate) fn i16(&mut self) -> Result<i16, ReplicationError> {
        if self.buf.len() < 2 {
            return Err(self.short(2));
        }
        Ok(self.buf.get_i16())
    }

    /// Reads a big-endian `i32`.
    pub(crate) fn i32(&mut self) -> Result<i32, ReplicationError> {
        if self.buf.len() < 4 {
            return Err(self.short(4));
        }
        Ok(self.buf.get_i32())
    }

    /// Reads a big-endian `i64`.
    pub(crate) fn i64(&mut self) -> Result<i64, ReplicationError> {
        if self.buf.len() < 8 {
            return Err(self.short(8));
        }
        Ok(self.buf.get_i64())
    }

    /// Reads a NUL-terminated string, without the NUL.
    pub(crate) fn cstr(&mut self) -> Result<Bytes, ReplicationError> {
        let Some(end) = self.buf.iter().position(|&b| b == 0) else {
            return Err(ReplicationError::protocol(format!(
                "{} has a string without its NUL terminator",
                self.what
            )));
        };
        let s = self.buf.split_to(end);
        self.buf.advance(1);
        Ok(s)
    }

    /// Everything not read yet.
    pub(crate) fn rest(self) -> Bytes {
        self.buf
    }

    /// Fails if bytes are left over: a message longer than its format says
    /// is as suspicious as a short one.
    pub(crate) fn finish(self) -> Result<(), ReplicationError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ReplicationError::protocol(format!(
                "{} has {} unexpected trailing bytes",
                self.what,
                self.buf.len()
            )))
        }
    }
}

/// An authentication request (`R`) from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AuthRequest {
    /// `AuthenticationOk` (0).
    Ok,
    /// `AuthenticationCleartextPassword` (3).
    Cleartext,
    /// `AuthenticationMD5Password` (5) with its salt.
    Md5 { salt: [u8; 4] },
    /// `AuthenticationSASL` (10) with the mechanisms the server offers.
    Sasl { mechanisms: Vec<String> },
    /// `AuthenticationSASLContinue` (11).
    SaslContinue(Bytes),
    /// `AuthenticationSASLFinal` (12).
    SaslFinal(Bytes),
    /// Any other method (Kerberos 2, SCM 6, GSS 7/8, SSPI 9, …).
    Unsupported(i32),
}

/// A backend message, interpreted as far as this client needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BackendMessage {
    Authentication(AuthRequest),
    BackendKeyData,
    ParameterStatus { name: String, value: String },
    ReadyForQuery,
    RowDescription { columns: usize },
    DataRow(Vec<Option<String>>),
    CommandComplete(String),
    EmptyQueryResponse,
    Error(ServerError),
    Notice(ServerError),
    NotificationResponse,
    CopyBothResponse,
    CopyInResponse,
    CopyOutResponse,
    CopyData(Bytes),
    CopyDone,
}

/// Interprets a frame. Unknown tags are protocol violations: we fail closed.
pub(crate) fn parse_message(frame: Frame) -> Result<BackendMessage, ReplicationError> {
    let Frame { tag, body } = frame;
    let msg = match tag {
        AUTHENTICATION => BackendMessage::Authentication(parse_auth(body)?),
        BACKEND_KEY_DATA => BackendMessage::BackendKeyData,
        PARAMETER_STATUS => {
            let mut c = Cursor::new(body, "ParameterStatus");
            let name = lossy(&c.cstr()?);
            let value = lossy(&c.cstr()?);
            c.finish()?;
            BackendMessage::ParameterStatus { name, value }
        }
        READY_FOR_QUERY => {
            let mut c = Cursor::new(body, "ReadyForQuery");
            c.u8()?;
            c.finish()?;
            BackendMessage::ReadyForQuery
        }
        ROW_DESCRIPTION => BackendMessage::RowDescription {
            columns: parse_row_description(body)?,
        },
        DATA_ROW => BackendMessage::DataRow(parse_data_row(body)?),
        COMMAND_COMPLETE => {
            let mut c = Cursor::new(body, "CommandComplete");
            let tag = lossy(&c.cstr()?);
            c.finish()?;
            BackendMessage::CommandComplete(tag)
        }
        EMPTY_QUERY_RESPONSE => BackendMessage::EmptyQueryResponse,
        ERROR_RESPONSE => BackendMessage::Error(parse_error_fields(body, "ErrorResponse")?),
        NOTICE_RESPONSE => BackendMessage::Notice(parse_error_fields(body, "NoticeResponse")?),
        NOTIFICATION_RESPONSE => BackendMessage::NotificationResponse,
        COPY_BOTH_RESPONSE => {
            check_copy_response(body, "CopyBothResponse")?;
            BackendMessage::CopyBothResponse
        }
        COPY_IN_RESPONSE => BackendMessage::CopyInResponse,
        COPY_OUT_RESPONSE => BackendMessage::CopyOutResponse,
        COPY_DATA => BackendMessage::CopyData(body),
        COPY_DONE => {
            Cursor::new(body, "CopyDone").finish()?;
            BackendMessage::CopyDone
        }
        NEGOTIATE_PROTOCOL_VERSION => {
            return Err(ReplicationError::protocol(
                "server does not support protocol 3.0 as requested (NegotiateProtocolVersion)",
            ))
        }
        other => {
            return Err(ReplicationError::protocol(format!(
                "unexpected message type {:?} ({} body bytes)",
                char::from(other),
                body.len()
            )))
        }
    };
    Ok(msg)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn parse_auth(body: Bytes) -> Result<AuthRequest, ReplicationError> {
    let mut c = Cursor::new(body, "Authentication request");
    let req = match c.i32()? {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => {
            let salt = c.take(4)?;
            AuthRequest::Md5 {
                salt: [salt[0], salt[1], salt[2], salt[3]],
            }
        }
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = c.cstr()?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(lossy(&m));
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => return Ok(AuthRequest::SaslContinue(c.rest())),
        12 => return Ok(AuthRequest::SaslFinal(c.rest())),
        // Other methods carry method-specific data we do not read.
        other => return Ok(AuthRequest::Unsupported(other)),
    };
    c.finish()?;
    Ok(req)
}

fn parse_row_description(body: Bytes) -> Result<usize, ReplicationError> {
    let mut c = Cursor::new(body, "RowDescription");
    let n = c.i16()?;
    let n = usize::try_from(n).map_err(|_| {
        ReplicationError::protocol(format!("RowDescription has negative column count {n}"))
    })?;
    for _ in 0..n {
        c.cstr()?; // name
        c.i32()?; // table oid
        c.i16()?; // column number
        c.i32()?; // type oid
        c.i16()?; // type size
        c.i32()?; // type modifier
        c.i16()?; // format
    }
    c.finish()?;
    Ok(n)
}

fn parse_data_row(body: Bytes) -> Result<Vec<Option<String>>, ReplicationError> {
    let mut c = Cursor::new(body, "DataRow");
    let n = c.i16()?;
    let n = usize::try_from(n).map_err(|_| {
        ReplicationError::protocol(format!("DataRow has negative column count {n}"))
    })?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let len = c.i32()?;
        if len == -1 {
            values.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| {
            ReplicationError::protocol(format!("DataRow has invalid value length {len}"))
        })?;
        let raw = c.take(len)?;
        let text = String::from_utf8(raw.to_vec())
            .map_err(|_| ReplicationError::protocol("DataRow has a value that is not UTF-8"))?;
        values.push(Some(text));
    }
    c.finish()?;
    Ok(values)
}

fn check_copy_response(body: Bytes, what: &'static str) -> Result<(), ReplicationError> {
    let mut c = Cursor::new(body, what);
    c.u8()?; // overall format
    let n = c.i16()?;
    let n = usize::try_from(n)
        .map_err(|_| ReplicationError::protocol(format!("{what} has negative column count {n}")))?;
    for _ in 0..n {
        c.i16()?;
    }
    c.finish()
}

/// Parses the fields of an `ErrorResponse` or `NoticeResponse`. The text is
/// for people, so invalid UTF-8 (possible before `client_encoding` applies)
/// is replaced rather than rejected; a missing SQLSTATE or message is not.
pub(crate) fn parse_error_fields(
    body: Bytes,
    what: &'static str,
) -> Result<ServerError, ReplicationError> {
    let mut c = Cursor::new(body, what);
    let mut e = ServerError::default();
    let mut localized_severity = None;
    let (mut have_code, mut have_message) = (false, false);
    loop {
        let kind = c.u8()?;
        if kind == 0 {
            break;
        }
        let value = lossy(&c.cstr()?);
        match kind {
            b'S' => localized_severity = Some(value),
            b'V' => e.severity = value,
            b'C' => {
                e.code = value;
                have_code = true;
            }
            b'M' => {
                e.message = value;
                have_message = true;
            }
            b'D' => e.detail = Some(value),
            b'H' => e.hint = Some(value),
            _ => {} // position, where, schema, file, line, routine, …
        }
    }
    c.finish()?;
    if !have_code || !have_message {
        return Err(ReplicationError::protocol(format!(
            "{what} lacks its SQLSTATE or message field"
        )));
    }
    if e.severity.is_empty() {
        e.severity = localized_severity.unwrap_or_default();
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(i32::try_from(body.len()).unwrap() + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_split_at_every_byte_boundary_decode_identically() {
        let mut stream = frame(b'd', b"wxyz");
        stream.extend(frame(b'c', b""));
        stream.extend(frame(b'Z', b"I"));
        for cut in 0..=stream.len() {
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                buf.extend_from_slice(part);
                while let Some(f) = decode_frame(&mut buf).unwrap() {
                    out.push(f);
                }
            }
            assert!(buf.is_empty(), "cut at {cut} left bytes behind");
            assert_eq!(
                out,
                vec![
                    Frame {
                        tag: b'd',
                        body: Bytes::from_static(b"wxyz")
                    },
                    Frame {
                        tag: b'c',
                        body: Bytes::new()
                    },
                    Frame {
                        tag: b'Z',
                        body: Bytes::from_static(b"I")
                    },
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn frames_fed_one_byte_at_a_time_consume_nothing_until_complete() {
        let stream = frame(b'd', b"payload");
        let mut buf = BytesMut::new();
        for (i, b) in stream.iter().enumerate() {
            buf.put_u8(*b);
            let got = decode_frame(&mut buf).unwrap();
            if i + 1 < stream.len() {
                assert!(got.is_none());
                assert_eq!(
                    buf.len(),
                    i + 1,
                    "bytes consumed before the frame was whole"
                );
            } else {
                assert_eq!(got.unwrap().body, Bytes::from_static(b"payload"));
            }
        }
    }

    #[test]
    fn lengths_below_four_or_above_the_limit_are_rejected() {
        for len in [i32::MIN, -1, 0, 3] {
            let mut buf = BytesMut::new();
            buf.put_u8(b'd');
            buf.put_i32(len);
            assert!(
                matches!(decode_frame(&mut buf), Err(ReplicationError::Protocol(_))),
                "{len}"
            );
        }
        let mut buf = BytesMut::new();
        buf.put_u8(b'd');
        buf.put_i32(i32::try_from(MAX_FRAME_LEN).unwrap());
        assert!(matches!(
            decode_frame(&mut buf),
            Err(ReplicationError::Protocol(_))
        ));
        // Exactly at the limit the header is accepted (the body is awaited).
        let mut buf = BytesMut::new();
        buf.put_u8(b'd');
        buf.put_i32(i32::try_from(MAX_FRAME_LEN - 1).unwrap());
        assert_eq!(frame_len(&buf).unwrap(), Some(MAX_FRAME_LEN));
        assert!(decode_frame(&mut buf).unwrap().is_none());
    }

    #[test]
    fn a_huge_length_word_reserves_memory_only_as_the_frame_arrives() {
        // Found by the replication_framing fuzz target: a five-byte header
        // claiming a frame of almost 1 GiB made the reader allocate it all.
        let mut buf = BytesMut::new();
        buf.put_u8(b'd');
        buf.put_i32(i32::try_from(MAX_FRAME_LEN - 1).unwrap());
        reserve_for_frame(&mut buf).unwrap();
        assert!(
            buf.capacity() <= 2 * MAX_FRAME_RESERVE,
            "reserved {} bytes for a 5-byte header",
            buf.capacity()
        );

        // A real 5 MiB frame, read in 64 KiB pieces with a reservation
        // before each read, never holds more than twice what has arrived
        // plus one reservation, and decodes whole.
        let body = vec![7u8; 5 << 20];
        let stream = frame(b'd', &body);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for read in stream.chunks(64 << 10) {
            buf.extend_from_slice(read);
            while let Some(f) = decode_frame(&mut buf).unwrap() {
                frames.push(f);
            }
            reserve_for_frame(&mut buf).unwrap();
            assert!(
                frames.len() == 1 || buf.capacity() <= 2 * (buf.len() + MAX_FRAME_RESERVE),
                "capacity {} for {} bytes received",
                buf.capacity(),
                buf.len()
            );
        }
        assert_eq!(frames.len(), 1);
        assert_eq!(&frames[0].body[..], &body[..]);
    }

    #[test]
    fn bodies_are_zero_copy_slices_of_the_read_buffer() {
        let mut buf = BytesMut::from(&frame(b'd', b"abc")[..]);
        let base = buf.as_ptr() as usize;
        let f = decode_frame(&mut buf).unwrap().unwrap();
        assert_eq!(f.body.as_ptr() as usize, base + HEADER_LEN);
    }

    fn error_body(fields: &[(u8, &str)]) -> Bytes {
        let mut b = BytesMut::new();
        for (k, v) in fields {
            b.put_u8(*k);
            b.put_slice(v.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
        b.freeze()
    }

    #[test]
    fn error_response_fields_are_read_and_nonlocalized_severity_wins() {
        let body = error_body(&[
            (b'S', "FEHLER"),
            (b'V', "ERROR"),
            (b'C', "42704"),
            (b'M', "replication slot \"x\" does not exist"),
            (b'D', "some detail"),
            (b'H', "some hint"),
            (b'F', "slot.c"),
            (b'L', "500"),
            (b'R', "ReplicationSlotAcquire"),
        ]);
        let msg = parse_message(Frame { tag: b'E', body }).unwrap();
        assert_eq!(
            msg,
            BackendMessage::Error(ServerError {
                severity: "ERROR".into(),
                code: "42704".into(),
                message: "replication slot \"x\" does not exist".into(),
                detail: Some("some detail".into()),
                hint: Some("some hint".into()),
            })
        );
        let body = error_body(&[(b'S', "FATAL"), (b'C', "57P01"), (b'M', "terminating")]);
        let BackendMessage::Error(e) = parse_message(Frame { tag: b'E', body }).unwrap() else {
            panic!("not an error");
        };
        assert_eq!(
            (e.severity.as_str(), e.detail, e.hint),
            ("FATAL", None, None)
        );
    }

    #[test]
    fn error_response_without_code_or_terminator_is_a_protocol_error() {
        let body = error_body(&[(b'S', "ERROR"), (b'M', "no code")]);
        assert!(parse_message(Frame { tag: b'E', body }).is_err());
        let body = Bytes::from_static(b"SERROR\0CXX000\0Mmsg\0"); // no final 0
        assert!(parse_message(Frame { tag: b'E', body }).is_err());
        let body = Bytes::from_static(b"SERROR\0CXX000\0Mmsg"); // unterminated string
        assert!(parse_message(Frame { tag: b'E', body }).is_err());
    }

    #[test]
    fn data_rows_with_nulls_and_bad_lengths() {
        let mut b = BytesMut::new();
        b.put_i16(3);
        b.put_i32(2);
        b.put_slice(b"ab");
        b.put_i32(-1);
        b.put_i32(0);
        let msg = parse_message(Frame {
            tag: b'D',
            body: b.freeze(),
        })
        .unwrap();
        assert_eq!(
            msg,
            BackendMessage::DataRow(vec![Some("ab".into()), None, Some(String::new())])
        );
        for bad in [
            &[0xff, 0xff][..],                   // negative column count
            &[0, 1, 0xff, 0xff, 0xff, 0xfe][..], // length -2
            &[0, 1, 0, 0, 0, 9, b'a'][..],       // value longer than the body
            &[0, 1, 0, 0, 0, 1, b'a', b'x'][..], // trailing byte
            &[0, 1, 0, 0, 0, 2, 0xc3, 0x28][..], // invalid UTF-8
        ] {
            let r = parse_message(Frame {
                tag: b'D',
                body: Bytes::copy_from_slice(bad),
            });
            assert!(matches!(r, Err(ReplicationError::Protocol(_))), "{bad:?}");
        }
    }

    #[test]
    fn authentication_requests_parse() {
        let p = |b: &[u8]| {
            parse_message(Frame {
                tag: b'R',
                body: Bytes::copy_from_slice(b),
            })
        };
        assert_eq!(
            p(&[0, 0, 0, 0]).unwrap(),
            BackendMessage::Authentication(AuthRequest::Ok)
        );
        assert_eq!(
            p(&[0, 0, 0, 5, 1, 2, 3, 4]).unwrap(),
            BackendMessage::Authentication(AuthRequest::Md5 { salt: [1, 2, 3, 4] })
        );
        assert_eq!(
            p(b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0").unwrap(),
            BackendMessage::Authentication(AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()]
            })
        );
        assert_eq!(
            p(b"\0\0\0\x0br=abc").unwrap(),
            BackendMessage::Authentication(AuthRequest::SaslContinue(Bytes::from_static(b"r=abc")))
        );
        assert_eq!(
            p(&[0, 0, 0, 7]).unwrap(),
            BackendMessage::Authentication(AuthRequest::Unsupported(7))
        );
        assert!(p(&[0, 0, 0, 5, 1, 2]).is_err(), "short md5 salt");
        assert!(p(&[0, 0]).is_err(), "short code");
    }

    #[test]
    fn copy_both_response_and_unknown_tags() {
        let ok = parse_message(Frame {
            tag: b'W',
            body: Bytes::from_static(&[0, 0, 0]),
        });
        assert_eq!(ok.unwrap(), BackendMessage::CopyBothResponse);
        let bad = parse_message(Frame {
            tag: b'W',
            body: Bytes::from_static(&[0, 0, 1]),
        });
        assert!(bad.is_err());
        let unknown = parse_message(Frame {
            tag: b'?',
            body: Bytes::new(),
        });
        assert!(matches!(unknown, Err(ReplicationError::Protocol(_))));
    }

    #[test]
    fn parameter_status_and_row_description() {
        let msg = parse_message(Frame {
            tag: b'S',
            body: Bytes::from_static(b"server_version\x0015.18 (Debian 15.18-1)\0"),
        })
        .unwrap();
        assert_eq!(
            msg,
            BackendMessage::ParameterStatus {
                name: "server_version".into(),
                value: "15.18 (Debian 15.18-1)".into()
            }
        );
        let mut b = BytesMut::new();
        b.put_i16(1);
        b.put_slice(b"systemid\0");
        b.put_i32(0);
        b.put_i16(0);
        b.put_i32(25);
        b.put_i16(-1);
        b.put_i32(0);
        b.put_i16(0);
        let msg = parse_message(Frame {
            tag: b'T',
            body: b.freeze(),
        })
        .unwrap();
        assert_eq!(msg, BackendMessage::RowDescription { columns: 1 });
    }
}
