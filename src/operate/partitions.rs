//! The outbox's partition lifecycle (docs/partitioning.md): partitions
//! created ahead of time, and old ones retired (archived, detached and
//! dropped) once every row in them is done.
//!
//! **Ahead.** `<schema>.pgoutbox_create_partitions(parent, ahead, step, at)`
//! (migration 10) creates the partition of the period holding `at` and the
//! `ahead` periods after it, monthly or daily, never overlapping an existing
//! range: a period that existing partitions cover in part starts where the
//! last of them ends. `pgoutbox partitions maintain` calls it with its clock
//! (the server's, or a fake one in tests); the relay calls
//! `pgoutbox_ensure_partitions(parent, ahead, step)`, which passes the
//! server's `now()`, at start and every `partitions.maintain_interval_s`.
//!
//! **Retention** (`partitions.retain`, maintain only). A partition whose
//! whole range ends at or before `now - retain` is retired when none of its
//! rows is `PENDING`, `PROCESSING` or `FAILED`, and its `DEAD_LETTER` rows
//! are archived: that is, written to the archive file of this run
//! (`--archive-dir`); without an archive, a partition holding dead letters is
//! kept until they are redriven or skipped (`pgoutbox dle`). Each partition
//! is retired in one transaction:
//!
//! 1. `ALTER TABLE <outbox> DETACH PARTITION <p>` under `lock_timeout`: it
//!    takes `ACCESS EXCLUSIVE` on the outbox and on the partition, so from
//!    here on no row can arrive in it or change in it, neither through the
//!    outbox (an application inserting an old `created_at`, a status update)
//!    nor by naming the partition;
//! 2. the rows are counted by status (the partial indexes on `PENDING`,
//!    `PROCESSING`, `FAILED` and `DEAD_LETTER` make it cheap); any blocker
//!    rolls the transaction back, which re-attaches it as it was;
//! 3. with an archive: every row is exported (`row_to_json`, one per line,
//!    gzip) to `<name>.partial`, fsynced, renamed to its final name and the
//!    directory fsynced; any failure rolls back, so nothing is dropped;
//! 4. `DROP TABLE <p>`, `COMMIT`.
//!
//! Not `DETACH … CONCURRENTLY`: it cannot run inside a transaction, so the
//! check could not be in the transaction that detaches, and an interrupted
//! one leaves the partition "detach pending". The price of the plain form is
//! that the outbox is locked while a retired partition is checked and
//! exported; a partition expected to be kept is found by a first check
//! without any lock and never locked at all.

mod archive;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio_postgres::{Client, IsolationLevel};

use crate::config::{quote_ident, Config, PartitionInterval};
use crate::error::{postgres_text, Error};
use crate::outbox::partitioning::parent;
use archive::{archive, archive_path, check_archive_dir};

/// The time maintenance runs at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Clock {
    /// The database server's `now()`.
    #[default]
    Server,
    /// A fixed instant (tests, or replaying a missed run).
    Fixed(SystemTime),
}

impl Clock {
    /// The SQL parameter: `NULL` stands for the server's `now()`.
    fn param(&self) -> Option<SystemTime> {
        match self {
            Clock::Server => None,
            Clock::Fixed(t) => Some(*t),
        }
    }
}

/// `to_char` of a timestamptz expression as RFC 3339 UTC, `NULL` for
/// `NULL` and ±infinity.
pub(crate) fn rfc3339(expr: &str) -> String {
    format!(
        "CASE WHEN isfinite({expr}) THEN to_char(({expr}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') END"
    )
}

