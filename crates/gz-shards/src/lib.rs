//! gz-shards: the on-disk cache format of preprocessed images — fixed-layout binary shard files of
//! f16 C×H×W tensors, a GalaxyID → (shard, row) index, f32 labels for the training split, and a
//! manifest written last that marks a cache directory complete.
//!
//! This crate is an API boundary (see `docs/shard-format.md`): gz-preprocess writes caches with
//! [`CacheWriter`]; gz-model and gz-eval read them with [`Cache::open`] and get zero-copy `&[f16]`
//! slices out of memory-mapped files. gz-shards knows nothing about JPEG, candle or CUDA.
//! The format follows the usual "header + flat payload + checksum" design of array stores such as
//! NumPy's `.npy` and safetensors, with the atomic publish discipline of a temp dir + rename.

#[cfg(target_endian = "big")]
compile_error!(
    "gz-shards stores little-endian payloads and hands them out zero-copy; big-endian hosts are not supported"
);

pub mod format;
pub mod inventory;
pub mod manifest;
pub mod mapped;
mod reader;
mod writer;

use std::path::{Path, PathBuf};

pub use half::f16;
pub use manifest::{Manifest, MANIFEST_FILE};
pub use reader::{Cache, Split};
pub use writer::{remove_stale_tmp_dirs, CacheWriter, SplitWriter, DEFAULT_ROWS_PER_SHARD};

/// Labels per training row (the 37 Galaxy Zoo answers; equals `gz_schema::N_ANSWERS`).
pub const N_LABELS: usize = 37;

/// Everything that can go wrong reading or writing a cache.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The directory has no manifest: not a cache, or a write that never finished.
    #[error(
        "{dir}: no manifest.json — not a gz cache, or an incomplete one (interrupted `gz prep`); re-run `gz prep`"
    )]
    Incomplete { dir: PathBuf },
    /// The manifest cannot be parsed or is inconsistent.
    #[error("{path}: bad manifest: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    /// A file header is wrong (magic, version, dtype, shape, lengths, header checksum).
    #[error("{path}: bad shard header: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    /// The file size does not match its header (truncated or padded).
    #[error("{path}: file is {found} bytes, its header says {expected} (truncated or corrupt)")]
    Size { path: PathBuf, expected: u64, found: u64 },
    /// The payload checksum does not match.
    #[error(
        "{path}: payload checksum mismatch (expected {expected:08x}, found {found:08x}): corrupt file; \
         `gz prep --data <its dataset> --verify`, with the options that built it, rebuilds the cache"
    )]
    Checksum { path: PathBuf, expected: u32, found: u32 },
    /// The same GalaxyID twice in one split.
    #[error("split {split}: duplicate GalaxyID {id}")]
    DuplicateId { split: String, id: u64 },
    /// A caller passed something unusable (wrong lengths, bad names).
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> ShardError {
    ShardError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests;
