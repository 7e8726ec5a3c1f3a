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

pub(super) fn db(doing: &str) -> impl FnOnce(tokio_postgres::Error) -> AdoptError + '_ {
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
        let shape = TableShape::inspect(client, &target.schema, &target.table)
            .await
            .map_err(db("reading the table's columns"))?
            .unwrap_or_else(|| shape.clone());
        build_status_indexes(client, &shape, target, &mut report.changes).await?;
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

/// Whether the function `signature` (`schema.name(types)`) exists.
async fn function_exists(client: &Client, signature: &str) -> Result<bool, AdoptError> {
    Ok(client
        .query_one("SELECT to_regprocedure($1) IS NOT NULL", &[&signature])
        .await
        .map_err(db("looking for a function"))?
        .get(0))
}

/// The relay's own tables and the publication, and the adoption record,
/// in one transaction under the migrations' lock.
async fn support_objects(
    client: &mut Client,
    target: &MigrationTarget,
    changes: &mut Vec<String>,
) -> Result<(), AdoptError> {
    let qualified = format!("{}.{}", target.schema, target.table);
    let publish = format!(
        "{}.{}(text, uuid, text, jsonb, jsonb)",
        quote_ident(&target.schema),
        quote_ident(&target.publish_function())
    );
    let had_publish = function_exists(client, &publish).await?;
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
    if !had_publish && function_exists(client, &publish).await? {
        changes.push(format!(
            "made {publish}, which publishes an event inside the caller's transaction and sets tracking_id itself"
        ));
    }
    if added > 0 {
        changes.push(format!(
            "recorded {qualified} as adopted in public.pgoutbox_migrations"
        ));
    }
    Ok(())
}

/// Adds the row-state columns poll mode and marking need, without a
/// rewrite (their indexes follow, [`build_status_indexes`]).
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
    Ok(())
}

/// The partial indexes `pgoutbox migrate` gives its own table, one per
/// status the relay looks up: (name suffix, columns, status).
pub(super) const STATUS_INDEXES: [(&str, &str, &str); 4] = [
    ("pending_idx", "created_at, id", "PENDING"),
    ("processing_idx", "locked_until", "PROCESSING"),
    ("dead_letter_idx", "created_at, id", "DEAD_LETTER"),
    ("failed_idx", "created_at, id", "FAILED"),
];

