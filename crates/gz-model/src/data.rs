//! Minibatches for the trainer: the validation hold-out, the per-epoch shuffle, and batch
//! assembly on the training device.
//!
//! The images come from an [`ImageSource`] — in production a memory-mapped
//! `gz_shards::Split` (f16, C×H×W rows, 37 f32 labels per row), in tests an in-memory
//! [`MemSource`]. Two ways to build a batch ([`Batcher`]):
//!
//! - **host** (the CPU path): gather the rows of a minibatch from the memory map, convert
//!   f16 → f32 and make a tensor, once per step;
//! - **resident** (the CUDA path, issue 6): upload the whole split once as one f16 tensor
//!   (the Kaggle training set at 3×106×106 is about 4.2 GB) plus the labels, and assemble every
//!   batch on the device with `index_select` + a cast, so the GPU never waits for the CPU.
//!   Augmentation ([`crate::augment`]) then runs on the batch where it lives.
//!
//! All randomness is seeded: the hold-out from `seed`, the order of epoch `e` from
//! `(seed, e)` with ChaCha8, so a resumed run replays exactly the batches the uninterrupted
//! run would have seen (no RNG state needs saving beyond the epoch number).

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use half::f16;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use gz_schema::N_ANSWERS;

/// Errors of the data layer.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("the image source has no labels (a test split?); training needs labelled images")]
    NoLabels,
    #[error("the image source holds {}; need at least 2 (one to train on, one to validate)", gz_schema::count(*.n, "image"))]
    TooFew { n: usize },
    #[error("validation fraction {0} is not in [0, 1)")]
    BadFraction(f64),
    #[error("image source is inconsistent: {0}")]
    Inconsistent(String),
    #[error("building a batch: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Read access to a split of preprocessed images (rows of C×H×W f16 in [0, 1]).
pub trait ImageSource: Sync {
    /// Number of images.
    fn len(&self) -> usize;
    /// True when there are no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// (C, H, W) of every image.
    fn shape(&self) -> [usize; 3];
    /// Rows `range`, contiguous.
    fn images(&self, range: Range<usize>) -> &[f16];
    /// All labels, n×37 row-major, if the split is labelled.
    fn labels(&self) -> Option<&[f32]>;
    /// Image `i`.
    fn image(&self, i: usize) -> &[f16] {
        self.images(i..i + 1)
    }
    /// Consecutive row ranges of at most `max` rows covering the source, each valid for
    /// [`ImageSource::images`] (shards are contiguous only within themselves).
    fn chunks(&self, max: usize) -> Vec<Range<usize>> {
        let max = max.max(1);
        (0..self.len())
            .step_by(max)
            .map(|s| s..(s + max).min(self.len()))
            .collect()
    }
}

impl ImageSource for gz_shards::Split {
    fn len(&self) -> usize {
        gz_shards::Split::len(self)
    }
    fn shape(&self) -> [usize; 3] {
        gz_shards::Split::shape(self)
    }
    fn images(&self, range: Range<usize>) -> &[f16] {
        gz_shards::Split::images(self, range)
    }
    fn labels(&self) -> Option<&[f32]> {
        gz_shards::Split::labels(self)
    }
    fn image(&self, i: usize) -> &[f16] {
        gz_shards::Split::image(self, i)
    }
    fn chunks(&self, max: usize) -> Vec<Range<usize>> {
        gz_shards::Split::chunks(self, max).collect()
    }
}

/// An in-memory image source (tests, benchmarks).
#[derive(Debug, Clone)]
pub struct MemSource {
    pub shape: [usize; 3],
    pub images: Vec<f16>,
    pub labels: Option<Vec<f32>>,
}

impl MemSource {
    /// Checks the sizes and wraps the data.
    pub fn new(shape: [usize; 3], images: Vec<f16>, labels: Option<Vec<f32>>) -> Result<Self, DataError> {
        let per = shape.iter().product::<usize>();
        if per == 0 || images.len() % per != 0 {
            return Err(DataError::Inconsistent(format!(
                "{} values is not a whole number of {shape:?} images",
                images.len()
            )));
        }
        let n = images.len() / per;
        if let Some(l) = &labels {
            if l.len() != n * N_ANSWERS {
                return Err(DataError::Inconsistent(format!(
                    "{n} images but {} label values",
                    l.len()
                )));
            }
        }
        Ok(Self { shape, images, labels })
    }
}

impl ImageSource for MemSource {
    fn len(&self) -> usize {
        self.images.len() / self.shape.iter().product::<usize>()
    }
    fn shape(&self) -> [usize; 3] {
        self.shape
    }
    fn images(&self, range: Range<usize>) -> &[f16] {
        let per = self.shape.iter().product::<usize>();
        &self.images[range.start * per..range.end * per]
    }
    fn labels(&self) -> Option<&[f32]> {
        self.labels.as_deref()
    }
}

