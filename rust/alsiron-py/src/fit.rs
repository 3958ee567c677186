//! Bindings for phase unwrapping, multi-echo field fitting and the R2* fit.
//!
//! Every input must be C-contiguous with the dtype named in the signature (the Python
//! wrappers in `alsiron.fieldmap` / `alsiron.relax` convert once); outputs are new arrays.

use alsiron_core::field::{fieldmap, unwrap};
use alsiron_core::relax::epg::{CpmgSequence, EpgFitOptions, EpgOutputs};
use alsiron_core::relax::r2star_fit::{R2starMethod, R2starOptions, R2starOutputs};
use alsiron_core::relax::{epg, r2star, r2star_fit};
use numpy::ndarray::{Array1, Array2};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArray3, PyReadonlyArray1, PyReadonlyArray2};
use numpy::{PyReadonlyArray3, PyReadonlyArray4, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::convert::{
    contiguous, echoes_and_voxels, layout, optional, output, phase_magnitude_mask, same_dims,
    shape3, slice_mut, to_array, writable,
};
use crate::detach::{detached, detached_volume};
use crate::errors::to_py;

/// The magnitude must have one echo per echo time (the fit bindings' message).
fn check_echo_count(n_echo: usize, n_te: usize) -> PyResult<()> {
    if n_echo != n_te {
        return Err(PyValueError::new_err(format!(
            "magnitude has {n_echo} echoes but {n_te} echo times were given"
        )));
    }
    Ok(())
}

/// Unwrap a 3-D wrapped phase [rad] guided by the magnitude inside a mask.
///
/// Voxels outside the mask (or with non-finite input) keep their input value.
#[pyfunction]
fn unwrap_phase<'py>(
    py: Python<'py>,
    phase: PyReadonlyArray3<'py, f32>,
    magnitude: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let (shape, p, m, k) = phase_magnitude_mask(&phase, &magnitude, &mask)?;
    detached_volume(py, shape, || {
        unwrap::unwrap_phase_3d(p, Some(m), Some(k), shape)
    })
}

type FieldMaps<'py> = (
    Bound<'py, PyArray3<f32>>,
    Bound<'py, PyArray3<f32>>,
    Bound<'py, PyArray3<f32>>,
);

/// Fit ω [rad/s], φ0 [rad] and the weighted RMS phase residual [rad] from echo-major
/// magnitude and phase `(E, X, Y, Z)`; NaN outside the mask.
#[pyfunction]
fn fit_multi_echo_field<'py>(
    py: Python<'py>,
    magnitude: PyReadonlyArray4<'py, f32>,
    phase: PyReadonlyArray4<'py, f32>,
    echo_times: Vec<f64>,
    mask: PyReadonlyArray3<'py, u8>,
) -> PyResult<FieldMaps<'py>> {
    let dims = magnitude.shape().to_vec();
    same_dims(&dims, phase.shape(), "phase")?;
    same_dims(&dims[1..], mask.shape(), "mask")?;
    check_echo_count(dims[0], echo_times.len())?;
    let shape = shape3(&dims[1..]);
    let (m, p, k) = (
        contiguous(&magnitude, "magnitude")?,
        contiguous(&phase, "phase")?,
        contiguous(&mask, "mask")?,
    );
    let fit = detached(py, || {
        fieldmap::fit_multi_echo_field(m, p, &echo_times, shape, Some(k))
    })?;
    Ok((
        to_array(py, shape, fit.omega)?,
        to_array(py, shape, fit.phase_offset)?,
        to_array(py, shape, fit.residual)?,
    ))
}

type R2starMaps<'py> = (
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<u8>>,
);

