//! libpq-style upstream URLs: `postgres://user[:password]@host[:port]/dbname?param=value`.
//!
//! This file knows the syntax only; which parameters exist is the key table's business.
//! Passwords become [`Secret`] at once, and every message quotes the URL through [`redact`].

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::error::Problem;
use super::Secret;

const DEFAULT_PORT: u16 = 5432;

/// The parts of one upstream URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// Host name or IP literal, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    /// Defaults to `user`.
    pub dbname: String,
    /// Decoded query parameters in the order written.
    pub params: Vec<(String, String)>,
}

pub fn parse(url: &str) -> Result<UpstreamUrl, Problem> {
    let fail = |message: &str, fix: &str| {
        Problem::new(format!("{}: {message}", quoted(url)), fix.to_string())
    };
    let rest = strip_scheme(url).ok_or_else(|| {
        fail(
            "does not start with postgres:// or postgresql://",
            "write postgres://user@host:port/dbname",
        )
    })?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, hostport)) = authority.rsplit_once('@') else {
        return Err(fail(
            "names no user",
            "write postgres://USER@host/dbname (percent-encode / ? @ in a password)",
        ));
    };
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (userinfo, None),
    };
    let user = decode(user).map_err(|_| {
        fail(
            "the user name is not valid percent-encoding",
            "encode bytes as %XX",
        )
    })?;
    if user.is_empty() {
        return Err(fail("names no user", "write postgres://USER@host/dbname"));
    }
    let password = match password {
        Some(password) => Some(decode(password).map_err(|_| {
            fail(
                "the password is not valid percent-encoding",
                "encode special characters in the password as %XX",
            )
        })?),
        None => None,
    }
    .filter(|password| !password.is_empty())
    .map(Secret::new);
    let (host, port) = split_host_port(hostport).map_err(|(message, fix)| fail(message, fix))?;

    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    let dbname = decode(path.strip_prefix('/').unwrap_or(path)).map_err(|_| {
        fail(
            "the database name is not valid percent-encoding",
            "encode bytes as %XX",
        )
    })?;
    let dbname = if dbname.is_empty() {
        user.clone()
    } else {
        dbname
    };

    let mut params: Vec<(String, String)> = Vec::new();
    for pair in query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
    {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(fail(
                &format!("parameter {pair:?} has no value"),
                "write name=value",
            ));
        };
        let bad = || {
            fail(
                &format!("parameter {name:?} is not valid percent-encoding"),
                "encode bytes as %XX",
            )
        };
        let name = decode(name).map_err(|_| bad())?;
        let value = decode(value).map_err(|_| bad())?;
        if params.iter().any(|(seen, _)| *seen == name) {
            return Err(fail(
                &format!("parameter {name} is given twice"),
                "keep one",
            ));
        }
        params.push((name, value));
    }
    Ok(UpstreamUrl {
        host,
        port,
        user,
        password,
        dbname,
        params,
    })
}

fn strip_scheme(url: &str) -> Option<&str> {
    ["postgresql://", "postgres://"].iter().find_map(|scheme| {
        url.get(..scheme.len())
            .filter(|prefix| prefix.eq_ignore_ascii_case(scheme))
            .map(|_| &url[scheme.len()..])
    })
}

type SyntaxError = (&'static str, &'static str);

fn split_host_port(hostport: &str) -> Result<(String, u16), SyntaxError> {
    if hostport.contains(',') {
        return Err((
            "lists several hosts",
            "give one host per URL; several databases are several URLs",
        ));
    }
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or((
            "has an IPv6 address without its closing ]",
            "write [::1]:5432",
        ))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err((
                "has an invalid IPv6 address in brackets",
                "write [::1]:5432",
            ));
        }
        match after {
            "" => (host.to_string(), None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host.to_string(), Some(port)),
                None => return Err(("has text after the IPv6 address", "write [::1]:5432")),
            },
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(("has an IPv6 address without brackets", "write [::1]:5432"))
            }
            Some((host, port)) => (decode_host(host)?, Some(port)),
            None => (decode_host(hostport)?, None),
        }
    };
    if host.is_empty() {
        return Err(("names no host", "write postgres://user@HOST:5432/dbname"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => port.parse::<u16>().ok().filter(|port| *port != 0).ok_or((
            "has a port that is not a number from 1 to 65535",
            "write host:5432",
        ))?,
    };
    Ok((host, port))
}

fn decode_host(host: &str) -> Result<String, SyntaxError> {
    decode(host).map_err(|_| {
        (
            "the host is not valid percent-encoding",
            "encode bytes as %XX",
        )
    })
}

/// Percent-decoding that rejects a `%` not followed by two hex digits, and invalid UTF-8.
fn decode(text: &str) -> Result<String, ()> {
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices('%') {
        let hex = bytes.get(i + 1..i + 3).ok_or(())?;
        if !hex.iter().all(u8::is_ascii_hexdigit) {
            return Err(());
        }
    }
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ())
}

/// The URL with any password replaced by `***`, safe to print. Works on URLs that do not parse:
/// then everything between the first `:` after the scheme and the last `@` is hidden.
pub fn redact(url: &str) -> String {
    let scheme_len = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_len..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let cut = match rest[..authority_end].rsplit_once('@') {
        // The usual case: user:password@host inside the authority.
        Some((userinfo, _)) => userinfo.find(':').map(|colon| (colon, userinfo.len())),
        // An unencoded / or ? in the password ends the authority early: hide up to the last @.
        None => match (rest.find(':'), rest.rfind('@')) {
            (Some(colon), Some(at)) if colon < at => Some((colon, at)),
            _ => None,
        },
    };
    match cut {
        Some((colon, end)) => format!(
            "{}{}:***{}",
            &url[..scheme_len],
            &rest[..colon],
            &rest[end..]
        ),
        None => url.to_string(),
    }
}

