use super::*;
use crate::lead::*;
use proptest::prelude::*;
use serde_json::json;
use time::macros::datetime;

/// `normalise` keeps each column's and field's candidates at its place in `ALL`.
#[test]
fn every_known_column_and_field_is_at_its_own_place_in_all() {
    for (i, column) in Column::ALL.into_iter().enumerate() {
        assert_eq!(column as usize, i, "{}", column.name());
    }
    for (i, field) in Field::ALL.into_iter().enumerate() {
        assert_eq!(field as usize, i, "{}", field.name());
    }
}

fn row_with(columns: Value) -> RawRow {
    let Value::Object(columns) = columns else {
        panic!("test columns must be a JSON object");
    };
    RawRow {
        id: RowId::new("pk-1", "rk-1"),
        etag: "W/\"datetime'2024-05-06T07%3A08%3A09.1234567Z'\"".to_owned(),
        timestamp: datetime!(2024-05-06 07:08:09.1234567 UTC),
        columns,
    }
}

fn event(columns: Value) -> LeadEvent {
    normalise(&row_with(columns)).expect("row should normalise")
}

fn rejection(columns: Value) -> Rejection {
    normalise(&row_with(columns)).expect_err("row should be rejected")
}

fn customer_info(info: Value) -> LeadEvent {
    event(json!({ "CustomerInfo": info.to_string() }))
}

fn offer(publisher: &str, id: &str) -> Offer {
    Offer {
        raw: format!("{publisher}.{id}"),
        publisher_id: Some(publisher.to_owned()),
        offer_id: id.to_owned(),
    }
}

// LeadSource

#[test]
fn leadsource_azure_marketplace_install_parses_into_source_action_and_offer() {
    let raw = "AzureMarketplace-INS | checkpoint.check-point-r77-10sg-byol";

    let parsed = LeadSource::parse(raw);

    assert_eq!(
        parsed,
        LeadSource {
            raw: raw.to_owned(),
            source: Some("AzureMarketplace".to_owned()),
            action: Some(Action::Install),
            offer: Some(offer("checkpoint", "check-point-r77-10sg-byol")),
        }
    );
}

#[test]
fn leadsource_with_a_parenthesised_source_and_no_spaces_parses() {
    let parsed = LeadSource::parse("AppSource (SPZA)-PLT|bitnami.openedxcypress");

    assert_eq!(parsed.source.as_deref(), Some("AppSource (SPZA)"));
    assert_eq!(parsed.action, Some(Action::PartnerLedTrial));
    assert_eq!(parsed.offer, Some(offer("bitnami", "openedxcypress")));
}

#[test]
fn leadsource_with_spaces_around_the_separators_parses() {
    let parsed = LeadSource::parse("SPZA - DNC | x.y");

    assert_eq!(parsed.source.as_deref(), Some("SPZA"));
    assert_eq!(parsed.action, Some(Action::DoNotContact));
    assert_eq!(parsed.offer, Some(offer("x", "y")));
}

#[test]
fn leadsource_test_drive_parses_with_a_dash_in_the_offer() {
    let parsed = LeadSource::parse("TestDrive-StartTestDrive | a.b-c");

    assert_eq!(parsed.source.as_deref(), Some("TestDrive"));
    assert_eq!(parsed.action, Some(Action::StartTestDrive));
    assert_eq!(parsed.offer, Some(offer("a", "b-c")));
}

#[test]
fn leadsource_azure_portal_create_parses() {
    let parsed = LeadSource::parse("AzurePortal-Create | pub.offer");

    assert_eq!(parsed.source.as_deref(), Some("AzurePortal"));
    assert_eq!(parsed.action, Some(Action::Create));
    assert_eq!(parsed.offer, Some(offer("pub", "offer")));
}

#[test]
fn leadsource_spacing_variants_all_parse_alike() {
    let variants = [
        "AppSource (SPZA)-PLT|bitnami.openedxcypress",
        "AppSource (SPZA) - PLT | bitnami.openedxcypress",
        "  AppSource (SPZA)-  PLT|  bitnami.openedxcypress  ",
        "AppSource (SPZA) -PLT |bitnami.openedxcypress",
        "\tAppSource (SPZA)\t-\tPLT\t|\tbitnami.openedxcypress\n",
    ];

    for variant in variants {
        let parsed = LeadSource::parse(variant);

        assert_eq!(parsed.raw, variant);
        assert_eq!(
            parsed.source.as_deref(),
            Some("AppSource (SPZA)"),
            "{variant:?}"
        );
        assert_eq!(parsed.action, Some(Action::PartnerLedTrial), "{variant:?}");
        assert_eq!(
            parsed.offer,
            Some(offer("bitnami", "openedxcypress")),
            "{variant:?}"
        );
    }
}

