//! The operator kit against live relays: every metric name that the Grafana
//! dashboard (`deploy/grafana/pgoutbox-dashboard.json`) and the alerting
//! rules (`deploy/prometheus/pgoutbox-alerts.yml`) use appears in what real
//! relays serve on `/metrics` — a CDC relay that published, dead-lettered
//! and reconnected, and a poll relay that published and retried. A panel or
//! an alert on a name the relay does not export would stay empty or silent
//! forever; `scripts/check-observability` checks the same names statically
//! against `src/metrics.rs`.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::harness::{create_topic, free_port, read_until_all, wait_for, Relay, TestOutbox};
use serde_json::json;
use uuid::Uuid;

const DASHBOARD: &str = "deploy/grafana/pgoutbox-dashboard.json";
const RULES: &str = "deploy/prometheus/pgoutbox-alerts.yml";

/// The `pgoutbox_*` names in `text` (`pgoutbox_` followed by lower-case
/// letters, digits and `_`).
fn pgoutbox_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("pgoutbox_") {
        // Not the tail of a longer identifier (`x_pgoutbox_…`).
        let preceded = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded && end > "pgoutbox_".len() {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    out
}

/// Every `pgoutbox_*` name the dashboard and the rules use.
fn names_used() -> BTreeSet<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut out = BTreeSet::new();
    for file in [DASHBOARD, RULES] {
        let path = format!("{root}/{file}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        let names = pgoutbox_names(&text);
        assert!(!names.is_empty(), "{file} uses no pgoutbox_* name");
        out.extend(names);
    }
    out
}

/// The sample names of a Prometheus text exposition (`name{labels} value`
/// or `name value`), comments skipped.
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The names of `used` that no sample of `scraped` carries; a histogram's
/// base name counts as present through its `_count` series.
fn missing_names(used: &BTreeSet<String>, scraped: &BTreeSet<String>) -> Vec<String> {
    used.iter()
        .filter(|n| !scraped.contains(*n) && !scraped.contains(&format!("{n}_count")))
        .cloned()
        .collect()
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            break;
        };
        rest = &rest[eol + 2..];
        if size == 0 || rest.len() < size {
            out.extend_from_slice(&rest[..size.min(rest.len())]);
            break;
        }
        out.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
    out
}

/// `GET path` on `addr` with plain std networking: (status code, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: text/plain\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of HTTP headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The value of the sample `series` (exact text before the value), if any.
fn sample_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    })
}