/// The partitions of `$1` (the outbox, as text castable to regclass), one
/// row each: `oid`, `nspname`, `relname`, `reltuples`, `is_default`, `lo`,
/// `hi` (timestamptz; `NULL` for the default partition, ±infinity for
/// MINVALUE / MAXVALUE). Independent of migration 10, so `status` works on
/// any migrated table.
pub(crate) const BOUNDS_SQL: &str = "\
WITH b AS (
  SELECT c.oid, n.nspname, c.relname, c.reltuples,
         pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' AS is_default,
         regexp_match(pg_get_expr(c.relpartbound, c.oid), '^FOR VALUES FROM \\((.*)\\) TO \\((.*)\\)$') AS m
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE i.inhparent = $1::text::regclass
)
SELECT oid, nspname, relname, reltuples, is_default,
       CASE WHEN m IS NULL THEN NULL WHEN m[1] = 'MINVALUE' THEN '-infinity'::timestamptz
            ELSE btrim(m[1], '''')::timestamptz END AS lo,
       CASE WHEN m IS NULL THEN NULL WHEN m[2] = 'MAXVALUE' THEN 'infinity'::timestamptz
            ELSE btrim(m[2], '''')::timestamptz END AS hi
  FROM b";

/// How `maintain` runs.
#[derive(Clone, Debug)]
pub struct MaintainOptions {
    /// Export each retired partition to a gzip JSON-lines file here first
    /// (created if missing); retiring a partition with dead letters needs it.
    pub archive_dir: Option<PathBuf>,
    /// Report what would be created and retired; change nothing.
    pub dry_run: bool,
    /// How long to wait for the outbox's lock before giving up on a
    /// partition (it is kept, and tried again next run).
    pub lock_timeout: Duration,
    /// The time to maintain at.
    pub clock: Clock,
}

impl Default for MaintainOptions {
    fn default() -> Self {
        MaintainOptions {
            archive_dir: None,
            dry_run: false,
            lock_timeout: Duration::from_secs(5),
            clock: Clock::Server,
        }
    }
}

/// A partition created (or, in a dry run, that would be).
#[derive(Clone, Debug, Serialize)]
pub struct Created {
    /// Its name (in the outbox's schema).
    pub name: String,
    /// Start of its range (inclusive), RFC 3339 UTC.
    pub range_start: String,
    /// End of its range (exclusive), RFC 3339 UTC.
    pub range_end: String,
}

/// A partition retired (or, in a dry run, that would be).
#[derive(Clone, Debug, Serialize)]
pub struct Retired {
    /// `schema.name`.
    pub name: String,
    /// Start of its range, RFC 3339 UTC (`null`: MINVALUE).
    pub range_start: Option<String>,
    /// End of its range, RFC 3339 UTC.
    pub range_end: Option<String>,
    /// Its `DEAD_LETTER` rows (archived with the rest).
    pub dead_letter: i64,
    /// The archive file written, if any.
    pub archive: Option<String>,
    /// Rows written to the archive (`null` without one).
    pub archived_rows: Option<u64>,
}

/// A retention candidate that was kept, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Kept {
    /// `schema.name`.
    pub name: String,
    /// Start of its range, RFC 3339 UTC.
    pub range_start: Option<String>,
    /// End of its range, RFC 3339 UTC.
    pub range_end: Option<String>,
    /// Why, in a sentence.
    pub reason: String,
    /// Rows still `PENDING`.
    pub pending: i64,
    /// Rows still `PROCESSING`.
    pub processing: i64,
    /// Rows `FAILED` (waiting for a retry by a poller).
    pub failed: i64,
    /// Rows `DEAD_LETTER`.
    pub dead_letter: i64,
}

/// What `maintain` did.
#[derive(Clone, Debug, Serialize)]
pub struct MaintainReport {
    /// `schema.table`.
    pub table: String,
    /// The clock's time, RFC 3339 UTC.
    pub now: String,
    /// True when nothing was changed.
    pub dry_run: bool,
    /// `monthly` or `daily`.
    pub interval: PartitionInterval,
    /// Periods kept ready after the current one.
    pub ahead: u32,
    /// `partitions.retain` as configured (`null`: retention off).
    pub retain: Option<String>,
    /// Partitions whose range ends at or before this are retired (`null`:
    /// retention off).
    pub cutoff: Option<String>,
    /// Partitions created.
    pub created: Vec<Created>,
    /// Partitions retired.
    pub retired: Vec<Retired>,
    /// Retention candidates kept.
    pub kept: Vec<Kept>,
    /// What stopped the run early (nothing was dropped for the partition
    /// it names); `null` when it completed.
    pub error: Option<String>,
}

struct Candidate {
    qualified: String,
    display: String,
    range_start: Option<String>,
    range_end: Option<String>,
    compact_start: String,
    compact_end: String,
}

#[derive(Default)]
struct Counts {
    pending: i64,
    processing: i64,
    failed: i64,
    dead_letter: i64,
}

