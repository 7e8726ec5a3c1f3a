//! Marks that commit without waiting for their own WAL flush, and count as
//! durable once the server's WAL is flushed past them (ARCHITECTURE.md,
//! invariant 15).
//!
//! A synchronous commit waits for an fsync and holds the server's WAL write
//! lock while it does: every other session's commit (the application's
//! outbox inserts, which a logical walsender may not send before they are
//! flushed) waits behind it. The mark writer's connection therefore commits
//! with `synchronous_commit = off`, and after each batch asks where its
//! commit ended ([`POSITIONS_SQL`]: the WAL insert position, which the
//! commit record lies before) and how far the WAL is flushed. A batch's
//! tickets are reported only once the flush position has passed its commit
//! ([`Unflushed`]), so the slot is still confirmed only past marks that a
//! crash cannot lose. On a busy server other commits flush the WAL within
//! a millisecond or two; when nothing else does within [`FLUSH_PATIENCE`],
//! the writer flushes it itself with one synchronous commit
//! ([`super::journal::Journal::flush_sql`]) for everything waiting. Marks
//! commit this way only with the delivery journal (`cdc.mark_with =
//! "journal"`, the default); without it each commit waits for its flush.
//!
//! A connection lost while marks wait for the flush may have lost them with
//! the server: the writer applies them again on its next connection.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::Lsn;

/// Set on the mark writer's connection: its commits do not wait for the
/// WAL flush.
pub const ASYNC_COMMIT_SQL: &str = "SET synchronous_commit = off";

/// The server's WAL insert position (past the commit record of every
/// transaction this connection has committed) and its flush position, as
/// byte positions (run on the primary).
pub const POSITIONS_SQL: &str = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8, \
     (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::int8";

/// The server's WAL flush position as a byte position.
pub const FLUSHED_SQL: &str = "SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::int8";

/// How long marks wait for the server to flush the WAL past them before the
/// writer flushes it itself.
pub const FLUSH_PATIENCE: Duration = Duration::from_millis(5);

/// Committed marks waiting for the WAL flush, oldest first.
#[derive(Debug)]
pub struct Unflushed<T> {
    waiting: VecDeque<(Lsn, Instant, Vec<T>)>,
}

impl<T> Default for Unflushed<T> {
    fn default() -> Self {
        Unflushed {
            waiting: VecDeque::new(),
        }
    }
}

impl<T> Unflushed<T> {
    /// Adds `items`, committed before the WAL position `committed_before`.
    pub fn push(&mut self, committed_before: Lsn, items: Vec<T>, now: Instant) {
        if !items.is_empty() {
            self.waiting.push_back((committed_before, now, items));
        }
    }

    /// Takes every item committed before `flushed`, oldest first.
    pub fn release(&mut self, flushed: Lsn) -> Vec<T> {
        let mut ready = Vec::new();
        // Entries of one connection are pushed in commit order, so their
        // positions only grow; an entry whose position a flush has not
        // reached holds back everything after it.
        while self
            .waiting
            .front()
            .is_some_and(|(before, _, _)| *before <= flushed)
        {
            if let Some((_, _, items)) = self.waiting.pop_front() {
                ready.extend(items);
            }
        }
        ready
    }

    /// Takes everything: after a synchronous commit that followed them all,
    /// or to apply them again on a new connection.
    pub fn take_all(&mut self) -> Vec<T> {
        self.waiting
            .drain(..)
            .flat_map(|(_, _, items)| items)
            .collect()
    }

    /// When the oldest waiting item was committed.
    pub fn oldest(&self) -> Option<Instant> {
        self.waiting.front().map(|(_, at, _)| *at)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_released_only_once_the_flush_passes_their_commit() {
        let t0 = Instant::now();
        let mut u = Unflushed::default();
        u.push(Lsn(100), vec![1, 2], t0);
        u.push(Lsn(200), vec![3], t0 + Duration::from_millis(1));
        u.push(Lsn(300), vec![], t0);
        assert_eq!(u.release(Lsn(99)), Vec::<i32>::new());
        assert_eq!(u.oldest(), Some(t0));
        assert_eq!(u.release(Lsn(100)), vec![1, 2]);
        assert_eq!(u.oldest(), Some(t0 + Duration::from_millis(1)));
        assert_eq!(u.release(Lsn(199)), Vec::<i32>::new());
        assert!(!u.is_empty());
        assert_eq!(u.release(Lsn(1000)), vec![3]);
        assert!(u.is_empty());
        assert_eq!(u.oldest(), None);
    }

    #[test]
    fn a_later_commit_waits_behind_an_earlier_one_not_yet_flushed() {
        let t0 = Instant::now();
        let mut u = Unflushed::default();
        u.push(Lsn(500), vec!['a'], t0);
        u.push(Lsn(400), vec!['b'], t0);
        assert_eq!(u.release(Lsn(450)), Vec::<char>::new());
        assert_eq!(u.take_all(), vec!['a', 'b']);
        assert!(u.is_empty());
    }
}
