//! Device authentication: enrollment tokens (HMAC-SHA256, ring), their verification with key rotation and revocation, upload replay protection and the per-device daily round quota.
//!
//! Everything here is sans-IO: the caller passes the time (`now_ms`, milliseconds since the
//! Unix epoch, UTC) and the randomness, and loads and saves the plain data ([`TokenKey`]
//! bytes, [`DeviceId`]s, the [`RevocationList`]) itself.
//!
//! # Enrollment token, version 1
//!
//! A token is [`TOKEN_LEN`] (57) bytes, all integers little-endian:
//!
//! ```text
//! offset  len  field
//!      0    1  version         = TOKEN_VERSION (1)
//!      1    8  device_id       u64 (DeviceId)
//!      9    8  issued_at_ms    u64, Unix time in ms
//!     17    8  expires_at_ms   u64, Unix time in ms; 0 = never expires
//!     25   32  tag             HMAC-SHA256(key, bytes 0..25)
//! ```
//!
//! The version byte comes first in every later version too, so a verifier reads it before
//! anything else: a token of another version is [`AuthError::UnsupportedVersion`], a version-1
//! token of any length but 57 is [`AuthError::Malformed`]. The tag is checked in constant time
//! ([`ring::hmac::verify`]) against each key of the [`Verifier`], newest first. A token is valid
//! while `now_ms < expires_at_ms`: at `now_ms == expires_at_ms` it has expired (the end is
//! exclusive).
//!
//! The token is a bearer credential: whoever holds it is the device. It is not encrypted
//! (device id and times are readable), only authenticated. Its `Debug` output shows neither
//! bytes nor tag, and no error of this module carries token bytes or key material.
//!
//! # Where each check belongs
//!
//! - Check-in: [`Verifier::verify`] the token, then [`DailyQuota::check`] the device; when the
//!   round machine selects it, [`DailyQuota::record`] the round (the quota counts rounds a
//!   device takes part in, not check-ins: a device that is not selected loses nothing).
//! - Upload: check the round number against the current round (the round machine's
//!   `WrongRound`), then [`ReplayGuard::check_and_record`] the nonce, then hand the upload to
//!   the round machine, which refuses a second upload of a device in one round
//!   (`Rejection::Duplicate`). The replay guard only remembers nonces.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use fedrec_shared::wire::{ErrorCode, MAX_TOKEN_LEN, NONCE_LEN};
use ring::hmac;
use ring::rand::SecureRandom;

/// The token format version this coordinator issues and accepts.
pub const TOKEN_VERSION: u8 = 1;
/// Length of a version-1 token in bytes: version, device id, two times and the tag.
pub const TOKEN_LEN: usize = 1 + 8 + 8 + 8 + TAG_LEN;
/// Length of the HMAC-SHA256 tag that ends a token.
pub const TAG_LEN: usize = 32;
/// Length of the bytes the tag covers (everything before it).
const SIGNED_LEN: usize = TOKEN_LEN - TAG_LEN;
/// Shortest [`TokenKey`] accepted, in bytes: SHA-256's output length.
pub const MIN_KEY_LEN: usize = 32;
/// Longest [`TokenKey`] accepted, in bytes: SHA-256's block length. HMAC hashes a longer key
/// first, so more bytes add no strength; a longer input is more likely a wrong file.
pub const MAX_KEY_LEN: usize = 64;
/// Length of a key [`TokenKey::generate`] draws.
pub const GENERATED_KEY_LEN: usize = 32;
/// Most keys a [`Verifier`] holds: a check-in costs one HMAC per key in the worst case.
pub const MAX_KEYS: usize = 8;
/// Milliseconds in a UTC day (Unix time has no leap seconds).
pub const MS_PER_DAY: u64 = 86_400_000;

// A token must fit in a check-in.
const _: () = assert!(TOKEN_LEN <= MAX_TOKEN_LEN);

