//! A throw-away PostgreSQL server for the tests: `initdb` into a fresh directory, started with `pg_ctl` on a free loopback port (as `nobody` when the tests run as root, which PostgreSQL refuses), optionally with TLS only, stopped and deleted when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The role the tests connect as.
pub const USER: &str = "fedrec";

/// A running PostgreSQL server in its own data directory; stopped (immediate mode) and
/// deleted when dropped.
#[derive(Debug)]
pub struct PgServer {
    root: PathBuf,
    bin: PathBuf,
    port: u16,
    /// `Some("nobody")` when the tests run as root.
    run_as: Option<String>,
    password: String,
}

impl PgServer {
    /// Starts a server, or says why it cannot: PostgreSQL is not installed, or the tests run
    /// as root and there is no unprivileged user to run it as.
    pub fn start() -> Result<PgServer, String> {
        PgServer::start_inner(None)
    }

    /// Starts a server that accepts TCP connections over TLS only (`ssl = on`, `hostssl`
    /// lines and no `host` line in `pg_hba.conf`), with the certificate chain `cert_pem` and
    /// its private key `key_pem`.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<PgServer, String> {
        PgServer::start_inner(Some((cert_pem, key_pem)))
    }

    /// [`PgServer::start_tls`], or prints why the test `name` is skipped and returns `None`.
    pub fn start_tls_or_skip(name: &str, cert_pem: &str, key_pem: &str) -> Option<PgServer> {
        match PgServer::start_tls(cert_pem, key_pem) {
            Ok(server) => Some(server),
            Err(why) => {
                eprintln!("SKIPPED {name}: no PostgreSQL server can run here: {why}");
                None
            }
        }
    }

    fn start_inner(tls: Option<(&str, &str)>) -> Result<PgServer, String> {
        let bin = find_bin().ok_or_else(|| {
            "PostgreSQL is not installed (no initdb in /usr/local/bin or /usr/lib/postgresql/*/bin; \
             `bash .ci/postgres` installs it)"
                .to_owned()
        })?;
        let run_as = if is_root()? { Some(unprivileged_user()?) } else { None };
        static N: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "fedrec-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let password = format!("pw-{}-{}", std::process::id(), crate::unix_ms());
        let server = PgServer { root, bin, port: 0, run_as, password };
        if let Some((cert, key)) = tls {
            // Written before `prepare` hands the directory to the server's user: the key
            // must belong to it and be readable by it alone.
            let write = |name: &str, text: &str, mode: u32| -> Result<(), String> {
                use std::os::unix::fs::PermissionsExt as _;
                let path = server.root.join(name);
                std::fs::write(&path, text).map_err(|e| format!("cannot write {name}: {e}"))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("cannot chmod {name}: {e}"))
            };
            write("server.crt", cert, 0o644)?;
            write("server.key", key, 0o600)?;
        }
        server.prepare()?;
        if tls.is_some() {
            // TCP over TLS only: a plaintext connection finds no line and is refused.
            let hba = "local all all scram-sha-256\n\
                       hostssl all all 127.0.0.1/32 scram-sha-256\n\
                       hostssl all all ::1/128 scram-sha-256\n";
            std::fs::write(server.root.join("data").join("pg_hba.conf"), hba)
                .map_err(|e| format!("cannot write pg_hba.conf: {e}"))?;
        }
        let mut server = server;
        server.port = free_port()?;
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=40",
            server.port,
            server.root.display()
        );
        if tls.is_some() {
            let root = server.root.display();
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={root}/server.crt -c ssl_key_file={root}/server.key"
            ));
        }
        let log = server.root.join("server.log");
        let data = server.root.join("data");
        let out = server.pg(
            "pg_ctl",
            &["-D", path_str(&data)?, "-l", path_str(&log)?, "-o", &options, "-w", "-t", "60", "start"],
        )?;
        if !out.status.success() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("pg_ctl start failed: {}\n{log}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(server)
    }

    /// [`PgServer::start`], or prints why the test `name` is skipped and returns `None`.
    pub fn start_or_skip(name: &str) -> Option<PgServer> {
        match PgServer::start() {
            Ok(server) => Some(server),
            Err(why) => {
                eprintln!("SKIPPED {name}: no PostgreSQL server can run here: {why}");
                None
            }
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for database `postgres` as [`USER`], without the password.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// [`USER`]'s password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Creates a database `name` (owned by [`USER`]) and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        let psql = self.bin.join("psql");
        let out = Command::new(&psql)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, "-d", "postgres", "-c"])
            .arg(format!("CREATE DATABASE {name}"))
            .env("PGPASSWORD", &self.password)
            // Encrypted (unverified) on a TLS-only server, plaintext otherwise.
            .env("PGSSLMODE", "prefer")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", psql.display()))?;
        if !out.status.success() {
            return Err(format!("CREATE DATABASE failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port))
    }

    /// `initdb` with [`USER`] as the superuser and password authentication.
    fn prepare(&self) -> Result<(), String> {
        let pwfile = self.root.join("pwfile");
        std::fs::write(&pwfile, &self.password)
            .map_err(|e| format!("cannot write the password file: {e}"))?;
        if let Some(user) = &self.run_as {
            let out = Command::new("chown")
                .args(["-R", user])
                .arg(&self.root)
                .output()
                .map_err(|e| format!("cannot run chown: {e}"))?;
            if !out.status.success() {
                return Err(format!("chown failed: {}", String::from_utf8_lossy(&out.stderr)));
            }
        }
        let data = self.root.join("data");
        let out = self.pg(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                USER,
                "--pwfile",
                path_str(&pwfile)?,
                "--auth",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    }

    /// Runs one of PostgreSQL's programs, as the unprivileged user when there is one.
    fn pg(&self, program: &str, args: &[&str]) -> Result<Output, String> {
        let program = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(&program);
                cmd
            }
            None => Command::new(&program),
        };
        cmd.args(args).current_dir(&self.root);
        cmd.output().map_err(|e| format!("cannot run {}: {e}", program.display()))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.root.join("data");
        if let Some(data) = data.to_str() {
            let _ = self.pg("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn path_str(path: &Path) -> Result<&str, String> {
    path.to_str().ok_or_else(|| format!("{} is not UTF-8", path.display()))
}

/// The directory holding `initdb`, `pg_ctl` and `psql`: `/usr/local/bin` or the newest
/// `/usr/lib/postgresql/*/bin`.
fn find_bin() -> Option<PathBuf> {
    let has_all = |dir: &Path| ["initdb", "pg_ctl", "psql", "postgres"].iter().all(|p| dir.join(p).exists());
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, dir)| has_all(dir))
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .or_else(|| Some(PathBuf::from("/usr/local/bin")).filter(|d| has_all(d)))
}

fn is_root() -> Result<bool, String> {
    let out = Command::new("id").arg("-u").output().map_err(|e| format!("cannot run id: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// `nobody`, if it exists and `runuser` can switch to it.
fn unprivileged_user() -> Result<String, String> {
    let ok = Command::new("runuser").args(["-u", "nobody", "--", "true"]).status().is_ok_and(|s| s.success());
    if ok {
        Ok("nobody".to_owned())
    } else {
        Err("the tests run as root, which PostgreSQL refuses, and `runuser -u nobody` does not work"
            .to_owned())
    }
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| format!("cannot bind a port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// A `fedrec-coordinator serve` child that may stand by before it listens (unlike
/// [`crate::CoordinatorProcess`], starting it does not wait for the listening line); every
/// line of its stderr is kept. Killed when dropped.
#[derive(Debug)]
pub struct ServeProcess {
    child: Option<std::process::Child>,
    log: tokio::sync::watch::Receiver<Vec<String>>,
}

impl ServeProcess {
    /// Starts `serve --dir dir`.
    pub fn start(dir: &Path) -> ServeProcess {
        use std::io::BufRead as _;
        let mut child = Command::new(crate::fedrec_coordinator_bin())
            .arg("serve")
            .arg("--dir")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the coordinator binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, log) = tokio::sync::watch::channel(Vec::new());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                tx.send_modify(|lines| lines.push(line));
            }
        });
        ServeProcess { child: Some(child), log }
    }

    /// The lines written to stderr so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.borrow().clone()
    }

    /// Waits (at most [`crate::WAIT`]) for a line that satisfies `found`; returns the first.
    /// Panics with the log, naming `what`, when the process exits or the time is up first.
    pub async fn wait_for_line(&self, what: &str, found: impl Fn(&str) -> bool) -> String {
        let mut log = self.log.clone();
        let wait = log.wait_for(|lines| lines.iter().any(|l| found(l)));
        match tokio::time::timeout(crate::WAIT, wait).await {
            Ok(Ok(lines)) => lines.iter().find(|l| found(l)).cloned().expect("found above"),
            Ok(Err(_)) => panic!("serve exited before {what}: {:#?}", self.log.borrow()),
            Err(_) => panic!("no {what} within {:?}: {:#?}", crate::WAIT, self.log.borrow()),
        }
    }

    /// Waits for the listening line; the QUIC address.
    pub async fn addr(&self) -> std::net::SocketAddr {
        let prefix = "listening on ";
        let parse = move |l: &str| -> Option<std::net::SocketAddr> {
            let at = l.find(prefix)?;
            l[at + prefix.len()..].split_whitespace().next()?.parse().ok()
        };
        let line = self.wait_for_line("the listening line", |l| parse(l).is_some()).await;
        parse(&line).expect("found above")
    }

    /// SIGKILL, and reaps the child.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("the child can be killed");
            child.wait().expect("the child is reaped");
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
