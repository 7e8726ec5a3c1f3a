//! One poll worker: claim a batch under a lease, publish it, settle it.
//!
//! A batch's rows are sent through the shared idempotent producer; while
//! their acknowledgements are outstanding the worker renews the lease every
//! lease/3. Then each row is settled with the claim's lock token:
//! acknowledged → `COMPLETED`; a retriable failure → `PENDING` again after an
//! exponential backoff with jitter (or `DEAD_LETTER` once it used its
//! attempts); a permanent one (too large, no valid topic) → `DEAD_LETTER`.
//! If the lease was lost meanwhile (the reaper gave the rows to another
//! worker), the settling statements touch 0 rows: that is logged and
//! counted, and the other worker's outcome stands.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_postgres::{Client, Row, Statement};

use super::statements::Statements;
use super::Stats;
use crate::config::{ColumnMap, Config, Mode};
use crate::error::Error;
use crate::metrics::{self, health, metrics};
use crate::outbox::OutboxEvent;
use crate::pipeline::{Delivery, Failure, RecordBuilder, RecordError, SendError};
use crate::sink::Sink;

/// Bits of a ticket that number a worker's sends; the worker's index is
/// above them.
pub(super) const TICKET_BITS: u32 = 40;

/// The delay before attempt `attempt + 1` after `attempt` failed: `base`
/// doubled per attempt, capped at `max`, then "equal jitter" (a uniformly
/// random point in its upper half), so retries of many rows spread out.
pub fn retry_delay(attempt: i32, base: Duration, max: Duration, unit_random: f64) -> Duration {
    let exp = attempt.clamp(1, 32) as u32 - 1;
    let full = base.saturating_mul(1u32 << exp.min(31)).min(max);
    let half = full / 2;
    half + half.mul_f64(unit_random.clamp(0.0, 1.0))
}

/// What the worker needs, shared by all workers of a relay.
pub(super) struct Shared {
    pub config: Config,
    pub pg: crate::database::Settings,
    pub statements: Statements,
    /// The payload column is bytea (its text is decoded).
    pub bytea_payload: bool,
    pub builder: RecordBuilder,
    pub stats: Arc<Stats>,
}

struct Prepared {
    claim: Statement,
    complete: Statement,
    renew: Statement,
    retry: Statement,
    dead_letter: Statement,
    release: Statement,
    defer: Statement,
}

async fn prepare(shared: &Shared) -> Result<(Client, Prepared), tokio_postgres::Error> {
    let client = crate::database::connect(&shared.pg).await?;
    let s = &shared.statements;
    let prepared = Prepared {
        claim: client.prepare(&s.claim).await?,
        complete: client.prepare(&s.complete).await?,
        renew: client.prepare(&s.renew).await?,
        retry: client.prepare(&s.retry).await?,
        dead_letter: client.prepare(&s.dead_letter).await?,
        release: client.prepare(&s.release).await?,
        defer: client.prepare(&s.defer).await?,
    };
    Ok((client, prepared))
}

/// One claimed row.
struct Claimed {
    id: String,
    created_at: String,
    attempt: i32,
    event: OutboxEvent,
}

impl Claimed {
    /// The claimed row: the event and its key first (read with
    /// [`crate::outbox::select_list`] for `map`), then the claim's own.
    fn from_row(row: &Row, map: &ColumnMap, table: &Bytes, bytea_payload: bool) -> Claimed {
        let (event, key) = OutboxEvent::from_text_row(map, table, bytea_payload, |i| row.get(i));
        Claimed {
            attempt: row.get("retry_count"),
            id: String::from_utf8_lossy(&key.id).into_owned(),
            created_at: String::from_utf8_lossy(&key.created_at).into_owned(),
            event,
        }
    }
}

