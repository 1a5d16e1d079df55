//! What leadsync's tests (`tests/common`) and benchmarks (`bench/`) share: the pinned
//! Azurite table service, started on a free loopback port with its data in a temp dir.
//! Nothing on the storage side is mocked: this is the real emulator, installed by
//! `npm ci --prefix tools/azurite` (`scripts/test.sh` and `bench/run.sh` do it). With the
//! feature `smtp`, [`smtp`] is an SMTP server in process for the email sink.

#[cfg(feature = "smtp")]
pub mod smtp;

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Azurite's well-known development account key (public, documented by Microsoft).
pub const DEV_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// `DefaultEndpointsProtocol=http;...;TableEndpoint=http://127.0.0.1:PORT/devstoreaccount1;`
pub fn connection_string(port: u16) -> String {
    format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_ACCOUNT_KEY};TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
}

/// A port nobody listens on now (bound and released), and not handed out before by this
/// process. Tests start Azurites in parallel, and Node takes a moment to listen: the
/// kernel may offer a port again in that moment, and the second Azurite would then fail
/// to bind while the first one answered its readiness check (a test talking to
/// another test's Azurite, refused when that one stops).
pub fn free_port() -> anyhow::Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    bail!("no free loopback port that this process has not used already")
}

/// How to run Azurite.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Keep the tables in memory only (`--inMemoryPersistence`): Azurite's on-disk store
    /// slows down as it grows (a million rows take over 30 minutes to seed on disk).
    pub in_memory: bool,
    /// Node's heap limit in MiB (`--max-old-space-size`); Azurite keeps every entity in
    /// the V8 heap, and a million rows need more than Node's default.
    pub max_heap_mib: Option<u32>,
    /// Where Azurite's stderr goes (named in start errors); discarded when unset.
    pub log: Option<PathBuf>,
}

/// A running Azurite table service, killed on drop.
pub struct Azurite {
    child: Child,
    pub port: u16,
    script: PathBuf,
    options: Options,
    data: tempfile::TempDir,
    /// Milliseconds the emulator's clock is ahead of the host's (negative: behind).
    clock_offset_ms: i64,
}

impl Azurite {
    /// Starts `tools/azurite` of the repository at `root` on a free port, data on disk.
    pub fn start(root: &Path) -> anyhow::Result<Azurite> {
        Self::start_with(root, Options::default())
    }

    /// Starts `tools/azurite` of the repository at `root` on a free port (three tries,
    /// in case another process takes the port first).
    pub fn start_with(root: &Path, options: Options) -> anyhow::Result<Azurite> {
        Self::start_inner(root, options, 0)
    }

    /// As [`Azurite::start`], with the emulator's clock `offset_ms` milliseconds ahead of
    /// the host's (negative: behind), as a storage service's clock may differ from the
    /// client's: its `Date` headers and the `Timestamp`s it stamps entities with are
    /// shifted (`testkit/clock-offset.js`, preloaded into Node). Only the clock moves;
    /// the service is the same real emulator.
    pub fn start_with_clock_offset(root: &Path, offset_ms: i64) -> anyhow::Result<Azurite> {
        Self::start_inner(root, Options::default(), offset_ms)
    }

    fn start_inner(root: &Path, options: Options, clock_offset_ms: i64) -> anyhow::Result<Azurite> {
        let script = root.join("tools/azurite/node_modules/azurite/dist/src/table/main.js");
        if !script.exists() {
            bail!(
                "Azurite is not installed at {}: run `scripts/test.sh` (or `npm ci --prefix tools/azurite`) first",
                script.display()
            );
        }
        let data = tempfile::tempdir().context("temp dir for Azurite's data")?;
        for _ in 0..3 {
            let port = free_port()?;
            let mut child = spawn(&script, port, data.path(), &options, clock_offset_ms)?;
            if wait_listening(port, &mut child) {
                return Ok(Azurite {
                    child,
                    port,
                    script,
                    options,
                    data,
                    clock_offset_ms,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = match &options.log {
            Some(log) => format!(" (its log: {})", log.display()),
            None => String::new(),
        };
        bail!("Azurite did not start on a free port after 3 tries{log}")
    }

    /// The Node process serving the tables (to read what it costs from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// This instance's connection string.
    pub fn connection_string(&self) -> String {
        connection_string(self.port)
    }

    /// Stops the service (SIGINT, on which Azurite saves its data; then SIGKILL if it lingers).
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the service (SIGSTOP): connections are still accepted by the kernel, but
    /// no request is answered until [`Azurite::resume`], like a storage service that
    /// hangs rather than refuses.
    pub fn pause(&self) {
        let _ = Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .status();
    }

    /// Lets a paused service answer again (SIGCONT).
    pub fn resume(&self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
    }

    /// Starts the service again on the same port with the same data (the port may take
    /// a moment to be free again: up to 50 tries).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        for _ in 0..50 {
            let mut child = spawn(
                &self.script,
                self.port,
                self.data.path(),
                &self.options,
                self.clock_offset_ms,
            )?;
            if wait_listening(self.port, &mut child) {
                self.child = child;
                return Ok(());
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("Azurite did not restart on port {}", self.port)
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(
    script: &Path,
    port: u16,
    data: &Path,
    options: &Options,
    clock_offset_ms: i64,
) -> anyhow::Result<Child> {
    let mut command = Command::new("node");
    if clock_offset_ms != 0 {
        let preload = Path::new(env!("CARGO_MANIFEST_DIR")).join("clock-offset.js");
        command
            .arg("--require")
            .arg(preload)
            .env("LEADSYNC_TEST_CLOCK_OFFSET_MS", clock_offset_ms.to_string());
    }
    if let Some(mib) = options.max_heap_mib {
        command.arg(format!("--max-old-space-size={mib}"));
    }
    command
        .arg(script)
        .args(["--tableHost", "127.0.0.1", "--tablePort", &port.to_string()]);
    if options.in_memory {
        command.arg("--inMemoryPersistence");
    } else {
        command.arg("--location").arg(data);
    }
    let stderr = match &options.log {
        Some(log) => Stdio::from(
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?,
        ),
        None => Stdio::null(),
    };
    command
        .args([
            "--skipApiVersionCheck",
            "--disableProductStyleUrl",
            "--disableTelemetry",
            "--silent",
        ])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .context("start node (Node.js 20 is required)")
}

/// Waits up to 20 s for the port to answer an HTTP request; false if the process exits
/// first. An accepted connection alone is not enough: a test once had its first request
/// reset by an Azurite that accepted connections before it served them.
fn wait_listening(port: u16, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if answers_http(port) {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Whether the port answers a request with an HTTP status line (any status: an
/// unauthenticated request is refused, and that is an answer).
fn answers_http(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!(
        "GET /devstoreaccount1/Tables HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 8];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_handed_out_once_per_process() {
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let unique: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
    }
}
