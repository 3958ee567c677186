//! Bindings of the dipole inversions added beside TKD and TV-ADMM: Tikhonov, iLSQR,
//! weighted/weak-harmonic TV-ADMM (FANSI-style), MEDI-style L1, RTS, NDI and the
//! single-step Laplacian TV with a local-field anchor (sstv).
//!
//! Same conventions as `qsm.rs`: float32 C-contiguous volumes, uint8 masks, GIL released;
//! iterative solvers poll Ctrl-C and call `progress(iteration, max_iter)` every
//! [`SIGNAL_POLL_EVERY`](crate::detach::SIGNAL_POLL_EVERY) iterations.

use alsiron_core::qsm::inversion::{
    self, LsqrParams, NdiParams, RtsParams, SstvData, SstvParams, StreakingParams, WeakHarmonic,
    WeightedTvParams,
};
use numpy::{PyArray3, PyReadonlyArray3};
use pyo3::prelude::*;

use crate::convert::{
    contiguous_volume, field_mask_geometry, field_weight_and_mask, geometry, optional_volume,
    same_shape, shape_of, to_array,
};
use crate::detach::{detached_volume, run_iterative, solve_volume};

type Chi<'py> = Bound<'py, PyArray3<f32>>;

/// Closed-form Tikhonov inversion with gradient regularisation λ [mm²] → χ [ppm].
#[pyfunction]
fn tikhonov<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    lam: f64,
) -> PyResult<Chi<'py>> {
    let (geometry, f, m) = field_mask_geometry(&field, &mask, voxel_size, b0_dir)?;
    detached_volume(py, geometry.shape(), || {
        inversion::tikhonov(f, m, &geometry, lam)
    })
}

/// Weighted TV-ADMM (linear or nonlinear data term, optional weak-harmonic φ) →
/// (χ [ppm], iterations). `tv_weight` None = 1; `phase_scale` None = linear;
/// `wh_beta`/`wh_mu` None = no weak-harmonic term.
#[pyfunction]
#[pyo3(signature = (field, data_weight, tv_weight, mask, voxel_size, b0_dir, alpha,
                    mu_gradient, mu_data, max_iter, tol, phase_scale=None, wh_beta=None,
                    wh_mu=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn weighted_tv_admm<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    data_weight: PyReadonlyArray3<'py, f32>,
    tv_weight: Option<PyReadonlyArray3<'py, f32>>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    alpha: f64,
    mu_gradient: f64,
    mu_data: f64,
    max_iter: usize,
    tol: f64,
    phase_scale: Option<f64>,
    wh_beta: Option<f64>,
    wh_mu: Option<f64>,
    progress: Option<Py<PyAny>>,
) -> PyResult<(Chi<'py>, usize)> {
    let (shape, f, w, m) = field_weight_and_mask(&field, &data_weight, &mask, "data_weight")?;
    let g = optional_volume(shape, &tv_weight, "tv_weight")?;
    let weak_harmonic = match (wh_beta, wh_mu) {
        (Some(beta), Some(mu)) => Some(WeakHarmonic { beta, mu }),
        (None, None) => None,
        _ => {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "give both wh_beta and wh_mu for the weak-harmonic term, or neither",
            ))
        }
    };
    let params = WeightedTvParams {
        alpha,
        mu_gradient,
        mu_data,
        max_iter,
        tol,
        phase_scale,
        weak_harmonic,
    };
    let geometry = geometry(shape, voxel_size, b0_dir)?;
    solve_volume(py, shape, progress, max_iter, |stop| {
        inversion::weighted_tv_admm(f, w, g, m, &geometry, params, stop)
    })
}

