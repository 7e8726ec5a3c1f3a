//! Dead-letter governance: listing, inspecting, redriving and skipping the
//! outbox rows in status `DEAD_LETTER` (what `pgoutbox dle` runs).
//!
//! Every query filters on `status = 'DEAD_LETTER'`, so PostgreSQL can use the
//! partial index `<table>_dead_letter_idx` and never scans the live rows.
//!
//! A redrive or a skip needs a reason (no blind redrive) and is recorded in
//! `<schema>.pgoutbox_dead_letter_actions` in the same transaction as the
//! status change:
//! - redrive: `status = 'PENDING', retry_count = 0`, lease and
//!   `processed_at` cleared; `last_error` is kept as history until the next
//!   attempt overwrites it;
//! - skip: `status = 'COMPLETED', processed_at = NULL`,
//!   `last_error = 'skipped by operator: <reason>'` (a `COMPLETED` row without
//!   `processed_at` was never delivered).
//!
//! Rows are chosen by tracking id or by an operator's SQL condition
//! (`--where`). The condition is raw SQL: it is checked for the obvious
//! mistakes (`;`, comments, unbalanced parentheses), evaluated in its own
//! `SELECT … FOR UPDATE` under a statement timeout, and the `UPDATE` that
//! follows names the selected rows by primary key and re-checks
//! `status = 'DEAD_LETTER'`, so no condition can change a row that is not
//! dead-lettered.

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::value::RawValue;
use tokio_postgres::{Client, GenericClient};
use uuid::Uuid;

use crate::config::quote_ident;
use crate::error::postgres_text;

/// The audit table, in the outbox's schema.
pub const AUDIT_TABLE: &str = "pgoutbox_dead_letter_actions";

/// Most rows `list` returns.
pub const MAX_LIST_LIMIT: i64 = 10_000;

/// Most error groups `list` returns.
const MAX_ERROR_GROUPS: i64 = 20;

/// Characters of `last_error` that make an error group.
const ERROR_GROUP_CHARS: i32 = 160;

/// The outbox table the commands work on. Both names must already be valid
/// identifiers (see [`crate::config::validate_identifier`]).
#[derive(Clone, Debug)]
pub struct OutboxTable {
    /// Schema of the outbox table (also holds the audit table).
    pub schema: String,
    /// The outbox table.
    pub table: String,
    /// The logical message prefix a CDC relay of this table reads events
    /// under (`cdc.message_prefix`), or `None` when it relays no messages.
    /// A redrive announces each row under it, so a CDC relay publishes the
    /// row again (its publication carries inserts only, not the redrive's
    /// update).
    pub announce_prefix: Option<String>,
}

impl OutboxTable {
    /// `"schema"."table"`.
    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    /// `"schema".pgoutbox_dead_letter_actions`.
    fn audit(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), AUDIT_TABLE)
    }
}

impl fmt::Display for OutboxTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// What an operator does to dead-lettered rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Back to `PENDING` with `retry_count = 0`: published again.
    Redrive,
    /// To `COMPLETED` with `processed_at = NULL`: never published, and no
    /// longer blocks its aggregate.
    Skip,
}

