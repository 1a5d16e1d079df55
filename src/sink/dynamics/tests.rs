use std::time::Duration;

use reqwest::StatusCode;

use super::api::{
    classify, error_text, is_endpoint_refusal, service_protection, service_protection_limit,
};
use super::auth::{classify_token_response, renew_after, TokenError};
use super::batch::{batch_body, parse_batch_response, Part, PartKind};
use super::task::task_id;
use super::*;
use crate::identity::IdentitySettings;
use crate::identity::{customer_key, CustomerState};
use crate::lead::normalise;
use crate::sink::http::Step;
use crate::sink::mapping;
use crate::source::row::{RawRow, RowId};
use serde_json::json;

const SECRET: &str = "s3cr3t-client-value";

fn settings() -> DynamicsSettings {
    settings_with(json!({}))
}

/// The minimal settings with the keys of `over` added or replaced.
fn settings_with(over: Value) -> DynamicsSettings {
    let mut value = json!({
        "environment_url": "https://contoso.crm.dynamics.com",
        "tenant_id": "11111111-2222-3333-4444-555555555555",
        "client_id": "66666666-7777-8888-9999-000000000000",
        "client_secret": { "value": SECRET },
    });
    for (k, v) in over.as_object().unwrap() {
        value[k] = v.clone();
    }
    serde_json::from_value(value).unwrap()
}

fn lead(customer: Value) -> CustomerLead {
    let columns = json!({
        "LeadSource": "AzureMarketplace-INS | contoso.analytics",
        "CustomerInfo": customer.to_string(),
        "OfferDisplayName": "Contoso Analytics",
    });
    let Value::Object(columns) = columns else {
        unreachable!()
    };
    let event = normalise(&RawRow {
        id: RowId::new("p", "r1"),
        etag: "W/1".into(),
        timestamp: crate::timestamp::parse("2024-05-01T10:00:00Z").unwrap(),
        columns,
    })
    .unwrap();
    let identity = IdentitySettings::default();
    let key = customer_key(&event.customer, identity.fallback).unwrap();
    let mut state = CustomerState::new(&key, &identity);
    state.apply([&event], &identity);
    state.lead
}

#[test]
fn a_quote_is_doubled_then_the_key_is_percent_encoded() {
    assert_eq!(odata_key("O'Brien@x.com"), "O%27%27Brien%40x.com");
    assert_eq!(odata_key("ls-0123abcd"), "ls-0123abcd");
    assert_eq!(odata_key("a+b/c d"), "a%2Bb%2Fc%20d");
}

fn part(url: &str, condition: (&'static str, &'static str), body: &str) -> Part {
    Part {
        external_key: "ls-1".into(),
        index: 0,
        customer: "ls-1".into(),
        kind: PartKind::Create,
        url: url.into(),
        condition,
        body: body.as_bytes().to_vec(),
    }
}

