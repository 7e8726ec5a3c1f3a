//! Kafka over SASL_SSL with SCRAM, against the local broker's SASL_SSL
//! listener (`scripts/services`: a test CA, a broker certificate, the SCRAM
//! user `pgoutbox`). The relay is configured through `kafka.properties` only
//! (plus `kafka.sasl_password_file`); what it delivers is read back through
//! the same listener by a consumer configured the same way. Wrong
//! credentials and an unknown CA must be clear failures: an error that names
//! the problem, nothing marked COMPLETED, and no secret in the relay's log.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::harness::{wait_for, Relay, TestOutbox};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(90);

/// The broker's SASL_SSL listener, as `scripts/services env` describes it.
#[derive(Clone, Debug)]
struct SaslSsl {
    brokers: String,
    ca_file: String,
    user: String,
    password: String,
}

/// Reads the SASL_SSL listener from `scripts/services env` (with external
/// services, the PGOUTBOX_KAFKA_* variables given to it).
fn sasl_ssl() -> SaslSsl {
    // Starts the local services when DATABASE_URL / KAFKA_BROKERS are unset.
    let _ = common::services();
    let env = common::ServicesEnv::read();
    let get = |key: &str| {
        env.get(key).unwrap_or_else(|| {
            panic!(
                "scripts/services env printed no {key}: run `scripts/services up` (it makes the \
                 broker's SASL_SSL listener), or with external services set \
                 PGOUTBOX_KAFKA_SASL_SSL_BROKERS, PGOUTBOX_KAFKA_CA_FILE, \
                 PGOUTBOX_KAFKA_SASL_USER and PGOUTBOX_KAFKA_SASL_PASSWORD"
            )
        })
    };
    SaslSsl {
        brokers: get("PGOUTBOX_KAFKA_SASL_SSL_BROKERS"),
        ca_file: get("PGOUTBOX_KAFKA_CA_FILE"),
        user: get("PGOUTBOX_KAFKA_SASL_USER"),
        password: get("PGOUTBOX_KAFKA_SASL_PASSWORD"),
    }
}

/// The relay's `[kafka.properties]` for SASL_SSL with `mechanism`; the
/// password line only when `password` is given.
fn relay_properties(s: &SaslSsl, mechanism: &str, password: Option<&str>, ca: &str) -> String {
    let mut toml = format!(
        "[kafka.properties]\n\
         \"security.protocol\" = \"SASL_SSL\"\n\
         \"sasl.mechanisms\" = \"{mechanism}\"\n\
         \"sasl.username\" = \"{}\"\n\
         \"ssl.ca.location\" = \"{ca}\"\n",
        s.user
    );
    if let Some(p) = password {
        toml.push_str(&format!("\"sasl.password\" = \"{p}\"\n"));
    }
    toml
}

/// An outbox whose relay talks to the SASL_SSL listener only.
async fn outbox(name: &str, s: &SaslSsl, config: String) -> TestOutbox {
    let mut outbox = TestOutbox::new(name).await;
    outbox.extra_config = config;
    outbox.env.push(("KAFKA_BROKERS".into(), s.brokers.clone()));
    outbox
}

async fn publish(outbox: &TestOutbox, n: usize) -> (Vec<Uuid>, HashMap<Uuid, Uuid>) {
    let mut ids = Vec::new();
    let mut keys = HashMap::new();
    for i in 0..n {
        let aggregate = Uuid::new_v4();
        let id = outbox
            .publish("Order", aggregate, "OrderCreated", &json!({ "seq": i }))
            .await;
        ids.push(id);
        keys.insert(id, aggregate);
    }
    (ids, keys)
}

/// A record read back: tracking id header and key.
struct Got {
    tracking_id: String,
    key: String,
}

