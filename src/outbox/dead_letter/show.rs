//! `pgoutbox dle show`: one dead-lettered row in full, with the audit
//! history of its tracking id.

use serde::Serialize;
use serde_json::value::RawValue;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::{db, ts, AuditRecord, DeadLetterError, OutboxTable};

/// A dead-lettered row in full.
#[derive(Debug, Serialize)]
pub struct DeadLetterRow {
    /// Primary key, with `created_at`.
    pub id: i64,
    /// The event's tracking id.
    pub tracking_id: Uuid,
    /// Kind of aggregate.
    pub aggregate_type: String,
    /// The aggregate (Kafka key).
    pub aggregate_id: Uuid,
    /// What happened.
    pub event_type: String,
    /// Always `DEAD_LETTER`.
    pub status: String,
    /// Attempts made.
    pub retry_count: i32,
    /// Attempts allowed.
    pub max_retries: i32,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// When it was dead-lettered (CDC mode sets it), RFC 3339, UTC.
    pub processed_at: Option<String>,
    /// Lease end, if any.
    pub locked_until: Option<String>,
    /// Why it was dead-lettered.
    pub last_error: Option<String>,
    /// The payload as stored (JSON).
    pub payload: Box<RawValue>,
    /// The metadata as stored (JSON).
    pub metadata: Box<RawValue>,
    /// The payload, indented (`jsonb_pretty`).
    #[serde(skip)]
    pub payload_pretty: String,
    /// The metadata, indented (`jsonb_pretty`).
    #[serde(skip)]
    pub metadata_pretty: String,
    /// Earlier redrives and skips of this tracking id, oldest first.
    pub history: Vec<AuditRecord>,
}

/// PostgreSQL's jsonb text, always valid JSON (`null` if it ever were not).
fn raw_json(text: String) -> Box<RawValue> {
    RawValue::from_string(text).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// The dead-lettered row(s) with this tracking id (one in practice), with
/// the audit history of the id. [`DeadLetterError::NotFound`] when none.
pub async fn show<C: GenericClient>(
    client: &C,
    table: &OutboxTable,
    tracking_id: Uuid,
) -> Result<Vec<DeadLetterRow>, DeadLetterError> {
    let sql = format!(
        "SELECT id, tracking_id, aggregate_type, aggregate_id, event_type, status, retry_count, \
                max_retries, {created}, {processed}, {locked}, last_error, \
                payload::text, metadata::text, jsonb_pretty(payload), jsonb_pretty(metadata) \
           FROM {t} WHERE status = 'DEAD_LETTER' AND tracking_id = $1 \
          ORDER BY created_at, id",
        created = ts("created_at"),
        processed = ts("processed_at"),
        locked = ts("locked_until"),
        t = table.qualified(),
    );
    let rows = client
        .query(&sql, &[&tracking_id])
        .await
        .map_err(db("reading the dead-lettered row"))?;
    if rows.is_empty() {
        return Err(DeadLetterError::NotFound {
            table: table.to_string(),
            tracking_id,
        });
    }
    let history_sql = format!(
        "SELECT id, action, performed_by, {performed}, reason, row_count \
           FROM {audit} WHERE table_name = $1 AND $2 = ANY(tracking_ids) \
          ORDER BY performed_at, id",
        performed = ts("performed_at"),
        audit = table.audit(),
    );
    let history: Vec<AuditRecord> = client
        .query(&history_sql, &[&table.table, &tracking_id])
        .await
        .map_err(db("reading the audit table"))?
        .into_iter()
        .map(|r| AuditRecord {
            id: r.get(0),
            action: r.get(1),
            performed_by: r.get(2),
            performed_at: r.get(3),
            reason: r.get(4),
            row_count: r.get(5),
        })
        .collect();
    Ok(rows
        .into_iter()
        .map(|r| DeadLetterRow {
            id: r.get(0),
            tracking_id: r.get(1),
            aggregate_type: r.get(2),
            aggregate_id: r.get(3),
            event_type: r.get(4),
            status: r.get(5),
            retry_count: r.get(6),
            max_retries: r.get(7),
            created_at: r.get(8),
            processed_at: r.get(9),
            locked_until: r.get(10),
            last_error: r.get(11),
            payload: raw_json(r.get(12)),
            metadata: raw_json(r.get(13)),
            payload_pretty: r.get(14),
            metadata_pretty: r.get(15),
            history: history.clone(),
        })
        .collect())
}