fn quoted(url: &str) -> String {
    format!("{:?}", redact(url))
}

/// Characters left as they are in a user or database name; everything else is %XX.
const NAME: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `postgres://user@host:port/dbname?params`, never with a password.
pub fn format(
    host: &str,
    port: u16,
    user: &str,
    dbname: &str,
    params: &[(&str, String)],
) -> String {
    format_with("postgres", host, port, user, None, dbname, params)
}

/// `SCHEME://user[:password]@host:port/dbname?params`, each part percent-encoded.
pub fn format_with(
    scheme: &str,
    host: &str,
    port: u16,
    user: &str,
    password: Option<&str>,
    dbname: &str,
    params: &[(&str, String)],
) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let password = password
        .map(|p| format!(":{}", utf8_percent_encode(p, NAME)))
        .unwrap_or_default();
    let mut url = format!(
        "{scheme}://{}{password}@{host}:{port}/{}",
        utf8_percent_encode(user, NAME),
        utf8_percent_encode(dbname, NAME)
    );
    for (i, (name, value)) in params.iter().enumerate() {
        url.push(if i == 0 { '?' } else { '&' });
        url.push_str(name);
        url.push('=');
        url.extend(utf8_percent_encode(value, NAME));
    }
    url
}

/// The region of an `*.REGION.rds.amazonaws.com` (or `.com.cn`) host.
pub fn infer_region(host: &str) -> Option<String> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let stem = host
        .strip_suffix(".rds.amazonaws.com")
        .or_else(|| host.strip_suffix(".rds.amazonaws.com.cn"))?;
    let (_, region) = stem.rsplit_once('.')?;
    super::value::is_region(region).then(|| region.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url() {
        let u = parse("postgres://app%40corp:p%40ss%2Fw:rd@db.example.com:6543/my%20db?sslmode=verify-full&name=app").unwrap();
        assert_eq!(u.user, "app@corp");
        assert_eq!(u.password.as_ref().map(Secret::expose), Some("p@ss/w:rd"));
        assert_eq!(u.host, "db.example.com");
        assert_eq!(u.port, 6543);
        assert_eq!(u.dbname, "my db");
        assert_eq!(
            u.params,
            vec![
                ("sslmode".into(), "verify-full".into()),
                ("name".into(), "app".into())
            ]
        );
    }

    #[test]
    fn defaults_and_ipv6() {
        let u = parse("postgresql://bob@[::1]").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.dbname.as_str()),
            ("::1", 5432, "bob")
        );
        assert!(u.password.is_none());
        let u = parse("POSTGRES://bob@[2001:db8::5]:6000/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("2001:db8::5", 6000));
    }

    #[test]
    fn syntax_errors_name_the_problem_without_the_password() {
        for (url, expect) in [
            ("mysql://a@b/c", "does not start with"),
            ("postgres://host/db", "names no user"),
            ("postgres://u:secretpw@/db", "names no host"),
            ("postgres://u:secretpw@h:99999/db", "port"),
            ("postgres://u:secretpw@h1,h2/db", "several hosts"),
            ("postgres://u:secretpw@::1/db", "without brackets"),
            ("postgres://u:secretpw@h/db?sslmode", "has no value"),
            ("postgres://u:secretpw@h/db?a=1&a=2", "given twice"),
            ("postgres://u:secret%zz@h/db", "percent-encoding"),
        ] {
            let problem = parse(url).unwrap_err();
            assert!(problem.message.contains(expect), "{url}: {problem:?}");
            assert!(!problem.message.contains("secret"), "{url}: {problem:?}");
        }
    }

    #[test]
    fn redaction_hides_passwords_even_in_broken_urls() {
        assert_eq!(
            redact("postgres://u:pw@h:5/d?x=1"),
            "postgres://u:***@h:5/d?x=1"
        );
        assert_eq!(redact("postgres://u@h:5/d"), "postgres://u@h:5/d");
        // An unencoded slash in the password: hide up to the last @.
        assert_eq!(redact("postgres://u:p/w@h/d"), "postgres://u:***@h/d");
        assert!(!redact("postgres://u:p?w@h/d").contains("p?w"));
    }

    #[test]
    fn format_round_trips() {
        let url = format("::1", 5433, "a b", "d/b", &[("auth", "iam".into())]);
        assert_eq!(url, "postgres://a%20b@[::1]:5433/d%2Fb?auth=iam");
        let u = parse(&url).unwrap();
        assert_eq!(
            (u.user.as_str(), u.dbname.as_str(), u.host.as_str()),
            ("a b", "d/b", "::1")
        );
    }

    #[test]
    fn region_inference() {
        assert_eq!(
            infer_region("mydb.abc123xyz.eu-west-1.rds.amazonaws.com").as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            infer_region("x.proxy-abc.cn-north-1.rds.amazonaws.com.cn").as_deref(),
            Some("cn-north-1")
        );
        assert_eq!(infer_region("db.example.internal"), None);
        assert_eq!(infer_region("rds.amazonaws.com"), None);
    }
}
