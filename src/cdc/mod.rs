//! The CDC source: the replication slot → pgoutput decoder → pipeline.
//!
//! - [`slot`]: find the slot, create it (with a snapshot backfill), or stop
//!   loudly when it was lost (ARCHITECTURE.md, invariant 9);
//! - `session`: one replication session — connect, negotiate, stream, feed
//!   the pipeline, send feedback on a timer of its own;
//! - `changes`: which decoded messages are outbox events, in which
//!   transaction, and what is held back (streamed transactions);
//! - `backfill`: the rows still pending when a new slot is created;
//! - `exactly_once`: where an exactly-once session resumes (the progress
//!   topic's record, checked against this stream).
//!
//! One task owns the session. Its loop gives verdicts priority over new
//! input (`select!` with `biased`), sends standby status updates on a timer
//! of their own, and stops reading the replication stream while the
//! in-flight window is full — backpressure that never stops feedback
//! (ARCHITECTURE.md, invariant 3).

mod backfill;
mod changes;
mod exactly_once;
mod session;
pub mod slot;

use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Config, SlotLostPolicy};
use crate::database::Settings;
use crate::error::Error;
use crate::metrics::metrics;
use crate::pipeline::RecordBuilder;

pub use slot::SlotState;

/// The CDC relay between session restarts: what each session needs, and
/// whether the next one must recreate a lost slot.
pub struct Cdc {
    config: Config,
    pg: Settings,
    builder: RecordBuilder,
    status_interval: Duration,
    recreate: bool,
    /// What a lost slot leads to (`cdc.on_slot_lost`, resolved).
    on_lost: SlotLostPolicy,
    /// Why the slot about to be recreated was lost, for the record.
    lost: Option<String>,
}

impl Cdc {
    /// A CDC relay for `config`, building records with `builder` and sending
    /// standby status updates every `status_interval`. With `recreate_slot`
    /// the first session creates a new slot even though the relay recorded
    /// one that is now lost (an operator's decision).
    pub fn new(
        config: Config,
        pg: Settings,
        builder: RecordBuilder,
        status_interval: Duration,
        recreate_slot: bool,
    ) -> Cdc {
        Cdc {
            config,
            pg,
            builder,
            status_interval,
            recreate: recreate_slot,
            on_lost: SlotLostPolicy::Stop,
            lost: None,
        }
    }

    /// What a lost slot leads to: with [`SlotLostPolicy::Recreate`] the
    /// relay recreates it and backfills every row not yet COMPLETED,
    /// loudly (ARCHITECTURE.md, invariant 9); otherwise the session ends
    /// with [`Error::SlotLost`] for the runner.
    pub fn on_slot_lost(mut self, policy: SlotLostPolicy) -> Cdc {
        self.on_lost = policy;
        // The series starts at 0, so that the first recovery is an increase
        // Prometheus sees (PgoutboxSlotRecreated).
        metrics()
            .slot_recoveries
            .with_label_values(&[&self.config.cdc.slot]);
        self
    }

    /// One replication session, until `shutdown` turns true (`Ok`, after a
    /// bounded drain of what is in flight) or an error ends it.
    pub async fn serve(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Error> {
        let session = session::Session {
            config: &self.config,
            pg: &self.pg,
            builder: &self.builder,
            status_interval: self.status_interval,
        };
        match session
            .run(&mut self.recreate, &mut self.lost, shutdown)
            .await
        {
            Err(Error::SlotLost(why)) if self.on_lost == SlotLostPolicy::Recreate => {
                tracing::error!(
                    slot = %self.config.cdc.slot,
                    reason = %why,
                    "the replication slot was lost: recreating it and backfilling every row not yet COMPLETED (cdc.on_slot_lost = \"recreate\"); rows delivered but not yet marked are sent again"
                );
                metrics()
                    .slot_recoveries
                    .with_label_values(&[&self.config.cdc.slot])
                    .inc();
                self.recreate = true;
                self.lost = Some(why.clone());
                Err(Error::Transient(format!(
                    "recreating the lost replication slot: {why}"
                )))
            }
            other => other,
        }
    }
}