#[test]
fn a_batch_body_has_one_application_http_part_per_request_and_a_closing_boundary() {
    let body = batch_body(
        "batch_x",
        &[
            part(
                "/api/data/v9.2/leads(k='a')",
                ("If-None-Match", "*"),
                r#"{"k":"a"}"#,
            ),
            part("/api/data/v9.2/tasks(1)", ("If-None-Match", "*"), "{}"),
        ],
    );
    let text = String::from_utf8(body).unwrap();
    assert_eq!(
        text,
        "--batch_x\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
         PATCH /api/data/v9.2/leads(k='a') HTTP/1.1\r\nContent-Type: application/json; charset=utf-8\r\nAccept: application/json\r\nIf-None-Match: *\r\n\r\n{\"k\":\"a\"}\r\n\
         --batch_x\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
         PATCH /api/data/v9.2/tasks(1) HTTP/1.1\r\nContent-Type: application/json; charset=utf-8\r\nAccept: application/json\r\nIf-None-Match: *\r\n\r\n{}\r\n\
         --batch_x--\r\n"
    );
}

#[test]
fn a_batch_response_is_read_in_order_with_statuses_entity_ids_retry_after_and_errors() {
    // The shape of the documentation's example (one change set-free part per request).
    let body = "--batchresponse_c1bd45c1\r\n\
        Content-Type: application/http\r\n\
        Content-Transfer-Encoding: binary\r\n\r\n\
        HTTP/1.1 204 No Content\r\n\
        OData-Version: 4.0\r\n\
        OData-EntityId: https://org.crm.dynamics.com/api/data/v9.2/leads(0001)\r\n\r\n\r\n\
        --batchresponse_c1bd45c1\r\n\
        Content-Type: application/http\r\n\
        Content-Transfer-Encoding: binary\r\n\r\n\
        HTTP/1.1 400 Bad Request\r\n\
        Content-Type: application/json; odata.metadata=minimal\r\n\
        OData-Version: 4.0\r\n\r\n\
        {\"error\":{\"code\":\"0x80044331\",\"message\":\"A validation error occurred.\"}}\r\n\
        --batchresponse_c1bd45c1\r\n\
        Content-Type: application/http\r\n\
        Content-Transfer-Encoding: binary\r\n\r\n\
        HTTP/1.1 429 Too Many Requests\r\n\
        Retry-After: 7\r\n\r\n\
        {}\r\n\
        --batchresponse_c1bd45c1--\r\n";
    let answers =
        parse_batch_response("multipart/mixed; boundary=\"batchresponse_c1bd45c1\"", body).unwrap();
    assert_eq!(answers.len(), 3);
    assert_eq!(answers[0].status, StatusCode::NO_CONTENT);
    assert!(answers[0].entity.ends_with("/leads(0001)"));
    assert_eq!(answers[1].status, StatusCode::BAD_REQUEST);
    assert_eq!(
        error_text(&answers[1].text),
        "0x80044331: A validation error occurred."
    );
    assert_eq!(answers[2].after, Some(Duration::from_secs(7)));
    assert!(parse_batch_response("application/json", "{}").is_err());
    assert!(
        parse_batch_response(
            "multipart/mixed; boundary=b",
            "--b\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
        )
        .is_err(),
        "a cut response is not taken for a complete one"
    );
}

#[test]
fn the_defaults_are_the_documented_ones() {
    let s = settings();
    assert!(s.validate().is_ok());
    assert_eq!(s.authority_host, "https://login.microsoftonline.com");
    assert_eq!(s.api_version, "v9.2");
    assert_eq!(s.key_attribute, "leadsync_key");
    assert_eq!(s.parallelism, 4);
    assert_eq!(s.batch_size, 100);
    assert_eq!(s.request_timeout, Duration::from_secs(30));
    assert!(!s.allow_http);
    assert_eq!(s.fields, default_fields());
    assert_eq!(s.fields["donotphone"], LeadField::DoNotContact);
}

#[test]
fn invalid_settings_name_their_key() {
    let cases = [
        (
            json!({"environment_url": "http://contoso.crm.dynamics.com"}),
            "sink.dynamics.environment_url",
        ),
        (
            json!({"environment_url": "https://contoso.crm.dynamics.com/api/data"}),
            "sink.dynamics.environment_url",
        ),
        (
            json!({"authority_host": "login.microsoftonline.com"}),
            "sink.dynamics.authority_host",
        ),
        (json!({"tenant_id": "a/b"}), "sink.dynamics.tenant_id"),
        (json!({"client_id": " "}), "sink.dynamics.client_id"),
        (json!({"api_version": "9.2"}), "sink.dynamics.api_version"),
        (
            json!({"key_attribute": "Leadsync Key"}),
            "sink.dynamics.key_attribute",
        ),
        (json!({"parallelism": 0}), "sink.dynamics.parallelism"),
        (json!({"parallelism": 53}), "sink.dynamics.parallelism"),
        (json!({"batch_size": 0}), "sink.dynamics.batch_size"),
        (json!({"batch_size": 1001}), "sink.dynamics.batch_size"),
        (
            json!({"fields": {"FirstName": "first_name"}}),
            "sink.dynamics.fields.FirstName",
        ),
        (
            json!({"max_lengths": {"description": 0}}),
            "sink.dynamics.max_lengths.description",
        ),
        (
            json!({"request_timeout": "0s"}),
            "sink.dynamics.request_timeout",
        ),
        (
            json!({"retry": {"max_attempts": 0}}),
            "sink.dynamics.retry.max_attempts",
        ),
    ];
    for (over, key) in cases {
        let (got, message) = settings_with(over.clone())
            .validate()
            .expect_err(&over.to_string());
        assert_eq!(got, key, "{over}: {message}");
    }
}

#[test]
fn web_api_answers_are_classified_by_status_and_body() {
    let error = r#"{"error":{"code":"0x80040237","message":"Operation failed due to a SQL integrity violation."}}"#;
    let throttled = r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}"#;
    let secs = |s| Some(Duration::from_secs(s));
    let cases: [(u16, Option<Duration>, &str, &str); 8] = [
        (204, None, "", "done"),
        (201, None, "", "done"),
        (429, secs(3), throttled, "retry"),
        (503, None, "", "retry"),
        (500, None, error, "retry"),
        (408, None, "", "retry"),
        (400, None, error, "fail"),
        (404, None, "", "fail"),
    ];
    for (status, after, body, expected) in cases {
        let step = classify(StatusCode::from_u16(status).unwrap(), after, body);
        let kind = match &step {
            Step::Done(()) => "done",
            Step::Retry { after: got, .. } => {
                assert_eq!(*got, after, "{status}: Retry-After is kept");
                "retry"
            }
            Step::Fail { .. } => "fail",
        };
        assert_eq!(kind, expected, "{status}: {step:?}");
    }
    let Step::Fail { reason } = classify(StatusCode::BAD_REQUEST, None, error) else {
        panic!()
    };
    assert!(
        reason.contains("0x80040237: Operation failed due to a SQL integrity violation."),
        "{reason}"
    );
    let Step::Retry { reason, .. } = classify(StatusCode::TOO_MANY_REQUESTS, None, throttled)
    else {
        panic!()
    };
    assert!(
        reason.contains("0x80072322") && reason.contains("number of requests"),
        "{reason}"
    );
}

