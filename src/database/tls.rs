//! TLS to PostgreSQL with rustls, for the ordinary connections
//! (tokio-postgres) and the replication connection (our own client) alike.
//!
//! [`Tls::negotiate`] does what libpq does on a fresh socket: it sends an
//! `SSLRequest`, reads the server's one-byte answer, and either runs the
//! rustls handshake (`S`) or, when the mode allows it, goes on unencrypted
//! (`N`). Only that one byte is read before the handshake, so nothing the
//! server (or a man in the middle) sent ahead can be mistaken for data that
//! came through TLS.
//!
//! tokio-postgres is given this negotiation through its `sslnegotiation =
//! direct` path: with `sslmode = require` and direct negotiation it hands
//! the raw socket straight to our `TlsConnect`, which then sends the
//! `SSLRequest` itself. So both kinds of connection share one negotiation,
//! one set of verifiers and the same error messages.
//!
//! | mode | certificate check |
//! |---|---|
//! | `prefer`, `allow`, `require` | none (`require` with a root certificate: as `verify-ca`, like libpq) |
//! | `verify-ca` | signed by a trusted CA |
//! | `verify-full` | signed by a trusted CA and names the host (DNS or IP subject alternative name) |
//!
//! The handshake signature is always checked against the certificate the
//! server presented, so SCRAM channel binding (`tls-server-end-point`,
//! RFC 5929) exposes a man in the middle even when the chain is not
//! verified.
mod stream;
mod verify;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::{ChannelBinding as ChannelBindingMode, SslMode};

use crate::config::{ConfigError, TlsMode, TlsSettings};
pub use stream::MaybeTls;
use verify::{client_config, load_client_identity, load_roots, Verification};

