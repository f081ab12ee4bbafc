//! The request cycle: what a linked server still owes the client.
//!
//! Every Query, FunctionCall and Sync the client sends is answered by exactly one
//! ReadyForQuery, with one exception the protocol defines: Syncs that reach the server while
//! it is in COPY FROM STDIN started by an extended-protocol Execute are ignored. A server is
//! *clean* only when it reported 'I', nothing it owes is outstanding, no extended-protocol
//! message is waiting for its Sync, and no COPY is in progress. When the bookkeeping sees
//! anything it cannot account for, the connection is tainted and will be closed rather than
//! reused.

use std::collections::VecDeque;

use crate::protocol::messages::{backend, frontend, TxStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Req {
    /// Query or FunctionCall.
    Simple,
    /// Sync closing an extended-protocol batch.
    Extended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copy {
    None,
    In,
    Out,
    Both,
}

/// What the relay should do with a client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMsg {
    Forward,
    /// Terminate: the client is leaving; never forwarded.
    Terminate,
    /// Not a message a client may send after startup.
    Invalid,
}

#[derive(Debug)]
pub struct Cycle {
    pending: VecDeque<Req>,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// An Execute was sent and no CopyDone/CopyFail since: Syncs in between may be swallowed
    /// by an extended-protocol COPY FROM STDIN.
    exec_open: bool,
    exec_syncs: usize,
    /// The server is in an extended-protocol COPY FROM STDIN and ignores Syncs.
    ignore_syncs: bool,
    copy: Copy,
    status: TxStatus,
    tainted: bool,
}

impl Default for Cycle {
    fn default() -> Self {
        Cycle {
            pending: VecDeque::with_capacity(16),
            unsynced: false,
            exec_open: false,
            exec_syncs: 0,
            ignore_syncs: false,
            copy: Copy::None,
            status: TxStatus::Idle,
            tainted: false,
        }
    }
}

impl Cycle {
    /// A client message is about to go to the server.
    #[inline]
    pub fn on_client(&mut self, tag: u8) -> ClientMsg {
        match tag {
            frontend::QUERY | frontend::FUNCTION_CALL => self.pending.push_back(Req::Simple),
            frontend::SYNC => {
                self.unsynced = false;
                if !self.ignore_syncs {
                    self.pending.push_back(Req::Extended);
                    if self.exec_open {
                        self.exec_syncs += 1;
                    }
                }
            }
            frontend::EXECUTE => {
                self.unsynced = true;
                self.exec_open = true;
                self.exec_syncs = 0;
            }
            frontend::PARSE
            | frontend::BIND
            | frontend::DESCRIBE
            | frontend::CLOSE
            | frontend::FLUSH => self.unsynced = true,
            frontend::COPY_DATA => {}
            frontend::COPY_DONE | frontend::COPY_FAIL => {
                self.exec_open = false;
                self.ignore_syncs = false;
                if self.copy == Copy::In {
                    self.copy = Copy::None;
                }
            }
            frontend::TERMINATE => return ClientMsg::Terminate,
            _ => return ClientMsg::Invalid,
        }
        ClientMsg::Forward
    }

    /// True when the server is ignoring Syncs (extended-protocol COPY FROM STDIN).
    #[inline]
    pub fn ignoring_syncs(&self) -> bool {
        self.ignore_syncs
    }

    /// Marks the server as not reusable (its state is no longer known for certain).
    pub fn taint(&mut self) {
        self.tainted = true;
    }

    /// A server message tag (other than ReadyForQuery) passed to the client. Returns how
    /// many already-sent Syncs the server will swallow (extended-protocol COPY FROM STDIN).
    #[inline]
    pub fn on_server(&mut self, tag: u8) -> usize {
        let mut swallowed = 0;
        match tag {
            backend::COPY_IN_RESPONSE => {
                self.copy = Copy::In;
                if self.pending.front() == Some(&Req::Extended) {
                    // The Syncs sent after the Execute that started this COPY are swallowed.
                    for _ in 0..self.exec_syncs {
                        if self.pending.pop_back() != Some(Req::Extended) {
                            self.tainted = true;
                        }
                    }
                    swallowed = self.exec_syncs;
                    self.exec_syncs = 0;
                    self.ignore_syncs = self.exec_open;
                }
            }
            backend::COPY_OUT_RESPONSE => self.copy = Copy::Out,
            backend::COPY_BOTH_RESPONSE => {
                self.copy = Copy::Both;
                self.tainted = true;
            }
            backend::COPY_DONE if self.copy == Copy::Out => self.copy = Copy::None,
            _ => {}
        }
        swallowed
    }

    /// A ReadyForQuery passed to the client.
    #[inline]
    pub fn on_ready(&mut self, status: TxStatus) {
        self.status = status;
        if self.pending.pop_front().is_none() {
            self.tainted = true;
        }
        if self.pending.is_empty() {
            self.copy = Copy::None;
            self.ignore_syncs = false;
        }
    }

    /// An error the server sent while it was ignoring Syncs means the COPY ended and the
    /// server now skips to the next Sync: the bookkeeping no longer provably matches.
    #[inline]
    pub fn on_error(&mut self) {
        if self.ignore_syncs {
            self.tainted = true;
        }
    }

    /// Nothing owed, transaction idle: the client's request cycle is over and the server can
    /// leave it. Whether the server may then serve someone else is [`Cycle::is_clean`].
    #[inline]
    pub fn at_rest(&self) -> bool {
        self.status == TxStatus::Idle
            && self.pending.is_empty()
            && !self.unsynced
            && self.copy == Copy::None
    }

    /// At rest and nothing unaccounted for: the server may serve another client.
    #[inline]
    pub fn is_clean(&self) -> bool {
        self.at_rest() && !self.tainted
    }

    /// No answers outstanding (the server may still be inside a transaction).
    #[inline]
    pub fn is_quiet(&self) -> bool {
        self.pending.is_empty() && !self.unsynced && self.copy == Copy::None
    }

    pub fn status(&self) -> TxStatus {
        self.status
    }

    pub fn tainted(&self) -> bool {
        self.tainted
    }

    /// A new server starts from a clean slate.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.unsynced = false;
        self.exec_open = false;
        self.exec_syncs = 0;
        self.ignore_syncs = false;
        self.copy = Copy::None;
        self.status = TxStatus::Idle;
        self.tainted = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TxStatus::*;

    fn send(c: &mut Cycle, tags: &[u8]) {
        for &t in tags {
            assert_eq!(c.on_client(t), ClientMsg::Forward);
        }
    }

    #[test]
    fn simple_query_cycle() {
        let mut c = Cycle::default();
        send(&mut c, b"Q");
        assert!(!c.is_clean());
        c.on_server(b'T');
        c.on_ready(Idle);
        assert!(c.is_clean());
    }

    #[test]
    fn transaction_holds_until_idle() {
        let mut c = Cycle::default();
        send(&mut c, b"Q");
        c.on_ready(InTransaction);
        assert!(!c.is_clean());
        assert!(c.is_quiet());
        send(&mut c, b"Q");
        c.on_ready(Idle);
        assert!(c.is_clean());
    }

    #[test]
    fn pipelined_extended_batches() {
        let mut c = Cycle::default();
        send(&mut c, b"PBDES");
        send(&mut c, b"BES");
        c.on_ready(Idle);
        assert!(!c.is_clean(), "second Sync still owed");
        c.on_ready(Idle);
        assert!(c.is_clean());
    }

    #[test]
    fn unsynced_messages_keep_the_server() {
        let mut c = Cycle::default();
        send(&mut c, b"PBEH");
        assert!(!c.is_clean());
        send(&mut c, b"S");
        c.on_ready(Idle);
        assert!(c.is_clean());
    }

    #[test]
    fn extended_copy_in_swallows_syncs() {
        // libpq: Parse/Bind/Execute/Sync, then CopyData.., CopyDone, Sync: one ReadyForQuery.
        let mut c = Cycle::default();
        send(&mut c, b"PBES");
        c.on_server(backend::COPY_IN_RESPONSE);
        send(&mut c, b"dddcS");
        c.on_server(b'C');
        assert!(!c.is_clean());
        c.on_ready(Idle);
        assert!(c.is_clean());
    }

    #[test]
    fn simple_copy_in_and_out() {
        let mut c = Cycle::default();
        send(&mut c, b"Q");
        c.on_server(backend::COPY_IN_RESPONSE);
        send(&mut c, b"ddc");
        c.on_ready(Idle);
        assert!(c.is_clean());
        send(&mut c, b"Q");
        c.on_server(backend::COPY_OUT_RESPONSE);
        c.on_server(backend::COPY_DATA);
        assert!(!c.is_clean());
        c.on_server(backend::COPY_DONE);
        c.on_ready(Idle);
        assert!(c.is_clean());
    }

    #[test]
    fn unexpected_ready_taints() {
        let mut c = Cycle::default();
        c.on_ready(Idle);
        assert!(c.tainted());
        assert!(!c.is_clean());
    }

    #[test]
    fn terminate_and_invalid() {
        let mut c = Cycle::default();
        assert_eq!(c.on_client(b'X'), ClientMsg::Terminate);
        assert_eq!(c.on_client(b'p'), ClientMsg::Invalid);
        assert_eq!(c.on_client(0), ClientMsg::Invalid);
    }
}
