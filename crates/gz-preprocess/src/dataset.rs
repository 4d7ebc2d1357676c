//! The Kaggle dataset layout and its identity.
//!
//! `DIR/training_solutions_rev1.csv` (labels, read with gz-schema) names the training ids, each
//! expected at `DIR/images_training_rev1/<id>.jpg`; test ids are the `<id>.jpg` files of
//! `DIR/images_test_rev1/`. Either half may be absent. An image's extension may be `.jpg` or
//! `.jpeg` in any case (`100008.JPG`: as `gz predict --images` and `gz submit --ids` read a
//! folder). Mismatches (an id without an image, an image without a label, a file not named
//! `<digits>.jpg`) are reported as [`Skipped`] inputs; hidden files (`._100008.jpg`, `.DS_Store`:
//! [`is_hidden`]) are not inputs at all.
//!
//! The dataset key hashes the CSV bytes and the sorted (name, size, mtime) of every file in both
//! image directories, so scanning a dataset costs a directory listing, not a decode; any added,
//! removed, replaced or touched file gives a new key and therefore a new cache.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::{PrepError, Skipped};

/// Labels CSV file name.
pub const SOLUTIONS_CSV: &str = "training_solutions_rev1.csv";
/// Training images directory.
pub const TRAIN_DIR: &str = "images_training_rev1";
/// Test images directory.
pub const TEST_DIR: &str = "images_test_rev1";

/// One image to preprocess.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: u64,
    pub path: PathBuf,
    /// Row in the solutions table (training items).
    pub label_row: Option<usize>,
}

/// A scanned dataset: what to preprocess, what is already known to be unusable, and the key.
#[derive(Debug)]
pub struct Scan {
    /// Training items in CSV order (`None` when there is no CSV).
    pub train: Option<Vec<Item>>,
    /// Test items by ascending id (`None` when there is no test directory).
    pub test: Option<Vec<Item>>,
    /// The labels (when there is a CSV).
    pub solutions: Option<gz_schema::Solutions>,
    /// Inputs rejected while scanning.
    pub skipped: Vec<Skipped>,
    /// Hex dataset identity (16 chars).
    pub key: String,
}

/// How far a question's answers may sum from their target before a label row counts as
/// breaking the decision tree: Kaggle's labels are written with about 6 decimals and hold to
/// 1e-6; a file rounded to 2 decimals is off by at most half a hundredth per answer and per
/// parent, so the bound is `0.005 · (answers + 1)` (0.015 for Q6's two answers, 0.045 for
/// Q8's seven), plus 1e-4.
pub fn tree_tolerance(question: usize) -> f32 {
    0.005 * (gz_schema::QUESTIONS[question].answers().len() + 1) as f32 + 1e-4
}

/// The first question of `row` whose answers do not sum to their target within
/// [`tree_tolerance`], described.
fn tree_violation(row: &[f32]) -> Option<String> {
    gz_schema::check_row(row, 0.0)
        .into_iter()
        // (a NaN sum is a violation too)
        .find(|v| {
            let off = (v.actual - v.expected).abs();
            off.is_nan() || off > tree_tolerance(v.question)
        })
        .map(|v| v.to_string())
}

/// Of two files of one galaxy in `dir`, `kept` (read so far) and `name`: `kept` is left
/// holding the one read, and the other is returned. A file that can be read wins over one that
/// cannot (its permissions: the galaxy was lost while a copy could be read), then the file
/// named by the GalaxyID (`<id>.jpg`, Kaggle's name) over `00411596.jpg` or `100008.JPG`,
/// whichever the listing (byte order) gave first; otherwise the first. A swap goes into the
/// dataset key (`hasher`): a cache an earlier gz wrote with the other file read is not taken
/// for this one.
fn one_per_galaxy(id: u64, kept: &mut String, name: String, dir: &Path, hasher: &mut sha2::Sha256) -> String {
    use sha2::Digest;
    let rank = |n: &str| (readable(&dir.join(n)), n == format!("{id}.jpg"));
    if rank(&name) > rank(kept) {
        hasher.update(format!("read {id} {name}\n").as_bytes());
        std::mem::replace(kept, name)
    } else {
        name
    }
}

/// Whether a byte of `p` can be read (opening alone passes a file whose reading fails).
fn readable(p: &Path) -> bool {
    #[cfg(test)]
    if UNREADABLE_IN_TESTS.with(|u| u.borrow().iter().any(|q| q == p)) {
        return false;
    }
    use std::io::Read;
    std::fs::File::open(p).and_then(|mut f| f.read(&mut [0u8; 1])).is_ok()
}

