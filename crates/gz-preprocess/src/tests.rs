//! Numerics and robustness of `prep_jpeg`: the fast path against an independent reference (the
//! `image` crate's own decoder + crop + 2×2 box), the fast path against the generic path on JPEG
//! variants we encode ourselves, grayscale / CMYK / odd-size handling, and no panics on damaged
//! bytes. Plus `run_with` on small datasets (cache hit/miss, strict, bad inputs).

use std::path::{Path, PathBuf};

use half::f16;

use crate::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

fn real_jpegs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures().join("real-test-jpegs"))
        .expect("fixtures/real-test-jpegs")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    v.sort();
    assert!(v.len() > 100);
    v
}

/// Reference: `image` (zune-jpeg) decode → RGB8 → centre 212 crop → 2×2 box, C×H×W f32 in [0,1].
fn reference(bytes: &[u8]) -> Vec<f32> {
    let img = image::load_from_memory(bytes).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    assert_eq!((w, h), (424, 424));
    let mut out = vec![0f32; 3 * 106 * 106];
    for y in 0..106u32 {
        for x in 0..106u32 {
            let mut acc = [0f32; 3];
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let p = img.get_pixel(106 + 2 * x + dx, 106 + 2 * y + dy);
                for c in 0..3 {
                    acc[c] += p[c] as f32;
                }
            }
            for c in 0..3 {
                out[c * 106 * 106 + (y * 106 + x) as usize] = acc[c] / 4.0 / 255.0;
            }
        }
    }
    out
}

fn diff(a: &[f16], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let mut max = 0f32;
    let mut sum = 0f64;
    for (x, y) in a.iter().zip(b) {
        let d = (x.to_f32() - y).abs();
        max = max.max(d);
        sum += d as f64;
    }
    (max, (sum / a.len() as f64) as f32)
}

#[test]
fn fast_path_matches_independent_reference_on_real_images() {
    let cfg = PrepConfig::default();
    let mut worst_mean = 0f32;
    let mut worst_max = 0f32;
    let mut worst_luma = 0f32;
    let mut files = real_jpegs();
    for d in ["images_training_rev1", "images_test_rev1"] {
        for e in std::fs::read_dir(fixtures().join("kaggle-mini").join(d)).unwrap() {
            files.push(e.unwrap().path());
        }
    }
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let mut ours = vec![f16::ZERO; cfg.image_len()];
        assert!(
            matches!(fast::try_prep(&bytes, &cfg, &mut ours), fast::Outcome::Done),
            "{}: fast path not taken",
            f.display()
        );
        let r = reference(&bytes);
        let (max, mean) = diff(&ours, &r);
        worst_mean = worst_mean.max(mean);
        worst_max = worst_max.max(max);
        // The decoders differ in IDCT rounding, clamping order and chroma: the reference
        // upsamples 4:2:0 chroma (interpolating neighbours) and then averages, we use the chroma
        // samples at their native resolution, which is sharper. So per channel the tolerance
        // is loose at strong colour edges, but luma must agree closely.
        assert!(mean < 1.5 / 255.0, "{}: mean abs diff {mean}", f.display());
        assert!(max < 24.0 / 255.0, "{}: max abs diff {max}", f.display());
        let n = 106 * 106;
        let luma = |c: &dyn Fn(usize) -> f32, i: usize| 0.299 * c(i) + 0.587 * c(n + i) + 0.114 * c(2 * n + i);
        // Luma: the remaining differences are where the reference clamps full-resolution
        // ringing (below 0 next to bright stars) before averaging and we clamp after.
        let mut luma_sum = 0f32;
        for i in 0..n {
            let d = (luma(&|k| ours[k].to_f32(), i) - luma(&|k| r[k], i)).abs();
            worst_luma = worst_luma.max(d);
            luma_sum += d;
            assert!(
                d < 8.0 / 255.0,
                "{}: luma differs by {} at pixel {i}",
                f.display(),
                d * 255.0
            );
        }
        assert!(
            luma_sum / (n as f32) < 0.5 / 255.0,
            "{}: mean luma diff {}",
            f.display(),
            luma_sum / n as f32 * 255.0
        );
    }
    eprintln!(
        "fast vs image-crate reference over {} images (×255): worst channel mean {:.3}, worst channel max {:.3}, worst luma {:.3}",
        files.len(),
        worst_mean * 255.0,
        worst_max * 255.0,
        worst_luma * 255.0
    );
}

#[test]
fn generic_path_matches_independent_reference_on_real_images() {
    let cfg = PrepConfig::default();
    for f in real_jpegs().iter().step_by(10) {
        let bytes = std::fs::read(f).unwrap();
        let mut ours = vec![f16::ZERO; cfg.image_len()];
        generic::prep(&bytes, &cfg, &mut ours).unwrap();
        let (max, mean) = diff(&ours, &reference(&bytes));
        assert!(
            mean < 1.5 / 255.0 && max < 16.0 / 255.0,
            "{}: mean {mean} max {max}",
            f.display()
        );
    }
}

/// A smooth synthetic galaxy with some texture, w×h RGB8.
fn synthetic(w: usize, h: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 / w as f32 - 0.5, y as f32 / h as f32 - 0.5);
            let r2 = fx * fx * 1.6 + fy * fy;
            let core = (-r2 * 40.0).exp();
            let arm = 0.5 + 0.5 * ((fy.atan2(fx) * 2.0 + r2.sqrt() * 25.0).sin());
            let tex = (((x * 7919 + y * 104729) % 97) as f32) / 97.0;
            let base = 255.0 * (core * 0.9 + 0.25 * arm * (-r2 * 8.0).exp()) + 6.0 * tex;
            v.push(base.clamp(0.0, 255.0) as u8);
            v.push((base * 0.85).clamp(0.0, 255.0) as u8);
            v.push((base * 0.7 + 10.0).clamp(0.0, 255.0) as u8);
        }
    }
    v
}

fn encode(
    rgb: &[u8],
    w: usize,
    h: usize,
    color: jpeg_encoder::ColorType,
    f: impl FnOnce(&mut jpeg_encoder::Encoder<&mut Vec<u8>>),
) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut e = jpeg_encoder::Encoder::new(&mut buf, 90);
    f(&mut e);
    e.encode(rgb, w as u16, h as u16, color).unwrap();
    buf
}

fn prep_both(bytes: &[u8], cfg: &PrepConfig) -> (fast::Outcome, Vec<f16>, Vec<f16>) {
    let mut a = vec![f16::ZERO; cfg.image_len()];
    let mut b = vec![f16::ZERO; cfg.image_len()];
    let o = fast::try_prep(bytes, cfg, &mut a);
    generic::prep(bytes, cfg, &mut b).unwrap();
    (o, a, b)
}

fn close(a: &[f16], b: &[f16], mean_tol: f32, max_tol: f32, what: &str) {
    let bf: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
    let (max, mean) = diff(a, &bf);
    assert!(mean < mean_tol && max < max_tol, "{what}: mean {mean} max {max}");
}

#[test]
fn fast_path_matches_generic_on_encoder_variants() {
    use jpeg_encoder::{ColorType, SamplingFactor};
    let cfg = PrepConfig::default();
    let rgb = synthetic(424, 424);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "4:2:0",
            encode(&rgb, 424, 424, ColorType::Rgb, |e| {
                e.set_sampling_factor(SamplingFactor::R_4_2_0)
            }),
        ),
        (
            "4:4:4",
            encode(&rgb, 424, 424, ColorType::Rgb, |e| {
                e.set_sampling_factor(SamplingFactor::R_4_4_4)
            }),
        ),
        (
            "4:2:2",
            encode(&rgb, 424, 424, ColorType::Rgb, |e| {
                e.set_sampling_factor(SamplingFactor::R_4_2_2)
            }),
        ),
        (
            "4:4:0",
            encode(&rgb, 424, 424, ColorType::Rgb, |e| {
                e.set_sampling_factor(SamplingFactor::R_4_4_0)
            }),
        ),
        (
            "restart interval 3",
            encode(&rgb, 424, 424, ColorType::Rgb, |e| {
                e.set_sampling_factor(SamplingFactor::R_4_2_0);
                e.set_restart_interval(3)
            }),
        ),
        (
            "optimised Huffman",
            encode(&rgb, 424, 424, ColorType::Rgb, |e| {
                e.set_sampling_factor(SamplingFactor::R_4_4_4);
                e.set_optimized_huffman_tables(true)
            }),
        ),
    ];
    for (what, bytes) in &cases {
        let (o, a, b) = prep_both(bytes, &cfg);
        if *what == "optimised Huffman" {
            // jpeg-encoder writes one scan per component then (non-interleaved): generic path
            assert!(matches!(o, fast::Outcome::NotApplicable), "{what}: {o:?}");
            close(&prep_jpeg(bytes, &cfg).unwrap(), &b, 1e-6, 1e-6, what);
            continue;
        }
        assert!(matches!(o, fast::Outcome::Done), "{what}: fast path not taken: {o:?}");
        // 4:2:2 / 4:4:0 chroma: the generic decoder upsamples one axis, we box it: a bit looser
        close(&a, &b, 1.0 / 255.0, 12.0 / 255.0, what);
    }
    // grayscale: fast path, replicated to 3 equal channels
    let gray: Vec<u8> = rgb.chunks(3).map(|p| p[0]).collect();
    let bytes = encode(&gray, 424, 424, ColorType::Luma, |_| {});
    let (o, a, b) = prep_both(&bytes, &cfg);
    assert!(matches!(o, fast::Outcome::Done), "gray: {o:?}");
    close(&a, &b, 0.5 / 255.0, 4.0 / 255.0, "gray");
    let n = 106 * 106;
    assert_eq!(&a[..n], &a[n..2 * n]);
    assert_eq!(&a[..n], &a[2 * n..]);
    // progressive: generic path, same picture as the baseline encoding
    let prog = encode(&rgb, 424, 424, ColorType::Rgb, |e| e.set_progressive(true));
    let mut p = vec![f16::ZERO; cfg.image_len()];
    assert!(matches!(
        fast::try_prep(&prog, &cfg, &mut p),
        fast::Outcome::NotApplicable
    ));
    let p = prep_jpeg(&prog, &cfg).unwrap();
    close(
        &p,
        &prep_jpeg(&cases[0].1, &cfg).unwrap(),
        1.5 / 255.0,
        24.0 / 255.0,
        "progressive",
    );
}

