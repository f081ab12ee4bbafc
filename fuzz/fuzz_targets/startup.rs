//! The startup phase's parsers: the startup packet's length and code, its parameters
//! decoded the way `client::handshake` decodes them (NUL-terminated pairs, the `options`
//! parameter split by `parse_options`), the canonical spellings of startup values, and
//! the `set_config` statement iampool later sends a server to apply them.
//!
//! Invariant beyond "no panic": the SQL built from client-chosen names and values is the
//! fixed template with every name and value inside a string literal that decodes back to
//! exactly what the client sent, so a startup packet can never inject SQL.
#![no_main]

use iampool::client::handshake::parse_options;
use iampool::protocol::framing::{startup_packet_len, PROTOCOL_3_0};
use iampool::protocol::messages::BodyReader;
use iampool::server::params::{canonical_startup_value, SessionParams};
use libfuzzer_sys::fuzz_target;

/// Splits `sql` into its text outside `E'...'` literals (each literal replaced by `$`) and
/// the decoded literals. None if a literal is not closed.
fn lex(sql: &str) -> Option<(String, Vec<String>)> {
    let mut skeleton = String::new();
    let mut literals = Vec::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == 'E' && chars.peek() == Some(&'\'') {
            chars.next();
            let mut lit = String::new();
            loop {
                match chars.next()? {
                    '\'' if chars.peek() == Some(&'\'') => {
                        chars.next();
                        lit.push('\'');
                    }
                    '\'' => break,
                    '\\' => lit.push(chars.next()?),
                    c => lit.push(c),
                }
            }
            skeleton.push('$');
            literals.push(lit);
        } else {
            skeleton.push(c);
        }
    }
    Some((skeleton, literals))
}

fuzz_target!(|data: &[u8]| {
    let Ok(Some(len)) = startup_packet_len(data) else {
        return;
    };
    let Some(packet) = data.get(..len) else {
        return;
    };
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    if code >> 16 != PROTOCOL_3_0 >> 16 {
        // A cancel request's key, as the handshake reads it.
        let mut r = BodyReader::new(&packet[8..]);
        let _ = (r.i32(), r.i32());
        return;
    }
    let mut r = BodyReader::new(&packet[8..]);
    let mut params = Vec::new();
    loop {
        let Ok(name) = r.cstr() else { return };
        if name.is_empty() {
            break;
        }
        let Ok(value) = r.cstr() else { return };
        match name {
            "options" => params.extend(parse_options(value)),
            "user" | "database" | "replication" => {}
            n if n.starts_with("_pq_.") => {}
            n => params.push((n.to_owned(), value.to_owned())),
        }
    }

    let mut client = SessionParams::default();
    for (n, v) in &params {
        client.set_startup(n, &canonical_startup_value(n, v));
    }
    let mut server = SessionParams::default();
    let Some(sync) = SessionParams::sync_sql(&client, &mut server) else {
        return;
    };
    let (skeleton, literals) = lex(&sync.sql).expect("every literal is closed");
    let call = "pg_catalog.set_config($, $, false)";
    let calls = skeleton.strip_prefix("SELECT ").expect("SELECT prefix");
    assert!(
        calls.split(", pg_catalog.").enumerate().all(|(i, c)| {
            let c = if i == 0 {
                c.to_owned()
            } else {
                format!("pg_catalog.{c}")
            };
            c == call
        }),
        "unexpected SQL outside literals: {skeleton:?}"
    );
    // Every literal is a name or value the client sent (after canonical spelling).
    for lit in &literals {
        assert!(
            params.iter().any(|(n, v)| n.eq_ignore_ascii_case(lit)
                || *v == *lit
                || canonical_startup_value(n, v) == *lit),
            "literal {lit:?} is not from the client"
        );
    }
    // Applied once, the server matches the client: nothing more to send.
    assert!(SessionParams::sync_sql(&client, &mut server).is_none() || !sync.reported.is_empty());
});
