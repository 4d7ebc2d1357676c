//! Preprocessing a whole dataset into a cache: scan, cache lookup, parallel decode in bounded
//! chunks streamed into the shard writer, atomic publish.
//!
//! Memory: at most `CHUNK` decoded images are alive at a time (plus the writer's 1 MiB buffers),
//! whatever the dataset size. Order: rows follow the CSV order (train) and ascending id (test),
//! independent of the thread count, so the same inputs always give byte-identical shards.
//!
//! The manifest names inputs (skipped ones, the first greyscale image) relative to the dataset
//! root (`images_test_rev1/100008.jpg`); a cache hit joins them to the dataset path given then,
//! so they are right from any working directory and through any path to the same dataset
//! (caches written before stored them as given at the first `gz prep`: those are re-based the
//! same way, see `from_manifest`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::{self, Item};
use crate::{prep_jpeg_into, PrepConfig, PrepError};

/// Images decoded per parallel chunk (bounds memory: CHUNK × 3·size·size × 2 bytes).
pub(crate) const CHUNK: usize = 512;

/// An input that was not preprocessed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// Progress of a run, reported after every chunk.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// `"train"` or `"test"`.
    pub split: &'static str,
    /// Images of this split handled so far (written or skipped).
    pub done: u64,
    /// Images of this split in total.
    pub total: u64,
}

/// Where and how to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The Kaggle-layout dataset directory.
    pub data_dir: PathBuf,
    /// Parent of the cache directories.
    pub cache_root: PathBuf,
    /// Worker threads (`None`: all cores).
    pub threads: Option<usize>,
    /// Stop at the first bad input instead of skipping it.
    pub strict: bool,
    /// Images per shard file.
    pub rows_per_shard: usize,
    /// Polled after every chunk of images: `true` stops the run with
    /// [`PrepError::Interrupted`], the unfinished cache removed (`gz prep` passes its Ctrl-C).
    pub stop_requested: Option<fn() -> bool>,
    /// Takes a cache that left out an input as unreadable for a hit even when that input can
    /// be read now (no [`PrepError::StaleCache`]): `gz prep` passes it when the cache holds a
    /// user's files, which rebuilding it would delete.
    pub keep_stale: bool,
}

