//! A table row as read from the Azure table, before any interpretation.
//!
//! PartitionKey and RowKey formats are undocumented for the marketplace table, so
//! they are used only as the row's identity, never parsed for meaning.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The identity of a table row: (PartitionKey, RowKey).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RowId {
    pub partition_key: String,
    pub row_key: String,
}

impl RowId {
    pub fn new(partition_key: impl Into<String>, row_key: impl Into<String>) -> Self {
        Self {
            partition_key: partition_key.into(),
            row_key: row_key.into(),
        }
    }
}

impl fmt::Display for RowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PartitionKey={:?} RowKey={:?}",
            self.partition_key, self.row_key
        )
    }
}

/// The ETag the table service gives an entity stamped `timestamp`:
/// `W/"datetime'2024-05-01T10%3A00%3A00.1234567Z'"`. State records leave out an ETag
/// of this form (it follows from the Timestamp stored beside it) and keep any other.
pub fn standard_etag(timestamp: OffsetDateTime) -> String {
    let mut out = String::with_capacity(50);
    out.push_str("W/\"datetime'");
    // Built for every history entry of every customer read from state: from the 28
    // ASCII bytes, without formatting and splitting a string.
    if let Some(ascii) = crate::timestamp::ascii(timestamp) {
        let ascii = std::str::from_utf8(&ascii).expect("ASCII digits");
        for part in [
            &ascii[..13],
            "%3A",
            &ascii[14..16],
            "%3A",
            &ascii[17..],
            "'\"",
        ] {
            out.push_str(part);
        }
        return out;
    }
    for (i, part) in crate::timestamp::format(timestamp).split(':').enumerate() {
        if i > 0 {
            out.push_str("%3A");
        }
        out.push_str(part);
    }
    out.push_str("'\"");
    out
}

/// `etag == standard_etag(timestamp)`, without building the standard one: it is
/// asked for every row and history entry written to state.
pub fn is_standard_etag(etag: &str, timestamp: OffsetDateTime) -> bool {
    let Some(ascii) = crate::timestamp::ascii(timestamp) else {
        return etag == standard_etag(timestamp);
    };
    // `2024-05-01T10%3A00%3A00.1234567Z` between the quotes: the two colons encoded.
    let middle = etag
        .strip_prefix("W/\"datetime'")
        .and_then(|rest| rest.strip_suffix("'\""))
        .map(str::as_bytes);
    middle.is_some_and(|m| {
        m.len() == 32
            && m[..13] == ascii[..13]
            && &m[13..16] == b"%3A"
            && m[16..18] == ascii[14..16]
            && &m[18..21] == b"%3A"
            && m[21..] == ascii[17..]
    })
}

/// One entity of the lead table with its system columns split out.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRow {
    pub id: RowId,
    /// The entity's ETag; a new ETag means the row was changed.
    pub etag: String,
    /// The server-set `Timestamp`, at its full 100 ns precision.
    pub timestamp: OffsetDateTime,
    /// Every other column, as the service returned it, OData annotations removed.
    pub columns: serde_json::Map<String, serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_etag_is_the_one_the_service_sends_for_that_timestamp() {
        // As Azurite (and the service) returned it for a row stamped at that time.
        let t = crate::timestamp::parse("2026-11-22T01:01:52.8294757Z").unwrap();
        assert_eq!(
            standard_etag(t),
            "W/\"datetime'2026-11-22T01%3A01%3A52.8294757Z'\""
        );
        assert!(is_standard_etag(&standard_etag(t), t));
        let other = crate::timestamp::parse("2026-11-22T01:01:52.8294758Z").unwrap();
        for etag in [
            standard_etag(other),
            "W/\"datetime'2026-11-22T01:01:52.8294757Z'\"".to_owned(),
            "W/\"datetime'2026-11-22T01%3A01%3A52.8294757Z'".to_owned(),
            "W/\"opaque\"".to_owned(),
            String::new(),
        ] {
            assert!(!is_standard_etag(&etag, t), "{etag}");
        }
    }
}
