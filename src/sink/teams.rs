//! The Microsoft Teams alert body: a message with one Adaptive Card, as a Workflows
//! "When a Teams webhook request is received" trigger (the template "Send webhook
//! alerts to a channel") takes it and posts the card to a channel. Microsoft's
//! "Create and send messages" (microsoftteams/platform/webhooks-and-connectors/how-to/
//! connectors-using): Workflows take Adaptive Cards only, in the envelope
//! `{"type":"message","attachments":[{"contentType":"application/vnd.microsoft.card.adaptive","content":{...}}]}`;
//! the trigger answers 202 Accepted with an empty body. Version 1.4 is the newest
//! Teams renders everywhere (desktop, web, mobile).

use serde_json::{json, Value};

use super::alert::Message;

/// The content type of an Adaptive Card attachment.
pub const ADAPTIVE_CARD: &str = "application/vnd.microsoft.card.adaptive";
/// The Adaptive Card schema version sent.
pub const CARD_VERSION: &str = "1.4";

/// The request body for `message`.
pub fn payload(message: &Message) -> Value {
    let mut payload = card(message);
    if let Some(link) = &message.link {
        payload["attachments"][0]["content"]["actions"] =
            json!([{ "type": "Action.OpenUrl", "title": "Open in the CRM", "url": link }]);
    }
    payload
}

fn card(message: &Message) -> Value {
    let facts: Vec<Value> = message
        .facts
        .iter()
        .map(|(title, value)| json!({ "title": title, "value": value }))
        .collect();
    json!({
        "type": "message",
        "attachments": [{
            "contentType": ADAPTIVE_CARD,
            "contentUrl": null,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": CARD_VERSION,
                "msteams": { "width": "Full" },
                "body": [
                    {
                        "type": "TextBlock",
                        "text": message.title,
                        "size": "Medium",
                        "weight": "Bolder",
                        "wrap": true,
                        "style": "heading"
                    },
                    { "type": "FactSet", "facts": facts },
                    {
                        "type": "TextBlock",
                        "text": format!(
                            "**Next step:** {}\n\n**Follow up by:** {}",
                            message.next_step, message.deadline
                        ),
                        "wrap": true
                    },
                    {
                        "type": "TextBlock",
                        "text": message.footer,
                        "isSubtle": true,
                        "size": "Small",
                        "wrap": true
                    }
                ]
            }
        }]
    })
}
