//! Scene sampling: what is drawn in one synthetic image, and the answer probabilities it implies.
//!
//! [`Scene::sample`] draws the central object (elliptical, disk with optional bulge, bar, spiral
//! arms, ring, dust lane, disturbance; irregular; merger; star or artefact), the observing
//! conditions (PSF width, sky noise, sky level) and the field (stars and small galaxies). The
//! profiles follow the usual photometric decomposition: a Sérsic (1963) bulge/spheroid with
//! `b_n ≈ 2n − 1/3` (Ciotti & Bertin 1999) plus an exponential disk (Freeman 1970), logarithmic
//! spiral arms with a pitch angle, colours from "red and dead" bulges to blue star-forming arms.
//! [`crate::render`] turns a scene into pixels; [`Scene::answer_probs`] turns the same scene into
//! per-question answer probabilities for the simulated volunteers ([`crate::labels`]), using only
//! what was drawn and how visible it is (size against the PSF, surface brightness against the
//! noise), so small or faint galaxies get ambiguous labels.

use std::f32::consts::PI;

use gz_schema::N_QUESTIONS;
use rand::Rng;
use rand_distr::{Distribution, Normal, Poisson};

use crate::labels::Probs;

/// Colour of a component in display space: weights for the (R, G, B) = (i, r, g) channels of the
/// SDSS composite, normalised so that their mean is 1 (intensity is the channel mean).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sed(pub [f32; 3]);

impl Sed {
    fn new(r: f32, g: f32, b: f32) -> Self {
        let m = (r + g + b) / 3.0;
        Sed([r / m, g / m, b / m])
    }

    /// Old stellar population (bulges, ellipticals): yellow-orange.
    fn red<R: Rng>(rng: &mut R) -> Self {
        Sed::new(1.0, rng.gen_range(0.74..0.84), rng.gen_range(0.48..0.60))
    }

    /// A disk: pale, between red and blue.
    fn disk<R: Rng>(rng: &mut R) -> Self {
        Sed::new(1.0, rng.gen_range(0.84..0.95), rng.gen_range(0.70..0.95))
    }

    /// Young stars (arms, clumps, irregulars): blue.
    fn blue<R: Rng>(rng: &mut R) -> Self {
        Sed::new(rng.gen_range(0.60..0.78), rng.gen_range(0.74..0.88), 1.0)
    }

    /// A field star: anything from red dwarfs to blue-white stars.
    fn star<R: Rng>(rng: &mut R) -> Self {
        let t: f32 = rng.gen();
        Sed::new(1.0, 0.55 + 0.45 * t, 0.25 + 0.95 * t)
    }
}

/// Logarithmic spiral arms of a disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Arms {
    /// Number of arms.
    pub m: u32,
    /// Pitch angle in degrees (tight ≈ 10°, medium ≈ 20°, loose ≈ 32°).
    pub pitch_deg: f32,
    /// Fraction of the disk light in the arms (arm contrast), 0..1.
    pub strength: f32,
    /// Sharpness exponent of the arm profile (larger: thinner arms).
    pub sharpness: f32,
    /// Phase offset (radians).
    pub phase: f32,
    /// Arm colour.
    pub sed: Sed,
}

/// A bar in the disk plane.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// Half-length in disk scale lengths.
    pub length: f32,
    /// Axis ratio of the bar.
    pub q: f32,
    /// Angle to the disk's major axis in the disk plane (radians).
    pub angle: f32,
    /// Peak intensity relative to the disk's central intensity.
    pub strength: f32,
}

/// A ring in the disk plane.
#[derive(Debug, Clone, PartialEq)]
pub struct Ring {
    /// Radius in disk scale lengths.
    pub radius: f32,
    /// Width (Gaussian sigma) in disk scale lengths.
    pub width: f32,
    /// Peak intensity relative to the disk's central intensity.
    pub strength: f32,
    /// Ring colour.
    pub sed: Sed,
}

/// A dust lane along the major axis of a (nearly) edge-on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Dust {
    /// Fraction of light absorbed at the lane's centre, 0..1.
    pub depth: f32,
    /// Gaussian half-width in pixels.
    pub width: f32,
    /// Offset from the major axis in pixels.
    pub offset: f32,
}

