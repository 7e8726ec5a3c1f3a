//! Reading a replay's rows: the selection's keys by keyset pagination, then
//! the rows by primary key, page by page, each statement in a short
//! read-only transaction under a statement timeout. Nothing is locked or
//! changed.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Transaction};

use super::selection::{condition, Param, ReplaySelection};
use super::timestamp::Timestamp;
use super::{db, ReplayError};
use crate::config::{quote_ident, ColumnMap, Role};
use crate::outbox::{select_list, select_width, OutboxEvent, TableShape};

/// Keys read per keyset statement: each one scans the selected partitions
/// once, so a large chunk keeps the scans few; 10,000 keys are about
/// 240 KB.
pub const KEY_CHUNK: usize = 10_000;

/// One selected row's primary key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayKey {
    /// `id`.
    pub id: i64,
    /// `created_at`.
    pub created_at: SystemTime,
}

/// One row read for a replay.
#[derive(Clone, Debug)]
pub struct ReplayRow {
    /// Its key.
    pub key: ReplayKey,
    /// The event, read through the column roles as every reader reads it.
    pub event: OutboxEvent,
}

/// The rows a replay reads: the table, its column roles and the selection
/// as SQL, with the end of its time range fixed.
pub struct ReplaySource {
    qualified: String,
    display: String,
    table: Bytes,
    map: ColumnMap,
    shape: TableShape,
    bytea_payload: bool,
    condition: String,
    params: Vec<Param>,
    status: &'static str,
    until: Timestamp,
    statement_timeout: Duration,
    where_given: bool,
}

/// The parameters as `query` takes them.
fn refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect()
}

impl ReplaySource {
    /// Checks `selection` and the table `schema.table` (its role columns and
    /// the row-state columns a replay reads) and fixes the end of the time
    /// range: `--to`, or the server's clock now.
    pub async fn open(
        client: &mut Client,
        schema: &str,
        table: &str,
        map: ColumnMap,
        selection: &ReplaySelection,
        statement_timeout: Duration,
    ) -> Result<ReplaySource, ReplayError> {
        selection.check()?;
        let display = format!("{schema}.{table}");
        let shape = TableShape::inspect(&*client, schema, table)
            .await
            .map_err(db("reading the outbox table's columns"))?
            .ok_or_else(|| ReplayError::NoTable(display.clone()))?;
        for gap in [shape.relay_gap(&map), shape.marking_gap()] {
            if !gap.is_empty() {
                return Err(ReplayError::TableLacks {
                    table: display,
                    gap: gap.to_string(),
                });
            }
        }
        let until = match selection.to {
            Some(to) => to,
            None => {
                let now: SystemTime = client
                    .query_one("SELECT clock_timestamp()", &[])
                    .await
                    .map_err(db("reading the server's clock"))?
                    .get(0);
                Timestamp::from_system_time(now)
            }
        };
        let aggregate_id_uuid = map
            .name(Role::AggregateId)
            .and_then(|c| shape.type_of(c))
            .is_some_and(|t| t == "uuid");
        let (condition, params) =
            condition(selection, &map, until.to_system_time(), aggregate_id_uuid)?;
        Ok(ReplaySource {
            qualified: format!("{}.{}", quote_ident(schema), quote_ident(table)),
            display,
            table: Bytes::from(table.to_owned()),
            bytea_payload: shape.bytea_payload(&map),
            map,
            shape,
            condition,
            params,
            status: selection.status.row_status(),
            until,
            statement_timeout,
            where_given: selection.condition.is_some(),
        })
    }

    /// The table's columns and types (for the record builder's layout).
    pub fn shape(&self) -> &TableShape {
        &self.shape
    }

    /// `schema.table`.
    pub fn table(&self) -> &str {
        &self.display
    }

