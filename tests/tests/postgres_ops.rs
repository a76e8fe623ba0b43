//! Operating the coordinator's PostgreSQL store, on a real PostgreSQL server started by the test: TLS with the server's certificate verified (and plaintext refused by a `hostssl`-only server), and `migrate` from a SQLite store into an empty database, after which `serve` resumes there. Skipped, with a message, where no PostgreSQL can run.

use std::path::{Path, PathBuf};

use fedrec_coordinator::auth::DeviceId;
use fedrec_coordinator::store::{
    BackendKind, PgTarget, Store, StoreError, StoreLocation, StoreOptions, StoreSection, TlsMode,
    migrate_sqlite_to_postgres,
};
use fedrec_shared::ledger::{PrivacyBudget, PrivacyPolicy};
use fedrec_shared::privacy::AccountantKind;
use fedrec_shared::round::{AbandonReason, CoordinatorEvent, CoordinatorState};
use fedrec_tests::postgres::{PgServer, ServeProcess};
use fedrec_tests::store_history::{SHAPE, committed_round, history, participate};
use fedrec_tests::{CoordinatorDir, encode_hex};
use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};

/// A `[store]` section for `url`, its password in `dir/pg.password`.
fn pg_section(
    pg: &PgServer,
    dir: &Path,
    url: &str,
    tls: Option<TlsMode>,
    ca_file: Option<&str>,
) -> StoreSection {
    std::fs::write(dir.join("pg.password"), format!("{}\n", pg.password())).expect("writable");
    StoreSection {
        backend: BackendKind::Postgres,
        url: Some(url.to_owned()),
        password_env: None,
        password_file: Some(PathBuf::from("pg.password")),
        tls,
        ca_file: ca_file.map(PathBuf::from),
    }
}

fn target(section: &StoreSection, dir: &Path) -> PgTarget {
    match section.location(dir, Path::new("unused.sqlite")).expect("a valid [store]") {
        StoreLocation::Postgres(target) => *target,
        other => panic!("not PostgreSQL: {other:?}"),
    }
}

/// A self-signed CA named `name`.
fn ca(name: &str) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().expect("a key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    (params.self_signed(&key).expect("self-signed"), key)
}

/// A server certificate for `names` signed by `ca`: (certificate PEM, key PEM).
fn server_cert(ca: &(Certificate, KeyPair), names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().expect("a key");
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).expect("valid names");
    params.distinguished_name.push(DnType::CommonName, "fedrec test PostgreSQL");
    let cert = params.signed_by(&key, &ca.0, &ca.1).expect("signed");
    (cert.pem(), key.serialize_pem())
}

#[test]
fn tls_require_verifies_the_server_and_a_hostssl_only_server_refuses_plaintext() {
    let name = "tls_require_verifies_the_server_and_a_hostssl_only_server_refuses_plaintext";
    let authority = ca("fedrec test CA");
    let (cert, key) = server_cert(&authority, &["127.0.0.1"]);
    let Some(pg) = PgServer::start_tls_or_skip(name, &cert, &key) else { return };
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = tmp.path();
    std::fs::write(dir.join("ca.pem"), authority.0.pem()).expect("writable");
    std::fs::write(dir.join("other-ca.pem"), ca("another CA").0.pem()).expect("writable");
    let url = pg.create_database("tls").expect("a database");

    // Verified TLS: the store connects, writes and reads back.
    let section = pg_section(&pg, dir, &url, Some(TlsMode::Require), Some("ca.pem"));
    let require = target(&section, dir);
    assert_eq!(require.tls_mode(), TlsMode::Require);
    let mut store = Store::open_postgres(&require, StoreOptions::default()).expect("connects over TLS");
    store.insert_device(DeviceId::from_i64_bits(7), 1_000, Some("over tls")).expect("written");
    let reopened = Store::open_postgres(&require, StoreOptions::default()).expect("connects over TLS");
    let device = reopened.device(DeviceId::from_i64_bits(7)).expect("read").expect("stored");
    assert_eq!((device.enrolled_at_ms, device.label.as_deref()), (1_000, Some("over tls")));

    // A server certificate from a CA not trusted: refused at the handshake.
    let wrong = target(&pg_section(&pg, dir, &url, Some(TlsMode::Require), Some("other-ca.pem")), dir);
    let err = Store::open_postgres(&wrong, StoreOptions::default()).expect_err("an untrusted certificate");
    assert!(matches!(err, StoreError::PostgresConnect { tls: TlsMode::Require, .. }), "{err:?}");
    let text = err.to_string();
    eprintln!("wrong CA: {text}");
    assert!(
        text.contains("store.tls = \"require\"") && text.contains("TLS") && text.contains("UnknownIssuer"),
        "the error says the certificate's issuer is not trusted: {text}"
    );

    // The right CA, but a certificate for another name: refused too.
    let localhost = url.replace("127.0.0.1", "localhost");
    let misnamed = target(&pg_section(&pg, dir, &localhost, Some(TlsMode::Require), Some("ca.pem")), dir);
    let err =
        Store::open_postgres(&misnamed, StoreOptions::default()).expect_err("a certificate for 127.0.0.1");
    assert!(err.to_string().contains("not valid for name \"localhost\""), "{err}");

    // Plaintext against a hostssl-only server: refused by the server.
    let plain = target(&pg_section(&pg, dir, &url, Some(TlsMode::Disable), None), dir);
    let err = Store::open_postgres(&plain, StoreOptions::default()).expect_err("plaintext is refused");
    let text = err.to_string();
    eprintln!("plaintext: {text}");
    assert!(
        text.contains("store.tls = \"disable\"") && text.contains("no encryption"),
        "the error says the server refused an unencrypted session: {text}"
    );
    // A loopback host defaults to plaintext, so that is what the default does here.
    let default = target(&pg_section(&pg, dir, &url, None, None), dir);
    assert_eq!(default.tls_mode(), TlsMode::Disable);
}

