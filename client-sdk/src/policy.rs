//! The device's own privacy policy and record: which tasks it accepts, and what it has contributed.
//!
//! A task declares its round's privacy parameters ([`TaskPrivacy`]: mechanism, noise
//! multiplier `σ`, clip norm, selection, minimum cohort, aggregation). Before the device
//! trains, its [`PrivacyPolicy`] checks them and either admits the task — charging the
//! round to the device's [`PrivacyRecord`] first — or refuses it with a [`RefusalReason`]:
//! then nothing is computed or sent, and the coordinator sees a dropout.
//!
//! # What this protects against, and what not
//!
//! The coordinator is honest but curious. The parameters are declared by the coordinator and
//! the device cannot verify them: a coordinator that lies about `σ` (or adds no noise at all)
//! is caught only by secure aggregation with distributed noise, where each device adds its
//! own share. The policy defends against a misconfigured coordinator — `σ = 0`, first-come
//! selection, a tiny cohort — and the record keeps what the device was promised.
//!
//! # The record
//!
//! The device's own ε is the RDP composition ([`fedrec_shared::privacy::rdp`]) of the
//! Poisson-subsampled Gaussian over the rounds it contributed to — not over every round the
//! coordinator ran — converted to ε at the policy's δ. A round is charged when its task is
//! admitted, before training; a round whose upload then fails stays charged (the
//! conservative direction). A round without noise charges ε = ∞: the device has then lost
//! its guarantee, and a policy with any finite limit admits nothing more. The record keeps
//! the composition (one RDP value per order) and the last [`MAX_RECORD_ENTRIES`] rounds.
//!
//! A distributed-noise round (`docs/ddp.md`) is priced twice. At admission its bit width is
//! not yet known, so it is charged as central noise of its multiplier. At share-keys the
//! round's parameters fix the grid, and the device prices the exact event it is about to
//! join — the distributed discrete Gaussian with the rounding's inflated sensitivity and the
//! fewest survivors the round may commit with ([`DistributedCharge`]); its RDP is at least
//! the central one at every order, and [`PrivacyPolicy::reprice`] tops the record up to it
//! (order by order, the maximum of both curves) or refuses the round before any of the
//! device's shares or masked input leaves it ([`TaskGate::reprice`]). Fractional orders are
//! charged the DDGauss value at the next integer (an upper bound: see
//! [`fedrec_shared::ddp::accountant::rdp_at_orders`]).

use std::collections::VecDeque;

use fedrec_shared::ddp::accountant::rdp_at_orders;
use fedrec_shared::privacy;
use fedrec_shared::privacy::rdp::{self, DEFAULT_ORDERS};
use fedrec_shared::round::secure::{DistributedCharge, DistributedPolicy, SecurePolicy};
use fedrec_shared::round::{Aggregation, Mechanism, TaskPrivacy, TaskSelection};

/// Most rounds the record lists individually (the composition covers every round).
pub const MAX_RECORD_ENTRIES: usize = 64;

/// Why the device refused a task. Codes are stable ([`RefusalReason::code`]); the C ABI
/// reports them as `FedrecRefusal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalReason {
    /// No noise, or a noise multiplier below the policy's minimum (code 1).
    NoiseTooLow,
    /// One round would cost more than the policy's ε per round at its δ (code 2).
    EpsilonTooHigh,
    /// The round's cohort is below the policy's minimum (code 3).
    CohortTooSmall,
    /// The policy requires secure aggregation and the round is plain (code 4).
    SecureAggregationRequired,
    /// The device's own composed ε would exceed its limit (code 5).
    DeviceBudgetSpent,
    /// First-come selection: the round does not sample devices, which the accounting assumes (code 6).
    NotSampled,
    /// A mechanism or aggregation mode this SDK does not know (code 7).
    UnknownMechanism,
}

