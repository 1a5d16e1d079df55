//! Keys and properties of the state table's entities.

use super::*;

pub(super) fn props<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Map<String, Value> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
        .collect()
}

pub(super) fn part_key(rk: &str, index: u32) -> String {
    format!("{rk}~{index:04}")
}

pub(super) fn str_of<'a>(entity: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    entity.get(name).and_then(Value::as_str)
}

pub(super) fn as_u32(value: &Value) -> Option<u32> {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
        .and_then(|n| u32::try_from(n).ok())
}

pub(super) fn parts_of(entity: &Map<String, Value>) -> u32 {
    entity.get("Parts").and_then(as_u32).unwrap_or(0)
}

pub(super) fn data_of(entity: &Map<String, Value>) -> String {
    (0..)
        .map_while(|j| str_of(entity, &format!("Data{j}")))
        .collect()
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, String> {
    serde_json::from_str(json).map_err(|e| e.to_string())
}

/// Splits at character boundaries into pieces of at most `units` UTF-16 code units.
pub(super) fn split_utf16(text: &str, units: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, c) in text.char_indices() {
        if used + c.len_utf16() > units {
            pieces.push(&text[start..i]);
            (start, used) = (i, 0);
        }
        used += c.len_utf16();
    }
    if start < text.len() || pieces.is_empty() {
        pieces.push(&text[start..]);
    }
    pieces
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn hashed(parts: &[&[u8]]) -> String {
    let mut digest = Sha256::new();
    for part in parts {
        // Length-prefixed, so ("a", "bc") and ("ab", "c") differ.
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part);
    }
    format!("x{}", hex(&digest.finalize()))
}

pub(super) fn is_hashed(key: &str) -> bool {
    key.starts_with('x')
}

/// The table key of a customer key or dead letter id.
pub(super) fn text_key(text: &str) -> String {
    let key = hex(text.as_bytes());
    if key.len() <= MAX_KEY_CHARS {
        key
    } else {
        hashed(&[text.as_bytes()])
    }
}

/// The key of a lead-table row in the `row` partition: `hex(PartitionKey).hex(RowKey)`,
/// which sorts as the (PartitionKey, RowKey) pairs do ('.' sorts before every hex digit).
pub(super) fn row_key_base(id: &RowId) -> String {
    let key = format!(
        "{}.{}",
        hex(id.partition_key.as_bytes()),
        hex(id.row_key.as_bytes())
    );
    if key.len() <= MAX_KEY_CHARS {
        key
    } else {
        hashed(&[id.partition_key.as_bytes(), id.row_key.as_bytes()])
    }
}

/// 404 for the entity, not for the whole table.
pub(super) fn is_missing_entity(error: &azure_core::Error) -> bool {
    status_of(error) == Some(StatusCode::NotFound) && error_code(error) != Some("TableNotFound")
}
