//! The app-facing API: one [`Sdk`] handle over the store, consent, signals, inference, rules and participation.
//!
//! # Threading and failure
//!
//! [`Sdk`] is `Send + Sync`: one `Mutex` guards its state, so calls from several threads are
//! serialised. [`Sdk::participate`] releases the lock while it talks to the network, so
//! recommendations keep working during a round. Every method returns `Result<_, SdkError>`;
//! none panics on the caller's input.
//!
//! # Consent
//!
//! [`Consent`] has two separate purposes, both off until the user opts in:
//!
//! * `personalization`: the SDK may use the interaction log on the device (user vector,
//!   personalised recommendations, segment, explanations, activity counts in rules).
//!   Without it [`Sdk::recommend`] answers from item popularity only (the history is not
//!   read), and [`Sdk::segment`] / [`Sdk::explain`] return [`SdkError::ConsentRequired`].
//! * `training`: the SDK may contribute clipped, noised model updates to the coordinator.
//!   Without it [`Sdk::participate`] returns [`SdkError::ConsentRequired`] before it opens
//!   any connection.
//!
//! [`Sdk::record`] needs at least one of the two: events are kept only for a purpose the user
//! agreed to. Withdrawing consent stops their use but does not delete them; [`Sdk::forget`]
//! does.
//!
//! # The user vector
//!
//! The user vector is reconstructed on the device (`fedrec_shared::train::reconstruct`, the
//! same closed-form solve a training round uses) from the time-decayed implicit ratings of
//! the log ([`crate::signals::implicit_ratings`]) and the cached model, the first time an
//! inference call needs it after the events or the model changed, or after 1/64 of the
//! half-life passed (decay scales every event by the same factor, so only the absolute
//! confidences drift: about 1% per 1/64 half-life); it is cached in memory and stored with
//! the next write.
//!
//! # Erasure
//!
//! [`Sdk::forget`] removes every store file from the folder and overwrites the SDK's buffers
//! with zeros, best-effort: copies the allocator or the OS made earlier (reallocations, swap,
//! flash wear levelling) are out of reach. Since everything on disk was sealed under the host's
//! key, deleting that key from the platform keystore as well makes any such remnant unreadable.
//!
//! # Stability
//!
//! The signatures here are what the C ABI wraps. Changes are additive; any change to an
//! existing signature is noted in this paragraph.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use fedrec_shared::round::ClientOutcome;
use fedrec_shared::round::secure::{DistributedCharge, DistributedPolicy, SecurePolicy};
use fedrec_shared::train::reconstruct;
use fedrec_shared::wire::ErrorCode;
use fedrec_shared::{ModelShape, Objective, Rating, RoundModel, TrainParams, UserState};
use serde_json::{Value, json};

use crate::content::{ContentIndex, MAX_TAG_LEN, MAX_TAGS_PER_ITEM};
use crate::error::SdkError;
use crate::net::{CancelToken, Device, NetConfig, NetError, ParticipateOptions, Participation};
use crate::policy::{PrivacyPolicy, RefusalReason, TaskGate, TaskOffer};
use crate::recommend::{self, Explanation, RecommendOptions, Recommendation, Scratch, Segment};
use crate::rules::{self, ActivityCounts, Context, EvalContext, FetchError, Fetched, VerifiedRuleset};
use crate::signals::{Event, SignalConfig, implicit_ratings};
use crate::store::{Contents, SCHEMA_VERSION, Store, StoreError, StoredUser};

/// The user's consent, per purpose. Both default to `false`: explicit opt-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Consent {
    /// Use the interaction history on the device to personalise.
    pub personalization: bool,
    /// Contribute (clipped, privatised) updates to the shared model.
    pub training: bool,
}

/// How to open an [`Sdk`]. Build with [`SdkConfig::new`], then adjust the public fields.
/// `Debug` leaves the key out.
#[derive(Clone)]
#[non_exhaustive]
pub struct SdkConfig {
    /// The SDK's own folder (created if missing, `0700` on Unix); the store, its lock file
    /// and its rollback counter live inside. Must not be empty. One open [`Sdk`] per folder:
    /// a second open gets [`SdkError::Locked`].
    pub dir: PathBuf,
    /// The 32-byte key the store is sealed under (ChaCha20-Poly1305), from the platform keystore.
    pub key: [u8; 32],
    /// Most events kept; the oldest are pruned first. Default 10,000.
    pub max_events: usize,
    /// The store file may not exceed this many bytes (checked on read and on write).
    /// Default 64 MiB.
    pub max_store_bytes: u64,
    /// The largest model (parameters, in bytes) the SDK accepts into memory. Default 64 MiB.
    pub model_budget_bytes: u64,
    /// Weights per event kind and the decay half-life.
    pub signals: SignalConfig,
    /// Parameters of the on-device user-vector reconstruction, used until a coordinator's
    /// task supplies its own. Default: implicit feedback, `α = 1`, `λ_u = 0.1`.
    pub train: TrainParams,
    /// How to reach the coordinator; `None` = offline only.
    pub coordinator: Option<NetConfig>,
    /// The Ed25519 public key rulesets must be signed with; `None` = rulesets refused.
    pub rules_public_key: Option<Vec<u8>>,
    /// If the store cannot be opened (wrong key, corrupt, too new, rolled back), move it aside
    /// to `fedrec.store.corrupt-…` in the same folder and start empty instead of failing. The
    /// moved file is not deleted (only [`Sdk::forget`] / [`Sdk::erase`] remove it). Default
    /// `false`.
    pub recover: bool,
    /// Which training tasks the device accepts, checked before it trains (see
    /// [`crate::policy`]). Default [`PrivacyPolicy::production`]; lower it only in tests.
    pub policy: PrivacyPolicy,
}

