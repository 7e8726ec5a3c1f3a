//! Security (issue 6): identifiers from config are validated and quoted
//! (injection attempts are config errors before anything connects), the
//! relay runs as a least-privilege role, and passwords never appear in
//! logs, errors or `--help` output.
//!
//! Every relay started here (as everywhere through the harness) has its log
//! searched for the relay role's password when it ends.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::harness::{
    assert_no_secrets, connect, output_checked, read_until_all, relay_database_url,
    relay_database_url_with, relay_password, run_with_timeout_checked, wait_for, TestOutbox,
    RELAY_ROLE,
};
use serde_json::json;
use tokio_postgres::NoTls;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);

/// A database URL nothing listens on; it carries the relay password, so
/// the outputs that must not show it have it to show.
fn unreachable_url() -> String {
    format!(
        "postgres://{RELAY_ROLE}:{}@127.0.0.1:1/pgoutbox?connect_timeout=2",
        relay_password()
    )
}

fn temp_file(stem: &str, ext: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("security-{stem}-{}-{n}.{ext}", std::process::id()))
}

/// `pgoutbox` with only `config` (TOML) and the given environment: no
/// services needed, the database unreachable.
fn bare_command(config: &str, env: &[(&str, &str)]) -> Command {
    let path = temp_file("config", "toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgoutbox"));
    cmd.arg("--config")
        .arg(&path)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", unreachable_url())
        .env("KAFKA_BROKERS", "127.0.0.1:1")
        .env("RUST_LOG", "info")
        // Many run at once: no metrics endpoint (its port would clash).
        .env("OUTBOX_METRICS_LISTEN", "off");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The TOML for `field = value` (`field` dotted, e.g. `outbox.schema`).
fn toml_setting(field: &str, value: &str) -> String {
    let (table, key) = field.rsplit_once('.').expect("a dotted field");
    format!(
        "[{table}]\n{key} = {}\n",
        toml::Value::String(value.to_owned())
    )
}

/// Injection attempts and names PostgreSQL or Kafka would not take.
fn hostile_values() -> Vec<String> {
    vec![
        "x\"; DROP TABLE t; --".to_owned(),
        "x'--".to_owned(),
        "a b".to_owned(),
        "a".repeat(64),
        String::new(),
    ]
}

