//! Operator tools: what an operator runs or looks at beside the relay.
//!
//! - [`http`]: `/metrics`, `/healthz` and `/readyz`;
//! - [`sampler`]: the gauges read from the database (pending rows, slot lag);
//! - [`overview`]: what `pgoutbox status` shows;
//! - [`leftovers`]: an earlier relay's slots and triggers, to remove;
//! - [`kafka_progress`]: its exactly-once part, from the progress topic;
//! - [`partitions`]: partitions created ahead, old ones archived and retired;
//! - [`debezium_import`]: a Debezium connector's configuration as pgoutbox's;
//! - [`debezium_offset`]: the offset that hands the slot back to Debezium;
//! - [`replay`]: delivered or dead-lettered events published again.

pub mod debezium_import;
pub mod debezium_offset;
pub mod http;
pub mod kafka_progress;
pub mod leftovers;
pub mod overview;
pub mod partitions;
pub mod replay;
pub mod sampler;

pub use http::{serve, Endpoint};
