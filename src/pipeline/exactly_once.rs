//! Exactly-once delivery (`kafka.delivery = "exactly-once"`): events go out
//! in Kafka transactions, each carrying one progress record — the stream
//! position of its last event — to a compacted progress topic. A
//! `read_committed` consumer sees a transaction's events and its progress
//! record together or not at all, so after any crash the relay reads the
//! last progress record, skips every replayed event at or before it, and
//! sends the rest: nothing twice, nothing lost (ARCHITECTURE.md,
//! invariant 13; docs/exactly-once.md).
//!
//! - A [`Position`] is (commit LSN of the PostgreSQL transaction, index of
//!   the event within it). pgoutput's Begin carries the commit LSN, so the
//!   position of every row and logical message is known as it arrives; a
//!   Kafka transaction may end inside a PostgreSQL transaction.
//! - The slot is confirmed only past events whose Kafka transaction
//!   committed and, with marking, whose `COMPLETED` mark is durable. Rows
//!   are marked only after their Kafka transaction committed (an aborted
//!   one must leave them `PENDING`).
//! - A new slot's backfill reads the rows still `PENDING` from the slot's
//!   snapshot; the rows Kafka already has but the table may not show yet
//!   are the committing transaction's and those of earlier committed ones
//!   whose `COMPLETED` mark is not durable yet. Each progress record lists
//!   all of them ([`RowSet`]), so the last one covers every such row; a
//!   backfill skips them (and marks them). So correctness never needs a
//!   commit to wait for marks; the cadence still does, a little
//!   ([`MARK_PACE_LIMIT`]): committing while the last commit's marks are
//!   being written doubles the commits and their fsyncs for nothing.
//! - Skipped events are still marked `COMPLETED`: a crash between the Kafka
//!   commit and the mark must not leave delivered rows `PENDING`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::KafkaRecord;
use crate::Lsn;

/// Where an event sits in the stream: its transaction's commit LSN, then its
/// index among that transaction's events (rows and logical messages in
/// stream order). Ordered as the stream delivers events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The commit LSN of the event's transaction (Begin's `final_lsn`; a
    /// non-transactional logical message's own LSN).
    pub lsn: Lsn,
    /// The event's index within its transaction, from 0.
    pub index: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.lsn, self.index)
    }
}

/// The stream a progress record belongs to: the database cluster (its
/// system identifier and timeline), the database, and the slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamIdentity {
    /// `IDENTIFY_SYSTEM`'s system identifier: the same on a physical
    /// standby, different on any other cluster.
    pub system_identifier: String,
    /// The database.
    pub database: String,
    /// The replication slot.
    pub slot: String,
    /// The server's timeline when the relay started.
    pub timeline: u32,
}

impl StreamIdentity {
    /// The `transactional.id` (and the progress record's key) every relay
    /// serving this stream uses unless one is configured.
    pub fn transactional_id(&self) -> String {
        format!(
            "pgoutbox-{}-{}-{}",
            self.system_identifier, self.database, self.slot
        )
    }
}

/// Integer row ids, as sorted disjoint ranges: the rows of one Kafka
/// transaction, compact because ids mostly come in runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RowSet(Vec<(i64, i64)>);

impl RowSet {
    /// The set of `ids`.
    pub fn of(mut ids: Vec<i64>) -> RowSet {
        ids.sort_unstable();
        ids.dedup();
        let mut ranges: Vec<(i64, i64)> = Vec::new();
        for id in ids {
            match ranges.last_mut() {
                Some((_, hi)) if hi.checked_add(1) == Some(id) => *hi = id,
                _ => ranges.push((id, id)),
            }
        }
        RowSet(ranges)
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: i64) -> bool {
        let i = self.0.partition_point(|&(_, hi)| hi < id);
        self.0.get(i).is_some_and(|&(lo, _)| lo <= id)
    }

