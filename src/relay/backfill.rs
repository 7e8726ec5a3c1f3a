//! No loss at the very start: rows committed before a new slot's consistent
//! point are not in its stream, so the relay reads the ones still waiting
//! (`PENDING`, `PROCESSING`, `FAILED`) from the slot's exported snapshot and
//! publishes them, oldest first, before streaming begins. Rows committed
//! after the consistent point come from the stream, so none is missed and
//! none is read twice.

use bytes::Bytes;
use tokio::sync::watch;
use tokio_postgres::IsolationLevel;

use super::pipeline::{Pipeline, Source};
use super::progress::Progress;
use crate::config::{quote_ident, Config};
use crate::error::Error;
use crate::outbox::RowKey;
use crate::route::OutboxEvent;
use crate::Lsn;

const CHUNK: i32 = 1000;

/// Publishes every pending row visible in `snapshot` and waits until all are
/// durable. Returns the number of rows.
pub(super) async fn run(
    config: &Config,
    pg: &crate::database::Settings,
    snapshot: &str,
    consistent_point: Lsn,
    pipeline: &mut Pipeline,
    progress: &mut Progress,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<u64, Error> {
    let db = |e: tokio_postgres::Error| Error::postgres("backfilling pending rows", &e);
    let mut client = crate::database::connect(pg).await.map_err(db)?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db)?;
    tx.batch_execute(&format!(
        "SET TRANSACTION SNAPSHOT '{}'",
        snapshot.replace('\'', "''")
    ))
    .await
    .map_err(db)?;
    // Every outbox table of the publication (the configured one and any
    // other table carrying the outbox columns).
    let tables: Vec<(String, String)> = tx
        .query(
            "SELECT t.schemaname::text, t.tablename::text FROM pg_publication_tables t \
              WHERE t.pubname = $1 AND (SELECT count(*) FROM information_schema.columns c \
                     WHERE c.table_schema = t.schemaname AND c.table_name = t.tablename \
                       AND c.column_name IN ('id', 'created_at', 'tracking_id', 'aggregate_id', \
                           'aggregate_type', 'event_type', 'payload', 'metadata', 'status')) = 9 \
              ORDER BY 1, 2",
            &[&config.cdc.publication],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let txid = progress.begin();
    let mut rows_read = 0u64;
    for (schema, table) in &tables {
        rows_read += backfill_table(&tx, schema, table, txid, pipeline, progress, shutdown).await?;
    }
    tx.commit().await.map_err(db)?;
    progress.commit(txid, consistent_point);
    let far = tokio::time::Instant::now() + std::time::Duration::from_secs(365 * 24 * 3600);
    tokio::select! {
        settled = pipeline.settle(progress, far) => { settled?; }
        _ = shutdown.changed() => {
            return Err(Error::Transient("shutdown requested during the initial backfill; it restarts on the next run".into()));
        }
    }
    Ok(rows_read)
}

/// Publishes the pending rows of one table, oldest first.
async fn backfill_table(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    table: &str,
    txid: super::progress::TxId,
    pipeline: &mut Pipeline,
    progress: &mut Progress,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<u64, Error> {
    let db = |e: tokio_postgres::Error| Error::postgres("backfilling pending rows", &e);
    let sql = format!(
        "SELECT o.id::text, o.created_at::text, o.tracking_id::text, o.aggregate_id::text, \
                o.aggregate_type, o.event_type, o.payload::text, o.metadata::text \
           FROM {}.{} AS o \
          WHERE o.status IN ('PENDING', 'PROCESSING', 'FAILED') \
          ORDER BY o.created_at, o.id",
        quote_ident(schema),
        quote_ident(table)
    );
    let stmt = tx.prepare(&sql).await.map_err(db)?;
    let portal = tx.bind(&stmt, &[]).await.map_err(db)?;
    let table_name = Bytes::copy_from_slice(table.as_bytes());
    let mut rows_read = 0u64;
    loop {
        let rows = tx.query_portal(&portal, CHUNK).await.map_err(db)?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let text = |i: usize| -> Bytes {
                Bytes::from(row.get::<_, Option<String>>(i).unwrap_or_default())
            };
            let event = OutboxEvent {
                table: table_name.clone(),
                id: text(0),
                created_at: text(1),
                tracking_id: text(2),
                aggregate_id: text(3),
                aggregate_type: text(4),
                event_type: text(5),
                payload: text(6),
                metadata: row.get::<_, Option<String>>(7).map(Bytes::from),
            };
            while !pipeline.has_room() {
                if !pipeline.next(progress).await? {
                    return Err(Error::Transient(
                        "the Kafka producer went away during the backfill".into(),
                    ));
                }
            }
            pipeline.drain(progress)?;
            let key = RowKey {
                id: event.id.clone(),
                created_at: event.created_at.clone(),
            };
            pipeline
                .offer(progress, txid, event, Source::Row(key))
                .await?;
            rows_read += 1;
        }
        if *shutdown.borrow() {
            return Err(Error::Transient(
                "shutdown requested during the initial backfill; it restarts on the next run"
                    .into(),
            ));
        }
    }
    Ok(rows_read)
}
