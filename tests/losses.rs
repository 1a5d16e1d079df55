//! Nothing lost, part two (issue 24): a poll longer than the overlap, a watchdog
//! shorter than a page, a malformed entity in a page, a JSONL write that fails
//! half-way, and the summary of a poll that failed after delivering. Each against a
//! real Azurite, with slow receivers where the issue had them.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::{customer, lead_row, many_rows, serve, World};
use leadsync::config::Settings;
use leadsync::sink::{CustomerLead, JsonlSink, LeadSink, Outcome, SinkError};
use leadsync::{build_pipeline, RunOptions};
use tokio_util::sync::CancellationToken;

/// A webhook receiver that takes `delay` per request and upserts by `X-Leadsync-Key`;
/// it answers the first `refuse_first` requests 503 with `Retry-After: retry_after`.
#[derive(Clone, Default)]
struct SlowCrm {
    delay: Duration,
    refuse_first: u64,
    retry_after: u64,
    requests: Arc<AtomicU64>,
    /// Email of each record, by key.
    records: Arc<Mutex<BTreeMap<String, String>>>,
}

async fn receive(State(crm): State<SlowCrm>, headers: HeaderMap, body: String) -> Response {
    let n = crm.requests.fetch_add(1, Ordering::SeqCst);
    if n < crm.refuse_first {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", crm.retry_after.to_string())],
            "maintenance",
        )
            .into_response();
    }
    tokio::time::sleep(crm.delay).await;
    let key = headers
        .get("x-leadsync-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    // The leadsync payload or the marketplace's own, whichever is configured.
    let email = body["email"]
        .as_str()
        .or(body.pointer("/UserDetails/Email").and_then(|e| e.as_str()))
        .unwrap_or_default()
        .to_owned();
    crm.records.lock().unwrap().insert(key, email);
    StatusCode::OK.into_response()
}

async fn serve_crm(crm: &SlowCrm) -> String {
    serve(
        Router::new()
            .route("/leads", post(receive))
            .with_state(crm.clone()),
    )
    .await
}

fn webhook_sink(base: &str, max_backoff: &str) -> String {
    format!(
        "[sink]\nkind = \"webhook\"\n[sink.webhook]\nurl = \"{base}/leads\"\nallow_http = true\nparallelism = 1\nrequest_timeout = \"20s\"\nretry = {{ max_attempts = 4, initial_backoff = \"10ms\", max_backoff = \"{max_backoff}\" }}\n"
    )
}

/// The world's TOML with `sink`, `source_extra` in `[source]` and the given overlap.
fn toml(world: &World, source_extra: &str, sink: &str, overlap: &str) -> String {
    let text = world.toml_with_sink(source_extra, sink);
    assert!(text.contains("overlap = \"10m\""));
    text.replace("overlap = \"10m\"", &format!("overlap = \"{overlap}\""))
}

fn settings(text: &str) -> Settings {
    Settings::from_toml_with_env(text, std::path::Path::new("test.toml"), &HashMap::new())
        .unwrap_or_else(|e| panic!("test settings are invalid: {e}"))
}

/// The issue's reproduction, on a quarter of its clock (a receiver answering in 250 ms
/// instead of 1 s, the overlap and the insert times scaled alike): 30 customers in
/// partition `a`, 300 rows of one customer in partition `m`, pages of 10, one request
/// at a time, so the first poll takes about 60 requests. A quarter of the way in a row
/// lands in `a`, before every key the scan has passed; half-way another lands in `z`,
/// ahead of the scan. The row in `z` is read by this poll; the row in `a` only by the
/// next, which must start early enough to see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_longer_than_the_overlap_skips_no_row_written_behind_its_scan() {
    let world = World::new().await;
    let mut rows: Vec<_> = (0..30)
        .map(|i| {
            lead_row(
                "a",
                &format!("r{i:03}"),
                "AzureMarketplace-INS | contoso.analytics",
                customer(i),
            )
        })
        .collect();
    rows.extend((0..300).map(|i| {
        lead_row(
            "m",
            &format!("r{i:03}"),
            &format!("AzureMarketplace-INS | contoso.offer{i}"),
            customer(100),
        )
    }));
    world.insert(&rows).await;
    let crm = SlowCrm {
        delay: Duration::from_millis(250),
        ..Default::default()
    };
    let base = serve_crm(&crm).await;
    let settings = settings(&toml(
        &world,
        "page_size = 10",
        &webhook_sink(&base, "100ms"),
        "1250ms",
    ));
    let pipeline = build_pipeline(&settings).unwrap();

    let writer = {
        let source = world.source();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2_500)).await;
            let behind = lead_row(
                "a",
                "a-behind",
                "AzureMarketplace-INS | contoso.analytics",
                customer(200),
            );
            // "a-behind" sorts before "r000": the scan has passed it.
            source.upsert_entity(&behind).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2_500)).await;
            let ahead = lead_row(
                "z",
                "r000",
                "AzureMarketplace-INS | contoso.analytics",
                customer(300),
            );
            source.upsert_entity(&ahead).await.unwrap();
        })
    };
    let cancel = CancellationToken::new();
    let first = pipeline.poll(&cancel).await.unwrap();
    writer.await.unwrap();
    let emails =
        |crm: &SlowCrm| -> Vec<String> { crm.records.lock().unwrap().values().cloned().collect() };
    let after_first = emails(&crm);
    assert!(
        first.duration > Duration::from_millis(1_250) * 4,
        "the poll must outlast the overlap several times: {:?}",
        first.duration
    );
    assert!(after_first.contains(&"customer300@contoso.com".to_owned()));
    assert!(
        !after_first.contains(&"customer200@contoso.com".to_owned()),
        "the scan had passed the row in `a`: the first poll cannot have read it"
    );

    let second = pipeline.poll(&cancel).await.unwrap();
    let after_second = emails(&crm);
    assert!(
        after_second.contains(&"customer200@contoso.com".to_owned()),
        "the row written behind the scan was skipped: {second:?}"
    );
    assert_eq!(
        after_second.len(),
        33,
        "30 in `a`, one in `m`, the two new customers"
    );
    // Long polls are counted for the operator.
    let metrics = pipeline.memory.metrics.render();
    assert!(metrics.contains("leadsync_long_polls_total 1"), "{metrics}");
}