/// Encoder variants of the synthetic galaxy at 424×424 (4:2:0, 4:4:4, 4:2:2, 4:4:0, gray):
/// the sampling layouts the fast path reads.
fn sampling_variants() -> Vec<(&'static str, Vec<u8>)> {
    use jpeg_encoder::{ColorType, SamplingFactor};
    let rgb = synthetic(424, 424);
    let gray: Vec<u8> = rgb.chunks(3).map(|p| p[0]).collect();
    let mut v: Vec<(&str, Vec<u8>)> = [
        ("4:2:0", SamplingFactor::R_4_2_0),
        ("4:4:4", SamplingFactor::R_4_4_4),
        ("4:2:2", SamplingFactor::R_4_2_2),
        ("4:4:0", SamplingFactor::R_4_4_0),
    ]
    .into_iter()
    .map(|(what, f)| {
        (
            what,
            encode(&rgb, 424, 424, ColorType::Rgb, |e| e.set_sampling_factor(f)),
        )
    })
    .collect();
    v.push(("gray", encode(&gray, 424, 424, ColorType::Luma, |_| {})));
    v
}

/// Below half resolution the fast path transforms the crop's blocks at their own resolution
/// and area-averages each plane (`Mode::Reduce`). Where the crop is exactly 2·size, the box
/// matrices (`Mode::Half`) compute the same numbers another way: forced through the reduction,
/// the default config agrees to f16 rounding on real images and on every sampling layout, so
/// the windows, the weights and the subsampled planes line up.
#[test]
fn the_reduction_matches_the_box_transform_at_half_size() {
    let cfg = PrepConfig::default();
    let mut files: Vec<(String, Vec<u8>)> = real_jpegs()
        .iter()
        .step_by(7)
        .map(|f| (f.display().to_string(), std::fs::read(f).unwrap()))
        .collect();
    files.extend(sampling_variants().into_iter().map(|(w, b)| (w.to_string(), b)));
    for (what, bytes) in &files {
        let mut half = vec![f16::ZERO; cfg.image_len()];
        let mut reduced = vec![f16::ZERO; cfg.image_len()];
        assert!(
            matches!(fast::try_prep(bytes, &cfg, &mut half), fast::Outcome::Done),
            "{what}"
        );
        assert!(
            matches!(fast::try_prep_reduce(bytes, &cfg, &mut reduced), fast::Outcome::Done),
            "{what}"
        );
        let hf: Vec<f32> = half.iter().map(|v| v.to_f32()).collect();
        let (max, _) = diff(&reduced, &hf);
        assert!(max <= 1.0 / 1024.0, "{what}: max abs diff {max}");
    }
}

/// Sizes below half the crop take the fast path (its reduction) and agree with the generic
/// path (a full decode by jpeg-decoder, exact area weights) on the real images, as closely as
/// the two decoders agree at 106 px; crops whose offset is odd go to the generic path.
#[test]
fn smaller_sizes_take_the_fast_reduction_and_match_the_generic_path() {
    let files: Vec<PathBuf> = real_jpegs().into_iter().step_by(3).collect();
    let mut worst = (0f32, 0f32);
    for (crop, size) in [(212, 32), (212, 53), (212, 75), (212, 7), (200, 48), (424, 100)] {
        let cfg = PrepConfig {
            crop,
            size,
            filter: Filter::Area,
        };
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            let (o, a, b) = prep_both(&bytes, &cfg);
            assert!(matches!(o, fast::Outcome::Done), "{crop}/{size} {}: {o:?}", f.display());
            let bf: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
            let (max, mean) = diff(&a, &bf);
            worst = (worst.0.max(mean), worst.1.max(max));
            assert!(
                mean < 0.6 / 255.0 && max < 10.0 / 255.0,
                "{crop}/{size} {}: mean {} max {} (×255)",
                f.display(),
                mean * 255.0,
                max * 255.0
            );
        }
    }
    eprintln!(
        "fast reduction vs generic (×255): worst mean {:.3}, worst max {:.3}",
        worst.0 * 255.0,
        worst.1 * 255.0
    );
    for (what, bytes) in sampling_variants() {
        let cfg = PrepConfig {
            crop: 212,
            size: 32,
            filter: Filter::Area,
        };
        let (o, a, b) = prep_both(&bytes, &cfg);
        assert!(matches!(o, fast::Outcome::Done), "{what}: {o:?}");
        close(&a, &b, 1.0 / 255.0, 8.0 / 255.0, what);
    }
    let odd = PrepConfig {
        crop: 210,
        size: 32,
        filter: Filter::Area,
    };
    let bytes = std::fs::read(&files[0]).unwrap();
    let mut out = vec![f16::ZERO; odd.image_len()];
    assert!(matches!(
        fast::try_prep(&bytes, &odd, &mut out),
        fast::Outcome::NotApplicable
    ));
}

/// A sweep of crops and sizes (odd, tiny, just under half the crop) over square and
/// non-square images in three sampling layouts: the fast path never panics, takes every
/// reduction whose crop sits on whole chroma samples, and stays close to the generic path.
#[test]
fn reductions_over_many_crops_and_sizes_stay_close_to_the_generic_path() {
    use jpeg_encoder::{ColorType, SamplingFactor};
    let mut images = Vec::new();
    for (w, h) in [(424usize, 424usize), (424, 300), (333, 424)] {
        let rgb = synthetic(w, h);
        for f in [
            SamplingFactor::R_4_2_0,
            SamplingFactor::R_4_2_2,
            SamplingFactor::R_4_4_4,
        ] {
            images.push(((w, h), encode(&rgb, w, h, ColorType::Rgb, |e| e.set_sampling_factor(f))));
        }
    }
    let mut fast_taken = 0;
    for crop in (9u32..=424).step_by(23) {
        for size in [1u32, 2, 3, 7, crop / 3, crop.div_ceil(2) - 1] {
            let cfg = PrepConfig {
                crop,
                size,
                filter: Filter::Area,
            };
            if size == 0 || cfg.version() != 2 {
                continue;
            }
            for ((w, h), bytes) in &images {
                let what = format!("{w}×{h} crop {crop} size {size}");
                let (o, a, b) = prep_both(bytes, &cfg);
                match o {
                    fast::Outcome::Done => {
                        fast_taken += 1;
                        close(&a, &b, 0.6 / 255.0, 8.0 / 255.0, &what);
                    }
                    fast::Outcome::NotApplicable => {
                        // only where the crop is not whole at an even offset in this image
                        let fits = |d: u32| (d * crop) % 424 == 0 && (d - d * crop / 424) % 4 == 0;
                        assert!(!(fits(*w as u32) && fits(*h as u32)), "{what}: fast path not taken");
                    }
                    fast::Outcome::Corrupt(r) => panic!("{what}: {r}"),
                }
            }
        }
    }
    assert!(fast_taken > 50, "only {fast_taken} cases took the fast path");
}

