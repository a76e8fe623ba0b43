//! `fedrec.privacy`: the accountants and the calibration of `fedrec_shared::privacy`, the code `fedrec-sim privacy` and the coordinator's ledger use.

use fedrec_shared::privacy::{self, AccountantKind, PrivacyEvent};
use pyo3::prelude::*;

use fedrec_shared::ddp::{self, DdpEvent, DdpParams};

use crate::errors::{config_err, ddp_err, privacy_err};

/// `"rdp"` or `"pld"` (ASCII case-insensitive).
pub fn accountant(name: &str) -> PyResult<AccountantKind> {
    if name.eq_ignore_ascii_case("rdp") {
        Ok(AccountantKind::Rdp)
    } else if name.eq_ignore_ascii_case("pld") {
        Ok(AccountantKind::Pld)
    } else {
        Err(config_err(format!("accountant must be \"rdp\" or \"pld\", got {name:?}")))
    }
}

/// Events from `(q, sigma, steps)` triples.
fn events(triples: &[(f64, f64, u64)]) -> PyResult<Vec<PrivacyEvent>> {
    triples
        .iter()
        .map(|&(q, sigma, steps)| PrivacyEvent::new(q, sigma, steps).map_err(|e| privacy_err(&e)))
        .collect()
}

/// ε of `steps` rounds at sampling probability `q` and noise multiplier `sigma`.
#[pyfunction]
#[pyo3(signature = (q, sigma, steps, delta, accountant))]
fn privacy_epsilon(
    py: Python<'_>,
    q: f64,
    sigma: f64,
    steps: u64,
    delta: f64,
    accountant: &str,
) -> PyResult<f64> {
    privacy_epsilon_of_events(py, vec![(q, sigma, steps)], delta, accountant)
}

/// ε of a composition of `(q, sigma, steps)` events.
#[pyfunction]
#[pyo3(signature = (events, delta, accountant))]
fn privacy_epsilon_of_events(
    py: Python<'_>,
    events: Vec<(f64, f64, u64)>,
    delta: f64,
    accountant: &str,
) -> PyResult<f64> {
    let kind = self::accountant(accountant)?;
    let ev = self::events(&events)?;
    py.detach(|| privacy::epsilon(&ev, delta, kind)).map_err(|e| privacy_err(&e))
}

/// δ of `steps` rounds at `q` and `sigma`, for a given ε.
#[pyfunction]
#[pyo3(signature = (q, sigma, steps, epsilon, accountant))]
fn privacy_delta(
    py: Python<'_>,
    q: f64,
    sigma: f64,
    steps: u64,
    epsilon: f64,
    accountant: &str,
) -> PyResult<f64> {
    let kind = self::accountant(accountant)?;
    let ev = events(&[(q, sigma, steps)])?;
    py.detach(|| privacy::delta(&ev, epsilon, kind)).map_err(|e| privacy_err(&e))
}

/// The smallest noise multiplier for which `steps` rounds at `q` spend at most `epsilon`.
#[pyfunction]
#[pyo3(signature = (epsilon, delta, q, steps, accountant))]
fn privacy_sigma(
    py: Python<'_>,
    epsilon: f64,
    delta: f64,
    q: f64,
    steps: u64,
    accountant: &str,
) -> PyResult<f64> {
    let kind = self::accountant(accountant)?;
    py.detach(|| privacy::calibrate_noise(epsilon, delta, q, steps, kind)).map_err(|e| privacy_err(&e))
}

/// The noise multiplier a round is charged: the update's combined with the clip bits'.
#[pyfunction]
#[pyo3(signature = (noise_multiplier, clip_bits_noise=None))]
fn privacy_combined_noise_multiplier(noise_multiplier: f64, clip_bits_noise: Option<f64>) -> f64 {
    privacy::combined_noise_multiplier(noise_multiplier, clip_bits_noise)
}