/// A page of ten customers to a receiver that answers in 700 ms, one at a time (7 s a
/// page), after a first answer of 503 with `Retry-After: 4`, under a watchdog of 2 s:
/// the daemon pings the watchdog throughout, so systemd never takes it for hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_and_a_retry_wait_longer_than_the_watchdog_period_keep_it_fed() {
    let world = World::new().await;
    world.insert(&many_rows(10, 1)).await;
    let crm = SlowCrm {
        delay: Duration::from_millis(700),
        refuse_first: 1,
        retry_after: 4,
        ..Default::default()
    };
    let base = serve_crm(&crm).await;
    let config = world.dir.path().join("leadsync.toml");
    std::fs::write(
        &config,
        toml(&world, "", &webhook_sink(&base, "10s"), "10m"),
    )
    .unwrap();
    let socket_path = world.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let period = Duration::from_secs(2);

    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_leadsync"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", period.as_micros().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pings = vec![started];
    let mut ready = false;
    let deadline = started + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    while !ready {
        assert!(Instant::now() < deadline, "the first poll never ended");
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]);
            if message.lines().any(|l| l == "WATCHDOG=1") {
                pings.push(Instant::now());
            }
            ready = message.lines().any(|l| l == "READY=1");
        }
    }
    let poll = started.elapsed();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);

    assert_eq!(crm.records.lock().unwrap().len(), 10);
    assert!(
        poll > Duration::from_secs(10),
        "a 4 s wait and ten 700 ms answers: {poll:?}"
    );
    let longest = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(poll);
    assert!(
        longest < period,
        "{} pings over {poll:?}, longest gap {longest:?}: systemd would have killed the daemon\n{stderr}",
        pings.len() - 1
    );
    assert!(
        !stderr.contains("No progress within the watchdog period"),
        "{stderr}"
    );
}

/// An entity whose column the JSON reader refuses (a lone UTF-16 surrogate, which the
/// table service stores and returns) sits between good rows: it becomes a rejected row
/// with its keys and reason, the poll goes on, and the next poll does not reject it
/// again.
#[tokio::test]
async fn a_malformed_entity_is_a_rejected_row_and_the_poll_goes_on() {
    let world = World::new().await;
    world.insert(&many_rows(3, 1)).await;
    let service = leadsync::source::service_client(&world.settings().source).unwrap();
    let table = service.table_client(world.table.clone());
    let raw = serde_json::value::RawValue::from_string(
        r#"{"PartitionKey":"p00","RowKey":"r000001x","LeadSource":"AzureMarketplace-INS | x.y","CustomerInfo":"{\"Email\":\"\ud800@contoso.com\"}"}"#
            .to_owned(),
    )
    .unwrap();
    table
        .partition_key_client("p00")
        .entity_client("r000001x")
        .insert_or_replace(&raw)
        .unwrap()
        .await
        .expect("Azurite stores the entity");
    let settings = world.settings();
    let pipeline = build_pipeline(&settings).unwrap();
    let cancel = CancellationToken::new();

    let first = pipeline.poll(&cancel).await.expect("the poll goes on");
    assert_eq!(
        (first.rows_read, first.delivered, first.rejected),
        (4, 3, 1)
    );
    let rejected = pipeline.state.rejected().await.unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].row.id.row_key, "r000001x");
    let reason = format!("{:?}", rejected[0].outcome);
    assert!(reason.contains("malformed entity"), "{reason}");
    assert!(reason.contains("hex escape"), "{reason}");
    let text = rejected[0].columns.as_ref().unwrap()["entity"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.contains(r"\ud800@contoso.com"), "{text}");
    assert_eq!(world.delivered().len(), 3);

    let second = pipeline.poll(&cancel).await.unwrap();
    assert_eq!((second.rejected, second.already_handled), (0, 4));
}

