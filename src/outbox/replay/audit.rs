//! The replay audit trail: one row of `<schema>.pgoutbox_replays` per
//! replay, inserted before the first event is sent (its id marks every
//! replayed record) and completed when the replay ends. Dry runs are not
//! recorded.

use serde::Serialize;
use tokio_postgres::Client;

use super::selection::ReplaySelection;
use super::timestamp::Timestamp;
use super::{db, ReplayError};
use crate::config::quote_ident;

/// The audit table, in the outbox's schema.
pub const AUDIT_TABLE: &str = "pgoutbox_replays";

/// What is recorded when a replay starts.
#[derive(Clone, Debug)]
pub struct AuditStart<'a> {
    /// The outbox table's schema (which holds the audit table).
    pub schema: &'a str,
    /// The outbox table.
    pub table: &'a str,
    /// The operator's reason.
    pub reason: &'a str,
    /// The selection as given.
    pub selection: &'a ReplaySelection,
    /// The exclusive end of the time range actually used (`--to`, or the
    /// replay's start).
    pub until: Timestamp,
    /// `--topic`, when every event goes to one topic.
    pub target_topic: Option<&'a str>,
    /// `--rate`, events per second.
    pub rate: Option<f64>,
    /// Events the selection held at the start.
    pub selected: i64,
}

/// The audit entry of a replay.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayAudit {
    /// Its id: the value of the `pgoutbox_replay` header.
    pub id: i64,
    /// The database role that ran the replay.
    pub performed_by: String,
    /// When it started, RFC 3339 UTC.
    pub started_at: String,
}

/// How a replay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayEnd {
    /// Every selected event was sent and acknowledged (or refused for good,
    /// counted apart).
    Completed,
    /// Kafka (or PostgreSQL) failed; what was acknowledged is counted.
    Failed,
    /// Stopped by the operator (SIGINT / SIGTERM).
    Interrupted,
}

impl ReplayEnd {
    /// The name recorded in the audit table.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayEnd::Completed => "completed",
            ReplayEnd::Failed => "failed",
            ReplayEnd::Interrupted => "interrupted",
        }
    }
}

fn audit_table(schema: &str) -> String {
    format!("{}.{AUDIT_TABLE}", quote_ident(schema))
}

/// Records that a replay starts; refuses when the audit table is missing.
pub async fn begin_audit(
    client: &Client,
    start: &AuditStart<'_>,
) -> Result<ReplayAudit, ReplayError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
            &[&start.schema, &AUDIT_TABLE],
        )
        .await
        .map_err(db("looking for the replay audit table"))?
        .get(0);
    if !exists {
        return Err(ReplayError::NoAuditTable(format!(
            "{}.{AUDIT_TABLE}",
            start.schema
        )));
    }
    let mut selection = serde_json::to_value(start.selection).unwrap_or_default();
    if let Some(fields) = selection.as_object_mut() {
        fields.insert("until".into(), start.until.to_string().into());
    }
    let sql = format!(
        "INSERT INTO {} (table_name, reason, selection, target_topic, rate_limit, selected) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         RETURNING id, performed_by, \
                   to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        audit_table(start.schema)
    );
    let row = client
        .query_one(
            &sql,
            &[
                &start.table,
                &start.reason,
                &selection,
                &start.target_topic,
                &start.rate,
                &start.selected,
            ],
        )
        .await
        .map_err(db("recording the replay in the audit table"))?;
    Ok(ReplayAudit {
        id: row.get(0),
        performed_by: row.get(1),
        started_at: row.get(2),
    })
}

/// Records how replay `id` ended: events acknowledged (`sent`), refused for
/// good, and the error that stopped it.
pub async fn finish_audit(
    client: &Client,
    schema: &str,
    id: i64,
    end: ReplayEnd,
    sent: u64,
    refused: u64,
    error: Option<&str>,
) -> Result<(), ReplayError> {
    let sql = format!(
        "UPDATE {} SET finished_at = now(), outcome = $2, sent = $3, refused = $4, error = $5 \
          WHERE id = $1",
        audit_table(schema)
    );
    let (sent, refused) = (
        i64::try_from(sent).unwrap_or(i64::MAX),
        i64::try_from(refused).unwrap_or(i64::MAX),
    );
    client
        .execute(&sql, &[&id, &end.as_str(), &sent, &refused, &error])
        .await
        .map_err(db("recording the end of the replay in the audit table"))?;
    Ok(())
}
