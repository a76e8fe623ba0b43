//! Tests of device authentication: enrollment tokens, rotation, revocation, replay guard and daily quota.

use std::time::Duration;

use fedrec_coordinator::auth::{
    AuthError, DailyQuota, DeviceId, Enroller, ErrorKind, MS_PER_DAY, ReplayGuard, ReplayLimits,
    RevocationList, TAG_LEN, TOKEN_LEN, TOKEN_VERSION, Token, TokenClaims, TokenKey, Verifier,
};
use fedrec_shared::wire::{ErrorCode, MAX_TOKEN_LEN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NOW: u64 = 1_700_000_000_000;
const HOUR: Duration = Duration::from_secs(3600);

/// A fixed key whose bytes are all distinct, so a leak of any part of it is recognisable.
fn key_a() -> TokenKey {
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(7).wrapping_add(0xA1)).collect();
    TokenKey::from_bytes(&bytes).expect("32 bytes is a valid key length")
}

fn key_b() -> TokenKey {
    TokenKey::from_bytes(&[0x5C; 40]).expect("40 bytes is a valid key length")
}

fn verifier(keys: Vec<TokenKey>) -> Verifier {
    Verifier::new(keys, RevocationList::new()).expect("1 to MAX_KEYS keys")
}

fn issue(key: &TokenKey, device: u64, ttl: Option<Duration>) -> Token {
    Enroller::new(key.clone()).issue(DeviceId::new(device), NOW, ttl).expect("valid lifetime")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `text` shows any 4-byte window of `secret`, in lower or upper hex or as a Debug list.
fn leaks(text: &str, secret: &[u8]) -> bool {
    let lower = text.to_lowercase();
    secret.windows(4).any(|w| {
        let listed = format!("{w:?}");
        lower.contains(&hex(w)) || text.contains(listed.trim_matches(['[', ']']))
    })
}

#[test]
fn issue_then_verify_round_trips() {
    let key = key_a();
    let token = issue(&key, 42, Some(HOUR));
    assert_eq!(token.as_bytes().len(), TOKEN_LEN);
    const { assert!(TOKEN_LEN <= MAX_TOKEN_LEN) };
    assert_eq!(token.as_bytes()[0], TOKEN_VERSION);
    let v = verifier(vec![key]);
    assert_eq!(v.verify(token.as_bytes(), NOW), Ok(DeviceId::new(42)));
    let claims = v.verify_claims(token.as_bytes(), NOW + 1).expect("valid token");
    assert_eq!(
        claims,
        TokenClaims { device: DeviceId::new(42), issued_at_ms: NOW, expires_at_ms: Some(NOW + 3_600_000) }
    );
}

#[test]
fn token_layout_is_as_documented() {
    let key = key_a();
    let token = issue(&key, 0x0102_0304_0506_0708, Some(Duration::from_millis(5)));
    let b = token.as_bytes();
    assert_eq!(b[0], 1);
    assert_eq!(b[1..9], 0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(b[9..17], NOW.to_le_bytes());
    assert_eq!(b[17..25], (NOW + 5).to_le_bytes());
    // The tag is HMAC-SHA256 over the first 25 bytes.
    let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.to_bytes()), &b[..25]);
    assert_eq!(&b[25..], tag.as_ref());
    assert_eq!(b.len() - 25, TAG_LEN);
}

#[test]
fn never_expiring_token_is_zero_on_the_wire_and_verifies_far_in_the_future() {
    let key = key_a();
    let token = issue(&key, 7, None);
    assert_eq!(token.as_bytes()[17..25], [0; 8]);
    let claims = verifier(vec![key]).verify_claims(token.as_bytes(), u64::MAX).expect("never expires");
    assert_eq!(claims.expires_at_ms, None);
}

#[test]
fn token_from_another_key_is_bad_tag() {
    let token = issue(&key_b(), 1, Some(HOUR));
    let err = verifier(vec![key_a()]).verify(token.as_bytes(), NOW).expect_err("wrong key");
    assert_eq!(err, AuthError::BadTag);
    assert!(err.is_peer_misbehaviour());
    assert_eq!(err.code(), ErrorCode::BadToken);
}

