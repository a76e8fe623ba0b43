//! The cryptography of a SecAgg+ round: per-round X25519 key pairs, HKDF-SHA256 derivation of pairwise mask seeds and share-encryption keys, ChaCha20-Poly1305 sealing of shares, and masks expanded from a ChaCha20 keystream.
//!
//! Every step is a standard primitive used as its specification says, as in Bonawitz et al.,
//! "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017, §4/§6
//! (key agreement + KDF for pairwise seeds, authenticated encryption of shares, a PRG to expand
//! seeds into masks), with the concrete choices of `docs/secagg.md`:
//!
//! - key agreement: X25519 (RFC 7748), refusing an all-zero shared secret (RFC 7748 §6.1, a
//!   low-order peer key);
//! - key derivation: HKDF-SHA256 (RFC 5869) with the public round seed as salt and an info
//!   string naming the purpose, the round and the two device indices;
//! - encryption of shares: ChaCha20-Poly1305 (RFC 8439 §2.8) with nonce 0, because each
//!   derived key seals exactly one message;
//! - masks: the ChaCha20 keystream (RFC 8439 §2.4, nonce 0, counter from 0) read as
//!   little-endian words and reduced mod `2^b`.
//!
//! All byte strings fed to HKDF and the AEAD encode integers little-endian: `round` as a `u64`,
//! device indices as `u32`.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use rand::{CryptoRng, Rng};
use ring::{aead, hkdf};
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// HKDF info prefix of a pairwise mask seed.
const MASK_INFO: &[u8] = b"fedrec/secagg/v1/mask";
/// HKDF info prefix of a share-encryption key.
const SHARE_INFO: &[u8] = b"fedrec/secagg/v1/share";
/// Bytes of keystream generated per block of coordinates: large enough for the SIMD backends
/// to work on many ChaCha blocks at once, small enough to stay in L1 cache.
const KEYSTREAM_BUFFER: usize = 8 * 1024;
/// The ChaCha20 block counter is 32 bits (RFC 8439 §2.4): one key and nonce give at most
/// `2^32` blocks of 64 bytes.
const MAX_KEYSTREAM_BYTES: u64 = 64 << 32;

/// Why a key agreement, a decryption or a mask failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The X25519 shared secret is all zeros: the peer's public key is a low-order point
    /// (RFC 7748 §6.1). A peer (or the coordinator relaying its key) misbehaved.
    #[error("the peer's public key is a low-order point (all-zero shared secret)")]
    LowOrderPeerKey,
    /// A device index was paired with itself.
    #[error("device index {0} cannot be paired with itself")]
    SameIndex(u32),
    /// A ciphertext failed authentication: tampered, truncated, for another round or
    /// direction, or from another key. The sender or the relay misbehaved.
    #[error("a sealed share failed authentication")]
    Decrypt,
    /// A plaintext too long for one ChaCha20-Poly1305 message.
    #[error("plaintext too long to seal")]
    TooLong,
    /// The mask width is not in `1..=64`.
    #[error("mask width {0} bits is not in 1..=64")]
    InvalidBits(u32),
    /// The vector is longer than one ChaCha20 keystream (2^38 bytes) can mask.
    #[error("{0} coordinates exceed one keystream")]
    TooManyCoordinates(usize),
}

/// The public context of one round, bound into every derived key: the round number and the
/// random seed the coordinator drew when check-in closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundContext {
    /// The round number.
    pub round: u64,
    /// The round's public randomness (it also defines the neighbour graph).
    pub seed: [u8; 32],
}

