//! Kaggle submission files: writing one that is valid by construction, and checking any file.
//!
//! A submission is `GalaxyID,Class1.1,…,Class11.6` followed by exactly one row per test image
//! (79,975 for the real test set), every value a finite number in [0, 1]. [`write_submission`]
//! clips the predictions, fills or refuses missing rows, sorts by id, re-checks the bytes it is
//! about to publish with [`check_bytes`] and only then renames them into place (atomic), so a
//! short or broken file is never left where a user would upload it. [`check`] validates an
//! existing file and, unlike `gz_schema::read_solutions` (which stops at the first error), keeps
//! going and lists every problem with its line, capped at [`MAX_LISTED_PER_KIND`] messages per
//! kind with full counts. Neighbours: gz-schema owns the column names and the atomic write.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use gz_schema::{column_names, csv_header, Solutions, N_ANSWERS, N_QUESTIONS};
use serde::Serialize;

use crate::{io_err, EvalError, Result};

/// How many problems of one kind [`check`] spells out; the rest are only counted.
pub const MAX_LISTED_PER_KIND: usize = 20;

/// Rows in the real Kaggle test set.
pub const KAGGLE_TEST_ROWS: usize = 79_975;

/// What kind of problem a submission has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum ProblemKind {
    /// Empty file or the header is not exactly the 38 Kaggle columns.
    Header,
    /// The CSV layer failed (bad quoting, invalid UTF-8).
    Csv,
    /// A row without 38 fields.
    FieldCount,
    /// A GalaxyID that is not a non-negative integer.
    BadId,
    /// A GalaxyID seen on an earlier line.
    DuplicateId,
    /// A cell that is not a number.
    NotANumber,
    /// A NaN cell.
    NaN,
    /// An infinite cell.
    Infinite,
    /// A value outside [0, 1].
    OutOfRange,
    /// Number of rows differs from the number of test images.
    RowCount,
    /// A test image with no row.
    MissingId,
    /// A row for an id that is not a test image.
    ExtraId,
    /// Per-question fractions (`gz predict --conditional`), not Kaggle's ([`looks_conditional`]).
    Conditional,
}

impl ProblemKind {
    /// What the kind is called in summaries ("3 out of [0, 1]").
    pub fn label(self) -> &'static str {
        match self {
            ProblemKind::Header => "bad header",
            ProblemKind::Csv => "unreadable CSV",
            ProblemKind::FieldCount => "wrong field count",
            ProblemKind::BadId => "bad GalaxyID",
            ProblemKind::DuplicateId => "duplicate GalaxyID",
            ProblemKind::NotANumber => "not a number",
            ProblemKind::NaN => "NaN",
            ProblemKind::Infinite => "infinite",
            ProblemKind::OutOfRange => "out of [0, 1]",
            ProblemKind::RowCount => "wrong row count",
            ProblemKind::MissingId => "missing GalaxyID",
            ProblemKind::ExtraId => "GalaxyID not a test image",
            ProblemKind::Conditional => "per-question fractions",
        }
    }

    /// `n` problems of this kind in words: `1 missing GalaxyID`, `8 missing GalaxyIDs`,
    /// `2 NaNs`, `1 value not a number` (the summary line of `gz submit --check`).
    pub fn counted(self, n: usize) -> String {
        let one = n == 1;
        let noun = match self {
            ProblemKind::Header => {
                if one {
                    "bad header"
                } else {
                    "bad headers"
                }
            }
            ProblemKind::Csv => {
                if one {
                    "unreadable CSV line"
                } else {
                    "unreadable CSV lines"
                }
            }
            ProblemKind::FieldCount => {
                if one {
                    "wrong field count"
                } else {
                    "wrong field counts"
                }
            }
            ProblemKind::BadId => {
                if one {
                    "bad GalaxyID"
                } else {
                    "bad GalaxyIDs"
                }
            }
            ProblemKind::DuplicateId => {
                if one {
                    "duplicate GalaxyID"
                } else {
                    "duplicate GalaxyIDs"
                }
            }
            ProblemKind::NotANumber => {
                if one {
                    "value not a number"
                } else {
                    "values not numbers"
                }
            }
            ProblemKind::NaN => {
                if one {
                    "NaN"
                } else {
                    "NaNs"
                }
            }
            ProblemKind::Infinite => {
                if one {
                    "infinite value"
                } else {
                    "infinite values"
                }
            }
            ProblemKind::OutOfRange => {
                if one {
                    "value out of [0, 1]"
                } else {
                    "values out of [0, 1]"
                }
            }
            ProblemKind::RowCount => "wrong row count",
            ProblemKind::MissingId => {
                if one {
                    "missing GalaxyID"
                } else {
                    "missing GalaxyIDs"
                }
            }
            ProblemKind::ExtraId => {
                if one {
                    "GalaxyID not a test image"
                } else {
                    "GalaxyIDs not test images"
                }
            }
            ProblemKind::Conditional => "per-question fractions",
        };
        format!("{n} {noun}")
    }
}

/// One problem of a submission file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// 1-based line (the header is line 1); `None` for whole-file problems and missing ids.
    pub line: Option<u64>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The outcome of checking a submission.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckReport {
    pub path: PathBuf,
    /// Data rows read (lines after the header that were not blank).
    pub rows: usize,
    /// Problems in file order (missing ids last), at most [`MAX_LISTED_PER_KIND`] per kind.
    pub problems: Vec<Problem>,
    /// Every problem counted by kind, including those not listed.
    pub counts: BTreeMap<ProblemKind, usize>,
    /// What is legal but most likely a mistake ([`Class1Sums::warning`]).
    pub warnings: Vec<String>,
}

impl CheckReport {
    /// Whether the file is a valid submission.
    pub fn is_ok(&self) -> bool {
        self.counts.is_empty()
    }

    /// Total number of problems.
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    /// Number of problems of one kind.
    pub fn count(&self, kind: ProblemKind) -> usize {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    fn push(&mut self, kind: ProblemKind, line: Option<u64>, message: String) {
        let n = self.counts.entry(kind).or_insert(0);
        *n += 1;
        if *n <= MAX_LISTED_PER_KIND {
            self.problems.push(Problem { kind, line, message });
        }
    }

    /// A multi-line human summary: each listed problem, then counts of the unlisted ones.
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        // what the whole file is (per-question fractions, whose empty cells are the lines
        // listed) first: it came after twenty "\"\" is not a number" lines that it explains
        let (whole, lines): (Vec<&Problem>, Vec<&Problem>) =
            self.problems.iter().partition(|p| p.kind == ProblemKind::Conditional);
        for p in whole.into_iter().chain(lines) {
            let _ = writeln!(s, "{}: {p}", self.path.display());
        }
        for (kind, &n) in &self.counts {
            if n > MAX_LISTED_PER_KIND {
                let _ = writeln!(
                    s,
                    "{}: … and {} more problems of the kind \"{}\"",
                    self.path.display(),
                    n - MAX_LISTED_PER_KIND,
                    kind.label()
                );
            }
        }
        s
    }
}

/// Checks a submission file; `ids` (the test images' GalaxyIDs) adds the completeness checks.
/// Only an unreadable file is an `Err`; everything wrong inside it is in the report.
pub fn check(path: &Path, ids: Option<&[u64]>) -> Result<CheckReport> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    Ok(check_bytes(&bytes, path, ids))
}

