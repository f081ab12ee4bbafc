//! Running one console command against the shared state: SHOW, and the control commands
//! PAUSE, RESUME, RECONNECT, RELOAD and SHUTDOWN.

use std::sync::Arc;

use bytes::BytesMut;
use tracing::info;

use super::command::{Command, Show, COMMANDS};
use super::reply;
use super::show;
use super::{Context, Role};
use crate::pool::Pool;

/// SQLSTATEs the console reports besides the protocol-level ones.
pub mod code {
    pub const SYNTAX_ERROR: &str = "42601";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
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
        Command::Show(what) => {
            let table = match what {
                Show::Pools => show::pools_table(ctx),
                Show::Stats => show::stats_table(ctx),
                Show::Clients => show::clients_table(ctx),
                Show::Servers => show::servers_table(ctx),
                Show::Databases => show::databases_table(ctx),
                Show::Config => show::config_table(ctx),
                Show::Version => show::version_table(),
                Show::Tokens => show::tokens_table(ctx),
                Show::Help => {
                    reply::notice(out, &format!("Console usage: {COMMANDS}"));
                    reply::command_complete(out, "SHOW");
                    return Ok(());
                }
            };
            table.encode(out);
        }
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
            reply::command_complete(out, cmd.tag());
        }
        Command::Resume(db) => {
            for pool in targets(ctx, db.as_deref())? {
                pool.resume();
            }
            info!(user, database = ?db, "admin RESUME");
            reply::command_complete(out, cmd.tag());
        }
        Command::Reconnect(db) => {
            for pool in targets(ctx, db.as_deref())? {
                pool.retire_all();
            }
            info!(user, database = ?db, "admin RECONNECT: server connections will be replaced");
            reply::command_complete(out, cmd.tag());
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
            reply::command_complete(out, cmd.tag());
        }
        Command::Shutdown => {
            info!(user, "admin SHUTDOWN: draining");
            ctx.request_shutdown();
            reply::command_complete(out, cmd.tag());
        }
    }
    Ok(())
}

/// The pool named `db`, or every pool.
fn targets(ctx: &dyn Context, db: Option<&str>) -> Result<Vec<Arc<Pool>>, Failed> {
    match db {
        None => Ok(ctx.pools()),
        Some(name) => match ctx.pool(name) {
            Some(pool) => Ok(vec![pool]),
            None => Err(Failed::new(
                code::INVALID_CATALOG_NAME,
                format!("database \"{name}\" does not exist"),
            )),
        },
    }
}
