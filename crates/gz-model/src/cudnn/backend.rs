//! The cuDNN side of [`super`]: handles, plans (descriptors + timed algorithm choice), the shared
//! workspace, and the calls themselves, through cudarc's raw `cudnn::result` / `cudnn::sys`.
//!
//! One [`State`] per (thread, CUDA stream): cuDNN handles are not `Send`, and candle runs all
//! work of a device on one stream, so the handle is bound to that stream once. A plan is built the
//! first time a (call kind, shapes, dtype, math mode) is seen: descriptors are created, cuDNN's
//! heuristics say how much workspace the candidates want (capped), the shared workspace grows
//! to that, and `cudnnFind…AlgorithmEx` times the candidates on the real buffers; the fastest
//! successful one and the math type it reports are kept. Later calls only enqueue work.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use cudarc::cudnn::{result as cr, sys};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};

use super::{ConvParams, Profile};

/// Upper bound on the workspace one plan may ask for (the f32 VGG picks measured up to 1.6 GiB).
const WORKSPACE_CAP: usize = 4 << 30;

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Cuda(format!("cuDNN {what}: {e:?}").into())
}

fn check(what: &str, status: sys::cudnnStatus_t) -> Result<()> {
    status.result().map_err(|e| cuda_err(what, e))
}

// ---------------------------------------------------------------------------------------------
// Descriptors (RAII).

struct TensorDesc(sys::cudnnTensorDescriptor_t);

fn format(nhwc: bool) -> sys::cudnnTensorFormat_t {
    if nhwc {
        sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
    } else {
        sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
    }
}

impl TensorDesc {
    /// A packed 4-d tensor; `dims` are always (N, C, H, W), the memory order is NHWC when `nhwc`.
    fn new(dt: sys::cudnnDataType_t, [n, c, h, w]: [usize; 4], nhwc: bool) -> Result<Self> {
        let d = Self(cr::create_tensor_descriptor().map_err(|e| cuda_err("create tensor descriptor", e))?);
        // SAFETY: `d.0` was just created and is destroyed only by `Drop`.
        unsafe { cr::set_tensor4d_descriptor(d.0, format(nhwc), dt, [n as i32, c as i32, h as i32, w as i32]) }
            .map_err(|e| cuda_err("set tensor descriptor", e))?;
        Ok(d)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by `create_tensor_descriptor`, destroyed once.
        let _ = unsafe { cr::destroy_tensor_descriptor(self.0) };
    }
}

struct FilterDesc(sys::cudnnFilterDescriptor_t);

impl FilterDesc {
    /// `dims` are always (K, C, R, S); the memory order is KRSC when `nhwc`.
    fn new(dt: sys::cudnnDataType_t, [k, c, r, s]: [usize; 4], nhwc: bool) -> Result<Self> {
        let d = Self(cr::create_filter_descriptor().map_err(|e| cuda_err("create filter descriptor", e))?);
        // SAFETY: `d.0` was just created and is destroyed only by `Drop`.
        unsafe { cr::set_filter4d_descriptor(d.0, dt, format(nhwc), [k as i32, c as i32, r as i32, s as i32]) }
            .map_err(|e| cuda_err("set filter descriptor", e))?;
        Ok(d)
    }
}

impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created by `create_filter_descriptor`, destroyed once.
        let _ = unsafe { cr::destroy_filter_descriptor(self.0) };
    }
}

struct ConvDesc(sys::cudnnConvolutionDescriptor_t);

impl ConvDesc {
    fn new(p: ConvParams, compute: sys::cudnnDataType_t, math: sys::cudnnMathType_t) -> Result<Self> {
        let d = Self(cr::create_convolution_descriptor().map_err(|e| cuda_err("create convolution descriptor", e))?);
        let (pad, stride) = (p.padding as i32, p.stride as i32);
        // SAFETY: `d.0` was just created and is destroyed only by `Drop`.
        unsafe {
            cr::set_convolution2d_descriptor(
                d.0,
                pad,
                pad,
                stride,
                stride,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                compute,
            )
            .map_err(|e| cuda_err("set convolution descriptor", e))?;
        }
        d.set_math(math)?;
        Ok(d)
    }

    fn set_math(&self, math: sys::cudnnMathType_t) -> Result<()> {
        // SAFETY: `self.0` is a live convolution descriptor.
        unsafe { cr::set_convolution_math_type(self.0, math) }.map_err(|e| cuda_err("set math type", e))
    }
}

impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created by `create_convolution_descriptor`, destroyed once.
        let _ = unsafe { cr::destroy_convolution_descriptor(self.0) };
    }
}

struct PoolDesc(sys::cudnnPoolingDescriptor_t);

impl PoolDesc {
    fn max2() -> Result<Self> {
        let d = Self(cr::create_pooling_descriptor().map_err(|e| cuda_err("create pooling descriptor", e))?);
        // SAFETY: `d.0` was just created and is destroyed only by `Drop`.
        check("set pooling descriptor", unsafe {
            sys::cudnnSetPooling2dDescriptor(
                d.0,
                sys::cudnnPoolingMode_t::CUDNN_POOLING_MAX_DETERMINISTIC,
                sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                2,
                2,
                0,
                0,
                2,
                2,
            )
        })?;
        Ok(d)
    }
}

