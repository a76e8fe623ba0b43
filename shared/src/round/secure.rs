//! The secure-aggregation phases of a round, device side ([`DeviceSecAgg`]) and coordinator side ([`ServerSecAgg`]): key advertisement, sealed shares, masked inputs and unmasking, as `docs/secagg.md` writes them down.
//!
//! The protocol is SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, CCS 2020) in its
//! semi-honest form; with the complete graph it is the SecAgg of Bonawitz et al. (CCS 2017,
//! the "double masking" protocol). The steps below cite the phase of `docs/secagg.md` they
//! implement. The primitives live in [`crate::secagg`]; this module only sequences them and
//! checks what each side receives. Secrets (key pairs, the self-mask seed, shares) stay in
//! these structs, are zeroized on drop and are never serializable.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::{CryptoRng, Rng};
use zeroize::Zeroizing;

use crate::ddp::{self, DdpParams, DdpValidParams};
use crate::privacy::discrete::Grid;
use crate::secagg::crypto::{
    KeyPair, RoundContext, ShareKeyBytes, add_mask, mask_seed, share_keys_both_ways,
};
use crate::secagg::encode::{self, from_ring, ring_add, to_ring};
use crate::secagg::graph::Graph;
use crate::secagg::params::{FinderInput, SecAggParams, bounds, find_params};
use crate::secagg::shamir::{self, SHARE_BYTES, Share};

use super::{ClientId, TaskPrivacy};

/// Bytes of one sealed share pair: the mask-key share and the self-mask share, plus the AEAD tag.
pub const SEALED_PAIR_BYTES: usize = 2 * SHARE_BYTES + 16;

/// The public parameters of one secure round, fixed when the key advertisement closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecAggSetup {
    /// The round's public randomness: salts every key derivation and defines the graph.
    pub seed: [u8; 32],
    /// Devices whose keys arrived (the cohort that reached share-keys).
    pub n: u32,
    /// Neighbours per device (`n − 1`: the complete graph).
    pub k: u32,
    /// Shares that reconstruct a secret.
    pub t: u32,
    /// The ring `Z/2^bits` the masked inputs live in.
    pub bits: u32,
}

impl SecAggSetup {
    fn context(&self, round: u64) -> RoundContext {
        RoundContext { round, seed: self.seed }
    }
}

/// A neighbour's index and its two public keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeighbourKeys {
    /// The neighbour's index in the cohort.
    pub index: u32,
    /// Its key for sealing shares.
    pub cipher_public: [u8; 32],
    /// Its key for agreeing masks.
    pub mask_public: [u8; 32],
}

/// Phase 1, coordinator → device: the round's parameters, the device's index and its
/// neighbours' keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareKeysRequest {
    /// The round.
    pub round: u64,
    /// The parameters.
    pub setup: SecAggSetup,
    /// The receiving device's index in the cohort.
    pub index: u32,
    /// Its neighbours in the graph, by index.
    pub neighbours: Vec<NeighbourKeys>,
}

/// A sealed share pair between two devices, relayed by the coordinator. From a device it names
/// the receiver; to a device, the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedShare {
    /// The other device's index.
    pub peer: u32,
    /// ChaCha20-Poly1305 of the two shares ([`SEALED_PAIR_BYTES`] long).
    pub ciphertext: Vec<u8>,
}

/// Phase 2, coordinator → device: the pairs its neighbours sealed for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedInputRequest {
    /// The round.
    pub round: u64,
    /// One per neighbour that sent shares (their senders are the neighbours whose pairwise
    /// masks the device adds).
    pub shares: Vec<EncryptedShare>,
}

/// Phase 3, coordinator → device: which of its neighbours dropped after sharing and which sent
/// their masked input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskRequest {
    /// The round.
    pub round: u64,
    /// Neighbours whose mask key is to be rebuilt (they shared but sent no masked input).
    pub dropped: Vec<u32>,
    /// Neighbours whose self-mask is to be removed (they sent a masked input).
    pub survivors: Vec<u32>,
}

/// One Shamir share of another device's secret, as revealed in the unmask phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevealedShare {
    /// Whose secret.
    pub owner: u32,
    /// The share ([`Share::to_bytes`]).
    pub share: [u8; SHARE_BYTES],
}

/// Phase 3, device → coordinator: the shares asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskShares {
    /// The round.
    pub round: u64,
    /// Shares of dropped neighbours' mask keys.
    pub mask_key_shares: Vec<RevealedShare>,
    /// Shares of surviving devices' self-mask seeds (its neighbours' and its own).
    pub self_mask_shares: Vec<RevealedShare>,
}

/// What a device requires of a secure round before it sends anything that depends on its
/// update beyond its public keys (checked when the share-keys request arrives).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecurePolicy {
    /// The fewest devices the cohort that reached share-keys may have: the sum of a handful
    /// of updates says much about each.
    pub min_cohort: u32,
    /// The fraction of the cohort the device assumes may collude with the coordinator: the
    /// round's `k` and `t` must keep the chance that some honest device has `t` colluding
    /// neighbours below `2^log2_security` for it.
    pub corrupt: f64,
    /// log2 of the chance the device accepts of that event.
    pub log2_security: f64,
}

impl Default for SecurePolicy {
    /// At least 10 devices, 5% of them possibly colluding, `2^-40`.
    fn default() -> Self {
        Self { min_cohort: 10, corrupt: 0.05, log2_security: -40.0 }
    }
}

