//! Test-time augmentation and ensembles: averaging a model's predictions over fixed views.
//!
//! Dieleman et al. (2015, section 7.5) averaged each test galaxy's predictions over 60 affine
//! views: 10 rotations (36° apart) × 3 zooms (1/1.2, 1, 1.2) × 2 (with and without a mirror
//! flip). [`TtaConfig`] describes such a grid; its presets are `1` (no augmentation), `2`
//! (a mirror flip), `4` (right-angle rotations), `8` (4 right-angle rotations × 2 flips, exact on
//! the pixel grid) and `60` (Dieleman's). Views are
//! drawn with gz-model's [`gz_model::augment::affine_sample`] on the batch's own device, the
//! model runs once per view, and the outputs are averaged (uniformly). An [`Ensemble`] averages
//! several models the same way. The identity view is passed through without resampling.
//! [`predict_tta_spread`] also returns how far the views' and members' predictions stray from
//! that average (their variance per answer): how much the prediction of a galaxy depends on its
//! orientation and on the checkpoint, a disagreement measure, not a calibrated uncertainty.

use candle_core::{Result as CResult, Tensor};
use gz_model::augment::{affine_sample, Affine};
use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

/// Anything that maps a (B, 3, H, W) batch in [0, 1] to (B, 37) predictions.
pub trait Predictor {
    /// Predicts one batch.
    fn predict(&self, images: &Tensor) -> CResult<Tensor>;

    /// The predictions [`Self::predict`] averages, each (B, 37) in f32: one per member of an
    /// [`Ensemble`], the prediction itself otherwise. Their [`mean_of`] is `predict`'s output
    /// to the bit.
    fn predict_members(&self, images: &Tensor) -> CResult<Vec<Tensor>> {
        Ok(vec![self.predict(images)?.to_dtype(candle_core::DType::F32)?])
    }

    /// How many predictions [`Self::predict_members`] returns.
    fn n_members(&self) -> usize {
        1
    }
}

/// The uniform average of (B, 37) predictions, summed in order (as [`Ensemble::predict`]).
pub fn mean_of(outputs: &[Tensor]) -> CResult<Tensor> {
    let mut sum: Option<Tensor> = None;
    for y in outputs {
        sum = Some(match sum {
            None => y.clone(),
            Some(s) => (s + y)?,
        });
    }
    let sum = sum.ok_or_else(|| candle_core::Error::Msg("an ensemble needs at least one model".into()))?;
    sum.affine(1.0 / outputs.len() as f64, 0.0)
}

impl<F: Fn(&Tensor) -> CResult<Tensor>> Predictor for F {
    fn predict(&self, images: &Tensor) -> CResult<Tensor> {
        self(images)
    }
}

/// A grid of test-time views: every rotation × flip × zoom combination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TtaConfig {
    /// Number of rotations, evenly spaced over 360° starting at 0.
    pub rotations: usize,
    /// Whether every view is also taken mirrored.
    pub flips: bool,
    /// Zoom factors (1 = as is).
    pub scales: Vec<f32>,
}

impl Default for TtaConfig {
    fn default() -> Self {
        Self::none()
    }
}

impl TtaConfig {
    /// One view: the image as it is.
    pub fn none() -> Self {
        Self {
            rotations: 1,
            flips: false,
            scales: vec![1.0],
        }
    }

    /// The presets `1`, `2` (a flip), `4` (right-angle rotations), `8` (4 rotations × 2 flips) and `60` (10 rotations × 2 flips × zooms
    /// 1/1.2, 1, 1.2, as Dieleman et al.); other numbers are an error naming the choices.
    pub fn preset(n: usize) -> Result<Self> {
        match n {
            1 => Ok(Self::none()),
            2 => Ok(Self {
                rotations: 1,
                flips: true,
                scales: vec![1.0],
            }),
            4 => Ok(Self {
                rotations: 4,
                flips: false,
                scales: vec![1.0],
            }),
            8 => Ok(Self {
                rotations: 4,
                flips: true,
                scales: vec![1.0],
            }),
            60 => Ok(Self {
                rotations: 10,
                flips: true,
                scales: vec![1.0 / 1.2, 1.0, 1.2],
            }),
            _ => Err(EvalError::Setting {
                what: "--tta".into(),
                reason: format!(
                    "no preset with {n} views; use 1, 2, 4, 8 or 60, or set rotations/flips/scales explicitly"
                ),
            }),
        }
    }

