//! The generic path: full decode with `jpeg-decoder` (any JPEG it reads: baseline, progressive,
//! grayscale, CMYK/YCCK, any size), then the centre crop and an exact area-weighted resample (or
//! Catmull-Rom bicubic) in f32. Slower than [`crate::fast`] but handles everything; also the
//! fallback the fast path defers to.

use half::f16;

use crate::{Filter, PrepConfig, PrepError, REFERENCE_SIZE};

/// An 8-bit RGB image, row-major interleaved.
#[derive(Debug, Clone)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Decodes any JPEG jpeg-decoder understands to interleaved RGB8 (grayscale replicated,
/// CMYK converted).
pub fn decode_rgb8(bytes: &[u8]) -> Result<Rgb8, PrepError> {
    let mut d = jpeg_decoder::Decoder::new(bytes);
    d.read_info().map_err(decode_error)?;
    if let Some(info) = d.info() {
        crate::check_dimensions(info.width as usize, info.height as usize).map_err(PrepError::Decode)?;
    }
    let pixels = d.decode().map_err(decode_error)?;
    let info = d.info().ok_or_else(|| PrepError::Decode("no frame header".into()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let n = w * h;
    let data = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        jpeg_decoder::PixelFormat::L16 => {
            // 12/16-bit samples (big-endian pairs): keep the high byte
            pixels.chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]]).collect()
        }
        jpeg_decoder::PixelFormat::CMYK32 => {
            // jpeg-decoder hands out ink amounts (0 = no ink) after undoing Adobe's inversion.
            pixels
                .chunks_exact(4)
                .flat_map(|p| {
                    let k = 255 - p[3] as u32;
                    let f = |c: u8| (((255 - c as u32) * k + 127) / 255) as u8;
                    [f(p[0]), f(p[1]), f(p[2])]
                })
                .collect()
        }
    };
    if data.len() != n * 3 {
        return Err(PrepError::Decode(format!(
            "decoder returned {} bytes for {w}×{h} RGB",
            data.len()
        )));
    }
    Ok(Rgb8 {
        width: w,
        height: h,
        data,
    })
}

/// The crop window for an image of `w`×`h`: left, top, width, height in (fractional) pixels.
/// The crop is `crop/424` of each dimension, centred.
pub fn crop_window(w: usize, h: usize, cfg: &PrepConfig) -> (f64, f64, f64, f64) {
    let f = cfg.crop as f64 / REFERENCE_SIZE as f64;
    let (cw, ch) = (w as f64 * f, h as f64 * f);
    ((w as f64 - cw) / 2.0, (h as f64 - ch) / 2.0, cw, ch)
}

/// The generic path (see module docs).
pub fn prep(bytes: &[u8], cfg: &PrepConfig, out: &mut [f16]) -> Result<(), PrepError> {
    let img = decode_rgb8(bytes)?;
    prep_rgb8(&img, cfg, out)
}

/// Crop + resample an already decoded image.
pub fn prep_rgb8(img: &Rgb8, cfg: &PrepConfig, out: &mut [f16]) -> Result<(), PrepError> {
    let s = cfg.size as usize;
    let (x0, y0, cw, ch) = crop_window(img.width, img.height, cfg);
    if cw < 1.0 || ch < 1.0 {
        return Err(PrepError::Unsupported(format!(
            "{}×{} image is too small for a {}/{REFERENCE_SIZE} crop",
            img.width, img.height, cfg.crop
        )));
    }
    let (wx, wy) = match cfg.filter {
        Filter::Area => (area_weights(x0, cw, s, img.width), area_weights(y0, ch, s, img.height)),
        Filter::Bicubic => (
            cubic_weights(x0, cw, s, img.width),
            cubic_weights(y0, ch, s, img.height),
        ),
    };
    resample(img, &wx, &wy, s, out);
    Ok(())
}

/// For each output index: the first source index and its weights (summing to 1).
pub type Weights = Vec<(usize, Vec<f32>)>;

/// Exact area weights: output pixel `i` covers `[x0 + i·step, x0 + (i+1)·step)` with
/// `step = len / n`; each source pixel contributes its overlap with that interval.
pub fn area_weights(x0: f64, len: f64, n: usize, limit: usize) -> Weights {
    let step = len / n as f64;
    (0..n)
        .map(|i| {
            let a = x0 + i as f64 * step;
            let b = a + step;
            let first = (a.floor().max(0.0) as usize).min(limit - 1);
            let last = ((b.ceil() as usize).min(limit)).max(first + 1);
            let mut w: Vec<f32> = (first..last)
                .map(|p| {
                    let lo = (p as f64).max(a);
                    let hi = ((p + 1) as f64).min(b);
                    (hi - lo).max(0.0) as f32
                })
                .collect();
            normalise(&mut w);
            (first, w)
        })
        .collect()
}

/// Catmull-Rom (a = -0.5) weights with the support widened by the downscale factor (Pillow's
/// antialiased `BICUBIC`); source pixels outside the image are clamped to the edge.
pub fn cubic_weights(x0: f64, len: f64, n: usize, limit: usize) -> Weights {
    let scale = (len / n as f64).max(1.0);
    let support = 2.0 * scale;
    let cubic = |x: f64| {
        let x = x.abs();
        let a = -0.5;
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    };
    (0..n)
        .map(|i| {
            let centre = x0 + (i as f64 + 0.5) * len / n as f64;
            let lo = (centre - support).floor() as i64;
            let hi = (centre + support).ceil() as i64;
            let mut acc = vec![0f32; limit];
            for p in lo..=hi {
                let w = cubic((p as f64 + 0.5 - centre) / scale);
                if w != 0.0 {
                    let q = p.clamp(0, limit as i64 - 1) as usize;
                    acc[q] += w as f32;
                }
            }
            let first = acc.iter().position(|&w| w != 0.0).unwrap_or(0);
            let last = acc.iter().rposition(|&w| w != 0.0).map_or(first + 1, |l| l + 1);
            let mut w = acc[first..last].to_vec();
            normalise(&mut w);
            (first, w)
        })
        .collect()
}

