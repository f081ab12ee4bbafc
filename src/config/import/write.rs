//! The imported configuration as TOML: top-level keys in key-table order, then one
//! `[databases.NAME]` table per database, each key under a comment saying where it came from.

use std::fmt::Write;

use super::super::keys::KEYS;
use super::convert::{Item, Plan};

/// Where a key sorts: `upstream` and `password` first in a database, then the key table's order.
fn rank(item: &Item) -> usize {
    match item.key {
        "upstream" => 0,
        "password" => 1,
        key => {
            2 + KEYS
                .iter()
                .position(|k| k.name == key)
                .unwrap_or(KEYS.len())
        }
    }
}

/// A TOML key: bare when it can be, else a quoted string.
fn toml_key(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        name.to_string()
    } else {
        toml::Value::String(name.to_string()).to_string()
    }
}

/// Text for a comment line: TOML comments take no control characters but tab.
fn comment(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

fn items(out: &mut String, items: &[Item]) {
    let mut sorted: Vec<&Item> = items.iter().collect();
    sorted.sort_by_key(|item| rank(item));
    for item in sorted {
        let _ = writeln!(out, "# {}", comment(&item.from));
        let _ = writeln!(out, "{} = {}", item.key, item.value);
    }
}

pub fn toml_text(plan: &Plan, source: &str) -> String {
    let mut out = format!(
        "# iampool configuration written by `iampool import-pgbouncer` from {}.\n\
         # The import's report (stderr) says what was carried over, what differs and what was not.\n",
        comment(source)
    );
    if plan
        .databases
        .iter()
        .any(|d| d.items.iter().any(|item| item.secret))
    {
        out.push_str("# It holds server passwords: keep it as private as pgbouncer.ini.\n");
    }
    out.push('\n');
    items(&mut out, &plan.globals);
    for database in &plan.databases {
        let from = format!("{} [databases] {}", database.at, database.name);
        let _ = writeln!(out, "\n# {}", comment(&from));
        let _ = writeln!(out, "[databases.{}]", toml_key(&database.name));
        items(&mut out, &database.items);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::convert::Database;
    use super::super::ini::Location;
    use super::*;

    fn item(key: &'static str, value: toml::Value) -> Item {
        Item {
            key,
            value,
            from: format!("where {key} came from"),
            secret: key == "password",
        }
    }

    #[test]
    fn keys_in_table_order_under_their_comments() {
        let plan = Plan {
            globals: vec![
                item("pool_size", toml::Value::Integer(20)),
                item("listen", toml::Value::String("0.0.0.0:6432".into())),
            ],
            databases: vec![Database {
                name: "my db".into(),
                at: Location {
                    file: "pgbouncer.ini".into(),
                    line: 2,
                },
                items: vec![
                    item("pool_size", toml::Value::Integer(5)),
                    item("password", toml::Value::String("s\"ecret".into())),
                    item("upstream", toml::Value::String("host=h user=u".into())),
                ],
            }],
        };
        let text = toml_text(&plan, "pgbouncer.ini");
        let body: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "",
                "listen = \"0.0.0.0:6432\"",
                "pool_size = 20",
                "",
                "[databases.\"my db\"]",
                "upstream = \"host=h user=u\"",
                "password = 's\"ecret'",
                "pool_size = 5",
            ]
        );
        assert!(text.contains("# where listen came from\nlisten"));
        assert!(text.contains("keep it as private"));
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(
            parsed["databases"]["my db"]["password"].as_str(),
            Some("s\"ecret")
        );
    }
}
