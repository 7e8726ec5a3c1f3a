//! The `[database]` section: the connection URL (never printed with its
//! password), the password file, the connect timeout and the TLS settings
//! used when the URL has none.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use super::tls::{self, TlsMode, TlsSettings};
use super::url_tls::{split_tls_params, UrlTls};
use super::ConfigError;

/// The database connection URL. Its `Debug` and `Display` never show the
/// password.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Wraps a URL or libpq key/value string.
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    /// The full text, secrets included: pass it only to a connector.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Parses into a tokio-postgres configuration, without the TLS
    /// parameters (see [`DatabaseUrl::parse_with_tls`]). The error never
    /// repeats the URL.
    pub fn parse(&self) -> Result<tokio_postgres::Config, ConfigError> {
        self.parse_with_tls().map(|(pg, _)| pg)
    }

    /// Parses into a tokio-postgres configuration and libpq's TLS
    /// parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`), which
    /// tokio-postgres does not fully understand and are taken out first.
    pub fn parse_with_tls(&self) -> Result<(tokio_postgres::Config, UrlTls), ConfigError> {
        let (rest, tls) =
            split_tls_params(&self.0).map_err(|e| ConfigError::new("database.url", e))?;
        let pg = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            ConfigError::new(
                "database.url",
                format!(
                    "not a valid PostgreSQL URL or key=value string ({}); expected postgres://user:password@host:port/dbname",
                    crate::redact::error_text(&crate::redact::postgres_text(&e), &self.0)
                ),
            )
        })?;
        Ok((pg, tls))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", crate::redact::url(&self.0))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::redact::url(&self.0))
    }
}

/// PostgreSQL connection settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/dbname` (env `DATABASE_URL`).
    pub url: DatabaseUrl,
    /// A file whose first line is the password, used when the URL has none
    /// (env `DATABASE_PASSWORD_FILE`).
    pub password_file: Option<String>,
    /// Seconds to wait for a connection before giving up on one attempt.
    pub connect_timeout_s: u64,
    /// TLS mode when the URL has no `sslmode`: `disable`, `allow`,
    /// `prefer`, `require`, `verify-ca` or `verify-full` (env
    /// `DATABASE_TLS_MODE`). Unset: `prefer` for loopback hosts and Unix
    /// sockets, `verify-full` for any other host.
    pub tls_mode: Option<TlsMode>,
    /// PEM file of the CA certificates that may sign the server's
    /// certificate, or `system`, when the URL has no `sslrootcert` (env
    /// `DATABASE_TLS_ROOT_CERT`). Unset: the system's trust store.
    pub tls_root_cert: Option<String>,
    /// PEM client certificate chain, when the URL has no `sslcert` (env
    /// `DATABASE_TLS_CLIENT_CERT`).
    pub tls_client_cert: Option<String>,
    /// PEM private key of the client certificate, when the URL has no
    /// `sslkey` (env `DATABASE_TLS_CLIENT_KEY`).
    pub tls_client_key: Option<String>,
}

impl DatabaseConfig {
    /// The URL's connection settings and the TLS settings in force (the
    /// URL's parameters win over `tls_*`), checked: certificate files
    /// exist, a client certificate has its key.
    pub fn connection(&self) -> Result<(tokio_postgres::Config, TlsSettings), ConfigError> {
        let (pg, url_tls) = self.url.parse_with_tls()?;
        let tls = tls::resolve(self, url_tls, &pg)?;
        Ok((pg, tls))
    }

    /// Checks the URL (present, parseable, its TLS files readable) and the
    /// connect timeout.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.url.expose().is_empty() {
            return Err(ConfigError::new(
                "database.url",
                "is required: set DATABASE_URL or database.url (postgres://user:password@host:port/dbname)",
            ));
        }
        self.connection()?;
        if self.connect_timeout_s == 0 {
            return Err(ConfigError::new(
                "database.connect_timeout_s",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: DatabaseUrl::default(),
            password_file: None,
            connect_timeout_s: 10,
            tls_mode: None,
            tls_root_cert: None,
            tls_client_cert: None,
            tls_client_key: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{env, valid};
    use super::super::Config;
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let c = valid();
        let text = format!("{c:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("127.0.0.1"));
    }

    #[test]
    fn database_tls_keys_come_from_toml_and_env() {
        let mut c =
            Config::from_toml("[database]\ntls_mode = \"verify-ca\"\ntls_root_cert = \"system\"\n")
                .unwrap();
        assert_eq!(c.database.tls_mode, Some(TlsMode::VerifyCa));
        c.apply_env(env(&[("DATABASE_TLS_MODE", "verify-full")]))
            .unwrap();
        assert_eq!(c.database.tls_mode, Some(TlsMode::VerifyFull));
        let e = c
            .apply_env(env(&[("DATABASE_TLS_MODE", "on")]))
            .unwrap_err();
        assert_eq!(e.field, "DATABASE_TLS_MODE");
        let e = Config::from_toml("[database]\ntls_mode = \"verify_full\"\n").unwrap_err();
        assert!(e.to_string().contains("verify-full"), "{e}");
    }

    #[test]
    fn a_url_with_libpq_tls_parameters_validates() {
        let mut c = valid();
        c.database.url = DatabaseUrl::new(
            "postgres://u:secret@db.example.com/db?sslmode=verify-full&sslrootcert=system",
        );
        c.validate().unwrap();
        c.database.url = DatabaseUrl::new(
            "postgres://u:secret@h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem",
        );
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "sslrootcert in database.url");
        assert!(!e.to_string().contains("secret"));
    }
}