#[test]
fn cmyk_is_converted_to_rgb() {
    // a flat red, as CMYK (C=0, M=255, Y=255, K=0) and as YCCK
    let cfg = PrepConfig {
        crop: 212,
        size: 8,
        filter: Filter::Area,
    };
    let px: Vec<u8> = [0u8, 255, 255, 0].repeat(64 * 64);
    for color in [jpeg_encoder::ColorType::Cmyk, jpeg_encoder::ColorType::CmykAsYcck] {
        let bytes = encode(&px, 64, 64, color, |_| {});
        let out = prep_jpeg(&bytes, &cfg).unwrap();
        let mean = |c: usize| out[c * 64..(c + 1) * 64].iter().map(|v| v.to_f32()).sum::<f32>() / 64.0;
        assert!(
            mean(0) > 0.9 && mean(1) < 0.1 && mean(2) < 0.1,
            "{color:?}: rgb {} {} {}",
            mean(0),
            mean(1),
            mean(2)
        );
    }
}

#[test]
fn other_sizes_take_the_same_fraction() {
    // an 848×848 image that is the 424 one scaled 2× (nearest): same crop fraction, same result
    let cfg = PrepConfig::default();
    let small = synthetic(424, 424);
    let mut big = vec![0u8; 848 * 848 * 3];
    for y in 0..848 {
        for x in 0..848 {
            let s = ((y / 2) * 424 + x / 2) * 3;
            big[(y * 848 + x) * 3..(y * 848 + x) * 3 + 3].copy_from_slice(&small[s..s + 3]);
        }
    }
    let q = |e: &mut jpeg_encoder::Encoder<&mut Vec<u8>>| e.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_4_4);
    let a = prep_jpeg(&encode(&small, 424, 424, jpeg_encoder::ColorType::Rgb, q), &cfg).unwrap();
    let b = prep_jpeg(&encode(&big, 848, 848, jpeg_encoder::ColorType::Rgb, q), &cfg).unwrap();
    close(&a, &b, 1.5 / 255.0, 20.0 / 255.0, "848 vs 424");
    // a non-square odd size still yields size×size
    let odd = synthetic(301, 203);
    let out = prep_jpeg(&encode(&odd, 301, 203, jpeg_encoder::ColorType::Rgb, |_| {}), &cfg).unwrap();
    assert_eq!(out.len(), 3 * 106 * 106);
    // a tiny image is still handled (crop smaller than a pixel is an error, not a panic)
    let tiny = synthetic(2, 2);
    let r = prep_jpeg(&encode(&tiny, 2, 2, jpeg_encoder::ColorType::Rgb, |_| {}), &cfg);
    assert!(r.is_ok() || matches!(r, Err(PrepError::Unsupported(_))));
}

#[test]
fn damaged_bytes_never_panic_and_truncation_is_an_error() {
    let cfg = PrepConfig::default();
    let good = std::fs::read(&real_jpegs()[0]).unwrap();
    for cut in [
        2,
        3,
        10,
        100,
        300,
        600,
        good.len() / 4,
        good.len() / 2,
        good.len() * 3 / 4,
        good.len() - 2,
    ] {
        let r = prep_jpeg(&good[..cut], &cfg);
        assert!(r.is_err(), "truncated at {cut} of {} accepted", good.len());
    }
    // a truncated progressive JPEG (the generic path) says so too
    let rgb = synthetic(424, 424);
    let prog = encode(&rgb, 424, 424, jpeg_encoder::ColorType::Rgb, |e| {
        e.set_progressive(true)
    });
    for cfg in [
        cfg.clone(),
        PrepConfig {
            size: 32,
            ..cfg.clone()
        },
    ] {
        let Err(e) = prep_jpeg(&prog[..prog.len() / 2], &cfg) else {
            panic!("half a progressive JPEG accepted")
        };
        assert!(e.to_string().contains("truncated"), "{e}");
    }
    // seeded byte corruption anywhere: an error or an image, never a panic
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..300 {
        let mut b = good.clone();
        for _ in 0..(1 + next() % 4) {
            let i = (next() as usize) % b.len();
            b[i] = next() as u8;
        }
        let _ = prep_jpeg(&b, &cfg);
    }
}

/// The entropy-coded data of a JPEG: from after the SOS header to the EOI marker.
fn scan_range(b: &[u8]) -> std::ops::Range<usize> {
    let sos = b.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    let start = sos + 2 + ((b[sos + 2] as usize) << 8 | b[sos + 3] as usize);
    let end = b.windows(2).rposition(|w| w == [0xFF, 0xD9]).unwrap();
    start..end
}