/// An X25519 key pair for one round (RFC 7748). The secret is zeroized on drop, never
/// serialized, and not shown by `Debug`.
pub struct KeyPair {
    secret: StaticSecret,
    public: PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").field("public", self.public.as_bytes()).finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh key pair from 32 bytes of `rng` (RFC 7748 §5: any 32 bytes are a private key;
    /// clamping happens in the scalar multiplication).
    pub fn generate<R: Rng + CryptoRng + ?Sized>(rng: &mut R) -> KeyPair {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut bytes[..]);
        KeyPair::from_secret_bytes(&bytes)
    }

    /// The key pair with this private key, e.g. one reconstructed from Shamir shares.
    pub fn from_secret_bytes(bytes: &[u8; 32]) -> KeyPair {
        let secret = StaticSecret::from(*bytes);
        let public = PublicKey::from(&secret);
        KeyPair { secret, public }
    }

    /// The public key, to advertise.
    pub fn public(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// The private key's 32 bytes, to split into Shamir shares. Keep them in the returned
    /// wrapper so they are zeroized.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// HKDF-SHA256 (RFC 5869) of the X25519 shared secret with the round seed as salt:
    /// `ikm = X25519(own, peer)`, `salt = ctx.seed`, `info = prefix ‖ round ‖ a ‖ b`, 32 bytes
    /// of output.
    fn derive(
        &self,
        peer_public: &[u8; 32],
        ctx: &RoundContext,
        prefix: &[u8],
        a: u32,
        b: u32,
    ) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        expand(&self.extract(peer_public, ctx)?, ctx, prefix, a, b)
    }

    /// HKDF-Extract of the X25519 shared secret with the round seed as salt.
    fn extract(&self, peer_public: &[u8; 32], ctx: &RoundContext) -> Result<hkdf::Prk, CryptoError> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer_public));
        // RFC 7748 §6.1: an all-zero output means a low-order point; refuse it rather than
        // derive a key every eavesdropper knows.
        if !shared.was_contributory() {
            return Err(CryptoError::LowOrderPeerKey);
        }
        Ok(hkdf::Salt::new(hkdf::HKDF_SHA256, &ctx.seed).extract(shared.as_bytes()))
    }
}

/// HKDF-Expand of `prk` with `info = prefix ‖ round ‖ a ‖ b`, 32 bytes.
fn expand(
    prk: &hkdf::Prk,
    ctx: &RoundContext,
    prefix: &[u8],
    a: u32,
    b: u32,
) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    let round = ctx.round.to_le_bytes();
    let (a, b) = (a.to_le_bytes(), b.to_le_bytes());
    let info: [&[u8]; 4] = [prefix, &round, &a, &b];
    let mut out = Zeroizing::new([0u8; 32]);
    // HKDF-Expand fails only for an output longer than 255 hash blocks; ours is one.
    prk.expand(&info, hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out[..]))
        .map_err(|_| CryptoError::TooLong)?;
    Ok(out)
}

/// The pairwise mask seed `s_ij` of devices `i` and `j` (Bonawitz et al. 2017, §4: a key
/// agreement between the two devices' mask keys, then a KDF):
/// HKDF-SHA256(ikm = X25519(s_i, S_j), salt = round seed,
/// info = "fedrec/secagg/v1/mask" ‖ round ‖ min(i, j) ‖ max(i, j)).
///
/// Symmetric: `mask_seed(s_i, S_j, ctx, i, j) == mask_seed(s_j, S_i, ctx, j, i)`. The caller
/// adds `PRG(s_ij)` when `j < i` and subtracts it when `j > i`, so the pair cancels in the sum.
/// Fails for `i == j` and for a low-order peer key.
pub fn mask_seed(
    own: &KeyPair,
    peer_public: &[u8; 32],
    ctx: &RoundContext,
    i: u32,
    j: u32,
) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    if i == j {
        return Err(CryptoError::SameIndex(i));
    }
    own.derive(peer_public, ctx, MASK_INFO, i.min(j), i.max(j))
}

/// The key that seals the shares `sender` sends to `receiver` in one round (and nothing else).
/// Built with [`share_key`]; the key is directional, so `i → j` and `j → i` differ.
pub struct ShareKey {
    key: aead::LessSafeKey,
    aad: [u8; 16],
}

impl std::fmt::Debug for ShareKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareKey").finish_non_exhaustive()
    }
}

