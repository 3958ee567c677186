//! Array conversion and argument checks shared by every binding: numpy arrays to flat
//! C-ordered slices and shapes, shape agreement, voxel size and B0 direction to a core
//! [`Geometry`], echo layouts, and kernel outputs back to numpy arrays.
//!
//! Two families of messages are kept as the Python API has always raised them: the QSM
//! bindings (`qsm`, `qsm_inversion`, `surface`) name non-contiguous arrays with
//! [`contiguous_volume`] and report shape mismatches through the core error
//! ([`same_shape`], "shape mismatch: ..."); the field-mapping and fit bindings (`field`,
//! `fit`) use [`contiguous`] (with a hint to `numpy.ascontiguousarray`) and plain
//! [`same_dims`] messages.

use alsiron_core::relax::r2star::EchoLayout;
use alsiron_core::{CoreError, Geometry, Shape3};
use numpy::ndarray::{Array3, Dimension};
use numpy::{
    IntoPyArray, PyArray1, PyArray3, PyArrayMethods, PyReadonlyArray, PyReadonlyArray3,
    PyReadonlyArray4, PyReadwriteArray1, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::to_py;

/// Shape of a 3-D array.
pub(crate) fn shape_of<T: numpy::Element>(a: &PyReadonlyArray3<'_, T>) -> Shape3 {
    shape3(a.shape())
}

/// The first three of `dims` as a [`Shape3`] (callers pass 3-D shapes or 3-D tails).
pub(crate) fn shape3(dims: &[usize]) -> Shape3 {
    Shape3([dims[0], dims[1], dims[2]])
}

/// Borrow a C-contiguous 3-D volume as a flat slice, or raise a ValueError naming it
/// (QSM bindings).
pub(crate) fn contiguous_volume<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray3<'_, T>,
    what: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{what} must be a C-contiguous array")))
}

/// Borrow a C-contiguous array as a flat slice, or raise a ValueError naming it with a
/// hint (field-mapping and fit bindings).
pub(crate) fn contiguous<'a, T: numpy::Element, D: Dimension>(
    arr: &'a PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    arr.as_slice().map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be C-contiguous (use numpy.ascontiguousarray)"
        ))
    })
}

/// `b` (the shape of `what`) must equal `a`; raised as the core's shape mismatch (QSM
/// bindings).
pub(crate) fn same_shape(a: Shape3, b: Shape3, what: &str) -> PyResult<()> {
    if a != b {
        return Err(to_py(CoreError::ShapeMismatch(format!(
            "{what} has shape {:?}, expected {:?}",
            b.0, a.0
        ))));
    }
    Ok(())
}

/// `b` (the dimensions of `what`) must equal `a` (field-mapping and fit bindings).
pub(crate) fn same_dims(a: &[usize], b: &[usize], what: &str) -> PyResult<()> {
    if a != b {
        return Err(PyValueError::new_err(format!(
            "{what} has shape {b:?}, expected {a:?}"
        )));
    }
    Ok(())
}

/// Shape of `field`, and `field` and `mask` as C-contiguous slices; the mask must have
/// the field's shape.
pub(crate) fn field_and_mask<'a>(
    field: &'a PyReadonlyArray3<'_, f32>,
    mask: &'a PyReadonlyArray3<'_, u8>,
) -> PyResult<(Shape3, &'a [f32], &'a [u8])> {
    let shape = shape_of(field);
    same_shape(shape, shape_of(mask), "mask")?;
    Ok((
        shape,
        contiguous_volume(field, "field")?,
        contiguous_volume(mask, "mask")?,
    ))
}

/// [`field_and_mask`] and the [`geometry`] of their grid (checked after the arrays): the
/// inputs of every unweighted dipole inversion.
pub(crate) fn field_mask_geometry<'a>(
    field: &'a PyReadonlyArray3<'_, f32>,
    mask: &'a PyReadonlyArray3<'_, u8>,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
) -> PyResult<(Geometry, &'a [f32], &'a [u8])> {
    let (shape, f, m) = field_and_mask(field, mask)?;
    Ok((geometry(shape, voxel_size, b0_dir)?, f, m))
}

/// A shape with two float32 volumes and a mask of that shape as slices (a weighted
/// solver's field and weight, a phase and its magnitude, an echo series).
pub(crate) type TwoVolumesAndMask<'a> = (Shape3, &'a [f32], &'a [f32], &'a [u8]);

/// [`field_and_mask`] plus a data weight of the same shape (checked in the same order:
/// shapes first, then contiguity); `weight_name` names it in errors.
pub(crate) fn field_weight_and_mask<'a>(
    field: &'a PyReadonlyArray3<'_, f32>,
    weight: &'a PyReadonlyArray3<'_, f32>,
    mask: &'a PyReadonlyArray3<'_, u8>,
    weight_name: &str,
) -> PyResult<TwoVolumesAndMask<'a>> {
    let shape = shape_of(field);
    same_shape(shape, shape_of(mask), "mask")?;
    same_shape(shape, shape_of(weight), weight_name)?;
    let (f, m) = (
        contiguous_volume(field, "field")?,
        contiguous_volume(mask, "mask")?,
    );
    Ok((shape, f, contiguous_volume(weight, weight_name)?, m))
}