impl std::fmt::Debug for SdkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdkConfig")
            .field("max_events", &self.max_events)
            .field("max_store_bytes", &self.max_store_bytes)
            .field("model_budget_bytes", &self.model_budget_bytes)
            .field("signals", &self.signals)
            .field("train", &self.train)
            .field("coordinator", &self.coordinator)
            .field("recover", &self.recover)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl SdkConfig {
    /// A configuration with defaults for everything but the folder and the key.
    pub fn new(dir: impl Into<PathBuf>, key: [u8; 32]) -> SdkConfig {
        SdkConfig {
            dir: dir.into(),
            key,
            max_events: 10_000,
            max_store_bytes: 64 << 20,
            model_budget_bytes: 64 << 20,
            signals: SignalConfig::default(),
            train: TrainParams {
                objective: Objective::Implicit { alpha: 1.0 },
                l2_user: 0.1,
                l2_user_bias: 0.1,
                l2_item: 0.01,
                l2_item_bias: 0.01,
                user_support_exponent: 0.0,
            },
            coordinator: None,
            rules_public_key: None,
            recover: false,
            policy: PrivacyPolicy::production(),
        }
    }

    fn validate(&self) -> Result<(), SdkError> {
        let bad = |s: &str| Err(SdkError::InvalidArgument(s.to_owned()));
        if self.dir.as_os_str().is_empty() {
            return bad("dir must not be empty: give the SDK its own folder");
        }
        if self.max_events == 0 {
            return bad("max_events must be at least 1");
        }
        if self.max_store_bytes < 1024 {
            return bad("max_store_bytes must be at least 1024");
        }
        self.signals.validate().map_err(|e| SdkError::InvalidArgument(e.to_owned()))?;
        self.train.validate().map_err(|e| SdkError::InvalidArgument(format!("train: {e}")))?;
        if let Some(net) = &self.coordinator {
            net.shape.validate().map_err(|e| SdkError::InvalidArgument(format!("coordinator.shape: {e}")))?;
        }
        self.policy.validate().map_err(|e| SdkError::InvalidArgument(e.to_owned()))?;
        if self.rules_public_key.as_ref().is_some_and(|k| k.len() != rules::PUBLIC_KEY_LEN) {
            return bad("rules_public_key must be an Ed25519 public key of 32 bytes");
        }
        Ok(())
    }
}

/// How one round ended for this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoundOutcome {
    /// The update was uploaded and acknowledged.
    Completed,
    /// The device was not selected this round.
    NotSelected,
    /// The coordinator refused the upload.
    Rejected,
    /// The coordinator abandoned the round.
    Aborted,
    /// The round took longer than the device waits.
    TimedOut,
    /// The device could not compute its update (nothing was sent).
    Failed,
    /// The federation is finished (its privacy budget is spent): no round will open again.
    /// The device holds the final model; it should stop calling `participate`.
    Finished,
    /// The device's privacy policy refused the task ([`ParticipationReport::refusal`] says
    /// why): nothing was trained or sent, and the coordinator sees a dropout. With
    /// [`RefusalReason::DeviceBudgetSpent`] the device has reached its own limit and
    /// refuses every further task.
    PolicyRefused,
}

/// What [`Sdk::participate`] did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ParticipationReport {
    /// How the round ended.
    pub outcome: RoundOutcome,
    /// Whether the device was selected (it received a task).
    pub selected: bool,
    /// Whether its update was acknowledged.
    pub completed: bool,
    /// The round, when known.
    pub round: Option<u64>,
    /// The version of the model the device holds afterwards.
    pub model_version: Option<u64>,
    /// The coordinator's hint for when to check in again, if it gave one.
    pub retry_after: Option<Duration>,
    /// Why the device refused the task, with [`RoundOutcome::PolicyRefused`].
    pub refusal: Option<RefusalReason>,
}

/// Bytes of the parameters of a model of `shape`, the quantity the memory budget bounds.
pub fn model_bytes(shape: &ModelShape) -> u64 {
    let floats = (shape.n_items as u64)
        .saturating_mul(shape.dim as u64 + 1)
        .saturating_add((shape.n_segments as u64).saturating_mul(shape.dim as u64 + 1));
    floats.saturating_mul(4)
}

/// The on-device SDK: one handle over the sealed store and everything built on it.
/// `Debug` shows no user data.
pub struct Sdk {
    settings: Settings,
    state: Mutex<Option<Inner>>,
    participating: AtomicBool,
    /// Stops the running participation when training consent is withdrawn or the user
    /// asks to be forgotten.
    running: Mutex<Option<CancelToken>>,
}

impl std::fmt::Debug for Sdk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `try_lock`: formatting must never wait for (or deadlock on) a running call.
        let open = self.state.try_lock().map(|g| g.is_some()).ok();
        f.debug_struct("Sdk").field("open", &open).finish_non_exhaustive()
    }
}

/// The configuration minus the key (which lives only inside the store's AEAD key).
#[derive(Debug)]
struct Settings {
    max_events: usize,
    model_budget_bytes: u64,
    signals: SignalConfig,
    train: TrainParams,
    coordinator: Option<NetConfig>,
    rules_public_key: Option<Vec<u8>>,
    policy: PrivacyPolicy,
}

