//! The coordinator's PostgreSQL store on a real PostgreSQL server started by the test: states round-trip bit for bit like SQLite's with the same hash chains, a round is never written twice, and two `serve` processes on one database fail over after `kill -9` of the leader without charging a round twice. Skipped, with a message, where no PostgreSQL can run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fedrec_coordinator::store::{BackendKind, Store, StoreError, StoreOptions, StoreSection};
use fedrec_shared::round::{CoordinatorEvent, CoordinatorState};
use fedrec_tests::CoordinatorDir;
use fedrec_tests::postgres::{PgServer, ServeProcess};
use fedrec_tests::store_history::{SHAPE, committed_round, history, participate};

/// A `[store]` section for `url`, its password in `dir/pg.password`.
fn pg_section(pg: &PgServer, dir: &Path, url: &str) -> StoreSection {
    std::fs::write(dir.join("pg.password"), format!("{}\n", pg.password())).expect("writable");
    StoreSection {
        backend: BackendKind::Postgres,
        url: Some(url.to_owned()),
        password_env: None,
        password_file: Some(PathBuf::from("pg.password")),
        tls: None,
        ca_file: None,
    }
}

fn open_pg(section: &StoreSection, dir: &Path) -> Store {
    let location = section.location(dir, Path::new("unused.sqlite")).expect("a valid [store]");
    Store::open_location(&location, StoreOptions::default()).expect("the PostgreSQL store opens")
}

/// Everything a resumed coordinator depends on, as bits: model values, ledger charges (the
/// canonical bytes of central and distributed ones), version, next round and clip norm.
type Fingerprint = (Vec<u32>, Vec<Vec<u8>>, u64, u64, u32);

fn fingerprint(s: &CoordinatorState) -> Fingerprint {
    let model = s.model.item_factors.iter().chain(s.model.item_bias.iter()).map(|v| v.to_bits()).collect();
    let ledger = s
        .ledger
        .entries()
        .iter()
        .map(|e| e.canonical_bytes())
        .chain(s.ledger.ddp_entries().iter().map(|c| c.canonical_bytes()))
        .collect();
    (model, ledger, s.version, s.next_round, s.clip_norm.to_bits())
}

