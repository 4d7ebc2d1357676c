//! Checkpoints: safetensors weights plus a JSON sidecar, written atomically, and
//! [`LoadedModel`] to rebuild a trained model for inference.
//!
//! A checkpoint is a pair `NAME.safetensors` (the f32 value of every parameter under its
//! `vb.pp(..)` name — the f32 master copy for bf16 runs) and `NAME.json` (a [`Sidecar`]: the
//! full resolved `TrainConfig` including the `ModelConfig`, epoch, metrics, the shard cache's
//! `prep_config` and hash, the code version, and the CRC-32 of the weights file). The trainer
//! ([`crate::train`]) writes `best.*` and `last.*` (plus `last.optim.safetensors`, the optimizer
//! state, for `--resume`) so that a kill at any instant leaves a loadable checkpoint: each new
//! weights file is first *staged* beside the old one (`NAME.safetensors.new`, temp + fsync +
//! rename), then the sidecar naming the new checksums replaces the old sidecar (atomically),
//! and only then do the staged files replace the old ones ([`stage_tensors`],
//! [`commit_staged`]). Until that last rename the old sidecar still matches the old files;
//! after the sidecar's, the loader ([`load_tensors_checked`]) finds the checksum it names in
//! the staged file when the final name still holds the old one. A checksum that matches
//! neither is reported, never paired with the wrong weights. gz-eval loads models through
//! [`LoadedModel::load`].
//!
//! Also here: [`SeededInit`], a `VarBuilder` backend that initialises new variables from a
//! ChaCha RNG seeded by (seed, variable name). candle's CPU RNG cannot be seeded, and the
//! trainer promises that the same seed gives the same run.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, ModuleT, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::nets::{self, Model};
use crate::train::{EpochMetrics, TrainConfig};

/// Format tag of the sidecar.
pub const SIDECAR_FORMAT: &str = "gz-model-checkpoint";
/// Version of the sidecar layout.
pub const SIDECAR_VERSION: u32 = 1;

/// Errors while saving or loading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid checkpoint sidecar: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Candle { path: PathBuf, source: candle_core::Error },
}

/// Trainer state stored with `last.*`, enough to continue the run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeState {
    /// Optimizer state file (next to the sidecar).
    pub optimizer_file: String,
    /// CRC-32 of the optimizer state file.
    pub optimizer_crc32: u32,
    /// Optimizer steps taken so far.
    pub optimizer_steps: u64,
    /// Epochs since the best validation RMSE (early stopping counter).
    pub epochs_since_best: usize,
    /// Wall-clock seconds of training so far (resumed runs keep counting).
    pub elapsed_s: f64,
    /// Every epoch's metrics so far (`metrics.jsonl` is rewritten from this on resume).
    pub history: Vec<EpochMetrics>,
}