/// The ChaCha20-Poly1305 key for shares sent from `sender` to `receiver`:
/// HKDF-SHA256(ikm = X25519(c_own, C_peer), salt = round seed,
/// info = "fedrec/secagg/v1/share" ‖ round ‖ sender ‖ receiver) (RFC 5869, RFC 8439 §2.8).
///
/// The sender calls it with its own key pair and the receiver's public key; the receiver with
/// its own key pair and the sender's public key, and the same `(sender, receiver)`. Fails for
/// `sender == receiver` and for a low-order peer key.
pub fn share_key(
    own: &KeyPair,
    peer_public: &[u8; 32],
    ctx: &RoundContext,
    sender: u32,
    receiver: u32,
) -> Result<ShareKey, CryptoError> {
    if sender == receiver {
        return Err(CryptoError::SameIndex(sender));
    }
    let bytes = own.derive(peer_public, ctx, SHARE_INFO, sender, receiver)?;
    ShareKeyBytes::new(bytes, ctx, sender, receiver).key()
}

/// Both share keys between `me` and `peer` from one X25519 agreement: the key that seals what
/// `me` sends (`me → peer`) and, kept as zeroized bytes until the shares arrive, the key that
/// opens what `peer` sends (`peer → me`). Each equals [`share_key`] for its direction; a
/// device that keeps the second spares the agreement it would otherwise redo one phase later.
pub fn share_keys_both_ways(
    own: &KeyPair,
    peer_public: &[u8; 32],
    ctx: &RoundContext,
    me: u32,
    peer: u32,
) -> Result<(ShareKey, ShareKeyBytes), CryptoError> {
    if me == peer {
        return Err(CryptoError::SameIndex(me));
    }
    let prk = own.extract(peer_public, ctx)?;
    let send = ShareKeyBytes::new(expand(&prk, ctx, SHARE_INFO, me, peer)?, ctx, me, peer).key()?;
    let receive = ShareKeyBytes::new(expand(&prk, ctx, SHARE_INFO, peer, me)?, ctx, peer, me);
    Ok((send, receive))
}

/// A share key's bytes and associated data, zeroized when dropped: a [`ShareKey`] to build
/// when it is needed ([`ShareKeyBytes::key`]).
pub struct ShareKeyBytes {
    bytes: Zeroizing<[u8; 32]>,
    aad: [u8; 16],
}

impl std::fmt::Debug for ShareKeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareKeyBytes").finish_non_exhaustive()
    }
}

impl ShareKeyBytes {
    fn new(bytes: Zeroizing<[u8; 32]>, ctx: &RoundContext, sender: u32, receiver: u32) -> Self {
        let mut aad = [0u8; 16];
        aad[..8].copy_from_slice(&ctx.round.to_le_bytes());
        aad[8..12].copy_from_slice(&sender.to_le_bytes());
        aad[12..].copy_from_slice(&receiver.to_le_bytes());
        ShareKeyBytes { bytes, aad }
    }

    /// The key, ready to seal or open one message.
    pub fn key(&self) -> Result<ShareKey, CryptoError> {
        // A 32-byte key is the one length CHACHA20_POLY1305 accepts, so this cannot fail.
        let key = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &self.bytes[..])
            .map_err(|_| CryptoError::TooLong)?;
        Ok(ShareKey { key: aead::LessSafeKey::new(key), aad: self.aad })
    }
}

impl ShareKey {
    /// Seals `plaintext` (ChaCha20-Poly1305, RFC 8439 §2.8) with nonce 0 and associated data
    /// `round ‖ sender ‖ receiver`; the result is 16 bytes longer than the plaintext.
    ///
    /// Takes the key by value: a fixed nonce is safe only because each key seals one message,
    /// and consuming the key makes a second seal with it a compile error.
    pub fn seal(self, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut buffer = Vec::with_capacity(plaintext.len() + aead::CHACHA20_POLY1305.tag_len());
        buffer.extend_from_slice(plaintext);
        self.key
            .seal_in_place_append_tag(self.nonce(), aead::Aad::from(self.aad), &mut buffer)
            .map_err(|_| CryptoError::TooLong)?;
        Ok(buffer)
    }

    /// Opens a ciphertext made by [`ShareKey::seal`] with the same key, round and direction.
    /// Anything else (tampering, truncation, another round, the reverse direction) fails with
    /// [`CryptoError::Decrypt`].
    pub fn open(&self, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let mut buffer = Zeroizing::new(ciphertext.to_vec());
        let len = self
            .key
            .open_in_place(self.nonce(), aead::Aad::from(self.aad), &mut buffer[..])
            .map_err(|_| CryptoError::Decrypt)?
            .len();
        buffer.truncate(len);
        Ok(buffer)
    }

