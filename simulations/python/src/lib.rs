//! `fedrec._fedrec`: the native half of the Python package `fedrec` — the simulator's data, federation, audit and the shared privacy accountants, called from Python.
//!
//! Nothing here reimplements the simulator: every function calls the code `fedrec-sim` runs
//! (`fedrec_sim::data`, `fedrec_sim::federation::run`, `fedrec_shared::privacy`) and converts
//! its inputs and outputs. The Python side (`python/fedrec/`) adds keyword signatures,
//! docstrings and type stubs.
#![forbid(unsafe_code)]

mod convert;
mod data;
mod errors;
mod privacy;
mod sim;

use pyo3::prelude::*;

/// The native module. Its submodules' functions are registered flat, with prefixes the Python
/// package strips (`privacy_epsilon` becomes `fedrec.privacy.epsilon`).
#[pymodule]
fn _fedrec(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    privacy::register(m)?;
    data::register(m)?;
    sim::register(m)?;
    Ok(())
}
