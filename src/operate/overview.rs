//! `pgoutbox status`: one look at an outbox — which mode serves it, the
//! replication slot, the rows waiting, and the partitions — gathered from
//! PostgreSQL alone (no Kafka) into a serializable [`Overview`]. The JSON
//! keys are stable; docs/status.md lists them.
//!
//! Who serves the table comes from the serving lock (see [`crate::runner::serving`]):
//! an advisory lock with keys (`0x70676f62`, `hashtext('schema.table')`),
//! held exclusively by a CDC relay and shared by pollers, read from
//! `pg_locks` joined to `pg_stat_activity`. Waiting relays (a CDC standby,
//! pollers waiting for a CDC relay to stop) are listed with
//! `granted: false`.
//!
//! Row counts by status are exact and cheap: each status has a partial
//! index (`PENDING`, `PROCESSING`, `FAILED`, `DEAD_LETTER`). Partition row
//! counts are PostgreSQL's estimates (`pg_class.reltuples`, as of the last
//! `VACUUM`/`ANALYZE`); sizes are `pg_total_relation_size` (table, indexes
//! and TOAST).

use serde::Serialize;
use tokio_postgres::Client;

use super::partitions::{rfc3339, BOUNDS_SQL};
use crate::config::{quote_ident, Config};
use crate::error::Error;
use crate::outbox::journal::Journal;
use crate::runner::serving::LOCK_CLASS;

/// Everything `pgoutbox status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct Overview {
    /// `schema.table`.
    pub table: String,
    /// The server's time when this was read, RFC 3339 UTC.
    pub generated_at: String,
    /// Mode: configured, and who serves the table now.
    pub mode: ModeOverview,
    /// The CDC replication slot (`cdc.slot`).
    pub slot: SlotOverview,
    /// Rows not yet delivered, and dead letters.
    /// Row counts by status; `None` for a table without `status` and
    /// `created_at` (an adopted table the relay does not mark).
    pub rows: Option<RowsOverview>,
    /// The partitions.
    pub partitions: PartitionsOverview,
    /// The delivery guarantee, and what Kafka holds with exactly-once
    /// (filled by `pgoutbox status` from the progress topic).
    pub delivery: super::kafka_progress::DeliveryOverview,
    /// An earlier relay's slots and triggers, to remove.
    pub leftovers: Vec<super::leftovers::Leftover>,
    /// The outbox's condition judged against the `[health]` thresholds.
    pub health: crate::metrics::condition::Condition,
}

/// The mode in the configuration, and the relays holding (or waiting for)
/// the table's serving lock.
#[derive(Clone, Debug, Serialize)]
pub struct ModeOverview {
    /// `mode` from the configuration: `cdc`, `poll` or `auto`.
    pub configured: String,
    /// Who serves the table now: `cdc` (a CDC relay holds the lock
    /// exclusively), `poll` (pollers hold it shared) or `none`.
    pub serving: String,
    /// Sessions holding or waiting for the serving lock, holders first.
    pub holders: Vec<LockHolder>,
}

/// One session on the serving lock.
#[derive(Clone, Debug, Serialize)]
pub struct LockHolder {
    /// Backend process id.
    pub pid: i32,
    /// `cdc` (exclusive) or `poll` (shared).
    pub relay_mode: String,
    /// `ExclusiveLock` or `ShareLock`, as in `pg_locks.mode`.
    pub lock_mode: String,
    /// True when held, false while waiting (a standby).
    pub granted: bool,
    /// `application_name` (`pgoutbox-cdc`, `pgoutbox-poll`), if visible.
    pub application_name: Option<String>,
    /// Client address, if visible (`null` for Unix sockets or when hidden).
    pub client_addr: Option<String>,
    /// Database role.
    pub user: Option<String>,
    /// When that session started, RFC 3339 UTC, if visible.
    pub backend_start: Option<String>,
}

