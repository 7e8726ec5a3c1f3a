//! Replication command text (quoting included) and server version parsing.
//! Pure functions, so every variant can be checked without a server.
//!
//! The walsender's command grammar (`repl_gram.y`, `repl_scanner.l`) takes
//! double-quoted identifiers (`""` for a quote) for slot, plugin and option
//! names, and single-quoted literals (`''` for a quote, no backslash escapes)
//! for option values.

use super::error::ReplicationError;
use crate::lsn::Lsn;

/// What `CREATE_REPLICATION_SLOT` does with the snapshot at the slot's
/// consistent point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export the snapshot so another session can read the data as of the
    /// slot's start with `SET TRANSACTION SNAPSHOT`; valid until this
    /// connection runs its next command.
    Export,
    /// Do not export or use a snapshot.
    NoExport,
    /// Use the snapshot in the current transaction of this connection (which
    /// must be inside `BEGIN ISOLATION LEVEL REPEATABLE READ`).
    Use,
}

/// The first server version with the parenthesized option syntax
/// (`(SNAPSHOT 'export')`) for `CREATE_REPLICATION_SLOT`.
const PG15: u32 = 150_000;

/// The first server version with failover slots (`FAILOVER` option).
pub const PG17: u32 = 170_000;

/// Quotes an identifier for a replication command.
pub(crate) fn quote_ident(name: &str) -> Result<String, ReplicationError> {
    if name.is_empty() {
        return Err(ReplicationError::Config(
            "an identifier may not be empty".into(),
        ));
    }
    reject_nul(name, "identifier")?;
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// Quotes a literal string for a replication command.
pub(crate) fn quote_literal(value: &str) -> Result<String, ReplicationError> {
    reject_nul(value, "option value")?;
    Ok(format!("'{}'", value.replace('\'', "''")))
}

fn reject_nul(s: &str, what: &str) -> Result<(), ReplicationError> {
    if s.contains('\0') {
        return Err(ReplicationError::Config(format!(
            "{what} {s:?} contains a NUL byte"
        )));
    }
    Ok(())
}

/// `CREATE_REPLICATION_SLOT` for a logical slot, in the syntax the server
/// understands: the option list from PostgreSQL 15 on, the bare keywords
/// before (and when the version is unknown, since 15+ still accepts them).
/// With `failover` (PostgreSQL 17+ only; ignored before) the slot is a
/// failover slot, which standbys with `sync_replication_slots` copy.
pub(crate) fn create_logical_slot(
    server_version_num: Option<u32>,
    slot: &str,
    plugin: &str,
    snapshot: SnapshotAction,
    failover: bool,
) -> Result<String, ReplicationError> {
    let slot = quote_ident(slot)?;
    let plugin = quote_ident(plugin)?;
    let modern = server_version_num.is_some_and(|v| v >= PG15);
    let failover = failover && server_version_num.is_some_and(|v| v >= PG17);
    let snapshot = match (modern, snapshot) {
        (true, SnapshotAction::Export) if failover => "(SNAPSHOT 'export', FAILOVER true)",
        (true, SnapshotAction::NoExport) if failover => "(SNAPSHOT 'nothing', FAILOVER true)",
        (true, SnapshotAction::Use) if failover => "(SNAPSHOT 'use', FAILOVER true)",
        (true, SnapshotAction::Export) => "(SNAPSHOT 'export')",
        (true, SnapshotAction::NoExport) => "(SNAPSHOT 'nothing')",
        (true, SnapshotAction::Use) => "(SNAPSHOT 'use')",
        (false, SnapshotAction::Export) => "EXPORT_SNAPSHOT",
        (false, SnapshotAction::NoExport) => "NOEXPORT_SNAPSHOT",
        (false, SnapshotAction::Use) => "USE_SNAPSHOT",
    };
    Ok(format!(
        "CREATE_REPLICATION_SLOT {slot} LOGICAL {plugin} {snapshot}"
    ))
}

/// `DROP_REPLICATION_SLOT`, optionally waiting for an active slot to be
/// released instead of failing.
pub(crate) fn drop_slot(slot: &str, wait: bool) -> Result<String, ReplicationError> {
    let slot = quote_ident(slot)?;
    Ok(if wait {
        format!("DROP_REPLICATION_SLOT {slot} WAIT")
    } else {
        format!("DROP_REPLICATION_SLOT {slot}")
    })
}

/// `START_REPLICATION SLOT "slot" LOGICAL X/Y ("name" 'value', …)`.
pub(crate) fn start_logical_replication(
    slot: &str,
    start: Lsn,
    options: &[(&str, &str)],
) -> Result<String, ReplicationError> {
    let mut cmd = format!(
        "START_REPLICATION SLOT {} LOGICAL {start}",
        quote_ident(slot)?
    );
    if !options.is_empty() {
        let mut list = Vec::with_capacity(options.len());
        for (name, value) in options {
            list.push(format!("{} {}", quote_ident(name)?, quote_literal(value)?));
        }
        cmd.push_str(" (");
        cmd.push_str(&list.join(", "));
        cmd.push(')');
    }
    Ok(cmd)
}

/// Turns the `server_version` parameter into the number `server_version_num`
/// would give: `15.18 (Debian 15.18-1.pgdg120+1)` is 150018, `18beta1` is
/// 180000, `9.6.24` is 90624. `None` when there is no leading number.
pub(crate) fn parse_server_version(text: &str) -> Option<u32> {
    let numeric: &str = {
        let end = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        &text[..end]
    };
    let mut parts = numeric.split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next().flatten()?;
    let minor = parts.next().flatten().unwrap_or(0);
    if major >= 10 {
        // From 10 on there are two components: major.minor.
        major.checked_mul(10_000)?.checked_add(minor)
    } else {
        let patch = parts.next().flatten().unwrap_or(0);
        major
            .checked_mul(10_000)?
            .checked_add(minor.checked_mul(100)?)?
            .checked_add(patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted_by_doubling() {
        assert_eq!(quote_ident("outbox_slot").unwrap(), "\"outbox_slot\"");
        assert_eq!(quote_ident("we\"ird").unwrap(), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's").unwrap(), "'it''s'");
        assert_eq!(quote_literal("\"outbox_pub\"").unwrap(), "'\"outbox_pub\"'");
        assert_eq!(quote_literal("back\\slash").unwrap(), "'back\\slash'");
        assert!(quote_ident("").is_err());
        assert!(quote_ident("a\0b").is_err());
        assert!(quote_literal("a\0b").is_err());
    }

    #[test]
    fn failover_slots_are_asked_for_only_from_pg17() {
        let cmd =
            |v| create_logical_slot(v, "s1", "pgoutput", SnapshotAction::Export, true).unwrap();
        assert_eq!(
            cmd(Some(170_000)),
            "CREATE_REPLICATION_SLOT \"s1\" LOGICAL \"pgoutput\" (SNAPSHOT 'export', FAILOVER true)"
        );
        assert_eq!(
            cmd(Some(160_004)),
            "CREATE_REPLICATION_SLOT \"s1\" LOGICAL \"pgoutput\" (SNAPSHOT 'export')"
        );
    }

    #[test]
    fn create_slot_uses_option_syntax_from_pg15_and_keywords_before() {
        let cmd = |v, s| create_logical_slot(v, "s1", "pgoutput", s, false).unwrap();
        assert_eq!(
            cmd(Some(150_018), SnapshotAction::Export),
            "CREATE_REPLICATION_SLOT \"s1\" LOGICAL \"pgoutput\" (SNAPSHOT 'export')"
        );
        assert_eq!(
            cmd(Some(180_000), SnapshotAction::NoExport),
            "CREATE_REPLICATION_SLOT \"s1\" LOGICAL \"pgoutput\" (SNAPSHOT 'nothing')"
        );
        assert_eq!(
            cmd(Some(150_000), SnapshotAction::Use),
            "CREATE_REPLICATION_SLOT \"s1\" LOGICAL \"pgoutput\" (SNAPSHOT 'use')"
        );
        assert_eq!(
            cmd(Some(140_017), SnapshotAction::Export),
            "CREATE_REPLICATION_SLOT \"s1\" LOGICAL \"pgoutput\" EXPORT_SNAPSHOT"
        );
        assert_eq!(
            cmd(Some(140_017), SnapshotAction::NoExport),
            "CREATE_REPLICATION_SLOT \"s1\" LOGICAL \"pgoutput\" NOEXPORT_SNAPSHOT"
        );
        assert_eq!(
            cmd(None, SnapshotAction::Use),
            "CREATE_REPLICATION_SLOT \"s1\" LOGICAL \"pgoutput\" USE_SNAPSHOT"
        );
    }

    #[test]
    fn start_replication_quotes_slot_option_names_and_values() {
        let cmd = start_logical_replication(
            "outbox",
            Lsn(0x16_B374_D848),
            &[
                ("proto_version", "1"),
                ("publication_names", "\"outbox_pub\",\"o'ther\""),
            ],
        )
        .unwrap();
        assert_eq!(
            cmd,
            "START_REPLICATION SLOT \"outbox\" LOGICAL 16/B374D848 \
             (\"proto_version\" '1', \"publication_names\" '\"outbox_pub\",\"o''ther\"')"
        );
        assert_eq!(
            start_logical_replication("s", Lsn::ZERO, &[]).unwrap(),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0"
        );
        assert!(start_logical_replication("s", Lsn::ZERO, &[("a\0", "b")]).is_err());
    }

    #[test]
    fn drop_slot_with_and_without_wait() {
        assert_eq!(
            drop_slot("s", false).unwrap(),
            "DROP_REPLICATION_SLOT \"s\""
        );
        assert_eq!(
            drop_slot("s", true).unwrap(),
            "DROP_REPLICATION_SLOT \"s\" WAIT"
        );
    }

    #[test]
    fn server_versions_parse_like_server_version_num() {
        for (text, num) in [
            ("15.18 (Debian 15.18-1.pgdg120+1)", Some(150_018)),
            ("15.18", Some(150_018)),
            ("14.5", Some(140_005)),
            ("16.0", Some(160_000)),
            ("18beta1", Some(180_000)),
            ("17rc1", Some(170_000)),
            ("16devel", Some(160_000)),
            ("10.23", Some(100_023)),
            ("9.6.24", Some(90_624)),
            ("9.6beta2", Some(90_600)),
            ("", None),
            ("devel", None),
            ("99999999999.1", None),
        ] {
            assert_eq!(parse_server_version(text), num, "{text}");
        }
    }
}
