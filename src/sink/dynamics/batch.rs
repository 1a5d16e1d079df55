//! `$batch`: the multipart body of up to `batch_size` requests, one attempt and its
//! retries, the split in halves of a `$batch` refused as a whole, and the multipart
//! response read back in order.

use std::collections::VecDeque;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;
use secrecy::SecretString;

use super::api::{classify, error_text, is_endpoint_refusal, Answer, Read};
use super::{DynamicsSink, SINK};
use crate::sink::http::{self, Finished, Step};
use crate::sink::Outcome;

impl DynamicsSink {
    /// Sends `parts` as one `$batch` until every part has a final answer or the retries
    /// run out. Parts answered 408/429/5xx go again in the next attempt (after the
    /// longest `Retry-After` among them); a `$batch` refused as a whole for a reason that
    /// is not the endpoint's (400 malformed, 413 too large) is split in halves and each
    /// half sent on its own, down to one request, whose refusal is then its own: one bad
    /// record never takes the others down. Returns (input index, outcome) pairs.
    pub(super) async fn send_parts(&self, parts: Vec<Part>) -> Vec<(usize, Outcome)> {
        let mut outcomes = Vec::with_capacity(parts.len());
        let mut groups = VecDeque::from([parts]);
        while let Some(group) = groups.pop_front() {
            let pending = StdMutex::new(group);
            let finished = StdMutex::new(Vec::new());
            let result = http::retrying(&self.retry, SINK, |_| {
                self.attempt_batch(&pending, &finished)
            })
            .await;
            outcomes.extend(unpoisoned(finished.into_inner()));
            let mut pending = unpoisoned(pending.into_inner());
            match result {
                Finished::Done(BatchEnd::Answered) => {}
                Finished::Done(BatchEnd::Split) => {
                    let second = pending.split_off(pending.len() / 2);
                    groups.push_front(second);
                    groups.push_front(pending);
                }
                Finished::GaveUp { after, reason } => {
                    outcomes.extend(pending.iter().map(|p| {
                        (
                            p.index,
                            Outcome::RetryLater {
                                after,
                                reason: reason.clone(),
                            },
                        )
                    }));
                }
                Finished::Failed { reason } => {
                    outcomes.extend(pending.iter().map(|p| {
                        (
                            p.index,
                            Outcome::EndpointFailed {
                                reason: reason.clone(),
                            },
                        )
                    }));
                }
            }
        }
        outcomes
    }