/// The TLS policy of connections to PostgreSQL: the mode, and the rustls
/// configuration (roots, verifier, client certificate) built once from the
/// settings. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    mode: TlsMode,
    /// Why this mode, for error messages: `database.tls_mode is require`.
    origin: String,
    channel_binding: ChannelBindingMode,
    /// Where the roots came from, for error messages.
    roots: Option<String>,
    /// `None` exactly when `mode` is `disable`.
    config: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("origin", &self.origin)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// No TLS at all.
    pub fn disabled() -> Tls {
        Tls {
            mode: TlsMode::Disable,
            origin: "sslmode is disable".into(),
            channel_binding: ChannelBindingMode::Prefer,
            roots: None,
            config: None,
        }
    }

    /// What a bare `tokio_postgres::Config` asks for, read as libpq reads
    /// it without a root certificate: `disable`, `prefer` or `require`,
    /// encrypting without verifying the server's certificate.
    pub fn from_ssl_mode(pg: &tokio_postgres::Config) -> Tls {
        let mode = match pg.get_ssl_mode() {
            SslMode::Disable => return Tls::disabled(),
            SslMode::Require => TlsMode::Require,
            _ => TlsMode::Prefer,
        };
        Tls {
            mode,
            origin: format!("sslmode is {mode}"),
            channel_binding: pg.get_channel_binding(),
            roots: None,
            config: Some(Arc::new(client_config(Verification::None, None).expect(
                "without roots or a client certificate the configuration always builds",
            ))),
        }
    }

    /// Builds the policy from resolved settings, reading the certificate
    /// and key files (errors name the field they came from).
    pub fn from_settings(settings: &TlsSettings) -> Result<Tls, ConfigError> {
        let origin = settings.mode_origin();
        let mode = settings.mode.value;
        if mode == TlsMode::Disable {
            return Ok(Tls {
                origin,
                ..Tls::disabled()
            });
        }
        let roots = match &settings.root_certs {
            Some(r) => Some(load_roots(r)?),
            None => None,
        };
        let verification = match (mode, roots) {
            (TlsMode::VerifyFull, Some(roots)) => Verification::Full(roots),
            (TlsMode::VerifyCa | TlsMode::Require, Some(roots)) => Verification::Chain(roots),
            (TlsMode::VerifyCa | TlsMode::VerifyFull, None) => {
                return Err(ConfigError::new(
                    "database.tls_root_cert",
                    format!("{origin}, which needs root certificates"),
                ))
            }
            _ => Verification::None,
        };
        let client = match (&settings.client_cert, &settings.client_key) {
            (Some(cert), Some(key)) => Some(load_client_identity(cert, key)?),
            _ => None,
        };
        let config = client_config(verification, client).map_err(|e| {
            let field = settings
                .client_key
                .as_ref()
                .map_or("database.tls_mode", |k| k.field.as_str());
            ConfigError::new(field, e)
        })?;
        Ok(Tls {
            mode,
            origin,
            channel_binding: settings.channel_binding,
            roots: settings.root_certs.as_ref().map(|r| r.field.clone()),
            config: Some(Arc::new(config)),
        })
    }

    /// The mode.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// `channel_binding` as configured.
    pub fn channel_binding(&self) -> ChannelBindingMode {
        self.channel_binding
    }

    /// For `allow`'s second attempt: the same policy, encrypting.
    pub(crate) fn upgraded(&self) -> Tls {
        Tls {
            mode: TlsMode::Require,
            ..self.clone()
        }
    }

    /// Negotiates TLS on a freshly connected `stream` to `host` (the name or
    /// address the certificate is checked against). `disable` and `allow`
    /// send nothing and return the stream as it is.
    pub async fn negotiate<S>(&self, mut stream: S, host: &str) -> Result<MaybeTls<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = match (&self.config, self.mode) {
            (_, TlsMode::Disable | TlsMode::Allow) => return Ok(MaybeTls::Plain(stream)),
            (Some(config), _) => config,
            (None, _) => unreachable!("only `disable` has no rustls configuration"),
        };
        let io_err = |error: io::Error| TlsError::Io {
            host: host.to_owned(),
            error,
        };
        // SSLRequest: length 8, code 1234.5679.
        stream
            .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .map_err(io_err)?;
        stream.flush().await.map_err(io_err)?;
        match stream.read_u8().await.map_err(io_err)? {
            b'S' => {}
            b'N' if self.mode.requires_tls() => {
                return Err(TlsError::NotOffered {
                    origin: self.origin.clone(),
                })
            }
            b'N' if self.channel_binding == ChannelBindingMode::Require => {
                return Err(TlsError::ChannelBindingWithoutTls)
            }
            b'N' => return Ok(MaybeTls::Plain(stream)),
            other => return Err(TlsError::UnexpectedAnswer(other)),
        }
        let name = match ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']')) {
            Ok(name) => name.to_owned(),
            Err(_) if self.mode != TlsMode::VerifyFull => {
                // Nothing checks the name; an address sends no SNI.
                ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into())
            }
            Err(e) => {
                return Err(TlsError::Handshake {
                    host: host.to_owned(),
                    origin: self.origin.clone(),
                    reason: format!("{host:?} is not a valid DNS name or IP address ({e})"),
                    hint: "connect by a host name or IP address the certificate lists".into(),
                })
            }
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
        match connector.connect(name, stream).await {
            Ok(s) => Ok(MaybeTls::Tls(Box::new(s))),
            Err(e) => Err(self.handshake_error(host, e)),
        }
    }

    fn handshake_error(&self, host: &str, e: io::Error) -> TlsError {
        let Some(rustls_error) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return TlsError::Io {
                host: host.to_owned(),
                error: e,
            };
        };
        let roots = self.roots.as_deref().unwrap_or("the root certificates");
        let hint = match rustls_error {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                    "the server's certificate is not signed by a CA from {roots}; set \
                     database.tls_root_cert (or sslrootcert) to the CA that signed it"
                ),
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    "connect by a host name or IP address listed in the certificate's subjectAltName, \
                     or reissue the certificate for this name (verify-ca skips the name check)"
                        .into()
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => {
                    "renew the server's certificate, or check this machine's clock".into()
                }
                _ => "check the server's certificate (ssl_cert_file)".into(),
            },
            rustls::Error::AlertReceived(_) => {
                "the server refused the handshake: check ssl_min_protocol_version and, if the \
                 server asks for one, the client certificate (sslcert / database.tls_client_cert)"
                    .into()
            }
            _ => "check the server's TLS settings (TLS 1.2 or newer is needed)".into(),
        };
        TlsError::Handshake {
            host: host.to_owned(),
            origin: self.origin.clone(),
            reason: rustls_error.to_string(),
            hint,
        }
    }
}

