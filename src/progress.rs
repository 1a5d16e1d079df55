//! A process-wide heartbeat for the systemd watchdog: every step that shows the daemon
//! is working beats it (a page read, a batch delivered, a CRM request answered, a
//! second of a deliberate wait: a back-off, a throttle pause), so a slow but healthy
//! poll is never taken for a hung one. It lives on the ground floor so that the sinks
//! and the retry loops can beat it without knowing about the service.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Milliseconds since the Unix epoch of the last beat (0: none yet).
static LAST: AtomicI64 = AtomicI64::new(0);

/// The longest stretch a deliberate wait goes without a beat.
const WAIT_SLICE: Duration = Duration::from_secs(1);

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Records a sign of progress.
pub fn beat() {
    LAST.store(now_ms(), Ordering::Relaxed);
}

/// Time since the last beat (`None` before the first).
pub fn since_last() -> Option<Duration> {
    match LAST.load(Ordering::Relaxed) {
        0 => None,
        last => Some(Duration::from_millis(
            now_ms().saturating_sub(last).max(0) as u64
        )),
    }
}

/// Sleeps for `delay`, beating at least once a second: a wait that leadsync chose (a
/// back-off, a `Retry-After`) is progress, however long it is.
pub async fn wait(delay: Duration) {
    let mut left = delay;
    beat();
    while !left.is_zero() {
        let slice = left.min(WAIT_SLICE);
        tokio::time::sleep(slice).await;
        beat();
        left -= slice;
    }
}
