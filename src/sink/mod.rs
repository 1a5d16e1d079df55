//! Where leads go. The pipeline hands a sink a batch and gets one outcome per lead
//! back, in the same order; it never knows which CRM it talks to.

use std::path::PathBuf;

use crate::sink::alert::{SlackSettings, TeamsSettings, Vendor};
use crate::sink::dynamics::DynamicsSettings;
use crate::sink::email::EmailSettings;
use crate::sink::hubspot::HubspotSettings;
use crate::sink::marketo::MarketoSettings;
use crate::sink::salesforce::SalesforceSettings;
use crate::sink::webhook::WebhookSettings;
use serde::Deserialize;
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

impl SinkError {
    /// A failure of the sink named `sink` (`SINK` of its module).
    pub fn new(sink: impl Into<String>, message: impl Into<String>) -> Self {
        SinkError {
            sink: sink.into(),
            message: message.into(),
        }
    }

    /// A setting of the sink that cannot be used, as `validate` names it: `(key, why)`.
    pub fn config(sink: impl Into<String>, (key, why): (String, String)) -> Self {
        Self::new(sink, format!("config key `{key}`: {why}"))
    }
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
    /// A link to the customer's record (`external_key`) in this sink, a CRM record's
    /// page, when an answer to this process named the record; the alert sinks of the
    /// deployment put it in their messages.
    fn record_link(&self, _external_key: &str) -> Option<String> {
        None
    }
    /// Asked once, at start, when the deployment has an alert sink: from now on, keep
    /// what [`LeadSink::record_link`] needs. Without it a sink keeps nothing for links
    /// (no map growing in a deployment that shows none).
    fn want_links(&self) {}
    /// Whether this sink tells people (Teams, Slack) rather than keeping records: the
    /// pipeline hands it its batches after the other sinks' (waiting a few seconds at
    /// most), with the record links they know.
    fn is_alert(&self) -> bool {
        false
    }
    /// [`LeadSink::deliver`], with the link to each record another sink knows
    /// (`links[i]` for `batch[i]`, or none); a sink that shows no links ignores them.
    async fn deliver_linked(
        &self,
        batch: &[CustomerLead],
        _links: &[Option<String>],
    ) -> Vec<Outcome> {
        self.deliver(batch).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    Jsonl,
    Salesforce,
    Dynamics,
    Webhook,
    /// An alert in a Microsoft Teams channel (Workflows webhook) per stage reached.
    Teams,
    /// An alert in a Slack channel (incoming webhook) per stage reached.
    Slack,
    Hubspot,
    Marketo,
    /// An alert by email (SMTP) per stage reached, or a digest of them.
    Email,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSettings {
    /// This sink's name in state, logs, metrics and commands (`--sink`): required and
    /// unique in each `[[sinks]]` entry; the kind (`"salesforce"`) for a lone `[sink]`.
    #[serde(default)]
    pub name: Option<String>,
    /// Which sink receives leads.
    #[serde(default = "default_sink_kind")]
    pub kind: SinkKind,
    /// Leads per delivery call; unset: [`SinkSettings::batch_size`] picks by sink.
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub jsonl: JsonlSettings,
    /// Required when `kind = "salesforce"`.
    pub salesforce: Option<SalesforceSettings>,
    /// Required when `kind = "dynamics"`.
    pub dynamics: Option<DynamicsSettings>,
    /// Required when `kind = "webhook"`.
    pub webhook: Option<WebhookSettings>,
    /// Required when `kind = "teams"`.
    pub teams: Option<TeamsSettings>,
    /// Required when `kind = "slack"`.
    pub slack: Option<SlackSettings>,
    /// Required when `kind = "hubspot"`.
    pub hubspot: Option<HubspotSettings>,
    /// Required when `kind = "marketo"`.
    pub marketo: Option<MarketoSettings>,
    /// Required when `kind = "email"`.
    pub email: Option<EmailSettings>,
}

impl SinkSettings {
    /// Leads per delivery call: `batch_size` if set, else 200 for the CRM and webhook
    /// sinks (a Salesforce sObject Collections request holds at most 200), and 1,000 (a
    /// full table page) for JSONL, which has no per-call limit and syncs the file once
    /// per call.
    pub fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(match self.kind {
            SinkKind::Jsonl => 1000,
            SinkKind::Salesforce | SinkKind::Dynamics | SinkKind::Webhook => 200,
            // A batch is posted one message at a time, paced: keep it short.
            SinkKind::Teams | SinkKind::Slack | SinkKind::Email => 50,
            // A HubSpot batch holds at most 100 inputs.
            SinkKind::Hubspot => 100,
            // A Marketo leads.json call holds at most 300 leads.
            SinkKind::Marketo => 300,
        })
    }
}

impl Default for SinkSettings {
    fn default() -> Self {
        Self {
            name: None,
            kind: default_sink_kind(),
            batch_size: None,
            jsonl: JsonlSettings::default(),
            salesforce: None,
            dynamics: None,
            webhook: None,
            teams: None,
            slack: None,
            hubspot: None,
            marketo: None,
            email: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlSettings {
    /// File to append one JSON object per lead to; `-` is standard output.
    #[serde(default = "default_jsonl_path")]
    pub path: PathBuf,
}

impl Default for JsonlSettings {
    fn default() -> Self {
        Self {
            path: default_jsonl_path(),
        }
    }
}

fn default_sink_kind() -> SinkKind {
    SinkKind::Jsonl
}
fn default_jsonl_path() -> PathBuf {
    PathBuf::from("-")
}

impl SinkKind {
    /// The kind as the config spells it (`"salesforce"`).
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Jsonl => "jsonl",
            SinkKind::Salesforce => "salesforce",
            SinkKind::Dynamics => "dynamics",
            SinkKind::Webhook => "webhook",
            SinkKind::Teams => "teams",
            SinkKind::Slack => "slack",
            SinkKind::Hubspot => "hubspot",
            SinkKind::Marketo => "marketo",
            SinkKind::Email => "email",
        }
    }
}

impl SinkSettings {
    /// The sink's name: `name`, or its kind.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.kind.as_str().to_owned())
    }

