//! Message tags and the few messages iampool builds or reads itself.
//!
//! The startup phase encodes through pgwire's message types; strings that iampool reads are
//! decoded strictly here (invalid UTF-8 is a protocol violation, never replaced), and only
//! from frames that the framer has already split and length-checked.

use bytes::{BufMut, BytesMut};
use pgwire::messages::response::{ErrorResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};
use pgwire::messages::Message;

/// Frontend (client to server) message tags.
pub mod frontend {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const FLUSH: u8 = b'H';
    pub const SYNC: u8 = b'S';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const TERMINATE: u8 = b'X';
    /// PasswordMessage, SASLInitialResponse and SASLResponse share this tag.
    pub const PASSWORD: u8 = b'p';
}

/// Backend (server to client) message tags.
pub mod backend {
    pub const AUTHENTICATION: u8 = b'R';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const NO_DATA: u8 = b'n';
    pub const DATA_ROW: u8 = b'D';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}

/// Authentication request codes (`R` messages).
pub mod auth {
    pub const OK: i32 = 0;
    pub const CLEARTEXT_PASSWORD: i32 = 3;
    pub const MD5_PASSWORD: i32 = 5;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// SQLSTATE codes iampool reports itself.
pub mod sqlstate {
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    pub const QUERY_CANCELED: &str = "57014";
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    pub const SQLCLIENT_UNABLE_TO_ESTABLISH: &str = "08001";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
}

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// Encodes an ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    let sev = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    let msg = ErrorResponse::new(vec![
        (b'S', sev.to_owned()),
        (b'V', sev.to_owned()),
        (b'C', code.to_owned()),
        (b'M', message.to_owned()),
    ]);
    // Encoding into a BytesMut cannot fail for these field types.
    let _ = msg.encode(buf);
}

pub fn authentication(buf: &mut BytesMut, auth: Authentication) {
    let _ = auth.encode(buf);
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    let _ = ParameterStatus::new(name.to_owned(), value.to_owned()).encode(buf);
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    let _ = BackendKeyData::new(pid, SecretKey::I32(secret)).encode(buf);
}

pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    let st = match status {
        TxStatus::Idle => TransactionStatus::Idle,
        TxStatus::InTransaction => TransactionStatus::Transaction,
        TxStatus::Failed => TransactionStatus::Error,
    };
    let _ = ReadyForQuery::new(st).encode(buf);
}

/// A CommandComplete with its tag (`ROLLBACK`, `SELECT 1`).
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    buf.put_u8(backend::COMMAND_COMPLETE);
    buf.put_i32((4 + tag.len() + 1) as i32);
    buf.put_slice(tag.as_bytes());
    buf.put_u8(0);
}

/// A NegotiateProtocolVersion telling the client we speak 3.0 and which `_pq_.` options we ignored.
pub fn negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unsupported: &[String]) {
    let len = 4 + 4 + 4 + unsupported.iter().map(|s| s.len() + 1).sum::<usize>();
    buf.put_u8(backend::NEGOTIATE_PROTOCOL_VERSION);
    buf.put_i32(len as i32);
    buf.put_i32(minor);
    buf.put_i32(unsupported.len() as i32);
    for o in unsupported {
        buf.put_slice(o.as_bytes());
        buf.put_u8(0);
    }
}

/// Appends a frontend message header + body written by `f`, patching the length.
pub fn frontend_message(buf: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    f(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// A simple Query message.
pub fn query(buf: &mut BytesMut, sql: &str) {
    frontend_message(buf, frontend::QUERY, |b| {
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
    });
}

/// A startup packet (protocol 3.0) with the given parameters.
pub fn startup(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let at = buf.len();
    buf.put_i32(0);
    buf.put_u32(crate::protocol::framing::PROTOCOL_3_0);
    for (k, v) in params {
        buf.put_slice(k.as_bytes());
        buf.put_u8(0);
        buf.put_slice(v.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// A reader over a message body that decodes strictly and never panics.
pub struct BodyReader<'a> {
    buf: &'a [u8],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message truncated")]
    Truncated,
    #[error("string is not valid UTF-8")]
    BadUtf8,
}

impl<'a> BodyReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        BodyReader { buf }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(DecodeError::Truncated);
        }
        let v = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        self.buf = &self.buf[4..];
        Ok(v)
    }

    pub fn i16(&mut self) -> Result<i16, DecodeError> {
        let v = self.bytes(2)?;
        Ok(i16::from_be_bytes([v[0], v[1]]))
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.buf.split_first().ok_or(DecodeError::Truncated)?;
        self.buf = rest;
        Ok(b)
    }

    /// A NUL-terminated byte string.
    pub fn cbytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let nul = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated)?;
        let s = &self.buf[..nul];
        self.buf = &self.buf[nul + 1..];
        Ok(s)
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.cbytes()?).map_err(|_| DecodeError::BadUtf8)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
}

