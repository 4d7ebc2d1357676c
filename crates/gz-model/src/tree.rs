//! The decision-tree output layer (Dieleman, Willett & Dambre 2015, section 5.3), usable by any
//! model (`--output tree`).
//!
//! The 37 Kaggle outputs are not independent: the answers of Q1 and Q6 sum to 1 and the answers
//! of every other question sum to the value of the answer that leads to it
//! ([`gz_schema::QUESTIONS`]`[q].parent`). This layer maps 37 raw outputs to values that satisfy
//! every such equality by construction: per question, a ReLU on the raw outputs, division by
//! their sum, and multiplication by the parent answer's value (already computed, since questions
//! are processed in topological order of the tree). It has no parameters.
//!
//! Dieleman divides by `sum + eps`, which breaks the equalities when all of a question's raw
//! outputs are negative (the sum is 0, not 1). We add the small epsilon to every answer instead,
//! `(relu(x_i) + eps) / (Σ relu(x_j) + k·eps)`, which sums to exactly 1 for every input, falls
//! back to the uniform split when all outputs are dead, and otherwise differs from Dieleman's
//! form by O(eps). The layer is differentiable everywhere except at the ReLU kinks.
//!
//! Behind the ReLU an answer whose raw output is below zero for every galaxy gets no gradient
//! and never learns again; a fresh training run therefore starts the dense layer before this
//! one at weights 0 and bias 0.1 ([`crate::nets::init_tree_head`]): every answer alive, every
//! question at its uniform split.
//!
//! The layer runs as one candle custom op ([`TreeOutput::forward`]): a row's 37 values in one
//! pass forward and one backward (plain loops in f64 on the CPU; one thread per row in
//! `src/kernels/tree.cu` on CUDA, in the storage type), instead of about 80 candle ops forward
//! and twice that backward, each a kernel launch on a GPU. [`TreeOutput::forward_ops`] is the
//! same layer in candle's ops, the reference the tests compare with. On CUDA the op is one of
//! the fast path's own kernels and, like them, runs when [`crate::cudnn::fused_enabled`] (the
//! default since the 2026-11-30 device run; `GZ_FUSED=0` in `gz` takes the ops).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, D};
use gz_schema::{N_ANSWERS, N_QUESTIONS, QUESTIONS};

/// Default epsilon added to every ReLU'd answer.
pub const TREE_EPS: f64 = 1e-6;

/// The decision-tree output layer: (B, 37) raw outputs → (B, 37) normalised vote fractions.
#[derive(Debug, Clone)]
pub struct TreeOutput {
    eps: f64,
    order: Vec<usize>,
}

impl Default for TreeOutput {
    fn default() -> Self {
        Self::new()
    }
}

impl TreeOutput {
    /// The layer with [`TREE_EPS`].
    pub fn new() -> Self {
        Self::with_eps(TREE_EPS)
    }

    /// The layer with a custom per-answer epsilon (must be > 0 for the equalities to hold when
    /// a question's raw outputs are all negative).
    pub fn with_eps(eps: f64) -> Self {
        TreeOutput {
            eps,
            order: topological_order(),
        }
    }

    /// The order in which questions are computed (every parent before its children).
    pub fn order(&self) -> &[usize] {
        &self.order
    }
}

/// Questions ordered so that the question holding each question's parent answer comes first.
fn topological_order() -> Vec<usize> {
    let mut done = [false; N_QUESTIONS];
    let mut order = Vec::with_capacity(N_QUESTIONS);
    while order.len() < N_QUESTIONS {
        let before = order.len();
        for (qi, q) in QUESTIONS.iter().enumerate() {
            let ready = match q.parent {
                None => true,
                Some(p) => done[gz_schema::ANSWERS[p].question],
            };
            if !done[qi] && ready {
                done[qi] = true;
                order.push(qi);
            }
        }
        // gz-schema's own tests check the tree is a tree; a cycle is a bug in that table
        assert!(order.len() > before, "gz_schema::QUESTIONS has a cycle");
    }
    order
}

impl Module for TreeOutput {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x)?;
        let op_here = match x.device() {
            candle_core::Device::Cpu => true,
            d => cfg!(feature = "cudnn") && d.is_cuda() && crate::cudnn::fused_enabled(),
        };
        if op_here && matches!(x.dtype(), DType::F32 | DType::F64) {
            return x.contiguous()?.apply_op1(TreeOp(self.plan()));
        }
        self.forward_ops(x)
    }
}

