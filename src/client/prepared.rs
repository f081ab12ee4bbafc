//! Named prepared statements in transaction mode.
//!
//! A client's named Parse is remembered per client and sent to servers under an
//! iampool-wide name derived from the statement (text and parameter types), so identical
//! statements from many clients share one server-side statement. Bind, Describe and Close
//! are rewritten to that name; when a client is given a server that lacks the statement,
//! the Parse is sent there first, invisibly. To keep what the client sees exactly what
//! PostgreSQL would send, every answer the rewritten messages cause is recorded in the
//! server's [`Exchange`]: answers to injected messages are hidden, and answers to messages
//! iampool did not send (a Parse of a statement the server already has, a Close of a shared
//! statement) are made up at the right place in the stream.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::protocol::exchange::{Exchange, Made, Owed};
use crate::protocol::messages::{backend, frontend, BodyReader, TxStatus};
use crate::protocol::statements::{KnownStatements, ServerStatements};

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

/// What the relay does with a client message.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientAction {
    /// Pass the original bytes on (and account for them as they are).
    Forward,
    /// What goes to the server was written to the staging buffer (possibly nothing) and
    /// every answer it causes was recorded.
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

/// One client's statement names.
#[derive(Debug)]
pub struct Tracker {
    statements: HashMap<Bytes, Arc<Def>>,
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
    put_renamed_start(out, tag, head, name, tail, tail.len());
}

/// [`put_renamed`] for a message still arriving: its tail is `tail_len` bytes, of which only
/// the first part, `tail`, is written here; the rest follows unchanged.
fn put_renamed_start(
    out: &mut BytesMut,
    tag: u8,
    head: &[u8],
    name: &[u8],
    tail: &[u8],
    tail_len: usize,
) {
    debug_assert!(tail.len() <= tail_len);
    out.put_u8(tag);
    out.put_i32((4 + head.len() + name.len() + 1 + tail_len) as i32);
    out.put_slice(head);
    put_cstr(out, name);
    out.put_slice(tail);
}

/// Writes a made-up answer.
pub fn write_made(out: &mut BytesMut, made: Made, status: TxStatus) {
    match made {
        Made::ParseComplete => out.put_slice(&[backend::PARSE_COMPLETE, 0, 0, 0, 4]),
        Made::CloseComplete => out.put_slice(&[backend::CLOSE_COMPLETE, 0, 0, 0, 4]),
        Made::Query(command) => {
            out.put_u8(backend::COMMAND_COMPLETE);
            out.put_i32((4 + command.len() + 1) as i32);
            put_cstr(out, command.as_bytes());
            crate::protocol::messages::ready_for_query(out, status);
        }
    }
}

