//! A whole convolution tower (conv + bias + ReLU layers, some followed by a 2×2 max-pool) as
//! ONE node of candle's autograd graph, with its own backward pass.
//!
//! Why: candle-core 0.11.1's autograd starts every gradient it accumulates from a fresh
//! `zeros_like` and adds to it (`GradStore::or_insert`), so every activation-sized node of the
//! graph costs a memset and an add in the backward pass, and the graph keeps each node's inputs
//! alive. Here the forward pass runs the per-layer custom ops without graph nodes
//! (`apply_op*_no_bwd`) and keeps exactly what the backward pass needs (each layer's input and
//! ReLU output, or for a pooled channels-last layer with [`super::set_pool_mask`] one byte per
//! pooled value); one graph node links the tower's output to its inputs: the image, all weights
//! concatenated into one tensor, all biases into another (the concatenation copies the
//! weights, 32 MB for VGG16-blog in bf16, and candle's `cat` backward splits the gradient
//! again). The backward pass walks the layers in reverse with the same backward ops the
//! per-layer graph uses (fused ReLU / ReLU + pool backward, cuDNN backward-data and
//! backward-filter), and skips the backward-data of the first layer when the tower's input
//! needs no gradient (the image never does).
//!
//! The layout plan is [`crate::ops::Tower`]'s: channels-last from the first convolution whose
//! input has a multiple of 8 channels when `nhwc` (from the image layer with
//! [`super::set_nhwc_image`]), back to NCHW at the end. The result equals
//! the per-layer graph's (`ops::tests::tower_op_matches_layers` compares outputs and all
//! gradients).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use super::fused::{relu_grads, relu_pool_grads_from, ConvBiasRelu, ConvBiasReluPool, PoolSaved};
use super::{nchw_of, nhwc_of, ConvBwdData, ConvBwdFilter, ConvParams};

/// One layer of a tower: the model's weight (K, C, R, S) and bias (K), how it convolves, and
/// whether a 2×2 max-pool follows.
#[derive(Debug, Clone, Copy)]
pub struct TowerLayer<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub padding: usize,
    pub stride: usize,
    pub pool: bool,
}

/// What the backward pass needs of one layer.
struct Saved {
    p: ConvParams,
    /// The layer's input (in the layer's layout) and its ReLU output (before any pooling), or
    /// for a pooled layer with [`super::set_pool_mask`] its pooling mask.
    x: Tensor,
    y: PoolSaved,
    /// The weight in the layer's layout (KRSC when channels-last) and the bias.
    w: Tensor,
    b: Tensor,
    pool: bool,
    /// The tower switched to channels-last just before this layer.
    switched: bool,
    /// The layer's input channels in the model (the run may have padded them: `x` and `w`
    /// have more, and the gradients are cut back to these).
    in_c: usize,
    k_hw: (usize, usize),
    x_hw: (usize, usize),
    /// The image layer's unfolded image, when its forward product kept it for its filter
    /// gradient's product (`im2col::keeping_unfolded`).
    unfolded: Option<super::im2col::Unfolded>,
}

