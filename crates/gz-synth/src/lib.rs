//! gz-synth: the embedded synthetic Galaxy Zoo dataset, in the Kaggle layout, with its noise-free
//! truth and Bayes floor.
//!
//! [`generate`] writes, into one directory,
//! - `images_training_rev1/<id>.jpg` and `images_test_rev1/<id>.jpg`: 424×424 JPEGs drawn like SDSS
//!   gri composites ([`galaxy`] decides what to draw, [`render`] draws it);
//! - `training_solutions_rev1.csv` (the Kaggle training labels) and `test_solutions.csv`: vote
//!   fractions of ~25–60 simulated volunteers walking the Galaxy Zoo 2 tree ([`labels`]);
//! - `expected_training.csv` / `expected_test.csv`: the noise-free fractions (an infinite crowd);
//! - `floor.json`: the RMSE between observed and expected fractions — the best any model can do in
//!   expectation (the Bayes floor of the Kaggle metric on this data);
//! - `synth.json`: the [`SynthConfig`], written last, so a directory without it is incomplete.
//! - `synth.in-progress`: written first, removed after `synth.json` (see [`IN_PROGRESS`]).
//!
//! (`gz synth` also keeps `.gz-synth.lock` there while it runs, [`LOCK_FILE`]; [`generate`]
//! does not.)
//!
//! Every file appears under its final name only once complete: the images through a hidden
//! temporary renamed into place ([`write_image`]), the rest with `gz_schema::write_atomic`.
//!
//! Everything is a pure function of the config: each galaxy has its own ChaCha stream selected by
//! (seed, split, index), so the bytes do not depend on the thread count. gz-synth depends only on
//! gz-schema (the tree, the CSV format); gz-preprocess and the models read what it writes exactly
//! as they read a real Kaggle download. It does not print: the CLI (`gz synth`) shows progress.

pub mod galaxy;
pub mod labels;
pub mod render;

use std::path::{Path, PathBuf};

use gz_schema::{write_atomic, write_solutions, SchemaError, Solutions, N_ANSWERS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::galaxy::Scene;

/// Kaggle's training image folder name.
pub const TRAIN_DIR: &str = "images_training_rev1";
/// Kaggle's test image folder name.
pub const TEST_DIR: &str = "images_test_rev1";
/// Kaggle's training label file.
pub const TRAIN_CSV: &str = "training_solutions_rev1.csv";
/// Labels of the test split (not part of the Kaggle download; for evaluation).
pub const TEST_CSV: &str = "test_solutions.csv";
/// Noise-free fractions of the training split.
pub const EXPECTED_TRAIN_CSV: &str = "expected_training.csv";
/// Noise-free fractions of the test split.
pub const EXPECTED_TEST_CSV: &str = "expected_test.csv";
/// The Bayes floor.
pub const FLOOR_JSON: &str = "floor.json";
/// The config; its presence marks a complete dataset.
pub const SYNTH_JSON: &str = "synth.json";
/// Written before anything else and removed once `synth.json` is: the mark of a dataset gz
/// synth is writing (or was, when a run was interrupted). A Kaggle-layout folder with neither
/// marker is not gz synth's (a real download), and `gz synth --force` must not replace it.
pub const IN_PROGRESS: &str = "synth.in-progress";
/// The lock file `gz synth` holds (an OS advisory lock) in its output folder while it inspects,
/// cleans and writes it, so that a second `gz synth` into the same folder is refused instead
/// of removing or overwriting the first one's files. It holds the writer's process id and goes
/// when the run ends; a killed run leaves it behind, unlocked (the lock ends with the process),
/// and it does not stop the next run. Not part of the dataset: [`clean`] leaves it alone and
/// `gz synth` does not count it when it asks whether a folder is empty. [`generate`] itself
/// takes no lock.
pub const LOCK_FILE: &str = ".gz-synth.lock";

/// Smallest and largest Kaggle-like 6-digit id.
const ID_MIN: u64 = 100_000;
const ID_MAX: u64 = 999_999;
/// Most simulated volunteers per galaxy: each one walks the tree in turn, so the time grows
/// linearly with the count (u32::MAX took minutes per galaxy); far more than any real crowd, and
/// the floor is already ~0.004 RMSE at this many.
pub const MAX_VOLUNTEERS: u32 = 10_000;

/// What to generate. Serialised as `synth.json` next to the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// Number of training images (with labels in `training_solutions_rev1.csv`).
    pub train: usize,
    /// Number of test images (labels in `test_solutions.csv`).
    pub test: usize,
    /// Seed of everything random.
    pub seed: u64,
    /// Fewest simulated volunteers per galaxy.
    pub min_volunteers: u32,
    /// Most simulated volunteers per galaxy.
    pub max_volunteers: u32,
    /// Worker threads (0 = rayon's default). Does not change the output.
    #[serde(skip_serializing_if = "is_zero")]
    pub threads: usize,
    /// The version of the generator that draws the set ([`GENERATOR`]; a `synth.json` without
    /// one is version 1). The same config drawn by another version is another dataset.
    #[serde(default = "first_generator")]
    pub generator: u32,
}

