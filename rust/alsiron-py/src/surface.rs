//! Brain-surface (BET-like) binding: the surface-evolution loop of `alsiron.bet`.

use alsiron_core::field::surface::{bet_evolve, BetSettings};
use numpy::{PyArray2, PyReadonlyArray2, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::convert::{contiguous_volume, shape_of};
use crate::detach::detached;

/// Evolve a BET surface on a float32 image; returns the new vertices (float64 [V, 3],
/// mm) and the number of iterations run.
///
/// `settings` = (t2, t, tm, f, step_mm, d_min_mm, d_max_mm, r_min_mm, r_max_mm,
/// intensity_step, tangential_step, settle_mm).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn bet_evolve_surface<'py>(
    py: Python<'py>,
    magnitude: PyReadonlyArray3<'py, f32>,
    voxel_size: [f64; 3],
    vertices: PyReadonlyArray2<'py, f64>,
    faces: PyReadonlyArray2<'py, u32>,
    settings: [f64; 12],
    iterations: usize,
) -> PyResult<(Bound<'py, PyArray2<f64>>, usize)> {
    let shape = shape_of(&magnitude);
    let mag = contiguous_volume(&magnitude, "magnitude")?;
    let v_shape = vertices.shape().to_vec();
    if v_shape.len() != 2 || v_shape[1] != 3 || faces.shape()[1] != 3 {
        return Err(PyValueError::new_err(
            "vertices and faces must have shape (N, 3)",
        ));
    }
    let mut pos = vertices
        .as_slice()
        .map_err(|_| PyValueError::new_err("vertices must be C-contiguous"))?
        .to_vec();
    let tri = faces
        .as_slice()
        .map_err(|_| PyValueError::new_err("faces must be C-contiguous"))?;
    let s = BetSettings {
        t2: settings[0],
        t: settings[1],
        tm: settings[2],
        f: settings[3],
        iterations,
        step_mm: settings[4],
        d_min_mm: settings[5],
        d_max_mm: settings[6],
        r_min_mm: settings[7],
        r_max_mm: settings[8],
        intensity_step: settings[9],
        tangential_step: settings[10],
        settle_mm: settings[11],
    };
    let ran = detached(py, || bet_evolve(mag, shape, voxel_size, &mut pos, tri, &s))?;
    let out = numpy::ndarray::Array2::from_shape_vec((v_shape[0], 3), pos)
        .map_err(|e| PyValueError::new_err(format!("internal shape error: {e}")))?;
    Ok((numpy::IntoPyArray::into_pyarray(out, py), ran))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(bet_evolve_surface, m)?)?;
    Ok(())
}
