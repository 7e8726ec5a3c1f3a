//! Leftovers of the relay a table had before pgoutbox (the polling
//! framework, a home-grown CDC consumer): inactive logical replication slots
//! on the database that no pgoutbox relay recorded, which retain WAL for as
//! long as they exist, and triggers on the outbox table that pgoutbox did not
//! make (the framework's audit trigger). Shown by `pgoutbox status` and
//! `pgoutbox adopt`, each with the statement that removes it; never
//! removed by pgoutbox.

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{quote_ident, Config};
use crate::error::Error;

/// One leftover and how to remove it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Leftover {
    /// `replication slot` or `trigger`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// What it is and what it costs.
    pub detail: String,
    /// The statement that removes it, once nothing uses it.
    pub remove: String,
}

/// pgoutbox's own triggers on an outbox table.
const OWN_TRIGGERS: [&str; 2] = [crate::outbox::audit::TRIGGER, crate::poll::schema::TRIGGER];

/// The slots pgoutbox relays of this database recorded (in the
/// `pgoutbox_slot_state` table of each outbox schema): another outbox
/// table's relay, even stopped, is not a leftover.
async fn pgoutbox_slots(client: &Client) -> Result<Vec<String>, Error> {
    let schemas: Vec<String> = client
        .query(
            "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relname = 'pgoutbox_slot_state' AND c.relkind IN ('r', 'p')",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("looking for pgoutbox_slot_state tables", &e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut slots = Vec::new();
    for schema in schemas {
        // A table the role may not read names no slot it can vouch for.
        if let Ok(rows) = client
            .query(
                &format!(
                    "SELECT slot_name::text FROM {}.pgoutbox_slot_state",
                    quote_ident(&schema)
                ),
                &[],
            )
            .await
        {
            slots.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        }
    }
    Ok(slots)
}

/// The leftovers around the configured outbox table.
pub async fn read(client: &Client, config: &Config) -> Result<Vec<Leftover>, Error> {
    let mut out = Vec::new();
    let mut ours = pgoutbox_slots(client).await?;
    ours.push(config.cdc.slot.clone());
    let slots = client
        .query(
            "SELECT slot_name::text, coalesce(plugin::text, ''), \
                    CASE WHEN pg_is_in_recovery() THEN NULL \
                         ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint END \
               FROM pg_replication_slots \
              WHERE slot_type = 'logical' AND NOT active AND slot_name <> ALL($1) \
                AND database = current_database() \
              ORDER BY slot_name",
            &[&ours],
        )
        .await
        .map_err(|e| Error::postgres("reading pg_replication_slots", &e))?;
    for r in slots {
        let name: String = r.get(0);
        let plugin: String = r.get(1);
        let retained: Option<i64> = r.get(2);
        let retained = retained
            .map(|b| format!(", retaining {}", crate::operate::sampler::bytes(b)))
            .unwrap_or_default();
        out.push(Leftover {
            kind: "replication slot".into(),
            remove: format!("SELECT pg_drop_replication_slot('{}');", name.replace('\'', "''")),
            detail: format!(
                "inactive logical slot (plugin {plugin}{retained}), neither this relay's (cdc.slot = {}) nor one a pgoutbox relay of this database recorded: it keeps WAL for as long as it exists; drop it if nothing reads it any more",
                config.cdc.slot
            ),
            name,
        });
    }
    let table = format!(
        "{}.{}",
        quote_ident(&config.outbox.schema),
        quote_ident(&config.outbox.table)
    );
    let triggers = client
        .query(
            "SELECT t.tgname::text, p.proname::text FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
              WHERE t.tgrelid = to_regclass($1) AND NOT t.tgisinternal \
                AND t.tgname <> ALL($2) ORDER BY t.tgname",
            &[&table, &OWN_TRIGGERS.to_vec()],
        )
        .await
        .map_err(|e| Error::postgres("reading the outbox table's triggers", &e))?;
    for r in triggers {
        let name: String = r.get(0);
        let function: String = r.get(1);
        out.push(Leftover {
            kind: "trigger".into(),
            remove: format!("DROP TRIGGER {} ON {table};", quote_ident(&name)),
            detail: format!(
                "runs {function}() on the outbox table, not made by pgoutbox (an earlier relay's audit trigger?): every insert and status change pays for it; drop it if nothing needs it"
            ),
            name,
        });
    }
    Ok(out)
}

/// One line per leftover, for the text forms.
pub fn lines(leftovers: &[Leftover]) -> Vec<String> {
    leftovers
        .iter()
        .map(|l| {
            format!(
                "{} {}: {}. To remove: {}",
                l.kind, l.name, l.detail, l.remove
            )
        })
        .collect()
}
