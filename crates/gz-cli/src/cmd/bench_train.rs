//! `gz bench-train`: training throughput of a model on synthetic input (no cache needed).
//!
//! Builds the model with seeded weights, keeps a small pool of random images on the device
//! (as GPU-resident training does) and times `--steps` full training steps after `--warmup`
//! untimed ones, printing images/s and a per-phase breakdown (batch assembly, forward,
//! backward, optimizer; the device is synchronised between phases). The measurement itself is
//! `gz_model::train::bench`, so other phases (e.g. cuDNN-specific ones) can be added there.

use anyhow::Context;
use gz_model::optim::OptimizerKind;
use gz_model::train::Precision;

/// Arguments of `gz bench-train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model: vgg16-blog, dieleman, tiny, dieleman-tiny.
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
    /// Device: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Optimizer: rmsprop, sgd-nesterov, adamw.
    #[arg(long, default_value = "rmsprop")]
    optimizer: String,
    /// Input image size (square, 3 channels).
    #[arg(long, default_value_t = 106)]
    size: usize,
    /// Print the result as JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = super::train::model_config(&args.model, args.output.as_deref())?;
    let precision = Precision::from_name(&args.precision)
        .with_context(|| format!("unknown --precision {:?}: expected f32 or bf16", args.precision))?;
    let optimizer = OptimizerKind::from_name(&args.optimizer)
        .with_context(|| format!("unknown --optimizer {:?}: expected rmsprop, sgd-nesterov or adamw", args.optimizer))?;
    let device = gz_model::device::select_device(&args.device).with_context(|| format!("--device {}", args.device))?;
    let r = gz_model::train::bench(&model, [3, args.size, args.size], args.batch, precision, optimizer, args.steps, args.warmup, &device)
        .with_context(|| format!("benchmarking {}", args.model))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "bench-train model={} batch={} precision={} device={} steps={}: {:.1} images/s ({:.1} ms/step)",
        args.model, args.batch, args.precision, args.device, r.steps, r.images_per_s, r.step_ms
    );
    for (name, ms) in &r.phases {
        println!("  {name:<10} {ms:>9.2} ms/step");
    }
    Ok(())
}
