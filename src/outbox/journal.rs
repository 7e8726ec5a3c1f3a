//! The delivery journal (`pgoutbox_delivered`, migration 13): how the CDC
//! relay records delivered rows cheaply (ARCHITECTURE.md, invariant 14).
//!
//! Setting a row `COMPLETED` writes a new tuple, its index entries and about
//! a kilobyte of WAL, which the slot then decodes as well; at 100 events a
//! transaction that cost more than the decoding itself. The journal records
//! a batch of delivered rows as one row holding their ids and `created_at`
//! as arrays: a few bytes a row. A row is *delivered* when it is
//! `COMPLETED` or listed in the journal.
//!
//! Entries are folded into the rows (`COMPLETED`, `processed_at` = when the
//! entry was written) and deleted in the same statement: by the mark writer
//! whenever it has room (its decoding is within [`FOLD_LAG_BYTES`] of the
//! server's WAL end, [`room_to_fold`], and its last batch was not full or
//! it has been idle),
//! at once when the journal holds more than [`FOLD_AT_ROWS`] rows, and by
//! [`fold_all`] before anything that reads statuses to decide what to send
//! or drop (poll mode's start, a backfill from a new slot, partition
//! retention). Readers that only count (the sampler, `pgoutbox status`)
//! leave journaled rows out with [`Journal::pending_count_sql`] and
//! [`Journal::oldest_pending_sql`], at a cost bounded by the journal's size.

use tokio_postgres::GenericClient;

use crate::config::{quote_ident, quote_literal};
use crate::Lsn;

/// The journal table's name, in the outbox table's schema.
pub const JOURNAL_TABLE: &str = "pgoutbox_delivered";

/// Journaled rows beyond which the writer folds even while it is busy, so
/// that the journal (and what readers spend on it) stays bounded.
pub const FOLD_AT_ROWS: u64 = 1_000_000;

/// Journaled rows up to which [`Journal::oldest_pending_sql`] is exact
/// (about 0.15 s of PostgreSQL's time per sample at this size).
pub const EXACT_OLDEST_ROWS: u64 = 100_000;

/// How far (bytes of WAL) the relay's decoding may be behind the server's
/// WAL end for the relay to count as caught up, and so to have room to
/// fold: while it drains a backlog it is far behind, and folding would
/// take PostgreSQL's time from decoding.
pub const FOLD_LAG_BYTES: u64 = 16 * 1024 * 1024;

/// The server's WAL end as a byte position (run on the primary).
pub const WAL_END_SQL: &str = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8";

/// Whether a relay that has decoded its stream up to `received` has room
/// to fold while the server's WAL ends at `wal_end`: it streams (`received`
/// is zero while a relay starts, reconnects or backfills, and a backlog may
/// be waiting for it) and is within [`FOLD_LAG_BYTES`] of the end.
/// The position is the relay's own, not the walsender's: a walsender runs
/// ahead of the relay by what the socket and the relay's read buffer hold,
/// tens of megabytes at the end of a drain.
pub fn room_to_fold(received: Lsn, wal_end: Lsn) -> bool {
    received > Lsn::ZERO && wal_end.0.saturating_sub(received.0) <= FOLD_LAG_BYTES
}

/// Entries one fold statement takes at most (each holds at most
/// `cdc.mark_batch_size` rows): short enough that marks never wait long
/// behind a fold.
pub const FOLD_ENTRIES: i64 = 8;

/// How long a journaled row that the fold cannot see is kept for another
/// fold, in seconds: logical decoding may hand a transaction over a moment
/// before its commit is visible to other sessions. After that the entry is
/// dropped (the row was deleted).
const UNSEEN_PATIENCE_S: f64 = 30.0;

/// The journal of one outbox table.
#[derive(Clone, Debug)]
pub struct Journal {
    /// `schema.pgoutbox_delivered`, quoted.
    journal: String,
    /// `schema.table`, quoted.
    target: String,
    /// The outbox table's name, as the journal's `outbox` column holds it.
    outbox: String,
}

