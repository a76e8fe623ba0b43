//! The sealed store on a real filesystem: tampering, truncation, a wrong key and failed writes give clear errors and lose nothing; pruning, reopening and schema versions.

mod support;

use fedrec_client::error::SdkError;
use fedrec_client::sdk::{Consent, Sdk};
use fedrec_client::signals::EventKind;
use fedrec_client::store::{
    GENERATION_FILE, HEADER_LEN, LOCK_FILE, QUARANTINE_PREFIX, STORE_FILE, TEMP_FILE,
};
use fedrec_shared::ModelShape;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use serde_json::Value;
use support::*;

fn export(sdk: &Sdk) -> Value {
    serde_json::from_str(&sdk.export().expect("export")).expect("export is JSON")
}

fn event_items(sdk: &Sdk) -> Vec<u64> {
    export(sdk)["events"]
        .as_array()
        .expect("an events array")
        .iter()
        .map(|e| e["item"].as_u64().expect("an item id"))
        .collect()
}

/// The files of an open store, sorted.
const STORE_FILES: [&str; 3] = [GENERATION_FILE, LOCK_FILE, STORE_FILE];

fn is_open_error(e: &SdkError) -> bool {
    matches!(e, SdkError::WrongKeyOrCorrupt | SdkError::StoreCorrupt(_) | SdkError::UnsupportedVersion { .. })
}

#[test]
fn every_tampered_byte_is_refused_and_the_file_is_left_as_it_was() {
    let dir = tempfile::tempdir().expect("a temp dir");
    drop(populated(dir.path()));
    let good = store_bytes(dir.path());
    // Magic, format version, algorithm, reserved, nonce, ciphertext (start, middle) and tag.
    let positions = [0, 8, 9, 10, 11, 12, 23, HEADER_LEN, good.len() / 2, good.len() - 1];
    for pos in positions {
        let mut bad = good.clone();
        bad[pos] ^= 0x01;
        std::fs::write(store_path(dir.path()), &bad).expect("write");
        let err = Sdk::open(config(dir.path())).expect_err("a tampered store must not open");
        assert!(is_open_error(&err), "byte {pos}: {err:?}");
        assert_eq!(store_bytes(dir.path()), bad, "byte {pos}: the file was changed");
        assert_eq!(files(dir.path()), STORE_FILES, "byte {pos}: files were added or removed");
    }
    std::fs::write(store_path(dir.path()), &good).expect("write");
    let sdk = Sdk::open(config(dir.path())).expect("the untouched store opens");
    assert_eq!(event_items(&sdk).len(), 5);
}

#[test]
fn a_truncated_store_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().expect("a temp dir");
    drop(populated(dir.path()));
    let good = store_bytes(dir.path());
    for len in [0, 4, 8, HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + 15, good.len() / 2, good.len() - 1] {
        std::fs::write(store_path(dir.path()), &good[..len]).expect("write");
        let err = Sdk::open(config(dir.path())).expect_err("a truncated store must not open");
        assert!(is_open_error(&err), "length {len}: {err:?}");
        assert_eq!(store_bytes(dir.path()), &good[..len], "length {len}: the file was changed");
    }
}

#[test]
fn a_wrong_key_is_a_clear_error_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("a temp dir");
    drop(populated(dir.path()));
    let good = store_bytes(dir.path());
    let mut cfg = config(dir.path());
    cfg.key = OTHER_KEY;
    let err = Sdk::open(cfg).expect_err("a wrong key must not open the store");
    assert_eq!(err, SdkError::WrongKeyOrCorrupt);
    assert_eq!(err.code(), 3);
    assert!(err.to_string().contains("wrong key"), "{err}");
    assert_eq!(store_bytes(dir.path()), good);
    let sdk = Sdk::open(config(dir.path())).expect("the right key still opens it");
    assert_eq!(event_items(&sdk).len(), 5);
}

#[test]
fn recovery_moves_the_unreadable_store_aside_and_starts_empty() {
    let dir = tempfile::tempdir().expect("a temp dir");
    drop(populated(dir.path()));
    let good = store_bytes(dir.path());
    let mut cfg = config(dir.path());
    cfg.key = OTHER_KEY;
    cfg.recover = true;
    let sdk = Sdk::open(cfg).expect("recovery opens a fresh store");
    assert_eq!(sdk.consent().expect("consent"), Consent::default());
    assert!(event_items(&sdk).is_empty());
    let names = files(dir.path());
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(names[..3], STORE_FILES);
    assert!(names[3].starts_with(QUARANTINE_PREFIX), "{names:?}");
    assert_eq!(std::fs::read(dir.path().join(&names[3])).expect("read"), good, "moved, not changed");
    sdk.forget().expect("forget");
    assert!(files(dir.path()).is_empty(), "forget removes the quarantined store too");
}

