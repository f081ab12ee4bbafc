//! What statements do to a session beyond their transaction, seen from their text without a
//! SQL parser: settings a client changes (replayed on its next servers), session state that
//! transaction mode cannot carry from one server to the next (LISTEN, SQL PREPARE, temporary
//! tables, session advisory locks, WITH HOLD cursors; such a client is pinned to its
//! server), and statements that may remove that state.
//!
//! [`effects`] runs on every simple Query and every Parse in transaction mode, so it costs
//! one byte search over the text and a few byte comparisons per statement.

/// Kinds of session state, as metric label values.
pub const KINDS: [&str; 6] = [
    "listen",
    "sql_prepare",
    "temp_table",
    "advisory_lock",
    "with_hold_cursor",
    "session_set_unreported",
];

/// The kinds (bits over [`KINDS`]) that pin a transaction-mode client to its server:
/// everything but a session-level SET, which is replayed instead.
pub const PINS: u8 = 0b1_1111;

/// The names of the kinds in `bits`, comma-separated (for SHOW CLIENTS and logs).
pub fn names(bits: u8) -> String {
    KINDS
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, k)| *k)
        .collect::<Vec<_>>()
        .join(",")
}

/// What SQL text (a Query body or a Parse's statement, any of its `;`-separated statements)
/// may do to the session, for transaction mode. It errs on the side of yes (a `;` inside a
/// string can start a "statement"): a yes costs a server reset, or a question to the server.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Effects {
    /// Kinds of session state created (bits over [`KINDS`]).
    pub kinds: u8,
    /// May change settings for good: `SET` (not `SET LOCAL`, `SET TRANSACTION` or
    /// `SET CONSTRAINTS`, which end with the transaction), `RESET`, or a `SELECT` that calls
    /// `set_config`.
    pub settings: bool,
    /// May remove session state: `DISCARD`, `DEALLOCATE`, `DROP`, `CLOSE`, `UNLISTEN`, the
    /// end of a transaction block (what it created may end with it), or a `SELECT` that
    /// calls `pg_advisory_unlock` / `pg_advisory_unlock_all`.
    pub drops: bool,
}

impl Effects {
    /// Creates state that pins a transaction-mode client to its server ([`PINS`]).
    pub fn pins(&self) -> bool {
        self.kinds & PINS != 0
    }
}

/// Each kind's bit (its index in [`KINDS`]).
const LISTEN: u8 = 1 << 0;
const SQL_PREPARE: u8 = 1 << 1;
const TEMP_TABLE: u8 = 1 << 2;
const ADVISORY_LOCK: u8 = 1 << 3;
const WITH_HOLD_CURSOR: u8 = 1 << 4;

/// This runs on every simple Query and every Parse in transaction mode, so it costs one byte
/// search over the text for `;` (a next statement) and `(` (a call), and a look at the first
/// word of each statement; only a `SELECT` is searched further (for advisory lock calls, by
/// a byte search for the `v` every such name has).
pub fn effects(sql: &[u8]) -> Effects {
    let mut e = Effects::default();
    let mut select = first_word(sql, &mut e);
    let mut from = 0;
    for at in memchr::memchr2_iter(b';', b'(', sql) {
        if sql[at] == b';' {
            if select {
                advisory(&sql[from..at], &mut e);
            }
            from = at + 1;
            select = first_word(&sql[from..], &mut e);
        } else if select && !e.settings && names_set_config(&sql[..at]) {
            e.settings = true;
        }
    }
    if select {
        advisory(&sql[from..], &mut e);
    }
    e
}