impl RefusalReason {
    /// Every reason, in code order.
    pub const ALL: [RefusalReason; 7] = [
        RefusalReason::NoiseTooLow,
        RefusalReason::EpsilonTooHigh,
        RefusalReason::CohortTooSmall,
        RefusalReason::SecureAggregationRequired,
        RefusalReason::DeviceBudgetSpent,
        RefusalReason::NotSampled,
        RefusalReason::UnknownMechanism,
    ];

    /// The stable numeric code (never 0: 0 means "no refusal" in the C ABI).
    pub fn code(self) -> u32 {
        match self {
            RefusalReason::NoiseTooLow => 1,
            RefusalReason::EpsilonTooHigh => 2,
            RefusalReason::CohortTooSmall => 3,
            RefusalReason::SecureAggregationRequired => 4,
            RefusalReason::DeviceBudgetSpent => 5,
            RefusalReason::NotSampled => 6,
            RefusalReason::UnknownMechanism => 7,
        }
    }

    /// A short stable label (for logs and the export).
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::NoiseTooLow => "noise_too_low",
            RefusalReason::EpsilonTooHigh => "epsilon_too_high",
            RefusalReason::CohortTooSmall => "cohort_too_small",
            RefusalReason::SecureAggregationRequired => "secure_aggregation_required",
            RefusalReason::DeviceBudgetSpent => "device_budget_spent",
            RefusalReason::NotSampled => "not_sampled",
            RefusalReason::UnknownMechanism => "unknown_mechanism",
        }
    }
}

impl std::fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Which tasks the device accepts. A budget, so no `Default`: start from
/// [`PrivacyPolicy::production`] and lower it only in tests and simulations
/// ([`PrivacyPolicy::unenforced`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyPolicy {
    /// Smallest noise multiplier `σ` accepted (a task without noise has `σ = 0`).
    pub min_noise_multiplier: f64,
    /// Largest ε one round may cost at [`PrivacyPolicy::delta`].
    pub max_epsilon_per_round: f64,
    /// Largest ε the device's own record may reach at [`PrivacyPolicy::delta`].
    pub max_total_epsilon: f64,
    /// The δ every ε here is stated at.
    pub delta: f64,
    /// Smallest cohort accepted: `q · population` for a Poisson round that declares its
    /// population, else the round's `min_reports`.
    pub min_cohort: u64,
    /// Refuse first-come selection (the accountant models Poisson sampling only).
    pub require_sampling: bool,
    /// Refuse rounds without secure aggregation (a coordinator that would see this device's
    /// update on its own). On in production: a fresh coordinator runs secure aggregation.
    pub require_secure_aggregation: bool,
    /// Refuse rounds whose noise is not added on the devices (`mechanism = "distributed"`):
    /// a coordinator then never sees an un-noised sum and cannot remove the noise. Off in
    /// [`PrivacyPolicy::production`] (a fresh coordinator's template uses central noise);
    /// turn it on when your coordinator runs distributed noise.
    pub require_distributed_noise: bool,
}

impl PrivacyPolicy {
    /// Production values: `σ ≥ 0.5`, ε ≤ 1 per round and ε ≤ 10 in all at δ = 10⁻⁶, a cohort
    /// of at least 100, Poisson sampling, secure aggregation.
    pub fn production() -> Self {
        Self {
            min_noise_multiplier: 0.5,
            max_epsilon_per_round: 1.0,
            max_total_epsilon: 10.0,
            delta: 1e-6,
            min_cohort: 100,
            require_sampling: true,
            require_secure_aggregation: true,
            require_distributed_noise: false,
        }
    }

    /// Admits every task, with or without noise, and still records every charge. For tests
    /// and simulations of coordinators without privacy; never for users.
    pub fn unenforced() -> Self {
        Self {
            min_noise_multiplier: 0.0,
            max_epsilon_per_round: f64::INFINITY,
            max_total_epsilon: f64::INFINITY,
            delta: 1e-6,
            min_cohort: 0,
            require_sampling: false,
            require_secure_aggregation: false,
            require_distributed_noise: false,
        }
    }

