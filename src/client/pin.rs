//! One transaction-mode client's pin: whether it keeps its server between transactions
//! because of session state that no other server could carry, and why (no I/O).
//!
//! A statement that creates such state (see [`session_state::kind`]) takes one of the pool's
//! pin slots before it goes to the server, or is refused when none is free: its text is
//! overwritten with a word the server rejects as a syntax error, so PostgreSQL itself fails
//! the request (and the transaction, as an error would), and the scanner puts iampool's
//! error in place of the server's. Whether the state is really there, and later whether it
//! is gone, is asked of the server (one query) at the end of the transaction that created
//! it and after each statement that may remove it; the pin ends when nothing is left.
//!
//! [`session_state::kind`]: crate::protocol::session_state::kind

use std::collections::VecDeque;
use std::sync::Arc;

use crate::pool::PinLimit;
use crate::protocol::messages::{sqlstate, ErrorFields};

/// Written over the start of a refused statement: the server's syntax error names it.
pub const REFUSED_WORD: &[u8] = b"iampool ";

/// Written over every byte of the statement name of a refused Bind: the server's "does not
/// exist" error names it.
pub const REFUSED_NAME_BYTE: u8 = b'~';

/// SQLSTATE of a Bind of a statement that does not exist.
const UNDEFINED_STATEMENT: &str = "26000";

/// Asked of an idle server: which kinds of session state it holds for its client, one
/// boolean per bit of [`crate::protocol::session_state::KINDS`] (listen, sql_prepare,
/// temp_table, advisory_lock, with_hold_cursor). Advisory locks held at idle are session
/// locks (transaction locks end with the transaction).
pub const PROBE_SQL: &str = "SELECT \
    EXISTS (SELECT FROM pg_catalog.pg_listening_channels()), \
    EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql), \
    EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()), \
    EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
        AND pid = pg_catalog.pg_backend_pid()), \
    EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable)";

#[derive(Debug, Default)]
pub struct Pin {
    /// The pool's slots; None when pinning is off (session mode, `session_state = warn`).
    limit: Option<Arc<PinLimit>>,
    /// This client holds one of the slots: it keeps its server.
    held: bool,
    /// What the last probe found (bits over KINDS).
    reasons: u8,
    /// Something may have created or removed state since the last probe.
    probe_due: bool,
    /// Refused statements in flight, oldest first: the number of the request each is in,
    /// and the server's error for it (SQLSTATE, and text its message contains), which is to
    /// be replaced.
    refusing: VecDeque<(u64, &'static str, String)>,
}

impl Pin {
    pub fn new(limit: Option<Arc<PinLimit>>) -> Pin {
        Pin {
            limit,
            held: false,
            reasons: 0,
            probe_due: false,
            refusing: VecDeque::new(),
        }
    }

    /// Whether pinning is on for this client.
    pub fn enabled(&self) -> bool {
        self.limit.is_some()
    }

    /// The pool whose slots count this client (the pool of the server it links), while it
    /// holds none.
    pub fn use_limit(&mut self, limit: &Arc<PinLimit>) {
        if !self.held && self.limit.is_some() {
            self.limit = Some(limit.clone());
        }
    }

    /// A statement that creates session state is about to go to the server. False: no slot
    /// is free, and the statement is to be refused (see [`Pin::refuse_statement`] and
    /// [`Pin::refuse_bind`]).
    pub fn on_creating(&mut self) -> bool {
        let Some(limit) = &self.limit else {
            return true;
        };
        if !self.held {
            if !limit.try_take() {
                return false;
            }
            self.held = true;
        }
        self.probe_due = true;
        true
    }

    /// Overwrites the start of a refused statement's text (at least [`REFUSED_WORD`] long,
    /// its NUL included) so that the server fails it with a syntax error.
    /// `request` is the number of the request it is part of.
    pub fn refuse_statement(&mut self, request: u64, text: &mut [u8]) {
        if text.len() > REFUSED_WORD.len() {
            text[..REFUSED_WORD.len()].copy_from_slice(REFUSED_WORD);
            let word = std::str::from_utf8(REFUSED_WORD).unwrap_or_default().trim();
            self.refusing
                .push_back((request, sqlstate::SYNTAX_ERROR, format!("\"{word}\"")));
        }
    }

    /// Overwrites the statement name of a refused Bind (not empty) so that the server fails
    /// it: no such statement.
    pub fn refuse_bind(&mut self, request: u64, name: &mut [u8]) {
        if name.is_empty() {
            return;
        }
        name.fill(REFUSED_NAME_BYTE);
        let name = String::from_utf8_lossy(name);
        self.refusing
            .push_back((request, UNDEFINED_STATEMENT, format!("\"{name}\"")));
    }

