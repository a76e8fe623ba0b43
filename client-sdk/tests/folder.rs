//! The SDK's folder: one handle at a time in one process, rollback detection, private file modes, no store in the working directory (the tests that start other processes are in folder_processes.rs).

mod support;

use std::path::Path;

use fedrec_client::error::SdkError;
use fedrec_client::sdk::{Consent, Sdk, SdkConfig};
use fedrec_client::signals::EventKind;
use fedrec_client::store::{GENERATION_FILE, LOCK_FILE, STORE_FILE};
use serde_json::Value;
use support::*;

fn event_items(sdk: &Sdk) -> Vec<u64> {
    let doc: Value = serde_json::from_str(&sdk.export().expect("export")).expect("export is JSON");
    doc["events"]
        .as_array()
        .expect("an events array")
        .iter()
        .map(|e| e["item"].as_u64().expect("an item id"))
        .collect()
}

#[test]
fn a_second_handle_on_a_folder_in_use_is_locked_until_the_first_is_dropped() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let first = populated(dir.path());
    let err = Sdk::open(config(dir.path())).expect_err("the folder is in use");
    assert_eq!(err, SdkError::Locked);
    assert_eq!(err.code(), 17);
    assert!(err.to_string().contains("in use"), "{err}");
    // Neither can the folder be erased under the open handle.
    assert_eq!(Sdk::erase(dir.path()).expect_err("in use"), SdkError::Locked);
    first.record(event(11, EventKind::View, now_s())).expect("the first handle still writes");
    drop(first);

    let second = Sdk::open(config(dir.path())).expect("the folder is free again");
    assert_eq!(event_items(&second).len(), 6, "nothing the first handle acknowledged was lost");
    // forget() releases the folder as well as emptying it.
    second.forget().expect("forget");
    let third = Sdk::open(config(dir.path())).expect("free after forget");
    assert!(event_items(&third).is_empty());
}

#[test]
fn an_older_copy_of_the_store_is_refused_and_cannot_restore_a_withdrawn_consent() {
    let dir = tempfile::tempdir().expect("a temp dir");
    drop(populated(dir.path()));
    let with_consent = store_bytes(dir.path());

    let sdk = Sdk::open(config(dir.path())).expect("opens");
    sdk.set_consent(Consent::default()).expect("the user withdraws consent");
    drop(sdk);
    let withdrawn = store_bytes(dir.path());

    // The older store put back: refused, and left as it is.
    std::fs::write(store_path(dir.path()), &with_consent).expect("write");
    let err = Sdk::open(config(dir.path())).expect_err("an older store must not open");
    assert!(matches!(err, SdkError::Rollback(_)), "{err:?}");
    assert_eq!(err.code(), 18);
    assert_eq!(store_bytes(dir.path()), with_consent, "the file is left untouched");
    // Deleting the counter as well does not help: the store has been written more than once.
    let counter = std::fs::read(dir.path().join(GENERATION_FILE)).expect("the counter exists");
    std::fs::remove_file(dir.path().join(GENERATION_FILE)).expect("remove");
    let err = Sdk::open(config(dir.path())).expect_err("an older store without a counter");
    assert!(matches!(err, SdkError::Rollback(_)), "{err:?}");
    std::fs::write(dir.path().join(GENERATION_FILE), &counter).expect("write");
    // The newest store still opens.
    std::fs::write(store_path(dir.path()), &withdrawn).expect("write");
    let sdk = Sdk::open(config(dir.path())).expect("the newest store opens");
    assert_eq!(sdk.consent().expect("consent"), Consent::default());
    drop(sdk);

    // Recovery moves the old store aside: the consent starts withdrawn, not restored.
    std::fs::write(store_path(dir.path()), &with_consent).expect("write");
    let mut cfg = config(dir.path());
    cfg.recover = true;
    let sdk = Sdk::open(cfg).expect("recovery starts empty");
    assert_eq!(sdk.consent().expect("consent"), Consent::default());
    assert!(event_items(&sdk).is_empty());
    drop(sdk);
    // The fresh store continues above the counter: the old copy stays refused.
    std::fs::write(store_path(dir.path()), &with_consent).expect("write");
    assert!(matches!(Sdk::open(config(dir.path())), Err(SdkError::Rollback(_))));
}

