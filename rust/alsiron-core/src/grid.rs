//! Shape and geometry bookkeeping for C-ordered 3-D volumes: [`Shape3`], [`Geometry`]
//! (shape, voxel size, B0 direction) and the shared argument checks.

use crate::error::{CoreError, CoreResult};

/// Shape of a C-ordered volume `[nx, ny, nz]` (last axis contiguous).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape3(pub [usize; 3]);

impl Shape3 {
    /// Number of voxels.
    #[inline]
    pub fn len(&self) -> usize {
        self.0[0] * self.0[1] * self.0[2]
    }

    /// True when any dimension is zero.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flat index of voxel (i, j, k).
    #[inline]
    pub fn idx(&self, i: usize, j: usize, k: usize) -> usize {
        (i * self.0[1] + j) * self.0[2] + k
    }

    /// Shape of the half spectrum of a real-to-complex FFT over the last axis.
    #[inline]
    pub fn half_spectrum(&self) -> Shape3 {
        Shape3([self.0[0], self.0[1], self.0[2] / 2 + 1])
    }

    /// Check that `len` matches the voxel count, naming the offending array.
    pub fn check_len(&self, len: usize, what: &str) -> CoreResult<()> {
        if len != self.len() {
            return Err(CoreError::ShapeMismatch(format!(
                "{what} has {len} elements, expected {} for shape {:?}",
                self.len(),
                self.0
            )));
        }
        if self.is_empty() {
            return Err(CoreError::ShapeMismatch(format!("{what} is empty")));
        }
        Ok(())
    }
}

/// Check an echo-major `[n_echo][n]` input against per-voxel output lengths.
///
/// `n` is the length of the first output; every other output must match it, the input
/// must hold exactly `n_echo · n` values and `n` must be non-zero. Returns `n`.
pub fn check_echo_major(
    magnitude_len: usize,
    n_echo: usize,
    outputs: &[usize],
) -> CoreResult<usize> {
    let n = outputs.first().copied().unwrap_or(0);
    if outputs.iter().any(|&l| l != n) {
        return Err(CoreError::ShapeMismatch(format!(
            "output arrays must all have the same length, got {outputs:?}"
        )));
    }
    if n == 0 || magnitude_len != n_echo * n {
        return Err(CoreError::ShapeMismatch(format!(
            "magnitude has {magnitude_len} elements, expected {n_echo} echoes × {n} voxels"
        )));
    }
    Ok(n)
}

/// Validate a voxel size in mm: three finite positive numbers.
pub fn check_voxel_size(voxel_size: [f64; 3]) -> CoreResult<()> {
    if voxel_size.iter().any(|v| !v.is_finite() || *v <= 0.0) {
        return Err(CoreError::InvalidArgument(format!(
            "voxel size must be finite and positive, got {voxel_size:?}"
        )));
    }
    Ok(())
}

/// Normalise a B0 direction to unit length; refuse zero or non-finite vectors.
pub fn unit_direction(b0_dir: [f64; 3]) -> CoreResult<[f64; 3]> {
    let n = (b0_dir[0] * b0_dir[0] + b0_dir[1] * b0_dir[1] + b0_dir[2] * b0_dir[2]).sqrt();
    if !n.is_finite() || n < 1e-12 {
        return Err(CoreError::InvalidArgument(format!(
            "B0 direction must be a non-zero finite vector, got {b0_dir:?}"
        )));
    }
    Ok([b0_dir[0] / n, b0_dir[1] / n, b0_dir[2] / n])
}

/// Sampling geometry of a volume for the kernels that need the dipole model: the shape,
/// the voxel size [mm] and the B0 direction in voxel-index space.
///
/// [`Geometry::new`] validates the voxel size and the B0 direction once (the same checks
/// and messages as [`check_voxel_size`] and [`unit_direction`]) and keeps the unit B0
/// direction, so the kernels taking a `&Geometry` need not check either again. The shape
/// is not checked here: each kernel checks it against its arrays (so that an empty or
/// mismatched array is named in the error).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_unit: [f64; 3],
}

impl Geometry {
    /// Geometry of a `shape` volume with voxels of `voxel_size` [mm] (finite, positive)
    /// and B0 along `b0_dir` (any non-zero finite vector; normalised here).
    pub fn new(shape: Shape3, voxel_size: [f64; 3], b0_dir: [f64; 3]) -> CoreResult<Self> {
        check_voxel_size(voxel_size)?;
        let b0_unit = unit_direction(b0_dir)?;
        Ok(Geometry {
            shape,
            voxel_size,
            b0_unit,
        })
    }

    /// The same voxel size and B0 direction on another grid (e.g. a padded one).
    pub fn with_shape(&self, shape: Shape3) -> Self {
        Geometry { shape, ..*self }
    }

    /// Shape `[nx, ny, nz]`.
    #[inline]
    pub fn shape(&self) -> Shape3 {
        self.shape
    }

    /// Voxel size [mm].
    #[inline]
    pub fn voxel_size(&self) -> [f64; 3] {
        self.voxel_size
    }

    /// Unit B0 direction in voxel-index space.
    #[inline]
    pub fn b0_unit(&self) -> [f64; 3] {
        self.b0_unit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_index_is_c_order() {
        let s = Shape3([2, 3, 4]);
        assert_eq!(s.idx(0, 0, 1), 1);
        assert_eq!(s.idx(0, 1, 0), 4);
        assert_eq!(s.idx(1, 0, 0), 12);
        assert_eq!(s.len(), 24);
        assert_eq!(s.half_spectrum().0, [2, 3, 3]);
    }

    #[test]
    fn bad_lengths_and_directions_are_refused() {
        assert!(Shape3([2, 2, 2]).check_len(7, "x").is_err());
        assert!(unit_direction([0.0, 0.0, 0.0]).is_err());
        assert!(check_voxel_size([1.0, -1.0, 1.0]).is_err());
        let u = unit_direction([0.0, 0.0, 2.0]).unwrap();
        assert_eq!(u, [0.0, 0.0, 1.0]);
        let shape = Shape3([2, 2, 2]);
        assert!(Geometry::new(shape, [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]).is_err());
        assert!(Geometry::new(shape, [1.0; 3], [0.0, f64::NAN, 1.0]).is_err());
        let g = Geometry::new(shape, [1.0, 1.0, 2.0], [0.0, 0.0, 2.0]).unwrap();
        assert_eq!(g.b0_unit(), [0.0, 0.0, 1.0]);
        assert_eq!(
            g.with_shape(Shape3([4, 2, 2])).voxel_size(),
            [1.0, 1.0, 2.0]
        );
    }
}
