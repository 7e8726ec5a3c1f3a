//! The benchmark's outbox in PostgreSQL: a fresh schema made by `pgoutbox
//! migrate` (the same table, publication and indexes a user gets), the
//! replication slots of the systems under test, the backlog writer and the
//! fixed-rate traffic writer.
//!
//! Both writers are PL/pgSQL procedures that commit inside their loop: a row
//! costs the server one INSERT and one COMMIT and the client nothing, so on
//! two shared cores the load generator takes as little CPU as a load
//! generator can from the systems it measures.

use std::path::Path;
use std::time::Instant;

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// Schema of the benchmark's outbox table.
pub const SCHEMA: &str = "bench_e2e";
/// Its publication (`publish = 'insert'`, `publish_via_partition_root`).
pub const PUBLICATION: &str = "bench_e2e_pub";
/// Every benchmark slot's name starts with this.
const SLOT_PREFIX: &str = "bench_e2e_";

/// A boxed error with a message that says what failed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects to `url` (no TLS: the local services).
pub async fn connect(url: &str) -> Result<Client, BoxError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("cannot connect to DATABASE_URL: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The first column of the first row of a simple query, as text.
pub async fn scalar(db: &Client, sql: &str) -> Result<String, BoxError> {
    for m in db
        .simple_query(sql)
        .await
        .map_err(|e| format!("{sql}: {e}"))?
    {
        if let SimpleQueryMessage::Row(row) = m {
            return Ok(row.get(0).unwrap_or_default().to_string());
        }
    }
    Err(format!("{sql}: no row").into())
}

/// Name of a benchmark slot for `system`.
pub fn slot_name(system: &str) -> String {
    format!("{SLOT_PREFIX}{}", system.replace('-', "_"))
}

/// Drops the benchmark slots (ending a walsender still attached).
pub async fn drop_slots(db: &Client) -> Result<(), BoxError> {
    let like = format!("{SLOT_PREFIX}%");
    for _ in 0..50 {
        db.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
              WHERE slot_name LIKE $1 AND active_pid IS NOT NULL",
            &[&like],
        )
        .await?;
        let _ = db
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                  WHERE slot_name LIKE $1 AND active_pid IS NULL",
                &[&like],
            )
            .await;
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE $1",
                &[&like],
            )
            .await?
            .get(0);
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Err("the benchmark's replication slots could not be dropped (still active?)".into())
}

/// Creates a pgoutput slot named after `system` at the current WAL position.
/// pgoutbox streams from a slot an operator made; Debezium and
/// pg_recvlogical do too.
pub async fn create_slot(db: &Client, system: &str) -> Result<String, BoxError> {
    let name = slot_name(system);
    db.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&name],
    )
    .await
    .map_err(|e| format!("creating slot {name}: {e}"))?;
    Ok(name)
}

/// Drops and recreates the schema, publication and slots, with `pgoutbox
/// migrate` run by `relay_bin`, then installs the writer procedures.
pub async fn reset(db: &Client, relay_bin: &Path, db_url: &str) -> Result<(), BoxError> {
    drop_slots(db).await?;
    db.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
         DROP PUBLICATION IF EXISTS {PUBLICATION};
         DO $$ BEGIN IF to_regclass('public.pgoutbox_migrations') IS NOT NULL THEN
           DELETE FROM public.pgoutbox_migrations WHERE target = '{SCHEMA}.outbox'; END IF; END $$;"
    ))
    .await?;
    let out = tokio::process::Command::new(relay_bin)
        .arg("migrate")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", db_url)
        .env("OUTBOX_SCHEMA", SCHEMA)
        .env("OUTBOX_PUBLICATION", PUBLICATION)
        .env("NO_COLOR", "1")
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", relay_bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "pgoutbox migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )
        .into());
    }
    db.batch_execute(&writers_sql())
        .await
        .map_err(|e| format!("creating the writer procedures: {e}"))?;
    Ok(())
}

/// The row every writer inserts: one aggregate type (one topic), aggregate
/// ids drawn from `aggs`, a ~250-byte JSON payload carrying `t_us` (the
/// insert's clock_timestamp in microseconds, the start of the latency
/// measurement) and a W3C traceparent in metadata.
fn row_sql() -> String {
    format!(
        "INSERT INTO {SCHEMA}.outbox (aggregate_type, aggregate_id, event_type, payload, metadata)
         SELECT 'BenchOrder', aggs[1 + floor(random() * aggregates)::int], 'OrderPlaced',
           jsonb_build_object(
             't_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
             'order_id', gen_random_uuid(),
             'status', 'PLACED',
             'currency', 'EUR',
             'total_cents', 1 + floor(random() * 99999)::int,
             'items', jsonb_build_array(jsonb_build_object(
               'sku', 'SKU-' || lpad(floor(random() * 99999)::int::text, 5, '0'),
               'qty', 1 + floor(random() * 4)::int,
               'price_cents', 100 + floor(random() * 9900)::int))),
           jsonb_build_object('traceparent',
             '00-' || md5(random()::text) || '-' || substr(md5(random()::text), 1, 16) || '-01')"
    )
}