#[test]
fn leadsource_with_unknown_source_and_action_keeps_them_verbatim() {
    let parsed = LeadSource::parse("Foo Bar-Zap | a.b");

    assert_eq!(parsed.source.as_deref(), Some("Foo Bar"));
    assert_eq!(parsed.action, Some(Action::Other("Zap".to_owned())));
    assert_eq!(parsed.offer, Some(offer("a", "b")));
}

#[test]
fn leadsource_action_codes_are_case_insensitive() {
    let parsed = LeadSource::parse("AzureMarketplace-ins | a.b");

    assert_eq!(parsed.action, Some(Action::Install));
}

#[test]
fn leadsource_without_an_offer_part_has_no_offer() {
    for raw in [
        "AzureMarketplace-INS",
        "AzureMarketplace-INS |",
        "AzureMarketplace-INS |   ",
    ] {
        let parsed = LeadSource::parse(raw);

        assert_eq!(
            parsed.source.as_deref(),
            Some("AzureMarketplace"),
            "{raw:?}"
        );
        assert_eq!(parsed.action, Some(Action::Install), "{raw:?}");
        assert_eq!(parsed.offer, None, "{raw:?}");
    }
}

#[test]
fn leadsource_without_a_dash_is_an_action_when_it_is_a_known_code() {
    let parsed = LeadSource::parse("dnc | a.b");

    assert_eq!(parsed.source, None);
    assert_eq!(parsed.action, Some(Action::DoNotContact));
}

#[test]
fn leadsource_without_a_dash_is_a_source_otherwise() {
    let parsed = LeadSource::parse("AppSource (SPZA) | a.b");

    assert_eq!(parsed.source.as_deref(), Some("AppSource (SPZA)"));
    assert_eq!(parsed.action, None);
}

#[test]
fn leadsource_with_empty_parts_around_the_dash_has_none_for_them() {
    let no_action = LeadSource::parse("AzureMarketplace- | a.b");
    let no_source = LeadSource::parse(" -INS | a.b");

    assert_eq!(no_action.source.as_deref(), Some("AzureMarketplace"));
    assert_eq!(no_action.action, None);
    assert_eq!(no_source.source, None);
    assert_eq!(no_source.action, Some(Action::Install));
}

#[test]
fn leadsource_with_only_an_offer_part_has_only_an_offer() {
    let parsed = LeadSource::parse(" | a.b");

    assert_eq!(parsed.source, None);
    assert_eq!(parsed.action, None);
    assert_eq!(parsed.offer, Some(offer("a", "b")));
}

#[test]
fn empty_leadsource_is_all_none() {
    let parsed = LeadSource::parse("");

    assert_eq!(
        parsed,
        LeadSource {
            raw: String::new(),
            source: None,
            action: None,
            offer: None
        }
    );
}

// Offer, Action, Stage, Email

#[test]
fn offer_splits_at_the_first_dot() {
    let parsed = Offer::parse("docusign.3701c77e-1cfa-4c56-91e6-3ed0b622145a");
    let dotted = Offer::parse("pub.offer.v2");

    assert_eq!(
        parsed,
        Some(offer("docusign", "3701c77e-1cfa-4c56-91e6-3ed0b622145a"))
    );
    assert_eq!(dotted, Some(offer("pub", "offer.v2")));
}

#[test]
fn offer_without_a_usable_dot_is_all_offer_id() {
    for raw in ["standalone-offer", ".offer", "publisher."] {
        let parsed = Offer::parse(raw);

        assert_eq!(
            parsed,
            Some(Offer {
                raw: raw.to_owned(),
                publisher_id: None,
                offer_id: raw.to_owned()
            })
        );
    }
}

#[test]
fn offer_of_empty_text_is_none() {
    assert_eq!(Offer::parse("  "), None);
}

