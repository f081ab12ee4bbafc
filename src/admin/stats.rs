//! SHOW STATS, STATS_TOTALS, STATS_AVERAGES and TOTALS: PgBouncer 1.25's columns (numeric,
//! as it announces them), read from each pool's metrics.
//!
//! Totals count since start, times in microseconds. iampool keeps no stats periods, so the
//! averages are over the whole run: counts and bytes per second since start, and times as
//! means per transaction, query and wait. A transaction is counted per server assignment
//! (link to release), so the two counts agree, as they do in PgBouncer's transaction mode.
//! The prepared-statement counts (client parse, server parse, bind) are not tracked: 0.

use std::time::SystemTime;

use super::reply::{Cell, Table, Ty};
use super::show::pools;
use super::Context;
use crate::pool::Pool;

use Ty::{Numeric, Text};

/// One pool's figures, or every pool's summed.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    assignments: u64,
    xacts: u64,
    queries: u64,
    received: u64,
    sent: u64,
    xact_us: u64,
    query_us: u64,
    wait_us: u64,
    /// How many transactions, queries and waits the times add up.
    timed: [u64; 3],
}

impl Figures {
    fn of(p: &Pool) -> Figures {
        let m = &p.metrics;
        let us = |s: f64| (s.max(0.0) * 1e6) as u64;
        Figures {
            assignments: m.transactions.get(),
            xacts: m.transactions.get(),
            queries: m.queries.get(),
            received: m.bytes_in.get(),
            sent: m.bytes_out.get(),
            xact_us: us(m.transaction.get_sample_sum()),
            query_us: us(m.query.get_sample_sum()),
            wait_us: us(m.wait.get_sample_sum()),
            timed: [
                m.transaction.get_sample_count(),
                m.query.get_sample_count(),
                m.wait.get_sample_count(),
            ],
        }
    }

    fn add(mut self, o: Figures) -> Figures {
        self.assignments += o.assignments;
        self.xacts += o.xacts;
        self.queries += o.queries;
        self.received += o.received;
        self.sent += o.sent;
        self.xact_us += o.xact_us;
        self.query_us += o.query_us;
        self.wait_us += o.wait_us;
        for (a, b) in self.timed.iter_mut().zip(o.timed) {
            *a += b;
        }
        self
    }

    /// assignments, transactions, queries, received, sent, transaction time, query time,
    /// wait time, client parses, server parses, binds.
    fn totals(&self) -> [u64; 11] {
        [
            self.assignments,
            self.xacts,
            self.queries,
            self.received,
            self.sent,
            self.xact_us,
            self.query_us,
            self.wait_us,
            0,
            0,
            0,
        ]
    }

    /// The same, as averages over `uptime` seconds (see the module comment).
    fn averages(&self, uptime: u64) -> [u64; 11] {
        let rate = |n: u64| n / uptime;
        let mean = |sum: u64, n: u64| sum.checked_div(n).unwrap_or(0);
        [
            rate(self.assignments),
            rate(self.xacts),
            rate(self.queries),
            rate(self.received),
            rate(self.sent),
            mean(self.xact_us, self.timed[0]),
            mean(self.query_us, self.timed[1]),
            mean(self.wait_us, self.timed[2]),
            0,
            0,
            0,
        ]
    }
}

fn uptime(ctx: &dyn Context) -> u64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    (now - ctx.started_at()).max(1) as u64
}

fn row(database: &str, parts: &[&[u64]]) -> Vec<Cell> {
    let mut row: Vec<Cell> = vec![database.into()];
    row.extend(parts.iter().flat_map(|p| p.iter()).map(|&n| Cell::from(n)));
    row
}

