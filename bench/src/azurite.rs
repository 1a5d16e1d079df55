//! The pinned Azurite table service on a free loopback port (as tests/common does).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Azurite's well-known development account key (public, documented by Microsoft).
pub const DEV_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running Azurite, killed on drop.
pub struct Azurite {
    child: Child,
    pub port: u16,
    _data: tempfile::TempDir,
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `DefaultEndpointsProtocol=http;...;TableEndpoint=http://127.0.0.1:PORT/devstoreaccount1;`
pub fn connection_string(port: u16) -> String {
    format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_ACCOUNT_KEY};TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
}

impl Azurite {
    /// Starts `tools/azurite` (installed by `npm ci --prefix tools/azurite`) under `root`,
    /// its data on disk, or only in memory (`in_memory`: Azurite's on-disk store slows
    /// down as it grows, and saves block it; a million rows take over 30 minutes to seed).
    pub fn start(root: &Path, in_memory: bool) -> anyhow::Result<Azurite> {
        let script = root.join("tools/azurite/node_modules/azurite/dist/src/table/main.js");
        if !script.exists() {
            bail!(
                "Azurite is not installed at {}: run `npm ci --prefix tools/azurite`",
                script.display()
            );
        }
        for _ in 0..3 {
            let port = free_port()?;
            let data = tempfile::tempdir()?;
            // Azurite keeps every entity in the V8 heap: a million rows need more than
            // Node's default limit. Its stderr goes to a file named in errors.
            let log = std::env::temp_dir().join(format!("leadsync-bench-azurite-{port}.log"));
            let mut command = Command::new("node");
            command.arg("--max-old-space-size=8192").arg(&script).args([
                "--tableHost",
                "127.0.0.1",
                "--tablePort",
                &port.to_string(),
            ]);
            if in_memory {
                command.arg("--inMemoryPersistence");
            } else {
                command.arg("--location").arg(data.path());
            }
            let mut child = command
                .args([
                    "--skipApiVersionCheck",
                    "--disableProductStyleUrl",
                    "--disableTelemetry",
                    "--silent",
                ])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .context("start node (Node.js 20 is required)")?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Azurite {
                        child,
                        port,
                        _data: data,
                    });
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        bail!("Azurite did not start on a free port after 3 tries")
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
