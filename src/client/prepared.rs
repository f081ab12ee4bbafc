//! Named prepared statements in transaction mode.
//!
//! A client's named Parse is remembered per client and sent to servers under an
//! iampool-wide name derived from the statement (text and parameter types), so identical
//! statements from many clients share one server-side statement. Bind, Describe and Close
//! are rewritten to that name; when a client is given a server that lacks the statement,
//! the Parse is sent there first, invisibly. To keep what the client sees exactly what
//! PostgreSQL would send, every response is matched to the request that caused it: answers
//! to injected messages are dropped, and answers to messages iampool did not send (a Parse
//! of a statement the server already has, a Close of a shared statement) are made up at the
//! right place in the stream.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::protocol::messages::{backend, frontend, BodyReader, TxStatus};

/// Prefix of iampool-wide statement names on servers.
pub const PREFIX: &str = "iampool_";

/// One statement as a client prepared it.
#[derive(Debug)]
pub struct Def {
    /// The iampool-wide name (no NUL).
    pub global: Bytes,
    /// A complete Parse message for `global`, ready to send to any server.
    pub parse: Bytes,
}

/// The statements one server connection has prepared, least recently used first out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<Bytes, u64>,
    tick: u64,
}

impl ServerStatements {
    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// True if prepared here; marks it recently used.
    fn touch(&mut self, name: &Bytes) -> bool {
        self.tick += 1;
        match self.used.get_mut(name) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records a statement; returns the least recently used one to close if over `cap`.
    fn insert(&mut self, name: Bytes, cap: usize) -> Option<Bytes> {
        self.tick += 1;
        self.used.insert(name.clone(), self.tick);
        if self.used.len() <= cap {
            return None;
        }
        let victim = self
            .used
            .iter()
            .filter(|(n, _)| **n != name)
            .min_by_key(|(_, t)| **t)
            .map(|(n, _)| n.clone())?;
        self.used.remove(&victim);
        Some(victim)
    }

    fn remove(&mut self, name: &Bytes) {
        self.used.remove(name);
    }
}

/// Statements that prepared successfully on some server of one pool. A client's lone
/// Parse + Sync of such a statement is answered without a server: pgbench and libpq's
/// `PQprepare` block until it completes, and a client that waits for a server there can
/// deadlock against its own other connections that hold the servers mid-transaction.
#[derive(Debug, Default)]
pub struct KnownStatements(std::sync::Mutex<std::collections::HashSet<Bytes>>);

/// Bounds the registry; past it, it starts over (entries are only an optimisation).
const MAX_KNOWN: usize = 10_000;

impl KnownStatements {
    pub fn contains(&self, global: &Bytes) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(global)
    }

    fn learn(&self, global: &Bytes) {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if set.len() >= MAX_KNOWN {
            set.clear();
        }
        set.insert(global.clone());
    }
}

/// What a server will answer, in order, for the messages sent to it.
#[derive(Debug, Clone)]
enum Expect {
    /// ParseComplete. `undo` names what to forget if the Parse fails.
    Parse {
        suppress: bool,
        undo: Option<(Bytes, Option<Bytes>)>,
    },
    /// A ParseComplete iampool makes up (the server already had the statement).
    SynthParse,
    Bind,
    /// ParameterDescription (statement only) then RowDescription or NoData.
    Describe,
    /// DataRow* then CommandComplete / EmptyQueryResponse / PortalSuspended (or a COPY).
    Execute,
    Close {
        suppress: bool,
    },
    /// A CloseComplete iampool makes up (the statement stays shared on the server).
    SynthClose,
    Sync,
    /// Query or FunctionCall: everything up to ReadyForQuery.
    Simple,
    /// A simple Query iampool answers itself (CommandComplete + ReadyForQuery).
    SynthQuery(&'static str),
}

/// What the relay does with a client message.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientAction {
    /// Pass the original bytes on.
    Forward,
    /// The tracker wrote what goes to the server into the output (possibly nothing).
    Rewritten,
}

/// What the relay does with a simple Query.
#[derive(Debug, PartialEq, Eq)]
pub enum QueryAction {
    Forward,
    /// Answer locally with CommandComplete(tag) + ReadyForQuery; send nothing.
    Answer(&'static str),
    /// DISCARD ALL: forwarded; the server drops every statement, so the server connection
    /// must not be trusted with its statement list afterwards.
    Discard,
    /// A DEALLOCATE iampool does not answer itself (ALL, or a name that is not this client's,
    /// such as a shared `iampool_...` statement): forwarded, with the same consequence.
    ForwardDeallocate,
}

/// What the relay does with a server message.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerAction {
    Forward,
    /// An answer to something iampool injected: the client never sees it.
    Drop,
}

