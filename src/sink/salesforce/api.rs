//! One REST API call: the request, what its answer means, `Sforce-Limit-Info`, the
//! retry loop with re-authentication, and the pause for the org's daily API limit.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::Value;

use super::auth::{AuthError, Session};
use super::{
    transport_reason, SalesforceSink, API_LIMIT_PAUSES, API_USAGE_WARN_PERCENT,
    REQUEST_LIMIT_EXCEEDED, SINK,
};
use crate::sink::http::{is_transient_status, retry_after, retrying, Finished, Step};
use crate::sink::mapping::truncate;

/// One element of a request-level error body.
#[derive(Debug, Deserialize)]
pub(super) struct ApiError {
    #[serde(rename = "errorCode", default)]
    pub(super) error_code: String,
    #[serde(default)]
    pub(super) message: String,
    #[serde(default)]
    pub(super) fields: Vec<String>,
}

pub(super) fn describe_errors<'a>(
    errors: impl Iterator<Item = (&'a str, &'a str, &'a [String])>,
) -> String {
    errors
        .map(|(code, message, fields)| {
            let mut text = format!("{code}: {message}");
            if !fields.is_empty() {
                text.push_str(&format!(" (fields: {})", fields.join(", ")));
            }
            text
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub(super) fn snippet(body: &str) -> String {
    let (cut, _) = truncate(body.trim(), 300);
    if cut.is_empty() {
        "empty body".into()
    } else {
        cut
    }
}

/// The `[{"errorCode", "message"}]` of a response as text, or the start of the body.
pub(super) fn describe_body(body: &str) -> (Vec<ApiError>, String) {
    match serde_json::from_str::<Vec<ApiError>>(body) {
        Ok(errors) if !errors.is_empty() => {
            let text = describe_errors(errors.iter().map(|e| {
                (
                    e.error_code.as_str(),
                    e.message.as_str(),
                    e.fields.as_slice(),
                )
            }));
            (errors, text)
        }
        _ => (Vec::new(), snippet(body)),
    }
}

/// What one API response means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Ok,
    /// 401: the token expired or was revoked; authenticate again.
    SessionInvalid,
    /// `REQUEST_LIMIT_EXCEEDED`: the org's daily limit; the sink pauses, no retries.
    ApiLimit {
        reason: String,
    },
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    Fail {
        reason: String,
    },
}

pub(super) fn classify(status: StatusCode, after: Option<Duration>, body: &str) -> Verdict {
    if status.is_success() {
        return Verdict::Ok;
    }
    if status == StatusCode::UNAUTHORIZED {
        return Verdict::SessionInvalid;
    }
    let (errors, text) = describe_body(body);
    let code = status.as_u16();
    if status == StatusCode::FORBIDDEN
        && errors
            .iter()
            .any(|e| e.error_code == REQUEST_LIMIT_EXCEEDED)
    {
        return Verdict::ApiLimit {
            reason: format!("Salesforce API limit reached (HTTP {code}): {text}"),
        };
    }
    if is_transient_status(status) {
        return Verdict::Retry {
            after,
            reason: format!("Salesforce answered HTTP {code}: {text}"),
        };
    }
    Verdict::Fail {
        reason: format!("Salesforce refused the request (HTTP {code}): {text}"),
    }
}

/// `(used, limit)` from `Sforce-Limit-Info: api-usage=18/15000; per-app-api-usage=...`.
pub(super) fn api_usage(header: &str) -> Option<(u64, u64)> {
    header
        .split([';', ','])
        .map(str::trim)
        .find_map(|part| part.strip_prefix("api-usage="))
        .and_then(|usage| {
            let (used, limit) = usage.split_once('/')?;
            Some((used.trim().parse().ok()?, limit.trim().parse().ok()?))
        })
}

pub(super) fn log_api_usage(headers: &HeaderMap) {
    let Some((used, limit)) = headers
        .get("sforce-limit-info")
        .and_then(|v| v.to_str().ok())
        .and_then(api_usage)
    else {
        return;
    };
    tracing::debug!(sink = SINK, used, limit, "Salesforce API usage.");
    if limit > 0 && used * 100 > limit * API_USAGE_WARN_PERCENT {
        tracing::warn!(
            sink = SINK,
            used,
            limit,
            percent = used * 100 / limit,
            "Salesforce API usage is above 80% of the org's daily limit."
        );
    }
}

impl SalesforceSink {
    pub(super) async fn send_once(
        &self,
        session: &Session,
        method: &Method,
        path: &str,
        body: Option<&Value>,
        allow_save: bool,
    ) -> Result<(StatusCode, HeaderMap, String), String> {
        let url = format!("{}{path}", session.instance_url);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(session.token.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(body) = body {
            request = request.json(body);
        }
        if allow_save {
            request = request.header("Sforce-Duplicate-Rule-Header", "allowSave=true");
        }
        let response = request.send().await.map_err(|e| transport_reason(&e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.map_err(|e| transport_reason(&e))?;
        log_api_usage(&headers);
        Ok((status, headers, text))
    }

    /// The rest of a `REQUEST_LIMIT_EXCEEDED` pause, if one is running.
    pub(super) fn api_limit_remaining(&self) -> Option<Duration> {
        let until = (*self.limited_until.lock().expect("not poisoned"))?;
        until.checked_duration_since(Instant::now())
    }

    /// Starts a pause for `REQUEST_LIMIT_EXCEEDED`: counted and logged once per pause.
    pub(super) fn pause_for_api_limit(&self, reason: &str) -> Duration {
        let mut until = self.limited_until.lock().expect("not poisoned");
        let now = Instant::now();
        if let Some(running) = until.filter(|u| *u > now) {
            return running - now;
        }
        *until = Some(now + self.api_limit_pause);
        API_LIMIT_PAUSES.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            sink = SINK,
            pause_s = self.api_limit_pause.as_secs(),
            %reason,
            "Salesforce org is out of API calls (REQUEST_LIMIT_EXCEEDED); the sink pauses for sink.salesforce.api_limit_pause, the leads wait."
        );
        self.api_limit_pause
    }

    /// One API call with the retry loop; a 401 re-authenticates once per attempt.
    /// `REQUEST_LIMIT_EXCEEDED` is not retried: it pauses the sink (`GaveUp` with the
    /// pause), and no call is made while the pause runs.
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        allow_save: bool,
    ) -> Finished<String> {
        if let Some(left) = self.api_limit_remaining() {
            return Finished::GaveUp {
                after: Some(left),
                reason: "Salesforce org is out of API calls (REQUEST_LIMIT_EXCEEDED); the sink is paused".into(),
            };
        }
        let finished = self.call_retrying(method, path, body, allow_save).await;
        match finished {
            Finished::Done(Ok(text)) => Finished::Done(text),
            Finished::Done(Err(reason)) => Finished::GaveUp {
                after: Some(self.pause_for_api_limit(&reason)),
                reason,
            },
            Finished::GaveUp { after, reason } => Finished::GaveUp { after, reason },
            Finished::Failed { reason } => Finished::Failed { reason },
        }
    }

    /// `Done(Err(reason))` is `REQUEST_LIMIT_EXCEEDED`, which ends the loop at once.
    pub(super) async fn call_retrying(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        allow_save: bool,
    ) -> Finished<Result<String, String>> {
        retrying(&self.retry, SINK, |_attempt| {
            let method = method.clone();
            async move {
                let mut reauthenticated = false;
                loop {
                    let session = match self.session().await {
                        Ok(s) => s,
                        Err(AuthError::Transient(reason)) => {
                            return Step::Retry {
                                after: None,
                                reason,
                            }
                        }
                        Err(AuthError::Refused(reason)) => {
                            // A config problem, not a lead problem: the leads wait in state
                            // (no dead letters) until the credentials are corrected.
                            tracing::error!(sink = SINK, %reason, "Salesforce refused the credentials; the leads wait until they are corrected.");
                            // An endpoint failure: the pipeline pauses the sink and says
                            // why in /readyz and the metrics until the login works.
                            return Step::Fail { reason };
                        }
                    };
                    let (status, headers, text) =
                        match self.send_once(&session, &method, path, body, allow_save).await {
                            Ok(parts) => parts,
                            Err(reason) => {
                                return Step::Retry {
                                    after: None,
                                    reason: self.scrub(reason, Some(&session)),
                                }
                            }
                        };
                    match classify(status, retry_after(&headers), &text) {
                        Verdict::Ok => return Step::Done(Ok(text)),
                        Verdict::ApiLimit { reason } => {
                            return Step::Done(Err(self.scrub(reason, Some(&session))))
                        }
                        Verdict::SessionInvalid if !reauthenticated => {
                            tracing::info!(sink = SINK, "Salesforce session expired or was revoked; authenticating again.");
                            self.invalidate(&session).await;
                            reauthenticated = true;
                        }
                        Verdict::SessionInvalid => {
                            let (_, described) = describe_body(&text);
                            return Step::Fail {
                                reason: self.scrub(
                                    format!("Salesforce refused a fresh access token (HTTP 401): {described}"),
                                    Some(&session),
                                ),
                            };
                        }
                        Verdict::Retry { after, reason } => {
                            return Step::Retry {
                                after,
                                reason: self.scrub(reason, Some(&session)),
                            }
                        }
                        Verdict::Fail { reason } => {
                            return Step::Fail {
                                reason: self.scrub(reason, Some(&session)),
                            }
                        }
                    }
                }
            }
        })
        .await
    }
}