    /// A statement that may remove session state is about to go to the server.
    pub fn on_may_drop(&mut self) {
        if self.held {
            self.probe_due = true;
        }
    }

    /// The client keeps its server.
    pub fn pinned(&self) -> bool {
        self.held
    }

    /// The server is to be asked what is left before it may leave the client.
    pub fn probe_due(&self) -> bool {
        self.held && self.probe_due
    }

    /// What the last probe found.
    pub fn reasons(&self) -> u8 {
        self.reasons
    }

    /// The server's answer to [`PROBE_SQL`]: whether the client is still pinned.
    pub fn probed(&mut self, reasons: u8) -> bool {
        self.probe_due = false;
        self.reasons = reasons;
        if reasons == 0 {
            self.unpin();
        }
        self.held
    }

    /// The state went with the server (lost, or reset when the client left).
    pub fn unpin(&mut self) {
        if std::mem::take(&mut self.held) {
            if let Some(l) = &self.limit {
                l.give_back();
            }
        }
        self.reasons = 0;
        self.probe_due = false;
    }

    /// An ErrorResponse from the server: when it is the syntax error of a refused
    /// statement, the error the client gets instead.
    pub fn replacement(&mut self, fields: &ErrorFields) -> Option<String> {
        let (_, code, needle) = self.refusing.front()?;
        if fields.code != *code || !fields.message.contains(needle.as_str()) {
            return None;
        }
        self.refusing.pop_front();
        let max = self.limit.as_ref().map_or(0, |l| l.max());
        Some(format!(
            "this statement would pin the client to its server connection (it creates session \
             state that transaction mode cannot move between servers), and {max} of this \
             pool's servers are pinned already (max_pinned_servers); end that state on another \
             client (DISCARD ALL, or close it), raise max_pinned_servers, or use session mode \
             for this client"
        ))
    }

    /// Request number `answered` is answered (ReadyForQuery): a refusal in it that the
    /// server did not fail (skipped after an earlier error) is over.
    pub fn request_answered(&mut self, answered: u64) {
        while self
            .refusing
            .front()
            .is_some_and(|(r, _, _)| *r <= answered)
        {
            self.refusing.pop_front();
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.unpin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax_error() -> ErrorFields {
        ErrorFields {
            code: sqlstate::SYNTAX_ERROR.into(),
            message: "syntax error at or near \"iampool\"".into(),
            ..ErrorFields::default()
        }
    }

    #[test]
    fn a_pin_holds_a_slot_until_the_state_is_gone() {
        let limit = Arc::new(PinLimit::new(1));
        let mut a = Pin::new(Some(limit.clone()));
        let mut b = Pin::new(Some(limit.clone()));
        assert!(a.on_creating());
        assert!(a.pinned() && a.probe_due());
        assert!(!b.on_creating(), "the one slot is a's");
        let mut text = *b"LISTEN x\0";
        b.refuse_statement(0, &mut text);
        assert_eq!(&text, b"iampool \0");
        assert!(b.replacement(&syntax_error()).is_some());
        assert!(b.replacement(&syntax_error()).is_none(), "replaced once");
        assert!(a.probed(0b100));
        assert!(!a.probe_due());
        a.on_may_drop();
        assert!(!a.probed(0), "nothing left: unpinned");
        assert_eq!(limit.pinned(), 0);
        assert!(b.on_creating());
        drop(b);
        assert_eq!(
            limit.pinned(),
            0,
            "a client that leaves gives its slot back"
        );
    }

    #[test]
    fn off_means_never_pinned() {
        let mut p = Pin::new(None);
        assert!(p.on_creating());
        assert!(!p.pinned() && !p.probe_due());
        let other = ErrorFields {
            code: "42P01".into(),
            ..ErrorFields::default()
        };
        let mut q = Pin::new(Some(Arc::new(PinLimit::new(0))));
        assert!(!q.on_creating());
        let mut name = *b"s1";
        q.refuse_bind(0, &mut name);
        assert_eq!(&name, b"~~");
        assert!(
            q.replacement(&other).is_none(),
            "only the refusal's own error"
        );
        let missing = ErrorFields {
            code: "26000".into(),
            message: "prepared statement \"~~\" does not exist".into(),
            ..ErrorFields::default()
        };
        // Pipelined: the refusal is in request 3; the answer to request 2 leaves it pending.
        let mut name = *b"s1";
        q.refuse_bind(3, &mut name);
        q.request_answered(2);
        assert!(q.replacement(&missing).is_some());
        q.refuse_bind(4, &mut name);
        q.request_answered(4);
        assert!(q.replacement(&missing).is_none(), "request 4 is over");
    }
}
