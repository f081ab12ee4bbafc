//! libpq-style upstream URLs: `postgres://user[:password]@host[:port][,host[:port]...]/dbname?param=value`.
//!
//! This file knows the syntax only; which parameters exist is the key table's business.
//! Passwords become [`Secret`] at once, and every message quotes the URL through [`redact`].
//! [`parse_parts`] reads a URL or a keyword=value string ([`super::conninfo`]) into what it
//! says; [`resolve_hosts`] applies libpq's rules for host, port and hostaddr lists.

use std::net::IpAddr;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::error::Problem;
use super::Secret;

pub const DEFAULT_PORT: u16 = 5432;

/// One host of an upstream, with its port and the address dialled instead of resolving it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlHost {
    /// Host name or IP literal, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    pub hostaddr: Option<IpAddr>,
}

/// The parts of one upstream URL, with libpq's defaults applied and no environment read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// At least one, in the order written.
    pub hosts: Vec<UrlHost>,
    pub user: String,
    pub password: Option<Secret>,
    /// Defaults to `user`.
    pub dbname: String,
    /// Decoded query parameters in the order written, without `hostaddr` (it is in `hosts`).
    pub params: Vec<(String, String)>,
}

/// How an upstream string was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// `postgres://...` or `postgresql://...`
    Url,
    /// libpq's `keyword=value ...`
    Keywords,
}

/// What one upstream string says, before defaults and the environment fill in what it leaves out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parts {
    pub form: Form,
    /// The host list as written (libpq's `host`, split at commas; entries may be empty).
    pub hosts: Option<Vec<String>>,
    /// The port list as written; an empty entry means 5432. `None` when the string sets none.
    pub ports: Option<Vec<String>>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub dbname: Option<String>,
    /// Every other parameter or keyword (`hostaddr` among them), decoded, in the order written.
    pub params: Vec<(String, String)>,
}

/// A URL, parsed with libpq's defaults: port 5432, dbname = user, and `?hostaddr=` per host.
pub fn parse(url: &str) -> Result<UpstreamUrl, Problem> {
    let parts = parse_url(url)?;
    let fail = |message: String, fix: &str| {
        Problem::new(format!("{}: {message}", quoted(url)), fix.to_string())
    };
    let user = parts.user.ok_or_else(|| {
        fail(
            "names no user".into(),
            "write postgres://USER@host/dbname (percent-encode / ? @ in a password)",
        )
    })?;
    let mut params = parts.params;
    let hostaddrs = match params.iter().position(|(name, _)| name == "hostaddr") {
        Some(i) => {
            let (_, text) = params.remove(i);
            parse_hostaddrs(&text).map_err(|(message, fix)| fail(message, &fix))?
        }
        None => None,
    };
    let hosts = parts.hosts.unwrap_or_default();
    if hosts.is_empty() && hostaddrs.is_none() {
        return Err(fail(
            "names no host".into(),
            "write postgres://user@HOST:5432/dbname",
        ));
    }
    let hosts = resolve_hosts(&hosts, parts.ports.as_deref(), hostaddrs.as_deref())
        .map_err(|(_, problem)| fail(problem.message, &problem.fix))?;
    Ok(UpstreamUrl {
        hosts,
        dbname: parts.dbname.unwrap_or_else(|| user.clone()),
        user,
        password: parts.password,
        params,
    })
}

/// A URL or a keyword=value string, by its first characters: what it says, nothing filled in.
pub fn parse_parts(text: &str) -> Result<Parts, Problem> {
    if strip_scheme(text.trim_start()).is_some() {
        parse_url(text.trim())
    } else {
        super::conninfo::parse(text)
    }
}

/// Whether `text` is written as a URL rather than as keyword=value pairs.
pub fn is_url(text: &str) -> bool {
    strip_scheme(text.trim_start()).is_some()
}