/// The JSON sidecar of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    /// Always [`SIDECAR_FORMAT`].
    pub format: String,
    /// [`SIDECAR_VERSION`].
    pub version: u32,
    /// The model (also inside `train`, repeated for readers that only need the model).
    pub model: ModelConfig,
    /// The full resolved training configuration.
    pub train: TrainConfig,
    /// Epochs completed when this checkpoint was written (1-based).
    pub epoch: usize,
    /// Metrics of that epoch.
    pub metrics: EpochMetrics,
    /// Best validation RMSE so far and its epoch.
    pub best_val_rmse: f64,
    pub best_epoch: usize,
    /// Validation RMSE of predicting the training-set mean (the baseline to beat).
    pub baseline_val_rmse: f64,
    /// Per-answer training-set mean (for reports).
    pub train_mean: Vec<f64>,
    /// Number of training / validation images.
    pub n_train: usize,
    pub n_val: usize,
    /// The shard cache's preprocessing config and its hash.
    pub prep_config: serde_json::Value,
    pub prep_config_hash: String,
    /// Where the cache was (informational).
    pub cache_dir: Option<PathBuf>,
    /// Content fingerprint of the training split trained on (`gz_shards::Cache::split_fingerprint`;
    /// absent in sidecars written before the tenth session, and for sources that are not a
    /// cache). A resume or an evaluation on a cache whose training split has another one is
    /// refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_fingerprint: Option<String>,
    /// Which galaxies the training split held and their labels, whatever their preprocessing
    /// (`gz_shards::Cache::split_data_fingerprint`; absent before the twenty-fourth session):
    /// `gz predict` tells an ensemble of runs on differently prepared caches of the same images
    /// from one of runs on different images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_data_fingerprint: Option<String>,
    /// Image shape the model was trained on (C, H, W).
    pub input_shape: [usize; 3],
    /// Trainable parameters.
    pub param_count: usize,
    /// `gz-model` version and git commit if known at build time.
    pub code_version: String,
    pub git_hash: Option<String>,
    /// Weights file (next to the sidecar) and its CRC-32.
    pub weights_file: String,
    pub weights_crc32: u32,
    /// Present in `last.json`: what `--resume` needs.
    pub resume: Option<ResumeState>,
    /// CRC-32 of what the weights are read by ([`config_crc32`]: the model, the preprocessing
    /// config and its hash, the input shape), set by [`write_sidecar`] and checked by
    /// [`read_sidecar`]: a sidecar edited by hand (its head switched from sigmoid to tree, its
    /// view fraction made negative) was loaded over the weights and predicted something else in
    /// silence. Absent in sidecars written before the twenty-third session (not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_crc32: Option<u32>,
}

/// The CRC-32 of a sidecar's model, preprocessing config, its hash and the input shape, as
/// compact JSON ([`Sidecar::config_crc32`]).
pub fn config_crc32(s: &Sidecar) -> u32 {
    let what = (&s.model, &s.prep_config, &s.prep_config_hash, &s.input_shape);
    crc32fast::hash(serde_json::to_string(&what).unwrap_or_default().as_bytes())
}