    /// What the device requires of a secure-aggregation round before it sends anything that
    /// depends on its update: the policy's minimum cohort also bounds the cohort that reached
    /// share-keys.
    pub fn secure_policy(&self) -> SecurePolicy {
        SecurePolicy {
            min_cohort: u32::try_from(self.min_cohort).unwrap_or(u32::MAX).max(2),
            ..SecurePolicy::default()
        }
    }

    /// What the device requires of distributed noise: [`PrivacyPolicy::require_distributed_noise`],
    /// and the same minimum noise multiplier, measured on the rounded sensitivity (refused at
    /// share-keys, before any share leaves the device).
    pub fn distributed_policy(&self) -> DistributedPolicy {
        DistributedPolicy {
            require_distributed: self.require_distributed_noise,
            min_noise_multiplier: self.min_noise_multiplier,
        }
    }

    /// Checks the values: δ in `(0, 1)`, the others non-negative and not NaN.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err("policy.delta must be in (0, 1)");
        }
        if !(self.min_noise_multiplier >= 0.0 && self.min_noise_multiplier.is_finite()) {
            return Err("policy.min_noise_multiplier must be finite and >= 0");
        }
        if [self.max_epsilon_per_round, self.max_total_epsilon].iter().any(|e| e.is_nan() || *e < 0.0) {
            return Err("policy epsilon limits must be >= 0 (infinity allowed)");
        }
        Ok(())
    }

    /// Admits `task` given what the device has contributed (`record`): the charge the round
    /// costs, or the first reason to refuse in this order: unknown mechanism, noise, sampling,
    /// cohort, secure aggregation, ε per round, the device's own limit.
    pub fn admit(&self, task: &TaskPrivacy, record: &PrivacyRecord) -> Result<Charge, RefusalReason> {
        if matches!(task.mechanism, Mechanism::Unknown(_))
            || matches!(task.aggregation, Aggregation::Unknown(_))
        {
            return Err(RefusalReason::UnknownMechanism);
        }
        let sigma = match task.mechanism {
            Mechanism::None => 0.0,
            _ => task.noise_multiplier,
        };
        if sigma < self.min_noise_multiplier || (sigma <= 0.0 && self.min_noise_multiplier > 0.0) {
            return Err(RefusalReason::NoiseTooLow);
        }
        if self.require_sampling && !matches!(task.selection, TaskSelection::Poisson { .. }) {
            return Err(RefusalReason::NotSampled);
        }
        if cohort(task) < self.min_cohort as f64 {
            return Err(RefusalReason::CohortTooSmall);
        }
        if self.require_secure_aggregation && task.aggregation != Aggregation::Secure {
            return Err(RefusalReason::SecureAggregationRequired);
        }
        let q = task.sampling_probability();
        let round_rdp = privacy::round_rdp(q, sigma);
        let (epsilon, total_epsilon) = self.within_limits(&round_rdp, &round_rdp, record)?;
        Ok(Charge {
            q,
            noise_multiplier: sigma,
            clip_norm: task.clip_norm,
            epsilon,
            round_rdp,
            total_epsilon,
        })
    }

    /// Prices a distributed-noise round at share-keys: the increment that raises the round's
    /// admitted charge (recorded in `record` under `charge.round`; none counts as nothing
    /// charged yet) to the exact DDGauss event, order by order. Refuses with
    /// [`RefusalReason::EpsilonTooHigh`] or [`RefusalReason::DeviceBudgetSpent`] when the
    /// repriced round breaks the policy's limits; the record is not changed here (see
    /// [`PrivacyRecord::top_up`]). Priced against the round's admitted charge: once per round
    /// (the driver takes the charge once); a second top-up of the same round charges its
    /// increment again (the conservative direction).
    pub fn reprice(
        &self,
        charge: &DistributedCharge,
        record: &PrivacyRecord,
    ) -> Result<TopUp, RefusalReason> {
        // No entry: nothing charged yet (the whole exact curve is added).
        let admitted = record
            .entry(charge.round)
            .map_or_else(|| vec![0.0; DEFAULT_ORDERS.len()], |e| privacy::round_rdp(e.q, e.noise_multiplier));
        let exact = rdp_at_orders(&charge.event, &DEFAULT_ORDERS);
        // `a` may be ∞ (a round charged without noise): nothing to add then.
        let increment: Vec<f64> =
            admitted.iter().zip(&exact).map(|(&a, &x)| if x > a { x - a } else { 0.0 }).collect();
        let round_rdp: Vec<f64> = admitted.iter().zip(&increment).map(|(a, i)| a + i).collect();
        let (epsilon, total_epsilon) = self.within_limits(&round_rdp, &increment, record)?;
        Ok(TopUp { round: charge.round, epsilon, total_epsilon, increment })
    }

    /// The round's ε (from its whole curve `round_rdp`) and the device's ε once `added` joins
    /// `record`, both at the policy's δ; or the limit they break, per round first.
    fn within_limits(
        &self,
        round_rdp: &[f64],
        added: &[f64],
        record: &PrivacyRecord,
    ) -> Result<(f64, f64), RefusalReason> {
        let epsilon = epsilon_at(round_rdp, self.delta);
        if epsilon > self.max_epsilon_per_round {
            return Err(RefusalReason::EpsilonTooHigh);
        }
        let total: Vec<f64> = record.rdp.iter().zip(added).map(|(a, b)| a + b).collect();
        let total_epsilon = epsilon_at(&total, self.delta);
        if total_epsilon > self.max_total_epsilon {
            return Err(RefusalReason::DeviceBudgetSpent);
        }
        Ok((epsilon, total_epsilon))
    }
}

