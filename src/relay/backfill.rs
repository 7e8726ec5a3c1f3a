//! No loss at the very start: rows committed before a new slot's consistent
//! point are not in its stream, so the relay reads the ones still waiting
//! (`PENDING`, `PROCESSING`, `FAILED`) from the slot's exported snapshot and
//! publishes them, oldest first, before streaming begins. Rows committed
//! after the consistent point come from the stream, so none is missed and
//! none is read twice.

use bytes::Bytes;
use tokio::sync::watch;
use tokio_postgres::IsolationLevel;

use super::pipeline::Pipeline;
use super::progress::Progress;
use crate::config::{quote_ident, Config};
use crate::error::Error;
use crate::route::OutboxEvent;
use crate::Lsn;

const CHUNK: i32 = 1000;

/// Publishes every pending row visible in `snapshot` and waits until all are
/// durable. Returns the number of rows.
pub(super) async fn run(
    config: &Config,
    pg: &tokio_postgres::Config,
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
    let table = quote_ident(&config.outbox.table);
    let sql = format!(
        "SELECT o.id::text, o.created_at::text, o.tracking_id::text, o.aggregate_id::text, \
                o.aggregate_type, o.event_type, o.payload::text, o.metadata::text \
           FROM {}.{table} AS o \
          WHERE o.status IN ('PENDING', 'PROCESSING', 'FAILED') \
          ORDER BY o.created_at, o.id",
        quote_ident(&config.outbox.schema)
    );
    let stmt = tx.prepare(&sql).await.map_err(db)?;
    let portal = tx.bind(&stmt, &[]).await.map_err(db)?;
    let txid = progress.begin();
    let table_name = Bytes::copy_from_slice(config.outbox.table.as_bytes());
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
            pipeline.offer(progress, txid, event).await?;
            rows_read += 1;
        }
        if *shutdown.borrow() {
            return Err(Error::Transient(
                "shutdown requested during the initial backfill; it restarts on the next run"
                    .into(),
            ));
        }
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
