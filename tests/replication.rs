//! The replication client against a real PostgreSQL: every authentication
//! method, slot creation with an exported snapshot, streaming pgoutput,
//! feedback moving the slot, errors, and feedback under backpressure.
//!
//! Each test uses its own table, publication, slot and application name
//! (`rt_<pid>_<test>`), and drops its slot at the end.

mod common;

use std::time::Duration;

use common::harness::{connect, wait_for};
use common::services;
use pgoutbox::replication::{
    ReplicationClient, ReplicationError, ReplicationMessage, ReplicationStream, SnapshotAction,
    StandbyStatus,
};
use pgoutbox::Lsn;
use tokio_postgres::config::Host;
use tokio_postgres::Config;

const WAIT: Duration = Duration::from_secs(30);

/// A name unique to this test process and test.
fn unique(test: &str) -> String {
    format!("rt_{}_{test}", std::process::id())
}

/// The test database's address, logging in as `user`.
fn config_as(user: &str, password: Option<&str>, application_name: &str) -> Config {
    let base: Config = services()
        .database_url
        .parse()
        .expect("DATABASE_URL parses");
    let mut c = Config::new();
    for h in base.get_hosts() {
        match h {
            Host::Tcp(name) => c.host(name),
            Host::Unix(dir) => c.host_path(dir),
        };
    }
    for p in base.get_ports() {
        c.port(*p);
    }
    c.dbname(base.get_dbname().unwrap_or("pgoutbox"))
        .user(user)
        .application_name(application_name);
    if let Some(pw) = password {
        c.password(pw);
    }
    c
}

/// The main test role (superuser, scram-sha-256).
fn main_config(application_name: &str) -> Config {
    let mut c: Config = services()
        .database_url
        .parse()
        .expect("DATABASE_URL parses");
    c.application_name(application_name);
    c
}

/// Drops inactive slots left behind by runs of this file whose process has
/// gone (a failed test never reaches its own clean-up); slots of live
/// processes, such as a concurrent run, are left alone.
async fn drop_stale_slots(sql: &tokio_postgres::Client) {
    let rows = sql
        .query(
            "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'rt\\_%' AND NOT active",
            &[],
        )
        .await
        .expect("list test slots");
    for row in rows {
        let slot: String = row.get(0);
        let Some(pid) = slot.split('_').nth(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Another run may race us to it; either way it is gone.
        let _ = sql
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await;
    }
}

/// A table in its own publication.
async fn table_with_publication(sql: &tokio_postgres::Client, name: &str) {
    sql.batch_execute(&format!(
        "DROP TABLE IF EXISTS {name}; \
         CREATE TABLE {name} (id int PRIMARY KEY, v text NOT NULL); \
         DROP PUBLICATION IF EXISTS {name}_pub; \
         CREATE PUBLICATION {name}_pub FOR TABLE {name};"
    ))
    .await
    .expect("create table and publication");
}

async fn drop_table_and_slot(sql: &tokio_postgres::Client, name: &str) {
    let mut repl = ReplicationClient::connect(&main_config(name))
        .await
        .expect("connect");
    repl.drop_slot(&format!("{name}_slot"), true)
        .await
        .expect("drop slot");
    sql.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {name}_pub; DROP TABLE IF EXISTS {name};"
    ))
    .await
    .expect("drop table and publication");
}

fn pgoutput_options(name: &str) -> Vec<(&'static str, String)> {
    vec![
        ("proto_version", "1".to_owned()),
        ("publication_names", format!("\"{name}_pub\"")),
    ]
}

async fn start(client: ReplicationClient, name: &str, buffer: usize) -> ReplicationStream {
    let opts = pgoutput_options(name);
    let opts: Vec<(&str, &str)> = opts.iter().map(|(k, v)| (*k, v.as_str())).collect();
    client
        .start_logical_replication(&format!("{name}_slot"), Lsn::ZERO, &opts, buffer)
        .await
        .expect("START_REPLICATION")
}

/// One decoded transaction: the pgoutput message type bytes in order, the
/// insert payloads, and the commit's end LSN.
#[derive(Debug, Default)]
struct Tx {
    kinds: Vec<u8>,
    inserts: Vec<bytes::Bytes>,
    end_lsn: Lsn,
}