/// The open handle's state; `None` in [`Sdk::state`] once forgotten.
struct Inner {
    store: Store,
    contents: Contents,
    /// When (UNIX seconds) `contents.user` was solved from the current events and model in
    /// this process; `None` when it must be solved again.
    user_solved_at: Option<i64>,
    /// Item tags (catalogue metadata, not user data: neither stored nor exported).
    tags: BTreeMap<u32, Vec<String>>,
    /// The content index for the current model's catalogue, built on first use.
    content: Option<ContentIndex>,
    /// The installed ruleset, verified (its signed bytes are in `contents.ruleset`).
    ruleset: Option<VerifiedRuleset>,
    scratch: Scratch,
}

/// Most items that may carry tags before a model fixes the catalogue size.
const MAX_TAGGED_ITEMS: usize = 1 << 20;

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Sdk {
    /// Opens (or creates) the store in `cfg.dir` and holds the folder's lock until the handle
    /// is dropped: a folder another handle holds (in this process or another) gives
    /// [`SdkError::Locked`]. A store that cannot be opened is an error
    /// ([`SdkError::WrongKeyOrCorrupt`], [`SdkError::StoreCorrupt`],
    /// [`SdkError::UnsupportedVersion`], [`SdkError::Rollback`]) that leaves the file
    /// untouched, unless `cfg.recover` is set: then the file is moved aside and the SDK
    /// starts empty. A store written before rollback detection is rewritten at once, with
    /// its counter.
    pub fn open(mut cfg: SdkConfig) -> Result<Sdk, SdkError> {
        let store = cfg.validate().map(|()| Store::new(&cfg.dir, &cfg.key, cfg.max_store_bytes));
        // Zeroed on every path, before anything can return early.
        cfg.key.fill(0);
        std::hint::black_box(&cfg.key);
        let mut store = store??;
        let (mut contents, rewrite) = match store.load() {
            Ok(Some(c)) => {
                let rewrite = store.needs_rewrite();
                (c, rewrite)
            }
            Ok(None) => (Contents::default(), true),
            Err(e) if cfg.recover && recoverable(&e) => {
                store.quarantine()?;
                (Contents::default(), true)
            }
            Err(e) => return Err(e.into()),
        };
        if rewrite {
            store.save(&contents)?;
        }
        // A lowered `max_events` applies at once (on disk with the next write).
        let excess = contents.events.len().saturating_sub(cfg.max_events);
        if excess > 0 {
            contents.events.drain(..excess);
            contents.user = None;
        }
        // A stored vector is solved again at first use: time has passed since it was saved.
        // The stored ruleset is verified again: a ruleset that no longer verifies (the key
        // changed) stays stored but inactive until a new one is installed.
        let ruleset = match (&contents.ruleset, &cfg.rules_public_key) {
            (Some(signed), Some(key)) => rules::verify(signed, key).ok(),
            _ => None,
        };
        let inner = Inner {
            store,
            contents,
            user_solved_at: None,
            tags: BTreeMap::new(),
            content: None,
            ruleset,
            scratch: Scratch::default(),
        };
        let settings = Settings {
            max_events: cfg.max_events,
            model_budget_bytes: cfg.model_budget_bytes,
            signals: cfg.signals,
            train: cfg.train,
            coordinator: cfg.coordinator,
            rules_public_key: cfg.rules_public_key,
            policy: cfg.policy,
        };
        Ok(Sdk {
            settings,
            state: Mutex::new(Some(inner)),
            participating: AtomicBool::new(false),
            running: Mutex::new(None),
        })
    }

    /// Removes every store file in `dir` without opening it (no key needed): the way to erase
    /// a store whose key is lost or that is corrupt. Other files in `dir` are left alone.
    /// While an [`Sdk`] is open on `dir` it fails with [`SdkError::Locked`]; use
    /// [`Sdk::forget`] on that handle instead.
    pub fn erase(dir: &Path) -> Result<(), SdkError> {
        Store::erase(dir)?;
        Ok(())
    }

    fn lock(&self) -> Result<MutexGuard<'_, Option<Inner>>, SdkError> {
        self.state.lock().map_err(|_| SdkError::Internal("an earlier call panicked; reopen the SDK".into()))
    }

    /// Runs `f` on the open state.
    fn with<T>(&self, f: impl FnOnce(&mut Inner, &Settings) -> Result<T, SdkError>) -> Result<T, SdkError> {
        let mut guard = self.lock()?;
        let inner = guard.as_mut().ok_or(SdkError::Closed)?;
        f(inner, &self.settings)
    }

    /// The user's current consent.
    pub fn consent(&self) -> Result<Consent, SdkError> {
        self.with(|inner, _| Ok(inner.contents.consent))
    }

    /// Records the user's consent (persisted before this returns). Withdrawing
    /// personalization also drops the stored user vector (it exists only for that purpose);
    /// the events stay until [`Sdk::forget`].
    pub fn set_consent(&self, consent: Consent) -> Result<(), SdkError> {
        if !consent.training {
            self.stop_participation();
        }
        self.with(|inner, _| {
            inner.update(|c| {
                c.consent = consent;
                if !consent.personalization {
                    c.user = None;
                }
            })?;
            if !consent.personalization {
                inner.user_solved_at = None;
            }
            Ok(())
        })
    }

    /// Records one interaction (persisted before this returns). Needs personalization or
    /// training consent. The value must be finite and in `0..=1e6`. When the log is full the
    /// oldest events are pruned. Item ids outside the current model's catalogue are kept (the
    /// catalogue may grow) but ignored until a model covers them. Each call writes the store
    /// and its rollback counter (four fsyncs); use [`Sdk::record_batch`] for many events at once.
    pub fn record(&self, event: Event) -> Result<(), SdkError> {
        self.record_batch(std::slice::from_ref(&event))
    }

    /// Records several interactions with one write of the store: all of them, or none if one
    /// is invalid or the write fails. Same rules as [`Sdk::record`].
    pub fn record_batch(&self, events: &[Event]) -> Result<(), SdkError> {
        for event in events {
            event.validate().map_err(|e| SdkError::InvalidArgument(e.to_owned()))?;
        }
        self.with(|inner, s| {
            let consent = inner.contents.consent;
            if !(consent.personalization || consent.training) {
                return Err(SdkError::ConsentRequired { purpose: "personalization or training" });
            }
            inner.update(|c| {
                // Append and re-sort (stable: equal timestamps keep their order): O(n log n)
                // for any batch, where inserting one by one would be quadratic.
                c.events.extend_from_slice(events);
                c.events.sort_by_key(|e| e.timestamp_s);
                let excess = c.events.len().saturating_sub(s.max_events);
                c.events.drain(..excess);
                c.user = None;
            })?;
            inner.user_solved_at = None;
            Ok(())
        })
    }

    /// Sets (replaces) the tags of an item (genres, keywords): catalogue metadata for the
    /// hybrid recommender, held in memory only. At most 32 tags of at most 64 bytes each.
    pub fn set_item_tags(&self, item: u32, tags: &[&str]) -> Result<(), SdkError> {
        if tags.len() > MAX_TAGS_PER_ITEM {
            return Err(SdkError::InvalidArgument(format!(
                "an item may carry at most {MAX_TAGS_PER_ITEM} tags"
            )));
        }
        if tags.iter().any(|t| t.trim().is_empty() || t.trim().len() > MAX_TAG_LEN) {
            return Err(SdkError::InvalidArgument(format!("tags must be 1..={MAX_TAG_LEN} bytes")));
        }
        self.with(|inner, _| {
            if inner.tags.len() >= MAX_TAGGED_ITEMS && !inner.tags.contains_key(&item) {
                return Err(SdkError::TooLarge(format!("at most {MAX_TAGGED_ITEMS} items may carry tags")));
            }
            if let Some(index) = &mut inner.content
                && (item as usize) < index.n_items()
            {
                index.set_tags(item, tags).map_err(|e| SdkError::InvalidArgument(e.to_string()))?;
            }
            inner.tags.insert(item, tags.iter().map(|t| (*t).to_owned()).collect());
            Ok(())
        })
    }

    /// Installs a model (normally done by [`Sdk::participate`]; useful offline and in tests).
    /// Refused if it exceeds `model_budget_bytes`.
    pub fn install_model(&self, model: RoundModel) -> Result<(), SdkError> {
        self.with(|inner, s| inner.install_model(Arc::new(model), s))
    }

    /// The rounds this device contributed to and their composed charge.
    pub fn privacy_record(&self) -> Result<crate::policy::PrivacyRecord, SdkError> {
        self.with(|inner, _| Ok(inner.contents.privacy.clone()))
    }

    /// The device's own ε so far, at its policy's δ (∞ after a round without noise).
    pub fn privacy_epsilon(&self) -> Result<f64, SdkError> {
        self.with(|inner, s| Ok(inner.contents.privacy.epsilon(s.policy.delta)))
    }

    /// The version of the installed model, if any.
    pub fn model_version(&self) -> Result<Option<u64>, SdkError> {
        self.with(|inner, _| Ok(inner.contents.model.as_ref().map(|m| m.version)))
    }

    /// The top `k` items, best first, computed on the device. With personalization consent
    /// they come from the user vector (hybrid with item tags, cold-start fallbacks: segment,
    /// then popularity); without it from popularity alone, and the history is not read.
    pub fn recommend(&self, k: usize, opts: &RecommendOptions) -> Result<Vec<Recommendation>, SdkError> {
        self.with(|inner, s| {
            let model = inner.model()?;
            let personal = inner.contents.consent.personalization;
            let (user, consumed) =
                if personal { inner.personal_state(&model, s)? } else { (None, Vec::new()) };
            inner.ensure_content(&model);
            let content = if personal { inner.content.as_ref() } else { None };
            Ok(recommend::recommend_with(
                &mut inner.scratch,
                &model,
                user.as_ref(),
                &consumed,
                content,
                k,
                opts,
            )?)
        })
    }

    /// The user's segment and its distance, computed on the device and never sent; `None`
    /// before the user has any events. Needs personalization consent.
    pub fn segment(&self) -> Result<Option<Segment>, SdkError> {
        self.with(|inner, s| {
            inner.require_personalization()?;
            let model = inner.model()?;
            let (user, _) = inner.personal_state(&model, s)?;
            Ok(user.and_then(|u| recommend::segment(&model, &u)))
        })
    }

    /// Which consumed items (and which segment, and which tags) drive the score of `item`.
    /// Needs personalization consent.
    pub fn explain(&self, item: u32) -> Result<Explanation, SdkError> {
        self.with(|inner, s| {
            inner.require_personalization()?;
            let model = inner.model()?;
            let (user, consumed) = inner.personal_state(&model, s)?;
            inner.ensure_content(&model);
            let params = inner.train_params(s);
            Ok(recommend::explain(&model, &params, user.as_ref(), &consumed, inner.content.as_ref(), item)?)
        })
    }

    /// Takes part in one training round, blocking until it ends (on its own single-threaded
    /// tokio runtime). Needs training consent — checked before any connection is opened —
    /// and a configured coordinator. `opts` carries the host's eligibility (charging,
    /// unmetered, idle), the time budget and the retry policy; `cancel` stops the round from
    /// another thread ([`SdkError::Cancelled`]). A coordinator whose policy refuses the
    /// device's state gives [`SdkError::NotEligible`]. The model the coordinator sends is
    /// checked against the memory budget, stored, and used for inference afterwards. Only one
    /// participation runs at a time per handle ([`SdkError::Busy`]); other calls keep working
    /// while it runs.
    ///
    /// A coordinator at capacity answers with a retry hint (`Busy`, pace steering): the SDK
    /// waits for the hint plus up to 10 % of random jitter and tries again, within the retry
    /// policy and the time budget. When the federation is finished (its privacy budget is
    /// spent) the outcome is [`RoundOutcome::Finished`] and the final model, which the
    /// coordinator sends unless the device holds it, is stored like any other: stop calling
    /// `participate` then. Each attempt uses one connection, closed before this returns.
    ///
    /// Every task is checked against the device's [`PrivacyPolicy`] before the device trains:
    /// a task below it ends the call with [`RoundOutcome::PolicyRefused`] and its
    /// [`RefusalReason`], nothing trained or sent. An admitted round is charged to the
    /// device's privacy record (persisted) before training. A device whose own ε has reached
    /// its limit does not even check in.
    pub fn participate(
        &self,
        opts: &ParticipateOptions,
        cancel: &CancelToken,
    ) -> Result<ParticipationReport, SdkError> {
        let (net, ratings, cached) = self.with(|inner, s| {
            if !inner.contents.consent.training {
                return Err(SdkError::ConsentRequired { purpose: "training" });
            }
            let net = s.coordinator.clone().ok_or(SdkError::NotConfigured("no coordinator configured"))?;
            if model_bytes(&net.shape) > s.model_budget_bytes {
                return Err(SdkError::TooLarge(
                    "the coordinator's model shape exceeds the memory budget".into(),
                ));
            }
            let n_items =
                inner.contents.model.as_ref().map_or(net.shape.n_items, |m| m.model.shape().n_items);
            let ratings = inner.ratings(n_items, s);
            Ok((net, ratings, inner.contents.model.clone()))
        })?;
        let spent = self.with(|inner, s| {
            let p = &s.policy;
            Ok(inner.contents.privacy.epsilon(p.delta) >= p.max_total_epsilon)
        })?;
        if spent {
            // Whatever the coordinator would offer, this device's own limit is reached.
            let mut r = report(Participation::Outcome(ClientOutcome::NotSelected), cached.map(|m| m.version));
            r.outcome = RoundOutcome::PolicyRefused;
            r.refusal = Some(RefusalReason::DeviceBudgetSpent);
            return Ok(r);
        }
        let cached_version = cached.as_ref().map(|m| m.version);
        if self.participating.swap(true, Ordering::AcqRel) {
            return Err(SdkError::Busy);
        }
        // Cleared on drop, so even an unwinding panic (caught by the C ABI) frees the handle.
        let _running = ClearOnDrop(&self.participating);
        // The round stops when the host cancels, or when the user withdraws training consent
        // or asks to be forgotten while it runs (`stop_participation`).
        let stop = CancelToken::new();
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) = Some(stop.clone());
        let mut gate = SdkGate { sdk: self, failure: None };
        let result = block_on(async {
            let host = cancel.clone();
            let relay = stop.clone();
            let watcher = tokio::spawn(async move {
                host.cancelled().await;
                relay.cancel();
            });
            let attempt = async {
                let mut device = Device::new(net)?;
                if let Some(model) = cached {
                    device = device.with_cached_model(model);
                }
                let participation = device.participate_gated(&ratings, opts, &stop, &mut gate).await;
                // Before the runtime goes: the coordinator learns at once that the connection
                // is closed, instead of holding its slot until the idle timeout.
                device.shutdown().await;
                Ok::<_, NetError>((participation?, device.cached_model().cloned(), device.task_params()))
            };
            let out = attempt.await;
            watcher.abort();
            out
        });
        self.running.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(e) = gate.failure.take() {
            // The charge could not be recorded, so the task was refused: say why.
            return Err(e);
        }
        let result = result?;
        // Consent withdrawn (or the store forgotten) while the round ran: say so, keep nothing.
        self.with(|inner, _| {
            if inner.contents.consent.training {
                Ok(())
            } else {
                Err(SdkError::ConsentRequired { purpose: "training" })
            }
        })?;
        let (participation, model, params) = result.map_err(participation_error)?;
        self.with(|inner, s| {
            if let Some(m) = model.filter(|m| Some(m.version) != cached_version) {
                inner.install_model(m, s)?;
            }
            if let Some(p) = params.filter(|p| inner.contents.train != Some(*p)) {
                // The user vector is solved again with the coordinator's parameters.
                inner.update(|c| {
                    c.train = Some(p);
                    c.user = None;
                })?;
                inner.user_solved_at = None;
            }
            Ok(report(participation, inner.contents.model.as_ref().map(|m| m.version)))
        })
    }

    /// Installs a signed ruleset (as the coordinator publishes it), after verifying its
    /// signature with `rules_public_key`. Unsigned, tampered, foreign or older rulesets are
    /// refused with [`SdkError::RulesRejected`] and the installed one stays.
    pub fn install_ruleset(&self, signed: &[u8]) -> Result<(), SdkError> {
        self.with(|inner, s| {
            let key = s.rules_public_key.as_deref().ok_or(SdkError::NotConfigured("no rules public key"))?;
            let installed = inner.ruleset.as_ref().map(VerifiedRuleset::version);
            let ruleset = rules::verify_update(signed, key, installed)?;
            inner.install_ruleset(ruleset)
        })
    }

    /// Asks the coordinator for a newer ruleset and installs it; returns whether one was
    /// installed. Sends only the device's token and the installed version; needs no consent.
    pub fn fetch_ruleset(&self) -> Result<bool, SdkError> {
        let (net, key, installed) = self.with(|inner, s| {
            let net = s.coordinator.clone().ok_or(SdkError::NotConfigured("no coordinator configured"))?;
            let key = s.rules_public_key.clone().ok_or(SdkError::NotConfigured("no rules public key"))?;
            Ok((net, key, inner.ruleset.as_ref().map(VerifiedRuleset::version)))
        })?;
        let fetched = block_on(async {
            let device = Device::new(net)?;
            let fetched = rules::fetch(&device, &key, installed).await;
            device.shutdown().await;
            fetched
        })?;
        match fetched.map_err(|e| match e {
            FetchError::Net(e) => participation_error(e),
            FetchError::Rules(e) => e.into(),
        })? {
            Fetched::Updated(ruleset) => self.with(|inner, _| inner.install_ruleset(ruleset)).map(|()| true),
            _ => Ok(false),
        }
    }

    /// The variant the installed ruleset picks for `slot` in the app's `ctx`. The SDK adds
    /// the segment and the recent activity counts (events per kind in the windows the rules
    /// name) itself, on the device; with personalization consent only — without it rules see
    /// no segment and zero activity.
    pub fn choose_variant(&self, slot: &str, ctx: &Context) -> Result<String, SdkError> {
        self.with(|inner, s| {
            let Some(ruleset) = inner.ruleset.clone() else {
                return Err(SdkError::NotConfigured("no ruleset installed"));
            };
            let personal = inner.contents.consent.personalization;
            let segment = match (&inner.contents.model, personal) {
                (Some(model), true) => {
                    let model = Arc::clone(model);
                    let (user, _) = inner.personal_state(&model, s)?;
                    user.and_then(|u| recommend::segment(&model, &u)).map(|seg| seg.id)
                }
                _ => None,
            };
            let events = inner.contents.events.iter().filter(|_| personal);
            let activity = ActivityCounts::from_events(
                ruleset.activity_windows(),
                now_s(),
                events.map(|e| (e.kind.code(), e.timestamp_s)),
            );
            let eval = EvalContext { context: ctx, segment, activity: &activity };
            Ok(ruleset.choose(slot, &eval)?.to_owned())
        })
    }

    /// Everything stored about the user, as JSON (right of access): consent, every event,
    /// the user vector and its model version, the segment, the model version, whether a
    /// ruleset is installed, the training parameters, and the privacy record (the device's
    /// own ε at the policy's δ, its limit, the rounds contributed and the last of them; an
    /// infinite ε is written `"inf"`). Needs no consent.
    pub fn export(&self) -> Result<String, SdkError> {
        self.with(|inner, s| {
            let c = &inner.contents;
            let events: Vec<Value> = c
                .events
                .iter()
                .map(|e| {
                    json!({
                        "item": e.item,
                        "kind": e.kind.name(),
                        "kind_code": e.kind.code(),
                        "value": e.value,
                        "timestamp_s": e.timestamp_s,
                    })
                })
                .collect();
            let segment = match (&c.model, &c.user) {
                (Some(m), Some(u)) if u.model_version == m.version => recommend::segment(m, &u.state),
                _ => None,
            };
            let train = c.train.map(|t| {
                let (objective, alpha) = match t.objective {
                    Objective::Explicit => ("explicit", None),
                    Objective::Implicit { alpha } => ("implicit", Some(alpha)),
                };
                json!({
                    "objective": objective, "alpha": alpha, "l2_user": t.l2_user,
                    "l2_user_bias": t.l2_user_bias, "l2_item": t.l2_item, "l2_item_bias": t.l2_item_bias,
                    "user_support_exponent": t.user_support_exponent,
                })
            });
            let policy = &s.policy;
            let finite = |x: f64| if x.is_finite() { json!(x) } else { json!("inf") };
            let rounds: Vec<Value> = c
                .privacy
                .entries()
                .map(|e| {
                    json!({
                        "round": e.round, "model_version": e.model_version, "q": e.q,
                        "noise_multiplier": e.noise_multiplier, "clip_norm": e.clip_norm,
                        "epsilon": finite(e.epsilon), "time_s": e.time_s,
                    })
                })
                .collect();
            let record = json!({
                "delta": policy.delta,
                "epsilon": finite(c.privacy.epsilon(policy.delta)),
                "epsilon_limit": finite(policy.max_total_epsilon),
                "rounds_contributed": c.privacy.n_rounds(),
                "last_rounds": rounds,
            });
            let doc = json!({
                "schema_version": SCHEMA_VERSION,
                "consent": { "personalization": c.consent.personalization, "training": c.consent.training },
                "events": events,
                "user_vector": c.user.as_ref().map(|u| json!({
                    "model_version": u.model_version,
                    "factors": u.state.factors,
                    "bias": u.state.bias,
                })),
                "segment": segment.map(|s| json!({ "id": s.id, "distance": s.distance })),
                "model_version": c.model.as_ref().map(|m| m.version),
                "ruleset_installed": c.ruleset.is_some(),
                "training_params": train,
                "privacy_record": record,
            });
            serde_json::to_string_pretty(&doc).map_err(|e| SdkError::Internal(e.to_string()))
        })
    }

    /// Erases everything: removes the store file, leftover temporary files, stores moved
    /// aside by recovery, the rollback counter and the lock file, then zeroes the SDK's
    /// buffers (best-effort, see the module docs), releases the folder and closes the
    /// handle: later calls return [`SdkError::Closed`]. If removing a file fails the handle
    /// stays open, so the call can be retried.
    pub fn forget(&self) -> Result<(), SdkError> {
        self.stop_participation();
        let mut guard = self.lock()?;
        let inner = guard.as_ref().ok_or(SdkError::Closed)?;
        inner.store.erase_files()?;
        if let Some(mut inner) = guard.take() {
            inner.contents.wipe();
            inner.scratch.wipe();
            inner.tags.clear();
        }
        Ok(())
    }
}

