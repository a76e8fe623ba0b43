//! Context rules on the coordinator: the Ed25519 key that signs rulesets, the operator's TOML rules file, publication into the state directory, and the answer to a device's fetch.
//!
//! # Files in the state directory
//!
//! - [`RULES_KEY_FILE`]: the signing key, PKCS#8 (DER), mode 0600. `fedrec-coordinator init`
//!   creates it; publishing creates it in a state directory made before rules existed.
//! - [`RULES_PUBLIC_KEY_FILE`]: its public key, the raw 32 bytes, for apps to embed.
//! - [`RULES_FILE`]: the current signed ruleset ([`SignedRuleset::to_bytes`]), replaced
//!   atomically by every publication; `serve` loads it at start.
//!
//! # Versions
//!
//! A ruleset's version is its publication time in microseconds since the UNIX epoch, or one
//! more than the stored version if the clock is not past it (a clock set back): versions
//! strictly increase. Devices refuse a version older than the one they hold, so versions must
//! never go back, not even when [`RULES_FILE`] is deleted or restored from an older backup —
//! then the clock alone keeps them increasing. Microseconds rather than seconds so that a
//! publication right after such a loss still gets a newer version than the lost one.
//!
//! # The operator's rules file
//!
//! ```
//! # use fedrec_shared::wire::rules::{ActivityBound, Condition};
//! let slots = fedrec_coordinator::rules::parse_rules(r#"
//! [[slot]]
//! name = "home_banner"          # what the app asks for
//! default = "generic"           # when no rule holds
//!
//! [[slot.rule]]
//! variant = "late_night"
//! priority = 10                 # higher wins; ties go to the earlier rule (default 0)
//! time = "22:00-06:00"          # local [start, end), may wrap past midnight
//! weekdays = ["fri", "sat"]     # mon … sun (or monday … sunday)
//! segments = [0, 3]             # segment ids
//! locations = ["Berlin"]        # coarse location, exact but case-insensitive
//! device_types = ["phone", "tablet"]
//! activity = [                  # events in the last `hours` hours
//!   { kind = "purchase", hours = 168, at_least = 1 },
//!   { kind = "any", hours = 24, at_least = 2, at_most = 50 },
//! ]
//! "#)?;
//! let conditions = &slots[0].rules[0].conditions;
//! assert_eq!(conditions.len(), 8, "segments, time, weekdays, locations, device types, 3 activity bounds");
//! assert_eq!(conditions[1], Condition::TimeOfDay { start: 22 * 60, end: 6 * 60 });
//! assert_eq!(conditions[2], Condition::Weekdays(0b011_0000));
//! assert!(matches!(conditions[7], Condition::Activity { bound: ActivityBound::AtMost(50), .. }));
//! # Ok::<(), fedrec_coordinator::rules::RulesError>(())
//! ```
//!
//! Every key of a rule but `variant` is optional; a rule without conditions always holds.
//! Activity kinds are `any`, `view`, `click`, `purchase`, `rating` or `custom:N` (the SDK's
//! app-defined kind `N`, 0–255); an entry needs `at_least`, `at_most` or both. Unknown keys
//! are errors, so a typo cannot silently drop a condition.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use fedrec_shared::wire::rules::RulesAnswer;
use fedrec_shared::wire::rules::{
    ActivityBound, ActivityWindow, Condition, MINUTES_PER_DAY, Rule, Ruleset, SignedRuleset, Slot,
    signing_input,
};
use fedrec_shared::wire::{Response, WireError};
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::Deserialize;

/// The rules signing key (PKCS#8, DER, mode 0600).
pub const RULES_KEY_FILE: &str = "rules_signing.key";
/// The rules signing key's public half: 32 raw bytes.
pub const RULES_PUBLIC_KEY_FILE: &str = "rules_signing.pub";
/// The current signed ruleset.
pub const RULES_FILE: &str = "rules.signed";

