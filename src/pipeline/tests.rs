//! The pipeline against in-memory fakes: which position is confirmed after
//! each verdict (ARCHITECTURE.md, invariants 1, 2 and 5).

use futures_util::FutureExt;

use super::testing::{event, row, Rig, RigOptions};
use super::{Failure, SendError};
use crate::error::Error;
use crate::Lsn;

fn rig(mark_completed: bool) -> Rig {
    Rig::new(RigOptions {
        mark_completed,
        ..RigOptions::default()
    })
}

#[tokio::test]
async fn out_of_order_acks_confirm_only_the_acked_prefix() {
    let mut r = rig(false);
    let p = &mut r.pipeline;
    let a = p.begin(Lsn::ZERO);
    p.offer(a, event(1, "x"), row(1)).await.unwrap();
    p.offer(a, event(2, "y"), row(2)).await.unwrap();
    p.commit(a, Lsn(200));
    let b = p.begin(Lsn::ZERO);
    p.offer(b, event(3, "z"), row(3)).await.unwrap();
    p.commit(b, Lsn(300));
    assert_eq!(
        r.sent().iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    r.ack(2);
    assert_eq!(
        r.settle().unwrap(),
        Lsn(100),
        "b acked alone: a holds it back"
    );
    r.ack(1);
    assert_eq!(r.settle().unwrap(), Lsn(100), "a is half acked");
    r.ack(0);
    assert_eq!(r.settle().unwrap(), Lsn(300), "both done: past b");
    assert_eq!(r.pipeline.in_flight(), 0);
}

#[tokio::test]
async fn with_marking_a_row_counts_only_once_its_mark_is_durable() {
    let mut r = rig(true);
    let p = &mut r.pipeline;
    let a = p.begin(Lsn::ZERO);
    p.offer(a, event(1, "x"), row(1)).await.unwrap();
    p.commit(a, Lsn(200));
    r.ack(0);
    assert_eq!(r.settle().unwrap(), Lsn(100), "acked but not marked");
    assert_eq!(r.marked("completed"), [0]);
    r.durable(0);
    assert_eq!(r.settle().unwrap(), Lsn(200));
}

#[tokio::test]
async fn a_failed_send_mid_transaction_ends_the_session_and_confirms_nothing_of_it() {
    let mut r = rig(false);
    let p = &mut r.pipeline;
    let a = p.begin(Lsn::ZERO);
    p.offer(a, event(1, "x"), row(1)).await.unwrap();
    p.commit(a, Lsn(200));
    let b = p.begin(Lsn::ZERO);
    p.offer(b, event(2, "x"), row(2)).await.unwrap();
    r.refuse_next(SendError::Failed(Failure::Transient("broker down".into())));
    let e = r
        .pipeline
        .offer(b, event(3, "x"), row(3))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Transient(ref m) if m.contains("broker down")),
        "{e}"
    );
    r.ack(0);
    r.ack(1);
    assert_eq!(
        r.settle().unwrap(),
        Lsn(200),
        "a is confirmed, the transaction that failed is not"
    );
}

#[tokio::test]
async fn a_full_queue_is_backpressure_not_an_error() {
    let mut r = rig(false);
    r.refuse_next(SendError::QueueFull);
    r.refuse_next(SendError::QueueFull);
    let p = &mut r.pipeline;
    let a = p.begin(Lsn::ZERO);
    p.offer(a, event(1, "x"), row(1)).await.unwrap();
    p.commit(a, Lsn(200));
    assert_eq!(r.sent().len(), 1, "sent once the queue had room");
    r.ack(0);
    assert_eq!(r.settle().unwrap(), Lsn(200));
}

#[tokio::test]
async fn a_full_window_waits_for_a_verdict_and_never_errs() {
    let mut r = Rig::new(RigOptions {
        max_events: 2,
        mark_completed: false,
        ..RigOptions::default()
    });
    let p = &mut r.pipeline;
    let a = p.begin(Lsn::ZERO);
    p.offer(a, event(1, "x"), row(1)).await.unwrap();
    p.offer(a, event(2, "x"), row(2)).await.unwrap();
    assert!(!p.has_room());
    assert!(
        p.wait_for_room().now_or_never().is_none(),
        "no verdict yet: the wait is pending"
    );
    r.ack(1);
    r.pipeline.wait_for_room().await.unwrap();
    assert!(r.pipeline.has_room());
    assert_eq!(r.pipeline.in_flight(), 1);
    assert_eq!(
        r.pipeline.flushed(),
        Lsn(100),
        "the transaction is still open"
    );
}