/// Why authentication, a replay check, a quota or a key operation failed.
///
/// [`AuthError::kind`] tells who is at fault: the peer ([`ErrorKind::PeerMisbehaved`]: cut it
/// off), a legitimate refusal ([`ErrorKind::Refused`]: tell the device), or the coordinator
/// itself ([`ErrorKind::Local`]). [`AuthError::label`] is a stable name for metrics and
/// [`AuthError::code`] the wire code to answer with. No message contains token bytes, key
/// bytes or device ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token is empty or has the wrong length for its version.
    #[error("malformed enrollment token")]
    Malformed,
    /// The token's tag matches none of the keys: forged, corrupted, or issued under a key that
    /// has been retired.
    #[error("enrollment token has an invalid tag")]
    BadTag,
    /// The token's expiry time has passed (`now_ms >= expires_at_ms`).
    #[error("enrollment token has expired")]
    Expired,
    /// The token is authentic but its device has been revoked.
    #[error("device has been revoked")]
    Revoked,
    /// The token's version byte is not one this coordinator understands.
    #[error("unsupported enrollment token version")]
    UnsupportedVersion,
    /// The upload's nonce was already seen for this device and round.
    #[error("upload nonce was already used in this round")]
    Replay,
    /// The replay guard's capacity for a round (or for open rounds) is exhausted.
    #[error("too many uploads tracked for this round")]
    TooMany,
    /// The upload is for a round whose replay state has been forgotten, so a replay could not
    /// be told apart: it is refused.
    #[error("upload is for a round that is over")]
    StaleRound,
    /// The device has used its rounds for this UTC day.
    #[error("device has reached its daily round quota")]
    RateLimited,
    /// Key bytes of a length outside [`MIN_KEY_LEN`]`..=`[`MAX_KEY_LEN`].
    #[error("token key must be {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes long")]
    InvalidKeyLength,
    /// A verifier needs at least one key and at most [`MAX_KEYS`].
    #[error("a verifier needs between 1 and {MAX_KEYS} keys")]
    KeyCount,
    /// The random number generator failed.
    #[error("the random number generator failed")]
    Rng,
    /// A token lifetime that is zero milliseconds, or whose expiry overflows.
    #[error("invalid token lifetime")]
    InvalidTtl,
}

/// Who is at fault for an [`AuthError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The peer sent something no honest device sends (a malformed or forged token, an
    /// unknown version, a replayed nonce, a stale round): close the connection.
    PeerMisbehaved,
    /// An honest device may meet this (expired or revoked token, quota, capacity): answer
    /// with the error code; the device may re-enroll or retry later.
    Refused,
    /// The coordinator's own configuration or environment failed; not the peer's fault.
    Local,
}

impl AuthError {
    /// A short stable label for counting failures by reason (metrics, audit log).
    ///
    /// Every token that is not one this coordinator issued counts as `bad_token`, whatever
    /// check caught it: a forged token of random bytes usually fails on its version byte,
    /// which is no evidence of an old device, so the version check must not give it a label
    /// of its own. An authentic token of a revoked device is `revoked`, an expired one
    /// `expired`. [`AuthError::detail`] tells the token checks apart, for debugging.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Malformed | AuthError::BadTag | AuthError::UnsupportedVersion => "bad_token",
            AuthError::Expired => "expired",
            AuthError::Revoked => "revoked",
            AuthError::Replay => "replay",
            AuthError::TooMany => "too_many",
            AuthError::StaleRound => "stale_round",
            AuthError::RateLimited => "rate_limited",
            AuthError::InvalidKeyLength => "invalid_key_length",
            AuthError::KeyCount => "key_count",
            AuthError::Rng => "rng",
            AuthError::InvalidTtl => "invalid_ttl",
        }
    }

    /// A finer stable name than [`AuthError::label`]: which check refused the token
    /// (`malformed`, `bad_tag`, `unsupported_version`); the same as the label otherwise.
    pub fn detail(&self) -> &'static str {
        match self {
            AuthError::Malformed => "malformed",
            AuthError::BadTag => "bad_tag",
            AuthError::UnsupportedVersion => "unsupported_version",
            other => other.label(),
        }
    }

    /// Who is at fault.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AuthError::Malformed
            | AuthError::BadTag
            | AuthError::UnsupportedVersion
            | AuthError::Replay
            | AuthError::StaleRound => ErrorKind::PeerMisbehaved,
            AuthError::Expired | AuthError::Revoked | AuthError::TooMany | AuthError::RateLimited => {
                ErrorKind::Refused
            }
            AuthError::InvalidKeyLength | AuthError::KeyCount | AuthError::Rng | AuthError::InvalidTtl => {
                ErrorKind::Local
            }
        }
    }

    /// Whether the peer misbehaved (see [`ErrorKind::PeerMisbehaved`]).
    pub fn is_peer_misbehaviour(&self) -> bool {
        self.kind() == ErrorKind::PeerMisbehaved
    }

    /// The wire error code to answer the device with.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Malformed
            | AuthError::BadTag
            | AuthError::Expired
            | AuthError::Revoked
            | AuthError::UnsupportedVersion => ErrorCode::BadToken,
            AuthError::Replay => ErrorCode::Replay,
            AuthError::StaleRound => ErrorCode::WrongRound,
            AuthError::TooMany | AuthError::RateLimited => ErrorCode::RateLimited,
            AuthError::InvalidKeyLength | AuthError::KeyCount | AuthError::Rng | AuthError::InvalidTtl => {
                ErrorCode::Internal
            }
        }
    }
}

