//! `gz cache`: what a cache root holds, and removing what is no longer needed.
//!
//! Every preprocessing config and every change to a dataset's files gets its own cache folder
//! (`<dataset-key>-<config-hash>`, docs/shard-format.md), and at Kaggle scale one cache of the
//! default config is about 9.5 GB, so old ones pile up. `list` shows each with its config,
//! images, size and state; `prune` removes what can never be used again (leftovers of killed
//! runs; with `--data`, caches of that dataset built before its files changed; with
//! `--orphans`, caches whose dataset folder is gone); `remove` deletes named caches. Removal
//! goes through `gz_shards::inventory::remove`: a cache is whole or gone, never half there,
//! and a folder that is not gz's is refused.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;
use gz_shards::inventory::{self, Entry, EntryState, LeftoverKind};

/// Arguments of `gz cache`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// List the caches of a cache root: config, images, size, age and state.
    List(Where),
    /// Remove leftovers of killed runs; with --data, that dataset's caches built before its
    /// files changed; with --orphans, caches whose dataset folder no longer exists.
    Prune {
        #[command(flatten)]
        at: Where,
        /// Also remove caches whose dataset folder (as recorded when they were built) is gone.
        #[arg(long)]
        orphans: bool,
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove cache folders (the paths `gz prep` and `gz cache list` print).
    Remove {
        /// Cache folders.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
}

/// Which cache root, and optionally which dataset's caches to tell apart.
#[derive(Debug, clap::Args)]
struct Where {
    /// Dataset folder: tells its current caches from the superseded ones, built before its
    /// files changed (`list` marks them, `prune` removes the superseded ones); the cache root
    /// defaults to <DATA>/../cache as for `gz prep`.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Cache root (the folder holding the cache folders) [default: <DATA>/../cache].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// The cache root, named without --cache (`gz cache list data/cache`, `gz cache prune
    /// data/cache`).
    #[arg(value_name = "CACHE_ROOT", conflicts_with = "cache")]
    root: Option<PathBuf>,
}

/// A cache's relation to the dataset named with `--data`, or to its recorded dataset folder.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Standing {
    /// Built from the dataset as it is now: `gz prep` with its config reuses it.
    Current,
    /// Built from the same dataset folder before its files changed: never used again.
    Superseded,
    /// Built from another dataset folder (shown).
    Other(String),
    /// Its recorded dataset folder no longer exists.
    Orphan(String),
    /// Built from another dataset, or from this one before its files changed: an older gz
    /// recorded its folder as the relative path shown, which cannot tell which.
    Relative(String),
    /// Nothing to compare with (no --data, recorded folder present or not recorded).
    Unknown,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.action {
        Action::List(at) => list(&at),
        Action::Prune { at, orphans, dry_run } => prune(&at, orphans, dry_run),
        Action::Remove { dirs } => remove(&dirs),
    }
}

/// The cache root and, with --data, the dataset (canonical path, current key).
fn resolve(at: &Where) -> anyhow::Result<(PathBuf, Option<(PathBuf, String)>)> {
    let cache = at.cache.as_ref().or(at.root.as_ref());
    let dataset = match &at.data {
        Some(d) => {
            let abs = d
                .canonicalize()
                .with_context(|| format!("{}: cannot resolve the dataset folder", d.display()))?;
            let scan = gz_preprocess::dataset::scan(&abs)
                .with_context(|| format!("reading the dataset {} (to tell its current caches)", abs.display()))?;
            Some((abs, scan.key))
        }
        None => None,
    };
    let root = match (cache, &dataset) {
        (Some(c), _) => c.clone(),
        (None, Some((abs, _))) => abs.parent().unwrap_or(abs).join("cache"),
        (None, None) => {
            anyhow::bail!("name the cache root (`gz cache list DIR`, or --cache DIR), or the dataset with --data DIR")
        }
    };
    if cache.is_some() && !root.exists() {
        // a typo, not an empty root: "no caches" would hide it
        anyhow::bail!(
            "{}: no such folder (the cache root is the folder the caches are in, as given to `gz prep --cache`)",
            root.display()
        );
    }
    let dataset_layout = [gz_preprocess::dataset::TEST_DIR, gz_preprocess::dataset::TRAIN_DIR]
        .iter()
        .any(|d| root.join(d).is_dir())
        || root.join(gz_preprocess::dataset::SOLUTIONS_CSV).is_file();
    // (`gz prep --data D --cache D` writes caches into a dataset folder: such a root is listed)
    if cache.is_some() && dataset_layout && inventory::scan_root(&root).map_or(true, |e| e.is_empty()) {
        anyhow::bail!(
            "{} is a dataset folder, not a cache root: pass it as --data (its caches are then found beside it, \
             or in the --cache root named with it)",
            root.display()
        );
    }
    if root.exists() && !root.is_dir() {
        anyhow::bail!(
            "{}: not a folder (the cache root is the folder the caches are in)",
            root.display()
        );
    }
    if root.join(gz_shards::MANIFEST_FILE).is_file() {
        anyhow::bail!(
            "{} is a cache itself; the cache root is the folder holding the caches (here {})",
            root.display(),
            root.parent().map_or_else(|| ".".into(), |p| p.display().to_string())
        );
    }
    Ok((root, dataset))
}