/// Runs `layers` on `x` (N, C, H, W) as one graph node (see the module docs); the result is
/// (N, K, H', W') in NCHW whatever the layout inside.
pub fn tower(x: &Tensor, layers: &[TowerLayer<'_>], nhwc: bool) -> Result<Tensor> {
    if layers.is_empty() {
        candle_core::bail!("tower: no layers");
    }
    // (inside `ops::no_grad` no backward pass follows, variables or not: validation kept
    // every batch's layers, and the image layer's unfolded image, until its last batch)
    let tracked =
        crate::ops::grad_enabled() && (x.track_op() || layers.iter().any(|l| l.weight.track_op() || l.bias.track_op()));
    let mut h = x.detach();
    let mut now = false;
    let mut saved = Vec::with_capacity(layers.len());
    for l in layers {
        forward_layer(l, nhwc, tracked, &mut h, &mut now, &mut saved)?;
    }
    let out = if now { nchw_of(&h)? } else { h.contiguous()? };
    if !tracked {
        // inference without variables: no graph, nothing to keep
        return Ok(out);
    }
    // one graph node: (image, all weights, all biases) → out
    let weights: Vec<Tensor> = layers.iter().map(|l| l.weight.flatten_all()).collect::<Result<_>>()?;
    let biases: Vec<Tensor> = layers.iter().map(|l| l.bias.flatten_all()).collect::<Result<_>>()?;
    let w_all = Tensor::cat(&weights, 0)?;
    let b_all = Tensor::cat(&biases, 0)?;
    x.apply_op3(
        &w_all,
        &b_all,
        TowerNode {
            out: Mutex::new(Some(out)),
            saved: Mutex::new(Some(saved)),
            shapes: layers
                .iter()
                .map(|l| (l.weight.shape().clone(), l.bias.shape().clone()))
                .collect(),
        },
    )
}

/// One layer of [`tower`]'s forward pass: `h` (the layer's input, NCHW until `now` says the
/// tower has switched to channels-last) becomes the layer's output, and what its backward pass
/// needs goes to `saved`; with a backward pass to come (`tracked`), an image layer run as a
/// matrix product keeps its unfolded image there too (`im2col::keeping_unfolded`).
fn forward_layer(
    l: &TowerLayer<'_>,
    nhwc: bool,
    tracked: bool,
    h: &mut Tensor,
    now: &mut bool,
    saved: &mut Vec<Saved>,
) -> Result<()> {
    let (_, c, _, _) = l.weight.dims4()?;
    let switched = nhwc && !*now && super::nhwc_starts_at(c);
    // channels as run: the image's zero-padded to a multiple of 8 on request
    let run_c = if switched {
        let (_, _, kh, kw) = l.weight.dims4()?;
        super::nhwc_padded_channels(c, (kh, kw))
    } else {
        c
    };
    let pad = |t: Tensor| {
        if run_c > c {
            t.pad_with_zeros(1, 0, run_c - c)
        } else {
            Ok(t)
        }
    };
    if switched {
        *h = nhwc_of(&pad(h.clone())?)?;
        *now = true;
    }
    let w = if *now {
        nhwc_of(&pad(l.weight.detach())?)?
    } else {
        l.weight.detach().contiguous()?
    };
    let b = l.bias.detach().contiguous()?;
    let p = super::check_conv(h, &w, &b, l.padding, l.stride, *now)?;
    let (_, _, xh, xw) = super::nchw_dims(h.shape(), *now)?;
    let (_, _, kh, kw) = l.weight.dims4()?;
    let x_in = h.contiguous()?;
    let apply = || -> Result<(PoolSaved, Tensor)> {
        Ok(if l.pool {
            let op = ConvBiasReluPool::new(p);
            let pooled = x_in.apply_op3_no_bwd(&w, &b, &op)?;
            (op.saved()?, pooled)
        } else {
            let y = x_in.apply_op3_no_bwd(&w, &b, &ConvBiasRelu(p))?;
            (PoolSaved::Relu(y.clone()), y)
        })
    };
    let ((y, out), unfolded) = if tracked {
        let (r, unfolded) = super::im2col::keeping_unfolded(apply);
        (r?, unfolded)
    } else {
        (apply()?, None)
    };
    saved.push(Saved {
        p,
        x: x_in,
        y,
        w,
        b,
        pool: l.pool,
        switched,
        in_c: c,
        k_hw: (kh, kw),
        x_hw: (xh, xw),
        unfolded,
    });
    *h = out;
    Ok(())
}

/// The graph node: forward hands out the output computed in [`tower`] (a copy of it: a custom
/// op must return a storage it owns), backward runs the layers in reverse.
struct TowerNode {
    /// Taken by the forward pass (so the graph does not keep a second copy).
    out: Mutex<Option<Tensor>>,
    saved: Mutex<Option<Vec<Saved>>>,
    /// Each layer's weight and bias shape (for the gradients' order and shapes).
    shapes: Vec<(Shape, Shape)>,
}

impl TowerNode {
    fn take_out(&self) -> Result<Tensor> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg("gz-conv-tower: output lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("gz-conv-tower: forward run twice".into()))
    }
}

impl CustomOp3 for TowerNode {
    fn name(&self) -> &'static str {
        "gz-conv-tower"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::cpu_storage(&self.take_out()?)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        // `out` is a fresh contiguous tensor (a custom op's output or a `contiguous` copy), so
        // its storage is exactly its elements
        let out = self.take_out()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) if layout.start_offset() == 0 && layout.is_contiguous() => {
                Ok((s.try_clone(layout)?, layout.shape().clone()))
            }
            _ => candle_core::bail!("gz-conv-tower: the tower output is not a contiguous CUDA tensor"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        _w_all: &Tensor,
        _b_all: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut guard = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("gz-conv-tower: saved activations lock poisoned".into()))?;
        let saved = guard
            .as_mut()
            .ok_or_else(|| candle_core::Error::Msg("gz-conv-tower: backward before forward".into()))?;
        let last_nhwc = saved.last().is_some_and(|s| s.p.nhwc);
        let mut g = if last_nhwc { nhwc_of(grad)? } else { grad.contiguous()? };
        let mut dws = vec![None; saved.len()];
        let mut dbs = vec![None; saved.len()];
        let need_dx = x.track_op();
        for (i, s) in saved.iter_mut().enumerate().rev() {
            let (dz, db) = match (&s.y, s.pool) {
                (kept, true) => relu_pool_grads_from(s.p.nhwc, &s.b, kept, &g)?,
                (PoolSaved::Relu(y), false) => relu_grads(s.p.nhwc, &s.b, y, &g)?,
                (PoolSaved::Mask { .. }, false) => {
                    candle_core::bail!("gz-conv-tower: a layer without pooling kept a pooling mask")
                }
            };
            // back to the model's channels where the run padded them
            let unpad = |t: Tensor| -> Result<Tensor> {
                if t.dim(1)? > s.in_c {
                    t.narrow(1, 0, s.in_c)?.contiguous()
                } else {
                    Ok(t)
                }
            };
            // the unfolded image the forward product kept, if any, is used once and goes
            let filter_grad = ConvBwdFilter { p: s.p, k_hw: s.k_hw };
            let dw = super::im2col::offering_unfolded(s.unfolded.take(), || s.x.apply_op2_no_bwd(&dz, &filter_grad))?;
            dws[i] = Some(if s.p.nhwc { unpad(nchw_of(&dw)?)? } else { dw });
            dbs[i] = Some(db);
            if i > 0 || need_dx {
                g = dz.apply_op2_no_bwd(&s.w, &ConvBwdData { p: s.p, x_hw: s.x_hw })?;
                if s.switched {
                    g = unpad(nchw_of(&g)?)?;
                }
            }
        }
        let flat = |v: Vec<Option<Tensor>>, which: usize| -> Result<Tensor> {
            let parts: Vec<Tensor> = v
                .into_iter()
                .zip(&self.shapes)
                .map(|(t, (ws, bs))| {
                    let t = t.ok_or_else(|| candle_core::Error::Msg("gz-conv-tower: missing gradient".into()))?;
                    let want = if which == 0 { ws } else { bs };
                    if t.shape() != want {
                        candle_core::bail!("gz-conv-tower: gradient {:?}, parameter {:?}", t.shape(), want);
                    }
                    t.flatten_all()
                })
                .collect::<Result<_>>()?;
            Tensor::cat(&parts, 0)
        };
        let dx = if need_dx { Some(g) } else { None };
        Ok((dx, Some(flat(dws, 0)?), Some(flat(dbs, 1)?)))
    }
}
