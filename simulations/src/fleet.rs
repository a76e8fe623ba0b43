//! `fedrec-sim fleet`: simulated devices on the SDK's own device path against a coordinator the simulator did not start — an operator's smoke and load test of a deployment.
//!
//! Each enrolled token is one device; device `i` holds user `i`'s training ratings of the
//! chosen dataset. A fleet round is every device taking part once through
//! [`fedrec_client::net::Device::participate_with`] (retries, backoff, `Busy` hints, the
//! secure-aggregation phases), at most `in_flight` at once, exactly as apps would: the
//! coordinator decides who is selected and when its rounds commit. The QUIC load benchmark
//! (`fedrec-sim bench --transport quic`) drives its fleet with the same [`fleet_rounds`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fedrec_shared::{ModelShape, Rating};
use serde::Serialize;

use crate::quic::{Fleet, FleetRound, Pace, Target, runtime};

/// Where the fleet goes and how hard.
#[derive(Debug, Clone)]
pub struct FleetParams {
    /// The coordinator's QUIC address.
    pub coordinator: SocketAddr,
    /// The name its certificate is for.
    pub server_name: String,
    /// Its certificate (DER), which every device pins.
    pub cert: Vec<u8>,
    /// One enrollment token per device.
    pub tokens: Vec<Vec<u8>>,
    /// The largest model the devices accept.
    pub shape: ModelShape,
    /// Fleet rounds: each device takes part once per round.
    pub rounds: usize,
    /// Most participations under way at once.
    pub in_flight: usize,
    /// Worker threads of the devices' runtime.
    pub device_threads: usize,
    /// A device's longest wait for the coordinator, and its time budget per participation.
    pub timeout: Duration,
}

/// What one fleet round came to, as the devices saw it.
#[derive(Debug, Clone, Serialize)]
pub struct FleetRoundSummary {
    /// The round, from 1.
    pub round: usize,
    /// Wall time until every device's participation ended.
    pub seconds: f64,
    /// Devices whose update the coordinator acknowledged.
    pub completed: usize,
    /// Devices that took part in a round but did not complete it (rejected, aborted,
    /// refused by their own policy).
    pub failed: usize,
    /// Devices told the federation is finished (its privacy budget is spent).
    pub finished: usize,
    /// Participations that failed on the network or the protocol.
    pub errors: usize,
    /// The first such error.
    pub first_error: Option<String>,
}

impl FleetRoundSummary {
    fn new(round: usize, seconds: f64, out: &FleetRound) -> Self {
        FleetRoundSummary {
            round,
            seconds,
            completed: out.report.n_completed,
            failed: out.report.n_failed,
            finished: out.n_finished,
            errors: out.n_errors,
            first_error: out.first_error.clone(),
        }
    }
}

/// Reads an enrollment token file: one hex token per line (what `fedrec-coordinator enroll
/// --out FILE` writes); blank lines are skipped.
pub fn read_tokens(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading the tokens in {}", path.display()))?;
    let tokens = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| decode_token(line).with_context(|| format!("{} line {}", path.display(), i + 1)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if tokens.is_empty() {
        bail!("{} holds no tokens", path.display());
    }
    Ok(tokens)
}

/// One token line: an even number of hex digits.
pub fn decode_token(line: &str) -> anyhow::Result<Vec<u8>> {
    let line = line.trim();
    if line.is_empty() || !line.len().is_multiple_of(2) || !line.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("a token is an even number of hex digits");
    }
    (0..line.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&line[i..i + 2], 16).context("a token is not hex"))
        .collect()
}

/// `rounds` fleet rounds of every device in `order`, at most `in_flight` at once, on `rt`;
/// `after_round(r, &out)` runs after round `r` (from 0), e.g. to wait for the coordinator's
/// commit, and its error stops the run.
pub fn fleet_rounds(
    rt: &tokio::runtime::Runtime,
    fleet: &Arc<Fleet>,
    order: &[usize],
    rounds: usize,
    in_flight: usize,
    mut after_round: impl FnMut(usize, &FleetRound, f64) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<FleetRoundSummary>> {
    let mut summaries = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let t0 = Instant::now();
        let out = rt.block_on(fleet.round(order, Pace::AllAtOnce { in_flight }));
        let seconds = t0.elapsed().as_secs_f64();
        after_round(round, &out, seconds)?;
        summaries.push(FleetRoundSummary::new(round + 1, seconds, &out));
    }
    rt.block_on(fleet.shutdown());
    Ok(summaries)
}

/// Runs the fleet: device `i` has `tokens[i]` and `ratings[i]`. Fails before any device
/// connects when there are more tokens than users, and when the fleet is empty.
pub fn run(params: &FleetParams, ratings: &[Vec<Rating>]) -> anyhow::Result<Vec<FleetRoundSummary>> {
    let n = params.tokens.len();
    if n > ratings.len() {
        bail!(
            "{n} tokens but the dataset has {} users: enroll fewer devices or use a larger dataset",
            ratings.len()
        );
    }
    if params.rounds == 0 || params.in_flight == 0 {
        bail!("--rounds and --in-flight must be at least 1");
    }
    let target = Target {
        addr: params.coordinator,
        server_name: params.server_name.clone(),
        cert: params.cert.clone(),
        shape: params.shape,
    };
    let fleet =
        Arc::new(Fleet::new(target, params.tokens.clone(), Arc::from(ratings[..n].to_vec()), params.timeout));
    let rt = runtime(params.device_threads, "fedrec-device")?;
    let order: Vec<usize> = (0..n).collect();
    fleet_rounds(&rt, &fleet, &order, params.rounds, params.in_flight, |round, out, seconds| {
        eprintln!(
            "fleet round {}: {} of {n} devices completed, {} failed, {} told finished, {} errors in {seconds:.3} s",
            round + 1,
            out.report.n_completed,
            out.report.n_failed,
            out.n_finished,
            out.n_errors,
        );
        if let Some(e) = &out.first_error {
            eprintln!("  first error: {e}");
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_even_hex() {
        assert_eq!(decode_token(" 00ff10 ").expect("hex"), vec![0, 255, 16]);
        for bad in ["", "0", "0g", "zz", "abc", "+1", "é0"] {
            assert!(decode_token(bad).is_err(), "{bad:?}");
        }
    }
}
