//! `cargo xtask build --cuda`: the release `gz` with `--features cuda`, packed into a folder
//! that runs on a GPU machine with no Rust and no network.
//!
//! The bundle (default `target/bundle/`) holds the stripped binary (gzipped when over 20 MB),
//! `run.sh` (finds the CUDA libraries the binary links against, see `run.sh` beside this file),
//! `scripts/device-full-scale.sh`, the PyTorch peer benchmark from `../shared/bench/` when it
//! is there, and `BUNDLE.txt` (commit, command, sizes, libraries). It must stay under 60 MiB.

use crate::args::Args;
use crate::cargo::{workspace_root, Build};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The run script, with `@REQUIRED_LIBS@` to fill in.
pub const RUN_SH: &str = include_str!("run.sh");
/// Libraries assumed when the binary's dynamic section cannot be read.
const FALLBACK_LIBS: &[&str] = &[
    "libcuda.so.1",
    "libcudart.so.13",
    "libcublas.so.13",
    "libcublasLt.so.13",
    "libcurand.so.10",
    "libnvrtc.so.13",
];
/// Libraries loaded at run time by some paths (cuBLAS loads cuBLASLt; NVRTC; cuDNN with the
/// `cudnn` feature): `run.sh` adds their folders when it finds them.
const OPTIONAL_LIBS: &[&str] = &["libcublasLt.so.13", "libnvrtc.so.13", "libcudnn.so.9"];
/// Scripts from `scripts/` that run from inside the bundle.
const BUNDLED_SCRIPTS: &[&str] = &["device-full-scale.sh"];
const GZIP_OVER: u64 = 20 * 1024 * 1024;
const LIMIT: u64 = 60 * 1024 * 1024;