fn standing(entry: &Entry, dataset: Option<&(PathBuf, String)>) -> Standing {
    let EntryState::Complete(m) = &entry.state else {
        return Standing::Unknown;
    };
    let key = m.extra.get("dataset_key").and_then(|v| v.as_str());
    let built_from = m.extra.get("data_dir").and_then(|v| v.as_str()).map(PathBuf::from);
    if let Some((abs, current)) = dataset {
        if key == Some(current.as_str()) {
            return Standing::Current;
        }
        // only a recorded absolute path names a folder: older gz versions recorded the path as
        // given, relative to wherever `gz prep` ran, and resolving it from here could name
        // another dataset (and prune a cache that is still current for its own)
        if let Some(b) = built_from.as_ref().filter(|b| b.is_absolute()) {
            if b.canonicalize().ok().as_ref() == Some(abs) || b == abs {
                return Standing::Superseded;
            }
        }
    }
    match built_from {
        // only a recorded absolute path can be said to be gone (see above)
        Some(b) if b.is_absolute() && !b.exists() => Standing::Orphan(b.display().to_string()),
        Some(b) if b.is_absolute() && dataset.is_some() => Standing::Other(b.display().to_string()),
        Some(b) if dataset.is_some() => Standing::Relative(b.display().to_string()),
        _ => Standing::Unknown,
    }
}

/// The superseded caches of the dataset at `data` (canonical) under `root`, whose files now
/// give `key`: for `gz prep`'s note after building a new cache.
pub fn superseded(root: &std::path::Path, data: &std::path::Path, key: &str) -> Vec<Entry> {
    let dataset = (data.to_path_buf(), key.to_string());
    inventory::scan_root(root)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| standing(e, Some(&dataset)) == Standing::Superseded)
        .collect()
}

/// How long `prune` leaves a writer's folder whose process looks ended: a writer on another
/// machine (a shared network folder) or in another container has a process id this machine
/// cannot see, and its folder is being written to.
const RECENT_WRITE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Whether `prune` removes this leftover: its process has ended and, for a writer's folder,
/// nothing in it was written in the last [`RECENT_WRITE`].
fn prunable_leftover(e: &Entry, now: SystemTime) -> bool {
    let recent = e
        .modified
        .is_some_and(|m| now.duration_since(m).map_or(true, |age| age < RECENT_WRITE));
    match e.state {
        EntryState::Leftover {
            kind: LeftoverKind::Writing,
            alive: false,
            ..
        } => !recent,
        _ => e.is_dead_leftover(),
    }
}