/// What a device requires of a round's noise: that it is added on the devices (distributed
/// noise, `docs/ddp.md`), so that no coordinator can remove it, and how much. Checked when the
/// task arrives (a task that does not declare distributed noise is refused before training)
/// and again when the share-keys request fixes the round's parameters (before anything is
/// masked or shared).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DistributedPolicy {
    /// Refuse any round whose noise is not added on the devices (plain, central, or none).
    pub require_distributed: bool,
    /// The smallest effective noise multiplier `σ / (γ Δ₂)` the device accepts for distributed
    /// noise: the target noise on the sum over the rounded sensitivity, both in model units
    /// (the rounding's inflation of the sensitivity counts against it). 0 accepts any.
    pub min_noise_multiplier: f64,
}

/// What a distributed-noise round costs the device, known only at share-keys (when the
/// round's bit width fixes the grid): the exact DDGauss event ([`crate::ddp::DdpEvent`]) with
/// the fewest survivors the round may commit with. A task is admitted — and charged — before
/// training at the central price of its noise multiplier; the driver then tops the device's
/// record up to this event (or refuses) before the device's shares leave it (see
/// [`crate::round::ClientRound::take_distributed_charge`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistributedCharge {
    /// The round.
    pub round: u64,
    /// The event: one round, the task's sampling probability, `min_reports` noise shares.
    pub event: crate::ddp::DdpEvent,
}

/// Why a device stopped in a secure round (it sent nothing further).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecureRefusal {
    /// The cohort that reached share-keys is below the device's minimum.
    #[error("secure aggregation: cohort of {n} below the device's minimum of {min}")]
    CohortTooSmall {
        /// The cohort.
        n: u32,
        /// The device's minimum.
        min: u32,
    },
    /// The threshold or neighbour count do not protect the device under its policy.
    #[error("secure aggregation: k = {k}, t = {t} do not meet the device's policy: {why}")]
    WeakParameters {
        /// Neighbours.
        k: u32,
        /// Threshold.
        t: u32,
        /// What failed.
        why: &'static str,
    },
    /// A message did not follow the protocol (wrong neighbours, bad share, overlapping lists…).
    #[error("secure aggregation: protocol violation: {0}")]
    Protocol(&'static str),
    /// The device's [`DistributedPolicy`] requires distributed noise and the round's task does
    /// not declare it (plain aggregation, central noise, or none).
    #[error("distributed noise required: the round does not add its noise on the devices")]
    NotDistributed,
    /// The round's distributed noise is below the device's [`DistributedPolicy`] (its effective
    /// noise multiplier `σ/(γΔ₂)`), or its parameters are invalid.
    #[error("distributed noise: {0}")]
    DeviceNoiseTooLow(&'static str),
}

/// Where a device is in the secure phases.
enum DeviceState {
    /// Keys advertised; awaiting the share-keys request.
    Advertised,
    /// Shares sent; awaiting the sealed shares of its neighbours.
    /// `open_keys[j]` opens what neighbour `j` sealed for it (derived with the key that
    /// sealed its own shares for `j`: one agreement per neighbour, not two).
    Shared {
        setup: SecAggSetup,
        index: u32,
        neighbours: Vec<NeighbourKeys>,
        own: SharePair,
        open_keys: HashMap<u32, ShareKeyBytes>,
    },
    /// Masked input sent; awaiting the unmask request.
    Masked { index: u32, received: BTreeMap<u32, SharePair>, own: SharePair },
    /// Unmask shares sent: nothing more to say this round.
    Finished,
}

/// The two shares a device holds of one device's secrets.
struct SharePair {
    mask_key: Share,
    self_mask: Share,
}

impl SharePair {
    fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(2 * SHARE_BYTES));
        out.extend_from_slice(&self.mask_key.to_bytes()[..]);
        out.extend_from_slice(&self.self_mask.to_bytes()[..]);
        out
    }

    fn from_bytes(bytes: &[u8]) -> Option<SharePair> {
        if bytes.len() != 2 * SHARE_BYTES {
            return None;
        }
        let mask_key = Share::from_bytes(&bytes[..SHARE_BYTES]).ok()?;
        let self_mask = Share::from_bytes(&bytes[SHARE_BYTES..]).ok()?;
        Some(SharePair { mask_key, self_mask })
    }
}

/// A device's input to a distributed-noise round: the clipped update, until the share-keys
/// request fixes the round's seed; then its [`ddp::encode`]ing (rotated, rounded, noised,
/// wrapped), `D` words below `2^bits`.
struct DeviceDdp {
    update: Zeroizing<Vec<f32>>,
    privacy: TaskPrivacy,
    clip_norm: f32,
    policy: DistributedPolicy,
    words: Option<Zeroizing<Vec<u64>>>,
    /// What the round costs the device, once its parameters are known (share-keys), until
    /// the driver takes it.
    charge: Option<crate::ddp::DdpEvent>,
}

/// One device's secrets and progress in a secure round (Bonawitz et al. 2017, rounds 0–3).
pub struct DeviceSecAgg {
    round: u64,
    policy: SecurePolicy,
    cipher: KeyPair,
    mask: KeyPair,
    self_seed: Zeroizing<[u8; 32]>,
    /// The encoded update on the round's grid (clip bit last, when asked for).
    encoded: Zeroizing<Vec<i64>>,
    /// The grid's `G`, to check the ring is wide enough for the cohort (none with distributed
    /// noise, whose parameters check the ring).
    grid: Option<Grid>,
    clip_bit: bool,
    /// The round's threshold, once known.
    t: usize,
    state: DeviceState,
    /// Distributed noise: the input is encoded by [`ddp::encode`] instead of on the grid.
    ddp: Option<DeviceDdp>,
}

impl std::fmt::Debug for DeviceSecAgg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSecAgg").field("round", &self.round).finish_non_exhaustive()
    }
}

