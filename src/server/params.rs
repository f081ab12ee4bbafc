//! Session parameters that must follow a client from server to server.
//!
//! PostgreSQL reports some parameters with ParameterStatus (at login and whenever they
//! change), so both a client's view and each server's actual values are known exactly.
//! Other startup parameters (e.g. `extra_float_digits`, `options=-c ...`) are not reported;
//! for those iampool remembers what it set on each server itself.

use crate::protocol::session_state::Setting;

/// The reported parameters iampool carries across servers, as PgBouncer does.
pub const TRACKED: [&str; 7] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "search_path",
];

/// One session's parameter values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionParams {
    reported: [Option<String>; TRACKED.len()],
    /// Unreported parameters: for a client, what it asked for at startup; for a server, what
    /// iampool has set on it.
    extra: Vec<(String, String)>,
    /// A server only: something may have changed the values in `extra` (a client's `RESET`,
    /// a reset query other than `DISCARD ALL`); the names are still the only ones iampool
    /// may have set, but the next sync sets or resets each of them again.
    extra_unknown: bool,
    /// What a server reports about itself (PostgreSQL 14+): not carried across servers, but
    /// the role its pool checks (`server::role`).
    in_hot_standby: Option<bool>,
    default_transaction_read_only: Option<bool>,
    /// A server only, transaction mode: the client that may have changed its settings (SET,
    /// RESET, SET ROLE, set_config); another client gets the server only after a reset.
    settings_owner: Option<u64>,
    /// A client: its session-level SET and RESET statements that succeeded, one per
    /// parameter in the order last set, replayed on each new server. A server: the version
    /// of its owner's list it reflects.
    sets: Vec<(String, String)>,
    sets_version: u64,
}

/// At most this many parameters a client sets are replayed (the server is reset anyway).
const MAX_SETS: usize = 64;

/// What [`SessionParams::sync_sql`] asks a server to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSync {
    /// One statement: `SELECT pg_catalog.set_config(...), ...`.
    pub sql: String,
    /// The reported (tracked) parameters it sets, by their [`TRACKED`] spelling.
    pub reported: Vec<&'static str>,
}

fn tracked_index(name: &str) -> Option<usize> {
    TRACKED.iter().position(|t| t.eq_ignore_ascii_case(name))
}

impl SessionParams {
    /// Records a reported value. Returns true if `name` is tracked and the value changed.
    pub fn set_reported(&mut self, name: &str, value: &str) -> bool {
        if name.eq_ignore_ascii_case("in_hot_standby") {
            self.in_hot_standby = Some(value == "on");
        } else if name.eq_ignore_ascii_case("default_transaction_read_only") {
            self.default_transaction_read_only = Some(value == "on");
        }
        match tracked_index(name) {
            Some(i) if self.reported[i].as_deref() != Some(value) => {
                self.reported[i] = Some(value.to_owned());
                true
            }
            _ => false,
        }
    }

    /// The reported `in_hot_standby` and `default_transaction_read_only`, if reported.
    pub fn role_reports(&self) -> (Option<bool>, Option<bool>) {
        (self.in_hot_standby, self.default_transaction_read_only)
    }

    /// A server: `client` sent a statement that may change its settings for good.
    pub fn note_settings_changed_by(&mut self, client: u64) {
        self.settings_owner = Some(client);
    }

    /// A server: whether it holds exactly what `client` (with `client_params`) set, so it
    /// needs neither a reset nor a replay.
    pub fn settings_are(&self, client: u64, client_params: &SessionParams) -> bool {
        match self.settings_owner {
            None => client_params.sets.is_empty(),
            Some(owner) => owner == client && self.sets_version == client_params.sets_version,
        }
    }

    /// A server: someone may have changed its settings.
    pub fn settings_dirty(&self) -> bool {
        self.settings_owner.is_some()
    }

    /// A server: its settings are back at the connection's startup values.
    pub fn settings_reset(&mut self) {
        self.settings_owner = None;
        self.forget_extra();
    }

    /// A client: its SET and RESET statements, as one statement list to replay.
    pub fn replay_sql(&self) -> Option<String> {
        (!self.sets.is_empty()).then(|| {
            let statements: Vec<&str> = self.sets.iter().map(|(_, s)| s.as_str()).collect();
            statements.join("; ")
        })
    }

    /// A server now holds `client`'s settings as of `client_params`.
    pub fn settings_now(&mut self, client: u64, client_params: &SessionParams) {
        self.settings_owner = Some(client);
        self.sets_version = client_params.sets_version;
    }