fn list(at: &Where) -> anyhow::Result<()> {
    let (root, dataset) = resolve(at)?;
    let entries = inventory::scan_root(&root).with_context(|| format!("listing {}", root.display()))?;
    println!("cache root: {}", root.display());
    if entries.is_empty() {
        println!("no caches");
        return Ok(());
    }
    let now = SystemTime::now();
    let mut total = 0u64;
    let (mut n_caches, mut n_prunable, mut prunable_bytes) = (0usize, 0usize, 0u64);
    let mut rows = vec![["folder", "size", "train", "test", "config", "built", "state"].map(String::from)];
    for e in &entries {
        total += e.bytes;
        let name = e
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let age = e.modified.map_or_else(|| "?".into(), |m| ago(now, m));
        let (train, test, config, state) = match &e.state {
            EntryState::Complete(m) => {
                n_caches += 1;
                let rows = |s: &str| {
                    m.splits
                        .iter()
                        .find(|(n, _)| n == s)
                        .map_or_else(|| "-".into(), |(_, sm)| sm.rows.to_string())
                };
                let st = standing(e, dataset.as_ref());
                // (one holding files the writer did not write is kept by prune)
                let foreign = inventory::foreign_files(&e.path);
                if matches!(st, Standing::Superseded) && foreign.is_empty() {
                    n_prunable += 1;
                    prunable_bytes += e.bytes;
                }
                let skipped = m.extra.get("skipped").and_then(|v| v.as_array()).map_or(0, Vec::len);
                let mut state = match st {
                    Standing::Current => "current".to_string(),
                    Standing::Superseded => "superseded: the dataset's files changed since".to_string(),
                    Standing::Other(d) => format!("other dataset: {d}"),
                    Standing::Orphan(d) => format!("orphan: {d} is gone"),
                    Standing::Relative(d) => format!("dataset unknown: recorded as the relative path {d}"),
                    Standing::Unknown => "ok".to_string(),
                };
                if skipped > 0 {
                    state.push_str(&format!(" ({} skipped)", crate::cmd::count(skipped, "input")));
                }
                // an edited manifest: its config is not what made the images (train, eval and
                // predict refuse it, `cmd::open_cache`)
                if let Some(h) = serde_json::from_value::<gz_preprocess::PrepConfig>(m.prep_config.clone())
                    .ok()
                    .map(|c| c.hash())
                    .filter(|h| *h != m.config_hash)
                {
                    state = format!(
                        "damaged: manifest.json's prep_config hashes to {h}, not to the cache's {} (edited?)",
                        m.config_hash
                    );
                }
                if !foreign.is_empty() {
                    state.push_str(&format!(
                        " (holds files the cache writer did not write: {}; kept by prune and remove)",
                        foreign.join(", ")
                    ));
                }
                (
                    rows("train"),
                    rows("test"),
                    config_text(&m.prep_config, &m.extra),
                    state,
                )
            }
            EntryState::Damaged(why) => ("?".into(), "?".into(), String::new(), format!("damaged: {why}")),
            EntryState::Incomplete => (
                "?".into(),
                "?".into(),
                String::new(),
                "incomplete: no manifest.json (a write that never finished)".into(),
            ),
            EntryState::Leftover { kind, name, pid, alive } => {
                let what = match kind {
                    LeftoverKind::Writing => format!("being written by process {pid}"),
                    LeftoverKind::Damaged => format!("damaged copy of {name} moved aside by process {pid}"),
                    LeftoverKind::Removing => format!("removal of {name} by process {pid}"),
                };
                let state = if *alive {
                    format!("{what} (running)")
                } else if prunable_leftover(e, now) {
                    n_prunable += 1;
                    prunable_bytes += e.bytes;
                    format!("leftover: {what}, which has ended")
                } else {
                    format!(
                        "{what}, not running here but written to in the last {} min (kept by prune: a writer on \
                         another machine?)",
                        RECENT_WRITE.as_secs() / 60
                    )
                };
                ("-".into(), "-".into(), String::new(), state)
            }
        };
        rows.push([name, human_bytes(e.bytes), train, test, config, age, state]);
    }
    print!("{}", table(&rows));
    println!(
        "{}{}, {} in all{}",
        crate::cmd::count(n_caches, "cache"),
        match entries.len() - n_caches {
            0 => String::new(),
            n => format!(
                " and {} (damaged, incomplete or leftovers)",
                crate::cmd::count(n, "other folder")
            ),
        },
        human_bytes(total),
        if n_prunable > 0 {
            format!(
                "; `gz cache prune {}` frees {} ({})",
                match &at.data {
                    Some(d) => format!(
                        "--data {} --cache {}",
                        crate::cmd::shell_path(d),
                        crate::cmd::shell_path(&root)
                    ),
                    None => format!("--cache {}", crate::cmd::shell_path(&root)),
                },
                human_bytes(prunable_bytes),
                crate::cmd::count(n_prunable, "folder")
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

fn prune(at: &Where, orphans: bool, dry_run: bool) -> anyhow::Result<()> {
    let (root, dataset) = resolve(at)?;
    let now = SystemTime::now();
    let entries = inventory::scan_root(&root).with_context(|| format!("listing {}", root.display()))?;
    let mut freed = 0u64;
    let mut removed = 0usize;
    let mut failed = 0usize;
    for e in &entries {
        let why = if prunable_leftover(e, now) {
            Some("leftover of an ended process")
        } else {
            match standing(e, dataset.as_ref()) {
                Standing::Superseded => Some("superseded: the dataset's files changed since it was built"),
                Standing::Orphan(_) if orphans => Some("orphan: its dataset folder is gone"),
                _ => None,
            }
        };
        let Some(why) = why else { continue };
        // a cache holding what the writer did not write is kept (`inventory::remove` refuses
        // it): said, not counted as a failure
        let foreign = inventory::foreign_files(&e.path);
        if !foreign.is_empty() && !matches!(e.state, EntryState::Leftover { .. }) {
            println!(
                "{}: {} ({why}, but it holds files the cache writer did not write: {}; move them out to remove it)",
                if dry_run { "would keep" } else { "kept" },
                e.path.display(),
                foreign.join(", ")
            );
            continue;
        }
        if dry_run {
            println!("would remove: {} ({}, {why})", e.path.display(), human_bytes(e.bytes));
        } else {
            match inventory::remove(&e.path) {
                Ok(()) => println!("removed: {} ({}, {why})", e.path.display(), human_bytes(e.bytes)),
                Err(err) => {
                    eprintln!("error: {err}");
                    failed += 1;
                    continue;
                }
            }
        }
        freed += e.bytes;
        removed += 1;
    }
    let verb = if dry_run { "would free" } else { "freed" };
    println!(
        "{verb} {} in {} under {}",
        human_bytes(freed),
        crate::cmd::count(removed, "folder"),
        root.display()
    );
    if !orphans && !dry_run {
        let n = entries
            .iter()
            .filter(|e| matches!(standing(e, dataset.as_ref()), Standing::Orphan(_)))
            .count();
        if n > 0 {
            println!(
                "{} of dataset folders that are gone {} kept (--orphans removes {})",
                crate::cmd::count(n, "cache"),
                if n == 1 { "was" } else { "were" },
                if n == 1 { "it" } else { "them" }
            );
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "{} could not be removed (listed above)",
            crate::cmd::count(failed, "folder")
        );
    }
    Ok(())
}

fn remove(dirs: &[PathBuf]) -> anyhow::Result<()> {
    // one folder named twice (`C` and `C/`, or through a link): removed once, not reported as
    // a failure the second time
    let mut seen = std::collections::HashSet::new();
    let dirs: Vec<&PathBuf> = dirs
        .iter()
        .filter(|d| seen.insert(d.canonicalize().unwrap_or_else(|_| d.to_path_buf())))
        .collect();
    let mut failed = 0;
    for d in dirs.iter().copied() {
        let (bytes, _) = inventory::classify(
            d,
            &d.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        )
        .map_or((0, None), |e| (e.bytes, e.modified));
        match inventory::remove(d) {
            Ok(()) => println!("removed: {} ({})", d.display(), human_bytes(bytes)),
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} not removed (listed above)",
            crate::cmd::count(dirs.len(), "folder")
        );
    }
    Ok(())
}

/// The rows of `list` in columns as wide as their widest cell (a leftover's name is longer
/// than a cache's, a config with bicubic longer than one with area): folder and config to the
/// left, the numbers to the right, the state last and unpadded.
fn table(rows: &[[String; 7]]) -> String {
    let mut w = [0usize; 7];
    for r in rows {
        for (w, c) in w.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for [name, size, train, test, config, age, state] in rows {
        out.push_str(&format!(
            "{name:<0$} {size:>1$} {train:>2$} {test:>3$}  {config:<4$} {age:>5$}  {state}\n",
            w[0], w[1], w[2], w[3], w[4], w[5]
        ));
    }
    out
}

/// `crop 212 → 106 area v1`.
fn config_text(cfg: &serde_json::Value, extra: &serde_json::Value) -> String {
    let n = |k: &str| {
        cfg.get(k)
            .and_then(|v| v.as_u64())
            .map_or_else(|| "?".into(), |v| v.to_string())
    };
    let filter = cfg.get("filter").and_then(|v| v.as_str()).unwrap_or("?");
    let version = extra
        .get("prep_version")
        .and_then(|v| v.as_u64())
        .map_or_else(String::new, |v| format!(" v{v}"));
    format!("crop {} → {} {filter}{version}", n("crop"), n("size"))
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `5 s ago`, `3 min ago`, `2 h ago`, `4 d ago`.
fn ago(now: SystemTime, then: SystemTime) -> String {
    let s = now.duration_since(then).map_or(0, |d| d.as_secs());
    match s {
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500), "1.5 kB");
        assert_eq!(human_bytes(9_500_000_000), "9.5 GB");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        assert_eq!(ago(t, t), "0 s ago");
        assert_eq!(ago(t + std::time::Duration::from_secs(7_200), t), "2 h ago");
        assert_eq!(ago(t + std::time::Duration::from_secs(3 * 86_400), t), "3 d ago");
        // a clock set back: not a panic
        assert_eq!(ago(t, t + std::time::Duration::from_secs(5)), "0 s ago");
    }

    /// A leftover's name (longer than a cache's) and a long config keep the columns aligned.
    #[test]
    fn the_table_stays_aligned_with_long_cells() {
        let row = |c: [&str; 7]| c.map(String::from);
        let text = table(&[
            row(["folder", "size", "train", "test", "config", "built", "state"]),
            row([
                "0cf8d36548fe587e-bd482467ae5d24f1",
                "10.7 MB",
                "1500",
                "200",
                "crop 212 → 106 bicubic v2",
                "6 min ago",
                "current",
            ]),
            row([
                ".0cf8d36548fe587e-bd482467ae5d24f1.tmp-4194300",
                "0 B",
                "-",
                "-",
                "",
                "?",
                "leftover",
            ]),
        ]);
        // in characters: where the size column ends ("size", "MB", " B") and the state begins
        let edges: Vec<(usize, usize)> = text
            .lines()
            .map(|l| {
                let c: Vec<char> = l.chars().collect();
                let size_end = (3..c.len())
                    .find(|&i| c[i] == ' ' && matches!(c[i - 1], 'e' | 'B'))
                    .unwrap();
                let last = l.split_whitespace().last().unwrap().chars().count();
                (size_end, c.len() - last)
            })
            .collect();
        assert!(edges.iter().all(|e| *e == edges[0]), "{edges:?}\n{text}");
    }

    #[test]
    fn the_config_reads_as_a_line() {
        let cfg = serde_json::json!({"crop": 212, "size": 32, "filter": "area"});
        let extra = serde_json::json!({"prep_version": 2});
        assert_eq!(config_text(&cfg, &extra), "crop 212 → 32 area v2");
        assert_eq!(
            config_text(&serde_json::json!({}), &serde_json::json!({})),
            "crop ? → ? ?"
        );
    }

    /// An older gz recorded `data_dir` as given; `.` resolved from here is whatever folder
    /// `gz cache` runs in, not the one `gz prep` ran in: never superseded (so never pruned).
    #[test]
    fn a_relative_recorded_dataset_folder_is_not_called_superseded() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("k-abc");
        let cfg = serde_json::json!({"crop": 4, "size": 2});
        let mut w = gz_shards::CacheWriter::create(&dir, &cfg, "abc", 4).unwrap();
        let mut s = w.begin_split("test", [1, 2, 2], false).unwrap();
        s.push(1, &[gz_shards::f16::from_f32(1.0); 4], None).unwrap();
        w.end_split(s).unwrap();
        w.finish(serde_json::json!({"dataset_key": "old", "data_dir": "."}))
            .unwrap();
        let entry = inventory::classify(&dir, "k-abc").unwrap();
        let here = PathBuf::from(".").canonicalize().unwrap();
        let st = standing(&entry, Some(&(here, "new".to_string())));
        assert_eq!(st, Standing::Relative(".".into()));
    }

    #[test]
    fn a_dead_writers_folder_written_to_recently_is_kept() {
        let now = SystemTime::now();
        let entry = |kind, alive, age_s: Option<u64>| Entry {
            path: PathBuf::from("/r/.c.tmp-1"),
            bytes: 1,
            modified: age_s.map(|a| now - std::time::Duration::from_secs(a)),
            state: EntryState::Leftover {
                kind,
                name: "c".into(),
                pid: 1,
                alive,
            },
        };
        assert!(prunable_leftover(&entry(LeftoverKind::Writing, false, Some(3600)), now));
        assert!(prunable_leftover(&entry(LeftoverKind::Writing, false, None), now));
        assert!(!prunable_leftover(&entry(LeftoverKind::Writing, false, Some(60)), now));
        assert!(!prunable_leftover(&entry(LeftoverKind::Writing, true, Some(3600)), now));
        // a removal or a damaged copy moved aside is dead weight however recent
        assert!(prunable_leftover(&entry(LeftoverKind::Removing, false, Some(60)), now));
        assert!(prunable_leftover(&entry(LeftoverKind::Damaged, false, Some(60)), now));
    }

    #[test]
    fn a_root_that_is_a_cache_is_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("manifest.json"), "{}").unwrap();
        for (cache, root) in [
            (Some(t.path().to_path_buf()), None),
            (None, Some(t.path().to_path_buf())),
        ] {
            let e = resolve(&Where {
                data: None,
                cache,
                root,
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains("is a cache itself"), "{e}");
        }
    }
}
