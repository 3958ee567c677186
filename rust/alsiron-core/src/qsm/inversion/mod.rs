//! Dipole inversion: local field [ppm] → susceptibility χ [ppm].
//!
//! One file per method family, all re-exported here:
//! - `direct.rs`: closed-form [`tkd`] (truncated k-space division; Shmueli et al. 2009;
//!   Wharton et al. 2010) and [`tikhonov`] (gradient-regularised).
//! - `tv.rs`: [`tv_admm`], total-variation regularised linear inversion solved by ADMM
//!   (Bilgic et al. 2014, FANSI's linear variant), and the ADMM loop RTS reuses.
//! - `weighted_tv.rs`: [`weighted_tv_admm`], ADMM for ½‖W(Dχ + φ − f)‖² + α‖G∘∇χ‖₁
//!   (+ β/2‖M·Δφ‖²): the engine of FANSI-style TV with a weak-harmonic background term
//!   (Milovic et al. 2019) and of MEDI-style magnitude-weighted L1 (Liu et al. 2011/2012;
//!   [`edge_weight`]), with an optional nonlinear data term.
//! - `rts.rs`: [`rts`], rapid two-step (Kames et al. 2018).
//! - `sstv.rs`: [`sstv_admm`], single-step TV on the Laplacian of the total field with a
//!   local-field anchor (three k-space-diagonal ADMM splits).
//! - `ndi.rs`: [`ndi`], nonlinear dipole inversion (Polak et al. 2020).
//! - `ilsqr.rs`: [`ilsqr`], the LSQR core of iLSQR (Li et al. 2015) on the weighted
//!   dipole model, regularised by early stopping.
//! - `streaking.rs`: the rest of iLSQR: [`ilsqr_fast_estimate`] and [`ilsqr_streaking`].
//! - `operators.rs`: the shared finite-difference operators (gradient, divergence,
//!   Laplacian) and their k-space symbols.
//!
//! All return χ set to 0 outside the mask (and the iterative ones the number of
//! iterations run); the iterative ones poll `should_stop(iteration)` once per iteration
//! ([`CoreError::Interrupted`] when it says so). This file holds the shared argument
//! checks and masking.

use rayon::prelude::*;

use crate::error::{CoreError, CoreResult};
use crate::grid::Shape3;

mod direct;
mod ilsqr;
mod ndi;
mod operators;
mod rts;
#[cfg(test)]
mod solver_tests;
mod sstv;
#[cfg(test)]
mod sstv_tests;
mod streaking;
#[cfg(test)]
mod tests;
mod tv;
mod weighted_tv;

pub use self::direct::{
    tikhonov, tkd, truncated_inverse, truncated_inverse_value, TIKHONOV_DEFAULT_LAMBDA,
    TKD_DEFAULT_THRESHOLD,
};
pub use self::ilsqr::{ilsqr, LsqrParams};
pub use self::ndi::{ndi, NdiParams};
pub use self::rts::{rts, RtsParams};
pub use self::sstv::{sstv_admm, sstv_objective, SstvData, SstvParams, SSTV_MIN_ITER};
pub use self::streaking::{
    ilsqr_constants, ilsqr_fast_estimate, ilsqr_streaking, IlsqrIterations, StreakingParams,
};
pub use self::tv::{tv_admm, tv_objective, TvAdmmParams};
pub use self::weighted_tv::{edge_weight, weighted_tv_admm, WeakHarmonic, WeightedTvParams};

pub(crate) fn check_field_and_mask(field: &[f32], mask: &[u8], shape: Shape3) -> CoreResult<()> {
    shape.check_len(field.len(), "local field")?;
    shape.check_len(mask.len(), "mask")?;
    if !mask.iter().any(|&m| m != 0) {
        return Err(CoreError::InvalidArgument("mask is empty".into()));
    }
    Ok(())
}

pub(crate) fn masked(values: &[f32], mask: &[u8]) -> Vec<f32> {
    values
        .par_iter()
        .zip(mask.par_iter())
        .map(|(&v, &m)| if m != 0 { v } else { 0.0 })
        .collect()
}

pub(crate) fn apply_mask(values: &mut [f32], mask: &[u8]) {
    values
        .par_iter_mut()
        .zip(mask.par_iter())
        .for_each(|(v, &m)| {
            if m == 0 {
                *v = 0.0
            }
        });
}

/// Minimum parallel chunk for element-wise passes.
pub(super) const MIN_LEN: usize = 4096;

pub(super) type StopFn<'a> = &'a (dyn Fn(usize) -> bool + Sync);

pub(super) fn check_weight(weight: &[f32], shape: Shape3, what: &str) -> CoreResult<()> {
    shape.check_len(weight.len(), what)?;
    if weight.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
        return Err(CoreError::InvalidArgument(format!(
            "{what} must be finite and non-negative"
        )));
    }
    Ok(())
}

pub(super) fn check_positive(values: &[(&str, f64)]) -> CoreResult<()> {
    for (name, v) in values {
        if !(v.is_finite() && *v > 0.0) {
            return Err(CoreError::InvalidArgument(format!(
                "{name} must be positive and finite, got {v}"
            )));
        }
    }
    Ok(())
}

pub(super) fn check_iterations(max_iter: usize, tol: f64) -> CoreResult<()> {
    if max_iter == 0 || !(tol.is_finite() && tol >= 0.0) {
        return Err(CoreError::InvalidArgument(format!(
            "need max_iter > 0 and tol >= 0, got {max_iter} and {tol}"
        )));
    }
    Ok(())
}