    /// One attempt of a `$batch` of the parts still pending: a 401 gets a fresh token
    /// once; final answers move to `finished`, the rest stay pending.
    pub(super) async fn attempt_batch(
        &self,
        pending: &StdMutex<Vec<Part>>,
        finished: &StdMutex<Vec<(usize, Outcome)>>,
    ) -> Step<BatchEnd> {
        let mut refreshed = false;
        loop {
            let parts = lock(pending).clone();
            if parts.is_empty() {
                return Step::Done(BatchEnd::Answered);
            }
            let token = match self.bearer().await {
                Ok(token) => token,
                Err(error) => return error.into_step(),
            };
            let response = match self.post_batch(&token, &parts).await {
                Ok(response) => response,
                Err(reason) => {
                    return Step::Retry {
                        after: None,
                        reason,
                    }
                }
            };
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                tracing::info!(
                    requests = parts.len(),
                    "Dataverse refused the access token; getting a new one."
                );
                self.forget(&token).await;
                refreshed = true;
                continue;
            }
            let Read {
                after,
                header: content_type,
                text,
            } = match self
                .read_to_end(
                    response,
                    CONTENT_TYPE,
                    "reading the Dataverse $batch response",
                )
                .await
            {
                Ok(read) => read,
                Err(step) => return step,
            };
            if !status.is_success() {
                return self.batch_refused(&parts, status, after, text, pending, finished);
            }
            let answers = match parse_batch_response(&content_type, &text) {
                Ok(answers) => answers,
                Err(reason) => {
                    return Step::Retry {
                        after: None,
                        reason: self.redact(reason),
                    }
                }
            };
            let (retry, reauth) = self.take_answers(parts, &answers, refreshed, pending, finished);
            if reauth {
                self.forget(&token).await;
                refreshed = true;
                continue;
            }
            return match retry {
                None => Step::Done(BatchEnd::Answered),
                Some((after, reason)) => Step::Retry { after, reason },
            };
        }
    }

    /// `POST $batch` of `parts`, or why it was not answered.
    async fn post_batch(
        &self,
        token: &SecretString,
        parts: &[Part],
    ) -> Result<reqwest::Response, String> {
        let boundary = format!("batch_leadsync_{:016x}", rand::random::<u64>());
        self.odata(self.client.post(format!("{}/$batch", self.api_base)), token)
            .header(
                CONTENT_TYPE,
                format!("multipart/mixed; boundary={boundary}"),
            )
            .header("Prefer", "odata.continue-on-error")
            .body(batch_body(&boundary, parts))
            .send()
            .await
            .map_err(|e| self.transport_reason("$batch request", e))
    }

    /// A `$batch` refused as a whole: throttling is waited out, an endpoint refusal is
    /// every part's, more than one part is split in halves, one part's refusal is its own.
    fn batch_refused(
        &self,
        parts: &[Part],
        status: StatusCode,
        after: Option<Duration>,
        text: String,
        pending: &StdMutex<Vec<Part>>,
        finished: &StdMutex<Vec<(usize, Outcome)>>,
    ) -> Step<BatchEnd> {
        self.log_service_protection(&text, after, parts.len());
        // Throttling counts the `$batch` as one request and answers it as a whole.
        if let Step::Retry { after, reason } = classify(status, after, &text) {
            return Step::Retry {
                after,
                reason: self.redact(reason),
            };
        }
        let answer = Answer {
            status,
            text: self.redact(text),
            entity: String::new(),
        };
        if is_endpoint_refusal(status, &answer.text) {
            let mut done = lock(finished);
            for part in parts {
                done.push((part.index, self.refusal(&answer, "the $batch")));
            }
            lock(pending).clear();
            return Step::Done(BatchEnd::Answered);
        }
        if parts.len() > 1 {
            tracing::warn!(
                requests = parts.len(),
                status = status.as_u16(),
                reason = %error_text(&answer.text),
                "Dataverse refused the $batch as a whole; sending it again in halves so that one bad record does not hold back the others."
            );
            return Step::Done(BatchEnd::Split);
        }
        // One request left: the refusal is its own.
        let part = &parts[0];
        let outcome = match self.judge(part, &answer, None) {
            Ok(outcome) => outcome,
            Err((after, reason)) => return Step::Retry { after, reason },
        };
        lock(finished).push((part.index, outcome));
        lock(pending).clear();
        Step::Done(BatchEnd::Answered)
    }

    /// Moves the parts with a final answer to `finished` and keeps the others pending.
    /// Returns why some go again (the longest `Retry-After` among them, the first
    /// reason), and whether an inner 401 asks for a fresh token.
    fn take_answers(
        &self,
        parts: Vec<Part>,
        answers: &[InnerAnswer],
        refreshed: bool,
        pending: &StdMutex<Vec<Part>>,
        finished: &StdMutex<Vec<(usize, Outcome)>>,
    ) -> (Option<(Option<Duration>, String)>, bool) {
        // The responses come in the order of the requests; without
        // continue-on-error Dataverse would stop at the first failure, so a request
        // without a response is sent again.
        let sent = parts.len();
        let mut again = Vec::new();
        let mut done = Vec::new();
        let mut retry: Option<(Option<Duration>, String)> = None;
        let mut reauth = false;
        for (i, part) in parts.into_iter().enumerate() {
            let Some(inner) = answers.get(i) else {
                retry.get_or_insert((
                    None,
                    format!(
                        "Dataverse answered {} of the $batch's {sent} requests",
                        answers.len()
                    ),
                ));
                again.push(part);
                continue;
            };
            if inner.status == StatusCode::UNAUTHORIZED && !refreshed {
                reauth = true;
                again.push(part);
                continue;
            }
            let answer = Answer {
                status: inner.status,
                text: self.redact(inner.text.clone()),
                entity: inner.entity.clone(),
            };
            self.log_service_protection(&answer.text, inner.after, 1);
            match self.judge(&part, &answer, inner.after) {
                Ok(outcome) => done.push((part.index, outcome)),
                Err((after, reason)) => {
                    retry = Some(match retry {
                        None => (after, reason),
                        Some((was, first)) => (was.max(after), first),
                    });
                    again.push(part);
                }
            }
        }
        lock(finished).extend(done);
        *lock(pending) = again;
        (retry, reauth)
    }
}

