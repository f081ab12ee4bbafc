//! Configuration mistakes: each names its key, where the value came from, and the fix.

use std::fmt;
use std::path::PathBuf;

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Default,
    /// The TOML file at this path.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// This command-line flag (with its dashes).
    Flag(String),
    /// A parameter, or the user part, of an upstream URL that came from the inner origin.
    Url(Box<Origin>),
    /// A keyword of a keyword=value upstream string that came from the inner origin.
    Keywords(Box<Origin>),
    /// The auth file at this path.
    AuthFile(PathBuf),
    /// Worked out from other settings; the text says how.
    Derived(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(path) | Origin::AuthFile(path) => write!(f, "{}", path.display()),
            Origin::Env(var) => f.write_str(var),
            Origin::Flag(flag) => f.write_str(flag),
            Origin::Url(inner) => write!(f, "the URL in {inner}"),
            Origin::Keywords(inner) => write!(f, "the connection string in {inner}"),
            Origin::Derived(how) => f.write_str(how),
        }
    }
}

/// One configuration mistake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The key, e.g. `pool_size` or `databases.app.sslmode`.
    pub key: String,
    /// Where the value came from: a file path, an env var name, a flag, ...
    pub source: String,
    /// What is wrong. Never contains a secret.
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, origin: &Origin, problem: Problem) -> Self {
        ConfigError {
            key: key.into(),
            source: origin.to_string(),
            message: problem.message,
            fix: problem.fix,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (from {}): {}; {}",
            self.key, self.source, self.message, self.fix
        )
    }
}

impl std::error::Error for ConfigError {}

/// Every mistake found in one load, reported together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Drops exact repeats (a bad global default is seen once per database) and keeps order.
    pub(crate) fn deduplicated(errors: Vec<ConfigError>) -> Self {
        let mut unique: Vec<ConfigError> = Vec::with_capacity(errors.len());
        for error in errors {
            if !unique.contains(&error) {
                unique.push(error);
            }
        }
        ConfigErrors(unique)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// What is wrong with one value and how to fix it, before the key and origin are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub message: String,
    pub fix: String,
}

impl Problem {
    pub fn new(message: impl Into<String>, fix: impl Into<String>) -> Self {
        Problem {
            message: message.into(),
            fix: fix.into(),
        }
    }
}

/// The closest candidate to a mistyped name, if it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    let limit = if word.len() > 10 { 3 } else { 2 };
    candidates
        .into_iter()
        .map(|candidate| (edit_distance(&word, candidate), candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// "unknown key" fix text with a suggestion when one is close.
pub(crate) fn unknown_fix<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
    otherwise: &str,
) -> String {
    match did_you_mean(word, candidates) {
        Some(candidate) => format!("did you mean {candidate}?"),
        None => otherwise.to_string(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_are_close_names_only() {
        let keys = ["pool_size", "pool_mode", "listen"];
        assert_eq!(did_you_mean("pool_sise", keys), Some("pool_size"));
        assert_eq!(did_you_mean("POOL_MODE", keys), Some("pool_mode"));
        assert_eq!(did_you_mean("lisen", keys), Some("listen"));
        assert_eq!(did_you_mean("banana", keys), None);
    }

    #[test]
    fn errors_display_one_line_each() {
        let origin = Origin::Env("IAMPOOL_POOL_SIZE".into());
        let one = ConfigError::new(
            "pool_size",
            &origin,
            Problem::new("\"ten\" is not a number", "set a whole number, e.g. 20"),
        );
        let errors = ConfigErrors::deduplicated(vec![one.clone(), one.clone()]);
        assert_eq!(errors.0.len(), 1);
        assert_eq!(
            errors.to_string(),
            "pool_size (from IAMPOOL_POOL_SIZE): \"ten\" is not a number; set a whole number, e.g. 20"
        );
    }
}
