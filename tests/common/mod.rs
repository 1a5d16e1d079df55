//! Test helpers: a real Azurite on a free loopback port, settings pointing at it,
//! and marketplace-shaped rows.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use leadsync::config::Settings;
use leadsync::source::TableSource;
use serde_json::{json, Map, Value};

/// Azurite's well-known development account key (public, documented by Microsoft).
pub const DEV_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running Azurite table service, killed on drop.
pub struct Azurite {
    child: Child,
    pub port: u16,
    _data: tempfile::TempDir,
}

fn azurite_script() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools/azurite/node_modules/azurite/dist/src/table/main.js");
    assert!(
        path.exists(),
        "Azurite is not installed at {}: run `scripts/test.sh` (or `npm ci --prefix tools/azurite`) first",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn spawn_azurite(port: u16, data: &Path) -> Child {
    Command::new("node")
        .arg(azurite_script())
        .args(["--tableHost", "127.0.0.1", "--tablePort", &port.to_string()])
        .arg("--location")
        .arg(data)
        .args([
            "--skipApiVersionCheck",
            "--disableProductStyleUrl",
            "--disableTelemetry",
            "--silent",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start node (Node.js 20 is required)")
}

fn wait_listening(port: u16, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

impl Azurite {
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

    /// Starts the service again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            let mut child = spawn_azurite(self.port, self._data.path());
            if wait_listening(self.port, &mut child) {
                self.child = child;
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("Azurite did not restart on port {}", self.port);
    }

    /// Starts the table service on a free port with its data in a temp dir.
    pub fn start() -> Azurite {
        let script = azurite_script();
        for _ in 0..3 {
            let port = free_port();
            let data = tempfile::tempdir().expect("temp dir");
            let mut child = Command::new("node")
                .arg(&script)
                .args(["--tableHost", "127.0.0.1", "--tablePort", &port.to_string()])
                .arg("--location")
                .arg(data.path())
                .args([
                    "--skipApiVersionCheck",
                    "--disableProductStyleUrl",
                    "--disableTelemetry",
                    "--silent",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start node (Node.js 20 is required)");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Azurite {
                        child,
                        port,
                        _data: data,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("Azurite did not start on a free port after 3 tries");
    }

    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_ACCOUNT_KEY};TableEndpoint=http://127.0.0.1:{}/devstoreaccount1;",
            self.port
        )
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test's world: Azurite, a table, a state dir and a JSONL output file.
pub struct World {
    pub azurite: Azurite,
    pub dir: tempfile::TempDir,
    pub table: String,
}

impl World {
    pub async fn new() -> World {
        let azurite = Azurite::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let world = World {
            azurite,
            dir,
            table: "MarketplaceLeads".into(),
        };
        world
            .source()
            .create_table_if_missing()
            .await
            .expect("create table");
        world
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn output(&self) -> PathBuf {
        self.dir.path().join("leads.jsonl")
    }

    /// The TOML a test runs with; `extra` is appended to `[source]`.
    pub fn toml(&self, extra: &str) -> String {
        let sink = format!(
            "[sink]\nkind = \"jsonl\"\njsonl = {{ path = \"{}\" }}\n",
            self.output().display()
        );
        self.toml_with_sink(extra, &sink)
    }

    /// As [`World::toml`] with the whole `[sink]` part given (e.g. `[sink]\nkind = "salesforce"\n[sink.salesforce]\n...`).
    pub fn toml_with_sink(&self, extra: &str, sink: &str) -> String {
        format!(
            r#"
[source]
table = "{table}"
connection_string = {{ value = "{cs}" }}
overlap = "10m"
retry = {{ max_attempts = 3, initial_backoff = "50ms", max_backoff = "200ms" }}
request_timeout = "10s"
{extra}
[state]
dir = "{state}"

[run]
poll_interval = "200ms"

{sink}
"#,
            table = self.table,
            cs = self.azurite.connection_string(),
            state = self.state_dir().display(),
        )
    }

    /// Settings with the whole `[sink]` part given.
    pub fn settings_with_sink(&self, sink: &str) -> Settings {
        let text = self.toml_with_sink("", sink);
        Settings::from_toml_with_env(&text, Path::new("test.toml"), &HashMap::new())
            .unwrap_or_else(|e| panic!("test settings are invalid: {e}"))
    }

    pub fn settings(&self) -> Settings {
        self.settings_with("")
    }

    /// Settings with extra lines in the `[source]` section.
    pub fn settings_with(&self, source_extra: &str) -> Settings {
        let text = self.toml(source_extra);
        Settings::from_toml_with_env(&text, Path::new("test.toml"), &HashMap::new())
            .expect("test settings are valid")
    }

    /// Writes a config file with the whole `[sink]` part given.
    pub fn config_file_with_sink(&self, source_extra: &str, sink: &str) -> PathBuf {
        let path = self.dir.path().join("leadsync.toml");
        std::fs::write(&path, self.toml_with_sink(source_extra, sink)).expect("write config");
        path
    }

    pub fn config_file(&self, source_extra: &str) -> PathBuf {
        let path = self.dir.path().join("leadsync.toml");
        std::fs::write(&path, self.toml(source_extra)).expect("write config");
        path
    }

    pub fn source(&self) -> TableSource {
        let text = self.toml("");
        let settings = Settings::from_toml_with_env(&text, Path::new("test.toml"), &HashMap::new())
            .expect("test settings are valid");
        TableSource::connect(&settings.source).expect("table client")
    }

    pub async fn insert(&self, rows: &[Map<String, Value>]) {
        let source = self.source();
        for row in rows {
            source.upsert_entity(row).await.expect("insert row");
        }
    }

    /// The JSON objects the JSONL sink wrote, in order.
    pub fn delivered(&self) -> Vec<Value> {
        match std::fs::read_to_string(self.output()) {
            Ok(text) => text
                .lines()
                .map(|l| serde_json::from_str(l).expect("each line is JSON"))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// `(PartitionKey, RowKey)` of every history entry of every delivered record.
    pub fn delivered_keys(&self) -> Vec<(String, String)> {
        self.delivered()
            .iter()
            .flat_map(|v| v["history"].as_array().unwrap().clone())
            .map(|h| {
                (
                    h["row"]["partition_key"].as_str().unwrap().to_owned(),
                    h["row"]["row_key"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// The last delivered record of each customer, by external key.
    pub fn latest_records(&self) -> std::collections::BTreeMap<String, Value> {
        self.delivered()
            .into_iter()
            .map(|v| (v["external_key"].as_str().unwrap().to_owned(), v))
            .collect()
    }
}

/// A marketplace-shaped row.
pub fn lead_row(pk: &str, rk: &str, lead_source: &str, customer: Value) -> Map<String, Value> {
    let row = json!({
        "PartitionKey": pk,
        "RowKey": rk,
        "LeadSource": lead_source,
        "ActionCode": "",
        "CustomerInfo": customer.to_string(),
        "OfferDisplayName": "Contoso Analytics",
        "Description": "Campaigns: ",
        "CreatedTime": "2024-05-01T10:00:00Z",
    });
    match row {
        Value::Object(map) => map,
        _ => unreachable!(),
    }
}

/// A plausible customer with a unique email.
pub fn customer(n: usize) -> Value {
    json!({
        "FirstName": format!("First{n}"),
        "LastName": format!("Last{n}"),
        "Email": format!("customer{n}@contoso.com"),
        "Phone": "1234567890",
        "Country": "US",
        "Company": format!("Company {n}"),
        "Title": "CTO",
    })
}

/// `n` ordinary rows spread over `partitions` partitions.
pub fn many_rows(n: usize, partitions: usize) -> Vec<Map<String, Value>> {
    (0..n)
        .map(|i| {
            lead_row(
                &format!("p{:02}", i % partitions),
                &format!("r{i:06}"),
                "AzureMarketplace-INS | contoso.analytics",
                customer(i),
            )
        })
        .collect()
}

/// Serves an axum router on a free loopback port; returns its base URL (`http://127.0.0.1:PORT`).
/// The server stops when the test's runtime ends.
pub async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.expect("fake server");
    });
    format!("http://{addr}")
}

/// A sink that upserts into memory by external key, like a CRM would, and counts deliveries.
#[derive(Default)]
pub struct MemorySink {
    pub records: std::sync::Mutex<std::collections::BTreeMap<String, leadsync::sink::CustomerLead>>,
    pub deliveries: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
}

#[async_trait::async_trait]
impl leadsync::sink::LeadSink for MemorySink {
    fn name(&self) -> &str {
        "memory"
    }
    async fn deliver(
        &self,
        batch: &[leadsync::sink::CustomerLead],
    ) -> Vec<leadsync::sink::Outcome> {
        let mut records = self.records.lock().unwrap();
        let mut deliveries = self.deliveries.lock().unwrap();
        for lead in batch {
            records.insert(lead.external_key.clone(), lead.clone());
            *deliveries.entry(lead.external_key.clone()).or_default() += 1;
        }
        vec![leadsync::sink::Outcome::Delivered; batch.len()]
    }
    async fn healthcheck(&self) -> Result<(), leadsync::sink::SinkError> {
        Ok(())
    }
}

impl World {
    /// Runs one poll with `sink` in place of the configured one; the state file is
    /// closed afterwards, so each call is a restart.
    pub async fn poll_with(
        &self,
        settings: &Settings,
        sink: std::sync::Arc<dyn leadsync::sink::LeadSink>,
    ) -> leadsync::pipeline::PollSummary {
        let built = leadsync::build_pipeline(settings).expect("pipeline");
        let pipeline = leadsync::pipeline::Pipeline { sink, ..built };
        pipeline
            .poll(&tokio_util::sync::CancellationToken::new())
            .await
            .expect("poll")
    }
}
