//! One error type for the relay, each kind mapped to exactly one operator
//! action: reconnect and resume, or stop and tell a human what to fix.
//! (Per-event failures that can never succeed are not errors here: they are
//! dead-lettered by the relay and the stream moves on.)

use crate::config::ConfigError;

/// What the relay does about an [`Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Transient: back off, reconnect, resume from the slot.
    Reconnect,
    /// Definite: stop with a non-zero exit; an operator must act.
    Stop,
}

/// A relay failure. Messages are one line, say what to fix, and never
/// contain a password or a full connection string.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Something only an operator can fix (credentials, `wal_level`, a
    /// missing publication, a lost slot, …).
    #[error("{0}")]
    Fatal(String),
    /// A connection or service failed; retrying may succeed.
    #[error("{0}")]
    Transient(String),
    /// The replication slot pgoutbox created is gone (dropped, or
    /// invalidated by `max_slot_wal_keep_size`): events may be missing from
    /// any new slot, so only an operator decides what happens next.
    #[error("{0}")]
    SlotLost(String),
}

impl Error {
    /// What to do about this error. One `match`, no wildcard arm.
    pub fn action(&self) -> Action {
        match self {
            Error::Config(_) => Action::Stop,
            Error::Fatal(_) => Action::Stop,
            Error::SlotLost(_) => Action::Stop,
            Error::Transient(_) => Action::Reconnect,
        }
    }

    /// The same error met at start-up, where every error is reported and the
    /// relay exits: an unreachable host or a wrong password is for the
    /// operator to fix, not to retry forever.
    pub fn at_start(self) -> Error {
        match self {
            Error::Transient(msg) => Error::Fatal(format!(
                "{msg}; check that PostgreSQL is running and reachable at the host and port in DATABASE_URL"
            )),
            other => other,
        }
    }

    /// Classifies the failure of an operator's selection of outbox rows
    /// (`dle`, `replay`: a `--where` condition, a statement timeout), with
    /// a hint at what to change; anything else as [`Error::postgres`].
    pub fn selection(doing: &str, e: &tokio_postgres::Error) -> Error {
        let code = e.code().map(|c| c.code()).unwrap_or_default();
        let text = postgres_text(e);
        let by_where = doing.contains("--where");
        if code == "57014" {
            Error::Fatal(format!(
                "{doing}: {text}; narrow the selection or raise --statement-timeout"
            ))
        } else if by_where && code.starts_with("42") && code != "42501" {
            Error::Fatal(format!(
                "{doing}: {text}; fix the --where condition (raw SQL over the outbox columns)"
            ))
        } else if by_where && code == "25006" {
            Error::Fatal(format!(
                "{doing}: {text}; --where is evaluated read-only and may not change anything"
            ))
        } else {
            Error::postgres(doing, e)
        }
    }

    /// Classifies an error from an ordinary PostgreSQL connection; `doing`
    /// says what was being attempted.
    pub fn postgres(doing: &str, e: &tokio_postgres::Error) -> Error {
        // A certificate or TLS-mode problem is for an operator; its text
        // already says what to fix.
        if let Some(tls) =
            std::error::Error::source(e).and_then(|s| s.downcast_ref::<crate::database::TlsError>())
        {
            return if tls.is_transient() {
                Error::Transient(format!("{doing}: {tls}"))
            } else {
                Error::Fatal(format!("{doing}: {tls}"))
            };
        }
        let text = postgres_text(e);
        // tokio-postgres's own authentication failures (no password, no
        // common SASL mechanism, channel binding refused) need an operator.
        if e.as_db_error().is_none() && e.to_string() == "authentication error" {
            return Error::Fatal(format!(
                "{doing}: {text}; check the password and channel_binding in DATABASE_URL against \
                 pg_hba.conf (channel binding needs scram-sha-256 over TLS)"
            ));
        }
        match e.code().map(|c| c.code()) {
            Some("28P01" | "28000") => Error::Fatal(format!(
                "{doing}: authentication failed ({text}); check the user and password in DATABASE_URL"
            )),
            Some("3D000") => Error::Fatal(format!(
                "{doing}: {text}; check the database name in DATABASE_URL"
            )),
            Some("42501") => Error::Fatal(format!(
                "{doing}: permission denied ({text}); grant the relay's role the privilege named"
            )),
            Some("42P01" | "42883") => Error::Fatal(format!(
                "{doing}: {text}; run `pgoutbox migrate` first"
            )),
            _ => Error::Transient(format!("{doing}: {text}")),
        }
    }
}

pub use crate::redact::postgres_text;