/// Which part of the string a [`resolve_hosts`] problem is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPart {
    Host,
    Port,
    Hostaddr,
}

/// libpq's host, port and hostaddr lists as one host list. `ports`: none (5432 for all), one
/// for all, or one per host; `hostaddrs`: one per host (`None` entries resolve the name). With
/// no host names, the hostaddrs are the hosts.
pub fn resolve_hosts(
    names: &[String],
    ports: Option<&[String]>,
    hostaddrs: Option<&[Option<IpAddr>]>,
) -> Result<Vec<UrlHost>, (HostPart, Problem)> {
    let names: Vec<String> = match (names.is_empty(), hostaddrs) {
        (true, Some(addrs)) => addrs
            .iter()
            .map(|addr| addr.map(|a| a.to_string()).unwrap_or_default())
            .collect(),
        _ => names.to_vec(),
    };
    for name in &names {
        if name.is_empty() {
            return Err((
                HostPart::Host,
                Problem::new(
                    "names an empty host (libpq would use a unix-domain socket)",
                    "name every host; iampool reaches the upstream over TCP only",
                ),
            ));
        }
        if name.starts_with('/') || name.starts_with('@') {
            return Err((
                HostPart::Host,
                Problem::new(
                    format!("host {name:?} is a unix-domain socket"),
                    "name the host or IP address; iampool reaches the upstream over TCP only",
                ),
            ));
        }
    }
    let ports: Vec<u16> = match ports {
        None => vec![DEFAULT_PORT; names.len()],
        Some(ports) => {
            let parsed = ports
                .iter()
                .map(|port| parse_port(port))
                .collect::<Result<Vec<u16>, Problem>>()
                .map_err(|problem| (HostPart::Port, problem))?;
            match parsed.len() {
                1 => vec![parsed[0]; names.len()],
                n if n == names.len() => parsed,
                n => {
                    return Err((
                        HostPart::Port,
                        Problem::new(
                            format!("could not match {n} port numbers to {} hosts", names.len()),
                            "give one port for all hosts, or one per host in the same order",
                        ),
                    ))
                }
            }
        }
    };
    let addrs: Vec<Option<IpAddr>> = match hostaddrs {
        None => vec![None; names.len()],
        Some(addrs) if addrs.len() == names.len() => addrs.to_vec(),
        Some(addrs) => {
            return Err((
                HostPart::Hostaddr,
                Problem::new(
                    format!(
                        "could not match {} host names to {} hostaddr values",
                        names.len(),
                        addrs.len()
                    ),
                    "give one hostaddr per host, in the same order; leave an entry empty (10.0.0.1,,10.0.0.3) to resolve that host's name",
                ),
            ))
        }
    };
    Ok(names
        .into_iter()
        .zip(ports)
        .zip(addrs)
        .map(|((host, port), hostaddr)| UrlHost {
            host,
            port,
            hostaddr,
        })
        .collect())
}

/// One port entry: blank for 5432, else 1 to 65535 (spaces around it allowed, as libpq does).
fn parse_port(port: &str) -> Result<u16, Problem> {
    let port = port.trim();
    if port.is_empty() {
        return Ok(DEFAULT_PORT);
    }
    port.parse::<u16>()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| {
            Problem::new(
                format!("invalid port number {port:?}: not a number from 1 to 65535"),
                "write host:5432, or port=5432",
            )
        })
}

