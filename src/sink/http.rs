//! What every HTTP sink shares: the client, the URL check, Retry-After, and one retry
//! loop, so each sink only says what a response means.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::HeaderMap;

use crate::retry::backoff;
use crate::retry::RetrySettings;

/// Builds the HTTP client of a sink: rustls, a timeout on every request, our user agent.
pub fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    builder(timeout)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// As [`client`], following no redirect: a redirect would carry a request's
/// signature and custom headers to another URL (and a 301/302/303 turns a POST into a
/// GET without its body), so the sink sees the 3xx and says so instead.
pub fn client_without_redirects(timeout: Duration) -> Result<reqwest::Client, String> {
    builder(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

fn builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("leadsync/", env!("CARGO_PKG_VERSION")))
}

/// Parses a CRM URL; `http://` is refused unless `allow_http` (tests and local fakes).
pub fn check_url(key: &str, url: &str, allow_http: bool) -> Result<reqwest::Url, (String, String)> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| (key.to_owned(), format!("not a URL: {e}")))?;
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if allow_http => Ok(parsed),
        "http" => Err((
            key.to_owned(),
            "http:// is refused: leads carry personal data (set allow_http = true only for local tests)".into(),
        )),
        other => Err((key.to_owned(), format!("unsupported scheme {other}:// (use https://)"))),
    }
}

/// `Retry-After` in seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// 408, 429 and 5xx are worth another try; other statuses are not.
pub fn is_transient_status(status: reqwest::StatusCode) -> bool {
    status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

static RETRIES: AtomicU64 = AtomicU64::new(0);

/// CRM requests retried by [`retrying`] since the process started (for metrics).
pub fn retries_total() -> u64 {
    RETRIES.load(Ordering::Relaxed)
}

/// What one HTTP answer means for a lead, for the sinks that post one lead (or one
/// message) per request: the webhook and the alert sinks.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Transient: try again (after `after`, when the receiver said).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The endpoint, not the lead, is wrong: our credentials refused (401, 403), the
    /// receiver gone (404, 410: a deleted flow, a changed URL), or a redirect. Nothing
    /// is wrong with the lead, so it waits for the configuration to be fixed instead
    /// of becoming a dead letter (`Outcome::EndpointFailed`).
    Endpoint {
        reason: String,
    },
    /// The receiver refuses this lead for good.
    Reject {
        reason: String,
    },
}

impl Verdict {
    /// The attempt's step for [`retrying`]: an endpoint failure ends the loop at once
    /// (as `Done(Err(reason))`, for the sink to answer `EndpointFailed`).
    pub fn step(self) -> Step<Result<(), String>> {
        match self {
            Verdict::Delivered => Step::Done(Ok(())),
            Verdict::Endpoint { reason } => Step::Done(Err(reason)),
            Verdict::Retry { after, reason } => Step::Retry { after, reason },
            Verdict::Reject { reason } => Step::Fail { reason },
        }
    }
}