/// The generator version this build draws, written to `synth.json`. Bumped whenever the same
/// config would draw other images or labels, so that a set from an earlier gz is not taken as
/// this one (`gz synth` and `cargo xtask` then regenerate it). Version 2 (2026-11-30): every
/// image is turned by a random one of the 8 right-angle rotations and mirror images (see
/// [`orientation`]), so that the set has no preferred orientation or handedness (version 1
/// drew every spiral wound the same way).
pub const GENERATOR: u32 = 2;

fn first_generator() -> u32 {
    1
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            train: 64,
            test: 16,
            seed: 0,
            min_volunteers: 25,
            max_volunteers: 60,
            threads: 0,
            generator: GENERATOR,
        }
    }
}

impl SynthConfig {
    /// The config with the output-irrelevant fields (threads) cleared, as written to `synth.json`.
    pub fn canonical(&self) -> SynthConfig {
        SynthConfig {
            threads: 0,
            ..self.clone()
        }
    }

    /// Same dataset (ignoring the thread count)?
    pub fn same_dataset(&self, other: &SynthConfig) -> bool {
        self.canonical() == other.canonical()
    }

    /// Whether [`generate`] can write this config (it checks first too): callers that prepare
    /// the output folder (create it, lock it, clean it) ask before touching anything.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |reason: String| Err(SynthError::BadConfig { reason });
        if self.generator != GENERATOR {
            return bad(format!(
                "generator version {} cannot be drawn by this build, which draws version {GENERATOR}",
                self.generator
            ));
        }
        if self.min_volunteers == 0 || self.min_volunteers > self.max_volunteers {
            return bad(format!(
                "volunteers must satisfy 1 <= min ({}) <= max ({})",
                self.min_volunteers, self.max_volunteers
            ));
        }
        if self.threads > 1024 {
            return bad(format!(
                "at most 1024 worker threads (got {}): each is an operating-system thread",
                self.threads
            ));
        }
        if self.max_volunteers > MAX_VOLUNTEERS {
            return bad(format!(
                "at most {MAX_VOLUNTEERS} volunteers per galaxy (got max {}): each one is simulated",
                self.max_volunteers
            ));
        }
        // checked: a sum that wraps must not slip under the limit
        let total = (self.train as u64).checked_add(self.test as u64);
        if total.is_none_or(|t| t > ID_MAX - ID_MIN + 1) {
            return bad(format!(
                "{} train + {} test images do not fit the {} six-digit ids",
                self.train,
                self.test,
                ID_MAX - ID_MIN + 1
            ));
        }
        Ok(())
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SynthSummary {
    /// The output directory.
    pub out_dir: PathBuf,
    /// Training images written.
    pub n_train: usize,
    /// Test images written.
    pub n_test: usize,
    /// RMSE between observed and expected fractions on the training split (`None`: no images).
    pub train_rmse: Option<f64>,
    /// RMSE between observed and expected fractions on the test split (`None`: no images).
    pub test_rmse: Option<f64>,
    /// Bytes of JPEG written.
    pub jpeg_bytes: u64,
    /// Mean simulated volunteers per galaxy.
    pub mean_volunteers: f64,
}

/// `floor.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Floor {
    /// RMSE between observed and expected fractions, training split; `null` when the split is
    /// empty (an RMSE over no rows is not 0).
    pub train_rmse: Option<f64>,
    /// RMSE between observed and expected fractions, test split; `null` when it is empty.
    pub test_rmse: Option<f64>,
    /// Training images.
    pub n_train: usize,
    /// Test images.
    pub n_test: usize,
    /// Seed.
    pub seed: u64,
}