#[test]
fn action_parse_is_case_insensitive_and_trims() {
    let cases = [
        ("INS", Action::Install),
        ("ins", Action::Install),
        (" Ins ", Action::Install),
        ("plt", Action::PartnerLedTrial),
        ("Dnc", Action::DoNotContact),
        ("CREATE", Action::Create),
        ("starttestdrive", Action::StartTestDrive),
        (" Zap ", Action::Other("Zap".to_owned())),
        ("", Action::Unknown),
        ("   ", Action::Unknown),
    ];

    for (code, expected) in cases {
        assert_eq!(Action::parse(code), expected, "{code:?}");
    }
}

#[test]
fn action_code_gives_the_marketplace_code_back() {
    let actions = [
        Action::Install,
        Action::PartnerLedTrial,
        Action::DoNotContact,
        Action::Create,
        Action::StartTestDrive,
        Action::Other("Zap".to_owned()),
    ];

    for action in actions {
        assert_eq!(Action::parse(action.code()), action);
    }
    assert_eq!(Action::Unknown.code(), "");
}

#[test]
fn stage_follows_the_action() {
    let cases = [
        (Action::Install, Stage::Active),
        (Action::Create, Stage::Active),
        (Action::StartTestDrive, Stage::Trial),
        (Action::PartnerLedTrial, Stage::InitialInterest),
        (Action::DoNotContact, Stage::DoNotContact),
        (Action::Other("Zap".to_owned()), Stage::Unknown),
        (Action::Unknown, Stage::Unknown),
    ];

    for (action, stage) in cases {
        assert_eq!(Stage::from(&action), stage, "{action:?}");
    }
}

#[test]
fn stage_as_str_matches_its_serialised_form() {
    let stages = [
        Stage::Unknown,
        Stage::InitialInterest,
        Stage::Trial,
        Stage::Active,
        Stage::DoNotContact,
    ];

    for stage in stages {
        let serialised = serde_json::to_value(stage).expect("stage serialises");

        assert_eq!(serialised, json!(stage.as_str()));
    }
}

#[test]
fn email_is_trimmed_and_lowercased_for_comparison() {
    let parsed = Email::parse("  JSmith@Contoso.COM ");

    assert_eq!(
        parsed,
        Some(Email {
            original: "JSmith@Contoso.COM".to_owned(),
            normalized: "jsmith@contoso.com".to_owned(),
        })
    );
}

#[test]
fn email_without_an_at_sign_is_kept() {
    let parsed = Email::parse(" Not An Address ");

    assert_eq!(
        parsed.map(|email| email.normalized),
        Some("not an address".to_owned())
    );
}

#[test]
fn email_of_whitespace_is_none() {
    assert_eq!(Email::parse(" \t\n"), None);
    assert_eq!(Email::parse(""), None);
}

// normalise

#[test]
fn typical_row_becomes_a_complete_lead_event() {
    let columns = json!({
        "LeadSource": "AzureMarketplace-INS | checkpoint.check-point-r77-10sg-byol",
        "ActionCode": "INS",
        "CustomerInfo": r#"{"FirstName":"John","LastName":"Smith","Email":"jsmith@contoso.com","Phone":"1234567890","Country":"US","Company":"Contoso","Title":"CTO"}"#,
        "OfferDisplayName": "Check Point CloudGuard",
        "Description": "Wants a demo",
        "CreatedTime": " 2024-05-06T07:08:00Z ",
    });

    let lead = event(columns);

    assert_eq!(lead.row, RowId::new("pk-1", "rk-1"));
    assert_eq!(lead.timestamp, datetime!(2024-05-06 07:08:09.1234567 UTC));
    assert_eq!(lead.lead_source.source.as_deref(), Some("AzureMarketplace"));
    assert_eq!(lead.action, Action::Install);
    assert_eq!(lead.stage, Stage::Active);
    assert_eq!(
        lead.offer,
        Some(offer("checkpoint", "check-point-r77-10sg-byol"))
    );
    assert_eq!(lead.offer_title.as_deref(), Some("Check Point CloudGuard"));
    assert_eq!(
        lead.customer,
        Customer {
            first_name: Some("John".to_owned()),
            last_name: Some("Smith".to_owned()),
            email: Email::parse("jsmith@contoso.com"),
            phone: Some("1234567890".to_owned()),
            country: Some("US".to_owned()),
            company: Some("Contoso".to_owned()),
            title: Some("CTO".to_owned()),
        }
    );
    assert_eq!(lead.description.as_deref(), Some("Wants a demo"));
    assert_eq!(lead.created_time.as_deref(), Some("2024-05-06T07:08:00Z"));
    assert!(!lead.test_lead);
    assert!(lead.notes.is_empty(), "{:?}", lead.notes);
    assert!(lead.extra.is_empty(), "{:?}", lead.extra);
}

