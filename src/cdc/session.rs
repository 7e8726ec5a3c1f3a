//! One CDC session: connect, make sure the slot is there (creating it and
//! backfilling when needed), stream, and feed the pipeline until shutdown or
//! an error.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::changes::{Changes, MessageFilter};
use super::slot::{self, SlotState};
use crate::config::Config;
use crate::error::Error;
use crate::metrics::health::Phase;
use crate::metrics::{self, health, metrics};
use crate::outbox::{MarkWriter, StreamProgress};
use crate::pgoutput::Decoder;
use crate::pipeline::{Limits, Pipeline, RecordBuilder};
use crate::replication::{
    system_time, ReplicationClient, ReplicationError, ReplicationMessage, SnapshotAction,
    StandbyStatus,
};
use crate::Lsn;

/// Replication messages taken from the reader per wake-up, at most. The
/// in-flight window may overshoot its limit by this much.
const READ_BATCH: usize = 256;

/// What the session asks the server for, from its version and the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Negotiated {
    /// pgoutput protocol version.
    pub proto: u32,
    /// `START_REPLICATION` options.
    pub options: Vec<(&'static str, String)>,
}

/// Chooses the protocol and options for a server of `version_num`
/// (e.g. 150018): the highest protocol it speaks (2 on 14, 3 on 15, 4 on
/// 16+) unless configured, `messages` for the table-less outbox, `streaming`
/// only when enabled, and `origin` on 16+.
pub(super) fn negotiate(config: &Config, version_num: u32) -> Result<Negotiated, Error> {
    let major = version_num / 10_000;
    if major < 14 {
        return Err(Error::Fatal(format!(
            "PostgreSQL {major} is not supported: pgoutbox needs PostgreSQL 14 or newer"
        )));
    }
    let max = match major {
        14 => 2,
        15 => 3,
        _ => 4,
    };
    let proto = config.cdc.protocol_version.unwrap_or(max);
    if proto > max {
        return Err(Error::Fatal(format!(
            "cdc.protocol_version {proto} is not supported by PostgreSQL {major} (at most {max})"
        )));
    }
    let publications = format!("\"{}\"", config.cdc.publication.replace('"', "\"\""));
    let mut options = vec![
        ("proto_version", proto.to_string()),
        ("publication_names", publications),
    ];
    if config.cdc.messages {
        options.push(("messages", "true".into()));
    }
    if config.cdc.streaming {
        if proto < 2 {
            return Err(Error::Fatal(
                "cdc.streaming needs protocol version 2 or higher".into(),
            ));
        }
        options.push(("streaming", "on".into()));
    }
    if major >= 16 {
        options.push(("origin", config.cdc.origin.clone()));
    } else if config.cdc.origin != "any" {
        return Err(Error::Fatal(format!(
            "cdc.origin = {:?} needs PostgreSQL 16 or newer (this is {major})",
            config.cdc.origin
        )));
    }
    Ok(Negotiated { proto, options })
}

/// Everything a session needs from the relay.
pub(super) struct Session<'a> {
    pub config: &'a Config,
    pub pg: &'a crate::database::Settings,
    pub builder: &'a RecordBuilder,
    pub status_interval: Duration,
}

/// Maps a replication-client error to the relay's action.
pub(super) fn replication_error(doing: &str, e: ReplicationError) -> Error {
    if matches!(e, ReplicationError::Auth { .. }) {
        return Error::Fatal(format!(
            "{doing}: {e}; check the user and password in DATABASE_URL (the role needs LOGIN and REPLICATION)"
        ));
    }
    match e.sqlstate() {
        Some("42501") => Error::Fatal(format!(
            "{doing}: {e}; the role needs the REPLICATION attribute (ALTER ROLE … REPLICATION)"
        )),
        Some("42704") => Error::Transient(format!("{doing}: {e}")),
        _ if e.is_transient() => Error::Transient(format!("{doing}: {e}")),
        _ => Error::Fatal(format!("{doing}: {e}")),
    }
}

