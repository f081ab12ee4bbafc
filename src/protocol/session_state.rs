//! Statements that leave session state behind, which transaction mode cannot carry from one
//! server to the next (LISTEN, SQL PREPARE, temporary tables, session advisory locks,
//! WITH HOLD cursors).
//!
//! This runs on every simple Query and every Parse in transaction mode, so it is built to
//! cost a few byte comparisons for ordinary SQL: it looks at the first word, and only for
//! `SELECT` and `DECLARE` searches further, by a byte search for a character every needle
//! contains rather than a comparison at every position.

/// Kinds of session state, as metric label values.
pub const KINDS: [&str; 6] = [
    "listen",
    "sql_prepare",
    "temp_table",
    "advisory_lock",
    "with_hold_cursor",
    "session_set_unreported",
];

/// The kind of session state SQL text (a Query body or a Parse's statement) creates, as an
/// index into [`KINDS`].
#[inline]
pub fn kind(sql: &[u8]) -> Option<usize> {
    let text = sql.trim_ascii_start();
    // Only these first letters can start a statement of interest.
    match text.first()? | 0x20 {
        b'l' | b'p' | b'c' | b's' | b'd' => {}
        _ => return None,
    }
    let word_end = text
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (word, rest) = text.split_at(word_end);
    if word.eq_ignore_ascii_case(b"listen") {
        Some(0)
    } else if word.eq_ignore_ascii_case(b"prepare") {
        Some(1)
    } else if word.eq_ignore_ascii_case(b"create") {
        let next = rest.trim_ascii_start();
        let temp = [
            b"temp".as_slice(),
            b"temporary",
            b"local temp",
            b"global temp",
        ]
        .iter()
        .any(|p| starts_with_ci(next, p));
        temp.then_some(2)
    } else if word.eq_ignore_ascii_case(b"select") {
        // Session-level advisory locks (the _xact_ variants end with the transaction).
        advisory_lock(rest).then_some(3)
    } else if word.eq_ignore_ascii_case(b"declare") {
        with_hold(rest).then_some(4)
    } else {
        None
    }
}

/// Whether SQL text may change the session's settings for good: a statement (any of those
/// separated by `;`) that is `SET` (not `SET LOCAL`, `SET TRANSACTION` or `SET CONSTRAINTS`,
/// which end with the transaction), `RESET`, or a `SELECT` that calls `set_config`. It errs on
/// the side of yes (a `;` inside a string can start a "statement"); a server it says yes for
/// is reset before another client gets it. Costs a byte search for `;` for ordinary SQL.
pub fn changes_settings(sql: &[u8]) -> bool {
    // One pass over the text for `;` (a next statement) and `(` (a call, in a SELECT).
    let mut select = match statement_start(sql) {
        Start::Changes => return true,
        Start::Select => true,
        Start::Other => false,
    };
    for at in memchr::memchr2_iter(b';', b'(', sql) {
        if sql[at] == b';' {
            select = match statement_start(&sql[at + 1..]) {
                Start::Changes => return true,
                Start::Select => true,
                Start::Other => false,
            };
        } else if select && names_set_config(&sql[..at]) {
            return true;
        }
    }
    false
}

/// How a statement starts, for [`changes_settings`].
enum Start {
    /// `SET` (session-level) or `RESET`.
    Changes,
    /// `SELECT`: a `set_config(` in it changes a setting.
    Select,
    Other,
}

#[inline]
fn statement_start(statement: &[u8]) -> Start {
    let text = statement.trim_ascii_start();
    // Only SET, RESET, SELECT (and a leading comment) matter: one byte decides for the rest.
    let text = match text.first() {
        Some(b'-' | b'/') => skip_comments(text),
        Some(b) if matches!(b | 0x20, b's' | b'r') => text,
        _ => return Start::Other,
    };
    let (first, rest) = word(text);
    if first.eq_ignore_ascii_case(b"reset") {
        return Start::Changes;
    }
    if first.eq_ignore_ascii_case(b"set") {
        let (second, _) = word(rest.trim_ascii_start());
        let ends_with_transaction = [b"local".as_slice(), b"transaction", b"constraints"]
            .iter()
            .any(|w| second.eq_ignore_ascii_case(w));
        return match ends_with_transaction {
            true => Start::Other,
            false => Start::Changes,
        };
    }
    match first.eq_ignore_ascii_case(b"select") {
        true => Start::Select,
        false => Start::Other,
    }
}

/// Whether the text before a `(` ends with the name `set_config` (any case, `pg_catalog.`
/// or not).
fn names_set_config(before: &[u8]) -> bool {
    const WORD: &[u8] = b"set_config";
    let before = before.trim_ascii_end();
    before.len() >= WORD.len() && before[before.len() - WORD.len()..].eq_ignore_ascii_case(WORD)
}

