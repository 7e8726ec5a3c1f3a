//! How the harness knows a run is over: the topic's end offsets (a drain
//! without transactions), committed transactions holding every event (a
//! drain of a transactional system), a read_committed consumer having seen
//! every event (a live run).

use std::time::{Duration, Instant};

use crate::outbox::BoxError;
use crate::systems::Running;
use crate::topics::Live;
use crate::Bench;

impl Bench {
    /// Polls the topic's end offsets every 50 ms until they hold `want`
    /// records; returns (seconds since the system's start when the first and
    /// the last arrived).
    pub(crate) async fn wait_for_records(
        &self,
        running: &mut Running,
        topic: &str,
        want: i64,
        deadline: Duration,
    ) -> Result<(Option<f64>, f64), BoxError> {
        let mut first = None;
        let mut last_check = Instant::now();
        loop {
            let n = self.kafka.end_offsets(topic)?;
            let t = running.started.elapsed().as_secs_f64();
            if n > 0 && first.is_none() {
                first = Some(t);
            }
            if n >= want {
                return Ok((first, t));
            }
            if last_check.elapsed() >= Duration::from_millis(500) {
                running.check_alive(&self.setup)?;
                last_check = Instant::now();
            }
            if running.started.elapsed() > deadline {
                return Err(format!(
                    "{topic} holds {n} of {want} records after {} s",
                    deadline.as_secs()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// For a transactional topic: polls the last stable offsets every 50 ms
    /// until committed transactions hold `want` records; returns (seconds
    /// since the system's start when the first and the last of them became
    /// visible to a read_committed consumer, records committed). Markers
    /// take offsets, so the finish is not where the offsets sum to `want`:
    /// once they do and no transaction is open (last stable offsets = high
    /// watermarks), the topic is read to count its records and find each
    /// partition's last; the finish is the first poll whose stable offsets
    /// were past all of them (reading after the fact times nothing).
    pub(crate) async fn wait_committed(
        &self,
        running: &mut Running,
        topic: &str,
        want: u64,
        deadline: Duration,
    ) -> Result<(Option<f64>, f64, u64), BoxError> {
        let mut first = None;
        let mut history: Vec<(f64, Vec<i64>)> = Vec::new();
        let mut counted_at = None;
        let mut last_check = Instant::now();
        loop {
            let stable = self.kafka.partition_ends(topic, true)?;
            let t = running.started.elapsed().as_secs_f64();
            let sum: i64 = stable.iter().sum();
            if sum > 0 && first.is_none() {
                first = Some(t);
            }
            if history.last().is_none_or(|(_, s)| *s != stable) {
                history.push((t, stable.clone()));
            }
            if sum >= want as i64
                && counted_at != Some(sum)
                && self.kafka.partition_ends(topic, false)? == stable
            {
                counted_at = Some(sum);
                let (records, last) = tokio::task::block_in_place(|| self.kafka.committed(topic))?;
                if records >= want {
                    let done = history
                        .iter()
                        .find(|(_, s)| s.iter().zip(&last).all(|(end, l)| end > l));
                    if let Some((t, _)) = done {
                        return Ok((first, *t, records));
                    }
                    // Committed after the last poll: the next one sees it.
                    counted_at = None;
                }
            }
            if last_check.elapsed() >= Duration::from_millis(500) {
                running.check_alive(&self.setup)?;
                last_check = Instant::now();
            }
            if running.started.elapsed() > deadline {
                return Err(format!(
                    "{topic}: committed transactions hold fewer than {want} records after {} s (end offsets {stable:?})",
                    deadline.as_secs()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the live consumer has seen `want` distinct events;
    /// returns the seconds since the system's start.
    pub(crate) async fn wait_live(
        &self,
        running: &mut Running,
        live: &Live,
        want: u64,
        deadline: Duration,
    ) -> Result<f64, BoxError> {
        let mut last_check = Instant::now();
        loop {
            let n = live.seen();
            if n >= want {
                return Ok(running.started.elapsed().as_secs_f64());
            }
            if last_check.elapsed() >= Duration::from_millis(500) {
                running.check_alive(&self.setup)?;
                live.check()?;
                last_check = Instant::now();
            }
            if running.started.elapsed() > deadline {
                return Err(format!(
                    "a read_committed consumer saw {n} of {want} events after {} s",
                    deadline.as_secs()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
