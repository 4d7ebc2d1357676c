//! Rendering: a [`Scene`] to a 424×424 RGB JPEG that looks like an SDSS gri composite.
//!
//! Light is accumulated in a linear flux buffer (three channels, (R,G,B) = (i,r,g), in units of the
//! sky noise). Every profile is drawn out to where it is fainter than a fifth of one 8-bit level
//! (`FLOOR`), so no halo ends in a visible edge. The central object is evaluated on its native
//! grid in a box around it (reaching past the image's edges as far as the PSF does) and blurred by
//! a Gaussian PSF (separable); field galaxies use PSF-softened profiles and stars a Gaussian core
//! plus Moffat wings (Moffat 1969) with diffraction spikes when bright. Sky noise (plus photon
//! noise in bright parts) comes from a fast wyrand generator seeded from the scene. The
//! colour-preserving asinh stretch of Lupton et al. (2004), the one the SDSS colour composites
//! use, maps flux to 8 bits, and the image is JPEG-compressed at quality 75 with 4:2:0 chroma
//! subsampling like the Galaxy Zoo cutouts. Neighbours: [`crate::galaxy`] (what to draw), [`crate::generate`] (files).

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
    #[cfg(test)]
    #[inline]
    fn gauss(&mut self) -> f32 {
        let v = self.next();
        let s = (v & 0xffff) + ((v >> 16) & 0xffff) + ((v >> 32) & 0xffff) + (v >> 48);
        (s as f32 - 131_070.0) * (1.0 / 37_837.6)
    }

    /// Two approximately standard normals from one draw: Irwin–Hall sums of four 8-bit uniforms
    /// each (1,021 levels, steps of 1/148 sigma: far below what an 8-bit pixel resolves).
    #[inline]
    fn gauss_pair(&mut self) -> [f32; 2] {
        let v = self.next();
        // bytes 0..3 and 4..7 summed in parallel lanes of 16 bits
        let t = (v & 0x00ff_00ff_00ff_00ff) + ((v >> 8) & 0x00ff_00ff_00ff_00ff);
        let t = (t & 0x0000_ffff_0000_ffff) + ((t >> 16) & 0x0000_ffff_0000_ffff);
        // mean 4 * 127.5, sd sqrt(4 * (256^2 - 1) / 12)
        const SCALE: f32 = 1.0 / 147.801_07;
        [
            ((t & 0xffff_ffff) as f32 - 510.0) * SCALE,
            ((t >> 32) as f32 - 510.0) * SCALE,
        ]
    }

    /// Fills `out` with approximately standard normals.
    fn fill_gauss(&mut self, out: &mut [f32]) {
        let mut pairs = out.chunks_exact_mut(2);
        for p in &mut pairs {
            let [a, b] = self.gauss_pair();
            p[0] = a;
            p[1] = b;
        }
        for o in pairs.into_remainder() {
            *o = self.gauss_pair()[0];
        }
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
        Flux {
            w,
            h,
            c: [vec![0.0; w * h], vec![0.0; w * h], vec![0.0; w * h]],
        }
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

/// Faintest light drawn, in sky sigma: a fifth of one 8-bit level where the asinh stretch is
/// steepest (at the sky, slope `K/A` per sky sigma). A profile is drawn out to where it falls
/// below this, so where drawing stops leaves a step far below one level and the noise; a fixed
/// cutoff (it was 0.12, about 2 levels, and at most 6 scale lengths or 180 px) left the bright
/// extended ones with the square edge of the box they were drawn in.
const FLOOR: f32 = 0.2 * STRETCH_A / (255.0 * STRETCH_K);

/// Largest extent: far enough to cover the image from any centre in it.
const MAX_EXTENT: f32 = 2.0 * SIDE as f32;

/// Radius (pixels, in the component's own elliptical metric `(u, v / q)` that [`eval`] uses)
/// beyond which component `c`, its radii softened by `soft`, is fainter than [`FLOOR`]: an upper
/// bound of every part of [`eval`]'s profile, not a fixed number of scale lengths.
fn extent(c: &Component, soft: f32) -> f32 {
    // ln(peak / FLOOR): how many e-foldings a part needs to fall below the floor
    let ln = |peak: f32| (peak / FLOOR).max(1.0).ln();
    let r = match &c.profile {
        // softening only lowers a Sérsic profile
        Profile::Sersic { re, n, ie } => re * (1.0 + ln(*ie) / sersic_b(*n)).powf(*n),
        Profile::Disk {
            h,
            i0,
            arms,
            bar,
            ring,
            lopsided,
        } => {
            // each of the (up to four) parts below a share of the floor, so that their sum is too
            let parts = 1.0
                + [arms.is_some(), bar.is_some(), ring.is_some()]
                    .map(f32::from)
                    .iter()
                    .sum::<f32>();
            let ln = |peak: f32| ln(peak * parts);
            // the disk, whose outskirts shift by up to 1.5 lopsided h
            let mut r = h * (ln(*i0) + 1.5 * lopsided);
            if let Some(a) = arms {
                r = r.max(1.15 * h * ln(i0 * a.strength * (2.2 + 0.35 * a.sharpness)));
            }
            if let Some(b) = bar {
                // exp(-2 (bu⁴ + bv²)) < floor needs |bu| > (L/2)^¼ or |bv| > (L/2)^½
                let l = 0.5 * ln(i0 * b.strength * 1.4);
                r = r.max(b.length * h * (l.sqrt() + b.q * b.q * l).sqrt());
            }
            if let Some(g) = ring {
                let peak = i0 * g.strength * (-g.radius).exp().max(0.05) * 2.5;
                r = r.max(h * (g.radius + g.width * (2.0 * ln(peak)).sqrt()));
            }
            r
        }
        Profile::Gauss { sigma, amp } => (sigma * sigma + soft * soft).sqrt() * (2.0 * ln(*amp)).sqrt(),
        Profile::Arc { radius, width, amp, .. } => {
            radius + (width * width + soft * soft).sqrt() * (2.0 * ln(*amp)).sqrt()
        }
    };
    r.clamp(2.0, MAX_EXTENT)
}

/// Is the offset (dx, dy) from the centre of `c` (its `pa` as `(sin, cos)`) within radius `e`
/// of [`eval`]'s elliptical metric?
#[inline]
fn within(c: &Component, (s, co): (f32, f32), dx: f32, dy: f32, e: f32) -> bool {
    let u = dx * co + dy * s;
    let v = (-dx * s + dy * co) / c.q;
    u * u + v * v <= e * e
}

/// Surface brightness of component `c` at pixel offset (dx, dy) from its centre, split into
/// (main colour, arm colour) parts. `soft` softens radii (pixels) for PSF-free rendering.
#[inline]
fn eval(c: &Component, (s, co): (f32, f32), dx: f32, dy: f32, soft: f32) -> (f32, f32) {
    let u = dx * co + dy * s;
    let v = -dx * s + dy * co;
    match &c.profile {
        Profile::Sersic { re, n, ie } => {
            let r = (u * u + (v / c.q) * (v / c.q) + soft * soft + 0.25).sqrt();
            let b = sersic_b(*n);
            (ie * (-b * ((r / re).powf(1.0 / n) - 1.0)).exp(), 0.0)
        }
        Profile::Disk {
            h,
            i0,
            arms,
            bar,
            ring,
            lopsided,
        } => {
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
        Profile::Arc {
            radius,
            width,
            from,
            span,
            amp,
        } => {
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

/// Widths of three box filters whose succession approximates a Gaussian of `sigma`
/// (Kovesi 2010, "Fast almost-Gaussian filtering").
fn box_widths(sigma: f32) -> [usize; 3] {
    let n = 3.0f32;
    let ideal = (12.0 * sigma * sigma / n + 1.0).sqrt();
    let mut wl = ideal.floor() as i32;
    if wl % 2 == 0 {
        wl -= 1;
    }
    let wl = wl.max(1);
    let wu = wl + 2;
    let wlf = wl as f32;
    let m = ((12.0 * sigma * sigma - n * wlf * wlf - 4.0 * n * wlf - 3.0 * n) / (-4.0 * wlf - 4.0)).round() as i32;
    let mut out = [0usize; 3];
    for (i, o) in out.iter_mut().enumerate() {
        *o = if (i as i32) < m { wl as usize } else { wu as usize };
    }
    out
}

/// Vertical box filter of odd width `bw` over a `w`×`h` plane, all columns at once (row-major
/// friendly: running sums per column), zero outside.
fn box_vertical(plane: &mut [f32], src: &mut Vec<f32>, acc: &mut Vec<f32>, w: usize, h: usize, bw: usize) {
    let r = bw / 2;
    src.clear();
    src.extend_from_slice(plane);
    acc.clear();
    acc.resize(w, 0.0);
    for k in 0..r.min(h) {
        for (a, v) in acc.iter_mut().zip(&src[k * w..(k + 1) * w]) {
            *a += v;
        }
    }
    let inv = 1.0 / bw as f32;
    for k in 0..h {
        if k + r < h {
            for (a, v) in acc.iter_mut().zip(&src[(k + r) * w..(k + r + 1) * w]) {
                *a += v;
            }
        }
        if k > r {
            for (a, v) in acc.iter_mut().zip(&src[(k - r - 1) * w..(k - r) * w]) {
                *a -= v;
            }
        }
        for (o, a) in plane[k * w..(k + 1) * w].iter_mut().zip(acc.iter()) {
            *o = a * inv;
        }
    }
}

/// Transposes a `w`×`h` row-major plane into `out` (`h`×`w`).
fn transpose(src: &[f32], out: &mut Vec<f32>, w: usize, h: usize) {
    out.clear();
    out.resize(w * h, 0.0);
    const B: usize = 16;
    for yb in (0..h).step_by(B) {
        for xb in (0..w).step_by(B) {
            for y in yb..(yb + B).min(h) {
                for x in xb..(xb + B).min(w) {
                    out[x * h + y] = src[y * w + x];
                }
            }
        }
    }
}

/// Almost-Gaussian blur (three box passes per axis, cost independent of `sigma`) of all three
/// planes of `f` in place. Both axes use the column-parallel vertical filter (the horizontal
/// pass runs on the transposed plane), which vectorises; a per-row running sum does not.
fn blur(f: &mut Flux, sigma: f32) {
    let widths = box_widths(sigma);
    let (w, h) = (f.w, f.h);
    let mut src = Vec::with_capacity(w * h);
    let mut acc = Vec::with_capacity(w.max(h));
    let mut t = Vec::with_capacity(w * h);
    for plane in f.c.iter_mut() {
        transpose(plane, &mut t, w, h);
        for &bw in widths.iter().filter(|&&bw| bw > 1) {
            box_vertical(&mut t, &mut src, &mut acc, h, w, bw);
        }
        transpose(&t, plane, h, w);
        for &bw in widths.iter().filter(|&&bw| bw > 1) {
            box_vertical(plane, &mut src, &mut acc, w, h, bw);
        }
    }
}

/// Renders the central object into `img` (blurred by the PSF).
#[inline(never)]
fn render_central(scene: &Scene, img: &mut Flux) {
    if scene.central.is_empty() {
        return;
    }
    // bounding box of all central components
    let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
    let ext: Vec<f32> = scene.central.iter().map(|c| extent(c, 0.0)).collect();
    for (c, e) in scene.central.iter().zip(&ext) {
        x0 = x0.min(c.x - e);
        y0 = y0.min(c.y - e);
        x1 = x1.max(c.x + e);
        y1 = y1.max(c.y + e);
    }
    // The blur spreads light over ~3 PSF sigma: the box reaches that far beyond the light, and
    // beyond the image's edges as well, so that light from just outside blurs in there as it
    // does everywhere else (a box cut at the edge would darken the last few pixels).
    let pad = (scene.psf * 3.0).ceil() + 1.0;
    let bx0 = (x0 - pad).floor().max(-pad);
    let by0 = (y0 - pad).floor().max(-pad);
    let bx1 = (x1 + pad).ceil().min(SIDE as f32 + pad);
    let by1 = (y1 + pad).ceil().min(SIDE as f32 + pad);
    if bx1 <= bx0.max(0.0) || by1 <= by0.max(0.0) || bx0 >= SIDE as f32 || by0 >= SIDE as f32 {
        return;
    }
    let (w, h) = ((bx1 - bx0) as usize, (by1 - by0) as usize);
    // The cutouts are magnified by `zoom`: render on the native (coarser) grid, blur there with
    // the native PSF, then resample bilinearly, as the real cutouts were made.
    let z = scene.zoom.max(1.0);
    let (wn, hn) = ((w as f32 / z).ceil() as usize + 2, (h as f32 / z).ceil() as usize + 2);
    let mut local = Flux::new(wn, hn);
    for (c, &e) in scene.central.iter().zip(&ext) {
        let ased = arm_sed(c);
        let sc = c.pa.sin_cos();
        // native samples i sit at image coordinate bx0 + i z
        let i0 = (((c.x - e - bx0) / z).floor().max(0.0) as usize).min(wn);
        let i1 = (((c.x + e - bx0) / z).ceil().max(0.0) as usize + 1).min(wn);
        let j0 = (((c.y - e - by0) / z).floor().max(0.0) as usize).min(hn);
        let j1 = (((c.y + e - by0) / z).ceil().max(0.0) as usize + 1).min(hn);
        for j in j0..j1 {
            let dy = by0 + j as f32 * z - c.y;
            for i in i0..i1 {
                let dx = bx0 + i as f32 * z - c.x;
                // the corners of the square are beyond the extent: nothing to draw there
                if !within(c, sc, dx, dy, e) {
                    continue;
                }
                let (m, a) = eval(c, sc, dx, dy, 0.0);
                let k = j * wn + i;
                local.add(k, m, &c.sed);
                if a > 0.0 {
                    local.add(k, a, &ased);
                }
            }
        }
    }
    if let Some((dust, cx, cy, pa)) = &scene.dust {
        let (s, co) = pa.sin_cos();
        let inv_w2 = 1.0 / (dust.width * dust.width);
        for j in 0..hn {
            let dy = by0 + j as f32 * z - cy;
            for i in 0..wn {
                let dx = bx0 + i as f32 * z - cx;
                let v = -dx * s + dy * co - dust.offset;
                let e = 0.5 * v * v * inv_w2;
                if e > 12.0 {
                    // beyond 4.9 widths the lane absorbs less than 1e-5: nothing to do
                    continue;
                }
                let t = 1.0 - dust.depth * (-e).exp();
                let k = j * wn + i;
                // dust reddens: blue is absorbed more than red (t^0.7 = t / t^0.3, t^1.3 = t t^0.3)
                let t03 = t.powf(0.3);
                local.c[0][k] *= t / t03;
                local.c[1][k] *= t;
                local.c[2][k] *= t * t03;
            }
        }
    }
    blur(&mut local, scene.psf / z);
    // bilinear resampling into the image pixels the box covers: image pixel centre x + 0.5 is
    // native (x + 0.5 - bx0) / z
    let (ix0, iy0) = (bx0.max(0.0) as usize, by0.max(0.0) as usize);
    let (ix1, iy1) = ((bx1 as usize).min(SIDE), (by1 as usize).min(SIDE));
    let xs: Vec<(usize, f32)> = (ix0..ix1)
        .map(|x| {
            let t = (x as f32 + 0.5 - bx0) / z;
            (t as usize, t - t.floor())
        })
        .collect();
    for y in iy0..iy1 {
        let t = (y as f32 + 0.5 - by0) / z;
        let (j, fy) = (t as usize, t - t.floor());
        for ch in 0..3 {
            let p = &local.c[ch];
            let (r0, r1) = (&p[j * wn..(j + 1) * wn], &p[(j + 1) * wn..(j + 2) * wn]);
            let dst = &mut img.c[ch][y * SIDE + ix0..y * SIDE + ix1];
            for (d, &(i, fx)) in dst.iter_mut().zip(&xs) {
                let top = r0[i] + (r0[i + 1] - r0[i]) * fx;
                let bot = r1[i] + (r1[i + 1] - r1[i]) * fx;
                *d += top + (bot - top) * fy;
            }
        }
    }
}

/// Field galaxies: profiles softened by the PSF instead of a blur.
#[inline(never)]
fn render_field(scene: &Scene, img: &mut Flux) {
    for c in &scene.field {
        let soft = scene.psf * 1.2;
        let e = extent(c, soft);
        let sc = c.pa.sin_cos();
        let xa = (c.x - e).floor().max(0.0) as usize;
        let ya = (c.y - e).floor().max(0.0) as usize;
        let xb = ((c.x + e).ceil().max(0.0) as usize).min(SIDE);
        let yb = ((c.y + e).ceil().max(0.0) as usize).min(SIDE);
        for y in ya..yb {
            for x in xa..xb {
                let (dx, dy) = (x as f32 + 0.5 - c.x, y as f32 + 0.5 - c.y);
                if !within(c, sc, dx, dy, e) {
                    continue;
                }
                let (m, _) = eval(c, sc, dx, dy, soft);
                img.add(y * SIDE + x, m, &c.sed);
            }
        }
    }
}

/// Stars: Gaussian core + Moffat wings (beta 3), diffraction spikes for bright ones; trails.
#[inline(never)]
fn render_points(scene: &Scene, img: &mut Flux) {
    let s = scene.psf;
    let core_norm = 1.0 / (2.0 * PI * s * s);
    let alpha = 2.5 * s;
    let beta = 3.0f32;
    let moffat_norm = (beta - 1.0) / (PI * alpha * alpha);
    let (inv_a2, inv_s2, core_r2) = (1.0 / (alpha * alpha), 1.0 / (s * s), (5.0 * s) * (5.0 * s));
    for st in &scene.stars {
        let peak = st.flux * core_norm;
        // the wings fall below the floor at e (a circle: the square's corners are skipped)
        let e = (alpha * ((0.15 * st.flux * moffat_norm / FLOOR).max(1.0)).powf(1.0 / (2.0 * beta)))
            .clamp(5.0 * s, MAX_EXTENT);
        let xa = (st.x - e).floor().max(0.0) as usize;
        let ya = (st.y - e).floor().max(0.0) as usize;
        let xb = ((st.x + e).ceil().max(0.0) as usize).min(SIDE);
        let yb = ((st.y + e).ceil().max(0.0) as usize).min(SIDE);
        for y in ya..yb {
            let dy = y as f32 + 0.5 - st.y;
            for x in xa..xb {
                let dx = x as f32 + 0.5 - st.x;
                let r2 = dx * dx + dy * dy;
                if r2 > e * e {
                    continue;
                }
                // Moffat with beta = 3: (1 + r²/α²)^-3 without powf
                let m = 1.0 / (1.0 + r2 * inv_a2);
                let core = if r2 < core_r2 {
                    0.85 * peak * (-0.5 * r2 * inv_s2).exp()
                } else {
                    0.0
                };
                let v = core + 0.15 * st.flux * moffat_norm * m * m * m;
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
        // out to where the trail falls below the floor
        let reach = t.width * (2.0 * (t.amp / FLOOR).max(1.0).ln()).sqrt();
        for y in 0..SIDE {
            let dy = y as f32 + 0.5 - t.y;
            for x in 0..SIDE {
                let dx = x as f32 + 0.5 - t.x;
                let d = -dx * sn + dy * cs;
                if d.abs() < reach {
                    img.add(y * SIDE + x, t.amp * (-0.5 * d * d / (t.width * t.width)).exp(), &t.sed);
                }
            }
        }
    }
}

/// `F(I)/I` as [`stretch_factor`], in straight-line f32 arithmetic that vectorises (no table,
/// no libm call): `ln` by exponent/mantissa split and the Cephes `logf` polynomial, the series
/// `K/A (1 - t²/6 + 3t⁴/40)` for `|t| = |I|/A < 0.01`. Relative error < 2e-5 (tested).
#[inline(always)]
fn stretch_factor_fast(i: f32) -> f32 {
    let t = (i * (1.0 / STRETCH_A)).abs();
    // L(t) = asinh(t) = ln(t + sqrt(t² + 1)), y >= 1
    let y = t + (t * t + 1.0).sqrt();
    let bits = y.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000); // [0.5, 1)
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    e -= i32::from(small);
    let x = if small { m + m - 1.0 } else { m - 1.0 };
    let z = x * x;
    let mut p = 7.037_683_6e-2_f32;
    p = p * x - 1.151_461e-1;
    p = p * x + 1.167_699_9e-1;
    p = p * x - 1.242_014_1e-1;
    p = p * x + 1.424_932_3e-1;
    p = p * x - 1.666_805_8e-1;
    p = p * x + 2.000_071_5e-1;
    p = p * x - 2.499_999_4e-1;
    p = p * x + 3.333_333e-1;
    let ef = e as f32;
    let ln = x + (p * x * z - 2.121_944_4e-4 * ef - 0.5 * z) + 0.693_359_4 * ef;
    let t2 = t * t;
    let series = (STRETCH_K / STRETCH_A) * (1.0 - t2 * (1.0 / 6.0) + t2 * t2 * (3.0 / 40.0));
    let full = (STRETCH_K / STRETCH_A) * ln / t.max(1e-30);
    if t < 0.01 {
        series
    } else {
        full
    }
}

/// `F(I)/I` with `F(I) = K asinh(I/A)` (Lupton et al. 2004); the limit `K/A` at 0 (the
/// reference [`stretch_factor_fast`] is tested against).
#[cfg(test)]
fn stretch_factor(i: f32) -> f32 {
    if i.abs() < 1e-4 {
        STRETCH_K / STRETCH_A
    } else {
        STRETCH_K * (i / STRETCH_A).asinh() / i
    }
}

/// Per-thread scratch buffers: allocating the 2 MB flux image per galaxy costs page faults.
struct Scratch {
    img: Flux,
    /// Noise grids (moved into the [`CorrelatedNoise`] of each image and back).
    grid: [Vec<f32>; 3],
    tmp: Vec<f32>,
    rows: [Vec<f32>; 3],
    mean: Vec<f32>,
    fac: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

/// Renders the scene to 8-bit RGB (row-major, 424×424×3).
pub fn render_rgb(scene: &Scene) -> Vec<u8> {
    SCRATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        let scratch = slot.get_or_insert_with(|| Scratch {
            img: Flux::new(SIDE, SIDE),
            grid: [Vec::new(), Vec::new(), Vec::new()],
            tmp: Vec::new(),
            rows: [vec![0f32; SIDE], vec![0f32; SIDE], vec![0f32; SIDE]],
            mean: vec![0f32; SIDE],
            fac: vec![0f32; SIDE],
        });
        render_into(scene, scratch)
    })
}

fn render_into(scene: &Scene, sc: &mut Scratch) -> Vec<u8> {
    let img = &mut sc.img;
    for (ch, plane) in img.c.iter_mut().enumerate() {
        plane.fill(scene.sky[ch]);
    }
    render_central(scene, img);
    render_field(scene, img);
    render_points(scene, img);
    let grid = std::mem::take(&mut sc.grid);
    let noise = CorrelatedNoise::new(scene.noise_seed, scene.zoom, grid, &mut sc.tmp);
    let mut out = vec![0u8; SIDE * SIDE * 3];
    let [nr, ng, nb] = &mut sc.rows;
    let (mean, fac) = (&mut sc.mean, &mut sc.fac);
    for (y, o) in out.chunks_exact_mut(3 * SIDE).enumerate() {
        noise.row(y, [&mut *nr, &mut *ng, &mut *nb]);
        let span = y * SIDE..(y + 1) * SIDE;
        let (r, g, b) = (&img.c[0][span.clone()], &img.c[1][span.clone()], &img.c[2][span]);
        let row = Row {
            rgb: [r, g, b],
            noise: [&mut nr[..], &mut ng[..], &mut nb[..]],
            mean: &mut mean[..],
            fac: &mut fac[..],
        };
        finish_row(scene.noise, row, o);
    }
    sc.grid = noise.grid;
    out
}

/// One image row on its way to 8 bits: flux, the noise rows (overwritten) and two scratch rows.
struct Row<'a> {
    rgb: [&'a [f32]; 3],
    noise: [&'a mut [f32]; 3],
    mean: &'a mut [f32],
    fac: &'a mut [f32],
}

/// Noise, asinh stretch and quantisation of one row into interleaved RGB bytes `o`. Runs the
/// AVX2 build of the same code where the CPU has it (8 lanes instead of SSE2's 4); both builds
/// give identical bytes (Rust never contracts to FMA, and the table lookup is the same).
fn finish_row(sigma: [f32; 3], row: Row<'_>, o: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *AVX2.get_or_init(|| std::is_x86_feature_detected!("avx2")) {
            // SAFETY: the CPU has AVX2 (checked just above), the one requirement of the call.
            unsafe { finish_row_avx2(sigma, row, o) };
            return;
        }
    }
    finish_row_generic(sigma, row, o);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn finish_row_avx2(sigma: [f32; 3], row: Row<'_>, o: &mut [u8]) {
    finish_row_generic(sigma, row, o);
}

#[inline(always)]
fn finish_row_generic([sr, sg, sb]: [f32; 3], row: Row<'_>, o: &mut [u8]) {
    // fixed-length slices: no bounds checks in the loops below, which then vectorise
    let [r, g, b] = row.rgb;
    let (r, g, b) = (&r[..SIDE], &g[..SIDE], &b[..SIDE]);
    let [nr, ng, nb] = row.noise;
    let (nr, ng, nb) = (&mut nr[..SIDE], &mut ng[..SIDE], &mut nb[..SIDE]);
    let (mean, fac) = (&mut row.mean[..SIDE], &mut row.fac[..SIDE]);
    let o = &mut o[..3 * SIDE];
    // 1. noise (photon noise grows in bright parts), in place in the noise rows
    for x in 0..SIDE {
        let m = (r[x] + g[x] + b[x]) * (1.0 / 3.0);
        let boost = (1.0 + (m - 2.0).max(0.0) * 0.02).sqrt();
        nr[x] = r[x] + sr * boost * nr[x];
        ng[x] = g[x] + sg * boost * ng[x];
        nb[x] = b[x] + sb * boost * nb[x];
        mean[x] = (nr[x] + ng[x] + nb[x]) * (1.0 / 3.0);
    }
    // 2. the asinh stretch factor F(I)/I
    for (f, &m) in fac.iter_mut().zip(mean.iter()) {
        *f = stretch_factor_fast(m);
    }
    // 3. scale, keep the colour of saturated pixels (Lupton et al. 2004), quantise (in
    //    place, vectorised), then interleave
    for x in 0..SIDE {
        let (ro, go, bo) = (nr[x] * fac[x], ng[x] * fac[x], nb[x] * fac[x]);
        let k = 255.0 / ro.max(go).max(bo).max(1.0);
        nr[x] = (ro.max(0.0) * k + 0.5).min(255.0);
        ng[x] = (go.max(0.0) * k + 0.5).min(255.0);
        nb[x] = (bo.max(0.0) * k + 0.5).min(255.0);
    }
    for (((px, &r), &g), &b) in o.chunks_exact_mut(3).zip(nr.iter()).zip(ng.iter()).zip(nb.iter()) {
        px[0] = r as i32 as u8;
        px[1] = g as i32 as u8;
        px[2] = b as i32 as u8;
    }
}

/// Unit-variance Gaussian noise per channel, correlated over `zoom` pixels: white noise on a
/// coarse grid with spacing `zoom`, bilinearly interpolated (the cutouts are resampled images),
/// rescaled by the interpolation's mean variance loss.
struct CorrelatedNoise {
    zoom: f32,
    /// Grid side (noise samples per row and column).
    gw: usize,
    /// Per channel: the white grid (zoom 1, `gw`×`gw`) or its rows interpolated to the image
    /// width (`gw`×SIDE).
    grid: [Vec<f32>; 3],
}

impl CorrelatedNoise {
    /// Draws the noise of one image; `grid` and `tmp` are reused buffers (any content).
    fn new(seed: u64, zoom: f32, mut grid: [Vec<f32>; 3], tmp: &mut Vec<f32>) -> Self {
        let mut rng = Wy(seed);
        let zoom = if zoom <= 1.05 { 1.0 } else { zoom };
        let gw = (SIDE as f32 / zoom).ceil() as usize + 2;
        for plane in grid.iter_mut() {
            plane.clear();
            plane.resize(gw * gw, 0.0);
            rng.fill_gauss(plane);
        }
        if zoom > 1.0 {
            // interpolate every grid row horizontally once (gw rows × SIDE columns); rows of the
            // image then only blend two of these, which vectorises
            let xs: Vec<(usize, f32)> = (0..SIDE)
                .map(|x| {
                    let gx = x as f32 / zoom;
                    (gx as usize, gx - gx.floor())
                })
                .collect();
            // mean variance of bilinear interpolation of white noise is (2/3)^2: gain 1.5
            let gain = 1.5f32;
            for plane in grid.iter_mut() {
                tmp.clear();
                tmp.resize(gw * SIDE, 0.0);
                for gy in 0..gw {
                    let src = &plane[gy * gw..(gy + 1) * gw];
                    for (d, &(x0, fx)) in tmp[gy * SIDE..(gy + 1) * SIDE].iter_mut().zip(&xs) {
                        *d = (src[x0] + (src[x0 + 1] - src[x0]) * fx) * gain;
                    }
                }
                std::mem::swap(plane, tmp);
            }
        }
        CorrelatedNoise { zoom, gw, grid }
    }

    fn row(&self, y: usize, mut out: [&mut Vec<f32>; 3]) {
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
            let (r0, r1) = (&g[y0 * SIDE..(y0 + 1) * SIDE], &g[(y0 + 1) * SIDE..(y0 + 2) * SIDE]);
            for ((v, a), b) in o.iter_mut().zip(r0).zip(r1) {
                *v = a + (b - a) * fy;
            }
        }
    }
}

/// The 424×424 RGB image `rgb` in orientation `k` (0–7): `k & 3` quarter turns after a mirror
/// image when `k >= 4`; 0 is the image as drawn. The 8 are the right-angle rotations and
/// mirror images (the dihedral group of the square), each a permutation of the pixels, so no
/// value changes. (424 is 53 JPEG blocks: the block grid maps onto itself in every one.)
pub fn orient(rgb: &[u8], k: u8) -> Vec<u8> {
    assert_eq!(rgb.len(), SIDE * SIDE * 3, "a {SIDE}×{SIDE} RGB image");
    assert!(k < 8, "orientation {k} is not one of 0–7");
    if k == 0 {
        return rgb.to_vec();
    }
    let m = SIDE - 1;
    let mut out = vec![0u8; rgb.len()];
    for y in 0..SIDE {
        for x in 0..SIDE {
            // the source of output pixel (y, x): undo the quarter turns, then the mirror
            let (mut sy, mut sx) = (y, x);
            for _ in 0..(k & 3) {
                (sy, sx) = (sx, m - sy);
            }
            if k >= 4 {
                sx = m - sx;
            }
            let (o, i) = (3 * (y * SIDE + x), 3 * (sy * SIDE + sx));
            out[o..o + 3].copy_from_slice(&rgb[i..i + 3]);
        }
    }
    out
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

    /// The 8 orientations of an image with no symmetry are 8 different images, each a
    /// permutation of its pixels (no value changes; every pixel is kept whole), the first the
    /// image itself; four quarter turns and two mirror images give the image back.
    #[test]
    fn orientations_are_the_eight_symmetries_of_the_square() {
        // every pixel different (its position in three bytes), so nothing is symmetric
        let img: Vec<u8> = (0..SIDE * SIDE)
            .flat_map(|p| [(p % 256) as u8, ((p / 256) % 256) as u8, (p / 65536) as u8])
            .collect();
        let sorted_pixels = |v: &[u8]| {
            let mut px: Vec<&[u8]> = v.chunks(3).collect();
            px.sort();
            px.into_iter().flatten().copied().collect::<Vec<u8>>()
        };
        let views: Vec<Vec<u8>> = (0..8).map(|k| orient(&img, k)).collect();
        assert_eq!(views[0], img);
        for (k, v) in views.iter().enumerate() {
            assert_eq!(
                sorted_pixels(v),
                sorted_pixels(&img),
                "orientation {k} is not a permutation of pixels"
            );
            for (j, w) in views.iter().enumerate().take(k) {
                assert_ne!(v, w, "orientations {j} and {k} are the same");
            }
        }
        let four_turns = (0..4).fold(img.clone(), |v, _| orient(&v, 1));
        assert_eq!(four_turns, img);
        assert_eq!(orient(&orient(&img, 4), 4), img);
        // a quarter turn moves the top-left pixel to a corner
        let corner = |v: &[u8]| [0, SIDE - 1, SIDE * (SIDE - 1), SIDE * SIDE - 1].map(|p| v[3 * p..3 * p + 3].to_vec());
        assert!(corner(&views[1]).contains(&img[0..3].to_vec()));
    }

    #[test]
    fn noise_is_roughly_standard() {
        let mut w = Wy(42);
        let n = 100_000;
        let v: Vec<f32> = (0..n).map(|_| w.gauss()).collect();
        check_standard(&v);
        let mut v = vec![0f32; n + 1];
        Wy(7).fill_gauss(&mut v);
        check_standard(&v);
        // the two halves of a pair are uncorrelated
        let pairs: Vec<[f32; 2]> = (0..n).map(|_| w.gauss_pair()).collect();
        let cov = pairs.iter().map(|p| p[0] * p[1]).sum::<f32>() / n as f32;
        assert!(cov.abs() < 0.02, "pair covariance {cov}");
    }

    fn check_standard(v: &[f32]) {
        let n = v.len();
        let mean = v.iter().sum::<f32>() / n as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n as f32;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "var {var}");
    }

    #[test]
    fn both_builds_of_the_row_pass_give_the_same_bytes() {
        let mut w = Wy(3);
        let flux: Vec<Vec<f32>> = (0..3)
            .map(|c| {
                (0..SIDE)
                    .map(|x| (x as f32 * 0.37 + c as f32).sin() * 40.0 + w.gauss() * 9.0)
                    .collect()
            })
            .collect();
        let noise: Vec<f32> = (0..SIDE).map(|_| w.gauss()).collect();
        let run = |generic: bool| {
            let (mut nr, mut ng, mut nb) = (noise.clone(), noise.clone(), noise.clone());
            let (mut mean, mut fac) = (vec![0f32; SIDE], vec![0f32; SIDE]);
            let row = Row {
                rgb: [&flux[0], &flux[1], &flux[2]],
                noise: [&mut nr, &mut ng, &mut nb],
                mean: &mut mean,
                fac: &mut fac,
            };
            let mut o = vec![0u8; 3 * SIDE];
            if generic {
                finish_row_generic([1.0, 0.8, 1.2], row, &mut o);
            } else {
                finish_row([1.0, 0.8, 1.2], row, &mut o);
            }
            o
        };
        let (a, b) = (run(true), run(false));
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&v| v > 200) && a.iter().any(|&v| v < 20),
            "covers the range"
        );
    }

    #[test]
    fn blur_is_almost_gaussian() {
        for sigma in [0.8f32, 1.5, 3.0, 4.5] {
            let n = 81;
            let mut f = Flux::new(n, n);
            let c = n / 2;
            for p in f.c.iter_mut() {
                p[c * n + c] = 1.0;
            }
            blur(&mut f, sigma);
            let total: f32 = f.c[0].iter().sum();
            assert!((total - 1.0).abs() < 1e-3, "flux kept: {total}");
            let var: f32 = (0..n * n)
                .map(|i| f.c[0][i] * ((i % n) as f32 - c as f32).powi(2))
                .sum();
            assert!(
                (var.sqrt() - sigma).abs() < 0.25 * sigma,
                "sigma {sigma}: got {}",
                var.sqrt()
            );
        }
    }

    #[test]
    fn fast_stretch_matches_formula() {
        let mut worst = 0f32;
        let mut i = -40.0f32;
        while i < 3000.0 {
            let (fast, exact) = (stretch_factor_fast(i), stretch_factor(i));
            worst = worst.max((fast - exact).abs() / exact.abs());
            i += if i.abs() < 1.0 {
                0.0007
            } else {
                0.0131 * i.abs().max(1.0)
            };
        }
        for i in [0.0f32, 1e-6, -1e-6, 0.02, 0.022, -0.022, 1e6] {
            let (fast, exact) = (stretch_factor_fast(i), stretch_factor(i));
            worst = worst.max((fast - exact).abs() / exact.abs());
        }
        assert!(worst < 2e-5, "worst relative error {worst}");
    }
}

#[cfg(test)]
mod halo_tests {
    use super::*;
    use crate::galaxy::{Facts, Kind};

    fn scene(central: Vec<Component>) -> Scene {
        Scene {
            kind: Kind::Elliptical,
            central,
            dust: None,
            field: Vec::new(),
            stars: Vec::new(),
            trails: Vec::new(),
            psf: 2.4,
            zoom: 1.6,
            noise: [0.4; 3],
            sky: [0.0; 3],
            noise_seed: 1,
            facts: Facts::default(),
        }
    }

    /// The noise-free light of `scene`'s central object against its profiles, unblurred, at every
    /// pixel at least `r_min[k]` from the centre of every component `k` (in its elliptical metric):
    /// away from the steep centres the PSF changes a smooth profile by a few per cent at most, and
    /// each component is drawn down to [`FLOOR`], so a larger difference is light cut off (the
    /// square edge of a box that stopped drawing the profile too soon) or missing at the image's
    /// border.
    fn check_outer_light(scene: &Scene, r_min: &[f32]) {
        let mut img = Flux::new(SIDE, SIDE);
        render_central(scene, &mut img);
        let mut worst = (0f32, 0usize, 0usize, 0f32, 0f32);
        for y in 0..SIDE {
            for x in 0..SIDE {
                let near = scene.central.iter().zip(r_min).any(|(c, &r)| {
                    let (dx, dy) = (x as f32 + 0.5 - c.x, y as f32 + 0.5 - c.y);
                    within(c, c.pa.sin_cos(), dx, dy, r)
                });
                if near {
                    continue;
                }
                let want: f32 = scene
                    .central
                    .iter()
                    .map(|c| {
                        let (m, a) = eval(c, c.pa.sin_cos(), x as f32 + 0.5 - c.x, y as f32 + 0.5 - c.y, 0.0);
                        m * c.sed.0[0] + a * arm_sed(c).0[0]
                    })
                    .sum();
                let got = img.c[0][y * SIDE + x];
                let err = (got - want).abs() - 0.06 * want;
                if err > worst.0 {
                    worst = (err, x, y, got, want);
                }
            }
        }
        // each component may stop where it falls below the floor (its colour at most 1.5)
        let allowed = 1.5 * FLOOR * scene.central.len() as f32;
        let (err, x, y, got, want) = worst;
        assert!(
            err < allowed,
            "pixel ({x}, {y}): rendered {got:.4}, profile {want:.4} (a step in the halo)"
        );
    }

    #[test]
    fn a_bright_extended_elliptical_has_no_halo_edge() {
        // as bright and as large as Scene::sample draws them (ie up to 40, re up to ~64 px)
        let e = Component {
            x: 212.3,
            y: 211.6,
            q: 0.62,
            pa: 0.7,
            profile: Profile::Sersic {
                re: 48.0,
                n: 3.0,
                ie: 36.0,
            },
            sed: Sed([1.3, 1.0, 0.7]),
        };
        check_outer_light(&scene(vec![e.clone()]), &[48.0]);
        // a small, steep, very bright one (a de Vaucouleurs profile's wings are extended)
        let small = Component {
            profile: Profile::Sersic {
                re: 9.0,
                n: 4.0,
                ie: 30.0,
            },
            ..e
        };
        check_outer_light(&scene(vec![small]), &[45.0]);
    }

    #[test]
    fn a_bright_disk_and_bulge_have_no_halo_edge() {
        // an inclined disk (brightened by the line of sight, as Scene::sample does) and a bright
        // compact bulge
        let disk = Component {
            x: 211.8,
            y: 212.4,
            q: 0.3,
            pa: 2.1,
            profile: Profile::Disk {
                h: 28.0,
                i0: 200.0,
                arms: None,
                bar: None,
                ring: None,
                lopsided: 0.0,
            },
            sed: Sed([1.1, 1.0, 0.9]),
        };
        let bulge = Component {
            q: 0.8,
            profile: Profile::Sersic {
                re: 5.0,
                n: 3.6,
                ie: 650.0,
            },
            sed: Sed([1.3, 1.0, 0.7]),
            ..disk.clone()
        };
        check_outer_light(&scene(vec![disk, bulge]), &[56.0, 40.0]);
    }
}

#[cfg(test)]
mod extent_tests {
    use super::*;
    use rand::SeedableRng;

    /// Beyond its extent every drawn component (and every part of it: disk, arms, bar, ring) is
    /// fainter than the floor, in every direction.
    #[test]
    fn profiles_are_below_the_floor_beyond_their_extent() {
        let mut checked = 0;
        for seed in 0..3000u64 {
            let scene = Scene::sample(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
            let parts = scene.central.iter().map(|c| (c, 0.0));
            for (c, soft) in parts.chain(scene.field.iter().map(|c| (c, scene.psf * 1.2))) {
                let e = extent(c, soft);
                if e >= MAX_EXTENT {
                    continue;
                }
                let (s, co) = c.pa.sin_cos();
                for k in 0..64 {
                    let phi = k as f32 * (2.0 * PI / 64.0);
                    let (u, v) = (1.001 * e * phi.cos(), 1.001 * e * c.q * phi.sin());
                    let (dx, dy) = (u * co - v * s, u * s + v * co);
                    let (m, a) = eval(c, (s, co), dx, dy, soft);
                    assert!(
                        m + a <= FLOOR,
                        "scene {seed}: {c:?} is {} at {:.1} px > extent {e:.1} (angle {phi:.2})",
                        m + a,
                        1.001 * e
                    );
                }
                checked += 1;
            }
        }
        assert!(checked > 10_000, "{checked} components");
    }
}
