//! Writing a cache directory: image shards, label and index files, then the manifest, published
//! atomically.
//!
//! Everything is written into a hidden sibling directory `.<name>.tmp-<pid>`; each file is
//! written, its header patched with the final row count and CRC, and fsynced. The manifest
//! (`manifest.json`) is written last, then the directory is fsynced and renamed to its final
//! name. A cache directory without a manifest is never complete, and a killed writer only ever
//! leaves a `.tmp-` directory behind (removed by the next writer for the same cache once its
//! process is gone: the folder's `.writer` file records the writer's id and start, so another
//! process that got the id later is not taken for it). Neighbour: `reader` opens what this writes; gz-preprocess drives it.

use std::fs::{self, File};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use half::f16;

use crate::format::{Header, Kind};
use crate::manifest::{FileEntry, Manifest, SplitManifest, MANIFEST_FILE};
use crate::{io_err, ShardError};

/// The file in a writer's temporary folder that records its holder
/// ([`gz_schema::process::holder_tag`]): removed before the folder becomes the cache.
pub const WRITER_FILE: &str = ".writer";

/// How long a writer's folder whose recorded holder is gone, while a process of its id runs,
/// must have gone unwritten before another writer removes it (as `gz cache prune` waits).
const QUIET_LEFTOVER: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Default number of images per shard file (every shard but the last holds exactly this many).
pub const DEFAULT_ROWS_PER_SHARD: usize = 4096;

/// Writes one cache directory. Create it with [`CacheWriter::create`], add splits with
/// [`CacheWriter::begin_split`] / [`CacheWriter::end_split`], publish with [`CacheWriter::finish`].
/// Dropping it unfinished removes the temporary directory.
#[derive(Debug)]
pub struct CacheWriter {
    final_dir: PathBuf,
    tmp_dir: PathBuf,
    config: serde_json::Value,
    config_json: String,
    config_hash: String,
    rows_per_shard: usize,
    splits: Vec<(String, SplitManifest)>,
    finished: bool,
}