    /// The number of ids.
    pub fn len(&self) -> u64 {
        self.0
            .iter()
            .map(|&(lo, hi)| hi.abs_diff(lo) + 1)
            .sum::<u64>()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An outbox row: its table ([`crate::outbox::RowKey::table`], `None` for
/// the relay's own) and its integer id.
pub type RowRef = (Option<Arc<str>>, i64);

/// The value of a progress record (JSON in the progress topic).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// The record layout's version (1).
    pub version: u32,
    /// See [`StreamIdentity::system_identifier`].
    pub system_identifier: String,
    /// See [`StreamIdentity::database`].
    pub database: String,
    /// See [`StreamIdentity::slot`].
    pub slot: String,
    /// The timeline of the relay that wrote it.
    pub timeline: u32,
    /// The position of the last stream event committed (`None` while only
    /// backfilled rows have been).
    pub lsn: Option<Lsn>,
    /// With `lsn`: the index of that event in its transaction.
    pub index: u64,
    /// The ids of the outbox rows this Kafka transaction carried and of the
    /// rows earlier ones carried whose `COMPLETED` mark was not durable yet
    /// when it committed: every row Kafka has that may still be `PENDING`.
    pub rows: RowSet,
    /// The same for the other outbox tables of the publication, by quoted
    /// schema-qualified name (absent when there are none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tables: BTreeMap<String, RowSet>,
    /// While a new slot's backfill runs: its consistent point and the rows
    /// it has committed so far.
    pub backfill: Option<BackfillProgress>,
}

/// How far a backfill got (see [`ProgressRecord::backfill`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillProgress {
    /// The new slot's consistent point.
    pub consistent_point: Lsn,
    /// Rows committed to Kafka by this backfill so far (counting only this
    /// run's).
    pub rows: u64,
}

impl ProgressRecord {
    /// Whether the record lists `row`.
    pub fn lists(&self, row: &RowRef) -> bool {
        match &row.0 {
            None => self.rows.contains(row.1),
            Some(t) => self.tables.get(&**t).is_some_and(|s| s.contains(row.1)),
        }
    }

    /// The number of rows listed.
    pub fn rows_listed(&self) -> u64 {
        self.rows.len() + self.tables.values().map(RowSet::len).sum::<u64>()
    }

    /// The position recorded, if any.
    pub fn position(&self) -> Option<Position> {
        self.lsn.map(|lsn| Position {
            lsn,
            index: self.index,
        })
    }

    /// Parses a record's value; the error says what is wrong with it.
    pub fn parse(value: &[u8]) -> Result<ProgressRecord, String> {
        let record: ProgressRecord = serde_json::from_slice(value)
            .map_err(|e| format!("not a pgoutbox progress record ({e})"))?;
        if record.version != 1 {
            return Err(format!(
                "progress record version {} is not understood by this pgoutbox (it writes version 1); upgrade pgoutbox",
                record.version
            ));
        }
        Ok(record)
    }

    /// Why this record does not belong to `stream` (another cluster,
    /// database or slot), if it does not.
    pub fn mismatch(&self, stream: &StreamIdentity) -> Option<String> {
        if self.system_identifier != stream.system_identifier {
            return Some(format!(
                "it was written for the database cluster with system identifier {} but this one's is {} (a different server, or one restored with a new identity)",
                self.system_identifier, stream.system_identifier
            ));
        }
        if self.database != stream.database {
            return Some(format!(
                "it was written for database {:?}, not {:?}",
                self.database, stream.database
            ));
        }
        if self.slot != stream.slot {
            return Some(format!(
                "it was written for slot {:?}, not {:?}",
                self.slot, stream.slot
            ));
        }
        None
    }
}

/// Why a Kafka transaction could not commit, by what the relay does next.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxnFailure {
    /// The transaction was aborted (or must be): resume from the last
    /// committed position.
    #[error("{0}")]
    Abort(String),
    /// Another relay with the same `transactional.id` took over: stop
    /// serving and stand by.
    #[error("{0}")]
    Fenced(String),
    /// The producer cannot go on (e.g. the brokers do not support
    /// transactions, or it is not authorised): stop the relay.
    #[error("{0}")]
    Fatal(String),
}

/// A commit (or abort) in progress, run off the async threads.
pub type CommitFuture = tokio::task::JoinHandle<Result<(), TxnFailure>>;

/// Positions whose record the broker refused for good inside a Kafka
/// transaction (the row was dead-lettered, the transaction aborted): the
/// session that replays them dead-letters them without sending. Kept for
/// the process's life, across sessions.
pub(super) fn refused() -> &'static Mutex<HashSet<Position>> {
    static REFUSED: OnceLock<Mutex<HashSet<Position>>> = OnceLock::new();
    REFUSED.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Where exactly-once delivery starts from, and how it commits.
