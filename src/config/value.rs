//! Parsing one raw value (an env/flag string or a TOML value) into a typed value.
//!
//! Every parser takes the key it reads so that its fix can name the unit and an example.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::error::Problem;
use super::keys::{Key, Kind};
use super::{
    AuthType, ClientTls, LoadBalanceHosts, LogFormat, PoolMode, SessionStateMode, SslMode,
    TargetSessionAttrs,
};

/// A value before parsing: text from env, a flag or a URL, or a value from the TOML file.
#[derive(Clone, Debug)]
pub(crate) enum Raw {
    Text(String),
    Toml(toml::Value),
}

impl Raw {
    /// The value quoted for an error message. Only called for keys that hold no secret.
    fn shown(&self) -> String {
        match self {
            Raw::Text(text) => format!("{text:?}"),
            Raw::Toml(value) => value.to_string(),
        }
    }

    /// Text of a string-like value; TOML integers and booleans are accepted as their text.
    fn text(&self, key: &Key) -> Result<Cow<'_, str>, Problem> {
        match self {
            Raw::Text(text) => Ok(Cow::Borrowed(text.trim())),
            Raw::Toml(toml::Value::String(text)) => Ok(Cow::Borrowed(text.trim())),
            Raw::Toml(toml::Value::Integer(n)) => Ok(Cow::Owned(n.to_string())),
            Raw::Toml(toml::Value::Boolean(b)) => Ok(Cow::Owned(b.to_string())),
            Raw::Toml(other) => Err(Problem::new(
                format!("{} is a {}, not a single value", other, other.type_str()),
                format!(
                    "write it as a string, e.g. {} = {:?}",
                    key.name, key.example
                ),
            )),
        }
    }

    /// Items of a list: split text with `split`, or the strings of a TOML array.
    fn items(&self, key: &Key, split: fn(&str) -> Vec<&str>) -> Result<Vec<String>, Problem> {
        let owned = |items: Vec<&str>| items.into_iter().map(str::to_string).collect();
        match self {
            Raw::Toml(toml::Value::Array(values)) => values
                .iter()
                .map(|value| match value {
                    toml::Value::String(text) => Ok(text.trim().to_string()),
                    other => Err(Problem::new(
                        format!("the list holds {other}, which is not a string"),
                        format!(
                            "write a list of strings, e.g. {} = [{:?}]",
                            key.name, key.example
                        ),
                    )),
                })
                .collect(),
            _ => Ok(owned(split(&self.text(key)?))),
        }
    }
}

fn comma_list(text: &str) -> Vec<&str> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .collect()
}

