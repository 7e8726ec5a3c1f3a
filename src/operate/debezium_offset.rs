//! Handing the slot back to Debezium: the Kafka Connect offset that makes
//! Debezium resume exactly where pgoutbox stopped.
//!
//! Debezium refuses to start from its own stored offset once the slot's
//! `restart_lsn` has moved past it ("Last recorded offset is no longer
//! available on the server"), which happens as soon as pgoutbox has
//! confirmed anything. The fix is Kafka Connect's offsets API (KIP-875):
//! stop the connector, `PATCH /connectors/<name>/offsets` with this body,
//! resume. The offset says "every commit up to the slot's confirmed
//! position was processed, no event after it": `lsn_commit` is the
//! confirmed position (a commit's end, as Debezium records it); `lsn` and
//! `lsn_proc` (the last event processed) are one below it, between that
//! commit and the first event after it, so Debezium skips nothing — unless
//! the slot's `restart_lsn` is already at the confirmed position (an idle
//! slot): one below would be "no longer available", so they are the
//! confirmed position itself, the offset Debezium itself stores when it is
//! idle after a commit (`lsn` = `lsn_proc` = `lsn_commit`).

use tokio_postgres::Client;

use crate::Lsn;

/// Where a stopped slot stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotPosition {
    /// `confirmed_flush_lsn`.
    pub confirmed: Lsn,
    /// `restart_lsn` (the oldest WAL the slot keeps).
    pub restart: Lsn,
}

/// The offset to hand a slot at `at` back to the connector whose
/// `topic.prefix` is `topic_prefix`, as the JSON body of `PATCH
/// /connectors/<name>/offsets`; `now_micros` is its `ts_usec`.
pub fn offset_body(topic_prefix: &str, at: SlotPosition, now_micros: u64) -> serde_json::Value {
    let confirmed = at.confirmed;
    let before = confirmed
        .0
        .saturating_sub(1)
        .max(at.restart.0)
        .min(confirmed.0);
    serde_json::json!({"offsets": [{
        "partition": {"server": topic_prefix},
        "offset": {
            "lsn": before,
            "lsn_proc": before,
            "lsn_commit": confirmed.0,
            "ts_usec": now_micros,
        }
    }]})
}

/// The slot's confirmed position, or why it cannot be handed back: it does
/// not exist, or a walsender still streams from it (stop pgoutbox first).
pub async fn confirmed_position(client: &Client, slot: &str) -> Result<SlotPosition, String> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, active_pid, restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| format!("reading pg_replication_slots: {}", crate::redact::postgres_text(&e)))?
        .ok_or_else(|| format!("replication slot {slot:?} does not exist"))?;
    let (confirmed, active): (Option<String>, Option<i32>) = (row.get(0), row.get(1));
    if let Some(pid) = active {
        return Err(format!(
            "replication slot {slot:?} is still streamed by pid {pid}: stop pgoutbox first, so that the position handed to Debezium is final"
        ));
    }
    let confirmed = confirmed
        .ok_or_else(|| format!("replication slot {slot:?} has no confirmed position"))?
        .parse::<Lsn>()
        .map_err(|e| format!("slot {slot:?}: {e}"))?;
    let restart = row
        .get::<_, Option<String>>(2)
        .and_then(|r| r.parse::<Lsn>().ok())
        .unwrap_or(Lsn::ZERO);
    Ok(SlotPosition { confirmed, restart })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_ends_at_the_confirmed_commit_and_processed_nothing_after() {
        let at = SlotPosition {
            confirmed: Lsn(0x0C81_6F30),
            restart: Lsn(0x0C81_0000),
        };
        let body = offset_body("shop", at, 7);
        let offset = &body["offsets"][0];
        assert_eq!(offset["partition"]["server"], "shop");
        assert_eq!(offset["offset"]["lsn_commit"], 0x0C81_6F30u64);
        assert_eq!(offset["offset"]["lsn"], 0x0C81_6F2Fu64);
        assert_eq!(offset["offset"]["lsn_proc"], 0x0C81_6F2Fu64);
        assert_eq!(offset["offset"]["ts_usec"], 7);
    }

    #[test]
    fn an_idle_slot_is_handed_back_at_its_restart_point_never_below_it() {
        // restart_lsn caught up with the confirmed position: one below it
        // is refused by Debezium ("no longer available on the server").
        let at = SlotPosition {
            confirmed: Lsn(0x0248_3230),
            restart: Lsn(0x0248_3230),
        };
        let offset = &offset_body("shop", at, 7)["offsets"][0]["offset"];
        assert_eq!(offset["lsn"], 0x0248_3230u64);
        assert_eq!(offset["lsn_proc"], 0x0248_3230u64);
        assert_eq!(offset["lsn_commit"], 0x0248_3230u64);
    }
}