    fn nonce(&self) -> aead::Nonce {
        aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN])
    }
}

/// `2^bits − 1`, the mask that reduces a `u64` mod `2^bits`; fails unless `bits` is in `1..=64`.
pub fn mask_of(bits: u32) -> Result<u64, CryptoError> {
    match bits {
        1..=63 => Ok((1u64 << bits) - 1),
        64 => Ok(u64::MAX),
        _ => Err(CryptoError::InvalidBits(bits)),
    }
}

/// Reduces every coordinate mod `2^bits`; fails unless `bits` is in `1..=64`.
pub fn reduce(acc: &mut [u64], bits: u32) -> Result<(), CryptoError> {
    let mask = mask_of(bits)?;
    acc.iter_mut().for_each(|a| *a &= mask);
    Ok(())
}

/// Adds (or with `negate`, subtracts) the mask `PRG(seed)` to `acc` coordinate-wise mod
/// `2^bits`, leaving every coordinate reduced mod `2^bits`.
///
/// `PRG(seed)` is the ChaCha20 keystream (RFC 8439 §2.4) under key `seed`, nonce 0, block
/// counter starting at 0, read as consecutive little-endian words — `u32` when `bits ≤ 32`,
/// `u64` otherwise — each reduced mod `2^bits` (a uniform word reduced mod a power of two is
/// uniform). Fails, leaving `acc` unchanged, unless `bits` is in `1..=64` and the keystream is
/// long enough (2^38 bytes).
pub fn add_mask(acc: &mut [u64], seed: &[u8; 32], bits: u32, negate: bool) -> Result<(), CryptoError> {
    let mask = mask_of(bits)?;
    let word = if bits <= 32 { 4 } else { 8 };
    if acc.len() as u64 > MAX_KEYSTREAM_BYTES / word as u64 {
        return Err(CryptoError::TooManyCoordinates(acc.len()));
    }
    let n_coordinates = acc.len();
    let mut cipher = ChaCha20::new(seed.into(), &Default::default());
    let mut buffer = Zeroizing::new([0u8; KEYSTREAM_BUFFER]);
    for coordinates in acc.chunks_mut(KEYSTREAM_BUFFER / word) {
        let keystream = &mut buffer[..coordinates.len() * word];
        cipher.try_write_keystream(keystream).map_err(|_| CryptoError::TooManyCoordinates(n_coordinates))?;
        match (word, negate) {
            (4, false) => mix::<4, false>(coordinates, keystream, mask),
            (4, true) => mix::<4, true>(coordinates, keystream, mask),
            (_, false) => mix::<8, false>(coordinates, keystream, mask),
            (_, true) => mix::<8, true>(coordinates, keystream, mask),
        }
    }
    Ok(())
}

