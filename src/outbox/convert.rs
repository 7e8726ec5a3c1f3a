//! Converting an adopted, unpartitioned outbox table (the polling
//! framework's default table) into a partitioned one, online: the
//! application keeps inserting throughout, and a CDC relay keeps streaming.
//!
//! Nothing is copied. The table becomes the first partition of a new
//! partitioned table of the same name, covering every time up to a bound
//! `B` (the next period boundary at least a day ahead); pgoutbox's
//! partitions follow from `B` on, and the relay creates them ahead from
//! then on. The steps (docs/partitioning.md, "Converting a table"):
//!
//! 1. checks: an ordinary table pgoutbox adopted, `created_at timestamptz
//!    NOT NULL`, no identity column, no foreign key, view or rule on it,
//!    every unique index including `created_at` except the primary key,
//!    row-level security off, the status indexes built (adopt builds them);
//! 2. `CREATE UNIQUE INDEX CONCURRENTLY` on the primary key's columns plus
//!    `created_at` (what the partitioned table's key needs);
//! 3. `CHECK (created_at < B) NOT VALID`, then `VALIDATE` (a scan that does
//!    not block writes), so that attaching needs no scan under a lock;
//! 4. pgoutbox's partition functions (migration 10) in the schema;
//! 5. one short transaction, under `lock_timeout` and retried: the table
//!    renamed `<table>_legacy` (its indexes `…_legacy`), the unique index
//!    made a constraint, the partitioned table created `LIKE` it (defaults,
//!    checks, storage, comments) with the primary key `(…, created_at)` and
//!    the same indexes, owner, grants, triggers, sequence ownership and
//!    publication membership, and the old table attached `FROM (MINVALUE)
//!    TO (B)` — each index it has is attached to the parent's, none built;
//! 6. the partitions from `B` on, and the conversion recorded in
//!    `pgoutbox_migrations` as [`CONVERTED`], so the relay creates
//!    partitions ahead for this table.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::adopt::{build_concurrently, child_index_name, db, AdoptError, ADOPTED, STATUS_INDEXES};
use super::migrate::{render_for, MigrationTarget, MIGRATIONS};
use crate::config::{quote_ident, Config};

/// The `pgoutbox_migrations` version recording a table converted to a
/// partitioned one: its partitions are pgoutbox's to create.
pub const CONVERTED: i32 = -1;

/// How `convert` runs.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Only check and say what would be done.
    pub dry_run: bool,
    /// How long the swap may wait for the table's lock before it gives up
    /// and tries again (the application's inserts queue behind a waiting
    /// lock: keep it short).
    pub lock_timeout: Duration,
    /// How many times the swap is tried.
    pub attempts: u32,
}

/// What `convert` did (or would do, with `dry_run`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConvertReport {
    /// `schema.table`.
    pub table: String,
    /// The old table's name as the first partition.
    pub legacy_partition: String,
    /// The bound: the old table holds every `created_at` before it, RFC 3339.
    pub bound: String,
    /// What was done, in order, with timings.
    pub steps: Vec<String>,
    /// The swap's statements (what a dry run would execute).
    pub swap: Vec<String>,
    /// Swap attempts made (0 for a dry run).
    pub swap_attempts: u32,
    /// How long the table was locked by the swap that committed, ms.
    pub swap_ms: Option<f64>,
    /// Nothing was changed.
    pub dry_run: bool,
}

fn refused(text: impl Into<String>) -> AdoptError {
    AdoptError::Refused(text.into())
}

/// One index of the table as found before the swap.
struct IndexDef {
    name: String,
    definition: String,
    /// Backs the primary key.
    primary: bool,
    /// Backs a constraint (primary key, unique, exclusion).
    constraint: bool,
}

/// Everything the swap needs, read before it.
struct Found {
    owner: String,
    grants: Vec<String>,
    primary_key: Vec<String>,
    indexes: Vec<IndexDef>,
    triggers: Vec<(String, String)>,
    sequences: Vec<(String, String)>,
    publications: Vec<String>,
}