impl CacheWriter {
    /// Starts writing the cache that will be published at `final_dir`.
    ///
    /// `config` is the preprocessing config (stored in the manifest and every shard header),
    /// `config_hash` its hash (≤ 64 ASCII bytes). Fails if `final_dir` already holds a complete
    /// cache (a manifest); a stale incomplete `final_dir` is replaced on publish.
    pub fn create(
        final_dir: &Path,
        config: &serde_json::Value,
        config_hash: &str,
        rows_per_shard: usize,
    ) -> Result<CacheWriter, ShardError> {
        if config_hash.len() > 64 || !config_hash.is_ascii() {
            return Err(ShardError::Invalid(format!(
                "config hash {config_hash:?} must be ≤ 64 ASCII bytes"
            )));
        }
        if rows_per_shard == 0 {
            return Err(ShardError::Invalid("rows_per_shard must be positive".into()));
        }
        let name = final_dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            ShardError::Invalid(format!(
                "{}: cache path needs a UTF-8 final component",
                final_dir.display()
            ))
        })?;
        let parent = final_dir.parent().unwrap_or_else(|| Path::new("."));
        fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
        if final_dir.join(MANIFEST_FILE).exists() {
            return Err(ShardError::Invalid(format!(
                "{}: a complete cache already exists",
                final_dir.display()
            )));
        }
        // an incomplete leftover at the cache's place is replaced when the new cache is done:
        // refused now, before the work, if it holds anything the writer does not write
        refuse_foreign(final_dir)?;
        remove_stale_tmp_dirs(parent, name);
        let tmp_dir = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir).map_err(|e| io_err(&tmp_dir, e))?;
        }
        fs::create_dir(&tmp_dir).map_err(|e| io_err(&tmp_dir, e))?;
        // who writes here (id and start), for the judges of a killed writer's folder
        let holder = tmp_dir.join(WRITER_FILE);
        if let Err(e) = fs::write(&holder, gz_schema::process::holder_tag()) {
            let _ = fs::remove_dir_all(&tmp_dir);
            return Err(io_err(&holder, e));
        }
        let config_json = serde_json::to_string(config).map_err(|e| ShardError::Invalid(e.to_string()))?;
        Ok(CacheWriter {
            final_dir: final_dir.to_path_buf(),
            tmp_dir,
            config: config.clone(),
            config_json,
            config_hash: config_hash.to_string(),
            rows_per_shard,
            splits: Vec::new(),
            finished: false,
        })
    }

    /// The temporary directory being written (for tests and diagnostics).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// Starts a split (`"train"`, `"test"`, …) of images shaped `shape` = [C, H, W]; `labelled`
    /// splits take 37 f32 labels per image.
    pub fn begin_split(&self, name: &str, shape: [usize; 3], labelled: bool) -> Result<SplitWriter, ShardError> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(ShardError::Invalid(format!(
                "split name {name:?} must be [A-Za-z0-9_-]+"
            )));
        }
        if self.splits.iter().any(|(n, _)| n == name) {
            return Err(ShardError::Invalid(format!("split {name:?} written twice")));
        }
        if shape.iter().any(|&d| d == 0 || d > u32::MAX as usize) {
            return Err(ShardError::Invalid(format!("bad image shape {shape:?}")));
        }
        let labels = if labelled {
            Some(RowFile::create(
                &self.tmp_dir,
                &format!("{name}.labels"),
                Kind::Labels,
                [gz_n_answers() as u32, 1, 1],
                &self.config_hash,
                &self.config_json,
            )?)
        } else {
            None
        };
        Ok(SplitWriter {
            name: name.to_string(),
            dir: self.tmp_dir.clone(),
            shape,
            rows_per_shard: self.rows_per_shard,
            config_hash: self.config_hash.clone(),
            config_json: self.config_json.clone(),
            ids: Vec::new(),
            seen: std::collections::HashSet::new(),
            shard: None,
            shards: Vec::new(),
            labels,
        })
    }

    /// Finishes a split begun with [`CacheWriter::begin_split`].
    pub fn end_split(&mut self, split: SplitWriter) -> Result<(), ShardError> {
        let name = split.name.clone();
        let m = split.finish()?;
        self.splits.push((name, m));
        Ok(())
    }

    /// Writes the manifest (with `extra`, free-form metadata such as the dataset key and the
    /// list of skipped inputs), fsyncs, and renames the directory into place. Returns the final
    /// path. If another process published the same cache first, its copy is kept.
    pub fn finish(mut self, extra: serde_json::Value) -> Result<PathBuf, ShardError> {
        let manifest = Manifest {
            format: "gz-shards".into(),
            version: crate::format::FORMAT_VERSION,
            config_hash: self.config_hash.clone(),
            prep_config: self.config.clone(),
            rows_per_shard: self.rows_per_shard,
            splits: self.splits.drain(..).collect(),
            extra,
        };
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| ShardError::Invalid(e.to_string()))?;
        let mpath = self.tmp_dir.join(MANIFEST_FILE);
        {
            let mut f = File::create(&mpath).map_err(|e| io_err(&mpath, e))?;
            f.write_all(&text).map_err(|e| io_err(&mpath, e))?;
            f.sync_all().map_err(|e| io_err(&mpath, e))?;
        }
        // (not part of the cache; a kill from here on leaves a folder judged by its id alone)
        let holder = self.tmp_dir.join(WRITER_FILE);
        match fs::remove_file(&holder) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&holder, e)),
            _ => {}
        }
        sync_dir(&self.tmp_dir)?;
        if self.final_dir.join(MANIFEST_FILE).exists() {
            // Someone else won the race; theirs is as good as ours.
            let _ = fs::remove_dir_all(&self.tmp_dir);
            self.finished = true;
            return Ok(self.final_dir.clone());
        }
        if self.final_dir.exists() {
            // An incomplete leftover (no manifest): never trusted, replace it (unless a user's
            // files came into it meanwhile).
            refuse_foreign(&self.final_dir)?;
            fs::remove_dir_all(&self.final_dir).map_err(|e| io_err(&self.final_dir, e))?;
        }
        fs::rename(&self.tmp_dir, &self.final_dir).map_err(|e| io_err(&self.final_dir, e))?;
        if let Some(parent) = self.final_dir.parent() {
            sync_dir(parent)?;
        }
        self.finished = true;
        Ok(self.final_dir.clone())
    }
}

