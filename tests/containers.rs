//! pgoutbox's container image as users meet it, through testcontainers:
//! PostgreSQL and Kafka in containers (images made by `scripts/docker
//! images` from Debian's packages and the Kafka jars: `pgoutbox-test/*`),
//! the relay as the image the Dockerfile builds (`pgoutbox:local`), every
//! container on the host's network with ports on 127.0.0.1 (the engine
//! `scripts/docker up` starts has no bridge).
//!
//! Needs a Docker engine: without one every test here is skipped with the
//! reason printed, unless `PGOUTBOX_TEST_REQUIRE_DOCKER=1` (scripts/test sets
//! it when `scripts/docker up` succeeded), which makes a missing engine or
//! image a failure. The images are named by `PGOUTBOX_IMAGE`,
//! `PGOUTBOX_TEST_POSTGRES_IMAGE` and `PGOUTBOX_TEST_KAFKA_IMAGE` (defaults:
//! what `scripts/docker env` prints).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::harness::{
    delivery_counts, free_port, http_get, missing, read_topics_from, wait_for, Record,
};
use common::ledger::reorders;
use common::pki::{new_ca, server_certificate};
use serde_json::json;
use testcontainers::core::{AccessMode, Mount, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

/// The superuser of the PostgreSQL container (and what the relay logs in as).
const PG_USER: &str = "pgoutbox";
const PG_PASSWORD: &str = "ctr-Secr3t-51";

/// `name:tag` of an image from the environment, or the default.
fn image(var: &str, default: &str) -> (String, String) {
    let full = std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned());
    match full.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name.to_owned(), tag.to_owned()),
        _ => (full, "latest".to_owned()),
    }
}

fn pgoutbox_image() -> GenericImage {
    let (name, tag) = image("PGOUTBOX_IMAGE", "pgoutbox:local");
    GenericImage::new(name, tag)
}

/// The engine's unix socket (`DOCKER_HOST=unix://...` or the default).
fn engine_socket() -> PathBuf {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if h.starts_with("unix://") => PathBuf::from(&h["unix://".len()..]),
        _ => PathBuf::from("/var/run/docker.sock"),
    }
}