fn whitespace_list(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

pub(crate) fn count(raw: &Raw, key: &Key) -> Result<u64, Problem> {
    let fix = || format!("set a whole number of {}, e.g. {}", key.unit, key.example);
    if let Raw::Toml(toml::Value::Integer(n)) = raw {
        return u64::try_from(*n).map_err(|_| Problem::new(format!("{n} is negative"), fix()));
    }
    let text = raw.text(key)?;
    text.parse::<u64>()
        .map_err(|_| Problem::new(format!("{} is not a number", raw.shown()), fix()))
}

/// Like [`count`], within `min..=max`.
pub(crate) fn count_in(raw: &Raw, key: &Key, min: u64, max: u64) -> Result<u64, Problem> {
    let n = count(raw, key)?;
    if n < min || n > max {
        return Err(Problem::new(
            format!("{n} is out of range"),
            format!(
                "set between {min} and {max} {}, e.g. {}",
                key.unit, key.example
            ),
        ));
    }
    Ok(n)
}

const DURATION_UNITS: &[(&str, u64)] = &[
    ("us", 1),
    ("ms", 1_000),
    ("s", 1_000_000),
    ("min", 60_000_000),
    ("h", 3_600_000_000),
    ("d", 86_400_000_000),
];

pub(crate) fn duration(raw: &Raw, key: &Key) -> Result<Duration, Problem> {
    let fix = || {
        format!(
            "set a number of seconds or a whole number with a unit (us, ms, s, min, h, d), e.g. {}",
            key.example
        )
    };
    if let Raw::Toml(toml::Value::Integer(n)) = raw {
        return u64::try_from(*n)
            .map(Duration::from_secs)
            .map_err(|_| Problem::new(format!("{n} is negative"), fix()));
    }
    let text = raw.text(key)?;
    let micros = with_unit(&text, "s", DURATION_UNITS)
        .ok_or_else(|| Problem::new(format!("{} is not a duration", raw.shown()), fix()))?;
    Ok(Duration::from_micros(micros))
}

/// Like [`duration`], where 0 means "off".
pub(crate) fn optional_duration(raw: &Raw, key: &Key) -> Result<Option<Duration>, Problem> {
    duration(raw, key).map(|d| (!d.is_zero()).then_some(d))
}

const SIZE_UNITS: &[(&str, u64)] = &[
    ("b", 1),
    ("kb", 1 << 10),
    ("mb", 1 << 20),
    ("gb", 1 << 30),
    ("tb", 1 << 40),
];

pub(crate) fn size(raw: &Raw, key: &Key) -> Result<u64, Problem> {
    let fix = || {
        format!(
            "set a number of bytes or a whole number with a unit (kB, MB, GB), e.g. {}",
            key.example
        )
    };
    if let Raw::Toml(toml::Value::Integer(n)) = raw {
        return u64::try_from(*n).map_err(|_| Problem::new(format!("{n} is negative"), fix()));
    }
    let text = raw.text(key)?.to_ascii_lowercase();
    with_unit(&text, "b", SIZE_UNITS)
        .ok_or_else(|| Problem::new(format!("{} is not a size", raw.shown()), fix()))
}

/// `number[ ]unit` scaled by the unit's factor; a bare number takes `bare_unit`.
fn with_unit(text: &str, bare_unit: &str, units: &[(&str, u64)]) -> Option<u64> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit = match unit.trim() {
        "" => bare_unit,
        unit => unit,
    };
    let factor = units.iter().find(|(name, _)| *name == unit)?.1;
    number.checked_mul(factor)
}

pub(crate) fn boolean(raw: &Raw, key: &Key) -> Result<bool, Problem> {
    if let Raw::Toml(toml::Value::Boolean(b)) = raw {
        return Ok(*b);
    }
    match raw.text(key)?.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err(Problem::new(
            format!("{} is not a boolean", raw.shown()),
            format!("set true or false (also on/off, 1/0), e.g. {}", key.example),
        )),
    }
}

/// One of the names of a `Kind::Choice` key, as written in the table.
pub(crate) fn choice(raw: &Raw, key: &Key) -> Result<&'static str, Problem> {
    let Kind::Choice(names) = key.kind else {
        unreachable!("{} is not a choice key", key.name)
    };
    let text = raw.text(key)?.to_ascii_lowercase();
    names
        .iter()
        .copied()
        .find(|name| *name == text)
        .ok_or_else(|| {
            Problem::new(
                format!("{} is not one of {}", raw.shown(), names.join(", ")),
                format!("set one of {}, e.g. {}", names.join(", "), key.example),
            )
        })
}

/// A `Kind::Choice` key read straight into its enum.
pub(crate) fn named<T: Named>(raw: &Raw, key: &Key) -> Result<T, Problem> {
    let name = choice(raw, key)?;
    Ok(T::from_name(name).expect("the key table lists only the enum's names"))
}

pub(crate) fn text(raw: &Raw, key: &Key) -> Result<String, Problem> {
    match raw {
        Raw::Toml(toml::Value::String(text)) => Ok(text.clone()),
        Raw::Text(text) => Ok(text.clone()),
        Raw::Toml(other) => Err(Problem::new(
            format!("{other} is not a string"),
            format!("write it in quotes, e.g. {} = {:?}", key.name, key.example),
        )),
    }
}

/// Text that must not be empty.
pub(crate) fn name(raw: &Raw, key: &Key) -> Result<String, Problem> {
    let value = text(raw, key)?.trim().to_string();
    if value.is_empty() {
        return Err(Problem::new(
            "is empty",
            format!("set a value, e.g. {}", key.example),
        ));
    }
    Ok(value)
}

