//! Versioned SQL migrations from `migrations/`, applied once each and
//! recorded in `pgoutbox_migrations`.
//!
//! The SQL files are compiled into the binary. Each is a template over the
//! target's names: `{{schema}}`, `{{table}}`, `{{pending_index}}` become quoted
//! identifiers and `{{schema_literal}}`, `{{table_literal}}`,
//! `{{publication_literal}}` string literals, so one binary can migrate
//! several outbox tables. Concurrent runs serialise on an advisory lock.

use tokio_postgres::Client;

use crate::config::{quote_ident, quote_literal};

/// The migrations, in order: (version, name, SQL template).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "outbox_table",
        include_str!("../../migrations/0001_outbox_table.sql"),
    ),
    (
        2,
        "publication",
        include_str!("../../migrations/0002_publication.sql"),
    ),
    (
        3,
        "publish_function",
        include_str!("../../migrations/0003_publish_function.sql"),
    ),
    (
        4,
        "relay_state",
        include_str!("../../migrations/0004_relay_state.sql"),
    ),
    (
        5,
        "table_less_outbox",
        include_str!("../../migrations/0005_table_less_outbox.sql"),
    ),
    (
        6,
        "poll_mode",
        include_str!("../../migrations/0006_poll_mode.sql"),
    ),
    (
        7,
        "dead_letter_audit",
        include_str!("../../migrations/0007_dead_letter_audit.sql"),
    ),
    (
        8,
        "processed_events",
        include_str!("../../migrations/0008_processed_events.sql"),
    ),
    (
        9,
        "relay_privileges",
        include_str!("../../migrations/0009_relay_privileges.sql"),
    ),
    (
        10,
        "partition_lifecycle",
        include_str!("../../migrations/0010_partition_lifecycle.sql"),
    ),
    (
        11,
        "slot_recovery",
        include_str!("../../migrations/0011_slot_recovery.sql"),
    ),
    (
        12,
        "replays",
        include_str!("../../migrations/0012_replays.sql"),
    ),
    (
        13,
        "delivery_journal",
        include_str!("../../migrations/0013_delivery_journal.sql"),
    ),
];

/// The migrations that make only the relay's own objects beside an
/// outbox table (the publication, the slot record, the dead letters of
/// messages, the replay audit): what `pgoutbox adopt` applies to a table
/// pgoutbox did not create.
pub(super) const SUPPORT_MIGRATIONS: [(&str, &str); 7] = [
    (
        "publication",
        include_str!("../../migrations/0002_publication.sql"),
    ),
    (
        "relay_state",
        include_str!("../../migrations/0004_relay_state.sql"),
    ),
    (
        "table_less_outbox",
        include_str!("../../migrations/0005_table_less_outbox.sql"),
    ),
    (
        "slot_recovery",
        include_str!("../../migrations/0011_slot_recovery.sql"),
    ),
    (
        "publish_function",
        include_str!("../../migrations/adopt_publish_function.sql"),
    ),
    ("replays", include_str!("../../migrations/0012_replays.sql")),
    (
        "delivery_journal",
        include_str!("../../migrations/0013_delivery_journal.sql"),
    ),
];

/// `template` rendered for `target`.
pub(super) fn render_for(target: &MigrationTarget, template: &str) -> String {
    target.render(template)
}

/// Names a migration run applies to. All must already be validated
/// identifiers (see [`crate::config::validate_identifier`]).
#[derive(Clone, Debug)]
pub struct MigrationTarget {
    /// Schema of the outbox table.
    pub schema: String,
    /// The outbox table.
    pub table: String,
    /// The publication over it.
    pub publication: String,
    /// The logical message prefix `outbox_emit` writes.
    pub message_prefix: String,
}

impl MigrationTarget {
    /// The configured outbox table, publication and message prefix.
    pub fn from_config(config: &crate::config::Config) -> MigrationTarget {
        MigrationTarget {
            schema: config.outbox.schema.clone(),
            table: config.outbox.table.clone(),
            publication: config.cdc.publication.clone(),
            message_prefix: config.cdc.message_prefix.clone(),
        }
    }

