//! `pgoutbox replay`'s side of the outbox table: which rows a replay
//! re-publishes, reading them without disturbing anyone, and the audit
//! trail (`<schema>.pgoutbox_replays`). Publishing them is the operator
//! tool's part (`crate::operate::replay`).
//!
//! A replay never changes an outbox row: no `UPDATE`, no lock (`FOR
//! UPDATE`), so a CDC relay sees nothing in the WAL and a poller claims
//! nothing. Rows are read through the table's column roles (`[outbox.columns]`,
//! ARCHITECTURE.md invariant 12) and the row-state columns `id`,
//! `created_at` and `status`:
//!
//! - the selection's keys `(created_at, id)`, in that order, by keyset
//!   pagination in chunks ([`KEY_CHUNK`]): each chunk is one short
//!   read-only statement (no `OFFSET`, no snapshot kept between chunks);
//! - the rows themselves in pages of those keys, by primary key, again
//!   checked to still have the selected status.
//!
//! Without `--to`, the range ends when the replay starts: rows created
//! later are not replayed.

mod audit;
mod rows;
mod selection;
mod timestamp;

pub use audit::{begin_audit, finish_audit, AuditStart, ReplayAudit, ReplayEnd, AUDIT_TABLE};
pub use rows::{Pages, ReplayKey, ReplayRow, ReplaySource, KEY_CHUNK};
pub use selection::{parse_time, ReplaySelection, ReplayStatus};
pub use timestamp::Timestamp;

use crate::config::Role;
use crate::error::postgres_text;

/// Why a replay was refused or failed. Messages are one line and say what
/// to do.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// `--reason` missing, empty or blank.
    #[error(
        "refusing a blind replay: pass --reason \"<why>\" saying why these events are published again (it is recorded in the audit table)"
    )]
    MissingReason,
    /// `--from` / `--to` is not RFC 3339.
    #[error(
        "{flag} {text:?} is not an RFC 3339 time ({why}); e.g. 2026-12-03T10:00:00Z, 2026-12-03T11:00:00+01:00 or 2026-12-03 (midnight UTC)"
    )]
    BadTime {
        /// `--from` or `--to`.
        flag: &'static str,
        /// What was given.
        text: String,
        /// What is wrong with it.
        why: String,
    },
    /// `--from` is not before `--to`.
    #[error(
        "--from {from} is not before --to {to}: the range selects created_at >= --from and < --to, which is empty; swap or widen them"
    )]
    EmptyRange {
        /// `--from`.
        from: Timestamp,
        /// `--to`.
        to: Timestamp,
    },
    /// `--status` is neither `completed` nor `dead-letter`.
    #[error("--status {0:?} is not a status a replay reads: use completed or dead-letter")]
    BadStatus(String),
    /// A filter given an empty value.
    #[error("{0} must not be empty")]
    EmptyFilter(&'static str),
    /// The `--where` text was refused before running.
    #[error("{0}")]
    UnsafeWhere(String),
    /// An aggregate id that is not a UUID, for a `uuid` column.
    #[error("--aggregate-id {0:?} is not a UUID (the table's aggregate id column is uuid)")]
    BadAggregateId(String),
    /// A filter on a role the table does not map.
    #[error(
        "{flag}: the outbox table has no column for the {} role; map one in [outbox.columns] or drop {flag}", role.key()
    )]
    NoRoleColumn {
        /// The filter.
        flag: &'static str,
        /// Its role.
        role: Role,
    },
    /// `--rate` is not a positive number.
    #[error("--rate must be a number of events per second above 0, not {0}")]
    BadRate(String),
    /// `--max-events` is 0.
    #[error("--max-events must be at least 1")]
    BadMaxEvents,
    /// No such outbox table.
    #[error("there is no outbox table {0}: check outbox.schema and outbox.table (OUTBOX_SCHEMA, OUTBOX_TABLE)")]
    NoTable(String),
    /// The table lacks what a replay reads.
    #[error(
        "{table} cannot be replayed: a replay reads rows in (created_at, id) order and selects them by status, and {gap} (`pgoutbox adopt --add-poll-columns` adds them)"
    )]
    TableLacks {
        /// `schema.table`.
        table: String,
        /// What is missing.
        gap: String,
    },
    /// The selection matched no row.
    #[error(
        "nothing to replay: no {status} row of {table} matches the selection; nothing was sent"
    )]
    NothingSelected {
        /// `COMPLETED` or `DEAD_LETTER`.
        status: &'static str,
        /// `schema.table`.
        table: String,
    },
    /// The selection is larger than `--max-events`.
    #[error(
        "the selection holds {selected} events, more than --max-events {max}: narrow it (--from/--to, --aggregate-type, --event-type, --where) or pass --max-events {selected}; nothing was sent"
    )]
    TooMany {
        /// Events selected.
        selected: i64,
        /// The limit.
        max: u64,
    },
    /// The audit table is missing.
    #[error(
        "{0} does not exist: run `pgoutbox migrate` (migration 12), or `pgoutbox adopt` for a table pgoutbox did not create: either makes the replay audit table; nothing was sent"
    )]
    NoAuditTable(String),
    /// PostgreSQL refused or failed; `context` says what was being done.
    #[error("{context}: {}", postgres_text(.source))]
    Database {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
}

fn db(context: &str) -> impl FnOnce(tokio_postgres::Error) -> ReplayError + '_ {
    move |source| ReplayError::Database {
        context: context.to_owned(),
        source,
    }
}

/// Checks a replay's reason: present and not blank. Returns it trimmed.
pub fn check_reason(reason: Option<&str>) -> Result<String, ReplayError> {
    match reason.map(str::trim) {
        Some(r) if !r.is_empty() => Ok(r.to_owned()),
        _ => Err(ReplayError::MissingReason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_reasons_are_refused() {
        for r in [None, Some(""), Some(" \n\t")] {
            let e = check_reason(r).unwrap_err().to_string();
            assert!(e.contains("--reason") && !e.contains('\n'), "{e}");
        }
        assert_eq!(check_reason(Some(" INC-7 ")).unwrap(), "INC-7");
    }
}
