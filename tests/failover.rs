//! PostgreSQL primary failover under continuous load (issue 15): a primary
//! and a physical standby of their own (scripts/services + scripts/pg-standby,
//! on ports of this test, so the suite's shared PostgreSQL is never
//! stopped), the relay given both hosts in DATABASE_URL. The primary is
//! stopped with `-m immediate` (a crash) or `-m fast` while the relay
//! publishes a 100,000-row transaction (a planned switchover), the standby
//! promoted; the relay must find the new primary and go on:
//! - PostgreSQL 17+: from the failover slot the standby kept in step
//!   (`synchronized_standby_slots`), with no recovery and no backfill;
//! - before 17: the new primary has no slot, so the relay recreates it and
//!   backfills every row not yet COMPLETED (`cdc.on_slot_lost = "recreate"`).
//!
//! Read back with an independent consumer: 0 events missing, per-aggregate
//! order of first deliveries, every duplicate a resend of an event first
//! sent before the failover (one copy below each partition's end at the
//! failover); events of transactions the failover lost ("phantoms") are
//! counted, and must be 0 with synchronized standby slots and after a
//! switchover. Before the crash, `pgoutbox status` must show the standby's
//! synced copy of the failover slot (17+).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::harness::{free_port, read_topics_as, wait_for, watermarks, Isolation, Relay};
use common::services;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(180);
const AGGREGATES: usize = 4;

