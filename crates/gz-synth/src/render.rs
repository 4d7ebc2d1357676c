//! Rendering: a [`Scene`] to a 424×424 RGB JPEG that looks like an SDSS gri composite.
//!
//! Light is accumulated in a linear flux buffer (three channels, (R,G,B) = (i,r,g), in units of the
//! sky noise). The central object is evaluated in a box around it and blurred by a Gaussian PSF
//! (separable); field galaxies use PSF-softened profiles and stars a Gaussian core plus Moffat
//! wings (Moffat 1969) with diffraction spikes when bright. Sky noise (plus photon noise in bright
//! parts) comes from a fast wyrand generator seeded from the scene. The colour-preserving asinh
//! stretch of Lupton et al. (2004), the one the SDSS colour composites use, maps flux to 8 bits,
//! and the image is JPEG-compressed at quality 75 with 4:2:0 chroma subsampling like the Galaxy
//! Zoo cutouts. Neighbours: [`crate::galaxy`] (what to draw), [`crate::generate`] (files).

use std::f32::consts::PI;

use crate::galaxy::{Component, Profile, Scene, Sed, SIDE};

/// JPEG quality of the SDSS Galaxy Zoo cutouts (their quantisation tables are IJG quality 75).
pub const JPEG_QUALITY: u8 = 75;

/// Softening of the asinh stretch (in sky sigma) and the output scale.
const STRETCH_A: f32 = 2.2;
const STRETCH_K: f32 = 0.165;

/// wyrand: a tiny, fast, good-enough generator for pixel noise (not for anything else).
struct Wy(u64);

impl Wy {
    #[inline]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// Approximately standard normal: Irwin–Hall sum of four 16-bit uniforms.
    #[inline]
    fn gauss(&mut self) -> f32 {
        let v = self.next();
        let s = (v & 0xffff) + ((v >> 16) & 0xffff) + ((v >> 32) & 0xffff) + (v >> 48);
        (s as f32 - 131_070.0) * (1.0 / 37_837.6)
    }
}

/// Linear flux in three planes.
struct Flux {
    w: usize,
    h: usize,
    c: [Vec<f32>; 3],
}

impl Flux {
    fn new(w: usize, h: usize) -> Self {
        Flux { w, h, c: [vec![0.0; w * h], vec![0.0; w * h], vec![0.0; w * h]] }
    }

    #[inline]
    fn add(&mut self, i: usize, v: f32, sed: &Sed) {
        self.c[0][i] += v * sed.0[0];
        self.c[1][i] += v * sed.0[1];
        self.c[2][i] += v * sed.0[2];
    }
}

fn sersic_b(n: f32) -> f32 {
    2.0 * n - 1.0 / 3.0 + 0.009876 / n
}

/// Radius (pixels) beyond which a component is fainter than `floor`.
fn extent(c: &Component, floor: f32) -> f32 {
    let r = match &c.profile {
        Profile::Sersic { re, n, ie } => {
            let b = sersic_b(*n);
            let ratio = (ie / floor).max(1.0);
            re * (1.0 + ratio.ln() / b).powf(*n)
        }
        Profile::Disk { h, i0, arms, ring, .. } => {
            let base = h * (i0 / floor).max(1.0).ln();
            let ring_r = ring.as_ref().map_or(0.0, |r| h * (r.radius + 3.0 * r.width));
            let arm_r = if arms.is_some() { base * 1.15 } else { 0.0 };
            base.max(ring_r).max(arm_r)
        }
        Profile::Gauss { sigma, amp } => sigma * (2.0 * (amp / floor).max(1.0).ln()).sqrt(),
        Profile::Arc { radius, width, .. } => radius + 3.0 * width,
    };
    r.clamp(2.0, 260.0)
}

