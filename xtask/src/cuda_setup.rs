//! `cargo xtask cuda-setup`: what candle's `cuda` feature needs to *build* on a machine without
//! CUDA, or the machine's own toolkit when it has one.
//!
//! Follows `../shared/cuda/README.md` (tested 2026-11-28): the CUDA 13.0 compiler and libraries
//! from pinned PyPI wheels in a venv (13.0 because the H200 machine's driver speaks CUDA 13.0 and
//! PTX from a newer nvcc does not load there), a CUDA root the build scripts understand
//! (`bin`, `include`, `nvvm` linked to the wheels' tree, `lib64/` with unversioned `.so` names,
//! `lib -> lib64`), and link-time stubs `lib64/stubs/libcuda.so` (soname `libcuda.so.1`) and
//! `libcudnn.so` (soname `libcudnn.so.9`) with one dummy function per driver/cuDNN function that
//! cudarc declares. Stubs are never shipped: at run time the real libraries are used.
//! Idempotent: a complete layout (whoever made it) is left alone and the command only prints
//! the environment.

use crate::args::Args;
use crate::cargo::workspace_root;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The wheels, exactly as tested.
pub const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-cublas==13.0.2.14",
    "nvidia-curand==10.4.0.35",
];

/// Libraries the build links against, as unversioned names in `lib64/`.
const LIBS: &[&str] = &[
    "libcudart.so",
    "libcublas.so",
    "libcublasLt.so",
    "libcurand.so",
    "libnvrtc.so",
];
/// Link stubs in `lib64/stubs/`: (file, soname, cudarc source file, symbol prefix).
const STUBS: &[(&str, &str, &str, &str)] = &[
    ("libcuda.so", "libcuda.so.1", "driver/sys/mod.rs", "cu"),
    ("libcudnn.so", "libcudnn.so.9", "cudnn/sys/mod.rs", "cudnn"),
];
const STAMP: &str = ".gz-cuda-setup.json";
pub const DEFAULT_COMPUTE_CAP: &str = "90";

/// Where the toolkit came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A toolkit installed on this machine (found through CUDA_HOME/CUDA_PATH/CUDA_ROOT or nvcc).
    System,
    /// Our wheel layout, already complete: nothing was done.
    Existing,
    /// Our wheel layout, installed now.
    Installed,
}

#[derive(Debug, Clone)]
pub struct Toolkit {
    /// The CUDA root (`CUDA_ROOT`).
    pub root: PathBuf,
    pub source: Source,
}

impl Toolkit {
    /// The build environment: `CUDA_ROOT`, `CUDA_HOME`, `CUDA_PATH`, `PATH`, `CUDA_COMPUTE_CAP`.
    pub fn env(&self, compute_cap: &str) -> Vec<(String, String)> {
        let r = self.root.to_string_lossy().into_owned();
        let path = std::env::var("PATH").unwrap_or_default();
        let bin = format!("{r}/bin");
        let new_path = if path.split(':').any(|p| p == bin) {
            path
        } else {
            format!("{bin}:{path}")
        };
        vec![
            ("CUDA_ROOT".into(), r.clone()),
            ("CUDA_HOME".into(), r.clone()),
            ("CUDA_PATH".into(), r.clone()),
            ("PATH".into(), new_path),
            ("CUDA_COMPUTE_CAP".into(), compute_cap.into()),
        ]
    }

    /// The `export` line to paste into a shell.
    pub fn export_line(&self, compute_cap: &str) -> String {
        let r = self.root.display();
        format!("export CUDA_ROOT={r} CUDA_HOME={r} CUDA_PATH={r} PATH={r}/bin:$PATH CUDA_COMPUTE_CAP={compute_cap}")
    }
}

/// The default install folder.
pub fn default_dir() -> PathBuf {
    workspace_root().join("target").join("cuda-toolkit")
}