/// The replication slot.
#[derive(Clone, Debug, Serialize)]
pub struct SlotOverview {
    /// `cdc.slot`.
    pub name: String,
    /// False when there is no such slot (poll mode, or not started yet, or
    /// lost); every other field but `server_wal_lsn` is then `null`.
    pub exists: bool,
    /// A walsender is streaming from it.
    pub active: Option<bool>,
    /// That walsender's pid.
    pub active_pid: Option<i32>,
    /// Oldest WAL the slot still needs.
    pub restart_lsn: Option<String>,
    /// What the relay confirmed (everything before it is delivered).
    pub confirmed_flush_lsn: Option<String>,
    /// The server's current WAL end (`pg_current_wal_lsn()`; on a standby
    /// the last WAL received).
    pub server_wal_lsn: String,
    /// `server_wal_lsn - confirmed_flush_lsn`, bytes.
    pub lag_bytes: Option<i64>,
    /// `server_wal_lsn - restart_lsn`: WAL kept for the slot, bytes.
    pub retained_wal_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is in danger
    /// of being invalidated (`null`: `max_slot_wal_keep_size` is unlimited).
    pub safe_wal_size_bytes: Option<i64>,
    /// A failover slot (PostgreSQL 17+; `null` before).
    pub failover: Option<bool>,
    /// The primary's `synchronized_standby_slots` (PostgreSQL 17+; `null`
    /// before). Empty while a failover slot is in use: the relay may
    /// publish transactions a failover loses.
    pub synchronized_standby_slots: Option<String>,
    /// Why the slot was invalidated (PostgreSQL 17+), if it was.
    pub invalidation_reason: Option<String>,
    /// The slot's copies on the standbys of a multi-host `DATABASE_URL`
    /// (filled by `pgoutbox status` for a failover slot; see
    /// [`crate::database::standby`]).
    pub standbys: Vec<crate::database::standby::StandbyCopy>,
    /// A warning about the slot's high availability, when there is one.
    pub failover_warning: Option<String>,
    /// The last time the relay recreated the slot after it was lost
    /// (`cdc.on_slot_lost = "recreate"`), RFC 3339 UTC.
    pub last_recovery_at: Option<String>,
    /// Why the slot was lost then.
    pub last_recovery_reason: Option<String>,
}

/// Row counts by status (exact), and the oldest pending row.
#[derive(Clone, Debug, Serialize)]
pub struct RowsOverview {
    /// Rows `PENDING`.
    pub pending: i64,
    /// Rows `PROCESSING` (leased by a poller).
    pub processing: i64,
    /// Rows `FAILED` (left by an older poller; adopted at a poller's start).
    pub failed: i64,
    /// Rows `DEAD_LETTER` (`pgoutbox dle`).
    pub dead_letter: i64,
    /// `created_at` of the oldest `PENDING` row, RFC 3339 UTC.
    pub oldest_pending_created_at: Option<String>,
    /// Its age in seconds at `generated_at`.
    pub oldest_pending_age_s: Option<f64>,
    /// Rows dead-lettered within `health.dead_letter_window_s` (`null`
    /// when the table has no `processed_at`).
    pub dead_letters_recent: Option<i64>,
    /// Rows delivered and listed in the delivery journal, not yet folded
    /// into their status (`null` when the schema has no journal). They are
    /// not counted as pending.
    pub journaled: Option<i64>,
}

/// The partitions of the outbox.
#[derive(Clone, Debug, Serialize)]
pub struct PartitionsOverview {
    /// `partitions.interval` from the configuration.
    pub interval: String,
    /// Who creates them: `pgoutbox` (ahead, by the relay), `pg_partman`,
    /// `outside pgoutbox` (an adopted table's own scheme) or `not
    /// partitioned`; the relay creates partitions only in the first case.
    pub created_by: String,
    /// How many partitions.
    pub count: usize,
    /// Sum of their sizes, bytes.
    pub total_bytes: i64,
    /// Sum of their estimated rows (partitions never analyzed count as 0).
    pub estimated_rows: i64,
    /// Always true: row counts come from `pg_class.reltuples`.
    pub rows_are_estimates: bool,
    /// The partitions, oldest range first (a DEFAULT partition last).
    pub list: Vec<PartitionInfo>,
}

/// One partition.
#[derive(Clone, Debug, Serialize)]
pub struct PartitionInfo {
    /// `schema.name`.
    pub name: String,
    /// Start of its range (inclusive), RFC 3339 UTC; `null` for MINVALUE
    /// or a DEFAULT partition.
    pub range_start: Option<String>,
    /// End of its range (exclusive), RFC 3339 UTC; `null` for MAXVALUE or
    /// a DEFAULT partition.
    pub range_end: Option<String>,
    /// The DEFAULT partition.
    pub is_default: bool,
    /// Estimated rows (`pg_class.reltuples`); `null` when never vacuumed
    /// or analyzed.
    pub estimated_rows: Option<i64>,
    /// `pg_total_relation_size`, bytes.
    pub total_bytes: i64,
}

