//! A token bucket shared by every transfer in one direction, so an operator's cap holds for the
//! node as a whole.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Caps throughput at `rate` bytes per second, with bursts up to one second's worth.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Option<f64>,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// `None`: unlimited.
    pub fn new(rate: Option<u64>) -> Self {
        let rate = rate.map(|r| r as f64);
        Self {
            rate,
            state: Mutex::new((rate.unwrap_or(0.0), Instant::now())),
        }
    }

    /// Waits until `bytes` may pass. Debt is allowed (a piece larger than the bucket passes
    /// once the bucket has refilled), so large pieces never stall forever.
    pub async fn take(&self, bytes: usize) {
        let Some(rate) = self.rate else { return };
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let (tokens, last) = &mut *state;
            let now = Instant::now();
            *tokens = (*tokens + rate * now.duration_since(*last).as_secs_f64()).min(rate);
            *last = now;
            *tokens -= bytes as f64;
            if *tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-*tokens / rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_in_virtual_time() {
        let limiter = RateLimiter::new(Some(1000));
        let start = tokio::time::Instant::now();
        // 1000 bytes of burst, then 4000 more at 1000 B/s.
        for _ in 0..5 {
            limiter.take(1000).await;
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_secs(4), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        RateLimiter::new(None).take(usize::MAX).await;
    }
}
