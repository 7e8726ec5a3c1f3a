//! The rustls configuration: how much of the server's certificate is
//! checked, the root certificates, and the client certificate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::{ConfigError, RootCerts, Sourced};

/// How much of the server's certificate is checked.
pub(super) enum Verification {
    /// Nothing but the handshake signature (libpq's `prefer`/`require`).
    None,
    /// The chain up to a trusted root, not the name (`verify-ca`).
    Chain(RootCertStore),
    /// Chain and name (`verify-full`).
    Full(RootCertStore),
}

pub(super) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client certificate chain and its key.
pub(super) type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Builds the rustls configuration. Fails only on a client key that does
/// not fit its certificate (the ring provider supports the default protocol
/// versions, and the roots are never empty).
pub(super) fn client_config(
    verification: Verification,
    client: Option<Identity>,
) -> Result<ClientConfig, String> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match verification {
        Verification::None => Arc::new(Unverified {
            provider: Arc::clone(&provider),
        }),
        Verification::Chain(roots) => Arc::new(ChainOnly {
            roots: Arc::new(roots),
            provider: Arc::clone(&provider),
        }),
        Verification::Full(roots) => {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .map_err(|e| e.to_string())?
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match client {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("does not fit the client certificate: {e}")),
        None => Ok(builder.with_no_client_auth()),
    }
}

pub(super) fn load_roots(r: &Sourced<RootCerts>) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    match &r.value {
        RootCerts::File(path) => {
            let certs = read_certs(path).map_err(|e| ConfigError::new(&r.field, e))?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    ConfigError::new(
                        &r.field,
                        format!("{path} holds an unusable CA certificate: {e}"),
                    )
                })?;
            }
        }
        RootCerts::System => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(ConfigError::new(
                    &r.field,
                    format!(
                        "no CA certificates found in the system's trust store{why}; set \
                         database.tls_root_cert (or sslrootcert) to the CA that signed the \
                         server's certificate"
                    ),
                ));
            }
        }
    }
    Ok(roots)
}

fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read PEM certificates from {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path} holds no PEM certificate"));
    }
    Ok(certs)
}

pub(super) fn load_client_identity(
    cert: &Sourced<String>,
    key: &Sourced<String>,
) -> Result<Identity, ConfigError> {
    let certs = read_certs(&cert.value).map_err(|e| ConfigError::new(&cert.field, e))?;
    let private = PrivateKeyDer::from_pem_file(&key.value).map_err(|e| {
        ConfigError::new(
            &key.field,
            format!("cannot read a PEM private key from {}: {e}", key.value),
        )
    })?;
    Ok((certs, private))
}

/// Accepts any certificate (libpq's `prefer` and `require`), but checks
/// that the server holds the key of the certificate it presented.
#[derive(Debug)]
struct Unverified {
    provider: Arc<CryptoProvider>,
}

/// Checks the chain up to a trusted root but not the host name
/// (`verify-ca`).
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