/// Errors of the generator.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The output folder holds what gz synth must not remove.
    #[error("{0}")]
    Refused(String),
    /// The config cannot be generated.
    #[error("bad synth config: {reason}")]
    BadConfig {
        /// Why.
        reason: String,
    },
    /// A file or directory could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing a CSV failed.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// JPEG encoding failed.
    #[error("encoding {path}: {reason}")]
    Jpeg {
        /// The image being written.
        path: PathBuf,
        /// The encoder's message.
        reason: String,
    },
    /// `synth.json` exists but is not a config.
    #[error("{path}: not a gz-synth config: {reason}")]
    BadMarker {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The thread pool could not be built.
    #[error("thread pool: {0}")]
    Pool(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One generated galaxy: its image bytes and label rows.
pub struct Sample {
    /// Kaggle-like id.
    pub id: u64,
    /// The JPEG.
    pub jpeg: Vec<u8>,
    /// Fractions from the simulated volunteers.
    pub observed: [f32; N_ANSWERS],
    /// Noise-free fractions.
    pub expected: [f32; N_ANSWERS],
    /// How many volunteers classified it.
    pub volunteers: u32,
}

/// Which split a galaxy belongs to (part of its RNG stream id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training images.
    Train,
    /// Test images.
    Test,
}

/// The RNG of galaxy `index` of `split`: one ChaCha stream per galaxy.
fn galaxy_rng(seed: u64, split: Split, index: usize) -> ChaCha8Rng {
    stream(seed, split, 0, index)
}

/// ChaCha stream `purpose` (0: the galaxy, 1: its orientation) of galaxy `index` of `split`.
fn stream(seed: u64, split: Split, purpose: u64, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tag = match split {
        Split::Train => 0u64,
        Split::Test => 1u64,
    } + 2 * purpose;
    rng.set_stream((tag << 40) | index as u64);
    rng
}

/// Which of the 8 right-angle rotations and mirror images galaxy `index` of `split` is shown
/// in (for [`render::orient`]), drawn uniformly from a stream of its own, so the galaxy itself,
/// its votes and the floor are those generator version 1 drew. The renderer has a handedness
/// (every spiral winds the same way; a lopsided disk leans into one half-plane of position
/// angles): turned and mirrored at random, the set is the same in each of the 8 orientations,
/// as real cutouts are, and test-time views and Dieleman's flipped parts show the net galaxies
/// of the same kind rather than mirror images it never trained on.
pub fn orientation(seed: u64, split: Split, index: usize) -> u8 {
    stream(seed, split, 1, index).gen_range(0..8)
}

/// Draws, renders and labels one galaxy (pure function of its arguments).
pub fn make_sample(cfg: &SynthConfig, split: Split, index: usize, id: u64) -> Result<Sample, String> {
    let mut rng = galaxy_rng(cfg.seed, split, index);
    let scene = Scene::sample(&mut rng);
    let probs = scene.answer_probs();
    let volunteers = rng.gen_range(cfg.min_volunteers..=cfg.max_volunteers);
    let observed = labels::observed_row(&mut rng, &probs, volunteers);
    let expected = labels::expected_row(&probs);
    let rgb = render::orient(&render::render_rgb(&scene), orientation(cfg.seed, split, index));
    let jpeg = render::encode_jpeg(&rgb).map_err(|e| e.to_string())?;
    Ok(Sample {
        id,
        jpeg,
        observed,
        expected,
        volunteers,
    })
}

/// Draws the Kaggle-like ids: `train + test` distinct six-digit numbers, each split sorted.
pub fn draw_ids(cfg: &SynthConfig) -> (Vec<u64>, Vec<u64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x6761_6c61_7879_7a6f);
    rng.set_stream(u64::MAX);
    let total = cfg.train + cfg.test;
    let span = (ID_MAX - ID_MIN + 1) as usize;
    let picked = rand::seq::index::sample(&mut rng, span, total.min(span));
    let all: Vec<u64> = picked.into_iter().map(|k| ID_MIN + k as u64).collect();
    let mut train = all[..cfg.train.min(all.len())].to_vec();
    let mut test = all[cfg.train.min(all.len())..].to_vec();
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

/// Reads `synth.json` in `dir`: `Ok(None)` if absent (no dataset, or an incomplete one).
pub fn existing_config(dir: &Path) -> Result<Option<SynthConfig>, SynthError> {
    let path = dir.join(SYNTH_JSON);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SynthError::BadMarker {
                path,
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SynthError::Io { path, source }),
    }
}

/// The paths [`generate`] writes in `dir` (for cleaning before a forced regeneration).
pub fn output_paths(dir: &Path) -> Vec<PathBuf> {
    [
        SYNTH_JSON,
        IN_PROGRESS,
        FLOOR_JSON,
        TRAIN_CSV,
        TEST_CSV,
        EXPECTED_TRAIN_CSV,
        EXPECTED_TEST_CSV,
        TRAIN_DIR,
        TEST_DIR,
    ]
    .iter()
    .map(|p| dir.join(p))
    .collect()
}

/// The files [`generate`] writes for `cfg` that `dir` lacks: every image of its ids, the CSVs
/// and `floor.json` (not `synth.json`, whose presence is asked separately). Empty for a complete
/// dataset; a set whose `synth.json` is there but some image or label file was deleted since is
/// not complete. One `stat` per image.
pub fn missing_files(dir: &Path, cfg: &SynthConfig) -> Vec<PathBuf> {
    let (train, test) = draw_ids(cfg);
    let images = |folder: &str, ids: Vec<u64>| {
        let folder = dir.join(folder);
        ids.into_iter().map(move |id| folder.join(format!("{id}.jpg")))
    };
    images(TRAIN_DIR, train)
        .chain(images(TEST_DIR, test))
        .chain([TRAIN_CSV, TEST_CSV, EXPECTED_TRAIN_CSV, EXPECTED_TEST_CSV, FLOOR_JSON].map(|f| dir.join(f)))
        .filter(|p| !p.is_file())
        .collect()
}

