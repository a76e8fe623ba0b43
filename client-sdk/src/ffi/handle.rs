//! The `FedrecSdk` and `FedrecCancel` handles and the functions over [`Sdk`]: open, consent, events, inference, rules, participation, export and forget.

use std::ffi::c_char;
use std::net::SocketAddr;
use std::time::Duration;

use fedrec_shared::ModelShape;
use serde_json::json;

use super::{Empty, Failure, FedrecError, Out, bytes_arg, call, give_string, guard, opt_str_arg, str_arg};
use crate::net::{CancelToken, Eligibility, NetConfig, ParticipateOptions, RetryPolicy};
use crate::policy::{PrivacyPolicy, RefusalReason};
use crate::recommend::{RecommendOptions, Source};
use crate::rules::Context;
use crate::sdk::{Consent, ParticipationReport, RoundOutcome, Sdk, SdkConfig};
use crate::signals::{Event, EventKind};

/// An open SDK: one handle over the user's sealed local store. Opaque.
///
/// Created by `fedrec_sdk_open`, freed by `fedrec_sdk_close`. Thread-safe: calls on one
/// handle from several threads are serialised inside the SDK (a running
/// `fedrec_sdk_participate` does not block the others).
#[derive(Debug)]
pub struct FedrecSdk {
    pub(super) sdk: Sdk,
}

/// Cancels a running `fedrec_sdk_participate` from another thread. Opaque.
///
/// Created by `fedrec_cancel_new`, freed by `fedrec_cancel_free`. Once cancelled it stays
/// cancelled: use a new one for the next participation.
#[derive(Debug)]
pub struct FedrecCancel {
    token: CancelToken,
}

/// Event kind: the item was shown or opened (`value` typically 1, or a watched fraction).
pub const FEDREC_EVENT_VIEW: u32 = 0;
/// Event kind: the user clicked or tapped the item.
pub const FEDREC_EVENT_CLICK: u32 = 1;
/// Event kind: the user bought the item.
pub const FEDREC_EVENT_PURCHASE: u32 = 2;
/// Event kind: the user rated the item; `value` is the rating (e.g. 1 to 5 stars).
pub const FEDREC_EVENT_RATING: u32 = 3;
/// Event kinds `FEDREC_EVENT_CUSTOM + n` (n = 0..255) are app-defined.
pub const FEDREC_EVENT_CUSTOM: u32 = 256;

/// How the SDK reaches its coordinator (part of `FedrecOpenOptions`). Every pointer is
/// borrowed for the `fedrec_sdk_open` call only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FedrecCoordinator {
    /// The coordinator's address as `IP:port`, e.g. `"192.0.2.7:4433"` or `"[2001:db8::1]:4433"`.
    pub address: *const c_char,
    /// The name in the coordinator's certificate, e.g. `"localhost"`.
    pub server_name: *const c_char,
    /// The coordinator's certificate (DER), the only one trusted: `cert_der_len` bytes.
    pub cert_der: *const u8,
    /// Length of `cert_der`.
    pub cert_der_len: usize,
    /// The device's enrollment token (a secret): `token_len` bytes.
    pub token: *const u8,
    /// Length of `token`.
    pub token_len: usize,
    /// The largest model the device accepts: catalogue size ...
    pub n_items: u32,
    /// ... factor dimension ...
    pub dim: u32,
    /// ... and number of segments. They bound what is read from the network.
    pub n_segments: u32,
    /// Longest wait for the connection or any response, in milliseconds; 0 = 10 s.
    pub timeout_ms: u32,
}

/// Settings of `fedrec_sdk_open`. Start from `fedrec_open_options_default()`. Every pointer
/// is borrowed for the call only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FedrecOpenOptions {
    /// Most events kept; the oldest are pruned first. 0 = the default (10,000).
    pub max_events: u64,
    /// After this many seconds an event counts half as much. 0 = the default (30 days).
    pub half_life_s: u64,
    /// The coordinator; NULL = offline only (`fedrec_sdk_participate` and
    /// `fedrec_sdk_fetch_ruleset` then fail with the SDK's "not configured" status 9).
    pub coordinator: *const FedrecCoordinator,
    /// The Ed25519 public key rulesets must be signed with (`rules_public_key_len` bytes);
    /// NULL = rulesets are refused.
    pub rules_public_key: *const u8,
    /// Length of `rules_public_key`.
    pub rules_public_key_len: usize,
    /// If the store cannot be opened (wrong key, tampered, corrupt, too new, rolled back),
    /// move it aside in the same folder and start empty instead of failing.
    pub recover: bool,
    /// The device's privacy policy; NULL = `fedrec_privacy_policy_production()`. Lower it
    /// only in tests.
    pub policy: *const FedrecPrivacyPolicy,
}