impl Drop for PoolDesc {
    fn drop(&mut self) {
        // SAFETY: created by `create_pooling_descriptor`, destroyed once.
        let _ = unsafe { sys::cudnnDestroyPoolingDescriptor(self.0) };
    }
}

// ---------------------------------------------------------------------------------------------
// Plans and per-thread state.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Fwd,
    BwdData,
    BwdFilter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConvKey {
    kind: Kind,
    dtype: DType,
    x: [usize; 4],
    w: [usize; 4],
    p: ConvParams,
    tf32: bool,
}

#[derive(Debug, Clone, Copy)]
enum Algo {
    Fwd(sys::cudnnConvolutionFwdAlgo_t),
    BwdData(sys::cudnnConvolutionBwdDataAlgo_t),
    BwdFilter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

struct ConvPlan {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
    algo: Algo,
    workspace: usize,
    report: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ProfKind {
    Fwd,
    BwdData,
    BwdFilter,
    Bias,
    Pool,
}

struct State {
    handle: sys::cudnnHandle_t,
    stream: Arc<CudaStream>,
    workspace: Option<CudaSlice<u8>>,
    conv_plans: HashMap<ConvKey, ConvPlan>,
    tensor_descs: HashMap<(DType, [usize; 4], bool), TensorDesc>,
    pool: Option<PoolDesc>,
    events: Vec<(ProfKind, CudaEvent, CudaEvent)>,
    support: HashMap<DType, Support>,
}

/// Which of the non-convolution cuDNN calls this cuDNN accepts for a dtype (probed once on tiny
/// buffers: legacy calls like `cudnnAddTensor` may not take every data type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Support {
    /// `cudnnAddTensor` (bias add) and `cudnnConvolutionBackwardBias`.
    pub bias: bool,
    /// `cudnnPoolingForward` and `cudnnPoolingBackward`.
    pub pool: bool,
}

impl Drop for State {
    fn drop(&mut self) {
        self.conv_plans.clear();
        self.tensor_descs.clear();
        self.pool = None;
        // SAFETY: the handle was created by `create_handle` and is destroyed once, after every
        // descriptor that was used with it.
        let _ = unsafe { cr::destroy_handle(self.handle) };
    }
}

thread_local! {
    static STATES: RefCell<HashMap<usize, State>> = RefCell::new(HashMap::new());
}

fn with_state<R>(dev: &CudaDevice, f: impl FnOnce(&mut State) -> Result<R>) -> Result<R> {
    let stream = dev.cuda_stream();
    let key = stream.cu_stream() as usize;
    STATES.with(|states| {
        let mut states = states.borrow_mut();
        let state = match states.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                stream
                    .context()
                    .bind_to_thread()
                    .map_err(|e| cuda_err("bind context", e))?;
                let handle = cr::create_handle().map_err(|e| cuda_err("create handle", e))?;
                // SAFETY: `handle` is live; the stream outlives it (the state holds an Arc to it).
                unsafe { cr::set_stream(handle, stream.cu_stream() as sys::cudaStream_t) }
                    .map_err(|e| cuda_err("set stream", e))?;
                e.insert(State {
                    handle,
                    stream: stream.clone(),
                    workspace: None,
                    conv_plans: HashMap::new(),
                    tensor_descs: HashMap::new(),
                    pool: None,
                    events: Vec::new(),
                    support: HashMap::new(),
                })
            }
        };
        f(state)
    })
}

/// Runs `f` (work enqueued on `dev`'s stream by other code, e.g. the fused bias + ReLU
/// kernels) bracketed by profiling events counted as bias time.
pub(super) fn time_bias<R>(dev: &CudaDevice, f: impl FnOnce() -> Result<R>) -> Result<R> {
    with_state(dev, |st| {
        let start = st.event()?;
        let r = f()?;
        st.push_event(ProfKind::Bias, start)?;
        Ok(r)
    })
}

/// Runs `f` (a convolution done outside cuDNN, `super::im2col`) bracketed by profiling events
/// counted as convolution forward (`fwd`) or backward-filter time.
pub(super) fn time_conv<R>(dev: &CudaDevice, fwd: bool, f: impl FnOnce() -> Result<R>) -> Result<R> {
    with_state(dev, |st| {
        let start = st.event()?;
        let r = f()?;
        st.push_event(if fwd { ProfKind::Fwd } else { ProfKind::BwdFilter }, start)?;
        Ok(r)
    })
}

fn data_type(dtype: DType) -> Result<(sys::cudnnDataType_t, sys::cudnnDataType_t)> {
    use sys::cudnnDataType_t as D;
    Ok(match dtype {
        DType::F32 => (D::CUDNN_DATA_FLOAT, D::CUDNN_DATA_FLOAT),
        DType::F64 => (D::CUDNN_DATA_DOUBLE, D::CUDNN_DATA_DOUBLE),
        DType::BF16 => (D::CUDNN_DATA_BFLOAT16, D::CUDNN_DATA_FLOAT),
        DType::F16 => (D::CUDNN_DATA_HALF, D::CUDNN_DATA_FLOAT),
        other => candle_core::bail!("cuDNN ops support f32, f64, bf16 and f16, not {other:?}"),
    })
}

