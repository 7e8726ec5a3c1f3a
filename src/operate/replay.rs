//! `pgoutbox replay`: re-publishes events the outbox already delivered
//! (`COMPLETED`) or gave up on (`DEAD_LETTER`) — by time range, aggregate,
//! event type or an SQL condition — to their topics or to one other topic,
//! without disturbing the live relay (see docs/replay.md).
//!
//! - rows are read by [`crate::outbox::replay`]: keyset pages, read-only,
//!   nothing locked or changed, so the slot and a poller see nothing;
//! - records are built by the relay's own [`RecordBuilder`], so a replayed
//!   record is the first delivery's, plus one header,
//!   `pgoutbox_replay = <audit id>` ([`header::REPLAY`]);
//! - they go out through an idempotent producer of their own ([`Sink`]),
//!   at most `--rate` a second (`pace`), and the replay waits for every
//!   acknowledgement. A Kafka failure stops it, saying how many were
//!   acknowledged: a rerun of the same selection is safe (at least once;
//!   consumers deduplicate on the event id);
//! - one audit row per replay (`<schema>.pgoutbox_replays`), written before
//!   the first send and completed at the end. A dry run records nothing.

mod dry_run;
mod pace;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

pub use dry_run::{DryRun, SampleEvent, TopicCount, SAMPLE_ROWS};
pub use pace::Pace;

use crate::config::{Config, ConfigError, Mode};
use crate::error::Error;
use crate::outbox::replay::{
    begin_audit, check_reason, finish_audit, AuditStart, ReplayAudit, ReplayEnd, ReplayError,
    ReplayRow, ReplaySelection, ReplaySource, Timestamp,
};
use crate::outbox::OutboxEvent;
use crate::pipeline::record::header;
use crate::pipeline::{Delivery, Failure, KafkaRecord, RecordBuilder, SendError};
use crate::sink::Sink;

/// Rows read (and built) per page.
const PAGE_ROWS: usize = 500;

/// Refused events named in a report; the rest are only counted.
const REFUSALS_KEPT: usize = 10;

/// How long a replay waits for Kafka to answer before sending anything.
const KAFKA_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopped replay (a Kafka failure, a signal) still waits for
/// the acknowledgements of what it already sent.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The most often progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What an operator asked for.
#[derive(Clone, Debug)]
pub struct ReplayRequest {
    /// The rows.
    pub selection: ReplaySelection,
    /// Why (required unless a dry run); recorded in the audit table.
    pub reason: Option<String>,
    /// Every event to this topic instead of its own.
    pub target_topic: Option<String>,
    /// At most this many events a second.
    pub rate: Option<f64>,
    /// Refuse a selection of more events than this.
    pub max_events: u64,
    /// Only count, sample and build; send and record nothing.
    pub dry_run: bool,
    /// `statement_timeout` of each read.
    pub statement_timeout: Duration,
}

/// Where a replay (or dry run) is, for a progress display.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Events acknowledged by Kafka (a dry run: rows read).
    pub done: u64,
    /// Events selected, when known.
    pub total: Option<u64>,
    /// Events that could not be published.
    pub refused: u64,
    /// Since the start.
    pub elapsed: Duration,
    /// A dry run's.
    pub dry_run: bool,
}

/// Calls a progress callback at most every [`PROGRESS_EVERY`], and once
/// at the end.
struct ProgressClock {
    start: Instant,
    last: Instant,
}

impl ProgressClock {
    fn start() -> ProgressClock {
        let now = Instant::now();
        ProgressClock {
            start: now,
            last: now,
        }
    }

    fn tick(&mut self, report: &mut dyn FnMut(&Progress), make: impl FnOnce(Duration) -> Progress) {
        let now = Instant::now();
        if now.duration_since(self.last) >= PROGRESS_EVERY {
            self.last = now;
            report(&make(now - self.start));
        }
    }

    fn finish(
        &mut self,
        report: &mut dyn FnMut(&Progress),
        make: impl FnOnce(Duration) -> Progress,
    ) {
        report(&make(self.start.elapsed()));
    }
}

/// An event that could not be published, and why.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Refusal {
    /// Its event id.
    pub tracking_id: String,
    /// Why.
    pub error: String,
}