    /// The row status selected (`COMPLETED`, `DEAD_LETTER`).
    pub fn status(&self) -> &'static str {
        self.status
    }

    /// The exclusive end of the time range: `--to`, or when the replay
    /// started.
    pub fn until(&self) -> Timestamp {
        self.until
    }

    /// A read-only transaction under the statement timeout.
    async fn read_only<'c>(&self, client: &'c mut Client) -> Result<Transaction<'c>, ReplayError> {
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(db("starting a read-only transaction"))?;
        let timeout_ms = self
            .statement_timeout
            .as_millis()
            .clamp(1, i32::MAX as u128);
        tx.execute(
            "SELECT set_config('statement_timeout', $1, true)",
            &[&format!("{timeout_ms}ms")],
        )
        .await
        .map_err(db("setting statement_timeout"))?;
        Ok(tx)
    }

    /// How many rows the selection holds now.
    pub async fn count(&self, client: &mut Client) -> Result<i64, ReplayError> {
        let sql = format!(
            "SELECT count(*) FROM {} AS o WHERE {}",
            self.qualified, self.condition
        );
        let tx = self.read_only(client).await?;
        let n: i64 = tx
            .query_one(&sql, &refs(&self.params))
            .await
            .map_err(db(&self.context("counting the rows")))?
            .get(0);
        tx.commit().await.map_err(db("ending the count"))?;
        Ok(n)
    }

    /// What a selecting statement does, naming `--where` when it is part
    /// of it (so a mistake in the condition is told apart).
    fn context(&self, doing: &'static str) -> String {
        if self.where_given {
            format!("{doing} matching --where")
        } else {
            doing.to_owned()
        }
    }

    /// Up to `limit` keys of the selection after `after`, in
    /// `(created_at, id)` order.
    async fn keys(
        &self,
        client: &mut Client,
        after: Option<ReplayKey>,
        limit: usize,
    ) -> Result<Vec<ReplayKey>, ReplayError> {
        let mut params: Vec<&(dyn ToSql + Sync)> = refs(&self.params);
        let mut sql = format!(
            "SELECT o.id::bigint, o.created_at FROM {} AS o WHERE {}",
            self.qualified, self.condition
        );
        if let Some(k) = &after {
            let (c, i) = (params.len() + 1, params.len() + 2);
            // The first condition lets PostgreSQL skip earlier partitions.
            sql.push_str(&format!(
                " AND o.created_at >= ${c} AND (o.created_at, o.id) > (${c}, ${i})"
            ));
            params.push(&k.created_at);
            params.push(&k.id);
        }
        sql.push_str(&format!(" ORDER BY o.created_at, o.id LIMIT {limit}"));
        let tx = self.read_only(client).await?;
        let rows = tx
            .query(&sql, &params)
            .await
            .map_err(db(&self.context("selecting the rows")))?;
        tx.commit().await.map_err(db("ending the key read"))?;
        Ok(rows
            .iter()
            .map(|r| ReplayKey {
                id: r.get(0),
                created_at: r.get(1),
            })
            .collect())
    }

    /// The rows of `keys` that still have the selected status, in the
    /// order of `keys`.
    async fn fetch(
        &self,
        client: &mut Client,
        keys: &[ReplayKey],
    ) -> Result<Vec<ReplayRow>, ReplayError> {
        let ids: Vec<i64> = keys.iter().map(|k| k.id).collect();
        let created: Vec<SystemTime> = keys.iter().map(|k| k.created_at).collect();
        let sql = format!(
            "SELECT {}, k.n FROM {} AS o \
               JOIN unnest($1::bigint[], $2::timestamptz[]) WITH ORDINALITY AS k(id, created_at, n) \
                 ON o.id = k.id AND o.created_at = k.created_at \
              WHERE o.status = $3 ORDER BY k.n",
            select_list(&self.map, "o"),
            self.qualified
        );
        let tx = self.read_only(client).await?;
        let rows = tx
            .query(&sql, &[&ids, &created, &self.status])
            .await
            .map_err(db("reading the rows to replay"))?;
        tx.commit().await.map_err(db("ending the row read"))?;
        let n_column = select_width(&self.map);
        Ok(rows
            .iter()
            .filter_map(|r| {
                let n: i64 = r.get(n_column);
                let key = *keys.get(usize::try_from(n - 1).ok()?)?;
                let (event, _) =
                    OutboxEvent::from_text_row(&self.map, &self.table, self.bytea_payload, |i| {
                        r.get(i)
                    });
                Some(ReplayRow { key, event })
            })
            .collect())
    }

    /// Reads the selection page by page, `page` rows at a time.
    pub fn pages(&self, page: usize) -> Pages {
        Pages {
            after: None,
            keys: VecDeque::new(),
            exhausted: false,
            page: page.max(1),
            vanished: 0,
        }
    }
}

/// Where a replay's reading is: the keys read and not yet fetched, and
/// the last key read.
pub struct Pages {
    after: Option<ReplayKey>,
    keys: VecDeque<ReplayKey>,
    exhausted: bool,
    page: usize,
    /// Selected rows whose status changed (or that were removed) before
    /// their page was read: not replayed.
    pub vanished: u64,
}

impl Pages {
    /// The next page of rows, `None` after the last. A page may be shorter
    /// than asked (rows that changed status since their key was read are
    /// left out and counted in [`Pages::vanished`]).
    pub async fn next(
        &mut self,
        source: &ReplaySource,
        client: &mut Client,
    ) -> Result<Option<Vec<ReplayRow>>, ReplayError> {
        if self.keys.is_empty() && !self.exhausted {
            let chunk = source.keys(client, self.after, KEY_CHUNK).await?;
            self.exhausted = chunk.len() < KEY_CHUNK;
            self.after = chunk.last().copied().or(self.after);
            self.keys.extend(chunk);
        }
        if self.keys.is_empty() {
            return Ok(None);
        }
        let take = self.page.min(self.keys.len());
        let keys: Vec<ReplayKey> = self.keys.drain(..take).collect();
        let rows = source.fetch(client, &keys).await?;
        self.vanished += (keys.len() - rows.len()) as u64;
        Ok(Some(rows))
    }
}