fn check_input(x: &Tensor) -> Result<()> {
    let (_b, n) = x.dims2()?;
    if n != N_ANSWERS {
        candle_core::bail!(
            "tree output layer expects (batch, {N_ANSWERS}) raw outputs, got {:?}",
            x.dims()
        );
    }
    Ok(())
}

/// The tree in the order the op walks it: per question (topological order) its first answer,
/// its number of answers and its parent answer.
#[derive(Debug, Clone)]
struct Plan {
    eps: f64,
    questions: Vec<(usize, usize, Option<usize>)>,
}

impl TreeOutput {
    fn plan(&self) -> Plan {
        Plan {
            eps: self.eps,
            questions: self
                .order
                .iter()
                .map(|&qi| (QUESTIONS[qi].first, QUESTIONS[qi].len, QUESTIONS[qi].parent))
                .collect(),
        }
    }

    /// The layer built from candle's ops (narrow, ReLU, sums, divisions, products, cat): the
    /// reference for the custom op, and the path on CUDA builds without the fast path's kernels.
    pub fn forward_ops(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x)?;
        let mut per_q: Vec<Option<Tensor>> = vec![None; N_QUESTIONS];
        for &qi in &self.order {
            let q = &QUESTIONS[qi];
            let r = (x.narrow(1, q.first, q.len)?.relu()? + self.eps)?;
            let sum = r.sum_keepdim(D::Minus1)?;
            let mut v = r.broadcast_div(&sum)?;
            if let Some(p) = q.parent {
                let pq = &QUESTIONS[gz_schema::ANSWERS[p].question];
                // computed already: topological order
                let parent_vals = per_q[gz_schema::ANSWERS[p].question]
                    .as_ref()
                    .ok_or_else(|| candle_core::Error::Msg("tree order broken".into()))?;
                let pv = parent_vals.narrow(1, p - pq.first, 1)?;
                v = v.broadcast_mul(&pv)?;
            }
            per_q[qi] = Some(v);
        }
        let cols: Vec<Tensor> = per_q.into_iter().flatten().collect();
        Tensor::cat(&cols, 1)
    }
}

impl Plan {
    /// One row forward, in f64: `x` raw outputs → `y` vote fractions.
    fn forward_row(&self, x: &[f64], y: &mut [f64]) {
        for &(first, len, parent) in &self.questions {
            let xs = &x[first..first + len];
            let s: f64 = xs.iter().map(|&v| v.max(0.0) + self.eps).sum();
            let pv = parent.map_or(1.0, |p| y[p]);
            for (i, &v) in xs.iter().enumerate() {
                y[first + i] = (v.max(0.0) + self.eps) / s * pv;
            }
        }
    }

    /// One row backward, in f64: (x, y, dy) → dx (see `src/kernels/tree.cu` for the formulas);
    /// `g` is scratch space of the row's length.
    fn backward_row(&self, x: &[f64], y: &[f64], dy: &[f64], dx: &mut [f64], g: &mut [f64]) {
        g.copy_from_slice(dy);
        for &(first, len, parent) in self.questions.iter().rev() {
            let xs = &x[first..first + len];
            let s: f64 = xs.iter().map(|&v| v.max(0.0) + self.eps).sum();
            let pv = parent.map_or(1.0, |p| y[p]);
            let (mut back, mut dot) = (0.0, 0.0);
            for (i, &v) in xs.iter().enumerate() {
                let vi = (v.max(0.0) + self.eps) / s;
                back += g[first + i] * vi;
                dot += g[first + i] * pv * vi;
            }
            if let Some(p) = parent {
                g[p] += back;
            }
            for (i, &v) in xs.iter().enumerate() {
                // candle's ReLU subgradient (x >= 0), as the ops version
                dx[first + i] = if v >= 0.0 { (g[first + i] * pv - dot) / s } else { 0.0 };
            }
        }
    }
}

/// Rows of a CPU storage as f64 (f32 or f64 storage; the op's inputs are contiguous).
fn cpu_rows(s: &CpuStorage, l: &Layout) -> Result<Vec<f64>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        return crate::cudnn::cpu_tensor(s, l)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>();
    };
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].iter().map(|&x| f64::from(x)).collect(),
        CpuStorage::F64(v) => v[a..b].to_vec(),
        other => candle_core::bail!("gz-tree-output runs in f32 or f64, not {:?}", other.dtype()),
    })
}

