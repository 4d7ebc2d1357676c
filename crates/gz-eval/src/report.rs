//! The report a person looks at: `reports/<run>/` with `metrics.json`, two or three charts and a page.
//!
//! - `learning_curve.png`: training RMSE (√ of the epoch's mean loss) and validation RMSE by
//!   epoch on one axis, read from the trainer's `RUN_DIR/metrics.jsonl`, with the baselines'
//!   RMSE as reference lines and the scored checkpoint's epoch marked (said when it is not the
//!   best).
//! - `per_question.png`: RMSE per question (Q1 … Q11) of the model beside the baselines.
//! - `spread.png` (several predictions per galaxy: TTA views, checkpoints): the RMSE of the
//!   galaxies in tenths by the spread of their predictions, with the overall RMSE and the floor.
//! - `gallery/<id>.png`: thumbnails of validation galaxies from the cached images.
//! - `index.html`: the score table, both charts, the per-question table and the gallery with
//!   predicted vs true answers for the first questions of the tree (Q1, Q2, Q6, Q7).
//!
//! Charts are drawn with `plotters` into an RGB buffer (no system fonts: the text is rendered
//! with ab_glyph from the DejaVu Sans file under `assets/`) and encoded with `image`. Every file
//! is published atomically. Neighbours: [`crate::eval`] produces the [`crate::eval::EvalReport`]
//! rendered here.

use std::path::{Path, PathBuf};
use std::sync::Once;

use gz_schema::{ANSWERS, N_ANSWERS, QUESTIONS};
use half::f16;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::baselines::{Floor, NamedScores};
use crate::eval::EvalReport;
use crate::metrics::SpreadScore;
use crate::{io_err, EvalError, Result};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in and known good; a failure would only lose the text.
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            tracing::warn!("could not register the embedded DejaVu Sans font");
        }
    });
}

fn plot_err(path: &Path) -> impl Fn(String) -> EvalError + '_ {
    move |reason| EvalError::BadFile {
        path: path.to_path_buf(),
        reason: format!("drawing the chart: {reason}"),
    }
}

/// One epoch of the trainer's `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EpochRow {
    pub epoch: f64,
    pub train_loss: Option<f64>,
    pub val_rmse: Option<f64>,
}

/// Reads `metrics.jsonl` (one JSON object per line with `epoch`, `train_loss`, `val_rmse`;
/// other keys ignored, blank lines skipped). A line that is not JSON is an error naming it.
pub fn read_epochs(path: &Path) -> Result<Vec<EpochRow>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| EvalError::BadFile {
            path: path.to_path_buf(),
            reason: format!("line {}: {e}", i + 1),
        })?;
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).filter(|x| x.is_finite());
        let Some(epoch) = num("epoch") else {
            return Err(EvalError::BadFile {
                path: path.to_path_buf(),
                reason: format!("line {}: no numeric \"epoch\"", i + 1),
            });
        };
        out.push(EpochRow {
            epoch,
            train_loss: num("train_loss"),
            val_rmse: num("val_rmse"),
        });
    }
    Ok(out)
}

fn save_rgb(path: &Path, buf: Vec<u8>, w: u32, h: u32) -> Result<()> {
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| EvalError::BadFile {
        path: path.to_path_buf(),
        reason: "image buffer has the wrong size".into(),
    })?;
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| EvalError::BadFile {
            path: path.to_path_buf(),
            reason: format!("PNG encoding: {e}"),
        })?;
    gz_schema::write_atomic(path, &bytes)?;
    Ok(())
}

const MODEL_COLOUR: RGBColor = RGBColor(31, 119, 180);
const BASELINE_COLOURS: [RGBColor; 4] = [
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
const LOSS_COLOUR: RGBColor = RGBColor(214, 39, 40);
/// The Bayes floor in the per-question chart (the baselines' colours are taken).
const FLOOR_COLOUR: RGBColor = RGBColor(40, 40, 40);

fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    // a flat series (one epoch, or a constant loss) still gets an axis whose 4-decimal labels
    // differ: at least ±10 % of its value (or 0.001)
    let span = (hi - lo).max(0.2 * hi.abs().max(lo.abs())).max(0.002);
    if hi - lo < span {
        let a = (0.5 * (lo + hi) - 0.5 * span).max(0.0);
        return (a, a + span);
    }
    ((lo - 0.05 * span).max(0.0), hi + 0.08 * span)
}

/// The epoch of the lowest validation RMSE (the first of equals): the best checkpoint's.
fn best_epoch(epochs: &[EpochRow]) -> Option<(f64, f64)> {
    epochs
        .iter()
        .filter_map(|r| r.val_rmse.filter(|v| v.is_finite()).map(|v| (r.epoch, v)))
        .fold(None, |best: Option<(f64, f64)>, (e, v)| match best {
            Some((_, b)) if b <= v => best,
            _ => Some((e, v)),
        })
}

/// The epoch the learning curve marks, and its legend: the checkpoint scored (`scored`, its
/// epoch), said to be the best when it is ([`best_epoch`]); the best epoch when the epoch scored
/// is not known (0 or `None`).
fn scored_mark(epochs: &[EpochRow], scored: Option<usize>) -> Option<(f64, String)> {
    let best = best_epoch(epochs);
    match scored.filter(|&e| e > 0) {
        Some(e) => {
            let at = epochs.iter().find(|r| r.epoch == e as f64).and_then(|r| r.val_rmse);
            let val = at.map_or(String::new(), |v| format!(" ({v:.4})"));
            Some(if best.is_some_and(|(b, _)| b == e as f64) {
                (e as f64, format!("checkpoint scored: the best, epoch {e}{val}"))
            } else {
                (e as f64, format!("checkpoint scored: epoch {e}{val}, not the best"))
            })
        }
        None => best.map(|(b, v)| (b, format!("best checkpoint: epoch {b:.0} ({v:.4})"))),
    }
}

