//! Test certificates: a throwaway CA that issues server certificates for iampool and for
//! the test PostgreSQL, written as PEM files.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A test certificate authority. `ca_path` is the PEM file to give clients as
/// `sslrootcert`.
pub struct TestPki {
    pub ca_pem: String,
    pub ca_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl TestPki {
    /// Creates a CA and writes its certificate to `dir/ca.pem`.
    pub fn new(dir: &Path) -> TestPki {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "iampool test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("generate CA key");
        let ca_pem = params.self_signed(&key).expect("self-sign CA").pem();
        let ca_path = dir.join("ca.pem");
        write(&ca_path, &ca_pem, 0o644);
        TestPki {
            ca_pem,
            ca_path,
            issuer: Issuer::new(params, key),
        }
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses) and writes
    /// `<first name>.crt` and `<first name>.key` into `dir`, both mode 0644 so another
    /// user's process can read them (use [`install_for_postgres`] for PostgreSQL itself).
    pub fn issue_server(&self, dir: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
        assert!(
            !names.is_empty(),
            "a server certificate needs at least one name"
        );
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("certificate names");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("generate server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign server certificate");

        let stem: String = names[0]
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        write(&cert_path, &cert.pem(), 0o644);
        write(&key_path, &key.serialize_pem(), 0o644);
        (cert_path, key_path)
    }
}

/// Copies a certificate and key into `dest_dir` (created if missing) as `server.crt` and
/// `server.key`, in the form PostgreSQL insists on: the key mode 0600 and owned by the
/// server's OS user. When the tests run as root that user is `postgres`, so the files and
/// `dest_dir` are chowned to it; otherwise they stay with the current user. `dest_dir`'s
/// parents must let that user through (a fresh directory under /tmp does).
pub fn install_for_postgres(cert: &Path, key: &Path, dest_dir: &Path) -> (PathBuf, PathBuf) {
    fs::create_dir_all(dest_dir).expect("create cert dir for postgres");
    fs::set_permissions(dest_dir, fs::Permissions::from_mode(0o755)).expect("chmod cert dir");
    let cert_dest = dest_dir.join("server.crt");
    let key_dest = dest_dir.join("server.key");
    fs::copy(cert, &cert_dest).expect("copy server certificate");
    fs::copy(key, &key_dest).expect("copy server key");
    fs::set_permissions(&cert_dest, fs::Permissions::from_mode(0o644)).expect("chmod cert");
    fs::set_permissions(&key_dest, fs::Permissions::from_mode(0o600)).expect("chmod key");
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(dest_dir)
            .arg(&cert_dest)
            .arg(&key_dest)
            .status()
            .expect("run chown");
        assert!(
            status.success(),
            "chown postgres:postgres {dest_dir:?} failed"
        );
    }
    (cert_dest, key_dest)
}

fn write(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {path:?}: {e}"));
}
