//! The unit dipole kernel and the forward field model.
//!
//! D(k) = 1/3 − (k·b̂)² / |k|², with k in cycles/mm (`fftfreq` index divided by
//! n_i·voxel_size_i, so anisotropic voxels are honoured) and b̂ the unit B0 direction in
//! voxel-index space. D(0) = 0, so simulated and inverted fields are zero-mean.
//! The kernel is stored on the half-spectrum layout of [`crate::fft`].

use num_complex::Complex32;
use rayon::prelude::*;

use crate::error::CoreResult;
use crate::fft::Fft3Plan;
use crate::grid::{Geometry, Shape3};

/// Frequency of DFT bin `index` of an `n`-point axis, in cycles per sample, with the
/// `numpy.fft.fftfreq` convention (Nyquist bin of even `n` is negative).
#[inline]
pub fn fftfreq(index: usize, n: usize) -> f64 {
    let signed = if index < n.div_ceil(2) {
        index as f64
    } else {
        index as f64 - n as f64
    };
    signed / n as f64
}

/// Spatial frequencies (cycles/mm) of the half-spectrum axes: x and y with `fftfreq`,
/// z with `rfftfreq` (non-negative).
pub fn half_spectrum_frequencies(shape: Shape3, voxel_size: [f64; 3]) -> [Vec<f64>; 3] {
    let [nx, ny, nz] = shape.0;
    let kx = (0..nx).map(|i| fftfreq(i, nx) / voxel_size[0]).collect();
    let ky = (0..ny).map(|j| fftfreq(j, ny) / voxel_size[1]).collect();
    let kz = (0..nz / 2 + 1)
        .map(|k| k as f64 / (nz as f64 * voxel_size[2]))
        .collect();
    [kx, ky, kz]
}

/// The dipole kernel evaluated on the fly, a half-spectrum column at a time (for
/// [`Fft3Plan::filter`] and the fused solver passes that never store a kernel array).
///
/// Same formula and f64 arithmetic as [`dipole_kernel`], so the values agree with it to
/// the f32 rounding of the result.
pub struct DipoleSymbol {
    kx: Vec<f64>,
    kx_b: Vec<f64>,
    ky: Vec<f64>,
    kz: Vec<f64>,
    b: [f64; 3],
    nh: usize,
}

impl DipoleSymbol {
    /// Frequencies of the half spectrum of `geometry`'s shape for its voxel size [mm]
    /// and B0 direction.
    pub fn new(geometry: &Geometry) -> Self {
        let (shape, voxel_size) = (geometry.shape(), geometry.voxel_size());
        let b = geometry.b0_unit();
        let [kx, ky, kz] = half_spectrum_frequencies(shape, voxel_size);
        let kx_b = kx.iter().map(|x| x * b[0]).collect();
        DipoleSymbol {
            kx,
            kx_b,
            ky,
            kz,
            b,
            nh: shape.0[2] / 2 + 1,
        }
    }

    /// Whether half-spectrum column `column` (= j·nh + k) is a one-sided plane of the
    /// real transform (kz = 0 or, for even nz, the Nyquist kz): its bins stand for one
    /// full-spectrum bin, the others for two (k and −k).
    #[inline]
    pub fn column_weight(&self, column: usize, nz: usize) -> f32 {
        let k = column % self.nh;
        if k == 0 || (nz % 2 == 0 && k == self.nh - 1) {
            1.0
        } else {
            2.0
        }
    }

    /// D along x for half-spectrum column `column` (= j·nh + k): `out[a]` = D at
    /// (kx = a, j, k) for a < nx (`out.len()` must be nx). Branch-free, so it vectorises.
    #[inline]
    pub fn column_into(&self, column: usize, out: &mut [f32]) {
        let (y, z) = (self.ky[column / self.nh], self.kz[column % self.nh]);
        let yz2 = y * y + z * z;
        let yz_b = y * self.b[1] + z * self.b[2];
        for ((d, &x), &x_b) in out.iter_mut().zip(&self.kx).zip(&self.kx_b) {
            let k2 = x * x + yz2;
            let kb = x_b + yz_b;
            let value = 1.0 / 3.0 - kb * kb / k2;
            *d = if k2 == 0.0 { 0.0 } else { value as f32 };
        }
    }
}

/// Dipole kernel on the half spectrum `[nx, ny, nz/2+1]` (C order).
pub fn dipole_kernel(geometry: &Geometry) -> CoreResult<Vec<f32>> {
    let (shape, voxel_size) = (geometry.shape(), geometry.voxel_size());
    shape.check_len(shape.len(), "dipole kernel grid")?;
    let b = geometry.b0_unit();
    let [kx, ky, kz] = half_spectrum_frequencies(shape, voxel_size);
    let half = shape.half_spectrum();
    let plane = half.0[1] * half.0[2];
    let mut kernel = vec![0.0f32; half.len()];
    kernel
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(i, out)| {
            for (j, row) in out.chunks_mut(half.0[2]).enumerate() {
                for (k, d) in row.iter_mut().enumerate() {
                    let (x, y, z) = (kx[i], ky[j], kz[k]);
                    let k2 = x * x + y * y + z * z;
                    *d = if k2 == 0.0 {
                        0.0
                    } else {
                        let kb = x * b[0] + y * b[1] + z * b[2];
                        (1.0 / 3.0 - kb * kb / k2) as f32
                    };
                }
            }
        });
    Ok(kernel)
}

/// Multiply a half spectrum by a real kernel in place.
pub fn apply_kernel(spectrum: &mut [Complex32], kernel: &[f32]) {
    spectrum
        .par_iter_mut()
        .zip(kernel.par_iter())
        .with_min_len(4096)
        .for_each(|(s, &d)| *s *= d);
}

