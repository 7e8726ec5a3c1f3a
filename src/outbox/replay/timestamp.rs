//! The instants a replay's time range is given in: RFC 3339 text in,
//! microseconds since the Unix epoch inside (PostgreSQL's resolution),
//! RFC 3339 UTC text out.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

/// One instant, to the microsecond.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    /// Microseconds since 1970-01-01T00:00:00Z (negative before).
    micros: i64,
}

/// Days from 1970-01-01 to `year-month-day` in the proleptic Gregorian
/// calendar (negative before). The month is 1-12, the day 1-31.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    // Years counted from March, so the leap day ends a year.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let m = i64::from(month);
    let day_of_year = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The calendar date `days` after 1970-01-01: (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `n` ASCII digits at the start of `text`, as a number, and the rest.
fn digits(text: &str, n: usize) -> Option<(u32, &str)> {
    let head = text.get(..n)?;
    if !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((head.parse().ok()?, &text[n..]))
}

/// `text` starts with `c`; the rest.
fn expect(text: &str, c: char) -> Option<&str> {
    text.strip_prefix(c)
}

impl Timestamp {
    /// Reads an RFC 3339 date-time (`2026-12-03T10:00:00Z`,
    /// `2026-12-03 10:00:00.5+01:00`) or a full date (`2026-12-03`,
    /// midnight UTC). Digits beyond the microsecond are cut off. The error
    /// says what is wrong, in a few words.
    pub fn parse(text: &str) -> Result<Timestamp, String> {
        let t = text.trim();
        let bad_date = || "expected YYYY-MM-DD".to_owned();
        let (year, rest) = digits(t, 4).ok_or_else(bad_date)?;
        let rest = expect(rest, '-').ok_or_else(bad_date)?;
        let (month, rest) = digits(rest, 2).ok_or_else(bad_date)?;
        let rest = expect(rest, '-').ok_or_else(bad_date)?;
        let (day, rest) = digits(rest, 2).ok_or_else(bad_date)?;
        let year = i64::from(year);
        if !(1..=12).contains(&month) {
            return Err(format!("month {month:02} does not exist"));
        }
        if day == 0 || day > days_in_month(year, month) {
            return Err(format!("{year:04}-{month:02} has no day {day:02}"));
        }
        let days = days_from_civil(year, month, day);
        if rest.is_empty() {
            return Ok(Timestamp {
                micros: days * 86_400_000_000,
            });
        }
        let rest = rest
            .strip_prefix(['T', 't', ' '])
            .ok_or_else(|| "expected 'T' between the date and the time".to_owned())?;
        let bad_time = || "expected the time as HH:MM:SS".to_owned();
        let (hour, rest) = digits(rest, 2).ok_or_else(bad_time)?;
        let rest = expect(rest, ':').ok_or_else(bad_time)?;
        let (minute, rest) = digits(rest, 2).ok_or_else(bad_time)?;
        let rest = expect(rest, ':').ok_or_else(bad_time)?;
        let (second, mut rest) = digits(rest, 2).ok_or_else(bad_time)?;
        if hour > 23 || minute > 59 || second > 59 {
            return Err(format!(
                "{hour:02}:{minute:02}:{second:02} is not a time of day"
            ));
        }
        let mut fraction_micros = 0i64;
        if let Some(after_dot) = rest.strip_prefix('.') {
            let n = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            if n == 0 {
                return Err("expected digits after '.'".to_owned());
            }
            let kept: String = after_dot[..n].chars().take(6).collect();
            fraction_micros = kept.parse::<i64>().unwrap_or(0) * 10i64.pow(6 - kept.len() as u32);
            rest = &after_dot[n..];
        }
        let offset_seconds = match rest {
            "Z" | "z" => 0,
            "" => {
                return Err("no time zone: end with Z (UTC) or an offset such as +01:00".to_owned())
            }
            _ => {
                let bad_offset = || format!("{rest:?} is not a time zone (Z or ±HH:MM)");
                let (sign, r) = match rest.as_bytes()[0] {
                    b'+' => (1, &rest[1..]),
                    b'-' => (-1, &rest[1..]),
                    _ => return Err(bad_offset()),
                };
                let (oh, r) = digits(r, 2).ok_or_else(bad_offset)?;
                let r = expect(r, ':').ok_or_else(bad_offset)?;
                let (om, r) = digits(r, 2).ok_or_else(bad_offset)?;
                if !r.is_empty() || oh > 23 || om > 59 {
                    return Err(bad_offset());
                }
                sign * i64::from(oh * 3600 + om * 60)
            }
        };
        let seconds =
            days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_seconds;
        Ok(Timestamp {
            micros: seconds * 1_000_000 + fraction_micros,
        })
    }

    /// The instant as a `SystemTime` (what `timestamptz` parameters take).
    pub fn to_system_time(self) -> SystemTime {
        let magnitude = Duration::from_micros(self.micros.unsigned_abs());
        if self.micros >= 0 {
            UNIX_EPOCH + magnitude
        } else {
            UNIX_EPOCH - magnitude
        }
    }

    /// The instant of a `SystemTime`, to the microsecond (cut, not rounded).
    pub fn from_system_time(at: SystemTime) -> Timestamp {
        let micros = match at.duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX),
        };
        Timestamp { micros }
    }
}

