//! The delivery ledger: after a fault scenario, every outbox row committed
//! during it against every record in the target topics, read back from
//! Kafka from the beginning.
//!
//! It reports what pgoutbox promises never happens — missing events,
//! reordering within an aggregate, events of rolled-back transactions — and
//! the duplicates at-least-once allows, each checked against an explanation
//! (for CDC: its transaction was sent but not yet confirmed when the fault
//! hit).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::harness::{read_until_all_as, Isolation, Record, TestOutbox};

/// One event the load committed (or tried to).
#[derive(Clone, Debug)]
pub struct Written {
    /// Its tracking id.
    pub tracking_id: Uuid,
    /// The writing transaction's id (32-bit, as pgoutput reports it).
    pub xid: u32,
}

/// What a [`Load`] wrote.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Events of transactions whose COMMIT succeeded.
    pub committed: Vec<Written>,
    /// Events of transactions the load rolled back on purpose.
    pub rolled_back: Vec<Uuid>,
}

/// Continuous inserts: one transaction after another, 1–3 events each, on
/// `aggregates` aggregates, every payload carrying its sequence number
/// within its aggregate; every tenth transaction is rolled back. Survives
/// database restarts (a transaction that fails is simply not counted; the
/// table is the ground truth the ledger reads).
pub struct Load {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<LoadResult>,
}

impl Load {
    /// Starts writing into `<schema>.outbox` with `aggregate_type`, pausing
    /// `pause` between transactions.
    pub fn start(schema: &str, aggregate_type: &str, aggregates: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), committed.clone());
        let sql = format!("SELECT {schema}.outbox_publish($1, $2, 'Happened', $3)");
        let aggregate_type = aggregate_type.to_owned();
        let handle = tokio::spawn(async move {
            let ids: Vec<Uuid> = (0..aggregates).map(|_| Uuid::new_v4()).collect();
            let mut seq: HashMap<Uuid, i64> = HashMap::new();
            let mut out = LoadResult::default();
            let mut client: Option<tokio_postgres::Client> = None;
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    let url = super::services().database_url.clone();
                    client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                        Ok((c, conn)) => {
                            tokio::spawn(conn);
                            Some(c)
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                }
                let cl = client.as_mut().expect("connected");
                n += 1;
                let rollback = n % 10 == 0;
                let events = 1 + (n % 3) as usize;
                let result: Result<(u32, Vec<Uuid>), tokio_postgres::Error> = async {
                    let tx = cl.transaction().await?;
                    let xid: i64 = tx.query_one("SELECT txid_current()", &[]).await?.get(0);
                    let mut written = Vec::new();
                    for e in 0..events {
                        let agg = ids[(n as usize * 7 + e) % ids.len()];
                        let next = seq.get(&agg).copied().unwrap_or(0);
                        let payload = serde_json::json!({ "seq": next, "n": n });
                        let id: Uuid = tx
                            .query_one(&sql, &[&aggregate_type, &agg, &payload])
                            .await?
                            .get(0);
                        seq.insert(agg, next + 1);
                        written.push(id);
                    }
                    if rollback {
                        tx.rollback().await?;
                    } else {
                        tx.commit().await?;
                    }
                    Ok((xid as u32, written))
                }
                .await;
                match result {
                    Ok((_, written)) if rollback => out.rolled_back.extend(written),
                    Ok((xid, written)) => {
                        c.fetch_add(written.len() as u64, Ordering::SeqCst);
                        out.committed.extend(
                            written
                                .into_iter()
                                .map(|tracking_id| Written { tracking_id, xid }),
                        );
                    }
                    Err(_) => client = None,
                }
                tokio::time::sleep(pause).await;
            }
            out
        });
        Load {
            stop,
            committed,
            handle,
        }
    }

    /// Events committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Stops writing and returns what was written.
    pub async fn stop(self) -> LoadResult {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.expect("load task")
    }
}

/// The ledger's verdict.
#[derive(Debug, Default)]
pub struct Report {
    /// Rows in the outbox table (the ground truth of what committed).
    pub rows: usize,
    /// Records read from the topics.
    pub records: usize,
    /// Rows never delivered (must be 0).
    pub missing: usize,
    /// Extra deliveries (at-least-once).
    pub duplicates: usize,
    /// Tracking ids delivered more than once without an explanation.
    pub unexplained: Vec<String>,
    /// Records that went back below an aggregate's highest sequence number
    /// already delivered (must be 0 where order is promised).
    pub reordered: usize,
    /// Records of rolled-back transactions (must be 0).
    pub rolled_back_published: usize,
    /// Records matching no row at all (must be 0).
    pub phantoms: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rows {}, records {}, missing {}, duplicates {} ({} unexplained), reordered {}, rolled-back published {}, phantoms {}",
            self.rows,
            self.records,
            self.missing,
            self.duplicates,
            self.unexplained.len(),
            self.reordered,
            self.rolled_back_published,
            self.phantoms
        )
    }
}

