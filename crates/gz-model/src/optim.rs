//! Optimizers over candle [`Var`]s, with state that can be saved and restored for `--resume`.
//!
//! candle-nn ships `SGD` (no momentum) and `AdamW` (state private, so not resumable); the
//! trainer needs the blog's RMSprop (Keras defaults: lr 1e-3, rho 0.9, eps 1e-7), Dieleman's
//! SGD with Nesterov momentum and a step learning-rate schedule (lr 0.04, ×0.1 late in
//! training; Dieleman et al. 2015, section 7), and AdamW, all behind one [`Optimizer`] trait
//! whose [`Optimizer::state`] / [`Optimizer::load_state`] round-trip through safetensors.
//!
//! Mixed precision: when the model's variables are bf16, each parameter also has an f32
//! *master* copy. Gradients (bf16) are cast to f32, the update is applied to the master and the
//! model variable is set to the master cast to bf16. Checkpoints store the f32 masters
//! ([`Params::master_tensors`]), so a bf16 run resumes and loads exactly like an f32 run.
//!
//! Fused CUDA path: with the `cudnn` feature and every parameter on a CUDA device, the whole
//! update of up to 32 parameters (gradient cast, L2, state, master, rounded model copy) is one
//! kernel launch (`fused`, kernels in `src/kernels/optim.cu`) computing the same f32 operations
//! as the candle ops below; [`set_fused_enabled`] or [`UpdatePath::Generic`] force the generic path
//! for reference comparisons. On the CPU the same per-element arithmetic runs as one Rust pass
//! per parameter (`cpu`, on by default, [`set_cpu_fused_enabled`]), equal to the generic ops to
//! the bit.
//!
//! Neighbours: [`crate::train`] builds the optimizer from `TrainConfig` and calls
//! [`Optimizer::step`] once per minibatch and [`Schedule::lr_at`] once per epoch.

