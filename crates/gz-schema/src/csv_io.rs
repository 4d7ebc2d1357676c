//! Reading and writing Kaggle solution and submission CSVs (`GalaxyID,Class1.1,…,Class11.6`).
//!
//! Both files share one format: a header naming exactly the 38 columns, then one row per galaxy
//! with an integer id and 37 finite values in [0, 1]. Every problem is reported with the file,
//! the line (1-based, the header is line 1) and the column. Writing is atomic: a temporary file
//! in the same directory is written, fsynced and renamed over the target.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{column_names, csv_header, N_ANSWERS};

/// Errors from reading or writing a solutions / submission CSV.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The CSV itself is malformed (quoting, UTF-8, …).
    #[error("{path}:{line}: malformed CSV: {}", csv_reason(source))]
    Csv {
        path: PathBuf,
        line: u64,
        #[source]
        source: csv::Error,
    },
    /// The header is not exactly `GalaxyID,Class1.1,…,Class11.6`.
    #[error("{path}:{line}: bad header: {reason}")]
    Header { path: PathBuf, line: u64, reason: String },
    /// A row has the wrong number of fields.
    #[error("{path}:{line}: expected 38 fields (GalaxyID + 37 classes), found {found}")]
    FieldCount { path: PathBuf, line: u64, found: usize },
    /// One cell is not acceptable.
    #[error("{path}:{line}: column {column}: {reason}")]
    Cell {
        path: PathBuf,
        line: u64,
        column: String,
        reason: String,
    },
    /// The same GalaxyID appears twice.
    #[error("{path}:{line}: duplicate GalaxyID {id} (first seen on line {first_line})")]
    DuplicateId {
        path: PathBuf,
        line: u64,
        id: u64,
        first_line: u64,
    },
}

/// What is wrong with a CSV, without the `csv` crate's own record and line numbers (its lines
/// are not an editor's: [`LineCounter`] gives those): bytes that are not UTF-8 are named as such.
pub fn csv_reason(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { err, .. } => format!(
            "field {} is not UTF-8 text (a file saved as UTF-16 or in a legacy encoding? save it as UTF-8)",
            err.field() + 1
        ),
        csv::ErrorKind::Io(io) => format!("reading: {io}"),
        _ => e.to_string(),
    }
}

/// Galaxy ids with a dense row-major `n × 37` matrix of values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Solutions {
    /// GalaxyIDs in file order.
    pub ids: Vec<u64>,
    /// Row-major values, `ids.len() * 37` long.
    pub values: Vec<f32>,
}

impl Solutions {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The 37 values of row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * N_ANSWERS..(i + 1) * N_ANSWERS]
    }

    /// Appends a row. Panics if `row.len() != 37` (caller bug).
    pub fn push(&mut self, id: u64, row: &[f32]) {
        assert_eq!(row.len(), N_ANSWERS);
        self.ids.push(id);
        self.values.extend_from_slice(row);
    }

    /// The rows in ascending GalaxyID order (stable for equal ids).
    pub fn sorted_by_id(&self) -> Solutions {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&i| self.ids[i]);
        let mut out = Solutions::new();
        for i in order {
            out.push(self.ids[i], self.row(i));
        }
        out
    }

    /// Map from GalaxyID to row index.
    pub fn index(&self) -> HashMap<u64, usize> {
        self.ids.iter().enumerate().map(|(i, &id)| (id, i)).collect()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SchemaError + '_ {
    move |source| SchemaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a compressed file is, by its first bytes: a CSV cannot start with these.
pub fn compression(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [0x1f, 0x8b, ..] => Some("gzip-compressed (decompress it first: gunzip)"),
        [b'P', b'K', 3, 4, ..] => Some("a zip archive (extract the CSV first: unzip)"),
        [b'B', b'Z', b'h', ..] => Some("bzip2-compressed (decompress it first: bunzip2)"),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some("zstd-compressed (decompress it first: unzstd)"),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Some("xz-compressed (decompress it first: unxz)"),
        _ => None,
    }
}