#[test]
fn postgres_store_round_trips_like_sqlite_and_refuses_a_round_twice() {
    let Some(pg) =
        PgServer::start_or_skip("postgres_store_round_trips_like_sqlite_and_refuses_a_round_twice")
    else {
        return;
    };
    let tmp = tempfile::tempdir().expect("a temp dir");
    let url = pg.create_database("round_trip").expect("a database");
    let section = pg_section(&pg, tmp.path(), &url);
    let mut pg_store = open_pg(&section, tmp.path());
    assert_eq!(pg_store.backend(), BackendKind::Postgres);
    let mut sqlite = Store::open(tmp.path().join("state.sqlite")).expect("sqlite opens");

    let (initial, rounds) = history(2, 2);
    let mut pg_ms = Vec::new();
    let mut sqlite_ms = Vec::new();
    for store in [&mut pg_store, &mut sqlite] {
        store.save_initial(&initial, 1).expect("the initial state is saved");
    }
    for (k, (state, event)) in rounds.iter().enumerate() {
        let CoordinatorEvent::RoundCommitted { stats, .. } = event else {
            panic!("round {k} was not committed: {event:?}")
        };
        let t = Instant::now();
        pg_store.commit_round(state, stats, 10 + k as u64).expect("postgres commits");
        pg_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        sqlite.commit_round(state, stats, 10 + k as u64).expect("sqlite commits");
        sqlite_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    eprintln!("commit ms per round: postgres {pg_ms:.2?}, sqlite {sqlite_ms:.2?}");

    // Reloaded through a new connection: the newest state, bit for bit, as SQLite has it.
    let reopened = open_pg(&section, tmp.path());
    let want = &rounds.last().expect("rounds ran").0;
    let got = reopened.load_latest().expect("loads").expect("a checkpoint");
    assert_eq!(fingerprint(&got), fingerprint(want));
    let from_sqlite = sqlite.load_latest().expect("loads").expect("a checkpoint");
    assert_eq!(fingerprint(&got), fingerprint(&from_sqlite));
    assert_eq!((got.ledger.entries().len(), got.ledger.ddp_entries().len()), (2, 2), "both kinds of charge");

    // The same chain bytes on both backends, unbroken.
    let chain = reopened.verify_chain().expect("the chain reads");
    assert_eq!(chain.broken, None);
    assert_eq!(chain, sqlite.verify_chain().expect("the chain reads"));
    assert_eq!(reopened.status().expect("status"), sqlite.status().expect("status"));

    // A round written twice fails, and nothing of it is kept.
    let (state, event) = rounds.last().expect("rounds ran");
    let CoordinatorEvent::RoundCommitted { stats, .. } = event else { unreachable!("checked above") };
    let before = pg_store.status().expect("status");
    let again = pg_store.commit_round(state, stats, 99);
    assert!(matches!(again, Err(StoreError::Inconsistent(_))), "{again:?}");
    assert_eq!(pg_store.status().expect("status"), before);
    assert_eq!(pg_store.verify_chain().expect("the chain reads"), chain);
}

#[test]
fn the_store_section_names_the_key_it_refuses() {
    let dir = Path::new("/nonexistent");
    let err = |section: StoreSection| {
        section.location(dir, Path::new("state.sqlite")).expect_err("refused").to_string()
    };
    let pg = |url: Option<&str>| StoreSection {
        backend: BackendKind::Postgres,
        url: url.map(str::to_owned),
        password_env: None,
        password_file: None,
        tls: None,
        ca_file: None,
    };
    assert!(err(pg(None)).starts_with("store.url: required"), "{}", err(pg(None)));
    let with_password = err(pg(Some("postgres://fedrec:secret@127.0.0.1/fedrec")));
    assert!(with_password.starts_with("store.url: holds a password"), "{with_password}");
    assert!(!with_password.contains("secret"), "the password is never shown: {with_password}");
    let missing_env = err(StoreSection {
        password_env: Some("FEDREC_TEST_SURELY_UNSET_VARIABLE".into()),
        ..pg(Some("postgres://fedrec@127.0.0.1/fedrec"))
    });
    assert!(missing_env.starts_with("store.password_env:"), "{missing_env}");
    let sqlite_with_url = err(StoreSection { backend: BackendKind::Sqlite, ..pg(Some("postgres://x@y/z")) });
    assert!(sqlite_with_url.starts_with("store.url: only for backend"), "{sqlite_with_url}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stand_by_takes_over_after_kill_9_and_never_charges_a_round_twice() {
    let Some(pg) =
        PgServer::start_or_skip("a_stand_by_takes_over_after_kill_9_and_never_charges_a_round_twice")
    else {
        return;
    };
    const N: usize = 24;
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = tmp.path().join("state");
    let url = pg.create_database("failover").expect("a database");
    let state = CoordinatorDir::init_plain(
        &dir,
        &[
            ("n_items = 1000", format!("n_items = {}", SHAPE.n_items)),
            ("dim = 16", "dim = 4".to_owned()),
            ("n_segments = 8", "n_segments = 2".to_owned()),
            ("min_reports = 10", "min_reports = 3".to_owned()),
            ("checkin_window_ms = 30000", "checkin_window_ms = 1000".to_owned()),
            ("report_window_ms = 120000", "report_window_ms = 2000".to_owned()),
            ("round_gap_ms = 1000", "round_gap_ms = 50".to_owned()),
            ("# epsilon = 8.0", "epsilon = 1000.0".to_owned()),
            ("# delta = 1e-6", "delta = 1e-5".to_owned()),
        ],
    );
    let section = pg_section(&pg, &dir, &url);
    let mut text = std::fs::read_to_string(dir.join("fedrec.toml")).expect("init wrote the config");
    text.push_str(&format!(
        "\n[store]\nbackend = \"postgres\"\nurl = \"{url}\"\npassword_file = \"pg.password\"\n"
    ));
    std::fs::write(dir.join("fedrec.toml"), text).expect("writable");
    let tokens = state.enroll(N);
    let cert = state.cert();

    let mut leader = ServeProcess::start(&dir);
    let leader_addr = leader.addr().await;
    let standby = ServeProcess::start(&dir);
    standby.wait_for_line("the stand-by line", |l| l.starts_with("standing by")).await;

    let devices = participate(leader_addr, &cert, &tokens);
    let first = leader.wait_for_line("a commit on the leader", |l| committed_round(l).is_some()).await;
    let first = committed_round(&first).expect("parsed above");
    assert!(
        !standby.lines().iter().any(|l| l.contains("listening on")),
        "the stand-by must not serve while the leader lives: {:#?}",
        standby.lines()
    );
    leader.kill();
    let killed_at = Instant::now();
    for d in &devices {
        d.abort();
    }
    let store = open_pg(&section, &dir);
    let before = store.load_latest().expect("loads").expect("a checkpoint");
    let status_before = store.status().expect("status");
    assert!(status_before.n_rounds_committed > first, "{status_before:?}");

    let standby_addr = standby.addr().await;
    eprintln!("fail-over: the stand-by listens {} ms after kill -9", killed_at.elapsed().as_millis());
    let resume = standby.wait_for_line("the resume line", |l| l.contains("resuming at round")).await;
    assert!(
        resume.contains(&format!("resuming at round {} ", before.next_round)),
        "resumes at the round after the last one recorded ({}): {resume}",
        before.next_round
    );

    let devices = participate(standby_addr, &cert, &tokens);
    let next = standby.wait_for_line("a commit on the new leader", |l| committed_round(l).is_some()).await;
    for d in &devices {
        d.abort();
    }
    assert_eq!(committed_round(&next), Some(before.next_round), "the next round commits with the next index");

    let after = store.load_latest().expect("loads").expect("a checkpoint");
    let (old, new) = after.ledger.entries().split_at(before.ledger.entries().len());
    assert_eq!(old, before.ledger.entries(), "the ledger before the fail-over is unchanged");
    assert!(!new.is_empty() && new.iter().all(|e| e.round >= before.next_round), "{new:?}");
    let rounds: Vec<u64> = after.ledger.entries().iter().map(|e| e.round).collect();
    let mut unique = rounds.clone();
    unique.dedup();
    assert_eq!(rounds, unique, "no round is charged twice");
    assert_eq!(store.verify_chain().expect("the chain reads").broken, None);
}
