//! What an import did with each setting, for the operator to read on stderr. Values of
//! secrets (passwords, the auth file's contents) are never part of it.

use std::fmt;

use super::ini::Location;

/// What became of one setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Carried over with the same meaning.
    Carried,
    /// Carried over, but iampool will behave differently: to review.
    Changed,
    /// iampool needs no setting for it.
    NotNeeded,
    /// iampool cannot do it.
    NotCarried,
    /// iampool lacks the setting for now.
    NotYet,
}

impl Kind {
    const ORDER: [Kind; 5] = [
        Kind::Carried,
        Kind::Changed,
        Kind::NotNeeded,
        Kind::NotCarried,
        Kind::NotYet,
    ];

    fn heading(self) -> &'static str {
        match self {
            Kind::Carried => "carried over",
            Kind::Changed => "carried over with a difference, to review",
            Kind::NotNeeded => "not needed by iampool",
            Kind::NotCarried => "not carried over",
            Kind::NotYet => "not carried yet: iampool lacks the setting for now",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub kind: Kind,
    /// The line it came from; `None` for PgBouncer's defaults.
    pub at: Option<Location>,
    pub text: String,
}

/// The whole report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The files read, as the first line says them.
    pub read: Vec<String>,
    pub notes: Vec<Note>,
    /// The loader's complaints about the written configuration, one per line.
    pub load_errors: Vec<String>,
}

impl Report {
    pub fn note(&mut self, kind: Kind, at: Option<&Location>, text: impl Into<String>) {
        self.notes.push(Note {
            kind,
            at: at.cloned(),
            text: text.into(),
        });
    }

    pub fn of(&self, kind: Kind) -> impl Iterator<Item = &Note> {
        self.notes.iter().filter(move |note| note.kind == kind)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "read {}", self.read.join(", "))?;
        for kind in Kind::ORDER {
            let count = self.of(kind).count();
            if count == 0 {
                continue;
            }
            writeln!(f, "\n{} ({count}):", kind.heading())?;
            for note in self.of(kind) {
                match &note.at {
                    Some(at) => writeln!(f, "  {at}: {}", note.text)?,
                    None => writeln!(f, "  {}", note.text)?,
                }
            }
        }
        if !self.load_errors.is_empty() {
            writeln!(
                f,
                "\nthe written configuration does not load here as it is ({}):",
                self.load_errors.len()
            )?;
            for error in &self.load_errors {
                writeln!(f, "  {error}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_in_order_with_counts_and_lines() {
        let at = Location {
            file: "pgbouncer.ini".into(),
            line: 3,
        };
        let mut report = Report {
            read: vec!["pgbouncer.ini".into()],
            ..Report::default()
        };
        report.note(Kind::NotCarried, Some(&at), "auth_hba_file: no HBA");
        report.note(Kind::Carried, None, "pool_size = 20 (PgBouncer's default)");
        report.load_errors.push("auth_file: cannot read".into());
        assert_eq!(
            report.to_string(),
            "read pgbouncer.ini\n\ncarried over (1):\n  pool_size = 20 (PgBouncer's default)\n\n\
             not carried over (1):\n  pgbouncer.ini:3: auth_hba_file: no HBA\n\n\
             the written configuration does not load here as it is (1):\n  auth_file: cannot read\n"
        );
    }
}