fn normalise(w: &mut [f32]) {
    let s: f32 = w.iter().sum();
    if s > 0.0 {
        w.iter_mut().for_each(|v| *v /= s);
    }
}

/// Separable resample of an RGB8 image into C×H×W f16 in [0, 1].
fn resample(img: &Rgb8, wx: &Weights, wy: &Weights, s: usize, out: &mut [f16]) {
    // vertical pass first, only over the needed columns, into f32 rows
    let (x_lo, x_hi) = span(wx);
    let cols = x_hi - x_lo;
    let mut tmp = vec![0f32; s * cols * 3];
    for (oy, (first, w)) in wy.iter().enumerate() {
        let row = &mut tmp[oy * cols * 3..(oy + 1) * cols * 3];
        for (k, &wk) in w.iter().enumerate() {
            let src = &img.data[((first + k) * img.width + x_lo) * 3..((first + k) * img.width + x_hi) * 3];
            for (r, &v) in row.iter_mut().zip(src) {
                *r += wk * v as f32;
            }
        }
    }
    let plane = s * s;
    for oy in 0..s {
        let row = &tmp[oy * cols * 3..(oy + 1) * cols * 3];
        for (ox, (first, w)) in wx.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, &wk) in w.iter().enumerate() {
                let p = (first + k - x_lo) * 3;
                acc[0] += wk * row[p];
                acc[1] += wk * row[p + 1];
                acc[2] += wk * row[p + 2];
            }
            for c in 0..3 {
                out[c * plane + oy * s + ox] = f16::from_f32((acc[c] / 255.0).clamp(0.0, 1.0));
            }
        }
    }
}

/// Separable area reduction of one f32 plane (`stride` samples a row) into `dst` (n×n, with n
/// = `wx.len()` = `wy.len()`), through the row buffer `rows`: the fast path's [`crate::fast`]
/// reduction below half resolution.
pub(crate) fn area_reduce(
    src: &[f32],
    stride: usize,
    wx: &Weights,
    wy: &Weights,
    rows: &mut Vec<f32>,
    dst: &mut [f32],
) {
    let n = wx.len();
    let (x_lo, x_hi) = span(wx);
    let cols = x_hi - x_lo;
    rows.clear();
    rows.resize(wy.len() * cols, 0.0);
    for (row, (first, w)) in rows.chunks_exact_mut(cols).zip(wy) {
        for (k, &wk) in w.iter().enumerate() {
            let at = (first + k) * stride + x_lo;
            for (r, &v) in row.iter_mut().zip(&src[at..at + cols]) {
                *r += wk * v;
            }
        }
    }
    for (row, out) in rows.chunks_exact(cols).zip(dst.chunks_exact_mut(n)) {
        for (o, (first, w)) in out.iter_mut().zip(wx) {
            *o = w.iter().zip(&row[first - x_lo..]).map(|(wk, v)| wk * v).sum();
        }
    }
}

fn span(w: &Weights) -> (usize, usize) {
    let lo = w.iter().map(|(f, _)| *f).min().unwrap_or(0);
    let hi = w.iter().map(|(f, v)| f + v.len()).max().unwrap_or(lo + 1);
    (lo, hi)
}

/// jpeg-decoder's error as a reason; its end-of-data error ("failed to fill whole buffer", an
/// I/O error from reading past the end) says what it means for a JPEG.
fn decode_error(e: jpeg_decoder::Error) -> PrepError {
    match e {
        jpeg_decoder::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            PrepError::Decode("the file ends early (truncated JPEG)".into())
        }
        e => PrepError::Decode(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_weights_integer_ratio_is_box() {
        let w = area_weights(106.0, 212.0, 106, 424);
        assert_eq!(w[0], (106, vec![0.5, 0.5]));
        assert_eq!(w[105], (316, vec![0.5, 0.5]));
        let w = area_weights(0.0, 9.0, 3, 9);
        assert_eq!(w[1].0, 3);
        assert!(w[1].1.iter().all(|&v| (v - 1.0 / 3.0).abs() < 1e-6));
    }

    #[test]
    fn area_weights_fractional() {
        let w = area_weights(0.5, 3.0, 2, 10);
        assert_eq!(w[0].0, 0);
        let s: f32 = w[0].1.iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert_eq!(w[0].1.len(), 2); // [0.5, 1.0] normalised
        assert!((w[0].1[0] - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn cubic_weights_sum_to_one() {
        for (first, w) in cubic_weights(106.0, 212.0, 106, 424) {
            assert!(first < 424);
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = Rgb8 {
            width: 50,
            height: 30,
            data: [10u8, 128, 250].repeat(50 * 30),
        };
        for filter in [Filter::Area, Filter::Bicubic] {
            let cfg = PrepConfig {
                crop: 212,
                size: 7,
                filter,
            };
            let mut out = vec![f16::ZERO; cfg.image_len()];
            prep_rgb8(&img, &cfg, &mut out).unwrap();
            for (c, want) in [10.0f32, 128.0, 250.0].iter().enumerate() {
                for v in &out[c * 49..(c + 1) * 49] {
                    assert!((v.to_f32() - want / 255.0).abs() < 1e-3, "{filter:?} {c} {v}");
                }
            }
        }
    }
}
