//! Which WAL position is safe to confirm to PostgreSQL.
//!
//! PostgreSQL's logical replication protocol lets a client report a *flush*
//! position in its Standby Status Update; the server then keeps WAL only from
//! there on and, after a reconnect, resumes streaming with the first
//! transaction that commits after it (see "Streaming Replication Protocol",
//! `START_REPLICATION`, and `confirmed_flush_lsn` in `pg_replication_slots`).
//! So the flush position is a promise: everything before it is durable
//! downstream.
//!
//! The invariants this module keeps (ARCHITECTURE.md, invariants 1 and 2):
//! 1. The flush position is the end LSN of a Commit such that every event of
//!    that transaction and of every earlier one is durable (acknowledged by
//!    Kafka, or dead-lettered in the table). Never merely the received
//!    position; it never moves backwards.
//! 2. When nothing is in flight and no transaction is open, the WAL end the
//!    server reported in a keepalive is confirmed, so WAL written by
//!    unrelated tables does not pile up behind the slot. That is safe
//!    because a keepalive arrives in stream order, after every change the
//!    server sent before it.

use std::collections::VecDeque;
use std::time::SystemTime;

use crate::Lsn;

/// A transaction as seen by the tracker, numbered in stream order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TxId(u64);

#[derive(Debug)]
struct Tx {
    /// Commit end LSN, once the Commit message arrived.
    end_lsn: Option<Lsn>,
    /// Events handed downstream and not yet durable.
    outstanding: u64,
    /// When it committed in PostgreSQL (the Begin's commit time), for the
    /// events' latency; `None` for a backfill or a table-less message.
    committed_at: Option<SystemTime>,
}

/// Tracks transactions in commit order and the durable flush position.
#[derive(Debug)]
pub struct Progress {
    txs: VecDeque<Tx>,
    first: u64,
    open: Option<TxId>,
    flushed: Lsn,
    idle_end: Lsn,
}

impl Progress {
    /// Starts from `confirmed`, the slot's `confirmed_flush_lsn`.
    pub fn new(confirmed: Lsn) -> Self {
        Progress {
            txs: VecDeque::new(),
            first: 0,
            open: None,
            flushed: confirmed,
            idle_end: confirmed,
        }
    }

    /// A Begin arrived: opens a transaction.
    pub fn begin(&mut self) -> TxId {
        let id = TxId(self.first + self.txs.len() as u64);
        self.txs.push_back(Tx {
            end_lsn: None,
            outstanding: 0,
            committed_at: None,
        });
        self.open = Some(id);
        id
    }

    fn tx_mut(&mut self, id: TxId) -> Option<&mut Tx> {
        let idx = id.0.checked_sub(self.first)?;
        self.txs.get_mut(usize::try_from(idx).ok()?)
    }

    /// `tx` committed in PostgreSQL at `at` (from its Begin message).
    pub fn committed_at(&mut self, tx: TxId, at: SystemTime) {
        if let Some(t) = self.tx_mut(tx) {
            t.committed_at = Some(at);
        }
    }

    /// When `tx` committed in PostgreSQL, if known and `tx` is not yet
    /// durable.
    pub fn commit_time(&self, tx: TxId) -> Option<SystemTime> {
        let idx = tx.0.checked_sub(self.first)?;
        self.txs.get(usize::try_from(idx).ok()?)?.committed_at
    }

    /// An event of `tx` was handed downstream; it must become durable before
    /// the flush position can pass `tx`.
    pub fn add_event(&mut self, tx: TxId) {
        if let Some(t) = self.tx_mut(tx) {
            t.outstanding += 1;
        } else {
            debug_assert!(false, "event for a finished transaction");
        }
    }

    /// The Commit of `tx` arrived with its end LSN.
    pub fn commit(&mut self, tx: TxId, end_lsn: Lsn) {
        if self.open == Some(tx) {
            self.open = None;
        }
        let idx = (tx.0 - self.first) as usize;
        let empty = self.txs.get(idx).is_some_and(|t| t.outstanding == 0);
        // An empty transaction right after a committed one merges into it:
        // the older one's completion then confirms both. This keeps the queue
        // bounded by in-flight events, not by the number of transactions.
        if empty && idx + 1 == self.txs.len() && idx > 0 && self.txs[idx - 1].end_lsn.is_some() {
            self.txs.pop_back();
            self.txs[idx - 1].end_lsn = Some(end_lsn);
        } else if let Some(t) = self.tx_mut(tx) {
            t.end_lsn = Some(end_lsn);
        }
        self.advance();
    }

    /// One event of `tx` became durable.
    pub fn done(&mut self, tx: TxId) {
        if let Some(t) = self.tx_mut(tx) {
            debug_assert!(t.outstanding > 0, "more completions than events");
            t.outstanding = t.outstanding.saturating_sub(1);
        }
        self.advance();
    }