/// The code version recorded in sidecars.
pub fn code_version() -> (String, Option<String>) {
    (
        env!("CARGO_PKG_VERSION").to_string(),
        option_env!("GZ_GIT_HASH").map(str::to_string),
    )
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes tensors as safetensors to `path` atomically (temp, fsync, rename) and returns the
/// CRC-32 of the file. The file is serialised in memory and written to `NAME.tmpPID` beside
/// `path` by this function: candle's `safetensors::save` wrote through a temporary of the
/// safetensors crate's own (`.tmpXXXXXX`, mode 0600), which a killed run left behind whole
/// (up to a weights file's size, 200 MB for VGG16-blog) under a name no cleanup recognised.
pub fn save_tensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<u32, CheckpointError> {
    let tmp = tmp_path(path);
    // Tensors may live on a GPU; safetensors needs host data.
    let host: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()
        .map_err(|source| CheckpointError::Candle {
            path: path.to_path_buf(),
            source,
        })?;
    let bytes = safetensors::tensor::serialize(&host, None).map_err(|e| CheckpointError::Candle {
        path: path.to_path_buf(),
        source: candle_core::Error::from(e),
    })?;
    drop(host);
    let crc = crc32fast::hash(&bytes);
    // created with the mode of every other file gz writes (0666 less the umask), anew: a link
    // planted under the temporary's name is replaced, not followed
    let written = (|| {
        use std::io::Write as _;
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(CheckpointError::Io { path: tmp, source: e });
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(crc)
}

/// Where [`stage_tensors`] writes the next version of `path`: `NAME.new` beside it.
pub fn staged_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".new");
    path.with_file_name(name)
}

/// Writes the next version of the tensors file `path` to its staged name ([`staged_path`])
/// atomically and returns its CRC-32; `path` itself is untouched until [`commit_staged`]. Write
/// the sidecar naming the new checksum between the two (see the module docs).
pub fn stage_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<u32, CheckpointError> {
    save_tensors_atomic(tensors, &staged_path(path))
}

/// Moves the staged version of `path` into place (one rename).
pub fn commit_staged(path: &Path) -> Result<(), CheckpointError> {
    std::fs::rename(staged_path(path), path).map_err(io_err(path))
}

/// After a run was killed between writing a sidecar and [`commit_staged`]: moves a staged file
/// whose checksum is `crc` into place, so the next [`stage_tensors`] cannot overwrite the only
/// copy the sidecar names. Nothing to do (Ok(false)) when `path` already has the checksum;
/// Ok(true) when the staged file was moved.
pub fn commit_if_staged(path: &Path, crc: u32) -> Result<bool, CheckpointError> {
    let staged = staged_path(path);
    if !staged.exists() {
        return Ok(false); // the usual case: every rename was done, nothing to read
    }
    let matches = |p: &Path| std::fs::read(p).is_ok_and(|b| crc32fast::hash(&b) == crc);
    if !matches(path) && matches(&staged) {
        commit_staged(path)?;
        return Ok(true);
    }
    Ok(false)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Reads a safetensors file whose CRC-32 must be `crc`, onto `device`: `path`, or its staged
/// next version ([`staged_path`]) when a run was stopped between writing the sidecar that names
/// `crc` and moving the staged file into place.
pub fn load_tensors_checked(
    path: &Path,
    crc: u32,
    device: &Device,
) -> Result<HashMap<String, Tensor>, CheckpointError> {
    let read = std::fs::read(path);
    let got = read.as_ref().ok().map(|b| crc32fast::hash(b));
    let bytes = if got == Some(crc) {
        read.map_err(io_err(path))?
    } else {
        let staged = staged_path(path);
        match std::fs::read(&staged) {
            Ok(b) if crc32fast::hash(&b) == crc => b,
            _ => {
                // a missing file is an I/O error naming it; a present one has its checksum in `got`
                read.map_err(io_err(path))?;
                let got = got.unwrap_or_default();
                return Err(CheckpointError::Invalid {
                    path: path.to_path_buf(),
                    reason: format!(
                        "checksum {got:08x} does not match the sidecar's {crc:08x} (file replaced, truncated or \
                         from another run)"
                    ),
                });
            }
        }
    };
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|source| CheckpointError::Candle {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a sidecar atomically.
pub fn write_sidecar(sidecar: &Sidecar, path: &Path) -> Result<(), CheckpointError> {
    let sidecar = Sidecar {
        config_crc32: Some(config_crc32(sidecar)),
        ..sidecar.clone()
    };
    let mut text = serde_json::to_string_pretty(&sidecar).map_err(|source| CheckpointError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    gz_schema::write_atomic(path, text.as_bytes()).map_err(|e| match e {
        // (its message names the path already: "PATH: No space left on device")
        gz_schema::SchemaError::Io { path, source } => CheckpointError::Io { path, source },
        e => CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })
}

/// Reads and checks a sidecar.
pub fn read_sidecar(path: &Path) -> Result<Sidecar, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let sidecar: Sidecar = serde_json::from_str(&text).map_err(|source| CheckpointError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    if sidecar.format != SIDECAR_FORMAT || sidecar.version != SIDECAR_VERSION {
        return Err(CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "format {:?} version {} (this build reads {SIDECAR_FORMAT:?} version {SIDECAR_VERSION})",
                sidecar.format, sidecar.version
            ),
        });
    }
    if let Some(written) = sidecar.config_crc32 {
        let now = config_crc32(&sidecar);
        if now != written {
            return Err(CheckpointError::Invalid {
                path: path.to_path_buf(),
                reason: format!(
                    "its model or preprocessing settings were changed after gz train wrote it (their checksum is \
                     {now:08x}, written {written:08x}): the weights beside it were trained with other settings, and \
                     would be read as a different model; restore the sidecar as gz train wrote it"
                ),
            });
        }
    }
    Ok(sidecar)
}

/// A `VarBuilder` backend over a [`VarMap`] whose new variables are drawn from a ChaCha RNG
/// seeded by (seed, name), honouring candle's `Init` hints (constant, normal, uniform,
/// Kaiming). Same seed and model → bit-identical initial weights on every device.
pub struct SeededInit {
    varmap: VarMap,
    seed: u64,
}

impl SeededInit {
    pub fn new(varmap: VarMap, seed: u64) -> Self {
        Self { varmap, seed }
    }

    fn sample(&self, shape: &Shape, name: &str, init: Init) -> Vec<f32> {
        let n = shape.elem_count();
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let seed = crate::data::mix_seed(self.seed, 0x696e_6974, name_hash);
        match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => draw(seed, n, NORMAL_WORDS, |rng| normal(rng, mean, stdev)),
            Init::Uniform { lo, up } => draw(seed, n, UNIFORM_WORDS, |rng| rng.gen_range(lo..=up) as f32),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    candle_nn::init::NormalOrUniform::Uniform => {
                        let b = 3f64.sqrt() * std;
                        draw(seed, n, UNIFORM_WORDS, |rng| rng.gen_range(-b..=b) as f32)
                    }
                    candle_nn::init::NormalOrUniform::Normal => {
                        draw(seed, n, NORMAL_WORDS, |rng| normal(rng, 0.0, std))
                    }
                }
            }
        }
    }
}

