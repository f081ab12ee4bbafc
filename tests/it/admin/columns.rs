//! iampool's SHOW column lists (names, order and announced types) against PgBouncer's.
//!
//! The lists below were recorded from PgBouncer 1.25.2 and Debian's 1.18.0. iampool is
//! always checked against the 1.25 recording; the recordings are checked against the
//! PgBouncer binaries themselves whenever they are here: Debian's at /usr/sbin/pgbouncer
//! (`PGBOUNCER_1_18` to point elsewhere; scripts/setup.sh installs it) and a 1.25 build from
//! `PGBOUNCER_1_25`. The second test fails when there is no PgBouncer at all to run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use iampool::config::AuthType;
use tokio::io::AsyncWriteExt;

use super::{error_code, query, raw_console, read_reply, setup};
use crate::pooler::start;
use crate::support::pg::shared_cluster;
use crate::support::pgbouncer::{self, PgBouncer};

/// `SHOW <item>` -> `name:type ...`, as PgBouncer 1.25.2 sends them.
const PGBOUNCER_1_25: &[(&str, &str)] = &[
    ("CLIENTS", "type:text user:text database:text replication:text state:text addr:text port:int4 local_addr:text local_port:int4 connect_time:text request_time:text wait:int4 wait_us:int4 close_needed:int4 ptr:text link:text remote_pid:int4 tls:text application_name:text prepared_statements:int4 id:int4"),
    ("SERVERS", "type:text user:text database:text replication:text state:text addr:text port:int4 local_addr:text local_port:int4 connect_time:text request_time:text wait:int4 wait_us:int4 close_needed:int4 ptr:text link:text remote_pid:int4 tls:text application_name:text prepared_statements:int4 id:int4"),
    ("POOLS", "database:text user:text cl_active:int4 cl_waiting:int4 cl_active_cancel_req:int4 cl_waiting_cancel_req:int4 sv_active:int4 sv_active_cancel:int4 sv_being_canceled:int4 sv_idle:int4 sv_used:int4 sv_tested:int4 sv_login:int4 maxwait:int4 maxwait_us:int4 pool_mode:text load_balance_hosts:text"),
    ("STATS", "database:text total_server_assignment_count:numeric total_xact_count:numeric total_query_count:numeric total_received:numeric total_sent:numeric total_xact_time:numeric total_query_time:numeric total_wait_time:numeric total_client_parse_count:numeric total_server_parse_count:numeric total_bind_count:numeric avg_server_assignment_count:numeric avg_xact_count:numeric avg_query_count:numeric avg_recv:numeric avg_sent:numeric avg_xact_time:numeric avg_query_time:numeric avg_wait_time:numeric avg_client_parse_count:numeric avg_server_parse_count:numeric avg_bind_count:numeric"),
    ("STATS_TOTALS", "database:text server_assignment_count:numeric xact_count:numeric query_count:numeric bytes_received:numeric bytes_sent:numeric xact_time:numeric query_time:numeric wait_time:numeric client_parse_count:numeric server_parse_count:numeric bind_count:numeric"),
    ("STATS_AVERAGES", "database:text server_assignment_count:numeric xact_count:numeric query_count:numeric bytes_received:numeric bytes_sent:numeric xact_time:numeric query_time:numeric wait_time:numeric avg_client_parse_count:numeric avg_server_parse_count:numeric avg_bind_count:numeric"),
    ("TOTALS", "name:text value:numeric"),
    ("LISTS", "list:text items:int4"),
    ("MEM", "name:text size:int4 used:int4 free:int4 memtotal:int4"),
    ("USERS", "name:text pool_size:text reserve_pool_size:text pool_mode:text max_user_connections:int4 current_connections:int4 max_user_client_connections:int4 current_client_connections:int4"),
    ("DATABASES", "name:text host:text port:int4 database:text force_user:text pool_size:int4 min_pool_size:int4 reserve_pool_size:int4 server_lifetime:int4 pool_mode:text load_balance_hosts:text max_connections:int4 current_connections:int4 max_client_connections:int4 current_client_connections:int4 paused:int4 disabled:int4"),
    ("FDS", "fd:int4 task:text user:text database:text addr:text port:int4 cancel:int8 link:int4 client_encoding:text std_strings:text datestyle:text timezone:text password:text scram_client_key:bytea scram_server_key:bytea"),
    ("SOCKETS", "type:text user:text database:text replication:text state:text addr:text port:int4 local_addr:text local_port:int4 connect_time:text request_time:text wait:int4 wait_us:int4 close_needed:int4 ptr:text link:text remote_pid:int4 tls:text application_name:text prepared_statements:int4 id:int4 recv_pos:int4 pkt_pos:int4 pkt_remain:int4 send_pos:int4 send_remain:int4 pkt_avail:int4 send_avail:int4"),
    ("STATE", "key:text value:text"),
    ("CONFIG", "key:text value:text default:text changeable:text"),
    ("VERSION", "version:text"),
    ("PEERS", "peer_id:int4 host:text port:int4 pool_size:int4"),
    ("PEER_POOLS", "peer_id:int4 cl_active_cancel_req:int4 cl_waiting_cancel_req:int4 sv_active_cancel:int4 sv_login:int4"),
    ("DNS_HOSTS", "hostname:text ttl:int8 addrs:text"),
    ("DNS_ZONES", "zonename:text serial:int8 count:int4"),
];

