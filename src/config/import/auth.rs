//! Client authentication and TLS: the auth file (its users stay in it; a server password
//! PgBouncer would take from it is read here), `auth_type` and `client_tls_sslmode`.

use std::path::{Path, PathBuf};

use super::super::auth_file;
use super::super::UserSecret;
use super::convert::Import;
use super::ini::{Entry, InputError};
use super::report::Kind;

impl Import<'_> {
    pub(super) fn auth_file(&mut self, entry: Option<&Entry>) {
        let from_ini = entry.filter(|e| !e.value.is_empty());
        let (path, at, given) = match (self.userlist_arg, from_ini) {
            (Some(arg), ini) => {
                let path = std::path::absolute(arg).unwrap_or_else(|_| arg.to_path_buf());
                if let Some(ini) = ini.filter(|e| Path::new(&e.value) != path) {
                    self.report.note(
                        Kind::Changed,
                        Some(&ini.at),
                        format!(
                            "auth_file = {}: the user list given, {}, is used instead",
                            ini.value,
                            path.display()
                        ),
                    );
                }
                (path, ini.map(|e| e.at.clone()), true)
            }
            (None, Some(ini)) => (PathBuf::from(&ini.value), Some(ini.at.clone()), false),
            (None, None) => return,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                // Lines iampool refuses are the loader's to report, with their numbers.
                let (users, _) = auth_file::parse(&text);
                self.users = users;
                let mut text = format!(
                    "auth_file -> auth_file = {:?}: its {} users stay in that file, which iampool reads as PgBouncer does",
                    path.display().to_string(),
                    self.users.len()
                );
                if path.is_relative() {
                    text.push_str(" (a relative path is read from iampool's working directory, as it was from PgBouncer's)");
                }
                self.report.read.push(format!("{} (auth_file)", path.display()));
                self.report.note(Kind::Carried, at.as_ref(), text);
            }
            Err(e) if given => {
                self.errors.push(InputError::new(
                    path.display(),
                    format!("cannot read the user list: {e}"),
                    "check the path",
                ));
                return;
            }
            Err(e) => self.report.note(
                Kind::NotCarried,
                at.as_ref(),
                format!(
                    "auth_file = {}: cannot read it here ({e}), so no password PgBouncer would take from it for a server login is carried; give the file as the import's second argument",
                    path.display()
                ),
            ),
        }
        self.global(
            "auth_file",
            toml::Value::String(path.display().to_string()),
            match &at {
                Some(at) => format!("{at} auth_file"),
                None => "the user list given".into(),
            },
        );
    }

    pub(super) fn auth_type(&mut self, entry: Option<&Entry>) {
        let has_md5 = self
            .users
            .iter()
            .any(|(_, secret)| matches!(secret, UserSecret::Md5(_)));
        let fallback = if has_md5 { "md5" } else { "scram-sha-256" };
        let at = entry.map(|e| &e.at);
        let written = match entry.map(|e| e.value.to_ascii_lowercase()) {
            None => {
                self.report.note(
                    Kind::Carried,
                    None,
                    "auth_type = \"md5\": PgBouncer's default (iampool's own is scram-sha-256; a user with a SCRAM secret gets SCRAM either way)",
                );
                "md5"
            }
            Some(mode) => match mode.as_str() {
                "md5" | "scram-sha-256" => {
                    let text = format!("auth_type = {mode} -> auth_type = {mode:?}");
                    self.report.note(Kind::Carried, at, text);
                    if mode == "md5" {
                        "md5"
                    } else {
                        "scram-sha-256"
                    }
                }
                "any" => {
                    self.report.note(Kind::Carried, at, "auth_type = any -> auth_type = \"trust\": any user name gets in without a password, as with any");
                    "trust"
                }
                "trust" => {
                    self.report.note(Kind::Changed, at, "auth_type = trust -> auth_type = \"trust\": iampool's trust lets in any user name, PgBouncer's only those in auth_file");
                    "trust"
                }
                "plain" => {
                    self.report.note(Kind::Changed, at, format!("auth_type = plain -> auth_type = {fallback:?}: iampool never asks a client for its password in clear"));
                    fallback
                }
                "cert" | "hba" | "ldap" | "pam" => {
                    let why = match mode.as_str() {
                        "cert" => "iampool does not check client certificates",
                        "hba" => "iampool has no HBA rules",
                        "ldap" => "iampool has no LDAP authentication",
                        _ => "iampool has no PAM authentication",
                    };
                    self.report.note(Kind::Changed, at, format!("auth_type = {mode} -> auth_type = {fallback:?}: {why}, so every client proves a password from auth_file instead"));
                    fallback
                }
                other => {
                    let at = at.expect("set");
                    self.error(
                        at,
                        format!("auth_type: {other:?} is not an authentication type"),
                        "PgBouncer takes md5, scram-sha-256, plain, trust, any, cert, hba, ldap or pam",
                    );
                    return;
                }
            },
        };
        let from = match at {
            Some(at) => format!("{at} auth_type"),
            None => "PgBouncer's default auth_type".into(),
        };
        self.global("auth_type", toml::Value::String(written.into()), from);
    }

    pub(super) fn client_tls(&mut self, mode: Option<&Entry>, cert: Option<&Entry>) {
        let Some(entry) = mode else {
            if cert.is_some() {
                self.report.note(
                    Kind::Carried,
                    None,
                    "client_tls = \"disable\": PgBouncer's default client_tls_sslmode (iampool would allow TLS once a certificate is set)",
                );
                self.global(
                    "client_tls",
                    toml::Value::String("disable".into()),
                    "PgBouncer's default client_tls_sslmode",
                );
            }
            return;
        };
        let at = Some(&entry.at);
        let given = entry.value.to_ascii_lowercase();
        let mode = match given.as_str() {
            "disable" | "allow" | "require" => given.clone(),
            "prefer" => "allow".into(),
            "verify-ca" | "verify-full" => {
                self.report.note(
                    Kind::Changed,
                    at,
                    format!("client_tls_sslmode = {given} -> client_tls = \"require\": {}", "iampool does not check client certificates; clients still prove a password"),
                );
                self.global(
                    "client_tls",
                    toml::Value::String("require".into()),
                    format!("{} client_tls_sslmode", entry.at),
                );
                return;
            }
            other => {
                self.error(
                    &entry.at,
                    format!("client_tls_sslmode: {other:?} is not a TLS mode"),
                    "PgBouncer takes disable, allow, prefer, require, verify-ca or verify-full",
                );
                return;
            }
        };
        self.report.note(
            Kind::Carried,
            at,
            format!("client_tls_sslmode = {given} -> client_tls = {mode:?}"),
        );
        self.global(
            "client_tls",
            toml::Value::String(mode),
            format!("{} client_tls_sslmode", entry.at),
        );
    }
}