/// Surface brightness of component `c` at pixel offset (dx, dy) from its centre, split into
/// (main colour, arm colour) parts. `soft` softens radii (pixels) for PSF-free rendering.
#[inline]
fn eval(c: &Component, dx: f32, dy: f32, soft: f32) -> (f32, f32) {
    let (s, co) = c.pa.sin_cos();
    let u = dx * co + dy * s;
    let v = -dx * s + dy * co;
    match &c.profile {
        Profile::Sersic { re, n, ie } => {
            let r = (u * u + (v / c.q) * (v / c.q) + soft * soft + 0.25).sqrt();
            let b = sersic_b(*n);
            (ie * (-b * ((r / re).powf(1.0 / n) - 1.0)).exp(), 0.0)
        }
        Profile::Disk { h, i0, arms, bar, ring, lopsided } => {
            // disk-plane coordinates (deprojected)
            let vd = v / c.q;
            let r2 = u * u + vd * vd + soft * soft + 0.25;
            let r = r2.sqrt();
            // lopsided: the outer disk shifts along u
            let rl = if *lopsided > 0.0 {
                let uu = u - lopsided * h * (r / h).min(3.0) * 0.5;
                (uu * uu + vd * vd + 0.25).sqrt()
            } else {
                r
            };
            let disk = i0 * (-rl / h).exp();
            let mut main = disk;
            let mut arm = 0.0;
            if let Some(a) = arms {
                let theta = vd.atan2(u);
                let tanp = (a.pitch_deg * PI / 180.0).tan();
                let psi = a.m as f32 * (theta - (r / h).max(1e-3).ln() / tanp) + a.phase;
                let modul = (0.5 + 0.5 * psi.cos()).powf(a.sharpness);
                // arms start outside the bulge/bar and live in the disk
                let r_in = bar.as_ref().map_or(0.6, |b| b.length * 0.9) * h;
                let fade = ((r - r_in * 0.7) / (0.5 * r_in + 1.0)).clamp(0.0, 1.0);
                let arm_disk = i0 * (-r / (1.15 * h)).exp();
                let norm = 2.2 + 0.35 * a.sharpness;
                arm = arm_disk * a.strength * fade * modul * norm;
                main -= disk * a.strength * fade * 0.85;
            }
            if let Some(b) = bar {
                let (bs, bc) = b.angle.sin_cos();
                let bu = (u * bc + vd * bs) / (b.length * h);
                let bv = (-u * bs + vd * bc) / (b.length * h * b.q);
                let e = bu * bu * bu * bu + bv * bv;
                main += i0 * b.strength * 1.4 * (-e * 2.0).exp();
            }
            if let Some(rg) = ring {
                let d = (r / h - rg.radius) / rg.width;
                arm += i0 * rg.strength * (-rg.radius).exp().max(0.05) * 2.5 * (-0.5 * d * d).exp();
            }
            (main.max(0.0), arm)
        }
        Profile::Gauss { sigma, amp } => {
            let s2 = sigma * sigma + soft * soft;
            let r2 = u * u + (v / c.q) * (v / c.q);
            (amp * (-0.5 * r2 / s2).exp(), 0.0)
        }
        Profile::Arc { radius, width, from, span, amp } => {
            let vd = v / c.q;
            let r = (u * u + vd * vd).sqrt();
            let theta = vd.atan2(u);
            let mut dt = (theta - from).rem_euclid(2.0 * PI);
            if dt > *span {
                // distance in angle beyond the arc's ends
                dt = (dt - span).min(2.0 * PI - dt);
            } else {
                dt = 0.0;
            }
            let w2 = width * width + soft * soft;
            let d = r - radius;
            let along = (-(dt * radius).powi(2) / (2.0 * (3.0 * width).powi(2))).exp();
            // tails fade along their length
            let taper = 1.0 - 0.6 * ((theta - from).rem_euclid(2.0 * PI) / span.max(0.1)).min(1.0);
            (amp * (-0.5 * d * d / w2).exp() * along * taper, 0.0)
        }
    }
}

/// Arm colour of a component (only disks have arms or rings).
fn arm_sed(c: &Component) -> Sed {
    match &c.profile {
        Profile::Disk { arms: Some(a), .. } => a.sed,
        Profile::Disk { ring: Some(r), .. } => r.sed,
        _ => c.sed,
    }
}

/// Separable Gaussian blur of all three planes of `f` in place.
fn blur(f: &mut Flux, sigma: f32) {
    let rad = (sigma * 3.0).ceil() as usize;
    let k: Vec<f32> = (0..=rad).map(|i| (-(i as f32).powi(2) / (2.0 * sigma * sigma)).exp()).collect();
    let norm: f32 = k[0] + 2.0 * k[1..].iter().sum::<f32>();
    let k: Vec<f32> = k.iter().map(|v| v / norm).collect();
    let (w, h) = (f.w, f.h);
    let mut tmp = vec![0.0f32; w * h];
    for plane in f.c.iter_mut() {
        // horizontal
        for y in 0..h {
            let row = &plane[y * w..(y + 1) * w];
            for x in 0..w {
                let mut acc = row[x] * k[0];
                for (j, kj) in k.iter().enumerate().skip(1) {
                    let l = if x >= j { row[x - j] } else { 0.0 };
                    let r = if x + j < w { row[x + j] } else { 0.0 };
                    acc += kj * (l + r);
                }
                tmp[y * w + x] = acc;
            }
        }
        // vertical
        for y in 0..h {
            for x in 0..w {
                let mut acc = tmp[y * w + x] * k[0];
                for (j, kj) in k.iter().enumerate().skip(1) {
                    let up = if y >= j { tmp[(y - j) * w + x] } else { 0.0 };
                    let dn = if y + j < h { tmp[(y + j) * w + x] } else { 0.0 };
                    acc += kj * (up + dn);
                }
                plane[y * w + x] = acc;
            }
        }
    }
}

