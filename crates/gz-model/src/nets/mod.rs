//! The networks: [`build`] turns a [`ModelConfig`] and a `VarBuilder` into a [`Model`].
//!
//! A [`Model`] is one of the bodies — [`vgg::VggNet`] (`vgg16-blog`, `tiny`) or
//! [`dieleman::DielemanNet`] (`dieleman`, `dieleman-tiny`) — producing 37 raw outputs, followed
//! by the output layer the config names (independent sigmoids, or [`crate::tree::TreeOutput`]).
//! It implements [`candle_core::ModuleT`]: input (B, 3, H, W) with values in [0, 1], any float
//! dtype (cast to the weights' dtype: f32 on CPU, f32 or bf16 on CUDA), output (B, 37);
//! dropout is active only when `train` is true. The output is always f32.
//!
//! Dropout masks on the CPU are drawn from the model's own seeded ChaCha RNG (candle's CPU RNG
//! cannot be seeded), so training is reproducible and resumable mid-stream: see
//! [`Model::set_dropout_seed`] and [`Model::dropout_state`]. On CUDA they come from the device's
//! curand generator, which [`Model::set_dropout_seed`] seeds (reproducible from each reseed;
//! [`Model::set_dropout_state`] can only reseed it, not restore a position in its stream).
//!
//! The `vb.pp(..)` names used here are the checkpoint format; each submodule documents its own.

pub mod dieleman;
pub mod vgg;

/// The candle types a caller needs to build and run a [`Model`], re-exported so front ends
/// and the integration tests need no candle dependency of their own.
pub use candle_core::{DType, Device, ModuleT, Tensor};
pub use candle_nn::{VarBuilder, VarMap};

use crate::config::{ModelConfig, OutputKind};
use crate::tree::TreeOutput;
use candle_core::{Module, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::sync::Mutex;

/// One row of [`describe`]: a layer, the shape of its output for one image, its parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerInfo {
    /// The layer's checkpoint prefix (or a descriptive name for parameter-free stages).
    pub name: String,
    /// What it does.
    pub kind: String,
    /// Output shape per image (without the batch dimension).
    pub out_shape: Vec<usize>,
    /// Number of trainable parameters.
    pub params: usize,
}

impl LayerInfo {
    pub(crate) fn new(name: impl Into<String>, kind: &str, out_shape: Vec<usize>, params: usize) -> Self {
        LayerInfo {
            name: name.into(),
            kind: kind.to_string(),
            out_shape,
            params,
        }
    }
}

/// The state of a model's dropout RNG (for checkpoints and `--resume`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropoutState {
    /// The seed the RNG was created from.
    pub seed: u64,
    /// Position in the ChaCha stream (32-bit words consumed).
    pub word_pos: u64,
}

/// Applies dropout (or not) inside a forward pass.
pub(crate) struct Dropper<'a> {
    p: f32,
    train: bool,
    rng: &'a Mutex<ChaCha8Rng>,
}

impl Dropper<'_> {
    /// Inverted dropout with a host-generated mask; identity when not training or `p == 0`.
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if !self.train || self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let scale = 1.0 / keep;
        if crate::cudnn::active_for(x.device()) && crate::cudnn::fused_enabled() {
            // the fast path: one kernel, the mask a hash of a seed from the host RNG (so it is
            // restored exactly on resume) and of the element index, nothing kept for backward
            let seed = {
                let mut rng = self
                    .rng
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("dropout RNG lock poisoned".into()))?;
                rng.gen::<u64>()
            };
            return crate::dropout::dropout(x, self.p, seed);
        }
        if x.device().is_cuda() {
            // on the GPU the mask comes from the device's curand generator, seeded by
            // `Model::set_dropout_seed`: no host work or transfer in the training step
            let r = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
            let mask = (r.lt(keep)?.to_dtype(x.dtype())? * scale as f64)?;
            return x.mul(&mask);
        }
        let n = x.elem_count();
        let mask: Vec<f32> = {
            let mut rng = self
                .rng
                .lock()
                .map_err(|_| candle_core::Error::Msg("dropout RNG lock poisoned".into()))?;
            (0..n)
                .map(|_| if rng.gen::<f32>() < keep { scale } else { 0.0 })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

#[derive(Debug, Clone)]
enum Body {
    Vgg(vgg::VggNet),
    Dieleman(dieleman::DielemanNet),
}

#[derive(Debug, Clone)]
enum Head {
    Sigmoid,
    Tree(TreeOutput),
}

/// A built network with its output layer (see the module doc).
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    body: Body,
    head: Head,
    layers: Vec<LayerInfo>,
    dtype: DType,
    device: Device,
    dropout_rng: Mutex<ChaCha8Rng>,
    dropout_seed: Mutex<u64>,
}