/// The corner of a chart whose area the points (`x`, `y` in [0, 1] of the axes, 0 at the bottom
/// left) crowd least, for its legend.
fn emptiest_corner(points: &[(f64, f64)]) -> SeriesLabelPosition {
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    // (the legend box covers about 40 % of the width and 35 % of the height)
    let inside = |&(x, y): &(f64, f64), right: bool, upper: bool| {
        (if right { x >= 0.6 } else { x <= 0.4 }) && (if upper { y >= 0.65 } else { y <= 0.35 })
    };
    let mut best = (usize::MAX, SeriesLabelPosition::UpperRight);
    for (pos, right, upper) in corners {
        let n = points.iter().filter(|p| inside(p, right, upper)).count();
        if n < best.0 {
            best = (n, pos);
        }
    }
    best.1
}

/// Draws the learning curve into a PNG: by epoch, the training RMSE (the square root of the
/// epoch's mean training loss, an MSE over the 37 answers, in training mode) and the validation
/// hold-out's RMSE (eval mode, one view) on one RMSE axis, with `references` (the baselines, the
/// Bayes floor) as dashed lines and the epoch of the checkpoint scored (`scored`) marked.
/// One axis: with the loss on an axis of its own (as before), each curve stretched to its own
/// range and the two lay on top of each other by construction, reading as "no overfitting"
/// whatever the gap.
pub fn learning_curve_png(
    epochs: &[EpochRow],
    references: &[(String, f64)],
    scored: Option<usize>,
    path: &Path,
) -> Result<()> {
    register_font();
    let (w, h) = (1000u32, 560u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let e = plot_err(path);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        // half an epoch of room on either side: the end points' markers are not cut in half
        let (x0, x1) = match (epochs.first(), epochs.last()) {
            (Some(a), Some(b)) => (a.epoch - 0.5, b.epoch.max(a.epoch) + 0.5),
            _ => (0.0, 1.0),
        };
        let train: Vec<(f64, f64)> = epochs
            .iter()
            .filter_map(|r| {
                r.train_loss
                    .filter(|l| l.is_finite() && *l >= 0.0)
                    .map(|l| (r.epoch, l.sqrt()))
            })
            .collect();
        let val: Vec<(f64, f64)> = epochs
            .iter()
            .filter_map(|r| r.val_rmse.filter(|v| v.is_finite()).map(|v| (r.epoch, v)))
            .collect();
        let all = train
            .iter()
            .chain(&val)
            .map(|p| p.1)
            .chain(references.iter().map(|r| r.1));
        let (y0, y1) = padded(
            all.clone().fold(f64::INFINITY, f64::min),
            all.fold(f64::NEG_INFINITY, f64::max),
        );

        // (a narrow axis needs a fourth decimal for its labels to differ)
        let fine = y1 - y0 < 0.02;
        let mut chart = ChartBuilder::on(&root)
            .caption("Learning curve", (FAMILY, 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_labels(epochs.len().clamp(2, 12))
            .x_label_formatter(&|x: &f64| {
                if (x - x.round()).abs() < 1e-6 {
                    format!("{x:.0}")
                } else {
                    String::new()
                }
            })
            .y_desc("RMSE")
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 17))
            .light_line_style(RGBColor(246, 246, 246))
            .bold_line_style(RGBColor(225, 225, 225))
            .y_label_formatter(&|v: &f64| if fine { format!("{v:.4}") } else { format!("{v:.3}") })
            .draw()
            .map_err(|x| e(x.to_string()))?;
        let marked = scored_mark(epochs, scored);
        if let Some((me, label)) = &marked {
            let (me, grey) = (*me, RGBColor(150, 150, 150));
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(me, y0), (me, y1)],
                    3,
                    4,
                    grey.stroke_width(1),
                ))
                .map_err(|x| e(x.to_string()))?
                .label(label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x + 12, y - 7), (x + 12, y + 7)], grey.stroke_width(2)));
        }
        for (i, (name, v)) in references.iter().enumerate() {
            let c = BASELINE_COLOURS[i % BASELINE_COLOURS.len()];
            chart
                .draw_series(DashedLineSeries::new(vec![(x0, *v), (x1, *v)], 8, 5, c.stroke_width(2)))
                .map_err(|x| e(x.to_string()))?
                .label(format!("{name} ({v:.4})"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
        }
        if !train.is_empty() {
            chart
                .draw_series(LineSeries::new(train.clone(), LOSS_COLOUR.stroke_width(2)))
                .map_err(|x| e(x.to_string()))?
                .label("training (√ of the epoch's mean loss)")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], LOSS_COLOUR.stroke_width(3)));
            chart
                .draw_series(train.iter().map(|p| Circle::new(*p, 3, LOSS_COLOUR.filled())))
                .map_err(|x| e(x.to_string()))?;
        }
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val.clone(), MODEL_COLOUR.stroke_width(2)))
                .map_err(|x| e(x.to_string()))?
                .label("validation hold-out (1 view)")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], MODEL_COLOUR.stroke_width(3)));
            chart
                .draw_series(val.iter().map(|p| TriangleMarker::new(*p, 6, MODEL_COLOUR.filled())))
                .map_err(|x| e(x.to_string()))?;
        }
        // the legend where the curves and lines leave room
        let unit = |(x, y): (f64, f64)| ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0));
        let mut crowd: Vec<(f64, f64)> = Vec::new();
        for series in [&train, &val] {
            // the points and the segments between them (a steep one crosses a corner)
            crowd.extend(series.iter().map(|&p| unit(p)));
            for w in series.windows(2) {
                let (a, b) = (w[0], w[1]);
                crowd.extend((1..8).map(|k| {
                    let t = f64::from(k) / 8.0;
                    unit((a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t))
                }));
            }
        }
        for (_, v) in references {
            crowd.extend((0..=20).map(|k| unit((x0 + (x1 - x0) * f64::from(k) / 20.0, *v))));
        }
        if let Some((me, _)) = &marked {
            crowd.extend((0..=20).map(|k| unit((*me, y0 + (y1 - y0) * f64::from(k) / 20.0))));
        }
        chart
            .configure_series_labels()
            .position(emptiest_corner(&crowd))
            .label_font((FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        if epochs.is_empty() {
            root.draw(&Text::new("no epochs in metrics.jsonl", (400, 280), (FAMILY, 20)))
                .map_err(|x| e(x.to_string()))?;
        }
        root.present().map_err(|x| e(x.to_string()))?;
    }
    save_rgb(path, buf, w, h)
}

