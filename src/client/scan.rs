//! The relay's protocol core, without I/O: walks the bytes each side sent, in place, and
//! decides what goes on unchanged, what is rewritten, hidden or made up, and what the linked
//! server now owes ([`Exchange`]).
//!
//! The relay reads into the two [`Half`] buffers and calls [`Scan::client`] or
//! [`Scan::server`]; afterwards `Half::ready` bytes (and `Half::out`) are due to the other
//! side. The benches and fuzz targets drive the same functions over byte streams split at
//! arbitrary points.

use bytes::Bytes;

use super::half::Half;
use super::pin::Pin;
use super::prepared::{
    drops_statements, names_statement, write_made, ClientAction, QueryAction, Staging, Tracker,
};
use crate::protocol::exchange::{Answer, ClientMsg, Exchange, Made};
use crate::protocol::framing::{Header, Step, HEADER_LEN};
use crate::protocol::messages::{
    self, backend, frontend, parse_error_fields, parse_parameter_status, sqlstate, ErrorFields,
    Severity, TxStatus,
};
use crate::protocol::session_state::{self, Effects, Setting};
use crate::protocol::statements::ServerStatements;
use crate::server::params::SessionParams;
use std::collections::VecDeque;

pub use crate::protocol::framing::MAX_SERVER_MESSAGE;

/// A Query, unnamed Parse or Bind longer than this is inspected by its first bytes only and
/// streamed on as it arrives, never held whole: statements that leave session state behind
/// or drop prepared statements begin there (a session-level advisory lock taken past it goes
/// unnoticed, which only costs the warning), and a Bind's statement name comes before its
/// parameter values. A named Parse is held whole when rewriting is on: its text is what
/// the pool keeps to prepare the statement on other servers.
pub const INSPECT_PREFIX: usize = 4096;

/// Whether an inspected message this long may be passed on before it has fully arrived.
#[inline]
fn streams_after_prefix(h: Header) -> bool {
    matches!(h.tag, frontend::QUERY | frontend::PARSE | frontend::BIND)
        && h.frame_len() > INSPECT_PREFIX
}

/// With the first bytes of a long message's body in hand: whether everything the scanner
/// decides on is in them, so the rest can stream.
fn prefix_suffices(tag: u8, prefix: &[u8], rewrite: bool) -> bool {
    match tag {
        frontend::PARSE => !rewrite || prefix.first() == Some(&0),
        // The portal's and the statement's names, both ended.
        frontend::BIND => !rewrite || prefix.iter().filter(|&&b| b == 0).nth(1).is_some(),
        _ => true,
    }
}

/// Why scanning stopped short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The client sent Terminate (not forwarded; what came before it is ready to go).
    Terminate,
    /// The client broke the protocol (the message says how).
    Client(String),
    /// The server broke the protocol.
    Server(String),
}

/// Per-transaction traffic, kept in plain integers and added to the pool's counters when the
/// server is unlinked.
#[derive(Debug, Default, Clone)]
pub struct Traffic {
    pub queries: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
}

/// The parts of a linked server connection the scanner reads and changes.
pub struct ServerSide<'a> {
    pub x: &'a mut Exchange,
    pub statements: &'a mut ServerStatements,
    pub params: &'a mut SessionParams,
}

/// One client session's protocol state.
pub struct Scan {
    /// Client to server.
    pub c: Half,
    /// Server to client.
    pub s: Half,
    /// The client's named prepared statements (rewriting is on when `tracker.enabled()`).
    pub tracker: Tracker,
    /// The parameter values this client believes in.
    pub params: SessionParams,
    pub traffic: Traffic,
    pub max_message: usize,
    /// Transaction mode: statements that leave session state behind are noted, and a
    /// DISCARD or DEALLOCATE the client sends itself retires the server.
    pub transaction_mode: bool,
    /// Kinds of session state seen and not yet taken (bit per [`session_state::KINDS`]).
    pub session_state: u8,
    /// The FATAL error the linked server sent: it is about to close. In transaction mode it
    /// is held back from the client, which keeps its connection (the relay tells it with an
    /// ERROR instead).
    pub server_fatal: Option<ErrorFields>,
    /// The server said a statement could not write because it is read-only (25006): a
    /// writer pool's sign that this server may have been demoted.
    pub read_only_error: bool,
    /// A transaction block was opened (`Some(true)`) or closed by a statement that completed
    /// since the last ReadyForQuery: the client's state if the server is lost before it.
    pub block_change: Option<bool>,
    /// A request started (the first client message since the server was last at rest).
    pub request_started: bool,
    /// ReadyForQuery messages seen since the caller last took them.
    pub readies: u32,
    /// This client, as the owner of settings it changes on a server.
    pub client_id: u64,
    /// Whether the client keeps its server for session state it made there.
    pub pin: Pin,
    /// Named statements whose execution creates or may remove session state.
    pin_names: PinNames,
    /// UNLISTEN statements (None: `*`) sent as simple queries: the relay ends listening
    /// through the pool on those channels too.
    pub unlistened: Vec<Option<String>>,
    /// SET and RESET statements sent and not yet answered, in order, each with the number of
    /// the request it belongs to: recorded for replay when its CommandComplete comes.
    pending_sets: VecDeque<(u64, Setting, String)>,
    /// Named prepared statements that are one SET or RESET: (client's name, setting, SQL).
    named_sets: Vec<(Vec<u8>, Setting, String)>,
    /// Requests (a Query, or messages up to a Sync) sent, and answered by ReadyForQuery.
    requests_sent: u64,
    requests_answered: u64,
    /// Those that completed inside the open transaction block: recorded if it commits.
    block_sets: Vec<(Setting, String)>,
    /// The block was ended by COMMIT (`Some(true)`) or ROLLBACK since the last ReadyForQuery.
    block_ended: Option<bool>,
}

