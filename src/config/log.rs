//! The `[log]` section: the `tracing` filter and the output format.

use serde::Deserialize;

use super::ConfigError;

/// Logging.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `pgoutbox=debug` (env `RUST_LOG` wins).
    pub filter: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".into(),
            format: "text".into(),
        }
    }
}

impl LogConfig {
    /// Checks every field.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        match self.format.as_str() {
            "text" | "json" => Ok(()),
            other => Err(ConfigError::new(
                "log.format",
                format!("{other:?} is not text or json"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_is_text_or_json() {
        let mut l = LogConfig::default();
        l.validate().unwrap();
        l.format = "json".into();
        l.validate().unwrap();
        l.format = "JSON".into();
        assert_eq!(
            l.validate().unwrap_err().to_string(),
            "config: log.format: \"JSON\" is not text or json"
        );
    }
}
