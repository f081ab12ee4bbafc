//! Parsing console input: a simple-query string into statements and commands.
//!
//! The grammar is PgBouncer's: a keyword, an optional object name, statements separated by
//! `;`. Keywords are case-insensitive; a database name is taken as written, or between
//! double quotes (with `""` for a quote) when it holds spaces or `;`.

/// What a SHOW statement asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Pools,
    Stats,
    StatsTotals,
    StatsAverages,
    Totals,
    Clients,
    Servers,
    Databases,
    Users,
    Lists,
    Mem,
    State,
    Peers,
    PeerPools,
    DnsHosts,
    DnsZones,
    /// SHOW FDS: refused (it serves PgBouncer's online restart).
    Fds,
    /// SHOW SOCKETS and ACTIVE_SOCKETS: refused (PgBouncer's buffer internals).
    Sockets,
    Config,
    Version,
    Tokens,
    Help,
}

impl Show {
    fn parse(what: &str) -> Option<Show> {
        Some(match what.to_ascii_uppercase().as_str() {
            "POOLS" => Show::Pools,
            "STATS" => Show::Stats,
            "STATS_TOTALS" => Show::StatsTotals,
            "STATS_AVERAGES" => Show::StatsAverages,
            "TOTALS" => Show::Totals,
            "CLIENTS" => Show::Clients,
            "SERVERS" => Show::Servers,
            "DATABASES" => Show::Databases,
            "USERS" => Show::Users,
            "LISTS" => Show::Lists,
            "MEM" => Show::Mem,
            "STATE" => Show::State,
            "PEERS" => Show::Peers,
            "PEER_POOLS" => Show::PeerPools,
            "DNS_HOSTS" => Show::DnsHosts,
            "DNS_ZONES" => Show::DnsZones,
            "FDS" => Show::Fds,
            "SOCKETS" | "ACTIVE_SOCKETS" => Show::Sockets,
            "CONFIG" => Show::Config,
            "VERSION" => Show::Version,
            "TOKENS" => Show::Tokens,
            "HELP" => Show::Help,
            _ => return None,
        })
    }
}

/// One console statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    /// `None`: every database.
    Pause(Option<String>),
    Resume(Option<String>),
    Reconnect(Option<String>),
    Kill(Option<String>),
    /// A client's `id` from SHOW CLIENTS.
    KillClient(u64),
    WaitClose(Option<String>),
    Enable(String),
    Disable(String),
    /// Refused: iampool cannot hand its sockets to another process.
    Suspend,
    /// Refused: settings change through the configuration and RELOAD.
    Set,
    Reload,
    /// `wait_for_clients`: SHUTDOWN WAIT_FOR_CLIENTS, which is refused.
    Shutdown {
        wait_for_clients: bool,
    },
}

impl Command {
    /// The CommandComplete tag.
    pub fn tag(&self) -> &'static str {
        match self {
            Command::Show(_) => "SHOW",
            Command::Pause(_) => "PAUSE",
            Command::Resume(_) => "RESUME",
            Command::Reconnect(_) => "RECONNECT",
            Command::Kill(_) => "KILL",
            Command::KillClient(_) => "KILL_CLIENT",
            Command::WaitClose(_) => "WAIT_CLOSE",
            Command::Enable(_) => "ENABLE",
            Command::Disable(_) => "DISABLE",
            Command::Suspend => "SUSPEND",
            Command::Set => "SET",
            Command::Reload => "RELOAD",
            Command::Shutdown { .. } => "SHUTDOWN",
        }
    }

    /// Whether a stats user (read-only) may run it.
    pub fn read_only(&self) -> bool {
        matches!(self, Command::Show(_))
    }
}

/// Every statement the console knows, for hints and SHOW HELP.
pub const COMMANDS: &str = "SHOW POOLS|STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS|CLIENTS|SERVERS|\
     DATABASES|USERS|LISTS|MEM|STATE|PEERS|PEER_POOLS|DNS_HOSTS|DNS_ZONES|CONFIG|VERSION|TOKENS|HELP; \
     PAUSE [db]; RESUME [db]; RECONNECT [db]; KILL [db]; KILL_CLIENT id; WAIT_CLOSE [db]; \
     ENABLE db; DISABLE db; RELOAD; SHUTDOWN";

/// A statement the console cannot run: SQLSTATE 42601 with a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub message: String,
}

