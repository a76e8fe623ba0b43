//! Issue 10 against the real `fedrec-coordinator` binary: the budget is fixed in the store and only `budget raise` (logged, with a reason) changes it; an edited ledger row or a rolled-back store is reported by `status` and refused by `serve`; rounds with noise leave no exact count in `/metrics`, the logs, the rounds table or the audit log.

use std::path::Path;
use std::time::Duration;

use fedrec_client::net::Participation;
use fedrec_shared::{ModelShape, Rating};
use fedrec_tests::coordinator::describe;
use fedrec_tests::{
    CoordinatorDir, CoordinatorProcess, low_rank_ratings, ratings_by_user, scrape_metrics, series,
};
use tokio::task::JoinHandle;

const N_ITEMS: usize = 40;
const SHAPE: ModelShape = ModelShape { n_items: N_ITEMS, dim: 4, n_segments: 2 };
const N_DEVICES: usize = 6;
/// Pacing between a device's attempts (not a wait for a condition).
const PACE: Duration = Duration::from_millis(20);

/// The small model and quick rounds every test here serves, plus `more`.
fn edits(more: &[(&'static str, &'static str)]) -> Vec<(&'static str, String)> {
    let mut edits: Vec<(&str, String)> = vec![
        ("n_items = 1000", format!("n_items = {N_ITEMS}")),
        ("dim = 16", "dim = 4".to_owned()),
        ("n_segments = 8", "n_segments = 2".to_owned()),
        ("q = 0.5", "q = 1.0".to_owned()),
        ("population = 100", format!("population = {N_DEVICES}")),
        ("min_reports = 10", "min_reports = 2".to_owned()),
        ("checkin_window_ms = 30000", "checkin_window_ms = 1000".to_owned()),
        ("report_window_ms = 120000", "report_window_ms = 3000".to_owned()),
        ("round_gap_ms = 1000", "round_gap_ms = 50".to_owned()),
    ];
    edits.extend(more.iter().map(|&(from, to)| (from, to.to_owned())));
    edits
}

