use super::*;

#[test]
fn row_keys_sort_as_the_rows_do() {
    let ids = [
        RowId::new("a", "z"),
        RowId::new("ab", ""),
        RowId::new("ab", "a"),
        RowId::new("ab", "ab"),
        RowId::new("b", "a"),
    ];
    let keys: Vec<String> = ids.iter().map(row_key_base).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    for key in &keys {
        let marker = format!("{key}{HANDLED_SUFFIX}");
        let listed = format!("{key}{LISTED_SUFFIX}~0001");
        let end = format!("{key}{RANGE_END_SUFFIX}");
        assert!(*key < marker && marker < end && listed < end, "{key}");
    }
    // Everything of a row sorts before the next row.
    for pair in keys.windows(2) {
        assert!(
            format!("{}{RANGE_END_SUFFIX}", pair[0]) < pair[1],
            "{pair:?}"
        );
    }
}

#[test]
fn keys_hold_no_character_the_service_refuses_or_the_sdk_leaves_unescaped() {
    let id = RowId::new("p'/\\#?\u{1}", "r\u{7f}'é");
    for key in [row_key_base(&id), text_key("email:o'brien@contoso.com/#?")] {
        assert!(
            key.chars().all(|c| c.is_ascii_hexdigit() || c == '.'),
            "{key}"
        );
    }
}

#[test]
fn a_key_too_long_for_the_service_is_hashed_and_stays_distinct() {
    let long = "k".repeat(300);
    let a = row_key_base(&RowId::new(&long, "a"));
    let b = row_key_base(&RowId::new(&long, "b"));
    assert!(is_hashed(&a) && a.len() <= MAX_KEY_CHARS);
    assert_ne!(a, b);
    assert_ne!(
        hashed(&[b"a", b"bc"]),
        hashed(&[b"ab", b"c"]),
        "the split between the two keys counts"
    );
    assert!(!is_hashed(&text_key("email:a@b.c")));
}

#[test]
fn text_is_split_at_character_boundaries_within_the_utf16_limit() {
    let text = format!("{}😀{}", "a".repeat(9), "é".repeat(11));
    let pieces = split_utf16(&text, 10);
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().all(|p| p.encode_utf16().count() <= 10));
    assert_eq!(pieces[0], "a".repeat(9), "the emoji needs two units");
    assert_eq!(split_utf16("", 10), vec![""]);
}

#[test]
fn a_large_record_continues_in_parts_and_stale_parts_are_deleted() {
    let json = "x".repeat(CHUNK_UTF16_UNITS * CHUNKS_PER_ENTITY + 1);
    let head = Some((Etag::from("W/\"1\""), 3));
    let ops = write_record(CUSTOMER, "ab", Map::new(), &json, head);
    assert!(matches!(&ops[0], Op::Update { rk, entity, .. } if rk == "ab" && entity["Parts"] == 1));
    assert!(matches!(&ops[1], Op::Upsert { rk, entity } if rk == "ab~0001" && entity["Part"] == 1));
    let deleted: Vec<&str> = ops[2..]
        .iter()
        .map(|op| match op {
            Op::Delete { rk, etag: None } => rk.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(deleted, ["ab~0002", "ab~0003"]);
    let mut main = Map::new();
    for op in &ops[..2] {
        if let Op::Update { entity, .. } | Op::Upsert { entity, .. } = op {
            main.insert(
                str_of(entity, "RowKey").unwrap().to_owned(),
                Value::String(data_of(entity)),
            );
        }
    }
    assert_eq!(
        format!(
            "{}{}",
            main["ab"].as_str().unwrap(),
            main["ab~0001"].as_str().unwrap()
        ),
        json
    );
}

#[test]
fn a_read_that_began_before_a_write_ended_never_replaces_what_the_write_returned() {
    let head = |n: &str| Some((Etag::from(n), 0));
    let etag = |known: &Known| known.customers["k"].0.as_ref().map(|(e, _)| e.to_string());
    let mut known = Known::default();
    known.read_customer("k", head("read-1"), known.now());
    known.settle_begins();
    // The next page's read begins while the settle's write is under way...
    let began = known.now();
    known.writes += 1;
    known.wrote_customer("k", head("written"));
    // ...and ends after it: the write's ETag stays.
    known.read_customer("k", head("read-1"), began);
    assert_eq!(etag(&known).as_deref(), Some("written"));
    // A read begun after the write replaces it (it saw the write, or a later change).
    known.read_customer("k", head("read-2"), known.now());
    assert_eq!(etag(&known).as_deref(), Some("read-2"));
    // Two settles later, an entry no settle took is forgotten.
    known.settle_begins();
    known.settle_begins();
    assert!(
        known.customers.contains_key("k"),
        "learnt in settle 1's time"
    );
    known.settle_begins();
    assert!(known.customers.is_empty());
}

#[tokio::test]
async fn a_record_larger_than_one_transaction_is_refused_by_name_before_any_request() {
    let text = "[source]\ntable = \"Leads\"\nconnection_string = { value = \"DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;TableEndpoint=http://127.0.0.1:9/a;\" }\n[state]\nbackend = \"table\"\n";
    let settings = crate::config::Settings::from_toml_with_env(
        text,
        std::path::Path::new("t.toml"),
        &HashMap::new(),
    )
    .unwrap();
    let store = TableStore::new(&settings.source, &settings.state).unwrap();
    let json = "x".repeat(MAX_TRANSACTION_BYTES);
    let group = Group {
        label: "customer email:big@contoso.com".into(),
        ops: write_record(CUSTOMER, "ab", Map::new(), &json, None),
        customer: None,
    };

    let error = store
        .commit("settle rows", CUSTOMER, vec![group])
        .await
        .unwrap_err()
        .to_string();

    assert!(error.contains("customer email:big@contoso.com"), "{error}");
    assert!(error.contains("at most"), "{error}");
}