/// Reads `topic` from the beginning through the SASL_SSL listener, with a
/// consumer configured as the relay is, until every id in `expected` was
/// seen; panics after `timeout`.
fn read_back(
    s: &SaslSsl,
    mechanism: &str,
    topic: &str,
    expected: &[Uuid],
    timeout: Duration,
) -> Vec<Got> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.brokers)
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanisms", mechanism)
        .set("sasl.username", &s.user)
        .set("sasl.password", &s.password)
        .set("ssl.ca.location", &s.ca_file)
        .set("group.id", "pgoutbox-tests-security")
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("create SASL_SSL consumer");
    let want: HashSet<String> = expected.iter().map(Uuid::to_string).collect();
    let deadline = Instant::now() + timeout;
    let mut assigned = 0;
    let mut got: Vec<Got> = Vec::new();
    loop {
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            let partitions: Vec<i32> = md
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.len() > assigned {
                let mut tpl = TopicPartitionList::new();
                for p in &partitions {
                    tpl.add_partition_offset(topic, *p, Offset::Beginning)
                        .expect("add partition");
                }
                consumer.assign(&tpl).expect("assign");
                assigned = partitions.len();
                got.clear();
            }
        }
        let poll_until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < poll_until {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let tracking_id = m
                        .headers()
                        .and_then(|h| {
                            h.iter()
                                .find(|hd| hd.key == "tracking_id")
                                .and_then(|hd| hd.value)
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                        })
                        .unwrap_or_default();
                    got.push(Got {
                        tracking_id,
                        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    });
                }
                Some(Err(e)) => eprintln!("consumer error: {e}"),
                None => {}
            }
        }
        let seen: HashSet<&str> = got.iter().map(|g| g.tracking_id.as_str()).collect();
        if want.iter().all(|w| seen.contains(w.as_str())) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} reading {topic} over SASL_SSL: {} of {} events",
            want.iter().filter(|w| seen.contains(w.as_str())).count(),
            want.len()
        );
    }
}

/// The relay delivers `n` events over SASL_SSL with `mechanism`, they read
/// back through the same listener with their keys, and every row ends
/// COMPLETED; the relay then stops cleanly. Returns its log.
async fn delivers(outbox: &TestOutbox, s: &SaslSsl, mechanism: &str, n: usize) -> String {
    // Some events before the relay starts (backfill), some while it streams.
    let (mut ids, mut keys) = publish(outbox, n / 2).await;
    let relay = outbox.start_relay();
    let (more, more_keys) = publish(outbox, n - n / 2).await;
    ids.extend(more);
    keys.extend(more_keys);
    let topic = outbox.topic("Order");
    let (s2, m2, ids2) = (s.clone(), mechanism.to_owned(), ids.clone());
    let got = tokio::task::spawn_blocking(move || read_back(&s2, &m2, &topic, &ids2, DEADLINE))
        .await
        .expect("consumer task");
    for id in &ids {
        let g = got
            .iter()
            .find(|g| g.tracking_id == id.to_string())
            .expect("read back");
        assert_eq!(g.key, keys[id].to_string(), "key of {id}");
    }
    wait_for("every row COMPLETED", DEADLINE, || async {
        (outbox.statuses().await.get("COMPLETED").copied() == Some(n as i64)).then_some(())
    })
    .await;
    let log = relay.log_text();
    let status = relay.terminate();
    assert!(status.success(), "relay exit {status:?}:\n{log}");
    log
}

fn assert_no_secret(log: &str, secret: &str) {
    assert!(
        !log.contains(secret),
        "the relay's log contains the password:\n{log}"
    );
}

