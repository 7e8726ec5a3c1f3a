//! The consumer side of at-least-once: apply each event once.
//!
//! pgoutbox delivers every event to Kafka at least once, so a consumer can see
//! the same event again (a relay restart before its confirmation, a consumer
//! that crashed after its database commit but before its offset commit). Each
//! record carries the event's id in the [`TRACKING_ID`] header; a consumer
//! records the ids it has applied in a `processed_events` table (migration
//! `0008_processed_events.sql`, or [`IdempotencyStore::create_table`]) keyed by
//! `(tracking_id, consumer_group)`, and skips an id it finds there.
//!
//! The marker is only worth something in the same transaction as the event's
//! effects: marked but not applied loses the event, applied but not marked
//! applies it twice. [`IdempotencyStore::process_once`] does both in one
//! transaction and inserts the marker *first*, so a second consumer handling
//! the same event concurrently blocks on the marker's row lock until the first
//! commits (then it sees the conflict and skips) or rolls back (then it
//! applies). The Kafka offset is committed only after `process_once` returns;
//! a crash in between redelivers the event, which is then skipped.
//!
//! [`TRACKING_ID`]: crate::pipeline::header::TRACKING_ID

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use tokio_postgres::{Client, GenericClient, Transaction};
use uuid::Uuid;

use crate::config::{quote_ident, validate_identifier, ConfigError};

/// The table `pgoutbox migrate` creates in the outbox's schema.
pub const DEFAULT_TABLE: &str = "processed_events";

/// The future a [`process_once`](IdempotencyStore::process_once) handler
/// returns: boxed, `Send`, and allowed to borrow the transaction for `'t`.
pub type HandlerFuture<'t, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 't>>;

/// Where the processed-event markers live: a validated, quoted
/// `schema.table`. Cheap to clone; holds no connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyStore {
    schema: String,
    table: String,
    is_sql: String,
    mark_sql: String,
}

/// What [`IdempotencyStore::process_once`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum Processed<T> {
    /// This call ran the handler and committed its work with the marker.
    Applied(T),
    /// The consumer group had already processed the event: the handler was
    /// not called and nothing was written.
    AlreadyProcessed,
}

impl<T> Processed<T> {
    /// True when this call applied the event.
    pub fn is_applied(&self) -> bool {
        matches!(self, Processed::Applied(_))
    }
}

/// Why [`IdempotencyStore::process_once`] failed. In both cases the
/// transaction was not committed: nothing the handler wrote persists and the
/// event is not marked, so the same event can simply be processed again.
#[derive(Debug)]
pub enum ProcessError<E> {
    /// PostgreSQL failed: beginning, inserting the marker, or committing
    /// (including a transaction the handler left aborted by swallowing an
    /// error). If the connection broke during `COMMIT`, the outcome is
    /// unknown; processing the event again is still safe.
    Database(tokio_postgres::Error),
    /// The handler returned this error; its transaction was rolled back.
    Handler(E),
}

impl<E: fmt::Display> fmt::Display for ProcessError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessError::Database(e) => {
                write!(f, "idempotency store: {}", crate::error::postgres_text(e))
            }
            ProcessError::Handler(e) => write!(f, "event handler: {e}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for ProcessError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProcessError::Database(e) => Some(e),
            ProcessError::Handler(e) => Some(e),
        }
    }
}

impl IdempotencyStore {
    /// The store in `schema`'s [`DEFAULT_TABLE`] (`processed_events`), the
    /// table `pgoutbox migrate` creates next to the outbox.
    pub fn new(schema: &str) -> Result<Self, ConfigError> {
        Self::with_table(schema, DEFAULT_TABLE)
    }

    /// The store in `schema.table`. Both must be valid identifiers (see
    /// [`validate_identifier`]); they are always quoted.
    pub fn with_table(schema: &str, table: &str) -> Result<Self, ConfigError> {
        validate_identifier("idempotency.schema", schema)?;
        validate_identifier("idempotency.table", table)?;
        let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
        Ok(IdempotencyStore {
            schema: schema.to_owned(),
            table: table.to_owned(),
            is_sql: format!(
                "SELECT EXISTS (SELECT 1 FROM {qualified} WHERE tracking_id = $1 AND consumer_group = $2)"
            ),
            mark_sql: format!(
                "INSERT INTO {qualified} (tracking_id, consumer_group) VALUES ($1, $2) \
                 ON CONFLICT (tracking_id, consumer_group) DO NOTHING"
            ),
        })
    }