impl Refusal {
    fn of(event: &OutboxEvent, error: String) -> Refusal {
        Refusal {
            tracking_id: String::from_utf8_lossy(&event.tracking_id).into_owned(),
            error,
        }
    }
}

/// What a replay did.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    /// Its audit entry (the `pgoutbox_replay` header's value is its id).
    pub audit: ReplayAudit,
    /// `schema.table`.
    pub table: String,
    /// The row status selected.
    pub status: String,
    /// The exclusive end of the time range (`--to`, or the start).
    pub until: Timestamp,
    /// `--topic`, when every event went to it.
    pub target_topic: Option<String>,
    /// `--rate`.
    pub rate_limit: Option<f64>,
    /// Events the selection held at the start.
    pub selected: u64,
    /// Events Kafka acknowledged.
    pub sent: u64,
    /// Events that could not be published (counted, not sent).
    pub refused: u64,
    /// The first few of them, with why.
    pub refusals: Vec<Refusal>,
    /// Selected rows whose status changed before they were read (not sent).
    pub vanished: u64,
    /// Seconds from the first send to the last acknowledgement.
    pub elapsed_s: f64,
    /// How it ended.
    pub end: ReplayEnd,
    /// What stopped it, if anything did.
    pub error: Option<String>,
    /// After a failure: `--from` for a rerun that skips what was surely
    /// acknowledged (RFC 3339; rows created at that instant are sent again).
    pub resume_from: Option<Timestamp>,
}

/// What `pgoutbox replay` ends with.
#[derive(Clone, Debug)]
pub enum ReplayResult {
    /// `--dry-run`.
    DryRun(DryRun),
    /// A replay that ran (completed or not: see its `end`).
    Replayed(ReplayReport),
}

/// A replay error as the command's: refusals as fatal one-liners,
/// database failures classified like any other (with a hint for a bad
/// `--where` or a statement timeout).
fn error(e: ReplayError) -> Error {
    match e {
        ReplayError::Database { context, source } => Error::selection(&context, &source),
        other => Error::Fatal(other.to_string()),
    }
}

/// Checks what can be checked before connecting: the reason (unless a dry
/// run), the selection, the rate, the topic and the Kafka settings.
pub fn check_request(config: &Config, request: &ReplayRequest) -> Result<(), Error> {
    if !request.dry_run {
        check_reason(request.reason.as_deref()).map_err(error)?;
    }
    request.selection.check().map_err(error)?;
    if let Some(rate) = request.rate {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(error(ReplayError::BadRate(rate.to_string())));
        }
    }
    if request.max_events == 0 {
        return Err(error(ReplayError::BadMaxEvents));
    }
    record_builder(config, request, None)?;
    if !request.dry_run && config.kafka.brokers.trim().is_empty() {
        return Err(ConfigError::new(
            "kafka.brokers",
            "is required to replay (a --dry-run needs none): set KAFKA_BROKERS or kafka.brokers (host:port[,host:port])",
        )
        .into());
    }
    Ok(())
}

/// The relay's record builder for the table (`shape` fits the layout to
/// its column types), sending everything to `--topic` when given.
fn record_builder(
    config: &Config,
    request: &ReplayRequest,
    shape: Option<&crate::outbox::TableShape>,
) -> Result<RecordBuilder, Error> {
    let map = config.event_columns()?;
    let mut builder = RecordBuilder::from_config(&config.kafka, &map)
        .map_err(|e| Error::from(ConfigError::new("kafka.topic", e.to_string())))?;
    if let Some(shape) = shape {
        let type_of = |c: &str| shape.type_of(c).map(str::to_string);
        builder.fit_table(&map, &type_of)?;
    }
    if let Some(topic) = &request.target_topic {
        builder
            .route_all_to(topic)
            .map_err(|e| Error::Fatal(format!("--topic {topic:?}: {e}")))?;
    }
    Ok(builder)
}

