//! Config loading: every invalid fixture names its key; valid fixtures and the
//! shipped examples load; environment layering; secrets stay secret.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use leadsync::config::{ConfigError, DoNotContactPolicy, LogFormat, Settings};
use proptest::prelude::*;

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

fn no_env() -> HashMap<String, String> {
    HashMap::new()
}

#[test]
fn each_invalid_fixture_fails_with_a_message_that_names_the_key_and_the_file() {
    for path in fixtures("invalid") {
        let text = std::fs::read_to_string(&path).unwrap();
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an `# expect: key` line", path.display()));

        let err = Settings::load_with_env(&path, &no_env())
            .expect_err(&format!("{} should be rejected", path.display()));

        let message = err.to_string();
        assert!(
            message.contains(&format!("`{expected}")),
            "{}: message does not name `{expected}`: {message}",
            path.display()
        );
        assert!(
            message.contains(&path.display().to_string()),
            "{}: message does not name the file: {message}",
            path.display()
        );
    }
}

#[test]
fn each_valid_fixture_loads() {
    for path in fixtures("valid") {
        Settings::load_with_env(&path, &no_env())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn the_shipped_example_configs_load_and_the_full_example_states_the_defaults() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example =
        Settings::load_with_env(&root.join("config/leadsync.example.toml"), &no_env()).unwrap();
    let minimal = Settings::load_with_env(
        &root.join("tests/fixtures/config/valid/minimal.toml"),
        &no_env(),
    )
    .unwrap();
    Settings::load_with_env(&root.join("config/local.toml"), &no_env()).unwrap();

    // The example documents every default: loading it must equal loading nothing but the source.
    assert_eq!(format!("{:?}", example.run), format!("{:?}", minimal.run));
    assert_eq!(format!("{:?}", example.sink), format!("{:?}", minimal.sink));
    assert_eq!(
        format!("{:?}", example.policy),
        format!("{:?}", minimal.policy)
    );
    assert_eq!(format!("{:?}", example.log), format!("{:?}", minimal.log));
    assert_eq!(
        format!("{:?}", example.state),
        format!("{:?}", minimal.state)
    );
    assert_eq!(example.source.table, minimal.source.table);
    assert_eq!(example.source.overlap, minimal.source.overlap);
    assert_eq!(example.source.page_size, minimal.source.page_size);
    assert_eq!(
        example.source.request_timeout,
        minimal.source.request_timeout
    );
    assert_eq!(
        format!("{:?}", example.source.retry),
        format!("{:?}", minimal.source.retry)
    );
}

#[test]
fn the_batch_size_defaults_by_sink_and_can_be_set() {
    let source = "[source]\nconnection_string = { value = \"UseDevelopmentStorage=true\" }\n";
    let load = |sink: &str| {
        Settings::from_toml_with_env(&format!("{source}{sink}"), Path::new("t.toml"), &no_env())
            .unwrap()
            .sink
            .batch_size()
    };
    assert_eq!(load(""), 1000, "jsonl: a full page per call");
    assert_eq!(
        load("[sink]\nkind = \"webhook\"\n[sink.webhook]\nurl = \"https://example.com/leads\"\n"),
        200
    );
    assert_eq!(load("[sink]\nbatch_size = 7\n"), 7);
    let err = Settings::from_toml_with_env(
        &format!("{source}[sink]\nbatch_size = 0\n"),
        Path::new("t.toml"),
        &no_env(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("sink.batch_size"), "{err}");
}

#[test]
fn environment_variables_override_file_keys() {
    let text = "[source]\nconnection_string = { value = \"UseDevelopmentStorage=true\" }\n[run]\npoll_interval = \"30s\"\n";
    let env: HashMap<String, String> = [
        ("LEADSYNC__RUN__POLL_INTERVAL", "5s"),
        ("LEADSYNC__SOURCE__TABLE", "OtherLeads"),
        ("LEADSYNC__SOURCE__PAGE_SIZE", "250"),
        ("LEADSYNC__LOG__FORMAT", "json"),
        ("LEADSYNC__POLICY__DO_NOT_CONTACT", "flag"),
        ("UNRELATED", "x"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();

    let s = Settings::from_toml_with_env(text, Path::new("t.toml"), &env).unwrap();

    assert_eq!(s.run.poll_interval, std::time::Duration::from_secs(5));
    assert_eq!(s.source.table, "OtherLeads");
    assert_eq!(s.source.page_size, 250);
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(s.policy.do_not_contact, DoNotContactPolicy::Flag);
}

#[test]
fn a_bad_value_from_the_environment_is_blamed_on_the_variable() {
    let text = "[source]\nconnection_string = { value = \"UseDevelopmentStorage=true\" }\n";
    let env: HashMap<String, String> =
        [("LEADSYNC__RUN__POLL_INTERVAL".to_owned(), "0s".to_owned())].into();

    let err = Settings::from_toml_with_env(text, Path::new("t.toml"), &env).unwrap_err();

    let message = err.to_string();
    assert!(message.contains("run.poll_interval"), "{message}");
    assert!(
        message.contains("LEADSYNC__RUN__POLL_INTERVAL"),
        "{message}"
    );
}

#[test]
fn a_missing_file_is_an_error_that_names_it() {
    let err =
        Settings::load_with_env(Path::new("/nonexistent/leadsync.toml"), &no_env()).unwrap_err();
    assert!(matches!(err, ConfigError::File { .. }));
    assert!(err.to_string().contains("/nonexistent/leadsync.toml"));
}

#[test]
fn secrets_never_appear_in_debug_output_or_errors() {
    let secret = "AccountName=acct;AccountKey=c3VwZXJzZWNyZXRrZXl2YWx1ZQ==";
    let text = format!("[source]\nconnection_string = {{ value = \"{secret}\" }}\n");
    let s = Settings::from_toml_with_env(&text, Path::new("t.toml"), &no_env()).unwrap();

    let debug = format!("{s:?} {s:#?}");
    assert!(!debug.contains("c3VwZXJzZWNyZXRrZXl2YWx1ZQ"), "{debug}");

    // A connection string that is present but unusable: the error names the key, not the value.
    let bad = "[source]\nconnection_string = { value = \"AccountName=acct;NotAKey=c3VwZXJzZWNyZXRrZXl2YWx1ZQ==\" }\n";
    let s = Settings::from_toml_with_env(bad, Path::new("t.toml"), &no_env()).unwrap();
    let err = leadsync::source::TableSource::connect(&s.source).unwrap_err();
    let message = format!("{err} {err:?}");
    assert!(message.contains("source.connection_string"), "{message}");
    assert!(!message.contains("c3VwZXJzZWNyZXRrZXl2YWx1ZQ"), "{message}");
}

#[test]
fn a_secret_is_read_from_a_file_or_a_systemd_credential() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), "  s3cret\n").unwrap();
    let file = leadsync::config::SecretSource::File(dir.path().join("key"));
    let missing = leadsync::config::SecretSource::File(dir.path().join("absent"));

    use secrecy::ExposeSecret;
    assert_eq!(
        file.resolve("source.account_key").unwrap().expose_secret(),
        "s3cret"
    );
    let err = missing
        .resolve("source.account_key")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("source.account_key") && err.contains("absent"),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever bytes the file holds, loading returns Ok or an error; it never panics.
    #[test]
    fn the_loader_never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
        let _ = Settings::from_toml_with_env(&text, Path::new("fuzz.toml"), &no_env());
    }

    /// Plausible TOML with random keys and values under the known sections.
    #[test]
    fn the_loader_never_panics_on_random_keys_and_values(
        section in prop::sample::select(vec!["source", "state", "sink", "sink.jsonl", "policy", "log", "run", "source.retry", "other"]),
        key in "[a-z_]{1,20}",
        value in prop_oneof![
            Just("\"\"".to_owned()), Just("0".to_owned()), Just("-1".to_owned()), Just("true".to_owned()),
            Just("\"0s\"".to_owned()), Just("[]".to_owned()), Just("{}".to_owned()),
            "\"[^\"\\\\]{0,30}\"", "-?[0-9]{1,25}"
        ],
    ) {
        let text = format!("[source]\nconnection_string = {{ value = \"UseDevelopmentStorage=true\" }}\n[{section}]\n{key} = {value}\n");
        let _ = Settings::from_toml_with_env(&text, Path::new("fuzz.toml"), &no_env());
    }
}
