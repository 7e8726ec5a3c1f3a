//! The replication slot's lifecycle: find it, create it (with a snapshot
//! backfill of rows still pending), or stop loudly when it was lost.
//!
//! `pgoutbox_slot_state` records each slot the relay created and whether the
//! initial backfill finished:
//! - slot present, backfill finished (or a slot the operator made): stream;
//! - slot present, backfill unfinished (the relay died during it): drop and
//!   recreate it, redoing the backfill from a fresh snapshot;
//! - slot missing, never created by us: create it and backfill;
//! - slot missing but recorded as created, or `wal_status = 'lost'`: the slot
//!   was dropped or invalidated, and events may have been skipped. Stop
//!   (ARCHITECTURE.md, invariant 9); the operator decides (`pgoutbox run --recreate-slot`).

use tokio_postgres::Client;

use crate::config::quote_ident;
use crate::error::Error;
use crate::Lsn;

/// What the relay found about its slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// Stream from it; its `confirmed_flush_lsn`.
    Ready {
        /// Where the server will resume.
        confirmed_flush: Lsn,
    },
    /// Create it (and backfill); `drop_first` when a stale one must go.
    Create {
        /// A slot with an unfinished backfill exists and must be dropped.
        drop_first: bool,
    },
    /// Another process streams from it now.
    Busy {
        /// The walsender's pid.
        pid: i32,
    },
}

/// Inspects the slot and the relay's record of it.
pub async fn inspect(
    client: &Client,
    schema: &str,
    slot: &str,
    recreate: bool,
) -> Result<SlotState, Error> {
    let state_table = format!("{}.pgoutbox_slot_state", quote_ident(schema));
    let recorded = client
        .query_opt(
            &format!("SELECT backfill_done_at IS NOT NULL FROM {state_table} WHERE slot_name = $1"),
            &[&slot],
        )
        .await
        .map_err(|e| Error::postgres("reading pgoutbox_slot_state", &e))?
        .map(|r| r.get::<_, bool>(0));
    let row = client
        .query_opt(
            "SELECT plugin, slot_type, database = current_database(), \
                    confirmed_flush_lsn::text, wal_status, active_pid \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| Error::postgres("reading pg_replication_slots", &e))?;
    let Some(row) = row else {
        return match recorded {
            Some(true) if !recreate => Err(Error::SlotLost(format!(
                "replication slot {slot:?} was created by pgoutbox but no longer exists (dropped or invalidated); \
                 events committed meanwhile may be missing from it. Check for rows still PENDING, then run \
                 `pgoutbox run --recreate-slot` to create a new slot and backfill them"
            ))),
            _ => Ok(SlotState::Create { drop_first: false }),
        };
    };
    let plugin: Option<String> = row.get(0);
    let slot_type: Option<String> = row.get(1);
    let same_db: Option<bool> = row.get(2);
    let confirmed: Option<String> = row.get(3);
    let wal_status: Option<String> = row.get(4);
    let active_pid: Option<i32> = row.get(5);
    if slot_type.as_deref() != Some("logical") || plugin.as_deref() != Some("pgoutput") {
        return Err(Error::Fatal(format!(
            "replication slot {slot:?} exists but is not a logical pgoutput slot (type {}, plugin {}); \
             choose another cdc.slot name or drop that slot",
            slot_type.unwrap_or_default(),
            plugin.unwrap_or_default()
        )));
    }
    if same_db != Some(true) {
        return Err(Error::Fatal(format!(
            "replication slot {slot:?} belongs to another database; choose another cdc.slot name"
        )));
    }
    if wal_status.as_deref() == Some("lost") {
        return Err(Error::SlotLost(format!(
            "replication slot {slot:?} was invalidated by PostgreSQL (wal_status = lost, max_slot_wal_keep_size \
             exceeded); events may be missing from it. Drop it, then run `pgoutbox run --recreate-slot` to backfill \
             rows still PENDING"
        )));
    }
    if let Some(pid) = active_pid {
        return Ok(SlotState::Busy { pid });
    }
    if recorded == Some(false) || recreate {
        return Ok(SlotState::Create { drop_first: true });
    }
    let confirmed_flush = confirmed
        .as_deref()
        .unwrap_or("0/0")
        .parse::<Lsn>()
        .map_err(|e| Error::Fatal(format!("slot {slot:?}: {e}")))?;
    Ok(SlotState::Ready { confirmed_flush })
}

/// Records that the relay is about to create `slot` (backfill unfinished).
pub async fn record_created(client: &Client, schema: &str, slot: &str) -> Result<(), Error> {
    client
        .execute(
            &format!(
                "INSERT INTO {}.pgoutbox_slot_state (slot_name) VALUES ($1) \
                 ON CONFLICT (slot_name) DO UPDATE SET created_at = now(), backfill_done_at = NULL, \
                 consistent_point = NULL",
                quote_ident(schema)
            ),
            &[&slot],
        )
        .await
        .map_err(|e| Error::postgres("recording the new slot", &e))?;
    Ok(())
}

/// Records that the backfill of `slot` finished at `consistent_point`.
pub async fn record_backfilled(
    client: &Client,
    schema: &str,
    slot: &str,
    consistent_point: Lsn,
) -> Result<(), Error> {
    client
        .execute(
            &format!(
                "UPDATE {}.pgoutbox_slot_state SET backfill_done_at = now(), consistent_point = $2::text::pg_lsn \
                 WHERE slot_name = $1",
                quote_ident(schema)
            ),
            &[&slot, &consistent_point.to_string()],
        )
        .await
        .map_err(|e| Error::postgres("recording the finished backfill", &e))?;
    Ok(())
}

/// Records that `slot` was recreated after it was lost (`why`), for
/// `pgoutbox status`. Best effort: a table older than migration 11 only
/// gets a warning (the ERROR line and the metric already said it).
pub async fn record_recovery(client: &Client, schema: &str, slot: &str, why: &str) {
    let sql = format!(
        "UPDATE {}.pgoutbox_slot_state SET recovered_at = now(), lost_reason = $2 WHERE slot_name = $1",
        quote_ident(schema)
    );
    if let Err(e) = client.execute(&sql, &[&slot, &why]).await {
        tracing::warn!(error = %crate::error::postgres_text(&e), "could not record the slot's recovery in pgoutbox_slot_state (run `pgoutbox migrate`)");
    }
}

/// Drops `slot` (only used for a slot whose backfill never finished).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), Error> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(|e| Error::postgres("dropping the unfinished slot", &e))?;
    Ok(())
}