impl Scan {
    pub fn new(
        leftover: bytes::BytesMut,
        tracker: Tracker,
        params: SessionParams,
        max_message: usize,
        transaction_mode: bool,
    ) -> Scan {
        Scan {
            c: Half::with_bytes(leftover),
            s: Half::default(),
            tracker,
            params,
            traffic: Traffic::default(),
            max_message,
            transaction_mode,
            session_state: 0,
            server_fatal: None,
            read_only_error: false,
            block_change: None,
            request_started: false,
            readies: 0,
            client_id: next_client_id(),
            pin: Pin::default(),
            pin_names: PinNames::default(),
            unlistened: Vec::new(),
            pending_sets: VecDeque::new(),
            named_sets: Vec::new(),
            requests_sent: 0,
            requests_answered: 0,
            block_sets: Vec::new(),
            block_ended: None,
        }
    }

    /// Walks new client bytes: marks complete and partial messages ready to forward, or
    /// rewrites them. A message the scanner must see whole (SQL text, a statement name) is
    /// left in the buffer, with `c.want` set to its size, until it has arrived.
    pub fn client(&mut self, srv: &mut ServerSide<'_>) -> Result<(), Stop> {
        let rewrite = self.tracker.enabled();
        self.c.want = 0;
        loop {
            let pos = self.c.ready;
            let header = match self.c.scan.step(&self.c.buf[pos..], self.max_message) {
                Err(e) => return Err(Stop::Client(e.to_string())),
                Ok(Step::NeedMore) => break,
                Ok(Step::Continue(n)) => {
                    self.c.scan.consume_body(n);
                    self.c.ready += n;
                    continue;
                }
                Ok(Step::Message { header, complete }) => {
                    if !complete && self.needs_whole(header.tag, rewrite) {
                        let have = self.c.buf.len() - pos;
                        if !streams_after_prefix(header) {
                            self.c.want = header.frame_len();
                            break;
                        }
                        if have < INSPECT_PREFIX {
                            self.c.want = INSPECT_PREFIX;
                            break;
                        }
                        let prefix = &self.c.buf[pos + HEADER_LEN..];
                        if !prefix_suffices(header.tag, prefix, rewrite) {
                            self.c.want = header.frame_len();
                            break;
                        }
                    }
                    header
                }
            };
            let tag = header.tag;
            let len = header.frame_len();
            self.traffic.messages_in += 1;
            self.traffic.bytes_in += len as u64;
            self.request_started = true;
            if tag == frontend::QUERY || tag == frontend::PARSE {
                let end = (pos + len).min(self.c.buf.len());
                let effects = match self.transaction_mode {
                    true => session_state::effects(statement_text(
                        tag,
                        &self.c.buf[pos + HEADER_LEN..end],
                    )),
                    false => Effects::default(),
                };
                let refused = self.pin.enabled()
                    && (effects.kinds | u8::from(effects.drops) != 0
                        || tag == frontend::PARSE && self.pin_names.any())
                    && self.pin_on_sql(tag, pos + HEADER_LEN, end, effects);
                if !refused {
                    self.session_state |= effects.kinds;
                }
                if effects.drops && tag == frontend::QUERY {
                    let body = &self.c.buf[pos + HEADER_LEN..end];
                    if let Some((false, channel)) = crate::pool::listen::listen_statement(body) {
                        self.unlistened.push(channel);
                    }
                }
                let body = &self.c.buf[pos + HEADER_LEN..end];
                let text = statement_text(tag, body);
                if tag == frontend::PARSE && !self.named_sets.is_empty() {
                    // A name given to another statement is no SET any more.
                    let name = &body[..body.iter().position(|&b| b == 0).unwrap_or(0)];
                    self.named_sets.retain(|(n, _, _)| n.as_slice() != name);
                }
                if effects.settings && !refused {
                    srv.params.note_settings_changed_by(self.client_id);
                    // One SET or RESET alone is replayed on the client's next servers once
                    // it has succeeded: a Query, an unnamed Parse (executed in this batch), or a
                    // named statement once a Bind executes it.
                    if let Some(setting) = session_state::setting(text) {
                        let sql = String::from_utf8_lossy(text);
                        let sql = sql
                            .trim()
                            .trim_end_matches(['\0', ';'])
                            .trim_end()
                            .to_owned();
                        let name_end = body.iter().position(|&b| b == 0).unwrap_or(0);
                        if tag == frontend::PARSE && name_end > 0 {
                            if self.named_sets.len() < MAX_NAMED_SETS {
                                let name = body[..name_end].to_vec();
                                self.named_sets.retain(|(n, _, _)| *n != name);
                                self.named_sets.push((name, setting, sql));
                            }
                        } else {
                            let request = self.requests_sent;
                            self.pending_sets.push_back((request, setting, sql));
                        }
                    }
                }
                let sql = on_sql(
                    tag,
                    body,
                    end < pos + len,
                    &mut self.tracker,
                    self.transaction_mode,
                    srv,
                );
                if let Some(command) = sql {
                    // Answered in order, once everything before it has been answered.
                    self.c.drop_message(len);
                    srv.x.expect_made(Made::Query(command));
                    self.emit_made(srv.x);
                    continue;
                }
            }
            let mut pos = pos;
            let end = (pos + len).min(self.c.buf.len());
            if tag == frontend::BIND
                && self.transaction_mode
                && self.pin.enabled()
                && self.pin_names.any()
            {
                self.pin_on_bind(pos + HEADER_LEN, end);
            }
            if tag == frontend::BIND && !self.named_sets.is_empty() {
                let bind = self.c.buf[pos + HEADER_LEN..end].to_vec();
                self.bind_of_named_set(&bind);
            }
            if rewrite
                && Tracker::inspects(tag)
                && names_statement(tag, &self.c.buf[pos + HEADER_LEN..end])
            {
                // The message may be rewritten: move what came before it out of the way first,
                // so the message starts the buffer.
                self.c.stage_ready();
                pos = 0;
                let avail = len.min(self.c.buf.len());
                self.c.out_buf();
                let action = self.tracker.on_client(
                    &self.c.buf[..avail],
                    len,
                    srv.statements,
                    srv.x,
                    &mut self.c.out,
                );
                if action == ClientAction::Rewritten {
                    // What arrived of it is rewritten into `out`; the rest of a long Bind
                    // (its parameter values) streams on unchanged behind it.
                    bytes::Buf::advance(&mut self.c.buf, avail);
                    self.c.scan.consume_message(header, avail);
                    self.emit_made(srv.x);
                    continue;
                }
                // Not one of this client's names: forwarded as it is, from the buffer's start.
            }
            if matches!(
                tag,
                frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL
            ) {
                self.requests_sent += 1;
            }
            match srv.x.on_client(tag) {
                ClientMsg::Forward => {}
                ClientMsg::Terminate => {
                    self.c.buf.truncate(pos);
                    return Err(Stop::Terminate);
                }
                ClientMsg::Invalid => {
                    return Err(Stop::Client(format!("invalid frontend message type {tag}")))
                }
            }
            let avail = self.c.buf.len() - pos;
            self.c.ready += self.c.scan.consume_message(header, avail);
        }
        Ok(())
    }

