//! Configuration parsers: upstream URLs, auth files, SCRAM verifiers, RDS host names and the
//! TOML config file (through the real loader, `Config::from_args(["--config", FILE])`).
//!
//! Beyond "errors, never panics": a URL's password never appears in its redacted form or in
//! a parse error, and a loaded configuration's rendering never shows a user's secret.
#![no_main]

use std::io::Write;

use iampool::config::{auth_file, url, Config, UserSecret};
use iampool::protocol::scram::ScramVerifier;
use iampool_fuzz::Choices;
use libfuzzer_sys::fuzz_target;

fn check_url(text: &str) {
    let redacted = url::redact(text);
    let _ = url::infer_region(text);
    let _ = iampool::iam::region_from_host(text);
    // The raw password: after the first ':' of the userinfo, up to the authority's last '@'.
    let scheme_len = text.find("://").map_or(0, |i| i + 3);
    let rest = &text[scheme_len..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let raw = authority
        .rsplit_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, p)| p);
    // Passwords that occur elsewhere in the URL, or hold the mask itself, prove nothing.
    let secret = raw.filter(|p| p.len() >= 8 && text.matches(*p).count() == 1 && !p.contains('*'));
    if let Some(p) = secret {
        assert!(!redacted.contains(p), "password in {redacted:?}");
    }
    match url::parse(text) {
        Ok(_) => {}
        Err(problem) => {
            if let Some(p) = secret {
                // The same URL with another password: if the text still shows `p`, it is
                // the message's own wording ("write host:5432"), not the password.
                let other = text.replacen(p, "Zq8Zq8Zq8", 1);
                let wording = url::parse(&other)
                    .err()
                    .is_some_and(|e| e.message.contains(p) || e.fix.contains(p));
                if !wording {
                    assert!(
                        !problem.message.contains(p) && !problem.fix.contains(p),
                        "password in {problem:?}"
                    );
                }
            }
        }
    }
}

fn check_auth_file(text: &str) {
    let (users, _errors) = auth_file::parse(text);
    for (_, secret) in users {
        if let UserSecret::Scram(v) = secret {
            let _ = ScramVerifier::parse(v.expose());
        }
    }
    let _ = ScramVerifier::parse(text);
    let _ = auth_file::classify(text);
}

fn check_file(text: &str) {
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile_in(std::env::temp_dir())
        .expect("temp file");
    file.write_all(text.as_bytes()).expect("write");
    let path = file.path().to_str().expect("utf-8 temp path").to_owned();
    let Ok(config) = Config::from_args(&["--config", &path], &[]) else {
        return;
    };
    let rendered = config.render_redacted();
    for secret in config.users.values() {
        let s = match secret {
            UserSecret::Plain(s) | UserSecret::Md5(s) | UserSecret::Scram(s) => s.expose(),
        };
        if s.len() >= 12 && text.matches(s).count() == 1 {
            assert!(!rendered.contains(s), "a user's secret is rendered");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    let which = c.byte();
    let Ok(text) = std::str::from_utf8(c.rest()) else {
        return;
    };
    match which % 3 {
        0 => check_url(text),
        1 => check_auth_file(text),
        _ => check_file(text),
    }
});