/// The first column of the SHOWs whose rows are fixed names, as PgBouncer 1.25.2 lists them.
const ROWS_1_25: &[(&str, &str)] = &[
    ("LISTS", "databases users peers pools peer_pools free_clients used_clients login_clients free_servers used_servers dns_names dns_zones dns_queries dns_pending"),
    ("TOTALS", "total_server_assignment_count total_xact_count total_query_count total_client_bytes total_server_bytes total_xact_time total_query_time total_wait_time total_ps_client_parse_count total_ps_server_parse_count total_ps_bind_count avg_server_assignment_count avg_xact_count avg_query_count avg_client_bytes avg_server_bytes avg_xact_time avg_query_time avg_wait_time avg_ps_client_parse_count avg_ps_server_parse_count avg_ps_bind_count"),
    ("STATE", "active paused suspended"),
    ("MEM", "user_cache credentials_cache db_cache peer_cache peer_pool_cache pool_cache outstanding_request_cache server_cache client_cache iobuf_cache var_list_cache server_prepared_statement_cache"),
];

/// The same for Debian's PgBouncer 1.18.0 (it has no STATE, PEERS or PEER_POOLS).
const PGBOUNCER_1_18: &[(&str, &str)] = &[
    ("CLIENTS", "type:text user:text database:text state:text addr:text port:int4 local_addr:text local_port:int4 connect_time:text request_time:text wait:int4 wait_us:int4 close_needed:int4 ptr:text link:text remote_pid:int4 tls:text application_name:text"),
    ("SERVERS", "type:text user:text database:text state:text addr:text port:int4 local_addr:text local_port:int4 connect_time:text request_time:text wait:int4 wait_us:int4 close_needed:int4 ptr:text link:text remote_pid:int4 tls:text application_name:text"),
    ("POOLS", "database:text user:text cl_active:int4 cl_waiting:int4 cl_active_cancel_req:int4 cl_waiting_cancel_req:int4 sv_active:int4 sv_active_cancel:int4 sv_being_canceled:int4 sv_idle:int4 sv_used:int4 sv_tested:int4 sv_login:int4 maxwait:int4 maxwait_us:int4 pool_mode:text"),
    ("STATS", "database:text total_xact_count:numeric total_query_count:numeric total_received:numeric total_sent:numeric total_xact_time:numeric total_query_time:numeric total_wait_time:numeric avg_xact_count:numeric avg_query_count:numeric avg_recv:numeric avg_sent:numeric avg_xact_time:numeric avg_query_time:numeric avg_wait_time:numeric"),
    ("STATS_TOTALS", "database:text xact_count:numeric query_count:numeric bytes_received:numeric bytes_sent:numeric xact_time:numeric query_time:numeric wait_time:numeric"),
    ("STATS_AVERAGES", "database:text xact_count:numeric query_count:numeric bytes_received:numeric bytes_sent:numeric xact_time:numeric query_time:numeric wait_time:numeric"),
    ("TOTALS", "name:text value:numeric"),
    ("LISTS", "list:text items:int4"),
    ("MEM", "name:text size:int4 used:int4 free:int4 memtotal:int4"),
    ("USERS", "name:text pool_mode:text"),
    ("DATABASES", "name:text host:text port:int4 database:text force_user:text pool_size:int4 min_pool_size:int4 reserve_pool:int4 pool_mode:text max_connections:int4 current_connections:int4 paused:int4 disabled:int4"),
    ("FDS", "fd:int4 task:text user:text database:text addr:text port:int4 cancel:int8 link:int4 client_encoding:text std_strings:text datestyle:text timezone:text password:text scram_client_key:bytea scram_server_key:bytea"),
    ("SOCKETS", "type:text user:text database:text state:text addr:text port:int4 local_addr:text local_port:int4 connect_time:text request_time:text wait:int4 wait_us:int4 close_needed:int4 ptr:text link:text remote_pid:int4 tls:text application_name:text recv_pos:int4 pkt_pos:int4 pkt_remain:int4 send_pos:int4 send_remain:int4 pkt_avail:int4 send_avail:int4"),
    ("CONFIG", "key:text value:text default:text changeable:text"),
    ("VERSION", "version:text"),
    ("DNS_HOSTS", "hostname:text ttl:int8 addrs:text"),
    ("DNS_ZONES", "zonename:text serial:int8 count:int4"),
];

