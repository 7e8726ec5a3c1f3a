//! The metrics and health endpoint of real relays (issue 7): every metric of
//! the contract a mode sets is served with plausible values after a load,
//! `/readyz` follows Kafka, PostgreSQL and the serving lock, and the slot
//! retention warning fires (metric and one log line) when the slot retains
//! more WAL than allowed.
//!
//! Some tests stop Kafka or PostgreSQL: run this binary against services of
//! its own, never the ones other people's tests use:
//!
//! ```text
//! export PGOUTBOX_SERVICES_DIR=$PWD/target/services-metrics
//! scripts/services up; set -a; eval "$(scripts/services env)"; set +a
//! RUST_TEST_THREADS=2 cargo test --test metrics
//! ```
//!
//! Within the binary those tests take [`SERVICES`] exclusively; the others
//! share it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::control::{services, KafkaBack};
use common::harness::{
    free_addr, http_get, read_until_all, read_until_all_as, secrets, wait_for, Isolation, Relay,
    TestOutbox,
};
use serde_json::json;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);

/// Held exclusively by tests that stop a service, shared by the others.
static SERVICES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The contract's metrics (`/tmp/issue7/metrics-contract.md`): name, set in
/// CDC, set in poll mode. Histograms are checked by their `_count`.
const CONTRACT: &[(&str, bool, bool)] = &[
    ("pgoutbox_build_info", true, true),
    ("pgoutbox_mode", true, true),
    ("pgoutbox_ready", true, true),
    ("pgoutbox_standby", true, true),
    ("pgoutbox_events_read_total", true, true),
    ("pgoutbox_events_published_total", true, true),
    ("pgoutbox_events_failed_total", true, true),
    ("pgoutbox_events_dead_lettered_total", true, true),
    ("pgoutbox_kafka_in_flight_events", true, true),
    ("pgoutbox_kafka_ack_latency_seconds_count", true, true),
    ("pgoutbox_event_latency_seconds_count", true, false),
    ("pgoutbox_event_latency_seconds_count", true, false),
    ("pgoutbox_batch_size_count", true, true),
    ("pgoutbox_received_lsn", true, false),
    ("pgoutbox_flushed_lsn", true, false),
    ("pgoutbox_server_lsn", true, false),
    ("pgoutbox_replication_lag_bytes", true, false),
    ("pgoutbox_slot_retained_wal_bytes", true, false),
    ("pgoutbox_slot_wal_status", true, false),
    ("pgoutbox_slot_safe_wal_size_bytes", true, false),
    ("pgoutbox_slot_retention_warning", true, false),
    ("pgoutbox_outbox_rows", true, true),
    ("pgoutbox_outbox_oldest_pending_age_seconds", true, true),
    ("pgoutbox_poll_claims_total", false, true),
    ("pgoutbox_poll_stale_completions_total", false, true),
    ("pgoutbox_poll_reaped_total", false, true),
    ("pgoutbox_poll_leases_lost_total", false, true),
    ("pgoutbox_reconnects_total", true, true),
    ("pgoutbox_sample_errors_total", true, true),
    ("pgoutbox_messages_ignored_total", true, false),
    ("pgoutbox_health_level", true, true),
    ("pgoutbox_health_check_level", true, true),
    ("pgoutbox_outbox_dead_letters_recent", true, true),
];