#[test]
fn a_failed_save_keeps_the_previous_file_and_state() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = populated(dir.path());
    let before = store_bytes(dir.path());
    // A folder where the temporary file must go makes the write fail (even for root).
    std::fs::create_dir(dir.path().join(TEMP_FILE)).expect("mkdir");
    let err = sdk.record(event(2, EventKind::View, now_s())).expect_err("the write fails");
    assert!(matches!(err, SdkError::StoreIo(_)), "{err:?}");
    assert_eq!(store_bytes(dir.path()), before);
    assert_eq!(event_items(&sdk).len(), 5, "memory keeps the previous state too");
    let err = sdk.set_consent(Consent::default()).expect_err("the write fails");
    assert!(matches!(err, SdkError::StoreIo(_)), "{err:?}");
    assert!(sdk.consent().expect("consent").training);

    std::fs::remove_dir(dir.path().join(TEMP_FILE)).expect("rmdir");
    sdk.record(event(2, EventKind::View, now_s())).expect("the write works again");
    drop(sdk);
    let sdk = Sdk::open(config(dir.path())).expect("reopens");
    assert_eq!(event_items(&sdk).len(), 6);
}

#[test]
fn a_save_over_the_size_cap_is_refused_and_keeps_the_previous_file() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut cfg = config(dir.path());
    cfg.max_store_bytes = 64 * 1024;
    let sdk = Sdk::open(cfg).expect("opens");
    sdk.install_model(model(1, SHAPE)).expect("a small model fits");
    let before = store_bytes(dir.path());
    let big = ModelShape { n_items: 1000, dim: 32, n_segments: 2 };
    let err = sdk.install_model(model(2, big)).expect_err("128 KB do not fit in 64 KB");
    assert!(matches!(err, SdkError::TooLarge(_)), "{err:?}");
    assert_eq!(store_bytes(dir.path()), before);
    assert_eq!(sdk.model_version().expect("version"), Some(1));
}

#[test]
fn a_store_over_the_read_cap_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = populated(dir.path());
    sdk.install_model(model(4, ModelShape { n_items: 100, dim: 8, n_segments: 2 })).expect("model");
    drop(sdk);
    let before = store_bytes(dir.path());
    let mut cfg = config(dir.path());
    cfg.max_store_bytes = 1024;
    assert!(before.len() > 1024);
    let err = Sdk::open(cfg).expect_err("over the cap");
    assert!(matches!(err, SdkError::TooLarge(_)), "{err:?}");
    assert_eq!(store_bytes(dir.path()), before);
}

#[test]
fn pruning_keeps_the_newest_events() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut cfg = config(dir.path());
    cfg.max_events = 5;
    let sdk = Sdk::open(cfg.clone()).expect("opens");
    sdk.set_consent(Consent { personalization: true, training: false }).expect("consent");
    let t0 = now_s() - 1000;
    for item in 0..8u32 {
        sdk.record(event(item, EventKind::View, t0 + i64::from(item))).expect("record");
    }
    // Older than everything kept: pruned at once.
    sdk.record(event(19, EventKind::View, t0 - 1)).expect("record");
    assert_eq!(event_items(&sdk), [3, 4, 5, 6, 7]);
    // Newer than the oldest: kept, in time order.
    sdk.record(event(18, EventKind::View, t0 + 4)).expect("record");
    assert_eq!(event_items(&sdk), [4, 18, 5, 6, 7]);
    drop(sdk);
    let sdk = Sdk::open(cfg.clone()).expect("reopens");
    assert_eq!(event_items(&sdk), [4, 18, 5, 6, 7]);
    drop(sdk);
    // A lower bound applies when the store is opened.
    cfg.max_events = 2;
    let sdk = Sdk::open(cfg).expect("reopens");
    assert_eq!(event_items(&sdk), [6, 7]);
}

