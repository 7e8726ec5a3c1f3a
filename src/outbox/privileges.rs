//! Least privilege: the role the relay runs as (`pgoutbox migrate
//! --relay-role <name>`, see `docs/least-privilege.md`).
//!
//! An administrator (the role that owns the outbox, usually the one that
//! migrates) creates the role if it is missing — `LOGIN REPLICATION
//! NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS`, owning nothing — and
//! grants it exactly what the relay's statements need on one outbox table:
//!
//! | privilege | why |
//! |---|---|
//! | `USAGE` on the schema | to name anything in it |
//! | `SELECT` on the outbox table | CDC backfill, poll claims, status updates (`WHERE`/`RETURNING`) |
//! | `UPDATE (status, processed_at, locked_until, lock_token, retry_count, last_error)` | status marks, claims, leases, retries, reaper, dead letters; no other column |
//! | `SELECT, INSERT, UPDATE` on `pgoutbox_slot_state` | the record of the slot the relay created |
//! | `INSERT` on `pgoutbox_dead_letters`, `USAGE` on its id sequence | logical messages that can never be published |
//! | `SELECT, INSERT, DELETE` on `pgoutbox_delivered` | the delivery journal: batches of delivered rows, folded into the rows and deleted (migration 13) |
//! | `SELECT` on `public.pgoutbox_migrations` | the start-up check that the schema is migrated |
//! | `EXECUTE` on `pgoutbox_ensure_partitions` | partitions ahead, created by the SECURITY DEFINER function (migration 9; the `(regclass, int, text)` form of migration 10 for `partitions.interval`) |
//!
//! Grants on a partitioned table apply to rows reached through it; the relay
//! never names a partition, so partitions (present and future) need none.
//! `REPLICATION` is all a replication slot needs; `pg_replication_slots`,
//! `pg_publication*` and `pg_settings` are readable by every role.
//!
//! Everything runs in one transaction under the migrations' advisory lock,
//! so concurrent `migrate` runs never race on the role or on a grant. A
//! password is sent only as a SCRAM-SHA-256 verifier computed here, so the
//! plain text never reaches the server (nor its statement log).

use std::fmt;
use std::path::Path;

use tokio_postgres::{Client, Transaction};

use super::migrate::MigrationTarget;
use crate::config::{quote_ident, quote_literal, validate_identifier, ConfigError};

/// The environment variable holding the relay role's password.
pub const RELAY_PASSWORD_ENV: &str = "PGOUTBOX_RELAY_PASSWORD";

/// The outbox columns the relay updates (and the only ones it may).
pub const STATUS_COLUMNS: &[&str] = &[
    "status",
    "processed_at",
    "locked_until",
    "lock_token",
    "retry_count",
    "last_error",
];

/// A password. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// The text, for the verifier only.
    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where the role's password came from, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordSource {
    /// `PGOUTBOX_RELAY_PASSWORD`.
    Env,
    /// `--relay-password-file`.
    File,
}

impl fmt::Display for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordSource::Env => f.write_str(RELAY_PASSWORD_ENV),
            PasswordSource::File => f.write_str("--relay-password-file"),
        }
    }
}

/// What `migrate --relay-role` was asked to do, validated before connecting.
#[derive(Clone, Debug)]
pub struct RelayRole {
    /// The role's name (a validated identifier, always quoted).
    pub name: String,
    /// Its password and where it came from, if one was given.
    pub password: Option<(Password, PasswordSource)>,
}

impl RelayRole {
    /// Validates the name and reads the password: from `password_file`
    /// (its first line) when given, else from `env_password`
    /// (`PGOUTBOX_RELAY_PASSWORD`); none when neither is set. Errors name
    /// the flag or variable and never contain the password.
    pub fn new(
        name: &str,
        password_file: Option<&Path>,
        env_password: Option<String>,
    ) -> Result<RelayRole, ConfigError> {
        validate_identifier("--relay-role", name)?;
        let password = match password_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(
                        "--relay-password-file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let line = text.lines().next().unwrap_or_default();
                if line.is_empty() {
                    return Err(ConfigError::new(
                        "--relay-password-file",
                        format!("{}: the first line (the password) is empty", path.display()),
                    ));
                }
                Some((Password(line.to_owned()), PasswordSource::File))
            }
            None => env_password
                .filter(|p| !p.is_empty())
                .map(|p| (Password(p), PasswordSource::Env)),
        };
        Ok(RelayRole {
            name: name.to_owned(),
            password,
        })
    }
}

