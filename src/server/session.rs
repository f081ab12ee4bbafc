//! Work iampool does on a server on its own behalf, between clients' requests: applying a
//! client's session parameters, reading the answers to its own statements up to
//! ReadyForQuery, and the session-mode reset.

use std::fmt;
use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::params::SessionParams;
use super::ServerConn;
use crate::protocol::messages::{
    self, backend, parse_error_fields, parse_parameter_status, TxStatus,
};
use crate::stream::read_message;

/// Back to the connection's startup settings: every parameter, and the role and session
/// user (which RESET ALL leaves alone).
const RESET_SETTINGS: &str = "RESET ALL; RESET ROLE; RESET SESSION AUTHORIZATION";

/// Opens a transaction block and fails it, with a message that says why in the server's log.
const FAILED_BLOCK_SQL: &str = "BEGIN; DO $iampool$BEGIN RAISE EXCEPTION USING ERRCODE = '25P02', \
     MESSAGE = 'iampool: the transaction of this client was lost with its previous server \
     connection; it stays aborted until the client rolls back'; END$iampool$";

/// Why iampool's own statement on a server did not leave it clean and idle.
#[derive(Debug)]
pub enum SessionError {
    /// The server answered with an error.
    Server { code: String, message: String },
    /// Reading or writing failed, or took too long.
    Io(io::Error),
    /// The server answered, but not as expected (e.g. not idle afterwards, a bad message).
    BadState(String),
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Server { code, message } => write!(f, "server error {code}: {message}"),
            SessionError::Io(e) => write!(f, "I/O error: {e}"),
            SessionError::BadState(m) => write!(f, "unexpected server state: {m}"),
        }
    }
}

impl std::error::Error for SessionError {}

impl From<io::Error> for SessionError {
    fn from(e: io::Error) -> Self {
        SessionError::Io(e)
    }
}

/// What a server said while answering one of iampool's statements.
#[derive(Debug, Default)]
struct Answers {
    /// ParameterStatus values, in order (already recorded in the server's params).
    reported: Vec<(String, String)>,
    /// CommandComplete tags, in order.
    commands: Vec<String>,
    /// The first DataRow's values as text (None for NULL).
    row: Vec<Option<Vec<u8>>>,
}

impl ServerConn {
    /// Brings this server's session parameters in line with `client`'s before the client's
    /// request. What the server reported that changes the client's view is recorded in
    /// `client` and appended to `to_client` as ParameterStatus messages, for the caller to
    /// pass on: they carry PostgreSQL's canonical spelling (`ISO, DMY` for `iso, dmy`).
    /// A value the server accepted without reporting a change is what it already had, so
    /// the client learns that spelling too.
    pub async fn sync_params(
        &mut self,
        client_id: u64,
        client: &mut SessionParams,
        to_client: &mut BytesMut,
    ) -> Result<(), SessionError> {
        let settled = self.params.settings_are(client_id, client);
        if !settled && self.params.settings_dirty() {
            // Another client (or this one, on another server since) may have left a setting
            // or a role behind: reset all of it before this client sees the server. What the
            // reset changes among reported parameters is recorded from the server's
            // ParameterStatus.
            if let Err(e) = self.run_own(RESET_SETTINGS).await {
                self.params.mark_extra_unknown();
                return Err(e);
            }
            self.params.settings_reset();
        }
        self.sync_startup_params(client, to_client).await?;
        if !settled {
            // The client's own SET and RESET statements, replayed as it sent them.
            if let Some(sql) = client.replay_sql() {
                self.run_own(&sql).await?;
                self.params.settings_now(client_id, client);
            }
        }
        Ok(())
    }

