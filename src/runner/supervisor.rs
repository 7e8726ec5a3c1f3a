//! One supervisor for both modes: take the serving lock (waiting as a
//! standby while another relay holds it), serve sessions under it, and act
//! on each session's end by its error's [`Action`]: stop on a definite
//! error, back off and serve again on a transient one. The backoff doubles
//! from 100 ms up to `cdc.max_backoff_ms` with up to 100 ms of jitter, and
//! starts again from 100 ms after a session that served for a minute.
//!
//! The lock is kept across session restarts (a transient failure does not
//! hand the table to a standby); a lost lock stops delivery at once (the
//! session is dropped) and is taken again before serving goes on.

use std::time::Duration;

use tokio::sync::watch;

use super::serving::ServingLock;
use crate::cdc::Cdc;
use crate::config::{Config, Mode};
use crate::database::Settings;
use crate::error::{Action, Error};
use crate::metrics::health::Phase;
use crate::metrics::{health, metrics};
use crate::poll::Poll;

/// The first backoff, and the one after a session that served a while.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A session that served this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// The relay a supervisor serves with.
pub(super) enum Service {
    /// CDC: one replication session at a time.
    Cdc(Box<Cdc>),
    /// Poll: one set of workers at a time.
    Poll(Poll),
}

impl Service {
    fn mode(&self) -> Mode {
        match self {
            Service::Cdc(_) => Mode::Cdc,
            Service::Poll(_) => Mode::Poll,
        }
    }

    async fn serve(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Error> {
        match self {
            Service::Cdc(c) => c.serve(shutdown).await,
            Service::Poll(p) => p.serve(shutdown).await,
        }
    }
}

/// The backoff between attempts.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: FIRST_BACKOFF,
            max: max.max(FIRST_BACKOFF),
        }
    }

    fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }

    /// The next delay (with jitter), doubling the one after it.
    fn step(&mut self, jitter: Duration) -> Duration {
        let delay = self.next + jitter;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// Waits `delay` unless shutdown comes first; returns whether it did.
async fn pause(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = shutdown.changed() => true,
    }
}

fn jitter() -> Duration {
    Duration::from_millis(rand::random::<u64>() % 100)
}

/// Serves `service` until shutdown (`Ok`) or a definite error (`Err`).
pub(super) async fn supervise(
    pg: &Settings,
    config: &Config,
    mut service: Service,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Error> {
    let mode = service.mode();
    let mut backoff = Backoff::new(Duration::from_millis(config.cdc.max_backoff_ms));
    let mut lock: Option<ServingLock> = None;
    loop {
        let held = match lock.as_mut() {
            Some(held) => held,
            None => {
                // Waits while another relay serves the table (a standby).
                health().set_phase(Phase::Connecting, "taking the serving lock");
                match ServingLock::acquire(pg, config, mode, shutdown).await {
                    Ok(Some(l)) => lock.insert(l),
                    Ok(None) => return Ok(()),
                    Err(e) if e.action() == Action::Stop => return Err(e),
                    Err(e) => {
                        health().set_phase(Phase::Reconnecting, e.to_string());
                        let delay = backoff.step(jitter());
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot take the serving lock; retrying");
                        if pause(delay, shutdown).await {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
        };
        let started = tokio::time::Instant::now();
        let outcome = tokio::select! {
            r = service.serve(shutdown) => Some(r),
            _ = held.lost() => None,
        };
        let e = match outcome {
            Some(Ok(())) => return Ok(()),
            Some(Err(e)) => e,
            None => {
                lock = None;
                Error::Transient(
                    "the serving lock was lost (its connection ended); stopped delivering until it is taken again".into(),
                )
            }
        };
        match e.action() {
            Action::Stop => return Err(e),
            Action::Reconnect => {
                if *shutdown.borrow() {
                    tracing::info!(error = %e, "stopped during a session restart");
                    return Ok(());
                }
                health().set_phase(Phase::Reconnecting, e.to_string());
                metrics()
                    .reconnects
                    .with_label_values(&[mode.as_str()])
                    .inc();
                if started.elapsed() > HEALTHY_SESSION {
                    backoff.reset();
                }
                let delay = backoff.step(jitter());
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "session ended; reconnecting");
                if pause(delay, shutdown).await {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let zero = Duration::ZERO;
        let steps: Vec<u128> = (0..5).map(|_| b.step(zero).as_millis()).collect();
        assert_eq!(steps, [100, 200, 400, 500, 500]);
        assert_eq!(
            b.step(Duration::from_millis(7)).as_millis(),
            507,
            "jitter is added"
        );
        b.reset();
        assert_eq!(b.step(zero).as_millis(), 100);
    }
}
