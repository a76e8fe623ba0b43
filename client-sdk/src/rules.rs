//! Context rules: a signed ruleset from the coordinator, verified and evaluated on the device, so context never leaves it.
//!
//! The format is [`fedrec_shared::wire::rules`]. A device holds a [`VerifiedRuleset`], which
//! only [`verify`] (or [`verify_update`]) can build: the Ed25519 signature over the payload
//! is checked against the coordinator's rules public key *before* the payload is parsed, and
//! the parsed ruleset is validated. An unsigned, tampered, truncated or foreign ruleset is
//! refused, and so is one older than the installed one (rollback).
//!
//! Evaluation is pure: [`VerifiedRuleset::choose`] takes the app's [`Context`] (local time,
//! weekday, coarse location, device type), the segment the SDK computed, and the recent
//! activity counts the SDK derives from its log ([`ActivityCounts`], or any [`Activity`]).
//! Locations and device types match exactly but case-insensitively (Unicode lowercase).
//!
//! [`fetch`] asks the coordinator over QUIC for a newer ruleset than the installed one.

use std::collections::BTreeMap;

use fedrec_shared::wire::rules::{
    ActivityWindow, Condition, MINUTES_PER_DAY, RulesAnswer, Ruleset, SignedRuleset, signing_input,
};
use fedrec_shared::wire::{Request, Response, WireError};
use ring::signature::{ED25519, UnparsedPublicKey};

use crate::net::{Device, NetError};

/// Length of the coordinator's Ed25519 rules public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Why a ruleset was refused or a variant could not be chosen. No variant carries the
/// ruleset's or the context's contents.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RulesError {
    /// The public key is not a 32-byte Ed25519 key.
    #[error("the rules public key must be {PUBLIC_KEY_LEN} bytes")]
    BadPublicKey,
    /// The bytes are not a signed ruleset (truncated, too long, garbage).
    #[error("not a signed ruleset: {0}")]
    Malformed(WireError),
    /// The signature does not verify with the public key: tampered, or signed by another key.
    #[error("the ruleset's signature does not verify")]
    BadSignature,
    /// Correctly signed, but the payload breaks the format (a coordinator bug).
    #[error("the signed ruleset is invalid: {0}")]
    Invalid(WireError),
    /// The ruleset is older than the installed one.
    #[error("ruleset version {offered} is older than the installed version {installed}")]
    Rollback {
        /// The installed version.
        installed: u64,
        /// The refused version.
        offered: u64,
    },
    /// The ruleset has no slot of this name.
    #[error("the ruleset has no such slot")]
    UnknownSlot,
    /// The context is out of range (hour ≥ 24, minute ≥ 60, weekday ≥ 7).
    #[error("invalid context: {0}")]
    InvalidContext(&'static str),
}

/// What the app knows about the moment: local time, weekday, and optionally a coarse
/// location and the device type. It never leaves the device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Context {
    /// Local hour, 0–23.
    pub hour: u8,
    /// Local minute, 0–59.
    pub minute: u8,
    /// Local weekday, 0 = Monday … 6 = Sunday.
    pub weekday: u8,
    /// A coarse location (a city, a region), if the app shares one.
    pub location: Option<String>,
    /// The device type (`phone`, `tablet`, `tv`, …), if the app shares one.
    pub device_type: Option<String>,
}

impl Context {
    /// A context at `hour:minute` on `weekday` (0 = Monday), without location or device type.
    pub fn at(hour: u8, minute: u8, weekday: u8) -> Context {
        Context { hour, minute, weekday, location: None, device_type: None }
    }

    /// Minutes since midnight, after checking the ranges.
    fn minute_of_day(&self) -> Result<u16, RulesError> {
        if self.hour >= 24 {
            return Err(RulesError::InvalidContext("the hour must be 0 to 23"));
        }
        if self.minute >= 60 {
            return Err(RulesError::InvalidContext("the minute must be 0 to 59"));
        }
        if self.weekday >= 7 {
            return Err(RulesError::InvalidContext("the weekday must be 0 (Monday) to 6 (Sunday)"));
        }
        Ok(u16::from(self.hour) * 60 + u16::from(self.minute))
    }
}

/// How many of the device's events fall in an activity window. The SDK implements it from
/// its local log; evaluation only reads it.
pub trait Activity {
    /// Events of `window.kind` (any kind if `None`) in the last `window.hours` hours.
    fn count(&self, window: ActivityWindow) -> u32;
}