/// 32-bit ChaCha words one value takes: two `u64` draws for a normal (Box–Muller), one for a
/// uniform (rand's inclusive float range: no rejection).
const NORMAL_WORDS: u64 = 4;
const UNIFORM_WORDS: u64 = 2;
/// Values per parallel chunk of [`draw`].
const DRAW_CHUNK: usize = 1 << 15;

/// One normal value by Box–Muller from two `f64` draws.
fn normal(rng: &mut ChaCha8Rng, mean: f64, std: f64) -> f32 {
    let u1: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.gen();
    (mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// `n` values of `f` from the ChaCha stream seeded with `seed`, `f` taking exactly `words` words
/// of it per value: in parallel chunks, each seeking the one stream to its first value's word,
/// so the values are the serial draw's, bit for bit, whatever the thread count (a Dieleman or
/// VGG16 initialisation took 1–2 s serially, most of it `ln` and `cos`).
fn draw(seed: u64, n: usize, words: u64, f: impl Fn(&mut ChaCha8Rng) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(DRAW_CHUNK).enumerate().for_each(|(k, chunk)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let first = u128::from(words) * (k * DRAW_CHUNK) as u128;
        rng.set_word_pos(first);
        for v in chunk.iter_mut() {
            *v = f(&mut rng);
        }
        debug_assert_eq!(rng.get_word_pos(), first + u128::from(words) * chunk.len() as u128);
    });
    out
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let values = self.sample(&s, name, h);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = candle_core::Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("`get_unchecked` is not supported while initialising a model ({name})")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().map(|d| d.contains_key(name)).unwrap_or(false)
    }
}

/// Builds `cfg` with fresh, seeded weights of `dtype` on `device`; returns the model and the
/// `VarMap` holding its variables.
pub fn build_seeded(
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Model, VarMap)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_backend(Box::new(SeededInit::new(varmap.clone(), seed)), dtype, device.clone());
    let model = nets::build(cfg, vb)?;
    Ok((model, varmap))
}

/// A backend over loaded tensors that records which names the model asked for, so unused
/// (foreign) tensors in a checkpoint are reported.
struct Recording {
    tensors: HashMap<String, Tensor>,
    used: Mutex<HashSet<String>>,
}

