//! Drift reconciliation: every Stripe customer (paged, under a request-rate limit) against
//! every user and link, each classified; `apply` fixes only what is safe — it links a
//! customer to the unlinked user its metadata names, unlinks a link whose customer Stripe no
//! longer has, and queues a push for a profile that drifted. It never deletes a customer.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use serde::Serialize;
use tokio::time::Instant;

use crate::{
    domain::{full_name, LinkSource, StripeCustomerId, UnlinkReason, UserId},
    store::{LinkOutcome, Store, StoreError, SubscriptionMirror, User},
    stripe::{Customer, StripeClient, StripeError, Subscription},
};

const PAGE: u32 = 100;
const DB_PAGE: u32 = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Stripe(#[from] StripeError),
    /// The run's lease ran out (it could not renew it in time) and it was marked interrupted.
    #[error("the run's lease ran out and it was marked interrupted")]
    Interrupted,
}

impl ReconcileError {
    /// Why a run failed, for whoever asks for it (no internals).
    pub fn public_reason(&self) -> &'static str {
        match self {
            Self::Stripe(e) if e.is_unavailable() => {
                "Stripe was unavailable; start the run again later"
            }
            Self::Stripe(_) => "Stripe refused a request",
            Self::Store(_) => "the database was unavailable; start the run again later",
            Self::Interrupted => "the run could not renew its lease and was interrupted",
        }
    }
}

/// Spaces request starts `1/rps` apart (a request's own latency overlaps the wait).
pub struct RateLimiter {
    period: Duration,
    next: tokio::sync::Mutex<Instant>,
}

impl RateLimiter {
    pub fn per_second(rps: u32) -> Self {
        Self {
            period: Duration::from_secs(1) / rps.max(1),
            next: tokio::sync::Mutex::new(Instant::now()),
        }
    }