/// Receives until a transaction with at least one insert has committed,
/// skipping empty ones, answering keepalives that ask for a reply.
async fn next_tx_with_inserts(stream: &mut ReplicationStream, confirmed: Lsn) -> Tx {
    let feedback = stream.feedback();
    let mut tx = Tx::default();
    loop {
        let msg = tokio::time::timeout(WAIT, stream.recv())
            .await
            .expect("a message within the deadline")
            .expect("stream still open")
            .expect("no stream error");
        match msg {
            ReplicationMessage::XLogData { data, .. } => {
                let kind = data[0];
                tx.kinds.push(kind);
                match kind {
                    b'B' => {
                        tx = Tx {
                            kinds: vec![b'B'],
                            ..Tx::default()
                        }
                    }
                    b'I' => tx.inserts.push(data),
                    b'C' => {
                        // Commit: flags (1), commit LSN (8), end LSN (8), time (8).
                        let end = u64::from_be_bytes(data[10..18].try_into().unwrap());
                        tx.end_lsn = Lsn(end);
                        if !tx.inserts.is_empty() {
                            return tx;
                        }
                    }
                    _ => {}
                }
            }
            ReplicationMessage::PrimaryKeepAlive {
                reply_requested, ..
            } => {
                if reply_requested {
                    feedback
                        .send_status(StandbyStatus::confirmed(confirmed))
                        .await
                        .expect("answer keepalive");
                }
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn every_authentication_method_connects_and_identifies_the_system() {
    let app = unique("auth");
    let base: Config = services().database_url.parse().unwrap();
    let scram_user = base.get_user().unwrap().to_owned();
    let scram_pw = String::from_utf8(base.get_password().unwrap().to_vec()).unwrap();
    let cases = [
        (
            "scram-sha-256",
            config_as(&scram_user, Some(&scram_pw), &app),
        ),
        ("md5", config_as("pgoutbox_md5", Some("md5pass"), &app)),
        (
            "password",
            config_as("pgoutbox_clear", Some("clearpass"), &app),
        ),
        ("trust", config_as("pgoutbox_trust", None, &app)),
    ];
    let mut system_ids = Vec::new();
    for (method, config) in cases {
        let mut client = ReplicationClient::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        let version = client
            .server_version_num()
            .expect("server_version reported");
        assert!(version >= 140_000, "{method}: version {version}");
        let id = client
            .identify_system()
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        assert!(!id.system_id.is_empty() && id.system_id.bytes().all(|b| b.is_ascii_digit()));
        assert!(id.timeline >= 1, "{method}: timeline {}", id.timeline);
        assert!(!id.xlogpos.is_zero(), "{method}: xlogpos");
        assert_eq!(id.dbname.as_deref(), base.get_dbname(), "{method}");
        system_ids.push(id.system_id);
    }
    system_ids.dedup();
    assert_eq!(system_ids.len(), 1, "all methods reach the same cluster");
}

/// Set (non-empty, not `0`) when DATABASE_URL names external services whose
/// Unix socket this machine may not reach (another host, a container):
/// `unix_socket_connections_work` then reports itself skipped instead of
/// failing when it finds no socket.
const EXTERNAL_SERVICES: &str = "PGOUTBOX_TEST_EXTERNAL_SERVICES";

/// Logs in over the server's Unix socket. `scripts/services` always gives
/// its PostgreSQL one (`unix_socket_directories`), on this machine, so a
/// missing socket fails the test, unless `PGOUTBOX_TEST_EXTERNAL_SERVICES`
/// says the server is an external one: then the test says it is skipped.
#[tokio::test]
async fn unix_socket_connections_work() {
    let sql = connect().await;
    let row = sql
        .query_one(
            "SELECT current_setting('unix_socket_directories'), current_setting('port')::int",
            &[],
        )
        .await
        .unwrap();
    let (dirs, port): (String, i32) = (row.get(0), row.get(1));
    let socket = dirs
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.starts_with('@'))
        .find(|d| {
            std::path::Path::new(d)
                .join(format!(".s.PGSQL.{port}"))
                .exists()
        });
    let Some(dir) = socket else {
        let why = format!(
            "no Unix socket .s.PGSQL.{port} of the test server on this machine \
             (its unix_socket_directories = '{dirs}')"
        );
        if std::env::var(EXTERNAL_SERVICES).is_ok_and(|v| !v.is_empty() && v != "0") {
            // Straight to the process's stderr: the test harness captures
            // eprintln! of a passing test, and a skip must be seen.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: unix_socket_connections_work: {why}; {EXTERNAL_SERVICES} is set"
            );
            return;
        }
        panic!(
            "{why}. scripts/services always gives PostgreSQL a Unix socket: is the \
             server at DATABASE_URL another one? If it is external and its socket cannot \
             be reached from here (another host, a container), set {EXTERNAL_SERVICES}=1 \
             to skip this test."
        );
    };
    let tcp = main_config(&unique("unix"));
    let mut config = Config::new();
    config
        .host_path(dir)
        .port(u16::try_from(port).expect("a port number"))
        .user(tcp.get_user().unwrap())
        .password(tcp.get_password().unwrap())
        .dbname(tcp.get_dbname().unwrap())
        .application_name(tcp.get_application_name().unwrap());
    let mut client = ReplicationClient::connect(&config)
        .await
        .expect("connect over unix socket");
    client
        .identify_system()
        .await
        .expect("IDENTIFY_SYSTEM over unix socket");
}

#[tokio::test]
async fn wrong_password_is_an_auth_error_that_never_shows_the_password() {
    let app = unique("badpw");
    let base: Config = services().database_url.parse().unwrap();
    let secret = "Wr0ng-Secret-4711";
    for user in [base.get_user().unwrap(), "pgoutbox_md5", "pgoutbox_clear"] {
        let err = ReplicationClient::connect(&config_as(user, Some(secret), &app))
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} logged in with a wrong password"));
        assert!(
            matches!(err, ReplicationError::Auth { .. }),
            "{user}: {err:?}"
        );
        assert!(!err.is_transient(), "{user}");
        assert_eq!(err.sqlstate(), Some("28P01"), "{user}: {err}");
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(!text.contains(secret), "{user}: password leaked in {text}");
            assert!(
                text.contains(user),
                "{user}: the message should name the user: {text}"
            );
        }
    }
}