/// Renders the central object into `img` (blurred by the PSF).
fn render_central(scene: &Scene, img: &mut Flux) {
    if scene.central.is_empty() {
        return;
    }
    // bounding box of all central components
    let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
    let ext: Vec<f32> = scene.central.iter().map(|c| extent(c, 0.15)).collect();
    for (c, e) in scene.central.iter().zip(&ext) {
        x0 = x0.min(c.x - e);
        y0 = y0.min(c.y - e);
        x1 = x1.max(c.x + e);
        y1 = y1.max(c.y + e);
    }
    let pad = (scene.psf * 3.0).ceil() + 1.0;
    let bx0 = (x0 - pad).floor().max(0.0) as usize;
    let by0 = (y0 - pad).floor().max(0.0) as usize;
    let bx1 = ((x1 + pad).ceil() as usize).min(SIDE);
    let by1 = ((y1 + pad).ceil() as usize).min(SIDE);
    if bx1 <= bx0 || by1 <= by0 {
        return;
    }
    let (w, h) = (bx1 - bx0, by1 - by0);
    let mut local = Flux::new(w, h);
    for (c, e) in scene.central.iter().zip(&ext) {
        let ased = arm_sed(c);
        let cx0 = ((c.x - e).floor().max(bx0 as f32) as usize).max(bx0);
        let cy0 = ((c.y - e).floor().max(by0 as f32) as usize).max(by0);
        let cx1 = ((c.x + e).ceil() as usize).min(bx1);
        let cy1 = ((c.y + e).ceil() as usize).min(by1);
        for y in cy0..cy1 {
            let dy = y as f32 + 0.5 - c.y;
            for x in cx0..cx1 {
                let dx = x as f32 + 0.5 - c.x;
                let (m, a) = eval(c, dx, dy, 0.0);
                let i = (y - by0) * w + (x - bx0);
                local.add(i, m, &c.sed);
                if a > 0.0 {
                    local.add(i, a, &ased);
                }
            }
        }
    }
    if let Some((dust, cx, cy, pa)) = &scene.dust {
        let (s, co) = pa.sin_cos();
        for y in 0..h {
            let dy = (y + by0) as f32 + 0.5 - cy;
            for x in 0..w {
                let dx = (x + bx0) as f32 + 0.5 - cx;
                let v = -dx * s + dy * co - dust.offset;
                let t = 1.0 - dust.depth * (-0.5 * v * v / (dust.width * dust.width)).exp();
                let i = y * w + x;
                // dust reddens: blue is absorbed more than red
                local.c[0][i] *= t.powf(0.7);
                local.c[1][i] *= t;
                local.c[2][i] *= t.powf(1.3);
            }
        }
    }
    blur(&mut local, scene.psf);
    for y in 0..h {
        for x in 0..w {
            let li = y * w + x;
            let gi = (y + by0) * SIDE + (x + bx0);
            for ch in 0..3 {
                img.c[ch][gi] += local.c[ch][li];
            }
        }
    }
}

/// Field galaxies: profiles softened by the PSF instead of a blur.
fn render_field(scene: &Scene, img: &mut Flux) {
    for c in &scene.field {
        let e = extent(c, 0.15) + 2.0 * scene.psf;
        let xa = (c.x - e).floor().max(0.0) as usize;
        let ya = (c.y - e).floor().max(0.0) as usize;
        let xb = ((c.x + e).ceil().max(0.0) as usize).min(SIDE);
        let yb = ((c.y + e).ceil().max(0.0) as usize).min(SIDE);
        for y in ya..yb {
            for x in xa..xb {
                let (m, _) = eval(c, x as f32 + 0.5 - c.x, y as f32 + 0.5 - c.y, scene.psf * 1.2);
                img.add(y * SIDE + x, m, &c.sed);
            }
        }
    }
}

