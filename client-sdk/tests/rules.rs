//! Context rules on the device: signed rulesets verify only with the right key and intact bytes, older versions are refused, and `choose` picks variants by priority, time (wrapping past midnight), weekday, location, device type, segment and recent activity.

use fedrec_client::rules::{
    ActivityCounts, Context, EvalContext, RulesError, VerifiedRuleset, verify, verify_update,
};
use fedrec_shared::ModelShape;
use fedrec_shared::wire::rules::{
    ActivityBound, ActivityWindow, Condition, FetchRules, MAX_RULESET_LEN, MAX_SLOTS, RULES_SIGNATURE_DOMAIN,
    Rule, RulesAnswer, Ruleset, SignedRuleset, Slot, signing_input,
};
use fedrec_shared::wire::{self, LEN_PREFIX, Limits, Request, Response, WireError};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};

/// A fresh Ed25519 key, as the coordinator holds one.
fn key() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("the system RNG works");
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("a fresh key parses")
}

/// Signs a raw payload the way the coordinator does.
fn sign_payload(key: &Ed25519KeyPair, payload: Vec<u8>) -> Vec<u8> {
    let signature = key.sign(&signing_input(&payload)).as_ref().to_vec();
    SignedRuleset { payload, signature }.to_bytes().expect("lengths are right")
}

fn sign(key: &Ed25519KeyPair, ruleset: &Ruleset) -> Vec<u8> {
    sign_payload(key, ruleset.to_payload().expect("a valid ruleset"))
}

fn rule(priority: i32, variant: &str, conditions: Vec<Condition>) -> Rule {
    Rule { priority, variant: variant.into(), conditions }
}

fn slot(name: &str, default: &str, rules: Vec<Rule>) -> Slot {
    Slot { name: name.into(), default: default.into(), rules }
}

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|&x| x.to_owned()).collect()
}

const PURCHASES_WEEK: ActivityWindow = ActivityWindow { kind: Some(2), hours: 168 };
const ANY_DAY: ActivityWindow = ActivityWindow { kind: None, hours: 24 };

/// One slot per kind of condition, and one slot for priorities.
fn ruleset(version: u64) -> Ruleset {
    Ruleset {
        version,
        slots: vec![
            slot(
                "priority",
                "default",
                vec![
                    rule(1, "low", vec![]),
                    rule(5, "high-first", vec![]),
                    rule(5, "high-second", vec![]),
                    rule(9, "never", vec![Condition::Segment(vec![99])]),
                ],
            ),
            slot(
                "night",
                "day",
                vec![rule(0, "night", vec![Condition::TimeOfDay { start: 22 * 60, end: 6 * 60 }])],
            ),
            slot(
                "lunch",
                "other",
                vec![rule(0, "lunch", vec![Condition::TimeOfDay { start: 12 * 60, end: 13 * 60 + 30 }])],
            ),
            // Friday and Saturday.
            slot("weekend", "weekday", vec![rule(0, "weekend", vec![Condition::Weekdays(0b011_0000)])]),
            slot(
                "city",
                "elsewhere",
                vec![rule(0, "local", vec![Condition::Location(strings(&["Berlin", "MÜNCHEN"]))])],
            ),
            slot(
                "device",
                "any",
                vec![rule(0, "big", vec![Condition::DeviceType(strings(&["Tablet", "tv"]))])],
            ),
            slot("segment", "none", vec![rule(0, "fans", vec![Condition::Segment(vec![1, 3])])]),
            slot(
                "activity",
                "quiet",
                vec![
                    rule(
                        2,
                        "buyer",
                        vec![Condition::Activity {
                            window: PURCHASES_WEEK,
                            bound: ActivityBound::AtLeast(2),
                        }],
                    ),
                    rule(
                        1,
                        "calm",
                        vec![
                            Condition::Activity { window: ANY_DAY, bound: ActivityBound::AtLeast(1) },
                            Condition::Activity { window: ANY_DAY, bound: ActivityBound::AtMost(3) },
                        ],
                    ),
                ],
            ),
            slot(
                "combined",
                "fallback",
                vec![rule(
                    0,
                    "all",
                    vec![
                        Condition::Segment(vec![1]),
                        Condition::Weekdays(0b000_0001),
                        Condition::DeviceType(strings(&["phone"])),
                    ],
                )],
            ),
        ],
    }
}

