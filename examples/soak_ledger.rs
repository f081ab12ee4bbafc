//! The commit ledger of `tests/support/ledger.rs` as a program, for `benches/soak.sh`:
//! writers through a pooler for a while, then the check against PostgreSQL directly.
//!
//! ```text
//! soak_ledger --port POOLER_PORT --check-port PG_PORT --user U --password P --db D \
//!     --writers 4 --seconds 1800
//! ```
//!
//! Prints one `ledger:` line (acknowledged, in doubt, not committed, lost, phantom,
//! half-applied, failures by cause); exits 1 if any acknowledged commit was lost, any
//! phantom or half-applied transaction was found.

#[path = "../tests/support/ledger.rs"]
#[allow(dead_code)]
mod ledger;

use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Where the writers connect (the pooler).
    #[arg(long)]
    port: u16,
    /// Where the check connects (PostgreSQL itself).
    #[arg(long)]
    check_port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
    #[arg(long)]
    db: String,
    #[arg(long, default_value_t = 4)]
    writers: usize,
    #[arg(long)]
    seconds: u64,
}

fn config(a: &Args, port: u16) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(&a.host)
        .port(port)
        .user(&a.user)
        .password(&a.password)
        .dbname(&a.db)
        .connect_timeout(Duration::from_secs(10));
    c
}

async fn direct(a: &Args) -> tokio_postgres::Client {
    let mut last = None;
    // PostgreSQL may be restarting when the run ends: retry for a while.
    for _ in 0..60 {
        match config(a, a.check_port).connect(tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return client;
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("cannot reach PostgreSQL on port {}: {last:?}", a.check_port);
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    direct(&a)
        .await
        .batch_execute(ledger::SCHEMA)
        .await
        .expect("create the ledger tables");
    let ledger = ledger::Ledger::start(config(&a, a.port), a.writers, 1, Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    let report = ledger.verify(&direct(&a).await).await;
    println!("ledger: {report}");
    println!(
        "ledger-result: {} acknowledged={} in_doubt={} lost={} phantom={} half_applied={}",
        if report.ok() { "PASS" } else { "FAIL" },
        report.acked,
        report.in_doubt,
        report.lost.len(),
        report.phantom.len(),
        report.half_applied.len()
    );
    std::process::exit(if report.ok() { 0 } else { 1 });
}
