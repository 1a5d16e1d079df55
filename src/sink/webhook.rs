//! Webhook sink (placeholder until written).

use serde::Deserialize;

use super::{CustomerLead, LeadSink, Outcome, SinkError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {}

impl WebhookSettings {
    /// Checks what types cannot express; returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}

pub struct WebhookSink;

impl WebhookSink {
    pub fn new(_settings: &WebhookSettings) -> Result<Self, SinkError> {
        Err(SinkError {
            sink: "webhook".into(),
            message: "not implemented yet".into(),
        })
    }
}

#[async_trait::async_trait]
impl LeadSink for WebhookSink {
    fn name(&self) -> &str {
        "webhook"
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
