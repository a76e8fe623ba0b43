//! The SecAgg+ neighbour graph: a Harary graph on a random relabelling of the cohort, drawn from the public round seed.
//!
//! Bell et al. (CCS 2020) let each device share its secrets with, and mask against, only `k`
//! neighbours instead of the whole cohort. The graph is the Harary graph `H(k, n)`: put the
//! `n` cycle positions on a ring and join each position `p` to `p ± 1, …, p ± k/2 (mod n)`,
//! then give the positions device labels by a uniformly random permutation. The permutation is
//! what makes the graph secure: a coalition of corrupt or dropped devices lands on random ring
//! positions, so it neither holds `t` shares of one honest device nor cuts the ring into pieces
//! except with the small probabilities that [`super::params`] bounds.
//!
//! The graph is a pure function of `(n, k, seed)`. The seed is public round randomness, so the
//! coordinator, every device and the tests compute the same graph. The permutation is specified
//! here exactly (not left to a crate's shuffle, whose algorithm may change between versions):
//!
//! 1. Keystream: ChaCha20 (RFC 8439, 96-bit nonce, counter starting at 0) with key = the round
//!    seed and nonce = the 12 ASCII bytes `fedrec/graph`, read as consecutive little-endian
//!    `u64` words.
//! 2. Uniform integer below `b`: take the next word `w`; if `w ≥ 2^64 − (2^64 mod b)` reject it
//!    and take the next one; else return `w mod b`.
//! 3. Fisher–Yates: start from `label[p] = p` for `p` in `0..n`; for `i = n − 1` down to `1`,
//!    draw `j` uniform below `i + 1` and swap `label[i]` and `label[j]`. The device at ring
//!    position `p` is `label[p]`.
//!
//! A known-answer test pins this against an independent Python implementation.
//!
//! `k` must be even when the graph is not complete (odd `k` is refused, not rounded: the
//! parameter finder's analysis is for the even Harary graph, and silently changing the degree
//! would change what it proved). `k ≥ n − 1` gives the complete graph, which is the SecAgg of
//! Bonawitz et al. (CCS 2017); its degree is `n − 1` whatever its parity.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use thiserror::Error;

/// The ChaCha20 nonce that separates the graph's keystream from any other use of the round seed.
const GRAPH_NONCE: [u8; 12] = *b"fedrec/graph";

/// Largest adjacency table a graph may hold, in neighbour entries (`n · degree`): 2^28 entries
/// are 1 GiB of `u32`. A Harary graph of 100,000 devices with `k = 100` needs 10^7.
pub const MAX_ADJACENCY_ENTRIES: usize = 1 << 28;

/// Why a graph could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum GraphError {
    /// The cohort is empty.
    #[error("a graph needs at least one node")]
    Empty,
    /// The degree of a graph that is not complete is odd.
    #[error(
        "the degree k = {k} of a Harary graph on {n} nodes must be even (or ≥ n − 1 for the complete graph)"
    )]
    OddDegree {
        /// Requested degree.
        k: usize,
        /// Number of nodes.
        n: usize,
    },
    /// A degree of zero on two or more nodes: nobody would have a neighbour to share with.
    #[error("the degree must be at least 2 on {n} nodes")]
    ZeroDegree {
        /// Number of nodes.
        n: usize,
    },
    /// The adjacency table would exceed [`MAX_ADJACENCY_ENTRIES`].
    #[error(
        "a graph on {n} nodes of degree {degree} is too large to hold ({} entries at most)",
        MAX_ADJACENCY_ENTRIES
    )]
    TooLarge {
        /// Number of nodes.
        n: usize,
        /// Neighbours per node.
        degree: usize,
    },
}

/// An undirected regular graph on the nodes `0..n`: who shares secrets with, and masks
/// against, whom in one SecAgg+ round. Symmetric, without self loops; every node has the same
/// degree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    n: usize,
    /// Neighbours per node: `k` for a Harary graph, `n − 1` for the complete graph.
    degree: usize,
    complete: bool,
    /// `position[label]` = ring position of the node (empty for the complete graph).
    position: Vec<u32>,
    /// Row `i` (`degree` entries, ascending) lists the neighbours of node `i`.
    adjacency: Vec<u32>,
}