impl DeviceSecAgg {
    /// Phase 0 (Bonawitz et al. round 0, AdvertiseKeys): fresh key pairs and self-mask seed
    /// for `round`, holding the encoded update. Returns the state and the two public keys to
    /// advertise.
    pub fn new<R: Rng + CryptoRng + ?Sized>(
        round: u64,
        encoded: Vec<i64>,
        grid: Grid,
        clip_bit: bool,
        policy: SecurePolicy,
        rng: &mut R,
    ) -> (Self, [u8; 32], [u8; 32]) {
        Self::generate(round, encoded, Some(grid), clip_bit, policy, rng)
    }

    fn generate<R: Rng + CryptoRng + ?Sized>(
        round: u64,
        encoded: Vec<i64>,
        grid: Option<Grid>,
        clip_bit: bool,
        policy: SecurePolicy,
        rng: &mut R,
    ) -> (Self, [u8; 32], [u8; 32]) {
        let cipher = KeyPair::generate(rng);
        let mask = KeyPair::generate(rng);
        let mut self_seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut self_seed[..]);
        let (c, s) = (cipher.public(), mask.public());
        let state = DeviceSecAgg {
            round,
            policy,
            cipher,
            mask,
            self_seed,
            encoded: Zeroizing::new(encoded),
            grid,
            clip_bit,
            t: 0,
            state: DeviceState::Advertised,
            ddp: None,
        };
        (state, c, s)
    }

    /// Phase 0 of a distributed-noise round (`docs/ddp.md`): like [`DeviceSecAgg::new`], but
    /// the device holds its clipped `update` (dense, norm at most `clip_norm`) until the
    /// share-keys request brings the round's public seed; it then derives the round's
    /// parameters itself from `privacy` (the task's declaration) and the setup
    /// ([`super::distributed_params`]), checks them against `noise_policy`, and encodes the
    /// update with [`ddp::encode`] (its own noise share included) before sending anything.
    pub fn new_distributed<R: Rng + CryptoRng + ?Sized>(
        round: u64,
        update: Vec<f32>,
        privacy: TaskPrivacy,
        clip_norm: f32,
        policy: SecurePolicy,
        noise_policy: DistributedPolicy,
        rng: &mut R,
    ) -> (Self, [u8; 32], [u8; 32]) {
        let (mut state, c, s) = Self::generate(round, Vec::new(), None, false, policy, rng);
        state.ddp = Some(DeviceDdp {
            update: Zeroizing::new(update),
            privacy,
            clip_norm,
            policy: noise_policy,
            words: None,
            charge: None,
        });
        (state, c, s)
    }

    /// Checks the round's distributed-noise parameters against the device's policy and encodes
    /// its update (phase 1, before its shares are sent).
    fn encode_distributed<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        setup: &SecAggSetup,
        rng: &mut R,
    ) -> Result<(), SecureRefusal> {
        let Some(dd) = self.ddp.as_mut() else { return Ok(()) };
        let refuse = SecureRefusal::DeviceNoiseTooLow;
        let params: DdpValidParams =
            super::distributed_params(&dd.privacy, dd.clip_norm, dd.update.len(), setup.bits, setup.seed)
                .and_then(DdpParams::validate)
                .map_err(|_| refuse("the round's parameters give no valid distributed noise"))?;
        if setup.n as usize > params.params().n_cohort {
            return Err(refuse("more devices than the noise is calibrated for"));
        }
        let p = params.params();
        let effective = p.noise_std / (params.gamma() * params.l2_sensitivity());
        if effective.is_nan() || effective < dd.policy.min_noise_multiplier {
            return Err(refuse("the effective noise multiplier is below the device's minimum"));
        }
        // The device's own price of the round: the exact distributed event with the fewest
        // survivors the round may commit with (`min_reports` shares: the least noise), at the
        // task's sampling probability. More survivors only add noise.
        let charge = crate::ddp::DdpEvent::new(&params, p.min_reports, dd.privacy.sampling_probability(), 1)
            .map_err(|_| refuse("the round's parameters give no distributed charge"))?;
        let words =
            ddp::encode(&dd.update, &params, rng).map_err(|_| refuse("the update cannot be encoded"))?;
        dd.words = Some(Zeroizing::new(words));
        dd.charge = Some(charge);
        Ok(())
    }

    /// The round's distributed-noise event as this device prices it, once share-keys fixed
    /// the parameters ([`DistributedCharge`]); taken once, `None` without distributed noise,
    /// before share-keys, or after it was taken.
    pub fn take_distributed_event(&mut self) -> Option<crate::ddp::DdpEvent> {
        self.ddp.as_mut().and_then(|dd| dd.charge.take())
    }

    /// Phase 1 (round 1, ShareKeys): checks the cohort and parameters against the policy and
    /// the neighbour list against the graph the public seed defines, then Shamir-shares the
    /// mask key and the self-mask seed with threshold `t` among the neighbours and itself, and
    /// seals each neighbour's pair for it.
    pub fn share_keys<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        req: ShareKeysRequest,
        rng: &mut R,
    ) -> Result<Vec<EncryptedShare>, SecureRefusal> {
        if !matches!(self.state, DeviceState::Advertised) {
            return Err(SecureRefusal::Protocol("a second share-keys request"));
        }
        let setup = req.setup;
        self.check_setup(&setup)?;
        self.encode_distributed(&setup, rng)?;
        let (n, index) = (setup.n as usize, req.index);
        if index >= setup.n {
            return Err(SecureRefusal::Protocol("own index outside the cohort"));
        }
        // The neighbours must be the graph's: a coordinator that picks them could isolate the
        // device among colluders.
        let own_row = Graph::harary_neighbours(n, setup.k as usize, &setup.seed, index as usize)
            .map_err(|_| SecureRefusal::Protocol("the parameters define no graph"))?;
        let listed: Vec<u32> = req.neighbours.iter().map(|nb| nb.index).collect();
        if listed != own_row {
            return Err(SecureRefusal::Protocol("neighbours differ from the round's graph"));
        }
        if (setup.t as usize) > listed.len() {
            return Err(SecureRefusal::WeakParameters {
                k: setup.k,
                t: setup.t,
                why: "more shares needed than neighbours hold",
            });
        }
        let ctx = setup.context(self.round);
        // Evaluation points are index + 1 (never 0); the device's own share is at its index.
        let mut xs: Vec<u32> = listed.iter().map(|&j| j + 1).collect();
        xs.push(index + 1);
        let t = setup.t as usize;
        let mask_secret = self.mask.secret_bytes();
        let mask_shares = shamir::split(&mask_secret, t, &xs, rng)
            .map_err(|_| SecureRefusal::Protocol("cannot share the mask key"))?;
        let self_shares = shamir::split(&self.self_seed, t, &xs, rng)
            .map_err(|_| SecureRefusal::Protocol("cannot share the self-mask seed"))?;
        let mut pairs: Vec<SharePair> = mask_shares
            .into_iter()
            .zip(self_shares)
            .map(|(mask_key, self_mask)| SharePair { mask_key, self_mask })
            .collect();
        let own = pairs.pop().ok_or(SecureRefusal::Protocol("no own share"))?;
        let mut out = Vec::with_capacity(pairs.len());
        let mut open_keys = HashMap::with_capacity(pairs.len());
        for (nb, pair) in req.neighbours.iter().zip(&pairs) {
            let (key, open_key) =
                share_keys_both_ways(&self.cipher, &nb.cipher_public, &ctx, index, nb.index)
                    .map_err(|_| SecureRefusal::Protocol("a neighbour's key is invalid"))?;
            let ciphertext =
                key.seal(&pair.to_bytes()).map_err(|_| SecureRefusal::Protocol("cannot seal a share"))?;
            out.push(EncryptedShare { peer: nb.index, ciphertext });
            open_keys.insert(nb.index, open_key);
        }
        self.state = DeviceState::Shared { setup, index, neighbours: req.neighbours, own, open_keys };
        Ok(out)
    }

    fn check_setup(&self, setup: &SecAggSetup) -> Result<(), SecureRefusal> {
        if setup.n < self.policy.min_cohort {
            return Err(SecureRefusal::CohortTooSmall { n: setup.n, min: self.policy.min_cohort });
        }
        let weak = |why| SecureRefusal::WeakParameters { k: setup.k, t: setup.t, why };
        if setup.t < 2 {
            return Err(weak("a threshold below 2 gives the secret away in one share"));
        }
        if setup.k == 0 || setup.k >= setup.n {
            return Err(weak("the neighbour count does not fit the cohort"));
        }
        let input = FinderInput {
            log2_security: self.policy.log2_security,
            ..FinderInput::new(setup.n as usize, 0.0, self.policy.corrupt)
        };
        let params = SecAggParams { k: setup.k as usize, t: setup.t as usize };
        let b =
            bounds(&input, params).map_err(|_| weak("the policy's collusion fraction is out of range"))?;
        if b.log2_corrupt_shares >= self.policy.log2_security - 1.0 {
            return Err(weak("colluders could hold t shares of an honest device"));
        }
        // Distributed noise: the ring is checked with the round's parameters (`encode_distributed`).
        let Some(grid) = &self.grid else { return Ok(()) };
        let need = encode::bits_for(setup.n as usize, grid, self.clip_bit)
            .map_err(|_| weak("the cohort's sum cannot be encoded"))?;
        if setup.bits < need || setup.bits > encode::MAX_BITS {
            return Err(weak("the ring is too narrow for the cohort's sum"));
        }
        Ok(())
    }

    /// Phase 2 (round 2, MaskedInputCollection): opens the pairs its neighbours sealed for it
    /// and returns its encoded update plus its self-mask and the pairwise masks with exactly
    /// those neighbours (added for a lower index, subtracted for a higher one), mod `2^bits`.
    pub fn masked_input(&mut self, req: MaskedInputRequest) -> Result<Vec<u64>, SecureRefusal> {
        let DeviceState::Shared { setup, index, neighbours, open_keys, .. } = &self.state else {
            return Err(SecureRefusal::Protocol("a masked-input request out of turn"));
        };
        let (setup, index) = (*setup, *index);
        let ctx = setup.context(self.round);
        let by_index: HashMap<u32, &NeighbourKeys> = neighbours.iter().map(|nb| (nb.index, nb)).collect();
        let mut received = BTreeMap::new();
        for share in &req.shares {
            let nb = by_index
                .get(&share.peer)
                .ok_or(SecureRefusal::Protocol("shares from a device that is not a neighbour"))?;
            if received.contains_key(&share.peer) {
                return Err(SecureRefusal::Protocol("two share pairs from one neighbour"));
            }
            let key = open_keys
                .get(&nb.index)
                .ok_or(SecureRefusal::Protocol("shares from a device that is not a neighbour"))?
                .key()
                .map_err(|_| SecureRefusal::Protocol("a neighbour's key is invalid"))?;
            let plain =
                key.open(&share.ciphertext).map_err(|_| SecureRefusal::Protocol("a share failed to open"))?;
            let pair = SharePair::from_bytes(&plain).ok_or(SecureRefusal::Protocol("a malformed share"))?;
            if pair.mask_key.x() != index + 1 || pair.self_mask.x() != index + 1 {
                return Err(SecureRefusal::Protocol("a share for another device"));
            }
            received.insert(share.peer, pair);
        }
        // Too few sharing neighbours: the round cannot unmask whatever the device does; it
        // would only spend its masked input.
        if received.len() + 1 < setup.t as usize {
            return Err(SecureRefusal::Protocol("fewer neighbours shared than the threshold"));
        }
        let mut words = match &self.ddp {
            Some(dd) => {
                let words = dd.words.as_ref().ok_or(SecureRefusal::Protocol("no distributed encoding"))?;
                words.to_vec()
            }
            None => to_ring(&self.encoded, setup.bits)
                .map_err(|_| SecureRefusal::Protocol("the update does not fit the ring"))?,
        };
        let masked = (|| -> Result<(), crate::secagg::crypto::CryptoError> {
            add_mask(&mut words, &self.self_seed, setup.bits, false)?;
            for &j in received.keys() {
                let nb = by_index[&j];
                let seed = mask_seed(&self.mask, &nb.mask_public, &ctx, index, j)?;
                add_mask(&mut words, &seed, setup.bits, j > index)?;
            }
            Ok(())
        })();
        masked.map_err(|_| SecureRefusal::Protocol("a mask could not be derived"))?;
        let DeviceState::Shared { own, .. } = std::mem::replace(&mut self.state, DeviceState::Finished)
        else {
            return Err(SecureRefusal::Protocol("state changed under the device"));
        };
        self.t = setup.t as usize;
        self.state = DeviceState::Masked { index, received, own };
        Ok(words)
    }

    /// Phase 3 (round 3, Unmasking): reveals the mask-key shares of the dropped neighbours and
    /// the self-mask shares of the surviving ones (and its own), after checking that the two
    /// lists are disjoint and name exactly the neighbours whose shares it holds. It answers
    /// once: it never reveals both shares of one device.
    pub fn unmask(&mut self, req: &UnmaskRequest) -> Result<UnmaskShares, SecureRefusal> {
        let DeviceState::Masked { index, received, own } =
            std::mem::replace(&mut self.state, DeviceState::Finished)
        else {
            return Err(SecureRefusal::Protocol("an unmask request out of turn"));
        };
        let dropped: BTreeSet<u32> = req.dropped.iter().copied().collect();
        let survivors: BTreeSet<u32> = req.survivors.iter().copied().collect();
        if dropped.len() != req.dropped.len() || survivors.len() != req.survivors.len() {
            return Err(SecureRefusal::Protocol("a device listed twice"));
        }
        if !dropped.is_disjoint(&survivors) {
            return Err(SecureRefusal::Protocol("a device listed as dropped and as surviving"));
        }
        // Fewer survivors than the threshold: no self-mask can be rebuilt and the round will
        // abort; revealing shares would serve nothing.
        if survivors.len() + 1 < self.t {
            return Err(SecureRefusal::Protocol("fewer survivors than the threshold"));
        }
        let held: BTreeSet<u32> = received.keys().copied().collect();
        let listed: BTreeSet<u32> = dropped.union(&survivors).copied().collect();
        if listed != held {
            return Err(SecureRefusal::Protocol("the lists do not match the neighbours that shared"));
        }
        let reveal = |owner: u32, share: &Share| RevealedShare { owner, share: *share.to_bytes() };
        let mask_key_shares = dropped.iter().map(|&j| reveal(j, &received[&j].mask_key)).collect();
        let mut self_mask_shares: Vec<RevealedShare> =
            survivors.iter().map(|&j| reveal(j, &received[&j].self_mask)).collect();
        self_mask_shares.push(reveal(index, &own.self_mask));
        Ok(UnmaskShares { round: req.round, mask_key_shares, self_mask_shares })
    }
}

