//! The metrics registry's text exposition (known answers) and the HTTP responder over loopback: `GET /metrics`, a 404, and an oversized request line.

use std::sync::Arc;
use std::time::Duration;

use fedrec_coordinator::metrics::{MAX_REQUEST_HEAD, Registry, ServerMetrics, serve_http};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

#[test]
fn registry_renders_the_exposition_format() {
    let r = Registry::new();
    let committed =
        r.counter("fedrec_rounds_total", "Rounds closed, by outcome.", &[("outcome", "committed")]);
    let abandoned =
        r.counter("fedrec_rounds_total", "Rounds closed, by outcome.", &[("outcome", "abandoned")]);
    committed.add(3);
    abandoned.inc();
    // The same series again is the same counter.
    r.counter("fedrec_rounds_total", "Rounds closed, by outcome.", &[("outcome", "committed")]).inc();
    r.gauge("fedrec_model_version", "Version of the current global model.", &[]).set(7.0);
    r.gauge("fedrec_epsilon_spent", "Spent.", &[]).set(1.25);
    let h = r.histogram("fedrec_round_duration_seconds", "Round time.", &[], &[1.0, 5.0]);
    h.observe(0.5);
    h.observe(2.0);
    h.observe(10.0);
    r.counter("quoted_total", "A \"quoted\" label.", &[("reason", "a\"b\\c")]).inc();
    let expected = "\
# HELP fedrec_rounds_total Rounds closed, by outcome.
# TYPE fedrec_rounds_total counter
fedrec_rounds_total{outcome=\"committed\"} 4
fedrec_rounds_total{outcome=\"abandoned\"} 1
# HELP fedrec_model_version Version of the current global model.
# TYPE fedrec_model_version gauge
fedrec_model_version 7
# HELP fedrec_epsilon_spent Spent.
# TYPE fedrec_epsilon_spent gauge
fedrec_epsilon_spent 1.25
# HELP fedrec_round_duration_seconds Round time.
# TYPE fedrec_round_duration_seconds histogram
fedrec_round_duration_seconds_bucket{le=\"1\"} 1
fedrec_round_duration_seconds_bucket{le=\"5\"} 2
fedrec_round_duration_seconds_bucket{le=\"+Inf\"} 3
fedrec_round_duration_seconds_sum 12.5
fedrec_round_duration_seconds_count 3
# HELP quoted_total A \"quoted\" label.
# TYPE quoted_total counter
quoted_total{reason=\"a\\\"b\\\\c\"} 1
";
    assert_eq!(r.render(), expected);
}

#[test]
fn server_metrics_start_at_zero_and_count_rejections_by_label() {
    let m = ServerMetrics::new();
    let text = m.render();
    assert!(text.contains("fedrec_rounds_total{outcome=\"committed\"} 0\n"), "{text}");
    assert!(text.contains("fedrec_clients_total{event=\"selected\"} 0\n"), "{text}");
    assert!(text.contains("fedrec_bytes_total{direction=\"in\"} 0\n"), "{text}");
    assert!(text.contains("# TYPE fedrec_rejected_total counter\n"), "{text}");
    assert!(!text.contains("fedrec_epsilon_spent"), "no budget, no gauge: {text}");
    m.rejected("bad_token");
    m.rejected("bad_token");
    m.rejected("replay");
    m.set_epsilon_spent(0.5);
    let text = m.render();
    assert!(text.contains("fedrec_rejected_total{reason=\"bad_token\"} 2\n"), "{text}");
    assert!(text.contains("fedrec_rejected_total{reason=\"replay\"} 1\n"), "{text}");
    assert!(text.contains("fedrec_epsilon_spent 0.5\n"), "{text}");
}

async fn start() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let metrics = Arc::new(ServerMetrics::new());
    metrics.rounds_committed.add(2);
    (addr, tokio::spawn(serve_http(listener, metrics)))
}

async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may answer (and stop reading) before an oversized request is all written.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
    let _ = read.await.expect("the server answers in time");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn get_metrics_over_loopback() {
    let (addr, task) = start().await;
    let answer = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("Content-Type: text/plain; version=0.0.4\r\n"), "{answer}");
    assert!(answer.contains("fedrec_rounds_total{outcome=\"committed\"} 2\n"), "{answer}");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head}");

    let answer = exchange(addr, b"GET /other HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
    assert!(!answer.contains("fedrec_rounds_total"), "{answer}");

    let answer = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    // An oversized request line is refused, and the server keeps serving.
    let mut huge = b"GET /".to_vec();
    huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD * 4));
    huge.extend_from_slice(b" HTTP/1.1\r\n\r\n");
    let answer = exchange(addr, &huge).await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 414"), "{answer}");
    let answer = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(!task.is_finished(), "the responder is still running");
    task.abort();
}