impl Tracker {
    pub fn new(cap: usize, known: Arc<KnownStatements>) -> Tracker {
        Tracker {
            statements: HashMap::new(),
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

    /// Handles one client message that names a statement (see [`names_statement`]):
    /// `frame` is the message from its tag on, `frame_len` long. Only a Bind may be
    /// incomplete (its names arrived, its parameter values are still coming: the caller
    /// passes those on after the rewritten start). Anything else is [`ClientAction::Forward`]
    /// and accounted by the caller.
    pub fn on_client(
        &mut self,
        frame: &[u8],
        frame_len: usize,
        server: &mut ServerStatements,
        x: &mut Exchange,
        stage: &mut dyn Staging,
    ) -> ClientAction {
        let tag = frame[0];
        let body = &frame[5..];
        if frame.len() < frame_len && tag != frontend::BIND {
            debug_assert!(false, "only a Bind is rewritten before it has all arrived");
            return ClientAction::Forward;
        }
        match tag {
            frontend::PARSE => self.parse(body, server, x, stage),
            frontend::BIND => {
                let mut r = BodyReader::new(body);
                let (Ok(portal), Ok(name)) = (r.cbytes(), r.cbytes()) else {
                    return ClientAction::Forward; // malformed: the server will say so
                };
                let head_len = portal.len() + 1;
                let tail = r.remaining();
                let tail_len = frame_len - 5 - head_len - name.len() - 1;
                self.use_statement(name, Owed::Bind, server, x, stage, |out, global| {
                    put_renamed_start(
                        out,
                        frontend::BIND,
                        &body[..head_len],
                        global,
                        tail,
                        tail_len,
                    )
                })
            }
            frontend::DESCRIBE | frontend::CLOSE => {
                let mut r = BodyReader::new(body);
                let (Ok(kind), Ok(name)) = (r.u8(), r.cbytes()) else {
                    return ClientAction::Forward;
                };
                if kind != b'S' || name.is_empty() {
                    return ClientAction::Forward;
                }
                if tag == frontend::CLOSE {
                    // The server-side statement is shared: only this client's name goes.
                    self.statements.remove(name);
                    x.expect_made(Made::CloseComplete);
                    return ClientAction::Rewritten;
                }
                self.use_statement(name, Owed::Describe, server, x, stage, |out, global| {
                    put_renamed(out, frontend::DESCRIBE, b"S", global, &[])
                })
            }
            _ => ClientAction::Forward,
        }
    }

    fn parse(
        &mut self,
        body: &[u8],
        server: &mut ServerStatements,
        x: &mut Exchange,
        stage: &mut dyn Staging,
    ) -> ClientAction {
        let Some((client_name, def)) = define(body) else {
            return ClientAction::Forward;
        };
        let def = Arc::new(def);
        let global = def.global.clone();
        self.statements.insert(client_name.clone(), def.clone());
        if x.skipping() {
            // The server discards it; the client's view still records the name, as the
            // server would have failed it anyway and the client will see that error.
            stage.staged().put_slice(&def.parse);
            x.expect(Owed::Parse {
                hide: false,
                undo: None,
            });
            return ClientAction::Rewritten;
        }
        if server.touch(&global) {
            x.expect_made(Made::ParseComplete);
            return ClientAction::Rewritten;
        }
        self.evict_for(&global, server, x, stage, false);
        stage.staged().put_slice(&def.parse);
        x.expect(Owed::Parse {
            hide: false,
            undo: Some((global, Some(client_name))),
        });
        ClientAction::Rewritten
    }

    /// Rewrites a message naming a client statement; prepares it on this server first if
    /// needed. `owed` is what the rewritten message itself is answered with.
    fn use_statement(
        &mut self,
        name: &[u8],
        owed: Owed,
        server: &mut ServerStatements,
        x: &mut Exchange,
        stage: &mut dyn Staging,
        write: impl FnOnce(&mut BytesMut, &[u8]),
    ) -> ClientAction {
        let Some(def) = self.statements.get(name).cloned() else {
            // Not a name this client prepared through iampool: the server will say so.
            return ClientAction::Forward;
        };
        x.expect(owed);
        if !x.skipping() && !server.touch(&def.global) {
            self.evict_for(&def.global, server, x, stage, true);
            stage.staged().put_slice(&def.parse);
            x.expect_before_last(Owed::Parse {
                hide: true,
                undo: Some((def.global.clone(), None)),
            });
        }
        write(stage.staged(), &def.global);
        ClientAction::Rewritten
    }

    /// Records `global` on the server; if that pushes out the least recently used
    /// statement, closes it there first (its CloseComplete is hidden).
    fn evict_for(
        &mut self,
        global: &Bytes,
        server: &mut ServerStatements,
        x: &mut Exchange,
        stage: &mut dyn Staging,
        before_last: bool,
    ) {
        if let Some(victim) = server.insert(global.clone(), self.cap) {
            put_renamed(stage.staged(), frontend::CLOSE, b"S", &victim, &[]);
            let close = Owed::Close { hide: true };
            if before_last {
                x.expect_before_last(close);
            } else {
                x.expect(close);
            }
        }
    }

    /// A ParseComplete for `global` arrived: the statement is valid for this pool.
    pub fn learned(&self, global: &Bytes) {
        self.known.learn(global);
    }

    /// A Parse failed: forget what it would have defined.
    pub fn undo(&mut self, server: &mut ServerStatements, global: &Bytes, client: Option<Bytes>) {
        server.remove(global);
        if let Some(c) = client {
            self.statements.remove(&c);
        }
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
                // The name as PostgreSQL reads it: folded to lower case unless quoted.
                let name = n
                    .strip_prefix('"')
                    .and_then(|n| n.strip_suffix('"'))
                    .map(str::to_owned)
                    .unwrap_or_else(|| n.to_ascii_lowercase());
                if self.forget(name.as_bytes()) {
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

    #[test]
    fn same_text_with_other_types_is_another_statement() {
        assert_ne!(
            global_name(b"select $1", &[0, 1, 0, 0, 0, 23]),
            global_name(b"select $1", &[0, 1, 0, 0, 0, 25])
        );
    }

    #[test]
    fn deallocate_of_own_names_is_answered_locally() {
        let mut t = Tracker::new(10, Default::default());
        let mut body = b"s1\0select 1\0".to_vec();
        body.extend_from_slice(&[0, 0]);
        let (name, def) = define(&body).unwrap();
        t.statements.insert(name, Arc::new(def));
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

    /// Found by the relay_model fuzz target: `DEALLOCATE S1` names `s1` in PostgreSQL, so
    /// it must not drop a statement the client called `S1` (the server says `s1` does not
    /// exist); only `DEALLOCATE "S1"` does.
    #[test]
    fn deallocate_folds_an_unquoted_name_as_postgresql_does() {
        let mut t = Tracker::new(10, Default::default());
        let mut body = b"S1\0select 1\0".to_vec();
        body.extend_from_slice(&[0, 0]);
        let (name, def) = define(&body).unwrap();
        t.statements.insert(name, Arc::new(def));
        assert_eq!(
            t.on_query(b"DEALLOCATE S1\0"),
            QueryAction::ForwardDeallocate
        );
        assert_eq!(
            t.on_query(b"DEALLOCATE \"S1\"\0"),
            QueryAction::Answer("DEALLOCATE")
        );
    }
}
