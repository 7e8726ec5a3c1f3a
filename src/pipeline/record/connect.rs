//! How Debezium and Kafka Connect render a PostgreSQL column's value, for
//! the `debezium` record format: Debezium maps each column type to a
//! Connect type (text → STRING, int4 → INT32, bool → BOOLEAN, timestamptz →
//! `io.debezium.time.ZonedTimestamp`, a UTC ISO-8601 string, timestamp →
//! `MicroTimestamp`, microseconds), and the converters print those:
//! `StringConverter` with Java's `toString` (a `Struct` as
//! `Struct{name=value,…}`), `JsonConverter` (no schemas) as JSON, and the
//! `SimpleHeaderConverter` as text. pgoutbox reads PostgreSQL's text of the
//! column and prints what they print. Types outside [`Kind`] are refused at
//! start where their rendering matters.

use std::fmt::Write as _;

use bytes::Bytes;

/// A column's Connect rendering, from its PostgreSQL type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Kind {
    /// Strings: text, varchar, char, uuid, json, jsonb, name.
    #[default]
    Text,
    /// Integers (int2, int4, int8): their digits.
    Integer,
    /// `boolean`: PostgreSQL's `t`/`f` as `true`/`false`.
    Bool,
    /// `timestamptz`: Debezium's `ZonedTimestamp`, ISO-8601 in UTC.
    Zoned,
    /// `timestamp` without time zone: Debezium's `MicroTimestamp`.
    Micros,
}

impl Kind {
    /// The kind of a column of type `sql_type` (`format_type` spelling),
    /// or `None` when pgoutbox does not reproduce its rendering.
    pub(super) fn of(sql_type: &str) -> Option<Kind> {
        let base = sql_type.split('(').next().unwrap_or(sql_type).trim();
        Some(match base {
            "text" | "character varying" | "character" | "uuid" | "json" | "jsonb" | "name" => {
                Kind::Text
            }
            "smallint" | "integer" | "bigint" => Kind::Integer,
            "boolean" => Kind::Bool,
            "timestamp with time zone" => Kind::Zoned,
            "timestamp without time zone" => Kind::Micros,
            _ => return None,
        })
    }

    /// The value as Java's `toString` of its Connect value prints it (the
    /// string converter, a `Struct` field, a header).
    pub(super) fn text(self, pg: &[u8]) -> Bytes {
        match self {
            Kind::Text | Kind::Integer => Bytes::copy_from_slice(pg),
            Kind::Bool => Bytes::from_static(if pg == b"t" { b"true" } else { b"false" }),
            Kind::Zoned => match epoch_micros(pg) {
                Some(us) => Bytes::from(zoned(us)),
                None => Bytes::copy_from_slice(pg),
            },
            Kind::Micros => match epoch_micros(pg) {
                Some(us) => Bytes::from(us.to_string()),
                None => Bytes::copy_from_slice(pg),
            },
        }
    }

    /// The value as the JSON converter writes it.
    pub(super) fn json(self, pg: Option<&[u8]>) -> Bytes {
        let Some(pg) = pg else {
            return Bytes::from_static(b"null");
        };
        match self {
            Kind::Text | Kind::Zoned => json_string(&self.text(pg)),
            Kind::Integer | Kind::Bool | Kind::Micros => self.text(pg),
        }
    }
}

/// `text` as a JSON string literal, escaped as Kafka Connect's JSON
/// converter (Jackson) escapes: `\"`, `\\`, the short forms of `\b \t \n
/// \f \r`, other control characters as `\u00XX`, characters beyond the
/// Basic Multilingual Plane as their UTF-16 surrogate pair `\uD83D\uDE80`
/// (upper-case hex), the rest as UTF-8.
pub(super) fn json_string(text: &[u8]) -> Bytes {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in String::from_utf8_lossy(text).chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            '\0'..='\u{1f}' => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c if (c as u32) > 0xFFFF => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    Bytes::from(out)
}

/// Microseconds since the epoch of a PostgreSQL timestamp as it prints it
/// in the ISO date style: `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]]`
/// (no offset: UTC). `None` for anything else (BC dates, infinity).
pub(super) fn epoch_micros(text: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(text).ok()?;
    let (date, rest) = s.split_once(' ')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let offset_at = rest.find(['+', '-']).unwrap_or(rest.len());
    let (time, offset) = rest.split_at(offset_at);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':');
    let (hh, mm, ss): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = format!("{frac:0<6}").parse().ok()?;
    let offset_s = match offset.as_bytes().first() {
        None => 0,
        Some(&sign) => {
            let mut parts = offset[1..].split(':');
            let mut secs = 0i64;
            for unit in [3600, 60, 1] {
                if let Some(p) = parts.next() {
                    secs += p.parse::<i64>().ok()? * unit;
                }
            }
            if sign == b'-' {
                -secs
            } else {
                secs
            }
        }
    };
    let days = days_from_civil(y, m, day);
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss - offset_s;
    Some(secs * 1_000_000 + micros)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of `days` since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// Debezium's `ZonedTimestamp` text of an instant: ISO-8601 in UTC with
/// `Z`, the fraction with as few digits as it needs (Java's
/// `ISO_OFFSET_DATE_TIME`).
fn zoned(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    );
    if frac != 0 {
        let digits = format!("{frac:06}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_read_in_any_offset_and_printed_as_debezium_does() {
        let utc = epoch_micros(b"2026-12-03 00:15:25.1234+00").unwrap();
        assert_eq!(utc, 1_796_256_925_123_400);
        assert_eq!(epoch_micros(b"2026-12-03 05:45:25.1234+05:30"), Some(utc));
        assert_eq!(epoch_micros(b"2026-12-02 16:15:25.1234-08"), Some(utc));
        assert_eq!(
            epoch_micros(b"2026-12-03 00:15:25.1234"),
            Some(utc),
            "no offset: UTC"
        );
        assert_eq!(epoch_micros(b"1969-12-31 23:59:59.5+00"), Some(-500_000));
        assert_eq!(epoch_micros(b"infinity"), None);
        assert_eq!(zoned(utc), "2026-12-03T00:15:25.1234Z");
        assert_eq!(zoned(1_796_256_925_000_000), "2026-12-03T00:15:25Z");
        assert_eq!(zoned(-500_000), "1969-12-31T23:59:59.5Z");
        for days in [-800_000, -1, 0, 59, 60, 10_957, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn kinds_print_as_connect_and_its_converters_do() {
        assert_eq!(Kind::of("character varying(255)"), Some(Kind::Text));
        assert_eq!(Kind::of("integer"), Some(Kind::Integer));
        assert_eq!(Kind::of("numeric(10,2)"), None);
        assert_eq!(&Kind::Bool.text(b"t")[..], b"true");
        assert_eq!(&Kind::Bool.json(Some(b"f"))[..], b"false");
        assert_eq!(&Kind::Integer.json(Some(b"42"))[..], b"42");
        assert_eq!(&Kind::Text.json(Some(b"a\"b"))[..], b"\"a\\\"b\"");
        assert_eq!(&Kind::Text.json(None)[..], b"null");
        assert_eq!(
            &json_string("é 🚀\u{1}".as_bytes())[..],
            "\"é \\uD83D\\uDE80\\u0001\"".as_bytes(),
            "Jackson escapes beyond the BMP as a surrogate pair"
        );
        assert_eq!(
            &Kind::Zoned.json(Some(b"2026-12-03 00:15:25+00"))[..],
            b"\"2026-12-03T00:15:25Z\""
        );
        assert_eq!(
            &Kind::Micros.text(b"1970-01-01 00:00:01.000002")[..],
            b"1000002"
        );
    }
}
