//! `gz`: the command-line front end of the Galaxy Zoo pipeline.
//!
//! A flat dispatch: each subcommand lives in `cmd/<name>.rs` with its own clap `Args`
//! and a `run` returning `anyhow::Result`. Errors are printed with their whole chain
//! (`{:#}`) and turn into exit status 1 (or the code a subcommand asks for).

mod cmd;
mod fault;
mod interrupt;
mod lock;
mod malloc;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "gz",
    version,
    about = "Galaxy Zoo morphology: synthesize, preprocess, train, evaluate, submit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Each subcommand takes `-1` as a value (refused as out of range, naming the flag) rather than
/// as an unknown flag ("unexpected argument '-1'").
#[derive(Debug, Subcommand)]
enum Command {
    /// Write a synthetic dataset in the Kaggle layout.
    #[command(allow_negative_numbers = true)]
    Synth(cmd::synth::Args),
    /// Preprocess JPEGs into memory-mapped f16 shards (cached).
    #[command(allow_negative_numbers = true)]
    Prep(cmd::prep::Args),
    /// List shard caches, prune the ones never used again, remove named ones.
    #[command(allow_negative_numbers = true)]
    Cache(cmd::cache::Args),
    /// Train a model from a shard cache.
    #[command(allow_negative_numbers = true)]
    Train(cmd::train::Args),
    /// Score a checkpoint against labelled data, with baselines.
    #[command(allow_negative_numbers = true)]
    Eval(cmd::eval::Args),
    /// Predict vote fractions (with optional TTA and ensembles).
    #[command(allow_negative_numbers = true)]
    Predict(cmd::predict::Args),
    /// Write or check a Kaggle submission file.
    #[command(allow_negative_numbers = true)]
    Submit(cmd::submit::Args),
    /// Measure training throughput of a model.
    #[command(allow_negative_numbers = true)]
    BenchTrain(cmd::bench_train::Args),
}