/// What [`grant_relay_role`] did.
#[derive(Clone, Debug, Default)]
pub struct RelayRoleReport {
    /// The role did not exist and was created.
    pub created: bool,
    /// A password was set (on creation or on the existing role).
    pub password_set: bool,
    /// Things the operator should know (an existing role with attributes
    /// it should not have, or without those the relay needs).
    pub warnings: Vec<String>,
}

/// Why the role was not set up.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// The role exists but must not be used as the relay role.
    #[error("{0}")]
    Refused(String),
    /// A statement failed.
    #[error("{context}: {}", crate::error::postgres_text(.source))]
    Database {
        /// What was being done.
        context: String,
        /// The error.
        source: tokio_postgres::Error,
    },
}

fn db(context: &str) -> impl FnOnce(tokio_postgres::Error) -> PrivilegeError + '_ {
    move |source| PrivilegeError::Database {
        context: context.to_owned(),
        source,
    }
}

/// Which objects of a table the relay role is granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantScope {
    /// The row-state columns it may update (marking, poll mode).
    pub update_columns: Vec<String>,
    /// Whether the table has pgoutbox's partition function (a table
    /// `pgoutbox migrate` created).
    pub partitions: bool,
}

impl GrantScope {
    /// pgoutbox's own table: every status column, the partition function.
    pub fn migrated() -> GrantScope {
        GrantScope {
            update_columns: STATUS_COLUMNS.iter().map(|c| (*c).to_string()).collect(),
            partitions: true,
        }
    }
}

/// The GRANT statements for `role` on `target` (all names quoted), without
/// the dead-letter sequence, whose name the server knows.
pub fn grant_statements(target: &MigrationTarget, role: &str, scope: &GrantScope) -> Vec<String> {
    let r = quote_ident(role);
    let s = quote_ident(&target.schema);
    let t = format!("{s}.{}", quote_ident(&target.table));
    let columns = scope
        .update_columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = vec![
        format!("GRANT USAGE ON SCHEMA {s} TO {r}"),
        format!("GRANT SELECT ON TABLE {t} TO {r}"),
    ];
    if !columns.is_empty() {
        out.push(format!("GRANT UPDATE ({columns}) ON TABLE {t} TO {r}"));
    }
    out.extend([
        format!("GRANT SELECT, INSERT, UPDATE ON TABLE {s}.pgoutbox_slot_state TO {r}"),
        format!("GRANT INSERT ON TABLE {s}.pgoutbox_dead_letters TO {r}"),
        format!("GRANT SELECT, INSERT, DELETE ON TABLE {s}.pgoutbox_delivered TO {r}"),
        format!("GRANT SELECT ON TABLE public.pgoutbox_migrations TO {r}"),
    ]);
    if scope.partitions {
        out.extend([
            format!(
                "GRANT EXECUTE ON FUNCTION {s}.pgoutbox_ensure_partitions(regclass, int) TO {r}"
            ),
            format!(
                "GRANT EXECUTE ON FUNCTION {s}.pgoutbox_ensure_partitions(regclass, int, text) TO {r}"
            ),
        ]);
    }
    out
}

/// Creates `role` if it is missing and grants it what the relay needs on
/// `target` (migrated or adopted), within `scope`. Refuses a superuser role
/// and the role running this.
pub async fn grant_relay_role(
    client: &mut Client,
    target: &MigrationTarget,
    role: &RelayRole,
    scope: &GrantScope,
) -> Result<RelayRoleReport, PrivilegeError> {
    let mut report = RelayRoleReport::default();
    let r = quote_ident(&role.name);
    let tx = client
        .transaction()
        .await
        .map_err(db("starting the transaction"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('pgoutbox_migrations'))",
        &[],
    )
    .await
    .map_err(db("taking the migrations lock"))?;
    let existing = read_role(&tx, &role.name).await?;
    let verifier = role
        .password
        .as_ref()
        .map(|(p, _)| postgres_protocol::password::scram_sha_256(p.expose().as_bytes()));
    match existing {
        None => {
            create_role(&tx, &r, verifier.as_deref()).await?;
            report.created = true;
            report.password_set = verifier.is_some();
        }
        Some(attributes) => {
            report.warnings = attributes.check(&role.name, &r)?;
            if let Some(v) = &verifier {
                tx.batch_execute(&format!("ALTER ROLE {r} PASSWORD {}", quote_literal(v)))
                    .await
                    .map_err(db("setting the relay role's password"))?;
                report.password_set = true;
            }
        }
    }
    if let Some(warning) = owner_warning(&tx, target, &role.name).await? {
        report.warnings.push(warning);
    }
    grant_database_access(&tx, &role.name, &r).await?;
    for sql in grant_statements(target, &role.name, scope) {
        tx.batch_execute(&sql)
            .await
            .map_err(db(&format!("granting the relay role: {sql}")))?;
    }
    grant_dead_letter_sequence(&tx, target, &r).await?;
    tx.commit()
        .await
        .map_err(db("committing the relay role's grants"))?;
    Ok(report)
}

