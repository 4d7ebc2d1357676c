//! `cargo xtask`: orchestration of the gz pipeline and of the CUDA build.
//!
//! xtask computes nothing itself: it builds the `gz` binary (crate `gz-cli`) with cargo, runs
//! its subcommands stage by stage and passes the artifact paths from one to the next
//! (`pipeline`, `synth`, `prep`, `train`, `eval`, `submit`); it installs what candle's `cuda`
//! feature needs on a machine without CUDA (`cuda-setup`) and packs a CUDA build of `gz` into a
//! folder that runs on a GPU machine without Rust (`build --cuda`). A flat dispatch: one module
//! per subcommand, arguments parsed by hand in [`args`] to keep xtask quick to compile.

mod args;
mod bundle;
mod cargo;
mod cuda_setup;
mod fingerprint;
mod gz;
mod lock;
mod pipeline;
mod stamp;

use anyhow::Result;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

Pipeline (artifacts under --root, default: the repository; data/, runs/, reports/ are git-ignored):
  pipeline            synth -> prep -> train -> eval -> submit, skipping stages that are up to date
  synth               write the default synthetic dataset (data/synth/)
  prep                preprocess a dataset into a shard cache (data/cache/)
  train               train a model on the cache (runs/<name>/)
  eval                score the run with baselines, write the report (reports/<name>/)
  submit              predict the test split and write the Kaggle submission (reports/<name>/submission.csv)

  options: --data DIR (a Kaggle download; no synth)   --train N --test M (synthetic set size; refused
           with --data)   --seed S (synthetic set and training)
           --model NAME --epochs N --device cpu|cuda[:N] --batch N --size PX --augment|--no-augment
           --precision f32|bf16 --tta N   (CPU defaults: tiny, or small from 5,000 training
           images (or --train-arg --max-train N of them), --size 32, batch 16, 40 epochs,
           --lr 2e-3 --schedule dieleman --patience 0, no augmentation, --tta 8: the measured
           CPU recipe, which --model dieleman-tiny also gets at --size 64 and --lr 1e-3;
           elsewhere 12 epochs and gz train's defaults)
           --train-arg ARG, --prep-arg ARG (repeatable, passed to `gz train`, `gz prep`)
           --cache DIR (a shard cache gz prep built, for train/eval/submit instead of the prep stage's:
           the pipeline skips prep; refused by prep, and with --size or --prep-arg)
           --name RUN (one plain folder name)   --root DIR
           --force (rerun even when up to date)   --debug (debug build of gz)   --cuda [--cudnn] (CUDA build)
           --gz PATH (use this gz binary, build nothing)

CUDA:
  cuda-setup [--dir DIR] [--compute-cap 90]
                      CUDA 13.0 toolkit from PyPI wheels + link stubs into DIR (default
                      target/cuda-toolkit), or an existing system toolkit; prints the environment
  build --cuda [--cudnn] [--out DIR] [--no-setup]
                      release gz with --features cuda (--cudnn: cudnn, gz-model's cuDNN
                      convolutions) in target/cuda, then a bundle folder (default target/bundle)
                      with run.sh for a GPU machine
";

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Err(err) = dispatch(argv) {
        if let Some(stopped) = err.downcast_ref::<gz::Stopped>() {
            eprintln!("xtask: {stopped}");
            std::process::exit(128 + stopped.signal);
        }
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn dispatch(argv: Vec<String>) -> Result<()> {
    let Some((cmd, rest)) = argv.split_first() else {
        print!("{USAGE}");
        return Ok(());
    };
    // `cargo xtask train --help`: the usage, not "unexpected argument --help" (a `--help` passed
    // through to gz with --train-arg/--prep-arg is gz's)
    if wants_help(rest) {
        print!("{USAGE}");
        return Ok(());
    }
    let args = args::Args::new(rest.to_vec());
    match cmd.as_str() {
        "pipeline" => pipeline::cmd_pipeline(args),
        "synth" | "prep" | "train" | "eval" | "submit" => pipeline::cmd_stage(cmd, args),
        "cuda-setup" => cuda_setup::cmd(args),
        "build" => bundle::cmd(args),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => anyhow::bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}

/// Whether `--help` or `-h` is one of xtask's own words (not the value of a pass-through option).
fn wants_help(rest: &[String]) -> bool {
    rest.iter().enumerate().any(|(i, a)| {
        (a == "--help" || a == "-h") && !(i > 0 && matches!(rest[i - 1].as_str(), "--train-arg" | "--prep-arg"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each command's `--help` / `-h` prints the usage (it was refused as an unexpected
    /// argument); passed through to gz with `--train-arg` it is gz's.
    #[test]
    fn help_after_a_command() {
        let v = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        for yes in ["--help", "-h", "--epochs 3 --help", "--train-arg --lr --help"] {
            assert!(wants_help(&v(yes)), "{yes}");
        }
        for no in ["", "--epochs 3", "--train-arg --help", "--prep-arg -h"] {
            assert!(!wants_help(&v(no)), "{no}");
        }
        assert!(dispatch(v("train --help")).is_ok());
        assert!(dispatch(v("cuda-setup -h")).is_ok());
    }
}
