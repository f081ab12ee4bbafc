//! Micro-benchmarks of the per-message hot path: framing server traffic, the relay's own
//! protocol scanner (`client::scan::Scan`, the code the relay runs) over a pgbench-like
//! transaction in each `-M` mode, and signing an RDS IAM token.
//!
//! Run with `cargo bench --bench hot_path` (add `-- --quick` for a short pass). The figures
//! are for comparing revisions on one machine, not absolute claims; see benches/README.md.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use iampool::client::prepared::Tracker;
use iampool::client::scan::{Scan, ServerSide};
use iampool::iam::signer::sign_token;
use iampool::protocol::exchange::{Disposition, Exchange};
use iampool::protocol::framing::Header;
use iampool::protocol::messages::{backend, frontend};
use iampool::protocol::statements::ServerStatements;
use iampool::server::params::SessionParams;

/// The relay reads this much per syscall (`READ_CHUNK` in src/client/half.rs).
const READ_CHUNK: usize = iampool::client::half::READ_CHUNK;
/// Size of the simulated server traffic buffer.
const TRAFFIC_BYTES: usize = 64 * 1024;

fn message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

/// RowDescription of `pgbench_accounts` (aid, bid, abalance, filler), text format.
fn row_description() -> Vec<u8> {
    let columns: [(&str, u32, i16, i32); 4] = [
        ("aid", 23, 4, -1),
        ("bid", 23, 4, -1),
        ("abalance", 23, 4, -1),
        ("filler", 1042, -1, 88),
    ];
    let mut body = Vec::new();
    body.extend_from_slice(&(columns.len() as i16).to_be_bytes());
    for (i, (name, type_oid, type_len, type_mod)) in columns.into_iter().enumerate() {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(&16_400u32.to_be_bytes()); // table oid
        body.extend_from_slice(&(i as i16 + 1).to_be_bytes());
        body.extend_from_slice(&type_oid.to_be_bytes());
        body.extend_from_slice(&type_len.to_be_bytes());
        body.extend_from_slice(&type_mod.to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes()); // text format
    }
    body
}

/// One DataRow of `pgbench_accounts`: aid, bid, abalance and an 84-character filler.
fn data_row(aid: u32) -> Vec<u8> {
    let aid = aid.to_string();
    let filler = " ".repeat(84);
    let fields: [&[u8]; 4] = [aid.as_bytes(), b"1", b"0", filler.as_bytes()];
    let mut body = Vec::new();
    body.extend_from_slice(&(fields.len() as i16).to_be_bytes());
    for f in fields {
        body.extend_from_slice(&(f.len() as i32).to_be_bytes());
        body.extend_from_slice(f);
    }
    body
}

/// `SELECT * FROM pgbench_accounts` as the server sends it, filling about `TRAFFIC_BYTES`.
fn select_traffic() -> Vec<u8> {
    let mut out = Vec::with_capacity(TRAFFIC_BYTES + 256);
    message(&mut out, backend::ROW_DESCRIPTION, &row_description());
    let mut rows = 0;
    while out.len() < TRAFFIC_BYTES - 200 {
        rows += 1;
        message(&mut out, backend::DATA_ROW, &data_row(rows));
    }
    message(
        &mut out,
        backend::COMMAND_COMPLETE,
        format!("SELECT {rows}\0").as_bytes(),
    );
    message(&mut out, backend::READY_FOR_QUERY, b"I");
    out
}

/// A server connection's protocol state, as the relay holds it.
#[derive(Default)]
struct Server {
    x: Exchange,
    statements: ServerStatements,
    params: SessionParams,
}

impl Server {
    fn side(&mut self) -> ServerSide<'_> {
        ServerSide {
            x: &mut self.x,
            statements: &mut self.statements,
            params: &mut self.params,
        }
    }
}

fn scan(prepared_cap: usize) -> Scan {
    Scan::new(
        BytesMut::with_capacity(READ_CHUNK),
        Tracker::new(prepared_cap, Default::default()),
        SessionParams::default(),
        1 << 20,
        true,
    )
}

/// Feeds `bytes` to the server side `chunk` at a time, as reads would deliver them, and
/// drops what the scan marks ready (as the write to the client would). Returns bytes passed.
fn feed_server(scan: &mut Scan, srv: &mut Server, bytes: &[u8], chunk: usize) -> usize {
    let mut passed = 0;
    for part in bytes.chunks(chunk) {
        scan.s.buf.extend_from_slice(part);
        scan.server(&mut srv.side()).expect("bench traffic frames");
        passed += scan.s.ready + scan.s.out.len();
        scan.s.discard_ready();
    }
    passed
}