/// MEDI gradient weight from the magnitude: 0 on the `edge_fraction` of mask voxels with
/// the largest gradient, 1 elsewhere (float32).
#[pyfunction]
fn edge_weight<'py>(
    py: Python<'py>,
    magnitude: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    edge_fraction: f64,
) -> PyResult<Chi<'py>> {
    let shape = shape_of(&magnitude);
    same_shape(shape, shape_of(&mask), "mask")?;
    let (a, m) = (
        contiguous_volume(&magnitude, "magnitude")?,
        contiguous_volume(&mask, "mask")?,
    );
    detached_volume(py, shape, || {
        inversion::edge_weight(a, m, shape, voxel_size, edge_fraction)
    })
}

/// Rapid two-step inversion (step 1: `lsqr_iter` LSQR iterations on the masked model)
/// → (χ [ppm], TV iterations).
#[pyfunction]
#[pyo3(signature = (field, mask, voxel_size, b0_dir, delta, mu, rho, max_iter, tol,
                    lsqr_iter=16, progress=None))]
#[allow(clippy::too_many_arguments)]
fn rts<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    delta: f64,
    mu: f64,
    rho: f64,
    max_iter: usize,
    tol: f64,
    lsqr_iter: usize,
    progress: Option<Py<PyAny>>,
) -> PyResult<(Chi<'py>, usize)> {
    let (geometry, f, m) = field_mask_geometry(&field, &mask, voxel_size, b0_dir)?;
    let params = RtsParams {
        delta,
        lsqr_iter,
        mu,
        rho,
        max_iter,
        tol,
    };
    solve_volume(
        py,
        geometry.shape(),
        progress,
        lsqr_iter + max_iter,
        |stop| inversion::rts(f, m, &geometry, params, stop),
    )
}

/// Nonlinear dipole inversion → (χ [ppm], iterations).
#[pyfunction]
#[pyo3(signature = (field, weight, mask, voxel_size, b0_dir, phase_scale, lam, step,
                    max_iter, tol, progress=None))]
#[allow(clippy::too_many_arguments)]
fn ndi<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    weight: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    phase_scale: f64,
    lam: f64,
    step: f64,
    max_iter: usize,
    tol: f64,
    progress: Option<Py<PyAny>>,
) -> PyResult<(Chi<'py>, usize)> {
    let (shape, f, w, m) = field_weight_and_mask(&field, &weight, &mask, "weight")?;
    let params = NdiParams {
        phase_scale,
        lambda: lam,
        step,
        max_iter,
        tol,
    };
    let geometry = geometry(shape, voxel_size, b0_dir)?;
    solve_volume(py, shape, progress, max_iter, |stop| {
        inversion::ndi(f, w, m, &geometry, params, stop)
    })
}

/// LSQR core of iLSQR on the weighted dipole model → (χ [ppm], iterations).
#[pyfunction]
#[pyo3(signature = (field, weight, mask, voxel_size, b0_dir, tol, max_iter, progress=None))]
#[allow(clippy::too_many_arguments)]
fn ilsqr<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    weight: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    tol: f64,
    max_iter: usize,
    progress: Option<Py<PyAny>>,
) -> PyResult<(Chi<'py>, usize)> {
    let (shape, f, w, m) = field_weight_and_mask(&field, &weight, &mask, "weight")?;
    let params = LsqrParams { tol, max_iter };
    let geometry = geometry(shape, voxel_size, b0_dir)?;
    solve_volume(py, shape, progress, max_iter, |stop| {
        inversion::ilsqr(f, w, m, &geometry, params, stop)
    })
}

/// Full iLSQR (LSQR, fast QSM estimate, streaking estimate, subtraction) →
/// (χ [ppm], LSQR iterations, streaking iterations).
#[pyfunction]
#[pyo3(signature = (field, weight, mask, voxel_size, b0_dir, tol, max_iter,
                    ill_threshold=0.1, streak_tol=1e-2, streak_max_iter=50, progress=None))]