fn writers_sql() -> String {
    let row = row_sql();
    format!(
        "CREATE OR REPLACE PROCEDURE {SCHEMA}.bench_fill(n bigint, k int, aggregates int)
         LANGUAGE plpgsql AS $fill$
         DECLARE
           aggs uuid[];
           done bigint := 0;
           m int;
         BEGIN
           SELECT array_agg(md5('bench-aggregate-' || i)::uuid ORDER BY i) INTO aggs
             FROM generate_series(1, aggregates) AS i;
           WHILE done < n LOOP
             m := least(k, n - done);
             {row} FROM generate_series(1, m);
             COMMIT;
             done := done + m;
           END LOOP;
         END
         $fill$;

         CREATE OR REPLACE PROCEDURE {SCHEMA}.bench_traffic(
           rate float8, seconds float8, aggregates int, INOUT inserted bigint DEFAULT 0)
         LANGUAGE plpgsql AS $traffic$
         DECLARE
           aggs uuid[];
           t0 timestamptz;
           elapsed float8;
           ahead float8;
         BEGIN
           SELECT array_agg(md5('bench-aggregate-' || i)::uuid ORDER BY i) INTO aggs
             FROM generate_series(1, aggregates) AS i;
           inserted := 0;
           t0 := clock_timestamp();
           LOOP
             elapsed := extract(epoch FROM clock_timestamp() - t0);
             EXIT WHEN elapsed >= seconds;
             -- Row i is due at t0 + i / rate. pg_sleep sleeps whole
             -- milliseconds, so sleep only when a millisecond or more ahead
             -- (bursts of at most a millisecond's worth of rows).
             ahead := inserted / rate - elapsed;
             IF ahead >= 0.001 THEN
               PERFORM pg_sleep(ahead);
               CONTINUE;
             END IF;
             {row};
             COMMIT;
             inserted := inserted + 1;
           END LOOP;
         END
         $traffic$;"
    )
}

/// A backlog written while no relay runs.
#[derive(Clone, Debug)]
pub struct Backlog {
    /// Rows written.
    pub events: u64,
    /// Rows per transaction.
    pub per_tx: u32,
    /// WAL insert position after the last commit.
    pub end_lsn: String,
    /// WAL bytes the backlog took.
    pub wal_bytes: i64,
    /// Seconds it took to write.
    pub seconds: f64,
}

/// Writes `events` rows, `per_tx` per transaction, from `sessions`
/// concurrent sessions (their transactions interleave in the WAL as an
/// application's would) with `synchronous_commit = off`, then VACUUM
/// (ANALYZE) and CHECKPOINT so neither lands in a measurement.
pub async fn fill(
    db: &Client,
    db_url: &str,
    events: u64,
    per_tx: u32,
    aggregates: u32,
    sessions: u64,
) -> Result<Backlog, BoxError> {
    let start_lsn = scalar(db, "SELECT pg_current_wal_insert_lsn()").await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..sessions {
        let n = events / sessions + u64::from(i < events % sessions);
        if n == 0 {
            continue;
        }
        let url = db_url.to_string();
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await?;
            c.batch_execute("SET synchronous_commit = off").await?;
            c.simple_query(&format!(
                "CALL {SCHEMA}.bench_fill({n}, {per_tx}, {aggregates})"
            ))
            .await
            .map_err(|e| format!("writing the backlog: {e}"))?;
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let end_lsn = scalar(db, "SELECT pg_current_wal_insert_lsn()").await?;
    let wal_bytes: i64 = scalar(
        db,
        &format!("SELECT ('{end_lsn}'::pg_lsn - '{start_lsn}'::pg_lsn)::bigint"),
    )
    .await?
    .parse()?;
    db.batch_execute(&format!("VACUUM (ANALYZE) {SCHEMA}.outbox"))
        .await?;
    db.batch_execute("CHECKPOINT").await?;
    Ok(Backlog {
        events,
        per_tx,
        end_lsn,
        wal_bytes,
        seconds,
    })
}

/// Folds whatever delivery journal an earlier system left (ARCHITECTURE.md,
/// invariant 14: a relay folds it once its backlog is drained, which may be
/// after the harness stopped it), so that the next system does not fold it
/// at its start and pay for another's deferred work. Returns the rows
/// folded and how long it took.
pub async fn fold_journal(db: &Client) -> Result<(u64, f64), BoxError> {
    let exists: bool = db
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{SCHEMA}.pgoutbox_delivered")],
        )
        .await?
        .get(0);
    if !exists {
        return Ok((0, 0.0));
    }
    let t0 = Instant::now();
    let rows = db
        .execute(
            &format!(
                "WITH e AS (DELETE FROM {SCHEMA}.pgoutbox_delivered RETURNING ids, created_ats, delivered_at), \
                      k AS (SELECT u.id, u.created_at, e.delivered_at \
                              FROM e, unnest(e.ids, e.created_ats) AS u(id, created_at)) \
                 UPDATE {SCHEMA}.outbox AS o SET status = 'COMPLETED', processed_at = k.delivered_at \
                   FROM k WHERE o.id = k.id AND o.created_at = k.created_at \
                    AND o.status IN ('PENDING', 'PROCESSING', 'FAILED')"
            ),
            &[],
        )
        .await?;
    Ok((rows, t0.elapsed().as_secs_f64()))
}

/// Empties the outbox (between poll drains, which need PENDING rows).
pub async fn truncate(db: &Client) -> Result<(), BoxError> {
    db.batch_execute(&format!("TRUNCATE {SCHEMA}.outbox"))
        .await?;
    db.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// Vacuums and analyzes the freshly written backlog and checkpoints, so
/// that neither autovacuum nor a checkpoint runs in the middle of the first
/// drain and charges its work to that system's PostgreSQL CPU seconds.
pub async fn settle(db: &Client) -> Result<(), BoxError> {
    db.batch_execute(&format!("VACUUM (ANALYZE) {SCHEMA}.outbox"))
        .await?;
    // Nor the checkpoint the backlog's WAL would start.
    db.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// What the traffic writer did.
#[derive(Clone, Copy, Debug)]
pub struct Traffic {
    /// Rows inserted (each its own transaction).
    pub inserted: u64,
    /// Seconds from the first session's start to the last one's end.
    pub seconds: f64,
}

/// Inserts one event per transaction at `rate` events/s for `seconds`,
/// spread over one session per 1,000 events/s (at least 2).
///
/// The sessions commit with `synchronous_commit = off` and the latency phase
/// runs with the WAL writer flushing every millisecond (see
/// [`flush_wal_promptly`]): with synchronous commits this machine's disk
/// caps the writer near 12k commits/s, short of the 20k run. Either way the
/// WAL is on disk before a logical walsender sends it, so the measured
/// latency includes the flush, as a synchronous commit's would.
pub async fn traffic(
    db_url: &str,
    rate: u32,
    seconds: u64,
    aggregates: u32,
) -> Result<Traffic, BoxError> {
    let sessions = rate.div_ceil(1000).clamp(2, 24);
    let per_session = f64::from(rate) / f64::from(sessions);
    let mut clients = Vec::new();
    for _ in 0..sessions {
        clients.push(connect(db_url).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(tokio::spawn(async move {
            c.batch_execute("SET synchronous_commit = off").await?;
            let sql =
                format!("CALL {SCHEMA}.bench_traffic({per_session}, {seconds}, {aggregates})");
            for m in c
                .simple_query(&sql)
                .await
                .map_err(|e| format!("the traffic writer: {e}"))?
            {
                if let SimpleQueryMessage::Row(row) = m {
                    return Ok::<u64, BoxError>(row.get(0).unwrap_or("0").parse()?);
                }
            }
            Err("the traffic writer returned no row".into())
        }));
    }
    let mut inserted = 0;
    for t in tasks {
        inserted += t.await??;
    }
    Ok(Traffic {
        inserted,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The WAL writer settings of the latency phase: wake every millisecond and
/// flush whatever it wrote at once, so an asynchronous commit is on disk
/// (and visible to logical decoding) about a millisecond after it returns.
/// `on = false` restores the server's settings.
pub async fn flush_wal_promptly(db: &Client, on: bool) -> Result<(), BoxError> {
    let sql = if on {
        "ALTER SYSTEM SET wal_writer_delay = '1ms'; ALTER SYSTEM SET wal_writer_flush_after = 0"
    } else {
        "ALTER SYSTEM RESET wal_writer_delay; ALTER SYSTEM RESET wal_writer_flush_after"
    };
    for stmt in sql.split("; ") {
        db.batch_execute(stmt)
            .await
            .map_err(|e| format!("{stmt}: {e}"))?;
    }
    db.batch_execute("SELECT pg_reload_conf()").await?;
    Ok(())
}

/// Inserts one event outside any measurement and returns: a relay that has
/// delivered it is streaming.
pub async fn insert_one(db: &Client) -> Result<(), BoxError> {
    db.simple_query(&format!("CALL {SCHEMA}.bench_fill(1, 1, 1)"))
        .await?;
    Ok(())
}

/// The slot's confirmed_flush_lsn has reached `lsn`.
pub async fn slot_confirmed_past(db: &Client, slot: &str, lsn: &str) -> Result<bool, BoxError> {
    let row = db
        .query_opt(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &lsn],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<bool>>(0))
        .unwrap_or(false))
}