impl Action {
    /// The name recorded in the audit table.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Redrive => "redrive",
            Action::Skip => "skip",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a dead-letter command failed. Messages are one line and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// `--reason` missing, empty or blank.
    #[error(
        "refusing a blind {0}: pass --reason \"<root cause>\" saying why these rows failed and what was fixed (it is recorded in the audit table)"
    )]
    MissingReason(Action),
    /// Neither tracking ids nor a condition.
    #[error("nothing selected: pass one or more tracking ids, or --where \"<SQL condition>\"")]
    NoSelection,
    /// The `--where` text was refused before running.
    #[error("--where refused: {0}")]
    UnsafeWhere(String),
    /// `--limit` out of range.
    #[error("--limit must be between 1 and {MAX_LIST_LIMIT}, not {0}")]
    BadLimit(i64),
    /// `show` found no dead-lettered row.
    #[error(
        "no DEAD_LETTER row in {table} has tracking_id {tracking_id} (already redriven or skipped, or never dead-lettered); `pgoutbox dle list` shows the current ones"
    )]
    NotFound {
        /// The outbox table.
        table: String,
        /// The id asked for.
        tracking_id: Uuid,
    },
    /// None of the given tracking ids is dead-lettered.
    #[error(
        "nothing to {action}: no DEAD_LETTER row in {table} has tracking_id {} (already redriven or skipped, or never dead-lettered); nothing was changed", list_ids(.ids)
    )]
    NoneDeadLettered {
        /// What was asked.
        action: Action,
        /// The outbox table.
        table: String,
        /// The ids given.
        ids: Vec<Uuid>,
    },
    /// The condition matched no dead-lettered row.
    #[error(
        "nothing to {action}: no DEAD_LETTER row in {table} matches --where; nothing was changed"
    )]
    NoWhereMatch {
        /// What was asked.
        action: Action,
        /// The outbox table.
        table: String,
    },
    /// PostgreSQL refused or failed; `context` says what was being done.
    #[error("{context}: {}", postgres_text(.source))]
    Database {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
}

fn db(context: &str) -> impl FnOnce(tokio_postgres::Error) -> DeadLetterError + '_ {
    move |source| DeadLetterError::Database {
        context: context.to_owned(),
        source,
    }
}

/// At most ten ids, then how many more.
fn list_ids(ids: &[Uuid]) -> String {
    const SHOWN: usize = 10;
    let mut s = ids
        .iter()
        .take(SHOWN)
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > SHOWN {
        s.push_str(&format!(" and {} more", ids.len() - SHOWN));
    }
    s
}

/// `to_char` of a timestamptz column as RFC 3339 UTC (`NULL` stays `NULL`).
fn ts(column: &str) -> String {
    format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
}

/// Checks a reason: present and not blank. Returns it trimmed.
pub fn check_reason(action: Action, reason: Option<&str>) -> Result<String, DeadLetterError> {
    match reason.map(str::trim) {
        Some(r) if !r.is_empty() => Ok(r.to_owned()),
        _ => Err(DeadLetterError::MissingReason(action)),
    }
}

/// Checks an operator's SQL condition for the obvious mistakes: empty, a `;`
/// (one condition, never statements), SQL comments, dollar quoting or
/// parameters, an unterminated quote, unbalanced parentheses. It stays raw
/// SQL: anything else PostgreSQL accepts in a `WHERE` is allowed.
pub fn check_where(condition: &str) -> Result<(), DeadLetterError> {
    let refuse = |why: &str| Err(DeadLetterError::UnsafeWhere(why.to_owned()));
    if condition.trim().is_empty() {
        return refuse(
            "it is empty; pass an SQL condition over the outbox columns, e.g. --where \"event_type = 'OrderShipped'\"",
        );
    }
    if condition.contains(';') {
        return refuse("it contains ';'; pass a single SQL condition, not statements");
    }
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut chars = condition.chars().peekable();
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            if c == q {
                if chars.peek() == Some(&q) {
                    chars.next(); // doubled quote: an escaped one
                } else {
                    quote = None;
                }
            }
            continue;
        }
        match c {
            '\'' | '"' => quote = Some(c),
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return refuse("unbalanced parentheses (a ')' closes nothing)");
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                return refuse("it contains an SQL comment ('--')");
            }
            '/' if chars.peek() == Some(&'*') => {
                return refuse("it contains an SQL comment ('/*')");
            }
            '$' => {
                return refuse(
                    "'$' (dollar quoting or a parameter) is not supported; use '...' literals",
                );
            }
            _ => {}
        }
    }
    if quote.is_some() {
        return refuse("unterminated quoted string or identifier");
    }
    if depth != 0 {
        return refuse("unbalanced parentheses (a '(' is never closed)");
    }
    Ok(())
}

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

