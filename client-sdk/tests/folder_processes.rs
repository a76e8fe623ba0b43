//! The SDK's folder across processes: a second process cannot open a folder in use, and a FIFO at any store file is refused without blocking.
//!
//! Kept apart from folder.rs: starting a process forks this one, and until the child's `exec`
//! it shares every open file, the folder locks of concurrently running tests included, so a
//! test that drops a handle and opens the folder again could see it still locked.

mod support;

use std::path::Path;
use std::process::Command;

use fedrec_client::error::SdkError;
use fedrec_client::sdk::Sdk;
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

/// Set in the child process of the test below: the folder it opens.
const CHILD_DIR: &str = "FEDREC_TEST_LOCK_CHILD_DIR";

/// Runs this test binary again, as the child of the test below, on `dir`; returns its exit code.
fn child_process(dir: &Path) -> i32 {
    let out = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args(["a_second_process_cannot_open_a_folder_in_use", "--exact", "--nocapture"])
        .env(CHILD_DIR, dir)
        .output()
        .expect("the test binary starts");
    println!("child: {}", String::from_utf8_lossy(&out.stdout).trim());
    out.status.code().expect("the child exits normally")
}

#[test]
fn a_second_process_cannot_open_a_folder_in_use() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        // The child: open, record item 99, exit 0; or exit with the error's code.
        let code = match Sdk::open(config(Path::new(&dir))) {
            Ok(sdk) => match sdk.record(event(99, EventKind::Purchase, now_s())) {
                Ok(()) => 0,
                Err(e) => e.code(),
            },
            Err(e) => {
                println!("open refused: {e}");
                e.code()
            }
        };
        std::process::exit(code);
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let sdk = populated(dir.path());
    assert_eq!(child_process(dir.path()), SdkError::Locked.code(), "the child must be refused");
    sdk.record(event(12, EventKind::View, now_s())).expect("the parent keeps writing");
    drop(sdk);

    assert_eq!(child_process(dir.path()), 0, "the folder is free once the parent closed it");
    let sdk = Sdk::open(config(dir.path())).expect("reopens");
    let items = event_items(&sdk);
    assert_eq!(items.len(), 7, "{items:?}");
    assert!(items.contains(&12) && items.contains(&99), "both processes' events are kept: {items:?}");
}

/// Makes a FIFO at `path` with the `mkfifo` command; `false` if the command is missing.
fn mkfifo(path: &Path) -> bool {
    match Command::new("mkfifo").arg(path).status() {
        Ok(status) => {
            assert!(status.success(), "mkfifo failed");
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => panic!("mkfifo: {e}"),
    }
}

#[test]
fn a_fifo_at_any_of_the_store_files_is_refused_without_blocking() {
    for name in [STORE_FILE, GENERATION_FILE, LOCK_FILE] {
        let dir = tempfile::tempdir().expect("a temp dir");
        if name != STORE_FILE {
            drop(populated(dir.path()));
            std::fs::remove_file(dir.path().join(name)).expect("remove");
        }
        if !mkfifo(&dir.path().join(name)) {
            eprintln!("skipped: no mkfifo command on this system");
            return;
        }
        let err = open_without_blocking(config(dir.path())).expect_err("a FIFO is not a store file");
        assert!(matches!(err, SdkError::StoreCorrupt(_)), "{name}: {err:?}");
        assert!(err.to_string().contains("not a regular file"), "{name}: {err}");
    }
}
