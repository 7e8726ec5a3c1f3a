//! Which mode serves an outbox table: a session-level advisory lock per
//! table, held for as long as a relay delivers from it.
//!
//! Poll relays hold it shared (any number of pollers may share a table),
//! a CDC relay holds it exclusively. So a CDC relay waits until every poller
//! of the table has stopped, pollers wait while a CDC relay runs, and a
//! second CDC relay waits as a standby until the first one's connection
//! ends — a switch between modes never has both delivering at once. A relay
//! that waits says so, naming who holds the lock.
//!
//! The lock lives on a connection of its own. If that connection ends (the
//! server restarted, the backend was terminated) the lock is gone: the relay
//! stops delivering and takes it again before going on.

use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::config::{Config, Mode};
use crate::database::Settings;
use crate::error::Error;

/// First key of pgoutbox's two-key advisory locks ("pgob").
pub(crate) const LOCK_CLASS: i32 = 0x7067_6f62;

/// How often a waiting relay repeats who holds the lock.
const WAIT_REPORT: Duration = Duration::from_secs(30);

/// The held lock. Dropping it closes the connection, which releases it.
pub struct ServingLock {
    _client: tokio_postgres::Client,
    lost: oneshot::Receiver<()>,
}

/// The `schema.table` text the lock's second key is hashed from.
fn lock_name(config: &Config) -> String {
    format!("{}.{}", config.outbox.schema, config.outbox.table)
}

impl ServingLock {
    /// Takes the table's lock for `mode` (`Poll` shared, `Cdc` exclusive),
    /// waiting as long as another relay holds it in a conflicting way.
    /// Returns `None` when `shutdown` turned true while waiting.
    pub async fn acquire(
        pg: &Settings,
        config: &Config,
        mode: Mode,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<ServingLock>, Error> {
        let mut pg = pg.clone();
        pg.pg_mut().application_name(format!("pgoutbox-{mode}"));
        let db = |e: tokio_postgres::Error| Error::postgres("taking the serving lock", &e);
        let (client, connection) = crate::database::connect_raw(&pg).await.map_err(db)?;
        let (lost_tx, lost) = oneshot::channel();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "serving lock connection closed");
            }
            let _ = lost_tx.send(());
        });
        let name = lock_name(config);
        let shared = mode == Mode::Poll;
        let (try_sql, wait_sql) = if shared {
            (
                "SELECT pg_try_advisory_lock_shared($1, hashtext($2))",
                "SELECT pg_advisory_lock_shared($1, hashtext($2))",
            )
        } else {
            (
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                "SELECT pg_advisory_lock($1, hashtext($2))",
            )
        };
        let got: bool = client
            .query_one(try_sql, &[&LOCK_CLASS, &name])
            .await
            .map_err(db)?
            .get(0);
        if !got {
            // A standby until this returns (taken, failed or shut down).
            let _standby = Standby::enter();
            let mut report = tokio::time::interval(WAIT_REPORT);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&LOCK_CLASS, &name];
            let wait = client.query_one(wait_sql, &params);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    r = &mut wait => { r.map_err(db)?; break; }
                    _ = report.tick() => {
                        let holders = holders(&pg, &name).await;
                        tracing::warn!(
                            table = %name,
                            %mode,
                            held_by = %holders,
                            "waiting: another relay serves this table in a conflicting mode; this one starts when it stops"
                        );
                    }
                    _ = shutdown.changed() => return Ok(None),
                }
            }
        }
        tracing::info!(table = %name, %mode, "serving lock taken");
        Ok(Some(ServingLock {
            _client: client,
            lost,
        }))
    }

    /// Resolves when the lock's connection has ended, and with it the lock.
    pub async fn lost(&mut self) {
        let _ = (&mut self.lost).await;
    }
}

/// Marks the relay as a standby (`pgoutbox_standby`, `/readyz`) while alive.
struct Standby;

impl Standby {
    fn enter() -> Standby {
        crate::metrics::health().set_standby(true);
        Standby
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        crate::metrics::health().set_standby(false);
    }
}

/// Who holds the lock now, for the waiting message (best effort).
async fn holders(pg: &Settings, name: &str) -> String {
    let Ok(client) = crate::database::connect(pg).await else {
        return "unknown".into();
    };
    let rows = client
        .query(
            "SELECT a.application_name || ' pid ' || a.pid || coalesce(' from ' || host(a.client_addr), '') \
                    || ' (' || l.mode || ')' \
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
              WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::int4::oid \
                AND l.objid = hashtext($2)::oid AND l.objsubid = 2",
            &[&LOCK_CLASS, &name],
        )
        .await;
    match rows {
        Ok(rows) if !rows.is_empty() => rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join(", "),
        Ok(_) => "nobody (it is being released)".into(),
        Err(e) => format!("unknown ({})", crate::error::postgres_text(&e)),
    }
}
