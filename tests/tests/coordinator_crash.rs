//! The real `fedrec-coordinator` binary under stress on loopback QUIC: killed with SIGKILL in the middle of a round it resumes from its store without double-charging the privacy ledger; devices that vanish after being selected do not block a round with enough reports; bad uploads and an oversize frame are refused with the right error codes while a good device completes its round.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedrec_client::net::{Device, Participation};
use fedrec_shared::round::ClientOutcome;
use fedrec_shared::wire::{ALPN, ErrorCode, LEN_PREFIX, Limits, Request, Response, Upload};
use fedrec_shared::{ModelShape, Rating};
use fedrec_tests::{CoordinatorDir, CoordinatorProcess, WAIT, low_rank_ratings, ratings_by_user};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const N_ITEMS: usize = 40;
const SHAPE: ModelShape = ModelShape { n_items: N_ITEMS, dim: 4, n_segments: 2 };
/// Pacing between a device's attempts (not a wait for a condition).
const PACE: Duration = Duration::from_millis(20);

/// The round settings a test writes into `fedrec.toml`.
struct Settings {
    q: f64,
    min_reports: usize,
    checkin_window_ms: u64,
    report_window_ms: u64,
    /// Noise multiplier; with noise a budget of ε = 1000, δ = 1e-5 is set.
    noise: f32,
}

/// `init`s a state directory with `settings`, enrolls `n_devices` and returns it with the tokens.
fn prepare(dir: &Path, settings: &Settings, n_devices: usize) -> (CoordinatorDir, Vec<Vec<u8>>) {
    let mut edits = vec![
        ("n_items = 1000", format!("n_items = {N_ITEMS}")),
        ("dim = 16", "dim = 4".to_owned()),
        ("n_segments = 8", "n_segments = 2".to_owned()),
        ("q = 0.5", format!("q = {:?}", settings.q)),
        ("min_reports = 10", format!("min_reports = {}", settings.min_reports)),
        ("checkin_window_ms = 30000", format!("checkin_window_ms = {}", settings.checkin_window_ms)),
        ("report_window_ms = 120000", format!("report_window_ms = {}", settings.report_window_ms)),
        ("round_gap_ms = 1000", "round_gap_ms = 50".to_owned()),
        ("noise_multiplier = 1.0", format!("noise_multiplier = {:?}", settings.noise)),
    ];
    if settings.noise > 0.0 {
        edits.push(("# epsilon = 8.0", "epsilon = 1000.0".to_owned()));
        edits.push(("# delta = 1e-6", "delta = 1e-5".to_owned()));
    }
    let state = CoordinatorDir::init_plain(dir, &edits);
    let tokens = state.enroll(n_devices);
    (state, tokens)
}

/// The `round N committed: …` lines `serve` has written so far.
fn committed(serve: &CoordinatorProcess) -> Vec<Commit> {
    serve.lines().iter().filter_map(|l| Commit::parse(l)).collect()
}

/// The number right before `word` in `line` (`"12 reported"`).
fn number_before(line: &str, word: &str) -> Option<u64> {
    let words: Vec<&str> =
        line.split(|c: char| c.is_whitespace() || c == ',' || c == ':').filter(|w| !w.is_empty()).collect();
    let at = words.iter().position(|w| *w == word)?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

/// The number right after `word` in `line` (`"round 3"`).
fn number_after(line: &str, word: &str) -> Option<u64> {
    let words: Vec<&str> =
        line.split(|c: char| c.is_whitespace() || c == ',' || c == ':').filter(|w| !w.is_empty()).collect();
    let at = words.iter().position(|w| *w == word)?;
    words.get(at + 1)?.parse().ok()
}

/// A `round N committed: …` line.
#[derive(Debug, Clone, Copy)]
struct Commit {
    round: u64,
    /// Reports and dropouts: logged only for rounds without noise (a noised round's exact
    /// counts are not released, issue 10).
    reported: Option<u64>,
    dropped: Option<u64>,
}

impl Commit {
    fn parse(line: &str) -> Option<Commit> {
        if !line.contains(" committed") {
            return None;
        }
        Some(Commit {
            round: number_after(line, "round")?,
            reported: number_before(line, "reported"),
            dropped: number_before(line, "dropped"),
        })
    }
}

/// What `status --dir` reports.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Status {
    committed: u64,
    model_version: u64,
    ledger: u64,
}