/// Log-linear R2* fit of echo-major magnitude `(E, N)` (or voxel-major `(N, E)` with
/// `voxel_major=True`, e.g. a C-ordered (X, Y, Z, E) array reshaped, fitted without a
/// transposing copy): returns R2* [s⁻¹], S0 and a status code per voxel (0 ok, 1 bad
/// magnitude, 2 degenerate fit, 3 outside mask).
#[pyfunction]
#[pyo3(signature = (magnitude, echo_times, mask=None, weighted=false, voxel_major=false))]
fn fit_r2star_loglinear<'py>(
    py: Python<'py>,
    magnitude: PyReadonlyArray2<'py, f32>,
    echo_times: Vec<f64>,
    mask: Option<PyReadonlyArray1<'py, u8>>,
    weighted: bool,
    voxel_major: bool,
) -> PyResult<R2starMaps<'py>> {
    let [n_echo, n] = echoes_and_voxels(magnitude.shape(), voxel_major);
    check_echo_count(n_echo, echo_times.len())?;
    let m = contiguous(&magnitude, "magnitude")?;
    let k = optional(&mask, "mask")?;
    let (r2_arr, s0_arr, status_arr) = (output(py, n), output(py, n), output(py, n));
    {
        let (mut r2w, mut s0w, mut stw) = (
            writable(&r2_arr)?,
            writable(&s0_arr)?,
            writable(&status_arr)?,
        );
        let (r2, s0, status) = (
            slice_mut(&mut r2w)?,
            slice_mut(&mut s0w)?,
            slice_mut(&mut stw)?,
        );
        detached(py, || {
            r2star::fit_r2star_loglinear_layout_into(
                m,
                layout(voxel_major),
                &echo_times,
                k,
                weighted,
                r2,
                s0,
                status,
            )
        })?;
    }
    Ok((r2_arr, s0_arr, status_arr))
}

type R2starQualityMaps<'py> = (
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<u8>>,
);

/// R2* fit of echo-major magnitude `(E, N)` (voxel-major `(N, E)` with `voxel_major=True`)
/// by `method` ("loglinear", "weighted", "arlo", "nlls"): returns R2* [s⁻¹], S0, CRLB
/// standard deviation of R2* [s⁻¹], R² goodness of fit and a status code per voxel (0 ok,
/// 1 bad magnitude, 2 degenerate, 3 outside mask, 4 not converged). `noise_sigma`
/// switches the nonlinear fit to the Rician model; `quality=False` skips the R² and CRLB
/// maps (NaN).
#[pyfunction]
#[pyo3(signature = (magnitude, echo_times, mask=None, method="weighted", noise_sigma=None, max_iter=100, quality=true, voxel_major=false))]
#[allow(clippy::too_many_arguments)]
fn fit_r2star<'py>(
    py: Python<'py>,
    magnitude: PyReadonlyArray2<'py, f32>,
    echo_times: Vec<f64>,
    mask: Option<PyReadonlyArray1<'py, u8>>,
    method: &str,
    noise_sigma: Option<f64>,
    max_iter: usize,
    quality: bool,
    voxel_major: bool,
) -> PyResult<R2starQualityMaps<'py>> {
    let [n_echo, n] = echoes_and_voxels(magnitude.shape(), voxel_major);
    check_echo_count(n_echo, echo_times.len())?;
    let options = R2starOptions {
        method: R2starMethod::from_name(method).map_err(to_py)?,
        noise_sigma,
        max_iter,
        quality,
        layout: layout(voxel_major),
    };
    let m = contiguous(&magnitude, "magnitude")?;
    let k = optional(&mask, "mask")?;
    let (r2_arr, s0_arr) = (output(py, n), output(py, n));
    let (sd_arr, gof_arr, status_arr) = (output(py, n), output(py, n), output(py, n));
    {
        let (mut r2w, mut s0w) = (writable(&r2_arr)?, writable(&s0_arr)?);
        let (mut sdw, mut gofw, mut stw) = (
            writable(&sd_arr)?,
            writable(&gof_arr)?,
            writable(&status_arr)?,
        );
        let out = R2starOutputs {
            r2star: slice_mut(&mut r2w)?,
            s0: slice_mut(&mut s0w)?,
            sd: slice_mut(&mut sdw)?,
            gof: slice_mut(&mut gofw)?,
            status: slice_mut(&mut stw)?,
        };
        detached(py, || {
            r2star_fit::fit_r2star_into(m, &echo_times, k, &options, out)
        })?;
    }
    Ok((r2_arr, s0_arr, sd_arr, gof_arr, status_arr))
}

