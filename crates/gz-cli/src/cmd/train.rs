//! `gz train`: not built yet.

/// Arguments of `gz train`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`gz train` is not built yet")
}