impl Report {
    /// Panics unless nothing was lost, reordered (when `ordered`),
    /// published from a rollback or duplicated without explanation.
    pub fn assert_clean(&self, ordered: bool) {
        assert_eq!(self.missing, 0, "events lost: {self}");
        assert_eq!(
            self.rolled_back_published, 0,
            "rolled-back events published: {self}"
        );
        assert_eq!(self.phantoms, 0, "records matching no row: {self}");
        if ordered {
            assert_eq!(self.reordered, 0, "per-aggregate order broken: {self}");
        }
        assert!(
            self.unexplained.is_empty(),
            "duplicates outside the in-flight window: {:?} ({self})",
            &self.unexplained[..self.unexplained.len().min(10)]
        );
    }
}

/// Per aggregate (record key), how often an event is delivered for the
/// first time after a later event of its aggregate already was. Replays
/// (an at-least-once resend repeats a suffix already delivered) are not
/// reorders: a consumer deduplicating on `tracking_id` applies events in
/// the order of their first delivery, and that order must be the
/// aggregate's. Sequence numbers come from the payload's `seq`.
pub fn reorders(records: &[Record]) -> usize {
    let mut by_key: HashMap<&str, Vec<&Record>> = HashMap::new();
    for r in records {
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    let mut bad = 0;
    for recs in by_key.values_mut() {
        recs.sort_by_key(|r| (r.partition, r.offset));
        let mut seen: HashSet<&str> = HashSet::new();
        let mut highest = i64::MIN;
        for r in recs.iter() {
            if !seen.insert(r.header("tracking_id")) {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&r.value).unwrap_or_default();
            let Some(seq) = v["seq"].as_i64() else {
                continue;
            };
            if seq < highest {
                bad += 1;
            }
            highest = highest.max(seq);
        }
    }
    bad
}

/// Reads the table and the topics and compares them. `explained` says
/// whether a duplicate delivery of a committed event is allowed (events the
/// load did not write — none, normally — count as unexplained).
pub async fn check(
    outbox: &TestOutbox,
    topics: Vec<String>,
    load: &LoadResult,
    timeout: Duration,
    explained: impl Fn(&Written) -> bool,
) -> Report {
    check_as(outbox, topics, load, timeout, None, explained).await
}

/// [`check`], reading the topics at `isolation` (transactional topics).
pub async fn check_as(
    outbox: &TestOutbox,
    topics: Vec<String>,
    load: &LoadResult,
    timeout: Duration,
    isolation: Option<Isolation>,
    explained: impl Fn(&Written) -> bool,
) -> Report {
    let rows: Vec<Uuid> = outbox
        .client
        .query(
            &format!("SELECT tracking_id FROM {}.outbox", outbox.name),
            &[],
        )
        .await
        .expect("read outbox rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let records = read_until_all_as(topics, rows.clone(), timeout, isolation).await;
    let row_set: HashSet<String> = rows.iter().map(Uuid::to_string).collect();
    let rolled_back: HashSet<String> = load.rolled_back.iter().map(Uuid::to_string).collect();
    let written: HashMap<String, &Written> = load
        .committed
        .iter()
        .map(|w| (w.tracking_id.to_string(), w))
        .collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for r in &records {
        *counts.entry(r.header("tracking_id")).or_default() += 1;
    }
    let mut report = Report {
        rows: rows.len(),
        records: records.len(),
        reordered: reorders(&records),
        ..Report::default()
    };
    report.missing = row_set
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .count();
    for (id, n) in &counts {
        if rolled_back.contains(*id) {
            report.rolled_back_published += n;
        } else if !row_set.contains(*id) {
            report.phantoms += n;
        }
        if *n > 1 {
            report.duplicates += n - 1;
            if !written.get(*id).is_some_and(|w| explained(w)) {
                report.unexplained.push((*id).to_owned());
            }
        }
    }
    report
}

/// The in-flight windows of CDC faults: at each fault, commits ending after
/// the slot's confirmed position and at or before the WAL end may be sent
/// again; nothing else may.
#[derive(Debug, Default)]
pub struct FaultWindows {
    windows: Vec<(u64, u64)>,
}

impl FaultWindows {
    /// Records a fault window `(confirmed_flush read just before the
    /// fault, WAL end read just after it]`.
    pub fn push(&mut self, confirmed_before: u64, wal_end_after: u64) {
        self.windows.push((confirmed_before, wal_end_after));
    }

    /// Whether a commit ending at `end` lies in a window.
    pub fn covers(&self, end: u64) -> bool {
        self.windows.iter().any(|&(c, w)| end > c && end <= w)
    }
}

/// The server's current WAL end.
pub async fn wal_end(client: &tokio_postgres::Client) -> u64 {
    client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .expect("read wal end")
        .get::<_, i64>(0) as u64
}