    fn render(&self, template: &str) -> String {
        template
            .replace("{{schema}}", &quote_ident(&self.schema))
            .replace("{{table}}", &quote_ident(&self.table))
            .replace(
                "{{pending_index}}",
                &quote_ident(&format!("{}_pending_idx", self.table)),
            )
            .replace(
                "{{processing_index}}",
                &quote_ident(&format!("{}_processing_idx", self.table)),
            )
            .replace(
                "{{dead_letter_index}}",
                &quote_ident(&format!("{}_dead_letter_idx", self.table)),
            )
            .replace(
                "{{failed_index}}",
                &quote_ident(&format!("{}_failed_idx", self.table)),
            )
            .replace("{{schema_literal}}", &quote_literal(&self.schema))
            .replace("{{table_literal}}", &quote_literal(&self.table))
            .replace("{{publication_literal}}", &quote_literal(&self.publication))
            .replace(
                "{{message_prefix_literal}}",
                &quote_literal(&self.message_prefix),
            )
            .replace(
                "{{publish_function}}",
                &quote_ident(&self.publish_function()),
            )
            .replace(
                "{{publish_function_literal}}",
                &quote_literal(&self.publish_function()),
            )
    }

    /// The SQL function that publishes into this table: `outbox_publish`
    /// for a table named `outbox`, `<table>_publish` otherwise.
    pub fn publish_function(&self) -> String {
        if self.table == "outbox" {
            "outbox_publish".to_owned()
        } else {
            format!("{}_publish", self.table)
        }
    }

    pub(super) fn key(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// Whether `target`'s table exists although `pgoutbox migrate` did not
/// create it (no migration 1 recorded for it): migrate must not touch it.
pub async fn is_foreign_table(
    client: &Client,
    target: &MigrationTarget,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL, \
                    to_regclass('public.pgoutbox_migrations') IS NOT NULL",
            &[&target.schema, &target.table],
        )
        .await?;
    let (exists, ledger): (bool, bool) = (row.get(0), row.get(1));
    if !exists {
        return Ok(false);
    }
    if !ledger {
        return Ok(true);
    }
    Ok(client
        .query_opt(
            "SELECT 1 FROM public.pgoutbox_migrations WHERE target = $1 AND version = 1",
            &[&target.key()],
        )
        .await?
        .is_none())
}

/// Applies every migration not yet recorded for `target`. Returns the
/// versions applied by this call (empty when up to date).
pub async fn migrate(
    client: &mut Client,
    target: &MigrationTarget,
) -> Result<Vec<i32>, tokio_postgres::Error> {
    // Under the same advisory lock as the migrations: CREATE TABLE IF NOT
    // EXISTS is not safe against a concurrent creator.
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('pgoutbox_migrations'))",
        &[],
    )
    .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS public.pgoutbox_migrations (
           target     text NOT NULL,
           version    int  NOT NULL,
           name       text NOT NULL,
           applied_at timestamptz NOT NULL DEFAULT now(),
           PRIMARY KEY (target, version))",
    )
    .await?;
    tx.commit().await?;
    let mut applied = Vec::new();
    for (version, name, template) in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('pgoutbox_migrations'))",
            &[],
        )
        .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM public.pgoutbox_migrations WHERE target = $1 AND version = $2",
                &[&target.key(), version],
            )
            .await?
            .is_some();
        if done {
            tx.commit().await?;
            continue;
        }
        tx.batch_execute(&target.render(template)).await?;
        tx.execute(
            "INSERT INTO public.pgoutbox_migrations (target, version, name) VALUES ($1, $2, $3)",
            &[&target.key(), version, name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, target = %target.key(), "applied migration");
        applied.push(*version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_substituted() {
        let t = MigrationTarget {
            schema: "public".into(),
            table: "outbox".into(),
            publication: "outbox_pub".into(),
            message_prefix: "outbox".into(),
        };
        let support = SUPPORT_MIGRATIONS
            .iter()
            .map(|(name, sql)| (0, *name, *sql));
        for (_, name, sql) in MIGRATIONS.iter().copied().chain(support) {
            let out = t.render(sql);
            assert!(!out.contains("{{"), "{name} keeps a placeholder");
        }
    }

    #[test]
    fn versions_are_strictly_increasing() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