/// Which training tasks the device accepts (checked before it trains). Start from
/// `fedrec_privacy_policy_production()`. Every ε is stated at `delta`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FedrecPrivacyPolicy {
    /// Smallest noise multiplier accepted (a task without noise has 0).
    pub min_noise_multiplier: f64,
    /// Largest ε one round may cost (may be infinity).
    pub max_epsilon_per_round: f64,
    /// Largest ε the device's own record may reach (may be infinity).
    pub max_total_epsilon: f64,
    /// The δ of every ε here, in (0, 1).
    pub delta: f64,
    /// Smallest cohort accepted (`q · population`, else the round's minimum reports).
    pub min_cohort: u64,
    /// Refuse first-come selection.
    pub require_sampling: bool,
    /// Refuse rounds without secure aggregation.
    pub require_secure_aggregation: bool,
    /// Refuse rounds whose noise is not added on the devices (distributed noise).
    pub require_distributed_noise: bool,
}

impl From<PrivacyPolicy> for FedrecPrivacyPolicy {
    fn from(p: PrivacyPolicy) -> Self {
        Self {
            min_noise_multiplier: p.min_noise_multiplier,
            max_epsilon_per_round: p.max_epsilon_per_round,
            max_total_epsilon: p.max_total_epsilon,
            delta: p.delta,
            min_cohort: p.min_cohort,
            require_sampling: p.require_sampling,
            require_secure_aggregation: p.require_secure_aggregation,
            require_distributed_noise: p.require_distributed_noise,
        }
    }
}

impl From<FedrecPrivacyPolicy> for PrivacyPolicy {
    fn from(p: FedrecPrivacyPolicy) -> Self {
        Self {
            min_noise_multiplier: p.min_noise_multiplier,
            max_epsilon_per_round: p.max_epsilon_per_round,
            max_total_epsilon: p.max_total_epsilon,
            delta: p.delta,
            min_cohort: p.min_cohort,
            require_sampling: p.require_sampling,
            require_secure_aggregation: p.require_secure_aggregation,
            require_distributed_noise: p.require_distributed_noise,
        }
    }
}

/// The production privacy policy: noise multiplier at least 0.5, ε at most 1 per round and 10
/// in all at δ = 1e-6, a cohort of at least 100, Poisson sampling, secure aggregation.
#[unsafe(no_mangle)]
pub extern "C" fn fedrec_privacy_policy_production() -> FedrecPrivacyPolicy {
    let production = FedrecPrivacyPolicy::from(PrivacyPolicy::production());
    guard(production, || production)
}

/// Options of `fedrec_sdk_recommend`. Start from `fedrec_recommend_options_default()`.
/// Every pointer is borrowed for the call only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FedrecRecommendOptions {
    /// Leave out the items the user consumed (default true).
    pub exclude_consumed: bool,
    /// Weight of content (item tags) in [0, 1]: 0 is purely collaborative (default 0.25).
    pub content_blend: f32,
    /// Recommend only among these `include_only_len` items; NULL = the whole catalogue.
    pub include_only: *const u32,
    /// Length of `include_only`.
    pub include_only_len: usize,
    /// Never recommend these `exclude_len` items (NULL when `exclude_len` is 0).
    pub exclude: *const u32,
    /// Length of `exclude`.
    pub exclude_len: usize,
}

/// What a recommendation's score is based on.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FedrecSource {
    /// The user's own vector.
    Collaborative = 0,
    /// A blend of a collaborative (or cold-start) score with content similarity.
    Hybrid = 1,
    /// Cold start: the centroid of the user's segment.
    Segment = 2,
    /// Cold start without any signal: item popularity.
    Popularity = 3,
}

/// One recommended item.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FedrecRecommendation {
    /// Item index in the catalogue.
    pub item: u32,
    /// Its score; higher is better. Comparable only within one call.
    pub score: f32,
    /// What the score is based on.
    pub source: FedrecSource,
}

/// The result of `fedrec_sdk_recommend`: `len` items, best first. `items` is allocated by
/// the SDK (NULL when `len` is 0) and freed with `fedrec_recommendations_free`.
#[repr(C)]
#[derive(Debug)]
pub struct FedrecRecommendations {
    /// The items.
    pub items: *mut FedrecRecommendation,
    /// How many.
    pub len: usize,
}

impl Empty for FedrecRecommendations {
    const EMPTY: Self = FedrecRecommendations { items: std::ptr::null_mut(), len: 0 };
}

/// The app's view of the moment, for `fedrec_sdk_choose_variant`. It never leaves the
/// device. Strings are borrowed for the call only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FedrecContext {
    /// Local hour, 0-23.
    pub hour: u8,
    /// Local minute, 0-59.
    pub minute: u8,
    /// Local weekday, 0 = Monday ... 6 = Sunday.
    pub weekday: u8,
    /// A coarse location (a city, a region); NULL = not shared.
    pub location: *const c_char,
    /// The device type (`phone`, `tablet`, `tv`, ...); NULL = not shared.
    pub device_type: *const c_char,
}

