//! TLS settings of the PostgreSQL connections, as a libpq user writes them.
//!
//! libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` are accepted in
//! `database.url` (URL query or key=value string); `database.tls_mode`,
//! `tls_root_cert`, `tls_client_cert` and `tls_client_key` (or their
//! `DATABASE_TLS_*` variables) apply where the URL says nothing, as
//! `PGSSLMODE` and friends do for libpq: **the URL wins**, parameter by
//! parameter. tokio-postgres's own parser knows neither `verify-ca` nor
//! `verify-full`, so these parameters are taken out of the text first (see
//! `url_tls.rs`), before the rest goes to `tokio_postgres::Config::from_str`.
//!
//! With nothing set, loopback hosts and Unix sockets get `prefer` and every
//! other host `verify-full`: the relay usually runs next to a database it
//! reaches over a network it does not control.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use tokio_postgres::config::{ChannelBinding, Host, SslNegotiation};

use super::url_tls::UrlTls;
use super::{ConfigError, DatabaseConfig};

/// libpq's `sslmode`, weakest first.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Never encrypt.
    Disable,
    /// Connect without TLS; retry with TLS (unverified) only when the
    /// server refuses an unencrypted connection.
    Allow,
    /// Use TLS when the server offers it, without verifying its
    /// certificate; connect without TLS when it does not.
    Prefer,
    /// Always encrypt; verify nothing (unless a root certificate is given:
    /// then, as in libpq, the chain is verified as with `verify-ca`).
    Require,
    /// Always encrypt, and check that a trusted CA signed the server's
    /// certificate (not which host it names).
    VerifyCa,
    /// Always encrypt, check the chain, and check that the certificate names
    /// the host connected to (DNS or IP subject alternative name).
    VerifyFull,
}

impl TlsMode {
    /// The libpq name.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Allow => "allow",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    /// True when a connection without TLS is refused.
    pub fn requires_tls(self) -> bool {
        self >= TlsMode::Require
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "disable" => Ok(TlsMode::Disable),
            "allow" => Ok(TlsMode::Allow),
            "prefer" => Ok(TlsMode::Prefer),
            "require" => Ok(TlsMode::Require),
            "verify-ca" => Ok(TlsMode::VerifyCa),
            "verify-full" => Ok(TlsMode::VerifyFull),
            other => Err(format!(
                "{other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )),
        }
    }
}

/// Where the root certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCerts {
    /// A PEM file of CA certificates.
    File(String),
    /// The operating system's trust store (`sslrootcert=system`, or no root
    /// certificate with a verifying mode).
    System,
}

/// One TLS setting and the field it came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sourced<T> {
    /// The value.
    pub value: T,
    /// `database.tls_root_cert`, `sslrootcert in database.url`, …
    pub field: String,
}

/// The TLS settings in force after merging the URL's parameters over
/// `database.tls_*` and applying the host-dependent default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// The mode, and why (`database.tls_mode`, `sslmode in database.url`, or
    /// the default for the host).
    pub mode: Sourced<TlsMode>,
    /// CA certificates; `None` when the mode verifies nothing.
    pub root_certs: Option<Sourced<RootCerts>>,
    /// Client certificate chain (PEM), for `cert` authentication.
    pub client_cert: Option<Sourced<String>>,
    /// The client certificate's private key (PEM).
    pub client_key: Option<Sourced<String>>,
    /// `channel_binding` from the URL.
    pub channel_binding: ChannelBinding,
}

impl TlsSettings {
    /// A sentence naming the mode and its source, e.g. `database.tls_mode
    /// is require`.
    pub fn mode_origin(&self) -> String {
        format!("{} is {}", self.mode.field, self.mode.value)
    }
}