/// Builds the network a config names, creating or loading its variables through `vb`.
pub fn build(cfg: &ModelConfig, vb: VarBuilder) -> Result<Model> {
    Model::new(cfg, vb)
}

/// The layer plan of a config (names, output shapes, parameters) without building any weights.
pub fn plan(cfg: &ModelConfig) -> Vec<LayerInfo> {
    let mut layers = if cfg.arch.is_dieleman() {
        dieleman::plan(cfg)
    } else {
        vgg::plan(cfg)
    };
    let out = match cfg.output {
        OutputKind::Sigmoid => LayerInfo::new("output", "sigmoid", vec![gz_schema::N_ANSWERS], 0),
        OutputKind::Tree => LayerInfo::new(
            "output",
            "decision tree (ReLU, normalise, × parent)",
            vec![gz_schema::N_ANSWERS],
            0,
        ),
    };
    layers.push(out);
    layers
}

/// Number of trainable parameters of a model.
pub fn param_count(model: &Model) -> usize {
    model.param_count()
}

/// Number of trainable parameters a config would have, without building it.
pub fn param_count_of(cfg: &ModelConfig) -> usize {
    plan(cfg).iter().map(|l| l.params).sum()
}

/// A text table of a model's layers, output shapes and parameter counts.
pub fn describe(model: &Model) -> String {
    describe_config(&model.config)
}

/// [`describe`] for a config, without building any weights (`gz train --model NAME --describe`).
pub fn describe_config(cfg: &ModelConfig) -> String {
    let layers = plan(cfg);
    let [c, h, w] = cfg.input_shape();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {} (output: {}), input {c}×{h}×{w}, dropout {}",
        cfg.arch, cfg.output, cfg.dropout
    );
    if cfg.arch.is_dieleman() {
        let _ = writeln!(
            s,
            "views cover {:.4} of the input side (view_fraction)",
            cfg.view_fraction
        );
    }
    let name_w = layers.iter().map(|l| l.name.len()).max().unwrap_or(5).max(5);
    let shape_w = 16;
    let _ = writeln!(
        s,
        "{:<name_w$}  {:<shape_w$}  {:>12}  kind",
        "layer", "output", "params"
    );
    for l in &layers {
        let shape = l.out_shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("×");
        let _ = writeln!(
            s,
            "{:<name_w$}  {:<shape_w$}  {:>12}  {}",
            l.name,
            shape,
            group(l.params),
            l.kind
        );
    }
    let total: usize = layers.iter().map(|l| l.params).sum();
    let _ = writeln!(s, "total parameters: {} ({:.2} M)", group(total), total as f64 / 1e6);
    s
}

fn group(n: usize) -> String {
    let digits = n.to_string();
    let groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|c| std::str::from_utf8(c).unwrap_or("?"))
        .collect();
    groups.join(",")
}

/// The tree head's starting bias ([`init_tree_head`]).
pub const TREE_HEAD_BIAS: f32 = 0.1;