/// Per-client statement names and the expected-response queue of the linked server.
#[derive(Debug)]
pub struct Tracker {
    statements: HashMap<Bytes, Arc<Def>>,
    expects: VecDeque<Expect>,
    /// The server hit an error and discards messages until the next Sync.
    skipping: bool,
    cap: usize,
    known: Arc<KnownStatements>,
}

/// Where rewritten client messages and made-up server messages go, after the bytes
/// already scanned (the relay moves those first so order is kept).
pub trait Staging {
    fn staged(&mut self) -> &mut BytesMut;
}

/// A buffer that already holds everything before the message being handled.
impl Staging for BytesMut {
    fn staged(&mut self) -> &mut BytesMut {
        self
    }
}

fn global_name(query: &[u8], types: &[u8]) -> Bytes {
    let mut h = Sha256::new();
    h.update((query.len() as u64).to_be_bytes());
    h.update(query);
    h.update(types);
    let digest = h.finalize();
    let mut name = String::with_capacity(PREFIX.len() + 32);
    name.push_str(PREFIX);
    name.push_str(&hex::encode(&digest[..16]));
    Bytes::from(name)
}

/// The client's name and iampool's definition for a named Parse body.
fn define(body: &[u8]) -> Option<(Bytes, Def)> {
    let mut r = BodyReader::new(body);
    let name = r.cbytes().ok()?;
    let query = r.cbytes().ok()?;
    if name.is_empty() {
        return None;
    }
    let global = global_name(query, r.remaining());
    let mut parse = BytesMut::with_capacity(body.len() + global.len() + 5);
    put_renamed(
        &mut parse,
        frontend::PARSE,
        &[],
        &global,
        &body[name.len() + 1..],
    );
    Some((
        Bytes::copy_from_slice(name),
        Def {
            global,
            parse: parse.freeze(),
        },
    ))
}

fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

/// Writes `tag` + length + body, where the body is `head` + the new name + NUL + `tail`.
fn put_renamed(out: &mut BytesMut, tag: u8, head: &[u8], name: &[u8], tail: &[u8]) {
    out.put_u8(tag);
    out.put_i32((4 + head.len() + name.len() + 1 + tail.len()) as i32);
    out.put_slice(head);
    put_cstr(out, name);
    out.put_slice(tail);
}

fn synth(out: &mut BytesMut, tag: u8) {
    out.put_u8(tag);
    out.put_i32(4);
}

impl Tracker {
    pub fn new(cap: usize, known: Arc<KnownStatements>) -> Tracker {
        Tracker {
            statements: HashMap::new(),
            expects: VecDeque::with_capacity(32),
            skipping: false,
            cap,
            known,
        }
    }

    /// A named Parse (`frame`, complete) of a statement this pool already knows to be valid
    /// is recorded for the client without a server. Returns false if a server is needed.
    pub fn prepare_locally(&mut self, frame: &[u8]) -> bool {
        let Some((name, def)) = define(&frame[5..]) else {
            return false;
        };
        if !self.known.contains(&def.global) {
            return false;
        }
        self.statements.insert(name, Arc::new(def));
        true
    }

    /// True when rewriting is on (transaction mode, `max_prepared_statements` > 0).
    pub fn enabled(&self) -> bool {
        self.cap > 0
    }

    /// Whether the relay needs the whole frame of this client message before deciding.
    pub fn inspects(tag: u8) -> bool {
        matches!(
            tag,
            frontend::PARSE | frontend::BIND | frontend::DESCRIBE | frontend::CLOSE
        )
    }

    /// Nothing is expected from the server.
    pub fn is_idle(&self) -> bool {
        self.expects.is_empty()
    }

    /// A new server starts with nothing outstanding.
    pub fn reset_server(&mut self) {
        self.expects.clear();
        self.skipping = false;
    }

