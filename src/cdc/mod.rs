//! The CDC source: the replication slot → pgoutput decoder → pipeline.
//!
//! - [`slot`]: find the slot, create it (with a snapshot backfill), or stop
//!   loudly when it was lost (ARCHITECTURE.md, invariant 9);
//! - `session`: one replication session — connect, negotiate, stream, feed
//!   the pipeline, send feedback on a timer of its own;
//! - `changes`: which decoded messages are outbox events, in which
//!   transaction, and what is held back (streamed transactions);
//! - `backfill`: the rows still pending when a new slot is created.
//!
//! One task owns the session. Its loop gives verdicts priority over new
//! input (`select!` with `biased`), sends standby status updates on a timer
//! of their own, and stops reading the replication stream while the
//! in-flight window is full — backpressure that never stops feedback
//! (ARCHITECTURE.md, invariant 3).

mod backfill;
mod changes;
mod session;
pub mod slot;

use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::database::Settings;
use crate::error::Error;
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
        }
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
        session.run(&mut self.recreate, shutdown).await
    }
}
