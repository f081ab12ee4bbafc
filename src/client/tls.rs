//! TLS for client connections: the acceptor built from iampool's own certificate and key.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol PostgreSQL 17+ clients offer; selecting it lets them connect with
/// `sslnegotiation=direct` too, and clients that offer no ALPN are unaffected.
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read TLS {what} {path}: {source}; check the path and that iampool may read it"
    )]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("TLS certificate file {path} is not valid PEM: {source}")]
    ParseCert {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS certificate file {path} holds no certificates; it must hold the PEM server certificate, then any intermediates")]
    NoCerts { path: PathBuf },
    #[error("TLS key file {path} holds no usable private key: {source}; it must hold one PEM key (PKCS#8 'PRIVATE KEY', 'RSA PRIVATE KEY' or 'EC PRIVATE KEY'), unencrypted")]
    Key {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS certificate {cert} and key {key} cannot be used together: {source}; check that the key belongs to the first certificate in the file")]
    CertKey {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// A TLS acceptor for client connections, from a PEM certificate chain (server certificate
/// first) and a PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn acceptor(cert_file: &Path, key_file: &Path) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let cert_pem = read(cert_file, "certificate file")?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::ParseCert {
            path: cert_file.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCerts {
            path: cert_file.to_owned(),
        });
    }
    let key_pem = read(key_file, "key file")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| TlsError::Key {
        path: key_file.to_owned(),
        source,
    })?;

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cert_key = |source| TlsError::CertKey {
        cert: cert_file.to_owned(),
        key: key_file.to_owned(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(cert_key)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(cert_key)?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertifiedKey, KeyPair, PKCS_RSA_SHA256};

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Re-encodes a PEM key with openssl (`ec` gives SEC1, `rsa -traditional` PKCS#1),
    /// the forms operators' key files are often in.
    fn openssl_convert(args: &[&str], key: &Path, marker: &str) -> String {
        let out = std::process::Command::new("openssl")
            .args(args)
            .arg("-in")
            .arg(key)
            .output()
            .expect("openssl is needed to make SEC1/PKCS#1 test keys");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(marker), "{text}");
        text
    }

    #[test]
    fn accepts_pkcs8_sec1_and_pkcs1_keys() {
        let dir = tempfile::tempdir().unwrap();
        let CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert_path = write(dir.path(), "cert.pem", &cert.pem());
        let pkcs8 = write(dir.path(), "key.pem", &signing_key.serialize_pem());
        acceptor(&cert_path, &pkcs8).unwrap();
        let sec1 = openssl_convert(&["ec"], &pkcs8, "BEGIN EC PRIVATE KEY");
        acceptor(&cert_path, &write(dir.path(), "sec1.pem", &sec1)).unwrap();

        let rsa_key = KeyPair::generate_for(&PKCS_RSA_SHA256).unwrap();
        let rsa_cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&rsa_key)
            .unwrap();
        let rsa_cert_path = write(dir.path(), "rsa.pem", &rsa_cert.pem());
        let rsa_pkcs8 = write(dir.path(), "rsa8.key", &rsa_key.serialize_pem());
        acceptor(&rsa_cert_path, &rsa_pkcs8).unwrap();
        let pkcs1 = openssl_convert(
            &["rsa", "-traditional"],
            &rsa_pkcs8,
            "BEGIN RSA PRIVATE KEY",
        );
        acceptor(&rsa_cert_path, &write(dir.path(), "rsa1.key", &pkcs1)).unwrap();
    }

    fn err(result: Result<tokio_rustls::TlsAcceptor, TlsError>) -> TlsError {
        match result {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert_path = write(dir.path(), "cert.pem", &cert.pem());
        let key_path = write(dir.path(), "key.pem", &signing_key.serialize_pem());
        let missing = dir.path().join("missing.pem");
        let empty = write(dir.path(), "empty.pem", "");

        let e = err(acceptor(&missing, &key_path));
        assert!(
            matches!(e, TlsError::Read { .. }) && e.to_string().contains("missing.pem"),
            "{e}"
        );
        let e = err(acceptor(&empty, &key_path));
        assert!(
            matches!(e, TlsError::NoCerts { .. }) && e.to_string().contains("empty.pem"),
            "{e}"
        );
        let e = err(acceptor(&cert_path, &missing));
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = err(acceptor(&cert_path, &empty));
        assert!(
            matches!(e, TlsError::Key { .. }) && e.to_string().contains("empty.pem"),
            "{e}"
        );
        // A certificate file given as the key.
        let e = err(acceptor(&cert_path, &cert_path));
        assert!(matches!(e, TlsError::Key { .. }), "{e}");

        let other_key = write(
            dir.path(),
            "other.key",
            &KeyPair::generate().unwrap().serialize_pem(),
        );
        let e = err(acceptor(&cert_path, &other_key));
        assert!(matches!(e, TlsError::CertKey { .. }), "{e}");
        assert!(e.to_string().contains("other.key"), "{e}");
    }
}
