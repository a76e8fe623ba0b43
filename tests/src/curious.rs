//! What an honest-but-curious coordinator can compute from the round messages devices send it: the inversion of a plain upload (user vector, rated items, residuals), the best decoding of a secure round's masked input (its self-mask removed with the revealed shares), and the statistics the tests judge them with.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use fedrec_coordinator::server::RequestObserver;
use fedrec_shared::UpdateLayout;
use fedrec_shared::privacy::discrete::Grid;
use fedrec_shared::secagg::params::{FinderInput, SecAggParams, find_params};
use fedrec_shared::secagg::shamir::{self, Share};
use fedrec_shared::secagg::{crypto, encode};
use fedrec_shared::wire::Request;

pub use fedrec_shared::stats::{chi2_sf, chi2_two_sample, histogram};

/// Why the coordinator's view of a secure round could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum CuriousError {
    /// No device advertised keys: the requests are not from a secure round.
    #[error("no key advertisement was seen")]
    NoKeys,
    /// The parameter finder has no `(k, t)` for the cohort.
    #[error("no secure-aggregation parameters for a cohort of {0}")]
    NoParameters(usize),
    /// The round's grid or ring could not be built.
    #[error("the round's grid or ring: {0}")]
    Grid(String),
    /// A revealed share does not parse.
    #[error("a revealed share: {0}")]
    Share(#[from] shamir::ShamirError),
    /// A device's shares name different evaluation points, so its index is unknown.
    #[error("device {0} sent shares at different evaluation points")]
    MixedPoints(u64),
    /// The device sent no unmask shares, so its index in the cohort is unknown.
    #[error("device {0} sent no unmask shares")]
    NoIndex(u64),
    /// The device sent no masked input.
    #[error("device {0} sent no masked input")]
    NoMaskedInput(u64),
    /// Removing a mask failed.
    #[error("mask removal: {0}")]
    Mask(#[from] crypto::CryptoError),
    /// Lifting ring words failed.
    #[error("decoding: {0}")]
    Decode(#[from] encode::EncodeError),
}

/// Collects every round message a coordinator's [`RequestObserver`] is shown, with the id of
/// the device that sent it.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    seen: Arc<Mutex<Vec<(u64, Request)>>>,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An observer that appends to this recorder (for `ServeConfig::observer`).
    pub fn observer(&self) -> RequestObserver {
        let seen = Arc::clone(&self.seen);
        RequestObserver(Arc::new(move |device, request| {
            seen.lock().unwrap_or_else(PoisonError::into_inner).push((device, request.clone()));
        }))
    }

    /// Everything recorded so far, in arrival order.
    pub fn requests(&self) -> Vec<(u64, Request)> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// What one vector says about its device when read as a plain clipped update, the way the
/// design's threat model inverts an upload.
#[derive(Debug, Clone, PartialEq)]
pub struct Inversion {
    /// The segment whose count has the largest magnitude (the device's segment in a plain upload).
    pub segment: usize,
    /// That count: the clip factor `s ∈ (0, 1]` in a plain upload.
    pub count: f64,
    /// Segments whose count is not exactly zero (one in a plain upload).
    pub nonzero_counts: usize,
    /// The segment's centroid row divided by its count: the user vector `u` in a plain upload.
    pub user: Vec<f64>,
    /// Items whose gradient row (factors and bias) is not exactly zero: the rated items in a
    /// plain explicit-feedback upload.
    pub rated: BTreeSet<u32>,
    /// `−(item-bias gradient) / count` for every item: the residual `rating − prediction` of
    /// each rated item in a plain upload (up to the small item-bias regularisation).
    pub residuals: Vec<f64>,
    /// The L2 norm of each item's gradient row (factors and bias).
    pub row_norms: Vec<f64>,
    /// The L2 norm of the whole vector (at most the clip norm for a real update).
    pub norm: f64,
}

/// Inverts `update` (dense, in `layout`'s order) as if it were one device's plain upload.
pub fn invert(layout: &UpdateLayout, update: &[f64]) -> Inversion {
    let shape = layout.shape();
    let d = shape.dim;
    let counts = &update[layout.centroid_counts()];
    let segment = (0..counts.len()).max_by(|&a, &b| counts[a].abs().total_cmp(&counts[b].abs())).unwrap_or(0);
    let count = counts.get(segment).copied().unwrap_or(0.0);
    let sums = &update[layout.centroid_sums()];
    let user = sums[segment * d..(segment + 1) * d].iter().map(|&x| x / count).collect();
    let factors = &update[layout.item_factors()];
    let biases = &update[layout.item_bias()];
    let row_norms: Vec<f64> = (0..shape.n_items)
        .map(|i| {
            let row = &factors[i * d..(i + 1) * d];
            (row.iter().map(|x| x * x).sum::<f64>() + biases[i] * biases[i]).sqrt()
        })
        .collect();
    let rated = (0..shape.n_items)
        .filter(|&i| biases[i] != 0.0 || factors[i * d..(i + 1) * d].iter().any(|&x| x != 0.0))
        .map(|i| i as u32)
        .collect();
    Inversion {
        segment,
        count,
        nonzero_counts: counts.iter().filter(|&&c| c != 0.0).count(),
        user,
        rated,
        residuals: biases.iter().map(|&g| -g / count).collect(),
        row_norms,
        norm: update.iter().map(|x| x * x).sum::<f64>().sqrt(),
    }
}

/// The coordinator's view of one secure round, from the messages its devices sent: the public
/// parameters it chose (recomputed the way it computes them), each device's index and masked
/// input, and the self-mask shares revealed at unmasking.
#[derive(Debug)]
pub struct SecureView {
    /// Devices whose keys arrived (`|U1|`).
    pub n: usize,
    /// The graph degree and Shamir threshold of the round.
    pub params: SecAggParams,
    /// The ring width.
    pub bits: u32,
    /// The round's fixed-point grid.
    pub grid: Grid,
    /// Each device's index in the cohort, from the evaluation point of its revealed shares.
    pub index: BTreeMap<u64, u32>,
    masked: BTreeMap<u64, Vec<u64>>,
    /// Revealed self-mask shares (raw bytes) by owner index.
    self_mask_shares: BTreeMap<u32, Vec<[u8; shamir::SHARE_BYTES]>>,
}

impl SecureView {
    /// Puts together the view of a round from `requests` (all of one round), for updates of
    /// `layout` clipped at `clip_norm`, under the configured expected `dropout` and `corrupt`
    /// fractions, with or without the clip bit.
    pub fn new(
        requests: &[(u64, Request)],
        layout: &UpdateLayout,
        clip_norm: f32,
        dropout: f64,
        corrupt: f64,
        clip_bit: bool,
    ) -> Result<SecureView, CuriousError> {
        let keyed: BTreeSet<u64> = requests
            .iter()
            .filter(|(_, r)| matches!(r, Request::AdvertiseKeys(_)))
            .map(|&(device, _)| device)
            .collect();
        let n = keyed.len();
        if n == 0 {
            return Err(CuriousError::NoKeys);
        }
        let params =
            find_params(&FinderInput::new(n, dropout, corrupt)).map_err(|_| CuriousError::NoParameters(n))?;
        let grid =
            Grid::for_secure_sum(clip_norm, layout.len()).map_err(|e| CuriousError::Grid(e.to_string()))?;
        let bits = encode::bits_for(n, &grid, clip_bit)?;
        let mut index = BTreeMap::new();
        let mut masked = BTreeMap::new();
        let mut self_mask_shares: BTreeMap<u32, Vec<[u8; shamir::SHARE_BYTES]>> = BTreeMap::new();
        for (device, request) in requests {
            match request {
                Request::MaskedInput(m) => {
                    masked.insert(*device, m.words.clone());
                }
                Request::UnmaskShares(u) => {
                    let mut points = BTreeSet::new();
                    for s in u.mask_key_shares.iter().chain(&u.self_mask_shares) {
                        points.insert(Share::from_bytes(&s.share)?.x());
                    }
                    match points.iter().collect::<Vec<_>>().as_slice() {
                        [x] => {
                            index.insert(*device, **x - 1);
                        }
                        _ => return Err(CuriousError::MixedPoints(*device)),
                    }
                    for s in &u.self_mask_shares {
                        self_mask_shares.entry(s.owner).or_default().push(s.share);
                    }
                }
                _ => {}
            }
        }
        Ok(SecureView { n, params, bits, grid, index, masked, self_mask_shares })
    }

    /// The masked words `device` sent, as received.
    pub fn masked(&self, device: u64) -> Result<&[u64], CuriousError> {
        self.masked.get(&device).map(Vec::as_slice).ok_or(CuriousError::NoMaskedInput(device))
    }

    /// The strongest thing the coordinator can do with one device's masked input: rebuild the
    /// device's self-mask seed `b` from `t` of the self-mask shares its neighbours (and it)
    /// revealed, and subtract `PRG(b)`. What is left is the encoding plus the pairwise masks.
    pub fn without_self_mask(&self, device: u64) -> Result<Vec<u64>, CuriousError> {
        let index = *self.index.get(&device).ok_or(CuriousError::NoIndex(device))?;
        let shares = self
            .self_mask_shares
            .get(&index)
            .map(|raw| raw.iter().map(|b| Share::from_bytes(b)).collect::<Result<Vec<_>, _>>())
            .transpose()?
            .unwrap_or_default();
        let seed = shamir::combine(&shares, self.params.t)?;
        let mut words = self.masked(device)?.to_vec();
        crypto::add_mask(&mut words, &seed, self.bits, true)?;
        Ok(words)
    }

    /// Ring words lifted to signed integers (the centred lift) and scaled by the grid step:
    /// the real-valued vector the coordinator reads them as.
    pub fn decode(&self, words: &[u64]) -> Result<Vec<f64>, CuriousError> {
        let step = self.grid.step();
        Ok(encode::from_ring(words, self.bits)?.into_iter().map(|x| x as f64 * step).collect())
    }
}

/// The cosine of the angle between `a` and `b` (0 if either is zero).
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) }
}