/// Reads a solutions or submission CSV, validating header, field count, every cell
/// (integer id; finite value in [0, 1]) and id uniqueness.
pub fn read_solutions(path: &Path) -> Result<Solutions, SchemaError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    read_solutions_from(file, path)
}

/// The line numbers of a CSV's records as an editor shows them, from their byte offsets
/// (`csv::Position::byte`). The `csv` crate's own `Position::line` counts a record ended by
/// `\r\n` on the line it ended (its `\n` is read as the next record begins), so every line of
/// a file written on Windows or by Python's `csv` module came out one too low, and a blank
/// line or a lone `\r` threw it off too. Offsets must be asked in increasing order to be
/// counted once (an earlier one restarts the count).
pub struct LineCounter<'a> {
    bytes: &'a [u8],
    pos: usize,
    line: u64,
}

impl<'a> LineCounter<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0, line: 1 }
    }

    /// The 1-based line of the record that starts at `byte` (past any line ends there: a
    /// record's offset may point at the end of the line before it).
    pub fn line_at(&mut self, byte: u64) -> u64 {
        let b = self.bytes;
        let mut start = usize::try_from(byte).unwrap_or(usize::MAX).min(b.len());
        while start < b.len() && matches!(b[start], b'\r' | b'\n') {
            start += 1;
        }
        if start < self.pos {
            (self.pos, self.line) = (0, 1);
        }
        let mut i = self.pos;
        while i < start {
            match b[i] {
                b'\n' => self.line += 1,
                // `\r\n` is one line end, a lone `\r` one too
                b'\r' if b.get(i + 1) != Some(&b'\n') => self.line += 1,
                _ => {}
            }
            i += 1;
        }
        self.pos = start;
        self.line
    }
}

/// Like [`read_solutions`], from any reader; `path` is used in messages only.
pub fn read_solutions_from<R: std::io::Read>(mut reader: R, path: &Path) -> Result<Solutions, SchemaError> {
    // whole, for the line numbers (`LineCounter`): a Kaggle-size labels file is about 20 MB
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).map_err(io_err(path))?;
    if let Some(what) = compression(&bytes) {
        // (parsed, it was a long complaint about UTF-8 or the field count)
        return Err(SchemaError::Header {
            path: path.to_path_buf(),
            line: 1,
            reason: format!("the file is {what}, not a CSV"),
        });
    }
    let mut lines = LineCounter::new(&bytes);
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(&bytes[..]);
    let mut records = rdr.records();
    let csv_err = |line: u64, source: csv::Error| SchemaError::Csv {
        path: path.to_path_buf(),
        line,
        source,
    };

    // header
    let header = match records.next() {
        None => {
            return Err(SchemaError::Header {
                path: path.to_path_buf(),
                line: 1,
                reason: "file is empty".into(),
            });
        }
        Some(r) => r.map_err(|e| {
            let line = e.position().map_or(1, |p| lines.line_at(p.byte()));
            csv_err(line, e)
        })?,
    };
    // (blank lines before it are skipped by the reader, not by an editor's numbering)
    let header_line = header.position().map_or(1, |p| lines.line_at(p.byte()));
    let expected: Vec<&str> = std::iter::once("GalaxyID").chain(column_names()).collect();
    if header.len() != expected.len() {
        // one field holding the columns with another separator between them
        let sep = [('\t', "tab"), (';', "semicolon")]
            .into_iter()
            .find(|(c, _)| header.len() == 1 && header[0].matches(*c).count() + 1 >= expected.len());
        return Err(SchemaError::Header {
            path: path.to_path_buf(),
            line: header_line,
            reason: match sep {
                Some((_, name)) => format!("the file is {name}-separated; the columns must be separated by commas"),
                None => format!("expected {} columns, found {}", expected.len(), header.len()),
            },
        });
    }
    for (i, (got, want)) in header.iter().zip(&expected).enumerate() {
        // tolerate a UTF-8 byte-order mark on the first cell
        let got = if i == 0 {
            got.trim_start_matches('\u{feff}')
        } else {
            got
        };
        if got.trim() != *want {
            return Err(SchemaError::Header {
                path: path.to_path_buf(),
                line: header_line,
                reason: format!("column {} is {:?}, expected {:?}", i + 1, got, want),
            });
        }
    }

    let mut out = Solutions::new();
    let mut seen: HashMap<u64, u64> = HashMap::new();
    let mut row = [0f32; N_ANSWERS];
    for rec in records {
        let rec = rec.map_err(|e| {
            let line = e.position().map_or(0, |p| lines.line_at(p.byte()));
            csv_err(line, e)
        })?;
        let line = rec.position().map_or(0, |p| lines.line_at(p.byte()));
        // skip fully blank lines (a trailing newline is not a row)
        if rec.len() == 1 && rec[0].trim().is_empty() {
            continue;
        }
        if rec.len() != expected.len() {
            return Err(SchemaError::FieldCount {
                path: path.to_path_buf(),
                line,
                found: rec.len(),
            });
        }
        let cell_err = |column: &str, reason: String| SchemaError::Cell {
            path: path.to_path_buf(),
            line,
            column: column.to_string(),
            reason,
        };
        let id_text = rec[0].trim();
        let id: u64 = id_text
            .parse()
            .map_err(|_| cell_err("GalaxyID", format!("{id_text:?} is not a non-negative integer id")))?;
        if let Some(&first_line) = seen.get(&id) {
            return Err(SchemaError::DuplicateId {
                path: path.to_path_buf(),
                line,
                id,
                first_line,
            });
        }
        seen.insert(id, line);
        for (k, column) in column_names().enumerate() {
            let text = rec[k + 1].trim();
            let v: f32 = text
                .parse()
                .map_err(|_| cell_err(column, format!("{text:?} is not a number")))?;
            if !v.is_finite() {
                return Err(cell_err(column, format!("{text:?} is not finite")));
            }
            if !(0.0..=1.0).contains(&v) {
                return Err(cell_err(column, format!("{v} is outside [0, 1]")));
            }
            row[k] = v;
        }
        out.push(id, &row);
    }
    Ok(out)
}