/// Refuses to replace a folder at a cache's place (one with no manifest: an incomplete
/// leftover) that holds files the writer does not write ([`crate::inventory::foreign_files`]):
/// a user's notes or a run there were deleted with the leftover.
fn refuse_foreign(dir: &Path) -> Result<(), ShardError> {
    if !dir.is_dir() {
        return Ok(());
    }
    let foreign = crate::inventory::foreign_files(dir);
    if foreign.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = foreign.iter().take(5).map(String::as_str).collect();
    Err(ShardError::Invalid(format!(
        "{}: an incomplete cache (no {MANIFEST_FILE}) that also holds files the cache writer did not write ({}{}), \
         which replacing it would delete: move them out of it, then run again",
        dir.display(),
        shown.join(", "),
        if foreign.len() > shown.len() { ", …" } else { "" }
    )))
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

fn gz_n_answers() -> usize {
    crate::N_LABELS
}

/// Writes the rows of one split: image shards (rolled over every `rows_per_shard` images), the
/// labels file and, at the end, the index.
#[derive(Debug)]
pub struct SplitWriter {
    name: String,
    dir: PathBuf,
    shape: [usize; 3],
    rows_per_shard: usize,
    config_hash: String,
    config_json: String,
    ids: Vec<u64>,
    seen: std::collections::HashSet<u64>,
    shard: Option<RowFile>,
    shards: Vec<FileEntry>,
    labels: Option<RowFile>,
}

impl SplitWriter {
    /// Appends one image (C×H×W f16, `shape` product long) with its id and, for labelled
    /// splits, its 37 labels.
    pub fn push(&mut self, id: u64, image: &[f16], label: Option<&[f32]>) -> Result<(), ShardError> {
        let n: usize = self.shape.iter().product();
        if image.len() != n {
            return Err(ShardError::Invalid(format!(
                "image for id {id} has {} values, expected {n} ({:?})",
                image.len(),
                self.shape
            )));
        }
        match (&mut self.labels, label) {
            (Some(_), Some(l)) if l.len() != crate::N_LABELS => {
                return Err(ShardError::Invalid(format!(
                    "label for id {id} has {} values, expected 37",
                    l.len()
                )))
            }
            (Some(_), None) => return Err(ShardError::Invalid(format!("labelled split needs a label for id {id}"))),
            (None, Some(_)) => {
                return Err(ShardError::Invalid(format!(
                    "unlabelled split given a label for id {id}"
                )))
            }
            _ => {}
        }
        if !self.seen.insert(id) {
            return Err(ShardError::DuplicateId {
                split: self.name.clone(),
                id,
            });
        }
        if self
            .shard
            .as_ref()
            .is_some_and(|s| s.rows as usize >= self.rows_per_shard)
        {
            let full = self.shard.take().expect("checked above");
            self.shards.push(full.finish()?);
        }
        if self.shard.is_none() {
            let [c, h, w] = self.shape;
            self.shard = Some(RowFile::create(
                &self.dir,
                &format!("{}-{:05}.shard", self.name, self.shards.len()),
                Kind::Images,
                [c as u32, h as u32, w as u32],
                &self.config_hash,
                &self.config_json,
            )?);
        }
        let shard = self.shard.as_mut().expect("created above");
        shard.write_row(bytemuck::cast_slice(image))?;
        if let (Some(lf), Some(l)) = (&mut self.labels, label) {
            let mut b = Vec::with_capacity(l.len() * 4);
            for v in l {
                b.extend_from_slice(&v.to_le_bytes());
            }
            lf.write_row(&b)?;
        }
        self.ids.push(id);
        Ok(())
    }

    /// Number of rows written so far.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no rows were written.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn finish(mut self) -> Result<SplitManifest, ShardError> {
        if let Some(s) = self.shard.take() {
            self.shards.push(s.finish()?);
        }
        let labels = match self.labels.take() {
            Some(l) => Some(l.finish()?),
            None => None,
        };
        let mut index = RowFile::create(
            &self.dir,
            &format!("{}.index", self.name),
            Kind::Index,
            [1, 1, 1],
            &self.config_hash,
            &self.config_json,
        )?;
        for (i, &id) in self.ids.iter().enumerate() {
            let shard = (i / self.rows_per_shard) as u32;
            let row = (i % self.rows_per_shard) as u32;
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&id.to_le_bytes());
            b[8..12].copy_from_slice(&shard.to_le_bytes());
            b[12..16].copy_from_slice(&row.to_le_bytes());
            index.write_row(&b)?;
        }
        let index = index.finish()?;
        Ok(SplitManifest {
            rows: self.ids.len(),
            shape: self.shape,
            shards: self.shards,
            index,
            labels,
        })
    }
}