/// True for hosts that never leave the machine: loopback addresses,
/// `localhost` and Unix sockets.
fn is_local(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

/// Merges `url` over `db`'s keys for the hosts of `pg`, and checks what can
/// be checked without connecting: files exist, a certificate has its key,
/// the combination makes sense.
pub fn resolve(
    db: &DatabaseConfig,
    url: UrlTls,
    pg: &tokio_postgres::Config,
) -> Result<TlsSettings, ConfigError> {
    let hosts = pg.get_hosts();
    let mode = effective_mode(url.mode, db.tls_mode, pg);
    let root = pick(
        url.root_cert,
        &db.tls_root_cert,
        "sslrootcert",
        "database.tls_root_cert",
    );
    let client_cert = pick(
        url.client_cert,
        &db.tls_client_cert,
        "sslcert",
        "database.tls_client_cert",
    );
    let client_key = pick(
        url.client_key,
        &db.tls_client_key,
        "sslkey",
        "database.tls_client_key",
    );
    let channel_binding = pg.get_channel_binding();

    if pg.get_ssl_negotiation() == SslNegotiation::Direct {
        return Err(ConfigError::new(
            "database.url",
            "sslnegotiation=direct is not supported; remove it (the standard SSLRequest negotiation is used)",
        ));
    }
    if mode.value != TlsMode::Disable && hosts.iter().any(|h| matches!(h, Host::Unix(_))) {
        return Err(ConfigError::new(
            "database.url",
            "lists both Unix-socket and TCP hosts with TLS on; list one kind, or set sslmode=disable",
        ));
    }
    if channel_binding == ChannelBinding::Require && mode.value == TlsMode::Disable {
        return Err(ConfigError::new(
            "database.url",
            format!(
                "channel_binding=require needs TLS, but {} is disable",
                mode.field
            ),
        ));
    }
    check_client_pair(&client_cert, &client_key)?;
    let root_certs = root_certs(root, mode.value)?;
    Ok(TlsSettings {
        mode,
        root_certs,
        client_cert,
        client_key,
        channel_binding,
    })
}

/// A setting from the URL (named `name` there) if it has one, else from the
/// `database.*` key `field`.
fn pick(
    from_url: Option<String>,
    key: &Option<String>,
    name: &str,
    field: &str,
) -> Option<Sourced<String>> {
    match (from_url, key) {
        (Some(v), _) => Some(Sourced {
            value: v,
            field: format!("{name} in database.url"),
        }),
        (None, Some(v)) => Some(Sourced {
            value: v.clone(),
            field: field.to_owned(),
        }),
        (None, None) => None,
    }
}

/// The TLS mode in force: the URL's `sslmode`, else `database.tls_mode`,
/// else `prefer` for loopback hosts and `verify-full` for others; always
/// `disable` when every host is a Unix socket.
fn effective_mode(
    from_url: Option<TlsMode>,
    key: Option<TlsMode>,
    pg: &tokio_postgres::Config,
) -> Sourced<TlsMode> {
    let hosts = pg.get_hosts();
    let all_unix = !hosts.is_empty() && hosts.iter().all(|h| matches!(h, Host::Unix(_)));
    let local = if hosts.is_empty() {
        pg.get_hostaddrs().iter().all(|ip| ip.is_loopback())
    } else {
        hosts.iter().all(is_local)
    };
    let mode = match (from_url, key) {
        (Some(m), _) => Sourced {
            value: m,
            field: "sslmode in database.url".into(),
        },
        (None, Some(m)) => Sourced {
            value: m,
            field: "database.tls_mode".into(),
        },
        (None, None) if local => Sourced {
            value: TlsMode::Prefer,
            field: "database.tls_mode, by default for a loopback host,".into(),
        },
        (None, None) => Sourced {
            value: TlsMode::VerifyFull,
            field: "database.tls_mode, by default for a non-loopback host,".into(),
        },
    };
    // libpq ignores TLS settings for Unix sockets; so do we.
    if all_unix {
        Sourced {
            value: TlsMode::Disable,
            field: "TLS over a Unix socket".into(),
        }
    } else {
        mode
    }
}

/// Checks the client certificate and key: their files exist, and neither is
/// set without the other.
fn check_client_pair(
    client_cert: &Option<Sourced<String>>,
    client_key: &Option<Sourced<String>>,
) -> Result<(), ConfigError> {
    for file in [client_cert, client_key].into_iter().flatten() {
        check_file(file)?;
    }
    match (client_cert, client_key) {
        (Some(c), None) => Err(ConfigError::new(
            &c.field,
            "is set but the client key is not; set database.tls_client_key (or sslkey) too",
        )),
        (None, Some(k)) => Err(ConfigError::new(
            &k.field,
            "is set but the client certificate is not; set database.tls_client_cert (or sslcert) too",
        )),
        _ => Ok(()),
    }
}

/// The root certificates for `mode`: `root` (its file checked whatever the
/// mode), none when `mode` does not verify, the system's store when it must
/// verify and `root` is unset.
fn root_certs(
    root: Option<Sourced<String>>,
    mode: TlsMode,
) -> Result<Option<Sourced<RootCerts>>, ConfigError> {
    let root_certs = match root {
        Some(r) if r.value == "system" => Some(Sourced {
            value: RootCerts::System,
            field: r.field,
        }),
        Some(r) => {
            check_file(&r)?;
            Some(Sourced {
                value: RootCerts::File(r.value),
                field: r.field,
            })
        }
        None => None,
    };
    Ok(match mode {
        TlsMode::Disable | TlsMode::Allow | TlsMode::Prefer => None,
        // libpq: with a root certificate, `require` verifies the chain.
        TlsMode::Require => root_certs,
        TlsMode::VerifyCa | TlsMode::VerifyFull => Some(root_certs.unwrap_or(Sourced {
            value: RootCerts::System,
            field: "the system's trust store (no database.tls_root_cert)".into(),
        })),
    })
}

fn check_file(file: &Sourced<String>) -> Result<(), ConfigError> {
    match std::fs::metadata(Path::new(&file.value)) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::new(
            &file.field,
            format!("{} is not a file", file.value),
        )),
        Err(e) => Err(ConfigError::new(
            &file.field,
            format!("cannot read {}: {e}", file.value),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::url_tls::split_tls_params;
    use super::*;

    #[test]
    fn every_libpq_sslmode_parses_and_nothing_else_does() {
        for (text, mode) in [
            ("disable", TlsMode::Disable),
            ("allow", TlsMode::Allow),
            ("prefer", TlsMode::Prefer),
            ("require", TlsMode::Require),
            ("verify-ca", TlsMode::VerifyCa),
            ("verify-full", TlsMode::VerifyFull),
        ] {
            assert_eq!(text.parse::<TlsMode>(), Ok(mode));
            assert_eq!(mode.to_string(), text);
        }
        let e = "verify_full".parse::<TlsMode>().unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
        assert!(TlsMode::VerifyCa.requires_tls() && !TlsMode::Prefer.requires_tls());
    }

    fn resolve_for(url: &str, db: DatabaseConfig) -> Result<TlsSettings, ConfigError> {
        let (rest, tls) = split_tls_params(url).unwrap();
        resolve(&db, tls, &rest.parse().unwrap())
    }

    #[test]
    fn default_is_prefer_on_loopback_and_verify_full_elsewhere() {
        for url in [
            "postgres://127.0.0.1/db",
            "postgres://localhost/db",
            "postgres://[::1]/db",
            "host=127.0.0.2 dbname=db",
        ] {
            let t = resolve_for(url, DatabaseConfig::default()).unwrap();
            assert_eq!(t.mode.value, TlsMode::Prefer, "{url}");
            assert_eq!(t.root_certs, None, "{url}");
        }
        let t = resolve_for("postgres://db.example.com/db", DatabaseConfig::default()).unwrap();
        assert_eq!(t.mode.value, TlsMode::VerifyFull);
        assert_eq!(t.root_certs.unwrap().value, RootCerts::System);
        let t = resolve_for("host=/var/run/postgresql", DatabaseConfig::default()).unwrap();
        assert_eq!(t.mode.value, TlsMode::Disable);
    }

    #[test]
    fn the_url_wins_over_database_tls_keys() {
        let db = DatabaseConfig {
            tls_mode: Some(TlsMode::VerifyFull),
            ..DatabaseConfig::default()
        };
        let t = resolve_for("postgres://db.example.com/db?sslmode=require", db.clone()).unwrap();
        assert_eq!(t.mode.value, TlsMode::Require);
        assert_eq!(t.mode_origin(), "sslmode in database.url is require");
        let t = resolve_for("postgres://127.0.0.1/db", db).unwrap();
        assert_eq!(t.mode_origin(), "database.tls_mode is verify-full");
    }

    #[test]
    fn a_missing_certificate_file_names_its_field() {
        let db = DatabaseConfig {
            tls_root_cert: Some("/nonexistent/ca.pem".into()),
            ..DatabaseConfig::default()
        };
        let e = resolve_for("postgres://h/db?sslmode=verify-ca", db).unwrap_err();
        assert_eq!(e.field, "database.tls_root_cert");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let e = resolve_for(
            "postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent/x.pem",
            DatabaseConfig::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "sslrootcert in database.url");
        assert_eq!(e.to_string().lines().count(), 1);
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let me = file!();
        let cert = format!("{}/{me}", env!("CARGO_MANIFEST_DIR"));
        let db = DatabaseConfig {
            tls_client_cert: Some(cert),
            ..DatabaseConfig::default()
        };
        let e = resolve_for("postgres://h/db", db).unwrap_err();
        assert_eq!(e.field, "database.tls_client_cert");
        assert!(e.problem.contains("tls_client_key"), "{e}");
    }

    #[test]
    fn channel_binding_require_without_tls_is_refused() {
        let e = resolve_for(
            "postgres://h/db?sslmode=disable&channel_binding=require",
            DatabaseConfig::default(),
        )
        .unwrap_err();
        assert!(e.problem.contains("channel_binding=require"), "{e}");
    }

    #[test]
    fn require_verifies_the_chain_only_when_given_a_root_certificate() {
        let t = resolve_for("postgres://h/db?sslmode=require", DatabaseConfig::default()).unwrap();
        assert_eq!(t.root_certs, None);
        let t = resolve_for(
            "postgres://h/db?sslmode=require&sslrootcert=system",
            DatabaseConfig::default(),
        )
        .unwrap();
        assert_eq!(t.root_certs.unwrap().value, RootCerts::System);
    }
}
