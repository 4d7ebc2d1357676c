//! `gz eval`: not built yet.

/// Arguments of `gz eval`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`gz eval` is not built yet")
}