/// The math type to search with: tensor ops for half types, TF32-or-not for f32.
fn search_math(dtype: DType, tf32: bool) -> sys::cudnnMathType_t {
    use sys::cudnnMathType_t as M;
    match dtype {
        DType::BF16 | DType::F16 => M::CUDNN_TENSOR_OP_MATH,
        DType::F32 if !tf32 => M::CUDNN_FMA_MATH,
        _ => M::CUDNN_DEFAULT_MATH,
    }
}

static ONE_F32: f32 = 1.0;
static ZERO_F32: f32 = 0.0;
static ONE_F64: f64 = 1.0;
static ZERO_F64: f64 = 0.0;

/// (alpha = 1, beta = 0) and (1, 1) scaling pointers: f64 for double data, f32 otherwise.
fn scalars(dtype: DType) -> (*const c_void, *const c_void) {
    if dtype == DType::F64 {
        ((&ONE_F64 as *const f64).cast(), (&ZERO_F64 as *const f64).cast())
    } else {
        ((&ONE_F32 as *const f32).cast(), (&ZERO_F32 as *const f32).cast())
    }
}

/// The four dims of an activation layout in (N, C, H, W) order, whatever its memory order:
/// an NHWC tensor's logical shape is (N, H, W, C).
fn dims4(l: &Layout, nhwc: bool) -> Result<[usize; 4]> {
    let (a, b, c, d) = l.shape().dims4()?;
    Ok(if nhwc { [a, d, b, c] } else { [a, b, c, d] })
}

/// The four dims of a filter layout in (K, C, R, S) order: an NHWC filter is (K, R, S, C).
fn filter_dims(l: &Layout, nhwc: bool) -> Result<[usize; 4]> {
    dims4(l, nhwc)
}

fn require_contiguous(what: &str, l: &Layout) -> Result<()> {
    if !l.is_contiguous() {
        candle_core::bail!("cuDNN {what}: input must be contiguous (got strides {:?})", l.stride());
    }
    Ok(())
}

impl State {
    /// A cached descriptor; `dims` in (N, C, H, W) order, memory NHWC when `nhwc`.
    fn tensor_desc(&mut self, dtype: DType, dims: [usize; 4], nhwc: bool) -> Result<sys::cudnnTensorDescriptor_t> {
        if let Some(d) = self.tensor_descs.get(&(dtype, dims, nhwc)) {
            return Ok(d.0);
        }
        let d = TensorDesc::new(data_type(dtype)?.0, dims, nhwc)?;
        let raw = d.0;
        self.tensor_descs.insert((dtype, dims, nhwc), d);
        Ok(raw)
    }

