//! The Slack alert body: Block Kit `blocks` plus a `text` fallback, as an incoming
//! webhook takes it (docs.slack.dev/messaging/sending-messages-using-incoming-webhooks).
//! `text` is what notifications and clients without blocks show. Block Kit limits
//! (docs.slack.dev/reference/block-kit/blocks): a header's plain text at most 150
//! characters, a section at most 10 fields of at most 2,000 characters each and a
//! text of at most 3,000; mrkdwn text escapes `&`, `<` and `>`
//! (docs.slack.dev/messaging/formatting-message-text).

use serde_json::{json, Value};

use super::alert::Message;
use super::mapping::truncate;

/// `&`, `<` and `>` as Slack's mrkdwn wants them, so a customer's text cannot form a
/// link or a mention.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The request body for `message`.
pub fn payload(message: &Message) -> Value {
    let fields: Vec<Value> = message
        .facts
        .iter()
        .take(10)
        .map(|(label, value)| {
            json!({
                "type": "mrkdwn",
                "text": truncate(&format!("*{label}*\n{}", escape(value)), 2000).0,
            })
        })
        .collect();
    let text = match message.facts.iter().find(|(label, _)| *label == "Offer") {
        Some((_, offer)) => format!("{} on {offer}", message.title),
        None => message.title.clone(),
    };
    let mut payload = json!({
        "text": escape(&text),
        "blocks": [
            {
                "type": "header",
                "text": { "type": "plain_text", "text": truncate(&message.title, 150).0, "emoji": true }
            },
            { "type": "section", "fields": fields },
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": truncate(
                        &format!(
                            "*Next step*\n{}\n*Follow up by* {}",
                            escape(&message.next_step),
                            escape(&message.deadline)
                        ),
                        3000,
                    )
                    .0
                }
            },
            {
                "type": "context",
                "elements": [{ "type": "mrkdwn", "text": escape(&message.footer) }]
            }
        ]
    });
    if let (Some(link), Some(blocks)) = (&message.link, payload["blocks"].as_array_mut()) {
        // Before the footer: `<url|label>`, the URL escaped as mrkdwn wants.
        let open = json!({
            "type": "section",
            "text": { "type": "mrkdwn", "text": format!("<{}|Open in the CRM>", escape(link)) }
        });
        blocks.insert(blocks.len() - 1, open);
    }
    payload
}