/// One entry of the audit table.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRecord {
    /// Its id.
    pub id: i64,
    /// `redrive` or `skip`.
    pub action: String,
    /// The database role that did it.
    pub performed_by: String,
    /// RFC 3339, UTC.
    pub performed_at: String,
    /// The operator's reason.
    pub reason: String,
    /// Rows changed by that action.
    pub row_count: i32,
}

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

/// Which dead-lettered rows an action applies to.
#[derive(Clone, Debug)]
pub enum Selection {
    /// These tracking ids.
    Ids(Vec<Uuid>),
    /// An operator's SQL condition over the outbox columns (raw SQL, see
    /// [`check_where`]); only `DEAD_LETTER` rows are ever selected.
    Where(String),
}

/// A redrive or skip request.
#[derive(Clone, Debug)]
pub struct ActionRequest {
    /// The rows.
    pub selection: Selection,
    /// The root cause and fix; required, recorded in the audit table.
    pub reason: Option<String>,
    /// Only count (and name) the rows that would change; change nothing.
    pub dry_run: bool,
    /// `statement_timeout` for the transaction.
    pub statement_timeout: Duration,
}

/// What a redrive or skip did (or, in a dry run, would do).
#[derive(Clone, Debug, Serialize)]
pub struct ActionOutcome {
    /// `redrive` or `skip`.
    pub action: Action,
    /// The table.
    pub table: String,
    /// True when nothing was changed.
    pub dry_run: bool,
    /// Tracking ids of the rows changed (or that would be).
    pub tracking_ids: Vec<Uuid>,
    /// Ids given that are not dead-lettered rows (nothing done to them).
    pub not_dead_letter: Vec<Uuid>,
    /// The audit entry written (none in a dry run).
    pub audit: Option<AuditRecord>,
}

/// Redrives dead-lettered rows: `PENDING`, `retry_count = 0`, lease and
/// `processed_at` cleared, `last_error` kept; audited.
pub async fn redrive(
    client: &mut Client,
    table: &OutboxTable,
    request: &ActionRequest,
) -> Result<ActionOutcome, DeadLetterError> {
    act(client, table, Action::Redrive, request).await
}

/// Skips dead-lettered rows: `COMPLETED` with `processed_at = NULL` and
/// `last_error = 'skipped by operator: <reason>'`; audited.
pub async fn skip(
    client: &mut Client,
    table: &OutboxTable,
    request: &ActionRequest,
) -> Result<ActionOutcome, DeadLetterError> {
    act(client, table, Action::Skip, request).await
}