impl Session<'_> {
    pub(super) async fn run(
        &self,
        recreate: &mut bool,
        lost: &mut Option<String>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let cfg = self.config;
        health().set_phase(Phase::Connecting, "opening the replication session");
        let client = crate::database::connect(self.pg)
            .await
            .map_err(|e| Error::postgres("connecting to PostgreSQL", &e))?;
        let state = slot::inspect(&client, &cfg.outbox.schema, &cfg.cdc.slot, *recreate).await?;
        if let SlotState::Busy { pid } = state {
            return Err(Error::Transient(format!(
                "replication slot {:?} is in use by another process (pid {pid}); standing by until it is released",
                cfg.cdc.slot
            )));
        }
        let mut repl = ReplicationClient::connect(self.pg)
            .await
            .map_err(|e| replication_error("opening the replication connection", e))?;
        let kafka = super::exactly_once::kafka_side(cfg, &mut repl).await?;
        // How far this session has decoded its stream, for the mark writer
        // (it folds the delivery journal only once no backlog waits).
        let progress = StreamProgress::default();
        let pipeline = match state {
            SlotState::Ready { confirmed_flush } => {
                self.pipeline(kafka, confirmed_flush, &progress)
            }
            SlotState::Create { drop_first } => {
                wait_for_foreign_leases(&client, cfg, shutdown).await?;
                if drop_first {
                    tracing::warn!(slot = %cfg.cdc.slot, "a previous run died during the initial backfill; recreating the slot to redo it");
                    slot::drop_slot(&client, &cfg.cdc.slot).await?;
                }
                slot::record_created(&client, &cfg.outbox.schema, &cfg.cdc.slot).await?;
                let version = repl.server_version_num().unwrap_or(0);
                let failover = cfg
                    .cdc
                    .failover_slot
                    .unwrap_or(version >= crate::replication::PG17);
                let created = repl
                    .create_logical_slot_with(
                        &cfg.cdc.slot,
                        "pgoutput",
                        SnapshotAction::Export,
                        failover,
                    )
                    .await
                    .map_err(|e| replication_error("creating the replication slot", e))?;
                *recreate = false;
                let failover = failover && version >= crate::replication::PG17;
                match lost.take() {
                    Some(why) => {
                        slot::record_recovery(&client, &cfg.outbox.schema, &cfg.cdc.slot, &why)
                            .await;
                        tracing::error!(
                            slot = %cfg.cdc.slot,
                            consistent_point = %created.consistent_point,
                            failover,
                            lost = %why,
                            "recreated the lost replication slot; backfilling every row not yet COMPLETED before streaming from the new slot"
                        );
                    }
                    None => {
                        tracing::info!(slot = %cfg.cdc.slot, consistent_point = %created.consistent_point, failover, "created replication slot")
                    }
                }
                let mut pipeline = self.pipeline(kafka, created.consistent_point, &progress);
                let snapshot = created.snapshot_name.clone().ok_or_else(|| {
                    Error::Fatal("the server exported no snapshot for the new slot".into())
                })?;
                health().set_phase(Phase::Backfilling, "");
                let mut rows = super::backfill::SnapshotRows::open(
                    cfg,
                    &self.column_map()?,
                    self.pg,
                    &snapshot,
                )
                .await?;
                let n = super::backfill::run(
                    &mut rows,
                    created.consistent_point,
                    &mut pipeline,
                    shutdown,
                )
                .await?;
                rows.close().await?;
                slot::record_backfilled(
                    &client,
                    &cfg.outbox.schema,
                    &cfg.cdc.slot,
                    created.consistent_point,
                )
                .await?;
                tracing::info!(rows = n, "initial backfill of pending rows finished");
                pipeline
            }
            SlotState::Busy { .. } => unreachable!("handled above"),
        };
        drop(client);
        let version = repl.server_version_num().unwrap_or(0);
        let negotiated = negotiate(cfg, version)?;
        tracing::info!(server_version = version, proto_version = negotiated.proto, options = ?negotiated.options, "negotiated pgoutput");
        let options: Vec<(&str, &str)> = negotiated
            .options
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let stream = repl
            .start_logical_replication(&cfg.cdc.slot, Lsn::ZERO, &options, cfg.cdc.read_buffer)
            .await
            .map_err(|e| replication_error("starting replication", e))?;
        health().set_phase(Phase::Serving, "streaming");
        self.stream(stream, negotiated.proto, pipeline, progress, shutdown)
            .await
    }

    /// The pipeline of this session, starting from `confirmed`: the Kafka
    /// sink and the mark writer behind the pipeline's traits.
    /// The table's column roles (`[outbox.columns]`).
    fn column_map(&self) -> Result<crate::config::ColumnMap, Error> {
        self.config
            .event_columns()
            .map_err(|e| Error::Fatal(e.to_string()))
    }

    fn pipeline(
        &self,
        kafka: super::exactly_once::KafkaSide,
        confirmed: Lsn,
        progress: &StreamProgress,
    ) -> Pipeline {
        let cfg = self.config;
        // At least once, marks trickle in with Kafka's acks and are
        // gathered for a statement. Exactly once, a commit hands over all
        // of its rows at once: lingering would only hold the next commit,
        // which is paced by these marks (ARCHITECTURE.md, invariant 13).
        let linger = match cfg.kafka.delivery {
            crate::config::Delivery::ExactlyOnce => Duration::ZERO,
            crate::config::Delivery::AtLeastOnce => Duration::from_millis(cfg.cdc.mark_linger_ms),
        };
        let batching = crate::outbox::Batching {
            size: cfg.cdc.mark_batch_size,
            linger,
        };
        let (marker, durable) = MarkWriter::spawn(
            self.pg.clone(),
            &cfg.outbox.schema,
            &cfg.outbox.table,
            batching,
            cfg.cdc.mark_with,
            Some(progress.clone()),
        );
        let pipeline = Pipeline::new(
            (Box::new(kafka.sink), kafka.deliveries),
            (Box::new(marker), durable),
            self.builder.clone(),
            Limits {
                max_events: cfg.kafka.window_events(),
                max_bytes: cfg.kafka.max_in_flight_bytes,
                mark_completed: cfg.outbox.mark_completed,
            },
            confirmed,
        );
        match kafka.exactly_once {
            Some(start) => pipeline.exactly_once(start),
            None => pipeline,
        }
    }

    async fn stream(
        &self,
        mut stream: crate::replication::ReplicationStream,
        proto: u32,
        pipeline: Pipeline,
        progress: StreamProgress,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let filter = self.config.cdc.messages.then(|| MessageFilter {
            prefix: self.config.cdc.message_prefix.clone(),
            patterns: self.config.cdc.message_prefixes.clone(),
            non_transactional: self.config.cdc.non_transactional_messages,
        });
        let mut s = Streaming {
            feedback: stream.feedback(),
            decoder: Decoder::new(proto),
            changes: Changes::new(
                self.column_map()?,
                filter,
                (
                    self.config.outbox.schema.clone(),
                    self.config.outbox.table.clone(),
                ),
            ),
            received: pipeline.flushed(),
            progress,
            heard: false,
            pipeline,
        };
        // Everything before the stream's start is decoded: a relay resuming
        // at the WAL end of an idle database may receive nothing at all
        // (the walsender has nothing to send, not even a keepalive), and
        // must still count as caught up.
        s.progress.set(s.received);
        let mut batch = Vec::with_capacity(READ_BATCH);
        let mut ticker = tokio::time::interval(self.status_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut report = tokio::time::interval(Duration::from_secs(10));
        report.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_report = s.pipeline.counters;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                r = s.pipeline.next() => { r?; }
                _ = ticker.tick() => {
                    if s.pipeline.sink_failed() {
                        return Err(Error::Transient("the Kafka producer failed fatally; rebuilding it".into()));
                    }
                    s.tick_status().await?;
                }
                _ = report.tick() => last_report = s.report(last_report),
                n = stream.recv_many(&mut batch, READ_BATCH), if s.pipeline.has_room() => {
                    if n == 0 {
                        return Err(Error::Transient("the replication stream closed".into()));
                    }
                    metrics().batch(metrics::batch::REPLICATION_READ, n);
                    s.apply(&mut batch).await?;
                }
            }
        }
        self.drain(&mut s).await?;
        if let Err(e) = stream.finish(Some(s.status())).await {
            tracing::debug!(error = %e, "replication stream did not close cleanly");
        }
        tracing::info!(flushed = %s.pipeline.flushed(), "stopped");
        Ok(())
    }

    /// Graceful shutdown: stop reading, wait (at most
    /// `cdc.shutdown_timeout_s`) for verdicts, confirming as they come.
    async fn drain(&self, s: &mut Streaming) -> Result<(), Error> {
        s.pipeline.commit_now();
        tracing::info!(
            in_flight = s.pipeline.in_flight(),
            "shutting down: draining in-flight events"
        );
        let deadline = Instant::now() + Duration::from_secs(self.config.cdc.shutdown_timeout_s);
        loop {
            let step = (Instant::now() + self.status_interval).min(deadline);
            let settled = s.pipeline.settle(step).await?;
            let _ = s.send_status("sending a status update").await;
            if settled || Instant::now() >= deadline {
                if !settled {
                    tracing::warn!(
                        in_flight = s.pipeline.in_flight(),
                        "shutdown timeout: unacknowledged events will be re-sent by the next run"
                    );
                }
                break;
            }
        }
        s.pipeline.flush(Duration::from_secs(1));
        Ok(())
    }
}

