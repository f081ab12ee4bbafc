//! A transaction-mode client whose server is lost keeps its own connection. The requests in
//! flight fail with an ERROR (not a FATAL), a transaction the client had open stays aborted
//! until it rolls back, and its next transaction runs on another server.
//!
//! This file decides what such a client is told (no I/O). What needs no server is answered
//! here, as PostgreSQL would answer it inside a failed transaction block: the rest of an
//! extended-protocol batch is skipped up to its Sync, a ROLLBACK (or COMMIT) ends the block,
//! any other simple Query fails with 25P02. Anything else (an extended-protocol request, a
//! statement this file does not recognise) goes to a server that the relay first puts
//! inside a failed block, so that PostgreSQL itself answers it.

use bytes::{Buf, BytesMut};

use crate::protocol::framing::{Header, HEADER_LEN};
use crate::protocol::messages::{self, frontend, sqlstate, Severity, TxStatus};

/// PostgreSQL's own words for a statement sent inside a failed transaction block.
const ABORTED: &str =
    "current transaction is aborted, commands ignored until end of transaction block";

/// What a lost server leaves its client owing nothing and owed nothing more than this.
#[derive(Debug, Default)]
pub struct Orphan {
    /// The client is inside a transaction block that died with its server.
    pub aborted: bool,
    /// The loss is not reported yet (the server went while the client was idle inside its
    /// transaction): the client's next statement is told.
    untold: Option<String>,
    /// An error was reported in the middle of an extended-protocol batch: the client's
    /// messages are skipped up to its Sync, as PostgreSQL skips them.
    skip_to_sync: bool,
    /// The client's next request was refused (no server came): its messages are skipped
    /// up to the end of that request, a Query or a Sync.
    skip_request: bool,
}

/// The server as it was lost, seen from the client.
#[derive(Debug, Clone, Copy)]
pub struct Loss {
    /// ReadyForQuery messages the client is owed (requests not answered in full).
    pub owed: usize,
    /// Extended-protocol messages after the last Sync, which the client will follow with one.
    pub unsynced: bool,
    /// The client is inside a transaction block.
    pub in_block: bool,
}

/// What [`Orphan::answer`] did with the client's next message.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Answered (or skipped) one message without a server.
    Answered,
    /// A server is needed, put inside a failed block if [`Orphan::aborted`].
    NeedServer,
}

impl Orphan {
    /// Tells the client (into `out`) that its server is gone, and returns what it is still
    /// owed, if anything. `reason` is why the server went, for the first error.
    /// `code` is the first error's SQLSTATE (08006 for a lost server, 57014 for one closed
    /// by query_timeout).
    pub fn on_loss(out: &mut BytesMut, loss: Loss, code: &str, reason: &str) -> Option<Orphan> {
        let status = if loss.in_block {
            TxStatus::Failed
        } else {
            TxStatus::Idle
        };
        let first = if loss.in_block {
            format!(
                "the server connection was lost ({reason}); the transaction is rolled back \
                 (if COMMIT was in flight, whether it committed is unknown). iampool keeps this \
                 connection: roll back, then retry the transaction"
            )
        } else {
            format!(
                "the server connection was lost ({reason}); the statement did not complete \
                 (if it wrote, whether it committed is unknown). iampool keeps this \
                 connection: retry it"
            )
        };
        let requests = loss.owed + usize::from(loss.unsynced);
        if requests == 0 {
            // Nothing in flight: an idle client sees nothing; one idle inside its
            // transaction is told with its next statement.
            return loss.in_block.then_some(Orphan {
                aborted: true,
                untold: Some(first),
                ..Orphan::default()
            });
        }
        for i in 0..requests {
            let (code, message) = match i {
                0 => (code, first.as_str()),
                _ if loss.in_block => (sqlstate::IN_FAILED_SQL_TRANSACTION, ABORTED),
                _ => (
                    sqlstate::CONNECTION_FAILURE,
                    "not run: the server connection was lost while an earlier request was running",
                ),
            };
            messages::error_response(out, Severity::Error, code, message);
            // The unsynced batch's ReadyForQuery comes with the client's Sync.
            if i < loss.owed {
                messages::ready_for_query(out, status);
            }
        }
        (loss.in_block || loss.unsynced).then_some(Orphan {
            aborted: loss.in_block,
            skip_to_sync: loss.unsynced,
            ..Orphan::default()
        })
    }

    /// The client's next request cannot be served (no server came within
    /// query_wait_timeout): it fails with this ERROR, and the client keeps its connection
    /// (and its failed transaction, if it is in one).
    pub fn refused(
        before: Option<Orphan>,
        out: &mut BytesMut,
        code: &str,
        message: &str,
    ) -> Orphan {
        messages::error_response(out, Severity::Error, code, message);
        Orphan {
            skip_request: true,
            ..before.unwrap_or_default()
        }
    }

