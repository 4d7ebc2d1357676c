//! `gz bench-train`: training throughput of a model on synthetic input (no cache needed).
//!
//! Builds the model with seeded weights, keeps a small pool of random images on the device
//! (as GPU-resident training does) and times `--steps` full training steps after `--warmup`
//! untimed ones, printing images/s and a per-phase breakdown (batch assembly, forward,
//! backward, optimizer; the device is synchronised between phases; a CPU batch trained in parts,
//! `gz_model::parts`, has one "forward+backward" phase, its parts' passes overlapping). The measurement itself is
//! `gz_model::train::bench`, so other phases (e.g. cuDNN-specific ones) can be added there.
//!
//! With the `cudnn` feature on CUDA, `--conv cudnn` (the default there) runs the convolutions
//! and max-pools through `gz_model::cudnn`, `--conv candle` through candle's stock kernels; after
//! the timed run, a few more steps are run with per-call GPU timing to split the step into cuDNN
//! convolution (forward, backward-data, backward-filter, bias), pooling, and everything else.
//!
//! The `optimizer` phase is the whole parameter update; on CUDA with the `cudnn` feature it is
//! the fused update (one launch per 32 parameters, `gz_model::optim`), `--optimizer-path generic`
//! measures the candle-ops reference instead. The path used is printed (`optimizer_path`).

use anyhow::Context;
use gz_model::optim::OptimizerKind;
use gz_model::train::Precision;

/// Arguments of `gz bench-train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model: vgg16-blog, dieleman, tiny, small, dieleman-tiny.
    #[arg(long)]
    model: String,
    /// Output layer: sigmoid or tree (default: the model's own).
    #[arg(long)]
    output: Option<String>,
    /// Minibatch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Precision: f32 or bf16 (CUDA only).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Device: cpu, cuda, cuda:N, or auto (CUDA 0 when this build has CUDA and a GPU is present, else the CPU).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Optimizer: rmsprop, sgd-nesterov, adamw (training only: refused with --inference).
    #[arg(long, default_value = "rmsprop", conflicts_with = "inference")]
    optimizer: String,
    /// Input image size (square, 3 channels).
    #[arg(long, default_value_t = 106)]
    size: usize,
    /// Print the result as JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Convolution kernels: auto (cuDNN when built with the `cudnn` feature and on CUDA; gz's
    /// own f32 kernel on the CPU unless `GZ_CPU_CONV=candle`), cudnn, or candle (the stock
    /// kernels, the reference for comparisons).
    #[arg(long, default_value = "auto")]
    conv: String,
    /// Steps run with per-call cuDNN timing after the timed run (0 = no breakdown).
    #[arg(long, default_value_t = 5)]
    profile_steps: usize,
    /// Optimizer update: auto (as `GZ_OPTIM` says; by default the fused kernels on CUDA and
    /// gz's one-pass update on the CPU, both reported as "fused"), fused (the one-launch
    /// CUDA kernels, with the `cudnn` feature on CUDA) or generic (candle tensor ops). Training
    /// only: refused with --inference.
    #[arg(long, default_value = "auto", conflicts_with = "inference")]
    optimizer_path: String,
    /// Forward passes only (eval mode): inference images/s, as test-time augmentation needs.
    /// The training-only options (--optimizer, --optimizer-path) are refused with it.
    #[arg(long)]
    inference: bool,
    /// Synchronise the device once after the timed steps, not after every phase: the
    /// throughput of a real run (no per-phase breakdown). Use it to compare with PyTorch.
    #[arg(long)]
    pipelined: bool,
    /// Record every GPU kernel, copy and fill of the timed steps with CUPTI and print the
    /// longest kernels, the GPU's busy share and its idle time per step (`--json`: every
    /// kernel). Needs a CUDA device, CUPTI's libcupti.so, and a build with the `cupti` feature
    /// (`bash scripts/device-cudnn.sh --prepare` makes one, with libcupti beside it; `cargo xtask
    /// build --cuda --cudnn` does not).
    #[arg(long)]
    trace_kernels: bool,
}

/// Kernels the text report lists by name (the rest on one line; `--json` has them all).
const TRACE_TOP: usize = 30;

/// Most timed or warm-up steps: a measurement, not a training run (a mistyped count ran on
/// for ever).
const MAX_STEPS: usize = 1_000_000;