/// The verdicts on one batch.
#[derive(Default)]
struct Verdicts {
    delivered: Vec<usize>,
    retry: Vec<(usize, String)>,
    dead: Vec<(usize, String)>,
    unsent: Vec<usize>,
    /// Each claimed row's topic (`""` when none could be rendered), for
    /// the metrics.
    topics: Vec<String>,
}

impl Verdicts {
    /// Counts the rows with these ids as dead-lettered, under their topics.
    fn count_dead(&self, claimed: &[Claimed], dead_ids: &[String]) {
        if dead_ids.is_empty() {
            return;
        }
        let index: HashMap<&str, usize> = claimed
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.as_str(), i))
            .collect();
        for id in dead_ids {
            if let Some(&i) = index.get(id.as_str()) {
                metrics().dead_lettered(Mode::Poll, &self.topics[i], 1);
            }
        }
    }
}

/// One claimed batch being settled: its rows, the claim's token, and the
/// connection the statements run on.
struct Settling<'a> {
    claimed: &'a [Claimed],
    token: i64,
    client: &'a Client,
    prepared: &'a Prepared,
}

impl Settling<'_> {
    /// The keys of the rows at `idx`, as the statements take them.
    fn keys(&self, idx: &[usize]) -> (Vec<&str>, Vec<&str>) {
        (
            idx.iter().map(|&i| self.claimed[i].id.as_str()).collect(),
            idx.iter()
                .map(|&i| self.claimed[i].created_at.as_str())
                .collect(),
        )
    }
}

/// A worker and its loop.
pub(super) struct Worker {
    pub index: u32,
    pub shared: Arc<Shared>,
    pub sink: Arc<Sink>,
    pub deliveries: mpsc::UnboundedReceiver<Delivery>,
    pub wake: watch::Receiver<u64>,
    pub shutdown: watch::Receiver<bool>,
}

impl Worker {
    /// Claims and publishes until shutdown. Returns an error only for what
    /// the relay must act on: a definite database error, or a producer that
    /// must be rebuilt.
    pub async fn run(mut self) -> Result<(), Error> {
        let cfg = &self.shared.config;
        let batch = i64::from(cfg.outbox.batch_size);
        let lease = f64::from(cfg.outbox.lease_seconds);
        let idle = Duration::from_millis(cfg.outbox.poll_interval_ms);
        let table = Bytes::copy_from_slice(cfg.outbox.table.as_bytes());
        let mut conn: Option<(Client, Prepared)> = None;
        // Held while this worker's claims succeed (readiness).
        let mut connected: Option<metrics::health::WorkerConnected> = None;
        let mut backoff = Duration::from_millis(100);
        let mut seq = 0u64;
        let read = metrics().events_read.with_label_values(&["poll"]);
        loop {
            if *self.shutdown.borrow() {
                return Ok(());
            }
            if self.sink.is_fatal() {
                return Err(Error::Transient(
                    "the Kafka producer hit a fatal error and must be rebuilt".into(),
                ));
            }
            let (client, prepared) = match &conn {
                Some(c) => c,
                None => match prepare(&self.shared).await {
                    Ok(c) => {
                        backoff = Duration::from_millis(100);
                        conn.insert(c)
                    }
                    Err(e) => {
                        connected = None;
                        let err = Error::postgres("poll worker connecting", &e);
                        if let Error::Fatal(_) = err {
                            return Err(err);
                        }
                        tracing::warn!(worker = self.index, error = %err, "poll worker cannot reach PostgreSQL; retrying");
                        self.pause(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                },
            };
            let seen = *self.wake.borrow_and_update();
            let token = crate::outbox::lease::lock_token(rand::random());
            let rows = match client
                .query(&prepared.claim, &[&batch, &lease, &token])
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    let err = Error::postgres("claiming rows", &e);
                    if let Error::Fatal(_) = err {
                        return Err(err);
                    }
                    tracing::warn!(worker = self.index, error = %err, "claim failed; reconnecting");
                    conn = None;
                    connected = None;
                    self.pause(backoff).await;
                    continue;
                }
            };
            if connected.is_none() {
                connected = Some(health().worker_connected());
            }
            if rows.is_empty() {
                self.wait_for_work(seen, idle).await;
                continue;
            }
            let full = rows.len() as i64 == batch;
            let stats = &self.shared.stats;
            stats.claims.fetch_add(1, Relaxed);
            stats.claimed.fetch_add(rows.len() as u64, Relaxed);
            let m = metrics();
            m.poll_claims.inc();
            read.inc_by(rows.len() as u64);
            m.batch(metrics::batch::CLAIM, rows.len());
            let claimed: Vec<Claimed> = rows
                .iter()
                .map(|r| {
                    Claimed::from_row(
                        r,
                        &self.shared.statements.map,
                        &table,
                        self.shared.bytea_payload,
                    )
                })
                .collect();
            let verdicts = self
                .publish(&claimed, token, client, prepared, &mut seq)
                .await;
            if let Err(e) = self
                .settle(&claimed, token, verdicts, client, prepared)
                .await
            {
                // The rows stay leased; when the lease expires the reaper
                // hands them to a worker again.
                tracing::warn!(worker = self.index, error = %e, "could not settle a batch; its rows return when their lease expires");
                conn = None;
                connected = None;
                continue;
            }
            if !full {
                self.wait_for_work(seen, idle).await;
            }
        }
    }

