//! The wire format of a context ruleset: what the operator publishes, the coordinator signs, and devices verify and evaluate on their own context.
//!
//! # Format
//!
//! A [`Ruleset`] has a `version` (monotonic: every publication increases it) and a list of
//! [`Slot`]s. A slot is a place in the app where content varies (a banner, a home layout);
//! it has a `default` variant and [`Rule`]s. A rule names a `variant`, a `priority` (higher
//! wins; among equal priorities the earlier rule wins) and [`Condition`]s, which must all
//! hold. A slot's answer is the variant of the winning rule whose conditions all hold, or
//! the default when none does.
//!
//! Conditions (all on the device's own context, which never leaves it):
//!
//! - [`Condition::Segment`]: the device's segment id is in the set;
//! - [`Condition::TimeOfDay`]: the local time, in minutes since midnight, is in
//!   `[start, end)`; when `end < start` the range wraps past midnight (`22:00–06:00`);
//! - [`Condition::Weekdays`]: the local weekday is in the set, a bit mask with bit 0 for
//!   Monday through bit 6 for Sunday;
//! - [`Condition::Location`] and [`Condition::DeviceType`]: the coarse location string (a
//!   city, a region) or the device type (`phone`, `tablet`, `tv`, …) is in the set. Matching
//!   is exact but case-insensitive (Unicode lowercase on both sides; no trimming);
//! - [`Condition::Activity`]: the number of the device's events of one kind (or of any kind)
//!   in the last `hours` hours is at least, or at most, a threshold.
//!
//! Every length and count is bounded ([`MAX_SLOTS`], [`MAX_RULES_PER_SLOT`],
//! [`MAX_CONDITIONS_PER_RULE`], [`MAX_SET_LEN`], [`MAX_SLOT_NAME_LEN`], [`MAX_VARIANT_LEN`],
//! [`MAX_VALUE_LEN`], [`MAX_ACTIVITY_HOURS`]), and the encoded ruleset is at most
//! [`MAX_RULESET_LEN`] bytes: [`Ruleset::validate`] checks it all, and both the publisher and
//! the device run it.
//!
//! # Signing
//!
//! The payload is the postcard encoding of the [`Ruleset`] ([`Ruleset::to_payload`]). A
//! [`SignedRuleset`] is the payload and an Ed25519 signature over
//! [`RULES_SIGNATURE_DOMAIN`] followed by the payload ([`signing_input`]); the domain prefix
//! keeps a signature over a ruleset from being valid for anything else the key might sign.
//! Its stand-alone encoding ([`SignedRuleset::to_bytes`]: postcard, the payload then the
//! signature, each a byte string) is what the coordinator stores and what a device keeps.
//! A device checks the signature *before* it parses the payload.
//!
//! # Distribution
//!
//! A device asks with [`FetchRules`] (request index 2; its enrollment token and the version
//! it holds) and the coordinator answers with a [`RulesAnswer`] (response index 5).

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::WireError;
use super::messages::byte_string;

/// What a ruleset signature covers before the payload: a signature made for rulesets is
/// good for nothing else. A new payload format would come with a new prefix.
pub const RULES_SIGNATURE_DOMAIN: &[u8] = b"fedrec-rules-v1\0";
/// Longest ruleset payload, in bytes.
pub const MAX_RULESET_LEN: usize = 32 * 1024;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Longest stand-alone encoding of a signed ruleset: the payload, the signature and their
/// two length varints (at most 3 bytes each).
pub const MAX_SIGNED_RULESET_LEN: usize = MAX_RULESET_LEN + SIGNATURE_LEN + 6;
/// Most slots in a ruleset.
pub const MAX_SLOTS: usize = 64;
/// Most rules in a slot.
pub const MAX_RULES_PER_SLOT: usize = 64;
/// Most conditions in a rule.
pub const MAX_CONDITIONS_PER_RULE: usize = 16;
/// Most members of a condition's set (segments, locations, device types).
pub const MAX_SET_LEN: usize = 64;
/// Longest slot name, in bytes.
pub const MAX_SLOT_NAME_LEN: usize = 64;
/// Longest variant, in bytes.
pub const MAX_VARIANT_LEN: usize = 128;
/// Longest location or device type in a condition, in bytes.
pub const MAX_VALUE_LEN: usize = 64;
/// Longest activity window, in hours (a year).
pub const MAX_ACTIVITY_HOURS: u32 = 366 * 24;
/// Minutes in a day: times of day are `0..MINUTES_PER_DAY`.
pub const MINUTES_PER_DAY: u16 = 24 * 60;
/// Largest event kind code an activity condition may name: the SDK's codes are 0 view,
/// 1 click, 2 purchase, 3 rating, and `256 + n` for app-defined kind `n` (`n` < 256).
pub const MAX_EVENT_KIND_CODE: u32 = 511;

