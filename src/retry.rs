//! Back-off shared by every retry loop: capped exponential with full jitter, and the
//! loop itself for storage requests.

use serde::Deserialize;
use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

/// Why [`with_backoff`] gave up.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// The last error: not retryable, or the attempts ran out.
    Failed { error: E, attempts: u32 },
    /// Cancelled during a back-off.
    Cancelled,
}

/// Runs `attempt_once` until it succeeds, an error is not `retryable`, `settings`'
/// attempts run out, or `cancel` fires during a back-off. `on_retry(attempt, delay,
/// error)` is called before each back-off (to log it).
pub async fn with_backoff<T, E, F, Fut>(
    settings: &RetrySettings,
    cancel: Option<&CancellationToken>,
    mut attempt_once: F,
    retryable: impl Fn(&E) -> bool,
    on_retry: impl Fn(u32, Duration, &E),
) -> Result<T, GaveUp<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let error = match attempt_once().await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if !retryable(&error) || attempt >= settings.max_attempts {
            return Err(GaveUp::Failed {
                error,
                attempts: attempt,
            });
        }
        let delay = backoff(
            attempt - 1,
            settings.initial_backoff,
            settings.max_backoff,
            &mut rand::thread_rng(),
        );
        on_retry(attempt, delay, &error);
        // A back-off is a deliberate wait: it beats the watchdog (`progress::wait`).
        match cancel {
            Some(cancel) => tokio::select! {
                _ = crate::progress::wait(delay) => {}
                _ = cancel.cancelled() => return Err(GaveUp::Cancelled),
            },
            None => crate::progress::wait(delay).await,
        }
    }
}

/// The delay before retry number `retry` (0 for the first retry): a uniform draw from
/// `[0, min(max, initial * 2^retry)]` ("full jitter"), so that many clients failing
/// together do not retry together.
pub fn backoff(retry: u32, initial: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let ceiling = initial
        .checked_mul(2u32.saturating_pow(retry.min(31)))
        .unwrap_or(max)
        .min(max);
    let ceiling_ms = ceiling.as_millis().min(u64::MAX as u128) as u64;
    Duration::from_millis(rng.gen_range(0..=ceiling_ms))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts per request before the poll gives up (and the next poll tries again).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First back-off; doubles per attempt, with full jitter.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Cap of one back-off.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl RetrySettings {
    /// Checks the retry settings found under `prefix` (e.g. `sink.webhook.retry`).
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        let bad = |key: &str, why: String| Err((format!("{prefix}.{key}"), why));
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1".into());
        }
        if self.initial_backoff.is_zero() {
            return bad("initial_backoff", "must be greater than zero".into());
        }
        if self.max_backoff < self.initial_backoff {
            return bad(
                "max_backoff",
                format!("must not be smaller than {prefix}.initial_backoff"),
            );
        }
        Ok(())
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: default_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

fn default_attempts() -> u32 {
    6
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_and_never_exceeds_its_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for retry in 0..64 {
            let ceiling = (initial * 2u32.saturating_pow(retry.min(31))).min(max);
            for _ in 0..50 {
                let d = backoff(retry, initial, max, &mut rng);
                assert!(d <= ceiling, "retry {retry}: {d:?} > {ceiling:?}");
            }
        }
    }

    fn quick(max_attempts: u32) -> RetrySettings {
        RetrySettings {
            max_attempts,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn retryable_errors_are_retried_until_success_or_the_last_attempt() {
        let calls = std::cell::Cell::new(0);
        let retries = std::cell::Cell::new(0);
        let result: Result<u32, GaveUp<&str>> = with_backoff(
            &quick(5),
            None,
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move {
                    if n < 3 {
                        Err("busy")
                    } else {
                        Ok(n)
                    }
                }
            },
            |_| true,
            |_, _, _| retries.set(retries.get() + 1),
        )
        .await;
        assert_eq!(result.unwrap(), 3);
        assert_eq!(retries.get(), 2);

        let result: Result<(), _> = with_backoff(
            &quick(4),
            None,
            || async { Err("busy") },
            |_| true,
            |_, _, _| {},
        )
        .await;
        assert!(matches!(
            result,
            Err(GaveUp::Failed {
                error: "busy",
                attempts: 4
            })
        ));
    }

    #[tokio::test]
    async fn an_error_that_is_not_retryable_stops_at_once_and_cancel_stops_a_back_off() {
        let result: Result<(), _> = with_backoff(
            &quick(9),
            None,
            || async { Err("denied") },
            |_| false,
            |_, _, _| {},
        )
        .await;
        assert!(matches!(result, Err(GaveUp::Failed { attempts: 1, .. })));

        let cancel = CancellationToken::new();
        cancel.cancel();
        let slow = RetrySettings {
            initial_backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(60),
            ..quick(9)
        };
        let result: Result<(), GaveUp<&str>> = with_backoff(
            &slow,
            Some(&cancel),
            || async { Err("busy") },
            |_| true,
            |_, _, _| {},
        )
        .await;
        assert!(matches!(result, Err(GaveUp::Cancelled)));
    }

    #[test]
    fn backoff_is_jittered_not_constant() {
        let mut rng = StdRng::seed_from_u64(1);
        let draws: std::collections::HashSet<_> = (0..20)
            .map(|_| {
                backoff(
                    4,
                    Duration::from_millis(100),
                    Duration::from_secs(10),
                    &mut rng,
                )
            })
            .collect();
        assert!(draws.len() > 10);
    }
}