fn verified(version: u64) -> (Ed25519KeyPair, VerifiedRuleset) {
    let key = key();
    let signed = sign(&key, &ruleset(version));
    let v = verify(&signed, key.public_key().as_ref()).expect("a signed ruleset verifies");
    (key, v)
}

/// Monday noon, no location, no device type, no segment, no activity.
fn plain() -> Context {
    Context::at(12, 0, 0)
}

fn choose(
    r: &VerifiedRuleset,
    slot: &str,
    context: &Context,
    segment: Option<u32>,
    counts: &[(ActivityWindow, u32)],
) -> String {
    let activity = |w: ActivityWindow| counts.iter().find(|(x, _)| *x == w).map_or(0, |(_, n)| *n);
    let ctx = EvalContext { context, segment, activity: &activity };
    r.choose(slot, &ctx).expect("a known slot and a valid context").to_owned()
}

#[test]
fn the_highest_priority_wins_and_ties_go_to_the_earlier_rule() {
    let (_, r) = verified(1);
    assert_eq!(choose(&r, "priority", &plain(), None, &[]), "high-first");
    assert_eq!(choose(&r, "priority", &plain(), Some(99), &[]), "never", "a higher priority that holds wins");
}

#[test]
fn a_time_range_wraps_past_midnight() {
    let (_, r) = verified(1);
    let at = |h, m| choose(&r, "night", &Context::at(h, m, 0), None, &[]);
    assert_eq!(at(21, 59), "day");
    assert_eq!(at(22, 0), "night", "the start is inside");
    assert_eq!(at(23, 59), "night");
    assert_eq!(at(0, 0), "night");
    assert_eq!(at(5, 59), "night");
    assert_eq!(at(6, 0), "day", "the end is outside");
    let lunch = |h, m| choose(&r, "lunch", &Context::at(h, m, 0), None, &[]);
    assert_eq!(lunch(11, 59), "other");
    assert_eq!(lunch(12, 0), "lunch");
    assert_eq!(lunch(13, 29), "lunch");
    assert_eq!(lunch(13, 30), "other");
    assert_eq!(lunch(0, 0), "other");
}

#[test]
fn weekdays_count_from_monday() {
    let (_, r) = verified(1);
    let on = |d| choose(&r, "weekend", &Context::at(10, 0, d), None, &[]);
    let got: Vec<String> = (0..7).map(on).collect();
    assert_eq!(got, ["weekday", "weekday", "weekday", "weekday", "weekend", "weekend", "weekday"]);
}

#[test]
fn locations_and_device_types_match_exactly_but_case_insensitively() {
    let (_, r) = verified(1);
    let at = |loc: Option<&str>| {
        let ctx = Context { location: loc.map(str::to_owned), ..plain() };
        choose(&r, "city", &ctx, None, &[])
    };
    assert_eq!(at(Some("Berlin")), "local");
    assert_eq!(at(Some("BERLIN")), "local");
    assert_eq!(at(Some("berlin")), "local");
    assert_eq!(at(Some("münchen")), "local", "Unicode case folds too");
    assert_eq!(at(Some("Berlin-Mitte")), "elsewhere", "no prefix match");
    assert_eq!(at(Some(" Berlin")), "elsewhere", "no trimming");
    assert_eq!(at(None), "elsewhere", "an unknown location matches no set");
    let on = |device: Option<&str>| {
        let ctx = Context { device_type: device.map(str::to_owned), ..plain() };
        choose(&r, "device", &ctx, None, &[])
    };
    assert_eq!(on(Some("tablet")), "big");
    assert_eq!(on(Some("TV")), "big");
    assert_eq!(on(Some("phone")), "any");
    assert_eq!(on(None), "any");
}