/// A 3-D phase with the magnitude and mask on its grid (field-mapping and fit bindings:
/// shapes first, then contiguity) → the shape and the three as slices.
pub(crate) fn phase_magnitude_mask<'a>(
    phase: &'a PyReadonlyArray3<'_, f32>,
    magnitude: &'a PyReadonlyArray3<'_, f32>,
    mask: &'a PyReadonlyArray3<'_, u8>,
) -> PyResult<TwoVolumesAndMask<'a>> {
    let dims = phase.shape();
    same_dims(dims, magnitude.shape(), "magnitude")?;
    same_dims(dims, mask.shape(), "mask")?;
    Ok((
        shape3(dims),
        contiguous(phase, "phase")?,
        contiguous(magnitude, "magnitude")?,
        contiguous(mask, "mask")?,
    ))
}

/// Echo-major `(E, X, Y, Z)` magnitude and phase with one echo per echo time (`n_te`)
/// and their 3-D mask (field-fit bindings: the phase's shape, the echo count and the
/// mask's shape, then contiguity) → the spatial shape and the three as slices.
pub(crate) fn echo_series<'a>(
    magnitude: &'a PyReadonlyArray4<'_, f32>,
    phase: &'a PyReadonlyArray4<'_, f32>,
    n_te: usize,
    mask: &'a PyReadonlyArray3<'_, u8>,
) -> PyResult<TwoVolumesAndMask<'a>> {
    let dims = magnitude.shape();
    same_dims(dims, phase.shape(), "phase")?;
    let shape = echoes_shape(dims, n_te)?;
    same_dims(&dims[1..], mask.shape(), "mask")?;
    Ok((
        shape,
        contiguous(magnitude, "magnitude")?,
        contiguous(phase, "phase")?,
        contiguous(mask, "mask")?,
    ))
}

/// An optional volume of `shape` as a slice (QSM bindings: [`same_shape`], then
/// [`contiguous_volume`]).
pub(crate) fn optional_volume<'a, T: numpy::Element>(
    shape: Shape3,
    volume: &'a Option<PyReadonlyArray3<'_, T>>,
    what: &str,
) -> PyResult<Option<&'a [T]>> {
    match volume {
        Some(v) => {
            same_shape(shape, shape_of(v), what)?;
            Ok(Some(contiguous_volume(v, what)?))
        }
        None => Ok(None),
    }
}

/// An optional array as a slice ([`contiguous`]; field-mapping and fit bindings).
pub(crate) fn optional<'a, T: numpy::Element, D: Dimension>(
    arr: &'a Option<PyReadonlyArray<'_, T, D>>,
    what: &str,
) -> PyResult<Option<&'a [T]>> {
    arr.as_ref().map(|a| contiguous(a, what)).transpose()
}

/// The core [`Geometry`] of a `shape` volume: voxel size [mm] and B0 direction checked
/// once here (a bad one raises the core's ValueError).
pub(crate) fn geometry(
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
) -> PyResult<Geometry> {
    Geometry::new(shape, voxel_size, b0_dir).map_err(to_py)
}

/// Spatial shape of echo-major `(E, X, Y, Z)` dimensions with as many echoes as echo times.
pub(crate) fn echoes_shape(a: &[usize], n_te: usize) -> PyResult<Shape3> {
    if a[0] != n_te {
        return Err(PyValueError::new_err(format!(
            "{} echoes but {n_te} echo times",
            a[0]
        )));
    }
    Ok(shape3(&a[1..]))
}

/// (E, N) for echo-major magnitude, (N, E) when `voxel_major`: returns (E, N).
pub(crate) fn echoes_and_voxels(dims: &[usize], voxel_major: bool) -> [usize; 2] {
    if voxel_major {
        [dims[1], dims[0]]
    } else {
        [dims[0], dims[1]]
    }
}

/// The core's echo layout for the `voxel_major` flag.
pub(crate) fn layout(voxel_major: bool) -> EchoLayout {
    if voxel_major {
        EchoLayout::VoxelMajor
    } else {
        EchoLayout::EchoMajor
    }
}

/// A 3-D numpy array of `shape` holding `data` (C order), without a copy.
pub(crate) fn to_array<'py, T: numpy::Element>(
    py: Python<'py>,
    shape: Shape3,
    data: Vec<T>,
) -> PyResult<Bound<'py, PyArray3<T>>> {
    let [nx, ny, nz] = shape.0;
    let arr = Array3::from_shape_vec((nx, ny, nz), data)
        .map_err(|e| PyValueError::new_err(format!("internal shape error: {e}")))?;
    Ok(arr.into_pyarray(py))
}

/// A zeroed 1-D NumPy array for a kernel to write into. NumPy's allocator asks the kernel
/// for transparent huge pages on large arrays: with Rust-allocated 4 KiB pages, the
/// first-touch page faults of ~200 MB of R2* outputs cost as much CPU time as the
/// closed-form fit itself.
pub(crate) fn output<T: numpy::Element>(py: Python<'_>, n: usize) -> Bound<'_, PyArray1<T>> {
    PyArray1::<T>::zeros(py, n, false)
}

/// Borrow a fresh output array mutably.
pub(crate) fn writable<'py, T: numpy::Element>(
    arr: &Bound<'py, PyArray1<T>>,
) -> PyResult<PyReadwriteArray1<'py, T>> {
    arr.try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("output array: {e}")))
}

/// A borrowed output array as a mutable slice.
pub(crate) fn slice_mut<'a, T: numpy::Element>(
    arr: &'a mut PyReadwriteArray1<'_, T>,
) -> PyResult<&'a mut [T]> {
    arr.as_slice_mut()
        .map_err(|_| PyValueError::new_err("output array is not contiguous"))
}
