//! Where leads go. The pipeline hands a sink a batch and gets one outcome per lead
//! back, in the same order; it never knows which CRM it talks to.

use std::time::Duration;

use crate::lead::LeadEvent;

pub mod jsonl;

pub use jsonl::JsonlSink;

/// A lead as handed to a sink: the normalised event and what policy says about it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Lead {
    #[serde(flatten)]
    pub event: LeadEvent,
    /// True when the customer asked not to be contacted (delivered only under the `flag` policy).
    pub do_not_contact: bool,
}

/// What became of one lead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sink has it.
    Delivered,
    /// Not now (outage, throttling): try again later, after `after` if the sink said so.
    RetryLater {
        after: Option<Duration>,
        reason: String,
    },
    /// The sink refused it for good, with the sink's reason.
    Rejected { reason: String },
}

/// A sink-level failure outside any single lead (used by healthchecks).
#[derive(Debug, thiserror::Error)]
#[error("sink {sink}: {message}")]
pub struct SinkError {
    pub sink: String,
    pub message: String,
}

/// One destination for leads.
#[async_trait::async_trait]
pub trait LeadSink: Send + Sync {
    /// A short name for logs and state records (`jsonl`, `salesforce`, ...).
    fn name(&self) -> &str;
    /// Delivers a batch; returns exactly one outcome per lead, in input order.
    async fn deliver(&self, batch: &[Lead]) -> Vec<Outcome>;
    /// Checks that the sink is reachable and authorised, without writing a lead.
    async fn healthcheck(&self) -> Result<(), SinkError>;
}