/// Looks at a statement's first words; true for a `SELECT` (searched further by the caller).
#[inline]
fn first_word(statement: &[u8], e: &mut Effects) -> bool {
    let text = statement.trim_ascii_start();
    // One byte rules out most statements (INSERT, UPDATE, BEGIN, WITH, FETCH, ...).
    let text = match text.first() {
        Some(b'-' | b'/') => skip_comments(text),
        Some(b)
            if matches!(
                b | 0x20,
                b's' | b'r' | b'l' | b'p' | b'c' | b'd' | b'e' | b'a' | b'u'
            ) =>
        {
            text
        }
        _ => return false,
    };
    let (first, rest) = word(text);
    let is = |w: &[u8]| first.eq_ignore_ascii_case(w);
    if is(b"select") {
        return true;
    }
    let (second, _) = word(rest.trim_ascii_start());
    let second_is = |w: &[u8]| second.eq_ignore_ascii_case(w);
    if is(b"set") {
        e.settings |=
            !(second_is(b"local") || second_is(b"transaction") || second_is(b"constraints"));
    } else if is(b"reset") {
        e.settings = true;
    } else if is(b"listen") {
        e.kinds |= LISTEN;
    } else if is(b"prepare") {
        // PREPARE TRANSACTION is two-phase commit, not a statement.
        if !second_is(b"transaction") {
            e.kinds |= SQL_PREPARE;
        }
    } else if is(b"create") {
        let next = rest.trim_ascii_start();
        let temp = [
            b"temp".as_slice(),
            b"temporary",
            b"local temp",
            b"global temp",
        ]
        .iter()
        .any(|p| starts_with_ci(next, p));
        if temp {
            e.kinds |= TEMP_TABLE;
        }
    } else if is(b"declare") {
        if with_hold(rest) {
            e.kinds |= WITH_HOLD_CURSOR;
        }
    } else {
        const DROPPING: [&[u8]; 9] = [
            b"discard",
            b"deallocate",
            b"drop",
            b"close",
            b"unlisten",
            b"commit",
            b"end",
            b"rollback",
            b"abort",
        ];
        e.drops |= DROPPING.iter().any(|w| is(w));
    }
    false
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

/// Session-level advisory lock calls in a SELECT: `pg_advisory_lock`, `pg_try_advisory_lock`
/// (and their `_shared` forms) create state; `pg_advisory_unlock` and
/// `pg_advisory_unlock_all` may remove it (the `_xact_` forms end with the transaction). A
/// 'v' is rare in SQL and every candidate has one at a known place, so only those are tried.
fn advisory(s: &[u8], e: &mut Effects) {
    for v in memchr::memchr2_iter(b'v', b'V', s) {
        let Some(at) = v.checked_sub(2) else {
            continue;
        };
        let (before, after) = s.split_at(at);
        let ends = |p: &[u8]| {
            before.len() >= p.len() && before[before.len() - p.len()..].eq_ignore_ascii_case(p)
        };
        if starts_with_ci(after, b"advisory_lock") && (ends(b"pg_") || ends(b"pg_try_")) {
            e.kinds |= ADVISORY_LOCK;
        } else if starts_with_ci(after, b"advisory_unlock") && ends(b"pg_") {
            e.drops = true;
        }
    }
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
        let k = |s: &str| match effects(s.as_bytes()).kinds {
            0 => None,
            bits => Some(KINDS[bits.trailing_zeros() as usize]),
        };
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
        assert_eq!(k("PREPARE TRANSACTION 'x'"), None);
        assert_eq!(
            k("BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT"),
            Some("with_hold_cursor")
        );
        assert_eq!(k("select 1; create temp table t()"), Some("temp_table"));
        assert_eq!(k("select 1"), None);
        assert_eq!(k("update t set a = 1"), None);
        assert_eq!(k("select a from pgbench_accounts where aid = $1"), None);
        assert_eq!(k(""), None);
        assert_eq!(k("   "), None);
        assert_eq!(k("_"), None);
    }

    #[test]
    fn statements_that_may_drop_state() {
        for sql in [
            "DISCARD ALL",
            "discard temp",
            "DEALLOCATE p",
            "drop table t",
            "CLOSE c",
            "UNLISTEN *",
            "COMMIT",
            "end",
            "ROLLBACK",
            "select pg_advisory_unlock(1)",
            "SELECT PG_ADVISORY_UNLOCK_ALL()",
            "/* x */ drop table t",
        ] {
            assert!(effects(sql.as_bytes()).drops, "{sql:?}");
        }
        for sql in [
            "select 1",
            "insert into t values (1)",
            "dropped",
            "",
            "begin",
            "select pg_advisory_lock(1)",
        ] {
            assert!(!effects(sql.as_bytes()).drops, "{sql:?}");
        }
        assert_eq!(names(0b1100), "temp_table,advisory_lock");
        assert_eq!(names(0), "");
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
            assert!(effects(sql.as_bytes()).settings, "{sql:?}");
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
            assert!(!effects(sql.as_bytes()).settings, "{sql:?}");
        }
    }
}