/// Options of `fedrec_sdk_participate`. Start from `fedrec_participate_options_default()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FedrecParticipateOptions {
    /// The device is charging (as the host app knows it).
    pub charging: bool,
    /// The device is on an unmetered network.
    pub unmetered: bool,
    /// The user is not using the device.
    pub idle: bool,
    /// Longest time the whole participation may take, in milliseconds (default 10 minutes).
    pub time_budget_ms: u64,
    /// Attempts in all for transient failures, the first included (default 5; 0 counts as 1).
    pub max_attempts: u32,
    /// Backoff before the first retry, in milliseconds, doubling up to `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    /// The longest backoff between attempts, in milliseconds.
    pub max_backoff_ms: u64,
}

/// How one round ended for this device.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FedrecRoundOutcome {
    /// The update was uploaded and acknowledged.
    Completed = 0,
    /// The device was not selected this round (try again after `retry_after_ms`).
    NotSelected = 1,
    /// The coordinator refused the upload.
    Rejected = 2,
    /// The coordinator abandoned the round.
    Aborted = 3,
    /// The round took longer than the device waits.
    TimedOut = 4,
    /// The device could not compute its update (nothing was sent).
    Failed = 5,
    /// The federation is finished (its privacy budget is spent): the device holds the final
    /// model and should stop calling `fedrec_sdk_participate`.
    Finished = 6,
    /// The device's privacy policy refused the task (`refusal` says why): nothing was trained
    /// or sent.
    PolicyRefused = 7,
}

/// Why the device's privacy policy refused a task. Codes are stable.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FedrecRefusal {
    /// No refusal.
    None = 0,
    /// No noise, or a noise multiplier below the policy's minimum.
    NoiseTooLow = 1,
    /// One round would cost more than the policy's ε per round.
    EpsilonTooHigh = 2,
    /// The round's cohort is below the policy's minimum.
    CohortTooSmall = 3,
    /// The policy requires secure aggregation and the round is plain.
    SecureAggregationRequired = 4,
    /// The device's own ε would exceed its limit: it refuses every further task.
    DeviceBudgetSpent = 5,
    /// First-come selection: the round does not sample devices.
    NotSampled = 6,
    /// A mechanism or aggregation mode this SDK does not know.
    UnknownMechanism = 7,
}

impl From<RefusalReason> for FedrecRefusal {
    fn from(r: RefusalReason) -> Self {
        match r {
            RefusalReason::NoiseTooLow => FedrecRefusal::NoiseTooLow,
            RefusalReason::EpsilonTooHigh => FedrecRefusal::EpsilonTooHigh,
            RefusalReason::CohortTooSmall => FedrecRefusal::CohortTooSmall,
            RefusalReason::SecureAggregationRequired => FedrecRefusal::SecureAggregationRequired,
            RefusalReason::DeviceBudgetSpent => FedrecRefusal::DeviceBudgetSpent,
            RefusalReason::NotSampled => FedrecRefusal::NotSampled,
            RefusalReason::UnknownMechanism => FedrecRefusal::UnknownMechanism,
        }
    }
}

/// What `fedrec_sdk_participate` did. Plain values, nothing to free.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FedrecParticipation {
    /// How the round ended.
    pub outcome: FedrecRoundOutcome,
    /// Whether the device was selected (it received a task).
    pub selected: bool,
    /// Whether its update was acknowledged.
    pub completed: bool,
    /// Whether `round` is known.
    pub has_round: bool,
    /// The round (valid when `has_round`).
    pub round: u64,
    /// Whether the device holds a model afterwards.
    pub has_model_version: bool,
    /// The version of that model (valid when `has_model_version`).
    pub model_version: u64,
    /// The coordinator's hint for when to check in again, in milliseconds; -1 = none given.
    pub retry_after_ms: i64,
    /// Why the privacy policy refused the task (with `FEDREC_ROUND_OUTCOME_POLICY_REFUSED`),
    /// else `FEDREC_REFUSAL_NONE`.
    pub refusal: FedrecRefusal,
}

impl Empty for FedrecParticipation {
    /// Nothing happened: not selected, nothing completed, nothing known.
    const EMPTY: Self = FedrecParticipation {
        outcome: FedrecRoundOutcome::Failed,
        selected: false,
        completed: false,
        has_round: false,
        round: 0,
        has_model_version: false,
        model_version: 0,
        retry_after_ms: -1,
        refusal: FedrecRefusal::None,
    };
}

/// The SDK behind a handle argument.
///
/// # Safety
/// `sdk` is NULL or a live handle from `fedrec_sdk_open` that outlives the borrow.
unsafe fn sdk_ref<'a>(sdk: *const FedrecSdk) -> Result<&'a Sdk, Failure> {
    // SAFETY: NULL or live (this function's contract); `Sdk` is `Sync`, so shared references
    // may be used from any thread.
    unsafe { sdk.as_ref() }.map(|h| &h.sdk).ok_or_else(|| Failure::null("sdk"))
}

