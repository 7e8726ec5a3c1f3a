//! The outbox's condition: healthy, degraded or unhealthy, judged from a
//! few measures against the `[health]` thresholds.
//!
//! Readiness (`/readyz`, [`mod@super::health`]) says whether this relay is
//! connected and delivering; the condition says whether the *outbox* is in
//! good shape — events waiting too long, the slot too far behind, events
//! being dead-lettered. One can hold without the other: a relay may be
//! ready while a dead-letter storm degrades the outbox, and a standby is
//! unready while the outbox is fine. The relay's sampler judges the
//! condition at every sample (`/health`, `pgoutbox_health_level`);
//! `pgoutbox status` judges it from the same measures read once.

use std::fmt;
use std::sync::Mutex;

use serde::Serialize;

use crate::config::{HealthConfig, Levels};

/// How bad.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Every measure below its thresholds.
    Healthy,
    /// A measure at or above its `degraded` threshold.
    Degraded,
    /// A measure at or above its `unhealthy` threshold.
    Unhealthy,
}

impl Level {
    /// `healthy`, `degraded` or `unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Healthy => "healthy",
            Level::Degraded => "degraded",
            Level::Unhealthy => "unhealthy",
        }
    }

    /// The value of `pgoutbox_health_level`: 0, 1 or 2.
    pub fn gauge(self) -> i64 {
        self as i64
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The measures judged; `None` when not known (no slot in poll mode, a
/// table without statuses, a failed query).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measures {
    /// Age of the oldest `PENDING` row, seconds (0 when none).
    pub oldest_pending_s: Option<f64>,
    /// The server's WAL end minus the slot's confirmed position, bytes.
    pub slot_lag_bytes: Option<i64>,
    /// Rows dead-lettered within the window.
    pub recent_dead_letters: Option<i64>,
}

/// The measures the condition is judged on.
pub const CHECKS: [&str; 3] = ["oldest_pending", "slot_lag", "dead_letters"];

/// One measure at or above a threshold.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    /// One of [`CHECKS`].
    pub check: &'static str,
    /// How bad.
    pub level: Level,
    /// One line: the measure and the threshold it reached.
    pub text: String,
}

/// The verdict: the worst level found and every finding.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Condition {
    /// The worst level of the findings (healthy without any).
    pub level: Level,
    /// The measures at or above a threshold.
    pub findings: Vec<Finding>,
}

impl Condition {
    /// The level of one check (healthy when it has no finding).
    pub fn level_of(&self, check: &str) -> Level {
        self.findings
            .iter()
            .filter(|f| f.check == check)
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Healthy)
    }
}

impl fmt::Display for Condition {
    /// `healthy`, or `degraded: <finding>; <finding>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.level.as_str())?;
        for (i, finding) in self.findings.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            f.write_str(&finding.text)?;
        }
        Ok(())
    }
}

fn level(value: f64, levels: &Levels) -> Option<(Level, u64)> {
    let reached = |t: u64| t > 0 && value >= t as f64;
    if reached(levels.unhealthy) {
        Some((Level::Unhealthy, levels.unhealthy))
    } else if reached(levels.degraded) {
        Some((Level::Degraded, levels.degraded))
    } else {
        None
    }
}

/// Judges `m` against `t`.
pub fn judge(t: &HealthConfig, m: &Measures) -> Condition {
    let mut findings = Vec::new();
    if let Some(age) = m.oldest_pending_s {
        if let Some((lvl, at)) = level(age, &t.oldest_pending_s) {
            findings.push(Finding {
                check: "oldest_pending",
                level: lvl,
                text: format!(
                    "the oldest pending event is {} s old ({lvl} from {at} s, health.oldest_pending_s)",
                    age.round() as u64
                ),
            });
        }
    }
    if let Some(lag) = m.slot_lag_bytes {
        if let Some((lvl, at)) = level(lag as f64, &t.slot_lag_bytes) {
            findings.push(Finding {
                check: "slot_lag",
                level: lvl,
                text: format!(
                    "the slot lags {lag} bytes behind the server's WAL ({lvl} from {at}, health.slot_lag_bytes)"
                ),
            });
        }
    }
    if let Some(n) = m.recent_dead_letters {
        if let Some((lvl, at)) = level(n as f64, &t.dead_letters) {
            findings.push(Finding {
                check: "dead_letters",
                level: lvl,
                text: format!(
                    "{n} events dead-lettered in the last {} s ({lvl} from {at}, health.dead_letters; pgoutbox dle list)",
                    t.dead_letter_window_s
                ),
            });
        }
    }
    Condition {
        level: findings
            .iter()
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Healthy),
        findings,
    }
}

static LATEST: Mutex<Option<Condition>> = Mutex::new(None);

/// Records the sampler's latest verdict (for `/health`).
pub fn record(condition: Condition) {
    *LATEST.lock().unwrap_or_else(|p| p.into_inner()) = Some(condition);
}

/// The sampler's latest verdict; `None` before the first sample.
pub fn latest() -> Option<Condition> {
    LATEST.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measures(age: f64, lag: i64, dead: i64) -> Measures {
        Measures {
            oldest_pending_s: Some(age),
            slot_lag_bytes: Some(lag),
            recent_dead_letters: Some(dead),
        }
    }

    #[test]
    fn each_measure_is_judged_against_its_two_levels() {
        let t = HealthConfig::default();
        let c = judge(&t, &measures(0.0, 0, 0));
        assert_eq!(c.level, Level::Healthy);
        assert_eq!(c.to_string(), "healthy");
        let c = judge(&t, &measures(300.0, 0, 0));
        assert_eq!(c.level, Level::Degraded, "{c}");
        assert_eq!(c.level_of("oldest_pending"), Level::Degraded);
        assert_eq!(c.level_of("slot_lag"), Level::Healthy);
        assert!(c
            .to_string()
            .starts_with("degraded: the oldest pending event is 300 s old"));
        let c = judge(&t, &measures(299.4, 16 << 30, 1));
        assert_eq!(c.level, Level::Unhealthy, "{c}");
        assert_eq!(c.level_of("oldest_pending"), Level::Healthy);
        assert_eq!(c.level_of("slot_lag"), Level::Unhealthy);
        assert_eq!(c.level_of("dead_letters"), Level::Degraded);
        assert_eq!(c.findings.len(), 2);
        assert!(
            c.to_string()
                .contains("; 1 events dead-lettered in the last 3600 s"),
            "{c}"
        );
    }

    #[test]
    fn zero_turns_a_level_off_and_unknown_measures_are_not_judged() {
        let t = HealthConfig {
            dead_letters: Levels {
                degraded: 0,
                unhealthy: 10,
            },
            ..HealthConfig::default()
        };
        assert_eq!(judge(&t, &measures(0.0, 0, 9)).level, Level::Healthy);
        assert_eq!(judge(&t, &measures(0.0, 0, 10)).level, Level::Unhealthy);
        let unknown = Measures::default();
        assert_eq!(judge(&t, &unknown).level, Level::Healthy);
        assert_eq!(Level::Unhealthy.gauge(), 2);
    }
}