    /// Handles one complete client message (`frame` includes the tag and length).
    /// `ignored_sync` is true when the server will ignore this Sync (extended COPY).
    pub fn on_client(
        &mut self,
        frame: &[u8],
        server: &mut ServerStatements,
        ignored_sync: bool,
        stage: &mut dyn Staging,
    ) -> ClientAction {
        let tag = frame[0];
        let body = &frame[5..];
        match tag {
            frontend::SYNC => {
                if !ignored_sync {
                    self.skipping = false;
                    self.expects.push_back(Expect::Sync);
                }
                ClientAction::Forward
            }
            frontend::QUERY | frontend::FUNCTION_CALL => {
                self.expects.push_back(Expect::Simple);
                ClientAction::Forward
            }
            frontend::EXECUTE => {
                self.push(Expect::Execute);
                ClientAction::Forward
            }
            frontend::PARSE => self.parse(frame, body, server, stage),
            frontend::BIND => {
                let mut r = BodyReader::new(body);
                let (Ok(portal), Ok(name)) = (r.cbytes(), r.cbytes()) else {
                    return ClientAction::Forward; // malformed: the server will say so
                };
                let head_len = portal.len() + 1;
                let tail = r.remaining();
                self.push(Expect::Bind);
                self.use_statement(name, server, stage, |out, global| {
                    put_renamed(out, frontend::BIND, &body[..head_len], global, tail)
                })
            }
            frontend::DESCRIBE | frontend::CLOSE => {
                let mut r = BodyReader::new(body);
                let (Ok(kind), Ok(name)) = (r.u8(), r.cbytes()) else {
                    return ClientAction::Forward;
                };
                if kind != b'S' || name.is_empty() {
                    self.push(if tag == frontend::DESCRIBE {
                        Expect::Describe
                    } else {
                        Expect::Close { suppress: false }
                    });
                    return ClientAction::Forward;
                }
                if tag == frontend::CLOSE {
                    // The server-side statement is shared: only this client's name goes.
                    self.statements.remove(name);
                    self.push(Expect::SynthClose);
                    return ClientAction::Rewritten;
                }
                self.push(Expect::Describe);
                self.use_statement(name, server, stage, |out, global| {
                    put_renamed(out, frontend::DESCRIBE, b"S", global, &[])
                })
            }
            _ => ClientAction::Forward,
        }
    }

    /// Queues an expectation unless the server is skipping to the next Sync.
    fn push(&mut self, e: Expect) {
        if !self.skipping {
            self.expects.push_back(e);
        }
    }

    fn parse(
        &mut self,
        frame: &[u8],
        body: &[u8],
        server: &mut ServerStatements,
        stage: &mut dyn Staging,
    ) -> ClientAction {
        let mut r = BodyReader::new(body);
        let (Ok(name), Ok(query)) = (r.cbytes(), r.cbytes()) else {
            return ClientAction::Forward;
        };
        let types = r.remaining();
        if name.is_empty() {
            self.push(Expect::Parse {
                suppress: false,
                undo: None,
            });
            return ClientAction::Forward;
        }
        let _ = (frame, query, types);
        let Some((client_name, def)) = define(body) else {
            return ClientAction::Forward;
        };
        let def = Arc::new(def);
        let global = def.global.clone();
        self.statements.insert(client_name.clone(), def.clone());
        if self.skipping {
            // The server discards it; the client's view still records the name, as the
            // server would have failed it anyway and the client will see that error.
            stage.staged().put_slice(&def.parse);
            return ClientAction::Rewritten;
        }
        if server.touch(&global) {
            self.expects.push_back(Expect::SynthParse);
            return ClientAction::Rewritten;
        }
        self.evict_for(&global, server, stage, false);
        stage.staged().put_slice(&def.parse);
        self.expects.push_back(Expect::Parse {
            suppress: false,
            undo: Some((global, Some(client_name))),
        });
        ClientAction::Rewritten
    }

    /// Rewrites a message naming a client statement; prepares it on this server first if needed.
    fn use_statement(
        &mut self,
        name: &[u8],
        server: &mut ServerStatements,
        stage: &mut dyn Staging,
        write: impl FnOnce(&mut BytesMut, &[u8]),
    ) -> ClientAction {
        if name.is_empty() {
            return ClientAction::Forward;
        }
        let Some(def) = self.statements.get(name).cloned() else {
            // Never prepared by this client: the server reports it as PostgreSQL would.
            return ClientAction::Forward;
        };
        if !self.skipping && !server.touch(&def.global) {
            self.evict_for(&def.global, server, stage, true);
            stage.staged().put_slice(&def.parse);
            // Inserted before the message that needed it.
            let at = self.expects.len() - 1;
            self.expects.insert(
                at,
                Expect::Parse {
                    suppress: true,
                    undo: Some((def.global.clone(), None)),
                },
            );
        }
        write(stage.staged(), &def.global);
        ClientAction::Rewritten
    }