    /// Grows the shared workspace to at least `bytes`; returns (pointer, size) of the whole
    /// buffer. The pointer is valid until the next growth, which only happens while planning.
    fn workspace(&mut self, bytes: usize) -> Result<(*mut c_void, usize)> {
        let have = self.workspace.as_ref().map_or(0, |w| w.len());
        if have < bytes.max(1) {
            self.workspace = None;
            // SAFETY: cuDNN only uses the workspace as scratch; it is never read uninitialised.
            let ws = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| cuda_err("allocate workspace", e))?;
            self.workspace = Some(ws);
        }
        let stream = self.stream.clone();
        let ws = self
            .workspace
            .as_mut()
            .ok_or_else(|| cuda_err("workspace", "missing"))?;
        let len = ws.len();
        let (ptr, _sync) = ws.device_ptr_mut(&stream);
        Ok((ptr as *mut c_void, len))
    }

    fn workspace_limit(&self) -> usize {
        let free = self
            .stream
            .context()
            .mem_get_info()
            .map(|(free, _)| free)
            .unwrap_or(WORKSPACE_CAP);
        (free / 4).min(WORKSPACE_CAP)
    }

    fn event(&self) -> Result<Option<CudaEvent>> {
        if !super::profiling() {
            return Ok(None);
        }
        let ev = self
            .stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("record event", e))?;
        Ok(Some(ev))
    }

    fn push_event(&mut self, kind: ProfKind, start: Option<CudaEvent>) -> Result<()> {
        if let (Some(start), Some(end)) = (start, self.event()?) {
            self.events.push((kind, start, end));
        }
        Ok(())
    }

    /// Builds (first call for this key) the plan: descriptors, timed algorithm search on the
    /// given buffers, math type. `a`, `b` are the two inputs and `out` the output of the call.
    fn plan(&mut self, key: ConvKey, a: *const c_void, b: *const c_void, out: *mut c_void) -> Result<()> {
        if self.conv_plans.contains_key(&key) {
            return Ok(());
        }
        let (dt, compute) = data_type(key.dtype)?;
        let [n, _, h, w] = key.x;
        let [k, _, kh, kw] = key.w;
        let y_dims = [n, k, key.p.out_dim(h, kh), key.p.out_dim(w, kw)];
        let x = TensorDesc::new(dt, key.x, key.p.nhwc)?;
        let wd = FilterDesc::new(dt, key.w, key.p.nhwc)?;
        let y = TensorDesc::new(dt, y_dims, key.p.nhwc)?;
        let conv = ConvDesc::new(key.p, compute, search_math(key.dtype, key.tf32))?;
        let limit = self.workspace_limit();
        let handle = self.handle;
        // SAFETY (whole block): descriptors are live, the buffers have the sizes the descriptors
        // describe (checked by the callers), the workspace pointer/size come from `workspace`.
        let (algo, math, time, memory) = unsafe {
            match key.kind {
                Kind::Fwd => {
                    let mut max = 0;
                    check(
                        "fwd max count",
                        sys::cudnnGetConvolutionForwardAlgorithmMaxCount(handle, &mut max),
                    )?;
                    let mut perf = vec![std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); max.max(1) as usize];
                    let mut got = 0;
                    cr::get_convolution_forward_algorithm(
                        handle,
                        x.0,
                        wd.0,
                        conv.0,
                        y.0,
                        max,
                        &mut got,
                        perf.as_mut_ptr(),
                    )
                    .map_err(|e| cuda_err("fwd heuristics", e))?;
                    let need = perf[..got as usize]
                        .iter()
                        .filter(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                        .map(|p| p.memory)
                        .max()
                        .unwrap_or(0)
                        .min(limit);
                    let (ws, ws_len) = self.workspace(need)?;
                    check(
                        "fwd find",
                        sys::cudnnFindConvolutionForwardAlgorithmEx(
                            handle,
                            x.0,
                            a,
                            wd.0,
                            b,
                            conv.0,
                            y.0,
                            out,
                            max,
                            &mut got,
                            perf.as_mut_ptr(),
                            ws,
                            ws_len,
                        ),
                    )?;
                    let best = perf[..got as usize]
                        .iter()
                        .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= ws_len)
                        .ok_or_else(|| cuda_err("fwd find", format!("no algorithm for {key:?}")))?;
                    (Algo::Fwd(best.algo), best.mathType, best.time, best.memory)
                }
                Kind::BwdData => {
                    let mut max = 0;
                    check(
                        "bwd-data max count",
                        sys::cudnnGetConvolutionBackwardDataAlgorithmMaxCount(handle, &mut max),
                    )?;
                    let mut perf =
                        vec![std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>(); max.max(1) as usize];
                    let mut got = 0;
                    cr::get_convolution_backward_data_algorithm(
                        handle,
                        wd.0,
                        y.0,
                        conv.0,
                        x.0,
                        max,
                        &mut got,
                        perf.as_mut_ptr(),
                    )
                    .map_err(|e| cuda_err("bwd-data heuristics", e))?;
                    let need = perf[..got as usize]
                        .iter()
                        .filter(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                        .map(|p| p.memory)
                        .max()
                        .unwrap_or(0)
                        .min(limit);
                    let (ws, ws_len) = self.workspace(need)?;
                    // a = dy, b = w, out = dx
                    check(
                        "bwd-data find",
                        sys::cudnnFindConvolutionBackwardDataAlgorithmEx(
                            handle,
                            wd.0,
                            b,
                            y.0,
                            a,
                            conv.0,
                            x.0,
                            out,
                            max,
                            &mut got,
                            perf.as_mut_ptr(),
                            ws,
                            ws_len,
                        ),
                    )?;
                    let best = perf[..got as usize]
                        .iter()
                        .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= ws_len)
                        .ok_or_else(|| cuda_err("bwd-data find", format!("no algorithm for {key:?}")))?;
                    (Algo::BwdData(best.algo), best.mathType, best.time, best.memory)
                }
                Kind::BwdFilter => {
                    let mut max = 0;
                    check(
                        "bwd-filter max count",
                        sys::cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(handle, &mut max),
                    )?;
                    let mut perf =
                        vec![std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>(); max.max(1) as usize];
                    let mut got = 0;
                    cr::get_convolution_backward_filter_algorithm(
                        handle,
                        x.0,
                        y.0,
                        conv.0,
                        wd.0,
                        max,
                        &mut got,
                        perf.as_mut_ptr(),
                    )
                    .map_err(|e| cuda_err("bwd-filter heuristics", e))?;
                    let need = perf[..got as usize]
                        .iter()
                        .filter(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                        .map(|p| p.memory)
                        .max()
                        .unwrap_or(0)
                        .min(limit);
                    let (ws, ws_len) = self.workspace(need)?;
                    // a = x, b = dy, out = dw
                    check(
                        "bwd-filter find",
                        sys::cudnnFindConvolutionBackwardFilterAlgorithmEx(
                            handle,
                            x.0,
                            a,
                            y.0,
                            b,
                            conv.0,
                            wd.0,
                            out,
                            max,
                            &mut got,
                            perf.as_mut_ptr(),
                            ws,
                            ws_len,
                        ),
                    )?;
                    let best = perf[..got as usize]
                        .iter()
                        .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= ws_len)
                        .ok_or_else(|| cuda_err("bwd-filter find", format!("no algorithm for {key:?}")))?;
                    (Algo::BwdFilter(best.algo), best.mathType, best.time, best.memory)
                }
            }
        };
        conv.set_math(math)?;
        let report = format!(
            "{:?} {:?} {} x={:?} w={:?} pad={} stride={}: {:?} {:?} {:.3} ms, workspace {} KiB",
            key.kind,
            key.dtype,
            if key.p.nhwc { "NHWC" } else { "NCHW" },
            key.x,
            key.w,
            key.p.padding,
            key.p.stride,
            algo,
            math,
            time,
            memory / 1024
        );
        tracing_like_debug(&report);
        self.conv_plans.insert(
            key,
            ConvPlan {
                x,
                w: wd,
                y,
                conv,
                algo,
                workspace: memory,
                report,
            },
        );
        Ok(())
    }
}