#[tokio::test]
async fn a_dead_lettered_event_is_durable_once_its_mark_is() {
    let mut r = rig(false);
    let p = &mut r.pipeline;
    let a = p.begin(Lsn::ZERO);
    p.offer(a, event(1, "x"), row(1)).await.unwrap();
    let mut bad = event(2, "x");
    bad.event_type = bytes::Bytes::from_static(b"not a topic!");
    p.offer(a, bad, row(2)).await.unwrap();
    p.commit(a, Lsn(200));
    assert_eq!(r.sent().len(), 1, "the event without a topic is not sent");
    assert_eq!(r.marked("dead_letter"), [1]);
    r.ack(0);
    assert_eq!(
        r.settle().unwrap(),
        Lsn(100),
        "the dead letter is not written yet"
    );
    r.durable(1);
    assert_eq!(r.settle().unwrap(), Lsn(200));
    // A record Kafka refuses for good is dead-lettered the same way.
    let b = r.pipeline.begin(Lsn::ZERO);
    r.pipeline.offer(b, event(3, "x"), row(3)).await.unwrap();
    r.pipeline.commit(b, Lsn(300));
    r.deliver(2, Err(Failure::Permanent("too large".into())));
    assert_eq!(r.settle().unwrap(), Lsn(200));
    assert_eq!(r.marked("dead_letter"), [1, 2]);
    r.durable(2);
    assert_eq!(r.settle().unwrap(), Lsn(300));
    assert_eq!(r.pipeline.counters.dead_lettered, 2);
}

#[tokio::test]
async fn a_mark_that_fails_ends_the_session_without_confirming() {
    let mut r = rig(true);
    let p = &mut r.pipeline;
    let a = p.begin(Lsn::ZERO);
    p.offer(a, event(1, "x"), row(1)).await.unwrap();
    p.commit(a, Lsn(200));
    r.ack(0);
    r.marker_failed("the database went away");
    let e = r.settle().unwrap_err();
    assert!(
        matches!(e, Error::Transient(ref m) if m.contains("went away")),
        "{e}"
    );
    assert_eq!(r.pipeline.flushed(), Lsn(100));
}

#[tokio::test]
async fn transactions_without_events_confirm_at_once_but_never_past_a_pending_one() {
    let mut r = rig(false);
    let p = &mut r.pipeline;
    let empty = p.begin(Lsn::ZERO);
    p.commit(empty, Lsn(150));
    assert_eq!(p.flushed(), Lsn(150));
    let a = p.begin(Lsn::ZERO);
    p.offer(a, event(1, "x"), row(1)).await.unwrap();
    p.commit(a, Lsn(200));
    let later = p.begin(Lsn::ZERO);
    p.commit(later, Lsn(250));
    p.keepalive(Lsn(400));
    assert_eq!(p.flushed(), Lsn(150), "a is still in flight");
    r.ack(0);
    assert_eq!(r.settle().unwrap(), Lsn(400), "idle: the server's WAL end");
}

#[tokio::test]
async fn an_event_that_could_not_be_read_is_dead_lettered_in_its_transaction() {
    let mut r = rig(true);
    let p = &mut r.pipeline;
    let a = p.begin(Lsn::ZERO);
    p.dead_letter_unread(a, row(9), "column payload is NULL".into());
    p.commit(a, Lsn(200));
    assert!(r.sent().is_empty());
    assert_eq!(r.marked("dead_letter"), [0]);
    assert_eq!(r.settle().unwrap(), Lsn(100));
    r.durable(0);
    assert_eq!(r.settle().unwrap(), Lsn(200));
}