/// The state of a streaming session: what was received, decoded and is in
/// flight, and the handle feedback goes out through.
struct Streaming {
    feedback: crate::replication::FeedbackHandle,
    decoder: Decoder,
    changes: Changes,
    pipeline: Pipeline,
    /// The highest WAL position received (data or keepalive).
    received: Lsn,
    /// `received` once applied, for the mark writer.
    progress: StreamProgress,
    /// Whether anything arrived since the last periodic status update.
    heard: bool,
}

impl Streaming {
    /// The standby status to send now. Every status sent is also what the
    /// flushed LSN gauge shows; it asks for no reply ([`Self::tick_status`]
    /// does).
    fn status(&self) -> StandbyStatus {
        let flushed = self.pipeline.flushed();
        metrics().flushed_lsn(flushed);
        StandbyStatus {
            write: self.received.max(flushed),
            flush: flushed,
            apply: flushed,
            reply_requested: false,
        }
    }

    /// The periodic status update. When nothing arrived since the last
    /// one, it asks the server for a reply: a keepalive carrying how far
    /// the walsender has read. A walsender sends nothing while it skips WAL
    /// the publication does not cover (another table's writes, the relay's
    /// own marks), and a keepalive only when it waits for WAL; asked, it
    /// tells where it is, and the relay's decoded position (what the mark
    /// writer folds by) follows it rather than staying where the stream
    /// started.
    async fn tick_status(&mut self) -> Result<(), Error> {
        let mut status = self.status();
        status.reply_requested = !std::mem::take(&mut self.heard);
        self.feedback
            .send_status(status)
            .await
            .map_err(|e| replication_error("sending a status update", e))
    }