#[test]
fn the_three_service_protection_codes_are_recognised() {
    for code in ["0x80072322", "0x80072321", "0x80072326", "-2147015898"] {
        assert!(service_protection_limit(code).is_some(), "{code}");
    }
    assert!(service_protection_limit("0x80040237").is_none());
    assert!(
        service_protection(r#"{"error":{"code":"0x80072326","message":"x"}}"#)
            .unwrap()
            .1
            .contains("concurrent")
    );
}

#[test]
fn token_errors_are_permanent_except_outages_and_throttling() {
    let refused = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value.\r\nTrace ID: abc\r\nCorrelation ID: def","error_codes":[7000215]}"#;
    let Err(TokenError::Permanent { reason }) =
        classify_token_response(StatusCode::UNAUTHORIZED, None, refused, "app-1")
    else {
        panic!("a refused secret is permanent")
    };
    assert!(
        reason.contains("invalid_client") && reason.contains("AADSTS7000215"),
        "{reason}"
    );
    assert!(
        reason.contains("until") && reason.contains("app-1"),
        "{reason}"
    );
    assert!(!reason.contains("Trace ID"), "{reason}");
    assert!(matches!(
        classify_token_response(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(2)),
            "",
            "a"
        ),
        Err(TokenError::Transient { after: Some(_), .. })
    ));
    let ok = classify_token_response(
        StatusCode::OK,
        None,
        r#"{"token_type":"Bearer","expires_in":"3599","access_token":"eyJ0"}"#,
        "a",
    )
    .unwrap_or_else(|_| panic!("a token"));
    assert_eq!(ok.lifetime, Duration::from_secs(3599));
    assert_eq!(ok.access_token.expose_secret(), "eyJ0");
}

#[test]
fn a_token_is_renewed_before_it_expires_even_when_short_lived() {
    let margin = Duration::from_secs(300);
    assert_eq!(
        renew_after(Duration::from_secs(3599), margin),
        Duration::from_secs(3299)
    );
    assert_eq!(
        renew_after(Duration::from_secs(2), margin),
        Duration::from_secs(1)
    );
    assert_eq!(renew_after(Duration::ZERO, margin), Duration::ZERO);
}

#[test]
fn the_body_always_has_a_subject_and_the_key_and_cuts_long_values() {
    let sink = DynamicsSink::new(&settings_with(
        json!({"fields": {"firstname": "first_name", "companyname": "company"}}),
    ))
    .unwrap();
    let long_company = "C".repeat(150);
    let lead =
        lead(json!({"FirstName": "Ana", "Email": "ana@fabrikam.com", "Company": long_company}));

    let (key, body) = sink.prepare(&lead).unwrap();

    assert_eq!(key, lead.external_key);
    assert_eq!(body["leadsync_key"], json!(lead.external_key));
    assert_eq!(body["subject"], json!("Contoso Analytics: Get it now"));
    assert_eq!(body["firstname"], json!("Ana"));
    let company = body["companyname"].as_str().unwrap();
    assert_eq!(company.chars().count(), 100);
    assert!(company.ends_with(mapping::TRUNCATION_MARKER));
}

