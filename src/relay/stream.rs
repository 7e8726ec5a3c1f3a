//! One CDC session: connect, make sure the slot is there (creating it and
//! backfilling when needed), stream, and feed the pipeline until shutdown or
//! an error.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::pipeline::Pipeline;
use super::progress::{Progress, TxId};
use super::slot::{self, SlotState};
use crate::config::Config;
use crate::error::Error;
use crate::outbox::{OutboxColumns, StatusWriter};
use crate::pgoutput::{Decoder, LogicalMessage};
use crate::replication::{
    ReplicationClient, ReplicationError, ReplicationMessage, SnapshotAction, StandbyStatus,
};
use crate::route::TopicTemplate;
use crate::sink::Sink;
use crate::Lsn;

/// The pgoutput protocol version requested.
const PROTO_VERSION: &str = "1";

/// Everything a session needs from the relay.
pub(super) struct Session<'a> {
    pub config: &'a Config,
    pub pg: &'a tokio_postgres::Config,
    pub router: TopicTemplate,
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
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let cfg = self.config;
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
        let mut progress;
        let mut pipeline = self.pipeline()?;
        match state {
            SlotState::Ready { confirmed_flush } => {
                progress = Progress::new(confirmed_flush);
            }
            SlotState::Create { drop_first } => {
                if drop_first {
                    tracing::warn!(slot = %cfg.cdc.slot, "a previous run died during the initial backfill; recreating the slot to redo it");
                    slot::drop_slot(&client, &cfg.cdc.slot).await?;
                }
                slot::record_created(&client, &cfg.outbox.schema, &cfg.cdc.slot).await?;
                let created = repl
                    .create_logical_slot(&cfg.cdc.slot, "pgoutput", SnapshotAction::Export)
                    .await
                    .map_err(|e| replication_error("creating the replication slot", e))?;
                *recreate = false;
                tracing::info!(slot = %cfg.cdc.slot, consistent_point = %created.consistent_point, "created replication slot");
                progress = Progress::new(created.consistent_point);
                let snapshot = created.snapshot_name.clone().ok_or_else(|| {
                    Error::Fatal("the server exported no snapshot for the new slot".into())
                })?;
                let n = super::backfill::run(
                    cfg,
                    self.pg,
                    &snapshot,
                    created.consistent_point,
                    &mut pipeline,
                    &mut progress,
                    shutdown,
                )
                .await?;
                slot::record_backfilled(
                    &client,
                    &cfg.outbox.schema,
                    &cfg.cdc.slot,
                    created.consistent_point,
                )
                .await?;
                tracing::info!(rows = n, "initial backfill of pending rows finished");
            }
            SlotState::Busy { .. } => unreachable!("handled above"),
        }
        drop(client);
        let publications = format!("\"{}\"", cfg.cdc.publication.replace('"', "\"\""));
        let options = [
            ("proto_version", PROTO_VERSION),
            ("publication_names", publications.as_str()),
        ];
        let stream = repl
            .start_logical_replication(&cfg.cdc.slot, Lsn::ZERO, &options, cfg.cdc.read_buffer)
            .await
            .map_err(|e| replication_error("starting replication", e))?;
        self.stream(stream, pipeline, progress, shutdown).await
    }

    fn pipeline(&self) -> Result<Pipeline, Error> {
        let cfg = self.config;
        let sink = Sink::new(&cfg.kafka).map_err(|e| Error::Fatal(e.to_string()))?;
        let pg = self.pg.clone();
        let (schema, table) = (cfg.outbox.schema.clone(), cfg.outbox.table.clone());
        let batch = cfg.cdc.mark_batch_size;
        Ok(Pipeline::new(
            sink,
            self.router.clone(),
            cfg.kafka.max_in_flight_events,
            cfg.kafka.max_in_flight_bytes,
            move |done| StatusWriter::spawn(pg, &schema, &table, batch, done),
            cfg.outbox.mark_completed,
        ))
    }

    async fn stream(
        &self,
        mut stream: crate::replication::ReplicationStream,
        mut pipeline: Pipeline,
        mut progress: Progress,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let feedback = stream.feedback();
        let mut decoder = Decoder::new(1);
        let mut relations: HashMap<u32, Option<OutboxColumns>> = HashMap::new();
        let mut open_tx: Option<TxId> = None;
        let mut received = progress.flushed();
        let mut ticker = tokio::time::interval(self.status_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut report = tokio::time::interval(Duration::from_secs(10));
        report.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_report = pipeline.counters;
        let status = |received: Lsn, progress: &Progress, reply: bool| StandbyStatus {
            write: received.max(progress.flushed()),
            flush: progress.flushed(),
            apply: progress.flushed(),
            reply_requested: reply,
        };
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                r = pipeline.next(&mut progress) => { r?; }
                _ = ticker.tick() => {
                    if pipeline.sink_failed() {
                        return Err(Error::Transient("the Kafka producer failed fatally; rebuilding it".into()));
                    }
                    feedback
                        .send_status(status(received, &progress, false))
                        .await
                        .map_err(|e| replication_error("sending a status update", e))?;
                }
                _ = report.tick() => {
                    let c = pipeline.counters;
                    if c.sent != last_report.sent || c.dead_lettered != last_report.dead_lettered {
                        tracing::info!(
                            sent = c.sent, acked = c.acked, dead_lettered = c.dead_lettered,
                            in_flight = pipeline.in_flight(), flushed = %progress.flushed(),
                            "relay progress"
                        );
                    }
                    last_report = c;
                }
                msg = stream.recv(), if pipeline.has_room() => {
                    let msg = match msg {
                        None => return Err(Error::Transient("the replication stream closed".into())),
                        Some(Err(e)) => return Err(replication_error("reading the replication stream", e)),
                        Some(Ok(m)) => m,
                    };
                    match msg {
                        ReplicationMessage::XLogData { wal_end, data, .. } => {
                            received = received.max(wal_end);
                            let message = decoder.decode(data).map_err(|e| {
                                Error::Fatal(format!("undecodable pgoutput message near {wal_end}: {e}"))
                            })?;
                            self.apply(message, &mut relations, &mut open_tx, &mut pipeline, &mut progress).await?;
                        }
                        ReplicationMessage::PrimaryKeepAlive { wal_end, reply_requested, .. } => {
                            received = received.max(wal_end);
                            progress.keepalive(wal_end);
                            if reply_requested {
                                feedback
                                    .send_status(status(received, &progress, false))
                                    .await
                                    .map_err(|e| replication_error("answering a keepalive", e))?;
                            }
                        }
                    }
                }
            }
        }
        // Graceful shutdown: stop reading, wait (bounded) for acks, confirm.
        tracing::info!(
            in_flight = pipeline.in_flight(),
            "shutting down: draining in-flight events"
        );
        let deadline = Instant::now() + Duration::from_secs(self.config.cdc.shutdown_timeout_s);
        loop {
            let step = (Instant::now() + self.status_interval).min(deadline);
            let settled = pipeline.settle(&mut progress, step).await?;
            let _ = feedback
                .send_status(status(received, &progress, false))
                .await;
            if settled || Instant::now() >= deadline {
                if !settled {
                    tracing::warn!(
                        in_flight = pipeline.in_flight(),
                        "shutdown timeout: unacknowledged events will be re-sent by the next run"
                    );
                }
                break;
            }
        }
        pipeline.flush(Duration::from_secs(1));
        if let Err(e) = stream
            .finish(Some(status(received, &progress, false)))
            .await
        {
            tracing::debug!(error = %e, "replication stream did not close cleanly");
        }
        tracing::info!(flushed = %progress.flushed(), "stopped");
        Ok(())
    }

    async fn apply(
        &self,
        message: LogicalMessage,
        relations: &mut HashMap<u32, Option<OutboxColumns>>,
        open_tx: &mut Option<TxId>,
        pipeline: &mut Pipeline,
        progress: &mut Progress,
    ) -> Result<(), Error> {
        match message {
            LogicalMessage::Begin(_) => {
                *open_tx = Some(progress.begin());
            }
            LogicalMessage::Commit(c) => {
                let tx = open_tx.take().ok_or_else(|| {
                    Error::Fatal(format!("Commit at {} without Begin", c.end_lsn))
                })?;
                progress.commit(tx, c.end_lsn);
            }
            LogicalMessage::Relation(r) => {
                let cols = match OutboxColumns::from_relation(&r) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring inserts into a published table that is not an outbox");
                        None
                    }
                };
                relations.insert(r.id, cols);
            }
            LogicalMessage::Insert(ins) => {
                let tx =
                    open_tx.ok_or_else(|| Error::Fatal("Insert outside a transaction".into()))?;
                let cols = relations.get(&ins.relation_id).ok_or_else(|| {
                    Error::Fatal(format!(
                        "Insert for relation {} before its Relation message",
                        ins.relation_id
                    ))
                })?;
                let Some(cols) = cols else { return Ok(()) };
                if !cols.is_pending(&ins.new) {
                    return Ok(());
                }
                match cols.event(&ins.new) {
                    Ok(event) => pipeline.offer(progress, tx, event).await?,
                    Err(e) => match cols.row_key(&ins.new) {
                        Some(key) => pipeline.dead_letter_row(progress, tx, key, e.to_string()),
                        None => {
                            return Err(Error::Fatal(format!(
                                "an outbox row without id or created_at cannot be published or dead-lettered: {e}"
                            )))
                        }
                    },
                }
            }
            LogicalMessage::Update(_)
            | LogicalMessage::Delete(_)
            | LogicalMessage::Truncate(_)
            | LogicalMessage::Origin(_)
            | LogicalMessage::Type(_)
            | LogicalMessage::Message(_) => {}
            LogicalMessage::StreamStart(_)
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamCommit(_)
            | LogicalMessage::StreamAbort(_)
            | LogicalMessage::BeginPrepare(_)
            | LogicalMessage::Prepare(_)
            | LogicalMessage::CommitPrepared(_)
            | LogicalMessage::RollbackPrepared(_)
            | LogicalMessage::StreamPrepare(_) => {
                return Err(Error::Fatal(
                    "the server sent streaming or two-phase messages that were not requested"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}