const ROWS_1_18: &[(&str, &str)] = &[
    ("LISTS", "databases users pools free_clients used_clients login_clients free_servers used_servers dns_names dns_zones dns_queries dns_pending"),
    ("TOTALS", "total_xact_count total_query_count total_client_bytes total_server_bytes total_xact_time total_query_time total_wait_time avg_xact_count avg_query_count avg_client_bytes avg_server_bytes avg_xact_time avg_query_time avg_wait_time"),
    ("MEM", "user_cache db_cache pool_cache server_cache client_cache iobuf_cache"),
];

/// iampool's own columns, after PgBouncer's (PgBouncer itself adds columns at the end, so
/// its readers take them by name): who is pinned to its server, and why.
const IAMPOOL_EXTRA: &[(&str, &str)] = &[("CLIENTS", "pinned:text")];

/// What iampool refuses, with the reason (their columns serve PgBouncer's internals).
const REFUSED: [&str; 2] = ["FDS", "SOCKETS"];

fn type_name(oid: i32) -> String {
    match oid {
        17 => "bytea".into(),
        20 => "int8".into(),
        23 => "int4".into(),
        25 => "text".into(),
        1700 => "numeric".into(),
        other => format!("oid{other}"),
    }
}

/// What `SHOW <item>` answers on a console that takes `user` without a password:
/// `Ok((columns as name:type, each row's first value))`, or the ERROR's SQLSTATE.
async fn describe(
    addr: SocketAddr,
    user: &str,
    item: &str,
) -> Result<(String, Vec<String>), String> {
    let mut s = raw_console(addr, user).await;
    s.write_all(&query(format!("SHOW {item}").as_bytes()))
        .await
        .unwrap();
    let mut columns = None;
    let mut first = Vec::new();
    for (tag, body) in read_reply(&mut s).await {
        let mut r = iampool::protocol::messages::BodyReader::new(&body);
        match tag {
            b'E' => return Err(error_code(&body)),
            b'T' => {
                let n = r.i16().unwrap();
                let mut cols = Vec::new();
                for _ in 0..n {
                    let name = r.cstr().unwrap().to_owned();
                    let desc = r.bytes(18).unwrap();
                    let oid = i32::from_be_bytes([desc[6], desc[7], desc[8], desc[9]]);
                    cols.push(format!("{name}:{}", type_name(oid)));
                }
                columns = Some(cols.join(" "));
            }
            b'D' => {
                r.i16().unwrap();
                let len = r.i32().unwrap();
                let value = if len < 0 {
                    String::new()
                } else {
                    String::from_utf8_lossy(r.bytes(len as usize).unwrap()).into_owned()
                };
                first.push(value);
            }
            _ => {}
        }
    }
    Ok((columns.expect("a RowDescription"), first))
}

fn recorded(list: &[(&'static str, &'static str)]) -> BTreeMap<&'static str, &'static str> {
    list.iter().copied().collect()
}