impl Graph {
    /// The Harary graph `H(k, n)` on a uniformly random relabelling drawn from `seed` (see the
    /// module docs for the exact draw), or the complete graph when `k ≥ n − 1`.
    ///
    /// Fails for `n = 0`, for an odd or zero `k < n − 1`, and for graphs whose adjacency table
    /// would exceed [`MAX_ADJACENCY_ENTRIES`].
    pub fn harary(n: usize, k: usize, seed: &[u8; 32]) -> Result<Graph, GraphError> {
        if harary_degree(n, k)? == n - 1 {
            return Graph::complete(n);
        }
        let label = random_permutation(n, seed);
        let mut position = vec![0u32; n];
        for (p, &l) in label.iter().enumerate() {
            position[l as usize] = ring_index(p);
        }
        let mut adjacency = vec![0u32; n * k];
        for (node, row) in adjacency.chunks_exact_mut(k).enumerate() {
            ring_row(&label, position[node] as usize, row);
        }
        Ok(Graph { n, degree: k, complete: false, position, adjacency })
    }

    /// The neighbours of node `i` in [`Graph::harary`]`(n, k, seed)`, ascending — the same row,
    /// computed in `O(n + k log k)` without building the `n · k` table: what a device needs to
    /// check the neighbour list it was sent. Fails as [`Graph::harary`] does; empty when
    /// `i ≥ n`.
    pub fn harary_neighbours(n: usize, k: usize, seed: &[u8; 32], i: usize) -> Result<Vec<u32>, GraphError> {
        let degree = harary_degree(n, k)?;
        if i >= n {
            return Ok(Vec::new());
        }
        if degree == n - 1 {
            return Ok((0..n).filter(|&j| j != i).map(ring_index).collect());
        }
        let label = random_permutation(n, seed);
        // Ring positions are a bijection: find node i's.
        let p = label.iter().position(|&l| l as usize == i).unwrap_or(0);
        let mut row = vec![0u32; degree];
        ring_row(&label, p, &mut row);
        Ok(row)
    }

    /// The complete graph on `n` nodes (every node neighbours every other): the SecAgg of
    /// Bonawitz et al. Fails for `n = 0` or when the table would exceed
    /// [`MAX_ADJACENCY_ENTRIES`].
    pub fn complete(n: usize) -> Result<Graph, GraphError> {
        if n == 0 {
            return Err(GraphError::Empty);
        }
        let degree = n - 1;
        check_size(n, degree)?;
        let mut adjacency = Vec::with_capacity(n * degree);
        for node in 0..n {
            adjacency.extend((0..n).filter(|&j| j != node).map(ring_index));
        }
        Ok(Graph { n, degree, complete: true, position: Vec::new(), adjacency })
    }

    /// Number of nodes.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Whether every node neighbours every other node.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The neighbours of node `i`, ascending, without `i` itself; empty when `i ≥ n`.
    pub fn neighbours(&self, i: usize) -> &[u32] {
        if i >= self.n {
            return &[];
        }
        &self.adjacency[i * self.degree..(i + 1) * self.degree]
    }

    /// The number of neighbours of node `i` (the same for every node of the graph); 0 when
    /// `i ≥ n`.
    pub fn degree(&self, i: usize) -> usize {
        if i >= self.n { 0 } else { self.degree }
    }

    /// Whether `i` and `j` are distinct nodes joined by an edge. Constant time.
    pub fn are_neighbours(&self, i: usize, j: usize) -> bool {
        if i == j || i >= self.n || j >= self.n {
            return false;
        }
        if self.complete {
            return true;
        }
        let (pi, pj) = (self.position[i] as usize, self.position[j] as usize);
        let gap = pi.abs_diff(pj);
        gap.min(self.n - gap) <= self.degree / 2
    }
}

/// The degree of `H(k, n)` (`n − 1` when it is the complete graph), after the checks
/// [`Graph::harary`] documents.
fn harary_degree(n: usize, k: usize) -> Result<usize, GraphError> {
    if n == 0 {
        return Err(GraphError::Empty);
    }
    if k >= n - 1 {
        check_size(n, n - 1)?;
        return Ok(n - 1);
    }
    if k == 0 {
        return Err(GraphError::ZeroDegree { n });
    }
    if !k.is_multiple_of(2) {
        return Err(GraphError::OddDegree { k, n });
    }
    check_size(n, k)?;
    Ok(k)
}

