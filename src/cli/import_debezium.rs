//! `pgoutbox import-debezium FILE`: the configuration on stdout, what was
//! not carried over on stderr; and `pgoutbox debezium-offset`, the offset
//! that hands the slot back to Debezium.

use std::io::Read;
use std::path::Path;

use crate::config::Config;
use crate::error::Error;
use crate::operate::{debezium_import, debezium_offset};

/// Reads `file` (`-` for stdin), prints the pgoutbox configuration on
/// stdout and one `warning:` line per option not carried over on stderr.
/// The error says what is wrong with the input.
pub fn import_debezium(file: &Path) -> Result<(), String> {
    let text = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("reading stdin: {e}"))?;
        text
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?
    };
    let options = debezium_import::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let imported =
        debezium_import::convert(&options).map_err(|e| format!("{}: {e}", file.display()))?;
    for w in &imported.warnings {
        eprintln!("warning: {w}");
    }
    print!("{}", imported.toml);
    Ok(())
}

/// `pgoutbox debezium-offset --topic-prefix P`: prints the body of Kafka
/// Connect's `PATCH /connectors/<name>/offsets` that makes Debezium resume
/// the configured slot where pgoutbox stopped (see
/// docs/migrating-from-debezium.md, "Rolling back").
pub async fn debezium_offset(config: &Config, topic_prefix: &str) -> Result<(), Error> {
    let client = super::connect_for_command(config).await?;
    let at = debezium_offset::confirmed_position(&client, &config.cdc.slot)
        .await
        .map_err(Error::Fatal)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let body = debezium_offset::offset_body(topic_prefix, at, now);
    tracing::info!(slot = %config.cdc.slot, confirmed_flush = %at.confirmed, restart_lsn = %at.restart, "PATCH /connectors/<name>/offsets with this body while the connector is STOPPED, then PUT /connectors/<name>/resume");
    println!("{}", super::to_json(&body)?);
    Ok(())
}