/// What the image folders of `dir` hold that [`generate`] does not write (names relative to
/// `dir`, sorted; a folder's with a trailing `/`): anything but `<GalaxyID>.jpg` files and
/// generator temporaries.
pub fn foreign_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for folder in [TRAIN_DIR, TEST_DIR] {
        let Ok(entries) = std::fs::read_dir(dir.join(folder)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_file = e.file_type().is_ok_and(|t| t.is_file());
            // a desktop's clutter (Finder, Explorer, AppleDouble copies) goes with the folder
            let clutter = matches!(name.as_str(), ".DS_Store" | "Thumbs.db" | "desktop.ini") || name.starts_with("._");
            let ours = clutter
                || is_file
                    && (is_temp_name(&name)
                        || name
                            .strip_suffix(".jpg")
                            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())));
            if !ours {
                out.push(format!("{folder}/{name}{}", if is_file { "" } else { "/" }));
            }
        }
    }
    out.sort();
    out
}

/// Removes what [`generate`] writes in `dir` (and nothing else). Refuses, before removing
/// anything, when the image folders hold other files ([`foreign_files`]): they would go with
/// the folders. The in-progress mark ([`IN_PROGRESS`]) is written first and kept: a clean
/// killed or failing part-way leaves a set gz synth still knows for its own unfinished one
/// (without it, what was left had neither mark and passed for a real download that no
/// `gz synth --force` replaced).
pub fn clean(dir: &Path) -> Result<(), SynthError> {
    let foreign = foreign_files(dir);
    if !foreign.is_empty() {
        let shown: Vec<&str> = foreign.iter().take(3).map(String::as_str).collect();
        return Err(SynthError::Refused(format!(
            "{} holds {} gz synth did not write ({}{}): nothing was removed; move {} out first",
            dir.display(),
            if foreign.len() == 1 {
                "a file".to_string()
            } else {
                format!("{} files", foreign.len())
            },
            shown.join(", "),
            if foreign.len() > 3 { ", …" } else { "" },
            if foreign.len() == 1 { "it" } else { "them" }
        )));
    }
    let in_progress = dir.join(IN_PROGRESS);
    write_atomic(
        &in_progress,
        b"gz synth is writing this dataset; synth.json marks it complete\n",
    )?;
    for p in output_paths(dir).into_iter().filter(|p| *p != in_progress) {
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SynthError::Io { path: p, source }),
        }
    }
    Ok(())
}

/// The temporary name [`write_image`] writes `path` under first: hidden, in the same folder (so
/// the rename stays on one file system), ending in `.tmp-<pid>`, not `.jpg`, so that no reader
/// of the folder (gz prep, gz predict) takes it for an image: `.123456.jpg.tmp-4242`.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Is `name` a temporary of [`write_image`] for a Kaggle-style image
/// (`.<digits>.jpg.tmp-<digits>`), of this process or of one that was killed?
pub fn is_temp_name(name: &str) -> bool {
    temp_pid(name).is_some()
}

/// The process id in the name of `gz_schema::write_atomic`'s temporary of one of the
/// dataset's own files (`.training_solutions_rev1.csv.<pid>.tmp`, `.synth.json.<pid>.tmp`, …),
/// `None` for any other name.
fn file_temp_pid(name: &str) -> Option<u32> {
    let (file, pid) = name.strip_prefix('.')?.strip_suffix(".tmp")?.rsplit_once('.')?;
    let ours = [
        TRAIN_CSV,
        TEST_CSV,
        EXPECTED_TRAIN_CSV,
        EXPECTED_TEST_CSV,
        FLOOR_JSON,
        SYNTH_JSON,
        IN_PROGRESS,
    ]
    .contains(&file);
    (ours && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then(|| pid.parse().unwrap_or(u32::MAX))
}

/// The process id in a temporary's name ([`is_temp_name`]), `None` for any other name.
fn temp_pid(name: &str) -> Option<u32> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (id, pid) = name.strip_prefix('.')?.split_once(".jpg.tmp-")?;
    if !(digits(id) && digits(pid)) {
        return None;
    }
    // a number too large for a pid is no process's: its temporary is stale
    Some(pid.parse().unwrap_or(u32::MAX))
}

