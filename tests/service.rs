//! Running as a service: systemd notify messages, and the metrics/health listener.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{many_rows, World};
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn under_systemd_it_reports_ready_pings_the_watchdog_and_reports_stopping() {
    let world = World::new().await;
    world.insert(&many_rows(5, 1)).await;
    let config = world.config_file("");
    let socket_path = world.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_leadsync"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut messages = Vec::new();
    let read_until = |what: &str, messages: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        while !messages.iter().any(|m| m.lines().any(|l| l == what)) {
            assert!(Instant::now() < deadline, "no {what}; got {messages:?}");
            if let Ok(n) = socket.recv(&mut buf) {
                messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    };
    read_until("READY=1", &mut messages);
    read_until("WATCHDOG=1", &mut messages);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    read_until("STOPPING=1", &mut messages);
    let status = child.wait().unwrap();

    assert_eq!(status.code(), Some(0));
    let ready = messages.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS=last poll: 5 rows read"), "{ready}");
}

#[tokio::test]
async fn the_listener_serves_metrics_health_and_readiness() {
    let world = World::new().await;
    world.insert(&many_rows(7, 2)).await;
    let port = free_port();
    let mut settings = world.settings();
    settings.metrics.listen = Some(format!("127.0.0.1:{port}"));
    let cancel = CancellationToken::new();
    let daemon = {
        let (settings, cancel) = (settings.clone(), cancel.clone());
        tokio::spawn(async move {
            leadsync::run(&settings, leadsync::RunOptions { once: false }, cancel).await
        })
    };
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = http.get(format!("{base}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    let status: serde_json::Value = http
        .get(format!("{base}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    cancel.cancel();
    daemon.await.unwrap().unwrap();

    assert_eq!(health.status(), 200);
    assert!(metrics.contains("leadsync_rows_read_total 7"), "{metrics}");
    assert!(
        metrics.contains(r#"leadsync_rows_total{sink="jsonl",outcome="delivered"} 7"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("leadsync_poll_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("leadsync_oldest_undelivered_lead_age_seconds 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("leadsync_sink_request_duration_seconds_count{sink=\"jsonl\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"leadsync_polls_total{result="failed"} 0"#),
        "{metrics}"
    );
    let gauge = |name: &str| -> i64 {
        let line = metrics
            .lines()
            .find(|l| l.split(' ').next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in {metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let polled_at = gauge("leadsync_last_successful_poll_timestamp_seconds");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (now - 60..=now).contains(&polled_at),
        "{polled_at} vs {now}"
    );
    let checkpoint = gauge("leadsync_checkpoint_timestamp_seconds");
    assert!(
        checkpoint > 0 && checkpoint <= polled_at,
        "{checkpoint} vs {polled_at}"
    );
    assert_eq!(status["ready"], true);
}
