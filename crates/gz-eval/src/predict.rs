//! Running a predictor (a checkpoint, an ensemble, under TTA) over cached or raw images.
//!
//! Two sources: rows of a cache split (gz-shards, already preprocessed; batches are gathered
//! from the memory map and uploaded as f16, then widened to f32 on the device), or a folder of
//! JPEGs preprocessed on the fly by a caller-supplied function (the CLI passes gz-preprocess's
//! `prep_jpeg` with the checkpoint's own config, so raw images see exactly the training recipe).
//! An unreadable JPEG is never silently dropped: it is returned in the failure list with its path
//! and reason, and the caller decides (refuse, or fill with the training mean and say so).
//! Neighbours: [`crate::tta`] for the views, [`crate::submission`] for what happens next.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gz_schema::{Solutions, N_ANSWERS};
use gz_shards::Split;
use half::f16;

use crate::tta::{predict_tta, predict_tta_spread, predict_tta_views, Predictor, TtaConfig};
use crate::{io_err, EvalError, Result};

fn model_err(what: impl Into<String>) -> impl FnOnce(candle_core::Error) -> EvalError {
    let what = what.into();
    move |source| EvalError::Model { what, source }
}

/// Predictions for a list of images: the average over TTA views and ensemble members
/// (row-major, × 37) and, when asked for, the variance of those views' and members'
/// predictions around it (same layout; [`crate::tta::predict_tta_spread`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Moments {
    pub mean: Vec<f32>,
    pub var: Option<Vec<f32>>,
    /// With [`SpreadOf::ConditionalMoments`]: what the conditional spread is pooled from.
    pub cond: Option<CondMoments>,
}

impl Moments {
    fn extend(&mut self, other: Moments) {
        self.mean.extend(other.mean);
        if let (Some(v), Some(o)) = (&mut self.var, other.var) {
            v.extend(o);
        }
        if let (Some(c), Some(o)) = (&mut self.cond, other.cond) {
            c.n.extend(o.n);
            c.mean.extend(o.mean);
            c.m2.extend(o.m2);
        }
    }
}

/// Per row and answer (row-major × 37), the moments of the per-question fractions
/// ([`gz_schema::conditional`]) of the views' and members' predictions that reach the
/// question: how many do (`n`), their mean and the sum of their squared deviations from it
/// (`m2`; both NaN where none does). Groups of an ensemble predicted apart (checkpoints that
/// take different inputs) pool them exactly into the conditional spread around the
/// ensemble's own fractions ([`pooled_conditional_variance`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CondMoments {
    pub n: Vec<f32>,
    pub mean: Vec<f32>,
    pub m2: Vec<f32>,
}

/// [`CondMoments`] of `all`'s predictions (each row-major × 37, `rows` rows).
pub fn conditional_moments(all: &[Vec<f32>], rows: usize) -> CondMoments {
    let cells = rows * N_ANSWERS;
    let mut out = CondMoments {
        n: vec![0.0; cells],
        mean: vec![f32::NAN; cells],
        m2: vec![f32::NAN; cells],
    };
    for r in 0..rows {
        let range = r * N_ANSWERS..(r + 1) * N_ANSWERS;
        let fractions: Vec<[Option<f32>; N_ANSWERS]> =
            all.iter().map(|y| gz_schema::conditional(&y[range.clone()])).collect();
        for a in 0..N_ANSWERS {
            let v: Vec<f64> = fractions.iter().filter_map(|f| f[a]).map(f64::from).collect();
            if v.is_empty() {
                continue;
            }
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let m2: f64 = v.iter().map(|x| (x - mean).powi(2)).sum();
            let i = r * N_ANSWERS + a;
            out.n[i] = v.len() as f32;
            out.mean[i] = mean as f32;
            out.m2[i] = m2 as f32;
        }
    }
    out
}