/// A device's identity: a `u64` the enrollment store assigns (for example an SQLite rowid).
///
/// It need not be secret or unguessable: a token's tag binds it, so a device cannot claim
/// another id. In a token it is 8 little-endian bytes. SQLite's `INTEGER` is signed: store
/// ids above `i64::MAX` as their bit pattern ([`DeviceId::to_i64_bits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(u64);

impl DeviceId {
    /// The device with this number.
    pub const fn new(id: u64) -> Self {
        Self(id)
    }

    /// Its number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The same 64 bits as a signed integer, for SQLite's `INTEGER` column.
    pub const fn to_i64_bits(self) -> i64 {
        i64::from_le_bytes(self.0.to_le_bytes())
    }

    /// The inverse of [`DeviceId::to_i64_bits`].
    pub const fn from_i64_bits(bits: i64) -> Self {
        Self(u64::from_le_bytes(bits.to_le_bytes()))
    }
}

impl From<u64> for DeviceId {
    fn from(id: u64) -> Self {
        Self(id)
    }
}

impl From<DeviceId> for u64 {
    fn from(id: DeviceId) -> Self {
        id.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device-{}", self.0)
    }
}

/// An HMAC-SHA256 key that signs and verifies enrollment tokens.
///
/// Save it with [`TokenKey::to_bytes`] (in a file only the coordinator can read, mode 0600)
/// and load it with [`TokenKey::from_bytes`]. `Debug` never shows it.
#[derive(Clone)]
pub struct TokenKey {
    key: hmac::Key,
    bytes: Vec<u8>,
}

impl TokenKey {
    /// Draws a fresh [`GENERATED_KEY_LEN`]-byte key from `rng` (use `ring::rand::SystemRandom`).
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, AuthError> {
        let mut bytes = vec![0u8; GENERATED_KEY_LEN];
        rng.fill(&mut bytes).map_err(|_| AuthError::Rng)?;
        Self::from_bytes(&bytes)
    }

    /// A key from saved bytes: [`MIN_KEY_LEN`] to [`MAX_KEY_LEN`] of them.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AuthError> {
        if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&bytes.len()) {
            return Err(AuthError::InvalidKeyLength);
        }
        Ok(Self { key: hmac::Key::new(hmac::HMAC_SHA256, bytes), bytes: bytes.to_vec() })
    }

    /// The key's bytes, to save. Treat them as a secret.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    fn sign(&self, signed: &[u8]) -> hmac::Tag {
        hmac::sign(&self.key, signed)
    }

    fn verifies(&self, signed: &[u8], tag: &[u8]) -> bool {
        hmac::verify(&self.key, signed, tag).is_ok()
    }
}

/// The key is a secret: `Debug` shows only its length.
impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey").field("len", &self.bytes.len()).finish_non_exhaustive()
    }
}

/// What a token states about its device, once its tag has been checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenClaims {
    /// The device the token was issued to.
    pub device: DeviceId,
    /// When it was issued (Unix ms); recorded for audit, not checked.
    pub issued_at_ms: u64,
    /// When it expires (Unix ms, exclusive), or `None` for never (0 in the token).
    pub expires_at_ms: Option<u64>,
}