#[test]
fn segments_match_only_a_known_segment_in_the_set() {
    let (_, r) = verified(1);
    assert_eq!(choose(&r, "segment", &plain(), Some(3), &[]), "fans");
    assert_eq!(choose(&r, "segment", &plain(), Some(2), &[]), "none");
    assert_eq!(choose(&r, "segment", &plain(), None, &[]), "none");
}

#[test]
fn activity_thresholds_are_inclusive() {
    let (_, r) = verified(1);
    let with = |purchases: u32, any: u32| {
        choose(&r, "activity", &plain(), None, &[(PURCHASES_WEEK, purchases), (ANY_DAY, any)])
    };
    assert_eq!(with(2, 0), "buyer", "at least 2 holds at 2");
    assert_eq!(with(1, 0), "quiet");
    assert_eq!(with(1, 1), "calm");
    assert_eq!(with(1, 3), "calm", "at most 3 holds at 3");
    assert_eq!(with(1, 4), "quiet");
    assert_eq!(with(5, 4), "buyer");
}

#[test]
fn activity_counts_come_from_the_event_log_by_kind_and_window() {
    let (_, r) = verified(1);
    assert_eq!(r.activity_windows(), [ANY_DAY, PURCHASES_WEEK]);
    let now = 1_700_000_000;
    let hour = 3600;
    let events = [
        (2, now - 100 * hour), // a purchase 100 h ago: in the week, not the day
        (2, now - 24 * hour),  // a purchase exactly 24 h ago: in both
        (0, now - 2 * hour),   // a view
        (1, now + 60),         // a click stamped in the future counts as now
        (2, now - 169 * hour), // a purchase outside the week
    ];
    let counts = ActivityCounts::from_events(r.activity_windows(), now, events);
    let ctx = EvalContext { context: &plain(), segment: None, activity: &counts };
    assert_eq!(r.choose("activity", &ctx), Ok("buyer"));
    use fedrec_client::rules::Activity as _;
    assert_eq!(counts.count(PURCHASES_WEEK), 2);
    assert_eq!(counts.count(ANY_DAY), 3);
    assert_eq!(counts.count(ActivityWindow { kind: Some(0), hours: 1 }), 0, "a window not computed counts 0");
}

#[test]
fn the_default_is_chosen_when_no_rule_holds_and_every_condition_must_hold() {
    let (_, r) = verified(1);
    let phone = Context { device_type: Some("Phone".into()), ..plain() };
    assert_eq!(choose(&r, "combined", &phone, Some(1), &[]), "all");
    assert_eq!(choose(&r, "combined", &phone, Some(2), &[]), "fallback", "segment fails");
    assert_eq!(choose(&r, "combined", &Context { weekday: 1, ..phone.clone() }, Some(1), &[]), "fallback");
    assert_eq!(choose(&r, "combined", &plain(), Some(1), &[]), "fallback", "no device type");
}

#[test]
fn unknown_slots_and_invalid_contexts_are_errors() {
    let (_, r) = verified(1);
    let none = |_: ActivityWindow| 0u32;
    let eval = |c: &Context, slot: &str| {
        r.choose(slot, &EvalContext { context: c, segment: None, activity: &none }).map(str::to_owned)
    };
    assert_eq!(eval(&plain(), "nope"), Err(RulesError::UnknownSlot));
    assert!(matches!(eval(&Context::at(24, 0, 0), "night"), Err(RulesError::InvalidContext(_))));
    assert!(matches!(eval(&Context::at(0, 60, 0), "night"), Err(RulesError::InvalidContext(_))));
    assert!(matches!(eval(&Context::at(0, 0, 7), "night"), Err(RulesError::InvalidContext(_))));
    let mut names: Vec<&str> = r.slot_names().collect();
    names.sort_unstable();
    assert_eq!(names.len(), ruleset(1).slots.len());
}