/// Echo trains (S0 = 1) of a CPMG multi-echo spin echo by extended phase graphs for
/// per-voxel T2 [s] and B1 scale: returns `(E, N)` float32.
#[pyfunction]
#[pyo3(signature = (t2, b1, n_echo, echo_spacing, refocusing_deg, t1=1.0))]
fn cpmg_echo_trains<'py>(
    py: Python<'py>,
    t2: PyReadonlyArray1<'py, f64>,
    b1: PyReadonlyArray1<'py, f64>,
    n_echo: usize,
    echo_spacing: f64,
    refocusing_deg: f64,
    t1: f64,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let seq = CpmgSequence {
        n_echo,
        echo_spacing,
        refocusing_deg,
        t1,
    };
    let (t, b) = (contiguous(&t2, "t2")?, contiguous(&b1, "b1")?);
    let n = t.len();
    let flat = detached(py, || epg::cpmg_echo_trains(&seq, t, b))?;
    Array2::from_shape_vec((n_echo, n), flat)
        .map(|a| a.into_pyarray(py))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Stimulated-echo corrected T2 fit of echo-major MESE magnitude `(E, N)` (echoes at
/// k·ESP): returns T2 [s], S0, B1 scale, R² and status (0 ok, 1 bad magnitude,
/// 2 degenerate, 3 outside mask, 4 not converged).
#[pyfunction]
#[pyo3(signature = (magnitude, echo_spacing, refocusing_deg, mask=None, t1=1.0, t2_min=0.005, t2_max=2.0, b1_min=0.3, max_iter=200))]
#[allow(clippy::too_many_arguments)]
fn fit_t2_epg<'py>(
    py: Python<'py>,
    magnitude: PyReadonlyArray2<'py, f32>,
    echo_spacing: f64,
    refocusing_deg: f64,
    mask: Option<PyReadonlyArray1<'py, u8>>,
    t1: f64,
    t2_min: f64,
    t2_max: f64,
    b1_min: f64,
    max_iter: usize,
) -> PyResult<R2starQualityMaps<'py>> {
    let [n_echo, n] = [magnitude.shape()[0], magnitude.shape()[1]];
    let options = EpgFitOptions {
        sequence: CpmgSequence {
            n_echo,
            echo_spacing,
            refocusing_deg,
            t1,
        },
        t2_bounds: (t2_min, t2_max),
        b1_min,
        max_iter,
    };
    let m = contiguous(&magnitude, "magnitude")?;
    let k = optional(&mask, "mask")?;
    let (mut t2, mut s0) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (mut b1, mut gof) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut status = vec![0u8; n];
    detached(py, || {
        epg::fit_t2_epg_into(
            m,
            k,
            &options,
            EpgOutputs {
                t2: &mut t2,
                s0: &mut s0,
                b1: &mut b1,
                gof: &mut gof,
                status: &mut status,
            },
        )
    })?;
    Ok((
        Array1::from_vec(t2).into_pyarray(py),
        Array1::from_vec(s0).into_pyarray(py),
        Array1::from_vec(b1).into_pyarray(py),
        Array1::from_vec(gof).into_pyarray(py),
        Array1::from_vec(status).into_pyarray(py),
    ))
}

/// Add this module's functions to `alsiron._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(unwrap_phase, m)?)?;
    m.add_function(wrap_pyfunction!(fit_multi_echo_field, m)?)?;
    m.add_function(wrap_pyfunction!(fit_r2star_loglinear, m)?)?;
    m.add_function(wrap_pyfunction!(fit_r2star, m)?)?;
    m.add_function(wrap_pyfunction!(cpmg_echo_trains, m)?)?;
    m.add_function(wrap_pyfunction!(fit_t2_epg, m)?)?;
    Ok(())
}