impl TokenClaims {
    /// The bytes the tag covers.
    fn encode_signed(&self) -> [u8; SIGNED_LEN] {
        let mut out = [0u8; SIGNED_LEN];
        out[0] = TOKEN_VERSION;
        out[1..9].copy_from_slice(&self.device.0.to_le_bytes());
        out[9..17].copy_from_slice(&self.issued_at_ms.to_le_bytes());
        out[17..25].copy_from_slice(&self.expires_at_ms.unwrap_or(0).to_le_bytes());
        out
    }

    /// Parses the bytes the tag covers (version and length already checked, so `None` does
    /// not happen).
    fn decode_signed(signed: &[u8]) -> Option<Self> {
        let (_version, rest) = signed.split_first_chunk::<1>()?;
        let (device, rest) = rest.split_first_chunk::<8>()?;
        let (issued, rest) = rest.split_first_chunk::<8>()?;
        let (expires, _) = rest.split_first_chunk::<8>()?;
        let expires = u64::from_le_bytes(*expires);
        Some(Self {
            device: DeviceId(u64::from_le_bytes(*device)),
            issued_at_ms: u64::from_le_bytes(*issued),
            expires_at_ms: (expires != 0).then_some(expires),
        })
    }
}

/// An encoded enrollment token ([`TOKEN_LEN`] bytes; layout in the module docs).
///
/// A bearer credential: `Debug` shows only its length.
#[derive(Clone)]
pub struct Token([u8; TOKEN_LEN]);

impl Token {
    /// The bytes to hand to the device (they go into `CheckIn::token`).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, owned.
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.to_vec()
    }
}

impl AsRef<[u8]> for Token {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes>)", self.0.len())
    }
}

/// Issues enrollment tokens under the newest key.
#[derive(Clone)]
pub struct Enroller {
    key: TokenKey,
}

impl Enroller {
    /// An enroller signing with `key` (during a rotation: the new key, also first in the
    /// [`Verifier`]'s list).
    pub fn new(key: TokenKey) -> Self {
        Self { key }
    }

    /// A token for `device`, issued at `now_ms`, valid until `now_ms + ttl` (exclusive), or
    /// forever when `ttl` is `None`.
    ///
    /// Errors: [`AuthError::InvalidTtl`] for a lifetime under a millisecond or an expiry past
    /// `u64::MAX` ms.
    pub fn issue(&self, device: DeviceId, now_ms: u64, ttl: Option<Duration>) -> Result<Token, AuthError> {
        let expires_at_ms = match ttl {
            None => None,
            Some(ttl) => {
                let ttl_ms = u64::try_from(ttl.as_millis()).map_err(|_| AuthError::InvalidTtl)?;
                // Zero would read as "never" (and a zero lifetime is a mistake anyway).
                if ttl_ms == 0 {
                    return Err(AuthError::InvalidTtl);
                }
                Some(now_ms.checked_add(ttl_ms).ok_or(AuthError::InvalidTtl)?)
            }
        };
        Ok(self.issue_claims(&TokenClaims { device, issued_at_ms: now_ms, expires_at_ms }))
    }

    /// A token stating exactly `claims` (an `expires_at_ms` of `Some(0)` means never, as 0
    /// does in the token).
    pub fn issue_claims(&self, claims: &TokenClaims) -> Token {
        let signed = claims.encode_signed();
        let tag = self.key.sign(&signed);
        let mut out = [0u8; TOKEN_LEN];
        out[..SIGNED_LEN].copy_from_slice(&signed);
        out[SIGNED_LEN..].copy_from_slice(tag.as_ref());
        Token(out)
    }
}

/// The key is a secret: `Debug` does not show it.
impl fmt::Debug for Enroller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enroller").finish_non_exhaustive()
    }
}

/// The revoked devices, as the caller loads them from storage.
///
/// Plain data: build it with [`FromIterator`] from the stored ids, and persist every
/// [`RevocationList::revoke`] yourself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    revoked: HashSet<DeviceId>,
}

