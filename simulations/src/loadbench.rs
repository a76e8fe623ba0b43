//! The load benchmark: many devices against a `fedrec-coordinator` process over loopback QUIC, next to a raw quinn transfer of the same bytes.
//!
//! The coordinator runs as its own process (`fedrec-coordinator init`, `enroll`, `serve` in a
//! temporary state directory, with first-come selection and no noise), so its peak memory is
//! its own `VmHWM`. Every device checks in, trains and uploads at once, each participation on
//! its own QUIC connection from its own endpoint. A round is timed from the first check-in to
//! the coordinator's report of the commit (which includes writing the round to SQLite).
//!
//! The raw baseline then repeats each round's traffic with no fedrec logic: an in-process
//! quinn server (its own tokio runtime, as many workers as the coordinator's) and the same
//! number of endpoints, connections and streams, carrying frames of the sizes fedrec's wire
//! format gives the check-in, the task with the model, the upload and the acknowledgement.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant as WallClock};

use anyhow::{Context, bail};
use fedrec_client::net;
use fedrec_coordinator::server;
use fedrec_shared::round::{ClientRound, Instant, ServerMessage, Task, TaskPrivacy};
use fedrec_shared::wire::{self, LEN_PREFIX, Request, Response};
use fedrec_shared::{GlobalModel, Rating, RoundModel};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::federation::{AggregationKind, ObjectiveKind, OptimizerKind, RunConfig};
use crate::fleet::{decode_token, fleet_rounds};
use crate::quic::{DEVICES_PER_ENDPOINT, Fleet, Target, runtime};

/// Longest wait for a device's answer, a coordinator round, or the coordinator's start.
const TIMEOUT: Duration = Duration::from_secs(120);

/// What the load benchmark needs besides the run configuration.
#[derive(Debug, Clone)]
pub struct LoadParams {
    /// The `fedrec-coordinator` binary.
    pub coordinator_bin: PathBuf,
    /// Worker threads of the devices' runtime (the training and the client side of QUIC).
    pub device_threads: usize,
    /// Most devices (and raw connections) under way at once.
    pub in_flight: usize,
}

/// Byte sizes of the four frames of a participation, as fedrec's wire format encodes them.
#[derive(Debug, Clone, Copy)]
struct Frames {
    check_in: usize,
    task: usize,
    not_selected: usize,
    upload: usize,
    ack: usize,
}

impl Frames {
    fn json(&self) -> Value {
        json!({"check_in": self.check_in, "task": self.task, "not_selected": self.not_selected,
               "upload": self.upload, "ack": self.ack})
    }
}

/// Timings of one transport's rounds.
#[derive(Debug, Default)]
struct Series {
    seconds: Vec<f64>,
    updates: Vec<usize>,
}