#[derive(Clone, Debug)]
pub struct ExactlyOnceStart {
    /// The stream, for the progress records written.
    pub stream: StreamIdentity,
    /// The progress record's key (the `transactional.id`).
    pub key: String,
    /// The progress topic.
    pub topic: String,
    /// The last committed record, if any (already checked against the
    /// stream), with the position to skip up to (clamped to a timeline
    /// switch, see the CDC session).
    pub resume: Option<(ProgressRecord, Option<Position>)>,
    /// Commit once a Kafka transaction holds this many events …
    pub max_events: usize,
    /// … or has been open this long.
    pub interval: Duration,
}

/// How long past its interval a transaction that is not full may wait for
/// the marks of earlier commits to be durable before it commits anyway.
///
/// Pacing commits by marks keeps one mark batch per Kafka transaction: a
/// 1 event/tx drain committed 5–10× as often without it (each commit's
/// `EndTxn` and the marks' `UPDATE` contending for the same disk, ~40 %
/// more relay CPU; BENCHMARKS.md, session 9). Bounded, because a mark can
/// be retried for a while (a row whose commit is not visible yet) and Kafka
/// delivery must not wait on that; a full transaction never waits.
pub const MARK_PACE_LIMIT: Duration = Duration::from_millis(250);

/// How long after a Kafka commit returns the next transaction waits before
/// its first record goes to the producer (records read meanwhile are held,
/// as during the commit).
///
/// `EndTxn` returns once the coordinator has logged the commit; it writes
/// the commit markers afterwards, and until they are written it refuses to
/// add partitions to the producer's next transaction
/// (`CONCURRENT_TRANSACTIONS`). librdkafka then retries the
/// `AddPartitionsToTxn` after a fixed 20 ms, and every record of the new
/// transaction waits with it: at 5k events/s on the test machine 27 % of
/// transactions started that way, and their commits waited 18 ms (p50)
/// for the stalled records, against 4 ms for the others (BENCHMARKS.md,
/// session 22). Markers were written 2–5 ms after `EndTxn` returned in
/// most transactions; waiting this long costs an event nothing at the
/// cadence (its transaction's interval counts from when it was read, see
/// `Transactions::held_since`) and spares most transactions the stall.
pub const MARKER_SETTLE: Duration = Duration::from_millis(5);

/// A Kafka transaction being filled.
#[derive(Debug)]
pub(super) struct OpenTxn {
    pub opened: Instant,
    /// Events sent in it, by ticket.
    pub tickets: Vec<u64>,
    /// Their outbox rows.
    pub rows: Vec<RowRef>,
}

/// A Kafka transaction being committed.
pub(super) struct Committing {
    pub started: Instant,
    pub tickets: Vec<u64>,
    pub position: Option<Position>,
    pub future: CommitFuture,
}

/// The pipeline's exactly-once state.
pub(super) struct Transactions {
    pub start: ExactlyOnceStart,
    /// Skip replayed stream events at or before this.
    pub skip_to: Option<Position>,
    /// Skip (and mark) backfilled rows this record lists.
    pub skip_rows: Option<ProgressRecord>,
    /// The position the next stream event gets.
    pub next: Position,
    /// The highest stream position in a committed (or committing) Kafka
    /// transaction: what the next progress record says.
    pub reached: Option<Position>,
    /// The highest stream position offered (sent, dead-lettered or
    /// skipped) in this session.
    pub offered: Option<Position>,
    /// `Some(consistent point)` while a backfill runs; its rows committed.
    pub backfill: Option<(Lsn, u64)>,
    pub open: Option<OpenTxn>,
    pub committing: Option<Committing>,
    /// Records read while a commit runs, by window ticket: sent in the
    /// next Kafka transaction once it committed.
    pub held: VecDeque<(u64, KafkaRecord)>,
    /// When the first of `held` was read: the next transaction's interval
    /// counts from then, not from the end of the commit that held it, so
    /// a slow commit is not paid for twice by the events it held.
    pub held_since: Option<Instant>,
    /// After a commit: no new transaction before this instant
    /// ([`MARKER_SETTLE`]).
    pub settle_until: Option<Instant>,
    /// Commit now, whatever the cadence (end of a backfill, shutdown).
    pub force: bool,
    /// Rows in committed Kafka transactions whose `COMPLETED` mark is not
    /// durable yet, by mark ticket: the next progress record lists them
    /// too (see the module comment).
    pub unmarked: HashMap<u64, RowRef>,
}