/// What is missing from our wheel layout rooted at `root` (`dir/cuda`); empty when complete.
pub fn missing_in_layout(root: &Path) -> Vec<String> {
    let mut need: Vec<PathBuf> = vec![
        root.join("bin/nvcc"),
        root.join("include/cuda_runtime.h"),
        root.join("nvvm"),
        root.join("lib/libcudart.so"),
    ];
    need.extend(LIBS.iter().map(|l| root.join("lib64").join(l)));
    need.extend(STUBS.iter().map(|s| root.join("lib64/stubs").join(s.0)));
    // `exists` follows symlinks, so a dangling link into a removed venv counts as missing.
    need.into_iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect()
}

/// A CUDA root whose `bin/nvcc` exists.
fn has_nvcc(root: &Path) -> bool {
    root.join("bin").join("nvcc").is_file()
}

/// Finds a system toolkit from the environment values given: `CUDA_HOME`, `CUDA_PATH`,
/// `CUDA_ROOT` (each a root with `bin/nvcc`), then `nvcc` on `PATH` (root = the folder above
/// `bin`). A toolkit inside `ours` (our own install, found because its env was exported) is
/// not a system toolkit.
pub fn detect_system(
    cuda_home: Option<OsString>,
    cuda_path: Option<OsString>,
    cuda_root: Option<OsString>,
    path: Option<OsString>,
    ours: &Path,
) -> Option<PathBuf> {
    let ours_c = ours.canonicalize().unwrap_or_else(|_| ours.to_path_buf());
    let is_ours = |p: &Path| {
        let c = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        c.starts_with(&ours_c) || p.starts_with(ours)
    };
    for v in [cuda_home, cuda_path, cuda_root].into_iter().flatten() {
        let p = PathBuf::from(v);
        if !p.as_os_str().is_empty() && has_nvcc(&p) && !is_ours(&p) {
            return Some(p);
        }
    }
    for dir in std::env::split_paths(&path.unwrap_or_default()) {
        let nvcc = dir.join("nvcc");
        if nvcc.is_file() {
            let real = nvcc.canonicalize().unwrap_or(nvcc);
            let root = real.parent().and_then(Path::parent).map(Path::to_path_buf);
            if let Some(root) = root {
                if !is_ours(&root) && !is_ours(&dir) {
                    return Some(root);
                }
            }
        }
    }
    None
}

fn detect_from_env(ours: &Path) -> Option<PathBuf> {
    detect_system(
        std::env::var_os("CUDA_HOME"),
        std::env::var_os("CUDA_PATH"),
        std::env::var_os("CUDA_ROOT"),
        std::env::var_os("PATH"),
        ours,
    )
}

/// The C source of a stub library: `int name(void){return 999;}` for every `pub unsafe fn
/// <prefix>...` declared in `rust_src`, sorted and deduplicated (999 is no CUDA success code).
pub fn stub_source(rust_src: &str, prefix: &str) -> String {
    let mut names: Vec<&str> = rust_src
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("pub unsafe fn "))
        .filter(|rest| rest.starts_with(prefix))
        .map(|rest| {
            rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("")
        })
        .filter(|n| !n.is_empty())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .iter()
        .map(|n| format!("int {n}(void){{return 999;}}\n"))
        .collect()
}

/// The cudarc version in the workspace's Cargo.lock.
pub fn cudarc_version(lock: &str) -> Option<String> {
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l.trim() == "name = \"cudarc\"" {
            let v = lines.next()?.trim().strip_prefix("version = \"")?.strip_suffix('"')?;
            return Some(v.to_string());
        }
    }
    None
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: $ {shown}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"))
}

