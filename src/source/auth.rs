//! Entra ID tokens for the table, without a key: managed identity, workload identity,
//! Azure CLI.
//!
//! `azure_identity` 0.21 (the legacy crate that matches `azure_data_tables` 0.21) only
//! asks the managed-identity endpoint for the *system-assigned* identity: its
//! `ImdsManagedIdentityCredential`, which takes a client id, is crate-private. A
//! Container Apps job runs with a *user-assigned* identity, so the managed-identity
//! flow is implemented here (one GET, documented by Microsoft for App Service /
//! Container Apps and for the VM IMDS). Workload identity and Azure CLI use the crate.

use std::sync::Arc;
use std::time::Duration;

use azure_core::auth::{AccessToken, TokenCredential};
use azure_core::error::{Error, ErrorKind};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::Mutex;

/// The VM Instance Metadata Service token endpoint.
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// Where the managed-identity token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagedIdentityEndpoint {
    /// App Service / Container Apps: `IDENTITY_ENDPOINT` with the `X-IDENTITY-HEADER` secret.
    AppService { endpoint: String, header: String },
    /// A VM: the Instance Metadata Service (or a stand-in URL).
    Imds { endpoint: String },
}

impl ManagedIdentityEndpoint {
    /// `IDENTITY_ENDPOINT` + `IDENTITY_HEADER` when the platform sets them, else IMDS.
    pub fn from_env() -> Self {
        match (
            std::env::var("IDENTITY_ENDPOINT"),
            std::env::var("IDENTITY_HEADER"),
        ) {
            (Ok(endpoint), Ok(header)) => Self::AppService { endpoint, header },
            _ => Self::Imds {
                endpoint: IMDS_ENDPOINT.into(),
            },
        }
    }
}

/// A managed-identity credential, system- or user-assigned (`client_id`), cached
/// until five minutes before expiry.
pub struct ManagedIdentityCredential {
    endpoint: ManagedIdentityEndpoint,
    client_id: Option<String>,
    http: reqwest::Client,
    cache: Mutex<Option<AccessToken>>,
}

impl std::fmt::Debug for ManagedIdentityCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.endpoint {
            ManagedIdentityEndpoint::AppService { .. } => "app_service",
            ManagedIdentityEndpoint::Imds { .. } => "imds",
        };
        f.debug_struct("ManagedIdentityCredential")
            .field("endpoint", &kind)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    /// Unix seconds, as a string (both endpoints) or a number.
    expires_on: serde_json::Value,
}

fn credential_error(message: String) -> Error {
    Error::message(ErrorKind::Credential, message)
}

impl ManagedIdentityCredential {
    pub fn new(
        endpoint: ManagedIdentityEndpoint,
        client_id: Option<String>,
        timeout: Duration,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap_or_default();
        Self {
            endpoint,
            client_id,
            http,
            cache: Mutex::new(None),
        }
    }

    async fn fetch(&self, resource: &str) -> azure_core::Result<AccessToken> {
        let mut query = vec![("resource", resource.to_owned())];
        if let Some(id) = &self.client_id {
            query.push(("client_id", id.clone()));
        }
        let request = match &self.endpoint {
            ManagedIdentityEndpoint::AppService { endpoint, header } => {
                query.push(("api-version", "2019-08-01".into()));
                self.http.get(endpoint).header("X-IDENTITY-HEADER", header)
            }
            ManagedIdentityEndpoint::Imds { endpoint } => {
                query.push(("api-version", "2018-02-01".into()));
                self.http.get(endpoint).header("Metadata", "true")
            }
        };
        let response = request.query(&query).send().await.map_err(|e| {
            Error::full(
                ErrorKind::Io,
                e.without_url(),
                "managed identity endpoint unreachable",
            )
        })?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            let excerpt: String = body.chars().take(300).collect();
            return Err(credential_error(format!(
                "managed identity endpoint answered {status}: {excerpt}"
            )));
        }
        let token: TokenResponse = serde_json::from_str(&body).map_err(|e| {
            credential_error(format!("managed identity token response unreadable: {e}"))
        })?;
        let expires: i64 = match &token.expires_on {
            serde_json::Value::String(s) => s.parse().ok(),
            serde_json::Value::Number(n) => n.as_i64(),
            _ => None,
        }
        .ok_or_else(|| credential_error("managed identity token has no expires_on".into()))?;
        let expires_on = OffsetDateTime::from_unix_timestamp(expires).map_err(|e| {
            credential_error(format!("managed identity token expiry out of range: {e}"))
        })?;
        Ok(AccessToken::new(token.access_token, expires_on))
    }
}

/// `https://storage.azure.com/.default` -> `https://storage.azure.com`.
fn resource_of(scopes: &[&str]) -> azure_core::Result<String> {
    match scopes {
        [scope] => Ok(scope.trim_end_matches("/.default").to_owned()),
        _ => Err(credential_error(format!(
            "expected one scope, got {}",
            scopes.len()
        ))),
    }
}

#[async_trait::async_trait]
impl TokenCredential for ManagedIdentityCredential {
    async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let resource = resource_of(scopes)?;
        let mut cache = self.cache.lock().await;
        if let Some(token) = cache.as_ref() {
            if token.expires_on - time::Duration::minutes(5) > OffsetDateTime::now_utc() {
                return Ok(token.clone());
            }
        }
        let token = self.fetch(&resource).await?;
        *cache = Some(token.clone());
        Ok(token)
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        *self.cache.lock().await = None;
        Ok(())
    }
}

/// The credential named by `source.identity`.
pub fn credential(
    kind: crate::source::IdentityKind,
    client_id: Option<String>,
    endpoint: Option<String>,
    timeout: Duration,
) -> azure_core::Result<Arc<dyn TokenCredential>> {
    use crate::source::IdentityKind;
    Ok(match kind {
        IdentityKind::ManagedIdentity => {
            let endpoint = match endpoint {
                Some(url) => ManagedIdentityEndpoint::Imds { endpoint: url },
                None => ManagedIdentityEndpoint::from_env(),
            };
            Arc::new(ManagedIdentityCredential::new(endpoint, client_id, timeout))
        }
        IdentityKind::WorkloadIdentity => {
            Arc::new(azure_identity::WorkloadIdentityCredential::create(
                azure_identity::TokenCredentialOptions::default(),
            )?)
        }
        IdentityKind::AzureCli => Arc::new(azure_identity::AzureCliCredential::new()),
    })
}