impl SimpleBackend for Recording {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("the checkpoint has no tensor `{name}`")))?;
        if t.shape() != &s {
            candle_core::bail!("tensor `{name}` has shape {:?}, the model expects {s:?}", t.shape());
        }
        if let Ok(mut u) = self.used.lock() {
            u.insert(name.to_string());
        }
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("the checkpoint has no tensor `{name}`")))?;
        if let Ok(mut u) = self.used.lock() {
            u.insert(name.to_string());
        }
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A trained model rebuilt from a checkpoint, ready for inference.
pub struct LoadedModel {
    model: Model,
    sidecar: Sidecar,
    device: Device,
    dtype: DType,
    weights_path: PathBuf,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("weights", &self.weights_path)
            .field("epoch", &self.sidecar.epoch)
            .finish()
    }
}

/// Default number of images per forward pass in [`LoadedModel::predict`].
pub const PREDICT_BATCH: usize = 64;

impl LoadedModel {
    /// Loads a checkpoint: `path` is a run directory (uses `best.safetensors`) or a
    /// `.safetensors` file with its `.json` sidecar beside it. The model is rebuilt from the
    /// sidecar's `ModelConfig` in f32; a checksum mismatch, a missing or foreign tensor, or a
    /// shape mismatch is an error naming the file.
    pub fn load(path: &Path, device: &Device) -> Result<Self, CheckpointError> {
        Self::load_with_dtype(path, device, DType::F32)
    }

    /// As [`LoadedModel::load`], computing in `dtype` (bf16 on CUDA for faster inference).
    pub fn load_with_dtype(path: &Path, device: &Device, dtype: DType) -> Result<Self, CheckpointError> {
        let (weights_path, sidecar_path) = resolve_paths(path)?;
        if !sidecar_path.exists() && weights_path.is_file() {
            return Err(CheckpointError::Invalid {
                path: sidecar_path,
                reason: format!(
                    "missing: `gz train` writes this sidecar (the model's config and the weights' checksum) beside \
                     {}, and the weights cannot be loaded without it (copy it along with them)",
                    weights_path.display()
                ),
            });
        }
        let sidecar = read_sidecar(&sidecar_path)?;
        let tensors = load_tensors_checked(&weights_path, sidecar.weights_crc32, &Device::Cpu)?;
        // a diverged run's weights (saved by a gz before training checked them) make a dead net
        // whose constant output would pass for predictions
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for name in names {
            let finite = tensors[name]
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map(|v| v.iter().all(|x| x.is_finite()))
                .map_err(|source| CheckpointError::Candle {
                    path: weights_path.clone(),
                    source,
                })?;
            if !finite {
                return Err(CheckpointError::Invalid {
                    path: weights_path,
                    reason: format!(
                        "`{name}` holds NaN or infinite weights: the run diverged (retrain with a lower learning rate)"
                    ),
                });
            }
        }
        let backend = Recording {
            tensors,
            used: Mutex::new(HashSet::new()),
        };
        let names: Vec<String> = backend.tensors.keys().cloned().collect();
        let backend = std::sync::Arc::new(backend);
        let vb = VarBuilder::from_backend(Box::new(ArcBackend(backend.clone())), dtype, device.clone());
        let model = nets::build(&sidecar.model, vb).map_err(|source| CheckpointError::Candle {
            path: weights_path.clone(),
            source,
        })?;
        let used = backend.used.lock().map(|u| u.clone()).unwrap_or_default();
        let mut unused: Vec<&String> = names.iter().filter(|n| !used.contains(*n)).collect();
        if !unused.is_empty() {
            unused.sort();
            return Err(CheckpointError::Invalid {
                path: weights_path,
                reason: format!(
                    "holds {} the model {:?} does not have (e.g. `{}`): not a checkpoint of this model",
                    gz_schema::count(unused.len(), "tensor"),
                    sidecar.model,
                    unused[0]
                ),
            });
        }
        Ok(Self {
            model,
            sidecar,
            device: device.clone(),
            dtype,
            weights_path,
        })
    }

