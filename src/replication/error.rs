//! The one error type of the replication client, and what each kind means
//! for the relay: reconnect after a delay, or stop and tell an operator.

use std::fmt;
use std::io;
use std::time::Duration;

/// The fields of a PostgreSQL `ErrorResponse` (or `NoticeResponse`).
///
/// See "Error and Notice Message Fields" in the PostgreSQL protocol
/// documentation; only the fields the relay acts on or logs are kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL`, `PANIC` (or `WARNING`, `NOTICE`, … for notices);
    /// the non-localized `V` field when the server sends one, else `S`.
    pub severity: String,
    /// The SQLSTATE code (`C`), for example `42704` for a missing slot.
    pub code: String,
    /// The primary human-readable message (`M`).
    pub message: String,
    /// An optional secondary message with more detail (`D`).
    pub detail: Option<String>,
    /// An optional suggestion of what to do about the problem (`H`).
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong while talking the streaming replication
/// protocol.
///
/// Each kind maps to one action (see [`ReplicationError::is_transient`]):
/// transient kinds mean "reconnect after a delay and resume from the last
/// confirmed position"; the others mean "stop and tell an operator".
/// No variant ever carries a password or a full connection string.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// Reading from or writing to the socket failed (transient).
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What the client was doing, for example `connecting to 127.0.0.1:5432`.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The server refused our credentials, or asked for an authentication
    /// method this client does not implement. Not transient: an operator
    /// must fix the configured user/password or `pg_hba.conf`.
    #[error(
        "authentication failed for user {user:?}: {reason}; \
         fix the configured credentials or pg_hba.conf (not retrying)"
    )]
    Auth {
        /// The role name we tried to log in as.
        user: String,
        /// Why, in the server's words or ours; never includes the password.
        reason: String,
        /// The SQLSTATE when the server sent an `ErrorResponse` (class `28`).
        code: Option<String>,
    },
    /// The server sent an `ErrorResponse`.
    #[error("server error: {0}")]
    Server(Box<ServerError>),
    /// The server sent bytes that break the protocol (bad length, unknown
    /// message, truncated body). Not transient: a bug or an incompatible
    /// server, which reconnecting will not fix.
    #[error("replication protocol violation: {0}")]
    Protocol(String),
    /// The connection or the stream ended when the client did not ask it to
    /// (transient).
    #[error("replication connection closed: {0}")]
    Closed(String),
    /// An operation did not finish in time (transient).
    #[error("timed out after {after:?} while {what}")]
    Timeout {
        /// What the client was waiting for.
        what: &'static str,
        /// How long it waited.
        after: Duration,
    },
    /// The configuration or an argument cannot be used as given (for example
    /// no host, a slot name containing a NUL byte). Not transient: an
    /// operator must fix the configuration.
    #[error("invalid replication configuration: {0}")]
    Config(String),
    /// With `target_session_attrs=read-write`, the server is a standby (or
    /// read-only): transient, since a failover may make a host the primary.
    #[error("the server is read-only (a standby), and target_session_attrs=read-write asks for a primary")]
    ReadOnly,
    /// TLS could not be set up: the server does not offer it but the mode
    /// requires it, or its certificate failed verification (not transient),
    /// or the socket failed during the handshake (transient).
    #[error(transparent)]
    Tls(#[from] crate::database::TlsError),
}

impl ReplicationError {
    /// The SQLSTATE code, when the server reported this error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(&e.code),
            ReplicationError::Auth { code, .. } => code.as_deref(),
            ReplicationError::Io { .. }
            | ReplicationError::Protocol(_)
            | ReplicationError::Closed(_)
            | ReplicationError::Timeout { .. }
            | ReplicationError::Config(_)
            | ReplicationError::ReadOnly
            | ReplicationError::Tls(_) => None,
        }
    }

    /// True when reconnecting after a delay may succeed: I/O failures,
    /// time-outs, an unexpectedly closed connection, and server errors whose
    /// SQLSTATE means the server is shutting down or starting up (`57P01`,
    /// `57P02`, `57P03`), a connection exception (class `08`), a lack of
    /// resources (class `53`), or a slot still held by a previous connection
    /// (`55006`, common right after a reconnect). Everything else stops the
    /// relay for an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Io { .. }
            | ReplicationError::Closed(_)
            | ReplicationError::ReadOnly
            | ReplicationError::Timeout { .. } => true,
            ReplicationError::Server(e) => sqlstate_is_transient(&e.code),
            ReplicationError::Tls(e) => e.is_transient(),
            ReplicationError::Auth { .. }
            | ReplicationError::Protocol(_)
            | ReplicationError::Config(_) => false,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ReplicationError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        ReplicationError::Protocol(message.into())
    }
}

/// SQLSTATEs after which a retry can succeed without anyone changing anything.
fn sqlstate_is_transient(code: &str) -> bool {
    matches!(code, "57P01" | "57P02" | "57P03" | "55006")
        || code.starts_with("08")
        || code.starts_with("53")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> ReplicationError {
        ReplicationError::Server(Box::new(ServerError {
            severity: "FATAL".into(),
            code: code.into(),
            message: "m".into(),
            detail: None,
            hint: None,
        }))
    }

    #[test]
    fn shutdown_connection_and_resource_codes_are_transient() {
        for code in [
            "57P01", "57P02", "57P03", "08006", "08P01", "53300", "53100", "55006",
        ] {
            assert!(server(code).is_transient(), "{code} should be transient");
        }
    }

    #[test]
    fn missing_slot_syntax_and_serialization_codes_stop_the_relay() {
        for code in ["42704", "42601", "40001", "55000", "58P01", "XX000"] {
            assert!(
                !server(code).is_transient(),
                "{code} should not be transient"
            );
        }
    }

    #[test]
    fn io_timeout_and_closed_are_transient_auth_protocol_config_are_not() {
        let io = ReplicationError::io("reading", io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(io.is_transient());
        assert!(ReplicationError::Closed("eof".into()).is_transient());
        assert!(ReplicationError::Timeout {
            what: "x",
            after: Duration::from_secs(1)
        }
        .is_transient());
        let auth = ReplicationError::Auth {
            user: "u".into(),
            reason: "r".into(),
            code: Some("28P01".into()),
        };
        assert!(!auth.is_transient());
        assert_eq!(auth.sqlstate(), Some("28P01"));
        assert!(!ReplicationError::protocol("bad").is_transient());
        assert!(!ReplicationError::Config("bad".into()).is_transient());
    }

    #[test]
    fn server_error_display_includes_detail_and_hint() {
        let e = ServerError {
            severity: "ERROR".into(),
            code: "42704".into(),
            message: "replication slot \"s\" does not exist".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
        };
        assert_eq!(
            e.to_string(),
            "ERROR 42704: replication slot \"s\" does not exist; detail: d; hint: h"
        );
        assert_eq!(server("42704").sqlstate(), Some("42704"));
    }
}
