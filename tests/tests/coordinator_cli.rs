//! The real `fedrec-coordinator` binary's device commands end to end: `enroll` never leaves devices nobody holds a token for, `revoke` and `devices`, `rotate-key` and `retire-old-keys`, and how `serve` refuses and counts revoked, expired and forged tokens (`fedrec_rejected_total` by reason; only a forged token is a strike).

use std::fs::File;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fedrec_client::net::{Device, NetError};
use fedrec_coordinator::auth::{DeviceId, Enroller, RevocationList, TokenClaims, TokenKey, Verifier};
use fedrec_shared::ModelShape;
use fedrec_shared::wire::{CheckIn, ErrorCode, Request, Response};
use fedrec_tests::coordinator::describe;
use fedrec_tests::{
    CoordinatorDir, CoordinatorProcess, encode_hex, fedrec_coordinator_bin, scrape_metrics, series, unix_ms,
};

const SHAPE: ModelShape = ModelShape { n_items: 40, dim: 4, n_segments: 2 };

/// `init` with a small model, no noise (no budget needed) and one strike per connection, so
/// that a refusal that counted as a strike would close the connection at once.
fn prepare(dir: &Path) -> CoordinatorDir {
    CoordinatorDir::init_plain(
        dir,
        &[
            ("n_items = 1000", "n_items = 40"),
            ("dim = 16", "dim = 4"),
            ("n_segments = 8", "n_segments = 2"),
            ("noise_multiplier = 1.0", "noise_multiplier = 0.0"),
            ("max_invalid_requests = 3", "max_invalid_requests = 1"),
        ],
    )
}

/// The number after `key: ` in `status`'s output.
fn status_count(state: &CoordinatorDir, key: &str) -> u64 {
    let text = state.run(&["status"]);
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(": ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("status has no {key:?}:\n{text}"))
}

/// The device a token names (bytes 1..9, little-endian).
fn device_of(token: &[u8]) -> u64 {
    u64::from_le_bytes(token[1..9].try_into().expect("a token has a device id"))
}

fn device(serve: &CoordinatorProcess, token: Vec<u8>) -> Device {
    serve.device(token, SHAPE, Duration::from_secs(10))
}

/// Whether a check-in answer admits the device (to a round, or to wait for one).
fn admitted(answer: &Result<Response, NetError>) -> bool {
    match answer {
        Ok(Response::Error { code, .. }) => !matches!(code, ErrorCode::BadToken | ErrorCode::CutOff),
        Ok(_) => true,
        Err(_) => false,
    }
}

/// `device`'s check-in with `token` instead of its own.
fn check_in_with(device: &Device, token: &[u8]) -> Request {
    Request::CheckIn(CheckIn { token: token.to_vec(), ..device.check_in() })
}

/// One check-in with `token` on a new connection.
async fn check_in(serve: &CoordinatorProcess, token: &[u8]) -> Result<Response, NetError> {
    let device = device(serve, token.to_vec());
    let session = device.connect().await.expect("connects");
    let answer = session.request(&Request::CheckIn(device.check_in())).await;
    session.close();
    answer
}

#[test]
fn enroll_onto_an_existing_file_fails_before_enrolling_anything() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let state = prepare(&tmp.path().join("state"));
    let out = tmp.path().join("tokens.txt");
    std::fs::write(&out, "the operator's earlier tokens\n").expect("writable");
    let run = state.command(&["enroll", "--count", "3", "--out", out.to_str().expect("UTF-8")]);
    assert!(!run.status.success(), "enroll must refuse to overwrite:\n{}", describe(&run));
    assert!(String::from_utf8_lossy(&run.stderr).contains("cannot create"), "{}", describe(&run));
    assert_eq!(std::fs::read_to_string(&out).expect("still there"), "the operator's earlier tokens\n");
    assert_eq!(status_count(&state, "devices enrolled"), 0, "no device was enrolled");
    assert_eq!(status_count(&state, "devices revoked"), 0);
}

