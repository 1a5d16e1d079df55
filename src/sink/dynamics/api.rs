//! One Web API request: the OData headers, the retry loop with a fresh token after a
//! 401, and what an answer means (error text, service protection limits, refusals
//! that are the endpoint's and not the record's).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tracing::Instrument;

use super::{DynamicsSink, MAX_BODY_IN_REASON, SINK};
use crate::sink::http::{self, Finished, Step};
use crate::sink::mapping;
use crate::sink::Outcome;

/// A response read to its end.
pub(super) struct Read {
    /// Its Retry-After.
    pub(super) after: Option<Duration>,
    /// The value of the one header asked for (`""` without it).
    pub(super) header: String,
    pub(super) text: String,
}

impl DynamicsSink {
    pub(super) fn odata(
        &self,
        request: reqwest::RequestBuilder,
        token: &SecretString,
    ) -> reqwest::RequestBuilder {
        let mut headers = HeaderMap::new();
        headers.insert("OData-Version", HeaderValue::from_static("4.0"));
        headers.insert("OData-MaxVersion", HeaderValue::from_static("4.0"));
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        request.headers(headers).bearer_auth(token.expose_secret())
    }

    /// One Web API request with the retry loop: transport errors, 408, 429 and 5xx are
    /// retried; a 401 gets a fresh token once; any other answer is returned.
    pub(super) async fn request(
        &self,
        method: Method,
        url: &str,
        body: Option<&[u8]>,
        extra: &[(&'static str, &'static str)],
        customer: &str,
    ) -> Finished<Answer> {
        let span = tracing::info_span!("dynamics_request", customer = %customer);
        http::retrying(&self.retry, SINK, |attempt| {
            let method = method.clone();
            async move {
                let mut refreshed = false;
                loop {
                    let token = match self.bearer().await {
                        Ok(token) => token,
                        Err(error) => return error.into_step(),
                    };
                    let request = self.web_api_request(method.clone(), url, &token, body, extra);
                    let response = match request.send().await {
                        Ok(response) => response,
                        Err(e) => {
                            return Step::Retry {
                                after: None,
                                reason: self.transport_reason("Web API request", e),
                            }
                        }
                    };
                    if response.status() == StatusCode::UNAUTHORIZED && !refreshed {
                        tracing::info!(
                            customer,
                            attempt,
                            "Dataverse refused the access token; getting a new one."
                        );
                        self.forget(&token).await;
                        refreshed = true;
                        continue;
                    }
                    return self.answer(response, customer, attempt).await;
                }
            }
        })
        .instrument(span)
        .await
    }

    /// The request with the OData headers, the token, the `extra` headers and the
    /// JSON `body`, if any.
    fn web_api_request(
        &self,
        method: Method,
        url: &str,
        token: &SecretString,
        body: Option<&[u8]>,
        extra: &[(&'static str, &'static str)],
    ) -> reqwest::RequestBuilder {
        let mut request = self.odata(self.client.request(method, url), token);
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, "application/json; charset=utf-8")
                .body(body.to_vec());
        }
        request
    }

    /// Reads a response: a retry where `classify` says so, else the answer, both
    /// redacted; a service protection limit is logged.
    async fn answer(
        &self,
        response: reqwest::Response,
        customer: &str,
        attempt: u32,
    ) -> Step<Answer> {
        let status = response.status();
        let Read {
            after,
            header: entity,
            text,
        } = match self
            .read_to_end(response, "OData-EntityId", "reading the Dataverse response")
            .await
        {
            Ok(read) => read,
            Err(step) => return step,
        };
        if let Some((code, limit)) = service_protection(&text) {
            tracing::warn!(
                customer,
                attempt,
                code = %code,
                limit,
                retry_after_ms = after.map(|a| a.as_millis() as u64),
                "Dataverse service protection limit reached; waiting as told."
            );
        }
        match classify(status, after, &text) {
            Step::Retry { after, reason } => Step::Retry {
                after,
                reason: self.redact(reason),
            },
            _ => Step::Done(Answer {
                status,
                text: self.redact(text),
                entity,
            }),
        }
    }

    /// Reads `response` to its end, keeping its Retry-After and the value of
    /// `header`; a connection that breaks while `doing` so is worth a retry.
    pub(super) async fn read_to_end<T>(
        &self,
        response: reqwest::Response,
        header: impl reqwest::header::AsHeaderName,
        doing: &str,
    ) -> Result<Read, Step<T>> {
        let after = http::retry_after(response.headers());
        let header = response
            .headers()
            .get(header)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        match response.text().await {
            Ok(text) => Ok(Read {
                after,
                header,
                text,
            }),
            Err(e) => Err(Step::Retry {
                after,
                reason: self.transport_reason(doing, e),
            }),
        }
    }

    /// Why a final answer that is not a success refused `what`: the endpoint's fault
    /// (the leads wait) or this record's (it is rejected).
    pub(super) fn refusal(&self, answer: &Answer, what: &str) -> Outcome {
        let detail = error_text(&answer.text);
        let status = answer.status;
        if is_endpoint_refusal(status, &answer.text) {
            Outcome::EndpointFailed {
                reason: format!(
                    "Dataverse refused {what} ({status}): {detail}{}",
                    hint(status)
                ),
            }
        } else {
            Outcome::Rejected {
                reason: format!(
                    "Dataverse refused the lead ({status}): {detail}{}",
                    hint(status)
                ),
            }
        }
    }

    pub(super) fn log_service_protection(
        &self,
        body: &str,
        after: Option<Duration>,
        requests: usize,
    ) {
        if let Some((code, limit)) = service_protection(body) {
            tracing::warn!(
                requests,
                code = %code,
                limit,
                retry_after_ms = after.map(|a| a.as_millis() as u64),
                "Dataverse service protection limit reached; waiting as told."
            );
        }
    }
}