/// What [`PrivacyPolicy::reprice`] adds to a round's charge.
#[derive(Debug, Clone, PartialEq)]
pub struct TopUp {
    /// The round.
    pub round: u64,
    /// The round's own ε at the policy's δ after the top-up.
    pub epsilon: f64,
    /// The device's ε after the top-up, at the policy's δ.
    pub total_epsilon: f64,
    increment: Vec<f64>,
}

/// The cohort a task promises: `q · population` for a Poisson round that declares its
/// population, else its `min_reports`.
fn cohort(task: &TaskPrivacy) -> f64 {
    match (task.selection, task.population) {
        (TaskSelection::Poisson { q }, Some(n)) => q * n as f64,
        _ => task.min_reports as f64,
    }
}

/// ε of an RDP curve over [`DEFAULT_ORDERS`] at `delta`; `∞` if the accountant refuses.
fn epsilon_at(curve: &[f64], delta: f64) -> f64 {
    rdp::epsilon_from_rdp(&DEFAULT_ORDERS, curve, delta).map_or(f64::INFINITY, |(e, _)| e)
}

/// What an admitted round costs the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    /// The sampling probability charged (1 for first-come selection).
    pub q: f64,
    /// The noise multiplier charged (0 without noise).
    pub noise_multiplier: f64,
    /// The round's clip norm.
    pub clip_norm: f32,
    /// The round's own ε at the policy's δ.
    pub epsilon: f64,
    /// The device's ε after the round, at the policy's δ.
    pub total_epsilon: f64,
    round_rdp: Vec<f64>,
}

/// One round the device contributed to.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordEntry {
    /// The round.
    pub round: u64,
    /// The model version it trained on.
    pub model_version: u64,
    /// The sampling probability charged.
    pub q: f64,
    /// The noise multiplier charged.
    pub noise_multiplier: f64,
    /// The clip norm.
    pub clip_norm: f32,
    /// The round's ε at the policy's δ when it was charged.
    pub epsilon: f64,
    /// When it was charged (UNIX seconds).
    pub time_s: i64,
}