#[test]
fn every_single_bit_flip_is_rejected() {
    let key = key_a();
    let token = issue(&key, 99, Some(HOUR));
    let v = verifier(vec![key]);
    for bit in 0..TOKEN_LEN * 8 {
        let mut bytes = token.to_vec();
        bytes[bit / 8] ^= 1 << (bit % 8);
        let err = v.verify(&bytes, NOW).expect_err("a flipped bit must not verify");
        let expected = if bit < 8 { AuthError::UnsupportedVersion } else { AuthError::BadTag };
        assert_eq!(err, expected, "bit {bit}");
    }
}

#[test]
fn truncated_or_extended_tokens_are_malformed() {
    let key = key_a();
    let token = issue(&key, 3, Some(HOUR));
    let v = verifier(vec![key]);
    assert_eq!(v.verify(&[], NOW), Err(AuthError::Malformed));
    for len in 1..TOKEN_LEN {
        assert_eq!(v.verify(&token.as_bytes()[..len], NOW), Err(AuthError::Malformed), "length {len}");
    }
    for extra in [1, 2, 31, MAX_TOKEN_LEN - TOKEN_LEN, 600] {
        let mut bytes = token.to_vec();
        bytes.resize(TOKEN_LEN + extra, 0);
        assert_eq!(v.verify(&bytes, NOW), Err(AuthError::Malformed), "{extra} extra bytes");
    }
}

/// A token is valid while `now_ms < expires_at_ms`: the expiry instant itself is expired.
#[test]
fn expiry_boundary_is_exclusive() {
    let key = key_a();
    let token = issue(&key, 5, Some(Duration::from_millis(500)));
    let v = verifier(vec![key]);
    assert_eq!(v.verify(token.as_bytes(), NOW), Ok(DeviceId::new(5)));
    assert_eq!(v.verify(token.as_bytes(), NOW + 499), Ok(DeviceId::new(5)));
    let err = v.verify(token.as_bytes(), NOW + 500).expect_err("expired at the boundary");
    assert_eq!(err, AuthError::Expired);
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert_eq!(v.verify(token.as_bytes(), u64::MAX), Err(AuthError::Expired));
}

#[test]
fn invalid_lifetimes_are_refused_at_issue() {
    let enroller = Enroller::new(key_a());
    let d = DeviceId::new(1);
    assert_eq!(enroller.issue(d, NOW, Some(Duration::ZERO)).map(|_| ()), Err(AuthError::InvalidTtl));
    assert_eq!(
        enroller.issue(d, NOW, Some(Duration::from_micros(999))).map(|_| ()),
        Err(AuthError::InvalidTtl)
    );
    assert_eq!(enroller.issue(d, u64::MAX, Some(HOUR)).map(|_| ()), Err(AuthError::InvalidTtl));
    assert_eq!(enroller.issue(d, NOW, Some(Duration::MAX)).map(|_| ()), Err(AuthError::InvalidTtl));
    // A token issued at time 0 with a lifetime still expires (0 would mean "never").
    let token = enroller.issue(d, 0, Some(Duration::from_millis(1))).expect("valid");
    assert_eq!(verifier(vec![key_a()]).verify(token.as_bytes(), 1), Err(AuthError::Expired));
}

