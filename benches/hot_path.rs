//! Micro-benchmarks of the per-message hot path: framing server traffic, the request-cycle
//! bookkeeping of a pgbench-like transaction, and signing an RDS IAM token.
//!
//! Run with `cargo bench --bench hot_path` (add `-- --quick` for a short pass). The figures
//! are for comparing revisions on one machine, not absolute claims; see benches/README.md.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use iampool::client::cycle::{ClientMsg, Cycle};
use iampool::iam::signer::sign_token;
use iampool::protocol::framing::{Header, Scanner, Step, HEADER_LEN};
use iampool::protocol::messages::{backend, frontend, TxStatus};

/// The relay reads this much per syscall (`READ_CHUNK` in src/client/relay.rs).
const READ_CHUNK: usize = 16 * 1024;
/// Size of the simulated server traffic buffer.
const TRAFFIC_BYTES: usize = 64 * 1024;
/// The relay's cap on a server message (PostgreSQL never sends more than 1 GiB).
const MAX_SERVER_MESSAGE: usize = (1 << 30) + 1;

// Backend tags the relay does not name because it never looks inside them.
const ROW_DESCRIPTION: u8 = b'T';
const DATA_ROW: u8 = b'D';
const PARSE_COMPLETE: u8 = b'1';
const BIND_COMPLETE: u8 = b'2';
const NO_DATA: u8 = b'n';

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

/// One `pgbench_accounts` row as a DataRow body: about 110 bytes on the wire.
fn data_row(aid: u32) -> Vec<u8> {
    let aid = aid.to_string();
    let bid = (aid.len() % 10 + 1).to_string();
    let filler = [b' '; 84];
    let fields: [&[u8]; 4] = [aid.as_bytes(), bid.as_bytes(), b"0", &filler];
    let mut body = Vec::new();
    body.extend_from_slice(&(fields.len() as i16).to_be_bytes());
    for f in fields {
        body.extend_from_slice(&(f.len() as i32).to_be_bytes());
        body.extend_from_slice(f);
    }
    body
}

/// A `SELECT * FROM pgbench_accounts LIMIT n` answer that fills (at most) `TRAFFIC_BYTES`:
/// RowDescription, DataRows, CommandComplete, ReadyForQuery 'I'.
fn server_traffic() -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(TRAFFIC_BYTES);
    message(&mut out, ROW_DESCRIPTION, &row_description());
    // Room for CommandComplete ("SELECT nnnnn") and ReadyForQuery.
    let tail = 5 + 13 + 5 + 1;
    let mut rows = 0usize;
    loop {
        let row = data_row(100_000 + rows as u32);
        if out.len() + HEADER_LEN + row.len() + tail > TRAFFIC_BYTES {
            break;
        }
        message(&mut out, DATA_ROW, &row);
        rows += 1;
    }
    message(
        &mut out,
        backend::COMMAND_COMPLETE,
        format!("SELECT {rows}\0").as_bytes(),
    );
    message(&mut out, backend::READY_FOR_QUERY, b"I");
    (out, rows)
}

/// Walks `traffic` as the relay's `scan_server` does, with the bytes arriving `chunk` at a
/// time: ReadyForQuery is decoded, every other tag goes to the cycle, bodies are skipped.
/// Returns the number of message headers seen.
fn scan_server(traffic: &[u8], chunk: usize, cycle: &mut Cycle) -> usize {
    let mut scan = Scanner::default();
    let mut pos = 0;
    let mut end = 0;
    let mut messages = 0;
    while end < traffic.len() {
        end = (end + chunk).min(traffic.len());
        loop {
            let header = match scan.step(&traffic[pos..end], MAX_SERVER_MESSAGE) {
                Err(e) => panic!("bench traffic does not frame: {e}"),
                Ok(Step::NeedMore) => break,
                Ok(Step::Continue(n)) => {
                    scan.consume_body(n);
                    pos += n;
                    continue;
                }
                Ok(Step::Message { header, complete }) => {
                    let inspected = matches!(
                        header.tag,
                        backend::READY_FOR_QUERY
                            | backend::PARAMETER_STATUS
                            | backend::ERROR_RESPONSE
                    );
                    if inspected && !complete {
                        break;
                    }
                    header
                }
            };
            messages += 1;
            if header.tag == backend::READY_FOR_QUERY {
                let status = traffic[pos + HEADER_LEN..]
                    .first()
                    .copied()
                    .and_then(TxStatus::from_byte)
                    .expect("bench traffic has a valid ReadyForQuery");
                cycle.on_ready(status);
            } else {
                cycle.on_server(header.tag);
            }
            pos += scan.consume_message(header, end - pos);
        }
    }
    assert_eq!(pos, traffic.len(), "the scan consumed every byte");
    messages
}

