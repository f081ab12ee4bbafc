//! The environment: `IAMPOOL_<KEY>` settings, `IAMPOOL_<KEY>_FILE` values read from files,
//! `IAMPOOL_CONFIG`, and what becomes of a variable that is none of these (a warning, or an
//! error when it names a key), with Kubernetes' service links left alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::ConfigError;
use super::keys::{self, KEYS};
use super::load::{global_setting, unknown_key_fix, Inputs, Setting};
use super::pgbouncer::{self, Section};
use super::value::Raw;
use super::Origin;

/// `IAMPOOL_<KEY>` settings, `IAMPOOL_<KEY>_FILE` (the value is that file's contents, for
/// secrets mounted from a Kubernetes Secret) and `IAMPOOL_CONFIG`. Any other `IAMPOOL_*`
/// variable is ignored with a warning (a wrapper's `IAMPOOL_BIN` is no setting), except a
/// per-database key, which is an error (its intent is plain, and ignoring `IAMPOOL_AUTH=iam`
/// would sign in another way); the service links Kubernetes injects for a Service named
/// `iampool` are ignored silently. Empty variables count as unset.
pub(crate) fn environment(
    env: impl IntoIterator<Item = (String, String)>,
    inputs: &mut Inputs,
) -> (BTreeMap<&'static str, Setting>, Option<String>) {
    let Inputs {
        errors,
        warnings,
        watched,
        ..
    } = inputs;
    let mut layer = BTreeMap::new();
    let mut config = None;
    let mut from_files = Vec::new();
    for (var, value) in env {
        let Some(suffix) = var.strip_prefix("IAMPOOL_") else {
            continue;
        };
        if value.is_empty() || is_kubernetes_service_link(suffix, &value) {
            continue;
        }
        if suffix == "CONFIG" {
            config = Some(value);
            continue;
        }
        let name = suffix.to_ascii_lowercase();
        match keys::key(&name).filter(|key| key.is_global() && key.env_var() == var) {
            Some(key) => {
                layer.insert(
                    key.name,
                    global_setting(key.name, Raw::Text(value), Origin::Env(var)),
                );
            }
            None if file_key(&name).is_some() => from_files.push((var, value)),
            None => match unknown_variable(name, var) {
                Unknown::Error(error) => errors.push(error),
                Unknown::Warning(warning) => warnings.push(warning),
            },
        }
    }
    for (var, path) in from_files {
        let key = file_key(&var["IAMPOOL_".len()..].to_ascii_lowercase()).expect("checked above");
        watched.push(PathBuf::from(&path));
        if let Some(direct) = layer.get(key.name) {
            errors.push(ConfigError {
                key: key.name.into(),
                source: var.clone(),
                message: format!("both {var} and {} are set", direct.origin),
                fix: format!("keep one of them: {var} names a file holding the value"),
            });
            continue;
        }
        match read_value_file(Path::new(&path)) {
            Ok(value) => {
                layer.insert(
                    key.name,
                    global_setting(key.name, Raw::Text(value), Origin::Env(var)),
                );
            }
            Err(e) => errors.push(ConfigError {
                key: key.name.into(),
                source: var.clone(),
                message: format!("cannot read {path}: {e}"),
                fix: format!(
                    "mount the file there (e.g. from a Kubernetes Secret), or set {} instead",
                    key.env_var()
                ),
            }),
        }
    }
    (layer, config)
}

enum Unknown {
    Error(ConfigError),
    Warning(ConfigError),
}

/// An `IAMPOOL_<NAME>` that sets nothing: an error when it names a key (in the wrong case, or
/// one set per database), otherwise a warning with the nearest fix.
fn unknown_variable(name: String, var: String) -> Unknown {
    let env_var = |key: &str| format!("IAMPOOL_{}", key.to_ascii_uppercase());
    if let Some(key) = keys::key(&name) {
        let fix = if key.is_global() {
            format!("write it in upper case: {}", key.env_var())
        } else {
            unknown_key_fix(&name, "")
        };
        return Unknown::Error(ConfigError {
            key: name,
            source: var,
            message: "unknown environment variable".into(),
            fix,
        });
    }
    let candidates = || KEYS.iter().filter(|k| k.is_global()).map(|k| k.name);
    let fix = pgbouncer::hint(&name, Section::Pgbouncer, &env_var)
        .or_else(|| {
            super::error::did_you_mean(&name, candidates())
                .map(|close| format!("did you mean {}?", env_var(close)))
        })
        .or_else(|| {
            let stem = name.strip_suffix("_file")?;
            super::error::did_you_mean(stem, candidates())
                .map(|close| format!("did you mean {}_FILE?", env_var(close)))
        })
        .unwrap_or_else(|| {
            "if it was meant as a setting, iampool --help lists every IAMPOOL_<KEY>".into()
        });
    Unknown::Warning(ConfigError {
        key: name,
        source: var,
        message: "unknown environment variable, ignored".into(),
        fix,
    })
}

/// The key `IAMPOOL_<KEY>_FILE` sets, for a lower-cased suffix `<key>_file` that is not itself
/// a key (`auth_file` is one; `auth_file_file` would name a file holding its path).
fn file_key(name: &str) -> Option<&'static keys::Key> {
    let stem = name.strip_suffix("_file")?;
    keys::key(stem).filter(|key| key.is_global())
}

/// A value kept in a file: its contents without the line ends that editors and `echo` add.
fn read_value_file(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// `SERVICE_HOST`, `SERVICE_PORT[_NAME]`, `PORT=tcp://...`, `PORT_6432_TCP[_PROTO|_PORT|_ADDR]`:
/// set in every pod of a namespace with a Service named `iampool`, so they cannot be typos.
fn is_kubernetes_service_link(suffix: &str, value: &str) -> bool {
    if suffix == "SERVICE_HOST" || suffix.starts_with("SERVICE_PORT") {
        return true;
    }
    if suffix == "PORT" {
        return ["tcp://", "udp://", "sctp://"]
            .iter()
            .any(|scheme| value.starts_with(scheme));
    }
    let Some(rest) = suffix.strip_prefix("PORT_") else {
        return false;
    };
    let mut parts = rest.splitn(3, '_');
    let port = parts.next().unwrap_or_default();
    let protocol = parts.next().unwrap_or_default();
    let field = parts.next();
    !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && ["TCP", "UDP", "SCTP"].contains(&protocol)
        && field.is_none_or(|field| ["PROTO", "PORT", "ADDR"].contains(&field))
}