    /// The table, quoted and schema-qualified, for your own SQL (retention,
    /// inspection).
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    /// Creates the table and its retention index if missing: the same
    /// definition as migration `0008_processed_events.sql`, for a consumer
    /// whose database has no outbox (and so never ran `pgoutbox migrate`).
    pub async fn create_table<C: GenericClient>(
        &self,
        client: &C,
    ) -> Result<(), tokio_postgres::Error> {
        let qualified = self.qualified_table();
        let index = quote_ident(&format!("{}_processed_at_idx", self.table));
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {qualified} (\
                   tracking_id uuid NOT NULL, \
                   consumer_group text NOT NULL, \
                   processed_at timestamptz NOT NULL DEFAULT now(), \
                   PRIMARY KEY (tracking_id, consumer_group)); \
                 CREATE INDEX IF NOT EXISTS {index} ON {qualified} (processed_at);"
            ))
            .await
    }

    /// Whether `consumer_group` has recorded `tracking_id` as processed (in
    /// what `client` can see: committed rows, plus its own transaction's).
    ///
    /// On its own this is only a hint: another consumer may mark the event
    /// right after. Use [`process_once`](Self::process_once) to decide and
    /// apply atomically.
    pub async fn is_processed<C: GenericClient>(
        &self,
        client: &C,
        tracking_id: Uuid,
        consumer_group: &str,
    ) -> Result<bool, tokio_postgres::Error> {
        let row = client
            .query_one(self.is_sql.as_str(), &[&tracking_id, &consumer_group])
            .await?;
        row.try_get(0)
    }

    /// Records `tracking_id` as processed by `consumer_group`. Returns `true`
    /// when this call recorded it, `false` when it already was.
    ///
    /// Call it inside the transaction that applies the event (pass the
    /// [`Transaction`]), or let [`process_once`](Self::process_once) do it.
    /// If another open transaction has inserted the same marker, this waits
    /// for it to finish.
    pub async fn mark_processed<C: GenericClient>(
        &self,
        client: &C,
        tracking_id: Uuid,
        consumer_group: &str,
    ) -> Result<bool, tokio_postgres::Error> {
        let inserted = client
            .execute(self.mark_sql.as_str(), &[&tracking_id, &consumer_group])
            .await?;
        Ok(inserted == 1)
    }

    /// Applies an event at most once per consumer group, in one
    /// transaction on `client`:
    ///
    /// 1. `BEGIN`, insert the marker (waiting for any concurrent transaction
    ///    holding the same marker);
    /// 2. if it was already there: roll back and return
    ///    [`Processed::AlreadyProcessed`] without calling `handler`;
    /// 3. otherwise run `handler` with the transaction; if it returns `Err`,
    ///    roll back (the event stays unmarked) and return
    ///    [`ProcessError::Handler`];
    /// 4. commit and return [`Processed::Applied`] with the handler's value.
    ///
    /// The handler must do all its database work through the transaction it
    /// is given; a handler that ignores an SQL error leaves the transaction
    /// aborted, which is reported as [`ProcessError::Database`] rather than
    /// committed. The handler returns a boxed future (write
    /// `|tx| Box::pin(async move { ... })`) that may borrow both the
    /// transaction and the caller's data.
    ///
    /// ```no_run
    /// # async fn example(client: &mut tokio_postgres::Client, payload: &str) -> Result<(), Box<dyn std::error::Error>> {
    /// use pgoutbox::idempotency::{IdempotencyStore, Processed};
    ///
    /// let store = IdempotencyStore::new("public")?;
    /// let tracking_id = uuid::Uuid::new_v4(); // from the record's `tracking_id` header
    /// let outcome = store
    ///     .process_once(client, tracking_id, "billing", |tx| {
    ///         Box::pin(async move {
    ///             tx.execute(
    ///                 "INSERT INTO invoices (order_json) VALUES ($1::text::jsonb)",
    ///                 &[&payload],
    ///             )
    ///             .await?;
    ///             Ok::<_, tokio_postgres::Error>(())
    ///         })
    ///     })
    ///     .await?;
    /// match outcome {
    ///     Processed::Applied(()) => println!("applied"),
    ///     Processed::AlreadyProcessed => println!("duplicate, skipped"),
    /// }
    /// // Now (and only now) commit the Kafka offset.
    /// # Ok(())
    /// # }
    /// ```
    pub async fn process_once<'c, T, E, F>(
        &self,
        client: &'c mut Client,
        tracking_id: Uuid,
        consumer_group: &str,
        handler: F,
    ) -> Result<Processed<T>, ProcessError<E>>
    where
        F: for<'t> FnOnce(&'t Transaction<'c>) -> HandlerFuture<'t, T, E>,
    {
        let tx = client.transaction().await.map_err(ProcessError::Database)?;
        let marked = self
            .mark_processed(&tx, tracking_id, consumer_group)
            .await
            .map_err(ProcessError::Database)?;
        if !marked {
            tx.rollback().await.map_err(ProcessError::Database)?;
            return Ok(Processed::AlreadyProcessed);
        }
        let value = match handler(&tx).await {
            Ok(value) => value,
            Err(e) => {
                // A failed rollback leaves nothing committed either: the
                // server rolls back when the connection ends.
                let _ = tx.rollback().await;
                return Err(ProcessError::Handler(e));
            }
        };
        // COMMIT of an aborted transaction is a silent rollback in
        // PostgreSQL; check first so that can never pass for success.
        tx.batch_execute("SELECT 1")
            .await
            .map_err(ProcessError::Database)?;
        tx.commit().await.map_err(ProcessError::Database)?;
        Ok(Processed::Applied(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_and_qualifies_the_table() {
        let store = IdempotencyStore::with_table("Billing", "done$1").unwrap();
        assert_eq!(store.qualified_table(), "\"Billing\".\"done$1\"");
        assert!(store.mark_sql.contains("\"Billing\".\"done$1\""));
        assert_eq!(
            IdempotencyStore::new("public").unwrap().qualified_table(),
            "\"public\".\"processed_events\""
        );
    }

    #[test]
    fn rejects_names_that_are_not_identifiers() {
        let e = IdempotencyStore::new("a;drop").unwrap_err();
        assert_eq!(e.field, "idempotency.schema");
        let e = IdempotencyStore::with_table("public", "x\"y").unwrap_err();
        assert_eq!(e.field, "idempotency.table");
    }

    #[test]
    fn handler_errors_display_the_handler_message() {
        let e: ProcessError<std::io::Error> =
            ProcessError::Handler(std::io::Error::other("bad payload"));
        assert_eq!(e.to_string(), "event handler: bad payload");
        assert!(std::error::Error::source(&e).is_some());
    }
}
