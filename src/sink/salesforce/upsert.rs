//! The upsert of new and open Leads by External ID: the record sent (what leadsync
//! owns once the Lead exists), the results per record, and the allowSave retry of
//! records only duplicate rules objected to.

use std::collections::HashMap;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::api::{describe_errors, snippet};
use super::query::Existing;
use super::settings::DuplicatePolicy;
use super::{
    SalesforceSink, CANNOT_UPDATE_CONVERTED_LEAD, DUPLICATES_DETECTED, UNABLE_TO_LOCK_ROW,
};
use crate::sink::http::Finished;
use crate::sink::mapping::{crm_value_is_empty, owned_fields, truncate, WriteMode};
use crate::sink::{CustomerLead, Outcome};

/// One UpsertResult.
#[derive(Debug, Deserialize)]
pub(super) struct UpsertResult {
    #[serde(default)]
    pub(super) id: Option<String>,
    pub(super) success: bool,
    #[serde(default)]
    pub(super) created: Option<bool>,
    #[serde(default)]
    pub(super) errors: Vec<RecordError>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RecordError {
    #[serde(rename = "statusCode", default)]
    pub(super) status_code: String,
    #[serde(default)]
    pub(super) message: String,
    #[serde(default)]
    pub(super) fields: Vec<String>,
}

/// What became of one record of a collection.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RecordVerdict {
    Upserted {
        created: bool,
    },
    /// Only duplicate rules objected: allowSave may get it through.
    Duplicate(String),
    /// Only a row lock stood in the way.
    Locked(String),
    /// The Lead was converted (after the batch's query saw it open).
    Converted(String),
    Rejected(String),
}

pub(super) fn record_verdict(result: &UpsertResult) -> RecordVerdict {
    if result.success {
        return RecordVerdict::Upserted {
            created: result.created.unwrap_or(false),
        };
    }
    if result.errors.is_empty() {
        return RecordVerdict::Rejected(
            "Salesforce did not save the Lead and gave no reason".into(),
        );
    }
    let text = describe_errors(result.errors.iter().map(|e| {
        (
            e.status_code.as_str(),
            e.message.as_str(),
            e.fields.as_slice(),
        )
    }));
    let all = |code: &str| result.errors.iter().all(|e| e.status_code == code);
    if all(DUPLICATES_DETECTED) {
        RecordVerdict::Duplicate(text)
    } else if all(UNABLE_TO_LOCK_ROW) {
        RecordVerdict::Locked(text)
    } else if result
        .errors
        .iter()
        .any(|e| e.status_code == CANNOT_UPDATE_CONVERTED_LEAD)
    {
        RecordVerdict::Converted(text)
    } else {
        RecordVerdict::Rejected(text)
    }
}

impl SalesforceSink {
    /// The record sent for `lead`: a new Lead gets every mapped field and the
    /// placeholders of required fields it lacks; an existing one only its `always`
    /// fields and the `if_empty` ones still empty in Salesforce. Opt-outs are sent only
    /// as `true`; lengths are respected; the external id is always there.
    pub(super) fn record(&self, lead: &CustomerLead, existing: Option<&Existing>) -> Value {
        let key = &lead.external_key;
        let mut owned = owned_fields(lead, &self.fields, &self.ownership);
        owned
            .fields
            .retain(|_, (v, _)| !matches!(v, Value::String(s) if s.trim().is_empty()));
        for (field, placeholder) in self.placeholders.values() {
            if !owned.fields.keys().any(|f| f.eq_ignore_ascii_case(field)) {
                if existing.is_none() {
                    tracing::info!(customer = %lead.log_key(), field = %field, placeholder = %placeholder, "Lead has no value for a field Salesforce requires; sending the placeholder on create.");
                }
                owned.fields.insert(
                    field.clone(),
                    (Value::String(placeholder.clone()), WriteMode::OnCreate),
                );
            }
        }
        let placeholders: Vec<&str> = self
            .placeholders
            .values()
            .map(|(_, p)| p.as_str())
            .collect();
        let mut fields = match existing {
            None => owned.for_create(),
            Some(e) => owned.for_update(|f| crm_value_is_empty(e.value(f), &placeholders)),
        };
        for (field, value) in fields.iter_mut() {
            let Value::String(text) = value else { continue };
            let Some(&max) = self.max_lengths.get(&field.to_ascii_lowercase()) else {
                continue;
            };
            let (cut, was_cut) = truncate(text, max);
            if was_cut {
                tracing::info!(customer = %lead.log_key(), field = %field, max_chars = max, chars = text.chars().count(), "Value longer than the Salesforce field; truncated.");
                *text = cut;
            }
        }
        let mut record = Map::new();
        record.insert("attributes".into(), json!({ "type": "Lead" }));
        record.insert(self.external_id_field.clone(), Value::String(key.clone()));
        record.extend(fields);
        Value::Object(record)
    }

    pub(super) fn upsert_path(&self) -> String {
        format!(
            "/services/data/{}/composite/sobjects/Lead/{}",
            self.api_version, self.external_id_field
        )
    }