impl Counts {
    fn blocked(&self, archiving: bool) -> Option<String> {
        if self.pending + self.processing + self.failed > 0 {
            return Some(format!(
                "holds rows not yet delivered ({} PENDING, {} PROCESSING, {} FAILED)",
                self.pending, self.processing, self.failed
            ));
        }
        if self.dead_letter > 0 && !archiving {
            return Some(format!(
                "holds {} DEAD_LETTER rows and no --archive-dir was given: redrive or skip them (pgoutbox dle), or retire it with --archive-dir so they are archived",
                self.dead_letter
            ));
        }
        None
    }
}

/// `lock_timeout` as a setting value, at least 1 ms (0 would mean none).
fn lock_timeout_setting(d: Duration) -> String {
    format!("{}ms", d.as_millis().clamp(1, i32::MAX as u128))
}

/// `lock_timeout` for the rest of the transaction `tx`.
async fn set_lock_timeout(tx: &tokio_postgres::Transaction<'_>, d: Duration) -> Result<(), Error> {
    tx.execute(
        "SELECT set_config('lock_timeout', $1, true)",
        &[&lock_timeout_setting(d)],
    )
    .await
    .map_err(db("setting lock_timeout"))?;
    Ok(())
}

fn db(doing: &str) -> impl FnOnce(tokio_postgres::Error) -> Error + '_ {
    move |e| Error::postgres(doing, &e)
}

/// Creates partitions ahead and, with `partitions.retain`, retires the old
/// ones (see the module documentation). Run by an administrator: the table's
/// owner or a superuser. A failure on one partition stops the run and is in
/// [`MaintainReport::error`]: nothing is dropped for that partition, and
/// what was done before stays done.
pub async fn maintain(
    client: &mut Client,
    config: &Config,
    options: &MaintainOptions,
) -> Result<MaintainReport, Error> {
    let retain = config.partitions.retain()?;
    let table = format!("{}.{}", config.outbox.schema, config.outbox.table);
    let parent = parent(config);
    if let Some(dir) = &options.archive_dir {
        if !options.dry_run {
            check_archive_dir(dir)?;
        }
    }
    require_partitioned(client, config, &table, &parent).await?;
    take_maintenance_lock(client, &table).await?;
    let (now_text, now) = read_clock(client, options.clock).await?;
    let mut report = MaintainReport {
        table,
        now: now_text,
        dry_run: options.dry_run,
        interval: config.partitions.interval,
        ahead: config.partitions.ahead,
        retain: retain.and(config.partitions.retain.clone()),
        cutoff: None,
        created: vec![],
        retired: vec![],
        kept: vec![],
        error: None,
    };
    // 1. Ahead.
    report.created = create_ahead(client, config, &parent, now, options).await?;
    // 2. Retention.
    let Some(retain) = retain else {
        return Ok(report);
    };
    // Delivered rows still in the delivery journal would count as PENDING
    // and keep their partition (ARCHITECTURE.md, invariant 14).
    if !options.dry_run {
        crate::outbox::journal::fold_all(client, &config.outbox.schema, &config.outbox.table)
            .await
            .map_err(db("folding the delivery journal"))?;
    }
    let (cutoff_text, cutoff) = retention_cutoff(client, now, retain).await?;
    report.cutoff = cutoff_text;
    let candidates = retention_candidates(client, &parent, cutoff).await?;
    retire_candidates(client, config, &parent, candidates, options, &mut report).await?;
    Ok(report)
}