impl RevocationList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Revokes `device`; returns whether it was not revoked before.
    pub fn revoke(&mut self, device: DeviceId) -> bool {
        self.revoked.insert(device)
    }

    /// Lifts the revocation of `device`; returns whether it was revoked.
    pub fn reinstate(&mut self, device: DeviceId) -> bool {
        self.revoked.remove(&device)
    }

    /// Whether `device` is revoked.
    pub fn is_revoked(&self, device: DeviceId) -> bool {
        self.revoked.contains(&device)
    }

    /// The revoked devices, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.revoked.iter().copied()
    }

    /// How many devices are revoked.
    pub fn len(&self) -> usize {
        self.revoked.len()
    }

    /// Whether no device is revoked.
    pub fn is_empty(&self) -> bool {
        self.revoked.is_empty()
    }
}

impl FromIterator<DeviceId> for RevocationList {
    fn from_iter<I: IntoIterator<Item = DeviceId>>(iter: I) -> Self {
        Self { revoked: iter.into_iter().collect() }
    }
}

impl Extend<DeviceId> for RevocationList {
    fn extend<I: IntoIterator<Item = DeviceId>>(&mut self, iter: I) {
        self.revoked.extend(iter);
    }
}

/// Verifies enrollment tokens against a list of keys (newest first) and a revocation list.
///
/// Rotation: put the new key first ([`Verifier::push_newest_key`]) and issue with it; tokens
/// issued under the old keys keep verifying until the old key is dropped
/// ([`Verifier::drop_oldest_key`]), after which they are [`AuthError::BadTag`].
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<TokenKey>,
    revoked: RevocationList,
}

impl Verifier {
    /// A verifier with `keys`, newest first (1 to [`MAX_KEYS`] of them, else
    /// [`AuthError::KeyCount`]), and the revoked devices.
    pub fn new(keys: Vec<TokenKey>, revoked: RevocationList) -> Result<Self, AuthError> {
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(AuthError::KeyCount);
        }
        Ok(Self { keys, revoked })
    }

    /// Checks `token` at `now_ms` and returns its device.
    ///
    /// Checks, in order: a version byte ([`AuthError::Malformed`] if empty), the version
    /// ([`AuthError::UnsupportedVersion`]), the length ([`AuthError::Malformed`]), the tag
    /// under each key in constant time ([`AuthError::BadTag`]), revocation
    /// ([`AuthError::Revoked`]), expiry ([`AuthError::Expired`], at `now_ms >= expires_at_ms`).
    /// Never panics, whatever the bytes.
    pub fn verify(&self, token: &[u8], now_ms: u64) -> Result<DeviceId, AuthError> {
        self.verify_claims(token, now_ms).map(|claims| claims.device)
    }

    /// Like [`Verifier::verify`], returning everything the token states.
    pub fn verify_claims(&self, token: &[u8], now_ms: u64) -> Result<TokenClaims, AuthError> {
        let claims = self.authenticate(token)?;
        if self.revoked.is_revoked(claims.device) {
            return Err(AuthError::Revoked);
        }
        if claims.expires_at_ms.is_some_and(|expires| now_ms >= expires) {
            return Err(AuthError::Expired);
        }
        Ok(claims)
    }

    /// Checks only that one of the keys issued `token` (version, length, tag, as
    /// [`Verifier::verify`] does) and returns what it states, revoked or expired or not: for
    /// operator tools that name a device by its token. Never admit a device with it.
    pub fn authenticate(&self, token: &[u8]) -> Result<TokenClaims, AuthError> {
        let Some(&version) = token.first() else {
            return Err(AuthError::Malformed);
        };
        if version != TOKEN_VERSION {
            return Err(AuthError::UnsupportedVersion);
        }
        if token.len() != TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        let (signed, tag) = token.split_last_chunk::<TAG_LEN>().ok_or(AuthError::Malformed)?;
        if !self.keys.iter().any(|key| key.verifies(signed, tag)) {
            return Err(AuthError::BadTag);
        }
        TokenClaims::decode_signed(signed).ok_or(AuthError::Malformed)
    }

    /// Makes `key` the newest key (a rotation's first step). [`AuthError::KeyCount`] if the
    /// verifier already holds [`MAX_KEYS`].
    pub fn push_newest_key(&mut self, key: TokenKey) -> Result<(), AuthError> {
        if self.keys.len() >= MAX_KEYS {
            return Err(AuthError::KeyCount);
        }
        self.keys.insert(0, key);
        Ok(())
    }

    /// Drops the oldest key (a rotation's last step); tokens issued under it stop verifying.
    /// The last key is never dropped: returns whether a key was dropped.
    pub fn drop_oldest_key(&mut self) -> bool {
        if self.keys.len() <= 1 {
            return false;
        }
        self.keys.pop();
        true
    }

    /// How many keys verify tokens.
    pub fn n_keys(&self) -> usize {
        self.keys.len()
    }

    /// The revoked devices.
    pub fn revocations(&self) -> &RevocationList {
        &self.revoked
    }

    /// The revoked devices, to revoke or reinstate one (persist the change yourself).
    pub fn revocations_mut(&mut self) -> &mut RevocationList {
        &mut self.revoked
    }
}