impl Sdk {
    /// Cancels the running participation, if any.
    fn stop_participation(&self) {
        if let Some(stop) = self.running.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            stop.cancel();
        }
    }
}

/// Whether a user vector solved at `solved_at` (UNIX seconds, `None` = not solved from the
/// current events and model) must be solved again at `now`: after 1/64 of the half-life
/// (at least a second), or if the clock went back.
fn needs_solve(solved_at: Option<i64>, now: i64, half_life: std::time::Duration) -> bool {
    let refresh = i64::try_from(half_life.as_secs() / 64).unwrap_or(i64::MAX).max(1);
    !solved_at.is_some_and(|t| now >= t && now - t < refresh)
}

/// Clears the flag it holds when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The SDK's gate: the policy against the stored record; an admitted round's charge is
/// persisted before the device trains. A failed write refuses the task and is kept in
/// `failure` for [`Sdk::participate`] to return.
struct SdkGate<'a> {
    sdk: &'a Sdk,
    failure: Option<SdkError>,
}

impl TaskGate for SdkGate<'_> {
    fn secure_policy(&self) -> SecurePolicy {
        self.sdk.settings.policy.secure_policy()
    }

    fn distributed_policy(&self) -> DistributedPolicy {
        self.sdk.settings.policy.distributed_policy()
    }

    fn admit(&mut self, offer: &TaskOffer) -> Result<(), RefusalReason> {
        let outcome = self.sdk.with(|inner, s| {
            if !inner.contents.consent.training {
                return Err(SdkError::ConsentRequired { purpose: "training" });
            }
            let charge = match s.policy.admit(&offer.privacy, &inner.contents.privacy) {
                Ok(charge) => charge,
                Err(reason) => return Ok(Err(reason)),
            };
            let now = now_s();
            inner.update(|c| c.privacy.charge(&charge, offer.round, offer.model_version, now))?;
            Ok(Ok(()))
        });
        self.settle(outcome)
    }

    fn reprice(&mut self, charge: &DistributedCharge) -> Result<(), RefusalReason> {
        // Persisted before the device's shares leave it, like the admission charge.
        let outcome = self.sdk.with(|inner, s| {
            let top_up = match s.policy.reprice(charge, &inner.contents.privacy) {
                Ok(top_up) => top_up,
                Err(reason) => return Ok(Err(reason)),
            };
            inner.update(|c| c.privacy.top_up(&top_up))?;
            Ok(Ok(()))
        });
        self.settle(outcome)
    }
}

