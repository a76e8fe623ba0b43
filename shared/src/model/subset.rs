//! Per-round item subsets drawn from public randomness: every device of a round trains the same `K` items, so what it downloads and uploads scales with `K`, not with the catalogue, and never depends on which items it touched.
//!
//! The subset `S_t` of a round is a function of public values only: the catalogue size `n`,
//! `K`, and a 32-byte seed the coordinator draws for the round and sends with the task. It is
//! Floyd's algorithm (Bentley & Floyd, CACM 1987), which draws each `K`-subset of `0..n` with
//! the same probability, fed by the ChaCha20 keystream under the seed (nonce [`SUBSET_NONCE`]),
//! integers below a bound by rejection (no modulo bias). A device recomputes `S_t` from the seed
//! instead of trusting a list, so a coordinator cannot hand one device a subset made for it.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};

use crate::error::ParamError;

/// The ChaCha20 nonce of the subset stream (12 bytes), distinct from the other uses of a
/// round's seeds (the secure-aggregation graph, the distributed-noise rotation).
pub const SUBSET_NONCE: [u8; 12] = *b"fedrec/items";

/// The items a round trains: `K` distinct indices of a catalogue of `n`, ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemSubset {
    n_items: usize,
    seed: [u8; 32],
    items: Vec<u32>,
}

impl ItemSubset {
    /// The subset of `k` of the `n_items` items under `seed`. Refuses `k = 0`, `k > n_items`
    /// and catalogues beyond `u32` indices.
    pub fn draw(n_items: usize, k: usize, seed: [u8; 32]) -> Result<Self, ParamError> {
        if n_items == 0 || u32::try_from(n_items).is_err() {
            return Err(ParamError::new("n_items", format!("must be in 1..=2^32-1, got {n_items}")));
        }
        if k == 0 || k > n_items {
            return Err(ParamError::new("items_per_round", format!("must be in 1..={n_items}, got {k}")));
        }
        let mut stream = KeyStream::new(&seed);
        let mut chosen = vec![false; n_items];
        let mut items = Vec::with_capacity(k);
        // Floyd: for j in n−k..n, draw t uniform in 0..=j; take t unless taken, else take j.
        for j in (n_items - k)..n_items {
            let t = stream.below(j as u64 + 1) as usize;
            let pick = if chosen[t] { j } else { t };
            chosen[pick] = true;
            items.push(pick as u32);
        }
        items.sort_unstable();
        Ok(Self { n_items, seed, items })
    }

    /// The catalogue size `n`.
    pub fn n_items(&self) -> usize {
        self.n_items
    }

    /// The public seed the subset was drawn from.
    pub fn seed(&self) -> [u8; 32] {
        self.seed
    }

    /// The items, ascending.
    pub fn items(&self) -> &[u32] {
        &self.items
    }

    /// `K`, the number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Never true for a drawn subset; present for API completeness.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Where `item` sits in the subset (its row in the round's model and update), if it is in it.
    pub fn position(&self, item: u32) -> Option<usize> {
        self.items.binary_search(&item).ok()
    }
}

/// Unsigned integers from the ChaCha20 keystream.
struct KeyStream {
    cipher: ChaCha20,
    buf: [u8; 256],
    pos: usize,
}

impl KeyStream {
    fn new(seed: &[u8; 32]) -> Self {
        let cipher = ChaCha20::new(seed.into(), &SUBSET_NONCE.into());
        Self { cipher, buf: [0; 256], pos: 256 }
    }

    fn next_u64(&mut self) -> u64 {
        if self.pos == self.buf.len() {
            self.buf = [0; 256];
            self.cipher.apply_keystream(&mut self.buf);
            self.pos = 0;
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.buf[self.pos..self.pos + 8]);
        self.pos += 8;
        u64::from_le_bytes(word)
    }

    /// Uniform in `0..bound` (`bound ≥ 1`): rejection of the top partial block of `2⁶⁴`.
    fn below(&mut self, bound: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % bound + 1) % bound;
        loop {
            let x = self.next_u64();
            if x <= zone {
                return x % bound;
            }
        }
    }
}

/// Most bytes a dense `f32` upload of the item side may take before rounds train item subsets
/// when no size is configured: 8 MB, so that catalogues up to about 60,000 items at d = 32 keep
/// the dense update (and its accuracy per round: a subset round needs about `n/K` times the
/// rounds, see the README's "Large catalogues"), and 100,000 items and more get subsets.
pub const AUTO_SUBSET_UPLOAD_BYTES: usize = 8_000_000;

/// Items per round chosen for catalogues above [`AUTO_SUBSET_UPLOAD_BYTES`]: about 0.5 MB each
/// way per device and round at d = 32.
pub const AUTO_ITEMS_PER_ROUND: usize = 4096;

/// The items per round when none is configured — the coordinator's `[model] items_per_round`
/// left out, the simulator's `--items-per-round` not given: every item (0) while a dense `f32`
/// upload of the item side (`n_items · (dim + 1) · 4` bytes) fits in
/// [`AUTO_SUBSET_UPLOAD_BYTES`], else [`AUTO_ITEMS_PER_ROUND`] (at most the catalogue).
pub fn auto_items_per_round(n_items: usize, dim: usize) -> usize {
    if n_items.saturating_mul(dim.saturating_add(1)).saturating_mul(4) <= AUTO_SUBSET_UPLOAD_BYTES {
        0
    } else {
        AUTO_ITEMS_PER_ROUND.min(n_items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_is_in_range_and_refuses_bad_sizes() {
        let mut s = KeyStream::new(&[7; 32]);
        for bound in [1u64, 2, 3, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(s.below(bound) < bound);
            }
        }
        assert!(ItemSubset::draw(10, 0, [0; 32]).is_err());
        assert!(ItemSubset::draw(10, 11, [0; 32]).is_err());
        assert!(ItemSubset::draw(0, 0, [0; 32]).is_err());
        assert_eq!(ItemSubset::draw(5, 5, [1; 32]).expect("k = n").items(), &[0, 1, 2, 3, 4]);
    }
}
