//! What only an operator can fix, checked before a mode starts serving:
//! reachability and credentials, `wal_level`, the publication, the schema's
//! migrations (or, for a table pgoutbox did not create, its adoption), the
//! table's columns against `[outbox.columns]`, the poll ordering index; and,
//! for `mode = "auto"`, which mode the database allows. Every check's error
//! says what to do.

use std::time::Duration;

use crate::config::{quote_ident, Config, Mode, PollOrdering};
use crate::error::Error;
use crate::outbox::TableShape;

/// Checks what only an operator can fix before streaming: `wal_level`,
/// the publication and the table's migrations. Returns the server's
/// `wal_sender_timeout` and the table's shape.
pub(super) async fn cdc(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<(Duration, TableShape), Error> {
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
    let shape = check_table(client, config).await?;
    check_managed(client, config).await?;
    let marking = shape.marking_gap();
    if config.outbox.mark_completed && !marking.is_empty() {
        tracing::warn!(
            table = %shape.qualified,
            "rows will not be marked COMPLETED: {marking}; delivered rows stay as they are (delete them yourself), and rows that can never be published are recorded in pgoutbox_dead_letters"
        );
    }
    failover_warnings(client, config).await;
    let timeout_ms: i64 = client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("reading wal_sender_timeout", &e))?
        .get(0);
    Ok((Duration::from_millis(timeout_ms.max(0) as u64), shape))
}

/// PostgreSQL 17+: says at start whether the slot is a failover slot and
/// warns when `synchronized_standby_slots` is empty while it is one (the
/// relay may then publish transactions a failover loses).
async fn failover_warnings(client: &tokio_postgres::Client, config: &Config) {
    let row = client
        .query_opt(
            "SELECT (to_jsonb(s) ->> 'failover')::bool, current_setting('synchronized_standby_slots', true) \
               FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&config.cdc.slot],
        )
        .await;
    let Ok(Some(row)) = row else { return };
    let (failover, synchronized): (Option<bool>, Option<String>) = (row.get(0), row.get(1));
    match (failover, synchronized.as_deref()) {
        (Some(true), None | Some("")) => tracing::warn!(
            slot = %config.cdc.slot,
            "the slot is a failover slot but synchronized_standby_slots is empty: the relay may publish transactions that a failover then loses (they reached Kafka but not the standby); name the standby's physical slot in synchronized_standby_slots (docs/high-availability.md)"
        ),
        (Some(true), Some(slots)) => {
            tracing::info!(slot = %config.cdc.slot, synchronized_standby_slots = %slots, "failover slot; the relay sees only what the standbys have")
        }
        (Some(false), _) => {
            tracing::info!(slot = %config.cdc.slot, "the slot is not a failover slot (created before cdc.failover_slot, or with it off): a failover to a standby loses it")
        }
        (None, _) => {}
    }
    if failover == Some(true) {
        log_standby_copies(config);
    }
}

/// Says, in the background (a standby host that does not answer must not
/// delay the start), what each standby of the host list holds of the slot.
fn log_standby_copies(config: &Config) {
    let Ok(pg) = crate::database::settings(config) else {
        return;
    };
    let slot = config.cdc.slot.clone();
    tokio::spawn(async move {
        let copies = crate::database::standby::copies(&pg, &slot).await;
        for c in &copies {
            let line = crate::database::standby::describe(c);
            if c.usable() {
                tracing::info!(slot = %slot, "{line}");
            } else {
                tracing::warn!(slot = %slot, "{line}");
            }
        }
        if !copies.is_empty()
            && !copies
                .iter()
                .any(crate::database::standby::StandbyCopy::usable)
        {
            tracing::warn!(slot = %slot, "no standby of DATABASE_URL holds a synced, valid copy of the slot yet: a failover now loses it (the relay then recreates it and backfills; a copy syncs once the slot has moved on after the standby started)");
        }
    });
}