/// Corrupt entropy-coded data is reported on both paths (the fast path at 106 px; the scan
/// check before the generic decoder at 32 px), not decoded to a wrong picture: seeded 4-byte
/// overwrites and 1-bit flips of real images' scans (a flip that still decodes to valid codes
/// and values is a small local change no check can see), bytes left over after the last block,
/// and restart markers out of sequence. The sound files pass.
#[test]
fn corrupt_entropy_data_is_reported_on_both_paths() {
    let sizes = [
        PrepConfig::default(),
        PrepConfig {
            size: 32,
            ..PrepConfig::default()
        },
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // [4-byte overwrites, 1-bit flips] × [106 px, 32 px]
    let (mut tried, mut caught) = ([0; 2], [[0; 2]; 2]);
    for path in real_jpegs().iter().take(20) {
        let good = std::fs::read(path).unwrap();
        let scan = scan_range(&good);
        for cfg in &sizes {
            prep_jpeg(&good, cfg).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        for variant in 0..6 {
            let kind = variant % 2;
            let mut b = good.clone();
            let mut written = 0;
            while written < [4, 1][kind] {
                // no byte next to an 0xFF (stuffing, markers) and no new 0xFF
                let i = scan.start + 1 + (next() as usize) % (scan.len() - 2);
                if b[i - 1..=i + 1].contains(&0xFF) {
                    continue;
                }
                let was = b[i];
                b[i] = if kind == 0 {
                    (next() % 0xFF) as u8
                } else {
                    was ^ (1 << (next() % 8))
                };
                if b[i] == 0xFF {
                    b[i] = was;
                    continue;
                }
                written += 1;
            }
            tried[kind] += 1;
            for (k, cfg) in sizes.iter().enumerate() {
                match prep_jpeg(&b, cfg) {
                    Err(PrepError::Decode(reason)) => {
                        assert!(reason.contains("corrupt") || reason.contains("ends early"), "{reason}");
                        caught[kind][k] += 1;
                    }
                    Err(e) => panic!("{e}"),
                    Ok(_) => {}
                }
            }
        }
    }
    // measured: 4-byte overwrites 59 of 60 on both paths, 1-bit flips 26 of 60 (without the DC
    // range check 49 and 17; before these checks the study's 1,460 gave 1)
    for (kind, need) in [(0, 0.9), (1, 0.35)] {
        for (k, &c) in caught[kind].iter().enumerate() {
            assert!(
                c as f64 >= need * tried[kind] as f64,
                "size {}: {c} of {} corrupt scans ({}) reported",
                sizes[k].size,
                tried[kind],
                ["4-byte overwrites", "1-bit flips"][kind]
            );
        }
    }
    // bytes between the last block and EOI
    let good = std::fs::read(&real_jpegs()[1]).unwrap();
    let end = scan_range(&good).end;
    let mut b = good[..end].to_vec();
    b.extend([0x12, 0x34, 0x56]);
    b.extend(&good[end..]);
    for cfg in &sizes {
        let Err(e) = prep_jpeg(&b, cfg) else {
            panic!("bytes after the last block accepted")
        };
        let e = e.to_string();
        assert!(e.contains("does not end where its last block ends"), "{e}");
    }
    // a restart interval one to three bytes short (its blocks read the marker's padding)
    let rgb = synthetic(424, 424);
    let good = encode(&rgb, 424, 424, jpeg_encoder::ColorType::Rgb, |e| {
        e.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
        e.set_restart_interval(3)
    });
    let scan = scan_range(&good);
    let rst1 = scan.start + good[scan.clone()].windows(2).position(|w| w == [0xFF, 0xD1]).unwrap();
    for cut in 1..=3 {
        let mut b = good.clone();
        assert!(
            !b[rst1 - cut - 1..rst1].contains(&0xFF),
            "a stuffed byte next to the cut"
        );
        b.drain(rst1 - cut..rst1);
        for cfg in &sizes {
            let Err(e) = prep_jpeg(&b, cfg) else {
                panic!("an interval {cut} byte(s) short accepted")
            };
            assert!(e.to_string().contains("ends early"), "{e}");
        }
    }
    // restart markers: sound, then the first one renumbered
    let rgb = synthetic(424, 424);
    let good = encode(&rgb, 424, 424, jpeg_encoder::ColorType::Rgb, |e| {
        e.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
        e.set_restart_interval(3)
    });
    let scan = scan_range(&good);
    let rst = scan.start + good[scan.clone()].windows(2).position(|w| w == [0xFF, 0xD0]).unwrap();
    let mut b = good.clone();
    b[rst + 1] = 0xD1;
    for cfg in &sizes {
        prep_jpeg(&good, cfg).unwrap();
        let Err(e) = prep_jpeg(&b, cfg) else {
            panic!("RST1 for RST0 accepted")
        };
        let e = e.to_string();
        assert!(e.contains("RST1 where RST0 belongs"), "{e}");
    }
}

/// The generic path (`bicubic`, or sizes the fast path does not read) calls the same files
/// corrupt as the fast path: `fast::check_scan` range-checks the AC values of the blocks that
/// hold the crop, as the fast path does for the blocks it transforms. A quantisation step
/// raised to 255 (a sound header: any step up to 255 is valid) makes some of those values
/// larger than 8-bit samples can give; the area filter refused such files while bicubic
/// decoded them.
#[test]
fn the_generic_path_finds_the_corruption_the_fast_path_finds() {
    let mut refused = 0;
    for path in real_jpegs().iter().take(20) {
        let good = std::fs::read(path).unwrap();
        // the first AC step of the first quantisation table (8-bit precision)
        let dqt = good.windows(2).position(|w| w == [0xFF, 0xDB]).unwrap();
        assert_eq!(good[dqt + 4] >> 4, 0, "{}: a 16-bit table", path.display());
        let mut b = good.clone();
        b[dqt + 4 + 1 + 1] = 255;
        for size in [106, 32] {
            let area = PrepConfig {
                size,
                ..PrepConfig::default()
            };
            let bicubic = PrepConfig {
                filter: Filter::Bicubic,
                ..area.clone()
            };
            // (the fast path reads both sizes with the area filter, never with bicubic)
            assert!(matches!(
                fast::try_prep(&good, &bicubic, &mut vec![f16::ZERO; bicubic.image_len()]),
                fast::Outcome::NotApplicable
            ));
            match (prep_jpeg(&b, &area), prep_jpeg(&b, &bicubic)) {
                (Ok(_), Ok(_)) => {}
                (Err(PrepError::Decode(a)), Err(PrepError::Decode(g))) => {
                    assert_eq!(a, g, "{}", path.display());
                    assert!(a.contains("AC coefficient out of range"), "{a}");
                    refused += 1;
                }
                (a, g) => panic!(
                    "{} at {size}: area {:?}, bicubic {:?}",
                    path.display(),
                    a.err(),
                    g.err()
                ),
            }
        }
    }
    assert!(
        refused >= 4,
        "only {refused} refused: the test no longer makes an out-of-range value"
    );
}

/// What the corruption checks must let through: anything after the end-of-image marker (MPF
/// images, vendor trailers), and DC terms up to ±(1024 + q0) (encoders that do not clamp
/// chroma, like stb_image_write at quality 90 and up, write 8 × 127.5 = 1020 for pure blue).
#[test]
fn sound_files_pass_the_corruption_checks() {
    let sizes = [
        PrepConfig::default(),
        PrepConfig {
            size: 32,
            ..PrepConfig::default()
        },
    ];
    let good = std::fs::read(&real_jpegs()[2]).unwrap();
    let mut trailer = good.clone();
    trailer.extend([0u8; 100]);
    trailer.extend(b"\xFF\xD8 another image's start");
    for cfg in &sizes {
        assert_eq!(
            prep_jpeg(&trailer, cfg).unwrap(),
            prep_jpeg(&good, cfg).unwrap(),
            "data after EOI, size {}",
            cfg.size
        );
    }
    for q0 in [1.0, 2.0, 3.0, 16.0] {
        assert!(fast::dc_in_range(1020.0, q0) && fast::dc_in_range(-1024.0 - q0, q0));
        assert!(!fast::dc_in_range(1024.0 + q0 + 1.0, q0) && !fast::dc_in_range(-1025.0 - q0, q0));
    }
}

/// A header claiming a huge frame (a 20 KB file can say 65,500²) is refused at once, on both
/// paths, instead of decoding gigabytes of nothing.
#[test]
fn a_frame_header_claiming_a_huge_image_is_refused() {
    let good = std::fs::read(&real_jpegs()[0]).unwrap();
    let sof = good
        .windows(2)
        .position(|w| w[0] == 0xFF && (w[1] == 0xC0 || w[1] == 0xC1))
        .expect("a baseline frame header");
    let mut b = good.clone();
    // FF C0, length (2 bytes), precision, height (2), width (2)
    b[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]);
    for filter in [Filter::Area, Filter::Bicubic] {
        let cfg = PrepConfig {
            filter,
            ..PrepConfig::default()
        };
        let t = std::time::Instant::now();
        let e = prep_jpeg(&b, &cfg).unwrap_err().to_string();
        assert!(e.contains("65500×65500"), "{filter:?}: {e}");
        assert!(t.elapsed().as_secs() < 5, "{filter:?}: refused only after decoding");
    }
    let e = generic::decode_rgb8(&b).unwrap_err().to_string();
    assert!(e.contains("65500×65500"), "{e}");
}

/// A small file whose header claims 16384×16384 (under the pixel cap): a reduction (version 2)
/// finds the data too short or out of range before it allocates the claimed crop (a 64×64
/// image's worth of data cannot fill it; 1 GB of planes at crop 424).
#[test]
fn a_reduction_checks_a_huge_claim_before_allocating_it() {
    let rgb = synthetic(64, 64);
    let mut b = encode(&rgb, 64, 64, jpeg_encoder::ColorType::Rgb, |e| {
        e.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_4_4)
    });
    let sof = b
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline frame header");
    b[sof + 5..sof + 9].copy_from_slice(&[0x40, 0x00, 0x40, 0x00]);
    let cfg = PrepConfig {
        crop: 424,
        size: 32,
        filter: Filter::Area,
    };
    fast::LARGEST_PLANE.with(|l| l.set(0));
    let mut out = vec![f16::ZERO; cfg.image_len()];
    assert!(matches!(fast::try_prep(&b, &cfg, &mut out), fast::Outcome::Corrupt(_)));
    let largest = fast::LARGEST_PLANE.with(|l| l.get());
    assert!(
        largest < 1 << 20,
        "allocated a {largest}-sample plane for a damaged file"
    );
}

// ---- whole runs on a small dataset -------------------------------------------------------

fn copy_mini(dst: &Path) -> PathBuf {
    let src = fixtures().join("kaggle-mini");
    let data = dst.join("data");
    for sub in [dataset::TRAIN_DIR, dataset::TEST_DIR] {
        std::fs::create_dir_all(data.join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), data.join(sub).join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(src.join(dataset::SOLUTIONS_CSV), data.join(dataset::SOLUTIONS_CSV)).unwrap();
    data
}

#[test]
fn run_writes_a_cache_then_hits_it() {
    let t = tempfile::tempdir().unwrap();
    let data = copy_mini(t.path());
    let root = t.path().join("cache");
    let cfg = PrepConfig::default();
    let mut opts = RunOptions::new(&data, &root);
    opts.threads = Some(2);
    opts.rows_per_shard = 2;
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let s = run_with(&opts, &cfg, &|_| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap();
    assert!(!s.cache_hit && s.train == 3 && s.test == 3 && s.skipped.is_empty());
    assert!(calls.into_inner() >= 4);
    let c = gz_shards::Cache::open(&s.cache_dir).unwrap();
    let tr = c.train().unwrap();
    assert_eq!(tr.rows_per_shard(), 2);
    // the cached image equals prep_jpeg of the file
    let want = prep_jpeg(
        &std::fs::read(data.join(dataset::TRAIN_DIR).join(format!("{}.jpg", tr.ids()[2]))).unwrap(),
        &cfg,
    )
    .unwrap();
    assert_eq!(tr.image(2), want.as_slice());
    let again = run_with(&opts, &cfg, &|_| {}).unwrap();
    assert!(again.cache_hit);
    assert_eq!(again.cache_dir, s.cache_dir);
    assert_eq!(run(&data, &root, &cfg).unwrap(), s.cache_dir);
    // a different config: a new directory
    let other = run(
        &data,
        &root,
        &PrepConfig {
            crop: 207,
            size: 69,
            filter: Filter::Area,
        },
    )
    .unwrap();
    assert_ne!(other, s.cache_dir);
}

#[test]
fn strict_run_stops_and_publishes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let data = copy_mini(t.path());
    std::fs::write(
        data.join(dataset::TEST_DIR).join("999999.jpg"),
        b"\xff\xd8\xff\xe0 broken",
    )
    .unwrap();
    let root = t.path().join("cache");
    let mut opts = RunOptions::new(&data, &root);
    opts.strict = true;
    let e = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap_err();
    assert!(matches!(e, PrepError::Strict { .. }), "{e}");
    assert!(e.to_string().contains("999999.jpg"));
    let entries: Vec<_> = std::fs::read_dir(&root)
        .map(|r| r.flatten().collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "nothing left behind: {entries:?}");
    // lenient: skipped, reported, cache written with the rest
    opts.strict = false;
    let s = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
    assert_eq!(s.skipped.len(), 1);
    assert_eq!(s.test, 3);
    // strict again, now on that lenient run's cache: still an error naming the file
    opts.strict = true;
    let e = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap_err();
    assert!(
        matches!(e, PrepError::Strict { .. }) && e.to_string().contains("999999.jpg"),
        "{e}"
    );
}

/// A dataset path that is not UTF-8 is refused before any decoding (the manifest records it as
/// text; it panicked after decoding every image); a file name that is not UTF-8 is skipped
/// with its reason and written to the manifest lossily.
#[cfg(target_os = "linux")]
#[test]
fn paths_that_are_not_utf8_are_refused_or_skipped_not_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    let t = tempfile::tempdir().unwrap();
    let odd = t.path().join(std::ffi::OsStr::from_bytes(b"bad\xffdir"));
    let data = copy_mini(&odd);
    let root = t.path().join("cache");
    let e = run(&data, &root, &PrepConfig::default()).unwrap_err();
    assert!(
        matches!(e, PrepError::Config(_)) && e.to_string().contains("not valid UTF-8"),
        "{e}"
    );
    assert!(!root.exists(), "nothing written");
    // a UTF-8 dataset with an image whose name is not
    let data = copy_mini(t.path());
    let name = std::ffi::OsStr::from_bytes(b"10\xfe.jpg");
    std::fs::copy(
        data.join(dataset::TEST_DIR)
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
        data.join(dataset::TEST_DIR).join(name),
    )
    .unwrap();
    let opts = RunOptions::new(&data, &root);
    let s = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
    assert_eq!((s.train, s.test, s.skipped.len()), (3, 3, 1), "{:?}", s.skipped);
    let again = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
    assert!(again.cache_hit && again.skipped.len() == 1);
}

