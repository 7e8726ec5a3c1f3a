//! Operator tools: what an operator runs or looks at beside the relay.
//!
//! - [`http`]: `/metrics`, `/healthz` and `/readyz`;
//! - [`sampler`]: the gauges read from the database (pending rows, slot lag);
//! - [`overview`]: what `pgoutbox status` shows;
//! - [`partitions`]: partitions created ahead, old ones archived and retired.

pub mod http;
pub mod overview;
pub mod partitions;
pub mod sampler;

pub use http::{serve, Endpoint};
