//! Device selection: the one place that turns `--device cpu|cuda|cuda:N|auto` into a candle
//! [`Device`]. After this a `&Device` is passed explicitly everywhere (modelled on
//! `candle_examples::device`). CUDA support is the `cuda` cargo feature of this crate; without
//! it asking for CUDA is a clear error, never a silent fallback. `auto` picks `cuda:0` when the
//! feature is compiled in and a GPU answers, the CPU otherwise.
//!
//! A CUDA device opened here is tuned for one training process on one stream
//! ([`tune_cuda`]): cudarc's per-allocation event tracking is off (it creates two CUDA events
//! for every buffer, which only matter when several streams share buffers; gz uses one stream
//! on one thread), and the device's memory pool keeps freed memory instead of handing it back
//! to the driver at every synchronisation (which would unmap and remap the activations of every
//! step). [`set_cuda_defaults`]`(true)` (`gz` reads `GZ_CUDA_DEFAULTS=1`) keeps cudarc's and the
//! driver's defaults, to measure the difference.

use candle_core::Device;

/// Why a device could not be selected.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device string is not `cpu`, `cuda`, `cuda:N` or `auto`.
    #[error("unknown device {spec:?}; expected `cpu`, `cuda`, `cuda:N` or `auto`")]
    Unknown { spec: String },
    /// CUDA was asked for but this binary was built without the `cuda` feature.
    #[error(
        "device {spec:?} asked for CUDA, but this build has no CUDA support; rebuild with \
         `--features cuda` (e.g. `cargo xtask build --cuda`) or use `--device cpu`"
    )]
    CudaNotCompiled { spec: String },
    /// The CUDA device could not be opened (no GPU, bad ordinal, driver problem).
    #[error("CUDA device {ordinal} is not available: {source}")]
    CudaUnavailable {
        ordinal: usize,
        #[source]
        source: candle_core::Error,
    },
}

impl From<DeviceError> for candle_core::Error {
    fn from(e: DeviceError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// What a device string asks for, before any device is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
    /// CUDA 0 if compiled in and present, else the CPU.
    Auto,
}

/// Parses `cpu`, `cuda`, `cuda:N`, `auto` (case-insensitive, surrounding spaces ignored).
pub fn parse_device(spec: &str) -> Result<DeviceSpec, DeviceError> {
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
        "auto" => Ok(DeviceSpec::Auto),
        _ => {
            let n = s
                .strip_prefix("cuda:")
                .or_else(|| s.strip_prefix("gpu:"))
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| DeviceError::Unknown { spec: spec.to_string() })?;
            Ok(DeviceSpec::Cuda(n))
        }
    }
}

/// True when this build has the `cuda` feature.
pub fn cuda_compiled() -> bool {
    candle_core::utils::cuda_is_available()
}

/// Opens the device a `--device` string names.
pub fn select_device(spec: &str) -> Result<Device, DeviceError> {
    match parse_device(spec)? {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => {
            if !cuda_compiled() {
                return Err(DeviceError::CudaNotCompiled { spec: spec.to_string() });
            }
            let d = Device::new_cuda(ordinal).map_err(|source| DeviceError::CudaUnavailable { ordinal, source })?;
            tune_cuda(&d).map_err(|source| DeviceError::CudaUnavailable { ordinal, source })?;
            Ok(d)
        }
        DeviceSpec::Auto => {
            if cuda_compiled() {
                if let Ok(d) = Device::new_cuda(0) {
                    tune_cuda(&d).map_err(|source| DeviceError::CudaUnavailable { ordinal: 0, source })?;
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
    }
}

static CUDA_DEFAULTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The thread count candle splits CPU matmuls into (its default: the CPUs in
/// `CANDLE_CPU_MASK`, else the preferred cores, else the physical cores; or
/// `RAYON_NUM_THREADS` when set). Computing it reads /proc/cpuinfo; `gz` pins it once at start.
pub fn cpu_matmul_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Makes [`tune_cuda`] leave cudarc's and the driver's defaults alone (for devices opened
/// afterwards).
pub fn set_cuda_defaults(on: bool) {
    CUDA_DEFAULTS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`tune_cuda`] leaves the defaults alone ([`set_cuda_defaults`]).
pub fn cuda_defaults_requested() -> bool {
    CUDA_DEFAULTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Tunes a freshly opened CUDA device for a single-stream training process (see the module
/// docs); a no-op on the CPU, without the `cuda` feature, or after [`set_cuda_defaults`]`(true)`.
///
/// Call it before any tensor is created on the device: event tracking is decided per buffer
/// when the buffer is allocated.
pub fn tune_cuda(device: &Device) -> candle_core::Result<()> {
    if cuda_defaults_requested() {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // SAFETY: gz drives a device from one thread on one stream (candle's per-thread
        // stream; nothing in gz-model, gz-eval or gz-cli spawns threads that touch a device),
        // so no buffer is shared between streams and the events would only cost time.
        unsafe { d.disable_event_tracking() };
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("binding the CUDA context: {e:?}")))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: plain driver calls on a live device; `pool` is written by the first and
        // `threshold` outlives the second.
        unsafe {
            let r = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
            if r != sys::CUresult::CUDA_SUCCESS {
                // no memory pools (cudarc then allocates synchronously): nothing to tune
                return Ok(());
            }
            let mut threshold: u64 = u64::MAX;
            let r = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            );
            if r != sys::CUresult::CUDA_SUCCESS {
                candle_core::bail!("setting the CUDA memory pool's release threshold: {r:?}");
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok(())
}

/// A short human name of a device (`cpu`, `cuda:0`), for logs and sidecars.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(parse_device("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(parse_device(" CUDA ").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(parse_device("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        // `gpu` is an alias of `cuda`, with an ordinal too
        assert_eq!(parse_device("gpu:2").unwrap(), DeviceSpec::Cuda(2));
        assert_eq!(parse_device("auto").unwrap(), DeviceSpec::Auto);
        for bad in ["", "cuda:", "cuda:x", "tpu", "cuda:-1"] {
            let e = parse_device(bad).unwrap_err();
            assert!(e.to_string().contains("expected `cpu`"), "{bad}: {e}");
        }
    }

    #[test]
    fn cpu_and_auto_work() {
        assert!(select_device("cpu").unwrap().is_cpu());
        let auto = select_device("auto").unwrap();
        assert!(auto.is_cpu() || auto.is_cuda());
        assert_eq!(device_name(&Device::Cpu), "cpu");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let e = select_device("cuda:0").unwrap_err();
        assert!(matches!(e, DeviceError::CudaNotCompiled { .. }));
        assert!(e.to_string().contains("--features cuda"));
    }
}