/// What the device has contributed: the RDP composition over every round it contributed to
/// (one value per order of [`DEFAULT_ORDERS`]), how many, and the last
/// [`MAX_RECORD_ENTRIES`] rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyRecord {
    rdp: Vec<f64>,
    n_rounds: u64,
    entries: VecDeque<RecordEntry>,
}

impl Default for PrivacyRecord {
    /// Nothing contributed.
    fn default() -> Self {
        Self { rdp: vec![0.0; DEFAULT_ORDERS.len()], n_rounds: 0, entries: VecDeque::new() }
    }
}

impl PrivacyRecord {
    /// A record from its parts (as stored): `rdp` must have one finite-or-infinite,
    /// non-negative value per order of [`DEFAULT_ORDERS`].
    pub fn from_parts(rdp: Vec<f64>, n_rounds: u64, entries: Vec<RecordEntry>) -> Result<Self, &'static str> {
        if rdp.len() != DEFAULT_ORDERS.len() || rdp.iter().any(|r| r.is_nan() || *r < 0.0) {
            return Err("privacy record");
        }
        let mut entries: VecDeque<RecordEntry> = entries.into();
        while entries.len() > MAX_RECORD_ENTRIES {
            entries.pop_front();
        }
        Ok(Self { rdp, n_rounds, entries })
    }

    /// Adds an admitted round.
    pub fn charge(&mut self, charge: &Charge, round: u64, model_version: u64, time_s: i64) {
        for (total, r) in self.rdp.iter_mut().zip(&charge.round_rdp) {
            *total += r;
        }
        self.n_rounds = self.n_rounds.saturating_add(1);
        if self.entries.len() == MAX_RECORD_ENTRIES {
            self.entries.pop_front();
        }
        self.entries.push_back(RecordEntry {
            round,
            model_version,
            q: charge.q,
            noise_multiplier: charge.noise_multiplier,
            clip_norm: charge.clip_norm,
            epsilon: charge.epsilon,
            time_s,
        });
    }

    /// Adds a repriced round's increment ([`PrivacyPolicy::reprice`] of this record); the
    /// round's entry then shows its repriced ε. A round without an entry (never admitted) is
    /// added as a new round.
    pub fn top_up(&mut self, top_up: &TopUp) {
        for (total, r) in self.rdp.iter_mut().zip(&top_up.increment) {
            *total += r;
        }
        match self.entries.iter_mut().rev().find(|e| e.round == top_up.round) {
            Some(entry) => entry.epsilon = top_up.epsilon,
            None => self.n_rounds = self.n_rounds.saturating_add(1),
        }
    }

    /// The entry of `round`, if the list still holds it.
    pub fn entry(&self, round: u64) -> Option<&RecordEntry> {
        self.entries.iter().rev().find(|e| e.round == round)
    }

    /// The device's own ε at `delta` (∞ after a round without noise).
    pub fn epsilon(&self, delta: f64) -> f64 {
        epsilon_at(&self.rdp, delta)
    }

    /// Rounds contributed to.
    pub fn n_rounds(&self) -> u64 {
        self.n_rounds
    }

    /// The last rounds, oldest first.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = &RecordEntry> {
        self.entries.iter()
    }

    /// The composed RDP, one value per order of [`DEFAULT_ORDERS`].
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }
}

/// A task as offered to the device, before it trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskOffer {
    /// The round.
    pub round: u64,
    /// The model version to train on.
    pub model_version: u64,
    /// What the task declares.
    pub privacy: TaskPrivacy,
}

/// Decides, before the device trains, whether it takes a task (see
/// [`crate::net::Device::participate_gated`]). An admitting gate charges the round first.
pub trait TaskGate {
    /// Admits the task (after recording its charge) or refuses it.
    fn admit(&mut self, offer: &TaskOffer) -> Result<(), RefusalReason>;

    /// What the device requires of a secure-aggregation round before it sends anything that
    /// depends on its update (the cohort that reached share-keys, `k`, `t`, the graph).
    fn secure_policy(&self) -> SecurePolicy {
        SecurePolicy::default()
    }