/// `acc[i] = (acc[i] ± word_i) mod 2^bits` for the little-endian `W`-byte words of
/// `keystream`. Wrapping arithmetic mod 2^64 followed by the mask is exact mod 2^bits because
/// 2^bits divides 2^64. Monomorphized so the inner loop has no branch.
fn mix<const W: usize, const NEGATE: bool>(acc: &mut [u64], keystream: &[u8], mask: u64) {
    let (words, _) = keystream.as_chunks::<W>();
    for (a, w) in acc.iter_mut().zip(words) {
        let mut le = [0u8; 8];
        le[..W].copy_from_slice(w);
        let m = u64::from_le_bytes(le);
        *a = if NEGATE { a.wrapping_sub(m) } else { a.wrapping_add(m) } & mask;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::danger::seeded_rng;
    use proptest::prelude::*;
    // Named explicitly: both globs above bring a `Rng` into scope.
    use rand::Rng;

    #[test]
    fn both_ways_keys_are_the_one_way_keys() {
        let mut rng = seeded_rng(7);
        let (a, b) = (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
        let ctx = RoundContext { round: 3, seed: [9; 32] };
        let (send, receive) = share_keys_both_ways(&a, &b.public(), &ctx, 1, 4).expect("keys");
        // What a seals for b, b opens with its one-way key for 1 → 4, and the other way round.
        let sealed = send.seal(b"to four").expect("seal");
        let opened = share_key(&b, &a.public(), &ctx, 1, 4).expect("key").open(&sealed).expect("open");
        assert_eq!(&opened[..], b"to four");
        let back = share_key(&b, &a.public(), &ctx, 4, 1).expect("key").seal(b"to one").expect("seal");
        assert_eq!(&receive.key().expect("key").open(&back).expect("open")[..], b"to one");
        // Keys of the other direction do not open it.
        assert!(share_key(&b, &a.public(), &ctx, 4, 1).expect("key").open(&sealed).is_err());
        assert!(share_keys_both_ways(&a, &b.public(), &ctx, 2, 2).is_err());
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
            *o =
                u8::from_str_radix(std::str::from_utf8(pair).expect("hex literal"), 16).expect("hex literal");
        }
        out
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex literal")).collect()
    }

    /// Alice's and Bob's keys from RFC 7748 §6.1.
    fn rfc7748() -> (KeyPair, KeyPair) {
        let alice = KeyPair::from_secret_bytes(&hex32(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let bob = KeyPair::from_secret_bytes(&hex32(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        (alice, bob)
    }

    fn ctx(round: u64) -> RoundContext {
        let mut seed = [0u8; 32];
        seed.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        RoundContext { round, seed }
    }

    /// RFC 7748 §6.1 key pairs, then HKDF and the AEAD as specified in `docs/secagg.md`. The
    /// expected values were computed independently with Python's `cryptography` 48 (X25519,
    /// HKDF-SHA256 and ChaCha20Poly1305 of OpenSSL), round 42, seed 00 01 … 1f, i = 3, j = 7.
    #[test]
    fn known_answer_key_agreement_hkdf_and_aead() {
        let (alice, bob) = rfc7748();
        assert_eq!(alice.public(), hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"));
        assert_eq!(bob.public(), hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"));
        let expected = hex32("2e0654d394f7035ce43c5c41eee5f40b937ea4a8b3747268845f911890468154");
        assert_eq!(*mask_seed(&alice, &bob.public(), &ctx(42), 3, 7).expect("valid in this test"), expected);
        assert_eq!(*mask_seed(&bob, &alice.public(), &ctx(42), 7, 3).expect("valid in this test"), expected);

        let sealed = share_key(&alice, &bob.public(), &ctx(42), 3, 7)
            .expect("valid in this test")
            .seal(b"fedrec share")
            .expect("valid in this test");
        assert_eq!(sealed, hex("70c7daec33183d15d9dfab274f64255d7a4e1ca840361f6b58f6424f"));
        let opened = share_key(&bob, &alice.public(), &ctx(42), 3, 7)
            .expect("valid in this test")
            .open(&sealed)
            .expect("valid in this test");
        assert_eq!(&opened[..], b"fedrec share");
    }

    #[test]
    fn mask_seed_is_symmetric_and_bound_to_its_context() {
        let mut rng = seeded_rng(10);
        let (a, b, c) =
            (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
        let base = mask_seed(&a, &b.public(), &ctx(1), 4, 9).expect("valid in this test");
        assert_eq!(base, mask_seed(&b, &a.public(), &ctx(1), 9, 4).expect("valid in this test"));
        assert_eq!(base, mask_seed(&a, &b.public(), &ctx(1), 9, 4).expect("valid in this test"));
        let others = [
            mask_seed(&a, &b.public(), &ctx(2), 4, 9).expect("valid in this test"),
            mask_seed(&a, &b.public(), &RoundContext { seed: [9; 32], ..ctx(1) }, 4, 9)
                .expect("valid in this test"),
            mask_seed(&a, &b.public(), &ctx(1), 4, 8).expect("valid in this test"),
            mask_seed(&a, &c.public(), &ctx(1), 4, 9).expect("valid in this test"),
        ];
        for other in &others {
            assert_ne!(base, *other);
        }
        assert_eq!(mask_seed(&a, &b.public(), &ctx(1), 5, 5), Err(CryptoError::SameIndex(5)));
        assert!(matches!(share_key(&a, &b.public(), &ctx(1), 5, 5), Err(CryptoError::SameIndex(5))));
    }

    /// Low-order points (u = 0 and u = 1 on Curve25519) give an all-zero shared secret.
    #[test]
    fn low_order_peer_key_refused() {
        let mut rng = seeded_rng(11);
        let own = KeyPair::generate(&mut rng);
        let mut one = [0u8; 32];
        one[0] = 1;
        for low_order in [[0u8; 32], one] {
            assert_eq!(mask_seed(&own, &low_order, &ctx(1), 0, 1), Err(CryptoError::LowOrderPeerKey));
            assert!(matches!(share_key(&own, &low_order, &ctx(1), 0, 1), Err(CryptoError::LowOrderPeerKey)));
        }
    }

    #[test]
    fn secret_bytes_round_trip_and_debug_hides_them() {
        let mut rng = seeded_rng(12);
        let pair = KeyPair::generate(&mut rng);
        let again = KeyPair::from_secret_bytes(&pair.secret_bytes());
        assert_eq!(again.public(), pair.public());
        let peer = KeyPair::generate(&mut rng);
        assert_eq!(
            mask_seed(&pair, &peer.public(), &ctx(1), 0, 1).expect("valid in this test"),
            mask_seed(&again, &peer.public(), &ctx(1), 0, 1).expect("valid in this test")
        );
        let printed = format!("{pair:?}");
        let secret = pair.secret_bytes();
        assert!(!printed.contains(&format!("{:?}", &secret[..])));
        assert!(printed.contains(&format!("{:?}", pair.public())));
        assert!(
            !format!("{:?}", share_key(&pair, &peer.public(), &ctx(1), 0, 1).expect("valid in this test"))
                .contains("key:")
        );
    }

    #[test]
    fn sealed_shares_round_trip_and_refuse_anything_else() {
        let mut rng = seeded_rng(13);
        let (i, j) = (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
        let plaintext: Vec<u8> = (0..88).collect();
        let sealed = share_key(&i, &j.public(), &ctx(5), 1, 2)
            .expect("valid in this test")
            .seal(&plaintext)
            .expect("valid in this test");
        assert_eq!(sealed.len(), plaintext.len() + 16);
        assert_ne!(&sealed[..88], &plaintext[..]);
        let receiver = share_key(&j, &i.public(), &ctx(5), 1, 2).expect("valid in this test");
        assert_eq!(&receiver.open(&sealed).expect("valid in this test")[..], &plaintext[..]);

        for position in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[position] ^= 0x01;
            assert_eq!(receiver.open(&tampered), Err(CryptoError::Decrypt), "byte {position}");
        }
        assert_eq!(receiver.open(&sealed[..sealed.len() - 1]), Err(CryptoError::Decrypt));
        assert_eq!(receiver.open(&[]), Err(CryptoError::Decrypt));
        let wrong = [
            share_key(&j, &i.public(), &ctx(6), 1, 2).expect("valid in this test"), // another round
            share_key(&j, &i.public(), &ctx(5), 2, 1).expect("valid in this test"), // the reverse direction
            share_key(&i, &j.public(), &ctx(5), 2, 1).expect("valid in this test"), // j → i as the sender sees it
            share_key(&j, &i.public(), &ctx(5), 1, 3).expect("valid in this test"), // another receiver index
            share_key(&j, &j.public(), &ctx(5), 1, 2).expect("valid in this test"), // another peer key
        ];
        for key in &wrong {
            assert_eq!(key.open(&sealed), Err(CryptoError::Decrypt));
        }
        // The two directions use different keys: the same plaintext seals differently.
        let reverse = share_key(&j, &i.public(), &ctx(5), 2, 1)
            .expect("valid in this test")
            .seal(&plaintext)
            .expect("valid in this test");
        assert_ne!(reverse, sealed);
        assert_eq!(
            share_key(&i, &j.public(), &ctx(5), 2, 1)
                .expect("valid in this test")
                .open(&reverse)
                .expect("valid in this test")[..],
            plaintext[..]
        );
        let empty = share_key(&i, &j.public(), &ctx(5), 1, 2)
            .expect("valid in this test")
            .seal(&[])
            .expect("valid in this test");
        assert_eq!(empty.len(), 16);
        assert!(receiver.open(&empty).expect("valid in this test").is_empty());
    }

    /// RFC 8439 §A.1, test vectors #1 and #2: the ChaCha20 keystream for the all-zero key
    /// and nonce, blocks 0 and 1.
    const RFC8439_A1_BLOCKS_0_1: &str = "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7\
        da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586\
        9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed\
        29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f";

    #[test]
    fn mask_known_answer_rfc8439() {
        let keystream = hex(&RFC8439_A1_BLOCKS_0_1.replace(' ', ""));
        assert_eq!(keystream.len(), 128);
        let mut acc = vec![0u64; 32];
        add_mask(&mut acc, &[0; 32], 32, false).expect("valid in this test");
        assert_eq!(acc[0], 0xade0_b876);
        assert_eq!(acc[1], 0x903d_f1a0);
        for (k, a) in acc.iter().enumerate() {
            let word = u32::from_le_bytes([
                keystream[4 * k],
                keystream[4 * k + 1],
                keystream[4 * k + 2],
                keystream[4 * k + 3],
            ]);
            assert_eq!(*a, u64::from(word));
        }
        let mut acc64 = vec![0u64; 16];
        add_mask(&mut acc64, &[0; 32], 64, false).expect("valid in this test");
        for (k, a) in acc64.iter().enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(&keystream[8 * k..8 * k + 8]);
            assert_eq!(*a, u64::from_le_bytes(word));
        }
        // Narrower widths keep the low bits of the same words; 33..=64 read u64 words.
        for bits in [1, 20, 31, 33, 40, 63] {
            let mut narrow = vec![0u64; 16];
            add_mask(&mut narrow, &[0; 32], bits, false).expect("valid in this test");
            let wide = if bits <= 32 { &acc[..16] } else { &acc64[..] };
            for (n, w) in narrow.iter().zip(wide) {
                assert_eq!(*n, w & mask_of(bits).expect("valid in this test"), "bits {bits}");
            }
        }
        // Subtracting from zero gives the negated words mod 2^32.
        let mut negated = vec![0u64; 2];
        add_mask(&mut negated, &[0; 32], 32, true).expect("valid in this test");
        assert_eq!(negated, vec![(1 << 32) - 0xade0_b876, (1 << 32) - 0x903d_f1a0]);
    }

    /// The keystream continues across the internal buffer: a long mask equals the keystream
    /// of one `apply_keystream` call over the whole length.
    #[test]
    fn mask_is_one_continuous_keystream() {
        let seed = [7u8; 32];
        for (bits, word) in [(32u32, 4usize), (64, 8)] {
            let n = 3 * KEYSTREAM_BUFFER / word + 5;
            let mut whole = vec![0u8; n * word];
            ChaCha20::new((&seed).into(), &Default::default()).apply_keystream(&mut whole);
            let mut acc = vec![0u64; n];
            add_mask(&mut acc, &seed, bits, false).expect("valid in this test");
            for (k, a) in acc.iter().enumerate() {
                let mut le = [0u8; 8];
                le[..word].copy_from_slice(&whole[k * word..(k + 1) * word]);
                assert_eq!(*a, u64::from_le_bytes(le), "coordinate {k}");
            }
        }
    }

    #[test]
    fn invalid_widths_refused_and_leave_acc_unchanged() {
        for bits in [0, 65, u32::MAX] {
            let mut acc = vec![3u64; 4];
            assert_eq!(add_mask(&mut acc, &[1; 32], bits, false), Err(CryptoError::InvalidBits(bits)));
            assert_eq!(acc, vec![3; 4]);
            assert_eq!(mask_of(bits), Err(CryptoError::InvalidBits(bits)));
            assert_eq!(reduce(&mut acc, bits), Err(CryptoError::InvalidBits(bits)));
        }
        assert_eq!(mask_of(1), Ok(1));
        assert_eq!(mask_of(64), Ok(u64::MAX));
        let mut acc = vec![u64::MAX, 5];
        reduce(&mut acc, 2).expect("valid in this test");
        assert_eq!(acc, vec![3, 1]);
    }

    /// Chi-square statistic over 16 buckets.
    fn chi_square(counts: &[u64; 16], total: usize) -> f64 {
        let expected = total as f64 / 16.0;
        counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum()
    }

    /// Mask words at b = 32 are uniform: 100,000 words from a fixed seed, bucketed by their
    /// top 4 and by their low 4 bits, pass a chi-square test with 15 degrees of freedom at
    /// p = 10^−6 (critical value 56.49). The same test rejects the top bits of 31-bit words
    /// (half the buckets empty), so it can fail.
    #[test]
    fn mask_words_are_uniform() {
        const CRITICAL: f64 = 56.49;
        const N: usize = 100_000;
        let seed = [0x5a; 32];
        let mut acc = vec![0u64; N];
        add_mask(&mut acc, &seed, 32, false).expect("valid in this test");
        let mut top = [0u64; 16];
        let mut low = [0u64; 16];
        for a in &acc {
            top[(a >> 28) as usize] += 1;
            low[(a & 15) as usize] += 1;
        }
        assert!(chi_square(&top, N) < CRITICAL, "top bits: {}", chi_square(&top, N));
        assert!(chi_square(&low, N) < CRITICAL, "low bits: {}", chi_square(&low, N));

        let mut narrow = vec![0u64; N];
        add_mask(&mut narrow, &seed, 31, false).expect("valid in this test");
        let mut biased = [0u64; 16];
        narrow.iter().for_each(|a| biased[(a >> 28) as usize] += 1);
        assert!(chi_square(&biased, N) > CRITICAL);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Adding then subtracting the same mask is the identity on reduced vectors, for
        /// every width and for lengths across the internal buffer.
        #[test]
        fn add_then_subtract_is_identity(
            bits in 1u32..=64,
            seed in any::<[u8; 32]>(),
            values in proptest::collection::vec(any::<u64>(), 0..5000),
        ) {
            let mut acc = values;
            reduce(&mut acc, bits).expect("valid in this test");
            let original = acc.clone();
            add_mask(&mut acc, &seed, bits, false).expect("valid in this test");
            if original.len() >= 4 && bits >= 8 {
                prop_assert_ne!(&acc, &original);
            }
            prop_assert!(acc.iter().all(|&a| a <= mask_of(bits).expect("valid in this test")));
            add_mask(&mut acc, &seed, bits, true).expect("valid in this test");
            prop_assert_eq!(acc, original);
        }

        /// Different seeds give different masks.
        #[test]
        fn different_seeds_differ(a in any::<[u8; 32]>(), b in any::<[u8; 32]>(), bits in 16u32..=64) {
            prop_assume!(a != b);
            let (mut ma, mut mb) = (vec![0u64; 64], vec![0u64; 64]);
            add_mask(&mut ma, &a, bits, false).expect("valid in this test");
            add_mask(&mut mb, &b, bits, false).expect("valid in this test");
            prop_assert_ne!(ma, mb);
        }

        /// Pairwise masks cancel: i adds PRG(s_ij) and j subtracts PRG(s_ji) (i < j), and the
        /// sum of the two masked vectors is the sum of the inputs mod 2^b.
        #[test]
        fn pairwise_masks_cancel(seed in any::<u64>(), bits in 1u32..=64, n in 0usize..300) {
            let mut rng = seeded_rng(seed);
            let (ki, kj) = (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
            let mask = mask_of(bits).expect("valid in this test");
            let xi: Vec<u64> = (0..n).map(|_| rng.random::<u64>() & mask).collect();
            let xj: Vec<u64> = (0..n).map(|_| rng.random::<u64>() & mask).collect();
            let (mut yi, mut yj) = (xi.clone(), xj.clone());
            add_mask(&mut yi, &mask_seed(&ki, &kj.public(), &ctx(3), 0, 1).expect("valid in this test"), bits, false).expect("valid in this test");
            add_mask(&mut yj, &mask_seed(&kj, &ki.public(), &ctx(3), 1, 0).expect("valid in this test"), bits, true).expect("valid in this test");
            let sum = |a: &[u64], b: &[u64]| -> Vec<u64> {
                a.iter().zip(b).map(|(x, y)| x.wrapping_add(*y) & mask).collect()
            };
            prop_assert_eq!(sum(&yi, &yj), sum(&xi, &xj));
        }
    }
}