#[tokio::test]
async fn settle_waits_for_every_verdict_or_the_deadline() {
    let mut r = Rig::new(RigOptions {
        instant: true,
        ..RigOptions::default()
    });
    let p = &mut r.pipeline;
    let a = p.begin(Lsn::ZERO);
    for i in 0..10 {
        p.offer(a, event(i, "x"), row(i)).await.unwrap();
    }
    p.commit(a, Lsn(200));
    let far = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    assert!(p.settle(far).await.unwrap());
    assert_eq!(p.flushed(), Lsn(200));
    assert_eq!(r.marked("completed").len(), 10);
}

mod exactly_once {
    //! The pipeline's exactly-once half against the fakes (ARCHITECTURE.md,
    //! invariant 13).

    use std::time::Duration;

    use super::super::exactly_once::{
        ExactlyOnceStart, Position, ProgressRecord, RowSet, TxnFailure, MARKER_SETTLE,
        MARK_PACE_LIMIT,
    };
    use super::super::testing::stream;
    use super::*;

    /// A rig delivering exactly once, resuming after `resume` (lsn, index,
    /// rows), committing only when told to (a long interval).
    fn rig(resume: Option<(u64, u64, Vec<i64>)>) -> Rig {
        let resume = resume.map(|(lsn, index, rows)| {
            let record = ProgressRecord {
                version: 1,
                system_identifier: "1".into(),
                database: "d".into(),
                slot: "s".into(),
                timeline: 1,
                lsn: Some(Lsn(lsn)),
                index,
                rows: RowSet::of(rows),
                tables: Default::default(),
                backfill: None,
            };
            let at = record.position();
            (record, at)
        });
        let start = ExactlyOnceStart {
            stream: stream(),
            key: "k".into(),
            topic: "progress".into(),
            resume,
            max_events: 100,
            interval: Duration::from_secs(3600),
        };
        Rig::new(RigOptions::default()).exactly_once(start)
    }

    /// Lets the pipeline act on everything pending for a moment (commit
    /// timers included).
    async fn run_for(r: &mut Rig, ms: u64) -> Result<(), Error> {
        let until = tokio::time::Instant::now() + Duration::from_millis(ms);
        while let Ok(step) = tokio::time::timeout_at(until, r.pipeline.next()).await {
            step?;
        }
        Ok(())
    }

    fn record(r: &Rig, n: usize) -> ProgressRecord {
        let commits: Vec<_> = r.transactions().into_iter().flatten().collect();
        ProgressRecord::parse(&commits[n].value).expect("a progress record")
    }

    /// Rows 1 and 2 in a transaction committing at 500 (ending at 600),
    /// both acknowledged by Kafka (tickets 0 and 1), no Kafka commit yet.
    async fn two_acked_rows(r: &mut Rig) {
        let a = r.pipeline.begin(Lsn(500));
        r.pipeline.offer(a, event(1, "x"), row(1)).await.unwrap();
        r.pipeline.offer(a, event(2, "y"), row(2)).await.unwrap();
        r.pipeline.commit(a, Lsn(600));
        r.ack(0);
        r.ack(1);
    }

    #[tokio::test]
    async fn rows_are_marked_only_after_the_commit_and_confirmed_after_their_marks() {
        let mut r = rig(None);
        two_acked_rows(&mut r).await;
        run_for(&mut r, 50).await.unwrap();
        assert!(r.marks().is_empty(), "acked is not committed");
        assert_eq!(r.pipeline.flushed(), Lsn(100));
        r.pipeline.commit_now();
        run_for(&mut r, 50).await.unwrap();
        assert_eq!(r.marked("completed"), [0, 1], "marked once committed");
        let rec = record(&r, 0);
        assert_eq!(
            rec.position(),
            Some(Position {
                lsn: Lsn(500),
                index: 1
            })
        );
        assert_eq!(rec.rows, RowSet::of(vec![1, 2]));
        assert_eq!(r.pipeline.flushed(), Lsn(100), "marks not yet durable");
        r.durable(0);
        r.durable(1);
        assert_eq!(r.settle().unwrap(), Lsn(600));
    }