/// Domain-separation constants so the hold-out, shuffles and augmentation streams of one
/// seed are independent.
const HOLDOUT_STREAM: u64 = 0x686f_6c64_6f75_7421;
const SHUFFLE_STREAM: u64 = 0x7368_7566_666c_6521;
const AUGMENT_STREAM: u64 = 0x6175_676d_656e_7421;

/// SplitMix64 finaliser: mixes a seed with a stream and an index into a new seed.
pub fn mix_seed(seed: u64, stream: u64, index: u64) -> u64 {
    let mut z = seed ^ stream.rotate_left(17) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The training and validation rows of a split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holdout {
    /// Training rows, ascending.
    pub train: Vec<usize>,
    /// Validation rows, ascending.
    pub val: Vec<usize>,
}

/// Holds out `round(n_used · val_fraction)` images (at least 1 when the fraction is > 0) for
/// validation, chosen by `seed`. `max_images` first restricts the run to a seeded subset of that
/// many images (quick runs).
pub fn holdout(n: usize, val_fraction: f64, seed: u64, max_images: Option<usize>) -> Result<Holdout, DataError> {
    if !(0.0..1.0).contains(&val_fraction) || val_fraction.is_nan() {
        return Err(DataError::BadFraction(val_fraction));
    }
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(seed, HOLDOUT_STREAM, 0)));
    if let Some(m) = max_images {
        perm.truncate(m);
    }
    let used = perm.len();
    if used < 2 {
        return Err(DataError::TooFew { n: used });
    }
    let mut n_val = (used as f64 * val_fraction).round() as usize;
    if val_fraction > 0.0 {
        n_val = n_val.clamp(1, used - 1);
    }
    let mut val = perm[..n_val].to_vec();
    let mut train = perm[n_val..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    Ok(Holdout { train, val })
}

/// The order in which epoch `epoch` (0-based) visits the training rows.
pub fn epoch_order(train: &[usize], seed: u64, epoch: usize) -> Vec<usize> {
    let mut order = train.to_vec();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(
        seed,
        SHUFFLE_STREAM,
        epoch as u64,
    )));
    order
}

/// The augmentation RNG of epoch `epoch`.
pub fn augment_rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix_seed(seed, AUGMENT_STREAM, epoch as u64))
}

/// Per-answer mean of the labels of `rows` (the "predict the training mean" baseline).
pub fn label_mean(labels: &[f32], rows: &[usize]) -> Vec<f64> {
    let mut mean = vec![0f64; N_ANSWERS];
    for &r in rows {
        for (m, &v) in mean.iter_mut().zip(&labels[r * N_ANSWERS..(r + 1) * N_ANSWERS]) {
            *m += v as f64;
        }
    }
    let n = rows.len().max(1) as f64;
    mean.iter_mut().for_each(|m| *m /= n);
    mean
}

/// RMSE over `rows` of predicting `pred` (37 values) for every image.
pub fn constant_rmse(labels: &[f32], rows: &[usize], pred: &[f64]) -> f64 {
    let mut sse = 0f64;
    for &r in rows {
        for (p, &v) in pred.iter().zip(&labels[r * N_ANSWERS..(r + 1) * N_ANSWERS]) {
            sse += (p - v as f64).powi(2);
        }
    }
    (sse / (rows.len().max(1) * N_ANSWERS) as f64).sqrt()
}

/// Builds minibatches on a device, from the host memory map or from a device-resident copy.
pub enum Batcher<'a> {
    /// Gather rows from the source on the host per batch.
    Host {
        src: &'a dyn ImageSource,
        device: Device,
        dtype: DType,
    },
    /// The whole split lives on the device (f16 images, f32 labels).
    Resident {
        images: Tensor,
        labels: Option<Tensor>,
        dtype: DType,
    },
}

impl<'a> Batcher<'a> {
    /// Batches built on the host per step, delivered on `device` as `dtype`.
    pub fn host(src: &'a dyn ImageSource, device: &Device, dtype: DType) -> Self {
        Self::Host {
            src,
            device: device.clone(),
            dtype,
        }
    }

    /// Uploads the whole source to `device` once (f16) and serves batches from there.
    pub fn resident(src: &'a dyn ImageSource, device: &Device, dtype: DType) -> Result<Self, DataError> {
        let [c, h, w] = src.shape();
        let n = src.len();
        // Upload straight from the memory map in chunks of rows (no host copy of the split).
        let mut parts = Vec::new();
        for r in src.chunks(4096) {
            parts.push(Tensor::from_slice(src.images(r.clone()), (r.len(), c, h, w), device)?);
        }
        let images = if parts.len() == 1 {
            parts.pop().ok_or(DataError::TooFew { n })?
        } else {
            Tensor::cat(&parts, 0)?
        };
        drop(parts);
        let labels = match src.labels() {
            Some(l) => Some(Tensor::from_slice(l, (n, N_ANSWERS), device)?),
            None => None,
        };
        Ok(Self::Resident { images, labels, dtype })
    }