#[test]
fn enroll_that_cannot_write_its_tokens_revokes_every_device_it_enrolled() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let state = prepare(&tmp.path().join("state"));
    // Every write to /dev/full fails (ENOSPC): the tokens are lost once the devices exist.
    let full = File::options().write(true).open("/dev/full").expect("Linux has /dev/full");
    let run = Command::new(fedrec_coordinator_bin())
        .args(["enroll", "--count", "3", "--dir"])
        .arg(state.path())
        .stdout(Stdio::from(full))
        .stderr(Stdio::piped())
        .output()
        .expect("the coordinator binary starts");
    assert!(!run.status.success(), "{}", describe(&run));
    assert!(String::from_utf8_lossy(&run.stderr).contains("revoked them"), "{}", describe(&run));
    assert_eq!(status_count(&state, "devices enrolled"), 0, "no usable device is left behind");
    assert_eq!(status_count(&state, "devices revoked"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_tokens_are_refused_and_counted_by_reason_without_a_strike() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let state = prepare(&tmp.path().join("state"));
    let tokens = state.enroll(4);
    let (by_token, by_id, by_file, kept) = (&tokens[0], &tokens[1], &tokens[2], &tokens[3]);

    // Every name is checked before anything is revoked.
    let bad = state.command(&["revoke", "--token", &encode_hex(by_token), "--token", "00ff"]);
    assert!(!bad.status.success(), "{}", describe(&bad));
    assert_eq!(status_count(&state, "devices revoked"), 0, "a typo revokes nothing");

    // By token, by the id `devices` lists, and from a tokens file.
    state.run(&["revoke", "--token", &encode_hex(by_token)]);
    let listed = state.run(&["devices"]);
    let id = device_of(by_id).to_string();
    assert!(listed.lines().any(|l| l.starts_with(&format!("{id} ")) && l.ends_with(" -")), "{listed}");
    state.run(&["revoke", "--device", &id]);
    let file = tmp.path().join("lost.txt");
    std::fs::write(&file, format!("{}\n", encode_hex(by_file))).expect("writable");
    state.run(&["revoke", "--tokens-file", file.to_str().expect("UTF-8")]);
    let again = state.run(&["revoke", "--device", &id]);
    assert_eq!(again, "", "revoking twice is no error");
    assert_eq!(status_count(&state, "devices revoked"), 3);
    assert_eq!(status_count(&state, "devices enrolled"), 1);
    let listed = state.run(&["devices"]);
    assert!(!listed.lines().any(|l| l.starts_with(&format!("{id} ")) && l.ends_with(" -")), "{listed}");

    // An authentic token that has expired, signed with the directory's key.
    let key = TokenKey::from_bytes(&std::fs::read(state.path().join("token.key")).expect("readable"))
        .expect("a token key");
    let now = unix_ms();
    let claims = TokenClaims {
        device: DeviceId::new(device_of(kept)),
        issued_at_ms: now - 2_000,
        expires_at_ms: Some(now - 1_000),
    };
    let expired = Enroller::new(key).issue_claims(&claims).to_vec();

    let serve = state.serve().await;
    // Refusals an honest device may meet: BadToken, counted by reason, and no strike (one
    // strike would close this connection).
    let honest = device(&serve, by_token.clone());
    let session = honest.connect().await.expect("connects");
    for token in [by_token, by_id, &expired, by_file, by_token] {
        match session.request(&check_in_with(&honest, token)).await {
            Ok(Response::Error { code: ErrorCode::BadToken, .. }) => {}
            other => panic!("a revoked or expired token is refused with BadToken, got {other:?}"),
        }
    }
    // The device that was not revoked is admitted on the same connection.
    let answer = session.request(&check_in_with(&honest, kept)).await;
    assert!(admitted(&answer), "{answer:?}");
    session.close();

    // A forged token: BadToken and a strike, so the connection is closed after it.
    let mut forged = vec![0xffu8; kept.len()];
    forged[1..9].copy_from_slice(&kept[1..9]);
    let forger = device(&serve, forged.clone());
    let session = forger.connect().await.expect("connects");
    match session.request(&Request::CheckIn(forger.check_in())).await {
        Ok(Response::Error { code: ErrorCode::BadToken, .. }) => {}
        other => panic!("a forged token is refused with BadToken, got {other:?}"),
    }
    match session.request(&Request::CheckIn(forger.check_in())).await {
        Err(NetError::Refused { code: ErrorCode::CutOff, .. }) => {}
        other => panic!("one strike closes the forger's connection, got {other:?}"),
    }

    let text = scrape_metrics(serve.metrics_addr().await).await;
    let count = |reason: &str| series(&text, &format!("fedrec_rejected_total{{reason=\"{reason}\"}}"));
    assert_eq!(count("revoked"), Some("4"), "{text}");
    assert_eq!(count("expired"), Some("1"), "{text}");
    assert_eq!(count("bad_token"), Some("1"), "a forged token counts as bad_token: {text}");
    assert_eq!(count("unsupported_version"), None, "{text}");
    assert_eq!(count("cut_off"), Some("1"), "only the forger was cut off: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_signs_new_tokens_and_old_tokens_work_until_the_old_keys_are_retired() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let state = prepare(&tmp.path().join("state"));
    let old = state.enroll(1).remove(0);
    let old_key = std::fs::read(state.path().join("token.key")).expect("readable");
    state.run(&["rotate-key"]);
    let new_key = std::fs::read(state.path().join("token.key")).expect("readable");
    assert_ne!(old_key, new_key, "a new key");
    for file in ["token.key", "token.key.retired"] {
        let mode = std::fs::metadata(state.path().join(file)).expect("exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file} is private");
    }
    assert_eq!(status_count(&state, "retired token keys still verifying"), 1);
    std::fs::remove_file(state.path().join("tokens.txt")).expect("the old tokens file");
    let new = state.enroll(1).remove(0);
    let verifier = |key: &[u8]| {
        Verifier::new(vec![TokenKey::from_bytes(key).expect("a key")], RevocationList::new())
            .expect("one key")
    };
    assert!(verifier(&new_key).verify(&new, unix_ms()).is_ok(), "new tokens are signed with the new key");
    assert!(verifier(&new_key).verify(&old, unix_ms()).is_err());

    // During the grace period both verify.
    let mut serve = state.serve().await;
    for token in [&old, &new] {
        let answer = check_in(&serve, token).await;
        assert!(admitted(&answer), "{answer:?}");
    }
    serve.terminate().await;

    // Retired: the old token is refused as not issued here, the new one still works.
    state.run(&["retire-old-keys"]);
    assert_eq!(status_count(&state, "retired token keys still verifying"), 0);
    let serve = state.serve().await;
    match check_in(&serve, &old).await {
        Ok(Response::Error { code: ErrorCode::BadToken, .. }) => {}
        other => panic!("a token of a retired key is refused, got {other:?}"),
    }
    let answer = check_in(&serve, &new).await;
    assert!(admitted(&answer), "{answer:?}");
    assert_eq!(serve.metric("fedrec_rejected_total{reason=\"bad_token\"}").await, 1.0);
}

#[test]
fn rotations_stop_before_the_verifier_would_hold_too_many_keys() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let state = prepare(&tmp.path().join("state"));
    // A verifier holds 8 keys: the signing key and 7 retired ones.
    for _ in 0..7 {
        state.run(&["rotate-key"]);
    }
    assert_eq!(status_count(&state, "retired token keys still verifying"), 7);
    let refused = state.command(&["rotate-key"]);
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("retire-old-keys"), "{}", describe(&refused));
    state.run(&["retire-old-keys"]);
    state.run(&["rotate-key"]);
    assert_eq!(status_count(&state, "retired token keys still verifying"), 1);
}