#[test]
fn column_names_are_case_insensitive() {
    let columns = json!({
        "leadsource": "AzurePortal-Create | pub.offer",
        "CUSTOMERINFO": r#"{"FirstName":"Ana"}"#,
        "offerdisplayname": "Offer",
        "DESCRIPTION": "Hi",
        "createdTime": "2024-01-01",
    });

    let lead = event(columns);

    assert_eq!(lead.action, Action::Create);
    assert_eq!(lead.customer.first_name.as_deref(), Some("Ana"));
    assert_eq!(lead.offer_title.as_deref(), Some("Offer"));
    assert_eq!(lead.description.as_deref(), Some("Hi"));
    assert_eq!(lead.created_time.as_deref(), Some("2024-01-01"));
    assert!(lead.extra.is_empty(), "{:?}", lead.extra);
}

#[test]
fn customer_info_keys_are_case_insensitive() {
    let info = json!({
        "firstName": "Ana", "LASTNAME": "Lima", "email": "a@b.c",
        "phone": "1", "COUNTRY": "BR", "company": "Acme", "tItLe": "CEO",
    });

    let lead = customer_info(info);

    assert_eq!(
        lead.customer,
        Customer {
            first_name: Some("Ana".to_owned()),
            last_name: Some("Lima".to_owned()),
            email: Email::parse("a@b.c"),
            phone: Some("1".to_owned()),
            country: Some("BR".to_owned()),
            company: Some("Acme".to_owned()),
            title: Some("CEO".to_owned()),
        }
    );
}

#[test]
fn customer_info_nested_in_user_details_is_read_in_either_casing() {
    for key in ["UserDetails", "userDetails"] {
        let info = json!({ key: { "FirstName": "Ana", "email": "A@B.C" } });

        let lead = customer_info(info);

        assert_eq!(lead.customer.first_name.as_deref(), Some("Ana"), "{key}");
        assert_eq!(
            lead.customer.email.map(|e| e.normalized).as_deref(),
            Some("a@b.c"),
            "{key}"
        );
        assert!(lead.extra.is_empty(), "{:?}", lead.extra);
    }
}

#[test]
fn flat_customer_fields_win_over_user_details_and_the_other_value_is_kept() {
    let info = json!({ "FirstName": "Flat", "UserDetails": { "FirstName": "Nested", "LastName": "Only" } });

    let lead = customer_info(info);

    assert_eq!(lead.customer.first_name.as_deref(), Some("Flat"));
    assert_eq!(lead.customer.last_name.as_deref(), Some("Only"));
    assert_eq!(
        lead.extra.get("CustomerInfo.UserDetails.FirstName"),
        Some(&json!("Nested"))
    );
    assert_eq!(lead.notes.len(), 1, "{:?}", lead.notes);
}

#[test]
fn user_details_that_is_not_an_object_is_kept_in_extra() {
    let info = json!({ "FirstName": "Ana", "UserDetails": "see CRM" });

    let lead = customer_info(info);

    assert_eq!(lead.customer.first_name.as_deref(), Some("Ana"));
    assert_eq!(
        lead.extra.get("CustomerInfo.UserDetails"),
        Some(&json!("see CRM"))
    );
    assert_eq!(lead.notes.len(), 1, "{:?}", lead.notes);
}

#[test]
fn missing_empty_null_or_whitespace_customer_fields_are_none_and_others_are_trimmed() {
    let info = json!({
        "FirstName": "", "LastName": null, "Email": "   ", "Phone": "\t",
        "Company": "  Contoso  ",
    });

    let lead = customer_info(info);

    assert_eq!(
        lead.customer,
        Customer {
            company: Some("Contoso".to_owned()),
            ..Customer::default()
        }
    );
}

#[test]
fn offer_display_name_is_preferred_over_offer_title() {
    let lead = event(json!({ "OfferDisplayName": "Display", "OfferTitle": "Title" }));

    assert_eq!(lead.offer_title.as_deref(), Some("Display"));
    assert!(
        lead.notes.iter().any(|n| n.contains("\"Title\"")),
        "{:?}",
        lead.notes
    );
}