    async fn send_status(&self, doing: &str) -> Result<(), Error> {
        self.feedback
            .send_status(self.status())
            .await
            .map_err(|e| replication_error(doing, e))
    }

    /// Applies everything already buffered, in one go: one wake-up per
    /// socket read rather than per message.
    async fn apply(
        &mut self,
        batch: &mut Vec<Result<ReplicationMessage, ReplicationError>>,
    ) -> Result<(), Error> {
        let mut server_end = Lsn::ZERO;
        self.heard |= !batch.is_empty();
        for msg in batch.drain(..) {
            let msg = msg.map_err(|e| replication_error("reading the replication stream", e))?;
            match msg {
                ReplicationMessage::XLogData {
                    wal_end,
                    server_time,
                    data,
                    ..
                } => {
                    self.pipeline.sent_at(system_time(server_time));
                    self.received = self.received.max(wal_end);
                    server_end = server_end.max(wal_end);
                    let message = self.decoder.decode(data).map_err(|e| {
                        Error::Fatal(format!("undecodable pgoutput message near {wal_end}: {e}"))
                    })?;
                    self.changes.apply(message, &mut self.pipeline).await?;
                }
                ReplicationMessage::PrimaryKeepAlive {
                    wal_end,
                    reply_requested,
                    ..
                } => {
                    self.received = self.received.max(wal_end);
                    server_end = server_end.max(wal_end);
                    self.pipeline.keepalive(wal_end);
                    if reply_requested {
                        self.send_status("answering a keepalive").await?;
                    }
                }
            }
        }
        metrics().received_lsn(self.received);
        metrics().server_lsn(server_end);
        self.progress.set(self.received);
        Ok(())
    }