    /// A keepalive reported the server's WAL end.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        if self.open.is_none() {
            self.idle_end = self.idle_end.max(wal_end);
            self.advance();
        }
    }

    fn advance(&mut self) {
        while let Some(front) = self.txs.front() {
            match front.end_lsn {
                Some(end) if front.outstanding == 0 => {
                    self.raise(end);
                    self.txs.pop_front();
                    self.first += 1;
                }
                _ => break,
            }
        }
        if self.txs.is_empty() && self.open.is_none() {
            self.raise(self.idle_end);
        }
    }

    fn raise(&mut self, lsn: Lsn) {
        let next = self.flushed.max(lsn);
        debug_assert!(next >= self.flushed);
        self.flushed = next;
    }

    /// The position safe to confirm as flushed.
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// Transactions not yet confirmed (open or waiting for events).
    pub fn pending_transactions(&self) -> usize {
        self.txs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_but_never_acked_does_not_move_the_lsn() {
        let mut p = Progress::new(Lsn(100));
        let t = p.begin();
        p.add_event(t);
        p.commit(t, Lsn(200));
        p.keepalive(Lsn(300));
        assert_eq!(p.flushed(), Lsn(100));
        p.done(t);
        assert_eq!(p.flushed(), Lsn(300));
    }

    #[test]
    fn flush_waits_for_every_earlier_transaction() {
        let mut p = Progress::new(Lsn(0));
        let a = p.begin();
        p.add_event(a);
        p.commit(a, Lsn(10));
        let b = p.begin();
        p.add_event(b);
        p.add_event(b);
        p.commit(b, Lsn(20));
        // b acked first (another partition): nothing moves.
        p.done(b);
        p.done(b);
        assert_eq!(p.flushed(), Lsn(0));
        p.done(a);
        assert_eq!(p.flushed(), Lsn(20));
    }

    #[test]
    fn acks_before_commit_do_not_confirm_the_open_transaction() {
        let mut p = Progress::new(Lsn(5));
        let a = p.begin();
        p.add_event(a);
        p.done(a);
        assert_eq!(p.flushed(), Lsn(5));
        p.keepalive(Lsn(50));
        assert_eq!(
            p.flushed(),
            Lsn(5),
            "keepalive inside an open transaction must not confirm"
        );
        p.commit(a, Lsn(30));
        assert_eq!(p.flushed(), Lsn(30));
    }

    #[test]
    fn idle_keepalive_confirms_server_wal_end() {
        let mut p = Progress::new(Lsn(5));
        p.keepalive(Lsn(500));
        assert_eq!(p.flushed(), Lsn(500));
    }

    #[test]
    fn flush_never_regresses() {
        let mut p = Progress::new(Lsn(1000));
        let a = p.begin();
        p.commit(a, Lsn(10));
        p.keepalive(Lsn(20));
        assert_eq!(p.flushed(), Lsn(1000));
    }

    #[test]
    fn empty_transactions_merge_and_stay_bounded() {
        let mut p = Progress::new(Lsn(0));
        let a = p.begin();
        p.add_event(a);
        p.commit(a, Lsn(10));
        for i in 0..10_000u64 {
            let t = p.begin();
            p.commit(t, Lsn(20 + i));
        }
        assert_eq!(p.pending_transactions(), 1);
        assert_eq!(p.flushed(), Lsn(0));
        p.done(a);
        assert_eq!(p.flushed(), Lsn(20 + 9_999));
    }

    #[test]
    fn interleaved_random_acks_confirm_exactly_the_acked_prefix() {
        // A deterministic pseudo-random schedule: the flush LSN must always
        // equal the end of the longest fully-acked prefix of transactions.
        let mut p = Progress::new(Lsn(0));
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut txs = Vec::new();
        let mut pending: Vec<(usize, TxId)> = Vec::new();
        for i in 0..500usize {
            let t = p.begin();
            let n = (rnd() % 4) as usize;
            for _ in 0..n {
                p.add_event(t);
                pending.push((i, t));
            }
            p.commit(t, Lsn((i as u64 + 1) * 10));
            txs.push(n);
        }
        let mut remaining = txs.clone();
        while !pending.is_empty() {
            let k = (rnd() as usize) % pending.len();
            let (i, t) = pending.swap_remove(k);
            remaining[i] -= 1;
            p.done(t);
            let prefix = remaining.iter().take_while(|&&r| r == 0).count();
            let expect = if prefix == 0 { 0 } else { prefix as u64 * 10 };
            assert!(p.flushed() >= Lsn(expect));
            // Never past the first transaction with outstanding events.
            if prefix < remaining.len() {
                assert!(p.flushed() < Lsn((prefix as u64 + 1) * 10));
            }
        }
        assert_eq!(p.flushed(), Lsn(5000));
    }
}