/// RFC 3339 in UTC with microseconds: `2026-12-03T10:00:00.000000Z`.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.micros.div_euclid(86_400_000_000);
        let of_day = self.micros.rem_euclid(86_400_000_000);
        let (year, month, day) = civil_from_days(days);
        let seconds = of_day / 1_000_000;
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
            seconds / 3600,
            seconds / 60 % 60,
            seconds % 60,
            of_day % 1_000_000
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> String {
        Timestamp::parse(text).unwrap().to_string()
    }

    #[test]
    fn rfc3339_times_and_dates_read_as_utc_instants() {
        assert_eq!(at("1970-01-01T00:00:00Z"), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            at("2026-12-03T10:20:30.123456789Z"),
            "2026-12-03T10:20:30.123456Z"
        );
        assert_eq!(at("2026-12-03 10:20:30.5z"), "2026-12-03T10:20:30.500000Z");
        assert_eq!(
            at("2026-12-03T01:00:00+02:30"),
            "2026-12-02T22:30:00.000000Z"
        );
        assert_eq!(
            at("2026-12-31T23:00:00-01:00"),
            "2027-01-01T00:00:00.000000Z"
        );
        assert_eq!(at("2024-02-29"), "2024-02-29T00:00:00.000000Z");
        assert_eq!(at("1969-12-31T23:59:59Z"), "1969-12-31T23:59:59.000000Z");
        assert_eq!(at("2000-03-01"), "2000-03-01T00:00:00.000000Z");
    }

    #[test]
    fn the_epoch_arithmetic_matches_the_system_clock() {
        let t = Timestamp::parse("2026-12-03T10:20:30.25Z").unwrap();
        let secs = t
            .to_system_time()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert_eq!(secs, 1_796_293_230.25);
        assert_eq!(Timestamp::from_system_time(t.to_system_time()), t);
        let before = Timestamp::parse("1960-06-01T12:00:00Z").unwrap();
        assert_eq!(Timestamp::from_system_time(before.to_system_time()), before);
        assert!(before < t);
        // Every day of four centuries round-trips through the calendar.
        for days in -80_000..80_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn malformed_times_say_what_is_wrong() {
        for (text, why) in [
            ("yesterday", "YYYY-MM-DD"),
            ("2026-13-01", "month 13"),
            ("2025-02-29", "no day 29"),
            ("2026-12-03T10:00:00", "no time zone"),
            ("2026-12-03T25:00:00Z", "not a time of day"),
            ("2026-12-03T10:00Z", "HH:MM:SS"),
            ("2026-12-03T10:00:00.Z", "digits after"),
            ("2026-12-03T10:00:00+0100", "not a time zone"),
            ("2026-12-03X10:00:00Z", "'T'"),
            ("", "YYYY-MM-DD"),
            ("2026-12-03T10:00:00Zjunk", "not a time zone"),
        ] {
            let e = Timestamp::parse(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }
}