#[test]
fn a_tampered_byte_anywhere_is_refused() {
    let key = key();
    let signed = sign(&key, &ruleset(1));
    let public = key.public_key().as_ref().to_vec();
    for i in 0..signed.len() {
        let mut bad = signed.clone();
        bad[i] ^= 0x01;
        let refused = verify(&bad, &public);
        assert!(
            matches!(refused, Err(RulesError::BadSignature | RulesError::Malformed(_))),
            "byte {i}: {refused:?}"
        );
    }
    // Flipping a byte of the payload (not of a length) is a signature failure.
    let mut bad = signed.clone();
    let mid = signed.len() / 2;
    bad[mid] ^= 0x80;
    assert_eq!(verify(&bad, &public).map(|r| r.version()), Err(RulesError::BadSignature));
}

#[test]
fn another_key_is_refused() {
    let signed = sign(&key(), &ruleset(1));
    let other = key();
    assert_eq!(
        verify(&signed, other.public_key().as_ref()).map(|r| r.version()),
        Err(RulesError::BadSignature)
    );
    assert_eq!(verify(&signed, &[0u8; 31]).map(|r| r.version()), Err(RulesError::BadPublicKey));
}

#[test]
fn unsigned_garbage_and_truncated_rulesets_are_refused() {
    let key = key();
    let public = key.public_key().as_ref().to_vec();
    let payload = ruleset(1).to_payload().expect("valid");
    // A well-formed envelope without a real signature.
    let unsigned =
        SignedRuleset { payload: payload.clone(), signature: vec![0; 64] }.to_bytes().expect("encodes");
    assert_eq!(verify(&unsigned, &public).map(|r| r.version()), Err(RulesError::BadSignature));
    // Signed over the payload without the domain prefix: a signature made for something else.
    let undomained =
        SignedRuleset { payload: payload.clone(), signature: key.sign(&payload).as_ref().to_vec() };
    assert_eq!(
        verify(&undomained.to_bytes().expect("encodes"), &public).map(|r| r.version()),
        Err(RulesError::BadSignature)
    );
    // The bare payload, and garbage.
    assert!(matches!(verify(&payload, &public), Err(RulesError::Malformed(_) | RulesError::BadSignature)));
    for garbage in [&b""[..], b"\x00", b"hello, world", &[0xff; 100]] {
        assert!(matches!(verify(garbage, &public), Err(RulesError::Malformed(_))), "{garbage:?}");
    }
    let signed = sign(&key, &ruleset(1));
    for len in 0..signed.len() {
        let refused = verify(&signed[..len], &public);
        assert!(matches!(refused, Err(RulesError::Malformed(_))), "truncated to {len}: {refused:?}");
    }
    let mut long = signed.clone();
    long.push(0);
    assert!(matches!(verify(&long, &public), Err(RulesError::Malformed(_))), "a trailing byte");
    // Too long to be a ruleset: refused before parsing.
    let huge = vec![0u8; MAX_RULESET_LEN * 2];
    assert!(matches!(verify(&huge, &public), Err(RulesError::Malformed(WireError::TooLarge { .. }))));
}

#[test]
fn a_signed_but_invalid_payload_is_refused() {
    let key = key();
    // Postcard by hand: version 1, two slots both named "a" with default "b" and no rules.
    let payload = vec![1, 2, 1, b'a', 1, b'b', 0, 1, b'a', 1, b'b', 0];
    let signed = sign_payload(&key, payload);
    assert!(matches!(
        verify(&signed, key.public_key().as_ref()),
        Err(RulesError::Invalid(WireError::Invalid(_)))
    ));
    // The same with distinct names is fine: the hand encoding is right.
    let payload = vec![1, 2, 1, b'a', 1, b'b', 0, 1, b'c', 1, b'b', 0];
    let ok = verify(&sign_payload(&key, payload), key.public_key().as_ref()).expect("valid");
    assert_eq!(ok.version(), 1);
}

