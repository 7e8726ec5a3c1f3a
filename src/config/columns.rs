//! `[outbox.columns]`: which column of the outbox table plays which role,
//! so that a table of another shape (Debezium's default outbox table, a
//! home-grown one) is relayed as it is.
//!
//! A role is one fact an event needs: its id, aggregate type and id, event
//! type, payload, timestamp and trace context. `preset` names a known table
//! shape (`pgoutbox`, the default, or `debezium`); any role set explicitly
//! overrides the preset's column, and `""` removes an optional role.
//! `additional` lists further columns read with every row (for
//! `kafka.debezium.table.fields.additional.placement`).
//!
//! Marking and poll mode need more than roles: the row-state columns
//! ([`ROW_STATE_COLUMNS`]) under pgoutbox's names. A table without them is
//! relayed in CDC mode without marking (ARCHITECTURE.md, invariant 12).

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use super::{validate_identifier, ConfigError};

/// A known outbox table shape (`outbox.columns.preset`, env
/// `OUTBOX_TABLE_PRESET`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TablePreset {
    /// The table `pgoutbox migrate` creates.
    #[default]
    Pgoutbox,
    /// Debezium's default outbox table: `id uuid, aggregatetype,
    /// aggregateid, type, payload jsonb` (+ optional `tracingspancontext`).
    Debezium,
}

impl TablePreset {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TablePreset::Pgoutbox => "pgoutbox",
            TablePreset::Debezium => "debezium",
        }
    }
}

impl fmt::Display for TablePreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TablePreset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pgoutbox" => Ok(TablePreset::Pgoutbox),
            "debezium" => Ok(TablePreset::Debezium),
            other => Err(format!(
                "{other:?} is not a table preset: use \"pgoutbox\" or \"debezium\""
            )),
        }
    }
}

/// What an event needs from a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The event's id (consumers deduplicate on it).
    EventId,
    /// The aggregate type (the default topic's first part).
    AggregateType,
    /// The aggregate id (the Kafka key).
    AggregateId,
    /// The event type.
    EventType,
    /// The payload (the Kafka value).
    Payload,
    /// When the event happened.
    Timestamp,
    /// W3C trace context (JSON with `traceparent`/`tracestate`, or
    /// Debezium's `key=value` lines).
    TraceContext,
}

impl Role {
    /// Every role, in [`ColumnMap`] order.
    pub const ALL: [Role; 7] = [
        Role::EventId,
        Role::AggregateType,
        Role::AggregateId,
        Role::EventType,
        Role::Payload,
        Role::Timestamp,
        Role::TraceContext,
    ];

    /// The role's key in `[outbox.columns]`.
    pub fn key(self) -> &'static str {
        match self {
            Role::EventId => "event_id",
            Role::AggregateType => "aggregate_type",
            Role::AggregateId => "aggregate_id",
            Role::EventType => "event_type",
            Role::Payload => "payload",
            Role::Timestamp => "timestamp",
            Role::TraceContext => "trace_context",
        }
    }

    /// Whether every outbox table must have this role.
    pub fn essential(self) -> bool {
        matches!(
            self,
            Role::EventId | Role::AggregateType | Role::AggregateId | Role::Payload
        )
    }

    /// Whether a NULL in this role's column still makes an event: an
    /// event needs its id, aggregate type and aggregate id; a NULL payload
    /// is an event without a value.
    pub fn may_be_null(self) -> bool {
        !matches!(
            self,
            Role::EventId | Role::AggregateType | Role::AggregateId
        )
    }

    fn index(self) -> usize {
        Role::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// The columns marking and poll mode need, under these names: the row's key
/// `(id, created_at)`, its status and the lease and retry bookkeeping.
pub const ROW_STATE_COLUMNS: [&str; 9] = [
    "id",
    "created_at",
    "status",
    "processed_at",
    "last_error",
    "retry_count",
    "max_retries",
    "locked_until",
    "lock_token",
];

/// The subset of [`ROW_STATE_COLUMNS`] marking needs.
pub const MARKING_COLUMNS: [&str; 5] = ["id", "created_at", "status", "processed_at", "last_error"];

/// `[outbox.columns]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnsConfig {
    /// The table shape the roles default to.
    pub preset: TablePreset,
    /// Column of the event id.
    pub event_id: Option<String>,
    /// Column of the aggregate type.
    pub aggregate_type: Option<String>,
    /// Column of the aggregate id (the key).
    pub aggregate_id: Option<String>,
    /// Column of the event type (`""`: none).
    pub event_type: Option<String>,
    /// Column of the payload (jsonb, json, text or bytea).
    pub payload: Option<String>,
    /// Column of the event's timestamp (`""`: none).
    pub timestamp: Option<String>,
    /// Column of the trace context (`""`: none).
    pub trace_context: Option<String>,
    /// Further columns read with every row.
    pub additional: Vec<String>,
}

