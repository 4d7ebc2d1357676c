//! `dieleman` and `dieleman-tiny`: after S. Dieleman, K. W. Willett and J. Dambre (2015),
//! "Rotation-invariant convolutional neural networks for galaxy morphology prediction"
//! (MNRAS 450, 1441), the winning Galaxy Zoo Kaggle solution.
//!
//! Per galaxy, four 69×69 *views* are resampled from the cached image on the device with
//! [`crate::augment::affine_sample`]: the regular crop, its mirror, the crop rotated by 45°, and
//! its mirror. Each view is cut into four overlapping 45×45 *parts* (its corners), each rotated
//! by a multiple of 90° so that the galaxy centre sits in the same (bottom-right) corner of every
//! part. The 16 parts go through one shared conv tower (6×6×32, pool; 5×5×64, pool; 3×3×128;
//! 3×3×128, pool; all valid convolutions with ReLU, 2×2 max-pools), the 16 feature vectors
//! (128×2×2 each) are concatenated (8192), then two maxout dense layers of 2048 units (4096
//! linear units, max over adjacent pairs) and the 37 raw outputs, with dropout 0.5 on the input
//! of each of the three dense layers; [`super::Model`] applies the output layer (the decision
//! tree by default).
//!
//! View scale: Dieleman's views are the central 207×207 pixels of the 424×424 originals
//! downsampled by 3. Our cached images are the central `crop` pixels (212 by default) resized to
//! `size`; a view therefore spans `view_fraction = 207 / crop` of the cached image's side
//! ([`crate::config::ModelConfig::view_fraction`]). The 45° views reach outside the cached
//! crop at their corners (√2·207/2 > 212/2); those pixels read 0, close to the dark sky
//! background the originals have there.
//!
//! Checkpoint names: `conv1`…`conv4`, `dense1`, `dense2` (each 2·units wide), `out`.

use super::{Dropper, LayerInfo};
use crate::augment::{affine_sample, dieleman_parts_kernel, Affine};
use crate::config::{Arch, ModelConfig, DIELEMAN_PART, DIELEMAN_VIEW};
use crate::ops::{run_tower, Conv2d};
use candle_core::{Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use gz_schema::N_ANSWERS;

/// Number of views per galaxy.
pub const N_VIEWS: usize = 4;
/// Number of parts per view.
pub const N_PARTS_PER_VIEW: usize = 4;
/// Parts per galaxy (the tower's batch multiplier).
pub const N_PARTS: usize = N_VIEWS * N_PARTS_PER_VIEW;

/// Kernel sizes of the conv tower and whether a 2×2 max-pool follows each conv.
const TOWER: [(usize, bool); 4] = [(6, true), (5, true), (3, false), (3, true)];

/// Channel layout of a Dieleman-style net.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DielemanSpec {
    /// Output channels of the four conv layers.
    pub conv: [usize; 4],
    /// Units of each maxout dense layer (each has twice as many linear units).
    pub maxout: usize,
}

impl DielemanSpec {
    /// `dieleman`: 32/64/128/128, maxout 2048; `dieleman-tiny`: 8/16/32/32, maxout 128.
    pub fn for_arch(arch: Arch) -> Self {
        match arch {
            Arch::Dieleman => DielemanSpec {
                conv: [32, 64, 128, 128],
                maxout: 2048,
            },
            _ => DielemanSpec {
                conv: [8, 16, 32, 32],
                maxout: 128,
            },
        }
    }
}

/// Side of the tower's output feature map for a part (2 for 45×45 parts).
fn tower_side() -> usize {
    let mut s = DIELEMAN_PART;
    for (k, pool) in TOWER {
        s = s + 1 - k;
        if pool {
            s /= 2;
        }
    }
    s
}