fn status(state: &CoordinatorDir) -> Status {
    let text = state.run(&["status"]);
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("status has {name:?}: {text}"))
    };
    Status {
        committed: field("rounds committed:"),
        model_version: field("last model version:"),
        ledger: field("ledger entries:"),
    }
}

type LedgerRow = (i64, f64, f64, Option<f64>);

/// The `ledger` table, read-only.
fn ledger_rows(state: &CoordinatorDir) -> Vec<LedgerRow> {
    let db = rusqlite::Connection::open_with_flags(
        state.path().join("state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("the store opens read-only");
    let mut stmt = db
        .prepare("SELECT round, q, noise_multiplier, clip_bits_noise FROM ledger ORDER BY round")
        .expect("the ledger table exists");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .expect("readable")
        .collect::<Result<_, _>>()
        .expect("rows decode")
}

fn ratings(n_users: usize) -> Vec<Vec<Rating>> {
    ratings_by_user(n_users, low_rank_ratings(n_users, N_ITEMS, 3, 12, 0.1, 11))
}

fn device(serve: &CoordinatorProcess, token: Vec<u8>) -> Device {
    serve.device(token, SHAPE, Duration::from_secs(5))
}

/// Well-behaved devices participating in a loop; each acknowledged upload's round is sent on `acks`.
fn well_behaved(
    serve: &CoordinatorProcess,
    tokens: &[Vec<u8>],
    data: &[Vec<Rating>],
    acks: &mpsc::UnboundedSender<u64>,
) -> Vec<JoinHandle<()>> {
    tokens
        .iter()
        .zip(data)
        .map(|(token, train)| {
            let mut device = device(serve, token.clone());
            let (train, acks) = (train.clone(), acks.clone());
            tokio::spawn(async move {
                loop {
                    let pause = match device.participate(&train).await {
                        Ok(Participation::Outcome(ClientOutcome::Completed { round, .. })) => {
                            let _ = acks.send(round);
                            PACE
                        }
                        Ok(Participation::NotSelected { retry_after }) => retry_after.min(PACE * 3),
                        _ => PACE,
                    };
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect()
}

fn abort(tasks: &[JoinHandle<()>]) {
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_round_resumes_without_double_counting() {
    const N: usize = 30;
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = tmp.path().join("state");
    let settings =
        Settings { q: 0.5, min_reports: 3, checkin_window_ms: 1000, report_window_ms: 2000, noise: 1.0 };
    let (state, tokens) = prepare(&dir, &settings, N);
    let data = ratings(N);

    let mut first = state.serve().await;
    let (acks_tx, mut acks) = mpsc::unbounded_channel();
    let devices = well_behaved(&first, &tokens, &data, &acks_tx);
    first.wait_for("three commits", |l| l.iter().filter(|l| Commit::parse(l).is_some()).count() >= 3).await;
    // Kill at the next acknowledged upload: a round is open and devices are uploading.
    while acks.try_recv().is_ok() {}
    let acked = tokio::time::timeout(WAIT, acks.recv())
        .await
        .expect("an upload is acknowledged")
        .expect("devices run");
    first.kill();
    abort(&devices);
    let seen = committed(&first);
    assert!(seen.len() >= 3);

    let before = status(&state);
    assert!(before.committed >= seen.len() as u64, "{before:?} vs {seen:?}");
    assert_eq!(before.ledger, before.committed, "every committed round was charged once");
    assert_eq!(before.model_version, before.committed, "one model version per commit");
    let rows_before = ledger_rows(&state);
    assert_eq!(rows_before.len() as u64, before.ledger);
    eprintln!("killed during round {acked} after {before:?}");

    let mut second = state.serve().await;
    let resume = second.wait_for_line("the resume line", |l| l.contains("resuming at round")).await;
    let next_round = number_after(&resume, "round").expect("a round index");
    let version = number_after(&resume, "version").expect("a model version");
    assert!(next_round + 1 > before.committed, "resumes after the committed rounds: {resume}");
    assert_eq!(version, before.model_version, "{resume}");

    let devices = well_behaved(&second, &tokens, &data, &acks_tx);
    second
        .wait_for("two more commits", |l| l.iter().filter(|l| Commit::parse(l).is_some()).count() >= 2)
        .await;
    second.terminate().await;
    abort(&devices);
    let seen = committed(&second);
    assert!(seen.iter().all(|c| c.round >= next_round), "{seen:?}");

    let after = status(&state);
    let new_commits = after.committed - before.committed;
    assert!(new_commits >= 2 && new_commits >= seen.len() as u64, "{before:?} → {after:?}");
    assert_eq!(after.ledger - before.ledger, new_commits, "one ledger entry per new commit");
    assert_eq!(after.model_version, before.model_version + new_commits);
    let rows_after = ledger_rows(&state);
    assert_eq!(rows_after.len() as u64, after.ledger);
    let (old, new) = rows_after.split_at(rows_before.len());
    assert_eq!(old, rows_before.as_slice(), "the ledger before the crash is unchanged");
    assert!(new.iter().all(|r| r.0 >= next_round as i64), "new charges are for new rounds: {new:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_that_vanish_after_selection_do_not_block_a_round() {
    const GOOD: usize = 2;
    const VANISH: usize = 3;
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = tmp.path().join("state");
    // Everyone who checks in is selected; two reports are enough.
    let settings =
        Settings { q: 1.0, min_reports: 2, checkin_window_ms: 1000, report_window_ms: 1200, noise: 0.0 };
    let (state, tokens) = prepare(&dir, &settings, GOOD + VANISH);
    let data = ratings(GOOD);
    let serve = state.serve().await;

    let (acks_tx, _acks) = mpsc::unbounded_channel();
    let mut tasks = well_behaved(&serve, &tokens[..GOOD], &data, &acks_tx);
    // Rounds in which each vanishing device was selected (and then went away).
    let vanished: Arc<Mutex<HashMap<u64, usize>>> = Arc::default();
    for token in &tokens[GOOD..] {
        let device = device(&serve, token.clone());
        let vanished = Arc::clone(&vanished);
        tasks.push(tokio::spawn(async move {
            let mut last = None;
            loop {
                if let Ok(session) = device.connect().await {
                    if let Ok(Response::Task(task)) =
                        session.request(&Request::CheckIn(device.check_in())).await
                        && last != Some(task.round)
                    {
                        last = Some(task.round);
                        *vanished.lock().expect("not poisoned").entry(task.round).or_default() += 1;
                    }
                    // Gone without uploading.
                    session.close();
                }
                tokio::time::sleep(PACE).await;
            }
        }));
    }

    let lines = serve
        .wait_for("a commit of a round all vanishing devices were selected for", |lines| {
            let vanished = vanished.lock().expect("not poisoned");
            lines.iter().filter_map(|l| Commit::parse(l)).any(|c| vanished.get(&c.round) == Some(&VANISH))
        })
        .await;
    abort(&tasks);
    let vanished = vanished.lock().expect("not poisoned").clone();
    let commit = lines
        .iter()
        .filter_map(|l| Commit::parse(l))
        .find(|c| vanished.get(&c.round) == Some(&VANISH))
        .expect("found above");
    let (reported, dropped) = commit.reported.zip(commit.dropped).expect("counts are logged without noise");
    assert!(dropped >= VANISH as u64, "the vanished devices count as dropped: {commit:?}");
    assert!(reported >= settings.min_reports as u64, "{commit:?}");
    assert!(status(&state).committed >= 1);
}

/// Sends a length prefix above the coordinator's request limit on a raw QUIC stream and
/// returns the coordinator's answer.
async fn oversize_frame(addr: SocketAddr, cert: Vec<u8>) -> Response {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(cert)).expect("a valid certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("a QUIC TLS config");
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("binds");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let exchange = async {
        let conn = endpoint.connect(addr, "localhost").expect("a valid address").await.expect("connects");
        let (mut send, mut recv) = conn.open_bi().await.expect("a stream");
        let limits = Limits::for_shape(&SHAPE);
        let len = u32::try_from(limits.max_request() + 1).expect("the limit fits a u32");
        send.write_all(&len.to_le_bytes()).await.expect("the prefix is sent");
        let _ = send.finish();
        let frame = recv.read_to_end(64 * 1024).await.expect("an answer");
        assert!(frame.len() >= LEN_PREFIX, "a framed answer");
        let response = fedrec_shared::wire::decode_response(&frame[LEN_PREFIX..], &limits).expect("decodes");
        conn.close(0u32.into(), b"done");
        response
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("answered in time")
}

fn code(response: &Response) -> Option<ErrorCode> {
    match response {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_while_a_good_device_completes_its_round() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = tmp.path().join("state");
    let settings =
        Settings { q: 0.5, min_reports: 1, checkin_window_ms: 1000, report_window_ms: 1000, noise: 0.0 };
    let (state, tokens) = prepare(&dir, &settings, 2);
    let data = ratings(1);
    let serve = state.serve().await;
    let update_len = SHAPE.layout().len();

    let (acks_tx, mut acks) = mpsc::unbounded_channel();
    let good = well_behaved(&serve, &tokens[..1], &data, &acks_tx);

    let bad = device(&serve, tokens[1].clone());
    let upload = |round: u64, update: Vec<f32>| {
        Request::Upload(Upload {
            round,
            update,
            within_bound: None,
            nonce: bad.nonce().expect("the RNG works"),
        })
    };
    let (mut not_selected, mut wrong_shape, mut non_finite) = (false, false, false);
    let mut selected_in = HashSet::new();
    let probing = async {
        while !(not_selected && wrong_shape && non_finite) {
            let session = bad.connect().await.expect("connects");
            match session.request(&Request::CheckIn(bad.check_in())).await.expect("answered") {
                Response::Task(task) => {
                    selected_in.insert(task.round);
                    // Selected: a short update, then one holding NaN.
                    let short = session
                        .request(&upload(task.round, vec![0.0; update_len - 1]))
                        .await
                        .expect("answered");
                    match code(&short) {
                        Some(ErrorCode::WrongShape) => wrong_shape = true,
                        // The round closed in between.
                        Some(ErrorCode::WrongRound | ErrorCode::WrongPhase) => {}
                        None if matches!(short, Response::Aborted { .. }) => {}
                        _ => panic!("a short update must be refused with WrongShape: {short:?}"),
                    }
                    let mut nan = vec![0.0; update_len];
                    nan[1] = f32::NAN;
                    let nan = session.request(&upload(task.round, nan)).await.expect("answered");
                    match code(&nan) {
                        Some(ErrorCode::NonFinite) => non_finite = true,
                        Some(ErrorCode::WrongRound | ErrorCode::WrongPhase) => {}
                        None if matches!(nan, Response::Aborted { .. }) => {}
                        _ => panic!("a NaN update must be refused with NonFinite: {nan:?}"),
                    }
                }
                // A device selected for `round` that checks in again is told `NotSelected` but
                // stays selected: only probe rounds it was never selected for.
                Response::NotSelected { round, .. } if !selected_in.contains(&round) => {
                    // Not selected for `round` (or no round is open): a well-formed upload for it.
                    let r = session.request(&upload(round, vec![0.0; update_len])).await.expect("answered");
                    match code(&r) {
                        Some(ErrorCode::NotSelected) => not_selected = true,
                        Some(ErrorCode::WrongRound) => {}
                        None if matches!(r, Response::Aborted { .. }) => {}
                        _ => panic!("an upload for a round the device was not selected for: {r:?}"),
                    }
                }
                // The round this device was selected for (and never reported in) was abandoned.
                Response::NotSelected { .. } | Response::Aborted { .. } => {}
                other => panic!("unexpected answer to a check-in: {other:?}"),
            }
            session.close();
            tokio::time::sleep(PACE).await;
        }
    };
    tokio::time::timeout(WAIT, probing).await.expect("every bad upload was tried within the time limit");

    let oversize = oversize_frame(serve.addr(), state.cert()).await;
    assert_eq!(code(&oversize), Some(ErrorCode::TooLarge), "{oversize:?}");

    // The good device's round commits despite all of that.
    let round =
        tokio::time::timeout(WAIT, acks.recv()).await.expect("an upload is acknowledged").expect("runs");
    serve
        .wait_for("the good device's round to commit", |l| {
            l.iter()
                .filter_map(|l| Commit::parse(l))
                .any(|c| c.round >= round && c.reported.is_some_and(|r| r >= 1))
        })
        .await;
    abort(&good);
    assert!(status(&state).committed >= 1);
}