    #[tokio::test]
    async fn each_transaction_opens_with_the_progress_already_committed() {
        let mut r = rig(None);
        two_acked_rows(&mut r).await;
        r.pipeline.commit_now();
        run_for(&mut r, 50).await.unwrap();
        let b = r.pipeline.begin(Lsn(700));
        r.pipeline.offer(b, event(3, "x"), row(3)).await.unwrap();
        let opened: Vec<ProgressRecord> = r
            .opened_with()
            .iter()
            .map(|p| ProgressRecord::parse(&p.value).expect("a progress record"))
            .collect();
        assert_eq!(opened.len(), 2, "one per transaction");
        assert_eq!(
            opened[0].position(),
            None,
            "nothing committed before the first"
        );
        let committed = record(&r, 0);
        assert_eq!(opened[1].position(), committed.position());
        assert_eq!(
            opened[1].rows, committed.rows,
            "rows whose marks are not durable yet are listed again"
        );
        assert_eq!(r.opened_with()[1].topic, "progress");
    }

    #[tokio::test]
    async fn replayed_events_kafka_has_are_skipped_but_still_marked() {
        let mut r = rig(Some((500, 0, vec![1])));
        let a = r.pipeline.begin(Lsn(500));
        r.pipeline.offer(a, event(1, "x"), row(1)).await.unwrap();
        r.pipeline.offer(a, event(2, "x"), row(2)).await.unwrap();
        r.pipeline.commit(a, Lsn(600));
        assert_eq!(r.sent().len(), 1, "only the event after the record");
        assert_eq!(r.pipeline.counters.skipped, 1);
        assert_eq!(r.marked("completed"), [0], "the skipped row is marked");
        r.ack(1);
        r.durable(0);
        r.pipeline.commit_now();
        run_for(&mut r, 50).await.unwrap();
        assert_eq!(r.marked("completed"), [0, 1]);
        r.durable(1);
        assert_eq!(r.settle().unwrap(), Lsn(600));
    }

