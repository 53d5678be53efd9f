//! `billsync stripe setup`: the account's webhook endpoint for billsync, kept as code. The
//! endpoint at a URL sends exactly the event types billsync handles, generated with the API
//! version billsync pins, and is enabled; `check` reports where it is not.
//!
//! Stripe takes an endpoint's API version at creation only, so a version that differs cannot
//! be fixed in place: setup refuses and says what to do, rather than recreate the endpoint
//! (which would change its signing secret under a running deployment).

use std::collections::BTreeSet;

use serde::Serialize;

use crate::{
    config::Secret,
    stripe::{StripeClient, StripeError, WebhookEndpoint},
    webhooks::ingest::HANDLED_TYPES,
};

/// How an endpoint differs from what billsync needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// Handled types it does not send.
    pub missing_events: Vec<String>,
    /// Types it sends that billsync does not handle (`*` among them: every type).
    pub extra_events: Vec<String>,
    /// Its API version when that is not billsync's (`"account default"` when it has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// It is disabled: Stripe sends it nothing.
    pub disabled: bool,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// One line an operator reads: what differs.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.missing_events.is_empty() {
            parts.push(format!("missing events {}", self.missing_events.join(", ")));
        }
        if !self.extra_events.is_empty() {
            parts.push(format!("extra events {}", self.extra_events.join(", ")));
        }
        if let Some(version) = &self.api_version {
            parts.push(format!("API version {version}"));
        }
        if self.disabled {
            parts.push("disabled".to_owned());
        }
        parts.join("; ")
    }
}

/// How `endpoint` differs from sending `HANDLED_TYPES` as `api_version`, enabled.
pub fn drift(endpoint: &WebhookEndpoint, api_version: &str) -> Drift {
    let wanted: BTreeSet<&str> = HANDLED_TYPES.iter().copied().collect();
    let sent: BTreeSet<&str> = endpoint.enabled_events.iter().map(String::as_str).collect();
    // `*` sends every type, the handled ones included: none is missing, and `*` is extra.
    let missing_events = if sent.contains("*") {
        Vec::new()
    } else {
        wanted.difference(&sent).map(|s| (*s).to_owned()).collect()
    };
    Drift {
        missing_events,
        extra_events: sent.difference(&wanted).map(|s| (*s).to_owned()).collect(),
        api_version: match endpoint.api_version.as_deref() {
            Some(version) if version == api_version => None,
            Some(other) => Some(other.to_owned()),
            None => Some("account default".to_owned()),
        },
        disabled: endpoint.status != "enabled",
    }
}

/// What setup did.
#[derive(Debug)]
pub enum Outcome {
    /// A new endpoint, with its signing secret (Stripe shows it this once).
    Created { id: String, secret: Option<Secret> },
    /// The endpoint existed and was made right; `fixed` is what differed.
    Updated { id: String, fixed: Drift },
    /// The endpoint existed and was right already.
    InSync { id: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("not an http(s) URL: {0:?}")]
    BadUrl(String),
    #[error(transparent)]
    Stripe(#[from] StripeError),
    #[error(
        "webhook endpoint {id} sends events as API version {have}, not {want}, and Stripe \
         cannot change an endpoint's version: create a new endpoint for billsync (delete this \
         one, then run setup again; the new one has a new signing secret)"
    )]
    ApiVersion {
        id: String,
        have: String,
        want: String,
    },
    #[error("{} webhook endpoints have this URL ({}): delete all but one", .0.len(), .0.join(", "))]
    SeveralEndpoints(Vec<String>),
}

/// The endpoint whose URL is `url`, if any.
pub async fn find(stripe: &StripeClient, url: &str) -> Result<Option<WebhookEndpoint>, SetupError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| SetupError::BadUrl(url.to_owned()))?;
    if !matches!(parsed.scheme(), "https" | "http") || parsed.host_str().is_none() {
        return Err(SetupError::BadUrl(url.to_owned()));
    }
    let mut found: Vec<WebhookEndpoint> = stripe
        .list_webhook_endpoints()
        .await?
        .into_iter()
        // As URLs, not as text: scheme and host are case-insensitive, a default port is no
        // port; the path stays exact (it is case-sensitive to the app that receives).
        .filter(|e| reqwest::Url::parse(&e.url).is_ok_and(|theirs| theirs == parsed))
        .collect();
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => Err(SetupError::SeveralEndpoints(
            found.into_iter().map(|e| e.id).collect(),
        )),
    }
}

