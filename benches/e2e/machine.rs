//! The machine the benchmark runs on: what it is (for the record), how busy
//! it is (a run waits for a quiet moment and records the load it saw), and
//! what one process used (CPU seconds, peak RSS) from /proc.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Jiffies of the whole machine from the first line of /proc/stat.
#[derive(Clone, Copy, Debug)]
pub struct CpuTicks {
    busy: u64,
    total: u64,
}

impl CpuTicks {
    /// Reads /proc/stat now.
    pub fn now() -> CpuTicks {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = text
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let get = |i: usize| fields.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
        CpuTicks {
            busy,
            total: busy + get(3) + get(4),
        }
    }

    /// Percent of all cores busy between `self` and `later`.
    pub fn busy_pct_until(&self, later: &CpuTicks) -> f64 {
        let total = later.total.saturating_sub(self.total).max(1);
        100.0 * later.busy.saturating_sub(self.busy) as f64 / total as f64
    }
}

/// Waits until the machine was at most `max_pct` busy during one second, for
/// at most `patience`. Returns the seconds waited and the last second's load.
pub async fn wait_quiet(patience: Duration, max_pct: f64) -> (f64, f64) {
    let start = Instant::now();
    loop {
        let a = CpuTicks::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pct = a.busy_pct_until(&CpuTicks::now());
        if pct <= max_pct || start.elapsed() >= patience {
            return (start.elapsed().as_secs_f64(), pct);
        }
    }
}

/// CPU seconds and peak resident memory of one process (all its threads).
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// User + system CPU seconds since the process started.
    pub cpu_s: f64,
    /// Peak resident set (VmHWM), MiB.
    pub peak_rss_mib: f64,
}

/// Reads `pid`'s usage from /proc; `None` when the process is gone.
pub fn usage_of(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Some(Usage {
        cpu_s: ticks / clock_ticks(),
        peak_rss_mib: hwm_kib / 1024.0,
    })
}

/// `pid`'s stat fields after the command name (which may hold spaces and
/// parentheses): index 1 is the parent's pid, 11–14 utime, stime, cutime
/// and cstime in clock ticks.
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn ticks(fields: &[String], at: &[usize]) -> f64 {
    at.iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum()
}

/// The parent of `pid` (for a backend's pid: the postmaster).
pub fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(&pid.to_string())?.get(1)?.parse().ok()
}

/// CPU seconds the PostgreSQL server has used so far: the postmaster's,
/// the children it has reaped (cutime, cstime: a walsender that exited with
/// its client is still counted) and its live children's. The difference of
/// two readings is what the server spent between them (walsenders, the
/// relay's mark statements, checkpoints and WAL writing).
pub fn postgres_cpu_s(postmaster: u32) -> Option<f64> {
    let own = stat_fields(&postmaster.to_string())?;
    let live: f64 = children(postmaster)
        .iter()
        .map(|(_, f)| ticks(f, &[11, 12]))
        .sum();
    Some((ticks(&own, &[11, 12, 13, 14]) + live) / clock_ticks())
}

/// The Kafka broker's pid when it is a process of this machine (a JVM whose
/// command line runs `kafka.Kafka`), for its CPU seconds.
pub fn kafka_broker() -> Option<u32> {
    let dir = std::fs::read_dir("/proc").ok()?;
    dir.flatten()
        .filter_map(|e| e.file_name().into_string().ok()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == b"kafka.Kafka"))
        })
}

/// How many of the postmaster's children are walsenders (their process
/// title starts `postgres: walsender`). A walsender whose client has gone
/// is counted until it has exited and been reaped: only then are its CPU
/// seconds in the postmaster's cutime.
pub fn walsenders(postmaster: u32) -> usize {
    children(postmaster)
        .iter()
        .filter(|(pid, _)| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"postgres: walsender"))
        })
        .count()
}

/// The live children of `parent`: pid and stat fields.
fn children(parent: u32) -> Vec<(String, Vec<String>)> {
    let parent = parent.to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|pid| {
            let f = stat_fields(&pid).filter(|f| f.get(1) == Some(&parent))?;
            Some((pid, f))
        })
        .collect()
}

/// The kernel's clock ticks per second (USER_HZ).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

fn first_line_value(path: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// What the results are measured on: cores, CPU model, memory, kernel.
pub fn describe() -> Value {
    let mem_kib: f64 = first_line_value("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0.0);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": first_line_value("/proc/cpuinfo", "model name").unwrap_or_default(),
        "memory_gib": (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}
