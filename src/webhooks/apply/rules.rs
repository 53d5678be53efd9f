//! The merge rules, pure: where a snapshot stands against the newest one applied (`order`),
//! whose values it carries (`provenance`), what a newer customer snapshot calls for
//! (`profile_write`), and how a Stripe customer merges into a user (`remote_change`).

use crate::{
    domain::{full_name, Email, PersonName, Phone},
    store::{PushedProfile, RemoteProfile, UpdateContext, User, UserUpsert},
    stripe::Customer,
};

/// Where a snapshot stands against the newest one applied to its customer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Order {
    /// This very event was applied before (a crash came between applying it and marking it
    /// applied).
    AlreadyApplied,
    Older,
    /// Same second as the newest applied: which came first is unknowable from the events.
    SameSecond,
    Newer,
}

/// `stored` is the link's watermark; `superseded` the newest older snapshot folded into this
/// one (see `apply_customer`), which counts as applied just before it: on the same second it
/// is the one to compare with, as if it had been applied on its own.
pub(super) fn order(
    stored: Option<(i64, Option<String>)>,
    superseded: Option<(i64, &str)>,
    created: i64,
    event_id: &str,
) -> Order {
    let watermark = match (stored, superseded) {
        (Some((seen, id)), Some((folded, _))) if seen > folded => Some((seen, id)),
        (_, Some((folded, id))) => Some((folded, Some(id.to_owned()))),
        (stored, None) => stored,
    };
    match watermark {
        Some((seen, Some(id))) if created == seen && id == event_id => Order::AlreadyApplied,
        Some((seen, _)) if created < seen => Order::Older,
        Some((seen, _)) if created == seen => Order::SameSecond,
        _ => Order::Newer,
    }
}

/// What a newer snapshot calls for.
#[derive(Debug, PartialEq)]
pub(super) enum Verdict {
    /// Nothing to write: a local edit is on its way out, the snapshot says nothing new, or it
    /// is billsync's own push coming back.
    Nothing,
    Write(Box<RemoteProfile>),
    /// Whose values these are is unknowable from the snapshot: ask Stripe for its current
    /// state and judge that.
    AskStripe,
}

/// Whose values a snapshot carries, told by the profile version each push stamps into the
/// customer's metadata (`billsync_profile_version`).
#[derive(Debug, PartialEq, Eq)]
enum Provenance {
    /// Stamped by the newest recorded push: that push's values, or a Stripe-side change made
    /// since (compared with what was pushed).
    SinceNewestPush,
    /// Stamped by an earlier push (or by one not recorded yet): the state before billsync's
    /// newest push, which sent every field again. Applying it would revert a newer edit.
    BeforeNewestPush,
    /// Unstamped while billsync's pushes stamp (a snapshot from before the first stamped
    /// push, metadata edited by hand), or stamped while no stamped push is recorded (a
    /// re-made link).
    Unknown,
    /// Neither carries a stamp (pushes from before stamps): compared with the last push.
    Unstamped,
}

fn provenance(pushed_stamp: Option<i64>, snapshot_stamp: Option<i64>) -> Provenance {
    match (snapshot_stamp, pushed_stamp) {
        (Some(seen), Some(newest)) if seen == newest => Provenance::SinceNewestPush,
        (Some(_), Some(_)) => Provenance::BeforeNewestPush,
        (Some(_), None) | (None, Some(_)) => Provenance::Unknown,
        (None, None) => Provenance::Unstamped,
    }
}

/// The profile write a newer snapshot calls for. Local values win while a push is pending
/// or in flight; a snapshot stamped by an earlier push is never applied, however late it
/// comes; a snapshot equal to what was last pushed is an echo. `from_stripe` says the
/// snapshot is Stripe's current state, fetched: no one left to ask, so one of unknown
/// provenance is compared with the last push.
pub(super) fn profile_write(
    context: &UpdateContext,
    snapshot: &Customer,
    from_stripe: bool,
) -> Verdict {
    if context.active_push {
        tracing::debug!("local edit on its way to Stripe: local values win");
        return Verdict::Nothing;
    }
    match provenance(context.pushed_stamp, snapshot.profile_stamp()) {
        Provenance::BeforeNewestPush => {
            tracing::debug!("an earlier push's state: billsync's newest push overwrote it");
            return Verdict::Nothing;
        }
        Provenance::Unknown if !from_stripe => return Verdict::AskStripe,
        Provenance::Unknown | Provenance::SinceNewestPush | Provenance::Unstamped => {}
    }
    let Some((desired, remote)) = remote_change(&context.user, snapshot) else {
        return Verdict::Nothing;
    };
    if context
        .last_push
        .as_ref()
        .is_some_and(|last| same_profile(last, &remote))
    {
        tracing::debug!("billsync's own push came back: nothing to write");
        return Verdict::Nothing;
    }
    Verdict::Write(Box::new(RemoteProfile {
        user: desired,
        expected: context.user.version,
        pushed: remote,
    }))
}

