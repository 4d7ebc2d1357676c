//! What a cache root holds, for `gz cache list|prune|remove`: complete caches, damaged ones,
//! folders a writer never finished, and the hidden leftovers of killed writers
//! (`.NAME.tmp-PID`), of `gz prep --verify`'s rebuilds (`.NAME.damaged-PID`) and of removals
//! (`.NAME.removing-PID`).
//!
//! Invariant: [`remove`] never leaves a folder that a reader could take for a whole cache. It
//! renames the folder to a hidden `.NAME.removing-PID` sibling first (one atomic step: the
//! cache is there whole or gone), then deletes that; a removal killed half-way leaves only a
//! leftover, which [`scan_root`] lists and the next prune deletes. It refuses any folder that
//! is not recognisably gz's, so a mistyped path cannot delete someone's data.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::{io_err, Cache, Manifest, ShardError, MANIFEST_FILE};

/// The kinds of hidden leftover folders a cache root can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftoverKind {
    /// `.NAME.tmp-PID`: a cache being written (or a writer that was killed).
    Writing,
    /// `.NAME.damaged-PID`: a damaged cache moved aside by `gz prep --verify`.
    Damaged,
    /// `.NAME.removing-PID`: a cache being removed.
    Removing,
}

impl LeftoverKind {
    fn infix(self) -> &'static str {
        match self {
            LeftoverKind::Writing => ".tmp-",
            LeftoverKind::Damaged => ".damaged-",
            LeftoverKind::Removing => ".removing-",
        }
    }
}

/// What one folder of a cache root is.
#[derive(Debug, Clone)]
pub enum EntryState {
    /// A cache that opens (manifest, headers and file sizes check out; checksums are only
    /// checked by [`Cache::verify`]).
    Complete(Box<Manifest>),
    /// A folder with a manifest that does not open; the reason.
    Damaged(String),
    /// A visible folder holding shard files but no manifest: a write that never finished.
    Incomplete,
    /// A hidden leftover; `alive` says whether its process still runs (a live writer's folder
    /// must not be touched).
    Leftover {
        kind: LeftoverKind,
        name: String,
        pid: u32,
        alive: bool,
    },
}

/// One folder of a cache root.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The folder.
    pub path: PathBuf,
    /// Bytes of the files in it (recursively).
    pub bytes: u64,
    /// Last modification of its newest file (the manifest, for a complete cache).
    pub modified: Option<SystemTime>,
    /// What it is.
    pub state: EntryState,
}

impl Entry {
    /// Whether removing this entry can lose nothing: a leftover of a process that has ended.
    pub fn is_dead_leftover(&self) -> bool {
        matches!(self.state, EntryState::Leftover { alive: false, .. })
    }
}

/// Parses a hidden leftover folder name `.NAME.<kind>-PID`.
pub fn parse_leftover(file_name: &str) -> Option<(LeftoverKind, String, u32)> {
    let rest = file_name.strip_prefix('.')?;
    for kind in [LeftoverKind::Writing, LeftoverKind::Damaged, LeftoverKind::Removing] {
        if let Some((name, pid)) = rest.rsplit_once(kind.infix()) {
            if let Ok(pid) = pid.parse::<u32>() {
                if !name.is_empty() {
                    return Some((kind, name.to_string(), pid));
                }
            }
        }
    }
    None
}

