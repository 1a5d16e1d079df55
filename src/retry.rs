//! Back-off shared by every retry loop: capped exponential with full jitter.

use std::time::Duration;

use rand::Rng;

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