/// Asserts `out` is exit code 2 with exactly one stderr line, the config
/// error of `field`, and that nothing tried to connect.
fn assert_config_error(out: &Output, field: &str, what: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{what}: exit code 2\n{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: one line\n{err}");
    assert!(
        lines[0].starts_with(&format!("error: config: {field}: ")),
        "{what}: the config error of {field}\n{err}"
    );
    for never in ["connect", "reachable", "refused", "panicked"] {
        assert!(!err.contains(never), "{what}: no {never:?}\n{err}");
    }
    assert!(out.stdout.is_empty(), "{what}: nothing on stdout");
}

#[test]
fn hostile_identifiers_are_config_errors_before_any_connection() {
    // (field as reported, TOML field, whether a 64-character value is
    // illegal: PostgreSQL names stop at 63 bytes, Kafka topics at 249).
    let fields = [
        ("cdc.slot", "cdc.slot", true),
        ("cdc.publication", "cdc.publication", true),
        ("outbox.schema", "outbox.schema", true),
        ("outbox.table", "outbox.table", true),
        ("kafka.topic", "kafka.topic", false),
        (
            "kafka.table_topics.billing_outbox",
            "kafka.table_topics.billing_outbox",
            false,
        ),
    ];
    for (field, toml_field, long_is_illegal) in fields {
        for value in hostile_values() {
            let config = toml_setting(toml_field, &value);
            for subcommand in ["run", "migrate"] {
                let what = format!("{subcommand} with {toml_field} = {value:?}");
                let mut cmd = bare_command(&config, &[]);
                cmd.arg(subcommand);
                let out = run_with_timeout_checked(cmd, Duration::from_secs(30));
                if value.len() == 64 && !long_is_illegal {
                    // A legal topic name: validation passes, and the
                    // unreachable database is what stops the command.
                    assert_ne!(out.status.code(), Some(2), "{what}\n{}", stderr(&out));
                    assert!(
                        stderr(&out).contains("reachable"),
                        "{what}\n{}",
                        stderr(&out)
                    );
                } else {
                    assert_config_error(&out, field, &what);
                }
            }
        }
    }
}

#[test]
fn hostile_identifiers_from_the_environment_are_config_errors_too() {
    // An empty variable means "unset" (the default applies), so it is not
    // among these.
    for (var, field) in [
        ("OUTBOX_SLOT", "cdc.slot"),
        ("OUTBOX_PUBLICATION", "cdc.publication"),
        ("OUTBOX_SCHEMA", "outbox.schema"),
        ("OUTBOX_TABLE", "outbox.table"),
        ("OUTBOX_TOPIC", "kafka.topic"),
    ] {
        for value in ["x\"; DROP TABLE t; --", "x'--", "a b"] {
            for subcommand in ["run", "migrate"] {
                let mut cmd = bare_command("", &[(var, value)]);
                cmd.arg(subcommand);
                let out = run_with_timeout_checked(cmd, Duration::from_secs(30));
                assert_config_error(&out, field, &format!("{subcommand} with {var}={value:?}"));
            }
        }
    }
}

#[test]
fn the_relay_role_name_and_password_file_are_checked_before_connecting() {
    for name in [
        "x\"; DROP ROLE pgoutbox; --",
        "x'--",
        "a b",
        "",
        &"r".repeat(64),
    ] {
        let mut cmd = bare_command("", &[]);
        cmd.args(["migrate", "--relay-role", name]);
        let out = run_with_timeout_checked(cmd, Duration::from_secs(30));
        assert_config_error(&out, "--relay-role", &format!("--relay-role {name:?}"));
    }
    let missing = temp_file("no-such-password", "txt");
    let mut cmd = bare_command("", &[]);
    cmd.args([
        "migrate",
        "--relay-role",
        "pgoutbox_relay",
        "--relay-password-file",
    ])
    .arg(&missing);
    let out = run_with_timeout_checked(cmd, Duration::from_secs(30));
    assert_config_error(&out, "--relay-password-file", "a missing password file");
}

/// Every subcommand path (`[]`, `["migrate"]`, `["dle", "list"]`, …), read
/// from the `Commands:` sections of the help itself.
fn subcommand_paths(cmd: &dyn Fn(&[String]) -> Output) -> Vec<Vec<String>> {
    let mut paths = vec![vec![]];
    let mut i = 0;
    while i < paths.len() {
        let mut args = paths[i].clone();
        args.push("--help".into());
        let text = String::from_utf8_lossy(&cmd(&args).stdout).into_owned();
        let mut in_commands = false;
        for line in text.lines() {
            if line.trim_end() == "Commands:" {
                in_commands = true;
                continue;
            }
            if in_commands {
                let Some(name) = line.split_whitespace().next() else {
                    break;
                };
                // Entries are indented by exactly two spaces.
                if !line.starts_with("  ") || line.starts_with("   ") {
                    break;
                }
                if name != "help" {
                    let mut p = paths[i].clone();
                    p.push(name.to_owned());
                    paths.push(p);
                }
            }
        }
        i += 1;
    }
    paths
}

#[test]
fn help_and_version_never_show_a_password() {
    let password = relay_password();
    let pw_file = temp_file("help-password", "txt");
    std::fs::write(&pw_file, format!("{password}\n")).unwrap();
    let config = temp_file("help-config", "toml");
    std::fs::write(
        &config,
        format!("[database]\nurl = \"postgres://{RELAY_ROLE}:{password}@127.0.0.1:1/pgoutbox\"\n"),
    )
    .unwrap();
    let pw_file_text = pw_file.display().to_string();
    let config_text = config.display().to_string();
    let url = unreachable_url();
    let run = |args: &[String]| -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgoutbox"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &url)
            .env("DATABASE_PASSWORD_FILE", &pw_file_text)
            .env("PGOUTBOX_RELAY_PASSWORD", relay_password())
            .env("PGOUTBOX_CONFIG", &config_text)
            .env("KAFKA_BROKERS", "127.0.0.1:1")
            .env("OUTBOX_METRICS_LISTEN", "off");
        cmd.output().expect("run pgoutbox")
    };
    let paths = subcommand_paths(&run);
    for expected in [
        vec!["migrate"],
        vec!["run"],
        vec!["dle"],
        vec!["dle", "list"],
        vec!["dle", "redrive"],
    ] {
        assert!(
            paths.iter().any(|p| p == &expected),
            "found {expected:?} among {paths:?}"
        );
    }
    for path in &paths {
        let mut forms: Vec<Vec<String>> = vec![
            [path.clone(), vec!["--help".into()]].concat(),
            [path.clone(), vec!["-h".into()]].concat(),
        ];
        if !path.is_empty() {
            // `pgoutbox help migrate`, `pgoutbox dle help list`, …
            let mut help = path[..path.len() - 1].to_vec();
            help.push("help".into());
            help.push(path[path.len() - 1].clone());
            forms.push(help);
        }
        for args in forms {
            let out = run(&args);
            let text = all_output(&out);
            assert_eq!(out.status.code(), Some(0), "{args:?}: {text}");
            assert!(text.contains("Usage"), "{args:?} prints help: {text}");
            assert!(
                !text.contains(&password),
                "{args:?} shows the password:\n{text}"
            );
        }
    }
    let out = run(&["--version".into()]);
    assert!(out.status.success());
    assert!(!all_output(&out).contains(&password));
    // The migrate help names where the relay role's password comes from.
    let out = run(&["migrate".into(), "--help".into()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--relay-role") && text.contains("PGOUTBOX_RELAY_PASSWORD"),
        "{text}"
    );
}

#[test]
#[should_panic(expected = "a password leaked")]
fn the_harness_finds_a_leaked_password() {
    assert_no_secrets(
        "a made-up log",
        &format!("connecting with password {} failed", relay_password()),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn names_that_need_quoting_migrate_and_relay() {
    let mut outbox = TestOutbox::new("sec_quoted").await;
    // Mixed case and a `$`: only right when every use quotes them.
    let (schema, table, publication) = ("SecOutbox", "Outbox$Events", "Sec_Outbox_Pub");
    outbox
        .client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE; DROP SCHEMA IF EXISTS secoutbox CASCADE; \
             DROP PUBLICATION IF EXISTS \"{publication}\"; \
             DELETE FROM public.pgoutbox_migrations WHERE target LIKE '{schema}.%'"
        ))
        .await
        .unwrap();
    outbox.env.push(("OUTBOX_SCHEMA".into(), schema.into()));
    outbox.env.push(("OUTBOX_TABLE".into(), table.into()));
    outbox
        .env
        .push(("OUTBOX_PUBLICATION".into(), publication.into()));
    let out = output_checked(&mut outbox.command_with_args(&["migrate"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let row = outbox
        .client
        .query_one(
            "SELECT to_regclass($1)::text, to_regnamespace('secoutbox') IS NULL, \
                    EXISTS (SELECT 1 FROM pg_publication_tables \
                             WHERE pubname = $2 AND schemaname = $3 AND tablename = $4)",
            &[
                &format!("\"{schema}\".\"{table}\""),
                &publication,
                &schema,
                &table,
            ],
        )
        .await
        .unwrap();
    let (regclass, no_folded, published): (Option<String>, bool, bool) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(regclass.as_deref(), Some("\"SecOutbox\".\"Outbox$Events\""));
    assert!(no_folded, "no case-folded schema was created");
    assert!(published, "the publication covers the quoted table");

    let relay = outbox.start_relay();
    let id: Uuid = outbox
        .client
        .query_one(
            &format!("SELECT \"{schema}\".\"{table}_publish\"('Order', $1, 'Placed', '{{}}')"),
            &[&Uuid::new_v4()],
        )
        .await
        .unwrap()
        .get(0);
    let records = read_until_all(vec![outbox.topic("Order")], vec![id], DEADLINE).await;
    assert!(records
        .iter()
        .any(|r| r.header("tracking_id") == id.to_string()));
    // Marked by the relay role through the quoted name.
    wait_for("the row COMPLETED", DEADLINE, || async {
        let status: String = outbox
            .client
            .query_one(
                &format!("SELECT status FROM \"{schema}\".\"{table}\" WHERE tracking_id = $1"),
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        (status == "COMPLETED").then_some(())
    })
    .await;
    let log = relay.log_text();
    assert!(log.contains(RELAY_ROLE), "runs as the relay role:\n{log}");
    assert!(relay.terminate().success());
}

/// Connects as the relay role.
async fn relay_client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&relay_database_url(), NoTls)
        .await
        .expect("connect as the relay role");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

#[tokio::test]
async fn the_relay_role_has_only_what_the_relay_needs() {
    let outbox = TestOutbox::new("sec_privs").await;
    let s = &outbox.name;
    let row = outbox
        .client
        .query_one(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls, rolreplication, rolcanlogin, \
                    (SELECT count(*) FROM pg_class WHERE relowner = r.oid) \
                  + (SELECT count(*) FROM pg_namespace WHERE nspowner = r.oid) \
                  + (SELECT count(*) FROM pg_proc WHERE proowner = r.oid), \
                    (SELECT rolpassword FROM pg_authid WHERE oid = r.oid) \
               FROM pg_roles r WHERE rolname = $1",
            &[&RELAY_ROLE],
        )
        .await
        .unwrap();
    let flags: Vec<bool> = (0..6).map(|i| row.get(i)).collect();
    assert_eq!(
        flags,
        [false, false, false, false, true, true],
        "NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS REPLICATION LOGIN"
    );
    assert_eq!(row.get::<_, i64>(6), 0, "owns nothing");
    let verifier: String = row.get(7);
    assert!(
        verifier.starts_with("SCRAM-SHA-256$"),
        "stored as a SCRAM verifier"
    );
    assert!(!verifier.contains(&relay_password()));

    // What the catalog says, as the admin.
    let partition: String = outbox
        .client
        .query_one(
            "SELECT c.oid::regclass::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
              WHERE i.inhparent = $1::text::regclass LIMIT 1",
            &[&format!("{s}.outbox")],
        )
        .await
        .unwrap()
        .get(0);
    let checks: Vec<(String, bool)> = vec![
        (format!("has_schema_privilege('{RELAY_ROLE}', '{s}', 'USAGE')"), true),
        (format!("has_schema_privilege('{RELAY_ROLE}', '{s}', 'CREATE')"), false),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.outbox', 'SELECT')"), true),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.outbox', 'INSERT')"), false),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.outbox', 'DELETE')"), false),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.outbox', 'TRUNCATE')"), false),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.outbox', 'UPDATE')"), false),
        (format!("has_any_column_privilege('{RELAY_ROLE}', '{s}.outbox', 'UPDATE')"), true),
        (format!("has_column_privilege('{RELAY_ROLE}', '{s}.outbox', 'payload', 'UPDATE')"), false),
        (format!("has_column_privilege('{RELAY_ROLE}', '{s}.outbox', 'tracking_id', 'UPDATE')"), false),
        (format!("has_table_privilege('{RELAY_ROLE}', '{partition}', 'SELECT')"), false),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.pgoutbox_slot_state', 'SELECT, INSERT, UPDATE')"), true),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.pgoutbox_slot_state', 'DELETE')"), false),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.pgoutbox_dead_letters', 'INSERT')"), true),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.pgoutbox_dead_letters', 'SELECT')"), false),
        // The delivery journal: entries written, read and deleted when
        // folded; never changed.
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.pgoutbox_delivered', 'SELECT')"), true),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.pgoutbox_delivered', 'INSERT')"), true),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.pgoutbox_delivered', 'DELETE')"), true),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.pgoutbox_delivered', 'UPDATE')"), false),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.pgoutbox_delivered', 'TRUNCATE')"), false),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.pgoutbox_dead_letter_actions', 'SELECT')"), false),
        (format!("has_table_privilege('{RELAY_ROLE}', '{s}.processed_events', 'SELECT')"), false),
        (format!("has_table_privilege('{RELAY_ROLE}', 'public.pgoutbox_migrations', 'SELECT')"), true),
        (format!("has_table_privilege('{RELAY_ROLE}', 'public.pgoutbox_migrations', 'INSERT')"), false),
        (format!("has_function_privilege('{RELAY_ROLE}', '{s}.pgoutbox_ensure_partitions(regclass, int)', 'EXECUTE')"), true),
        // Not callable by PUBLIC any more (it is SECURITY DEFINER).
        (format!(
            "NOT EXISTS (SELECT 1 FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a \
              WHERE p.oid = '{s}.pgoutbox_ensure_partitions(regclass, int)'::regprocedure AND a.grantee = 0)"
        ), true),
        (format!(
            "(SELECT prosecdef AND proconfig = ARRAY['search_path=pg_catalog, pg_temp'] FROM pg_proc \
              WHERE oid = '{s}.pgoutbox_ensure_partitions(regclass, int)'::regprocedure)"
        ), true),
    ];
    for (expr, want) in &checks {
        let got: bool = outbox
            .client
            .query_one(&format!("SELECT {expr}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{expr}: {e:?}"))
            .get(0);
        assert_eq!(got, *want, "{expr}");
    }

    // What the server lets the relay role do.
    let relay = relay_client().await;
    let denied = [
        format!("DELETE FROM {s}.outbox"),
        format!("TRUNCATE {s}.outbox"),
        format!("INSERT INTO {s}.outbox (aggregate_id, aggregate_type, event_type, payload) VALUES (gen_random_uuid(), 'a', 'b', '{{}}')"),
        format!("UPDATE {s}.outbox SET payload = '{{}}'"),
        format!("SELECT * FROM {partition}"),
        format!("CREATE TABLE {s}.sneaky (x int)"),
        format!("SELECT * FROM {s}.pgoutbox_dead_letter_actions"),
        format!("DROP TABLE {s}.outbox"),
        "DELETE FROM public.pgoutbox_migrations".to_owned(),
    ];
    for sql in &denied {
        let e = relay
            .batch_execute(sql)
            .await
            .expect_err(&format!("the relay role may not: {sql}"));
        assert_eq!(
            e.code().map(|c| c.code()),
            Some("42501"),
            "{sql}: permission denied, got {e:?}"
        );
    }
    // The SECURITY DEFINER function only takes outbox tables of its schema.
    for parent in [
        format!("{s}.pgoutbox_slot_state"),
        "public.pgoutbox_migrations".into(),
    ] {
        let e = relay
            .query_one(
                &format!("SELECT {s}.pgoutbox_ensure_partitions($1::text::regclass, 2)"),
                &[&parent],
            )
            .await
            .expect_err(&format!("ensure_partitions({parent}) is refused"));
        assert!(
            e.as_db_error()
                .is_some_and(|d| d.message().contains("not a partitioned outbox table")),
            "{parent}: {e:?}"
        );
    }
    // Allowed, through the partitioned parent only: the status columns.
    relay
        .batch_execute(&format!(
            "UPDATE {s}.outbox SET status = 'COMPLETED', processed_at = now(), locked_until = NULL, \
                    lock_token = NULL, retry_count = retry_count, last_error = NULL WHERE false; \
             SELECT id, payload FROM {s}.outbox LIMIT 1; \
             SELECT max(version) FROM public.pgoutbox_migrations"
        ))
        .await
        .expect("status columns via the parent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_role_creates_partitions_ahead_without_owning_the_table() {
    let outbox = TestOutbox::new("sec_partitions").await;
    let count = || async {
        outbox
            .client
            .query_one(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = $1::text::regclass",
                &[&format!("{}.outbox", outbox.name)],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // migrate made this month's and next month's; the relay wants two ahead.
    assert_eq!(count().await, 2);
    let relay = outbox.start_relay();
    wait_for("a third partition", DEADLINE, || async {
        (count().await == 3).then_some(())
    })
    .await;
    let owner: String = outbox
        .client
        .query_one(
            "SELECT DISTINCT pg_get_userbyid(c.relowner)::text FROM pg_inherits i \
               JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::text::regclass",
            &[&format!("{}.outbox", outbox.name)],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(owner, RELAY_ROLE, "partitions belong to the table's owner");
    let log = wait_for("the relay's start", DEADLINE, || async {
        let log = relay.log_text();
        log.contains("starting CDC relay").then_some(log)
    })
    .await;
    assert!(log.contains("created outbox partitions ahead"), "{log}");
    assert!(!log.contains("could not ensure"), "{log}");
    assert!(relay.terminate().success());
}

/// Drops a role the tests made, under the migrations' lock (concurrent
/// `migrate` runs grant on shared objects).
async fn drop_role(name: &str) {
    let mut client = connect().await;
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('pgoutbox_migrations'))",
        &[],
    )
    .await
    .unwrap();
    let exists = tx
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .unwrap()
        .is_some();
    if exists {
        tx.batch_execute(&format!("DROP OWNED BY \"{name}\"; DROP ROLE \"{name}\""))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_superuser_or_the_admin_itself_is_refused_as_relay_role() {
    let outbox = TestOutbox::new("sec_refuse").await;
    let admin: String = outbox
        .client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    let out = output_checked(&mut outbox.command_with_args(&["migrate", "--relay-role", &admin]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the role running migrate"),
        "{}",
        stderr(&out)
    );

    let superuser = "sec_super_role";
    drop_role(superuser).await;
    outbox
        .client
        .batch_execute(&format!("CREATE ROLE {superuser} SUPERUSER NOLOGIN"))
        .await
        .unwrap();
    let out =
        output_checked(&mut outbox.command_with_args(&["migrate", "--relay-role", superuser]));
    drop_role(superuser).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is a superuser"), "{}", stderr(&out));
}

#[tokio::test]
async fn a_role_without_a_password_is_created_and_the_password_can_be_set_later() {
    let outbox = TestOutbox::new("sec_nopw").await;
    let role = "sec_nopw_relay";
    drop_role(role).await;
    let out = output_checked(&mut outbox.command_with_args(&["migrate", "--relay-role", role]));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("without a password") && err.contains("\\password sec_nopw_relay"),
        "says how to set one:\n{err}"
    );
    let password: Option<String> = outbox
        .client
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(password, None);

    // Later, from a file: the existing role gets the password.
    let secret = "n0pw-Later-Secr3t-77ab";
    let file = temp_file("role-password", "txt");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let file_arg = file.display().to_string();
    let out = output_checked(&mut outbox.command_with_args(&[
        "migrate",
        "--relay-role",
        role,
        "--relay-password-file",
        &file_arg,
    ]));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!all_output(&out).contains(secret), "{err}");
    assert!(err.contains("password updated"), "{err}");
    let url = relay_database_url_with(Some(secret)).replacen(RELAY_ROLE, role, 1);
    let login = tokio_postgres::connect(&url, NoTls).await.map(|_| ());
    drop_role(role).await;
    login.expect("the role logs in with the password from the file");
}

#[tokio::test]
async fn a_wrong_password_is_reported_without_showing_it() {
    let mut outbox = TestOutbox::new("sec_wrong_pw").await;
    let wrong = "Wr0ng-Relay-Pw-3141";
    let pw_file = temp_file("wrong-password", "txt");
    std::fs::write(&pw_file, format!("{wrong}\n")).unwrap();
    let pw_file = pw_file.display().to_string();
    // The password in the URL, then from DATABASE_PASSWORD_FILE.
    let cases = [
        vec![("DATABASE_URL", relay_database_url_with(Some(wrong)))],
        vec![
            ("DATABASE_URL", relay_database_url_with(None)),
            ("DATABASE_PASSWORD_FILE", pw_file.clone()),
        ],
    ];
    for env in cases {
        outbox.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        for args in [
            vec!["run"],
            vec!["run", "--mode", "poll"],
            vec!["dle", "list"],
        ] {
            let out =
                run_with_timeout_checked(outbox.command_with_args(&args), Duration::from_secs(60));
            let text = all_output(&out);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {text}");
            let last = stderr(&out).lines().last().unwrap_or_default().to_owned();
            assert!(
                last.starts_with("error: ") && last.contains("password"),
                "{args:?}: says what to fix: {text}"
            );
            assert!(
                !text.contains(wrong),
                "{args:?}: the wrong password leaked:\n{text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_password_can_come_from_database_password_file() {
    let mut outbox = TestOutbox::new("sec_pw_file").await;
    let file = temp_file("relay-password", "txt");
    std::fs::write(&file, format!("{}\n", relay_password())).unwrap();
    outbox
        .env
        .push(("DATABASE_URL".into(), relay_database_url_with(None)));
    outbox
        .env
        .push(("DATABASE_PASSWORD_FILE".into(), file.display().to_string()));
    let relay = outbox.start_relay();
    let id = outbox
        .publish("Order", Uuid::new_v4(), "Placed", &json!({"n": 1}))
        .await;
    read_until_all(vec![outbox.topic("Order")], vec![id], DEADLINE).await;
    let log = relay.log_text();
    assert!(
        log.contains(&format!("postgres://{RELAY_ROLE}@")),
        "the URL had no password; the file gave it:\n{log}"
    );
    assert!(relay.terminate().success());
}
