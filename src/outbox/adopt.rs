//! Adopting an outbox table pgoutbox did not create (Debezium's, a
//! home-grown one): check it against `[outbox.columns]`, say what it lacks
//! for which feature, and make what the relay needs *beside* it — its own
//! tables (`pgoutbox_slot_state`, `pgoutbox_dead_letters`), the
//! publication, and, only on request, the columns poll mode needs. Nothing
//! is ever dropped or rewritten: columns are added with constant defaults
//! (no table rewrite), indexes are built concurrently.
//!
//! The adoption is recorded in `pgoutbox_migrations` as version
//! [`ADOPTED`], which the relay's preflight accepts in place of the
//! migrations and `pgoutbox migrate` takes as "not mine".

use tokio_postgres::Client;

use super::migrate::{render_for, MigrationTarget, SUPPORT_MIGRATIONS};
use super::shape::{Gap, TableShape};
use crate::config::{quote_ident, ColumnMap};

/// The `pgoutbox_migrations` version recording an adopted table.
pub const ADOPTED: i32 = 0;

/// What `adopt` found and did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdoptReport {
    /// `schema.table`.
    pub table: String,
    /// Whether `pgoutbox migrate` created it (then there is nothing to
    /// adopt).
    pub created_by_migrate: bool,
    /// The features and the columns each lacks (`[]` when served).
    pub gaps: Vec<(String, Vec<String>)>,
    /// Whether the publication covers the table (after the changes).
    pub published: bool,
    /// What was changed, in order.
    pub changes: Vec<String>,
}

/// Why the table cannot be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// A database error while `doing`.
    #[error("{doing}: {source}")]
    Database {
        /// What was being done.
        doing: String,
        /// The error.
        source: tokio_postgres::Error,
    },
    /// Something only the operator can change.
    #[error("{0}")]
    Refused(String),
}

fn db(doing: &str) -> impl FnOnce(tokio_postgres::Error) -> AdoptError + '_ {
    move |source| AdoptError::Database {
        doing: doing.to_string(),
        source,
    }
}

/// The row-state columns `--add-poll-columns` adds, with their
/// definitions. `status` starts `COMPLETED` for the rows already there
/// (the previous relay delivered them) and defaults to `PENDING` after.
const POLL_COLUMNS: [(&str, &str); 8] = [
    ("created_at", "timestamptz NOT NULL DEFAULT now()"),
    ("status", "text NOT NULL DEFAULT 'COMPLETED'"),
    ("processed_at", "timestamptz"),
    ("last_error", "text"),
    ("retry_count", "int NOT NULL DEFAULT 0"),
    ("max_retries", "int NOT NULL DEFAULT 5"),
    ("locked_until", "timestamptz"),
    ("lock_token", "bigint"),
];

/// Checks `target`'s table against `map` and, unless `check_only`, makes
/// what the relay needs beside it (and, with `add_poll_columns`, the
/// row-state columns).
pub async fn adopt(
    client: &mut Client,
    target: &MigrationTarget,
    map: &ColumnMap,
    check_only: bool,
    add_poll_columns: bool,
) -> Result<AdoptReport, AdoptError> {
    let qualified = format!("{}.{}", target.schema, target.table);
    let shape = TableShape::inspect(client, &target.schema, &target.table)
        .await
        .map_err(db("reading the table's columns"))?
        .ok_or_else(|| AdoptError::Refused(format!("table {qualified} does not exist")))?;
    let created_by_migrate = client
        .query_opt(
            "SELECT 1 FROM pg_tables WHERE schemaname = 'public' AND tablename = 'pgoutbox_migrations'",
            &[],
        )
        .await
        .map_err(db("reading pgoutbox_migrations"))?
        .is_some()
        && client
            .query_opt(
                "SELECT 1 FROM public.pgoutbox_migrations WHERE target = $1 AND version = 1",
                &[&qualified],
            )
            .await
            .map_err(db("reading pgoutbox_migrations"))?
            .is_some();
    let relay = shape.relay_gap(map);
    let mut report = AdoptReport {
        table: qualified.clone(),
        created_by_migrate,
        gaps: Vec::new(),
        published: false,
        changes: Vec::new(),
    };
    if created_by_migrate {
        report.gaps = gaps(&shape, map);
        report.published = published(client, target).await?;
        return Ok(report);
    }
    if !relay.is_empty() && !check_only {
        return Err(AdoptError::Refused(format!(
            "{qualified} cannot be relayed: {relay}; map [outbox.columns] to its columns (nothing was changed)"
        )));
    }
    if add_poll_columns && !check_only {
        add_row_state(client, &shape, target, &mut report.changes).await?;
    }
    if !check_only {
        support_objects(client, target, &mut report.changes).await?;
    }
    let shape = TableShape::inspect(client, &target.schema, &target.table)
        .await
        .map_err(db("reading the table's columns"))?
        .unwrap_or(shape);
    report.gaps = gaps(&shape, map);
    report.published = published(client, target).await?;
    Ok(report)
}

fn gaps(shape: &TableShape, map: &ColumnMap) -> Vec<(String, Vec<String>)> {
    [shape.relay_gap(map), shape.marking_gap(), shape.poll_gap()]
        .into_iter()
        .map(|Gap { feature, missing }| (feature.to_string(), missing))
        .collect()
}