#[test]
fn offer_title_is_used_when_display_name_is_missing_or_empty() {
    let missing = event(json!({ "OfferTitle": " Title " }));
    let empty = event(json!({ "OfferDisplayName": "  ", "offertitle": "Title" }));

    assert_eq!(missing.offer_title.as_deref(), Some("Title"));
    assert_eq!(empty.offer_title.as_deref(), Some("Title"));
    assert!(empty.notes.is_empty(), "{:?}", empty.notes);
}

#[test]
fn customer_email_is_normalised_and_the_original_kept_trimmed() {
    let lead = customer_info(json!({ "Email": "  JSmith@Contoso.COM " }));

    let email = lead.customer.email.expect("email present");

    assert_eq!(email.original, "JSmith@Contoso.COM");
    assert_eq!(email.normalized, "jsmith@contoso.com");
}

#[test]
fn action_code_column_is_the_action_when_leadsource_has_none() {
    let lead = event(json!({ "LeadSource": "AzureMarketplace | a.b", "ActionCode": "plt" }));

    assert_eq!(lead.action, Action::PartnerLedTrial);
    assert_eq!(lead.stage, Stage::InitialInterest);
    assert!(lead.notes.is_empty(), "{:?}", lead.notes);
}

#[test]
fn action_code_that_disagrees_with_leadsource_is_noted_and_leadsource_wins() {
    let lead = event(json!({ "LeadSource": "AzureMarketplace-INS | a.b", "ActionCode": "PLT" }));

    assert_eq!(lead.action, Action::Install);
    assert_eq!(lead.stage, Stage::Active);
    assert_eq!(lead.notes.len(), 1, "{:?}", lead.notes);
    assert!(
        lead.notes[0].starts_with("LeadSource action \"INS\" disagrees with ActionCode \"PLT\""),
        "{:?}",
        lead.notes
    );
}

#[test]
fn action_code_that_agrees_in_another_case_adds_no_note() {
    let lead = event(json!({ "LeadSource": "AzureMarketplace-INS | a.b", "ActionCode": " ins " }));

    assert_eq!(lead.action, Action::Install);
    assert!(lead.notes.is_empty(), "{:?}", lead.notes);
}

#[test]
fn row_without_any_action_has_unknown_action_and_stage() {
    let lead = event(json!({ "CustomerInfo": "" }));

    assert_eq!(lead.action, Action::Unknown);
    assert_eq!(lead.stage, Stage::Unknown);
    assert_eq!(lead.lead_source, LeadSource::parse(""));
    assert_eq!(lead.offer, None);
    assert!(lead.customer.is_empty());
}

#[test]
fn msft_test_lead_is_flagged_and_otherwise_unchanged() {
    let marker = "MSFT_TEST_636737558587117715";
    let info = json!({
        "FirstName": marker, "LastName": marker, "Email": marker, "Phone": marker,
        "Country": marker, "Company": marker, "Title": marker,
    });

    let lead = customer_info(info);

    assert!(lead.test_lead);
    assert_eq!(lead.customer.first_name.as_deref(), Some(marker));
    assert_eq!(
        lead.customer.email.map(|e| e.original).as_deref(),
        Some(marker)
    );
    assert!(lead.notes.is_empty(), "{:?}", lead.notes);
}

#[test]
fn msft_test_marker_in_any_single_field_flags_a_test_lead() {
    let marker = "MSFT_TEST_636737558587117715";
    let rows = [
        json!({ "CustomerInfo": json!({ "Company": format!("x {marker}") }).to_string() }),
        json!({ "CustomerInfo": json!({ "Email": format!("{marker}@x.y") }).to_string() }),
        json!({ "OfferTitle": marker }),
        json!({ "Description": marker }),
    ];

    for columns in rows {
        let lead = event(columns.clone());

        assert!(lead.test_lead, "{columns}");
    }
}

#[test]
fn lowercase_msft_test_text_is_not_a_test_lead() {
    let lead = customer_info(json!({ "FirstName": "msft_test_636737558587117715" }));

    assert!(!lead.test_lead);
}

#[test]
fn customer_info_that_is_not_json_rejects_the_row_and_names_it() {
    let rejected = rejection(json!({ "CustomerInfo": "{FirstName: John" }));

    assert_eq!(rejected.row, RowId::new("pk-1", "rk-1"));
    assert!(
        rejected
            .reason
            .starts_with("CustomerInfo is not valid JSON: "),
        "{}",
        rejected.reason
    );
    let message = rejected.to_string();
    assert!(
        message.contains("PartitionKey=\"pk-1\" RowKey=\"rk-1\""),
        "{message}"
    );
}