async fn act(
    client: &mut Client,
    table: &OutboxTable,
    action: Action,
    request: &ActionRequest,
) -> Result<ActionOutcome, DeadLetterError> {
    // Everything that can be refused is refused before connecting to rows.
    let reason = check_reason(action, request.reason.as_deref())?;
    let mut given: Vec<Uuid> = Vec::new();
    let condition = match &request.selection {
        Selection::Ids(ids) => {
            let mut seen = HashSet::new();
            given = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
            if given.is_empty() {
                return Err(DeadLetterError::NoSelection);
            }
            "tracking_id = ANY($1::uuid[])".to_owned()
        }
        Selection::Where(w) => {
            check_where(w)?;
            format!("({w})")
        }
    };
    let t = table.qualified();
    let tx = client
        .build_transaction()
        .read_only(false)
        .start()
        .await
        .map_err(db("starting a transaction"))?;
    let timeout_ms = request
        .statement_timeout
        .as_millis()
        .clamp(1, i32::MAX as u128);
    tx.execute(
        "SELECT set_config('statement_timeout', $1, true)",
        &[&format!("{timeout_ms}ms")],
    )
    .await
    .map_err(db("setting statement_timeout"))?;

    // 1. Select (and lock) the rows. The condition runs alone in this SELECT.
    let select_sql = format!(
        "SELECT id, created_at, tracking_id FROM {t} \
          WHERE status = 'DEAD_LETTER' AND {condition} \
          ORDER BY created_at, id FOR UPDATE"
    );
    let selected = match &request.selection {
        Selection::Ids(_) => tx.query(&select_sql, &[&given]).await,
        Selection::Where(_) => tx.query(&select_sql, &[]).await,
    }
    .map_err(db(match &request.selection {
        Selection::Ids(_) => "selecting the dead-lettered rows",
        Selection::Where(_) => "selecting the dead-lettered rows matching --where",
    }))?;
    let mut ids: Vec<i64> = Vec::with_capacity(selected.len());
    let mut created: Vec<SystemTime> = Vec::with_capacity(selected.len());
    let mut tracking: Vec<Uuid> = Vec::with_capacity(selected.len());
    for r in &selected {
        ids.push(r.get(0));
        created.push(r.get(1));
        tracking.push(r.get(2));
    }
    let found: HashSet<Uuid> = tracking.iter().copied().collect();
    let not_dead_letter: Vec<Uuid> = given
        .iter()
        .copied()
        .filter(|id| !found.contains(id))
        .collect();

    if tracking.is_empty() {
        drop(tx); // rolls back
        return Err(match &request.selection {
            Selection::Ids(_) => DeadLetterError::NoneDeadLettered {
                action,
                table: table.to_string(),
                ids: not_dead_letter,
            },
            Selection::Where(_) => DeadLetterError::NoWhereMatch {
                action,
                table: table.to_string(),
            },
        });
    }
    if request.dry_run {
        tx.rollback()
            .await
            .map_err(db("rolling back the dry run"))?;
        return Ok(ActionOutcome {
            action,
            table: table.to_string(),
            dry_run: true,
            tracking_ids: tracking,
            not_dead_letter,
            audit: None,
        });
    }

    // 2. Change exactly those rows, still only if dead-lettered.
    let set = match action {
        Action::Redrive => {
            "status = 'PENDING', retry_count = 0, locked_until = NULL, lock_token = NULL, \
             processed_at = NULL"
        }
        Action::Skip => {
            "status = 'COMPLETED', processed_at = NULL, locked_until = NULL, lock_token = NULL, \
             last_error = 'skipped by operator: ' || $3::text"
        }
    };
    let update_sql = format!(
        "UPDATE {t} AS o SET {set} \
           FROM unnest($1::bigint[], $2::timestamptz[]) AS k(id, created_at) \
          WHERE o.id = k.id AND o.created_at = k.created_at AND o.status = 'DEAD_LETTER' \
          RETURNING o.tracking_id"
    );
    let updated = match action {
        Action::Redrive => tx.query(&update_sql, &[&ids, &created]).await,
        Action::Skip => tx.query(&update_sql, &[&ids, &created, &reason]).await,
    }
    .map_err(db("updating the dead-lettered rows"))?;
    let changed: Vec<Uuid> = updated.iter().map(|r| r.get(0)).collect();
    if let (Action::Redrive, Some(prefix)) = (action, &table.announce_prefix) {
        announce(&tx, table, prefix, &ids, &created).await?;
    }

    // 3. The audit entry, in the same transaction.
    let audit_sql = format!(
        "INSERT INTO {audit} (action, table_name, reason, tracking_ids, row_count) \
         VALUES ($1, $2, $3, $4, $5) \
         RETURNING id, action, performed_by, {performed}, reason, row_count",
        audit = table.audit(),
        performed = ts("performed_at"),
    );
    let row_count = i32::try_from(changed.len()).unwrap_or(i32::MAX);
    let a = tx
        .query_one(
            &audit_sql,
            &[
                &action.as_str(),
                &table.table,
                &reason,
                &changed,
                &row_count,
            ],
        )
        .await
        .map_err(db("recording the action in the audit table"))?;
    let audit = AuditRecord {
        id: a.get(0),
        action: a.get(1),
        performed_by: a.get(2),
        performed_at: a.get(3),
        reason: a.get(4),
        row_count: a.get(5),
    };
    tx.commit()
        .await
        .map_err(db("committing the action and its audit entry"))?;
    Ok(ActionOutcome {
        action,
        table: table.to_string(),
        dry_run: false,
        tracking_ids: changed,
        not_dead_letter,
        audit: Some(audit),
    })
}

