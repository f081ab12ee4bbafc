//! What a server connection owes: the one queue of expected responses, and its state.
//!
//! Every message sent to a server that the server answers pushes what it will answer, in
//! order; every answer pops it. Query and FunctionCall are answered by everything up to one
//! ReadyForQuery, Sync by one ReadyForQuery, and each extended-protocol message by its own
//! completion message, so the same queue tells the relay when a server has said all it owes
//! and tells prepared-statement rewriting which answers to hide or make up.
//!
//! The protocol's exceptions are handled here and nowhere else: after an error in an
//! extended-protocol batch the server discards messages up to the next Sync, and Syncs that
//! reach a server in COPY FROM STDIN started by an extended-protocol Execute are ignored.
//!
//! [`Exchange::disposition`] is the one decision about a linked server: keep it, release it
//! to the pool (provably clean: ReadyForQuery 'I', nothing owed, no COPY, nothing it could not
//! account for), or close it. Anything the bookkeeping cannot account for taints the
//! connection, and a tainted connection is closed, never repaired.

use std::collections::VecDeque;

use bytes::Bytes;

use super::messages::{backend, frontend, TxStatus};

/// One expected answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owed {
    /// ParseComplete. `hide` when iampool injected the Parse. `undo` is the server statement
    /// name to forget (and the client name, if any) should the Parse fail.
    Parse {
        hide: bool,
        undo: Option<(Bytes, Option<Bytes>)>,
    },
    /// BindComplete.
    Bind,
    /// ParameterDescription (statements only), then RowDescription or NoData.
    Describe,
    /// DataRow* then CommandComplete, EmptyQueryResponse or PortalSuspended (or a COPY).
    Execute,
    /// CloseComplete; `hide` when iampool injected the Close.
    Close { hide: bool },
    /// ReadyForQuery closing an extended-protocol batch.
    Sync,
    /// Query or FunctionCall: everything up to ReadyForQuery.
    Simple,
    /// Answers iampool makes up itself, written when they reach the front of the queue.
    Made(Made),
}

/// An answer iampool makes up instead of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    /// ParseComplete for a statement the server already has under its shared name.
    ParseComplete,
    /// CloseComplete for a client's Close of a shared statement (it stays on the server).
    CloseComplete,
    /// CommandComplete(tag) + ReadyForQuery for a simple Query answered locally.
    Query(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copy {
    None,
    In,
    Out,
    Both,
}

/// What a client message is to the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMsg {
    Forward,
    /// Terminate: the client is leaving; never forwarded.
    Terminate,
    /// Not a message a client may send after startup.
    Invalid,
}

/// What to do with a server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Forward,
    /// The answer to something iampool injected: the client never sees it.
    Hide,
}

/// The one decision about a linked server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Answers are owed, or a transaction or COPY is open: the client keeps the server.
    Busy,
    /// Provably clean: it may serve another client.
    Clean,
    /// At rest but not provably clean (tainted, or left inside a transaction): close it.
    Close,
}

/// A server connection's protocol state, seen from the relay.
#[derive(Debug, Clone)]
pub struct Exchange {
    owed: VecDeque<Owed>,
    /// ReadyForQuery messages owed (the `Simple` and `Sync` entries in `owed`).
    readies: usize,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// After an error in an extended batch the server discards messages up to the next Sync.
    skipping: bool,
    /// An Execute was sent and no CopyDone/CopyFail since: Syncs in between are swallowed
    /// if the Execute turns out to start a COPY FROM STDIN.
    exec_open: bool,
    exec_syncs: usize,
    /// The server is in an extended-protocol COPY FROM STDIN and ignores Syncs.
    ignore_syncs: bool,
    copy: Copy,
    status: TxStatus,
    tainted: bool,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
            owed: VecDeque::with_capacity(8),
            readies: 0,
            unsynced: false,
            skipping: false,
            exec_open: false,
            exec_syncs: 0,
            ignore_syncs: false,
            copy: Copy::None,
            status: TxStatus::Idle,
            tainted: false,
        }
    }
}