/// A stop request (gz prep's Ctrl-C) ends the run after the chunk being decoded with
/// `Interrupted`, and the unfinished cache is gone: nothing in the cache root (killed, the run
/// left a hidden `.NAME.tmp-PID` folder).
#[test]
fn a_stop_request_ends_the_run_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let test_dir = t.path().join("data").join(dataset::TEST_DIR);
    std::fs::create_dir_all(&test_dir).unwrap();
    let jpeg = std::fs::read(&real_jpegs()[0]).unwrap();
    let n = super::run::CHUNK + 1;
    for i in 0..n {
        std::fs::write(test_dir.join(format!("{}.jpg", 100_000 + i)), &jpeg).unwrap();
    }
    let root = t.path().join("cache");
    let mut opts = RunOptions::new(&t.path().join("data"), &root);
    opts.stop_requested = Some(|| true);
    let e = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap_err();
    assert!(
        matches!(e, PrepError::Interrupted { split: "test", done, total } if done as usize == super::run::CHUNK && total as usize == n),
        "{e}"
    );
    assert!(e.to_string().contains("nothing was written"), "{e}");
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // not asked to stop: the whole run
    opts.stop_requested = Some(|| false);
    assert_eq!(run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap().test, n);
}

/// Labels that break the decision tree in more than a stray row (per-question fractions, a
/// table of ones) are refused, naming a row and the question; one stray row is let through
/// (with a warning).
#[test]
fn labels_that_break_the_tree_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let data = copy_mini(t.path());
    let csv = data.join(dataset::SOLUTIONS_CSV);
    let text = std::fs::read_to_string(&csv).unwrap();
    let ones = |line: &str| {
        let id = line.split(',').next().unwrap().to_string();
        std::iter::once(id)
            .chain(std::iter::repeat_n("1".to_string(), 37))
            .collect::<Vec<_>>()
            .join(",")
    };
    let with_ones = |rows: usize| {
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        for l in lines.iter_mut().skip(1).take(rows) {
            *l = ones(l);
        }
        lines.join("\n") + "\n"
    };
    std::fs::write(&csv, with_ones(2)).unwrap();
    let e = run(&data, &t.path().join("c"), &PrepConfig::default()).unwrap_err();
    assert!(
        e.to_string().contains("2 of 3 label rows break the decision tree") && e.to_string().contains("sum(Q1) = 3"),
        "{e}"
    );
    assert!(!t.path().join("c").exists(), "refused before anything was written");
    std::fs::write(&csv, with_ones(1)).unwrap();
    run(&data, &t.path().join("c"), &PrepConfig::default()).unwrap();
    // the real labels hold to the tree, also rounded to 2 decimals
    let real = gz_schema::read_solutions(&fixtures().join("kaggle-mini").join(dataset::SOLUTIONS_CSV)).unwrap();
    dataset::check_tree(&real, Path::new("x.csv")).unwrap();
    let mut rounded = gz_schema::Solutions::new();
    for i in 0..real.len() {
        let row: Vec<f32> = real.row(i).iter().map(|v| (v * 100.0).round() / 100.0).collect();
        rounded.push(real.ids[i], &row);
    }
    dataset::check_tree(&rounded, Path::new("x.csv")).unwrap();
    // on a larger set: a stray row or two pass (with a warning), more than 1 % do not; a
    // one-row file of per-question fractions does not either
    let good = real.row(0).to_vec();
    let table = |n: usize, bad: usize| {
        let mut s = gz_schema::Solutions::new();
        for i in 0..n {
            s.push(100_000 + i as u64, &if i < bad { vec![1.0; 37] } else { good.clone() });
        }
        s
    };
    dataset::check_tree(&table(300, 2), Path::new("x.csv")).unwrap();
    let e = dataset::check_tree(&table(300, 4), Path::new("x.csv")).unwrap_err();
    assert!(e.to_string().contains("4 of 300 label rows"), "{e}");
    assert!(dataset::check_tree(&table(1, 1), Path::new("x.csv")).is_err());
}

#[test]
fn no_dataset_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let e = run(t.path(), &t.path().join("c"), &PrepConfig::default()).unwrap_err();
    assert!(matches!(e, PrepError::NoInput(_)), "{e}");
}

