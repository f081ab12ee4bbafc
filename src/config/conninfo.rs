//! libpq's keyword=value connection strings: `host=db.example.com port=5432 dbname=app`.
//!
//! As libpq reads them: spaces around `=` are allowed; a value is either unquoted (up to the
//! next space) or in single quotes; a backslash takes the next character as it is, in both.
//! The string's own parts (host, port, user, password, dbname) go to [`Parts`]; every other
//! keyword is passed on as a parameter, for the key table to accept or refuse. Messages quote
//! the string through [`redact`], which hides the password's value.

use std::ops::Range;

use super::error::Problem;
use super::url::{Form, Parts};
use super::Secret;

/// One `keyword=value`, decoded, with where its value was written.
struct Pair {
    keyword: String,
    value: String,
    value_span: Range<usize>,
}

/// Where reading stopped, and the value being read then (to hide it if it is a password).
struct SyntaxError {
    message: String,
    fix: &'static str,
    /// The keyword whose value was being read, and where that value starts.
    open_value: Option<(String, usize)>,
}

fn is_space(c: char) -> bool {
    // C's isspace, which libpq uses.
    matches!(c, ' ' | '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r')
}

/// The pairs of `text`, and the syntax error that stopped reading, if any.
fn pairs(text: &str) -> (Vec<Pair>, Option<SyntaxError>) {
    let mut pairs = Vec::new();
    let mut chars = text.char_indices().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| is_space(*c)).is_some() {}
    };
    loop {
        skip_spaces(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            return (pairs, None);
        };
        let mut end = text.len();
        while let Some(&(i, c)) = chars.peek() {
            if c == '=' || is_space(c) {
                end = i;
                break;
            }
            chars.next();
        }
        let keyword = text[start..end].to_string();
        skip_spaces(&mut chars);
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            let error = SyntaxError {
                message: format!("missing \"=\" after {keyword:?}"),
                fix: "write keyword=value pairs separated by spaces, e.g. host=db.example.com port=5432 (quote a value with spaces: 'a b')",
                open_value: None,
            };
            return (pairs, Some(error));
        }
        if keyword.is_empty() {
            let error = SyntaxError {
                message: "has a value without a keyword (\"=\" with nothing before it)".into(),
                fix: "write keyword=value, e.g. dbname=app",
                open_value: None,
            };
            return (pairs, Some(error));
        }
        skip_spaces(&mut chars);
        let value_start = chars.peek().map_or(text.len(), |&(i, _)| i);
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let mut value_end = text.len();
        let mut closed = !quoted;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                '\'' if quoted => {
                    value_end = i + 1;
                    closed = true;
                    break;
                }
                c if !quoted && is_space(c) => {
                    value_end = i;
                    break;
                }
                c => value.push(c),
            }
        }
        if !closed {
            let error = SyntaxError {
                message: format!("the value of {keyword} is a quoted string that is never closed"),
                fix: "end it with ' (write \\' for a quote inside it, \\\\ for a backslash)",
                open_value: Some((keyword, value_start)),
            };
            return (pairs, Some(error));
        }
        pairs.push(Pair {
            keyword,
            value,
            value_span: value_start..value_end,
        });
    }
}