/// A JSONL sink whose file hits a size limit half-way through a batch: the torn part is
/// cut back off, the leads wait, and once the limit is gone every lead is one whole
/// line. (The state is in the table, so the size limit touches the JSONL file alone.)
#[test]
fn a_jsonl_write_that_fails_half_way_leaves_no_torn_line() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let world = rt.block_on(async {
        let world = World::new().await;
        world.insert(&many_rows(40, 1)).await;
        world
    });
    let text = world
        .toml("")
        .replace("[state]\n", "[state]\nbackend = \"table\"\n");
    let config = world.dir.path().join("leadsync.toml");
    std::fs::write(&config, text).unwrap();
    let run = |limit_kib: Option<u32>| {
        let limit = limit_kib.map_or_else(|| "unlimited".to_owned(), |k| k.to_string());
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                "trap '' XFSZ; ulimit -f {limit}; exec \"$0\" --config \"$1\" run --once"
            ))
            .arg(env!("CARGO_BIN_EXE_leadsync"))
            .arg(&config)
            .output()
            .unwrap()
    };
    // 40 leads are about 30 KiB of JSON: 8 KiB cuts the batch in the middle of a line.
    let limited = run(Some(8));
    assert_eq!(limited.status.code(), Some(2), "leads pending: {limited:?}");
    let after_failure = std::fs::read(world.output()).unwrap_or_default();
    assert!(
        after_failure.is_empty() || after_failure.ends_with(b"\n"),
        "a torn line was left: {} bytes",
        after_failure.len()
    );

    let free = run(None);
    assert_eq!(free.status.code(), Some(0), "{free:?}");
    let text = std::fs::read_to_string(world.output()).unwrap();
    let keys: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("a line that is not JSON ({e}): {l:.80}"))["key"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let unique: std::collections::BTreeSet<&String> = keys.iter().collect();
    assert_eq!((keys.len(), unique.len()), (40, 40), "each lead once");
}

/// A sink that delivers to JSONL and whose third sync fails (a full disk).
struct FailsThirdSync {
    inner: JsonlSink,
    syncs: AtomicU64,
    delivered: AtomicU64,
}

#[async_trait::async_trait]
impl LeadSink for FailsThirdSync {
    fn name(&self) -> &str {
        "fails-third-sync"
    }
    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        let outcomes = self.inner.deliver(batch).await;
        let ok = outcomes
            .iter()
            .filter(|o| **o == Outcome::Delivered)
            .count();
        self.delivered.fetch_add(ok as u64, Ordering::SeqCst);
        outcomes
    }
    async fn sync(&self) -> Result<(), SinkError> {
        if self.syncs.fetch_add(1, Ordering::SeqCst) == 2 {
            return Err(SinkError {
                sink: "fails-third-sync".into(),
                message: "No space left on device".into(),
            });
        }
        self.inner.sync().await
    }
    async fn healthcheck(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// `run --once` whose poll fails on its third page: the report (the closing summary
/// line) counts what was read and delivered before the failure, not zero.
#[tokio::test]
async fn a_failed_run_once_reports_what_it_delivered_before_the_failure() {
    let world = World::new().await;
    world.insert(&many_rows(50, 1)).await;
    let settings = world.settings_with("page_size = 10");
    let sink = Arc::new(FailsThirdSync {
        inner: JsonlSink::new(&world.output()),
        syncs: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
    });
    let built = build_pipeline(&settings).unwrap();
    // A delivery window of one page: each page is delivered and synced on its own.
    let pipeline = leadsync::pipeline::Pipeline {
        window_pages: 1,
        ..built.with_sink(sink.clone())
    };
    let report = leadsync::run_pipeline(
        &pipeline,
        &settings,
        RunOptions { once: true },
        CancellationToken::new(),
    )
    .await
    .unwrap();

    assert!(report.last_error.is_some(), "{report:?}");
    assert_eq!(report.exit_code(), 3);
    let delivered = sink.delivered.load(Ordering::SeqCst);
    assert!(delivered >= 30, "{delivered}");
    assert_eq!(report.totals.delivered, delivered, "{report:?}");
    assert!(report.totals.rows_read >= 30, "{report:?}");
}