    /// The most views one image may get (each is a forward pass of the whole set: Dieleman's
    /// grid is 60; 1,024 views already multiply prediction time by 1,024).
    pub const MAX_VIEWS: usize = 1024;

    /// Rejects an empty grid, a zoom outside [0.1, 10] and more than [`Self::MAX_VIEWS`] views.
    pub fn validate(&self) -> Result<()> {
        let views = self
            .rotations
            .saturating_mul(self.scales.len())
            .saturating_mul(if self.flips { 2 } else { 1 });
        if views > Self::MAX_VIEWS {
            return Err(EvalError::Setting {
                what: "test-time augmentation".into(),
                reason: format!(
                    "{} × {}{} is {views} views per image; at most {} (each view is one more pass over every \
                     image)",
                    gz_schema::count(self.rotations, "rotation"),
                    gz_schema::count(self.scales.len(), "scale"),
                    if self.flips { " × 2 flips" } else { "" },
                    Self::MAX_VIEWS
                ),
            });
        }
        if self.rotations == 0 || self.scales.is_empty() || self.scales.iter().any(|s| !(0.1..=10.0).contains(s)) {
            return Err(EvalError::Setting {
                what: "test-time augmentation".into(),
                reason: format!(
                    "{}, scales {:?}: need at least 1 rotation and at least 1 scale, each a zoom from 0.1 to 10",
                    gz_schema::count(self.rotations, "rotation"),
                    self.scales
                ),
            });
        }
        // (a repeated scale's views are the same views again: they count twice in the average
        // and in the spread, for nothing)
        if let Some(s) = self
            .scales
            .iter()
            .enumerate()
            .find_map(|(i, s)| self.scales[..i].contains(s).then_some(s))
        {
            return Err(EvalError::Setting {
                what: "test-time augmentation".into(),
                reason: format!(
                    "scale {s} appears more than once in {:?}: its views would be the same views again, counted \
                     twice in the average",
                    self.scales
                ),
            });
        }
        Ok(())
    }

    /// Number of views per image.
    pub fn n_views(&self) -> usize {
        self.rotations * self.scales.len() * if self.flips { 2 } else { 1 }
    }

    /// The views as content transforms (mirror, rotate, zoom), identity first.
    pub fn views(&self) -> Vec<Affine> {
        let mut out = Vec::with_capacity(self.n_views());
        for flip in if self.flips { &[false, true][..] } else { &[false][..] } {
            for &zoom in &self.scales {
                for r in 0..self.rotations {
                    let deg = 360.0 * r as f32 / self.rotations as f32;
                    out.push(Affine::rotation_flip_scale_shift(deg, *flip, zoom, 0.0, 0.0));
                }
            }
        }
        // the identity (if present) first, so a 1-view grid is exactly the plain prediction
        if let Some(i) = out.iter().position(is_identity) {
            out.swap(0, i);
        }
        out
    }
}

fn is_identity(a: &Affine) -> bool {
    let id = Affine::identity();
    a.m.iter()
        .flatten()
        .zip(id.m.iter().flatten())
        .all(|(x, y)| (x - y).abs() < 1e-6)
}

/// The batch as `view` shows it (the identity view passes it through untouched).
fn view_of(images: &Tensor, view: &Affine) -> CResult<Tensor> {
    let (b, _c, h, w) = images.dims4()?;
    if is_identity(view) {
        Ok(images.clone())
    } else {
        affine_sample(images, &vec![*view; b], h, w)
    }
}

/// Predicts a (B, 3, H, W) batch under every view of `tta` and averages the (B, 37) outputs.
pub fn predict_tta(model: &dyn Predictor, images: &Tensor, tta: &TtaConfig) -> CResult<Tensor> {
    Ok(predict_tta_views(model, images, tta)?.0)
}

/// [`predict_tta`]'s average and every prediction it averages: each view's
/// [`Predictor::predict_members`], views in order (all (B, 37) f32). A view's prediction is
/// their [`mean_of`], which is [`Predictor::predict`]'s to the bit.
pub fn predict_tta_views(model: &dyn Predictor, images: &Tensor, tta: &TtaConfig) -> CResult<(Tensor, Vec<Tensor>)> {
    let views = tta.views();
    let mut sum: Option<Tensor> = None;
    let mut all = Vec::with_capacity(views.len() * model.n_members());
    for view in &views {
        let ys = model.predict_members(&view_of(images, view)?)?;
        // the view's prediction as `predict` gives it, then summed over views as predict_tta
        let y = mean_of(&ys)?;
        sum = Some(match sum {
            None => y,
            Some(s) => (s + y)?,
        });
        all.extend(ys);
    }
    let sum = sum.ok_or_else(|| candle_core::Error::Msg("test-time augmentation with no views".into()))?;
    Ok((sum.affine(1.0 / views.len() as f64, 0.0)?, all))
}

