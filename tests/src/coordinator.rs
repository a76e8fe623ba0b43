//! The real `fedrec-coordinator` binary as the end-to-end tests drive it: a state directory prepared with `init`, `enroll` and `rules publish`, and a `serve` child process whose log the tests wait on.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use fedrec_client::net::Device;
use fedrec_shared::ModelShape;
use tokio::sync::watch;

use crate::{WAIT, decode_hex, fedrec_coordinator_bin, net_config, scrape_metrics, series};

/// A coordinator state directory (`--dir`) and the one-shot commands run on it.
#[derive(Debug, Clone)]
pub struct CoordinatorDir {
    dir: PathBuf,
}

/// The `fedrec.toml` edits from the template's distributed noise to central noise.
pub const CENTRAL_NOISE: [(&str, &str); 2] =
    [("mechanism = \"distributed\"", "mechanism = \"central\""), ("\nbits = 16\n", "\n# bits = 16\n")];

impl CoordinatorDir {
    /// The directory at `dir`, as it is (nothing is run).
    pub fn new(dir: impl Into<PathBuf>) -> CoordinatorDir {
        CoordinatorDir { dir: dir.into() }
    }

    /// Runs `init` in `dir`, moves both listeners (QUIC and metrics) to free loopback ports,
    /// then applies `edits` to `fedrec.toml`: each `(from, to)` replaces the first `from`,
    /// which the template must contain.
    pub fn init<S: AsRef<str>>(dir: impl Into<PathBuf>, edits: &[(&str, S)]) -> CoordinatorDir {
        let state = CoordinatorDir::new(dir);
        state.run(&["init"]);
        state.edit_config(&[
            ("listen = \"127.0.0.1:4433\"", "listen = \"127.0.0.1:0\""),
            ("metrics_listen = \"127.0.0.1:9464\"", "metrics_listen = \"127.0.0.1:0\""),
        ]);
        // The template's distributed noise needs secure rounds with noise; these tests vary
        // both, so they start from central noise (the template itself is checked in `config.rs`).
        state.edit_config(&CENTRAL_NOISE);
        state.edit_config(edits);
        state
    }

    /// [`CoordinatorDir::init`] with plain aggregation instead of the template's secure
    /// aggregation: for tests of everything else, whose cohorts are too small for SecAgg+ or
    /// which should not wait for its phase windows.
    pub fn init_plain<S: AsRef<str>>(dir: impl Into<PathBuf>, edits: &[(&str, S)]) -> CoordinatorDir {
        let state = CoordinatorDir::init(dir, edits);
        state.edit_config(&[
            ("aggregation = \"secure\"", "aggregation = \"plain\""),
            ("secagg_dropout = 0.33", "# secagg_dropout = 0.33"),
            ("secagg_colluding = 0.05", "# secagg_colluding = 0.05"),
            ("secagg_phase_window_ms = 30000", "# secagg_phase_window_ms = 30000"),
        ]);
        state
    }

    /// Applies `(from, to)` replacements to `fedrec.toml`; each `from` must be there.
    pub fn edit_config<S: AsRef<str>>(&self, edits: &[(&str, S)]) {
        let path = self.dir.join("fedrec.toml");
        let mut text = std::fs::read_to_string(&path).expect("init writes the config");
        for (from, to) in edits {
            assert!(text.contains(from), "the config has {from:?}");
            text = text.replacen(from, to.as_ref(), 1);
        }
        std::fs::write(&path, text).expect("the config is writable");
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Runs `fedrec-coordinator <args> --dir <dir>` to completion, whatever its exit status.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(fedrec_coordinator_bin())
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .expect("the coordinator binary starts")
    }

    /// Runs `fedrec-coordinator <args> --dir <dir>`, which must succeed; its standard output.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.command(args);
        assert!(out.status.success(), "fedrec-coordinator {args:?} failed:\n{}", describe(&out));
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// Enrolls `n` devices (`enroll --out`); their tokens.
    pub fn enroll(&self, n: usize) -> Vec<Vec<u8>> {
        let file = self.dir.join("tokens.txt");
        self.run(&["enroll", "--count", &n.to_string(), "--out", file.to_str().expect("UTF-8 path")]);
        let text = std::fs::read_to_string(&file).expect("enroll writes the tokens");
        let tokens: Vec<Vec<u8>> = text.lines().map(|line| decode_hex(line.trim())).collect();
        assert_eq!(tokens.len(), n, "one token per device");
        tokens
    }

    /// Writes `toml` to `rules.toml` and runs `rules publish` on it, whatever its exit status.
    pub fn publish_rules(&self, toml: &str) -> Output {
        let file = self.dir.join("rules.toml");
        std::fs::write(&file, toml).expect("the rules file is writable");
        self.command(&["rules", "publish", "--file", file.to_str().expect("UTF-8 path")])
    }