/// The libraries' `tracing` events as gz's own messages: `warning: …` and `error: …` (other
/// levels, shown only with `RUST_LOG`, which takes the log format instead, as `LEVEL: …`).
struct PlainMessages;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for PlainMessages
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        match *event.metadata().level() {
            tracing::Level::WARN => write!(writer, "warning: ")?,
            tracing::Level::ERROR => write!(writer, "error: ")?,
            other => write!(writer, "{other}: ")?,
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// A write to stdout or stderr failed (a full disk under `gz … > log`): the panic hook said so.
static OUTPUT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    /// This thread runs the command (`run`): a failed write here unwinds to `main` rather than
    /// exiting on the spot.
    static DISPATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn main() {
    // A closed output pipe (`gz … | head`) ends gz quietly, as it ends `cat`: Rust ignores
    // SIGPIPE, which turns the next print into a panic.
    #[cfg(unix)]
    // SAFETY: before any thread exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Before any thread exists: a shard that fails under its memory map is named (see `fault`).
    fault::install();
    // A full disk under `gz train > log` (or any stdout or stderr that cannot be written): a
    // message and exit status 1, not a panic with a backtrace (`println!` panics when its
    // write fails; a closed pipe is SIGPIPE's, above).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if let Some(rest) = msg
            .strip_prefix("failed printing to stdout: ")
            .map(|r| ("standard output", r))
            .or_else(|| {
                msg.strip_prefix("failed printing to stderr: ")
                    .map(|r| ("standard error", r))
            })
        {
            use std::io::Write as _;
            if !OUTPUT_FAILED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let _ = writeln!(
                    std::io::stderr(),
                    "error: gz cannot write to its {}: {}",
                    rest.0,
                    rest.1
                );
            }
            // on the thread running the command: unwind to `main`, so that what the command
            // holds (its folder lock files) is dropped and removed, then exit status 1 there
            if !DISPATCH.with(std::cell::Cell::get) {
                std::process::exit(1);
            }
            return;
        }
        default_hook(info);
    }));
    // Before any thread or large buffer exists (see `malloc`).
    let malloc_tuned = malloc::tune();
    let logging = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // colour only on a terminal: a redirected stderr (a log file, CI, xtask's capture) gets
        // plain text, not escape codes
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time();
    if std::env::var_os("RUST_LOG").is_some() {
        // a log, with the module paths, for whoever asked for one
        logging.with_target(true).init();
    } else {
        // the libraries' warnings read like gz's other messages (`warning: …`), not like log
        // lines (` WARN runs/x stopped after epoch 6 …`)
        logging.event_format(PlainMessages).init();
    }
    tracing::debug!(
        mmap_threshold = ?malloc_tuned,
        "host allocator tuning (None: glibc's defaults, e.g. with GZ_MALLOC=system)"
    );
    // (parsed through the matches, which say which options the command line gave: `gz train
    // --resume` takes the others from the run)
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
        .unwrap_or_else(|e| e.format(&mut <Cli as clap::CommandFactory>::command()).exit());
    let train_given = matches
        .subcommand_matches("train")
        .map(cmd::train::Given::of)
        .unwrap_or_default();
    if let Command::Train(a) = &mut cli.command {
        cmd::train::take_run_device(a, &train_given);
    }
    let model_device = cli.command.model_device().map(str::to_owned);
    // A model subcommand on the CPU runs on a worker of rayon's global pool, not on this
    // thread: gz's CPU kernels start thousands of small parallel loops per step, and from a
    // thread outside the pool each one is injected into the pool and waited for (a wake-up and
    // a sleep: a quarter of `tiny`'s step at 32 px went to scheduling). `GZ_RUN_ON_POOL=0`
    // keeps this thread, for comparisons. (CUDA runs stay here: not measured that way.) This
    // thread becomes the pool's worker 0 (`pin_candle_cpu_threads`), so it keeps glibc's main
    // arena for the run's large buffers, while the other workers allocate from their own (a
    // batch trained in parts, `gz_model::parts`, allocates on two threads at once).
    let on_pool = model_device.as_deref() == Some("cpu") && std::env::var("GZ_RUN_ON_POOL").map_or(true, |v| v != "0");
    if model_device.is_some() {
        pin_candle_cpu_threads(on_pool);
    }
    // Switches for comparisons (and work-arounds): when the variable has the value, the setter
    // is called with the flag.
    let switches: [Switch; 23] = [
        // the cuDNN fast path off for every subcommand (train, eval, predict), e.g. to compare
        // against candle's stock kernels or to work around a cuDNN fault
        ("GZ_CONV", "candle", gz_model::cudnn::set_enabled, false),
        // candle's CPU convolution instead of gz's own f32 kernel (gz_model::cpu_conv)
        ("GZ_CPU_CONV", "candle", gz_model::cpu_conv::set_enabled, false),
        // im2col + product for the valid stride-1 layers with few output channels instead of
        // the direct kernels (Dieleman's image layer; gz_model::cpu_conv)
        ("GZ_CPU_DIRECT", "0", gz_model::cpu_conv::set_direct, false),
        // CPU training builds conv, ReLU and pooling as separate graph nodes (candle's ReLU)
        // instead of one fused op per layer
        ("GZ_CPU_FUSED", "0", gz_model::cudnn::set_cpu_fused, false),
        // parameter gradients through candle's zero-fill-and-add accumulation
        // (gz_model::grad_sink)
        ("GZ_GRAD_SINK", "0", gz_model::grad_sink::set_enabled, false),
        // the convolution towers channels-last everywhere the custom ops run, the CPU too
        // (CUDA runs them channels-last by default; `0` runs CUDA's NCHW)
        ("GZ_NHWC", "1", gz_model::cudnn::set_nhwc, true),
        ("GZ_NHWC", "0", gz_model::cudnn::set_nhwc_on_cuda, false),
        // with channels-last, the 3-channel image layer channels-last too (the default: no
        // permutation of the first convolution's output and its gradient), its channels
        // zero-padded to 8 for cuDNN's NHWC tensor-core kernels where the filter is 3×3 (by
        // default), never (`1`) or always (`pad`); `0` starts channels-last at the first layer
        // with a multiple of 8 input channels
        ("GZ_NHWC_IMAGE", "0", gz_model::cudnn::set_nhwc_image, false),
        ("GZ_NHWC_IMAGE", "1", gz_model::cudnn::set_nhwc_image, true),
        ("GZ_NHWC_IMAGE", "1", gz_model::cudnn::set_nhwc_image_padded, false),
        ("GZ_NHWC_IMAGE", "pad", gz_model::cudnn::set_nhwc_image, true),
        ("GZ_NHWC_IMAGE", "pad", gz_model::cudnn::set_nhwc_image_padded, true),
        // the channels-last image layers as im2col + cuBLAS products instead of cuDNN (off
        // until a device run has measured it; gz_model::cudnn::set_image_gemm)
        ("GZ_IMAGE_GEMM", "1", gz_model::cudnn::set_image_gemm, true),
        // … its forward pass only (the filter gradient by cuDNN)
        ("GZ_IMAGE_GEMM", "fwd", gz_model::cudnn::set_image_gemm, true),
        (
            "GZ_IMAGE_GEMM",
            "fwd",
            gz_model::cudnn::set_image_gemm_bwd_filter,
            false,
        ),
        // … its filter gradient as one product, cuBLAS choosing how to split it (by default
        // gz cuts the rows into parts, one strided-batched call, then adds the parts)
        ("GZ_IMAGE_GEMM", "cublas", gz_model::cudnn::set_image_gemm, true),
        ("GZ_IMAGE_GEMM", "cublas", gz_model::cudnn::set_image_gemm_split, false),
        // the bias gradient's finish by a block per channel (off until a device run has
        // measured it; gz_model::cudnn::set_wide_bias_finish)
        ("GZ_BIAS_FINISH", "wide", gz_model::cudnn::set_wide_bias_finish, true),
        // the pooled channels-last layers keep one byte per pooled value for their backward
        // pass instead of their ReLU output (off until a device run has measured it;
        // gz_model::cudnn::set_pool_mask)
        ("GZ_POOL_MASK", "1", gz_model::cudnn::set_pool_mask, true),
        // the channels-last epilogue kernels one value per thread instead of 16 bytes of
        // channels (gz_model::cudnn::set_nhwc_vectorised)
        ("GZ_NHWC_VEC", "0", gz_model::cudnn::set_nhwc_vectorised, false),
        // the channels-last towers' layout changes on CUDA through candle's strided copy
        // instead of gz's tiled transpose kernel (gz_model::cudnn::layout)
        ("GZ_LAYOUT_KERNEL", "0", gz_model::cudnn::layout::set_enabled, false),
        // on the fused path each convolution tower is one autograd node with its own backward
        // pass; this runs the layers one by one, to measure the difference
        ("GZ_TOWER_OP", "0", gz_model::cudnn::set_tower_op, false),
        // CUDA devices opened with cudarc's per-buffer events and the driver's memory-pool
        // trimming, as before gz tuned them (gz_model::device)
        ("GZ_CUDA_DEFAULTS", "1", gz_model::device::set_cuda_defaults, true),
    ];
    for (var, value, set, flag) in switches {
        if std::env::var(var).is_ok_and(|v| v == value) {
            set(flag);
        }
    }
    // `GZ_CPU_WINOGRAD=0`: gz's CPU convolution without Winograd (im2col + product for every
    // layer); `GZ_CPU_WINOGRAD=2`: Winograd F(2×2, 3×3) only (no 4×4 tiles), for comparisons.
    match std::env::var("GZ_CPU_WINOGRAD").as_deref() {
        Ok("0") => gz_model::cpu_conv::set_winograd(false),
        Ok("2") => gz_model::cpu_conv::set_winograd_large_tiles(false),
        _ => {}
    }
    // The fast path's own kernels are on by default since the 2026-11-30 device run checked
    // them (docs/cudnn.md); for comparisons `GZ_FUSED=0` drops the fused bias + ReLU (outside
    // the channels-last towers, which always use it: with `GZ_NHWC=0` everywhere),
    // `GZ_OPTIM=generic` the one-launch optimizer update, `GZ_RESAMPLE=ops` the resampling /
    // Dieleman-parts kernel, `GZ_NHWC=0` channels-last on CUDA.
    match std::env::var("GZ_FUSED").as_deref() {
        Ok("1") => gz_model::cudnn::set_fused(true),
        Ok("0") => gz_model::cudnn::set_fused(false),
        _ => {}
    }
    match std::env::var("GZ_RESAMPLE").as_deref() {
        Ok("kernel") => gz_model::augment::set_resample_kernels(true),
        // candle's ops everywhere: neither the CUDA kernels nor their CPU twin (on by default)
        Ok("ops") => {
            gz_model::augment::set_resample_kernels(false);
            gz_model::augment::set_resample_cpu(false);
        }
        _ => {}
    }
    // On the fused path conv + bias + ReLU (+ 2×2 max-pool) are one op each; `GZ_CONV_RELU_OP=0`
    // and `GZ_FUSED_POOL=0` build the split graphs, to measure the difference.
    gz_model::cudnn::set_single_ops(
        std::env::var("GZ_CONV_RELU_OP").map_or(true, |v| v != "0"),
        std::env::var("GZ_FUSED_POOL").map_or(true, |v| v != "0"),
    );
    match std::env::var("GZ_OPTIM").as_deref() {
        Ok("fused") => gz_model::optim::set_fused_enabled(true),
        Ok("generic") => {
            gz_model::optim::set_fused_enabled(false);
            gz_model::optim::set_cpu_fused_enabled(false);
        }
        _ => {}
    }
    warn_unknown_switch_values(&switches);
    // `GZ_OPTIM_TENSORS=N`: at most N parameter tensors per launch of the fused update (1 = one
    // launch per tensor, the comparison for the multi-tensor launch; 32 by default).
    count_switch("GZ_OPTIM_TENSORS", 32, gz_model::optim::set_tensors_per_launch);
    // `GZ_CPU_PARTS=N`: a CPU training batch is cut into N parts trained side by side
    // (gz_model::parts; 1 trains every batch whole, as before the parts existed).
    count_switch("GZ_CPU_PARTS", 64, gz_model::parts::set_parts);
    let dispatch = move || {
        DISPATCH.with(|d| d.set(true));
        let r = run(cli.command, &train_given);
        DISPATCH.with(|d| d.set(false));
        r
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if on_pool {
            rayon::scope(|_| dispatch())
        } else {
            dispatch()
        }
    }));
    let result = match result {
        Ok(r) => r,
        // the panic hook has said which output failed; the command's locks are dropped by now
        Err(_) if OUTPUT_FAILED.load(std::sync::atomic::Ordering::SeqCst) => std::process::exit(1),
        Err(payload) => std::panic::resume_unwind(payload),
    };
    if let Err(err) = result {
        // a bare `ExitCode`: the subcommand has said what happened
        let bare = err.chain().count() == 1 && err.is::<ExitCode>();
        if !bare {
            eprintln!("error: {}", error_message(&err));
        }
        // A subcommand may ask for a specific exit code by returning `ExitCode`.
        let code = err.downcast_ref::<ExitCode>().map_or(1, |c| c.0);
        std::process::exit(code);
    }
}