/// One role's column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleColumn {
    /// The column's name.
    pub name: String,
    /// Whether a table without it is refused (otherwise the role is simply
    /// absent from that table's events).
    pub required: bool,
}

/// The roles resolved: preset, then explicit settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnMap {
    roles: [Option<RoleColumn>; 7],
    additional: Vec<String>,
    preset: TablePreset,
}

fn preset_column(preset: TablePreset, role: Role) -> Option<RoleColumn> {
    let (name, required) = match (preset, role) {
        (TablePreset::Pgoutbox, Role::EventId) => ("tracking_id", true),
        (TablePreset::Pgoutbox, Role::AggregateType) => ("aggregate_type", true),
        (TablePreset::Pgoutbox, Role::AggregateId) => ("aggregate_id", true),
        (TablePreset::Pgoutbox, Role::EventType) => ("event_type", true),
        (TablePreset::Pgoutbox, Role::Payload) => ("payload", true),
        (TablePreset::Pgoutbox, Role::Timestamp) => ("created_at", true),
        (TablePreset::Pgoutbox, Role::TraceContext) => ("metadata", false),
        (TablePreset::Debezium, Role::EventId) => ("id", true),
        (TablePreset::Debezium, Role::AggregateType) => ("aggregatetype", true),
        (TablePreset::Debezium, Role::AggregateId) => ("aggregateid", true),
        (TablePreset::Debezium, Role::EventType) => ("type", false),
        (TablePreset::Debezium, Role::Payload) => ("payload", true),
        (TablePreset::Debezium, Role::Timestamp) => return None,
        (TablePreset::Debezium, Role::TraceContext) => ("tracingspancontext", false),
    };
    Some(RoleColumn {
        name: name.into(),
        required,
    })
}

impl ColumnsConfig {
    fn explicit(&self, role: Role) -> Option<&String> {
        match role {
            Role::EventId => self.event_id.as_ref(),
            Role::AggregateType => self.aggregate_type.as_ref(),
            Role::AggregateId => self.aggregate_id.as_ref(),
            Role::EventType => self.event_type.as_ref(),
            Role::Payload => self.payload.as_ref(),
            Role::Timestamp => self.timestamp.as_ref(),
            Role::TraceContext => self.trace_context.as_ref(),
        }
    }

    /// The roles resolved, or the first setting that cannot be used.
    pub fn resolve(&self) -> Result<ColumnMap, ConfigError> {
        let mut roles: [Option<RoleColumn>; 7] = Default::default();
        for role in Role::ALL {
            let field = format!("outbox.columns.{}", role.key());
            roles[role.index()] = match self.explicit(role) {
                Some(name) if name.is_empty() => {
                    if role.essential() {
                        return Err(ConfigError::new(
                            field,
                            "every outbox event needs this role; name the column that holds it",
                        ));
                    }
                    None
                }
                Some(name) => {
                    validate_identifier(&field, name)?;
                    Some(RoleColumn {
                        name: name.clone(),
                        required: true,
                    })
                }
                None => preset_column(self.preset, role),
            };
        }
        for name in &self.additional {
            validate_identifier("outbox.columns.additional", name)?;
        }
        let map = ColumnMap {
            roles,
            additional: Vec::new(),
            preset: self.preset,
        };
        Ok(self
            .additional
            .iter()
            .fold(map, |m, name| m.with_additional(name)))
    }
}