/// The attributes of an existing role that matter to the relay.
struct RoleAttributes {
    superuser: bool,
    login: bool,
    replication: bool,
    createdb: bool,
    createrole: bool,
    bypassrls: bool,
    /// The role running this.
    current: bool,
}

impl RoleAttributes {
    /// Refuses the role running this and a superuser; otherwise the
    /// warnings about missing or unneeded attributes (`r`: the quoted name).
    fn check(&self, name: &str, r: &str) -> Result<Vec<String>, PrivilegeError> {
        if self.current {
            return Err(PrivilegeError::Refused(format!(
                "--relay-role {name:?} is the role running migrate: the relay role must be a role of its own"
            )));
        }
        if self.superuser {
            return Err(PrivilegeError::Refused(format!(
                "--relay-role {name:?} is a superuser: the relay role must not be one; choose another name, \
                 or ALTER ROLE {r} NOSUPERUSER"
            )));
        }
        let mut warnings = Vec::new();
        if !self.login {
            warnings.push(format!("role {name:?} cannot log in: ALTER ROLE {r} LOGIN"));
        }
        if !self.replication {
            warnings.push(format!(
                "role {name:?} has no REPLICATION, so it can relay in poll mode only: ALTER ROLE {r} REPLICATION for CDC"
            ));
        }
        for (has, attribute) in [
            (self.createdb, "CREATEDB"),
            (self.createrole, "CREATEROLE"),
            (self.bypassrls, "BYPASSRLS"),
        ] {
            if has {
                warnings.push(format!(
                    "role {name:?} has {attribute}, which the relay does not need: ALTER ROLE {r} NO{attribute}"
                ));
            }
        }
        Ok(warnings)
    }
}

/// The role's attributes from `pg_roles`, or `None` when it does not exist.
async fn read_role(
    tx: &Transaction<'_>,
    name: &str,
) -> Result<Option<RoleAttributes>, PrivilegeError> {
    let row = tx
        .query_opt(
            "SELECT rolsuper, rolcanlogin, rolreplication, rolcreatedb, rolcreaterole, rolbypassrls, \
                    rolname = current_user \
               FROM pg_roles WHERE rolname = $1",
            &[&name],
        )
        .await
        .map_err(db("reading pg_roles"))?;
    Ok(row.map(|row| RoleAttributes {
        superuser: row.get(0),
        login: row.get(1),
        replication: row.get(2),
        createdb: row.get(3),
        createrole: row.get(4),
        bypassrls: row.get(5),
        current: row.get(6),
    }))
}

/// Creates the role (`r`: its quoted name) with the relay's attributes and,
/// if given, the password verifier.
async fn create_role(
    tx: &Transaction<'_>,
    r: &str,
    verifier: Option<&str>,
) -> Result<(), PrivilegeError> {
    let password = verifier
        .map(|v| format!(" PASSWORD {}", quote_literal(v)))
        .unwrap_or_default();
    tx.batch_execute(&format!(
        "CREATE ROLE {r} LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS{password}"
    ))
    .await
    .map_err(db("creating the relay role (needs superuser, or CREATEROLE and REPLICATION)"))
}

/// A warning when the role owns the outbox table (which gives it every
/// privilege on it).
async fn owner_warning(
    tx: &Transaction<'_>,
    target: &MigrationTarget,
    name: &str,
) -> Result<Option<String>, PrivilegeError> {
    let table = format!(
        "{}.{}",
        quote_ident(&target.schema),
        quote_ident(&target.table)
    );
    let owns = tx
        .query_one(
            "SELECT c.relowner = (SELECT oid FROM pg_roles WHERE rolname = $2) \
               FROM pg_class c WHERE c.oid = $1::text::regclass",
            &[&table, &name],
        )
        .await
        .map_err(db("reading the outbox table's owner"))?
        .get::<_, Option<bool>>(0);
    Ok((owns == Some(true)).then(|| {
        format!(
            "role {name:?} owns {table}, which gives it every privilege on it; let the migrating role own it \
             (ALTER TABLE {table} OWNER TO <admin>)"
        )
    }))
}