/// An array argument of `len` item ids.
///
/// # Safety
/// `ptr` is NULL or points to `len` readable `u32`s that outlive the borrow.
unsafe fn u32s<'a>(ptr: *const u32, len: usize, what: &str) -> Result<&'a [u32], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    if len > isize::MAX as usize / size_of::<u32>() {
        return Err(Failure::invalid(format!("{what} is longer than any array can be")));
    }
    // SAFETY: not NULL, `len` readable aligned `u32`s (this function's contract), and the
    // size fits a slice.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The default options of `fedrec_sdk_open`: defaults for the log size and half-life,
/// offline, rulesets refused, no recovery.
#[unsafe(no_mangle)]
pub extern "C" fn fedrec_open_options_default() -> FedrecOpenOptions {
    const DEFAULT: FedrecOpenOptions = FedrecOpenOptions {
        max_events: 0,
        half_life_s: 0,
        coordinator: std::ptr::null(),
        rules_public_key: std::ptr::null(),
        rules_public_key_len: 0,
        recover: false,
        policy: std::ptr::null(),
    };
    // A constant cannot panic, but every exported function goes through a guard.
    guard(DEFAULT, || DEFAULT)
}

/// Builds the SDK's configuration from the C options.
///
/// # Safety
/// Every pointer in `options` (and in its coordinator) is NULL or valid as documented.
unsafe fn config(dir: &str, key: [u8; 32], options: &FedrecOpenOptions) -> Result<SdkConfig, Failure> {
    let mut cfg = SdkConfig::new(dir, key);
    if options.max_events > 0 {
        cfg.max_events = usize::try_from(options.max_events).unwrap_or(usize::MAX);
    }
    if options.half_life_s > 0 {
        cfg.signals.half_life = Duration::from_secs(options.half_life_s);
    }
    cfg.recover = options.recover;
    // SAFETY: a non-NULL `policy` points to a valid struct (the options' contract).
    if let Some(p) = unsafe { options.policy.as_ref() } {
        cfg.policy = PrivacyPolicy::from(*p);
    }
    if !options.rules_public_key.is_null() {
        // SAFETY: `rules_public_key_len` readable bytes (the options' contract).
        let key =
            unsafe { bytes_arg(options.rules_public_key, options.rules_public_key_len, "rules_public_key") }?;
        cfg.rules_public_key = Some(key.to_vec());
    }
    // SAFETY: a non-NULL `coordinator` points to a valid struct (the options' contract).
    if let Some(c) = unsafe { options.coordinator.as_ref() } {
        // SAFETY: the coordinator struct's pointers are valid as documented (same contract).
        let (address, server_name, cert, token) = unsafe {
            (
                str_arg(c.address, "coordinator.address")?,
                str_arg(c.server_name, "coordinator.server_name")?,
                bytes_arg(c.cert_der, c.cert_der_len, "coordinator.cert_der")?,
                bytes_arg(c.token, c.token_len, "coordinator.token")?,
            )
        };
        let server: SocketAddr = address
            .parse()
            .map_err(|_| Failure::invalid("coordinator.address must be an IP address and port"))?;
        let timeout = if c.timeout_ms == 0 { 10_000 } else { u64::from(c.timeout_ms) };
        cfg.coordinator = Some(NetConfig {
            server,
            server_name: server_name.to_owned(),
            server_cert: cert.to_vec(),
            token: token.to_vec(),
            sdk_version: concat!("fedrec-client/", env!("CARGO_PKG_VERSION")).to_owned(),
            shape: ModelShape {
                n_items: c.n_items as usize,
                dim: c.dim as usize,
                n_segments: c.n_segments as usize,
            },
            timeout: millis(timeout),
        });
    }
    Ok(cfg)
}

/// Opens (or creates) the store in the folder `dir`, sealed under the 32-byte `key` (from the
/// platform keystore), and returns a new handle in `*sdk`.
///
/// `dir` must not be empty (status 1). The handle holds the folder until `fedrec_sdk_close`:
/// a second open of the same folder, in this process or another, fails with
/// `FEDREC_ERR_LOCKED` (17). `options` may be NULL for the defaults. A wrong key or a
/// tampered or corrupt store fails with status 3 or 4, an older copy of the store put back
/// over a newer one with `FEDREC_ERR_ROLLBACK` (18); each leaves the file untouched (see
/// `recover`, `fedrec_sdk_erase`).
///
/// # Safety
/// `dir` is a NUL-terminated string; `key` points to `key_len` bytes; `options` is NULL or
/// valid; `sdk` is writable; `err` is NULL or writable. All are borrowed for the call only.
/// The key bytes are not kept beyond the store's cipher.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_open(
    dir: *const c_char,
    key: *const u8,
    key_len: usize,
    options: *const FedrecOpenOptions,
    sdk: *mut *mut FedrecSdk,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract above, for each argument.
        let (out, dir, key_bytes, options) = unsafe {
            (
                Out::new(sdk, "sdk")?,
                str_arg(dir, "dir")?,
                bytes_arg(key, key_len, "key")?,
                options.as_ref().copied().unwrap_or_else(|| fedrec_open_options_default()),
            )
        };
        let mut key: [u8; 32] =
            key_bytes.try_into().map_err(|_| Failure::invalid("key must be exactly 32 bytes"))?;
        // SAFETY: `options` is valid as documented.
        let cfg = unsafe { config(dir, key, &options) };
        key.fill(0);
        std::hint::black_box(&key);
        let handle = Sdk::open(cfg?)?;
        out.put(Box::into_raw(Box::new(FedrecSdk { sdk: handle })));
        Ok(())
    })
}

