//! An application's database URL split in two: the upstream iampool signs in to, and the
//! local URL the application uses instead.

use crate::config::url as pgurl;

/// Parameters that belong to the application's own connection (libpq reads them on the
/// client side): they stay on the local URL.
const CLIENT_PARAMS: [&str; 10] = [
    "application_name",
    "fallback_application_name",
    "connect_timeout",
    "options",
    "client_encoding",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
];

/// sslmode values that do not verify the server: iampool refuses them for IAM.
const UNVERIFIED_SSLMODES: [&str; 4] = ["disable", "allow", "prefer", "require"];

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Split {
    /// For `IAMPOOL_UPSTREAM`; has the password when the application's URL had one.
    pub upstream: String,
    /// For the application: `SCHEME://user@127.0.0.1:PORT/dbname[?client params]`.
    pub local: String,
    /// What was changed on the way and why, for the person running inject.
    pub notes: Vec<String>,
}

/// Settings from the command line that shape the split.
pub(super) struct Want<'a> {
    pub port: u16,
    pub region: Option<&'a str>,
}

/// `Err` is a message that names what is wrong with the URL (never its password).
pub(super) fn split(app_url: &str, want: &Want<'_>) -> Result<Split, String> {
    let redacted = pgurl::redact(app_url);
    let Some((scheme, rest)) = app_url.split_once("://") else {
        return Err(format!("{redacted:?} is not a postgres:// URL"));
    };
    // SQLAlchemy and friends write postgresql+psycopg://: the application keeps its scheme.
    let base = scheme.split_once('+').map_or(scheme, |(base, _)| base);
    if base != "postgres" && base != "postgresql" {
        return Err(format!(
            "{redacted:?} is not a postgres:// or postgresql:// URL"
        ));
    }
    if rest.contains("$(") {
        return Err(format!(
            "{redacted:?} refers to other variables ($(NAME)); inject cannot see their values"
        ));
    }
    let url = pgurl::parse(&format!("postgres://{rest}"))
        .map_err(|p| format!("{}; {}", p.message, p.fix))?;
    if let Some(local) = url.hosts.iter().find(|h| is_loopback(&h.host)) {
        return Err(format!(
            "{redacted:?} already points at this pod ({}); give the real database with --upstream",
            local.host
        ));
    }
    let mut notes = Vec::new();
    let mut upstream_params: Vec<(String, String)> = Vec::new();
    let mut local_params: Vec<(String, String)> = Vec::new();
    for (name, value) in url.params {
        if CLIENT_PARAMS.contains(&name.as_str()) {
            local_params.push((name, value));
        } else {
            upstream_params.push((name, value));
        }
    }
    let has = |params: &[(String, String)], name: &str| params.iter().any(|(n, _)| n == name);
    if !has(&upstream_params, "auth") && url.password.is_none() {
        upstream_params.push(("auth".into(), "iam".into()));
    }
    let iam = upstream_params
        .iter()
        .any(|(n, v)| n == "auth" && v == "iam");
    if let Some(region) = want.region {
        if !has(&upstream_params, "region") {
            upstream_params.push(("region".into(), region.into()));
        }
    }
    upstream_params.retain(|(name, value)| {
        if name == "sslrootcert" {
            notes.push(format!(
                "sslrootcert={value} dropped: it names a file in the application's container; iampool has the RDS CAs built in (for another CA, mount it into the iampool container and add sslrootcert to IAMPOOL_UPSTREAM)"
            ));
            return false;
        }
        if iam && name == "sslmode" && UNVERIFIED_SSLMODES.contains(&value.as_str()) {
            notes.push(format!(
                "sslmode={value} dropped: with IAM, iampool verifies the server (verify-full) before it sends a token"
            ));
            return false;
        }
        true
    });
    // The first host names the region, as iampool's own loader infers it.
    let first = &url.hosts[0].host;
    if iam && !has(&upstream_params, "region") && pgurl::infer_region(first).is_none() {
        return Err(format!(
            "the IAM region cannot be inferred from {first:?} (not *.REGION.rds.amazonaws.com); pass --region"
        ));
    }

    let upstream = pgurl::format_with(
        "postgres",
        &url.hosts,
        &url.user,
        url.password.as_ref().map(|p| p.expose()),
        &url.dbname,
        &pairs(&upstream_params),
    );
    let local = pgurl::format_with(
        scheme,
        &[pgurl::UrlHost {
            host: "127.0.0.1".into(),
            port: want.port,
            hostaddr: None,
        }],
        &url.user,
        None,
        &url.dbname,
        &pairs(&local_params),
    );
    Ok(Split {
        upstream,
        local,
        notes,
    })
}

fn pairs(params: &[(String, String)]) -> Vec<(&str, String)> {
    params
        .iter()
        .map(|(n, v)| (n.as_str(), v.clone()))
        .collect()
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANT: Want<'static> = Want {
        port: 6432,
        region: None,
    };

    #[test]
    fn an_rds_url_without_password_becomes_iam() {
        let s = split(
            "postgres://app@mydb.cluster-abc.us-east-1.rds.amazonaws.com:5432/shop?sslmode=require&application_name=web",
            &WANT,
        )
        .unwrap();
        assert_eq!(
            s.upstream,
            "postgres://app@mydb.cluster-abc.us-east-1.rds.amazonaws.com:5432/shop?auth=iam"
        );
        assert_eq!(
            s.local,
            "postgres://app@127.0.0.1:6432/shop?application_name=web"
        );
        assert_eq!(s.notes.len(), 1, "{:?}", s.notes);
        assert!(s.notes[0].starts_with("sslmode=require dropped"));
    }

    #[test]
    fn a_password_stays_upstream_and_leaves_the_application() {
        let s = split(
            "postgresql+psycopg://app:s%40cret@db.internal/shop?sslmode=verify-full",
            &WANT,
        )
        .unwrap();
        assert_eq!(
            s.upstream,
            "postgres://app:s%40cret@db.internal:5432/shop?sslmode=verify-full"
        );
        assert_eq!(s.local, "postgresql+psycopg://app@127.0.0.1:6432/shop");
    }

    #[test]
    fn iam_outside_rds_names_needs_a_region() {
        let e = split("postgres://app@10.0.0.5/shop", &WANT).unwrap_err();
        assert!(e.contains("--region"), "{e}");
        let s = split(
            "postgres://app@10.0.0.5/shop",
            &Want {
                port: 7000,
                region: Some("eu-west-1"),
            },
        )
        .unwrap();
        assert_eq!(
            s.upstream,
            "postgres://app@10.0.0.5:5432/shop?auth=iam&region=eu-west-1"
        );
        assert_eq!(s.local, "postgres://app@127.0.0.1:7000/shop");
    }

    #[test]
    fn refused_urls_say_why_without_the_password() {
        for (url, says) in [
            ("mysql://app:hunter22@db/x", "not a postgres"),
            (
                "postgres://app:hunter22@localhost/x",
                "already points at this pod",
            ),
            (
                "postgres://app:hunter22@[::1]/x",
                "already points at this pod",
            ),
            ("postgres://$(USER):hunter22@db/x", "other variables"),
        ] {
            let e = split(url, &WANT).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("hunter22"), "{url}: {e}");
        }
    }
}
