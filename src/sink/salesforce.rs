//! Salesforce sink (placeholder until written).

use serde::Deserialize;

use super::{CustomerLead, LeadSink, Outcome, SinkError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceSettings {}

impl SalesforceSettings {
    /// Checks what types cannot express; returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}

pub struct SalesforceSink;

impl SalesforceSink {
    pub fn new(_settings: &SalesforceSettings) -> Result<Self, SinkError> {
        Err(SinkError {
            sink: "salesforce".into(),
            message: "not implemented yet".into(),
        })
    }
}

#[async_trait::async_trait]
impl LeadSink for SalesforceSink {
    fn name(&self) -> &str {
        "salesforce"
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