fn db(doing: &str) -> impl FnOnce(tokio_postgres::Error) -> Error + '_ {
    move |e| Error::postgres(doing, &e)
}

/// Reads the overview of the configured outbox.
pub async fn read(client: &Client, config: &Config) -> Result<Overview, Error> {
    let name = format!("{}.{}", config.outbox.schema, config.outbox.table);
    let table = format!(
        "{}.{}",
        quote_ident(&config.outbox.schema),
        quote_ident(&config.outbox.table)
    );
    let now = client
        .query_one(&format!("SELECT {}", rfc3339("now()")), &[])
        .await
        .map_err(db("reading the server's time"))?;
    let generated_at: String = now.get(0);
    let holders = read_holders(client, &name).await?;
    let serving = holders
        .iter()
        .find(|h| h.granted)
        .map(|h| h.relay_mode.clone())
        .unwrap_or_else(|| "none".into());
    let slot = read_slot(client, config).await?;
    let shape =
        crate::outbox::TableShape::inspect(client, &config.outbox.schema, &config.outbox.table)
            .await
            .map_err(db("reading the outbox table's columns"))?
            .ok_or_else(|| Error::Fatal(format!("the outbox table {name} does not exist")))?;
    let rows = if tracks_rows(&shape) {
        let mut rows = read_rows(client, config, &table).await?;
        if shape.type_of("processed_at").is_some() {
            let sql = recent_dead_letters_sql(&table, config.health.dead_letter_window_s);
            let r = client
                .query_one(&sql, &[])
                .await
                .map_err(db("counting recent dead letters"))?;
            rows.dead_letters_recent = Some(r.get(0));
        }
        Some(rows)
    } else {
        None
    };
    let health = crate::metrics::condition::judge(
        &config.health,
        &crate::metrics::condition::Measures {
            // Without marks every row stays PENDING: the age says nothing.
            oldest_pending_s: rows
                .as_ref()
                .filter(|_| config.outbox.mark_completed)
                .map(|r| r.oldest_pending_age_s.unwrap_or(0.0)),
            slot_lag_bytes: slot.lag_bytes,
            recent_dead_letters: rows.as_ref().and_then(|r| r.dead_letters_recent),
        },
    );
    let partitions = read_partitions(client, config, &table).await?;
    let leftovers = super::leftovers::read(client, config).await?;
    Ok(Overview {
        table: name,
        generated_at,
        mode: ModeOverview {
            configured: config.mode.to_string(),
            serving,
            holders,
        },
        slot,
        rows,
        partitions,
        delivery: super::kafka_progress::DeliveryOverview {
            guarantee: config.kafka.delivery.as_str().to_owned(),
            ..Default::default()
        },
        leftovers,
        health,
    })
}

/// The sessions holding or waiting for the serving lock of `name`
/// (`schema.table`), holders first.
async fn read_holders(client: &Client, name: &str) -> Result<Vec<LockHolder>, Error> {
    Ok(client
        .query(
            &format!(
                "SELECT l.pid, l.mode, l.granted, a.application_name, host(a.client_addr), \
                        a.usename::text, {} \
                   FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                  WHERE l.locktype = 'advisory' AND l.classid = $1::int4::oid \
                    AND l.objid = hashtext($2)::oid AND l.objsubid = 2 \
                    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                  ORDER BY l.granted DESC, l.pid",
                rfc3339("a.backend_start")
            ),
            &[&LOCK_CLASS, &name],
        )
        .await
        .map_err(db("reading the serving lock from pg_locks"))?
        .into_iter()
        .map(|r| {
            let lock_mode: String = r.get(1);
            LockHolder {
                pid: r.get(0),
                relay_mode: if lock_mode == "ExclusiveLock" {
                    "cdc"
                } else {
                    "poll"
                }
                .into(),
                lock_mode,
                granted: r.get(2),
                application_name: r.get(3),
                client_addr: r.get(4),
                user: r.get(5),
                backend_start: r.get(6),
            }
        })
        .collect())
}