/// The CUDA libraries among `readelf -d` output's NEEDED entries.
pub fn cuda_needed(readelf_out: &str) -> Vec<String> {
    let mut v: Vec<String> = readelf_out
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.split(']').next()?.to_string()))
        .filter(|n| {
            [
                "libcuda.",
                "libcudart",
                "libcublas",
                "libcurand",
                "libnvrtc",
                "libcudnn",
                "libnccl",
                "libcufft",
                "libcusparse",
                "libcusolver",
            ]
            .iter()
            .any(|p| n.starts_with(p))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// `run.sh` for a binary needing `libs`.
pub fn run_sh(libs: &[String]) -> String {
    RUN_SH
        .replace("@REQUIRED_LIBS@", &libs.join(" "))
        .replace("@OPTIONAL_LIBS@", &OPTIONAL_LIBS.join(" "))
}

fn sh(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn size_of_tree(p: &Path) -> u64 {
    if p.is_dir() {
        std::fs::read_dir(p)
            .map(|d| d.flatten().map(|e| size_of_tree(&e.path())).sum())
            .unwrap_or(0)
    } else {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1024.0 / 1024.0)
}

/// Writes the bundle for `binary` into `out` (replacing it).
pub fn write_bundle(binary: &Path, out: &Path, build_cmd: &str) -> Result<u64> {
    let root = workspace_root();
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing the old bundle {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("bench"))?;
    let gz = out.join("gz");
    if sh(Command::new("strip").arg("--strip-all").arg("-o").arg(&gz).arg(binary)).is_err() {
        eprintln!("xtask: `strip` failed or is missing: bundling the unstripped binary");
        std::fs::copy(binary, &gz)?;
    }
    let libs = match sh(Command::new("readelf").arg("-d").arg(&gz)) {
        Ok(o) if !cuda_needed(&o).is_empty() => cuda_needed(&o),
        _ => {
            eprintln!("xtask: could not read the binary's NEEDED libraries; assuming the usual CUDA set");
            FALLBACK_LIBS.iter().map(|s| s.to_string()).collect()
        }
    };
    let raw = std::fs::metadata(&gz)?.len();
    let mut carried = "gz".to_string();
    if raw > GZIP_OVER {
        sh(Command::new("gzip").args(["-6", "-n", "-f"]).arg(&gz))?;
        carried = "gz.gz".into();
    }
    let run = out.join("run.sh");
    std::fs::write(&run, run_sh(&libs))?;
    // Scripts written to run from inside the bundle (others in scripts/ expect the repository).
    let mut copied = Vec::new();
    for name in BUNDLED_SCRIPTS {
        let src = root.join("scripts").join(name);
        if src.is_file() {
            std::fs::copy(&src, out.join(name))?;
            copied.push(name.to_string());
        } else {
            eprintln!("xtask: {} not found: not bundled", src.display());
        }
    }
    let peer = root.join("../shared/bench/torch_peer.py");
    if peer.is_file() {
        std::fs::copy(&peer, out.join("bench/torch_peer.py"))?;
        copied.push("bench/torch_peer.py".into());
    } else {
        eprintln!(
            "xtask: {} not found: the bundle has no PyTorch peer benchmark",
            peer.display()
        );
    }
    use std::os::unix::fs::PermissionsExt;
    for f in std::iter::once("run.sh".to_string()).chain(copied.iter().filter(|c| c.ends_with(".sh")).cloned()) {
        std::fs::set_permissions(out.join(&f), std::fs::Permissions::from_mode(0o755))?;
    }
    let commit = sh(Command::new("git").args(["rev-parse", "HEAD"]).current_dir(&root))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let dirty = sh(Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(&root))
    .map(|s| !s.trim().is_empty())
    .unwrap_or(false);
    let total = size_of_tree(out);
    let info = format!(
        "gz CUDA bundle\ncommit: {commit}{}\nbuilt with: {build_cmd}\nbinary: {carried} ({} stripped, {} carried)\nCUDA libraries needed: {}\nfiles: run.sh {}\ntotal: {}\nrun: ./run.sh --check; ./run.sh <gz arguments>\n",
        if dirty { " (with uncommitted changes)" } else { "" },
        mib(raw),
        mib(std::fs::metadata(out.join(&carried))?.len()),
        libs.join(" "),
        copied.join(" "),
        mib(total),
    );
    std::fs::write(out.join("BUNDLE.txt"), &info)?;
    if total > LIMIT {
        bail!(
            "the bundle {} is {}, over the {} limit",
            out.display(),
            mib(total),
            mib(LIMIT)
        );
    }
    Ok(total)
}

/// `cargo xtask build --cuda [--cudnn] [--out DIR] [--no-setup] [--binary PATH]`.
pub fn cmd(mut a: Args) -> Result<()> {
    let cuda = a.flag("--cuda");
    let cudnn = a.flag("--cudnn");
    let no_setup = a.flag("--no-setup");
    let cwd = std::env::current_dir()?;
    let out = a.path("--out")?.map(|p| if p.is_absolute() { p } else { cwd.join(p) });
    let binary = a.path("--binary")?;
    a.finish()?;
    if !cuda {
        bail!("`cargo xtask build` only makes the CUDA bundle: use `cargo xtask build --cuda` (the CPU build is plain `cargo build --release -p gz-cli`)");
    }
    let out = out.unwrap_or_else(|| workspace_root().join("target").join("bundle"));
    let build_cmd = format!(
        "CARGO_TARGET_DIR=target/cuda cargo build --release -p gz-cli --bin gz --features {}",
        if cudnn { "cudnn" } else { "cuda" }
    );
    let bin: PathBuf = match binary {
        // an already-built binary (for tests of the packing step)
        Some(b) => b,
        None => {
            let env = if no_setup {
                let root = crate::cuda_setup::default_dir().join("cuda");
                crate::cuda_setup::Toolkit {
                    root,
                    source: crate::cuda_setup::Source::Existing,
                }
                .env(
                    &std::env::var("CUDA_COMPUTE_CAP")
                        .unwrap_or_else(|_| crate::cuda_setup::DEFAULT_COMPUTE_CAP.into()),
                )
            } else {
                crate::cuda_setup::ensure_default()?
            };
            Build {
                release: true,
                cuda_env: Some(env),
                cudnn,
            }
            .run()?
        }
    };
    let total = write_bundle(&bin, &out, &build_cmd)?;
    eprint!(
        "{}",
        std::fs::read_to_string(out.join("BUNDLE.txt")).unwrap_or_default()
    );
    println!("bundle: {} ({})", out.display(), mib(total));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn needed_cuda_libraries_from_readelf() {
        let o = " 0x0000000000000001 (NEEDED)             Shared library: [libcublas.so.13]\n 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]\n 0x0000000000000001 (NEEDED)             Shared library: [libcuda.so.1]\n 0x000000000000000e (SONAME) x\n";
        assert_eq!(cuda_needed(o), vec!["libcublas.so.13", "libcuda.so.1"]);
    }

    /// A bundle folder with a fake `gz` (a shell script echoing its arguments) and run.sh.
    fn fake_bundle(t: &Path, libs: &[&str]) -> PathBuf {
        let b = t.join("bundle");
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(
            b.join("gz"),
            "#!/bin/sh\necho \"gz-args: $*\"\necho \"ld: $LD_LIBRARY_PATH\"\n",
        )
        .unwrap();
        std::fs::set_permissions(b.join("gz"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let libs: Vec<String> = libs.iter().map(|s| s.to_string()).collect();
        std::fs::write(b.join("run.sh"), run_sh(&libs)).unwrap();
        b
    }

    fn run_sh_with(bundle: &Path, lib_path: &str, args: &[&str]) -> std::process::Output {
        Command::new("bash")
            .arg(bundle.join("run.sh"))
            .args(args)
            .env("GZ_LIB_PATH", lib_path)
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .unwrap()
    }

    #[test]
    fn run_sh_names_a_missing_library() {
        let t = tempfile::tempdir().unwrap();
        let b = fake_bundle(t.path(), &["libcuda.so.1", "libcublas.so.13"]);
        let libs = t.path().join("libs");
        std::fs::create_dir_all(&libs).unwrap();
        std::fs::write(libs.join("libcuda.so.1"), b"").unwrap();
        let out = run_sh_with(&b, libs.to_str().unwrap(), &["train", "--device", "cuda"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(127), "{err}");
        assert!(err.contains("missing CUDA libraries: libcublas.so.13"), "{err}");
        assert!(
            err.contains("libcuda.so.1") && err.contains(&libs.display().to_string()),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "gz must not run");
    }

    #[test]
    fn run_sh_sets_the_path_and_passes_arguments() {
        let t = tempfile::tempdir().unwrap();
        let b = fake_bundle(t.path(), &["libcuda.so.1", "libcublas.so.13"]);
        let (l1, l2) = (t.path().join("drv"), t.path().join("wheel lib"));
        for (d, f) in [(&l1, "libcuda.so.1"), (&l2, "libcublas.so.13")] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join(f), b"").unwrap();
        }
        let search = format!("{}:{}:{}", t.path().join("empty").display(), l1.display(), l2.display());
        let out = run_sh_with(&b, &search, &["eval", "--run", "a b"]);
        let (so, se) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{se}");
        assert!(so.contains("gz-args: eval --run a b"), "{so}");
        assert!(so.contains(&format!("ld: {}:{}", l1.display(), l2.display())), "{so}");
        assert!(se.contains("libcublas.so.13") && se.contains("GPU:"), "{se}");
    }

    #[test]
    fn run_sh_unpacks_a_gzipped_binary() {
        let t = tempfile::tempdir().unwrap();
        let b = fake_bundle(t.path(), &["libcuda.so.1"]);
        let st = Command::new("gzip").arg("-n").arg(b.join("gz")).status().unwrap();
        assert!(st.success());
        assert!(!b.join("gz").exists());
        let libs = t.path().join("libs");
        std::fs::create_dir_all(&libs).unwrap();
        std::fs::write(libs.join("libcuda.so.1"), b"").unwrap();
        let out = run_sh_with(&b, libs.to_str().unwrap(), &["--version"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("gz-args: --version"));
        assert!(b.join("gz").exists());
    }
}
