//! A commit ledger: writers that record which commits were acknowledged, and a check that
//! the database agrees.
//!
//! Each writer (tokio-postgres, usually through iampool) runs transactions that insert the
//! same unique id into two tables, `ledger_a` and `ledger_b`:
//! `BEGIN; INSERT a; INSERT b; COMMIT`, one statement at a time. It records the outcome
//! of every transaction:
//!
//! - acknowledged: COMMIT returned success;
//! - in doubt: COMMIT itself failed (the connection broke while it was in flight), so the
//!   transaction may or may not have committed;
//! - not committed: something before COMMIT failed, so COMMIT was never sent.
//!
//! [`Ledger::verify`] then reads both tables directly and checks, for zero lost
//! acknowledged commits: every acknowledged id is present; no id is present that was
//! neither acknowledged nor in doubt; and every id is in both tables or in neither (no
//! transaction half applied).
//!
//! Writers reconnect after an error (bounded backoff) until [`Ledger::stop`]. Used by the
//! fault tests and by `benches/soak.sh` (through `examples/soak_ledger.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

/// The tables; run as a user who may create tables in the database.
pub const SCHEMA: &str =
    "create table if not exists ledger_a (id bigint primary key, writer int not null);
     create table if not exists ledger_b (id bigint primary key, writer int not null);";

/// A bound on one transaction: past it the connection is given up (and the outcome is
/// in doubt if COMMIT had been sent).
const TX_LIMIT: Duration = Duration::from_secs(30);

#[derive(Default, Debug)]
struct Book {
    acked: BTreeSet<i64>,
    in_doubt: BTreeSet<i64>,
    not_committed: BTreeSet<i64>,
    /// Failures by cause (SQLSTATE, or "io" / "timeout" / "connect:<code>").
    causes: BTreeMap<String, u64>,
    connects: u64,
}

/// Running writers; see the module docs.
pub struct Ledger {
    book: Arc<Mutex<Book>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

/// What [`Ledger::verify`] found.
#[derive(Debug, Clone)]
pub struct LedgerReport {
    pub acked: usize,
    pub in_doubt: usize,
    pub not_committed: usize,
    /// In-doubt transactions that did commit.
    pub in_doubt_committed: usize,
    pub connects: u64,
    pub causes: BTreeMap<String, u64>,
    /// Acknowledged but missing: lost commits.
    pub lost: Vec<i64>,
    /// Present but never acknowledged and not in doubt.
    pub phantom: Vec<i64>,
    /// In one table only.
    pub half_applied: Vec<i64>,
}

impl LedgerReport {
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.phantom.is_empty() && self.half_applied.is_empty()
    }

    /// Panics unless there are zero lost acknowledged commits, no phantom and no half-applied
    /// transaction; `min_acked` guards against a run that never committed anything.
    pub fn assert_no_loss(&self, min_acked: usize) {
        assert!(self.ok(), "ledger: {self}");
        assert!(
            self.acked >= min_acked,
            "ledger: only {} acknowledged commits (wanted at least {min_acked}): {self}",
            self.acked
        );
    }
}

impl fmt::Display for LedgerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = |v: &[i64]| v.iter().take(10).copied().collect::<Vec<_>>();
        write!(
            f,
            "{} acknowledged, {} in doubt ({} of them committed), {} not committed, {} \
             connections; lost {} {:?}, phantom {} {:?}, half-applied {} {:?}; failures by \
             cause {:?}",
            self.acked,
            self.in_doubt,
            self.in_doubt_committed,
            self.not_committed,
            self.connects,
            self.lost.len(),
            first(&self.lost),
            self.phantom.len(),
            first(&self.phantom),
            self.half_applied.len(),
            first(&self.half_applied),
            self.causes
        )
    }
}

enum Outcome {
    Acked,
    InDoubt(String),
    NotCommitted(String),
}

fn cause(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(c) => c.code().to_owned(),
        None if e.is_closed() => "closed".to_owned(),
        None => "io".to_owned(),
    }
}

