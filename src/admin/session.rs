//! One admin console session: reads simple queries, answers them, until the client leaves
//! or iampool shuts down.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::debug;

use super::command::{self, SyntaxError};
use super::execute::{self, code};
use super::reply;
use super::{Context, Role};
use crate::client::cancel::{CancelSlot, Ending};
use crate::protocol::messages::{self, frontend, sqlstate, BodyReader, DecodeError, Severity};
use crate::stream::{read_message, Stream};

/// Console statements are short; this bounds what a client can make the console buffer.
const MAX_MESSAGE: usize = 1 << 20;

const EXTENDED: &str = "the admin console supports only the simple query protocol";

/// Who is connected, for privileges and log lines.
pub struct Console {
    pub ctx: Arc<dyn Context>,
    pub stream: Stream,
    /// Bytes the client sent after its startup packet.
    pub buf: BytesMut,
    pub role: Role,
    pub user: String,
    /// The client's slot: iampool's shutdown, KILL and KILL_CLIENT end the session through it.
    pub slot: Arc<CancelSlot>,
}

/// What to do after one client message.
enum Next {
    Continue,
    Close,
}

impl Console {
    pub async fn run(mut self) {
        let max = self.ctx.config().max_message_size.min(MAX_MESSAGE);
        let mut shutdown = self.ctx.shutdown_signal();
        // After an extended-protocol error everything up to Sync is ignored, as PostgreSQL does.
        let mut skipping = false;
        loop {
            let read = tokio::select! {
                r = read_message(&mut self.stream, &mut self.buf, max) => r,
                _ = wait_for_shutdown(&mut shutdown) => {
                    self.fatal(sqlstate::ADMIN_SHUTDOWN, Ending::Shutdown.message()).await;
                    break;
                }
                // Ended from the console (KILL_CLIENT).
                _ = self.slot.ended() => {
                    let why = self.slot.ending().unwrap_or(Ending::Shutdown);
                    self.fatal(sqlstate::ADMIN_SHUTDOWN, why.message()).await;
                    break;
                }
            };
            let (tag, body) = match read {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    self.fatal(sqlstate::PROTOCOL_VIOLATION, &e.to_string())
                        .await;
                    break;
                }
                Err(_) => break,
            };
            let mut out = BytesMut::new();
            let next = match tag {
                frontend::TERMINATE => Next::Close,
                frontend::QUERY if !skipping => self.query(&body, &mut out).await,
                frontend::SYNC => {
                    skipping = false;
                    reply::ready(&mut out);
                    Next::Continue
                }
                frontend::PARSE
                | frontend::BIND
                | frontend::DESCRIBE
                | frontend::EXECUTE
                | frontend::CLOSE
                | frontend::FLUSH
                | frontend::QUERY => {
                    if !skipping && tag != frontend::FLUSH {
                        reply::error(&mut out, sqlstate::FEATURE_NOT_SUPPORTED, EXTENDED, None);
                        skipping = true;
                    }
                    Next::Continue
                }
                frontend::FUNCTION_CALL => {
                    reply::error(&mut out, sqlstate::FEATURE_NOT_SUPPORTED, EXTENDED, None);
                    reply::ready(&mut out);
                    Next::Continue
                }
                // Copy messages outside a copy are ignored, as PostgreSQL does.
                frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL => Next::Continue,
                other => {
                    let message = format!("unexpected message type 0x{other:02x}");
                    self.fatal(sqlstate::PROTOCOL_VIOLATION, &message).await;
                    Next::Close
                }
            };
            if !out.is_empty() && self.write(&out).await.is_err() {
                break;
            }
            if let Next::Close = next {
                break;
            }
        }
        let _ = self.stream.shutdown().await;
    }

    /// A simple Query: each statement in turn; the first error ends the batch.
    async fn query(&mut self, body: &[u8], out: &mut BytesMut) -> Next {
        let mut r = BodyReader::new(body);
        let sql = match r.cstr() {
            Ok(sql) if r.is_empty() => sql,
            Ok(_) | Err(DecodeError::Truncated) => {
                self.fatal(sqlstate::PROTOCOL_VIOLATION, "malformed Query message")
                    .await;
                return Next::Close;
            }
            Err(DecodeError::BadUtf8) => {
                reply::error(
                    out,
                    "22021",
                    "invalid byte sequence for encoding \"UTF8\"",
                    None,
                );
                reply::ready(out);
                return Next::Continue;
            }
        };
        let statements = command::statements(sql);
        if statements.is_empty() {
            reply::empty_query(out);
        }
        for words in statements {
            let result = match words.and_then(|w| command::parse(&w)) {
                Err(e) => Err(syntax(e)),
                Ok(cmd) => {
                    // What is ready goes out before a command that may wait (PAUSE).
                    if !out.is_empty() && self.write(out).await.is_err() {
                        return Next::Close;
                    }
                    out.clear();
                    debug!(user = %self.user, command = ?cmd, "admin command");
                    execute::execute(&*self.ctx, self.role, &self.user, &cmd, out).await
                }
            };
            if let Err(f) = result {
                reply::error(out, f.code, &f.message, f.hint.as_deref());
                break;
            }
        }
        reply::ready(out);
        Next::Continue
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    async fn fatal(&mut self, code: &str, message: &str) {
        let mut b = BytesMut::new();
        messages::error_response(&mut b, Severity::Fatal, code, message);
        let _ = self.write(&b).await;
    }
}

fn syntax(e: SyntaxError) -> execute::Failed {
    execute::Failed {
        code: code::SYNTAX_ERROR,
        hint: Some(e.hint()),
        message: e.message,
    }
}

async fn wait_for_shutdown(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
