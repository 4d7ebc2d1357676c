//! `gz prep`: not built yet.

/// Arguments of `gz prep`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`gz prep` is not built yet")
}