#[test]
fn the_tls_keys_default_safely_and_errors_name_the_key() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = tmp.path();
    std::fs::write(dir.join("ca.pem"), ca("fedrec test CA").0.pem()).expect("writable");
    std::fs::write(dir.join("garbage.pem"), "not a certificate\n").expect("writable");
    let section = |url: &str, tls: Option<TlsMode>, ca_file: Option<&str>| StoreSection {
        backend: BackendKind::Postgres,
        url: Some(url.to_owned()),
        password_env: None,
        password_file: None,
        tls,
        ca_file: ca_file.map(PathBuf::from),
    };
    let mode = |s: StoreSection| match s.location(dir, Path::new("x.sqlite")).expect("valid") {
        StoreLocation::Postgres(t) => t.tls_mode(),
        other => panic!("not PostgreSQL: {other:?}"),
    };
    let err = |s: StoreSection| s.location(dir, Path::new("x.sqlite")).expect_err("refused").to_string();

    // Defaults: TLS for a host on the network, plaintext on this machine.
    assert_eq!(mode(section("postgres://fedrec@db.internal/fedrec", None, Some("ca.pem"))), TlsMode::Require);
    assert_eq!(mode(section("postgres://fedrec@10.1.2.3/fedrec", None, Some("ca.pem"))), TlsMode::Require);
    assert_eq!(mode(section("postgres://fedrec@127.0.0.1/fedrec", None, None)), TlsMode::Disable);
    assert_eq!(mode(section("postgres://fedrec@localhost/fedrec", None, None)), TlsMode::Disable);
    assert_eq!(mode(section("host=/run/postgresql user=fedrec dbname=fedrec", None, None)), TlsMode::Disable);
    // The operator may always ask for TLS on loopback.
    assert_eq!(
        mode(section("postgres://fedrec@127.0.0.1/fedrec", Some(TlsMode::Require), Some("ca.pem"))),
        TlsMode::Require
    );

    let e = err(section("postgres://fedrec@db.internal/fedrec?sslmode=disable", None, None));
    assert!(e.starts_with("store.url: sets sslmode"), "{e}");
    let e = err(section("host=/run/postgresql user=fedrec", Some(TlsMode::Require), Some("ca.pem")));
    assert!(e.starts_with("store.tls:"), "{e}");
    let e = err(section("postgres://fedrec@127.0.0.1/fedrec", Some(TlsMode::Disable), Some("ca.pem")));
    assert!(e.starts_with("store.ca_file: only with"), "{e}");
    let e = err(section("postgres://fedrec@db.internal/fedrec", None, Some("missing.pem")));
    assert!(e.starts_with("store.ca_file: cannot read"), "{e}");
    let e = err(section("postgres://fedrec@db.internal/fedrec", None, Some("garbage.pem")));
    assert!(e.starts_with("store.ca_file:"), "{e}");
    let e = err(StoreSection {
        backend: BackendKind::Sqlite,
        url: None,
        ..section("x", Some(TlsMode::Require), None)
    });
    assert!(e.starts_with("store.tls: only for backend"), "{e}");

    // A word that is neither mode, as fedrec.toml would hold it.
    let value = serde_json::json!({ "backend": "postgres", "url": "postgres://a@b/c", "tls": "verify" });
    let e = serde_json::from_value::<StoreSection>(value).expect_err("refused").to_string();
    assert!(e.contains("store.tls: expected \"disable\" or \"require\""), "{e}");
}

fn commit(store: &mut Store, (state, event): &(CoordinatorState, CoordinatorEvent), at_ms: u64) {
    let CoordinatorEvent::RoundCommitted { stats, .. } = event else { panic!("not committed: {event:?}") };
    store.commit_round(state, stats, at_ms).expect("commits");
}

