//! PostgreSQL write-ahead-log positions.
//!
//! An [`Lsn`] is a byte position in the WAL. PostgreSQL prints it as two
//! hexadecimal halves, `16/B374D848`. The relay only ever moves the position
//! it confirms forward (see `pipeline::progress`).

use std::fmt;
use std::str::FromStr;

/// A log sequence number: a 64-bit byte position in PostgreSQL's WAL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid position `0/0`, which PostgreSQL reads as "none".
    pub const ZERO: Lsn = Lsn(0);

    /// True for `0/0`.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// A byte position as SQL returns it (`(lsn - '0/0'::pg_lsn)::int8`);
    /// a negative one reads as `0/0`.
    pub fn from_position(position: i64) -> Lsn {
        Lsn(position.max(0) as u64)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not an LSN of the form `XXXXXXXX/XXXXXXXX`.
#[derive(Debug, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal halves like 16/B374D848")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

// As PostgreSQL prints it, e.g. in a progress record (pipeline::exactly_once).
impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn negative_byte_positions_read_as_zero() {
        assert_eq!(super::Lsn::from_position(-5), super::Lsn::ZERO);
        assert_eq!(super::Lsn::from_position(42), super::Lsn(42));
    }

    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for v in [0u64, 1, 0x16_B374_D848, u64::MAX] {
            let l = Lsn(v);
            assert_eq!(l.to_string().parse::<Lsn>().unwrap(), l);
        }
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
    }

    #[test]
    fn parse_rejects_malformed_text() {
        for s in ["", "16", "/1", "1/", "G/1", "123456789/0", "1/2/3"] {
            assert!(s.parse::<Lsn>().is_err(), "{s} should be rejected");
        }
    }
}