/// The fields of an ErrorResponse / NoticeResponse that iampool looks at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    /// Non-localized severity (V), falling back to S.
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    pub fn is_fatal(&self) -> bool {
        self.severity == "FATAL" || self.severity == "PANIC"
    }
}

/// Decodes an ErrorResponse body. Lossy on text (server messages may be in any encoding).
pub fn parse_error_fields(body: &[u8]) -> ErrorFields {
    let mut r = BodyReader::new(body);
    let mut f = ErrorFields::default();
    let mut localized = None;
    while let Ok(code) = r.u8() {
        if code == 0 {
            break;
        }
        let Ok(value) = r.cbytes() else { break };
        let value = String::from_utf8_lossy(value).into_owned();
        match code {
            b'V' => f.severity = value,
            b'S' => localized = Some(value),
            b'C' => f.code = value,
            b'M' => f.message = value,
            _ => {}
        }
    }
    if f.severity.is_empty() {
        f.severity = localized.unwrap_or_default();
    }
    f
}

/// Decodes a ParameterStatus body into (name, value).
pub fn parse_parameter_status(body: &[u8]) -> Result<(&str, &str), DecodeError> {
    let mut r = BodyReader::new(body);
    Ok((r.cstr()?, r.cstr()?))
}

/// Quotes a value as an escape string literal, safe under any standard_conforming_strings.
pub fn quote_literal(value: &str) -> String {
    let mut s = String::with_capacity(value.len() + 3);
    s.push_str("E'");
    for c in value.chars() {
        match c {
            '\'' => s.push_str("''"),
            '\\' => s.push_str("\\\\"),
            c => s.push(c),
        }
    }
    s.push('\'');
    s
}

/// Quotes an identifier (parameter names like "DateStyle" are case-insensitive, but quoting keeps odd names safe).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_round_trip() {
        let mut b = BytesMut::new();
        error_response(
            &mut b,
            Severity::Fatal,
            "28P01",
            "password authentication failed",
        );
        assert_eq!(b[0], b'E');
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len + 1, b.len());
        let f = parse_error_fields(&b[5..]);
        assert_eq!(f.code, "28P01");
        assert!(f.is_fatal());
        assert_eq!(f.message, "password authentication failed");
    }

    #[test]
    fn body_reader_never_panics_on_truncation() {
        let mut r = BodyReader::new(b"abc");
        assert_eq!(r.cstr(), Err(DecodeError::Truncated));
        let mut r = BodyReader::new(&[1, 2]);
        assert_eq!(r.i32(), Err(DecodeError::Truncated));
        let mut r = BodyReader::new(&[0xff, 0]);
        assert_eq!(r.cstr(), Err(DecodeError::BadUtf8));
        assert!(parse_parameter_status(b"only\0").is_err());
        let f = parse_error_fields(b"Cx");
        assert_eq!(f.code, "");
    }

    #[test]
    fn literal_quoting() {
        assert_eq!(quote_literal("it's a \\ test"), "E'it''s a \\\\ test'");
        assert_eq!(quote_ident("Date\"Style"), "\"Date\"\"Style\"");
    }

    #[test]
    fn startup_packet_layout() {
        let mut b = BytesMut::new();
        startup(&mut b, &[("user", "u"), ("database", "d")]);
        assert_eq!(
            crate::protocol::framing::startup_packet_len(&b).unwrap(),
            Some(b.len())
        );
        assert_eq!(&b[b.len() - 2..], &[0, 0]);
    }
}