/// A smooth component drawn with a profile in its own rotated frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Profile {
    /// Sérsic profile `I_e exp(-b_n((r/r_e)^(1/n) - 1))`.
    Sersic { re: f32, n: f32, ie: f32 },
    /// Exponential disk `I_0 exp(-r/h)` with optional bar, arms, ring (in the disk plane).
    Disk {
        h: f32,
        i0: f32,
        arms: Option<Arms>,
        bar: Option<Bar>,
        ring: Option<Ring>,
        lopsided: f32,
    },
    /// Gaussian blob (clumps, knots): peak `amp`, width `sigma`.
    Gauss { sigma: f32, amp: f32 },
    /// Arc (tidal tail, lensed arc): Gaussian across a circle of `radius` between angles.
    Arc {
        radius: f32,
        width: f32,
        from: f32,
        span: f32,
        amp: f32,
    },
}

/// One drawn component: a profile, where it sits, its shape and colour.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    /// Centre in pixels.
    pub x: f32,
    /// Centre in pixels.
    pub y: f32,
    /// Axis ratio (b/a) of the projection.
    pub q: f32,
    /// Position angle (radians) of the major axis.
    pub pa: f32,
    /// The light profile.
    pub profile: Profile,
    /// Colour.
    pub sed: Sed,
}

/// A point source (star), drawn with the PSF.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Position in pixels.
    pub x: f32,
    /// Position in pixels.
    pub y: f32,
    /// Total flux (in sky sigma × pixel² units).
    pub flux: f32,
    /// Colour.
    pub sed: Sed,
}

/// A straight artefact line (satellite trail) across the image.
#[derive(Debug, Clone, PartialEq)]
pub struct Trail {
    /// A point on the line.
    pub x: f32,
    /// A point on the line.
    pub y: f32,
    /// Direction (radians).
    pub angle: f32,
    /// Peak intensity.
    pub amp: f32,
    /// Gaussian width in pixels.
    pub width: f32,
    /// Colour.
    pub sed: Sed,
}

/// What the central object is (drives both pixels and labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Smooth spheroid.
    Elliptical,
    /// Disk galaxy (possibly with bulge, bar, arms, ring, dust lane).
    Disk,
    /// Irregular: clumpy, no bulge.
    Irregular,
    /// Two galaxies merging, with tidal tails.
    Merger,
    /// A star at the centre.
    Star,
    /// An artefact (satellite trail, ghost) at the centre.
    Artefact,
}

/// Everything drawn in one image.
#[derive(Debug, Clone)]
pub struct Scene {
    /// What the central object is.
    pub kind: Kind,
    /// Components of the central object (rendered in one box, blurred by the PSF).
    pub central: Vec<Component>,
    /// Dust lane of the central disk (applied to the central box), with its frame.
    pub dust: Option<(Dust, f32, f32, f32)>,
    /// Small field galaxies (rendered with a softened profile).
    pub field: Vec<Component>,
    /// Stars (the central star too, for `Kind::Star`).
    pub stars: Vec<Point>,
    /// Artefact trails.
    pub trails: Vec<Trail>,
    /// PSF Gaussian sigma in pixels.
    pub psf: f32,
    /// Magnification of the cutout: correlation length of the sky noise in pixels (>= 1).
    pub zoom: f32,
    /// Sky noise per channel (in the intensity unit).
    pub noise: [f32; 3],
    /// Residual sky level per channel.
    pub sky: [f32; 3],
    /// Seed of the pixel-noise generator.
    pub noise_seed: u64,
    /// Facts used for the labels.
    pub facts: Facts,
}

/// The drawn quantities the answer probabilities depend on.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Apparent axis ratio of the main body.
    pub q: f32,
    /// Bulge-to-total light ratio (1 for ellipticals).
    pub bulge_frac: f32,
    /// Boxy/peanut bulge (edge-on disks).
    pub boxy: bool,
    /// Resolution: main scale (disk scale length or effective radius) over PSF sigma.
    pub resolution: f32,
    /// Surface brightness of the main body at one scale length, in sky sigma.
    pub surface_brightness: f32,
    /// Spiral arms (count, pitch in degrees, strength).
    pub arms: Option<(u32, f32, f32)>,
    /// Bar strength (0 = none).
    pub bar: f32,
    /// Ring strength (0 = none).
    pub ring: f32,
    /// Dust lane depth (0 = none).
    pub dust: f32,
    /// Disturbance (lopsidedness, tidal features), 0..1.
    pub disturbed: f32,
    /// Lensed arc strength (0 = none).
    pub lens: f32,
    /// Bright neighbour overlapping the galaxy (confuses volunteers), 0..1.
    pub crowding: f32,
}

