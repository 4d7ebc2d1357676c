//! Compiles gz-model's CUDA kernels (`../gz-model/src/kernels/*.cu`) as plain C++ for the CPU,
//! with `emu/include/cuda_emu.h` force-included (CUDA's built-ins) and stand-ins for
//! `cuda_fp16.h` / `cuda_bf16.h`, plus the fiber scheduler `emu/runtime.cpp`, into one static
//! library. Needs a C++17 compiler (g++ or clang++; `cc` finds it as for any -sys crate); no
//! CUDA. `-ffp-contract=off`: no fused multiply-adds, so f32 arithmetic is the plain IEEE
//! operations the kernels' `__f*_rn` intrinsics ask for.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let kernels = manifest.join("../gz-model/src/kernels");
    let emu = manifest.join("emu");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed={}", emu.display());
    println!("cargo::rerun-if-changed={}", kernels.display());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kernels.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo::rerun-if-changed={}", src.display());
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .include(emu.join("include"))
        .include(&kernels)
        .flag("-ffp-contract=off")
        .flag("-fno-fast-math")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-parameter")
        // getcontext and _setjmp are `returns_twice`, so gcc warns that the scheduler's locals
        // "might be clobbered"; every _longjmp back to the scheduler targets the _setjmp of the
        // `resume` call still on its stack, and no local changes between that _setjmp and the
        // jump, so no local is stale
        .flag_if_supported("-Wno-clobbered")
        // runtime.cpp switches fibers with _longjmp to another stack, which the checked longjmp
        // of _FORTIFY_SOURCE (on by default in some distributions' compilers) aborts
        .flag("-U_FORTIFY_SOURCE")
        .warnings(true);
    build.file(emu.join("runtime.cpp"));
    // The kernel files are CUDA sources: `-x c++` makes the compiler read them as C++, and the
    // force-included header supplies what nvcc would.
    build
        .flag("-include")
        .flag(emu.join("include/cuda_emu.h").to_str().expect("a UTF-8 path"));
    for src in &sources {
        build.file(src);
    }
    build.flag("-x").flag("c++");
    // Nothing here needs the C++ runtime (no exceptions, RTTI or std:: containers; the runtime
    // allocates with calloc), so the library links against the C library alone, wherever the
    // test binaries run (the GPU machine included).
    build.flag("-fno-exceptions").flag("-fno-rtti").cpp_link_stdlib(None);
    build.compile("gz_kernel_emu");
}