/// A set of content rules, one entry per slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ruleset {
    /// Increases with every publication; devices refuse to go back to an older one.
    pub version: u64,
    /// The slots, with distinct names.
    pub slots: Vec<Slot>,
}

/// One place in the app whose content varies by context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// The name the app asks for (≤ [`MAX_SLOT_NAME_LEN`] bytes, not empty).
    pub name: String,
    /// The variant when no rule holds (≤ [`MAX_VARIANT_LEN`] bytes, not empty).
    pub default: String,
    /// The rules (≤ [`MAX_RULES_PER_SLOT`]).
    pub rules: Vec<Rule>,
}

/// A variant and when to show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Higher wins; among equal priorities, the earlier rule.
    pub priority: i32,
    /// The variant (≤ [`MAX_VARIANT_LEN`] bytes, not empty).
    pub variant: String,
    /// Conditions that must all hold (≤ [`MAX_CONDITIONS_PER_RULE`]; none = always).
    pub conditions: Vec<Condition>,
}

/// A condition on the device's context. The variant order is the wire's variant index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    /// Index 0: the device's segment is one of these ids.
    Segment(Vec<u32>),
    /// Index 1: the local time of day, in minutes since midnight, is in `[start, end)`,
    /// wrapping past midnight when `end < start`. Both are below [`MINUTES_PER_DAY`] and
    /// differ (a condition that always holds is no condition).
    TimeOfDay {
        /// First minute of the range.
        start: u16,
        /// First minute after the range.
        end: u16,
    },
    /// Index 2: the local weekday is in this bit mask (bit 0 Monday … bit 6 Sunday; not 0).
    Weekdays(u8),
    /// Index 3: the coarse location is one of these (case-insensitive).
    Location(Vec<String>),
    /// Index 4: the device type is one of these (case-insensitive).
    DeviceType(Vec<String>),
    /// Index 5: recent activity compared with a threshold.
    Activity {
        /// Which events, over how long.
        window: ActivityWindow,
        /// The comparison.
        bound: ActivityBound,
    },
}

/// Events of one kind (or all) over the last `hours` hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ActivityWindow {
    /// An event kind code (≤ [`MAX_EVENT_KIND_CODE`], see there), or `None` for every kind.
    pub kind: Option<u32>,
    /// The window's length, `1..=`[`MAX_ACTIVITY_HOURS`].
    pub hours: u32,
}

/// How an activity count is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActivityBound {
    /// Index 0: the count is at least this.
    AtLeast(u32),
    /// Index 1: the count is at most this.
    AtMost(u32),
}

impl ActivityBound {
    /// Whether `count` satisfies the bound.
    pub fn holds(self, count: u32) -> bool {
        match self {
            ActivityBound::AtLeast(n) => count >= n,
            ActivityBound::AtMost(n) => count <= n,
        }
    }
}