/// Writes each redriven row as a transactional logical message in the
/// redrive's transaction, in the table-less envelope plus the row's key
/// (see [`crate::outbox::envelope`]): a CDC relay publishes it and marks the
/// row `COMPLETED`. Only when the server decodes logically and a logical
/// slot exists on this database; a poller delivers the `PENDING` row itself.
async fn announce(
    tx: &tokio_postgres::Transaction<'_>,
    table: &OutboxTable,
    prefix: &str,
    ids: &[i64],
    created: &[SystemTime],
) -> Result<(), DeadLetterError> {
    let t = table.qualified();
    let sql = format!(
        "SELECT count(pg_logical_emit_message(true, $1, jsonb_build_object( \
                  'tracking_id', o.tracking_id, 'aggregate_type', o.aggregate_type, \
                  'aggregate_id', o.aggregate_id, 'event_type', o.event_type, \
                  'payload', o.payload, 'metadata', o.metadata, \
                  'created_at', o.created_at::text, \
                  'row', jsonb_build_object('table', $2::text, 'id', o.id::text, \
                         'created_at', to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00') \
                )::text)) \
           FROM {t} AS o JOIN unnest($3::bigint[], $4::timestamptz[]) AS k(id, created_at) \
             ON o.id = k.id AND o.created_at = k.created_at \
          WHERE current_setting('wal_level') = 'logical' \
            AND EXISTS (SELECT 1 FROM pg_replication_slots \
                         WHERE slot_type = 'logical' AND database = current_database())"
    );
    tx.query_one(&sql, &[&prefix, &table.table, &ids, &created])
        .await
        .map_err(db("announcing the redriven rows to CDC relays"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_reasons_are_refused() {
        for r in [None, Some(""), Some("  \t\n")] {
            let e = check_reason(Action::Redrive, r).unwrap_err().to_string();
            assert!(e.contains("--reason") && !e.contains('\n'), "{e}");
        }
        assert_eq!(
            check_reason(Action::Skip, Some(" broker ACL fixed ")).unwrap(),
            "broker ACL fixed"
        );
    }

    #[test]
    fn where_conditions() {
        for ok in [
            "event_type = 'OrderCreated'",
            "last_error LIKE '%too large%' AND (aggregate_type = 'Order' OR aggregate_type = 'Cart')",
            "payload->>'note' = 'it''s ; fine? no'",
        ] {
            // The ';' inside a literal is still refused: the check is simple on purpose.
            let r = check_where(ok);
            assert_eq!(r.is_ok(), !ok.contains(';'), "{ok}: {r:?}");
        }
        for bad in [
            "",
            "  ",
            "true; DELETE FROM outbox",
            "true) OR (true",
            "(true",
            "true -- comment",
            "true /* c */",
            "payload::text = $$x$$",
            "event_type = 'unterminated",
            "\"odd",
        ] {
            assert!(check_where(bad).is_err(), "{bad}");
        }
        assert!(check_where("x = '('").is_ok());
        assert!(check_where("\"weird)\" = 1").is_ok());
    }

    #[test]
    fn errors_are_one_line() {
        let e = DeadLetterError::NoneDeadLettered {
            action: Action::Redrive,
            table: "public.outbox".into(),
            ids: (0..12).map(|_| Uuid::new_v4()).collect(),
        }
        .to_string();
        assert!(e.contains("and 2 more") && !e.contains('\n'), "{e}");
    }
}