/// Plans are reported through [`super::plan_report`]; nothing is printed here (libraries don't
/// print). Kept as a hook so a `tracing` dependency can be added without touching callers.
fn tracing_like_debug(_line: &str) {}

fn key(kind: Kind, dtype: DType, x: [usize; 4], w: [usize; 4], p: ConvParams) -> ConvKey {
    let tf32 = dtype == DType::F32 && super::allow_tf32();
    ConvKey {
        kind,
        dtype,
        x,
        w,
        p,
        tf32,
    }
}

/// Runs one convolution call (planning it first if new). `a`, `b`: inputs; `out`: output.
/// Fwd: a = x, b = w, out = y. BwdData: a = dy, b = w, out = dx. BwdFilter: a = x, b = dy, out = dw.
fn run_conv(state: &mut State, key: ConvKey, a: *const c_void, b: *const c_void, out: *mut c_void) -> Result<()> {
    state.plan(key, a, b, out)?;
    let need = state.conv_plans.get(&key).map_or(0, |p| p.workspace);
    let (ws, _) = state.workspace(need)?;
    let plan = state.conv_plans.get(&key).ok_or_else(|| cuda_err("plan", "missing"))?;
    let (one, zero) = scalars(key.dtype);
    let h = state.handle;
    let (kind, start) = match plan.algo {
        Algo::Fwd(_) => (ProfKind::Fwd, state.event()?),
        Algo::BwdData(_) => (ProfKind::BwdData, state.event()?),
        Algo::BwdFilter(_) => (ProfKind::BwdFilter, state.event()?),
    };
    // SAFETY: descriptors match the buffers (callers check shapes and contiguity); the
    // workspace holds at least `plan.workspace` bytes; all on the handle's stream.
    unsafe {
        match plan.algo {
            Algo::Fwd(al) => cr::convolution_forward(
                h,
                one,
                plan.x.0,
                a,
                plan.w.0,
                b,
                plan.conv.0,
                al,
                ws,
                plan.workspace,
                zero,
                plan.y.0,
                out,
            )
            .map_err(|e| cuda_err("convolution forward", e))?,
            Algo::BwdData(al) => cr::convolution_backward_data(
                h,
                one,
                plan.w.0,
                b,
                plan.y.0,
                a,
                plan.conv.0,
                al,
                ws,
                plan.workspace,
                zero,
                plan.x.0,
                out,
            )
            .map_err(|e| cuda_err("convolution backward data", e))?,
            Algo::BwdFilter(al) => cr::convolution_backward_filter(
                h,
                one,
                plan.x.0,
                a,
                plan.y.0,
                b,
                plan.conv.0,
                al,
                ws,
                plan.workspace,
                zero,
                plan.w.0,
                out,
            )
            .map_err(|e| cuda_err("convolution backward filter", e))?,
        }
    }
    state.push_event(kind, start)
}

fn input<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<cudarc::driver::CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    let start = l.start_offset();
    let n = l.shape().elem_count();
    if start + n > slice.len() {
        candle_core::bail!("cuDNN op: view {start}+{n} exceeds storage of {}", slice.len());
    }
    Ok(slice.slice(start..start + n))
}

fn alloc<T: DeviceRepr>(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every output buffer is fully written by the cuDNN call (beta = 0) before use.
    unsafe { stream.alloc::<T>(n) }.map_err(|e| cuda_err("allocate output", e))
}

macro_rules! dispatch {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            other => candle_core::bail!("cuDNN ops support f32, f64, bf16 and f16, not {other:?}"),
        }
    };
}

pub(super) fn conv_fwd(
    p: ConvParams,
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    bias: Option<(&CudaStorage, &Layout)>,
    y_shape: &Shape,
) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr>(
        p: ConvParams,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bias: Option<(&CudaStorage, &Layout)>,
        y_shape: &Shape,
    ) -> Result<CudaStorage> {
        let dev = xs.device.clone();
        let dtype = xs.dtype();
        let (xd, wd) = (dims4(xl, p.nhwc)?, filter_dims(wl, p.nhwc)?);
        let y_dims = dims4(&Layout::contiguous(y_shape.clone()), p.nhwc)?;
        with_state(&dev, |st| {
            let stream = st.stream.clone();
            let x = input::<T>(xs, xl)?;
            let w = input::<T>(ws, wl)?;
            let mut y = alloc::<T>(&stream, y_shape.elem_count())?;
            {
                let (xp, _gx) = x.device_ptr(&stream);
                let (wp, _gw) = w.device_ptr(&stream);
                let (yp, _gy) = y.device_ptr_mut(&stream);
                let yp = yp as *mut c_void;
                run_conv(
                    st,
                    key(Kind::Fwd, dtype, xd, wd, p),
                    xp as *const c_void,
                    wp as *const c_void,
                    yp,
                )?;
                if let Some((bs, bl)) = bias {
                    let b = input::<T>(bs, bl)?;
                    let (bp, _gb) = b.device_ptr(&stream);
                    let bias_desc = st.tensor_desc(dtype, [1, wd[0], 1, 1], p.nhwc)?;
                    let y_desc = st.tensor_desc(dtype, y_dims, p.nhwc)?;
                    let start = st.event()?;
                    let (one, _) = scalars(dtype);
                    // SAFETY: bias (1,K,1,1) broadcasts over y (N,K,H,W); both descriptors match.
                    check("add bias", unsafe {
                        sys::cudnnAddTensor(st.handle, one, bias_desc, bp as *const c_void, one, y_desc, yp)
                    })?;
                    st.push_event(ProfKind::Bias, start)?;
                }
            }
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        })
    }
    require_contiguous("conv input", xl)?;
    require_contiguous("conv weight", wl)?;
    if let Some((_, bl)) = bias {
        require_contiguous("conv bias", bl)?;
    }
    if bias.is_none() {
        if let Some(y) = super::im2col::cuda::try_conv_fwd(p, xs, xl, ws, wl)? {
            return Ok(y);
        }
    }
    dispatch!(xs.dtype(), go, p, xs, xl, ws, wl, bias, y_shape)
}