fn framing(c: &mut Criterion) {
    let traffic = select_traffic();
    let mut group = c.benchmark_group("framing");
    group.throughput(Throughput::Bytes(traffic.len() as u64));
    group.bench_function("headers_64k", |b| {
        b.iter(|| {
            let mut pos = 0;
            let mut n = 0;
            while let Ok(Some(h)) = Header::parse(&traffic[pos..], 1 << 30) {
                pos += h.frame_len();
                n += 1;
            }
            black_box(n)
        })
    });
    for (name, chunk) in [("whole", traffic.len()), ("16k_reads", READ_CHUNK)] {
        group.bench_with_input(
            BenchmarkId::new("scan_server_64k", name),
            &chunk,
            |b, &chunk| {
                let mut scan = scan(0);
                let mut srv = Server::default();
                b.iter(|| {
                    srv.x.on_client(frontend::QUERY);
                    let n = feed_server(&mut scan, &mut srv, black_box(&traffic), chunk);
                    assert_eq!(srv.x.disposition(), Disposition::Clean);
                    n
                })
            },
        );
    }
    group.finish();
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";

/// What pgbench -S sends per transaction in each -M mode, and what the server answers.
fn select_only(mode: &str) -> (Vec<u8>, Vec<u8>) {
    let mut client = Vec::new();
    let mut server = Vec::new();
    let mut bind = Vec::new();
    let stmt = if mode == "prepared" { "P0_1" } else { "" };
    cstr(&mut bind, "");
    cstr(&mut bind, stmt);
    bind.extend_from_slice(&[0, 0, 0, 1]);
    bind.extend_from_slice(&5i32.to_be_bytes());
    bind.extend_from_slice(b"12345");
    bind.extend_from_slice(&[0, 0]);
    let row = {
        let mut r = Vec::new();
        r.extend_from_slice(&1i16.to_be_bytes());
        r.extend_from_slice(&1i32.to_be_bytes());
        r.push(b'0');
        r
    };
    let mut desc = Vec::new();
    desc.extend_from_slice(&1i16.to_be_bytes());
    cstr(&mut desc, "abalance");
    desc.extend_from_slice(&[0; 18]);
    match mode {
        "simple" => {
            let mut q = Vec::new();
            cstr(&mut q, &SELECT.replace("$1", "12345"));
            message(&mut client, frontend::QUERY, &q);
        }
        _ => {
            if mode == "extended" {
                let mut p = Vec::new();
                cstr(&mut p, "");
                cstr(&mut p, SELECT);
                p.extend_from_slice(&0i16.to_be_bytes());
                message(&mut client, frontend::PARSE, &p);
                message(&mut server, backend::PARSE_COMPLETE, b"");
            }
            message(&mut client, frontend::BIND, &bind);
            message(&mut client, frontend::DESCRIBE, b"P\0");
            message(&mut client, frontend::EXECUTE, &[0, 0, 0, 0, 0]);
            message(&mut client, frontend::SYNC, b"");
            message(&mut server, backend::BIND_COMPLETE, b"");
        }
    }
    message(&mut server, backend::ROW_DESCRIPTION, &desc);
    message(&mut server, backend::DATA_ROW, &row);
    message(&mut server, backend::COMMAND_COMPLETE, b"SELECT 1\0");
    message(&mut server, backend::READY_FOR_QUERY, b"I");
    (client, server)
}

/// One transaction through the scanner: the client's request, then the server's answer.
fn transaction(scan: &mut Scan, srv: &mut Server, client: &[u8], server: &[u8]) -> bool {
    scan.c.buf.extend_from_slice(client);
    scan.client(&mut srv.side()).expect("bench request frames");
    scan.c.discard_ready();
    feed_server(scan, srv, server, server.len());
    srv.x.disposition() == Disposition::Clean
}

fn pgbench(c: &mut Criterion) {
    let mut group = c.benchmark_group("scan");
    group.throughput(Throughput::Elements(1));
    for mode in ["simple", "extended", "prepared"] {
        let (client, server) = select_only(mode);
        group.bench_function(format!("select_only_{mode}"), |b| {
            let mut scan = scan(200);
            let mut srv = Server::default();
            if mode == "prepared" {
                // The statement is prepared once per connection; every later transaction
                // names it.
                let mut p = Vec::new();
                cstr(&mut p, "P0_1");
                cstr(&mut p, SELECT);
                p.extend_from_slice(&0i16.to_be_bytes());
                let mut parse = Vec::new();
                message(&mut parse, frontend::PARSE, &p);
                message(&mut parse, frontend::SYNC, b"");
                let mut answer = Vec::new();
                message(&mut answer, backend::PARSE_COMPLETE, b"");
                message(&mut answer, backend::READY_FOR_QUERY, b"I");
                assert!(transaction(&mut scan, &mut srv, &parse, &answer));
            }
            b.iter(|| {
                let clean =
                    transaction(&mut scan, &mut srv, black_box(&client), black_box(&server));
                assert!(clean, "the server is clean after the transaction");
                clean
            })
        });
    }
    group.finish();
}

fn signer(c: &mut Criterion) {
    // AWS's documented example key pair; nothing here is a real credential.
    let creds = Credentials::new(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        Some("IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN".repeat(20)),
        None,
        "bench",
    );
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut group = c.benchmark_group("iam");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign_token", |b| {
        b.iter(|| {
            sign_token(
                black_box(&creds),
                black_box("mydb.cluster-abcdefghijkl.eu-west-1.rds.amazonaws.com"),
                5432,
                black_box("app_user"),
                "eu-west-1",
                at,
            )
            .expect("signs")
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Short by default: these are cheap functions, and the machines they run on are shared.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = framing, pgbench, signer
}
criterion_main!(benches);
