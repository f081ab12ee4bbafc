//! Client user secrets: PgBouncer's auth file format and the plain / md5 / SCRAM classification.
//!
//! Nothing here ever puts a secret into a message.

use super::error::Problem;
use super::{Secret, UserSecret};

/// A user's secret as stored: `md5` + 32 hex digits, a `SCRAM-SHA-256$` verifier, or plain text.
pub fn classify(secret: &str) -> Result<UserSecret, Problem> {
    if let Some(verifier) = secret.strip_prefix("SCRAM-SHA-256$") {
        if !is_scram_verifier(verifier) {
            return Err(Problem::new(
                "the SCRAM-SHA-256 verifier is malformed",
                "copy it whole from pg_authid.rolpassword: SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>",
            ));
        }
        return Ok(UserSecret::Scram(Secret::new(secret)));
    }
    let is_md5 = secret.len() == 35
        && secret.starts_with("md5")
        && secret[3..].bytes().all(|b| b.is_ascii_hexdigit());
    Ok(if is_md5 {
        UserSecret::Md5(Secret::new(secret))
    } else {
        UserSecret::Plain(Secret::new(secret))
    })
}

fn is_scram_verifier(verifier: &str) -> bool {
    let Some((iterations_salt, keys)) = verifier.split_once('$') else {
        return false;
    };
    let iterations_ok = iterations_salt
        .split_once(':')
        .is_some_and(|(n, salt)| n.parse::<u32>().is_ok_and(|n| n > 0) && !salt.is_empty());
    let keys_ok = keys
        .split_once(':')
        .is_some_and(|(stored, server)| !stored.is_empty() && !server.is_empty());
    iterations_ok && keys_ok
}

/// A mistake on one line of an auth file.
#[derive(Debug, PartialEq, Eq)]
pub struct LineError {
    /// 1-based.
    pub line: usize,
    pub problem: Problem,
}

/// Every `"user" "secret"` line of an auth file, and every malformed line.
/// Blank lines and lines starting with `;` or `#` are comments; `""` inside quotes is one `"`;
/// what follows the secret after a space is ignored, as PgBouncer ignores further fields.
pub fn parse(text: &str) -> (Vec<(String, UserSecret)>, Vec<LineError>) {
    let mut users: Vec<(String, UserSecret)> = Vec::new();
    let mut errors = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let parsed = parse_line(line).and_then(|(user, secret)| {
            if users.iter().any(|(seen, _)| *seen == user) {
                return Err(Problem::new(
                    format!("user {user:?} is listed again"),
                    "keep one line per user",
                ));
            }
            let secret = classify(&secret).map_err(|problem| Problem {
                message: format!("user {user:?}: {}", problem.message),
                fix: problem.fix,
            })?;
            Ok((user, secret))
        });
        match parsed {
            Ok(entry) => users.push(entry),
            Err(problem) => errors.push(LineError {
                line: line_number,
                problem,
            }),
        }
    }
    (users, errors)
}

const LINE_FIX: &str = r#"write "user" "secret" (a " inside quotes is written "")"#;

fn parse_line(line: &str) -> Result<(String, String), Problem> {
    let (user, rest) = quoted(line)
        .ok_or_else(|| Problem::new("the user name is not in double quotes", LINE_FIX))?;
    if user.is_empty() {
        return Err(Problem::new("the user name is empty", LINE_FIX));
    }
    let rest = rest.trim_start();
    let (secret, rest) = quoted(rest).ok_or_else(|| {
        Problem::new(
            format!("user {user:?} has no secret in double quotes after it"),
            LINE_FIX,
        )
    })?;
    // Text run on from the closing quote is a quoting mistake, not another field.
    if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
        return Err(Problem::new(
            format!("unexpected text right after the secret of user {user:?}"),
            LINE_FIX,
        ));
    }
    Ok((user, secret))
}

/// The contents of a leading `"..."` and what follows it; `None` without both quotes.
fn quoted(text: &str) -> Option<(String, &str)> {
    let body = text.strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '"' {
            value.push(c);
        } else if matches!(chars.peek(), Some((_, '"'))) {
            value.push('"');
            chars.next();
        } else {
            return Some((value, &body[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAM: &str = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy";

    #[test]
    fn parses_quotes_escapes_and_comments() {
        let text = format!(
            "; comment\n# another\n\n\"alice\" \"plain pw\"\n  \"bo\"\"b\"   \"md5{}\" ; trailing\n\"carol\" \"{SCRAM}\" \"a further field\" 42\n\"dave\" \"say \"\"hi\"\"\"\n",
            "0123456789abcdef0123456789abcdef"
        );
        let (users, errors) = parse(&text);
        assert!(errors.is_empty(), "{errors:?}");
        let names: Vec<&str> = users.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(names, ["alice", "bo\"b", "carol", "dave"]);
        assert!(matches!(&users[0].1, UserSecret::Plain(s) if s.expose() == "plain pw"));
        assert!(matches!(&users[1].1, UserSecret::Md5(_)));
        assert!(matches!(&users[2].1, UserSecret::Scram(s) if s.expose() == SCRAM));
        assert!(matches!(&users[3].1, UserSecret::Plain(s) if s.expose() == "say \"hi\""));
    }

    #[test]
    fn classification_by_prefix() {
        assert!(matches!(classify("md5nothex"), Ok(UserSecret::Plain(_))));
        assert!(matches!(
            classify(&format!("md5{}", "a".repeat(32))),
            Ok(UserSecret::Md5(_))
        ));
        assert!(matches!(classify(SCRAM), Ok(UserSecret::Scram(_))));
        let problem = classify("SCRAM-SHA-256$garbage-hunter2").unwrap_err();
        assert!(!problem.message.contains("hunter2"));
    }

    #[test]
    fn bad_lines_report_line_numbers_without_secrets() {
        let text = "\"ok\" \"fine\"\nalice hunter2\n\"bob\" \"hunter2\"extra\n\"carol\" \"hunter2\n\"ok\" \"again\"\n";
        let (users, errors) = parse(text);
        assert_eq!(users.len(), 1);
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [2, 3, 4, 5]);
        for error in &errors {
            assert!(!format!("{error:?}").contains("hunter2"), "{error:?}");
        }
    }
}
