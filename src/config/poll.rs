//! The `[poll]` section: poll mode's workers, ordering, wake-up trigger and
//! retry backoff (the seed's poll settings live in `[outbox]`).

use serde::Deserialize;

use super::{range, ConfigError};

/// Per-aggregate ordering in poll mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PollOrdering {
    /// The seed's behaviour: with more than one worker, or after a retry,
    /// events of one aggregate may be published out of order.
    #[default]
    None,
    /// An event is claimed only when every older event of its aggregate is
    /// `COMPLETED`: order holds across workers, relays and retries, and a
    /// dead-lettered event blocks its aggregate until redriven or skipped.
    Aggregate,
}

/// Poll mode settings beyond the seed's (`outbox.batch_size`,
/// `outbox.lease_seconds`, `outbox.poll_interval_ms`, `outbox.max_retries`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollConfig {
    /// Concurrent workers, each claiming its own batches
    /// (env `OUTBOX_CONCURRENCY`).
    pub concurrency: u32,
    /// `none` (the seed's) or `aggregate` (env `OUTBOX_ORDERING`).
    pub ordering: PollOrdering,
    /// Install the AFTER INSERT trigger that wakes idle pollers through
    /// `LISTEN/NOTIFY` (applied by `pgoutbox migrate`; env `OUTBOX_NOTIFY`).
    /// Each inserting transaction then takes PostgreSQL's notification
    /// queue lock at commit, which serialises those commits.
    pub notify: bool,
    /// First retry delay after a failed send, in milliseconds; doubled per
    /// attempt, with jitter.
    pub backoff_base_ms: u64,
    /// Upper bound of the retry delay, in milliseconds.
    pub backoff_max_ms: u64,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            concurrency: 1,
            ordering: PollOrdering::None,
            notify: false,
            backoff_base_ms: 1000,
            backoff_max_ms: 300_000,
        }
    }
}

impl PollConfig {
    /// Checks every field.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        range("poll.concurrency", self.concurrency as u64, 1, 256)?;
        range("poll.backoff_base_ms", self.backoff_base_ms, 1, 3_600_000)?;
        range(
            "poll.backoff_max_ms",
            self.backoff_max_ms,
            self.backoff_base_ms,
            86_400_000,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_max_may_not_be_below_base() {
        let mut p = PollConfig::default();
        p.validate().unwrap();
        p.backoff_max_ms = p.backoff_base_ms - 1;
        let e = p.validate().unwrap_err();
        assert_eq!(e.field, "poll.backoff_max_ms");
        assert!(e.problem.contains("1000..=86400000"), "{e}");
        p.backoff_max_ms = p.backoff_base_ms;
        p.concurrency = 0;
        assert_eq!(p.validate().unwrap_err().field, "poll.concurrency");
    }
}
