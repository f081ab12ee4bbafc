//! Encoding the console's answers: result sets, command tags, errors and notices.
//!
//! Only the simple protocol is spoken here, so every value goes out in text format.

use bytes::{BufMut, BytesMut};

use crate::protocol::messages::{frontend_message, TxStatus};

/// Backend tags the console writes that the relay never builds itself.
mod tag {
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const DATA_ROW: u8 = b'D';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const EMPTY_QUERY: u8 = b'I';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
}

/// A column's type as announced in RowDescription (text format either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Text,
    /// iampool's own counters (SHOW TOKENS), and PgBouncer's few `int8` columns.
    Int8,
    /// Counts, ports, flags and ids, as PgBouncer announces most of its numbers.
    Int4,
    /// PgBouncer's statistics (SHOW STATS and friends), which can outgrow 64 bits there.
    Numeric,
}

impl Ty {
    /// (type OID, type length).
    fn oid_len(self) -> (i32, i16) {
        match self {
            Ty::Text => (25, -1),
            Ty::Int8 => (20, 8),
            Ty::Int4 => (23, 4),
            Ty::Numeric => (1700, -1),
        }
    }
}

/// One value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Text(String),
    Int(i64),
    Null,
}

impl From<&str> for Cell {
    fn from(s: &str) -> Cell {
        Cell::Text(s.to_owned())
    }
}

impl From<String> for Cell {
    fn from(s: String) -> Cell {
        Cell::Text(s)
    }
}

impl From<i64> for Cell {
    fn from(n: i64) -> Cell {
        Cell::Int(n)
    }
}

impl From<u64> for Cell {
    fn from(n: u64) -> Cell {
        Cell::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

impl From<i32> for Cell {
    fn from(n: i32) -> Cell {
        Cell::Int(n.into())
    }
}

impl From<usize> for Cell {
    fn from(n: usize) -> Cell {
        Cell::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

impl From<bool> for Cell {
    fn from(b: bool) -> Cell {
        Cell::Int(b.into())
    }
}

impl<T: Into<Cell>> From<Option<T>> for Cell {
    fn from(v: Option<T>) -> Cell {
        v.map_or(Cell::Null, Into::into)
    }
}

/// A result set: fixed columns, then rows of exactly that many cells.
#[derive(Debug, Clone)]
pub struct Table {
    columns: &'static [(&'static str, Ty)],
    rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(columns: &'static [(&'static str, Ty)]) -> Table {
        Table {
            columns,
            rows: Vec::new(),
        }
    }

    /// Adds a row; a row of the wrong width is a bug in the caller, padded or cut in release.
    pub fn push(&mut self, mut row: Vec<Cell>) {
        debug_assert_eq!(row.len(), self.columns.len(), "row width");
        row.resize(self.columns.len(), Cell::Null);
        self.rows.push(row);
    }

    /// RowDescription, DataRows and CommandComplete `SHOW`.
    pub fn encode(&self, out: &mut BytesMut) {
        frontend_message(out, tag::ROW_DESCRIPTION, |b| {
            b.put_i16(self.columns.len() as i16);
            for (name, ty) in self.columns {
                let (oid, len) = ty.oid_len();
                put_cstr(b, name);
                b.put_i32(0); // table OID
                b.put_i16(0); // column number
                b.put_i32(oid);
                b.put_i16(len);
                b.put_i32(-1); // type modifier
                b.put_i16(0); // text format
            }
        });
        for row in &self.rows {
            frontend_message(out, tag::DATA_ROW, |b| {
                b.put_i16(row.len() as i16);
                for cell in row {
                    let text = match cell {
                        Cell::Text(s) => s.clone(),
                        Cell::Int(n) => n.to_string(),
                        Cell::Null => {
                            b.put_i32(-1);
                            continue;
                        }
                    };
                    b.put_i32(text.len() as i32);
                    b.put_slice(text.as_bytes());
                }
            });
        }
        command_complete(out, "SHOW");
    }
}