/// Like [`check`], on the file's bytes; `path` names it in messages.
pub fn check_bytes(bytes: &[u8], path: &Path, ids: Option<&[u64]>) -> CheckReport {
    let mut rep = CheckReport {
        path: path.to_path_buf(),
        rows: 0,
        problems: Vec::new(),
        counts: BTreeMap::new(),
        warnings: Vec::new(),
    };
    if let Some(what) = gz_schema::compression(bytes) {
        rep.push(ProblemKind::Csv, None, format!("the file is {what}, not a CSV"));
        return rep;
    }
    let mut lines = gz_schema::LineCounter::new(bytes);
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let expected: Vec<&str> = std::iter::once("GalaxyID").chain(column_names()).collect();
    let mut seen: HashMap<u64, u64> = HashMap::new();
    let mut first = true;
    let mut rec = csv::StringRecord::new();
    let mut sniff = ConditionalSniff::default();
    let mut class1 = Class1Sums::default();
    let mut cells = [None; N_ANSWERS];
    loop {
        match rdr.read_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map(|p| lines.line_at(p.byte()));
                rep.push(
                    ProblemKind::Csv,
                    line,
                    format!("malformed CSV: {}", gz_schema::csv_reason(&e)),
                );
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    break;
                }
                // an unreadable first record was the header: the next one is a row, not a
                // header to check (it was called "a data row instead of the header")
                first = false;
                continue;
            }
        }
        let line = rec.position().map_or(0, |p| lines.line_at(p.byte()));
        if first {
            first = false;
            if !check_header(&rec, line, &expected, &mut rep) {
                return rep;
            }
            continue;
        }
        if rec.len() == 1 && rec[0].trim().is_empty() {
            continue;
        }
        rep.rows += 1;
        if rec.len() != expected.len() {
            rep.push(
                ProblemKind::FieldCount,
                Some(line),
                format!("expected 38 fields (GalaxyID + 37 classes), found {}", rec.len()),
            );
        }
        let id_text = rec.get(0).unwrap_or("").trim();
        match id_text.parse::<u64>() {
            Ok(id) => {
                if let Some(&first_line) = seen.get(&id) {
                    rep.push(
                        ProblemKind::DuplicateId,
                        Some(line),
                        format!("duplicate GalaxyID {id} (first on line {first_line})"),
                    );
                } else {
                    seen.insert(id, line);
                }
            }
            Err(_) => rep.push(
                ProblemKind::BadId,
                Some(line),
                format!("GalaxyID {id_text:?} is not a non-negative integer"),
            ),
        }
        cells.fill(None);
        for (k, column) in column_names().enumerate() {
            let Some(text) = rec.get(k + 1) else { break };
            let text = text.trim();
            // an empty cell is a question `gz predict --conditional` left unanswered; any other
            // unparsable cell counts as NaN (a row that sums to nothing)
            if !text.is_empty() {
                sniff.cell_text(text);
                cells[k] = Some(text.parse::<f32>().unwrap_or(f32::NAN));
            }
            match text.parse::<f64>() {
                Err(_) => rep.push(
                    ProblemKind::NotANumber,
                    Some(line),
                    format!("{column}: {text:?} is not a number"),
                ),
                Ok(v) if v.is_nan() => rep.push(ProblemKind::NaN, Some(line), format!("{column}: NaN")),
                Ok(v) if v.is_infinite() => rep.push(
                    ProblemKind::Infinite,
                    Some(line),
                    format!("{column}: {text:?} is infinite"),
                ),
                Ok(v) if !(0.0..=1.0).contains(&v) => rep.push(
                    ProblemKind::OutOfRange,
                    Some(line),
                    // as written (`1e308` was printed as its 309 digits); a long cell shortened
                    if text.len() <= 24 {
                        format!("{column}: {text} is outside [0, 1]")
                    } else {
                        format!("{column}: {v:e} is outside [0, 1]")
                    },
                ),
                Ok(_) => {}
            }
        }
        sniff.row(&cells);
        class1.row(&cells);
    }
    if sniff.verdict() {
        rep.push(ProblemKind::Conditional, None, CONDITIONAL_REASON.into());
    }
    rep.warnings.extend(class1.warning());
    if first {
        rep.push(ProblemKind::Header, Some(1), "file is empty (no header)".into());
    } else if rep.rows == 0 && ids.is_none() {
        // with ids the row count below says it; without, a header alone is no submission
        rep.push(ProblemKind::RowCount, None, "no rows after the header".into());
    }
    if let Some(ids) = ids {
        if rep.rows != ids.len() {
            rep.push(
                ProblemKind::RowCount,
                None,
                format!(
                    "{} row{}, but there {}",
                    rep.rows,
                    if rep.rows == 1 { "" } else { "s" },
                    if ids.len() == 1 {
                        "is 1 test image".to_string()
                    } else {
                        format!("are {} test images", ids.len())
                    }
                ),
            );
        }
        let want: HashSet<u64> = ids.iter().copied().collect();
        let mut extra: Vec<(u64, u64)> = seen
            .iter()
            .filter(|(id, _)| !want.contains(id))
            .map(|(&id, &l)| (l, id))
            .collect();
        extra.sort_unstable();
        for (line, id) in extra {
            rep.push(
                ProblemKind::ExtraId,
                Some(line),
                format!("GalaxyID {id} is not one of the test images"),
            );
        }
        let mut missing: Vec<u64> = want.iter().filter(|id| !seen.contains_key(id)).copied().collect();
        missing.sort_unstable();
        for id in missing {
            rep.push(ProblemKind::MissingId, None, format!("no row for test image {id}"));
        }
    }
    // Keep file order (line), whole-file problems and missing ids last.
    rep.problems.sort_by_key(|p| (p.line.is_none(), p.line));
    rep
}

/// Checks the header line; returns `false` when the rest of the file cannot be read as a
/// submission at all (another separator: every row would repeat the problem, whole).
fn check_header(rec: &csv::StringRecord, line: u64, expected: &[&str], rep: &mut CheckReport) -> bool {
    if rec.len() == 1 {
        if let Some((_, name)) = [('\t', "tab"), (';', "semicolon")]
            .into_iter()
            .find(|(c, _)| rec[0].matches(*c).count() + 1 >= expected.len())
        {
            rep.push(
                ProblemKind::Header,
                Some(line),
                format!("the file is {name}-separated; a submission's fields are separated by commas"),
            );
            return false;
        }
    }
    if rec.len() == expected.len() && rec.get(0).is_some_and(|f| f.trim().parse::<u64>().is_ok()) {
        rep.push(
            ProblemKind::Header,
            Some(line),
            "no header: the first line is a data row; a submission starts with the line GalaxyID,Class1.1,…,Class11.6"
                .into(),
        );
        return true;
    }
    if rec.len() != expected.len() {
        // pandas' `to_csv` writes its row index first, under an empty name, unless told not to
        let index = rec.len() == expected.len() + 1
            && rec
                .get(0)
                .is_some_and(|f| f.trim_start_matches('\u{feff}').trim().is_empty())
            && rec.get(1).is_some_and(|f| f.trim() == "GalaxyID");
        rep.push(
            ProblemKind::Header,
            Some(line),
            format!(
                "header has {} columns, expected {} (GalaxyID,Class1.1,…,Class11.6){}",
                rec.len(),
                expected.len(),
                if index {
                    ": the first, unnamed, is a row index (pandas writes one unless `to_csv(…, index=False)`)"
                } else {
                    ""
                }
            ),
        );
        if index {
            return false;
        }
    }
    for (i, (got, want)) in rec.iter().zip(expected).enumerate() {
        let got = if i == 0 {
            got.trim_start_matches('\u{feff}')
        } else {
            got
        };
        if got.trim() != *want {
            let hint = if i == 0 && got.trim() == "file" {
                " (rows named by file, from `gz predict --images` on images not named <GalaxyID>.jpg: a submission's \
                 rows are GalaxyIDs)"
            } else {
                ""
            };
            rep.push(
                ProblemKind::Header,
                Some(line),
                format!("header column {} is {got:?}, expected {want:?}{hint}", i + 1),
            );
        }
    }
    true
}