impl Series {
    fn median_seconds(&self) -> f64 {
        let mut s = self.seconds.clone();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn updates_per_second(&self) -> f64 {
        self.updates.iter().sum::<usize>() as f64 / self.seconds.iter().sum::<f64>().max(1e-9)
    }

    fn json(&self) -> Value {
        let median = self.median_seconds();
        json!({
            "round_seconds": self.seconds,
            "median_round_seconds": median,
            "rounds_per_minute": 60.0 / median,
            "device_updates": self.updates,
            "device_updates_per_second": self.updates_per_second(),
        })
    }
}

/// Runs the benchmark on `train` (one device per entry) and returns its JSON report.
pub fn run(
    train: &[Vec<Rating>],
    cfg: &RunConfig,
    model: &GlobalModel,
    p: &LoadParams,
) -> anyhow::Result<Value> {
    if cfg.noise_multiplier > 0.0 || cfg.epsilon.is_some() || cfg.adaptive_clip || cfg.dropout > 0.0 {
        bail!("the QUIC load benchmark runs first-come rounds without noise, adaptive clipping or dropouts");
    }
    let n = train.len();
    let cohort = n;
    if cfg.clients_per_round != n {
        // Devices go at once: a smaller cohort could commit before the last check-ins (which
        // would land in the next round), a larger one would never fill.
        bail!("the QUIC load benchmark selects every device in every round: leave out --clients-per-round");
    }
    let dir = tempfile::tempdir().context("creating a state directory")?;
    let coordinator = Coordinator::start(&p.coordinator_bin, dir.path(), cfg, model, n)?;
    let rt = runtime(p.device_threads, "fedrec-device")?;
    let target = Target {
        addr: coordinator.addr,
        server_name: "localhost".into(),
        cert: coordinator.cert.clone(),
        shape: model.shape(),
    };
    let fleet = Arc::new(Fleet::new(target, coordinator.tokens.clone(), Arc::from(train.to_vec()), TIMEOUT));
    let frames = rt.block_on(frames(&fleet, cfg, model))?;
    let order: Vec<usize> = (0..n).collect();
    let mut fedrec = Series::default();
    let mut errors = Vec::new();
    let mut lost = Vec::new();
    // The devices' CPU: everything this process does during fedrec's rounds (training, QUIC,
    // the SDK's steps and, in a secure round, their cryptography), which on one machine
    // competes with the coordinator for the same cores.
    let devices_cpu_start = cpu_seconds(std::process::id());
    fleet_rounds(&rt, &fleet, &order, cfg.rounds, p.in_flight, |round, out, fleet_seconds| {
        if let Some(e) = &out.first_error {
            eprintln!("round {}: {} devices failed; the first: {e}", round + 1, out.n_errors);
        }
        let t0 = WallClock::now();
        coordinator.wait_close(round)?;
        let seconds = fleet_seconds + t0.elapsed().as_secs_f64();
        fedrec.seconds.push(seconds);
        fedrec.updates.push(out.report.n_completed);
        lost.push(out.n_errors);
        if let Some(e) = &out.first_error {
            errors.push(json!({"round": round + 1, "n_errors": out.n_errors, "first": e}));
        }
        eprintln!(
            "round {}: {} of {} devices uploaded in {seconds:.3} s ({} errors)",
            round + 1,
            out.report.n_completed,
            n,
            out.n_errors
        );
        Ok(())
    })?;
    let devices_cpu = devices_cpu_start.zip(cpu_seconds(std::process::id())).map(|(a, b)| b - a);
    let coordinator_stats = coordinator.stop()?;
    let handshakes = coordinator_stats["handshakes"].as_u64().unwrap_or(0);
    let fedrec_seconds: f64 = fedrec.seconds.iter().sum();
    drop(rt);
    let raw = raw_quinn(n, cfg.rounds, frames, p)?;
    let (f, r) = (fedrec.updates_per_second(), raw.updates_per_second());
    Ok(json!({
        "command": "bench",
        "transport": "quic",
        "fedrec_version": env!("CARGO_PKG_VERSION"),
        "devices": n,
        "cohort": cohort,
        "rounds": cfg.rounds,
        "shape": {"n_items": model.shape().n_items, "dim": model.shape().dim, "n_segments": model.shape().n_segments},
        "available_parallelism": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "device_threads": p.device_threads,
        "in_flight": p.in_flight,
        "frame_bytes": frames.json(),
        "bytes_per_round": n * (frames.check_in + frames.task + frames.upload + frames.ack),
        "coordinator": coordinator_stats,
        "simulator_peak_rss_bytes": vm_hwm(std::process::id()),
        "devices_cpu_seconds": devices_cpu,
        "fedrec": fedrec.json(),
        "devices_lost_per_round": lost,
        "handshakes_per_second": handshakes as f64 / fedrec_seconds,
        "errors": errors,
        "raw_quinn": raw.json(),
        "fedrec_over_raw_throughput": f / r,
    }))
}

/// The frames of a participation: encoded from a real check-in, task, upload and answers.
async fn frames(fleet: &Fleet, cfg: &RunConfig, model: &GlobalModel) -> anyhow::Result<Frames> {
    let device = fleet.device(0)?;
    let check_in = device.check_in();
    let task = Task {
        round: 0,
        train: cfg.train_params(),
        clip_norm: cfg.clip_norm,
        report_clip_bit: false,
        report_window: Duration::from_secs(600),
        privacy: TaskPrivacy::undeclared(cfg.clip_norm),
    };
    let selected = ServerMessage::Selected { task, model: Arc::new(RoundModel::new(0, model.clone())) };
    let ratings = fleet.ratings(0);
    let mut round = ClientRound::new(ratings, Instant::from_micros(u64::MAX));
    let _check_in = round.poll_transmit();
    round.handle_message(Instant::ZERO, selected.clone());
    let upload = round.poll_transmit().context("device 0 could not train on the initial model")?;
    let retry = Duration::from_secs(1);
    let len = |frame: Result<Vec<u8>, wire::WireError>| frame.map(|f| f.len());
    Ok(Frames {
        check_in: len(wire::encode(&Request::CheckIn(check_in.clone())))?,
        task: len(wire::encode(&Response::from_server_message(&selected, None, retry)))?,
        not_selected: len(wire::encode(&Response::from_server_message(
            &ServerMessage::NotSelected { round: 0 },
            None,
            retry,
        )))?,
        upload: len(wire::encode(&Request::from_client_message(&upload, &check_in, device.nonce()?)))?,
        ack: len(wire::encode(&Response::from_server_message(
            &ServerMessage::Ack { round: 0 },
            None,
            retry,
        )))?,
    })
}

/// A `fedrec-coordinator serve` process and what the devices need to reach it.
struct Coordinator {
    child: Child,
    addr: SocketAddr,
    cert: Vec<u8>,
    tokens: Vec<Vec<u8>>,
    /// Round closes, as the process reports them on standard error.
    closes: mpsc::Receiver<String>,
    /// Its Prometheus endpoint.
    metrics: SocketAddr,
}

impl Coordinator {
    /// Initialises a state directory for this benchmark, enrolls `n` devices and serves.
    fn start(bin: &Path, dir: &Path, cfg: &RunConfig, model: &GlobalModel, n: usize) -> anyhow::Result<Self> {
        let run = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
            let out = Command::new(bin)
                .args(args)
                .arg("--dir")
                .arg(dir)
                .output()
                .with_context(|| format!("cannot start {}", bin.display()))?;
            if !out.status.success() {
                bail!("fedrec-coordinator {} failed:\n{}", args[0], String::from_utf8_lossy(&out.stderr));
            }
            Ok(out.stdout)
        };
        run(&["init"])?;
        std::fs::write(dir.join("fedrec.toml"), config_file(cfg, model, n))
            .context("writing the coordinator's configuration")?;
        let tokens = String::from_utf8(run(&["enroll", "--count", &n.to_string()])?)
            .context("the enrolled tokens are not text")?
            .lines()
            .map(decode_token)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cert = std::fs::read(dir.join("cert.der")).context("reading the coordinator's certificate")?;
        let mut child = Command::new(bin)
            .args(["serve", "--dir"])
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting fedrec-coordinator serve")?;
        let stderr = child.stderr.take().context("the coordinator's standard error")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let (mut addr, mut metrics) = (None, None);
        let (addr, metrics) = loop {
            if let (Some(a), Some(m)) = (addr, metrics) {
                break (a, m);
            }
            match rx.recv_timeout(TIMEOUT) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("listening on ") {
                        addr = Some(a.trim().parse().context("the coordinator's address")?);
                    } else if let Some(a) = line.strip_prefix("metrics on ") {
                        metrics = Some(a.trim().parse().context("the coordinator's metrics address")?);
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    bail!("fedrec-coordinator serve did not start listening");
                }
            }
        };
        Ok(Coordinator { child, addr, cert, tokens, closes: rx, metrics })
    }

    /// Waits for the process to report that round `round` (from 0) closed.
    fn wait_close(&self, round: usize) -> anyhow::Result<()> {
        let prefix = format!("round {round} ");
        loop {
            let line = self.closes.recv_timeout(TIMEOUT).context("the coordinator did not close a round")?;
            if line.starts_with(&prefix) && (line.contains("committed") || line.contains("abandoned")) {
                return Ok(());
            }
        }
    }

    /// The process's peak memory, CPU time and connection counters, then stops it.
    fn stop(mut self) -> anyhow::Result<Value> {
        let pid = self.child.id();
        let text = scrape(self.metrics).context("reading the coordinator's metrics")?;
        let counter = |series: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        let stats = json!({
            "process": "fedrec-coordinator serve (separate process)",
            "peak_rss_bytes": vm_hwm(pid),
            "cpu_seconds": cpu_seconds(pid),
            "handshakes": counter("fedrec_handshakes_total"),
            "handshake_retries": counter("fedrec_handshake_retries_total"),
            "refused_handshake_cap": counter("fedrec_rejected_total{reason=\"handshake_cap\"}"),
            "refused_busy": counter("fedrec_rejected_total{reason=\"busy\"}"),
        });
        self.child.kill().context("stopping the coordinator")?;
        self.child.wait().context("waiting for the coordinator")?;
        Ok(stats)
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        // On an early error: do not leave the process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The coordinator's `fedrec.toml` for this run: first-come cohorts, no noise, the next
/// round as soon as one closes.
fn config_file(cfg: &RunConfig, model: &GlobalModel, n: usize) -> String {
    let shape = model.shape();
    let objective = match cfg.objective {
        ObjectiveKind::Explicit => "objective = \"explicit\"".to_owned(),
        ObjectiveKind::Implicit => format!("objective = \"implicit\"\nimplicit_alpha = {:?}", cfg.alpha),
    };
    let optimizer = match cfg.optimizer {
        OptimizerKind::Adam => "optimizer = \"adam\"".to_owned(),
        OptimizerKind::Sgd => format!("optimizer = \"sgd\"\nmomentum = {:?}", cfg.momentum),
    };
    format!(
        r#"listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"

[model]
n_items = {n_items}
dim = {dim}
n_segments = {n_segments}
factor_std = {factor_std:?}
global_mean = {global_mean:?}
centroid_scale = 0.001

[training]
{objective}
l2_user = {l2_user:?}
l2_user_bias = {l2_user_bias:?}
l2_item = {l2_item:?}
l2_item_bias = {l2_item_bias:?}
{optimizer}
server_lr = {server_lr:?}

[rounds]
selection = "first_come"
cohort = {cohort}
min_reports = 1
checkin_window_ms = {checkin}
report_window_ms = {report}
round_gap_ms = 0

[privacy]
clip_norm = {clip_norm:?}
noise_multiplier = 0.0
accountant = "rdp"
{aggregation}

[limits]
rounds_per_device_per_day = {quota}
max_connections = {max_connections}
# Every device of the benchmark is on 127.0.0.1.
max_connections_per_source = 0
# A thousand simulated devices share this machine's cores: one whose process is busy with
# the others' cryptography is slow to send, not misbehaving.
read_timeout_ms = 60000
"#,
        n_items = shape.n_items,
        dim = shape.dim,
        n_segments = shape.n_segments,
        factor_std = cfg.init_std,
        global_mean = model.global_mean,
        l2_user = cfg.l2_user,
        l2_user_bias = cfg.l2_user_bias,
        l2_item = cfg.l2_item,
        l2_item_bias = cfg.l2_item_bias,
        server_lr = cfg.server_lr,
        cohort = n,
        checkin = cfg.checkin_window_ms,
        report = TIMEOUT.as_millis(),
        clip_norm = cfg.clip_norm,
        aggregation = match cfg.aggregation {
            AggregationKind::Plain => "aggregation = \"plain\"".to_owned(),
            AggregationKind::Secure => format!(
                "aggregation = \"secure\"\nsecagg_dropout = {:?}\nsecagg_colluding = {:?}\nsecagg_phase_window_ms = {}",
                cfg.secagg_dropout,
                cfg.secagg_corrupt,
                TIMEOUT.as_millis()
            ),
        },
        // Every device is in every round: the daily quota must not cut the benchmark short.
        quota = u32::try_from(cfg.rounds).unwrap_or(u32::MAX).saturating_add(1),
        max_connections = (n + 16).max(10_000),
    )
}

/// A `/proc/<pid>/status` field in bytes (the kernel reports kB).
/// The text a Prometheus endpoint serves at `GET /metrics`.
fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut http = std::net::TcpStream::connect_timeout(&addr, TIMEOUT)?;
    http.set_read_timeout(Some(TIMEOUT))?;
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    http.read_to_string(&mut text)?;
    Ok(text)
}

fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident memory (`VmHWM`) of process `pid`, where `/proc` has it.
fn vm_hwm(pid: u32) -> Option<u64> {
    proc_status_bytes(pid, "VmHWM:")
}

/// User plus system CPU seconds of process `pid` so far, from `/proc/<pid>/stat` (clock
/// ticks of 1/100 s, the Linux `USER_HZ`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is parenthesised and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The raw baseline: `rounds` rounds of the same connections, streams and frame sizes
/// against a quinn server that only reads and writes bytes.
fn raw_quinn(n: usize, rounds: usize, frames: Frames, p: &LoadParams) -> anyhow::Result<Series> {
    let server_rt = runtime(std::thread::available_parallelism().map_or(1, |n| n.get()), "raw-server")?;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let cert = certified.cert.der().to_vec();
    let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
    let endpoint = {
        let _enter = server_rt.enter();
        raw_server(vec![CertificateDer::from(cert.clone())], key.into())?
    };
    let addr = endpoint.local_addr()?;
    let accept = server_rt.spawn(raw_accept(endpoint.clone()));
    let client_rt = runtime(p.device_threads, "raw-device")?;
    let in_flight = Arc::new(Semaphore::new(p.in_flight.clamp(1, Semaphore::MAX_PERMITS)));
    let client = Arc::new(net::quic_client_config(&cert)?);
    // The same pool of client endpoints as the fleet's: DEVICES_PER_ENDPOINT in flight to one.
    let n_slots = p.in_flight.clamp(1, n.max(1)).div_ceil(DEVICES_PER_ENDPOINT).max(1);
    let pool = {
        let _enter = client_rt.enter();
        (0..n_slots).map(|_| net::client_endpoint(addr)).collect::<Result<Vec<_>, _>>()?
    };
    let mut series = Series::default();
    for _ in 0..rounds {
        let t0 = WallClock::now();
        let done = client_rt.block_on(async {
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let (client, in_flight) = (Arc::clone(&client), Arc::clone(&in_flight));
                    let endpoint = pool[i % n_slots].clone();
                    tokio::spawn(async move {
                        let _permit = in_flight.acquire_owned().await?;
                        raw_participation(&endpoint, addr, client, frames).await
                    })
                })
                .collect();
            let mut done = 0;
            for t in tasks {
                if matches!(t.await, Ok(Ok(true))) {
                    done += 1;
                }
            }
            done
        });
        series.seconds.push(t0.elapsed().as_secs_f64());
        series.updates.push(done);
    }
    client_rt.block_on(async {
        let _ = tokio::time::timeout(net::SHUTDOWN_WAIT, async {
            for endpoint in &pool {
                endpoint.wait_idle().await;
            }
        })
        .await;
    });
    endpoint.close(0u32.into(), b"done");
    accept.abort();
    Ok(series)
}

