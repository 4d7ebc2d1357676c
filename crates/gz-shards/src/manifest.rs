//! `manifest.json`: the file written last into a cache directory; its presence marks the cache
//! complete. It names every shard, label and index file of every split with its row count and
//! payload CRC, and carries the preprocessing config, its hash and free-form `extra` metadata
//! (gz-preprocess stores the dataset key and the list of skipped inputs there).

use serde::{Deserialize, Serialize};

/// File name of the manifest inside a cache directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// One file of a split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name relative to the cache directory.
    pub file: String,
    /// Rows in the file.
    pub rows: usize,
    /// CRC-32 of the payload (also stored in the file's header).
    pub crc32: u32,
}

/// One split (`train`, `test`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitManifest {
    /// Total images.
    pub rows: usize,
    /// [C, H, W] of every image.
    pub shape: [usize; 3],
    /// Image shards in row order.
    pub shards: Vec<FileEntry>,
    /// GalaxyID → (shard, row) index, in row order.
    pub index: FileEntry,
    /// 37 f32 labels per row (labelled splits only).
    pub labels: Option<FileEntry>,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `"gz-shards"`.
    pub format: String,
    /// Format version (`format::FORMAT_VERSION`).
    pub version: u32,
    /// Hash of the preprocessing config.
    pub config_hash: String,
    /// The preprocessing config as JSON.
    pub prep_config: serde_json::Value,
    /// Images per shard file (all but the last shard of a split are full).
    pub rows_per_shard: usize,
    /// Splits in the order written.
    pub splits: Vec<(String, SplitManifest)>,
    /// Free-form metadata from the producer.
    #[serde(default)]
    pub extra: serde_json::Value,
}