impl RunOptions {
    /// Defaults: all cores, lenient, [`gz_shards::DEFAULT_ROWS_PER_SHARD`].
    pub fn new(data_dir: &Path, cache_root: &Path) -> RunOptions {
        RunOptions {
            data_dir: data_dir.to_path_buf(),
            cache_root: cache_root.to_path_buf(),
            threads: None,
            strict: false,
            rows_per_shard: gz_shards::DEFAULT_ROWS_PER_SHARD,
            stop_requested: None,
            keep_stale: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The complete cache directory.
    pub cache_dir: PathBuf,
    /// True if an existing cache was reused (nothing decoded).
    pub cache_hit: bool,
    /// Dataset identity key.
    pub dataset_key: String,
    /// Config hash.
    pub config_hash: String,
    /// Training images in the cache.
    pub train: usize,
    /// Test images in the cache.
    pub test: usize,
    /// Every input left out, with the reason (also recorded in the manifest).
    pub skipped: Vec<Skipped>,
    /// Images in the cache that are greyscale JPEGs (one channel, copied to all three; also
    /// recorded in the manifest), and the first of them.
    pub greyscale: usize,
    /// The first greyscale image (by split, then row), when there is one.
    pub greyscale_example: Option<PathBuf>,
    /// Wall time of this run, seconds.
    pub elapsed_s: f64,
}

/// Preprocesses `data_dir` into `<cache_root>/<dataset-key>-<config-hash>/` with default options
/// and returns that path. Skipped inputs do not make this fail; use [`run_with`] to see them.
pub fn run(data_dir: &Path, cache_root: &Path, cfg: &PrepConfig) -> Result<PathBuf, PrepError> {
    run_with(&RunOptions::new(data_dir, cache_root), cfg, &|_| {}).map(|s| s.cache_dir)
}

/// Preprocesses a dataset (see [`run`]), reporting progress, honouring `opts`.
pub fn run_with(
    opts: &RunOptions,
    cfg: &PrepConfig,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<RunSummary, PrepError> {
    let t0 = Instant::now();
    cfg.validate()?;
    let scan = dataset::scan(&opts.data_dir)?;
    // labels that are not Kaggle's vote fractions: refused before anything is decoded (here,
    // not in `scan`, which `gz cache` also runs on datasets prepared before this check)
    if let Some(sol) = &scan.solutions {
        dataset::check_tree(sol, &opts.data_dir.join(dataset::SOLUTIONS_CSV))?;
    }
    // the manifest records the dataset's absolute path as text, for `gz cache` to match caches
    // with their datasets: a path that is not UTF-8 is refused now, not after the decoding
    let data_dir_abs = opts.data_dir.canonicalize().unwrap_or_else(|_| opts.data_dir.clone());
    if data_dir_abs.to_str().is_none() {
        return Err(PrepError::Config(format!(
            "the dataset path {} is not valid UTF-8: the cache's manifest records it as text (for `gz cache` to \
             match caches with their datasets); rename the folder",
            data_dir_abs.display()
        )));
    }
    let config_hash = cfg.hash();
    let cache_dir = opts.cache_root.join(format!("{}-{}", scan.key, config_hash));

    if cache_dir.join(gz_shards::MANIFEST_FILE).exists() {
        let cache = gz_shards::Cache::open(&cache_dir).map_err(|e| PrepError::DamagedCache {
            dir: cache_dir.clone(),
            source: e,
        })?;
        let skipped: Vec<Skipped> = serde_json::from_value::<Vec<Skipped>>(cache.extra()["skipped"].clone())
            .unwrap_or_default()
            .into_iter()
            .map(|s| Skipped {
                path: from_manifest(&s.path, &opts.data_dir),
                reason: s.reason,
            })
            .collect();
        // (all of it, as the run reads it: a file whose reading failed partway would otherwise
        // rebuild the cache at every call)
        let readable = |p: &Path| std::fs::read(p).is_ok();
        // an input left out because it could not be read (permissions, an I/O error) may be
        // readable now, and the dataset key does not see that
        if let Some(s) = skipped
            .iter()
            .find(|s| !opts.keep_stale && s.reason.starts_with(UNREADABLE) && readable(&s.path))
        {
            return Err(PrepError::StaleCache {
                dir: cache_dir,
                path: s.path.clone(),
                reason: s.reason.clone(),
            });
        }
        // (caches written before it was recorded say nothing)
        let greyscale = cache.extra()["greyscale"].as_u64().unwrap_or(0) as usize;
        let greyscale_example: Option<PathBuf> =
            serde_json::from_value::<Option<PathBuf>>(cache.extra()["greyscale_example"].clone())
                .unwrap_or_default()
                .map(|p| from_manifest(&p, &opts.data_dir));
        tracing::info!(dir = %cache_dir.display(), "cache hit");
        // the temporary folders of killed writers of this cache go (a writer of a new cache
        // does the same)
        if let (Some(parent), Some(name)) = (cache_dir.parent(), cache_dir.file_name().and_then(|n| n.to_str())) {
            gz_shards::remove_stale_tmp_dirs(parent, name);
        }
        // a cache an earlier (lenient) run wrote without some inputs is not what --strict asks for
        if opts.strict {
            if let Some(s) = skipped.first().or(scan.skipped.first()) {
                return Err(PrepError::Strict {
                    path: s.path.clone(),
                    reason: s.reason.clone(),
                });
            }
        }
        return Ok(RunSummary {
            cache_dir,
            cache_hit: true,
            dataset_key: scan.key,
            config_hash,
            train: cache.train().map_or(0, |s| s.len()),
            test: cache.test().map_or(0, |s| s.len()),
            skipped,
            greyscale,
            greyscale_example,
            elapsed_s: t0.elapsed().as_secs_f64(),
        });
    }
    if opts.strict {
        if let Some(s) = scan.skipped.first() {
            return Err(PrepError::Strict {
                path: s.path.clone(),
                reason: s.reason.clone(),
            });
        }
    }

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| PrepError::Config(format!("cannot start {:?} threads: {e}", opts.threads)))?;
    let cfg_json = serde_json::to_value(cfg).map_err(|e| PrepError::Config(e.to_string()))?;
    let mut writer = gz_shards::CacheWriter::create(&cache_dir, &cfg_json, &config_hash, opts.rows_per_shard)?;
    let mut skipped = scan.skipped.clone();
    let mut counts = [0usize; 2];
    let mut greyscale = 0usize;
    let mut greyscale_example: Option<PathBuf> = None;
    for (k, (name, items)) in [("train", &scan.train), ("test", &scan.test)].into_iter().enumerate() {
        let Some(items) = items else { continue };
        let mut split = writer.begin_split(name, cfg.shape(), name == "train")?;
        let total = items.len() as u64;
        progress(Progress {
            split: name,
            done: 0,
            total,
        });
        let mut done = 0u64;
        // Decoding of chunk n+1 (on the pool) overlaps with writing chunk n (this thread); the
        // channel holds at most one finished chunk, so at most three chunks are alive.
        let pool = &pool;
        let outcome: Result<(), PrepError> = std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Result<(Vec<f16>, bool), String>>>(1);
            s.spawn(move || {
                for chunk in items.chunks(CHUNK) {
                    let results = pool.install(|| chunk.par_iter().map(|it| load(it, cfg)).collect());
                    if tx.send(results).is_err() {
                        break; // the writer stopped (error): stop decoding
                    }
                }
            });
            for (chunk, results) in items.chunks(CHUNK).zip(rx.iter()) {
                for (it, res) in chunk.iter().zip(results) {
                    match res {
                        Ok((img, grey)) => {
                            if grey {
                                greyscale += 1;
                                greyscale_example.get_or_insert_with(|| it.path.clone());
                            }
                            let label = match (it.label_row, &scan.solutions) {
                                (Some(r), Some(sol)) => Some(sol.row(r)),
                                _ => None,
                            };
                            split.push(it.id, &img, label)?;
                        }
                        Err(reason) => {
                            if opts.strict {
                                return Err(PrepError::Strict {
                                    path: it.path.clone(),
                                    reason,
                                });
                            }
                            tracing::debug!(path = %it.path.display(), %reason, "skipped");
                            skipped.push(Skipped {
                                path: it.path.clone(),
                                reason,
                            });
                        }
                    }
                }
                done += chunk.len() as u64;
                progress(Progress {
                    split: name,
                    done,
                    total,
                });
                if done < total && opts.stop_requested.is_some_and(|stop| stop()) {
                    // (the decoder thread stops at its next send; the writer's drop removes
                    // the unfinished cache)
                    return Err(PrepError::Interrupted {
                        split: name,
                        done,
                        total,
                    });
                }
            }
            Ok(())
        });
        outcome?;
        if done != total {
            return Err(PrepError::Config(format!(
                "decoder thread stopped after {done} of {total} images"
            )));
        }
        counts[k] = split.len();
        writer.end_split(split)?;
    }
    let extra = serde_json::json!({
        "dataset_key": scan.key,
        // absolute, so `gz cache` and xtask can match it from anywhere
        // (as text: checked to be UTF-8 before any work; the file names below are written
        // lossily, as the scan reads them, so that nothing here can fail after the decoding)
        "data_dir": data_dir_abs.to_string_lossy(),
        "prep_version": cfg.version(),
        "skipped": skipped
            .iter()
            .map(|s| serde_json::json!({
                "path": to_manifest(&s.path, &opts.data_dir).to_string_lossy(),
                "reason": s.reason,
            }))
            .collect::<Vec<_>>(),
        "greyscale": greyscale,
        "greyscale_example": greyscale_example
            .as_deref()
            .map(|p| to_manifest(p, &opts.data_dir).to_string_lossy().into_owned()),
        "train_images": counts[0],
        "test_images": counts[1],
        "elapsed_s": t0.elapsed().as_secs_f64(),
    });
    let cache_dir = writer.finish(extra)?;
    Ok(RunSummary {
        cache_dir,
        cache_hit: false,
        dataset_key: scan.key,
        config_hash,
        train: counts[0],
        test: counts[1],
        skipped,
        greyscale,
        greyscale_example,
        elapsed_s: t0.elapsed().as_secs_f64(),
    })
}

