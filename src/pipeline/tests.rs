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
    let a = p.begin();
    p.offer(a, event(1, "x"), row(1)).await.unwrap();
    p.offer(a, event(2, "y"), row(2)).await.unwrap();
    p.commit(a, Lsn(200));
    let b = p.begin();
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
    let a = p.begin();
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
    let a = p.begin();
    p.offer(a, event(1, "x"), row(1)).await.unwrap();
    p.commit(a, Lsn(200));
    let b = p.begin();
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
    let a = p.begin();
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
    let a = p.begin();
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
    let a = p.begin();
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
    let b = r.pipeline.begin();
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
    let a = p.begin();
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
    let empty = p.begin();
    p.commit(empty, Lsn(150));
    assert_eq!(p.flushed(), Lsn(150));
    let a = p.begin();
    p.offer(a, event(1, "x"), row(1)).await.unwrap();
    p.commit(a, Lsn(200));
    let later = p.begin();
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
    let a = p.begin();
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
    let a = p.begin();
    for i in 0..10 {
        p.offer(a, event(i, "x"), row(i)).await.unwrap();
    }
    p.commit(a, Lsn(200));
    let far = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    assert!(p.settle(far).await.unwrap());
    assert_eq!(p.flushed(), Lsn(200));
    assert_eq!(r.marked("completed").len(), 10);
}