/// A connection's failure to set up TLS. Messages are one line, say what to
/// fix, and never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The server answered `N` to the `SSLRequest` but the mode needs TLS.
    #[error(
        "the server does not support TLS, but {origin}; turn ssl on in the server's \
         configuration, or set sslmode (database.tls_mode) to prefer or disable"
    )]
    NotOffered {
        /// The mode and where it came from.
        origin: String,
    },
    /// The server does not offer TLS and `channel_binding=require`.
    #[error(
        "channel_binding=require needs TLS, but the server does not support TLS; turn ssl on \
         in the server's configuration, or set channel_binding=prefer"
    )]
    ChannelBindingWithoutTls,
    /// The server answered the `SSLRequest` with neither `S` nor `N`.
    #[error("the server answered the TLS request with byte {0:#04x} instead of S or N; is this a PostgreSQL server?")]
    UnexpectedAnswer(u8),
    /// The handshake failed: an untrusted certificate, the wrong host name,
    /// an expired certificate, no common protocol version…
    #[error("TLS handshake with {host} failed ({origin}): {reason}; {hint}")]
    Handshake {
        /// The host the certificate was checked against.
        host: String,
        /// The mode and where it came from.
        origin: String,
        /// What rustls reported.
        reason: String,
        /// What to do about it.
        hint: String,
    },
    /// Reading or writing the socket failed during negotiation.
    #[error("I/O error during TLS negotiation with {host}: {error}")]
    Io {
        /// The host.
        host: String,
        /// The I/O error.
        error: io::Error,
    },
}

impl TlsError {
    /// True when reconnecting may succeed without anyone changing anything
    /// (an I/O failure); certificate and configuration problems need an
    /// operator.
    pub fn is_transient(&self) -> bool {
        match self {
            TlsError::Io { .. } => true,
            TlsError::NotOffered { .. }
            | TlsError::ChannelBindingWithoutTls
            | TlsError::UnexpectedAnswer(_)
            | TlsError::Handshake { .. } => false,
        }
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for Tls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = MaybeTls<S>;
    type TlsConnect = Connector;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, host: &str) -> Result<Connector, Self::Error> {
        Ok(Connector {
            tls: self.clone(),
            host: host.to_owned(),
        })
    }
}

/// [`Tls::negotiate`] for one host, as tokio-postgres's `TlsConnect`.
pub struct Connector {
    tls: Tls,
    host: String,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = MaybeTls<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<MaybeTls<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move { self.tls.negotiate(stream, &self.host).await })
    }
}

#[cfg(test)]
mod tests {
    use super::verify::provider;
    use super::*;
    use crate::config::DatabaseConfig;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::PrivateKeyDer;
    use tokio::io::{duplex, DuplexStream};

    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

    fn tls_for(url: &str) -> Tls {
        let db = DatabaseConfig {
            url: crate::config::DatabaseUrl::new(url),
            ..DatabaseConfig::default()
        };
        let (_, settings) = db.connection().unwrap();
        Tls::from_settings(&settings).unwrap()
    }

    /// Negotiates against a fake server that answers the SSLRequest with
    /// `answer`; returns the outcome and whether the request was sent.
    async fn answer_with(tls: &Tls, answer: u8) -> (Result<bool, TlsError>, bool) {
        let (client, mut server) = duplex(64);
        let srv = tokio::spawn(async move {
            let mut request = [0u8; 8];
            let sent = server.read_exact(&mut request).await.is_ok();
            if sent {
                assert_eq!(request, SSL_REQUEST);
                server.write_all(&[answer]).await.unwrap();
            }
            sent
        });
        let outcome = tls.negotiate(client, "db.example.com").await;
        let outcome = outcome.map(|s| s.is_tls());
        (outcome, srv.await.unwrap())
    }

    #[tokio::test]
    async fn a_server_without_tls_is_refused_when_the_mode_requires_it() {
        let tls = tls_for("postgres://db.example.com/db?sslmode=require");
        let (outcome, sent) = answer_with(&tls, b'N').await;
        let err = outcome.unwrap_err();
        assert!(sent);
        assert!(
            err.to_string().starts_with(
                "the server does not support TLS, but sslmode in database.url is require;"
            ),
            "{err}"
        );
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn prefer_goes_on_without_tls_unless_channel_binding_is_required() {
        let tls = tls_for("postgres://127.0.0.1/db");
        assert_eq!(tls.mode(), TlsMode::Prefer);
        let (outcome, sent) = answer_with(&tls, b'N').await;
        assert!(sent && !outcome.unwrap());
        let tls = tls_for("postgres://127.0.0.1/db?channel_binding=require");
        let (outcome, _) = answer_with(&tls, b'N').await;
        assert!(matches!(outcome, Err(TlsError::ChannelBindingWithoutTls)));
        let (outcome, _) = answer_with(&tls, b'E').await;
        assert!(matches!(outcome, Err(TlsError::UnexpectedAnswer(b'E'))));
    }

    #[tokio::test]
    async fn disable_and_allow_send_nothing() {
        for mode in ["disable", "allow"] {
            let tls = tls_for(&format!("postgres://db.example.com/db?sslmode={mode}"));
            let (client, mut server) = duplex(64);
            let stream = tls.negotiate(client, "db.example.com").await.unwrap();
            assert!(!stream.is_tls());
            drop(stream);
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "{mode}: {rest:?}");
        }
    }