/// f64 values back to a CPU storage of `dtype`, shape `shape`.
fn cpu_from_rows(v: Vec<f64>, shape: &Shape, dtype: DType) -> Result<(CpuStorage, Shape)> {
    let s = match dtype {
        DType::F32 => CpuStorage::F32(v.into_iter().map(|x| x as f32).collect()),
        DType::F64 => CpuStorage::F64(v),
        other => candle_core::bail!("gz-tree-output runs in f32 or f64, not {other:?}"),
    };
    Ok((s, shape.clone()))
}

/// Forward: x (B, 37) → y (B, 37).
struct TreeOp(Plan);

/// Backward: (x, y, dy) → dx.
struct TreeBwd(Plan);

impl CustomOp1 for TreeOp {
    fn name(&self) -> &'static str {
        "gz-tree-output"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_rows(s, l)?;
        let mut y = vec![0f64; x.len()];
        for (xr, yr) in x.chunks_exact(N_ANSWERS).zip(y.chunks_exact_mut(N_ANSWERS)) {
            self.0.forward_row(xr, yr);
        }
        cpu_from_rows(y, l.shape(), s.dtype())
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            Ok((cuda::forward(&self.0, s, l)?, l.shape().clone()))
        }
        #[cfg(not(feature = "cudnn"))]
        candle_core::bail!("gz-tree-output: this build has no CUDA kernels (build gz-model with the `cudnn` feature)")
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = x.apply_op3_no_bwd(&y.contiguous()?, &dy.contiguous()?, &TreeBwd(self.0.clone()))?;
        Ok(Some(dx))
    }
}

impl CustomOp3 for TreeBwd {
    fn name(&self) -> &'static str {
        "gz-tree-output-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, y, dy) = (cpu_rows(s1, l1)?, cpu_rows(s2, l2)?, cpu_rows(s3, l3)?);
        if x.len() != y.len() || x.len() != dy.len() {
            candle_core::bail!("gz-tree-output backward: x, y and dy differ in size");
        }
        let mut dx = vec![0f64; x.len()];
        let mut scratch = [0f64; N_ANSWERS];
        for (((xr, yr), gr), dr) in x
            .chunks_exact(N_ANSWERS)
            .zip(y.chunks_exact(N_ANSWERS))
            .zip(dy.chunks_exact(N_ANSWERS))
            .zip(dx.chunks_exact_mut(N_ANSWERS))
        {
            self.0.backward_row(xr, yr, gr, dr, &mut scratch);
        }
        cpu_from_rows(dx, l1.shape(), s1.dtype())
    }

    #[allow(unused_variables, reason = "the arguments are only used with the cudnn feature")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cudnn")]
        {
            Ok((
                cuda::backward(&self.0, (s1, l1), (s2, l2), (s3, l3))?,
                l1.shape().clone(),
            ))
        }
        #[cfg(not(feature = "cudnn"))]
        candle_core::bail!("gz-tree-output: this build has no CUDA kernels (build gz-model with the `cudnn` feature)")
    }
}

#[cfg(test)]
mod emu_tests;

/// What the launches of `src/kernels/tree.cu` pass besides the buffers, as pure functions shared
/// by the CUDA launcher and the emulator tests (`tree/emu_tests.rs`).
#[cfg_attr(
    not(any(feature = "cudnn", test)),
    allow(dead_code, reason = "used by the CUDA launcher and the emulator tests")
)]
pub(crate) mod launch {
    use candle_core::Result;

    use super::Plan;

    pub(crate) const MAX_Q: usize = 16;
    pub(crate) const MAX_A: usize = 64;

