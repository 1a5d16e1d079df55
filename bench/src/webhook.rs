//! `leadsync-bench webhook-throughput`: the webhook sink against a receiver whose
//! answers take 100 ms, 5% of them 3 s (a mean of 0.245 s), with `parallelism`
//! requests in flight (issue 26, point 3). Requests that finish in any order keep
//! every slot busy: the target is at least 80% of `parallelism / 0.245 s`. With
//! in-order windows one slow answer would hold the window behind it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use leadsync::config::{IdentitySettings, Settings};
use leadsync::identity::{CustomerKey, CustomerState};
use leadsync::sink::{LeadSink, Outcome, WebhookSink};

/// The mean of the receiver's answers: 95% at 100 ms, 5% at 3 s.
const MEAN_SECONDS: f64 = 0.95 * 0.1 + 0.05 * 3.0;

pub async fn run(leads: usize, parallelism: usize) -> anyhow::Result<()> {
    // Every twentieth request is slow: 5%, spread evenly, the same in every run.
    let arrived = Arc::new(AtomicU64::new(0));
    let counter = arrived.clone();
    let router = Router::new().route(
        "/hook",
        post(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let delay = if n % 20 == 7 { 3_000 } else { 100 };
                tokio::time::sleep(Duration::from_millis(delay)).await;
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let text = format!(
        "[source]\nconnection_string = {{ value = \"UseDevelopmentStorage=true\" }}\n[sink]\nkind = \"webhook\"\n[sink.webhook]\nurl = \"{base}/hook\"\nallow_http = true\nparallelism = {parallelism}\nrequest_timeout = \"10s\"\n"
    );
    let settings = Settings::from_toml_with_env(&text, Path::new("bench.toml"), &HashMap::new())?;
    let webhook = settings
        .sink
        .webhook
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no [sink.webhook]"))?;
    let sink = WebhookSink::new(webhook)?;
    let identity = IdentitySettings::default();
    let batch: Vec<_> = (0..leads)
        .map(|i| {
            let mut state = CustomerState::new(
                &CustomerKey::Email(format!("customer{i}@contoso.com")),
                &identity,
            );
            state.apply([], &identity);
            state.lead
        })
        .collect();

    let started = Instant::now();
    let outcomes = sink.deliver(&batch).await;
    let seconds = started.elapsed().as_secs_f64();

    let delivered = outcomes
        .iter()
        .filter(|o| **o == Outcome::Delivered)
        .count();
    let rate = leads as f64 / seconds;
    let ideal = parallelism as f64 / MEAN_SECONDS;
    println!(
        "{}",
        serde_json::json!({
            "leads": leads,
            "delivered": delivered,
            "parallelism": parallelism,
            "seconds": seconds,
            "requests_per_second": rate,
            "ideal_requests_per_second": ideal,
            "share_of_ideal": rate / ideal,
            "target_met": delivered == leads && rate >= 0.8 * ideal,
        })
    );
    Ok(())
}
