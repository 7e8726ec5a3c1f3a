//! The `[metrics]` section: where the metrics and health endpoint listens,
//! how often the sampler queries PostgreSQL, and when the replication slot's
//! retained WAL is worth a warning.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{range, ConfigError};

/// The default listen address: loopback only, Prometheus' exporter port
/// range.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9187";

/// Metrics, health endpoints and the sampler.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `ip:port` of the HTTP endpoint serving `/metrics`, `/healthz` and
    /// `/readyz`; `off` (or empty) disables it (env
    /// `OUTBOX_METRICS_LISTEN`).
    pub listen: String,
    /// Seconds between two runs of the sampler's queries (slot retention,
    /// row counts by status, oldest pending row).
    pub sample_interval_s: u64,
    /// Warn when the slot retains more than this share of
    /// `max_slot_wal_keep_size` (0 < ratio <= 1).
    pub slot_wal_warn_ratio: f64,
    /// Warn when the slot retains more than this many bytes of WAL, used
    /// when `max_slot_wal_keep_size` is -1 (unlimited).
    pub slot_wal_warn_bytes: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_LISTEN.into(),
            sample_interval_s: 15,
            slot_wal_warn_ratio: 0.8,
            slot_wal_warn_bytes: 10 << 30,
        }
    }
}

impl MetricsConfig {
    /// The address to listen on, or `None` when the endpoint is off.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let text = self.listen.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            ConfigError::new(
                "metrics.listen",
                format!(
                    "{text:?} is not ip:port (e.g. \"127.0.0.1:9187\", \"0.0.0.0:9187\", \"[::]:9187\") or \"off\""
                ),
            )
        })
    }

    /// Checks every field.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        range("metrics.sample_interval_s", self.sample_interval_s, 1, 3600)?;
        let ratio = self.slot_wal_warn_ratio;
        if !(ratio > 0.0 && ratio <= 1.0) {
            return Err(ConfigError::new(
                "metrics.slot_wal_warn_ratio",
                format!("{ratio} is out of range; allowed above 0 and at most 1"),
            ));
        }
        range(
            "metrics.slot_wal_warn_bytes",
            self.slot_wal_warn_bytes,
            1,
            1 << 60,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_is_an_address_or_off() {
        let mut m = MetricsConfig::default();
        assert_eq!(
            m.listen_addr().unwrap(),
            Some("127.0.0.1:9187".parse().unwrap())
        );
        for off in ["off", "OFF", "", "  "] {
            m.listen = off.into();
            assert_eq!(m.listen_addr().unwrap(), None, "{off:?}");
        }
        m.listen = "[::]:9000".into();
        assert!(m.listen_addr().unwrap().is_some());
        m.listen = "localhost:9187".into();
        let e = m.validate().unwrap_err();
        assert_eq!(e.field, "metrics.listen");
        assert!(e.problem.contains("\"off\""), "{e}");
    }

    #[test]
    fn ratio_and_interval_are_checked() {
        let mut m = MetricsConfig::default();
        m.validate().unwrap();
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            m.slot_wal_warn_ratio = bad;
            assert_eq!(
                m.validate().unwrap_err().field,
                "metrics.slot_wal_warn_ratio"
            );
        }
        m.slot_wal_warn_ratio = 1.0;
        m.sample_interval_s = 0;
        assert_eq!(m.validate().unwrap_err().field, "metrics.sample_interval_s");
        m.sample_interval_s = 1;
        m.slot_wal_warn_bytes = 0;
        assert_eq!(
            m.validate().unwrap_err().field,
            "metrics.slot_wal_warn_bytes"
        );
    }
}
