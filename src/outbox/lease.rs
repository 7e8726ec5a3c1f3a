//! Leases on outbox rows: pgoutbox's lock tokens, and the rows another
//! poller holds (the polling framework's worker, still running after a
//! switch).
//!
//! Every claim of pgoutbox's poll workers writes a lock token whose top 16
//! bits are [`LOCK_TOKEN_TAG`]. A `PROCESSING` row under a live lease and
//! any other token is held by someone else (a lease without a token is no
//! poller's claim: every poller writes one): poll mode never claims it (it
//! claims only `PENDING` rows) and says so; CDC mode does not create its
//! slot (whose first backfill would send the row while its holder may send
//! it too) until no such lease is left.

use tokio_postgres::Client;

use crate::config::quote_ident;

/// The top 16 bits of every lock token pgoutbox's workers write (`pg`).
/// A lease that expires under a tagged token was pgoutbox's own claim,
/// which counted the attempt (`retry_count` is counted at claim); one under
/// any other token (the polling framework counts at failure, so its claim
/// is not in `retry_count`) is never dead-lettered by the reaper without
/// one more attempt.
pub const LOCK_TOKEN_TAG: i64 = 0x7067;

/// A lock token for a claim: `random`'s low 48 bits under
/// [`LOCK_TOKEN_TAG`].
pub fn lock_token(random: i64) -> i64 {
    (LOCK_TOKEN_TAG << 48) | (random & 0xFFFF_FFFF_FFFF)
}

/// Rows another poller holds under a live lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignLeases {
    /// How many.
    pub rows: i64,
    /// When the last of those leases ends, as PostgreSQL prints it.
    pub until: String,
}

/// The rows of `schema.table` that another poller holds under a live lease
/// right now (`None` when there are none, or when the table has no lease
/// columns or a `lock_token` that is not an integer: no poller pgoutbox
/// could hand over from uses it).
pub async fn foreign_leases(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Option<ForeignLeases>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT count(*), max(locked_until)::text FROM {}.{} \
          WHERE status = 'PROCESSING' AND locked_until > now() \
            AND lock_token IS NOT NULL AND (lock_token >> 48) <> {LOCK_TOKEN_TAG}",
        quote_ident(schema),
        quote_ident(table)
    );
    let row = match client.query_one(&sql, &[]).await {
        Ok(row) => row,
        Err(e)
            if [
                tokio_postgres::error::SqlState::UNDEFINED_COLUMN,
                tokio_postgres::error::SqlState::UNDEFINED_FUNCTION,
                tokio_postgres::error::SqlState::DATATYPE_MISMATCH,
            ]
            .iter()
            .any(|c| e.code() == Some(c)) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let rows: i64 = row.get(0);
    Ok((rows > 0).then(|| ForeignLeases {
        rows,
        until: row.get::<_, Option<String>>(1).unwrap_or_default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_tokens_carry_the_tag_whatever_the_random_bits() {
        for random in [0, -1, i64::MIN, i64::MAX, 0x1234_5678_9abc_def0] {
            let t = lock_token(random);
            assert_eq!(t >> 48, LOCK_TOKEN_TAG, "{random:#x}");
            assert!(t > 0);
        }
        assert_ne!(lock_token(1), lock_token(2));
    }
}
