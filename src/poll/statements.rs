//! The SQL of poll mode, built once from the configuration.
//!
//! Every statement that changes a claimed row names the claim's lock token,
//! so a worker whose lease expired (and whose rows the reaper handed to
//! another worker) changes nothing: its completion touches 0 rows.
//!
//! Rows are addressed by their primary key `(id, created_at)` passed as text
//! arrays, so each update is a handful of index lookups on the right
//! partitions.

use crate::config::{quote_ident, ColumnMap, Config, PollOrdering, Role};

/// What a claim returns: the event and its row key as text (the one list,
/// [`crate::outbox::select_list`]), then the attempt counters and the
/// creation time for ordering.
fn claimed_columns(map: &ColumnMap) -> String {
    format!(
        "{}, o.retry_count, o.max_retries, o.created_at AS created_ts",
        crate::outbox::select_list(map, "o")
    )
}

/// The statements of one outbox table.
#[derive(Clone, Debug)]
pub struct Statements {
    /// `$1` batch size (int), `$2` lease seconds (float8), `$3` lock token
    /// (int8): claims due `PENDING` rows oldest first, returns them sorted.
    pub claim: String,
    /// `$1` token, `$2` ids, `$3` created_ats: `COMPLETED`; returns the count.
    pub complete: String,
    /// `$1` token, `$2` ids, `$3` created_ats, `$4` lease seconds: renews
    /// the lease; returns the count still held.
    pub renew: String,
    /// `$1` token, `$2` ids, `$3` created_ats, `$4` delays (ms), `$5` errors:
    /// back to `PENDING` after the delay, or `DEAD_LETTER` once the row has
    /// used its attempts; returns `(retried, ids of the dead)`.
    pub retry: String,
    /// `$1` token, `$2` ids, `$3` created_ats, `$4` errors: `DEAD_LETTER` at
    /// once; returns the ids of the rows it changed.
    pub dead_letter: String,
    /// `$1` token, `$2` ids, `$3` created_ats: hands unsent rows back
    /// (`PENDING`, attempt not counted); returns the count.
    pub release: String,
    /// `$1` token, `$2` ids, `$3` created_ats, `$4` delay (ms), `$5` error:
    /// back to `PENDING` after the delay without counting the attempt (Kafka
    /// was unreachable for every record, not failing this one); returns the
    /// count.
    pub defer: String,
    /// Returns expired leases to `PENDING` (or `DEAD_LETTER` when the row
    /// used its attempts); returns `(pending, aggregate types of the dead,
    /// event types of the dead)`, the types for the metrics' topic label.
    pub reap: String,
    /// Turns rows the seed's poller left `FAILED` into `PENDING` rows.
    pub adopt_failed: String,
    /// The table's column roles, for reading claimed rows.
    pub map: ColumnMap,
}

/// The keys of the rows a statement applies to, matched with the claim's
/// lock token.
const KEYS: &str = "unnest($2::text[], $3::text[]) AS k(id, created_at)";

/// Matches the outbox row `o` to the key row `k`.
const MATCH: &str = "o.id = k.id::bigint AND o.created_at = k.created_at::timestamptz";

