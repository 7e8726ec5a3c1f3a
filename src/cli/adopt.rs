//! `pgoutbox adopt`: check an outbox table pgoutbox did not create against
//! `[outbox.columns]`, say what it lacks for which feature, and make what
//! the relay needs beside it (see [`crate::outbox::adopt`]).

use crate::config::Config;
use crate::error::Error;
use crate::outbox::{AdoptError, GrantScope, MigrationTarget, RelayRole, TableShape};

use super::connect_for_command;

/// What `pgoutbox adopt` was asked to do.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdoptArgs {
    /// Only report; change nothing.
    pub check: bool,
    /// Also add the row-state columns poll mode and marking need.
    pub add_poll_columns: bool,
    /// JSON output.
    pub json: bool,
}

/// Runs `pgoutbox adopt` (granting `relay_role`, when given, what the
/// relay needs on the adopted table); prints the report on stdout.
pub async fn adopt(
    config: &Config,
    args: AdoptArgs,
    relay_role: Option<&RelayRole>,
) -> Result<(), Error> {
    let mut client = connect_for_command(config).await?;
    let target = MigrationTarget::from_config(config);
    let map = config.event_columns()?;
    let report = crate::outbox::adopt(
        &mut client,
        &target,
        &map,
        args.check,
        args.add_poll_columns,
    )
    .await
    .map_err(|e| match e {
        AdoptError::Database { doing, source } => Error::postgres(&doing, &source),
        AdoptError::Refused(why) => Error::Fatal(why),
    })?;
    if let (Some(role), false) = (relay_role, args.check) {
        let shape = TableShape::inspect(&client, &target.schema, &target.table)
            .await
            .map_err(|e| Error::postgres("reading the table's columns", &e))?
            .ok_or_else(|| Error::Fatal(format!("table {} does not exist", report.table)))?;
        let scope = GrantScope {
            update_columns: crate::outbox::STATUS_COLUMNS
                .iter()
                .filter(|c| shape.type_of(c).is_some())
                .map(|c| (*c).to_string())
                .collect(),
            partitions: report.created_by_migrate,
        };
        super::migrate::relay_role_grants(&mut client, &target, role, &scope).await?;
    }
    let leftovers = crate::operate::leftovers::read(&client, config).await?;
    if args.json {
        let mut value = serde_json::to_value(&report)
            .map_err(|e| Error::Fatal(format!("encoding the report: {e}")))?;
        value["leftovers"] = serde_json::to_value(&leftovers)
            .map_err(|e| Error::Fatal(format!("encoding the report: {e}")))?;
        println!("{}", super::to_json(&value)?);
    } else {
        for line in report.lines() {
            println!("{line}");
        }
        for line in crate::operate::leftovers::lines(&leftovers) {
            println!("leftover: {line}");
        }
    }
    Ok(())
}