#[cfg(test)]
thread_local! {
    /// Files [`readable`] says cannot be read, on this thread: root reads any file, so the
    /// tests cannot make one unreadable with its permissions.
    pub(crate) static UNREADABLE_IN_TESTS: std::cell::RefCell<Vec<std::path::PathBuf>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The reasons of the skipped second files of a galaxy (`again`: their index in `skipped` and
/// GalaxyID), written once the listing is done and `read(id)` names the file finally read (a
/// third file can still take over from the second).
fn name_the_file_read(skipped: &mut [Skipped], again: &[(usize, u64)], read: impl Fn(u64) -> String) {
    for &(i, id) in again {
        skipped[i].reason = format!("GalaxyID {id} again (read from {})", read(id));
    }
}

/// Checks that the labels are Kaggle's vote fractions, whose every question sums to the answer
/// leading to it (Q1 and Q6 to 1): a file where every row breaks that, or more than 1 % of the
/// rows (and more than one), is refused, naming the first rows and what they break
/// (per-question fractions, as Galaxy Zoo catalogues publish them, or another table); fewer
/// are a warning. Called by `gz prep` ([`crate::run::run_with`]) before any image is decoded.
pub fn check_tree(sol: &gz_schema::Solutions, csv: &Path) -> Result<(), PrepError> {
    let mut bad: Vec<String> = Vec::new();
    let mut n = 0usize;
    for i in 0..sol.len() {
        if let Some(v) = tree_violation(sol.row(i)) {
            n += 1;
            if bad.len() < 3 {
                bad.push(format!("GalaxyID {}: {v}", sol.ids[i]));
            }
        }
    }
    if n == 0 {
        return Ok(());
    }
    let what = format!(
        "{}: {n} of {} label rows break the decision tree (e.g. {})",
        csv.display(),
        sol.len(),
        bad.join("; ")
    );
    if n == sol.len() || (n > 1 && n * 100 > sol.len()) {
        return Err(PrepError::NoInput(format!(
            "{what}: these are not Kaggle's vote fractions, whose answers to each question sum to the answer \
             that leads to it (per-question fractions, as Galaxy Zoo catalogues give them, sum to 1 in every \
             question); gz trains on Kaggle's"
        )));
    }
    tracing::warn!("{what}; kept as they are");
    Ok(())
}

/// Scans `dir` (see module docs).
pub fn scan(dir: &Path) -> Result<Scan, PrepError> {
    let csv = dir.join(SOLUTIONS_CSV);
    let train_dir = dir.join(TRAIN_DIR);
    let test_dir = dir.join(TEST_DIR);
    if !dir.is_dir() {
        return Err(PrepError::NoInput(format!("{}: not a directory", dir.display())));
    }
    for d in [&train_dir, &test_dir] {
        if d.exists() && !d.is_dir() {
            return Err(PrepError::NoInput(format!(
                "{}: exists but is not a folder (the Kaggle layout has folders of JPEGs here)",
                d.display()
            )));
        }
    }
    if !csv.is_file() && !test_dir.is_dir() {
        return Err(PrepError::NoInput(format!(
            "{}: no {SOLUTIONS_CSV} and no {TEST_DIR}/ — not a Kaggle-layout dataset",
            dir.display()
        )));
    }
    if !csv.is_file() {
        // training images without their labels: an error, not a test-only dataset (whose
        // download has no training folder at all)
        let images = std::fs::read_dir(&train_dir).map_or(0, |d| {
            d.filter(|e| e.as_ref().map_or(true, |e| !is_hidden(&e.file_name())))
                .count()
        });
        if csv.exists() || images > 0 {
            return Err(PrepError::NoInput(format!(
                "{}: {} but {}/ holds {images} files: the training images cannot be labelled (an interrupted \
                 `gz synth` leaves this; run it again). Restore the CSV, or move {TRAIN_DIR}/ away to \
                 preprocess the test images alone",
                dir.display(),
                if csv.exists() {
                    format!("{SOLUTIONS_CSV} is not a file")
                } else {
                    format!("there is no {SOLUTIONS_CSV}")
                },
                TRAIN_DIR
            )));
        }
    }
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"gz dataset v1\n");
    let mut skipped = Vec::new();

    let (train, solutions) = if csv.is_file() {
        let bytes = std::fs::read(&csv).map_err(|e| PrepError::Io {
            path: csv.clone(),
            source: e,
        })?;
        hasher.update(b"csv\n");
        hasher.update(&bytes);
        let sol = gz_schema::read_solutions(&csv)?;
        let files = list_dir(&train_dir, &mut hasher, "train", &mut skipped)?;
        // GalaxyID → the file's own name (which may differ from "<id>.jpg": leading zeros)
        let mut present: HashMap<u64, String> = HashMap::new();
        let mut again = Vec::new();
        for (name, parsed) in files {
            match parsed {
                Some(id) => match present.get_mut(&id) {
                    Some(kept) => {
                        let other = one_per_galaxy(id, kept, name, &train_dir, &mut hasher);
                        again.push((skipped.len(), id));
                        skipped.push(Skipped {
                            path: train_dir.join(&other),
                            reason: String::new(),
                        });
                    }
                    None => {
                        present.insert(id, name);
                    }
                },
                None => skipped.push(Skipped {
                    path: train_dir.join(name),
                    reason: "file name is not <GalaxyID>.jpg".into(),
                }),
            }
        }
        name_the_file_read(&mut skipped, &again, |id| present[&id].clone());
        let mut items = Vec::with_capacity(sol.len());
        let mut labelled = HashSet::with_capacity(sol.len());
        for (row, &id) in sol.ids.iter().enumerate() {
            labelled.insert(id);
            if let Some(name) = present.get(&id) {
                items.push(Item {
                    id,
                    path: train_dir.join(name),
                    label_row: Some(row),
                });
            } else {
                skipped.push(Skipped {
                    path: train_dir.join(format!("{id}.jpg")),
                    reason: format!("GalaxyID {id} is in {SOLUTIONS_CSV} but has no image"),
                });
            }
        }
        let mut unlabelled: Vec<(u64, &String)> = present
            .iter()
            .filter(|(id, _)| !labelled.contains(id))
            .map(|(id, n)| (*id, n))
            .collect();
        unlabelled.sort_unstable();
        for (id, name) in unlabelled {
            skipped.push(Skipped {
                path: train_dir.join(name),
                reason: format!("training image without a label (GalaxyID {id} not in {SOLUTIONS_CSV})"),
            });
        }
        (Some(items), Some(sol))
    } else {
        (None, None)
    };

    let test = if test_dir.is_dir() {
        let files = list_dir(&test_dir, &mut hasher, "test", &mut skipped)?;
        let mut items: Vec<Item> = Vec::with_capacity(files.len());
        // GalaxyID → the file read for it and its item
        let mut seen: HashMap<u64, (String, usize)> = HashMap::new();
        let mut again = Vec::new();
        for (name, parsed) in files {
            match parsed {
                Some(id) if seen.contains_key(&id) => {
                    let (kept, at) = seen.get_mut(&id).expect("just checked");
                    let other = one_per_galaxy(id, kept, name, &test_dir, &mut hasher);
                    items[*at].path = test_dir.join(&*kept);
                    again.push((skipped.len(), id));
                    skipped.push(Skipped {
                        reason: String::new(),
                        path: test_dir.join(other),
                    });
                }
                Some(id) => {
                    seen.insert(id, (name.clone(), items.len()));
                    items.push(Item {
                        id,
                        path: test_dir.join(&name),
                        label_row: None,
                    })
                }
                None => skipped.push(Skipped {
                    path: test_dir.join(name),
                    reason: "file name is not <GalaxyID>.jpg".into(),
                }),
            }
        }
        name_the_file_read(&mut skipped, &again, |id| seen[&id].0.clone());
        items.sort_by_key(|it| it.id);
        Some(items)
    } else {
        None
    };
    // a galaxy in both folders is most likely a copying mistake (Kaggle's splits are disjoint):
    // said, not refused (both rows stay)
    if let (Some(tr), Some(te)) = (&train, &test) {
        let train_ids: std::collections::HashSet<u64> = tr.iter().map(|it| it.id).collect();
        let both: Vec<u64> = te.iter().map(|it| it.id).filter(|id| train_ids.contains(id)).collect();
        if let Some(first) = both.first() {
            tracing::warn!(
                "{} both training and test images (e.g. {first}): the test score of a model trained on them \
                 is not a held-out score",
                if both.len() == 1 {
                    "1 GalaxyID is".to_string()
                } else {
                    format!("{} GalaxyIDs are", both.len())
                }
            );
        }
    }
    let key = crate::hex(&hasher.finalize()[..8]);
    Ok(Scan {
        train,
        test,
        solutions,
        skipped,
        key,
    })
}

/// A hidden entry (its name starts with `.`): never an image of the dataset. macOS writes an
/// AppleDouble `._<name>` beside every file it copies onto a USB disk or a network share (so a
/// download that went through a Mac holds a `._100008.jpg` per image) and a `.DS_Store` in every
/// folder it shows; editors and sync tools leave hidden temporary files. They are passed over as
/// `ls` passes over them, by `gz prep` and by `gz predict --images` / `gz submit --ids`
/// (`gz_eval::predict::list_jpegs`).
pub fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// Lists the regular files of `dir` sorted by name (through symbolic links), feeding (name, size,
/// mtime) into the hash; hidden entries ([`is_hidden`]) are not listed and not hashed. Returns
/// (name, GalaxyID if the name is `<digits>.jpg`, the extension `.jpg` or `.jpeg` in any case); a link to nothing and a subfolder go to `skipped`, and a folder
/// holding only a folder of its own name (a nested unzip) is an error. A missing directory is
/// empty.
fn list_dir(
    dir: &Path,
    hasher: &mut sha2::Sha256,
    tag: &str,
    skipped: &mut Vec<Skipped>,
) -> Result<Vec<(String, Option<u64>)>, PrepError> {
    hasher.update(format!("dir {tag}\n").as_bytes());
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(PrepError::Io {
                path: dir.to_path_buf(),
                source: e,
            })
        }
    };
    let mut files = Vec::new();
    let mut subdirs = Vec::new();
    let mut nested = false;
    for entry in rd {
        let entry = entry.map_err(|e| PrepError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        if is_hidden(&entry.file_name()) {
            continue;
        }
        // symbolic links are followed (datasets are often linked in); a dangling one is no file
        let meta = match std::fs::metadata(entry.path()) {
            Ok(m) => m,
            Err(e) if entry.file_type().is_ok_and(|t| t.is_symlink()) => {
                skipped.push(Skipped {
                    path: entry.path(),
                    reason: format!("a symbolic link to nothing readable ({e})"),
                });
                continue;
            }
            Err(e) => {
                return Err(PrepError::Io {
                    path: entry.path(),
                    source: e,
                })
            }
        };
        if meta.is_dir() {
            nested |= entry.file_name() == dir.file_name().unwrap_or_default();
            subdirs.push(entry.path());
            continue;
        }
        if !meta.is_file() {
            // a named pipe, socket or device: never opened (reading a pipe waits for a writer),
            // and said, not passed over in silence (it was neither read nor listed)
            skipped.push(Skipped {
                path: entry.path(),
                reason: "not a regular file (a named pipe, socket or device): not read".into(),
            });
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        files.push((name, meta.len(), mtime));
    }
    // `images_training_rev1/images_training_rev1/*.jpg`, as some unzip tools make: an error
    // saying so, not a split of no images
    if nested && files.is_empty() {
        let inner = dir.join(dir.file_name().unwrap_or_default());
        return Err(PrepError::NoInput(format!(
            "{}/ holds no files but a folder of the same name: the images are one level down, in {}/ \
             (as some unzip tools leave them): move them up into {}/",
            dir.display(),
            inner.display(),
            dir.display()
        )));
    }
    subdirs.sort();
    for path in subdirs {
        skipped.push(Skipped {
            path,
            reason: "a folder: images are read from the top level of the images folder only".into(),
        });
    }
    files.sort();
    Ok(files
        .into_iter()
        .map(|(name, size, mtime)| {
            let stem = name.rsplit_once('.').and_then(|(stem, ext)| {
                (ext.eq_ignore_ascii_case("jpg") || ext.eq_ignore_ascii_case("jpeg")).then_some((stem, ext))
            });
            // a name read as an image only since `.JPG` / `.jpeg` are (earlier, skipped) is marked
            // in the hash: the dataset gets a new key, not the older cache that lacked it
            let mark = if stem.is_some_and(|(_, ext)| ext != "jpg") {
                "\tjpeg"
            } else {
                ""
            };
            hasher.update(format!("{name}\t{size}\t{mtime}{mark}\n").as_bytes());
            let id = stem
                .map(|(stem, _)| stem)
                .filter(|s| !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse().ok());
            (name, id)
        })
        .collect())
}
