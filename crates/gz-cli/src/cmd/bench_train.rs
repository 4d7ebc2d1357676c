//! `gz bench-train`: not built yet.

/// Arguments of `gz bench-train`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`gz bench-train` is not built yet")
}