impl SyntaxError {
    fn new(message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            message: message.into(),
        }
    }

    pub fn hint(&self) -> String {
        format!("the admin console understands: {COMMANDS}")
    }
}

/// Splits `sql` into the words of each statement; empty statements are dropped.
/// An unterminated quote is an error for the statement it starts in and everything after.
pub fn statements(sql: &str) -> Vec<Result<Vec<String>, SyntaxError>> {
    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut chars = sql.chars().peekable();
    loop {
        match chars.next() {
            None => break,
            Some(';') => {
                if !words.is_empty() {
                    out.push(Ok(std::mem::take(&mut words)));
                }
            }
            Some(c) if c.is_whitespace() => {}
            // A line comment, as psql users may paste: skipped to the end of the line.
            Some('-') if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            Some('"') => {
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => {
                            out.push(Err(SyntaxError::new("unterminated quoted identifier")));
                            return out;
                        }
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            word.push('"');
                        }
                        Some('"') => break,
                        Some(c) => word.push(c),
                    }
                }
                words.push(word);
            }
            Some(c) => {
                let mut word = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || n == ';' || n == '"' {
                        break;
                    }
                    word.push(n);
                    chars.next();
                }
                words.push(word);
            }
        }
    }
    if !words.is_empty() {
        out.push(Ok(words));
    }
    out
}

/// Turns one statement's words into a command.
pub fn parse(words: &[String]) -> Result<Command, SyntaxError> {
    let Some((first, rest)) = words.split_first() else {
        return Err(SyntaxError::new("empty statement"));
    };
    let keyword = first.to_ascii_uppercase();
    let target = |rest: &[String]| -> Result<Option<String>, SyntaxError> {
        match rest {
            [] => Ok(None),
            [db] => Ok(Some(db.clone())),
            _ => Err(SyntaxError::new(format!(
                "{keyword} takes at most one database name"
            ))),
        }
    };
    let bare = |rest: &[String], command: Command| -> Result<Command, SyntaxError> {
        if rest.is_empty() {
            Ok(command)
        } else {
            Err(SyntaxError::new(format!("{keyword} takes no arguments")))
        }
    };
    let database = |rest: &[String]| -> Result<String, SyntaxError> {
        match rest {
            [db] => Ok(db.clone()),
            [] => Err(SyntaxError::new(format!("{keyword} needs a database name"))),
            _ => Err(SyntaxError::new(format!(
                "{keyword} takes exactly one database name"
            ))),
        }
    };
    match keyword.as_str() {
        "SHOW" => {
            let [what] = rest else {
                return Err(SyntaxError::new("SHOW needs exactly one thing to show"));
            };
            match Show::parse(what) {
                Some(show) => Ok(Command::Show(show)),
                None => Err(SyntaxError::new(format!(
                    "unknown SHOW item: {}",
                    clip(what)
                ))),
            }
        }
        "PAUSE" => Ok(Command::Pause(target(rest)?)),
        "RESUME" => Ok(Command::Resume(target(rest)?)),
        "RECONNECT" => Ok(Command::Reconnect(target(rest)?)),
        "KILL" => Ok(Command::Kill(target(rest)?)),
        "WAIT_CLOSE" => Ok(Command::WaitClose(target(rest)?)),
        "ENABLE" => Ok(Command::Enable(database(rest)?)),
        "DISABLE" => Ok(Command::Disable(database(rest)?)),
        "KILL_CLIENT" => match rest {
            [id] => id.parse().map(Command::KillClient).map_err(|_| {
                SyntaxError::new(format!(
                    "KILL_CLIENT: not a client id: {} (use the id column of SHOW CLIENTS)",
                    clip(id)
                ))
            }),
            _ => Err(SyntaxError::new(
                "KILL_CLIENT takes one client id (the id column of SHOW CLIENTS)",
            )),
        },
        "SUSPEND" => bare(rest, Command::Suspend),
        // PgBouncer's `SET key = value` (or `key TO value`), however it is spelled.
        "SET" if !rest.is_empty() => Ok(Command::Set),
        "RELOAD" => bare(rest, Command::Reload),
        "SHUTDOWN" => match rest {
            [] => Ok(Command::Shutdown {
                wait_for_clients: false,
            }),
            [how] if how.eq_ignore_ascii_case("WAIT_FOR_SERVERS") => Ok(Command::Shutdown {
                wait_for_clients: false,
            }),
            [how] if how.eq_ignore_ascii_case("WAIT_FOR_CLIENTS") => Ok(Command::Shutdown {
                wait_for_clients: true,
            }),
            _ => Err(SyntaxError::new(
                "SHUTDOWN takes nothing, WAIT_FOR_SERVERS or WAIT_FOR_CLIENTS",
            )),
        },
        _ => Err(SyntaxError::new(format!(
            "unknown admin console command: {}",
            clip(first)
        ))),
    }
}

