//! Single-thread preprocessing throughput on a directory of JPEGs, for `docs/benchmarks.md`.
//!
//! `cargo run --release -p gz-preprocess --example bench -- DIR [REPEATS] [SIZE]` prints one JSON
//! line with images/s (best of REPEATS passes, default 3) for: our `prep_jpeg` with the default
//! config (or `--size SIZE`: crop 212, area filter)
//! reading each file from disk like Pillow does (`prep_img_s`), the same on bytes already in
//! memory (`prep_mem_img_s`), the generic path (full jpeg-decoder decode + area resample,
//! `generic_img_s`) and, at size 106, jpeg-decoder's own DCT-scaled decode at 1/2 + crop
//! (`jpegdec_scale_img_s`).
//! `*_cpu_img_s` divide by the thread's CPU time (from `/proc/thread-self/schedstat`) instead
//! of wall time: robust on a busy machine; compare with `bench/pil_cpu.py`, which does the same
//! for Pillow.
#![allow(clippy::print_stdout, reason = "a benchmark binary prints its result")]

use std::time::Instant;

use gz_preprocess::{generic, prep_jpeg_into, PrepConfig};
use half::f16;

/// CPU time of this thread in nanoseconds (Linux), if available.
fn cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).ok_or("usage: bench DIR [REPEATS] [SIZE]")?;
    let repeats: usize = args.get(2).map_or(Ok(3), |s| s.parse())?;
    let size: u32 = args.get(3).map_or(Ok(106), |s| s.parse())?;
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    let blobs: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let cfg = PrepConfig {
        size,
        ..PrepConfig::default()
    };
    let mut out = vec![f16::ZERO; cfg.image_len()];
    let n = files.len() as f64;
    let mut cpu_rates = Vec::new();
    let mut best =
        |f: &mut dyn FnMut() -> Result<(), Box<dyn std::error::Error>>| -> Result<f64, Box<dyn std::error::Error>> {
            let mut best = 0f64;
            let mut best_cpu = 0f64;
            for _ in 0..repeats {
                let t = Instant::now();
                let c = cpu_ns();
                f()?;
                best = best.max(n / t.elapsed().as_secs_f64());
                if let (Some(a), Some(b)) = (c, cpu_ns()) {
                    best_cpu = best_cpu.max(n / ((b - a) as f64 * 1e-9));
                }
            }
            cpu_rates.push(best_cpu);
            Ok(best)
        };
    let mut fails = 0usize;
    let prep = best(&mut || {
        for p in &files {
            let bytes = std::fs::read(p)?;
            if prep_jpeg_into(&bytes, &cfg, &mut out).is_err() {
                fails += 1;
            }
        }
        Ok(())
    })?;
    let prep_mem = best(&mut || {
        for b in &blobs {
            prep_jpeg_into(b, &cfg, &mut out)?;
        }
        Ok(())
    })?;
    let generic = best(&mut || {
        for b in &blobs {
            generic::prep(b, &cfg, &mut out)?;
        }
        Ok(())
    })?;
    let jpegdec = best(&mut || {
        if size != 106 {
            return Ok(()); // (a 1/2-scaled decode is the 106-px recipe only)
        }
        for b in &blobs {
            let mut d = jpeg_decoder::Decoder::new(b.as_slice());
            d.scale(212, 212)?;
            let px = d.decode()?;
            let info = d.info().ok_or("no info")?;
            let (w, h) = (info.width as usize, info.height as usize);
            let (l, t) = ((w - 106) / 2, (h - 106) / 2);
            for c in 0..3 {
                for y in 0..106 {
                    for x in 0..106 {
                        out[c * 106 * 106 + y * 106 + x] =
                            f16::from_f32(px[((t + y) * w + l + x) * 3 + c] as f32 / 255.0);
                    }
                }
            }
        }
        Ok(())
    })?;
    // (no 1/2-scaled decode at other sizes: null)
    let (jpegdec, jpegdec_cpu) = if size == 106 {
        (format!("{jpegdec:.1}"), format!("{:.1}", cpu_rates[3]))
    } else {
        ("null".to_string(), "null".to_string())
    };
    println!(
        "{{\"n\": {}, \"size\": {size}, \"threads\": 1, \"prep_img_s\": {prep:.1}, \"prep_mem_img_s\": {prep_mem:.1}, \"generic_img_s\": {generic:.1}, \"jpegdec_scale_img_s\": {jpegdec}, \"prep_cpu_img_s\": {:.1}, \"prep_mem_cpu_img_s\": {:.1}, \"generic_cpu_img_s\": {:.1}, \"jpegdec_scale_cpu_img_s\": {jpegdec_cpu}, \"failures\": {fails}}}",
        files.len(),
        cpu_rates[0],
        cpu_rates[1],
        cpu_rates[2],
    );
    Ok(())
}
