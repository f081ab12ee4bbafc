//! The client side: startup handshake, client authentication, cancel keys and the relay.

pub mod auth;
pub mod cancel;
pub mod console;
pub mod guard;
pub mod half;
pub mod handshake;
pub mod orphan;
pub mod pin;
pub mod prepared;
pub mod registry;
pub mod relay;
pub mod scan;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tracing::debug;

use self::auth::UserAuth;
use self::cancel::CancelRegistry;
use self::console::ConsoleLogin;
use self::guard::LoginGuard;
use self::registry::{ClientInfo, ClientRegistry};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::stream::Stream;

/// What the client side needs of the process. The composition root (`app::Shared`)
/// provides it; the client side sees nothing else, and reaches the console only through
/// [`Context::serve_console`].
pub trait Context: Send + Sync + 'static {
    /// The configuration in force (a reload replaces it; a session keeps the one it began with).
    fn config(&self) -> Arc<Config>;
    /// Users and their verifiers, for client authentication.
    fn users(&self) -> Arc<HashMap<String, UserAuth>>;
    fn pool(&self, database: &str) -> Option<Arc<Pool>>;
    fn cancel_keys(&self) -> &CancelRegistry;
    /// Logins in progress and failed logins per address.
    fn login_guard(&self) -> &LoginGuard;
    fn tls_acceptor(&self) -> Option<&tokio_rustls::TlsAcceptor>;
    /// Client connections open (logged in or logging in), for max_client_conn.
    fn open_clients(&self) -> &AtomicUsize;
    /// Logged-in clients, as the console lists them.
    fn clients(&self) -> &ClientRegistry;
    fn metrics(&self) -> &Metrics;
    fn shutdown_signal(&self) -> watch::Receiver<bool>;
    /// Serves a client that signed in to the admin console.
    fn serve_console(self: Arc<Self>, login: ConsoleLogin) -> impl Future<Output = ()> + Send;
}

/// Counts a client connection for max_client_conn while it lives.
struct ClientSlot<'a>(&'a AtomicUsize);

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a logged-in session on its pool while it lives.
struct SessionCount(Arc<crate::pool::Pool>);

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one accepted client connection from startup to the end.
pub async fn serve<C: Context>(ctx: Arc<C>, mut stream: Stream) {
    let config = ctx.config();
    // Over max_pending_logins: told at once and not counted as a client, so logins that
    // stall cannot fill max_client_conn.
    let Some(mut pending) = ctx.login_guard().begin(config.max_pending_logins) else {
        handshake::refuse_now(
            &mut stream,
            "too many connections are logging in (max_pending_logins); try again",
        )
        .await;
        ctx.metrics()
            .client_logins
            .with_label_values(&[crate::protocol::messages::sqlstate::TOO_MANY_CONNECTIONS])
            .inc();
        return;
    };
    let open = ctx.open_clients().fetch_add(1, Ordering::AcqRel) + 1;
    let _slot = ClientSlot(ctx.open_clients());
    let over_limit = open > config.max_client_conn;
    let registration = ctx.cancel_keys().register();
    let key = (registration.pid, registration.secret);
    // Boxed: the login's state lives on the heap only while the login runs, so the task of
    // a logged-in client is no larger than its session.
    let login = tokio::time::timeout(
        config.client_login_timeout,
        Box::pin(handshake::handshake(&*ctx, stream, over_limit, key)),
    )
    .await;
    pending.done();
    let login = match login {
        Ok(Ok(login)) => login,
        Ok(Err(refused)) => {
            if let handshake::Refused::Fatal(code) = refused {
                ctx.metrics().client_logins.with_label_values(&[code]).inc();
            }
            debug!(?refused, "client not logged in");
            return;
        }
        Err(_) => {
            ctx.metrics()
                .client_logins
                .with_label_values(&["timeout"])
                .inc();
            debug!("client_login_timeout: dropping a client that did not finish its startup");
            return;
        }
    };
    ctx.metrics().client_logins.with_label_values(&["ok"]).inc();
    let _listed = ctx.clients().register(ClientInfo::new(
        &login.stream,
        &login.user,
        &login.database,
        login.params.reported("application_name").unwrap_or(""),
        registration.slot.clone(),
    ));
    let pool = match login.target {
        handshake::Target::Pool(pool) => pool,
        handshake::Target::Admin(role) => {
            debug!(user = %login.user, ?role, "admin console client logged in");
            let console = ConsoleLogin {
                stream: login.stream,
                buf: login.leftover,
                role,
                user: login.user,
                slot: registration.slot.clone(),
            };
            return ctx.clone().serve_console(console).await;
        }
    };
    pool.sessions.fetch_add(1, Ordering::Relaxed);
    let _session = SessionCount(pool.clone());
    debug!(user = %login.user, database = %login.database, "client logged in");
    // Transactions that declare themselves read-only may go to another database's pool.
    let readers = config
        .databases
        .iter()
        .find(|d| d.name == pool.database)
        .and_then(|d| d.read_only_database.as_deref())
        .and_then(|name| ctx.pool(name));
    let session = relay::Session::new(relay::SessionArgs {
        pool,
        readers,
        client: login.stream,
        leftover: login.leftover,
        params: login.params,
        cancel: registration.slot.clone(),
        max_message: config.max_message_size,
        max_prepared_statements: config.max_prepared_statements,
        idle_tx_timeout: config.idle_transaction_timeout,
        query_timeout: config.query_timeout,
        client_idle_timeout: config.client_idle_timeout,
        server_reset_query: config.server_reset_query.clone(),
        shutdown: ctx.shutdown_signal(),
    });
    let end = session.run().await;
    debug!(?end, "client session ended");
}
