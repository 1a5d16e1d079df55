//! The operators' alert rules and dashboard in `deploy/` use only metrics leadsync
//! exports (no promtool, no Grafana, no Azurite): every `leadsync_*` name in
//! `deploy/prometheus/leadsync-rules.yml`, its unit tests and
//! `deploy/grafana/leadsync-dashboard.json` is a series of the real exposition, so a
//! renamed metric fails here rather than in a silent alert. Also: every alert has a
//! promtool test, a severity, a summary, a description and a runbook section in
//! docs/operations.md, and the dashboard shows every metric.
//!
//! promtool itself (syntax, PromQL, the unit tests) runs in deploy/prometheus/verify.sh
//! where it is installed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use leadsync::pipeline::PollSummary;
use leadsync::service::Metrics;

fn read(path: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The exposition of a daemon that polled, delivered, called its sink and saw the
/// sink's endpoint fail, so that every labelled family has a series.
fn exposition() -> String {
    let metrics = Metrics::default();
    let summary = PollSummary {
        rows_read: 3,
        delivered: 2,
        rejected: 1,
        records_sent: 2,
        duration: Duration::from_millis(40),
        ..PollSummary::default()
    };
    metrics.observe_poll(&["webhook"], Ok(&summary));
    metrics.observe_poll(&["webhook"], Err(()));
    metrics.observe_sink_call("webhook", Duration::from_millis(20));
    metrics.endpoint_failed("webhook", "401 Unauthorized");
    metrics.saw_long_poll();
    metrics.render()
}

/// Metric family -> type, from the exposition's `# TYPE` lines.
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("# TYPE name type");
            (name.to_owned(), kind.to_owned())
        })
        .collect()
}

/// The family a queried name belongs to: a gauge by its own name, a counter by
/// `_total`, a histogram by `_bucket`, `_sum` or `_count`. None: no such series.
fn family_of<'a>(name: &str, families: &'a BTreeMap<String, String>) -> Option<&'a str> {
    let kind_of = |family: &str| families.get_key_value(family);
    if let Some((family, kind)) = kind_of(name) {
        return (kind == "gauge").then_some(family.as_str());
    }
    for (suffix, wanted) in [
        ("_total", "counter"),
        ("_bucket", "histogram"),
        ("_sum", "histogram"),
        ("_count", "histogram"),
    ] {
        if let Some((family, kind)) = name.strip_suffix(suffix).and_then(kind_of) {
            if kind == wanted {
                return Some(family.as_str());
            }
        }
    }
    None
}

/// Every `leadsync_[a-z0-9_]+` in `text` that is not the tail of a longer identifier.
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let is_name = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("leadsync_").map(|i| from + i) {
        let mut end = at + "leadsync_".len();
        while end < bytes.len() && is_name(bytes[end]) {
            end += 1;
        }
        let glued = at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        if !glued {
            names.insert(text[at..end].to_owned());
        }
        from = end;
    }
    names
}

/// Every string under an `expr` or `query`/`definition` key of the dashboard
/// (panels' targets and the template variables).
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition" | "query", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("deploy/grafana/leadsync-dashboard.json"))
        .expect("the dashboard is JSON")
}

#[test]
fn the_name_scan_resolves_counters_gauges_and_histograms_and_rejects_the_rest() {
    let families = families(&exposition());
    let resolve = |name: &str| family_of(name, &families);

    assert_eq!(resolve("leadsync_rows_total"), Some("leadsync_rows"));
    assert_eq!(
        resolve("leadsync_pending_rows"),
        Some("leadsync_pending_rows")
    );
    assert_eq!(
        resolve("leadsync_poll_duration_seconds_bucket"),
        Some("leadsync_poll_duration_seconds")
    );
    assert_eq!(resolve("leadsync_poll_duration_seconds"), None);
    assert_eq!(resolve("leadsync_rows"), None);
    assert_eq!(resolve("leadsync_pending_rows_total"), None);
    assert_eq!(resolve("leadsync_rows_sum"), None);
    assert_eq!(
        metric_names("rate(leadsync_a_total{x=\"y\"}[5m]) / my_leadsync_b + leadsync_c"),
        ["leadsync_a_total", "leadsync_c"].map(String::from).into()
    );
}