/// One final Web API answer.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) text: String,
    pub(super) entity: String,
}

/// A refusal that is the endpoint's, not the record's: credentials or privileges
/// (401 after a fresh token, 403), a wrong table, key or column (404, 405, a 400 that
/// names a property, key or segment the environment does not have).
pub(super) fn is_endpoint_refusal(status: StatusCode, body: &str) -> bool {
    if matches!(status.as_u16(), 401 | 403 | 404 | 405) {
        return true;
    }
    if status != StatusCode::BAD_REQUEST {
        return false;
    }
    let text = error_text(body).to_ascii_lowercase();
    [
        "could not find a property named",
        "resource not found for the segment",
        "is not an alternate key",
        "is not a valid key",
        "entity key",
        "does not exist on entity",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// `code: message` of a Web API error body `{"error":{"code":..,"message":..}}`, else the
/// start of the body.
pub(super) fn error_text(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let code = error.and_then(|e| e.get("code")).and_then(Value::as_str);
    let message = error.and_then(|e| e.get("message")).and_then(Value::as_str);
    match (code, message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (None, Some(message)) => message.to_owned(),
        _ if body.trim().is_empty() => "empty body".into(),
        _ => {
            let mut start: String = body.trim().chars().take(MAX_BODY_IN_REASON).collect();
            if body.trim().chars().count() > MAX_BODY_IN_REASON {
                start.push_str(mapping::TRUNCATION_MARKER);
            }
            start
        }
    }
}

/// What a person can do about a status, when it is not obvious.
pub(super) fn hint(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => " (a freshly issued token was refused: is the app registration an application user of this environment?)",
        StatusCode::FORBIDDEN => " (the application user lacks a security role that can create and update leads)",
        StatusCode::NOT_FOUND => " (check sink.dynamics.environment_url, api_version, and that key_attribute is an active alternate key of the lead table)",
        _ => "",
    }
}

/// The Dataverse service protection limits, by error code (hex as the Web API sends it,
/// or the signed decimal form of the SDK).
pub(super) fn service_protection_limit(code: &str) -> Option<&'static str> {
    match code.to_ascii_lowercase().as_str() {
        "0x80072322" | "-2147015902" => Some("number of requests per user in the 5-minute window"),
        "0x80072321" | "-2147015903" => {
            Some("combined execution time of requests per user in the 5-minute window")
        }
        "0x80072326" | "-2147015898" => {
            Some("concurrent requests per user (lower sink.dynamics.parallelism if this recurs)")
        }
        _ => None,
    }
}

/// The service protection limit a response body reports, if any.
pub(super) fn service_protection(body: &str) -> Option<(String, &'static str)> {
    let parsed: Value = serde_json::from_str(body).ok()?;
    let code = parsed.get("error")?.get("code")?.as_str()?;
    Some((code.to_owned(), service_protection_limit(code)?))
}

/// What a Web API answer to an upsert means: done, worth another try, or final.
pub(super) fn classify(status: StatusCode, after: Option<Duration>, body: &str) -> Step<()> {
    if status.is_success() {
        return Step::Done(());
    }
    let detail = error_text(body);
    if status == StatusCode::TOO_MANY_REQUESTS {
        let reason = match service_protection(body) {
            Some((code, limit)) => {
                format!("Dataverse throttled the upsert (429, service protection {code}: {limit})")
            }
            None => format!("Dataverse throttled the upsert (429: {detail})"),
        };
        return Step::Retry { after, reason };
    }
    if http::is_transient_status(status) {
        return Step::Retry {
            after,
            reason: format!("Dataverse answered {status}: {detail}"),
        };
    }
    Step::Fail {
        reason: format!(
            "Dataverse refused the lead ({status}): {detail}{}",
            hint(status)
        ),
    }
}