impl Ruleset {
    /// Checks every bound of the format (see the module documentation) except the encoded
    /// length, which [`Ruleset::to_payload`] and [`Ruleset::from_payload`] check.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.slots.len() > MAX_SLOTS {
            return Err(invalid(format!("{} slots, at most {MAX_SLOTS} are allowed", self.slots.len())));
        }
        let mut names = HashSet::with_capacity(self.slots.len());
        for (slot_idx, slot) in self.slots.iter().enumerate() {
            let at = |what: &str| format!("slot {slot_idx}: {what}");
            check_str(&at("name"), &slot.name, MAX_SLOT_NAME_LEN)?;
            if !names.insert(slot.name.as_str()) {
                return Err(invalid(at("the name is used by an earlier slot")));
            }
            check_str(&at("default"), &slot.default, MAX_VARIANT_LEN)?;
            if slot.rules.len() > MAX_RULES_PER_SLOT {
                return Err(invalid(at(&format!(
                    "{} rules, at most {MAX_RULES_PER_SLOT} are allowed",
                    slot.rules.len()
                ))));
            }
            for (rule_idx, rule) in slot.rules.iter().enumerate() {
                let at = |what: &str| format!("slot {slot_idx}, rule {rule_idx}: {what}");
                check_str(&at("variant"), &rule.variant, MAX_VARIANT_LEN)?;
                if rule.conditions.len() > MAX_CONDITIONS_PER_RULE {
                    return Err(invalid(at(&format!(
                        "{} conditions, at most {MAX_CONDITIONS_PER_RULE} are allowed",
                        rule.conditions.len()
                    ))));
                }
                for c in &rule.conditions {
                    c.validate().map_err(|e| invalid(at(&e)))?;
                }
            }
        }
        Ok(())
    }

    /// The payload that gets signed: the postcard encoding, after [`Ruleset::validate`] and
    /// within [`MAX_RULESET_LEN`].
    pub fn to_payload(&self) -> Result<Vec<u8>, WireError> {
        self.validate()?;
        let payload = postcard::to_allocvec(self)
            .expect("postcard writes wire types, whose lengths are all known, into a Vec without error");
        check_payload_len(payload.len())?;
        Ok(payload)
    }

    /// Decodes a payload (after its signature was checked) and validates it.
    pub fn from_payload(payload: &[u8]) -> Result<Ruleset, WireError> {
        check_payload_len(payload.len())?;
        let ruleset: Ruleset = decode_all(payload)?;
        ruleset.validate()?;
        Ok(ruleset)
    }

    /// Every activity window the rules mention, each once, in order: what a device counts
    /// before it evaluates.
    pub fn activity_windows(&self) -> Vec<ActivityWindow> {
        let mut windows: Vec<ActivityWindow> = self
            .slots
            .iter()
            .flat_map(|s| &s.rules)
            .flat_map(|r| &r.conditions)
            .filter_map(|c| match c {
                Condition::Activity { window, .. } => Some(*window),
                _ => None,
            })
            .collect();
        windows.sort_unstable();
        windows.dedup();
        windows
    }
}