/// Why a rules operation failed. Messages name files and settings, never devices.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RulesError {
    /// A file could not be read or written.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was attempted (`read`, `write`, …).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The rules file is not TOML of the documented format.
    #[error("invalid rules file: {0}")]
    Parse(#[from] Box<toml::de::Error>),
    /// The rules break a bound or rule of the format.
    #[error("invalid rules: {0}")]
    Invalid(String),
    /// The signing key already exists (creating one would orphan every app that embeds it).
    #[error("{} already exists: refusing to replace the rules signing key", .0.display())]
    KeyExists(PathBuf),
    /// The signing key file is not an Ed25519 PKCS#8 key, or the system RNG failed.
    #[error("rules signing key: {0}")]
    Key(&'static str),
    /// The stored ruleset does not carry a valid signature by this directory's key.
    #[error("{} is not a ruleset signed by this directory's key", .0.display())]
    Corrupt(PathBuf),
}

impl From<WireError> for RulesError {
    fn from(e: WireError) -> Self {
        RulesError::Invalid(e.to_string())
    }
}

/// The Ed25519 key that signs rulesets.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

/// The private key stays out of logs: `Debug` shows the public key only.
impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("public_key", &hex(&self.public_key())).finish()
    }
}

impl SigningKey {
    /// Draws a new key and writes [`RULES_KEY_FILE`] (mode 0600) and [`RULES_PUBLIC_KEY_FILE`]
    /// into `dir`; refuses if the key file exists.
    pub fn create(dir: &Path) -> Result<SigningKey, RulesError> {
        let path = dir.join(RULES_KEY_FILE);
        if path.exists() {
            return Err(RulesError::KeyExists(path));
        }
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| RulesError::Key("the system RNG failed"))?;
        let key = SigningKey::from_pkcs8(pkcs8.as_ref())?;
        write_atomic(&dir.join(RULES_PUBLIC_KEY_FILE), &key.public_key(), 0o644)?;
        // The private key last: its presence marks a complete pair.
        write_atomic(&path, pkcs8.as_ref(), 0o600)?;
        Ok(key)
    }

    /// Reads `dir`'s key.
    pub fn load(dir: &Path) -> Result<SigningKey, RulesError> {
        let path = dir.join(RULES_KEY_FILE);
        let bytes = std::fs::read(&path).map_err(|source| RulesError::Io { action: "read", path, source })?;
        SigningKey::from_pkcs8(&bytes)
    }

    /// Reads `dir`'s key, or creates one if the directory has none (a state directory made
    /// before rules existed).
    pub fn load_or_create(dir: &Path) -> Result<SigningKey, RulesError> {
        if dir.join(RULES_KEY_FILE).exists() { SigningKey::load(dir) } else { SigningKey::create(dir) }
    }

    fn from_pkcs8(bytes: &[u8]) -> Result<SigningKey, RulesError> {
        let pair =
            Ed25519KeyPair::from_pkcs8(bytes).map_err(|_| RulesError::Key("not an Ed25519 PKCS#8 key"))?;
        Ok(SigningKey { pair })
    }

    /// The public key devices verify with (32 bytes).
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// Validates, encodes and signs `ruleset`.
    pub fn sign(&self, ruleset: &Ruleset) -> Result<SignedRuleset, RulesError> {
        let payload = ruleset.to_payload()?;
        let signature = self.pair.sign(&signing_input(&payload)).as_ref().to_vec();
        Ok(SignedRuleset { payload, signature })
    }
}

/// A signed ruleset this coordinator published, with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedRuleset {
    version: u64,
    signed: SignedRuleset,
}

impl PublishedRuleset {
    /// Reads `dir`'s [`RULES_FILE`], checking it against `dir`'s [`RULES_PUBLIC_KEY_FILE`]
    /// (so a server that only serves need not hold the private key); `None` if nothing was
    /// published yet.
    pub fn load(dir: &Path) -> Result<Option<PublishedRuleset>, RulesError> {
        if !dir.join(RULES_FILE).exists() {
            return Ok(None);
        }
        let path = dir.join(RULES_PUBLIC_KEY_FILE);
        let public_key =
            std::fs::read(&path).map_err(|source| RulesError::Io { action: "read", path, source })?;
        PublishedRuleset::load_with(dir, &public_key)
    }

