//! What each GPU kernel, copy and fill of a benchmark's timed steps took, from CUPTI's activity
//! records (`gz bench-train --trace-kernels`; feature `cupti`, built into the device bundle).
//!
//! The fast path's profile (`--profile-steps`) brackets gz's own calls with CUDA events and
//! synchronises between phases; what lies between them (candle's kernels, the launch gaps) is
//! one "everything else" figure: 3.5 ms of VGG16-blog's 16.5 ms bf16 step and 4.2 ms of
//! Dieleman's 10.8 ms on the H200 (docs/benchmarks.md). CUPTI's records time every kernel as
//! it ran in the pipelined run itself, and the union of their intervals against the span says
//! how long the GPU sat idle waiting for the host. CUPTI adds some cost to every launch: compare
//! a traced row's images/s with the same row untraced before reading much into the idle time.
//!
//! [`Summary`] and its table are plain data (tested on any machine); [`start`] and [`stop`]
//! need CUPTI (`libcupti.so`, found as the CUDA libraries are) and the `cupti` feature, and
//! say so otherwise.

use serde::Serialize;

/// One kernel name's launches.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelRow {
    /// The kernel's name as the driver has it (C++ names mangled).
    pub name: String,
    pub count: u64,
    pub total_ns: u64,
}

/// What the GPU ran between [`start`] and [`stop`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// By total time, longest first (ties by name).
    pub kernels: Vec<KernelRow>,
    /// The kernels' durations added up.
    pub kernel_ns: u64,
    /// Copies (host to device, device to device, …): how many, their time and bytes.
    pub copies: u64,
    pub copy_ns: u64,
    pub copy_bytes: u64,
    /// Fills (cuMemset).
    pub fills: u64,
    pub fill_ns: u64,
    /// How long at least one kernel, copy or fill ran (the union of their intervals).
    pub busy_ns: u64,
    /// From the first start to the last end.
    pub span_ns: u64,
    /// Records CUPTI dropped (its buffers full): the figures are then short of the truth.
    pub dropped: u64,
    /// Records without a time (a zero start, or an end before the start): counted as launches
    /// of no length, and left out of the busy time and the span.
    pub untimed: u64,
}

/// A record's interval on the GPU's clock (ns).
type Interval = (u64, u64);

/// The kind rules (`kernel_kinds.txt`, shared with `scripts/torch_trace.py`).
const KINDS: &str = include_str!("kernel_kinds.txt");

/// A rule of [`KINDS`]: the kind, whether the keys are prefixes (else substrings), the keys.
type KindRule = (&'static str, bool, Vec<&'static str>);

/// [`KINDS`] parsed: the kinds in table order, and the rules in matching order.
fn kinds() -> &'static (Vec<&'static str>, Vec<KindRule>) {
    static PARSED: std::sync::OnceLock<(Vec<&'static str>, Vec<KindRule>)> = std::sync::OnceLock::new();
    PARSED.get_or_init(|| {
        let mut order = Vec::new();
        let mut rules = Vec::new();
        for line in KINDS.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.splitn(3, '|').map(str::trim);
            let (kind, how, keys) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let keys: Vec<&'static str> = keys.split(',').map(str::trim).filter(|k| !k.is_empty()).collect();
            if kind == "order" {
                order = keys;
            } else {
                rules.push((kind, how == "prefix", keys));
            }
        }
        (order, rules)
    })
}

/// The kinds of work [`category`] sorts kernels into, in the order the tables list them
/// (`kernel_kinds.txt`, which `scripts/torch_trace.py` reads too).
pub fn categories() -> &'static [&'static str] {
    &kinds().0
}

/// The kind of work a kernel does, from its name (CUPTI's, mangled or not, or torch.profiler's)
/// by the first matching rule of `kernel_kinds.txt`: cuDNN's convolution kernels by pass, GEMMs,
/// the epilogues' pointwise, pooling and reduction work (gz's kernels, PyTorch's and candle's,
/// Inductor's fused Triton kernels), the optimizer, layout changes and copies, the input's
/// resampling; "other" where no rule matches.
pub fn category(name: &str) -> &'static str {
    let n = name.to_ascii_lowercase();
    kinds()
        .1
        .iter()
        .find(|(_, prefix, keys)| {
            keys.iter()
                .any(|k| if *prefix { n.starts_with(k) } else { n.contains(k) })
        })
        .map_or("other", |r| r.0)
}