    /// Logs progress when anything moved since `last`; returns the counters
    /// to compare with next time.
    fn report(&self, last: crate::pipeline::Counters) -> crate::pipeline::Counters {
        let c = self.pipeline.counters;
        if c.sent != last.sent || c.dead_lettered != last.dead_lettered || c.skipped != last.skipped
        {
            tracing::info!(
                sent = c.sent,
                acked = c.acked,
                dead_lettered = c.dead_lettered,
                skipped = c.skipped,
                transactions = c.transactions,
                in_flight = self.pipeline.in_flight(),
                held = self.changes.held(),
                flushed = %self.pipeline.flushed(),
                "relay progress"
            );
        }
        c
    }
}

/// Before a new slot (whose first backfill sends every row still
/// `PROCESSING`): waits while another poller (the polling framework's
/// worker, say) holds rows under live leases, warning every 30 s. It
/// would send those rows too; once it has stopped and its leases ended (or
/// it completed them), the backfill delivers what it left, once
/// (`crate::outbox::lease`).
async fn wait_for_foreign_leases(
    client: &tokio_postgres::Client,
    cfg: &Config,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        let held =
            crate::outbox::lease::foreign_leases(client, &cfg.outbox.schema, &cfg.outbox.table)
                .await
                .map_err(|e| Error::postgres("looking for leases held by another poller", &e))?;
        let Some(held) = held else {
            if warned.is_some() {
                tracing::info!("no row is held by another poller any more; creating the slot");
            }
            return Ok(());
        };
        if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(30)) {
            warned = Some(tokio::time::Instant::now());
            tracing::warn!(
                rows = held.rows,
                until = %held.until,
                table = %format!("{}.{}", cfg.outbox.schema, cfg.outbox.table),
                "rows are held under live leases by another poller (not pgoutbox: the polling framework's worker still running?); the replication slot is not created while they are, or its first backfill would send them too. Stop that worker (docs/migrating-from-polling.md); its rows are delivered once its leases end"
            );
        }
        health().set_phase(
            Phase::Connecting,
            format!(
                "waiting for {} rows under another poller's leases",
                held.rows
            ),
        );
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => {
                return Err(Error::Transient("shutdown requested while waiting for another poller's leases".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut c = Config::default();
        c.cdc.publication = "outbox_pub".into();
        c
    }

    fn option<'a>(n: &'a Negotiated, key: &str) -> Option<&'a str> {
        n.options
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn protocol_follows_the_server_version() {
        for (version, proto) in [(140011, 2), (150018, 3), (160004, 4), (180001, 4)] {
            let n = negotiate(&config(), version).unwrap();
            assert_eq!(n.proto, proto, "{version}");
            assert_eq!(
                option(&n, "proto_version"),
                Some(proto.to_string().as_str())
            );
            assert_eq!(option(&n, "messages"), Some("true"));
            assert_eq!(option(&n, "publication_names"), Some("\"outbox_pub\""));
            assert_eq!(option(&n, "streaming"), None, "streaming is off by default");
        }
        assert!(negotiate(&config(), 130000).is_err(), "13 is refused");
    }

    #[test]
    fn origin_is_sent_from_16_and_refused_before() {
        let mut c = config();
        assert_eq!(
            option(&negotiate(&c, 160000).unwrap(), "origin"),
            Some("any")
        );
        assert_eq!(option(&negotiate(&c, 150000).unwrap(), "origin"), None);
        c.cdc.origin = "none".into();
        assert_eq!(
            option(&negotiate(&c, 170000).unwrap(), "origin"),
            Some("none")
        );
        assert!(negotiate(&c, 150000).is_err());
    }

    #[test]
    fn streaming_and_forced_versions_are_checked() {
        let mut c = config();
        c.cdc.streaming = true;
        assert_eq!(
            option(&negotiate(&c, 150000).unwrap(), "streaming"),
            Some("on")
        );
        c.cdc.protocol_version = Some(1);
        assert!(negotiate(&c, 150000).is_err());
        c.cdc.streaming = false;
        c.cdc.protocol_version = Some(4);
        assert!(negotiate(&c, 150000).is_err(), "15 speaks at most 3");
        c.cdc.messages = false;
        c.cdc.protocol_version = Some(1);
        assert_eq!(option(&negotiate(&c, 150000).unwrap(), "messages"), None);
    }
}