/// The keys are secrets: `Debug` shows only how many there are.
impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("n_keys", &self.keys.len())
            .field("n_revoked", &self.revoked.len())
            .finish()
    }
}

/// Limits on what a [`ReplayGuard`] remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayLimits {
    /// Most nonces remembered for one round, over all devices; one more is
    /// [`AuthError::TooMany`]. Set it to at least the clients per round.
    pub max_nonces_per_round: usize,
    /// Most rounds remembered at once; a nonce for one more round is [`AuthError::TooMany`].
    /// A backstop: the driver checks the round number before the guard.
    pub max_open_rounds: usize,
}

impl Default for ReplayLimits {
    /// 100 000 nonces per round, 4 open rounds: at most 400 000 entries of 24 bytes (plus
    /// hash-set overhead).
    fn default() -> Self {
        Self { max_nonces_per_round: 100_000, max_open_rounds: 4 }
    }
}

/// Remembers upload nonces per round and rejects a nonce seen before for the same device and
/// round.
///
/// Memory is bounded by [`ReplayLimits`] and by [`ReplayGuard::forget_rounds_before`], which
/// the driver calls when a round closes. A forgotten round's replays could no longer be
/// recognised, so uploads for it are refused ([`AuthError::StaleRound`]).
#[derive(Debug, Clone)]
pub struct ReplayGuard {
    limits: ReplayLimits,
    /// Rounds below this have been forgotten.
    floor: u64,
    rounds: BTreeMap<u64, HashSet<(DeviceId, [u8; NONCE_LEN])>>,
}

impl ReplayGuard {
    /// An empty guard with these limits.
    pub fn new(limits: ReplayLimits) -> Self {
        Self { limits, floor: 0, rounds: BTreeMap::new() }
    }

    /// Records `nonce` for (`device`, `round`), or refuses it: [`AuthError::Replay`] if it
    /// was recorded before, [`AuthError::StaleRound`] if the round was forgotten,
    /// [`AuthError::TooMany`] if the round (or the number of open rounds) is at its limit.
    /// A refused nonce is not recorded.
    pub fn check_and_record(
        &mut self,
        device: DeviceId,
        round: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<(), AuthError> {
        if round < self.floor {
            return Err(AuthError::StaleRound);
        }
        if !self.rounds.contains_key(&round) && self.rounds.len() >= self.limits.max_open_rounds {
            return Err(AuthError::TooMany);
        }
        let seen = self.rounds.entry(round).or_default();
        let entry = (device, nonce);
        if seen.contains(&entry) {
            return Err(AuthError::Replay);
        }
        if seen.len() >= self.limits.max_nonces_per_round {
            if seen.is_empty() {
                // Only with a limit of zero: do not keep an empty round open.
                self.rounds.remove(&round);
            }
            return Err(AuthError::TooMany);
        }
        seen.insert(entry);
        Ok(())
    }

    /// Forgets every round before `round`; later nonces for them are
    /// [`AuthError::StaleRound`]. The floor never moves back.
    pub fn forget_rounds_before(&mut self, round: u64) {
        if round <= self.floor {
            return;
        }
        self.floor = round;
        self.rounds = self.rounds.split_off(&round);
    }

    /// How many rounds the guard remembers nonces for.
    pub fn n_rounds(&self) -> usize {
        self.rounds.len()
    }

    /// How many nonces it remembers, over all rounds.
    pub fn n_nonces(&self) -> usize {
        self.rounds.values().map(HashSet::len).sum()
    }

    /// The lowest round it still accepts nonces for.
    pub fn floor(&self) -> u64 {
        self.floor
    }
}

/// Counts the rounds each device is admitted to per UTC day and refuses more than a maximum.
///
/// A day is `now_ms / `[`MS_PER_DAY`]. Only the current day is kept: the first call on a new
/// day drops the previous day's counts, so memory holds one entry per device admitted today
/// (call it after [`Verifier::verify`], so only enrolled devices count). If the clock steps
/// back to an earlier day, admissions count against the newest day seen. The counts live in
/// memory: a restart forgets them.
#[derive(Debug, Clone)]
pub struct DailyQuota {
    max_rounds_per_device_per_day: u32,
    day: u64,
    counts: HashMap<DeviceId, u32>,
}

impl DailyQuota {
    /// A quota of `max_rounds_per_device_per_day` rounds per device and UTC day (0 refuses
    /// every device).
    pub fn new(max_rounds_per_device_per_day: u32) -> Self {
        Self { max_rounds_per_device_per_day, day: 0, counts: HashMap::new() }
    }