fn sat(x: f32) -> f32 {
    x.clamp(0.0, 1.0)
}

fn smoothstep(lo: f32, hi: f32, x: f32) -> f32 {
    let t = sat((x - lo) / (hi - lo));
    t * t * (3.0 - 2.0 * t)
}

/// Log-uniform draw in `[lo, hi)`.
fn log_uniform<R: Rng>(rng: &mut R, lo: f32, hi: f32) -> f32 {
    (rng.gen_range(lo.ln()..hi.ln())).exp()
}

/// Image side in pixels (the Kaggle images are 424×424).
pub const SIDE: usize = 424;
const CENTRE: f32 = SIDE as f32 / 2.0;

impl Scene {
    /// Draws one scene from `rng`.
    pub fn sample<R: Rng>(rng: &mut R) -> Scene {
        let u: f32 = rng.gen();
        let kind = if u < 0.37 {
            Kind::Elliptical
        } else if u < 0.905 {
            Kind::Disk
        } else if u < 0.935 {
            Kind::Irregular
        } else if u < 0.97 {
            Kind::Merger
        } else if u < 0.99 {
            Kind::Star
        } else {
            Kind::Artefact
        };
        // The Galaxy Zoo cutouts are resampled to 0.02 petroR90 per pixel: small galaxies are
        // magnified, so their PSF is wide and their noise correlated over `zoom` pixels.
        let zoom = log_uniform(rng, 1.0, 2.8);
        let psf = zoom * rng.gen_range(1.0f32..1.6);
        let noise = [
            rng.gen_range(0.38..0.52),
            rng.gen_range(0.34..0.48),
            rng.gen_range(0.29..0.41),
        ];
        let sky = [
            rng.gen_range(0.0..0.12),
            rng.gen_range(0.0..0.12),
            rng.gen_range(0.0..0.08),
        ];
        let mut s = Scene {
            kind,
            central: Vec::new(),
            dust: None,
            field: Vec::new(),
            stars: Vec::new(),
            trails: Vec::new(),
            psf,
            zoom,
            noise,
            sky,
            noise_seed: rng.gen(),
            facts: Facts::default(),
        };
        // small random offset of the centre, like the SDSS cutouts
        let cx = CENTRE + rng.gen_range(-2.0..2.0);
        let cy = CENTRE + rng.gen_range(-2.0..2.0);
        match kind {
            Kind::Elliptical => s.elliptical(rng, cx, cy),
            Kind::Disk => s.disk(rng, cx, cy),
            Kind::Irregular => s.irregular(rng, cx, cy),
            Kind::Merger => s.merger(rng, cx, cy),
            Kind::Star => s.star(rng, cx, cy),
            Kind::Artefact => s.artefact(rng, cx, cy),
        }
        s.add_field(rng);
        s
    }

    fn elliptical<R: Rng>(&mut self, rng: &mut R, cx: f32, cy: f32) {
        let n = rng.gen_range(2.0..5.0);
        let re = log_uniform(rng, 13.0, 45.0) * (4.0f32 / n).sqrt();
        let ie = log_uniform(rng, 3.0, 40.0);
        let q = if rng.gen::<f32>() < 0.25 {
            rng.gen_range(0.35..0.65)
        } else {
            rng.gen_range(0.6..1.0)
        };
        let pa = rng.gen_range(0.0..PI);
        self.central.push(Component {
            x: cx,
            y: cy,
            q,
            pa,
            profile: Profile::Sersic { re, n, ie },
            sed: Sed::red(rng),
        });
        self.facts = Facts {
            q,
            bulge_frac: 1.0,
            resolution: re / self.psf,
            surface_brightness: ie,
            ..Facts::default()
        };
        if rng.gen::<f32>() < 0.012 {
            // a gravitational arc around a massive elliptical
            let amp = ie * rng.gen_range(0.4..1.2);
            let radius = re * rng.gen_range(1.5..3.0);
            self.central.push(Component {
                x: cx,
                y: cy,
                q: 1.0,
                pa: 0.0,
                profile: Profile::Arc {
                    radius,
                    width: 1.2,
                    from: rng.gen_range(0.0..2.0 * PI),
                    span: rng.gen_range(0.6..1.6),
                    amp,
                },
                sed: Sed::blue(rng),
            });
            self.facts.lens = sat(amp / 3.0);
        }
    }