/// Refuses a table that does not exist or is not partitioned, saying what
/// the partition lifecycle needs (relaying does not need partitions).
async fn require_partitioned(
    client: &Client,
    config: &Config,
    table: &str,
    parent: &str,
) -> Result<(), Error> {
    let kind: Option<i8> = client
        .query_one(
            "SELECT (SELECT relkind FROM pg_class WHERE oid = to_regclass($1))",
            &[&parent],
        )
        .await
        .map_err(db("reading the outbox table's kind"))?
        .get(0);
    match kind.map(|k| k as u8) {
        Some(b'p') => {
            let creator = crate::outbox::partitioning::creator(client, config)
                .await
                .map_err(db("reading who creates the partitions"))?;
            if creator == crate::outbox::partitioning::Creator::Pgoutbox {
                return Ok(());
            }
            Err(Error::Fatal(format!(
                "{table} is partitioned outside pgoutbox (an adopted table: pg_partman, the polling framework or your own scheme makes its partitions, and the relay leaves them to it): keep creating and retiring them with that tool; `pgoutbox partitions maintain` serves the tables whose partitions pgoutbox makes (`pgoutbox migrate` created them, or `pgoutbox partitions convert` made them partitioned)"
            )))
        }
        Some(_) => Err(Error::Fatal(format!(
            "{table} is not partitioned: the partition lifecycle (partitions ahead, retention) needs a table partitioned by range on created_at (`pgoutbox partitions convert` makes this one partitioned online); relaying, marking and poll mode do not"
        ))),
        None => Err(Error::Fatal(format!(
            "{table} does not exist: run `pgoutbox migrate` (or `pgoutbox adopt` for a table of your own)"
        ))),
    }
}

/// Takes the session-level advisory lock that allows one maintain per table
/// at a time (it ends with the session); refuses when another run holds it.
async fn take_maintenance_lock(client: &Client, table: &str) -> Result<(), Error> {
    let got: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended('pgoutbox_maintain ' || $1, 0))",
            &[&table],
        )
        .await
        .map_err(db("taking the maintenance lock"))?
        .get(0);
    if !got {
        return Err(Error::Fatal(format!(
            "another `pgoutbox partitions maintain` is running on {table}; try again when it has finished"
        )));
    }
    Ok(())
}

/// The clock's time, as RFC 3339 UTC text and as a timestamp.
async fn read_clock(client: &Client, clock: Clock) -> Result<(String, SystemTime), Error> {
    let at = clock.param();
    let now_row = client
        .query_one(
            &format!(
                "SELECT {}, coalesce($1::timestamptz, now())",
                rfc3339("coalesce($1::timestamptz, now())")
            ),
            &[&at],
        )
        .await
        .map_err(db("reading the clock"))?;
    Ok((now_row.get(0), now_row.get(1)))
}

/// Creates the partitions of the period holding `now` and the configured
/// periods ahead, in one transaction (rolled back in a dry run).
async fn create_ahead(
    client: &mut Client,
    config: &Config,
    parent: &str,
    now: SystemTime,
    options: &MaintainOptions,
) -> Result<Vec<Created>, Error> {
    let schema = quote_ident(&config.outbox.schema);
    let create_sql = format!(
        "SELECT partition_name, {}, {} FROM {schema}.pgoutbox_create_partitions($1::text::regclass, $2, $3, $4)",
        rfc3339("range_start"),
        rfc3339("range_end")
    );
    let ahead = config.partitions.ahead as i32;
    let step = config.partitions.interval.as_str();
    let tx = client
        .transaction()
        .await
        .map_err(db("starting a transaction"))?;
    // Creating a partition locks the outbox (ACCESS EXCLUSIVE) for an
    // instant: wait for it no longer than for a retirement.
    set_lock_timeout(&tx, options.lock_timeout).await?;
    let rows = tx
        .query(&create_sql, &[&parent, &ahead, &step, &now])
        .await
        .map_err(db("creating partitions ahead"))?;
    let created = rows
        .iter()
        .map(|r| Created {
            name: r.get(0),
            range_start: r.get(1),
            range_end: r.get(2),
        })
        .collect();
    if options.dry_run {
        tx.rollback().await.map_err(db("rolling back"))?;
    } else {
        tx.commit()
            .await
            .map_err(db("committing the new partitions"))?;
    }
    Ok(created)
}

/// `now - retain`, as RFC 3339 UTC text and as a timestamp.
async fn retention_cutoff(
    client: &Client,
    now: SystemTime,
    retain: Duration,
) -> Result<(Option<String>, SystemTime), Error> {
    let secs = retain.as_secs_f64();
    let cutoff_sql = format!(
        "SELECT {}, $1::timestamptz - make_interval(secs => $2::float8)",
        rfc3339("$1::timestamptz - make_interval(secs => $2::float8)")
    );
    let row = client
        .query_one(&cutoff_sql, &[&now, &secs])
        .await
        .map_err(db("computing the retention cutoff"))?;
    Ok((row.get(0), row.get(1)))
}

