//! Pure numerical kernels of alsiron.
//!
//! Conventions shared by every kernel:
//! - 3-D volumes are flat `&[f32]` slices in C (row-major) order with a [`Shape3`]
//!   `[nx, ny, nz]`: the last axis is contiguous. Multi-echo data are echo-major:
//!   `[n_echo][nx][ny][nz]`.
//! - Voxel sizes are in millimetres, B0 directions are unit vectors in voxel-index space.
//! - Fields are in ppm of B0, susceptibilities in ppm, echo times in seconds, rates in s⁻¹.
//! - Kernels return [`CoreError`] for bad arguments and never panic on user data.

pub mod bfr;
pub mod bfr_iterative;
pub mod dipole;
pub mod epg;
pub mod error;
pub mod fft;
pub mod fieldfit;
pub mod fieldmap;
pub mod grid;
pub mod inversion;
pub mod inversion_iterative;
pub mod r2star;
pub mod r2star_fit;
pub mod surface;
#[cfg(test)]
mod test_support;
pub mod unwrap;
pub mod unwrap_laplacian;

pub use error::{CoreError, CoreResult};
pub use grid::Shape3;
