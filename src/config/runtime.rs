//! The `[runtime]` section: the process's async runtime.

use serde::Deserialize;

use super::{range, ConfigError};

/// The async runtime the relay runs on.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Tokio worker threads (env `OUTBOX_WORKER_THREADS`). One by default:
    /// the CDC stream is one ordered sequence, the heavy lifting happens in
    /// librdkafka's own threads and in PostgreSQL, and a second worker only
    /// adds cross-thread wake-ups (measured on 2 cores: one worker drains
    /// about 40 % faster with about 35 % less CPU; poll mode with 4 workers
    /// is unchanged). More may help poll mode with high `poll.concurrency`
    /// on a large machine.
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { worker_threads: 1 }
    }
}

impl RuntimeConfig {
    /// Checks every field.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        range("runtime.worker_threads", self.worker_threads as u64, 1, 256)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{env, valid};
    use super::super::Config;

    #[test]
    fn worker_threads_default_to_one_and_are_checked() {
        let mut c = valid();
        assert_eq!(c.runtime.worker_threads, 1);
        c.apply_env(env(&[("OUTBOX_WORKER_THREADS", "4")])).unwrap();
        assert_eq!(c.runtime.worker_threads, 4);
        c.validate().unwrap();
        let e = c
            .apply_env(env(&[("OUTBOX_WORKER_THREADS", "many")]))
            .unwrap_err();
        assert_eq!(e.field, "OUTBOX_WORKER_THREADS");
        let mut c = valid();
        c.runtime = Config::from_toml("[runtime]\nworker_threads = 0\n")
            .unwrap()
            .runtime;
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "runtime.worker_threads");
        assert!(e.problem.contains("1..=256"), "{}", e.problem);
    }
}