/// What one fold statement did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    /// Journal entries taken (and deleted).
    pub entries: i64,
    /// Rows they listed.
    pub listed: i64,
    /// Rows set `COMPLETED` by them.
    pub rows: i64,
    /// Rows the fold could not see yet, journaled again for a later fold.
    pub kept: i64,
}

impl Journal {
    /// The journal of `schema.table`.
    pub fn new(schema: &str, table: &str) -> Journal {
        Journal {
            journal: format!("{}.{JOURNAL_TABLE}", quote_ident(schema)),
            target: format!("{}.{}", quote_ident(schema), quote_ident(table)),
            outbox: table.to_owned(),
        }
    }

    /// The `outbox` column's value for this table (`$1` of the statements).
    pub fn outbox(&self) -> &str {
        &self.outbox
    }

    /// Records delivered rows: `$1` outbox, `$2` ids, `$3` created_at (text
    /// arrays, as the marks carry them).
    pub fn insert_sql(&self) -> String {
        format!(
            "INSERT INTO {} (outbox, ids, created_ats) \
             VALUES ($1, $2::text[]::bigint[], $3::text[]::timestamptz[])",
            self.journal
        )
    }

    /// One transaction that commits synchronously (to the local disk; a
    /// synchronous standby is not waited for) and writes an empty entry,
    /// which the folds delete with the others: it returns once the server's
    /// WAL is flushed past it, and so past every earlier commit of the
    /// connection (ARCHITECTURE.md, invariant 15). A transaction that wrote
    /// nothing but its commit record would commit without the flush.
    pub fn flush_sql(&self) -> String {
        format!(
            "BEGIN; SET LOCAL synchronous_commit = local; \
             INSERT INTO {} (outbox, ids, created_ats) VALUES ({}, '{{}}', '{{}}'); COMMIT",
            self.journal,
            quote_literal(&self.outbox)
        )
    }

    /// Folds the oldest entries: `$1` outbox, `$2` entries at most, `$3`
    /// seconds a row the fold cannot see is kept for (0: dropped). Returns
    /// one row: entries taken, rows they listed, rows set `COMPLETED`, rows
    /// kept. Two folds at
    /// once are safe: an entry is folded by the statement whose `DELETE`
    /// took it (the other waits on its row lock, then skips it); no
    /// `FOR UPDATE`, which would need `UPDATE` on the journal.
    pub fn fold_sql(&self) -> String {
        let (j, t) = (&self.journal, &self.target);
        format!(
            "WITH e AS (DELETE FROM {j} WHERE seq IN \
                          (SELECT seq FROM {j} WHERE outbox = $1 ORDER BY seq LIMIT $2) \
                        RETURNING ids, created_ats, delivered_at), \
                  k AS (SELECT u.id, u.created_at, e.delivered_at \
                          FROM e, unnest(e.ids, e.created_ats) AS u(id, created_at)), \
                  u AS (UPDATE {t} AS o SET status = 'COMPLETED', processed_at = k.delivered_at \
                          FROM k WHERE o.id = k.id AND o.created_at = k.created_at \
                           AND o.status IN ('PENDING', 'PROCESSING', 'FAILED') RETURNING 1), \
                  kept AS (INSERT INTO {j} (outbox, ids, created_ats, delivered_at) \
                          SELECT $1, array_agg(k.id), array_agg(k.created_at), min(k.delivered_at) \
                            FROM k WHERE k.delivered_at > now() - make_interval(secs => $3) \
                             AND NOT EXISTS (SELECT 1 FROM {t} AS o \
                                  WHERE o.id = k.id AND o.created_at = k.created_at) \
                          HAVING count(*) > 0 RETURNING cardinality(ids) AS n) \
             SELECT (SELECT count(*) FROM e), (SELECT count(*) FROM k), (SELECT count(*) FROM u), \
                    coalesce((SELECT sum(n) FROM kept), 0)::bigint"
        )
    }