/// What one session-level SET or RESET statement does, for replaying a client's settings
/// on another server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// Sets (or, `TO DEFAULT`, resets) one parameter: `role`, `session_authorization`,
    /// `timezone`, `search_path` (SET SCHEMA), `client_encoding` (SET NAMES), or the name.
    Set(String),
    Reset(String),
    /// `RESET ALL`: every parameter but the role and the session user.
    ResetAll,
}

/// Statements longer than this are not replayed (the server still gets reset).
const MAX_REPLAYED: usize = 4096;

/// `sql` is exactly one session-level SET or RESET statement (a trailing `;` allowed), with
/// no comment and no `;` inside: what it sets. None for anything else, including forms that
/// end with the transaction (SET LOCAL, SET TRANSACTION, SET CONSTRAINTS).
pub fn setting(sql: &[u8]) -> Option<Setting> {
    let sql = sql.strip_suffix(&[0]).unwrap_or(sql).trim_ascii();
    let sql = sql.strip_suffix(b";").unwrap_or(sql).trim_ascii_end();
    if sql.len() > MAX_REPLAYED
        || memchr::memchr(b';', sql).is_some()
        || memchr::memmem::find(sql, b"--").is_some()
        || memchr::memmem::find(sql, b"/*").is_some()
    {
        return None;
    }
    let text = std::str::from_utf8(sql).ok()?;
    let mut words = text.split_ascii_whitespace();
    let verb = words.next()?.to_ascii_lowercase();
    let mut next = words.next()?;
    let is = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
    if verb == "set" && is(next, "session") {
        next = words.next()?;
        if is(next, "characteristics") {
            return Some(Setting::Set("session_characteristics".into()));
        }
    } else if verb != "set" && verb != "reset"
        || verb == "set"
            && ["local", "transaction", "constraints"]
                .iter()
                .any(|k| is(next, k))
    {
        // Not a setting, or one that ends with the transaction.
        return None;
    }
    let key = if is(next, "role") {
        "role".to_owned()
    } else if is(next, "authorization") || is(next, "session") && is(words.next()?, "authorization")
    {
        "session_authorization".to_owned()
    } else if is(next, "time") {
        "timezone".to_owned()
    } else if is(next, "schema") {
        "search_path".to_owned()
    } else if is(next, "names") {
        "client_encoding".to_owned()
    } else if verb == "reset" && is(next, "all") {
        return Some(Setting::ResetAll);
    } else {
        // A parameter name, up to `=`, `TO` or a space; a quoted one keeps its case.
        let name = next.split('=').next()?;
        match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.to_owned(),
            None if name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') =>
            {
                name.to_ascii_lowercase()
            }
            None => return None,
        }
    };
    if key.is_empty() {
        return None;
    }
    Some(match verb.as_str() {
        "set" => Setting::Set(key),
        _ => Setting::Reset(key),
    })
}

/// The leading word (letters and `_`) of `t`, and the rest.
fn word(t: &[u8]) -> (&[u8], &[u8]) {
    let end = t
        .iter()
        .position(|b| !b.is_ascii_alphabetic() && *b != b'_')
        .unwrap_or(t.len());
    t.split_at(end)
}

/// The text after leading whitespace and comments.
fn skip_comments(mut s: &[u8]) -> &[u8] {
    loop {
        s = s.trim_ascii_start();
        if s.starts_with(b"--") {
            s = memchr::memchr(b'\n', s).map_or(&[], |i| &s[i + 1..]);
        } else if s.starts_with(b"/*") {
            s = memchr::memmem::find(&s[2..], b"*/").map_or(&[], |i| &s[i + 4..]);
        } else {
            return s;
        }
    }
}

fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// `pg_advisory_lock` or `pg_try_advisory_lock` anywhere in `s`, in any case. A 'v' is rare
/// in SQL and every candidate has one at a known place, so only those are tried.
fn advisory_lock(s: &[u8]) -> bool {
    const WORD: &[u8] = b"advisory_lock";
    memchr::memchr2_iter(b'v', b'V', s).any(|v| {
        let Some(at) = v.checked_sub(2) else {
            return false;
        };
        if !starts_with_ci(&s[at..], WORD) {
            return false;
        }
        let before = &s[..at];
        let ends = |p: &[u8]| {
            before.len() >= p.len() && before[before.len() - p.len()..].eq_ignore_ascii_case(p)
        };
        ends(b"pg_") || ends(b"pg_try_")
    })
}

