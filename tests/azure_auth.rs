//! Table access with Entra ID tokens: the managed-identity token request has the
//! documented shape, and the table request carries the token.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use azure_core::auth::TokenCredential;
use leadsync::config::Settings;
use leadsync::source::auth::{ManagedIdentityCredential, ManagedIdentityEndpoint};
use leadsync::source::TableSource;

/// A token request the fake saw: its form fields and headers.
type TokenRequest = (HashMap<String, String>, HeaderMap);

#[derive(Clone, Default)]
struct Seen {
    token_requests: Arc<Mutex<Vec<TokenRequest>>>,
    table_auth: Arc<Mutex<Vec<String>>>,
}

async fn token(
    State(seen): State<Seen>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> impl IntoResponse {
    seen.token_requests
        .lock()
        .unwrap()
        .push((q.clone(), headers));
    if q.get("resource").map(String::as_str) != Some("https://storage.azure.com") {
        return (
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_resource"}"#.to_owned(),
        )
            .into_response();
    }
    let expires = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
    axum::Json(serde_json::json!({
        "access_token": "tok-1", "expires_on": expires.to_string(),
        "resource": "https://storage.azure.com", "token_type": "Bearer"
    }))
    .into_response()
}

async fn table(State(seen): State<Seen>, headers: HeaderMap) -> impl IntoResponse {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    seen.table_auth.lock().unwrap().push(auth.clone());
    if auth != "Bearer tok-1" {
        return (StatusCode::FORBIDDEN, "no").into_response();
    }
    // The storage service's response headers, which the SDK requires.
    (
        [
            (
                "content-type",
                "application/json;odata=fullmetadata".to_owned(),
            ),
            (
                "x-ms-request-id",
                "00000000-0000-0000-0000-000000000001".to_owned(),
            ),
            ("x-ms-version", "2019-02-02".to_owned()),
            (
                "date",
                httpdate::fmt_http_date(std::time::SystemTime::now()),
            ),
            (
                "server",
                "Windows-Azure-Table/1.0 Microsoft-HTTPAPI/2.0".to_owned(),
            ),
        ],
        r#"{"odata.metadata":"http://x/$metadata#MarketplaceLeads","value":[]}"#,
    )
        .into_response()
}

/// The fake managed-identity endpoint and table service; returns the base URL.
async fn identity_and_table(seen: &Seen) -> String {
    common::serve(
        Router::new()
            .route("/msi/token", get(token))
            .route("/acct/MarketplaceLeads()", get(table))
            .with_state(seen.clone()),
    )
    .await
}

/// A client of the fake's table `acct` (one attempt a request); `extra` adds `[source]` keys.
fn source(base: &str, extra: &str) -> TableSource {
    let toml = format!(
        "[source]\naccount = \"acct\"\nendpoint = \"{base}/acct\"\nretry = {{ max_attempts = 1 }}\n{extra}"
    );
    let settings =
        Settings::from_toml_with_env(&toml, std::path::Path::new("t.toml"), &HashMap::new())
            .unwrap();
    TableSource::connect(&settings.source).unwrap()
}

#[tokio::test]
async fn a_user_assigned_managed_identity_token_is_requested_and_sent_to_the_table() {
    let seen = Seen::default();
    let base = identity_and_table(&seen).await;
    let source = source(
        &base,
        &format!("identity = \"managed_identity\"\nidentity_client_id = \"cid-123\"\nidentity_endpoint = \"{base}/msi/token\""),
    );

    let page = source
        .fetch_page(None, None, &Default::default())
        .await
        .unwrap();

    assert!(page.rows.is_empty());
    let requests = seen.token_requests.lock().unwrap();
    let (query, headers) = &requests[0];
    assert_eq!(query["resource"], "https://storage.azure.com");
    assert_eq!(query["client_id"], "cid-123");
    assert_eq!(query["api-version"], "2018-02-01");
    assert_eq!(headers["metadata"], "true");
    assert_eq!(seen.table_auth.lock().unwrap()[0], "Bearer tok-1");
}

#[tokio::test]
async fn on_container_apps_the_identity_header_secret_is_sent_and_the_token_cached() {
    let seen = Seen::default();
    let base = common::serve(
        Router::new()
            .route("/msi/token", get(token))
            .with_state(seen.clone()),
    )
    .await;
    let credential = ManagedIdentityCredential::new(
        ManagedIdentityEndpoint::AppService {
            endpoint: format!("{base}/msi/token"),
            header: "platform-secret".into(),
        },
        None,
        Duration::from_secs(5),
    );

    let first = credential
        .get_token(&["https://storage.azure.com/.default"])
        .await
        .unwrap();
    let second = credential
        .get_token(&["https://storage.azure.com/.default"])
        .await
        .unwrap();

    assert_eq!(first.token.secret(), "tok-1");
    assert_eq!(second.token.secret(), "tok-1");
    let requests = seen.token_requests.lock().unwrap();
    assert_eq!(requests.len(), 1, "the token is cached until near expiry");
    let (query, headers) = &requests[0];
    assert_eq!(query["api-version"], "2019-08-01");
    assert!(
        !query.contains_key("client_id"),
        "system-assigned when no client id"
    );
    assert_eq!(headers["x-identity-header"], "platform-secret");
    assert!(!format!("{credential:?}").contains("platform-secret"));
}

#[tokio::test]
async fn an_identity_endpoint_error_fails_the_poll_with_the_reason() {
    let base = common::serve(Router::new().route(
        "/msi/token",
        get(|| async {
            (
                StatusCode::BAD_REQUEST,
                r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
            )
        }),
    ))
    .await;
    let source = source(
        &base,
        &format!("identity = \"managed_identity\"\nidentity_endpoint = \"{base}/msi/token\""),
    );

    let err = source
        .fetch_page(None, None, &Default::default())
        .await
        .unwrap_err()
        .to_string();

    assert!(err.contains("Identity not found"), "{err}");
}

#[tokio::test]
async fn at_debug_level_no_request_signature_sas_or_token_reaches_the_logs() {
    // Arrange: leadsync's filter for a level that asks for the SDK's request dumps too.
    let world = common::World::new().await;
    let seen = Seen::default();
    let base = identity_and_table(&seen).await;
    let filter = leadsync::telemetry::filter("debug,azure_core::policies::transport=trace")
        .expect("a valid level");
    let (logs, _guard) = common::capture_logs(filter);
    let sas = source(&base, "sas_token = { value = \"sv=2020-08-04&ss=t&srt=sco&sp=rl&se=2099-01-01T00:00:00Z&sig=TOPSECRETSIGNATURE\" }");
    let identity = source(
        &base,
        &format!("identity = \"managed_identity\"\nidentity_endpoint = \"{base}/msi/token\""),
    );

    // Act: a shared-key read of Azurite, a SAS read and a token read of the fake.
    tracing::debug!("debug events are written");
    let shared_key = world
        .source()
        .fetch_page(None, None, &Default::default())
        .await;
    let refused = sas.fetch_page(None, None, &Default::default()).await;
    let bearer = identity.fetch_page(None, None, &Default::default()).await;

    // Assert
    assert!(shared_key.is_ok() && refused.is_err() && bearer.is_ok());
    assert_eq!(
        *seen.table_auth.lock().unwrap(),
        ["", "Bearer tok-1"],
        "both requests reached the fake"
    );
    let text = logs.text();
    assert!(text.contains("debug events are written"), "{text}");
    for secret in ["SharedKey", "TOPSECRETSIGNATURE", "tok-1"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
}
