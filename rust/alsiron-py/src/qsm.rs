//! QSM bindings: FFT, dipole kernel, forward model, TKD, TV-ADMM, V-SHARP, PDF, iSMV, LBV.
//!
//! Arrays are 3-D, C-contiguous, float32 (masks uint8, nonzero = inside); the Python
//! wrappers in `alsiron.qsm` validate and convert before calling. The GIL is released
//! around every computation.

use alsiron_core::qsm::{bfr, dipole, inversion};
use alsiron_core::{fft, Shape3};
use numpy::{Complex32, PyArray3, PyReadonlyArray3};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::convert::{
    contiguous_volume, field_and_mask, field_mask_geometry, geometry, optional_volume, shape_of,
    to_array,
};
use crate::detach::{
    detached, detached_volume, poll_signals_every, solve_volume, SIGNAL_POLL_EVERY,
};

/// Forward 3-D real FFT (unnormalised, layout of numpy.fft.rfftn) → complex64 [nx, ny, nz//2+1].
#[pyfunction]
fn fft3_forward<'py>(
    py: Python<'py>,
    x: PyReadonlyArray3<'py, f32>,
) -> PyResult<Bound<'py, PyArray3<Complex32>>> {
    let shape = shape_of(&x);
    let data = contiguous_volume(&x, "x")?;
    detached_volume(py, shape.half_spectrum(), || fft::forward(data, shape))
}

/// Inverse of `fft3_forward` (normalised by 1/N) for a last-axis length `nz` → float32.
#[pyfunction]
fn fft3_inverse<'py>(
    py: Python<'py>,
    spectrum: PyReadonlyArray3<'py, Complex32>,
    nz: usize,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let half = shape_of(&spectrum);
    if half.0[2] != nz / 2 + 1 {
        return Err(PyValueError::new_err(format!(
            "spectrum last axis has {} bins, expected nz//2+1 = {} for nz = {nz}",
            half.0[2],
            nz / 2 + 1
        )));
    }
    let shape = Shape3([half.0[0], half.0[1], nz]);
    let data = contiguous_volume(&spectrum, "spectrum")?;
    detached_volume(py, shape, || fft::inverse(data, shape))
}

/// Dipole kernel on the half spectrum [nx, ny, nz//2+1], float32.
#[pyfunction]
fn dipole_kernel<'py>(
    py: Python<'py>,
    shape: [usize; 3],
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let shape = Shape3(shape);
    let geometry = geometry(shape, voxel_size, b0_dir)?;
    detached_volume(py, shape.half_spectrum(), || {
        dipole::dipole_kernel(&geometry)
    })
}

/// Field [ppm] of a susceptibility map χ [ppm] (periodic convolution with the dipole).
#[pyfunction]
fn forward_field<'py>(
    py: Python<'py>,
    chi: PyReadonlyArray3<'py, f32>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let shape = shape_of(&chi);
    let data = contiguous_volume(&chi, "chi")?;
    let geometry = geometry(shape, voxel_size, b0_dir)?;
    detached_volume(py, shape, || dipole::forward_field(data, &geometry))
}

/// Truncated k-space division: local field [ppm] → χ [ppm] (0 outside the mask).
#[pyfunction]
fn tkd<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    threshold: f64,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let (geometry, f, m) = field_mask_geometry(&field, &mask, voxel_size, b0_dir)?;
    detached_volume(py, geometry.shape(), || {
        inversion::tkd(f, m, &geometry, threshold)
    })
}

/// TV-regularised dipole inversion (ADMM) → (χ [ppm], iterations run).
///
/// `progress`, when given, is called as `progress(iteration, max_iter)` every few
/// iterations (with the GIL held); an exception it raises stops the solver and is
/// re-raised.
#[pyfunction]
#[pyo3(signature = (field, mask, voxel_size, b0_dir, alpha, mu, max_iter, tol, progress=None))]
#[allow(clippy::too_many_arguments)]
fn tv_admm<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    alpha: f64,
    mu: f64,
    max_iter: usize,
    tol: f64,
    progress: Option<Py<PyAny>>,
) -> PyResult<(Bound<'py, PyArray3<f32>>, usize)> {
    let (geometry, f, m) = field_mask_geometry(&field, &mask, voxel_size, b0_dir)?;
    let params = inversion::TvAdmmParams {
        alpha,
        mu,
        max_iter,
        tol,
    };
    solve_volume(py, geometry.shape(), progress, max_iter, |stop| {
        inversion::tv_admm(f, m, &geometry, params, stop)
    })
}

/// (local field float32, eroded mask uint8) returned by `vsharp`.
type LocalFieldAndMask<'py> = (Bound<'py, PyArray3<f32>>, Bound<'py, PyArray3<u8>>);

/// V-SHARP background removal → (local field [ppm], eroded mask uint8).
#[pyfunction]
fn vsharp<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    radii_mm: Vec<f64>,
    threshold: f64,
) -> PyResult<LocalFieldAndMask<'py>> {
    let (shape, f, m) = field_and_mask(&field, &mask)?;
    let (local, eroded) = detached(py, || {
        bfr::vsharp(f, m, shape, voxel_size, &radii_mm, threshold)
    })?;
    Ok((to_array(py, shape, local)?, to_array(py, shape, eroded)?))
}

