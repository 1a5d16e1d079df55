//! State in an Azure table (placeholder until written).

use std::sync::Arc;

use crate::config::{SourceSettings, StateSettings};
use crate::state::{StateError, StateStore};

/// Opens the table-backed state store (no I/O: the table is created on first use).
pub fn open(
    _source: &SourceSettings,
    settings: &StateSettings,
) -> Result<Arc<dyn StateStore>, StateError> {
    Err(StateError::Open {
        path: settings.table.clone().into(),
        message: "the table state backend is not implemented yet".into(),
    })
}
