//! Relaxometry: R2* fits of multi-echo gradient echo magnitudes, and the EPG model and
//! stimulated-echo corrected T2 fit of multi-echo spin echo trains.

pub mod epg;
pub mod r2star;
pub mod r2star_fit;
