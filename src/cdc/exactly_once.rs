//! Where an exactly-once session starts (docs/exactly-once.md;
//! ARCHITECTURE.md, invariant 13): the stream's identity from
//! `IDENTIFY_SYSTEM`, a transactional producer that fences any earlier
//! relay of the same stream, the progress topic prepared and read to its
//! end, and the record found there checked against this stream.
//!
//! A record of another cluster, database or slot, or one that lies beyond
//! the server's WAL on the same timeline (a database restored from a
//! backup) stops the relay with what to do (`--reset-progress`). A record
//! from an earlier timeline (a failover) is trusted only up to where that
//! timeline ended: transactions the new primary commits past that point
//! are new, whatever their LSN.

use tokio::sync::mpsc;

use crate::config::{Config, Mode};
use crate::error::Error;
use crate::pipeline::{
    Delivery, ExactlyOnceStart, Position, ProgressRecord, StreamIdentity, TxnFailure,
};
use crate::replication::ReplicationClient;
use crate::sink::transaction::{prepare_progress_topic, read_progress, ProgressTopicError};
use crate::sink::Sink;
use crate::Lsn;

use super::session::replication_error;

/// The sink of a session, with where exactly-once delivery resumes when it
/// is on.
pub(super) struct KafkaSide {
    pub sink: Sink,
    pub deliveries: mpsc::UnboundedReceiver<Delivery>,
    pub exactly_once: Option<ExactlyOnceStart>,
}

/// Builds the session's producer: idempotent, or transactional and ready
/// to resume (`repl` is used before any slot is created or streamed).
pub(super) async fn kafka_side(
    config: &Config,
    repl: &mut ReplicationClient,
) -> Result<KafkaSide, Error> {
    let cfg = &config.kafka;
    if cfg.delivery != crate::config::Delivery::ExactlyOnce {
        let (mut sink, deliveries) =
            Sink::new(cfg, Mode::Cdc).map_err(|e| Error::Fatal(e.to_string()))?;
        sink.probe_cluster();
        return Ok(KafkaSide {
            sink,
            deliveries,
            exactly_once: None,
        });
    }
    let system = repl
        .identify_system()
        .await
        .map_err(|e| replication_error("identifying the database system", e))?;
    let stream = StreamIdentity {
        system_identifier: system.system_id.clone(),
        database: system.dbname.clone().unwrap_or_default(),
        slot: config.cdc.slot.clone(),
        timeline: system.timeline,
    };
    let key = cfg
        .transactional_id
        .clone()
        .unwrap_or_else(|| stream.transactional_id());
    // Preparing the progress topic and fencing earlier producers do not
    // depend on each other: both run at once (each is a broker round trip
    // or several on a client of its own). The topic is read only after the
    // fencing, which aborts a predecessor's open transaction.
    let started = std::time::Instant::now();
    let (sink, deliveries) = {
        // A task of its own: reading the cluster's metadata blocks its
        // thread for a moment, which must not hold up the fencing.
        let topic_cfg = cfg.clone();
        let preparing = tokio::spawn(async move { prepare_progress_topic(&topic_cfg).await });
        let prepare = async {
            match preparing.await {
                Ok(r) => r.map_err(|e| match e {
                    ProgressTopicError::Unreachable(why) => Error::Transient(why),
                    ProgressTopicError::Refused(why) => Error::Fatal(why),
                }),
                Err(e) => Err(Error::Transient(format!(
                    "preparing the progress topic: {e}"
                ))),
            }
        };
        let fence = async {
            let (mut sink, deliveries) =
                Sink::transactional(cfg, &key).map_err(|e| Error::Fatal(e.to_string()))?;
            sink.probe_cluster();
            sink.init_transactions().await.map_err(|e| match e {
                TxnFailure::Fatal(why) => Error::Fatal(why),
                TxnFailure::Abort(why) | TxnFailure::Fenced(why) => Error::Transient(why),
            })?;
            Ok::<_, Error>((sink, deliveries))
        };
        // Both run to their end, except that a fatal error of either ends
        // the start at once (each names what to fix: brokers without
        // transactions, a timeout the brokers refuse); of two transient
        // failures the topic's is reported.
        tokio::pin!(prepare, fence);
        let (mut prepared, mut fenced) = (None, None);
        while prepared.is_none() || fenced.is_none() {
            tokio::select! {
                r = &mut prepare, if prepared.is_none() => {
                    if let Err(e @ Error::Fatal(_)) = r {
                        return Err(e);
                    }
                    prepared = Some(r);
                }
                r = &mut fence, if fenced.is_none() => {
                    if let Err(e @ Error::Fatal(_)) = r {
                        return Err(e);
                    }
                    fenced = Some(r);
                }
            }
        }
        prepared.expect("both finished")?;
        fenced.expect("both finished")?
    };
    let fenced_in = started.elapsed();
    let reader = cfg.clone();
    let reader_key = key.clone();
    let value = tokio::task::spawn_blocking(move || read_progress(&reader, &reader_key))
        .await
        .map_err(|e| Error::Transient(format!("reading the progress topic: {e}")))?
        .map_err(Error::Transient)?;
    tracing::debug!(
        fence_and_topic_ms = fenced_in.as_millis() as u64,
        read_ms = (started.elapsed() - fenced_in).as_millis() as u64,
        "exactly-once producer ready"
    );
    let topic = &cfg.progress_topic;
    let resume = match value {
        None => {
            tracing::info!(%topic, %key, "exactly-once delivery: no progress recorded yet for this stream; starting from the slot");
            None
        }
        Some(bytes) => {
            let record = ProgressRecord::parse(&bytes).map_err(|why| {
                Error::Fatal(format!(
                    "the progress topic {topic:?} holds under key {key:?} a record pgoutbox cannot use: {why}. If that key is not this relay's, set kafka.transactional_id or kafka.progress_topic"
                ))
            })?;
            resume_from(config, repl, record, &stream, system.xlogpos).await?
        }
    };
    Ok(KafkaSide {
        sink,
        deliveries,
        exactly_once: Some(ExactlyOnceStart {
            stream,
            key,
            topic: topic.clone(),
            resume,
            max_events: cfg.transaction_max_events,
            interval: std::time::Duration::from_millis(cfg.transaction_interval_ms),
        }),
    })
}