fn sha256(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("readable");
    ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref().to_vec()
}

#[test]
fn migrate_copies_every_table_checks_the_chain_head_and_refuses_a_non_empty_target() {
    let Some(pg) = PgServer::start_or_skip(
        "migrate_copies_every_table_checks_the_chain_head_and_refuses_a_non_empty_target",
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = tmp.path();
    let sqlite_path = dir.join("state.sqlite");

    // A SQLite store with something in every table: central and distributed charges, an
    // abandoned round, a budget set then raised, devices enrolled and revoked.
    let (initial, rounds) = history(2, 2);
    let (last, earlier) = rounds.split_last().expect("rounds ran");
    let mut sqlite = Store::open(&sqlite_path).expect("sqlite opens");
    let budget = PrivacyBudget::new(4.0, 1e-5).expect("valid");
    sqlite
        .set_budget(PrivacyPolicy { budget, accountant: AccountantKind::Rdp }, "initial budget", 1)
        .expect("set");
    sqlite.save_initial(&initial, 2).expect("saved");
    for (k, round) in earlier.iter().enumerate() {
        commit(&mut sqlite, round, 10 + k as u64);
    }
    let CoordinatorEvent::RoundCommitted { stats, .. } = &last.1 else { panic!("not committed") };
    let mut abandoned = stats.clone();
    abandoned.round = last.0.next_round + 5;
    sqlite.record_abandoned(&abandoned, AbandonReason::TooFewReports, 20).expect("recorded");
    let raised = PrivacyBudget::new(6.0, 1e-5).expect("valid");
    sqlite
        .set_budget(PrivacyPolicy { budget: raised, accountant: AccountantKind::Rdp }, "more rounds", 21)
        .expect("raised");
    for k in 0..5u8 {
        sqlite
            .insert_device(DeviceId::from_i64_bits(-3 + i64::from(k)), 30, Some(&format!("d{k}")))
            .expect("enrolled");
    }
    sqlite.revoke_device(DeviceId::from_i64_bits(-2), 31).expect("revoked");
    let before = sqlite.verify_chain().expect("the chain reads");
    let state_before = sqlite.load_latest().expect("loads").expect("a checkpoint");
    drop(sqlite);
    let file_before = sha256(&sqlite_path);

    let url = pg.create_database("migrated").expect("a database");
    let section = pg_section(&pg, dir, &url, None, None);
    let target = target(&section, dir);
    let t = std::time::Instant::now();
    let report = migrate_sqlite_to_postgres(&sqlite_path, &target).expect("migrates");
    eprintln!("migrate: {} ms", t.elapsed().as_millis());
    assert_eq!(report.head, before.head(), "the chain head is SQLite's");
    assert_eq!(sha256(&sqlite_path), file_before, "the SQLite file is untouched");

    let sqlite = Store::open(&sqlite_path).expect("sqlite opens");
    let mut copy = Store::open_postgres(&target, StoreOptions::default()).expect("opens");
    assert_eq!(copy.verify_chain().expect("reads"), before, "the same chains, row for row");
    let resumed = copy.load_latest().expect("loads").expect("a checkpoint");
    assert_eq!(resumed, state_before);
    assert_eq!(resumed.next_round, abandoned.round + 1, "resumes after the abandoned round");
    assert_eq!((resumed.ledger.entries().len(), resumed.ledger.ddp_entries().len()), (2, 1));
    assert_eq!(copy.status().expect("status"), sqlite.status().expect("status"));
    assert_eq!(copy.budget().expect("reads"), sqlite.budget().expect("reads"));
    assert_eq!(copy.list_devices().expect("reads"), sqlite.list_devices().expect("reads"));
    assert_eq!(copy.audit_log(1000).expect("reads"), sqlite.audit_log(1000).expect("reads"));
    assert_eq!(report.status, copy.status().expect("status"));
    assert_eq!((report.n_budget_rows, report.next_round), (2, Some(resumed.next_round)));

    // The copy is a working store: the next round commits there and extends the chain, and
    // the next audit line follows the copied ones.
    commit(&mut copy, last, 40);
    let after = copy.verify_chain().expect("reads");
    assert_eq!(after.broken, None);
    assert_eq!(after.ledger_hashes[..before.ledger_hashes.len()], before.ledger_hashes[..]);
    assert_eq!(after.ledger_hashes.len(), before.ledger_hashes.len() + 1);
    let audit = copy.audit_log(1000).expect("reads");
    let ids: Vec<u64> = audit.iter().map(|a| a.id).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "audit ids continue: {ids:?}");

    // A second migration into the now non-empty database is refused, and writes nothing.
    let status = copy.status().expect("status");
    let err = migrate_sqlite_to_postgres(&sqlite_path, &target).expect_err("not empty");
    assert!(matches!(err, StoreError::TargetNotEmpty { .. }), "{err:?}");
    assert!(err.to_string().contains("not empty"), "{err}");
    assert_eq!(copy.status().expect("status"), status);
    assert_eq!(copy.verify_chain().expect("reads"), after);
    assert_eq!(sha256(&sqlite_path), file_before, "the SQLite file is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_sqlite_then_migrate_then_serve_on_postgres_resumes_with_the_same_ledger() {
    let Some(pg) = PgServer::start_or_skip(
        "serve_on_sqlite_then_migrate_then_serve_on_postgres_resumes_with_the_same_ledger",
    ) else {
        return;
    };
    const N: usize = 24;
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = tmp.path().join("state");
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
    let tokens = state.enroll(N);
    let cert = state.cert();

    // History in SQLite: a serve commits at least two rounds, then dies.
    let mut sqlite_serve = ServeProcess::start(&dir);
    let addr = sqlite_serve.addr().await;
    let devices = participate(addr, &cert, &tokens);
    sqlite_serve
        .wait_for_line("a second commit on SQLite", |l| committed_round(l).is_some_and(|r| r >= 1))
        .await;
    sqlite_serve.kill();
    for d in &devices {
        d.abort();
    }
    let sqlite_path = dir.join("state.sqlite");
    let (before, chain_before, status_before, devices_before) = {
        let sqlite = Store::open(&sqlite_path).expect("sqlite opens");
        (
            sqlite.load_latest().expect("loads").expect("a checkpoint"),
            sqlite.verify_chain().expect("reads"),
            sqlite.status().expect("status"),
            sqlite.list_devices().expect("reads"),
        )
    };
    assert!(status_before.n_rounds_committed >= 2, "{status_before:?}");
    let file_before = sha256(&sqlite_path);

    // migrate: the copy checked, the head printed, the lines to switch printed.
    let url = pg.create_database("served").expect("a database");
    std::fs::write(dir.join("pg.password"), format!("{}\n", pg.password())).expect("writable");
    let out = state.command(&["migrate", "--to", &url, "--password-file", "pg.password"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "migrate failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}");
    let head = encode_hex(&chain_before.head());
    assert!(stdout.contains(&format!("ledger head: {head}")), "prints SQLite's head {head}: {stdout}");
    assert!(stdout.contains(&format!("serve resumes at round {}", before.next_round)), "{stdout}");
    assert_eq!(sha256(&sqlite_path), file_before, "the SQLite file is untouched");

    // Refused the second time, naming the reason; nothing written.
    let again = state.command(&["migrate", "--to", &url, "--password-file", "pg.password"]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("not empty"), "{stderr}");

    // Switch fedrec.toml with exactly the printed lines.
    let lines = &stdout[stdout.find("[store]").expect("prints a [store] section")..];
    let mut text = std::fs::read_to_string(dir.join("fedrec.toml")).expect("init wrote the config");
    text.push('\n');
    text.push_str(lines);
    std::fs::write(dir.join("fedrec.toml"), text).expect("writable");

    let section = pg_section(&pg, &dir, &url, None, None);
    let copy = Store::open_postgres(&target(&section, &dir), StoreOptions::default()).expect("opens");
    assert_eq!(copy.load_latest().expect("loads").expect("a checkpoint"), before);
    assert_eq!(copy.verify_chain().expect("reads"), chain_before);
    assert_eq!(copy.status().expect("status"), status_before);
    assert_eq!(copy.list_devices().expect("reads"), devices_before);

    // serve on PostgreSQL resumes at the next round, and that round commits.
    let pg_serve = ServeProcess::start(&dir);
    let addr = pg_serve.addr().await;
    let resume = pg_serve.wait_for_line("the resume line", |l| l.contains("resuming at round")).await;
    assert!(resume.contains(&format!("resuming at round {} ", before.next_round)), "{resume}");
    assert!(pg_serve.lines().iter().any(|l| l.starts_with("leading")), "{:#?}", pg_serve.lines());
    let devices = participate(addr, &cert, &tokens);
    let next = pg_serve.wait_for_line("a commit on PostgreSQL", |l| committed_round(l).is_some()).await;
    for d in &devices {
        d.abort();
    }
    assert_eq!(committed_round(&next), Some(before.next_round));
    let after = copy.load_latest().expect("loads").expect("a checkpoint");
    let (old, new) = after.ledger.entries().split_at(before.ledger.entries().len());
    assert_eq!(old, before.ledger.entries(), "the migrated ledger is kept");
    assert!(!new.is_empty() && new.iter().all(|e| e.round >= before.next_round), "{new:?}");
    assert_eq!(copy.verify_chain().expect("reads").broken, None);
}