#[test]
fn revoked_device_is_refused_and_reinstated_device_accepted() {
    let key = key_a();
    let token = issue(&key, 8, Some(HOUR));
    let other = issue(&key, 9, Some(HOUR));
    let revoked: RevocationList = [DeviceId::new(8)].into_iter().collect();
    let mut v = Verifier::new(vec![key], revoked).expect("one key");
    assert_eq!(v.verify(token.as_bytes(), NOW), Err(AuthError::Revoked));
    assert_eq!(v.verify(other.as_bytes(), NOW), Ok(DeviceId::new(9)));
    assert!(v.revocations_mut().revoke(DeviceId::new(9)));
    assert!(!v.revocations_mut().revoke(DeviceId::new(9)));
    assert_eq!(v.verify(other.as_bytes(), NOW), Err(AuthError::Revoked));
    assert!(v.revocations().is_revoked(DeviceId::new(9)));
    let mut stored: Vec<u64> = v.revocations().iter().map(DeviceId::get).collect();
    stored.sort_unstable();
    assert_eq!(stored, [8, 9]);
    assert!(v.revocations_mut().reinstate(DeviceId::new(8)));
    assert_eq!(v.verify(token.as_bytes(), NOW), Ok(DeviceId::new(8)));
}

#[test]
fn unsupported_version_byte_is_reported_as_such() {
    let key = key_a();
    let token = issue(&key, 4, Some(HOUR));
    let v = verifier(vec![key]);
    for version in [0u8, 2, 0x7F, 0xFF] {
        let mut bytes = token.to_vec();
        bytes[0] = version;
        assert_eq!(v.verify(&bytes, NOW), Err(AuthError::UnsupportedVersion), "version {version}");
        // Whatever its length.
        assert_eq!(v.verify(&bytes[..1], NOW), Err(AuthError::UnsupportedVersion));
    }
}

#[test]
fn rotation_keeps_old_tokens_valid_until_the_old_key_is_dropped() {
    let (old, new) = (key_a(), key_b());
    let old_token = issue(&old, 10, Some(HOUR));
    let mut v = verifier(vec![old]);
    v.push_newest_key(new.clone()).expect("room for a key");
    assert_eq!(v.n_keys(), 2);
    let new_token = issue(&new, 11, Some(HOUR));
    assert_eq!(v.verify(old_token.as_bytes(), NOW), Ok(DeviceId::new(10)));
    assert_eq!(v.verify(new_token.as_bytes(), NOW), Ok(DeviceId::new(11)));
    assert!(v.drop_oldest_key());
    assert_eq!(v.verify(old_token.as_bytes(), NOW), Err(AuthError::BadTag));
    assert_eq!(v.verify(new_token.as_bytes(), NOW), Ok(DeviceId::new(11)));
    assert!(!v.drop_oldest_key(), "the last key stays");
    // The same, built from a list newest first.
    let listed = verifier(vec![key_b(), key_a()]);
    assert_eq!(listed.verify(old_token.as_bytes(), NOW), Ok(DeviceId::new(10)));
    assert_eq!(verifier(vec![key_b()]).verify(old_token.as_bytes(), NOW), Err(AuthError::BadTag));
}

#[test]
fn verifier_key_count_is_bounded() {
    assert_eq!(Verifier::new(vec![], RevocationList::new()).map(|_| ()), Err(AuthError::KeyCount));
    let many = vec![key_a(); fedrec_coordinator::auth::MAX_KEYS + 1];
    assert_eq!(Verifier::new(many, RevocationList::new()).map(|_| ()), Err(AuthError::KeyCount));
    let mut full = verifier(vec![key_a(); fedrec_coordinator::auth::MAX_KEYS]);
    assert_eq!(full.push_newest_key(key_b()), Err(AuthError::KeyCount));
}

#[test]
fn key_bytes_round_trip_and_lengths_are_checked() {
    let rng = ring::rand::SystemRandom::new();
    let generated = TokenKey::generate(&rng).expect("system rng");
    let restored = TokenKey::from_bytes(&generated.to_bytes()).expect("saved bytes load");
    let token = issue(&generated, 12, None);
    assert_eq!(verifier(vec![restored]).verify(token.as_bytes(), NOW), Ok(DeviceId::new(12)));
    assert_eq!(generated.to_bytes().len(), 32);
    for len in [0, 16, 31, 65, 1000] {
        assert_eq!(
            TokenKey::from_bytes(&vec![1; len]).map(|_| ()),
            Err(AuthError::InvalidKeyLength),
            "{len}"
        );
    }
    assert!(TokenKey::from_bytes(&[1; 64]).is_ok());
}