impl Condition {
    /// This condition's bounds; the error says which, without the values.
    fn validate(&self) -> Result<(), String> {
        let set_len = |what: &str, n: usize| {
            if n == 0 {
                Err(format!("an empty {what} set never matches"))
            } else if n > MAX_SET_LEN {
                Err(format!("{n} {what}s, at most {MAX_SET_LEN} are allowed"))
            } else {
                Ok(())
            }
        };
        match self {
            Condition::Segment(ids) => set_len("segment", ids.len()),
            Condition::TimeOfDay { start, end } => {
                if *start >= MINUTES_PER_DAY || *end >= MINUTES_PER_DAY {
                    Err(format!("a time of day must be below {MINUTES_PER_DAY} minutes"))
                } else if start == end {
                    Err("a time range must not be empty".to_owned())
                } else {
                    Ok(())
                }
            }
            Condition::Weekdays(mask) => {
                if *mask == 0 || *mask >= 1 << 7 {
                    Err("a weekday mask must name at least one of the 7 days and nothing else".to_owned())
                } else {
                    Ok(())
                }
            }
            Condition::Location(values) | Condition::DeviceType(values) => {
                let what = if matches!(self, Condition::Location(_)) { "location" } else { "device type" };
                set_len(what, values.len())?;
                values.iter().try_for_each(|v| {
                    if v.is_empty() || v.len() > MAX_VALUE_LEN {
                        Err(format!("a {what} must have 1 to {MAX_VALUE_LEN} bytes"))
                    } else {
                        Ok(())
                    }
                })
            }
            Condition::Activity { window, .. } => {
                if window.hours == 0 || window.hours > MAX_ACTIVITY_HOURS {
                    Err(format!("an activity window must last 1 to {MAX_ACTIVITY_HOURS} hours"))
                } else if window.kind.is_some_and(|k| k > MAX_EVENT_KIND_CODE) {
                    Err(format!("an event kind code must be at most {MAX_EVENT_KIND_CODE}"))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The bytes an Ed25519 ruleset signature covers: [`RULES_SIGNATURE_DOMAIN`], then `payload`.
pub fn signing_input(payload: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(RULES_SIGNATURE_DOMAIN.len() + payload.len());
    input.extend_from_slice(RULES_SIGNATURE_DOMAIN);
    input.extend_from_slice(payload);
    input
}

/// A ruleset payload and its signature. Holding one proves nothing: a device verifies the
/// signature before it reads the payload.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRuleset {
    /// The postcard encoding of a [`Ruleset`] (≤ [`MAX_RULESET_LEN`] bytes).
    #[serde(with = "byte_string")]
    pub payload: Vec<u8>,
    /// Ed25519 over [`signing_input`]`(payload)` ([`SIGNATURE_LEN`] bytes).
    #[serde(with = "byte_string")]
    pub signature: Vec<u8>,
}

impl fmt::Debug for SignedRuleset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedRuleset")
            .field("payload", &format_args!("<{} bytes>", self.payload.len()))
            .field("signature", &format_args!("<{} bytes>", self.signature.len()))
            .finish()
    }
}

impl SignedRuleset {
    /// Checks the lengths: a payload within [`MAX_RULESET_LEN`], a signature of [`SIGNATURE_LEN`].
    pub fn check(&self) -> Result<(), WireError> {
        check_payload_len(self.payload.len())?;
        if self.signature.len() != SIGNATURE_LEN {
            return Err(invalid(format!(
                "a ruleset signature has {} bytes, not {SIGNATURE_LEN}",
                self.signature.len()
            )));
        }
        Ok(())
    }

    /// The stand-alone encoding (what the coordinator stores and a device keeps).
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        self.check()?;
        Ok(postcard::to_allocvec(self)
            .expect("postcard writes wire types, whose lengths are all known, into a Vec without error"))
    }

    /// Decodes [`SignedRuleset::to_bytes`]'s encoding, refusing anything longer than
    /// [`MAX_SIGNED_RULESET_LEN`] before parsing, trailing bytes, and wrong lengths. The
    /// signature is not checked here.
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedRuleset, WireError> {
        if bytes.len() > MAX_SIGNED_RULESET_LEN {
            return Err(WireError::TooLarge { len: bytes.len(), limit: MAX_SIGNED_RULESET_LEN });
        }
        let signed: SignedRuleset = decode_all(bytes)?;
        signed.check()?;
        Ok(signed)
    }
}

/// A device asks for the current ruleset (request index 2).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRules {
    /// The device's enrollment token, as in a check-in (≤ [`super::MAX_TOKEN_LEN`] bytes):
    /// rules are not secret, but only enrolled devices may load the coordinator.
    #[serde(with = "byte_string")]
    pub token: Vec<u8>,
    /// The version of the ruleset the device holds, if any.
    pub have_version: Option<u64>,
}

/// The token is a credential: `Debug` shows only its length.
impl fmt::Debug for FetchRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchRules")
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("have_version", &self.have_version)
            .finish()
    }
}

/// The coordinator's answer to [`FetchRules`] (response index 5). The variant order is the
/// wire's variant index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RulesAnswer {
    /// Index 0: the current signed ruleset.
    Ruleset(SignedRuleset),
    /// Index 1: the device already holds the current version.
    Unchanged {
        /// The current version.
        version: u64,
    },
    /// Index 2: the coordinator has no ruleset to give.
    NoRuleset,
}

fn check_payload_len(len: usize) -> Result<(), WireError> {
    if len > MAX_RULESET_LEN {
        return Err(WireError::TooLarge { len, limit: MAX_RULESET_LEN });
    }
    Ok(())
}

fn check_str(what: &str, s: &str, max: usize) -> Result<(), WireError> {
    if s.is_empty() || s.len() > max {
        return Err(invalid(format!("{what} must have 1 to {max} bytes")));
    }
    Ok(())
}

fn invalid(message: String) -> WireError {
    WireError::Invalid(message)
}

/// Postcard decoding that must use every byte.
fn decode_all<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let (value, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!("{} bytes after the end of the message", rest.len())));
    }
    Ok(value)
}
