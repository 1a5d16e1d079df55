//! What one lead's request writes: its key value, the columns leadsync owns once the
//! lead exists, create or update or follow-up task, and what the answer means for it.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Map, Value};

use super::api::{classify, is_endpoint_refusal, Answer};
use super::batch::{Part, PartKind};
use super::odata_key;
use super::{DynamicsSink, EMAIL_KEY, ENTITY_SET, LEAD_OPEN};
use crate::sink::http::Step;
use crate::sink::mapping::{self, LeadField, OwnedFields, WriteMode};
use crate::sink::{CustomerLead, Outcome};

impl DynamicsSink {
    /// The key value of one lead, or why it cannot be sent.
    pub(super) fn key_of(&self, lead: &CustomerLead) -> Result<String, String> {
        let key = if self.key_attribute == EMAIL_KEY {
            match &lead.customer.email {
                Some(email) if !email.normalized.is_empty() => email.normalized.clone(),
                _ => {
                    return Err(format!(
                        "the lead has no email, and sink.dynamics.key_attribute = \"{EMAIL_KEY}\" needs one to upsert on (a custom key column holding the external key works for every lead)"
                    ))
                }
            }
        } else {
            lead.external_key.clone()
        };
        if key.is_empty() {
            return Err(format!(
                "the lead has an empty external key; refusing to upsert on an empty {}",
                self.key_attribute
            ));
        }
        if let Some(max) = self.max_lengths.get(&self.key_attribute) {
            if key.chars().count() > *max {
                return Err(format!(
                    "the key value is {} characters, longer than {}'s {max}; a cut key could match another customer's record",
                    key.chars().count(),
                    self.key_attribute
                ));
            }
        }
        Ok(key)
    }

    /// The key value and the lead's columns with their ownership, or why it cannot be sent.
    pub(super) fn prepare_owned(
        &self,
        lead: &CustomerLead,
    ) -> Result<(String, OwnedFields), String> {
        let key = self.key_of(lead)?;
        let mut owned = mapping::owned_fields(lead, &self.fields, &self.ownership);
        // `subject` (Topic) is required on create.
        owned.fields.entry("subject".into()).or_insert_with(|| {
            (
                Value::String(mapping::subject(lead)),
                LeadField::Subject.default_write_mode(),
            )
        });
        for (column, (value, _)) in owned.fields.iter_mut() {
            let (Some(max), Value::String(text)) = (self.max_lengths.get(column), &*value) else {
                continue;
            };
            let (cut, was_cut) = mapping::truncate(text, *max);
            if was_cut {
                tracing::info!(
                    customer = %lead.external_key,
                    column = %column,
                    max_chars = *max,
                    chars = text.chars().count(),
                    "Value cut to fit the Dataverse column."
                );
                *value = Value::String(cut);
            }
        }
        // Dataverse takes the key from the URL; the body carries it too so that a create
        // stores it, and it must be the same value.
        owned.fields.insert(
            self.key_attribute.clone(),
            (Value::String(key.clone()), WriteMode::Always),
        );
        Ok((key, owned))
    }

    /// The body a new lead is created with, and its key value.
    #[cfg(test)]
    pub(super) fn prepare(
        &self,
        lead: &CustomerLead,
    ) -> Result<(String, Map<String, Value>), String> {
        let (key, owned) = self.prepare_owned(lead)?;
        Ok((key, owned.for_create()))
    }

    /// `leads(<key attribute>='<value>')` from the host, as a `$batch` request line names it.
    pub(super) fn lead_path(&self, key: &str) -> String {
        format!(
            "{}/{ENTITY_SET}({}='{}')",
            self.api_path,
            self.key_attribute,
            odata_key(key)
        )
    }