/// Training images without their labels (the CSV missing, or a folder of that name) are an
/// error naming the CSV, not a run that silently preprocesses the test images alone; a
/// test-only dataset (no training folder) still preprocesses.
#[test]
fn training_images_without_their_csv_are_an_error() {
    let t = tempfile::tempdir().unwrap();
    let data = copy_mini(t.path());
    let csv = data.join(dataset::SOLUTIONS_CSV);
    std::fs::remove_file(&csv).unwrap();
    let e = run(&data, &t.path().join("c1"), &PrepConfig::default()).unwrap_err();
    assert!(matches!(e, PrepError::NoInput(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("there is no training_solutions_rev1.csv") && msg.contains("holds 3 files"),
        "{msg}"
    );
    std::fs::create_dir(&csv).unwrap();
    let msg = run(&data, &t.path().join("c2"), &PrepConfig::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("is not a file"), "{msg}");
    std::fs::remove_dir(&csv).unwrap();
    std::fs::remove_dir_all(data.join(dataset::TRAIN_DIR)).unwrap();
    run(&data, &t.path().join("c3"), &PrepConfig::default()).expect("a test-only dataset");
}

/// A file named with leading zeros (`0105761.jpg`) is read under its own name, and of two
/// files with the same GalaxyID the one named by it (`<id>.jpg`) is read, whichever the
/// listing gives first (`0105761.jpg`, `105761.JPG` sort before it), the other skipped naming it.
#[test]
fn image_files_are_read_under_their_own_names() {
    let t = tempfile::tempdir().unwrap();
    let data = copy_mini(t.path());
    let sol = gz_schema::read_solutions(&data.join(dataset::SOLUTIONS_CSV)).unwrap();
    let id = sol.ids[0];
    let train = data.join(dataset::TRAIN_DIR);
    std::fs::rename(train.join(format!("{id}.jpg")), train.join(format!("00{id}.jpg"))).unwrap();
    let test = data.join(dataset::TEST_DIR);
    let tid: u64 = std::fs::read_dir(&test)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // (another image's bytes under the copy's name: which file was read shows in the cache)
    let other = std::fs::read_dir(&test)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| !p.ends_with(format!("{tid}.jpg")))
        .unwrap();
    std::fs::copy(&other, test.join(format!("0{tid}.jpg"))).unwrap();
    let id1 = sol.ids[1];
    // three files of one galaxy, in byte order 0<id>.jpg, <id>.JPG, <id>.jpg: the last is read,
    // and both others name it (the first skip named 0<id>.jpg, read until <id>.jpg came)
    std::fs::copy(train.join(format!("{id1}.jpg")), train.join(format!("{id1}.JPG"))).unwrap();
    std::fs::copy(train.join(format!("{id1}.jpg")), train.join(format!("0{id1}.jpg"))).unwrap();
    let mut opts = RunOptions::new(&data, &t.path().join("cache"));
    opts.threads = Some(1);
    let s = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
    assert_eq!((s.train, s.test), (3, 3), "{:?}", s.skipped);
    assert_eq!(s.skipped.len(), 3, "{:?}", s.skipped);
    for (sk, loser, kept) in [
        (&s.skipped[0], format!("{id1}.JPG"), format!("{id1}.jpg")),
        (&s.skipped[1], format!("0{id1}.jpg"), format!("{id1}.jpg")),
        (&s.skipped[2], format!("0{tid}.jpg"), format!("{tid}.jpg")),
    ] {
        assert!(
            sk.path.file_name().unwrap() == loser.as_str()
                && sk.reason == format!("GalaxyID {} again (read from {kept})", kept.trim_end_matches(".jpg")),
            "{sk:?}"
        );
    }
    // the test row of `tid` holds its own image, not the copy's
    let cache = gz_shards::Cache::open(&s.cache_dir).unwrap();
    let split = cache.test().unwrap();
    let row = split.ids().iter().position(|&i| i == tid).unwrap();
    let own = prep_jpeg(
        &std::fs::read(test.join(format!("{tid}.jpg"))).unwrap(),
        &PrepConfig::default(),
    )
    .unwrap();
    assert_eq!(split.image(row), own.as_slice());
}

/// Of two files of one galaxy, one that can be read wins over the canonical name that cannot
/// (the galaxy was skipped as unreadable while its copy could be read). Permissions bind only
/// a user other than root: as root the scan is told the file cannot be read.
#[test]
fn a_readable_copy_of_a_galaxy_wins_over_an_unreadable_one() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let data = copy_mini(t.path());
    let sol = gz_schema::read_solutions(&data.join(dataset::SOLUTIONS_CSV)).unwrap();
    let id = sol.ids[0];
    let train = data.join(dataset::TRAIN_DIR);
    std::fs::copy(train.join(format!("{id}.jpg")), train.join(format!("0{id}.jpg"))).unwrap();
    let canonical = train.join(format!("{id}.jpg"));
    std::fs::set_permissions(&canonical, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(&canonical).is_ok() {
        dataset::UNREADABLE_IN_TESTS.with(|u| u.borrow_mut().push(canonical.clone()));
    }
    let mut opts = RunOptions::new(&data, &t.path().join("cache"));
    opts.threads = Some(1);
    let s = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
    dataset::UNREADABLE_IN_TESTS.with(|u| u.borrow_mut().clear());
    std::fs::set_permissions(&canonical, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!((s.train, s.test), (3, 3), "{:?}", s.skipped);
    assert_eq!(s.skipped.len(), 1, "{:?}", s.skipped);
    assert_eq!(s.skipped[0].path, canonical);
    assert_eq!(
        s.skipped[0].reason,
        format!("GalaxyID {id} again (read from 0{id}.jpg)")
    );
}

/// Linked images are read through their links (a dangling link is skipped with its reason); a
/// layout folder that is a file is an error, not an empty split.
#[test]
fn linked_images_count_and_a_layout_folder_must_be_a_folder() {
    let t = tempfile::tempdir().unwrap();
    let data = copy_mini(t.path());
    let sol = gz_schema::read_solutions(&data.join(dataset::SOLUTIONS_CSV)).unwrap();
    let train = data.join(dataset::TRAIN_DIR);
    let elsewhere = t.path().join("elsewhere.jpg");
    let linked = train.join(format!("{}.jpg", sol.ids[0]));
    std::fs::rename(&linked, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &linked).unwrap();
    std::os::unix::fs::symlink(t.path().join("nowhere.jpg"), train.join("999.jpg")).unwrap();
    let mut opts = RunOptions::new(&data, &t.path().join("cache"));
    opts.threads = Some(1);
    let s = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
    assert_eq!((s.train, s.test), (3, 3), "{:?}", s.skipped);
    assert_eq!(s.skipped.len(), 1, "{:?}", s.skipped);
    assert!(
        s.skipped[0].path.ends_with("999.jpg") && s.skipped[0].reason.contains("symbolic link to nothing"),
        "{:?}",
        s.skipped
    );

    let test = data.join(dataset::TEST_DIR);
    std::fs::remove_dir_all(&test).unwrap();
    std::fs::write(&test, "not a folder").unwrap();
    let e = run_with(&opts, &PrepConfig::default(), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("images_test_rev1") && e.contains("not a folder"), "{e}");
}

/// `.JPG` and `.jpeg` (any case) are JPEGs too, as `gz predict --images` and `gz submit --ids`
/// read them: a download renamed by another tool keeps every image (prep skipping them left a
/// submission of training means).
#[test]
fn upper_case_and_jpeg_extensions_are_images() {
    let t = tempfile::tempdir().unwrap();
    let data = copy_mini(t.path());
    let mut opts = RunOptions::new(&data, &t.path().join("cache"));
    opts.threads = Some(1);
    for (sub, ext) in [(dataset::TRAIN_DIR, "JPG"), (dataset::TEST_DIR, "jpeg")] {
        let dir = data.join(sub);
        let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        let p = &names[0];
        std::fs::rename(p, p.with_extension(ext)).unwrap();
    }
    let s = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
    assert_eq!((s.train, s.test), (3, 3), "{:?}", s.skipped);
    assert!(s.skipped.is_empty(), "{:?}", s.skipped);
}

/// Hidden files are no images: macOS writes an AppleDouble `._<name>` beside every file it
/// copies onto a USB disk or a share, and a `.DS_Store` into folders. Before, each was a
/// "skipped: file name is not <GalaxyID>.jpg" line (one per image of the download) and made
/// `gz prep` exit with status 2; now they are passed over, and the dataset keeps its key.
#[test]
fn hidden_files_are_passed_over() {
    let t = tempfile::tempdir().unwrap();
    let data = copy_mini(t.path());
    let key = dataset::scan(&data).unwrap().key;
    for sub in [dataset::TRAIN_DIR, dataset::TEST_DIR] {
        let dir = data.join(sub);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        for n in names {
            let mut hidden = std::ffi::OsString::from("._");
            hidden.push(&n);
            std::fs::write(dir.join(hidden), b"\x00\x05\x16\x07 Mac OS X").unwrap();
        }
        std::fs::write(dir.join(".DS_Store"), b"\x00\x00\x00\x01Bud1").unwrap();
        std::fs::create_dir(dir.join(".ipynb_checkpoints")).unwrap();
    }
    let scan = dataset::scan(&data).unwrap();
    assert!(scan.skipped.is_empty(), "{:?}", scan.skipped);
    assert_eq!(scan.key, key, "hidden files changed the dataset key");
    let mut opts = RunOptions::new(&data, &t.path().join("cache"));
    opts.threads = Some(1);
    let s = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
    assert_eq!((s.train, s.test), (3, 3));
    assert!(s.skipped.is_empty(), "{:?}", s.skipped);

    // a test-only download whose training folder holds nothing but a Mac's `.DS_Store`: the
    // test images are prepared (it was "no training_solutions_rev1.csv but … holds 1 files")
    std::fs::remove_file(data.join(dataset::SOLUTIONS_CSV)).unwrap();
    let train = data.join(dataset::TRAIN_DIR);
    std::fs::remove_dir_all(&train).unwrap();
    std::fs::create_dir(&train).unwrap();
    std::fs::write(train.join(".DS_Store"), b"Bud1").unwrap();
    let scan = dataset::scan(&data).unwrap();
    assert!(scan.train.is_none() && scan.test.as_ref().map(Vec::len) == Some(3));
}

/// Some unzip tools make `images_training_rev1/images_training_rev1/*.jpg`: that is an error
/// saying where the images are, not a cache of no images. Any other folder among the images
/// is named as skipped, not passed over in silence.
#[test]
fn a_nested_image_folder_is_named() {
    let t = tempfile::tempdir().unwrap();
    let data = copy_mini(t.path());
    let train = data.join(dataset::TRAIN_DIR);
    let moved = t.path().join("moved");
    std::fs::rename(&train, &moved).unwrap();
    std::fs::create_dir(&train).unwrap();
    std::fs::rename(&moved, train.join(dataset::TRAIN_DIR)).unwrap();
    let mut opts = RunOptions::new(&data, &t.path().join("cache"));
    opts.threads = Some(1);
    let e = run_with(&opts, &PrepConfig::default(), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("images_training_rev1/images_training_rev1/") && e.contains("one level down"),
        "{e}"
    );
    assert!(!t.path().join("cache").exists());

    // moved up, with a stray folder left among the test images
    let nested = train.join(dataset::TRAIN_DIR);
    for f in std::fs::read_dir(&nested).unwrap() {
        let f = f.unwrap();
        std::fs::rename(f.path(), train.join(f.file_name())).unwrap();
    }
    std::fs::remove_dir(&nested).unwrap();
    std::fs::create_dir(data.join(dataset::TEST_DIR).join("more")).unwrap();
    let s = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
    assert_eq!((s.train, s.test), (3, 3), "{:?}", s.skipped);
    assert_eq!(s.skipped.len(), 1, "{:?}", s.skipped);
    assert!(
        s.skipped[0].path.ends_with("more") && s.skipped[0].reason.contains("folder"),
        "{:?}",
        s.skipped
    );
}

/// The frame header's channel count tells greyscale JPEGs (one channel, copied to all three by
/// the decoder) from colour ones, progressive and with other segments before the frame alike.
#[test]
fn jpeg_channels_tells_greyscale_from_colour() {
    use jpeg_encoder::ColorType;
    let rgb = synthetic(64, 48);
    let gray: Vec<u8> = rgb.chunks(3).map(|p| p[0]).collect();
    assert_eq!(
        crate::jpeg_channels(&encode(&rgb, 64, 48, ColorType::Rgb, |_| {})),
        Some(3)
    );
    assert_eq!(
        crate::jpeg_channels(&encode(&gray, 64, 48, ColorType::Luma, |_| {})),
        Some(1)
    );
    let prog = encode(&gray, 64, 48, ColorType::Luma, |e| e.set_progressive(true));
    assert_eq!(crate::jpeg_channels(&prog), Some(1));
    // and its size, width first
    assert_eq!(crate::jpeg_size(&prog), Some((64, 48)));
    assert_eq!(
        crate::jpeg_size(&encode(&synthetic(30, 70), 30, 70, ColorType::Rgb, |_| {})),
        Some((30, 70))
    );
    let cmyk: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], p[1], p[2], 0]).collect();
    assert_eq!(
        crate::jpeg_channels(&encode(&cmyk, 64, 48, ColorType::Cmyk, |_| {})),
        Some(4)
    );
    assert_eq!(crate::jpeg_channels(b""), None);
    assert_eq!(crate::jpeg_channels(b"\xFF\xD8\xFF\xE0\x00"), None);
    assert_eq!(crate::jpeg_channels(b"\xFF\xD8\xFF\xDA\x00\x02"), None);
    assert_eq!(crate::jpeg_size(b"\xFF\xD8\xFF\xDA\x00\x02"), None);
}

