//! Where leads go. The pipeline hands a sink a batch and gets one outcome per lead
//! back, in the same order; it never knows which CRM it talks to.

use std::time::Duration;

pub use crate::identity::CustomerLead;

pub mod alert;
pub mod dynamics;
pub mod email;
pub mod http;
pub mod hubspot;
mod json_line;
pub mod jsonl;
pub mod mapping;
pub mod marketo;
pub mod salesforce;
pub mod slack;
pub mod teams;
pub mod webhook;

pub use alert::AlertSink;
pub use dynamics::DynamicsSink;
pub use email::EmailSink;
pub use hubspot::HubspotSink;
pub use jsonl::JsonlSink;
pub use marketo::MarketoSink;
pub use salesforce::SalesforceSink;
pub use webhook::WebhookSink;

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
    /// The sink refused it for good, with the sink's reason. Only a refusal of this
    /// record (a field the CRM rejects, a duplicate rule) is one; see `EndpointFailed`.
    Rejected { reason: String },
    /// The endpoint, not this lead, is at fault: credentials refused with a fresh token,
    /// a permission missing, a wrong object or external-id field, a result count that
    /// does not match, a receiver that is gone or redirects. Every lead of the call stays
    /// pending (the checkpoint holds), the pipeline pauses the sink with a growing
    /// back-off, and `/readyz`, `/status`, the metrics and the log say `reason` in one
    /// line until a delivery succeeds.
    EndpointFailed { reason: String },
    /// The CRM record is sales' now (a converted or qualified lead): the sink did not
    /// update it, and told the people working the customer instead; `note` says how
    /// (e.g. the Task it created, on which record). The rows are settled as handled by
    /// the `followed_up` policy (`leadsync rows skipped`), never dead-lettered.
    FollowedUp { note: String },
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
    /// `Delivered` may still sit in a buffer of the sink until [`LeadSink::sync`].
    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome>;
    /// Makes every lead answered `Delivered` so far durable. The pipeline calls it before
    /// it commits those outcomes, and off the path of the next delivery, so a sink that
    /// syncs a file (JSONL) does not hold the next page up. A sink whose `Delivered` is
    /// durable already (a CRM's acknowledgment) keeps this default.
    async fn sync(&self) -> Result<(), SinkError> {
        Ok(())
    }
    /// Checks that the sink is reachable and authorised, without writing a lead.
    async fn healthcheck(&self) -> Result<(), SinkError>;
    /// Work on the sink's own schedule rather than a batch's (the email digest),
    /// called by the daemon after every poll while it holds the processing lease.
    async fn tick(&self) {}
}