#[tokio::test]
async fn simple_query_returns_text_rows_and_survives_a_failed_statement() {
    let mut client = ReplicationClient::connect(&main_config(&unique("query")))
        .await
        .unwrap();
    let rows = client
        .simple_query("SELECT 1 AS a, NULL::text AS b, 'x''y' AS c")
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![vec![Some("1".to_owned()), None, Some("x'y".to_owned())]]
    );
    let err = client
        .simple_query("SELECT no_such_column")
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("42703"), "{err}");
    assert!(!err.is_transient());
    let rows = client.simple_query("SELECT 2; SELECT 3").await.unwrap();
    assert_eq!(
        rows,
        vec![vec![Some("2".to_owned())], vec![Some("3".to_owned())]]
    );
}

#[tokio::test]
async fn missing_slot_is_a_server_error_with_sqlstate_42704() {
    let name = unique("noslot");
    let client = ReplicationClient::connect(&main_config(&name))
        .await
        .unwrap();
    let err = client
        .start_logical_replication(
            &format!("{name}_slot"),
            Lsn::ZERO,
            &[("proto_version", "1")],
            8,
        )
        .await
        .expect_err("START_REPLICATION of a missing slot fails");
    assert!(matches!(err, ReplicationError::Server(_)), "{err:?}");
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn exported_snapshot_slot_streams_begin_inserts_and_commit() {
    let name = unique("stream");
    let sql = connect().await;
    drop_stale_slots(&sql).await;
    table_with_publication(&sql, &name).await;
    sql.execute(
        &format!("INSERT INTO {name} VALUES (0, 'before-slot')"),
        &[],
    )
    .await
    .unwrap();

    let mut client = ReplicationClient::connect(&main_config(&name))
        .await
        .unwrap();
    let created = client
        .create_logical_slot(&format!("{name}_slot"), "pgoutput", SnapshotAction::Export)
        .await
        .expect("create slot");
    assert_eq!(created.slot_name, format!("{name}_slot"));
    assert_eq!(created.plugin, "pgoutput");
    assert!(!created.consistent_point.is_zero());
    let snapshot = created.snapshot_name.clone().expect("an exported snapshot");

    // Rows committed after the slot's consistent point are streamed, and are
    // not in the exported snapshot; rows before are in it and not streamed.
    sql.execute(&format!("INSERT INTO {name} VALUES (1, 'after-slot')"), &[])
        .await
        .unwrap();
    let mut reader = connect().await;
    let tx = reader
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead);
    let tx = tx.start().await.unwrap();
    tx.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
        .await
        .unwrap();
    let in_snapshot: Vec<String> = tx
        .query(&format!("SELECT v FROM {name} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(in_snapshot, ["before-slot"]);
    tx.rollback().await.unwrap();

    let mut stream = start(client, &name, 64).await;
    let first = next_tx_with_inserts(&mut stream, created.consistent_point).await;
    assert_eq!(first.kinds.first(), Some(&b'B'), "{:?}", first.kinds);
    assert_eq!(first.kinds.last(), Some(&b'C'));
    assert_eq!(first.inserts.len(), 1);
    assert!(contains(&first.inserts[0], b"after-slot"));

    sql.batch_execute(&format!(
        "BEGIN; INSERT INTO {name} VALUES (2, 'row-two'), (3, 'row-three'); \
         INSERT INTO {name} VALUES (4, 'row-four'); COMMIT;"
    ))
    .await
    .unwrap();
    let second = next_tx_with_inserts(&mut stream, first.end_lsn).await;
    assert_eq!(second.kinds.first(), Some(&b'B'));
    assert_eq!(second.kinds.last(), Some(&b'C'));
    let texts: Vec<bool> = [&b"row-two"[..], b"row-three", b"row-four"]
        .iter()
        .zip(&second.inserts)
        .map(|(want, got)| contains(got, want))
        .collect();
    assert_eq!(texts, [true, true, true], "inserts in commit order");
    assert!(second.end_lsn > first.end_lsn);

    stream
        .finish(Some(StandbyStatus::confirmed(second.end_lsn)))
        .await
        .expect("polite finish");
    wait_for("the slot to be released", WAIT, || async {
        let row = sql
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&format!("{name}_slot")],
            )
            .await
            .unwrap();
        (!row.get::<_, bool>(0)).then_some(())
    })
    .await;
    drop_table_and_slot(&sql, &name).await;
}