pub(crate) fn names(raw: &Raw, key: &Key) -> Result<Vec<String>, Problem> {
    raw.items(key, comma_list)
}

/// Whitespace-separated URLs, or one keyword=value string (text not starting with a scheme).
pub(crate) fn upstreams(raw: &Raw, key: &Key) -> Result<Vec<String>, Problem> {
    let items = match raw {
        Raw::Toml(toml::Value::Array(_)) => return raw.items(key, whitespace_list),
        _ => raw.items(key, |text| {
            if super::url::is_url(text) {
                whitespace_list(text)
            } else {
                vec![text]
            }
        })?,
    };
    let urls = items.iter().filter(|item| super::url::is_url(item)).count();
    let mixed = match items.as_slice() {
        [one] if urls == 0 => one
            .split(|c: char| c.is_whitespace())
            .any(super::url::is_url),
        _ => urls != items.len(),
    };
    if mixed {
        return Err(Problem::new(
            "mixes postgres:// URLs and a keyword=value string",
            "one keyword=value string is one database: give several databases as URLs separated by whitespace, or as [databases.NAME] tables",
        ));
    }
    Ok(items)
}

pub(crate) fn addr(raw: &Raw, key: &Key) -> Result<SocketAddr, Problem> {
    socket_addr(&raw.text(key)?, key)
}

pub(crate) fn addrs(raw: &Raw, key: &Key) -> Result<Vec<SocketAddr>, Problem> {
    let items = raw.items(key, comma_list)?;
    if items.is_empty() {
        return Err(Problem::new(
            "lists no address",
            format!("set at least one host:port, e.g. {}", key.example),
        ));
    }
    items.iter().map(|item| socket_addr(item, key)).collect()
}

fn socket_addr(text: &str, key: &Key) -> Result<SocketAddr, Problem> {
    text.parse().map_err(|_| {
        Problem::new(
            format!("{text:?} is not an IP address and port"),
            format!(
                "write IP:port ([IPv6]:port for IPv6; 0.0.0.0 for every interface), e.g. {}",
                key.example
            ),
        )
    })
}

/// libpq's hostaddr: IP literals, one per host, comma-separated; an empty entry resolves that
/// host's name. `None` for an empty value.
pub(crate) fn ips(raw: &Raw, key: &Key) -> Result<Option<Vec<Option<IpAddr>>>, Problem> {
    let text = raw.text(key)?;
    super::url::parse_hostaddrs(&text).map_err(|(message, _)| {
        Problem::new(
            message.replacen("hostaddr ", "", 1),
            format!(
                "hostaddr takes IP literals only (one per host, comma-separated; an empty entry resolves that host); put host names in the host part instead, e.g. {}",
                key.example
            ),
        )
    })
}

/// libpq's connect_timeout: whole seconds; 0 is none (`None`), and 1 counts as 2, as in libpq.
pub(crate) fn connect_timeout(raw: &Raw, key: &Key) -> Result<Option<Duration>, Problem> {
    let seconds = count(raw, key)?;
    Ok(match seconds {
        0 => None,
        1 => Some(Duration::from_secs(2)),
        n => Some(Duration::from_secs(n)),
    })
}

/// Text where empty means unset.
pub(crate) fn optional_text(raw: &Raw, key: &Key) -> Result<Option<String>, Problem> {
    text(raw, key).map(|text| Some(text).filter(|text| !text.is_empty()))
}

/// A path that must exist: a directory for `Kind::Dir`, a file for `Kind::File`.
pub(crate) fn path(raw: &Raw, key: &Key) -> Result<PathBuf, Problem> {
    let path = PathBuf::from(text(raw, key)?);
    let (exists, what) = match key.kind {
        Kind::Dir => (path.is_dir(), "directory"),
        _ => (path.is_file(), "file"),
    };
    if !exists {
        return Err(Problem::new(
            format!("{} is not an existing {what}", raw.shown()),
            format!(
                "check the path and that iampool may read it, e.g. {}",
                key.example
            ),
        ));
    }
    Ok(path)
}