/// The update's share of a combined noise multiplier, under adaptive clipping.
#[pyfunction]
fn privacy_update_noise_multiplier(combined: f64, clip_bits_noise: f64) -> PyResult<f64> {
    privacy::update_noise_multiplier(combined, clip_bits_noise).map_err(|e| privacy_err(&e))
}

/// The distributed mechanism's parameters (docs/ddp.md) with the library's default β and
/// wrap bound: the same template the coordinator derives for a round.
fn ddp_template(
    noise_multiplier: f64,
    dim: usize,
    cohort: usize,
    min_reports: usize,
    bits: u32,
    clip_norm: f64,
) -> DdpParams {
    DdpParams {
        dim,
        clip_norm,
        noise_std: noise_multiplier * clip_norm,
        n_cohort: cohort,
        min_reports,
        bits,
        beta: ddp::params::DEFAULT_BETA,
        max_wrap_probability: ddp::params::DEFAULT_WRAP_PROBABILITY,
        rotation_seed: [0; 32],
    }
}

/// ε of `steps` rounds of distributed discrete-Gaussian noise (docs/ddp.md): each round
/// Poisson-samples devices with probability `q`, at most `cohort` of them, and charges the
/// noise of `min_reports` shares, the target noise being `sigma` × `clip_norm` on updates of
/// length `dim` encoded on `bits` bits (the rounding's inflation included).
#[pyfunction]
#[pyo3(signature = (q, sigma, steps, delta, dim, cohort, min_reports, bits, clip_norm))]
#[allow(clippy::too_many_arguments)]
fn privacy_distributed_epsilon(
    py: Python<'_>,
    q: f64,
    sigma: f64,
    steps: u64,
    delta: f64,
    dim: usize,
    cohort: usize,
    min_reports: usize,
    bits: u32,
    clip_norm: f64,
) -> PyResult<f64> {
    py.detach(|| {
        let params = ddp_template(sigma, dim, cohort, min_reports, bits, clip_norm).validate()?;
        let event = DdpEvent::new(&params, min_reports, q, steps)?;
        ddp::accountant::epsilon(&[event], delta)
    })
    .map_err(|e| ddp_err(&e))
}

/// The smallest noise multiplier (target noise over `clip_norm`) for which `steps` rounds of
/// distributed noise spend at most `epsilon` (`ddp::noise_for`, what `fedrec-sim run
/// --mechanism distributed --epsilon` calibrates with).
#[pyfunction]
#[pyo3(signature = (epsilon, delta, q, steps, dim, cohort, min_reports, bits, clip_norm))]
#[allow(clippy::too_many_arguments)]
fn privacy_distributed_sigma(
    py: Python<'_>,
    epsilon: f64,
    delta: f64,
    q: f64,
    steps: u64,
    dim: usize,
    cohort: usize,
    min_reports: usize,
    bits: u32,
    clip_norm: f64,
) -> PyResult<f64> {
    let template = ddp_template(1.0, dim, cohort, min_reports, bits, clip_norm);
    py.detach(|| ddp::noise_for(epsilon, delta, q, steps, &template))
        .map(|noise_std| noise_std / clip_norm)
        .map_err(|e| ddp_err(&e))
}

/// Adds the functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(privacy_epsilon, m)?)?;
    m.add_function(wrap_pyfunction!(privacy_epsilon_of_events, m)?)?;
    m.add_function(wrap_pyfunction!(privacy_delta, m)?)?;
    m.add_function(wrap_pyfunction!(privacy_sigma, m)?)?;
    m.add_function(wrap_pyfunction!(privacy_distributed_epsilon, m)?)?;
    m.add_function(wrap_pyfunction!(privacy_distributed_sigma, m)?)?;
    m.add_function(wrap_pyfunction!(privacy_combined_noise_multiplier, m)?)?;
    m.add_function(wrap_pyfunction!(privacy_update_noise_multiplier, m)?)?;
    Ok(())
}