/// A `GZ_*` switch holding a whole number from 1 to `max`, passed to `set` when the variable is
/// set; any other value ends gz with status 2, naming the variable.
fn count_switch(var: &str, max: usize, set: fn(usize)) {
    if let Ok(v) = std::env::var(var) {
        match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => set(n),
            _ => {
                eprintln!("error: {var} must be a whole number from 1 to {max}, not {v:?}");
                std::process::exit(2);
            }
        }
    }
}

/// The values each documented `GZ_*` switch acts on, besides those in `switches` (the table in
/// `main`); a switch set to anything else changes nothing, so it is named on stderr instead of
/// being ignored in silence (`GZ_CPU_WINOGRAD=off` left Winograd on).
const OTHER_SWITCH_VALUES: [(&str, &[&str]); 8] = [
    ("GZ_CPU_WINOGRAD", &["0", "2"]),
    ("GZ_FUSED", &["0", "1"]),
    ("GZ_RESAMPLE", &["kernel", "ops"]),
    ("GZ_CONV_RELU_OP", &["0", "1"]),
    ("GZ_FUSED_POOL", &["0", "1"]),
    ("GZ_OPTIM", &["fused", "generic"]),
    ("GZ_MALLOC", &["system"]),
    ("GZ_RUN_ON_POOL", &["0", "1"]),
];