/// Writes one image: `bytes` go to [`temp_path`], which is then renamed to `path`, so `path`
/// never names a partly written file. On an error the temporary is removed.
///
/// Atomic against a failing write (a full disk) and against the process being killed, not
/// against a system crash: there is no fsync (one per image would cost far more than writing
/// it), so after a power loss a renamed file may still be empty or short. `synth.json`, written
/// last, is the mark of a complete dataset either way. A killed process leaves its temporary
/// behind (hidden, ignored by readers); the next [`generate`] into the folder removes it.
pub fn write_image(path: &Path, bytes: &[u8]) -> Result<(), SynthError> {
    write_image_with(path, |f| std::io::Write::write_all(f, bytes))
}

/// [`write_image`] with the writing done by `write` (tests make it fail half-way).
fn write_image_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<(), SynthError> {
    let tmp = temp_path(path);
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| write(&mut f))
        .and_then(|()| std::fs::rename(&tmp, path));
    result.map_err(|source| {
        // best effort: the error that matters is the write's
        let _ = std::fs::remove_file(&tmp);
        SynthError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Removes the temporaries a killed run left in `dir`: of [`write_image`] (see [`is_temp_name`])
/// and of the dataset's own CSV and JSON files ([`file_temp_pid`]).
/// Those of a process still running are left alone: another `gz synth` writing into the same
/// folder (both found it empty) would see its rename fail. This process's own are left too (a
/// leftover of an earlier process with the same id is overwritten or ignored, never read).
fn remove_stale_temps(dir: &Path) -> Result<(), SynthError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let pid = entry
            .file_name()
            .to_str()
            .and_then(|n| temp_pid(n).or_else(|| file_temp_pid(n)));
        let stale = pid.is_some_and(|pid| pid != std::process::id() && !gz_schema::process::process_alive(pid));
        if stale {
            let p = entry.path();
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(SynthError::Io { path: p, source }),
            }
        }
    }
    Ok(())
}

/// Labels and size of one written image.
struct Written {
    id: u64,
    observed: [f32; N_ANSWERS],
    expected: [f32; N_ANSWERS],
    volunteers: u32,
    bytes: u64,
}

fn write_split(
    dir: &Path,
    cfg: &SynthConfig,
    split: Split,
    ids: &[u64],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Written>, SynthError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    remove_stale_temps(dir)?;
    ids.par_iter()
        .enumerate()
        .map(|(index, &id)| {
            let path = dir.join(format!("{id}.jpg"));
            let s = make_sample(cfg, split, index, id).map_err(|reason| SynthError::Jpeg {
                path: path.clone(),
                reason,
            })?;
            write_image(&path, &s.jpeg)?;
            progress(1);
            Ok(Written {
                id,
                observed: s.observed,
                expected: s.expected,
                volunteers: s.volunteers,
                bytes: s.jpeg.len() as u64,
            })
        })
        .collect()
}

fn solutions(samples: &[Written], expected: bool) -> Solutions {
    let mut s = Solutions::new();
    for x in samples {
        s.push(x.id, if expected { &x.expected } else { &x.observed });
    }
    s
}

/// Writes the dataset described by `cfg` into `out_dir` (see the crate docs for the layout).
///
/// `progress` is called with the number of images just finished (usually 1), from worker threads.
/// Images are written first, each through a temporary renamed into place ([`write_image`]);
/// the CSVs, `floor.json` and finally `synth.json` last, each atomically, so an interrupted run
/// leaves no `synth.json` and no partly written file under a final name. An existing
/// `synth.json` is removed first. Existing files of other datasets are not cleaned here (only the
/// temporaries a killed run left in the image folders): see [`clean`].
pub fn generate(
    out_dir: &Path,
    cfg: &SynthConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<SynthSummary, SynthError> {
    cfg.validate()?;
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    remove_stale_temps(out_dir)?;
    let marker = out_dir.join(SYNTH_JSON);
    let in_progress = out_dir.join(IN_PROGRESS);
    write_atomic(
        &in_progress,
        b"gz synth is writing this dataset; synth.json marks it complete\n",
    )?;
    match std::fs::remove_file(&marker) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(SynthError::Io { path: marker, source }),
    }
    let (train_ids, test_ids) = draw_ids(cfg);
    let run = || -> Result<(Vec<Written>, Vec<Written>), SynthError> {
        let train = write_split(&out_dir.join(TRAIN_DIR), cfg, Split::Train, &train_ids, progress)?;
        let test = write_split(&out_dir.join(TEST_DIR), cfg, Split::Test, &test_ids, progress)?;
        Ok((train, test))
    };
    let (train, test) = if cfg.threads > 0 {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .build()
            .map_err(|e| SynthError::Pool(e.to_string()))?;
        pool.install(run)?
    } else {
        run()?
    };

    write_solutions(&out_dir.join(TRAIN_CSV), &solutions(&train, false))?;
    write_solutions(&out_dir.join(TEST_CSV), &solutions(&test, false))?;
    write_solutions(&out_dir.join(EXPECTED_TRAIN_CSV), &solutions(&train, true))?;
    write_solutions(&out_dir.join(EXPECTED_TEST_CSV), &solutions(&test, true))?;
    let rmse_of = |s: &[Written]| {
        let o: Vec<f32> = s.iter().flat_map(|x| x.observed).collect();
        let e: Vec<f32> = s.iter().flat_map(|x| x.expected).collect();
        (!s.is_empty()).then(|| labels::rmse(&o, &e))
    };
    let floor = Floor {
        train_rmse: rmse_of(&train),
        test_rmse: rmse_of(&test),
        n_train: train.len(),
        n_test: test.len(),
        seed: cfg.seed,
    };
    write_atomic(&out_dir.join(FLOOR_JSON), to_json(&floor).as_bytes())?;
    write_atomic(&marker, to_json(&cfg.canonical()).as_bytes())?;
    std::fs::remove_file(&in_progress).map_err(io_err(&in_progress))?;
    let n = (train.len() + test.len()).max(1) as f64;
    let mean_volunteers = train.iter().chain(&test).map(|s| f64::from(s.volunteers)).sum::<f64>() / n;
    Ok(SynthSummary {
        out_dir: out_dir.to_path_buf(),
        n_train: train.len(),
        n_test: test.len(),
        train_rmse: floor.train_rmse,
        test_rmse: floor.test_rmse,
        jpeg_bytes: train.iter().chain(&test).map(|w| w.bytes).sum(),
        mean_volunteers,
    })
}