fn framing(c: &mut Criterion) {
    let (traffic, rows) = server_traffic();
    // RowDescription + rows + CommandComplete + ReadyForQuery.
    let expected = rows + 3;
    let mut group = c.benchmark_group("framing");
    group.throughput(Throughput::Bytes(traffic.len() as u64));

    // Only headers: the lower bound of any framing walk over this traffic.
    group.bench_function("headers_64k", |b| {
        b.iter(|| {
            let buf = black_box(traffic.as_slice());
            let mut pos = 0;
            let mut n = 0;
            while let Some(h) = Header::parse(&buf[pos..], MAX_SERVER_MESSAGE).expect("frames") {
                pos += h.frame_len();
                n += 1;
            }
            assert_eq!(n, expected);
            n
        })
    });

    // The relay's walk, with the buffer arriving whole and in 16 KiB reads (split messages).
    for (name, chunk) in [("whole", traffic.len()), ("16k_reads", READ_CHUNK)] {
        group.bench_with_input(
            BenchmarkId::new("scan_server_64k", name),
            &chunk,
            |b, &chunk| {
                b.iter(|| {
                    let mut cycle = Cycle::default();
                    cycle.on_client(frontend::QUERY);
                    let n = scan_server(black_box(&traffic), chunk, &mut cycle);
                    assert_eq!(n, expected);
                    assert!(cycle.is_clean());
                    n
                })
            },
        );
    }
    group.finish();
}

/// What the server answers one statement with, as tags, before its ReadyForQuery.
struct Statement {
    answer: &'static [u8],
    status: TxStatus,
}

/// pgbench's TPC-B-like transaction: BEGIN, three UPDATEs, a SELECT, an INSERT, END.
const TPCB: [Statement; 7] = [
    Statement {
        answer: b"C",
        status: TxStatus::InTransaction,
    }, // BEGIN
    Statement {
        answer: b"C",
        status: TxStatus::InTransaction,
    }, // UPDATE accounts
    Statement {
        answer: b"TDC",
        status: TxStatus::InTransaction,
    }, // SELECT abalance
    Statement {
        answer: b"C",
        status: TxStatus::InTransaction,
    }, // UPDATE tellers
    Statement {
        answer: b"C",
        status: TxStatus::InTransaction,
    }, // UPDATE branches
    Statement {
        answer: b"C",
        status: TxStatus::InTransaction,
    }, // INSERT history
    Statement {
        answer: b"C",
        status: TxStatus::Idle,
    }, // END
];

/// Runs one TPC-B transaction through `cycle`; `request` is what the client sends per
/// statement and `prefix` what the server sends before the statement's own answer.
/// Returns whether the server could go back to the pool afterwards.
fn transaction(cycle: &mut Cycle, request: &[u8], prefix: &[u8]) -> bool {
    let mut released = false;
    for stmt in &TPCB {
        for &tag in request {
            assert_eq!(cycle.on_client(tag), ClientMsg::Forward);
        }
        for &tag in prefix.iter().chain(stmt.answer) {
            cycle.on_server(tag);
        }
        cycle.on_ready(stmt.status);
        // The relay asks after every ReadyForQuery whether the server can be released.
        released = cycle.is_clean();
    }
    released
}

fn cycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("cycle");
    group.throughput(Throughput::Elements(1));
    let modes: [(&str, &[u8], &[u8]); 3] = [
        // -M simple: one Query per statement.
        ("tpcb_simple", &[frontend::QUERY], &[]),
        // -M extended: Parse/Bind/Describe/Execute/Sync of an unnamed statement.
        (
            "tpcb_extended",
            &[
                frontend::PARSE,
                frontend::BIND,
                frontend::DESCRIBE,
                frontend::EXECUTE,
                frontend::SYNC,
            ],
            &[PARSE_COMPLETE, BIND_COMPLETE, NO_DATA],
        ),
        // -M prepared, after the first round: Bind/Describe/Execute/Sync.
        (
            "tpcb_prepared",
            &[
                frontend::BIND,
                frontend::DESCRIBE,
                frontend::EXECUTE,
                frontend::SYNC,
            ],
            &[BIND_COMPLETE, NO_DATA],
        ),
    ];
    for (name, request, prefix) in modes {
        group.bench_function(name, |b| {
            let mut cycle = Cycle::default();
            b.iter(|| {
                let released = transaction(&mut cycle, black_box(request), black_box(prefix));
                assert!(released, "the server is clean after END");
                released
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
    targets = framing, cycle, signer
}
criterion_main!(benches);