/// The test's own PostgreSQL pair.
struct Pair {
    env: Vec<(String, String)>,
    dir: PathBuf,
    primary_url: String,
    failover_url: String,
    major: u32,
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

impl Pair {
    fn command(&self, name: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(script(name))
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("KAFKA_BROKERS");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn run(&self, name: &str, args: &[&str]) -> String {
        let out = self.command(name, args).output().expect("run script");
        assert!(
            out.status.success(),
            "{name} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn value(output: &str, key: &str) -> String {
        output
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in {output}"))
            .to_owned()
    }

    fn start(name: &str) -> Pair {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        let mut pair = Pair {
            env: vec![
                ("PGOUTBOX_SERVICES_DIR".into(), dir.display().to_string()),
                ("PGOUTBOX_PG_PORT".into(), free_port().to_string()),
                ("PGOUTBOX_KAFKA_PORT".into(), free_port().to_string()),
                ("PGOUTBOX_STANDBY_PORT".into(), free_port().to_string()),
            ],
            dir,
            primary_url: String::new(),
            failover_url: String::new(),
            major: 0,
        };
        // Leftovers of an interrupted run.
        let _ = pair.command("pg-standby", &["destroy"]).output();
        let _ = pair.command("services", &["pg-stop", "immediate"]).output();
        let _ = std::fs::remove_dir_all(&pair.dir);
        pair.run("services", &["pg-start"]);
        pair.primary_url = Pair::value(&pair.run("services", &["env"]), "DATABASE_URL");
        pair
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.command("pg-standby", &["destroy"]).output();
        let _ = self.command("services", &["pg-stop", "immediate"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect(url: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(client)
}

/// What the load wrote: committed events by tracking id, each with its
/// aggregate, sequence within it, and whether it committed after the
/// promotion.
#[derive(Default)]
struct Written {
    committed: Vec<(Uuid, usize, u64, bool)>,
}

/// Inserts events through the host list until `stop`, reconnecting (the
/// list finds the writable primary) when the connection is lost.
fn start_load(
    url: String,
    promoted: Arc<Mutex<bool>>,
) -> (
    Arc<Mutex<Written>>,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let written = Arc::new(Mutex::new(Written::default()));
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let w = written.clone();
    let task = tokio::spawn(async move {
        let mut seq = [0u64; AGGREGATES];
        let mut client: Option<tokio_postgres::Client> = None;
        let mut n = 0usize;
        while !*stopped.borrow() {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = connect(&url).await;
                if client.is_none() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            let c = client.as_ref().expect("connected");
            let agg = n % AGGREGATES;
            let next = seq[agg] + 1;
            let aggregate = Uuid::from_u128(agg as u128 + 1);
            let payload = serde_json::json!({ "seq": next });
            let after = *promoted.lock().unwrap();
            let r = c
                .query_one(
                    "SELECT public.outbox_publish('Order', $1, 'Placed', $2, '{}'::jsonb)",
                    &[&aggregate, &payload],
                )
                .await;
            match r {
                Ok(row) => {
                    seq[agg] = next;
                    n += 1;
                    w.lock()
                        .unwrap()
                        .committed
                        .push((row.get(0), agg, next, after));
                }
                Err(_) => client = None,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(4)) => {}
                _ = stopped.changed() => {}
            }
        }
    });
    (written, stop, task)
}

/// The scenarios share the machine's two cores and ports: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Rows of the one big transaction of the switchover scenario.
const BULK_ROWS: i64 = 100_000;

/// A crash: the primary stopped with `-m immediate`, the standby promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_follows_a_primary_failover_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    scenario(false, false).await;
}

/// A planned switchover: the primary stopped with `-m fast` (every WAL
/// record reaches the standby first) while the relay is in the middle of
/// publishing a 100,000-row transaction, the standby promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switchover_in_the_middle_of_a_100k_row_transaction_loses_nothing() {
    let _serial = SERIAL.lock().await;
    scenario(true, false).await;
}

/// The switchover with exactly-once delivery: the relay resumes on the new
/// primary from the progress topic (on 14–16 through a new slot whose
/// backfill skips the rows Kafka has), and a `read_committed` reader sees
/// every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exactly_once_switchover_sends_nothing_twice() {
    let _serial = SERIAL.lock().await;
    scenario(true, true).await;
}

async fn scenario(switchover: bool, exactly_once: bool) {
    let mut pair = Pair::start(if switchover {
        "switchover-services"
    } else {
        "failover-services"
    });
    let version: i32 = connect(&pair.primary_url)
        .await
        .expect("primary")
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    pair.major = version as u32 / 10_000;
    let failover_slots = pair.major >= 17;
    let create: &[&str] = if failover_slots {
        &["create", "--sync-slots"]
    } else {
        &["create"]
    };
    pair.run("pg-standby", create);
    pair.failover_url = Pair::value(&pair.run("pg-standby", &["env"]), "FAILOVER_DATABASE_URL");

    let prefix = format!(
        "ha-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let pgoutbox = |url: &str, args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgoutbox"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", url)
            .env("KAFKA_BROKERS", &services().kafka_brokers)
            .env("OUTBOX_SLOT", "ha_slot")
            .env("OUTBOX_TOPIC", format!("{prefix}.{{aggregate_type}}"))
            .env("OUTBOX_METRICS_LISTEN", "off")
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn");
        if exactly_once {
            cmd.env("OUTBOX_DELIVERY", "exactly-once")
                .env("KAFKA_PROGRESS_TOPIC", format!("{prefix}.progress"));
        }
        cmd
    };
    let out = pgoutbox(&pair.primary_url, &["migrate"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut relay = Relay::spawn(
        pgoutbox(&pair.failover_url, &["run", "--mode", "cdc"]),
        "failover",
    );
    let primary = connect(&pair.primary_url).await.expect("primary");
    wait_for("the relay's slot to stream", DEADLINE, || async {
        primary
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'ha_slot' AND active",
                &[],
            )
            .await
            .ok()
            .flatten()
            .map(|_| ())
    })
    .await;

    let promoted = Arc::new(Mutex::new(false));
    let (written, stop, load) = start_load(pair.failover_url.clone(), promoted.clone());
    let topic = format!("{prefix}.Order");
    // Delivered = marked COMPLETED after Kafka's ack (reading the topic
    // to its end cannot finish while the load runs).
    let completed = |url: String, id: Option<String>| async move {
        let c = connect(&url).await?;
        let row = match id {
            Some(id) => c
                .query_one(
                    "SELECT count(*) FROM public.outbox WHERE status = 'COMPLETED' AND tracking_id = $1::text::uuid",
                    &[&id],
                )
                .await
                .ok()?,
            None => c
                .query_one("SELECT count(*) FROM public.outbox WHERE status = 'COMPLETED'", &[])
                .await
                .ok()?,
        };
        Some(row.get::<_, i64>(0))
    };
    let before = wait_for("300 events delivered before the failover", DEADLINE, || {
        let url = pair.primary_url.clone();
        async move { completed(url, None).await.filter(|n| *n >= 300) }
    })
    .await;
    if failover_slots {
        pair.run("pg-standby", &["wait-synced", "ha_slot"]);
    }
    if !switchover {
        // `pgoutbox status` asks the other hosts of the list for their copy.
        let out = pgoutbox(&pair.failover_url, &["status", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let slot = &status["slot"];
        assert!(slot["invalidation_reason"].is_null(), "{slot}");
        if failover_slots {
            assert_eq!(slot["failover"], true, "{slot}");
            let standbys = slot["standbys"].as_array().expect("standbys");
            assert_eq!(standbys.len(), 1, "the standby, not the primary: {slot}");
            assert_eq!(standbys[0]["present"], true, "{slot}");
            assert_eq!(standbys[0]["synced"], true, "{slot}");
            assert!(standbys[0]["invalidation_reason"].is_null(), "{slot}");
            assert!(slot["failover_warning"].is_null(), "{slot}");
        } else {
            assert!(slot["failover"].is_null(), "{slot}");
        }
    }
    let mut bulk_at_stop = None;
    if switchover {
        // One transaction of BULK_ROWS events on aggregates of their own;
        // the primary stops once the relay has published part of it.
        primary
            .execute(
                &format!(
                    "SELECT public.outbox_publish('Order', md5(i::text)::uuid, 'Bulk', \
                     jsonb_build_object('i', i), '{{}}'::jsonb) \
                     FROM generate_series(1, {BULK_ROWS}) AS i"
                ),
                &[],
            )
            .await
            .expect("the bulk transaction");
        let part = wait_for("the relay inside the bulk transaction", DEADLINE, || async {
            let n: i64 = primary
                .query_one(
                    "SELECT count(*) FROM public.outbox WHERE event_type = 'Bulk' AND status = 'COMPLETED'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (n > 0).then_some(n)
        })
        .await;
        bulk_at_stop = Some(part);
    }
    let died = Instant::now();
    let mode = if switchover { "fast" } else { "immediate" };
    pair.run("pg-standby", &["stop-primary", mode]);
    // The failover mark: each partition's end once Kafka has taken what the
    // relay had in flight from the old primary (it cannot send anything new
    // without a primary). Every duplicate must straddle it: one copy sent
    // before the failover, the others after.
    let mark = wait_for(
        "the topic to settle after the primary died",
        DEADLINE,
        || {
            let t = topic.clone();
            async move {
                let before = tokio::task::spawn_blocking({
                    let t = t.clone();
                    move || watermarks(&t)
                })
                .await
                .ok()?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let after = tokio::task::spawn_blocking(move || watermarks(&t))
                    .await
                    .ok()?;
                (before == after).then_some(after)
            }
        },
    )
    .await;
    let promoting = Instant::now();
    pair.run("pg-standby", &["promote"]);
    *promoted.lock().unwrap() = true;
    // The first event committed on the new primary, delivered.
    let first_after = wait_for("an event committed on the new primary", DEADLINE, || {
        let w = written.clone();
        async move {
            w.lock()
                .unwrap()
                .committed
                .iter()
                .find(|c| c.3)
                .map(|c| c.0.to_string())
        }
    })
    .await;
    wait_for(
        "the first event from the new primary delivered",
        DEADLINE,
        || {
            let url = pair.failover_url.clone();
            let id = first_after.clone();
            async move {
                completed(url, Some(id))
                    .await
                    .filter(|n| *n == 1)
                    .map(|_| ())
            }
        },
    )
    .await;
    let recovered_in = died.elapsed();
    let after_promotion = promoting.elapsed();
    let committed_after = written
        .lock()
        .unwrap()
        .committed
        .iter()
        .filter(|c| c.3)
        .count();
    wait_for("more load on the new primary", DEADLINE, || {
        let w = written.clone();
        async move {
            (w.lock().unwrap().committed.iter().filter(|c| c.3).count() >= committed_after + 300)
                .then_some(())
        }
    })
    .await;
    stop.send(true).unwrap();
    load.await.unwrap();

    // What the new primary holds is what must be in Kafka.
    let new_primary = connect(&pair.failover_url).await.expect("new primary");
    let in_table: HashSet<String> = new_primary
        .query("SELECT tracking_id::text FROM public.outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want = in_table.clone();
    let t = topic.clone();
    // Until every event is there, or a minute has passed: then the report
    // below names what is missing.
    let give_up = Instant::now() + Duration::from_secs(60);
    let isolation = exactly_once.then_some(Isolation::ReadCommitted);
    let records = tokio::task::spawn_blocking(move || {
        read_topics_as(&[t], DEADLINE, isolation, |r| {
            let seen: HashSet<&str> = r.iter().map(|r| r.header("tracking_id")).collect();
            Instant::now() > give_up || want.iter().all(|w| seen.contains(w.as_str()))
        })
    })
    .await
    .unwrap();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for r in &records {
        *counts.entry(r.header("tracking_id")).or_default() += 1;
    }
    let missing = in_table
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .count();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    // Explained: a duplicate is the failover's resend of an event first
    // sent before it — exactly one copy below the mark.
    let mut before_mark: HashMap<&str, usize> = HashMap::new();
    for r in &records {
        let end = mark.get(&r.partition).map_or(0, |&(_, high)| high);
        if r.offset < end {
            *before_mark.entry(r.header("tracking_id")).or_default() += 1;
        }
    }
    let unexplained: Vec<&str> = counts
        .iter()
        .filter(|(id, n)| **n > 1 && before_mark.get(*id).copied().unwrap_or(0) != 1)
        .map(|(id, _)| *id)
        .collect();
    let phantoms = counts.keys().filter(|id| !in_table.contains(**id)).count();
    // Per aggregate, first deliveries in commit order.
    let seq_of: HashMap<String, (usize, u64)> = written
        .lock()
        .unwrap()
        .committed
        .iter()
        .map(|(id, agg, seq, _)| (id.to_string(), (*agg, *seq)))
        .collect();
    let mut seen = HashSet::new();
    let mut last = [0u64; AGGREGATES];
    let mut ordered = records.clone();
    ordered.sort_by_key(|r| (r.partition, r.offset));
    let mut reordered = 0;
    for r in &ordered {
        let id = r.header("tracking_id");
        if !seen.insert(id.to_owned()) {
            continue;
        }
        if let Some((agg, seq)) = seq_of.get(id) {
            if *seq < last[*agg] {
                reordered += 1;
            }
            last[*agg] = last[*agg].max(*seq);
        }
    }
    let log = relay.log_text();
    let recreated = log.contains("recreated the lost replication slot");
    let what = match bulk_at_stop {
        Some(n) => format!(
            "SWITCHOVER (-m fast with {n} of the {BULK_ROWS}-row transaction's events marked)"
        ),
        None => "FAILOVER (-m immediate)".to_owned(),
    };
    let what = if exactly_once {
        format!("EXACTLY-ONCE {what}")
    } else {
        what
    };
    eprintln!(
        "{what} PostgreSQL {}: {} events in the new primary's table, {} records ({before} before the failover); missing {missing}, duplicates {duplicates} ({} unexplained), phantoms {phantoms}, reordered {reordered}; first event from the new primary delivered {:.1}s after the promotion ({:.1}s after the primary died, the test waiting for Kafka to settle in between); slot {}",
        pair.major,
        in_table.len(),
        records.len(),
        unexplained.len(),
        after_promotion.as_secs_f64(),
        recovered_in.as_secs_f64(),
        if recreated { "recreated with a backfill" } else { "continued (failover slot)" }
    );
    if missing > 0 {
        let ids: Vec<&String> = in_table
            .iter()
            .filter(|id| !counts.contains_key(id.as_str()))
            .take(5)
            .collect();
        for id in ids {
            let row = new_primary
                .query_one(
                    "SELECT status, created_at::text, id FROM public.outbox WHERE tracking_id = $1::text::uuid",
                    &[id],
                )
                .await
                .unwrap();
            let (status, created, rid): (String, String, i64) =
                (row.get(0), row.get(1), row.get(2));
            let phase = seq_of
                .get(id.as_str())
                .map(|_| "loaded")
                .unwrap_or("not by the load");
            eprintln!("missing {id}: status {status}, created {created}, id {rid}, {phase}");
        }
    }
    assert_eq!(missing, 0, "every event the new primary holds is delivered");
    if exactly_once {
        assert_eq!(
            duplicates, 0,
            "a read_committed reader sees every event once across the switchover"
        );
    }
    assert!(
        unexplained.is_empty(),
        "duplicates that are not a resend of an event sent before the failover: {:?}",
        &unexplained[..unexplained.len().min(10)]
    );
    if let Some(n) = bulk_at_stop {
        assert!(
            n < BULK_ROWS,
            "the primary stopped while the relay was inside the transaction ({n} marked)"
        );
        // A switchover loses no transaction: nothing published is absent
        // from the new primary.
        assert_eq!(phantoms, 0, "a fast shutdown sends every WAL record first");
    }
    assert_eq!(reordered, 0, "per-aggregate order of first deliveries");
    if failover_slots {
        assert!(!recreated, "the synced failover slot carries on:\n{log}");
        assert_eq!(
            phantoms, 0,
            "synchronized_standby_slots: nothing the failover lost was published"
        );
    } else {
        assert!(
            recreated,
            "no slot on the new primary: recreated and backfilled:\n{log}"
        );
    }
    assert!(relay.running(), "{log}");
    assert!(relay.terminate().success());
}