    /// Images of `rows` as a (B, C, H, W) tensor of the batcher's dtype on its device.
    pub fn images(&self, rows: &[usize]) -> Result<Tensor, DataError> {
        match self {
            Self::Host { src, device, dtype } => {
                let [c, h, w] = src.shape();
                let per = c * h * w;
                let mut buf = vec![0f32; rows.len() * per];
                for (k, &r) in rows.iter().enumerate() {
                    let img = src.image(r);
                    for (d, s) in buf[k * per..(k + 1) * per].iter_mut().zip(img) {
                        *d = s.to_f32();
                    }
                }
                Ok(Tensor::from_vec(buf, (rows.len(), c, h, w), device)?.to_dtype(*dtype)?)
            }
            Self::Resident { images, dtype, .. } => {
                let idx = index_tensor(rows, images.device())?;
                Ok(images.index_select(&idx, 0)?.to_dtype(*dtype)?)
            }
        }
    }

    /// Labels of `rows` as a (B, 37) f32 tensor.
    pub fn labels(&self, rows: &[usize]) -> Result<Tensor, DataError> {
        match self {
            Self::Host { src, device, .. } => {
                let labels = src.labels().ok_or(DataError::NoLabels)?;
                let mut buf = Vec::with_capacity(rows.len() * N_ANSWERS);
                for &r in rows {
                    buf.extend_from_slice(&labels[r * N_ANSWERS..(r + 1) * N_ANSWERS]);
                }
                Ok(Tensor::from_vec(buf, (rows.len(), N_ANSWERS), device)?)
            }
            Self::Resident { labels, .. } => {
                let labels = labels.as_ref().ok_or(DataError::NoLabels)?;
                Ok(labels.index_select(&index_tensor(rows, labels.device())?, 0)?)
            }
        }
    }

    /// The device batches are delivered on.
    pub fn device(&self) -> Device {
        match self {
            Self::Host { device, .. } => device.clone(),
            Self::Resident { images, .. } => images.device().clone(),
        }
    }

    /// Whether the split lives on the device.
    pub fn is_resident(&self) -> bool {
        matches!(self, Self::Resident { .. })
    }
}

fn index_tensor(rows: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    Tensor::from_vec(idx, rows.len(), device)
}

/// A small labelled toy set for tests and examples: one elliptical Gaussian "galaxy" per
/// `size`×`size` RGB image with random size, elongation, colour, brightness and orientation,
/// and 37 labels that are a fixed smooth function of everything but the orientation, shaped by
/// the decision tree of `gz_schema` (each question's answers sum to its parent answer), so a
/// net must read the image to beat the training mean. Deterministic in `seed`.
pub fn toy_source(n: usize, size: usize, seed: u64) -> MemSource {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, 0x0074_6f79, 0));
    // Fixed label map (independent of `seed`: the same "physics" for every set).
    let mut wrng = ChaCha8Rng::seed_from_u64(0x0067_6c61_7879);
    let weights: Vec<[f32; 5]> = (0..N_ANSWERS)
        .map(|_| std::array::from_fn(|_| wrng.gen_range(-9.0f32..9.0)))
        .collect();
    let per = 3 * size * size;
    let mut images = Vec::with_capacity(n * per);
    let mut labels = Vec::with_capacity(n * N_ANSWERS);
    for _ in 0..n {
        let radius: f32 = rng.gen_range(0.08..0.3);
        let ellip: f32 = rng.gen_range(0.0..0.75);
        let colour: f32 = rng.gen_range(0.0..1.0);
        let bright: f32 = rng.gen_range(0.35..1.0);
        let angle: f32 = rng.gen_range(0.0..std::f32::consts::PI);
        let feats = [radius / 0.3 - 0.5, ellip / 0.75 - 0.5, colour - 0.5, bright - 0.6, 1.0];
        let gains = [0.6 + 0.4 * colour, 0.8, 1.0 - 0.4 * colour];
        let (sn, cs) = angle.sin_cos();
        let a = radius * size as f32;
        let b = a * (1.0 - ellip);
        for (ch, g) in gains.iter().enumerate() {
            let _ = ch;
            for y in 0..size {
                for x in 0..size {
                    let dx = x as f32 + 0.5 - size as f32 / 2.0;
                    let dy = y as f32 + 0.5 - size as f32 / 2.0;
                    let u = dx * cs + dy * sn;
                    let v = -dx * sn + dy * cs;
                    let val =
                        bright * g * (-0.5 * ((u / a).powi(2) + (v / b).powi(2))).exp() + rng.gen_range(0.0..0.03);
                    images.push(f16::from_f32(val.clamp(0.0, 1.0)));
                }
            }
        }
        let mut row = [0f32; N_ANSWERS];
        for q in gz_schema::QUESTIONS.iter() {
            let total = match q.parent {
                Some(p) => row[p],
                None => 1.0,
            };
            let logits: Vec<f32> = (q.first..q.first + q.len)
                .map(|j| weights[j].iter().zip(&feats).map(|(w, f)| w * f).sum::<f32>())
                .collect();
            let mx = logits.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = logits.iter().map(|l| (l - mx).exp()).collect();
            let z: f32 = e.iter().sum();
            for (k, v) in e.iter().enumerate() {
                row[q.first + k] = total * v / z;
            }
        }
        labels.extend_from_slice(&row);
    }
    MemSource {
        shape: [3, size, size],
        images,
        labels: Some(labels),
    }
}