async fn published(client: &Client, target: &MigrationTarget) -> Result<bool, AdoptError> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&target.publication, &target.schema, &target.table],
        )
        .await
        .map_err(db("reading pg_publication_tables"))?
        .is_some())
}

/// The relay's own tables and the publication, and the adoption record,
/// in one transaction under the migrations' lock.
async fn support_objects(
    client: &mut Client,
    target: &MigrationTarget,
    changes: &mut Vec<String>,
) -> Result<(), AdoptError> {
    let qualified = format!("{}.{}", target.schema, target.table);
    let tx = client
        .transaction()
        .await
        .map_err(db("starting the adoption"))?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('pgoutbox_migrations'));
         CREATE TABLE IF NOT EXISTS public.pgoutbox_migrations (
           target     text NOT NULL,
           version    int  NOT NULL,
           name       text NOT NULL,
           applied_at timestamptz NOT NULL DEFAULT now(),
           PRIMARY KEY (target, version))",
    )
    .await
    .map_err(db("creating pgoutbox_migrations"))?;
    for (name, sql) in SUPPORT_MIGRATIONS {
        tx.batch_execute(&render_for(target, sql))
            .await
            .map_err(db(&format!("creating the relay's own objects ({name})")))?;
    }
    let added = tx
        .execute(
            "INSERT INTO public.pgoutbox_migrations (target, version, name) VALUES ($1, $2, 'adopted') \
             ON CONFLICT DO NOTHING",
            &[&qualified, &ADOPTED],
        )
        .await
        .map_err(db("recording the adoption"))?;
    tx.commit().await.map_err(db("committing the adoption"))?;
    changes.push(format!(
        "made the relay's own tables in schema {} (pgoutbox_slot_state, pgoutbox_dead_letters) and made sure publication {} covers the table",
        target.schema, target.publication
    ));
    if added > 0 {
        changes.push(format!(
            "recorded {qualified} as adopted in public.pgoutbox_migrations"
        ));
    }
    Ok(())
}

/// Adds the row-state columns poll mode and marking need, without a
/// rewrite, then their indexes concurrently.
async fn add_row_state(
    client: &mut Client,
    shape: &TableShape,
    target: &MigrationTarget,
    changes: &mut Vec<String>,
) -> Result<(), AdoptError> {
    let t = format!(
        "{}.{}",
        quote_ident(&target.schema),
        quote_ident(&target.table)
    );
    let id_gap = shape.poll_gap();
    if let Some(id) = id_gap.missing.iter().find(|c| c.starts_with("id")) {
        return Err(AdoptError::Refused(format!(
            "poll mode and marking address rows by an integer `id` column; the table lacks {id}, and adding one would rewrite the table, which adopt never does (nothing was changed)"
        )));
    }
    for (column, definition) in POLL_COLUMNS {
        if shape.type_of(column).is_some() {
            continue;
        }
        client
            .batch_execute(&format!(
                "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {} {definition}",
                quote_ident(column)
            ))
            .await
            .map_err(db(&format!("adding column {column}")))?;
        if column == "status" {
            client
                .batch_execute(&format!(
                    "ALTER TABLE {t} ALTER COLUMN status SET DEFAULT 'PENDING'"
                ))
                .await
                .map_err(db("setting status's default"))?;
            changes.push("added column status (rows already there are COMPLETED; new rows default to PENDING)".into());
        } else {
            changes.push(format!("added column {column} {definition}"));
        }
    }
    for (suffix, columns, status) in [
        ("pending_idx", "created_at, id", "PENDING"),
        ("processing_idx", "locked_until", "PROCESSING"),
    ] {
        let name = quote_ident(&format!("{}_{suffix}", target.table));
        let index = format!("{}.{name}", quote_ident(&target.schema));
        let invalid = client
            .query_opt(
                "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                  WHERE c.oid = to_regclass($1) AND NOT i.indisvalid",
                &[&index],
            )
            .await
            .map_err(db("checking for an interrupted index build"))?
            .is_some();
        if invalid {
            client
                .batch_execute(&format!("DROP INDEX CONCURRENTLY {index}"))
                .await
                .map_err(db("dropping an index an interrupted build left invalid"))?;
        }
        client
            .batch_execute(&format!(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {t} ({columns}) WHERE status = '{status}'"
            ))
            .await
            .map_err(db("building an index concurrently"))?;
    }
    changes.push("built the pending and processing indexes concurrently".into());
    Ok(())
}

impl AdoptReport {
    /// The report as lines for a terminal.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!("table {}", self.table)];
        if self.created_by_migrate {
            out.push("  created by `pgoutbox migrate`: nothing to adopt (run `pgoutbox migrate` to update it)".into());
        }
        for (feature, missing) in &self.gaps {
            if missing.is_empty() {
                out.push(format!("  {feature}: ok"));
            } else {
                out.push(format!(
                    "  {feature}: not possible, missing {}",
                    missing.join(", ")
                ));
            }
        }
        out.push(format!(
            "  publication: {}",
            if self.published {
                "covers the table"
            } else {
                "does not cover the table"
            }
        ));
        for change in &self.changes {
            out.push(format!("  changed: {change}"));
        }
        out
    }
}