/// A seeded stand-in for a property test: random bytes never verify and never panic.
#[test]
fn random_bytes_never_verify() {
    let v = verifier(vec![key_a(), key_b()]);
    let mut rng = StdRng::seed_from_u64(0x00fe_d2ec);
    let mut buf = vec![0u8; 600];
    for case in 0..20_000 {
        let len = rng.random_range(0..=600);
        let bytes = &mut buf[..len];
        rng.fill(&mut *bytes);
        // Most cases get a valid version and length, so they reach the tag check.
        if case % 2 == 0 && len > 0 {
            bytes[0] = TOKEN_VERSION;
        }
        let bytes = if case % 4 == 0 && len >= TOKEN_LEN { &bytes[..TOKEN_LEN] } else { &*bytes };
        let now = rng.random();
        let err = v.verify(bytes, now).expect_err("random bytes must not verify");
        assert!(err.is_peer_misbehaviour(), "case {case}: {err:?}");
    }
}

#[test]
fn replayed_nonce_is_rejected_only_for_the_same_device_and_round() {
    let mut guard = ReplayGuard::new(ReplayLimits::default());
    let (d1, d2) = (DeviceId::new(1), DeviceId::new(2));
    let nonce = [0x11; 16];
    assert_eq!(guard.check_and_record(d1, 5, nonce), Ok(()));
    let err = guard.check_and_record(d1, 5, nonce).expect_err("replay");
    assert_eq!(err, AuthError::Replay);
    assert!(err.is_peer_misbehaviour());
    assert_eq!(err.code(), ErrorCode::Replay);
    assert_eq!(guard.check_and_record(d2, 5, nonce), Ok(()));
    assert_eq!(guard.check_and_record(d1, 6, nonce), Ok(()));
    // Another nonce from the same device and round is the round machine's business.
    assert_eq!(guard.check_and_record(d1, 5, [0x12; 16]), Ok(()));
    assert_eq!(guard.n_nonces(), 4);
}

#[test]
fn forgetting_rounds_bounds_memory_and_refuses_stale_rounds() {
    let mut guard = ReplayGuard::new(ReplayLimits { max_nonces_per_round: 1000, max_open_rounds: 3 });
    for round in 0..100u64 {
        for device in 0..50u64 {
            let mut nonce = [0u8; 16];
            nonce[..8].copy_from_slice(&device.to_le_bytes());
            guard.check_and_record(DeviceId::new(device), round, nonce).expect("fresh nonce");
        }
        guard.forget_rounds_before(round.saturating_sub(1));
        assert!(guard.n_rounds() <= 2);
        assert!(guard.n_nonces() <= 100);
    }
    assert_eq!(guard.floor(), 98);
    // A replay for a forgotten round cannot be recognised, so the round is refused.
    assert_eq!(guard.check_and_record(DeviceId::new(0), 10, [0; 16]), Err(AuthError::StaleRound));
    // The floor never moves back.
    guard.forget_rounds_before(3);
    assert_eq!(guard.floor(), 98);
    guard.forget_rounds_before(u64::MAX);
    assert_eq!((guard.n_rounds(), guard.n_nonces()), (0, 0));
}

