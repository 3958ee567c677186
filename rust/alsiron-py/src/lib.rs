//! `alsiron._core`: thin PyO3 bindings over `alsiron-core`.
//!
//! Every function validates array layout and converts numpy arrays once (shared checks
//! and conversions in [`convert`]), releases the GIL around the numerical work
//! ([`detach`]) and maps `CoreError` to Python exceptions in [`errors::to_py`].

use pyo3::prelude::*;

mod convert;
mod detach;
mod errors;
mod field;
mod fit;
mod qsm;
mod qsm_inversion;
mod surface;

/// Number of threads in the global rayon pool.
#[pyfunction]
fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// Size the global rayon pool; must run before the first parallel call.
///
/// Returns False (and changes nothing) when the pool already exists, e.g. because a
/// kernel ran earlier in this process.
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<bool> {
    if n == 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "number of threads must be at least 1",
        ));
    }
    Ok(rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .is_ok())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    qsm::register(m)?;
    qsm_inversion::register(m)?;
    fit::register(m)?;
    field::register(m)?;
    surface::register(m)?;
    Ok(())
}
