//! The opt-in status audit (the seed's `ENABLE_AUDIT`): every change of an
//! outbox row's `status` recorded in `<schema>.<table>_status_audit`.
//!
//! Conditional, so not a numbered migration: `pgoutbox migrate --audit`
//! (config `outbox.audit = true`, env `ENABLE_AUDIT=true`) creates the audit
//! table, its trigger function and a row-level `AFTER UPDATE OF status`
//! trigger on the partitioned parent (cloned by PostgreSQL onto every
//! partition, present and future) that fires only `WHEN (OLD.status IS
//! DISTINCT FROM NEW.status)`. `--no-audit` (`audit = false`) drops the
//! trigger and keeps the table and its history. Neither given: the trigger is
//! left as it is, so a plain `migrate` (an upgrade) never turns the audit off
//! by omission.
//!
//! Who may write audit rows: the trigger function is `SECURITY DEFINER`
//! (it runs as its owner, the role that migrates and owns the audit table)
//! with a pinned `search_path` and every name schema-qualified, and EXECUTE
//! is revoked from PUBLIC. So the least-privileged relay role — and any
//! other role allowed to update `status` — needs no privilege on the audit
//! table: turning the audit on never makes an UPDATE fail for lack of a
//! grant, and no role but the owner can insert, change or delete history.
//! Inside a definer function `current_user` is the owner, so `changed_by`
//! is the role the updating session acts as: its `SET ROLE` role when one is
//! set, else `session_user` — which is `current_user` at the UPDATE for
//! every statement not itself run inside another `SECURITY DEFINER`
//! function. See docs/audit.md.

use tokio_postgres::Client;

use crate::config::quote_ident;

/// The trigger's name on the outbox table.
pub const TRIGGER: &str = "pgoutbox_status_audit";

/// The audit table of `table`: `<table>_status_audit`.
pub fn audit_table(table: &str) -> String {
    format!("{table}_status_audit")
}

/// The trigger function of `table`: `<table>_status_audit_fn`.
pub fn audit_function(table: &str) -> String {
    format!("{table}{}", crate::config::AUDIT_FUNCTION_SUFFIX)
}

/// The statements that create (or bring up to date) the audit table and its
/// trigger function for `schema.table`. Idempotent.
pub fn create_statements(schema: &str, table: &str) -> String {
    let s = quote_ident(schema);
    let audit = format!("{s}.{}", quote_ident(&audit_table(table)));
    let function = format!("{s}.{}", quote_ident(&audit_function(table)));
    let tracking_idx = quote_ident(&format!("{table}_audit_tid_idx"));
    let changed_idx = quote_ident(&format!("{table}_audit_at_idx"));
    format!(
        r#"CREATE TABLE IF NOT EXISTS {audit} (
  id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  outbox_id          bigint      NOT NULL,
  outbox_created_at  timestamptz NOT NULL,
  tracking_id        uuid        NOT NULL,
  from_status        text        NOT NULL,
  to_status          text        NOT NULL,
  changed_at         timestamptz NOT NULL DEFAULT now(),
  changed_by         text        NOT NULL,
  retry_count        int         NOT NULL,
  last_error         text
);
CREATE INDEX IF NOT EXISTS {tracking_idx} ON {audit} (tracking_id);
CREATE INDEX IF NOT EXISTS {changed_idx} ON {audit} USING brin (changed_at);
COMMENT ON TABLE {audit} IS
  'pgoutbox: every status change of {table_text} rows (pgoutbox migrate --audit); written by the trigger {trigger_text} only';
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
  INSERT INTO {audit}
    (outbox_id, outbox_created_at, tracking_id, from_status, to_status, changed_by, retry_count, last_error)
  VALUES
    (NEW.id, NEW.created_at, NEW.tracking_id, OLD.status, NEW.status,
     coalesce(nullif(current_setting('role'), 'none'), session_user::text),
     NEW.retry_count, NEW.last_error);
  RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION {function}() FROM PUBLIC;
REVOKE ALL ON TABLE {audit} FROM PUBLIC;
"#,
        table_text = format!("{schema}.{table}").replace('\'', "''"),
        trigger_text = TRIGGER,
    )
}

