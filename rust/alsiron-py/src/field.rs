//! Bindings for multi-echo ROMEO-style unwrapping, Laplacian unwrapping, temporal
//! unwrapping and the linear / nonlinear complex field fits.
//!
//! Every input must be C-contiguous float32 (uint8 masks); the Python wrappers in
//! `alsiron.fieldmap` convert once. Outputs are new arrays.

use alsiron_core::field::unwrap_laplacian as laplacian;
use alsiron_core::field::{fieldfit, unwrap};
use numpy::ndarray::Array4;
use numpy::PyUntypedArrayMethods;
use numpy::{IntoPyArray, PyArray3, PyArray4, PyReadonlyArray3, PyReadonlyArray4};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::convert::{
    contiguous, echo_series, echoes_shape, phase_magnitude_mask, same_dims, shape3, to_array,
};
use crate::detach::{detached, detached_volume};

type TwoVolumes<'py> = (Bound<'py, PyArray3<f32>>, Bound<'py, PyArray3<f32>>);

/// ROMEO-style unwrapping of one echo: edge weights from phase coherence, magnitude and
/// (when `second_phase` is given) the phase-gradient coherence with a second echo whose
/// echo time is `TE_this / te_ratio`. Returns the unwrapped phase [rad].
#[pyfunction]
#[pyo3(signature = (phase, magnitude, mask, second_phase=None, te_ratio=1.0))]
fn unwrap_romeo<'py>(
    py: Python<'py>,
    phase: PyReadonlyArray3<'py, f32>,
    magnitude: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    second_phase: Option<PyReadonlyArray3<'py, f32>>,
    te_ratio: f32,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let (shape, p, m, k) = phase_magnitude_mask(&phase, &magnitude, &mask)?;
    let second = match &second_phase {
        Some(s) => {
            same_dims(&shape.0, s.shape(), "second-echo phase")?;
            Some(unwrap::SecondEcho {
                phase: contiguous(s, "second-echo phase")?,
                te_ratio,
            })
        }
        None => None,
    };
    detached_volume(py, shape, || {
        unwrap::unwrap_romeo_phase(p, Some(m), second, Some(k), shape)
    })
}

/// Laplacian unwrapping: returns (snapped phase = input + 2πk, raw smooth estimate) [rad].
#[pyfunction]
fn unwrap_laplacian<'py>(
    py: Python<'py>,
    phase: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
) -> PyResult<TwoVolumes<'py>> {
    let dims = phase.shape().to_vec();
    same_dims(&dims, mask.shape(), "mask")?;
    let shape = shape3(&dims);
    let (p, k) = (contiguous(&phase, "phase")?, contiguous(&mask, "mask")?);
    let out = detached(py, || laplacian::unwrap_laplacian(p, Some(k), shape))?;
    Ok((
        to_array(py, shape, out.phase)?,
        to_array(py, shape, out.raw)?,
    ))
}

/// Temporal unwrapping of offset-free echo-major phases `(E, X, Y, Z)` from the spatially
/// unwrapped phase of echo `reference_echo`.
#[pyfunction]
fn unwrap_echoes_temporal<'py>(
    py: Python<'py>,
    phase: PyReadonlyArray4<'py, f32>,
    echo_times: Vec<f64>,
    reference: PyReadonlyArray3<'py, f32>,
    reference_echo: usize,
) -> PyResult<Bound<'py, PyArray4<f32>>> {
    let dims = phase.shape().to_vec();
    let shape = echoes_shape(&dims, echo_times.len())?;
    same_dims(&dims[1..], reference.shape(), "reference")?;
    let (p, r) = (
        contiguous(&phase, "phase")?,
        contiguous(&reference, "reference")?,
    );
    let out = detached(py, || {
        fieldfit::unwrap_echoes_temporal(p, &echo_times, r, reference_echo, shape)
    })?;
    Array4::from_shape_vec((dims[0], dims[1], dims[2], dims[3]), out)
        .map(|a| a.into_pyarray(py))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Magnitude²-weighted linear fit of unwrapped phase over TE: (ω [rad/s], φ0 [rad]);
