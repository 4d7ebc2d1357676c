//! VGG-style nets: `vgg16-blog` (the Keras blog's baseline, after Simonyan & Zisserman 2014,
//! "Very deep convolutional networks for large-scale image recognition") and `tiny`.
//!
//! `tiny` first average-pools inputs of 64 px or more by 2×2 (see [`VggSpec::stem_pool_from`]).
//! Blocks of 3×3 convolutions (padding 1, ReLU) each followed by a 2×2 max-pool, then dense
//! layers with ReLU and dropout, then 37 raw outputs (the output layer is applied by
//! [`super::Model`]). Convolutions and pooling come from [`crate::ops`].
//!
//! Checkpoint names: `block{b}_conv{i}.{weight,bias}` (1-based, as Keras names them),
//! `fc{j}.{weight,bias}`, `out.{weight,bias}`.

use super::{Dropper, LayerInfo};
use crate::config::{Arch, ModelConfig};
use crate::ops::{run_tower, Conv2d};
use candle_core::{Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use gz_schema::N_ANSWERS;

/// Channel layout of a VGG-style net.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VggSpec {
    /// Output channels of each conv layer, grouped by block (a max-pool ends every block).
    pub blocks: Vec<Vec<usize>>,
    /// Widths of the hidden dense layers.
    pub dense: Vec<usize>,
    /// `Some(n)`: inputs of side ≥ n are first 2×2 average-pooled (`tiny`: n = 64, so the
    /// 106-px cache is seen at 53 px and CPU training stays fast; candle's CPU convolution
    /// backward costs about ten times its forward).
    pub stem_pool_from: Option<usize>,
}

impl VggSpec {
    /// Whether an input of side `size` is average-pooled before the first block.
    pub fn stem_pool(&self, size: usize) -> bool {
        self.stem_pool_from.is_some_and(|n| size >= n)
    }
}

impl VggSpec {
    /// The spec of a VGG-style architecture (`vgg16-blog`, or `tiny` for anything else).
    pub fn for_arch(arch: Arch) -> Self {
        match arch {
            Arch::Vgg16Blog => VggSpec {
                blocks: vec![vec![64, 64], vec![128, 128], vec![256; 3], vec![512; 3], vec![512; 3]],
                dense: vec![4096, 4096],
                stem_pool_from: None,
            },
            Arch::Small => VggSpec {
                blocks: vec![vec![16], vec![32], vec![64], vec![64]],
                dense: vec![128],
                stem_pool_from: Some(64),
            },
            _ => VggSpec {
                blocks: vec![vec![8], vec![16], vec![32], vec![32]],
                dense: vec![64],
                stem_pool_from: Some(64),
            },
        }
    }
}

/// The layer plan (names, output shapes per image, parameter counts) of a VGG-style config.
pub fn plan(cfg: &ModelConfig) -> Vec<LayerInfo> {
    let spec = VggSpec::for_arch(cfg.arch);
    let mut out = Vec::new();
    let mut c = cfg.in_channels;
    let mut s = cfg.input_size;
    if spec.stem_pool(s) {
        s /= 2;
        out.push(LayerInfo::new(
            "stem_pool",
            "avg-pool 2×2 (input ≥ 64 px)",
            vec![c, s, s],
            0,
        ));
    }
    for (bi, block) in spec.blocks.iter().enumerate() {
        for (ci, &oc) in block.iter().enumerate() {
            out.push(LayerInfo::new(
                format!("block{}_conv{}", bi + 1, ci + 1),
                "conv 3×3 pad 1 + ReLU",
                vec![oc, s, s],
                c * oc * 9 + oc,
            ));
            c = oc;
        }
        s /= 2;
        out.push(LayerInfo::new(
            format!("block{}_pool", bi + 1),
            "max-pool 2×2",
            vec![c, s, s],
            0,
        ));
    }
    let mut n = c * s * s;
    out.push(LayerInfo::new("flatten", "flatten", vec![n], 0));
    for (j, &w) in spec.dense.iter().enumerate() {
        let extra = if cfg.dropout > 0.0 {
            format!(" + dropout {}", cfg.dropout)
        } else {
            String::new()
        };
        out.push(LayerInfo::new(
            format!("fc{}", j + 1),
            &format!("dense + ReLU{extra}"),
            vec![w],
            n * w + w,
        ));
        n = w;
    }
    out.push(LayerInfo::new(
        "out",
        "dense",
        vec![N_ANSWERS],
        n * N_ANSWERS + N_ANSWERS,
    ));
    out
}

