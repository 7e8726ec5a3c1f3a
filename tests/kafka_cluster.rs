//! Broker faults on a three-broker Kafka cluster (scripts/kafka-cluster:
//! replication factor 3, `min.insync.replicas=2`), each under continuous
//! load and ending with the delivery ledger (`common::ledger`): 0 missing,
//! 0 reordered within an aggregate (the idempotent producer keeps each
//! partition's order across leader changes), 0 rolled-back published, every
//! duplicate inside the fault's window, and nothing dead-lettered for a
//! transient cluster condition.
//!
//! The short suite (CI) runs the leader kill; the other scenarios run with
//! `PGOUTBOX_CLUSTER_SUITE=full` (docs/RELIABILITY.md, scenarios 12a–12d,
//! has their figures). Each prints a `LEDGER <scenario>: …` line.

mod common;

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::harness::{free_addr, http_get, wait_for, CommitLog, Relay, TestOutbox};
use common::ledger::{self, wal_end, FaultWindows, Load, Written};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const DEADLINE: Duration = Duration::from_secs(180);
/// Partitions of an auto-created topic on the cluster (`num.partitions`).
const PARTITIONS: i32 = 6;

/// `bash scripts/kafka-cluster <args>`, to be run.
fn cluster_command(args: &[&str]) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(format!(
        "{}/scripts/kafka-cluster",
        env!("CARGO_MANIFEST_DIR")
    ))
    .args(args);
    cmd
}

/// `bash scripts/kafka-cluster <args>`; panics unless it succeeds; stdout.
fn cluster(args: &[&str]) -> String {
    let out = cluster_command(args)
        .output()
        .expect("run scripts/kafka-cluster");
    assert!(
        out.status.success(),
        "scripts/kafka-cluster {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Starts the services' PostgreSQL and the cluster, and points this test
/// process (the relays it starts, the ledger's consumer) at the cluster.
/// Called first in every test, under [`SERIAL`].
fn use_the_cluster() -> &'static str {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS.get_or_init(|| {
        let status = common::services_script("up")
            .status()
            .expect("run scripts/services up");
        assert!(status.success(), "scripts/services up failed");
        let database_url = common::ServicesEnv::read()
            .get("DATABASE_URL")
            .expect("scripts/services env printed no DATABASE_URL");
        cluster(&["up"]);
        let brokers = cluster(&["env"])
            .strip_prefix("KAFKA_CLUSTER_BROKERS=")
            .expect("scripts/kafka-cluster env prints KAFKA_CLUSTER_BROKERS")
            .to_owned();
        // Before anything reads `common::services()`: it takes these two.
        std::env::set_var("DATABASE_URL", database_url);
        std::env::set_var("KAFKA_BROKERS", &brokers);
        assert_eq!(common::services().kafka_brokers, brokers);
        brokers
    })
}

/// Whether the long scenarios run (`PGOUTBOX_CLUSTER_SUITE=full`); says so
/// when they do not.
fn full_suite(test: &str) -> bool {
    let full = std::env::var("PGOUTBOX_CLUSTER_SUITE").is_ok_and(|v| v == "full");
    if !full {
        eprintln!(
            "SKIPPED {test}: a long cluster scenario, run with PGOUTBOX_CLUSTER_SUITE=full \
             (the reliability suite; figures in docs/RELIABILITY.md)"
        );
    }
    full
}

/// One scenario: an outbox under load, its relay (with a metrics port)
/// streaming into the cluster, and a probe of commit LSNs for the ledger.
struct Scenario {
    outbox: TestOutbox,
    probe: CommitLog,
    load: Load,
    relay: Relay,
    addr: String,
    windows: FaultWindows,
    topic: String,
}

impl Scenario {
    async fn start(name: &str) -> Scenario {
        let outbox = TestOutbox::new(name).await;
        let probe = CommitLog::start(&outbox).await;
        let load = Load::start(&outbox.name, "Order", 60, Duration::from_millis(3));
        let addr = free_addr();
        let mut cmd = outbox.command_with_args(&["run"]);
        cmd.env("OUTBOX_METRICS_LISTEN", &addr);
        let relay = Relay::spawn(cmd, &outbox.name);
        let topic = outbox.topic("Order");
        let s = Scenario {
            outbox,
            probe,
            load,
            relay,
            addr,
            windows: FaultWindows::default(),
            topic,
        };
        s.confirmed_past(0).await;
        s.wait_ready(200).await;
        s
    }

    /// Waits until the slot has confirmed past `lsn`.
    async fn confirmed_past(&self, lsn: u64) -> u64 {
        wait_for(
            &format!(
                "the relay to confirm past {lsn} (log {})",
                self.relay.log.display()
            ),
            DEADLINE,
            || async {
                let c = self.outbox.confirmed_flush().await;
                (c > lsn).then_some(c)
            },
        )
        .await
    }