#[test]
fn a_counter_behind_the_store_opens_and_catches_up() {
    // What a crash between writing the store and writing its counter leaves behind.
    let dir = tempfile::tempdir().expect("a temp dir");
    drop(populated(dir.path()));
    let old_counter = std::fs::read(dir.path().join(GENERATION_FILE)).expect("the counter exists");
    let old_store = store_bytes(dir.path());
    let sdk = Sdk::open(config(dir.path())).expect("opens");
    sdk.record(event(13, EventKind::View, now_s())).expect("record");
    drop(sdk);
    std::fs::write(dir.path().join(GENERATION_FILE), &old_counter).expect("write");
    let sdk = Sdk::open(config(dir.path())).expect("a store newer than its counter opens");
    assert_eq!(event_items(&sdk).len(), 6);
    drop(sdk);
    // Opening wrote the counter again: the previous store is now refused.
    std::fs::write(store_path(dir.path()), &old_store).expect("write");
    assert!(matches!(Sdk::open(config(dir.path())), Err(SdkError::Rollback(_))));
}

#[test]
fn a_counter_sealed_under_another_key_or_tampered_is_refused() {
    let dir = tempfile::tempdir().expect("a temp dir");
    drop(populated(dir.path()));
    let path = dir.path().join(GENERATION_FILE);
    let mut counter = std::fs::read(&path).expect("the counter exists");
    let last = counter.len() - 1;
    counter[last] ^= 1;
    std::fs::write(&path, &counter).expect("write");
    let err = Sdk::open(config(dir.path())).expect_err("a tampered counter");
    assert!(matches!(err, SdkError::StoreCorrupt(_)), "{err:?}");
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).expect("the file exists").permissions().mode() & 0o777
}

#[cfg(unix)]
#[test]
fn every_file_the_sdk_writes_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = tmp.path().join("app").join("fedrec");
    let sdk = populated(&dir);
    assert_eq!(mode(&dir), 0o700, "a folder the SDK creates");
    assert_eq!(mode(&tmp.path().join("app")), 0o700, "and its missing parents");
    drop(sdk);
    // Recovery's quarantined copy, too (the fresh store is sealed under the other key).
    let mut cfg = config(&dir);
    cfg.key = OTHER_KEY;
    cfg.recover = true;
    drop(Sdk::open(cfg.clone()).expect("recovers"));
    cfg.recover = false;
    let names = files(&dir);
    assert_eq!(names.len(), 4, "{names:?}");
    for name in &names {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }

    // Files of an older SDK, world-readable, are narrowed: the lock at open, the store and
    // the counter at the next write.
    for name in [STORE_FILE, LOCK_FILE, GENERATION_FILE] {
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let sdk = Sdk::open(cfg).expect("opens");
    assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
    sdk.set_consent(Consent { personalization: true, training: false }).expect("a write");
    for name in [STORE_FILE, GENERATION_FILE] {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
}

#[cfg(unix)]
#[test]
fn a_symlink_at_the_store_path_is_refused_not_followed() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let elsewhere = tempfile::tempdir().expect("another temp dir");
    drop(populated(elsewhere.path()));
    std::os::unix::fs::symlink(store_path(elsewhere.path()), store_path(dir.path())).expect("symlink");
    let err = open_without_blocking(config(dir.path())).expect_err("a symlink is not followed");
    assert!(matches!(err, SdkError::StoreCorrupt(_)), "{err:?}");
    // Recovery moves the link aside (the file it points to is not touched) and starts empty.
    let before = store_bytes(elsewhere.path());
    let mut cfg = config(dir.path());
    cfg.recover = true;
    let sdk = open_without_blocking(cfg).expect("recovers");
    assert!(event_items(&sdk).is_empty());
    assert!(std::fs::symlink_metadata(store_path(dir.path())).expect("a store").file_type().is_file());
    assert_eq!(store_bytes(elsewhere.path()), before);
}

#[test]
fn an_empty_folder_path_is_refused_and_writes_nothing_to_the_working_directory() {
    let err = Sdk::open(SdkConfig::new("", KEY)).expect_err("an empty path");
    assert!(matches!(&err, SdkError::InvalidArgument(m) if m.contains("dir must not be empty")), "{err:?}");
    assert!(!Path::new(STORE_FILE).exists() && !Path::new(LOCK_FILE).exists(), "a file in the working dir");
    let err = Sdk::erase(Path::new("")).expect_err("an empty path");
    assert!(matches!(err, SdkError::InvalidArgument(_)), "{err:?}");
}