/// A quinn server with the coordinator's own QUIC configuration (TLS, ALPN, stream limits
/// and idle timeout as `fedrec-coordinator serve` runs with them).
fn raw_server(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<quinn::Endpoint> {
    let config = server::quic_server_config(
        chain,
        key,
        server::DEFAULT_MAX_STREAMS_PER_CONNECTION,
        server::DEFAULT_READ_TIMEOUT,
    )?;
    Ok(quinn::Endpoint::server(config, SocketAddr::from(([127, 0, 0, 1], 0)))?)
}

async fn raw_accept(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(raw_stream(send, recv));
            }
        });
    }
}

/// Reads a frame whose first payload bytes say how long the answer is, and answers with
/// that many bytes.
async fn raw_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut prefix = [0u8; LEN_PREFIX];
    if recv.read_exact(&mut prefix).await.is_err() {
        return;
    }
    let mut payload = vec![0u8; u32::from_le_bytes(prefix) as usize];
    if recv.read_exact(&mut payload).await.is_err() || payload.len() < 4 {
        return;
    }
    let answer = vec![0u8; u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize];
    if send.write_all(&answer).await.is_ok() {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

/// One device's round on raw quinn: its own connection (on an endpoint of the pool, as the
/// fleet's devices), a check-in-sized request answered with a task-sized frame, and an
/// upload-sized request answered with an ack-sized frame. Whether it got through.
async fn raw_participation(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    client: Arc<quinn::ClientConfig>,
    frames: Frames,
) -> anyhow::Result<bool> {
    let connecting = endpoint.connect_with((*client).clone(), addr, "localhost")?;
    let conn = tokio::time::timeout(TIMEOUT, connecting).await??;
    let exchange = |request: usize, answer: usize| {
        let conn = conn.clone();
        async move {
            let mut frame = vec![0u8; request];
            frame[..LEN_PREFIX].copy_from_slice(&u32::try_from(request - LEN_PREFIX)?.to_le_bytes());
            frame[LEN_PREFIX..LEN_PREFIX + 4].copy_from_slice(&u32::try_from(answer)?.to_le_bytes());
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&frame).await?;
            send.finish()?;
            let got = recv.read_to_end(answer).await?;
            anyhow::ensure!(got.len() == answer, "short answer");
            Ok::<_, anyhow::Error>(())
        }
    };
    tokio::time::timeout(TIMEOUT, exchange(frames.check_in, frames.task)).await??;
    tokio::time::timeout(TIMEOUT, exchange(frames.upload, frames.ack)).await??;
    conn.close(0u32.into(), b"done");
    Ok(true)
}