    /// Makes room for `global` on the server, closing the least recently used statement.
    /// `before_last`: the message being handled already queued its own expectation, and the
    /// Close goes before it.
    fn evict_for(
        &mut self,
        global: &Bytes,
        server: &mut ServerStatements,
        stage: &mut dyn Staging,
        before_last: bool,
    ) {
        if let Some(victim) = server.insert(global.clone(), self.cap) {
            put_renamed(stage.staged(), frontend::CLOSE, b"S", &victim, &[]);
            let pos = if before_last {
                self.expects.len().saturating_sub(1)
            } else {
                self.expects.len()
            };
            self.expects.insert(pos, Expect::Close { suppress: true });
        }
    }

    /// The server swallowed `n` Syncs (extended-protocol COPY FROM STDIN).
    pub fn syncs_ignored(&mut self, mut n: usize) {
        while n > 0 {
            match self.expects.iter().rposition(|e| matches!(e, Expect::Sync)) {
                Some(i) => {
                    self.expects.remove(i);
                    n -= 1;
                }
                None => break,
            }
        }
    }

    /// Handles one server message. `server` loses statements whose Parse failed.
    pub fn on_server(&mut self, tag: u8, server: &mut ServerStatements) -> ServerAction {
        match tag {
            // Asynchronous: not an answer to anything.
            backend::NOTICE_RESPONSE
            | backend::PARAMETER_STATUS
            | backend::NOTIFICATION_RESPONSE => return ServerAction::Forward,
            _ => {}
        }
        let Some(front) = self.expects.front().cloned() else {
            return ServerAction::Forward;
        };
        match (front, tag) {
            (Expect::Simple, backend::READY_FOR_QUERY)
            | (Expect::Sync, backend::READY_FOR_QUERY) => {
                self.expects.pop_front();
                self.skipping = false;
                ServerAction::Forward
            }
            (Expect::Simple, _) => ServerAction::Forward,
            (_, backend::ERROR_RESPONSE) => {
                // Extended protocol: the server now skips everything up to the next Sync.
                while let Some(e) = self.expects.front() {
                    if matches!(e, Expect::Sync) {
                        break;
                    }
                    if let Some(Expect::Parse {
                        undo: Some((global, client)),
                        ..
                    }) = self.expects.pop_front()
                    {
                        server.remove(&global);
                        if let Some(c) = client {
                            self.statements.remove(&c);
                        }
                    }
                }
                if self.expects.is_empty() {
                    self.skipping = true;
                }
                ServerAction::Forward
            }
            (Expect::Parse { suppress, undo }, b'1') => {
                self.expects.pop_front();
                if let Some((global, _)) = &undo {
                    self.known.learn(global);
                }
                if suppress {
                    ServerAction::Drop
                } else {
                    ServerAction::Forward
                }
            }
            (Expect::Close { suppress }, b'3') => {
                self.expects.pop_front();
                if suppress {
                    ServerAction::Drop
                } else {
                    ServerAction::Forward
                }
            }
            (Expect::Bind, b'2') => {
                self.expects.pop_front();
                ServerAction::Forward
            }
            (Expect::Describe, b't') => ServerAction::Forward,
            (Expect::Describe, b'T' | b'n') => {
                self.expects.pop_front();
                ServerAction::Forward
            }
            (Expect::Execute, b'C' | b'I' | b's') => {
                self.expects.pop_front();
                ServerAction::Forward
            }
            _ => ServerAction::Forward,
        }
    }

    /// Queues a locally answered simple Query (see [`Tracker::on_query`]).
    pub fn queue_answer(&mut self, command: &'static str) {
        self.expects.push_back(Expect::SynthQuery(command));
    }

    /// Emits the made-up answers that are due: those at the front of the queue.
    pub fn drain_synthetic(&mut self, stage: &mut dyn Staging, status: TxStatus) -> bool {
        let mut any = false;
        while let Some(e) = self.expects.front() {
            match *e {
                Expect::SynthParse => synth(stage.staged(), b'1'),
                Expect::SynthClose => synth(stage.staged(), b'3'),
                Expect::SynthQuery(command) => {
                    let out = stage.staged();
                    out.put_u8(backend::COMMAND_COMPLETE);
                    out.put_i32((4 + command.len() + 1) as i32);
                    put_cstr(out, command.as_bytes());
                    crate::protocol::messages::ready_for_query(out, status);
                }
                _ => break,
            }
            self.expects.pop_front();
            any = true;
        }
        any
    }

