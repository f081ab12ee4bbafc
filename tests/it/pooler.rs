//! Starting iampool in-process in front of a test cluster, and talking to it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use iampool::app::Running;
use iampool::config::{
    AuthType, ClientTls, Config, Database, LogFormat, PoolMode, Secret, SslMode, Upstream,
    UpstreamAuth, UserSecret,
};

use crate::support::pg::{PgCluster, TestDb};

/// A config for one database in front of `pg`, with the database's own user as client user.
pub fn config(pg: &PgCluster, db: &TestDb) -> Config {
    let mut users = BTreeMap::new();
    users.insert(
        db.user.clone(),
        UserSecret::Plain(Secret::new(db.password.clone())),
    );
    Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        unix_socket_dir: None,
        worker_threads: 0,
        max_client_conn: 2000,
        max_pending_logins: 0,
        auth_failure_delay: Duration::ZERO,
        auth_failure_limit: 0,
        max_prepared_statements: 200,
        server_lifetime: Duration::from_secs(3600),
        server_lifetime_jitter: Duration::ZERO,
        server_idle_timeout: Duration::from_secs(600),
        server_connect_timeout: Duration::from_secs(10),
        server_check_query: String::new(),
        server_check_delay: Duration::from_secs(30),
        tcp: Default::default(),
        server_login_retry: Duration::from_millis(200),
        query_wait_timeout: Duration::from_secs(60),
        reserve_pool_timeout: Duration::from_secs(5),
        max_user_connections: 0,
        client_login_timeout: Duration::from_secs(10),
        idle_transaction_timeout: None,
        query_timeout: None,
        client_idle_timeout: None,
        max_message_size: 64 << 20,
        server_reset_query: "DISCARD ALL".into(),
        session_state: iampool::config::SessionStateMode::Pin,
        max_pinned_servers: None,
        auth_type: AuthType::ScramSha256,
        auth_file: None,
        application_name_add_host: false,
        ignore_startup_parameters: Vec::new(),
        users,
        client_tls: ClientTls::Disable,
        client_tls_cert_file: None,
        client_tls_key_file: None,
        shutdown_timeout: Duration::from_secs(10),
        min_sigterm_delay: Duration::ZERO,
        reload_check_interval: Duration::ZERO,
        quitquitquit: false,
        watched_files: Vec::new(),
        log_level: "info".into(),
        log_format: LogFormat::Text,
        metrics_listen: None,
        admin_users: vec![],
        stats_users: vec![],
        databases: vec![Database {
            name: db.name.clone(),
            upstream: Upstream {
                hosts: vec![iampool::config::Host {
                    name: "127.0.0.1".into(),
                    port: pg.port(),
                    addr: None,
                }],
                user: db.user.clone(),
                password: Some(Secret::new(db.password.clone())),
                dbname: db.name.clone(),
                sslmode: SslMode::Disable,
                sslrootcert: None,
                auth: UpstreamAuth::Password,
                allow_cleartext_password: false,
                insecure_unverified_tls: false,
                max_new_connections_per_second: 200,
                reauth_interval: None,
                target_session_attrs: iampool::config::TargetSessionAttrs::Any,
                load_balance_hosts: iampool::config::LoadBalanceHosts::Disable,
                connect_timeout: None,
                application_name: None,
                options: None,
            },
            pool_mode: PoolMode::Transaction,
            pool_size: 10,
            min_pool_size: 0,
            reserve_pool_size: 0,
            max_db_connections: 0,
            read_only_database: None,
        }],
    }
}

/// Runs `create table <definition>` as the superuser and gives the table to the test user
/// (the definition names the table `t`).
pub fn create_owned_table(pg: &PgCluster, db: &TestDb, definition: &str) {
    pg.psql_db(
        &db.name,
        &format!(
            "create table {definition}; alter table t owner to {};",
            crate::support::pg::quote_ident(&db.user)
        ),
    );
}

pub async fn start(config: Config) -> Running {
    // RUST_LOG=iampool=debug shows iampool's logs for a failing test.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    iampool::app::start(config).await.expect("iampool starts")
}

/// psql connected to iampool on 127.0.0.1:`port` as the test database's user; the caller adds
/// what psql is to run.
pub fn psql_command(port: u16, db: &TestDb) -> std::process::Command {
    let mut cmd = std::process::Command::new("psql");
    cmd.env("PGPASSWORD", &db.password).args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        &db.user,
        "-d",
        &db.name,
    ]);
    cmd
}

pub fn client_config(addr: SocketAddr, db: &TestDb) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(addr.ip().to_string())
        .port(addr.port())
        .user(&db.user)
        .password(&db.password)
        .dbname(&db.name)
        .connect_timeout(Duration::from_secs(20));
    c
}

pub async fn connect(addr: SocketAddr, db: &TestDb) -> tokio_postgres::Client {
    try_connect(addr, db)
        .await
        .expect("connect through iampool")
}

pub async fn try_connect(
    addr: SocketAddr,
    db: &TestDb,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = client_config(addr, db)
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The SQLSTATE of a tokio-postgres error, or "" if it has none.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

/// The message of a tokio-postgres error from the server, or "" if it has none.
pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default()
}

/// Runs a command with a hard bound on its run time; returns (status ok, stdout, stderr).
pub fn run(cmd: &mut std::process::Command, limit: Duration) -> (bool, String, String) {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut out = String::new();
            let mut err = String::new();
            child.stdout.take().unwrap().read_to_string(&mut out).ok();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            return (status.success(), out, err);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command {cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
