//! No loss at the very start: rows committed before a new slot's consistent
//! point are not in its stream, so the relay reads the ones still waiting
//! (`PENDING`, `PROCESSING`, `FAILED`) from the slot's exported snapshot and
//! publishes them, oldest first, before streaming begins. A table without
//! the row-state columns (`status`, `id`, `created_at`) cannot say which
//! rows are waiting: its rows are not backfilled, and the relay says so. Rows committed
//! after the consistent point come from the stream, so none is missed and
//! none is read twice.
//!
//! The whole backfill is one pipeline transaction that "commits" at the
//! consistent point: the slot is confirmed past it only once every row is
//! durable. Where the rows come from is a [`PendingRows`] source, so the
//! publishing half is tested without a database.

use bytes::Bytes;
use tokio::sync::watch;

use crate::config::ColumnMap;
use crate::config::{quote_ident, Config};
use crate::error::Error;
use crate::outbox::{select_list, OutboxEvent, RowKey};
use crate::pipeline::{Pipeline, Source};
use crate::Lsn;

/// Rows fetched per round trip.
const CHUNK: u32 = 1000;

/// Pending rows, chunk by chunk, oldest first.
pub(super) trait PendingRows {
    /// The next chunk; `None` when every row has been read.
    async fn next_chunk(&mut self) -> Result<Option<Vec<(OutboxEvent, RowKey)>>, Error>;
}

/// Publishes every row of `rows` as one transaction that commits at
/// `consistent_point`, and waits until all are durable. Returns the number
/// of rows.
pub(super) async fn run(
    rows: &mut impl PendingRows,
    consistent_point: Lsn,
    pipeline: &mut Pipeline,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<u64, Error> {
    let interrupted = || {
        Error::Transient(
            "shutdown requested during the initial backfill; it restarts on the next run".into(),
        )
    };
    let tx = pipeline.begin_backfill(consistent_point);
    let mut read = 0u64;
    while let Some(chunk) = rows.next_chunk().await? {
        for (event, key) in chunk {
            pipeline.wait_for_room().await?;
            pipeline.drain()?;
            pipeline.offer(tx, event, Source::Row(key)).await?;
            read += 1;
        }
        if *shutdown.borrow() {
            return Err(interrupted());
        }
    }
    pipeline.commit(tx, consistent_point);
    pipeline.end_backfill();
    let far = tokio::time::Instant::now() + std::time::Duration::from_secs(365 * 24 * 3600);
    tokio::select! {
        settled = pipeline.settle(far) => { settled?; }
        _ = shutdown.changed() => return Err(interrupted()),
    }
    pipeline.backfill_done();
    Ok(read)
}

/// The pending rows of every outbox table of the publication, read inside
/// the new slot's exported snapshot through a cursor per table.
pub(super) struct SnapshotRows {
    client: tokio_postgres::Client,
    map: ColumnMap,
    /// Tables still to read, last first, each with whether its payload is
    /// bytea.
    tables: Vec<(String, String, bool)>,
    /// The table the open cursor reads, its payload's kind and its rows'
    /// [`RowKey::table`].
    current: Option<(Bytes, bool, Option<std::sync::Arc<str>>)>,
    /// The relay's own outbox table (schema, table).
    home: (String, String),
}

fn db(e: tokio_postgres::Error) -> Error {
    Error::postgres("backfilling pending rows", &e)
}

impl SnapshotRows {
    /// Opens a read-only repeatable-read transaction on `snapshot` and finds
    /// every outbox table of the publication (the configured one and any
    /// other table carrying the mapped and row-state columns).
    pub(super) async fn open(
        config: &Config,
        map: &ColumnMap,
        pg: &crate::database::Settings,
        snapshot: &str,
    ) -> Result<SnapshotRows, Error> {
        let client = crate::database::connect(pg).await.map_err(db)?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
                snapshot.replace('\'', "''")
            ))
            .await
            .map_err(db)?;
        let columns: Vec<&str> = map
            .required_columns()
            .chain(["status", "id", "created_at"])
            .collect();
        let payload = map.name(crate::config::Role::Payload).unwrap_or("payload");
        let rows = client
            .query(
                "SELECT t.schemaname::text, t.tablename::text, \
                        (SELECT count(DISTINCT c.column_name) FROM information_schema.columns c \
                          WHERE c.table_schema = t.schemaname AND c.table_name = t.tablename \
                            AND c.column_name::text = ANY($2::text[])) = cardinality(ARRAY(SELECT DISTINCT unnest($2::text[]))), \
                        EXISTS (SELECT 1 FROM information_schema.columns c \
                          WHERE c.table_schema = t.schemaname AND c.table_name = t.tablename \
                            AND c.column_name::text = $3 AND c.data_type = 'bytea') \
                   FROM pg_publication_tables t WHERE t.pubname = $1 ORDER BY 1, 2",
                &[&config.cdc.publication, &columns, &payload],
            )
            .await
            .map_err(db)?;
        let mut tables = Vec::new();
        for r in &rows {
            let (schema, table, complete, bytea): (String, String, bool, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if complete {
                tables.push((schema, table, bytea));
            } else if schema == config.outbox.schema && table == config.outbox.table {
                tracing::warn!(
                    table = %format!("{schema}.{table}"),
                    "the outbox table has no status, id and created_at columns, so the rows already in it when the slot was created cannot be told apart from delivered ones: they are not backfilled; only rows inserted from now on are relayed"
                );
            }
        }
        tables.reverse();
        Ok(SnapshotRows {
            client,
            map: map.clone(),
            tables,
            current: None,
            home: (config.outbox.schema.clone(), config.outbox.table.clone()),
        })
    }

    /// Ends the snapshot's transaction.
    pub(super) async fn close(self) -> Result<(), Error> {
        self.client.batch_execute("COMMIT").await.map_err(db)
    }
}

