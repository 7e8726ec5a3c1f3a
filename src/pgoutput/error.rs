//! Why a pgoutput message could not be decoded.

/// A pgoutput message that could not be decoded.
///
/// Every kind is definite: the bytes are not what PostgreSQL sends for the
/// negotiated protocol version, so retrying the same bytes cannot help. The
/// relay stops and reports it; it never skips a message it cannot read.
///
/// `message` names the message type being decoded ("Insert", "Stream
/// Abort", ...), `field` the part being read, and `offset` the byte position
/// within the message (the type byte is offset 0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message had no bytes at all.
    #[error("empty pgoutput message: no message type byte")]
    Empty,

    /// The message ended before a field was complete.
    #[error(
        "truncated {message} message: {field} at byte {offset} needs {needed} bytes, \
         only {remaining} left"
    )]
    Truncated {
        /// The message type being decoded.
        message: &'static str,
        /// The field that did not fit.
        field: &'static str,
        /// Where the field starts.
        offset: usize,
        /// How many bytes the field needs.
        needed: usize,
        /// How many bytes were left.
        remaining: usize,
    },

    /// The message type byte is not one of the protocol's.
    #[error("unknown pgoutput message type {tag:#04x} ({})", printable(*tag))]
    UnknownTag {
        /// The type byte.
        tag: u8,
    },

    /// The message type exists, but not in the negotiated protocol version.
    #[error(
        "{message} message (type '{}') needs pgoutput protocol version {min_version} or later, \
         but version {proto_version} was negotiated",
        printable(*tag)
    )]
    TagNotInProtocol {
        /// The type byte.
        tag: u8,
        /// The message type.
        message: &'static str,
        /// The first protocol version that has this message.
        min_version: u32,
        /// The protocol version the decoder was created for.
        proto_version: u32,
    },

    /// The decoder was created for a protocol version it does not know.
    #[error("unsupported pgoutput protocol version {0}: this decoder knows versions 1 to 4")]
    UnsupportedProtocolVersion(u32),

    /// A tuple column kind byte is not `n`, `u`, `t` or `b`.
    #[error(
        "{message} message: unknown tuple column kind {kind:#04x} ({}) for column {column} \
         at byte {offset}",
        printable(*kind)
    )]
    UnknownTupleKind {
        /// The message type being decoded.
        message: &'static str,
        /// The kind byte.
        kind: u8,
        /// The column index within the tuple.
        column: usize,
        /// Where the kind byte is.
        offset: usize,
    },

    /// A tuple marker (`N`, `K`, `O`) was expected but something else came.
    #[error(
        "{message} message: expected {expected} at byte {offset}, found {found:#04x} ({})",
        printable(*found)
    )]
    UnexpectedTupleMarker {
        /// The message type being decoded.
        message: &'static str,
        /// What the protocol allows here.
        expected: &'static str,
        /// The byte found.
        found: u8,
        /// Where it is.
        offset: usize,
    },

    /// A count or length field was negative.
    #[error("{message} message: negative {field} {value} at byte {offset}")]
    NegativeCount {
        /// The message type being decoded.
        message: &'static str,
        /// The count or length field.
        field: &'static str,
        /// The value read.
        value: i64,
        /// Where the field is.
        offset: usize,
    },

    /// A count claims more items than the rest of the message can hold.
    #[error(
        "{message} message: {field} {count} at byte {offset} is implausible: \
         {count} items of at least {min_item_size} bytes cannot fit in the {remaining} bytes left"
    )]
    ImplausibleCount {
        /// The message type being decoded.
        message: &'static str,
        /// The count field.
        field: &'static str,
        /// The count read.
        count: usize,
        /// The smallest encoding of one item.
        min_item_size: usize,
        /// Bytes left after the count.
        remaining: usize,
        /// Where the count field is.
        offset: usize,
    },

    /// A name or other string field was not valid UTF-8.
    #[error("{message} message: {field} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// The message type being decoded.
        message: &'static str,
        /// The string field.
        field: &'static str,
        /// Where the string starts.
        offset: usize,
    },

    /// A C string ran to the end of the message without its NUL byte.
    #[error("{message} message: {field} at byte {offset} has no NUL terminator")]
    MissingNulTerminator {
        /// The message type being decoded.
        message: &'static str,
        /// The string field.
        field: &'static str,
        /// Where the string starts.
        offset: usize,
    },

    /// Bytes were left after a complete message.
    #[error("{message} message: {count} unexpected trailing bytes at byte {offset}")]
    TrailingBytes {
        /// The message type decoded.
        message: &'static str,
        /// How many bytes were left.
        count: usize,
        /// Where they start.
        offset: usize,
    },

    /// A flag field had bits the protocol does not define.
    #[error("{message} message: invalid {field} {value:#04x} at byte {offset}")]
    InvalidFlags {
        /// The message type being decoded.
        message: &'static str,
        /// The flag field.
        field: &'static str,
        /// The value read.
        value: u8,
        /// Where the field is.
        offset: usize,
    },

    /// A message that PostgreSQL never sends between Stream Start and
    /// Stream Stop came inside such a block (for example a nested Stream
    /// Start, or a Begin): the stream and the decoder are out of step.
    #[error("{message} message inside a streamed block (after Stream Start, before Stream Stop)")]
    UnexpectedInStream {
        /// The message type.
        message: &'static str,
    },

    /// A Stream Stop came outside a streamed block.
    #[error("{message} message outside a streamed block (no Stream Start before it)")]
    UnexpectedOutsideStream {
        /// The message type.
        message: &'static str,
    },
}

/// The byte as a character for messages, when it is printable ASCII.
fn printable(b: u8) -> char {
    if b.is_ascii_graphic() {
        b as char
    } else {
        '?'
    }
}
