//! Secure aggregation (SecAgg+, Bell et al., CCS 2020; with a complete graph the SecAgg of Bonawitz et al., CCS 2017): the building blocks the round machines use so that the coordinator learns only the sum of the survivors' updates.
//!
//! The protocol, its messages, who learns what and what a dropout changes are written down in
//! `docs/secagg.md`. This module holds the pieces, each with known-answer and property tests:
//!
//! - [`shamir`]: t-of-n Shamir sharing of 32-byte secrets over the prime field `2^61 − 1`;
//! - [`crypto`]: per-round X25519 key pairs, HKDF-SHA256 key derivation, the AEAD that seals
//!   shares between two devices, and masks expanded from a ChaCha20 keystream;
//! - [`encode`]: the fixed-point encoding of a clipped update into integers mod `2^b`;
//! - [`graph`]: the random k-regular neighbour graph drawn from public round randomness;
//! - [`params`]: the parameter finder that picks the neighbour count `k` and threshold `t`.

pub mod crypto;
pub mod encode;
pub mod graph;
pub mod params;
pub mod shamir;