    pub async fn acquire(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + self.period;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Linked, and the profiles agree.
    Ok,
    /// The customer's `metadata.userId` is an existing user with no link.
    UnlinkedMatch,
    /// The customer's `metadata.userId` names no user.
    Orphan,
    /// Another customer of a user who is linked (the linked one is canonical).
    Duplicate,
    /// A link to a customer Stripe no longer has.
    DanglingLink,
    /// Linked, but email, name or phone differ.
    Drift,
    /// Not created by billsync (no `metadata.userId`) and not linked: left alone.
    Unmanaged,
    /// Kept after an erasure (`metadata.userId = erased:…`): left alone.
    Erased,
    /// A subscription of a linked customer, mirrored as Stripe has it.
    SubscriptionOk,
    /// A subscription of a linked customer that the mirror lacks.
    SubscriptionMissing,
    /// A subscription the mirror holds otherwise than Stripe (`fields` says where).
    SubscriptionDrift,
    /// A subscription whose customer is linked to no user: left alone.
    SubscriptionOrphan,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub category: Category,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// For `drift`: which fields differ (never their values: the report is a file).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<&'static str>,
    /// For the `subscription_*` categories: the subscription.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
    /// For `duplicate`: the linked customer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canonical_customer_id: Option<String>,
    /// What `--apply` did: `linked`, `unlinked`, `push_queued`, or why it did nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// For `unlinked_match`: the customer's mode, for the link `--apply` makes.
    #[serde(skip)]
    pub livemode: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Tally {
    pub found: u64,
    pub fixed: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    /// `stripe`, `checking_links`, `applying`, `subscriptions`, `done`.
    pub phase: &'static str,
    /// Pages of customers.
    pub stripe_pages: u64,
    pub stripe_customers: u64,
    pub subscription_pages: u64,
    pub stripe_subscriptions: u64,
    pub users: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub apply: bool,
    pub started_at: String,
    pub finished_at: String,
    pub stripe_pages: u64,
    pub stripe_customers: u64,
    pub subscription_pages: u64,
    pub stripe_subscriptions: u64,
    /// Requests the process sent to Stripe while the run went, retries included: the run's
    /// own from the CLI; a server's other work (pushes, the applier) counts too.
    pub stripe_requests: u64,
    pub users: u64,
    pub links: u64,
    pub summary: BTreeMap<Category, Tally>,
    /// Every finding that is not `ok` (those are only counted), by category.
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn count(&self, category: Category) -> u64 {
        self.summary.get(&category).map_or(0, |t| t.found)
    }

    /// A fixed-width table of the summary, for a terminal.
    pub fn table(&self) -> String {
        let mut out = format!("{:<22} {:>8} {:>8}\n", "category", "found", "fixed");
        for (category, tally) in &self.summary {
            let name = serde_json::to_value(category)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let fixed = if self.apply {
                tally.fixed.to_string()
            } else {
                "-".into()
            };
            out.push_str(&format!("{name:<22} {:>8} {fixed:>8}\n", tally.found));
        }
        out.push_str(&format!(
            "{} Stripe customers in {} pages, {} subscriptions in {}; {} users, {} links\n",
            self.stripe_customers,
            self.stripe_pages,
            self.stripe_subscriptions,
            self.subscription_pages,
            self.users,
            self.links
        ));
        out
    }
}

/// What the report needs of a customer (the rest of Stripe's object is dropped at once).
struct Snapshot {
    email: Option<String>,
    name: Option<String>,
    phone: Option<String>,
    user_id: Option<String>,
    livemode: bool,
    created: i64,
}

impl From<Customer> for Snapshot {
    fn from(c: Customer) -> Self {
        Self {
            user_id: c.user_id_metadata().map(str::to_owned),
            email: c.email,
            name: c.name,
            phone: c.phone,
            livemode: c.livemode,
            created: c.created,
        }
    }
}

fn blank_to_none(value: Option<&str>) -> Option<String> {
    value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// The profile fields on which the user and the customer disagree.
fn drifted(user: &User, customer: &Snapshot) -> Vec<&'static str> {
    let mut fields = Vec::new();
    let stripe_email = customer.email.as_deref().unwrap_or("").trim();
    if !stripe_email.eq_ignore_ascii_case(user.email.as_str()) {
        fields.push("email");
    }
    if blank_to_none(customer.name.as_deref())
        != full_name(user.first_name.as_ref(), user.last_name.as_ref())
    {
        fields.push("name");
    }
    if blank_to_none(customer.phone.as_deref()) != user.phone.as_ref().map(|p| p.to_string()) {
        fields.push("phone");
    }
    fields
}

/// A linked customer's finding: `ok`, or `drift` with the fields its user differs in (no
/// user row to compare: `ok`).
fn linked_finding(
    user_id: &str,
    customer_id: &str,
    user: Option<&User>,
    customer: &Snapshot,
) -> Finding {
    let mut f = finding(Category::Ok, Some(user_id), Some(customer_id));
    if let Some(user) = user {
        f.fields = drifted(user, customer);
        if !f.fields.is_empty() {
            f.category = Category::Drift;
        }
    }
    f
}

fn finding(category: Category, user: Option<&str>, customer: Option<&str>) -> Finding {
    Finding {
        category,
        user_id: user.map(str::to_owned),
        customer_id: customer.map(str::to_owned),
        fields: Vec::new(),
        canonical_customer_id: None,
        subscription_id: None,
        action: None,
        livemode: false,
    }
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Runs one reconciliation; `observe` hears the progress (a progress bar, or an admin run).
/// Memory is bounded by a page, not by the account: each page of Stripe's list is classified
/// against the links and users it names (looked up for that page), the linked customers it
/// met are noted in the database as `run_id`'s, and only findings that are not `ok` are kept.
#[tracing::instrument(skip_all, fields(apply))]
pub async fn run(
    store: &dyn Store,
    stripe: &StripeClient,
    limiter: &RateLimiter,
    apply: bool,
    run_id: &str,
    observe: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Report, ReconcileError> {
    // What earlier runs met is scratch; this run's own notes stay until the next run starts,
    // so that deleting them (a row per linked customer) is not part of this one.
    store.forget_seen(run_id).await?;
    let started_at = time::OffsetDateTime::now_utc();
    let sent_before = stripe.attempts_sent();
    let mut progress = Progress {
        phase: "stripe",
        ..Progress::default()
    };
    observe(&progress);
    let (users, links) = store.user_and_link_counts().await?;
    progress.users = users;

    let mut tally = Tallies::default();
    let mut findings: Vec<Finding> = Vec::new();
    // Customers naming an existing user who has no link, by user: the oldest becomes the
    // match and the others its duplicates, once every page is read.
    let mut candidates: HashMap<String, Vec<Candidate>> = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        limiter.acquire().await;
        let page = stripe.list_customers(None, PAGE, cursor.as_deref()).await?;
        progress.stripe_pages += 1;
        let more = page.has_more && !page.data.is_empty();
        cursor = page.data.last().map(|c| c.id.clone());
        // Deleted customers are not listed; a stand-in that lists them is not followed.
        let customers: Vec<(String, Snapshot)> = page
            .data
            .into_iter()
            .filter(|c| !c.deleted)
            .map(|c| (c.id.clone(), Snapshot::from(c)))
            .collect();
        progress.stripe_customers += customers.len() as u64;
        classify_page(
            store,
            run_id,
            customers,
            &mut tally,
            &mut findings,
            &mut candidates,
        )
        .await?;
        observe(&progress);
        if !more {
            break;
        }
    }
    for (user_id, mut found) in candidates {
        found.sort_by(|a, b| (a.created, &a.customer_id).cmp(&(b.created, &b.customer_id)));
        let canonical = found[0].customer_id.clone();
        for (n, candidate) in found.into_iter().enumerate() {
            let category = if n == 0 {
                Category::UnlinkedMatch
            } else {
                Category::Duplicate
            };
            let mut f = finding(category, Some(&user_id), Some(&candidate.customer_id));
            f.livemode = candidate.livemode;
            if n > 0 {
                f.canonical_customer_id = Some(canonical.clone());
            }
            tally.record(&mut findings, f);
        }
    }

    // Links to customers Stripe did not list: confirm each one before calling it dangling (it
    // may have been created after its page was read).
    progress.phase = "checking_links";
    observe(&progress);
    let mut after: Option<UserId> = None;
    loop {
        let unmet = store
            .links_not_seen(run_id, after.as_ref(), DB_PAGE)
            .await?;
        let full = unmet.len() == DB_PAGE as usize;
        after = unmet.last().map(|l| l.user_id.clone());
        for link in unmet {
            let (user_id, customer_id) = (link.user_id.to_string(), link.customer_id.to_string());
            limiter.acquire().await;
            let f = match stripe.retrieve_customer(&customer_id).await {
                Ok(customer) if !customer.deleted => {
                    let user = store.get_user(&link.user_id).await?;
                    linked_finding(&user_id, &customer_id, user.as_ref(), &customer.into())
                }
                Ok(_) => finding(Category::DanglingLink, Some(&user_id), Some(&customer_id)),
                Err(err) if err.is_not_found() => {
                    finding(Category::DanglingLink, Some(&user_id), Some(&customer_id))
                }
                Err(err) => return Err(err.into()),
            };
            tally.record(&mut findings, f);
        }
        if !full {
            break;
        }
    }

    if apply {
        progress.phase = "applying";
        observe(&progress);
        for f in &mut findings {
            f.action = fix(store, f).await?;
            if matches!(
                f.action.as_deref(),
                Some("linked" | "unlinked" | "push_queued")
            ) {
                tally.fixed(f.category);
            }
        }
    }
    // After the customers' fixes, so that a customer linked by this run has its
    // subscriptions mirrored by it too.
    reconcile_subscriptions(
        store,
        stripe,
        limiter,
        apply,
        &mut progress,
        observe,
        &mut tally,
        &mut findings,
    )
    .await?;
    findings.sort_by(|a, b| {
        (a.category, &a.customer_id, &a.user_id).cmp(&(b.category, &b.customer_id, &b.user_id))
    });
    progress.phase = "done";
    observe(&progress);
    Ok(Report {
        apply,
        started_at: rfc3339(started_at),
        finished_at: rfc3339(time::OffsetDateTime::now_utc()),
        stripe_pages: progress.stripe_pages,
        stripe_customers: progress.stripe_customers,
        subscription_pages: progress.subscription_pages,
        stripe_subscriptions: progress.stripe_subscriptions,
        stripe_requests: stripe.attempts_sent() - sent_before,
        users,
        links,
        summary: tally.0,
        findings,
    })
}

/// How long before a page of subscriptions was asked for its snapshots count as taken: the
/// watermark a backfill writes them under. A snapshot a webhook applied later than that (an
/// event Stripe created since) is never overwritten; the margin covers clock skew between
/// billsync and Stripe, and a snapshot it leaves alone is fixed by the next run.
const BACKFILL_MARGIN_SECS: i64 = 60;
/// The event id a backfilled snapshot's watermark carries.
const BACKFILL_EVENT_ID: &str = "reconcile";

/// Every subscription of the account (`status=all`, paged, under the rate limit) against the
/// mirror; with `apply`, a missing or drifted one of a linked customer is mirrored under the
/// webhooks' watermark rule, announcing what a webhook would.
#[allow(clippy::too_many_arguments)]
async fn reconcile_subscriptions(
    store: &dyn Store,
    stripe: &StripeClient,
    limiter: &RateLimiter,
    apply: bool,
    progress: &mut Progress,
    observe: &(dyn Fn(&Progress) + Send + Sync),
    tally: &mut Tallies,
    findings: &mut Vec<Finding>,
) -> Result<(), ReconcileError> {
    progress.phase = "subscriptions";
    observe(progress);
    let mut cursor: Option<String> = None;
    loop {
        limiter.acquire().await;
        let taken = time::OffsetDateTime::now_utc().unix_timestamp() - BACKFILL_MARGIN_SECS;
        let page = stripe
            .list_subscriptions_page(PAGE, cursor.as_deref())
            .await?;
        progress.subscription_pages += 1;
        let more = page.has_more && !page.data.is_empty();
        cursor = page.data.last().map(|s| s.id.clone());
        progress.stripe_subscriptions += page.data.len() as u64;
        classify_subscriptions(store, apply, taken, page.data, tally, findings).await?;
        observe(progress);
        if !more {
            return Ok(());
        }
    }
}

async fn classify_subscriptions(
    store: &dyn Store,
    apply: bool,
    taken: i64,
    subscriptions: Vec<Subscription>,
    tally: &mut Tallies,
    findings: &mut Vec<Finding>,
) -> Result<(), ReconcileError> {
    if subscriptions.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = subscriptions.iter().map(|s| s.id.clone()).collect();
    let customers: Vec<String> = subscriptions.iter().map(|s| s.customer.clone()).collect();
    let owners: HashMap<String, UserId> = store
        .links_of(&customers, &[])
        .await?
        .into_iter()
        .map(|l| (l.customer_id.to_string(), l.user_id))
        .collect();
    let mirrored: HashMap<String, SubscriptionMirror> = store
        .subscriptions_by_ids(&ids)
        .await?
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect();
    for subscription in subscriptions {
        let customer = subscription.customer.clone();
        let Some(owner) = owners.get(&customer) else {
            let mut f = finding(Category::SubscriptionOrphan, None, Some(&customer));
            f.subscription_id = Some(subscription.id);
            tally.record(findings, f);
            continue;
        };
        let wanted = subscription.into_mirror(Some(owner.clone()));
        let (category, fields) = match mirrored.get(&wanted.id) {
            None => (Category::SubscriptionMissing, Vec::new()),
            Some(have) => match subscription_drift(have, &wanted) {
                fields if fields.is_empty() => (Category::SubscriptionOk, fields),
                fields => (Category::SubscriptionDrift, fields),
            },
        };
        tally.count(category);
        if category == Category::SubscriptionOk {
            continue;
        }
        let mut f = finding(category, Some(owner.as_str()), Some(&customer));
        f.subscription_id = Some(wanted.id.clone());
        f.fields = fields;
        if apply {
            let written = store
                .upsert_subscription_if_newer(&wanted, taken, BACKFILL_EVENT_ID)
                .await?;
            f.action = Some(if written {
                tally.fixed(category);
                "mirrored".to_owned()
            } else {
                "skipped: a newer snapshot from a webhook is mirrored".to_owned()
            });
        }
        findings.push(f);
    }
    Ok(())
}

/// The fields on which the mirror and Stripe's subscription disagree.
fn subscription_drift(have: &SubscriptionMirror, want: &SubscriptionMirror) -> Vec<&'static str> {
    let checks = [
        ("user_id", have.user_id == want.user_id),
        ("status", have.status == want.status),
        ("price_id", have.price_id == want.price_id),
        (
            "cancel_at_period_end",
            have.cancel_at_period_end == want.cancel_at_period_end,
        ),
        (
            "current_period_end",
            have.current_period_end == want.current_period_end,
        ),
        ("cancel_at", have.cancel_at == want.cancel_at),
        ("canceled_at", have.canceled_at == want.canceled_at),
        ("ended_at", have.ended_at == want.ended_at),
        ("items", have.items == want.items),
    ];
    checks
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(field, _)| field)
        .collect()
}

/// How many of each category were found, and fixed.
#[derive(Default)]
struct Tallies(BTreeMap<Category, Tally>);

impl Tallies {
    fn count(&mut self, category: Category) {
        self.0.entry(category).or_default().found += 1;
    }

