//! A YAML stream cut into its documents, each kept as the text it was written as, so that
//! documents iampool does not change come out byte for byte as they went in.

/// One document of a stream: the `---` line that opened it (if any) and its text.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Document<'a> {
    /// The marker line, line end included (`---\n`); None for a first document without one.
    pub marker: Option<&'a str>,
    /// Everything up to the next marker, line ends included. Content written on the marker
    /// line itself (`--- {kind: Pod}`) starts it.
    pub body: &'a str,
    /// 1-based line of the body's first line, for errors.
    pub line: usize,
}

/// A line that starts a document: `---` at column 0, alone or followed by a space or tab.
/// (At column 0 it cannot be content: YAML forbids it even inside block scalars.)
fn marker_len(line: &str) -> Option<usize> {
    let rest = line.strip_prefix("---")?;
    match rest.as_bytes().first() {
        None | Some(b'\n' | b'\r') => Some(line.len()),
        Some(b' ' | b'\t') => Some(3),
        _ => None,
    }
}

/// Splits `text` into documents. A `...` end marker stays in the body it ends (the parser
/// accepts it there).
pub(super) fn split(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut marker = None;
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if let Some(len) = marker_len(line) {
            if offset > start || marker.is_some() {
                docs.push(Document {
                    marker,
                    body: &text[start..offset],
                    line: start_line,
                });
            }
            marker = Some(&text[offset..offset + len]);
            start = offset + len;
            start_line = index + 1 + usize::from(len == line.len());
        }
        offset += line.len();
    }
    if offset > start || marker.is_some() {
        docs.push(Document {
            marker,
            body: &text[start..],
            line: start_line,
        });
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies(text: &str) -> Vec<(Option<&str>, &str)> {
        split(text)
            .into_iter()
            .map(|d| (d.marker, d.body))
            .collect()
    }

    #[test]
    fn documents_and_their_markers() {
        assert_eq!(bodies("a: 1\n"), vec![(None, "a: 1\n")]);
        assert_eq!(
            bodies("---\na: 1\n---\nb: 2\n"),
            vec![(Some("---\n"), "a: 1\n"), (Some("---\n"), "b: 2\n")]
        );
        assert_eq!(
            bodies("# c\na: 1\n--- # two\nb: 2"),
            vec![(None, "# c\na: 1\n"), (Some("---"), " # two\nb: 2")]
        );
        // Not markers: indented, or more dashes, or dashes then text.
        assert_eq!(
            bodies("a: |\n  ---\nb: ----\n---x: 1\n"),
            vec![(None, "a: |\n  ---\nb: ----\n---x: 1\n")]
        );
        // An empty document between two markers is kept.
        assert_eq!(
            bodies("---\n---\na: 1\n"),
            vec![(Some("---\n"), ""), (Some("---\n"), "a: 1\n")]
        );
    }

    #[test]
    fn joining_the_parts_gives_the_input_back() {
        for text in [
            "",
            "a: 1",
            "---\r\na: 1\r\n---\r\n",
            "x\n--- y\n...\n---\n\n",
        ] {
            let joined: String = split(text)
                .iter()
                .map(|d| format!("{}{}", d.marker.unwrap_or(""), d.body))
                .collect();
            assert_eq!(joined, text);
        }
    }

    #[test]
    fn lines_count_from_one() {
        let docs = split("a: 1\n---\nb: 2\n--- c: 3\n");
        let lines: Vec<usize> = docs.iter().map(|d| d.line).collect();
        assert_eq!(lines, vec![1, 3, 4]);
    }
}
