//! Dynamics sink (placeholder until written).

use serde::Deserialize;

use super::{CustomerLead, LeadSink, Outcome, SinkError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicsSettings {}

impl DynamicsSettings {
    /// Checks what types cannot express; returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}

pub struct DynamicsSink;

impl DynamicsSink {
    pub fn new(_settings: &DynamicsSettings) -> Result<Self, SinkError> {
        Err(SinkError {
            sink: "dynamics".into(),
            message: "not implemented yet".into(),
        })
    }
}

#[async_trait::async_trait]
impl LeadSink for DynamicsSink {
    fn name(&self) -> &str {
        "dynamics"
    }

    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        vec![
            Outcome::Rejected {
                reason: "not implemented".into()
            };
            batch.len()
        ]
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        Ok(())
    }
}
