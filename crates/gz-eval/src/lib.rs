//! gz-eval: turns checkpoints into scores, predictions, a Kaggle submission and a report.
//!
//! - [`metrics`]: the Kaggle score (RMSE over all rows × 37 answers) and its breakdown per
//!   question and per answer.
//! - [`baselines`]: the reference predictors the challenge published (all zeros, all ones, the
//!   training mean, the central-pixel benchmark) and the Bayes floor when a dataset knows its
//!   noise-free fractions.
//! - [`submission`]: writing a submission (clipped, complete, validated, atomic) and checking any
//!   existing one, listing every problem with its line.
//! - [`predict`]: running a predictor over a cache split or a folder of JPEGs.
//! - [`eval`]: loading checkpoints, re-deriving the trainer's validation split, the score table.
//! - [`report`]: `metrics.json`, learning-curve and per-question PNGs, `index.html` with a gallery.
//! - [`tta`]: test-time augmentation (rotations × flips × zooms) and ensembles, averaged.
//!
//! Neighbours: it reads labels through gz-schema, cached images through gz-shards, prepares raw
//! JPEGs with gz-preprocess and runs checkpoints through gz-model (the only crate here that
//! touches candle). It never parses command-line arguments and never prints: `gz eval`,
//! `gz predict` and `gz submit` in gz-cli are its front ends.

pub mod baselines;
pub mod eval;
pub mod metrics;
pub mod predict;
pub mod report;
pub mod submission;
pub mod tta;

use std::path::PathBuf;

/// The candle device type, re-exported so front ends need no candle dependency of their own.
pub use candle_core::Device;

/// Errors of the evaluation crate; each names what it was working on.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Predictions and truth (or other arrays) do not have the shapes they must.
    #[error("shape mismatch: {what}: {reason}")]
    Shape { what: String, reason: String },
    /// A setting (a command-line option) is out of its range.
    #[error("{what}: {reason}")]
    Setting { what: String, reason: String },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A CSV or JSON file gz-eval reads is not as expected.
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// Reading or writing a solutions/submission CSV failed.
    #[error(transparent)]
    Schema(#[from] gz_schema::SchemaError),
    /// A model failed (loading, running, tensor shapes).
    #[error("{what}: {source}")]
    Model {
        what: String,
        #[source]
        source: candle_core::Error,
    },
    /// A submission could not be written because it would be invalid.
    #[error("refusing to write submission {path}: {reason}")]
    Submission { path: PathBuf, reason: String },
}

/// Result alias of this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> EvalError + '_ {
    move |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}