/// The replication slot `slot` and the server's WAL end.
async fn read_slot(client: &Client, config: &Config) -> Result<SlotOverview, Error> {
    let slot = &config.cdc.slot;
    let slot_row = client
        .query_one(
            "WITH w AS (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() \
                                    ELSE pg_current_wal_lsn() END AS lsn) \
             SELECT w.lsn::text, s.slot_name IS NOT NULL, s.active, s.active_pid, \
                    s.restart_lsn::text, s.confirmed_flush_lsn::text, \
                    pg_wal_lsn_diff(w.lsn, s.confirmed_flush_lsn)::bigint, \
                    pg_wal_lsn_diff(w.lsn, s.restart_lsn)::bigint, \
                    s.wal_status, s.safe_wal_size, \
                    current_setting('server_version_num')::int >= 170000 \
               FROM w LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
            &[slot],
        )
        .await
        .map_err(db("reading pg_replication_slots"))?;
    let exists: bool = slot_row.get(1);
    let (failover, synchronized, invalidation_reason) = if slot_row.get::<_, bool>(10) {
        let row = client
            .query_one(
                "SELECT (SELECT failover FROM pg_replication_slots WHERE slot_name = $1), \
                        current_setting('synchronized_standby_slots', true), \
                        (SELECT invalidation_reason FROM pg_replication_slots WHERE slot_name = $1)",
                &[slot],
            )
            .await
            .map_err(db("reading the slot's failover settings"))?;
        (
            row.get::<_, Option<bool>>(0),
            row.get::<_, Option<String>>(1),
            row.get::<_, Option<String>>(2),
        )
    } else {
        (None, None, None)
    };
    let failover_warning = match (failover, synchronized.as_deref()) {
        (Some(true), Some("")) => Some(
            "synchronized_standby_slots is empty: the relay may publish transactions a failover then loses (they reached Kafka but not the standby); name the standby's physical slot there (docs/high-availability.md)".to_owned(),
        ),
        (Some(false), _) => Some(
            "the slot is not a failover slot: a failover to a standby loses it (the relay then recreates it and backfills, see cdc.on_slot_lost)".to_owned(),
        ),
        _ => None,
    };
    let recovery = client
        .query_opt(
            &format!(
                "SELECT {}, lost_reason FROM {}.pgoutbox_slot_state WHERE slot_name = $1 AND recovered_at IS NOT NULL",
                rfc3339("recovered_at"),
                quote_ident(&config.outbox.schema)
            ),
            &[slot],
        )
        .await
        .ok()
        .flatten();
    Ok(SlotOverview {
        name: slot.to_owned(),
        server_wal_lsn: slot_row.get::<_, Option<String>>(0).unwrap_or_default(),
        exists,
        active: slot_row.get(2),
        active_pid: slot_row.get(3),
        restart_lsn: slot_row.get(4),
        confirmed_flush_lsn: slot_row.get(5),
        lag_bytes: slot_row.get(6),
        retained_wal_bytes: slot_row.get(7),
        wal_status: slot_row.get(8),
        safe_wal_size_bytes: slot_row.get(9),
        failover: exists.then_some(failover).flatten(),
        synchronized_standby_slots: synchronized,
        invalidation_reason,
        standbys: Vec::new(),
        failover_warning: exists.then_some(failover_warning).flatten(),
        last_recovery_at: recovery.as_ref().and_then(|r| r.get(0)),
        last_recovery_reason: recovery.as_ref().and_then(|r| r.get(1)),
    })
}

/// Whether the table says which rows wait: it has `status` and
/// `created_at` (an adopted table may not).
pub fn tracks_rows(shape: &crate::outbox::TableShape) -> bool {
    shape.type_of("status").is_some() && shape.type_of("created_at").is_some()
}

/// The subqueries over `table` (quoted) that count its pending rows and
/// find the oldest one's `created_at`, for the sampler and `pgoutbox
/// status`. A row `journal` lists is delivered, not pending. Each predicate
/// is a partial index's; the oldest row is found with `ORDER BY created_at
/// LIMIT 1`, which reads one index entry (per partition at most), where
/// `min(created_at)` would read them all.
pub(crate) struct PendingSql {
    /// `(SELECT count(*) …)`: the pending rows.
    pub count: String,
    /// `(SELECT created_at … LIMIT 1)`: the oldest pending row's, or NULL.
    pub oldest: String,
}