impl Ledger {
    /// Starts `writers` writers connecting with `connect` (NoTls); ids start at `first_id`.
    /// Each writer pauses `pace` after every transaction (zero: flat out), so tests that run
    /// beside others need not take a core each.
    pub fn start(
        connect: tokio_postgres::Config,
        writers: usize,
        first_id: i64,
        pace: Duration,
    ) -> Ledger {
        let book = Arc::new(Mutex::new(Book::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicI64::new(first_id));
        let tasks = (0..writers)
            .map(|w| {
                let (connect, book, stop, next) =
                    (connect.clone(), book.clone(), stop.clone(), next.clone());
                tokio::spawn(writer(w as i32, connect, book, stop, next, pace))
            })
            .collect();
        Ledger { book, stop, tasks }
    }

    /// Acknowledged commits so far.
    pub fn acked(&self) -> usize {
        self.book.lock().unwrap().acked.len()
    }

    /// Waits until at least `n` more commits than now are acknowledged (bounded).
    pub async fn wait_for_more(&self, n: usize, limit: Duration) {
        let start = self.acked();
        let deadline = tokio::time::Instant::now() + limit;
        while self.acked() < start + n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "ledger writers acknowledged {} commits in {limit:?}, wanted {n}: {:?}",
                self.acked() - start,
                self.book.lock().unwrap().causes
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the writers (each finishes its transaction, bounded by the transaction limit).
    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks.drain(..) {
            tokio::time::timeout(TX_LIMIT + Duration::from_secs(15), t)
                .await
                .expect("a ledger writer did not stop")
                .expect("a ledger writer panicked");
        }
    }

    /// Stops the writers and checks the tables through `direct` (a connection that does
    /// not go through the system under test).
    pub async fn verify(mut self, direct: &tokio_postgres::Client) -> LedgerReport {
        self.stop().await;
        let ids = |table: &'static str| async move {
            direct
                .simple_query(&format!("select id from {table}"))
                .await
                .unwrap_or_else(|e| panic!("read {table}: {e}"))
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        r.get(0).map(|v| v.parse::<i64>().expect("an id"))
                    }
                    _ => None,
                })
                .collect::<BTreeSet<i64>>()
        };
        let a = ids("ledger_a").await;
        let b = ids("ledger_b").await;
        let book = self.book.lock().unwrap();
        let present: BTreeSet<i64> = a.union(&b).copied().collect();
        LedgerReport {
            acked: book.acked.len(),
            in_doubt: book.in_doubt.len(),
            not_committed: book.not_committed.len(),
            in_doubt_committed: book.in_doubt.intersection(&present).count(),
            connects: book.connects,
            causes: book.causes.clone(),
            lost: book.acked.difference(&present).copied().collect(),
            phantom: present
                .iter()
                .filter(|id| !book.acked.contains(id) && !book.in_doubt.contains(id))
                .copied()
                .collect(),
            half_applied: a.symmetric_difference(&b).copied().collect(),
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn writer(
    w: i32,
    connect: tokio_postgres::Config,
    book: Arc<Mutex<Book>>,
    stop: Arc<AtomicBool>,
    next: Arc<AtomicI64>,
    pace: Duration,
) {
    let mut backoff = Duration::from_millis(20);
    while !stop.load(Ordering::SeqCst) {
        let client =
            match tokio::time::timeout(TX_LIMIT, connect.connect(tokio_postgres::NoTls)).await {
                Ok(Ok((client, conn))) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    book.lock().unwrap().connects += 1;
                    backoff = Duration::from_millis(20);
                    client
                }
                Ok(Err(e)) => {
                    *book
                        .lock()
                        .unwrap()
                        .causes
                        .entry(format!("connect:{}", cause(&e)))
                        .or_default() += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    continue;
                }
                Err(_) => {
                    *book
                        .lock()
                        .unwrap()
                        .causes
                        .entry("connect:timeout".into())
                        .or_default() += 1;
                    continue;
                }
            };
        while !stop.load(Ordering::SeqCst) && !client.is_closed() {
            let id = next.fetch_add(1, Ordering::SeqCst);
            let outcome = transaction(&client, w, id).await;
            let failed = {
                let mut b = book.lock().unwrap();
                let failed = match outcome {
                    Outcome::Acked => {
                        b.acked.insert(id);
                        None
                    }
                    Outcome::InDoubt(c) => {
                        b.in_doubt.insert(id);
                        Some(format!("commit:{c}"))
                    }
                    Outcome::NotCommitted(c) => {
                        b.not_committed.insert(id);
                        Some(c)
                    }
                };
                if let Some(c) = &failed {
                    *b.causes.entry(c.clone()).or_default() += 1;
                }
                failed.is_some()
            };
            if failed {
                // The session may be unusable or mid-transaction: start over.
                break;
            }
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
        }
    }
}

async fn transaction(client: &tokio_postgres::Client, w: i32, id: i64) -> Outcome {
    let before_commit = async {
        client.batch_execute("begin").await?;
        client
            .batch_execute(&format!("insert into ledger_a values ({id}, {w})"))
            .await?;
        client
            .batch_execute(&format!("insert into ledger_b values ({id}, {w})"))
            .await
    };
    match tokio::time::timeout(TX_LIMIT, before_commit).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Outcome::NotCommitted(cause(&e)),
        Err(_) => return Outcome::NotCommitted("timeout".into()),
    }
    match tokio::time::timeout(TX_LIMIT, client.batch_execute("commit")).await {
        Ok(Ok(())) => Outcome::Acked,
        Ok(Err(e)) => Outcome::InDoubt(cause(&e)),
        Err(_) => Outcome::InDoubt("timeout".into()),
    }
}