/// One sample line of the text format.
#[derive(Clone, Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (what this relay writes of it).
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                let mut chars = rest.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                    assert_eq!(chars.next(), Some('"'), "{line}");
                    let mut v = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => match chars.next() {
                                Some('n') => v.push('\n'),
                                Some(o) => v.push(o),
                                None => {}
                            },
                            '"' => break,
                            c => v.push(c),
                        }
                    }
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                    labels.insert(key.trim().to_owned(), v);
                }
                (name.to_owned(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The samples of `name` whose labels include `with`.
fn select<'a>(samples: &'a [Sample], name: &str, with: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The sum of the matching samples (`None` when there are none).
fn value(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Option<f64> {
    let found = select(samples, name, with);
    (!found.is_empty()).then(|| found.iter().map(|s| s.value).sum())
}

/// A relay with its own metrics endpoint.
struct Observed {
    relay: Relay,
    addr: String,
}

impl Observed {
    /// Starts `pgoutbox run [args]` for `outbox`, listening on a free port.
    fn start(outbox: &TestOutbox, args: &[&str], label: &str) -> Observed {
        let addr = free_addr();
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        let mut cmd = outbox.command_with_args(&all);
        cmd.env("OUTBOX_METRICS_LISTEN", &addr);
        let relay = Relay::spawn(cmd, &format!("{}-{label}", outbox.name));
        Observed { relay, addr }
    }

    async fn metrics(&self) -> Option<Vec<Sample>> {
        match http_get(&self.addr, "/metrics").await {
            Ok((200, body)) => Some(parse(&body)),
            _ => None,
        }
    }

    /// Waits until `check` holds for a scrape; returns that scrape.
    async fn wait_metrics(
        &self,
        what: &str,
        check: impl Fn(&[Sample]) -> bool,
        timeout: Duration,
    ) -> Vec<Sample> {
        let text = format!("{what} (relay log: {})", self.relay.log.display());
        wait_for(&text, timeout, || async {
            let m = self.metrics().await?;
            check(&m).then_some(m)
        })
        .await
    }

    /// Waits until `/readyz` answers `status`; returns the body.
    async fn wait_ready(&self, status: u16, timeout: Duration) -> String {
        let what = format!(
            "/readyz {status} from {} (relay log: {})",
            self.addr,
            self.relay.log.display()
        );
        wait_for(&what, timeout, || async {
            match http_get(&self.addr, "/readyz").await {
                Ok((s, body)) if s == status => Some(body),
                _ => None,
            }
        })
        .await
    }
}

/// The test's config: samples every second, a small message limit (so
/// that one event is dead-lettered), quick reconnects.
fn observed_config() -> String {
    observed_config_with("")
}

/// [`observed_config`] with more `[metrics]` lines.
fn observed_config_with(metrics: &str) -> String {
    format!(
        "[metrics]\nsample_interval_s = 1\n{metrics}\n[kafka]\nmessage_max_bytes = 1000\n\n\
         [cdc]\nmax_backoff_ms = 2000\n\n[outbox]\npoll_interval_ms = 100\n"
    )
}

/// Publishes `n` events over two aggregate types, then one too large to
/// publish; returns the deliverable ones' tracking ids and the dead one's.
async fn load(outbox: &TestOutbox, n: usize) -> (Vec<Uuid>, Uuid) {
    let mut ids = Vec::new();
    for i in 0..n {
        let kind = if i % 2 == 0 { "Order" } else { "Invoice" };
        ids.push(
            outbox
                .publish(kind, Uuid::new_v4(), "Placed", &json!({"i": i}))
                .await,
        );
    }
    let big = outbox
        .publish(
            "Order",
            Uuid::new_v4(),
            "Huge",
            &json!({"blob": "x".repeat(2000)}),
        )
        .await;
    (ids, big)
}

/// Checks that every contract metric that applies is served, and that no
/// label value holds a tracking id or a password.
fn check_contract_and_labels(m: &[Sample], cdc: bool, tracking_ids: &[Uuid]) {
    for (name, in_cdc, in_poll) in CONTRACT {
        if (cdc && *in_cdc) || (!cdc && *in_poll) {
            assert!(
                m.iter().any(|s| s.name == *name),
                "{name} is missing from /metrics"
            );
        }
    }
    let mut values = BTreeSet::new();
    for s in m.iter().filter(|s| s.name.starts_with("pgoutbox_")) {
        values.extend(s.labels.values().cloned());
    }
    let ids: Vec<String> = tracking_ids.iter().map(Uuid::to_string).collect();
    for v in &values {
        for id in &ids {
            assert!(!v.contains(id.as_str()), "a tracking id in a label: {v}");
        }
        for secret in secrets() {
            assert!(!v.contains(&secret), "a password in a label value");
        }
    }
}

fn one(m: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    value(m, name, with).unwrap_or_else(|| panic!("no {name} {with:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cdc_relay_serves_every_cdc_metric_with_plausible_values() {
    let _shared = SERVICES.read().await;
    let mut outbox = TestOutbox::new("metrics_cdc").await;
    outbox.extra_config = observed_config();
    let relay = Observed::start(&outbox, &[], "cdc");
    let body = relay.wait_ready(200, DEADLINE).await;
    assert_eq!(body, "ready\n");
    let (healthz, _) = http_get(&relay.addr, "/healthz").await.unwrap();
    assert_eq!(healthz, 200);

    const N: usize = 20;
    let loaded = std::time::Instant::now();
    let (ids, big) = load(&outbox, N).await;
    let order = outbox.topic("Order");
    let invoice = outbox.topic("Invoice");
    read_until_all(vec![order.clone(), invoice.clone()], ids.clone(), DEADLINE).await;
    let wal_after: i64 = outbox
        .client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8", &[])
        .await
        .unwrap()
        .get(0);

    let m = relay
        .wait_metrics(
            "every event settled, confirmed and sampled",
            |m| {
                value(m, "pgoutbox_events_dead_lettered_total", &[("mode", "cdc")]) == Some(1.0)
                    && value(m, "pgoutbox_kafka_in_flight_events", &[]) == Some(0.0)
                    && value(m, "pgoutbox_flushed_lsn", &[]).unwrap_or(0.0) >= wal_after as f64
                    && value(m, "pgoutbox_outbox_rows", &[("status", "DEAD_LETTER")]) == Some(1.0)
                    && value(m, "pgoutbox_outbox_rows", &[("status", "PENDING")]) == Some(0.0)
            },
            DEADLINE,
        )
        .await;
    check_contract_and_labels(&m, true, &[ids.clone(), vec![big]].concat());

    // One dead letter in the window degrades the outbox (the default
    // `health.dead_letters` is 1 degraded, 100 unhealthy); nothing else does.
    let h = relay
        .wait_metrics(
            "the dead letter judged",
            |m| value(m, "pgoutbox_outbox_dead_letters_recent", &[]) == Some(1.0),
            DEADLINE,
        )
        .await;
    assert_eq!(one(&h, "pgoutbox_health_level", &[]), 1.0);
    assert_eq!(
        one(
            &h,
            "pgoutbox_health_check_level",
            &[("check", "dead_letters")]
        ),
        1.0
    );
    for check in ["oldest_pending", "slot_lag"] {
        assert_eq!(
            one(&h, "pgoutbox_health_check_level", &[("check", check)]),
            0.0,
            "{check}"
        );
    }
    let (code, body) = http_get(&relay.addr, "/health").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("degraded: 1 events dead-lettered in the last 3600 s"),
        "{body}"
    );

    let cdc = [("mode", "cdc")];
    assert_eq!(one(&m, "pgoutbox_events_read_total", &cdc), (N + 1) as f64);
    assert_eq!(
        one(&m, "pgoutbox_events_published_total", &cdc),
        N as f64,
        "published = events sent"
    );
    assert_eq!(
        one(
            &m,
            "pgoutbox_events_published_total",
            &[("mode", "cdc"), ("topic", &order)]
        ),
        (N / 2) as f64
    );
    assert_eq!(
        one(
            &m,
            "pgoutbox_events_dead_lettered_total",
            &[("mode", "cdc"), ("topic", &order)]
        ),
        1.0,
        "the oversized event, under its topic"
    );
    assert_eq!(one(&m, "pgoutbox_events_failed_total", &cdc), 0.0);
    let topics: BTreeSet<&str> = select(&m, "pgoutbox_events_published_total", &[])
        .iter()
        .map(|s| s.labels["topic"].as_str())
        .collect();
    assert_eq!(
        topics,
        BTreeSet::from([order.as_str(), invoice.as_str()]),
        "topic labels are the rendered topics"
    );
    assert_eq!(
        one(&m, "pgoutbox_kafka_ack_latency_seconds_count", &[]),
        N as f64
    );
    assert!(one(&m, "pgoutbox_kafka_ack_latency_seconds_sum", &[]) > 0.0);
    // Commit → sent and → read for every event decoded, commit →
    // acknowledged for every event published: each no longer than the test
    // has run (a commit time read with the wrong epoch would be decades),
    // and all but the sent stage (the same clock, maybe within its
    // microsecond) positive.
    let since_load = loaded.elapsed().as_secs_f64();
    let sent = [("stage", "sent")];
    assert_eq!(
        one(&m, "pgoutbox_event_latency_seconds_count", &sent),
        (N + 1) as f64
    );
    let sent_sum = one(&m, "pgoutbox_event_latency_seconds_sum", &sent);
    assert!(
        sent_sum <= (N + 1) as f64 * since_load,
        "sent: {sent_sum} s in {since_load} s"
    );
    for (stage, events) in [("read", N + 1), ("delivered", N)] {
        let s = [("stage", stage)];
        assert_eq!(
            one(&m, "pgoutbox_event_latency_seconds_count", &s),
            events as f64,
            "{stage}"
        );
        let sum = one(&m, "pgoutbox_event_latency_seconds_sum", &s);
        assert!(
            sum > 0.0 && sum <= events as f64 * since_load,
            "{stage}: {sum} s over {events} events in {since_load} s"
        );
    }
    assert!(
        one(
            &m,
            "pgoutbox_batch_size_count",
            &[("kind", "replication_read")]
        ) >= 1.0
    );
    assert!(
        one(&m, "pgoutbox_batch_size_sum", &[("kind", "status_update")]) >= (N + 1) as f64,
        "every row was marked by a status update"
    );
    let received = one(&m, "pgoutbox_received_lsn", &[]);
    let flushed = one(&m, "pgoutbox_flushed_lsn", &[]);
    let server = one(&m, "pgoutbox_server_lsn", &[]);
    let lag = one(&m, "pgoutbox_replication_lag_bytes", &[]);
    assert!(received > 0.0 && flushed > 0.0, "{received} {flushed}");
    assert!(server >= flushed, "server {server} < flushed {flushed}");
    assert!(lag >= 0.0 && lag <= server - flushed, "lag {lag}");
    let slot = outbox.slot();
    let s = [("slot", slot.as_str())];
    assert!(one(&m, "pgoutbox_slot_retained_wal_bytes", &s) >= 0.0);
    assert_eq!(
        one(&m, "pgoutbox_slot_wal_status", &s),
        1.0,
        "exactly one wal_status is current"
    );
    let safe = one(&m, "pgoutbox_slot_safe_wal_size_bytes", &s);
    assert!(safe == -1.0 || safe > 0.0, "{safe}");
    assert_eq!(one(&m, "pgoutbox_slot_retention_warning", &s), 0.0);
    assert_eq!(
        one(&m, "pgoutbox_outbox_rows", &[("status", "PROCESSING")]),
        0.0
    );
    assert_eq!(
        one(&m, "pgoutbox_outbox_oldest_pending_age_seconds", &[]),
        0.0
    );
    assert_eq!(one(&m, "pgoutbox_reconnects_total", &cdc), 0.0);
    assert_eq!(one(&m, "pgoutbox_sample_errors_total", &[]), 0.0);
    assert_eq!(one(&m, "pgoutbox_mode", &cdc), 1.0);
    assert_eq!(one(&m, "pgoutbox_mode", &[("mode", "poll")]), 0.0);
    assert_eq!(one(&m, "pgoutbox_ready", &[]), 1.0);
    assert_eq!(one(&m, "pgoutbox_standby", &[]), 0.0);
    assert_eq!(
        one(
            &m,
            "pgoutbox_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(relay.relay.terminate().success());
}

/// Exactly-once delivery: the Kafka transactions committed, the events
/// they held, their commit times and the committed position, and each
/// event's latency counted to its transaction's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exactly_once_relay_counts_its_transactions_and_each_events_latency_to_the_commit() {
    let _shared = SERVICES.read().await;
    let mut outbox = TestOutbox::new("metrics_eos").await;
    let progress = format!("{}.progress", outbox.topic_prefix);
    outbox.env.extend([
        ("OUTBOX_DELIVERY".to_owned(), "exactly-once".to_owned()),
        ("KAFKA_PROGRESS_TOPIC".to_owned(), progress),
    ]);
    outbox.extra_config = observed_config();
    let relay = Observed::start(&outbox, &[], "eos");
    relay.wait_ready(200, DEADLINE).await;

    const N: usize = 12;
    let loaded = std::time::Instant::now();
    let mut ids = Vec::new();
    for i in 0..N {
        ids.push(
            outbox
                .publish("Order", Uuid::new_v4(), "Placed", &json!({"i": i}))
                .await,
        );
    }
    let topics = vec![outbox.topic("Order")];
    read_until_all_as(topics, ids, DEADLINE, Some(Isolation::ReadCommitted)).await;
    let delivered = [("stage", "delivered")];
    let m = relay
        .wait_metrics(
            "every event's commit counted",
            |m| {
                value(m, "pgoutbox_event_latency_seconds_count", &delivered) == Some(N as f64)
                    && value(m, "pgoutbox_kafka_transaction_events_sum", &[]) == Some(N as f64)
            },
            DEADLINE,
        )
        .await;
    let committed = one(
        &m,
        "pgoutbox_kafka_transactions_total",
        &[("outcome", "committed")],
    );
    assert!(committed >= 1.0, "{committed}");
    assert_eq!(
        one(
            &m,
            "pgoutbox_kafka_transactions_total",
            &[("outcome", "aborted")]
        ),
        0.0
    );
    assert_eq!(
        one(&m, "pgoutbox_kafka_transaction_commit_seconds_count", &[]),
        committed,
        "one commit time per committed transaction"
    );
    assert!(one(&m, "pgoutbox_kafka_committed_position_lsn", &[]) > 0.0);
    // Every event read and committed once; each committed after it was
    // read, so the commit latencies add up to at least the read ones.
    let since_load = loaded.elapsed().as_secs_f64();
    let read = [("stage", "read")];
    assert_eq!(
        one(&m, "pgoutbox_event_latency_seconds_count", &read),
        N as f64
    );
    let sent = [("stage", "sent")];
    assert_eq!(
        one(&m, "pgoutbox_event_latency_seconds_count", &sent),
        N as f64
    );
    let sent_sum = one(&m, "pgoutbox_event_latency_seconds_sum", &sent);
    let read_sum = one(&m, "pgoutbox_event_latency_seconds_sum", &read);
    let delivered_sum = one(&m, "pgoutbox_event_latency_seconds_sum", &delivered);
    assert!(
        sent_sum <= read_sum
            && read_sum > 0.0
            && read_sum <= delivered_sum
            && delivered_sum <= N as f64 * since_load,
        "sent {sent_sum} s, read {read_sum} s, delivered {delivered_sum} s, {N} events in {since_load} s"
    );
    assert!(relay.relay.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poll_relay_serves_every_poll_metric_with_plausible_values() {
    let _shared = SERVICES.read().await;
    let mut outbox = TestOutbox::new("metrics_poll").await;
    // One dead letter makes this outbox unhealthy: /health answers 503.
    outbox.extra_config = format!(
        "{}\n[health]\ndead_letters = {{ degraded = 0, unhealthy = 1 }}\n",
        observed_config()
    );
    let relay = Observed::start(&outbox, &["--mode", "poll"], "poll");
    relay.wait_ready(200, DEADLINE).await;

    const N: usize = 20;
    let (ids, big) = load(&outbox, N).await;
    let order = outbox.topic("Order");
    let invoice = outbox.topic("Invoice");
    read_until_all(vec![order.clone(), invoice.clone()], ids.clone(), DEADLINE).await;
    let m = relay
        .wait_metrics(
            "every row settled and sampled",
            |m| {
                value(
                    m,
                    "pgoutbox_events_dead_lettered_total",
                    &[("mode", "poll")],
                ) == Some(1.0)
                    && value(m, "pgoutbox_events_published_total", &[("mode", "poll")])
                        == Some(N as f64)
                    && value(m, "pgoutbox_outbox_rows", &[("status", "DEAD_LETTER")]) == Some(1.0)
                    && value(m, "pgoutbox_outbox_rows", &[("status", "PENDING")]) == Some(0.0)
                    && value(m, "pgoutbox_outbox_rows", &[("status", "PROCESSING")]) == Some(0.0)
            },
            DEADLINE,
        )
        .await;
    check_contract_and_labels(&m, false, &[ids.clone(), vec![big]].concat());
    relay
        .wait_metrics(
            "the dead letter judged",
            |m| value(m, "pgoutbox_health_level", &[]) == Some(2.0),
            DEADLINE,
        )
        .await;
    let (code, body) = http_get(&relay.addr, "/health").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with("unhealthy: 1 events dead-lettered")
            && body.contains("(unhealthy from 1,"),
        "{body}"
    );

    let poll = [("mode", "poll")];
    assert_eq!(one(&m, "pgoutbox_events_read_total", &poll), (N + 1) as f64);
    assert_eq!(
        one(
            &m,
            "pgoutbox_events_published_total",
            &[("mode", "poll"), ("topic", &invoice)]
        ),
        (N / 2) as f64
    );
    assert_eq!(
        one(
            &m,
            "pgoutbox_events_dead_lettered_total",
            &[("mode", "poll"), ("topic", &order)]
        ),
        1.0
    );
    assert_eq!(one(&m, "pgoutbox_events_failed_total", &poll), 0.0);
    assert!(one(&m, "pgoutbox_poll_claims_total", &[]) >= 1.0);
    assert_eq!(
        one(&m, "pgoutbox_batch_size_sum", &[("kind", "claim")]),
        (N + 1) as f64,
        "every row claimed once"
    );
    assert_eq!(
        one(&m, "pgoutbox_batch_size_count", &[("kind", "claim")]),
        one(&m, "pgoutbox_poll_claims_total", &[])
    );
    assert_eq!(
        one(&m, "pgoutbox_kafka_ack_latency_seconds_count", &[]),
        N as f64
    );
    assert_eq!(one(&m, "pgoutbox_kafka_in_flight_events", &[]), 0.0);
    for name in [
        "pgoutbox_poll_stale_completions_total",
        "pgoutbox_poll_reaped_total",
        "pgoutbox_poll_leases_lost_total",
    ] {
        assert_eq!(one(&m, name, &[]), 0.0, "{name}");
    }
    assert!(
        select(&m, "pgoutbox_slot_retained_wal_bytes", &[]).is_empty(),
        "no slot, no slot series"
    );
    assert_eq!(
        one(&m, "pgoutbox_outbox_oldest_pending_age_seconds", &[]),
        0.0
    );
    assert_eq!(one(&m, "pgoutbox_reconnects_total", &poll), 0.0);
    assert_eq!(one(&m, "pgoutbox_sample_errors_total", &[]), 0.0);
    assert_eq!(one(&m, "pgoutbox_mode", &poll), 1.0);
    assert_eq!(one(&m, "pgoutbox_ready", &[]), 1.0);
    assert!(relay.relay.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unacknowledged_events_stay_pending_in_flight_and_age_while_kafka_never_answers() {
    let _shared = SERVICES.read().await;
    let mut outbox = TestOutbox::new("metrics_pending").await;
    outbox.extra_config = observed_config();
    // A broker address nobody listens on.
    outbox
        .env
        .push(("KAFKA_BROKERS".into(), "127.0.0.1:1".into()));
    let relay = Observed::start(&outbox, &[], "nowhere");
    // Streaming, but Kafka never answered: not ready, and the reason says so.
    let body = wait_for("/readyz to blame Kafka", DEADLINE, || async {
        match http_get(&relay.addr, "/readyz").await {
            Ok((503, b)) if b.starts_with("Kafka unreachable") => Some(b),
            _ => None,
        }
    })
    .await;
    assert!(body.starts_with("Kafka unreachable"), "{body}");
    for i in 0..3 {
        outbox
            .publish("Order", Uuid::new_v4(), "Placed", &json!({"i": i}))
            .await;
    }
    let m = relay
        .wait_metrics(
            "three rows sent, unacknowledged, pending and sampled",
            |m| {
                value(m, "pgoutbox_outbox_rows", &[("status", "PENDING")]) == Some(3.0)
                    && value(m, "pgoutbox_kafka_in_flight_events", &[]) == Some(3.0)
            },
            DEADLINE,
        )
        .await;
    let age = one(&m, "pgoutbox_outbox_oldest_pending_age_seconds", &[]);
    assert!(age > 0.0, "age {age}");
    assert_eq!(
        one(&m, "pgoutbox_events_read_total", &[("mode", "cdc")]),
        3.0
    );
    assert_eq!(
        value(&m, "pgoutbox_events_published_total", &[("mode", "cdc")]).unwrap_or(0.0),
        0.0
    );
    assert_eq!(one(&m, "pgoutbox_ready", &[]), 0.0);
    relay.relay.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_follows_kafka_going_away_and_coming_back() {
    let _exclusive = SERVICES.write().await;
    let mut outbox = TestOutbox::new("metrics_kafka").await;
    outbox.extra_config = observed_config();
    let cdc = Observed::start(&outbox, &[], "cdc");
    cdc.wait_ready(200, DEADLINE).await;
    // A poll relay on a table of its own.
    let mut other = TestOutbox::new("metrics_kafka_poll").await;
    other.extra_config = observed_config();
    let poll = Observed::start(&other, &["--mode", "poll"], "poll");
    poll.wait_ready(200, DEADLINE).await;

    services("kafka-stop", None);
    let back = KafkaBack;
    for relay in [&cdc, &poll] {
        let body = relay.wait_ready(503, Duration::from_secs(60)).await;
        assert!(body.starts_with("Kafka unreachable"), "{body}");
        let m = relay.metrics().await.expect("metrics while Kafka is down");
        assert_eq!(one(&m, "pgoutbox_ready", &[]), 0.0);
    }
    drop(back); // kafka-start
    for relay in [&cdc, &poll] {
        relay.wait_ready(200, DEADLINE).await;
    }
    // And it delivers again.
    let id = outbox
        .publish("Order", Uuid::new_v4(), "After", &json!({}))
        .await;
    read_until_all(vec![outbox.topic("Order")], vec![id], DEADLINE).await;
    assert!(cdc.relay.terminate().success());
    assert!(poll.relay.terminate().success());
}

/// Starts PostgreSQL again when dropped, even if the test panics.
struct PostgresBack;

impl Drop for PostgresBack {
    fn drop(&mut self) {
        services("pg-start", None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_follows_postgres_going_away_and_coming_back() {
    let _exclusive = SERVICES.write().await;
    let mut outbox = TestOutbox::new("metrics_pg").await;
    outbox.extra_config = observed_config();
    let cdc = Observed::start(&outbox, &[], "cdc");
    cdc.wait_ready(200, DEADLINE).await;
    let mut other = TestOutbox::new("metrics_pg_poll").await;
    other.extra_config = observed_config();
    let poll = Observed::start(&other, &["--mode", "poll"], "poll");
    poll.wait_ready(200, DEADLINE).await;

    services("pg-stop", None);
    let back = PostgresBack;
    let body = cdc.wait_ready(503, Duration::from_secs(60)).await;
    assert!(body.starts_with("not streaming"), "{body}");
    let body = poll.wait_ready(503, Duration::from_secs(60)).await;
    assert!(body.starts_with("not polling"), "{body}");
    drop(back); // pg-start
    cdc.wait_ready(200, DEADLINE).await;
    poll.wait_ready(200, DEADLINE).await;
    for (relay, mode) in [(&cdc, "cdc"), (&poll, "poll")] {
        let m = relay.metrics().await.expect("metrics");
        assert!(
            one(&m, "pgoutbox_reconnects_total", &[("mode", mode)]) >= 1.0,
            "{mode}: the session restart is counted"
        );
    }
    // Delivery resumed (a fresh client: the old one died with the server).
    let client = common::harness::connect().await;
    let id: Uuid = client
        .query_one(
            &format!(
                "SELECT {}.outbox_publish('Order', $1, 'After', '{{}}')",
                outbox.name
            ),
            &[&Uuid::new_v4()],
        )
        .await
        .unwrap()
        .get(0);
    read_until_all(vec![outbox.topic("Order")], vec![id], DEADLINE).await;
    assert!(cdc.relay.terminate().success());
    assert!(poll.relay.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_relay_is_not_ready_and_says_standby_until_it_takes_over() {
    let _shared = SERVICES.read().await;
    let mut outbox = TestOutbox::new("metrics_standby").await;
    outbox.extra_config = observed_config();
    let active = Observed::start(&outbox, &[], "active");
    active.wait_ready(200, DEADLINE).await;
    let standby = Observed::start(&outbox, &[], "standby");
    standby
        .wait_metrics(
            "pgoutbox_standby 1",
            |m| value(m, "pgoutbox_standby", &[]) == Some(1.0),
            DEADLINE,
        )
        .await;
    let body = standby.wait_ready(503, DEADLINE).await;
    assert!(body.starts_with("standby"), "{body}");
    let m = standby.metrics().await.expect("standby metrics");
    assert_eq!(one(&m, "pgoutbox_ready", &[]), 0.0);
    // The active relay dies: the standby takes over and is ready.
    active.relay.kill();
    standby.wait_ready(200, DEADLINE).await;
    let m = standby.metrics().await.expect("metrics after takeover");
    assert_eq!(one(&m, "pgoutbox_standby", &[]), 0.0);
    let id = outbox
        .publish("Order", Uuid::new_v4(), "Taken", &json!({}))
        .await;
    read_until_all(vec![outbox.topic("Order")], vec![id], DEADLINE).await;
    assert!(standby.relay.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_slot_retention_warning_fires_once_when_the_slot_holds_too_much_wal() {
    let _shared = SERVICES.read().await;
    let mut outbox = TestOutbox::new("metrics_retention").await;
    // 8 MiB: a fresh slot retains far less; three WAL switches push it past
    // (max_slot_wal_keep_size is -1 on the test server, so the byte limit
    // applies; with a limit, 8 MiB is below any sensible share of it too).
    outbox.extra_config = observed_config_with(&format!("slot_wal_warn_bytes = {}\n", 8 << 20));
    let relay = Observed::start(&outbox, &[], "cdc");
    relay.wait_ready(200, DEADLINE).await;
    let slot = outbox.slot();
    let s = [("slot", slot.as_str())];
    let limited: i64 = outbox
        .client
        .query_one(
            "SELECT setting::int8 FROM pg_settings WHERE name = 'max_slot_wal_keep_size'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        limited, -1,
        "this test expects max_slot_wal_keep_size = -1 (the services' default)"
    );
    relay
        .wait_metrics(
            "the slot sampled without a warning",
            |m| value(m, "pgoutbox_slot_retention_warning", &s) == Some(0.0),
            DEADLINE,
        )
        .await;
    // Hold the slot back: WAL the relay has no reason to confirm past yet
    // (restart_lsn only moves at the next running-xacts record it decodes).
    for _ in 0..3 {
        outbox
            .client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {0}.wal_filler (x int); \
                 INSERT INTO {0}.wal_filler VALUES (1); SELECT pg_switch_wal();",
                outbox.name
            ))
            .await
            .unwrap();
    }
    let m = relay
        .wait_metrics(
            "pgoutbox_slot_retention_warning 1",
            |m| value(m, "pgoutbox_slot_retention_warning", &s) == Some(1.0),
            DEADLINE,
        )
        .await;
    assert!(one(&m, "pgoutbox_slot_retained_wal_bytes", &s) > (8 << 20) as f64);
    let warned = "slot WAL retention warning";
    let log = relay.relay.log_text();
    assert!(log.contains(warned), "{log}");
    assert!(log.contains("max_slot_wal_keep_size is -1"), "{log}");
    // A checkpoint logs running transactions; once the relay has decoded
    // and confirmed past it, the slot lets the WAL go and the warning ends.
    outbox.client.batch_execute("CHECKPOINT").await.unwrap();
    let id = outbox
        .publish("Order", Uuid::new_v4(), "Nudge", &json!({}))
        .await;
    read_until_all(vec![outbox.topic("Order")], vec![id], DEADLINE).await;
    relay
        .wait_metrics(
            "pgoutbox_slot_retention_warning back to 0",
            |m| value(m, "pgoutbox_slot_retention_warning", &s) == Some(0.0),
            DEADLINE,
        )
        .await;
    let log = relay.relay.log_text();
    assert_eq!(
        log.matches(warned).count(),
        1,
        "one warning per crossing, not one per sample:\n{log}"
    );
    assert!(
        log.contains("slot WAL retention back below the warning threshold"),
        "{log}"
    );
    assert!(relay.relay.terminate().success());
}

#[tokio::test]
async fn a_taken_metrics_port_is_a_config_error_naming_the_field() {
    let _shared = SERVICES.read().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let outbox = TestOutbox::new("metrics_port").await;
    let mut cmd = outbox.command_with_args(&["run"]);
    cmd.env("OUTBOX_METRICS_LISTEN", &addr);
    let out = common::harness::output_checked(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("metrics.listen") && stderr.contains(&addr),
        "{stderr}"
    );
}
