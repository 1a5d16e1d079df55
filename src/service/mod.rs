//! What a running daemon shows the outside: systemd notifications (READY, WATCHDOG,
//! STATUS, STOPPING) and the optional HTTP listener with `/metrics` (Prometheus text),
//! `/healthz`, `/readyz` and `/status`.

use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

pub use crate::pipeline::metrics::Metrics;

#[derive(Clone)]
struct Listener {
    metrics: Arc<Metrics>,
    ready_window: Duration,
}

async fn metrics_text(State(l): State<Listener>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        l.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(l): State<Listener>) -> impl IntoResponse {
    if let Some((sink, reason)) = l.metrics.endpoint_failures().into_iter().next() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("sink {sink} endpoint failing, leads wait: {reason}\n"),
        );
    }
    if l.metrics.ready(l.ready_window) {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no successful poll recently\n".to_owned(),
        )
    }
}

async fn status(State(l): State<Listener>) -> impl IntoResponse {
    let summary = l.metrics.last_summary();
    axum::Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "ready": l.metrics.ready(l.ready_window),
        "last_test_lead": l.metrics.last_test_lead(),
        "sink_endpoint_failures": l.metrics.endpoint_failures().into_iter()
            .map(|(sink, reason)| serde_json::json!({"sink": sink, "reason": reason}))
            .collect::<Vec<_>>(),
        "last_poll": summary.map(|s| serde_json::json!({
            "rows_read": s.rows_read,
            "delivered": s.delivered,
            "skipped": s.skipped,
            "rejected": s.rejected,
            "unidentifiable": s.unidentifiable,
            "pending": s.pending,
            "overdue": s.overdue,
            "checkpoint": s.checkpoint.map(crate::timestamp::format),
        })),
    }))
}

/// Serves `/metrics`, `/healthz`, `/readyz` and `/status` on `addr` until `cancel`.
/// Ready means a poll succeeded within `ready_window`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready_window: Duration,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(Listener {
            metrics: metrics.clone(),
            ready_window,
        });
    tokio::spawn(async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "The metrics listener stopped.");
        }
    });
    tracing::info!(address = %bound, "Serving /metrics, /healthz, /readyz and /status.");
    Ok(bound)
}

/// systemd's notify protocol; every call is a no-op outside a `Type=notify` unit.
pub mod systemd {
    use super::*;
    use sd_notify::NotifyState;

    fn send(states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "Cannot notify systemd.");
        }
    }

    pub fn ready(status: &str) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(status: &str) {
        send(&[NotifyState::Status(status)]);
    }

    pub fn stopping() {
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// Pings the watchdog at half its period while the daemon shows progress: a poll
    /// loop that hangs stops the pings and systemd restarts the service.
    pub fn spawn_watchdog(metrics: Arc<Metrics>, cancel: CancellationToken) {
        let Some(period) = sd_notify::watchdog_enabled() else {
            return;
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period / 2) => {}
                    _ = cancel.cancelled() => return,
                }
                if metrics.alive(period) {
                    send(&[NotifyState::Watchdog]);
                } else {
                    tracing::error!(
                        stalled_s = crate::progress::since_last().map(|s| s.as_secs()),
                        "No progress within the watchdog period; letting systemd restart leadsync."
                    );
                }
            }
        });
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address to listen on, e.g. "127.0.0.1:9464"; unset (the default) = no listener.
    pub listen: Option<String>,
}
