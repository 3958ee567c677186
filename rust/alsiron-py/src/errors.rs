//! The single place where core errors become Python exceptions.

use alsiron_core::CoreError;
use pyo3::exceptions::{PyKeyboardInterrupt, PyValueError};
use pyo3::PyErr;

/// Map a core error to the Python exception a user can act on.
pub fn to_py(err: CoreError) -> PyErr {
    match err {
        CoreError::Interrupted => PyKeyboardInterrupt::new_err("interrupted"),
        other => PyValueError::new_err(other.to_string()),
    }
}
