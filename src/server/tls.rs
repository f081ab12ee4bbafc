//! TLS to the upstream server: the rustls client configuration for each libpq `sslmode`,
//! and the roots it trusts (the bundled RDS CAs, Mozilla's roots, or `sslrootcert`).
//!
//! The aws-lc-rs provider is passed in explicitly, so no process-wide default provider is
//! installed or needed.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::config::SslMode;

/// Amazon RDS, Aurora and RDS Proxy CAs; regenerate with `scripts/update-rds-ca-bundle.sh`.
const RDS_CA_BUNDLE: &str = include_str!("rds-ca-bundle.pem");

/// Host name suffixes whose certificates the RDS CAs sign.
const RDS_HOST_SUFFIXES: [&str; 2] = [".rds.amazonaws.com", ".rds.amazonaws.com.cn"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read sslrootcert {path}: {source}; check the path and that iampool may read it"
    )]
    ReadRootCert {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sslrootcert {path} is not valid PEM: {source}; it must hold '-----BEGIN CERTIFICATE-----' blocks")]
    ParseRootCert {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("sslrootcert {path} holds no certificates; it must hold the PEM CA certificate(s) that sign the server's certificate")]
    NoRootCerts { path: PathBuf },
    #[error(
        "sslrootcert {path} holds a certificate that cannot be used as a trust anchor: {source}"
    )]
    BadRootCert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the bundled RDS CA certificates do not parse ({0}); this is a build defect, regenerate src/server/rds-ca-bundle.pem")]
    BundledRdsCa(String),
    #[error("sslmode verify-ca for {host} would trust any certificate from any public CA; set sslrootcert to the CA that signs the server's certificate, or use verify-full")]
    WeakVerifyCa { host: String },
    #[error(
        "upstream host {host:?} is neither a DNS name nor an IP address; fix the host setting"
    )]
    InvalidHost { host: String },
    #[error("cannot build the TLS configuration for {host}: {source}")]
    Rustls {
        host: String,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the certificate verifier for {host}: {source}")]
    Verifier {
        host: String,
        #[source]
        source: rustls::client::VerifierBuilderError,
    },
}

/// Whether the RDS CAs sign this host's certificate.
pub fn is_rds_host(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    RDS_HOST_SUFFIXES.iter().any(|s| host.ends_with(s))
}

/// The name to verify the upstream's certificate against (and send as SNI when it is a
/// DNS name). IPv6 addresses may be given with or without brackets.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(bare.to_owned()).map_err(|_| TlsError::InvalidHost {
        host: host.to_owned(),
    })
}

/// The rustls client configuration for connecting to `host` under `sslmode`, with libpq's
/// meaning: `verify-full` checks the chain and the host name, `verify-ca` the chain only,
/// and `require`/`prefer`/`allow` encrypt without checking who answers. `None` for
/// `disable`. Whether to fall back to plaintext (`allow`, `prefer`) is the caller's choice.
///
/// Roots for `verify-*`: for RDS hosts, the bundled RDS CAs plus `sslrootcert` if given;
/// for other hosts, `sslrootcert` alone if given (as libpq: naming a CA file pins it),
/// otherwise Mozilla's roots, which `verify-ca` refuses as too weak (as libpq does for
/// `sslrootcert=system`).
pub fn upstream_client_config(
    sslmode: SslMode,
    host: &str,
    sslrootcert: Option<&Path>,
) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match sslmode {
        SslMode::Disable => return Ok(None),
        SslMode::Allow | SslMode::Prefer | SslMode::Require => Arc::new(EncryptOnlyVerifier {
            algorithms: provider.signature_verification_algorithms,
        }),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            if sslmode == SslMode::VerifyCa && sslrootcert.is_none() && !is_rds_host(host) {
                return Err(TlsError::WeakVerifyCa {
                    host: host.to_owned(),
                });
            }
            let roots = Arc::new(root_store(host, sslrootcert)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|source| TlsError::Verifier {
                    host: host.to_owned(),
                    source,
                })?;
            let pinned = match sslrootcert {
                Some(path) => read_root_certs(path)?,
                None => Vec::new(),
            };
            Arc::new(LibpqVerifier {
                inner: webpki,
                pinned,
                check_name: sslmode == SslMode::VerifyFull,
            })
        }
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            host: host.to_owned(),
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

