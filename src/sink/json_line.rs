//! A [`CustomerLead`] as one line of JSON, byte for byte what `serde_json::to_writer`
//! writes for it (a test holds the two equal), only faster: the JSONL sink writes a
//! megabyte and a half per page, and serde_json's string escaping, one byte at a time,
//! was 10% of a backfill's instructions. Here strings are scanned eight bytes at a
//! time for the three things JSON must escape (`"`, `\` and control characters).
//!
//! A field added to [`CustomerLead`] (or the types in it) must be added here too: the
//! property test builds every field of a lead, so it stops compiling until the new field
//! is generated, and then fails until this writer writes it as serde_json does.

use time::OffsetDateTime;

use crate::identity::{CustomerLead, HistoryEntry};
use crate::lead::Customer;

/// Appends `lead` as compact JSON (no newline).
pub fn write_lead(out: &mut Vec<u8>, lead: &CustomerLead) {
    out.extend_from_slice(b"{\"key\":");
    string(out, &lead.key);
    out.extend_from_slice(b",\"external_key\":");
    string(out, &lead.external_key);
    out.extend_from_slice(b",\"customer\":");
    customer(out, &lead.customer);
    out.extend_from_slice(b",\"stage\":");
    string(out, lead.stage.as_str());
    out.extend_from_slice(b",\"do_not_contact\":");
    boolean(out, lead.do_not_contact);
    out.extend_from_slice(b",\"test_lead\":");
    boolean(out, lead.test_lead);
    out.extend_from_slice(b",\"first_seen\":");
    time(out, lead.first_seen);
    out.extend_from_slice(b",\"last_seen\":");
    time(out, lead.last_seen);
    out.extend_from_slice(b",\"offers\":[");
    for (i, offer) in lead.offers.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"offer\":");
        string(out, &offer.offer);
        out.extend_from_slice(b",\"title\":");
        optional(out, offer.title.as_deref());
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"history\":[");
    for (i, entry) in lead.history.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        history(out, entry);
    }
    out.extend_from_slice(b"],\"summary\":");
    string(out, &lead.summary);
    out.push(b'}');
}

fn customer(out: &mut Vec<u8>, c: &Customer) {
    optionals(
        out,
        [
            ("{\"first_name\":", c.first_name.as_deref()),
            (",\"last_name\":", c.last_name.as_deref()),
        ],
    );
    out.extend_from_slice(b",\"email\":");
    match &c.email {
        None => out.extend_from_slice(b"null"),
        Some(email) => {
            out.extend_from_slice(b"{\"original\":");
            string(out, &email.original);
            out.extend_from_slice(b",\"normalized\":");
            string(out, &email.normalized);
            out.push(b'}');
        }
    }
    optionals(
        out,
        [
            (",\"phone\":", c.phone.as_deref()),
            (",\"country\":", c.country.as_deref()),
            (",\"company\":", c.company.as_deref()),
            (",\"title\":", c.title.as_deref()),
        ],
    );
    out.push(b'}');
}

fn history(out: &mut Vec<u8>, h: &HistoryEntry) {
    out.extend_from_slice(b"{\"row\":{\"partition_key\":");
    string(out, &h.row.partition_key);
    out.extend_from_slice(b",\"row_key\":");
    string(out, &h.row.row_key);
    out.extend_from_slice(b"},\"etag\":");
    string(out, &h.etag);
    out.extend_from_slice(b",\"timestamp\":");
    time(out, h.timestamp);
    out.extend_from_slice(b",\"action\":");
    string(out, &h.action);
    optionals(
        out,
        [
            (",\"source\":", h.source.as_deref()),
            (",\"offer\":", h.offer.as_deref()),
            (",\"offer_title\":", h.offer_title.as_deref()),
        ],
    );
    out.extend_from_slice(b",\"stage\":");
    string(out, h.stage.as_str());
    out.extend_from_slice(b",\"description\":");
    optional(out, h.description.as_deref());
    out.push(b'}');
}

fn boolean(out: &mut Vec<u8>, value: bool) {
    out.extend_from_slice(if value { b"true" } else { b"false" });
}

