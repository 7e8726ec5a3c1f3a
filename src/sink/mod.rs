//! Sinks: where records go. Each implements [`crate::pipeline::RecordSink`]
//! and only sends records the pipeline built; what a record holds is
//! decided in [`crate::pipeline::record`].
//!
//! - [`kafka`]: the idempotent rdkafka producer (at-least-once).
//! - [`transaction`]: its Kafka transactions and the progress topic
//!   (exactly-once delivery).

pub mod kafka;
pub mod transaction;

pub use kafka::{classify, Sink, SinkError};