/// Field [ppm] of a susceptibility distribution `chi` [ppm]: F⁻¹{D·F{χ}} (periodic).
pub fn forward_field(chi: &[f32], geometry: &Geometry) -> CoreResult<Vec<f32>> {
    let shape = geometry.shape();
    shape.check_len(chi.len(), "chi")?;
    let kernel = dipole_kernel(geometry)?;
    let plan = Fft3Plan::get(shape)?;
    let mut spectrum = plan.make_spectrum();
    plan.forward(chi, &mut spectrum)?;
    apply_kernel(&mut spectrum, &kernel);
    let mut field = vec![0.0f32; shape.len()];
    plan.inverse(&mut spectrum, &mut field)?;
    Ok(field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::geometry;

    /// Mean of a half-spectrum quantity over the full spectrum: bins with
    /// 0 < kz < nz/2 stand for two bins (k and −k), the DC and Nyquist planes for one.
    fn full_spectrum_mean(d: &[f32], shape: Shape3) -> f64 {
        let nz = shape.0[2];
        let nh = nz / 2 + 1;
        let sum: f64 = d
            .iter()
            .enumerate()
            .map(|(idx, v)| {
                let kz = idx % nh;
                let single = kz == 0 || (nz % 2 == 0 && kz == nh - 1);
                (if single { 1.0 } else { 2.0 }) * *v as f64
            })
            .sum();
        sum / shape.len() as f64
    }

    #[test]
    fn kernel_is_zero_at_dc_and_zero_mean_over_full_spectrum() {
        // On a cube with b̂ along an axis, the three sums of k_a²/|k|² are equal by
        // symmetry, so the mean of 1/3 − cos²θ is exactly zero.
        for (shape, b0) in [
            (Shape3([16, 16, 16]), [0.0, 0.0, 1.0]),
            (Shape3([15, 15, 15]), [1.0, 0.0, 0.0]),
        ] {
            let d = dipole_kernel(&geometry(shape, [1.0; 3], b0)).unwrap();
            assert_eq!(d[0], 0.0);
            let mean = full_spectrum_mean(&d, shape);
            assert!(mean.abs() < 1e-6, "mean {mean}");
            let range = -2.0 / 3.0 - 1e-6..=1.0 / 3.0 + 1e-6;
            assert!(d.iter().all(|v| range.contains(&(*v as f64))));
        }
        // Oblique b̂ on an odd cube (no one-sided Nyquist plane): cross terms k_a·k_b
        // cancel under k_a → −k_a, so the mean is exactly zero too.
        let shape = Shape3([15, 15, 15]);
        let d = dipole_kernel(&geometry(shape, [1.0; 3], [0.3, -0.2, 1.0])).unwrap();
        assert!(full_spectrum_mean(&d, shape).abs() < 1e-6);
    }

    #[test]
    fn kernel_follows_a_rotated_b0() {
        // With b̂ along x, D at (kx, 0, 0) is -2/3 and at (0, 0, kz) is 1/3.
        let shape = Shape3([8, 8, 8]);
        let d = dipole_kernel(&geometry(shape, [1.0, 1.0, 1.0], [2.0, 0.0, 0.0])).unwrap();
        let half = shape.half_spectrum();
        assert!((d[half.idx(1, 0, 0)] + 2.0 / 3.0).abs() < 1e-6);
        assert!((d[half.idx(0, 0, 1)] - 1.0 / 3.0).abs() < 1e-6);
        // Swapping the roles of y and z: kernel with b̂ = y at (0, ky, 0) equals kernel
        // with b̂ = z at (0, 0, kz) for the same frequency on a cubic grid.
        let dy = dipole_kernel(&geometry(shape, [1.0, 1.0, 1.0], [0.0, 1.0, 0.0])).unwrap();
        let dz = dipole_kernel(&geometry(shape, [1.0, 1.0, 1.0], [0.0, 0.0, 1.0])).unwrap();
        assert!((dy[half.idx(0, 2, 0)] - dz[half.idx(0, 0, 2)]).abs() < 1e-7);
        // Oblique: b̂ = (1,1,0)/√2 is -2/3 along (1,1,0) and 1/3 along (1,-1,0).
        let dd = dipole_kernel(&geometry(shape, [1.0, 1.0, 1.0], [1.0, 1.0, 0.0])).unwrap();
        assert!((dd[half.idx(1, 1, 0)] + 2.0 / 3.0).abs() < 1e-6);
        assert!((dd[half.idx(1, 7, 0)] - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn anisotropic_voxels_scale_frequencies() {
        // Stretching the z voxel by 2 makes bin (0,1,1) point at 2:1 (ky:kz) ratio in
        // index units -> cycles/mm (1/8, 1/16); with b̂ = z: 1/3 - (1/16)²/((1/8)²+(1/16)²).
        let shape = Shape3([8, 8, 8]);
        let d = dipole_kernel(&geometry(shape, [1.0, 1.0, 2.0], [0.0, 0.0, 1.0])).unwrap();
        let want = 1.0 / 3.0 - (1.0 / 256.0) / (1.0 / 64.0 + 1.0 / 256.0);
        let got = d[shape.half_spectrum().idx(0, 1, 1)] as f64;
        assert!((got - want).abs() < 1e-6);
    }

    #[test]
    fn field_of_a_constant_is_zero() {
        let shape = Shape3([6, 6, 6]);
        let field =
            forward_field(&vec![1.0; 216], &geometry(shape, [1.0; 3], [0.0, 0.3, 1.0])).unwrap();
        assert!(field.iter().all(|v| v.abs() < 1e-6));
    }
}