    /// `struct Tree` of tree.cu, passed by value.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Tree {
        pub(crate) questions: u32,
        pub(crate) answers: u32,
        pub(crate) first: [u32; MAX_Q],
        pub(crate) len: [u32; MAX_Q],
        pub(crate) parent: [i32; MAX_Q],
    }

    // The kernel reads the table with the C layout (tree.cu asserts the same size and offsets).
    const _: () = {
        use std::mem::{offset_of, size_of};
        assert!(size_of::<Tree>() == 200);
        assert!(offset_of!(Tree, first) == 8);
        assert!(offset_of!(Tree, len) == 72);
        assert!(offset_of!(Tree, parent) == 136);
    };

    /// The plan's questions as the kernel's table.
    pub(super) fn table(plan: &Plan) -> Result<Tree> {
        if plan.questions.len() > MAX_Q || gz_schema::N_ANSWERS > MAX_A {
            candle_core::bail!("gz-tree-output: the kernel holds at most {MAX_Q} questions and {MAX_A} answers");
        }
        let mut t = Tree {
            questions: plan.questions.len() as u32,
            answers: gz_schema::N_ANSWERS as u32,
            first: [0; MAX_Q],
            len: [0; MAX_Q],
            parent: [-1; MAX_Q],
        };
        for (k, &(first, len, parent)) in plan.questions.iter().enumerate() {
            t.first[k] = first as u32;
            t.len[k] = len as u32;
            t.parent[k] = parent.map_or(-1, |p| p as i32);
        }
        Ok(t)
    }

    /// (grid, block) of both kernels: one thread per row, 128 per block.
    pub(crate) fn grid(rows: u32) -> ((u32, u32, u32), (u32, u32, u32)) {
        ((rows.div_ceil(128).max(1), 1, 1), (128, 1, 1))
    }
}