/// Every column list iampool sends is PgBouncer 1.25's, name for name and type for type
/// (and iampool's own after them); the fixed row names (LISTS, TOTALS, STATE) are its too,
/// and MEM's are some of its.
/// What a script written for 1.18 reads is still there, but for the one column 1.25
/// renamed itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iampool_sends_pgbouncer_1_25s_columns() {
    let pg = shared_cluster();
    let (_db, mut cfg, users) = setup(pg, "adm_cols");
    cfg.auth_type = AuthType::Trust;
    let iam = start(cfg).await;
    let addr = iam.local_addr();
    let admin = users.admin.0.as_str();

    let mut wrong = Vec::new();
    let mut ours = BTreeMap::new();
    for (item, theirs) in PGBOUNCER_1_25 {
        match describe(addr, admin, item).await {
            Ok(_) if REFUSED.contains(item) => wrong.push(format!("SHOW {item}: not refused")),
            Err(code) if REFUSED.contains(item) => assert_eq!(code, "0A000", "SHOW {item}"),
            Err(code) => wrong.push(format!("SHOW {item}: ERROR {code}")),
            Ok((cols, rows)) => {
                let theirs = match IAMPOOL_EXTRA.iter().find(|(i, _)| i == item) {
                    Some((_, extra)) => format!("{theirs} {extra}"),
                    None => theirs.to_string(),
                };
                if cols != theirs {
                    wrong.push(format!(
                        "SHOW {item}:\n  iampool   {cols}\n  pgbouncer {theirs}"
                    ));
                }
                ours.insert(*item, (cols, rows));
            }
        }
    }
    for (item, names) in ROWS_1_25 {
        let rows = ours[item].1.join(" ");
        let fits = if *item == "MEM" {
            let theirs: Vec<&str> = names.split(' ').collect();
            ours[item].1.iter().all(|r| theirs.contains(&r.as_str()))
        } else {
            rows == *names
        };
        if !fits {
            wrong.push(format!(
                "SHOW {item} rows:\n  iampool   {rows}\n  pgbouncer {names}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // 1.18's columns, each still there with its type, but for 1.25's own rename.
    let mut missing = Vec::new();
    for (item, old) in PGBOUNCER_1_18 {
        let Some((cols, _)) = ours.get(item) else {
            continue;
        };
        let now: Vec<&str> = cols.split(' ').collect();
        missing.extend(
            old.split(' ')
                .filter(|c| !now.contains(c))
                .map(|c| format!("{item}.{c}")),
        );
    }
    assert_eq!(
        missing,
        ["DATABASES.reserve_pool:int4"],
        "1.25 renamed it reserve_pool_size"
    );
    assert!(iam.shutdown().await);
}

/// The PgBouncer binaries to check the recordings with: (version prefix, path).
fn binaries() -> Vec<(&'static str, PathBuf)> {
    let mut found = Vec::new();
    let debian = std::env::var_os("PGBOUNCER_1_18")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/pgbouncer"));
    if debian.exists() {
        found.push(("PgBouncer 1.18", debian));
    }
    if let Some(p) = std::env::var_os("PGBOUNCER_1_25") {
        found.push(("PgBouncer 1.25", PathBuf::from(p)));
    }
    found
}

/// The recordings above are what PgBouncer itself sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_columns_are_pgbouncers_own() {
    let found = binaries();
    assert!(
        !found.is_empty(),
        "no PgBouncer to compare with: scripts/setup.sh installs Debian's at \
         /usr/sbin/pgbouncer; PGBOUNCER_1_25 names a 1.25 build"
    );
    for (version, bin) in found {
        let said = pgbouncer::version(&bin);
        assert!(said.starts_with(version), "{}: {said}", bin.display());
        let (columns, rows) = if version.ends_with("1.25") {
            (recorded(PGBOUNCER_1_25), recorded(ROWS_1_25))
        } else {
            (recorded(PGBOUNCER_1_18), recorded(ROWS_1_18))
        };
        let bouncer = tokio::task::spawn_blocking(move || PgBouncer::start(&bin))
            .await
            .unwrap();
        let mut wrong = Vec::new();
        for (item, cols) in &columns {
            let (live, first) = describe(bouncer.addr(), pgbouncer::ADMIN, item)
                .await
                .unwrap_or_else(|code| panic!("{said}: SHOW {item}: ERROR {code}"));
            if live != *cols {
                wrong.push(format!(
                    "SHOW {item}:\n  live     {live}\n  recorded {cols}"
                ));
            }
            if let Some(names) = rows.get(item) {
                if first.join(" ") != *names {
                    wrong.push(format!("SHOW {item} rows: live {first:?}"));
                }
            }
        }
        assert!(wrong.is_empty(), "{said}:\n{}", wrong.join("\n"));
        eprintln!("{said}: every recorded column list matches");
    }
}
