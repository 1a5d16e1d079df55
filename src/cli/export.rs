//! `leadsync export`: the merged customers (and, on request, the rows held as
//! unidentifiable or rejected) as CSV or JSON lines, for publishers whose CRM has no sink.

use std::io::Write;

use serde::Serialize;
use time::OffsetDateTime;

use crate::identity::CustomerState;
use crate::state::{RecordedRow, Settled, StateError, StateStore};
use crate::timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Jsonl,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot write the export: {0}")]
    Write(String),
}

/// One line of the export, whatever it describes.
#[derive(Debug, Serialize)]
struct Line {
    record_type: &'static str,
    external_key: String,
    customer_key: String,
    email: String,
    first_name: String,
    last_name: String,
    company: String,
    title: String,
    phone: String,
    country: String,
    stage: String,
    do_not_contact: bool,
    offers: String,
    first_seen: String,
    last_seen: String,
    events: usize,
    delivered: bool,
    summary: String,
    row: String,
    reason: String,
}

fn customer_line(c: &CustomerState) -> Line {
    let lead = &c.lead;
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    Line {
        record_type: "customer",
        external_key: lead.external_key.clone(),
        customer_key: lead.key.clone(),
        email: lead
            .customer
            .email
            .as_ref()
            .map(|e| e.original.clone())
            .unwrap_or_default(),
        first_name: s(&lead.customer.first_name),
        last_name: s(&lead.customer.last_name),
        company: s(&lead.customer.company),
        title: s(&lead.customer.title),
        phone: s(&lead.customer.phone),
        country: s(&lead.customer.country),
        stage: lead.stage.as_str().into(),
        do_not_contact: lead.do_not_contact,
        offers: lead
            .offers
            .iter()
            .map(|o| o.offer.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        first_seen: timestamp::format(lead.first_seen),
        last_seen: timestamp::format(lead.last_seen),
        events: lead.history.len(),
        delivered: c.delivered,
        summary: lead.summary.clone(),
        row: String::new(),
        reason: String::new(),
    }
}

fn held_line(r: &RecordedRow) -> Line {
    let (record_type, reason) = match &r.outcome {
        Settled::Unidentifiable { reason } => ("unidentifiable", reason.clone()),
        Settled::Rejected { reason } => ("rejected", reason.clone()),
        Settled::Skipped { policy } => ("skipped", policy.clone()),
        Settled::Delivered { sink } => ("delivered", sink.clone()),
    };
    let field = |path: &[&str]| {
        let mut v = r
            .columns
            .as_ref()
            .map(|m| serde_json::Value::Object(m.clone()));
        for p in path {
            v = v.and_then(|v| v.get(p).cloned());
        }
        v.and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    Line {
        record_type,
        external_key: String::new(),
        customer_key: String::new(),
        email: field(&["customer", "email", "original"]),
        first_name: field(&["customer", "first_name"]),
        last_name: field(&["customer", "last_name"]),
        company: field(&["customer", "company"]),
        title: field(&["customer", "title"]),
        phone: field(&["customer", "phone"]),
        country: field(&["customer", "country"]),
        stage: field(&["stage"]),
        do_not_contact: false,
        offers: field(&["offer", "raw"]),
        first_seen: timestamp::format(r.row.timestamp),
        last_seen: timestamp::format(r.row.timestamp),
        events: 1,
        delivered: false,
        summary: String::new(),
        row: r.row.id.to_string(),
        reason,
    }
}

/// Writes the export; returns the number of lines written.
pub async fn export(
    state: &dyn StateStore,
    format: Format,
    since: Option<OffsetDateTime>,
    include_held: bool,
    out: &mut dyn Write,
) -> Result<usize, ExportError> {
    let mut lines: Vec<Line> = state
        .all_customers()
        .await?
        .iter()
        .filter(|c| since.is_none_or(|t| c.lead.last_seen >= t))
        .map(customer_line)
        .collect();
    if include_held {
        let mut held = state.unidentifiable().await?;
        held.extend(state.rejected().await?);
        lines.extend(
            held.iter()
                .filter(|r| since.is_none_or(|t| r.row.timestamp >= t))
                .map(held_line),
        );
    }
    let write_err = |e: &dyn std::fmt::Display| ExportError::Write(e.to_string());
    match format {
        Format::Jsonl => {
            for line in &lines {
                serde_json::to_writer(&mut *out, line).map_err(|e| write_err(&e))?;
                out.write_all(b"\n").map_err(|e| write_err(&e))?;
            }
        }
        Format::Csv => {
            let mut w = csv::Writer::from_writer(&mut *out);
            for line in &lines {
                w.serialize(line).map_err(|e| write_err(&e))?;
            }
            w.flush().map_err(|e| write_err(&e))?;
        }
    }
    Ok(lines.len())
}