    /// Waits until `/readyz` answers `status`; its body.
    async fn wait_ready(&self, status: u16) -> String {
        wait_for(&format!("/readyz to answer {status}"), DEADLINE, || async {
            match http_get(&self.addr, "/readyz").await {
                Ok((s, body)) if s == status => Some(body),
                _ => None,
            }
        })
        .await
    }

    /// The partition of the topic holding the most records.
    fn busiest_partition(&self) -> i32 {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", use_the_cluster())
            .create()
            .expect("consumer");
        (0..PARTITIONS)
            .max_by_key(|&p| {
                consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                    .map(|(_, high)| high)
                    .unwrap_or(0)
            })
            .expect("partitions")
    }

    /// The node id leading `partition` (-1: none).
    fn leader(&self, partition: i32) -> i32 {
        cluster(&["leader", &self.topic, &partition.to_string()])
            .parse()
            .expect("a node id")
    }

    /// Waits until every partition of the topic has three in-sync replicas.
    fn fully_replicated(&self) {
        for p in 0..PARTITIONS {
            cluster(&["wait-isr", &self.topic, &p.to_string(), "3"]);
        }
    }

    /// Records a fault window from `confirmed_before` to the WAL end now.
    async fn window_from(&mut self, confirmed_before: u64) {
        let end = wal_end(&self.outbox.client).await;
        self.windows.push(confirmed_before, end);
    }

    /// Stops the load, waits until every row is COMPLETED (none
    /// dead-lettered), runs the ledger and checks it is clean.
    async fn finish(self, scenario: &str) -> ledger::Report {
        let written = self.load.stop().await;
        wait_for(
            &format!("every row COMPLETED (log {})", self.relay.log.display()),
            DEADLINE,
            || async {
                let s = self.outbox.statuses().await;
                assert!(
                    !s.contains_key("DEAD_LETTER"),
                    "rows dead-lettered for a transient cluster condition: {s:?}"
                );
                (s.len() == 1 && s.contains_key("COMPLETED")).then_some(())
            },
        )
        .await;
        let ends = self.probe.commit_ends(&self.outbox.client).await;
        let windows = &self.windows;
        let report = ledger::check(
            &self.outbox,
            vec![self.topic.clone()],
            &written,
            DEADLINE,
            |w: &Written| ends.get(&w.xid).is_some_and(|&end| windows.covers(end)),
        )
        .await;
        eprintln!("LEDGER {scenario}: {report}");
        self.probe.stop(&self.outbox.client).await;
        report.assert_clean(true);
        let mut relay = self.relay;
        assert!(relay.running(), "the relay exited: {}", relay.log_text());
        assert!(relay.terminate().success());
        report
    }
}

/// Scenario 12a (CI): the leader of the busiest partition SIGKILLed under
/// load, restarted once the controller moved its leaderships.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_of_a_busy_partition_is_killed_and_restarted() {
    let _serial = SERIAL.lock().await;
    use_the_cluster();
    let mut s = Scenario::start("cluster_leader_kill").await;
    let before = s.confirmed_past(0).await;
    let busy = s.busiest_partition();
    let leader = s.leader(busy);
    assert!((1..=3).contains(&leader), "partition {busy} has a leader");
    let killed = Instant::now();
    let back = ClusterBack;
    cluster(&["stop", &leader.to_string(), "kill"]);
    // The controller fences the dead broker (broker.session.timeout.ms)
    // and elects a leader from the in-sync replicas.
    wait_for("a new leader", DEADLINE, || async {
        let l = s.leader(busy);
        (l != leader && l > 0).then_some(())
    })
    .await;
    // The relay delivers and confirms with one broker down.
    let during = s.confirmed_past(s.outbox.confirmed_flush().await).await;
    eprintln!(
        "cluster-leader-kill: partition {busy} led by broker {leader}; delivering again {:.1}s after the kill",
        killed.elapsed().as_secs_f64()
    );
    cluster(&["start", &leader.to_string()]);
    drop(back);
    s.fully_replicated();
    s.confirmed_past(during).await;
    s.window_from(before).await;
    let report = s.finish("cluster-leader-kill").await;
    assert!(report.rows > 0);
}