    /// A client: a SET or RESET statement succeeded (outside a transaction block, or in one
    /// that committed).
    pub fn record_setting(&mut self, setting: &Setting, statement: &str) {
        match setting {
            Setting::Set(key) => {
                self.sets.retain(|(k, _)| k != key);
                if self.sets.len() < MAX_SETS {
                    let statement = statement.trim().trim_end_matches([';', '\0', ' ']);
                    self.sets.push((key.clone(), statement.to_owned()));
                }
            }
            Setting::Reset(key) => self.sets.retain(|(k, _)| k != key),
            Setting::ResetAll => self
                .sets
                .retain(|(k, _)| k == "role" || k == "session_authorization"),
        }
        self.sets_version += 1;
    }

    /// A client: DISCARD ALL ended every setting and the role.
    pub fn clear_settings(&mut self) {
        self.sets.clear();
        self.sets_version += 1;
    }

    /// A client's startup asked for read-only transactions (default_transaction_read_only).
    pub fn startup_read_only(&self) -> bool {
        self.extra
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("default_transaction_read_only"))
            .is_some_and(|(_, v)| parse_bool(v) == Some(true))
    }

    pub fn reported(&self, name: &str) -> Option<&str> {
        tracked_index(name).and_then(|i| self.reported[i].as_deref())
    }

    /// Records a startup parameter from a client: tracked ones go to the reported set.
    pub fn set_startup(&mut self, name: &str, value: &str) {
        if tracked_index(name).is_some() {
            self.set_reported(name, value);
        } else if let Some(e) = self
            .extra
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            e.1 = value.to_owned();
        } else {
            self.extra.push((name.to_owned(), value.to_owned()));
        }
    }

    /// A server finished a command with this CommandComplete tag (the body, NUL included or
    /// not). `DISCARD ALL` returned every setting to the connection's startup values, where
    /// iampool set none; a `RESET` (of one parameter or all) leaves iampool's values unknown.
    pub fn on_command_complete(&mut self, tag: &[u8]) {
        let tag = tag.strip_suffix(&[0]).unwrap_or(tag);
        if tag.eq_ignore_ascii_case(b"DISCARD ALL") {
            self.settings_reset();
        } else if tag.eq_ignore_ascii_case(b"RESET") {
            self.extra_unknown = true;
        }
    }

    /// Every unreported parameter is back at the connection's startup value (a successful
    /// `DISCARD ALL` or `RESET ALL`): iampool has set none of them.
    pub fn forget_extra(&mut self) {
        self.extra.clear();
        self.extra_unknown = false;
    }

    /// Something iampool cannot see into ran on the server: the unreported values it set may
    /// have changed, so the next sync sets (or resets) all of them again.
    pub fn mark_extra_unknown(&mut self) {
        self.extra_unknown = true;
    }

    /// The statement that makes `server` match `client`, or None if they already match.
    /// `server`'s unreported values are updated to what the statement sets; reported values
    /// are updated later from the server's own ParameterStatus messages.
    ///
    /// Values are applied with `set_config`, which takes the raw string the way a startup
    /// packet's `options` does (`SET x TO 'a,b'` would make a list parameter such as
    /// `search_path` one quoted element); a NULL value resets a parameter.
    pub fn sync_sql(client: &SessionParams, server: &mut SessionParams) -> Option<ParamSync> {
        use crate::protocol::messages::quote_literal;
        let mut calls: Vec<String> = Vec::new();
        let mut reported = Vec::new();
        let mut set = |name: &str, value: Option<&str>| {
            calls.push(format!(
                "pg_catalog.set_config({}, {}, false)",
                quote_literal(name),
                value.map_or_else(|| "NULL".to_owned(), quote_literal)
            ));
        };
        for (i, want) in client.reported.iter().enumerate() {
            if let Some(want) = want {
                if server.reported[i].as_deref() != Some(want.as_str()) {
                    set(TRACKED[i], Some(want));
                    reported.push(TRACKED[i]);
                }
            }
        }
        for (name, want) in &client.extra {
            let have = server
                .extra
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name));
            if server.extra_unknown || have.map(|(_, v)| v.as_str()) != Some(want.as_str()) {
                set(name, Some(want));
            }
        }
        for (name, _) in &server.extra {
            if !client
                .extra
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(name))
            {
                set(name, None);
            }
        }
        server.extra_unknown = false;
        if calls.is_empty() {
            return None;
        }
        server.extra = client.extra.clone();
        Some(ParamSync {
            sql: format!("SELECT {}", calls.join(", ")),
            reported,
        })
    }
}