    /// The request that writes one lead of the batch (a create, an update or a
    /// follow-up task), or the lead's outcome when no request is needed.
    pub(super) fn plan(
        &self,
        index: usize,
        lead: &CustomerLead,
        existing: &HashMap<String, Map<String, Value>>,
    ) -> Result<Part, Outcome> {
        let (key, owned) = self
            .prepare_owned(lead)
            .map_err(|reason| Outcome::Rejected { reason })?;
        let customer = lead.log_key();
        let record = existing.get(&key.to_lowercase());
        let closed = record.filter(|r| {
            r.get("statecode")
                .and_then(Value::as_i64)
                .unwrap_or(LEAD_OPEN)
                != LEAD_OPEN
        });
        if let Some(record) = closed {
            let (id, task, note) = self.follow_up_task(lead, record);
            let body = serde_json::to_vec(&task).map_err(|e| Outcome::RetryLater {
                after: None,
                reason: format!("cannot encode the follow-up task as JSON: {e}"),
            })?;
            return Ok(Part {
                index,
                customer,
                external_key: lead.external_key.clone(),
                kind: PartKind::Task { note },
                url: format!("{}/tasks({id})", self.api_path),
                condition: ("If-None-Match", "*"),
                body,
            });
        }
        let (body, condition, kind) = match record {
            None => (owned.for_create(), ("If-None-Match", "*"), PartKind::Create),
            Some(record) => {
                let body = owned.for_update(|c| mapping::crm_value_is_empty(record.get(c), &[]));
                if body.keys().all(|c| *c == self.key_attribute) {
                    tracing::debug!(customer = %customer, "Nothing leadsync owns changed on the Dataverse lead; no request.");
                    return Err(Outcome::Delivered);
                }
                (body, ("If-Match", "*"), PartKind::Update)
            }
        };
        let body = serde_json::to_vec(&body).map_err(|e| Outcome::Rejected {
            reason: format!("cannot encode the lead as JSON: {e}"),
        })?;
        Ok(Part {
            index,
            customer,
            external_key: lead.external_key.clone(),
            kind,
            url: self.lead_path(&key),
            condition,
            body,
        })
    }

    /// What a final answer to one request means for its lead, or why it is worth
    /// another try (408, 429, 5xx), with the server's `Retry-After`.
    pub(super) fn judge(
        &self,
        part: &Part,
        answer: &Answer,
        after: Option<Duration>,
    ) -> Result<Outcome, (Option<Duration>, String)> {
        if let Step::Retry { after, reason } = classify(answer.status, after, &answer.text) {
            return Err((after, self.redact(reason)));
        }
        let status = answer.status;
        Ok(match &part.kind {
            PartKind::Task { note } => {
                if status.is_success() {
                    tracing::info!(customer = %part.customer, %note, "The Dataverse lead is closed; created a follow-up task instead of updating it.");
                    Outcome::FollowedUp { note: note.clone() }
                } else if status == StatusCode::PRECONDITION_FAILED {
                    // The task of this event is there already (a replay).
                    Outcome::FollowedUp { note: note.clone() }
                } else {
                    match self.refusal(answer, "the follow-up task") {
                        Outcome::Rejected { reason } => Outcome::RetryLater {
                            after: None,
                            reason: format!(
                                "the lead is closed and Dataverse refused its follow-up task: {reason}"
                            ),
                        },
                        other => other,
                    }
                }
            }
            kind => {
                let created = matches!(kind, PartKind::Create);
                match status {
                    s if s.is_success() => {
                        tracing::debug!(customer = %part.customer, status = s.as_u16(), entity = %answer.entity, created, "Lead upserted in Dataverse.");
                        if let Some(id) = lead_id_of(&answer.entity) {
                            self.remember_id(&part.external_key, id);
                        }
                        Outcome::Delivered
                    }
                    // Created by someone else since the batch's query: next time it is updated.
                    StatusCode::PRECONDITION_FAILED if created => Outcome::RetryLater {
                        after: None,
                        reason: "the Dataverse lead was created by someone else meanwhile; it is updated next time".into(),
                    },
                    // Deleted since the batch's query: next time it is created again.
                    StatusCode::NOT_FOUND
                        if !created
                            && !is_endpoint_refusal(StatusCode::BAD_REQUEST, &answer.text) =>
                    {
                        Outcome::RetryLater {
                            after: None,
                            reason: "the Dataverse lead was deleted meanwhile; it is created again next time".into(),
                        }
                    }
                    _ => self.refusal(answer, "the lead upsert"),
                }
            }
        })
    }
}

/// The lead's id in an `OData-EntityId` (`https://org/api/data/v9.2/leads(<id>)`).
fn lead_id_of(entity: &str) -> Option<&str> {
    let id = entity.rsplit_once("leads(")?.1.strip_suffix(')')?;
    (!id.is_empty() && !id.contains(['=', '\'', '/'])).then_some(id)
}
