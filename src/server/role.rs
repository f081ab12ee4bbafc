//! What a server is (a writer, a hot standby, read-only by default) and whether a pool's
//! `target_session_attrs` accepts it, decided the way libpq decides.
//!
//! PostgreSQL 14 and later report `in_hot_standby` and `default_transaction_read_only` at
//! login and again whenever they change, so the role is known without a query, and a server
//! that a promotion or a demotion changes says so on its own. Older servers (and any that do
//! not report them) are asked with one query at login.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::params::SessionParams;
use crate::config::TargetSessionAttrs;
use crate::protocol::messages::{self, backend, parse_error_fields, BodyReader};
use crate::stream::{read_message, Stream};

/// Largest message the role query's answer may hold.
const MAX_ANSWER: usize = 64 * 1024;

/// The query for servers that do not report their role.
pub const ROLE_QUERY: &str =
    "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('transaction_read_only')";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerRole {
    /// In recovery: a streaming standby, an Aurora reader, a server being promoted.
    pub in_recovery: bool,
    /// Transactions are read-only by default (a standby always is).
    pub read_only: bool,
}

impl ServerRole {
    /// The role from what the server reported, if it reported enough.
    pub fn reported(params: &SessionParams) -> Option<ServerRole> {
        let (hot_standby, read_only) = params.role_reports();
        let in_recovery = hot_standby?;
        let read_only = in_recovery || read_only == Some(true);
        Some(ServerRole {
            in_recovery,
            read_only,
        })
    }

    /// Whether a pool with `target` takes this server (with one host, prefer-standby takes
    /// any).
    pub fn accepted_by(self, target: TargetSessionAttrs) -> bool {
        match target {
            TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby => true,
            TargetSessionAttrs::ReadWrite => !self.read_only,
            TargetSessionAttrs::ReadOnly => self.read_only,
            TargetSessionAttrs::Primary => !self.in_recovery,
            TargetSessionAttrs::Standby => self.in_recovery,
        }
    }

    /// For errors and logs: "a hot standby", "a read-only primary", "a writer".
    pub fn describe(self) -> &'static str {
        match (self.in_recovery, self.read_only) {
            (true, _) => "a hot standby",
            (false, true) => "a primary whose transactions are read-only by default",
            (false, false) => "a writer",
        }
    }
}

/// Whether a server's role must be known for `target` at all.
pub fn must_check(target: TargetSessionAttrs) -> bool {
    !matches!(
        target,
        TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby
    )
}

/// Asks a server that did not report its role, right after login (it is idle).
pub async fn query(stream: &mut Stream, buf: &mut BytesMut) -> Result<ServerRole, String> {
    let mut out = BytesMut::with_capacity(128);
    messages::query(&mut out, ROLE_QUERY);
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("asking the server's role: {e}"))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("asking the server's role: {e}"))?;
    let mut role = None;
    let mut error = None;
    loop {
        let (tag, body) = read_message(stream, buf, MAX_ANSWER)
            .await
            .map_err(|e| format!("asking the server's role: {e}"))?;
        match tag {
            backend::DATA_ROW => role = parse_row(&body),
            backend::ERROR_RESPONSE => error = Some(parse_error_fields(&body).message),
            backend::READY_FOR_QUERY => break,
            _ => {}
        }
    }
    match (role, error) {
        (_, Some(message)) => Err(format!("the role query failed: {message}")),
        (Some(role), None) => Ok(role),
        (None, None) => Err("the role query returned no row".into()),
    }
}

/// `t`/`f` and `on`/`off` from the role query's one row.
fn parse_row(body: &[u8]) -> Option<ServerRole> {
    let mut r = BodyReader::new(body);
    if r.i16().ok()? != 2 {
        return None;
    }
    let mut column = || -> Option<Vec<u8>> {
        let len = usize::try_from(r.i32().ok()?).ok()?;
        Some(r.bytes(len).ok()?.to_vec())
    };
    let in_recovery = column()? == b"t";
    let read_only = column()? == b"on";
    Some(ServerRole {
        in_recovery,
        read_only: in_recovery || read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use TargetSessionAttrs::*;

    const WRITER: ServerRole = ServerRole {
        in_recovery: false,
        read_only: false,
    };
    const STANDBY: ServerRole = ServerRole {
        in_recovery: true,
        read_only: true,
    };
    const READ_ONLY_PRIMARY: ServerRole = ServerRole {
        in_recovery: false,
        read_only: true,
    };

    #[test]
    fn targets_accept_what_libpq_accepts() {
        let table = [
            (Any, [true, true, true]),
            (ReadWrite, [true, false, false]),
            (ReadOnly, [false, true, true]),
            (Primary, [true, false, true]),
            (Standby, [false, true, false]),
            (PreferStandby, [true, true, true]),
        ];
        for (target, [writer, standby, ro_primary]) in table {
            assert_eq!(WRITER.accepted_by(target), writer, "{target:?} writer");
            assert_eq!(STANDBY.accepted_by(target), standby, "{target:?} standby");
            assert_eq!(
                READ_ONLY_PRIMARY.accepted_by(target),
                ro_primary,
                "{target:?} read-only primary"
            );
        }
    }

    #[test]
    fn reported_parameters_give_the_role() {
        let mut p = SessionParams::default();
        assert_eq!(ServerRole::reported(&p), None, "PostgreSQL 13 and older");
        p.set_reported("in_hot_standby", "off");
        p.set_reported("default_transaction_read_only", "off");
        assert_eq!(ServerRole::reported(&p), Some(WRITER));
        p.set_reported("default_transaction_read_only", "on");
        assert_eq!(ServerRole::reported(&p), Some(READ_ONLY_PRIMARY));
        p.set_reported("in_hot_standby", "on");
        assert_eq!(ServerRole::reported(&p), Some(STANDBY));
    }

    #[test]
    fn the_role_query_row() {
        let row = |a: &[u8], b: &[u8]| {
            let mut body = 2i16.to_be_bytes().to_vec();
            for v in [a, b] {
                body.extend((v.len() as i32).to_be_bytes());
                body.extend(v);
            }
            body
        };
        assert_eq!(parse_row(&row(b"f", b"off")), Some(WRITER));
        assert_eq!(parse_row(&row(b"t", b"on")), Some(STANDBY));
        assert_eq!(parse_row(&row(b"f", b"on")), Some(READ_ONLY_PRIMARY));
        assert_eq!(parse_row(&2i16.to_be_bytes()), None, "short");
        assert_eq!(parse_row(&1i16.to_be_bytes()), None, "one column");
    }
}