/// A spread axis label: 4 decimals, as [`padded`]'s narrowest axis (0.002 wide, ticks 0.0002
/// apart) needs for labels that differ (3 gave "0.021 0.021 0.022 0.022" for one galaxy).
fn spread_label(v: &f64) -> String {
    format!("{v:.4}")
}

/// Draws the RMSE of the galaxies in tenths by the spread of their predictions (least spread
/// left), with the model's overall RMSE and the Bayes floor (when known) as dashed lines:
/// whether the spread tells the error.
pub fn spread_png(score: &SpreadScore, overall: f64, floor: Option<f64>, path: &Path) -> Result<()> {
    register_font();
    let (w, h) = (1000u32, 520u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let e = plot_err(path);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        // a diverged model's NaNs are no points
        let points: Vec<(f64, f64)> = score
            .by_spread
            .iter()
            .map(|b| (b.spread, b.rmse))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let (x0, x1) = padded(
            points.iter().map(|p| p.0).fold(f64::INFINITY, f64::min),
            points.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max),
        );
        let lines: Vec<(String, f64, RGBColor)> = [
            ("all galaxies", Some(overall), FLOOR_COLOUR),
            ("Bayes floor", floor, BASELINE_COLOURS[2]),
        ]
        .into_iter()
        .filter_map(|(name, v, c)| v.filter(|v| v.is_finite()).map(|v| (name.to_string(), v, c)))
        .collect();
        let ys = points.iter().map(|p| p.1).chain(lines.iter().map(|l| l.1));
        let (y0, y1) = padded(
            ys.clone().fold(f64::INFINITY, f64::min).min(0.0),
            ys.fold(f64::NEG_INFINITY, f64::max),
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "RMSE by spread ({} of galaxies, least spread left)",
                    match score.by_spread.len() {
                        1 => "1 group".to_string(),
                        n => format!("{n} groups"),
                    }
                ),
                (FAMILY, 24),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("mean spread of the group (RMS standard deviation of the views' and checkpoints' predictions)")
            .y_desc("RMSE of the group")
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(RGBColor(246, 246, 246))
            .bold_line_style(RGBColor(225, 225, 225))
            .x_label_formatter(&spread_label)
            .y_label_formatter(&|v: &f64| format!("{v:.3}"))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        if !points.is_empty() {
            chart
                .draw_series(LineSeries::new(points.clone(), MODEL_COLOUR.stroke_width(2)))
                .map_err(|x| e(x.to_string()))?
                .label("RMSE of the group")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], MODEL_COLOUR.stroke_width(3)));
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 4, MODEL_COLOUR.filled())))
                .map_err(|x| e(x.to_string()))?;
        }
        for &(ref name, v, c) in &lines {
            chart
                .draw_series(DashedLineSeries::new(vec![(x0, v), (x1, v)], 8, 5, c.stroke_width(2)))
                .map_err(|x| e(x.to_string()))?
                .label(format!("{name} ({v:.4})"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
        }
        chart
            .configure_series_labels()
            .position({
                // the legend where the points and lines leave room (upper left covered the
                // first groups' points)
                let unit = |(x, y): (f64, f64)| ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0));
                let mut crowd: Vec<(f64, f64)> = points.iter().map(|&p| unit(p)).collect();
                for l in &lines {
                    crowd.extend((0..=20).map(|k| unit((x0 + (x1 - x0) * f64::from(k) / 20.0, l.1))));
                }
                emptiest_corner(&crowd)
            })
            .label_font((FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        if points.is_empty() {
            root.draw(&Text::new("no finite spread or RMSE to draw", (360, 260), (FAMILY, 20)))
                .map_err(|x| e(x.to_string()))?;
        }
        root.present().map_err(|x| e(x.to_string()))?;
    }
    save_rgb(path, buf, w, h)
}

/// Draws grouped bars: RMSE per question for each entry of `series` (the model first), and the
/// Bayes floor per question as a bar-wide line over each group when it is known.
pub fn per_question_png(series: &[&NamedScores], floor: Option<&Floor>, path: &Path) -> Result<()> {
    register_font();
    let (w, h) = (1100u32, 560u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let e = plot_err(path);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        let ymax = series
            .iter()
            .flat_map(|s| s.scores.per_question.iter().map(|q| q.rmse))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.12;
        let mut chart = ChartBuilder::on(&root)
            .caption("RMSE per question", (FAMILY, 26))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(-0.5f64..(QUESTIONS.len() as f64 - 0.5), 0.0..ymax)
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(QUESTIONS.len())
            .x_label_formatter(&|x: &f64| {
                let q = x.round();
                if (x - q).abs() < 1e-6 && q >= 0.0 && (q as usize) < QUESTIONS.len() {
                    format!("Q{}", q as usize + 1)
                } else {
                    String::new()
                }
            })
            .y_desc("RMSE")
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 17))
            .light_line_style(RGBColor(246, 246, 246))
            .bold_line_style(RGBColor(225, 225, 225))
            .y_label_formatter(&|v: &f64| format!("{v:.3}"))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        let k = series.len().max(1) as f64;
        let group = 0.8;
        for (si, s) in series.iter().enumerate() {
            let c = if si == 0 {
                MODEL_COLOUR
            } else {
                BASELINE_COLOURS[(si - 1) % BASELINE_COLOURS.len()]
            };
            let bars = s
                .scores
                .per_question
                .iter()
                .enumerate()
                .filter(|(_, q)| q.rmse.is_finite())
                .map(move |(qi, q)| {
                    let left = qi as f64 - group / 2.0 + group * si as f64 / k;
                    Rectangle::new([(left, 0.0), (left + group / k * 0.92, q.rmse)], c.filled())
                });
            chart
                .draw_series(bars)
                .map_err(|x| e(x.to_string()))?
                .label(format!("{} (overall {:.4})", s.name, s.scores.rmse))
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], c.filled()));
        }
        if let Some((f, per_q)) = floor.and_then(|f| Some((f, f.per_question.as_ref()?))) {
            let lines = per_q.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(qi, &v)| {
                let (a, b) = (qi as f64 - group / 2.0, qi as f64 + group / 2.0);
                PathElement::new(vec![(a, v), (b, v)], FLOOR_COLOUR.stroke_width(3))
            });
            chart
                .draw_series(lines)
                .map_err(|x| e(x.to_string()))?
                .label(format!("Bayes floor (overall {:.4})", f.rmse))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], FLOOR_COLOUR.stroke_width(3)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        root.present().map_err(|x| e(x.to_string()))?;
    }
    save_rgb(path, buf, w, h)
}

