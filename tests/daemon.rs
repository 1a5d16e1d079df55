//! The real binary: `run` until SIGTERM, `run --once` exit codes, bad config exit code.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{many_rows, World};
use leadsync::config::Settings;
use leadsync::state::{Lease, RedbStore, StateStore};

fn leadsync() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leadsync"));
    cmd.env_remove("RUST_LOG").stdin(Stdio::null());
    cmd
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn sigterm_while_running_exits_cleanly_with_the_checkpoint_persisted() {
    let world = World::new().await;
    world.insert(&many_rows(40, 3)).await;
    let config = world.config_file("");
    let mut child = leadsync()
        .args(["--config"])
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    wait_for("40 delivered leads", Duration::from_secs(30), || {
        world.delivered().len() == 40
    });
    // Keep it polling a while (past the next whole second on the service's clock: a
    // poll's checkpoint never passes the `Date`, in whole seconds, of its first page),
    // then stop it as systemd would.
    std::thread::sleep(Duration::from_millis(1_500));
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "leadsync did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert_eq!(exit.code(), Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("Shutdown requested"), "stderr:\n{stderr}");
    let state = RedbStore::open(&world.state_dir()).unwrap();
    let checkpoint = state.checkpoint().await.unwrap();
    let newest = world
        .source()
        .fetch_page(None, None, &Default::default())
        .await
        .unwrap()
        .rows
        .iter()
        .map(|r| r.timestamp)
        .max();
    assert_eq!(
        checkpoint, newest,
        "the checkpoint is the newest Timestamp, at full precision"
    );
}

#[tokio::test]
async fn run_once_exits_zero_when_everything_is_settled_and_prints_a_summary() {
    let world = World::new().await;
    world.insert(&many_rows(3, 1)).await;
    let config = world.config_file("");

    let out = leadsync()
        .args(["--config"])
        .arg(&config)
        .args(["--log-format", "json", "run", "--once"])
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("3 delivered"), "stderr:\n{stderr}");
    let poll_line = stderr
        .lines()
        .find(|l| l.contains("Poll finished."))
        .expect("a summary line per poll");
    let json: serde_json::Value = serde_json::from_str(poll_line).expect("JSON logs");
    assert_eq!(json["rows_read"], 3);
    assert_eq!(json["new_leads"], 3);
    assert!(
        !stderr.contains(common::DEV_ACCOUNT_KEY),
        "the account key leaked into logs"
    );
    assert_eq!(world.delivered().len(), 3);
}

#[tokio::test]
async fn run_once_exits_nonzero_when_the_table_cannot_be_read() {
    let world = World::new().await;
    let config = world.config_file("");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("MarketplaceLeads", "MissingLeads");
    std::fs::write(&config, text).unwrap();

    let out = leadsync()
        .args(["--config"])
        .arg(&config)
        .args(["run", "--once"])
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr:\n{stderr}");
    assert!(
        stderr.contains("MissingLeads does not exist"),
        "stderr:\n{stderr}"
    );
}

/// A config file with the table state backend.
fn table_config(world: &World) -> std::path::PathBuf {
    let config = world.config_file("");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[state]\n", "[state]\nbackend = \"table\"\n");
    std::fs::write(&config, text).unwrap();
    config
}

/// Takes the processing lease in the configured state table, as another leadsync would.
async fn hold_lease(config: &std::path::Path, owner: &str) -> std::sync::Arc<dyn StateStore> {
    let settings = Settings::load(config).unwrap();
    let store = leadsync::state::table::open(&settings.source, &settings.state).unwrap();
    let lease = store
        .acquire_lease(owner, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(lease, Lease::Held);
    store
}

fn leadsync_with(config: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let out = leadsync()
        .args(["--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const HOLDER: &str = "other-host:4242:c0ffee00";
const REPLAY: &[&str] = &["replay", "--since", "2000-01-01T00:00:00Z"];
const DLQ_RETRY: &[&str] = &["dlq", "retry", "--all"];

#[tokio::test]
async fn run_once_exits_4_naming_the_holder_when_another_leadsync_holds_the_lease() {
    // Arrange
    let world = World::new().await;
    world.insert(&many_rows(3, 1)).await;
    let config = table_config(&world);
    let _holder = hold_lease(&config, HOLDER).await;

    // Act
    let (code, stderr) = leadsync_with(&config, &["run", "--once"]);

    // Assert
    assert_eq!(code, Some(4), "stderr:\n{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("leadsync: ")
            && last.contains("processing lease")
            && last.contains(HOLDER),
        "a one-line reason naming the holder, last: {last}\nstderr:\n{stderr}"
    );
    assert!(world.delivered().is_empty(), "nothing was processed");
}

#[tokio::test]
async fn replay_and_dlq_retry_take_the_lease_and_refuse_while_another_leadsync_holds_it() {
    // Arrange
    let world = World::new().await;
    world.insert(&many_rows(3, 1)).await;
    let config = table_config(&world);
    let holder = hold_lease(&config, HOLDER).await;

    // Act
    let (replay_code, replay_err) = leadsync_with(&config, REPLAY);
    let (retry_code, retry_err) = leadsync_with(&config, DLQ_RETRY);
    let delivered_while_held = world.delivered().len();
    holder.release_lease(HOLDER).await.unwrap();
    let (free_code, free_err) = leadsync_with(&config, REPLAY);
    let after = holder.acquire_lease("next", Duration::from_secs(60)).await;

    // Assert
    assert_eq!(replay_code, Some(4), "stderr:\n{replay_err}");
    assert!(replay_err.contains(HOLDER), "stderr:\n{replay_err}");
    assert_eq!(retry_code, Some(4), "stderr:\n{retry_err}");
    assert!(retry_err.contains(HOLDER), "stderr:\n{retry_err}");
    assert_eq!(delivered_while_held, 0, "a refused command did nothing");
    assert_eq!(free_code, Some(0), "stderr:\n{free_err}");
    assert_eq!(world.delivered().len(), 3);
    assert_eq!(
        after.unwrap(),
        Lease::Held,
        "replay gave the lease up when it finished"
    );
}

#[tokio::test]
async fn replay_and_dlq_retry_exit_4_with_a_clear_message_while_a_daemon_holds_the_state_file() {
    // Arrange: a daemon on the file backend.
    let world = World::new().await;
    world.insert(&many_rows(3, 1)).await;
    let config = world.config_file("");
    let mut daemon = leadsync()
        .args(["--config"])
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("3 delivered leads", Duration::from_secs(30), || {
        world.delivered().len() == 3
    });

    // Act
    let (replay_code, replay_err) = leadsync_with(&config, REPLAY);
    let (retry_code, retry_err) = leadsync_with(&config, DLQ_RETRY);
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();

    // Assert
    for (code, stderr) in [(replay_code, replay_err), (retry_code, retry_err)] {
        assert_eq!(code, Some(4), "stderr:\n{stderr}");
        assert!(
            stderr.contains("a leadsync daemon or command is running on this state directory"),
            "stderr:\n{stderr}"
        );
    }
    assert_eq!(world.delivered().len(), 3, "nothing sent twice");
}

#[test]
fn a_bad_config_exits_one_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[source]\nconnection_string = { value = \"UseDevelopmentStorage=true\" }\npoll = 1\n",
    )
    .unwrap();

    let out = leadsync()
        .args(["--config"])
        .arg(&config)
        .args(["run", "--once"])
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("source.poll"), "{stderr}");
    assert!(stderr.contains("bad.toml"), "{stderr}");
}
