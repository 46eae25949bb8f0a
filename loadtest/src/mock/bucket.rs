//! The mock's own tokens-per-minute limit, shaped like an Azure OpenAI provisioned (PTU)
//! deployment: a token bucket of `tpm` tokens refilled continuously at `tpm / 60` per second.
//! A request costs its prompt tokens plus the completion tokens it asks for, taken up front;
//! when the bucket cannot cover that the request gets 429 with how long to wait.
//!
//! Time is `tokio::time::Instant`, so tests can drive refills with `time::pause()`.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// The outcome of asking the bucket for tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Admission {
    /// Tokens taken; what is left and the share of capacity in use, in percent.
    Admitted {
        remaining: u64,
        utilization_pct: f64,
    },
    /// Not enough tokens; the wait until enough will have refilled (at least 1 ms).
    Limited { retry_after: Duration },
}

pub(crate) struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    /// Tokens available at the instant; refilled lazily on each `take`.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket of `tpm` tokens.
    pub(crate) fn new(tpm: u64) -> Self {
        let capacity = tpm as f64;
        TokenBucket {
            capacity,
            per_sec: capacity / 60.0,
            state: Mutex::new((capacity, Instant::now())),
        }
    }

    /// Takes `cost` tokens if the bucket holds them, else says when it will.
    pub(crate) fn take(&self, cost: u64) -> Admission {
        let now = Instant::now();
        let cost = cost as f64;
        let mut state = self.state.lock();
        let (level, last) = *state;
        let level =
            (level + now.duration_since(last).as_secs_f64() * self.per_sec).min(self.capacity);
        if level >= cost {
            let left = level - cost;
            *state = (left, now);
            let utilization_pct = if self.capacity > 0.0 {
                (self.capacity - left) / self.capacity * 100.0
            } else {
                0.0
            };
            Admission::Admitted {
                remaining: left as u64,
                utilization_pct,
            }
        } else {
            *state = (level, now);
            let wait_ms = if self.per_sec > 0.0 {
                ((cost - level) / self.per_sec * 1000.0).ceil() as u64
            } else {
                60_000
            };
            Admission::Limited {
                retry_after: Duration::from_millis(wait_ms.max(1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket admits up to capacity, refuses with the exact refill wait, then refills.
    #[tokio::test(start_paused = true)]
    async fn refills_continuously() {
        let bucket = TokenBucket::new(6000); // 100 tokens/s
        assert_eq!(
            bucket.take(1500),
            Admission::Admitted {
                remaining: 4500,
                utilization_pct: 25.0
            }
        );
        assert!(matches!(
            bucket.take(4500),
            Admission::Admitted { remaining: 0, .. }
        ));
        assert_eq!(
            bucket.take(50),
            Admission::Limited {
                retry_after: Duration::from_millis(500)
            }
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(matches!(
            bucket.take(50),
            Admission::Admitted { remaining: 0, .. }
        ));
    }
}
