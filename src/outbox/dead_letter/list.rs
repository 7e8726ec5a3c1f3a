//! `pgoutbox dle list`: the dead-lettered rows matching a filter, and how
//! many share each error.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::{db, ts, DeadLetterError, OutboxTable, MAX_LIST_LIMIT};

/// Most error groups `list` returns.
const MAX_ERROR_GROUPS: i64 = 20;

/// Characters of `last_error` that make an error group.
const ERROR_GROUP_CHARS: i32 = 160;

/// Filters for [`list`].
#[derive(Clone, Debug)]
pub struct ListFilter {
    /// Only this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only rows created longer ago than this.
    pub older_than: Option<Duration>,
    /// At most this many rows (newest first), 1 to [`MAX_LIST_LIMIT`].
    pub limit: i64,
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter {
            aggregate_type: None,
            event_type: None,
            older_than: None,
            limit: 50,
        }
    }
}

/// One dead-lettered row, as listed.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetterSummary {
    /// The event's tracking id.
    pub tracking_id: Uuid,
    /// Primary key, with `created_at`.
    pub id: i64,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Kind of aggregate.
    pub aggregate_type: String,
    /// The aggregate (Kafka key).
    pub aggregate_id: Uuid,
    /// What happened.
    pub event_type: String,
    /// Attempts made.
    pub retry_count: i32,
    /// Attempts allowed.
    pub max_retries: i32,
    /// Why it was dead-lettered (in full).
    pub last_error: Option<String>,
}

/// How many matching rows share an error (its first line, truncated).
#[derive(Clone, Debug, Serialize)]
pub struct ErrorCount {
    /// The error's first line, at most 160 characters (`""` when none).
    pub error: String,
    /// Rows with it.
    pub count: i64,
}

/// What [`list`] returns.
#[derive(Clone, Debug, Serialize)]
pub struct Listing {
    /// The table listed.
    pub table: String,
    /// Matching dead-lettered rows in all.
    pub total: i64,
    /// The newest matching rows, newest first, at most the filter's limit.
    pub rows: Vec<DeadLetterSummary>,
    /// Matching rows grouped by error, most frequent first (at most 20 groups).
    pub by_error: Vec<ErrorCount>,
    /// How many distinct error groups there are (may exceed `by_error`).
    pub error_groups: i64,
}

const LIST_FILTER_SQL: &str = "status = 'DEAD_LETTER' \
   AND ($1::text IS NULL OR aggregate_type = $1) \
   AND ($2::text IS NULL OR event_type = $2) \
   AND ($3::float8 IS NULL OR created_at < now() - make_interval(secs => $3::float8))";

/// The dead-lettered rows matching `filter`, newest first, with counts by
/// error over all matching rows.
pub async fn list<C: GenericClient>(
    client: &C,
    table: &OutboxTable,
    filter: &ListFilter,
) -> Result<Listing, DeadLetterError> {
    if !(1..=MAX_LIST_LIMIT).contains(&filter.limit) {
        return Err(DeadLetterError::BadLimit(filter.limit));
    }
    let t = table.qualified();
    let older: Option<f64> = filter.older_than.map(|d| d.as_secs_f64());
    let rows_sql = format!(
        "SELECT tracking_id, id, {created}, aggregate_type, aggregate_id, event_type, \
                retry_count, max_retries, last_error \
           FROM {t} WHERE {LIST_FILTER_SQL} \
          ORDER BY created_at DESC, id DESC LIMIT $4",
        created = ts("created_at"),
    );
    let rows = client
        .query(
            &rows_sql,
            &[
                &filter.aggregate_type,
                &filter.event_type,
                &older,
                &filter.limit,
            ],
        )
        .await
        .map_err(db("listing dead-lettered rows"))?
        .into_iter()
        .map(|r| DeadLetterSummary {
            tracking_id: r.get(0),
            id: r.get(1),
            created_at: r.get(2),
            aggregate_type: r.get(3),
            aggregate_id: r.get(4),
            event_type: r.get(5),
            retry_count: r.get(6),
            max_retries: r.get(7),
            last_error: r.get(8),
        })
        .collect();
    let counts_sql = format!(
        "SELECT error, n, (sum(n) OVER ())::bigint, count(*) OVER () FROM ( \
           SELECT left(split_part(coalesce(last_error, ''), E'\\n', 1), {ERROR_GROUP_CHARS}) AS error, \
                  count(*) AS n \
             FROM {t} WHERE {LIST_FILTER_SQL} GROUP BY 1) g \
          ORDER BY n DESC, error LIMIT {MAX_ERROR_GROUPS}"
    );
    let groups = client
        .query(
            &counts_sql,
            &[&filter.aggregate_type, &filter.event_type, &older],
        )
        .await
        .map_err(db("counting dead-lettered rows by error"))?;
    let total = groups.first().map(|r| r.get::<_, i64>(2)).unwrap_or(0);
    let error_groups = groups.first().map(|r| r.get::<_, i64>(3)).unwrap_or(0);
    let by_error = groups
        .into_iter()
        .map(|r| ErrorCount {
            error: r.get(0),
            count: r.get(1),
        })
        .collect();
    Ok(Listing {
        table: table.to_string(),
        total,
        rows,
        by_error,
        error_groups,
    })
}