    /// A simple Query that manages prepared statements by name: `DEALLOCATE [PREPARE] name|ALL`
    /// on the client's own statements is answered by iampool (the server-side statements are
    /// shared); `DISCARD ALL` empties this client's names and is passed on.
    pub fn on_query(&mut self, body: &[u8]) -> QueryAction {
        // Most queries: a few byte comparisons, no UTF-8 pass over the whole text.
        if !drops_statements(body) {
            return QueryAction::Forward;
        }
        let text = body.strip_suffix(&[0]).unwrap_or(body);
        let Ok(text) = std::str::from_utf8(text) else {
            return QueryAction::Forward;
        };
        let text = text.trim().trim_end_matches(';').trim();
        let mut words = text.split_ascii_whitespace();
        let first = words.next().unwrap_or("");
        if first.eq_ignore_ascii_case("discard") {
            if words.next().is_some_and(|w| w.eq_ignore_ascii_case("all")) && words.next().is_none()
            {
                self.forget_all();
                return QueryAction::Discard;
            }
            return QueryAction::Forward;
        }
        if !first.eq_ignore_ascii_case("deallocate") {
            return QueryAction::Forward;
        }
        let mut name = words.next();
        if name.is_some_and(|w| w.eq_ignore_ascii_case("prepare")) {
            name = words.next();
        }
        match (name, words.next()) {
            (Some(n), None) if n.eq_ignore_ascii_case("all") => {
                self.forget_all();
                // Statements prepared with SQL PREPARE live on one server; pass it on too.
                QueryAction::ForwardDeallocate
            }
            (Some(n), None) => {
                let unquoted = n
                    .strip_prefix('"')
                    .and_then(|n| n.strip_suffix('"'))
                    .map(str::to_owned)
                    .unwrap_or_else(|| n.to_ascii_lowercase());
                if self.forget(unquoted.as_bytes()) || self.forget(n.as_bytes()) {
                    QueryAction::Answer("DEALLOCATE")
                } else {
                    QueryAction::ForwardDeallocate
                }
            }
            _ => QueryAction::ForwardDeallocate,
        }
    }

    /// Forgets every statement name (DISCARD ALL / DEALLOCATE ALL from the client).
    pub fn forget_all(&mut self) {
        self.statements.clear();
    }

    /// Forgets one statement name (DEALLOCATE name).
    pub fn forget(&mut self, name: &[u8]) -> bool {
        self.statements.remove(name).is_some()
    }
}

/// SQL that makes the server drop prepared statements (`DEALLOCATE ...`, `DISCARD ...`).
pub fn drops_statements(sql: &[u8]) -> bool {
    let t = sql.trim_ascii_start();
    [b"deallocate".as_slice(), b"discard"]
        .iter()
        .any(|w| t.len() >= w.len() && t[..w.len()].eq_ignore_ascii_case(w))
}