/// Test helper: a batch tensor's values on the host, flattened (panics on error: tests only).
#[cfg(test)]
pub(crate) fn host_values(t: Result<Tensor, DataError>) -> Vec<f32> {
    let t = t.expect("batch");
    t.to_device(&Device::Cpu)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .expect("batch values")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(n: usize) -> MemSource {
        let shape = [3, 4, 5];
        let per = 60;
        let images = (0..n * per).map(|k| f16::from_f32((k % 97) as f32 / 97.0)).collect();
        let labels = (0..n * N_ANSWERS).map(|k| (k % 13) as f32 / 13.0).collect();
        MemSource::new(shape, images, Some(labels)).unwrap()
    }

    #[test]
    fn holdout_is_deterministic_disjoint_and_sized() {
        let a = holdout(100, 0.1, 7, None).unwrap();
        assert_eq!(a, holdout(100, 0.1, 7, None).unwrap());
        assert_ne!(a, holdout(100, 0.1, 8, None).unwrap());
        assert_eq!(a.val.len(), 10);
        assert_eq!(a.train.len(), 90);
        let mut all: Vec<usize> = a.train.iter().chain(&a.val).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        let small = holdout(100, 0.1, 7, Some(20)).unwrap();
        assert_eq!((small.train.len(), small.val.len()), (18, 2));
        assert!(holdout(1, 0.1, 7, None).is_err());
        assert!(holdout(10, 1.0, 7, None).is_err());
    }

    #[test]
    fn epoch_orders_are_seeded_permutations() {
        let train: Vec<usize> = (0..50).collect();
        let e0 = epoch_order(&train, 1, 0);
        assert_eq!(e0, epoch_order(&train, 1, 0));
        assert_ne!(e0, epoch_order(&train, 1, 1));
        let mut s = e0.clone();
        s.sort_unstable();
        assert_eq!(s, train);
    }

    #[test]
    fn host_and_resident_batches_agree() {
        let src = source(9);
        let dev = Device::Cpu;
        let host = Batcher::host(&src, &dev, DType::F32);
        let res = Batcher::resident(&src, &dev, DType::F32).unwrap();
        let rows = [7, 2, 2, 0];
        let a = host_values(host.images(&rows));
        let b = host_values(res.images(&rows));
        assert_eq!(a, b);
        assert_eq!(
            &a[..60],
            &src.image(7).iter().map(|v| v.to_f32()).collect::<Vec<_>>()[..]
        );
        let la = host_values(host.labels(&rows));
        let lb = host_values(res.labels(&rows));
        assert_eq!(la, lb);
        assert_eq!(&la[..N_ANSWERS], &src.labels().unwrap()[7 * N_ANSWERS..8 * N_ANSWERS]);
    }

    #[test]
    fn toy_labels_follow_the_tree() {
        let src = toy_source(5, 16, 3);
        assert_eq!(src.len(), 5);
        for r in 0..5 {
            let row = &src.labels().unwrap()[r * N_ANSWERS..(r + 1) * N_ANSWERS];
            assert!(gz_schema::check_row(row, 1e-5).is_empty(), "{row:?}");
        }
        assert_eq!(toy_source(5, 16, 3).images, src.images);
    }

    #[test]
    fn mean_baseline() {
        let labels: Vec<f32> = (0..2 * N_ANSWERS)
            .map(|k| if k < N_ANSWERS { 0.0 } else { 1.0 })
            .collect();
        let m = label_mean(&labels, &[0, 1]);
        assert!(m.iter().all(|&v| (v - 0.5).abs() < 1e-12));
        assert!((constant_rmse(&labels, &[0, 1], &m) - 0.5).abs() < 1e-12);
    }
}