    /// Sleeps `d` unless shutdown comes first.
    async fn pause(&mut self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.shutdown.changed() => {}
        }
    }

    /// Waits for a wake-up newer than `seen`, the poll interval, or shutdown.
    async fn wait_for_work(&mut self, seen: u64, idle: Duration) {
        if *self.wake.borrow() != seen {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(idle) => {}
            _ = self.wake.changed() => {}
            _ = self.shutdown.changed() => {}
        }
    }

    /// Sends every row of the batch and collects the verdicts, renewing the
    /// lease while acknowledgements are outstanding.
    async fn publish(
        &mut self,
        claimed: &[Claimed],
        token: i64,
        client: &Client,
        prepared: &Prepared,
        seq: &mut u64,
    ) -> Verdicts {
        let shared = self.shared.clone();
        let lease = Duration::from_secs(u64::from(shared.config.outbox.lease_seconds));
        let mut verdicts = Verdicts {
            topics: vec![String::new(); claimed.len()],
            ..Verdicts::default()
        };
        let mut outstanding: HashMap<u64, usize> = HashMap::with_capacity(claimed.len());
        let renew = |keys: Vec<usize>| {
            let ids: Vec<&str> = keys.iter().map(|&i| claimed[i].id.as_str()).collect();
            let created: Vec<&str> = keys
                .iter()
                .map(|&i| claimed[i].created_at.as_str())
                .collect();
            let secs = lease.as_secs_f64();
            async move {
                client
                    .query_one(&prepared.renew, &[&token, &ids, &created, &secs])
                    .await
                    .map(|r| (r.get::<_, i64>(0), keys.len()))
            }
        };
        let mut heartbeat = Heartbeat::new(lease);
        for (i, row) in claimed.iter().enumerate() {
            let record = match shared.builder.build(&row.event) {
                Ok(r) => r,
                Err(e) => {
                    if let Ok(topic) = shared.builder.topic(&row.event) {
                        verdicts.topics[i] = topic;
                    }
                    let why = match e {
                        RecordError::Topic(e) => format!("no valid topic: {e}"),
                        other @ (RecordError::TooLarge { .. } | RecordError::Payload(_)) => {
                            other.to_string()
                        }
                    };
                    verdicts.dead.push((i, why));
                    continue;
                }
            };
            verdicts.topics[i].clone_from(&record.topic);
            loop {
                *seq += 1;
                let ticket =
                    (u64::from(self.index) << TICKET_BITS) | (*seq & ((1 << TICKET_BITS) - 1));
                match self.sink.send(ticket, &record) {
                    Ok(()) => {
                        outstanding.insert(ticket, i);
                        break;
                    }
                    Err(SendError::QueueFull) => {
                        // Wait for one acknowledgement, then try again.
                        let keys: Vec<usize> = outstanding.values().copied().collect();
                        self.await_one(&mut outstanding, &mut verdicts, &mut heartbeat, || {
                            renew(keys.clone())
                        })
                        .await;
                    }
                    Err(SendError::Failed(Failure::Permanent(m))) => {
                        verdicts.dead.push((i, m));
                        break;
                    }
                    Err(SendError::Failed(Failure::Transient(m))) => {
                        verdicts.retry.push((i, m));
                        break;
                    }
                }
            }
        }
        let shutdown_grace = Duration::from_secs(shared.config.cdc.shutdown_timeout_s);
        let mut give_up: Option<Instant> = None;
        while !outstanding.is_empty() {
            if give_up.is_none() && *self.shutdown.borrow() {
                give_up = Some(Instant::now() + shutdown_grace);
            }
            if give_up.is_some_and(|t| Instant::now() >= t) {
                verdicts.unsent.extend(outstanding.drain().map(|(_, i)| i));
                break;
            }
            let keys: Vec<usize> = outstanding.values().copied().collect();
            self.await_one(&mut outstanding, &mut verdicts, &mut heartbeat, || {
                renew(keys.clone())
            })
            .await;
        }
        verdicts
    }

    /// Waits for one delivery report (recording its verdict), renewing the
    /// lease when the heartbeat is due, for at most one second.
    async fn await_one<F, Fut>(
        &mut self,
        outstanding: &mut HashMap<u64, usize>,
        verdicts: &mut Verdicts,
        heartbeat: &mut Heartbeat,
        renew: F,
    ) where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(i64, usize), tokio_postgres::Error>>,
    {
        tokio::select! {
            d = self.deliveries.recv() => {
                let Some(d) = d else { return };
                let Some(i) = outstanding.remove(&d.ticket) else { return };
                match d.result {
                    Ok(()) => verdicts.delivered.push(i),
                    Err(Failure::Permanent(m)) => verdicts.dead.push((i, m)),
                    Err(Failure::Transient(m)) => verdicts.retry.push((i, m)),
                }
            }
            _ = heartbeat.due() => {
                heartbeat.reset();
                match renew().await {
                    Ok((held, asked)) if (held as usize) < asked => {
                        self.shared.stats.leases_lost.fetch_add((asked - held as usize) as u64, Relaxed);
                        metrics().poll_leases_lost.inc_by((asked - held as usize) as u64);
                        tracing::warn!(
                            worker = self.index, held, asked,
                            "lease lost on some rows (the reaper returned them); their completion will be skipped"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(worker = self.index, error = %crate::error::postgres_text(&e), "lease renewal failed; retrying at the next heartbeat"),
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = self.shutdown.changed(), if !*self.shutdown.borrow() => {}
        }
    }

    /// Whether Kafka answers at all (asked only after failed sends).
    async fn kafka_reachable(&self) -> bool {
        let sink = self.sink.clone();
        tokio::task::spawn_blocking(move || sink.cluster_reachable(Duration::from_secs(5)))
            .await
            .unwrap_or(false)
    }

    /// Writes the verdicts with the claim's token.
    async fn settle(
        &self,
        claimed: &[Claimed],
        token: i64,
        verdicts: Verdicts,
        client: &Client,
        prepared: &Prepared,
    ) -> Result<(), tokio_postgres::Error> {
        let batch = Settling {
            claimed,
            token,
            client,
            prepared,
        };
        if !verdicts.delivered.is_empty() {
            self.complete(&batch, &verdicts).await?;
        }
        if !verdicts.retry.is_empty() && !self.kafka_reachable().await {
            self.defer(&batch, &verdicts).await?;
        } else if !verdicts.retry.is_empty() {
            self.retry(&batch, &verdicts).await?;
        }
        if !verdicts.dead.is_empty() {
            self.dead_letter(&batch, &verdicts).await?;
        }
        if !verdicts.unsent.is_empty() {
            self.release(&batch, &verdicts).await?;
        }
        Ok(())
    }

    /// Acknowledged rows: `COMPLETED`.
    async fn complete(
        &self,
        b: &Settling<'_>,
        verdicts: &Verdicts,
    ) -> Result<(), tokio_postgres::Error> {
        let (stats, token, client, prepared) = (&self.shared.stats, b.token, b.client, b.prepared);
        let (ids, created) = b.keys(&verdicts.delivered);
        let done: i64 = client
            .query_one(&prepared.complete, &[&token, &ids, &created])
            .await?
            .get(0);
        stats
            .published
            .fetch_add(verdicts.delivered.len() as u64, Relaxed);
        let stale = verdicts.delivered.len() as i64 - done;
        if stale > 0 {
            stats.stale_completions.fetch_add(stale as u64, Relaxed);
            metrics().poll_stale_completions.inc_by(stale as u64);
            tracing::warn!(
                    worker = self.index,
                    stale,
                    "completion of rows whose lease expired touched nothing; another worker owns them now"
                );
        }
        Ok(())
    }

    /// Kafka is down or refusing us: the rows are not at fault, so their
    /// attempt is not counted (an outage must not dead-letter them). They
    /// wait one backoff step, and so does the worker.
    async fn defer(
        &self,
        b: &Settling<'_>,
        verdicts: &Verdicts,
    ) -> Result<(), tokio_postgres::Error> {
        let (token, client, prepared) = (b.token, b.client, b.prepared);
        let cfg = &self.shared.config.poll;
        let idx: Vec<usize> = verdicts.retry.iter().map(|(i, _)| *i).collect();
        let (ids, created) = b.keys(&idx);
        let delay = retry_delay(
            1,
            Duration::from_millis(cfg.backoff_base_ms),
            Duration::from_millis(cfg.backoff_max_ms),
            rand::random::<f64>(),
        );
        let error = format!("Kafka unreachable: {}", verdicts.retry[0].1);
        let deferred: i64 = client
            .query_one(
                &prepared.defer,
                &[&token, &ids, &created, &(delay.as_millis() as i64), &error],
            )
            .await?
            .get(0);
        tracing::warn!(
            worker = self.index,
            deferred,
            error = %verdicts.retry[0].1,
            "Kafka is unreachable; rows returned without counting an attempt"
        );
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Rows whose send failed: `PENDING` again after a backoff, or
    /// `DEAD_LETTER` when they used their attempts.
    async fn retry(
        &self,
        b: &Settling<'_>,
        verdicts: &Verdicts,
    ) -> Result<(), tokio_postgres::Error> {
        let (stats, claimed, token, client, prepared) =
            (&self.shared.stats, b.claimed, b.token, b.client, b.prepared);
        let cfg = &self.shared.config.poll;
        let idx: Vec<usize> = verdicts.retry.iter().map(|(i, _)| *i).collect();
        let (ids, created) = b.keys(&idx);
        let delays: Vec<i64> = idx
            .iter()
            .map(|&i| {
                retry_delay(
                    claimed[i].attempt,
                    Duration::from_millis(cfg.backoff_base_ms),
                    Duration::from_millis(cfg.backoff_max_ms),
                    rand::random::<f64>(),
                )
                .as_millis() as i64
            })
            .collect();
        let errors: Vec<&str> = verdicts.retry.iter().map(|(_, e)| e.as_str()).collect();
        let row = client
            .query_one(&prepared.retry, &[&token, &ids, &created, &delays, &errors])
            .await?;
        let (retried, dead_ids): (i64, Vec<String>) = (row.get(0), row.get(1));
        let dead = dead_ids.len();
        verdicts.count_dead(claimed, &dead_ids);
        stats.retried.fetch_add(retried as u64, Relaxed);
        stats.dead_lettered.fetch_add(dead as u64, Relaxed);
        tracing::warn!(
            worker = self.index,
            retried,
            dead_lettered = dead,
            error = %verdicts.retry[0].1,
            "sends failed; rows will be retried after a backoff"
        );
        Ok(())
    }

    /// Rows that can never be published: `DEAD_LETTER`.
    async fn dead_letter(
        &self,
        b: &Settling<'_>,
        verdicts: &Verdicts,
    ) -> Result<(), tokio_postgres::Error> {
        let (stats, claimed, token, client, prepared) =
            (&self.shared.stats, b.claimed, b.token, b.client, b.prepared);
        let idx: Vec<usize> = verdicts.dead.iter().map(|(i, _)| *i).collect();
        let (ids, created) = b.keys(&idx);
        let errors: Vec<&str> = verdicts.dead.iter().map(|(_, e)| e.as_str()).collect();
        let dead_ids: Vec<String> = client
            .query_one(&prepared.dead_letter, &[&token, &ids, &created, &errors])
            .await?
            .get(0);
        let dead = dead_ids.len();
        verdicts.count_dead(claimed, &dead_ids);
        stats.dead_lettered.fetch_add(dead as u64, Relaxed);
        tracing::warn!(
            worker = self.index,
            dead_lettered = dead,
            error = %verdicts.dead[0].1,
            "rows that can never be published were dead-lettered"
        );
        Ok(())
    }

    /// Rows still without a verdict at shutdown: handed back.
    async fn release(
        &self,
        b: &Settling<'_>,
        verdicts: &Verdicts,
    ) -> Result<(), tokio_postgres::Error> {
        let (token, client, prepared) = (b.token, b.client, b.prepared);
        let (ids, created) = b.keys(&verdicts.unsent);
        let released: i64 = client
            .query_one(&prepared.release, &[&token, &ids, &created])
            .await?
            .get(0);
        tracing::info!(
            worker = self.index,
            released,
            "shutting down: rows without an acknowledgement were handed back"
        );
        Ok(())
    }
}

/// The lease-renewal clock of one batch: due every lease/3.
pub(super) struct Heartbeat {
    period: Duration,
    next: Instant,
}

impl Heartbeat {
    /// A heartbeat for a lease of `lease`, first due lease/3 from now.
    pub fn new(lease: Duration) -> Heartbeat {
        let period = (lease / 3).max(Duration::from_millis(100));
        Heartbeat {
            period,
            next: Instant::now() + period,
        }
    }

    /// Resolves when the next renewal is due.
    pub async fn due(&self) {
        tokio::time::sleep_until(self.next).await
    }

    /// Schedules the next renewal one period from now.
    pub fn reset(&mut self) {
        self.next = Instant::now() + self.period;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_is_capped_and_jittered_in_its_upper_half() {
        let base = Duration::from_millis(1000);
        let max = Duration::from_secs(60);
        assert_eq!(retry_delay(1, base, max, 1.0), Duration::from_millis(1000));
        assert_eq!(retry_delay(1, base, max, 0.0), Duration::from_millis(500));
        assert_eq!(retry_delay(3, base, max, 1.0), Duration::from_millis(4000));
        assert_eq!(retry_delay(3, base, max, 0.0), Duration::from_millis(2000));
        assert_eq!(retry_delay(30, base, max, 1.0), max);
        assert_eq!(retry_delay(i32::MAX, base, max, 0.5), max / 2 + max / 4);
        // Attempt counts below 1 (never claimed) behave like the first.
        assert_eq!(retry_delay(0, base, max, 1.0), base);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_is_due_every_third_of_the_lease() {
        let start = Instant::now();
        let mut hb = Heartbeat::new(Duration::from_secs(30));
        hb.due().await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        hb.reset();
        hb.due().await;
        assert_eq!(start.elapsed(), Duration::from_secs(20));
    }
}