/// Writes `sol` as a solutions/submission CSV atomically (temp file, fsync, rename).
/// Values are written as they are; clipping is the caller's decision.
pub fn write_solutions(path: &Path, sol: &Solutions) -> Result<(), SchemaError> {
    let mut text = String::with_capacity(64 + sol.len() * N_ANSWERS * 10);
    text.push_str(&csv_header());
    text.push('\n');
    for i in 0..sol.len() {
        use std::fmt::Write as _;
        let _ = write!(text, "{}", sol.ids[i]);
        for v in sol.row(i) {
            let _ = write!(text, ",{}", v);
        }
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename. A symbolic
/// link is followed (its target is replaced, not the link); a path that exists but is not a
/// regular file (a directory, a device such as `/dev/full`, a pipe) is refused, since the
/// rename would replace it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SchemaError> {
    stage_atomic(path, bytes)?.commit()
}

/// The first step of [`write_atomic`]: the temporary file written and synced beside its
/// target, not yet renamed into place. For outputs that must appear together: stage each,
/// then [`Staged::commit`] each; one that cannot be staged (a full disk) leaves none written.
/// Dropped uncommitted, the temporary file is removed.
#[derive(Debug)]
#[must_use = "a staged file is removed unless committed"]
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl Staged {
    /// Renames the staged file into place.
    pub fn commit(mut self) -> Result<(), SchemaError> {
        std::fs::rename(&self.tmp, &self.path).map_err(|source| SchemaError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// How long a temporary of a process that does not run here is kept: a writer in another
/// process namespace sharing the folder (another container) looks dead by its id, but its
/// temporary lives only for the seconds of one write.
const DEAD_TEMPORARY_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes the temporaries `.NAME.<pid>.tmp` of `name` in `dir` that a killed writer left (its
/// process no longer runs, and the file is older than [`DEAD_TEMPORARY_AGE`]): each write of
/// the file tidies what an earlier one could not. A live writer's is left alone; nothing else
/// is touched.
fn remove_dead_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}.");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > DEAD_TEMPORARY_AGE);
        if old && pid != std::process::id() && !crate::process::process_alive(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Stages `bytes` for `path` (see [`Staged`]; checks and links as [`write_atomic`]).
pub fn stage_atomic(path: &Path, bytes: &[u8]) -> Result<Staged, SchemaError> {
    stage_atomic_via(path, bytes, 0)
}

/// [`stage_atomic`] after following `links` symbolic links.
fn stage_atomic_via(path: &Path, bytes: &[u8], links: usize) -> Result<Staged, SchemaError> {
    let io = |source| SchemaError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path).map_err(io)?;
            let target = match path.parent() {
                Some(dir) if target.is_relative() => dir.join(target),
                _ => target,
            };
            if links >= 16 {
                return Err(io(std::io::Error::other("too many levels of symbolic links")));
            }
            return stage_atomic_via(&target, bytes, links + 1);
        }
        if !meta.is_file() {
            return Err(io(std::io::Error::other(
                "exists and is not a regular file (a directory or a device): refusing to replace it",
            )));
        }
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Some(file) = dir.ancestors().find(|a| a.is_file()) {
        return Err(SchemaError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!("{} is a file, not a folder", file.display())),
        });
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    remove_dead_temporaries(dir, &name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let staged = Staged {
        tmp,
        path: path.to_path_buf(),
        committed: false,
    };
    let result = (|| {
        let mut f = std::fs::File::create(&staged.tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    // (dropped on an error: the temporary file goes)
    result.map_err(|source| SchemaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(staged)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compressed file is said to be one, on line 1 (it was a long complaint about UTF-8).
    #[test]
    fn a_compressed_file_is_named_so() {
        let e = read_solutions_from(&[0x1f, 0x8b, 8, 0, 0xff, 0xfe][..], Path::new("l.csv.gz"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "l.csv.gz:1: bad header: the file is gzip-compressed (decompress it first: gunzip), not a CSV"
        );
    }

    /// A killed writer's temporary is removed by the next write of the same file; a live
    /// writer's, a recent one's, another file's and a look-alike are kept.
    #[test]
    fn a_write_removes_a_killed_writers_temporary() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("p.csv");
        // a pid far above any pid_max: no such process
        let dead = t.path().join(".p.csv.4294967290.tmp");
        let live = t
            .path()
            .join(format!(".p.csv.{}.tmp", std::os::unix::process::parent_id()));
        let other = t.path().join(".q.csv.4294967290.tmp");
        let odd = t.path().join(".p.csv.x4294967290.tmp");
        // a dead id's, but written a moment ago (a writer in another container): kept
        let fresh = t.path().join(".p.csv.4294967291.tmp");
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for f in [&dead, &live, &other, &odd, &fresh] {
            std::fs::write(f, b"partial").unwrap();
            if *f != fresh {
                let file = std::fs::File::options().write(true).open(f).unwrap();
                file.set_modified(an_hour_ago).unwrap();
            }
        }
        write_atomic(&out, b"whole").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"whole");
        assert!(!dead.exists(), "a dead writer's temporary stays");
        for f in [&live, &other, &odd, &fresh] {
            assert!(f.exists(), "{} removed", f.display());
        }
    }

    fn parse(text: &str) -> Result<Solutions, SchemaError> {
        read_solutions_from(text.as_bytes(), Path::new("t.csv"))
    }

    fn good_row(id: u64) -> String {
        let mut row = [0f32; N_ANSWERS];
        row[0] = 1.0;
        row[crate::answer_index(7, 1)] = 1.0;
        row[crate::answer_index(6, 2)] = 1.0;
        let mut s = id.to_string();
        for v in row {
            s.push_str(&format!(",{v}"));
        }
        s
    }

    #[test]
    fn rows_sort_by_id_numerically() {
        let mut s = Solutions::new();
        for (id, v) in [(555u64, 0.1f32), (100018, 0.2), (999, 0.3), (712, 0.4)] {
            s.push(id, &[v; N_ANSWERS]);
        }
        let t = s.sorted_by_id();
        assert_eq!(t.ids, vec![555, 712, 999, 100018]);
        assert_eq!(t.row(1), &[0.4; N_ANSWERS][..]);
        assert_eq!(t.row(3), &[0.2; N_ANSWERS][..]);
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.csv");
        let mut sol = Solutions::new();
        let mut row = [0f32; N_ANSWERS];
        for (i, v) in row.iter_mut().enumerate() {
            *v = i as f32 / 37.0 + 0.000_123;
        }
        sol.push(100008, &row);
        row[3] = 0.0;
        sol.push(7, &row);
        write_solutions(&p, &sol).unwrap();
        let back = read_solutions(&p).unwrap();
        assert_eq!(back, sol);
    }

    #[test]
    fn bad_inputs_name_line_and_column() {
        let h = csv_header();
        let ok = format!("{h}\n{}\n", good_row(1));
        assert_eq!(parse(&ok).unwrap().len(), 1);

        let e = parse(&ok.replace("GalaxyID", "Id")).unwrap_err();
        assert!(matches!(e, SchemaError::Header { .. }), "{e}");
        let e = parse(&ok.replace("Class11.6", "Class11.7")).unwrap_err();
        assert!(e.to_string().contains("Class11.7"), "{e}");
        let e = parse("").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");

        let short = format!("{h}\n{}\n{}\n", good_row(1), "2,0.5,0.5");
        let e = parse(&short).unwrap_err();
        assert!(matches!(e, SchemaError::FieldCount { line: 3, found: 3, .. }), "{e}");

        let nonnum = format!("{h}\n{}\n", good_row(1).replacen(",1,", ",abc,", 1));
        let e = parse(&nonnum).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("t.csv:2") && s.contains("Class1.1") && s.contains("abc"),
            "{s}"
        );

        for bad in ["NaN", "inf", "1.5", "-0.1"] {
            let t = format!("{h}\n{}\n", good_row(1).replacen(",1,", &format!(",{bad},"), 1));
            let e = parse(&t).unwrap_err();
            assert!(matches!(e, SchemaError::Cell { line: 2, .. }), "{bad}: {e}");
        }

        let badid = format!("{h}\n{}\n", good_row(1).replacen('1', "x1", 1));
        assert!(parse(&badid).unwrap_err().to_string().contains("GalaxyID"));

        let dup = format!("{h}\n{}\n{}\n{}\n", good_row(5), good_row(6), good_row(5));
        let e = parse(&dup).unwrap_err();
        assert!(
            matches!(
                e,
                SchemaError::DuplicateId {
                    line: 4,
                    id: 5,
                    first_line: 2,
                    ..
                }
            ),
            "{e}"
        );
    }

    /// Line numbers as an editor shows them, whatever ends the lines: a file written on
    /// Windows or by Python's `csv` module (`\r\n`) had every line after the header named one
    /// too low, a blank line shifted the rest, a lone `\r` counted nothing.
    #[test]
    fn lines_are_counted_whatever_ends_them() {
        let h = csv_header();
        for end in ["\n", "\r\n", "\r"] {
            let rows = [good_row(1), good_row(2), good_row(3).replacen(",1,", ",abc,", 1)];
            // line 1 the header, 2–3 good rows, 4 blank, 5 the bad row
            let t = format!("{h}{end}{}{end}{}{end}{end}{}{end}", rows[0], rows[1], rows[2]);
            let e = parse(&t).unwrap_err();
            assert!(matches!(e, SchemaError::Cell { line: 5, .. }), "{end:?}: {e}");
            let t = format!("{h}{end}{}{end}{}{end}{}{end}", good_row(7), good_row(8), good_row(7));
            let e = parse(&t).unwrap_err();
            assert!(
                matches!(
                    e,
                    SchemaError::DuplicateId {
                        line: 4,
                        first_line: 2,
                        ..
                    }
                ),
                "{end:?}: {e}"
            );
        }
        // the header after two blank lines is on line 3; bytes that are not UTF-8 are named
        // so, with the editor's line alone (the csv crate's own "record 2 (line 1, …)" is gone)
        let t = format!("\r\n\r\n{}\r\n{}\r\n", h.replace("Class1.2", "Class1.X"), good_row(1));
        assert!(matches!(parse(&t).unwrap_err(), SchemaError::Header { line: 3, .. }));
        let mut bytes = format!("{h}\r\n{}\r\n", good_row(1)).into_bytes();
        bytes.extend_from_slice(b"2,\xff");
        bytes.extend_from_slice(",0".repeat(N_ANSWERS - 1).as_bytes());
        let e = read_solutions_from(&bytes[..], Path::new("t.csv"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("t.csv:3: malformed CSV: field 2 is not UTF-8") && !e.contains("record"),
            "{e}"
        );
        let mut c = LineCounter::new(b"a\r\nb\n\nc\rd");
        assert_eq!([0, 1, 3, 4, 6, 8, 9].map(|b| c.line_at(b)), [1, 2, 2, 4, 4, 5, 5]);
        // asked again from the start: counted again, not from where it stopped
        assert_eq!(c.line_at(0), 1);
        assert_eq!(c.line_at(100), 5);
    }

    #[test]
    fn missing_file_is_io_error() {
        let e = read_solutions(Path::new("/nonexistent/x.csv")).unwrap_err();
        assert!(matches!(e, SchemaError::Io { .. }));
        assert!(e.to_string().contains("/nonexistent/x.csv"));
    }

    /// The atomic write follows a symbolic link (the link stays, its target gets the bytes) and
    /// refuses to replace a directory or a device; a link loop is an error.
    #[cfg(unix)]
    #[test]
    fn atomic_writes_follow_links_and_spare_non_files() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("real.csv");
        std::fs::write(&target, b"old").unwrap();
        let link = t.path().join("link.csv");
        std::os::unix::fs::symlink("real.csv", &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        let dir = t.path().join("adir");
        std::fs::create_dir(&dir).unwrap();
        let e = write_atomic(&dir, b"x").unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(dir.is_dir());
        let e = write_atomic(Path::new("/dev/null"), b"x").unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = write_atomic(&target.join("x.csv"), b"x").unwrap_err().to_string();
        assert!(e.contains("real.csv is a file, not a folder"), "{e}");
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        assert!(write_atomic(&a, b"x")
            .unwrap_err()
            .to_string()
            .contains("symbolic links"));
    }

    /// A labels file separated by semicolons or tabs says so, not "expected 38 columns, found 1".
    #[test]
    fn another_separator_is_named() {
        for (sep, name) in [(";", "semicolon"), ("\t", "tab")] {
            let text = crate::csv_header().replace(',', sep) + "\n";
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(&format!("the file is {name}-separated")), "{e}");
        }
        assert!(parse("GalaxyID,Class1.1\n")
            .unwrap_err()
            .to_string()
            .contains("expected 38 columns, found 2"));
    }

    /// A staged file is not in place until committed, and dropped uncommitted it leaves
    /// nothing behind (two outputs that must appear together: neither when one fails).
    #[test]
    fn staged_files_appear_on_commit_and_vanish_when_dropped() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a.csv"), t.path().join("b.csv"));
        std::fs::write(&a, b"old").unwrap();
        let sa = stage_atomic(&a, b"new a").unwrap();
        let sb = stage_atomic(&b, b"new b").unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"old");
        assert!(!b.exists());
        drop(sb);
        drop(sa);
        assert_eq!(std::fs::read(&a).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["a.csv"], "no temporary file left");
        let (sa, sb) = (stage_atomic(&a, b"new a").unwrap(), stage_atomic(&b, b"new b").unwrap());
        sa.commit().unwrap();
        sb.commit().unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"new a");
        assert_eq!(std::fs::read(&b).unwrap(), b"new b");
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 2);
    }
}