#[test]
fn customer_info_that_is_json_but_not_an_object_is_rejected() {
    let cases = [
        ("[1]", "an array"),
        ("\"x\"", "a string"),
        ("42", "a number"),
        ("null", "null"),
        ("true", "a boolean"),
    ];

    for (info, kind) in cases {
        let rejected = rejection(json!({ "CustomerInfo": info }));

        assert!(
            rejected.reason.starts_with(&format!(
                "CustomerInfo is JSON but not an object: it is {kind}"
            )),
            "{info}: {}",
            rejected.reason
        );
    }
}

#[test]
fn rejection_quotes_none_of_the_customer_info_only_its_length() {
    for info in [
        "{not json ana.silva@fabrikam.com".to_owned(),
        format!("{{not json {}ana@x.y", "é🙂".repeat(3_000)),
        "[\"ana.silva@fabrikam.com\"]".to_owned(),
    ] {
        let rejected = rejection(json!({ "CustomerInfo": info }));

        assert!(!rejected.reason.contains('@'), "{}", rejected.reason);
        assert!(!rejected.reason.contains("ana"), "{}", rejected.reason);
        assert!(
            rejected
                .reason
                .contains(&format!("of {} chars", info.chars().count())),
            "{}",
            rejected.reason
        );
    }
}

#[test]
fn missing_empty_or_empty_object_customer_info_gives_an_empty_customer() {
    let rows = [
        json!({ "LeadSource": "SPZA-PLT | a.b" }),
        json!({ "CustomerInfo": "" }),
        json!({ "CustomerInfo": "   " }),
        json!({ "CustomerInfo": null }),
        json!({ "CustomerInfo": "{}" }),
        json!({ "CustomerInfo": "{\"UserDetails\":{}}" }),
    ];

    for columns in rows {
        let lead = event(columns.clone());

        assert!(lead.customer.is_empty(), "{columns}");
        assert!(lead.extra.is_empty(), "{columns}");
    }
}

#[test]
fn customer_info_given_as_an_object_value_is_read() {
    let lead = event(json!({ "CustomerInfo": { "FirstName": "Ana" } }));

    assert_eq!(lead.customer.first_name.as_deref(), Some("Ana"));
}

#[test]
fn hostile_strings_survive_unchanged_except_trimming() {
    let company = "C".repeat(5_000);
    let hostile = [
        "Robert'); DROP TABLE leads;--",
        "\"quoted\" \\ back\\slash",
        "<script>alert(1)</script>",
        "evil\u{202E}gnp.exe",
        "🦀 emoji 👩‍👩‍👧",
        "nul\0byte",
    ];
    let info = json!({
        "FirstName": format!("  {}  ", hostile[0]),
        "LastName": hostile[1],
        "Title": hostile[2],
        "Email": hostile[3],
        "Country": hostile[4],
        "Phone": hostile[5],
        "Company": company,
    });

    let lead = event(json!({
        "CustomerInfo": info.to_string(),
        "Description": hostile[2],
        "OfferDisplayName": hostile[3],
    }));

    let customer = lead.customer;
    assert_eq!(customer.first_name.as_deref(), Some(hostile[0]));
    assert_eq!(customer.last_name.as_deref(), Some(hostile[1]));
    assert_eq!(customer.title.as_deref(), Some(hostile[2]));
    assert_eq!(
        customer.email.map(|e| e.original).as_deref(),
        Some(hostile[3])
    );
    assert_eq!(customer.country.as_deref(), Some(hostile[4]));
    assert_eq!(customer.phone.as_deref(), Some(hostile[5]));
    assert_eq!(customer.company.map(|c| c.len()), Some(5_000));
    assert_eq!(lead.description.as_deref(), Some(hostile[2]));
    assert_eq!(lead.offer_title.as_deref(), Some(hostile[3]));
}