/// `confirmed_flush_lsn` of a slot, as an [`Lsn`].
async fn confirmed_flush(sql: &tokio_postgres::Client, slot: &str) -> Lsn {
    let text: String = sql
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    text.parse().unwrap()
}

#[tokio::test]
async fn status_update_moves_the_slots_confirmed_flush_lsn() {
    let name = unique("flush");
    let slot = format!("{name}_slot");
    let sql = connect().await;
    table_with_publication(&sql, &name).await;
    let mut client = ReplicationClient::connect(&main_config(&name))
        .await
        .unwrap();
    let created = client
        .create_logical_slot(&slot, "pgoutput", SnapshotAction::NoExport)
        .await
        .unwrap();
    assert_eq!(created.snapshot_name, None);
    let mut stream = start(client, &name, 64).await;
    sql.execute(&format!("INSERT INTO {name} VALUES (1, 'one')"), &[])
        .await
        .unwrap();
    let tx = next_tx_with_inserts(&mut stream, created.consistent_point).await;
    assert!(
        confirmed_flush(&sql, &slot).await < tx.end_lsn,
        "nothing confirmed yet"
    );

    stream
        .send_status(StandbyStatus::confirmed(tx.end_lsn))
        .await
        .expect("status update");
    let confirmed = wait_for("confirmed_flush_lsn to reach the commit", WAIT, || async {
        let c = confirmed_flush(&sql, &slot).await;
        (c >= tx.end_lsn).then_some(c)
    })
    .await;
    assert_eq!(confirmed, tx.end_lsn);

    stream.finish(None).await.expect("polite finish");
    drop_table_and_slot(&sql, &name).await;
}

/// What `pg_stat_replication` says about our walsender.
#[derive(Debug, PartialEq)]
struct ReplicationStat {
    flush_lsn: Option<Lsn>,
    reply_time: Option<String>,
    wait_event: Option<String>,
}

async fn replication_stat(sql: &tokio_postgres::Client, app: &str) -> Option<ReplicationStat> {
    let row = sql
        .query_opt(
            "SELECT r.flush_lsn::text, r.reply_time::text, a.wait_event \
             FROM pg_stat_replication r JOIN pg_stat_activity a USING (pid) \
             WHERE r.application_name = $1",
            &[&app],
        )
        .await
        .unwrap()?;
    Some(ReplicationStat {
        flush_lsn: row.get::<_, Option<String>>(0).map(|t| t.parse().unwrap()),
        reply_time: row.get(1),
        wait_event: row.get(2),
    })
}