impl Statements {
    /// The statements for the configured table and ordering.
    pub fn new(config: &Config) -> Statements {
        let t = format!(
            "{}.{}",
            quote_ident(&config.outbox.schema),
            quote_ident(&config.outbox.table)
        );
        // Per-aggregate ordering: a row is due only when no older row of its
        // aggregate is unfinished (pending, leased, waiting to retry, failed
        // or dead-lettered). Concurrent claimers see each other's candidates
        // as PENDING in their snapshots, so they never take a later event of
        // an aggregate whose earlier one another claimer is taking.
        let ordering = match config.poll.ordering {
            PollOrdering::None => String::new(),
            PollOrdering::Aggregate => format!(
                " AND NOT EXISTS (SELECT 1 FROM {t} AS b \
                    WHERE b.aggregate_id = c.aggregate_id AND b.status <> 'COMPLETED' \
                      AND (b.created_at, b.id) < (c.created_at, c.id))"
            ),
        };
        let map = config
            .event_columns()
            .unwrap_or_else(|_| ColumnMap::pgoutbox());
        let claimed = claimed_columns(&map);
        let claim = format!(
            "WITH due AS ( \
               SELECT c.id, c.created_at FROM {t} AS c \
                WHERE c.status = 'PENDING' AND (c.locked_until IS NULL OR c.locked_until <= now()){ordering} \
                ORDER BY c.created_at, c.id \
                LIMIT $1 \
                FOR UPDATE SKIP LOCKED), \
             claimed AS ( \
               UPDATE {t} AS o SET status = 'PROCESSING', \
                      locked_until = now() + make_interval(secs => $2::float8), \
                      lock_token = $3::int8, retry_count = o.retry_count + 1 \
                 FROM due WHERE o.id = due.id AND o.created_at = due.created_at \
               RETURNING {claimed}) \
             SELECT * FROM claimed ORDER BY created_ts, id::bigint"
        );
        let complete = format!(
            "WITH u AS (UPDATE {t} AS o SET status = 'COMPLETED', processed_at = now(), \
                    locked_until = NULL, lock_token = NULL \
               FROM {KEYS} WHERE {MATCH} AND o.lock_token = $1 AND o.status = 'PROCESSING' \
             RETURNING 1) SELECT count(*) FROM u"
        );
        let renew = format!(
            "WITH u AS (UPDATE {t} AS o SET locked_until = now() + make_interval(secs => $4::float8) \
               FROM {KEYS} WHERE {MATCH} AND o.lock_token = $1 AND o.status = 'PROCESSING' \
             RETURNING 1) SELECT count(*) FROM u"
        );
        let retry = format!(
            "WITH k AS (SELECT * FROM unnest($2::text[], $3::text[], $4::int8[], $5::text[]) \
                          AS k(id, created_at, delay_ms, err)), \
                  u AS (UPDATE {t} AS o SET \
                    status = CASE WHEN o.retry_count >= o.max_retries THEN 'DEAD_LETTER' ELSE 'PENDING' END, \
                    locked_until = CASE WHEN o.retry_count >= o.max_retries THEN NULL \
                                        ELSE now() + make_interval(secs => k.delay_ms / 1000.0) END, \
                    processed_at = CASE WHEN o.retry_count >= o.max_retries THEN now() END, \
                    lock_token = NULL, \
                    last_error = CASE WHEN o.retry_count >= o.max_retries \
                                      THEN 'attempt ' || o.retry_count || ' of ' || o.max_retries || ' failed: ' || k.err \
                                      ELSE k.err END \
               FROM k WHERE {MATCH} AND o.lock_token = $1 AND o.status = 'PROCESSING' \
             RETURNING o.status, o.id::text AS id) \
             SELECT count(*) FILTER (WHERE status = 'PENDING'), \
                    coalesce(array_agg(id) FILTER (WHERE status = 'DEAD_LETTER'), '{{}}') FROM u"
        );
        let dead_letter = format!(
            "WITH k AS (SELECT * FROM unnest($2::text[], $3::text[], $4::text[]) AS k(id, created_at, err)), \
                  u AS (UPDATE {t} AS o SET status = 'DEAD_LETTER', processed_at = now(), \
                    locked_until = NULL, lock_token = NULL, last_error = k.err \
               FROM k WHERE {MATCH} AND o.lock_token = $1 AND o.status = 'PROCESSING' \
             RETURNING o.id::text AS id) SELECT coalesce(array_agg(id), '{{}}') FROM u"
        );
        let release = format!(
            "WITH u AS (UPDATE {t} AS o SET status = 'PENDING', locked_until = NULL, lock_token = NULL, \
                    retry_count = greatest(o.retry_count - 1, 0) \
               FROM {KEYS} WHERE {MATCH} AND o.lock_token = $1 AND o.status = 'PROCESSING' \
             RETURNING 1) SELECT count(*) FROM u"
        );
        let defer = format!(
            "WITH u AS (UPDATE {t} AS o SET status = 'PENDING', lock_token = NULL, \
                    locked_until = now() + make_interval(secs => $4::int8 / 1000.0), \
                    retry_count = greatest(o.retry_count - 1, 0), last_error = $5::text \
               FROM {KEYS} WHERE {MATCH} AND o.lock_token = $1 AND o.status = 'PROCESSING' \
             RETURNING 1) SELECT count(*) FROM u"
        );
        let reap = reap_statement(&t, &map);
        let adopt_failed = format!(
            "UPDATE {t} SET status = 'PENDING', locked_until = NULL, lock_token = NULL WHERE status = 'FAILED'"
        );
        Statements {
            claim,
            complete,
            renew,
            retry,
            dead_letter,
            release,
            defer,
            reap,
            adopt_failed,
            map,
        }
    }
}