/// Removes every store file in `dir` without opening it (no key needed): the recovery path
/// for a store whose key is lost or that is corrupt. Other files in `dir` are left alone.
/// While a handle is open on `dir` it fails with `FEDREC_ERR_LOCKED` (17); use
/// `fedrec_sdk_forget` on that handle instead.
///
/// # Safety
/// `dir` is a NUL-terminated string; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_erase(dir: *const c_char, err: *mut *mut FedrecError) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract.
        let dir = unsafe { str_arg(dir, "dir") }?;
        Ok(Sdk::erase(std::path::Path::new(dir))?)
    })
}

/// Closes a handle, releases its folder and frees it. NULL is allowed. Everything recorded
/// was already saved.
///
/// # Safety
/// `sdk` is NULL or a handle from `fedrec_sdk_open`, not closed yet, and no other call on it
/// is running or will be made.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_close(sdk: *mut FedrecSdk) {
    // Dropping the SDK only releases memory and file handles; a panic there is still caught.
    guard((), || {
        if sdk.is_null() {
            return;
        }
        // SAFETY: `sdk` came from `Box::into_raw` in `fedrec_sdk_open` and is closed once,
        // with no call racing (the caller's contract).
        drop(unsafe { Box::from_raw(sdk) });
    });
}

/// Records the user's consent for local personalization and for contributing to training
/// (saved before this returns). Both start as false.
///
/// # Safety
/// `sdk` is a live handle; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_set_consent(
    sdk: *const FedrecSdk,
    personalization: bool,
    training: bool,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        Ok(sdk.set_consent(Consent { personalization, training })?)
    })
}

/// The user's current consent, into `*personalization` and `*training`.
///
/// # Safety
/// `sdk` is a live handle; the out-pointers are writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_consent(
    sdk: *const FedrecSdk,
    personalization: *mut bool,
    training: *mut bool,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract.
        let (p, t) =
            unsafe { (Out::new(personalization, "personalization"), Out::new(training, "training")) };
        let (p, t) = (p?, t?);
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        let consent = sdk.consent()?;
        p.put(consent.personalization);
        t.put(consent.training);
        Ok(())
    })
}

/// Records one interaction (saved before this returns): `kind` is a `FEDREC_EVENT_*` code,
/// `value` finite in 0..=1e6 (1 for a view or click, the rating for a rating),
/// `timestamp_s` seconds since the Unix epoch. Needs personalization or training consent
/// (status 2 otherwise).
///
/// # Safety
/// `sdk` is a live handle; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_record(
    sdk: *const FedrecSdk,
    item: u32,
    kind: u32,
    value: f32,
    timestamp_s: i64,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        let kind = EventKind::from_code(kind)
            .ok_or_else(|| Failure::invalid("kind is not a FEDREC_EVENT_* code"))?;
        Ok(sdk.record(Event { item, kind, value, timestamp_s })?)
    })
}

/// Sets (replaces) the tags of an item (genres, keywords: catalogue metadata for the hybrid
/// recommender, kept in memory only): `n_tags` strings at `tags` (NULL when `n_tags` is 0).
///
/// # Safety
/// `sdk` is a live handle; `tags` points to `n_tags` NUL-terminated strings; `err` is NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_set_item_tags(
    sdk: *const FedrecSdk,
    item: u32,
    tags: *const *const c_char,
    n_tags: usize,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        if n_tags > 0 && tags.is_null() {
            return Err(Failure::null("tags"));
        }
        let tags: Vec<&str> = (0..n_tags)
            .map(|i| {
                // SAFETY: `tags` points to `n_tags` string pointers (the caller's contract),
                // each NUL-terminated.
                unsafe { str_arg(*tags.add(i), "a tag") }
            })
            .collect::<Result<_, _>>()?;
        Ok(sdk.set_item_tags(item, &tags)?)
    })
}

/// The version of the installed model into `*version`, and whether there is one into
/// `*has_model`.
///
/// # Safety
/// `sdk` is a live handle; the out-pointers are writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_model_version(
    sdk: *const FedrecSdk,
    has_model: *mut bool,
    version: *mut u64,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract.
        let (has, out) = unsafe { (Out::new(has_model, "has_model"), Out::new(version, "version")) };
        let (has, out) = (has?, out?);
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        let v = sdk.model_version()?;
        has.put(v.is_some());
        out.put(v.unwrap_or(0));
        Ok(())
    })
}