    fn disk<R: Rng>(&mut self, rng: &mut R, cx: f32, cy: f32) {
        let h = log_uniform(rng, 10.0, 30.0);
        let i0 = log_uniform(rng, 5.0, 70.0);
        // random inclination: cos i uniform, intrinsic thickness 0.2
        let cosi: f32 = rng.gen();
        let q = (cosi * cosi + 0.2f32 * 0.2).sqrt().min(1.0);
        let pa = rng.gen_range(0.0..PI);
        let bulge_frac = if rng.gen::<f32>() < 0.2 {
            rng.gen_range(0.0..0.05)
        } else {
            rng.gen_range(0.05..0.65)
        };
        let edge_on = q < 0.35;
        let face_visible = smoothstep(0.2, 0.5, q);
        let arms = if rng.gen::<f32>() < 0.75 {
            let m = match rng.gen::<f32>() {
                u if u < 0.06 => 1,
                u if u < 0.68 => 2,
                u if u < 0.83 => 3,
                u if u < 0.93 => 4,
                u => 5 + u32::from(u > 0.97),
            };
            let pitch_deg = match rng.gen::<f32>() {
                u if u < 0.33 => rng.gen_range(6.0..14.0),
                u if u < 0.7 => rng.gen_range(14.0..24.0),
                _ => rng.gen_range(24.0..38.0),
            };
            Some(Arms {
                m,
                pitch_deg,
                strength: rng.gen_range(0.2..0.75),
                sharpness: rng.gen_range(1.5..4.5),
                phase: rng.gen_range(0.0..2.0 * PI),
                sed: Sed::blue(rng),
            })
        } else {
            None
        };
        let bar = (rng.gen::<f32>() < 0.3).then(|| Bar {
            length: rng.gen_range(0.8..1.8),
            q: rng.gen_range(0.2..0.4),
            angle: rng.gen_range(0.0..PI),
            strength: rng.gen_range(0.25..1.0),
        });
        let ring = (q > 0.6 && rng.gen::<f32>() < 0.12).then(|| Ring {
            radius: rng.gen_range(1.2..2.6),
            width: rng.gen_range(0.18..0.4),
            strength: rng.gen_range(0.3..0.9),
            sed: if rng.gen::<bool>() {
                Sed::blue(rng)
            } else {
                Sed::disk(rng)
            },
        });
        let lopsided = if rng.gen::<f32>() < 0.08 {
            rng.gen_range(0.2..0.7)
        } else {
            0.0
        };
        // Edge-on disks look brighter (longer line of sight), capped.
        let i0_proj = i0 / q.max(0.12).powf(0.6);
        let disk_sed = Sed::disk(rng);
        let arms_facts = arms.as_ref().map(|a| (a.m, a.pitch_deg, a.strength));
        let (bar_s, ring_s) = (
            bar.as_ref().map_or(0.0, |b| b.strength),
            ring.as_ref().map_or(0.0, |r| r.strength),
        );
        self.central.push(Component {
            x: cx,
            y: cy,
            q,
            pa,
            profile: Profile::Disk {
                h,
                i0: i0_proj,
                arms,
                bar,
                ring,
                lopsided,
            },
            sed: disk_sed,
        });
        // Bulge: total light ratio B/T; disk total = 2π h² i0 (face-on).
        let mut boxy = false;
        if bulge_frac > 0.0 {
            let n = rng.gen_range(1.5..4.0);
            let re = h * rng.gen_range(0.15..0.4);
            let disk_total = 2.0 * PI * h * h * i0;
            let bulge_total = disk_total * bulge_frac / (1.0 - bulge_frac);
            // Sérsic total = I_e re² 2π n e^b b^-2n Γ(2n): use a rough fit for n in 1..4
            let bn = 2.0 * n - 1.0 / 3.0;
            let total_per_ie = 2.0 * PI * re * re * n * bn.exp() * gamma(2.0 * n) / bn.powf(2.0 * n);
            let ie = bulge_total / total_per_ie;
            boxy = edge_on && rng.gen::<f32>() < 0.15;
            let bq = if boxy { 0.75 } else { rng.gen_range(0.7..1.0f32).max(q) };
            self.central.push(Component {
                x: cx,
                y: cy,
                q: bq,
                pa,
                profile: Profile::Sersic { re, n, ie },
                sed: Sed::red(rng),
            });
        }
        let mut dust_depth = 0.0;
        if q < 0.38 && rng.gen::<f32>() < 0.6 {
            let dust = Dust {
                depth: rng.gen_range(0.3..0.8),
                width: (h * q * rng.gen_range(0.25..0.45)).max(0.8),
                offset: h * q * rng.gen_range(-0.3..0.3),
            };
            dust_depth = dust.depth;
            self.dust = Some((dust, cx, cy, pa));
        }
        let disturbed = lopsided;
        if lopsided > 0.0 {
            // a few bright asymmetric knots
            for _ in 0..rng.gen_range(1..4) {
                let r = h * rng.gen_range(0.8..2.5);
                let t = rng.gen_range(0.0..2.0 * PI);
                self.central.push(Component {
                    x: cx + r * t.cos(),
                    y: cy + r * t.sin() * q,
                    q: 1.0,
                    pa: 0.0,
                    profile: Profile::Gauss {
                        sigma: rng.gen_range(1.0..3.0),
                        amp: i0 * rng.gen_range(0.5..2.0),
                    },
                    sed: Sed::blue(rng),
                });
            }
        }
        self.facts = Facts {
            q,
            bulge_frac,
            boxy,
            resolution: h / self.psf,
            surface_brightness: i0 * (-1.0f32).exp() / q.max(0.12).powf(0.6) * 2.0,
            arms: arms_facts.map(|(m, p, s)| (m, p, s * face_visible)),
            bar: bar_s * face_visible,
            ring: ring_s * face_visible,
            dust: dust_depth,
            disturbed,
            lens: 0.0,
            crowding: 0.0,
        };
    }