/// The partitions (not the default one) whose range ends at or before
/// `cutoff`, oldest first.
async fn retention_candidates(
    client: &Client,
    parent: &str,
    cutoff: SystemTime,
) -> Result<Vec<Candidate>, Error> {
    let candidates_sql = format!(
        "SELECT nspname, relname, {}, {}, \
                coalesce(to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD\"T\"HH24MISS\"Z\"'), 'min'), \
                to_char(hi AT TIME ZONE 'UTC', 'YYYYMMDD\"T\"HH24MISS\"Z\"') \
           FROM ({BOUNDS_SQL}) p \
          WHERE NOT is_default AND hi <= $2 \
          ORDER BY lo, relname",
        rfc3339("lo"),
        rfc3339("hi"),
    );
    Ok(client
        .query(&candidates_sql, &[&parent, &cutoff])
        .await
        .map_err(db("listing the partitions"))?
        .into_iter()
        .map(|r| {
            let (nsp, rel): (String, String) = (r.get(0), r.get(1));
            Candidate {
                qualified: format!("{}.{}", quote_ident(&nsp), quote_ident(&rel)),
                display: format!("{nsp}.{rel}"),
                range_start: r.get(2),
                range_end: r.get(3),
                compact_start: r
                    .get::<_, Option<String>>(4)
                    .unwrap_or_else(|| "min".into()),
                compact_end: r.get(5),
            }
        })
        .collect())
}

/// Retires (or, in a dry run, reports) each candidate in turn, keeping
/// those that must be kept; the first failure ends the run and goes in
/// [`MaintainReport::error`].
async fn retire_candidates(
    client: &mut Client,
    config: &Config,
    parent: &str,
    candidates: Vec<Candidate>,
    options: &MaintainOptions,
    report: &mut MaintainReport,
) -> Result<(), Error> {
    let archiving = options.archive_dir.is_some();
    for c in candidates {
        // A first look without any lock: a partition that must be kept is
        // never locked.
        let counts = count_statuses(&*client, &c.qualified)
            .await
            .map_err(db("counting the rows of a partition by status"))?;
        if let Some(reason) = counts.blocked(archiving) {
            report.kept.push(kept(&c, reason, &counts));
            continue;
        }
        if options.dry_run {
            report
                .retired
                .push(would_retire(config, &c, &counts, options));
            continue;
        }
        match retire(client, config, parent, &c, options).await {
            Ok(Outcome::Retired(r)) => report.retired.push(r),
            Ok(Outcome::Kept(k)) => report.kept.push(k),
            Err(e) => {
                report.error = Some(retire_error(&c, &e));
                break;
            }
        }
    }
    Ok(())
}

/// What a dry run reports for a partition it would retire.
fn would_retire(
    config: &Config,
    c: &Candidate,
    counts: &Counts,
    options: &MaintainOptions,
) -> Retired {
    Retired {
        name: c.display.clone(),
        range_start: c.range_start.clone(),
        range_end: c.range_end.clone(),
        dead_letter: counts.dead_letter,
        archive: options
            .archive_dir
            .as_ref()
            .map(|d| archive_path(d, config, c).display().to_string()),
        archived_rows: None,
    }
}

/// [`MaintainReport::error`] for a failed retirement: only a failed commit
/// leaves it unknown whether the partition was dropped.
fn retire_error(c: &Candidate, e: &Error) -> String {
    let text = e.to_string();
    if text.starts_with("committing the retirement") {
        format!("{}: {text}", c.display)
    } else {
        format!("{}: {text}; nothing was dropped", c.display)
    }
}

enum Outcome {
    Retired(Retired),
    Kept(Kept),
}

fn kept(c: &Candidate, reason: String, counts: &Counts) -> Kept {
    Kept {
        name: c.display.clone(),
        range_start: c.range_start.clone(),
        range_end: c.range_end.clone(),
        reason,
        pending: counts.pending,
        processing: counts.processing,
        failed: counts.failed,
        dead_letter: counts.dead_letter,
    }
}

