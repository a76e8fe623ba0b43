//! The privacy ledger and budget: every committed round's privacy event, kept so that a restart never forgets spend, and the check that refuses a round which could overspend.
//!
//! What is charged, and when: a round is charged when it commits, because only then is
//! anything computed from the devices' data released (the noised sum). The charge is the
//! round's Poisson sampling probability `q` and its effective noise multiplier (the update's
//! noise combined with the adaptive-clipping bits' noise). A round with noise always commits
//! (its outcome may not depend on how many devices reported); only rounds without noise are
//! ever abandoned, and an abandoned round releases nothing and is not charged. Before a round starts, the coordinator adds that round's
//! charge to the ledger and refuses to start if the result would exceed the budget — so the
//! budget holds whatever the round's outcome.
//!
//! A round with distributed noise (`docs/ddp.md`) is charged a [`DdpCharge`] instead: the
//! distributed discrete Gaussian accountant's event ([`crate::ddp::accountant`], DDGauss
//! Proposition 14 with Zhu & Wang's Poisson subsampling) for `min_reports` noise shares. A
//! committed round carries at least that many (the others' shares are independent noise added
//! on top: post-processing), so the charge holds whatever the survivors were, and it does not
//! depend on their count, which stays private. A round with fewer survivors aborts, releases
//! nothing and is not charged. Once a ledger holds such a charge, its ε is the Rényi
//! composition of every entry over the distributed accountant's integer orders (whichever
//! accountant the policy names: the distributed bound is a Rényi bound).

use crate::ddp::DdpEvent;
use crate::ddp::accountant as ddp_accountant;
use crate::privacy::rdp::{epsilon_from_rdp, rdp_sampled_gaussian};
use crate::privacy::{self, AccountantKind, PrivacyError, PrivacyEvent};

/// An (ε, δ) budget. There is no default: the operator must choose it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyBudget {
    epsilon: f64,
    delta: f64,
}

impl PrivacyBudget {
    /// A budget of `epsilon` (positive, finite) at `delta` (in `(0, 1)`).
    pub fn new(epsilon: f64, delta: f64) -> Result<Self, PrivacyError> {
        if !(epsilon > 0.0 && epsilon.is_finite()) {
            return Err(PrivacyError::Epsilon(epsilon));
        }
        if !(delta > 0.0 && delta < 1.0) {
            return Err(PrivacyError::Delta(delta));
        }
        Ok(Self { epsilon, delta })
    }

    /// The ε the spend may reach.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// The δ at which ε is accounted.
    pub fn delta(&self) -> f64 {
        self.delta
    }
}

/// A budget and the accountant that measures spend against it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyPolicy {
    /// The budget.
    pub budget: PrivacyBudget,
    /// The accountant.
    pub accountant: AccountantKind,
}

/// One committed round's charge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LedgerEntry {
    /// The round.
    pub round: u64,
    /// Its Poisson sampling probability.
    pub q: f64,
    /// The noise multiplier the accountant charges: the round's mechanisms combined.
    pub noise_multiplier: f64,
    /// The second mechanism, if any: the noise σ_b on the adaptive-clipping bits (the
    /// update's own multiplier is then `(z⁻² − σ_b⁻²)^(−½)`).
    pub clip_bits_noise: Option<f64>,
}

impl LedgerEntry {
    /// The entry's canonical bytes, which a tamper-evident store hashes: a tag, then the
    /// round (u64), `q` and the noise multiplier (f64 bits), and the clip bits' noise (a
    /// presence byte and its f64 bits), all little-endian. Bit-exact: a charge read back
    /// must hash as the charge made.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        out.extend_from_slice(b"fedrec-ledger-entry-v1\0");
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&self.q.to_bits().to_le_bytes());
        out.extend_from_slice(&self.noise_multiplier.to_bits().to_le_bytes());
        match self.clip_bits_noise {
            None => out.push(0),
            Some(zb) => {
                out.push(1);
                out.extend_from_slice(&zb.to_bits().to_le_bytes());
            }
        }
        out
    }
}

/// One committed distributed-noise round's charge: the distributed accountant's event for
/// one round ([`DdpEvent`], `steps = 1`) with the noise of `min_reports` shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdpCharge {
    /// The round.
    pub round: u64,
    /// Its event (sampling probability, rounded sensitivities, `σ_dev²`, shares charged, `D`).
    pub event: DdpEvent,
}

impl DdpCharge {
    /// The charge's canonical bytes, for a tamper-evident store: a tag, the round (u64), then
    /// `q`, `Δ₂`, `Δ₁`, `σ_dev²` (f64 bits), the shares and `D` (u64), little-endian.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let e = &self.event;
        let mut out = Vec::with_capacity(80);
        out.extend_from_slice(b"fedrec-ddp-ledger-entry-v1\0");
        out.extend_from_slice(&self.round.to_le_bytes());
        for x in [e.q(), e.l2(), e.l1(), e.device_var()] {
            out.extend_from_slice(&x.to_bits().to_le_bytes());
        }
        for n in [e.n_survivors(), e.dim()] {
            out.extend_from_slice(&(n as u64).to_le_bytes());
        }
        out
    }
}

