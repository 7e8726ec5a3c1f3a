//! What a batch of marks becomes on the mark writer's connection: the
//! statements of each outbox table (`COMPLETED` and `DEAD_LETTER` updates,
//! dead messages, journal entries), prepared once per connection, and the
//! batch split into statements of at most `cdc.mark_batch_size` rows —
//! journal entries sent together in one round trip.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::{JournalState, Mark, MarkKind};
use crate::outbox::RowKey;

/// The statements of the writer for `target` and its dead-letter table.
fn statements(target: &str, dead_table: &str) -> Statements {
    // Logical decoding can send a transaction a moment before its commit is
    // visible to other sessions, so an update may not see a row yet. Each
    // statement therefore also returns the keys it could not see at all;
    // those are retried (see `run`), never silently counted as marked. Only
    // keys the update did not change are looked up again (rows already
    // COMPLETED, or not visible): a second index probe for every row cost
    // about a sixth of the statement.
    let completed_sql = format!(
        "WITH k AS (SELECT * FROM unnest($1::text[], $2::text[]) AS k(id, created_at)), \
              u AS (UPDATE {target} AS o SET status = 'COMPLETED', processed_at = now() FROM k \
                     WHERE o.id = k.id::bigint AND o.created_at = k.created_at::timestamptz \
                       AND o.status IN ('PENDING', 'PROCESSING', 'FAILED') RETURNING o.id) \
         SELECT k.id FROM k WHERE k.id::bigint NOT IN (SELECT id FROM u) \
            AND NOT EXISTS (SELECT 1 FROM {target} AS o \
                WHERE o.id = k.id::bigint AND o.created_at = k.created_at::timestamptz)"
    );
    let dead_sql = format!(
        "WITH k AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k(id, created_at, err)), \
              u AS (UPDATE {target} AS o SET status = 'DEAD_LETTER', processed_at = now(), last_error = k.err, \
                       locked_until = NULL, lock_token = NULL FROM k \
                     WHERE o.id = k.id::bigint AND o.created_at = k.created_at::timestamptz RETURNING 1) \
         SELECT k.id FROM k WHERE NOT EXISTS (SELECT 1 FROM {target} AS o \
                WHERE o.id = k.id::bigint AND o.created_at = k.created_at::timestamptz)"
    );
    let message_sql = format!(
        "INSERT INTO {dead_table} (lsn, prefix, content, error) \
         SELECT k.lsn::pg_lsn, k.prefix, k.content, k.err \
           FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[]) AS k(lsn, prefix, content, err)"
    );
    Statements {
        completed: completed_sql,
        dead: dead_sql,
        message: message_sql,
    }
}

pub(super) fn text(b: &Bytes) -> &str {
    std::str::from_utf8(b).unwrap_or("")
}

struct Statements {
    completed: String,
    dead: String,
    message: String,
}

/// The statements, each prepared once per connection on its first use: a
/// table that cannot be marked (no status column, invariant 12) only ever
/// gets `message`, the others would not even prepare.
#[derive(Default)]
pub(super) struct Prepared {
    completed: Option<tokio_postgres::Statement>,
    journal: Option<tokio_postgres::Statement>,
    dead: Option<tokio_postgres::Statement>,
    message: Option<tokio_postgres::Statement>,
}

async fn prepared<'a>(
    client: &tokio_postgres::Client,
    slot: &'a mut Option<tokio_postgres::Statement>,
    sql: &str,
) -> Result<&'a tokio_postgres::Statement, tokio_postgres::Error> {
    if slot.is_none() {
        *slot = Some(client.prepare(sql).await?);
    }
    Ok(slot.as_ref().expect("prepared just above"))
}

/// The statements of every table marked so far on one connection.
pub(super) type PreparedByTable = HashMap<Option<Arc<str>>, Prepared>;

/// The statements of the relay's own table, and of the other outbox
/// tables of the publication as their rows come (built on first use).
pub(super) struct Sql {
    home: Statements,
    /// The relay's own table, quoted: a key naming it is the home table's.
    home_name: String,
    dead_table: String,
    others: HashMap<Arc<str>, Statements>,
}

impl Sql {
    /// The statements of the writer for `target` (the relay's own table,
    /// quoted) and its dead-letter table.
    pub(super) fn new(target: String, dead_table: String) -> Sql {
        Sql {
            home: statements(&target, &dead_table),
            home_name: target,
            dead_table,
            others: HashMap::new(),
        }
    }

    /// The table a key's marks go to (`None`: the relay's own).
    pub(super) fn table_of(&self, key: &RowKey) -> Option<Arc<str>> {
        key.table.clone().filter(|t| **t != *self.home_name)
    }

    fn of(&mut self, table: &Option<Arc<str>>) -> &Statements {
        match table {
            None => &self.home,
            Some(t) => {
                let dead = &self.dead_table;
                self.others
                    .entry(t.clone())
                    .or_insert_with(|| statements(t, dead))
            }
        }
    }
}

