//! What SHOW CLIENTS, SERVERS, USERS, LISTS, MEM, STATE and the stats views say about a
//! known situation, checked against PostgreSQL's own view where it has one.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use iampool::config::{ClientTls, SslMode};

use super::control::{app, client_as, client_row, row_of};
use super::{backend_pid, console, get, num, pool_row, setup, show, wait_for_row, Row, T};
use crate::pooler::{self, start};
use crate::support::certs::{install_for_postgres, TestPki};
use crate::support::pg::{shared_cluster, PgCluster, PgOptions};

/// `2024-05-01 12:00:00 UTC`.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 23
        && s.ends_with(" UTC")
        && b.iter().enumerate().take(19).all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b' ',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        })
}

/// The `list` -> `items` (or `key` -> `value`, `name` -> `value`) pairs of a two-column SHOW.
fn pairs(rows: &[Row], key: &str, value: &str) -> BTreeMap<String, String> {
    rows.iter()
        .map(|r| (get(r, key).to_owned(), get(r, value).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_servers_describe_each_connection() {
    let pg = shared_cluster();
    let (db, mut cfg, users) = setup(pg, "adm_rows");
    cfg.databases[0].pool_size = 2;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let holder = client_as(addr, &db, "holder").await;
    holder.batch_execute("begin").await.unwrap();
    let pid = backend_pid(&holder).await;
    let quiet = client_as(addr, &db, "quiet").await;
    quiet.simple_query("select 1").await.unwrap();
    let admin = console(addr, &users.admin).await;

    let servers = show(&admin, "SERVERS").await;
    assert_eq!(servers.len(), 2, "{servers:?}");
    let s = servers
        .iter()
        .find(|s| num(s, "remote_pid") == i64::from(pid))
        .unwrap_or_else(|| panic!("no server with pid {pid}: {servers:?}"));
    for (col, want) in [
        ("type", "S"),
        ("user", db.user.as_str()),
        ("database", db.name.as_str()),
        ("replication", "none"),
        ("state", "active"),
        ("addr", "127.0.0.1"),
        ("local_addr", "127.0.0.1"),
        ("wait", "0"),
        ("wait_us", "0"),
        ("close_needed", "0"),
        ("tls", ""),
        ("application_name", "holder"),
        ("prepared_statements", "0"),
    ] {
        assert_eq!(get(s, col), want, "{col}: {s:?}");
    }
    assert_eq!(num(s, "port"), i64::from(pg.port()));
    // iampool's end of the connection, as PostgreSQL sees it.
    let client_port = pg.psql(&format!(
        "select client_port from pg_stat_activity where pid = {pid}"
    ));
    assert_eq!(
        num(s, "local_port").to_string(),
        client_port.trim(),
        "{s:?}"
    );
    for col in ["connect_time", "request_time"] {
        assert!(is_timestamp(get(s, col)), "{col}: {s:?}");
    }
    assert!(get(s, "request_time") >= get(s, "connect_time"), "{s:?}");
    assert!(get(s, "ptr").starts_with("0x"), "{s:?}");
    let idle = servers
        .iter()
        .find(|r| get(r, "ptr") != get(s, "ptr"))
        .unwrap();
    assert_eq!(
        (get(idle, "state"), get(idle, "link")),
        ("idle", ""),
        "{idle:?}"
    );
    assert_eq!(get(idle, "application_name"), "");

    let clients = show(&admin, "CLIENTS").await;
    let c = row_of(&clients, "holder");
    for (col, want) in [
        ("type", "C"),
        ("user", db.user.as_str()),
        ("database", db.name.as_str()),
        ("replication", "none"),
        ("state", "active"),
        ("addr", "127.0.0.1"),
        ("wait", "0"),
        ("close_needed", "0"),
        ("remote_pid", "0"),
        ("tls", ""),
        ("prepared_statements", "0"),
    ] {
        assert_eq!(get(c, col), want, "{col}: {c:?}");
    }
    assert_eq!(num(c, "local_port"), i64::from(addr.port()));
    assert!(num(c, "port") > 0);
    // Each names the other.
    assert_eq!(get(c, "link"), get(s, "ptr"));
    assert_eq!(get(s, "link"), get(c, "ptr"));
    assert!(is_timestamp(get(c, "connect_time")) && is_timestamp(get(c, "request_time")));
    let q = row_of(&clients, "quiet");
    assert_eq!((get(q, "state"), get(q, "link")), ("idle", ""), "{q:?}");
    // ids and ptrs name one connection each.
    for rows in [&clients, &servers] {
        let ids: HashSet<i64> = rows.iter().map(|r| num(r, "id")).collect();
        let ptrs: HashSet<&str> = rows.iter().map(|r| get(r, "ptr")).collect();
        assert_eq!(
            (ids.len(), ptrs.len()),
            (rows.len(), rows.len()),
            "{rows:?}"
        );
    }

    // A client queued for a server is `waiting`, and its wait grows.
    quiet.batch_execute("begin").await.unwrap();
    let third = client_as(addr, &db, "third").await;
    let q = tokio::spawn(async move { third.simple_query("select 3").await.map(|_| third) });
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let w = &client_row(&admin, app("third")).await;
        let waited = num(w, "wait") * 1_000_000 + num(w, "wait_us");
        if get(w, "state") == "waiting" && waited >= 100_000 {
            assert_eq!(get(w, "link"), "");
            assert!(get(w, "request_time") >= get(w, "connect_time"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never waiting: {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holder.batch_execute("commit").await.unwrap();
    tokio::time::timeout(T, q).await.unwrap().unwrap().unwrap();
    quiet.batch_execute("commit").await.unwrap();
    assert!(iam.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_lists_mem_state_and_the_stats_views() {
    let pg = shared_cluster();
    let (db, cfg, users) = setup(pg, "adm_lists");
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let c1 = pooler::connect(addr, &db).await;
    let c2 = pooler::connect(addr, &db).await;
    c1.batch_execute("begin; select 1; commit").await.unwrap();
    c2.simple_query("select 2").await.unwrap();
    let admin = console(addr, &users.admin).await;
    let totals = wait_for_row(&admin, "STATS_TOTALS", &db.name, |r| {
        num(r, "xact_count") >= 2
    })
    .await;

    let pool = pool_row(&show(&admin, "POOLS").await, &db.name);
    let servers = num(&pool, "sv_idle") + num(&pool, "sv_active") + num(&pool, "sv_login");
    let all_users = show(&admin, "USERS").await;
    let u = all_users
        .iter()
        .find(|r| get(r, "name") == db.user)
        .unwrap_or_else(|| panic!("{all_users:?}"));
    assert_eq!(num(u, "current_client_connections"), 2, "{u:?}");
    assert_eq!(num(u, "current_connections"), servers, "{u:?}");
    assert_eq!((get(u, "pool_size"), get(u, "reserve_pool_size")), ("", ""));
    assert_eq!(u.get("pool_mode"), Some(&None), "{u:?}");
    assert_eq!(num(u, "max_user_connections"), 0);
    let a = all_users
        .iter()
        .find(|r| get(r, "name") == users.admin.0)
        .unwrap();
    assert_eq!(num(a, "current_client_connections"), 1, "{a:?}");
    assert!(all_users.iter().any(|r| get(r, "name") == users.stats.0));

    let lists = pairs(&show(&admin, "LISTS").await, "list", "items");
    for (list, want) in [
        ("databases", 1),
        ("pools", 1),
        ("used_clients", 3),
        ("login_clients", 0),
        ("used_servers", servers),
        ("free_clients", 0),
        ("peers", 0),
        ("dns_names", 0),
    ] {
        assert_eq!(lists[list], want.to_string(), "{list}: {lists:?}");
    }
    assert_eq!(lists["users"], all_users.len().to_string());

    let mem = show(&admin, "MEM").await;
    let client = mem
        .iter()
        .find(|r| get(r, "name") == "client_cache")
        .unwrap();
    assert_eq!(num(client, "used"), 3, "{client:?}");
    assert!(num(client, "size") > 0);
    assert_eq!(num(client, "memtotal"), num(client, "size") * 3);
    assert_eq!(num(client, "free"), 0);
    let server = mem
        .iter()
        .find(|r| get(r, "name") == "server_cache")
        .unwrap();
    assert_eq!(num(server, "used"), servers, "{server:?}");

    let state = pairs(&show(&admin, "STATE").await, "key", "value");
    assert_eq!(
        (
            state["active"].as_str(),
            state["paused"].as_str(),
            state["suspended"].as_str()
        ),
        ("yes", "no", "no")
    );
    admin.simple_query("PAUSE").await.unwrap();
    let state = pairs(&show(&admin, "STATE").await, "key", "value");
    assert_eq!(
        (state["active"].as_str(), state["paused"].as_str()),
        ("no", "yes")
    );
    admin.simple_query("RESUME").await.unwrap();

    // The stats views agree with one another.
    assert_eq!(
        num(&totals, "server_assignment_count"),
        num(&totals, "xact_count")
    );
    assert!(num(&totals, "query_count") >= 2 && num(&totals, "bytes_received") > 0);
    let stats = pool_row(&show(&admin, "STATS").await, &db.name);
    assert!(num(&stats, "total_server_assignment_count") >= num(&totals, "xact_count"));
    let averages = pool_row(&show(&admin, "STATS_AVERAGES").await, &db.name);
    assert!(num(&averages, "xact_time") >= 0 && num(&averages, "avg_bind_count") == 0);
    let all = pairs(&show(&admin, "TOTALS").await, "name", "value");
    assert_eq!(all.len(), 22, "{all:?}");
    let total = |k: &str| all[k].parse::<i64>().unwrap();
    assert!(total("total_xact_count") >= num(&totals, "xact_count"));
    assert!(total("total_client_bytes") >= num(&totals, "bytes_received"));

    // What iampool has none of answers with no rows.
    for what in ["PEERS", "PEER_POOLS", "DNS_HOSTS", "DNS_ZONES"] {
        assert!(show(&admin, what).await.is_empty(), "SHOW {what}");
    }
    assert!(iam.shutdown().await);
}

/// A transaction-mode client kept on its server for its session state says why, in
/// iampool's own `pinned` column, until the state is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_says_why() {
    let pg = shared_cluster();
    let (db, cfg, users) = setup(pg, "adm_pinned");
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let admin = console(addr, &users.admin).await;
    let pinner = client_as(addr, &db, "pinner").await;
    let plain = client_as(addr, &db, "plain").await;
    plain.simple_query("select 1").await.unwrap();
    pinner
        .batch_execute("create temp table scratch (x int)")
        .await
        .unwrap();
    let row = client_row(&admin, |r| {
        get(r, "application_name") == "pinner" && get(r, "pinned") == "temp_table"
    })
    .await;
    assert_eq!(get(&row, "state"), "active", "{row:?}");
    assert_eq!(get(&client_row(&admin, app("plain")).await, "pinned"), "");
    pinner.batch_execute("drop table scratch").await.unwrap();
    client_row(&admin, |r| {
        get(r, "application_name") == "pinner" && get(r, "pinned").is_empty()
    })
    .await;
    assert!(iam.shutdown().await);
}

/// psql as a console user with `conninfo`, running SHOW CLIENTS: (its pid, the rows).
async fn psql_show_clients(conninfo: String, password: String) -> (u32, Vec<Row>) {
    tokio::task::spawn_blocking(move || {
        let child = std::process::Command::new("psql")
            .env_clear()
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "20")
            .args([
                "-X",
                "-A",
                "-F",
                "\t",
                "-P",
                "footer=off",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .arg(&conninfo)
            .args(["-c", "SHOW CLIENTS"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("psql");
        let pid = child.id();
        let out = child.wait_with_output().expect("psql runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{conninfo}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines = text.lines();
        let header: Vec<String> = lines
            .next()
            .unwrap()
            .split('\t')
            .map(str::to_owned)
            .collect();
        let rows = lines
            .map(|l| {
                header
                    .iter()
                    .cloned()
                    .zip(l.split('\t').map(|v| Some(v.to_owned())))
                    .collect()
            })
            .collect();
        (pid, rows)
    })
    .await
    .unwrap()
}

/// TLS on either side is described (version, cipher suite, key exchange), and a client on
/// the unix socket is named by its process id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_and_unix_socket_peers_are_described() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let (cert, key) = pki.issue_server(dir.path(), &["localhost", "127.0.0.1"]);
    let pg_files = tempfile::tempdir().unwrap();
    let (pg_cert, pg_key) = install_for_postgres(&cert, &key, pg_files.path());
    let pg = PgCluster::start(PgOptions {
        tls: Some((pg_cert, pg_key)),
        ..PgOptions::default()
    });
    let (db, mut cfg, users) = setup(&pg, "adm_tls");
    cfg.databases[0].upstream.sslmode = SslMode::VerifyFull;
    cfg.databases[0].upstream.sslrootcert = Some(pki.ca_path.clone());
    cfg.client_tls = ClientTls::Allow;
    cfg.client_tls_cert_file = Some(cert.clone());
    cfg.client_tls_key_file = Some(key.clone());
    let sock = tempfile::tempdir().unwrap();
    cfg.unix_socket_dir = Some(sock.path().to_path_buf());
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let c = pooler::connect(addr, &db).await;
    c.batch_execute("begin").await.unwrap();
    let pid = backend_pid(&c).await;

    let (user, pw) = users.admin.clone();
    let (_, rows) = psql_show_clients(
        format!(
            "host=127.0.0.1 port={} user={user} dbname=pgbouncer sslmode=verify-full \
             sslrootcert={} application_name=over-tls",
            addr.port(),
            pki.ca_path.display()
        ),
        pw.clone(),
    )
    .await;
    let me = row_of(&rows, "over-tls");
    let tls = get(me, "tls");
    assert!(
        tls.starts_with("TLSv1.") && tls.contains("/ECDH="),
        "{me:?}"
    );
    assert_eq!(tls.split('/').count(), 3, "{tls}");
    let plain = rows.iter().find(|r| get(r, "database") == db.name).unwrap();
    assert_eq!(get(plain, "tls"), "", "{plain:?}");

    let admin = super::console(addr, &users.admin).await;
    let servers = show(&admin, "SERVERS").await;
    let s = servers
        .iter()
        .find(|s| num(s, "remote_pid") == i64::from(pid))
        .unwrap_or_else(|| panic!("{servers:?}"));
    assert!(get(s, "tls").starts_with("TLSv1."), "{s:?}");
    assert_eq!(
        pg.psql(&format!("select ssl from pg_stat_ssl where pid = {pid}"))
            .trim(),
        "t"
    );

    let (psql_pid, rows) = psql_show_clients(
        format!(
            "host={} port={} user={user} dbname=pgbouncer application_name=over-unix",
            sock.path().display(),
            addr.port()
        ),
        pw,
    )
    .await;
    let me = row_of(&rows, "over-unix");
    assert_eq!(get(me, "addr"), "unix", "{me:?}");
    assert_eq!(get(me, "remote_pid"), psql_pid.to_string(), "{me:?}");
    c.batch_execute("commit").await.unwrap();
    assert!(iam.shutdown().await);
}
