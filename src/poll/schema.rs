//! Schema features that follow the configuration rather than a fixed
//! migration, applied by `pgoutbox migrate`: the wake-up trigger
//! (`poll.notify`), the index per-aggregate ordering needs
//! (`poll.ordering = "aggregate"`), and the `max_retries` column default
//! (`outbox.max_retries`). Each waits at most a few seconds for its table
//! lock, so a long transaction never makes it queue inserts behind it.

use tokio_postgres::{Client, GenericClient};

use crate::config::{quote_ident, quote_literal, Config, PollOrdering};

/// The trigger's name on the outbox table.
pub const TRIGGER: &str = "pgoutbox_notify";

/// The index behind per-aggregate ordering.
pub fn ordering_index(config: &Config) -> String {
    format!("{}_unfinished_idx", config.outbox.table)
}

fn table(config: &Config) -> String {
    format!(
        "{}.{}",
        quote_ident(&config.outbox.schema),
        quote_ident(&config.outbox.table)
    )
}

/// Brings the trigger, the ordering index and the column default in line
/// with `config`. Returns what changed, for the log.
pub async fn apply(
    client: &mut Client,
    config: &Config,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let t = table(config);
    let mut changed = Vec::new();
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL lock_timeout = '5s'").await?;
    let has_trigger = tx
        .query_opt(
            "SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname = $2",
            &[&t, &TRIGGER],
        )
        .await?
        .is_some();
    if config.poll.notify && !has_trigger {
        tx.batch_execute(&format!(
            "CREATE TRIGGER {} AFTER INSERT ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {}.pgoutbox_notify({})",
            quote_ident(TRIGGER),
            quote_ident(&config.outbox.schema),
            quote_literal(&super::wakeup::channel(config)),
        ))
        .await?;
        changed.push("created the wake-up trigger (poll.notify = true)".to_owned());
    } else if !config.poll.notify && has_trigger {
        tx.batch_execute(&format!("DROP TRIGGER {} ON {t}", quote_ident(TRIGGER)))
            .await?;
        changed.push("dropped the wake-up trigger (poll.notify = false)".to_owned());
    }
    if config.poll.ordering == PollOrdering::Aggregate && !has_ordering_index(&tx, config).await? {
        tx.batch_execute(&format!(
            "CREATE INDEX {} ON {t} (aggregate_id, created_at, id) WHERE status <> 'COMPLETED'",
            quote_ident(&ordering_index(config))
        ))
        .await?;
        changed.push("created the per-aggregate ordering index".to_owned());
    }
    let default: Option<String> = tx
        .query_one(
            "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a \
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
              WHERE a.attrelid = $1::text::regclass AND a.attname = 'max_retries'",
            &[&t],
        )
        .await?
        .get(0);
    let wanted = config.outbox.max_retries.to_string();
    if default.as_deref() != Some(wanted.as_str()) {
        tx.batch_execute(&format!(
            "ALTER TABLE {t} ALTER COLUMN max_retries SET DEFAULT {wanted}"
        ))
        .await?;
        changed.push(format!("max_retries now defaults to {wanted}"));
    }
    tx.commit().await?;
    Ok(changed)
}

/// Whether the ordering index exists (checked by poll relays that need it).
pub async fn has_ordering_index(
    client: &impl GenericClient,
    config: &Config,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&config.outbox.schema, &ordering_index(config)],
        )
        .await?
        .is_some())
}