impl Transactions {
    pub fn new(start: ExactlyOnceStart) -> Transactions {
        let (skip_to, skip_rows) = match &start.resume {
            Some((record, skip_to)) => (*skip_to, Some(record.clone())),
            None => (None, None),
        };
        Transactions {
            skip_to,
            skip_rows,
            reached: start.resume.as_ref().and_then(|(r, _)| r.position()),
            next: Position::default(),
            offered: None,
            backfill: None,
            open: None,
            committing: None,
            held: VecDeque::new(),
            held_since: None,
            settle_until: None,
            force: false,
            unmarked: HashMap::new(),
            start,
        }
    }

    /// Whether the event at `at` (a stream event) or the backfilled row
    /// `row` is already in Kafka.
    pub fn already_sent(&self, at: Option<Position>, row: Option<&RowRef>) -> bool {
        match (self.backfill, at, row) {
            (Some(_), _, Some(row)) => self.skip_rows.as_ref().is_some_and(|r| r.lists(row)),
            (None, Some(p), _) => self.skip_to.is_some_and(|s| p <= s),
            _ => false,
        }
    }

    /// True while records wait for the next Kafka transaction: a commit
    /// runs, or the last one's markers are settling ([`MARKER_SETTLE`]).
    pub fn holding(&self) -> bool {
        self.committing.is_some() || self.settle_until.is_some()
    }

    /// True when the next Kafka transaction holds `max_events` events
    /// (sent in the open one, or held while a commit runs or its markers
    /// settle).
    pub fn full(&self) -> bool {
        let open = self.open.as_ref().map_or(0, |o| o.tickets.len());
        open + self.held.len() >= self.start.max_events
    }

    /// The instant the open transaction is due, if one is open and may
    /// commit (no commit running): at once when forced or full; after the
    /// interval once every earlier mark is durable; otherwise up to
    /// [`MARK_PACE_LIMIT`] later (the caller asks again as marks land).
    pub fn due(&self, window_full: bool) -> Option<Instant> {
        let open = self.open.as_ref()?;
        if self.committing.is_some() {
            return None;
        }
        if self.force || window_full || self.full() {
            Some(open.opened)
        } else if self.unmarked.is_empty() {
            Some(open.opened + self.start.interval)
        } else {
            Some(open.opened + self.start.interval + MARK_PACE_LIMIT)
        }
    }

    /// The progress record a commit of `open` writes.
    pub fn record(&self, open: &OpenTxn) -> ProgressRecord {
        let s = &self.start.stream;
        let rows: Vec<&RowRef> = open.rows.iter().chain(self.unmarked.values()).collect();
        ProgressRecord {
            version: 1,
            system_identifier: s.system_identifier.clone(),
            database: s.database.clone(),
            slot: s.slot.clone(),
            timeline: s.timeline,
            lsn: self.reached.map(|p| p.lsn),
            index: self.reached.map_or(0, |p| p.index),
            rows: RowSet::of(rows.iter().filter(|r| r.0.is_none()).map(|r| r.1).collect()),
            tables: others(&rows),
            backfill: self.backfill.map(|(point, rows)| BackfillProgress {
                consistent_point: point,
                rows: rows + open.rows.len() as u64,
            }),
        }
    }
}

