//! Properties of `normalise` over generated rows.

use super::*;
use serde_json::Map;

const KNOWN_COLUMNS: [&str; 10] = [
    "LeadSource",
    "ActionCode",
    "CustomerInfo",
    "OfferDisplayName",
    "OfferTitle",
    "Description",
    "CreatedTime",
    "PartitionKey",
    "RowKey",
    "Timestamp",
];

const CUSTOMER_KEYS: [&str; 8] = [
    "FirstName",
    "LastName",
    "Email",
    "Phone",
    "Country",
    "Company",
    "Title",
    "UserDetails",
];

fn random_case(names: &'static [&'static str]) -> impl Strategy<Value = String> {
    (
        prop::sample::select(names),
        prop::collection::vec(any::<bool>(), 32),
    )
        .prop_map(|(name, upper)| {
            name.chars()
                .zip(upper.into_iter().cycle())
                .map(|(c, up)| {
                    if up {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect()
        })
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<String>().prop_map(Value::String),
        "[ a-zA-Z|.()_-]{0,40}".prop_map(Value::String),
        Just(json!("MSFT_TEST_1")),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((customer_key(), inner), 0..4)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

fn customer_key() -> impl Strategy<Value = String> {
    prop_oneof![random_case(&CUSTOMER_KEYS), any::<String>()]
}

fn customer_info_object() -> impl Strategy<Value = String> {
    prop::collection::vec((customer_key(), json_value()), 0..10)
        .prop_map(|entries| Value::Object(entries.into_iter().collect()).to_string())
}

fn customer_info_text() -> impl Strategy<Value = String> {
    let object = customer_info_object;
    prop_oneof![
        any::<String>(),
        object(),
        object(),
        // A valid object with its end cut off or garbage after it.
        (object(), any::<usize>()).prop_map(|(text, cut)| {
            text.chars()
                .take(cut % (text.chars().count() + 1))
                .collect()
        }),
        (object(), any::<String>()).prop_map(|(text, tail)| text + &tail),
        json_value().prop_map(|value| value.to_string()),
    ]
}

fn columns() -> impl Strategy<Value = Map<String, Value>> {
    let key = prop_oneof![random_case(&KNOWN_COLUMNS), any::<String>()];
    let customer_info = (random_case(&["CustomerInfo"]), customer_info_text());
    (
        prop::collection::vec((key, scalar()), 0..12),
        prop::option::of(customer_info),
    )
        .prop_map(|(entries, info)| {
            let mut columns: Map<String, Value> = entries.into_iter().collect();
            if let Some((name, text)) = info {
                columns.insert(name, Value::String(text));
            }
            columns
        })
}

/// A `CustomerInfo` object's text as a client may write it: members in any order,
/// keys repeated, some keys escaped.
fn customer_info_members() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        4 => customer_key(),
        1 => Just("First\\u004eame".to_owned()),
    ];
    prop::collection::vec((key, json_value(), any::<bool>()), 0..10).prop_map(|members| {
        let members: Vec<String> = members
            .into_iter()
            .map(|(key, value, raw)| {
                // A key given as `\u0045mail` spelled out rather than as JSON text.
                let key = if raw && key.contains('\\') {
                    format!("\"{key}\"")
                } else {
                    Value::String(key).to_string()
                };
                format!("{key}:{value}")
            })
            .collect();
        format!("{{{}}}", members.join(","))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// `CustomerInfo` as text (read with borrowed keys) and as the object serde_json
    /// makes of the same text (a `Map`) normalise to the same lead or rejection.
    #[test]
    fn customer_info_text_reads_as_the_object_it_holds(text in customer_info_members()) {
        let Ok(object @ Value::Object(_)) = serde_json::from_str::<Value>(&text) else {
            return Ok(()); // not an object after all (a key spelled out badly)
        };
        let as_text = normalise(&row_with(json!({ "CustomerInfo": text })));
        let as_object = normalise(&row_with(json!({ "CustomerInfo": object })));
        prop_assert_eq!(as_text, as_object);
    }

    #[test]
    fn normalise_never_panics_on_arbitrary_columns(columns in columns()) {
        let row = row_with(Value::Object(columns.clone()));

        let outcome = normalise(&row);

        match outcome {
            Ok(lead) => {
                prop_assert_eq!(&lead.row, &row.id);
                prop_assert_eq!(lead.stage, lead.action.stage());
                for key in lead.extra.keys() {
                    prop_assert!(
                        columns.contains_key(key) || key.starts_with("CustomerInfo."),
                        "extra key {:?} came from nowhere", key
                    );
                    prop_assert!(
                        !["PartitionKey", "RowKey", "Timestamp"].iter().any(|s| s.eq_ignore_ascii_case(key)),
                        "system column {:?} in extra", key
                    );
                }
                let json = serde_json::to_string(&lead);
                prop_assert!(json.is_ok());
            }
            Err(rejection) => {
                prop_assert_eq!(&rejection.row, &row.id);
                prop_assert!(rejection.reason.starts_with("CustomerInfo is "), "{}", rejection.reason);
                prop_assert!(rejection.reason.chars().count() < 2_000);
            }
        }
    }

    #[test]
    fn leadsource_parse_never_panics_and_keeps_raw(raw in any::<String>()) {
        let parsed = LeadSource::parse(&raw);

        prop_assert_eq!(&parsed.raw, &raw);
        if let Some(offer) = parsed.offer {
            prop_assert!(!offer.offer_id.is_empty());
        }
        if let Some(source) = parsed.source {
            prop_assert!(!source.is_empty());
            prop_assert_eq!(source.trim(), source.as_str());
        }
        prop_assert_ne!(parsed.action, Some(Action::Unknown));
    }

    #[test]
    fn leadsource_parse_finds_the_parts_of_well_formed_values(
        source in "[A-Za-z][A-Za-z ()]{0,20}[A-Za-z)]",
        action in "[A-Za-z]{1,15}",
        publisher in "[a-z0-9]{1,12}",
        offer_id in "[a-z0-9][a-z0-9.-]{0,30}",
        spaces in prop::collection::vec(" {0,3}", 4),
    ) {
        let raw = format!(
            "{}{source}{}-{}{action}{}|{}{publisher}.{offer_id}",
            spaces[0], spaces[1], spaces[2], spaces[3], spaces[0],
        );

        let parsed = LeadSource::parse(&raw);

        prop_assert_eq!(parsed.source.as_deref(), Some(source.trim()));
        prop_assert_eq!(parsed.action, Some(Action::parse(&action)));
        prop_assert_eq!(parsed.offer, Some(offer(&publisher, &offer_id)));
    }
}