impl PendingSql {
    /// The subqueries for `table`, leaving out what `journal` lists.
    pub(crate) fn new(table: &str, journal: Option<&Journal>) -> PendingSql {
        match journal {
            Some(j) => PendingSql {
                count: j.pending_count_sql(),
                oldest: j.oldest_pending_sql(),
            },
            None => PendingSql {
                count: format!("(SELECT count(*) FROM {table} WHERE status = 'PENDING')"),
                oldest: format!(
                    "(SELECT created_at FROM {table} WHERE status = 'PENDING' \
                       ORDER BY created_at LIMIT 1)"
                ),
            },
        }
    }
}

/// The rows of `table` (quoted) by status, and the oldest pending one; a
/// row the delivery journal lists is delivered, not pending.
async fn read_rows(client: &Client, config: &Config, table: &str) -> Result<RowsOverview, Error> {
    let schema = &config.outbox.schema;
    let journal = crate::outbox::journal::usable(client, schema)
        .await
        .map_err(db("looking for the delivery journal"))?
        .then(|| Journal::new(schema, &config.outbox.table));
    let pending = PendingSql::new(table, journal.as_ref());
    let count = |s: &str| format!("(SELECT count(*) FROM {table} WHERE status = '{s}')");
    let rows_row = client
        .query_one(
            &format!(
                "SELECT {}, {}, {}, {}, {}, extract(epoch FROM now() - p.oldest)::float8 \
                   FROM (SELECT {} AS oldest) p",
                pending.count,
                count("PROCESSING"),
                count("FAILED"),
                count("DEAD_LETTER"),
                rfc3339("p.oldest"),
                pending.oldest,
            ),
            &[],
        )
        .await
        .map_err(db("counting the outbox rows by status"))?;
    let journaled = match &journal {
        Some(j) => Some(
            client
                .query_one(&j.rows_sql(), &[&j.outbox()])
                .await
                .map_err(db("counting the rows of the delivery journal"))?
                .get::<_, i64>(0),
        ),
        None => None,
    };
    Ok(RowsOverview {
        pending: rows_row.get(0),
        processing: rows_row.get(1),
        failed: rows_row.get(2),
        dead_letter: rows_row.get(3),
        oldest_pending_created_at: rows_row.get(4),
        oldest_pending_age_s: rows_row.get(5),
        dead_letters_recent: None,
        journaled,
    })
}

/// Counts the rows of `table` (quoted) dead-lettered within the last
/// `window_s` seconds: the dead-letter partial index, filtered by
/// `processed_at`, which dead-lettering sets (the sampler and `pgoutbox
/// status` count the same way).
pub(crate) fn recent_dead_letters_sql(table: &str, window_s: u64) -> String {
    format!(
        "SELECT count(*) FROM {table} WHERE status = 'DEAD_LETTER' \
           AND processed_at >= now() - make_interval(secs => {window_s})"
    )
}

/// The partitions of `table` (quoted), oldest range first.
async fn read_partitions(
    client: &Client,
    config: &Config,
    table: &str,
) -> Result<PartitionsOverview, Error> {
    let list: Vec<PartitionInfo> = client
        .query(
            &format!(
                "SELECT nspname || '.' || relname, {}, {}, is_default, \
                        CASE WHEN reltuples >= 0 THEN reltuples::bigint END, \
                        pg_total_relation_size(oid) \
                   FROM ({BOUNDS_SQL}) p ORDER BY is_default, lo, relname",
                rfc3339("lo"),
                rfc3339("hi"),
            ),
            &[&table],
        )
        .await
        .map_err(db("listing the partitions"))?
        .into_iter()
        .map(|r| PartitionInfo {
            name: r.get(0),
            range_start: r.get(1),
            range_end: r.get(2),
            is_default: r.get(3),
            estimated_rows: r.get(4),
            total_bytes: r.get(5),
        })
        .collect();
    let created_by = crate::outbox::partitioning::creator(client, config)
        .await
        .map_err(db("finding who creates the partitions"))?;
    Ok(PartitionsOverview {
        interval: config.partitions.interval.to_string(),
        created_by: created_by.as_str().to_owned(),
        count: list.len(),
        total_bytes: list.iter().map(|p| p.total_bytes).sum(),
        estimated_rows: list.iter().filter_map(|p| p.estimated_rows).sum(),
        rows_are_estimates: true,
        list,
    })
}