    /// What the device requires of distributed noise (checked when the task arrives and at
    /// share-keys).
    fn distributed_policy(&self) -> DistributedPolicy {
        DistributedPolicy::default()
    }

    /// Tops the record up to a distributed round's exact price, known at share-keys, or
    /// refuses the round (before the device's shares leave it). The default records nothing.
    fn reprice(&mut self, _charge: &DistributedCharge) -> Result<(), RefusalReason> {
        Ok(())
    }
}

/// Admits everything and records nothing: a device driven without a policy (the default of
/// [`crate::net::Device`], for simulations and tests; the [`crate::sdk::Sdk`] always has a policy).
#[derive(Debug, Clone, Copy, Default)]
pub struct AdmitAll;

impl TaskGate for AdmitAll {
    fn admit(&mut self, _offer: &TaskOffer) -> Result<(), RefusalReason> {
        Ok(())
    }
}

/// A policy and an in-memory record: the gate of a [`crate::net::Device`] driven without the
/// SDK's store (simulations, tests).
#[derive(Debug, Clone)]
pub struct PolicyGate {
    /// The policy.
    pub policy: PrivacyPolicy,
    /// What the device has contributed.
    pub record: PrivacyRecord,
}

impl TaskGate for PolicyGate {
    fn secure_policy(&self) -> SecurePolicy {
        self.policy.secure_policy()
    }

    fn distributed_policy(&self) -> DistributedPolicy {
        self.policy.distributed_policy()
    }

    fn admit(&mut self, offer: &TaskOffer) -> Result<(), RefusalReason> {
        let charge = self.policy.admit(&offer.privacy, &self.record)?;
        self.record.charge(&charge, offer.round, offer.model_version, now_s());
        Ok(())
    }

    fn reprice(&mut self, charge: &DistributedCharge) -> Result<(), RefusalReason> {
        let top_up = self.policy.reprice(charge, &self.record)?;
        self.record.top_up(&top_up);
        Ok(())
    }
}

