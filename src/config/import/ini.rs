//! pgbouncer.ini read as PgBouncer reads it: `[section]` lines, `;` and `#` comment lines,
//! `key = value` lines (the value is the rest of the line: `;` later in a line is no comment),
//! `%include FILE` (relative to the working directory, at most 10 deep), and the
//! `keyword=value` strings of `[databases]`, `[users]` and `[peers]` entries.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where a line is: a file and a 1-based line number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One `key = value` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The section's name, lower case.
    pub section: String,
    /// As written (a database or user name keeps its case); quotes removed.
    pub key: String,
    pub value: String,
    pub at: Location,
}

/// A mistake that stops the import: where, what, and the fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputError {
    /// `file:line`, or the file alone.
    pub at: String,
    pub message: String,
    pub fix: String,
}

impl InputError {
    pub fn new(at: impl ToString, message: impl Into<String>, fix: impl Into<String>) -> Self {
        InputError {
            at: at.to_string(),
            message: message.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; {}", self.at, self.message, self.fix)
    }
}

/// Everything read: the entries in file order (an include's where it is included), and the
/// files read with the line that included each.
#[derive(Debug, Default)]
pub struct Ini {
    pub entries: Vec<Entry>,
    pub files: Vec<(PathBuf, Option<Location>)>,
}

/// PgBouncer's limit on nested `%include`s.
const MAX_INCLUDE_DEPTH: usize = 10;

pub const SECTIONS: [&str; 4] = ["databases", "users", "pgbouncer", "peers"];

/// The whole file and its includes, or every mistake found.
pub fn read(path: &Path) -> Result<Ini, Vec<InputError>> {
    let mut reader = Reader::default();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            reader.ini.files.push((path.to_path_buf(), None));
            reader.text(&text, path, 0);
        }
        Err(e) => reader.errors.push(InputError::new(
            path.display(),
            format!("cannot read it: {e}"),
            "check the path",
        )),
    }
    if reader.errors.is_empty() {
        Ok(reader.ini)
    } else {
        Err(reader.errors)
    }
}

#[derive(Default)]
struct Reader {
    ini: Ini,
    errors: Vec<InputError>,
    /// The current section; an included file goes on in it, and its own `[section]` lines
    /// change it for the lines after the `%include` too, as in PgBouncer.
    section: Option<String>,
}

impl Reader {
    fn text(&mut self, text: &str, file: &Path, depth: usize) {
        for (index, line) in text.lines().enumerate() {
            let at = Location {
                file: file.to_path_buf(),
                line: index + 1,
            };
            let line = line.trim_start_matches('\u{feff}').trim();
            if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
                continue;
            }
            if let Some(rest) = line.strip_prefix("%include") {
                if rest.starts_with([' ', '\t']) {
                    self.include(rest.trim(), at, depth);
                    continue;
                }
            }
            if let Some(rest) = line.strip_prefix('[') {
                self.section_line(rest, &at);
                continue;
            }
            self.entry(line, at);
        }
    }

    fn include(&mut self, name: &str, at: Location, depth: usize) {
        if depth >= MAX_INCLUDE_DEPTH {
            self.errors.push(InputError::new(
                &at,
                format!("%include {name} nests more than {MAX_INCLUDE_DEPTH} files deep"),
                "PgBouncer stops there too: include fewer levels (an include may include itself by mistake)",
            ));
            return;
        }
        let path = PathBuf::from(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                self.ini.files.push((path.clone(), Some(at)));
                self.text(&text, &path, depth + 1);
            }
            Err(e) => self.errors.push(InputError::new(
                &at,
                format!("cannot read %include {name}: {e}"),
                "PgBouncer reads a relative path from its working directory, and so does the import: run it from there, or write the path in full",
            )),
        }
    }

    fn section_line(&mut self, rest: &str, at: &Location) {
        let Some((name, after)) = rest.split_once(']') else {
            self.errors.push(InputError::new(
                at,
                "the section name has no closing ]",
                "write [databases], [users], [pgbouncer] or [peers]",
            ));
            return;
        };
        let after = after.trim();
        if !(after.is_empty() || after.starts_with(';') || after.starts_with('#')) {
            self.errors.push(InputError::new(
                at,
                format!("text after [{name}]"),
                "put the section name on a line of its own",
            ));
        }
        let name = name.trim().to_ascii_lowercase();
        if !SECTIONS.contains(&name.as_str()) {
            self.errors.push(InputError::new(
                at,
                format!("unknown section [{name}]"),
                "PgBouncer knows [databases], [users], [pgbouncer] and [peers] only",
            ));
        }
        self.section = Some(name);
    }

    fn entry(&mut self, line: &str, at: Location) {
        let parsed = key_and_value(line);
        let (key, value) = match parsed {
            Ok(pair) => pair,
            Err(message) => {
                self.errors.push(InputError::new(
                    &at,
                    message,
                    "write name = value (a name with other characters than letters, digits and _.-* in quotes)",
                ));
                return;
            }
        };
        let Some(section) = self.section.clone() else {
            self.errors.push(InputError::new(
                &at,
                format!("{key} is set before any section"),
                "put it under [pgbouncer] (settings) or [databases] (databases)",
            ));
            return;
        };
        self.ini.entries.push(Entry {
            section,
            key,
            value,
            at,
        });
    }
}