pub(super) fn conv_bwd_data(
    p: ConvParams,
    dys: &CudaStorage,
    dyl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    dx_shape: &Shape,
) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr>(
        p: ConvParams,
        dys: &CudaStorage,
        dyl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        dx_shape: &Shape,
    ) -> Result<CudaStorage> {
        let dev = dys.device.clone();
        let dtype = dys.dtype();
        let wd = filter_dims(wl, p.nhwc)?;
        let xd = dims4(&Layout::contiguous(dx_shape.clone()), p.nhwc)?;
        let dyd = dims4(dyl, p.nhwc)?;
        if dyd != [xd[0], wd[0], p.out_dim(xd[2], wd[2]), p.out_dim(xd[3], wd[3])] {
            candle_core::bail!("cuDNN backward data: dy {dyd:?} does not match x {xd:?} and w {wd:?}");
        }
        with_state(&dev, |st| {
            let stream = st.stream.clone();
            let dy = input::<T>(dys, dyl)?;
            let w = input::<T>(ws, wl)?;
            let mut dx = alloc::<T>(&stream, dx_shape.elem_count())?;
            {
                let (dyp, _g1) = dy.device_ptr(&stream);
                let (wp, _g2) = w.device_ptr(&stream);
                let (dxp, _g3) = dx.device_ptr_mut(&stream);
                run_conv(
                    st,
                    key(Kind::BwdData, dtype, xd, wd, p),
                    dyp as *const c_void,
                    wp as *const c_void,
                    dxp as *mut c_void,
                )?;
            }
            Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
        })
    }
    require_contiguous("backward-data dy", dyl)?;
    require_contiguous("backward-data weight", wl)?;
    dispatch!(dys.dtype(), go, p, dys, dyl, ws, wl, dx_shape)
}

pub(super) fn conv_bwd_filter(
    p: ConvParams,
    xs: &CudaStorage,
    xl: &Layout,
    dys: &CudaStorage,
    dyl: &Layout,
    dw_shape: &Shape,
) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr>(
        p: ConvParams,
        xs: &CudaStorage,
        xl: &Layout,
        dys: &CudaStorage,
        dyl: &Layout,
        dw_shape: &Shape,
    ) -> Result<CudaStorage> {
        let dev = xs.device.clone();
        let dtype = xs.dtype();
        let xd = dims4(xl, p.nhwc)?;
        let wd = filter_dims(&Layout::contiguous(dw_shape.clone()), p.nhwc)?;
        let dyd = dims4(dyl, p.nhwc)?;
        if dyd != [xd[0], wd[0], p.out_dim(xd[2], wd[2]), p.out_dim(xd[3], wd[3])] {
            candle_core::bail!("cuDNN backward filter: dy {dyd:?} does not match x {xd:?} and w {wd:?}");
        }
        with_state(&dev, |st| {
            let stream = st.stream.clone();
            let x = input::<T>(xs, xl)?;
            let dy = input::<T>(dys, dyl)?;
            let mut dw = alloc::<T>(&stream, dw_shape.elem_count())?;
            {
                let (xp, _g1) = x.device_ptr(&stream);
                let (dyp, _g2) = dy.device_ptr(&stream);
                let (dwp, _g3) = dw.device_ptr_mut(&stream);
                run_conv(
                    st,
                    key(Kind::BwdFilter, dtype, xd, wd, p),
                    xp as *const c_void,
                    dyp as *const c_void,
                    dwp as *mut c_void,
                )?;
            }
            Ok(CudaStorage::wrap_cuda_slice(dw, dev.clone()))
        })
    }
    require_contiguous("backward-filter x", xl)?;
    require_contiguous("backward-filter dy", dyl)?;
    if let Some(dw) = super::im2col::cuda::try_conv_bwd_filter(p, xs, xl, dys, dyl, dw_shape)? {
        return Ok(dw);
    }
    dispatch!(xs.dtype(), go, p, xs, xl, dys, dyl, dw_shape)
}