    /// The parameters a client's startup (and ParameterStatus) gave it.
    async fn sync_startup_params(
        &mut self,
        client: &mut SessionParams,
        to_client: &mut BytesMut,
    ) -> Result<(), SessionError> {
        let Some(sync) = SessionParams::sync_sql(client, &mut self.params) else {
            return Ok(());
        };
        let answers = match self.run_own(&sync.sql).await {
            Ok(a) => a,
            Err(e) => {
                // Whatever did or did not get applied, this record cannot be trusted.
                self.params.mark_extra_unknown();
                return Err(e);
            }
        };
        for (n, v) in &answers.reported {
            if client.set_reported(n, v) {
                messages::parameter_status(to_client, n, v);
            }
        }
        for name in sync.reported {
            if answers
                .reported
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(name))
            {
                continue;
            }
            if let Some(v) = self.params.reported(name).map(str::to_owned) {
                if client.set_reported(name, &v) {
                    messages::parameter_status(to_client, name, &v);
                }
            }
        }
        Ok(())
    }

    /// Session mode, after a client is done: runs `sql` (`server_reset_query`) within
    /// `limit`. On success the server is idle and its recorded parameters say what the reset
    /// did: `DISCARD ALL` / `RESET ALL` return every setting to the connection's startup
    /// values (reported ones come back through ParameterStatus); after any other reset
    /// iampool no longer trusts what it set.
    pub async fn reset_session(&mut self, sql: &str, limit: Duration) -> Result<(), SessionError> {
        if sql.trim().is_empty() {
            return Ok(());
        }
        let answers = match tokio::time::timeout(limit, self.run_own(sql)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(SessionError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("server_reset_query took longer than {limit:?}"),
                )))
            }
        };
        let words: Vec<&str> = sql
            .split(|c: char| c.is_ascii_whitespace() || c == ';')
            .filter(|w| !w.is_empty())
            .collect();
        let resets_all = matches!(words.as_slice(), [a, b]
            if (a.eq_ignore_ascii_case("discard") || a.eq_ignore_ascii_case("reset"))
                && b.eq_ignore_ascii_case("all"));
        if resets_all {
            self.params.forget_extra();
        } else {
            for tag in &answers.commands {
                if tag == "DISCARD ALL" {
                    self.params.forget_extra();
                } else {
                    self.params.mark_extra_unknown();
                }
            }
        }
        Ok(())
    }

    /// Runs `sql` (`server_check_query`) on this idle server within `limit`: Ok when the
    /// server answers it and is idle again.
    pub async fn check_alive(&mut self, sql: &str, limit: Duration) -> Result<(), SessionError> {
        match tokio::time::timeout(limit, self.run_own(sql)).await {
            Ok(r) => r.map(drop),
            Err(_) => Err(SessionError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("server_check_query took longer than {limit:?}"),
            ))),
        }
    }

    /// Puts this idle server inside a failed transaction block, for a client whose
    /// transaction was lost with its previous server: PostgreSQL then answers the client's
    /// next requests as it would inside that transaction (25P02 until the client rolls back).
    pub async fn enter_failed_block(&mut self) -> Result<(), SessionError> {
        let mut out = BytesMut::new();
        messages::query(&mut out, FAILED_BLOCK_SQL);
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        match self.drain_to_ready().await? {
            (Some(_), TxStatus::Failed, _) => Ok(()),
            (error, status, _) => Err(SessionError::BadState(format!(
                "transaction status {status:?} (error {error:?}) after opening a failed block"
            ))),
        }
    }

    /// Asks this idle server which kinds of session state it holds (bits over
    /// [`crate::protocol::session_state::KINDS`]), for a pinned client.
    pub async fn session_state_left(&mut self, limit: Duration) -> Result<u8, SessionError> {
        let sql = crate::client::pin::PROBE_SQL;
        let answers = match tokio::time::timeout(limit, self.run_own(sql)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(SessionError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("asking the server for its session state took longer than {limit:?}"),
                )))
            }
        };
        let mut bits = 0u8;
        for (i, v) in answers.row.iter().enumerate() {
            match v.as_deref() {
                Some(b"t") => bits |= 1 << i,
                Some(b"f") => {}
                other => {
                    return Err(SessionError::BadState(format!(
                        "session state probe answered {other:?}"
                    )))
                }
            }
        }
        if answers.row.len() != 5 {
            return Err(SessionError::BadState(format!(
                "session state probe answered {} columns",
                answers.row.len()
            )));
        }
        Ok(bits)
    }

    /// Sends one of iampool's own statements and reads the answers up to ReadyForQuery,
    /// which must say idle.
    async fn run_own(&mut self, sql: &str) -> Result<Answers, SessionError> {
        let mut out = BytesMut::new();
        messages::query(&mut out, sql);
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        let (error, status, answers) = self.drain_to_ready().await?;
        if let Some((code, message)) = error {
            return Err(SessionError::Server { code, message });
        }
        if status != TxStatus::Idle {
            return Err(SessionError::BadState(format!(
                "transaction status {status:?} after iampool's own statement"
            )));
        }
        Ok(answers)
    }

    /// Reads a server's answers to iampool's own query up to ReadyForQuery. ParameterStatus
    /// values are recorded in the server's params as they arrive.
    async fn drain_to_ready(
        &mut self,
    ) -> Result<(Option<(String, String)>, TxStatus, Answers), SessionError> {
        let mut error = None;
        let mut answers = Answers::default();
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            let (tag, body) = read_message(
                &mut self.stream,
                &mut buf,
                crate::protocol::framing::MAX_SERVER_MESSAGE,
            )
            .await?;
            match tag {
                backend::READY_FOR_QUERY => {
                    let status = body
                        .first()
                        .copied()
                        .and_then(TxStatus::from_byte)
                        .ok_or_else(|| SessionError::BadState("bad ReadyForQuery".into()))?;
                    if !buf.is_empty() {
                        self.leftover.extend_from_slice(&buf);
                    }
                    return Ok((error, status, answers));
                }
                backend::PARAMETER_STATUS => {
                    if let Ok((n, v)) = parse_parameter_status(&body) {
                        self.params.set_reported(n, v);
                        answers.reported.push((n.to_owned(), v.to_owned()));
                    }
                }
                backend::COMMAND_COMPLETE => {
                    let tag = body.strip_suffix(&[0]).unwrap_or(&body);
                    answers
                        .commands
                        .push(String::from_utf8_lossy(tag).into_owned());
                }
                backend::ERROR_RESPONSE => {
                    let f = parse_error_fields(&body);
                    error = Some((f.code, f.message));
                }
                backend::DATA_ROW if answers.row.is_empty() => {
                    answers.row = data_row(&body)
                        .ok_or_else(|| SessionError::BadState("malformed DataRow".into()))?;
                }
                _ => {}
            }
        }
    }
}

/// A DataRow body's values (None for NULL).
fn data_row(body: &[u8]) -> Option<Vec<Option<Vec<u8>>>> {
    let n = u16::from_be_bytes(body.get(..2)?.try_into().ok()?) as usize;
    let mut at = 2;
    let mut values = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            values.push(None);
            continue;
        }
        let v = body.get(at..at + len as usize)?;
        at += len as usize;
        values.push(Some(v.to_vec()));
    }
    Some(values)
}
