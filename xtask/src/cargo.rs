//! Building the `gz` binary with cargo: debug, release, or release with `--features cuda`.
//!
//! CPU builds use the workspace's target folder (or `CARGO_TARGET_DIR`); the CUDA build always
//! uses `target/cuda`, so switching the feature on and off never rebuilds the other one.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the folder above `xtask/`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().map_or_else(|| here.to_path_buf(), Path::to_path_buf)
}

/// How to build `gz`.
#[derive(Debug, Clone)]
pub struct Build {
    pub release: bool,
    /// `Some(env)`: build with `--features cuda` into `target/cuda` with this CUDA environment.
    pub cuda_env: Option<Vec<(String, String)>>,
    /// With `cuda_env`: also the `cudnn` feature (gz-model's cuDNN convolutions; implies `cuda`).
    pub cudnn: bool,
}

impl Build {
    pub fn target_dir(&self) -> PathBuf {
        let root = workspace_root();
        if self.cuda_env.is_some() {
            return root.join("target").join("cuda");
        }
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map(|p| if p.is_absolute() { p } else { root.join(p) })
            .unwrap_or_else(|| root.join("target"))
    }

    pub fn binary(&self) -> PathBuf {
        let profile = if self.release { "release" } else { "debug" };
        self.target_dir()
            .join(profile)
            .join(format!("gz{}", std::env::consts::EXE_SUFFIX))
    }

    /// The cargo command line, for messages and docs.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["build", "-p", "gz-cli", "--bin", "gz"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if self.release {
            a.push("--release".into());
        }
        if self.cuda_env.is_some() {
            let f = if self.cudnn { "cudnn" } else { "cuda" };
            a.extend(["--features".to_string(), f.to_string()]);
        }
        a
    }

    /// Runs cargo and returns the path of the built binary.
    pub fn run(&self) -> Result<PathBuf> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(&cargo);
        cmd.args(self.args()).current_dir(workspace_root());
        if let Some(env) = &self.cuda_env {
            cmd.env("CARGO_TARGET_DIR", self.target_dir());
            for (k, v) in env {
                cmd.env(k, v);
            }
        }
        eprintln!(
            "xtask: cargo {}{}",
            self.args().join(" "),
            if self.cuda_env.is_some() {
                "  (CARGO_TARGET_DIR=target/cuda)"
            } else {
                ""
            }
        );
        let status = cmd
            .status()
            .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
        if !status.success() {
            bail!("building gz failed ({status})");
        }
        let bin = self.binary();
        if !bin.is_file() {
            bail!("cargo succeeded but {} does not exist", bin.display());
        }
        Ok(bin)
    }
}
