//! The admin console's parser: any text splits into statements and commands without
//! panicking, and splitting is stable: the words of each statement, quoted back the way the
//! console documents (`"..."` with `""` for a quote), split into the same words again.
#![no_main]

use iampool::admin::command::{parse, statements};
use libfuzzer_sys::fuzz_target;

fn quote(word: &str) -> String {
    format!("\"{}\"", word.replace('"', "\"\""))
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = statements(sql);
    let mut words_ok = Vec::new();
    for statement in &parsed {
        match statement {
            Ok(words) => {
                assert!(!words.is_empty(), "empty statements are dropped");
                if let Ok(command) = parse(words) {
                    let _ = (command.tag(), command.read_only());
                }
                words_ok.push(words.clone());
            }
            Err(e) => {
                let _ = e.hint();
            }
        }
    }
    // An error ends the list: nothing after an unterminated quote is a statement.
    if let Some(i) = parsed.iter().position(Result::is_err) {
        assert_eq!(i, parsed.len() - 1);
    }
    let requoted: String = words_ok
        .iter()
        .map(|w| w.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(";\n");
    let again: Vec<Vec<String>> = statements(&requoted)
        .into_iter()
        .map(|s| s.expect("quoted words split cleanly"))
        .collect();
    assert_eq!(again, words_ok);
});