impl ColumnMap {
    /// pgoutbox's own table.
    pub fn pgoutbox() -> ColumnMap {
        ColumnsConfig::default()
            .resolve()
            .unwrap_or_else(|_| unreachable!("the default mapping is valid"))
    }

    /// The column playing `role`, if the mapping has one.
    pub fn role(&self, role: Role) -> Option<&RoleColumn> {
        self.roles[role.index()].as_ref()
    }

    /// The name of the column playing `role`.
    pub fn name(&self, role: Role) -> Option<&str> {
        self.role(role).map(|c| c.name.as_str())
    }

    /// The role `column` plays, if any.
    pub fn role_of(&self, column: &str) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|r| self.name(*r) == Some(column))
    }

    /// The additional columns, in the order events carry them.
    pub fn additional(&self) -> &[String] {
        &self.additional
    }

    /// Position of `column` among the additional columns.
    pub fn additional_index(&self, column: &str) -> Option<usize> {
        self.additional.iter().position(|c| c == column)
    }

    /// The same map reading `column` too (when no role already reads it).
    pub fn with_additional(mut self, column: &str) -> ColumnMap {
        if self.role_of(column).is_none() && self.additional_index(column).is_none() {
            self.additional.push(column.to_string());
        }
        self
    }

    /// The preset the roles started from.
    pub fn preset(&self) -> TablePreset {
        self.preset
    }

    /// Every column the relay reads for an event: the roles', then the
    /// additional ones.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.roles
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .chain(self.additional.iter().map(String::as_str))
    }

    /// The columns a table must have to be relayed with this mapping.
    pub fn required_columns(&self) -> impl Iterator<Item = &str> {
        self.roles
            .iter()
            .flatten()
            .filter(|c| c.required)
            .map(|c| c.name.as_str())
            .chain(self.additional.iter().map(String::as_str))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_pgoutboxs_own_table() {
        let m = ColumnMap::pgoutbox();
        assert_eq!(m.name(Role::EventId), Some("tracking_id"));
        assert_eq!(m.name(Role::Timestamp), Some("created_at"));
        assert!(!m.role(Role::TraceContext).unwrap().required);
        assert_eq!(m.role_of("aggregate_id"), Some(Role::AggregateId));
    }

    #[test]
    fn the_debezium_preset_is_debeziums_default_table() {
        let c = ColumnsConfig {
            preset: TablePreset::Debezium,
            ..ColumnsConfig::default()
        };
        let m = c.resolve().unwrap();
        let required: Vec<&str> = m.required_columns().collect();
        assert_eq!(required, ["id", "aggregatetype", "aggregateid", "payload"]);
        assert_eq!(m.name(Role::EventType), Some("type"));
        assert_eq!(m.name(Role::Timestamp), None);
        assert_eq!(m.name(Role::TraceContext), Some("tracingspancontext"));
    }

    #[test]
    fn explicit_roles_override_the_preset_and_are_required() {
        let c = ColumnsConfig {
            preset: TablePreset::Debezium,
            timestamp: Some("occurred_at".into()),
            event_type: Some(String::new()),
            additional: vec!["tenant".into(), "payload".into(), "tenant".into()],
            ..ColumnsConfig::default()
        };
        let m = c.resolve().unwrap();
        assert_eq!(
            m.role(Role::Timestamp),
            Some(&RoleColumn {
                name: "occurred_at".into(),
                required: true
            })
        );
        assert_eq!(m.name(Role::EventType), None);
        assert_eq!(
            m.additional(),
            ["tenant"],
            "roles and repeats are not read twice"
        );
    }

    #[test]
    fn an_essential_role_cannot_be_removed_and_names_are_checked() {
        let c = ColumnsConfig {
            payload: Some(String::new()),
            ..ColumnsConfig::default()
        };
        let e = c.resolve().unwrap_err();
        assert_eq!(e.field, "outbox.columns.payload");
        let c = ColumnsConfig {
            aggregate_id: Some("a\"b".into()),
            ..ColumnsConfig::default()
        };
        assert_eq!(
            c.resolve().unwrap_err().field,
            "outbox.columns.aggregate_id"
        );
        assert!("nope"
            .parse::<TablePreset>()
            .unwrap_err()
            .contains("\"debezium\""));
    }
}
