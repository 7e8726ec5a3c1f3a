//! The stream a negotiation returns ([`MaybeTls`]), and the channel
//! binding data of its certificate.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream after negotiation: TLS, or plain when the mode allowed it.
pub enum MaybeTls<S> {
    /// Unencrypted.
    Plain(S),
    /// Encrypted.
    Tls(Box<tokio_rustls::client::TlsStream<S>>),
}

impl<S> MaybeTls<S> {
    /// True when encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    /// The `tls-server-end-point` channel binding data (RFC 5929): a hash
    /// of the server's certificate, with the hash function of its
    /// signature (SHA-256 for MD5 and SHA-1). `None` without TLS, or when
    /// the signature algorithm names no single hash (Ed25519, RSA-PSS).
    pub fn tls_server_end_point(&self) -> Option<Vec<u8>> {
        let MaybeTls::Tls(s) = self else {
            return None;
        };
        let cert = s.get_ref().1.peer_certificates()?.first()?;
        tls_server_end_point(cert)
    }
}

pub(super) fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    use x509_cert::der::oid::db::rfc5912 as oid;
    use x509_cert::der::oid::ObjectIdentifier;
    use x509_cert::der::Decode;
    let parsed = x509_cert::Certificate::from_der(cert).ok()?;
    let alg = parsed.signature_algorithm.oid;
    const ECDSA_WITH_SHA_1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.1");
    if [
        oid::MD_5_WITH_RSA_ENCRYPTION,
        oid::SHA_1_WITH_RSA_ENCRYPTION,
        ECDSA_WITH_SHA_1,
        oid::DSA_WITH_SHA_1,
        oid::SHA_256_WITH_RSA_ENCRYPTION,
        oid::ECDSA_WITH_SHA_256,
        oid::DSA_WITH_SHA_256,
    ]
    .contains(&alg)
    {
        Some(sha2::Sha256::digest(cert).to_vec())
    } else if [oid::SHA_224_WITH_RSA_ENCRYPTION, oid::ECDSA_WITH_SHA_224].contains(&alg) {
        Some(sha2::Sha224::digest(cert).to_vec())
    } else if [oid::SHA_384_WITH_RSA_ENCRYPTION, oid::ECDSA_WITH_SHA_384].contains(&alg) {
        Some(sha2::Sha384::digest(cert).to_vec())
    } else if [oid::SHA_512_WITH_RSA_ENCRYPTION, oid::ECDSA_WITH_SHA_512].contains(&alg) {
        Some(sha2::Sha512::digest(cert).to_vec())
    } else {
        None
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for MaybeTls<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match self.tls_server_end_point() {
            Some(hash) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(hash),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
    };

    fn self_signed(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_end_point_hash_follows_the_certificate_signature() {
        use sha2::Digest;
        let p256 = self_signed(&PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            tls_server_end_point(&p256),
            Some(sha2::Sha256::digest(&p256).to_vec())
        );
        let p384 = self_signed(&PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            tls_server_end_point(&p384),
            Some(sha2::Sha384::digest(&p384).to_vec())
        );
        assert_eq!(tls_server_end_point(&self_signed(&PKCS_ED25519)), None);
        assert_eq!(tls_server_end_point(b"not a certificate"), None);
    }
}