/// Waits until the relay's log says `what` (every one of `needles`),
/// failing early if the relay exits.
async fn log_says(relay: &mut Relay, what: &str, needles: &[&str]) -> String {
    wait_for(what, DEADLINE, || {
        let log = relay.log_text();
        let running = relay.running();
        async move {
            if needles.iter().all(|n| log.contains(n)) {
                return Some(log);
            }
            assert!(running, "the relay exited before saying {what}:\n{log}");
            None
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scram_sha_256_over_sasl_ssl_delivers_and_reads_back() {
    let s = sasl_ssl();
    let config = relay_properties(&s, "SCRAM-SHA-256", Some(&s.password), &s.ca_file);
    let outbox = outbox("ksec_scram256", &s, config).await;
    let log = delivers(&outbox, &s, "SCRAM-SHA-256", 10).await;
    assert_no_secret(&log, &s.password);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scram_sha_512_with_the_password_in_a_file() {
    let s = sasl_ssl();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let file = dir.join("ksec_scram512.password");
    std::fs::write(&file, format!("{}\n", s.password)).expect("write password file");
    let mut config = format!("[kafka]\nsasl_password_file = \"{}\"\n\n", file.display());
    config.push_str(&relay_properties(&s, "SCRAM-SHA-512", None, &s.ca_file));
    let outbox = outbox("ksec_scram512", &s, config).await;
    let log = delivers(&outbox, &s, "SCRAM-SHA-512", 6).await;
    assert_no_secret(&log, &s.password);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_password_is_a_clear_failure_without_the_password_in_the_log() {
    let s = sasl_ssl();
    let wrong = format!("wrong-{}", Uuid::new_v4().simple());
    let mut config = relay_properties(&s, "SCRAM-SHA-256", Some(&wrong), &s.ca_file);
    // librdkafka's own debug output of the configuration, the connection and
    // the SASL exchange, too.
    config.push_str("\"debug\" = \"conf,security,broker\"\n");
    let mut outbox = outbox("ksec_wrongpw", &s, config).await;
    // Everything pgoutbox and rdkafka log, debug included.
    outbox.env.push(("RUST_LOG".into(), "debug".into()));
    publish(&outbox, 3).await;
    let mut relay = outbox.start_relay();
    let log = log_says(
        &mut relay,
        "an authentication error",
        &[
            "kafka authentication failed",
            "Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-256",
        ],
    )
    .await;
    let statuses = outbox.statuses().await;
    assert_eq!(statuses.get("COMPLETED"), None, "{statuses:?}\n{log}");
    assert_eq!(statuses.get("PENDING"), Some(&3), "{statuses:?}");
    let path = relay.log.clone();
    relay.kill();
    // The whole log, up to the kill.
    let log = std::fs::read_to_string(&path).unwrap_or(log);
    assert_no_secret(&log, &wrong);
    assert_no_secret(&log, &s.password);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_ca_is_a_clear_certificate_verification_error() {
    let s = sasl_ssl();
    // A CA of its own, which did not sign the broker's certificate.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ksec_other_ca");
    std::fs::create_dir_all(&dir).expect("create CA dir");
    let (key, cert) = (dir.join("ca.key"), dir.join("ca.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=pgoutbox other test CA", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = relay_properties(
        &s,
        "SCRAM-SHA-256",
        Some(&s.password),
        cert.to_str().expect("utf-8 path"),
    );
    let outbox = outbox("ksec_unknownca", &s, config).await;
    publish(&outbox, 2).await;
    let mut relay = outbox.start_relay();
    let log = log_says(
        &mut relay,
        "a certificate verification error",
        &["kafka TLS connection failed", "certificate verify failed"],
    )
    .await;
    let statuses = outbox.statuses().await;
    assert_eq!(statuses.get("COMPLETED"), None, "{statuses:?}\n{log}");
    relay.kill();
    assert_no_secret(&log, &s.password);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_password_file_stops_the_relay_with_an_error_naming_it() {
    let s = sasl_ssl();
    let missing = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ksec_no_such.password");
    let _ = std::fs::remove_file(&missing);
    let mut config = format!(
        "[kafka]\nsasl_password_file = \"{}\"\n\n",
        missing.display()
    );
    config.push_str(&relay_properties(&s, "SCRAM-SHA-256", None, &s.ca_file));
    let outbox = outbox("ksec_nopwfile", &s, config).await;
    let relay = outbox.start_relay();
    let (status, log) = relay.wait_exit(DEADLINE);
    assert!(!status.success(), "the relay must fail:\n{log}");
    assert!(
        log.contains("kafka.sasl_password_file: cannot read"),
        "the error names the setting:\n{log}"
    );
}