    /// Checks the `sink.*` keys: `Err((key, why))` for the first one that is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.batch_size == Some(0) {
            return Err(("sink.batch_size".into(), "must be at least 1".into()));
        }
        let missing = |section: &str| {
            Err((
                format!("sink.{section}"),
                format!("sink.kind = \"{section}\" needs a [sink.{section}] section"),
            ))
        };
        match self.kind {
            SinkKind::Jsonl => {}
            SinkKind::Salesforce => match &self.salesforce {
                Some(s) => s.validate()?,
                None => return missing("salesforce"),
            },
            SinkKind::Dynamics => match &self.dynamics {
                Some(s) => s.validate()?,
                None => return missing("dynamics"),
            },
            SinkKind::Webhook => match &self.webhook {
                Some(s) => s.validate()?,
                None => return missing("webhook"),
            },
            SinkKind::Teams => match &self.teams {
                Some(s) => s.validate(Vendor::Teams)?,
                None => return missing("teams"),
            },
            SinkKind::Slack => match &self.slack {
                Some(s) => s.validate(Vendor::Slack)?,
                None => return missing("slack"),
            },
            SinkKind::Hubspot => match &self.hubspot {
                Some(s) => s.validate()?,
                None => return missing("hubspot"),
            },
            SinkKind::Marketo => match &self.marketo {
                Some(s) => s.validate()?,
                None => return missing("marketo"),
            },
            SinkKind::Email => match &self.email {
                Some(s) => s.validate()?,
                None => return missing("email"),
            },
        }
        if self.jsonl.path.as_os_str().is_empty() {
            return Err((
                "sink.jsonl.path".into(),
                "must not be empty (use \"-\" for stdout)".into(),
            ));
        }
        Ok(())
    }
}