/// Why the coordinator's secure phases failed (the round aborts: nothing released).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SecureAbort {
    /// Too few devices advertised keys for any safe parameters.
    #[error("secure aggregation: no parameters for a cohort of {0}")]
    NoParameters(usize),
    /// Fewer devices than the threshold sent shares or masked inputs.
    #[error("secure aggregation: {got} devices left, the threshold is {t}")]
    TooFewSurvivors {
        /// Devices left.
        got: usize,
        /// The threshold.
        t: usize,
    },
    /// A secret could not be rebuilt (too few or inconsistent shares).
    #[error("secure aggregation: could not rebuild a secret of device {0}")]
    Reconstruction(u32),
    /// Encoding parameters out of range.
    #[error("secure aggregation: {0}")]
    Encoding(&'static str),
    /// Distributed noise: more devices advertised keys than the cohort the noise and the ring
    /// are calibrated for, or fewer than `min_reports`.
    #[error("distributed noise: {got} devices outside {min}..={max}")]
    CohortOutsideCalibration {
        /// Devices whose keys arrived.
        got: usize,
        /// `min_reports`.
        min: usize,
        /// The calibrated cohort.
        max: usize,
    },
}

/// What the coordinator's secure phases refused from one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecureReject {
    /// The device is not part of this phase (not selected, dropped, or already answered).
    #[error("not expected in this phase")]
    NotExpected,
    /// The device already sent this phase's message.
    #[error("already sent")]
    Duplicate,
    /// The message is malformed (wrong length, unknown peer, a value outside the ring…).
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