    #[tokio::test]
    async fn a_commit_does_not_wait_for_marks_and_lists_every_row_not_yet_marked() {
        let mut r = rig(None);
        let a = r.pipeline.begin(Lsn(500));
        r.pipeline.offer(a, event(1, "x"), row(1)).await.unwrap();
        r.pipeline.commit(a, Lsn(600));
        r.pipeline.commit_now();
        run_for(&mut r, 50).await.unwrap();
        assert_eq!(r.marked("completed"), [0]);
        let b = r.pipeline.begin(Lsn(700));
        r.pipeline.offer(b, event(2, "x"), row(2)).await.unwrap();
        r.pipeline.commit(b, Lsn(800));
        r.pipeline.commit_now();
        run_for(&mut r, 50).await.unwrap();
        let commits = |r: &Rig| r.transactions().iter().flatten().count();
        assert_eq!(commits(&r), 2, "row 1's pending mark does not hold it");
        assert_eq!(
            record(&r, 1).rows,
            RowSet::of(vec![1, 2]),
            "row 1 is in Kafka and may still be PENDING"
        );
        r.durable(0);
        let c = r.pipeline.begin(Lsn(900));
        r.pipeline.offer(c, event(3, "x"), row(3)).await.unwrap();
        r.pipeline.commit(c, Lsn(1000));
        r.pipeline.commit_now();
        run_for(&mut r, 50).await.unwrap();
        assert_eq!(commits(&r), 3);
        assert_eq!(
            record(&r, 2).rows,
            RowSet::of(vec![2, 3]),
            "row 1's mark is durable: no longer listed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_due_transaction_waits_for_earlier_marks_up_to_the_pace_limit() {
        let interval = Duration::from_millis(25);
        let mut r = rig(None);
        r.pipeline.eos.as_mut().unwrap().start.interval = interval;
        let commits = |r: &Rig| r.transactions().iter().flatten().count();
        let a = r.pipeline.begin(Lsn(500));
        r.pipeline.offer(a, event(1, "x"), row(1)).await.unwrap();
        r.pipeline.commit(a, Lsn(600));
        run_for(&mut r, 30).await.unwrap();
        assert_eq!(commits(&r), 1, "nothing unmarked: due after the interval");
        assert_eq!(r.marked("completed"), [0]);

        let b = r.pipeline.begin(Lsn(700));
        r.pipeline.offer(b, event(2, "x"), row(2)).await.unwrap();
        r.pipeline.commit(b, Lsn(800));
        run_for(&mut r, 100).await.unwrap();
        assert_eq!(
            commits(&r),
            1,
            "row 1's mark is not durable: the commit waits"
        );
        r.durable(0);
        run_for(&mut r, 1).await.unwrap();
        assert_eq!(commits(&r), 2, "the mark landed: due at once");

        let c = r.pipeline.begin(Lsn(900));
        r.pipeline.offer(c, event(3, "x"), row(3)).await.unwrap();
        r.pipeline.commit(c, Lsn(1000));
        let opened = tokio::time::Instant::now();
        while commits(&r) < 3 {
            r.pipeline.next().await.unwrap();
        }
        let waited = opened.elapsed();
        assert!(
            waited >= interval + MARK_PACE_LIMIT && waited < interval + MARK_PACE_LIMIT * 2,
            "row 2's mark never lands: committed after interval + limit, not later ({waited:?})"
        );
        assert_eq!(record(&r, 2).rows, RowSet::of(vec![2, 3]));

        let d = r.pipeline.begin(Lsn(1100));
        for i in 0..100 {
            r.pipeline
                .offer(d, event(4 + i, "x"), row(4 + i))
                .await
                .unwrap();
        }
        // The third commit's markers settle first (MARKER_SETTLE), then
        // the held events go out and commit at once.
        run_for(&mut r, MARKER_SETTLE.as_millis() as u64 + 1)
            .await
            .unwrap();
        assert_eq!(commits(&r), 4, "a full transaction does not wait for marks");
    }

    #[tokio::test]
    async fn failed_commits_mark_nothing_and_say_what_happens_next() {
        for (outcome, transient, words) in [
            (
                TxnFailure::Abort("x".into()),
                true,
                "resumes from the last committed",
            ),
            (TxnFailure::Fenced("y".into()), true, "standing by"),
            (TxnFailure::Fatal("z".into()), false, "z"),
        ] {
            let mut r = rig(None);
            r.commit_outcome(Err(outcome));
            let a = r.pipeline.begin(Lsn(500));
            r.pipeline.offer(a, event(1, "x"), row(1)).await.unwrap();
            r.pipeline.commit(a, Lsn(600));
            r.pipeline.commit_now();
            let e = run_for(&mut r, 50).await.unwrap_err();
            assert_eq!(matches!(e, Error::Transient(_)), transient, "{e}");
            assert!(e.to_string().contains(words), "{e}");
            assert!(r.marks().is_empty());
            assert_eq!(r.pipeline.flushed(), Lsn(100));
        }
    }

    #[tokio::test]
    async fn events_read_while_a_commit_runs_go_in_the_next_transaction_in_order() {
        let mut r = rig(None);
        let a = r.pipeline.begin(Lsn(500));
        r.pipeline.offer(a, event(1, "x"), row(1)).await.unwrap();
        r.pipeline.commit_now();
        assert!(r.pipeline.next().await.unwrap(), "the commit starts");
        assert!(r.pipeline.has_room(), "reading goes on during the commit");
        let b = r.pipeline.begin(Lsn(700));
        r.pipeline.offer(b, event(2, "x"), row(2)).await.unwrap();
        r.pipeline.offer(b, event(3, "y"), row(3)).await.unwrap();
        assert_eq!(r.sent().len(), 1, "Kafka takes nothing while committing");
        r.pipeline.commit(b, Lsn(800));
        run_for(&mut r, 50).await.unwrap();
        let tickets: Vec<u64> = r.sent().into_iter().map(|(t, _)| t).collect();
        assert_eq!(tickets, [0, 1, 2], "in stream order");
        let shape: Vec<bool> = r.transactions().iter().map(Option::is_some).collect();
        assert_eq!(
            shape,
            [false, true, false, true],
            "the held events opened the next transaction (forced, so committed too)"
        );
        let rec = record(&r, 1);
        assert_eq!(
            rec.position(),
            Some(Position {
                lsn: Lsn(700),
                index: 1
            })
        );
        assert_eq!(rec.rows, RowSet::of(vec![1, 2, 3]), "row 1 not marked yet");
    }

    #[tokio::test(start_paused = true)]
    async fn events_held_by_a_slow_commit_wait_one_interval_from_their_arrival() {
        let interval = Duration::from_millis(100);
        let mut r = rig(None);
        r.pipeline.eos.as_mut().unwrap().start.interval = interval;
        r.commit_takes(Duration::from_millis(80));
        let commits = |r: &Rig| r.transactions().iter().flatten().count();
        let a = r.pipeline.begin(Lsn(500));
        r.pipeline.offer(a, event(1, "x"), row(1)).await.unwrap();
        r.pipeline.commit(a, Lsn(600));
        while commits(&r) < 1 {
            r.pipeline.next().await.unwrap();
        }
        // The first commit started (after its interval) and runs 80 ms.
        tokio::time::advance(Duration::from_millis(10)).await;
        let arrived = tokio::time::Instant::now();
        let b = r.pipeline.begin(Lsn(700));
        r.pipeline.offer(b, event(2, "x"), row(2)).await.unwrap();
        r.pipeline.commit(b, Lsn(800));
        assert_eq!(r.sent().len(), 1, "held while the commit runs");
        let mut marked = false;
        while commits(&r) < 2 {
            r.pipeline.next().await.unwrap();
            if !marked && r.marks().len() == 1 {
                // Row 1's mark lands at once: no pacing in the way.
                r.durable(0);
                marked = true;
            }
        }
        let waited = arrived.elapsed();
        assert!(
            waited >= interval && waited < interval + Duration::from_millis(30),
            "the next commit starts one interval after the held event arrived, \
             not one interval after the slow commit ended ({waited:?})"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn events_read_right_after_a_commit_wait_for_its_markers_not_for_longer() {
        let interval = Duration::from_millis(25);
        let mut r = rig(None);
        r.pipeline.eos.as_mut().unwrap().start.interval = interval;
        let commits = |r: &Rig| r.transactions().iter().flatten().count();
        let settling = |r: &Rig| r.pipeline.eos.as_ref().unwrap().settle_until.is_some();
        let a = r.pipeline.begin(Lsn(500));
        r.pipeline.offer(a, event(1, "x"), row(1)).await.unwrap();
        r.pipeline.commit(a, Lsn(600));
        r.durable(0);
        while !settling(&r) {
            r.pipeline.next().await.unwrap();
        }
        assert_eq!(commits(&r), 1);
        let arrived = tokio::time::Instant::now();
        let b = r.pipeline.begin(Lsn(700));
        r.pipeline.offer(b, event(2, "x"), row(2)).await.unwrap();
        r.pipeline.commit(b, Lsn(800));
        let settle = MARKER_SETTLE.as_millis() as u64;
        run_for(&mut r, settle - 1).await.unwrap();
        assert_eq!(r.sent().len(), 1, "held while the markers settle");
        run_for(&mut r, 2).await.unwrap();
        assert_eq!(r.sent().len(), 2, "sent once they had time to");
        assert_eq!(commits(&r), 1, "in a transaction not due yet");
        while commits(&r) < 2 {
            r.pipeline.next().await.unwrap();
        }
        let waited = arrived.elapsed();
        assert!(
            waited >= interval && waited < interval + Duration::from_millis(2),
            "due one interval after the event was read: the settling cost it nothing ({waited:?})"
        );
    }

    #[tokio::test]
    async fn a_full_transaction_stops_reading_until_it_committed() {
        let mut r = rig(None);
        let a = r.pipeline.begin(Lsn(500));
        for i in 0..100 {
            assert!(r.pipeline.has_room());
            r.pipeline.offer(a, event(i, "x"), row(i)).await.unwrap();
        }
        assert!(!r.pipeline.has_room(), "transaction_max_events reached");
        run_for(&mut r, 50).await.unwrap();
        assert_eq!(r.transactions().iter().flatten().count(), 1);
        assert!(r.pipeline.has_room());
    }
}