/// GalaxyIDs of the test images in a folder: every `<id>.jpg` ([`crate::predict::list_jpegs`]),
/// sorted. A `.jpg` whose name is not an integer id is an error (it could not be given a row).
pub fn ids_from_dir(dir: &Path) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut bad = Vec::new();
    let mut names: std::collections::HashMap<u64, PathBuf> = std::collections::HashMap::new();
    // the JPEGs `gz predict --images` reads (a folder named `123.jpg` is not a test image)
    for p in crate::predict::list_jpegs(dir)? {
        match crate::predict::galaxy_id(&p) {
            Some(id) => {
                if let Some(first) = names.insert(id, p.clone()) {
                    return Err(EvalError::BadFile {
                        path: dir.to_path_buf(),
                        reason: format!(
                            "GalaxyID {id} appears as two files, {} and {}: one file per galaxy",
                            first.display(),
                            p.display()
                        ),
                    });
                }
                ids.push(id)
            }
            None => bad.push(p.display().to_string()),
        }
    }
    if !bad.is_empty() {
        // a folder of someone's own cutouts may hold thousands: the first few, in name order
        bad.sort();
        let total = bad.len();
        let more = total.saturating_sub(5);
        bad.truncate(5);
        if more > 0 {
            bad.push(format!("and {more} more"));
        }
        return Err(EvalError::BadFile {
            path: dir.to_path_buf(),
            reason: format!(
                "{} not named <GalaxyID>.jpg: {} (a submission's rows are GalaxyIDs; `gz predict --images` names \
                 rows by file)",
                gz_schema::count(total, "JPEG"),
                bad.join(", ")
            ),
        });
    }
    if ids.is_empty() {
        return Err(EvalError::BadFile {
            path: dir.to_path_buf(),
            reason: "no <GalaxyID>.jpg files here: is it the folder of test images?".into(),
        });
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Reads a predictions CSV (same layout as a submission) leniently: the header must be exact
/// and every row an integer id plus 37 numbers, but values may be outside [0, 1], NaN or
/// duplicated — [`assemble`] decides about those. Stops at the first unparsable row.
pub fn read_predictions(path: &Path) -> Result<Solutions> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    if let Some(what) = gz_schema::compression(&bytes) {
        return Err(EvalError::BadFile {
            path: path.to_path_buf(),
            reason: format!("the file is {what}, not a CSV"),
        });
    }
    let bad = |line: u64, reason: String| EvalError::BadFile {
        path: path.to_path_buf(),
        reason: format!("line {line}: {reason}"),
    };
    let mut lines = gz_schema::LineCounter::new(&bytes);
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(&bytes[..]);
    let expected: Vec<&str> = std::iter::once("GalaxyID").chain(column_names()).collect();
    let mut out = Solutions::new();
    let mut row = [0f32; N_ANSWERS];
    let mut sniff = ConditionalSniff::default();
    let mut first = true;
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            bad(
                e.position().map_or(0, |p| lines.line_at(p.byte())),
                format!("malformed CSV: {}", gz_schema::csv_reason(&e)),
            )
        })?;
        let line = rec.position().map_or(0, |p| lines.line_at(p.byte()));
        if first {
            first = false;
            let mut rep = CheckReport {
                path: path.to_path_buf(),
                rows: 0,
                problems: Vec::new(),
                counts: BTreeMap::new(),
                warnings: Vec::new(),
            };
            let _ = check_header(&rec, line, &expected, &mut rep);
            if let Some(p) = rep.problems.first() {
                return Err(bad(line, p.message.clone()));
            }
            continue;
        }
        if rec.len() == 1 && rec[0].trim().is_empty() {
            continue;
        }
        if rec.len() != expected.len() {
            return Err(bad(line, format!("expected 38 fields, found {}", rec.len())));
        }
        let id: u64 = rec[0].trim().parse().map_err(|_| {
            bad(
                line,
                format!("GalaxyID {:?} is not a whole number from 0 to 2^64 − 1", &rec[0]),
            )
        })?;
        for (k, column) in column_names().enumerate() {
            let t = rec[k + 1].trim();
            row[k] = t.parse().map_err(|_| {
                let hint = if t.is_empty() {
                    " (an empty cell: per-question fractions from `gz predict --conditional`? a submission \
                     needs Kaggle's, written without --conditional)"
                } else {
                    ""
                };
                bad(line, format!("{column}: {t:?} is not a number{hint}"))
            })?;
            if row[k].is_infinite() && !t.to_ascii_lowercase().contains("inf") {
                // a finite number beyond f32 (1e200) read as infinity: said as written
                return Err(bad(
                    line,
                    format!("{column}: {t:?} is too large for a 32-bit float (vote fractions lie in [0, 1])"),
                ));
            }
            sniff.cell_text(t);
        }
        sniff.row(&row.map(Some));
        out.push(id, &row);
    }
    if first {
        return Err(bad(1, "file is empty (no header)".into()));
    }
    if sniff.verdict() {
        return Err(EvalError::BadFile {
            path: path.to_path_buf(),
            reason: CONDITIONAL_REASON.into(),
        });
    }
    Ok(out)
}

/// The sum of Class1's three answers over the rows: in vote fractions (Kaggle's, or a
/// model's through the tree output) it is 1 in every row, since every volunteer answers the
/// first question. Far below 1 on average, the file holds something else: the standard
/// deviations of `gz predict --spread` (legal cells, so no problem, but a warning), or the
/// all-zeros benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct Class1Sums {
    sum: f64,
    rows: usize,
}

impl Class1Sums {
    /// Adds one row (`None`: an empty cell; a row without all three is passed over).
    pub fn row(&mut self, cells: &[Option<f32>; N_ANSWERS]) {
        let q1 = gz_schema::QUESTIONS[0].answers();
        let v: Option<f64> = q1.map(|i| cells[i].map(f64::from)).sum();
        if let Some(v) = v.filter(|v| v.is_finite()) {
            self.sum += v;
            self.rows += 1;
        }
    }

    /// All the rows of `sol`.
    pub fn of(sol: &Solutions) -> Self {
        let mut s = Class1Sums::default();
        for i in 0..sol.len() {
            let mut cells = [None; N_ANSWERS];
            for (c, &v) in cells.iter_mut().zip(sol.row(i)) {
                *c = Some(v);
            }
            s.row(&cells);
        }
        s
    }

    /// The warning when the rows' mean sum is under 0.5.
    pub fn warning(&self) -> Option<String> {
        let mean = self.sum / self.rows.max(1) as f64;
        (self.rows > 0 && mean < 0.5).then(|| {
            format!(
                "Class1.1 + Class1.2 + Class1.3 average {mean:.3} over the rows; in vote fractions they sum to 1 in \
                 every row (every volunteer answers the first question): these do not look like vote fractions \
                 (a `gz predict --spread` file holds standard deviations)"
            )
        })
    }
}

/// Why a file of per-question fractions is no submission (`gz submit --pred` and `--check`).
pub const CONDITIONAL_REASON: &str = "every question's answers sum to 1 in every row: these are per-question \
                                      fractions (`gz predict --conditional`), not Kaggle's, whose answers sum to \
                                      their parent answer; predict again without --conditional";

/// Whether `rows` hold per-question fractions ([`gz_schema::conditional`]) rather than Kaggle's:
/// every question sums to 1 in every row, and somewhere a question below the first level sums
/// to 1 although its parent answer is well below 1 (impossible in a Kaggle row, where the
/// question sums to its parent; a model's free outputs do not sum to exactly 1 everywhere).
/// "Sums to 1" is within 1e-3 here; [`read_predictions`] and [`check`], which see the text,
/// widen it for values rounded to few decimals (see [`ConditionalSniff`]).
pub fn looks_conditional(rows: &Solutions) -> bool {
    let mut sniff = ConditionalSniff::default();
    for i in 0..rows.len() {
        let mut cells = [None; N_ANSWERS];
        for (c, &v) in cells.iter_mut().zip(rows.row(i)) {
            *c = Some(v);
        }
        sniff.row(&cells);
    }
    sniff.verdict()
}