/// Converts the configured outbox table (see the module's documentation).
pub async fn convert(
    client: &mut Client,
    config: &Config,
    options: &ConvertOptions,
) -> Result<ConvertReport, AdoptError> {
    let target = MigrationTarget::from_config(config);
    let schema = quote_ident(&config.outbox.schema);
    let name = format!("{}.{}", config.outbox.schema, config.outbox.table);
    let t = format!("{schema}.{}", quote_ident(&config.outbox.table));
    let legacy_name = child_index_name(&config.outbox.table, "legacy");
    let legacy = format!("{schema}.{}", quote_ident(&legacy_name));
    let found = check(client, config, &t, &name, &legacy_name).await?;
    let step = match config.partitions.interval.as_str() {
        "daily" => "day",
        _ => "month",
    };
    // The next period boundary at least a day ahead (UTC, as pgoutbox names
    // its partitions): rows inserted while the conversion runs, stamped
    // now(), stay below it.
    let bound: String = client
        .query_one(
            "SELECT to_char((date_trunc($1, (now() + interval '1 day') AT TIME ZONE 'UTC') \
                     + ('1 ' || $1)::interval), 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
            &[&step],
        )
        .await
        .map_err(db("computing the bound"))?
        .get(0);
    let key_index = child_index_name(&config.outbox.table, "partition_key");
    let check_name = child_index_name(&config.outbox.table, "convert_bound");
    let swap = swap_statements(
        config,
        &t,
        &legacy,
        &legacy_name,
        &found,
        &key_index,
        &check_name,
        &bound,
    );
    let mut report = ConvertReport {
        table: name.clone(),
        legacy_partition: format!("{}.{legacy_name}", config.outbox.schema),
        bound: bound.clone(),
        steps: Vec::new(),
        swap: swap.clone(),
        swap_attempts: 0,
        swap_ms: None,
        dry_run: options.dry_run,
    };
    if options.dry_run {
        return Ok(report);
    }

    // 2. The unique index the partitioned table's key needs.
    let started = Instant::now();
    let columns: Vec<String> = found
        .primary_key
        .iter()
        .chain(std::iter::once(&"created_at".to_owned()))
        .map(|c| quote_ident(c))
        .collect();
    if build_concurrently(
        client,
        &config.outbox.schema,
        &key_index,
        &t,
        &format!("({})", columns.join(", ")),
        true,
    )
    .await?
    {
        report.steps.push(format!(
            "built {key_index} concurrently ({:.1} s)",
            started.elapsed().as_secs_f64()
        ));
    }

    // 3. The bound, checked without blocking writes.
    let started = Instant::now();
    let lock = format!(
        "SET lock_timeout = '{}ms'",
        options.lock_timeout.as_millis()
    );
    client
        .batch_execute(&format!(
            "{lock}; ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {c}; \
             ALTER TABLE {t} ADD CONSTRAINT {c} CHECK (created_at < '{bound}') NOT VALID; RESET lock_timeout",
            c = quote_ident(&check_name)
        ))
        .await
        .map_err(db("adding the bound's CHECK constraint (NOT VALID)"))?;
    client
        .batch_execute(&format!(
            "ALTER TABLE {t} VALIDATE CONSTRAINT {}",
            quote_ident(&check_name)
        ))
        .await
        .map_err(db("validating the bound's CHECK constraint"))?;
    report.steps.push(format!(
        "checked created_at < {bound} ({:.1} s)",
        started.elapsed().as_secs_f64()
    ));

    // 4. pgoutbox's partition functions.
    let lifecycle = MIGRATIONS
        .iter()
        .find(|(v, _, _)| *v == 10)
        .map(|(_, _, sql)| *sql)
        .expect("migration 10 exists");
    client
        .batch_execute(&render_for(&target, lifecycle))
        .await
        .map_err(db("installing pgoutbox's partition functions"))?;

    // 5. The swap.
    let mut attempt = 0;
    loop {
        attempt += 1;
        report.swap_attempts = attempt;
        let started = Instant::now();
        let tx = client
            .transaction()
            .await
            .map_err(db("starting the swap"))?;
        let outcome = async {
            tx.batch_execute(&format!(
                "SET LOCAL lock_timeout = '{}ms'",
                options.lock_timeout.as_millis()
            ))
            .await?;
            for statement in &swap {
                tx.batch_execute(statement).await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        }
        .await;
        match outcome {
            Ok(()) => {
                tx.commit().await.map_err(db("committing the swap"))?;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                report.swap_ms = Some(ms);
                report.steps.push(format!(
                    "swapped in one transaction ({ms:.0} ms under the table's lock, attempt {attempt})"
                ));
                break;
            }
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
                    && attempt < options.attempts =>
            {
                drop(tx);
                tracing::warn!(
                    attempt,
                    "the outbox's lock was not granted in time; trying the swap again"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(db("swapping the table for the partitioned one")(e)),
        }
    }

    // 6. The partitions from the bound on, and the record.
    let created: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.pgoutbox_create_partitions($1::text::regclass, $2, $3, now())"
            ),
            &[&t, &(config.partitions.ahead as i32), &config.partitions.interval.as_str()],
        )
        .await
        .map_err(db("creating the partitions ahead"))?
        .get(0);
    report
        .steps
        .push(format!("created {created} partitions ahead"));
    client
        .execute(
            "INSERT INTO public.pgoutbox_migrations (target, version, name) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
            &[
                &target.key(),
                &CONVERTED,
                &"converted to a partitioned table (pgoutbox partitions convert)",
            ],
        )
        .await
        .map_err(db("recording the conversion"))?;
    Ok(report)
}

/// Step 1: what the table is, and whether it can be converted.
async fn check(
    client: &Client,
    config: &Config,
    t: &str,
    name: &str,
    legacy_name: &str,
) -> Result<Found, AdoptError> {
    let row = client
        .query_opt(
            "SELECT c.relkind::text, c.relrowsecurity, pg_get_userbyid(c.relowner)::text, \
                    c.relispartition OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid OR i.inhparent = c.oid) \
               FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&t],
        )
        .await
        .map_err(db("reading the table"))?
        .ok_or_else(|| refused(format!("the outbox table {name} does not exist")))?;
    let (kind, rls, owner, inherits): (String, bool, String, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if kind == "p" {
        return Err(refused(format!(
            "{name} is already partitioned: nothing to convert"
        )));
    }
    if kind != "r" || inherits {
        return Err(refused(format!(
            "{name} is not a plain table (a view, a partition or an inheritance parent or child): only a plain table is converted"
        )));
    }
    let adopted = client
        .query_opt(
            "SELECT 1 FROM public.pgoutbox_migrations WHERE target = $1 AND version = $2",
            &[&name, &ADOPTED],
        )
        .await
        .ok()
        .flatten()
        .is_some();
    if !adopted {
        return Err(refused(format!(
            "{name} was not adopted: run `pgoutbox adopt` first (it checks the table and builds its status indexes concurrently)"
        )));
    }
    if rls {
        return Err(refused(format!(
            "{name} has row-level security enabled: its policies are not carried over; convert it by hand (docs/partitioning.md)"
        )));
    }
    let legacy_exists = client
        .query_one(
            "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
            &[&config.outbox.schema, &legacy_name],
        )
        .await
        .map_err(db("reading the legacy name"))?
        .get::<_, bool>(0);
    if legacy_exists {
        return Err(refused(format!(
            "{}.{legacy_name} exists already: the old table takes that name; rename or drop it first",
            config.outbox.schema
        )));
    }
    let created_at = client
        .query_opt(
            "SELECT format_type(atttypid, atttypmod), attnotnull FROM pg_attribute \
              WHERE attrelid = to_regclass($1) AND attname = 'created_at' AND NOT attisdropped",
            &[&t],
        )
        .await
        .map_err(db("reading created_at"))?;
    match created_at.map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1))) {
        Some((ty, true)) if ty == "timestamp with time zone" => {}
        Some((ty, notnull)) => {
            return Err(refused(format!(
                "{name}.created_at is {ty}{}: the partition key must be timestamptz NOT NULL",
                if notnull { "" } else { " and nullable" }
            )))
        }
        None => {
            return Err(refused(format!(
                "{name} has no created_at column: the partition key is created_at"
            )))
        }
    }
    let identity: Vec<String> = client
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) \
              AND attidentity <> '' AND NOT attisdropped",
            &[&t],
        )
        .await
        .map_err(db("reading identity columns"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !identity.is_empty() {
        return Err(refused(format!(
            "{name} has identity columns ({}): the conversion keeps serial columns' sequences but not identities; use a sequence default (bigserial) or convert by hand",
            identity.join(", ")
        )));
    }
    let blockers: Vec<String> = client
        .query(
            "SELECT 'foreign key ' || conname FROM pg_constraint \
              WHERE contype = 'f' AND (conrelid = to_regclass($1) OR confrelid = to_regclass($1)) \
             UNION ALL \
             SELECT DISTINCT 'view or rule ' || r.ev_class::regclass::text FROM pg_depend d \
               JOIN pg_rewrite r ON r.oid = d.objid \
              WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = to_regclass($1) \
                AND r.ev_class <> to_regclass($1)",
            &[&t],
        )
        .await
        .map_err(db("reading what depends on the table"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !blockers.is_empty() {
        return Err(refused(format!(
            "{name} is referenced by {}: they would keep pointing at the old table; drop them, convert, and recreate them",
            blockers.join(", ")
        )));
    }
    let indexes = client
        .query(
            "SELECT c.relname::text, pg_get_indexdef(i.indexrelid), i.indisprimary, \
                    EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid), \
                    i.indisunique, i.indisvalid, \
                    EXISTS (SELECT 1 FROM unnest(i.indkey) a JOIN pg_attribute t \
                              ON t.attrelid = i.indrelid AND t.attnum = a WHERE t.attname = 'created_at'), \
                    ARRAY(SELECT t.attname::text FROM unnest(i.indkey) WITH ORDINALITY AS k(a, n) \
                            JOIN pg_attribute t ON t.attrelid = i.indrelid AND t.attnum = k.a ORDER BY k.n) \
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
              WHERE i.indrelid = to_regclass($1) ORDER BY c.relname",
            &[&t],
        )
        .await
        .map_err(db("reading the table's indexes"))?;
    let key_index = child_index_name(&config.outbox.table, "partition_key");
    let mut found_indexes = Vec::new();
    let mut primary_key = Vec::new();
    for r in &indexes {
        let (idx, def, primary, constraint, unique, valid, has_created_at, cols): (
            String,
            String,
            bool,
            bool,
            bool,
            bool,
            bool,
            Vec<String>,
        ) = (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
            r.get(7),
        );
        if idx == key_index {
            continue;
        }
        if !valid {
            return Err(refused(format!(
                "index {idx} is invalid (an interrupted CREATE INDEX CONCURRENTLY): drop it or rebuild it first"
            )));
        }
        if primary {
            primary_key = cols;
        } else if unique && !has_created_at {
            return Err(refused(format!(
                "unique index {idx} does not include created_at: a partitioned table can only enforce uniqueness that includes the partition key; replace it with one that does, or keep the table unpartitioned"
            )));
        } else if constraint {
            return Err(refused(format!(
                "index {idx} backs a constraint other than the primary key: drop the constraint (keep a unique index including created_at) or convert by hand"
            )));
        }
        found_indexes.push(IndexDef {
            name: idx,
            definition: def,
            primary,
            constraint,
        });
    }
    if primary_key.is_empty() {
        return Err(refused(format!(
            "{name} has no primary key: the partitioned table's key is the primary key's columns and created_at"
        )));
    }
    let has_status = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'status' AND NOT attisdropped)",
            &[&t],
        )
        .await
        .map_err(db("reading the status column"))?
        .get::<_, bool>(0);
    if has_status {
        for (suffix, _, _) in STATUS_INDEXES {
            let want = format!("{}_{suffix}", config.outbox.table);
            if !found_indexes.iter().any(|i| i.name == want) {
                return Err(refused(format!(
                    "{name} lacks the status index {want}: run `pgoutbox adopt` first (it builds them concurrently)"
                )));
            }
        }
    }
    let grants = client
        .query(
            "SELECT a.privilege_type, CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END, \
                    a.is_grantable, NULL::text \
               FROM pg_class c, aclexplode(c.relacl) a \
              WHERE c.oid = to_regclass($1) AND a.grantee <> c.relowner \
             UNION ALL \
             SELECT a.privilege_type, CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END, \
                    a.is_grantable, quote_ident(t.attname) \
               FROM pg_attribute t, aclexplode(t.attacl) a \
              WHERE t.attrelid = to_regclass($1) AND t.attacl IS NOT NULL AND NOT t.attisdropped",
            &[&t],
        )
        .await
        .map_err(db("reading the table's grants"))?
        .iter()
        .map(|r| {
            let (privilege, grantee, grantable, column): (String, String, bool, Option<String>) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            // Column privileges (the relay role's UPDATE of its marks) are
            // granted per column, as they were.
            let column = column.map(|c| format!(" ({c})")).unwrap_or_default();
            format!(
                "GRANT {privilege}{column} ON {t} TO {grantee}{}",
                if grantable { " WITH GRANT OPTION" } else { "" }
            )
        })
        .collect();
    let triggers = client
        .query(
            "SELECT tgname::text, pg_get_triggerdef(oid) FROM pg_trigger \
              WHERE tgrelid = to_regclass($1) AND NOT tgisinternal ORDER BY tgname",
            &[&t],
        )
        .await
        .map_err(db("reading the table's triggers"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let sequences = client
        .query(
            "SELECT a.attname::text, pg_get_serial_sequence($1, a.attname) FROM pg_attribute a \
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
                AND pg_get_serial_sequence($1, a.attname) IS NOT NULL",
            &[&t],
        )
        .await
        .map_err(db("reading the table's sequences"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let publications = client
        .query(
            "SELECT quote_ident(p.pubname) FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
              WHERE r.prrelid = to_regclass($1) ORDER BY 1",
            &[&t],
        )
        .await
        .map_err(db("reading the table's publications"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Found {
        owner,
        grants,
        primary_key,
        indexes: found_indexes,
        triggers,
        sequences,
        publications,
    })
}

/// Step 5's statements, in order (run in one transaction).
#[allow(clippy::too_many_arguments)]
fn swap_statements(
    config: &Config,
    t: &str,
    legacy: &str,
    legacy_name: &str,
    found: &Found,
    key_index: &str,
    check_name: &str,
    bound: &str,
) -> Vec<String> {
    let schema = quote_ident(&config.outbox.schema);
    let mut out = vec![
        format!("LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE"),
        format!("ALTER TABLE {t} RENAME TO {}", quote_ident(legacy_name)),
    ];
    // The old table's indexes make room for the parent's, which take
    // their names.
    for index in found
        .indexes
        .iter()
        .map(|i| i.name.as_str())
        .chain(std::iter::once(key_index))
    {
        out.push(format!(
            "ALTER INDEX {schema}.{} RENAME TO {}",
            quote_ident(index),
            quote_ident(&child_index_name(index, "legacy"))
        ));
    }
    // The new unique index becomes the old table's primary key, the one the
    // parent's is attached to (PostgreSQL 18 makes the parent's key a
    // primary key of the partition, and a table has only one).
    let legacy_key = child_index_name(key_index, "legacy");
    if let Some(pk) = found.indexes.iter().find(|i| i.primary) {
        out.push(format!(
            "ALTER TABLE {legacy} DROP CONSTRAINT {}",
            quote_ident(&child_index_name(&pk.name, "legacy"))
        ));
    }
    out.push(format!(
        "ALTER TABLE {legacy} ADD CONSTRAINT {k} PRIMARY KEY USING INDEX {k}",
        k = quote_ident(&legacy_key)
    ));
    out.push(format!(
        "CREATE TABLE {t} (LIKE {legacy} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED \
         INCLUDING STORAGE INCLUDING COMMENTS) PARTITION BY RANGE (created_at)"
    ));
    out.push(format!(
        "ALTER TABLE {t} DROP CONSTRAINT {}",
        quote_ident(check_name)
    ));
    let pk: Vec<String> = found
        .primary_key
        .iter()
        .filter(|c| c.as_str() != "created_at")
        .chain(std::iter::once(&"created_at".to_owned()))
        .map(|c| quote_ident(c))
        .collect();
    let pk_name = found
        .indexes
        .iter()
        .find(|i| i.primary)
        .map(|i| i.name.clone())
        .unwrap_or_else(|| format!("{}_pkey", config.outbox.table));
    out.push(format!(
        "ALTER TABLE {t} ADD CONSTRAINT {} PRIMARY KEY ({})",
        quote_ident(&pk_name),
        pk.join(", ")
    ));
    // The same indexes on the parent (read before the rename, so their
    // definitions name the parent): attaching the old table then attaches
    // its equivalent ones instead of building any.
    for index in found.indexes.iter().filter(|i| !i.constraint) {
        out.push(index.definition.clone());
    }
    out.push(format!(
        "ALTER TABLE {t} OWNER TO {}",
        quote_ident(&found.owner)
    ));
    out.extend(found.grants.iter().cloned());
    for (column, sequence) in &found.sequences {
        out.push(format!(
            "ALTER SEQUENCE {sequence} OWNED BY {t}.{}",
            quote_ident(column)
        ));
    }
    // A row trigger of a partitioned table is cloned onto each partition:
    // the old table's own goes, the parent's clone replaces it.
    for (name, definition) in &found.triggers {
        out.push(format!("DROP TRIGGER {} ON {legacy}", quote_ident(name)));
        out.push(definition.clone());
    }
    for publication in &found.publications {
        out.push(format!(
            "ALTER PUBLICATION {publication} DROP TABLE {legacy}"
        ));
        out.push(format!("ALTER PUBLICATION {publication} ADD TABLE {t}"));
    }
    out.push(format!(
        "ALTER TABLE {t} ATTACH PARTITION {legacy} FOR VALUES FROM (MINVALUE) TO ('{bound}')"
    ));
    out.push(format!(
        "ALTER TABLE {legacy} DROP CONSTRAINT {}",
        quote_ident(check_name)
    ));
    out
}
