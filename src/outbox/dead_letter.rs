//! Dead-letter governance: listing, inspecting, redriving and skipping the
//! outbox rows in status `DEAD_LETTER` (what `pgoutbox dle` runs).
//!
//! Every query filters on `status = 'DEAD_LETTER'`, so PostgreSQL can use the
//! partial index `<table>_dead_letter_idx` and never scans the live rows.
//!
//! A redrive or a skip needs a reason (no blind redrive) and is recorded in
//! `<schema>.pgoutbox_dead_letter_actions` in the same transaction as the
//! status change:
//! - redrive: `status = 'PENDING', retry_count = 0`, lease and
//!   `processed_at` cleared; `last_error` is kept as history until the next
//!   attempt overwrites it;
//! - skip: `status = 'COMPLETED', processed_at = NULL`,
//!   `last_error = 'skipped by operator: <reason>'` (a `COMPLETED` row without
//!   `processed_at` was never delivered).
//!
//! Rows are chosen by tracking id or by an operator's SQL condition
//! (`--where`). The condition is raw SQL: it is checked for the obvious
//! mistakes (`;`, comments, unbalanced parentheses), evaluated in its own
//! `SELECT … FOR UPDATE` under a statement timeout, and the `UPDATE` that
//! follows names the selected rows by primary key and re-checks
//! `status = 'DEAD_LETTER'`, so no condition can change a row that is not
//! dead-lettered.

mod act;
mod list;
mod show;

use std::fmt;

use serde::Serialize;
use uuid::Uuid;

use crate::config::quote_ident;
use crate::error::postgres_text;

pub use act::{redrive, skip, ActionOutcome, ActionRequest, Selection};
pub use list::{list, DeadLetterSummary, ErrorCount, ListFilter, Listing};
pub use show::{show, DeadLetterRow};

/// The audit table, in the outbox's schema.
pub const AUDIT_TABLE: &str = "pgoutbox_dead_letter_actions";

/// Most rows `list` returns.
pub const MAX_LIST_LIMIT: i64 = 10_000;

/// The outbox table the commands work on. Both names must already be valid
/// identifiers (see [`crate::config::validate_identifier`]).
#[derive(Clone, Debug)]
pub struct OutboxTable {
    /// Schema of the outbox table (also holds the audit table).
    pub schema: String,
    /// The outbox table.
    pub table: String,
    /// The logical message prefix a CDC relay of this table reads events
    /// under (`cdc.message_prefix`), or `None` when it relays no messages.
    /// A redrive announces each row under it, so a CDC relay publishes the
    /// row again (its publication carries inserts only, not the redrive's
    /// update).
    pub announce_prefix: Option<String>,
}

impl OutboxTable {
    /// `"schema"."table"`.
    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    /// `"schema".pgoutbox_dead_letter_actions`.
    fn audit(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), AUDIT_TABLE)
    }
}

impl fmt::Display for OutboxTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// What an operator does to dead-lettered rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Back to `PENDING` with `retry_count = 0`: published again.
    Redrive,
    /// To `COMPLETED` with `processed_at = NULL`: never published, and no
    /// longer blocks its aggregate.
    Skip,
}

impl Action {
    /// The name recorded in the audit table.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Redrive => "redrive",
            Action::Skip => "skip",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a dead-letter command failed. Messages are one line and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// `--reason` missing, empty or blank.
    #[error(
        "refusing a blind {0}: pass --reason \"<root cause>\" saying why these rows failed and what was fixed (it is recorded in the audit table)"
    )]
    MissingReason(Action),
    /// Neither tracking ids nor a condition.
    #[error("nothing selected: pass one or more tracking ids, or --where \"<SQL condition>\"")]
    NoSelection,
    /// The `--where` text was refused before running.
    #[error("--where refused: {0}")]
    UnsafeWhere(String),
    /// `--limit` out of range.
    #[error("--limit must be between 1 and {MAX_LIST_LIMIT}, not {0}")]
    BadLimit(i64),
    /// `show` found no dead-lettered row.
    #[error(
        "no DEAD_LETTER row in {table} has tracking_id {tracking_id} (already redriven or skipped, or never dead-lettered); `pgoutbox dle list` shows the current ones"
    )]
    NotFound {
        /// The outbox table.
        table: String,
        /// The id asked for.
        tracking_id: Uuid,
    },
    /// None of the given tracking ids is dead-lettered.
    #[error(
        "nothing to {action}: no DEAD_LETTER row in {table} has tracking_id {} (already redriven or skipped, or never dead-lettered); nothing was changed", list_ids(.ids)
    )]
    NoneDeadLettered {
        /// What was asked.
        action: Action,
        /// The outbox table.
        table: String,
        /// The ids given.
        ids: Vec<Uuid>,
    },
    /// The condition matched no dead-lettered row.
    #[error(
        "nothing to {action}: no DEAD_LETTER row in {table} matches --where; nothing was changed"
    )]
    NoWhereMatch {
        /// What was asked.
        action: Action,
        /// The outbox table.
        table: String,
    },
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