    /// Nothing more is owed: the client is an ordinary client again.
    pub fn done(&self) -> bool {
        !self.aborted && !self.skip_to_sync && !self.skip_request
    }

    /// Whether [`answer`](Self::answer) needs the client's next message whole.
    pub fn wants_whole(&self) -> bool {
        !self.done()
    }

    /// Answers or skips the message at the front of `buf` (whole, see
    /// [`wants_whole`](Self::wants_whole)) into `out`, or says a server is needed.
    pub fn answer(
        &mut self,
        buf: &mut BytesMut,
        max_message: usize,
        out: &mut BytesMut,
    ) -> Result<Next, String> {
        let header = match Header::parse(buf, max_message) {
            Ok(Some(h)) if buf.len() >= h.frame_len() => h,
            Ok(_) => return Err("answer called without a whole message".into()),
            Err(e) => return Err(e.to_string()),
        };
        let status = if self.aborted {
            TxStatus::Failed
        } else {
            TxStatus::Idle
        };
        if self.skip_to_sync || self.skip_request {
            let ends = match header.tag {
                frontend::SYNC => true,
                frontend::QUERY => self.skip_request,
                _ => false,
            };
            if ends {
                self.skip_to_sync = false;
                self.skip_request = false;
                messages::ready_for_query(out, status);
            }
            buf.advance(header.frame_len());
            return Ok(Next::Answered);
        }
        if !self.aborted {
            return Ok(Next::NeedServer);
        }
        if header.tag != frontend::QUERY {
            let Some(m) = self.untold.take() else {
                return Ok(Next::NeedServer);
            };
            // The first request after an unseen loss is told why, as the first error of a
            // batch; the rest of the batch is skipped (this message included) to its Sync.
            messages::error_response(out, Severity::Error, sqlstate::CONNECTION_FAILURE, &m);
            self.skip_to_sync = true;
            return self.answer(buf, max_message, out);
        }
        let body = &buf[HEADER_LEN..header.frame_len()];
        let sql = body.strip_suffix(&[0]).unwrap_or(body);
        match classify(sql) {
            // A COMMIT of a transaction whose loss the client has not been told of fails
            // (as a COMMIT that cannot commit does), and the block ends.
            Statement::EndsBlock { commit: true } if self.untold.is_some() => {
                let m = self.untold.take().unwrap_or_default();
                messages::error_response(out, Severity::Error, sqlstate::CONNECTION_FAILURE, &m);
                messages::ready_for_query(out, TxStatus::Idle);
                self.aborted = false;
            }
            Statement::EndsBlock { .. } => {
                messages::command_complete(out, "ROLLBACK");
                messages::ready_for_query(out, TxStatus::Idle);
                self.aborted = false;
                self.untold = None;
            }
            Statement::Other => {
                match self.untold.take() {
                    Some(m) => messages::error_response(
                        out,
                        Severity::Error,
                        sqlstate::CONNECTION_FAILURE,
                        &m,
                    ),
                    None => messages::error_response(
                        out,
                        Severity::Error,
                        sqlstate::IN_FAILED_SQL_TRANSACTION,
                        ABORTED,
                    ),
                }
                messages::ready_for_query(out, TxStatus::Failed);
            }
            Statement::Unsure => return Ok(Next::NeedServer),
        }
        buf.advance(header.frame_len());
        Ok(Next::Answered)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Statement {
    /// `ROLLBACK`, `ABORT`, `COMMIT` or `END` (with `WORK` / `TRANSACTION`), alone: inside a
    /// failed block PostgreSQL answers each with ROLLBACK.
    EndsBlock { commit: bool },
    /// A statement PostgreSQL refuses inside a failed block (25P02).
    Other,
    /// Something else a transaction-control statement could be (`ROLLBACK TO`, `AND
    /// CHAIN`, `COMMIT PREPARED`, several statements, a leading comment): a server decides.
    Unsure,
}

fn classify(sql: &[u8]) -> Statement {
    let Ok(text) = std::str::from_utf8(sql) else {
        return Statement::Unsure;
    };
    let text = text
        .trim()
        .trim_end_matches(|c: char| c == ';' || c.is_whitespace());
    if text.starts_with("--") || text.starts_with("/*") || text.contains(';') {
        return Statement::Unsure;
    }
    let words: Vec<String> = text
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    let Some(first) = words.first() else {
        // An empty query is answered by a server (EmptyQueryResponse), even here.
        return Statement::Unsure;
    };
    let exits = ["rollback", "abort", "commit", "end"];
    if !exits.contains(&first.as_str()) {
        let keyword = first.chars().all(|c| c.is_ascii_alphabetic());
        // Transaction control that is not an exit (PREPARE TRANSACTION, SAVEPOINT...) and
        // anything that is not a plain keyword are left to the server.
        return match keyword && !["prepare", "savepoint", "release"].contains(&first.as_str()) {
            true => Statement::Other,
            false => Statement::Unsure,
        };
    }
    let commit = first == "commit" || first == "end";
    match &words[1..] {
        [] => Statement::EndsBlock { commit },
        [w] if w == "work" || w == "transaction" => Statement::EndsBlock { commit },
        _ => Statement::Unsure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(sql: &str) -> BytesMut {
        let mut b = BytesMut::new();
        messages::query(&mut b, sql);
        b
    }

    fn loss(owed: usize, unsynced: bool, in_block: bool) -> Loss {
        Loss {
            owed,
            unsynced,
            in_block,
        }
    }

    /// The message tags in `out`, in order.
    fn tags(mut out: &[u8]) -> String {
        let mut tags = String::new();
        while let Ok(Some(h)) = Header::parse(out, 1 << 20) {
            tags.push(h.tag as char);
            out = &out[h.frame_len()..];
        }
        tags
    }

    #[test]
    fn in_flight_request_outside_a_block_fails_and_leaves_nothing_owed() {
        let mut out = BytesMut::new();
        let loss = loss(1, false, false);
        assert!(Orphan::on_loss(&mut out, loss, sqlstate::CONNECTION_FAILURE, "reset").is_none());
        assert_eq!(tags(&out), "EZ");
        assert_eq!(*out.last().unwrap(), b'I');
        assert!(out.windows(5).any(|w| w == b"08006"));
    }

    #[test]
    fn a_block_stays_aborted_until_rollback() {
        let mut out = BytesMut::new();
        let loss = loss(2, false, true);
        let mut o =
            Orphan::on_loss(&mut out, loss, sqlstate::CONNECTION_FAILURE, "57P01").expect("owed");
        assert_eq!(tags(&out), "EZEZ");
        assert!(
            out.windows(5).any(|w| w == b"25P02"),
            "second request: 25P02"
        );
        out.clear();
        let mut buf = query("insert into t values (1)");
        assert_eq!(o.answer(&mut buf, 1 << 20, &mut out), Ok(Next::Answered));
        assert!(buf.is_empty());
        assert_eq!(tags(&out), "EZ");
        assert_eq!(*out.last().unwrap(), b'E');
        out.clear();
        let mut buf = query("  Rollback Work ; ");
        assert_eq!(o.answer(&mut buf, 1 << 20, &mut out), Ok(Next::Answered));
        assert_eq!(tags(&out), "CZ");
        assert_eq!(*out.last().unwrap(), b'I');
        assert!(o.done());
    }

    #[test]
    fn the_loss_of_an_idle_transaction_is_told_with_the_next_statement() {
        let mut out = BytesMut::new();
        let loss = loss(0, false, true);
        let mut o = Orphan::on_loss(&mut out, loss, sqlstate::CONNECTION_FAILURE, "terminated")
            .expect("aborted");
        assert!(out.is_empty(), "nothing is said while the client is idle");
        let mut buf = query("select 1");
        o.answer(&mut buf, 1 << 20, &mut out).unwrap();
        assert!(out.windows(5).any(|w| w == b"08006"));
        assert!(String::from_utf8_lossy(&out).contains("terminated"));
        out.clear();
        let mut buf = query("select 2");
        o.answer(&mut buf, 1 << 20, &mut out).unwrap();
        assert!(out.windows(5).any(|w| w == b"25P02"));
    }

    #[test]
    fn an_extended_request_after_an_unseen_loss_is_told_why() {
        let mut out = BytesMut::new();
        let loss = loss(0, false, true);
        let mut o = Orphan::on_loss(&mut out, loss, sqlstate::CONNECTION_FAILURE, "terminated")
            .expect("aborted");
        let mut buf = BytesMut::new();
        messages::frontend_message(&mut buf, frontend::PARSE, |b| {
            b.extend_from_slice(b"\0select 1\0\0\0")
        });
        messages::frontend_message(&mut buf, frontend::SYNC, |_| {});
        assert_eq!(o.answer(&mut buf, 1 << 20, &mut out), Ok(Next::Answered));
        assert_eq!(o.answer(&mut buf, 1 << 20, &mut out), Ok(Next::Answered));
        assert_eq!(tags(&out), "EZ");
        assert!(String::from_utf8_lossy(&out).contains("terminated"));
        assert_eq!(*out.last().unwrap(), b'E');
        // Told: the next extended request goes to a server inside a failed block.
        let mut buf = BytesMut::new();
        messages::frontend_message(&mut buf, frontend::PARSE, |b| {
            b.extend_from_slice(b"\0select 1\0\0\0")
        });
        assert_eq!(o.answer(&mut buf, 1 << 20, &mut out), Ok(Next::NeedServer));
    }

    #[test]
    fn a_refused_request_is_skipped_to_its_end() {
        let mut out = BytesMut::new();
        let mut o = Orphan::refused(None, &mut out, "08001", "query_wait_timeout");
        let mut buf = query("select 1");
        assert_eq!(o.answer(&mut buf, 1 << 20, &mut out), Ok(Next::Answered));
        assert_eq!(tags(&out), "EZ");
        assert_eq!(*out.last().unwrap(), b'I');
        assert!(o.done() && buf.is_empty());

        // Inside a failed block, an extended batch: skipped to its Sync, still aborted.
        out.clear();
        let aborted = Orphan {
            aborted: true,
            ..Orphan::default()
        };
        let mut o = Orphan::refused(Some(aborted), &mut out, "08001", "query_wait_timeout");
        let mut buf = BytesMut::new();
        messages::frontend_message(&mut buf, frontend::BIND, |b| {
            b.extend_from_slice(b"\0\0\0\0\0\0\0\0")
        });
        messages::frontend_message(&mut buf, frontend::SYNC, |_| {});
        while !buf.is_empty() {
            assert_eq!(o.answer(&mut buf, 1 << 20, &mut out), Ok(Next::Answered));
        }
        assert_eq!(tags(&out), "EZ");
        assert_eq!(*out.last().unwrap(), b'E');
        assert!(o.aborted && !o.done());
    }

    #[test]
    fn a_commit_of_a_transaction_lost_unseen_fails() {
        let mut out = BytesMut::new();
        let loss = loss(0, false, true);
        let mut o = Orphan::on_loss(&mut out, loss, sqlstate::CONNECTION_FAILURE, "terminated")
            .expect("aborted");
        let mut buf = query("COMMIT");
        o.answer(&mut buf, 1 << 20, &mut out).unwrap();
        assert_eq!(tags(&out), "EZ");
        assert!(out.windows(5).any(|w| w == b"08006"));
        assert_eq!(*out.last().unwrap(), b'I', "the block is over");
        assert!(o.done());
    }

    #[test]
    fn an_unsynced_batch_is_skipped_to_its_sync() {
        let mut out = BytesMut::new();
        let loss = loss(0, true, false);
        let mut o =
            Orphan::on_loss(&mut out, loss, sqlstate::CONNECTION_FAILURE, "reset").expect("skip");
        assert_eq!(tags(&out), "E");
        out.clear();
        let mut buf = BytesMut::new();
        messages::frontend_message(&mut buf, frontend::EXECUTE, |b| {
            b.extend_from_slice(b"\0\0\0\0\0")
        });
        messages::frontend_message(&mut buf, frontend::SYNC, |_| {});
        assert_eq!(o.answer(&mut buf, 1 << 20, &mut out), Ok(Next::Answered));
        assert!(out.is_empty());
        assert_eq!(o.answer(&mut buf, 1 << 20, &mut out), Ok(Next::Answered));
        assert_eq!(tags(&out), "Z");
        assert_eq!(*out.last().unwrap(), b'I');
        assert!(o.done() && buf.is_empty());
    }

    #[test]
    fn extended_requests_and_unsure_statements_need_a_server() {
        let mut o = Orphan {
            aborted: true,
            ..Orphan::default()
        };
        let mut out = BytesMut::new();
        for sql in [
            "ROLLBACK TO SAVEPOINT a",
            "rollback and chain",
            "commit prepared 'x'",
            "rollback; select 1",
            "/* c */ rollback",
            "savepoint a",
            "",
        ] {
            let mut buf = query(sql);
            assert_eq!(
                o.answer(&mut buf, 1 << 20, &mut out),
                Ok(Next::NeedServer),
                "{sql:?}"
            );
            assert!(!buf.is_empty());
        }
        let mut buf = BytesMut::new();
        messages::frontend_message(&mut buf, frontend::PARSE, |b| {
            b.extend_from_slice(b"\0ROLLBACK\0\0\0")
        });
        assert_eq!(o.answer(&mut buf, 1 << 20, &mut out), Ok(Next::NeedServer));
        assert!(out.is_empty());
        for (sql, commit) in [
            ("end", true),
            ("ABORT", false),
            ("commit transaction", true),
            ("rollback;", false),
        ] {
            assert_eq!(
                classify(sql.as_bytes()),
                Statement::EndsBlock { commit },
                "{sql}"
            );
        }
        assert_eq!(classify(b"select 1"), Statement::Other);
    }
}