/// The rows of tables other than the relay's own, by table.
fn others(rows: &[&RowRef]) -> BTreeMap<String, RowSet> {
    let mut by_table: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (table, id) in rows {
        if let Some(t) = table {
            by_table.entry(t.to_string()).or_default().push(*id);
        }
    }
    by_table
        .into_iter()
        .map(|(t, ids)| (t, RowSet::of(ids)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::testing::stream;

    #[test]
    fn positions_order_by_commit_then_index() {
        let a = Position {
            lsn: Lsn(10),
            index: 5,
        };
        let b = Position {
            lsn: Lsn(11),
            index: 0,
        };
        assert!(a < b);
        assert!(
            a < Position {
                lsn: Lsn(10),
                index: 6
            }
        );
        assert_eq!(a.to_string(), "0/A#5");
    }

    #[test]
    fn row_sets_are_ranges_and_answer_membership() {
        let s = RowSet::of(vec![5, 3, 4, 10, 11, 20, 4]);
        assert_eq!(s, RowSet(vec![(3, 5), (10, 11), (20, 20)]));
        assert_eq!(s.len(), 6);
        for id in [3, 4, 5, 10, 11, 20] {
            assert!(s.contains(id), "{id}");
        }
        for id in [2, 6, 9, 12, 19, 21, i64::MIN, i64::MAX] {
            assert!(!s.contains(id), "{id}");
        }
        assert!(RowSet::of(vec![]).is_empty());
        assert!(RowSet::of(vec![i64::MAX, i64::MAX - 1]).contains(i64::MAX));
    }

    #[test]
    fn records_round_trip_and_name_what_does_not_match() {
        let t = Transactions::new(ExactlyOnceStart {
            stream: stream(),
            key: stream().transactional_id(),
            topic: "pgoutbox.progress".into(),
            resume: None,
            max_events: 10,
            interval: Duration::from_millis(100),
        });
        let mut t = t;
        t.reached = Some(Position {
            lsn: Lsn(0x16B3748),
            index: 41,
        });
        let open = OpenTxn {
            opened: Instant::now(),
            tickets: vec![1, 2, 3],
            rows: vec![
                (None, 7),
                (None, 8),
                (Some(Arc::from("\"s\".\"billing\"")), 7),
            ],
        };
        let record = t.record(&open);
        let json = serde_json::to_vec(&record).unwrap();
        let back = ProgressRecord::parse(&json).unwrap();
        assert_eq!(back, record);
        assert_eq!(
            back.position(),
            Some(Position {
                lsn: Lsn(0x16B3748),
                index: 41
            })
        );
        assert!(back.mismatch(&stream()).is_none());
        let mut other = stream();
        other.system_identifier = "1".into();
        assert!(back.mismatch(&other).unwrap().contains("system identifier"));
        let mut other = stream();
        other.slot = "s2".into();
        assert!(back.mismatch(&other).unwrap().contains("slot"));
        let e = ProgressRecord::parse(b"{\"hello\":1}").unwrap_err();
        assert!(e.contains("not a pgoutbox progress record"), "{e}");
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["version"] = 2.into();
        let e = ProgressRecord::parse(v.to_string().as_bytes()).unwrap_err();
        assert!(e.contains("upgrade"), "{e}");
    }

    #[tokio::test]
    async fn skipping_uses_positions_on_the_stream_and_row_ids_in_a_backfill() {
        let record = ProgressRecord {
            version: 1,
            system_identifier: "1".into(),
            database: "d".into(),
            slot: "s".into(),
            timeline: 1,
            lsn: Some(Lsn(100)),
            index: 3,
            rows: RowSet::of(vec![50, 51]),
            tables: BTreeMap::from([("\"s\".\"billing\"".to_owned(), RowSet::of(vec![52]))]),
            backfill: None,
        };
        let at = Position {
            lsn: Lsn(100),
            index: 3,
        };
        let mut t = Transactions::new(ExactlyOnceStart {
            stream: stream(),
            key: "k".into(),
            topic: "t".into(),
            resume: Some((record, Some(at))),
            max_events: 2,
            interval: Duration::from_secs(1),
        });
        assert!(t.already_sent(Some(at), None));
        assert!(t.already_sent(
            Some(Position {
                lsn: Lsn(99),
                index: 9
            }),
            Some(&(None, 1))
        ));
        assert!(!t.already_sent(
            Some(Position {
                lsn: Lsn(100),
                index: 4
            }),
            None
        ));
        t.backfill = Some((Lsn(5), 0));
        let billing: Option<Arc<str>> = Some(Arc::from("\"s\".\"billing\""));
        assert!(t.already_sent(None, Some(&(None, 51))));
        assert!(!t.already_sent(None, Some(&(None, 52))), "52 is billing's");
        assert!(t.already_sent(None, Some(&(billing.clone(), 52))));
        assert!(
            !t.already_sent(None, Some(&(billing, 51))),
            "51 is the home table's"
        );
        // Cadence: due after the interval, at once when full or forced, and
        // never while a commit runs.
        let opened = Instant::now();
        t.open = Some(OpenTxn {
            opened,
            tickets: vec![1],
            rows: vec![],
        });
        assert_eq!(t.due(false), Some(opened + Duration::from_secs(1)));
        assert_eq!(t.due(true), Some(opened));
        t.open.as_mut().unwrap().tickets.push(2);
        assert_eq!(t.due(false), Some(opened));
        t.committing = Some(Committing {
            started: opened,
            tickets: vec![],
            position: None,
            future: tokio::spawn(async { Ok(()) }),
        });
        assert_eq!(t.due(true), None);
    }
}