#[test]
fn non_string_column_values_are_read_by_their_json_text() {
    let columns = json!({
        "LeadSource": 42,
        "ActionCode": true,
        "CustomerInfo": r#"{"Phone": 1234567890, "FirstName": false, "Company": 1.5, "Title": null}"#,
        "OfferTitle": 7,
        "Description": null,
        "CreatedTime": 1_714_979_289,
    });

    let lead = event(columns);

    assert_eq!(lead.lead_source.raw, "42");
    assert_eq!(lead.lead_source.source.as_deref(), Some("42"));
    assert_eq!(lead.action, Action::Other("true".to_owned()));
    assert_eq!(lead.customer.phone.as_deref(), Some("1234567890"));
    assert_eq!(lead.customer.first_name.as_deref(), Some("false"));
    assert_eq!(lead.customer.company.as_deref(), Some("1.5"));
    assert_eq!(lead.customer.title, None);
    assert_eq!(lead.offer_title.as_deref(), Some("7"));
    assert_eq!(lead.description, None);
    assert_eq!(lead.created_time.as_deref(), Some("1714979289"));
}

#[test]
fn customer_info_that_is_a_number_column_is_rejected_not_panicked_on() {
    let rejected = rejection(json!({ "CustomerInfo": 42 }));

    assert!(rejected.reason.contains("a number"), "{}", rejected.reason);
}

#[test]
fn description_noise_is_dropped() {
    for noise in [
        "",
        " ",
        "\t\n",
        "Campaigns:",
        "Campaigns: ",
        "  Campaign Name :  ",
    ] {
        let lead = event(json!({ "Description": noise }));

        assert_eq!(lead.description, None, "{noise:?}");
    }
}

#[test]
fn real_descriptions_are_kept_trimmed() {
    let cases = [
        (" Campaigns: spring ", "Campaigns: spring"),
        ("Call me: 10am", "Call me: 10am"),
        ("Budget 2024:", "Budget 2024:"),
        (":", ":"),
    ];

    for (description, kept) in cases {
        let lead = event(json!({ "Description": description }));

        assert_eq!(lead.description.as_deref(), Some(kept), "{description:?}");
    }
}

#[test]
fn unknown_columns_go_to_extra_under_their_original_names() {
    let lead = event(json!({
        "LeadSource": "SPZA-PLT | a.b",
        "LeadId": "abc",
        "Score": 3,
        "Empty": null,
        "PartitionKey": "pk-1",
        "rowkey": "rk-1",
        "Timestamp": "2024-05-06T07:08:09.1234567Z",
    }));

    let expected: BTreeMap<String, Value> = [
        ("Empty".to_owned(), Value::Null),
        ("LeadId".to_owned(), json!("abc")),
        ("Score".to_owned(), json!(3)),
    ]
    .into_iter()
    .collect();
    assert_eq!(lead.extra, expected);
}

#[test]
fn unknown_customer_info_keys_go_to_extra_with_a_prefix() {
    let info = json!({ "FirstName": "Ana", "Industry": "Retail", "UserDetails": { "Size": 10 } });

    let lead = customer_info(info);

    assert_eq!(
        lead.extra.get("CustomerInfo.Industry"),
        Some(&json!("Retail"))
    );
    assert_eq!(
        lead.extra.get("CustomerInfo.UserDetails.Size"),
        Some(&json!(10))
    );
    assert_eq!(lead.extra.len(), 2, "{:?}", lead.extra);
}

#[test]
fn a_column_under_two_spellings_keeps_the_documented_one_and_the_other_in_extra() {
    let lead = event(json!({
        "leadsource": "SPZA-DNC | x.y",
        "LeadSource": "AzureMarketplace-INS | a.b",
    }));

    assert_eq!(lead.action, Action::Install);
    assert_eq!(lead.extra.get("leadsource"), Some(&json!("SPZA-DNC | x.y")));
    assert_eq!(lead.notes.len(), 1, "{:?}", lead.notes);
}

#[test]
fn a_column_under_two_spellings_with_the_same_value_is_read_once_silently() {
    let lead = event(json!({ "description": "Hi", "Description": " Hi " }));

    assert_eq!(lead.description.as_deref(), Some("Hi"));
    assert!(lead.extra.is_empty(), "{:?}", lead.extra);
    assert!(lead.notes.is_empty(), "{:?}", lead.notes);
}

#[test]
fn lead_event_serialisation_keeps_the_timestamp_at_100ns() {
    let lead = event(json!({ "LeadSource": "SPZA-PLT | a.b" }));

    let serialised = serde_json::to_string(&lead).expect("event serialises");
    let back: LeadEvent = serde_json::from_str(&serialised).expect("event deserialises");

    assert!(
        serialised.contains("2024-05-06T07:08:09.1234567Z"),
        "{serialised}"
    );
    assert_eq!(back, lead);
}

mod properties;