static STATS: [(&str, Ty); 23] = [
    ("database", Text),
    ("total_server_assignment_count", Numeric),
    ("total_xact_count", Numeric),
    ("total_query_count", Numeric),
    ("total_received", Numeric),
    ("total_sent", Numeric),
    ("total_xact_time", Numeric),
    ("total_query_time", Numeric),
    ("total_wait_time", Numeric),
    ("total_client_parse_count", Numeric),
    ("total_server_parse_count", Numeric),
    ("total_bind_count", Numeric),
    ("avg_server_assignment_count", Numeric),
    ("avg_xact_count", Numeric),
    ("avg_query_count", Numeric),
    ("avg_recv", Numeric),
    ("avg_sent", Numeric),
    ("avg_xact_time", Numeric),
    ("avg_query_time", Numeric),
    ("avg_wait_time", Numeric),
    ("avg_client_parse_count", Numeric),
    ("avg_server_parse_count", Numeric),
    ("avg_bind_count", Numeric),
];

pub fn stats_table(ctx: &dyn Context) -> Table {
    let uptime = uptime(ctx);
    let mut t = Table::new(&STATS);
    for p in pools(ctx) {
        let f = Figures::of(&p);
        t.push(row(&p.database, &[&f.totals(), &f.averages(uptime)]));
    }
    t
}

/// SHOW STATS_TOTALS and SHOW STATS_AVERAGES share their names but for the last three.
macro_rules! per_database {
    ($name:ident, $last:literal) => {
        static $name: [(&str, Ty); 12] = [
            ("database", Text),
            ("server_assignment_count", Numeric),
            ("xact_count", Numeric),
            ("query_count", Numeric),
            ("bytes_received", Numeric),
            ("bytes_sent", Numeric),
            ("xact_time", Numeric),
            ("query_time", Numeric),
            ("wait_time", Numeric),
            (concat!($last, "client_parse_count"), Numeric),
            (concat!($last, "server_parse_count"), Numeric),
            (concat!($last, "bind_count"), Numeric),
        ];
    };
}
per_database!(STATS_TOTALS, "");
per_database!(STATS_AVERAGES, "avg_");

pub fn stats_totals_table(ctx: &dyn Context) -> Table {
    let mut t = Table::new(&STATS_TOTALS);
    for p in pools(ctx) {
        t.push(row(&p.database, &[&Figures::of(&p).totals()]));
    }
    t
}

pub fn stats_averages_table(ctx: &dyn Context) -> Table {
    let uptime = uptime(ctx);
    let mut t = Table::new(&STATS_AVERAGES);
    for p in pools(ctx) {
        t.push(row(&p.database, &[&Figures::of(&p).averages(uptime)]));
    }
    t
}

static TOTALS: [(&str, Ty); 2] = [("name", Text), ("value", Numeric)];

/// The names of SHOW TOTALS' rows after their `total_` / `avg_` prefix, in the order of
/// [`Figures::totals`]; bytes received from clients are `client_bytes`, sent to them
/// `server_bytes`.
const TOTAL_NAMES: [&str; 11] = [
    "server_assignment_count",
    "xact_count",
    "query_count",
    "client_bytes",
    "server_bytes",
    "xact_time",
    "query_time",
    "wait_time",
    "ps_client_parse_count",
    "ps_server_parse_count",
    "ps_bind_count",
];

/// SHOW STATS summed over every database, one row per figure.
pub fn totals_table(ctx: &dyn Context) -> Table {
    let all = pools(ctx)
        .iter()
        .map(|p| Figures::of(p))
        .fold(Figures::default(), Figures::add);
    let mut t = Table::new(&TOTALS);
    for (prefix, values) in [
        ("total_", all.totals()),
        ("avg_", all.averages(uptime(ctx))),
    ] {
        for (name, v) in TOTAL_NAMES.iter().zip(values) {
            t.push(vec![format!("{prefix}{name}").into(), v.into()]);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_are_rates_and_means() {
        let f = Figures {
            assignments: 100,
            xacts: 100,
            queries: 300,
            received: 1000,
            sent: 5000,
            xact_us: 2000,
            query_us: 900,
            wait_us: 0,
            timed: [100, 300, 0],
        };
        assert_eq!(f.averages(10), [10, 10, 30, 100, 500, 20, 3, 0, 0, 0, 0]);
        assert_eq!(f.add(f).totals()[..3], [200, 200, 600]);
    }
}
