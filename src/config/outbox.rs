//! The `[outbox]` section: the outbox table, the seed's processing settings
//! and the names the status audit derives from the table's.

use serde::Deserialize;

use super::{range, validate_identifier, ColumnMap, ColumnsConfig, ConfigError};

/// The outbox table and the seed's processing settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Schema of the outbox table (env `OUTBOX_SCHEMA`).
    pub schema: String,
    /// Name of the outbox table (env `OUTBOX_TABLE`).
    pub table: String,
    /// Rows claimed per batch in poll mode (env `OUTBOX_BATCH_SIZE`).
    pub batch_size: u32,
    /// Lease length for claimed rows in poll mode (env `OUTBOX_LEASE_SECONDS`).
    pub lease_seconds: u32,
    /// Poll interval in poll mode (env `OUTBOX_POLL_INTERVAL_MS`).
    pub poll_interval_ms: u64,
    /// Default attempts before a row is dead-lettered (env `OUTBOX_MAX_RETRIES`).
    pub max_retries: u32,
    /// Mark delivered rows `COMPLETED` (env `OUTBOX_MARK_COMPLETED`).
    pub mark_completed: bool,
    /// Record every status change in `<table>_status_audit` (the seed's
    /// `ENABLE_AUDIT`; env `ENABLE_AUDIT`, `migrate --audit` /
    /// `--no-audit`), applied by `pgoutbox migrate`: `true` installs the
    /// trigger, `false` drops it (the table is kept), unset leaves it as it
    /// is. See docs/audit.md.
    pub audit: Option<bool>,
    /// Which column plays which role (`[outbox.columns]`), for tables of
    /// another shape.
    pub columns: ColumnsConfig,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            schema: "public".into(),
            table: "outbox".into(),
            batch_size: 100,
            lease_seconds: 30,
            poll_interval_ms: 1000,
            max_retries: 5,
            mark_completed: true,
            audit: None,
            columns: ColumnsConfig::default(),
        }
    }
}

/// The suffix of the audit trigger function's name, `<table>_status_audit_fn`:
/// the longest name derived from `outbox.table`.
pub const AUDIT_FUNCTION_SUFFIX: &str = "_status_audit_fn";

/// Checks that the names the audit derives from `table` fit PostgreSQL's 63
/// bytes (PostgreSQL would silently truncate them).
pub fn check_audit_names(table: &str) -> Result<(), ConfigError> {
    let max = 63 - AUDIT_FUNCTION_SUFFIX.len();
    if table.len() > max {
        return Err(ConfigError::new(
            "outbox.audit",
            format!(
                "the audit needs the table name to be at most {max} bytes (it names <table>{AUDIT_FUNCTION_SUFFIX}); {table:?} has {}",
                table.len()
            ),
        ));
    }
    Ok(())
}

impl OutboxConfig {
    /// Checks the names that end up in SQL: schema, table and, with the
    /// audit on, the names derived from the table's.
    pub(super) fn validate_names(&self) -> Result<(), ConfigError> {
        validate_identifier("outbox.schema", &self.schema)?;
        validate_identifier("outbox.table", &self.table)?;
        if self.audit == Some(true) {
            check_audit_names(&self.table)?;
        }
        self.columns.resolve()?;
        Ok(())
    }

    /// The roles of the table's columns (`[outbox.columns]`, resolved).
    /// Only fails for a configuration that did not pass validation.
    pub fn column_map(&self) -> Result<ColumnMap, ConfigError> {
        self.columns.resolve()
    }

    /// Checks the numeric settings.
    pub(super) fn validate_limits(&self) -> Result<(), ConfigError> {
        range("outbox.batch_size", self.batch_size as u64, 1, 100_000)?;
        range("outbox.lease_seconds", self.lease_seconds as u64, 1, 86_400)?;
        range(
            "outbox.poll_interval_ms",
            self.poll_interval_ms,
            1,
            3_600_000,
        )?;
        range("outbox.max_retries", self.max_retries as u64, 1, 1_000_000)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::valid;
    use super::*;

    #[test]
    fn out_of_range_values_name_field_and_range() {
        let mut c = valid();
        c.outbox.batch_size = 0;
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "outbox.batch_size");
        assert!(e.problem.contains("1..=100000"));
    }

    #[test]
    fn a_table_name_too_long_for_the_audit_names_is_refused() {
        check_audit_names(&"t".repeat(47)).unwrap();
        let e = check_audit_names(&"t".repeat(48)).unwrap_err();
        assert_eq!(e.field, "outbox.audit");
        assert!(e.problem.contains("at most 47"), "{e}");
    }
}