fn root_store(host: &str, sslrootcert: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    if is_rds_host(host) {
        for cert in rds_ca_certificates()? {
            roots
                .add(cert)
                .map_err(|e| TlsError::BundledRdsCa(e.to_string()))?;
        }
    } else if sslrootcert.is_none() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = sslrootcert {
        for cert in read_root_certs(path)? {
            roots.add(cert).map_err(|source| TlsError::BadRootCert {
                path: path.to_owned(),
                source,
            })?;
        }
    }
    Ok(roots)
}

/// Regions whose own RDS CAs are bundled, read from the bundle's `# subject=...` lines:
/// the word after `CN=Amazon RDS `, which may stand first (`CN=Amazon RDS us-east-1 2019
/// CA,...`) or after `L=Seattle,` (`L=Seattle,CN=Amazon RDS ap-south-2 Root CA RSA2048 G1,...`).
pub fn rds_bundle_regions() -> std::collections::BTreeSet<&'static str> {
    RDS_CA_BUNDLE
        .lines()
        .filter_map(|l| l.strip_prefix("# subject="))
        .filter_map(|subject| {
            subject
                .split_once("CN=Amazon RDS ")
                .filter(|(before, _)| before.is_empty() || before.ends_with(','))
        })
        .filter_map(|(_, rest)| rest.split([' ', ',']).next())
        .filter(|r| {
            r.split('-').count() >= 3
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
        .collect()
}

/// The bundled RDS CA certificates, parsed.
pub fn rds_ca_certificates() -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(RDS_CA_BUNDLE.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BundledRdsCa(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::BundledRdsCa("no certificates".into()));
    }
    Ok(certs)
}

fn read_root_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::ReadRootCert {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::ParseRootCert {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoRootCerts {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// `verify-ca` and `verify-full` as libpq (OpenSSL) judge them: the full WebPKI check
/// (`verify-ca` forgives only a name mismatch: webpki checks the chain before the name, so
/// a name error means the chain was already accepted), and a server certificate that is
/// itself in `sslrootcert` (a pinned self-signed certificate, even one marked CA:TRUE as the
/// PostgreSQL documentation's `openssl req -x509` recipe makes it) is trusted as its own
/// chain, still subject to its validity dates and, under `verify-full`, the host name.
#[derive(Debug)]
struct LibpqVerifier {
    inner: Arc<WebPkiServerVerifier>,
    /// The certificates of `sslrootcert`, byte for byte.
    pinned: Vec<CertificateDer<'static>>,
    check_name: bool,
}

impl ServerCertVerifier for LibpqVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name_error = |e: &rustls::Error| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                )
            )
        };
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(e) if name_error(&e) && !self.check_name => Ok(ServerCertVerified::assertion()),
            // webpki refuses a CA certificate as the server's own; it checked the dates
            // first, so they are good. Pinned byte for byte, it is its own trust anchor.
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(other)))
                if is_ca_used_as_end_entity(&other)
                    && self
                        .pinned
                        .iter()
                        .any(|p| p.as_ref() == end_entity.as_ref()) =>
            {
                if self.check_name {
                    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
                        rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
                    })?;
                    cert.verify_is_valid_for_subject_name(server_name)
                        .map_err(|_| {
                            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
                        })?;
                }
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn is_ca_used_as_end_entity(e: &rustls::OtherError) -> bool {
    e.0.downcast_ref::<webpki::Error>()
        .is_some_and(|e| matches!(e, webpki::Error::CaUsedAsEndEntity))
}