#[allow(clippy::too_many_arguments)]
fn ilsqr_streaking<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    weight: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    tol: f64,
    max_iter: usize,
    ill_threshold: f64,
    streak_tol: f64,
    streak_max_iter: usize,
    progress: Option<Py<PyAny>>,
) -> PyResult<(Chi<'py>, usize, usize)> {
    let (shape, f, w, m) = field_weight_and_mask(&field, &weight, &mask, "weight")?;
    let lsqr = LsqrParams { tol, max_iter };
    let streaking = StreakingParams {
        ill_threshold,
        tol: streak_tol,
        max_iter: streak_max_iter,
    };
    let geometry = geometry(shape, voxel_size, b0_dir)?;
    let (chi, it) = run_iterative(py, progress, max_iter + streak_max_iter, |stop| {
        inversion::ilsqr_streaking(f, w, m, &geometry, lsqr, streaking, stop)
    })?;
    Ok((to_array(py, shape, chi)?, it.lsqr, it.streaking))
}

/// iLSQR's fast QSM estimate (sign of D, k-space smoothing, scaled to TKD) → χ [ppm].
#[pyfunction]
fn ilsqr_fast_estimate<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
) -> PyResult<Chi<'py>> {
    let (geometry, f, m) = field_mask_geometry(&field, &mask, voxel_size, b0_dir)?;
    detached_volume(py, geometry.shape(), || {
        inversion::ilsqr_fast_estimate(f, m, &geometry)
    })
}

/// Single-step Laplacian TV with a local-field anchor → (χ [ppm] on the whole grid,
/// zero-mean, unmasked; iterations). `laplacian_data` [ppm/mm²] and `local_field` [ppm]
/// with their float32 weights ≥ 0.
#[pyfunction]
#[pyo3(signature = (laplacian_data, laplacian_weight, local_field, local_weight, voxel_size,
                    b0_dir, alpha, beta, mu1, mu2, mu3, tol, max_iter, progress=None))]
#[allow(clippy::too_many_arguments)]
fn sstv_admm<'py>(
    py: Python<'py>,
    laplacian_data: PyReadonlyArray3<'py, f32>,
    laplacian_weight: PyReadonlyArray3<'py, f32>,
    local_field: PyReadonlyArray3<'py, f32>,
    local_weight: PyReadonlyArray3<'py, f32>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    alpha: f64,
    beta: f64,
    mu1: f64,
    mu2: f64,
    mu3: f64,
    tol: f64,
    max_iter: usize,
    progress: Option<Py<PyAny>>,
) -> PyResult<(Chi<'py>, usize)> {
    let shape = shape_of(&laplacian_data);
    for (volume, what) in [
        (&laplacian_weight, "laplacian_weight"),
        (&local_field, "local_field"),
        (&local_weight, "local_weight"),
    ] {
        same_shape(shape, shape_of(volume), what)?;
    }
    let data = SstvData {
        laplacian: contiguous_volume(&laplacian_data, "laplacian_data")?,
        laplacian_weight: contiguous_volume(&laplacian_weight, "laplacian_weight")?,
        local_field: contiguous_volume(&local_field, "local_field")?,
        local_weight: contiguous_volume(&local_weight, "local_weight")?,
    };
    let params = SstvParams {
        alpha,
        beta,
        mu1,
        mu2,
        mu3,
        max_iter,
        tol,
    };
    let geometry = geometry(shape, voxel_size, b0_dir)?;
    solve_volume(py, shape, progress, max_iter, |stop| {
        inversion::sstv_admm(data, &geometry, params, stop)
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ilsqr_streaking, m)?)?;
    m.add_function(wrap_pyfunction!(ilsqr_fast_estimate, m)?)?;
    m.add_function(wrap_pyfunction!(tikhonov, m)?)?;
    m.add_function(wrap_pyfunction!(weighted_tv_admm, m)?)?;
    m.add_function(wrap_pyfunction!(edge_weight, m)?)?;
    m.add_function(wrap_pyfunction!(rts, m)?)?;
    m.add_function(wrap_pyfunction!(ndi, m)?)?;
    m.add_function(wrap_pyfunction!(ilsqr, m)?)?;
    m.add_function(wrap_pyfunction!(sstv_admm, m)?)?;
    Ok(())
}