/// `name = value`: the name bare (letters, digits, `_.-*`) or quoted (`'...'`, or `"..."`
/// with `""` for a quote); the value is the rest of the line.
fn key_and_value(line: &str) -> Result<(String, String), String> {
    let (key, rest) = match line.chars().next() {
        Some(quote @ ('\'' | '"')) => quoted(&line[1..], quote)
            .ok_or_else(|| format!("the name {line:?} has no closing {quote}"))?,
        _ => {
            let end = line
                .find(|c: char| !(c.is_ascii_alphanumeric() || "_.-*".contains(c)))
                .unwrap_or(line.len());
            (line[..end].to_string(), &line[end..])
        }
    };
    if key.is_empty() {
        return Err(format!("{line:?} is not name = value"));
    }
    let Some(value) = rest.trim_start_matches([' ', '\t']).strip_prefix('=') else {
        return Err(format!("{key} has no = after it"));
    };
    Ok((key, value.trim().to_string()))
}

/// The text up to the closing `quote` (a doubled quote is one) and what follows it.
fn quoted(text: &str, quote: char) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != quote {
            value.push(c);
        } else if chars.peek().is_some_and(|(_, next)| *next == quote) {
            value.push(quote);
            chars.next();
        } else {
            return Some((value, &text[i + 1..]));
        }
    }
    None
}

