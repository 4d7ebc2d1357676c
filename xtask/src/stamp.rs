//! Stage stamps: what a stage ran with and what it produced, so a rerun can be skipped.
//!
//! A stamp (`<root>/data/stamps/<stage>-<key>.json`) records the exact `gz` command line, the
//! identities of the stage's inputs (upstream artifacts, see [`crate::fingerprint`]), and each
//! output's path and identity, plus the stage's stdout (to reprint a score table when skipped).
//! A stage is up to date when the command and input identities are the same and every output
//! still has the identity it had when the stage finished. Downstream stages take upstream
//! outputs' identities as inputs, so rerunning a stage invalidates everything after it.
//!
//! Paths in the root are written `<root>/…` in the file (commands, outputs, stdout) and read
//! back under the root the stamp lies in, and the file is named by the key's path relative to
//! the root and by the root folder's inode: a root moved with `mv` keeps its stamps,
//! and two roots sharing `data/` (a link) keep theirs apart.

use crate::fingerprint;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// One artifact a stage produced. `members` narrows the identity to some files of a folder that
/// other stages may also write into (e.g. a report folder that also receives the submission).
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub label: String,
    pub path: PathBuf,
    pub members: Vec<String>,
}

impl Output {
    pub fn new(label: &str, path: &Path, members: &[&str]) -> Self {
        Self {
            label: label.into(),
            path: path.to_path_buf(),
            members: members.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Identity of the members (or of the whole path when no member exists or none are named).
    pub fn identity(&self) -> Result<String> {
        if !self.members.is_empty() && self.members.iter().any(|m| self.path.join(m).exists()) {
            let m: Vec<&str> = self.members.iter().map(String::as_str).collect();
            fingerprint::identity_of(&self.path, &m)
        } else {
            fingerprint::identity(&self.path)
        }
    }
}

#[derive(Debug, Clone)]
pub struct Stamp {
    pub command: Vec<String>,
    pub inputs: Vec<(String, String)>,
    pub outputs: Vec<(Output, String)>,
    pub stdout: String,
}

/// Where the stamp of `stage` for the artifact `key` lives: named by the key's path relative
/// to the root when it lies in it (a root moved with `mv` keeps its stamps), else by the
/// absolute path.
pub fn stamp_path(root: &Path, stage: &str, key: &Path) -> PathBuf {
    let name = match (key.strip_prefix(root), root_id(root)) {
        (Ok(rel), Some(id)) => format!("{ROOT_MARK}{id}/{}", rel.to_string_lossy()),
        // (a root not made yet: named as before 2026-12-01, which `Stamp::find` reads too)
        _ => key.to_string_lossy().into_owned(),
    };
    stamp_file(root, stage, &name)
}

/// Which folder the root is, whatever its path: its inode, which `mv` within a file
/// system keeps. Two roots whose `data/` links to one folder (a larger disk) share
/// `data/stamps`; named by the path in the root alone, their stamps were one file, and each
/// root trained again after the other ran.
fn root_id(root: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // (the inode alone: a device number can change with a reboot or a remount, NFS or
        // btrfs subvolumes, and every stage would then run again)
        let m = std::fs::metadata(root).ok()?;
        Some(format!("#{}", m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = root;
        None
    }
}

/// Where an xtask from before 2026-12-01 kept that stamp (named by the key's absolute path);
/// [`Stamp::find`] still reads it.
pub fn legacy_stamp_path(root: &Path, stage: &str, key: &Path) -> PathBuf {
    stamp_file(root, stage, &key.to_string_lossy())
}

fn stamp_file(root: &Path, stage: &str, name: &str) -> PathBuf {
    let k = fingerprint::hash_str(name);
    root.join("data").join("stamps").join(format!("{stage}-{k}.json"))
}

/// What stands for the root in a stamp's file: its commands, output paths and stdout name
/// paths in the root so, and read back under the root the stamp lies in now.
const ROOT_MARK: &str = "<root>";

/// The root a stamp file at `path` belongs to (`<root>/data/stamps/NAME.json`).
fn root_of(path: &Path) -> Option<&Path> {
    path.parent()?.parent()?.parent()
}

/// `text` with the paths under `root` written with [`ROOT_MARK`]: the whole text when it is
/// the root, else each `root/` that starts the text or follows a space, a line break, `=`,
/// `:`, `(` or a quote (with root `/r`, `/mnt/r/kaggle` is not under it).
fn to_mark(text: &str, root: &str) -> String {
    if text == root {
        return ROOT_MARK.to_string();
    }
    let prefix = format!("{root}/");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(&prefix) {
        let starts_a_path = match out.chars().last().into_iter().chain(rest[..i].chars().last()).last() {
            None => true,
            Some(c) => c.is_whitespace() || "=:(\'\"".contains(c),
        };
        out.push_str(&rest[..i]);
        out.push_str(if starts_a_path { ROOT_MARK } else { root });
        out.push('/');
        rest = &rest[i + prefix.len()..];
    }
    out.push_str(rest);
    out
}

/// Command words with the paths under `root` written with [`ROOT_MARK`], as stamps hold them
/// (for xtask's run note, which must survive a moved root too).
pub fn marked(words: &[String], root: &Path) -> Vec<String> {
    let root = root.to_string_lossy();
    words.iter().map(|w| to_mark(w, &root)).collect()
}

/// [`to_mark`] undone under `root`.
fn from_mark(text: &str, root: &str) -> String {
    if text == ROOT_MARK {
        root.to_string()
    } else {
        text.replace(&format!("{ROOT_MARK}/"), &format!("{root}/"))
    }
}

impl Stamp {
    /// The stamp of `stage` for `key`: at [`stamp_path`], else at [`legacy_stamp_path`].
    #[cfg(test)]
    pub fn find(root: &Path, stage: &str, key: &Path) -> Option<Stamp> {
        Self::find_spelled(root, root, stage, key).map(|(s, _)| s)
    }

    /// [`Self::find`], and where it lay; `typed` is the root as the command line spelled it
    /// (through a link, say), which an xtask from before 2026-12-01 did not resolve: its stamps
    /// are named by, and name, paths under that spelling, read here as under `root`.
    pub fn find_spelled(root: &Path, typed: &Path, stage: &str, key: &Path) -> Option<(Stamp, PathBuf)> {
        let mut candidates = vec![
            (stamp_path(root, stage, key), false),
            (legacy_stamp_path(root, stage, key), false),
        ];
        if typed != root {
            if let Ok(rel) = key.strip_prefix(root) {
                candidates.push((legacy_stamp_path(root, stage, &typed.join(rel)), true));
            }
        }
        candidates.into_iter().find_map(|(p, respell)| {
            let mut s = Self::load(&p)?;
            if respell {
                let (from, to) = (typed.to_string_lossy(), root.to_string_lossy());
                let conv = |x: &str| from_mark(&to_mark(x, &from), &to);
                s.command = s.command.iter().map(|w| conv(w)).collect();
                for (o, _) in &mut s.outputs {
                    o.path = PathBuf::from(conv(&o.path.to_string_lossy()));
                }
                s.stdout = conv(&s.stdout);
            }
            Some((s, p))
        })
    }

    /// Reads a stamp, its paths in the root read under the root it lies in now; a missing or
    /// unreadable one is `None` (the stage simply runs).
    pub fn load(path: &Path) -> Option<Stamp> {
        let text = std::fs::read_to_string(path).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        let root = root_of(path)?.to_string_lossy().into_owned();
        let unmark = |s: &str| from_mark(s, &root);
        let strs =
            |v: &Value| -> Option<Vec<String>> { v.as_array()?.iter().map(|x| x.as_str().map(&unmark)).collect() };
        let inputs = v["inputs"]
            .as_array()?
            .iter()
            .map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
            .collect::<Option<Vec<_>>>()?;
        let outputs = v["outputs"]
            .as_array()?
            .iter()
            .map(|o| {
                Some((
                    Output {
                        label: o["label"].as_str()?.to_string(),
                        path: PathBuf::from(unmark(o["path"].as_str()?)),
                        members: strs(&o["members"])?,
                    },
                    o["identity"].as_str()?.to_string(),
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Stamp {
            command: strs(&v["command"])?,
            inputs,
            outputs,
            stdout: unmark(v["stdout"].as_str().unwrap_or_default()),
        })
    }

    /// Records the outputs' current identities and writes the stamp (temp file + rename).
    pub fn save(
        path: &Path,
        stage: &str,
        command: &[String],
        inputs: &[(String, String)],
        outputs: &[Output],
        stdout: &str,
    ) -> Result<Stamp> {
        let mut outs = Vec::new();
        for o in outputs {
            outs.push((o.clone(), o.identity()?));
        }
        let root = root_of(path)
            .context("stamp path has no root")?
            .to_string_lossy()
            .into_owned();
        let mark = |s: &str| to_mark(s, &root);
        let v = json!({
            "stage": stage,
            "command": command.iter().map(|w| mark(w)).collect::<Vec<_>>(),
            "inputs": inputs.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
            "outputs": outs.iter().map(|(o, id)| json!({
                "label": o.label, "path": mark(&o.path.to_string_lossy()), "members": o.members, "identity": id,
            })).collect::<Vec<_>>(),
            "stdout": mark(stdout),
        });
        let dir = path.parent().context("stamp path has no parent")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
        Ok(Stamp {
            command: command.to_vec(),
            inputs: inputs.to_vec(),
            outputs: outs,
            stdout: stdout.into(),
        })
    }

    /// `None` when up to date, else the reason the stage must run.
    pub fn stale_reason(&self, command: &[String], inputs: &[(String, String)]) -> Result<Option<String>> {
        if !same_command(&self.command, command) {
            return Ok(Some(format!(
                "its command line changed{}",
                command_change(&self.command, command)
            )));
        }
        if self.inputs != inputs {
            // (named: `its inputs changed (training split)`; all of them when the names differ)
            let changed: Vec<&str> = inputs
                .iter()
                .filter(|(k, v)| !self.inputs.iter().any(|(k2, v2)| k2 == k && v2 == v))
                .map(|(k, _)| k.as_str())
                .collect();
            return Ok(Some(if changed.is_empty() {
                "its inputs changed".into()
            } else {
                format!("its inputs changed ({})", changed.join(", "))
            }));
        }
        for (o, id) in &self.outputs {
            let now = o.identity()?;
            if &now != id {
                let why = if now == "missing" { "is missing" } else { "changed" };
                return Ok(Some(format!("its output {} ({}) {why}", o.label, o.path.display())));
            }
        }
        Ok(None)
    }

    pub fn output(&self, label: &str) -> Option<&Path> {
        self.outputs
            .iter()
            .find(|(o, _)| o.label == label)
            .map(|(o, _)| o.path.as_path())
    }
}

/// Whether two stamped command lines ask for the same: the same commands (joined by `&&`),
/// each with the same words before its first option (program, subcommand) and the same options
/// with the same values in any order. (`--train-arg --no-augment` puts xtask's own
/// `--no-augment` at the end of the command: the same run, which was trained again, or an
/// interrupted one started over, with no change to name.)
pub(crate) fn same_command(a: &[String], b: &[String]) -> bool {
    // (a flag and its `--no-` form override each other, the last one winning: their order
    // matters, so a command holding both is compared as written)
    let overrides = |c: &[String]| {
        c.iter().any(|w| {
            w.strip_prefix("--no-")
                .is_some_and(|f| c.iter().any(|x| x.strip_prefix("--") == Some(f)))
        })
    };
    if overrides(a) || overrides(b) {
        return a == b;
    }
    fn parts(cmd: &[String]) -> Vec<(Vec<&String>, Vec<Vec<&String>>)> {
        cmd.split(|w| w == "&&")
            .map(|part| {
                let lead: Vec<&String> = part.iter().take_while(|w| !w.starts_with("--")).collect();
                let mut options: Vec<Vec<&String>> = Vec::new();
                for w in &part[lead.len()..] {
                    match options.last_mut() {
                        Some(o) if !w.starts_with("--") => o.push(w),
                        _ => options.push(vec![w]),
                    }
                }
                options.sort();
                (lead, options)
            })
            .collect()
    }
    parts(a) == parts(b)
}

/// What changed between two command lines, as ` (--epochs 1 → 2, --no-augment added)`: the
/// options (a word starting with `--` and the words after it up to the next one) taken as
/// multisets, removed and added ones paired by name; the program (the first word) said when it
/// is another; empty when nothing is named (the same options in another order).
pub(crate) fn command_change(old: &[String], new: &[String]) -> String {
    fn options(cmd: &[String]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for w in cmd.iter().skip(1) {
            match out.last_mut() {
                // (a stage of two commands is stamped as one line joined by `&&`: the next
                // program and subcommand are the value of `&&`)
                _ if w.starts_with("--") || w == "&&" => out.push((w.clone(), String::new())),
                Some(last) if !last.0.is_empty() => {
                    if !last.1.is_empty() {
                        last.1.push(' ');
                    }
                    last.1.push_str(w);
                }
                // words before any option (a subcommand): kept as a value of no option
                _ => out.push((String::new(), w.clone())),
            }
        }
        out
    }
    let (mut was, mut now) = (options(old), options(new));
    // the multiset differences
    let mut i = 0;
    while i < was.len() {
        if let Some(j) = now.iter().position(|p| *p == was[i]) {
            now.remove(j);
            was.remove(i);
        } else {
            i += 1;
        }
    }
    let mut said = Vec::new();
    if old.first() != new.first() {
        said.push("another gz".to_string());
    }
    for (name, value) in &was {
        let shown = |v: &str| {
            if v.is_empty() {
                "(set)".to_string()
            } else {
                v.to_string()
            }
        };
        match now.iter().position(|p| p.0 == *name) {
            Some(j) => {
                let (_, to) = now.remove(j);
                said.push(format!("{name} {} → {}", shown(value), shown(&to)).trim().to_string());
            }
            None => said.push(format!("{name} {value} removed").replace("  ", " ").trim().to_string()),
        }
    }
    for (name, value) in &now {
        said.push(format!("{name} {value} added").replace("  ", " ").trim().to_string());
    }
    // (a stage of two commands joined by `&&` changed alike in both, `--tta 8 → 1`: said once)
    let mut seen = std::collections::HashSet::new();
    said.retain(|s| seen.insert(s.clone()));
    if said.is_empty() {
        return String::new();
    }
    let more = said.len().saturating_sub(4);
    said.truncate(4);
    if more > 0 {
        said.push(format!("{more} more"));
    }
    format!(" ({})", said.join(", "))
}

/// Writes `bytes` to `path` through a temporary beside it and a rename, so that a kill or a full
/// disk never leaves a half-written file under the final name. A temporary that could not be
/// written whole is removed (stamps have a name per stage and output, so one per failed stage
/// and output would otherwise stay in data/stamps).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let written = std::fs::write(&tmp, bytes)
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| std::fs::rename(&tmp, path).with_context(|| format!("publishing {}", path.display())));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reason names what changed in a command line (it said only "its command line
    /// changed", and an --epochs change read like anything else).
    #[test]
    fn a_changed_command_line_names_the_options() {
        let w = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let old = w("gz train --cache C --epochs 1 --no-augment --out R");
        assert_eq!(
            command_change(&old, &w("gz train --cache C --epochs 2 --no-augment --out R")),
            " (--epochs 1 → 2)"
        );
        assert_eq!(
            command_change(&old, &w("gz train --cache C --epochs 1 --out R --seed 3")),
            " (--no-augment removed, --seed 3 added)"
        );
        assert_eq!(
            command_change(&old, &w("/other/gz train --cache C --epochs 1 --no-augment --out R")),
            " (another gz)"
        );
        // the same options in another order: nothing to name
        assert_eq!(
            command_change(&old, &w("gz train --out R --cache C --epochs 1 --no-augment")),
            ""
        );
        // a stage of two commands changed alike in both: said once
        let two = w("gz eval --tta 8 --run R && gz eval --split test --tta 8 --run R");
        assert_eq!(
            command_change(
                &two,
                &w("gz eval --tta 1 --run R && gz eval --split test --tta 1 --run R")
            ),
            " (--tta 8 → 1)"
        );
    }

    /// A stamp names the paths in its root relative to it: moved with the root, it reads back
    /// under the new one (up to date there); one an earlier xtask kept under the absolute
    /// path's name is still found.
    #[test]
    fn a_stamp_moves_with_its_root_and_the_old_name_is_found() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        let out = a.join("runs/r");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("best.json"), b"{}").unwrap();
        let cmd = |root: &Path| {
            vec![
                "train".to_string(),
                "--out".into(),
                root.join("runs/r").display().to_string(),
                "--data".into(),
                "/elsewhere/data".into(),
            ]
        };
        let outputs = |root: &Path| vec![Output::new("run", &root.join("runs/r"), &[])];
        let stdout = |root: &Path| format!("run: {}\nscore 0.1\n", root.join("runs/r").display());
        Stamp::save(
            &stamp_path(&a, "train", &out),
            "train",
            &cmd(&a),
            &[],
            &outputs(&a),
            &stdout(&a),
        )
        .unwrap();
        let text = std::fs::read_to_string(stamp_path(&a, "train", &out)).unwrap();
        assert!(
            text.contains("<root>/runs/r") && !text.contains(&a.display().to_string()),
            "{text}"
        );
        std::fs::rename(&a, &b).unwrap();
        let s = Stamp::find(&b, "train", &b.join("runs/r")).expect("found under the moved root");
        assert_eq!(s.command, cmd(&b));
        assert_eq!(s.output("run"), Some(b.join("runs/r").as_path()));
        assert_eq!(s.stdout, stdout(&b));
        assert_eq!(s.stale_reason(&cmd(&b), &[]).unwrap(), None);

        // an earlier xtask's: named by the absolute path, paths as they were
        let legacy = legacy_stamp_path(&b, "train", &b.join("runs/r"));
        assert_ne!(legacy, stamp_path(&b, "train", &b.join("runs/r")));
        std::fs::remove_file(stamp_path(&b, "train", &b.join("runs/r"))).unwrap();
        assert!(Stamp::find(&b, "train", &b.join("runs/r")).is_none());
        let old = serde_json::json!({
            "stage": "train", "command": cmd(&b), "inputs": [],
            "outputs": [{"label": "run", "path": b.join("runs/r"), "members": [], "identity": "x"}],
            "stdout": "",
        });
        std::fs::write(&legacy, old.to_string()).unwrap();
        let s = Stamp::find(&b, "train", &b.join("runs/r")).expect("the old name");
        assert_eq!(s.command, cmd(&b));

        // an earlier xtask's under a root typed through a link (it did not resolve it): named
        // by, and naming, the linked paths; read as under the real root
        #[cfg(unix)]
        {
            std::fs::remove_file(&legacy).unwrap();
            let link = t.path().join("link");
            std::os::unix::fs::symlink(&b, &link).unwrap();
            let old = serde_json::json!({
                "stage": "train", "command": cmd(&link), "inputs": [],
                "outputs": [{"label": "run", "path": link.join("runs/r"), "members": [], "identity": "x"}],
                "stdout": stdout(&link),
            });
            let typed_legacy = legacy_stamp_path(&b, "train", &link.join("runs/r"));
            std::fs::write(&typed_legacy, old.to_string()).unwrap();
            assert!(Stamp::find(&b, "train", &b.join("runs/r")).is_none());
            let (s, at) = Stamp::find_spelled(&b, &link, "train", &b.join("runs/r")).expect("the linked name");
            assert_eq!(at, typed_legacy);
            assert_eq!(s.command, cmd(&b));
            assert_eq!(s.output("run"), Some(b.join("runs/r").as_path()));
            assert_eq!(s.stdout, stdout(&b));
        }
    }

    /// Options in another order are the same command; another value, another subcommand, an
    /// option moved to the other command of a stage, or a value moved to another option are not.
    #[test]
    fn the_same_options_in_another_order_are_the_same_command() {
        let w = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let a = w("train --cache C --no-augment --epochs 3 --out R");
        assert!(same_command(&a, &w("train --cache C --epochs 3 --out R --no-augment")));
        let s = Stamp {
            command: a.clone(),
            inputs: vec![],
            outputs: vec![],
            stdout: String::new(),
        };
        assert_eq!(
            s.stale_reason(&w("train --out R --cache C --epochs 3 --no-augment"), &[])
                .unwrap(),
            None
        );
        for other in [
            "train --cache C --no-augment --epochs 4 --out R",
            "eval --cache C --no-augment --epochs 3 --out R",
            "train --cache C --no-augment --epochs --out R 3",
            "train --cache C --epochs 3 --out R",
        ] {
            assert!(!same_command(&a, &w(other)), "{other}");
        }
        // a flag and its `--no-` form: the last one wins, so their order matters
        let both = w("train --augment --no-augment --out R");
        assert!(!same_command(&both, &w("train --no-augment --augment --out R")));
        assert!(same_command(&both, &both));
        let two = w("eval --split test --run R && eval --run R");
        assert!(same_command(&two, &w("eval --run R --split test && eval --run R")));
        assert!(!same_command(&two, &w("eval --run R && eval --split test --run R")));
    }

    /// Only a path that starts at the root is marked: `/mnt/r/kaggle` is not under root `/r`,
    /// and `/r2/x` is not either; `--out=/r/x`, `(/r/x)` and `'/r/x'` are.
    #[test]
    fn only_paths_under_the_root_are_marked() {
        for (text, marked) in [
            ("/r", "<root>"),
            ("/r/runs/x", "<root>/runs/x"),
            ("/mnt/r/kaggle", "/mnt/r/kaggle"),
            ("/r2/x", "/r2/x"),
            ("--out=/r/x", "--out=<root>/x"),
            (
                "cache: /r/c\nskipped: /r/d/a.jpg: cannot read",
                "cache: <root>/c\nskipped: <root>/d/a.jpg: cannot read",
            ),
            ("('/r/x') /mnt/r/y /r/z", "('<root>/x') /mnt/r/y <root>/z"),
        ] {
            assert_eq!(to_mark(text, "/r"), marked, "{text}");
            assert_eq!(from_mark(marked, "/r"), text, "{text}");
        }
        // moved: what was under the root follows it, nothing else
        assert_eq!(
            from_mark(&to_mark("--data /mnt/r/k --out /r/x", "/r"), "/b"),
            "--data /mnt/r/k --out /b/x"
        );
    }

    #[test]
    fn stamp_round_trip_and_staleness() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("best.json"), b"{}").unwrap();
        let sp = stamp_path(t.path(), "train", &out);
        assert!(Stamp::load(&sp).is_none());
        let cmd = vec!["gz".to_string(), "train".to_string()];
        let inputs = vec![("cache".to_string(), "files=1".to_string())];
        let outputs = vec![Output::new("run", &out, &["best.json"])];
        Stamp::save(&sp, "train", &cmd, &inputs, &outputs, "ok\n").unwrap();
        let s = Stamp::load(&sp).expect("stamp reads back");
        assert_eq!(s.stdout, "ok\n");
        assert_eq!(s.output("run"), Some(out.as_path()));
        assert_eq!(s.stale_reason(&cmd, &inputs).unwrap(), None);
        // another file in the folder does not matter: only the member is tracked
        std::fs::write(out.join("submission.csv"), b"x").unwrap();
        assert_eq!(s.stale_reason(&cmd, &inputs).unwrap(), None);
        let other = vec!["gz".to_string(), "train".to_string(), "--epochs".to_string()];
        assert!(s.stale_reason(&other, &inputs).unwrap().unwrap().contains("command"));
        let changed = vec![("cache".to_string(), "files=2".to_string())];
        assert!(s.stale_reason(&cmd, &changed).unwrap().unwrap().contains("inputs"));
        std::fs::remove_file(out.join("best.json")).unwrap();
        let why = s.stale_reason(&cmd, &inputs).unwrap().unwrap();
        assert!(why.contains("changed") || why.contains("missing"), "{why}");
    }

    /// A stamp that cannot be written (No space left on device: its temporary is a link to
    /// /dev/full) is an error naming it and the cause, and leaves neither the stamp nor its
    /// temporary behind. (`cargo xtask pipeline` on a full disk left `STAGE-HASH.json.tmp` in
    /// data/stamps, one per stage and output, never removed.)
    #[cfg(target_os = "linux")]
    #[test]
    fn a_stamp_that_cannot_be_written_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let sp = stamp_path(t.path(), "submit", &out);
        std::fs::create_dir_all(sp.parent().unwrap()).unwrap();
        let tmp = sp.with_extension("json.tmp");
        std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
        let cmd = vec!["gz".to_string(), "submit".to_string()];
        let e = Stamp::save(&sp, "submit", &cmd, &[], &[], "ok\n").unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("No space left on device") && msg.contains(&*tmp.to_string_lossy()),
            "{msg}"
        );
        assert!(!sp.exists(), "{}", sp.display());
        assert!(
            std::fs::symlink_metadata(&tmp).is_err(),
            "{} left behind",
            tmp.display()
        );
        // with room again: written
        Stamp::save(&sp, "submit", &cmd, &[], &[], "ok\n").unwrap();
        assert_eq!(Stamp::load(&sp).unwrap().stdout, "ok\n");
    }
}