    /// A Query or Parse (its body at `start..end`) in a pinning pool, which creates or may
    /// remove session state: one that creates takes a pin slot, or is refused (its first
    /// word overwritten so that the server fails it; returns true); one that may remove
    /// state has the server asked again. A named statement does either only when a Bind
    /// executes it.
    fn pin_on_sql(&mut self, tag: u8, start: usize, end: usize, effects: Effects) -> bool {
        let body = &self.c.buf[start..end];
        let name_len = body.len() - statement_text(tag, body).len();
        if tag == frontend::PARSE && name_len > 1 {
            self.pin_names.remember(&body[..name_len - 1], effects);
            return false;
        }
        if effects.pins() {
            if !self.pin.on_creating() {
                self.pin
                    .refuse_statement(self.requests_sent, &mut self.c.buf[start + name_len..end]);
                return true;
            }
        } else if effects.drops {
            self.pin.on_may_drop();
        }
        false
    }

    /// A Bind (`start..end`, its body or the start of it) in a pinning pool: executing a
    /// named statement that creates session state takes a pin slot, or is refused (its
    /// statement name overwritten so that the server fails it).
    fn pin_on_bind(&mut self, start: usize, end: usize) {
        let body = &self.c.buf[start..end];
        let Some(portal_end) = memchr::memchr(0, body) else {
            return;
        };
        let name_start = portal_end + 1;
        let Some(len) = memchr::memchr(0, &body[name_start..]) else {
            return;
        };
        let name = &body[name_start..name_start + len];
        let creates = match self.pin_names.effect(name) {
            Some(creates) => creates,
            // Names past the list's capacity may be anything: asked about after the fact.
            None if self.pin_names.overflow && !name.is_empty() => {
                self.pin.on_may_drop();
                return;
            }
            None => return,
        };
        if !creates {
            self.pin.on_may_drop();
        } else if !self.pin.on_creating() {
            let at = start + name_start;
            self.pin
                .refuse_bind(self.requests_sent, &mut self.c.buf[at..at + len]);
        }
    }

    /// A named Parse answered without a server (the pool has the statement): remembered as
    /// one that creates or removes session state, like any other.
    pub fn pin_note_parse(&mut self, body: &[u8]) {
        if !self.transaction_mode || !self.pin.enabled() {
            return;
        }
        let text = statement_text(frontend::PARSE, body);
        let name = &body[..body.len() - text.len()];
        if name.len() > 1 {
            let effects = session_state::effects(text);
            self.pin_names.remember(&name[..name.len() - 1], effects);
        }
    }