impl Summary {
    /// Adds up kernel records (`name`, start, end), copy records (start, end, bytes) and fill
    /// records (start, end); records without a time (a zero start, or an end not after the
    /// start: CUPTI's unknown timestamps, or work a forced flush caught unfinished) count as
    /// launches of no length and stay out of the busy time and the span (one at 0 made the
    /// span the GPU clock's whole reading).
    pub fn from_records(kernels: &[(String, u64, u64)], copies: &[(u64, u64, u64)], fills: &[Interval]) -> Summary {
        let timed = |(a, b): Interval| a > 0 && b > a;
        let len = |i: Interval| if timed(i) { i.1 - i.0 } else { 0 };
        let mut by_name: std::collections::HashMap<&str, (u64, u64)> = std::collections::HashMap::new();
        let mut intervals: Vec<Interval> = Vec::with_capacity(kernels.len() + copies.len() + fills.len());
        for (name, a, b) in kernels {
            let e = by_name.entry(name.as_str()).or_default();
            e.0 += 1;
            e.1 += len((*a, *b));
            intervals.push((*a, *b));
        }
        let mut rows: Vec<KernelRow> = by_name
            .into_iter()
            .map(|(name, (count, total_ns))| KernelRow {
                name: name.to_string(),
                count,
                total_ns,
            })
            .collect();
        rows.sort_by(|x, y| y.total_ns.cmp(&x.total_ns).then_with(|| x.name.cmp(&y.name)));
        intervals.extend(copies.iter().map(|&(a, b, _)| (a, b)));
        intervals.extend(fills.iter().copied());
        let all = intervals.len();
        intervals.retain(|&i| timed(i));
        let untimed = (all - intervals.len()) as u64;
        let span_ns = match (
            intervals.iter().map(|i| i.0).min(),
            intervals.iter().map(|i| i.1.max(i.0)).max(),
        ) {
            (Some(a), Some(b)) => b - a,
            _ => 0,
        };
        Summary {
            kernel_ns: rows.iter().map(|r| r.total_ns).sum(),
            kernels: rows,
            copies: copies.len() as u64,
            copy_ns: copies.iter().map(|&(a, b, _)| len((a, b))).sum(),
            copy_bytes: copies.iter().map(|c| c.2).sum(),
            fills: fills.len() as u64,
            fill_ns: fills.iter().map(|&i| len(i)).sum(),
            busy_ns: union_ns(intervals),
            span_ns,
            dropped: 0,
            untimed,
        }
    }

    /// Kernel time and launches by [`category`], in [`categories`]' order (kinds with no
    /// kernel left out).
    pub fn by_category(&self) -> Vec<(&'static str, u64, u64)> {
        categories()
            .iter()
            .filter_map(|&c| {
                let rows = self.kernels.iter().filter(|k| category(&k.name) == c);
                let (ns, count) = rows.fold((0, 0), |(ns, n), k| (ns + k.total_ns, n + k.count));
                (count > 0).then_some((c, ns, count))
            })
            .collect()
    }