/// cudarc's `src/` folder: unpacked in the registry, else the `.crate` in cargo's cache
/// (unpacked into `dir/src`), else after `cargo fetch` in the workspace (Cargo.lock pins it).
fn cudarc_src(dir: &Path) -> Result<PathBuf> {
    let root = workspace_root();
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap_or_default();
    let version = cudarc_version(&lock).unwrap_or_else(|| "0.19.10".into());
    let name = format!("cudarc-{version}");
    let find = || -> Option<PathBuf> {
        let reg = cargo_home().join("registry");
        let mut found = None;
        for sub in ["src", "cache"] {
            for e in std::fs::read_dir(reg.join(sub)).ok()?.flatten() {
                let cand = if sub == "src" {
                    e.path().join(&name)
                } else {
                    e.path().join(format!("{name}.crate"))
                };
                if cand.exists() {
                    found = Some(cand);
                    break;
                }
            }
            if found.is_some() {
                break;
            }
        }
        found
    };
    let located = match find() {
        Some(p) => p,
        None => {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            run(Command::new(cargo).arg("fetch").current_dir(&root))?;
            find().with_context(|| format!("{name} is not in the cargo registry even after `cargo fetch`"))?
        }
    };
    if located.is_dir() {
        return Ok(located.join("src"));
    }
    let dst = dir.join("src");
    std::fs::create_dir_all(&dst)?;
    run(Command::new("tar").arg("-xzf").arg(&located).arg("-C").arg(&dst))?;
    Ok(dst.join(&name).join("src"))
}