/// Creates the endpoint for `url`, or finds it and makes it send exactly the handled types,
/// enabled. An endpoint on another API version is refused (see the module's documentation).
pub async fn setup(
    stripe: &StripeClient,
    url: &str,
    api_version: &str,
) -> Result<Outcome, SetupError> {
    let Some(endpoint) = find(stripe, url).await? else {
        let created = stripe
            .create_webhook_endpoint(url, &HANDLED_TYPES, api_version, "billsync")
            .await?;
        return Ok(Outcome::Created {
            id: created.id,
            secret: created.secret,
        });
    };
    let differs = drift(&endpoint, api_version);
    if let Some(have) = differs.api_version.clone() {
        return Err(SetupError::ApiVersion {
            id: endpoint.id,
            have,
            want: api_version.to_owned(),
        });
    }
    if differs.is_empty() {
        return Ok(Outcome::InSync { id: endpoint.id });
    }
    let updated = stripe
        .update_webhook_endpoint(&endpoint.id, &HANDLED_TYPES)
        .await?;
    Ok(Outcome::Updated {
        id: updated.id,
        fixed: differs,
    })
}

/// The endpoint for `url` and how it differs, changing nothing; `None` when there is none.
pub async fn check(
    stripe: &StripeClient,
    url: &str,
    api_version: &str,
) -> Result<Option<(String, Drift)>, SetupError> {
    Ok(find(stripe, url)
        .await?
        .map(|endpoint| (endpoint.id.clone(), drift(&endpoint, api_version))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(events: &[&str], version: Option<&str>, status: &str) -> WebhookEndpoint {
        WebhookEndpoint {
            id: "we_1".into(),
            url: "https://app.example.com/hooks".into(),
            enabled_events: events.iter().map(|e| (*e).to_owned()).collect(),
            api_version: version.map(str::to_owned),
            status: status.into(),
            secret: None,
        }
    }

    const PINNED: &str = "2025-08-27.basil";

    #[test]
    fn drift_names_each_difference() {
        let right = endpoint(&HANDLED_TYPES, Some(PINNED), "enabled");
        assert!(drift(&right, PINNED).is_empty());

        let cases: [(WebhookEndpoint, Drift); 5] = [
            (
                endpoint(&HANDLED_TYPES[1..], Some(PINNED), "enabled"),
                Drift {
                    missing_events: vec!["customer.created".into()],
                    ..Drift::default()
                },
            ),
            (
                endpoint(
                    &[&HANDLED_TYPES[..], &["invoice.paid"]].concat(),
                    Some(PINNED),
                    "enabled",
                ),
                Drift {
                    extra_events: vec!["invoice.paid".into()],
                    ..Drift::default()
                },
            ),
            (
                endpoint(&["*"], Some(PINNED), "enabled"),
                Drift {
                    extra_events: vec!["*".into()],
                    ..Drift::default()
                },
            ),
            (
                endpoint(&HANDLED_TYPES, None, "disabled"),
                Drift {
                    api_version: Some("account default".into()),
                    disabled: true,
                    ..Drift::default()
                },
            ),
            (
                endpoint(&HANDLED_TYPES, Some("2024-06-20"), "enabled"),
                Drift {
                    api_version: Some("2024-06-20".into()),
                    ..Drift::default()
                },
            ),
        ];
        for (endpoint, expected) in cases {
            assert_eq!(drift(&endpoint, PINNED), expected, "{endpoint:?}");
        }
    }

    #[test]
    fn the_summary_is_one_line_naming_the_differences() {
        let differs = Drift {
            missing_events: vec!["customer.created".into()],
            extra_events: vec!["*".into()],
            api_version: Some("2024-06-20".into()),
            disabled: true,
        };
        assert_eq!(
            differs.summary(),
            "missing events customer.created; extra events *; API version 2024-06-20; disabled"
        );
    }
}