impl SdkGate<'_> {
    /// A gate decision, or a failed write kept for [`Sdk::participate`] (which refuses the
    /// round: nothing further is sent).
    fn settle(&mut self, outcome: Result<Result<(), RefusalReason>, SdkError>) -> Result<(), RefusalReason> {
        match outcome {
            Ok(decision) => decision,
            Err(e) => {
                self.failure = Some(e);
                // Any reason: the failure is what the caller sees.
                Err(RefusalReason::DeviceBudgetSpent)
            }
        }
    }
}

/// Errors of `load` that recovery may move aside (not I/O errors, which may be transient).
fn recoverable(e: &StoreError) -> bool {
    !matches!(e, StoreError::Io { .. } | StoreError::Crypto)
}

/// Runs `f` to completion on a fresh single-threaded tokio runtime (the SDK starts no
/// threads and keeps no runtime between calls).
fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T, SdkError> {
    if tokio::runtime::Handle::try_current().is_ok() {
        // Blocking inside a runtime would panic (or stall it): refuse instead.
        return Err(SdkError::InvalidArgument(
            "this call blocks; make it outside an async runtime (e.g. in spawn_blocking)".into(),
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|_| SdkError::Internal("could not start the network runtime".into()))?;
    Ok(rt.block_on(f))
}

/// A network error of a participation, with the coordinator's refusals that have their own
/// public meaning told apart.
fn participation_error(e: NetError) -> SdkError {
    match &e {
        NetError::Cancelled => SdkError::Cancelled,
        NetError::Refused { code: ErrorCode::NotEligible, .. } => SdkError::NotEligible,
        _ => e.into(),
    }
}

fn report(p: Participation, model_version: Option<u64>) -> ParticipationReport {
    let mut r = ParticipationReport {
        outcome: RoundOutcome::NotSelected,
        selected: false,
        completed: false,
        round: None,
        model_version,
        retry_after: None,
        refusal: None,
    };
    match p {
        Participation::NotSelected { retry_after } => r.retry_after = Some(retry_after),
        Participation::Finished { model_version } => {
            r.outcome = RoundOutcome::Finished;
            r.model_version = Some(model_version);
        }
        Participation::PolicyRefused { round, reason } => {
            r.outcome = RoundOutcome::PolicyRefused;
            r.selected = true;
            r.round = Some(round);
            r.refusal = Some(reason);
        }
        Participation::Outcome(o) => {
            r.selected = !matches!(o, ClientOutcome::NotSelected);
            r.outcome = match o {
                ClientOutcome::Completed { round, .. } => {
                    r.completed = true;
                    r.round = Some(round);
                    RoundOutcome::Completed
                }
                ClientOutcome::NotSelected => RoundOutcome::NotSelected,
                ClientOutcome::Rejected(_) => RoundOutcome::Rejected,
                ClientOutcome::Aborted => RoundOutcome::Aborted,
                ClientOutcome::TimedOut => RoundOutcome::TimedOut,
                _ => RoundOutcome::Failed,
            };
        }
    }
    r
}

impl Inner {
    /// Applies `f` to a copy of the contents, saves the copy, and only then makes it current:
    /// if the save fails, memory and disk keep the previous state.
    fn update(&mut self, f: impl FnOnce(&mut Contents)) -> Result<(), SdkError> {
        let mut next = self.contents.clone();
        f(&mut next);
        match self.store.save(&next) {
            Ok(()) => {
                std::mem::replace(&mut self.contents, next).wipe();
                Ok(())
            }
            Err(e) => {
                next.wipe();
                Err(e.into())
            }
        }
    }

    fn model(&self) -> Result<Arc<RoundModel>, SdkError> {
        self.contents.model.clone().ok_or(SdkError::NoModel)
    }

    fn require_personalization(&self) -> Result<(), SdkError> {
        if self.contents.consent.personalization {
            Ok(())
        } else {
            Err(SdkError::ConsentRequired { purpose: "personalization" })
        }
    }

    fn train_params(&self, s: &Settings) -> TrainParams {
        self.contents.train.unwrap_or(s.train)
    }

    /// The decayed implicit ratings of the items inside a catalogue of `n_items`.
    fn ratings(&self, n_items: usize, s: &Settings) -> Vec<Rating> {
        let mut r = implicit_ratings(&self.contents.events, now_s(), &s.signals);
        r.retain(|r| (r.item as usize) < n_items);
        r
    }

    /// The user vector (reconstructed if events or the model changed) and the consumed items.
    fn personal_state(
        &mut self,
        model: &RoundModel,
        s: &Settings,
    ) -> Result<(Option<UserState>, Vec<Rating>), SdkError> {
        let consumed = self.ratings(model.model.shape().n_items, s);
        let now = now_s();
        if needs_solve(self.user_solved_at, now, s.signals.half_life) {
            let user = if consumed.is_empty() {
                None
            } else {
                let state = reconstruct(model, &consumed, &self.train_params(s))
                    .map_err(|e| SdkError::Internal(e.to_string()))?;
                Some(StoredUser { model_version: model.version, state })
            };
            // Kept in memory; persisted with the next save.
            self.contents.user = user;
            self.user_solved_at = Some(now);
        }
        Ok((self.contents.user.as_ref().map(|u| u.state.clone()), consumed))
    }

    /// Builds the content index for `model`'s catalogue from the tags, if not built yet.
    fn ensure_content(&mut self, model: &RoundModel) {
        let n_items = model.model.shape().n_items;
        if self.content.as_ref().is_some_and(|c| c.n_items() == n_items) || self.tags.is_empty() {
            return;
        }
        let mut index = ContentIndex::new(n_items);
        for (&item, tags) in self.tags.range(..u32::try_from(n_items).unwrap_or(u32::MAX)) {
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            // Tags were checked when set; one the index still refuses (a full vocabulary)
            // only loses that item's content features.
            let _ = index.set_tags(item, &tags);
        }
        self.content = Some(index);
    }

    fn install_ruleset(&mut self, ruleset: VerifiedRuleset) -> Result<(), SdkError> {
        // Checked again under the lock: a fetch that started before a newer ruleset was
        // installed must not replace it.
        if let Some(installed) = self.ruleset.as_ref().map(VerifiedRuleset::version)
            && installed > ruleset.version()
        {
            return Err(rules::RulesError::Rollback { installed, offered: ruleset.version() }.into());
        }
        let signed = ruleset.signed_bytes().to_vec();
        self.update(|c| c.ruleset = Some(signed))?;
        self.ruleset = Some(ruleset);
        Ok(())
    }

    fn install_model(&mut self, model: Arc<RoundModel>, s: &Settings) -> Result<(), SdkError> {
        let shape = model.model.shape();
        shape.validate().map_err(|e| SdkError::InvalidArgument(format!("model: {e}")))?;
        if model_bytes(&shape) > s.model_budget_bytes {
            return Err(SdkError::TooLarge("the model exceeds the memory budget".into()));
        }
        self.update(|c| {
            c.model = Some(model);
            c.user = None;
        })?;
        self.user_solved_at = None;
        if self.content.as_ref().is_some_and(|c| c.n_items() != shape.n_items) {
            self.content = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_vector_is_solved_again_as_time_passes() {
        let day = std::time::Duration::from_secs(24 * 3600);
        let half_life = day * 64; // refresh every day
        assert!(needs_solve(None, 1_000, half_life), "never solved");
        assert!(!needs_solve(Some(1_000), 1_000, half_life));
        assert!(!needs_solve(Some(1_000), 1_000 + 86_399, half_life));
        assert!(needs_solve(Some(1_000), 1_000 + 86_400, half_life), "a day later");
        assert!(needs_solve(Some(1_000), 999, half_life), "the clock went back");
        // A tiny half-life still waits a second; a huge one does not overflow.
        assert!(!needs_solve(Some(5), 5, std::time::Duration::from_secs(1)));
        assert!(!needs_solve(Some(0), 1 << 40, std::time::Duration::MAX));
    }

    #[test]
    fn sdk_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Sdk>();
    }

    #[test]
    fn model_bytes_counts_every_parameter() {
        let s = ModelShape { n_items: 1682, dim: 32, n_segments: 8 };
        assert_eq!(model_bytes(&s), 4 * (1682 * 33 + 8 * 33));
    }
}