#[test]
fn reopening_round_trips_everything() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = populated(dir.path());
    let recs = sdk.recommend(5, &Default::default()).expect("recommend");
    // Persist the reconstructed user vector with the next save.
    sdk.set_consent(Consent { personalization: true, training: false }).expect("consent");
    let before = export(&sdk);
    assert!(before["user_vector"].is_object(), "{before}");
    drop(sdk);
    let sdk = Sdk::open(config(dir.path())).expect("reopens");
    assert_eq!(export(&sdk), before);
    assert_eq!(sdk.model_version().expect("version"), Some(3));
    assert_eq!(sdk.recommend(5, &Default::default()).expect("recommend"), recs);
}

/// Seals `payload` the way the format documents it, independently of the SDK's code.
fn seal_by_hand(format_version: u16, payload: &[u8]) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(b"FEDRECST");
    header.extend_from_slice(&format_version.to_le_bytes());
    header.extend_from_slice(&[1, 0]);
    let nonce: [u8; 12] = std::array::from_fn(|i| i as u8);
    header.extend_from_slice(&nonce);
    assert_eq!(header.len(), HEADER_LEN);
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &KEY).expect("a 32-byte key"));
    let mut body = payload.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&header), &mut body)
        .expect("seal");
    [header, body].concat()
}

/// A schema-1 payload written field by field: consent (personalization only) and two events.
fn v1_payload(schema: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&schema.to_le_bytes());
    p.push(0b01);
    p.extend_from_slice(&2u32.to_le_bytes());
    for (item, kind, value, ts) in [(5u32, 2u32, 1.0f32, 1_700_000_000i64), (6, 257, 2.5, 1_700_000_100)] {
        p.extend_from_slice(&item.to_le_bytes());
        p.extend_from_slice(&kind.to_le_bytes());
        p.extend_from_slice(&value.to_le_bytes());
        p.extend_from_slice(&ts.to_le_bytes());
    }
    p.extend_from_slice(&[0, 0, 0, 0]); // no user vector, model, ruleset, training parameters
    p
}

#[test]
fn a_hand_written_v1_store_opens() {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(store_path(dir.path()), seal_by_hand(1, &v1_payload(1))).expect("write");
    let sdk = Sdk::open(config(dir.path())).expect("a v1 store opens");
    assert_eq!(sdk.consent().expect("consent"), Consent { personalization: true, training: false });
    let doc = export(&sdk);
    assert_eq!(doc["events"][0]["item"], 5);
    assert_eq!(doc["events"][0]["kind"], "purchase");
    assert_eq!(doc["events"][1]["item"], 6);
    assert_eq!(doc["events"][1]["kind_code"], 257);
    assert_eq!(doc["events"][1]["value"], 2.5);
    assert_eq!(doc["events"][1]["timestamp_s"], 1_700_000_100);
    assert_eq!(doc["model_version"], Value::Null);
    // Migration: the store was rewritten at once (schema 2) with its rollback counter beside
    // it, so the pre-migration file put back is refused.
    assert_eq!(files(dir.path()), STORE_FILES);
    drop(sdk);
    std::fs::write(store_path(dir.path()), seal_by_hand(1, &v1_payload(1))).expect("write");
    let err = Sdk::open(config(dir.path())).expect_err("the pre-migration store is older");
    assert!(matches!(err, SdkError::Rollback(_)), "{err:?}");
}

#[test]
fn a_newer_schema_or_format_is_unsupported_not_garbage() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let newer_schema = seal_by_hand(1, &v1_payload(5));
    std::fs::write(store_path(dir.path()), &newer_schema).expect("write");
    let err = Sdk::open(config(dir.path())).expect_err("schema 5 is unknown");
    assert_eq!(err, SdkError::UnsupportedVersion { found: 5, supported: 4 });
    assert_eq!(store_bytes(dir.path()), newer_schema);

    let newer_format = seal_by_hand(2, &v1_payload(1));
    std::fs::write(store_path(dir.path()), &newer_format).expect("write");
    let err = Sdk::open(config(dir.path())).expect_err("format 2 is unknown");
    assert_eq!(err, SdkError::UnsupportedVersion { found: 2, supported: 1 });
    assert_eq!(store_bytes(dir.path()), newer_format);
}

#[test]
fn the_store_holds_no_plaintext() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = Sdk::open(config(dir.path())).expect("opens");
    sdk.set_consent(Consent { personalization: true, training: false }).expect("consent");
    let marker = 0x1234_5678u32;
    sdk.record(event(marker, EventKind::View, now_s())).expect("record");
    let bytes = store_bytes(dir.path());
    assert!(!bytes.windows(4).any(|w| w == marker.to_le_bytes()), "the item id is visible on disk");
    assert!(!dir.path().join(TEMP_FILE).exists());
}
