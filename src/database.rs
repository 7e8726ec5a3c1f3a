//! Ordinary (non-replication) PostgreSQL connections, and the connection
//! settings (TLS included) that the replication connection shares.
//!
//! Every ordinary connection goes through [`connect`] (or [`connect_raw`]
//! when the caller polls the connection itself), so TLS, channel binding
//! and the session settings are the same everywhere.

pub mod standby;
mod tls;

use std::time::Duration;

use tokio_postgres::config::{SslMode, SslNegotiation};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Socket};

use crate::config::{Config, ConfigError, TlsMode};

pub use tls::{Connector, MaybeTls, Tls, TlsError};

/// A connection as [`connect_raw`] returns it, for callers that poll it
/// themselves (notifications).
pub type Connection = tokio_postgres::Connection<Socket, MaybeTls<Socket>>;

/// Where and how to connect: tokio-postgres's settings (host, user,
/// password, …) and the TLS policy, which tokio-postgres's `sslmode` cannot
/// express (`verify-ca`, `verify-full`, root and client certificates).
#[derive(Clone, Debug)]
pub struct Settings {
    pg: tokio_postgres::Config,
    tls: Tls,
}

impl Settings {
    /// Pairs connection settings with a TLS policy.
    pub fn new(pg: tokio_postgres::Config, tls: Tls) -> Settings {
        Settings { pg, tls }
    }

    /// The connection settings.
    pub fn pg(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// The connection settings, to change (the application name, …).
    pub fn pg_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.pg
    }

    /// The TLS policy.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }
}

/// A bare tokio-postgres configuration: TLS as its `sslmode` says, read as
/// libpq reads it without a root certificate (see [`Tls::from_ssl_mode`]).
impl From<tokio_postgres::Config> for Settings {
    fn from(pg: tokio_postgres::Config) -> Settings {
        let tls = Tls::from_ssl_mode(&pg);
        Settings { pg, tls }
    }
}

impl From<&tokio_postgres::Config> for Settings {
    fn from(pg: &tokio_postgres::Config) -> Settings {
        Settings::from(pg.clone())
    }
}

impl From<&Settings> for Settings {
    fn from(s: &Settings) -> Settings {
        s.clone()
    }
}

/// Builds connection settings from the configuration: the URL, the
/// password file when the URL has no password, a connect timeout, the
/// session settings pgoutbox relies on (UTC, ISO dates, so timestamps read
/// from the table match those decoded from the stream), and TLS (certificate
/// files are read here, so a bad one is reported before any connection).
pub fn settings(config: &Config) -> Result<Settings, ConfigError> {
    let (mut pg, tls) = config.database.connection()?;
    if pg.get_password().is_none() {
        if let Some(path) = &config.database.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new("database.password_file", format!("cannot read {path}: {e}"))
            })?;
            let password = text.lines().next().unwrap_or_default().to_owned();
            pg.password(password);
        }
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(config.database.connect_timeout_s));
    }
    if pg.get_application_name().is_none() {
        pg.application_name("pgoutbox");
    }
    let options = pg.get_options().unwrap_or_default().to_owned();
    pg.options(format!("{options} -c TimeZone=UTC -c DateStyle=ISO").trim());
    let tls = Tls::from_settings(&tls)?;
    tracing::debug!(tls = ?tls, "PostgreSQL connection settings");
    Ok(Settings { pg, tls })
}

/// One [`Settings`] per host of a multi-host `DATABASE_URL`, each with its
/// label (`host:port`), for looking at every server of the list (the
/// standbys too: `target_session_attrs` is dropped). Empty when the list
/// has one host. A connect timeout of 5 s applies when none is set.
pub fn each_host(pg: &Settings) -> Vec<(String, Settings)> {
    use tokio_postgres::config::Host;
    let base = &pg.pg;
    let hosts = base.get_hosts();
    if hosts.len() < 2 {
        return Vec::new();
    }
    let ports = base.get_ports();
    hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = match ports.len() {
                0 => 5432,
                1 => ports[0],
                _ => ports.get(i).copied().unwrap_or(5432),
            };
            let mut one = tokio_postgres::Config::new();
            let label = match host {
                Host::Tcp(name) => {
                    one.host(name);
                    format!("{name}:{port}")
                }
                #[cfg(unix)]
                Host::Unix(dir) => {
                    one.host_path(dir);
                    format!("{}:{port}", dir.display())
                }
            };
            one.port(port);
            if let Some(ip) = base.get_hostaddrs().get(i) {
                one.hostaddr(*ip);
            }
            if let Some(user) = base.get_user() {
                one.user(user);
            }
            if let Some(password) = base.get_password() {
                one.password(password);
            }
            if let Some(db) = base.get_dbname() {
                one.dbname(db);
            }
            if let Some(options) = base.get_options() {
                one.options(options);
            }
            if let Some(name) = base.get_application_name() {
                one.application_name(name);
            }
            one.ssl_mode(base.get_ssl_mode())
                .channel_binding(base.get_channel_binding())
                .connect_timeout(
                    base.get_connect_timeout()
                        .copied()
                        .unwrap_or(std::time::Duration::from_secs(5)),
                );
            (label, Settings::new(one, pg.tls.clone()))
        })
        .collect()
}

/// Connects and drives the connection on a background task.
pub async fn connect(pg: &Settings) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = connect_raw(pg).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// Connects, and leaves driving the connection to the caller. With
/// `allow`, a server that refuses the unencrypted attempt (pg_hba.conf
/// `hostssl`) is tried again with TLS.
pub async fn connect_raw(pg: &Settings) -> Result<(Client, Connection), tokio_postgres::Error> {
    match pg.tls.mode() {
        TlsMode::Allow => match connect_with(&pg.pg, &pg.tls).await {
            Err(e) if e.code() == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION) => {
                connect_with(&pg.pg, &pg.tls.upgraded()).await
            }
            other => other,
        },
        _ => connect_with(&pg.pg, &pg.tls).await,
    }
}

async fn connect_with(
    pg: &tokio_postgres::Config,
    tls: &Tls,
) -> Result<(Client, Connection), tokio_postgres::Error> {
    let mut pg = pg.clone();
    if matches!(tls.mode(), TlsMode::Disable | TlsMode::Allow) {
        pg.ssl_mode(SslMode::Disable);
    } else {
        // tokio-postgres hands the raw socket to `Tls`, which sends the
        // SSLRequest itself (see `tls`): one negotiation for both kinds of
        // connection, every libpq mode, our error messages.
        pg.ssl_mode(SslMode::Require)
            .ssl_negotiation(SslNegotiation::Direct);
    }
    pg.connect(tls.clone()).await
}