impl PendingRows for SnapshotRows {
    async fn next_chunk(&mut self) -> Result<Option<Vec<(OutboxEvent, RowKey)>>, Error> {
        loop {
            let (table, bytea, key_table) = match &self.current {
                Some(t) => t.clone(),
                None => {
                    let Some((schema, table, bytea)) = self.tables.pop() else {
                        return Ok(None);
                    };
                    // A row the delivery journal lists was delivered: not
                    // sent again (ARCHITECTURE.md, invariant 14).
                    let undelivered = if crate::outbox::journal::usable(&self.client, &schema)
                        .await
                        .map_err(db)?
                    {
                        let j = crate::outbox::journal::Journal::new(&schema, &table);
                        format!(" AND {}", j.undelivered("o"))
                    } else {
                        String::new()
                    };
                    let sql = format!(
                        "DECLARE pgoutbox_backfill NO SCROLL CURSOR FOR \
                         SELECT {} FROM {}.{} AS o \
                          WHERE o.status IN ('PENDING', 'PROCESSING', 'FAILED'){undelivered} \
                          ORDER BY o.created_at, o.id",
                        select_list(&self.map, "o"),
                        quote_ident(&schema),
                        quote_ident(&table)
                    );
                    self.client.batch_execute(&sql).await.map_err(db)?;
                    let name = Bytes::copy_from_slice(table.as_bytes());
                    let key_table =
                        crate::outbox::key_table(&schema, &table, (&self.home.0, &self.home.1));
                    self.current = Some((name.clone(), bytea, key_table.clone()));
                    (name, bytea, key_table)
                }
            };
            let rows = self
                .client
                .query(&format!("FETCH {CHUNK} FROM pgoutbox_backfill"), &[])
                .await
                .map_err(db)?;
            if rows.is_empty() {
                self.client
                    .batch_execute("CLOSE pgoutbox_backfill")
                    .await
                    .map_err(db)?;
                self.current = None;
                continue;
            }
            let events = rows
                .iter()
                .map(|row| {
                    let (event, mut key) =
                        OutboxEvent::from_text_row(&self.map, &table, bytea, |i| row.get(i));
                    key.table.clone_from(&key_table);
                    (event, key)
                })
                .collect();
            return Ok(Some(events));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::pipeline::testing::{event, Rig, RigOptions};

    /// Rows from memory, in chunks.
    struct Chunks(VecDeque<Vec<(OutboxEvent, RowKey)>>);

    impl PendingRows for Chunks {
        async fn next_chunk(&mut self) -> Result<Option<Vec<(OutboxEvent, RowKey)>>, Error> {
            Ok(self.0.pop_front())
        }
    }

    fn chunks(rows: u64, per_chunk: u64) -> Chunks {
        let all: Vec<(OutboxEvent, RowKey)> = (1..=rows)
            .map(|i| {
                let e = event(i, &format!("agg-{}", i % 7));
                let key = RowKey {
                    table: None,
                    id: e.id.clone(),
                    created_at: e.created_at.clone(),
                };
                (e, key)
            })
            .collect();
        Chunks(all.chunks(per_chunk as usize).map(<[_]>::to_vec).collect())
    }

    #[tokio::test]
    async fn every_pending_row_is_sent_in_order_and_confirmed_at_the_consistent_point() {
        let mut r = Rig::new(RigOptions {
            max_events: 50,
            instant: true,
            ..RigOptions::default()
        });
        let (_stop, mut shutdown) = watch::channel(false);
        let n = run(
            &mut chunks(2_500, 1_000),
            Lsn(900),
            &mut r.pipeline,
            &mut shutdown,
        )
        .await
        .unwrap();
        assert_eq!(n, 2_500);
        let keys: Vec<bytes::Bytes> = r.sent().into_iter().map(|(_, rec)| rec.key).collect();
        let expected: Vec<bytes::Bytes> = (1..=2_500u64)
            .map(|i| bytes::Bytes::from(format!("agg-{}", i % 7)))
            .collect();
        assert_eq!(
            keys, expected,
            "every row, oldest first, through a window of 50"
        );
        assert_eq!(r.marked("completed").len(), 2_500, "every row marked");
        assert_eq!(r.pipeline.flushed(), Lsn(900));
        assert_eq!(r.pipeline.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_backfill_stopped_half_way_confirms_nothing() {
        let mut r = Rig::new(RigOptions {
            instant: true,
            ..RigOptions::default()
        });
        let (stop, mut shutdown) = watch::channel(false);
        stop.send(true).unwrap();
        let e = run(
            &mut chunks(300, 100),
            Lsn(900),
            &mut r.pipeline,
            &mut shutdown,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Transient(_)), "{e}");
        assert_eq!(r.sent().len(), 100, "stopped after the first chunk");
        assert_eq!(
            r.pipeline.flushed(),
            Lsn(100),
            "the slot's start, not the consistent point"
        );
    }

    #[tokio::test]
    async fn nothing_pending_confirms_the_consistent_point_at_once() {
        let mut r = Rig::new(RigOptions::default());
        let (_stop, mut shutdown) = watch::channel(false);
        let n = run(
            &mut Chunks(VecDeque::new()),
            Lsn(900),
            &mut r.pipeline,
            &mut shutdown,
        )
        .await
        .unwrap();
        assert_eq!(n, 0);
        assert_eq!(r.pipeline.flushed(), Lsn(900));
    }
}
