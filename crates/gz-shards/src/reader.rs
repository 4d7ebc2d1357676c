//! Reading a cache directory: memory-mapped image shards handed out as zero-copy `&[f16]` slices.
//!
//! [`Cache::open`] reads the manifest (no manifest = not a complete cache), validates every
//! file's header (magic, version, dtype, shape, row count, exact file size, header CRC, payload
//! CRC recorded in the manifest) and maps the image shards. Labels and the id index are small and
//! are read into memory with their payload CRC checked. The image payload CRCs are only
//! recomputed by [`Cache::verify`] (`gz prep --verify`), so opening a multi-gigabyte cache is
//! instant. Neighbour: `writer` produces these files; gz-model and gz-eval consume `Split`s.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;

use crate::format::{Header, Kind};
use crate::manifest::{FileEntry, Manifest, SplitManifest, MANIFEST_FILE};
use crate::{io_err, ShardError, N_LABELS};

/// An opened, complete cache directory.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    manifest: Manifest,
    train: Option<Split>,
    test: Option<Split>,
    others: Vec<(String, Split)>,
}

impl Cache {
    /// Opens the cache at `dir` (the directory holding `manifest.json`).
    pub fn open(dir: &Path) -> Result<Cache, ShardError> {
        let mpath = dir.join(MANIFEST_FILE);
        let text = match std::fs::read(&mpath) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.is_dir() => {
                // the directory itself is missing (or is a file): say so
                return Err(io_err(
                    dir,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no such cache directory (`gz prep` prints the cache path it writes)",
                    ),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ShardError::Incomplete { dir: dir.to_path_buf() });
            }
            Err(e) => return Err(io_err(&mpath, e)),
        };
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| ShardError::BadManifest {
            path: mpath.clone(),
            reason: e.to_string(),
        })?;
        if manifest.format != "gz-shards" {
            return Err(ShardError::BadManifest {
                path: mpath,
                reason: format!("format {:?} is not gz-shards", manifest.format),
            });
        }
        if manifest.version != crate::format::FORMAT_VERSION {
            return Err(ShardError::BadManifest {
                path: mpath,
                reason: format!(
                    "format version {}, this build reads version {}; re-run `gz prep`",
                    manifest.version,
                    crate::format::FORMAT_VERSION
                ),
            });
        }
        let mut cache = Cache {
            dir: dir.to_path_buf(),
            manifest: manifest.clone(),
            train: None,
            test: None,
            others: Vec::new(),
        };
        for (name, sm) in &manifest.splits {
            let split = Split::open(dir, name, sm, &manifest)?;
            match name.as_str() {
                "train" => cache.train = Some(split),
                "test" => cache.test = Some(split),
                _ => cache.others.push((name.clone(), split)),
            }
        }
        Ok(cache)
    }

    /// The training split (labelled), if the dataset had one.
    pub fn train(&self) -> Option<&Split> {
        self.train.as_ref()
    }

    /// The test split (unlabelled), if the dataset had one.
    pub fn test(&self) -> Option<&Split> {
        self.test.as_ref()
    }

    /// Any split by name.
    pub fn split(&self, name: &str) -> Option<&Split> {
        match name {
            "train" => self.train(),
            "test" => self.test(),
            _ => self.others.iter().find(|(n, _)| n == name).map(|(_, s)| s),
        }
    }

    /// The preprocessing config the cache was written with.
    pub fn prep_config(&self) -> &serde_json::Value {
        &self.manifest.prep_config
    }

    /// Hash of the preprocessing config.
    pub fn config_hash(&self) -> &str {
        &self.manifest.config_hash
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The producer's free-form metadata (dataset key, skipped inputs, …).
    pub fn extra(&self) -> &serde_json::Value {
        &self.manifest.extra
    }

    /// A content fingerprint of split `name` (16 hex digits): its row count, shape and the
    /// manifest's checksums of its image shards, index (the GalaxyIDs in row order) and labels.
    /// Equal for two caches that hold the same images, ids and labels in the same order
    /// (wherever and whenever they were written); different when any of them differs. `None`
    /// when there is no such split. Training runs record the training split's, so that a
    /// resume or an evaluation on other data is refused rather than silently mixing rows.
    pub fn split_fingerprint(&self, name: &str) -> Option<String> {
        use sha2::Digest;
        let (_, sm) = self.manifest.splits.iter().find(|(n, _)| n == name)?;
        let mut h = sha2::Sha256::new();
        h.update(format!("gz split v1 {} {:?}\n", sm.rows, sm.shape).as_bytes());
        for fe in &sm.shards {
            h.update(format!("shard {} {}\n", fe.rows, fe.crc32).as_bytes());
        }
        h.update(format!("index {} {}\n", sm.index.rows, sm.index.crc32).as_bytes());
        if let Some(l) = &sm.labels {
            h.update(format!("labels {} {}\n", l.rows, l.crc32).as_bytes());
        }
        Some(h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A fingerprint of which galaxies a split holds and their labels, whatever their
    /// preprocessing: a hash of its index (the GalaxyIDs in row order) and labels checksums.
    /// Equal for two caches of the same images at different sizes or crops (where
    /// [`Self::split_fingerprint`] differs, as it covers the pixels); `None` when there is no
    /// such split.
    pub fn split_data_fingerprint(&self, name: &str) -> Option<String> {
        use sha2::Digest;
        let (_, sm) = self.manifest.splits.iter().find(|(n, _)| n == name)?;
        let mut h = sha2::Sha256::new();
        h.update(format!("gz split data v1 {}\n", sm.rows).as_bytes());
        h.update(format!("index {} {}\n", sm.index.rows, sm.index.crc32).as_bytes());
        if let Some(l) = &sm.labels {
            h.update(format!("labels {} {}\n", l.rows, l.crc32).as_bytes());
        }
        Some(h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Recomputes the CRC of every image payload and compares it with the header and manifest.
    /// Returns the number of files checked.
    pub fn verify(&self) -> Result<usize, ShardError> {
        let mut n = 0;
        for split in self
            .train
            .iter()
            .chain(self.test.iter())
            .chain(self.others.iter().map(|(_, s)| s))
        {
            n += split.verify()?;
            // labels and index were fully checked on open
            n += 1 + usize::from(split.labels.is_some());
        }
        Ok(n)
    }
}

#[derive(Debug)]
struct MappedShard {
    path: PathBuf,
    mmap: Mmap,
    offset: usize,
    crc32: u32,
}

impl MappedShard {
    fn payload_bytes(&self) -> &[u8] {
        &self.mmap[self.offset..]
    }
}

/// One split of a cache: `len()` images of `shape()` = [C, H, W] f16 values in [0, 1], with ids
/// and (train) labels in the same row order.
#[derive(Debug)]
pub struct Split {
    name: String,
    shape: [usize; 3],
    rows: usize,
    rows_per_shard: usize,
    ids: Vec<u64>,
    by_id: HashMap<u64, usize>,
    shards: Vec<MappedShard>,
    labels: Option<Vec<f32>>,
}

impl Drop for Split {
    fn drop(&mut self) {
        crate::mapped::deregister(self.shards.iter().map(|s| s.mmap.as_ptr()));
    }
}

impl Split {
    /// Recomputes the CRC of this split's image payloads and compares it with the headers
    /// (opening checks only the headers, index and labels): a bit flipped in an image is found
    /// here, naming the shard. Returns the number of shard files checked.
    pub fn verify(&self) -> Result<usize, ShardError> {
        for shard in &self.shards {
            let crc = crc32fast::hash(shard.payload_bytes());
            if crc != shard.crc32 {
                return Err(ShardError::Checksum {
                    path: shard.path.clone(),
                    expected: shard.crc32,
                    found: crc,
                });
            }
        }
        Ok(self.shards.len())
    }

    fn open(dir: &Path, name: &str, sm: &SplitManifest, m: &Manifest) -> Result<Split, ShardError> {
        let bad_manifest = |reason: String| ShardError::BadManifest {
            path: dir.join(MANIFEST_FILE),
            reason,
        };
        // every dimension must be a header's u32 (a wider one would pass the header check
        // truncated) and a row's values must fit an address (checked once here; `image_len`
        // and the row offsets rely on it)
        let dims = sm.shape.map(|d| u32::try_from(d).unwrap_or(0));
        if dims.contains(&0) || crate::format::checked_row_bytes(Kind::Images, dims).is_none() || m.rows_per_shard == 0
        {
            return Err(bad_manifest(format!(
                "split {name}: shape {:?} with {} rows per shard is not a shape gz writes",
                sm.shape, m.rows_per_shard
            )));
        }
        let mut shards = Vec::with_capacity(sm.shards.len());
        let mut total = 0usize;
        for (k, fe) in sm.shards.iter().enumerate() {
            let path = dir.join(&fe.file);
            let file = File::open(&path).map_err(|e| io_err(&path, e))?;
            // SAFETY: memmap2 requires that the mapped file is not modified or truncated while
            // mapped. Shard files are immutable once published: writers only ever write into a
            // private temporary directory that is renamed into place after every file is fsynced,
            // and nothing in gz writes to a published cache. (A user truncating the file by hand
            // while we read it causes SIGBUS: `crate::mapped` lets the binary's handler name the
            // file before the process ends.)
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io_err(&path, e))?;
            let header = Header::decode(&path, &mmap)?;
            check_header(&path, &header, Kind::Images, dims, fe, m)?;
            let full = k + 1 < sm.shards.len();
            if (full && fe.rows != m.rows_per_shard) || fe.rows == 0 || fe.rows > m.rows_per_shard {
                return Err(bad_manifest(format!(
                    "{} has {} rows, rows_per_shard is {}",
                    fe.file, fe.rows, m.rows_per_shard
                )));
            }
            let offset = header.header_len as usize;
            // Alignment: the payload starts at a multiple of 64 in a page-aligned mapping.
            bytemuck::try_cast_slice::<u8, f16>(&mmap[offset..]).map_err(|e| ShardError::BadHeader {
                path: path.clone(),
                reason: format!("payload not castable to f16: {e}"),
            })?;
            // rows of a mapped file: the sum cannot overflow, but a damaged count is refused
            // below rather than wrapped
            total = total.saturating_add(fe.rows);
            shards.push(MappedShard {
                path,
                mmap,
                offset,
                crc32: fe.crc32,
            });
        }
        if total != sm.rows {
            return Err(ShardError::BadManifest {
                path: dir.join(MANIFEST_FILE),
                reason: format!("split {name}: shards hold {total} rows, manifest says {}", sm.rows),
            });
        }

        // Index: GalaxyID → (shard, row), in row order.
        let ipath = dir.join(&sm.index.file);
        let ibytes = std::fs::read(&ipath).map_err(|e| io_err(&ipath, e))?;
        let ih = Header::decode(&ipath, &ibytes)?;
        check_header(&ipath, &ih, Kind::Index, [1, 1, 1], &sm.index, m)?;
        let payload = &ibytes[ih.header_len as usize..];
        check_crc(&ipath, payload, ih.payload_crc32)?;
        let mut ids = Vec::with_capacity(sm.rows);
        let mut by_id = HashMap::with_capacity(sm.rows);
        for (i, e) in payload.chunks_exact(16).enumerate() {
            let id = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes"));
            let shard = u32::from_le_bytes(e[8..12].try_into().expect("4 bytes")) as usize;
            let row = u32::from_le_bytes(e[12..16].try_into().expect("4 bytes")) as usize;
            if shard.checked_mul(m.rows_per_shard).and_then(|r| r.checked_add(row)) != Some(i) {
                return Err(ShardError::BadHeader {
                    path: ipath.clone(),
                    reason: format!("entry {i} (id {id}) points at shard {shard} row {row}, expected row order"),
                });
            }
            if by_id.insert(id, i).is_some() {
                return Err(ShardError::DuplicateId {
                    split: name.to_string(),
                    id,
                });
            }
            ids.push(id);
        }
        if ids.len() != sm.rows {
            return Err(ShardError::BadHeader {
                path: ipath,
                reason: format!("{} entries, expected {}", ids.len(), sm.rows),
            });
        }

        let labels = match &sm.labels {
            None => None,
            Some(fe) => {
                let lpath = dir.join(&fe.file);
                let lbytes = std::fs::read(&lpath).map_err(|e| io_err(&lpath, e))?;
                let lh = Header::decode(&lpath, &lbytes)?;
                check_header(&lpath, &lh, Kind::Labels, [N_LABELS as u32, 1, 1], fe, m)?;
                let payload = &lbytes[lh.header_len as usize..];
                check_crc(&lpath, payload, lh.payload_crc32)?;
                if fe.rows != sm.rows {
                    return Err(ShardError::BadHeader {
                        path: lpath,
                        reason: format!("{} label rows, expected {}", fe.rows, sm.rows),
                    });
                }
                Some(
                    payload
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                        .collect(),
                )
            }
        };
        // named for the SIGBUS handler from here until the split is dropped (nothing fails
        // between this and the `Split` whose drop deregisters them)
        crate::mapped::register(shards.iter().map(|s| (s.mmap.as_ptr(), s.mmap.len(), s.path.as_path())));
        Ok(Split {
            name: name.to_string(),
            shape: sm.shape,
            rows: sm.rows,
            rows_per_shard: m.rows_per_shard,
            ids,
            by_id,
            shards,
            labels,
        })
    }

    /// The split's name (`train`, `test`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether the split holds no images.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// GalaxyIDs in row order.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// [C, H, W] of each image.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Values per image (C·H·W).
    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Images per shard file; a range inside `k*rows_per_shard .. (k+1)*rows_per_shard` is
    /// contiguous in memory.
    pub fn rows_per_shard(&self) -> usize {
        self.rows_per_shard
    }

    /// The row of a GalaxyID.
    pub fn row_of(&self, id: u64) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    /// (shard, row within shard) of a GalaxyID.
    pub fn locate(&self, id: u64) -> Option<(usize, usize)> {
        self.row_of(id)
            .map(|r| (r / self.rows_per_shard, r % self.rows_per_shard))
    }

    /// Image `i` as C×H×W f16 values (zero-copy). Panics if `i >= len()`, like slice indexing.
    pub fn image(&self, i: usize) -> &[f16] {
        self.images(i..i + 1)
    }

    /// Images `range` as one contiguous zero-copy slice (`range.len()` × C·H·W values).
    ///
    /// Panics if the range is out of bounds or crosses a shard boundary (a multiple of
    /// [`Split::rows_per_shard`]); use [`Split::chunks`] to cut batches that never do.
    pub fn images(&self, range: Range<usize>) -> &[f16] {
        assert!(
            range.start <= range.end && range.end <= self.rows,
            "rows {range:?} out of bounds for split {} of {} images",
            self.name,
            self.rows
        );
        if range.is_empty() {
            return &[];
        }
        let shard = range.start / self.rows_per_shard;
        let last = (range.end - 1) / self.rows_per_shard;
        assert_eq!(
            shard, last,
            "rows {range:?} cross a shard boundary (rows_per_shard = {}); use Split::chunks",
            self.rows_per_shard
        );
        let s = &self.shards[shard];
        let n = self.image_len();
        let lo = (range.start - shard * self.rows_per_shard) * n;
        let hi = (range.end - shard * self.rows_per_shard) * n;
        let all: &[f16] = bytemuck::cast_slice(s.payload_bytes());
        &all[lo..hi]
    }

    /// Consecutive row ranges of at most `max` rows covering the split, none crossing a shard
    /// boundary (so each can be passed to [`Split::images`]).
    pub fn chunks(&self, max: usize) -> impl Iterator<Item = Range<usize>> + '_ {
        let max = max.max(1);
        let mut start = 0;
        std::iter::from_fn(move || {
            if start >= self.rows {
                return None;
            }
            let shard_end = ((start / self.rows_per_shard) + 1) * self.rows_per_shard;
            let end = (start + max).min(shard_end).min(self.rows);
            let r = start..end;
            start = end;
            Some(r)
        })
    }

    /// All labels, row-major `len() × 37` (labelled splits only).
    pub fn labels(&self) -> Option<&[f32]> {
        self.labels.as_deref()
    }

    /// The 37 labels of row `i` (labelled splits only). Panics if `i >= len()`.
    pub fn label(&self, i: usize) -> Option<&[f32]> {
        assert!(
            i < self.rows,
            "row {i} out of bounds for split {} of {} images",
            self.name,
            self.rows
        );
        self.labels.as_deref().map(|l| &l[i * N_LABELS..(i + 1) * N_LABELS])
    }
}

fn check_header(
    path: &Path,
    h: &Header,
    kind: Kind,
    dims: [u32; 3],
    fe: &FileEntry,
    m: &Manifest,
) -> Result<(), ShardError> {
    let bad = |reason: String| ShardError::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    if h.kind != kind {
        return Err(bad(format!("holds {:?}, expected {kind:?}", h.kind)));
    }
    if h.dims != dims {
        return Err(bad(format!("shape {:?}, manifest says {dims:?}", h.dims)));
    }
    if h.rows != fe.rows as u64 {
        return Err(bad(format!("{} rows, manifest says {}", h.rows, fe.rows)));
    }
    if h.config_hash != m.config_hash {
        return Err(bad(format!(
            "config hash {}, manifest says {}",
            h.config_hash, m.config_hash
        )));
    }
    if h.payload_crc32 != fe.crc32 {
        return Err(ShardError::Checksum {
            path: path.to_path_buf(),
            expected: fe.crc32,
            found: h.payload_crc32,
        });
    }
    Ok(())
}

fn check_crc(path: &Path, payload: &[u8], expected: u32) -> Result<(), ShardError> {
    let found = crc32fast::hash(payload);
    if found != expected {
        return Err(ShardError::Checksum {
            path: path.to_path_buf(),
            expected,
            found,
        });
    }
    Ok(())
}