/// A failed upstream TLS handshake in words: what was wrong and what to set. `error` is
/// what the handshake returned.
pub fn describe_failure(error: &io::Error, host: &str, sslrootcert: Option<&Path>) -> String {
    let roots = match sslrootcert {
        Some(p) => format!("sslrootcert {}", p.display()),
        None if is_rds_host(host) => "the bundled RDS CA certificates".to_owned(),
        None => "the public CA roots".to_owned(),
    };
    let Some(e) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return format!("TLS handshake failed: {error}");
    };
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer if sslrootcert.is_none() && is_rds_host(host) => {
                match crate::iam::command::region_from_host(host) {
                    Some(region) if !rds_bundle_regions().contains(region) => format!(
                        "the server's certificate is signed by an RDS CA of {region}, which the \
                         CAs bundled with iampool do not cover (unknown issuer); download \
                         https://truststore.pki.rds.amazonaws.com/{region}/{region}-bundle.pem \
                         (or your partition's RDS certificate bundle) and set sslrootcert to it"
                    ),
                    _ => format!(
                        "the server's certificate is not signed by a CA in {roots} (unknown \
                         issuer); set sslrootcert to the CA certificate that signs it (for RDS, \
                         https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem)"
                    ),
                }
            }
            CertificateError::UnknownIssuer => format!(
                "the server's certificate is not signed by a CA in {roots} (unknown issuer); set \
                 sslrootcert to the CA certificate that signs it (or to the server's own \
                 certificate, if it is self-signed)"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "the server's certificate is not valid for the name {host} (name mismatch); \
                     connect by a name the certificate lists, or use sslmode=verify-ca to check \
                     only who signed it"
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired; renew it on the server, or check this \
                 machine's clock"
                    .to_owned()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet; check this machine's clock".to_owned()
            }
            CertificateError::BadSignature => format!(
                "the server's certificate has a bad signature; its chain does not verify against {roots}"
            ),
            CertificateError::Other(o) if is_ca_used_as_end_entity(o) => format!(
                "the server presents a CA certificate as its own; libpq accepts that only when \
                 the very certificate is pinned: set sslrootcert to it (not found in {roots})"
            ),
            other => format!("the server's certificate was refused: {other:?}"),
        },
        other => format!("TLS handshake failed: {other}"),
    }
}

/// `require`/`prefer`/`allow`: any certificate is accepted (libpq checks nothing either),
/// but the handshake signature must still be made by that certificate's key, so the
/// session keys are bound to it.
#[derive(Debug)]
struct EncryptOnlyVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for EncryptOnlyVerifier {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const RDS_NAME: &str = "db.test.rds.amazonaws.com";

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes a CA file and a server cert/key for `names` signed by `ca` into `dir`.
    fn server_files(dir: &Path, ca: &Ca, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        let (ca_path, cert_path, key_path) = (
            dir.join("ca.pem"),
            dir.join("server.pem"),
            dir.join("server.key"),
        );
        std::fs::write(&ca_path, &ca.pem).unwrap();
        std::fs::write(&cert_path, cert.pem() + &ca.pem).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (ca_path, cert_path, key_path)
    }