fn symlink(target: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

/// Installs the wheels, the CUDA root and the stubs into `dir` (root `dir/cuda`).
fn install(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let venv = dir.join("venv");
    if !venv.join("bin/pip").exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--no-deps"])
        .args(WHEELS))?;
    let cu13 = PathBuf::from(output(Command::new(venv.join("bin/python")).args([
        "-c",
        "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))",
    ]))?);
    if !cu13.join("bin/nvcc").is_file() {
        bail!("the wheels installed, but {} has no bin/nvcc", cu13.display());
    }
    // Build the root beside its final place, then swap it in.
    let root = dir.join("cuda");
    let tmp = dir.join("cuda.partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let lib64 = tmp.join("lib64");
    std::fs::create_dir_all(lib64.join("stubs"))?;
    for d in ["bin", "include", "nvvm"] {
        symlink(&cu13.join(d), &tmp.join(d))?;
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(cu13.join("lib"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for f in entries {
        let Some(b) = f.file_name().map(|b| b.to_string_lossy().into_owned()) else {
            continue;
        };
        let Some(pos) = b.find(".so.") else { continue };
        symlink(&f, &lib64.join(&b))?;
        let unversioned = lib64.join(format!("{}.so", &b[..pos]));
        if !unversioned.exists() {
            symlink(Path::new(&b), &unversioned)?;
        }
    }
    symlink(Path::new("lib64"), &tmp.join("lib"))?;
    let src = cudarc_src(dir)?;
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    for (file, soname, rs, prefix) in STUBS {
        let rust =
            std::fs::read_to_string(src.join(rs)).with_context(|| format!("reading {}", src.join(rs).display()))?;
        let c = stub_source(&rust, prefix);
        if c.is_empty() {
            bail!("no `pub unsafe fn {prefix}*` found in {}", src.join(rs).display());
        }
        let c_path = lib64.join("stubs").join(format!(
            "{}_stub.c",
            file.trim_start_matches("lib").trim_end_matches(".so")
        ));
        std::fs::write(&c_path, c)?;
        run(Command::new(&cc)
            .args(["-shared", "-fPIC", &format!("-Wl,-soname,{soname}"), "-o"])
            .arg(lib64.join("stubs").join(file))
            .arg(&c_path))?;
    }
    if root.exists() || root.symlink_metadata().is_ok() {
        std::fs::remove_dir_all(&root).with_context(|| format!("removing the incomplete {}", root.display()))?;
    }
    std::fs::rename(&tmp, &root)?;
    let stamp =
        serde_json::json!({ "wheels": WHEELS, "cudarc_src": src.to_string_lossy(), "root": root.to_string_lossy() });
    std::fs::write(dir.join(STAMP), serde_json::to_string_pretty(&stamp)?)?;
    let missing = missing_in_layout(&root);
    if !missing.is_empty() {
        bail!(
            "setup finished but the layout is incomplete; missing: {}",
            missing.join(", ")
        );
    }
    Ok(root)
}

/// Our wheel layout in `dir` is complete and was made with today's pins (a layout without our
/// stamp, e.g. made by the reference script, counts when complete).
fn existing_ok(dir: &Path) -> bool {
    if !missing_in_layout(&dir.join("cuda")).is_empty() {
        return false;
    }
    match std::fs::read_to_string(dir.join(STAMP)) {
        Err(_) => true,
        Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                v["wheels"]
                    .as_array()
                    .map(|w| w.iter().filter_map(|x| x.as_str()).eq(WHEELS.iter().copied()))
            })
            .unwrap_or(false),
    }
}

/// Decides without side effects: `Some(toolkit)` when nothing needs installing.
pub fn plan(dir: &Path, explicit_dir: bool, system: Option<PathBuf>) -> Option<Toolkit> {
    if !explicit_dir {
        if let Some(root) = system {
            return Some(Toolkit {
                root,
                source: Source::System,
            });
        }
    }
    existing_ok(dir).then(|| Toolkit {
        root: dir.join("cuda"),
        source: Source::Existing,
    })
}

/// Uses what is there or installs into `dir`.
pub fn ensure(dir: &Path, explicit_dir: bool) -> Result<Toolkit> {
    if let Some(t) = plan(
        dir,
        explicit_dir,
        if explicit_dir { None } else { detect_from_env(dir) },
    ) {
        return Ok(t);
    }
    eprintln!(
        "xtask: installing the CUDA 13.0 toolkit wheels into {} (about 1.3 GB)",
        dir.display()
    );
    let root = install(dir)?;
    Ok(Toolkit {
        root,
        source: Source::Installed,
    })
}

/// For `build --cuda` / `pipeline --cuda`: the default toolkit's build environment.
pub fn ensure_default() -> Result<Vec<(String, String)>> {
    let t = ensure(&default_dir(), false)?;
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| DEFAULT_COMPUTE_CAP.into());
    Ok(t.env(&cap))
}

/// `cargo xtask cuda-setup [--dir DIR] [--compute-cap N]`.
pub fn cmd(mut a: Args) -> Result<()> {
    let cwd = std::env::current_dir()?;
    let given = a.path("--dir")?.map(|d| if d.is_absolute() { d } else { cwd.join(d) });
    let cap = a.value("--compute-cap")?.unwrap_or_else(|| DEFAULT_COMPUTE_CAP.into());
    a.finish()?;
    let explicit = given.is_some();
    let dir = given.unwrap_or_else(default_dir);
    let t = ensure(&dir, explicit)?;
    match t.source {
        Source::System => eprintln!(
            "xtask: using the CUDA toolkit installed on this machine: {}",
            t.root.display()
        ),
        Source::Existing => eprintln!("xtask: {} is complete already: nothing to do", t.root.display()),
        Source::Installed => eprintln!("xtask: installed the CUDA root {}", t.root.display()),
    }
    eprintln!("xtask: build with: CARGO_TARGET_DIR=target/cuda cargo build --release -p gz-cli --features cuda   (or `cargo xtask build --cuda`)");
    println!("{}", t.export_line(&cap));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    /// A complete wheel layout made of empty files.
    fn fake_layout(dir: &Path) {
        let r = dir.join("cuda");
        touch(&r.join("bin/nvcc"));
        touch(&r.join("include/cuda_runtime.h"));
        std::fs::create_dir_all(r.join("nvvm")).unwrap();
        for l in LIBS {
            touch(&r.join("lib64").join(l));
        }
        for s in STUBS {
            touch(&r.join("lib64/stubs").join(s.0));
        }
        std::os::unix::fs::symlink("lib64", r.join("lib")).unwrap();
    }

    #[test]
    fn stub_source_lists_declared_functions() {
        let rs = "pub unsafe fn cuInit(Flags: c_uint) -> CUresult {\n    pub unsafe fn cuMemAlloc_v2(p: *mut u64) -> CUresult {\npub fn cuNotUnsafe() {}\npub unsafe fn cudnnCreate(h: *mut X) -> S {\npub unsafe fn cuInit(x: u32) -> CUresult {\n";
        assert_eq!(
            stub_source(rs, "cu"),
            "int cuInit(void){return 999;}\nint cuMemAlloc_v2(void){return 999;}\nint cudnnCreate(void){return 999;}\n"
        );
        assert_eq!(stub_source(rs, "cudnn"), "int cudnnCreate(void){return 999;}\n");
    }

    #[test]
    fn cudarc_version_from_lock() {
        let lock = "[[package]]\nname = \"cudarc\"\nversion = \"0.19.10\"\nsource = \"x\"\n";
        assert_eq!(cudarc_version(lock).as_deref(), Some("0.19.10"));
        assert_eq!(cudarc_version("[[package]]\nname = \"candle\"\n"), None);
    }

    #[test]
    fn detection_prefers_env_roots_and_ignores_our_own() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path().join("sys-cuda");
        touch(&sys.join("bin/nvcc"));
        let ours = t.path().join("ours");
        fake_layout(&ours);
        let our_root = ours.join("cuda");
        // nothing set: nothing found
        assert_eq!(detect_system(None, None, None, None, &ours), None);
        // CUDA_HOME pointing at a real toolkit
        assert_eq!(
            detect_system(Some(sys.clone().into()), None, None, None, &ours),
            Some(sys.clone())
        );
        // CUDA_PATH without bin/nvcc is ignored
        assert_eq!(
            detect_system(None, Some(t.path().join("empty").into()), None, None, &ours),
            None
        );
        // nvcc on PATH: root is the folder above bin
        let path = std::env::join_paths([t.path().join("nope"), sys.join("bin")]).unwrap();
        assert_eq!(detect_system(None, None, None, Some(path), &ours), Some(sys.clone()));
        // our own toolkit exported in the environment is not a system toolkit
        let path = std::env::join_paths([our_root.join("bin")]).unwrap();
        assert_eq!(
            detect_system(Some(our_root.clone().into()), None, None, Some(path), &ours),
            None
        );
    }

    #[test]
    fn complete_layout_is_a_no_op_and_incomplete_is_not() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("tk");
        assert!(plan(&dir, true, None).is_none(), "empty dir needs an install");
        fake_layout(&dir);
        assert!(missing_in_layout(&dir.join("cuda")).is_empty());
        let before = crate::fingerprint::identity(&dir).unwrap();
        // twice: both no-ops, nothing touched
        for _ in 0..2 {
            let tk = ensure(&dir, true).unwrap();
            assert_eq!(tk.source, Source::Existing);
            assert_eq!(tk.root, dir.join("cuda"));
        }
        assert_eq!(before, crate::fingerprint::identity(&dir).unwrap());
        // a system toolkit wins when no --dir is given
        let sys = t.path().join("sys");
        assert_eq!(plan(&dir, false, Some(sys.clone())).unwrap().source, Source::System);
        assert_eq!(plan(&dir, true, Some(sys)).unwrap().source, Source::Existing);
        // a stamp with other pins means reinstall
        std::fs::write(dir.join(STAMP), r#"{"wheels":["nvidia-cuda-nvcc==12.0"]}"#).unwrap();
        assert!(plan(&dir, true, None).is_none());
        let ok = serde_json::json!({ "wheels": WHEELS }).to_string();
        std::fs::write(dir.join(STAMP), ok).unwrap();
        assert!(plan(&dir, true, None).is_some());
        // a missing stub makes it incomplete
        std::fs::remove_file(dir.join("cuda/lib64/stubs/libcuda.so")).unwrap();
        let missing = missing_in_layout(&dir.join("cuda"));
        assert_eq!(missing.len(), 1);
        assert!(missing[0].ends_with("libcuda.so"));
        assert!(plan(&dir, true, None).is_none());
    }

    #[test]
    fn env_and_export_line() {
        let tk = Toolkit {
            root: PathBuf::from("/x/cuda"),
            source: Source::Existing,
        };
        let env = tk.env("90");
        assert!(env.contains(&("CUDA_HOME".to_string(), "/x/cuda".to_string())));
        assert!(env.iter().any(|(k, v)| k == "PATH" && v.starts_with("/x/cuda/bin")));
        assert_eq!(
            tk.export_line("90"),
            "export CUDA_ROOT=/x/cuda CUDA_HOME=/x/cuda CUDA_PATH=/x/cuda PATH=/x/cuda/bin:$PATH CUDA_COMPUTE_CAP=90"
        );
    }
}
