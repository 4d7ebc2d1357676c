//! `gz submit`: not built yet.

/// Arguments of `gz submit`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`gz submit` is not built yet")
}