/// Lists the folders of `root` that are gz caches or their leftovers, sorted by path. Other
/// folders and files are not listed. A missing root is an empty list.
pub fn scan_root(root: &Path) -> Result<Vec<Entry>, ShardError> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(root, e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| io_err(root, e))?;
        let path = e.path();
        // a symbolic link is not followed: its target is not this root's to list or remove
        let Ok(ft) = e.file_type() else { continue };
        if !ft.is_dir() {
            continue;
        }
        let Some(fname) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if let Some(entry) = classify(&path, &fname) {
            out.push(entry);
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Reads what one folder is, or `None` when it is not gz's.
pub fn classify(path: &Path, file_name: &str) -> Option<Entry> {
    let state = if let Some((kind, name, pid)) = parse_leftover(file_name) {
        if !holds_only_writer_files(path) {
            return None; // another tool's folder with a name like ours
        }
        EntryState::Leftover {
            kind,
            name,
            pid,
            alive: writer_alive(path, pid),
        }
    } else if file_name.starts_with('.') {
        return None;
    } else if path.join(MANIFEST_FILE).is_file() {
        match Cache::open(path) {
            Ok(c) => EntryState::Complete(Box::new(c.manifest().clone())),
            Err(e) => {
                // a manifest that is not gz's makes the folder someone else's, unless gz's
                // shard files are beside it (a manifest cut short or emptied, as by a copy
                // that did not finish)
                let text = fs::read(path.join(MANIFEST_FILE)).unwrap_or_default();
                if !String::from_utf8_lossy(&text).contains("\"gz-shards\"") && !holds_shard_files(path) {
                    return None;
                }
                EntryState::Damaged(e.to_string())
            }
        }
    } else if holds_shard_files(path) {
        EntryState::Incomplete
    } else {
        return None;
    };
    let (bytes, modified) = usage(path);
    Some(Entry {
        path: path.to_path_buf(),
        bytes,
        modified,
        state,
    })
}

/// Whether `dir` holds a file the shard writer finished: named `*.shard`, `*.labels` or
/// `*.index` and starting with the gz-shards magic. The name alone is not enough: other tools
/// write `*.index` and `*.labels` files too (TensorFlow checkpoints, for one).
fn holds_shard_files(dir: &Path) -> bool {
    let Ok(rd) = fs::read_dir(dir) else { return false };
    rd.flatten().any(|e| {
        let n = e.file_name();
        let n = n.to_string_lossy();
        (n.ends_with(".shard") || n.ends_with(".labels") || n.ends_with(".index")) && starts_with_magic(&e.path())
    })
}

/// Whether `dir` holds nothing but files with the names the shard writer gives (a leftover
/// of a writer or a removal holds some of a cache's files; they may be cut short, or empty).
fn holds_only_writer_files(dir: &Path) -> bool {
    let Ok(rd) = fs::read_dir(dir) else { return false };
    rd.into_iter().all(|e| {
        e.is_ok_and(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            e.file_type().is_ok_and(|t| t.is_file())
                && (n == MANIFEST_FILE
                    || n == crate::writer::WRITER_FILE
                    || n.ends_with(".shard")
                    || n.ends_with(".labels")
                    || n.ends_with(".index"))
        })
    })
}

/// Whether the writer of the leftover folder `dir`, named for process `pid`, still runs: by
/// the holder its [`crate::writer::WRITER_FILE`] records (process id and start), so that a
/// killed writer's id come round again to another process (PID 1 in a restarted container)
/// is not taken for it; by the id alone where the folder records none (a writer of an earlier
/// gz, or one that had removed it before its final rename).
pub fn writer_alive(dir: &Path, pid: u32) -> bool {
    // the record first: this process may have got a killed writer's id (PID 1 again in a
    // restarted container), and its own live folder records its own start
    match fs::read_to_string(dir.join(crate::writer::WRITER_FILE)) {
        Ok(tag) if gz_schema::process::holder_pid(&tag) == Some(pid) => {
            gz_schema::process::holder_alive(&tag).unwrap_or(true)
        }
        _ => pid == std::process::id() || gz_schema::process::process_alive(pid),
    }
}

/// The newest modification under `dir` (itself included), for judging whether a writer's folder
/// is still written to.
pub fn newest_write(dir: &Path) -> Option<SystemTime> {
    let own = fs::metadata(dir).and_then(|m| m.modified()).ok();
    match (usage(dir).1, own) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// What `dir` holds that the shard writer does not write (names, sorted; a folder's with a
/// trailing `/`): a user's notes, a training run written into the cache. [`remove`] refuses a
/// cache holding any, so that removing a cache never deletes them.
pub fn foreign_files(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let file = e.file_type().is_ok_and(|t| t.is_file());
            let ours = file
                && (n == MANIFEST_FILE || n.ends_with(".shard") || n.ends_with(".labels") || n.ends_with(".index"));
            (!ours).then(|| {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    format!("{n}/")
                } else {
                    n
                }
            })
        })
        .collect();
    out.sort();
    out
}

fn starts_with_magic(file: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 8];
    fs::File::open(file)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| head == crate::format::MAGIC)
}

/// Total bytes and newest modification time under `dir` (symbolic links not followed).
fn usage(dir: &Path) -> (u64, Option<SystemTime>) {
    let mut bytes = 0;
    let mut newest: Option<SystemTime> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                bytes += md.len();
                if let Ok(m) = md.modified() {
                    newest = Some(newest.map_or(m, |n| n.max(m)));
                }
            }
        }
    }
    (bytes, newest)
}