/// An input's path as the manifest stores it: relative to the dataset root `data_dir`
/// (`images_test_rev1/100008.jpg`). Every input path is `data_dir` joined with a layout folder
/// and a name, so the prefix always comes off; a path that is not under it stays as it is.
fn to_manifest(path: &Path, data_dir: &Path) -> PathBuf {
    path.strip_prefix(data_dir).unwrap_or(path).to_path_buf()
}

/// A path the manifest stores, under the dataset path given now (`data_dir`). A path ending in
/// a layout folder and a name (`images_training_rev1/<name>` or `images_test_rev1/<name>`) is
/// taken from `data_dir`: what [`to_manifest`] stores, and what older caches stored with the
/// dataset path of their first `gz prep` in front (absolute, or relative to the working
/// directory of then), which would be wrong from another working directory or through another
/// path to the same dataset. Anything else is returned as stored.
pub(crate) fn from_manifest(stored: &Path, data_dir: &Path) -> PathBuf {
    let mut tail = stored.components().rev();
    match (tail.next(), tail.next()) {
        (Some(std::path::Component::Normal(name)), Some(std::path::Component::Normal(dir)))
            if dir == dataset::TRAIN_DIR || dir == dataset::TEST_DIR =>
        {
            data_dir.join(dir).join(name)
        }
        _ => stored.to_path_buf(),
    }
}

/// How the reason of an input that could not be read starts (a cache hit reads such inputs
/// again: [`PrepError::StaleCache`] when one can be read now).
const UNREADABLE: &str = "cannot read:";

/// Reads and preprocesses one image, and whether it is a greyscale JPEG; the error is the
/// reason to report.
fn load(it: &Item, cfg: &PrepConfig) -> Result<(Vec<f16>, bool), String> {
    let bytes = std::fs::read(&it.path).map_err(|e| format!("{UNREADABLE} {e}"))?;
    let mut out = vec![f16::ZERO; cfg.image_len()];
    prep_jpeg_into(&bytes, cfg, &mut out).map_err(|e| e.to_string())?;
    Ok((out, crate::jpeg_channels(&bytes) == Some(1)))
}
