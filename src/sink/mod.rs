//! Sinks: where records go. Each implements [`crate::pipeline::RecordSink`]
//! and only sends records the pipeline built; what a record holds is
//! decided in [`crate::pipeline::record`].
//!
//! - [`kafka`]: the idempotent rdkafka producer (at-least-once).

pub mod kafka;

pub use kafka::{classify, Sink, SinkError};
