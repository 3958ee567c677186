//! Pure numerical kernels of alsiron, grouped by pipeline stage.
//!
//! - [`field`]: phase unwrapping, multi-echo field fits and the brain-surface (BET) mask.
//! - [`qsm`]: the dipole model, background field removal and dipole inversion.
//! - [`relax`]: R2* fits and the EPG (T2) model and fit.
//! - [`fft`], [`grid`], [`error`]: shared by all stages.
//!
//! Conventions shared by every kernel:
//! - 3-D volumes are flat `&[f32]` slices in C (row-major) order with a [`Shape3`]
//!   `[nx, ny, nz]`: the last axis is contiguous. Multi-echo data are echo-major:
//!   `[n_echo][nx][ny][nz]`.
//! - Voxel sizes are in millimetres, B0 directions are unit vectors in voxel-index space.
//! - Fields are in ppm of B0, susceptibilities in ppm, echo times in seconds, rates in s⁻¹.
//! - Kernels return [`CoreError`] for bad arguments and never panic on user data.

pub mod error;
pub mod fft;
pub mod field;
pub mod grid;
pub mod qsm;
pub mod relax;
#[cfg(any(test, feature = "timing"))]
mod test_support;

pub use error::{CoreError, CoreResult};
pub use grid::{Geometry, Shape3};