/// The default options of `fedrec_sdk_recommend`: exclude consumed items, content blend
/// 0.25, the whole catalogue, nothing excluded. (Should computing them panic, a bug, every
/// field is 0, false or NULL.)
#[unsafe(no_mangle)]
pub extern "C" fn fedrec_recommend_options_default() -> FedrecRecommendOptions {
    let plain = FedrecRecommendOptions {
        exclude_consumed: false,
        content_blend: 0.0,
        include_only: std::ptr::null(),
        include_only_len: 0,
        exclude: std::ptr::null(),
        exclude_len: 0,
    };
    guard(plain, || {
        let d = RecommendOptions::default();
        FedrecRecommendOptions {
            exclude_consumed: d.exclude_consumed,
            content_blend: d.content_blend,
            ..plain
        }
    })
}

/// The top `k` items for the user, best first, computed on the device, into `*out` (free it
/// with `fedrec_recommendations_free`). `options` may be NULL for the defaults. Needs an
/// installed model (status 8 otherwise); without personalization consent the items come from
/// popularity alone.
///
/// # Safety
/// `sdk` is a live handle; `options` is NULL or valid; `out` is writable; `err` is NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_recommend(
    sdk: *const FedrecSdk,
    k: usize,
    options: *const FedrecRecommendOptions,
    out: *mut FedrecRecommendations,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract.
        let (out, o) = unsafe {
            (
                Out::new(out, "out")?,
                options.as_ref().copied().unwrap_or_else(|| fedrec_recommend_options_default()),
            )
        };
        let include_only = if o.include_only.is_null() {
            None
        } else {
            // SAFETY: the option struct's arrays are valid as documented (the caller's contract).
            Some(unsafe { u32s(o.include_only, o.include_only_len, "options.include_only") }?.to_vec())
        };
        let opts = RecommendOptions {
            exclude_consumed: o.exclude_consumed,
            include_only,
            // SAFETY: as above.
            exclude: unsafe { u32s(o.exclude, o.exclude_len, "options.exclude") }?.to_vec(),
            content_blend: o.content_blend,
        };
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        let recs = sdk.recommend(k, &opts)?;
        let items: Box<[FedrecRecommendation]> = recs
            .iter()
            .map(|r| FedrecRecommendation { item: r.item, score: r.score, source: source(r.source) })
            .collect();
        let len = items.len();
        let items = if len == 0 { std::ptr::null_mut() } else { Box::into_raw(items).cast() };
        out.put(FedrecRecommendations { items, len });
        Ok(())
    })
}

fn source(s: Source) -> FedrecSource {
    match s {
        Source::Collaborative => FedrecSource::Collaborative,
        Source::Hybrid => FedrecSource::Hybrid,
        Source::Segment => FedrecSource::Segment,
        Source::Popularity => FedrecSource::Popularity,
    }
}

/// Frees the items of a `FedrecRecommendations` and sets it to `{NULL, 0}`. NULL, and a
/// result that is already empty, are allowed.
///
/// # Safety
/// `recs` is NULL or a result filled by `fedrec_sdk_recommend` whose items were not freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_recommendations_free(recs: *mut FedrecRecommendations) {
    guard((), || {
        // SAFETY: NULL or valid (the caller's contract).
        let Some(recs) = (unsafe { recs.as_mut() }) else { return };
        let FedrecRecommendations { items, len } = std::mem::replace(recs, FedrecRecommendations::EMPTY);
        if items.is_null() {
            return;
        }
        let slice = std::ptr::slice_from_raw_parts_mut(items, len);
        // SAFETY: `items` and `len` are the boxed slice `fedrec_sdk_recommend` leaked, freed once.
        drop(unsafe { Box::from_raw(slice) });
    });
}

/// The user's segment, computed on the device and never sent: `*found` is false before the
/// user has any events; otherwise `*id` and `*distance` are set. Needs personalization
/// consent and a model.
///
/// # Safety
/// `sdk` is a live handle; the out-pointers are writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_segment(
    sdk: *const FedrecSdk,
    found: *mut bool,
    id: *mut u32,
    distance: *mut f32,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract.
        let (found, id, distance) =
            unsafe { (Out::new(found, "found"), Out::new(id, "id"), Out::new(distance, "distance")) };
        let (found, id, distance) = (found?, id?, distance?);
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        let segment = sdk.segment()?;
        found.put(segment.is_some());
        id.put(segment.map_or(0, |s| s.id));
        distance.put(segment.map_or(0.0, |s| s.distance));
        Ok(())
    })
}

