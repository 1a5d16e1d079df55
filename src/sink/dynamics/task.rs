//! A qualified or disqualified lead is never updated: its new event becomes a
//! follow-up task, under an id derived from the event so that a replay finds it.

use serde_json::{Map, Value};

use super::{DynamicsSink, LEAD_OPEN, TASK_SUBJECT_MAX};
use crate::sink::mapping;
use crate::sink::CustomerLead;

impl DynamicsSink {
    /// The follow-up task for a qualified or disqualified lead: regarding the
    /// opportunity it was qualified into, else its contact, account, or the lead
    /// itself; owned by the lead's owner; its id derived from the customer's newest
    /// event, so a replay finds it instead of making another.
    pub(super) fn follow_up_task(
        &self,
        lead: &CustomerLead,
        record: &Map<String, Value>,
    ) -> (String, Map<String, Value>, String) {
        let text = |c: &str| column_text(record, c);
        let state = record
            .get("statecode")
            .and_then(Value::as_i64)
            .unwrap_or(LEAD_OPEN);
        let state_name = if state == 1 {
            "qualified"
        } else {
            "disqualified"
        };
        let lead_id = text("leadid").unwrap_or_default();
        let regarding = Regarding::of(record, &lead_id);
        let event = format!(
            "{}|{}",
            lead.external_key,
            crate::timestamp::format(lead.last_seen)
        );
        let id = task_id(&event);
        let subject = mapping::follow_up_subject(lead, TASK_SUBJECT_MAX);
        let who = mapping::who(lead);
        let next = if lead.do_not_contact {
            "Next step: the customer asked not to be contacted. Do not call or email them; set Do not allow Emails/Phone Calls on the contact."
        } else if state == 1 {
            "Next step: contact the customer about this request within one business day, on the opportunity."
        } else {
            "Next step: the lead was disqualified; decide whether this new interest reopens it."
        };
        let description = format!(
            "{who} came back through the marketplace: {}; stage {}.\nTheir lead {lead_id} is {state_name}, so leadsync did not change it.\n{next}\n\n{}",
            mapping::subject(lead),
            lead.stage.as_str(),
            lead.summary
        );
        let (description, _) = mapping::truncate(&description, 2000);
        let mut task = Map::new();
        task.insert("subject".into(), Value::String(subject));
        task.insert("description".into(), Value::String(description));
        task.insert(
            "scheduledend".into(),
            Value::String(crate::timestamp::format(
                time::OffsetDateTime::now_utc() + time::Duration::days(1),
            )),
        );
        task.insert(
            format!("{}@odata.bind", regarding.nav),
            Value::String(format!("/{}({})", regarding.set, regarding.id)),
        );
        let mut owner_note = String::new();
        if let Some(owner) = text("_ownerid_value") {
            let kind = text("_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname")
                .unwrap_or_else(|| "systemuser".into());
            let set = if kind == "team" {
                "teams"
            } else {
                "systemusers"
            };
            task.insert(
                "ownerid@odata.bind".into(),
                Value::String(format!("/{set}({owner})")),
            );
            owner_note = format!(", owned by {kind} {owner}");
        }
        let note = format!(
            "task {id} regarding {} {} for {state_name} lead {lead_id}{owner_note}",
            regarding.what, regarding.id
        );
        (id, task, note)
    }
}

/// What a follow-up task is regarding: the opportunity the lead was qualified
/// into, else its contact, its account, or the lead itself.
struct Regarding {
    /// The entity set (`opportunities`).
    set: &'static str,
    /// The task's navigation property to it (`regardingobjectid_opportunity_task`).
    nav: &'static str,
    id: String,
    /// What the note calls it (`opportunity`).
    what: &'static str,
}

impl Regarding {
    fn of(record: &Map<String, Value>, lead_id: &str) -> Self {
        let (set, nav, id, what) =
            if let Some(id) = column_text(record, "_qualifyingopportunityid_value") {
                (
                    "opportunities",
                    "regardingobjectid_opportunity_task",
                    id,
                    "opportunity",
                )
            } else if let Some(id) = column_text(record, "_parentcontactid_value") {
                ("contacts", "regardingobjectid_contact_task", id, "contact")
            } else if let Some(id) = column_text(record, "_parentaccountid_value") {
                ("accounts", "regardingobjectid_account_task", id, "account")
            } else {
                (
                    "leads",
                    "regardingobjectid_lead_task",
                    lead_id.to_owned(),
                    "lead",
                )
            };
        Regarding { set, nav, id, what }
    }
}

/// A column of the lead record as text, where it holds a non-empty string.
fn column_text(record: &Map<String, Value>, column: &str) -> Option<String> {
    record
        .get(column)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A task id derived from the event: the same event always names the same task.
pub(super) fn task_id(event: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("leadsync-follow-up:{event}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    // RFC 4122 layout: version 5 (name-based, SHA), variant 10.
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