    fn irregular<R: Rng>(&mut self, rng: &mut R, cx: f32, cy: f32) {
        let h = log_uniform(rng, 9.0, 25.0);
        let i0 = log_uniform(rng, 4.0, 30.0);
        let q = rng.gen_range(0.4..1.0);
        let pa = rng.gen_range(0.0..PI);
        self.central.push(Component {
            x: cx,
            y: cy,
            q,
            pa,
            profile: Profile::Disk {
                h,
                i0,
                arms: None,
                bar: None,
                ring: None,
                lopsided: rng.gen_range(0.0..0.6),
            },
            sed: Sed::blue(rng),
        });
        let n = rng.gen_range(3..10);
        for _ in 0..n {
            let r = h * rng.gen_range(0.0..2.2f32).powf(1.2);
            let t = rng.gen_range(0.0..2.0 * PI);
            self.central.push(Component {
                x: cx + r * t.cos(),
                y: cy + r * t.sin(),
                q: rng.gen_range(0.5..1.0),
                pa: rng.gen_range(0.0..PI),
                profile: Profile::Gauss {
                    sigma: rng.gen_range(0.8..3.5),
                    amp: i0 * rng.gen_range(0.4..2.5),
                },
                sed: Sed::blue(rng),
            });
        }
        self.facts = Facts {
            q,
            bulge_frac: 0.0,
            resolution: h / self.psf,
            surface_brightness: i0 * 0.5,
            disturbed: 1.0,
            ..Facts::default()
        };
    }

    fn merger<R: Rng>(&mut self, rng: &mut R, cx: f32, cy: f32) {
        let re = log_uniform(rng, 9.0, 26.0);
        let ie = log_uniform(rng, 4.0, 35.0);
        let sep = re * rng.gen_range(1.0..3.5);
        let t = rng.gen_range(0.0..PI);
        let ratio = rng.gen_range(0.3..1.0f32);
        let (dx, dy) = (sep * t.cos(), sep * t.sin());
        // the pair's centre of light sits near the image centre
        let w = ratio / (1.0 + ratio);
        let (x1, y1) = (cx - dx * w, cy - dy * w);
        let (x2, y2) = (x1 + dx, y1 + dy);
        for (x, y, f) in [(x1, y1, 1.0), (x2, y2, ratio)] {
            let sed = if rng.gen::<bool>() {
                Sed::red(rng)
            } else {
                Sed::disk(rng)
            };
            self.central.push(Component {
                x,
                y,
                q: rng.gen_range(0.5..1.0),
                pa: rng.gen_range(0.0..PI),
                profile: Profile::Sersic {
                    re: re * f.sqrt(),
                    n: rng.gen_range(1.0..3.5),
                    ie: ie * f.sqrt(),
                },
                sed,
            });
        }
        let tails = rng.gen_range(0..3);
        for k in 0..tails {
            let (x, y) = if k == 0 { (x1, y1) } else { (x2, y2) };
            self.central.push(Component {
                x,
                y,
                q: rng.gen_range(0.4..1.0),
                pa: rng.gen_range(0.0..PI),
                profile: Profile::Arc {
                    radius: sep * rng.gen_range(0.6..1.5),
                    width: re * rng.gen_range(0.3..0.7),
                    from: rng.gen_range(0.0..2.0 * PI),
                    span: rng.gen_range(1.0..2.5),
                    amp: ie * rng.gen_range(0.1..0.35),
                },
                sed: Sed::disk(rng),
            });
        }
        self.facts = Facts {
            q: 0.7,
            bulge_frac: 0.5,
            resolution: re / self.psf,
            surface_brightness: ie,
            disturbed: 0.5 + 0.25 * tails as f32,
            ..Facts::default()
        };
    }

