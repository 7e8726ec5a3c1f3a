//! The top-level `mode` key: how the relay reads the outbox.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// How the relay reads the outbox.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Logical replication (pgoutput) from a replication slot.
    #[default]
    Cdc,
    /// Claim rows from the table with leases (`FOR UPDATE SKIP LOCKED`).
    Poll,
    /// CDC when the server allows it, poll otherwise (decided at start).
    Auto,
}

impl Mode {
    /// The name used in config, logs and the `--mode` flag.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Cdc => "cdc",
            Mode::Poll => "poll",
            Mode::Auto => "auto",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cdc" => Ok(Mode::Cdc),
            "poll" => Ok(Mode::Poll),
            "auto" => Ok(Mode::Auto),
            other => Err(format!(
                "unknown mode {other:?}; expected \"cdc\", \"poll\" or \"auto\""
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for mode in [Mode::Cdc, Mode::Poll, Mode::Auto] {
            assert_eq!(mode.as_str().parse::<Mode>(), Ok(mode));
            assert_eq!(mode.to_string(), mode.as_str());
        }
        let e = "CDC".parse::<Mode>().unwrap_err();
        assert!(e.contains("\"cdc\", \"poll\" or \"auto\""), "{e}");
    }
}