pub fn run(args: Args) -> anyhow::Result<()> {
    for (flag, n) in [
        ("--steps", args.steps),
        ("--warmup", args.warmup),
        ("--profile-steps", args.profile_steps),
    ] {
        if n > MAX_STEPS {
            anyhow::bail!("{flag} {n}: at most {MAX_STEPS} (a benchmark, not a training run)");
        }
    }
    let model = super::train::model_config(&args.model, args.output.as_deref())?;
    let precision = Precision::from_name(&args.precision)
        .with_context(|| format!("unknown --precision {:?}: expected f32 or bf16", args.precision))?;
    let optimizer = OptimizerKind::from_name(&args.optimizer).with_context(|| {
        format!(
            "unknown --optimizer {:?}: expected rmsprop, sgd-nesterov or adamw",
            args.optimizer
        )
    })?;
    let device = gz_model::device::select_device(&args.device).with_context(|| format!("--device {}", args.device))?;
    // reported by the device's own name (`cuda:0`, not `GPU` or `auto` as typed)
    let mut args = args;
    let typed = std::mem::replace(&mut args.device, gz_model::device::device_name(&device));
    match args.conv.as_str() {
        "auto" => gz_model::cudnn::set_enabled(true),
        "candle" => gz_model::cudnn::set_enabled(false),
        "cudnn" if !gz_model::cudnn::compiled() => {
            anyhow::bail!("--conv cudnn: this gz was built without the `cudnn` feature (cargo build --features cudnn)")
        }
        "cudnn" if !device.is_cuda() => {
            anyhow::bail!("--conv cudnn needs a CUDA device (--device {typed} is {})", args.device)
        }
        "cudnn" => gz_model::cudnn::set_enabled(true),
        other => anyhow::bail!("unknown --conv {other:?}: expected auto, cudnn or candle"),
    }
    match args.optimizer_path.as_str() {
        "auto" => {}
        "fused" => {
            gz_model::optim::set_fused_enabled(true);
            gz_model::optim::set_cpu_fused_enabled(true);
        }
        "generic" => {
            gz_model::optim::set_fused_enabled(false);
            gz_model::optim::set_cpu_fused_enabled(false);
        }
        other => anyhow::bail!("unknown --optimizer-path {other:?}: expected auto, fused or generic"),
    }
    let conv = if gz_model::cudnn::active_for(&device) {
        "cudnn"
    } else if device.is_cpu() && gz_model::cudnn::enabled() && gz_model::cpu_conv::enabled() {
        // gz's own f32 kernel (gz_model::cpu_conv); bf16 is CUDA-only
        "gz-cpu"
    } else {
        "candle"
    };
    let shape = [3, args.size, args.size];
    let mode = gz_model::train::BenchMode {
        inference: args.inference,
        pipelined: args.pipelined,
        trace: args.trace_kernels,
    };
    let r = gz_model::train::bench_with(
        &model,
        shape,
        args.batch,
        precision,
        optimizer,
        args.steps,
        args.warmup,
        &device,
        mode,
    )
    .with_context(|| format!("benchmarking {}", args.model))?;
    // The breakdown: a few more steps with every cuDNN call bracketed by CUDA events.
    let profile = if conv == "cudnn" && args.profile_steps > 0 {
        gz_model::cudnn::take_profile(&device).context("clearing the cuDNN profile")?;
        gz_model::cudnn::set_profiling(true);
        let p = gz_model::train::bench_with(
            &model,
            shape,
            args.batch,
            precision,
            optimizer,
            args.profile_steps,
            1,
            &device,
            gz_model::train::BenchMode {
                inference: args.inference,
                pipelined: false,
                trace: false,
            },
        );
        gz_model::cudnn::set_profiling(false);
        let p = p.with_context(|| format!("profiling {}", args.model))?;
        let prof = gz_model::cudnn::take_profile(&device).context("reading the cuDNN profile")?;
        // The profile covers warm-up + timed steps of the second run.
        Some((p, prof, (args.profile_steps + 1) as f64))
    } else {
        None
    };
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        add_setup(&mut v, &args, &model)?;
        v["conv"] = conv.into();
        if let Some(k) = &r.kernels {
            // ms per step by kind of work (gz_model::kernel_trace::category)
            let per = |ns: u64| ns as f64 / 1e6 / r.steps.max(1) as f64;
            v["kernels_by_kind"] = k
                .by_category()
                .into_iter()
                .map(|(c, ns, n)| {
                    (
                        c.to_string(),
                        serde_json::json!({"ms_per_step": per(ns), "launches": n}),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        if conv == "cudnn" && device.is_cuda() {
            v["fast_path"] = gz_model::cudnn::fast_path_summary(&device).into();
        }
        if let Some((p, prof, n)) = &profile {
            v["cudnn_ms_per_step"] = serde_json::json!({
                "profiled_step_ms": p.step_ms,
                "conv_fwd": prof.conv_fwd_ms / n,
                "conv_bwd_data": prof.conv_bwd_data_ms / n,
                "conv_bwd_filter": prof.conv_bwd_filter_ms / n,
                "bias": prof.bias_ms / n,
                "pool": prof.pool_ms / n,
            });
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "bench-train model={} size={} batch={} precision={} device={} conv={conv} mode={} optimizer={} ({}) steps={}: {:.1} images/s ({:.1} ms/step)",
        args.model,
        args.size,
        args.batch,
        args.precision,
        args.device,
        mode_name(&args),
        optimizer_name(&args),
        r.optimizer_path,
        r.steps,
        r.images_per_s,
        r.step_ms
    );
    if conv == "cudnn" && device.is_cuda() {
        println!("  fast path: {}", gz_model::cudnn::fast_path_summary(&device));
    }
    // (as wide as the longest name: a CPU batch trained in parts has one "forward+backward")
    let width = r.phases.iter().map(|(name, _)| name.len()).max().unwrap_or(0).max(10);
    for (name, ms) in &r.phases {
        println!("  {name:<width$} {ms:>9.2} ms/step");
    }
    if let Some(k) = &r.kernels {
        for line in k.table(r.steps, TRACE_TOP) {
            println!("  {line}");
        }
    }
    if let Some((p, prof, n)) = &profile {
        let conv_ms = prof.conv_ms() / n;
        let pool_ms = prof.pool_ms / n;
        println!(
            "  cuDNN breakdown over {} profiled steps ({:.2} ms/step with timing events, phases synchronised):",
            args.profile_steps, p.step_ms
        );
        println!("    conv forward      {:>9.2} ms/step", prof.conv_fwd_ms / n);
        println!("    conv bwd-data     {:>9.2} ms/step", prof.conv_bwd_data_ms / n);
        println!("    conv bwd-filter   {:>9.2} ms/step", prof.conv_bwd_filter_ms / n);
        println!("    conv bias fwd+bwd {:>9.2} ms/step", prof.bias_ms / n);
        println!("    max-pool fwd+bwd  {:>9.2} ms/step", pool_ms);
        println!(
            "    everything else   {:>9.2} ms/step (other kernels, optimizer, launch gaps)",
            p.step_ms - conv_ms - pool_ms
        );
        for line in gz_model::cudnn::plan_report() {
            println!("    plan: {line}");
        }
    }
    Ok(())
}

/// What was measured, so a saved JSON result says which model, size and device it is for (the
/// text line names them too).
fn add_setup(v: &mut serde_json::Value, args: &Args, model: &gz_model::config::ModelConfig) -> anyhow::Result<()> {
    v["model"] = args.model.clone().into();
    v["output"] = serde_json::to_value(model.output)?;
    v["size"] = args.size.into();
    v["precision"] = args.precision.clone().into();
    v["device"] = args.device.clone().into();
    v["optimizer"] = optimizer_name(args).into();
    v["warmup"] = args.warmup.into();
    v["mode"] = mode_name(args).into();
    Ok(())
}

/// The optimizer measured, by its own name (`adam` is `adamw`): none in inference mode (no
/// update runs).
fn optimizer_name(args: &Args) -> &str {
    if args.inference {
        "none"
    } else {
        match OptimizerKind::from_name(&args.optimizer) {
            Some(k) => k.name(),
            None => &args.optimizer,
        }
    }
}

/// `train` or `inference`, with `-pipelined` when the phases were not synchronised.
fn mode_name(args: &Args) -> String {
    let base = if args.inference { "inference" } else { "train" };
    if args.pipelined {
        format!("{base}-pipelined")
    } else {
        base.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn json_names_what_was_measured() {
        let args = Cli::parse_from([
            "bench-train",
            "--model",
            "tiny",
            "--size",
            "16",
            "--batch",
            "4",
            "--output",
            "tree",
        ])
        .args;
        let model = super::super::train::model_config(&args.model, args.output.as_deref()).unwrap();
        let mut v = serde_json::json!({"batch": 4, "steps": 10});
        add_setup(&mut v, &args, &model).unwrap();
        assert_eq!(v["model"], "tiny");
        assert_eq!(v["output"], "tree");
        assert_eq!(v["size"], 16);
        assert_eq!(v["precision"], "f32");
        assert_eq!(v["device"], "cpu");
        assert_eq!(v["optimizer"], "rmsprop");
        assert_eq!(v["warmup"], 2);
        assert_eq!(v["mode"], "train");
        // the optimizer by its own name, not as typed
        let args = Cli::parse_from(["bench-train", "--model", "tiny", "--optimizer", "ADAM"]).args;
        add_setup(&mut v, &args, &model).unwrap();
        assert_eq!(v["optimizer"], "adamw");
    }

    /// The training-only options are refused with --inference, by name, rather than ignored;
    /// left at their defaults they are no conflict.
    #[test]
    fn inference_refuses_training_only_options() {
        let base = ["bench-train", "--model", "tiny", "--inference"];
        for extra in [["--optimizer", "adamw"], ["--optimizer-path", "generic"]] {
            let e = Cli::try_parse_from(base.iter().chain(&extra))
                .err()
                .unwrap_or_else(|| panic!("{extra:?} accepted with --inference"))
                .to_string();
            assert!(e.contains(extra[0]) && e.contains("--inference"), "{e}");
        }
        let args = Cli::try_parse_from(base).unwrap().args;
        let model = super::super::train::model_config(&args.model, None).unwrap();
        let mut v = serde_json::json!({});
        add_setup(&mut v, &args, &model).unwrap();
        assert_eq!(v["optimizer"], "none");
        assert!(Cli::try_parse_from(["bench-train", "--model", "tiny", "--optimizer", "adamw"]).is_ok());
    }
}