    fn star<R: Rng>(&mut self, rng: &mut R, cx: f32, cy: f32) {
        let flux = log_uniform(rng, 2000.0, 80000.0);
        self.stars.push(Point {
            x: cx,
            y: cy,
            flux,
            sed: Sed::star(rng),
        });
        self.facts = Facts {
            q: 1.0,
            bulge_frac: 1.0,
            resolution: 0.3,
            surface_brightness: flux / 20.0,
            ..Facts::default()
        };
        if rng.gen::<bool>() {
            // often a faint galaxy near the star was the intended target
            let r = rng.gen_range(8.0..30.0);
            let t = rng.gen_range(0.0..2.0 * PI);
            self.central.push(Component {
                x: cx + r * t.cos(),
                y: cy + r * t.sin(),
                q: rng.gen_range(0.4..1.0),
                pa: rng.gen_range(0.0..PI),
                profile: Profile::Sersic {
                    re: rng.gen_range(2.0..6.0),
                    n: 1.5,
                    ie: rng.gen_range(1.5..6.0),
                },
                sed: Sed::disk(rng),
            });
        }
    }

    fn artefact<R: Rng>(&mut self, rng: &mut R, cx: f32, cy: f32) {
        let sed = match rng.gen_range(0..3) {
            0 => Sed::new(1.0, 0.15, 0.15),
            1 => Sed::new(0.15, 1.0, 0.2),
            _ => Sed::new(0.2, 0.3, 1.0),
        };
        self.trails.push(Trail {
            x: cx + rng.gen_range(-10.0..10.0),
            y: cy + rng.gen_range(-10.0..10.0),
            angle: rng.gen_range(0.0..PI),
            amp: rng.gen_range(20.0..200.0),
            width: rng.gen_range(1.0..3.0),
            sed,
        });
        // a faint smudge the pipeline mistook for a galaxy
        self.central.push(Component {
            x: cx,
            y: cy,
            q: rng.gen_range(0.5..1.0),
            pa: 0.0,
            profile: Profile::Sersic {
                re: rng.gen_range(2.0..8.0),
                n: 1.0,
                ie: rng.gen_range(1.0..4.0),
            },
            sed: Sed::disk(rng),
        });
        self.facts = Facts {
            q: 0.8,
            bulge_frac: 0.5,
            resolution: 1.0,
            surface_brightness: 2.0,
            ..Facts::default()
        };
    }

    fn add_field<R: Rng>(&mut self, rng: &mut R) {
        let n_stars = Poisson::new(4.5f64).map_or(7.0, |p| p.sample(rng)) as usize;
        for _ in 0..n_stars {
            let flux = log_uniform(rng, 20.0, 6000.0) * self.zoom * self.zoom;
            self.stars.push(Point {
                x: rng.gen_range(0.0..SIDE as f32),
                y: rng.gen_range(0.0..SIDE as f32),
                flux,
                sed: Sed::star(rng),
            });
        }
        let n_gal = Poisson::new(3.5f64).map_or(3.0, |p| p.sample(rng)) as usize;
        for _ in 0..n_gal {
            let re = log_uniform(rng, 1.2, 7.0) * self.zoom;
            let sed = if rng.gen::<f32>() < 0.6 {
                Sed::red(rng)
            } else {
                Sed::disk(rng)
            };
            self.field.push(Component {
                x: rng.gen_range(0.0..SIDE as f32),
                y: rng.gen_range(0.0..SIDE as f32),
                q: rng.gen_range(0.3..1.0),
                pa: rng.gen_range(0.0..PI),
                profile: Profile::Sersic {
                    re,
                    n: rng.gen_range(1.0..4.0),
                    ie: log_uniform(rng, 1.5, 25.0),
                },
                sed,
            });
        }
        // crowding: a bright neighbour close to the centre confuses the question "anything odd"
        let scale = self.facts.resolution * self.psf;
        let mut crowd = 0.0f32;
        for st in &self.stars {
            let d = ((st.x - CENTRE).powi(2) + (st.y - CENTRE).powi(2)).sqrt();
            if d > 1.0 && d < 2.5 * scale.max(4.0) && st.flux > 300.0 {
                crowd = crowd.max(0.6);
            }
        }
        for g in &self.field {
            let d = ((g.x - CENTRE).powi(2) + (g.y - CENTRE).powi(2)).sqrt();
            if d < 2.5 * scale.max(4.0) {
                crowd = crowd.max(0.8);
            }
        }
        self.facts.crowding = crowd;
    }