/// `,"name":value` for each (`,"name":`, value).
fn optionals<const N: usize>(out: &mut Vec<u8>, fields: [(&str, Option<&str>); N]) {
    for (name, value) in fields {
        out.extend_from_slice(name.as_bytes());
        optional(out, value);
    }
}

fn optional(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// As `timestamp::serde_ticks` writes it.
fn time(out: &mut Vec<u8>, t: OffsetDateTime) {
    match crate::timestamp::ascii(t) {
        Some(digits) => {
            out.push(b'"');
            out.extend_from_slice(&digits);
            out.push(b'"');
        }
        None => string(out, &crate::timestamp::format(t)),
    }
}

/// Whether any of the 8 bytes of `word` is `"`, `\` or below 0x20 (exact for the word as
/// a whole, as the classic has-zero-byte and has-less-than tests are).
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    control
        | zero_byte(word ^ (ONES * u64::from(b'"')))
        | zero_byte(word ^ (ONES * u64::from(b'\\')))
        != 0
}

/// Where the first 8-byte word of `bytes` that holds a `"`, a `\\` or a byte below 0x20
/// starts (the last, short word padded with spaces, which need no escape); `None` when
/// nothing needs an escape.
fn first_escape_word(bytes: &[u8]) -> Option<usize> {
    let mut words = bytes.chunks_exact(8);
    if let Some(n) = words
        .by_ref()
        .position(|w| needs_escape(u64::from_le_bytes(w.try_into().expect("8 bytes"))))
    {
        return Some(n * 8);
    }
    let rest = words.remainder();
    let mut last = [b' '; 8];
    last[..rest.len()].copy_from_slice(rest);
    needs_escape(u64::from_le_bytes(last)).then_some(bytes.len() - rest.len())
}