    /// The sidecar (configs, epoch, metrics, cache hash).
    pub fn sidecar(&self) -> &Sidecar {
        &self.sidecar
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        &self.sidecar.model
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights file that was loaded.
    pub fn weights_path(&self) -> &Path {
        &self.weights_path
    }

    /// The underlying network (eval mode is the caller's job: use `forward_t(x, false)`).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Predicts (B, 37) f32 vote fractions for (B, 3, H, W) images in [0, 1] (any float dtype,
    /// any device: moved to the model's), in eval mode, [`PREDICT_BATCH`] images at a time.
    pub fn predict(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let n = images.dim(0)?;
        let mut outs = Vec::new();
        let mut start = 0;
        while start < n {
            let len = PREDICT_BATCH.min(n - start);
            let x = images
                .narrow(0, start, len)?
                .to_device(&self.device)?
                .to_dtype(self.dtype)?;
            // (no backward pass follows: nothing kept per chunk, whatever the weights are)
            let y = crate::ops::no_grad(|| self.model.forward_t(&x, false))?;
            outs.push(y.detach().to_dtype(DType::F32)?);
            start += len;
        }
        if outs.is_empty() {
            return Tensor::zeros((0, gz_schema::N_ANSWERS), DType::F32, &self.device);
        }
        Tensor::cat(&outs, 0)
    }
}

/// Shares one backend between the `VarBuilder` and the caller.
struct ArcBackend(std::sync::Arc<Recording>);

impl SimpleBackend for ArcBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// (weights, sidecar) paths for a run directory or a `.safetensors` / `.json` path.
fn resolve_paths(path: &Path) -> Result<(PathBuf, PathBuf), CheckpointError> {
    if path.is_dir() {
        let w = path.join("best.safetensors");
        let s = path.join("best.json");
        if !s.exists() {
            let reason = if path.join("last.safetensors").is_file() && path.join("last.json").is_file() {
                // a run stopped before its best checkpoint was written, or one whose best.* was
                // removed: its last epoch's weights are there to be named
                format!(
                    "no best.safetensors here (no best.json), but last.safetensors is: to use the last epoch's \
                     weights pass --run {}",
                    path.join("last.safetensors").display()
                )
            } else {
                "no best.json here: not a finished training run directory (train first, or pass a .safetensors file)"
                    .into()
            };
            return Err(CheckpointError::Invalid {
                path: path.to_path_buf(),
                reason,
            });
        }
        return Ok((w, s));
    }
    if path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".optim.safetensors"))
    {
        let run = path.parent().unwrap_or(Path::new("."));
        return Err(CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "the optimizer's state for --resume, not a model checkpoint: pass the run ({}) or its \
                 best.safetensors / last.safetensors",
                run.display()
            ),
        });
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok((path.to_path_buf(), path.with_extension("json"))),
        Some("json") => Ok((path.with_extension("safetensors"), path.to_path_buf())),
        _ => Err(CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason: "expected a run directory, a .safetensors file or its .json sidecar".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run directory with only `last.*` names the file to pass instead of "not a finished
    /// training run directory".
    #[test]
    fn a_run_without_best_names_its_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let reason = |p: &Path| match resolve_paths(p) {
            Err(CheckpointError::Invalid { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(reason(dir.path()).contains("not a finished training run directory"));
        std::fs::write(dir.path().join("last.safetensors"), b"").unwrap();
        std::fs::write(dir.path().join("last.json"), b"{}").unwrap();
        let r = reason(dir.path());
        let last = dir.path().join("last.safetensors");
        assert!(
            r.contains("no best.safetensors here") && r.contains(&format!("--run {}", last.display())),
            "{r}"
        );
        // the form suggested is a checkpoint path of its own
        let (w, s) = resolve_paths(&last).unwrap();
        assert_eq!((w, s), (last.clone(), dir.path().join("last.json")));
        // weights copied without their sidecar: said so
        let lone = dir.path().join("model.safetensors");
        std::fs::write(&lone, b"").unwrap();
        let e = LoadedModel::load(&lone, &Device::Cpu).err().unwrap().to_string();
        assert!(
            e.contains("model.json") && e.contains("missing: `gz train` writes this sidecar"),
            "{e}"
        );
        // the optimizer's state: named so (it was "last.optim.json missing … copy it along")
        let optim = dir.path().join("last.optim.safetensors");
        std::fs::write(&optim, b"").unwrap();
        let r = reason(&optim);
        assert!(
            r.contains("the optimizer's state for --resume, not a model checkpoint"),
            "{r}"
        );
    }

    /// A checkpoint gets the mode of every other file gz writes (0666 less the umask), not the
    /// safetensors writer's private 0600: a colleague could not read a shared run. Nothing
    /// but the file is left in its folder (the safetensors writer's own `.tmpXXXXXX` was left
    /// by a kill).
    #[cfg(unix)]
    #[test]
    fn checkpoints_get_the_usual_file_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let t = HashMap::from([(
            "w".to_string(),
            Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        )]);
        let path = dir.path().join("w.safetensors");
        save_tensors_atomic(&t, &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let csv = dir.path().join("x.csv");
        std::fs::write(&csv, "x").unwrap();
        let usual = std::fs::metadata(&csv).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, usual, "{mode:o} vs {usual:o}");
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["w.safetensors", "x.csv"]);
        // the bytes are a safetensors file whose checksum is the one returned
        let crc = save_tensors_atomic(&t, &path).unwrap();
        assert_eq!(crc, crc32fast::hash(&std::fs::read(&path).unwrap()));
        let back = load_tensors_checked(&path, crc, &Device::Cpu).unwrap();
        assert_eq!(back["w"].to_vec1::<f32>().unwrap(), [0.0; 3]);
    }

    /// The serial draw the parallel one must equal: one stream, value after value.
    fn serial(seed: u64, n: usize, f: impl Fn(&mut ChaCha8Rng) -> f32) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| f(&mut rng)).collect()
    }

    /// Parallel chunks give the serial draw's values to the bit (so initial weights did not
    /// change when the draw went parallel), for every init kind, sizes across chunk edges.
    #[test]
    fn parallel_draw_equals_the_serial_stream() {
        for n in [1, 7, DRAW_CHUNK - 1, DRAW_CHUNK, 3 * DRAW_CHUNK + 17] {
            let (a, b) = (
                draw(11, n, NORMAL_WORDS, |r| normal(r, 0.5, 2.0)),
                serial(11, n, |r| normal(r, 0.5, 2.0)),
            );
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "normal, n {n}"
            );
            let (a, b) = (
                draw(12, n, UNIFORM_WORDS, |r| r.gen_range(-0.3..=0.3) as f32),
                serial(12, n, |r| r.gen_range(-0.3..=0.3) as f32),
            );
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "uniform, n {n}"
            );
            assert_eq!(a.len(), n);
        }
        // through the backend: a Kaiming-initialised weight past one chunk is the serial draw
        let init = SeededInit::new(VarMap::new(), 5);
        let shape = Shape::from((300, 3, 3, 3 * 8));
        let w = init.sample(&shape, "conv1.weight", candle_nn::init::DEFAULT_KAIMING_NORMAL);
        let name_hash = "conv1.weight".bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let std = candle_nn::init::NonLinearity::ReLU.gain() / ((3 * 3 * 3 * 8) as f64).sqrt();
        let reference = serial(
            crate::data::mix_seed(5, 0x696e_6974, name_hash),
            shape.elem_count(),
            |r| normal(r, 0.0, std),
        );
        assert!(w.len() > DRAW_CHUNK);
        assert!(w.iter().zip(&reference).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