/// The row marks of one table in a batch, as the statements' arrays.
#[derive(Default)]
struct TableMarks<'a> {
    ids: Vec<&'a str>,
    ats: Vec<&'a str>,
    dead_ids: Vec<&'a str>,
    dead_ats: Vec<&'a str>,
    errs: Vec<&'a str>,
}

/// Applies a batch; returns the keys (table, id) of rows the statements
/// could not see yet (to retry).
pub(super) async fn apply(
    client: &tokio_postgres::Client,
    prepared_by_table: &mut PreparedByTable,
    sql: &mut Sql,
    mut journal: Option<&mut JournalState>,
    batch: &[Mark],
    statement_rows: usize,
) -> Result<Vec<(Option<Arc<str>>, String)>, tokio_postgres::Error> {
    let rows = statement_rows.max(1);
    let mut unseen = Vec::new();
    let mut tables: Vec<(Option<Arc<str>>, TableMarks<'_>)> = Vec::new();
    let (mut lsns, mut prefixes, mut contents, mut msg_errs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for m in batch {
        let key = match &m.kind {
            MarkKind::Completed(key) | MarkKind::DeadLetter(key, _) => key,
            MarkKind::DeadMessage {
                lsn,
                prefix,
                content,
                error,
            } => {
                lsns.push(lsn.to_string());
                prefixes.push(prefix.as_str());
                contents.push(&content[..]);
                msg_errs.push(error.as_str());
                continue;
            }
        };
        let table = sql.table_of(key);
        let at = match tables.iter().position(|(t, _)| *t == table) {
            Some(at) => at,
            None => {
                tables.push((table, TableMarks::default()));
                tables.len() - 1
            }
        };
        let marks = &mut tables[at].1;
        match &m.kind {
            MarkKind::DeadLetter(_, err) => {
                marks.dead_ids.push(text(&key.id));
                marks.dead_ats.push(text(&key.created_at));
                marks.errs.push(err.as_str());
            }
            _ => {
                marks.ids.push(text(&key.id));
                marks.ats.push(text(&key.created_at));
            }
        }
    }
    let m = crate::metrics::metrics();
    for (table, marks) in &tables {
        let statements = sql.of(table);
        let prepared_here = prepared_by_table.entry(table.clone()).or_default();
        // One observation per statement (of at most `rows` rows).
        for n in [marks.ids.len(), marks.dead_ids.len()] {
            for k in (0..n).step_by(rows) {
                m.batch(crate::metrics::batch::STATUS_UPDATE, (n - k).min(rows));
            }
        }
        let journaled = table.is_none() && journal.as_ref().is_some_and(|j| j.active());
        if !marks.ids.is_empty() && journaled {
            let j = journal.as_mut().expect("journaled above");
            let st = prepared(client, &mut prepared_here.journal, &j.insert).await?;
            let outbox = j.journal.outbox();
            // One entry per `rows`, sent together: the server runs them
            // in order, each its own transaction, in one round trip.
            let entries = marks
                .ids
                .chunks(rows)
                .zip(marks.ats.chunks(rows))
                .map(|(ids, ats)| async move { client.execute(st, &[&outbox, &ids, &ats]).await });
            futures_util::future::try_join_all(entries).await?;
            if let Some(n) = &mut j.unfolded {
                *n += marks.ids.len() as u64;
            }
        } else if !marks.ids.is_empty() {
            let st = prepared(client, &mut prepared_here.completed, &statements.completed).await?;
            for (ids, ats) in marks.ids.chunks(rows).zip(marks.ats.chunks(rows)) {
                for row in client.query(st, &[&ids, &ats]).await? {
                    unseen.push((table.clone(), row.get::<_, String>(0)));
                }
            }
        }
        if !marks.dead_ids.is_empty() {
            let st = prepared(client, &mut prepared_here.dead, &statements.dead).await?;
            let mut missing = 0;
            for ((ids, ats), errs) in marks
                .dead_ids
                .chunks(rows)
                .zip(marks.dead_ats.chunks(rows))
                .zip(marks.errs.chunks(rows))
            {
                for row in client.query(st, &[&ids, &ats, &errs]).await? {
                    missing += 1;
                    unseen.push((table.clone(), row.get::<_, String>(0)));
                }
            }
            tracing::warn!(
                rows = marks.dead_ids.len() - missing,
                "dead-lettered rows that can never be published"
            );
        }
    }
    if !lsns.is_empty() {
        let statements = sql.of(&None);
        let prepared_here = prepared_by_table.entry(None).or_default();
        let st = prepared(client, &mut prepared_here.message, &statements.message).await?;
        let mut n = 0;
        for (((lsns, prefixes), contents), errs) in lsns
            .chunks(rows)
            .zip(prefixes.chunks(rows))
            .zip(contents.chunks(rows))
            .zip(msg_errs.chunks(rows))
        {
            m.batch(crate::metrics::batch::STATUS_UPDATE, lsns.len());
            n += client
                .execute(st, &[&lsns, &prefixes, &contents, &errs])
                .await?;
        }
        tracing::warn!(
            messages = n,
            "recorded logical messages that can never be published in pgoutbox_dead_letters"
        );
    }
    Ok(unseen)
}
