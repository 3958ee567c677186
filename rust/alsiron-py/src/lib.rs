//! `alsiron._core`: thin PyO3 bindings over `alsiron-core`.
//!
//! Every function validates array layout, converts numpy arrays once, releases the GIL
//! around the numerical work (`py.detach`) and maps `CoreError` to Python exceptions in
//! [`errors::to_py`].

use pyo3::prelude::*;

mod errors;
mod fit;

/// Number of threads in the global rayon pool.
#[pyfunction]
fn num_threads() -> usize {
    rayon::current_num_threads()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    fit::register(m)?;
    Ok(())
}