/// The error for a record that does not fit this stream, unless
/// `--reset-progress` says to start over (then `None`, with a warning).
fn refuse_or_reset(config: &Config, why: String) -> Result<(), Error> {
    if config.kafka.reset_progress {
        tracing::warn!(reason = %why, "--reset-progress: ignoring the progress record of another stream; every event the slot still holds is sent, and the first commit records this stream");
        return Ok(());
    }
    Err(Error::Fatal(format!(
        "the progress topic {:?} does not fit this stream: {why}. If the slot, the database or the server was replaced on purpose, start once with `pgoutbox run --reset-progress` (events the slot still holds are then sent again); otherwise point the relay at the right database, or give it its own kafka.transactional_id",
        config.kafka.progress_topic
    )))
}

/// Where to resume from `record`: `None` when it was reset, else the
/// record with the position to skip up to.
async fn resume_from(
    config: &Config,
    repl: &mut ReplicationClient,
    record: ProgressRecord,
    stream: &StreamIdentity,
    wal_end: Lsn,
) -> Result<Option<(ProgressRecord, Option<Position>)>, Error> {
    if let Some(why) = record.mismatch(stream) {
        refuse_or_reset(config, why)?;
        return Ok(None);
    }
    let Some(at) = record.position() else {
        // Only backfilled rows so far: nothing to skip on the stream.
        return Ok(Some((record, None)));
    };
    if record.timeline == stream.timeline {
        if at.lsn > wal_end {
            refuse_or_reset(
                config,
                format!(
                    "it records position {at} but this server's WAL ends at {wal_end} on the same timeline: the database was restored from a backup, or it is another server with the same identity"
                ),
            )?;
            return Ok(None);
        }
        tracing::info!(position = %at, rows = record.rows_listed(), "exactly-once delivery: resuming after the last committed position");
        return Ok(Some((record, Some(at))));
    }
    if record.timeline > stream.timeline {
        refuse_or_reset(
            config,
            format!(
                "it was written on timeline {} but this server is on timeline {}: the relay is connected to a server a failover left behind",
                record.timeline, stream.timeline
            ),
        )?;
        return Ok(None);
    }
    let Some(end) = timeline_end(repl, stream.timeline, record.timeline).await? else {
        refuse_or_reset(
            config,
            format!(
                "it was written on timeline {}, which is not in the history of this server's timeline {}: the relay is connected to a server of another lineage",
                record.timeline, stream.timeline
            ),
        )?;
        return Ok(None);
    };
    if at.lsn >= end {
        tracing::warn!(
            position = %at,
            timeline = record.timeline,
            timeline_end = %end,
            "exactly-once delivery: Kafka holds events up to a position past where the old primary's timeline ended; the failover lost those transactions (they reached Kafka, not the new primary). Events the new primary commits after that point are sent"
        );
        let clamp = Position {
            lsn: Lsn(end.0.saturating_sub(1)),
            index: u64::MAX,
        };
        // The ids the record lists belong to transactions the new primary
        // lost; its sequences may hand them out again. A backfill must not
        // skip rows by them: better sent twice than never.
        let mut record = record;
        record.rows = Default::default();
        record.tables.clear();
        return Ok(Some((record, Some(clamp))));
    }
    tracing::info!(position = %at, "exactly-once delivery: resuming after the last committed position (written before a failover)");
    Ok(Some((record, Some(at))))
}

/// Where timeline `old` ended in the history of timeline `current`
/// (`TIMELINE_HISTORY`); `None` when it is not in that history.
async fn timeline_end(
    repl: &mut ReplicationClient,
    current: u32,
    old: u32,
) -> Result<Option<Lsn>, Error> {
    let rows = repl
        .simple_query(&format!("TIMELINE_HISTORY {current}"))
        .await
        .map_err(|e| replication_error("reading the timeline history", e))?;
    let content = rows
        .first()
        .and_then(|r| r.get(1).cloned().flatten())
        .unwrap_or_default();
    Ok(switch_point(&content, old))
}

/// The switch point of timeline `tli` in a timeline history file's text
/// (lines `tli<TAB>switchpoint<TAB>reason`).
fn switch_point(history: &str, tli: u32) -> Option<Lsn> {
    history.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let id: u32 = fields.next()?.parse().ok()?;
        let lsn: Lsn = fields.next()?.parse().ok()?;
        (id == tli).then_some(lsn)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_points_are_read_from_the_history_file() {
        let history = "1\t0/3000158\tno recovery target specified\n\n2\t0/5000000\tno recovery target specified\n";
        assert_eq!(switch_point(history, 1), Some(Lsn(0x3000158)));
        assert_eq!(switch_point(history, 2), Some(Lsn(0x5000000)));
        assert_eq!(switch_point(history, 3), None);
        assert_eq!(switch_point("# comment\n", 1), None);
    }
}