/// The conditional spread (variance) of one row around `centre` (the ensemble's per-question
/// fractions, [`gz_schema::conditional`] of its averaged row) from the groups' moments `parts`
/// (each `(n, mean, m2)`, 37 values apiece): Σ over groups of `m2 + n·(mean − centre)²`, over
/// Σ n. NaN where the centre is empty or no prediction reaches the question, as
/// [`conditional_variance`], which this equals for one group.
pub fn pooled_conditional_variance(parts: &[(&[f32], &[f32], &[f32])], centre: &[Option<f32>]) -> Vec<f32> {
    (0..N_ANSWERS)
        .map(|a| {
            let Some(c) = centre[a] else { return f32::NAN };
            let (mut n, mut ss) = (0f64, 0f64);
            for (pn, pmean, pm2) in parts {
                if pn[a] > 0.0 {
                    n += f64::from(pn[a]);
                    ss += f64::from(pm2[a]) + f64::from(pn[a]) * (f64::from(pmean[a]) - f64::from(c)).powi(2);
                }
            }
            if n > 0.0 {
                (ss / n) as f32
            } else {
                f32::NAN
            }
        })
        .collect()
}

/// Predicts one batch of f16 C×H×W images (row-major, `n` images) → `n × 37` f32.
pub fn predict_batch(
    model: &dyn Predictor,
    images: &[f16],
    shape: [usize; 3],
    tta: &TtaConfig,
    device: &Device,
) -> Result<Vec<f32>> {
    Ok(predict_batch_moments(model, images, shape, tta, device, None)?.mean)
}

/// Which fractions a spread is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpreadOf {
    /// Kaggle's 37 shares of all volunteers, the predictions themselves: the variance of the
    /// views' and members' predictions around their average.
    Kaggle,
    /// The per-question fractions of [`gz_schema::conditional`]: the mean squared deviation of
    /// each view's and member's from the average's, over those that reach the question (NaN
    /// where none does, or the average does not).
    Conditional,
    /// The [`CondMoments`] a conditional spread is pooled from (in [`Moments::cond`]; no
    /// `var`): for the groups of an ensemble predicted apart.
    ConditionalMoments,
}

/// [`predict_batch`], with the spread of the views' and members' predictions when asked for.
pub fn predict_batch_moments(
    model: &dyn Predictor,
    images: &[f16],
    shape: [usize; 3],
    tta: &TtaConfig,
    device: &Device,
    spread: Option<SpreadOf>,
) -> Result<Moments> {
    let [c, h, w] = shape;
    let per = c * h * w;
    if per == 0 || images.len() % per != 0 {
        return Err(EvalError::Shape {
            what: "image batch".into(),
            reason: format!("{} values is not a multiple of {c}×{h}×{w}", images.len()),
        });
    }
    let n = images.len() / per;
    let run = || -> candle_core::Result<Moments> {
        let x = Tensor::from_slice(images, (n, c, h, w), &Device::Cpu)?
            .to_device(device)?
            .to_dtype(DType::F32)?;
        let values = |t: Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let check = |y: &Tensor| -> candle_core::Result<()> {
            let (bn, k) = y.dims2()?;
            if bn != n || k != N_ANSWERS {
                candle_core::bail!(
                    "the model returned shape ({bn}, {k}) for a batch of {n}; expected ({n}, {N_ANSWERS})"
                );
            }
            Ok(())
        };
        match spread {
            None => {
                let y = predict_tta(model, &x, tta)?;
                check(&y)?;
                Ok(Moments {
                    mean: values(y)?,
                    ..Moments::default()
                })
            }
            Some(SpreadOf::Kaggle) => {
                let (y, var) = predict_tta_spread(model, &x, tta)?;
                check(&y)?;
                Ok(Moments {
                    mean: values(y)?,
                    var: Some(values(var)?),
                    cond: None,
                })
            }
            Some(SpreadOf::Conditional) => {
                let (y, all) = predict_tta_views(model, &x, tta)?;
                check(&y)?;
                let mean = values(y)?;
                let all = all.into_iter().map(values).collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Moments {
                    var: Some(conditional_variance(&mean, &all)),
                    mean,
                    cond: None,
                })
            }
            Some(SpreadOf::ConditionalMoments) => {
                let (y, all) = predict_tta_views(model, &x, tta)?;
                check(&y)?;
                let all = all.into_iter().map(values).collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Moments {
                    mean: values(y)?,
                    var: None,
                    cond: Some(conditional_moments(&all, n)),
                })
            }
        }
    };
    run().map_err(model_err(format!(
        "predicting a batch of {n} image{}",
        if n == 1 { "" } else { "s" }
    )))
}