/// PostgreSQL's canonical spelling of a `client_encoding` value (`utf8` -> `UTF8`,
/// `Latin-1` -> `LATIN1`), as it reports it in ParameterStatus; None for a name it does
/// not know. Aliases are matched as PostgreSQL matches them: case-insensitively, ignoring
/// everything but letters and digits (src/common/encnames.c).
pub fn canonical_encoding(name: &str) -> Option<&'static str> {
    let clean: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let canonical = match clean.as_str() {
        "abc" | "tcvn" | "tcvn5712" | "vscii" | "win1258" | "windows1258" => "WIN1258",
        "alt" | "win866" | "windows866" => "WIN866",
        "big5" | "win950" | "windows950" => "BIG5",
        "euccn" => "EUC_CN",
        "eucjis2004" => "EUC_JIS_2004",
        "eucjp" => "EUC_JP",
        "euckr" => "EUC_KR",
        "euctw" => "EUC_TW",
        "gb18030" => "GB18030",
        "gbk" | "win936" | "windows936" => "GBK",
        "iso88591" | "latin1" => "LATIN1",
        "iso88592" | "latin2" => "LATIN2",
        "iso88593" | "latin3" => "LATIN3",
        "iso88594" | "latin4" => "LATIN4",
        "iso88599" | "latin5" => "LATIN5",
        "iso885910" | "latin6" => "LATIN6",
        "iso885913" | "latin7" => "LATIN7",
        "iso885914" | "latin8" => "LATIN8",
        "iso885915" | "latin9" => "LATIN9",
        "iso885916" | "latin10" => "LATIN10",
        "iso88595" => "ISO_8859_5",
        "iso88596" => "ISO_8859_6",
        "iso88597" => "ISO_8859_7",
        "iso88598" => "ISO_8859_8",
        "johab" => "JOHAB",
        "koi8" | "koi8r" => "KOI8R",
        "koi8u" => "KOI8U",
        "mskanji" | "shiftjis" | "sjis" | "win932" | "windows932" => "SJIS",
        "muleinternal" => "MULE_INTERNAL",
        "shiftjis2004" => "SHIFT_JIS_2004",
        "sqlascii" => "SQL_ASCII",
        "uhc" | "win949" | "windows949" => "UHC",
        "unicode" | "utf8" => "UTF8",
        "win" | "win1251" | "windows1251" => "WIN1251",
        "win1250" | "windows1250" => "WIN1250",
        "win1252" | "windows1252" => "WIN1252",
        "win1253" | "windows1253" => "WIN1253",
        "win1254" | "windows1254" => "WIN1254",
        "win1255" | "windows1255" => "WIN1255",
        "win1256" | "windows1256" => "WIN1256",
        "win1257" | "windows1257" => "WIN1257",
        "win874" | "windows874" => "WIN874",
        _ => return None,
    };
    Some(canonical)
}

/// The spelling PostgreSQL reports for a startup value of a tracked parameter, where it can
/// be known without asking a server: encoding names, boolean and enum values. Other values
/// (DateStyle, TimeZone, ...) come back as given, and are corrected from the server's own
/// report once a server has applied them.
pub fn canonical_startup_value(name: &str, value: &str) -> String {
    if name.eq_ignore_ascii_case("client_encoding") {
        if let Some(c) = canonical_encoding(value) {
            return c.to_owned();
        }
    } else if name.eq_ignore_ascii_case("standard_conforming_strings") {
        if let Some(b) = parse_bool(value) {
            return if b { "on" } else { "off" }.to_owned();
        }
    } else if name.eq_ignore_ascii_case("IntervalStyle") {
        let lower = value.trim().to_ascii_lowercase();
        if ["postgres", "postgres_verbose", "sql_standard", "iso_8601"].contains(&lower.as_str()) {
            return lower;
        }
    }
    value.to_owned()
}