/// `HTTP 404 Not Found`, or `HTTP 599` for a status without a canonical reason.
pub fn status_text(status: reqwest::StatusCode) -> String {
    match status.canonical_reason() {
        Some(words) => format!("HTTP {} {words}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

/// A transport error with its causes, without the URL (its query or path may hold a
/// credential); a timeout names `timeout_key`, the setting that bounds it.
pub fn transport_reason(e: reqwest::Error, timeout: Duration, timeout_key: &str) -> String {
    if e.is_timeout() {
        return format!(
            "no response within {} ({timeout_key})",
            humantime::format_duration(timeout)
        );
    }
    let e = e.without_url();
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    reason
}

/// The result of one attempt, as the sink classifies it.
#[derive(Debug)]
pub enum Step<T> {
    Done(T),
    /// Worth another try (after `after`, when the server said).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// Permanent for this request.
    Fail {
        reason: String,
    },
}

/// The result of all attempts.
#[derive(Debug, PartialEq, Eq)]
pub enum Finished<T> {
    Done(T),
    /// Still failing transiently; the pipeline offers the leads again later.
    GaveUp {
        after: Option<Duration>,
        reason: String,
    },
    Failed {
        reason: String,
    },
}

/// Runs `attempt` up to `retry.max_attempts` times with jittered back-off. A
/// `Retry-After` is honoured exactly; one longer than `retry.max_backoff` ends the
/// loop at once (the leads wait in state instead of holding the poll).
pub async fn retrying<T, F, Fut>(retry: &RetrySettings, sink: &str, mut attempt: F) -> Finished<T>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Step<T>>,
{
    let mut n = 0;
    loop {
        n += 1;
        let answered = attempt(n).await;
        // An answer, even a refusal, is progress for the watchdog.
        crate::progress::beat();
        let (after, reason) = match answered {
            Step::Done(value) => return Finished::Done(value),
            Step::Fail { reason } => return Finished::Failed { reason },
            Step::Retry { after, reason } => (after, reason),
        };
        let too_long = after.is_some_and(|a| a > retry.max_backoff);
        if n >= retry.max_attempts || too_long {
            return Finished::GaveUp { after, reason };
        }
        RETRIES.fetch_add(1, Ordering::Relaxed);
        let delay = after.unwrap_or_else(|| {
            backoff(
                n - 1,
                retry.initial_backoff,
                retry.max_backoff,
                &mut rand::thread_rng(),
            )
        });
        tracing::warn!(sink, attempt = n, delay_ms = delay.as_millis() as u64, %reason, "CRM request failed; retrying.");
        crate::progress::wait(delay).await;
    }
}

/// `": <the body's first max characters>"` for a refusal's reason, or nothing for an
/// empty body.
pub fn quoted(body: &str, max: usize) -> String {
    match body.trim() {
        "" => String::new(),
        body => format!(": {}", super::mapping::truncate(body, max).0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> RetrySettings {
        RetrySettings {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(50),
        }
    }

    #[test]
    fn plain_http_is_refused_unless_allowed() {
        assert!(check_url("sink.webhook.url", "http://x.test/", false)
            .unwrap_err()
            .1
            .contains("refused"));
        assert!(check_url("sink.webhook.url", "http://x.test/", true).is_ok());
        assert!(check_url("sink.webhook.url", "https://x.test/", false).is_ok());
        assert!(check_url("sink.webhook.url", "ftp://x.test/", true).is_err());
    }

    #[test]
    fn retry_after_reads_seconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_until_it_succeeds() {
        let result = retrying(&quick(), "t", |n| async move {
            if n < 3 {
                Step::Retry {
                    after: None,
                    reason: "503".into(),
                }
            } else {
                Step::Done(n)
            }
        })
        .await;
        assert_eq!(result, Finished::Done(3));
    }

    #[tokio::test]
    async fn attempts_are_capped_and_a_permanent_failure_is_not_retried() {
        let mut calls = 0;
        let gave_up: Finished<()> = retrying(&quick(), "t", |_| {
            calls += 1;
            async {
                Step::Retry {
                    after: None,
                    reason: "503".into(),
                }
            }
        })
        .await;
        assert!(matches!(gave_up, Finished::GaveUp { .. }));
        assert_eq!(calls, 3);
        let failed: Finished<()> = retrying(&quick(), "t", |_| async {
            Step::Fail {
                reason: "400".into(),
            }
        })
        .await;
        assert_eq!(
            failed,
            Finished::Failed {
                reason: "400".into()
            }
        );
    }

    #[tokio::test]
    async fn a_retry_after_longer_than_the_cap_ends_the_loop_at_once() {
        let mut calls = 0;
        let result: Finished<()> = retrying(&quick(), "t", |_| {
            calls += 1;
            async {
                Step::Retry {
                    after: Some(Duration::from_secs(60)),
                    reason: "429".into(),
                }
            }
        })
        .await;
        assert_eq!(calls, 1);
        assert_eq!(
            result,
            Finished::GaveUp {
                after: Some(Duration::from_secs(60)),
                reason: "429".into()
            }
        );
    }
}