impl<F: Fn(ActivityWindow) -> u32> Activity for F {
    fn count(&self, window: ActivityWindow) -> u32 {
        self(window)
    }
}

/// Activity counts computed ahead of evaluation for the windows a ruleset mentions
/// ([`VerifiedRuleset::activity_windows`]). A window it was not computed for counts 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivityCounts {
    counts: BTreeMap<ActivityWindow, u32>,
}

impl ActivityCounts {
    /// Counts `events` — `(event kind code, timestamp in Unix seconds)` pairs, as
    /// `EventKind::code` gives them — for each window, at time `now_s`: an event counts when
    /// `timestamp ≥ now_s − hours · 3600` (an event stamped in the future counts as now).
    pub fn from_events(
        windows: &[ActivityWindow],
        now_s: i64,
        events: impl IntoIterator<Item = (u32, i64)>,
    ) -> ActivityCounts {
        let mut counts: BTreeMap<ActivityWindow, u32> = windows.iter().map(|w| (*w, 0)).collect();
        for (kind, timestamp) in events {
            for (window, count) in &mut counts {
                let since = now_s.saturating_sub(i64::from(window.hours) * 3600);
                if window.kind.is_none_or(|k| k == kind) && timestamp >= since {
                    *count = count.saturating_add(1);
                }
            }
        }
        ActivityCounts { counts }
    }
}

impl Activity for ActivityCounts {
    fn count(&self, window: ActivityWindow) -> u32 {
        self.counts.get(&window).copied().unwrap_or(0)
    }
}

/// Everything a rule can look at: the app's context, the SDK's segment and activity.
#[derive(Clone, Copy)]
pub struct EvalContext<'a> {
    /// What the app supplied.
    pub context: &'a Context,
    /// The device's segment, if it has one.
    pub segment: Option<u32>,
    /// The device's recent activity.
    pub activity: &'a dyn Activity,
}

impl std::fmt::Debug for EvalContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalContext")
            .field("context", self.context)
            .field("segment", &self.segment)
            .finish_non_exhaustive()
    }
}

/// A ruleset whose signature was checked: only [`verify`] and [`verify_update`] build one.
#[derive(Debug, Clone)]
pub struct VerifiedRuleset {
    version: u64,
    /// The signed bytes, to store and verify again later.
    signed: Vec<u8>,
    slots: BTreeMap<String, CompiledSlot>,
    windows: Vec<ActivityWindow>,
}

/// A slot ready for evaluation: rules in evaluation order, strings lowercased.
#[derive(Debug, Clone)]
struct CompiledSlot {
    default: String,
    rules: Vec<(String, Vec<Condition>)>,
}

/// Verifies `signed` (a [`SignedRuleset::to_bytes`] encoding) with the coordinator's rules
/// `public_key` (32 bytes): the signature first, then the payload is parsed and validated.
pub fn verify(signed: &[u8], public_key: &[u8]) -> Result<VerifiedRuleset, RulesError> {
    if public_key.len() != PUBLIC_KEY_LEN {
        return Err(RulesError::BadPublicKey);
    }
    let envelope = SignedRuleset::from_bytes(signed).map_err(RulesError::Malformed)?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&signing_input(&envelope.payload), &envelope.signature)
        .map_err(|_| RulesError::BadSignature)?;
    let ruleset = Ruleset::from_payload(&envelope.payload).map_err(RulesError::Invalid)?;
    Ok(VerifiedRuleset::compile(ruleset, signed.to_vec()))
}

/// [`verify`], then refuses a ruleset older than `installed` (the installed version, if
/// any). The same version again is accepted (a re-install).
pub fn verify_update(
    signed: &[u8],
    public_key: &[u8],
    installed: Option<u64>,
) -> Result<VerifiedRuleset, RulesError> {
    let ruleset = verify(signed, public_key)?;
    match installed {
        Some(installed) if ruleset.version < installed => {
            Err(RulesError::Rollback { installed, offered: ruleset.version })
        }
        _ => Ok(ruleset),
    }
}

impl VerifiedRuleset {
    fn compile(ruleset: Ruleset, signed: Vec<u8>) -> VerifiedRuleset {
        let windows = ruleset.activity_windows();
        let slots = ruleset
            .slots
            .into_iter()
            .map(|slot| {
                let mut rules = slot.rules;
                // Stable: among equal priorities the earlier rule stays first.
                rules.sort_by_key(|r| std::cmp::Reverse(r.priority));
                let rules = rules
                    .into_iter()
                    .map(|r| (r.variant, r.conditions.into_iter().map(lowercase).collect()))
                    .collect();
                (slot.name, CompiledSlot { default: slot.default, rules })
            })
            .collect();
        VerifiedRuleset { version: ruleset.version, signed, slots, windows }
    }