/// Projection onto dipole fields → (local field [ppm], CG iterations run).
///
/// `weight` optional float32 reliability per voxel (same shape), `kernel` "kspace" or
/// "image" (dipole discretisation), `pad_voxels` zero padding added per axis,
/// `source_smoothing` the gradient penalty λ [mm²] on the background sources (0: plain PDF),
/// `sources` optional uint8 volume where background sources may sit (None: anywhere
/// outside the mask).
#[pyfunction]
#[pyo3(signature = (field, mask, weight, voxel_size, b0_dir, pad_voxels, tol, max_iter, kernel, source_smoothing=0.0, sources=None))]
#[allow(clippy::too_many_arguments)]
fn pdf<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    weight: Option<PyReadonlyArray3<'py, f32>>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    pad_voxels: [usize; 3],
    tol: f64,
    max_iter: usize,
    kernel: &str,
    source_smoothing: f64,
    sources: Option<PyReadonlyArray3<'py, u8>>,
) -> PyResult<(Bound<'py, PyArray3<f32>>, usize)> {
    let (shape, f, m) = field_and_mask(&field, &mask)?;
    let w = optional_volume(shape, &weight, "weight")?;
    let s = optional_volume(shape, &sources, "sources")?;
    let kernel = match kernel {
        "kspace" => bfr::DipoleDiscretisation::KSpace,
        "image" => bfr::DipoleDiscretisation::ImageSpace,
        other => {
            return Err(PyValueError::new_err(format!(
                "PDF kernel must be 'kspace' or 'image', got {other:?}"
            )))
        }
    };
    let params = bfr::PdfParams {
        pad_voxels,
        tol,
        max_iter,
        kernel,
        source_smoothing,
    };
    let geometry = geometry(shape, voxel_size, b0_dir)?;
    let should_stop = poll_signals_every(SIGNAL_POLL_EVERY);
    let (local, iterations) = detached(py, || {
        bfr::pdf_with_sources(f, m, w, s, &geometry, params, &should_stop)
    })?;
    Ok((to_array(py, shape, local)?, iterations))
}

/// (local field float32, eroded mask uint8, iterations) returned by `ismv` and `lbv`.
type LocalFieldMaskAndIterations<'py> =
    (Bound<'py, PyArray3<f32>>, Bound<'py, PyArray3<u8>>, usize);

/// The numpy arrays of a background removal's (local field, eroded mask, iterations).
fn local_field_mask_and_iterations(
    py: Python<'_>,
    shape: Shape3,
    (local, eroded, iterations): (Vec<f32>, Vec<u8>, usize),
) -> PyResult<LocalFieldMaskAndIterations<'_>> {
    Ok((
        to_array(py, shape, local)?,
        to_array(py, shape, eroded)?,
        iterations,
    ))
}

/// Iterative SMV background removal → (local field [ppm], eroded mask uint8, iterations).
#[pyfunction]
fn ismv<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    radius_mm: f64,
    tol: f64,
    max_iter: usize,
) -> PyResult<LocalFieldMaskAndIterations<'py>> {
    let (shape, f, m) = field_and_mask(&field, &mask)?;
    let params = bfr::IsmvParams {
        radius_mm,
        tol,
        max_iter,
    };
    // One iSMV iteration is a single FFT pair, so poll less often than ADMM.
    let should_stop = poll_signals_every(4 * SIGNAL_POLL_EVERY);
    let out = detached(py, || {
        bfr::ismv(f, m, shape, voxel_size, params, &should_stop)
    })?;
    local_field_mask_and_iterations(py, shape, out)
}

/// Laplacian boundary value background removal → (local field [ppm], interior mask uint8,
/// CG iterations).
#[pyfunction]
fn lbv<'py>(
    py: Python<'py>,
    field: PyReadonlyArray3<'py, f32>,
    mask: PyReadonlyArray3<'py, u8>,
    voxel_size: [f64; 3],
    tol: f64,
    max_iter: usize,
) -> PyResult<LocalFieldMaskAndIterations<'py>> {
    let (shape, f, m) = field_and_mask(&field, &mask)?;
    let params = bfr::LbvParams { tol, max_iter };
    // An LBV iteration is one stencil pass (no FFT): poll every 32.
    let should_stop = poll_signals_every(32);
    let out = detached(py, || {
        bfr::lbv(f, m, shape, voxel_size, params, &should_stop)
    })?;
    local_field_mask_and_iterations(py, shape, out)
}

/// Default V-SHARP radii [mm] for a voxel size [mm].
#[pyfunction]
fn vsharp_default_radii(voxel_size: [f64; 3]) -> Vec<f64> {
    bfr::default_radii_mm(voxel_size)
}

/// Next length ≥ n with only 2, 3, 5 as prime factors.
#[pyfunction]
fn fft_fast_len(n: usize) -> usize {
    fft::fast_len(n)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fft3_forward, m)?)?;
    m.add_function(wrap_pyfunction!(fft3_inverse, m)?)?;
    m.add_function(wrap_pyfunction!(dipole_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(forward_field, m)?)?;
    m.add_function(wrap_pyfunction!(tkd, m)?)?;
    m.add_function(wrap_pyfunction!(tv_admm, m)?)?;
    m.add_function(wrap_pyfunction!(vsharp, m)?)?;
    m.add_function(wrap_pyfunction!(vsharp_default_radii, m)?)?;
    m.add_function(wrap_pyfunction!(pdf, m)?)?;
    m.add_function(wrap_pyfunction!(ismv, m)?)?;
    m.add_function(wrap_pyfunction!(lbv, m)?)?;
    m.add_function(wrap_pyfunction!(fft_fast_len, m)?)?;
    Ok(())
}
