//! Running one console command against the shared state: SHOW, and the control commands
//! (PAUSE, RESUME, RECONNECT, KILL, KILL_CLIENT, WAIT_CLOSE, ENABLE, DISABLE, RELOAD,
//! SHUTDOWN), and the clear refusal of the PgBouncer commands iampool cannot honour.

use std::sync::Arc;

use bytes::BytesMut;
use tracing::info;

use super::command::{Command, Show, COMMANDS};
use super::{connections, control, inventory, reply, show, stats};
use super::{Context, Role};
use crate::client::console::is_console_database;
use crate::pool::Pool;

/// SQLSTATEs the console reports besides the protocol-level ones.
pub mod code {
    pub const SYNTAX_ERROR: &str = "42601";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const WRONG_OBJECT_TYPE: &str = "42809";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const CONFIG_FILE_ERROR: &str = "F0000";
}

/// A command that failed: the ERROR the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl Failed {
    fn new(code: &'static str, message: impl Into<String>) -> Failed {
        Failed {
            code,
            message: message.into(),
            hint: None,
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> Failed {
        self.hint = Some(hint.into());
        self
    }

    /// A PgBouncer command iampool cannot honour: SQLSTATE 0A000, why, and what to use.
    fn unsupported(message: &str, hint: &str) -> Failed {
        Failed::new(code::FEATURE_NOT_SUPPORTED, message).hint(hint)
    }
}

/// Runs `cmd` as `role`, appending its answer (rows or notices, then CommandComplete) to `out`.
pub async fn execute(
    ctx: &dyn Context,
    role: Role,
    user: &str,
    cmd: &Command,
    out: &mut BytesMut,
) -> Result<(), Failed> {
    if role == Role::Stats && !cmd.read_only() {
        return Err(Failed::new(
            code::INSUFFICIENT_PRIVILEGE,
            format!(
                "{}: permission denied: user \"{user}\" is in stats_users, which may only SHOW",
                cmd.tag()
            ),
        ));
    }
    match cmd {
        Command::Show(what) => return show(ctx, *what, out),
        Command::Pause(db) => {
            let targets = targets(ctx, db.as_deref())?;
            info!(user, database = ?db, "admin PAUSE: waiting for servers in use to be released");
            // Every pool stops handing out servers at once; then wait for all of them.
            let mut waits = tokio::task::JoinSet::new();
            for pool in targets {
                waits.spawn(async move { pool.pause().await });
            }
            while waits.join_next().await.is_some() {}
            info!(user, database = ?db, "admin PAUSE: paused");
        }
        Command::Resume(db) => {
            for pool in targets(ctx, db.as_deref())? {
                pool.resume();
            }
            info!(user, database = ?db, "admin RESUME");
        }
        Command::Reconnect(db) => {
            for pool in targets(ctx, db.as_deref())? {
                pool.retire_all();
            }
            info!(user, database = ?db, "admin RECONNECT: server connections will be replaced");
        }
        Command::Kill(db) => {
            let (clients, servers) = control::kill(ctx, targets(ctx, db.as_deref())?).await;
            info!(user, database = ?db, clients, servers,
                "admin KILL: sessions ended and server connections closed; the pool waits for RESUME");
        }
        Command::KillClient(id) => {
            let cut = control::kill_client(ctx, *id).await.ok_or_else(|| {
                Failed::new(code::UNDEFINED_OBJECT, format!("no client with id {id}"))
                    .hint("SHOW CLIENTS lists each client's id")
            })?;
            info!(user, client = id, servers = cut, "admin KILL_CLIENT");
        }
        Command::WaitClose(db) => {
            let targets = targets(ctx, db.as_deref())?;
            info!(user, database = ?db, "admin WAIT_CLOSE: waiting for marked server connections to close");
            for pool in targets {
                pool.wait_close().await;
            }
        }
        Command::Enable(db) | Command::Disable(db) => {
            let disable = matches!(cmd, Command::Disable(_));
            for pool in targets(ctx, Some(db))? {
                pool.set_disabled(disable);
            }
            info!(user, database = %db, disable, "admin ENABLE/DISABLE");
        }
        Command::Suspend => {
            return Err(Failed::unsupported(
                "SUSPEND is not supported: it readies PgBouncer's online restart, in which a new \
                 process takes over the open sockets, and iampool cannot hand its connections \
                 to another process",
                "PAUSE holds new queries until RESUME; SHUTDOWN drains and exits",
            ))
        }
        Command::Set => {
            return Err(Failed::unsupported(
                "SET is not supported: iampool's settings change in its configuration (file, \
                 environment or flags) and apply with RELOAD",
                "SHOW CONFIG lists the settings and whether each reloads",
            ))
        }
        Command::Shutdown {
            wait_for_clients: true,
        } => {
            return Err(Failed::unsupported(
                "SHUTDOWN WAIT_FOR_CLIENTS is not supported: iampool's SHUTDOWN drains, ending \
                 idle sessions at once and the others when their transaction ends",
                "SHUTDOWN (or SHUTDOWN WAIT_FOR_SERVERS, the same here) drains and exits",
            ))
        }
        Command::Reload => {
            let report = ctx.reload().map_err(|e| {
                Failed::new(
                    code::CONFIG_FILE_ERROR,
                    format!("RELOAD failed, the configuration in use is unchanged: {e}"),
                )
            })?;
            if !report.applied.is_empty() {
                reply::notice(out, &format!("applied: {}", report.applied.join(", ")));
            }
            if !report.needs_restart.is_empty() {
                reply::notice(
                    out,
                    &format!(
                        "changed but only applied at restart: {}",
                        report.needs_restart.join(", ")
                    ),
                );
            }
        }
        Command::Shutdown {
            wait_for_clients: false,
        } => {
            info!(user, "admin SHUTDOWN: draining");
            ctx.request_shutdown();
        }
    }
    reply::command_complete(out, cmd.tag());
    Ok(())
}

fn show(ctx: &dyn Context, what: Show, out: &mut BytesMut) -> Result<(), Failed> {
    let table =
        match what {
            Show::Pools => show::pools_table(ctx),
            Show::Stats => stats::stats_table(ctx),
            Show::StatsTotals => stats::stats_totals_table(ctx),
            Show::StatsAverages => stats::stats_averages_table(ctx),
            Show::Totals => stats::totals_table(ctx),
            Show::Clients => connections::clients_table(ctx),
            Show::Servers => connections::servers_table(ctx),
            Show::Databases => show::databases_table(ctx),
            Show::Users => inventory::users_table(ctx),
            Show::Lists => inventory::lists_table(ctx),
            Show::Mem => inventory::mem_table(ctx),
            Show::State => inventory::state_table(ctx),
            Show::Peers => inventory::peers_table(),
            Show::PeerPools => inventory::peer_pools_table(),
            Show::DnsHosts => inventory::dns_hosts_table(),
            Show::DnsZones => inventory::dns_zones_table(),
            Show::Config => show::config_table(ctx),
            Show::Version => show::version_table(),
            Show::Tokens => show::tokens_table(ctx),
            Show::Fds => return Err(Failed::unsupported(
                "SHOW FDS is not supported: it lists the sockets PgBouncer hands to a new process \
                 in an online restart, with their session state, and iampool has no online restart",
                "SHOW CLIENTS and SHOW SERVERS list every connection",
            )),
            Show::Sockets => {
                return Err(Failed::unsupported(
                    "SHOW SOCKETS is not supported: what it adds to SHOW CLIENTS and SHOW SERVERS \
                 are positions in PgBouncer's packet buffers, which iampool does not have",
                    "SHOW CLIENTS and SHOW SERVERS list every connection",
                ))
            }
            Show::Help => {
                reply::notice(out, &format!("Console usage: {COMMANDS}"));
                reply::command_complete(out, "SHOW");
                return Ok(());
            }
        };
    table.encode(out);
    Ok(())
}

/// The pool named `db`, or every pool.
fn targets(ctx: &dyn Context, db: Option<&str>) -> Result<Vec<Arc<Pool>>, Failed> {
    match db {
        None => Ok(ctx.pools()),
        Some(name) => match ctx.pool(name) {
            Some(pool) => Ok(vec![pool]),
            None if is_console_database(name) => Err(Failed::new(
                code::WRONG_OBJECT_TYPE,
                format!("\"{name}\" is the admin console, not a database with a pool"),
            )),
            None => Err(Failed::new(
                code::INVALID_CATALOG_NAME,
                format!("database \"{name}\" does not exist"),
            )),
        },
    }
}