#[tokio::test]
async fn feedback_reaches_the_server_while_the_consumer_is_not_receiving() {
    const ROWS: i32 = 20_000;
    let name = unique("backpressure");
    let slot = format!("{name}_slot");
    let sql = connect().await;
    table_with_publication(&sql, &name).await;
    let mut client = ReplicationClient::connect(&main_config(&name))
        .await
        .unwrap();
    let created = client
        .create_logical_slot(&slot, "pgoutput", SnapshotAction::NoExport)
        .await
        .unwrap();
    let mut stream = start(client, &name, 16).await;
    let feedback = stream.feedback();

    // A small transaction, received in full: its end is safe to confirm.
    sql.execute(&format!("INSERT INTO {name} VALUES (0, 'small')"), &[])
        .await
        .unwrap();
    let small = next_tx_with_inserts(&mut stream, created.consistent_point).await;
    feedback
        .send_status(StandbyStatus::confirmed(created.consistent_point))
        .await
        .unwrap();
    let before = wait_for("the first status update to be seen", WAIT, || async {
        replication_stat(&sql, &name)
            .await
            .filter(|s| s.flush_lsn == Some(created.consistent_point) && s.reply_time.is_some())
    })
    .await;

    // About 40 MB of pgoutput: far more than the channel and socket buffers.
    sql.execute(
        &format!(
            "INSERT INTO {name} SELECT g, g || ':' || repeat('x', 2000) FROM generate_series(1, $1) g"
        ),
        &[&ROWS],
    )
    .await
    .unwrap();

    // Without a single recv, the walsender ends up blocked writing to us.
    wait_for(
        "the walsender to block on writing to the client",
        WAIT,
        || async {
            replication_stat(&sql, &name)
                .await
                .filter(|s| s.wait_event.as_deref() == Some("WalSenderWriteData"))
        },
    )
    .await;

    // Feedback still goes out, and the server still reads it.
    tokio::time::timeout(
        Duration::from_secs(5),
        feedback.send_status(StandbyStatus::confirmed(small.end_lsn)),
    )
    .await
    .expect("send_status must not wait for the consumer")
    .expect("status update while the channel is full");
    wait_for(
        "the server to see feedback sent under backpressure",
        WAIT,
        || async {
            replication_stat(&sql, &name)
                .await
                .filter(|s| s.flush_lsn == Some(small.end_lsn) && s.reply_time > before.reply_time)
        },
    )
    .await;
    // Our update woke the walsender, which finds the socket still full and
    // goes back to waiting: nothing was read meanwhile.
    wait_for("the walsender to be blocked again", WAIT, || async {
        replication_stat(&sql, &name)
            .await
            .filter(|s| s.wait_event.as_deref() == Some("WalSenderWriteData"))
    })
    .await;
    // The server stamps reply_time just before it moves the slot.
    wait_for(
        "the slot to confirm the small transaction",
        WAIT,
        || async { (confirmed_flush(&sql, &slot).await == small.end_lsn).then_some(()) },
    )
    .await;

    // Resume: every row arrives, in order.
    let started = std::time::Instant::now();
    let big = next_tx_with_inserts(&mut stream, small.end_lsn).await;
    let elapsed = started.elapsed();
    assert_eq!(big.inserts.len(), usize::try_from(ROWS).unwrap());
    for (i, insert) in big.inserts.iter().enumerate() {
        assert!(
            contains(insert, format!("{}:xxx", i + 1).as_bytes()),
            "row {} out of order",
            i + 1
        );
    }
    eprintln!(
        "drained {} messages in {elapsed:?} ({:.0} messages/s)",
        big.kinds.len(),
        big.kinds.len() as f64 / elapsed.as_secs_f64()
    );
    stream
        .finish(Some(StandbyStatus::confirmed(big.end_lsn)))
        .await
        .expect("polite finish");
    assert_eq!(confirmed_flush(&sql, &slot).await, big.end_lsn);
    drop_table_and_slot(&sql, &name).await;
}

#[tokio::test]
async fn terminated_walsender_is_a_transient_error_and_stops_the_feedback_writer() {
    let name = unique("terminated");
    let slot = format!("{name}_slot");
    let sql = connect().await;
    table_with_publication(&sql, &name).await;
    let mut client = ReplicationClient::connect(&main_config(&name))
        .await
        .unwrap();
    client
        .create_logical_slot(&slot, "pgoutput", SnapshotAction::NoExport)
        .await
        .unwrap();
    let mut stream = start(client, &name, 8).await;
    let feedback = stream.feedback();
    let killed: bool = sql
        .query_one(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE application_name = $1",
            &[&name],
        )
        .await
        .expect("our walsender is listed")
        .get(0);
    assert!(killed);

    let err = loop {
        match tokio::time::timeout(WAIT, stream.recv())
            .await
            .expect("an error in time")
        {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("the stream ended without saying why"),
        }
    };
    assert!(err.is_transient(), "{err:?}");
    assert!(
        err.sqlstate() == Some("57P01") || matches!(err, ReplicationError::Closed(_)),
        "{err:?}"
    );
    assert!(stream.recv().await.is_none(), "the error is the last item");

    // The first write into a reset connection may still be accepted locally;
    // a later one fails, and from then on the writer is known to be gone.
    wait_for(
        "the feedback writer to notice the dead socket",
        WAIT,
        || async {
            let sent = feedback.send_status(StandbyStatus::default()).await;
            sent.is_err().then_some(())
        },
    )
    .await;
    assert!(feedback.is_closed());
    drop(stream);
    drop_table_and_slot(&sql, &name).await;
}