/// Sets a fresh training run's decision-tree head to weights 0 and bias [`TREE_HEAD_BIAS`]
/// (`out.weight`, `out.bias` of `varmap`; nothing for the sigmoid head): every answer's ReLU
/// starts active for every galaxy, each question at its uniform split, so every answer learns
/// from the first update on (that first step sends no gradient into the body, whose features
/// the zero weights do not read yet). With candle's default (weights and bias uniform in
/// ±1/√n) some answers started below zero for every galaxy; a ReLU that is zero for every input
/// gets no gradient and never recovers, so those answers (and, for a dead Class1.2, the whole
/// subtree under it) were predicted 0 for good (docs/benchmarks.md, "The tree head's dead
/// answers"). The trainer calls it; models built for tests and benchmarks keep candle's
/// initialisation (their comparisons of outputs and gradients need a head that reads the
/// body). Checkpoints are the same tensors either way.
pub fn init_tree_head(varmap: &candle_nn::VarMap, output: OutputKind) -> Result<()> {
    if output != OutputKind::Tree {
        return Ok(());
    }
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("the model's variables are poisoned".into()))?;
    for (name, value) in [("out.weight", 0.0f64), ("out.bias", f64::from(TREE_HEAD_BIAS))] {
        let var = data
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("the model has no `{name}` to initialise")))?;
        var.set(&(var.as_tensor().zeros_like()? + value)?)?;
    }
    Ok(())
}

impl Model {
    /// Builds the network a config names (see [`build`]).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let dtype = vb.dtype();
        let device = vb.device().clone();
        let body = if cfg.arch.is_dieleman() {
            Body::Dieleman(dieleman::DielemanNet::new(cfg, vb)?)
        } else {
            Body::Vgg(vgg::VggNet::new(cfg, vb)?)
        };
        let head = match cfg.output {
            OutputKind::Sigmoid => Head::Sigmoid,
            OutputKind::Tree => Head::Tree(TreeOutput::new()),
        };
        Ok(Model {
            config: cfg.clone(),
            body,
            head,
            layers: plan(cfg),
            dtype,
            device,
            dropout_rng: Mutex::new(ChaCha8Rng::seed_from_u64(0)),
            dropout_seed: Mutex::new(0),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The weights' dtype (inputs are cast to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The weights' device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The layer plan (see [`describe`]).
    pub fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    /// Number of trainable parameters.
    pub fn param_count(&self) -> usize {
        self.layers.iter().map(|l| l.params).sum()
    }

    /// Text table of layers (see [`describe`]).
    pub fn describe(&self) -> String {
        describe_config(&self.config)
    }

    /// Re-seeds the dropout RNG (the trainer derives the seed from its config); on CUDA this
    /// also seeds the device's random generator, which the masks are drawn from there.
    pub fn set_dropout_seed(&self, seed: u64) -> Result<()> {
        if self.device.is_cuda() {
            self.device.set_seed(seed)?;
        }
        if let (Ok(mut r), Ok(mut s)) = (self.dropout_rng.lock(), self.dropout_seed.lock()) {
            *r = ChaCha8Rng::seed_from_u64(seed);
            *s = seed;
        }
        Ok(())
    }

    /// The dropout RNG's state, to store in a checkpoint.
    pub fn dropout_state(&self) -> DropoutState {
        let seed = self.dropout_seed.lock().map(|s| *s).unwrap_or(0);
        let word_pos = self.dropout_rng.lock().map(|r| r.get_word_pos()).unwrap_or(0);
        DropoutState {
            seed,
            word_pos: u64::try_from(word_pos).unwrap_or(u64::MAX),
        }
    }

    /// Restores a state from [`Model::dropout_state`] (for `--resume`). On CUDA the device
    /// generator is reseeded with `state.seed` (its stream position cannot be restored).
    pub fn set_dropout_state(&self, state: DropoutState) -> Result<()> {
        if self.device.is_cuda() {
            self.device.set_seed(state.seed)?;
        }
        if let (Ok(mut r), Ok(mut s)) = (self.dropout_rng.lock(), self.dropout_seed.lock()) {
            let mut rng = ChaCha8Rng::seed_from_u64(state.seed);
            rng.set_word_pos(state.word_pos as u128);
            *r = rng;
            *s = state.seed;
        }
        Ok(())
    }

    /// The body's 37 raw outputs, before the output layer.
    pub fn forward_raw_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = x.to_dtype(self.dtype)?;
        let drop = Dropper {
            p: self.config.dropout,
            train,
            rng: &self.dropout_rng,
        };
        match &self.body {
            Body::Vgg(n) => n.forward_raw(&x, &drop),
            Body::Dieleman(n) => n.forward_raw(&x, &drop),
        }
    }

    /// Applies the output layer to raw outputs.
    pub fn head(&self, raw: &Tensor) -> Result<Tensor> {
        match &self.head {
            Head::Sigmoid => candle_nn::ops::sigmoid(raw),
            Head::Tree(t) => t.forward(raw),
        }
    }
}

impl ModuleT for Model {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // the output layer runs in f32 whatever the weights' dtype (bf16 cannot hold the
        // tree's normalisation to 1e-5), so callers always get f32 back
        let raw = self.forward_raw_t(x, train)?.to_dtype(DType::F32)?;
        self.head(&raw)
    }
}

