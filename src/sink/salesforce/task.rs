//! A converted Lead is never updated: its new event becomes a follow-up Task on the
//! converted Contact and Opportunity (or Account), made once per event.

use std::collections::{HashMap, HashSet};

use reqwest::Method;
use serde_json::{json, Map, Value};

use super::api::{describe_errors, snippet};
use super::query::Existing;
use super::upsert::UpsertResult;
use super::SalesforceSink;
use crate::sink::http::Finished;
use crate::sink::mapping::{self, truncate};
use crate::sink::{CustomerLead, Outcome};

impl SalesforceSink {
    /// The follow-up Task for a converted Lead's new event: on the converted Contact
    /// (who) and Opportunity, else Account (what), assigned to the Lead's owner.
    pub(super) fn follow_up_task(&self, lead: &CustomerLead, e: &Existing) -> Value {
        let subject = mapping::follow_up_subject(lead, 255);
        let who = mapping::who(lead);
        let offers = lead
            .offers
            .iter()
            .map(|o| o.offer.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let next = if lead.do_not_contact {
            "Next step: the customer asked not to be contacted. Do not call or email them; set the opt-outs on the Contact."
        } else {
            "Next step: contact the customer about this request within one business day, on the Opportunity if there is one."
        };
        let description = format!(
            "{who} came back through the marketplace: {subject}; stage {stage}; offers: {offers}.\n\
             Their Lead {lead_id} was converted, so leadsync did not change it.\n{next}\n\n{summary}",
            stage = lead.stage.as_str(),
            offers = if offers.is_empty() { "none" } else { &offers },
            lead_id = e.id,
            summary = lead.summary,
        );
        let (description, _) = truncate(&description, 32_000);
        let mut task = Map::new();
        task.insert("attributes".into(), json!({ "type": "Task" }));
        task.insert("Subject".into(), Value::String(subject));
        task.insert("Description".into(), Value::String(description));
        task.insert("Status".into(), json!("Not Started"));
        task.insert("Priority".into(), json!("Normal"));
        task.insert(
            "ActivityDate".into(),
            Value::String(
                time::OffsetDateTime::now_utc()
                    .date()
                    .format(time::macros::format_description!("[year]-[month]-[day]"))
                    .unwrap_or_default(),
            ),
        );
        if let Some(contact) = &e.contact {
            task.insert("WhoId".into(), Value::String(contact.clone()));
        }
        if let Some(what) = e.opportunity.as_ref().or(e.account.as_ref()) {
            task.insert("WhatId".into(), Value::String(what.clone()));
        }
        // A Task's owner must be a user (005...), not a queue.
        if let Some(owner) = e.owner.as_ref().filter(|o| o.starts_with("005")) {
            task.insert("OwnerId".into(), Value::String(owner.clone()));
        }
        Value::Object(task)
    }

    /// Creates a follow-up Task for each converted Lead at `indexes`, once per event:
    /// a Task with the same subject on the same records (a replay) is not made again.
    pub(super) async fn follow_up(
        &self,
        leads: &[CustomerLead],
        indexes: &[usize],
        existing: &HashMap<String, Existing>,
        outcomes: &mut [Option<Outcome>],
    ) {
        let tasks: Vec<(usize, &Existing, Value)> = indexes
            .iter()
            .map(|&i| {
                let e = &existing[&leads[i].external_key];
                (i, e, self.follow_up_task(&leads[i], e))
            })
            .collect();
        let subjects: Vec<String> = tasks
            .iter()
            .map(|(_, _, t)| text(t, "Subject"))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let already = match self.existing_tasks(&subjects).await {
            Ok(already) => already,
            Err(outcome) => {
                for &i in indexes {
                    outcomes[i] = Some(outcome.clone());
                }
                return;
            }
        };
        let mut to_create = Vec::new();
        for (i, e, task) in &tasks {
            match already.get(&identity(task)) {
                Some(id) => {
                    outcomes[*i] = Some(Outcome::FollowedUp {
                        note: note(id, e, task),
                    })
                }
                None => to_create.push((*i, *e, task.clone())),
            }
        }
        if !to_create.is_empty() {
            self.create_tasks(leads, &to_create, outcomes).await;
        }
    }

    /// The Tasks that already have one of `subjects`, by identity, with their ids.
    async fn existing_tasks(
        &self,
        subjects: &[String],
    ) -> Result<HashMap<TaskIdentity, String>, Outcome> {
        match self
            .query_in("Id, Subject, WhoId, WhatId", "Task", "Subject", subjects)
            .await
        {
            Finished::Done(records) => Ok(records
                .into_iter()
                .map(|r| {
                    let r = Value::Object(r);
                    (identity(&r), text(&r, "Id"))
                })
                .collect()),
            Finished::GaveUp { after, reason } => Err(Outcome::RetryLater { after, reason }),
            Finished::Failed { reason } => Err(Outcome::EndpointFailed {
                reason: format!("Salesforce refused the query of follow-up Tasks: {reason}"),
            }),
        }
    }

    /// Creates the Tasks of `to_create` in one request and sets each lead's outcome.
    async fn create_tasks(
        &self,
        leads: &[CustomerLead],
        to_create: &[(usize, &Existing, Value)],
        outcomes: &mut [Option<Outcome>],
    ) {
        let tasks: Vec<Value> = to_create.iter().map(|(_, _, t)| t.clone()).collect();
        let results = match self.post_tasks(tasks).await {
            Ok(results) => results,
            Err(outcome) => {
                for (i, _, _) in to_create {
                    outcomes[*i] = Some(outcome.clone());
                }
                return;
            }
        };
        for ((i, e, task), result) in to_create.iter().zip(&results) {
            let customer = leads[*i].log_key();
            outcomes[*i] = Some(if result.success {
                let id = result.id.clone().unwrap_or_default();
                tracing::info!(customer = %customer, task = %id, lead = %e.id, "The Lead was converted; created a follow-up Task instead of updating it.");
                Outcome::FollowedUp {
                    note: note(&id, e, task),
                }
            } else {
                // Never a dead letter: the event waits, and the reason says what to fix
                // (a Task validation rule, an inactive owner).
                let errors = describe_errors(result.errors.iter().map(|e| {
                    (
                        e.status_code.as_str(),
                        e.message.as_str(),
                        e.fields.as_slice(),
                    )
                }));
                Outcome::RetryLater {
                    after: None,
                    reason: format!(
                        "the Lead is converted and Salesforce refused its follow-up Task: {errors}"
                    ),
                }
            });
        }
    }

    /// One sObject Collections create of `tasks`: a result per Task, in order, or the
    /// outcome every one of them gets.
    async fn post_tasks(&self, tasks: Vec<Value>) -> Result<Vec<UpsertResult>, Outcome> {
        let count = tasks.len();
        let body = json!({ "allOrNone": false, "records": tasks });
        let path = format!("/services/data/{}/composite/sobjects", self.api_version);
        match self.call(Method::POST, &path, Some(&body), false).await {
            Finished::Done(text) => match serde_json::from_str::<Vec<UpsertResult>>(&text) {
                Ok(results) if results.len() == count => Ok(results),
                Ok(results) => Err(Outcome::EndpointFailed {
                    reason: format!(
                        "Salesforce returned {} results for {count} Tasks",
                        results.len()
                    ),
                }),
                Err(e) => Err(Outcome::RetryLater {
                    after: None,
                    reason: format!(
                        "Salesforce Task answer is not a list of results ({e}): {}",
                        snippet(&text)
                    ),
                }),
            },
            Finished::GaveUp { after, reason } => Err(Outcome::RetryLater { after, reason }),
            Finished::Failed { reason } => Err(Outcome::EndpointFailed { reason }),
        }
    }
}

/// Subject, WhoId and WhatId: a Task with the same ones is the same event's Task.
type TaskIdentity = (String, String, String);

fn text(v: &Value, f: &str) -> String {
    v.get(f).and_then(Value::as_str).unwrap_or("").to_owned()
}

fn identity(v: &Value) -> TaskIdentity {
    (text(v, "Subject"), text(v, "WhoId"), text(v, "WhatId"))
}

/// What the outcome says about a follow-up Task: the records it is on, its owner.
fn note(task_id: &str, e: &Existing, task: &Value) -> String {
    let mut on = Vec::new();
    if let Some(c) = &e.contact {
        on.push(format!("Contact {c}"));
    }
    if let Some(o) = &e.opportunity {
        on.push(format!("Opportunity {o}"));
    } else if let Some(a) = &e.account {
        on.push(format!("Account {a}"));
    }
    let owner = text(task, "OwnerId");
    format!(
        "Task {task_id} on {} for converted Lead {}{}",
        if on.is_empty() {
            "no record".to_owned()
        } else {
            on.join(" and ")
        },
        e.id,
        if owner.is_empty() {
            String::new()
        } else {
            format!(", assigned to {owner}")
        }
    )
}