/// Returns expired leases to `PENDING` (or `DEAD_LETTER` when the row used
/// its attempts); returns the counts and the dead rows' types for the
/// metrics' topic label, read through the table's column roles.
fn reap_statement(t: &str, map: &ColumnMap) -> String {
    let role_text = |r: Role| match map.name(r) {
        Some(c) => format!("o.{}::text", quote_ident(c)),
        None => "''::text".into(),
    };
    // Dead-lettered on expiry only after pgoutbox's own last claim (see
    // crate::outbox::lease).
    use crate::outbox::lease::LOCK_TOKEN_TAG;
    let spent =
        format!("o.retry_count >= o.max_retries AND (o.lock_token >> 48) = {LOCK_TOKEN_TAG}");
    format!(
        "WITH u AS (UPDATE {t} AS o SET \
                status = CASE WHEN {spent} THEN 'DEAD_LETTER' ELSE 'PENDING' END, \
                processed_at = CASE WHEN {spent} THEN now() END, \
                last_error = CASE WHEN {spent} \
                                  THEN 'lease expired on attempt ' || o.retry_count || ' of ' || o.max_retries \
                                       || ' (the worker holding it stopped or stalled)' \
                                  ELSE o.last_error END, \
                locked_until = NULL, lock_token = NULL \
          WHERE o.status = 'PROCESSING' AND o.locked_until < now() \
         RETURNING o.status, {} AS aggregate_type, {} AS event_type) \
         SELECT count(*) FILTER (WHERE status = 'PENDING'), \
                coalesce(array_agg(aggregate_type) FILTER (WHERE status = 'DEAD_LETTER'), '{{}}'), \
                coalesce(array_agg(event_type) FILTER (WHERE status = 'DEAD_LETTER'), '{{}}') FROM u",
        role_text(Role::AggregateType),
        role_text(Role::EventType)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ordering: PollOrdering) -> Config {
        let mut c = Config::default();
        c.outbox.schema = "Shop".into();
        c.outbox.table = "outbox".into();
        c.poll.ordering = ordering;
        c
    }

    #[test]
    fn claim_is_one_statement_that_skips_locked_rows_and_counts_the_attempt() {
        let s = Statements::new(&config(PollOrdering::None));
        assert!(s.claim.contains("FOR UPDATE SKIP LOCKED"));
        assert!(s.claim.contains("retry_count = o.retry_count + 1"));
        assert!(s.claim.contains("\"Shop\".\"outbox\""));
        assert!(!s.claim.contains("NOT EXISTS"));
        assert_eq!(s.claim.matches(';').count(), 0);
    }

    #[test]
    fn aggregate_ordering_excludes_rows_behind_an_unfinished_one() {
        let s = Statements::new(&config(PollOrdering::Aggregate));
        assert!(s.claim.contains("b.aggregate_id = c.aggregate_id"));
        assert!(s.claim.contains("b.status <> 'COMPLETED'"));
    }

    #[test]
    fn every_update_of_a_claimed_row_requires_its_token() {
        let s = Statements::new(&config(PollOrdering::None));
        for sql in [
            &s.complete,
            &s.renew,
            &s.retry,
            &s.dead_letter,
            &s.release,
            &s.defer,
        ] {
            assert!(sql.contains("o.lock_token = $1"), "{sql}");
            assert!(sql.contains("o.status = 'PROCESSING'"), "{sql}");
        }
    }
}