/// A VGG-style net producing 37 raw outputs.
#[derive(Debug, Clone)]
pub struct VggNet {
    blocks: Vec<Vec<Conv2d>>,
    dense: Vec<Linear>,
    out: Linear,
    input_size: usize,
    in_channels: usize,
    stem_pool: bool,
}

impl VggNet {
    /// Builds the net; names as in the module doc.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let spec = VggSpec::for_arch(cfg.arch);
        let mut c = cfg.in_channels;
        let stem_pool = spec.stem_pool(cfg.input_size);
        let mut s = if stem_pool { cfg.input_size / 2 } else { cfg.input_size };
        let mut blocks = Vec::new();
        for (bi, block) in spec.blocks.iter().enumerate() {
            if block.is_empty() {
                // every block's pool runs with its last convolution (ops::run_tower)
                candle_core::bail!("vgg block {} has no convolution", bi + 1);
            }
            let mut convs = Vec::new();
            for (ci, &oc) in block.iter().enumerate() {
                convs.push(Conv2d::new(
                    c,
                    oc,
                    3,
                    1,
                    1,
                    vb.pp(format!("block{}_conv{}", bi + 1, ci + 1)),
                )?);
                c = oc;
            }
            blocks.push(convs);
            s /= 2;
        }
        let mut n = c * s * s;
        let mut dense = Vec::new();
        for (j, &w) in spec.dense.iter().enumerate() {
            dense.push(candle_nn::linear(n, w, vb.pp(format!("fc{}", j + 1)))?);
            n = w;
        }
        let out = candle_nn::linear(n, N_ANSWERS, vb.pp("out"))?;
        Ok(VggNet {
            blocks,
            dense,
            out,
            input_size: cfg.input_size,
            in_channels: cfg.in_channels,
            stem_pool,
        })
    }

    /// (B, C, H, W) → (B, 37) raw outputs.
    pub(crate) fn forward_raw(&self, x: &Tensor, drop: &Dropper) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != self.in_channels || h != self.input_size || w != self.input_size {
            candle_core::bail!(
                "this net was built for {}×{}×{} inputs, got {c}×{h}×{w} (rebuild the model config with the cache's image size)",
                self.in_channels,
                self.input_size,
                self.input_size
            );
        }
        let x = if self.stem_pool { x.avg_pool2d(2)? } else { x.clone() };
        // every block ends in a 2×2 max-pool (fused with its last convolution on the fast path)
        let layers: Vec<(&Conv2d, bool)> = self
            .blocks
            .iter()
            .flat_map(|block| block.iter().enumerate().map(move |(i, c)| (c, i + 1 == block.len())))
            .collect();
        let mut x = run_tower(&x, &layers)?.flatten_from(1)?;
        let fused = crate::cudnn::active_for(x.device()) && crate::cudnn::fused_enabled();
        for d in &self.dense {
            x = drop.apply(&dense_relu(d, &x, fused)?)?;
        }
        crate::ops::linear(&self.out, &x)
    }
}

