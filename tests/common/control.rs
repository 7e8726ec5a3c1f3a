//! Control of the shared services for fault scenarios: stop, kill, pause
//! and restart PostgreSQL and Kafka through `scripts/services`. Scenarios
//! that use these stop services other tests use, so they run one at a time
//! in their own test binaries.

/// Runs `scripts/services <cmd> [arg]` and panics if it fails.
pub fn services(cmd: &str, arg: Option<&str>) {
    let mut c = super::services_script(cmd);
    if let Some(a) = arg {
        c.arg(a);
    }
    let status = c.status().expect("run scripts/services");
    assert!(status.success(), "scripts/services {cmd} failed");
}

/// Starts Kafka again when dropped, even if the scenario panics half-way.
pub struct KafkaBack;

impl Drop for KafkaBack {
    fn drop(&mut self) {
        services("kafka-start", None);
    }
}

/// The broker's pid, from the services' state directory.
fn kafka_pid() -> i32 {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = std::env::var("PGOUTBOX_SERVICES_DIR")
        .unwrap_or_else(|_| format!("{root}/target/services"));
    let text =
        std::fs::read_to_string(format!("{dir}/kafka.pid")).expect("kafka.pid: is Kafka running?");
    text.trim().parse().expect("a pid in kafka.pid")
}

/// Freezes the broker (SIGSTOP): connections stay open, nothing answers.
/// Thawed when the returned guard drops.
pub fn kafka_freeze() -> KafkaFrozen {
    let pid = kafka_pid();
    // SAFETY: kill(2) with a pid read from our own pid file.
    assert_eq!(
        unsafe { libc::kill(pid, libc::SIGSTOP) },
        0,
        "SIGSTOP kafka"
    );
    KafkaFrozen(pid)
}

/// A frozen broker; dropping it sends SIGCONT.
pub struct KafkaFrozen(i32);

impl Drop for KafkaFrozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The walsender streaming `slot`: (pid, last reply_time), if one is.
pub async fn walsender(client: &tokio_postgres::Client, slot: &str) -> Option<(i32, String)> {
    client
        .query_opt(
            "SELECT s.active_pid, coalesce(r.reply_time::text, '') FROM pg_replication_slots s \
               LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
              WHERE s.slot_name = $1 AND s.active_pid IS NOT NULL",
            &[&slot],
        )
        .await
        .ok()
        .flatten()
        .map(|r| (r.get(0), r.get(1)))
}