/// Scenario 12b: two brokers down at once, below `min.insync.replicas`:
/// the relay waits (not ready, nothing confirmed, nothing dead-lettered)
/// and catches up when one broker returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn below_min_insync_replicas_the_relay_waits_and_catches_up() {
    let _serial = SERIAL.lock().await;
    if !full_suite("below_min_insync_replicas_the_relay_waits_and_catches_up") {
        return;
    }
    use_the_cluster();
    let mut s = Scenario::start("cluster_min_isr").await;
    let before = s.confirmed_past(0).await;
    let down = Instant::now();
    let back = ClusterBack;
    cluster(&["stop", "2", "kill"]);
    cluster(&["stop", "3", "kill"]);
    let why = s.wait_ready(503).await;
    eprintln!(
        "cluster-min-isr: not ready {:.1}s after the kills: {why}",
        down.elapsed().as_secs_f64()
    );
    // Once the leader dropped the dead replicas from the ISR, the relay
    // stays unready and confirms nothing while the load keeps writing:
    // observed over ten seconds, every answer kept.
    cluster(&["wait-isr-below", &s.topic, "0", "2"]);
    let stalled = wait_for(
        "/readyz to say Kafka acknowledges nothing",
        DEADLINE,
        || async {
            match http_get(&s.addr, "/readyz").await {
                Ok((503, body)) if body.starts_with("Kafka not acknowledging") => Some(body),
                _ => None,
            }
        },
    )
    .await;
    eprintln!(
        "cluster-min-isr: {:.1}s after the kills: {stalled}",
        down.elapsed().as_secs_f64()
    );
    let stuck = s.outbox.confirmed_flush().await;
    let mut reasons = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        assert_eq!(
            s.outbox.confirmed_flush().await,
            stuck,
            "confirmed while below min.insync.replicas"
        );
        let (status, body) = http_get(&s.addr, "/readyz").await.expect("/readyz answers");
        assert_eq!(status, 503, "ready below min.insync.replicas: {body}");
        reasons.push(body.trim().to_owned());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "cluster-min-isr: /readyz answered 503 {} times in 10s, last: {}",
        reasons.len(),
        reasons.last().map_or("", String::as_str)
    );
    assert!(
        reasons
            .iter()
            .all(|r| r.starts_with("Kafka not acknowledging")),
        "every reason says Kafka acknowledges nothing: {reasons:?}"
    );
    assert!(s.relay.running(), "{}", s.relay.log_text());
    let returned = Instant::now();
    cluster(&["start", "2"]);
    s.confirmed_past(stuck).await;
    s.wait_ready(200).await;
    eprintln!(
        "cluster-min-isr: outage {:.1}s; confirming again {:.1}s after one broker returned",
        returned.duration_since(down).as_secs_f64(),
        returned.elapsed().as_secs_f64()
    );
    cluster(&["start", "3"]);
    drop(back);
    s.fully_replicated();
    s.window_from(before).await;
    s.finish("cluster-below-min-isr").await;
}

/// Scenario 12c: a rolling restart of the three brokers (SIGTERM: each
/// moves its leaderships away first), one at a time, each back in sync
/// before the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_every_broker_loses_nothing() {
    let _serial = SERIAL.lock().await;
    if !full_suite("a_rolling_restart_of_every_broker_loses_nothing") {
        return;
    }
    use_the_cluster();
    let mut s = Scenario::start("cluster_rolling").await;
    let before = s.confirmed_past(0).await;
    let started = Instant::now();
    let back = ClusterBack;
    for broker in ["1", "2", "3"] {
        cluster(&["stop", broker]);
        let c = s.outbox.confirmed_flush().await;
        s.confirmed_past(c).await;
        cluster(&["start", broker]);
        s.fully_replicated();
    }
    drop(back);
    eprintln!(
        "cluster-rolling-restart: {:.1}s for three brokers",
        started.elapsed().as_secs_f64()
    );
    let c = s.outbox.confirmed_flush().await;
    s.confirmed_past(c).await;
    s.window_from(before).await;
    s.finish("cluster-rolling-restart").await;
}

/// Scenario 12d: the busiest partition's leader frozen with SIGSTOP for
/// 20 s, longer than the controller's session timeout (9 s): it is fenced,
/// its partitions move, the relay's requests to it time out and go to the
/// new leaders; then it resumes and rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_frozen_past_the_session_timeout_loses_nothing() {
    let _serial = SERIAL.lock().await;
    if !full_suite("a_leader_frozen_past_the_session_timeout_loses_nothing") {
        return;
    }
    use_the_cluster();
    let mut s = Scenario::start("cluster_frozen").await;
    let before = s.confirmed_past(0).await;
    let busy = s.busiest_partition();
    let leader = s.leader(busy).to_string();
    let frozen = Instant::now();
    let back = ClusterBack;
    cluster(&["pause", &leader]);
    wait_for("a new leader", DEADLINE, || async {
        let l = s.leader(busy).to_string();
        (l != leader && l != "-1").then_some(())
    })
    .await;
    let c = s.outbox.confirmed_flush().await;
    s.confirmed_past(c).await;
    let delivering = frozen.elapsed();
    let rest = Duration::from_secs(20).saturating_sub(frozen.elapsed());
    tokio::time::sleep(rest).await;
    cluster(&["resume", &leader]);
    drop(back);
    eprintln!(
        "cluster-frozen-leader: broker {leader} frozen 20s; delivering again {:.1}s after the freeze",
        delivering.as_secs_f64()
    );
    s.fully_replicated();
    s.window_from(before).await;
    s.finish("cluster-frozen-leader").await;
}

/// Brings every broker back (`scripts/kafka-cluster up` starts the stopped
/// ones and resumes the paused ones) when dropped: a failing scenario does
/// not leave the next one a broken cluster.
struct ClusterBack;

impl Drop for ClusterBack {
    fn drop(&mut self) {
        let status = cluster_command(&["up"]).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("scripts/kafka-cluster up failed: {status:?}");
        }
    }
}