/// PostgreSQL's parse_bool: on/off, true/false, yes/no, 1/0 and unambiguous prefixes.
fn parse_bool(value: &str) -> Option<bool> {
    let v = value.trim().to_ascii_lowercase();
    let prefix = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    if prefix("true", 1) || prefix("yes", 1) || prefix("on", 2) || v == "1" {
        Some(true)
    } else if prefix("false", 1) || prefix("no", 1) || prefix("off", 2) || v == "0" {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_sets_only_differences_and_resets_extras() {
        let mut client = SessionParams::default();
        client.set_reported("TimeZone", "UTC");
        client.set_reported("application_name", "a");
        client.set_startup("extra_float_digits", "3");
        let mut server = SessionParams::default();
        server.set_reported("timezone", "UTC");
        server.set_reported("application_name", "b");
        let sync = SessionParams::sync_sql(&client, &mut server).unwrap();
        assert_eq!(
            sync.sql,
            "SELECT pg_catalog.set_config(E'application_name', E'a', false), \
             pg_catalog.set_config(E'extra_float_digits', E'3', false)"
        );
        assert_eq!(sync.reported, ["application_name"]);
        // After the server reports the new value, nothing is left to do.
        server.set_reported("application_name", "a");
        assert_eq!(SessionParams::sync_sql(&client, &mut server), None);
        // A later client without the extra gets it reset.
        let mut other = client.clone();
        other.extra.clear();
        assert_eq!(
            SessionParams::sync_sql(&other, &mut server).unwrap().sql,
            "SELECT pg_catalog.set_config(E'extra_float_digits', NULL, false)"
        );
    }

    #[test]
    fn names_and_values_are_quoted_and_lists_stay_raw() {
        let mut client = SessionParams::default();
        client.set_startup("search_path", "a,b");
        client.set_startup("x.y'); DROP TABLE t; --", "it's \\ raw");
        let mut server = SessionParams::default();
        let sync = SessionParams::sync_sql(&client, &mut server).unwrap();
        assert_eq!(
            sync.sql,
            "SELECT pg_catalog.set_config(E'search_path', E'a,b', false), \
             pg_catalog.set_config(E'x.y''); DROP TABLE t; --', E'it''s \\\\ raw', false)"
        );
    }

    #[test]
    fn discard_all_forgets_and_reset_unknowns_what_iampool_set() {
        let mut client = SessionParams::default();
        client.set_startup("work_mem", "7MB");
        let mut server = SessionParams::default();
        assert!(SessionParams::sync_sql(&client, &mut server).is_some());
        assert_eq!(SessionParams::sync_sql(&client, &mut server), None);
        // RESET (ALL or one name): set again, even though the record says it matches.
        server.on_command_complete(b"RESET\0");
        let sync = SessionParams::sync_sql(&client, &mut server).unwrap();
        assert!(sync.sql.contains("E'work_mem', E'7MB'"), "{}", sync.sql);
        assert_eq!(SessionParams::sync_sql(&client, &mut server), None);
        // DISCARD ALL: nothing iampool set is left, so a client without it needs nothing.
        server.on_command_complete(b"DISCARD ALL\0");
        assert_eq!(
            SessionParams::sync_sql(&SessionParams::default(), &mut server),
            None
        );
        assert!(SessionParams::sync_sql(&client, &mut server).is_some());
        // Other tags change nothing.
        server.on_command_complete(b"SELECT 1\0");
        server.on_command_complete(b"DISCARD PLANS\0");
        assert_eq!(SessionParams::sync_sql(&client, &mut server), None);
    }

    #[test]
    fn canonical_spellings() {
        assert_eq!(canonical_encoding("utf8"), Some("UTF8"));
        assert_eq!(canonical_encoding("UTF-8"), Some("UTF8"));
        assert_eq!(canonical_encoding("unicode"), Some("UTF8"));
        assert_eq!(canonical_encoding("Latin-1"), Some("LATIN1"));
        assert_eq!(canonical_encoding("iso_8859_5"), Some("ISO_8859_5"));
        assert_eq!(canonical_encoding("sql_ascii"), Some("SQL_ASCII"));
        assert_eq!(canonical_encoding("klingon"), None);
        assert_eq!(canonical_startup_value("client_encoding", "utf8"), "UTF8");
        assert_eq!(canonical_startup_value("client_encoding", "nope"), "nope");
        assert_eq!(
            canonical_startup_value("standard_conforming_strings", "true"),
            "on"
        );
        assert_eq!(
            canonical_startup_value("standard_conforming_strings", "of"),
            "off"
        );
        assert_eq!(
            canonical_startup_value("standard_conforming_strings", "o"),
            "o"
        );
        assert_eq!(
            canonical_startup_value("IntervalStyle", "ISO_8601"),
            "iso_8601"
        );
        assert_eq!(canonical_startup_value("DateStyle", "iso, dmy"), "iso, dmy");
    }

    #[test]
    fn untracked_reports_are_ignored() {
        let mut p = SessionParams::default();
        assert!(!p.set_reported("server_version", "15"));
        assert!(p.set_reported("DateStyle", "ISO, MDY"));
        assert!(!p.set_reported("datestyle", "ISO, MDY"));
        assert_eq!(p.reported("DATESTYLE"), Some("ISO, MDY"));
    }
}