/// Writes a C×H×W image with values in [0, 1] as an RGB PNG (grey repeated if C = 1).
pub fn thumbnail_png(image: &[f16], shape: [usize; 3], path: &Path) -> Result<()> {
    let [c, h, w] = shape;
    if c == 0 || image.len() != c * h * w {
        return Err(EvalError::Shape {
            what: format!("thumbnail {}", path.display()),
            reason: format!("{} values for {c}×{h}×{w}", image.len()),
        });
    }
    let mut buf = Vec::with_capacity(3 * h * w);
    for p in 0..h * w {
        for ch in 0..3 {
            let v = image[ch.min(c - 1) * h * w + p].to_f32();
            buf.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    save_rgb(path, buf, w as u32, h as u32)
}

/// One galaxy of the gallery.
#[derive(Debug, Clone)]
pub struct GalleryItem {
    pub id: u64,
    /// Thumbnail path relative to the report folder.
    pub thumb: String,
    pub pred: Vec<f32>,
    pub truth: Vec<f32>,
}

/// The files of a written report.
#[derive(Debug, Clone)]
pub struct ReportPaths {
    pub dir: PathBuf,
    pub index: PathBuf,
    pub metrics: PathBuf,
    pub learning_curve: Option<PathBuf>,
    pub per_question: PathBuf,
    /// `spread.png`, with several predictions per galaxy.
    pub spread: Option<PathBuf>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Whether the report scores the test split (`gz eval --split test`) rather than the validation
/// hold-out.
fn is_test_split(report: &EvalReport) -> bool {
    report.split.starts_with("test")
}

/// Fewest rows for a score to tell models apart (as the trainer warns of a smaller hold-out).
const MIN_MEANINGFUL_ROWS: usize = 50;

/// Warnings for the page and `gz eval`'s terminal: a model no better than the training mean,
/// and too few rows scored (sentences; the caller puts "Warning: " or "warning: " in front).
pub fn page_warnings(r: &EvalReport) -> Vec<String> {
    let mut out = Vec::new();
    let model = r.model.scores.rmse;
    if let Some(mean) = r.baselines.iter().find(|b| b.name == "training mean") {
        if model.is_nan() || model >= mean.scores.rmse {
            out.push(format!(
                "the model's RMSE {model:.5} is no better than predicting the training mean ({:.5}): it has \
                 not learnt more than the mean; more epochs, a lower learning rate or more data may help.",
                mean.scores.rmse
            ));
        }
    }
    let rows = r.model.scores.rows;
    if rows < MIN_MEANINGFUL_ROWS {
        out.push(format!(
            "only {rows} galax{} scored: the RMSE and the comparisons rest on {} and mean little (at \
             least {MIN_MEANINGFUL_ROWS} are needed to tell models apart).",
            if rows == 1 { "y is" } else { "ies are" },
            if rows == 1 { "it" } else { "them" }
        ));
    }
    out
}

/// Questions whose answers the gallery shows.
const GALLERY_QUESTIONS: [usize; 4] = [0, 1, 5, 6];

/// Writes the whole report into `dir`: metrics.json, charts, thumbnails (already written by the
/// caller into `dir/gallery`, listed in `gallery`) and index.html. `curve_of` names the run whose
/// `epochs` the learning curve draws when the report scores more than that run (an ensemble:
/// the curve is one member's, and the page says whose).
pub fn write_report(
    dir: &Path,
    report: &EvalReport,
    epochs: Option<&[EpochRow]>,
    curve_of: Option<&str>,
    gallery: &[GalleryItem],
) -> Result<ReportPaths> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let metrics = dir.join("metrics.json");
    let json = serde_json::to_vec_pretty(report).map_err(|e| EvalError::BadFile {
        path: metrics.clone(),
        reason: e.to_string(),
    })?;
    gz_schema::write_atomic(&metrics, &json)?;

    let refs = curve_references(report);
    let curve_chart = dir.join("learning_curve.png");
    let learning_curve = match epochs {
        Some(ep) => {
            learning_curve_png(ep, &refs, Some(report.epoch), &curve_chart)?;
            Some(curve_chart)
        }
        None => {
            // an earlier report's curve (a run's, under a report of a predictions file) is not
            // this one's
            remove_stale(&curve_chart)?;
            None
        }
    };
    let per_question = dir.join("per_question.png");
    let mut series: Vec<&NamedScores> = vec![&report.model];
    series.extend(report.baselines.iter().filter(|b| b.name != "all ones"));
    per_question_png(&series, report.floor.as_ref(), &per_question)?;
    let spread_chart = dir.join("spread.png");
    let spread = match &report.spread {
        // predictions that agree exactly (the same checkpoint twice) have no groups by spread,
        // only rows by position: no chart (the page says "none" and links none)
        Some(sp) if sp.mean_spread != 0.0 => {
            spread_png(
                sp,
                report.model.scores.rmse,
                report.floor.as_ref().map(|f| f.rmse),
                &spread_chart,
            )?;
            Some(spread_chart)
        }
        _ => {
            // an earlier report's chart would sit beside this one's page as if it were its own
            remove_stale(&spread_chart)?;
            None
        }
    };

    let index = dir.join("index.html");
    // (a run killed between its checkpoints, or `last.safetensors` scored: not the best epoch's)
    let scored_is_best = epochs
        .and_then(best_epoch)
        .is_none_or(|(b, _)| b == report.epoch as f64);
    let html = render_html(
        report,
        learning_curve.as_ref().map(|_| curve_of),
        scored_is_best,
        gallery,
    );
    gz_schema::write_atomic(&index, html.as_bytes())?;
    Ok(ReportPaths {
        dir: dir.to_path_buf(),
        index,
        metrics,
        learning_curve,
        per_question,
        spread,
    })
}

/// The reference lines of the learning curve, whose RMSE is the validation hold-out's: this
/// report's training mean, central pixel and floor when it scores that hold-out too; on a test
/// page (whose baselines are the test split's) the run's own validation training mean, so
/// both pages draw the curve against the same line (it had none there, and another scale).
fn curve_references(report: &EvalReport) -> Vec<(String, f64)> {
    if is_test_split(report) {
        return report
            .val_mean_rmse
            .filter(|v| v.is_finite())
            .map(|v| ("training mean".to_string(), v))
            .into_iter()
            .collect();
    }
    report
        .baselines
        .iter()
        .filter(|b| b.name == "training mean" || b.name == "central pixel")
        .map(|b| (b.name.clone(), b.scores.rmse))
        .chain(report.floor.iter().map(|f| ("Bayes floor".to_string(), f.rmse)))
        .collect()
}

/// Removes an earlier report's chart that this report does not draw (none there is fine).
fn remove_stale(chart: &Path) -> Result<()> {
    match std::fs::remove_file(chart) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(chart)(e)),
        _ => Ok(()),
    }
}