/// The coordinator's side of the secure phases of one round.
#[derive(Debug)]
pub struct ServerSecAgg {
    round: u64,
    /// Length of an encoded update (the layout, plus the clip bit when asked; `D` with
    /// distributed noise).
    len: usize,
    /// The round's grid (none with distributed noise).
    grid: Option<Grid>,
    clip_bit: bool,
    dropout: f64,
    corrupt: f64,
    /// Phase 0: advertised keys, by client.
    keys: BTreeMap<ClientId, ([u8; 32], [u8; 32])>,
    cohort: Option<Cohort>,
    /// Distributed noise: the round's parameters without their seed, then (once keys close)
    /// with it.
    ddp: Option<(DdpParams, Option<DdpValidParams>)>,
}

/// The cohort once keys are closed.
#[derive(Debug)]
struct Cohort {
    setup: SecAggSetup,
    params: SecAggParams,
    /// Index → client.
    clients: Vec<ClientId>,
    index_of: HashMap<ClientId, u32>,
    graph: Graph,
    /// Index → (cipher, mask) public keys.
    publics: Vec<([u8; 32], [u8; 32])>,
    /// Phase 1: the sealed shares each sender addressed, by receiver.
    sealed: Vec<Option<Vec<EncryptedShare>>>,
    /// Senders of phase 1 (U2).
    shared: BTreeSet<u32>,
    /// Phase 2: the running masked sum and its senders (U3).
    sum: Vec<u64>,
    masked: BTreeSet<u32>,
    /// Phase 3: the revealed shares, by owner (U4 = responders).
    responders: BTreeSet<u32>,
    mask_key_shares: BTreeMap<u32, Vec<Share>>,
    self_mask_shares: BTreeMap<u32, Vec<Share>>,
}

