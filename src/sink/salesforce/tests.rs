use std::time::Duration;

use super::api::{api_usage, classify, Verdict};
use super::auth::{classify_token, AuthError};
use super::upsert::{record_verdict, RecordVerdict, UpsertResult};
use super::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn settings(extra: Value) -> SalesforceSettings {
    let mut base = json!({
        "login_url": "https://acme.my.salesforce.com",
        "client_id": "3MVG9consumerkey",
        "client_secret": { "value": "s3cret-value" },
    });
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(base).expect("settings parse")
}

fn key_of(result: Result<(), (String, String)>) -> String {
    result.expect_err("should be invalid").0
}

#[test]
fn the_minimal_client_credentials_settings_are_valid_with_the_documented_defaults() {
    let s = settings(json!({}));

    assert_eq!(s.validate(), Ok(()));
    assert_eq!(s.auth, AuthFlow::ClientCredentials);
    assert_eq!(s.api_version, "v62.0");
    assert_eq!(s.external_id_field, "Leadsync_Key__c");
    assert_eq!(s.fields, default_fields());
    assert_eq!(s.fields["Description"], LeadField::Summary);
    assert_eq!(s.duplicates, DuplicatePolicy::Reject);
    assert_eq!(s.request_timeout, Duration::from_secs(30));
    assert!(!s.allow_http);
}

#[test]
fn invalid_settings_name_the_offending_key() {
    let cases = [
        (
            json!({"login_url": "http://acme.my.salesforce.com"}),
            "sink.salesforce.login_url",
        ),
        (
            json!({"login_url": "https://acme.my.salesforce.com/services"}),
            "sink.salesforce.login_url",
        ),
        (json!({"client_id": " "}), "sink.salesforce.client_id"),
        (json!({"username": "a@b.c"}), "sink.salesforce.username"),
        (json!({"api_version": "62"}), "sink.salesforce.api_version"),
        (
            json!({"api_version": "v45.0"}),
            "sink.salesforce.api_version",
        ),
        (
            json!({"external_id_field": "Key__c/../x"}),
            "sink.salesforce.external_id_field",
        ),
        (json!({"fields": {}}), "sink.salesforce.fields"),
        (
            json!({"fields": {"Leadsync_Key__c": "email"}}),
            "sink.salesforce.fields.Leadsync_Key__c",
        ),
        (
            json!({"fields": {"Bad Name": "email"}}),
            "sink.salesforce.fields.Bad Name",
        ),
        (
            json!({"placeholders": {"Company": " "}}),
            "sink.salesforce.placeholders.Company",
        ),
        (
            json!({"max_lengths": {"Title": 0}}),
            "sink.salesforce.max_lengths.Title",
        ),
        (
            json!({"request_timeout": "0s"}),
            "sink.salesforce.request_timeout",
        ),
        (
            json!({"retry": {"max_attempts": 0}}),
            "sink.salesforce.retry.max_attempts",
        ),
    ];
    for (extra, key) in cases {
        assert_eq!(key_of(settings(extra.clone()).validate()), key, "{extra}");
    }
}

#[test]
fn the_jwt_flow_needs_a_username_and_a_key_and_no_secret() {
    let jwt = |extra: Value| {
        let mut s = settings(extra);
        s.client_secret = None;
        s
    };
    let ok = jwt(
        json!({"auth": "jwt_bearer", "username": "int@acme.com", "private_key": {"file": "/k.pem"}}),
    );
    assert_eq!(ok.validate(), Ok(()));
    assert_eq!(
        key_of(jwt(json!({"auth": "jwt_bearer", "private_key": {"file": "/k.pem"}})).validate()),
        "sink.salesforce.username"
    );
    assert_eq!(
        key_of(jwt(json!({"auth": "jwt_bearer", "username": "int@acme.com"})).validate()),
        "sink.salesforce.private_key"
    );
    let mut with_secret = ok.clone();
    with_secret.client_secret = settings(json!({})).client_secret;
    assert_eq!(
        key_of(with_secret.validate()),
        "sink.salesforce.client_secret"
    );
}

#[test]
fn the_default_audience_is_a_salesforce_login_host_for_my_domains() {
    let aud = |u: &str| default_audience(&reqwest::Url::parse(u).unwrap());

    assert_eq!(
        aud("https://acme.my.salesforce.com"),
        "https://login.salesforce.com"
    );
    assert_eq!(
        aud("https://acme--uat.sandbox.my.salesforce.com/"),
        "https://test.salesforce.com"
    );
    assert_eq!(
        aud("https://acme--uat.my.salesforce.com"),
        "https://test.salesforce.com"
    );
    assert_eq!(
        aud("https://test.salesforce.com"),
        "https://test.salesforce.com"
    );
    assert_eq!(aud("http://127.0.0.1:8080/"), "http://127.0.0.1:8080");
}