/// Warns about documented `GZ_*` switches set to a value that does nothing.
fn warn_unknown_switch_values(switches: &[Switch]) {
    let mut known: Vec<(&str, Vec<&str>)> = OTHER_SWITCH_VALUES
        .iter()
        .map(|(v, vals)| (*v, vals.to_vec()))
        .collect();
    for (var, value, _, _) in switches {
        match known.iter_mut().find(|(v, _)| v == var) {
            // (one value may call several setters: name it once)
            Some((_, vals)) if vals.contains(value) => {}
            Some((_, vals)) => vals.push(value),
            None => known.push((var, vec![value])),
        }
    }
    for (var, vals) in known {
        if let Ok(v) = std::env::var(var) {
            if !vals.contains(&v.as_str()) {
                eprintln!(
                    "warning: {var}={v:?} does nothing (it acts on {}); see docs/training.md (CPU) and docs/cudnn.md (CUDA)",
                    vals.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(" or ")
                );
            }
        }
    }
}

/// The error and its causes, `: `-separated like anyhow's `{:#}`, leaving out a cause whose
/// text the message already holds (typed errors that print their source and also expose it as
/// `source()` would otherwise say "No such file or directory (os error 2)" twice).
fn error_message(err: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

/// Runs one subcommand.
fn run(command: Command, given: &cmd::train::Given) -> anyhow::Result<()> {
    match command {
        Command::Synth(a) => cmd::synth::run(a),
        Command::Prep(a) => cmd::prep::run(a),
        Command::Cache(a) => cmd::cache::run(a),
        Command::Train(a) => cmd::train::run(a, given),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Predict(a) => cmd::predict::run(a),
        Command::Submit(a) => cmd::submit::run(a),
        Command::BenchTrain(a) => cmd::bench_train::run(a),
    }
}

impl Command {
    /// The `--device` of the model subcommands (train, eval, predict, bench-train).
    fn model_device(&self) -> Option<&str> {
        match self {
            Command::Train(a) => Some(&a.device),
            Command::Eval(a) => Some(&a.device),
            Command::Predict(a) => Some(&a.source.device),
            Command::BenchTrain(a) => Some(&a.device),
            // predicting first (`--run`) runs a model
            Command::Submit(a) => a.model_device(),
            Command::Synth(_) | Command::Prep(_) | Command::Cache(_) => None,
        }
    }
}

/// An error that carries the exit status the process should end with
/// (e.g. `gz prep` exits 2 when some inputs were skipped).
#[derive(Debug)]
pub struct ExitCode(pub i32);

impl std::fmt::Display for ExitCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitCode {}

/// An environment switch: (variable, value, setter, flag passed to the setter).
type Switch = (&'static str, &'static str, fn(bool), bool);

/// candle 0.11.1 sizes every CPU matmul with its default thread count, which on Linux calls
/// `num_cpus::get_physical()`, reading and parsing /proc/cpuinfo, on each call (about 145 times
/// per `tiny` training step: 7-16 % of CPU training time, docs/benchmarks.md), unless
/// RAYON_NUM_THREADS is set. So the model subcommands compute candle's count once and set
/// RAYON_NUM_THREADS to it (a value the user set is kept), and first build rayon's global pool
/// at the size rayon would give it, so that every pool and every matmul split stays as it was.
/// Runs before any thread exists (setting a variable later would race with readers).
/// `on_pool`: this thread becomes the pool's worker 0 (`use_current_thread`).
fn pin_candle_cpu_threads(on_pool: bool) {
    // rayon's own reading of the variable the user set (0 or unset: one thread per processor)
    let asked = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let threads = asked.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if asked.is_none() {
        std::env::set_var("RAYON_NUM_THREADS", gz_model::device::cpu_matmul_threads().to_string());
    }
    // the global pool at rayon's own size (not the variable just set); on the CPU this thread
    // is its worker 0, so the run's parallel loops start here without a wake-up, and its
    // tensors come from glibc's main arena (see `malloc`). An error only means the pool exists.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .use_current_thread_if(on_pool)
        .build_global();
}

/// `use_current_thread` when asked.
trait UseCurrentThreadIf {
    fn use_current_thread_if(self, yes: bool) -> Self;
}

impl UseCurrentThreadIf for rayon::ThreadPoolBuilder {
    fn use_current_thread_if(self, yes: bool) -> Self {
        if yes {
            self.use_current_thread()
        } else {
            self
        }
    }
}

#[cfg(test)]
mod tests {
    /// A cause that the message already quotes is not repeated; new causes are added.
    #[test]
    fn error_messages_say_each_reason_once() {
        #[derive(Debug)]
        struct Quoting(std::io::Error);
        impl std::fmt::Display for Quoting {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "nope.csv: {}", self.0)
            }
        }
        impl std::error::Error for Quoting {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let err = anyhow::Error::new(Quoting(io)).context("reading the labels");
        assert_eq!(
            super::error_message(&err),
            "reading the labels: nope.csv: No such file or directory"
        );
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_message(&err), "outer: inner");
    }
}