/// Pearson's correlation of `a` and `b` (0 if either is constant).
pub fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (ma, mb) = (mean(a), mean(b));
    let ca: Vec<f64> = a.iter().map(|x| x - ma).collect();
    let cb: Vec<f64> = b.iter().map(|x| x - mb).collect();
    cosine(&ca, &cb)
}

/// The area under the ROC curve of `score` for telling `positive` items from the others:
/// `P(score of a positive > score of a negative)`, ties counting one half. 0.5 is chance.
pub fn auc(score: &[f64], positive: &BTreeSet<u32>) -> f64 {
    let (mut pos, mut neg) = (Vec::new(), Vec::new());
    for (i, &s) in score.iter().enumerate() {
        if positive.contains(&(i as u32)) { pos.push(s) } else { neg.push(s) }
    }
    let mut wins = 0.0;
    for &p in &pos {
        for &q in &neg {
            wins += if p > q {
                1.0
            } else if p == q {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (pos.len() * neg.len()).max(1) as f64
}

/// The Jaccard index `|a ∩ b| / |a ∪ b|` (1 for two empty sets).
pub fn jaccard(a: &BTreeSet<u32>, b: &BTreeSet<u32>) -> f64 {
    let union = a.union(b).count();
    if union == 0 { 1.0 } else { a.intersection(b).count() as f64 / union as f64 }
}

/// Whether `needle` occurs as a contiguous run in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The bytes of every field a device chose in `request` (keys, ciphertexts, words, shares;
/// not the round number or the replay nonce), in wire order. Masked words are written as the
/// wire writes them: 4 bytes each when every word fits 32 bits, else 8.
pub fn payload_bytes(request: &Request) -> Vec<u8> {
    match request {
        Request::CheckIn(_) | Request::FetchRules(_) => Vec::new(),
        Request::Upload(u) => u.update.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Request::AdvertiseKeys(k) => [k.cipher_public, k.mask_public].concat(),
        Request::EncryptedShares(e) => e.shares.iter().flat_map(|s| s.ciphertext.iter().copied()).collect(),
        Request::MaskedInput(m) => {
            if m.words.iter().all(|&w| w <= u64::from(u32::MAX)) {
                m.words.iter().flat_map(|&w| (w as u32).to_le_bytes()).collect()
            } else {
                m.words.iter().flat_map(|w| w.to_le_bytes()).collect()
            }
        }
        Request::UnmaskShares(u) => {
            u.mask_key_shares.iter().chain(&u.self_mask_shares).flat_map(|s| s.share).collect()
        }
    }
}