pub(super) fn bias_grad(dys: &CudaStorage, dyl: &Layout, k: usize) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr>(dys: &CudaStorage, dyl: &Layout, k: usize) -> Result<CudaStorage> {
        let dev = dys.device.clone();
        let dtype = dys.dtype();
        let dyd = dims4(dyl, false)?;
        with_state(&dev, |st| {
            let stream = st.stream.clone();
            let dy = input::<T>(dys, dyl)?;
            let mut db = alloc::<T>(&stream, k)?;
            let dy_desc = st.tensor_desc(dtype, dyd, false)?;
            let db_desc = st.tensor_desc(dtype, [1, k, 1, 1], false)?;
            let (one, zero) = scalars(dtype);
            let start = st.event()?;
            {
                let (dyp, _g1) = dy.device_ptr(&stream);
                let (dbp, _g2) = db.device_ptr_mut(&stream);
                // SAFETY: dy (N,K,H,W) and db (1,K,1,1) match their descriptors.
                check("bias gradient", unsafe {
                    sys::cudnnConvolutionBackwardBias(
                        st.handle,
                        one,
                        dy_desc,
                        dyp as *const c_void,
                        zero,
                        db_desc,
                        dbp as *mut c_void,
                    )
                })?;
            }
            st.push_event(ProfKind::Bias, start)?;
            Ok(CudaStorage::wrap_cuda_slice(db, dev.clone()))
        })
    }
    require_contiguous("bias gradient dy", dyl)?;
    dispatch!(dys.dtype(), go, dys, dyl, k)
}

pub(super) fn pool_fwd(xs: &CudaStorage, xl: &Layout, y_shape: &Shape, nhwc: bool) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr>(
        xs: &CudaStorage,
        xl: &Layout,
        y_shape: &Shape,
        nhwc: bool,
    ) -> Result<CudaStorage> {
        let dev = xs.device.clone();
        let dtype = xs.dtype();
        let xd = dims4(xl, nhwc)?;
        let yd = dims4(&Layout::contiguous(y_shape.clone()), nhwc)?;
        with_state(&dev, |st| {
            let stream = st.stream.clone();
            let x = input::<T>(xs, xl)?;
            let mut y = alloc::<T>(&stream, y_shape.elem_count())?;
            let x_desc = st.tensor_desc(dtype, xd, nhwc)?;
            let y_desc = st.tensor_desc(dtype, yd, nhwc)?;
            if st.pool.is_none() {
                st.pool = Some(PoolDesc::max2()?);
            }
            let pool = st
                .pool
                .as_ref()
                .map(|p| p.0)
                .ok_or_else(|| cuda_err("pool", "missing"))?;
            let (one, zero) = scalars(dtype);
            let start = st.event()?;
            {
                let (xp, _g1) = x.device_ptr(&stream);
                let (yp, _g2) = y.device_ptr_mut(&stream);
                // SAFETY: x and y match their descriptors; y is floor(H/2)×floor(W/2).
                check("pooling forward", unsafe {
                    sys::cudnnPoolingForward(
                        st.handle,
                        pool,
                        one,
                        x_desc,
                        xp as *const c_void,
                        zero,
                        y_desc,
                        yp as *mut c_void,
                    )
                })?;
            }
            st.push_event(ProfKind::Pool, start)?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        })
    }
    require_contiguous("pooling input", xl)?;
    dispatch!(xs.dtype(), go, xs, xl, y_shape, nhwc)
}

pub(super) fn pool_bwd(
    xs: &CudaStorage,
    xl: &Layout,
    ys: &CudaStorage,
    yl: &Layout,
    dys: &CudaStorage,
    dyl: &Layout,
    nhwc: bool,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: CudaDType + DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        xs: &CudaStorage,
        xl: &Layout,
        ys: &CudaStorage,
        yl: &Layout,
        dys: &CudaStorage,
        dyl: &Layout,
        nhwc: bool,
    ) -> Result<CudaStorage> {
        let dev = xs.device.clone();
        let dtype = xs.dtype();
        let xd = dims4(xl, nhwc)?;
        let yd = dims4(yl, nhwc)?;
        if dims4(dyl, nhwc)? != yd {
            candle_core::bail!("cuDNN pooling backward: dy {:?} does not match y {yd:?}", dyl.dims());
        }
        with_state(&dev, |st| {
            let stream = st.stream.clone();
            let x = input::<T>(xs, xl)?;
            let y = input::<T>(ys, yl)?;
            let dy = input::<T>(dys, dyl)?;
            // An odd side leaves a last row or column in no window: its gradient is 0, and
            // cuDNN's backward need not write it (the first device run saw a channels-last
            // 53×53 layer's dx off by 5 % in f32 with the memory pool reusing buffers), so
            // such a dx starts zeroed. Even sides are covered whole.
            let [_, _, h, w] = xd;
            let mut dx = if h % 2 == 1 || w % 2 == 1 {
                stream
                    .alloc_zeros::<T>(xl.shape().elem_count())
                    .map_err(|e| cuda_err("allocate pooling dx", e))?
            } else {
                alloc::<T>(&stream, xl.shape().elem_count())?
            };
            let x_desc = st.tensor_desc(dtype, xd, nhwc)?;
            let y_desc = st.tensor_desc(dtype, yd, nhwc)?;
            if st.pool.is_none() {
                st.pool = Some(PoolDesc::max2()?);
            }
            let pool = st
                .pool
                .as_ref()
                .map(|p| p.0)
                .ok_or_else(|| cuda_err("pool", "missing"))?;
            let (one, zero) = scalars(dtype);
            let start = st.event()?;
            {
                let (xp, _g1) = x.device_ptr(&stream);
                let (yp, _g2) = y.device_ptr(&stream);
                let (dyp, _g3) = dy.device_ptr(&stream);
                let (dxp, _g4) = dx.device_ptr_mut(&stream);
                // SAFETY: all four buffers match their descriptors (dy like y, dx like x).
                check("pooling backward", unsafe {
                    sys::cudnnPoolingBackward(
                        st.handle,
                        pool,
                        one,
                        y_desc,
                        yp as *const c_void,
                        y_desc,
                        dyp as *const c_void,
                        x_desc,
                        xp as *const c_void,
                        zero,
                        x_desc,
                        dxp as *mut c_void,
                    )
                })?;
            }
            st.push_event(ProfKind::Pool, start)?;
            Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
        })
    }
    for (what, l) in [("pooling x", xl), ("pooling y", yl), ("pooling dy", dyl)] {
        require_contiguous(what, l)?;
    }
    dispatch!(xs.dtype(), go, xs, xl, ys, yl, dys, dyl, nhwc)
}