    /// The report, per step of `steps`: the busy share of the span, then the `top` longest
    /// kernels (names cut to 90 characters) and one line for the rest, then copies and fills.
    pub fn table(&self, steps: usize, top: usize) -> Vec<String> {
        let per = |ns: u64| ns as f64 / 1e6 / steps.max(1) as f64;
        let mut out = vec![format!(
            "GPU over {} timed steps (CUPTI): busy {:.2} of {:.2} ms/step ({:.1}%; idle {:.2} ms/step waiting for \
             the host), kernels {:.2} ms/step in {:.0} launches/step",
            steps,
            per(self.busy_ns),
            per(self.span_ns),
            100.0 * self.busy_ns as f64 / self.span_ns.max(1) as f64,
            per(self.span_ns.saturating_sub(self.busy_ns)),
            per(self.kernel_ns),
            self.kernels.iter().map(|k| k.count).sum::<u64>() as f64 / steps.max(1) as f64
        )];
        // by kind first (the same kinds as scripts/torch_trace.py's), then by name
        out.push("  by kind:".to_string());
        for (c, ns, count) in self.by_category() {
            out.push(format!(
                "  {:>8.3} ms/step {:>6.1}/step  {c}",
                per(ns),
                count as f64 / steps.max(1) as f64
            ));
        }
        out.push("  by name:".to_string());
        for k in self.kernels.iter().take(top) {
            let name: String = if k.name.chars().count() > 90 {
                k.name.chars().take(89).chain(std::iter::once('…')).collect()
            } else {
                k.name.clone()
            };
            out.push(format!(
                "  {:>8.3} ms/step {:>6.1}/step {:>9.1} us each  {name}",
                per(k.total_ns),
                k.count as f64 / steps.max(1) as f64,
                k.total_ns as f64 / 1e3 / k.count.max(1) as f64
            ));
        }
        let rest: Vec<&KernelRow> = self.kernels.iter().skip(top).collect();
        if !rest.is_empty() {
            out.push(format!(
                "  {:>8.3} ms/step {:>6.1}/step {:>9}          ({})",
                per(rest.iter().map(|k| k.total_ns).sum()),
                rest.iter().map(|k| k.count).sum::<u64>() as f64 / steps.max(1) as f64,
                "",
                gz_schema::count(rest.len(), "other kernel")
            ));
        }
        out.push(format!(
            "  copies {:.3} ms/step ({:.1}/step, {:.1} MB/step); fills {:.3} ms/step ({:.1}/step)",
            per(self.copy_ns),
            self.copies as f64 / steps.max(1) as f64,
            self.copy_bytes as f64 / 1e6 / steps.max(1) as f64,
            per(self.fill_ns),
            self.fills as f64 / steps.max(1) as f64
        ));
        if self.dropped > 0 {
            out.push(format!(
                "  warning: CUPTI dropped {} (its buffers were full): the figures are short",
                gz_schema::count(self.dropped as usize, "record")
            ));
        }
        if self.untimed > 0 {
            out.push(format!(
                "  note: {} without a time, counted with no length",
                gz_schema::count(self.untimed as usize, "record")
            ));
        }
        if self.kernels.is_empty() {
            out.push("  warning: CUPTI recorded no kernel: the trace did not work".to_string());
        }
        out
    }
}

