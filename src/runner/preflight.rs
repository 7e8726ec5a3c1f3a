//! What only an operator can fix, checked before a mode starts serving:
//! reachability and credentials, `wal_level`, the publication, the schema's
//! migrations, the poll ordering index; and, for `mode = "auto"`, which mode
//! the database allows. Every check's error says what to do.

use std::time::Duration;

use crate::config::{quote_ident, Config, Mode, PollOrdering};
use crate::error::Error;

/// Checks what only an operator can fix before streaming: `wal_level`,
/// the publication and the table's migrations. Returns the server's
/// `wal_sender_timeout`.
pub(super) async fn cdc(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<Duration, Error> {
    let wal_level: String = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(|e| Error::postgres("reading wal_level", &e))?
        .get(0);
    if wal_level != "logical" {
        return Err(Error::Fatal(format!(
            "wal_level is {wal_level:?} but CDC needs \"logical\": set wal_level = logical in postgresql.conf and restart PostgreSQL"
        )));
    }
    let publication = &config.cdc.publication;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(|e| Error::postgres("reading pg_publication", &e))?
        .is_some();
    if !exists {
        return Err(Error::Fatal(format!(
            "publication {publication:?} does not exist: run `pgoutbox migrate`, or CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert', publish_via_partition_root = true)",
            quote_ident(publication),
            quote_ident(&config.outbox.table)
        )));
    }
    let covered = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[publication, &config.outbox.schema, &config.outbox.table],
        )
        .await
        .map_err(|e| Error::postgres("reading pg_publication_tables", &e))?
        .is_some();
    if !covered {
        tracing::warn!(
            publication = %publication,
            table = %config.outbox.table,
            "the publication does not include the configured outbox table; only its own tables will be relayed"
        );
    }
    check_migrations(client, config).await?;
    let timeout_ms: i64 = client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("reading wal_sender_timeout", &e))?
        .get(0);
    Ok(Duration::from_millis(timeout_ms.max(0) as u64))
}

/// Stops with a clear message when the table's schema is behind this
/// binary's migrations.
async fn check_migrations(client: &tokio_postgres::Client, config: &Config) -> Result<(), Error> {
    let target = format!("{}.{}", config.outbox.schema, config.outbox.table);
    let applied: Option<i32> = client
        .query_one(
            "SELECT max(version) FROM public.pgoutbox_migrations WHERE target = $1",
            &[&target],
        )
        .await
        .map_err(|e| Error::postgres("reading pgoutbox_migrations", &e))?
        .get(0);
    let latest = crate::outbox::MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if applied.unwrap_or(0) < latest {
        return Err(Error::Fatal(format!(
            "the schema of {target} is at migration {} but this pgoutbox needs {latest}: run `pgoutbox migrate`",
            applied.unwrap_or(0)
        )));
    }
    Ok(())
}

/// Why `auto` chose a mode, for the log.
pub(super) async fn choose_mode(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<(Mode, String), Error> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), \
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
                    EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
            &[&config.cdc.publication, &config.outbox.schema, &config.outbox.table],
        )
        .await
        .map_err(|e| Error::postgres("checking whether CDC is possible", &e))?;
    let (wal_level, replication, published): (String, Option<bool>, bool) =
        (row.get(0), row.get(1), row.get(2));
    if wal_level != "logical" {
        return Ok((
            Mode::Poll,
            format!("wal_level is {wal_level:?}, not \"logical\""),
        ));
    }
    if replication != Some(true) {
        return Ok((Mode::Poll, "the role has no REPLICATION privilege".into()));
    }
    if !published {
        return Ok((
            Mode::Poll,
            format!(
                "publication {:?} does not include {}.{}",
                config.cdc.publication, config.outbox.schema, config.outbox.table
            ),
        ));
    }
    Ok((
        Mode::Cdc,
        "wal_level is logical, the role may replicate and the publication covers the table".into(),
    ))
}

/// Checks what only an operator can fix before polling.
pub(super) async fn poll(client: &tokio_postgres::Client, config: &Config) -> Result<(), Error> {
    check_migrations(client, config).await?;
    if config.poll.ordering == PollOrdering::Aggregate
        && !crate::poll::schema::has_ordering_index(client, config)
            .await
            .map_err(|e| Error::postgres("checking the ordering index", &e))?
    {
        return Err(Error::Fatal(format!(
            "poll.ordering = \"aggregate\" needs the index {}: run `pgoutbox migrate` with the same configuration",
            crate::poll::schema::ordering_index(config)
        )));
    }
    let slot = client
        .query_opt(
            "SELECT active, pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.cdc.slot],
        )
        .await;
    if let Ok(Some(row)) = slot {
        let retained: Option<String> = row.get(1);
        tracing::warn!(
            slot = %config.cdc.slot,
            retained = retained.as_deref().unwrap_or("unknown"),
            "the CDC replication slot still exists and keeps WAL while polling; drop it if CDC is not coming back soon (see docs/switching-modes.md)"
        );
    }
    Ok(())
}
