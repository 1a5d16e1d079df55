//! Test helpers: a real Azurite on a free loopback port, settings pointing at it,
//! and marketplace-shaped rows.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use leadsync::config::Settings;
use leadsync::source::TableSource;
use serde_json::{json, Map, Value};

#[allow(unused_imports)] // each test crate uses a part of this module
pub use leadsync_testkit::{Azurite, DEV_ACCOUNT_KEY};

/// Starts the pinned Azurite of this repository (`leadsync_testkit`), data on disk.
pub fn start_azurite() -> Azurite {
    Azurite::start(Path::new(env!("CARGO_MANIFEST_DIR"))).expect("start Azurite")
}

/// Where a world's leadsync keeps its state (`state.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The redb file under `state.dir`.
    File,
    /// The Azure table `LeadsyncState` in the source's account (Azurite here).
    Table,
}

/// A test's world: Azurite, a table, a state dir and a JSONL output file.
pub struct World {
    pub azurite: Azurite,
    pub dir: tempfile::TempDir,
    pub table: String,
    /// The state backend every config of this world names.
    pub backend: Backend,
}

impl World {
    pub async fn new() -> World {
        Self::with_backend(Backend::File).await
    }

    /// A world whose configs keep state in `backend`.
    pub async fn with_backend(backend: Backend) -> World {
        Self::on(start_azurite(), backend).await
    }

    /// A world whose storage service's clock is `offset_ms` ahead of this host's
    /// (negative: behind); see `Azurite::start_with_clock_offset`.
    pub async fn with_clock_offset(offset_ms: i64) -> World {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let azurite = Azurite::start_with_clock_offset(root, offset_ms).expect("start Azurite");
        Self::on(azurite, Backend::File).await
    }

    async fn on(azurite: Azurite, backend: Backend) -> World {
        let dir = tempfile::tempdir().expect("temp dir");
        let world = World {
            azurite,
            dir,
            table: "MarketplaceLeads".into(),
            backend,
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
        let backend = match self.backend {
            Backend::File => "",
            // The shortest lease allowed: a killed process's lease ends soon.
            Backend::Table => "backend = \"table\"\nlease_ttl = \"5s\"\n",
        };
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
{backend}dir = "{state}"

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

    /// The state store this world's configs name (the file store locks its file:
    /// drop it before running leadsync again).
    pub fn state(&self) -> std::sync::Arc<dyn leadsync::state::StateStore> {
        leadsync::open_state(&self.settings()).expect("open the state store")
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

    /// The JSON objects the JSONL sink wrote, in order. Read while a daemon runs, the
    /// file may end in a line still being appended: only lines ending in a newline count.
    pub fn delivered(&self) -> Vec<Value> {
        match std::fs::read_to_string(self.output()) {
            Ok(text) => text
                .split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .map(|l| serde_json::from_str(l).expect("each complete line is JSON"))
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
        let pipeline = built.with_sink(sink);
        pipeline
            .poll(&tokio_util::sync::CancellationToken::new())
            .await
            .expect("poll")
    }
}

/// What a test's subscriber logged (see [`capture_logs`]).
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Captures this thread's logs (tokio tests run on one thread) through `filter`, as
/// text without colours, until the guard is dropped.
pub fn capture_logs(
    filter: tracing_subscriber::EnvFilter,
) -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

/// A merged customer lead from marketplace rows, one per `lead_sources` entry, a day
/// apart, oldest first (the sinks' tests: what the pipeline would hand them).
pub fn merged_lead(customer_info: Value, lead_sources: &[&str]) -> leadsync::sink::CustomerLead {
    use leadsync::identity::{CustomerKey, CustomerState, IdentitySettings};
    use leadsync::source::row::{RawRow, RowId};
    let identity = IdentitySettings::default();
    let events: Vec<_> = lead_sources
        .iter()
        .enumerate()
        .map(|(i, ls)| {
            let Value::Object(columns) = json!({
                "LeadSource": ls,
                "CustomerInfo": customer_info.to_string(),
                "OfferDisplayName": "Contoso Analytics",
            }) else {
                unreachable!()
            };
            leadsync::lead::normalise(&RawRow {
                id: RowId::new("p", format!("r{i}")),
                etag: format!("W/{i}"),
                timestamp: leadsync::timestamp::parse(&format!("2024-05-0{}T10:00:00Z", i + 1))
                    .unwrap(),
                columns,
            })
            .unwrap()
        })
        .collect();
    let email = customer_info["Email"]
        .as_str()
        .unwrap_or("nobody@example.com");
    let mut state = CustomerState::new(&CustomerKey::Email(email.to_lowercase()), &identity);
    state.apply(&events, &identity);
    state.lead
}

/// `leadsync run --once` in process: drains what is new once and returns what it did.
pub async fn run_once(settings: &Settings) -> leadsync::RunReport {
    leadsync::run(
        settings,
        leadsync::RunOptions { once: true },
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("leadsync starts")
}

/// A settings section (`[sink.<kind>]`'s keys) read from TOML text, as the config does.
pub fn section<T: serde::de::DeserializeOwned>(text: &str) -> T {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .unwrap()
        .try_deserialize()
        .unwrap_or_else(|e| panic!("{e}: {text}"))
}