/// [`predict_tta`]'s average (the same bits) and, per galaxy and answer, the variance of the
/// views' × members' predictions around it (population variance over all `views × members`
/// of them, both (B, 37) f32). One view of one model has variance 0.
pub fn predict_tta_spread(model: &dyn Predictor, images: &Tensor, tta: &TtaConfig) -> CResult<(Tensor, Tensor)> {
    let (mean, all) = predict_tta_views(model, images, tta)?;
    // two passes (the outputs are kept): no cancellation for small spreads
    let mut sq: Option<Tensor> = None;
    for y in &all {
        let d = (y - &mean)?.sqr()?;
        sq = Some(match sq {
            None => d,
            Some(s) => (s + d)?,
        });
    }
    let var = sq
        .ok_or_else(|| candle_core::Error::Msg("test-time augmentation with no views".into()))?
        .affine(1.0 / all.len() as f64, 0.0)?;
    Ok((mean, var))
}

/// Several models averaged uniformly (each under the same TTA when used with [`predict_tta`]).
pub struct Ensemble<'a> {
    pub members: Vec<&'a dyn Predictor>,
}

impl Predictor for Ensemble<'_> {
    fn predict(&self, images: &Tensor) -> CResult<Tensor> {
        mean_of(&self.predict_members(images)?)
    }

    fn predict_members(&self, images: &Tensor) -> CResult<Vec<Tensor>> {
        self.members
            .iter()
            .map(|m| m.predict(images)?.to_dtype(candle_core::DType::F32))
            .collect()
    }

    fn n_members(&self) -> usize {
        self.members.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    /// 1×3×8×8 image with a different constant in each quadrant (same in all channels).
    fn quadrants(vals: [f32; 4]) -> Tensor {
        let mut v = Vec::new();
        for _ in 0..3 {
            for y in 0..8 {
                for x in 0..8 {
                    v.push(vals[(y / 4) * 2 + x / 4]);
                }
            }
        }
        Tensor::from_vec(v, (1, 3, 8, 8), &Device::Cpu).unwrap()
    }

    /// A "model" that reports the mean of the top-left quadrant in every output.
    fn top_left(x: &Tensor) -> CResult<Tensor> {
        let (b, ..) = x.dims4()?;
        let m = x
            .i((.., 0, 0..4, 0..4))?
            .mean_keepdim(2)?
            .mean_keepdim(1)?
            .reshape((b, 1))?;
        m.broadcast_as((b, 37))?.contiguous()
    }

    fn value(t: &Tensor) -> f32 {
        t.i((0, 0)).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The 8 right-angle views are exact permutations of the pixels (no interpolation blur):
    /// each view of a random image equals one of the 8 exact rotations/transposes, and all 8
    /// are reached.
    #[test]
    fn right_angle_views_move_pixels_exactly() {
        let (h, w) = (32, 32);
        let img = Tensor::rand(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap();
        let exact = |t: &Tensor, k: usize| -> Tensor {
            // k & 3 quarter turns, then a mirror when k >= 4, on the pixel grid itself
            let mut t = t.clone();
            for _ in 0..(k & 3) {
                t = t.transpose(2, 3).unwrap().contiguous().unwrap().flip(&[3]).unwrap();
            }
            if k >= 4 {
                t = t.flip(&[3]).unwrap();
            }
            t.contiguous().unwrap()
        };
        let mut reached = [false; 8];
        for view in TtaConfig::preset(8).unwrap().views() {
            let got = affine_sample(&img, &[view; 2], h, w).unwrap();
            let best = (0..8)
                .map(|k| {
                    let d = (&got - exact(&img, k)).unwrap().abs().unwrap();
                    (d.max_all().unwrap().to_scalar::<f32>().unwrap(), k)
                })
                .fold((f32::INFINITY, 0), |a, b| if b.0 < a.0 { b } else { a });
            assert!(
                best.0 < 1e-4,
                "view {:?}: off by {} from every exact transform",
                view.m,
                best.0
            );
            reached[best.1] = true;
        }
        assert!(reached.iter().all(|&r| r), "{reached:?}");
    }

    #[test]
    fn rotations_average_a_known_transform() {
        let img = quadrants([0.1, 0.2, 0.3, 0.4]);
        // no TTA: the top-left quadrant
        let y = predict_tta(&top_left, &img, &TtaConfig::none()).unwrap();
        assert_eq!(y.dims(), &[1, 37]);
        assert!((value(&y) - 0.1).abs() < 1e-6);
        // four right-angle rotations bring each quadrant to the top left once: the mean
        let y = predict_tta(&top_left, &img, &TtaConfig::preset(4).unwrap()).unwrap();
        assert!((value(&y) - 0.25).abs() < 1e-4, "{}", value(&y));
        // a mirror alone averages top-left and top-right
        let y = predict_tta(&top_left, &img, &TtaConfig::preset(2).unwrap()).unwrap();
        assert!((value(&y) - 0.15).abs() < 1e-4, "{}", value(&y));
        // 8 views: each quadrant twice
        let y = predict_tta(&top_left, &img, &TtaConfig::preset(8).unwrap()).unwrap();
        assert!((value(&y) - 0.25).abs() < 1e-4, "{}", value(&y));
        // a model that is invariant to the views is unchanged
        let mean_all = |x: &Tensor| -> CResult<Tensor> {
            let (b, ..) = x.dims4()?;
            x.flatten_from(1)?.mean_keepdim(1)?.broadcast_as((b, 37))?.contiguous()
        };
        let y = predict_tta(&mean_all, &img, &TtaConfig::preset(8).unwrap()).unwrap();
        assert!((value(&y) - 0.25).abs() < 1e-4);
    }

    #[test]
    fn view_grids() {
        assert_eq!(TtaConfig::preset(60).unwrap().views().len(), 60);
        assert_eq!(TtaConfig::preset(8).unwrap().n_views(), 8);
        assert!(is_identity(&TtaConfig::preset(60).unwrap().views()[0]));
        assert!(TtaConfig::preset(7)
            .unwrap_err()
            .to_string()
            .contains("1, 2, 4, 8 or 60"));
        assert!(TtaConfig {
            rotations: 0,
            flips: false,
            scales: vec![1.0]
        }
        .validate()
        .is_err());
        // at most 1,024 views (a typo of a rotation count would run for days), zooms 0.1 to 10
        let grid = |rotations, flips, scales: Vec<f32>| TtaConfig {
            rotations,
            flips,
            scales,
        };
        assert!(grid(512, true, vec![1.0]).validate().is_ok());
        let e = grid(513, true, vec![1.0]).validate().unwrap_err().to_string();
        assert!(e.contains("1026 views") && e.contains("at most 1024"), "{e}");
        assert!(grid(usize::MAX, true, vec![1.0, 2.0]).validate().is_err());
        assert!(grid(4, false, vec![0.1, 10.0]).validate().is_ok());
        // a repeated scale (the same views again, counted twice) is refused by name
        let e = grid(1, false, vec![1.0, 1.2, 1.0]).validate().unwrap_err().to_string();
        assert!(e.contains("scale 1 appears more than once"), "{e}");
        for bad in [0.0, 0.09, 10.5, f32::NAN, f32::INFINITY, -1.0] {
            assert!(grid(4, false, vec![bad]).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn spread_is_the_variance_of_the_views_and_members() {
        let img = quadrants([0.1, 0.2, 0.3, 0.4]);
        let all = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // one view of one model: nothing to spread, the plain prediction
        let (m, v) = predict_tta_spread(&top_left, &img, &TtaConfig::none()).unwrap();
        assert_eq!(all(&m), all(&top_left(&img).unwrap()));
        assert!(all(&v).iter().all(|&x| x == 0.0));
        // four rotations show each quadrant once: 0.1 … 0.4, variance
        // (0.15² + 0.05² + 0.05² + 0.15²) / 4 = 0.0125
        let (m, v) = predict_tta_spread(&top_left, &img, &TtaConfig::preset(4).unwrap()).unwrap();
        assert!((value(&m) - 0.25).abs() < 1e-4);
        assert!((value(&v) - 0.0125).abs() < 1e-5, "{}", value(&v));
        // two members always 1 and 0: variance 0.25 with one view, and with four
        let a = |x: &Tensor| -> CResult<Tensor> { (top_left(x)? * 0.0)? + 1.0 };
        let b = |x: &Tensor| -> CResult<Tensor> { top_left(x)? * 0.0 };
        let e = Ensemble {
            members: vec![&a as &dyn Predictor, &b as &dyn Predictor],
        };
        for n in [1, 4] {
            let (m, v) = predict_tta_spread(&e, &img, &TtaConfig::preset(n).unwrap()).unwrap();
            assert!(
                (value(&m) - 0.5).abs() < 1e-6 && (value(&v) - 0.25).abs() < 1e-6,
                "{n} views"
            );
        }
        // members and views together: top_left and its double, 4 views: values v and 2v for v in
        // 0.1 … 0.4 around 0.375; Σ (x − 0.375)² / 8 over 0.1 0.2 0.3 0.4 0.2 0.4 0.6 0.8
        let double = |x: &Tensor| -> CResult<Tensor> { top_left(x)? * 2.0 };
        let e = Ensemble {
            members: vec![&top_left as &dyn Predictor, &double as &dyn Predictor],
        };
        let xs = [0.1f64, 0.2, 0.3, 0.4, 0.2, 0.4, 0.6, 0.8];
        let want = xs.iter().map(|x| (x - 0.375).powi(2)).sum::<f64>() / 8.0;
        let (m, v) = predict_tta_spread(&e, &img, &TtaConfig::preset(4).unwrap()).unwrap();
        assert!((value(&m) - 0.375).abs() < 1e-5, "{}", value(&m));
        assert!((value(&v) as f64 - want).abs() < 1e-5, "{} vs {want}", value(&v));
    }

    /// The average is the one gz computed before the spread existed, to the bit: each view's
    /// `predict` (an ensemble's members summed in order, divided by their number) summed in
    /// view order and divided by the number of views; with the spread asked for or not.
    #[test]
    fn the_spread_leaves_the_average_alone() {
        let img = Tensor::rand(0f32, 1.0, (3, 3, 8, 8), &candle_core::Device::Cpu).unwrap();
        let w = Tensor::rand(-1f32, 1.0, (3 * 64, 37), &candle_core::Device::Cpu).unwrap();
        let sigmoid = |z: Tensor| (z.neg()?.exp()? + 1.0)?.recip();
        let lin = |x: &Tensor| -> CResult<Tensor> { sigmoid(x.flatten_from(1)?.matmul(&w)?) };
        let lin2 = |x: &Tensor| -> CResult<Tensor> { sigmoid((x.flatten_from(1)?.matmul(&w)? * 0.5)?) };
        let e = Ensemble {
            members: vec![&lin as &dyn Predictor, &lin2 as &dyn Predictor, &lin as &dyn Predictor],
        };
        let bits = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        for (model, n) in [
            (&e as &dyn Predictor, 8),
            (&e as &dyn Predictor, 60),
            (&lin as &dyn Predictor, 8),
        ] {
            let tta = TtaConfig::preset(n).unwrap();
            // the reference: the loop of predict_tta as it was
            let mut sum: Option<Tensor> = None;
            for view in tta.views() {
                let x = view_of(&img, &view).unwrap();
                let y = model.predict(&x).unwrap().to_dtype(candle_core::DType::F32).unwrap();
                sum = Some(match sum {
                    None => y,
                    Some(s) => (s + y).unwrap(),
                });
            }
            let before = sum.unwrap().affine(1.0 / tta.n_views() as f64, 0.0).unwrap();
            let plain = predict_tta(model, &img, &tta).unwrap();
            let (m, _) = predict_tta_spread(model, &img, &tta).unwrap();
            assert_eq!(bits(&plain), bits(&before), "{n} views");
            assert_eq!(bits(&m), bits(&plain), "{n} views");
        }
    }

    #[test]
    fn ensemble_is_the_uniform_average() {
        let img = quadrants([0.1, 0.2, 0.3, 0.4]);
        let a = |x: &Tensor| -> CResult<Tensor> { (top_left(x)? * 0.0)? + 1.0 };
        let b = |x: &Tensor| -> CResult<Tensor> { top_left(x)? * 0.0 };
        let e = Ensemble {
            members: vec![&a as &dyn Predictor, &b as &dyn Predictor],
        };
        let y = predict_tta(&e, &img, &TtaConfig::none()).unwrap();
        assert!((value(&y) - 0.5).abs() < 1e-6);
    }
}