/// A comma-separated hostaddr list; an empty entry resolves that host's name. `None` when the
/// whole value is empty (as libpq, that is no hostaddr at all).
pub fn parse_hostaddrs(text: &str) -> Result<Option<Vec<Option<IpAddr>>>, (String, String)> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.split(',')
        .map(str::trim)
        .map(|entry| match entry {
            "" => Ok(None),
            entry => entry.parse::<IpAddr>().map(Some).map_err(|_| {
                (
                    format!("hostaddr {entry:?} is not an IP address"),
                    "hostaddr takes IP literals only (one per host, comma-separated); put host names in the host part".to_string(),
                )
            }),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn parse_url(url: &str) -> Result<Parts, Problem> {
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
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    let (user, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
        Some((user, password)) => (user, password),
        None => ("", ""),
    };
    let user = decode(user).map_err(|_| {
        fail(
            "the user name is not valid percent-encoding",
            "encode bytes as %XX",
        )
    })?;
    let password = decode(password).map_err(|_| {
        fail(
            "the password is not valid percent-encoding",
            "encode special characters in the password as %XX",
        )
    })?;
    let password = Some(password)
        .filter(|password| !password.is_empty())
        .map(Secret::new);
    let (mut hosts, mut ports) =
        split_hosts(hostport).map_err(|(message, fix)| fail(message, fix))?;

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
    let mut user = Some(user).filter(|user| !user.is_empty());
    let mut dbname = Some(dbname).filter(|dbname| !dbname.is_empty());

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
        // libpq's keywords for the URL's own parts, allowed where the URL leaves them out.
        let twice = |what: &str| {
            fail(
                &format!("?{name}= is given besides the {what} in the URL"),
                &format!("keep one of the two; ?{name}= would replace every {what} of the URL"),
            )
        };
        match name.as_str() {
            "host" if hosts.is_some() => return Err(twice("host")),
            "host" => hosts = Some(value.split(',').map(str::to_string).collect()),
            "port"
                if ports
                    .as_ref()
                    .is_some_and(|p| p.iter().any(|p| !p.is_empty())) =>
            {
                return Err(twice("port"))
            }
            "port" => ports = Some(value.split(',').map(str::to_string).collect()),
            "user" if user.is_some() => return Err(twice("user")),
            "user" => user = Some(value).filter(|v| !v.is_empty()),
            "dbname" if dbname.is_some() => return Err(twice("database name")),
            "dbname" => dbname = Some(value).filter(|v| !v.is_empty()),
            _ => params.push((name, value)),
        }
    }
    Ok(Parts {
        form: Form::Url,
        hosts,
        ports,
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

/// The URL's `host[:port],...` list: hosts as written (entries may be empty) and, as libpq
/// stores them, ports only when some host has one or there are several hosts.
/// Hosts and ports as [`Parts`] holds them.
type HostsAndPorts = (Option<Vec<String>>, Option<Vec<String>>);

fn split_hosts(hostport: &str) -> Result<HostsAndPorts, SyntaxError> {
    if hostport.is_empty() {
        return Ok((None, None));
    }
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    let mut rest = hostport;
    loop {
        let (host, port, after) = if let Some(bracketed) = rest.strip_prefix('[') {
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
            let (port, after) = match after.split_once(',') {
                Some((port, after)) => (port, Some(after)),
                None => (after, None),
            };
            let port = match port {
                "" => None,
                _ => Some(
                    port.strip_prefix(':')
                        .ok_or(("has text after the IPv6 address", "write [::1]:5432"))?,
                ),
            };
            (host.to_string(), port, after)
        } else {
            let (entry, after) = match rest.split_once(',') {
                Some((entry, after)) => (entry, Some(after)),
                None => (rest, None),
            };
            match entry.rsplit_once(':') {
                Some((host, _)) if host.contains(':') => {
                    return Err(("has an IPv6 address without brackets", "write [::1]:5432"))
                }
                Some((host, port)) => (decode_host(host)?, Some(port), after),
                None => (decode_host(entry)?, None, after),
            }
        };
        hosts.push(host);
        ports.push(port.unwrap_or("").to_string());
        match after {
            Some(after) => rest = after,
            None => break,
        }
    }
    let ports = (hosts.len() > 1 || ports.iter().any(|p| !p.is_empty())).then_some(ports);
    Ok((Some(hosts), ports))
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
/// then everything between the first `:` after the scheme and the last `@` is hidden. A
/// keyword=value string (no `://`) has its `password` value hidden instead.
pub fn redact(url: &str) -> String {
    if !url.contains("://") {
        // A keyword=value string, or a URL missing its scheme: hide what either would call
        // the password (at worst a little more than that).
        return redact_url(&super::conninfo::redact(url));
    }
    redact_url(url)
}

fn redact_url(url: &str) -> String {
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

/// `postgres://user@host:port,.../dbname?params`, never with a password.
pub fn format(hosts: &[UrlHost], user: &str, dbname: &str, params: &[(&str, String)]) -> String {
    format_with("postgres", hosts, user, None, dbname, params)
}

/// `SCHEME://user[:password]@host:port,.../dbname?params`, each part percent-encoded; a
/// `hostaddr` parameter (one entry per host) comes first when any host has an address.
pub fn format_with(
    scheme: &str,
    hosts: &[UrlHost],
    user: &str,
    password: Option<&str>,
    dbname: &str,
    params: &[(&str, String)],
) -> String {
    let authority = hosts
        .iter()
        .map(|h| {
            if h.host.contains(':') {
                format!("[{}]:{}", h.host, h.port)
            } else {
                format!("{}:{}", utf8_percent_encode(&h.host, NAME), h.port)
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    let password = password
        .map(|p| format!(":{}", utf8_percent_encode(p, NAME)))
        .unwrap_or_default();
    let mut url = format!(
        "{scheme}://{}{password}@{authority}/{}",
        utf8_percent_encode(user, NAME),
        utf8_percent_encode(dbname, NAME)
    );
    let hostaddr = hosts.iter().any(|h| h.hostaddr.is_some()).then(|| {
        let addrs: Vec<String> = hosts
            .iter()
            .map(|h| h.hostaddr.map(|a| a.to_string()).unwrap_or_default())
            .collect();
        ("hostaddr", addrs.join(","))
    });
    for (i, (name, value)) in hostaddr.iter().chain(params).enumerate() {
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

    fn host(u: &UpstreamUrl, i: usize) -> (&str, u16) {
        (u.hosts[i].host.as_str(), u.hosts[i].port)
    }

    #[test]
    fn full_url() {
        let u = parse("postgres://app%40corp:p%40ss%2Fw:rd@db.example.com:6543/my%20db?sslmode=verify-full&name=app").unwrap();
        assert_eq!(u.user, "app@corp");
        assert_eq!(u.password.as_ref().map(Secret::expose), Some("p@ss/w:rd"));
        assert_eq!(u.hosts.len(), 1);
        assert_eq!(host(&u, 0), ("db.example.com", 6543));
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
        assert_eq!((host(&u, 0), u.dbname.as_str()), (("::1", 5432), "bob"));
        assert!(u.password.is_none());
        let u = parse("POSTGRES://bob@[2001:db8::5]:6000/x").unwrap();
        assert_eq!(host(&u, 0), ("2001:db8::5", 6000));
    }

    #[test]
    fn several_hosts_with_their_own_ports() {
        let u = parse("postgres://u@h1:5432,h2:5433,[::1]:5434,h4/db").unwrap();
        let hosts: Vec<(&str, u16)> = (0..u.hosts.len()).map(|i| host(&u, i)).collect();
        assert_eq!(
            hosts,
            [("h1", 5432), ("h2", 5433), ("::1", 5434), ("h4", 5432)]
        );
        // ?port= is the port of every host that has none in the URL.
        let u = parse("postgres://u@h1,[::1]/db?port=6000").unwrap();
        assert_eq!((host(&u, 0), host(&u, 1)), (("h1", 6000), ("::1", 6000)));
        // A hostaddr per host; an empty entry resolves that host's name.
        let u = parse("postgres://u@h1,h2/db?hostaddr=10.0.0.1,&sslmode=require").unwrap();
        assert_eq!(u.hosts[0].hostaddr, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(u.hosts[1].hostaddr, None);
        assert_eq!(u.params, [("sslmode".to_string(), "require".to_string())]);
        // libpq's keywords for the URL's own parts fill in what the URL leaves out.
        let u = parse("postgres://@/?host=h&user=bob&dbname=x&port=7").unwrap();
        assert_eq!(
            (host(&u, 0), u.user.as_str(), u.dbname.as_str()),
            (("h", 7), "bob", "x")
        );
    }

    #[test]
    fn syntax_errors_name_the_problem_without_the_password() {
        for (url, expect) in [
            ("mysql://a@b/c", "does not start with"),
            ("postgres://host/db", "names no user"),
            ("postgres://u:secretpw@/db", "names no host"),
            ("postgres://u:secretpw@h:99999/db", "port"),
            ("postgres://u:secretpw@h:0/db", "invalid port number"),
            ("postgres://u:secretpw@h1,,h2/db", "empty host"),
            ("postgres://u:secretpw@%2Ftmp/db", "unix-domain socket"),
            (
                "postgres://u:secretpw@h1:5,h2/db?port=6",
                "besides the port",
            ),
            ("postgres://u:secretpw@h/db?user=x", "besides the user"),
            (
                "postgres://u:secretpw@h1,h2/db?hostaddr=::1",
                "could not match 2 host names to 1 hostaddr",
            ),
            ("postgres://u:secretpw@h/db?hostaddr=h", "not an IP address"),
            ("postgres://u:secretpw@::1/db", "without brackets"),
            ("postgres://u:secretpw@h1,[::1/db", "closing ]"),
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
    fn port_and_hostaddr_lists_follow_libpq() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let hosts = names(&["a", "b"]);
        let one = resolve_hosts(&hosts, Some(&names(&["7"])), None).unwrap();
        assert_eq!((one[0].port, one[1].port), (7, 7));
        let each = resolve_hosts(&hosts, Some(&names(&["", " 8 "])), None).unwrap();
        assert_eq!((each[0].port, each[1].port), (5432, 8));
        let (part, problem) =
            resolve_hosts(&hosts, Some(&names(&["1", "2", "3"])), None).unwrap_err();
        assert_eq!(part, HostPart::Port);
        assert_eq!(problem.message, "could not match 3 port numbers to 2 hosts");
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let (part, _) = resolve_hosts(&hosts, None, Some(&[Some(ip)])).unwrap_err();
        assert_eq!(part, HostPart::Hostaddr);
        // hostaddr without host names: the addresses are the hosts.
        let bare = resolve_hosts(&[], None, Some(&[Some(ip)])).unwrap();
        assert_eq!(
            (bare[0].host.as_str(), bare[0].hostaddr),
            ("10.0.0.9", Some(ip))
        );
        assert_eq!(parse_hostaddrs(" ").unwrap(), None);
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
        // Without a scheme: keyword=value passwords, and URL-style ones too.
        assert_eq!(
            redact("host=h password='s3 cret' user=u"),
            "host=h password=*** user=u"
        );
        assert!(!redact("u:s3cret@h/d").contains("s3cret"));
    }

    #[test]
    fn format_round_trips() {
        let hosts = [
            UrlHost {
                host: "::1".into(),
                port: 5433,
                hostaddr: None,
            },
            UrlHost {
                host: "db".into(),
                port: 5432,
                hostaddr: Some("10.0.0.2".parse().unwrap()),
            },
        ];
        let url = format(&hosts, "a b", "d/b", &[("auth", "iam".into())]);
        assert_eq!(
            url,
            "postgres://a%20b@[::1]:5433,db:5432/d%2Fb?hostaddr=%2C10.0.0.2&auth=iam"
        );
        let u = parse(&url).unwrap();
        assert_eq!(
            (u.user.as_str(), u.dbname.as_str(), &u.hosts[..]),
            ("a b", "d/b", &hosts[..])
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