    /// A Bind (its body, or the start of it) of one of the client's named SET statements:
    /// the setting is pending for this request.
    fn bind_of_named_set(&mut self, bind: &[u8]) {
        let mut parts = bind.splitn(3, |&b| b == 0);
        let (Some(_portal), Some(statement)) = (parts.next(), parts.next()) else {
            return;
        };
        if let Some((_, setting, sql)) = self.named_sets.iter().find(|(n, _, _)| n == statement) {
            let request = self.requests_sent;
            self.pending_sets
                .push_back((request, setting.clone(), sql.clone()));
        }
    }

    /// Whether a client message must be complete in the buffer before it is handled.
    #[inline]
    fn needs_whole(&self, tag: u8, rewrite: bool) -> bool {
        match tag {
            frontend::QUERY | frontend::PARSE => rewrite || self.transaction_mode,
            frontend::BIND | frontend::DESCRIBE | frontend::CLOSE => rewrite,
            _ => false,
        }
    }

    /// Walks new server bytes, looking into the few messages that decide pooling.
    pub fn server(&mut self, srv: &mut ServerSide<'_>) -> Result<(), Stop> {
        self.s.want = 0;
        loop {
            let pos = self.s.ready;
            let header = match self.s.scan.step(&self.s.buf[pos..], MAX_SERVER_MESSAGE) {
                Err(e) => return Err(Stop::Server(e.to_string())),
                Ok(Step::NeedMore) => break,
                Ok(Step::Continue(n)) => {
                    self.s.scan.consume_body(n);
                    self.s.ready += n;
                    // Answers due after a message that arrived in pieces go once it is whole.
                    self.emit_made(srv.x);
                    continue;
                }
                Ok(Step::Message { header, complete }) => {
                    let inspected = matches!(
                        header.tag,
                        backend::READY_FOR_QUERY
                            | backend::PARAMETER_STATUS
                            | backend::ERROR_RESPONSE
                            | backend::COMMAND_COMPLETE
                    );
                    if inspected && !complete {
                        self.s.want = header.frame_len();
                        break;
                    }
                    header
                }
            };
            let len = header.frame_len();
            let end = (pos + len).min(self.s.buf.len());
            let body = &self.s.buf[pos + HEADER_LEN..end];
            self.traffic.messages_out += 1;
            self.traffic.bytes_out += len as u64;
            let mut status = None;
            let mut hold = false;
            let mut replace = None;
            match header.tag {
                backend::READY_FOR_QUERY => {
                    let Some(s) = body.first().copied().and_then(TxStatus::from_byte) else {
                        return Err(Stop::Server("bad ReadyForQuery".into()));
                    };
                    status = Some(s);
                    self.traffic.queries += 1;
                    self.readies += 1;
                    self.block_change = None;
                    // The request is answered: a SET of it that did not complete failed.
                    let answered = self.requests_answered;
                    self.requests_answered += 1;
                    self.pin.request_answered(answered);
                    while self
                        .pending_sets
                        .front()
                        .is_some_and(|(r, _, _)| *r <= answered)
                    {
                        self.pending_sets.pop_front();
                    }
                    if s == TxStatus::Idle {
                        if self.block_ended == Some(true) {
                            for (setting, sql) in std::mem::take(&mut self.block_sets) {
                                self.params.record_setting(&setting, &sql);
                            }
                            srv.params.settings_now(self.client_id, &self.params);
                        }
                        self.block_sets.clear();
                        self.block_ended = None;
                    }
                }
                backend::PARAMETER_STATUS => {
                    if let Ok((n, v)) = parse_parameter_status(body) {
                        srv.params.set_reported(n, v);
                        self.params.set_reported(n, v);
                    }
                }
                // A client's RESET / DISCARD ALL changes what iampool set on this server.
                backend::COMMAND_COMPLETE => {
                    srv.params.on_command_complete(body);
                    let tag = body.strip_suffix(&[0]).unwrap_or(body);
                    if let Some(open) = block_command(tag) {
                        self.block_change = Some(open);
                        if !open {
                            self.block_ended = Some(tag == b"COMMIT");
                        }
                    }
                    if tag == b"SET" || tag == b"RESET" {
                        let current = self.requests_answered;
                        let of_this_request = self
                            .pending_sets
                            .front()
                            .is_some_and(|(r, _, _)| *r == current);
                        if let Some((_, setting, sql)) = of_this_request
                            .then(|| self.pending_sets.pop_front())
                            .flatten()
                        {
                            let in_block = self
                                .block_change
                                .unwrap_or(srv.x.status() != TxStatus::Idle);
                            if in_block {
                                self.block_sets.push((setting, sql));
                            } else {
                                self.params.record_setting(&setting, &sql);
                                srv.params.settings_now(self.client_id, &self.params);
                            }
                        }
                    } else if tag.eq_ignore_ascii_case(b"DISCARD ALL") {
                        self.params.clear_settings();
                        srv.params.settings_now(self.client_id, &self.params);
                    }
                }
                backend::ERROR_RESPONSE => {
                    let fields = parse_error_fields(body);
                    if fields.code == sqlstate::READ_ONLY_SQL_TRANSACTION {
                        self.read_only_error = true;
                    }
                    if fields.is_fatal() {
                        hold = self.transaction_mode;
                        self.server_fatal = Some(fields);
                    } else {
                        replace = self.pin.replacement(&fields);
                    }
                }
                backend::PARSE_COMPLETE => {
                    if let Some(global) = srv.x.completed_parse() {
                        self.tracker.learned(global);
                    }
                }
                _ => {}
            }
            let tracker = &mut self.tracker;
            let statements = &mut *srv.statements;
            let answer = srv
                .x
                .on_server(header.tag, status, &mut |global: Bytes, client| {
                    tracker.undo(statements, &global, client)
                });
            if answer == Answer::Hide || hold {
                // The answer to an injected message (complete, 5 bytes), or a FATAL held
                // back (complete: errors are inspected whole): never forwarded.
                self.s.drop_message(len);
            } else if let Some(message) = replace {
                // A refused statement's syntax error: iampool's reason in its place.
                self.s.drop_message(len);
                messages::error_response(
                    self.s.staged(),
                    Severity::Error,
                    sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
                    &message,
                );
            } else {
                let avail = self.s.buf.len() - pos;
                self.s.ready += self.s.scan.consume_message(header, avail);
            }
            self.emit_made(srv.x);
        }
        Ok(())
    }

