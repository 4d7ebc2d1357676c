//! `gz synth`: not built yet.

/// Arguments of `gz synth`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`gz synth` is not built yet")
}