#[cfg(feature = "cudnn")]
mod cuda {
    //! Launches of `src/kernels/tree.cu`: one thread per row.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda::CudaDType;
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, WithDType};
    use cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};

    use super::Plan;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/tree.ptx"));
    const MODULE: &str = "gz_tree";
    use super::launch::{self, Tree};

    // SAFETY: plain old data with the C layout of `struct Tree` in tree.cu (u32/i32 fields only).
    unsafe impl DeviceRepr for Tree {}

    fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("gz-tree-output: input is not contiguous");
        };
        let slice = s.as_cuda_slice::<T>()?;
        if b > slice.len() {
            candle_core::bail!("gz-tree-output: view {a}..{b} exceeds storage of {}", slice.len());
        }
        Ok(slice.slice(a..b))
    }

    /// The rows of a (rows, N_ANSWERS) layout, checked to fit the kernels' 32-bit index (the
    /// kernels read N_ANSWERS values per row, so a narrower input would be read past its end).
    fn rows(l: &Layout) -> Result<u32> {
        let (b, n) = l.shape().dims2()?;
        if n != gz_schema::N_ANSWERS {
            candle_core::bail!(
                "gz-tree-output: expects (rows, {}) inputs, got {:?}",
                gz_schema::N_ANSWERS,
                l.dims()
            );
        }
        u32::try_from(b).map_err(|_| candle_core::Error::Msg(format!("gz-tree-output: {b} rows exceed 32 bits")))
    }

    fn config(rows: u32) -> LaunchConfig {
        let (grid_dim, block_dim) = launch::grid(rows);
        LaunchConfig {
            grid_dim,
            block_dim,
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn forward(plan: &Plan, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let dev = s.device().clone();
        match s.dtype() {
            DType::F32 => fwd::<f32>(&dev, plan, s, l, plan.eps as f32),
            DType::F64 => fwd::<f64>(&dev, plan, s, l, plan.eps),
            other => candle_core::bail!("gz-tree-output runs in f32 or f64, not {other:?}"),
        }
    }

    fn fwd<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        plan: &Plan,
        s: &CudaStorage,
        l: &Layout,
        eps: T,
    ) -> Result<CudaStorage> {
        let n = rows(l)?;
        let t = launch::table(plan)?;
        let x = view::<T>(s, l)?;
        // SAFETY: the kernel writes every value of every row.
        let y = unsafe { dev.alloc::<T>(l.shape().elem_count()) }?;
        let sfx = if T::DTYPE == DType::F32 { "f32" } else { "f64" };
        let func = dev.get_or_load_custom_func(&format!("tree_fwd_{sfx}"), MODULE, PTX)?;
        let mut launch = func.builder();
        launch.arg(&x).arg(&y).arg(&n).arg(&t).arg(&eps);
        // SAFETY: argument types and count match `tree_fwd_*` in tree.cu; x and y hold
        // rows × N_ANSWERS values, the kernel touches row < rows only.
        unsafe { launch.launch(config(n)) }
            .map_err(|e| candle_core::Error::Cuda(format!("gz-tree-output forward launch: {e:?}").into()))?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }

    pub(super) fn backward(
        plan: &Plan,
        x: (&CudaStorage, &Layout),
        y: (&CudaStorage, &Layout),
        dy: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        if x.1.shape() != y.1.shape() || x.1.shape() != dy.1.shape() {
            candle_core::bail!("gz-tree-output backward: x, y and dy differ in shape");
        }
        let dev = x.0.device().clone();
        match x.0.dtype() {
            DType::F32 => bwd::<f32>(&dev, plan, x, y, dy, plan.eps as f32),
            DType::F64 => bwd::<f64>(&dev, plan, x, y, dy, plan.eps),
            other => candle_core::bail!("gz-tree-output runs in f32 or f64, not {other:?}"),
        }
    }

    fn bwd<T: CudaDType + DeviceRepr + WithDType>(
        dev: &CudaDevice,
        plan: &Plan,
        x: (&CudaStorage, &Layout),
        y: (&CudaStorage, &Layout),
        dy: (&CudaStorage, &Layout),
        eps: T,
    ) -> Result<CudaStorage> {
        let n = rows(x.1)?;
        let t = launch::table(plan)?;
        let (xv, yv, dyv) = (view::<T>(x.0, x.1)?, view::<T>(y.0, y.1)?, view::<T>(dy.0, dy.1)?);
        // SAFETY: the kernel writes every value of every row.
        let dx = unsafe { dev.alloc::<T>(x.1.shape().elem_count()) }?;
        let sfx = if T::DTYPE == DType::F32 { "f32" } else { "f64" };
        let func = dev.get_or_load_custom_func(&format!("tree_bwd_{sfx}"), MODULE, PTX)?;
        let mut launch = func.builder();
        launch.arg(&xv).arg(&yv).arg(&dyv).arg(&dx).arg(&n).arg(&t).arg(&eps);
        // SAFETY: argument types and count match `tree_bwd_*` in tree.cu; the four buffers hold
        // rows × N_ANSWERS values.
        unsafe { launch.launch(config(n)) }
            .map_err(|e| candle_core::Error::Cuda(format!("gz-tree-output backward launch: {e:?}").into()))?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    fn random_input(rng: &mut rand_chacha::ChaCha8Rng, b: usize, scale: f32) -> Vec<f32> {
        (0..b * N_ANSWERS)
            .map(|_| (rng.gen::<f32>() - 0.5) * 2.0 * scale)
            .collect()
    }

    #[test]
    fn order_is_topological() {
        let t = TreeOutput::new();
        let mut pos = [0usize; N_QUESTIONS];
        for (i, &q) in t.order().iter().enumerate() {
            pos[q] = i;
        }
        for (qi, q) in QUESTIONS.iter().enumerate() {
            if let Some(p) = q.parent {
                assert!(pos[gz_schema::ANSWERS[p].question] < pos[qi]);
            }
        }
    }

    #[test]
    fn satisfies_every_equality_on_random_inputs() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let tree = TreeOutput::new();
        for scale in [0.01f32, 1.0, 10.0, 1000.0] {
            let b = 64;
            let x = Tensor::from_vec(random_input(&mut rng, b, scale), (b, N_ANSWERS), &Device::Cpu).unwrap();
            let y = tree.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for row in &y {
                let v = gz_schema::check_row(row, 1e-5);
                assert!(v.is_empty(), "scale {scale}: {v:?}");
                assert!(row.iter().all(|&p| (0.0..=1.0 + 1e-6).contains(&p)));
            }
        }
        // all raw outputs negative: uniform split, still normalised
        let x = Tensor::full(-1f32, (2, N_ANSWERS), &Device::Cpu).unwrap();
        for row in tree.forward(&x).unwrap().to_vec2::<f32>().unwrap() {
            assert!(gz_schema::check_row(&row, 1e-5).is_empty());
            assert!((row[0] - 1.0 / 3.0).abs() < 1e-5);
        }
    }

    /// The custom op (`forward`) against the candle-ops layer (`forward_ops`) on `dev`: values
    /// and the gradient of a random weighting, f64 (tight) and f32, on inputs of every scale
    /// and rows whose questions are all dead (every raw output negative).
    fn op_matches_ops_on(dev: &Device) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
        let tree = TreeOutput::new();
        for (dtype, tol) in [(DType::F64, 1e-12f64), (DType::F32, 2e-5)] {
            for scale in [0.01f32, 1.0, 100.0] {
                let b = 33;
                let mut v = random_input(&mut rng, b, scale);
                for x in &mut v[..N_ANSWERS] {
                    *x = -x.abs() - 0.1;
                }
                let x = Tensor::from_vec(v, (b, N_ANSWERS), dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let w = Tensor::from_vec(random_input(&mut rng, b, 1.0), (b, N_ANSWERS), dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let run = |op: bool| {
                    let xv = Var::from_tensor(&x).unwrap();
                    let y = if op {
                        tree.forward(xv.as_tensor()).unwrap()
                    } else {
                        tree.forward_ops(xv.as_tensor()).unwrap()
                    };
                    let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                    let dx = g.get(xv.as_tensor()).unwrap().clone();
                    let flat = |t: &Tensor| {
                        t.to_dtype(DType::F64)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f64>()
                            .unwrap()
                    };
                    (flat(&y), flat(&dx))
                };
                let (y1, d1) = run(true);
                let (y0, d0) = run(false);
                let diff = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
                let dscale = d0.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
                assert!(
                    diff(&y1, &y0) < tol,
                    "{dtype:?} scale {scale}: values {}",
                    diff(&y1, &y0)
                );
                assert!(
                    diff(&d1, &d0) < tol * dscale.max(1.0),
                    "{dtype:?} scale {scale}: dx {} (scale {dscale})",
                    diff(&d1, &d0)
                );
            }
        }
    }

    #[test]
    fn op_matches_ops() {
        op_matches_ops_on(&Device::Cpu);
    }

    /// The same on the GPU with the op's kernel switched on (the fused epilogue's process-wide
    /// switch, on by default; CUDA tests hold the GPU exclusively). Skipped without a GPU.
    #[cfg(feature = "cudnn")]
    #[test]
    fn cuda_op_matches_ops() {
        let Some(gpu) = crate::testutil::gpu() else { return };
        crate::cudnn::set_fused(true);
        op_matches_ops_on(&gpu);
    }

    /// Forward + backward time of the layer at batch 256, f32, op vs candle's ops, on this
    /// machine's CPU (`cargo test -p gz-model --lib tree::tests::bench_head -- --ignored
    /// --nocapture`; numbers in docs/benchmarks.md).
    #[test]
    #[ignore = "benchmark: run by hand with --ignored --nocapture"]
    fn bench_head() {
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let tree = TreeOutput::new();
        let b = 256;
        let x = Var::from_vec(random_input(&mut rng, b, 1.0), (b, N_ANSWERS), &dev).unwrap();
        let w = Tensor::from_vec(random_input(&mut rng, b, 1.0), (b, N_ANSWERS), &dev).unwrap();
        // "none": the weighted-sum loss and its backward alone, the part common to both
        for how in ["none", "ops", "op", "none", "ops", "op"] {
            let reps = 300;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                let y = match how {
                    "op" => tree.forward(x.as_tensor()).unwrap(),
                    "ops" => tree.forward_ops(x.as_tensor()).unwrap(),
                    _ => x.as_tensor().clone(),
                };
                let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                assert!(g.get(x.as_tensor()).is_some());
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
            eprintln!("tree head, batch {b}, f32, forward + backward: {how:>4} {us:.0} µs");
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let b = 3;
        // keep inputs away from the ReLU kink so central differences are valid
        let x0: Vec<f64> = (0..b * N_ANSWERS)
            .map(|_| {
                let m = 0.1 + rng.gen::<f64>();
                if rng.gen::<bool>() {
                    m
                } else {
                    -m * 0.5
                }
            })
            .collect();
        let w: Vec<f64> = (0..b * N_ANSWERS).map(|_| rng.gen::<f64>() - 0.5).collect();
        let wt = Tensor::from_vec(w.clone(), (b, N_ANSWERS), &dev).unwrap();
        let tree = TreeOutput::new();
        let loss = |x: &Tensor| -> Result<Tensor> { (tree.forward(x)? * &wt)?.sum_all() };

        let xv = Var::from_vec(x0.clone(), (b, N_ANSWERS), &dev).unwrap();
        let grads = loss(xv.as_tensor()).unwrap().backward().unwrap();
        let g = grads
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();

        let h = 1e-6;
        let f = |x: Vec<f64>| -> f64 {
            let t = Tensor::from_vec(x, (b, N_ANSWERS), &dev).unwrap();
            loss(&t).unwrap().to_scalar::<f64>().unwrap()
        };
        let mut max_err = 0f64;
        for i in 0..x0.len() {
            let mut xp = x0.clone();
            xp[i] += h;
            let mut xm = x0.clone();
            xm[i] -= h;
            let num = (f(xp) - f(xm)) / (2.0 * h);
            max_err = max_err.max((num - g[i]).abs());
        }
        assert!(max_err < 1e-6, "max |analytic - numeric| = {max_err}");
        assert_eq!(xv.dtype(), DType::F64);
    }
}