    /// Writes the made-up answers that are due (after everything scanned so far). Never
    /// inside a server message that is only partly here: they wait for its end.
    #[inline]
    fn emit_made(&mut self, x: &mut Exchange) {
        if !self.s.scan.at_boundary() {
            return;
        }
        while let Some(made) = x.take_made() {
            write_made(self.s.staged(), made, x.status());
        }
    }

    /// Takes the session-state kinds seen since the last call.
    pub fn take_session_state(&mut self) -> u8 {
        std::mem::take(&mut self.session_state)
    }
}

/// The server is dropping prepared statements (DEALLOCATE / DISCARD from the client):
/// iampool's list for it is stale, so it is forgotten and the server retired at release.
fn forget_server_statements(srv: &mut ServerSide<'_>) {
    *srv.statements = ServerStatements::default();
    srv.x.taint();
}

/// Looks at the SQL of a complete Query or Parse (`body`): session state, and the
/// statements that drop prepared statements. Returns the command tag when a Query is to be
/// answered locally (and dropped).
fn on_sql(
    tag: u8,
    body: &[u8],
    partial: bool,
    tracker: &mut Tracker,
    transaction_mode: bool,
    srv: &mut ServerSide<'_>,
) -> Option<&'static str> {
    let sql = statement_text(tag, body);
    if !transaction_mode {
        // Session mode: the server's state is the client's, and is reset when it leaves.
        return None;
    }
    if !drops_statements(sql) {
        return None;
    }
    if tag == frontend::PARSE || !tracker.enabled() || partial {
        // DEALLOCATE / DISCARD through the extended protocol, with names not rewritten, or
        // at the start of a long multi-statement text.
        forget_server_statements(srv);
        return None;
    }
    match tracker.on_query(body) {
        QueryAction::Forward => None,
        QueryAction::Discard | QueryAction::ForwardDeallocate => {
            forget_server_statements(srv);
            None
        }
        QueryAction::Answer(command) => Some(command),
    }
}

/// The SQL of a Query, or of a Parse (after the statement name).
fn statement_text(tag: u8, body: &[u8]) -> &[u8] {
    if tag == frontend::PARSE {
        let skip = body
            .iter()
            .position(|&b| b == 0)
            .map_or(body.len(), |i| i + 1);
        &body[skip..]
    } else {
        body
    }
}

/// A client's named SET statements remembered for replay.
const MAX_NAMED_SETS: usize = 16;

/// A client's named statements remembered as creating or removing session state.
const MAX_PIN_NAMES: usize = 64;

/// A client's named statements whose execution creates session state (true) or may remove
/// it (false). Past [`MAX_PIN_NAMES`], every other named statement counts as one that may
/// remove state (asked about after the fact).
#[derive(Debug, Default)]
struct PinNames {
    names: Vec<(Vec<u8>, bool)>,
    overflow: bool,
}

impl PinNames {
    /// A Parse of `name` whose statement has these effects.
    fn remember(&mut self, name: &[u8], effects: Effects) {
        self.names.retain(|(n, _)| n.as_slice() != name);
        let creates = effects.pins();
        if creates || effects.drops {
            if self.names.len() < MAX_PIN_NAMES {
                self.names.push((name.to_vec(), creates));
            } else {
                self.overflow = true;
            }
        }
    }

    fn effect(&self, name: &[u8]) -> Option<bool> {
        self.names
            .iter()
            .find(|(n, _)| n.as_slice() == name)
            .map(|(_, c)| *c)
    }

    fn any(&self) -> bool {
        !self.names.is_empty() || self.overflow
    }
}