#[test]
fn replay_guard_caps_entries_per_round_and_open_rounds() {
    let mut guard = ReplayGuard::new(ReplayLimits { max_nonces_per_round: 3, max_open_rounds: 2 });
    for i in 0..3u8 {
        guard.check_and_record(DeviceId::new(u64::from(i)), 1, [i; 16]).expect("under the cap");
    }
    let err = guard.check_and_record(DeviceId::new(9), 1, [9; 16]).expect_err("cap");
    assert_eq!(err, AuthError::TooMany);
    assert_eq!(err.kind(), ErrorKind::Refused);
    // A replay is still reported as a replay at the cap.
    assert_eq!(guard.check_and_record(DeviceId::new(0), 1, [0; 16]), Err(AuthError::Replay));
    assert_eq!(guard.n_nonces(), 3);
    // Another round has its own budget, but only two rounds may be open.
    assert_eq!(guard.check_and_record(DeviceId::new(9), 2, [9; 16]), Ok(()));
    assert_eq!(guard.check_and_record(DeviceId::new(9), 3, [9; 16]), Err(AuthError::TooMany));
    guard.forget_rounds_before(2);
    assert_eq!(guard.check_and_record(DeviceId::new(9), 3, [9; 16]), Ok(()));
    // A limit of zero refuses everything and keeps nothing.
    let mut closed = ReplayGuard::new(ReplayLimits { max_nonces_per_round: 0, max_open_rounds: 2 });
    assert_eq!(closed.check_and_record(DeviceId::new(1), 1, [1; 16]), Err(AuthError::TooMany));
    assert_eq!(closed.n_rounds(), 0);
}

#[test]
fn daily_quota_admits_up_to_the_max_and_resets_on_the_next_utc_day() {
    let mut quota = DailyQuota::new(3);
    let day = NOW / MS_PER_DAY;
    let start = day * MS_PER_DAY;
    let end = start + MS_PER_DAY - 1;
    let (d1, d2) = (DeviceId::new(1), DeviceId::new(2));
    for t in [start, start + 1000, end] {
        assert_eq!(quota.admit(d1, t), Ok(()));
    }
    let err = quota.admit(d1, end).expect_err("over quota");
    assert_eq!(err, AuthError::RateLimited);
    assert_eq!(err.code(), ErrorCode::RateLimited);
    assert_eq!(quota.used(d1), 3);
    assert_eq!(quota.admit(d2, end), Ok(()), "quotas are per device");
    // The next UTC day starts at exactly (day + 1) * MS_PER_DAY.
    assert_eq!(quota.admit(d1, end + 1), Ok(()));
    assert_eq!(quota.used(d1), 1);
    assert_eq!(quota.used(d2), 0);
    // A clock stepping back counts against the newest day.
    assert_eq!(quota.admit(d1, start), Ok(()));
    assert_eq!(quota.admit(d1, start), Ok(()));
    assert_eq!(quota.admit(d1, start), Err(AuthError::RateLimited));
}

#[test]
fn daily_quota_memory_holds_only_the_current_day() {
    let mut quota = DailyQuota::new(2);
    for device in 0..10_000 {
        quota.admit(DeviceId::new(device), NOW).expect("first round today");
    }
    assert_eq!(quota.n_tracked_devices(), 10_000);
    quota.admit(DeviceId::new(0), NOW + MS_PER_DAY).expect("new day");
    assert_eq!(quota.n_tracked_devices(), 1);
    // A quota of zero refuses and remembers nothing.
    let mut closed = DailyQuota::new(0);
    assert_eq!(closed.admit(DeviceId::new(1), NOW), Err(AuthError::RateLimited));
    assert_eq!(closed.n_tracked_devices(), 0);
}

#[test]
fn debug_output_shows_no_key_or_tag_bytes() {
    let key = key_a();
    let secret = key.to_bytes();
    let token = issue(&key, 77, Some(HOUR));
    let tag = &token.as_bytes()[TOKEN_LEN - TAG_LEN..];
    let enroller = Enroller::new(key.clone());
    let v = verifier(vec![key.clone()]);
    for text in [format!("{key:?}"), format!("{enroller:?}"), format!("{v:?}"), format!("{token:?}")] {
        assert!(!leaks(&text, &secret), "key bytes in {text}");
        assert!(!leaks(&text, tag), "tag bytes in {text}");
    }
    assert_eq!(format!("{token:?}"), format!("Token(<{TOKEN_LEN} bytes>)"));
    // Errors say what went wrong, never with the token.
    let mut forged = token.to_vec();
    forged[30] ^= 1;
    let err = v.verify(&forged, NOW).expect_err("forged");
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!leaks(&text, &forged[TOKEN_LEN - TAG_LEN..]), "{text}");
        assert!(!leaks(&text, &secret), "{text}");
    }
}