/// A JSON string, escaped as serde_json escapes it: `\"`, `\\`, the short forms of
/// backspace, tab, newline, form feed and carriage return, `\u00XX` (lowercase hex)
/// for the other control characters, everything else as it is.
fn string(out: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Most strings (names, keys, offers) need no escape: checked a word at a time, the
    // last few bytes padded to a word, and copied in one piece. The others are escaped
    // from the first word that needs it, the words before it not checked again.
    let Some(first) = first_escape_word(bytes) else {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    };
    let mut start = 0;
    let mut i = first;
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            if !needs_escape(word) {
                i += 8;
                continue;
            }
        }
        let byte = bytes[i];
        let short = match byte {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            0x08 => Some(b'b'),
            0x09 => Some(b't'),
            0x0a => Some(b'n'),
            0x0c => Some(b'f'),
            0x0d => Some(b'r'),
            0x00..=0x1f => None,
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        match short {
            Some(c) => out.extend_from_slice(&[b'\\', c]),
            None => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&[HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]]);
            }
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::OfferInterest;
    use crate::lead::{Email, Stage};
    use crate::source::row::RowId;
    use proptest::prelude::*;

    fn line(lead: &CustomerLead) -> Vec<u8> {
        let mut out = Vec::new();
        write_lead(&mut out, lead);
        out
    }

    /// Text with everything JSON escapes, at every place in an 8-byte word.
    fn arb_text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                4 => prop::char::range('a', 'z'),
                1 => prop::sample::select(vec!['"', '\\', '\n', '\r', '\t', '\u{8}', '\u{c}', '\0', '\u{1}', '\u{1f}', '\u{7f}', '/', 'é', '€', '😀', ' ']),
            ],
            0..40,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    fn arb_time() -> impl Strategy<Value = OffsetDateTime> {
        // Years 1 to 9999 (28 ASCII bytes) and, rarely, ones `ascii` leaves to `format`.
        prop_oneof![
            9 => (-62_135_596_800i64..253_402_300_799i64, 0u32..10_000_000),
            1 => (-377_705_116_800i64..-62_135_596_800i64, 0u32..10_000_000),
        ]
        .prop_map(|(secs, ticks)| {
            OffsetDateTime::from_unix_timestamp(secs).unwrap()
                + time::Duration::nanoseconds(i64::from(ticks) * 100)
        })
    }

    fn arb_stage() -> impl Strategy<Value = Stage> {
        prop::sample::select(vec![
            Stage::Unknown,
            Stage::InitialInterest,
            Stage::Trial,
            Stage::Active,
            Stage::DoNotContact,
        ])
    }

    fn arb_entry() -> impl Strategy<Value = HistoryEntry> {
        let opt = || prop::option::of(arb_text());
        (
            (arb_text(), arb_text(), arb_text(), arb_time(), arb_text()),
            (opt(), opt(), opt(), arb_stage(), opt()),
        )
            .prop_map(
                |(
                    (pk, rk, etag, timestamp, action),
                    (source, offer, offer_title, stage, description),
                )| {
                    HistoryEntry {
                        row: RowId::new(pk, rk),
                        etag,
                        timestamp,
                        action,
                        source,
                        offer,
                        offer_title,
                        stage,
                        description,
                    }
                },
            )
    }

    fn arb_lead() -> impl Strategy<Value = CustomerLead> {
        let opt = || prop::option::of(arb_text());
        let customer = (
            (opt(), opt(), prop::option::of((arb_text(), arb_text()))),
            (opt(), opt(), opt(), opt()),
        )
            .prop_map(
                |((first_name, last_name, email), (phone, country, company, title))| Customer {
                    first_name,
                    last_name,
                    email: email.map(|(original, normalized)| Email {
                        original,
                        normalized,
                    }),
                    phone,
                    country,
                    company,
                    title,
                },
            );
        let offers = prop::collection::vec(
            (arb_text(), opt()).prop_map(|(offer, title)| OfferInterest { offer, title }),
            0..3,
        );
        (
            (
                arb_text(),
                arb_text(),
                customer,
                arb_stage(),
                any::<bool>(),
                any::<bool>(),
            ),
            (
                arb_time(),
                arb_time(),
                offers,
                prop::collection::vec(arb_entry(), 0..4),
                arb_text(),
            ),
        )
            .prop_map(
                |(
                    (key, external_key, customer, stage, do_not_contact, test_lead),
                    (first_seen, last_seen, offers, history, summary),
                )| {
                    CustomerLead {
                        key,
                        external_key,
                        customer,
                        stage,
                        do_not_contact,
                        test_lead,
                        first_seen,
                        last_seen,
                        offers,
                        history,
                        summary,
                    }
                },
            )
    }

    /// Every character that needs an escape, at every place of strings of 0 to 17
    /// bytes: in the words checked whole and in the padded last one.
    #[test]
    fn an_escape_is_found_wherever_it_stands() {
        for len in 1..=17 {
            for at in 0..len {
                for special in ['"', '\\', '\n', '\0', '\u{1f}'] {
                    let text: String = (0..len)
                        .map(|i| if i == at { special } else { 'a' })
                        .collect();
                    let mut out = Vec::new();
                    string(&mut out, &text);
                    assert_eq!(out, serde_json::to_vec(&text).unwrap(), "{text:?}");
                }
            }
        }
        let mut out = Vec::new();
        string(&mut out, "");
        assert_eq!(out, b"\"\"");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        #[test]
        fn a_lead_line_is_what_serde_json_writes(lead in arb_lead()) {
            let expected = serde_json::to_vec(&lead).unwrap();
            prop_assert_eq!(String::from_utf8(line(&lead)).unwrap(), String::from_utf8(expected).unwrap());
        }

        #[test]
        fn a_string_is_escaped_as_serde_json_escapes_it(text in arb_text()) {
            let mut out = Vec::new();
            string(&mut out, &text);
            prop_assert_eq!(out, serde_json::to_vec(&text).unwrap());
        }
    }

    #[test]
    fn every_byte_that_needs_an_escape_is_found_at_every_place_in_a_word() {
        for byte in 0u8..=0x7f {
            for place in 0..8 {
                let mut word = *b"abcdefgh";
                word[place] = byte;
                let expected = byte < 0x20 || byte == b'"' || byte == b'\\';
                assert_eq!(
                    needs_escape(u64::from_le_bytes(word)),
                    expected,
                    "byte {byte:#x} at {place}"
                );
            }
        }
        // Bytes of multi-byte characters never need one.
        assert!(!needs_escape(u64::from_le_bytes(
            *"é€😀".as_bytes().first_chunk().unwrap()
        )));
    }
}