    fn load_with(dir: &Path, public_key: &[u8]) -> Result<Option<PublishedRuleset>, RulesError> {
        let path = dir.join(RULES_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RulesError::Io { action: "read", path, source }),
        };
        let corrupt = || RulesError::Corrupt(dir.join(RULES_FILE));
        let signed = SignedRuleset::from_bytes(&bytes).map_err(|_| corrupt())?;
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&signing_input(&signed.payload), &signed.signature)
            .map_err(|_| corrupt())?;
        let ruleset = Ruleset::from_payload(&signed.payload).map_err(|_| corrupt())?;
        Ok(Some(PublishedRuleset { version: ruleset.version, signed }))
    }

    /// The ruleset's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The signed ruleset.
    pub fn signed(&self) -> &SignedRuleset {
        &self.signed
    }
}

/// Parses the operator's rules file (see the module documentation), signs it with a version
/// newer than the one `dir` holds (see [Versions](self#versions)), and replaces `dir`'s
/// [`RULES_FILE`] atomically. Creates the signing key if `dir` has none. A running `serve`
/// picks it up at its next start.
pub fn publish(dir: &Path, rules_toml: &str) -> Result<PublishedRuleset, RulesError> {
    let slots = parse_rules(rules_toml)?;
    let key = SigningKey::load_or_create(dir)?;
    let previous = PublishedRuleset::load_with(dir, &key.public_key())?.map(|p| p.version);
    let version = next_version(previous, SystemTime::now())?;
    let signed = key.sign(&Ruleset { version, slots })?;
    write_atomic(&dir.join(RULES_FILE), &signed.to_bytes()?, 0o644)?;
    Ok(PublishedRuleset { version, signed })
}

/// The version of a ruleset published at `now` after version `previous`: `now` in microseconds
/// since the UNIX epoch, but at least `previous + 1`.
fn next_version(previous: Option<u64>, now: SystemTime) -> Result<u64, RulesError> {
    let after_previous = match previous {
        None => 1,
        Some(v) => v
            .checked_add(1)
            .ok_or_else(|| RulesError::Invalid("the ruleset version cannot grow any more".into()))?,
    };
    // A clock before 1970 counts as 0; one past the year 586 000 as the largest version.
    let micros =
        now.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    Ok(micros.max(after_previous))
}

/// The answer to a device that holds ruleset `have_version` (its token already checked).
pub fn answer(published: Option<&PublishedRuleset>, have_version: Option<u64>) -> Response {
    Response::Rules(match published {
        None => RulesAnswer::NoRuleset,
        Some(p) if have_version == Some(p.version) => RulesAnswer::Unchanged { version: p.version },
        Some(p) => RulesAnswer::Ruleset(p.signed.clone()),
    })
}

/// Lowercase hex, for printing the public key.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    slot: Vec<SlotEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotEntry {
    name: String,
    default: String,
    #[serde(default)]
    rule: Vec<RuleEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    variant: String,
    #[serde(default)]
    priority: i32,
    time: Option<String>,
    weekdays: Option<Vec<String>>,
    segments: Option<Vec<u32>>,
    locations: Option<Vec<String>>,
    device_types: Option<Vec<String>>,
    #[serde(default)]
    activity: Vec<ActivityEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivityEntry {
    kind: String,
    hours: u32,
    at_least: Option<u32>,
    at_most: Option<u32>,
}

