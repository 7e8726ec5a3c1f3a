//! bytea payloads: PostgreSQL prints a bytea as text in its `hex` format
//! (`\x4142`, the default) or, with `bytea_output = escape`, in its escape
//! format (`AB`, `\\` for a backslash, `\101` octal). Both the replication
//! stream and `::text` reads use that text; the payload sent to Kafka is the
//! bytes it stands for.

use bytes::Bytes;

/// The bytes `text` stands for, or `None` when it is not bytea text.
pub fn decode(text: &[u8]) -> Option<Bytes> {
    if let Some(hex) = text.strip_prefix(b"\\x") {
        if hex.len() % 2 != 0 {
            return None;
        }
        return hex
            .chunks(2)
            .map(|pair| {
                let digit = |b: u8| (b as char).to_digit(16);
                Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
            })
            .collect::<Option<Vec<u8>>>()
            .map(Bytes::from);
    }
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] != b'\\' {
            out.push(text[i]);
            i += 1;
            continue;
        }
        match text.get(i + 1..i + 4) {
            Some([b'\\', ..]) => {
                out.push(b'\\');
                i += 2;
            }
            Some(oct) if oct.iter().all(|b| (b'0'..=b'7').contains(b)) => {
                let v = oct.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(v).ok()?);
                i += 4;
            }
            _ if text.get(i + 1) == Some(&b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            _ => return None,
        }
    }
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_escape_formats_decode_to_the_same_bytes() {
        assert_eq!(decode(b"\\x7b2261223a317d").unwrap(), &b"{\"a\":1}"[..]);
        assert_eq!(decode(b"\\x").unwrap(), &b""[..]);
        assert_eq!(decode(b"a\\\\b\\001").unwrap(), &b"a\\b\x01"[..]);
        assert_eq!(decode(b"x\\\\").unwrap(), &b"x\\"[..]);
    }

    #[test]
    fn text_that_is_not_bytea_is_refused() {
        assert_eq!(decode(b"\\x7"), None);
        assert_eq!(decode(b"\\xzz"), None);
        assert_eq!(decode(b"a\\q"), None);
        assert_eq!(decode(b"\\777"), None, "octal above 255");
    }
}
