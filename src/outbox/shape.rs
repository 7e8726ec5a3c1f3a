//! What an existing outbox table offers, read from the catalog: which of
//! the mapped columns ([`ColumnMap`]) it has, and so which features it can
//! serve — relaying (the roles), marking ([`MARKING_COLUMNS`]) and poll mode
//! ([`ROW_STATE_COLUMNS`]). The run's preflight and `pgoutbox adopt` read
//! it; neither changes the table.

use tokio_postgres::GenericClient;

use crate::config::{ColumnMap, Role, MARKING_COLUMNS, ROW_STATE_COLUMNS};

/// Integer types marking and poll mode can address rows by.
const INTEGER_TYPES: [&str; 3] = ["bigint", "integer", "smallint"];

/// An existing table's columns and types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableShape {
    /// `schema.table`.
    pub qualified: String,
    /// Its columns with their types (`format_type`), in table order.
    pub columns: Vec<(String, String)>,
    /// `p` partitioned, `r` plain.
    pub kind: char,
}

/// A feature of the relay and the columns a table lacks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    /// What cannot be done: `relaying`, `marking`, `poll mode`.
    pub feature: &'static str,
    /// The missing (or unusable) columns, with why when they exist.
    pub missing: Vec<String>,
}

impl TableShape {
    /// Reads `schema.table` from the catalog; `None` when no such table.
    pub async fn inspect(
        client: &impl GenericClient,
        schema: &str,
        table: &str,
    ) -> Result<Option<TableShape>, tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT c.relkind::text, a.attname::text, format_type(a.atttypid, a.atttypmod) \
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                   LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                  WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') \
                  ORDER BY a.attnum",
                &[&schema, &table],
            )
            .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let kind: String = first.get(0);
        Ok(Some(TableShape {
            qualified: format!("{schema}.{table}"),
            kind: kind.chars().next().unwrap_or('r'),
            columns: rows
                .iter()
                .filter_map(|r| Some((r.get::<_, Option<String>>(1)?, r.get(2))))
                .collect(),
        }))
    }

    /// The type of `column`, if the table has it.
    pub fn type_of(&self, column: &str) -> Option<&str> {
        self.columns
            .iter()
            .find(|(c, _)| c == column)
            .map(|(_, t)| t.as_str())
    }

    /// Whether the payload column is `bytea` (its text is then decoded).
    pub fn bytea_payload(&self, map: &ColumnMap) -> bool {
        map.name(Role::Payload)
            .and_then(|c| self.type_of(c))
            .is_some_and(|t| t == "bytea")
    }

    /// What the table lacks for relaying with `map`: the columns of its
    /// required roles and additional columns.
    pub fn relay_gap(&self, map: &ColumnMap) -> Gap {
        Gap {
            feature: "relaying",
            missing: map
                .required_columns()
                .filter(|c| self.type_of(c).is_none())
                .map(str::to_string)
                .collect(),
        }
    }

    /// What the table lacks for marking rows `COMPLETED` / `DEAD_LETTER`.
    pub fn marking_gap(&self) -> Gap {
        Gap {
            feature: "marking",
            missing: self.lacking(&MARKING_COLUMNS),
        }
    }

    /// What the table lacks for poll mode.
    pub fn poll_gap(&self) -> Gap {
        Gap {
            feature: "poll mode",
            missing: self.lacking(&ROW_STATE_COLUMNS),
        }
    }

    fn lacking(&self, columns: &[&str]) -> Vec<String> {
        columns
            .iter()
            .filter_map(|c| match self.type_of(c) {
                None => Some((*c).to_string()),
                Some(t) if *c == "id" && !INTEGER_TYPES.contains(&t) => {
                    Some(format!("id (an integer; this table's is {t})"))
                }
                Some(_) => None,
            })
            .collect()
    }
}

impl Gap {
    /// True when nothing is missing.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
    }
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} needs the column(s) {}",
            self.feature,
            self.missing.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ColumnsConfig, TablePreset};

    fn shape(columns: &[(&str, &str)]) -> TableShape {
        TableShape {
            qualified: "public.outbox".into(),
            kind: 'r',
            columns: columns
                .iter()
                .map(|(c, t)| ((*c).to_string(), (*t).to_string()))
                .collect(),
        }
    }

    #[test]
    fn debeziums_table_relays_but_cannot_be_marked_or_polled() {
        let map = ColumnsConfig {
            preset: TablePreset::Debezium,
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let s = shape(&[
            ("id", "uuid"),
            ("aggregatetype", "character varying(255)"),
            ("aggregateid", "character varying(255)"),
            ("type", "character varying(255)"),
            ("payload", "bytea"),
        ]);
        assert!(s.relay_gap(&map).is_empty());
        assert!(s.bytea_payload(&map));
        let marking = s.marking_gap();
        assert_eq!(
            marking.missing,
            [
                "id (an integer; this table's is uuid)",
                "created_at",
                "status",
                "processed_at",
                "last_error"
            ]
        );
        assert!(s
            .poll_gap()
            .to_string()
            .starts_with("poll mode needs the column(s) id (an integer"));
        let no_payload = shape(&[
            ("id", "uuid"),
            ("aggregatetype", "text"),
            ("aggregateid", "text"),
        ]);
        assert_eq!(no_payload.relay_gap(&map).missing, ["payload"]);
    }
}