/// Pretty JSON of our own serialisable values (plain structs: serialising cannot fail).
fn to_json<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use gz_schema::{answer_index, check_row, column_names};

    /// Each galaxy's orientation is one of the 8, drawn uniformly from a stream of its own:
    /// the galaxy's own stream (what it is, its votes) is untouched by it, the splits differ,
    /// and every orientation is drawn about an eighth of the time.
    #[test]
    fn orientations_are_uniform_and_apart_from_the_galaxy() {
        let n = 8000;
        for split in [Split::Train, Split::Test] {
            let mut counts = [0usize; 8];
            for i in 0..n {
                counts[usize::from(orientation(5, split, i))] += 1;
            }
            // an eighth is 1,000 ± 30 (one sigma): every count within 5 sigma
            assert!(
                counts.iter().all(|&c| (850..=1150).contains(&c)),
                "{split:?}: {counts:?}"
            );
        }
        let draws = |split| (0..64).map(|i| orientation(5, split, i)).collect::<Vec<_>>();
        assert_ne!(draws(Split::Train), draws(Split::Test));
        // the galaxy's stream is the one generator version 1 used (stream id = split << 40 | index)
        let mut old = ChaCha8Rng::seed_from_u64(5);
        old.set_stream((1 << 40) | 17);
        let mut now = galaxy_rng(5, Split::Test, 17);
        assert_eq!(
            (0..8).map(|_| old.gen::<u64>()).collect::<Vec<_>>(),
            (0..8).map(|_| now.gen::<u64>()).collect::<Vec<_>>()
        );
    }

    /// A `synth.json` from before generator versions is version 1: another dataset than the
    /// same config drawn now, which this build cannot draw (validate refuses it).
    #[test]
    fn a_marker_without_a_generator_is_version_1() {
        let t = tempfile::tempdir().unwrap();
        let cfg = SynthConfig::default();
        std::fs::write(
            t.path().join(SYNTH_JSON),
            r#"{"train": 64, "test": 16, "seed": 0, "min_volunteers": 25, "max_volunteers": 60}"#,
        )
        .unwrap();
        let old = existing_config(t.path()).unwrap().unwrap();
        assert_eq!(old.generator, 1);
        assert!(!old.same_dataset(&cfg));
        assert!(old.same_dataset(&SynthConfig {
            generator: 1,
            ..cfg.clone()
        }));
        assert!(old.validate().unwrap_err().to_string().contains("generator version 1"));
        assert_eq!(cfg.generator, GENERATOR);
        assert!(to_json(&cfg.canonical()).contains(&format!("\"generator\": {GENERATOR}")));
    }

    /// Mean expected and observed rows over many drawn galaxies (no rendering: labels only).
    fn mean_rows(n: usize, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f32>, Vec<f32>) {
        let cfg = SynthConfig {
            seed,
            ..SynthConfig::default()
        };
        let (mut me, mut mo) = (vec![0f64; N_ANSWERS], vec![0f64; N_ANSWERS]);
        let (mut all_e, mut all_o) = (Vec::new(), Vec::new());
        for i in 0..n {
            let mut rng = galaxy_rng(cfg.seed, Split::Train, i);
            let scene = Scene::sample(&mut rng);
            let probs = scene.answer_probs();
            let v = rng.gen_range(cfg.min_volunteers..=cfg.max_volunteers);
            let o = labels::observed_row(&mut rng, &probs, v);
            let e = labels::expected_row(&probs);
            assert!(
                check_row(&o, 1e-5).is_empty(),
                "observed row {i}: {:?}",
                check_row(&o, 1e-5)
            );
            assert!(
                check_row(&e, 1e-5).is_empty(),
                "expected row {i}: {:?}",
                check_row(&e, 1e-5)
            );
            for a in 0..N_ANSWERS {
                me[a] += f64::from(e[a]) / n as f64;
                mo[a] += f64::from(o[a]) / n as f64;
            }
            all_e.extend_from_slice(&e);
            all_o.extend_from_slice(&o);
        }
        (me, mo, all_e, all_o)
    }

    #[test]
    fn label_frequencies_are_plausible() {
        let (me, mo, e, o) = mean_rows(4000, 5);
        let names: Vec<&str> = column_names().collect();
        let report: Vec<String> = (0..N_ANSWERS)
            .map(|a| format!("{} {:.3}/{:.3}", names[a], me[a], mo[a]))
            .collect();
        let report = report.join(", ");
        // Q1 like the real data: about 0.43 smooth, 0.54 features, 0.03 star/artefact
        assert!((me[0] - 0.43).abs() < 0.06, "smooth: {report}");
        assert!((me[1] - 0.54).abs() < 0.06, "features: {report}");
        assert!(me[2] > 0.01 && me[2] < 0.06, "star/artefact: {report}");
        // every answer is used sometimes, none dominates where the real data are mixed
        for a in 0..N_ANSWERS {
            assert!(me[a] > 0.002, "{} never chosen: {report}", names[a]);
            assert!(
                (me[a] - mo[a]).abs() < 0.02,
                "{}: volunteers unbiased: {report}",
                names[a]
            );
        }
        let odd = me[answer_index(6, 1)];
        assert!(odd > 0.12 && odd < 0.4, "odd: {report}");
        let edge = me[answer_index(2, 1)];
        assert!(edge > 0.05 && edge < 0.2, "edge-on: {report}");
        let spiral = me[answer_index(4, 1)];
        assert!(spiral > 0.15 && spiral < 0.4, "spiral: {report}");
        // the Bayes floor of ~40 volunteers, in the range of the Kaggle winners' RMSE and below
        let floor = labels::rmse(&e, &o);
        assert!(floor > 0.03 && floor < 0.09, "floor {floor}");
        if std::env::var_os("GZ_SYNTH_REPORT").is_some() {
            eprintln!("floor {floor:.4}; mean expected/observed: {report}");
        }
    }

    #[test]
    fn ids_are_six_digit_distinct_and_split() {
        let cfg = SynthConfig {
            train: 500,
            test: 200,
            seed: 9,
            ..SynthConfig::default()
        };
        let (a, b) = draw_ids(&cfg);
        assert_eq!((a.len(), b.len()), (500, 200));
        let mut all: Vec<u64> = a.iter().chain(&b).copied().collect();
        assert!(all.iter().all(|id| (ID_MIN..=ID_MAX).contains(id)));
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 700);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_image_write_that_fails_half_way_leaves_no_file_under_the_final_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("123456.jpg");
        let half_then_full = |f: &mut std::fs::File| {
            std::io::Write::write_all(f, &[0xFF, 0xD8, 0xFF, 0xE0])?;
            Err(std::io::Error::other("No space left on device"))
        };
        let e = write_image_with(&path, half_then_full).unwrap_err();
        assert!(matches!(&e, SynthError::Io { path: p, .. } if *p == path), "{e}");
        assert!(e.to_string().contains("No space left"), "{e}");
        assert!(names(dir.path()).is_empty(), "left behind: {:?}", names(dir.path()));

        // a complete write is there under its name only; a failed rewrite keeps it whole
        write_image(&path, b"complete").unwrap();
        assert_eq!(names(dir.path()), ["123456.jpg"]);
        write_image_with(&path, half_then_full).unwrap_err();
        assert_eq!(std::fs::read(&path).unwrap(), b"complete");
        assert_eq!(names(dir.path()), ["123456.jpg"]);

        // a folder in the way of the rename: an error, and the temporary is gone too
        let blocked = dir.path().join("654321.jpg");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"x").unwrap();
        write_image(&blocked, b"jpeg").unwrap_err();
        assert_eq!(names(dir.path()), ["123456.jpg", "654321.jpg"]);
    }

    #[test]
    fn temporaries_are_not_images_and_a_new_run_removes_stale_ones() {
        let tmp = temp_path(Path::new("/d/images_test_rev1/123456.jpg"));
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert_eq!(tmp.parent(), Some(Path::new("/d/images_test_rev1")));
        assert!(name.starts_with('.') && !name.ends_with(".jpg"), "{name}");
        assert!(is_temp_name(name), "{name}");
        for other in [
            "123456.jpg",
            ".123456.jpg",
            ".notes.jpg.tmp-12",
            ".1.jpg.tmp-",
            "x.1.jpg.tmp-2",
        ] {
            assert!(!is_temp_name(other), "{other}");
        }

        // a killed run's temporary goes; files that are not ours stay
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join(TEST_DIR);
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(images.join(".100001.jpg.tmp-99999999"), b"half a").unwrap();
        std::fs::write(images.join(".keep"), b"mine").unwrap();
        // and a killed run's half-written labels and marks beside them (they stayed)
        let beside = [".test_solutions.csv.99999999.tmp", ".synth.json.99999999.tmp"];
        for t in beside {
            std::fs::write(dir.path().join(t), b"half").unwrap();
        }
        std::fs::write(dir.path().join(".notes.csv.99999999.tmp"), b"mine").unwrap();
        let cfg = SynthConfig {
            train: 0,
            test: 2,
            seed: 3,
            ..SynthConfig::default()
        };
        generate(dir.path(), &cfg, &|_| {}).unwrap();
        for t in beside {
            assert_eq!(dir.path().join(t).exists(), !cfg!(target_os = "linux"), "{t}");
        }
        assert!(dir.path().join(".notes.csv.99999999.tmp").exists(), "not ours");
        let (_, test_ids) = draw_ids(&cfg);
        let mut want: Vec<String> = test_ids.iter().map(|id| format!("{id}.jpg")).collect();
        want.push(".keep".into());
        if !cfg!(target_os = "linux") {
            // (elsewhere whether its process ended cannot be told: it is left alone)
            want.push(".100001.jpg.tmp-99999999".into());
        }
        want.sort();
        assert_eq!(names(&images), want);
    }

    /// A second run into the same folder while the first still writes (both found it empty)
    /// leaves the first's temporaries alone: removing one made the first run's rename fail
    /// ("No such file or directory" naming an image) where, before temporaries, both runs of
    /// the same config completed.
    #[test]
    #[cfg(target_os = "linux")]
    fn a_live_writers_temporary_is_left_alone() {
        let mut writer = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join(TEST_DIR);
        std::fs::create_dir_all(&images).unwrap();
        let live = format!(".100001.jpg.tmp-{}", writer.id());
        std::fs::write(images.join(&live), b"being written").unwrap();
        let cfg = SynthConfig {
            train: 0,
            test: 1,
            seed: 3,
            ..SynthConfig::default()
        };
        let result = generate(dir.path(), &cfg, &|_| {});
        let _ = writer.kill();
        let _ = writer.wait();
        result.unwrap();
        assert!(images.join(&live).exists(), "{:?}", names(&images));
    }

    /// A clean leaves the in-progress mark (written before anything is removed), so a clean
    /// stopped part-way is gz synth's unfinished set, not a folder of unmarked images that
    /// passed for a real download.
    #[test]
    fn a_clean_keeps_the_in_progress_mark() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SynthConfig {
            train: 2,
            test: 1,
            seed: 3,
            ..SynthConfig::default()
        };
        generate(dir.path(), &cfg, &|_| {}).unwrap();
        assert!(!dir.path().join(IN_PROGRESS).exists());
        clean(dir.path()).unwrap();
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [IN_PROGRESS]);
    }

    #[test]
    fn bad_configs_are_errors() {
        // counts whose sum wraps around are refused, not wrapped under the limit
        for (train, test) in [(usize::MAX, 5), (usize::MAX - 3, 6), (900_000, 1)] {
            let cfg = SynthConfig {
                train,
                test,
                ..SynthConfig::default()
            };
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains("do not fit"), "{train} + {test}: {e}");
        }
        // huge crowds are refused up front, not simulated for minutes per galaxy
        let cfg = SynthConfig {
            train: 1,
            test: 0,
            min_volunteers: 4_000_000_000,
            max_volunteers: u32::MAX,
            ..SynthConfig::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
        let cfg = SynthConfig {
            max_volunteers: MAX_VOLUNTEERS,
            ..SynthConfig::default()
        };
        assert!(cfg.validate().is_ok());
        let mut cfg = SynthConfig {
            min_volunteers: 10,
            max_volunteers: 5,
            ..SynthConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            generate(dir.path(), &cfg, &|_| {}),
            Err(SynthError::BadConfig { .. })
        ));
        cfg = SynthConfig {
            train: 900_000,
            test: 1,
            ..SynthConfig::default()
        };
        assert!(matches!(
            generate(dir.path(), &cfg, &|_| {}),
            Err(SynthError::BadConfig { .. })
        ));
        assert!(existing_config(dir.path()).unwrap().is_none());
    }
}