pub(crate) fn region(raw: &Raw, key: &Key) -> Result<String, Problem> {
    let value = text(raw, key)?.trim().to_string();
    if !is_region(&value) {
        return Err(Problem::new(
            format!("{} is not an AWS region name", raw.shown()),
            format!("set the database's region, e.g. {}", key.example),
        ));
    }
    Ok(value)
}

/// `us-east-1`, `cn-north-1`, `us-gov-west-1`: lower-case words and a trailing number.
pub(crate) fn is_region(name: &str) -> bool {
    let mut parts = name.split('-');
    let first_is_word = parts
        .next()
        .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()));
    let rest: Vec<&str> = parts.collect();
    first_is_word
        && rest.len() >= 2
        && rest
            .last()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && rest[..rest.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
}

pub(crate) fn arns(raw: &Raw, key: &Key) -> Result<Vec<String>, Problem> {
    let items = raw.items(key, comma_list)?;
    if let Some(bad) = items.iter().find(|arn| !is_role_arn(arn)) {
        return Err(Problem::new(
            format!("{bad:?} is not an IAM role ARN"),
            format!(
                "write arn:PARTITION:iam::ACCOUNT:role/NAME, e.g. {}",
                key.example
            ),
        ));
    }
    Ok(items)
}

fn is_role_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5]
            .strip_prefix("role/")
            .is_some_and(|name| !name.is_empty())
}

pub(crate) fn log_filter(raw: &Raw, key: &Key) -> Result<String, Problem> {
    let value = text(raw, key)?;
    tracing_subscriber::EnvFilter::try_new(&value).map_err(|e| {
        Problem::new(
            format!("{} is not a log filter ({e})", raw.shown()),
            format!("use tracing EnvFilter syntax, e.g. {}", key.example),
        )
    })?;
    Ok(value)
}

/// Whether `raw` is a well-formed value for `key`'s kind (ranges are checked where it is used).
pub(crate) fn check(raw: &Raw, key: &Key) -> Result<(), Problem> {
    match key.kind {
        Kind::Addrs => addrs(raw, key).map(drop),
        Kind::Addr => addr(raw, key).map(drop),
        Kind::Dir | Kind::File => path(raw, key).map(drop),
        Kind::Count => count(raw, key).map(drop),
        Kind::Duration => duration(raw, key).map(drop),
        Kind::Size => size(raw, key).map(drop),
        Kind::Text => text(raw, key).map(drop),
        Kind::Choice(_) => choice(raw, key).map(drop),
        Kind::LogFilter => log_filter(raw, key).map(drop),
        Kind::Names => names(raw, key).map(drop),
        Kind::Urls => upstreams(raw, key).map(drop),
        Kind::Arns => arns(raw, key).map(drop),
        Kind::Bool => boolean(raw, key).map(drop),
        Kind::Ip => ips(raw, key).map(drop),
        Kind::Region => region(raw, key).map(drop),
    }
}

/// Enums whose values are named in the key table and rendered back by name.
pub trait Named: Sized + Copy + 'static {
    const NAMES: &'static [&'static str];
    fn from_name(name: &str) -> Option<Self>;
    fn name(self) -> &'static str;
}

macro_rules! named {
    ($type:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl Named for $type {
            const NAMES: &'static [&'static str] = &[$($name),+];
            fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($name => Some($type::$variant),)+
                    _ => None,
                }
            }
            fn name(self) -> &'static str {
                match self {
                    $($type::$variant => $name,)+
                }
            }
        }
    };
}

named!(PoolMode { Transaction => "transaction", Session => "session" });
named!(AuthType { ScramSha256 => "scram-sha-256", Md5 => "md5", Trust => "trust" });
named!(ClientTls { Disable => "disable", Allow => "allow", Require => "require" });
named!(LogFormat { Text => "text", Json => "json" });
named!(SessionStateMode { Pin => "pin", Warn => "warn" });
named!(TargetSessionAttrs {
    Any => "any",
    ReadWrite => "read-write",
    ReadOnly => "read-only",
    Primary => "primary",
    Standby => "standby",
    PreferStandby => "prefer-standby",
});
named!(LoadBalanceHosts { Disable => "disable", Random => "random" });
named!(SslMode {
    Disable => "disable",
    Allow => "allow",
    Prefer => "prefer",
    Require => "require",
    VerifyCa => "verify-ca",
    VerifyFull => "verify-full",
});