/// Fills `row` (`k` entries) with the labels at ring distance `1..=k/2` either side of ring
/// position `p`, ascending.
fn ring_row(label: &[u32], p: usize, row: &mut [u32]) {
    let n = label.len();
    for offset in 1..=row.len() / 2 {
        row[2 * (offset - 1)] = label[(p + offset) % n];
        row[2 * (offset - 1) + 1] = label[(p + n - offset) % n];
    }
    row.sort_unstable();
}

fn check_size(n: usize, degree: usize) -> Result<(), GraphError> {
    match n.checked_mul(degree) {
        Some(entries) if entries <= MAX_ADJACENCY_ENTRIES => Ok(()),
        _ => Err(GraphError::TooLarge { n, degree }),
    }
}

/// A node index as stored in the tables. Callers have bounded `n` by [`MAX_ADJACENCY_ENTRIES`]
/// (or `n = 1`), so every index fits.
fn ring_index(i: usize) -> u32 {
    u32::try_from(i).expect("graph sizes are bounded by MAX_ADJACENCY_ENTRIES < 2^32")
}

/// `label[p]` for each ring position `p`: the Fisher–Yates shuffle of `0..n` described in the
/// module docs.
fn random_permutation(n: usize, seed: &[u8; 32]) -> Vec<u32> {
    let mut stream = Keystream::new(seed);
    let mut label: Vec<u32> = (0..n).map(ring_index).collect();
    for i in (1..n).rev() {
        // `i + 1 ≤ n ≤ 2^28` fits in a u64, and the draw is below it, so it fits back.
        let j = stream.below(i as u64 + 1) as usize;
        label.swap(i, j);
    }
    label
}

/// Little-endian `u64` words of the ChaCha20 keystream under the round seed.
struct Keystream {
    cipher: ChaCha20,
    block: [u8; 256],
    used: usize,
}

impl Keystream {
    fn new(seed: &[u8; 32]) -> Self {
        let cipher = ChaCha20::new(&(*seed).into(), &GRAPH_NONCE.into());
        Keystream { cipher, block: [0; 256], used: 256 }
    }

    fn next_word(&mut self) -> u64 {
        if self.used == self.block.len() {
            self.block = [0; 256];
            self.cipher.apply_keystream(&mut self.block);
            self.used = 0;
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.block[self.used..self.used + 8]);
        self.used += 8;
        u64::from_le_bytes(word)
    }

