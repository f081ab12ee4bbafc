//! PgBouncer's values read as PgBouncer reads them (numbers as C's strtol, times as seconds
//! with a fraction, booleans as numbers) and written as the iampool key's TOML value.

use std::time::Duration;

use super::super::keys::{Key, Kind};
use super::super::render;
use super::super::value::{self as iampool_value, Raw};

/// Why a value is not carried.
#[derive(Debug, PartialEq, Eq)]
pub enum Bad {
    /// PgBouncer itself would refuse it: the input is wrong.
    Pgbouncer(String),
    /// PgBouncer takes it, iampool does not.
    Iampool(String),
}

/// A whole number as PgBouncer reads one: decimal, `0x` hex or `0` octal, with a sign.
pub fn integer(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (radix, digits) = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        (16, hex)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let n = i64::from_str_radix(digits, radix).ok()?;
    Some(if negative { -n } else { n })
}

/// A time as PgBouncer reads one: seconds, with a fraction (`0.5`), not negative.
pub fn seconds(text: &str) -> Option<Duration> {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    let secs: f64 = text.parse().ok().filter(|_| plain)?;
    (0.0..1e12)
        .contains(&secs)
        .then(|| Duration::from_micros((secs * 1e6).round() as u64))
}

fn count(text: &str) -> Result<u64, Bad> {
    match integer(text) {
        Some(n) if n >= 0 => Ok(n as u64),
        Some(_) => Err(Bad::Pgbouncer(format!("{text:?} is negative"))),
        None => Err(Bad::Pgbouncer(format!(
            "{text:?} is not a number (PgBouncer reads ; and # as a comment only at the start of a line)"
        ))),
    }
}

/// The TOML value of iampool's `key` for PgBouncer's `text`, checked by iampool's own parser
/// (except that files need not exist here).
pub fn for_key(key: &Key, text: &str) -> Result<toml::Value, Bad> {
    let value = match key.kind {
        Kind::Count | Kind::Size => toml::Value::Integer(count(text)?.min(i64::MAX as u64) as i64),
        Kind::Duration => {
            let time = seconds(text)
                .ok_or_else(|| Bad::Pgbouncer(format!("{text:?} is not a number of seconds")))?;
            duration(time)
        }
        Kind::Bool => toml::Value::Boolean(
            integer(text).ok_or_else(|| Bad::Pgbouncer(format!("{text:?} is not 0 or 1")))? != 0,
        ),
        Kind::Names | Kind::Addrs | Kind::Arns => toml::Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| toml::Value::String(item.to_string()))
                .collect(),
        ),
        Kind::Choice(_) => toml::Value::String(text.to_ascii_lowercase()),
        Kind::Dir | Kind::File => return Ok(toml::Value::String(text.to_string())),
        _ => toml::Value::String(text.to_string()),
    };
    check(key, value)
}

/// `value` if iampool's parser takes it for `key`.
pub fn check(key: &Key, value: toml::Value) -> Result<toml::Value, Bad> {
    match iampool_value::check(&Raw::Toml(value.clone()), key) {
        Ok(()) => Ok(value),
        Err(problem) => Err(Bad::Iampool(format!(
            "iampool's {} does not take {}: {}",
            key.name, value, problem.message
        ))),
    }
}

/// A duration as iampool writes one: `1h`, `30s`, `500ms`, or 0.
pub fn duration(time: Duration) -> toml::Value {
    render::duration(time).unwrap_or(toml::Value::Integer(0))
}

/// A value in a libpq keyword=value string: as it is, or in single quotes with `\` before
/// `'` and `\` when it holds spaces or quotes (or is empty).
pub fn libpq_quoted(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        return value.to_string();
    }
    let mut quoted = String::from("'");
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

/// One `-c name=value` of libpq's options, with `\` before spaces and backslashes.
pub fn option(name: &str, value: &str) -> String {
    let mut escaped = String::new();
    for c in value.chars() {
        if c == ' ' || c == '\\' {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    format!("-c {name}={escaped}")
}

#[cfg(test)]
mod tests {
    use super::super::super::keys;
    use super::*;

    #[test]
    fn numbers_as_strtol_reads_them() {
        assert_eq!(integer("20"), Some(20));
        assert_eq!(integer("0x1f"), Some(31));
        assert_eq!(integer("0777"), Some(511));
        assert_eq!(integer("0"), Some(0));
        assert_eq!(integer("-3"), Some(-3));
        assert_eq!(integer("08"), None);
        assert_eq!(integer("20 ; comment"), None);
        assert_eq!(integer(""), None);
    }

    #[test]
    fn times_are_seconds_with_fractions() {
        assert_eq!(seconds("5"), Some(Duration::from_secs(5)));
        assert_eq!(seconds("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(seconds("3600.0"), Some(Duration::from_secs(3600)));
        assert_eq!(seconds("-1"), None);
        assert_eq!(seconds("5s"), None);
        assert_eq!(seconds("inf"), None);
        assert_eq!(duration(Duration::from_secs(3600)).to_string(), "\"1h\"");
        assert_eq!(duration(Duration::ZERO).to_string(), "0");
    }

    #[test]
    fn values_take_the_iampool_key_kind() {
        let key = |name| keys::key(name).unwrap();
        assert_eq!(
            for_key(key("pool_size"), "30"),
            Ok(toml::Value::Integer(30))
        );
        assert_eq!(
            for_key(key("server_lifetime"), "1800.0")
                .unwrap()
                .to_string(),
            "\"30min\""
        );
        assert_eq!(
            for_key(key("admin_users"), "admin, ops")
                .unwrap()
                .to_string(),
            "[\"admin\", \"ops\"]"
        );
        assert_eq!(
            for_key(key("auth_file"), "/no/such/file"),
            Ok(toml::Value::String("/no/such/file".into()))
        );
        assert!(matches!(
            for_key(key("pool_size"), "many"),
            Err(Bad::Pgbouncer(_))
        ));
        assert!(matches!(
            for_key(key("pool_size"), "-1"),
            Err(Bad::Pgbouncer(_))
        ));
        assert!(matches!(
            for_key(key("sslmode"), "sometimes"),
            Err(Bad::Iampool(m)) if m.contains("sslmode")
        ));
    }

    #[test]
    fn quoting_for_libpq_and_options() {
        assert_eq!(libpq_quoted("db1,db2"), "db1,db2");
        assert_eq!(libpq_quoted("my db"), "'my db'");
        assert_eq!(libpq_quoted("it's"), "'it\\'s'");
        assert_eq!(libpq_quoted(""), "''");
        assert_eq!(option("datestyle", "ISO, MDY"), "-c datestyle=ISO,\\ MDY");
    }
}