#[test]
fn an_older_version_is_refused() {
    let key = key();
    let public = key.public_key().as_ref().to_vec();
    let v4 = sign(&key, &ruleset(4));
    assert_eq!(
        verify_update(&v4, &public, Some(5)).map(|r| r.version()),
        Err(RulesError::Rollback { installed: 5, offered: 4 })
    );
    assert_eq!(verify_update(&v4, &public, Some(4)).map(|r| r.version()), Ok(4), "a re-install");
    assert_eq!(verify_update(&v4, &public, Some(3)).map(|r| r.version()), Ok(4));
    assert_eq!(verify_update(&v4, &public, None).map(|r| r.version()), Ok(4));
}

#[test]
fn stored_bytes_verify_again() {
    let (key, r) = verified(7);
    let again = verify(r.signed_bytes(), key.public_key().as_ref()).expect("the stored bytes verify");
    assert_eq!(again.version(), 7);
    assert_eq!(choose(&again, "night", &Context::at(23, 0, 0), None, &[]), "night");
}

#[test]
fn bounds_are_enforced() {
    let invalid = |r: Ruleset| matches!(r.to_payload(), Err(WireError::Invalid(_)));
    let with = |rules: Vec<Rule>| Ruleset { version: 1, slots: vec![slot("s", "d", rules)] };
    let with_condition = |c: Condition| with(vec![rule(0, "v", vec![c])]);
    assert!(!invalid(with(vec![])), "a slot with no rules is fine");
    assert!(invalid(Ruleset {
        version: 1,
        slots: (0..=MAX_SLOTS).map(|i| slot(&format!("s{i}"), "d", vec![])).collect()
    }));
    assert!(invalid(Ruleset { version: 1, slots: vec![slot("s", "d", vec![]), slot("s", "e", vec![])] }));
    assert!(invalid(Ruleset { version: 1, slots: vec![slot("", "d", vec![])] }));
    assert!(invalid(Ruleset { version: 1, slots: vec![slot(&"x".repeat(65), "d", vec![])] }));
    assert!(invalid(Ruleset { version: 1, slots: vec![slot("s", "", vec![])] }));
    assert!(invalid(Ruleset { version: 1, slots: vec![slot("s", &"x".repeat(129), vec![])] }));
    assert!(invalid(with(vec![rule(0, "", vec![])])));
    assert!(invalid(with((0..65).map(|i| rule(i, "v", vec![])).collect())));
    assert!(invalid(with(vec![rule(0, "v", vec![Condition::Weekdays(1); 17])])));
    assert!(invalid(with_condition(Condition::Segment(vec![]))));
    assert!(invalid(with_condition(Condition::Segment((0..65).collect()))));
    assert!(invalid(with_condition(Condition::TimeOfDay { start: 60, end: 60 })));
    assert!(invalid(with_condition(Condition::TimeOfDay { start: 0, end: 1440 })));
    assert!(invalid(with_condition(Condition::Weekdays(0))));
    assert!(invalid(with_condition(Condition::Weekdays(0x80))));
    assert!(invalid(with_condition(Condition::Location(vec![]))));
    assert!(invalid(with_condition(Condition::Location(strings(&[""])))));
    assert!(invalid(with_condition(Condition::DeviceType(vec!["x".repeat(65)]))));
    let activity = |kind, hours| Condition::Activity {
        window: ActivityWindow { kind, hours },
        bound: ActivityBound::AtLeast(1),
    };
    assert!(invalid(with_condition(activity(None, 0))));
    assert!(invalid(with_condition(activity(None, 366 * 24 + 1))));
    assert!(invalid(with_condition(activity(Some(512), 1))));
    assert!(!invalid(with_condition(activity(Some(511), 366 * 24))));
    // Within every count bound, but too many bytes: 64 slots × 64 rules with long variants.
    let big = Ruleset {
        version: 1,
        slots: (0..MAX_SLOTS)
            .map(|i| {
                slot(&format!("s{i}"), "d", (0..64).map(|_| rule(0, &"v".repeat(100), vec![])).collect())
            })
            .collect(),
    };
    assert!(matches!(big.to_payload(), Err(WireError::TooLarge { limit: MAX_RULESET_LEN, .. })));
}