/// `through_origin` fits only the slope of offset-free phase (φ0 = 0).
#[pyfunction]
#[pyo3(signature = (magnitude, unwrapped_phase, echo_times, mask, through_origin=false))]
fn fit_field_linear<'py>(
    py: Python<'py>,
    magnitude: PyReadonlyArray4<'py, f32>,
    unwrapped_phase: PyReadonlyArray4<'py, f32>,
    echo_times: Vec<f64>,
    mask: PyReadonlyArray3<'py, u8>,
    through_origin: bool,
) -> PyResult<TwoVolumes<'py>> {
    let (shape, m, p, k) = echo_series(&magnitude, &unwrapped_phase, echo_times.len(), &mask)?;
    let (omega, phi0) = detached(py, || {
        fieldfit::fit_field_linear(m, p, &echo_times, shape, Some(k), through_origin)
    })?;
    Ok((to_array(py, shape, omega)?, to_array(py, shape, phi0)?))
}

type ComplexFitMaps<'py> = (
    Bound<'py, PyArray3<f32>>,
    Bound<'py, PyArray3<f32>>,
    Bound<'py, PyArray3<f32>>,
    Bound<'py, PyArray3<f32>>,
    Bound<'py, PyArray3<f32>>,
    Bound<'py, PyArray3<u8>>,
);

/// Nonlinear complex fit: (ω [rad/s], φ0 [rad], residual [rad], sd(ω)/σ, σ̂, iterations).
#[pyfunction]
#[pyo3(signature = (magnitude, phase, echo_times, mask, omega_init, phase_offset_init=None,
                    max_iter=20, tol=1e-4, fixed_offset=false))]
#[allow(clippy::too_many_arguments)]
fn fit_field_complex<'py>(
    py: Python<'py>,
    magnitude: PyReadonlyArray4<'py, f32>,
    phase: PyReadonlyArray4<'py, f32>,
    echo_times: Vec<f64>,
    mask: PyReadonlyArray3<'py, u8>,
    omega_init: PyReadonlyArray3<'py, f32>,
    phase_offset_init: Option<PyReadonlyArray3<'py, f32>>,
    max_iter: usize,
    tol: f64,
    fixed_offset: bool,
) -> PyResult<ComplexFitMaps<'py>> {
    let (shape, m, p, k) = echo_series(&magnitude, &phase, echo_times.len(), &mask)?;
    same_dims(&shape.0, omega_init.shape(), "initial omega")?;
    let w = contiguous(&omega_init, "initial omega")?;
    let phi0 = match &phase_offset_init {
        Some(a) => {
            same_dims(&shape.0, a.shape(), "initial phase offset")?;
            Some(contiguous(a, "initial phase offset")?)
        }
        None => None,
    };
    let fit = detached(py, || {
        fieldfit::fit_field_complex(
            m,
            p,
            &echo_times,
            shape,
            Some(k),
            w,
            phi0,
            fixed_offset,
            max_iter,
            tol,
        )
    })?;
    Ok((
        to_array(py, shape, fit.omega)?,
        to_array(py, shape, fit.phase_offset)?,
        to_array(py, shape, fit.residual)?,
        to_array(py, shape, fit.omega_sd_per_sigma)?,
        to_array(py, shape, fit.sigma)?,
        to_array(py, shape, fit.iterations)?,
    ))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(unwrap_romeo, m)?)?;
    m.add_function(wrap_pyfunction!(unwrap_laplacian, m)?)?;
    m.add_function(wrap_pyfunction!(unwrap_echoes_temporal, m)?)?;
    m.add_function(wrap_pyfunction!(fit_field_linear, m)?)?;
    m.add_function(wrap_pyfunction!(fit_field_complex, m)?)?;
    Ok(())
}