    /// Runs a TLS handshake plus one byte each way over an in-memory pipe.
    async fn handshake(
        config: Arc<ClientConfig>,
        name: &str,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> io::Result<()> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(server_io).await?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await?;
            tls.write_all(&b).await?;
            tls.flush().await
        });
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut tls = connector
            .connect(server_name(name).unwrap(), client_io)
            .await?;
        tls.write_all(b"x").await?;
        tls.flush().await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
        server.await.unwrap()
    }

    fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
        e.get_ref()?.downcast_ref::<rustls::Error>()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        ca_path: PathBuf,
        other_ca_path: PathBuf,
        acceptor: tokio_rustls::TlsAcceptor,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let trusted = ca("iampool test CA");
        let (ca_path, cert, key) = server_files(dir.path(), &trusted, &[RDS_NAME]);
        let other_ca_path = dir.path().join("other-ca.pem");
        std::fs::write(&other_ca_path, ca("some other CA").pem).unwrap();
        let acceptor = crate::client::tls::acceptor(&cert, &key).unwrap();
        Fixture {
            _dir: dir,
            ca_path,
            other_ca_path,
            acceptor,
        }
    }

    fn config(mode: SslMode, host: &str, root: &Path) -> Arc<ClientConfig> {
        upstream_client_config(mode, host, Some(root))
            .unwrap()
            .unwrap()
    }

    /// A self-signed server certificate marked CA:TRUE, as the PostgreSQL documentation's
    /// `openssl req -new -x509` recipe makes it; returns (cert file, acceptor).
    fn self_signed_ca_server(dir: &Path, name: &str) -> (PathBuf, tokio_rustls::TlsAcceptor) {
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.join("self.pem"), dir.join("self.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let acceptor = crate::client::tls::acceptor(&cert_path, &key_path).unwrap();
        (cert_path, acceptor)
    }

    #[tokio::test]
    async fn pinned_self_signed_certificate_is_accepted_as_libpq_does() {
        let dir = tempfile::tempdir().unwrap();
        let host = "db.internal.example";
        let (pinned, acceptor) = self_signed_ca_server(dir.path(), host);
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            handshake(config(mode, host, &pinned), host, acceptor.clone())
                .await
                .unwrap_or_else(|e| panic!("{mode:?}: {e:?}"));
        }
        // verify-full still checks the name; verify-ca does not.
        let other = "elsewhere.example";
        handshake(
            config(SslMode::VerifyCa, other, &pinned),
            other,
            acceptor.clone(),
        )
        .await
        .unwrap();
        let err = handshake(
            config(SslMode::VerifyFull, other, &pinned),
            other,
            acceptor.clone(),
        )
        .await
        .unwrap_err();
        let words = describe_failure(&err, other, Some(&pinned));
        assert!(words.contains("name mismatch"), "{words}");
        // Not pinned: refused, and the message says what to set.
        let other_ca = dir.path().join("other-ca.pem");
        std::fs::write(&other_ca, ca("unrelated CA").pem).unwrap();
        let err = handshake(config(SslMode::VerifyFull, host, &other_ca), host, acceptor)
            .await
            .unwrap_err();
        let words = describe_failure(&err, host, Some(&other_ca));
        assert!(words.contains("sslrootcert"), "{words}");
    }

    #[tokio::test]
    async fn verify_full_accepts_right_name() {
        let f = fixture();
        handshake(
            config(SslMode::VerifyFull, RDS_NAME, &f.ca_path),
            RDS_NAME,
            f.acceptor,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn verify_full_rejects_wrong_name() {
        let f = fixture();
        let host = "other.test.rds.amazonaws.com";
        let err = handshake(
            config(SslMode::VerifyFull, host, &f.ca_path),
            host,
            f.acceptor,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                ))
            ),
            "{err:?}"
        );
        let words = describe_failure(&err, host, Some(&f.ca_path));
        assert!(
            words.contains("name mismatch") && words.contains(host),
            "{words}"
        );
    }

    #[tokio::test]
    async fn verify_ca_accepts_wrong_name() {
        let f = fixture();
        let host = "other.test.rds.amazonaws.com";
        handshake(
            config(SslMode::VerifyCa, host, &f.ca_path),
            host,
            f.acceptor,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn verify_ca_rejects_untrusted_ca() {
        let f = fixture();
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let err = handshake(
                config(mode, RDS_NAME, &f.other_ca_path),
                RDS_NAME,
                f.acceptor.clone(),
            )
            .await
            .unwrap_err();
            assert!(
                matches!(
                    rustls_error(&err),
                    Some(rustls::Error::InvalidCertificate(
                        CertificateError::UnknownIssuer
                    ))
                ),
                "{mode:?}: {err:?}"
            );
            let words = describe_failure(&err, RDS_NAME, Some(&f.other_ca_path));
            assert!(
                words.contains("unknown issuer") && words.contains("set sslrootcert"),
                "{words}"
            );
        }
    }

    #[tokio::test]
    async fn verify_ca_rejects_untrusted_ca_even_with_wrong_name() {
        let f = fixture();
        let host = "elsewhere.example.com";
        let err = handshake(
            config(SslMode::VerifyCa, host, &f.other_ca_path),
            host,
            f.acceptor,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                rustls_error(&err),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer
                ))
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn require_accepts_untrusted_ca() {
        let f = fixture();
        for mode in [SslMode::Require, SslMode::Prefer, SslMode::Allow] {
            let cfg = upstream_client_config(mode, "10.0.0.1", None)
                .unwrap()
                .unwrap();
            handshake(cfg, RDS_NAME, f.acceptor.clone()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn verify_full_by_ip_address() {
        let dir = tempfile::tempdir().unwrap();
        let (ca_path, cert, key) = server_files(dir.path(), &ca("ip CA"), &["127.0.0.1"]);
        let acceptor = crate::client::tls::acceptor(&cert, &key).unwrap();
        handshake(
            config(SslMode::VerifyFull, "127.0.0.1", &ca_path),
            "127.0.0.1",
            acceptor.clone(),
        )
        .await
        .unwrap();
        assert!(handshake(
            config(SslMode::VerifyFull, "127.0.0.2", &ca_path),
            "127.0.0.2",
            acceptor
        )
        .await
        .is_err());
    }

    #[test]
    fn disable_is_none() {
        assert!(upstream_client_config(SslMode::Disable, "h", None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn bundled_regions_are_listed_and_an_uncovered_one_names_its_bundle() {
        let regions = rds_bundle_regions();
        for r in [
            "us-east-1",
            "eu-west-1",
            "ap-northeast-3",
            "af-south-1",
            "me-south-1",
            // Their only current CAs are G1 roots, whose subject starts with L=Seattle.
            "ap-east-1",
            "ap-south-2",
            "ap-southeast-3",
            "ap-southeast-4",
            "eu-central-2",
            "eu-south-2",
            "me-central-1",
        ] {
            assert!(regions.contains(r), "{r} in {regions:?}");
        }
        assert!(regions.len() >= 20, "{regions:?}");
        assert!(regions.iter().all(|r| !r.contains("Root")), "{regions:?}");
        let unknown = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let host = "db.abc.il-central-1.rds.amazonaws.com";
        let words = describe_failure(&unknown, host, None);
        assert!(
            words.contains(
                "https://truststore.pki.rds.amazonaws.com/il-central-1/il-central-1-bundle.pem"
            ) && words.contains("sslrootcert"),
            "{words}"
        );
        for host in [
            "db.abc.us-east-1.rds.amazonaws.com",
            "db.abc.ap-southeast-4.rds.amazonaws.com",
        ] {
            let covered = describe_failure(&unknown, host, None);
            assert!(covered.contains("global-bundle.pem"), "{covered}");
        }
    }

    #[test]
    fn rds_bundle_parses() {
        let certs = rds_ca_certificates().unwrap();
        assert!(certs.len() > 10, "{}", certs.len());
        let has = |needle: &[u8]| {
            certs
                .iter()
                .filter(|c| c.as_ref().windows(needle.len()).any(|w| w == needle))
                .count()
        };
        assert!(has(b"ECC384") > 0);
        assert!(has(b"RSA4096") > 0);
        assert!(has(b"Amazon Root CA 1") > 0);
        // Every bundled certificate is usable as a trust anchor.
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(certs.clone());
        assert_eq!((added, ignored), (certs.len(), 0));
    }

    #[test]
    fn roots_follow_host_and_sslrootcert() {
        let dir = tempfile::tempdir().unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca("x").pem).unwrap();
        let rds = rds_ca_certificates().unwrap().len();
        let mozilla = webpki_roots::TLS_SERVER_ROOTS.len();
        assert_eq!(root_store(RDS_NAME, None).unwrap().len(), rds);
        assert_eq!(
            root_store("x.rds.amazonaws.com.cn", None).unwrap().len(),
            rds
        );
        assert_eq!(root_store(RDS_NAME, Some(&ca_path)).unwrap().len(), rds + 1);
        assert_eq!(root_store("db.example.com", None).unwrap().len(), mozilla);
        assert_eq!(
            root_store("db.example.com", Some(&ca_path)).unwrap().len(),
            1
        );
        assert!(is_rds_host("X.Y.RDS.AMAZONAWS.COM."));
        assert!(!is_rds_host("rds.amazonaws.com.evil.example"));
    }

    #[test]
    fn config_errors_name_the_path_and_host() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err =
            upstream_client_config(SslMode::VerifyFull, RDS_NAME, Some(&missing)).unwrap_err();
        assert!(matches!(err, TlsError::ReadRootCert { .. }));
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "# nothing here\n").unwrap();
        let err = upstream_client_config(SslMode::VerifyFull, RDS_NAME, Some(&empty)).unwrap_err();
        assert!(matches!(err, TlsError::NoRootCerts { .. }));
        assert!(err.to_string().contains("empty.pem"), "{err}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = upstream_client_config(SslMode::VerifyCa, "h", Some(&garbage)).unwrap_err();
        assert!(err.to_string().contains("garbage.pem"), "{err}");

        let err = upstream_client_config(SslMode::VerifyCa, "db.example.com", None).unwrap_err();
        assert!(matches!(err, TlsError::WeakVerifyCa { .. }));
        assert!(err.to_string().contains("db.example.com"), "{err}");
        // Mozilla roots are fine for verify-full, and RDS hosts have their own CAs.
        upstream_client_config(SslMode::VerifyFull, "db.example.com", None).unwrap();
        upstream_client_config(SslMode::VerifyCa, RDS_NAME, None).unwrap();
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("db.example.com"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("10.1.2.3"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("::1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(server_name("[::1]"), Ok(ServerName::IpAddress(_))));
        let err = server_name("not a host!").unwrap_err();
        assert!(err.to_string().contains("not a host!"));
        assert!(server_name("").is_err());
    }
}
