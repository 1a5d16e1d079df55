//! OAuth 2.0 against the org's login URL: the client credentials form or a signed
//! JWT assertion, the cached session and its renewal after a 401.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::api::snippet;
use super::settings::{default_audience, AuthFlow, SalesforceSettings};
use super::{transport_reason, SalesforceSink, ASSERTION_LIFETIME, JWT_GRANT, REDACTED, SINK};
use crate::sink::http::{check_url, is_transient_status};
use crate::sink::SinkError;

pub(super) enum Credentials {
    ClientSecret(SecretString),
    Jwt {
        username: String,
        audience: String,
        key: EncodingKey,
    },
}

impl Credentials {
    /// The secret or the signing key of the configured flow, read from their sources.
    pub(super) fn from_settings(
        settings: &SalesforceSettings,
        login: &reqwest::Url,
    ) -> Result<Self, SinkError> {
        Ok(match settings.auth {
            AuthFlow::ClientCredentials => {
                let source = settings.client_secret.as_ref().ok_or_else(|| {
                    SinkError::new(
                        SINK,
                        "config key `sink.salesforce.client_secret` is missing",
                    )
                })?;
                Credentials::ClientSecret(
                    source
                        .resolve("sink.salesforce.client_secret")
                        .map_err(|e| SinkError::new(SINK, e.to_string()))?,
                )
            }
            AuthFlow::JwtBearer => {
                let source = settings.private_key.as_ref().ok_or_else(|| {
                    SinkError::new(SINK, "config key `sink.salesforce.private_key` is missing")
                })?;
                let pem = source
                    .resolve("sink.salesforce.private_key")
                    .map_err(|e| SinkError::new(SINK, e.to_string()))?;
                let key = EncodingKey::from_rsa_pem(pem.expose_secret().as_bytes()).map_err(|_| {
                SinkError::new(SINK,
                    "config key `sink.salesforce.private_key`: not an RSA private key in PEM form (PKCS#8 or PKCS#1)",
                )
            })?;
                Credentials::Jwt {
                    username: settings
                        .username
                        .clone()
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                    audience: settings
                        .audience
                        .clone()
                        .unwrap_or_else(|| default_audience(login)),
                    key,
                }
            }
        })
    }
}

#[derive(Clone)]
pub(super) struct Session {
    pub(super) token: SecretString,
    pub(super) instance_url: String,
    pub(super) serial: u64,
}

#[derive(Default)]
pub(super) struct SessionSlot {
    pub(super) current: Option<Session>,
    pub(super) issued: u64,
}

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AuthError {
    /// Worth another try (timeout, 5xx).
    Transient(String),
    /// The token endpoint refused; a person has to fix the app or the config.
    Refused(String),
}

#[derive(Serialize)]
pub(super) struct JwtClaims<'a> {
    pub(super) iss: &'a str,
    pub(super) sub: &'a str,
    pub(super) aud: &'a str,
    pub(super) exp: u64,
}

#[derive(Deserialize)]
pub(super) struct TokenResponse {
    pub(super) access_token: String,
    pub(super) instance_url: String,
}

#[derive(Deserialize)]
pub(super) struct TokenError {
    pub(super) error: String,
    #[serde(default)]
    pub(super) error_description: String,
}

/// What a token endpoint answer means.
pub(super) fn classify_token(
    status: StatusCode,
    body: &str,
    flow: AuthFlow,
) -> Result<TokenResponse, AuthError> {
    if status.is_success() {
        return serde_json::from_str::<TokenResponse>(body).map_err(|e| {
            AuthError::Transient(format!(
                "Salesforce token endpoint answered HTTP {} without a usable token ({e})",
                status.as_u16()
            ))
        });
    }
    let described = match serde_json::from_str::<TokenError>(body) {
        Ok(e) if e.error_description.is_empty() => e.error,
        Ok(e) => format!("{}: {}", e.error, e.error_description),
        Err(_) => snippet(body),
    };
    let text = format!(
        "Salesforce token endpoint refused {} authentication (HTTP {}): {described}",
        flow.as_str(),
        status.as_u16()
    );
    if is_transient_status(status) {
        Err(AuthError::Transient(text))
    } else {
        Err(AuthError::Refused(text))
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl SalesforceSink {
    /// Replaces known secrets in text that came from the network.
    pub(super) fn scrub(&self, text: String, session: Option<&Session>) -> String {
        let mut text = text;
        if let Credentials::ClientSecret(secret) = &self.credentials {
            let secret = secret.expose_secret();
            if !secret.is_empty() && text.contains(secret) {
                text = text.replace(secret, REDACTED);
            }
        }
        if let Some(session) = session {
            let token = session.token.expose_secret();
            if !token.is_empty() && text.contains(token) {
                text = text.replace(token, REDACTED);
            }
        }
        text
    }

    pub(super) fn token_form(&self) -> Result<Vec<(&'static str, String)>, AuthError> {
        Ok(match &self.credentials {
            Credentials::ClientSecret(secret) => vec![
                ("grant_type", "client_credentials".into()),
                ("client_id", self.client_id.clone()),
                ("client_secret", secret.expose_secret().to_owned()),
            ],
            Credentials::Jwt {
                username,
                audience,
                key,
            } => {
                let claims = JwtClaims {
                    iss: &self.client_id,
                    sub: username,
                    aud: audience,
                    exp: unix_now() + ASSERTION_LIFETIME.as_secs(),
                };
                let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key)
                    .map_err(|e| {
                        AuthError::Refused(format!("cannot sign the JWT assertion: {e}"))
                    })?;
                vec![("grant_type", JWT_GRANT.into()), ("assertion", assertion)]
            }
        })
    }

    pub(super) async fn fetch_token(&self) -> Result<TokenResponse, AuthError> {
        let form = self.token_form()?;
        let response = self
            .http
            .post(&self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                AuthError::Transient(format!(
                    "token request to {} failed: {}",
                    self.token_url,
                    transport_reason(&e)
                ))
            })?;
        let status = response.status();
        let body = response.text().await.map_err(|e| {
            AuthError::Transient(format!(
                "token response unreadable: {}",
                transport_reason(&e)
            ))
        })?;
        let token = classify_token(status, &body, self.flow).map_err(|e| match e {
            AuthError::Transient(r) => AuthError::Transient(self.scrub(r, None)),
            AuthError::Refused(r) => AuthError::Refused(self.scrub(r, None)),
        })?;
        check_url("instance_url", &token.instance_url, self.allow_http).map_err(|(_, why)| {
            AuthError::Refused(format!(
                "Salesforce token response has an unusable instance_url: {why}"
            ))
        })?;
        Ok(token)
    }

    /// The cached session, or a new one. One token request at a time.
    pub(super) async fn session(&self) -> Result<Session, AuthError> {
        let mut slot = self.session.lock().await;
        if let Some(session) = &slot.current {
            return Ok(session.clone());
        }
        let token = self.fetch_token().await?;
        slot.issued += 1;
        let session = Session {
            token: SecretString::from(token.access_token),
            instance_url: token.instance_url.trim_end_matches('/').to_owned(),
            serial: slot.issued,
        };
        tracing::info!(sink = SINK, auth = self.flow.as_str(), instance_url = %session.instance_url, "Authenticated to Salesforce.");
        slot.current = Some(session.clone());
        Ok(session)
    }

    /// Forgets `session` unless a newer one already replaced it.
    pub(super) async fn invalidate(&self, session: &Session) {
        let mut slot = self.session.lock().await;
        if slot
            .current
            .as_ref()
            .is_some_and(|s| s.serial == session.serial)
        {
            slot.current = None;
        }
    }
}
