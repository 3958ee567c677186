//! Quantitative susceptibility mapping: the dipole model, background field removal and
//! dipole inversion.

pub mod bfr;
pub mod dipole;
pub mod inversion;