/// Stars: Gaussian core + Moffat wings (beta 3), diffraction spikes for bright ones; trails.
fn render_points(scene: &Scene, img: &mut Flux) {
    let s = scene.psf;
    let core_norm = 1.0 / (2.0 * PI * s * s);
    let alpha = 2.5 * s;
    let beta = 3.0f32;
    let moffat_norm = (beta - 1.0) / (PI * alpha * alpha);
    for st in &scene.stars {
        let peak = st.flux * core_norm;
        let e = (alpha * ((0.15 * st.flux * moffat_norm / 0.1).max(1.0)).powf(1.0 / (2.0 * beta))).clamp(3.0 * s, 120.0);
        let xa = (st.x - e).floor().max(0.0) as usize;
        let ya = (st.y - e).floor().max(0.0) as usize;
        let xb = ((st.x + e).ceil().max(0.0) as usize).min(SIDE);
        let yb = ((st.y + e).ceil().max(0.0) as usize).min(SIDE);
        for y in ya..yb {
            let dy = y as f32 + 0.5 - st.y;
            for x in xa..xb {
                let dx = x as f32 + 0.5 - st.x;
                let r2 = dx * dx + dy * dy;
                let v = 0.85 * peak * (-0.5 * r2 / (s * s)).exp()
                    + 0.15 * st.flux * moffat_norm * (1.0 + r2 / (alpha * alpha)).powf(-beta);
                img.add(y * SIDE + x, v, &st.sed);
            }
        }
        // diffraction spikes (SDSS: along the pixel axes) for bright stars
        if st.flux > 40_000.0 {
            let len = (st.flux / 40_000.0).sqrt() * 14.0;
            let amp = peak * 0.02;
            let n = len.ceil() as i32;
            for k in -n..=n {
                let fall = (-(k as f32).abs() / (0.4 * len)).exp();
                for (x, y) in [(st.x + k as f32, st.y), (st.x, st.y + k as f32)] {
                    if x >= 0.0 && y >= 0.0 && (x as usize) < SIDE && (y as usize) < SIDE {
                        img.add(y as usize * SIDE + x as usize, amp * fall, &st.sed);
                    }
                }
            }
        }
    }
    for t in &scene.trails {
        let (sn, cs) = t.angle.sin_cos();
        for y in 0..SIDE {
            let dy = y as f32 + 0.5 - t.y;
            for x in 0..SIDE {
                let dx = x as f32 + 0.5 - t.x;
                let d = -dx * sn + dy * cs;
                if d.abs() < 4.0 * t.width {
                    img.add(y * SIDE + x, t.amp * (-0.5 * d * d / (t.width * t.width)).exp(), &t.sed);
                }
            }
        }
    }
}

/// Lookup table for the asinh stretch factor `F(I)/I` on the dense low-intensity range.
struct StretchLut {
    lo: f32,
    step: f32,
    table: Vec<f32>,
}

impl StretchLut {
    fn new() -> Self {
        let (lo, hi, n) = (-16.0f32, 96.0f32, 8192usize);
        let step = (hi - lo) / (n - 1) as f32;
        let table = (0..n).map(|k| stretch_factor(lo + k as f32 * step)).collect();
        StretchLut { lo, step, table }
    }

    #[inline]
    fn get(&self, i: f32) -> f32 {
        let t = (i - self.lo) / self.step;
        if t >= 0.0 && t < (self.table.len() - 1) as f32 {
            let k = t as usize;
            let f = t - k as f32;
            self.table[k] * (1.0 - f) + self.table[k + 1] * f
        } else {
            stretch_factor(i)
        }
    }
}

/// `F(I)/I` with `F(I) = K asinh(I/A)` (Lupton et al. 2004); the limit `K/A` at 0.
fn stretch_factor(i: f32) -> f32 {
    if i.abs() < 1e-4 {
        STRETCH_K / STRETCH_A
    } else {
        STRETCH_K * (i / STRETCH_A).asinh() / i
    }
}

fn lut() -> &'static StretchLut {
    static LUT: std::sync::OnceLock<StretchLut> = std::sync::OnceLock::new();
    LUT.get_or_init(StretchLut::new)
}