/// UNIX seconds now (0 if the clock is before 1970).
pub(crate) fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noised(q: f64, sigma: f64, population: u64) -> TaskPrivacy {
        TaskPrivacy {
            mechanism: Mechanism::CentralGaussian,
            noise_multiplier: sigma,
            clip_norm: 1.0,
            selection: TaskSelection::Poisson { q },
            min_reports: 1,
            population: Some(population),
            aggregation: Aggregation::Secure,
        }
    }

    #[test]
    fn production_refuses_each_weakness_with_its_reason() {
        let p = PrivacyPolicy::production();
        let r = PrivacyRecord::default();
        let good = noised(0.01, 2.0, 100_000);
        assert!(p.admit(&good, &r).is_ok());
        let cases = [
            (TaskPrivacy { noise_multiplier: 0.0, ..good }, RefusalReason::NoiseTooLow),
            (TaskPrivacy { mechanism: Mechanism::None, ..good }, RefusalReason::NoiseTooLow),
            (TaskPrivacy { noise_multiplier: 0.3, ..good }, RefusalReason::NoiseTooLow),
            (
                TaskPrivacy { selection: TaskSelection::FirstCome { cohort: 1000 }, ..good },
                RefusalReason::NotSampled,
            ),
            (noised(0.01, 2.0, 5_000), RefusalReason::CohortTooSmall),
            (TaskPrivacy { population: None, ..good }, RefusalReason::CohortTooSmall),
            (noised(1.0, 0.6, 100_000), RefusalReason::EpsilonTooHigh),
            (TaskPrivacy { mechanism: Mechanism::Unknown(7), ..good }, RefusalReason::UnknownMechanism),
            (TaskPrivacy { aggregation: Aggregation::Unknown(7), ..good }, RefusalReason::UnknownMechanism),
        ];
        for (task, want) in cases {
            assert_eq!(p.admit(&task, &r).err(), Some(want), "{task:?}");
        }
        // Production requires secure aggregation; a policy that waives it admits a plain round.
        let plain = TaskPrivacy { aggregation: Aggregation::Plain, ..good };
        assert_eq!(p.admit(&plain, &r).err(), Some(RefusalReason::SecureAggregationRequired));
        let waived = PrivacyPolicy { require_secure_aggregation: false, ..p };
        assert!(waived.admit(&plain, &r).is_ok());
    }

    #[test]
    fn the_record_composes_its_own_rounds_and_stops_at_the_limit() {
        let p = PrivacyPolicy { max_total_epsilon: 2.0, ..PrivacyPolicy::production() };
        let task = noised(0.01, 2.0, 100_000);
        let mut r = PrivacyRecord::default();
        let mut last = 0.0;
        let mut admitted = 0;
        while let Ok(charge) = p.admit(&task, &r) {
            r.charge(&charge, admitted, 0, 0);
            admitted += 1;
            let eps = r.epsilon(p.delta);
            assert!(eps > last && (eps - charge.total_epsilon).abs() < 1e-12, "{eps} after {last}");
            last = eps;
            assert!(admitted < 100_000, "never stops");
        }
        assert_eq!(p.admit(&task, &r).err(), Some(RefusalReason::DeviceBudgetSpent));
        assert!(admitted > 1 && last <= 2.0, "{admitted} rounds, ε = {last}");
        eprintln!("σ = 2, q = 0.01, δ = 1e-6: {admitted} rounds within ε = 2 (ε = {last:.4})");
        assert_eq!(r.n_rounds(), admitted);
        assert_eq!(r.entries().len(), (admitted as usize).min(MAX_RECORD_ENTRIES));
        // The composition is the accountant's for that many identical rounds.
        let events = [fedrec_shared::privacy::PrivacyEvent::new(0.01, 2.0, admitted).expect("valid")];
        let want = rdp::epsilon(&events, p.delta).expect("accountant");
        assert!((last - want).abs() < 1e-9 * want.max(1.0), "{last} vs {want}");
    }

    /// A distributed event of one round at `q`: `n` shares of variance `var` (grid units) and
    /// rounded sensitivity `l2` in `dim` coordinates — DDGauss noise multiplier `l2/√(n var)`.
    fn ddgauss(round: u64, q: f64, l2: f64, n: usize, var: f64) -> DistributedCharge {
        let event = fedrec_shared::ddp::DdpEvent::from_parts(q, 1, l2, l2 * 8.0, var, n, 64).expect("valid");
        DistributedCharge { round, event }
    }

    #[test]
    fn a_distributed_round_is_topped_up_to_its_exact_price_before_its_shares_leave() {
        let p = PrivacyPolicy::production();
        let task =
            TaskPrivacy { mechanism: Mechanism::DistributedDiscreteGaussian, ..noised(0.01, 2.0, 100_000) };
        let mut r = PrivacyRecord::default();
        let admitted = p.admit(&task, &r).expect("admitted");
        r.charge(&admitted, 5, 1, 0);
        let before = r.clone();
        // Rounding inflated the sensitivity: 10 shares of variance 250 (σ_t = 50) against
        // Δ₂ = 30 is a noise multiplier of 5/3, below the declared 2.
        let charge = ddgauss(5, 0.01, 30.0, 10, 250.0);
        let top_up = p.reprice(&charge, &r).expect("within the limits");
        assert_eq!(r, before, "pricing alone changes nothing");
        assert!(top_up.epsilon > admitted.epsilon, "{} vs {}", top_up.epsilon, admitted.epsilon);
        r.top_up(&top_up);
        // Order by order, the record holds the larger of the central and the exact curve.
        let central = privacy::round_rdp(0.01, 2.0);
        let exact = rdp_at_orders(&charge.event, &DEFAULT_ORDERS);
        for ((got, c), x) in r.rdp().iter().zip(&central).zip(&exact) {
            assert!((got - c.max(*x)).abs() <= 1e-12 * got.max(1.0), "{got} vs max({c}, {x})");
        }
        assert!((r.epsilon(p.delta) - top_up.total_epsilon).abs() < 1e-12);
        assert_eq!((r.n_rounds(), r.entry(5).map(|e| e.epsilon)), (1, Some(top_up.epsilon)));
        // The exact event alone (never cheaper than the central price of its own multiplier).
        let alone = epsilon_at(&exact, p.delta);
        assert!(top_up.epsilon >= alone && alone > epsilon_at(&privacy::round_rdp(0.01, 5.0 / 3.0), p.delta));

        // More noise than declared adds nothing.
        let quieter = p.reprice(&ddgauss(5, 0.01, 10.0, 10, 250.0), &r).expect("within the limits");
        let mut same = r.clone();
        same.top_up(&quieter);
        assert_eq!(same.rdp(), r.rdp());
    }

    #[test]
    fn a_distributed_round_over_the_device_limits_is_refused_at_share_keys() {
        let task =
            TaskPrivacy { mechanism: Mechanism::DistributedDiscreteGaussian, ..noised(0.01, 2.0, 100_000) };
        let charge = ddgauss(5, 0.01, 30.0, 10, 250.0);
        let open = PrivacyPolicy::production();
        let mut r = PrivacyRecord::default();
        let admitted = open.admit(&task, &r).expect("admitted");
        r.charge(&admitted, 5, 1, 0);
        let exact = open.reprice(&charge, &r).expect("within the limits");
        // Limits between the central and the exact price: admitted, then refused.
        let mid = (admitted.epsilon + exact.epsilon) / 2.0;
        let per_round = PrivacyPolicy { max_epsilon_per_round: mid, ..open };
        assert!(per_round.admit(&task, &PrivacyRecord::default()).is_ok());
        assert_eq!(per_round.reprice(&charge, &r).err(), Some(RefusalReason::EpsilonTooHigh));
        let total = (admitted.total_epsilon + exact.total_epsilon) / 2.0;
        let device = PrivacyPolicy { max_total_epsilon: total, ..open };
        assert!(device.admit(&task, &PrivacyRecord::default()).is_ok());
        assert_eq!(device.reprice(&charge, &r).err(), Some(RefusalReason::DeviceBudgetSpent));
        // A round that was never admitted is added whole.
        let mut fresh = PrivacyRecord::default();
        let whole = open.reprice(&charge, &fresh).expect("within the limits");
        fresh.top_up(&whole);
        assert_eq!(fresh.n_rounds(), 1);
        assert!(
            (fresh.epsilon(open.delta)
                - epsilon_at(&rdp_at_orders(&charge.event, &DEFAULT_ORDERS), open.delta))
            .abs()
                < 1e-12
        );
    }

    #[test]
    fn a_round_without_noise_spends_everything() {
        let mut r = PrivacyRecord::default();
        let open = PrivacyPolicy::unenforced();
        let bare = TaskPrivacy::undeclared(1.0);
        let charge = open.admit(&bare, &r).expect("admitted");
        assert!(charge.epsilon.is_infinite());
        r.charge(&charge, 0, 0, 0);
        assert!(r.epsilon(1e-6).is_infinite());
        let strict = PrivacyPolicy { max_total_epsilon: 1e9, ..PrivacyPolicy::unenforced() };
        assert_eq!(strict.admit(&noised(0.01, 5.0, 1), &r).err(), Some(RefusalReason::DeviceBudgetSpent));
    }

    #[test]
    fn reason_codes_are_distinct_and_non_zero() {
        let mut codes: Vec<u32> = RefusalReason::ALL.iter().map(|r| r.code()).collect();
        assert!(codes.iter().all(|&c| c > 0));
        codes.dedup();
        assert_eq!(codes, (1..=7).collect::<Vec<_>>());
    }
}