#[test]
fn a_false_opt_out_is_never_sent_and_an_update_carries_only_what_leadsync_owns() {
    let sink = DynamicsSink::new(&settings()).unwrap();
    let mut opted_out =
        lead(json!({"FirstName": "Ana", "Email": "ana@fabrikam.com", "Company": "Fabrikam"}));
    let (_, contactable) = sink.prepare_owned(&opted_out).unwrap();
    opted_out.do_not_contact = true;
    let (_, owned) = sink.prepare_owned(&opted_out).unwrap();

    let create = contactable.for_create();
    let update_filled = owned.for_update(|_| false);
    let update_empty = owned.for_update(|_| true);

    assert!(create.get("donotemail").is_none() && create.get("donotphone").is_none());
    assert_eq!(create["companyname"], json!("Fabrikam"));
    assert_eq!(update_filled["donotemail"], json!(true));
    assert_eq!(update_filled["donotphone"], json!(true));
    assert!(update_filled.get("companyname").is_none(), "if_empty");
    assert_eq!(update_empty["companyname"], json!("Fabrikam"));
    for on_create in ["subject", "description"] {
        assert!(update_empty.get(on_create).is_none(), "{on_create}");
    }
    assert_eq!(update_filled["firstname"], json!("Ana"));
    assert_eq!(update_filled["leadsync_key"], json!(opted_out.external_key));
}

#[test]
fn task_ids_are_stable_per_event_and_shaped_like_guids() {
    let a = task_id("ls-1|2024-05-01T10:00:00Z");
    assert_eq!(a, task_id("ls-1|2024-05-01T10:00:00Z"));
    assert_ne!(a, task_id("ls-1|2024-05-02T10:00:00Z"));
    assert_eq!(a.len(), 36);
    assert_eq!(a.matches('-').count(), 4);
    assert_eq!(&a[14..15], "5");
}

#[test]
fn endpoint_refusals_are_told_from_record_refusals() {
    let body = |m: &str| json!({"error": {"code": "0x80060888", "message": m}}).to_string();
    assert!(is_endpoint_refusal(StatusCode::FORBIDDEN, ""));
    assert!(is_endpoint_refusal(
        StatusCode::BAD_REQUEST,
        &body("Could not find a property named 'x' on type 'Microsoft.Dynamics.CRM.lead'.")
    ));
    assert!(!is_endpoint_refusal(
        StatusCode::BAD_REQUEST,
        &body("A validation error occurred. The length of the 'companyname' attribute exceeded the maximum.")
    ));
}

#[test]
fn an_email_key_without_an_email_is_rejected_with_a_reason() {
    let sink =
        DynamicsSink::new(&settings_with(json!({"key_attribute": "emailaddress1"}))).unwrap();
    let without = lead(json!({"FirstName": "Ana", "LastName": "Silva", "Company": "Fabrikam"}));
    let reason = sink.prepare(&without).unwrap_err();
    assert!(
        reason.contains("no email") && reason.contains("emailaddress1"),
        "{reason}"
    );

    let with = lead(json!({"Email": " Ana@Fabrikam.com "}));
    let (key, body) = sink.prepare(&with).unwrap();
    assert_eq!(key, "ana@fabrikam.com");
    assert_eq!(body["emailaddress1"], json!("ana@fabrikam.com"));
}

#[test]
fn neither_the_settings_nor_the_sink_show_the_secret_in_debug() {
    let s = settings();
    let sink = DynamicsSink::new(&s).unwrap();
    for text in [format!("{s:?}"), format!("{sink:?}")] {
        assert!(!text.contains(SECRET), "{text}");
    }
    assert_eq!(sink.redact(format!("echo {SECRET}!")), "echo [redacted]!");
}

#[test]
fn the_scope_and_urls_come_from_the_environment_url() {
    let mut s = settings();
    s.environment_url = "https://contoso.crm4.dynamics.com/".into();
    s.authority_host = "https://login.microsoftonline.us/".into();
    let sink = DynamicsSink::new(&s).unwrap();
    assert_eq!(sink.scope, "https://contoso.crm4.dynamics.com/.default");
    assert_eq!(
        sink.api_base,
        "https://contoso.crm4.dynamics.com/api/data/v9.2"
    );
    assert_eq!(
        sink.token_url,
        "https://login.microsoftonline.us/11111111-2222-3333-4444-555555555555/oauth2/v2.0/token"
    );
}
