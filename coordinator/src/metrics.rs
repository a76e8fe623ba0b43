//! Operational metrics: a small registry of counters, gauges and histograms on atomics, rendered in the Prometheus text exposition format, and a minimal HTTP/1.1 responder that serves it at `GET /metrics`.
//!
//! The registry holds no secrets: label values are fixed words (outcomes, directions,
//! rejection labels), never tokens or device ids.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A monotonically increasing count.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (an `f64` stored as its bits).
#[derive(Debug, Clone, Default)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

#[derive(Debug)]
struct HistogramInner {
    bounds: Vec<f64>,
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    buckets: Vec<AtomicU64>,
    sum_bits: AtomicU64,
    count: AtomicU64,
}

/// Observations counted into fixed buckets, with their sum and count.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<HistogramInner>);

impl Histogram {
    fn new(bounds: &[f64]) -> Self {
        let mut bounds: Vec<f64> = bounds.iter().copied().filter(|b| b.is_finite()).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let buckets = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self(Arc::new(HistogramInner {
            bounds,
            buckets,
            sum_bits: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }))
    }
    /// Records one observation.
    pub fn observe(&self, v: f64) {
        let h = &self.0;
        let i = h.bounds.iter().position(|&b| v <= b).unwrap_or(h.bounds.len());
        h.buckets[i].fetch_add(1, Ordering::Relaxed);
        let _ = h.sum_bits.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + v).to_bits())
        });
        h.count.fetch_add(1, Ordering::Relaxed);
    }
    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
enum Metric {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

impl Metric {
    fn kind(&self) -> &'static str {
        match self {
            Metric::Counter(_) => "counter",
            Metric::Gauge(_) => "gauge",
            Metric::Histogram(_) => "histogram",
        }
    }
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: &'static str,
    series: Vec<(Vec<(String, String)>, Metric)>,
}

/// A set of metric families, rendered in registration order.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<Vec<Family>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a family (so that it is rendered even before it has a series).
    pub fn describe(&self, name: &str, help: &str, kind: &'static str) {
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        if !families.iter().any(|f| f.name == name) {
            families.push(Family { name: name.to_owned(), help: help.to_owned(), kind, series: Vec::new() });
        }
    }

    fn get_or_insert(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        make: impl FnOnce() -> Metric,
    ) -> Metric {
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let labels: Vec<(String, String)> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let idx = match families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                let metric = make();
                let kind = metric.kind();
                families.push(Family {
                    name: name.to_owned(),
                    help: help.to_owned(),
                    kind,
                    series: vec![(labels, metric.clone())],
                });
                return metric;
            }
        };
        let family = &mut families[idx];
        if let Some((_, m)) = family.series.iter().find(|(l, _)| *l == labels) {
            return m.clone();
        }
        let metric = make();
        family.series.push((labels, metric.clone()));
        metric
    }

    /// The counter `name{labels}`, created at zero on first use.
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        match self.get_or_insert(name, help, labels, || Metric::Counter(Counter::default())) {
            Metric::Counter(c) => c,
            // A name registered with another type: hand back a detached counter.
            _ => Counter::default(),
        }
    }

    /// The gauge `name{labels}`, created at zero on first use.
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        match self.get_or_insert(name, help, labels, || Metric::Gauge(Gauge::default())) {
            Metric::Gauge(g) => g,
            _ => Gauge::default(),
        }
    }

    /// The histogram `name{labels}` with bucket upper `bounds`, created empty on first use.
    pub fn histogram(&self, name: &str, help: &str, labels: &[(&str, &str)], bounds: &[f64]) -> Histogram {
        match self.get_or_insert(name, help, labels, || Metric::Histogram(Histogram::new(bounds))) {
            Metric::Histogram(h) => h,
            _ => Histogram::new(bounds),
        }
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        for f in families.iter() {
            let _ = writeln!(out, "# HELP {} {}", f.name, escape(&f.help, false));
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for (labels, metric) in &f.series {
                match metric {
                    Metric::Counter(c) => {
                        let _ = writeln!(out, "{}{} {}", f.name, label_set(labels, None), c.get());
                    }
                    Metric::Gauge(g) => {
                        let _ = writeln!(out, "{}{} {}", f.name, label_set(labels, None), number(g.get()));
                    }
                    Metric::Histogram(h) => {
                        let inner = &h.0;
                        let mut cumulative = 0u64;
                        for (i, bucket) in inner.buckets.iter().enumerate() {
                            cumulative += bucket.load(Ordering::Relaxed);
                            let le = inner.bounds.get(i).map_or_else(|| "+Inf".to_owned(), |b| number(*b));
                            let _ = writeln!(
                                out,
                                "{}_bucket{} {cumulative}",
                                f.name,
                                label_set(labels, Some(&le))
                            );
                        }
                        let sum = f64::from_bits(inner.sum_bits.load(Ordering::Relaxed));
                        let _ = writeln!(out, "{}_sum{} {}", f.name, label_set(labels, None), number(sum));
                        let _ = writeln!(out, "{}_count{} {}", f.name, label_set(labels, None), h.count());
                    }
                }
            }
        }
        out
    }
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".to_owned() } else { "-Inf".to_owned() }
    } else {
        format!("{v}")
    }
}

fn escape(s: &str, quote: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

fn label_set(labels: &[(String, String)], le: Option<&str>) -> String {
    if labels.is_empty() && le.is_none() {
        return String::new();
    }
    let mut parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v, true))).collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    format!("{{{}}}", parts.join(","))
}