/// The layer plan of a Dieleman-style config.
pub fn plan(cfg: &ModelConfig) -> Vec<LayerInfo> {
    let spec = DielemanSpec::for_arch(cfg.arch);
    let c0 = cfg.in_channels;
    let mut out = vec![
        LayerInfo::new(
            "views",
            "4 views: crop, mirror, 45°, 45° mirror (bilinear)",
            vec![N_VIEWS, c0, DIELEMAN_VIEW, DIELEMAN_VIEW],
            0,
        ),
        LayerInfo::new(
            "parts",
            "4 corner parts per view, rotated centre-to-corner",
            vec![N_PARTS, c0, DIELEMAN_PART, DIELEMAN_PART],
            0,
        ),
    ];
    let mut c = c0;
    let mut s = DIELEMAN_PART;
    let mut pools = 0;
    for (i, ((k, pool), oc)) in TOWER.into_iter().zip(spec.conv).enumerate() {
        s = s + 1 - k;
        out.push(LayerInfo::new(
            format!("conv{}", i + 1),
            &format!("conv {k}×{k} valid + ReLU (shared)"),
            vec![N_PARTS, oc, s, s],
            c * oc * k * k + oc,
        ));
        c = oc;
        if pool {
            s /= 2;
            pools += 1;
            out.push(LayerInfo::new(
                format!("pool{pools}"),
                "max-pool 2×2",
                vec![N_PARTS, c, s, s],
                0,
            ));
        }
    }
    let mut n = N_PARTS * c * s * s;
    out.push(LayerInfo::new("concat", "concatenate the 16 part features", vec![n], 0));
    for j in 0..2 {
        let u = spec.maxout;
        let kind = format!("dropout {} + dense {} + maxout (pairs)", cfg.dropout, 2 * u);
        out.push(LayerInfo::new(
            format!("dense{}", j + 1),
            &kind,
            vec![u],
            n * 2 * u + 2 * u,
        ));
        n = u;
    }
    out.push(LayerInfo::new(
        "out",
        &format!("dropout {} + dense", cfg.dropout),
        vec![N_ANSWERS],
        n * N_ANSWERS + N_ANSWERS,
    ));
    out
}

/// The four view transforms for a given `view_fraction` (see the module doc), in the order
/// regular, mirrored, 45°, 45° mirrored.
pub fn view_affines(view_fraction: f32) -> [Affine; N_VIEWS] {
    let zoom = 1.0 / view_fraction;
    [
        Affine::rotation_flip_scale_shift(0.0, false, zoom, 0.0, 0.0),
        Affine::rotation_flip_scale_shift(0.0, true, zoom, 0.0, 0.0),
        Affine::rotation_flip_scale_shift(45.0, false, zoom, 0.0, 0.0),
        // the mirror image of the 45° view (rotate, then mirror)
        Affine::rotation(45.0)
            .then(&Affine::flip_horizontal())
            .then(&Affine::scale(zoom)),
    ]
}

/// (B, C, H, W) images → (4·B, C, 69, 69) views, view-major (index `v·B + b`), same dtype.
pub fn views(x: &Tensor, view_fraction: f32) -> Result<Tensor> {
    let b = x.dim(0)?;
    let rep = Tensor::cat(&[x, x, x, x], 0)?;
    let mats: Vec<Affine> = view_affines(view_fraction)
        .iter()
        .flat_map(|m| std::iter::repeat_n(*m, b))
        .collect();
    affine_sample(&rep, &mats, DIELEMAN_VIEW, DIELEMAN_VIEW)
}

/// (N, C, 69, 69) views → (4·N, C, 45, 45) parts, part-major (index `k·N + n`). With `V` the
/// view and `L = 68`: part 0 `[r][c] = V[r][c]` (top-left corner as is), part 1 `= V[c][L-r]`
/// (top-right corner, a quarter turn), part 2 `= V[L-r][L-c]` (bottom-right, half turn),
/// part 3 `= V[L-c][r]` (bottom-left, three quarter turns). The view centre lands at
/// (34, 34), near the bottom-right corner, in every part.
pub fn parts(views: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = views.dims4()?;
    let p = DIELEMAN_PART;
    if h != DIELEMAN_VIEW || w != DIELEMAN_VIEW {
        candle_core::bail!("parts: expected {DIELEMAN_VIEW}×{DIELEMAN_VIEW} views, got {h}×{w}");
    }
    let far = DIELEMAN_VIEW - p;
    let top = views.narrow(2, 0, p)?;
    let bottom = views.narrow(2, far, p)?;
    let p0 = top.narrow(3, 0, p)?;
    // candle's flip (index_select) needs contiguous input
    let p1 = top.narrow(3, far, p)?.contiguous()?.flip(&[3])?.transpose(2, 3)?;
    let p2 = bottom.narrow(3, far, p)?.contiguous()?.flip(&[2, 3])?;
    let p3 = bottom.narrow(3, 0, p)?.contiguous()?.flip(&[2])?.transpose(2, 3)?;
    Tensor::cat(&[&p0, &p1, &p2, &p3], 0)?.contiguous()
}

