//! `--rate`: a token bucket that lets a replay send at most `rate` events a
//! second. It starts with one token and holds at most a tenth of a second
//! of them (at least one), so `n` events take at least `(n - 1) / rate`
//! seconds and a stall (Kafka slow to acknowledge) is never made up for by
//! a burst of more than a tenth of a second's worth.

use std::time::{Duration, Instant};

/// The rate limiter of one replay.
#[derive(Clone, Debug)]
pub struct Pace {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Pace {
    /// At most `rate` events a second (a positive, finite number), from
    /// `now`.
    pub fn new(rate: f64, now: Instant) -> Pace {
        Pace {
            rate,
            capacity: (rate / 10.0).max(1.0),
            tokens: 1.0,
            last: now,
        }
    }

    /// Takes the next event's token if there is one (`Duration::ZERO`: send
    /// it now); otherwise how long until there is one (call again then).
    pub fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Duration::ZERO
        } else {
            // At least a microsecond, so a caller never spins.
            Duration::from_secs_f64(((1.0 - self.tokens) / self.rate).max(1e-6))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `n` events through `pace` on a simulated clock; returns how
    /// long the last one waited for.
    fn run(pace: &mut Pace, start: Instant, n: usize) -> Duration {
        let mut now = start;
        for _ in 0..n {
            loop {
                let wait = pace.take(now);
                if wait.is_zero() {
                    break;
                }
                now += wait;
            }
        }
        now - start
    }

    #[test]
    fn n_events_take_at_least_n_minus_one_intervals() {
        let start = Instant::now();
        for (rate, n) in [(10.0, 20), (1.0, 3), (1000.0, 5000), (0.5, 2), (3.0, 1)] {
            let took = run(&mut Pace::new(rate, start), start, n).as_secs_f64();
            let least = (n as f64 - 1.0) / rate;
            assert!(took >= least - 1e-6, "{n} at {rate}/s took {took}s");
            // And not much more: the limiter paces, it does not stall.
            let burst = (rate / 10.0).max(1.0);
            assert!(
                took <= least + 1.0 / rate + 1e-3,
                "{n} at {rate}/s: {took}s (burst {burst})"
            );
        }
    }

    #[test]
    fn a_stall_buys_at_most_a_tenth_of_a_second_of_burst() {
        let start = Instant::now();
        let mut pace = Pace::new(100.0, start);
        assert!(pace.take(start).is_zero());
        // An hour without sending: ten tokens, not 360,000.
        let later = start + Duration::from_secs(3600);
        let free = (0..100).take_while(|_| pace.take(later).is_zero()).count();
        assert_eq!(free, 10);
        let wait = pace.take(later);
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(10),
            "{wait:?}"
        );
    }
}
