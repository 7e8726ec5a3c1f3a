//! The `[partitions]` section: how the outbox's partitions are laid out
//! ahead of time and when old ones are retired (see docs/partitioning.md).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{range, ConfigError};

/// The length of one partition's range.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PartitionInterval {
    /// `<table>_YYYY_MM`, one calendar month (UTC): the layout `migrate`
    /// creates.
    #[default]
    Monthly,
    /// `<table>_YYYY_MM_DD`, one day (UTC): smaller partitions for busy
    /// tables, so each one is retired (and archived) sooner and faster.
    Daily,
}

impl PartitionInterval {
    /// The name used in the config and passed to the SQL functions.
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionInterval::Monthly => "monthly",
            PartitionInterval::Daily => "daily",
        }
    }

    /// The largest `ahead` the SQL function accepts for this interval.
    pub fn max_ahead(self) -> u32 {
        match self {
            PartitionInterval::Monthly => 24,
            PartitionInterval::Daily => 366,
        }
    }
}

impl fmt::Display for PartitionInterval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Partition lifecycle settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PartitionsConfig {
    /// `monthly` (default) or `daily`. Switching never overlaps existing
    /// ranges: new partitions start where the last existing one ends.
    pub interval: PartitionInterval,
    /// Partitions kept ready after the current one (months or days).
    pub ahead: u32,
    /// Retire partitions whose whole range is older than this (`90d`,
    /// `12w`, …; at least one day); unset: never (the default).
    pub retain: Option<String>,
    /// Seconds between two create-ahead runs in the relay (through the
    /// SECURITY DEFINER function, as the relay's role); 0 turns it off.
    pub maintain_interval_s: u64,
}

impl Default for PartitionsConfig {
    fn default() -> Self {
        PartitionsConfig {
            interval: PartitionInterval::Monthly,
            ahead: 2,
            retain: None,
            maintain_interval_s: 3600,
        }
    }
}

impl PartitionsConfig {
    /// The retention period, or `None` when retention is off.
    pub fn retain(&self) -> Result<Option<Duration>, ConfigError> {
        let Some(text) = self.retain.as_deref().map(str::trim) else {
            return Ok(None);
        };
        if text.is_empty() || text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let d =
            super::parse_duration(text).map_err(|e| ConfigError::new("partitions.retain", e))?;
        if d < Duration::from_secs(86_400) {
            return Err(ConfigError::new(
                "partitions.retain",
                format!("{text:?} is less than a day; retention keeps at least 1d (e.g. \"90d\")"),
            ));
        }
        Ok(Some(d))
    }

    /// The background create-ahead period, or `None` when off.
    pub fn maintain_interval(&self) -> Option<Duration> {
        (self.maintain_interval_s > 0).then(|| Duration::from_secs(self.maintain_interval_s))
    }

    /// Checks every field.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        range(
            "partitions.ahead",
            self.ahead as u64,
            1,
            self.interval.max_ahead() as u64,
        )?;
        self.retain()?;
        range(
            "partitions.maintain_interval_s",
            self.maintain_interval_s,
            0,
            86_400,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_monthly_two_ahead_no_retention_hourly_task() {
        let c = PartitionsConfig::default();
        c.validate().unwrap();
        assert_eq!(c.interval, PartitionInterval::Monthly);
        assert_eq!(c.retain().unwrap(), None);
        assert_eq!(c.maintain_interval(), Some(Duration::from_secs(3600)));
    }

    #[test]
    fn retain_is_a_duration_of_at_least_a_day() {
        let mut c = PartitionsConfig {
            retain: Some("90d".into()),
            ..Default::default()
        };
        assert_eq!(c.retain().unwrap(), Some(Duration::from_secs(90 * 86_400)));
        c.retain = Some("12h".into());
        assert_eq!(c.validate().unwrap_err().field, "partitions.retain");
        c.retain = Some("ninety days".into());
        assert_eq!(c.validate().unwrap_err().field, "partitions.retain");
        c.retain = Some("off".into());
        assert_eq!(c.retain().unwrap(), None);
    }

    #[test]
    fn ahead_is_bounded_by_the_interval() {
        let mut c = PartitionsConfig {
            ahead: 30,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "partitions.ahead");
        c.interval = PartitionInterval::Daily;
        c.validate().unwrap();
        c.ahead = 0;
        assert_eq!(c.validate().unwrap_err().field, "partitions.ahead");
    }
}