/// Per row and answer, the mean squared deviation of the per-question fractions
/// ([`gz_schema::conditional`]) of each of `all`'s predictions from those of `mean` (all
/// row-major × 37), over the predictions that reach the question; NaN where `mean` or none of
/// them reaches it (a NaN prediction gives NaN, as it does in the fractions).
pub fn conditional_variance(mean: &[f32], all: &[Vec<f32>]) -> Vec<f32> {
    let rows = mean.len() / N_ANSWERS;
    let mut out = vec![f32::NAN; mean.len()];
    for r in 0..rows {
        let cells = r * N_ANSWERS..(r + 1) * N_ANSWERS;
        let centre = gz_schema::conditional(&mean[cells.clone()]);
        let mut sum = [0f64; N_ANSWERS];
        let mut count = [0usize; N_ANSWERS];
        for y in all {
            for (a, c) in gz_schema::conditional(&y[cells.clone()]).iter().enumerate() {
                if let (Some(c), Some(m)) = (c, centre[a]) {
                    sum[a] += (*c as f64 - m as f64).powi(2);
                    count[a] += 1;
                }
            }
        }
        for a in 0..N_ANSWERS {
            if count[a] > 0 {
                out[r * N_ANSWERS + a] = (sum[a] / count[a] as f64) as f32;
            }
        }
    }
    out
}

/// Predicts `rows` of a cache split (all rows when `None`), in batches of `batch`, with the
/// spread when `spread`; `progress` is called with the number of images done so far. Returns
/// `rows.len() × 37` values.
#[allow(clippy::too_many_arguments)] // reason: one call per front end; a struct would only rename them
pub fn predict_split(
    model: &dyn Predictor,
    split: &Split,
    rows: Option<&[usize]>,
    tta: &TtaConfig,
    batch: usize,
    device: &Device,
    spread: Option<SpreadOf>,
    progress: &dyn Fn(usize),
) -> Result<Moments> {
    let shape = split.shape();
    let batch = batch.max(1);
    let mut out = Moments {
        mean: Vec::new(),
        var: spread
            .filter(|s| *s != SpreadOf::ConditionalMoments)
            .map(|_| Vec::new()),
        cond: (spread == Some(SpreadOf::ConditionalMoments)).then(CondMoments::default),
    };
    match rows {
        None => {
            for r in split.chunks(batch) {
                let done = r.end;
                out.extend(predict_batch_moments(
                    model,
                    split.images(r),
                    shape,
                    tta,
                    device,
                    spread,
                )?);
                progress(done);
            }
        }
        Some(rows) => {
            let mut buf: Vec<f16> = Vec::new();
            for (k, chunk) in rows.chunks(batch).enumerate() {
                buf.clear();
                for &i in chunk {
                    if i >= split.len() {
                        return Err(EvalError::Shape {
                            what: format!("split {}", split.name()),
                            reason: format!("row {i} requested but the split has {} rows", split.len()),
                        });
                    }
                    buf.extend_from_slice(split.image(i));
                }
                out.extend(predict_batch_moments(model, &buf, shape, tta, device, spread)?);
                progress(k * batch + chunk.len());
            }
        }
    }
    Ok(out)
}

/// A test image that could not be predicted.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub path: PathBuf,
    /// The row key the image was given ([`Keys`]): its GalaxyID, or its position in file mode.
    pub key: u64,
    pub reason: String,
}

/// The GalaxyID a file is named for (`<id>.jpg`), if its stem is digits only (`+7.jpg` is
/// not galaxy 7, though Rust's integer parse would take it).
pub fn galaxy_id(path: &Path) -> Option<u64> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
}