    /// Upserts up to 200 records; one result per record, or why there are none.
    pub(super) async fn upsert(
        &self,
        records: &[Value],
        allow_save: bool,
    ) -> Finished<Vec<UpsertResult>> {
        let body = json!({ "allOrNone": false, "records": records });
        let path = self.upsert_path();
        match self
            .call(Method::PATCH, &path, Some(&body), allow_save)
            .await
        {
            Finished::Done(text) => match serde_json::from_str::<Vec<UpsertResult>>(&text) {
                Ok(results) if results.len() == records.len() => Finished::Done(results),
                Ok(results) => Finished::Failed {
                    reason: format!(
                        "Salesforce returned {} results for {} records",
                        results.len(),
                        records.len()
                    ),
                },
                // The upsert is idempotent, so an unreadable answer is safe to repeat later.
                Err(e) => Finished::GaveUp {
                    after: None,
                    reason: format!(
                        "Salesforce upsert answer is not a list of results ({e}): {}",
                        snippet(&text)
                    ),
                },
            },
            Finished::GaveUp { after, reason } => Finished::GaveUp { after, reason },
            Finished::Failed { reason } => Finished::Failed { reason },
        }
    }

    /// Upserts the leads at `indexes` (new or open Leads); returns how many were created.
    pub(super) async fn upsert_open(
        &self,
        leads: &[CustomerLead],
        indexes: &[usize],
        existing: &HashMap<String, Existing>,
        outcomes: &mut [Option<Outcome>],
    ) -> usize {
        let records: Vec<Value> = indexes
            .iter()
            .map(|&i| self.record(&leads[i], existing.get(&leads[i].external_key)))
            .collect();
        let results = match self.upsert(&records, false).await {
            Finished::Done(results) => results,
            other => {
                set_unanswered(outcomes, indexes.iter().copied(), other);
                return 0;
            }
        };
        let mut duplicates = Vec::new();
        for (n, (&i, result)) in indexes.iter().zip(&results).enumerate() {
            let lead = &leads[i];
            let outcome = match record_verdict(result) {
                RecordVerdict::Upserted { created } => {
                    if let Some(id) = &result.id {
                        self.remember_ids(std::iter::once((lead.external_key.clone(), id.clone())));
                    }
                    tracing::debug!(customer = %lead.external_key, id = result.id.as_deref().unwrap_or(""), created, "Lead upserted into Salesforce.");
                    Outcome::Delivered
                }
                RecordVerdict::Duplicate(text) if self.duplicates == DuplicatePolicy::AllowSave => {
                    tracing::info!(customer = %lead.log_key(), errors = %text, "Salesforce duplicate rule flagged the Lead; sending it again with allowSave=true.");
                    duplicates.push(n);
                    Outcome::Rejected { reason: text }
                }
                verdict => first_outcome(verdict),
            };
            outcomes[i] = Some(outcome);
        }
        if !duplicates.is_empty() {
            self.upsert_allowing_duplicates(&records, indexes, &duplicates, outcomes)
                .await;
        }
        results
            .iter()
            .filter(|r| r.success && r.created == Some(true))
            .count()
    }

    /// Sends the records at `duplicates` (positions in `indexes`) again with
    /// allowSave=true; duplicate rules whose action is "Alert" let them through.
    async fn upsert_allowing_duplicates(
        &self,
        records: &[Value],
        indexes: &[usize],
        duplicates: &[usize],
        outcomes: &mut [Option<Outcome>],
    ) {
        let again: Vec<Value> = duplicates.iter().map(|&n| records[n].clone()).collect();
        let results = match self.upsert(&again, true).await {
            Finished::Done(results) => results,
            other => {
                set_unanswered(outcomes, duplicates.iter().map(|&n| indexes[n]), other);
                return;
            }
        };
        for (&n, result) in duplicates.iter().zip(&results) {
            outcomes[indexes[n]] = Some(match record_verdict(result) {
                RecordVerdict::Upserted { .. } => Outcome::Delivered,
                RecordVerdict::Locked(text) | RecordVerdict::Converted(text) => {
                    Outcome::RetryLater {
                        after: None,
                        reason: format!("Salesforce could not update the Lead now: {text}"),
                    }
                }
                RecordVerdict::Duplicate(text) => Outcome::Rejected {
                    reason: format!(
                        "Salesforce duplicate rule blocks the Lead even with allowSave=true: {text}"
                    ),
                },
                RecordVerdict::Rejected(text) => Outcome::Rejected {
                    reason: format!("Salesforce refused the Lead: {text}"),
                },
            });
        }
    }
}

/// The outcome of a record's first upsert (a duplicate under `duplicates = "reject"`).
fn first_outcome(verdict: RecordVerdict) -> Outcome {
    match verdict {
        RecordVerdict::Upserted { .. } => Outcome::Delivered,
        RecordVerdict::Duplicate(text) => Outcome::Rejected {
            reason: format!(
                "Salesforce duplicate rule refused the Lead (sink.salesforce.duplicates = \"reject\"): {text}"
            ),
        },
        RecordVerdict::Locked(text) => Outcome::RetryLater {
            after: None,
            reason: format!("Salesforce record was locked: {text}"),
        },
        RecordVerdict::Converted(text) => Outcome::RetryLater {
            after: None,
            reason: format!("the Lead was converted while leadsync sent it; its follow-up Task comes next time: {text}"),
        },
        RecordVerdict::Rejected(text) => Outcome::Rejected {
            reason: format!("Salesforce refused the Lead: {text}"),
        },
    }
}

/// Every lead at `indexes` gets the outcome of an upsert that was not answered:
/// retry later (`GaveUp`) or the endpoint failed (`Failed`).
fn set_unanswered<T>(
    outcomes: &mut [Option<Outcome>],
    indexes: impl Iterator<Item = usize>,
    finished: Finished<T>,
) {
    let outcome = match finished {
        Finished::GaveUp { after, reason } => Outcome::RetryLater { after, reason },
        Finished::Failed { reason } => Outcome::EndpointFailed { reason },
        Finished::Done(_) => return,
    };
    for i in indexes {
        outcomes[i] = Some(outcome.clone());
    }
}
