//! Field mapping and brain masks: phase unwrapping (ROMEO-style region growing,
//! Laplacian), multi-echo field fits, and the BET brain-surface evolution.

pub mod fieldfit;
pub mod fieldmap;
pub mod surface;
pub mod unwrap;
pub mod unwrap_laplacian;