/// CUDA instances of the numeric checks (`cargo test -p gz-model --features cuda --lib nets::`
/// on a machine with a GPU): the same weights give the same outputs on CPU and CUDA, in f32 and
/// (looser) bf16, dropout is seeded on the device, and the big nets run forward and backward.
/// Without a GPU each test says so and passes.
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use super::*;
    use crate::config::Arch;
    use std::collections::HashMap;

    /// The GPU, held exclusively for the test (`crate::testutil::gpu`).
    fn cuda() -> Option<crate::testutil::Gpu> {
        crate::testutil::gpu()
    }

    fn images(b: usize, size: usize, dev: &Device) -> Tensor {
        let n = b * 3 * size * size;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as u64 * 2_654_435_761) % 1000) as f32 / 1000.0)
            .collect();
        Tensor::from_vec(v, (b, 3, size, size), dev).unwrap()
    }

    use crate::testutil::max_abs_diff as max_diff;

    fn cpu_and_gpu(cfg: &ModelConfig, gpu: &Device, dtype: DType) -> (Model, Model) {
        let varmap = VarMap::new();
        let cpu = build(cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        let ts = crate::testutil::varmap_tensors(&varmap);
        let g = build(cfg, VarBuilder::from_tensors(ts, dtype, gpu)).unwrap();
        (cpu, g)
    }

    #[test]
    fn same_weights_same_outputs_on_cpu_and_cuda() {
        let Some(gpu) = cuda() else { return };
        for arch in [Arch::Tiny, Arch::DielemanTiny] {
            let cfg = ModelConfig::new(arch, OutputKind::Tree);
            let (cpu, g32) = cpu_and_gpu(&cfg, &gpu, DType::F32);
            let y = cpu.forward_t(&images(4, 106, &Device::Cpu), false).unwrap();
            let y32 = g32.forward_t(&images(4, 106, &gpu), false).unwrap();
            let d = max_diff(&y, &y32);
            // cuDNN may use TF32 for f32 convolutions (10-bit mantissa)
            assert!(d < 3e-3, "{arch} f32: {d}");
            // bf16 is compared on the raw outputs, relative to their scale: the tree layer
            // divides by sums of ReLU'd answers, so where a question's answers are all near 0
            // (common at initialisation) a bf16 rounding that flips a sign moves a vote fraction
            // by up to 1 without anything being wrong (on CPU, rounding only the weights to bf16
            // already moves `tiny`'s outputs by 0.008). The bf16 model is compared with its own
            // CPU twin: `cpu_and_gpu` draws new weights each call, and comparing with the f32
            // pair's CPU model is what failed this test on the H200 in three device runs.
            let (cpu16, g16) = cpu_and_gpu(&cfg, &gpu, DType::BF16);
            let x16 = images(4, 106, &gpu);
            let y = cpu16.forward_t(&images(4, 106, &Device::Cpu), false).unwrap();
            let raw = cpu16.forward_raw_t(&images(4, 106, &Device::Cpu), false).unwrap();
            let raw16 = g16.forward_raw_t(&x16, false).unwrap();
            let scale = max_diff(&raw, &raw.zeros_like().unwrap());
            let d = max_diff(&raw, &raw16);
            assert!(
                d < 0.05 * scale,
                "{arch} bf16 raw outputs: max |diff| {d}, scale {scale}"
            );
            let y16 = g16.forward_t(&x16, false).unwrap();
            assert_eq!(y16.dtype(), DType::F32);
            eprintln!(
                "{arch} bf16: raw max |diff| {d} (scale {scale}), vote fractions max |diff| {}",
                max_diff(&y, &y16)
            );
            for row in y16.to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap() {
                assert!(gz_schema::check_row(&row, 1e-5).is_empty());
            }
        }
    }

    /// The same comparison with the fast path's own kernels switched on (fused bias + ReLU,
    /// resampling / Dieleman parts, channels-last towers), f32. These switches are global:
    /// CUDA tests hold the GPU exclusively (`crate::testutil::gpu`), so they may flip them.
    #[test]
    fn same_outputs_with_the_new_kernels() {
        let Some(gpu) = cuda() else { return };
        // the defaults since the 2026-11-30 device run, set in case a test before changed them
        crate::cudnn::set_fused(true);
        crate::augment::set_resample_kernels(true);
        for nhwc in [false, true] {
            for arch in [Arch::Tiny, Arch::DielemanTiny] {
                let cfg = ModelConfig::new(arch, OutputKind::Tree);
                let (cpu, g32) = cpu_and_gpu(&cfg, &gpu, DType::F32);
                // the CPU reference NCHW, outside the override (which would put it channels-last
                // too, through the same tower code as the GPU)
                let y = crate::cudnn::with_nhwc(false, || cpu.forward_t(&images(4, 106, &Device::Cpu), false)).unwrap();
                let y32 = crate::cudnn::with_nhwc(nhwc, || g32.forward_t(&images(4, 106, &gpu), false)).unwrap();
                let d = max_diff(&y, &y32);
                assert!(d < 3e-3, "{arch} f32 with the new kernels (nhwc {nhwc}): {d}");
            }
        }
    }

    #[test]
    fn dropout_is_seeded_on_cuda() {
        let Some(gpu) = cuda() else { return };
        let cfg = ModelConfig::new(Arch::DielemanTiny, OutputKind::Tree).with_dropout(0.5);
        let (_, g) = cpu_and_gpu(&cfg, &gpu, DType::F32);
        let x = images(2, 64, &gpu);
        g.set_dropout_seed(5).unwrap();
        let a = g.forward_t(&x, true).unwrap();
        let b = g.forward_t(&x, true).unwrap();
        g.set_dropout_seed(5).unwrap();
        let c = g.forward_t(&x, true).unwrap();
        assert!(max_diff(&a, &b) > 0.0);
        assert_eq!(max_diff(&a, &c), 0.0);
    }

    #[test]
    fn full_nets_train_step_on_cuda() {
        let Some(gpu) = cuda() else { return };
        for (arch, dtype) in [(Arch::Vgg16Blog, DType::F32), (Arch::Dieleman, DType::BF16)] {
            let cfg = ModelConfig::new(arch, arch.default_output());
            // candle's CUDA initialisers have no bf16: initialise f32 variables, run a bf16 copy
            let varmap = VarMap::new();
            let f32_model = build(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &gpu)).unwrap();
            let ts: HashMap<String, Tensor> = varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            let model = if dtype == DType::F32 {
                f32_model
            } else {
                build(&cfg, VarBuilder::from_tensors(ts, dtype, &gpu)).unwrap()
            };
            assert_eq!(model.dtype(), dtype);
            let y = model.forward_t(&images(8, 106, &gpu), true).unwrap();
            assert_eq!(y.dims(), &[8, gz_schema::N_ANSWERS]);
            let loss = y.sqr().unwrap().mean_all().unwrap();
            let grads = loss.backward().unwrap();
            for v in varmap.all_vars() {
                let g = grads.get(v.as_tensor()).expect("gradient for every variable");
                let s = g
                    .to_dtype(DType::F32)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(s.is_finite(), "{arch}: non-finite gradient");
            }
        }
    }

    #[test]
    fn affine_sample_matches_cpu() {
        let Some(gpu) = cuda() else { return };
        let x = images(3, 50, &Device::Cpu);
        let mats = [
            crate::augment::Affine::rotation(33.0),
            crate::augment::Affine::rotation_flip_scale_shift(200.0, true, 1.2, 0.05, -0.1),
            crate::augment::Affine::scale(0.8),
        ];
        let a = crate::augment::affine_sample(&x, &mats, 40, 45).unwrap();
        let b = crate::augment::affine_sample(&x.to_device(&gpu).unwrap(), &mats, 40, 45).unwrap();
        assert!(b.device().is_cuda());
        assert!(max_diff(&a, &b) < 1e-4);
    }
}