/// A greyscale JPEG is prepared (copied to the three channels) and counted, with its path, in
/// the summary and the manifest, so a cache hit says the same (the CLI warns once per run).
#[test]
fn greyscale_images_are_counted() {
    use jpeg_encoder::ColorType;
    let t = tempfile::tempdir().unwrap();
    let data = copy_mini(t.path());
    let mut opts = RunOptions::new(&data, &t.path().join("cache"));
    opts.threads = Some(1);
    let rgb = synthetic(424, 424);
    let gray: Vec<u8> = rgb.chunks(3).map(|p| p[0]).collect();
    let grey = data.join(dataset::TEST_DIR).join("242195.jpg");
    std::fs::write(&grey, encode(&gray, 424, 424, ColorType::Luma, |_| {})).unwrap();
    let s = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
    assert_eq!((s.train, s.test, s.skipped.len()), (3, 3, 0));
    assert_eq!((s.greyscale, s.greyscale_example.as_deref()), (1, Some(grey.as_path())));
    let again = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
    assert!(again.cache_hit);
    assert_eq!((again.greyscale, again.greyscale_example), (1, Some(grey)));
    // the fixture's colour images are not counted
    std::fs::remove_dir_all(t.path().join("cache")).unwrap();
    let colour = run_with(
        &RunOptions::new(&copy_mini(&t.path().join("c")), &t.path().join("cache")),
        &PrepConfig::default(),
        &|_| {},
    )
    .unwrap();
    assert_eq!((colour.greyscale, colour.greyscale_example), (0, None));
}

/// The manifest names skipped inputs and the first greyscale image relative to the dataset
/// root, and a cache hit names them under the dataset path given now: before, a hit through
/// another path to the same dataset (moved, linked, or given relative to another working
/// directory) printed the paths of the first `gz prep`. Caches written before (paths stored as
/// given then) are re-based the same way, under the same cache name.
#[test]
fn cached_input_paths_follow_the_dataset_path_given_now() {
    use jpeg_encoder::ColorType;
    let t = tempfile::tempdir().unwrap();
    let first = copy_mini(&t.path().join("first"));
    let rgb = synthetic(424, 424);
    let gray: Vec<u8> = rgb.chunks(3).map(|p| p[0]).collect();
    std::fs::write(
        first.join(dataset::TEST_DIR).join("242195.jpg"),
        encode(&gray, 424, 424, ColorType::Luma, |_| {}),
    )
    .unwrap();
    std::fs::write(first.join(dataset::TRAIN_DIR).join("notes.jpg"), b"x").unwrap();
    let root = t.path().join("cache");
    let mut opts = RunOptions::new(&first, &root);
    opts.threads = Some(1);
    let s = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
    assert_eq!((s.greyscale, s.skipped.len()), (1, 1), "{:?}", s.skipped);
    assert_eq!(s.skipped[0].path, first.join(dataset::TRAIN_DIR).join("notes.jpg"));
    let manifest_path = s.cache_dir.join(gz_shards::MANIFEST_FILE);
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(manifest["extra"]["greyscale_example"], "images_test_rev1/242195.jpg");
    assert_eq!(
        manifest["extra"]["skipped"][0]["path"],
        "images_training_rev1/notes.jpg"
    );

    // the same dataset somewhere else: the same cache, the paths under the new place
    let moved = t.path().join("moved");
    std::fs::rename(&first, &moved).unwrap();
    opts.data_dir = moved.clone();
    // a cache hit: the same cache, its paths under the dataset's place now
    let hit_under_moved = || {
        let hit = run_with(&opts, &PrepConfig::default(), &|_| {}).unwrap();
        assert!(hit.cache_hit);
        assert_eq!(hit.cache_dir, s.cache_dir);
        assert_eq!(
            hit.greyscale_example,
            Some(moved.join(dataset::TEST_DIR).join("242195.jpg"))
        );
        assert_eq!(hit.skipped[0].path, moved.join(dataset::TRAIN_DIR).join("notes.jpg"));
        hit
    };
    hit_under_moved();

    // a manifest of before (paths as given at the first prep, relative to its working directory)
    let mut old = manifest;
    old["extra"]["greyscale_example"] = "../elsewhere/data/images_test_rev1/242195.jpg".into();
    old["extra"]["skipped"][0]["path"] = "/gone/data/images_training_rev1/notes.jpg".into();
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&old).unwrap()).unwrap();
    let hit = hit_under_moved();
    assert_eq!(hit.skipped[0].reason, s.skipped[0].reason);
}

