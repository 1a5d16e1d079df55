//! The follow-up summary: a customer record in sales' words, from a template.

use std::fmt::Write as _;

use crate::lead::{Action, Stage};
use crate::timestamp::{self};

use super::*;

pub(crate) fn stage_label(stage: Stage) -> &'static str {
    match stage {
        Stage::Unknown => "unknown",
        Stage::InitialInterest => "initial interest",
        Stage::Trial => "trial",
        Stage::Active => "active",
        Stage::DoNotContact => "do not contact",
    }
}

pub(crate) fn action_label(action: &str) -> &str {
    match Action::parse(action) {
        Action::Install => "Get it now (install)",
        Action::PartnerLedTrial => "Contact me",
        Action::DoNotContact => "Do not contact (asked a cross-listed partner)",
        Action::Create => "Azure portal purchase",
        Action::StartTestDrive => "Test drive started",
        Action::Unknown => "Unknown action",
        Action::Other(_) => action.trim(),
    }
}

/// The follow-up text. Placeholders: `{name}`, `{company}`, `{stage}`, `{offers}`,
/// `{history}`, `{next_step}`, `{first_seen}`, `{last_seen}`; any other text, braces
/// included, is copied as written. One pass over the template: a value is never
/// searched for placeholders (a customer named "{stage}" stays so).
pub fn summarise(lead: &CustomerLead, template: &str) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    // Braces are ASCII, so a byte search finds them on character boundaries; it is
    // cheaper than `str::find`'s searcher on the template's short pieces, 13 a summary.
    let find = |text: &str, brace: u8| text.bytes().position(|b| b == brace);
    while let Some(open) = find(rest, b'{') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        let placeholder = find(tail, b'}').map(|close| &tail[..=close]);
        if placeholder.is_some_and(|p| placeholder_value(lead, p, &mut out)) {
            rest = &tail[placeholder.map_or(0, str::len)..];
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Appends the value of `placeholder` (with its braces) to `out`; false if it is not one.
fn placeholder_value(lead: &CustomerLead, placeholder: &str, out: &mut String) -> bool {
    let c = &lead.customer;
    match placeholder {
        "{name}" => {
            let mut parts = [c.first_name.as_deref(), c.last_name.as_deref()]
                .into_iter()
                .flatten()
                .peekable();
            if parts.peek().is_none() {
                out.push_str("Unnamed customer");
            }
            for (i, part) in parts.enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                out.push_str(part);
            }
        }
        "{company}" => out.push_str(c.company.as_deref().unwrap_or("company unknown")),
        "{stage}" => out.push_str(stage_label(lead.stage)),
        "{offers}" => write_offers(lead, out),
        "{history}" => {
            for (i, h) in lead.history.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                out.push_str("- ");
                let start = out.len();
                timestamp::write(h.timestamp, out);
                out.truncate(start + 10); // the date
                out.push(' ');
                out.push_str(action_label(&h.action));
                if let Some(offer) = &h.offer {
                    out.push_str(" on ");
                    out.push_str(offer);
                }
                if let Some(source) = &h.source {
                    out.push_str(" via ");
                    out.push_str(source);
                }
            }
        }
        "{next_step}" => {
            let (before, after) = match lead.stage {
                _ if lead.do_not_contact => {
                    out.push_str("Do not contact: the customer asked a cross-listed partner to contact them instead.");
                    return true;
                }
                Stage::Active => (
                    "They deployed or bought ",
                    ": call within 24 hours to help them onboard.",
                ),
                Stage::Trial => (
                    "They are trying ",
                    ": check in on the trial within 24 hours.",
                ),
                Stage::InitialInterest => (
                    "They asked to be contacted about ",
                    ": reply within 24 hours.",
                ),
                Stage::Unknown | Stage::DoNotContact => {
                    out.push_str("Review and qualify this lead.");
                    return true;
                }
            };
            out.push_str(before);
            write_offers(lead, out);
            out.push_str(after);
        }
        "{first_seen}" => timestamp::write(lead.first_seen, out),
        "{last_seen}" => timestamp::write(lead.last_seen, out),
        _ => return false,
    }
    true
}

fn write_offers(lead: &CustomerLead, out: &mut String) {
    if lead.offers.is_empty() {
        out.push_str("an unknown offer");
    }
    for (i, o) in lead.offers.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        match &o.title {
            Some(t) => {
                let _ = write!(out, "{t} ({})", o.offer);
            }
            None => out.push_str(&o.offer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lead::normalise;
    use crate::source::row::RawRow;
    use serde_json::json;
    fn ev(rk: &str, ts: &str, ls: &str, c: serde_json::Value) -> LeadEvent {
        let mut columns = serde_json::Map::new();
        columns.insert("LeadSource".into(), json!(ls));
        columns.insert("CustomerInfo".into(), json!(c.to_string()));
        columns.insert("OfferTitle".into(), json!("Contoso Analytics"));
        let row = RawRow {
            id: RowId::new("p", rk),
            etag: format!("W/\"{rk}\""),
            timestamp: crate::timestamp::parse(ts).unwrap(),
            columns,
        };
        normalise(&row).unwrap()
    }
    fn four_events(first_name: &str) -> [LeadEvent; 4] {
        let c = json!({"FirstName": first_name, "LastName": "Lo", "Company": "Fab", "Email": "ana@fabrikam.com"});
        [
            ev(
                "1",
                "2024-05-01T10:00:00.1234567Z",
                "AppSource (SPZA)-PLT | contoso.analytics",
                c.clone(),
            ),
            ev(
                "2",
                "2024-05-01T11:00:00Z",
                "TestDrive-StartTestDrive | contoso.analytics",
                c.clone(),
            ),
            ev(
                "3",
                "2024-05-02T10:00:00Z",
                "AzureMarketplace-Zap | contoso.x",
                c.clone(),
            ),
            ev("4", "2024-05-03T10:00:00Z", "-PLT | contoso.backup", c),
        ]
    }

    fn summary(events: &[LeadEvent], template: &str) -> String {
        let key = customer_key(
            &events[0].customer,
            crate::identity::FallbackKey::NameCompanyPhone,
        )
        .unwrap();
        let settings = IdentitySettings {
            summary_template: template.into(),
            ..IdentitySettings::default()
        };
        let mut state = CustomerState::new(&key, &settings);
        state.apply(events, &settings);
        state.lead.summary
    }

    #[test]
    fn every_placeholder_is_filled_and_other_braces_are_kept() {
        let template = "{name}|{company}|{stage}|{offers}|{history}|{next_step}|{first_seen}|{last_seen}|{unknown}|{|}{";
        let offers = "Contoso Analytics (contoso.analytics), Contoso Analytics (contoso.backup), Contoso Analytics (contoso.x)";
        let expected = format!(
            "Ana Lo|Fab|trial|{offers}|\
- 2024-05-01 Contact me on contoso.analytics via AppSource (SPZA)\n\
- 2024-05-01 Test drive started on contoso.analytics via TestDrive\n\
- 2024-05-02 Zap on contoso.x via AzureMarketplace\n\
- 2024-05-03 Contact me on contoso.backup|\
They are trying {offers}: check in on the trial within 24 hours.|\
2024-05-01T10:00:00.1234567Z|2024-05-03T10:00:00.0000000Z|{{unknown}}|{{|}}{{"
        );
        assert_eq!(summary(&four_events("Ana"), template), expected);
    }

    #[test]
    fn a_value_that_looks_like_a_placeholder_is_not_expanded() {
        let text = summary(&four_events("{stage}"), "{name} / {stage}");
        assert_eq!(text, "{stage} Lo / trial");
    }
}