/// The slots of an operator's rules file, validated as a ruleset would be.
pub fn parse_rules(text: &str) -> Result<Vec<Slot>, RulesError> {
    let file: RulesFile = toml::from_str(text).map_err(Box::new)?;
    let slots = file
        .slot
        .into_iter()
        .enumerate()
        .map(|(slot_idx, s)| {
            let rules = s
                .rule
                .into_iter()
                .enumerate()
                .map(|(rule_idx, r)| {
                    rule(r).map_err(|e| RulesError::Invalid(format!("slot {slot_idx}, rule {rule_idx}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Slot { name: s.name, default: s.default, rules })
        })
        .collect::<Result<Vec<_>, RulesError>>()?;
    Ruleset { version: 0, slots: slots.clone() }.validate()?;
    Ok(slots)
}

fn rule(r: RuleEntry) -> Result<Rule, String> {
    let mut conditions = Vec::new();
    if let Some(ids) = r.segments {
        conditions.push(Condition::Segment(ids));
    }
    if let Some(time) = r.time {
        let (start, end) = time.split_once('-').ok_or("time must look like \"HH:MM-HH:MM\"")?;
        conditions.push(Condition::TimeOfDay { start: minute_of_day(start)?, end: minute_of_day(end)? });
    }
    if let Some(days) = r.weekdays {
        let mask = days.iter().try_fold(0u8, |mask, d| Ok::<_, String>(mask | 1 << weekday(d)?))?;
        conditions.push(Condition::Weekdays(mask));
    }
    if let Some(locations) = r.locations {
        conditions.push(Condition::Location(locations));
    }
    if let Some(types) = r.device_types {
        conditions.push(Condition::DeviceType(types));
    }
    for a in r.activity {
        let window = ActivityWindow { kind: event_kind(&a.kind)?, hours: a.hours };
        if a.at_least.is_none() && a.at_most.is_none() {
            return Err("an activity entry needs at_least, at_most or both".into());
        }
        let bounds =
            a.at_least.map(ActivityBound::AtLeast).into_iter().chain(a.at_most.map(ActivityBound::AtMost));
        conditions.extend(bounds.map(|bound| Condition::Activity { window, bound }));
    }
    Ok(Rule { priority: r.priority, variant: r.variant, conditions })
}

/// `HH:MM` as minutes since midnight.
fn minute_of_day(s: &str) -> Result<u16, String> {
    let bad = || "a time of day must look like HH:MM, from 00:00 to 23:59".to_owned();
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h >= 24 || m >= 60 {
        return Err(bad());
    }
    let minute = h * 60 + m;
    debug_assert!(minute < MINUTES_PER_DAY);
    Ok(minute)
}

/// A weekday name as its index, Monday 0.
fn weekday(name: &str) -> Result<u8, String> {
    const DAYS: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];
    let lower = name.to_ascii_lowercase();
    DAYS.iter()
        .position(|d| lower.len() >= 3 && d.starts_with(&lower))
        .and_then(|i| u8::try_from(i).ok())
        .ok_or_else(|| "weekdays are mon, tue, wed, thu, fri, sat, sun (or their full names)".to_owned())
}

/// An activity kind name as the SDK's event kind code (`None` for any).
fn event_kind(name: &str) -> Result<Option<u32>, String> {
    let code = match name.to_ascii_lowercase().as_str() {
        "any" => return Ok(None),
        "view" => 0,
        "click" => 1,
        "purchase" => 2,
        "rating" => 3,
        other => match other.strip_prefix("custom:").map(str::parse::<u8>) {
            Some(Ok(n)) => 256 + u32::from(n),
            _ => {
                return Err(
                    "activity kinds are any, view, click, purchase, rating or custom:N (N < 256)".into()
                );
            }
        },
    };
    Ok(Some(code))
}

/// Replaces `path` atomically: a new temporary file in the same directory, created with
/// `mode`, written and synced, renamed over `path`, and the directory synced so that the rename
/// survives a crash.
///
/// A temporary file left by an interrupted write (or anything else at its path, a symlink
/// included) is removed first, and the new one is created exclusively (`O_EXCL`, which follows
/// no symlink): the bytes only ever go into a file this call created with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), RulesError> {
    let io = |action, source| RulesError::Io { action, path: path.to_owned(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("remove the stale temporary file of", e));
        }
        _ => {}
    }
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(|e| io("create", e))?;
    file.write_all(bytes).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("sync", e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| io("rename into", e))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("sync the directory of", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weekday_names_and_prefixes() {
        assert_eq!(weekday("Mon"), Ok(0));
        assert_eq!(weekday("sunday"), Ok(6));
        assert!(weekday("mo").is_err(), "two letters are ambiguous");
        assert!(weekday("funday").is_err());
    }

    #[test]
    fn times_of_day() {
        assert_eq!(minute_of_day("00:00"), Ok(0));
        assert_eq!(minute_of_day("23:59"), Ok(1439));
        assert!(minute_of_day("24:00").is_err());
        assert!(minute_of_day("7").is_err());
    }

    #[test]
    fn event_kinds() {
        assert_eq!(event_kind("any"), Ok(None));
        assert_eq!(event_kind("Purchase"), Ok(Some(2)));
        assert_eq!(event_kind("custom:7"), Ok(Some(263)));
        assert!(event_kind("custom:256").is_err());
        assert!(event_kind("like").is_err());
    }
    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("a temporary directory")
    }

    const ONE_SLOT: &str = "[[slot]]\nname = \"s\"\ndefault = \"d\"\n";

    #[test]
    fn publications_bump_the_version_and_a_corrupt_store_is_an_error() {
        let dir = tmp();
        assert_eq!(PublishedRuleset::load(dir.path()).expect("readable"), None);
        let first = publish(dir.path(), ONE_SLOT).expect("publishes");
        let second = publish(dir.path(), ONE_SLOT).expect("publishes");
        assert!(second.version() > first.version(), "{} after {}", second.version(), first.version());
        assert_eq!(PublishedRuleset::load(dir.path()).expect("readable"), Some(second));
        let path = dir.path().join(RULES_FILE);
        let mut bytes = std::fs::read(&path).expect("stored");
        bytes[3] ^= 1;
        std::fs::write(&path, bytes).expect("writable");
        assert!(matches!(PublishedRuleset::load(dir.path()), Err(RulesError::Corrupt(_))));
        assert!(
            matches!(publish(dir.path(), ONE_SLOT), Err(RulesError::Corrupt(_))),
            "no silent restart at 1"
        );
    }

    #[test]
    fn versions_increase_when_the_stored_ruleset_is_lost_or_restored_from_a_backup() {
        let dir = tmp();
        let path = dir.path().join(RULES_FILE);
        let first = publish(dir.path(), ONE_SLOT).expect("publishes").version();
        let backup = std::fs::read(&path).expect("stored");
        let second = publish(dir.path(), ONE_SLOT).expect("publishes").version();
        std::fs::write(&path, backup).expect("writable");
        let restored = publish(dir.path(), ONE_SLOT).expect("publishes").version();
        assert!(restored > second, "{restored} after {second}, over a restored {first}");
        std::fs::remove_file(&path).expect("stored");
        let lost = publish(dir.path(), ONE_SLOT).expect("publishes").version();
        assert!(lost > restored, "{lost} after {restored}, which was lost");
    }

    #[test]
    fn versions_are_publication_times_in_microseconds_and_survive_a_clock_set_back() {
        let at = |micros| UNIX_EPOCH + std::time::Duration::from_micros(micros);
        let now = 1_790_000_000_123_456;
        assert_eq!(next_version(None, at(now)).expect("a version"), now);
        assert_eq!(next_version(Some(7), at(now)).expect("a version"), now, "old counters jump ahead");
        assert_eq!(next_version(Some(now + 5), at(now)).expect("a version"), now + 6, "a clock set back");
        assert_eq!(next_version(Some(now), at(now)).expect("a version"), now + 1, "the same microsecond");
        let before_1970 = UNIX_EPOCH - std::time::Duration::from_secs(1);
        assert_eq!(next_version(None, before_1970).expect("a version"), 1);
        assert_eq!(next_version(Some(3), before_1970).expect("a version"), 4);
        assert!(matches!(next_version(Some(u64::MAX), at(now)), Err(RulesError::Invalid(_))));
    }

    #[test]
    fn atomic_writes_replace_a_stale_temporary_file_and_follow_no_symlink() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tmp();
        let mode =
            |path: &Path| std::fs::symlink_metadata(path).expect("exists").permissions().mode() & 0o777;
        let key = dir.path().join(RULES_KEY_FILE);
        let tmp_path = dir.path().join(format!("{RULES_KEY_FILE}.tmp"));

        // A world-readable temporary file left behind: the key still gets mode 0600.
        std::fs::write(&tmp_path, b"stale").expect("writable");
        std::fs::set_permissions(&tmp_path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        write_atomic(&key, b"secret", 0o600).expect("writes");
        assert_eq!(std::fs::read(&key).expect("written"), b"secret");
        assert_eq!(mode(&key), 0o600);
        assert!(!tmp_path.exists(), "renamed away");

        // A symlink at the temporary path: its target is left alone.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"untouched").expect("writable");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::os::unix::fs::symlink(&target, &tmp_path).expect("symlink");
        write_atomic(&key, b"secret 2", 0o600).expect("writes");
        assert_eq!(std::fs::read(&target).expect("still there"), b"untouched");
        assert_eq!(mode(&target), 0o644);
        assert_eq!(std::fs::read(&key).expect("written"), b"secret 2");
        assert_eq!(mode(&key), 0o600);
        assert!(!std::fs::symlink_metadata(&key).expect("exists").file_type().is_symlink());
    }

    #[test]
    fn the_key_is_never_replaced() {
        let dir = tmp();
        let key = SigningKey::create(dir.path()).expect("creates");
        assert!(matches!(SigningKey::create(dir.path()), Err(RulesError::KeyExists(_))));
        assert_eq!(SigningKey::load_or_create(dir.path()).expect("loads").public_key(), key.public_key());
        let public = std::fs::read(dir.path().join(RULES_PUBLIC_KEY_FILE)).expect("written");
        assert_eq!(public, key.public_key());
        assert!(!format!("{key:?}").is_empty());
    }

    #[test]
    fn answers_by_the_version_the_device_holds() {
        let dir = tmp();
        let published = publish(dir.path(), ONE_SLOT).expect("publishes");
        let version = published.version();
        assert_eq!(answer(None, Some(version)), Response::Rules(RulesAnswer::NoRuleset));
        assert_eq!(
            answer(Some(&published), Some(version)),
            Response::Rules(RulesAnswer::Unchanged { version })
        );
        let fresh = Response::Rules(RulesAnswer::Ruleset(published.signed().clone()));
        assert_eq!(answer(Some(&published), None), fresh);
        assert_eq!(answer(Some(&published), Some(version - 1)), fresh);
        assert_eq!(answer(Some(&published), Some(version + 1)), fresh, "the device judges rollbacks");
    }

    #[test]
    fn invalid_files_are_refused() {
        let rule = |body: &str| format!("{ONE_SLOT}[[slot.rule]]\nvariant = \"v\"\n{body}\n");
        for body in [
            "time = \"10:00-10:00\"",
            "time = \"10:00\"",
            "weekdays = [\"someday\"]",
            "segments = []",
            "activity = [{ kind = \"any\", hours = 24 }]",
            "activity = [{ kind = \"any\", hours = 0, at_least = 1 }]",
            "colour = \"red\"",
        ] {
            assert!(parse_rules(&rule(body)).is_err(), "{body}");
        }
        assert!(parse_rules(&format!("{ONE_SLOT}{ONE_SLOT}")).is_err(), "two slots of one name");
        assert!(parse_rules("[[slot]]\nname = \"s\"\n").is_err(), "no default");
        assert_eq!(parse_rules("").expect("no slots is a valid, empty ruleset"), vec![]);
    }
}