/// Renders the scene to 8-bit RGB (row-major, 424×424×3).
pub fn render_rgb(scene: &Scene) -> Vec<u8> {
    let mut img = Flux::new(SIDE, SIDE);
    for (ch, plane) in img.c.iter_mut().enumerate() {
        plane.fill(scene.sky[ch]);
    }
    render_central(scene, &mut img);
    render_field(scene, &mut img);
    render_points(scene, &mut img);
    let lut = lut();
    let noise = CorrelatedNoise::new(scene.noise_seed, scene.zoom);
    let mut out = vec![0u8; SIDE * SIDE * 3];
    let [r, g, b] = &img.c;
    let mut nrow = [vec![0f32; SIDE], vec![0f32; SIDE], vec![0f32; SIDE]];
    for y in 0..SIDE {
        noise.row(y, &mut nrow);
        for x in 0..SIDE {
            let i = y * SIDE + x;
            let (rv, gv, bv) = (r[i], g[i], b[i]);
            let mean = (rv + gv + bv) * (1.0 / 3.0);
            // photon noise grows in bright parts (gain chosen so cores look smooth-but-grainy)
            let boost = if mean > 2.0 { (1.0 + mean * 0.02).sqrt() } else { 1.0 };
            let rv = rv + scene.noise[0] * boost * nrow[0][x];
            let gv = gv + scene.noise[1] * boost * nrow[1][x];
            let bv = bv + scene.noise[2] * boost * nrow[2][x];
            let mean = (rv + gv + bv) * (1.0 / 3.0);
            let f = lut.get(mean);
            let (mut ro, mut go, mut bo) = (rv * f, gv * f, bv * f);
            let mx = ro.max(go).max(bo);
            if mx > 1.0 {
                // keep the colour of saturated pixels (Lupton et al. 2004)
                ro /= mx;
                go /= mx;
                bo /= mx;
            }
            out[3 * i] = (ro.max(0.0) * 255.0 + 0.5) as u8;
            out[3 * i + 1] = (go.max(0.0) * 255.0 + 0.5) as u8;
            out[3 * i + 2] = (bo.max(0.0) * 255.0 + 0.5) as u8;
        }
    }
    out
}

/// Unit-variance Gaussian noise per channel, correlated over `zoom` pixels: white noise on a
/// coarse grid with spacing `zoom`, bilinearly interpolated (the cutouts are resampled images),
/// rescaled by the interpolation's mean variance loss.
struct CorrelatedNoise {
    zoom: f32,
    gw: usize,
    grid: [Vec<f32>; 3],
    gain: f32,
}

impl CorrelatedNoise {
    fn new(seed: u64, zoom: f32) -> Self {
        let mut rng = Wy(seed);
        let zoom = if zoom <= 1.05 { 1.0 } else { zoom };
        let gw = (SIDE as f32 / zoom).ceil() as usize + 2;
        let mut grid = [vec![0f32; gw * gw], vec![0f32; gw * gw], vec![0f32; gw * gw]];
        for plane in grid.iter_mut() {
            for v in plane.iter_mut() {
                *v = rng.gauss();
            }
        }
        // mean variance of bilinear interpolation of white noise is (2/3)^2 per axis pair
        let gain = if zoom > 1.0 { 1.5 } else { 1.0 };
        CorrelatedNoise { zoom, gw, grid, gain }
    }

    fn row(&self, y: usize, out: &mut [Vec<f32>; 3]) {
        if self.zoom <= 1.0 {
            for (ch, o) in out.iter_mut().enumerate() {
                o.copy_from_slice(&self.grid[ch][y * self.gw..y * self.gw + SIDE]);
            }
            return;
        }
        let gy = y as f32 / self.zoom;
        let y0 = gy as usize;
        let fy = gy - y0 as f32;
        for (ch, o) in out.iter_mut().enumerate() {
            let g = &self.grid[ch];
            let (r0, r1) = (&g[y0 * self.gw..(y0 + 1) * self.gw], &g[(y0 + 1) * self.gw..(y0 + 2) * self.gw]);
            for (x, v) in o.iter_mut().enumerate() {
                let gx = x as f32 / self.zoom;
                let x0 = gx as usize;
                let fx = gx - x0 as f32;
                let top = r0[x0] + (r0[x0 + 1] - r0[x0]) * fx;
                let bot = r1[x0] + (r1[x0 + 1] - r1[x0]) * fx;
                *v = (top + (bot - top) * fy) * self.gain;
            }
        }
    }
}

/// Encodes 424×424 RGB as a JPEG like the Galaxy Zoo cutouts.
pub fn encode_jpeg(rgb: &[u8]) -> Result<Vec<u8>, jpeg_encoder::EncodingError> {
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut enc = jpeg_encoder::Encoder::new(&mut buf, JPEG_QUALITY);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    enc.encode(rgb, SIDE as u16, SIDE as u16, jpeg_encoder::ColorType::Rgb)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_roughly_standard() {
        let mut w = Wy(42);
        let n = 100_000;
        let v: Vec<f32> = (0..n).map(|_| w.gauss()).collect();
        let mean = v.iter().sum::<f32>() / n as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n as f32;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "var {var}");
    }

    #[test]
    fn lut_matches_formula() {
        let l = lut();
        for i in [-10.0f32, -0.3, 0.0, 0.7, 5.0, 50.0, 500.0] {
            assert!((l.get(i) - stretch_factor(i)).abs() < 1e-3 * stretch_factor(i).abs().max(1e-3), "{i}");
        }
    }
}