async fn count_statuses<C: tokio_postgres::GenericClient>(
    client: &C,
    partition: &str,
) -> Result<Counts, tokio_postgres::Error> {
    let count = |s: &str| format!("(SELECT count(*) FROM ONLY {partition} WHERE status = '{s}')");
    let sql = format!(
        "SELECT {}, {}, {}, {}",
        count("PENDING"),
        count("PROCESSING"),
        count("FAILED"),
        count("DEAD_LETTER")
    );
    let row = client.query_one(&sql, &[]).await?;
    Ok(Counts {
        pending: row.get(0),
        processing: row.get(1),
        failed: row.get(2),
        dead_letter: row.get(3),
    })
}

/// Retires one partition in one transaction (see the module documentation).
async fn retire(
    client: &mut Client,
    config: &Config,
    parent: &str,
    c: &Candidate,
    options: &MaintainOptions,
) -> Result<Outcome, Error> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(db("starting a transaction"))?;
    set_lock_timeout(&tx, options.lock_timeout).await?;
    // From here on nothing can add or change a row in the partition until
    // this transaction ends.
    let detached = tx
        .batch_execute(&format!(
            "ALTER TABLE {parent} DETACH PARTITION {}",
            c.qualified
        ))
        .await;
    if let Err(e) = detached {
        if e.code().map(|c| c.code()) == Some("55P03") {
            let _ = tx.rollback().await;
            return Ok(Outcome::Kept(kept_by_lock_timeout(c, options)));
        }
        return Err(Error::postgres("detaching the partition", &e));
    }
    let counts = count_statuses(&tx, &c.qualified)
        .await
        .map_err(db("counting the rows of the detached partition by status"))?;
    if let Some(reason) = counts.blocked(options.archive_dir.is_some()) {
        tx.rollback().await.map_err(db("rolling back the detach"))?;
        return Ok(Outcome::Kept(kept(c, reason, &counts)));
    }
    let archive = match archive(&tx, config, c, options).await {
        Ok(archive) => archive,
        Err(e) => {
            let _ = tx.rollback().await;
            return Err(e);
        }
    };
    tx.batch_execute(&format!("DROP TABLE {}", c.qualified))
        .await
        .map_err(db("dropping the detached partition"))?;
    // Only here can the outcome be unknown (the connection lost while the
    // server commits): say so rather than "nothing was dropped".
    tx.commit()
        .await
        .map_err(|e| commit_error(&e, options.archive_dir.is_some()))?;
    tracing::info!(partition = %c.display, archive = ?archive.as_ref().map(|a| &a.0), "retired outbox partition");
    Ok(Outcome::Retired(Retired {
        name: c.display.clone(),
        range_start: c.range_start.clone(),
        range_end: c.range_end.clone(),
        dead_letter: counts.dead_letter,
        archived_rows: archive.as_ref().map(|a| a.1),
        archive: archive.map(|a| a.0.display().to_string()),
    }))
}

/// A partition kept because the outbox stayed locked past `lock_timeout`.
fn kept_by_lock_timeout(c: &Candidate, options: &MaintainOptions) -> Kept {
    let timeout_ms = options.lock_timeout.as_millis().clamp(1, i32::MAX as u128);
    kept(
        c,
        format!(
            "the outbox stayed locked by other sessions for longer than the lock timeout ({timeout_ms} ms); nothing was changed, run maintain again"
        ),
        &Counts::default(),
    )
}

/// The error of a failed commit of a retirement: whether the partition was
/// dropped is unknown.
fn commit_error(e: &tokio_postgres::Error, archiving: bool) -> Error {
    Error::Fatal(format!(
        "committing the retirement: {}; whether the partition was dropped is unknown: run maintain again{}",
        postgres_text(e),
        if archiving {
            " (the archive file is complete either way)"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blockers_are_undelivered_rows_and_unarchived_dead_letters() {
        let done = Counts::default();
        assert!(done.blocked(false).is_none());
        let pending = Counts {
            pending: 1,
            ..Default::default()
        };
        assert!(pending.blocked(true).unwrap().contains("1 PENDING"));
        let processing = Counts {
            processing: 2,
            ..Default::default()
        };
        assert!(processing.blocked(true).is_some());
        let failed = Counts {
            failed: 1,
            ..Default::default()
        };
        assert!(failed.blocked(true).is_some());
        let dead = Counts {
            dead_letter: 3,
            ..Default::default()
        };
        assert!(dead.blocked(false).unwrap().contains("--archive-dir"));
        assert!(dead.blocked(true).is_none(), "archived with the rest");
    }
}