/// Runs `fedrec-coordinator <args> --dir`, which must fail; its stderr.
fn refused(state: &CoordinatorDir, args: &[&str]) -> String {
    let out = state.command(args);
    assert!(!out.status.success(), "{args:?} must be refused:\n{}", describe(&out));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `(event, detail)` of every audit line, read-only.
fn audit(dir: &Path) -> Vec<(String, String)> {
    let db = rusqlite::Connection::open_with_flags(
        dir.join("state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("the store opens read-only");
    db.prepare("SELECT event, detail FROM audit_log ORDER BY id")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// Issue 10 (4): the budget lived only in fedrec.toml — raise it there and serving continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_budget_without_the_command_is_refused() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let state = CoordinatorDir::new(tmp.path().join("state"));
    state.run(&["init", "--epsilon", "8.0", "--delta", "1e-6"]);
    state.edit_config(&[
        ("listen = \"127.0.0.1:4433\"", "listen = \"127.0.0.1:0\""),
        ("metrics_listen = \"127.0.0.1:9464\"", "metrics_listen = \"127.0.0.1:0\""),
    ]);
    state.edit_config(&edits(&[]));
    let status = state.run(&["status"]);
    assert!(status.contains("privacy spent: epsilon = 0.0000 of 8.0000"), "{status}");
    assert!(status.contains("privacy budget: stored"), "{status}");
    assert!(status.contains("ledger chain: ok"), "{status}");

    // Raised in the file only: refused, saying how to raise it.
    state.edit_config(&[("epsilon = 8.0", "epsilon = 16.0")]);
    let err = refused(&state, &["serve"]);
    assert!(err.contains("differs from the stored budget") && err.contains("budget raise"), "{err}");
    assert!(state.run(&["status"]).contains("serve refuses it"));

    // The command: only upwards, only with a reason, logged.
    let err = refused(&state, &["budget", "raise", "--epsilon", "4.0", "--reason", "typo"]);
    assert!(err.contains("above the current"), "{err}");
    let err = refused(&state, &["budget", "raise", "--epsilon", "16.0", "--reason", " "]);
    assert!(err.contains("reason"), "{err}");
    state.run(&["budget", "raise", "--epsilon", "16.0", "--reason", "approved by the privacy board"]);
    let raised = audit(state.path());
    let line =
        raised.iter().find(|(event, _)| event == "budget_raised").expect("the raise is in the audit log");
    assert!(
        line.1.contains("epsilon=8->16") && line.1.contains("reason=approved by the privacy board"),
        "{line:?}"
    );
    let status = state.run(&["status"]);
    assert!(status.contains("of 16.0000"), "{status}");
    let mut serve = state.serve().await;
    serve.terminate().await;

    // Noise off while a budget exists: refused. (Central noise: the template's distributed
    // noise refuses a zero multiplier earlier, naming its own key.)
    state.edit_config(&fedrec_tests::coordinator::CENTRAL_NOISE);
    state.edit_config(&[
        ("noise_multiplier = 1.0", "noise_multiplier = 0.0"),
        ("epsilon = 16.0", "# epsilon = 16.0"),
        ("delta = 1e-6", "# delta = 1e-6"),
    ]);
    let err = refused(&state, &["serve"]);
    assert!(err.contains("a round without noise is refused while a budget exists"), "{err}");
}

/// Issue 10 (4): without `init --epsilon`, the first `serve` fixes the file's budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_serve_fixes_the_budget_of_the_file() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let state = CoordinatorDir::init_plain(
        tmp.path().join("state"),
        &edits(&[("# epsilon = 8.0", "epsilon = 8.0"), ("# delta = 1e-6", "delta = 1e-6")]),
    );
    assert!(state.run(&["status"]).contains("not yet fixed in the store"));
    let mut serve = state.serve().await;
    serve.terminate().await;
    assert!(audit(state.path()).iter().any(|(event, _)| event == "budget_set"));
    state.edit_config(&[("epsilon = 8.0", "epsilon = 9.0")]);
    let err = refused(&state, &["serve"]);
    assert!(err.contains("budget raise"), "{err}");
}

fn ratings() -> Vec<Vec<Rating>> {
    ratings_by_user(N_DEVICES, low_rank_ratings(N_DEVICES, N_ITEMS, 3, 12, 0.1, 21))
}

/// Devices participating in a loop until aborted.
fn participate(serve: &CoordinatorProcess, tokens: &[Vec<u8>]) -> Vec<JoinHandle<()>> {
    tokens
        .iter()
        .zip(ratings())
        .map(|(token, train)| {
            let mut device = serve.device(token.clone(), SHAPE, Duration::from_secs(5));
            tokio::spawn(async move {
                loop {
                    let pause = match device.participate(&train).await {
                        Ok(Participation::NotSelected { retry_after }) => retry_after.min(PACE * 3),
                        _ => PACE,
                    };
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect()
}

/// Serves with devices until `n` rounds have committed, checks what the round releases, and
/// stops cleanly.
async fn serve_rounds(state: &CoordinatorDir, tokens: &[Vec<u8>], n: usize) {
    let mut serve = state.serve().await;
    let devices = participate(&serve, tokens);
    let committed =
        |lines: &[String]| lines.iter().filter(|l| l.contains(" committed: model version")).count();
    let lines = serve.wait_for("the commits", |l| committed(l) >= n).await;
    // No exact count in the logs, the metrics ...
    for line in lines.iter().filter(|l| l.contains("committed")) {
        for word in ["checked in", "selected", "reported", "dropped", "n_reported"] {
            assert!(!line.contains(word), "a noised round's log line names a count: {line}");
        }
    }
    let text = scrape_metrics(serve.metrics_addr().await).await;
    for event in ["checked_in", "selected", "reported"] {
        let name = format!("fedrec_clients_total{{event=\"{event}\"}}");
        assert_eq!(series(&text, &name), Some("0"), "{name} in:\n{text}");
    }
    assert_eq!(series(&text, "fedrec_round_duration_seconds_count"), Some("0"), "{text}");
    assert!(series(&text, "fedrec_rounds_total{outcome=\"committed\"}").is_some_and(|v| v != "0"), "{text}");
    for d in &devices {
        d.abort();
    }
    serve.terminate().await;
}

/// Issue 10 (1, 4): noised rounds release no exact count (metrics, logs, rounds table, audit
/// log); an edited ledger row, and a store restored from an older copy, are reported by
/// `status` and refused by `serve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noised_rounds_release_no_counts_and_the_ledger_is_tamper_evident() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = tmp.path().join("state");
    let state = CoordinatorDir::init_plain(
        &dir,
        &edits(&[("# epsilon = 8.0", "epsilon = 1000.0"), ("# delta = 1e-6", "delta = 1e-5")]),
    );
    let tokens = state.enroll(N_DEVICES);
    serve_rounds(&state, &tokens, 2).await;

    // ... nor in the store.
    let db = rusqlite::Connection::open(dir.join("state.sqlite")).expect("opens");
    let counts: Vec<Option<i64>> = db
        .prepare("SELECT coalesce(n_checked_in, n_selected, n_reported, n_dropped) FROM rounds")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert!(counts.len() >= 2 && counts.iter().all(Option::is_none), "{counts:?}");
    drop(db);
    for (event, detail) in audit(&dir) {
        assert!(!detail.contains("n_"), "{event}: {detail}");
    }
    let status = state.run(&["status"]);
    assert!(status.contains("ledger chain: ok") && status.contains("ledger head file: matches"), "{status}");

    // A copy of the store as it is now, then more rounds.
    let old = tmp.path().join("old.sqlite");
    std::fs::copy(dir.join("state.sqlite"), &old).expect("copy");
    serve_rounds(&state, &tokens, 1).await;

    // Rolled back to the copy: the spend since would be forgotten.
    let current = tmp.path().join("current.sqlite");
    std::fs::copy(dir.join("state.sqlite"), &current).expect("copy");
    std::fs::copy(&old, dir.join("state.sqlite")).expect("restore the old copy");
    let err = refused(&state, &["serve"]);
    assert!(err.contains("restored from an older copy"), "{err}");
    let out = state.command(&["status"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ledger head file: MISMATCH"),
        "{}",
        describe(&out)
    );
    std::fs::copy(&current, dir.join("state.sqlite")).expect("put the current store back");
    state.run(&["status"]);

    // An edited ledger row: a lower charge is still a valid event; only the chain tells.
    let db = rusqlite::Connection::open(dir.join("state.sqlite")).expect("opens");
    let round: i64 = db.query_row("SELECT min(round) FROM ledger", [], |r| r.get(0)).expect("a charge");
    db.execute("UPDATE ledger SET noise_multiplier = 10.0 WHERE round = ?1", [round]).expect("tamper");
    drop(db);
    let out = state.command(&["status"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("ledger chain: BROKEN at the ledger row of round {round}")), "{text}");
    let err = refused(&state, &["serve"]);
    assert!(err.contains("hash chain is broken"), "{err}");
}
