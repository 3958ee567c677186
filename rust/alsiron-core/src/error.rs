//! One error type for the numerical core; the Python layer maps it to exceptions once.

use std::fmt;

/// Everything a kernel can refuse.
#[derive(Debug, Clone, PartialEq)]
pub enum CoreError {
    /// An array does not have the length its shape implies, or two inputs disagree.
    ShapeMismatch(String),
    /// A scalar argument is outside its valid range (e.g. a negative radius).
    InvalidArgument(String),
    /// Not enough echoes (or samples) for the requested fit.
    TooFewEchoes { needed: usize, got: usize },
    /// The computation was stopped by the caller (e.g. Ctrl-C from Python).
    Interrupted,
}

pub type CoreResult<T> = Result<T, CoreError>;

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::ShapeMismatch(m) => write!(f, "shape mismatch: {m}"),
            CoreError::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            CoreError::TooFewEchoes { needed, got } => {
                write!(f, "too few echoes: need at least {needed}, got {got}")
            }
            CoreError::Interrupted => write!(f, "interrupted"),
        }
    }
}

impl std::error::Error for CoreError {}
