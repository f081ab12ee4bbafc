//! Transaction-control statements the relay looks into without a SQL parser: whether a
//! request opens a transaction block that declares itself read-only, so that it may go to a
//! reader pool (`read_only_database`). Anything it does not recognise is not read-only: such
//! a transaction goes to the writer, which can run anything.

/// Whether SQL text starts with `BEGIN [WORK | TRANSACTION] modes` or `START TRANSACTION
/// modes` whose modes make the transaction read-only (the last of `READ ONLY` / `READ WRITE`
/// wins, as in PostgreSQL). Only the first statement counts (up to `;`); `complete` says
/// whether `sql` is the whole text: a statement cut off before its end is not read-only.
pub fn begins_read_only(sql: &[u8], complete: bool) -> bool {
    let sql = sql.strip_suffix(&[0]).unwrap_or(sql);
    let (statement, ended) = match sql.iter().position(|&b| b == b';') {
        Some(i) => (&sql[..i], true),
        None => (sql, complete),
    };
    if !ended {
        return false;
    }
    let Ok(text) = std::str::from_utf8(statement) else {
        return false;
    };
    // Comments and quoted text are beyond this reading: not read-only.
    if text.contains("--") || text.contains("/*") || text.contains(['"', '\'']) {
        return false;
    }
    let lower = text.to_ascii_lowercase();
    let mut words = lower
        .split(|c: char| c.is_ascii_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .peekable();
    match words.next() {
        Some("begin") => {
            if matches!(words.peek(), Some(&"work") | Some(&"transaction")) {
                words.next();
            }
        }
        Some("start") => {
            if words.next() != Some("transaction") {
                return false;
            }
        }
        _ => return false,
    }
    let mut read_only = false;
    while let Some(word) = words.next() {
        match word {
            "read" => match words.next() {
                Some("only") => read_only = true,
                Some("write") => read_only = false,
                _ => return false,
            },
            "isolation" => {
                if words.next() != Some("level") {
                    return false;
                }
                match words.next() {
                    Some("serializable") => {}
                    Some("repeatable") if words.next() == Some("read") => {}
                    Some("read") if matches!(words.next(), Some("committed" | "uncommitted")) => {}
                    _ => return false,
                }
            }
            "deferrable" => {}
            "not" if words.next() == Some("deferrable") => {}
            _ => return false,
        }
    }
    read_only
}

#[cfg(test)]
mod tests {
    use super::begins_read_only;

    #[test]
    fn read_only_transactions_are_recognised() {
        for sql in [
            "BEGIN READ ONLY",
            "begin transaction read only;",
            "BEGIN WORK READ ONLY; SELECT 1",
            "START TRANSACTION READ ONLY",
            "start transaction isolation level repeatable read, read only",
            "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE",
            "begin read write, read only\0",
            "  BEGIN\n\tREAD   ONLY  ",
            "begin isolation level read committed read only",
        ] {
            assert!(begins_read_only(sql.as_bytes(), true), "{sql:?}");
        }
    }

    #[test]
    fn anything_else_is_not() {
        for sql in [
            "BEGIN",
            "BEGIN READ WRITE",
            "begin read only, read write",
            "START READ ONLY",
            "SELECT 1",
            "BEGIN READ ONLY -- comment",
            "BEGIN /* x */ READ ONLY",
            "BEGIN READ",
            "begin isolation level read only",
            "begin read only garbage",
            "BEGINX READ ONLY",
            "SET TRANSACTION READ ONLY",
            "",
        ] {
            assert!(!begins_read_only(sql.as_bytes(), true), "{sql:?}");
        }
        // Cut off before its end: the rest could say READ WRITE.
        assert!(!begins_read_only(b"BEGIN READ ONLY", false));
        assert!(begins_read_only(b"BEGIN READ ONLY; INSERT", false));
    }
}
