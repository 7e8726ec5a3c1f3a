//! The replication connection before streaming: connect, authenticate, run
//! replication commands, then hand the socket to a [`ReplicationStream`].

use postgres_protocol::message::frontend;
use tokio_postgres::config::TargetSessionAttrs;

use super::command::{self, SnapshotAction};
use super::connection::{self, BoxedSocket, Connection, StartupParams};
use super::error::{ReplicationError, ServerError};
use super::stream::ReplicationStream;
use super::wire::BackendMessage;
use crate::config::TlsMode;
use crate::database::{MaybeTls, Settings, Tls};
use crate::lsn::Lsn;

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique system identifier (a decimal number as text).
    pub system_id: String,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The database this connection is bound to (`None` on a physical
    /// replication connection).
    pub dbname: Option<String>,
}

/// The answer to `CREATE_REPLICATION_SLOT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatedSlot {
    /// The slot's name, as the server reports it.
    pub slot_name: String,
    /// The first position from which the slot streams complete transactions.
    pub consistent_point: Lsn,
    /// The exported snapshot, with [`SnapshotAction::Export`]; usable with
    /// `SET TRANSACTION SNAPSHOT` until this connection's next command.
    pub snapshot_name: Option<String>,
    /// The output plugin.
    pub plugin: String,
}

/// A walsender connection (`replication=database`) that runs replication
/// commands, and becomes a [`ReplicationStream`] with
/// [`ReplicationClient::start_logical_replication`].
///
/// Commands run one at a time. If a command fails with an I/O or protocol
/// error, or its future is dropped before it finishes, the connection is
/// left in an unknown state and every later command fails with
/// [`ReplicationError::Closed`]: reconnect.
pub struct ReplicationClient {
    conn: Connection<BoxedSocket>,
    /// Set while a command runs; still set afterwards means the command
    /// failed half-way or was cancelled.
    busy: bool,
}

impl ReplicationClient {
    /// Connects to `config`'s host (TCP host and port, or a Unix socket
    /// directory), negotiates TLS, starts a logical walsender session and
    /// authenticates (trust, cleartext password, md5, SCRAM-SHA-256, and
    /// SCRAM-SHA-256-PLUS over TLS).
    ///
    /// Several hosts (`postgres://h1:5432,h2:5432/db`, `host=h1,h2`) are
    /// tried in order, as libpq tries them: the first that accepts the
    /// session wins, and with `target_session_attrs=read-write` only a
    /// server that is not in recovery (a primary) does — so after a
    /// failover the relay finds the new primary. The error of the last host
    /// tried is returned when none will do.
    ///
    /// `config` is pgoutbox's [`Settings`] (every libpq `sslmode`, with
    /// certificate verification; see `crate::database::settings`), or a bare
    /// `tokio_postgres::Config`, whose `sslmode` is read as libpq reads it
    /// without a root certificate: `prefer` and `require` encrypt without
    /// verifying the server. `prefer` goes on unencrypted when the server
    /// does not offer TLS; `require` and stricter modes fail with
    /// [`ReplicationError::Tls`]. Unix sockets never use TLS.
    ///
    /// Each host's attempt is bounded by the configuration's
    /// `connect_timeout`, 10 seconds when unset.
    pub async fn connect(
        config: impl Into<Settings>,
    ) -> Result<ReplicationClient, ReplicationError> {
        let settings: Settings = config.into();
        let pg = settings.pg();
        let mut last = None;
        for index in 0..connection::host_count(pg) {
            match Self::connect_host(&settings, index).await {
                Ok(client) => return Ok(client),
                Err(e) => {
                    tracing::debug!(host = index, error = %e, "replication connection: trying the next host");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ReplicationError::Config("no host configured".into())))
    }

    /// One host's attempt: connect, authenticate, and with
    /// `target_session_attrs=read-write` check that it is a primary.
    async fn connect_host(
        settings: &Settings,
        index: usize,
    ) -> Result<ReplicationClient, ReplicationError> {
        let pg = settings.pg();
        let params = StartupParams::from_config(pg)?;
        let timeout = pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(connection::DEFAULT_CONNECT_TIMEOUT);
        let attempt = |tls: Tls| {
            let params = &params;
            async move {
                let (socket, host) = connection::open_socket(pg, index).await?;
                Self::handshake(socket, host.as_deref(), &tls, params).await
            }
        };
        let tls = settings.tls();
        let connect = async {
            let mut client = match tls.mode() {
                // libpq's `allow`: unencrypted first, TLS when refused.
                TlsMode::Allow => match attempt(tls.clone()).await {
                    Err(e) if e.sqlstate() == Some("28000") => attempt(tls.upgraded()).await,
                    other => other,
                },
                _ => attempt(tls.clone()).await,
            }?;
            if pg.get_target_session_attrs() == TargetSessionAttrs::ReadWrite
                && !client.is_read_write().await?
            {
                return Err(ReplicationError::ReadOnly);
            }
            Ok(client)
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ReplicationError::Timeout {
                what: "connecting and authenticating",
                after: timeout,
            })?
    }

    /// Whether the server accepts writes: not in recovery (`in_hot_standby`
    /// as PostgreSQL 14+ reports it, else `transaction_read_only`).
    async fn is_read_write(&mut self) -> Result<bool, ReplicationError> {
        if let Some(standby) = self.parameter("in_hot_standby") {
            return Ok(standby == "off");
        }
        let rows = self.simple_query("SHOW transaction_read_only").await?;
        Ok(rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .is_some_and(|v| v == "off"))
    }

    async fn handshake(
        socket: BoxedSocket,
        host: Option<&str>,
        tls: &Tls,
        params: &StartupParams,
    ) -> Result<ReplicationClient, ReplicationError> {
        let stream = match host {
            Some(host) => tls.negotiate(socket, host).await?,
            None => MaybeTls::Plain(socket),
        };
        let encrypted = stream.is_tls();
        let end_point = stream.tls_server_end_point();
        let mut conn = Connection::with_channel_binding(Box::new(stream) as BoxedSocket, end_point);
        conn.startup(params).await?;
        tracing::debug!(
            user = %params.user,
            tls = encrypted,
            server_version = conn.parameters.get("server_version").map(String::as_str),
            "replication connection ready"
        );
        Ok(ReplicationClient { conn, busy: false })
    }

    /// A run-time parameter the server reported (`ParameterStatus`), for
    /// example `server_version`, `server_encoding` or `TimeZone`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.conn.parameters.get(name).map(String::as_str)
    }

