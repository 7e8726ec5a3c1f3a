//! Which rows a replay re-publishes, checked before anything connects, and
//! the SQL condition that selects them through the table's column roles.

use std::fmt;
use std::time::SystemTime;

use serde::Serialize;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::timestamp::Timestamp;
use super::ReplayError;
use crate::config::{quote_ident, ColumnMap, Role};
use crate::outbox::dead_letter;

/// The status of the rows a replay reads: events already delivered, or
/// dead-lettered ones. No other status is replayed: a `PENDING` row is
/// still the relay's to deliver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplayStatus {
    /// `COMPLETED`: delivered (or skipped by an operator).
    #[default]
    Completed,
    /// `DEAD_LETTER`: given up on; replayed as they are, their status kept.
    DeadLetter,
}

impl ReplayStatus {
    /// Reads `--status`: `completed` or `dead-letter` (any case, `_` for
    /// `-`, or the row status itself).
    pub fn parse(text: &str) -> Result<ReplayStatus, ReplayError> {
        match text.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "completed" => Ok(ReplayStatus::Completed),
            "dead-letter" => Ok(ReplayStatus::DeadLetter),
            _ => Err(ReplayError::BadStatus(text.to_owned())),
        }
    }

    /// The row status it selects (`COMPLETED`, `DEAD_LETTER`).
    pub fn row_status(self) -> &'static str {
        match self {
            ReplayStatus::Completed => crate::outbox::row_status::COMPLETED,
            ReplayStatus::DeadLetter => crate::outbox::row_status::DEAD_LETTER,
        }
    }
}

impl fmt::Display for ReplayStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplayStatus::Completed => "completed",
            ReplayStatus::DeadLetter => "dead-letter",
        })
    }
}

/// Which rows a replay re-publishes: every condition given must hold
/// (several values of one filter: any of them). Recorded as it is in the
/// replay's audit entry.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplaySelection {
    /// The rows' status.
    pub status: ReplayStatus,
    /// `created_at` at or after this.
    pub from: Option<Timestamp>,
    /// `created_at` before this; without it, before the replay started
    /// (rows created later are not replayed).
    pub to: Option<Timestamp>,
    /// Aggregate types (the aggregate type role's column).
    pub aggregate_types: Vec<String>,
    /// Aggregate ids as text (the aggregate id role's column).
    pub aggregate_ids: Vec<String>,
    /// Event types (the event type role's column).
    pub event_types: Vec<String>,
    /// An operator's SQL condition over the outbox columns (raw SQL, run
    /// in a read-only transaction; see [`dead_letter::check_where`]).
    #[serde(rename = "where")]
    pub condition: Option<String>,
}

/// Reads `--from` / `--to` (`flag` names it in the error).
pub fn parse_time(flag: &'static str, text: &str) -> Result<Timestamp, ReplayError> {
    Timestamp::parse(text).map_err(|why| ReplayError::BadTime {
        flag,
        text: text.to_owned(),
        why,
    })
}

impl ReplaySelection {
    /// Refuses what can be refused without the database: an empty or
    /// reversed time range, an empty filter value, an unsafe `--where`.
    pub fn check(&self) -> Result<(), ReplayError> {
        if let (Some(from), Some(to)) = (self.from, self.to) {
            if from >= to {
                return Err(ReplayError::EmptyRange { from, to });
            }
        }
        for (flag, values) in [
            ("--aggregate-type", &self.aggregate_types),
            ("--aggregate-id", &self.aggregate_ids),
            ("--event-type", &self.event_types),
        ] {
            if values.iter().any(|v| v.trim().is_empty()) {
                return Err(ReplayError::EmptyFilter(flag));
            }
        }
        if let Some(w) = &self.condition {
            dead_letter::check_where(w).map_err(|e| ReplayError::UnsafeWhere(e.to_string()))?;
        }
        Ok(())
    }
}

/// A query parameter.
pub(super) type Param = Box<dyn ToSql + Sync + Send>;