    /// Counts the finding, and keeps it for the report unless all is well.
    fn record(&mut self, findings: &mut Vec<Finding>, f: Finding) {
        self.count(f.category);
        if !matches!(f.category, Category::Ok | Category::SubscriptionOk) {
            findings.push(f);
        }
    }

    fn fixed(&mut self, category: Category) {
        self.0.entry(category).or_default().fixed += 1;
    }
}

/// A customer naming an existing user who has no link.
struct Candidate {
    customer_id: String,
    created: i64,
    livemode: bool,
}

/// Classifies one page of Stripe's list against the links and users it names.
async fn classify_page(
    store: &dyn Store,
    run_id: &str,
    customers: Vec<(String, Snapshot)>,
    tally: &mut Tallies,
    findings: &mut Vec<Finding>,
    candidates: &mut HashMap<String, Vec<Candidate>>,
) -> Result<(), ReconcileError> {
    if customers.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = customers.iter().map(|(id, _)| id.clone()).collect();
    let named: Vec<String> = customers
        .iter()
        .filter_map(|(_, c)| c.user_id.clone())
        .filter(|u| !u.starts_with("erased:"))
        .collect();
    let links = store.links_of(&ids, &named).await?;
    let user_of: HashMap<&str, &str> = links
        .iter()
        .map(|l| (l.customer_id.as_str(), l.user_id.as_str()))
        .collect();
    let customer_of: HashMap<&str, &str> = links
        .iter()
        .map(|l| (l.user_id.as_str(), l.customer_id.as_str()))
        .collect();
    let wanted: Vec<String> = named
        .iter()
        .cloned()
        .chain(links.iter().map(|l| l.user_id.to_string()))
        .collect();
    let users: HashMap<String, User> = store
        .users_by_ids(&wanted)
        .await?
        .into_iter()
        .map(|u| (u.id.to_string(), u))
        .collect();
    store.mark_linked_seen(run_id, &ids).await?;

    for (customer_id, snapshot) in customers {
        if let Some(user_id) = user_of.get(customer_id.as_str()) {
            let user = users.get(*user_id);
            tally.record(
                findings,
                linked_finding(user_id, &customer_id, user, &snapshot),
            );
            continue;
        }
        let named = snapshot.user_id.as_deref();
        let category = match named {
            None => Category::Unmanaged,
            Some(u) if u.starts_with("erased:") => Category::Erased,
            Some(u) if !users.contains_key(u) => Category::Orphan,
            Some(u) if customer_of.contains_key(u) => Category::Duplicate,
            Some(u) => {
                candidates.entry(u.to_owned()).or_default().push(Candidate {
                    customer_id,
                    created: snapshot.created,
                    livemode: snapshot.livemode,
                });
                continue; // settled once every page is read
            }
        };
        let mut f = finding(category, named, Some(&customer_id));
        if category == Category::Duplicate {
            f.canonical_customer_id = named
                .and_then(|u| customer_of.get(u))
                .map(|c| (*c).to_owned());
        }
        if matches!(category, Category::Unmanaged | Category::Erased) {
            f.user_id = None;
        }
        tally.record(findings, f);
    }
    Ok(())
}

/// The safe fix of one finding, re-checked against the database at the moment of fixing.
async fn fix(store: &dyn Store, f: &Finding) -> Result<Option<String>, ReconcileError> {
    let (Some(user), Some(customer)) = (f.user_id.as_deref(), f.customer_id.as_deref()) else {
        return Ok(None);
    };
    let (Ok(user_id), Ok(customer_id)) = (UserId::parse(user), StripeCustomerId::parse(customer))
    else {
        return Ok(Some("skipped: not a valid id".into()));
    };
    let action = match f.category {
        Category::UnlinkedMatch => {
            match store
                .insert_link(
                    &user_id,
                    &customer_id,
                    f.livemode,
                    LinkSource::StripeMetadata,
                )
                .await?
            {
                LinkOutcome::Linked(_) => "linked".to_owned(),
                _ => "skipped: linked meanwhile".to_owned(),
            }
        }
        Category::DanglingLink => match store.get_link(&user_id).await? {
            Some(link) if link.customer_id == customer_id => {
                store.remove_link(&user_id, UnlinkReason::Reconcile).await?;
                "unlinked".to_owned()
            }
            _ => "skipped: relinked meanwhile".to_owned(),
        },
        Category::Drift => {
            store.queue_profile_push(&user_id).await?;
            "push_queued".to_owned()
        }
        _ => return Ok(None),
    };
    tracing::info!(category = ?f.category, %user_id, %customer_id, %action, "reconcile fix");
    Ok(Some(action))
}

/// How long a recorded run's lease lasts. It is renewed every [`RENEW_EVERY`] while the run
/// works, so a run whose process stopped reads as `interrupted` within this.
const RUN_LEASE: Duration = Duration::from_secs(30);
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// Finished runs kept for `GET /v1/reconcile/{id}`.
const KEPT_RUNS: u32 = 20;

/// Records a new live run, unless one is live already (on any instance, or a CLI's): its id,
/// or `None`.
pub async fn start_recorded(store: &dyn Store, apply: bool) -> Result<Option<String>, StoreError> {
    let id = format!("rec_{}", uuid::Uuid::new_v4().simple());
    let started = store
        .start_reconcile_run(&id, apply, RUN_LEASE, KEPT_RUNS)
        .await?;
    Ok(started.then_some(id))
}

/// [`run`] as the recorded run `id` (see [`start_recorded`]): its progress saved and its lease
/// renewed while it works, its report, or why it failed, saved when it ends.
pub async fn run_recorded(
    store: &dyn Store,
    stripe: &StripeClient,
    limiter: &RateLimiter,
    apply: bool,
    id: &str,
    observe: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Report, ReconcileError> {
    let latest = std::sync::Mutex::new(Progress::default());
    let saved =
        || serde_json::to_value(&*latest.lock().expect("progress lock")).unwrap_or_default();
    let keep = |p: &Progress| {
        *latest.lock().expect("progress lock") = p.clone();
        observe(p);
    };
    let work = run(store, stripe, limiter, apply, id, &keep);
    // The renewals are a future of their own, polled beside the work (never instead of it): a
    // renewal waiting for the database does not stall the run, nor the run a renewal. The
    // first one, at once, saves the starting progress.
    let renewals = async {
        let mut every = tokio::time::interval(RENEW_EVERY);
        loop {
            every.tick().await;
            match store.renew_reconcile_run(id, &saved(), RUN_LEASE).await {
                Ok(true) => {}
                Ok(false) => return,
                // The database may be back by the next renewal; the run's own queries fail
                // the run if it is not.
                Err(err) => tracing::warn!(run = %id, error = %err, "cannot renew the run's lease"),
            }
        }
    };
    let result = tokio::select! {
        result = work => result,
        () = renewals => Err(ReconcileError::Interrupted),
    };
    match &result {
        Ok(report) => {
            // Serialised here, once, holding no lock.
            let report = serde_json::to_value(report).unwrap_or_default();
            store
                .finish_reconcile_run(id, &saved(), Ok(&report))
                .await?;
        }
        Err(err) => {
            tracing::warn!(run = %id, error = %err, "reconciliation failed");
            let reason = err.public_reason();
            store
                .finish_reconcile_run(id, &saved(), Err(reason))
                .await?;
        }
    }
    result
}

/// The users `--apply` queued a push for (the CLI delivers them before it exits).
pub fn queued_pushes(report: &Report) -> HashSet<String> {
    report
        .findings
        .iter()
        .filter(|f| f.action.as_deref() == Some("push_queued"))
        .filter_map(|f| f.user_id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_limiter_spaces_request_starts() {
        let limiter = RateLimiter::per_second(50);
        let start = Instant::now();
        for _ in 0..11 {
            limiter.acquire().await;
        }
        // Ten intervals of 20 ms after the first (immediate) start; never sooner.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(2),
            "{elapsed:?}"
        );
    }
}