    /// Rows the journal holds for this table (`$1` outbox).
    pub fn rows_sql(&self) -> String {
        self.count_rows("$1")
    }

    /// The journaled rows of this table as a scalar subquery (the outbox
    /// name as a literal), for statements that take no parameters.
    fn journaled_sql(&self) -> String {
        format!("({})", self.count_rows(&quote_literal(&self.outbox)))
    }

    /// `SELECT` of the rows the journal lists for the outbox `outbox` (an
    /// SQL expression): one short tuple read per entry, not the arrays'
    /// elements.
    fn count_rows(&self, outbox: &str) -> String {
        format!(
            "SELECT coalesce(sum(cardinality(ids)), 0)::bigint FROM {} WHERE outbox = {outbox}",
            self.journal
        )
    }

    /// A scalar subquery: the table's `PENDING` rows minus the rows the
    /// journal lists (delivered, not folded yet), at least 0. Costs a count
    /// of the pending index and a sum over the journal's entries, never a
    /// join: a relay draining a backlog of a million rows journals a
    /// million, and the anti-join that counted exactly took several
    /// CPU-seconds of PostgreSQL per sample (BENCHMARKS.md, "Session 19").
    /// Exact unless a row is journaled twice (a mark batch applied again
    /// after a lost connection), which undercounts until the next fold.
    pub fn pending_count_sql(&self) -> String {
        format!(
            "(SELECT greatest((SELECT count(*) FROM {} WHERE status = 'PENDING') - jn.n, 0)::bigint \
               FROM (SELECT {} AS n) AS jn)",
            self.target,
            self.journaled_sql()
        )
    }

    /// A scalar subquery: the `created_at` of the oldest `PENDING` row the
    /// journal does not list, or NULL. With `n` journaled rows the answer
    /// is among the first `n + 1` pending rows in `created_at` order (at
    /// most `n` of them are journaled), so it reads those and takes away
    /// the journal's rows as a set (`EXCEPT ALL`: hashed or sorted, never
    /// a nested loop): cost in proportion to the journal, not the backlog.
    /// Above [`EXACT_OLDEST_ROWS`] journaled rows (a relay catching up,
    /// which folds once caught up) it reads the pending row at offset `n`
    /// instead: exact when rows are delivered in `created_at` order, and
    /// never older than the true answer.
    pub fn oldest_pending_sql(&self) -> String {
        let (j, t) = (&self.journal, &self.target);
        format!(
            "(SELECT CASE WHEN jn.n <= {EXACT_OLDEST_ROWS} THEN \
                 (SELECT min(c.created_at) FROM \
                    ((SELECT id, created_at FROM {t} WHERE status = 'PENDING' \
                       ORDER BY created_at LIMIT jn.n + 1) \
                     EXCEPT ALL \
                     (SELECT d.id, d.created_at FROM {j} AS e, \
                             unnest(e.ids, e.created_ats) AS d(id, created_at) \
                       WHERE e.outbox = {o})) AS c) \
               ELSE (SELECT created_at FROM {t} WHERE status = 'PENDING' \
                      ORDER BY created_at OFFSET jn.n LIMIT 1) END \
               FROM (SELECT {n} AS n) AS jn)",
            o = quote_literal(&self.outbox),
            n = self.journaled_sql()
        )
    }

    /// A condition on `alias` (a row of the outbox table) that leaves out
    /// the rows the journal lists: delivered, not folded yet. PostgreSQL
    /// plans it as an anti-join (the journal's ids hashed once).
    pub fn undelivered(&self, alias: &str) -> String {
        format!(
            "NOT EXISTS (SELECT 1 FROM {} AS j, unnest(j.ids, j.created_ats) AS d(id, created_at) \
              WHERE j.outbox = {} AND d.id = {alias}.id AND d.created_at = {alias}.created_at)",
            self.journal,
            quote_literal(&self.outbox)
        )
    }