#[test]
fn every_exported_series_belongs_to_a_family_the_scan_resolves() {
    let exposition = exposition();
    let families = families(&exposition);
    let series: BTreeSet<&str> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();

    let unresolved: Vec<_> = series
        .iter()
        .filter(|s| family_of(s, &families).is_none())
        .collect();
    assert!(unresolved.is_empty(), "{unresolved:?} in\n{exposition}");
    let without_series: Vec<_> = families
        .keys()
        .filter(|f| !series.iter().any(|s| family_of(s, &families) == Some(f)))
        .collect();
    assert!(
        without_series.is_empty(),
        "exposition() makes no series of {without_series:?}"
    );
}

#[test]
fn the_alert_rules_their_tests_and_the_dashboard_use_only_exported_metrics() {
    let families = families(&exposition());
    let mut queries = Vec::new();
    dashboard_queries(&dashboard(), &mut queries);
    let sources = [
        (
            "deploy/prometheus/leadsync-rules.yml",
            read("deploy/prometheus/leadsync-rules.yml"),
        ),
        (
            "deploy/prometheus/leadsync-rules.test.yml",
            read("deploy/prometheus/leadsync-rules.test.yml"),
        ),
        ("deploy/grafana/leadsync-dashboard.json", queries.join("\n")),
    ];

    let mut unknown = Vec::new();
    for (file, text) in &sources {
        let names = metric_names(text);
        assert!(!names.is_empty(), "{file} names no leadsync_ metric");
        for name in names {
            if family_of(&name, &families).is_none() {
                unknown.push(format!("{file}: {name}"));
            }
        }
    }

    assert!(
        unknown.is_empty(),
        "not exported by leadsync (families: {:?}):\n{}",
        families,
        unknown.join("\n")
    );
}

#[test]
fn the_dashboard_shows_every_exported_metric_from_the_chosen_data_source() {
    let families = families(&exposition());
    let dashboard = dashboard();
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let shown: BTreeSet<&str> = metric_names(&queries.join("\n"))
        .iter()
        .filter_map(|n| family_of(n, &families))
        .collect();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let sources = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .map(|p| &p["datasource"]["uid"]);

    let missing: Vec<_> = families
        .keys()
        .filter(|f| !shown.contains(f.as_str()))
        .collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");
    assert!(variables
        .iter()
        .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"));
    for uid in sources {
        assert_eq!(uid, "${DS_PROMETHEUS}");
    }
}

#[test]
fn every_alert_has_a_severity_a_runbook_section_and_a_promtool_test() {
    let rules = read("deploy/prometheus/leadsync-rules.yml");
    let tests = read("deploy/prometheus/leadsync-rules.test.yml");
    let operations = read("docs/operations.md");
    let headings: BTreeSet<String> = operations
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| l.trim_start_matches('#').trim().to_lowercase())
        .collect();

    let alerts: Vec<&str> = rules.split("- alert: ").skip(1).collect();
    assert!(alerts.len() >= 5, "{rules}");
    for rule in alerts {
        let name = rule.lines().next().unwrap().trim();
        for part in [
            "for: ",
            "severity: ",
            "summary: ",
            "description: ",
            "runbook: ",
        ] {
            assert!(rule.contains(part), "{name} has no {part:?}");
        }
        let anchor = format!("docs/operations.md#{}", name.to_lowercase());
        assert!(rule.contains(&anchor), "{name}'s runbook is not {anchor}");
        assert!(
            headings.contains(&name.to_lowercase()),
            "docs/operations.md has no heading {name}"
        );
        // Some evaluation of this alert expects it with labels: it fires somewhere.
        let fires = tests
            .split("alertname: ")
            .filter(|case| case.lines().next().map(str::trim) == Some(name))
            .any(|case| case.contains("exp_labels:"));
        assert!(
            fires,
            "leadsync-rules.test.yml never expects {name} to fire"
        );
    }
}
