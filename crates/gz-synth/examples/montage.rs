//! `montage`: a grid of synthetic beside real galaxy JPEGs, for `docs/img/synthetic-vs-real.png`.
//!
//! Usage:
//! - `cargo run -p gz-synth --example montage` generates 16 synthetic training images (seed 0)
//!   into a temporary directory, takes the first 16 real JPEGs (sorted by name) from
//!   `../shared/fixtures/real-test-jpegs`, and writes `docs/img/synthetic-vs-real.png`
//!   (top half synthetic, bottom half real, half-size thumbnails).
//! - `cargo run -p gz-synth --example montage -- --out X.png [--cols 4] [--scale 1] FILE.jpg...`
//!   tiles the given JPEGs (a quick viewer while tuning realism);
//! - `-- --stats FILE.jpg...` prints sky mean/std, centre colour and bright-pixel fraction
//!   (medians), to calibrate the synthetic sky and stretch against the real cutouts;
//! - `-- --gen DIR N [--seed S]` writes N synthetic training images into DIR.
//!
//! Not part of the library: only the example uses the `image` crate.

use std::path::{Path, PathBuf};

use image::{imageops, RgbImage};

fn load(path: &Path) -> Result<RgbImage, String> {
    image::open(path)
        .map(|i| i.to_rgb8())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn tile(paths: &[PathBuf], cols: u32, scale: f32, gap: u32) -> Result<RgbImage, String> {
    let side = (424.0 * scale).round() as u32;
    let rows = (paths.len() as u32).div_ceil(cols);
    let mut out = RgbImage::from_pixel(
        cols * (side + gap) - gap,
        rows.max(1) * (side + gap) - gap,
        image::Rgb([60, 60, 60]),
    );
    for (i, p) in paths.iter().enumerate() {
        let img = load(p)?;
        let img = if img.width() != side || img.height() != side {
            imageops::resize(&img, side, side, imageops::FilterType::Triangle)
        } else {
            img
        };
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        imageops::replace(&mut out, &img, i64::from(c * (side + gap)), i64::from(r * (side + gap)));
    }
    Ok(out)
}

fn sorted_jpegs(dir: &Path, n: usize) -> Result<Vec<PathBuf>, String> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    v.sort();
    v.truncate(n);
    Ok(v)
}

/// Sky statistics of each file (outer 40-pixel frame, per channel mean and std, 0..255),
/// and the median over files: to calibrate the sky noise and stretch against real cutouts.
fn print_stats(files: &[PathBuf]) -> Result<(), String> {
    let mut rows = Vec::new();
    for p in files {
        let img = load(p)?;
        let (w, h) = img.dimensions();
        let mut acc = [[0f64; 2]; 3];
        let mut n = 0f64;
        let mut centre = [0f64; 3];
        for (x, y, px) in img.enumerate_pixels() {
            if x < 40 || y < 40 || x >= w - 40 || y >= h - 40 {
                for c in 0..3 {
                    let v = f64::from(px[c]);
                    acc[c][0] += v;
                    acc[c][1] += v * v;
                }
                n += 1.0;
            }
            if (x as i64 - 212).abs() < 3 && (y as i64 - 212).abs() < 3 {
                for c in 0..3 {
                    centre[c] += f64::from(px[c]) / 36.0;
                }
            }
        }
        let m: Vec<f64> = (0..3).map(|c| acc[c][0] / n).collect();
        let s: Vec<f64> = (0..3).map(|c| (acc[c][1] / n - m[c] * m[c]).max(0.0).sqrt()).collect();
        // fraction of pixels brighter than 40 (how much of the image the objects cover)
        let bright = img
            .pixels()
            .filter(|p| (u32::from(p[0]) + u32::from(p[1]) + u32::from(p[2])) / 3 > 40)
            .count() as f64
            / f64::from(w * h);
        rows.push([
            m[0],
            m[1],
            m[2],
            s[0],
            s[1],
            s[2],
            centre[0],
            centre[1],
            centre[2],
            bright * 100.0,
        ]);
    }
    let med = |k: usize| {
        let mut v: Vec<f64> = rows.iter().map(|r| r[k]).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!("median over {} files: sky mean R {:.1} G {:.1} B {:.1}; sky std R {:.1} G {:.1} B {:.1}; centre R {:.0} G {:.0} B {:.0}; % pixels > 40: {:.2}",
        rows.len(), med(0), med(1), med(2), med(3), med(4), med(5), med(6), med(7), med(8), med(9));
    Ok(())
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut out = root.join("docs/img/synthetic-vs-real.png");
    let mut cols = 8u32;
    let mut scale = 0.5f32;
    let mut seed = 0u64;
    let mut files = Vec::new();
    let mut stats = false;
    let mut gen: Option<(PathBuf, usize)> = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(it.next().ok_or("--out needs a value")?),
            "--cols" => cols = it.next().and_then(|v| v.parse().ok()).ok_or("--cols needs a number")?,
            "--scale" => scale = it.next().and_then(|v| v.parse().ok()).ok_or("--scale needs a number")?,
            "--seed" => seed = it.next().and_then(|v| v.parse().ok()).ok_or("--seed needs a number")?,
            "--stats" => stats = true,
            "--gen" => {
                let dir = PathBuf::from(it.next().ok_or("--gen needs DIR N")?);
                let n = it.next().and_then(|v| v.parse().ok()).ok_or("--gen needs DIR N")?;
                gen = Some((dir, n));
            }
            _ => files.push(PathBuf::from(a)),
        }
    }
    if let Some((dir, n)) = gen {
        // write N training images (no test split) with --seed into DIR, for --stats and viewing
        let cfg = gz_synth::SynthConfig {
            train: n,
            test: 0,
            seed,
            ..Default::default()
        };
        let t = std::time::Instant::now();
        gz_synth::generate(&dir, &cfg, &|_| {}).map_err(|e| e.to_string())?;
        println!("generated {n} in {:.2} s", t.elapsed().as_secs_f64());
        return Ok(());
    }
    if stats {
        return print_stats(&files);
    }
    let img = if !files.is_empty() {
        tile(&files, cols, scale, 4)?
    } else {
        let tmp = std::env::temp_dir().join(format!("gz-montage-{}", std::process::id()));
        let cfg = gz_synth::SynthConfig {
            train: 16,
            test: 0,
            seed,
            ..Default::default()
        };
        gz_synth::generate(&tmp, &cfg, &|_| {}).map_err(|e| e.to_string())?;
        let synth = sorted_jpegs(&tmp.join("images_training_rev1"), 16)?;
        let real = sorted_jpegs(&root.join("../shared/fixtures/real-test-jpegs"), 16)?;
        let a = tile(&synth, cols, scale, 4)?;
        let b = tile(&real, cols, scale, 4)?;
        let _ = std::fs::remove_dir_all(&tmp);
        let gap = 16;
        let mut both = RgbImage::from_pixel(a.width(), a.height() + gap + b.height(), image::Rgb([255, 255, 255]));
        imageops::replace(&mut both, &a, 0, 0);
        imageops::replace(&mut both, &b, 0, i64::from(a.height() + gap));
        both
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    img.save(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}
