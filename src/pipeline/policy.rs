//! What happens to marketplace test leads and do-not-contact leads (`policy.*`).

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestLeadPolicy {
    /// Record and log the test lead, do not deliver it.
    Skip,
    /// Deliver it like any other lead.
    Deliver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DoNotContactPolicy {
    /// Record it, do not deliver it.
    Skip,
    /// Deliver it with the do-not-contact flag set.
    Flag,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    #[serde(default = "default_test_lead_policy")]
    pub test_leads: TestLeadPolicy,
    #[serde(default = "default_dnc_policy")]
    pub do_not_contact: DoNotContactPolicy,
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            test_leads: default_test_lead_policy(),
            do_not_contact: default_dnc_policy(),
        }
    }
}

fn default_test_lead_policy() -> TestLeadPolicy {
    TestLeadPolicy::Skip
}
fn default_dnc_policy() -> DoNotContactPolicy {
    DoNotContactPolicy::Skip
}