/// Waits until the outbox holds exactly `want` rows per listed status.
async fn wait_statuses(outbox: &TestOutbox, want: &[(&str, i64)], relay: &Relay) {
    let what = format!("{}: rows {want:?}", outbox.name);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = outbox.statuses().await;
        if want
            .iter()
            .all(|(status, n)| s.get(*status).copied().unwrap_or(0) == *n)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; now {s:?}; relay log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn names_are_read_from_dashboards_rules_and_expositions() {
    let expr = r#"sum(rate(pgoutbox_events_published_total{job=~"$job"}[5m])) / x_pgoutbox_not_one, job="pgoutbox" pgoutbox_kafka_ack_latency_seconds_bucket"#;
    assert_eq!(
        pgoutbox_names(expr).into_iter().collect::<Vec<_>>(),
        [
            "pgoutbox_events_published_total",
            "pgoutbox_kafka_ack_latency_seconds_bucket"
        ]
    );
    let exposition = "# HELP pgoutbox_ready ready\n# TYPE pgoutbox_ready gauge\npgoutbox_ready 1\n\
        pgoutbox_batch_size_bucket{kind=\"claim\",le=\"1\"} 0\npgoutbox_batch_size_count{kind=\"claim\"} 0\n";
    let scraped = sample_names(exposition);
    let used: BTreeSet<String> = [
        "pgoutbox_ready",
        "pgoutbox_batch_size",
        "pgoutbox_batch_size_bucket",
        "pgoutbox_standby",
    ]
    .map(String::from)
    .into();
    assert_eq!(missing_names(&used, &scraped), ["pgoutbox_standby"]);
    assert_eq!(sample_value(exposition, "pgoutbox_ready"), Some(1.0));
    assert_eq!(
        dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        b"hello world"
    );
    // The files themselves are readable and use names.
    let used = names_used();
    for name in ["pgoutbox_ready", "pgoutbox_replication_lag_bytes"] {
        assert!(used.contains(name), "{name} missing from {used:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_of_the_dashboard_and_the_alerts_is_served_by_live_relays() {
    let used = names_used();

    // A CDC relay: deliveries, one row too large (dead-lettered at once),
    // and a session restart (its walsender terminated).
    let mut cdc = TestOutbox::new("obs_cdc").await;
    cdc.extra_config = "[kafka]\nmessage_max_bytes = 2000\n".into();
    let cdc_addr = format!("127.0.0.1:{}", free_port());
    cdc.env
        .push(("OUTBOX_METRICS_LISTEN".into(), cdc_addr.clone()));

    // A poll relay: deliveries to a topic that exists, and sends to one that
    // does not (auto-creation off): retriable failures, then a dead letter.
    let mut poll = TestOutbox::new("obs_poll").await;
    poll.extra_config = "[outbox]\nbatch_size = 10\n\n[poll]\nbackoff_base_ms = 100\nbackoff_max_ms = 200\n\n\
        [kafka.properties]\n\"message.timeout.ms\" = \"1500\"\n\"allow.auto.create.topics\" = \"false\"\n"
        .into();
    let poll_addr = format!("127.0.0.1:{}", free_port());
    poll.env
        .push(("OUTBOX_METRICS_LISTEN".into(), poll_addr.clone()));
    create_topic(&poll.topic("Order")).await;

    let cdc_relay = Relay::spawn(cdc.command_with_args(&["run"]), "obs_cdc");
    let poll_relay = Relay::spawn(
        poll.command_with_args(&["run", "--mode", "poll"]),
        "obs_poll",
    );

    let mut cdc_ids = Vec::new();
    let mut poll_ids = Vec::new();
    for i in 0..5 {
        let aggregate = Uuid::new_v4();
        cdc_ids.push(
            cdc.publish("Order", aggregate, "Created", &json!({ "seq": i }))
                .await,
        );
        poll_ids.push(
            poll.publish("Order", aggregate, "Created", &json!({ "seq": i }))
                .await,
        );
    }
    cdc.publish(
        "Order",
        Uuid::new_v4(),
        "Huge",
        &json!({ "blob": "x".repeat(5000) }),
    )
    .await;
    poll.client
        .execute(
            &format!(
                "INSERT INTO {}.outbox (aggregate_id, aggregate_type, event_type, payload, max_retries) \
                 VALUES (gen_random_uuid(), 'Missing', 'Happened', '{{}}', 2)",
                poll.name
            ),
            &[],
        )
        .await
        .expect("insert the event for a missing topic");

    read_until_all(vec![cdc.topic("Order")], cdc_ids, Duration::from_secs(90)).await;
    read_until_all(vec![poll.topic("Order")], poll_ids, Duration::from_secs(90)).await;
    wait_statuses(&cdc, &[("COMPLETED", 5), ("DEAD_LETTER", 1)], &cdc_relay).await;
    wait_statuses(&poll, &[("COMPLETED", 5), ("DEAD_LETTER", 1)], &poll_relay).await;

    // Restart the CDC session: terminate its walsender; the relay
    // reconnects and delivers what follows.
    wait_for(
        "the CDC relay's walsender terminated",
        Duration::from_secs(60),
        || async {
            let row = cdc
                .client
                .query_one(
                    "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND active_pid IS NOT NULL",
                    &[&cdc.slot()],
                )
                .await
                .expect("terminate the walsender");
            (row.get::<_, i64>(0) > 0).then_some(())
        },
    )
    .await;
    let after = cdc
        .publish("Order", Uuid::new_v4(), "AfterRestart", &json!({}))
        .await;
    read_until_all(
        vec![cdc.topic("Order")],
        vec![after],
        Duration::from_secs(90),
    )
    .await;
    wait_statuses(&cdc, &[("COMPLETED", 6), ("DEAD_LETTER", 1)], &cdc_relay).await;

    // Scrape both until every name is there (slot and row metrics are
    // sampled periodically), or fail with what is missing.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (cdc_text, poll_text, missing) = loop {
        let scrape = |addr: &str| match http_get(addr, "/metrics") {
            Ok((200, body)) => body,
            Ok((status, body)) => panic!("GET http://{addr}/metrics answered {status}:\n{body}"),
            Err(e) => panic!("GET http://{addr}/metrics failed: {e}"),
        };
        let cdc_text = scrape(&cdc_addr);
        let poll_text = scrape(&poll_addr);
        let mut scraped = sample_names(&cdc_text);
        scraped.extend(sample_names(&poll_text));
        let missing = missing_names(&used, &scraped);
        if missing.is_empty() || Instant::now() >= deadline {
            break (cdc_text, poll_text, missing);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "used by {DASHBOARD} or {RULES} but served by neither relay: {missing:?}\n\
         --- CDC relay /metrics:\n{cdc_text}\n--- poll relay /metrics:\n{poll_text}"
    );

    // What the scenario did shows in the counters the alerts read.
    let published = |text: &str, mode: &str, topic: &str| {
        sample_value(
            text,
            &format!("pgoutbox_events_published_total{{mode=\"{mode}\",topic=\"{topic}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(
        published(&cdc_text, "cdc", &cdc.topic("Order")) >= 6.0,
        "CDC published count:\n{cdc_text}"
    );
    assert!(
        published(&poll_text, "poll", &poll.topic("Order")) >= 5.0,
        "poll published count:\n{poll_text}"
    );
    assert!(
        sample_value(&cdc_text, "pgoutbox_reconnects_total{mode=\"cdc\"}").unwrap_or(0.0) >= 1.0,
        "the session restart is counted:\n{cdc_text}"
    );
    for (text, mode) in [(&cdc_text, "cdc"), (&poll_text, "poll")] {
        assert_eq!(
            sample_value(text, "pgoutbox_ready"),
            Some(1.0),
            "{mode} relay ready:\n{text}"
        );
        assert_eq!(
            sample_value(text, &format!("pgoutbox_mode{{mode=\"{mode}\"}}")),
            Some(1.0),
            "{mode} relay mode:\n{text}"
        );
    }

    assert!(cdc_relay.terminate().success(), "CDC relay exit status");
    assert!(poll_relay.terminate().success(), "poll relay exit status");
}
