//! pgoutbox: a PostgreSQL transactional-outbox relay.
//!
//! Applications insert events into an `outbox` table inside their own
//! business transactions. pgoutbox reads those inserts from a logical
//! replication slot (the `pgoutput` plugin), publishes each one to Apache
//! Kafka with an idempotent producer, and confirms WAL positions back to
//! PostgreSQL only once Kafka has acknowledged every event up to them.
//!
//! The crate is laid out by domain idea:
//! - [`pgoutput`]: a pure decoder of the pgoutput logical replication protocol;
//! - [`replication`]: the streaming replication client (startup, auth,
//!   `START_REPLICATION`, CopyBoth framing, standby status updates);
//! - [`outbox`]: the table contract, migrations and the publishing API;
//! - [`route`]: turning an outbox row into a Kafka record (topic, key, headers);
//! - [`sink`]: the Kafka producer;
//! - [`relay`]: the CDC pipeline and its progress (LSN) tracking;
//! - [`poll`]: poll mode (leases, reaper, retries) for servers without
//!   logical replication;
//! - [`serving`]: the lock that lets only one mode serve a table;
//! - [`metrics`]: Prometheus metrics, `/healthz` and `/readyz`, the sampler;
//! - [`partitions`]: partitions created ahead, old ones archived and retired;
//! - [`overview`]: what `pgoutbox status` shows;
//! - [`idempotency`]: the consumer side, applying each event once;
//! - [`config`]: configuration from file and environment, validated.
#![deny(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod cli;
pub mod config;
pub mod database;
pub mod error;
pub mod idempotency;
pub mod lsn;
pub mod metrics;
pub mod outbox;
pub mod overview;
pub mod partitions;
pub mod pgoutput;
pub mod poll;
pub mod redact;
pub mod relay;
pub mod replication;
pub mod route;
pub mod serving;
pub mod sink;

pub use lsn::Lsn;
