//! Microsoft Entra ID client credentials: the token request, what its answer means,
//! and the cached token renewed before it expires or after a 401.

use std::time::{Duration, Instant};

use reqwest::header::ACCEPT;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::api::error_text;
use super::{DynamicsSink, ASSUMED_TOKEN_LIFETIME};
use crate::sink::http::{self, Step};

/// An access token and when to stop using it.
pub(super) struct CachedToken {
    pub(super) value: SecretString,
    pub(super) renew_at: Instant,
}

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TokenError {
    /// Entra ID is unreachable, slow or throttling: try again later.
    Transient {
        after: Option<Duration>,
        reason: String,
    },
    /// Entra ID refused the credentials; nothing changes until the config does.
    Permanent { reason: String },
}

impl TokenError {
    pub(super) fn into_step<T>(self) -> Step<T> {
        match self {
            Self::Transient { after, reason } => Step::Retry { after, reason },
            Self::Permanent { reason } => Step::Fail { reason },
        }
    }

    pub(super) fn reason(&self) -> &str {
        match self {
            Self::Transient { reason, .. } | Self::Permanent { reason } => reason,
        }
    }
}

impl DynamicsSink {
    /// The cached token, or a new one when it is missing or close to expiry. The lock is
    /// held while fetching, so concurrent upserts wait for one token request.
    pub(super) async fn bearer(&self) -> Result<SecretString, TokenError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok(token.value.clone());
        }
        let fresh = self.request_token().await?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    /// Drops `used` from the cache (after a 401), unless another request already replaced it.
    pub(super) async fn forget(&self, used: &SecretString) {
        let mut cached = self.token.lock().await;
        if cached
            .as_ref()
            .is_some_and(|t| t.value.expose_secret() == used.expose_secret())
        {
            *cached = None;
        }
    }

    pub(super) async fn request_token(&self) -> Result<CachedToken, TokenError> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose_secret()),
            ("scope", self.scope.as_str()),
        ];
        let requested = Instant::now();
        let response = self
            .client
            .post(&self.token_url)
            .header(ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| TokenError::Transient {
                after: None,
                reason: self.transport_reason("token request to Entra ID", e),
            })?;
        let status = response.status();
        let after = http::retry_after(response.headers());
        let body = response.text().await.map_err(|e| TokenError::Transient {
            after: None,
            reason: self.transport_reason("reading the Entra ID token response", e),
        })?;
        let token =
            classify_token_response(status, after, &body, &self.client_id).map_err(|error| {
                match error {
                    TokenError::Transient { after, reason } => TokenError::Transient {
                        after,
                        reason: self.redact(reason),
                    },
                    TokenError::Permanent { reason } => TokenError::Permanent {
                        reason: self.redact(reason),
                    },
                }
            })?;
        let renew_in = renew_after(token.lifetime, self.refresh_margin);
        tracing::debug!(
            expires_in_s = token.lifetime.as_secs(),
            renew_in_s = renew_in.as_secs(),
            "Got a Dataverse access token from Entra ID."
        );
        Ok(CachedToken {
            value: token.access_token,
            renew_at: requested + renew_in,
        })
    }
}

/// A successful token response.
pub(super) struct IssuedToken {
    pub(super) access_token: SecretString,
    pub(super) lifetime: Duration,
}

/// When to renew a token of `lifetime`: `margin` before expiry, but never sooner than
/// half-way, so that even a short-lived token is used before it is renewed.
pub(super) fn renew_after(lifetime: Duration, margin: Duration) -> Duration {
    lifetime.saturating_sub(margin.min(lifetime / 2))
}

/// Reads an Entra ID token endpoint response.
pub(super) fn classify_token_response(
    status: StatusCode,
    after: Option<Duration>,
    body: &str,
    client_id: &str,
) -> Result<IssuedToken, TokenError> {
    let json: Option<Value> = serde_json::from_str(body).ok();
    if status.is_success() {
        let token = json
            .as_ref()
            .and_then(|v| v.get("access_token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(TokenError::Transient {
                after: None,
                reason: "Entra ID answered the token request without an access_token".into(),
            });
        };
        // `expires_in` is a number on the v2.0 endpoint; some proxies send it as a string.
        let lifetime = json
            .as_ref()
            .and_then(|v| v.get("expires_in"))
            .and_then(|v| v.as_u64().or_else(|| v.as_str()?.trim().parse().ok()))
            .map_or(ASSUMED_TOKEN_LIFETIME, Duration::from_secs);
        return Ok(IssuedToken {
            access_token: SecretString::from(token.to_owned()),
            lifetime,
        });
    }
    let field = |name: &str| {
        json.as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let description = field("error_description")
        .map(|d| d.lines().next().unwrap_or_default().trim().to_owned())
        .unwrap_or_else(|| error_text(body));
    let error = field("error").unwrap_or_else(|| "no error code".into());
    if http::is_transient_status(status) || error == "temporarily_unavailable" {
        return Err(TokenError::Transient {
            after,
            reason: format!("Entra ID token request answered {status} ({error}: {description})"),
        });
    }
    Err(TokenError::Permanent {
        reason: format!(
            "Entra ID refused the client credentials of application {client_id} ({status}, {error}: {description}); nothing is delivered until sink.dynamics.tenant_id, client_id or client_secret is corrected"
        ),
    })
}
