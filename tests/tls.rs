//! TLS and authentication against the real PostgreSQL: a CA and a server
//! certificate (for 127.0.0.1 and localhost) are generated here, the running
//! server is switched to `ssl = on` with them (`ALTER SYSTEM` and a reload),
//! and both kinds of pgoutbox connection (tokio-postgres, and our own
//! replication client) are checked in every mode that matters.
//!
//! The tests change server state, so they run one at a time: a mutex within
//! this process, and an advisory lock across processes. Each one leaves the
//! server's TLS settings as they were (`ALTER SYSTEM RESET`), even when it
//! fails.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::harness::{database_settings as settings, read_until_all, wait_for, TestOutbox};
use common::pki::{new_ca, server_certificate};
use common::services;
use pgoutbox::database::TlsError;
use pgoutbox::replication::{ReplicationClient, ReplicationError};
use serde_json::json;
use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::Client;
use uuid::Uuid;

/// Serializes the tests of this process.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// Advisory lock key serializing TLS tests across processes ("pgtls").
const CROSS_PROCESS_LOCK: i64 = 0x0070_6774_6c73;

/// The certificates of this run.
struct Pki {
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    /// A CA that signed nothing the server presents.
    other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

/// Generates the CA and server certificate once, in a directory the
/// server's OS user can read, the key owned by that user with mode 0600 (as
/// PostgreSQL insists).
async fn pki(admin: &Client) -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    if let Some(p) = PKI.get() {
        return p;
    }
    let data_dir: String = admin
        .query_one("SHOW data_directory", &[])
        .await
        .unwrap()
        .get(0);
    let owner = std::fs::metadata(&data_dir).unwrap_or_else(|e| {
        panic!("cannot stat the server's data directory {data_dir} ({e}); these tests need the local server of scripts/services")
    });
    // Certificates of earlier runs whose process has gone.
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("pg-tls-") {
            if !PathBuf::from(format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = tmp.join(format!("pg-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    let ca = new_ca("pgoutbox test CA");
    let other = new_ca("an unrelated CA");
    let (cert, key) = server_certificate(&ca, "pgoutbox test server");

    let write = |name: &str, text: String, mode: u32| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
        }
        path
    };
    let pki = Pki {
        ca: write("ca.pem", ca.pem(), 0o644),
        other_ca: write("other-ca.pem", other.pem(), 0o644),
        server_cert: write("server.pem", cert, 0o644),
        server_key: write("server.key", key, 0o600),
    };
    let _ = PKI.set(pki);
    PKI.get().unwrap()
}

/// Holds the server in one TLS state for the length of a test, and puts its
/// settings back afterwards.
struct ServerTls {
    _serial: MutexGuard<'static, ()>,
    /// Holds the cross-process advisory lock.
    admin: Client,
    pki: &'static Pki,
}

impl ServerTls {
    async fn lock() -> (MutexGuard<'static, ()>, Client) {
        let serial = SERIAL.lock().await;
        let admin = common::harness::connect().await;
        admin
            .execute("SELECT pg_advisory_lock($1)", &[&CROSS_PROCESS_LOCK])
            .await
            .unwrap();
        // A run killed while TLS was on left its settings behind; with the
        // lock held they are stale, and must go before `pki` deletes that
        // run's files (a restart would fail on missing certificate files).
        reset(&admin).await;
        (serial, admin)
    }

    /// `ssl = on` with this run's certificate.
    async fn on() -> ServerTls {
        let (serial, admin) = Self::lock().await;
        let pki = pki(&admin).await;
        for sql in [
            format!(
                "ALTER SYSTEM SET ssl_cert_file = '{}'",
                pki.server_cert.display()
            ),
            format!(
                "ALTER SYSTEM SET ssl_key_file = '{}'",
                pki.server_key.display()
            ),
            "ALTER SYSTEM SET ssl = on".to_owned(),
        ] {
            admin.batch_execute(&sql).await.unwrap();
        }
        let tls = ServerTls {
            _serial: serial,
            admin,
            pki,
        };
        tls.reload_until(true).await;
        tls
    }

    /// The server's TLS settings as configured (`ssl = off` here; reset by
    /// `lock`).
    async fn off() -> ServerTls {
        let (serial, admin) = Self::lock().await;
        let pki = pki(&admin).await;
        let tls = ServerTls {
            _serial: serial,
            admin,
            pki,
        };
        tls.reload_until(false).await;
        tls
    }

    /// Reloads the configuration and waits until new connections see TLS
    /// offered (or not).
    async fn reload_until(&self, offered: bool) {
        self.admin
            .execute("SELECT pg_reload_conf()", &[])
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let probe =
                settings(&url("pgoutbox", "pgoutbox", "127.0.0.1", "sslmode=require")).unwrap();
            match pgoutbox::database::connect(&probe).await {
                Ok(_) if offered => return,
                Err(e) if !offered && tls_error(&e).is_some() => return,
                other => assert!(
                    Instant::now() < deadline,
                    "the server did not turn TLS {} after a reload (last attempt: {:?}); see its log",
                    if offered { "on" } else { "off" },
                    other.err().map(|e| pgoutbox::error::postgres_text(&e))
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Back to the server's own configuration (`ALTER SYSTEM` cannot run in a
/// transaction, so one statement at a time).
const RESET: [&str; 3] = [
    "ALTER SYSTEM RESET ssl",
    "ALTER SYSTEM RESET ssl_cert_file",
    "ALTER SYSTEM RESET ssl_key_file",
];

async fn reset(admin: &Client) {
    for sql in RESET {
        admin.batch_execute(sql).await.unwrap();
    }
}

impl Drop for ServerTls {
    fn drop(&mut self) {
        // Runs even when the test panicked; the lock is released after it,
        // when `admin` closes.
        let done = std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let admin = common::harness::connect().await;
                reset(&admin).await;
                admin.execute("SELECT pg_reload_conf()", &[]).await.unwrap();
            });
        })
        .join();
        if done.is_err() {
            eprintln!("could not reset the server's TLS settings; run: {RESET:?}");
        }
    }
}

/// A URL for `user` at `host` on the test server, with extra query
/// parameters.
fn url(user: &str, password: &str, host: &str, params: &str) -> String {
    let base: tokio_postgres::Config = services().database_url.parse().unwrap();
    let port = base.get_ports().first().copied().unwrap_or(5432);
    let db = base.get_dbname().unwrap_or("pgoutbox");
    format!("postgres://{user}:{password}@{host}:{port}/{db}?{params}")
}

fn tls_error(e: &tokio_postgres::Error) -> Option<&TlsError> {
    std::error::Error::source(e).and_then(|s| s.downcast_ref::<TlsError>())
}

/// Connects both ways with `url`; returns whether each connection is
/// encrypted (from pg_stat_ssl), or the errors' texts.
async fn connect_both(url: &str) -> (Result<bool, String>, Result<bool, String>) {
    let s = settings(url).map_err(|e| e.to_string()).unwrap();
    let normal = match pgoutbox::database::connect(&s).await {
        Ok(client) => Ok(client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)),
        Err(e) => Err(pgoutbox::error::Error::postgres("connecting", &e).to_string()),
    };
    let replication = match ReplicationClient::connect(&s).await {
        Ok(mut client) => {
            let rows = client
                .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .await
                .unwrap();
            Ok(rows[0][0].as_deref() == Some("t"))
        }
        Err(e) => Err(e.to_string()),
    };
    (normal, replication)
}

fn assert_one_line_without(text: &str, secret: &str) {
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(!text.contains(secret), "the secret leaked: {text}");
}

#[tokio::test]
async fn verify_full_encrypts_every_relay_connection_and_delivers() {
    let tls = ServerTls::on().await;
    let app = format!("tls_relay_{}", std::process::id());
    let mut outbox = TestOutbox::new("tls_relay").await;
    outbox.env.push((
        "DATABASE_URL".into(),
        url(
            "pgoutbox",
            "pgoutbox",
            "127.0.0.1",
            &format!(
                "sslmode=verify-full&sslrootcert={}&application_name={app}",
                tls.pki.ca.display()
            ),
        ),
    ));
    let relay = outbox.start_relay();
    let id = outbox
        .publish("Order", Uuid::new_v4(), "Created", &json!({"tls": true}))
        .await;
    read_until_all(
        vec![outbox.topic("Order")],
        vec![id],
        Duration::from_secs(60),
    )
    .await;

    // The replication connection (a walsender) and the ordinary ones (client
    // backends) are all encrypted.
    let (admin, app) = (&tls.admin, &app);
    let kinds = wait_for("the relay's connections", Duration::from_secs(30), || async move {
        let rows = admin
            .query(
                "SELECT a.backend_type, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.application_name = $1",
                &[app],
            )
            .await
            .unwrap();
        let kinds: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let has = |k: &str| kinds.iter().any(|(kind, _)| kind == k);
        (has("walsender") && has("client backend")).then_some(kinds)
    })
    .await;
    assert!(kinds.iter().all(|(_, ssl)| *ssl), "{kinds:?}");
    let status = relay.terminate();
    assert!(status.success(), "{status:?}");
    outbox.drop_slot().await;
}

#[tokio::test]
async fn verify_full_refuses_a_host_name_the_certificate_does_not_list() {
    let tls = ServerTls::on().await;
    // The server's address, under a name its certificate does not carry.
    let bad = url(
        "pgoutbox",
        "pgoutbox",
        "db.invalid",
        &format!(
            "hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
            tls.pki.ca.display()
        ),
    );
    let (normal, replication) = connect_both(&bad).await;
    for err in [normal.unwrap_err(), replication.unwrap_err()] {
        assert!(err.contains("not valid for name \"db.invalid\""), "{err}");
        assert!(err.contains("subjectAltName"), "{err}");
        assert_one_line_without(&err, ":pgoutbox@");
    }
    // verify-ca checks the chain only.
    let (normal, replication) = connect_both(&bad.replace("verify-full", "verify-ca")).await;
    assert_eq!((normal, replication), (Ok(true), Ok(true)));
    // And both names the certificate does carry pass verify-full.
    for host in ["127.0.0.1", "localhost"] {
        let good = url(
            "pgoutbox",
            "pgoutbox",
            host,
            &format!("sslmode=verify-full&sslrootcert={}", tls.pki.ca.display()),
        );
        assert_eq!(connect_both(&good).await, (Ok(true), Ok(true)), "{host}");
    }
}

#[tokio::test]
async fn verify_ca_refuses_a_certificate_from_an_untrusted_ca() {
    let tls = ServerTls::on().await;
    let untrusted = url(
        "pgoutbox",
        "pgoutbox",
        "127.0.0.1",
        &format!(
            "sslmode=verify-ca&sslrootcert={}",
            tls.pki.other_ca.display()
        ),
    );
    let (normal, replication) = connect_both(&untrusted).await;
    for err in [normal.unwrap_err(), replication.unwrap_err()] {
        assert!(
            err.contains("UnknownIssuer") || err.contains("unknown issuer"),
            "{err}"
        );
        assert!(err.contains("sslrootcert in database.url"), "{err}");
        assert_one_line_without(&err, ":pgoutbox@");
    }
}

#[tokio::test]
async fn require_encrypts_without_a_root_certificate_and_prefer_uses_tls_when_offered() {
    let _tls = ServerTls::on().await;
    for params in ["sslmode=require", "sslmode=prefer", ""] {
        let u = url("pgoutbox", "pgoutbox", "127.0.0.1", params);
        assert_eq!(connect_both(&u).await, (Ok(true), Ok(true)), "{params:?}");
    }
    let u = url("pgoutbox", "pgoutbox", "127.0.0.1", "sslmode=disable");
    assert_eq!(connect_both(&u).await, (Ok(false), Ok(false)));
}

#[tokio::test]
async fn scram_and_md5_roles_log_in_over_tls_and_a_wrong_password_is_a_clear_error() {
    let tls = ServerTls::on().await;
    let params = format!("sslmode=verify-full&sslrootcert={}", tls.pki.ca.display());
    for (user, password) in [("pgoutbox", "pgoutbox"), ("pgoutbox_md5", "md5pass")] {
        let u = url(user, password, "127.0.0.1", &params);
        assert_eq!(connect_both(&u).await, (Ok(true), Ok(true)), "{user}");
        let wrong = url(user, "not-the-password-42", "127.0.0.1", &params);
        let (normal, replication) = connect_both(&wrong).await;
        for err in [normal.unwrap_err(), replication.unwrap_err()] {
            assert!(err.contains("authentication failed"), "{user}: {err}");
            assert_one_line_without(&err, "not-the-password-42");
        }
    }
}

#[tokio::test]
async fn channel_binding_require_works_over_tls_and_refuses_md5() {
    let tls = ServerTls::on().await;
    let params = format!(
        "sslmode=verify-full&sslrootcert={}&channel_binding=require",
        tls.pki.ca.display()
    );
    // SCRAM-SHA-256-PLUS: both clients bind the channel, or the server
    // would refuse (and channel_binding=require would refuse plain SCRAM).
    let u = url("pgoutbox", "pgoutbox", "127.0.0.1", &params);
    assert_eq!(connect_both(&u).await, (Ok(true), Ok(true)));
    let u = url("pgoutbox_md5", "md5pass", "127.0.0.1", &params);
    let (normal, replication) = connect_both(&u).await;
    let (normal, replication) = (normal.unwrap_err(), replication.unwrap_err());
    assert!(normal.contains("channel binding"), "{normal}");
    assert!(
        replication.contains("channel_binding=require") && replication.contains("md5"),
        "{replication}"
    );
    assert_one_line_without(&replication, "md5pass");
}

#[tokio::test]
async fn without_tls_on_the_server_require_and_channel_binding_fail_clearly() {
    let _tls = ServerTls::off().await;
    let u = url("pgoutbox_md5", "md5pass", "127.0.0.1", "sslmode=require");
    let (normal, replication) = connect_both(&u).await;
    for err in [normal.unwrap_err(), replication.unwrap_err()] {
        assert!(
            err.contains("the server does not support TLS, but sslmode in database.url is require"),
            "{err}"
        );
        assert_one_line_without(&err, "md5pass");
    }
    let u = url(
        "pgoutbox",
        "pgoutbox",
        "127.0.0.1",
        "channel_binding=require",
    );
    let (normal, replication) = connect_both(&u).await;
    for err in [normal.unwrap_err(), replication.unwrap_err()] {
        assert!(err.contains("channel_binding=require needs TLS"), "{err}");
    }
    // prefer (the loopback default) goes on without TLS.
    let u = url("pgoutbox", "pgoutbox", "127.0.0.1", "");
    assert_eq!(connect_both(&u).await, (Ok(false), Ok(false)));
    // The replication error is one an operator must fix.
    let s = settings(&url(
        "pgoutbox",
        "pgoutbox",
        "127.0.0.1",
        "sslmode=verify-full",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let err = ReplicationClient::connect(&s).await.err().unwrap();
    assert!(
        matches!(err, ReplicationError::Tls(TlsError::NotOffered { .. })),
        "{err:?}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn the_relay_exits_non_zero_with_a_clear_error_when_tls_is_required_but_not_offered() {
    let _tls = ServerTls::off().await;
    let out = Command::new(env!("CARGO_BIN_EXE_pgoutbox"))
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "DATABASE_URL",
            url("pgoutbox_md5", "md5pass", "127.0.0.1", "sslmode=require"),
        )
        .env("KAFKA_BROKERS", &services().kafka_brokers)
        .env("OUTBOX_SLOT", "tls_never_created")
        .env("OUTBOX_METRICS_LISTEN", "off")
        .output()
        .expect("run pgoutbox");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the server does not support TLS, but sslmode in database.url is require"),
        "{stderr}"
    );
    assert!(!stderr.contains("md5pass"), "{stderr}");
}

#[tokio::test]
async fn a_missing_certificate_file_is_a_config_error_naming_the_field() {
    // No server state involved.
    let out = Command::new(env!("CARGO_BIN_EXE_pgoutbox"))
        .arg("migrate")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", url("pgoutbox", "pgoutbox", "127.0.0.1", ""))
        .env("DATABASE_TLS_MODE", "verify-full")
        .env("DATABASE_TLS_ROOT_CERT", "/nonexistent/ca.pem")
        .output()
        .expect("run pgoutbox");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("database.tls_root_cert"), "{stderr}");
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");
}