/// `curve`: `None` without a learning curve, `Some(Some(run))` for a curve of only `run` among
/// the checkpoints scored.
fn render_html(r: &EvalReport, curve: Option<Option<&str>>, scored_is_best: bool, gallery: &[GalleryItem]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let title = format!("gz report: {}", r.run);
    let _ = write!(
        s,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<style>
body {{ font-family: "DejaVu Sans", Verdana, sans-serif; margin: 24px auto; max-width: 1120px; color: #222; }}
h1 {{ font-size: 24px; margin-bottom: 4px; }} h2 {{ font-size: 19px; margin-top: 28px; border-bottom: 1px solid #ddd; }}
.meta {{ color: #666; font-size: 13px; }}
table {{ border-collapse: collapse; font-size: 14px; }}
td, th {{ padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
tr.model td {{ font-weight: bold; color: #1f77b4; }}
img.chart {{ max-width: 100%; border: 1px solid #eee; }}
.gallery {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 14px; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 8px; font-size: 11.5px; }}
.card img {{ width: 150px; height: 150px; image-rendering: pixelated; display: block; margin: 0 auto 6px; }}
.card .id {{ font-weight: bold; font-size: 13px; }}
.q {{ margin-top: 5px; color: #444; }}
.row {{ display: grid; grid-template-columns: 112px 1fr 34px 34px; gap: 4px; align-items: center; }}
.bar {{ position: relative; height: 10px; background: #f2f2f2; }}
.bar .t {{ position: absolute; top: 0; height: 5px; background: #999; }}
.bar .p {{ position: absolute; top: 5px; height: 5px; background: #1f77b4; }}
.num {{ text-align: right; }} .pn {{ color: #1f77b4; }}
.legend span {{ display: inline-block; width: 14px; height: 6px; margin: 0 4px 1px 10px; }}
.warn {{ color: #a33; font-size: 14px; }}
</style></head><body>
<h1>{t}</h1>
<div class="meta">{source} · {split} · preprocessing <code>{hash}</code></div>
<h2>Scores</h2>
<table><tr><th>predictor</th><th>RMSE</th></tr>
"#,
        t = esc(&title),
        // a predictions file (`gz eval --pred`) was made elsewhere: no checkpoint, no views here
        source = match &r.predictions {
            Some(p) => format!("predictions <code>{}</code>", esc(p)),
            None => format!(
                "checkpoint <code>{}</code>{} · TTA {}",
                esc(&r.checkpoint),
                r.trained.as_ref().map_or(String::new(), |t| format!(" ({})", esc(t))),
                gz_schema::count(r.tta.n_views(), "view")
            ),
        },
        split = esc(&r.split),
        hash = esc(&r.prep_config_hash),
    );
    let _ = writeln!(
        s,
        r#"<tr class="model"><td>{}</td><td>{:.5}</td></tr>"#,
        esc(&r.model.name),
        r.model.scores.rmse
    );
    for b in &r.baselines {
        let _ = writeln!(s, "<tr><td>{}</td><td>{:.5}</td></tr>", esc(&b.name), b.scores.rmse);
    }
    if let Some(f) = &r.floor {
        let _ = writeln!(
            s,
            "<tr><td>Bayes floor <span class=meta>({})</span></td><td>{:.5}</td></tr>",
            esc(&f.source),
            f.rmse
        );
    }
    s.push_str("</table>\n");
    let _ = writeln!(
        s,
        "<p class=meta>Training mean and central pixel fitted on {} training image{}.</p>",
        r.n_fit,
        if r.n_fit == 1 { "" } else { "s" }
    );
    // what the command line warned of, on the page too (it showed the model in bold as if
    // all were well)
    for w in page_warnings(r) {
        let _ = writeln!(s, "<p class=warn>Warning: {}</p>", esc(&w));
    }
    if let Some(sp) = &r.spread {
        // the disagreement of the views (and members): where it says something of the error
        let _ = writeln!(s, "<p class=meta>{}.</p>", esc(&sp.sentence()));
        if sp.mean_spread != 0.0 {
            s.push_str("<img class=chart src=\"spread.png\" alt=\"RMSE by spread\">\n");
        }
    }
    if let Some(of) = curve {
        s.push_str("<h2>Learning curve</h2>\n");
        if let Some(run) = of {
            // an ensemble's page showed one member's curve as if it were the ensemble's
            let _ = writeln!(
                s,
                "<p class=meta>The training of <code>{}</code> only, the first of the checkpoints scored (each run's \
                 own is in its metrics.jsonl).</p>",
                esc(run)
            );
        }
        // what the curve is, beside a table that may score other rows, with other views
        let _ = writeln!(
            s,
            "<p class=meta>By epoch: the training RMSE (√ of the epoch's mean loss, in training mode) and the \
             validation hold-out's RMSE (one view){}. {}</p>",
            if is_test_split(r) {
                ", not the test images this page scores"
            } else if r.tta.n_views() > 1 {
                "; the table above averages more views"
            } else {
                ""
            },
            match (scored_is_best, is_test_split(r)) {
                (false, _) => format!(
                    "The checkpoint scored is epoch {}'s (marked), not the best epoch's.",
                    r.epoch
                ),
                (true, true) => "The checkpoint scored is the best epoch's (marked).".to_string(),
                (true, false) => "The checkpoint scored is the best epoch's (marked), chosen on these very rows: its \
                                  score here is a little optimistic."
                    .to_string(),
            }
        );
        s.push_str("<img class=chart src=\"learning_curve.png\" alt=\"learning curve\">\n");
    }
    s.push_str("<h2>RMSE per question</h2>\n<img class=chart src=\"per_question.png\" alt=\"RMSE per question\">\n");
    s.push_str("<table><tr><th>question</th>");
    let cols: Vec<&NamedScores> = std::iter::once(&r.model).chain(r.baselines.iter()).collect();
    for c in &cols {
        let _ = write!(s, "<th>{}</th>", esc(&c.name));
    }
    let floor_q = r.floor.as_ref().and_then(|f| f.per_question.as_ref());
    if floor_q.is_some() {
        s.push_str("<th>Bayes floor</th>");
    }
    s.push_str("</tr>\n");
    for (qi, q) in QUESTIONS.iter().enumerate() {
        let _ = write!(s, "<tr><td>Q{} <span class=meta>{}</span></td>", q.number, esc(q.text));
        for c in &cols {
            let v = c.scores.per_question.get(qi).map_or(f64::NAN, |x| x.rmse);
            let _ = write!(s, "<td>{v:.4}</td>");
        }
        if let Some(f) = floor_q {
            let _ = write!(s, "<td>{:.4}</td>", f.get(qi).copied().unwrap_or(f64::NAN));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n");
    if !gallery.is_empty() {
        let _ = writeln!(
            s,
            "<h2>{} galaxies</h2>\n<p class=\"meta legend\">Per answer: <span style=\"background:#999\"></span>volunteers' weighted fraction (Kaggle's: a follow-up question's answers sum to the answer that leads to it) \
             <span style=\"background:#1f77b4\"></span>predicted. Questions {}.</p>\n<div class=gallery>",
            if is_test_split(r) { "Test" } else { "Validation" },
            GALLERY_QUESTIONS.iter().map(|q| format!("Q{}", q + 1)).collect::<Vec<_>>().join(", ")
        );
        for g in gallery {
            let rmse = if g.pred.len() == N_ANSWERS && g.truth.len() == N_ANSWERS {
                (g.pred
                    .iter()
                    .zip(&g.truth)
                    .map(|(p, t)| f64::from(p - t).powi(2))
                    .sum::<f64>()
                    / N_ANSWERS as f64)
                    .sqrt()
            } else {
                f64::NAN
            };
            let _ = writeln!(
                s,
                "<div class=card><img src=\"{}\" alt=\"galaxy {}\"><div class=id>{} <span class=meta>RMSE {:.3}</span></div>",
                esc(&g.thumb),
                g.id,
                g.id,
                rmse
            );
            for &qi in &GALLERY_QUESTIONS {
                let q = &QUESTIONS[qi];
                let _ = writeln!(s, "<div class=q>Q{} {}</div>", q.number, esc(q.text));
                for ai in q.answers() {
                    let (t, p) = (
                        g.truth.get(ai).copied().unwrap_or(0.0),
                        g.pred.get(ai).copied().unwrap_or(0.0),
                    );
                    let _ = writeln!(
                        s,
                        "<div class=row><span>{}</span><div class=bar><div class=t style=\"width:{:.1}%\"></div>\
                         <div class=p style=\"width:{:.1}%\"></div></div><span class=num>{:.2}</span><span class=\"num pn\">{:.2}</span></div>",
                        esc(ANSWERS[ai].label),
                        100.0 * t.clamp(0.0, 1.0),
                        100.0 * p.clamp(0.0, 1.0),
                        t,
                        p
                    );
                }
            }
            s.push_str("</div>\n");
        }
        s.push_str("</div>\n");
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baselines::CentralPixelConfig;
    use crate::eval::EvalConfig;
    use crate::metrics::score;
    use crate::tta::TtaConfig;

    fn named(name: &str, v: f32) -> NamedScores {
        NamedScores {
            name: name.into(),
            scores: score(&[v; N_ANSWERS], &[0.5; N_ANSWERS]).unwrap(),
        }
    }

    #[test]
    fn epochs_are_read_and_bad_lines_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(
            &p,
            "{\"epoch\":1,\"train_loss\":0.1,\"val_rmse\":0.2,\"lr\":0.001}\n\n{\"epoch\":2,\"train_loss\":0.05}\n",
        )
        .unwrap();
        let e = read_epochs(&p).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].val_rmse, None);
        std::fs::write(&p, "{\"epoch\":1}\nnot json\n").unwrap();
        assert!(read_epochs(&p).unwrap_err().to_string().contains("line 2"));
    }

    #[test]
    fn report_files_are_written_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let report = EvalReport {
            run: "r<1>".into(),
            checkpoint: "x.safetensors".into(),
            epoch: 2,
            predictions: None,
            split: "validation".into(),
            prep_config_hash: "abc".into(),
            config: EvalConfig {
                tta: TtaConfig::none(),
                batch: 8,
                central_pixel: CentralPixelConfig::default(),
            },
            tta: TtaConfig::none(),
            model: named("model", 0.4),
            baselines: vec![
                named("all zeros", 0.0),
                named("all ones", 1.0),
                named("training mean", 0.45),
                named("central pixel", 0.42),
            ],
            floor: Some(crate::baselines::Floor {
                rmse: 0.01,
                source: "test".into(),
                per_question: Some(vec![0.0125; QUESTIONS.len()]),
            }),
            n_fit: 10,
            spread: Some(crate::metrics::SpreadScore {
                views: 8,
                members: 2,
                mean_spread: 0.0123,
                rank_correlation: 0.5,
                fraction_rank_correlation: 0.25,
                rmse_least: 0.05,
                rmse_most: 0.15,
                quarter: 3,
                by_spread: vec![
                    crate::metrics::SpreadBin {
                        galaxies: 2,
                        spread: 0.01,
                        rmse: 0.05,
                    },
                    crate::metrics::SpreadBin {
                        galaxies: 2,
                        spread: 0.03,
                        rmse: 0.15,
                    },
                ],
            }),
            trained: Some("tiny, tree head".into()),
            val_mean_rmse: None,
        };
        let epochs = vec![
            EpochRow {
                epoch: 1.0,
                train_loss: Some(0.1),
                val_rmse: Some(0.2),
            },
            EpochRow {
                epoch: 2.0,
                train_loss: Some(0.05),
                val_rmse: Some(0.15),
            },
        ];
        let img = vec![f16::from_f32(0.5); 3 * 8 * 8];
        thumbnail_png(&img, [3, 8, 8], &dir.path().join("gallery/7.png")).unwrap();
        let g = GalleryItem {
            id: 7,
            thumb: "gallery/7.png".into(),
            pred: vec![0.4; N_ANSWERS],
            truth: vec![0.5; N_ANSWERS],
        };
        let paths = write_report(dir.path(), &report, Some(&epochs), None, std::slice::from_ref(&g)).unwrap();
        for p in [
            paths.learning_curve.clone().unwrap(),
            paths.per_question.clone(),
            paths.spread.clone().unwrap(),
            dir.path().join("gallery/7.png"),
        ] {
            let im = image::open(&p).unwrap();
            assert!(im.width() > 0, "{}", p.display());
        }
        let html = std::fs::read_to_string(&paths.index).unwrap();
        assert!(html.contains("fitted on 10 training images"), "{html}");
        assert!(
            html.contains("r&lt;1&gt;") && !html.contains("r<1>"),
            "names are escaped"
        );
        assert!(html.contains("gallery/7.png") && html.contains("Bayes floor") && html.contains("learning_curve.png"));
        // the command line's warnings are on the page too: a model no better than the mean,
        // too few rows; none for a model that beats the mean on enough rows
        let mut good = report.clone();
        good.model.scores.rmse = 0.01;
        good.model.scores.rows = 500;
        assert!(page_warnings(&good).is_empty(), "{:?}", page_warnings(&good));
        let mut bad = good.clone();
        bad.model.scores.rmse = 0.9;
        bad.model.scores.rows = 12;
        let w = page_warnings(&bad);
        assert!(
            w.len() == 2 && w[0].contains("no better than predicting the training mean"),
            "{w:?}"
        );
        assert!(w[1].contains("only 12 galaxies are scored"), "{w:?}");
        // how the checkpoint was trained is on the page (two runs' pages looked alike)
        assert!(html.contains("(tiny, tree head)"), "{html}");
        // the curve says what it shows: the hold-out, one view, the checkpoint chosen on it
        assert!(
            html.contains("validation hold-out's RMSE (one view)") && html.contains("chosen on these very rows"),
            "{html}"
        );
        // the floor per question: a column of the per-question table
        assert!(html.contains("<th>Bayes floor</th>") && html.matches("<td>0.0125</td>").count() == QUESTIONS.len());
        let back: EvalReport = serde_json::from_str(&std::fs::read_to_string(&paths.metrics).unwrap()).unwrap();
        assert_eq!(back, report);
        assert!(html.contains("Validation galaxies"));
        assert!(
            html.contains("spread of the 8 TTA views × 2 checkpoints per galaxy: mean 0.0123; RMSE 0.15000"),
            "the spread's line"
        );
        assert!(html.contains("src=\"spread.png\""));
        // a report without the spread over that one: no chart, and the old one gone
        let plain = EvalReport {
            spread: None,
            ..report.clone()
        };
        let p2 = write_report(dir.path(), &plain, Some(&epochs), None, std::slice::from_ref(&g)).unwrap();
        assert!(p2.spread.is_none() && !dir.path().join("spread.png").exists());
        assert!(!std::fs::read_to_string(&p2.index).unwrap().contains("spread.png"));
        // predictions that agree exactly: the line says "none", and there is no chart to show
        let mut same = report.spread.clone().unwrap();
        same.mean_spread = 0.0;
        for b in &mut same.by_spread {
            b.spread = 0.0;
        }
        let agreed = EvalReport {
            spread: Some(same),
            ..report.clone()
        };
        let p3 = write_report(dir.path(), &agreed, Some(&epochs), None, std::slice::from_ref(&g)).unwrap();
        let html3 = std::fs::read_to_string(&p3.index).unwrap();
        assert!(html3.contains("agree exactly") && !html3.contains("spread.png"));
        assert!(p3.spread.is_none() && !dir.path().join("spread.png").exists());
        // a diverged model's NaN bins: a chart that says so, no error
        let mut nan = report.spread.clone().unwrap();
        for b in &mut nan.by_spread {
            b.rmse = f64::NAN;
        }
        spread_png(&nan, f64::NAN, None, &dir.path().join("nan_spread.png")).unwrap();
        // the curve's reference lines: the report's own validation baselines and floor; on a
        // test page the run's validation training mean (its baselines are the test split's)
        let names = |r: &EvalReport| -> Vec<String> { curve_references(r).into_iter().map(|(n, _)| n).collect() };
        assert_eq!(names(&report), ["training mean", "central pixel", "Bayes floor"]);
        let test = EvalReport {
            split: "test split: 1 images".into(),
            val_mean_rmse: Some(0.46),
            ..report.clone()
        };
        assert_eq!(curve_references(&test), [("training mean".to_string(), 0.46)]);
        let no_sidecar_mean = EvalReport {
            val_mean_rmse: None,
            ..test.clone()
        };
        assert!(curve_references(&no_sidecar_mean).is_empty());
        // a test-split report names its gallery so
        let tdir = dir.path().join("test");
        std::fs::create_dir_all(tdir.join("gallery")).unwrap();
        let paths = write_report(&tdir, &test, Some(&epochs), None, std::slice::from_ref(&g)).unwrap();
        let html = std::fs::read_to_string(&paths.index).unwrap();
        assert!(html.contains("Test galaxies") && !html.contains("Validation galaxies"));
        assert!(
            !html.contains("the first of the checkpoints scored"),
            "one run: no note"
        );
        // a checkpoint that is not the best epoch's (last.safetensors, a run killed between its
        // checkpoints) is said to be so under the curve
        let early = EvalReport {
            epoch: 1,
            ..test.clone()
        };
        let paths = write_report(&tdir, &early, Some(&epochs), None, std::slice::from_ref(&g)).unwrap();
        let html = std::fs::read_to_string(&paths.index).unwrap();
        assert!(
            html.contains("The checkpoint scored is epoch 1's (marked), not the best epoch's."),
            "{html}"
        );
        // an ensemble's report says whose training the learning curve is (it showed the first
        // member's as if it were the ensemble's); without a curve, nothing is said of one
        let edir = dir.path().join("ensemble");
        std::fs::create_dir_all(edir.join("gallery")).unwrap();
        let paths = write_report(
            &edir,
            &report,
            Some(&epochs),
            Some("runs/a<1>"),
            std::slice::from_ref(&g),
        )
        .unwrap();
        let html = std::fs::read_to_string(&paths.index).unwrap();
        assert!(
            html.contains("The training of <code>runs/a&lt;1&gt;</code> only, the first of the checkpoints scored"),
            "{html}"
        );
        let paths = write_report(&edir, &report, None, Some("runs/a"), &[g]).unwrap();
        let html = std::fs::read_to_string(&paths.index).unwrap();
        assert!(!html.contains("Learning curve") && !html.contains("the first of the checkpoints"));
        // no epochs: still a chart (with a note), no crash
        learning_curve_png(&[], &[], None, &dir.path().join("empty.png")).unwrap();
        // the best checkpoint's epoch (the first of equal lowest), and the legend's corner: the
        // one the points leave empty
        let row = |e: f64, v: Option<f64>| EpochRow {
            epoch: e,
            train_loss: Some(0.01),
            val_rmse: v,
        };
        let rows = [
            row(1.0, Some(0.2)),
            row(2.0, Some(0.15)),
            row(3.0, Some(f64::NAN)),
            row(4.0, Some(0.15)),
        ];
        assert_eq!(best_epoch(&rows), Some((2.0, 0.15)));
        assert_eq!(best_epoch(&[row(1.0, None)]), None);
        // the mark is the checkpoint scored, said to be the best or not (a run killed between
        // its checkpoints was marked at the best epoch of metrics.jsonl, not the one scored)
        assert_eq!(
            scored_mark(&rows, Some(2)).unwrap().1,
            "checkpoint scored: the best, epoch 2 (0.1500)"
        );
        assert_eq!(
            scored_mark(&rows, Some(1)).unwrap().1,
            "checkpoint scored: epoch 1 (0.2000), not the best"
        );
        assert_eq!(scored_mark(&rows, None).unwrap().1, "best checkpoint: epoch 2 (0.1500)");
        assert_eq!(scored_mark(&rows, Some(0)).unwrap().0, 2.0);
        let falling: Vec<(f64, f64)> = (0..=10)
            .map(|k| (f64::from(k) / 10.0, 1.0 - f64::from(k) / 10.0))
            .collect();
        assert!(matches!(emptiest_corner(&falling), SeriesLabelPosition::UpperRight));
        let rising: Vec<(f64, f64)> = falling.iter().map(|&(x, y)| (x, 1.0 - y)).collect();
        assert!(matches!(emptiest_corner(&rising), SeriesLabelPosition::UpperLeft));
        // a flat series gets an axis whose labels differ (one epoch gave six labels "0.1451")
        for (lo, hi) in [(0.1451, 0.1451), (0.0, 0.0), (0.5, 0.5000001)] {
            let (a, b) = padded(lo, hi);
            assert!(a <= lo && b >= hi && b - a >= 0.002, "{lo} {hi}: {a} {b}");
            let labels: std::collections::BTreeSet<String> = (0..=5)
                .map(|k| format!("{:.4}", a + (b - a) * k as f64 / 5.0))
                .collect();
            assert_eq!(labels.len(), 6, "{lo} {hi}: {labels:?}");
        }
        // the spread chart's x axis around one spread (one galaxy, or one group): its tick
        // labels differ
        for s in [0.0225, 0.0126, 0.004, 0.0, 0.11] {
            use plotters::coord::ranged1d::Ranged as _;
            let (a, b) = padded(s, s);
            let keys = plotters::coord::types::RangedCoordf64::from(a..b).key_points(10);
            let labels: std::collections::BTreeSet<String> = keys.iter().map(spread_label).collect();
            assert!(keys.len() > 2 && labels.len() == keys.len(), "{s}: {keys:?} {labels:?}");
        }
        let (a, b) = padded(0.1, 0.2);
        assert!((a - 0.095).abs() < 1e-12 && (b - 0.208).abs() < 1e-12, "{a} {b}");
    }
}
