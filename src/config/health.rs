//! The `[health]` section: the thresholds from which the relay (its
//! `/health` endpoint, `pgoutbox_health_level`) and `pgoutbox status` call
//! an outbox degraded or unhealthy — how old the oldest pending event is,
//! how far the slot lags behind the server's WAL, and how many events were
//! dead-lettered recently. A threshold of 0 is off.

use serde::Deserialize;

use super::{range, ConfigError};

/// Two levels of one measure: at or above `degraded` the outbox is
/// degraded, at or above `unhealthy` unhealthy; 0 turns a level off.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Levels {
    /// From this value on, degraded (0: never).
    pub degraded: u64,
    /// From this value on, unhealthy (0: never).
    pub unhealthy: u64,
}

impl Levels {
    fn check(&self, key: &str) -> Result<(), ConfigError> {
        if self.degraded > 0 && self.unhealthy > 0 && self.unhealthy < self.degraded {
            return Err(ConfigError::new(
                key,
                format!(
                    "unhealthy = {} is below degraded = {}; the unhealthy level must be the higher one (or 0 for off)",
                    self.unhealthy, self.degraded
                ),
            ));
        }
        Ok(())
    }
}

/// Health thresholds (docs/observability.md, "Health").
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Age of the oldest `PENDING` row, seconds (env
    /// `OUTBOX_HEALTH_OLDEST_PENDING_S` = `degraded,unhealthy`).
    pub oldest_pending_s: Levels,
    /// The slot's lag: the server's WAL end minus what the relay confirmed,
    /// bytes (CDC; env `OUTBOX_HEALTH_SLOT_LAG_BYTES`).
    pub slot_lag_bytes: Levels,
    /// Rows dead-lettered within the last `dead_letter_window_s` (env
    /// `OUTBOX_HEALTH_DEAD_LETTERS`).
    pub dead_letters: Levels,
    /// The window `dead_letters` counts in, seconds (env
    /// `OUTBOX_HEALTH_DEAD_LETTER_WINDOW_S`).
    pub dead_letter_window_s: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            // A relay delivers in milliseconds: five minutes means it is not
            // delivering; half an hour is an outage consumers feel.
            oldest_pending_s: Levels {
                degraded: 300,
                unhealthy: 1800,
            },
            // 1 GiB behind: minutes of a busy database's WAL; 16 GiB: the
            // disk is at risk on most installations (compare
            // max_slot_wal_keep_size and metrics.slot_wal_warn_bytes).
            slot_lag_bytes: Levels {
                degraded: 1 << 30,
                unhealthy: 16 << 30,
            },
            // Any dead letter wants a look (docs/dead-letters.md); a hundred
            // in the window is a systematic failure (a topic refused, a
            // payload shape the format cannot place).
            dead_letters: Levels {
                degraded: 1,
                unhealthy: 100,
            },
            dead_letter_window_s: 3600,
        }
    }
}

impl HealthConfig {
    /// Checks every field.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.oldest_pending_s.check("health.oldest_pending_s")?;
        self.slot_lag_bytes.check("health.slot_lag_bytes")?;
        self.dead_letters.check("health.dead_letters")?;
        range(
            "health.dead_letter_window_s",
            self.dead_letter_window_s,
            1,
            30 * 86_400,
        )?;
        Ok(())
    }
}

/// `degraded,unhealthy` (an environment variable's form of [`Levels`]).
pub(super) fn parse_levels(name: &str, value: &str) -> Result<Levels, ConfigError> {
    let bad = || {
        ConfigError::new(
            name,
            format!("{value:?} is not \"degraded,unhealthy\" (two whole numbers, 0 for off, e.g. \"300,1800\")"),
        )
    };
    let (d, u) = value.split_once(',').ok_or_else(bad)?;
    Ok(Levels {
        degraded: d.trim().parse().map_err(|_| bad())?,
        unhealthy: u.trim().parse().map_err(|_| bad())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_levels_must_rise() {
        assert!(HealthConfig::default().validate().is_ok());
        let mut c = HealthConfig {
            oldest_pending_s: Levels {
                degraded: 600,
                unhealthy: 60,
            },
            ..HealthConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("health.oldest_pending_s"), "{e}");
        c.oldest_pending_s = Levels {
            degraded: 600,
            unhealthy: 0,
        };
        assert!(c.validate().is_ok(), "0 is off, whatever the other level");
        c.dead_letter_window_s = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn an_environment_pair_is_two_numbers() {
        let l = parse_levels("OUTBOX_HEALTH_OLDEST_PENDING_S", " 60 , 0 ").unwrap();
        assert_eq!(
            l,
            Levels {
                degraded: 60,
                unhealthy: 0
            }
        );
        for bad in ["60", "a,b", "60,", "-1,5"] {
            let e = parse_levels("OUTBOX_HEALTH_OLDEST_PENDING_S", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("OUTBOX_HEALTH_OLDEST_PENDING_S"), "{e}");
        }
    }
}