/// Removes a cache folder or a leftover of one: renamed to a hidden `.NAME.removing-PID`
/// sibling first, then deleted (see the module's invariant). Refuses a folder that is not gz's
/// (no gz manifest, no shard files, not a leftover name), the folder of a running writer, and
/// symbolic links.
pub fn remove(dir: &Path) -> Result<(), ShardError> {
    // `cache/NAME/` and `cache/NAME/.` name `cache/NAME`; left as typed, the trailing `/`
    // makes the system follow a symbolic link and refuse the rename ("Not a directory",
    // "Device or resource busy") instead of the reasons below
    let dir = &match (dir.parent(), dir.file_name()) {
        (Some(parent), Some(name)) => parent.join(name),
        _ => dir.to_path_buf(),
    };
    let md = fs::symlink_metadata(dir).map_err(|e| io_err(dir, e))?;
    if md.file_type().is_symlink() {
        return Err(ShardError::Invalid(format!(
            "{}: a symbolic link; name the cache folder itself",
            dir.display()
        )));
    }
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ShardError::Invalid(format!("{}: not a cache folder", dir.display())))?;
    let entry = classify(dir, name).ok_or_else(|| {
        ShardError::Invalid(format!(
            "{}: not a gz cache (no gz-shards manifest.json, no shard files); not removed",
            dir.display()
        ))
    })?;
    let foreign = foreign_files(dir);
    if !foreign.is_empty() && !matches!(entry.state, EntryState::Leftover { .. }) {
        let shown: Vec<&str> = foreign.iter().take(3).map(String::as_str).collect();
        return Err(ShardError::Invalid(format!(
            "{}: holds {} the cache writer did not write ({}{}): not removed; move {} out first, or delete \
             the folder yourself",
            dir.display(),
            if foreign.len() == 1 {
                "a file".to_string()
            } else {
                format!("{} files", foreign.len())
            },
            shown.join(", "),
            if foreign.len() > 3 { ", …" } else { "" },
            if foreign.len() == 1 { "it" } else { "them" }
        )));
    }
    let target = match &entry.state {
        EntryState::Leftover {
            kind: LeftoverKind::Writing,
            alive: true,
            pid,
            ..
        } => {
            return Err(ShardError::Invalid(format!(
                "{}: process {pid} is still writing this cache; not removed",
                dir.display()
            )))
        }
        // a leftover is already out of every reader's way: delete it in place
        EntryState::Leftover { .. } => dir.to_path_buf(),
        _ => {
            let aside = dir.with_file_name(format!(
                ".{name}{}{}",
                LeftoverKind::Removing.infix(),
                std::process::id()
            ));
            fs::rename(dir, &aside).map_err(|e| io_err(dir, e))?;
            aside
        }
    };
    fs::remove_dir_all(&target).map_err(|e| io_err(&target, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CacheWriter;

    fn write_cache(dir: &Path) {
        let cfg = serde_json::json!({"crop": 4, "size": 2});
        let mut w = CacheWriter::create(dir, &cfg, "abc", 4).unwrap();
        let mut s = w.begin_split("test", [1, 2, 2], false).unwrap();
        for id in 1..=3u64 {
            s.push(id, &[half::f16::from_f32(id as f32); 4], None).unwrap();
        }
        w.end_split(s).unwrap();
        w.finish(serde_json::json!({"dataset_key": "k"})).unwrap();
    }

    #[test]
    fn leftover_names_parse() {
        assert_eq!(
            parse_leftover(".a-b.tmp-12"),
            Some((LeftoverKind::Writing, "a-b".into(), 12))
        );
        assert_eq!(
            parse_leftover(".a.damaged-7"),
            Some((LeftoverKind::Damaged, "a".into(), 7))
        );
        assert_eq!(
            parse_leftover(".x.tmp-1.removing-9"),
            Some((LeftoverKind::Removing, "x.tmp-1".into(), 9))
        );
        assert_eq!(parse_leftover("a.tmp-12"), None);
        assert_eq!(parse_leftover(".a.tmp-"), None);
        assert_eq!(parse_leftover(".a.tmp-x1"), None);
        assert_eq!(parse_leftover("..tmp-3"), None);
    }

    #[test]
    fn a_root_lists_caches_damage_and_leftovers_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        write_cache(&root.join("good"));
        write_cache(&root.join("bad"));
        // truncate a shard: the manifest stays, the cache no longer opens
        let shard = fs::read_dir(root.join("bad"))
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".shard"))
            .unwrap()
            .path();
        let len = fs::metadata(&shard).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&shard)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        fs::create_dir(root.join("unfinished")).unwrap();
        fs::copy(root.join("good/test.index"), root.join("unfinished/test.index")).unwrap();
        // another tool's files with a shard writer's endings (a TensorFlow checkpoint)
        fs::create_dir(root.join("checkpoint")).unwrap();
        fs::write(root.join("checkpoint/model.ckpt-1.index"), b"x").unwrap();
        fs::write(root.join("checkpoint/train.labels"), b"cat\ndog\n").unwrap();
        fs::create_dir(root.join("photos")).unwrap();
        fs::write(root.join("photos/a.jpg"), b"x").unwrap();
        fs::create_dir(root.join("other")).unwrap();
        fs::write(root.join("other/manifest.json"), b"{\"format\": \"npy\"}").unwrap();
        fs::create_dir(root.join(".hidden")).unwrap();
        fs::write(root.join("file.txt"), b"x").unwrap();
        let live = format!(".good.tmp-{}", std::process::id());
        fs::create_dir(root.join(&live)).unwrap();
        // a pid that cannot run (beyond Linux's pid_max)
        fs::create_dir(root.join(".good.damaged-4194305")).unwrap();

        let list = scan_root(root).unwrap();
        let names: Vec<String> = list
            .iter()
            .map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [".good.damaged-4194305", &live, "bad", "good", "unfinished"]);
        assert!(matches!(
            list[0].state,
            EntryState::Leftover {
                kind: LeftoverKind::Damaged,
                alive: false,
                ..
            }
        ));
        assert!(list[0].is_dead_leftover());
        assert!(matches!(
            list[1].state,
            EntryState::Leftover {
                kind: LeftoverKind::Writing,
                alive: true,
                ..
            }
        ));
        assert!(!list[1].is_dead_leftover());
        match &list[2].state {
            EntryState::Damaged(why) => assert!(why.contains("truncated"), "{why}"),
            other => panic!("{other:?}"),
        }
        match &list[3].state {
            EntryState::Complete(m) => assert_eq!(m.config_hash, "abc"),
            other => panic!("{other:?}"),
        }
        assert!(list[3].bytes > 0 && list[3].modified.is_some());
        assert!(matches!(list[4].state, EntryState::Incomplete));
        assert!(scan_root(&root.join("missing")).unwrap().is_empty());
    }

    /// A manifest emptied or cut short before its `"gz-shards"` beside gz's shard files: a
    /// damaged cache, listed and removable (it was neither).
    #[test]
    fn a_cache_with_an_emptied_manifest_is_damaged() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("c");
        write_cache(&dir);
        fs::write(dir.join(MANIFEST_FILE), b"{").unwrap();
        let list = scan_root(t.path()).unwrap();
        assert_eq!(list.len(), 1);
        assert!(matches!(list[0].state, EntryState::Damaged(_)), "{:?}", list[0].state);
        fs::write(dir.join(MANIFEST_FILE), b"").unwrap();
        remove(&dir).unwrap();
        assert!(!dir.exists());
    }

    /// A cache holding what the writer did not write (a user's notes, a run trained into it)
    /// is not removed, and nothing in it is lost; moved out, the cache goes.
    #[test]
    fn a_cache_holding_other_files_is_not_removed() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("c");
        write_cache(&dir);
        fs::write(dir.join("notes.txt"), b"mine").unwrap();
        fs::create_dir(dir.join("run")).unwrap();
        fs::write(dir.join("run/best.json"), b"{}").unwrap();
        assert_eq!(foreign_files(&dir), ["notes.txt", "run/"]);
        let e = remove(&dir).unwrap_err().to_string();
        assert!(
            e.contains("holds 2 files the cache writer did not write (notes.txt, run/)"),
            "{e}"
        );
        assert_eq!(fs::read(dir.join("notes.txt")).unwrap(), b"mine");
        assert!(dir.join("run/best.json").is_file() && Cache::open(&dir).is_ok());
        fs::remove_file(dir.join("notes.txt")).unwrap();
        fs::remove_dir_all(dir.join("run")).unwrap();
        assert!(foreign_files(&dir).is_empty());
        remove(&dir).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn remove_takes_caches_and_dead_leftovers_and_refuses_the_rest() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        write_cache(&root.join("good"));
        remove(&root.join("good")).unwrap();
        assert!(!root.join("good").exists());
        assert!(fs::read_dir(root).unwrap().next().is_none(), "nothing left behind");

        fs::create_dir(root.join("photos")).unwrap();
        fs::write(root.join("photos/a.jpg"), b"x").unwrap();
        let e = remove(&root.join("photos")).unwrap_err().to_string();
        assert!(e.contains("not a gz cache"), "{e}");
        assert!(root.join("photos/a.jpg").exists());
        fs::create_dir(root.join("ckpt")).unwrap();
        fs::write(root.join("ckpt/model.ckpt-1.index"), b"x").unwrap();
        let e = remove(&root.join("ckpt")).unwrap_err().to_string();
        assert!(e.contains("not a gz cache"), "{e}");
        assert!(root.join("ckpt/model.ckpt-1.index").exists());

        let live = root.join(format!(".c.tmp-{}", std::process::id()));
        fs::create_dir(&live).unwrap();
        let e = remove(&live).unwrap_err().to_string();
        assert!(e.contains("still writing"), "{e}");
        assert!(live.exists());

        let dead = root.join(".c.tmp-4194305");
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join("test-00000.shard"), b"x").unwrap();
        remove(&dead).unwrap();
        assert!(!dead.exists());
        // a killed writer's id come round again to another process (PID 1 in a restarted
        // container; here init): its recorded start tells them apart; with no record (an
        // earlier gz's folder) the id alone is judged, and it runs
        #[cfg(target_os = "linux")]
        if let Some(ticks) = gz_schema::process::start_ticks(1) {
            let reused = root.join(".c.tmp-1");
            fs::create_dir(&reused).unwrap();
            fs::write(reused.join("train-00000.shard"), b"x").unwrap();
            let e = remove(&reused).unwrap_err().to_string();
            assert!(e.contains("still writing"), "{e}");
            fs::write(reused.join(crate::writer::WRITER_FILE), format!("1 {}", ticks + 1)).unwrap();
            assert!(scan_root(root)
                .unwrap()
                .iter()
                .any(|e| e.path == reused && e.is_dead_leftover()));
            remove(&reused).unwrap();
            assert!(!reused.exists());
            // its own start recorded: the writer runs
            fs::create_dir(&reused).unwrap();
            fs::write(reused.join(crate::writer::WRITER_FILE), format!("1 {ticks}")).unwrap();
            assert!(remove(&reused).unwrap_err().to_string().contains("still writing"));
            fs::remove_dir_all(&reused).unwrap();
            // this very process got a killed writer's id: judged by the record, not the id
            let me = std::process::id();
            let mine = root.join(format!(".d.tmp-{me}"));
            fs::create_dir(&mine).unwrap();
            let own = gz_schema::process::start_ticks(me).unwrap();
            fs::write(mine.join(crate::writer::WRITER_FILE), format!("{me} {}", own + 1)).unwrap();
            assert!(!writer_alive(&mine, me));
            fs::write(mine.join(crate::writer::WRITER_FILE), format!("{me} {own}")).unwrap();
            assert!(writer_alive(&mine, me));
            fs::remove_dir_all(&mine).unwrap();
        }
        // another tool's hidden folder named like a leftover (a root named by mistake, `~`)
        let theirs = root.join(".notes.tmp-4194305");
        fs::create_dir(&theirs).unwrap();
        fs::write(theirs.join("draft.txt"), b"x").unwrap();
        assert!(scan_root(root).unwrap().iter().all(|e| e.path != theirs));
        let e = remove(&theirs).unwrap_err().to_string();
        assert!(e.contains("not a gz cache"), "{e}");
        assert!(theirs.join("draft.txt").exists());
        fs::remove_dir_all(&theirs).unwrap();

        #[cfg(unix)]
        {
            write_cache(&root.join("real"));
            std::os::unix::fs::symlink(root.join("real"), root.join("link")).unwrap();
            let e = remove(&root.join("link")).unwrap_err().to_string();
            assert!(e.contains("symbolic link"), "{e}");
            let e = remove(Path::new(&format!("{}/", root.join("link").display())))
                .unwrap_err()
                .to_string();
            assert!(e.contains("symbolic link"), "{e}");
            assert!(root.join("real/manifest.json").exists());
            // a trailing `/` or `/.` names the folder itself
            remove(&root.join("real").join(".")).unwrap();
            assert!(!root.join("real").exists());
        }
    }
}