    /// Uniform in `0..bound` by rejection (no modulo bias); `bound ≥ 1`.
    fn below(&mut self, bound: u64) -> u64 {
        // 2^64 mod bound, computed without overflowing.
        let excess = (u64::MAX % bound + 1) % bound;
        loop {
            let w = self.next_word();
            // Accept w < 2^64 − excess; with excess = 0 every word is accepted.
            if excess == 0 || w < 0u64.wrapping_sub(excess) {
                return w % bound;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(byte: u8) -> [u8; 32] {
        [byte; 32]
    }

    fn counting_seed() -> [u8; 32] {
        core::array::from_fn(|i| i as u8)
    }

    #[test]
    fn one_row_is_the_tables_row() {
        for (n, k) in [(1, 2), (2, 2), (7, 2), (7, 4), (7, 6), (50, 8), (101, 30), (1000, 72)] {
            for s in [seed(3), counting_seed()] {
                let graph = Graph::harary(n, k, &s).expect("graph");
                for i in 0..=n {
                    let row = Graph::harary_neighbours(n, k, &s, i).expect("row");
                    assert_eq!(row, graph.neighbours(i), "n = {n}, k = {k}, i = {i}");
                }
            }
        }
        assert_eq!(Graph::harary_neighbours(9, 3, &seed(1), 0), Err(GraphError::OddDegree { k: 3, n: 9 }));
        assert_eq!(Graph::harary_neighbours(0, 2, &seed(1), 0), Err(GraphError::Empty));
    }

    /// Every structural property a SecAgg+ graph must have, checked on the tables themselves.
    fn assert_well_formed(g: &Graph, expected_degree: usize) {
        for i in 0..g.n() {
            let row = g.neighbours(i);
            assert_eq!(row.len(), expected_degree, "node {i} has the wrong degree");
            assert_eq!(g.degree(i), expected_degree);
            assert!(row.windows(2).all(|w| w[0] < w[1]), "row {i} is not strictly ascending");
            for &j in row {
                let j = j as usize;
                assert!(j < g.n(), "node {i} names {j} outside the graph");
                assert_ne!(j, i, "self loop at {i}");
                assert!(g.neighbours(j).binary_search(&(i as u32)).is_ok(), "edge {i}–{j} is one-way");
                assert!(g.are_neighbours(i, j) && g.are_neighbours(j, i));
            }
        }
        // `are_neighbours` agrees with the tables on non-edges too.
        for i in 0..g.n() {
            for j in 0..g.n() {
                let listed = g.neighbours(i).binary_search(&(j as u32)).is_ok();
                assert_eq!(g.are_neighbours(i, j), listed, "are_neighbours({i}, {j})");
            }
        }
    }

    #[test]
    fn harary_graphs_are_symmetric_regular_and_loop_free() {
        for n in 1..=40 {
            for k in (2..=n + 2).step_by(2) {
                let g = Graph::harary(n, k, &seed(n as u8)).expect("valid parameters");
                let expected = if k >= n - 1 { n - 1 } else { k };
                assert_eq!(g.is_complete(), k >= n - 1, "n = {n}, k = {k}");
                assert_well_formed(&g, expected);
            }
        }
    }

    #[test]
    fn harary_graph_is_a_relabelled_cycle_power() {
        // Walking the ring recovered from `position`, consecutive nodes are neighbours and
        // nodes k/2 + 1 apart are not.
        let (n, k) = (50, 6);
        let g = Graph::harary(n, k, &counting_seed()).expect("valid");
        let mut at = vec![0usize; n];
        for (node, &p) in g.position.iter().enumerate() {
            at[p as usize] = node;
        }
        for p in 0..n {
            for d in 1..=k / 2 {
                assert!(g.are_neighbours(at[p], at[(p + d) % n]));
            }
            assert!(!g.are_neighbours(at[p], at[(p + k / 2 + 1) % n]));
        }
    }

    #[test]
    fn same_seed_same_graph_other_seed_other_graph() {
        let a = Graph::harary(200, 10, &seed(1)).expect("valid");
        let b = Graph::harary(200, 10, &seed(1)).expect("valid");
        let c = Graph::harary(200, 10, &seed(2)).expect("valid");
        assert_eq!(a, b);
        assert_ne!(a.adjacency, c.adjacency);
    }

    #[test]
    fn graph_matches_the_independent_python_implementation() {
        // An independent Python draw with the `cryptography` package's ChaCha20 (whose 16-byte
        // nonce is the 4-byte little-endian block counter followed by the 12-byte IETF nonce):
        //   ks = ChaCha20(key=seed, nonce=b"\0\0\0\0" + b"fedrec/graph").update(b"\0" * len)
        //   below(b): w = next LE u64; reject while w >= 2**64 - 2**64 % b; return w % b
        //   p = list(range(n)); for i in range(n-1, 0, -1): j = below(i+1); swap p[i], p[j]
        // seed = bytes(range(32)), n = 10:
        //   perm = [6, 5, 2, 4, 8, 9, 7, 0, 3, 1]
        //   harary(10, 4) = [[1,3,7,9],[0,3,5,6],[4,5,6,8],[0,1,6,7],[2,5,8,9],
        //                    [1,2,4,6],[1,2,3,5],[0,3,8,9],[2,4,7,9],[0,4,7,8]]
        // seed = bytes(32), n = 12: perm = [2, 5, 1, 4, 9, 8, 10, 0, 11, 3, 7, 6]
        assert_eq!(random_permutation(10, &counting_seed()), [6, 5, 2, 4, 8, 9, 7, 0, 3, 1]);
        assert_eq!(random_permutation(12, &[0; 32]), [2, 5, 1, 4, 9, 8, 10, 0, 11, 3, 7, 6]);
        let g = Graph::harary(10, 4, &counting_seed()).expect("valid");
        let expected: [[u32; 4]; 10] = [
            [1, 3, 7, 9],
            [0, 3, 5, 6],
            [4, 5, 6, 8],
            [0, 1, 6, 7],
            [2, 5, 8, 9],
            [1, 2, 4, 6],
            [1, 2, 3, 5],
            [0, 3, 8, 9],
            [2, 4, 7, 9],
            [0, 4, 7, 8],
        ];
        for (i, row) in expected.iter().enumerate() {
            assert_eq!(g.neighbours(i), row, "node {i}");
        }
    }

    #[test]
    fn permutations_are_uniform() {
        // 2,400 seeds over the 24 permutations of 4 labels: each expects 100. A biased shuffle
        // (for instance Sattolo's, drawing j below i instead of i + 1) reaches only 6 of them.
        let mut counts = std::collections::HashMap::new();
        for s in 0..2400u32 {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&s.to_le_bytes());
            *counts.entry(random_permutation(4, &seed)).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 24);
        // Fixed seeds, so this is deterministic; ±50% is > 5 standard deviations (σ ≈ 9.8).
        assert!(counts.values().all(|&c| (50..=150).contains(&c)), "{counts:?}");
    }

    #[test]
    fn complete_when_k_reaches_n_minus_one() {
        for (n, k) in [(5, 4), (6, 5), (6, 6), (6, 1000), (2, 1), (3, 2)] {
            let g = Graph::harary(n, k, &seed(3)).expect("valid");
            assert!(g.is_complete(), "n = {n}, k = {k}");
            assert_well_formed(&g, n - 1);
        }
        assert_eq!(Graph::complete(4).expect("valid"), Graph::harary(4, 3, &seed(9)).expect("valid"));
    }

    #[test]
    fn tiny_cohorts() {
        let one = Graph::harary(1, 0, &seed(0)).expect("n = 1 is the complete graph on one node");
        assert!(one.is_complete());
        assert_eq!(one.neighbours(0), &[] as &[u32]);
        assert_eq!(one.degree(0), 0);
        assert_eq!(Graph::harary(1, 8, &seed(0)).expect("valid"), one);

        let two = Graph::harary(2, 2, &seed(0)).expect("valid");
        assert_eq!((two.neighbours(0), two.neighbours(1)), (&[1u32][..], &[0u32][..]));

        let three = Graph::harary(3, 2, &seed(0)).expect("valid");
        assert!(three.is_complete());
        assert_eq!(three.neighbours(1), &[0, 2]);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert_eq!(Graph::harary(0, 2, &seed(0)), Err(GraphError::Empty));
        assert_eq!(Graph::complete(0), Err(GraphError::Empty));
        assert_eq!(Graph::harary(10, 3, &seed(0)), Err(GraphError::OddDegree { k: 3, n: 10 }));
        assert_eq!(Graph::harary(10, 0, &seed(0)), Err(GraphError::ZeroDegree { n: 10 }));
        assert_eq!(Graph::harary(2, 0, &seed(0)), Err(GraphError::ZeroDegree { n: 2 }));
        assert_eq!(Graph::complete(100_000), Err(GraphError::TooLarge { n: 100_000, degree: 99_999 }));
        assert!(matches!(Graph::harary(usize::MAX, 4, &seed(0)), Err(GraphError::TooLarge { .. })));
    }

    #[test]
    fn out_of_range_nodes_have_no_neighbours() {
        let g = Graph::harary(10, 4, &seed(0)).expect("valid");
        assert!(g.neighbours(10).is_empty());
        assert_eq!(g.degree(10), 0);
        assert!(!g.are_neighbours(0, 10));
        assert!(!g.are_neighbours(3, 3));
    }

    #[test]
    fn a_production_size_graph_builds() {
        let g = Graph::harary(100_000, 100, &seed(7)).expect("valid");
        assert_eq!(g.n(), 100_000);
        for i in [0, 1, 50_000, 99_999] {
            let row = g.neighbours(i);
            assert_eq!(row.len(), 100);
            assert!(row.iter().all(|&j| g.neighbours(j as usize).binary_search(&(i as u32)).is_ok()));
        }
    }
}