fn blank_to_none(value: Option<&str>) -> Option<String> {
    value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

fn same_profile(a: &PushedProfile, b: &PushedProfile) -> bool {
    a.email.eq_ignore_ascii_case(&b.email)
        && blank_to_none(a.name.as_deref()) == blank_to_none(b.name.as_deref())
        && blank_to_none(a.phone.as_deref()) == blank_to_none(b.phone.as_deref())
}

/// The user as the Stripe snapshot would have it, and the snapshot's values; `None` when the
/// snapshot says nothing new.
fn remote_change(user: &User, customer: &Customer) -> Option<(UserUpsert, PushedProfile)> {
    let remote = PushedProfile {
        email: customer
            .email
            .as_deref()
            .map(str::trim)
            .unwrap_or_default()
            .to_lowercase(),
        name: blank_to_none(customer.name.as_deref()),
        phone: blank_to_none(customer.phone.as_deref()),
        version: user.version,
    };
    let email = Email::parse(&remote.email).unwrap_or_else(|_| user.email.clone());
    let local_name = full_name(user.first_name.as_ref(), user.last_name.as_ref());
    // Split Stripe's one name only when it differs from ours, so "Mary Ann" + "Smith" stays.
    let (first_name, last_name) = if remote.name == local_name {
        (user.first_name.clone(), user.last_name.clone())
    } else {
        let name = remote.name.clone().unwrap_or_default();
        let (first, last) = name.split_once(' ').unwrap_or((name.as_str(), ""));
        (
            PersonName::parse_optional(Some(first), "first_name").unwrap_or(None),
            PersonName::parse_optional(Some(last), "last_name").unwrap_or(None),
        )
    };
    let phone = match &remote.phone {
        None => None,
        Some(raw) => Phone::parse(raw).ok().or_else(|| user.phone.clone()),
    };
    let desired = UserUpsert {
        id: user.id.clone(),
        email_verified: user.email_verified && email == user.email,
        email,
        first_name,
        last_name,
        phone,
    };
    let unchanged = desired.email == user.email
        && desired.first_name == user.first_name
        && desired.last_name == user.last_name
        && desired.phone == user.phone;
    (!unchanged).then_some((desired, remote))
}

/// The fixtures are shared with the batched path's tests.
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::domain::UserId;

    #[test]
    fn provenance_follows_the_stamps() {
        use Provenance::*;
        let cases = [
            // (newest recorded push's stamp, the snapshot's stamp, provenance)
            (Some(3), Some(3), SinceNewestPush),
            (Some(3), Some(2), BeforeNewestPush),
            (Some(3), Some(4), BeforeNewestPush),
            (Some(3), None, Unknown),
            (None, Some(3), Unknown),
            (None, None, Unstamped),
        ];
        for (pushed, seen, expected) in cases {
            assert_eq!(provenance(pushed, seen), expected, "{pushed:?} {seen:?}");
        }
    }

    /// Ada Hopper, ada@example.com (verified), no phone.
    fn user(version: i64) -> User {
        let now = time::OffsetDateTime::now_utc();
        User {
            id: UserId::parse("u1").unwrap(),
            email: Email::parse("ada@example.com").unwrap(),
            email_verified: true,
            first_name: PersonName::parse_optional(Some("Ada"), "first_name").unwrap(),
            last_name: PersonName::parse_optional(Some("Hopper"), "last_name").unwrap(),
            phone: None,
            version,
            created_at: now,
            updated_at: now,
        }
    }

    /// `user()`'s link: no watermark, Ada Hopper last pushed (at `version`, stamped
    /// `pushed_stamp`), `active_push` if a push is pending.
    pub(in crate::webhooks::apply) fn context(
        version: i64,
        pushed_stamp: Option<i64>,
        active_push: bool,
    ) -> UpdateContext {
        UpdateContext {
            customer_id: "cus_1".into(),
            user: user(version),
            watermark: None,
            active_push,
            last_push: Some(PushedProfile {
                email: "ada@example.com".into(),
                name: Some("Ada Hopper".into()),
                phone: None,
                version,
            }),
            pushed_stamp,
        }
    }

    /// Customer `cus_1` as an event carries it: ada@example.com, `name`, stamped `stamp`.
    pub(in crate::webhooks::apply) fn snapshot_json(
        name: &str,
        stamp: Option<i64>,
    ) -> serde_json::Value {
        let metadata = stamp.map_or(
            serde_json::json!({}),
            |s| serde_json::json!({"billsync_profile_version": s.to_string()}),
        );
        serde_json::json!({
            "id": "cus_1", "email": "ada@example.com", "name": name, "metadata": metadata,
        })
    }

    fn snapshot(name: &str, stamp: Option<i64>) -> Customer {
        serde_json::from_value(snapshot_json(name, stamp)).unwrap()
    }

    #[test]
    fn profile_write_rules() {
        let write = |v: &Verdict| matches!(v, Verdict::Write(_));
        // (what the link knows, the snapshot, from Stripe's current state, writes?)
        let cases = [
            // Echo of the newest push.
            (
                context(5, Some(5), false),
                snapshot("Ada Hopper", Some(5)),
                false,
                false,
            ),
            // A portal change after the newest push.
            (
                context(5, Some(5), false),
                snapshot("Grace Hopper", Some(5)),
                false,
                true,
            ),
            // An earlier push's state, however different: never.
            (
                context(5, Some(5), false),
                snapshot("Ada Lovelace", Some(4)),
                false,
                false,
            ),
            // A pending local edit wins over anything.
            (
                context(5, Some(5), true),
                snapshot("Grace Hopper", Some(5)),
                false,
                false,
            ),
            // Before stamps: the last push decides.
            (
                context(5, None, false),
                snapshot("Ada Hopper", None),
                false,
                false,
            ),
            (
                context(5, None, false),
                snapshot("Grace Hopper", None),
                false,
                true,
            ),
            // Stripe's own current state of unknown provenance: compared with the last push.
            (
                context(5, Some(5), false),
                snapshot("Grace Hopper", None),
                true,
                true,
            ),
            (
                context(5, Some(5), false),
                snapshot("Ada Hopper", None),
                true,
                false,
            ),
        ];
        for (index, (context, snapshot, from_stripe, writes)) in cases.into_iter().enumerate() {
            let verdict = profile_write(&context, &snapshot, from_stripe);
            assert_eq!(write(&verdict), writes, "case {index}: {verdict:?}");
        }
        // Unknown provenance in an event: Stripe is asked.
        assert_eq!(
            profile_write(
                &context(5, Some(5), false),
                &snapshot("Grace Hopper", None),
                false
            ),
            Verdict::AskStripe
        );
    }

    #[test]
    fn order_ranks_a_snapshot_against_the_newest_applied() {
        use Order::*;
        let at = |seen: i64, id: &str| Some((seen, Some(id.to_owned())));
        let folded = Some((10, "evt_s"));
        // (the stored watermark, the snapshot folded into this one, this one's `created`,
        // its order); this one is always `evt_b`.
        let cases = [
            // Nothing applied yet.
            (None, None, 10, Newer),
            // This very event, applied before a crash kept it from being marked.
            (at(10, "evt_b"), None, 10, AlreadyApplied),
            (at(10, "evt_a"), None, 9, Older),
            (at(10, "evt_a"), None, 10, SameSecond),
            // A watermark that does not name its event ties all the same.
            (Some((10, None)), None, 10, SameSecond),
            (at(10, "evt_a"), None, 11, Newer),
            // A folded snapshot counts as applied just before this one: it is what this one
            // is compared with...
            (at(8, "evt_a"), folded, 10, SameSecond),
            (at(8, "evt_a"), folded, 11, Newer),
            (None, folded, 10, SameSecond),
            (at(10, "evt_a"), folded, 10, SameSecond),
            // ...unless the stored watermark is newer still.
            (at(12, "evt_a"), folded, 11, Older),
            (at(12, "evt_a"), folded, 12, SameSecond),
            (at(12, "evt_b"), folded, 12, AlreadyApplied),
            (at(12, "evt_a"), folded, 13, Newer),
        ];
        for (index, (stored, superseded, created, expected)) in cases.into_iter().enumerate() {
            assert_eq!(
                order(stored, superseded, created, "evt_b"),
                expected,
                "case {index}"
            );
        }
    }

    #[test]
    fn subscription_events_arriving_out_of_order_apply_only_newer_states() {
        // One subscription's events as Stripe delivers them (in no set order); nothing is
        // folded for subscriptions, and each newer one applied raises the watermark.
        let arrivals = [
            (20, "evt_2", Order::Newer),
            (10, "evt_1", Order::Older),
            (20, "evt_2", Order::AlreadyApplied),
            (20, "evt_3", Order::SameSecond),
            (30, "evt_4", Order::Newer),
            (20, "evt_3", Order::Older),
        ];
        let mut watermark: Option<(i64, Option<String>)> = None;
        for (created, event_id, expected) in arrivals {
            let ranked = order(watermark.clone(), None, created, event_id);
            assert_eq!(ranked, expected, "{event_id} at {created}");
            if ranked == Order::Newer {
                watermark = Some((created, Some(event_id.to_owned())));
            }
        }
    }

    #[test]
    fn profile_write_verdict_by_provenance_and_source() {
        #[derive(Debug, PartialEq)]
        enum Expected {
            Nothing,
            Write,
            AskStripe,
        }
        use Expected::*;
        // (newest push's stamp, a push pending, the snapshot's name and stamp, the snapshot
        // fetched from Stripe, verdict); the user and the last push are "Ada Hopper".
        let cases = [
            // Stamped by the newest push: a change since, or the push's echo.
            (Some(5), false, "Grace Hopper", Some(5), false, Write),
            (Some(5), false, "Ada Hopper", Some(5), false, Nothing),
            // Stamped by an earlier push: never, even as Stripe's current state.
            (Some(5), false, "Grace Hopper", Some(4), false, Nothing),
            (Some(5), false, "Grace Hopper", Some(4), true, Nothing),
            // Of unknown provenance: Stripe is asked, and its answer compared with the push.
            (Some(5), false, "Grace Hopper", None, false, AskStripe),
            (None, false, "Grace Hopper", Some(5), false, AskStripe),
            (None, false, "Grace Hopper", Some(5), true, Write),
            (None, false, "Ada Hopper", Some(5), true, Nothing),
            // Before stamps: compared with the last push.
            (None, false, "Grace Hopper", None, false, Write),
            (None, false, "Ada Hopper", None, false, Nothing),
            // A push pending: local values win, and Stripe is not even asked.
            (Some(5), true, "Grace Hopper", None, false, Nothing),
            (Some(5), true, "Grace Hopper", Some(5), true, Nothing),
        ];
        for (index, (pushed, pending, name, stamp, from_stripe, expected)) in
            cases.into_iter().enumerate()
        {
            let verdict = profile_write(
                &context(5, pushed, pending),
                &snapshot(name, stamp),
                from_stripe,
            );
            let got = match verdict {
                Verdict::Nothing => Nothing,
                Verdict::Write(_) => Write,
                Verdict::AskStripe => AskStripe,
            };
            assert_eq!(got, expected, "case {index}");
        }
    }

    fn customer(email: Option<&str>, name: Option<&str>, phone: Option<&str>) -> Customer {
        serde_json::from_value(serde_json::json!({
            "id": "cus_1", "email": email, "name": name, "phone": phone, "metadata": {},
        }))
        .unwrap()
    }

    #[test]
    fn remote_change_merges_a_stripe_customer_into_the_user() {
        const ADA: &str = "ada@example.com";
        // The customer's email, name and phone, and the user they make (email, first name,
        // last name, phone, still verified) or `None` for no change; the user is `user()`.
        let cases = [
            (Some(ADA), Some("Ada Hopper"), None, None),
            // Another spelling of the same address, blanks around the name: no change.
            (
                Some(" ADA@Example.com "),
                Some(" Ada Hopper "),
                Some(""),
                None,
            ),
            // A new address is taken, unverified.
            (
                Some("grace@example.com"),
                Some("Ada Hopper"),
                None,
                Some((
                    "grace@example.com",
                    Some("Ada"),
                    Some("Hopper"),
                    None,
                    false,
                )),
            ),
            // An address missing or not an address keeps the user's.
            (None, Some("Ada Hopper"), None, None),
            (Some("not an address"), Some("Ada Hopper"), None, None),
            // Stripe's one name is split at its first space.
            (
                Some(ADA),
                Some("Grace Hopper"),
                None,
                Some((ADA, Some("Grace"), Some("Hopper"), None, true)),
            ),
            (
                Some(ADA),
                Some("Mary Ann Smith"),
                None,
                Some((ADA, Some("Mary"), Some("Ann Smith"), None, true)),
            ),
            (
                Some(ADA),
                Some("Cher"),
                None,
                Some((ADA, Some("Cher"), None, None, true)),
            ),
            // A name emptied in Stripe clears both.
            (Some(ADA), None, None, Some((ADA, None, None, None, true))),
            (
                Some(ADA),
                Some("  "),
                None,
                Some((ADA, None, None, None, true)),
            ),
            // A phone is taken when it parses, kept when it does not.
            (
                Some(ADA),
                Some("Ada Hopper"),
                Some(" +14155550100 "),
                Some((ADA, Some("Ada"), Some("Hopper"), Some("+14155550100"), true)),
            ),
            (Some(ADA), Some("Ada Hopper"), Some("call me"), None),
            // Both at once.
            (
                Some("Grace@Example.com"),
                Some("Grace Hopper"),
                Some("+14155550100"),
                Some((
                    "grace@example.com",
                    Some("Grace"),
                    Some("Hopper"),
                    Some("+14155550100"),
                    false,
                )),
            ),
            // Spaced otherwise, but split back into the same names: no change.
            (Some(ADA), Some("Ada  Hopper"), None, None),
        ];
        for (index, (email, name, phone, expected)) in cases.into_iter().enumerate() {
            let merged = remote_change(&user(5), &customer(email, name, phone)).map(|(u, _)| {
                (
                    u.email.to_string(),
                    u.first_name.map(|n| n.to_string()),
                    u.last_name.map(|n| n.to_string()),
                    u.phone.map(|p| p.to_string()),
                    u.email_verified,
                )
            });
            let expected = expected.map(|(email, first, last, phone, verified)| {
                (
                    email.to_owned(),
                    first.map(str::to_owned),
                    last.map(str::to_owned),
                    phone.map(str::to_owned),
                    verified,
                )
            });
            assert_eq!(merged, expected, "case {index}");
        }
    }

    #[test]
    fn remote_change_reports_the_snapshot_as_stripe_has_it() {
        let (_, remote) = remote_change(
            &user(7),
            &customer(
                Some(" Grace@Example.com "),
                Some(" Grace Hopper "),
                Some(" "),
            ),
        )
        .unwrap();
        assert_eq!(
            remote,
            PushedProfile {
                email: "grace@example.com".into(),
                name: Some("Grace Hopper".into()),
                phone: None,
                version: 7,
            }
        );
    }

    #[test]
    fn same_profile_ignores_email_case_blanks_and_version() {
        let pushed =
            |email: &str, name: Option<&str>, phone: Option<&str>, version: i64| PushedProfile {
                email: email.into(),
                name: name.map(Into::into),
                phone: phone.map(Into::into),
                version,
            };
        let ada = pushed("ada@example.com", Some("Ada"), None, 1);
        // (the other profile, the same?)
        let cases = [
            (pushed("ADA@example.com", Some("Ada"), None, 1), true),
            (pushed("ada@example.com", Some(" Ada "), Some(""), 1), true),
            (pushed("ada@example.com", Some("Ada"), None, 9), true),
            (pushed("ada@example.com", Some("ada"), None, 1), false),
            (pushed("ada@example.com", None, None, 1), false),
            (
                pushed("ada@example.com", Some("Ada"), Some("+14155550100"), 1),
                false,
            ),
            (pushed("grace@example.com", Some("Ada"), None, 1), false),
        ];
        for (index, (other, same)) in cases.into_iter().enumerate() {
            assert_eq!(same_profile(&ada, &other), same, "case {index}");
            assert_eq!(same_profile(&other, &ada), same, "case {index}, swapped");
        }
    }
}