/// Upper bounds (seconds) of the round duration histogram.
pub const ROUND_DURATION_BOUNDS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// The coordinator's metrics, as handles into one [`Registry`].
#[derive(Debug)]
pub struct ServerMetrics {
    /// The registry the handles live in.
    pub registry: Registry,
    /// `fedrec_rounds_total{outcome="committed"}`.
    pub rounds_committed: Counter,
    /// `fedrec_rounds_total{outcome="abandoned"}`.
    pub rounds_abandoned: Counter,
    /// `fedrec_clients_total{event="checked_in"}`. This and the other `fedrec_clients_total`
    /// series, and `fedrec_round_duration_seconds`, count only rounds without noise: a round
    /// with noise exports no exact count (it would reveal the round's sample).
    pub checked_in: Counter,
    /// `fedrec_clients_total{event="selected"}`.
    pub selected: Counter,
    /// `fedrec_clients_total{event="reported"}`.
    pub reported: Counter,
    /// `fedrec_bytes_total{direction="in"}`.
    pub bytes_in: Counter,
    /// `fedrec_bytes_total{direction="out"}`.
    pub bytes_out: Counter,
    /// `fedrec_round_duration_seconds`.
    pub round_duration: Histogram,
    /// `fedrec_model_version`.
    pub model_version: Gauge,
    /// `fedrec_connections_open`: QUIC connections holding a slot of the connection cap.
    pub connections_open: Gauge,
}

const REJECTED: &str = "fedrec_rejected_total";
const REJECTED_HELP: &str = "Refused connections, requests and messages, by reason.";
const EPSILON: &str = "fedrec_epsilon_spent";
const EPSILON_HELP: &str = "Privacy loss spent so far (epsilon at the configured delta).";

impl ServerMetrics {
    /// All series at zero.
    pub fn new() -> Self {
        let r = Registry::new();
        let rounds = ("fedrec_rounds_total", "Rounds closed, by outcome.");
        let clients = ("fedrec_clients_total", "Devices in closed rounds without noise, by event.");
        let bytes = ("fedrec_bytes_total", "Bytes of request and response frames, by direction.");
        let rounds_committed = r.counter(rounds.0, rounds.1, &[("outcome", "committed")]);
        let rounds_abandoned = r.counter(rounds.0, rounds.1, &[("outcome", "abandoned")]);
        let checked_in = r.counter(clients.0, clients.1, &[("event", "checked_in")]);
        let selected = r.counter(clients.0, clients.1, &[("event", "selected")]);
        let reported = r.counter(clients.0, clients.1, &[("event", "reported")]);
        r.describe(REJECTED, REJECTED_HELP, "counter");
        let bytes_in = r.counter(bytes.0, bytes.1, &[("direction", "in")]);
        let bytes_out = r.counter(bytes.0, bytes.1, &[("direction", "out")]);
        let round_duration = r.histogram(
            "fedrec_round_duration_seconds",
            "Time from a round's opening to its close (rounds without noise).",
            &[],
            ROUND_DURATION_BOUNDS,
        );
        let model_version = r.gauge("fedrec_model_version", "Version of the current global model.", &[]);
        let connections_open =
            r.gauge("fedrec_connections_open", "Open QUIC connections (counted against the cap).", &[]);
        Self {
            registry: r,
            rounds_committed,
            rounds_abandoned,
            checked_in,
            selected,
            reported,
            bytes_in,
            bytes_out,
            round_duration,
            model_version,
            connections_open,
        }
    }

    /// Counts one refusal with reason `label`: an [`crate::auth::AuthError::label`] (a
    /// token the coordinator did not issue is `bad_token`, an authentic one of a revoked
    /// device `revoked`, an expired one `expired`), a wire error code's label, or a word of
    /// the server's own (`connection_cap`, `source_cap`, `timeout`, ...).
    pub fn rejected(&self, label: &str) {
        self.registry.counter(REJECTED, REJECTED_HELP, &[("reason", label)]).inc();
    }

    /// Sets `fedrec_epsilon_spent` (only called when a budget is configured).
    pub fn set_epsilon_spent(&self, epsilon: f64) {
        self.registry.gauge(EPSILON, EPSILON_HELP, &[]).set(epsilon);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Longest request head (request line and headers) the responder reads.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Longest wait for a request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until the task is dropped: one request per connection.
pub async fn serve_http(listener: TcpListener, metrics: Arc<ServerMetrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(answer_http(stream, Arc::clone(&metrics)));
    }
}

async fn answer_http(mut stream: TcpStream, metrics: Arc<ServerMetrics>) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(());
            }
            if head.len() >= MAX_REQUEST_HEAD {
                return Err("414 URI Too Long");
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Err(""),
                Ok(n) => head.extend_from_slice(&buf[..n.min(MAX_REQUEST_HEAD + 1 - head.len())]),
            }
        }
    };
    let status = match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Ok(Ok(())) => {
            let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
            let mut words = line.split(|&b| b == b' ' || b == b'\r').filter(|w| !w.is_empty());
            match (words.next(), words.next()) {
                (Some(b"GET"), Some(b"/metrics")) => "200 OK",
                (Some(_), Some(_)) => "404 Not Found",
                _ => "400 Bad Request",
            }
        }
        Ok(Err("")) => return,
        Ok(Err(status)) => status,
        Err(_) => "408 Request Timeout",
    };
    let body = if status.starts_with("200") { metrics.render() } else { format!("{status}\n") };
    let content_type = if status.starts_with("200") { "text/plain; version=0.0.4" } else { "text/plain" };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(response.as_bytes()).await.is_ok() {
        let _ = stream.shutdown().await;
        // Drain what the peer still sends (briefly) so that closing does not reset the
        // connection before it has read the answer.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}
