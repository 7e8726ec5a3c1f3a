//! `pgoutbox migrate`: the migrations, the table settings that follow the
//! configuration, and optionally the relay's least-privilege role.

use crate::config::Config;
use crate::error::Error;
use crate::outbox::{
    grant_relay_role, migrate as apply_migrations, MigrationTarget, PrivilegeError, RelayRole,
};

use super::connect_for_command;

/// `pgoutbox migrate [--relay-role <name>]`: the migrations, then (with a
/// relay role) the least-privilege role the relay runs as, created if
/// missing and granted what the relay needs (see docs/least-privilege.md).
pub async fn migrate_with(config: &Config, relay_role: Option<&RelayRole>) -> Result<(), Error> {
    let mut client = connect_for_command(config).await?;
    let target = MigrationTarget::from_config(config);
    let map = config.outbox.column_map()?;
    if map != crate::config::ColumnMap::pgoutbox() {
        return Err(Error::Fatal(format!(
            "`pgoutbox migrate` creates and updates pgoutbox's own table, but [outbox.columns] maps another shape (preset {:?}): create your table yourself, then run `pgoutbox adopt`",
            map.preset().as_str()
        )));
    }
    if crate::outbox::is_foreign_table(&client, &target)
        .await
        .map_err(|e| Error::postgres("checking who created the table", &e))?
    {
        return Err(Error::Fatal(format!(
            "{}.{} exists but was not created by `pgoutbox migrate`, which never alters a table it did not create: run `pgoutbox adopt` to check it and make what the relay needs beside it",
            target.schema, target.table
        )));
    }
    let applied = apply_migrations(&mut client, &target)
        .await
        .map_err(|e| Error::postgres("applying migrations", &e))?;
    if applied.is_empty() {
        tracing::info!("migrations: already up to date");
    } else {
        tracing::info!(?applied, "migrations applied");
    }
    let changed = crate::poll::schema::apply(&mut client, config)
        .await
        .map_err(|e| Error::postgres("applying the poll settings to the table", &e))?;
    for change in changed {
        tracing::info!("{change}");
    }
    // The opt-in status audit (migrate --audit / --no-audit, ENABLE_AUDIT).
    let changed = crate::outbox::audit::apply(
        &mut client,
        &config.outbox.schema,
        &config.outbox.table,
        config.outbox.audit,
    )
    .await
    .map_err(|e| Error::postgres("applying the status audit setting", &e))?;
    for change in changed {
        tracing::info!("{change}");
    }
    if let Some(role) = relay_role {
        relay_role_grants(
            &mut client,
            &target,
            role,
            &crate::outbox::GrantScope::migrated(),
        )
        .await?;
    }
    Ok(())
}

/// Creates (if missing) and grants the relay role; says what was done and,
/// for a role created without a password, how to set one. Never prints the
/// password.
pub(super) async fn relay_role_grants(
    client: &mut tokio_postgres::Client,
    target: &MigrationTarget,
    role: &RelayRole,
    scope: &crate::outbox::GrantScope,
) -> Result<(), Error> {
    let report = grant_relay_role(client, target, role, scope)
        .await
        .map_err(|e| match e {
            PrivilegeError::Database { context, source } => Error::postgres(&context, &source),
            refused @ PrivilegeError::Refused(_) => Error::Fatal(refused.to_string()),
        })?;
    let name = &role.name;
    let table = format!("{}.{}", target.schema, target.table);
    match (&role.password, report.created) {
        (Some((_, source)), true) => {
            tracing::info!(role = %name, password_from = %source, "created the relay role (LOGIN REPLICATION, no superuser)")
        }
        (None, true) => tracing::warn!(
            role = %name,
            "created the relay role without a password: set one with psql's \\password {name} \
             (or ALTER ROLE), or run migrate again with {} or --relay-password-file",
            crate::outbox::RELAY_PASSWORD_ENV
        ),
        (Some((_, source)), false) => {
            tracing::info!(role = %name, password_from = %source, "relay role exists; password updated")
        }
        (None, false) => tracing::info!(role = %name, "relay role exists; password unchanged"),
    }
    for warning in &report.warnings {
        tracing::warn!("{warning}");
    }
    tracing::info!(
        role = %name,
        table = %table,
        "granted the relay role what the relay needs on the table; run the relay with DATABASE_URL=postgres://{name}:<password>@<host>:<port>/<db> (see docs/least-privilege.md)"
    );
    Ok(())
}