/// What a `$batch` attempt ended with.
pub(super) enum BatchEnd {
    /// Every part has its outcome.
    Answered,
    /// Refused as a whole: send the pending parts again in halves.
    Split,
}

/// What one request of a `$batch` writes.
#[derive(Clone)]
pub(super) enum PartKind {
    Create,
    Update,
    Task { note: String },
}

/// One request of a `$batch`: a `PATCH` (an upsert by key) of one lead or its task.
#[derive(Clone)]
pub(super) struct Part {
    /// The lead's position in the delivered batch.
    pub(super) index: usize,
    /// The customer as log lines name them.
    pub(super) customer: String,
    /// The record's external key, for the link to its lead.
    pub(super) external_key: String,
    pub(super) kind: PartKind,
    /// The path from the host, e.g. `/api/data/v9.2/leads(leadsync_key='ls-1')`.
    pub(super) url: String,
    pub(super) condition: (&'static str, &'static str),
    pub(super) body: Vec<u8>,
}

pub(super) fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn unpoisoned<T>(result: std::sync::LockResult<T>) -> T {
    result.unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A `$batch` body (OData 4.0 multipart/mixed): one part per request, no change set,
/// each `Content-Type: application/http` with `Content-Transfer-Encoding: binary`.
pub(super) fn batch_body(boundary: &str, parts: &[Part]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nPATCH {} HTTP/1.1\r\nContent-Type: application/json; charset=utf-8\r\nAccept: application/json\r\n{}: {}\r\n\r\n",
                part.url, part.condition.0, part.condition.1
            )
            .as_bytes(),
        );
        out.extend_from_slice(&part.body);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

/// One response of a `$batch` response.
#[derive(Debug)]
pub(super) struct InnerAnswer {
    pub(super) status: StatusCode,
    pub(super) after: Option<Duration>,
    pub(super) entity: String,
    pub(super) text: String,
}

/// The `boundary` parameter of a `multipart/mixed` content type.
pub(super) fn multipart_boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_owned())
    })
}

/// Header lines and the rest, split at the first empty line.
pub(super) fn split_head(text: &str) -> (&str, &str) {
    let crlf = text.find("\r\n\r\n").map(|i| (i, 4));
    let lf = text.find("\n\n").map(|i| (i, 2));
    match [crlf, lf].into_iter().flatten().min_by_key(|(i, _)| *i) {
        Some((i, n)) => (&text[..i], &text[i + n..]),
        None => (text, ""),
    }
}

pub(super) fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The responses of a `$batch` response body, in order (a change set's responses in
/// its place).
pub(super) fn parse_batch_response(
    content_type: &str,
    body: &str,
) -> Result<Vec<InnerAnswer>, String> {
    let boundary = multipart_boundary(content_type).ok_or_else(|| {
        format!(
            "Dataverse answered the $batch with {content_type:?}, not multipart/mixed: {}",
            error_text(body)
        )
    })?;
    let delimiter = format!("--{boundary}");
    let mut answers = Vec::new();
    let mut pieces = body.split(delimiter.as_str());
    pieces.next(); // the preamble
    let mut closed = false;
    for piece in pieces {
        if piece.starts_with("--") {
            closed = true;
            break;
        }
        let piece = piece
            .strip_prefix("\r\n")
            .or_else(|| piece.strip_prefix('\n'))
            .unwrap_or(piece);
        let (mime, content) = split_head(piece);
        let part_type = header_value(mime, "content-type").unwrap_or_default();
        if multipart_boundary(part_type).is_some() {
            answers.extend(parse_batch_response(part_type, content)?);
            continue;
        }
        let (head, text) = split_head(content);
        let mut lines = head.lines();
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or_else(|| format!("unreadable $batch response line {status_line:?}"))?;
        let after = header_value(head, "retry-after").and_then(|v| {
            let mut headers = HeaderMap::new();
            headers.insert("retry-after", HeaderValue::from_str(v).ok()?);
            http::retry_after(&headers)
        });
        answers.push(InnerAnswer {
            status,
            after,
            entity: header_value(head, "odata-entityid")
                .unwrap_or_default()
                .to_owned(),
            text: text.trim_end_matches(['\r', '\n']).to_owned(),
        });
    }
    if !closed {
        return Err(format!(
            "the $batch response ended before its closing boundary ({} responses read)",
            answers.len()
        ));
    }
    Ok(answers)
}
