//! Session parameters that must follow a client from server to server.
//!
//! PostgreSQL reports some parameters with ParameterStatus (at login and whenever they
//! change), so both a client's view and each server's actual values are known exactly.
//! Other startup parameters (e.g. `extra_float_digits`, `options=-c ...`) are not reported;
//! for those iampool remembers what it set on each server itself.

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
}

fn tracked_index(name: &str) -> Option<usize> {
    TRACKED.iter().position(|t| t.eq_ignore_ascii_case(name))
}

impl SessionParams {
    /// Records a reported value. Returns true if `name` is tracked and the value changed.
    pub fn set_reported(&mut self, name: &str, value: &str) -> bool {
        match tracked_index(name) {
            Some(i) if self.reported[i].as_deref() != Some(value) => {
                self.reported[i] = Some(value.to_owned());
                true
            }
            _ => false,
        }
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

    /// The SQL that makes `server` match `client`, or None if they already match.
    /// `server`'s unreported values are updated to what the SQL sets; reported values are
    /// updated later from the server's own ParameterStatus messages.
    pub fn sync_sql(client: &SessionParams, server: &mut SessionParams) -> Option<String> {
        use crate::protocol::messages::{quote_ident, quote_literal};
        let mut sql = String::new();
        for (i, want) in client.reported.iter().enumerate() {
            if let Some(want) = want {
                if server.reported[i].as_deref() != Some(want.as_str()) {
                    sql.push_str(&format!(
                        "SET {} TO {};",
                        quote_ident(TRACKED[i]),
                        quote_literal(want)
                    ));
                }
            }
        }
        for (name, want) in &client.extra {
            let have = server
                .extra
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name));
            if have.map(|(_, v)| v.as_str()) != Some(want.as_str()) {
                sql.push_str(&format!(
                    "SET {} TO {};",
                    quote_ident(name),
                    quote_literal(want)
                ));
            }
        }
        for (name, _) in &server.extra {
            if !client
                .extra
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(name))
            {
                sql.push_str(&format!("RESET {};", quote_ident(name)));
            }
        }
        if sql.is_empty() {
            return None;
        }
        server.extra = client.extra.clone();
        Some(sql)
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
        let sql = SessionParams::sync_sql(&client, &mut server).unwrap();
        assert_eq!(
            sql,
            "SET \"application_name\" TO E'a';SET \"extra_float_digits\" TO E'3';"
        );
        // After the server reports the new value, nothing is left to do.
        server.set_reported("application_name", "a");
        assert_eq!(SessionParams::sync_sql(&client, &mut server), None);
        // A later client without the extra gets it reset.
        let mut other = client.clone();
        other.extra.clear();
        assert_eq!(
            SessionParams::sync_sql(&other, &mut server).unwrap(),
            "RESET \"extra_float_digits\";"
        );
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