/// Grants `CONNECT` on the database and `USAGE` on schema `public` when the
/// role lacks them: PUBLIC usually has both, but an administrator may have
/// revoked them.
async fn grant_database_access(
    tx: &Transaction<'_>,
    name: &str,
    r: &str,
) -> Result<(), PrivilegeError> {
    let row = tx
        .query_one(
            "SELECT has_database_privilege($1, current_database(), 'CONNECT'), \
                    has_schema_privilege($1, 'public', 'USAGE'), \
                    quote_ident(current_database())",
            &[&name],
        )
        .await
        .map_err(db("checking the relay role's database privileges"))?;
    let (connect, public_usage, database): (bool, bool, String) =
        (row.get(0), row.get(1), row.get(2));
    if !connect {
        tx.batch_execute(&format!("GRANT CONNECT ON DATABASE {database} TO {r}"))
            .await
            .map_err(db("granting CONNECT on the database"))?;
    }
    if !public_usage {
        tx.batch_execute(&format!("GRANT USAGE ON SCHEMA public TO {r}"))
            .await
            .map_err(db("granting USAGE on schema public"))?;
    }
    Ok(())
}

/// Grants `USAGE` on the dead-letter table's id sequence, by the name the
/// server gave it.
async fn grant_dead_letter_sequence(
    tx: &Transaction<'_>,
    target: &MigrationTarget,
    r: &str,
) -> Result<(), PrivilegeError> {
    let seq = tx
        .query_one(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.oid = pg_get_serial_sequence($1, 'id')::regclass",
            &[&format!(
                "{}.pgoutbox_dead_letters",
                quote_ident(&target.schema)
            )],
        )
        .await
        .map_err(db("finding the pgoutbox_dead_letters id sequence"))?;
    let (seq_schema, seq_name): (String, String) = (seq.get(0), seq.get(1));
    tx.batch_execute(&format!(
        "GRANT USAGE ON SEQUENCE {}.{} TO {r}",
        quote_ident(&seq_schema),
        quote_ident(&seq_name)
    ))
    .await
    .map_err(db(
        "granting USAGE on the pgoutbox_dead_letters id sequence",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> MigrationTarget {
        MigrationTarget {
            schema: "Shop".into(),
            table: "outbox".into(),
            publication: "outbox_pub".into(),
            message_prefix: "outbox".into(),
        }
    }

    #[test]
    fn grants_are_quoted_and_limited_to_the_status_columns() {
        let sql = grant_statements(&target(), "Relay", &GrantScope::migrated()).join(";\n");
        assert!(
            sql.contains("GRANT USAGE ON SCHEMA \"Shop\" TO \"Relay\""),
            "{sql}"
        );
        assert!(sql.contains(
            "GRANT UPDATE (\"status\", \"processed_at\", \"locked_until\", \"lock_token\", \"retry_count\", \"last_error\") ON TABLE \"Shop\".\"outbox\""
        ), "{sql}");
        for never in ["TRUNCATE", "ALL", "CREATE", "payload", "OWNER"] {
            assert!(!sql.contains(never), "{never} in {sql}");
        }
        // DELETE only on the delivery journal (its folded entries).
        let deletes: Vec<&str> = sql.lines().filter(|l| l.contains("DELETE")).collect();
        assert_eq!(deletes.len(), 1, "{sql}");
        assert!(deletes[0].contains("\"Shop\".pgoutbox_delivered"), "{sql}");
        // Only the three pgoutbox bookkeeping tables get INSERT.
        assert_eq!(sql.matches("INSERT").count(), 3, "{sql}");
    }

    #[test]
    fn the_role_name_is_validated_and_the_password_never_shown() {
        assert!(RelayRole::new("x\"; DROP ROLE y; --", None, None).is_err());
        assert!(RelayRole::new("", None, None).is_err());
        let role = RelayRole::new("pgoutbox_relay", None, Some("hunter2-pw".into())).unwrap();
        assert!(!format!("{role:?}").contains("hunter2-pw"));
        assert_eq!(role.password.as_ref().unwrap().1, PasswordSource::Env);
        let none = RelayRole::new("pgoutbox_relay", None, Some(String::new())).unwrap();
        assert!(none.password.is_none(), "an empty variable means none");
    }

    #[test]
    fn the_password_file_wins_and_only_its_first_line_counts() {
        let path = std::env::temp_dir().join(format!("pgoutbox-relay-pw-{}", std::process::id()));
        std::fs::write(&path, "from-file\nignored\n").unwrap();
        let role = RelayRole::new("r", Some(&path), Some("from-env".into())).unwrap();
        let (pw, source) = role.password.unwrap();
        assert_eq!((pw.expose(), source), ("from-file", PasswordSource::File));
        std::fs::write(&path, "\n").unwrap();
        let e = RelayRole::new("r", Some(&path), None).unwrap_err();
        assert_eq!(e.field, "--relay-password-file");
        std::fs::remove_file(&path).unwrap();
        let e = RelayRole::new("r", Some(&path), None).unwrap_err();
        assert!(e.problem.contains("cannot read"), "{e}");
    }
}