    /// The maximum this quota enforces.
    pub fn max_rounds_per_device_per_day(&self) -> u32 {
        self.max_rounds_per_device_per_day
    }

    /// Counts one round for `device` at `now_ms`, or refuses it with
    /// [`AuthError::RateLimited`] if the device already had its maximum today. A refusal is
    /// not counted. Call it once per round the device is admitted to.
    pub fn admit(&mut self, device: DeviceId, now_ms: u64) -> Result<(), AuthError> {
        self.check(device, now_ms)?;
        self.record(device, now_ms);
        Ok(())
    }

    /// Refuses `device` with [`AuthError::RateLimited`] if it already had its maximum on the
    /// UTC day of `now_ms`, without counting anything.
    pub fn check(&mut self, device: DeviceId, now_ms: u64) -> Result<(), AuthError> {
        self.roll(now_ms);
        if self.used(device) >= self.max_rounds_per_device_per_day {
            return Err(AuthError::RateLimited);
        }
        Ok(())
    }

    /// Counts one round for `device` at `now_ms`, even past the maximum (call
    /// [`DailyQuota::check`] first).
    pub fn record(&mut self, device: DeviceId, now_ms: u64) {
        self.roll(now_ms);
        let count = self.counts.entry(device).or_insert(0);
        *count = count.saturating_add(1);
    }

    /// Time from `now_ms` until the quota resets: the next UTC midnight.
    pub fn until_reset(now_ms: u64) -> Duration {
        Duration::from_millis(MS_PER_DAY - now_ms % MS_PER_DAY)
    }

    /// Moves to the day of `now_ms` if it is later, dropping the previous day's counts.
    fn roll(&mut self, now_ms: u64) {
        let day = now_ms / MS_PER_DAY;
        if day > self.day {
            self.day = day;
            self.counts.clear();
            self.counts.shrink_to_fit();
        }
    }

    /// How many rounds `device` has been admitted to on the current day.
    pub fn used(&self, device: DeviceId) -> u32 {
        self.counts.get(&device).copied().unwrap_or(0)
    }

    /// How many devices the quota tracks (those admitted on the current day).
    pub fn n_tracked_devices(&self) -> usize {
        self.counts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daily_quota_checks_without_counting_and_resets_at_utc_midnight() {
        let mut quota = DailyQuota::new(1);
        let device = DeviceId::new(3);
        let noon = 20_000 * MS_PER_DAY + MS_PER_DAY / 2;
        // Checking is free: a device that is never selected never uses its quota.
        for _ in 0..5 {
            assert_eq!(quota.check(device, noon), Ok(()));
        }
        assert_eq!(quota.n_tracked_devices(), 0);
        quota.record(device, noon);
        assert_eq!(quota.check(device, noon), Err(AuthError::RateLimited));
        assert_eq!(DailyQuota::until_reset(noon), Duration::from_millis(MS_PER_DAY / 2));
        assert_eq!(DailyQuota::until_reset(noon - MS_PER_DAY / 2), Duration::from_millis(MS_PER_DAY));
        assert_eq!(quota.check(device, noon + MS_PER_DAY / 2), Ok(()), "a new UTC day");
    }
}
