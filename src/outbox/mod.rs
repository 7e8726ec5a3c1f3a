//! The outbox table contract: the [`OutboxEvent`] and its one mapping from
//! a row, the table's migrations, the publishing API, the marks the relay
//! leaves on rows, leases, dead letters, the audit trail, the relay role's
//! privileges, and what a replay reads ([`replay`]).
//!
//! Statuses are the seed's: `PENDING`, `PROCESSING`, `COMPLETED`, `FAILED`,
//! `DEAD_LETTER`. Both relay modes leave the same statuses, so either can take
//! over from the other (ARCHITECTURE.md, invariant 8).

pub mod adopt;
pub mod audit;
pub mod bytea;
mod columns;
pub mod convert;
pub mod dead_letter;
pub mod envelope;
mod event;
pub mod journal;
pub mod lease;
mod marks;
mod migrate;
pub mod partitioning;
mod privileges;
pub mod replay;
mod row_key;
mod shape;
pub mod wal_flush;

pub use adopt::{adopt, AdoptError, AdoptReport, ADOPTED};
pub use columns::{ColumnError, OutboxColumns};
#[cfg(test)]
pub(crate) use event::sample_event;
pub use event::{select_list, select_width, OutboxEvent, TraceContext, OUTBOX_COLUMNS};
pub use marks::{Batching, Mark, MarkKind, MarkWriter, StreamProgress};
pub use migrate::{is_foreign_table, migrate, MigrationTarget, MIGRATIONS};
pub use privileges::{
    grant_relay_role, GrantScope, Password, PasswordSource, PrivilegeError, RelayRole,
    RelayRoleReport, RELAY_PASSWORD_ENV, STATUS_COLUMNS,
};
pub use row_key::{key_table, RowKey};
pub use shape::{Gap, TableShape};

use tokio_postgres::GenericClient;
use uuid::Uuid;

/// The statuses a row goes through.
pub mod row_status {
    /// Waiting to be published.
    pub const PENDING: &str = "PENDING";
    /// Claimed by a poller under a lease.
    pub const PROCESSING: &str = "PROCESSING";
    /// Acknowledged by Kafka.
    pub const COMPLETED: &str = "COMPLETED";
    /// Failed, waiting for a retry (poll mode).
    pub const FAILED: &str = "FAILED";
    /// Never publishable without an operator's help.
    pub const DEAD_LETTER: &str = "DEAD_LETTER";
}

/// An event to publish through [`publish`].
#[derive(Clone, Debug)]
pub struct NewEvent<'a> {
    /// Kind of aggregate (`Order`); part of the default topic.
    pub aggregate_type: &'a str,
    /// The aggregate's id: the Kafka key, so its events stay in order.
    pub aggregate_id: Uuid,
    /// What happened (`OrderCreated`); part of the default topic.
    pub event_type: &'a str,
    /// The event body (becomes the Kafka value).
    pub payload: &'a serde_json::Value,
    /// Extra context, e.g. W3C `traceparent` / `tracestate`.
    pub metadata: Option<&'a serde_json::Value>,
}

/// Inserts an event into the outbox through `outbox_publish`, on whatever
/// client or transaction the caller passes, so the event commits (or rolls
/// back) with the caller's business change. Returns the event's tracking id.
///
/// `schema` is the schema holding the outbox (usually `public`); it must be a
/// valid identifier (see [`crate::config::validate_identifier`]).
pub async fn publish<C: GenericClient>(
    client: &C,
    schema: &str,
    event: &NewEvent<'_>,
) -> Result<Uuid, tokio_postgres::Error> {
    let empty = serde_json::Value::Object(Default::default());
    let sql = format!(
        "SELECT {}.outbox_publish($1, $2, $3, $4, $5)",
        crate::config::quote_ident(schema)
    );
    let row = client
        .query_one(
            &sql,
            &[
                &event.aggregate_type,
                &event.aggregate_id,
                &event.event_type,
                event.payload,
                event.metadata.unwrap_or(&empty),
            ],
        )
        .await?;
    row.try_get(0)
}
