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
