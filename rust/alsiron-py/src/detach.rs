//! Running core kernels with the GIL released: one call for a closed-form kernel (its
//! error mapped by [`to_py`], its volume returned as a numpy array) and one for an
//! iterative solver (Ctrl-C and the `progress` callback polled every
//! [`SIGNAL_POLL_EVERY`] iterations, an exception from either re-raised).

use alsiron_core::{CoreResult, Shape3};
use numpy::PyArray3;
use pyo3::prelude::*;
use std::sync::Mutex;

use crate::convert::to_array;
use crate::errors::to_py;

/// How often (in ADMM iterations) the solver polls Python for Ctrl-C: an iteration at
/// 256³ takes ~0.1–0.3 s, so this keeps interrupts responsive without attaching every time.
pub(crate) const SIGNAL_POLL_EVERY: usize = 2;

/// Run `kernel` with the GIL released; a core error becomes its Python exception.
pub(crate) fn detached<T: Send>(
    py: Python<'_>,
    kernel: impl FnOnce() -> CoreResult<T> + Send,
) -> PyResult<T> {
    py.detach(kernel).map_err(to_py)
}

/// [`detached`] for a kernel that returns one volume of `shape` (C order) → numpy array.
pub(crate) fn detached_volume<'py, T: numpy::Element + Send>(
    py: Python<'py>,
    shape: Shape3,
    kernel: impl FnOnce() -> CoreResult<Vec<T>> + Send,
) -> PyResult<Bound<'py, PyArray3<T>>> {
    to_array(py, shape, detached(py, kernel)?)
}

/// A `should_stop` for detached iterative solvers: every `every` iterations it takes
/// the GIL and runs Python's signal handlers, so Ctrl-C stops the solver.
pub(crate) fn poll_signals_every(every: usize) -> impl Fn(usize) -> bool + Sync {
    move |iter: usize| iter % every == 0 && Python::attach(|py| py.check_signals().is_err())
}

/// Run a detached iterative solver that polls `should_stop`: Ctrl-C or an exception from
/// `progress` (called as `progress(iteration, max_iter)` with the GIL held) stops it and
/// is re-raised.
pub(crate) fn run_iterative<T: Send>(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    max_iter: usize,
    solve: impl FnOnce(&(dyn Fn(usize) -> bool + Sync)) -> CoreResult<T> + Send,
) -> PyResult<T> {
    let pending: Mutex<Option<PyErr>> = Mutex::new(None);
    let should_stop = |iter: usize| {
        if iter % SIGNAL_POLL_EVERY != 0 {
            return false;
        }
        let outcome = Python::attach(|py| -> PyResult<()> {
            py.check_signals()?;
            if let Some(cb) = &progress {
                cb.call1(py, (iter, max_iter))?;
            }
            Ok(())
        });
        match outcome {
            Ok(()) => false,
            Err(err) => {
                if let Ok(mut slot) = pending.lock() {
                    slot.get_or_insert(err);
                }
                true
            }
        }
    };
    let result = py.detach(|| solve(&should_stop));
    if let Some(err) = pending.into_inner().ok().flatten() {
        return Err(err);
    }
    result.map_err(to_py)
}

/// [`run_iterative`] for a solver that returns (volume of `shape`, iterations run) →
/// (numpy array, iterations).
pub(crate) fn solve_volume<'py>(
    py: Python<'py>,
    shape: Shape3,
    progress: Option<Py<PyAny>>,
    max_iter: usize,
    solve: impl FnOnce(&(dyn Fn(usize) -> bool + Sync)) -> CoreResult<(Vec<f32>, usize)> + Send,
) -> PyResult<(Bound<'py, PyArray3<f32>>, usize)> {
    let (volume, iterations) = run_iterative(py, progress, max_iter, solve)?;
    Ok((to_array(py, shape, volume)?, iterations))
}