mod cpu;
#[cfg(test)]
mod emu_tests;
#[cfg(feature = "cudnn")]
mod fused;
#[cfg_attr(
    not(any(feature = "cudnn", test)),
    allow(dead_code, reason = "used by the CUDA launcher and the emulator tests")
)]
mod launch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Which optimizer to train with (CLI names `rmsprop`, `sgd-nesterov`, `adamw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// RMSprop as in Keras (the blog's choice).
    Rmsprop,
    /// SGD with Nesterov momentum 0.9 (Dieleman).
    SgdNesterov,
    /// Adam with decoupled weight decay.
    Adamw,
}

impl OptimizerKind {
    /// Parses `rmsprop`, `sgd-nesterov` (or `sgd`, `nesterov`), `adamw` (or `adam`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "rmsprop" => Some(Self::Rmsprop),
            "sgd-nesterov" | "sgd" | "nesterov" => Some(Self::SgdNesterov),
            "adamw" | "adam" => Some(Self::Adamw),
            _ => None,
        }
    }

    /// The CLI / config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rmsprop => "rmsprop",
            Self::SgdNesterov => "sgd-nesterov",
            Self::Adamw => "adamw",
        }
    }

    /// Default learning rate: Keras RMSprop 1e-3, Dieleman's SGD 0.04, AdamW 1e-3.
    pub fn default_lr(self) -> f64 {
        match self {
            Self::Rmsprop => 1e-3,
            Self::SgdNesterov => 0.04,
            Self::Adamw => 1e-3,
        }
    }

    /// Default learning rate for training `arch`: the optimizer's default, except for the deep
    /// nets without normalisation layers (`vgg16-blog`, `dieleman`) under RMSprop or AdamW,
    /// which start at 1e-4. Measured on the H200 (docs/benchmarks.md, "learning rate"): with
    /// RMSprop at 1e-3 `vgg16-blog` collapsed to a constant output (val RMSE 0.2416, worse than
    /// the training mean 0.1658) while 1e-4 reached 0.1152 in 3 epochs on 18,000 images.
    pub fn default_lr_for(self, arch: crate::config::Arch) -> f64 {
        use crate::config::Arch;
        match (self, arch) {
            (Self::Rmsprop | Self::Adamw, Arch::Vgg16Blog | Arch::Dieleman) => 1e-4,
            _ => self.default_lr(),
        }
    }
}

/// Hyper-parameters of the optimizers (those that are not the learning rate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimParams {
    /// RMSprop decay of the squared-gradient average (Keras `rho`).
    pub rho: f64,
    /// Momentum for SGD-Nesterov.
    pub momentum: f64,
    /// Adam betas.
    pub beta1: f64,
    pub beta2: f64,
    /// Epsilon added to the denominator (RMSprop, AdamW).
    pub eps: f64,
    /// Decoupled weight decay (AdamW) or L2 on the gradient (RMSprop, SGD); 0 = none.
    pub weight_decay: f64,
}

impl Default for OptimParams {
    fn default() -> Self {
        Self {
            rho: 0.9,
            momentum: 0.9,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-7,
            weight_decay: 0.0,
        }
    }
}

/// Learning-rate schedule, evaluated per epoch (0-based).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schedule {
    /// The same learning rate every epoch.
    Constant,
    /// Multiply by `gamma` at each listed epoch (0-based epoch at which the new rate starts).
    Step { milestones: Vec<usize>, gamma: f64 },
}

impl std::fmt::Display for Schedule {
    /// The `--schedule` spelling: `constant`, `step:E1,E2` (`×G` added when the factor is not 0.1).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Constant => f.write_str("constant"),
            Self::Step { milestones, gamma } => {
                let m: Vec<String> = milestones.iter().map(usize::to_string).collect();
                write!(f, "step:{}", m.join(","))?;
                if (*gamma - 0.1).abs() > 1e-12 {
                    write!(f, " ×{gamma}")?;
                }
                Ok(())
            }
        }
    }
}

impl Schedule {
    /// Dieleman's schedule scaled to a run of `epochs` epochs: ×0.1 after ~70% and ~90% of
    /// training (his 18M and 23M of 25.5M examples).
    pub fn dieleman(epochs: usize) -> Self {
        let a = ((epochs as f64) * 18.0 / 25.5).round() as usize;
        let b = ((epochs as f64) * 23.0 / 25.5).round() as usize;
        let mut milestones: Vec<usize> = [a, b].into_iter().filter(|&m| m > 0 && m < epochs).collect();
        milestones.dedup();
        Self::Step { milestones, gamma: 0.1 }
    }

    /// The learning rate for `epoch` (0-based) given the base rate.
    pub fn lr_at(&self, base: f64, epoch: usize) -> f64 {
        match self {
            Self::Constant => base,
            Self::Step { milestones, gamma } => {
                let n = milestones.iter().filter(|&&m| epoch >= m).count();
                base * gamma.powi(n as i32)
            }
        }
    }
}

/// One trainable parameter: its checkpoint name, the model variable, and (bf16 models) its
/// f32 master copy.
struct Param {
    name: String,
    var: Var,
    master: Option<Var>,
}

/// The parameters an optimizer updates, sorted by name (so state files are stable).
pub struct Params {
    params: Vec<Param>,
}

impl Params {
    /// Takes the variables of a model (name → var). Non-float variables are skipped; variables
    /// that are not f32 get an f32 master copy.
    pub fn new(vars: Vec<(String, Var)>) -> Result<Self> {
        let mut params = Vec::new();
        for (name, var) in vars {
            if !var.dtype().is_float() {
                continue;
            }
            let master = if var.dtype() == DType::F32 {
                None
            } else {
                Some(Var::from_tensor(&var.as_tensor().to_dtype(DType::F32)?)?)
            };
            params.push(Param { name, var, master });
        }
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { params })
    }

    /// Collects the variables of a `VarMap`.
    pub fn from_varmap(varmap: &candle_nn::VarMap) -> Result<Self> {
        let vars = {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>()
        };
        Self::new(vars)
    }

    /// Number of parameter tensors.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// True when there is nothing to train.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// The f32 value of every parameter (the master where there is one), by name: what a
    /// checkpoint stores.
    pub fn master_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            let t = match &p.master {
                Some(m) => m.as_tensor().clone(),
                None => p.var.as_tensor().clone(),
            };
            out.insert(p.name.clone(), t);
        }
        Ok(out)
    }

    /// Sets every parameter from f32 tensors by name (resume). Every parameter must be present
    /// with the right shape.
    pub fn load_masters(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for p in &self.params {
            let t = tensors
                .get(&p.name)
                .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint has no tensor `{}`", p.name)))?;
            if t.dims() != p.var.dims() {
                candle_core::bail!(
                    "tensor `{}` has shape {:?}, the model expects {:?}",
                    p.name,
                    t.dims(),
                    p.var.dims()
                );
            }
            let t = t.to_device(p.var.device())?.to_dtype(DType::F32)?;
            if let Some(m) = &p.master {
                m.set(&t)?;
            }
            p.var.set(&t.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// The f32 gradient of parameter `i`, if it got one (plus L2 weight decay if asked).
    fn grad(&self, i: usize, grads: &GradStore, l2: f64) -> Result<Option<Tensor>> {
        let p = &self.params[i];
        let Some(g) = grads.get(p.var.as_tensor()) else {
            return Ok(None);
        };
        let g = g.to_dtype(DType::F32)?;
        if l2 > 0.0 {
            Ok(Some((g + (self.value(i) * l2)?)?))
        } else {
            Ok(Some(g))
        }
    }

    /// The f32 value of parameter `i`.
    fn value(&self, i: usize) -> Tensor {
        let p = &self.params[i];
        p.master.as_ref().unwrap_or(&p.var).as_tensor().clone()
    }

    /// Writes the new f32 value of parameter `i` (to the master and the model variable).
    fn set(&self, i: usize, new: &Tensor) -> Result<()> {
        let p = &self.params[i];
        match &p.master {
            Some(m) => {
                m.set(new)?;
                p.var.set(&new.to_dtype(p.var.dtype())?)
            }
            None => p.var.set(new),
        }
    }

    fn zeros_like(&self, i: usize) -> Result<Var> {
        let p = &self.params[i];
        Var::zeros(p.var.shape(), DType::F32, p.var.device())
    }
}

/// Identifies the storage (allocation) behind a tensor: the address of the `Storage` inside its
/// lock, which views of one storage share (candle's own crate-private `storage_key` is the
/// lock's address). Takes the read lock for a moment: call it with no write lock held. The
/// fused updates use it to refuse, before locking anything, parameters whose gradient shares
/// storage with a tensor they write (parking_lot locks are not re-entrant: that would hang).
fn storage_id(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    std::ptr::from_ref::<candle_core::Storage>(&storage).addr()
}

/// The trainer's view of an optimizer.
pub trait Optimizer: Send {
    /// Applies one update from the gradients of a loss.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// The current learning rate.
    fn learning_rate(&self) -> f64;
    /// Sets the learning rate (the schedule does this each epoch).
    fn set_learning_rate(&mut self, lr: f64);
    /// Which optimizer this is.
    fn kind(&self) -> OptimizerKind;
    /// The parameters (for checkpoints).
    fn params(&self) -> &Params;
    /// Number of steps taken.
    fn steps(&self) -> u64;
    /// Internal state tensors (`<param>.<slot>`), for saving; f32.
    fn state(&self) -> HashMap<String, Tensor>;
    /// Restores state saved by [`Optimizer::state`] and the step count.
    fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: u64) -> Result<()>;
    /// True when [`Optimizer::step`] uses the fused update: the CUDA kernels (up to 32
    /// parameters per launch) or, on the CPU, their Rust twin.
    fn fused(&self) -> bool {
        false
    }
}

/// Which implementation of the update [`build_with`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdatePath {
    /// The fused CUDA kernels when this build has the `cudnn` feature, every parameter is on a
    /// CUDA device and [`fused_enabled`]; their CPU twin when every parameter is on the CPU and
    /// [`cpu_fused_enabled`] (the default); the generic candle ops otherwise.
    Auto,
    /// Always the generic candle ops (the reference).
    Generic,
    /// The fused update whatever [`fused_enabled`] / [`cpu_fused_enabled`] say (on CUDA still
    /// only with the `cudnn` feature; with parameters on both devices, the generic ops).
    Fused,
}

/// On by default since the 2026-11-30 device run: its tests passed on the H200 and the generic
/// update made VGG16-blog's bf16 step 1.17× slower (docs/benchmarks.md).
static FUSED_ENABLED: AtomicBool = AtomicBool::new(true);

/// Allows (the default) or forbids the fused CUDA update for optimizers built afterwards with
/// [`build`] / [`UpdatePath::Auto`]; `gz` reads `GZ_OPTIM=fused|generic`.
pub fn set_fused_enabled(on: bool) {
    FUSED_ENABLED.store(on, Ordering::Relaxed);
}

/// Whether [`set_fused_enabled`] allows the fused update.
pub fn fused_enabled() -> bool {
    FUSED_ENABLED.load(Ordering::Relaxed)
}

/// On by default: the CPU twin is checked against the generic update to the bit on every test
/// run (`optim::tests`).
static CPU_FUSED_ENABLED: AtomicBool = AtomicBool::new(true);

/// Allows (the default) or forbids the fused update's CPU twin for optimizers built afterwards
/// with [`build`] / [`UpdatePath::Auto`] on the CPU; `gz` turns it off with `GZ_OPTIM=generic`.
pub fn set_cpu_fused_enabled(on: bool) {
    CPU_FUSED_ENABLED.store(on, Ordering::Relaxed);
}

/// Whether [`set_cpu_fused_enabled`] allows the CPU twin.
pub fn cpu_fused_enabled() -> bool {
    CPU_FUSED_ENABLED.load(Ordering::Relaxed)
}

/// Tensors per launch of the fused update (1..=32; 32 by default: VGG16-blog's whole update is
/// one launch).
static TENSORS_PER_LAUNCH: AtomicUsize = AtomicUsize::new(launch::MAX_TENSORS);

/// Sets how many parameter tensors one launch of the fused update may cover (clamped to
/// 1..=32; 1 is one launch per tensor, for comparisons); `gz` reads `GZ_OPTIM_TENSORS`.
pub fn set_tensors_per_launch(n: usize) {
    TENSORS_PER_LAUNCH.store(n.clamp(1, launch::MAX_TENSORS), Ordering::Relaxed);
}

/// The current [`set_tensors_per_launch`] value.
pub fn tensors_per_launch() -> usize {
    TENSORS_PER_LAUNCH.load(Ordering::Relaxed)
}

/// True when this build has the fused CUDA update (the `cudnn` feature).
pub fn fused_compiled() -> bool {
    cfg!(feature = "cudnn")
}

/// Builds the optimizer of `kind` over `params` ([`UpdatePath::Auto`]).
pub fn build(kind: OptimizerKind, params: Params, lr: f64, hp: &OptimParams) -> Result<Box<dyn Optimizer>> {
    build_with(kind, params, lr, hp, UpdatePath::Auto)
}

/// Builds the optimizer of `kind` over `params`, choosing the update implementation with `path`.
pub fn build_with(
    kind: OptimizerKind,
    params: Params,
    lr: f64,
    hp: &OptimParams,
    path: UpdatePath,
) -> Result<Box<dyn Optimizer>> {
    let slots = match kind {
        OptimizerKind::Rmsprop | OptimizerKind::SgdNesterov => 1,
        OptimizerKind::Adamw => 2,
    };
    let mut state = Vec::with_capacity(params.len());
    for i in 0..params.len() {
        state.push((0..slots).map(|_| params.zeros_like(i)).collect::<Result<Vec<_>>>()?);
    }
    let wanted = match path {
        UpdatePath::Auto => fused_enabled(),
        UpdatePath::Generic => false,
        UpdatePath::Fused => true,
    };
    let fused =
        wanted && fused_compiled() && !params.is_empty() && params.params.iter().all(|p| p.var.device().is_cuda());
    let wanted_cpu = match path {
        UpdatePath::Auto => cpu_fused_enabled(),
        UpdatePath::Generic => false,
        UpdatePath::Fused => true,
    };
    let cpu_fused = wanted_cpu && !params.is_empty() && params.params.iter().all(|p| p.var.device().is_cpu());
    Ok(Box::new(Generic {
        kind,
        params,
        lr,
        hp: hp.clone(),
        state,
        steps: 0,
        fused,
        cpu_fused,
    }))
}

/// The three optimizers share their bookkeeping; only the update rule differs.
struct Generic {
    kind: OptimizerKind,
    params: Params,
    lr: f64,
    hp: OptimParams,
    /// Per parameter: RMSprop \[mean square\], SGD \[velocity\], AdamW \[m, v\].
    state: Vec<Vec<Var>>,
    steps: u64,
    /// Use the fused CUDA update (decided at build: feature on, every parameter on CUDA).
    fused: bool,
    /// Use the fused update's CPU twin (decided at build: every parameter on the CPU).
    cpu_fused: bool,
}

impl Generic {
    fn slot_names(&self) -> &'static [&'static str] {
        match self.kind {
            OptimizerKind::Rmsprop => &["ms"],
            OptimizerKind::SgdNesterov => &["velocity"],
            OptimizerKind::Adamw => &["m", "v"],
        }
    }
}

impl Generic {
    /// The fused CUDA update of every parameter that has a gradient: per parameter, `true`
    /// when done (or nothing to do), `false` when it is not eligible and the generic update
    /// must run.
    #[cfg(feature = "cudnn")]
    fn step_fused(&self, grads: &GradStore) -> Result<Vec<bool>> {
        let mut done = vec![false; self.params.len()];
        let mut items = Vec::with_capacity(self.params.len());
        let mut index = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.params.iter().enumerate() {
            match grads.get(p.var.as_tensor()) {
                None => done[i] = true,
                Some(g) => {
                    items.push(fused::Item {
                        grad: g,
                        state: &self.state[i],
                        master: p.master.as_ref(),
                        var: &p.var,
                    });
                    index.push(i);
                }
            }
        }
        let updated = fused::step_all(self.kind, &self.hp, self.lr, self.steps, &items, tensors_per_launch())?;
        for (i, u) in index.into_iter().zip(updated) {
            done[i] = u;
        }
        Ok(done)
    }

    #[cfg(not(feature = "cudnn"))]
    fn step_fused(&self, _grads: &GradStore) -> Result<Vec<bool>> {
        Ok(vec![false; self.params.len()])
    }

    /// The fused update's CPU twin, parameter by parameter: per parameter, `true` when done
    /// (or without a gradient), `false` when the generic update must run.
    fn step_cpu(&self, grads: &GradStore) -> Result<Vec<bool>> {
        let sc = launch::Scalars::new(self.kind, &self.hp, self.lr, self.steps);
        self.params
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| match grads.get(p.var.as_tensor()) {
                None => Ok(true),
                Some(g) => cpu::step(&sc, g, &self.state[i], p.master.as_ref(), &p.var),
            })
            .collect()
    }

    /// The update of parameter `i` with candle tensor ops (any device, the reference).
    fn step_generic(&self, i: usize, grads: &GradStore) -> Result<()> {
        let hp = &self.hp;
        let lr = self.lr;
        let l2 = if self.kind == OptimizerKind::Adamw {
            0.0
        } else {
            hp.weight_decay
        };
        let Some(g) = self.params.grad(i, grads, l2)? else {
            return Ok(());
        };
        let p = self.params.value(i);
        let st = &self.state[i];
        let new = match self.kind {
            OptimizerKind::Rmsprop => {
                // Keras: a = rho a + (1-rho) g²; p -= lr g / (sqrt(a) + eps)
                let a = ((st[0].as_tensor() * hp.rho)? + (g.sqr()? * (1.0 - hp.rho))?)?;
                st[0].set(&a)?;
                let denom = (a.sqrt()? + hp.eps)?;
                (p - ((g / denom)? * lr)?)?
            }
            OptimizerKind::SgdNesterov => {
                // Lasagne / Sutskever: v = mu v - lr g; p += mu v - lr g
                let v = ((st[0].as_tensor() * hp.momentum)? - (&g * lr)?)?;
                st[0].set(&v)?;
                ((p + (v * hp.momentum)?)? - (g * lr)?)?
            }
            OptimizerKind::Adamw => {
                let t = self.steps as i32;
                let m = ((st[0].as_tensor() * hp.beta1)? + (&g * (1.0 - hp.beta1))?)?;
                let v = ((st[1].as_tensor() * hp.beta2)? + (g.sqr()? * (1.0 - hp.beta2))?)?;
                st[0].set(&m)?;
                st[1].set(&v)?;
                let m_hat = (m / (1.0 - hp.beta1.powi(t)))?;
                let v_hat = (v / (1.0 - hp.beta2.powi(t)))?;
                let decayed = (p * (1.0 - lr * hp.weight_decay))?;
                (decayed - ((m_hat / (v_hat.sqrt()? + hp.eps)?)? * lr)?)?
            }
        };
        self.params.set(i, &new)?;
        Ok(())
    }
}

impl Optimizer for Generic {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let done = if self.fused {
            self.step_fused(grads)?
        } else if self.cpu_fused {
            self.step_cpu(grads)?
        } else {
            vec![false; self.params.len()]
        };
        for (i, done) in done.into_iter().enumerate() {
            if !done {
                self.step_generic(i, grads)?;
            }
        }
        Ok(())
    }

    fn fused(&self) -> bool {
        self.fused || self.cpu_fused
    }

    fn learning_rate(&self) -> f64 {
        self.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn kind(&self) -> OptimizerKind {
        self.kind
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn state(&self) -> HashMap<String, Tensor> {
        let names = self.slot_names();
        let mut out = HashMap::new();
        for (i, slots) in self.state.iter().enumerate() {
            for (s, var) in slots.iter().enumerate() {
                out.insert(
                    format!("{}.{}", self.params.params[i].name, names[s]),
                    var.as_tensor().clone(),
                );
            }
        }
        out
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        let names = self.slot_names();
        for (i, slots) in self.state.iter().enumerate() {
            for (s, var) in slots.iter().enumerate() {
                let key = format!("{}.{}", self.params.params[i].name, names[s]);
                let t = state
                    .get(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state has no tensor `{key}`")))?;
                if t.dims() != var.dims() {
                    candle_core::bail!(
                        "optimizer state `{key}` has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                var.set(&t.to_device(var.device())?.to_dtype(DType::F32)?)?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Minimises (p - 3)² from p = 0 and returns the final p.
    fn minimise(kind: OptimizerKind, lr: f64, steps: usize) -> f32 {
        let dev = Device::Cpu;
        let var = Var::zeros(1, DType::F32, &dev).unwrap();
        let params = Params::new(vec![("p".into(), var.clone())]).unwrap();
        let mut opt = build(kind, params, lr, &OptimParams::default()).unwrap();
        for _ in 0..steps {
            let loss = (var.as_tensor() - 3.0).unwrap().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads).unwrap();
        }
        var.as_tensor().to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn all_optimizers_minimise_a_quadratic() {
        assert!((minimise(OptimizerKind::SgdNesterov, 0.05, 200) - 3.0).abs() < 1e-3);
        assert!((minimise(OptimizerKind::Rmsprop, 0.05, 400) - 3.0).abs() < 0.1);
        assert!((minimise(OptimizerKind::Adamw, 0.1, 400) - 3.0).abs() < 0.1);
    }

    #[test]
    fn rmsprop_first_step_matches_keras_formula() {
        // a = 0.1 g²; p = -lr g / (sqrt(a) + eps) with g = -6 → p = lr * 6 / (sqrt(3.6) + 1e-7)
        let p = minimise(OptimizerKind::Rmsprop, 1e-3, 1);
        let want = 1e-3 * 6.0 / (3.6f64.sqrt() + 1e-7);
        assert!((p as f64 - want).abs() < 1e-7, "{p} vs {want}");
    }

    #[test]
    fn nesterov_first_two_steps() {
        // g0 = -6: v = 0.06·6... p1 = 0.9·v1 - lr g0 with lr = 0.01: v1 = 0.06, p1 = 0.054 + 0.06
        let p = minimise(OptimizerKind::SgdNesterov, 0.01, 1);
        assert!((p - 0.114).abs() < 1e-6, "{p}");
    }

    #[test]
    fn step_schedule() {
        let s = Schedule::Step {
            milestones: vec![2, 4],
            gamma: 0.1,
        };
        let lrs: Vec<f64> = (0..6).map(|e| s.lr_at(0.04, e)).collect();
        assert!((lrs[1] - 0.04).abs() < 1e-12 && (lrs[2] - 0.004).abs() < 1e-12 && (lrs[5] - 0.0004).abs() < 1e-12);
        assert_eq!(
            Schedule::dieleman(10),
            Schedule::Step {
                milestones: vec![7, 9],
                gamma: 0.1
            }
        );
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let dev = Device::Cpu;
        let run = |split: bool| -> Vec<f32> {
            let var = Var::new(&[0.5f32, -1.0], &dev).unwrap();
            let params = Params::new(vec![("w".into(), var.clone())]).unwrap();
            let mut opt = build(OptimizerKind::Adamw, params, 0.01, &OptimParams::default()).unwrap();
            let target = Tensor::new(&[2f32, 3.0], &dev).unwrap();
            for k in 0..6 {
                if split && k == 3 {
                    let state = opt.state();
                    let copied: HashMap<String, Tensor> =
                        state.into_iter().map(|(k, v)| (k, v.copy().unwrap())).collect();
                    let masters = opt.params().master_tensors().unwrap();
                    let steps = opt.steps();
                    let var2 = Var::zeros(2, DType::F32, &dev).unwrap();
                    let params2 = Params::new(vec![("w".into(), var2.clone())]).unwrap();
                    params2.load_masters(&masters).unwrap();
                    let mut opt2 = build(OptimizerKind::Adamw, params2, 0.01, &OptimParams::default()).unwrap();
                    opt2.load_state(&copied, steps).unwrap();
                    for _ in 3..6 {
                        let loss = (var2.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap();
                        opt2.step(&loss.backward().unwrap()).unwrap();
                    }
                    return var2.as_tensor().to_vec1().unwrap();
                }
                let loss = (var.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
            }
            var.as_tensor().to_vec1().unwrap()
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn bf16_params_keep_f32_masters() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1f32], &dev).unwrap().to_dtype(DType::BF16).unwrap()).unwrap();
        let params = Params::new(vec![("w".into(), var.clone())]).unwrap();
        let mut opt = build(
            OptimizerKind::SgdNesterov,
            params,
            1e-4,
            &OptimParams {
                momentum: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..10 {
            // d/dw of w = 1: update 1e-4 per step — below bf16 resolution near 1, kept by the master.
            let loss = var.as_tensor().to_dtype(DType::F32).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        let m = opt.params().master_tensors().unwrap()["w"].to_vec1::<f32>().unwrap()[0];
        assert!((m - (1.0 - 1e-3)).abs() < 1e-6, "{m}");
        assert_eq!(var.dtype(), DType::BF16);
    }
}
