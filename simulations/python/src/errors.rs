//! The `FedrecError` exception hierarchy and the conversions from the crates' typed errors.
//!
//! Messages are the ones the CLI prints: the error's `Display`, with anyhow's context chain
//! joined by `: ` as `fedrec-sim` shows it after `Error:`.

use fedrec_shared::privacy::PrivacyError as SharedPrivacyError;
use fedrec_sim::data::DataError as SimDataError;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(_fedrec, FedrecError, PyException, "Base class of every error fedrec raises.");
create_exception!(
    _fedrec,
    PrivacyError,
    FedrecError,
    "An accountant or calibration refused its inputs (a q outside [0, 1], δ outside (0, 1), an unreachable ε, ...)."
);
create_exception!(
    _fedrec,
    ConfigError,
    FedrecError,
    "A keyword argument has an unknown name or an unusable value."
);
create_exception!(_fedrec, DataError, FedrecError, "A dataset could not be loaded, split or fetched.");
create_exception!(
    _fedrec,
    MalformedDataError,
    DataError,
    "A line of a data file does not have the expected shape."
);
create_exception!(
    _fedrec,
    FetchError,
    DataError,
    "Downloading or unpacking a dataset failed (offline, no pip, ...)."
);
create_exception!(
    _fedrec,
    ChecksumError,
    FetchError,
    "A downloaded file does not have the expected SHA-256 digest."
);
create_exception!(_fedrec, SimulationError, FedrecError, "A federation, sweep or audit failed.");

/// Adds the exception classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("FedrecError", py.get_type::<FedrecError>())?;
    m.add("PrivacyError", py.get_type::<PrivacyError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("DataError", py.get_type::<DataError>())?;
    m.add("MalformedDataError", py.get_type::<MalformedDataError>())?;
    m.add("FetchError", py.get_type::<FetchError>())?;
    m.add("ChecksumError", py.get_type::<ChecksumError>())?;
    m.add("SimulationError", py.get_type::<SimulationError>())?;
    Ok(())
}

/// The accountants' errors.
pub fn privacy_err(e: &SharedPrivacyError) -> PyErr {
    PrivacyError::new_err(e.to_string())
}

/// The distributed mechanism's errors (its parameters or its accountant).
pub fn ddp_err(e: &fedrec_shared::ddp::DdpError) -> PyErr {
    PrivacyError::new_err(e.to_string())
}

/// The data module's errors, with the subclass that says what went wrong.
pub fn data_err(e: &SimDataError) -> PyErr {
    data_ctor(e)(chain(e))
}

/// The exception class of a data error, as a constructor.
fn data_ctor(e: &SimDataError) -> fn(String) -> PyErr {
    match e {
        SimDataError::Malformed { .. } | SimDataError::Empty { .. } => MalformedDataError::new_err,
        SimDataError::Checksum { .. } => ChecksumError::new_err,
        SimDataError::Fetch(_) => FetchError::new_err,
        _ => DataError::new_err,
    }
}

/// An error from the simulator's functions (anyhow), typed by its root cause when that is a
/// data or privacy error. The message is the CLI's: the whole context chain.
pub fn sim_err(e: &anyhow::Error) -> PyErr {
    let msg = format!("{e:#}");
    for cause in e.chain() {
        if let Some(d) = cause.downcast_ref::<SimDataError>() {
            return data_ctor(d)(msg);
        }
        if cause.downcast_ref::<SharedPrivacyError>().is_some() {
            return PrivacyError::new_err(msg);
        }
    }
    SimulationError::new_err(msg)
}

/// `Display` of an error and its sources, joined as anyhow's `{:#}` joins them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// A bad keyword argument.
pub fn config_err(msg: impl Into<String>) -> PyErr {
    ConfigError::new_err(msg.into())
}
