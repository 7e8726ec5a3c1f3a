//! Keeping secrets out of logs, errors and metrics (ARCHITECTURE.md, invariant 10).

/// A connection string with its password replaced by `***`, for logs.
/// Handles both URLs (`postgres://user:pw@host/db`) and libpq key/value
/// strings (`password=pw`).
pub fn url(text: &str) -> String {
    if let Some(scheme_end) = text.find("://") {
        let rest = &text[scheme_end + 3..];
        let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (auth, tail) = rest.split_at(auth_end);
        let auth = match auth.rfind('@') {
            Some(at) => {
                let (userinfo, host) = auth.split_at(at);
                match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***{host}"),
                    None => format!("{userinfo}{host}"),
                }
            }
            None => auth.to_owned(),
        };
        let tail = redact_query_password(tail);
        format!("{}{auth}{tail}", &text[..scheme_end + 3])
    } else {
        text.split_whitespace()
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => "password=***".to_owned(),
                _ => kv.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn redact_query_password(tail: &str) -> String {
    match tail.split_once('?') {
        None => tail.to_owned(),
        Some((path, query)) => {
            let q = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => "password=***".to_owned(),
                    _ => kv.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("&");
            format!("{path}?{q}")
        }
    }
}

/// The text of an error with any occurrence of the secret-bearing `source`
/// text (or its password) removed.
pub fn error_text(err: &dyn std::fmt::Display, source: &str) -> String {
    let mut text = err.to_string();
    if !source.is_empty() {
        text = text.replace(source, &url(source));
    }
    if let Some(pw) = password_of(source) {
        if !pw.is_empty() {
            text = text.replace(&pw, "***");
        }
    }
    text
}

fn password_of(source: &str) -> Option<String> {
    let config: tokio_postgres::Config = source.parse().ok()?;
    config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

/// The useful text of a tokio-postgres error: the server's message, or the
/// whole chain of causes (tokio-postgres alone prints just "db error").
pub fn postgres_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_owned();
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_hidden() {
        assert_eq!(url("postgres://u:pw@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            url("postgres://h/db?password=x&sslmode=require"),
            "postgres://h/db?password=***&sslmode=require"
        );
        assert_eq!(
            url("host=h password=pw user=u"),
            "host=h password=*** user=u"
        );
    }

    #[test]
    fn error_text_drops_the_password() {
        let e = "could not connect with pw s3cret";
        assert!(!error_text(&e, "postgres://u:s3cret@h/db").contains("s3cret"));
    }
}