/// A `[databases]`, `[users]` or `[peers]` value: `keyword=value` pairs separated by spaces,
/// a value in single quotes when it holds spaces (`''` for a quote), as PgBouncer reads them.
/// The message never quotes a value (it may be a password).
pub fn pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let keyword = &rest[..end];
        let after = rest[end..].trim_start();
        let Some(after) = after.strip_prefix('=') else {
            return Err(match keyword {
                "" => "a keyword is missing before =".into(),
                _ => format!("{keyword} has no = after it"),
            });
        };
        if keyword.is_empty() {
            return Err("a keyword is missing before =".into());
        }
        let after = after.trim_start();
        let (value, next) = match after.strip_prefix('\'') {
            Some(body) => quoted(body, '\'')
                .ok_or_else(|| format!("the value of {keyword} has no closing '"))?,
            None => {
                let end = after.find(char::is_whitespace).unwrap_or(after.len());
                (after[..end].to_string(), &after[end..])
            }
        };
        if value.is_empty() {
            return Err(format!("{keyword} has an empty value"));
        }
        if !(next.is_empty() || next.starts_with(char::is_whitespace)) {
            return Err(format!(
                "the value of {keyword} runs on after its closing '"
            ));
        }
        pairs.push((keyword.to_ascii_lowercase(), value));
        rest = next.trim_start();
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ini(text: &str) -> Result<Ini, Vec<InputError>> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        read(file.path())
    }

    #[test]
    fn sections_comments_and_values_as_pgbouncer_reads_them() {
        let text = "\u{feff}; comment\n# another\n[databases]\n  app = host=db dbname=app\n'my db' = host=x\n\"we\"\"ird\" =\n* = host=fallback\n\n[PgBouncer]\nlisten_port=6433\npool_mode = session ; not a comment\nunix_socket_dir =\r\n";
        let ini = ini(text).unwrap();
        let got: Vec<(&str, &str, &str, usize)> = ini
            .entries
            .iter()
            .map(|e| {
                (
                    e.section.as_str(),
                    e.key.as_str(),
                    e.value.as_str(),
                    e.at.line,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("databases", "app", "host=db dbname=app", 4),
                ("databases", "my db", "host=x", 5),
                ("databases", "we\"ird", "", 6),
                ("databases", "*", "host=fallback", 7),
                ("pgbouncer", "listen_port", "6433", 10),
                ("pgbouncer", "pool_mode", "session ; not a comment", 11),
                ("pgbouncer", "unix_socket_dir", "", 12),
            ]
        );
    }

    #[test]
    fn includes_are_read_in_place_and_keep_the_section() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("inner.ini");
        std::fs::write(&inner, "max_client_conn = 50\n[databases]\nb = host=b\n").unwrap();
        let outer = dir.path().join("outer.ini");
        std::fs::write(
            &outer,
            format!("[pgbouncer]\n%include {}\na = host=a\n", inner.display()),
        )
        .unwrap();
        let ini = read(&outer).unwrap();
        let got: Vec<(&str, &str)> = ini
            .entries
            .iter()
            .map(|e| (e.section.as_str(), e.key.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("pgbouncer", "max_client_conn"),
                ("databases", "b"),
                ("databases", "a")
            ]
        );
        assert_eq!(ini.files.len(), 2);
        assert_eq!(ini.files[1].1.as_ref().unwrap().line, 2);
        assert_eq!(ini.entries[1].at.file, inner);

        std::fs::write(&inner, format!("%include {}\n", inner.display())).unwrap();
        let errors = read(&outer).unwrap_err();
        assert!(errors[0].message.contains("more than 10"), "{errors:?}");
        std::fs::write(&outer, "[pgbouncer]\n%include /no/such/file.ini\n").unwrap();
        let errors = read(&outer).unwrap_err();
        assert!(errors[0].at.ends_with("outer.ini:2"), "{errors:?}");
        assert!(errors[0].fix.contains("working directory"), "{errors:?}");
    }

    #[test]
    fn every_mistake_is_reported_with_its_line() {
        let errors = ini("orphan = 1\n[pgbouncer\n[nonsense]\n[pgbouncer]\nno_equals\n= 3\n'open = 1\n[databases] x = y\n").unwrap_err();
        let lines: Vec<&str> = errors
            .iter()
            .map(|e| e.at.rsplit(':').next().unwrap())
            .collect();
        assert_eq!(lines, ["1", "2", "3", "5", "6", "7", "8"], "{errors:#?}");
        assert!(errors[2].message.contains("unknown section [nonsense]"));
    }

    #[test]
    fn connection_strings() {
        let got =
            pairs("host=db1,db2  port = 5433 dbname='my db' password='it''s' user=app").unwrap();
        let want = [
            ("host", "db1,db2"),
            ("port", "5433"),
            ("dbname", "my db"),
            ("password", "it's"),
            ("user", "app"),
        ];
        assert_eq!(
            got.iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
            want
        );
        assert!(pairs("").unwrap().is_empty());
        for (bad, says) in [
            ("host", "host has no = after it"),
            ("=x", "a keyword is missing"),
            ("host=", "host has an empty value"),
            ("password='hunter2", "no closing '"),
            ("password='hunter2'x", "runs on"),
        ] {
            let message = pairs(bad).unwrap_err();
            assert!(message.contains(says), "{bad}: {message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }
}
