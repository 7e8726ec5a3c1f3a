//! libpq's TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`)
//! taken out of `database.url`, a `postgres://` URL or a key=value string,
//! before the rest goes to tokio-postgres, whose parser knows neither
//! `verify-ca` nor `verify-full` (see `tls.rs` for how they are applied).

use super::TlsMode;

/// The TLS parameters taken out of a connection string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UrlTls {
    /// `sslmode`.
    pub mode: Option<TlsMode>,
    /// `sslrootcert` (a file, or `system`).
    pub root_cert: Option<String>,
    /// `sslcert`.
    pub client_cert: Option<String>,
    /// `sslkey`.
    pub client_key: Option<String>,
}

/// Splits libpq's TLS parameters off `text` (a `postgres://` URL or a
/// key=value string). Returns the rest, unchanged otherwise, for
/// tokio-postgres. Text that does not tokenize is returned whole, for
/// tokio-postgres to report.
pub fn split_tls_params(text: &str) -> Result<(String, UrlTls), String> {
    let mut tls = UrlTls::default();
    let rest = if let Some((head, query)) = url_query(text) {
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(k);
            if !take(&mut tls, &key, || percent_decode(v))? {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            head.to_owned()
        } else {
            format!("{head}?{}", kept.join("&"))
        }
    } else if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        text.to_owned()
    } else {
        let Some(pairs) = key_values(text) else {
            return Ok((text.to_owned(), tls));
        };
        let mut kept = Vec::new();
        for (key, value, raw) in pairs {
            if !take(&mut tls, &key, || value.clone())? {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    Ok((rest, tls))
}

/// Records `key` in `tls` if it is one of ours; false when it is not.
fn take(tls: &mut UrlTls, key: &str, value: impl FnOnce() -> String) -> Result<bool, String> {
    match key {
        "sslmode" => tls.mode = Some(value().parse().map_err(|e| format!("sslmode: {e}"))?),
        "sslrootcert" => tls.root_cert = Some(value()),
        "sslcert" => tls.client_cert = Some(value()),
        "sslkey" => tls.client_key = Some(value()),
        _ => return Ok(false),
    }
    Ok(true)
}

/// The part before `?` and the query of a URL, if it has one. Like
/// tokio-postgres, the user info ends at the first `@`.
fn url_query(text: &str) -> Option<(&str, &str)> {
    let after_scheme = text
        .strip_prefix("postgres://")
        .or_else(|| text.strip_prefix("postgresql://"))?;
    let offset = text.len() - after_scheme.len();
    let host_start = after_scheme.find('@').map_or(0, |at| at + 1);
    let q = after_scheme[host_start..].find('?')? + host_start + offset;
    Some((&text[..q], &text[q + 1..]))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Tokenizes a libpq key=value string as tokio-postgres does: values may be
/// single-quoted, backslash escapes a character. Returns (key, value, the
/// pair's original text); `None` when the text does not tokenize.
fn key_values(text: &str) -> Option<Vec<(String, String, &str)>> {
    let mut out = Vec::new();
    let mut it = text.char_indices().peekable();
    loop {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = it.peek() else {
            return Some(out);
        };
        let mut key = String::new();
        while let Some((_, c)) = it.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        it.next_if(|(_, c)| *c == '=')?;
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match it.next()? {
                    (_, '\'') => break,
                    (_, '\\') => value.push(it.next()?.1),
                    (_, c) => value.push(c),
                }
            }
        } else {
            while let Some((_, c)) = it.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(it.next()?.1);
                } else {
                    value.push(c);
                }
            }
        }
        let end = it.peek().map_or(text.len(), |(i, _)| *i);
        out.push((key, value, &text[start..end]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> (String, UrlTls) {
        split_tls_params(text).unwrap()
    }

    #[test]
    fn url_tls_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, tls) = split(
            "postgres://u:p%3F@h:5432/db?application_name=a&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca%20x.pem&sslcert=/c.pem&sslkey=/k.pem&channel_binding=require",
        );
        assert_eq!(
            rest,
            "postgres://u:p%3F@h:5432/db?application_name=a&channel_binding=require"
        );
        assert_eq!(
            tls,
            UrlTls {
                mode: Some(TlsMode::VerifyFull),
                root_cert: Some("/etc/ca x.pem".into()),
                client_cert: Some("/c.pem".into()),
                client_key: Some("/k.pem".into()),
            }
        );
        let (rest, tls) = split("postgresql://h/db?sslmode=verify-ca");
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(tls.mode, Some(TlsMode::VerifyCa));
        let (rest, tls) = split("postgres://u:pw@h/db");
        assert_eq!(
            (rest.as_str(), tls),
            ("postgres://u:pw@h/db", UrlTls::default())
        );
    }

    #[test]
    fn a_question_mark_in_the_password_does_not_start_the_query() {
        let (rest, tls) = split("postgres://u:a?b@h/db?sslmode=require");
        assert_eq!(rest, "postgres://u:a?b@h/db");
        assert_eq!(tls.mode, Some(TlsMode::Require));
    }

    #[test]
    fn key_value_tls_parameters_are_taken_out_quoting_and_all() {
        let (rest, tls) = split(
            "host=h  sslmode = verify-full password='a b\\'c' sslrootcert='/x y/ca.pem' dbname=d",
        );
        assert_eq!(rest, "host=h password='a b\\'c' dbname=d");
        assert_eq!(tls.mode, Some(TlsMode::VerifyFull));
        assert_eq!(tls.root_cert.as_deref(), Some("/x y/ca.pem"));
        let pg: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(pg.get_password(), Some(&b"a b'c"[..]));
    }

    #[test]
    fn an_unknown_sslmode_is_an_error_naming_the_accepted_ones() {
        for text in ["postgres://h/db?sslmode=verify", "host=h sslmode=on"] {
            let e = split_tls_params(text).unwrap_err();
            assert!(e.starts_with("sslmode:") && e.contains("verify-ca"), "{e}");
        }
    }

    #[test]
    fn untokenizable_key_values_are_left_for_tokio_postgres() {
        let (rest, tls) = split("host='h");
        assert_eq!((rest.as_str(), tls), ("host='h", UrlTls::default()));
    }
}