/// Structured damage to many JPEG layouts at several configs: never a panic, whichever path
/// runs. Byte overwrites, bit flips, cuts, insertions, deletions, copied ranges, marker bytes
/// and header fields set to extremes (0, 1, 0xFFFF), each on real images and on our own
/// encodings (baseline 4:4:4 / 4:2:0, grayscale, progressive, restart intervals, odd sizes).
/// `GZ_FUZZ=N` runs N mutations per (file, config) pair (default 12). Run on 2026-12-01 with
/// `GZ_FUZZ=3000` in the release build (144,000 damaged files) and `GZ_FUZZ=400` in the test
/// build (overflow checks on): no panic.
#[test]
fn structured_damage_never_panics() {
    let per: usize = std::env::var("GZ_FUZZ").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let mut files: Vec<Vec<u8>> = real_jpegs()[..3].iter().map(|p| std::fs::read(p).unwrap()).collect();
    let rgb = synthetic(424, 424);
    use jpeg_encoder::{ColorType, SamplingFactor};
    files.push(encode(&rgb, 424, 424, ColorType::Rgb, |e| e.set_progressive(true)));
    files.push(encode(&rgb, 424, 424, ColorType::Rgb, |e| {
        e.set_sampling_factor(SamplingFactor::R_4_2_0)
    }));
    files.push(encode(&rgb, 424, 424, ColorType::Rgb, |e| e.set_restart_interval(3)));
    let gray: Vec<u8> = rgb.chunks(3).map(|p| p[0]).collect();
    files.push(encode(&gray, 424, 424, ColorType::Luma, |_| {}));
    let odd = synthetic(37, 53);
    files.push(encode(&odd, 37, 53, ColorType::Rgb, |_| {}));
    let cfgs = [
        PrepConfig::default(),
        PrepConfig {
            size: 32,
            ..PrepConfig::default()
        },
        PrepConfig {
            size: 69,
            ..PrepConfig::default()
        },
        PrepConfig {
            filter: Filter::Bicubic,
            ..PrepConfig::default()
        },
        PrepConfig {
            crop: 424,
            size: 424,
            filter: Filter::Area,
        },
        PrepConfig {
            crop: 7,
            size: 3,
            filter: Filter::Area,
        },
    ];
    let mut state = 0x5851_f42d_4c95_7f2du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (fi, good) in files.iter().enumerate() {
        // offsets of the bytes after each marker's length field: header fields to damage
        let heads: Vec<usize> = good
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[0] == 0xFF && (0xC0..=0xFE).contains(&w[1]) && w[1] != 0xD9)
            .map(|(i, _)| i + 2)
            .take_while(|&i| i < good.len())
            .collect();
        for (ci, cfg) in cfgs.iter().enumerate() {
            for k in 0..per {
                let mut b = good.clone();
                for _ in 0..(1 + next() % 3) {
                    let n = b.len().max(1);
                    let i = (next() as usize) % n;
                    match next() % 9 {
                        0 => {
                            if i < b.len() {
                                b[i] = next() as u8
                            }
                        }
                        1 => {
                            if i < b.len() {
                                b[i] ^= 1 << (next() % 8)
                            }
                        }
                        2 => b.truncate(i),
                        3 => {
                            let ins: Vec<u8> = (0..(1 + next() % 16)).map(|_| next() as u8).collect();
                            b.splice(i..i, ins);
                        }
                        4 => {
                            let e = (i + 1 + (next() as usize) % 64).min(b.len());
                            b.drain(i.min(e)..e);
                        }
                        5 => {
                            let j = (next() as usize) % n;
                            let len = (1 + (next() as usize) % 32).min(b.len().saturating_sub(i.max(j)));
                            let src: Vec<u8> = b[j..j + len].to_vec();
                            b[i..i + len].copy_from_slice(&src);
                        }
                        6 => {
                            if i + 1 < b.len() {
                                b[i] = 0xFF;
                                b[i + 1] = [0xD8, 0xD9, 0xDA, 0xDB, 0xC4, 0xC0, 0xC2, 0xDD, 0xD0, 0x00, 0xFF]
                                    [(next() % 11) as usize];
                            }
                        }
                        _ => {
                            // a header field (2 bytes) at an extreme
                            if !heads.is_empty() {
                                let h = heads[(next() as usize) % heads.len()] + (next() as usize) % 12;
                                let v: u16 = [0, 1, 2, 0xFF, 0x100, 0xFFFF, 424, 425][(next() % 8) as usize];
                                if h + 1 < b.len() {
                                    b[h..h + 2].copy_from_slice(&v.to_be_bytes());
                                }
                            }
                        }
                    }
                }
                let r = std::panic::catch_unwind(|| {
                    let _ = prep_jpeg(&b, cfg);
                    let mut out = vec![f16::ZERO; cfg.image_len()];
                    let _ = fast::check_scan(&b, cfg);
                    let _ = fast::try_prep(&b, cfg, &mut out);
                    let _ = jpeg_size(&b);
                    let _ = jpeg_channels(&b);
                });
                if r.is_err() {
                    let path = std::env::temp_dir().join(format!("gz-fuzz-{fi}-{ci}-{k}.jpg"));
                    std::fs::write(&path, &b).unwrap();
                    panic!(
                        "file {fi} config {cfg:?} mutation {k}: panicked; bytes in {}",
                        path.display()
                    );
                }
            }
        }
    }
}

/// The layouts only the generic decoder turns into pixels (here CMYK, YCCK and 4:1:1
/// sampling) have their entropy-coded data checked too: a block of zeros in the middle (a
/// partly downloaded file) or a file cut short and closed with an EOI marker is an error (the
/// scan check's own), where jpeg-decoder decoded them to a wrong picture without a word; the
/// sound files pass, at the fast path's sizes and at the generic path's.
#[test]
fn damaged_data_of_generic_only_layouts_is_reported() {
    use jpeg_encoder::{ColorType, SamplingFactor};
    let rgb = synthetic(424, 424);
    let cmyk: Vec<u8> = rgb
        .chunks(3)
        .flat_map(|p| [255 - p[0], 255 - p[1], 255 - p[2], 0])
        .collect();
    let files = [
        ("cmyk", encode(&cmyk, 424, 424, ColorType::Cmyk, |_| {})),
        ("ycck", encode(&cmyk, 424, 424, ColorType::CmykAsYcck, |_| {})),
        // a real galaxy at half size, 4:1:1 in one interleaved scan as libjpeg writes it (`djpeg
        // -scale 1/2 -ppm`, `cjpeg -sample 4x1,1x1,1x1 -quality 90`; jpeg-encoder writes such
        // sampling as one scan per component, which no check here reads)
        ("4:1:1", include_bytes!("../testdata/real-411.jpg").to_vec()),
    ];
    // (jpeg-encoder's 4:1:1: left to the generic decoder, unchecked)
    let separate = encode(&rgb, 424, 424, ColorType::Rgb, |e| {
        e.set_sampling_factor(SamplingFactor::R_4_1_1)
    });
    assert!(matches!(
        fast::check_scan(&separate, &PrepConfig::default()),
        fast::Outcome::NotApplicable
    ));
    for cfg in [
        PrepConfig::default(),
        PrepConfig {
            filter: Filter::Bicubic,
            ..PrepConfig::default()
        },
    ] {
        for (what, good) in &files {
            assert!(
                matches!(
                    fast::try_prep(good, &cfg, &mut vec![f16::ZERO; cfg.image_len()]),
                    fast::Outcome::NotApplicable
                ),
                "{what}: the fast path's own"
            );
            let o = fast::check_scan(good, &cfg);
            assert!(matches!(o, fast::Outcome::Done), "{what}: {o:?}");
            prep_jpeg(good, &cfg).unwrap_or_else(|e| panic!("{what}: {e}"));
            let scan = scan_range(good);
            let mid = (scan.start + scan.end) / 2;
            let mut zeroed = good.clone();
            zeroed[mid - 2048..mid + 2048].fill(0);
            let mut cut = good[..mid].to_vec();
            cut.extend_from_slice(&[0xFF, 0xD9]);
            for (how, bad) in [("zeroed", &zeroed), ("cut", &cut)] {
                assert!(
                    prep_jpeg(bad, &cfg).is_err(),
                    "{what}, {how}, {:?}: accepted",
                    cfg.filter
                );
                let o = fast::check_scan(bad, &cfg);
                assert!(matches!(o, fast::Outcome::Corrupt(_)), "{what}, {how}: {o:?}");
            }
        }
    }
}

/// A scan whose components are not in the frame's order (swapped, or one named twice) is
/// refused on every path: the fast path took it (the same pixels) where jpeg-decoder refused
/// it, so whether the image was prepared depended on the config (found by QA).
#[test]
fn a_scan_out_of_the_frames_order_is_refused_by_every_config() {
    let good = std::fs::read(&real_jpegs()[1]).unwrap();
    let sos = good.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    // SOS: FF DA, length (2), ns, then (id, tables) per component
    assert_eq!(good[sos + 4], 3);
    // Cb and Cr (the same tables: the fast path decoded the same pixels from it)
    let (cb, cr) = (sos + 7, sos + 9);
    assert_eq!(good[cb + 1], good[cr + 1]);
    let mut swapped = good.clone();
    swapped.swap(cb, cr);
    let mut twice = good.clone();
    twice[cr] = twice[cb];
    // and the frame's own faults jpeg-decoder refuses: one identifier for all components
    // (frame and scan), more than 10 blocks per MCU, a baseline scan naming Huffman table 2
    let sof = good.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    assert_eq!(good[sof + 9], 3);
    let frame_comp = |k: usize| sof + 10 + 3 * k;
    let mut one_id = good.clone();
    for k in 0..3 {
        one_id[frame_comp(k)] = 1;
        one_id[sos + 5 + 2 * k] = 1;
    }
    let mut big_mcu = good.clone();
    for k in 0..3 {
        big_mcu[frame_comp(k) + 1] = 0x22;
    }
    let mut table2 = good.clone();
    table2[cr + 1] = 0x22;
    for cfg in [
        PrepConfig::default(),
        PrepConfig {
            size: 32,
            ..PrepConfig::default()
        },
        PrepConfig {
            filter: Filter::Bicubic,
            ..PrepConfig::default()
        },
    ] {
        prep_jpeg(&good, &cfg).unwrap();
        for (what, b) in [
            ("swapped", &swapped),
            ("twice", &twice),
            ("one id", &one_id),
            ("12 blocks per MCU", &big_mcu),
            ("table 2", &table2),
        ] {
            assert!(prep_jpeg(b, &cfg).is_err(), "{what}, {cfg:?}: accepted");
        }
    }
}