/// Builds the status indexes the table lacks (those whose columns it has),
/// with `CREATE INDEX CONCURRENTLY` outside any transaction (the
/// application's inserts and updates go on), after dropping one an
/// interrupted build left invalid. A partitioned table cannot be indexed
/// concurrently as a whole: its index is made on the parent alone (`ON
/// ONLY`, instant), each partition's concurrently, and each attached to
/// it. Without these every claim, backfill and status count scans the
/// table.
async fn build_status_indexes(
    client: &Client,
    shape: &TableShape,
    target: &MigrationTarget,
    changes: &mut Vec<String>,
) -> Result<(), AdoptError> {
    let schema = quote_ident(&target.schema);
    let t = format!("{schema}.{}", quote_ident(&target.table));
    let partitions: Vec<(String, String)> = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_inherits i \
               JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE i.inhparent = to_regclass($1) ORDER BY c.relname",
            &[&t],
        )
        .await
        .map_err(db("listing the table's partitions"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let partitioned = client
        .query_one(
            "SELECT coalesce((SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)), false)",
            &[&t],
        )
        .await
        .map_err(db("reading the table's kind"))?
        .get::<_, bool>(0);
    let mut built = Vec::new();
    for (suffix, columns, status) in STATUS_INDEXES {
        let needs = columns.split(", ").chain(["status"]);
        if needs.into_iter().any(|c| shape.type_of(c).is_none()) {
            continue;
        }
        let index_name = format!("{}_{suffix}", target.table);
        let definition = format!("({columns}) WHERE status = '{status}'");
        let started = std::time::Instant::now();
        if !partitioned {
            if !build_concurrently(client, &target.schema, &index_name, &t, &definition, false)
                .await?
            {
                continue;
            }
        } else {
            let parent = format!("{schema}.{}", quote_ident(&index_name));
            if index_valid(client, &parent).await? == Some(true) {
                continue;
            }
            client
                .batch_execute(&format!(
                    "CREATE INDEX IF NOT EXISTS {} ON ONLY {t} {definition}",
                    quote_ident(&index_name)
                ))
                .await
                .map_err(db("making an index on the partitioned table alone"))?;
            for (part_schema, part) in &partitions {
                let child_name = child_index_name(part, suffix);
                let child_table = format!("{}.{}", quote_ident(part_schema), quote_ident(part));
                build_concurrently(
                    client,
                    part_schema,
                    &child_name,
                    &child_table,
                    &definition,
                    false,
                )
                .await?;
                let attached = client
                    .query_opt(
                        "SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass($1) AND inhparent = to_regclass($2)",
                        &[
                            &format!("{}.{}", quote_ident(part_schema), quote_ident(&child_name)),
                            &parent,
                        ],
                    )
                    .await
                    .map_err(db("checking an index's attachment"))?
                    .is_some();
                if !attached {
                    client
                        .batch_execute(&format!(
                            "ALTER INDEX {parent} ATTACH PARTITION {}.{}",
                            quote_ident(part_schema),
                            quote_ident(&child_name)
                        ))
                        .await
                        .map_err(db("attaching a partition's index"))?;
                }
            }
        }
        built.push(format!(
            "{index_name} ({:.1} s)",
            started.elapsed().as_secs_f64()
        ));
    }
    if !built.is_empty() {
        changes.push(format!(
            "built {} concurrently (inserts and updates went on meanwhile)",
            built.join(", ")
        ));
    }
    Ok(())
}

/// A partition's index name: `<partition>_<suffix>`, cut to PostgreSQL's
/// 63 bytes with a hash of the whole so two long names stay apart.
pub(super) fn child_index_name(partition: &str, suffix: &str) -> String {
    let full = format!("{partition}_{suffix}");
    if full.len() <= 63 {
        return full;
    }
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut cut = 63 - 9;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{:08x}", &full[..cut], hash as u32)
}

/// Whether the index `qualified` is valid; `None` when it does not exist.
async fn index_valid(client: &Client, qualified: &str) -> Result<Option<bool>, AdoptError> {
    Ok(client
        .query_opt(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
            &[&qualified],
        )
        .await
        .map_err(db("reading an index"))?
        .map(|r| r.get(0)))
}

/// `CREATE [UNIQUE] INDEX CONCURRENTLY` of `name` on `table` unless a
/// valid one exists (an invalid one, left by an interrupted build, is
/// dropped first). Returns whether it built one.
pub(super) async fn build_concurrently(
    client: &Client,
    schema: &str,
    name: &str,
    table: &str,
    definition: &str,
    unique: bool,
) -> Result<bool, AdoptError> {
    let index = format!("{}.{}", quote_ident(schema), quote_ident(name));
    match index_valid(client, &index).await? {
        Some(true) => return Ok(false),
        Some(false) => client
            .batch_execute(&format!("DROP INDEX CONCURRENTLY {index}"))
            .await
            .map_err(db("dropping an index an interrupted build left invalid"))?,
        None => {}
    }
    client
        .batch_execute(&format!(
            "CREATE {}INDEX CONCURRENTLY {} ON {table} {definition}",
            if unique { "UNIQUE " } else { "" },
            quote_ident(name)
        ))
        .await
        .map_err(db("building an index concurrently"))?;
    Ok(true)
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

#[cfg(test)]
mod tests {
    use super::child_index_name;

    #[test]
    fn partition_index_names_fit_postgres_and_stay_apart() {
        assert_eq!(
            child_index_name("outbox_2026_12", "pending_idx"),
            "outbox_2026_12_pending_idx"
        );
        let long = "a_very_long_partition_name_that_pg_partman_might_make_p20261203";
        let (a, b) = (
            child_index_name(long, "pending_idx"),
            child_index_name(&format!("{long}x"), "pending_idx"),
        );
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
    }
}
