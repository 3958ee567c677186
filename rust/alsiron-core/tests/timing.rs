//! Speed measurements, not tests: each prints times to stderr and asserts nothing about
//! them. They are `#[ignore]`d and compiled only with the `timing` feature (the code
//! they run lives beside the kernels it times, in the `timing` modules, because it
//! measures private parts too). Run them in release, one at a time on a shared machine:
//!
//! ```text
//! cargo test --release -p alsiron-core --features timing --test timing -- --ignored --nocapture
//! cargo test --release -p alsiron-core --features timing --test timing unwrap_timing -- --ignored --nocapture
//! ```

use alsiron_core::{field, qsm, relax};

/// Block-wise (and, with `UNWRAP_TIMING_SINGLE` set, single-queue) unwrapping of the
/// field-mapping bench's data; `UNWRAP_TIMING_SIDE` overrides the block side.
#[test]
#[ignore]
fn unwrap_timing() {
    field::unwrap::timing::unwrap_timing();
}

/// V-SHARP's radius search by distance transform against one FFT erosion per radius.
#[test]
#[ignore]
fn vsharp_timing() {
    qsm::bfr::timing::vsharp_timing();
}

/// Throughput of the log-linear R2* fit (plain and weighted) at 256×256×176.
#[test]
#[ignore]
fn r2star_timing() {
    relax::r2star::timing::r2star_timing();
}

/// Thread CPU time per voxel of the log-linear R2* chunk kernels.
#[test]
#[ignore]
fn chunk_kernel_timing() {
    relax::r2star::timing::chunk_kernel_timing();
}

/// Thread CPU time per voxel of the nonlinear R2* fits (Gaussian and Rician).
#[test]
#[ignore]
fn nlls_timing() {
    relax::r2star_fit::timing::nlls_timing();
}

/// Per-part CPU times of the EPG T2 fit (simulation, dictionary, fitter, whole fit).
#[test]
#[ignore]
fn epg_parts_timing() {
    relax::epg::timing::epg_parts_timing();
}