/// True if a Parse, Bind, Describe or Close `body` names a prepared statement.
pub fn names_statement(tag: u8, body: &[u8]) -> bool {
    match tag {
        frontend::PARSE => body.first().is_some_and(|&b| b != 0),
        frontend::BIND => {
            let portal_end = body.iter().position(|&b| b == 0);
            portal_end.is_some_and(|i| body.get(i + 1).is_some_and(|&b| b != 0))
        }
        frontend::DESCRIBE | frontend::CLOSE => {
            body.first() == Some(&b'S') && body.get(1).is_some_and(|&b| b != 0)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Out(BytesMut);
    impl Staging for Out {
        fn staged(&mut self) -> &mut BytesMut {
            &mut self.0
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn parse(name: &str, q: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(q.as_bytes());
        b.push(0);
        b.extend_from_slice(&0i16.to_be_bytes());
        msg(b'P', &b)
    }

    fn bind(stmt: &str) -> Vec<u8> {
        let mut b = vec![0];
        b.extend_from_slice(stmt.as_bytes());
        b.push(0);
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        msg(b'B', &b)
    }

    /// Splits a byte stream into (tag, name-ish) for assertions.
    fn tags(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            out.push(b[i]);
            let len = i32::from_be_bytes([b[i + 1], b[i + 2], b[i + 3], b[i + 4]]) as usize;
            i += len + 1;
        }
        out
    }

    #[test]
    fn named_parse_is_renamed_and_shared() {
        let mut t = Tracker::new(10, Default::default());
        let mut srv = ServerStatements::default();
        let mut out = Out(BytesMut::new());
        assert_eq!(
            t.on_client(&parse("s1", "select 1"), &mut srv, false, &mut out),
            ClientAction::Rewritten
        );
        assert!(out.0.windows(PREFIX.len()).any(|w| w == PREFIX.as_bytes()));
        t.on_client(&msg(b'S', b""), &mut srv, false, &mut out);
        assert_eq!(t.on_server(b'1', &mut srv), ServerAction::Forward);
        assert_eq!(t.on_server(b'Z', &mut srv), ServerAction::Forward);
        assert!(t.is_idle());

        // A second client with the same text: the server already has it, so nothing is
        // sent and a ParseComplete is made up.
        let mut t2 = Tracker::new(10, Default::default());
        let mut out2 = Out(BytesMut::new());
        t2.on_client(&parse("other", "select 1"), &mut srv, false, &mut out2);
        assert!(out2.0.is_empty());
        assert!(t2.drain_synthetic(&mut out2, TxStatus::Idle));
        assert_eq!(tags(&out2.0), vec![b'1']);
    }

    #[test]
    fn bind_on_a_fresh_server_injects_the_parse_and_hides_its_answer() {
        let mut t = Tracker::new(10, Default::default());
        let mut first = ServerStatements::default();
        let mut out = Out(BytesMut::new());
        t.on_client(&parse("s1", "select 1"), &mut first, false, &mut out);
        t.on_server(b'1', &mut first);
        // Another server: Bind needs the Parse first.
        let mut fresh = ServerStatements::default();
        t.reset_server();
        let mut out = Out(BytesMut::new());
        t.on_client(&bind("s1"), &mut fresh, false, &mut out);
        t.on_client(&msg(b'E', &[0, 0, 0, 0, 0]), &mut fresh, false, &mut out);
        t.on_client(&msg(b'S', b""), &mut fresh, false, &mut out);
        assert_eq!(tags(&out.0), vec![b'P', b'B']);
        assert_eq!(t.on_server(b'1', &mut fresh), ServerAction::Drop);
        assert_eq!(t.on_server(b'2', &mut fresh), ServerAction::Forward);
        assert_eq!(t.on_server(b'D', &mut fresh), ServerAction::Forward);
        assert_eq!(t.on_server(b'C', &mut fresh), ServerAction::Forward);
        assert_eq!(t.on_server(b'Z', &mut fresh), ServerAction::Forward);
        assert!(t.is_idle());
        assert_eq!(fresh.len(), 1);
    }

    #[test]
    fn failed_parse_leaves_nothing_behind() {
        let mut t = Tracker::new(10, Default::default());
        let mut srv = ServerStatements::default();
        let mut out = Out(BytesMut::new());
        t.on_client(&parse("bad", "selec 1"), &mut srv, false, &mut out);
        t.on_client(&bind("bad"), &mut srv, false, &mut out);
        t.on_client(&msg(b'S', b""), &mut srv, false, &mut out);
        assert_eq!(t.on_server(b'E', &mut srv), ServerAction::Forward);
        assert_eq!(t.on_server(b'Z', &mut srv), ServerAction::Forward);
        assert!(t.is_idle());
        assert!(srv.is_empty());
        assert!(t.statements.is_empty());
    }

    #[test]
    fn close_is_answered_locally_and_lru_evicts() {
        let mut t = Tracker::new(2, Default::default());
        let mut srv = ServerStatements::default();
        let mut out = Out(BytesMut::new());
        for (i, q) in ["select 1", "select 2", "select 3"].iter().enumerate() {
            t.on_client(&parse(&format!("s{i}"), q), &mut srv, false, &mut out);
        }
        // The third Parse closed the least recently used statement first.
        assert_eq!(tags(&out.0), vec![b'P', b'P', b'C', b'P']);
        assert_eq!(srv.len(), 2);
        for tag in [b'1', b'1', b'3', b'1'] {
            let want = if tag == b'3' {
                ServerAction::Drop
            } else {
                ServerAction::Forward
            };
            assert_eq!(t.on_server(tag, &mut srv), want);
        }
        let mut out = Out(BytesMut::new());
        let mut close = vec![b'S'];
        close.extend_from_slice(b"s0\0");
        assert_eq!(
            t.on_client(&msg(b'C', &close), &mut srv, false, &mut out),
            ClientAction::Rewritten
        );
        assert!(out.0.is_empty());
        assert!(t.drain_synthetic(&mut out, TxStatus::Idle));
        assert_eq!(tags(&out.0), vec![b'3']);
    }

    #[test]
    fn deallocate_is_answered_locally_for_own_names() {
        let mut t = Tracker::new(10, Default::default());
        let mut srv = ServerStatements::default();
        let mut out = Out(BytesMut::new());
        t.on_client(&parse("s1", "select 1"), &mut srv, false, &mut out);
        assert_eq!(
            t.on_query(b"deallocate s1;\0"),
            QueryAction::Answer("DEALLOCATE")
        );
        assert_eq!(
            t.on_query(b"DEALLOCATE s1\0"),
            QueryAction::ForwardDeallocate
        );
        assert_eq!(t.on_query(b"DISCARD ALL\0"), QueryAction::Discard);
        assert_eq!(t.on_query(b"select 1\0"), QueryAction::Forward);
    }

    #[test]
    fn same_text_with_other_types_is_another_statement() {
        assert_ne!(
            global_name(b"select $1", &[0, 1, 0, 0, 0, 23]),
            global_name(b"select $1", &[0, 1, 0, 0, 0, 25])
        );
    }
}

/// Kinds of session state that transaction mode cannot carry from one server to the next.
pub const SESSION_STATE_KINDS: [&str; 6] = [
    "listen",
    "sql_prepare",
    "temp_table",
    "advisory_lock",
    "with_hold_cursor",
    "session_set_unreported",
];

/// A cheap look at SQL text (a Query, or a Parse's statement) for statements that leave
/// session state behind. Returns an index into [`SESSION_STATE_KINDS`]. It reads the first
/// word of the text and, only for a few of them, searches further; a miss costs a few
/// byte comparisons.
pub fn session_state_kind(sql: &[u8]) -> Option<usize> {
    let text = sql.trim_ascii_start();
    let word_end = text
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let word = &text[..word_end];
    let rest = &text[word_end..];
    let has = |needle: &[u8]| {
        rest.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    if word.eq_ignore_ascii_case(b"listen") {
        Some(0)
    } else if word.eq_ignore_ascii_case(b"prepare") {
        Some(1)
    } else if word.eq_ignore_ascii_case(b"create") {
        let next = rest.trim_ascii_start();
        let temp = [
            b"temp".as_slice(),
            b"temporary",
            b"local temp",
            b"global temp",
        ]
        .iter()
        .any(|p| next.len() >= p.len() && next[..p.len()].eq_ignore_ascii_case(p));
        temp.then_some(2)
    } else if word.eq_ignore_ascii_case(b"select") {
        // Session-level advisory locks (the _xact_ variants end with the transaction).
        (has(b"pg_advisory_lock") || has(b"pg_try_advisory_lock")).then_some(3)
    } else if word.eq_ignore_ascii_case(b"declare") {
        has(b"with hold").then_some(4)
    } else {
        None
    }
}

#[cfg(test)]
mod state_tests {
    use super::*;

    #[test]
    fn detects_session_state_cheaply() {
        let k = |s: &str| session_state_kind(s.as_bytes()).map(|i| SESSION_STATE_KINDS[i]);
        assert_eq!(k("LISTEN chan"), Some("listen"));
        assert_eq!(k("  prepare p as select 1"), Some("sql_prepare"));
        assert_eq!(k("create temp table t(a int)"), Some("temp_table"));
        assert_eq!(k("CREATE TEMPORARY TABLE t(a int)"), Some("temp_table"));
        assert_eq!(k("create table t(a int)"), None);
        assert_eq!(k("select pg_advisory_lock(1)"), Some("advisory_lock"));
        assert_eq!(k("select pg_advisory_xact_lock(1)"), None);
        assert_eq!(
            k("declare c cursor with hold for select 1"),
            Some("with_hold_cursor")
        );
        assert_eq!(k("declare c cursor for select 1"), None);
        assert_eq!(k("select 1"), None);
        assert_eq!(k(""), None);
    }
}