/// [`looks_conditional`] one row at a time, as a file is read, tolerant of rounding.
///
/// A question whose cells are all empty is one `gz predict --conditional` left unanswered
/// (under 1 % of volunteers would reach it) and is passed over; a question with only some of
/// its cells empty is no such row. Rounding: a value written with `d` decimals is within
/// `0.5·10^-d` of the one before rounding, so a question of `n` answers of a file whose values
/// have at most `d ≥ 1` decimals "sums to 1" within `n·0.5·10^-d` (0.03 for Q11's six answers
/// at 2 decimals, 0.3 at 1), else (whole numbers, or exact values) within 1e-3. That cannot pass
/// a Kaggle row: its Q7 sums to Class1.1 and its Q2 to Class1.2, which add up to at most 1;
/// rounded sums within `t2` and `t7` of 1 need true sums within twice that, so both near 1 would
/// need `t2 + t7 ≥ 0.5` (at 1 decimal 0.1 + 0.15; at 0 decimals it would be 2.5, so whole
/// numbers keep 1e-3). A file rounded to 2 decimals whose values all end in 0 reads as 1
/// decimal and gets the wider tolerance; its sums are exactly 1 anyway (multiples of 0.1 within
/// 0.03 of 1).
#[derive(Debug, Clone)]
pub struct ConditionalSniff {
    rows: usize,
    /// Per question, the largest |sum − 1| over the rows (∞ for a non-finite sum).
    worst: [f32; N_QUESTIONS],
    /// A question with some but not all of its cells empty.
    partial: bool,
    /// A question summing to 1 (so far) below a parent answer under 0.9.
    contradicts_kaggle: bool,
    /// The most decimals any cell was written with.
    decimals: u32,
}

impl Default for ConditionalSniff {
    fn default() -> Self {
        ConditionalSniff {
            rows: 0,
            worst: [0.0; N_QUESTIONS],
            partial: false,
            contradicts_kaggle: false,
            decimals: 0,
        }
    }
}

impl ConditionalSniff {
    /// Notes how many decimals one cell's text has, trailing zeros aside (`0.25` and `0.250000`
    /// 2, `1e-5` 5, `3` and `1.0` 0): values rounded to 2 decimals and then written with 6 are
    /// still 2-decimal values.
    pub fn cell_text(&mut self, text: &str) {
        let t = text.trim().trim_start_matches(['+', '-']);
        let (mantissa, exp) = match t.find(['e', 'E']) {
            Some(i) => (&t[..i], t[i + 1..].parse::<i64>().unwrap_or(0)),
            None => (t, 0),
        };
        let after_point = mantissa
            .split_once('.')
            .map_or(0, |(_, f)| f.trim_end_matches('0').len() as i64);
        let d = (after_point - exp).clamp(0, 64) as u32;
        self.decimals = self.decimals.max(d);
    }

    /// Adds one row of 37 cells (`None`: an empty cell).
    pub fn row(&mut self, cells: &[Option<f32>; N_ANSWERS]) {
        self.rows += 1;
        for (qi, q) in gz_schema::QUESTIONS.iter().enumerate() {
            let given = q.answers().filter(|&i| cells[i].is_some()).count();
            if given == 0 {
                continue;
            }
            if given < q.answers().len() {
                self.partial = true;
                continue;
            }
            let sum: f32 = q.answers().filter_map(|i| cells[i]).sum();
            let off = if sum.is_finite() {
                (sum - 1.0).abs()
            } else {
                f32::INFINITY
            };
            self.worst[qi] = self.worst[qi].max(off);
            if q.parent.and_then(|p| cells[p]).is_some_and(|p| p < 0.9) {
                self.contradicts_kaggle = true;
            }
        }
    }

    /// How far from 1 a question of `n` answers may sum and still "sum to 1".
    fn tolerance(&self, n: usize) -> f32 {
        let rounding = if self.decimals >= 1 {
            n as f32 * 0.5 * 10f32.powi(-(self.decimals.min(30) as i32)) + 1e-6
        } else {
            0.0
        };
        rounding.max(1e-3)
    }

    /// Whether the rows so far look like per-question fractions.
    pub fn verdict(&self) -> bool {
        self.rows > 0
            && !self.partial
            && self.contradicts_kaggle
            && gz_schema::QUESTIONS
                .iter()
                .zip(&self.worst)
                .all(|(q, &w)| w <= self.tolerance(q.answers().len()))
    }
}

/// How a submission was assembled from predictions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Assembled {
    /// The final rows, sorted by id, clipped to [0, 1].
    pub rows: Solutions,
    /// Ids whose row was filled with the fill row (missing, or not finite), sorted.
    pub filled: Vec<u64>,
    /// Number of values that were clipped into [0, 1].
    pub clipped: usize,
}