/// Runs `pgoutbox replay` (or its dry run) on `client`'s database. `stop`
/// turning true (a signal) stops a replay after the acknowledgements of
/// what it sent. Refusals before anything was sent are errors; a replay
/// that started ends with a report, whatever its end.
pub async fn replay(
    client: &mut Client,
    config: &Config,
    request: &ReplayRequest,
    stop: watch::Receiver<bool>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ReplayResult, Error> {
    check_request(config, request)?;
    let source = ReplaySource::open(
        client,
        &config.outbox.schema,
        &config.outbox.table,
        config.event_columns()?,
        &request.selection,
        request.statement_timeout,
    )
    .await
    .map_err(error)?;
    let builder = record_builder(config, request, Some(source.shape()))?;
    let nothing = || {
        error(ReplayError::NothingSelected {
            status: source.status(),
            table: source.table().to_owned(),
        })
    };
    if request.dry_run {
        let report = dry_run::dry_run(client, &source, &builder, request, progress).await?;
        if report.selected + report.refused == 0 {
            return Err(nothing());
        }
        return Ok(ReplayResult::DryRun(report));
    }
    let selected = source.count(client).await.map_err(error)?;
    if selected == 0 {
        return Err(nothing());
    }
    if selected as u64 > request.max_events {
        return Err(error(ReplayError::TooMany {
            selected,
            max: request.max_events,
        }));
    }
    let (sink, deliveries) = Sink::new(&config.kafka, Mode::Poll)
        .map_err(|e| Error::Fatal(format!("{e}; nothing was sent")))?;
    let sink = Arc::new(sink);
    probe_kafka(&sink, &config.kafka.brokers).await?;
    let reason = check_reason(request.reason.as_deref()).map_err(error)?;
    let audit = begin_audit(
        client,
        &AuditStart {
            schema: &config.outbox.schema,
            table: &config.outbox.table,
            reason: &reason,
            selection: &request.selection,
            until: source.until(),
            target_topic: request.target_topic.as_deref(),
            rate: request.rate,
            selected,
        },
    )
    .await
    .map_err(error)?;
    tracing::info!(
        audit_id = audit.id,
        selected,
        table = %source.table(),
        "replay started"
    );
    let mut run = Run::new(
        sink.clone(),
        deliveries,
        builder,
        &audit,
        // Replays are sent at least once, whatever the relay's delivery.
        config
            .kafka
            .max_in_flight_events
            .unwrap_or(crate::config::WINDOW_EVENTS),
        stop,
        selected as u64,
    );
    let (vanished, read_error) = run.send_all(client, &source, request.rate, progress).await;
    run.drain().await;
    drop(sink);
    let report = run.report(
        audit,
        &source,
        request,
        selected as u64,
        vanished,
        read_error,
    );
    run.clock.finish(progress, |elapsed| Progress {
        done: report.sent,
        total: Some(report.selected),
        refused: report.refused,
        elapsed,
        dry_run: false,
    });
    complete_audit(client, &config.outbox.schema, &report).await;
    Ok(ReplayResult::Replayed(report))
}

/// Completes the replay's audit entry; a failure is logged (the report
/// still says what was sent).
async fn complete_audit(client: &Client, schema: &str, report: &ReplayReport) {
    if let Err(e) = finish_audit(
        client,
        schema,
        report.audit.id,
        report.end,
        report.sent,
        report.refused,
        report.error.as_deref(),
    )
    .await
    {
        tracing::error!(error = %e, audit_id = report.audit.id, "the replay's audit entry could not be completed");
    }
}

/// Waits (off the async threads) for the cluster to answer a metadata
/// request; refuses to start when it does not.
async fn probe_kafka(sink: &Arc<Sink>, brokers: &str) -> Result<(), Error> {
    let probe = sink.clone();
    let reachable =
        tokio::task::spawn_blocking(move || probe.cluster_reachable(KAFKA_PROBE_TIMEOUT))
            .await
            .unwrap_or(false);
    if reachable {
        Ok(())
    } else {
        Err(Error::Fatal(format!(
            "Kafka at {brokers} did not answer within {}s: nothing was sent and nothing was recorded; check kafka.brokers (KAFKA_BROKERS) and kafka.properties",
            KAFKA_PROBE_TIMEOUT.as_secs()
        )))
    }
}

/// Returns once `stop` is true; never when its sender is gone without
/// having said so.
async fn signalled(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One replay's sending state.
struct Run {
    sink: Arc<Sink>,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    builder: RecordBuilder,
    /// The `pgoutbox_replay` header's value.
    marker: Bytes,
    /// Sent and not yet acknowledged: ticket → the row's `created_at` and
    /// event id.
    in_flight: BTreeMap<u64, (SystemTime, Bytes)>,
    window: usize,
    next_ticket: u64,
    sent: u64,
    refused: u64,
    refusals: Vec<Refusal>,
    /// The first Kafka failure, which stops the replay.
    failure: Option<String>,
    /// The `created_at` of the earliest event that failed.
    resume_at: Option<SystemTime>,
    stop: watch::Receiver<bool>,
    stopped: bool,
    total: u64,
    clock: ProgressClock,
}

impl Run {
    /// The state of replay `audit` before its first send: `total` events
    /// selected, at most `window` unacknowledged.
    fn new(
        sink: Arc<Sink>,
        deliveries: mpsc::UnboundedReceiver<Delivery>,
        builder: RecordBuilder,
        audit: &ReplayAudit,
        window: usize,
        stop: watch::Receiver<bool>,
        total: u64,
    ) -> Run {
        Run {
            sink,
            deliveries,
            builder,
            marker: Bytes::from(audit.id.to_string()),
            in_flight: BTreeMap::new(),
            window: window.max(1),
            next_ticket: 0,
            sent: 0,
            refused: 0,
            refusals: Vec::new(),
            failure: None,
            resume_at: None,
            stop,
            stopped: false,
            total,
            clock: ProgressClock::start(),
        }
    }

    /// Whether to send nothing more: Kafka failed or a signal came.
    fn halted(&mut self) -> bool {
        if !self.stopped && *self.stop.borrow() {
            self.stopped = true;
        }
        self.stopped || self.failure.is_some()
    }

    fn refuse(&mut self, event: &OutboxEvent, why: String) {
        self.refused += 1;
        if self.refusals.len() < REFUSALS_KEPT {
            self.refusals.push(Refusal::of(event, why));
        }
    }

    /// Records one acknowledgement or failure.
    fn settle(&mut self, d: Delivery) {
        let Some((created_at, tracking_id)) = self.in_flight.remove(&d.ticket) else {
            return;
        };
        match d.result {
            Ok(()) => self.sent += 1,
            Err(Failure::Permanent(why)) => {
                self.refused += 1;
                if self.refusals.len() < REFUSALS_KEPT {
                    self.refusals.push(Refusal {
                        tracking_id: String::from_utf8_lossy(&tracking_id).into_owned(),
                        error: why,
                    });
                }
            }
            Err(Failure::Transient(why)) => {
                self.failure.get_or_insert(why);
                self.resume_at = Some(self.resume_at.map_or(created_at, |t| t.min(created_at)));
            }
        }
    }

    /// Settles every report already there.
    fn settle_ready(&mut self) {
        while let Ok(d) = self.deliveries.try_recv() {
            self.settle(d);
        }
    }

    /// Waits for one report (or a signal, or `limit`); false when none came.
    async fn settle_one(&mut self, limit: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            d = self.deliveries.recv() => match d {
                Some(d) => { self.settle(d); true }
                None => false,
            },
            _ = signalled(&mut stop), if !self.stopped => { self.stopped = true; false }
            _ = tokio::time::sleep(limit) => false,
        }
    }

    /// Reads and sends the whole selection (until halted). Returns the
    /// rows that vanished before being read, and a read failure if one
    /// stopped it.
    async fn send_all(
        &mut self,
        client: &mut Client,
        source: &ReplaySource,
        rate: Option<f64>,
        progress: &mut dyn FnMut(&Progress),
    ) -> (u64, Option<String>) {
        let mut pace = rate.map(|r| Pace::new(r, Instant::now()));
        let mut pages = source.pages(PAGE_ROWS);
        loop {
            if self.halted() {
                return (pages.vanished, None);
            }
            let rows = match pages.next(source, client).await {
                Ok(Some(rows)) => rows,
                Ok(None) => return (pages.vanished, None),
                Err(e) => return (pages.vanished, Some(error(e).to_string())),
            };
            for row in rows {
                self.settle_ready();
                if self.halted() {
                    return (pages.vanished, None);
                }
                if let Some(pace) = &mut pace {
                    self.wait_for_token(pace).await;
                    if self.halted() {
                        return (pages.vanished, None);
                    }
                }
                self.send_one(&row).await;
                while self.in_flight.len() >= self.window && !self.halted() {
                    self.settle_one(Duration::from_secs(1)).await;
                }
                let (sent, total, refused) = (self.sent, self.total, self.refused);
                self.clock.tick(progress, |elapsed| Progress {
                    done: sent,
                    total: Some(total),
                    refused,
                    elapsed,
                    dry_run: false,
                });
            }
        }
    }

    /// Sleeps until the rate limit lets the next event go (or a signal).
    async fn wait_for_token(&mut self, pace: &mut Pace) {
        loop {
            let wait = pace.take(Instant::now());
            if wait.is_zero() {
                return;
            }
            let mut stop = self.stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = signalled(&mut stop), if !self.stopped => { self.stopped = true; return; }
            }
        }
    }

    /// Builds one row's record, marks it and hands it to the producer.
    async fn send_one(&mut self, row: &ReplayRow) {
        let mut record: KafkaRecord = match self.builder.build(&row.event) {
            Ok(r) => r,
            Err(e) => {
                self.refuse(&row.event, e.to_string());
                return;
            }
        };
        record
            .headers
            .push((Cow::Borrowed(header::REPLAY), Some(self.marker.clone())));
        loop {
            let ticket = self.next_ticket;
            match self.sink.send(ticket, &record) {
                Ok(()) => {
                    self.next_ticket += 1;
                    self.in_flight
                        .insert(ticket, (row.key.created_at, row.event.tracking_id.clone()));
                    return;
                }
                Err(SendError::QueueFull) => {
                    if !self.settle_one(Duration::from_secs(1)).await && self.halted() {
                        return;
                    }
                }
                Err(SendError::Failed(Failure::Permanent(why))) => {
                    self.refuse(&row.event, why);
                    return;
                }
                Err(SendError::Failed(Failure::Transient(why))) => {
                    self.failure.get_or_insert(why);
                    let at = row.key.created_at;
                    self.resume_at = Some(self.resume_at.map_or(at, |t| t.min(at)));
                    return;
                }
            }
        }
    }

    /// Waits for the acknowledgements of everything sent: for as long as
    /// Kafka takes, unless the replay was halted (then at most
    /// [`DRAIN_TIMEOUT`]). What is still unanswered is not counted as sent.
    async fn drain(&mut self) {
        let halted_at = self.halted().then(Instant::now);
        while !self.in_flight.is_empty() {
            let deadline = match halted_at.or_else(|| self.halted().then(Instant::now)) {
                Some(t) => t + DRAIN_TIMEOUT,
                None => Instant::now() + Duration::from_secs(3600),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.settle_one(left.min(Duration::from_secs(1))).await;
        }
        if let Some(earliest) = self.in_flight.values().map(|(at, _)| *at).min() {
            self.resume_at = Some(self.resume_at.map_or(earliest, |t| t.min(earliest)));
        }
    }

    /// The report of the replay as it ended.
    fn report(
        &self,
        audit: ReplayAudit,
        source: &ReplaySource,
        request: &ReplayRequest,
        selected: u64,
        vanished: u64,
        read_error: Option<String>,
    ) -> ReplayReport {
        let elapsed = self.clock.start.elapsed();
        let unanswered = self.in_flight.len();
        let (end, error) = match (&self.failure, read_error) {
            (Some(why), _) => (
                ReplayEnd::Failed,
                Some(format!(
                    "Kafka failed: {why}; {} of {selected} events were acknowledged before it stopped{}",
                    self.sent,
                    if unanswered > 0 { format!(" ({unanswered} unanswered)") } else { String::new() }
                )),
            ),
            (None, Some(why)) => (
                ReplayEnd::Failed,
                Some(format!(
                    "{why}; {} of {selected} events were acknowledged before it stopped",
                    self.sent
                )),
            ),
            (None, None) if self.stopped => (
                ReplayEnd::Interrupted,
                Some(format!(
                    "interrupted by a signal; {} of {selected} events were acknowledged",
                    self.sent
                )),
            ),
            (None, None) => (ReplayEnd::Completed, None),
        };
        ReplayReport {
            audit,
            table: source.table().to_owned(),
            status: source.status().to_owned(),
            until: source.until(),
            target_topic: request.target_topic.clone(),
            rate_limit: request.rate,
            selected,
            sent: self.sent,
            refused: self.refused,
            refusals: self.refusals.clone(),
            vanished,
            elapsed_s: elapsed.as_secs_f64(),
            end,
            error,
            resume_from: if end == ReplayEnd::Completed {
                None
            } else {
                self.resume_at.map(Timestamp::from_system_time)
            },
        }
    }
}
