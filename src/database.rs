//! Ordinary (non-replication) PostgreSQL connections.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::config::{Config, ConfigError};

/// Builds connection settings from the configuration: the URL, the
/// password file when the URL has no password, a connect timeout, and the
/// session settings pgoutbox relies on (UTC, ISO dates), so timestamps read
/// from the table match those decoded from the stream.
pub fn settings(config: &Config) -> Result<tokio_postgres::Config, ConfigError> {
    let mut pg = config.database.url.parse()?;
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
    Ok(pg)
}

/// Connects and drives the connection on a background task.
pub async fn connect(pg: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}