pub(super) fn take_profile(dev: &CudaDevice) -> Result<Profile> {
    with_state(dev, |st| {
        let mut p = Profile::default();
        for (kind, start, end) in st.events.drain(..) {
            let ms = f64::from(start.elapsed_ms(&end).map_err(|e| cuda_err("event timing", e))?);
            p.calls += 1;
            match kind {
                ProfKind::Fwd => p.conv_fwd_ms += ms,
                ProfKind::BwdData => p.conv_bwd_data_ms += ms,
                ProfKind::BwdFilter => p.conv_bwd_filter_ms += ms,
                ProfKind::Bias => p.bias_ms += ms,
                ProfKind::Pool => p.pool_ms += ms,
            }
        }
        Ok(p)
    })
}

pub(super) fn plan_report() -> Vec<String> {
    STATES.with(|states| {
        let states = states.borrow();
        let mut lines: Vec<String> = states
            .values()
            .flat_map(|s| s.conv_plans.values().map(|p| p.report.clone()))
            .collect();
        lines.sort();
        for s in states.values() {
            for (dtype, sup) in &s.support {
                lines.push(format!(
                    "cuDNN support {dtype:?}: bias add/grad {}, max-pool {}",
                    sup.bias, sup.pool
                ));
            }
        }
        lines
    })
}

/// The [`Support`] of this device's cuDNN for `dtype`, probed on first use.
pub(super) fn support(dev: &CudaDevice, dtype: DType) -> Result<Support> {
    fn probe<T: CudaDType + DeviceRepr + ValidAsZeroBits>(dev: &CudaDevice, dtype: DType) -> Result<Support> {
        with_state(dev, |st| {
            if let Some(s) = st.support.get(&dtype) {
                return Ok(*s);
            }
            let stream = st.stream.clone();
            let zeros = |n| stream.alloc_zeros::<T>(n).map_err(|e| cuda_err("allocate probe", e));
            let (mut big, mut big2, mut small, mut small2) = (zeros(8)?, zeros(8)?, zeros(2)?, zeros(2)?);
            let t4 = st.tensor_desc(dtype, [1, 2, 2, 2], false)?;
            let t1 = st.tensor_desc(dtype, [1, 2, 1, 1], false)?;
            if st.pool.is_none() {
                st.pool = Some(PoolDesc::max2()?);
            }
            let pool = st
                .pool
                .as_ref()
                .map(|p| p.0)
                .ok_or_else(|| cuda_err("pool", "missing"))?;
            let (one, zero) = scalars(dtype);
            let h = st.handle;
            let (bp, _g1) = big.device_ptr_mut(&stream);
            let (b2p, _g2) = big2.device_ptr_mut(&stream);
            let (sp, _g3) = small.device_ptr_mut(&stream);
            let (s2p, _g4) = small2.device_ptr_mut(&stream);
            let (bp, b2p, sp, s2p) = (
                bp as *mut c_void,
                b2p as *mut c_void,
                sp as *mut c_void,
                s2p as *mut c_void,
            );
            // SAFETY: every buffer matches the descriptor it is passed with ((1,2,2,2) for the
            // 8-element ones, (1,2,1,1) for the 2-element ones).
            let s = unsafe {
                let bias = sys::cudnnAddTensor(h, one, t1, sp, one, t4, bp).result().is_ok()
                    && sys::cudnnConvolutionBackwardBias(h, one, t4, bp, zero, t1, s2p)
                        .result()
                        .is_ok();
                let pool = sys::cudnnPoolingForward(h, pool, one, t4, bp, zero, t1, sp)
                    .result()
                    .is_ok()
                    && sys::cudnnPoolingBackward(h, pool, one, t1, sp, t1, s2p, t4, bp, zero, t4, b2p)
                        .result()
                        .is_ok();
                Support { bias, pool }
            };
            st.support.insert(dtype, s);
            Ok(s)
        })
    }
    dispatch!(dtype, probe, dev, dtype)
}