    /// Answer probabilities implied by what was drawn (see the module docs).
    pub fn answer_probs(&self) -> Probs {
        let f = &self.facts;
        let mut p = Probs::new();
        // Visibility of structure: resolution against the PSF, surface brightness against noise.
        let res_vis = smoothstep(1.5, 9.0, f.resolution);
        let sb_vis = smoothstep(0.3, 3.0, f.surface_brightness.max(1e-3).ln() + 0.5);
        let clarity = res_vis * (0.35 + 0.65 * sb_vis);
        let mix = |truth: f64, prior: f64, c: f32| f64::from(c) * truth + (1.0 - f64::from(c)) * prior;
        let c = clarity;

        // Q1: smooth / features / star-artefact
        let edge = smoothstep(0.42, 0.2, f.q) * smoothstep(0.8, 3.0, f.resolution);
        let arm_e = f.arms.map_or(0.0, |(_, _, s)| s) * smoothstep(2.0, 8.0, f.resolution) * (0.5 + 0.5 * sb_vis);
        let feature_e = match self.kind {
            // flattened spheroids are sometimes taken for disks
            Kind::Elliptical => 0.1 + 0.35 * (1.0 - f.q) * c + 0.3 * f.lens,
            Kind::Disk => {
                let disk_e = 0.2 + (1.0 - f.bulge_frac) * 0.75 * c;
                let arm_e = if arm_e > 0.0 { 0.45 + 0.6 * arm_e } else { 0.0 };
                disk_e
                    .max(edge * 0.95)
                    .max(arm_e)
                    .max(f.bar * 0.9 * c)
                    .max(f.ring * 0.8 * c)
                    .max(f.disturbed * c)
            }
            Kind::Irregular => 0.35 + 0.55 * c,
            Kind::Merger => 0.3 + 0.5 * c,
            Kind::Star | Kind::Artefact => 0.0,
        };
        let feature_e = sat(feature_e + 0.1 * f.crowding);
        let q1 = match self.kind {
            Kind::Star => [0.1, 0.05, 0.85],
            Kind::Artefact => [0.12, 0.16, 0.72],
            _ => {
                let star = 0.004 + 0.05 * (1.0 - smoothstep(0.6, 2.5, f.resolution)) as f64;
                let feat = 0.05 + 0.9 * f64::from(feature_e);
                [(1.0 - feat - star).max(0.0), feat, star]
            }
        };
        p.set(0, &q1);

        // Q2: edge-on?
        let edge_truth = f64::from(smoothstep(0.4, 0.22, f.q));
        let q2 = match self.kind {
            Kind::Disk => mix(
                edge_truth,
                0.12,
                smoothstep(0.8, 3.0, f.resolution) * (0.5 + 0.5 * sb_vis),
            ),
            _ => 0.06,
        };
        p.set(1, &[q2, 1.0 - q2]);

        // Q3: bar?
        let q3 = if f.bar > 0.0 {
            mix(0.3 + 0.65 * f64::from(f.bar), 0.15, c)
        } else {
            mix(0.05, 0.15, c)
        };
        p.set(2, &[q3, 1.0 - q3]);

        // Q4: spiral?
        let q4 = match f.arms {
            Some((_, _, s)) => mix(0.45 + 0.55 * f64::from(sat(s * 2.0)), 0.45, c),
            None => mix(0.08 + 0.2 * f64::from(f.ring), 0.4, c),
        };
        p.set(3, &[q4, 1.0 - q4]);

        // Q5: bulge prominence from B/T (none, noticeable, obvious, dominant)
        let x = 3.0 * sat(f.bulge_frac / 0.6).powf(0.7);
        let s = 0.45 + 0.9 * (1.0 - c);
        let w5: Vec<f64> = (0..4)
            .map(|k| f64::from((-(k as f32 - x).powi(2) / (2.0 * s * s)).exp()))
            .collect();
        p.set(4, &w5);

        // Q6: anything odd?
        let c6 = 0.4 + 0.6 * c;
        let odd_feats = [
            f.ring * 0.85 * c6,
            f.lens * 0.8,
            f.disturbed * 0.75 * c6,
            f.dust * 0.7 * smoothstep(0.8, 4.0, f.resolution),
            f.crowding * 0.25,
            if self.kind == Kind::Irregular { 0.7 * c6 } else { 0.0 },
            if self.kind == Kind::Merger { 0.8 * c6 } else { 0.0 },
        ];
        let not_odd: f32 = odd_feats.iter().map(|&o| 1.0 - sat(o)).product::<f32>() * 0.9;
        let q6 = f64::from(1.0 - not_odd);
        p.set(5, &[q6, 1.0 - q6]);

        // Q7: how rounded (smooth answerers)
        let centres = [0.92f32, 0.65, 0.3];
        let s7 = 0.1 + 0.12 * (1.0 - c);
        let w7: Vec<f64> = centres
            .iter()
            .map(|&m| f64::from((-(f.q - m).powi(2) / (2.0 * s7 * s7)).exp()) + 0.02)
            .collect();
        p.set(6, &w7);

        // Q8: which odd feature (ring, lens/arc, disturbed, irregular, other, merger, dust lane)
        let w8 = [
            f64::from(f.ring * c6) + 0.03,
            f64::from(f.lens) + 0.03,
            f64::from(f.disturbed * 0.6) + 0.08,
            if self.kind == Kind::Irregular { 1.0 } else { 0.06 },
            0.12 + f64::from(f.crowding) * 0.3,
            if self.kind == Kind::Merger {
                1.2
            } else {
                0.04 + f64::from(f.crowding) * 0.2
            },
            f64::from(f.dust * 1.2) + 0.02,
        ];
        p.set(7, &w8);

        // Q9: bulge shape of edge-on disks (rounded, boxy, none)
        let b = f64::from(sat(f.bulge_frac * 3.0));
        let w9 = if f.boxy {
            [0.3, 0.6, 0.1]
        } else {
            [0.1 + 0.8 * b, 0.06, 0.1 + 0.9 * (1.0 - b)]
        };
        let w9: Vec<f64> = w9.iter().map(|&w| mix(w, 1.0 / 3.0, c)).collect();
        p.set(8, &w9);

        // Q10: arm winding (tight, medium, loose)
        let pitch = f.arms.map_or(18.0, |a| a.1);
        let s10 = 4.0 + 10.0 * (1.0 - c);
        let w10: Vec<f64> = [9.0f32, 19.0, 31.0]
            .iter()
            .map(|&m| f64::from((-(pitch - m).powi(2) / (2.0 * s10 * s10)).exp()) + 0.03)
            .collect();
        p.set(9, &w10);

        // Q11: number of arms (1, 2, 3, 4, more than four, can't tell)
        let mut w11 = [0.0f64; 6];
        match f.arms {
            Some((m, _, strength)) => {
                let k = (m.clamp(1, 5) - 1) as usize;
                let cc = f64::from(c * sat(strength * 1.5));
                w11[k] += 0.2 + 1.0 * cc;
                if k > 0 {
                    w11[k - 1] += 0.15 * (1.0 - cc) + 0.05;
                }
                if k < 4 {
                    w11[k + 1] += 0.15 * (1.0 - cc) + 0.05;
                }
                w11[5] += 0.1 + 0.9 * (1.0 - cc);
            }
            None => {
                w11 = [0.05, 0.3, 0.08, 0.04, 0.03, 0.5];
            }
        }
        p.set(10, &w11);
        debug_assert_eq!(N_QUESTIONS, 11);
        p
    }
}

/// Gamma function (Lanczos approximation), enough for Sérsic normalisation.
fn gamma(x: f32) -> f32 {
    let x = f64::from(x);
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    ((2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * a) as f32
}

/// Draws a standard normal (helper for callers holding a generic RNG).
pub fn normal<R: Rng>(rng: &mut R) -> f32 {
    Normal::new(0.0f32, 1.0).map_or(0.0, |n| n.sample(rng))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_is_right() {
        assert!((gamma(5.0) - 24.0).abs() < 1e-3);
        assert!((gamma(0.5) - PI.sqrt()).abs() < 1e-4);
    }
}
