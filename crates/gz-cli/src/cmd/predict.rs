//! `gz predict`: not built yet.

/// Arguments of `gz predict`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`gz predict` is not built yet")
}