    /// The server version as a number, `150018` for 15.18 and `180000` for
    /// 18beta1: from `server_version_num` when the server reports it, else
    /// parsed from `server_version`.
    pub fn server_version_num(&self) -> Option<u32> {
        self.parameter("server_version_num")
            .and_then(|v| v.parse().ok())
            .or_else(|| {
                self.parameter("server_version")
                    .and_then(command::parse_server_version)
            })
    }

    fn begin(&mut self) -> Result<(), ReplicationError> {
        if self.busy {
            return Err(ReplicationError::Closed(
                "an earlier command on this replication connection failed or was cancelled; \
                 reconnect"
                    .into(),
            ));
        }
        self.busy = true;
        Ok(())
    }

    /// Runs `sql` with the simple query protocol and returns the rows of
    /// every result, each column as text (`None` for NULL). Works for
    /// replication commands (`IDENTIFY_SYSTEM`, `TIMELINE_HISTORY`, …) and,
    /// on a `replication=database` connection, plain SQL.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        self.begin()?;
        let outcome = self.run_query(sql).await?;
        // The server answered ReadyForQuery: the connection is usable again,
        // whether the command itself succeeded or not.
        self.busy = false;
        outcome.map_err(|e| ReplicationError::Server(Box::new(e)))
    }

    /// Runs one simple query. The outer error means the connection is broken;
    /// the inner one is an `ErrorResponse` after which it is still usable.
    async fn run_query(
        &mut self,
        sql: &str,
    ) -> Result<Result<Vec<Vec<Option<String>>>, ServerError>, ReplicationError> {
        frontend::query(sql, self.conn.write_buf())
            .map_err(|e| ReplicationError::Config(format!("query text: {e}")))?;
        self.conn.flush().await?;
        let mut rows = Vec::new();
        let mut columns = None;
        let mut error = None;
        loop {
            match self.conn.read_message().await? {
                BackendMessage::RowDescription { columns: n } => columns = Some(n),
                BackendMessage::DataRow(values) => {
                    if columns.is_some_and(|n| n != values.len()) {
                        return Err(ReplicationError::protocol(format!(
                            "DataRow has {} columns, RowDescription announced {columns:?}",
                            values.len()
                        )));
                    }
                    rows.push(values);
                }
                BackendMessage::CommandComplete(_) | BackendMessage::EmptyQueryResponse => {
                    columns = None;
                }
                BackendMessage::Error(e) => error = Some(e),
                BackendMessage::ReadyForQuery => break,
                other => {
                    return Err(ReplicationError::protocol(format!(
                        "unexpected {} in reply to a simple query (COPY and streaming \
                         commands are not supported here)",
                        connection::describe(&other)
                    )))
                }
            }
        }
        Ok(match error {
            Some(e) => Err(e),
            None => Ok(rows),
        })
    }

    /// Runs `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let [systemid, timeline, xlogpos, dbname] = single_row::<4>(rows, "IDENTIFY_SYSTEM")?;
        let timeline = required(timeline, "IDENTIFY_SYSTEM", "timeline")?;
        Ok(SystemIdentity {
            system_id: required(systemid, "IDENTIFY_SYSTEM", "systemid")?,
            timeline: timeline.parse().map_err(|_| {
                ReplicationError::protocol(format!("IDENTIFY_SYSTEM timeline {timeline:?}"))
            })?,
            xlogpos: parse_lsn(required(xlogpos, "IDENTIFY_SYSTEM", "xlogpos")?)?,
            dbname,
        })
    }

    /// Creates a logical replication slot with output plugin `plugin`
    /// (`pgoutput`). The caller validates `slot`; it is quoted here in any
    /// case. Uses `(SNAPSHOT '…')` on PostgreSQL 15 and later, the older
    /// `EXPORT_SNAPSHOT` keywords before.
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        plugin: &str,
        snapshot: SnapshotAction,
    ) -> Result<CreatedSlot, ReplicationError> {
        self.create_logical_slot_with(slot, plugin, snapshot, false)
            .await
    }

    /// [`ReplicationClient::create_logical_slot`], as a failover slot when
    /// `failover` and the server has them (PostgreSQL 17+).
    pub async fn create_logical_slot_with(
        &mut self,
        slot: &str,
        plugin: &str,
        snapshot: SnapshotAction,
        failover: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        let cmd = command::create_logical_slot(
            self.server_version_num(),
            slot,
            plugin,
            snapshot,
            failover,
        )?;
        let rows = self.simple_query(&cmd).await?;
        let [name, point, snapshot_name, plugin] =
            single_row::<4>(rows, "CREATE_REPLICATION_SLOT")?;
        Ok(CreatedSlot {
            slot_name: required(name, "CREATE_REPLICATION_SLOT", "slot_name")?,
            consistent_point: parse_lsn(required(
                point,
                "CREATE_REPLICATION_SLOT",
                "consistent_point",
            )?)?,
            snapshot_name,
            plugin: required(plugin, "CREATE_REPLICATION_SLOT", "output_plugin")?,
        })
    }

    /// Drops a replication slot. With `wait`, waits for an active slot to be
    /// released instead of failing with SQLSTATE `55006`.
    pub async fn drop_slot(&mut self, slot: &str, wait: bool) -> Result<(), ReplicationError> {
        let cmd = command::drop_slot(slot, wait)?;
        self.simple_query(&cmd).await.map(drop)
    }

    /// Starts streaming from logical slot `slot` at `start` (`Lsn::ZERO`
    /// means "from the slot's confirmed position"), passing `options` to the
    /// output plugin, for pgoutput `[("proto_version", "1"),
    /// ("publication_names", "\"outbox_pub\"")]`. Option values are sent as
    /// literals; quote publication names inside them yourself.
    ///
    /// `buffer` is the capacity of the channel between the socket reader and
    /// [`ReplicationStream::recv`] (at least 1). When it is full the reader
    /// stops reading the socket: that is the backpressure. Feedback is sent
    /// by a separate task and is never held up by a full channel.
    ///
    /// A missing slot fails with a [`ReplicationError::Server`] whose
    /// SQLSTATE is `42704`; a slot in use by another connection with `55006`.
    pub async fn start_logical_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
        buffer: usize,
    ) -> Result<ReplicationStream, ReplicationError> {
        let cmd = command::start_logical_replication(slot, start, options)?;
        self.begin()?;
        frontend::query(&cmd, self.conn.write_buf())
            .map_err(|e| ReplicationError::Config(format!("START_REPLICATION text: {e}")))?;
        self.conn.flush().await?;
        // Notices and parameter changes are handled inside read_message.
        match self.conn.read_message().await? {
            BackendMessage::CopyBothResponse => {}
            BackendMessage::Error(e) => {
                // ReadyForQuery normally follows; the error is what matters.
                let _ = self.conn.read_message().await;
                return Err(ReplicationError::Server(Box::new(e)));
            }
            other => {
                return Err(ReplicationError::protocol(format!(
                    "unexpected {} in reply to START_REPLICATION",
                    connection::describe(&other)
                )))
            }
        }
        tracing::info!(slot, %start, "logical replication started");
        let (socket, already_read) = self.conn.into_parts();
        Ok(ReplicationStream::spawn(
            socket,
            already_read,
            buffer.max(1),
        ))
    }
}

fn single_row<const N: usize>(
    rows: Vec<Vec<Option<String>>>,
    what: &str,
) -> Result<[Option<String>; N], ReplicationError> {
    let mut rows = rows.into_iter();
    let (Some(row), None) = (rows.next(), rows.next()) else {
        return Err(ReplicationError::protocol(format!(
            "{what} did not return exactly one row"
        )));
    };
    row.try_into().map_err(|row: Vec<_>| {
        ReplicationError::protocol(format!(
            "{what} returned {} columns, expected {N}",
            row.len()
        ))
    })
}

fn required(v: Option<String>, what: &str, column: &str) -> Result<String, ReplicationError> {
    v.ok_or_else(|| ReplicationError::protocol(format!("{what} returned NULL for {column}")))
}

fn parse_lsn(text: String) -> Result<Lsn, ReplicationError> {
    text.parse()
        .map_err(|e| ReplicationError::protocol(format!("server sent a bad LSN: {e}")))
}
