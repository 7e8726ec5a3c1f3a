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
//! commit and the first event after it, so Debezium skips nothing.

use tokio_postgres::Client;

use crate::Lsn;

/// The offset to hand `slot` back to the connector whose `topic.prefix`
/// is `topic_prefix`, as the JSON body of `PATCH
/// /connectors/<name>/offsets`; `now_micros` is its `ts_usec`.
pub fn offset_body(topic_prefix: &str, confirmed: Lsn, now_micros: u64) -> serde_json::Value {
    let before = confirmed.0.saturating_sub(1);
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
pub async fn confirmed_position(client: &Client, slot: &str) -> Result<Lsn, String> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots WHERE slot_name = $1",
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
    confirmed
        .ok_or_else(|| format!("replication slot {slot:?} has no confirmed position"))?
        .parse::<Lsn>()
        .map_err(|e| format!("slot {slot:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_ends_at_the_confirmed_commit_and_processed_nothing_after() {
        let body = offset_body("shop", Lsn(0x0C81_6F30), 7);
        let offset = &body["offsets"][0];
        assert_eq!(offset["partition"]["server"], "shop");
        assert_eq!(offset["offset"]["lsn_commit"], 0x0C81_6F30u64);
        assert_eq!(offset["offset"]["lsn"], 0x0C81_6F2Fu64);
        assert_eq!(offset["offset"]["lsn_proc"], 0x0C81_6F2Fu64);
        assert_eq!(offset["offset"]["ts_usec"], 7);
    }
}