/// Why `item` scores as it does, as a JSON object into `*json` (free it with
/// `fedrec_string_free`): `item`; `because`, the consumed items that drive the score
/// (`[{"item", "contribution"}]`, largest first); `collaborative`; `segment` (`{"id",
/// "distance"}` or null); `content_similarity` (or null); `content_because`. Needs
/// personalization consent and a model.
///
/// # Safety
/// `sdk` is a live handle; `json` is writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_explain(
    sdk: *const FedrecSdk,
    item: u32,
    json: *mut *mut c_char,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::new(json, "json") }?;
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        let e = sdk.explain(item)?;
        let pairs = |v: &[(u32, f32)]| -> Vec<serde_json::Value> {
            v.iter().map(|&(item, c)| json!({ "item": item, "contribution": c })).collect()
        };
        let doc = json!({
            "item": e.item,
            "because": pairs(&e.because),
            "collaborative": e.collaborative,
            "segment": e.segment.map(|s| json!({ "id": s.id, "distance": s.distance })),
            "content_similarity": e.content_similarity,
            "content_because": pairs(&e.content_because),
        });
        out.put(give_string(doc.to_string())?);
        Ok(())
    })
}

/// Installs the signed ruleset `ruleset` (as the coordinator publishes it) after verifying its signature
/// with the rules public key given at open. Unsigned, tampered, foreign or older rulesets
/// are refused (status 13) and the installed one stays.
///
/// # Safety
/// `sdk` is a live handle; `ruleset` points to `len` bytes; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_install_ruleset(
    sdk: *const FedrecSdk,
    ruleset: *const u8,
    len: usize,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract.
        let signed = unsafe { bytes_arg(ruleset, len, "ruleset") }?;
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        Ok(sdk.install_ruleset(signed)?)
    })
}

/// Asks the coordinator for a newer ruleset and installs it; `*updated` says whether one was
/// installed. Blocks on the network. Needs a coordinator and a rules public key.
///
/// # Safety
/// `sdk` is a live handle; `updated` is writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_fetch_ruleset(
    sdk: *const FedrecSdk,
    updated: *mut bool,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::new(updated, "updated") }?;
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        out.put(sdk.fetch_ruleset()?);
        Ok(())
    })
}

/// The content variant the installed ruleset picks for `slot` in the context `context`, into
/// `*variant` (free it with `fedrec_string_free`). Evaluated on the device; the SDK adds the
/// segment and recent activity itself (with personalization consent).
///
/// # Safety
/// `sdk` is a live handle; `slot` is a NUL-terminated string; `context` is valid; `variant`
/// is writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_choose_variant(
    sdk: *const FedrecSdk,
    slot: *const c_char,
    context: *const FedrecContext,
    variant: *mut *mut c_char,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract, for each argument and the context's strings.
        let (out, slot, ctx) = unsafe {
            let out = Out::new(variant, "variant")?;
            let slot = str_arg(slot, "slot")?;
            let c = context.as_ref().ok_or_else(|| Failure::null("context"))?;
            let ctx = Context {
                hour: c.hour,
                minute: c.minute,
                weekday: c.weekday,
                location: opt_str_arg(c.location, "context.location")?.map(str::to_owned),
                device_type: opt_str_arg(c.device_type, "context.device_type")?.map(str::to_owned),
            };
            (out, slot, ctx)
        };
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        let chosen = sdk.choose_variant(slot, &ctx)?;
        out.put(give_string(chosen)?);
        Ok(())
    })
}

/// A new cancel token into `*cancel` (free it with `fedrec_cancel_free`).
///
/// # Safety
/// `cancel` is writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_cancel_new(
    cancel: *mut *mut FedrecCancel,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::new(cancel, "cancel") }?;
        out.put(Box::into_raw(Box::new(FedrecCancel { token: CancelToken::new() })));
        Ok(())
    })
}

/// Cancels every participation using `cancel`; they return status 12 soon after. Any thread
/// may call it, while the participation runs.
///
/// # Safety
/// `cancel` is a live token from `fedrec_cancel_new`; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_cancel_cancel(
    cancel: *const FedrecCancel,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: NULL or a live token (the caller's contract); tokens are `Sync`.
        let token = unsafe { cancel.as_ref() }.ok_or_else(|| Failure::null("cancel"))?;
        token.token.cancel();
        Ok(())
    })
}

/// Frees a cancel token. NULL is allowed.
///
/// # Safety
/// `cancel` is NULL or a token from `fedrec_cancel_new`, freed once, not used by a running
/// participation or another call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_cancel_free(cancel: *mut FedrecCancel) {
    guard((), || {
        if cancel.is_null() {
            return;
        }
        // SAFETY: from `Box::into_raw` in `fedrec_cancel_new`, freed once (the caller's contract).
        drop(unsafe { Box::from_raw(cancel) });
    });
}

