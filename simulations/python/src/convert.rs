//! Conversions between the simulator's serializable reports and Python objects.

use pyo3::prelude::*;
use serde::Serialize;

/// Any serializable report as a Python object: its JSON text, exactly as the CLI's `--json`
/// writes it, read back by Python's `json.loads` (so a dict here has the keys and the values
/// of the CLI's file, f32 fields included).
pub fn to_py<'py, T: Serialize>(py: Python<'py>, value: &T) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value)
        .map_err(|e| crate::errors::SimulationError::new_err(format!("cannot convert a report: {e}")))?;
    py.import("json")?.call_method1("loads", (text,))
}