/// The length of the union of `intervals` (empty or reversed ones count nothing).
fn union_ns(mut intervals: Vec<Interval>) -> u64 {
    intervals.retain(|&(a, b)| b > a);
    intervals.sort_unstable();
    let mut total = 0;
    let mut cur: Option<Interval> = None;
    for (a, b) in intervals {
        cur = match cur {
            Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                total += cb - ca;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    total + cur.map_or(0, |(a, b)| b - a)
}

/// CUPTI 13.0's record layouts, as far as this module reads them: the offsets of
/// `cupti_activity.h` (nvidia-cuda-cupti 13.0.85), printed by a C program with `offsetof`
/// (`CUpti_ActivityKernel10`: start 16, end 24, name 104; `CUpti_ActivityMemcpy6` and
/// `CUpti_ActivityMemset4`: bytes 8, start 16, end 24) and checked by a test here.
#[cfg_attr(not(feature = "cupti"), allow(dead_code, reason = "read by the CUPTI module"))]
mod layout {
    /// `CUPTI_ACTIVITY_KIND_*`.
    pub const KIND_MEMCPY: u32 = 1;
    pub const KIND_MEMSET: u32 = 2;
    pub const KIND_KERNEL: u32 = 3;
    pub const KIND_CONCURRENT_KERNEL: u32 = 10;

    /// `CUpti_ActivityKernel10` up to `name`.
    #[repr(C)]
    pub struct Kernel {
        pub kind: u32,
        pub configs: [u8; 12],
        pub start: u64,
        pub end: u64,
        pub between: [u8; 72],
        pub name: *const std::ffi::c_char,
    }

    /// The start of `CUpti_ActivityMemcpy6` and of `CUpti_ActivityMemset4`.
    #[repr(C)]
    pub struct Transfer {
        pub kind: u32,
        pub flags: u32,
        pub bytes: u64,
        pub start: u64,
        pub end: u64,
    }
}

#[cfg(feature = "cupti")]
mod imp {
    //! CUPTI's activity API, loaded from `libcupti.so` when a trace starts (a gz without it
    //! still runs; only `--trace-kernels` needs it): buffers handed to CUPTI by `requested`,
    //! read and freed in `completed` (on CUPTI's thread, or in the flush of [`stop`]).

    use super::{layout, Summary};
    use std::alloc::Layout;
    use std::ffi::c_void;
    use std::sync::{Mutex, OnceLock};

    type Requested = unsafe extern "C" fn(*mut *mut u8, *mut usize, *mut usize);
    type Completed = unsafe extern "C" fn(*mut c_void, u32, *mut u8, usize, usize);

    /// The CUPTI functions used here (`CUptiResult` is a C enum: 0 is success).
    pub(super) struct Api {
        register: unsafe extern "C" fn(Option<Requested>, Option<Completed>) -> u32,
        enable: unsafe extern "C" fn(u32) -> u32,
        disable: unsafe extern "C" fn(u32) -> u32,
        flush_all: unsafe extern "C" fn(u32) -> u32,
        next_record: unsafe extern "C" fn(*mut u8, usize, *mut *mut u32) -> u32,
        dropped: unsafe extern "C" fn(*mut c_void, u32, *mut usize) -> u32,
        result_string: unsafe extern "C" fn(u32, *mut *const std::ffi::c_char) -> u32,
        /// Kept loaded for the life of the process (CUPTI's thread calls back into it).
        _lib: libloading::Library,
    }

    /// Loads `libcupti.so.13` (or `libcupti.so`) once; the error says what was tried.
    pub(super) fn api() -> Result<&'static Api, String> {
        static API: OnceLock<Result<Api, String>> = OnceLock::new();
        API.get_or_init(|| {
            let mut tried = Vec::new();
            for name in ["libcupti.so.13", "libcupti.so"] {
                // SAFETY: loading NVIDIA's CUPTI, whose initialisers only set up the library
                match unsafe { libloading::Library::new(name) } {
                    Ok(lib) => {
                        // SAFETY: the symbols' C signatures are those of cupti_activity.h
                        // (CUDA 13.0), declared above
                        return unsafe {
                            Ok(Api {
                                register: *lib
                                    .get(b"cuptiActivityRegisterCallbacks\0")
                                    .map_err(|e| e.to_string())?,
                                enable: *lib.get(b"cuptiActivityEnable\0").map_err(|e| e.to_string())?,
                                disable: *lib.get(b"cuptiActivityDisable\0").map_err(|e| e.to_string())?,
                                flush_all: *lib.get(b"cuptiActivityFlushAll\0").map_err(|e| e.to_string())?,
                                next_record: *lib.get(b"cuptiActivityGetNextRecord\0").map_err(|e| e.to_string())?,
                                dropped: *lib
                                    .get(b"cuptiActivityGetNumDroppedRecords\0")
                                    .map_err(|e| e.to_string())?,
                                result_string: *lib.get(b"cuptiGetResultString\0").map_err(|e| e.to_string())?,
                                _lib: lib,
                            })
                        };
                    }
                    Err(e) => tried.push(format!("{name}: {e}")),
                }
            }
            Err(format!(
                "CUPTI could not be loaded ({}); it must be on the library path (the device bundle carries \
                 libcupti.so.13: `bash scripts/device-cudnn.sh --prepare`)",
                tried.join("; ")
            ))
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    /// CUPTI's name of a `CUptiResult` (`CUPTI_ERROR_NOT_INITIALIZED (15)`).
    fn result_name(api: &Api, rc: u32) -> String {
        let mut s: *const std::ffi::c_char = std::ptr::null();
        // SAFETY: an out-pointer; CUPTI points it at a static string
        if unsafe { (api.result_string)(rc, &mut s) } == 0 && !s.is_null() {
            let name = unsafe { std::ffi::CStr::from_ptr(s) }.to_string_lossy();
            format!("{name} ({rc})")
        } else {
            format!("CUptiResult {rc}")
        }
    }

    /// The records read so far: kernels (name, start, end), copies (start, end, bytes), fills.
    struct Records {
        kernels: Vec<(String, u64, u64)>,
        copies: Vec<(u64, u64, u64)>,
        fills: Vec<(u64, u64)>,
        dropped: u64,
    }

    static RECORDS: Mutex<Records> = Mutex::new(Records {
        kernels: Vec::new(),
        copies: Vec::new(),
        fills: Vec::new(),
        dropped: 0,
    });

    /// Whether the buffer callbacks were registered (once per process).
    static REGISTERED: Mutex<bool> = Mutex::new(false);

    const BUFFER: usize = 8 << 20;

    fn buffer_layout() -> Option<Layout> {
        Layout::from_size_align(BUFFER, 8).ok()
    }

    const KINDS: [u32; 3] = [layout::KIND_CONCURRENT_KERNEL, layout::KIND_MEMCPY, layout::KIND_MEMSET];

    /// CUPTI asks for a buffer to fill.
    unsafe extern "C" fn requested(buffer: *mut *mut u8, size: *mut usize, max_records: *mut usize) {
        let ptr = buffer_layout().map_or(std::ptr::null_mut(), |l| {
            // SAFETY: a non-zero size; freed in `completed` with the same layout
            unsafe { std::alloc::alloc(l) }
        });
        // SAFETY: CUPTI passes valid out-pointers
        unsafe {
            *buffer = ptr;
            *size = if ptr.is_null() { 0 } else { BUFFER };
            *max_records = 0;
        }
    }

    /// CUPTI hands back a buffer with `valid` bytes of records.
    unsafe extern "C" fn completed(_context: *mut c_void, _stream: u32, buffer: *mut u8, _size: usize, valid: usize) {
        if buffer.is_null() {
            return;
        }
        if let Ok(api) = api() {
            let mut recs = RECORDS.lock().unwrap_or_else(|e| e.into_inner());
            let mut record: *mut u32 = std::ptr::null_mut();
            // SAFETY: `buffer` holds `valid` bytes of records CUPTI wrote, each starting with
            // its kind; each is read as the layout of its kind (CUPTI 13.0's, `layout`)
            while unsafe { (api.next_record)(buffer, valid, &mut record) } == 0 && !record.is_null() {
                match unsafe { record.read_unaligned() } {
                    layout::KIND_CONCURRENT_KERNEL | layout::KIND_KERNEL => {
                        let k = unsafe { record.cast::<layout::Kernel>().read_unaligned() };
                        let name = if k.name.is_null() {
                            "(unnamed)".to_string()
                        } else {
                            unsafe { std::ffi::CStr::from_ptr(k.name) }
                                .to_string_lossy()
                                .into_owned()
                        };
                        recs.kernels.push((name, k.start, k.end));
                    }
                    layout::KIND_MEMCPY => {
                        let c = unsafe { record.cast::<layout::Transfer>().read_unaligned() };
                        recs.copies.push((c.start, c.end, c.bytes));
                    }
                    layout::KIND_MEMSET => {
                        let f = unsafe { record.cast::<layout::Transfer>().read_unaligned() };
                        recs.fills.push((f.start, f.end));
                    }
                    _ => {}
                }
            }
            let mut dropped = 0usize;
            // SAFETY: an out-pointer; a null context asks about the global buffers
            if unsafe { (api.dropped)(std::ptr::null_mut(), 0, &mut dropped) } == 0 {
                recs.dropped += dropped as u64;
            }
        }
        if let Some(l) = buffer_layout() {
            // SAFETY: allocated in `requested` with this layout
            unsafe { std::alloc::dealloc(buffer, l) };
        }
    }

    pub fn start() -> Result<(), String> {
        let api = api()?;
        {
            let mut reg = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
            if !*reg {
                // SAFETY: two functions with the signatures CUPTI calls them with
                let rc = unsafe { (api.register)(Some(requested), Some(completed)) };
                if rc != 0 {
                    return Err(format!("CUPTI refused its buffers: {}", result_name(api, rc)));
                }
                *reg = true;
            }
        }
        {
            let mut recs = RECORDS.lock().unwrap_or_else(|e| e.into_inner());
            recs.kernels.clear();
            recs.copies.clear();
            recs.fills.clear();
            recs.dropped = 0;
        }
        for (i, kind) in KINDS.into_iter().enumerate() {
            // SAFETY: a plain call with an activity kind
            let rc = unsafe { (api.enable)(kind) };
            if rc != 0 {
                // the kinds enabled before it are switched off again: no half-started trace
                for done in &KINDS[..i] {
                    // SAFETY: as above
                    unsafe { (api.disable)(*done) };
                }
                return Err(format!(
                    "CUPTI did not enable activity kind {kind}: {} (another profiler holding the device gives \
                     CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED)",
                    result_name(api, rc)
                ));
            }
        }
        Ok(())
    }

    pub fn stop() -> Result<Summary, String> {
        let api = api()?;
        // CUPTI_ACTIVITY_FLAG_FLUSH_FORCED: the records of work still in flight too
        const FLUSH_FORCED: u32 = 1;
        // recording stops first, so that nothing after this trace waits in CUPTI's buffers
        // for the next one; the flush then hands back everything recorded
        for kind in KINDS {
            // SAFETY: plain calls
            unsafe { (api.disable)(kind) };
        }
        // SAFETY: as above
        let flushed = unsafe { (api.flush_all)(FLUSH_FORCED) };
        if flushed != 0 {
            return Err(format!(
                "CUPTI could not flush its records: {}",
                result_name(api, flushed)
            ));
        }
        let mut dropped = 0usize;
        // SAFETY: an out-pointer (records dropped and never handed to `completed` count too)
        let asked = unsafe { (api.dropped)(std::ptr::null_mut(), 0, &mut dropped) } == 0;
        let recs = RECORDS.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = Summary::from_records(&recs.kernels, &recs.copies, &recs.fills);
        s.dropped = recs.dropped + if asked { dropped as u64 } else { 0 };
        Ok(s)
    }
}

/// Starts recording the GPU's kernels, copies and fills (after the device has synchronised:
/// what runs from now on).
pub fn start() -> Result<(), String> {
    #[cfg(feature = "cupti")]
    return imp::start();
    #[cfg(not(feature = "cupti"))]
    Err(NOT_BUILT.into())
}

/// Stops recording (after the device has synchronised) and adds up what was recorded.
pub fn stop() -> Result<Summary, String> {
    #[cfg(feature = "cupti")]
    return imp::stop();
    #[cfg(not(feature = "cupti"))]
    Err(NOT_BUILT.into())
}

/// Whether this build can trace kernels.
pub fn compiled() -> bool {
    cfg!(feature = "cupti")
}

/// Whether a trace can start: the `cupti` feature and CUPTI's library found (loaded once); the
/// reason when not. For a benchmark to say so before its warm-up, not after.
pub fn available() -> Result<(), String> {
    #[cfg(feature = "cupti")]
    return imp::api().map(|_| ());
    #[cfg(not(feature = "cupti"))]
    Err(NOT_BUILT.into())
}

#[cfg(not(feature = "cupti"))]
const NOT_BUILT: &str = "kernel tracing needs a CUDA build with the `cupti` feature (the device bundle has it: \
                         `bash scripts/device-cudnn.sh --prepare`)";

#[cfg(test)]
mod tests {
    use super::*;

    /// Overlapping, nested, touching, disjoint and reversed intervals.
    #[test]
    fn the_union_counts_overlaps_once() {
        assert_eq!(union_ns(vec![]), 0);
        assert_eq!(union_ns(vec![(10, 20)]), 10);
        assert_eq!(union_ns(vec![(10, 20), (15, 30)]), 20);
        assert_eq!(union_ns(vec![(10, 40), (15, 30)]), 30);
        assert_eq!(union_ns(vec![(10, 20), (20, 30)]), 20);
        assert_eq!(union_ns(vec![(30, 40), (10, 20)]), 20);
        assert_eq!(union_ns(vec![(10, 20), (25, 5), (50, 50)]), 10);
    }

    /// A record without a time (start 0, or an end not after its start) counts as a launch of
    /// no length and stays out of the busy time and the span (a start of 0 made the span the
    /// whole clock reading).
    #[test]
    fn untimed_records_stay_out_of_the_span() {
        let k = |a: u64, b: u64| ("k".to_string(), a, b);
        let s = Summary::from_records(
            &[k(1_000, 2_000), k(0, 0), k(0, 1_500), k(3_000, 2_500)],
            &[],
            &[(0, 0)],
        );
        assert_eq!((s.busy_ns, s.span_ns, s.kernel_ns, s.untimed), (1_000, 1_000, 1_000, 4));
        assert_eq!(s.kernels[0].count, 4);
        assert!(s.table(1, 5).iter().any(|l| l.contains("4 records without a time")));
    }

    /// Kernels grouped by name, longest total first; busy and span over kernels, copies and
    /// fills; the table's per-step figures.
    #[test]
    fn records_add_up_by_name_and_step() {
        let k = |n: &str, a: u64, b: u64| (n.to_string(), a, b);
        let s = Summary::from_records(
            &[
                k("b", 1_000_000, 2_000_000),
                k("a", 2_000_000, 2_500_000),
                k("b", 3_000_000, 4_000_000),
                k("a", 4_000_000, 4_500_000),
            ],
            &[(5_000_000, 5_500_000, 1000)],
            &[(4_900_000, 5_100_000)],
        );
        assert_eq!(
            s.kernels,
            vec![
                KernelRow {
                    name: "b".into(),
                    count: 2,
                    total_ns: 2_000_000
                },
                KernelRow {
                    name: "a".into(),
                    count: 2,
                    total_ns: 1_000_000
                },
            ]
        );
        assert_eq!(
            (s.kernel_ns, s.copies, s.copy_ns, s.copy_bytes),
            (3_000_000, 1, 500_000, 1000)
        );
        assert_eq!((s.fills, s.fill_ns), (1, 200_000));
        // idle: 2.5-3.0 and 4.5-4.9 ms
        assert_eq!((s.busy_ns, s.span_ns), (3_600_000, 4_500_000));
        let t = s.table(2, 1);
        assert!(
            t[0].contains("busy 1.80 of 2.25 ms/step (80.0%; idle 0.45 ms/step"),
            "{}",
            t[0]
        );
        assert!(t[0].contains("kernels 1.50 ms/step in 2 launches/step"), "{}", t[0]);
        // by kind ("a" and "b" are no kind gz knows), then by name
        assert_eq!(t[1], "  by kind:");
        assert!(
            t[2].contains("1.500 ms/step") && t[2].ends_with("2.0/step  other"),
            "{}",
            t[2]
        );
        assert_eq!(t[3], "  by name:");
        assert!(t[4].contains("1.000 ms/step") && t[4].ends_with("  b"), "{}", t[4]);
        assert!(
            t[5].contains("0.500 ms/step") && t[5].contains("(1 other kernel)"),
            "{}",
            t[5]
        );
        assert!(
            t[6].contains("copies 0.250 ms/step (0.5/step, 0.0 MB/step)"),
            "{}",
            t[6]
        );
    }

    /// Long (mangled) names are cut for the table, not in the data.
    #[test]
    fn long_names_are_cut_in_the_table_only() {
        let name = "x".repeat(200);
        let s = Summary::from_records(&[(name.clone(), 0, 10)], &[], &[]);
        assert_eq!(s.kernels[0].name, name);
        let t = s.table(1, 5);
        let line = &t[t.iter().position(|l| l == "  by name:").expect("by name") + 1];
        assert!(line.ends_with(&format!("{}…", "x".repeat(89))), "{line}");
    }

    /// The shared rule file: every rule's kind is one of the table's kinds, every kind but
    /// "other" has a rule, and no rule is empty.
    #[test]
    fn the_kind_rules_are_whole() {
        let (order, rules) = kinds();
        assert_eq!(order.len(), 9, "{order:?}");
        assert_eq!(order.last(), Some(&"other"));
        for (kind, _, keys) in rules {
            assert!(order.contains(kind), "{kind}");
            assert!(!keys.is_empty(), "{kind}");
        }
        for kind in &order[..order.len() - 1] {
            assert!(rules.iter().any(|r| r.0 == *kind), "{kind} has no rule");
        }
    }

    /// Kernel names as CUPTI and torch.profiler give them, sorted into the kinds of work
    /// (the same rules as scripts/torch_trace.py's `category`), and the per-kind sums.
    #[test]
    fn kernels_are_sorted_into_kinds() {
        for (name, want) in [
            (
                "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64",
                "conv forward",
            ),
            ("_ZN5cudnn6detail23implicit_convolve_sgemmIffLi1024ELi5ELi5ELi3ELi3ELi3ELi1ELb1ELb0ELb1EEEviiiPKT_", "conv forward"),
            ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv backward-data"),
            ("sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv backward-filter"),
            ("_ZN5cudnn19cudnn_engine_dgrad_kernel", "conv backward-data"),
            ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
            ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
            ("cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>", "matmul"),
            ("relu_pool_bwd_nhwc_v_bf16", "pointwise and pooling"),
            ("bias_relu_pool_fwd_mask_nhwc_v_bf16", "pointwise and pooling"),
            ("bias_grad_finish_wide_bf16", "pointwise and pooling"),
            ("gz_dropout_bf16", "pointwise and pooling"),
            ("triton_poi_fused_convolution_relu_0", "pointwise and pooling"),
            ("triton_red_fused_convolution_backward_threshold_backward_2", "pointwise and pooling"),
            ("triton_tem_fused_mm_3", "matmul"),
            ("triton_red_fused_max_pool2d_with_indices_relu_threshold_backward_1", "pointwise and pooling"),
            (
                "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::launch_clamp_scalar>",
                "pointwise and pooling",
            ),
            ("void at::native::(anonymous namespace)::max_pool_backward_nhwc<c10::BFloat16, float>", "pointwise and pooling"),
            ("gz_rmsprop_bf16", "optimizer"),
            ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::FusedOptimizerTensorListMetadata<4>>", "optimizer"),
            ("gz_transpose_b16", "layout and copies"),
            ("ucopy_bf16", "layout and copies"),
            ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true, (cudnnKernelDataType_t)0>", "layout and copies"),
            ("dieleman_parts_bf16", "input resampling"),
            ("im2col_nhwc_bf16", "input resampling"),
            ("gz_tree_fwd_f32", "pointwise and pooling"),
            ("some_kernel_nobody_knows", "other"),
        ] {
            assert_eq!(category(name), want, "{name}");
            assert!(categories().contains(&want));
        }
        let s = Summary::from_records(
            &[
                ("sm90_xmma_fprop_x".to_string(), 1_000, 3_000),
                ("relu_pool_bwd_nhwc_v_bf16".to_string(), 3_000, 4_000),
                ("sm90_xmma_fprop_y".to_string(), 4_000, 5_000),
            ],
            &[],
            &[],
        );
        assert_eq!(
            s.by_category(),
            vec![("conv forward", 3_000, 2), ("pointwise and pooling", 1_000, 1)]
        );
    }

    /// The record layouts read: CUPTI 13.0's offsets (from its header, through `offsetof`).
    #[test]
    fn record_layouts_are_cuptis() {
        assert_eq!(std::mem::offset_of!(layout::Kernel, start), 16);
        assert_eq!(std::mem::offset_of!(layout::Kernel, end), 24);
        assert_eq!(std::mem::offset_of!(layout::Kernel, name), 104);
        assert_eq!(std::mem::offset_of!(layout::Transfer, bytes), 8);
        assert_eq!(std::mem::offset_of!(layout::Transfer, start), 16);
        assert_eq!(std::mem::offset_of!(layout::Transfer, end), 24);
    }

    #[cfg(not(feature = "cupti"))]
    #[test]
    fn without_the_feature_it_says_so() {
        assert!(start().unwrap_err().contains("`cupti` feature"));
        assert!(!compiled());
    }
}