/// Every charge so far, in order: central rounds' [`LedgerEntry`]s and distributed rounds'
/// [`DdpCharge`]s.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Ledger {
    entries: Vec<LedgerEntry>,
    ddp: Vec<DdpCharge>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// A ledger restored from storage; every entry is checked.
    pub fn from_entries(entries: Vec<LedgerEntry>) -> Result<Self, PrivacyError> {
        for e in &entries {
            PrivacyEvent::new(e.q, e.noise_multiplier, 1)?;
            if let Some(zb) = e.clip_bits_noise {
                // Combining with the bits' noise can only lower the multiplier.
                if !(zb.is_finite() && zb > e.noise_multiplier) {
                    return Err(PrivacyError::NoiseMultiplier(zb));
                }
            }
        }
        Ok(Self { entries, ddp: Vec::new() })
    }

    /// A ledger restored from storage with distributed-noise charges too; the central entries
    /// are checked as by [`Ledger::from_entries`], and each distributed event is rebuilt by its
    /// checking constructor.
    pub fn from_parts(entries: Vec<LedgerEntry>, ddp: Vec<DdpCharge>) -> Result<Self, PrivacyError> {
        let mut ledger = Self::from_entries(entries)?;
        for c in &ddp {
            let e = c.event;
            DdpEvent::from_parts(e.q(), e.steps(), e.l2(), e.l1(), e.device_var(), e.n_survivors(), e.dim())
                .map_err(|_| PrivacyError::NoiseMultiplier(e.device_var()))?;
        }
        ledger.ddp = ddp;
        Ok(ledger)
    }

    /// The distributed-noise charges, oldest first.
    pub fn ddp_entries(&self) -> &[DdpCharge] {
        &self.ddp
    }

    /// Appends a distributed-noise charge.
    pub fn record_ddp(&mut self, charge: DdpCharge) {
        self.ddp.push(charge);
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> &[LedgerEntry] {
        &self.entries
    }

    /// Appends a charge.
    pub fn record(&mut self, entry: LedgerEntry) {
        self.entries.push(entry);
    }

    /// The entries as accountant events, equal consecutive charges grouped into one event.
    pub fn events(&self) -> Result<Vec<PrivacyEvent>, PrivacyError> {
        Self::group(self.entries.iter())
    }

    fn group<'e>(entries: impl Iterator<Item = &'e LedgerEntry>) -> Result<Vec<PrivacyEvent>, PrivacyError> {
        let mut out: Vec<(f64, f64, u64)> = Vec::new();
        for e in entries {
            match out.last_mut() {
                Some((q, z, n)) if *q == e.q && *z == e.noise_multiplier => *n += 1,
                _ => out.push((e.q, e.noise_multiplier, 1)),
            }
        }
        out.into_iter().map(|(q, z, n)| PrivacyEvent::new(q, z, n)).collect()
    }

    /// ε spent so far at `delta`.
    pub fn epsilon(&self, delta: f64, accountant: AccountantKind) -> Result<f64, PrivacyError> {
        if self.ddp.is_empty() {
            return privacy::epsilon(&self.events()?, delta, accountant);
        }
        Self::mixed_epsilon(self.entries.iter(), self.ddp.iter(), delta)
    }

    /// ε the ledger would show after also charging the distributed-noise round `next`.
    pub fn epsilon_with_ddp(&self, next: &DdpCharge, delta: f64) -> Result<f64, PrivacyError> {
        Self::mixed_epsilon(self.entries.iter(), self.ddp.iter().chain(std::iter::once(next)), delta)
    }

    /// The Rényi composition of central entries (sampled Gaussian) and distributed charges over
    /// the distributed accountant's orders, equal consecutive charges grouped.
    fn mixed_epsilon<'e>(
        central: impl Iterator<Item = &'e LedgerEntry>,
        ddp: impl Iterator<Item = &'e DdpCharge>,
        delta: f64,
    ) -> Result<f64, PrivacyError> {
        let orders = &ddp_accountant::ORDERS;
        let mut total = vec![0.0; orders.len()];
        for event in Self::group(central)? {
            for (acc, &order) in total.iter_mut().zip(orders) {
                *acc +=
                    event.steps() as f64 * rdp_sampled_gaussian(event.q(), event.noise_multiplier(), order)?;
            }
        }
        let mut grouped: Vec<DdpEvent> = Vec::new();
        for c in ddp {
            match grouped.last_mut() {
                Some(last) if last.with_steps(1) == c.event.with_steps(1) => {
                    *last = last.with_steps(last.steps() + c.event.steps());
                }
                _ => grouped.push(c.event),
            }
        }
        for (acc, x) in total.iter_mut().zip(ddp_accountant::compose(&grouped)) {
            *acc += x;
        }
        Ok(epsilon_from_rdp(orders, &total, delta)?.0)
    }

    /// ε the ledger would show after also charging `next`.
    pub fn epsilon_with(
        &self,
        next: &LedgerEntry,
        delta: f64,
        accountant: AccountantKind,
    ) -> Result<f64, PrivacyError> {
        if !self.ddp.is_empty() {
            return Self::mixed_epsilon(
                self.entries.iter().chain(std::iter::once(next)),
                self.ddp.iter(),
                delta,
            );
        }
        let events = Self::group(self.entries.iter().chain(std::iter::once(next)))?;
        privacy::epsilon(&events, delta, accountant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_must_be_positive_and_finite() {
        assert!(PrivacyBudget::new(0.0, 1e-6).is_err());
        assert!(PrivacyBudget::new(f64::INFINITY, 1e-6).is_err());
        assert!(PrivacyBudget::new(f64::NAN, 1e-6).is_err());
        assert!(PrivacyBudget::new(1.0, 0.0).is_err());
        assert!(PrivacyBudget::new(1.0, 1.0).is_err());
        assert!(PrivacyBudget::new(1.0, 1e-6).is_ok());
    }

    #[test]
    fn equal_consecutive_charges_are_grouped() {
        let mut l = Ledger::new();
        for round in 0..3 {
            l.record(LedgerEntry { round, q: 0.1, noise_multiplier: 1.0, clip_bits_noise: None });
        }
        l.record(LedgerEntry { round: 3, q: 0.2, noise_multiplier: 1.0, clip_bits_noise: None });
        let ev = l.events().expect("valid entries");
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].steps(), 3);
        assert_eq!(ev[1].steps(), 1);
        // Grouping does not change the spend.
        let single: Vec<PrivacyEvent> = l
            .entries()
            .iter()
            .map(|e| PrivacyEvent::new(e.q, e.noise_multiplier, 1).expect("valid"))
            .collect();
        let a = privacy::epsilon(&ev, 1e-6, AccountantKind::Rdp).expect("valid");
        let b = privacy::epsilon(&single, 1e-6, AccountantKind::Rdp).expect("valid");
        assert!((a - b).abs() < 1e-9 * a.max(1.0), "{a} vs {b}");
    }

    #[test]
    fn canonical_bytes_tell_every_field_apart() {
        let e = LedgerEntry { round: 3, q: 0.25, noise_multiplier: 1.5, clip_bits_noise: None };
        let variants = [
            LedgerEntry { round: 4, ..e },
            LedgerEntry { q: 0.250_000_000_000_000_06, ..e },
            LedgerEntry { noise_multiplier: 1.6, ..e },
            LedgerEntry { clip_bits_noise: Some(0.0), ..e },
            LedgerEntry { clip_bits_noise: Some(2.0), ..e },
        ];
        let mut seen = vec![e.canonical_bytes()];
        for v in variants {
            let bytes = v.canonical_bytes();
            assert!(!seen.contains(&bytes), "{v:?}");
            seen.push(bytes);
        }
        assert_eq!(e.canonical_bytes(), e.canonical_bytes());
    }

    #[test]
    fn ddp_charges_group_compose_with_central_ones_and_price_the_next_round() {
        let event = DdpEvent::from_parts(0.01, 1, 1000.0, 30_000.0, 1e6, 800, 65_536).expect("valid");
        let mut l = Ledger::new();
        for round in 0..3 {
            let next = DdpCharge { round, event };
            let before = l.epsilon_with_ddp(&next, 1e-6).expect("valid");
            l.record_ddp(next);
            let after = l.epsilon(1e-6, AccountantKind::Rdp).expect("valid");
            assert!((before - after).abs() <= 1e-12 * after, "{before} vs {after}");
        }
        let want = ddp_accountant::epsilon(&[event.with_steps(3)], 1e-6).expect("valid");
        let got = l.epsilon(1e-6, AccountantKind::Pld).expect("valid");
        assert!((got - want).abs() <= 1e-9 * want, "{got} vs {want}");
        // A central round on top costs more; restoring keeps both kinds.
        l.record(LedgerEntry { round: 3, q: 0.01, noise_multiplier: 1.0, clip_bits_noise: None });
        assert!(l.epsilon(1e-6, AccountantKind::Rdp).expect("valid") > want);
        let back = Ledger::from_parts(l.entries().to_vec(), l.ddp_entries().to_vec()).expect("valid");
        assert_eq!(back, l);
        let c = DdpCharge { round: 0, event };
        assert_ne!(c.canonical_bytes(), DdpCharge { round: 1, ..c }.canonical_bytes());
    }

    #[test]
    fn restored_entries_are_checked() {
        assert!(
            Ledger::from_entries(vec![LedgerEntry {
                round: 0,
                q: 1.5,
                noise_multiplier: 1.0,
                clip_bits_noise: None
            }])
            .is_err()
        );
        assert!(
            Ledger::from_entries(vec![LedgerEntry {
                round: 0,
                q: 0.5,
                noise_multiplier: 0.0,
                clip_bits_noise: None
            }])
            .is_err()
        );
        let bits =
            |zb| vec![LedgerEntry { round: 0, q: 0.5, noise_multiplier: 1.0, clip_bits_noise: Some(zb) }];
        assert!(Ledger::from_entries(bits(0.5)).is_err(), "bits noise below the combined multiplier");
        assert!(Ledger::from_entries(bits(f64::NAN)).is_err());
        assert!(Ledger::from_entries(bits(4.0)).is_ok());
    }
}
