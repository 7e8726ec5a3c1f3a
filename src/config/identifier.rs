//! PostgreSQL identifier rules, checked before any SQL runs.

use super::ConfigError;

/// PostgreSQL's `NAMEDATALEN - 1`.
const MAX_IDENTIFIER_LEN: usize = 63;

/// Checks a table, schema or publication name: a letter or underscore, then
/// letters, digits, `_` or `$`, at most 63 bytes. Names are always quoted when
/// used, so a name with upper-case letters means exactly that name.
pub fn validate_identifier(field: &str, name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    if !first_ok || !rest_ok || name.len() > MAX_IDENTIFIER_LEN {
        return Err(ConfigError::new(
            field,
            format!(
                "{name:?} is not a valid PostgreSQL identifier: use a letter or _ then letters, digits, _ or $ (at most 63)"
            ),
        ));
    }
    Ok(())
}

/// Checks a replication slot name against PostgreSQL's rule: lower-case
/// letters, digits and `_`, at most 63 bytes.
pub fn validate_slot_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IDENTIFIER_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(ConfigError::new(
            field,
            format!(
                "{name:?} is not a valid replication slot name: use lower-case letters, digits and _ (at most 63)"
            ),
        ));
    }
    Ok(())
}

/// Quotes an identifier for SQL (`"na""me"`).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL (`'it''s'`), for the few statements
/// (DDL, `format()`-built text) that cannot take it as a parameter.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["outbox", "Outbox_2", "_x", "a$b"] {
            validate_identifier("f", n).unwrap();
        }
        for n in ["pgoutbox", "slot_1", "a"] {
            validate_slot_name("f", n).unwrap();
        }
    }

    #[test]
    fn rejects_injection_and_bad_lengths() {
        let long = "a".repeat(64);
        for n in [
            "",
            "1abc",
            "a b",
            "a;drop",
            "a\"b",
            "a'b",
            "a-b",
            long.as_str(),
        ] {
            assert!(validate_identifier("f", n).is_err(), "{n:?}");
        }
        for n in ["", "Slot", "a-b", "a;b", "a b", long.as_str()] {
            assert!(validate_slot_name("f", n).is_err(), "{n:?}");
        }
    }

    #[test]
    fn quotes_embedded_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