fn with_hold(s: &[u8]) -> bool {
    s.iter()
        .enumerate()
        .any(|(i, &b)| b | 0x20 == b'w' && starts_with_ci(&s[i..], b"with hold"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_session_state_cheaply() {
        let k = |s: &str| kind(s.as_bytes()).map(|i| KINDS[i]);
        assert_eq!(k("LISTEN chan"), Some("listen"));
        assert_eq!(k("  prepare p as select 1"), Some("sql_prepare"));
        assert_eq!(k("create temp table t(a int)"), Some("temp_table"));
        assert_eq!(k("CREATE TEMPORARY TABLE t(a int)"), Some("temp_table"));
        assert_eq!(k("create table t(a int)"), None);
        assert_eq!(k("select pg_advisory_lock(1)"), Some("advisory_lock"));
        assert_eq!(k("SELECT PG_TRY_ADVISORY_LOCK(1)"), Some("advisory_lock"));
        assert_eq!(
            k("select x, pg_advisory_lock_shared(1)"),
            Some("advisory_lock")
        );
        assert_eq!(k("select pg_advisory_xact_lock(1)"), None);
        assert_eq!(k("select my_advisory_lock(1)"), None);
        assert_eq!(
            k("declare c cursor with hold for select 1"),
            Some("with_hold_cursor")
        );
        assert_eq!(
            k("DECLARE c CURSOR WITH HOLD FOR select 1"),
            Some("with_hold_cursor")
        );
        assert_eq!(k("declare c cursor for select 1"), None);
        assert_eq!(k("select 1"), None);
        assert_eq!(k("update t set a = 1"), None);
        assert_eq!(k("select a from pgbench_accounts where aid = $1"), None);
        assert_eq!(k(""), None);
        assert_eq!(k("   "), None);
        assert_eq!(k("_"), None);
    }

    #[test]
    fn settings_a_client_keeps() {
        let s = |sql: &str| setting(sql.as_bytes());
        let set = |k: &str| Some(Setting::Set(k.to_owned()));
        assert_eq!(s("SET search_path TO app, public"), set("search_path"));
        assert_eq!(s("set Search_Path=app;"), set("search_path"));
        assert_eq!(
            s("SET SESSION statement_timeout = '5s'"),
            set("statement_timeout")
        );
        assert_eq!(s("SET myapp.tenant = 'a'\0"), set("myapp.tenant"));
        assert_eq!(s("SET \"MyApp.X\" TO 1"), set("MyApp.X"));
        assert_eq!(s("SET ROLE admin"), set("role"));
        assert_eq!(
            s("set session authorization bob"),
            set("session_authorization")
        );
        assert_eq!(s("SET TIME ZONE 'UTC'"), set("timezone"));
        assert_eq!(s("SET SCHEMA 'app'"), set("search_path"));
        assert_eq!(s("SET NAMES 'UTF8'"), set("client_encoding"));
        assert_eq!(
            s("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            set("session_characteristics")
        );
        assert_eq!(
            s("RESET search_path"),
            Some(Setting::Reset("search_path".into()))
        );
        assert_eq!(s("reset role"), Some(Setting::Reset("role".into())));
        assert_eq!(
            s("RESET SESSION AUTHORIZATION"),
            Some(Setting::Reset("session_authorization".into()))
        );
        assert_eq!(s("RESET ALL"), Some(Setting::ResetAll));
        for sql in [
            "SET LOCAL search_path = x",
            "set transaction read only",
            "SET CONSTRAINTS ALL DEFERRED",
            "SET a = 1; SET b = 2",
            "SET application_name = 'a;b'",
            "/* c */ SET a = 1",
            "SET",
            "SELECT set_config('a', 'b', false)",
            "update t set a = 1",
        ] {
            assert_eq!(s(sql), None, "{sql:?}");
        }
        assert_eq!(s(&format!("SET a = '{}'", "x".repeat(5000))), None);
    }

    #[test]
    fn statements_that_change_settings() {
        for sql in [
            "SET search_path TO app",
            "set session statement_timeout = 5",
            "  SET ROLE admin",
            "set session authorization bob",
            "SET TIME ZONE 'UTC'",
            "set session characteristics as transaction read only",
            "RESET ALL",
            "reset role",
            "select pg_catalog.set_config('search_path', 'x', false)",
            "SELECT SET_CONFIG('a.b', 'c', false)",
            "select 1; set search_path = x",
            "/* app */ SET search_path = x",
            "-- note\nset role x",
        ] {
            assert!(changes_settings(sql.as_bytes()), "{sql:?}");
        }
        for sql in [
            "SET LOCAL search_path = x",
            "set transaction isolation level serializable",
            "SET CONSTRAINTS ALL DEFERRED",
            "update t set a = 1",
            "select a from t where aid = $1",
            "select settings_x from t",
            "BEGIN; SELECT 1; COMMIT",
            "settle",
            "",
        ] {
            assert!(!changes_settings(sql.as_bytes()), "{sql:?}");
        }
    }
}