/// The JPEGs of a folder (`*.jpg`, `*.jpeg`, any case; not folders so named, not hidden files:
/// [`gz_preprocess::dataset::is_hidden`]), sorted by name.
pub fn list_jpegs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        // hidden files are no images: macOS's AppleDouble `._<name>.jpg` beside every image of a
        // folder copied through a Mac made a Kaggle test folder "files not named <GalaxyID>.jpg"
        if gz_preprocess::dataset::is_hidden(&entry.file_name()) {
            continue;
        }
        let p = entry.path();
        // a folder named `x.jpg` is not an image (a broken link stays: it fails as unreadable)
        if p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"))
            && !p.is_dir()
        {
            // a named pipe so named would be opened and waited on for ever
            if std::fs::metadata(&p).is_ok_and(|m| !m.is_file()) {
                return Err(EvalError::BadFile {
                    path: p,
                    reason: "not a regular file (a named pipe, socket or device): not read as an image; move it out \
                             of the folder"
                        .into(),
                });
            }
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// How the rows of a folder's predictions are keyed.
#[derive(Debug, Clone, PartialEq)]
pub struct Keys {
    /// One key per path, in path order.
    pub keys: Vec<u64>,
    /// `None`: the keys are GalaxyIDs (every file is named `<GalaxyID>.jpg`, as Kaggle's are).
    /// `Some(names)`: file mode, for images named anything else (`NGC1300.jpg`): the keys are
    /// positions and `names[key]` is the file's name, which names its row.
    pub names: Option<Vec<String>>,
}

/// The row name of a file: its file name, with any byte that is not UTF-8 written `\xFF`
/// (Linux file names are bytes; a lossy conversion would give two such files one name).
fn file_label(p: &Path) -> String {
    let Some(name) = p.file_name() else {
        return p.display().to_string();
    };
    let mut out = String::new();
    for chunk in name.as_encoded_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

/// Keys for `paths`: their GalaxyIDs when every file is named `<GalaxyID>.jpg` (two files for
/// one id, `231279.jpg` and `0231279.jpg`, are an error naming both), else file mode.
pub fn keys_for(paths: &[PathBuf]) -> Result<Keys> {
    let ids: Option<Vec<u64>> = paths.iter().map(|p| galaxy_id(p)).collect();
    let Some(ids) = ids else {
        let names: Vec<String> = paths.iter().map(|p| file_label(p)).collect();
        let mut seen: std::collections::HashMap<&str, &PathBuf> = std::collections::HashMap::new();
        for (p, name) in paths.iter().zip(&names) {
            if let Some(first) = seen.insert(name, p) {
                return Err(EvalError::BadFile {
                    path: p.clone(),
                    reason: format!(
                        "its row would be named {name:?}, as {}'s: rename one of them",
                        first.display()
                    ),
                });
            }
        }
        return Ok(Keys {
            keys: (0..paths.len() as u64).collect(),
            names: Some(names),
        });
    };
    let mut seen: std::collections::HashMap<u64, &PathBuf> = std::collections::HashMap::new();
    for (p, &id) in paths.iter().zip(&ids) {
        if let Some(first) = seen.insert(id, p) {
            return Err(EvalError::BadFile {
                path: p.clone(),
                reason: format!("GalaxyID {id} again (already {}): one file per galaxy", first.display()),
            });
        }
    }
    Ok(Keys { keys: ids, names: None })
}

/// Predictions as CSV text: the header `<first_column>,Class1.1,…`, then per row its label (a
/// GalaxyID or a file name, CSV-quoted when it holds a comma, a quote or a line break) and 37
/// cells, an empty cell for `None` ([`gz_schema::conditional`]'s questions nobody reached).
/// `gz predict` stages it with `gz_schema::stage_atomic`.
pub fn table_csv(first_column: &str, rows: &[(String, Vec<Option<f32>>)]) -> Result<String> {
    use std::fmt::Write as _;
    let header = gz_schema::csv_header();
    let mut text = String::with_capacity(64 + rows.len() * N_ANSWERS * 10);
    // `GalaxyID,Class1.1,…` with the first column named as asked
    text.push_str(first_column);
    text.push(',');
    text.push_str(header.split_once(',').map_or("", |(_, rest)| rest));
    text.push('\n');
    for (label, cells) in rows {
        if cells.len() != N_ANSWERS {
            return Err(EvalError::Shape {
                what: format!("row {label}"),
                reason: format!("{} values, expected {N_ANSWERS}", cells.len()),
            });
        }
        if label.contains([',', '"', '\n', '\r']) {
            let _ = write!(text, "\"{}\"", label.replace('"', "\"\""));
        } else {
            text.push_str(label);
        }
        for v in cells {
            text.push(',');
            if let Some(v) = v {
                let _ = write!(text, "{v}");
            }
        }
        text.push('\n');
    }
    Ok(text)
}

/// Preprocesses one JPEG file's bytes into C×H×W f16 values, or says why it cannot.
pub type PrepFn<'a> = dyn Fn(&[u8]) -> std::result::Result<Vec<f16>, String> + Sync + 'a;

/// Predicts a list of JPEG files, preprocessing each with `prep` (bytes → C×H×W f16 of
/// `shape`); `keys[i]` keys the row of `paths[i]` ([`keys_for`]). Files that cannot be read or
/// decoded are returned as failures; the others as rows in input order, with (when `spread`)
/// the variance of their views' and members' predictions in rows of the same keys.
#[allow(clippy::too_many_arguments)] // reason: one call site per front end; a struct would only rename them
pub fn predict_jpegs(
    model: &dyn Predictor,
    paths: &[PathBuf],
    keys: &[u64],
    prep: &PrepFn<'_>,
    shape: [usize; 3],
    tta: &TtaConfig,
    batch: usize,
    device: &Device,
    spread: Option<SpreadOf>,
    progress: &dyn Fn(usize),
) -> Result<JpegPredictions> {
    if keys.len() != paths.len() {
        return Err(EvalError::Shape {
            what: "image keys".into(),
            reason: format!("{} keys for {} images", keys.len(), paths.len()),
        });
    }
    let per = shape.iter().product::<usize>();
    let mut sol = Solutions::new();
    let mut var = spread
        .filter(|s| *s != SpreadOf::ConditionalMoments)
        .map(|_| Solutions::new());
    let mut cond =
        (spread == Some(SpreadOf::ConditionalMoments)).then(|| [Solutions::new(), Solutions::new(), Solutions::new()]);
    let mut failures = Vec::new();
    let mut batch_keys = Vec::new();
    let mut buf: Vec<f16> = Vec::new();
    let mut done = 0;
    let b = batch.max(1);
    for (chunk, chunk_keys) in paths.chunks(b).zip(keys.chunks(b)) {
        batch_keys.clear();
        buf.clear();
        for (p, &key) in chunk.iter().zip(chunk_keys) {
            let result = std::fs::read(p)
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(|b| prep(&b));
            match result {
                Ok(img) if img.len() == per => {
                    batch_keys.push(key);
                    buf.extend_from_slice(&img);
                }
                Ok(img) => failures.push(Failure {
                    path: p.clone(),
                    key,
                    reason: format!("preprocessing gave {} values, expected {per}", img.len()),
                }),
                Err(reason) => failures.push(Failure {
                    path: p.clone(),
                    key,
                    reason,
                }),
            }
        }
        if !batch_keys.is_empty() {
            let y = predict_batch_moments(model, &buf, shape, tta, device, spread)?;
            for (k, key) in batch_keys.iter().enumerate() {
                let row = k * N_ANSWERS..(k + 1) * N_ANSWERS;
                sol.push(*key, &y.mean[row.clone()]);
                if let (Some(var), Some(v)) = (&mut var, &y.var) {
                    var.push(*key, &v[row.clone()]);
                }
                if let (Some([n, mean, m2]), Some(c)) = (&mut cond, &y.cond) {
                    n.push(*key, &c.n[row.clone()]);
                    mean.push(*key, &c.mean[row.clone()]);
                    m2.push(*key, &c.m2[row]);
                }
            }
        }
        done += chunk.len();
        progress(done);
    }
    Ok(JpegPredictions {
        rows: sol,
        var,
        cond,
        failures,
    })
}

/// What [`predict_jpegs`] returns.
#[derive(Debug, Clone)]
pub struct JpegPredictions {
    /// The images that could be predicted, in input order.
    pub rows: Solutions,
    /// With `spread`: the variance of each row's views' and members' predictions, same keys.
    pub var: Option<Solutions>,
    /// With [`SpreadOf::ConditionalMoments`]: the [`CondMoments`] `n`, `mean` and `m2` of each
    /// row, same keys.
    pub cond: Option<[Solutions; 3]>,
    /// The images that could not.
    pub failures: Vec<Failure>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Result as CResult;

    fn mean_model(x: &Tensor) -> CResult<Tensor> {
        let (b, ..) = x.dims4()?;
        x.flatten_from(1)?
            .mean_keepdim(1)?
            .broadcast_as((b, N_ANSWERS))?
            .contiguous()
    }

    /// macOS leaves an AppleDouble `._<name>` beside every image it copies onto a USB disk or a
    /// share, and a `.DS_Store`: hidden files are not images. Before, `._100.jpg` made a
    /// Kaggle test folder one of files not named by GalaxyID: `gz submit --ids` refused it
    /// (the pipeline stopped at its last stage) and `gz predict --images` named every row by
    /// file, with a failed row for each `._` file.
    #[test]
    fn hidden_files_are_not_images() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "100.jpg",
            "200.JPEG",
            "._100.jpg",
            "._200.JPEG",
            ".DS_Store",
            ".hidden.jpg",
        ] {
            std::fs::write(dir.path().join(name), [1u8]).unwrap();
        }
        let paths = list_jpegs(dir.path()).unwrap();
        assert_eq!(paths, vec![dir.path().join("100.jpg"), dir.path().join("200.JPEG")]);
        assert_eq!(
            keys_for(&paths).unwrap(),
            Keys {
                keys: vec![100, 200],
                names: None
            }
        );
        // and `gz submit --ids` reads the folder's test ids the same way
        assert_eq!(crate::submission::ids_from_dir(dir.path()).unwrap(), vec![100, 200]);
    }

    /// A named pipe called like an image is refused by name, not opened (reading it waited for
    /// a writer for ever).
    #[cfg(unix)]
    #[test]
    fn a_named_pipe_among_the_images_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("100.jpg"), [1u8]).unwrap();
        let fifo = dir.path().join("200.jpg");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a NUL-terminated path
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = list_jpegs(dir.path()).unwrap_err().to_string();
        assert!(e.contains("200.jpg") && e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn jpeg_failures_are_listed_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("100.jpg"), [1u8]).unwrap();
        std::fs::write(dir.path().join("200.jpg"), [2u8]).unwrap();
        std::fs::write(dir.path().join("300.jpg"), [0u8]).unwrap();
        std::fs::write(dir.path().join("x.txt"), [1u8]).unwrap();
        std::fs::create_dir(dir.path().join("400.jpg")).unwrap();
        let paths = list_jpegs(dir.path()).unwrap();
        assert_eq!(paths.len(), 3);
        let keys = keys_for(&paths).unwrap();
        assert_eq!(
            keys,
            Keys {
                keys: vec![100, 200, 300],
                names: None
            }
        );
        // "prep": byte 0 is a corrupt file, otherwise a constant image of value byte/4
        let prep = |b: &[u8]| -> std::result::Result<Vec<f16>, String> {
            match b.first() {
                Some(0) | None => Err("corrupt JPEG".into()),
                Some(v) => Ok(vec![f16::from_f32(*v as f32 / 4.0); 3 * 4 * 4]),
            }
        };
        let out = predict_jpegs(
            &mean_model,
            &paths,
            &keys.keys,
            &prep,
            [3, 4, 4],
            &TtaConfig::none(),
            2,
            &Device::Cpu,
            None,
            &|_| {},
        )
        .unwrap();
        let (sol, fails) = (out.rows, out.failures);
        assert!(out.var.is_none());
        assert_eq!(sol.ids, vec![100, 200]);
        assert!((sol.row(1)[5] - 0.5).abs() < 1e-6);
        assert_eq!(fails.len(), 1);
        assert_eq!(fails[0].key, 300);
        assert_eq!(fails[0].reason, "corrupt JPEG");
    }

    #[test]
    fn images_not_named_for_a_galaxy_are_keyed_by_position_and_named() {
        let p = |n: &str| PathBuf::from("/d").join(n);
        let k = keys_for(&[p("12.jpg"), p("NGC 1300.JPEG"), p("M51.jpg")]).unwrap();
        assert_eq!(k.keys, vec![0, 1, 2]);
        assert_eq!(k.names.unwrap(), ["12.jpg", "NGC 1300.JPEG", "M51.jpg"]);
        let e = keys_for(&[p("0012.jpg"), p("12.jpg")]).unwrap_err().to_string();
        assert!(e.contains("GalaxyID 12 again") && e.contains("0012.jpg"), "{e}");
        assert_eq!(keys_for(&[]).unwrap().keys, Vec::<u64>::new());
        // a sign is not part of a GalaxyID: `+7.jpg` names its row, and is not galaxy 7 again
        let k = keys_for(&[p("+7.jpg"), p("7.jpg")]).unwrap();
        assert_eq!(k.names.unwrap(), ["+7.jpg", "7.jpg"]);
    }

    #[cfg(unix)]
    #[test]
    fn file_names_that_are_not_utf8_keep_distinct_row_names() {
        use std::os::unix::ffi::OsStrExt;
        let p = |n: &[u8]| PathBuf::from("/d").join(std::ffi::OsStr::from_bytes(n));
        let k = keys_for(&[p(b"bad\xfe.jpg"), p(b"bad\xff.jpg"), p("\u{e9}toile.jpg".as_bytes())]).unwrap();
        assert_eq!(k.names.unwrap(), ["bad\\xFE.jpg", "bad\\xFF.jpg", "\u{e9}toile.jpg"]);
        // a name that is written like another's escape: refused, not two rows of one name
        let e = keys_for(&[p(b"bad\\xFF.jpg"), p(b"bad\xff.jpg")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rename one"), "{e}");
    }

    /// The spread of per-question fractions, by hand: Q1 (3 answers) of two predictions around
    /// their average, Q2 reached by one of them only, Q3 by neither.
    #[test]
    fn conditional_variance_by_hand() {
        let row = |q1: [f32; 3], q2: [f32; 2]| {
            let mut r = vec![0.0f32; N_ANSWERS];
            r[..3].copy_from_slice(&q1);
            r[3..5].copy_from_slice(&q2);
            r
        };
        // view A: Q1 shares 0.6 / 0.4 / 0 of all; Q2 (reached by the 0.4 of disks) 0.1 / 0.3
        // view B: Q1 0.2 / 0.8 / 0; Q2 0.005 / 0.0 (under 1 % reach it: no fractions)
        let a = row([0.6, 0.4, 0.0], [0.1, 0.3]);
        let b = row([0.2, 0.8, 0.0], [0.005, 0.0]);
        let mean: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (x + y) / 2.0).collect();
        let v = conditional_variance(&mean, &[a.clone(), b.clone()]);
        // Q1 of the mean: 0.4 / 0.6 / 0; views 0.6 and 0.2 for Class1.1: deviations ±0.2
        assert!(
            (v[0] - 0.04).abs() < 1e-6 && (v[1] - 0.04).abs() < 1e-6 && v[2] == 0.0,
            "{:?}",
            &v[..3]
        );
        // Q2 of the mean: 0.0525 / 0.15 of 0.2025 reached; only view A reaches it (0.25 / 0.75)
        let m = 0.0525f64 / 0.2025;
        assert!((v[3] as f64 - (0.25 - m).powi(2)).abs() < 1e-6, "{}", v[3]);
        assert!((v[4] as f64 - (0.75 - (1.0 - m)).powi(2)).abs() < 1e-6, "{}", v[4]);
        // Q3 onwards: nobody reaches them (all zeros): no spread
        assert!(v[5..].iter().all(|x| x.is_nan()));
        // a NaN prediction: NaN where it has one
        let mut bad = a.clone();
        bad[0] = f32::NAN;
        let v = conditional_variance(&mean, &[bad, b]);
        assert!(v[0].is_nan() && v[1].is_nan() && !v[3].is_nan());
    }

    /// The conditional spread pooled from groups' moments equals the one computed over all
    /// predictions at once, for any split into groups (one group included), around the
    /// ensemble's fractions; NaN where the centre or every prediction misses the question.
    #[test]
    fn pooled_conditional_variance_equals_the_direct_one() {
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        // Kaggle-like rows: each question splits its parent answer at random
        let rows = 3;
        let all: Vec<Vec<f32>> = (0..7)
            .map(|_| {
                (0..rows)
                    .flat_map(|_| {
                        let mut row = vec![0f32; N_ANSWERS];
                        for (qi, q) in gz_schema::QUESTIONS.iter().enumerate() {
                            let target = gz_schema::question_target(&row, qi);
                            let w: Vec<f32> = q.answers().map(|_| next() + 0.01).collect();
                            let total: f32 = w.iter().sum();
                            for (i, w) in q.answers().zip(&w) {
                                row[i] = target * w / total;
                            }
                        }
                        row
                    })
                    .collect()
            })
            .collect();
        let mean: Vec<f32> = (0..rows * N_ANSWERS)
            .map(|i| all.iter().map(|y| y[i]).sum::<f32>() / all.len() as f32)
            .collect();
        let direct = conditional_variance(&mean, &all);
        let mut compared = 0;
        for split in [vec![7], vec![3, 4], vec![1, 2, 4], vec![6, 1]] {
            let mut groups = Vec::new();
            let mut start = 0;
            for k in split {
                groups.push(conditional_moments(&all[start..start + k], rows));
                start += k;
            }
            for r in 0..rows {
                let cells = r * N_ANSWERS..(r + 1) * N_ANSWERS;
                let parts: Vec<(&[f32], &[f32], &[f32])> = groups
                    .iter()
                    .map(|g| (&g.n[cells.clone()], &g.mean[cells.clone()], &g.m2[cells.clone()]))
                    .collect();
                let pooled = pooled_conditional_variance(&parts, &gz_schema::conditional(&mean[cells.clone()]));
                for (a, (p, d)) in pooled.iter().zip(&direct[cells.clone()]).enumerate() {
                    assert!(
                        (p.is_nan() && d.is_nan()) || (p - d).abs() < 1e-6,
                        "row {r} answer {a}: pooled {p} vs direct {d}"
                    );
                    compared += usize::from(!d.is_nan() && *d > 1e-4);
                }
            }
        }
        assert!(compared > 100, "{compared}");
        // nobody reaches the question, or the centre does not: NaN
        let zero = (
            &[0f32; N_ANSWERS][..],
            &[f32::NAN; N_ANSWERS][..],
            &[f32::NAN; N_ANSWERS][..],
        );
        assert!(pooled_conditional_variance(&[zero], &[Some(0.5); N_ANSWERS])
            .iter()
            .all(|v| v.is_nan()));
        let one = (&[1f32; N_ANSWERS][..], &[0.5f32; N_ANSWERS][..], &[0f32; N_ANSWERS][..]);
        assert!(pooled_conditional_variance(&[one], &[None; N_ANSWERS])
            .iter()
            .all(|v| v.is_nan()));
        assert!(pooled_conditional_variance(&[one], &[Some(0.25); N_ANSWERS])
            .iter()
            .all(|v| (v - 0.0625).abs() < 1e-7));
    }

    #[test]
    fn batch_shape_errors() {
        let e = predict_batch(
            &mean_model,
            &[f16::ZERO; 10],
            [3, 2, 2],
            &TtaConfig::none(),
            &Device::Cpu,
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple of 3×2×2"), "{e}");
        let bad = |x: &Tensor| -> CResult<Tensor> { Tensor::zeros((x.dims4()?.0, 5), DType::F32, x.device()) };
        let e = predict_batch(&bad, &[f16::ZERO; 12], [3, 2, 2], &TtaConfig::none(), &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("expected (1, 37)"), "{e}");
    }
}