/// One file of rows being written: a placeholder header, streamed rows, then the real header.
#[derive(Debug)]
struct RowFile {
    path: PathBuf,
    file: BufWriter<File>,
    header: Header,
    rows: u64,
    crc: crc32fast::Hasher,
}

impl RowFile {
    fn create(
        dir: &Path,
        name: &str,
        kind: Kind,
        dims: [u32; 3],
        hash: &str,
        json: &str,
    ) -> Result<RowFile, ShardError> {
        let path = dir.join(name);
        let header = Header::new(kind, dims, 0, hash, json);
        let f = File::create(&path).map_err(|e| io_err(&path, e))?;
        let mut file = BufWriter::with_capacity(1 << 20, f);
        // Placeholder (zero magic): a file cut short before `finish` never parses as valid.
        file.write_all(&vec![0u8; header.header_len as usize])
            .map_err(|e| io_err(&path, e))?;
        Ok(RowFile {
            path,
            file,
            header,
            rows: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    fn write_row(&mut self, bytes: &[u8]) -> Result<(), ShardError> {
        debug_assert_eq!(bytes.len(), self.header.row_bytes());
        self.crc.update(bytes);
        self.file.write_all(bytes).map_err(|e| io_err(&self.path, e))?;
        self.rows += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<FileEntry, ShardError> {
        let mut header = self.header.clone();
        header.rows = self.rows;
        header.payload_len = self.rows * header.row_bytes() as u64;
        header.payload_crc32 = self.crc.clone().finalize();
        let bytes = header.encode();
        let path = self.path.clone();
        self.file.flush().map_err(|e| io_err(&path, e))?;
        let mut f = self.file.into_inner().map_err(|e| io_err(&path, e.into_error()))?;
        f.seek(SeekFrom::Start(0)).map_err(|e| io_err(&path, e))?;
        f.write_all(&bytes).map_err(|e| io_err(&path, e))?;
        f.sync_all().map_err(|e| io_err(&path, e))?;
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        Ok(FileEntry {
            file,
            rows: self.rows as usize,
            crc32: header.payload_crc32,
        })
    }
}

fn sync_dir(dir: &Path) -> Result<(), ShardError> {
    // Directory fsync makes the renames durable; not supported everywhere, so best effort on
    // platforms where opening a directory fails.
    match File::open(dir) {
        Ok(f) => f
            .sync_all()
            .or_else(|e| if cfg!(unix) { Err(io_err(dir, e)) } else { Ok(()) }),
        Err(_) => Ok(()),
    }
}

/// Removes `.<name>.tmp-<pid>` siblings left by writers that are no longer running (the
/// writer of a new cache does it, and `gz prep` on a cache hit).
pub fn remove_stale_tmp_dirs(parent: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let fname = e.file_name();
        let Some(fname) = fname.to_str() else { continue };
        let Some(pid) = fname.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        // a process of that id runs, but its recorded start says it is another: removed
        // only once nothing was written there for a while (a live writer in another container
        // sharing the folder may have an id this machine runs too)
        let quiet = || {
            crate::inventory::newest_write(&e.path())
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age > QUIET_LEFTOVER)
        };
        let gone = pid != std::process::id() && !gz_schema::process::process_alive(pid);
        if gone || (!crate::inventory::writer_alive(&e.path(), pid) && quiet()) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod stale_tests {
    use super::*;

    /// A killed writer its parent has not reaped (a zombie) counts as gone: its temporary folder
    /// is removed; a live writer's stays.
    #[test]
    #[cfg(target_os = "linux")]
    fn a_zombie_writers_temporary_folder_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // until it has exited (and, not yet waited for, is a zombie)
        let mut gone = false;
        for _ in 0..200 {
            if !gz_schema::process::process_alive(pid) {
                gone = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let zombie = t.path().join(format!(".c.tmp-{pid}"));
        let live = t.path().join(format!(".c.tmp-{}", std::process::id()));
        fs::create_dir_all(&zombie).unwrap();
        fs::create_dir_all(&live).unwrap();
        remove_stale_tmp_dirs(t.path(), "c");
        child.wait().unwrap();
        assert!(gone, "an exited, unreaped child still counted as running");
        assert!(!zombie.exists());
        assert!(live.exists(), "this process's own folder must stay");
        assert!(gz_schema::process::process_alive(std::process::id()));
    }
}