impl Cohort {
    /// Device `i`'s neighbours that shared but sent no masked input (their mask keys are to be
    /// rebuilt), and those whose masked input is in the sum (their self-masks are to be
    /// removed), in index order: its unmask request.
    fn unmask_lists(&self, i: u32) -> (Vec<u32>, Vec<u32>) {
        let (mut dropped, mut survivors) = (Vec::new(), Vec::new());
        for &j in self.graph.neighbours(i as usize) {
            if self.masked.contains(&j) {
                survivors.push(j);
            } else if self.shared.contains(&j) {
                dropped.push(j);
            }
        }
        (dropped, survivors)
    }
}

/// What the coordinator sends when a phase closes: one message per device.
pub type Outgoing<T> = Vec<(ClientId, T)>;

impl ServerSecAgg {
    /// The secure phases of `round`, for updates of `layout_len` coordinates on `grid` (plus the
    /// clip bit when `clip_bit`), with the finder's expected `dropout` and `corrupt` fractions.
    pub fn new(
        round: u64,
        layout_len: usize,
        grid: Grid,
        clip_bit: bool,
        dropout: f64,
        corrupt: f64,
    ) -> Self {
        Self {
            round,
            len: layout_len + usize::from(clip_bit),
            grid: Some(grid),
            clip_bit,
            dropout,
            corrupt,
            keys: BTreeMap::new(),
            cohort: None,
            ddp: None,
        }
    }

    /// The secure phases of a distributed-noise round (`docs/ddp.md`): devices send `D` words
    /// of `template.bits` bits ([`ddp::encode`]); `template` (its seed ignored) is the round's
    /// [`super::distributed_params`]. Keys close only for a cohort in
    /// `min_reports..=n_cohort`, and the seed drawn then is also the rotation's.
    pub fn new_distributed(round: u64, template: DdpParams, dropout: f64, corrupt: f64) -> Self {
        Self {
            round,
            len: template.dim.checked_next_power_of_two().unwrap_or(template.dim),
            grid: None,
            clip_bit: false,
            dropout,
            corrupt,
            keys: BTreeMap::new(),
            cohort: None,
            ddp: Some((template, None)),
        }
    }

    /// The round's distributed-noise parameters (seed included), once keys are closed.
    pub fn ddp_params(&self) -> Option<&DdpValidParams> {
        self.ddp.as_ref().and_then(|(_, valid)| valid.as_ref())
    }

    /// Phase 0: a selected device's public keys.
    pub fn add_keys(
        &mut self,
        client: ClientId,
        cipher: [u8; 32],
        mask: [u8; 32],
    ) -> Result<(), SecureReject> {
        if self.cohort.is_some() {
            return Err(SecureReject::NotExpected);
        }
        if self.keys.contains_key(&client) {
            return Err(SecureReject::Duplicate);
        }
        if cipher == mask {
            return Err(SecureReject::Malformed("the two public keys are equal"));
        }
        self.keys.insert(client, (cipher, mask));
        Ok(())
    }

    /// Devices whose keys arrived.
    pub fn n_keys(&self) -> usize {
        self.keys.len()
    }