/// Layout checks on CPU: the channels-last towers ([`crate::cudnn::with_nhwc`], from the image
/// layer on too) give the same outputs and the same parameter gradients as NCHW, for both net
/// families (the checkpoint format does not depend on the layout).
#[cfg(test)]
mod layout_tests {
    use super::*;
    use crate::config::Arch;

    /// With `image_nhwc`, the image layer runs channels-last too ([`crate::cudnn::set_nhwc_image`]),
    /// zero-padded to 8 channels with `padded` ([`crate::cudnn::set_nhwc_image_padded`]).
    fn outputs_and_grads(
        arch: Arch,
        nhwc: bool,
        (image_nhwc, padded): (bool, bool),
    ) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
        let run = || {
            let dev = Device::Cpu;
            let cfg = ModelConfig::new(arch, OutputKind::Tree);
            let (model, varmap) = crate::checkpoint::build_seeded(&cfg, 3, DType::F32, &dev).expect("model");
            // Non-zero biases: with the initial zeros, zero-padded image regions give
            // pre-activations of exactly 0, where candle's ReLU (NCHW on CPU) passes the
            // gradient and the fused one (the NHWC ops) does not, a convention, not a bug.
            for (name, var) in varmap.data().lock().expect("varmap").iter() {
                if name.ends_with("bias") {
                    let b = (var.as_tensor().ones_like().expect("ones") * 0.013).expect("bias");
                    var.set(&b).expect("set bias");
                }
            }
            let size = cfg.input_size;
            let n = 2 * 3 * size * size;
            let v: Vec<f32> = (0..n)
                .map(|i| ((i as u64 * 2_654_435_761) % 1000) as f32 / 1000.0)
                .collect();
            let x = Tensor::from_vec(v, (2, 3, size, size), &dev).expect("input");
            let y = model.forward_t(&x, false).expect("forward");
            let grads = y
                .sqr()
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("backward");
            let mut gs: Vec<(String, Vec<f32>)> = varmap
                .data()
                .lock()
                .expect("varmap")
                .iter()
                .filter_map(|(name, var)| {
                    let g = grads.get(var.as_tensor())?;
                    Some((name.clone(), g.flatten_all().ok()?.to_vec1::<f32>().ok()?))
                })
                .collect();
            gs.sort_by(|a, b| a.0.cmp(&b.0));
            (y.flatten_all().expect("flat").to_vec1::<f32>().expect("values"), gs)
        };
        crate::cudnn::with_nhwc(nhwc, || {
            crate::cudnn::with_nhwc_image(image_nhwc, || crate::cudnn::with_nhwc_image_padded(padded, run))
        })
    }

    #[test]
    fn channels_last_towers_match_nchw() {
        for arch in [Arch::Tiny, Arch::DielemanTiny] {
            for image in [(false, false), (true, false), (true, true)] {
                check_layouts(arch, image);
            }
        }
    }

    /// `arch` channels-last (the image layer as `image` says) against NCHW.
    fn check_layouts(arch: Arch, image: (bool, bool)) {
        let (ya, ga) = outputs_and_grads(arch, false, (false, false));
        let (yb, gb) = outputs_and_grads(arch, true, image);
        let worst = ya.iter().zip(&yb).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-6, "{arch} {image:?}: outputs differ by {worst}");
        assert_eq!(ga.len(), gb.len(), "{arch}: the same parameters get gradients");
        assert!(!ga.is_empty());
        for ((na, a), (nb, b)) in ga.iter().zip(&gb) {
            assert_eq!(na, nb);
            assert_eq!(a.len(), b.len(), "{arch} {image:?} {na}: gradient sizes");
            let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(
                worst <= 1e-4 * scale,
                "{arch} {image:?} {na}: gradients differ by {worst} (scale {scale})"
            );
        }
    }
}