/// The string with the value of `password` replaced by `***`, safe to print, even when it does
/// not parse (an unclosed quoted password hides everything after it).
pub fn redact(text: &str) -> String {
    let (pairs, error) = pairs(text);
    let mut hidden: Vec<Range<usize>> = pairs
        .iter()
        .filter(|pair| pair.keyword == "password")
        .map(|pair| pair.value_span.clone())
        .collect();
    if let Some(SyntaxError {
        open_value: Some((keyword, start)),
        ..
    }) = error
    {
        if keyword == "password" {
            hidden.push(start..text.len());
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for span in hidden {
        out.push_str(&text[at..span.start]);
        out.push_str("***");
        at = span.end;
    }
    out.push_str(&text[at..]);
    out
}

/// What a keyword=value string says. Keywords other than the string's own parts are returned
/// as parameters, unchecked.
pub fn parse(text: &str) -> Result<Parts, Problem> {
    let fail = |message: &str, fix: &str| {
        Problem::new(format!("{:?}: {message}", redact(text)), fix.to_string())
    };
    let (pairs, error) = pairs(text);
    if let Some(error) = error {
        return Err(fail(&error.message, error.fix));
    }
    if pairs.is_empty() {
        return Err(fail(
            "is empty",
            "write postgres://user@host:5432/dbname, or host=HOST port=5432 dbname=DB user=USER",
        ));
    }
    let mut parts = Parts {
        form: Form::Keywords,
        hosts: None,
        ports: None,
        user: None,
        password: None,
        dbname: None,
        params: Vec::new(),
    };
    let mut seen: Vec<&str> = Vec::new();
    for pair in &pairs {
        if seen.contains(&pair.keyword.as_str()) {
            return Err(fail(
                &format!("{} is given twice", pair.keyword),
                "keep one (libpq would silently use the last)",
            ));
        }
        seen.push(&pair.keyword);
        let list = || pair.value.split(',').map(str::to_string).collect();
        let value = Some(pair.value.clone()).filter(|value| !value.is_empty());
        match pair.keyword.as_str() {
            "host" => parts.hosts = value.is_some().then(list),
            "port" => parts.ports = value.is_some().then(list),
            "user" => parts.user = value,
            "password" => parts.password = value.map(Secret::new),
            "dbname" => parts.dbname = value,
            _ => parts
                .params
                .push((pair.keyword.clone(), pair.value.clone())),
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_values_quotes_and_escapes() {
        let parts = parse(
            " host = db.example.com port= 5432,5433 dbname='my app' user=iam\\ user password='it\\'s' sslmode =verify-full options='-c search_path=app'",
        )
        .unwrap();
        assert_eq!(parts.form, Form::Keywords);
        assert_eq!(parts.hosts, Some(vec!["db.example.com".to_string()]));
        assert_eq!(
            parts.ports,
            Some(vec!["5432".to_string(), "5433".to_string()])
        );
        assert_eq!(parts.dbname.as_deref(), Some("my app"));
        assert_eq!(parts.user.as_deref(), Some("iam user"));
        assert_eq!(parts.password.as_ref().map(Secret::expose), Some("it's"));
        assert_eq!(
            parts.params,
            [
                ("sslmode".to_string(), "verify-full".to_string()),
                ("options".to_string(), "-c search_path=app".to_string())
            ]
        );
        // An empty value is no value; a value may hold = and be empty in quotes.
        let parts = parse("host='' dbname=a=b user=").unwrap();
        assert_eq!(parts.hosts, None);
        assert_eq!(parts.user, None);
        assert_eq!(parts.dbname.as_deref(), Some("a=b"));
        // As in libpq, spaces after = are skipped, so the next word is the value.
        let parts = parse("user= dbname=x").unwrap();
        assert_eq!(parts.user.as_deref(), Some("dbname=x"));
    }

    #[test]
    fn syntax_errors_say_what_is_wrong() {
        for (text, expect) in [
            ("host=h port", "missing \"=\" after \"port\""),
            ("host h", "missing \"=\" after \"host\""),
            ("host=h =5432", "without a keyword"),
            ("host='h port=5432", "never closed"),
            ("host=h dbname='x\\'", "never closed"),
            ("host=a host=b", "given twice"),
            ("   ", "is empty"),
        ] {
            let problem = parse(text).unwrap_err();
            assert!(problem.message.contains(expect), "{text}: {problem:?}");
        }
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("host=h password=s3cret user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(
            redact("password = 's3 cret' user=u"),
            "password = *** user=u"
        );
        assert_eq!(redact("user=u password='s3cret"), "user=u password=***");
        let problem = parse("password=s3cret host").unwrap_err();
        assert!(!problem.message.contains("s3cret"), "{problem:?}");
        let problem = parse("host=h password='s3cret").unwrap_err();
        assert!(!problem.message.contains("s3cret"), "{problem:?}");
    }
}