/// `relu(x·Wᵀ + b)` of a dense layer: with `fused`, the matmul then the convolutions' fused
/// bias + ReLU op on the (B, F) output viewed as a channels-last (B, 1, 1, F) map (the same
/// memory; its backward kernel reads consecutive features with consecutive threads) — one
/// kernel forward and two backward instead of candle's broadcast add, ReLU and their gradients
/// (the bias gradient a strided reduction); otherwise [`crate::ops::linear`] (candle's `Linear`,
/// or on the CPU while training gz's dense-layer op) and `relu`. The same values either way.
fn dense_relu(d: &Linear, x: &Tensor, fused: bool) -> Result<Tensor> {
    if let (true, Some(b)) = (fused, d.bias()) {
        let z = x.matmul(&d.weight().t()?)?;
        let (n, f) = z.dims2()?;
        return crate::cudnn::bias_relu_nhwc(&z.reshape((n, 1, 1, f))?, b)?.reshape((n, f));
    }
    crate::ops::linear(d, x)?.relu()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path's dense layer (matmul + fused bias + ReLU op) against candle's Linear +
    /// ReLU on the CPU: values and the gradients of x, W and b.
    #[test]
    fn fused_dense_relu_matches_linear() -> Result<()> {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (24, 40), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 24, &dev)?)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 40), &dev)?)?;
        let g = Tensor::randn(0f32, 1.0, (6, 24), &dev)?;
        let d = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let run = |fused: bool| -> Result<Vec<Vec<f32>>> {
            let y = dense_relu(&d, x.as_tensor(), fused)?;
            let grads = (&y * &g)?.sum_all()?.backward()?;
            let mut out = vec![y.flatten_all()?.to_vec1::<f32>()?];
            for v in [&x, &w, &b] {
                out.push(
                    grads
                        .get(v.as_tensor())
                        .expect("a gradient")
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
            Ok(out)
        };
        let (a, r) = (run(true)?, run(false)?);
        for (name, (u, v)) in ["y", "dx", "dw", "db"].iter().zip(a.iter().zip(&r)) {
            let worst = u.iter().zip(v).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{name}: fused and Linear differ by {worst}");
        }
        assert!(a[0].contains(&0.0), "some outputs are cut by the ReLU");
        Ok(())
    }
    use crate::config::OutputKind;

    #[test]
    fn tiny_pools_large_inputs_first() {
        let big = plan(&ModelConfig::new(Arch::Tiny, OutputKind::Sigmoid));
        assert_eq!(big[0].name, "stem_pool");
        assert_eq!(big[0].out_shape, vec![3, 53, 53]);
        let small = plan(&ModelConfig::new(Arch::Tiny, OutputKind::Sigmoid).with_input_size(32));
        assert_eq!(small[0].name, "block1_conv1");
        let vgg = plan(&ModelConfig::new(Arch::Vgg16Blog, OutputKind::Sigmoid));
        assert!(vgg.iter().all(|l| l.name != "stem_pool"));
    }

    /// `small` is `tiny` with every width doubled (the same layers, pools and stem), 98,181
    /// parameters at 32 px against `tiny`'s 25,941 (the figures docs/benchmarks.md quotes).
    #[test]
    fn small_is_tiny_twice_as_wide() {
        for size in [32, 106] {
            let at = |arch| plan(&ModelConfig::new(arch, OutputKind::Sigmoid).with_input_size(size));
            let (tiny, small) = (at(Arch::Tiny), at(Arch::Small));
            assert_eq!(tiny.len(), small.len());
            for (t, s) in tiny.iter().zip(&small) {
                assert_eq!(t.name, s.name);
                let wider = t.name.starts_with("block") || t.name == "flatten" || t.name == "fc1";
                let factor = if wider { 2 } else { 1 };
                assert_eq!(s.out_shape[0], t.out_shape[0] * factor, "{}", t.name);
                assert_eq!(s.out_shape[1..], t.out_shape[1..], "{}", t.name);
            }
            let total = |p: &[LayerInfo]| p.iter().map(|l| l.params).sum::<usize>();
            if size == 32 {
                assert_eq!((total(&tiny), total(&small)), (25_941, 98_181));
            }
        }
    }
}

