//! `pgoutbox dle redrive` and `skip`: one transaction that selects and
//! locks the rows, changes them and records the action in the audit table.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

use super::{check_reason, check_where, db, ts, Action, AuditRecord, DeadLetterError, OutboxTable};

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

/// The rows an action selected (and locked), in `created_at, id` order:
/// their keys and tracking ids.
struct Selected {
    ids: Vec<i64>,
    created: Vec<SystemTime>,
    tracking: Vec<Uuid>,
}

async fn act(
    client: &mut Client,
    table: &OutboxTable,
    action: Action,
    request: &ActionRequest,
) -> Result<ActionOutcome, DeadLetterError> {
    // Everything that can be refused is refused before connecting to rows.
    let reason = check_reason(action, request.reason.as_deref())?;
    let (given, condition) = selection_condition(&request.selection)?;
    let tx = begin(client, request.statement_timeout).await?;

    // 1. Select (and lock) the rows. The condition runs alone in this SELECT.
    let selected = select_rows(&tx, table, &request.selection, &condition, &given).await?;
    let found: HashSet<Uuid> = selected.tracking.iter().copied().collect();
    let not_dead_letter: Vec<Uuid> = given
        .iter()
        .copied()
        .filter(|id| !found.contains(id))
        .collect();
    if selected.tracking.is_empty() {
        drop(tx); // rolls back
        return Err(nothing_selected(
            action,
            table,
            &request.selection,
            not_dead_letter,
        ));
    }
    if request.dry_run {
        tx.rollback()
            .await
            .map_err(db("rolling back the dry run"))?;
        return Ok(ActionOutcome {
            action,
            table: table.to_string(),
            dry_run: true,
            tracking_ids: selected.tracking,
            not_dead_letter,
            audit: None,
        });
    }

    // 2. Change exactly those rows, still only if dead-lettered.
    let changed = apply(&tx, table, action, &selected, &reason).await?;
    if let (Action::Redrive, Some(prefix)) = (action, &table.announce_prefix) {
        announce(&tx, table, prefix, &selected.ids, &selected.created).await?;
    }

    // 3. The audit entry, in the same transaction.
    let audit = record(&tx, table, action, &reason, &changed).await?;
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

/// The distinct tracking ids given (none for a condition) and the SQL
/// condition that selects the rows; refuses an empty selection and an
/// unsafe condition.
fn selection_condition(selection: &Selection) -> Result<(Vec<Uuid>, String), DeadLetterError> {
    match selection {
        Selection::Ids(ids) => {
            let mut seen = HashSet::new();
            let given: Vec<Uuid> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
            if given.is_empty() {
                return Err(DeadLetterError::NoSelection);
            }
            Ok((given, "tracking_id = ANY($1::uuid[])".to_owned()))
        }
        Selection::Where(w) => {
            check_where(w)?;
            Ok((Vec::new(), format!("({w})")))
        }
    }
}

/// Starts the action's transaction, under `statement_timeout`.
async fn begin(
    client: &mut Client,
    statement_timeout: Duration,
) -> Result<Transaction<'_>, DeadLetterError> {
    let tx = client
        .build_transaction()
        .read_only(false)
        .start()
        .await
        .map_err(db("starting a transaction"))?;
    let timeout_ms = statement_timeout.as_millis().clamp(1, i32::MAX as u128);
    tx.execute(
        "SELECT set_config('statement_timeout', $1, true)",
        &[&format!("{timeout_ms}ms")],
    )
    .await
    .map_err(db("setting statement_timeout"))?;
    Ok(tx)
}

/// Selects and locks (`FOR UPDATE`) the dead-lettered rows `condition`
/// matches.
async fn select_rows(
    tx: &Transaction<'_>,
    table: &OutboxTable,
    selection: &Selection,
    condition: &str,
    given: &[Uuid],
) -> Result<Selected, DeadLetterError> {
    let t = table.qualified();
    let select_sql = format!(
        "SELECT id, created_at, tracking_id FROM {t} \
          WHERE status = 'DEAD_LETTER' AND {condition} \
          ORDER BY created_at, id FOR UPDATE"
    );
    let selected = match selection {
        Selection::Ids(_) => tx.query(&select_sql, &[&given]).await,
        Selection::Where(_) => tx.query(&select_sql, &[]).await,
    }
    .map_err(db(match selection {
        Selection::Ids(_) => "selecting the dead-lettered rows",
        Selection::Where(_) => "selecting the dead-lettered rows matching --where",
    }))?;
    let mut rows = Selected {
        ids: Vec::with_capacity(selected.len()),
        created: Vec::with_capacity(selected.len()),
        tracking: Vec::with_capacity(selected.len()),
    };
    for r in &selected {
        rows.ids.push(r.get(0));
        rows.created.push(r.get(1));
        rows.tracking.push(r.get(2));
    }
    Ok(rows)
}

/// The error when the selection found no dead-lettered row.
fn nothing_selected(
    action: Action,
    table: &OutboxTable,
    selection: &Selection,
    not_dead_letter: Vec<Uuid>,
) -> DeadLetterError {
    match selection {
        Selection::Ids(_) => DeadLetterError::NoneDeadLettered {
            action,
            table: table.to_string(),
            ids: not_dead_letter,
        },
        Selection::Where(_) => DeadLetterError::NoWhereMatch {
            action,
            table: table.to_string(),
        },
    }
}

/// Applies `action` to the selected rows, still only if dead-lettered;
/// returns the tracking ids of the rows changed.
async fn apply(
    tx: &Transaction<'_>,
    table: &OutboxTable,
    action: Action,
    selected: &Selected,
    reason: &str,
) -> Result<Vec<Uuid>, DeadLetterError> {
    let t = table.qualified();
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
    let (ids, created) = (&selected.ids, &selected.created);
    let updated = match action {
        Action::Redrive => tx.query(&update_sql, &[ids, created]).await,
        Action::Skip => tx.query(&update_sql, &[ids, created, &reason]).await,
    }
    .map_err(db("updating the dead-lettered rows"))?;
    Ok(updated.iter().map(|r| r.get(0)).collect())
}

/// Writes the audit entry of the action, in its transaction.
async fn record(
    tx: &Transaction<'_>,
    table: &OutboxTable,
    action: Action,
    reason: &str,
    changed: &[Uuid],
) -> Result<AuditRecord, DeadLetterError> {
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
    Ok(AuditRecord {
        id: a.get(0),
        action: a.get(1),
        performed_by: a.get(2),
        performed_at: a.get(3),
        reason: a.get(4),
        row_count: a.get(5),
    })
}

/// Writes each redriven row as a transactional logical message in the
/// redrive's transaction, in the table-less envelope plus the row's key
/// (see [`crate::outbox::envelope`]): a CDC relay publishes it and marks the
/// row `COMPLETED`. Only when the server decodes logically and a logical
/// slot exists on this database; a poller delivers the `PENDING` row itself.
async fn announce(
    tx: &Transaction<'_>,
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
