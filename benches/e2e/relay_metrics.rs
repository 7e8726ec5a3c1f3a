//! The relay's own view of a latency run: its `/metrics`, scraped before it
//! is stopped, and percentiles of `pgoutbox_event_latency_seconds`
//! (PostgreSQL commit → read by the relay, → in Kafka for consumers). Set
//! beside the harness's commit → visible figures they split the time into
//! PostgreSQL's side (WAL flush, walsender) and the relay's and Kafka's.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A free loopback address for a relay's metrics listener.
pub fn free_addr() -> Option<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    Some(l.local_addr().ok()?.to_string())
}

/// The text of `http://{addr}/metrics`, or `None` when it cannot be read.
pub fn scrape(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !(head.starts_with("HTTP/1.") && head.contains(" 200 ")) {
        return None;
    }
    Some(body.to_string())
}

/// The `q` quantile, in milliseconds, of the histogram `name` series whose
/// labels include `label` (`key="value"`), as Prometheus'
/// `histogram_quantile` estimates it: linear within the bucket that holds
/// it. `None` without observations.
pub fn quantile_ms(text: &str, name: &str, label: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower * 1000.0);
            }
            let within = if count > below {
                (rank - below) / (count - below)
            } else {
                0.0
            };
            return Some((lower + (le - lower) * within) * 1000.0);
        }
        (lower, below) = (le, count);
    }
    None
}

/// Checks [`quantile_ms`] on a histogram with known quantiles (run by
/// `cargo test`, which runs this harness-less target without `--bench`).
pub fn check_quantiles() -> Result<(), String> {
    let text = "\
pgoutbox_event_latency_seconds_bucket{stage=\"read\",le=\"0.01\"} 50
pgoutbox_event_latency_seconds_bucket{stage=\"read\",le=\"0.02\"} 90
pgoutbox_event_latency_seconds_bucket{stage=\"read\",le=\"+Inf\"} 100
pgoutbox_event_latency_seconds_bucket{stage=\"delivered\",le=\"0.01\"} 0
pgoutbox_event_latency_seconds_bucket{stage=\"delivered\",le=\"+Inf\"} 0
";
    let name = "pgoutbox_event_latency_seconds";
    let read = "stage=\"read\"";
    // 50 of 100 at or below 10 ms: the median is 10 ms; rank 70 is half-way
    // through the (10, 20] bucket; past the last finite bucket, its bound;
    // no observations, no quantile.
    let cases = [
        (read, 0.5, Some(10.0)),
        (read, 0.7, Some(15.0)),
        (read, 0.99, Some(20.0)),
        ("stage=\"delivered\"", 0.5, None),
    ];
    for (label, q, want) in cases {
        let got = quantile_ms(text, name, label, q);
        let ok = match (got, want) {
            (Some(g), Some(w)) => (g - w).abs() < 1e-9,
            (None, None) => true,
            _ => false,
        };
        if !ok {
            return Err(format!(
                "quantile_ms({label}, {q}) = {got:?}, want {want:?}"
            ));
        }
    }
    Ok(())
}
