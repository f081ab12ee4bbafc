//! `iampool import-pgbouncer`: the iampool configuration a pgbouncer.ini (and its auth file)
//! means, and a report of what was carried over, what differs, and what could not be and why.
//!
//! The written configuration is checked with iampool's own loader before it is handed out.

mod auth;
mod convert;
mod databases;
mod ini;
mod report;
#[cfg(test)]
mod tests;
mod value;
mod write;

use std::path::{Path, PathBuf};

pub use ini::InputError;
pub use report::{Kind, Note, Report};

use super::{Config, ImportArgs};
use ini::Entry;

/// A finished import.
#[derive(Debug)]
pub struct Imported {
    /// The configuration, TOML.
    pub toml: String,
    /// The configuration as iampool loads it, when it loads here.
    pub config: Option<Config>,
    pub report: Report,
    /// Whether `toml` holds passwords.
    pub has_secrets: bool,
}

/// Imports `ini` (and `userlist`, else the auth_file it names); `output` is where the TOML
/// will go, for the loader's messages. Errors are the input's mistakes, all of them.
pub fn import(
    ini_path: &Path,
    userlist: Option<&Path>,
    output: Option<&Path>,
) -> Result<Imported, Vec<InputError>> {
    let ini = ini::read(ini_path)?;
    let mut import = convert::Import {
        plan: convert::Plan::default(),
        report: Report::default(),
        errors: Vec::new(),
        userlist_arg: userlist,
        users: Vec::new(),
        console_users: Vec::new(),
    };
    for (file, included_at) in &ini.files {
        import.report.read.push(match included_at {
            Some(at) => format!("{} (%include at {at})", file.display()),
            None => file.display().to_string(),
        });
    }
    let section =
        |name: &str| -> Vec<&Entry> { ini.entries.iter().filter(|e| e.section == name).collect() };
    let settings = last_wins(&mut import.report, section("pgbouncer"), true);
    let databases = last_wins(&mut import.report, section("databases"), false);
    let users = last_wins(&mut import.report, section("users"), false);
    let peers = last_wins(&mut import.report, section("peers"), false);
    import.globals(&settings);
    import.databases(&databases);
    import.users_section(&users);
    import.peers_section(&peers);
    if !import.errors.is_empty() {
        return Err(import.errors);
    }
    if import.plan.databases.is_empty() {
        import.report.note(
            Kind::NotCarried,
            None,
            "no database could be carried over, and iampool needs one: see above",
        );
    }
    let toml = write::toml_text(&import.plan, &ini_path.display().to_string());
    let loaded_as = output.map_or_else(
        || PathBuf::from("the imported configuration"),
        Path::to_path_buf,
    );
    let config = match Config::from_toml(&toml, &loaded_as) {
        Ok(config) => Some(config),
        Err(errors) => {
            import.report.load_errors = errors.iter().map(ToString::to_string).collect();
            None
        }
    };
    let has_secrets = import
        .plan
        .databases
        .iter()
        .any(|d| d.items.iter().any(|item| item.secret));
    Ok(Imported {
        toml,
        config,
        report: import.report,
        has_secrets,
    })
}

/// Each name once, the last line of it counting, in the order of those last lines; a note
/// for each earlier one.
fn last_wins<'e>(report: &mut Report, entries: Vec<&'e Entry>, any_case: bool) -> Vec<&'e Entry> {
    let same = |a: &Entry, b: &Entry| {
        if any_case {
            a.key.eq_ignore_ascii_case(&b.key)
        } else {
            a.key == b.key
        }
    };
    let mut kept = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        match entries[i + 1..].iter().find(|later| same(entry, later)) {
            Some(later) => report.note(
                Kind::Changed,
                Some(&entry.at),
                format!(
                    "[{}] {} is set again at {}: the later one counts, as in PgBouncer",
                    entry.section, entry.key, later.at
                ),
            ),
            None => kept.push(*entry),
        }
    }
    kept
}

/// The command: the configuration to `--output` (mode 0600) or stdout, the report to
/// stderr. Exit status 0: written and loads; 1: written, does not load here as it is;
/// 2: nothing written.
pub fn run(args: &ImportArgs) -> u8 {
    let imported = match import(&args.ini, args.userlist.as_deref(), args.output.as_deref()) {
        Ok(imported) => imported,
        Err(errors) => {
            for error in errors {
                eprintln!("iampool import-pgbouncer: {error}");
            }
            eprintln!("iampool import-pgbouncer: nothing written");
            return 2;
        }
    };
    if let Err(e) = write_output(args.output.as_deref(), &imported.toml, imported.has_secrets) {
        eprintln!("iampool import-pgbouncer: {e}");
        return 2;
    }
    eprint!("{}", imported.report);
    let databases = imported.config.as_ref().map_or(0, |c| c.databases.len());
    match (&args.output, imported.config.is_some()) {
        (Some(path), true) => eprintln!(
            "\nwrote {} ({databases} databases); iampool check-config --config {} shows it as iampool reads it",
            path.display(),
            path.display()
        ),
        (None, true) => eprintln!("\nwrote the configuration to stdout ({databases} databases)"),
        (_, false) => eprintln!("\nwrote the configuration, which needs the fixes above to load"),
    }
    if imported.has_secrets && args.output.is_none() {
        eprintln!("it holds server passwords: keep it as private as pgbouncer.ini");
    }
    if imported.config.is_some() {
        0
    } else {
        1
    }
}

/// A file holding passwords is made readable by its owner only, even when it existed.
fn write_output(path: Option<&Path>, text: &str, secret: bool) -> Result<(), String> {
    use std::io::Write;
    match path {
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|e| format!("cannot write the configuration: {e}"))
        }
        Some(path) => {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut file| {
                    if secret {
                        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                    }
                    file.write_all(text.as_bytes())
                })
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
        }
    }
}