/// The Dieleman body producing 37 raw outputs.
#[derive(Debug, Clone)]
pub struct DielemanNet {
    convs: Vec<(Conv2d, bool)>,
    dense1: Linear,
    dense2: Linear,
    out: Linear,
    maxout: usize,
    in_channels: usize,
    view_fraction: f32,
}

impl DielemanNet {
    /// Builds the net; names as in the module doc.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let spec = DielemanSpec::for_arch(cfg.arch);
        let mut convs = Vec::new();
        let mut c = cfg.in_channels;
        for (i, ((k, pool), oc)) in TOWER.into_iter().zip(spec.conv).enumerate() {
            convs.push((Conv2d::new(c, oc, k, 0, 1, vb.pp(format!("conv{}", i + 1)))?, pool));
            c = oc;
        }
        let s = tower_side();
        let feat = N_PARTS * c * s * s;
        let u = spec.maxout;
        let dense1 = candle_nn::linear(feat, 2 * u, vb.pp("dense1"))?;
        let dense2 = candle_nn::linear(u, 2 * u, vb.pp("dense2"))?;
        let out = candle_nn::linear(u, N_ANSWERS, vb.pp("out"))?;
        Ok(DielemanNet {
            convs,
            dense1,
            dense2,
            out,
            maxout: u,
            in_channels: cfg.in_channels,
            view_fraction: cfg.view_fraction,
        })
    }

    fn maxout(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        x.reshape((b, self.maxout, 2))?.max(2)
    }

    /// (B, C, H, W) → (B, 37) raw outputs.
    pub(crate) fn forward_raw(&self, x: &Tensor, drop: &Dropper) -> Result<Tensor> {
        let (b, c, _, _) = x.dims4()?;
        if c != self.in_channels {
            candle_core::bail!("this net was built for {} input channels, got {c}", self.in_channels);
        }
        // (16B, C, 45, 45): one resampling kernel on the CUDA fast path, else views then parts
        let h = match dieleman_parts_kernel(x, view_affines(self.view_fraction))? {
            Some(p) => p,
            None => parts(&views(x, self.view_fraction)?)?,
        };
        let layers: Vec<(&Conv2d, bool)> = self.convs.iter().map(|(c, pool)| (c, *pool)).collect();
        // (16B, F) part-major → (B, 16·F) with the parts of one galaxy side by side
        let f = run_tower(&h, &layers)?.flatten_from(1)?;
        let fdim = f.dim(1)?;
        let f = f
            .reshape((N_PARTS, b, fdim))?
            .transpose(0, 1)?
            .reshape((b, N_PARTS * fdim))?;
        let h = self.maxout(&crate::ops::linear(&self.dense1, &drop.apply(&f)?)?)?;
        let h = self.maxout(&crate::ops::linear(&self.dense2, &drop.apply(&h)?)?)?;
        crate::ops::linear(&self.out, &drop.apply(&h)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Host reference: rotate a view's part the way the doc says.
    fn part_ref(v: &[f32], k: usize, r: usize, c: usize) -> f32 {
        let l = DIELEMAN_VIEW - 1;
        let (vr, vc) = match k {
            0 => (r, c),
            1 => (c, l - r),
            2 => (l - r, l - c),
            _ => (l - c, r),
        };
        v[vr * DIELEMAN_VIEW + vc]
    }

    #[test]
    fn parts_are_rotated_corners_with_the_centre_in_one_corner() {
        let n = DIELEMAN_VIEW * DIELEMAN_VIEW;
        // an asymmetric pattern: every pixel distinct; plus a marker at the view centre
        let mut v: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
        v[34 * DIELEMAN_VIEW + 34] = 5.0;
        let t = Tensor::from_vec(v.clone(), (1, 1, DIELEMAN_VIEW, DIELEMAN_VIEW), &Device::Cpu).unwrap();
        let p = parts(&t).unwrap();
        assert_eq!(p.dims(), &[4, 1, DIELEMAN_PART, DIELEMAN_PART]);
        let p = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let pp = DIELEMAN_PART * DIELEMAN_PART;
        for k in 0..4 {
            for r in 0..DIELEMAN_PART {
                for c in 0..DIELEMAN_PART {
                    assert_eq!(
                        p[k * pp + r * DIELEMAN_PART + c],
                        part_ref(&v, k, r, c),
                        "part {k} ({r},{c})"
                    );
                }
            }
            assert_eq!(p[k * pp + 34 * DIELEMAN_PART + 34], 5.0, "centre of part {k}");
        }
        // the view's top-left pixel is only in part 0, at its top-left
        assert_eq!(p[0], v[0]);
        // the view's top-right corner pixel becomes the top-left of part 1 (quarter turn)
        assert_eq!(p[pp], v[DIELEMAN_VIEW - 1]);
        // bottom-right → part 2's top-left; bottom-left → part 3's top-left
        assert_eq!(p[2 * pp], v[n - 1]);
        assert_eq!(p[3 * pp], v[(DIELEMAN_VIEW - 1) * DIELEMAN_VIEW]);
    }

    #[test]
    fn views_on_an_asymmetric_image() {
        // a 69×69 input with view_fraction 1 makes the regular view the identity
        let s = DIELEMAN_VIEW;
        let mut img = vec![0f32; 3 * s * s];
        // an "L": a bar right of the centre in channel 0, a dot below the centre in channel 1
        for c in 40..60 {
            img[34 * s + c] = 1.0;
        }
        img[s * s + 50 * s + 34] = 1.0;
        let x = Tensor::from_vec(img.clone(), (1, 3, s, s), &Device::Cpu).unwrap();
        let v = views(&x, 1.0).unwrap();
        assert_eq!(v.dims(), &[4, 3, s, s]);
        let get = |view: usize| v.narrow(0, view, 1).unwrap();
        let diff = crate::testutil::max_abs_diff;
        assert!(diff(&get(0), &x) < 1e-5, "regular view is the image");
        assert!(diff(&get(1), &x.flip(&[3]).unwrap()) < 1e-5, "view 1 is the mirror");
        assert!(
            diff(&get(3), &get(2).flip(&[3]).unwrap()) < 1e-5,
            "view 3 mirrors view 2"
        );
        // 45° counter-clockwise: the bar pointing right now points up-right
        let v2 = get(2).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let at = |ch: usize, r: usize, c: usize| v2[ch * s * s + r * s + c];
        let d = (10.0f32 / std::f32::consts::SQRT_2).round() as usize; // 10 px along the diagonal
        assert!(at(0, 34 - d, 34 + d) > 0.5, "bar end up-right");
        assert!(at(0, 34 + d, 34 + d) < 0.05 && at(0, 34, 44) < 0.3, "not where it was");
        // the dot 16 px below the centre moves down-right
        let e = (16.0f32 / std::f32::consts::SQRT_2).round() as usize;
        let near: f32 = (0..3)
            .flat_map(|dr| (0..3).map(move |dc| (dr, dc)))
            .map(|(dr, dc)| at(1, 34 + e - 1 + dr, 34 + e - 1 + dc))
            .sum();
        assert!(near > 0.5, "dot mass down-right: {near}");
        // view_fraction 2 covers twice the image side: the bar (6–25 px right) shrinks to 3–12 px
        let z = views(&x, 2.0)
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(z[34 * s + 34 + 5] > 0.9 && z[34 * s + 34 + 16] < 0.05);
    }

    #[test]
    fn tower_geometry_matches_the_paper() {
        assert_eq!(tower_side(), 2);
        let cfg = ModelConfig::new(Arch::Dieleman, crate::config::OutputKind::Tree);
        let plan = plan(&cfg);
        let concat = plan.iter().find(|l| l.name == "concat").unwrap();
        assert_eq!(concat.out_shape, vec![8192]);
    }
}
