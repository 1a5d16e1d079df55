//! A tiny counting HTTP proxy in front of Azurite: how many storage requests reach it,
//! and (with a delay) a stand-in for the network between leadsync and a real storage
//! account, which Azurite on the same machine does not have.
//! (Shared Key signatures do not cover the Host header, so forwarding keeps them valid.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

struct Shared {
    upstream: String,
    client: reqwest::Client,
    requests: AtomicU64,
    /// Added before every request is forwarded.
    delay: std::time::Duration,
}

#[derive(Clone)]
pub struct CountingProxy {
    shared: Arc<Shared>,
    pub port: u16,
}

fn hop_by_hop(name: &HeaderName) -> bool {
    name == header::HOST
        || name == header::CONTENT_LENGTH
        || name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == "keep-alive"
}

impl CountingProxy {
    pub async fn start(upstream_port: u16) -> anyhow::Result<CountingProxy> {
        Self::start_with_delay(upstream_port, std::time::Duration::ZERO).await
    }

    /// As [`CountingProxy::start`], holding every request `delay` before forwarding it.
    pub async fn start_with_delay(
        upstream_port: u16,
        delay: std::time::Duration,
    ) -> anyhow::Result<CountingProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            upstream: format!("http://127.0.0.1:{upstream_port}"),
            client: reqwest::Client::new(),
            requests: AtomicU64::new(0),
            delay,
        });
        let router = Router::new().fallback(forward).with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(CountingProxy { shared, port })
    }

    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }
}

async fn forward(State(proxy): State<Arc<Shared>>, request: Request) -> Response {
    proxy.requests.fetch_add(1, Ordering::SeqCst);
    if !proxy.delay.is_zero() {
        tokio::time::sleep(proxy.delay).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut upstream = proxy
        .client
        .request(parts.method, format!("{}{path}", proxy.upstream));
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            upstream = upstream.header(name, value);
        }
    }
    let answer = match upstream.body(body).send().await {
        Ok(answer) => answer,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = answer.status();
    let headers = answer.headers().clone();
    let bytes = answer.bytes().await.unwrap_or_default();
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    for (name, value) in &headers {
        if !hop_by_hop(name) {
            response.headers_mut().append(name, value.clone());
        }
    }
    response
}