#[test]
fn responses_are_classified_by_status_and_error_code() {
    let limit =
        r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
    let no_access = r#"[{"message":"The REST API is not enabled for this Organization.","errorCode":"API_DISABLED_FOR_ORG"}]"#;
    let session = r#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#;
    let field = r#"[{"message":"No such column 'Foo__c' on sobject of type Lead","errorCode":"INVALID_FIELD","fields":["Foo__c"]}]"#;

    assert_eq!(classify(StatusCode::OK, None, "[]"), Verdict::Ok);
    assert_eq!(
        classify(StatusCode::UNAUTHORIZED, None, session),
        Verdict::SessionInvalid
    );
    assert!(
        matches!(classify(StatusCode::FORBIDDEN, None, limit), Verdict::ApiLimit { reason } if reason.contains("REQUEST_LIMIT_EXCEEDED"))
    );
    assert!(
        matches!(classify(StatusCode::FORBIDDEN, None, no_access), Verdict::Fail { reason } if reason.contains("API_DISABLED_FOR_ORG"))
    );
    assert!(
        matches!(classify(StatusCode::SERVICE_UNAVAILABLE, Some(Duration::from_secs(2)), "<html>down</html>"), Verdict::Retry { after: Some(_), reason } if reason.contains("503"))
    );
    assert!(matches!(
        classify(StatusCode::TOO_MANY_REQUESTS, None, ""),
        Verdict::Retry { .. }
    ));
    assert!(
        matches!(classify(StatusCode::BAD_REQUEST, None, field), Verdict::Fail { reason } if reason.contains("INVALID_FIELD: No such column 'Foo__c' on sobject of type Lead (fields: Foo__c)"))
    );
}

#[test]
fn token_errors_say_which_and_only_5xx_is_transient() {
    let invalid = r#"{"error":"invalid_client","error_description":"invalid client credentials"}"#;

    let refused = classify_token(
        StatusCode::BAD_REQUEST,
        invalid,
        AuthFlow::ClientCredentials,
    )
    .err();
    let down = classify_token(StatusCode::BAD_GATEWAY, "", AuthFlow::JwtBearer).err();

    assert!(
        matches!(refused, Some(AuthError::Refused(r)) if r.contains("invalid_client: invalid client credentials") && r.contains("client_credentials"))
    );
    assert!(matches!(down, Some(AuthError::Transient(r)) if r.contains("502")));
}

#[test]
fn per_record_results_become_verdicts() {
    let parse = |v: Value| serde_json::from_value::<UpsertResult>(v).unwrap();

    let created = parse(json!({"id": "00Q1", "success": true, "created": true, "errors": []}));
    let invalid = parse(
        json!({"success": false, "errors": [{"statusCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "message": "Phone is required", "fields": ["Phone"]}]}),
    );
    let duplicate = parse(
        json!({"success": false, "errors": [{"statusCode": "DUPLICATES_DETECTED", "message": "Use one of these records?", "fields": []}]}),
    );
    let locked = parse(
        json!({"success": false, "errors": [{"statusCode": "UNABLE_TO_LOCK_ROW", "message": "unable to obtain exclusive access to this record"}]}),
    );
    let mixed = parse(
        json!({"success": false, "errors": [{"statusCode": "DUPLICATES_DETECTED", "message": "dup"}, {"statusCode": "INVALID_EMAIL_ADDRESS", "message": "bad", "fields": ["Email"]}]}),
    );

    assert_eq!(
        record_verdict(&created),
        RecordVerdict::Upserted { created: true }
    );
    assert_eq!(
        record_verdict(&invalid),
        RecordVerdict::Rejected(
            "FIELD_CUSTOM_VALIDATION_EXCEPTION: Phone is required (fields: Phone)".into()
        )
    );
    assert!(matches!(
        record_verdict(&duplicate),
        RecordVerdict::Duplicate(_)
    ));
    assert!(matches!(record_verdict(&locked), RecordVerdict::Locked(_)));
    assert!(
        matches!(record_verdict(&mixed), RecordVerdict::Rejected(r) if r.contains("INVALID_EMAIL_ADDRESS"))
    );
}

#[test]
fn api_usage_is_read_from_the_limit_info_header() {
    assert_eq!(api_usage("api-usage=18/15000"), Some((18, 15000)));
    assert_eq!(
        api_usage("api-usage=25/5000; per-app-api-usage=17/250(appName=sample-connected-app)"),
        Some((25, 5000))
    );
    assert_eq!(api_usage("per-app-api-usage=17/250"), None);
    assert_eq!(api_usage("api-usage=x/5000"), None);
}

#[test]
fn the_sink_debug_output_holds_no_secret() {
    let sink = SalesforceSink::new(&settings(json!({}))).unwrap();

    let text = format!("{sink:?} {:?}", settings(json!({})));

    assert!(!text.contains("s3cret-value"), "{text}");
    assert!(text.contains("3MVG9consumerkey"));
}

#[test]
fn a_missing_secret_stops_construction_naming_the_key() {
    let s = settings(json!({"client_secret": {"env": "LEADSYNC_TEST_UNSET_SF_SECRET"}}));

    let err = SalesforceSink::new(&s).unwrap_err();

    assert!(
        err.message.contains("sink.salesforce.client_secret"),
        "{err}"
    );
}