/// `GET path` on the engine's API: (status, body), or why it failed.
fn engine_get(path: &str) -> Result<(u16, String), String> {
    let socket = engine_socket();
    let mut s = std::os::unix::net::UnixStream::connect(&socket)
        .map_err(|e| format!("no Docker engine at {} ({e})", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("the engine answered {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Why the tests here cannot run (no engine, or an image missing), or
/// `None`. With `PGOUTBOX_TEST_REQUIRE_DOCKER=1` a reason is a failure.
fn skip_reason() -> Option<String> {
    let reason = match engine_get("/_ping") {
        Err(e) => Some(format!("{e}; scripts/docker up starts one")),
        Ok((200, _)) => [
            image("PGOUTBOX_IMAGE", "pgoutbox:local"),
            image("PGOUTBOX_TEST_POSTGRES_IMAGE", "pgoutbox-test/postgres:15"),
            image("PGOUTBOX_TEST_KAFKA_IMAGE", "pgoutbox-test/kafka:4.4.0"),
        ]
        .iter()
        .find_map(
            |(name, tag)| match engine_get(&format!("/images/{name}:{tag}/json")) {
                Ok((200, _)) => None,
                _ => Some(format!(
                    "the image {name}:{tag} is missing; scripts/docker images makes it"
                )),
            },
        ),
        Ok((status, body)) => Some(format!("the engine's /_ping answered {status}: {body}")),
    };
    let reason = reason?;
    assert!(
        std::env::var("PGOUTBOX_TEST_REQUIRE_DOCKER").as_deref() != Ok("1"),
        "PGOUTBOX_TEST_REQUIRE_DOCKER=1 but {reason}"
    );
    skipped(&reason);
    Some(reason)
}

/// Says why a test is skipped where a plain `cargo test` shows it: straight
/// to the process's stderr (the harness captures only `eprintln!`).
fn skipped(reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED (tests/containers.rs): {reason}");
}

/// A PostgreSQL container on 127.0.0.1:`port`, logical decoding on, and
/// `extra` more `-c` settings; `init` files go to
/// /docker-entrypoint-initdb.d.
async fn start_postgres(
    port: u16,
    extra: &[&str],
    env: &[(&str, String)],
    init: &[(PathBuf, &str)],
) -> ContainerAsync<GenericImage> {
    let (name, tag) = image("PGOUTBOX_TEST_POSTGRES_IMAGE", "pgoutbox-test/postgres:15");
    let mut cmd: Vec<String> = vec!["postgres".into()];
    for setting in [
        format!("port={port}"),
        "listen_addresses=127.0.0.1".into(),
        "wal_level=logical".into(),
        "max_wal_senders=10".into(),
        "max_replication_slots=10".into(),
    ]
    .into_iter()
    .chain(extra.iter().map(|s| s.to_string()))
    {
        cmd.push("-c".into());
        cmd.push(setting);
    }
    let mut request = GenericImage::new(name, tag)
        .with_network("host")
        .with_env_var("POSTGRES_USER", PG_USER)
        .with_env_var("POSTGRES_PASSWORD", PG_PASSWORD)
        .with_env_var("POSTGRES_DB", "pgoutbox")
        .with_cmd(cmd);
    for (k, v) in env {
        request = request.with_env_var(*k, v.clone());
    }
    for (host, file) in init {
        request = request.with_mount(
            Mount::bind_mount(
                host.display().to_string(),
                format!("/docker-entrypoint-initdb.d/{file}"),
            )
            .with_access_mode(AccessMode::ReadOnly),
        );
    }
    let container = request
        .start()
        .await
        .expect("start the PostgreSQL container");
    wait_for(
        "the PostgreSQL container to accept connections",
        Duration::from_secs(120),
        || async move { connect(port).await.ok().map(|_| ()) },
    )
    .await;
    container
}

/// Connects to the PostgreSQL container on `port` as its superuser.
async fn connect(port: u16) -> Result<Client, tokio_postgres::Error> {
    connect_as(port, PG_PASSWORD).await
}

async fn connect_as(port: u16, password: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user={PG_USER} password={password} dbname=pgoutbox"),
        NoTls,
    )
    .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A one-node Kafka container (KRaft) on 127.0.0.1:`port`.
async fn start_kafka(port: u16) -> ContainerAsync<GenericImage> {
    let (name, tag) = image("PGOUTBOX_TEST_KAFKA_IMAGE", "pgoutbox-test/kafka:4.4.0");
    let controller = free_port();
    GenericImage::new(name, tag)
        .with_wait_for(WaitFor::message_on_stdout("Kafka Server started"))
        .with_network("host")
        .with_env_var(
            "KAFKA_LISTENERS",
            format!("PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}"),
        )
        .with_env_var(
            "KAFKA_ADVERTISED_LISTENERS",
            format!("PLAINTEXT://127.0.0.1:{port}"),
        )
        .with_env_var(
            "KAFKA_CONTROLLER_QUORUM_VOTERS",
            format!("1@127.0.0.1:{controller}"),
        )
        .with_env_var("KAFKA_NUM_PARTITIONS", "4")
        .with_env_var("KAFKA_HEAP_OPTS", "-Xms256m -Xmx512m")
        .with_startup_timeout(Duration::from_secs(180))
        .start()
        .await
        .expect("start the Kafka container")
}

/// Runs the pgoutbox image with `args` to its end: (exit code, stdout, stderr).
async fn pgoutbox_once(
    args: &[&str],
    env: &[(&str, String)],
    mounts: Vec<Mount>,
) -> (i64, String, String) {
    let mut request = pgoutbox_image()
        .with_wait_for(WaitFor::exit(
            testcontainers::core::wait::ExitWaitStrategy::new(),
        ))
        .with_network("host")
        .with_readonly_rootfs(true)
        .with_cmd(args.iter().map(|a| a.to_string()));
    for (k, v) in env {
        request = request.with_env_var(*k, v.clone());
    }
    for m in mounts {
        request = request.with_mount(m);
    }
    let c = request.start().await.expect("run the pgoutbox image");
    let code = c
        .exit_code()
        .await
        .expect("exit code")
        .expect("the container has exited");
    let out = String::from_utf8_lossy(&c.stdout_to_vec().await.unwrap_or_default()).into_owned();
    let err = String::from_utf8_lossy(&c.stderr_to_vec().await.unwrap_or_default()).into_owned();
    (code, out, err)
}

/// The relay (`pgoutbox run`) as a container with a read-only root
/// filesystem, its metrics on 127.0.0.1:`metrics_port`.
async fn start_relay(
    env: &[(&str, String)],
    metrics_port: u16,
    mounts: Vec<Mount>,
) -> ContainerAsync<GenericImage> {
    let mut request = pgoutbox_image()
        .with_network("host")
        .with_readonly_rootfs(true)
        .with_env_var("OUTBOX_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .with_env_var("RUST_LOG", "info,librdkafka=warn,rdkafka=warn");
    for (k, v) in env {
        request = request.with_env_var(*k, v.clone());
    }
    for m in mounts {
        request = request.with_mount(m);
    }
    let relay = request.start().await.expect("start the relay container");
    wait_for(
        "the relay container's /healthz",
        Duration::from_secs(60),
        || async move {
            match http_get(&format!("127.0.0.1:{metrics_port}"), "/healthz").await {
                Ok((200, _)) => Some(()),
                _ => None,
            }
        },
    )
    .await;
    relay
}

/// The relay container's log (stdout and stderr), for failure messages.
async fn logs(c: &ContainerAsync<GenericImage>) -> String {
    let out = c.stdout_to_vec().await.unwrap_or_default();
    let err = c.stderr_to_vec().await.unwrap_or_default();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Publishes one event through `outbox_publish`, payload `{"seq": seq}`.
async fn publish(client: &Client, aggregate: Uuid, seq: i64) -> Uuid {
    client
        .query_one(
            "SELECT public.outbox_publish($1, $2, $3, $4)",
            &[&"ctr_order", &aggregate, &"created", &json!({ "seq": seq })],
        )
        .await
        .expect("outbox_publish")
        .get(0)
}

async fn completed(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM public.outbox WHERE status = 'COMPLETED'",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// Reads the relay's topic until every id of `expected` is there.
async fn read_back(brokers: String, expected: Vec<Uuid>) -> Vec<Record> {
    tokio::task::spawn_blocking(move || {
        let want: HashSet<String> = expected.iter().map(Uuid::to_string).collect();
        read_topics_from(
            &brokers,
            &["ctr_order.created".to_owned()],
            Duration::from_secs(120),
            None,
            |records| {
                let seen: HashSet<&str> = records.iter().map(|r| r.header("tracking_id")).collect();
                want.iter().all(|id| seen.contains(id.as_str()))
            },
        )
    })
    .await
    .expect("reader thread")
}

/// How a user first meets the image: it runs as a non-root user, answers
/// `--version` and `--help` on a read-only root filesystem, carries the
/// system trust store, and (in the relay test below) serves its metrics
/// and health port and stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_as_a_non_root_user_on_a_read_only_root() {
    if skip_reason().is_some() {
        return;
    }
    let (code, out, err) = pgoutbox_once(&["--version"], &[], vec![]).await;
    assert_eq!(code, 0, "pgoutbox --version in the image failed: {err}");
    assert!(
        out.starts_with("pgoutbox ") && out.contains('('),
        "--version printed {out:?}"
    );
    let (code, out, err) = pgoutbox_once(&["--help"], &[], vec![]).await;
    assert_eq!(code, 0, "pgoutbox --help in the image failed: {err}");
    for command in ["run", "migrate", "status"] {
        assert!(
            out.contains(command),
            "--help does not list `{command}`: {out}"
        );
    }

    // Who the image runs as, and its trust store, seen from inside.
    let c = pgoutbox_image()
        .with_entrypoint("bash")
        .with_wait_for(WaitFor::exit(
            testcontainers::core::wait::ExitWaitStrategy::new(),
        ))
        .with_cmd([
            "-c",
            "id -u; id -g; wc -c < /etc/ssl/certs/ca-certificates.crt; \
             grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt; \
             touch /tmp/x 2>/dev/null && echo writable || echo read-only",
        ])
        .with_network("host")
        .with_readonly_rootfs(true)
        .start()
        .await
        .expect("run bash in the image");
    let out = String::from_utf8_lossy(&c.stdout_to_vec().await.unwrap()).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        5,
        "unexpected output {out:?} (stderr {:?})",
        String::from_utf8_lossy(&c.stderr_to_vec().await.unwrap())
    );
    assert_eq!(lines[0], "10001", "the image's default user is not 10001");
    assert_eq!(lines[1], "10001", "the image's default group is not 10001");
    let bundle_bytes: u64 = lines[2].trim().parse().unwrap();
    let anchors: u64 = lines[3].trim().parse().unwrap();
    assert!(
        bundle_bytes > 100_000 && anchors > 100,
        "the trust store has {anchors} certificates ({bundle_bytes} bytes): ca-certificates missing?"
    );
    assert_eq!(lines[4], "read-only", "the root filesystem was writable");
}

struct Tls {
    dir: PathBuf,
    ca: PathBuf,
    server_cert: String,
    server_key: String,
}

/// A CA, and a server certificate for localhost/127.0.0.1 it signed.
fn tls() -> Tls {
    let ca = new_ca("pgoutbox container test CA");
    let (server_cert, server_key) = server_certificate(&ca, "pgoutbox container test server");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("containers-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    // Run by the PostgreSQL image's entrypoint (as postgres) on the first
    // start: the server's certificate and key from the environment.
    std::fs::write(
        dir.join("tls.sh"),
        "printf '%s\\n' \"$TEST_SERVER_CERT\" > \"$PGDATA/server.crt\"\n\
         printf '%s\\n' \"$TEST_SERVER_KEY\" > \"$PGDATA/server.key\"\n\
         chmod 600 \"$PGDATA/server.key\"\n\
         printf 'ssl = on\\n' >> \"$PGDATA/postgresql.conf\"\n",
    )
    .unwrap();
    Tls {
        dir,
        ca: ca_path,
        server_cert,
        server_key,
    }
}

/// The relay container connects with `sslmode=verify-full` through the
/// image's system trust store (the test CA mounted as the bundle; without
/// it the same connection is refused), delivers, serves /healthz, /readyz
/// and /metrics on its port, and stops on SIGTERM with exit 0 well within
/// the shutdown timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_relays_over_verify_full_and_stops_cleanly_on_sigterm() {
    if skip_reason().is_some() {
        return;
    }
    let tls = tls();
    let pg_port = free_port();
    let kafka_port = free_port();
    let pg_env = [
        ("TEST_SERVER_CERT", tls.server_cert.clone()),
        ("TEST_SERVER_KEY", tls.server_key.clone()),
    ];
    let pg_init = [(tls.dir.join("tls.sh"), "tls.sh")];
    let (_pg, _kafka) = tokio::join!(
        start_postgres(pg_port, &[], &pg_env, &pg_init),
        start_kafka(kafka_port)
    );
    let url = format!(
        "postgres://{PG_USER}:{PG_PASSWORD}@localhost:{pg_port}/pgoutbox?sslmode=verify-full"
    );
    let env = vec![
        ("DATABASE_URL", url.clone()),
        ("KAFKA_BROKERS", format!("127.0.0.1:{kafka_port}")),
    ];
    let trust = || {
        vec![Mount::bind_mount(
            tls.ca.display().to_string(),
            "/etc/ssl/certs/ca-certificates.crt",
        )
        .with_access_mode(AccessMode::ReadOnly)]
    };

    // The image's own store does not know the test CA: verify-full refuses.
    let (code, out, err) = pgoutbox_once(&["migrate"], &env, vec![]).await;
    assert_ne!(
        code, 0,
        "verify-full accepted a certificate of a CA the trust store lacks: {out}{err}"
    );
    assert!(
        err.to_lowercase().contains("certificate"),
        "the refusal does not say it is about the certificate: {err}"
    );
    // With the CA as the system bundle, it connects.
    let (code, out, err) = pgoutbox_once(&["migrate"], &env, trust()).await;
    assert_eq!(
        code, 0,
        "pgoutbox migrate over verify-full failed: {out}{err}"
    );

    let metrics_port = free_port();
    let relay = start_relay(&env, metrics_port, trust()).await;
    let client = connect(pg_port).await.expect("connect to the container");
    let ids = {
        let mut ids = Vec::new();
        for seq in 0..50 {
            ids.push(publish(&client, Uuid::from_u128(7), seq).await);
        }
        ids
    };
    let records = read_back(format!("127.0.0.1:{kafka_port}"), ids.clone()).await;
    assert_eq!(missing(&ids, &delivery_counts(&records)), 0);
    let ssl_in_use: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND usename = $1 AND backend_type = 'walsender'",
            &[&PG_USER],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        ssl_in_use >= 1,
        "the relay's replication connection is not encrypted"
    );

    let addr = format!("127.0.0.1:{metrics_port}");
    let (status, _) = wait_for("/readyz to answer 200", Duration::from_secs(30), || {
        let addr = addr.clone();
        async move {
            match http_get(&addr, "/readyz").await {
                Ok((200, body)) => Some((200, body)),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(status, 200);
    let (status, metrics) = http_get(&addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("pgoutbox_events_delivered_total")
            || metrics.contains("pgoutbox_events_published_total"),
        "/metrics lacks the delivery counter: {}",
        &metrics[..metrics.len().min(2000)]
    );

    // SIGTERM (docker stop), 30 s before SIGKILL: the relay's own shutdown
    // timeout is 30 s; it must exit 0 on its own, well before.
    let t0 = Instant::now();
    relay
        .stop_with_timeout(Some(30))
        .await
        .expect("docker stop");
    let took = t0.elapsed();
    let code = relay.exit_code().await.unwrap();
    assert_eq!(
        code,
        Some(0),
        "the relay did not exit 0 on SIGTERM (after {took:?}); log:\n{}",
        logs(&relay).await
    );
    assert!(
        took < Duration::from_secs(25),
        "SIGTERM took {took:?}, close to the 30 s after which docker kills"
    );
    eprintln!("relay container stopped on SIGTERM in {took:?}");
    let _ = std::fs::remove_dir_all(&tls.dir);
}

/// Events published while the relay container is stopped (SIGTERM) and
/// started again, then killed and started again, all reach Kafka: none
/// lost, none unknown, per-aggregate order kept; the clean restart
/// resends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_relay_container_restarts_in_order() {
    if skip_reason().is_some() {
        return;
    }
    let pg_port = free_port();
    let kafka_port = free_port();
    let (_pg, _kafka) = tokio::join!(
        start_postgres(pg_port, &[], &[], &[]),
        start_kafka(kafka_port)
    );
    let brokers = format!("127.0.0.1:{kafka_port}");
    let env = vec![
        (
            "DATABASE_URL",
            format!(
                "postgres://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{pg_port}/pgoutbox?sslmode=disable"
            ),
        ),
        ("KAFKA_BROKERS", brokers.clone()),
    ];
    let (code, out, err) = pgoutbox_once(&["migrate"], &env, vec![]).await;
    assert_eq!(code, 0, "pgoutbox migrate failed: {out}{err}");
    let relay = start_relay(&env, free_port(), vec![]).await;

    // A writer: 3,000 events over 20 aggregates, ~1 ms apart, each in its
    // own transaction; `seq` orders the events of one aggregate.
    const EVENTS: i64 = 3_000;
    let writer = tokio::spawn(async move {
        let client = connect(pg_port).await.expect("writer connects");
        let mut ids = Vec::new();
        for seq in 0..EVENTS {
            ids.push(publish(&client, Uuid::from_u128((seq % 20) as u128), seq).await);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        ids
    });
    let client = connect(pg_port).await.expect("connect");
    let progress = |at: i64| {
        let client = &client;
        async move {
            wait_for(
                &format!("{at} events marked COMPLETED"),
                Duration::from_secs(120),
                || async move { (completed(client).await >= at).then_some(()) },
            )
            .await
        }
    };

    // A clean restart mid-stream: SIGTERM, exit 0, start again.
    progress(EVENTS / 5).await;
    relay
        .stop_with_timeout(Some(30))
        .await
        .expect("docker stop");
    assert_eq!(
        relay.exit_code().await.unwrap(),
        Some(0),
        "the relay did not exit 0 on SIGTERM; log:\n{}",
        logs(&relay).await
    );
    let clean_until = completed(&client).await;
    relay.start().await.expect("docker start");

    // A kill mid-stream: SIGTERM then SIGKILL at once.
    progress((clean_until + EVENTS / 5).min(EVENTS)).await;
    relay
        .stop_with_timeout(Some(0))
        .await
        .expect("docker stop -t 0");
    relay.start().await.expect("docker start after the kill");

    let ids = writer.await.expect("writer");
    let records = read_back(brokers, ids.clone()).await;
    let counts = delivery_counts(&records);
    let expected: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
    let unknown = counts.keys().filter(|id| !expected.contains(*id)).count();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    let lost = missing(&ids, &counts);
    let reordered = reorders(&records);
    eprintln!(
        "containers ledger: {} published, {} records, {lost} missing, {duplicates} duplicates, \
         {reordered} reordered, {unknown} unknown",
        ids.len(),
        records.len()
    );
    assert_eq!(lost, 0, "events lost across relay container restarts");
    assert_eq!(unknown, 0, "records of events nobody published");
    assert_eq!(reordered, 0, "per-aggregate order broken");
    // Everything up to the clean stop was delivered exactly once.
    let before_clean: HashMap<&str, usize> = records
        .iter()
        .filter(|r| {
            serde_json::from_str::<serde_json::Value>(&r.value).unwrap_or_default()["seq"]
                .as_i64()
                .is_some_and(|s| s < EVENTS / 5)
        })
        .fold(HashMap::new(), |mut m, r| {
            *m.entry(r.header("tracking_id")).or_default() += 1;
            m
        });
    let resent = before_clean.values().filter(|n| **n > 1).count();
    assert_eq!(
        resent, 0,
        "a clean restart resent {resent} delivered events"
    );
}

/// The Compose command (`PGOUTBOX_COMPOSE`, else `docker compose`), or why
/// there is none.
fn compose_command() -> Result<Vec<String>, String> {
    let words: Vec<String> = std::env::var("PGOUTBOX_COMPOSE")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .unwrap_or_else(|| "docker compose".to_owned())
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let ok = std::process::Command::new(&words[0])
        .args(&words[1..])
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(words)
    } else {
        Err(format!(
            "`{} version` failed: no Docker Compose (scripts/docker up builds one)",
            words.join(" ")
        ))
    }
}

/// A Compose project of docker-compose.yml with the host-network override;
/// `down -v` when dropped.
struct ComposeStack {
    command: Vec<String>,
    project: String,
    env: Vec<(String, String)>,
}

impl ComposeStack {
    fn run(&self, args: &[&str]) -> std::process::Output {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut cmd = std::process::Command::new(&self.command[0]);
        cmd.args(&self.command[1..])
            .current_dir(root)
            .args(["-p", &self.project, "-f", "docker-compose.yml"])
            .args(["-f", "scripts/images/compose-host-network.yml"])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.output().expect("run docker compose")
    }
}

impl Drop for ComposeStack {
    fn drop(&mut self) {
        let out = self.run(&["down", "-v", "--timeout", "20"]);
        if !out.status.success() {
            eprintln!(
                "compose down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// docker-compose.yml's relay path — PostgreSQL, Kafka, the one-shot
/// migrate, the relay and its standby — comes up from the locally built
/// images; the relay is ready and the standby healthy but not ready, a
/// published event reaches Kafka, and when the relay stops the standby
/// takes over and delivers the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_stack_relays_with_a_standby() {
    if skip_reason().is_some() {
        return;
    }
    let command = match compose_command() {
        Ok(c) => c,
        Err(reason) => {
            assert!(
                std::env::var("PGOUTBOX_TEST_REQUIRE_DOCKER").as_deref() != Ok("1"),
                "PGOUTBOX_TEST_REQUIRE_DOCKER=1 but {reason}"
            );
            skipped(&reason);
            return;
        }
    };
    let pg_port = free_port();
    let kafka_port = free_port();
    let metrics = free_port();
    let standby_metrics = free_port();
    let stack = ComposeStack {
        command,
        project: format!("pgoutbox-test-{}", std::process::id()),
        env: vec![
            ("PGOUTBOX_PG_PORT".into(), pg_port.to_string()),
            ("PGOUTBOX_KAFKA_PORT".into(), kafka_port.to_string()),
            (
                "PGOUTBOX_KAFKA_CONTROLLER_PORT".into(),
                free_port().to_string(),
            ),
            ("PGOUTBOX_METRICS_PORT".into(), metrics.to_string()),
            (
                "PGOUTBOX_STANDBY_METRICS_PORT".into(),
                standby_metrics.to_string(),
            ),
        ],
    };
    let t0 = Instant::now();
    let out = stack.run(&[
        "up",
        "-d",
        "--no-build",
        "--wait",
        "--wait-timeout",
        "240",
        "postgres",
        "kafka",
        "migrate",
        "relay",
        "relay-standby",
    ]);
    assert!(
        out.status.success(),
        "docker compose up failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&stack.run(&["logs", "--tail", "30"]).stdout)
    );
    eprintln!("compose relay path up in {:?}", t0.elapsed());

    let active = format!("127.0.0.1:{metrics}");
    let standby = format!("127.0.0.1:{standby_metrics}");
    let ready = |addr: String| async move { http_get(&addr, "/readyz").await.map(|(s, _)| s).ok() };
    wait_for("the relay to be ready", Duration::from_secs(60), || {
        let addr = active.clone();
        async move { (ready(addr).await == Some(200)).then_some(()) }
    })
    .await;
    let (status, _) = http_get(&standby, "/healthz")
        .await
        .expect("standby /healthz");
    assert_eq!(status, 200, "the standby relay is not alive");
    assert_eq!(
        ready(standby.clone()).await,
        Some(503),
        "the standby relay says it is ready while the relay serves"
    );

    // docker-compose.yml's superuser password.
    let client = connect_as(pg_port, "pgoutbox")
        .await
        .expect("connect to compose's PostgreSQL");
    let brokers = format!("127.0.0.1:{kafka_port}");
    let first = publish(&client, Uuid::from_u128(1), 0).await;
    let records = read_back(brokers.clone(), vec![first]).await;
    assert_eq!(missing(&[first], &delivery_counts(&records)), 0);

    // The relay stops: the standby takes over and delivers.
    let out = stack.run(&["stop", "relay"]);
    assert!(out.status.success(), "compose stop relay failed");
    wait_for("the standby to take over", Duration::from_secs(60), || {
        let addr = standby.clone();
        async move { (ready(addr).await == Some(200)).then_some(()) }
    })
    .await;
    let second = publish(&client, Uuid::from_u128(1), 1).await;
    let records = read_back(brokers, vec![first, second]).await;
    let counts = delivery_counts(&records);
    assert_eq!(missing(&[first, second], &counts), 0);
    assert_eq!(reorders(&records), 0);
}