#[test]
fn labels_are_stable_and_every_bad_token_counts_as_bad_token() {
    // (error, metrics label, detail)
    let all = [
        (AuthError::Malformed, "bad_token", "malformed"),
        (AuthError::BadTag, "bad_token", "bad_tag"),
        (AuthError::Expired, "expired", "expired"),
        (AuthError::Revoked, "revoked", "revoked"),
        (AuthError::UnsupportedVersion, "bad_token", "unsupported_version"),
        (AuthError::Replay, "replay", "replay"),
        (AuthError::TooMany, "too_many", "too_many"),
        (AuthError::StaleRound, "stale_round", "stale_round"),
        (AuthError::RateLimited, "rate_limited", "rate_limited"),
        (AuthError::InvalidKeyLength, "invalid_key_length", "invalid_key_length"),
        (AuthError::KeyCount, "key_count", "key_count"),
        (AuthError::Rng, "rng", "rng"),
        (AuthError::InvalidTtl, "invalid_ttl", "invalid_ttl"),
    ];
    for (err, label, detail) in all {
        assert_eq!(err.label(), label, "{err:?}");
        assert_eq!(err.detail(), detail, "{err:?}");
    }
    // The label of a token refusal is the wire code's: what the device is told.
    for err in [AuthError::Malformed, AuthError::BadTag, AuthError::UnsupportedVersion] {
        assert_eq!(err.label(), err.code().label());
    }
    assert_eq!(AuthError::Rng.kind(), ErrorKind::Local);
    assert_eq!(AuthError::Rng.code(), ErrorCode::Internal);
}

#[test]
fn a_forged_token_of_random_bytes_is_labelled_bad_token_not_unsupported_version() {
    let key = TokenKey::from_bytes(&[7u8; 32]).expect("a key");
    let v = Verifier::new(vec![key], RevocationList::new()).expect("one key");
    // What a forger without the key sends: any bytes of a token's length. Most do not even
    // start with the version byte.
    for first in [0u8, 2, 0x5a, 0xff, TOKEN_VERSION] {
        let mut forged = vec![0x42u8; TOKEN_LEN];
        forged[0] = first;
        let err = v.verify(&forged, NOW).expect_err("forged");
        assert_eq!(err.label(), "bad_token", "first byte {first}: {err:?}");
        assert!(err.is_peer_misbehaviour());
    }
    for short in [&b""[..], b"garbage", &[TOKEN_VERSION; 3]] {
        assert_eq!(v.verify(short, NOW).expect_err("malformed").label(), "bad_token");
    }
}

#[test]
fn device_ids_survive_sqlite_integer_bit_casts() {
    for id in [0, 1, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
        let d = DeviceId::new(id);
        assert_eq!(DeviceId::from_i64_bits(d.to_i64_bits()), d);
    }
    assert_eq!(DeviceId::new(u64::MAX).to_i64_bits(), -1);
    assert_eq!(DeviceId::new(5).to_string(), "device-5");
}

#[test]
fn authenticate_names_the_device_of_a_revoked_or_expired_token_but_never_of_a_forged_one() {
    let key = TokenKey::from_bytes(&[9u8; 32]).expect("a key");
    let enroller = Enroller::new(key.clone());
    let device = DeviceId::new(42);
    let expired = enroller.issue(device, NOW - 2_000, Some(Duration::from_millis(1_000))).expect("a token");
    let revoked: RevocationList = [device].into_iter().collect();
    let v = Verifier::new(vec![key], revoked).expect("one key");
    assert_eq!(v.verify(expired.as_bytes(), NOW), Err(AuthError::Revoked));
    assert_eq!(v.authenticate(expired.as_bytes()).map(|c| c.device), Ok(device));
    let mut forged = expired.to_vec();
    forged[TOKEN_LEN - 1] ^= 1;
    assert_eq!(v.authenticate(&forged), Err(AuthError::BadTag));
    assert_eq!(v.authenticate(b""), Err(AuthError::Malformed));
}