    /// Runs one fold statement.
    pub async fn fold<C: GenericClient>(
        &self,
        client: &C,
        statement: &str,
        entries: i64,
        keep_unseen: bool,
    ) -> Result<Folded, tokio_postgres::Error> {
        let patience = if keep_unseen { UNSEEN_PATIENCE_S } else { 0.0 };
        let row = client
            .query_one(statement, &[&self.outbox, &entries, &patience])
            .await?;
        Ok(Folded {
            entries: row.get(0),
            listed: row.get(1),
            rows: row.get(2),
            kept: row.get(3),
        })
    }
}

/// Whether `schema` has the journal (migration 13 applied) and the current
/// role may read, insert and delete its entries (a relay role granted its
/// privileges before migration 13 may not: `pgoutbox migrate --relay-role`
/// grants them). When not, the relay marks rows one by one, as
/// `cdc.mark_with = "update"` does, and nothing reads the journal.
pub async fn usable<C: GenericClient>(
    client: &C,
    schema: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT CASE WHEN to_regclass(format('%I.%I', $1::text, $2::text)) IS NULL THEN false \
                    ELSE has_table_privilege(format('%I.%I', $1::text, $2::text), 'SELECT') \
                     AND has_table_privilege(format('%I.%I', $1::text, $2::text), 'INSERT') \
                     AND has_table_privilege(format('%I.%I', $1::text, $2::text), 'DELETE') END",
            &[&schema, &JOURNAL_TABLE],
        )
        .await?;
    Ok(row.get(0))
}

/// Folds every entry of `schema.table`'s journal into its rows; returns the
/// rows set `COMPLETED` (see [`Journal::fold_all`]). Does nothing when the
/// journal is not [`usable`].
pub async fn fold_all<C: GenericClient>(
    client: &C,
    schema: &str,
    table: &str,
) -> Result<i64, tokio_postgres::Error> {
    if !usable(client, schema).await? {
        return Ok(0);
    }
    Journal::new(schema, table).fold_all(client).await
}

impl Journal {
    /// Folds every entry into the rows, on a connection where the journal
    /// is known to be [`usable`]; returns the rows set `COMPLETED`. Rows
    /// the fold cannot see are dropped from the journal, not kept: this
    /// runs when no relay is recording deliveries (before polling, before a
    /// backfill), so such a row was deleted.
    pub async fn fold_all<C: GenericClient>(
        &self,
        client: &C,
    ) -> Result<i64, tokio_postgres::Error> {
        let sql = self.fold_sql();
        let mut rows = 0;
        loop {
            let f = self.fold(client, &sql, 64, false).await?;
            rows += f.rows;
            if f.entries == 0 {
                return Ok(rows);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_to_fold_needs_a_relay_that_has_read_to_near_the_end() {
        let end = Lsn(100 * 1024 * 1024);
        assert!(!room_to_fold(Lsn::ZERO, end), "nothing read yet");
        assert!(!room_to_fold(Lsn(end.0 - FOLD_LAG_BYTES - 1), end));
        assert!(room_to_fold(Lsn(end.0 - FOLD_LAG_BYTES), end));
        assert!(room_to_fold(end, end));
        assert!(
            room_to_fold(Lsn(end.0 + 10), end),
            "a position past a stale end"
        );
    }

    #[test]
    fn statements_name_the_quoted_journal_and_table() {
        let j = Journal::new("Shop", "out\"box");
        assert!(j
            .insert_sql()
            .starts_with("INSERT INTO \"Shop\".pgoutbox_delivered"));
        let fold = j.fold_sql();
        assert!(
            fold.contains("UPDATE \"Shop\".\"out\"\"box\" AS o"),
            "{fold}"
        );
        assert!(
            fold.contains("DELETE FROM \"Shop\".pgoutbox_delivered"),
            "{fold}"
        );
        assert!(j.undelivered("o").contains("j.outbox = 'out\"box'"));
        assert_eq!(j.outbox(), "out\"box");
        let quoted = Journal::new("s", "it's");
        assert!(quoted.undelivered("o").contains("'it''s'"));
    }
}