/// The decision-tree head's initialisation ([`init_tree_head`]).
#[cfg(test)]
mod tree_head_tests {
    use super::*;
    use crate::config::Arch;
    use candle_core::{DType, Device, Tensor};

    /// After [`init_tree_head`] every answer of the tree head starts alive, at its question's
    /// uniform split, for any galaxy and seed: raw outputs of 0.1, Q1's three answers at 1/3.
    /// With candle's default initialisation (what the model is built with) some answers of
    /// `tiny` start below zero for every galaxy of the batch (checked too: the reason for the
    /// call; `train::tests::the_trainer_starts_the_tree_head_alive` checks the trainer makes it).
    #[test]
    fn every_tree_answer_starts_alive() {
        for arch in [Arch::Tiny, Arch::DielemanTiny] {
            let cfg = ModelConfig::new(arch, OutputKind::Tree);
            let size = cfg.input_size;
            let v: Vec<f32> = (0..8 * 3 * size * size)
                .map(|i| ((i as u64 * 2_654_435_761) % 1000) as f32 / 1000.0)
                .collect();
            let x = Tensor::from_vec(v, (8, 3, size, size), &Device::Cpu).unwrap();
            let mut dead_before = 0;
            for seed in 0..3 {
                let (model, varmap) = crate::checkpoint::build_seeded(&cfg, seed, DType::F32, &Device::Cpu).unwrap();
                let raw = model.forward_raw_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
                dead_before += (0..gz_schema::N_ANSWERS)
                    .filter(|&a| raw.iter().all(|r| r[a] <= 0.0))
                    .count();
                init_tree_head(&varmap, cfg.output).unwrap();
                let raw = model.forward_raw_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
                for (g, row) in raw.iter().enumerate() {
                    for (a, &r) in row.iter().enumerate() {
                        assert!(
                            (r - TREE_HEAD_BIAS).abs() < 1e-6,
                            "{arch} seed {seed} galaxy {g}: answer {a} at {r}"
                        );
                    }
                }
                let y = model.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
                for row in &y {
                    for q1 in &row[..3] {
                        assert!((q1 - 1.0 / 3.0).abs() < 1e-5, "{arch} seed {seed}: Q1 {:?}", &row[..3]);
                    }
                }
            }
            if arch == Arch::Tiny {
                assert!(dead_before > 0, "candle's initialisation left no answer dead here");
            }
        }
        // the sigmoid head is left as built
        let cfg = ModelConfig::new(Arch::Tiny, OutputKind::Sigmoid);
        let (_, varmap) = crate::checkpoint::build_seeded(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let before = varmap.data().lock().unwrap()["out.bias"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        init_tree_head(&varmap, cfg.output).unwrap();
        let after = varmap.data().lock().unwrap()["out.bias"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(before, after);
    }
}