    /// A CA, and a server certificate for `localhost` it signed, written to
    /// a fresh directory.
    struct Pki {
        dir: std::path::PathBuf,
        server: rustls::ServerConfig,
    }

    fn pki() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "pgoutbox-tls-unit-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let mut other_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other =
            CertifiedIssuer::self_signed(other_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("other.pem"), other.pem()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        Pki { dir, server }
    }

    /// Negotiates `tls` for `host` against a rustls server presenting the
    /// PKI's server certificate.
    async fn handshake(
        pki: &Pki,
        tls: &Tls,
        host: &str,
    ) -> Result<MaybeTls<DuplexStream>, TlsError> {
        let (client, mut server) = duplex(16 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server.clone()));
        tokio::spawn(async move {
            let mut request = [0u8; 8];
            server.read_exact(&mut request).await.unwrap();
            server.write_all(b"S").await.unwrap();
            if let Ok(mut s) = acceptor.accept(server).await {
                let _ = s.read_u8().await;
            }
        });
        tls.negotiate(client, host).await
    }

    #[test]
    fn a_client_key_must_fit_its_certificate() {
        let dir = std::env::temp_dir().join(format!(
            "pgoutbox-tls-client-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["relay".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_path, key_path, other_path) =
            (dir.join("c.pem"), dir.join("k.pem"), dir.join("o.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::write(&other_path, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let url = |key: &std::path::Path| {
            format!(
                "postgres://127.0.0.1/db?sslmode=require&sslcert={}&sslkey={}",
                cert_path.display(),
                key.display()
            )
        };
        tls_for(&url(&key_path));
        let db = DatabaseConfig {
            url: crate::config::DatabaseUrl::new(url(&other_path)),
            ..DatabaseConfig::default()
        };
        let (_, settings) = db.connection().unwrap();
        let e = Tls::from_settings(&settings).unwrap_err();
        assert_eq!(e.field, "sslkey in database.url");
        let db = DatabaseConfig {
            url: crate::config::DatabaseUrl::new(url(&cert_path)),
            ..DatabaseConfig::default()
        };
        let (_, settings) = db.connection().unwrap();
        let e = Tls::from_settings(&settings).unwrap_err();
        assert!(e.problem.contains("private key"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn verify_full_checks_chain_and_name_verify_ca_only_the_chain() {
        let pki = pki();
        let ca = pki.dir.join("ca.pem");
        let other = pki.dir.join("other.pem");
        let url = |mode: &str, root: &std::path::Path| {
            format!(
                "postgres://localhost/db?sslmode={mode}&sslrootcert={}",
                root.display()
            )
        };
        let full = tls_for(&url("verify-full", &ca));
        let s = handshake(&pki, &full, "localhost").await.unwrap();
        assert!(s.is_tls() && s.tls_server_end_point().is_some());
        let err = handshake(&pki, &full, "elsewhere.example")
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("not valid for name"), "{err}");

        let chain = tls_for(&url("verify-ca", &ca));
        assert!(handshake(&pki, &chain, "elsewhere.example").await.is_ok());
        let untrusted = tls_for(&url("verify-ca", &other));
        let err = handshake(&pki, &untrusted, "localhost")
            .await
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("not signed by a CA from sslrootcert"),
            "{err}"
        );
        assert!(!err.is_transient());

        // require verifies nothing (no root certificate)...
        let require = tls_for("postgres://localhost/db?sslmode=require");
        assert!(handshake(&pki, &require, "elsewhere.example").await.is_ok());
        // ...unless given one, as libpq.
        let require_ca = tls_for(&url("require", &other));
        assert!(handshake(&pki, &require_ca, "localhost").await.is_err());
        let _ = std::fs::remove_dir_all(&pki.dir);
    }
}
