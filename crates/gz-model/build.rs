//! Compiles the crate's own CUDA kernels (`src/kernels/*.cu`) to PTX with nvcc, only when the
//! `cuda` feature is on. The PTX is embedded with `include_str!` and loaded through candle's
//! `CudaDevice::get_or_load_custom_func`, the way candle ships its own kernels.
//!
//! nvcc is looked up as candle-kernels' build does: `$CUDA_ROOT`, `$CUDA_HOME`, `$CUDA_PATH`
//! (each `<root>/bin/nvcc`), then `nvcc` on `PATH`. `cargo xtask cuda-setup` installs one and
//! prints the environment line. The virtual architecture is `compute_$CUDA_COMPUTE_CAP` (90 when
//! unset: the H200), so the driver JIT-compiles the PTX for the GPU it runs on.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/kernels");
    // (the environment only after the feature check: a CPU build watched PATH too, and a shell
    // that changes it (a venv, pyenv) rebuilt gz-model and everything above it every time)
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = find_nvcc().unwrap_or_else(|| {
        panic!(
            "gz-model's `cuda` feature needs nvcc to compile src/kernels/*.cu: set CUDA_ROOT (or put nvcc \
             on PATH); `cargo xtask cuda-setup` installs a toolkit and prints the line to export"
        )
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim().replace('.', ""))
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "90".into());
    let cap = cap.trim_end_matches(['a', 'f']).to_string();
    let mut sources: Vec<PathBuf> = std::fs::read_dir("src/kernels")
        .expect("src/kernels exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        let stem = src.file_stem().expect("a file name").to_string_lossy().into_owned();
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .arg("--ptx")
            .arg(format!("-arch=compute_{cap}"))
            .args(["-O3", "-std=c++17", "-lineinfo"])
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        if !status.success() {
            panic!("nvcc failed on {} ({status})", src.display());
        }
    }
}

fn find_nvcc() -> Option<PathBuf> {
    for var in ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    // found on PATH only: then a change of PATH may change which nvcc builds the kernels
    println!("cargo::rerun-if-env-changed=PATH");
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}