/// A process-wide unique id per client session (never 0).
fn next_client_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Whether a CommandComplete tag (without its NUL) opens (`BEGIN`, `START TRANSACTION`) or closes (`COMMIT`,
/// `ROLLBACK`, `PREPARE TRANSACTION`) a transaction block.
fn block_command(tag: &[u8]) -> Option<bool> {
    match tag {
        b"BEGIN" | b"START TRANSACTION" => Some(true),
        b"COMMIT" | b"ROLLBACK" | b"PREPARE TRANSACTION" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Buf, BytesMut};

    use super::*;
    use crate::protocol::exchange::Disposition;
    use crate::protocol::statements::KnownStatements;

    #[derive(Default)]
    struct Srv {
        x: Exchange,
        statements: ServerStatements,
        params: SessionParams,
    }

    impl Srv {
        fn side(&mut self) -> ServerSide<'_> {
            ServerSide {
                x: &mut self.x,
                statements: &mut self.statements,
                params: &mut self.params,
            }
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn parse(name: &str, q: &str) -> Vec<u8> {
        let mut b = format!("{name}\0{q}\0").into_bytes();
        b.extend_from_slice(&0i16.to_be_bytes());
        msg(b'P', &b)
    }

    fn bind(stmt: &str) -> Vec<u8> {
        let mut b = format!("\0{stmt}\0").into_bytes();
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        msg(b'B', &b)
    }

    fn sync() -> Vec<u8> {
        msg(b'S', b"")
    }

    fn tags(mut b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        while !b.is_empty() {
            out.push(b[0]);
            let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
            b = &b[len + 1..];
        }
        out
    }

    fn session(known: &Arc<KnownStatements>) -> Scan {
        Scan::new(
            BytesMut::new(),
            Tracker::new(2, known.clone()),
            SessionParams::default(),
            1 << 20,
            true,
        )
    }

    /// What one half has ready to write, taken out as the write would.
    fn take(h: &mut Half) -> Vec<u8> {
        let mut v = h.out.to_vec();
        v.extend_from_slice(&h.buf[..h.ready]);
        let ready = h.ready;
        h.buf.advance(ready);
        h.ready = 0;
        h.out.clear();
        v
    }

    /// The client sends `bytes`; returns what goes to the server.
    fn send(scan: &mut Scan, srv: &mut Srv, bytes: &[u8]) -> Vec<u8> {
        scan.c.buf.extend_from_slice(bytes);
        scan.client(&mut srv.side()).unwrap();
        take(&mut scan.c)
    }

    /// The server answers with these tags (bodies empty, 'Z' with 'I'); returns the tags
    /// the client gets.
    fn answer(scan: &mut Scan, srv: &mut Srv, tags_: &[u8]) -> Vec<u8> {
        for &t in tags_ {
            let m = if t == b'Z' { msg(t, b"I") } else { msg(t, b"") };
            scan.s.buf.extend_from_slice(&m);
        }
        scan.server(&mut srv.side()).unwrap();
        tags(&take(&mut scan.s))
    }

    use std::sync::Arc;

    /// A client session that prepared `s1` as `sql` on another server, which answered.
    fn prepared_elsewhere(known: &Arc<KnownStatements>, sql: &str) -> Scan {
        let mut first = Srv::default();
        let mut c = session(known);
        send(&mut c, &mut first, &[parse("s1", sql), sync()].concat());
        answer(&mut c, &mut first, b"1Z");
        c
    }

    #[test]
    fn named_parse_is_renamed_and_shared_between_clients() {
        let known = Arc::default();
        let mut srv = Srv::default();
        let mut a = session(&known);
        let sent = send(
            &mut a,
            &mut srv,
            &[parse("s1", "select 1"), sync()].concat(),
        );
        assert_eq!(tags(&sent), b"PS");
        assert!(sent.windows(8).any(|w| w == b"iampool_"));
        assert_eq!(answer(&mut a, &mut srv, b"1Z"), b"1Z");
        assert_eq!(srv.x.disposition(), Disposition::Clean);

        // A second client, same text: the server has it, so only the Sync goes and the
        // ParseComplete is made up, in order.
        let mut b = session(&known);
        srv.x.reset();
        let sent = send(
            &mut b,
            &mut srv,
            &[parse("other", "select 1"), sync()].concat(),
        );
        assert_eq!(tags(&sent), b"S");
        assert_eq!(tags(&take(&mut b.s)), b"1");
        assert_eq!(answer(&mut b, &mut srv, b"Z"), b"Z");
        assert_eq!(srv.x.disposition(), Disposition::Clean);
    }

    #[test]
    fn bind_on_a_fresh_server_injects_the_parse_and_hides_its_answer() {
        let known = Arc::default();
        let mut c = prepared_elsewhere(&known, "select 1");

        let mut fresh = Srv::default();
        let req = [bind("s1"), msg(b'E', &[0, 0, 0, 0, 0]), sync()].concat();
        assert_eq!(tags(&send(&mut c, &mut fresh, &req)), b"PBES");
        assert_eq!(answer(&mut c, &mut fresh, b"12DCZ"), b"2DCZ");
        assert_eq!(fresh.x.disposition(), Disposition::Clean);
        assert_eq!(fresh.statements.len(), 1);
    }

    #[test]
    fn failed_parse_leaves_nothing_behind() {
        let known = Arc::default();
        let mut srv = Srv::default();
        let mut c = session(&known);
        let req = [parse("bad", "selec 1"), bind("bad"), sync()].concat();
        assert_eq!(tags(&send(&mut c, &mut srv, &req)), b"PBS");
        assert_eq!(answer(&mut c, &mut srv, b"EZ"), b"EZ");
        assert_eq!(srv.x.disposition(), Disposition::Clean);
        assert!(srv.statements.is_empty());
        // The name is gone for the client too: a later Bind goes out as the client wrote it.
        let sent = send(&mut c, &mut srv, &[bind("bad"), sync()].concat());
        assert_eq!(sent, [bind("bad"), sync()].concat());
    }

    #[test]
    fn close_is_answered_locally_and_lru_evicts() {
        let known = Arc::default();
        let mut srv = Srv::default();
        let mut c = session(&known);
        let req = [
            parse("s0", "select 0"),
            parse("s1", "select 1"),
            parse("s2", "select 2"),
            sync(),
        ]
        .concat();
        // The third Parse closes the least recently used statement first (cap 2).
        assert_eq!(tags(&send(&mut c, &mut srv, &req)), b"PPCPS");
        assert_eq!(answer(&mut c, &mut srv, b"1131Z"), b"111Z");
        assert_eq!(srv.statements.len(), 2);
        let mut close = b"S".to_vec();
        close.extend_from_slice(b"s2\0");
        let sent = send(&mut c, &mut srv, &[msg(b'C', &close), sync()].concat());
        assert_eq!(tags(&sent), b"S");
        assert_eq!(tags(&take(&mut c.s)), b"3");
        assert_eq!(answer(&mut c, &mut srv, b"Z"), b"Z");
        assert_eq!(srv.x.disposition(), Disposition::Clean);
    }

    #[test]
    fn deallocate_is_answered_in_order_without_the_server() {
        let known = Arc::default();
        let mut srv = Srv::default();
        let mut c = session(&known);
        send(
            &mut c,
            &mut srv,
            &[parse("s1", "select 1"), sync()].concat(),
        );
        let sent = send(&mut c, &mut srv, &msg(b'Q', b"DEALLOCATE s1\0"));
        assert!(sent.is_empty());
        // Not yet: the earlier Sync is still owed.
        assert!(take(&mut c.s).is_empty());
        assert_eq!(answer(&mut c, &mut srv, b"1Z"), b"1ZCZ");
        assert_eq!(srv.x.disposition(), Disposition::Clean);
    }

    #[test]
    fn discard_all_retires_the_server() {
        let known = Arc::default();
        let mut srv = Srv::default();
        let mut c = session(&known);
        send(&mut c, &mut srv, &msg(b'Q', b"DISCARD ALL\0"));
        answer(&mut c, &mut srv, b"CZ");
        assert_eq!(srv.x.disposition(), Disposition::Close);
    }

    #[test]
    fn session_state_is_seen_without_rewriting() {
        let mut srv = Srv::default();
        let mut c = Scan::new(
            BytesMut::new(),
            Tracker::new(0, Arc::default()),
            SessionParams::default(),
            1 << 20,
            true,
        );
        send(&mut c, &mut srv, &msg(b'Q', b"LISTEN x\0"));
        assert_eq!(c.take_session_state(), 1);
    }

    /// Found by the relay_model fuzz target: a ParseComplete made up after a Describe was
    /// written as soon as the Describe's RowDescription began, inside its body.
    #[test]
    fn made_up_answers_wait_for_a_partial_message_to_end() {
        let known = Arc::default();
        let mut srv = Srv::default();
        let mut c = session(&known);
        let req = [parse("s1", "select 1"), parse("s2", "select 2"), sync()].concat();
        send(&mut c, &mut srv, &req);
        assert_eq!(answer(&mut c, &mut srv, b"11Z"), b"11Z");

        // s3 has s2's text: the server has it, so its ParseComplete is made up after the
        // Describe's answers.
        let mut describe = b"S".to_vec();
        describe.extend_from_slice(b"s1\0");
        let req = [msg(b'D', &describe), parse("s3", "select 2"), sync()].concat();
        assert_eq!(tags(&send(&mut c, &mut srv, &req)), b"DS");
        let row_description = msg(b'T', &[7u8; 40]);
        let server = [msg(b't', &[0, 0]), row_description.clone(), msg(b'Z', b"I")].concat();
        let mut to_client = Vec::new();
        for part in server.chunks(9) {
            c.s.buf.extend_from_slice(part);
            c.server(&mut srv.side()).unwrap();
            to_client.extend(take(&mut c.s));
        }
        assert_eq!(tags(&to_client), b"tT1Z");
        assert!(to_client
            .windows(row_description.len())
            .any(|w| w == row_description));
    }

    /// However the bytes are split, what is forwarded is exactly what was sent, and the
    /// server is released only once everything is answered.
    #[test]
    fn forwarded_bytes_equal_input_at_any_split() {
        let client = [
            msg(b'Q', b"select 1\0"),
            parse("", "select $1"),
            bind(""),
            msg(b'E', &[0, 0, 0, 0, 0]),
            sync(),
        ]
        .concat();
        let server = [
            msg(b'T', &[0, 0]),
            msg(b'D', &[0u8; 300]),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
        ]
        .concat();
        for split in 1..client.len().max(server.len()) {
            let known = Arc::default();
            let mut srv = Srv::default();
            let mut c = session(&known);
            let mut to_server = Vec::new();
            for part in client.chunks(split) {
                to_server.extend(send(&mut c, &mut srv, part));
            }
            assert_eq!(to_server, client, "split {split}");
            let mut to_client = Vec::new();
            for part in server.chunks(split) {
                assert_ne!(srv.x.disposition(), Disposition::Clean);
                c.s.buf.extend_from_slice(part);
                c.server(&mut srv.side()).unwrap();
                to_client.extend(take(&mut c.s));
            }
            assert_eq!(to_client, server, "split {split}");
            assert_eq!(srv.x.disposition(), Disposition::Clean);
        }
    }
    /// Feeds `bytes` in 16 KiB reads, taking what is ready after each; returns what went to
    /// the server and the most the client half ever held.
    fn stream_in(scan: &mut Scan, srv: &mut Srv, bytes: &[u8]) -> (Vec<u8>, usize) {
        let mut sent = Vec::new();
        let mut held = 0;
        for part in bytes.chunks(16 * 1024) {
            scan.c.buf.extend_from_slice(part);
            scan.client(&mut srv.side()).unwrap();
            held = held.max(scan.c.buf.len());
            sent.extend(take(&mut scan.c));
        }
        (sent, held)
    }

    /// A Bind with a large parameter value, naming `stmt`.
    fn big_bind(stmt: &str, value_len: usize) -> Vec<u8> {
        let mut b = format!("\0{stmt}\0").into_bytes();
        b.extend_from_slice(&0i16.to_be_bytes()); // parameter formats
        b.extend_from_slice(&1i16.to_be_bytes()); // one value
        b.extend_from_slice(&(value_len as i32).to_be_bytes());
        b.extend(std::iter::repeat_n(b'v', value_len));
        b.extend_from_slice(&0i16.to_be_bytes()); // result formats
        msg(b'B', &b)
    }

    /// A long Query is passed on as it arrives: the scanner never waits for all of it, so
    /// a client that stalls halfway makes iampool hold no more than a read's worth.
    #[test]
    fn a_long_query_streams_in_pieces() {
        let mut srv = Srv::default();
        let mut scan = Scan::new(
            BytesMut::new(),
            Tracker::new(200, Default::default()),
            SessionParams::default(),
            64 << 20,
            true,
        );
        let text = format!("select '{}'\0", "x".repeat(1 << 20));
        let q = msg(b'Q', text.as_bytes());
        let (sent, held) = stream_in(&mut scan, &mut srv, &q);
        assert_eq!(sent.len(), q.len());
        assert!(held <= 2 * INSPECT_PREFIX + 16 * 1024, "held {held} bytes");
        assert_eq!(
            srv.x.disposition(),
            Disposition::Busy,
            "the Query is owed its answer"
        );
    }

    #[test]
    fn a_long_bind_of_a_renamed_statement_streams_with_its_new_name() {
        let known = Arc::default();
        let mut srv = Srv::default();
        let mut a = session(&known);
        let sent = send(
            &mut a,
            &mut srv,
            &[parse("s1", "select $1"), sync()].concat(),
        );
        let global = &sent[5..5 + sent[5..].iter().position(|&b| b == 0).unwrap()];
        let global = String::from_utf8(global.to_vec()).unwrap();
        answer(&mut a, &mut srv, b"1Z");

        let value_len = 512 << 10;
        let (sent, held) = stream_in(&mut a, &mut srv, &big_bind("s1", value_len));
        // Exactly the client's Bind with the server-side name, however it arrived.
        assert_eq!(sent, big_bind(&global, value_len));
        assert!(held <= 2 * INSPECT_PREFIX + 16 * 1024, "held {held} bytes");
        assert!(a.c.scan.at_boundary());
        assert_eq!(
            srv.x.disposition(),
            Disposition::Busy,
            "the Bind is owed its answer"
        );
    }

    #[test]
    fn a_long_bind_on_a_fresh_server_streams_after_the_injected_parse() {
        let known = Arc::default();
        let mut a = prepared_elsewhere(&known, "select $1");

        // The same client on a server that lacks the statement: Parse, then the Bind.
        let mut fresh = Srv::default();
        let (sent, held) = stream_in(
            &mut a,
            &mut fresh,
            &[big_bind("s1", 512 << 10), sync()].concat(),
        );
        assert_eq!(tags(&sent), b"PBS");
        assert!(held <= 2 * INSPECT_PREFIX + 16 * 1024, "held {held} bytes");
        // The injected ParseComplete is hidden; the client sees its own answers only.
        assert_eq!(answer(&mut a, &mut fresh, b"12Z"), b"2Z");
        assert_eq!(fresh.x.disposition(), Disposition::Clean);
    }

    #[test]
    fn a_long_unnamed_parse_streams_and_a_long_named_one_is_held_whole() {
        let known = Arc::default();
        let text = format!("select '{}'", "x".repeat(512 << 10));
        let mut srv = Srv::default();
        let mut a = session(&known);
        let unnamed = parse("", &text);
        let (sent, held) = stream_in(&mut a, &mut srv, &unnamed);
        assert_eq!(sent, unnamed);
        assert!(held <= 2 * INSPECT_PREFIX + 16 * 1024, "held {held} bytes");

        // A named Parse is the statement's definition, kept to prepare it elsewhere.
        let mut srv = Srv::default();
        let mut b = session(&known);
        let named = parse("big", &text);
        let (sent, held) = stream_in(&mut b, &mut srv, &named);
        assert!(
            held + 16 * 1024 >= named.len(),
            "held whole until complete: {held}"
        );
        assert_eq!(tags(&sent), b"P");
        assert!(sent.windows(8).any(|w| w == b"iampool_"));
    }
}