/// Turns predictions into submission rows: clipped to [0, 1], sorted by id. With `ids` (the test
/// images) every id must be predicted exactly once and nothing else; a missing row or a row with
/// a non-finite value is an error, unless `fill` (the training mean) is given, which then fills
/// it and lists it in [`Assembled::filled`]. `path` names the target in errors.
pub fn assemble(pred: &Solutions, ids: Option<&[u64]>, fill: Option<&[f32]>, path: &Path) -> Result<Assembled> {
    let refuse = |reason: String| EvalError::Submission {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(f) = fill {
        if f.len() != N_ANSWERS || f.iter().any(|v| !v.is_finite()) {
            return Err(refuse(format!(
                "the fill row must be 37 finite values, got {}",
                f.len()
            )));
        }
    }
    let mut by_id: HashMap<u64, usize> = HashMap::with_capacity(pred.len());
    let mut dups = Vec::new();
    for (i, &id) in pred.ids.iter().enumerate() {
        if by_id.insert(id, i).is_some() {
            dups.push(id);
        }
    }
    if !dups.is_empty() {
        return Err(refuse(format!(
            "{} in the predictions, e.g. {}",
            counted(dups.len(), "duplicate id", "duplicate ids"),
            list(&dups)
        )));
    }
    let mut order: Vec<u64> = match ids {
        Some(ids) => {
            let want: HashSet<u64> = ids.iter().copied().collect();
            let mut extra: Vec<u64> = pred.ids.iter().filter(|id| !want.contains(id)).copied().collect();
            if !extra.is_empty() {
                extra.sort_unstable();
                return Err(refuse(format!(
                    "{} (wrong folder?), e.g. {}",
                    counted(
                        extra.len(),
                        "predicted id is not a test image",
                        "predicted ids are not test images"
                    ),
                    list(&extra)
                )));
            }
            want.into_iter().collect()
        }
        None => pred.ids.clone(),
    };
    order.sort_unstable();
    let mut out = Assembled::default();
    let mut missing = Vec::new();
    let mut nonfinite = Vec::new();
    let mut row = [0f32; N_ANSWERS];
    for id in order {
        let src = by_id.get(&id).map(|&i| pred.row(i));
        match (src, fill) {
            (Some(r), _) if r.iter().all(|v| v.is_finite()) => {
                for (o, v) in row.iter_mut().zip(r) {
                    let c = v.clamp(0.0, 1.0);
                    if c != *v {
                        out.clipped += 1;
                    }
                    *o = c;
                }
                out.rows.push(id, &row);
            }
            (src, Some(f)) => {
                out.rows.push(id, f);
                out.filled.push(id);
                let _ = src;
            }
            (Some(_), None) => nonfinite.push(id),
            (None, None) => missing.push(id),
        }
    }
    if !missing.is_empty() || !nonfinite.is_empty() {
        let mut why = Vec::new();
        if !missing.is_empty() {
            why.push(format!(
                "{} no prediction (e.g. {})",
                counted(missing.len(), "test image has", "test images have"),
                list(&missing)
            ));
        }
        if !nonfinite.is_empty() {
            why.push(format!(
                "{} NaN or infinite (e.g. {})",
                counted(nonfinite.len(), "prediction is", "predictions are"),
                list(&nonfinite)
            ));
        }
        return Err(refuse(format!(
            "{}; {} is not written (fill {} with the training mean explicitly with --fill-mean)",
            why.join("; "),
            if missing.is_empty() {
                "a submission with such rows"
            } else {
                "a short submission"
            },
            if missing.len() + nonfinite.len() == 1 {
                "that row"
            } else {
                "those rows"
            }
        )));
    }
    Ok(out)
}

/// `n` with the words that agree with it: `1 test image has`, `3 test images have`.
fn counted(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn list(ids: &[u64]) -> String {
    let mut s: Vec<String> = ids.iter().take(10).map(|i| i.to_string()).collect();
    if ids.len() > 10 {
        s.push("…".into());
    }
    s.join(", ")
}

/// Serialises rows as a submission CSV (values with 6 decimals, as Kaggle's own files).
pub fn to_csv(rows: &Solutions) -> Vec<u8> {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(64 + rows.len() * N_ANSWERS * 9);
    s.push_str(&csv_header());
    s.push('\n');
    for i in 0..rows.len() {
        let _ = write!(s, "{}", rows.ids[i]);
        for v in rows.row(i) {
            let _ = write!(s, ",{v:.6}");
        }
        s.push('\n');
    }
    s.into_bytes()
}

/// Assembles (see [`assemble`]), checks the exact bytes, then publishes them atomically.
/// Nothing is written when anything is wrong.
pub fn write_submission(path: &Path, pred: &Solutions, ids: Option<&[u64]>, fill: Option<&[f32]>) -> Result<Assembled> {
    let assembled = assemble(pred, ids, fill, path)?;
    if assembled.rows.is_empty() {
        return Err(EvalError::Submission {
            path: path.to_path_buf(),
            reason: "no rows to write".into(),
        });
    }
    let bytes = to_csv(&assembled.rows);
    let report = check_bytes(&bytes, path, ids);
    if !report.is_ok() {
        return Err(EvalError::Submission {
            path: path.to_path_buf(),
            reason: format!("the file failed its own check:\n{}", report.describe()),
        });
    }
    gz_schema::write_atomic(path, &bytes)?;
    Ok(assembled)
}

#[cfg(test)]
mod tests {

    /// Problems are named by the line an editor shows, in files ending lines with `\r\n`
    /// (Windows, Python's `csv` module) too: each was one line too low.
    #[test]
    fn problems_name_the_editors_line_whatever_ends_lines() {
        let row = |id: u64, first: &str| format!("{id},{first}{}", ",0.5".repeat(N_ANSWERS - 1));
        for end in ["\n", "\r\n"] {
            let text = [
                gz_schema::csv_header(),
                row(1, "0.5"),
                row(2, "0.5"),
                row(3, "1.5"),
                row(2, "0.5"),
                String::new(),
            ]
            .join(end);
            let rep = check_bytes(text.as_bytes(), Path::new("t.csv"), None);
            let lines: Vec<_> = rep.problems.iter().map(|p| (p.line, p.kind)).collect();
            assert_eq!(
                lines,
                [(Some(4), ProblemKind::OutOfRange), (Some(5), ProblemKind::DuplicateId)],
                "{end:?}: {}",
                rep.describe()
            );
            // a header after blank lines is named on its own line, also when it is wrong
            let late = format!("{end}{end}{}", text.replacen("Class1.2", "Class1.X", 1));
            let rep = check_bytes(late.as_bytes(), Path::new("t.csv"), None);
            assert_eq!(rep.problems[0].line, Some(3), "{end:?}: {}", rep.describe());
            // an unreadable header is one problem, not also "a data row instead of a header"
            let mut bytes = text.replacen("Class1.2", "Class1.\u{1}", 1).into_bytes();
            let at = bytes.iter().position(|&b| b == 1).unwrap();
            bytes[at] = 0xff;
            let rep = check_bytes(&bytes, Path::new("t.csv"), None);
            assert!(
                rep.problems.iter().all(|p| p.kind != ProblemKind::Header) && rep.problems[0].line == Some(1),
                "{end:?}: {}",
                rep.describe()
            );
            assert!(
                rep.problems[0].message.contains("field 3 is not UTF-8") && !rep.problems[0].message.contains("record"),
                "{}",
                rep.describe()
            );
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("p.csv");
            std::fs::write(&p, text.replace("\n3,1.5,", "\n3,x,")).unwrap();
            let e = read_predictions(&p).unwrap_err().to_string();
            assert!(e.contains("line 4: Class1.1: \"x\""), "{end:?}: {e}");
        }
    }

    #[test]
    fn a_file_keyed_prediction_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("own.csv");
        let header = gz_schema::csv_header().replacen("GalaxyID", "file", 1);
        std::fs::write(&p, format!("{header}\nNGC1300.jpg{}\n", ",0.5".repeat(N_ANSWERS))).unwrap();
        let e = read_predictions(&p).unwrap_err().to_string();
        assert!(
            e.contains("header column 1 is \"file\"") && e.contains("gz predict --images"),
            "{e}"
        );
    }

    #[test]
    fn per_question_fractions_are_told_from_kaggle_rows() {
        let mut kaggle = [0.0f32; N_ANSWERS];
        kaggle[0] = 0.3;
        kaggle[1] = 0.6;
        kaggle[2] = 0.1;
        kaggle[3] = 0.2; // Q2 sums to Class1.2 = 0.6
        kaggle[4] = 0.4;
        kaggle[5] = 0.1; // Q3 and Q4 sum to Class2.2 = 0.4
        kaggle[6] = 0.3;
        kaggle[7] = 0.25;
        kaggle[8] = 0.15;
        kaggle[9] = 0.4; // Q5 sums to 0.4
        kaggle[13] = 0.5; // Q6 sums to 1
        kaggle[14] = 0.5;
        kaggle[15] = 0.3; // Q7 sums to Class1.1 = 0.3
        kaggle[18] = 0.5; // Q8 sums to Class6.1 = 0.5
        kaggle[25] = 0.2; // Q9 sums to Class2.1 = 0.2
        kaggle[28] = 0.25; // Q10 sums to Class4.1 = 0.25
        kaggle[31] = 0.25; // Q11 sums to Class4.1
        assert!(gz_schema::check_row(&kaggle, 1e-5).is_empty());
        let mut k = Solutions::new();
        k.push(1, &kaggle);
        assert!(!looks_conditional(&k));
        let cond: Vec<f32> = gz_schema::conditional(&kaggle).iter().map(|v| v.unwrap()).collect();
        let mut c = Solutions::new();
        c.push(1, &cond);
        assert!(looks_conditional(&c));
        // one Kaggle row among them: not all rows sum to 1 per question
        c.push(2, &kaggle);
        assert!(!looks_conditional(&c));
        assert!(!looks_conditional(&Solutions::new()));
    }

    use super::*;

    /// The whole-file finding (per-question fractions) comes before the lines it explains (a
    /// `--conditional` file's empty cells, each "not a number").
    #[test]
    fn the_conditional_finding_comes_first() {
        let mut rep = CheckReport {
            path: PathBuf::from("p.csv"),
            rows: 2,
            problems: Vec::new(),
            counts: BTreeMap::new(),
            warnings: Vec::new(),
        };
        rep.push(
            ProblemKind::NotANumber,
            Some(2),
            "Class9.1: \"\" is not a number".into(),
        );
        rep.push(
            ProblemKind::NotANumber,
            Some(3),
            "Class9.1: \"\" is not a number".into(),
        );
        rep.push(ProblemKind::Conditional, None, CONDITIONAL_REASON.into());
        let d = rep.describe();
        let first = d.lines().next().unwrap();
        assert!(first.contains(CONDITIONAL_REASON), "{d}");
        assert_eq!(d.lines().count(), 3, "{d}");
        assert_eq!(
            (ProblemKind::NotANumber.counted(1), ProblemKind::MissingId.counted(8)),
            ("1 value not a number".to_string(), "8 missing GalaxyIDs".to_string())
        );
    }

    /// A predictions CSV of `rows` (`None`: an empty cell), each value with `decimals` decimals
    /// (all of them when `None`).
    fn table(rows: &[Vec<Option<f32>>], decimals: Option<usize>) -> String {
        let mut s = csv_header();
        for (i, r) in rows.iter().enumerate() {
            s.push_str(&format!("\n{}", 100 + i));
            for v in r {
                match (v, decimals) {
                    (None, _) => s.push(','),
                    (Some(v), None) => s.push_str(&format!(",{v}")),
                    (Some(v), Some(d)) => s.push_str(&format!(",{v:.d$}")),
                }
            }
        }
        s.push('\n');
        s
    }

    /// A tab- or semicolon-separated file is one problem, not one whole row per line; a file
    /// without its header is one problem, not one per column.
    #[test]
    fn another_separator_or_no_header_is_one_problem() {
        let rows = kaggle_rows(30, 5);
        let text = |sep: &str, header: bool| {
            let mut s = if header {
                csv_header().replace(',', sep) + "\n"
            } else {
                String::new()
            };
            for (i, r) in rows.iter().enumerate() {
                s.push_str(&(100 + i).to_string());
                for v in r {
                    s.push_str(&format!("{sep}{v}"));
                }
                s.push('\n');
            }
            s
        };
        for (sep, name) in [("\t", "tab"), (";", "semicolon")] {
            let rep = check_bytes(text(sep, true).as_bytes(), Path::new("t.csv"), None);
            assert_eq!(rep.total(), 1, "{}", rep.describe());
            assert!(
                rep.problems[0].message.contains(&format!("{name}-separated")),
                "{}",
                rep.describe()
            );
        }
        let rep = check_bytes(text(",", false).as_bytes(), Path::new("t.csv"), None);
        assert_eq!(rep.total(), 1, "{}", rep.describe());
        assert!(rep.problems[0].message.contains("no header"), "{}", rep.describe());
        assert!(check_bytes(text(",", true).as_bytes(), Path::new("t.csv"), None).is_ok());
        // pandas' row index in front (`to_csv` without `index=False`): one problem that says so
        let indexed: String = text(",", true)
            .lines()
            .enumerate()
            .map(|(i, l)| {
                if i == 0 {
                    format!(",{l}\n")
                } else {
                    format!("{},{l}\n", i - 1)
                }
            })
            .collect();
        let rep = check_bytes(indexed.as_bytes(), Path::new("t.csv"), None);
        assert_eq!(rep.total(), 1, "{}", rep.describe());
        assert!(rep.problems[0].message.contains("index=False"), "{}", rep.describe());
    }

    /// Rows whose Class1 answers do not sum to about 1 (standard deviations, all zeros) get a
    /// warning and no problem; vote fractions get neither.
    #[test]
    fn files_that_are_not_vote_fractions_are_warned_about() {
        let kaggle = kaggle_rows(20, 3);
        let some = |rows: &[Vec<f32>]| -> Vec<Vec<Option<f32>>> {
            rows.iter().map(|r| r.iter().map(|&v| Some(v)).collect()).collect()
        };
        let rep = check_bytes(table(&some(&kaggle), None).as_bytes(), Path::new("k.csv"), None);
        assert!(rep.is_ok() && rep.warnings.is_empty(), "{:?}", rep.warnings);
        // a spread: small values, legal cells
        let spread: Vec<Vec<f32>> = kaggle.iter().map(|r| r.iter().map(|v| v * 0.1).collect()).collect();
        let rep = check_bytes(table(&some(&spread), None).as_bytes(), Path::new("s.csv"), None);
        assert!(rep.is_ok(), "{}", rep.describe());
        assert_eq!(rep.warnings.len(), 1);
        assert!(
            rep.warnings[0].contains("average 0.100") && rep.warnings[0].contains("--spread"),
            "{:?}",
            rep.warnings
        );
        let zeros = vec![vec![0f32; N_ANSWERS]; 3];
        assert_eq!(
            check_bytes(table(&some(&zeros), None).as_bytes(), Path::new("z.csv"), None)
                .warnings
                .len(),
            1
        );
        // the same from rows read
        let sol = |rows: &[Vec<f32>]| {
            let mut s = Solutions::new();
            for (i, r) in rows.iter().enumerate() {
                s.push(100 + i as u64, r);
            }
            s
        };
        assert!(Class1Sums::of(&sol(&kaggle)).warning().is_none());
        assert!(Class1Sums::of(&sol(&spread)).warning().is_some());
        assert!(Class1Sums::of(&Solutions::new()).warning().is_none());
    }

    /// Random Kaggle rows: each question's answers split its target (1, or the parent answer)
    /// at random (a small LCG: no dependency for a test).
    fn kaggle_rows(n: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 + 0.05
        };
        (0..n)
            .map(|_| {
                let mut row = vec![0f32; N_ANSWERS];
                for (qi, q) in gz_schema::QUESTIONS.iter().enumerate() {
                    let target = gz_schema::question_target(&row, qi);
                    let w: Vec<f32> = q.answers().map(|_| next()).collect();
                    let total: f32 = w.iter().sum();
                    for (i, w) in q.answers().zip(&w) {
                        row[i] = target * w / total;
                    }
                }
                row
            })
            .collect()
    }

    /// The per-question fractions of the rows that reach every question (no empty cells).
    fn conditional_of(rows: &[Vec<f32>]) -> Vec<Vec<Option<f32>>> {
        let out: Vec<Vec<Option<f32>>> = rows
            .iter()
            .map(|r| gz_schema::conditional(r).to_vec())
            .filter(|c| c.iter().all(Option::is_some))
            .collect();
        assert!(
            out.len() >= 10,
            "{} of {} rows reach every question",
            out.len(),
            rows.len()
        );
        out
    }

    fn flagged(text: &str) -> (bool, bool) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pred.csv");
        std::fs::write(&p, text).unwrap();
        let read = match read_predictions(&p) {
            Ok(_) => false,
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("predict again without --conditional"), "{e}");
                true
            }
        };
        let r = check_bytes(text.as_bytes(), &p, None);
        let checked = r.count(ProblemKind::Conditional) == 1;
        if checked {
            assert!(
                r.describe().contains("predict again without --conditional"),
                "{}",
                r.describe()
            );
        }
        (read, checked)
    }

    /// `--check` finds per-question fractions as `--pred` does, empty cells (questions nobody
    /// reached) and all; a Kaggle file of the same galaxies is a valid submission.
    #[test]
    fn check_reports_per_question_fractions() {
        let kaggle = kaggle_rows(50, 7);
        let cond = conditional_of(&kaggle);
        let text = table(&cond, None);
        assert_eq!(flagged(&text), (true, true));
        // with questions left empty: read_predictions stops at the empty cell with its own hint
        let mut sparse = cond.clone();
        for q in [8usize, 9] {
            for i in gz_schema::QUESTIONS[q].answers() {
                sparse[3][i] = None;
            }
        }
        let text = table(&sparse, None);
        let r = check_bytes(text.as_bytes(), Path::new("q.csv"), None);
        assert_eq!(r.count(ProblemKind::Conditional), 1, "{}", r.describe());
        assert!(r.describe().contains("`gz predict --conditional`"), "{}", r.describe());
        let kaggle_text = table(
            &kaggle
                .iter()
                .map(|r| r.iter().map(|&v| Some(v)).collect())
                .collect::<Vec<_>>(),
            None,
        );
        assert_eq!(flagged(&kaggle_text), (false, false));
        assert!(check_bytes(kaggle_text.as_bytes(), Path::new("k.csv"), None).is_ok());
    }

    /// Rounded to 2 or 3 decimals, per-question fractions still are told (their sums stray by up
    /// to half a unit of the last decimal per answer); rounded Kaggle rows, random ones and the
    /// real fixture rows, are never taken for them, at any number of decimals.
    #[test]
    fn per_question_fractions_are_told_after_rounding_without_false_positives() {
        let kaggle = kaggle_rows(200, 11);
        let cond = conditional_of(&kaggle);
        // and a galaxy whose every answer is as likely as its question's others: thirds
        // ("0.33,0.33,0.33" sums to 0.99, well outside 1e-3), sixths
        let mut rounded = cond.clone();
        rounded.push(
            gz_schema::conditional(&{
                let mut k = [0f32; N_ANSWERS];
                for (qi, q) in gz_schema::QUESTIONS.iter().enumerate() {
                    let t = gz_schema::question_target(&k, qi);
                    for i in q.answers() {
                        k[i] = t / q.answers().len() as f32;
                    }
                }
                k
            })
            .to_vec(),
        );
        // (and to 1 decimal: "0.3,0.3,0.3" sums to 0.9; before, a file of 1-decimal values kept
        // the strict tolerance and passed as a submission)
        for d in [1, 2, 3] {
            assert_eq!(flagged(&table(&rounded, Some(d))), (true, true), "{d} decimals");
        }
        // rounded to 2 decimals, every value a multiple of 0.1 ("0.30"): read as 1 decimal
        let tenths: Vec<Vec<Option<f32>>> = rounded
            .iter()
            .map(|r| {
                let mut r = r.clone();
                for q in gz_schema::QUESTIONS {
                    // each question's shares in tenths, summing to ten of them
                    let mut left = 10;
                    let answers: Vec<usize> = q.answers().collect();
                    for (k, &i) in answers.iter().enumerate() {
                        let t = if k + 1 == answers.len() {
                            left
                        } else {
                            ((r[i].unwrap() * 10.0).round() as i32).min(left)
                        };
                        left -= t;
                        r[i] = Some(t as f32 / 10.0);
                    }
                }
                r
            })
            .collect();
        assert_eq!(flagged(&table(&tenths, Some(2))), (true, true), "tenths at 2 decimals");
        // rounded to 2 decimals, then written with 6 ("0.330000")
        let padded: Vec<Vec<Option<f32>>> = rounded
            .iter()
            .map(|r| r.iter().map(|v| v.map(|v| (v * 100.0).round() / 100.0)).collect())
            .collect();
        assert_eq!(flagged(&table(&padded, Some(6))), (true, true), "padded");
        let as_cells = |rows: &[Vec<f32>]| -> Vec<Vec<Option<f32>>> {
            rows.iter().map(|r| r.iter().map(|&v| Some(v)).collect()).collect()
        };
        for d in [0, 1, 2, 3, 6] {
            for seed in 0..20 {
                let rows = as_cells(&kaggle_rows(20, seed));
                assert_eq!(
                    flagged(&table(&rows, Some(d))),
                    (false, false),
                    "seed {seed}, {d} decimals"
                );
            }
        }
        // the real rows, rounded as a spreadsheet would
        let real = "100008,0.383147,0.616853,0,0,0.616853,0.038452149,0.578400851,0.418397819,0.198455181,0,\
                    0.104752126,0.512100874,0,0.054453,0.945547,0.201462524,0.181684476,0,0,0.0272265,0,0.0272265,0,\
                    0,0,0,0,0,0.279952491,0.138445328,0,0,0.092885571,0,0,0,0.325512248";
        let vals: Vec<f32> = real.split(',').skip(1).map(|v| v.parse().unwrap()).collect();
        for d in [1, 2, 3] {
            assert_eq!(
                flagged(&table(&as_cells(std::slice::from_ref(&vals)), Some(d))),
                (false, false),
                "{d}"
            );
        }
        // a model's outputs that are fractions of one question only (a row with a question
        // that does not sum to 1) are not taken for them either
        let mut one_off = rounded.clone();
        one_off[0][0] = Some(0.9);
        assert_eq!(flagged(&table(&one_off, Some(2))), (false, false));
    }

    fn sol(ids: &[u64], v: f32) -> Solutions {
        let mut s = Solutions::new();
        for &id in ids {
            s.push(id, &[v; N_ANSWERS]);
        }
        s
    }

    #[test]
    fn writes_a_clipped_sorted_complete_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub.csv");
        let mut pred = sol(&[3, 1], 0.5);
        pred.values[0] = 1.7;
        pred.values[1] = -0.2;
        let a = write_submission(&p, &pred, Some(&[1, 3]), None).unwrap();
        assert_eq!(a.clipped, 2);
        let text = std::fs::read_to_string(&p).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next().unwrap(), csv_header());
        assert!(lines.next().unwrap().starts_with("1,0.500000,"));
        assert!(lines.next().unwrap().starts_with("3,1.000000,0.000000,0.500000"));
        assert_eq!(lines.next(), None);
        assert!(check(&p, Some(&[1, 3])).unwrap().is_ok());
        let back = gz_schema::read_solutions(&p).unwrap();
        assert_eq!(back.ids, vec![1, 3]);
    }

    /// The row-count problem counts in words that agree with 1: "1 rows, but there are 1 test
    /// images" read wrong on the tiny sets tests and first tries use.
    #[test]
    fn a_row_count_of_one_is_said_in_the_singular() {
        let said = |rows: &[u64], ids: &[u64]| {
            let text = String::from_utf8(to_csv(&sol(rows, 0.5))).unwrap();
            let r = check_bytes(text.as_bytes(), Path::new("s.csv"), Some(ids));
            r.problems
                .iter()
                .find(|p| p.kind == ProblemKind::RowCount)
                .map(|p| p.message.clone())
        };
        assert_eq!(
            said(&[1], &[1, 2]).as_deref(),
            Some("1 row, but there are 2 test images")
        );
        assert_eq!(
            said(&[1, 2], &[1]).as_deref(),
            Some("2 rows, but there is 1 test image")
        );
        assert_eq!(said(&[1], &[1]), None);
    }

    #[test]
    fn refuses_short_or_nan_unless_filled() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub.csv");
        let pred = sol(&[1, 2], 0.5);
        let e = write_submission(&p, &pred, Some(&[1, 2, 3]), None).unwrap_err();
        assert!(e.to_string().contains("1 test image has no prediction (e.g. 3)"), "{e}");
        assert!(!p.exists());
        let mut nan = pred.clone();
        nan.values[40] = f32::NAN;
        let e = write_submission(&p, &nan, Some(&[1, 2]), None).unwrap_err();
        assert!(
            e.to_string().contains("1 prediction is NaN or infinite (e.g. 2)"),
            "{e}"
        );
        assert!(!p.exists());
        let e = write_submission(&p, &pred, Some(&[1]), None).unwrap_err();
        assert!(
            e.to_string()
                .contains("1 predicted id is not a test image (wrong folder?), e.g. 2"),
            "{e}"
        );
        let e = write_submission(&p, &sol(&[1, 1], 0.5), None, None).unwrap_err();
        assert!(
            e.to_string().contains("1 duplicate id in the predictions, e.g. 1"),
            "{e}"
        );

        let fill = [0.25; N_ANSWERS];
        let a = write_submission(&p, &nan, Some(&[1, 2, 3]), Some(&fill)).unwrap();
        assert_eq!(a.filled, vec![2, 3]);
        let back = gz_schema::read_solutions(&p).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back.row(2), &fill);
        assert_eq!(back.row(0)[0], 0.5);
    }

    /// A value out of range is quoted as written, a long one shortened (`1e308` was printed as
    /// its 309 digits).
    #[test]
    fn out_of_range_values_are_quoted_short() {
        let row = |id: u32, v: &str| format!("{id}{}", format!(",{v}").repeat(N_ANSWERS));
        let long = format!("1{}", "0".repeat(40));
        for (v, shown) in [("1e308", "1e308"), (long.as_str(), "1e40")] {
            let text = [csv_header(), row(10, v)].join("\n");
            let d = check_bytes(text.as_bytes(), Path::new("s.csv"), None).describe();
            assert!(
                d.contains(&format!("line 2: Class1.1: {shown} is outside [0, 1]")),
                "{d}"
            );
            assert!(d.lines().all(|l| l.len() < 120), "{d}");
        }
    }

    #[test]
    fn check_lists_every_problem_with_its_line() {
        let h = csv_header();
        let row = |id: &str, v: &str| format!("{id}{}", format!(",{v}").repeat(N_ANSWERS));
        let text = [
            h.replace("Class2.1", "Class2.x"),
            row("10", "0.5"),         // line 2 ok
            row("11", "NaN"),         // line 3: 37 NaN
            row("10", "0.5"),         // line 4: duplicate of line 2
            row("12", "1.5"),         // line 5: out of range ×37
            "13,0.5,0.5".to_string(), // line 6: field count
            row("x7", "0.5"),         // line 7: bad id
            row("14", "abc"),         // line 8: not a number ×37
            row("99", "inf"),         // line 9: extra id, infinite
        ]
        .join("\n");
        let ids = [10, 11, 12, 13, 14, 15];
        let r = check_bytes(text.as_bytes(), Path::new("s.csv"), Some(&ids));
        assert!(!r.is_ok());
        assert_eq!(r.rows, 8);
        assert_eq!(r.count(ProblemKind::Header), 1);
        assert_eq!(r.count(ProblemKind::NaN), 37);
        assert_eq!(r.count(ProblemKind::DuplicateId), 1);
        assert_eq!(r.count(ProblemKind::OutOfRange), 37);
        assert_eq!(r.count(ProblemKind::FieldCount), 1);
        assert_eq!(r.count(ProblemKind::BadId), 1);
        assert_eq!(r.count(ProblemKind::NotANumber), 37);
        assert_eq!(r.count(ProblemKind::Infinite), 37);
        assert_eq!(r.count(ProblemKind::ExtraId), 1);
        assert_eq!(r.count(ProblemKind::MissingId), 1); // 15
        assert_eq!(r.count(ProblemKind::RowCount), 1);
        let listed_nan = r.problems.iter().filter(|p| p.kind == ProblemKind::NaN).count();
        assert_eq!(listed_nan, MAX_LISTED_PER_KIND);
        let d = r.describe();
        for needle in [
            "line 1: header column 5 is \"Class2.x\", expected \"Class2.1\"",
            "line 3: Class1.1: NaN",
            "line 4: duplicate GalaxyID 10 (first on line 2)",
            "line 5: Class1.1: 1.5 is outside [0, 1]",
            "line 6: expected 38 fields",
            "line 7: GalaxyID \"x7\"",
            "line 8: Class1.1: \"abc\" is not a number",
            "line 9: GalaxyID 99 is not one of the test images",
            "no row for test image 15",
            "8 rows, but there are 6 test images",
            "and 17 more problems of the kind \"NaN\"",
        ] {
            assert!(d.contains(needle), "missing {needle:?} in\n{d}");
        }
        let empty = check_bytes(b"", Path::new("e.csv"), None);
        assert_eq!(empty.count(ProblemKind::Header), 1);
        // a compressed file is one problem that says so, not a page of CSV errors
        let gz = check_bytes(&[0x1f, 0x8b, 8, 0, 0, 0], Path::new("s.csv.gz"), Some(&[1, 2]));
        assert_eq!(gz.total(), 1, "{}", gz.describe());
        assert!(gz.describe().contains("gzip-compressed"), "{}", gz.describe());
        let header_only = format!(
            "{}\n",
            std::iter::once("GalaxyID")
                .chain(column_names())
                .collect::<Vec<_>>()
                .join(",")
        );
        let r = check_bytes(header_only.as_bytes(), Path::new("h.csv"), None);
        assert_eq!(r.count(ProblemKind::RowCount), 1, "{:?}", r.problems);
    }

    #[test]
    fn ids_from_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["200.jpg", "100.jpg", "notes.txt"] {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        // a folder so named is not a test image
        std::fs::create_dir(dir.path().join("300.jpg")).unwrap();
        assert_eq!(ids_from_dir(dir.path()).unwrap(), vec![100, 200]);
        let none = tempfile::tempdir().unwrap();
        std::fs::write(none.path().join("notes.txt"), "x").unwrap();
        let err = ids_from_dir(none.path()).unwrap_err().to_string();
        assert!(err.contains("no <GalaxyID>.jpg files"), "{err}");
        std::fs::write(dir.path().join("abc.jpg"), b"x").unwrap();
        assert!(ids_from_dir(dir.path()).unwrap_err().to_string().contains("abc.jpg"));
        // many: the first five by name, and how many more
        for i in 0..20 {
            std::fs::write(dir.path().join(format!("m{i:02}.jpg")), b"x").unwrap();
        }
        let e = ids_from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("21 JPEGs not named") && e.contains("m03.jpg, and 16 more"),
            "{e}"
        );
        assert!(!e.contains("m04.jpg"), "{e}");
        for i in 0..20 {
            std::fs::remove_file(dir.path().join(format!("m{i:02}.jpg"))).unwrap();
        }
        // one galaxy, two files: the error names the id and both files
        std::fs::remove_file(dir.path().join("abc.jpg")).unwrap();
        std::fs::write(dir.path().join("0100.jpg"), b"x").unwrap();
        let e = ids_from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("GalaxyID 100") && e.contains("0100.jpg") && e.contains("/100.jpg"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod damage_tests {
    use super::*;

    /// Byte damage to a valid submission (overwrites, cuts, insertions of CSV-significant
    /// bytes, a BOM, CRLF, quotes, NUL, non-UTF-8): the checker, the predictions reader, the
    /// solutions reader and `assemble` report or accept, never panic. `GZ_FUZZ=N` runs N
    /// mutations (default 300).
    #[test]
    fn damaged_csvs_never_panic() {
        let per: usize = std::env::var("GZ_FUZZ")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        let mut sol = Solutions::new();
        for i in 0..6u64 {
            let row: Vec<f32> = (0..N_ANSWERS)
                .map(|k| ((i as usize * 7 + k) % 10) as f32 / 10.0)
                .collect();
            sol.push(100_000 + i, &row);
        }
        let good = to_csv(&sol);
        let ids: Vec<u64> = (100_000..100_006).collect();
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("s.csv");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pieces: [&[u8]; 14] = [
            b",",
            b"\n",
            b"\r\n",
            b"\"",
            b"\xEF\xBB\xBF",
            b"\0",
            b"\xFF\xFE",
            b"NaN",
            b"-inf",
            b"1e999",
            b"18446744073709551616",
            b"-1",
            b" ",
            b"Class1.1",
        ];
        for k in 0..per {
            let mut b = good.clone();
            for _ in 0..(1 + next() % 3) {
                let i = (next() as usize) % (b.len() + 1);
                match next() % 5 {
                    0 if i < b.len() => b[i] = next() as u8,
                    1 => b.truncate(i),
                    2 => {
                        let e = (i + 1 + (next() as usize) % 40).min(b.len());
                        b.drain(i.min(e)..e);
                    }
                    _ => b
                        .splice(i..i, pieces[(next() as usize) % pieces.len()].iter().copied())
                        .for_each(drop),
                }
            }
            std::fs::write(&path, &b).unwrap();
            let r = std::panic::catch_unwind(|| {
                let _ = check_bytes(&b, &path, Some(&ids)).describe();
                let _ = check_bytes(&b, &path, None).is_ok();
                if let Ok(p) = read_predictions(&path) {
                    let _ = assemble(&p, Some(&ids), None, &path);
                    let _ = looks_conditional(&p);
                }
                let _ = gz_schema::read_solutions(&path);
            });
            if r.is_err() {
                let keep = std::env::temp_dir().join(format!("gz-csv-fuzz-{k}.csv"));
                std::fs::write(&keep, &b).unwrap();
                panic!("mutation {k} panicked; bytes in {}", keep.display());
            }
        }
    }
}