/// The default options of `fedrec_sdk_participate`: no eligibility claimed, a 10-minute
/// budget, 5 attempts with backoff from 1 s up to 60 s. (Should computing them panic, a bug,
/// every field is 0 or false.)
#[unsafe(no_mangle)]
pub extern "C" fn fedrec_participate_options_default() -> FedrecParticipateOptions {
    let plain = FedrecParticipateOptions {
        charging: false,
        unmetered: false,
        idle: false,
        time_budget_ms: 0,
        max_attempts: 0,
        initial_backoff_ms: 0,
        max_backoff_ms: 0,
    };
    guard(plain, || {
        let d = ParticipateOptions::default();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        FedrecParticipateOptions {
            charging: d.eligibility.charging,
            unmetered: d.eligibility.unmetered,
            idle: d.eligibility.idle,
            time_budget_ms: ms(d.time_budget),
            max_attempts: d.retry.max_attempts,
            initial_backoff_ms: ms(d.retry.initial_backoff),
            max_backoff_ms: ms(d.retry.max_backoff),
        }
    })
}

/// Takes part in one training round, blocking until it ends, and describes it in `*report`.
/// Run it on a background thread. Needs training consent, checked before any connection is
/// opened (status 2 otherwise), and a coordinator. `options` may be NULL for the defaults;
/// `cancel` may be NULL, or a token another thread cancels (status 12). Other calls on the
/// handle keep working while it runs; a second participation at once gets status 15. A
/// coordinator at capacity is retried after its retry hint (plus a little jitter); when the
/// federation is finished the outcome is `FEDREC_ROUND_OUTCOME_FINISHED` and the final model
/// is stored. On
/// failure `*report` is the empty report: outcome `FEDREC_ROUND_OUTCOME_FAILED`, every flag
/// false, `retry_after_ms` -1.
///
/// # Safety
/// `sdk` is a live handle; `options` is NULL or valid; `cancel` is NULL or a live token;
/// `report` is writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_participate(
    sdk: *const FedrecSdk,
    options: *const FedrecParticipateOptions,
    cancel: *const FedrecCancel,
    report: *mut FedrecParticipation,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract, for each argument.
        let (out, o, token) = unsafe {
            (
                Out::new(report, "report")?,
                options.as_ref().copied().unwrap_or_else(|| fedrec_participate_options_default()),
                cancel.as_ref().map(|c| c.token.clone()),
            )
        };
        let opts = ParticipateOptions {
            time_budget: millis(o.time_budget_ms),
            retry: RetryPolicy {
                max_attempts: o.max_attempts,
                initial_backoff: millis(o.initial_backoff_ms),
                max_backoff: millis(o.max_backoff_ms),
            },
            eligibility: Eligibility { charging: o.charging, unmetered: o.unmetered, idle: o.idle },
        };
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        let r = sdk.participate(&opts, &token.unwrap_or_default())?;
        out.put(participation(&r));
        Ok(())
    })
}

fn participation(r: &ParticipationReport) -> FedrecParticipation {
    FedrecParticipation {
        outcome: match r.outcome {
            RoundOutcome::Completed => FedrecRoundOutcome::Completed,
            RoundOutcome::NotSelected => FedrecRoundOutcome::NotSelected,
            RoundOutcome::Rejected => FedrecRoundOutcome::Rejected,
            RoundOutcome::Aborted => FedrecRoundOutcome::Aborted,
            RoundOutcome::TimedOut => FedrecRoundOutcome::TimedOut,
            RoundOutcome::Failed => FedrecRoundOutcome::Failed,
            RoundOutcome::Finished => FedrecRoundOutcome::Finished,
            RoundOutcome::PolicyRefused => FedrecRoundOutcome::PolicyRefused,
        },
        selected: r.selected,
        completed: r.completed,
        has_round: r.round.is_some(),
        round: r.round.unwrap_or(0),
        has_model_version: r.model_version.is_some(),
        model_version: r.model_version.unwrap_or(0),
        retry_after_ms: r.retry_after.map_or(-1, duration_ms),
        refusal: r.refusal.map_or(FedrecRefusal::None, FedrecRefusal::from),
    }
}

/// Everything stored about the user as pretty-printed JSON into `*json` (free it with
/// `fedrec_string_free`): consent, every event, the user vector, the segment, the model
/// version. Needs no consent.
///
/// # Safety
/// `sdk` is a live handle; `json` is writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_export(
    sdk: *const FedrecSdk,
    json: *mut *mut c_char,
    err: *mut *mut FedrecError,
) -> i32 {
    call(err, || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::new(json, "json") }?;
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        out.put(give_string(sdk.export()?)?);
        Ok(())
    })
}

/// Erases everything: every store file in the folder, and the SDK's buffers. The handle is
/// then closed: later calls return status 14; free it with `fedrec_sdk_close`. If removing a
/// file fails the handle stays open and the call can be retried.
///
/// # Safety
/// `sdk` is a live handle; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fedrec_sdk_forget(sdk: *const FedrecSdk, err: *mut *mut FedrecError) -> i32 {
    call(err, || {
        // SAFETY: `sdk` is NULL or a live handle (the caller's contract).
        let sdk = unsafe { sdk_ref(sdk) }?;
        Ok(sdk.forget()?)
    })
}
