//! Which vector instructions this CPU has, for the hand-vectorised CPU loops that are compiled a
//! second time with `#[target_feature]` and picked at run time (`ops/linear/skinny.rs`, the
//! pooling loops in `cudnn/mod.rs`). Each answer is detected once by the standard library and
//! cached there; other targets answer `false` and run the portable build.

/// AVX2.
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX2 and FMA.
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2() && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
