//! What the `pgoutbox` subcommands do, kept out of `main.rs` so they can be
//! tested and reused: one file per command, re-exported here.
//!
//! - [`run`]: the relay until SIGTERM/SIGINT (`run.rs`);
//! - [`migrate_with`]: migrations and the relay role (`migrate.rs`);
//! - [`adopt()`]: a table pgoutbox did not create, checked and served
//!   (`adopt.rs`);
//! - [`dle`]: dead letters, list / show / redrive / skip (`dead_letters.rs`);
//! - [`status`]: the one-screen overview (`status.rs`);
//! - [`partitions_maintain`]: partition lifecycle (`partitions.rs`);
//! - [`replay()`]: delivered or dead-lettered events published again
//!   (`replay.rs`);
//! - [`import_debezium`]: a Debezium connector's configuration as pgoutbox's
//!   (`import_debezium.rs`);
//! - [`init_logging`]: `tracing` set-up shared by all (`logging.rs`).

use crate::config::Config;
use crate::error::Error;

mod adopt;
mod dead_letters;
mod import_debezium;
mod logging;
mod migrate;
mod partitions;
mod replay;
mod run;
mod status;

pub use crate::VERSION;
pub use adopt::{adopt, AdoptArgs};
pub use dead_letters::{dle, DleCommand};
pub use import_debezium::{debezium_offset, import_debezium};
pub use logging::init_logging;
pub use migrate::migrate_with;
pub use partitions::{
    format_maintain, partitions_convert, partitions_maintain, ConvertArgs, MaintainArgs,
};
pub use replay::{replay, ReplayArgs};
pub use run::run;
pub use status::{format_overview, status};

/// Connects for an operator's command: a connection failure is final.
async fn connect_for_command(config: &Config) -> Result<tokio_postgres::Client, Error> {
    let pg = crate::database::settings(config)?;
    crate::database::connect(&pg)
        .await
        .map_err(|e| Error::postgres("connecting to PostgreSQL", &e).at_start())
}

/// A command's output as pretty-printed JSON.
fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, Error> {
    serde_json::to_string_pretty(value)
        .map_err(|e| Error::Fatal(format!("cannot write JSON output: {e}")))
}