/// Reads the outbox table and checks it against `[outbox.columns]`.
async fn check_table(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<TableShape, Error> {
    let target = format!("{}.{}", config.outbox.schema, config.outbox.table);
    let map = config.event_columns()?;
    let shape = TableShape::inspect(client, &config.outbox.schema, &config.outbox.table)
        .await
        .map_err(|e| Error::postgres("reading the outbox table's columns", &e))?
        .ok_or_else(|| {
            Error::Fatal(format!(
                "the outbox table {target} does not exist: run `pgoutbox migrate` to create it, or set outbox.schema/outbox.table to your table"
            ))
        })?;
    let gap = shape.relay_gap(&map);
    if !gap.is_empty() {
        let named: Vec<String> = gap
            .missing
            .iter()
            .filter_map(|c| {
                debezium_option_naming(config, c).map(|o| format!("{c} by kafka.debezium.{o}"))
            })
            .collect();
        let named = if named.is_empty() {
            String::new()
        } else {
            format!(" (named {})", named.join(", "))
        };
        return Err(Error::Fatal(format!(
            "{target} cannot be relayed: {gap}{named}; map [outbox.columns] (preset {:?}) to the table's columns, or check it with `pgoutbox adopt --check`",
            map.preset().as_str()
        )));
    }
    Ok(shape)
}

/// The `kafka.debezium` option that names `column`, when the debezium
/// record format is on and the column is not one of the mapped roles.
fn debezium_option_naming(config: &Config, column: &str) -> Option<&'static str> {
    if config.kafka.format != crate::config::RecordFormat::Debezium
        || config.outbox.column_map().ok()?.role_of(column).is_some()
    {
        return None;
    }
    let d = &config.kafka.debezium;
    [
        ("table.field.event.id", &d.field_event_id),
        ("table.field.event.key", &d.field_event_key),
        ("table.field.event.payload", &d.field_event_payload),
        ("route.by.field", &d.route_by_field),
    ]
    .into_iter()
    .chain(
        d.field_event_timestamp
            .as_ref()
            .map(|c| ("table.field.event.timestamp", c)),
    )
    .collect::<Vec<_>>()
    .into_iter()
    .find(|(_, c)| *c == column)
    .map(|(o, _)| o)
    .or_else(|| {
        let placed = d.placements().ok()?;
        placed
            .iter()
            .any(|p| p.column == column)
            .then_some("table.fields.additional.placement")
    })
}

/// Checks that the table was migrated to this binary's latest migration
/// (when `pgoutbox migrate` created it) or adopted.
async fn check_managed(client: &tokio_postgres::Client, config: &Config) -> Result<(), Error> {
    let target = format!("{}.{}", config.outbox.schema, config.outbox.table);
    let row = client
        .query_one(
            "SELECT max(version) FILTER (WHERE version > 0), bool_or(version = $2) \
               FROM public.pgoutbox_migrations WHERE target = $1",
            &[&target, &crate::outbox::ADOPTED],
        )
        .await
        .map_err(|e| Error::postgres("reading pgoutbox_migrations", &e))?;
    let (applied, adopted): (Option<i32>, Option<bool>) = (row.get(0), row.get(1));
    let latest = crate::outbox::MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    match applied {
        _ if adopted == Some(true) => {}
        Some(v) if v >= latest => {}
        Some(v) => {
            return Err(Error::Fatal(format!(
                "the schema of {target} is at migration {v} but this pgoutbox needs {latest}: run `pgoutbox migrate`"
            )))
        }
        None => {
            return Err(Error::Fatal(format!(
                "{target} was neither created by `pgoutbox migrate` nor adopted: run `pgoutbox adopt` (it checks the table against [outbox.columns] and creates the relay's own tables beside it, never altering yours)"
            )))
        }
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
pub(super) async fn poll(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<TableShape, Error> {
    let shape = check_table(client, config).await?;
    let gap = shape.poll_gap();
    if !gap.is_empty() {
        return Err(Error::Fatal(format!(
            "{} cannot be relayed in poll mode: {gap}. Use CDC mode (mode = \"cdc\"), or add the columns with `pgoutbox adopt --add-poll-columns`",
            shape.qualified
        )));
    }
    check_managed(client, config).await?;
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
    Ok(shape)
}