    /// Closes phase 0: draws the round seed, fixes the cohort (U1), its parameters and graph,
    /// and returns each device's share-keys request.
    pub fn close_keys<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
    ) -> Result<Outgoing<ShareKeysRequest>, SecureAbort> {
        let n = self.keys.len();
        let params = find_params(&FinderInput::new(n, self.dropout, self.corrupt))
            .map_err(|_| SecureAbort::NoParameters(n))?;
        // The wire carries at most this many neighbours per device.
        if params.k > crate::wire::MAX_NEIGHBOURS {
            return Err(SecureAbort::NoParameters(n));
        }
        let bits = match &self.ddp {
            Some((template, _)) => {
                if n > template.n_cohort || n < template.min_reports {
                    return Err(SecureAbort::CohortOutsideCalibration {
                        got: n,
                        min: template.min_reports,
                        max: template.n_cohort,
                    });
                }
                template.bits
            }
            None => {
                let grid = self.grid.as_ref().ok_or(SecureAbort::Encoding("no grid"))?;
                encode::bits_for(n, grid, self.clip_bit)
                    .map_err(|_| SecureAbort::Encoding("the cohort's sum does not fit 64 bits"))?
            }
        };
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        if let Some((template, valid)) = &mut self.ddp {
            let params = DdpParams { rotation_seed: seed, ..*template }
                .validate()
                .map_err(|_| SecureAbort::Encoding("invalid distributed-noise parameters"))?;
            *valid = Some(params);
        }
        let n32 = u32::try_from(n).map_err(|_| SecureAbort::NoParameters(n))?;
        let setup = SecAggSetup {
            seed,
            n: n32,
            k: u32::try_from(params.k).map_err(|_| SecureAbort::NoParameters(n))?,
            t: u32::try_from(params.t).map_err(|_| SecureAbort::NoParameters(n))?,
            bits,
        };
        let graph = Graph::harary(n, params.k, &seed).map_err(|_| SecureAbort::NoParameters(n))?;
        let keys = std::mem::take(&mut self.keys);
        let clients: Vec<ClientId> = keys.keys().copied().collect();
        let publics: Vec<([u8; 32], [u8; 32])> = keys.values().copied().collect();
        let index_of = clients.iter().enumerate().map(|(i, &c)| (c, i as u32)).collect();
        let out = clients
            .iter()
            .enumerate()
            .map(|(i, &client)| {
                let neighbours = graph
                    .neighbours(i)
                    .iter()
                    .map(|&j| {
                        let (c, s) = publics[j as usize];
                        NeighbourKeys { index: j, cipher_public: c, mask_public: s }
                    })
                    .collect();
                (client, ShareKeysRequest { round: self.round, setup, index: i as u32, neighbours })
            })
            .collect();
        self.cohort = Some(Cohort {
            setup,
            params,
            sealed: (0..n).map(|_| None).collect(),
            clients,
            index_of,
            graph,
            publics,
            shared: BTreeSet::new(),
            sum: vec![0; self.len],
            masked: BTreeSet::new(),
            responders: BTreeSet::new(),
            mask_key_shares: BTreeMap::new(),
            self_mask_shares: BTreeMap::new(),
        });
        Ok(out)
    }

    /// The round's parameters, once keys are closed.
    pub fn setup(&self) -> Option<SecAggSetup> {
        self.cohort.as_ref().map(|c| c.setup)
    }

    /// The cohort size (U1), once keys are closed.
    pub fn cohort_len(&self) -> usize {
        self.cohort.as_ref().map_or(0, |c| c.clients.len())
    }

    fn member(&self, client: ClientId) -> Result<(&Cohort, u32), SecureReject> {
        let cohort = self.cohort.as_ref().ok_or(SecureReject::NotExpected)?;
        let &i = cohort.index_of.get(&client).ok_or(SecureReject::NotExpected)?;
        Ok((cohort, i))
    }

    /// Phase 1: a device's sealed shares, one per neighbour.
    pub fn add_shares(&mut self, client: ClientId, shares: Vec<EncryptedShare>) -> Result<(), SecureReject> {
        let (cohort, i) = self.member(client)?;
        if !cohort.masked.is_empty() || !cohort.responders.is_empty() {
            return Err(SecureReject::NotExpected);
        }
        if cohort.shared.contains(&i) {
            return Err(SecureReject::Duplicate);
        }
        let expected = cohort.graph.neighbours(i as usize);
        let peers: Vec<u32> = shares.iter().map(|s| s.peer).collect();
        if peers != expected {
            return Err(SecureReject::Malformed("one sealed pair per neighbour, in index order"));
        }
        if shares.iter().any(|s| s.ciphertext.len() != SEALED_PAIR_BYTES) {
            return Err(SecureReject::Malformed("a sealed pair of the wrong length"));
        }
        let cohort = self.cohort.as_mut().ok_or(SecureReject::NotExpected)?;
        cohort.sealed[i as usize] = Some(shares);
        cohort.shared.insert(i);
        Ok(())
    }

    /// Devices whose shares arrived (U2).
    pub fn n_shared(&self) -> usize {
        self.cohort.as_ref().map_or(0, |c| c.shared.len())
    }

    /// Closes phase 1: each device of U2 gets the pairs its neighbours in U2 sealed for it.
    pub fn close_shares(&mut self) -> Result<Outgoing<MaskedInputRequest>, SecureAbort> {
        let round = self.round;
        let cohort = self.cohort.as_mut().ok_or(SecureAbort::Encoding("no cohort"))?;
        let t = cohort.params.t;
        if cohort.shared.len() < t {
            return Err(SecureAbort::TooFewSurvivors { got: cohort.shared.len(), t });
        }
        let mut inbox: BTreeMap<u32, Vec<EncryptedShare>> =
            cohort.shared.iter().map(|&i| (i, Vec::new())).collect();
        for &from in &cohort.shared {
            let Some(sealed) = cohort.sealed[from as usize].take() else { continue };
            for s in sealed {
                if let Some(list) = inbox.get_mut(&s.peer) {
                    list.push(EncryptedShare { peer: from, ciphertext: s.ciphertext });
                }
            }
        }
        Ok(inbox
            .into_iter()
            .map(|(i, shares)| (cohort.clients[i as usize], MaskedInputRequest { round, shares }))
            .collect())
    }

    /// Phase 2: a device's masked input, added to the running sum at once.
    pub fn add_masked(&mut self, client: ClientId, words: &[u64]) -> Result<(), SecureReject> {
        let (cohort, i) = self.member(client)?;
        if !cohort.shared.contains(&i) || !cohort.responders.is_empty() {
            return Err(SecureReject::NotExpected);
        }
        if cohort.masked.contains(&i) {
            return Err(SecureReject::Duplicate);
        }
        let bits = cohort.setup.bits;
        if words.len() != self.len {
            return Err(SecureReject::Malformed("a masked input of the wrong length"));
        }
        let cohort = self.cohort.as_mut().ok_or(SecureReject::NotExpected)?;
        ring_add(&mut cohort.sum, words, bits)
            .map_err(|_| SecureReject::Malformed("a word outside the ring"))?;
        cohort.masked.insert(i);
        Ok(())
    }

    /// Devices whose masked input arrived (U3).
    pub fn n_masked(&self) -> usize {
        self.cohort.as_ref().map_or(0, |c| c.masked.len())
    }

    /// Closes phase 2: each device of U3 is told which of its neighbours in U2 dropped and
    /// which survived.
    pub fn close_masked(&mut self) -> Result<Outgoing<UnmaskRequest>, SecureAbort> {
        let round = self.round;
        let cohort = self.cohort.as_mut().ok_or(SecureAbort::Encoding("no cohort"))?;
        let t = cohort.params.t;
        if cohort.masked.len() < t {
            return Err(SecureAbort::TooFewSurvivors { got: cohort.masked.len(), t });
        }
        // Distributed noise: fewer survivors than min_reports carry less than the target noise;
        // the sum will not be released, so no device is asked to reveal anything for it.
        if let Some((template, _)) = &self.ddp
            && cohort.masked.len() < template.min_reports
        {
            return Err(SecureAbort::CohortOutsideCalibration {
                got: cohort.masked.len(),
                min: template.min_reports,
                max: template.n_cohort,
            });
        }
        Ok(cohort
            .masked
            .iter()
            .map(|&i| {
                let (dropped, survivors) = cohort.unmask_lists(i);
                (cohort.clients[i as usize], UnmaskRequest { round, dropped, survivors })
            })
            .collect())
    }

    /// Phase 3: a device's revealed shares. Checked against what it was asked for: the
    /// mask-key shares of exactly its dropped neighbours, the self-mask shares of exactly its
    /// surviving neighbours and itself, each at its own evaluation point.
    pub fn add_unmask(&mut self, client: ClientId, answer: UnmaskShares) -> Result<(), SecureReject> {
        let (cohort, i) = self.member(client)?;
        if !cohort.masked.contains(&i) {
            return Err(SecureReject::NotExpected);
        }
        if cohort.responders.contains(&i) {
            return Err(SecureReject::Duplicate);
        }
        // Exactly what its unmask request asked for, and its own self-mask share.
        let (want_dropped, mut want_survivors) = cohort.unmask_lists(i);
        want_survivors.push(i);
        let owners = |v: &[RevealedShare]| v.iter().map(|s| s.owner).collect::<Vec<u32>>();
        if owners(&answer.mask_key_shares) != want_dropped {
            return Err(SecureReject::Malformed("mask-key shares of other devices than asked"));
        }
        let mut got_survivors = owners(&answer.self_mask_shares);
        got_survivors.sort_unstable();
        want_survivors.sort_unstable();
        if got_survivors != want_survivors {
            return Err(SecureReject::Malformed("self-mask shares of other devices than asked"));
        }
        let parse = |v: &[RevealedShare]| -> Result<Vec<(u32, Share)>, SecureReject> {
            v.iter()
                .map(|s| {
                    let share = Share::from_bytes(&s.share)
                        .map_err(|_| SecureReject::Malformed("a malformed share"))?;
                    if share.x() != i + 1 {
                        return Err(SecureReject::Malformed("a share at another device's point"));
                    }
                    Ok((s.owner, share))
                })
                .collect()
        };
        let mask_keys = parse(&answer.mask_key_shares)?;
        let self_masks = parse(&answer.self_mask_shares)?;
        let cohort = self.cohort.as_mut().ok_or(SecureReject::NotExpected)?;
        for (owner, share) in mask_keys {
            cohort.mask_key_shares.entry(owner).or_default().push(share);
        }
        for (owner, share) in self_masks {
            cohort.self_mask_shares.entry(owner).or_default().push(share);
        }
        cohort.responders.insert(i);
        Ok(())
    }

    /// Devices whose unmask shares arrived (U4).
    pub fn n_unmasked(&self) -> usize {
        self.cohort.as_ref().map_or(0, |c| c.responders.len())
    }

    /// Whether every device asked to unmask has answered.
    pub fn unmask_complete(&self) -> bool {
        self.cohort.as_ref().is_some_and(|c| c.responders.len() == c.masked.len())
    }

    /// The devices whose masked input is in the sum (U3), by client.
    pub fn survivors(&self) -> Vec<ClientId> {
        self.cohort
            .as_ref()
            .map_or_else(Vec::new, |c| c.masked.iter().map(|&i| c.clients[i as usize]).collect())
    }

    /// Closes phase 3: removes every survivor's self-mask (its seed rebuilt from `t` shares) and
    /// every dropped device's pairwise masks with its surviving neighbours (its mask key rebuilt
    /// from `t` shares and checked against the key it advertised). Returns the survivors' sum
    /// as signed integers on the grid (the clip-bit count last, when asked for) and how many
    /// updates it holds.
    pub fn finish(self) -> Result<(Vec<i64>, usize), SecureAbort> {
        let round = self.round;
        let cohort = self.cohort.ok_or(SecureAbort::Encoding("no cohort"))?;
        let (t, bits) = (cohort.params.t, cohort.setup.bits);
        let ctx = cohort.setup.context(round);
        let mut sum = cohort.sum;
        let fail = |j: u32| SecureAbort::Reconstruction(j);
        for &j in &cohort.masked {
            let shares = cohort.self_mask_shares.get(&j).ok_or_else(|| fail(j))?;
            let seed = shamir::combine(shares, t).map_err(|_| fail(j))?;
            add_mask(&mut sum, &seed, bits, true).map_err(|_| fail(j))?;
        }
        for &j in cohort.shared.difference(&cohort.masked) {
            let shares = cohort.mask_key_shares.get(&j).ok_or_else(|| fail(j))?;
            let secret = shamir::combine(shares, t).map_err(|_| fail(j))?;
            let key = KeyPair::from_secret_bytes(&secret);
            if key.public() != cohort.publics[j as usize].1 {
                return Err(fail(j));
            }
            for &k in cohort.graph.neighbours(j as usize) {
                if !cohort.masked.contains(&k) {
                    continue;
                }
                // Device k added PRG(s_kj) for j < k and subtracted it for j > k: undo that.
                let seed = mask_seed(&key, &cohort.publics[k as usize].1, &ctx, j, k).map_err(|_| fail(j))?;
                add_mask(&mut sum, &seed, bits, j < k).map_err(|_| fail(j))?;
            }
        }
        let n = cohort.masked.len();
        let ints = from_ring(&sum, bits).map_err(|_| SecureAbort::Encoding("the sum left the ring"))?;
        Ok((ints, n))
    }
}
