//! The client side: startup handshake, client authentication, cancel keys and the relay.

pub mod auth;
pub mod cancel;
pub mod half;
pub mod handshake;
pub mod prepared;
pub mod relay;
pub mod scan;
pub mod tls;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::debug;

use crate::app::Shared;
use crate::stream::Stream;

/// Counts a client connection for max_client_conn while it lives.
struct ClientSlot<'a>(&'a Shared);

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
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
pub async fn serve(shared: Arc<Shared>, stream: Stream) {
    let open = shared.clients.fetch_add(1, Ordering::AcqRel) + 1;
    let _slot = ClientSlot(&shared);
    let config = shared.config();
    let over_limit = open > config.max_client_conn;
    let registration = shared.cancel.register();
    let key = (registration.pid, registration.secret);
    // Boxed: the login's state lives on the heap only while the login runs, so the task of
    // a logged-in client is no larger than its session.
    let login = tokio::time::timeout(
        config.client_login_timeout,
        Box::pin(handshake::handshake(&shared, stream, over_limit, key)),
    )
    .await;
    let login = match login {
        Ok(Ok(login)) => login,
        Ok(Err(refused)) => {
            if let handshake::Refused::Fatal(code) = refused {
                shared
                    .metrics
                    .client_logins
                    .with_label_values(&[code])
                    .inc();
            }
            debug!(?refused, "client not logged in");
            return;
        }
        Err(_) => {
            shared
                .metrics
                .client_logins
                .with_label_values(&["timeout"])
                .inc();
            debug!("client_login_timeout: dropping a client that did not finish its startup");
            return;
        }
    };
    shared
        .metrics
        .client_logins
        .with_label_values(&["ok"])
        .inc();
    let _listed = shared
        .client_registry()
        .register(crate::admin::ClientInfo::new(
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
            let admin = crate::admin::serve(
                shared.clone(),
                login.stream,
                login.leftover,
                role,
                login.user,
            );
            return admin.await;
        }
    };
    pool.sessions.fetch_add(1, Ordering::Relaxed);
    let _session = SessionCount(pool.clone());
    debug!(user = %login.user, database = %login.database, "client logged in");
    let session = relay::Session::new(relay::SessionArgs {
        pool,
        client: login.stream,
        leftover: login.leftover,
        params: login.params,
        cancel: registration.slot.clone(),
        max_message: config.max_message_size,
        max_prepared_statements: config.max_prepared_statements,
        idle_tx_timeout: config.idle_transaction_timeout,
        server_reset_query: config.server_reset_query.clone(),
        shutdown: shared.shutdown_signal(),
    });
    let end = session.run().await;
    debug!(?end, "client session ended");
}
