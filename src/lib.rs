//! pgoutbox: a PostgreSQL transactional-outbox relay.
//!
//! Applications insert events into an `outbox` table inside their own
//! business transactions. pgoutbox reads those inserts from a logical
//! replication slot (the `pgoutput` plugin), publishes each one to Apache
//! Kafka with an idempotent producer, and confirms WAL positions back to
//! PostgreSQL only once Kafka has acknowledged every event up to them.
//!
//! The crate is layered; a module imports only from its own layer or the
//! layers below it (ARCHITECTURE.md draws the layers and the path of one
//! event; `tests/architecture.rs` fails when an import points up or closes
//! a cycle). From the bottom up:
//! - foundation: [`lsn`], [`redact`], [`config`] (one file per section,
//!   each validated), [`metrics`] (the registry and the health state);
//! - protocol and connections: [`pgoutput`] (a pure decoder), [`database`]
//!   (connections, TLS), [`replication`] (the streaming replication
//!   client), [`error`] (one error type, one action per kind);
//! - the outbox table contract: [`outbox`] (the event and its one row
//!   mapping, migrations, marks, dead letters, the publishing API);
//! - [`pipeline`]: record building, the in-flight window, progress (which
//!   LSN is safe to confirm), behind small sink and marker traits;
//! - [`sink`]: the Kafka producer;
//! - sources: [`cdc`] (slot, session, decoded changes, backfill) and
//!   [`poll`] (claims, workers, reaper, wake-up);
//! - [`runner`]: mode choice, preflight checks, the serving lock and one
//!   supervisor for both modes;
//! - operator tools: [`operate`] (HTTP endpoints, sampler, `status`
//!   overview, partitions) and [`idempotency`] (the consumer side);
//! - [`cli`]: one file per command.
#![deny(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod cdc;
pub mod cli;
pub mod config;
pub mod database;
pub mod error;
pub mod idempotency;
pub mod lsn;
pub mod metrics;
pub mod operate;
pub mod outbox;
pub mod pgoutput;
pub mod pipeline;
pub mod poll;
pub mod redact;
pub mod replication;
pub mod runner;
pub mod sink;

pub use lsn::Lsn;

/// This build's version and git revision, e.g. `0.1.0 (3c005f84af56)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("PGOUTBOX_GIT_REVISION"),
    ")"
);