/// The selection as SQL over the table aliased `o`: the condition and its
/// parameters (`$1` …). `upper` is the exclusive end of the time range
/// (`--to`, or when the replay started). `aggregate_id_uuid` says the
/// aggregate id column is `uuid` (ids are then compared as uuids).
pub(super) fn condition(
    selection: &ReplaySelection,
    map: &ColumnMap,
    upper: SystemTime,
    aggregate_id_uuid: bool,
) -> Result<(String, Vec<Param>), ReplayError> {
    let mut parts: Vec<String> = Vec::new();
    let mut params: Vec<Param> = Vec::new();
    let mut push = |sql: &dyn Fn(usize) -> String, p: Param| {
        params.push(p);
        parts.push(sql(params.len()));
    };
    push(
        &|n| format!("o.status = ${n}"),
        Box::new(selection.status.row_status()),
    );
    if let Some(from) = selection.from {
        push(
            &|n| format!("o.created_at >= ${n}"),
            Box::new(from.to_system_time()),
        );
    }
    push(&|n| format!("o.created_at < ${n}"), Box::new(upper));
    let column = |role: Role, flag: &'static str| {
        map.name(role)
            .map(quote_ident)
            .ok_or(ReplayError::NoRoleColumn { flag, role })
    };
    if !selection.aggregate_types.is_empty() {
        let c = column(Role::AggregateType, "--aggregate-type")?;
        push(
            &|n| format!("o.{c}::text = ANY(${n}::text[])"),
            Box::new(selection.aggregate_types.clone()),
        );
    }
    if !selection.aggregate_ids.is_empty() {
        let c = column(Role::AggregateId, "--aggregate-id")?;
        if aggregate_id_uuid {
            let ids = selection
                .aggregate_ids
                .iter()
                .map(|t| {
                    Uuid::parse_str(t.trim()).map_err(|_| ReplayError::BadAggregateId(t.clone()))
                })
                .collect::<Result<Vec<Uuid>, _>>()?;
            push(&|n| format!("o.{c} = ANY(${n}::uuid[])"), Box::new(ids));
        } else {
            push(
                &|n| format!("o.{c}::text = ANY(${n}::text[])"),
                Box::new(selection.aggregate_ids.clone()),
            );
        }
    }
    if !selection.event_types.is_empty() {
        let c = column(Role::EventType, "--event-type")?;
        push(
            &|n| format!("o.{c}::text = ANY(${n}::text[])"),
            Box::new(selection.event_types.clone()),
        );
    }
    if let Some(w) = &selection.condition {
        parts.push(format!("({w})"));
    }
    Ok((parts.join(" AND "), params))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selection() -> ReplaySelection {
        ReplaySelection {
            from: Some(Timestamp::parse("2026-12-01").unwrap()),
            to: Some(Timestamp::parse("2026-12-02").unwrap()),
            ..ReplaySelection::default()
        }
    }

    #[test]
    fn statuses_read_in_the_spellings_operators_use() {
        for t in ["completed", "COMPLETED", " Completed "] {
            assert_eq!(ReplayStatus::parse(t).unwrap(), ReplayStatus::Completed);
        }
        for t in ["dead-letter", "DEAD_LETTER", "dead_letter"] {
            assert_eq!(ReplayStatus::parse(t).unwrap(), ReplayStatus::DeadLetter);
        }
        for t in ["pending", "", "dead"] {
            let e = ReplayStatus::parse(t).unwrap_err().to_string();
            assert!(
                e.contains("completed or dead-letter") && !e.contains('\n'),
                "{e}"
            );
        }
    }

    #[test]
    fn reversed_or_empty_ranges_and_blank_filters_are_refused() {
        assert!(selection().check().is_ok());
        let mut s = selection();
        s.to = s.from;
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("--from") && e.contains("--to"), "{e}");
        let mut s = selection();
        s.event_types = vec!["OrderCreated".into(), " ".into()];
        assert!(s.check().unwrap_err().to_string().contains("--event-type"));
        let mut s = selection();
        s.condition = Some("true; DELETE FROM outbox".into());
        assert!(s.check().unwrap_err().to_string().contains("--where"));
    }

    #[test]
    fn the_condition_names_columns_through_the_roles() {
        let map = crate::config::ColumnsConfig {
            preset: crate::config::TablePreset::Debezium,
            event_type: Some(String::new()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let mut s = selection();
        s.aggregate_types = vec!["Order".into()];
        s.aggregate_ids = vec!["17".into()];
        s.condition = Some("payload IS NOT NULL".into());
        let (sql, params) = condition(&s, &map, SystemTime::now(), false).unwrap();
        assert_eq!(
            sql,
            "o.status = $1 AND o.created_at >= $2 AND o.created_at < $3 \
             AND o.\"aggregatetype\"::text = ANY($4::text[]) \
             AND o.\"aggregateid\"::text = ANY($5::text[]) AND (payload IS NOT NULL)"
        );
        assert_eq!(params.len(), 5);
        s.event_types = vec!["OrderCreated".into()];
        let e = condition(&s, &map, SystemTime::now(), false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--event-type"), "{e}");
    }

    #[test]
    fn uuid_aggregate_ids_are_checked_before_any_query() {
        let mut s = selection();
        s.aggregate_ids = vec!["not-a-uuid".into()];
        let map = ColumnMap::pgoutbox();
        let e = condition(&s, &map, SystemTime::now(), true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not-a-uuid") && e.contains("UUID"), "{e}");
        s.aggregate_ids = vec!["8F14E45F-CEEA-467F-A0E6-1C7A5F9D2B11".into()];
        let (sql, _) = condition(&s, &map, SystemTime::now(), true).unwrap();
        assert!(sql.contains("= ANY($4::uuid[])"), "{sql}");
    }
}