#[cfg(test)]
mod tests {
    use super::super::keys::key;
    use super::*;

    fn text_raw(s: &str) -> Raw {
        Raw::Text(s.to_string())
    }

    #[test]
    fn durations_take_postgres_units() {
        let k = key("server_lifetime").unwrap();
        let d = |s: &str| duration(&text_raw(s), k);
        assert_eq!(d("30"), Ok(Duration::from_secs(30)));
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(d("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(d("5min"), Ok(Duration::from_secs(300)));
        assert_eq!(d("5 min"), Ok(Duration::from_secs(300)));
        assert_eq!(d("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(d("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(d("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(
            duration(&Raw::Toml(toml::Value::Integer(45)), k),
            Ok(Duration::from_secs(45))
        );
        for bad in ["", "s", "1.5s", "-1", "5 minutes", "10x"] {
            let problem = d(bad).unwrap_err();
            assert!(
                problem.message.contains("is not a duration"),
                "{bad}: {problem:?}"
            );
            assert!(problem.fix.contains("30min"));
        }
        assert!(duration(&Raw::Toml(toml::Value::Integer(-3)), k).is_err());
    }

    #[test]
    fn sizes_take_bytes_or_units() {
        let k = key("max_message_size").unwrap();
        let s = |t: &str| size(&text_raw(t), k);
        assert_eq!(s("8192"), Ok(8192));
        assert_eq!(s("64kB"), Ok(64 * 1024));
        assert_eq!(s("8MB"), Ok(8 << 20));
        assert_eq!(s("1GB"), Ok(1 << 30));
        assert_eq!(s("1 gb"), Ok(1 << 30));
        assert!(s("1.5MB").is_err());
        assert!(s("lots").is_err());
        assert_eq!(size(&Raw::Toml(toml::Value::Integer(100)), k), Ok(100));
    }

    #[test]
    fn booleans_and_counts() {
        let k = key("allow_cleartext_password").unwrap();
        for (t, want) in [
            ("true", true),
            ("ON", true),
            ("1", true),
            ("off", false),
            ("0", false),
        ] {
            assert_eq!(boolean(&text_raw(t), k), Ok(want));
        }
        assert!(boolean(&text_raw("maybe"), k).is_err());
        let k = key("pool_size").unwrap();
        let problem = count(&text_raw("ten"), k).unwrap_err();
        assert_eq!(problem.message, "\"ten\" is not a number");
        assert_eq!(
            problem.fix,
            "set a whole number of server connections, e.g. 20"
        );
    }

    #[test]
    fn every_default_parses_and_every_choice_maps() {
        use super::super::keys::{DefaultValue, KEYS};
        for k in KEYS {
            if let (DefaultValue::Value(v), Kind::Choice(names)) = (k.default, k.kind) {
                assert!(names.contains(&v), "{}", k.name);
            }
        }
        for name in SslMode::NAMES {
            assert_eq!(SslMode::from_name(name).unwrap().name(), *name);
        }
        for name in AuthType::NAMES {
            assert_eq!(AuthType::from_name(name).unwrap().name(), *name);
        }
    }

    #[test]
    fn regions_and_arns() {
        assert!(is_region("us-east-1"));
        assert!(is_region("us-gov-west-1"));
        assert!(!is_region("useast1"));
        assert!(!is_region("US-EAST-1"));
        assert!(is_role_arn("arn:aws:iam::123456789012:role/x"));
        assert!(is_role_arn("arn:aws-cn:iam::123456789012:role/path/x"));
        assert!(!is_role_arn("arn:aws:iam::123:role/x"));
        assert!(!is_role_arn("arn:aws:iam::123456789012:user/x"));
    }
}