impl Exchange {
    /// A client message (by tag) is about to go to the server as it is. Messages that name
    /// statements and are rewritten are accounted with [`Exchange::expect`] instead.
    #[inline]
    pub fn on_client(&mut self, tag: u8) -> ClientMsg {
        match tag {
            frontend::QUERY | frontend::FUNCTION_CALL => self.push_ready(Owed::Simple),
            frontend::SYNC => {
                self.unsynced = false;
                if !self.ignore_syncs {
                    self.skipping = false;
                    self.push_ready(Owed::Sync);
                    if self.exec_open {
                        self.exec_syncs += 1;
                    }
                }
            }
            // Each extended-protocol message is owed its own answer (`expect` also marks the
            // batch unsynced).
            frontend::EXECUTE => {
                self.exec_open = true;
                self.exec_syncs = 0;
                self.expect(Owed::Execute);
            }
            frontend::PARSE => self.expect(Owed::Parse {
                hide: false,
                undo: None,
            }),
            frontend::BIND => self.expect(Owed::Bind),
            frontend::DESCRIBE => self.expect(Owed::Describe),
            frontend::CLOSE => self.expect(Owed::Close { hide: false }),
            frontend::FLUSH => self.unsynced = true,
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

    /// Records an extended-protocol answer owed for a message iampool sends (rewritten or
    /// injected), unless the server is discarding messages up to the next Sync.
    #[inline]
    pub fn expect(&mut self, owed: Owed) {
        self.unsynced = true;
        if !self.skipping {
            self.owed.push_back(owed);
        }
    }

    /// Like [`Exchange::expect`], but ahead of the last entry (an injected Parse or Close
    /// that must be answered before the message that caused it).
    pub fn expect_before_last(&mut self, owed: Owed) {
        self.unsynced = true;
        if self.skipping {
            return;
        }
        let at = self.owed.len().saturating_sub(1);
        self.owed.insert(at, owed);
    }

    /// An answer iampool makes up, due in order after everything before it. Made-up
    /// extended-protocol answers are, like real ones, discarded while the server skips to
    /// the next Sync.
    pub fn expect_made(&mut self, made: Made) {
        if !matches!(made, Made::Query(_)) {
            self.unsynced = true;
            if self.skipping {
                return;
            }
        }
        self.owed.push_back(Owed::Made(made));
    }

    fn push_ready(&mut self, owed: Owed) {
        self.readies += 1;
        self.owed.push_back(owed);
    }

    /// True while the server discards messages up to the next Sync (after an error).
    #[inline]
    pub fn skipping(&self) -> bool {
        self.skipping
    }

    /// Marks the server as not reusable: its state is no longer known for certain.
    pub fn taint(&mut self) {
        self.tainted = true;
    }

    #[cfg(test)]
    fn tainted(&self) -> bool {
        self.tainted
    }

    /// A server message (complete header; `status` is the ReadyForQuery byte if it is one).
    /// `undo` receives a failed Parse's statement names so the caller can forget them.
    #[inline]
    pub fn on_server(
        &mut self,
        tag: u8,
        status: Option<TxStatus>,
        undo: &mut dyn FnMut(Bytes, Option<Bytes>),
    ) -> Answer {
        match tag {
            backend::READY_FOR_QUERY => {
                self.on_ready(status.unwrap_or(TxStatus::Failed));
                Answer::Forward
            }
            // Asynchronous messages answer nothing.
            backend::NOTICE_RESPONSE
            | backend::PARAMETER_STATUS
            | backend::NOTIFICATION_RESPONSE => Answer::Forward,
            backend::ERROR_RESPONSE => {
                self.on_error(undo);
                Answer::Forward
            }
            backend::COPY_IN_RESPONSE => {
                self.on_copy_in();
                Answer::Forward
            }
            backend::COPY_OUT_RESPONSE => {
                self.copy = Copy::Out;
                Answer::Forward
            }
            backend::COPY_BOTH_RESPONSE => {
                self.copy = Copy::Both;
                self.tainted = true;
                Answer::Forward
            }
            backend::COPY_DONE if self.copy == Copy::Out => {
                self.copy = Copy::None;
                Answer::Forward
            }
            tag => self.on_completion(tag),
        }
    }

    /// A completion message for the extended-protocol entry at the front.
    #[inline]
    fn on_completion(&mut self, tag: u8) -> Answer {
        let Some(front) = self.owed.front() else {
            return Answer::Forward;
        };
        let (done, hide) = match (front, tag) {
            (Owed::Parse { hide, .. }, backend::PARSE_COMPLETE) => (true, *hide),
            (Owed::Close { hide }, backend::CLOSE_COMPLETE) => (true, *hide),
            (Owed::Bind, backend::BIND_COMPLETE) => (true, false),
            (Owed::Describe, backend::ROW_DESCRIPTION | backend::NO_DATA) => (true, false),
            (
                Owed::Execute,
                backend::COMMAND_COMPLETE
                | backend::EMPTY_QUERY_RESPONSE
                | backend::PORTAL_SUSPENDED,
            ) => (true, false),
            _ => (false, false),
        };
        if done {
            self.owed.pop_front();
        }
        if hide {
            Answer::Hide
        } else {
            Answer::Forward
        }
    }

    /// The Parse at the front completed: its statement name, if it was one iampool named.
    pub fn completed_parse(&self) -> Option<&Bytes> {
        match self.owed.front() {
            Some(Owed::Parse {
                undo: Some((global, _)),
                ..
            }) => Some(global),
            _ => None,
        }
    }

    fn on_ready(&mut self, status: TxStatus) {
        self.status = status;
        // Everything before the first ReadyForQuery owed should have been answered.
        loop {
            match self.owed.pop_front() {
                Some(Owed::Simple | Owed::Sync) => {
                    self.readies -= 1;
                    break;
                }
                Some(_) => self.tainted = true,
                None => {
                    self.tainted = true;
                    break;
                }
            }
        }
        self.skipping = false;
        if self.readies == 0 {
            self.copy = Copy::None;
            self.ignore_syncs = false;
        }
    }

    fn on_error(&mut self, undo: &mut dyn FnMut(Bytes, Option<Bytes>)) {
        if self.ignore_syncs {
            // The COPY ended and the server now skips to the next Sync; the Syncs it swallowed
            // no longer provably match.
            self.tainted = true;
        }
        if matches!(self.owed.front(), Some(Owed::Simple) | None) {
            return;
        }
        // An extended-protocol error: the server discards everything up to the next Sync.
        while let Some(e) = self.owed.front() {
            if matches!(e, Owed::Sync | Owed::Simple) {
                break;
            }
            if let Some(Owed::Parse {
                undo: Some((global, client)),
                ..
            }) = self.owed.pop_front()
            {
                undo(global, client);
            }
        }
        if self.owed.is_empty() {
            self.skipping = true;
        }
    }

    fn on_copy_in(&mut self) {
        self.copy = Copy::In;
        if matches!(self.owed.front(), Some(Owed::Execute)) {
            // Started by an extended-protocol Execute: the Syncs sent after it are swallowed.
            for _ in 0..self.exec_syncs {
                match self.owed.iter().rposition(|e| *e == Owed::Sync) {
                    Some(i) => {
                        self.owed.remove(i);
                        self.readies -= 1;
                    }
                    None => self.tainted = true,
                }
            }
            self.exec_syncs = 0;
            self.ignore_syncs = self.exec_open;
        }
    }

    /// The made-up answer at the front, if that is what is due next.
    #[inline]
    pub fn take_made(&mut self) -> Option<Made> {
        match self.owed.front() {
            Some(Owed::Made(m)) => {
                let m = *m;
                self.owed.pop_front();
                Some(m)
            }
            _ => None,
        }
    }

    /// Nothing is owed (the server may still be inside a transaction).
    #[inline]
    pub fn is_quiet(&self) -> bool {
        self.owed.is_empty() && !self.unsynced && self.copy == Copy::None
    }

    /// Nothing owed and no transaction open: the client's request cycle is over.
    #[inline]
    pub fn at_rest(&self) -> bool {
        self.status == TxStatus::Idle && self.is_quiet()
    }

    /// The one decision about a linked server (see the module documentation).
    #[inline]
    pub fn disposition(&self) -> Disposition {
        if !self.is_quiet() {
            return Disposition::Busy;
        }
        match self.status {
            TxStatus::Idle if !self.tainted => Disposition::Clean,
            TxStatus::Idle => Disposition::Close,
            _ => Disposition::Busy,
        }
    }

    pub fn status(&self) -> TxStatus {
        self.status
    }

    /// ReadyForQuery messages owed: the client's requests (a Query, or a batch up to its
    /// Sync) that are not yet answered in full.
    pub fn readies_owed(&self) -> usize {
        self.readies
    }

    /// Extended-protocol messages were sent since the last Sync: their answer (or error) is
    /// owed when the client's Sync comes.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// A COPY is in progress in either direction.
    pub fn in_copy(&self) -> bool {
        self.copy != Copy::None
    }

    /// The server was put inside a failed transaction block on the client's behalf (it
    /// answers ReadyForQuery 'E' until the client rolls back): it stays with the client.
    pub fn enter_failed_block(&mut self) {
        self.reset();
        self.status = TxStatus::Failed;
    }

    /// How many entries are owed.
    #[cfg(test)]
    fn owed(&self) -> usize {
        self.owed.len()
    }

    /// Forgets everything: the server starts from a clean slate (after a reset query).
    pub fn reset(&mut self) {
        self.owed.clear();
        self.readies = 0;
        self.unsynced = false;
        self.skipping = false;
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

    fn send(x: &mut Exchange, tags: &[u8]) {
        for &t in tags {
            assert_eq!(x.on_client(t), ClientMsg::Forward);
        }
    }

    fn recv(x: &mut Exchange, tags: &[u8]) -> Vec<Answer> {
        tags.iter()
            .map(|&t| {
                let status = (t == b'Z').then_some(Idle);
                x.on_server(t, status, &mut |_, _| {})
            })
            .collect()
    }

    fn ready(x: &mut Exchange, s: TxStatus) {
        x.on_server(b'Z', Some(s), &mut |_, _| {});
    }

    #[test]
    fn simple_query_cycle() {
        let mut x = Exchange::default();
        send(&mut x, b"Q");
        assert_eq!(x.disposition(), Disposition::Busy);
        recv(&mut x, b"TDC");
        ready(&mut x, Idle);
        assert_eq!(x.disposition(), Disposition::Clean);
    }

    #[test]
    fn transaction_holds_until_idle() {
        let mut x = Exchange::default();
        send(&mut x, b"Q");
        ready(&mut x, InTransaction);
        assert_eq!(x.disposition(), Disposition::Busy);
        assert!(x.is_quiet());
        send(&mut x, b"Q");
        ready(&mut x, Idle);
        assert_eq!(x.disposition(), Disposition::Clean);
    }

    #[test]
    fn pipelined_extended_batches() {
        let mut x = Exchange::default();
        send(&mut x, b"PBDES");
        send(&mut x, b"BES");
        recv(&mut x, b"12nCZ");
        assert_eq!(x.disposition(), Disposition::Busy, "second Sync still owed");
        recv(&mut x, b"2CZ");
        assert_eq!(x.disposition(), Disposition::Clean);
        assert_eq!(x.owed(), 0);
    }

    #[test]
    fn unsynced_messages_keep_the_server() {
        let mut x = Exchange::default();
        send(&mut x, b"PBEH");
        recv(&mut x, b"12C");
        assert_eq!(x.disposition(), Disposition::Busy);
        send(&mut x, b"S");
        recv(&mut x, b"Z");
        assert_eq!(x.disposition(), Disposition::Clean);
    }

    #[test]
    fn error_skips_to_sync() {
        let mut x = Exchange::default();
        let mut undone = 0;
        x.expect(Owed::Parse {
            hide: false,
            undo: Some((Bytes::from_static(b"g"), None)),
        });
        send(&mut x, b"BE");
        x.on_server(b'E', None, &mut |_, _| undone += 1);
        assert_eq!(undone, 1);
        assert!(
            x.skipping(),
            "no Sync sent yet: later messages are discarded"
        );
        send(&mut x, b"BES");
        assert_eq!(x.owed(), 1, "only the Sync is owed");
        ready(&mut x, Idle);
        assert_eq!(x.disposition(), Disposition::Clean);
    }

    #[test]
    fn extended_copy_in_swallows_syncs() {
        // libpq: Parse/Bind/Execute/Sync, then CopyData.., CopyDone, Sync: one ReadyForQuery.
        let mut x = Exchange::default();
        send(&mut x, b"PBES");
        recv(&mut x, b"12G");
        send(&mut x, b"dddcS");
        recv(&mut x, b"C");
        assert_eq!(x.disposition(), Disposition::Busy);
        ready(&mut x, Idle);
        assert_eq!(x.disposition(), Disposition::Clean);
    }

    #[test]
    fn simple_copy_in_and_out() {
        let mut x = Exchange::default();
        send(&mut x, b"Q");
        recv(&mut x, b"G");
        send(&mut x, b"ddc");
        recv(&mut x, b"CZ");
        assert_eq!(x.disposition(), Disposition::Clean);
        send(&mut x, b"Q");
        recv(&mut x, b"Hd");
        assert_eq!(x.disposition(), Disposition::Busy);
        recv(&mut x, b"cCZ");
        assert_eq!(x.disposition(), Disposition::Clean);
    }

    #[test]
    fn hidden_and_made_answers() {
        let mut x = Exchange::default();
        send(&mut x, b"B");
        x.expect_before_last(Owed::Parse {
            hide: true,
            undo: None,
        });
        x.expect_made(Made::ParseComplete);
        send(&mut x, b"S");
        assert_eq!(recv(&mut x, b"12"), [Answer::Hide, Answer::Forward]);
        assert_eq!(x.take_made(), Some(Made::ParseComplete));
        assert_eq!(x.take_made(), None);
        ready(&mut x, Idle);
        assert_eq!(x.disposition(), Disposition::Clean);
    }

    #[test]
    fn unexpected_ready_taints() {
        let mut x = Exchange::default();
        ready(&mut x, Idle);
        assert!(x.tainted());
        assert_eq!(x.disposition(), Disposition::Close);
    }

    #[test]
    fn left_in_transaction_is_busy_then_closed_by_caller() {
        let mut x = Exchange::default();
        send(&mut x, b"Q");
        ready(&mut x, InTransaction);
        assert_eq!(x.disposition(), Disposition::Busy);
        x.reset();
        assert_eq!(x.disposition(), Disposition::Clean);
    }

    #[test]
    fn terminate_and_invalid() {
        let mut x = Exchange::default();
        assert_eq!(x.on_client(b'X'), ClientMsg::Terminate);
        assert_eq!(x.on_client(b'p'), ClientMsg::Invalid);
        assert_eq!(x.on_client(0), ClientMsg::Invalid);
    }
}