#[test]
fn the_signature_covers_the_domain_prefix_then_the_payload() {
    assert_eq!(RULES_SIGNATURE_DOMAIN, b"fedrec-rules-v1\0");
    assert_eq!(signing_input(b"xy"), b"fedrec-rules-v1\0xy");
    // The payload's bytes are the documented postcard layout.
    let r = Ruleset {
        version: 300,
        slots: vec![slot(
            "s",
            "d",
            vec![rule(
                -1,
                "v",
                vec![
                    Condition::TimeOfDay { start: 1320, end: 360 },
                    Condition::Activity { window: PURCHASES_WEEK, bound: ActivityBound::AtMost(0) },
                ],
            )],
        )],
    };
    let want = [
        0xac, 0x02, // version 300
        1,    // one slot
        1, b's', 1, b'd', // name, default
        1,    // one rule
        1,    // priority -1 (zigzag)
        1, b'v', // variant
        2,    // two conditions
        1, 0xa8, 0x0a, 0xe8, 0x02, // TimeOfDay 1320, 360
        5, 1, 2, 0xa8, 0x01, 1, 0, // Activity { kind Some(2), hours 168 }, AtMost(0)
    ];
    assert_eq!(r.to_payload().expect("valid"), want);
}

#[test]
fn fetch_messages_round_trip_on_the_wire_and_hide_the_token() {
    let limits = Limits::for_shape(&ModelShape { n_items: 1, dim: 1, n_segments: 1 });
    let fetch = Request::FetchRules(FetchRules { token: vec![0xab; 40], have_version: Some(3) });
    let frame = wire::encode(&fetch).expect("encodes");
    assert_eq!(&frame[LEN_PREFIX..LEN_PREFIX + 2], [3, 2], "version 3, request index 2");
    assert_eq!(wire::decode_request(&frame[LEN_PREFIX..], &limits), Ok(fetch.clone()));
    assert!(!format!("{fetch:?}").contains("171"), "Debug shows no token byte");
    let too_long = Request::FetchRules(FetchRules { token: vec![0; 513], have_version: None });
    assert!(matches!(wire::encode(&too_long), Err(WireError::Invalid(_))));

    let key = key();
    let signed = SignedRuleset::from_bytes(&sign(&key, &ruleset(2))).expect("decodes");
    for answer in
        [RulesAnswer::Ruleset(signed.clone()), RulesAnswer::Unchanged { version: 2 }, RulesAnswer::NoRuleset]
    {
        let response = Response::Rules(answer);
        let frame = wire::encode(&response).expect("encodes");
        assert_eq!(&frame[LEN_PREFIX..LEN_PREFIX + 2], [3, 5], "version 3, response index 5");
        assert_eq!(wire::decode_response(&frame[LEN_PREFIX..], &limits), Ok(response.clone()));
        assert!(response.into_inbound(None).is_err(), "a rules answer is not a round message");
    }
    // The largest ruleset fits a tiny model's response limit.
    assert!(limits.max_response() >= wire::RULES_LIMIT);
    let bad_signature =
        Response::Rules(RulesAnswer::Ruleset(SignedRuleset { payload: vec![], signature: vec![0; 63] }));
    assert!(matches!(wire::encode(&bad_signature), Err(WireError::Invalid(_))));
}