    /// The coordinator's certificate (DER), written by `init`.
    pub fn cert(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("cert.der")).expect("init writes the certificate")
    }

    /// Starts `serve` and waits for its listening line.
    pub async fn serve(&self) -> CoordinatorProcess {
        CoordinatorProcess::start(self).await
    }
}

/// A command's exit status and output, for failure messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A running `fedrec-coordinator serve` child and every line it has written to stderr; killed
/// when dropped.
#[derive(Debug)]
pub struct CoordinatorProcess {
    child: Option<Child>,
    log: watch::Receiver<Vec<String>>,
    addr: SocketAddr,
    cert: Vec<u8>,
}

impl CoordinatorProcess {
    /// Starts `serve` on `state` and waits (at most [`WAIT`]) for its listening line.
    pub async fn start(state: &CoordinatorDir) -> CoordinatorProcess {
        let mut child = Command::new(fedrec_coordinator_bin())
            .arg("serve")
            .arg("--dir")
            .arg(state.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the coordinator binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, log) = watch::channel(Vec::new());
        std::thread::spawn(move || {
            // Reads to the end even when nobody listens: a closed pipe would fail the server's writes.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                tx.send_modify(|lines| lines.push(line));
            }
        });
        let unset = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut serve = CoordinatorProcess { child: Some(child), log, addr: unset, cert: state.cert() };
        let line =
            serve.wait_for_line("the listening line", |l| addr_after(l, "listening on ").is_some()).await;
        serve.addr = addr_after(&line, "listening on ").expect("found above");
        serve
    }

    /// The QUIC address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The lines written to stderr so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.borrow().clone()
    }

    /// Waits (at most [`WAIT`]) until `done` holds for the stderr lines; returns them. Panics
    /// with the log, naming `what`, when the process exits or the time is up first.
    pub async fn wait_for(&self, what: &str, mut done: impl FnMut(&[String]) -> bool) -> Vec<String> {
        let mut log = self.log.clone();
        match tokio::time::timeout(WAIT, log.wait_for(|l| done(l))).await {
            Ok(Ok(lines)) => lines.clone(),
            Ok(Err(_)) => panic!("the coordinator exited before {what}: {:#?}", self.log.borrow()),
            Err(_) => panic!("no {what} within {WAIT:?}: {:#?}", self.log.borrow()),
        }
    }

    /// Waits (at most [`WAIT`]) for a line that satisfies `found`; returns the first.
    pub async fn wait_for_line(&self, what: &str, found: impl Fn(&str) -> bool) -> String {
        let lines = self.wait_for(what, |lines| lines.iter().any(|l| found(l))).await;
        lines.into_iter().find(|l| found(l)).expect("found above")
    }

    /// The metrics endpoint's address, from its log line (metrics must be configured).
    pub async fn metrics_addr(&self) -> SocketAddr {
        let line = self.wait_for_line("the metrics line", |l| addr_after(l, "metrics on ").is_some()).await;
        addr_after(&line, "metrics on ").expect("found above")
    }

    /// The value of the Prometheus series `series` (name and labels, as rendered).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = scrape_metrics(self.metrics_addr().await).await;
        series(&text, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no series {name} in:\n{text}"))
    }

    /// A device that trusts this coordinator's certificate and accepts models up to `shape`.
    pub fn device(&self, token: Vec<u8>, shape: ModelShape, timeout: Duration) -> Device {
        Device::new(net_config(self.addr, self.cert.clone(), token, shape, timeout))
            .expect("the client endpoint binds")
    }

    /// The process id of `serve`.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The process's current and peak resident memory in KiB (`VmRSS`, `VmHWM` of
    /// `/proc/PID/status`; Linux).
    pub fn memory_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc is readable");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/PID/status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// SIGKILL, and reaps the child.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("the child can be killed");
        child.wait().expect("the child is reaped");
    }

    /// SIGTERM, then waits (at most [`WAIT`]) for a clean exit.
    pub async fn terminate(&mut self) {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
        assert!(sent.success());
        let waited = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            (child, status)
        });
        let (_child, status) = tokio::time::timeout(WAIT, waited)
            .await
            .expect("the coordinator stops after SIGTERM")
            .expect("the wait task ends");
        let status = status.expect("the child is reaped");
        assert!(status.success(), "a SIGTERM is a clean stop: {status:?}; {:#?}", self.log.borrow());
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The socket address right after `prefix` in `line`.
fn addr_after(line: &str, prefix: &str) -> Option<SocketAddr> {
    let at = line.find(prefix)?;
    line[at + prefix.len()..].split_whitespace().next()?.trim_matches(['"', ',']).parse().ok()
}