/// Echoes at most a short prefix of what the client sent.
fn clip(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Result<Command, SyntaxError> {
        let mut all = statements(sql);
        assert_eq!(all.len(), 1, "{sql}");
        parse(&all.remove(0)?)
    }

    #[test]
    fn commands() {
        assert_eq!(one("show pools"), Ok(Command::Show(Show::Pools)));
        assert_eq!(one("  SHOW   Stats ;"), Ok(Command::Show(Show::Stats)));
        assert_eq!(one("PAUSE"), Ok(Command::Pause(None)));
        assert_eq!(one("pause app"), Ok(Command::Pause(Some("app".into()))));
        assert_eq!(
            one("RESUME \"my \"\"db\"\"\""),
            Ok(Command::Resume(Some("my \"db\"".into())))
        );
        assert_eq!(one("reconnect"), Ok(Command::Reconnect(None)));
        assert_eq!(one("RELOAD"), Ok(Command::Reload));
        assert_eq!(
            one("shutdown -- bye\n"),
            Ok(Command::Shutdown {
                wait_for_clients: false
            })
        );
        assert_eq!(
            one("SHUTDOWN wait_for_clients"),
            Ok(Command::Shutdown {
                wait_for_clients: true
            })
        );
        assert_eq!(
            one("show stats_totals"),
            Ok(Command::Show(Show::StatsTotals))
        );
        assert_eq!(one("SHOW active_sockets"), Ok(Command::Show(Show::Sockets)));
        assert_eq!(one("KILL"), Ok(Command::Kill(None)));
        assert_eq!(one("kill app"), Ok(Command::Kill(Some("app".into()))));
        assert_eq!(one("KILL_CLIENT 42"), Ok(Command::KillClient(42)));
        assert_eq!(one("wait_close"), Ok(Command::WaitClose(None)));
        assert_eq!(one("DISABLE app"), Ok(Command::Disable("app".into())));
        assert_eq!(one("enable \"a b\""), Ok(Command::Enable("a b".into())));
        assert_eq!(one("SUSPEND"), Ok(Command::Suspend));
        assert_eq!(one("SET log_connections = 1"), Ok(Command::Set));
    }

    #[test]
    fn several_statements() {
        let all = statements("show pools; ; show version;pause x");
        let cmds: Vec<_> = all.into_iter().map(|w| parse(&w.unwrap())).collect();
        assert_eq!(
            cmds,
            vec![
                Ok(Command::Show(Show::Pools)),
                Ok(Command::Show(Show::Version)),
                Ok(Command::Pause(Some("x".into())))
            ]
        );
        assert!(statements(" ;; -- nothing").is_empty());
    }

    #[test]
    fn mistakes_are_errors() {
        assert!(one("SHOW").is_err());
        assert!(one("SHOW POOLS now").is_err());
        assert!(one("SHOW NOTHING").is_err());
        assert!(one("DISABLE").is_err());
        assert!(one("ENABLE a b").is_err());
        assert!(one("KILL_CLIENT").is_err());
        assert!(one("KILL_CLIENT 0x55e2").is_err());
        assert!(one("KILL_CLIENT -1").is_err());
        assert!(one("KILL_CLIENT 1 2").is_err());
        assert!(one("SUSPEND now").is_err());
        assert!(one("SET").is_err());
        assert!(one("SHUTDOWN later").is_err());
        assert!(one("PAUSE a b").is_err());
        assert!(one("RELOAD now").is_err());
        assert!(one("select 1").is_err());
        assert!(statements("pause \"open")[0].is_err());
        let long = "x".repeat(10_000);
        let e = one(&long).unwrap_err();
        assert!(e.message.len() < 100 && e.hint().contains("SHOW POOLS"));
    }

    #[test]
    fn never_panics_on_odd_text() {
        for sql in [
            "\"", "\"\"", ";\"", "--", "-", "é;ü", "\u{0}", "\"a\"\"", "a\"b\"c",
        ] {
            for s in statements(sql) {
                let _ = s.map(|w| parse(&w));
            }
        }
    }
}