/// `tiny` on CUDA stage by stage against the CPU in f32: every stage gets the CPU's output of
/// the stage before (cast to the GPU's dtype), so a wrong stage shows by itself instead of
/// through everything after it. The first device run saw `tiny`'s bf16 raw outputs off by more
/// than their scale while f32 matched and the VGG16/Dieleman layer shapes passed; this names
/// the stage. Skipped without a GPU.
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use super::*;
    use crate::config::{Arch, OutputKind};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// A stage: its name, what it computes, and whether the chain goes on from its output
    /// (a check-only stage, such as the convolution without its ReLU, does not).
    type Stage<'a> = (String, Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>, bool);

    fn stages(n: &VggNet) -> Vec<Stage<'_>> {
        let mut out: Vec<Stage<'_>> = Vec::new();
        if n.stem_pool {
            out.push(("stem avg-pool".into(), Box::new(|x: &Tensor| x.avg_pool2d(2)), true));
        }
        for (bi, block) in n.blocks.iter().enumerate() {
            for (ci, c) in block.iter().enumerate() {
                let name = format!("block{}_conv{}", bi + 1, ci + 1);
                out.push((
                    format!("{name} conv + bias"),
                    Box::new(move |x: &Tensor| candle_core::Module::forward(c, x)),
                    false,
                ));
                if ci + 1 == block.len() {
                    out.push((
                        format!("{name} conv + bias + ReLU + max-pool as the net runs it"),
                        Box::new(move |x: &Tensor| c.forward_relu_pool_in(x, false)),
                        true,
                    ));
                } else {
                    out.push((
                        format!("{name} conv + bias + ReLU as the net runs it"),
                        Box::new(move |x: &Tensor| c.forward_relu_in(x, false)),
                        true,
                    ));
                }
            }
        }
        out.push(("flatten".into(), Box::new(|x: &Tensor| x.flatten_from(1)), true));
        for (j, d) in n.dense.iter().enumerate() {
            out.push((
                format!("fc{} + ReLU", j + 1),
                Box::new(move |x: &Tensor| dense_relu(d, x, false)),
                true,
            ));
        }
        out.push(("out".into(), Box::new(|x: &Tensor| crate::ops::linear(&n.out, x)), true));
        out
    }

    /// Sets the fused epilogue back to its default when dropped, panic or not (CUDA tests share
    /// one process and run one at a time).
    struct RestoreFused;
    impl Drop for RestoreFused {
        fn drop(&mut self) {
            crate::cudnn::set_fused(true);
        }
    }

    #[test]
    fn cuda_tiny_stage_by_stage() {
        let Some(gpu) = crate::testutil::gpu() else { return };
        let _restore = RestoreFused;
        let cfg = ModelConfig::new(Arch::Tiny, OutputKind::Sigmoid);
        let varmap = VarMap::new();
        let cpu = VggNet::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        let ts = crate::testutil::varmap_tensors(&varmap);
        let n = 4 * 3 * 106 * 106;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as u64 * 2_654_435_761) % 1000) as f32 / 1000.0)
            .collect();
        let x0 = Tensor::from_vec(v, (4, 3, 106, 106), &Device::Cpu).unwrap();
        let mut bad = Vec::new();
        // unfused (the default before the 2026-11-30 device run, where `tiny` went wrong) and
        // fused, each in f32 and bf16
        for (fused, dtype, tol) in [
            (false, DType::F32, 1e-3f32),
            (false, DType::BF16, 3e-2),
            (true, DType::F32, 1e-3),
            (true, DType::BF16, 3e-2),
        ] {
            crate::cudnn::set_fused(fused);
            let g = VggNet::new(&cfg, VarBuilder::from_tensors(ts.clone(), dtype, &gpu)).unwrap();
            let (sc, sg) = (stages(&cpu), stages(&g));
            let mut x = x0.clone();
            for ((name, fc, advance), (_, fg, _)) in sc.iter().zip(sg.iter()) {
                let want = fc(&x).unwrap();
                let xin = x.to_device(&gpu).unwrap().to_dtype(dtype).unwrap();
                let got = fg(&xin).unwrap();
                let scale = crate::testutil::max_abs_diff(&want, &want.zeros_like().unwrap()).max(1e-6);
                let e = crate::testutil::max_abs_diff(&want, &got) / scale;
                eprintln!(
                    "fused {fused} {dtype:?} {name}: {:?} rel err {e:.2e} (scale {scale:.3})",
                    got.dims()
                );
                if e > tol {
                    bad.push(format!("fused {fused} {dtype:?} {name}: rel err {e}"));
                }
                if *advance {
                    x = want;
                }
            }
        }
        assert!(bad.is_empty(), "stages off: {bad:#?}");
    }
}