fn db(context: &str) -> impl FnOnce(tokio_postgres::Error) -> DeadLetterError + '_ {
    move |source| DeadLetterError::Database {
        context: context.to_owned(),
        source,
    }
}

/// At most ten ids, then how many more.
fn list_ids(ids: &[Uuid]) -> String {
    const SHOWN: usize = 10;
    let mut s = ids
        .iter()
        .take(SHOWN)
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > SHOWN {
        s.push_str(&format!(" and {} more", ids.len() - SHOWN));
    }
    s
}

/// `to_char` of a timestamptz column as RFC 3339 UTC (`NULL` stays `NULL`).
fn ts(column: &str) -> String {
    format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
}

/// Checks a reason: present and not blank. Returns it trimmed.
pub fn check_reason(action: Action, reason: Option<&str>) -> Result<String, DeadLetterError> {
    match reason.map(str::trim) {
        Some(r) if !r.is_empty() => Ok(r.to_owned()),
        _ => Err(DeadLetterError::MissingReason(action)),
    }
}

/// Checks an operator's SQL condition for the obvious mistakes: empty, a `;`
/// (one condition, never statements), SQL comments, dollar quoting or
/// parameters, an unterminated quote, unbalanced parentheses. It stays raw
/// SQL: anything else PostgreSQL accepts in a `WHERE` is allowed.
pub fn check_where(condition: &str) -> Result<(), DeadLetterError> {
    let refuse = |why: &str| Err(DeadLetterError::UnsafeWhere(why.to_owned()));
    if condition.trim().is_empty() {
        return refuse(
            "it is empty; pass an SQL condition over the outbox columns, e.g. --where \"event_type = 'OrderShipped'\"",
        );
    }
    if condition.contains(';') {
        return refuse("it contains ';'; pass a single SQL condition, not statements");
    }
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut chars = condition.chars().peekable();
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            if c == q {
                if chars.peek() == Some(&q) {
                    chars.next(); // doubled quote: an escaped one
                } else {
                    quote = None;
                }
            }
            continue;
        }
        match c {
            '\'' | '"' => quote = Some(c),
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return refuse("unbalanced parentheses (a ')' closes nothing)");
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                return refuse("it contains an SQL comment ('--')");
            }
            '/' if chars.peek() == Some(&'*') => {
                return refuse("it contains an SQL comment ('/*')");
            }
            '$' => {
                return refuse(
                    "'$' (dollar quoting or a parameter) is not supported; use '...' literals",
                );
            }
            _ => {}
        }
    }
    if quote.is_some() {
        return refuse("unterminated quoted string or identifier");
    }
    if depth != 0 {
        return refuse("unbalanced parentheses (a '(' is never closed)");
    }
    Ok(())
}

/// One entry of the audit table.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRecord {
    /// Its id.
    pub id: i64,
    /// `redrive` or `skip`.
    pub action: String,
    /// The database role that did it.
    pub performed_by: String,
    /// RFC 3339, UTC.
    pub performed_at: String,
    /// The operator's reason.
    pub reason: String,
    /// Rows changed by that action.
    pub row_count: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_reasons_are_refused() {
        for r in [None, Some(""), Some("  \t\n")] {
            let e = check_reason(Action::Redrive, r).unwrap_err().to_string();
            assert!(e.contains("--reason") && !e.contains('\n'), "{e}");
        }
        assert_eq!(
            check_reason(Action::Skip, Some(" broker ACL fixed ")).unwrap(),
            "broker ACL fixed"
        );
    }

    #[test]
    fn where_conditions() {
        for ok in [
            "event_type = 'OrderCreated'",
            "last_error LIKE '%too large%' AND (aggregate_type = 'Order' OR aggregate_type = 'Cart')",
            "payload->>'note' = 'it''s ; fine? no'",
        ] {
            // The ';' inside a literal is still refused: the check is simple on purpose.
            let r = check_where(ok);
            assert_eq!(r.is_ok(), !ok.contains(';'), "{ok}: {r:?}");
        }
        for bad in [
            "",
            "  ",
            "true; DELETE FROM outbox",
            "true) OR (true",
            "(true",
            "true -- comment",
            "true /* c */",
            "payload::text = $$x$$",
            "event_type = 'unterminated",
            "\"odd",
        ] {
            assert!(check_where(bad).is_err(), "{bad}");
        }
        assert!(check_where("x = '('").is_ok());
        assert!(check_where("\"weird)\" = 1").is_ok());
    }

    #[test]
    fn errors_are_one_line() {
        let e = DeadLetterError::NoneDeadLettered {
            action: Action::Redrive,
            table: "public.outbox".into(),
            ids: (0..12).map(|_| Uuid::new_v4()).collect(),
        }
        .to_string();
        assert!(e.contains("and 2 more") && !e.contains('\n'), "{e}");
    }
}