/// The trigger on the outbox table.
pub fn trigger_statement(schema: &str, table: &str) -> String {
    let s = quote_ident(schema);
    format!(
        "CREATE TRIGGER {} AFTER UPDATE OF status ON {s}.{} FOR EACH ROW \
         WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION {s}.{}()",
        quote_ident(TRIGGER),
        quote_ident(table),
        quote_ident(&audit_function(table)),
    )
}

/// Whether the audit trigger is installed on `schema.table`.
pub async fn enabled(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
    table: &str,
) -> Result<bool, tokio_postgres::Error> {
    let t = format!("{}.{}", quote_ident(schema), quote_ident(table));
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname = $2",
            &[&t, &TRIGGER],
        )
        .await?
        .is_some())
}

/// Brings the audit of `schema.table` in line with `wanted`: `Some(true)`
/// creates (or updates) the table, the function and the trigger;
/// `Some(false)` drops the trigger, keeping the table; `None` changes
/// nothing. Under the migrations' advisory lock, waiting at most 5 s for the
/// outbox table's lock. Returns what changed, for the log.
pub async fn apply(
    client: &mut Client,
    schema: &str,
    table: &str,
    wanted: Option<bool>,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let Some(wanted) = wanted else {
        return Ok(Vec::new());
    };
    let mut changed = Vec::new();
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('pgoutbox_migrations'))",
        &[],
    )
    .await?;
    tx.batch_execute("SET LOCAL lock_timeout = '5s'").await?;
    let has_trigger = enabled(&tx, schema, table).await?;
    let audit = format!(
        "{}.{}",
        quote_ident(schema),
        quote_ident(&audit_table(table))
    );
    if wanted {
        let has_table = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&audit])
            .await?
            .get::<_, bool>(0);
        tx.batch_execute(&create_statements(schema, table)).await?;
        if !has_table {
            changed.push(format!(
                "created the status audit table {schema}.{}",
                audit_table(table)
            ));
        }
        if !has_trigger {
            tx.batch_execute(&trigger_statement(schema, table)).await?;
            changed.push("created the status audit trigger (audit on)".to_owned());
        }
    } else if has_trigger {
        tx.batch_execute(&format!(
            "DROP TRIGGER {} ON {}.{}",
            quote_ident(TRIGGER),
            quote_ident(schema),
            quote_ident(table)
        ))
        .await?;
        changed.push(format!(
            "dropped the status audit trigger (audit off); {schema}.{} and its rows are kept",
            audit_table(table)
        ));
    }
    tx.commit().await?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_derived_from_the_table_and_quoted() {
        assert_eq!(audit_table("outbox"), "outbox_status_audit");
        let sql = create_statements("Shop", "Out\"box");
        assert!(
            sql.contains("CREATE TABLE IF NOT EXISTS \"Shop\".\"Out\"\"box_status_audit\""),
            "{sql}"
        );
        assert!(sql.contains("SECURITY DEFINER"), "{sql}");
        assert!(
            sql.contains("SET search_path = pg_catalog, pg_temp"),
            "{sql}"
        );
        assert!(
            sql.contains(
                "REVOKE ALL ON FUNCTION \"Shop\".\"Out\"\"box_status_audit_fn\"() FROM PUBLIC"
            ),
            "{sql}"
        );
        let trigger = trigger_statement("Shop", "Out\"box");
        assert!(trigger.contains("AFTER UPDATE OF status ON \"Shop\".\"Out\"\"box\" FOR EACH ROW"));
        assert!(trigger.contains("WHEN (OLD.status IS DISTINCT FROM NEW.status)"));
    }
}