fn put_cstr(b: &mut BytesMut, s: &str) {
    // A NUL inside would end the string early on the client; no value here carries one
    // legitimately, so drop it rather than desynchronise the stream.
    b.extend(s.bytes().filter(|&c| c != 0));
    b.put_u8(0);
}

pub fn command_complete(out: &mut BytesMut, command: &str) {
    frontend_message(out, tag::COMMAND_COMPLETE, |b| put_cstr(b, command));
}

pub fn empty_query(out: &mut BytesMut) {
    frontend_message(out, tag::EMPTY_QUERY, |_| {});
}

pub fn ready(out: &mut BytesMut) {
    crate::protocol::messages::ready_for_query(out, TxStatus::Idle);
}

/// An ERROR (the session goes on) with an optional hint.
pub fn error(out: &mut BytesMut, code: &str, message: &str, hint: Option<&str>) {
    fields(out, tag::ERROR_RESPONSE, "ERROR", code, message, hint);
}

pub fn notice(out: &mut BytesMut, message: &str) {
    fields(out, tag::NOTICE_RESPONSE, "NOTICE", "00000", message, None);
}

fn fields(out: &mut BytesMut, t: u8, severity: &str, code: &str, msg: &str, hint: Option<&str>) {
    frontend_message(out, t, |b| {
        for (field, value) in [
            (b'S', Some(severity)),
            (b'V', Some(severity)),
            (b'C', Some(code)),
            (b'M', Some(msg)),
            (b'H', hint),
        ] {
            if let Some(value) = value {
                b.put_u8(field);
                put_cstr(b, value);
            }
        }
        b.put_u8(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::messages::{parse_error_fields, BodyReader};

    #[test]
    fn table_layout() {
        static COLS: [(&str, Ty); 2] = [("name", Ty::Text), ("n", Ty::Int8)];
        let mut t = Table::new(&COLS);
        t.push(vec!["a".into(), 7i64.into()]);
        t.push(vec![Cell::Null, 0usize.into()]);
        let mut out = BytesMut::new();
        t.encode(&mut out);
        let mut r = BodyReader::new(&out);
        assert_eq!(r.u8(), Ok(b'T'));
        let len = r.i32().unwrap() as usize;
        let mut body = BodyReader::new(r.bytes(len - 4).unwrap());
        assert_eq!(body.bytes(2).unwrap(), &[0, 2]);
        assert_eq!(body.cstr(), Ok("name"));
        let rest = body.bytes(18).unwrap();
        assert_eq!(&rest[6..10], &25i32.to_be_bytes());
        assert_eq!(body.cstr(), Ok("n"));
        assert_eq!(r.u8(), Ok(b'D'));
        let len = r.i32().unwrap() as usize;
        assert_eq!(
            r.bytes(len - 4).unwrap(),
            &[0, 2, 0, 0, 0, 1, b'a', 0, 0, 0, 1, b'7']
        );
        assert_eq!(r.u8(), Ok(b'D'));
        let len = r.i32().unwrap() as usize;
        assert_eq!(
            r.bytes(len - 4).unwrap(),
            &[0, 2, 255, 255, 255, 255, 0, 0, 0, 1, b'0']
        );
        assert_eq!(r.u8(), Ok(b'C'));
        let len = r.i32().unwrap() as usize;
        assert_eq!(r.bytes(len - 4).unwrap(), b"SHOW\0");
        assert!(r.is_empty());
    }

    #[test]
    fn error_with_hint() {
        let mut out = BytesMut::new();
        error(&mut out, "42601", "bad", Some("try SHOW HELP"));
        let f = parse_error_fields(&out[5..]);
        assert_eq!((f.code.as_str(), f.message.as_str()), ("42601", "bad"));
        assert!(out.windows(13).any(|w| w == b"Htry SHOW HEL"));
    }
}