    /// The ruleset's version (for rollback checks and for asking the coordinator).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The signed bytes this was verified from: what a device stores and verifies again.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.signed
    }

    /// The slot names, sorted.
    pub fn slot_names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    /// The activity windows the rules mention, each once: what [`ActivityCounts::from_events`] needs.
    pub fn activity_windows(&self) -> &[ActivityWindow] {
        &self.windows
    }

    /// The variant for `slot` in `ctx`: that of the highest-priority rule (the earliest
    /// among equals) whose conditions all hold, else the slot's default.
    pub fn choose(&self, slot: &str, ctx: &EvalContext<'_>) -> Result<&str, RulesError> {
        let minute = ctx.context.minute_of_day()?;
        let slot = self.slots.get(slot).ok_or(RulesError::UnknownSlot)?;
        let location = ctx.context.location.as_deref().map(str::to_lowercase);
        let device_type = ctx.context.device_type.as_deref().map(str::to_lowercase);
        let holds = |c: &Condition| match c {
            Condition::Segment(ids) => ctx.segment.is_some_and(|s| ids.contains(&s)),
            Condition::TimeOfDay { start, end } => in_range(minute, *start, *end),
            Condition::Weekdays(mask) => mask & (1 << ctx.context.weekday) != 0,
            Condition::Location(set) => location.as_ref().is_some_and(|l| set.contains(l)),
            Condition::DeviceType(set) => device_type.as_ref().is_some_and(|d| set.contains(d)),
            Condition::Activity { window, bound } => bound.holds(ctx.activity.count(*window)),
        };
        let chosen = slot.rules.iter().find(|(_, conditions)| conditions.iter().all(holds));
        Ok(chosen.map_or(slot.default.as_str(), |(variant, _)| variant.as_str()))
    }
}

/// Whether `minute` is in `[start, end)`, wrapping past midnight when `end < start`.
fn in_range(minute: u16, start: u16, end: u16) -> bool {
    debug_assert!(start < MINUTES_PER_DAY && end < MINUTES_PER_DAY);
    if start <= end { (start..end).contains(&minute) } else { minute >= start || minute < end }
}

/// The condition with its strings lowercased, for case-insensitive matching.
fn lowercase(c: Condition) -> Condition {
    let lower = |set: Vec<String>| set.iter().map(|s| s.to_lowercase()).collect();
    match c {
        Condition::Location(set) => Condition::Location(lower(set)),
        Condition::DeviceType(set) => Condition::DeviceType(lower(set)),
        other => other,
    }
}

/// What the coordinator had for a device.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Fetched {
    /// A newer (or first) ruleset, verified.
    Updated(VerifiedRuleset),
    /// The device already holds the coordinator's version.
    Unchanged,
    /// The coordinator has no ruleset; the device keeps what it has.
    NoRuleset,
}

/// Why [`fetch`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The exchange failed or the coordinator refused it.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The coordinator's ruleset was refused.
    #[error(transparent)]
    Rules(#[from] RulesError),
}

/// Asks the coordinator for its ruleset over a new QUIC session of `device`, telling it the
/// `installed` version, and verifies what comes back with `public_key` ([`verify_update`]).
pub async fn fetch(
    device: &Device,
    public_key: &[u8],
    installed: Option<u64>,
) -> Result<Fetched, FetchError> {
    let request = Request::FetchRules(fedrec_shared::wire::rules::FetchRules {
        token: device.check_in().token,
        have_version: installed,
    });
    let session = device.connect().await?;
    let response = session.request(&request).await;
    session.close();
    let response = response?;
    let retry_after = response.error_retry_after();
    match response {
        Response::Rules(RulesAnswer::Ruleset(signed)) => {
            let bytes = signed.to_bytes().map_err(NetError::PeerMisbehaved)?;
            Ok(Fetched::Updated(verify_update(&bytes, public_key, installed)?))
        }
        Response::Rules(RulesAnswer::Unchanged { .. }) => Ok(Fetched::Unchanged),
        Response::Rules(RulesAnswer::NoRuleset) => Ok(Fetched::NoRuleset),
        Response::Error { code, message, .. } => Err(NetError::Refused { code, message, retry_after }.into()),
        _ => Err(NetError::PeerMisbehaved(WireError::Invalid(
            "the answer to a rules request is not a rules answer".into(),
        ))
        .into()),
    }
}
