//! One module per subcommand: each owns its `Args` (clap) and its `run`.
pub mod bench_train;
pub mod cache;
pub mod eval;
pub mod predict;
pub mod prep;
pub mod submit;
pub mod synth;
pub mod train;

/// `n` and a noun, plural unless `n` is 1: `1 step`, `2 steps`, `0 images` (for nouns whose
/// plural adds an `s`). Tiny sets make counts of 1 common: "1 steps/epoch" read wrong.
pub fn count(n: usize, noun: &str) -> String {
    gz_schema::count(n, noun)
}

/// A path as one shell word, for the commands gz prints to be copied (`gz cache prune --data
/// …`): as it is when it holds only characters no shell splits or expands, else in single quotes
/// (a `'` inside as `'\''`).
pub fn shell_path(p: &std::path::Path) -> String {
    let s = p.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./,:@%+=".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Most worker threads `--threads` may ask for: each is an operating-system thread with its
/// own stack, and 100,000 of them ran for a quarter of an hour on 3 images before anything
/// was written.
pub const MAX_THREADS: usize = 1024;

/// Checks a `--threads` value: at least 1, at most [`MAX_THREADS`].
pub fn check_threads(threads: Option<usize>) -> anyhow::Result<()> {
    match threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) if n > MAX_THREADS => anyhow::bail!(
            "--threads {n}: at most {MAX_THREADS} (this machine runs {} at once; leave --threads out to use them all)",
            std::thread::available_parallelism().map_or(1, |p| p.get())
        ),
        _ => Ok(()),
    }
}

/// A path (or file name) for a one-line message: control characters (a newline or a tab in a
/// file name) written as escapes, so that a name cannot split or forge the lines tools read
/// (`skipped: …`), the rest as `display` writes it.
pub fn shown(p: impl AsRef<std::path::Path>) -> String {
    p.as_ref()
        .display()
        .to_string()
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Refuses, before any work, an output path that cannot be written (`flag` names the option):
/// an existing folder where a file goes (`folder: false`), an existing file where a folder goes,
/// or a file among the folders above it. Missing folders are fine: every gz command that writes
/// creates them (as `mkdir -p`), as `--help` says. (Outputs are then checked against the
/// inputs, [`check_not_an_input`], the CSV outputs against files gz would not have written,
/// [`check_replaceable`], and last whether their folder can be written in, [`check_writable`].)
pub fn check_output(flag: &str, path: &std::path::Path, folder: bool) -> anyhow::Result<()> {
    if !folder && path.as_os_str().as_encoded_bytes().last() == Some(&b'/') {
        anyhow::bail!(
            "{flag} {}: ends in '/', so it names a folder; name the file to write (e.g. {})",
            path.display(),
            path.join("out.csv").display()
        );
    }
    if let Some(file) = path.parent().and_then(|p| p.ancestors().find(|a| a.is_file())) {
        anyhow::bail!("{flag} {}: {} is a file, not a folder", path.display(), file.display());
    }
    check_not_in_data(flag, path)?;
    let meta = match std::fs::metadata(path) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        // a name too long, a folder that cannot be searched: found here, not after all the work
        Err(e) => anyhow::bail!("{flag} {}: {e}", path.display()),
    };
    if let Some(meta) = meta {
        if folder && !meta.is_dir() {
            anyhow::bail!("{flag} {}: exists and is not a folder", path.display());
        }
        if !folder && meta.is_dir() {
            anyhow::bail!(
                "{flag} {}: is a folder; name the file to write (e.g. {})",
                path.display(),
                path.join("out.csv").display()
            );
        }
        if !folder && !meta.is_file() {
            // found only when writing, after all the work, before this check
            anyhow::bail!(
                "{flag} {}: is not a regular file (a device, pipe or socket): gz writes each output whole, \
                 through a temporary file renamed into place, so it cannot write into one; name a file",
                path.display()
            );
        }
    }
    Ok(())
}

/// Refuses a CSV output (`flag` names the option) that exists and is a file gz would not have
/// written ([`foreign_file`]): a checkpoint, an image, a text, a dataset's labels; judged where
/// the write lands (through symbolic links, as the writers follow them).
pub fn check_replaceable(flag: &str, path: &std::path::Path) -> anyhow::Result<()> {
    let target = write_target(path).unwrap_or_else(|| path.to_path_buf());
    // nor made under a dataset label file's name, where gz would read it as labels
    if let Some(name) = target
        .file_name()
        .map(|n| n.to_string_lossy())
        .filter(|n| labels_name(n))
    {
        anyhow::bail!(
            "{flag} {}: {name} is the name of a dataset's labels, which gz reads as such: name the output otherwise",
            path.display()
        );
    }
    if !target.is_file() {
        return Ok(());
    }
    match foreign_file(&target) {
        Some(why) => anyhow::bail!(
            "{flag} {}: exists and {why}: gz replaces only a CSV of its own (remove the file first, or name another)",
            path.display()
        ),
        None => Ok(()),
    }
}

/// Why an existing file is not one a gz CSV output may replace, if it is not: a file that cannot
/// be read to tell, or one whose first line is not the header of a gz table
/// (`GalaxyID,Class1.1,…` or `file,Class1.1,…`: predictions, spreads and submissions). An empty
/// file may go. (A dataset's label files are refused by name first, [`labels_name`].)
fn foreign_file(path: &std::path::Path) -> Option<String> {
    use std::io::Read as _;
    let mut head = Vec::new();
    if let Err(e) = std::fs::File::open(path).and_then(|f| f.take(4096).read_to_end(&mut head)) {
        return Some(format!("cannot be read to tell whether gz wrote it ({e})"));
    }
    if head.is_empty() {
        return None;
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let line = line.trim_start_matches('\u{feff}').trim_end_matches('\r');
    let mut fields = line.split(',').map(|f| f.trim_matches('"'));
    let ours = matches!(fields.next(), Some("GalaxyID" | "file")) && fields.next() == Some("Class1.1");
    (!ours)
        .then(|| "is not a predictions CSV (its first line is not `GalaxyID,Class1.1,…` or `file,Class1.1,…`)".into())
}

/// Whether `name` is a dataset's label file's: the Kaggle layout's and the synthetic set's.
fn labels_name(name: &str) -> bool {
    [
        gz_synth::TRAIN_CSV,
        gz_synth::TEST_CSV,
        gz_synth::EXPECTED_TRAIN_CSV,
        gz_synth::EXPECTED_TEST_CSV,
    ]
    .contains(&name)
}

/// Refuses `FLAG -` when standard output was closed (`gz predict --out - >&-`): Rust's runtime
/// opens `/dev/null` read-write in place of a closed standard descriptor before `main`, so the
/// rows went there with exit status 0. A descriptor that is `/dev/null` opened for reading and
/// writing is taken for that (a shell's `>/dev/null` opens it write-only, and is obeyed; a
/// service whose standard output is `/dev/null` read-write, as systemd's `StandardOutput=null`
/// gives, is refused too: it would lose the rows as well). Checked before the work.
pub fn check_stdout(flag: &str) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        // SAFETY: fcntl(F_GETFL) and fstat/stat only read; `st` is a plain C struct
        let replaced = unsafe {
            let flags = libc::fcntl(1, libc::F_GETFL);
            let mut out: libc::stat = std::mem::zeroed();
            let mut null: libc::stat = std::mem::zeroed();
            flags == -1
                || (flags & libc::O_ACCMODE == libc::O_RDWR
                    && libc::fstat(1, &mut out) == 0
                    && libc::stat(c"/dev/null".as_ptr(), &mut null) == 0
                    && (out.st_mode & libc::S_IFMT) == libc::S_IFCHR
                    && out.st_rdev == null.st_rdev)
        };
        if replaced {
            anyhow::bail!("{flag} -: standard output is closed, so nothing would be written: name a file");
        }
    }
    let _ = flag;
    Ok(())
}

/// Refuses an output (`flag` names the option) whose folder does not let this process create a
/// file: the output folder itself where a folder goes (`folder`), else the folder the file lands
/// in (through symbolic links, as the writers follow them), or the nearest existing folder above
/// where folders are to be made. Found by making and removing a file of a hidden name, so
/// that a read-only or unwritable folder stops the command before its work, not after; called
/// after the checks against the inputs, so that nothing is made in a cache or an image folder.
pub fn check_writable(flag: &str, path: &std::path::Path, folder: bool) -> anyhow::Result<()> {
    if path == std::path::Path::new("-") {
        return check_stdout(flag);
    }
    let Some(target) = write_target(path) else {
        return Ok(());
    };
    let start = if folder {
        Some(target.as_path())
    } else {
        target.parent()
    };
    let Some(dir) = start.and_then(|p| p.ancestors().find(|a| a.is_dir())) else {
        return Ok(());
    };
    // a file of another user's in a sticky folder (`/tmp`) cannot be replaced, though the
    // folder takes new files: found here too
    #[cfg(unix)]
    if !folder && target.is_file() {
        use std::os::unix::fs::MetadataExt as _;
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        let me = unsafe { libc::geteuid() };
        if let (Ok(d), Ok(f)) = (std::fs::metadata(dir), std::fs::metadata(&target)) {
            if me != 0 && d.mode() & 0o1000 != 0 && f.uid() != me && d.uid() != me {
                anyhow::bail!(
                    "{flag} {}: the folder {} lets only a file's owner replace it, and this file is another \
                     user's: name another file",
                    path.display(),
                    dir.display()
                );
            }
        }
    }
    // (a name of this process and instant: another's is not touched; those of killed
    // processes are removed below once the folder proved writable)
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let probe = dir.join(format!(".gz-write-check.{}.{nanos}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            // the probes of processes killed between the two calls above
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = e.file_name();
                let pid = name
                    .to_str()
                    .and_then(|n| n.strip_prefix(".gz-write-check."))
                    .and_then(|r| r.split_once('.'))
                    .and_then(|(pid, nanos)| nanos.bytes().all(|b| b.is_ascii_digit()).then_some(pid))
                    .and_then(|pid| pid.parse::<u32>().ok());
                if pid.is_some_and(|p| !gz_schema::process::process_alive(p)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            Ok(())
        }
        // (the same name left by a killed process: the folder takes files)
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => anyhow::bail!(
            "{flag} {}: cannot write in {}: {}",
            path.display(),
            dir.display(),
            // (the system's reason, without the probe's own name)
            e.raw_os_error().map_or_else(
                || e.kind().to_string(),
                |c| std::io::Error::from_raw_os_error(c).to_string()
            )
        ),
    }
}

/// Refuses an output (`flag` names the option) that lands inside a dataset's image folder
/// (`images_training_rev1/`, `images_test_rev1/`), where the next `gz prep` takes what is
/// written for unreadable images and builds a new cache, or inside a shard cache (a folder
/// holding `manifest.json` and shards), which gz manages and `gz cache` removes.
pub fn check_not_in_data(flag: &str, path: &std::path::Path) -> anyhow::Result<()> {
    // (a folder named with a final `..` has no file name to follow: its `..`s folded away)
    let folded = || {
        let mut out = std::path::PathBuf::new();
        for c in std::path::absolute(path).ok()?.components() {
            match c {
                std::path::Component::ParentDir => {
                    out.pop();
                }
                std::path::Component::CurDir => {}
                c => out.push(c),
            }
        }
        write_target(&out)
    };
    let Some(target) = write_target(path).or_else(folded) else {
        return Ok(());
    };
    for a in target.ancestors() {
        let name = a.file_name().map(|n| n.to_string_lossy());
        if matches!(name.as_deref(), Some(gz_synth::TRAIN_DIR | gz_synth::TEST_DIR)) {
            anyhow::bail!(
                "{flag} {} lies inside the image folder {} of a dataset: the next `gz prep` would take what is written \
                 there for images; write it elsewhere",
                path.display(),
                a.display()
            );
        }
        let shards = || {
            std::fs::read_dir(a)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".shard"))
        };
        if a.join(gz_shards::MANIFEST_FILE).is_file() && shards() {
            anyhow::bail!(
                "{flag} {} lies inside the shard cache {}, which gz manages (`gz cache` removes what is in it): write \
                 it elsewhere",
                path.display(),
                a.display()
            );
        }
    }
    Ok(())
}

/// Where a write to `p` lands, absolute: symbolic links followed as the writers follow them
/// (`gz_schema::write_atomic` replaces a link's target, even a target not made yet), the
/// longest existing ancestor resolved (links and `..` as the system resolves them) and the
/// components below it, folders not made yet, folded as written (`..` taking one off).
fn write_target(p: &std::path::Path) -> Option<std::path::PathBuf> {
    let mut p = std::path::absolute(p).ok()?;
    for _ in 0..16 {
        match std::fs::read_link(&p) {
            Ok(target) => {
                let dir = p.parent()?.to_path_buf();
                p = std::path::absolute(dir.join(target)).ok()?;
            }
            Err(_) => break,
        }
    }
    let name = p.file_name()?.to_owned();
    let mut base = p.parent()?.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    let resolved = loop {
        if let Ok(dir) = base.canonicalize() {
            break dir;
        }
        // (by component: a path ending in `..` has no file name)
        rest.push(base.components().next_back()?.as_os_str().to_owned());
        if !base.pop() {
            return None;
        }
    };
    let mut out = resolved;
    for c in rest.iter().rev() {
        match c.to_str() {
            Some("..") => {
                out.pop();
            }
            Some(".") => {}
            _ => out.push(c),
        }
    }
    out.push(name);
    Some(out)
}

/// Whether writing to `a` would write `b`'s file: the same path under two spellings
/// (`./p.csv`, `sub/../p.csv`, absolute, through a linked folder) or a symbolic link to it
/// (made or not). (A hard link is another name: the writers replace a name by a rename, so
/// the other name keeps its content.)
pub fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    // two names of one file with a single link: a case-insensitive file system's `p.csv` and
    // `P.csv` (a hard link, two or more links, is another name)
    #[cfg(unix)]
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        use std::os::unix::fs::MetadataExt;
        if (x.dev(), x.ino()) == (y.dev(), y.ino()) && x.nlink() == 1 {
            return true;
        }
    }
    a == b || matches!((write_target(a), write_target(b)), (Some(x), Some(y)) if x == y)
}

/// Whether `a` and `b` hold the same bytes by being the same file: [`same_file`], or hard
/// links of one file (a `cp -al` copy of a checkpoint is the same weights).
fn same_contents(a: &std::path::Path, b: &std::path::Path) -> bool {
    #[cfg(unix)]
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        use std::os::unix::fs::MetadataExt;
        if (x.dev(), x.ino()) == (y.dev(), y.ino()) {
            return true;
        }
    }
    same_file(a, b)
}

/// Refuses, before any work, an output (`flag` names it) that would replace one of the
/// command's `inputs` (files: checkpoints, predictions, an image) or land inside one of its
/// input `folders` (a shard cache) or be an image of `image_folder` (a `.jpg` / `.jpeg` there,
/// which the next run would read as one).
pub fn check_not_an_input(
    flag: &str,
    out: &std::path::Path,
    inputs: &[std::path::PathBuf],
    folders: &[&std::path::Path],
    image_folder: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if out == std::path::Path::new("-") {
        return Ok(());
    }
    if let Some(input) = inputs.iter().find(|i| same_file(out, i)) {
        anyhow::bail!(
            "{flag} {} would replace {}, an input: name another file",
            out.display(),
            input.display()
        );
    }
    let Some(target) = write_target(out) else {
        return Ok(());
    };
    for folder in folders {
        if let Ok(dir) = folder.canonicalize() {
            if target.starts_with(&dir) {
                // a folder that is no cache at all (a dataset, `.`): that is what to say
                if !folder.join("manifest.json").is_file() {
                    open_cache(folder)?;
                }
                anyhow::bail!(
                    "{flag} {} lies inside the shard cache {}, which gz manages (`gz cache` removes what is in \
                     it): write it elsewhere",
                    out.display(),
                    folder.display()
                );
            }
        }
    }
    if let Some(dir) = image_folder.and_then(|d| d.canonicalize().ok()) {
        let jpeg = target
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"));
        if jpeg && target.parent() == Some(dir.as_path()) {
            anyhow::bail!(
                "{flag} {} is an image of the input folder {}: name a .csv file",
                out.display(),
                image_folder.map_or(String::new(), |d| d.display().to_string())
            );
        }
    }
    Ok(())
}

/// Warns about a checkpoint given twice in an ensemble (the same weights file, under any
/// spelling): it counts twice in the average, which is rarely meant.
pub fn warn_repeated_checkpoints(models: &[gz_model::checkpoint::LoadedModel]) {
    for (i, m) in models.iter().enumerate() {
        if let Some(j) = models[..i]
            .iter()
            .position(|o| same_contents(o.weights_path(), m.weights_path()))
        {
            eprintln!(
                "warning: --run {} is checkpoint {} again ({}): it counts twice in the average",
                i + 1,
                j + 1,
                m.weights_path().display()
            );
        }
    }
}

/// The files a `--run` argument reads (its checkpoint's weights and sidecar; for a run folder
/// also the files of its last epoch and its config), for [`check_not_an_input`].
pub fn run_inputs(runs: &[std::path::PathBuf]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for run in runs {
        if run.is_dir() {
            out.extend(gz_model::train::RUN_FILES.iter().map(|name| run.join(name)));
        } else {
            out.push(run.with_extension("safetensors"));
            out.push(run.with_extension("json"));
        }
    }
    out
}

/// Opens the shard cache a user named, with a hint when the folder is not one: the caches
/// inside it (a cache root holds one folder per dataset and config), or that it is a dataset.
/// Refuses a cache whose manifest's `prep_config` does not hash to the `config_hash` it (and
/// every shard header) records: an edited manifest said `crop 100` over images cropped at 212,
/// was listed as such and trained on, and surfaced only later as a checkpoint "made by another
/// preprocessing version". A `prep_config` that is not this gz's `PrepConfig` is left to the
/// readers' own checks.
fn check_manifest_hash(dir: &std::path::Path, c: &gz_shards::Cache) -> anyhow::Result<()> {
    let Ok(cfg) = serde_json::from_value::<gz_preprocess::PrepConfig>(c.prep_config().clone()) else {
        return Ok(());
    };
    let hash = cfg.hash();
    if hash != c.config_hash() {
        anyhow::bail!(
            "{}: its prep_config hashes to {hash} but the cache records {}: the manifest was edited (its images \
             were not made with this config); rebuild the cache with gz prep",
            dir.join("manifest.json").display(),
            c.config_hash()
        );
    }
    Ok(())
}

pub fn open_cache(dir: &std::path::Path) -> anyhow::Result<gz_shards::Cache> {
    use anyhow::Context;
    match gz_shards::Cache::open(dir) {
        Ok(c) => {
            check_manifest_hash(dir, &c)?;
            Ok(c)
        }
        Err(e @ gz_shards::ShardError::Incomplete { .. }) => {
            let mut inside: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("manifest.json").is_file())
                .map(|p| p.display().to_string())
                .collect();
            inside.sort();
            let hint = if !inside.is_empty() {
                let caches = if inside.len() == 1 { "a cache" } else { "the caches" };
                format!("; it holds {caches} {}: pass one of them", inside.join(", "))
            } else if dir.join("images_training_rev1").is_dir() || dir.join("images_test_rev1").is_dir() {
                "; this is a dataset folder: `gz prep --data DIR` builds its cache and prints the path".to_string()
            } else {
                String::new()
            };
            Err(anyhow::Error::new(e).context(format!("opening the shard cache {}{hint}", dir.display())))
        }
        Err(e) => Err(e).with_context(|| format!("opening the shard cache {}", dir.display())),
    }
}

/// Why a cache has no test split at all: `gz prep` writes one for every `images_test_rev1/`
/// folder, even an empty one (that is a split of 0 images), so its dataset had no such folder.
pub fn no_test_split(cache_dir: &std::path::Path) -> String {
    format!(
        "cache {} has no test split: its dataset had no images_test_rev1/ folder when it was prepared (a \
         training-only download); put the test JPEGs there and run `gz prep` again",
        cache_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// An existing output that is not a regular file (`/dev/null`, a FIFO) is refused up front.
    #[cfg(unix)]
    #[test]
    fn a_device_or_pipe_as_output_is_refused_before_any_work() {
        let err = super::check_output("--out", Path::new("/dev/null"), false).unwrap_err();
        assert!(
            err.to_string().contains("--out /dev/null: is not a regular file"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.csv");
        std::fs::write(&file, "GalaxyID,Class1.1,Class1.2\n").unwrap();
        super::check_output("--out", &file, false).unwrap();
        super::check_output("--out", &dir.path().join("new.csv"), false).unwrap();
    }

    /// What `--help` says of each writing command's output: missing folders are created.
    #[test]
    fn help_says_missing_folders_are_created() {
        use clap::{Args, Command};
        let cmds = [
            (
                "predict --out",
                super::predict::Args::augment_args(Command::new("predict")),
                "out",
            ),
            (
                "submit --out",
                super::submit::Args::augment_args(Command::new("submit")),
                "out",
            ),
            (
                "eval --report",
                super::eval::Args::augment_args(Command::new("eval")),
                "report",
            ),
            (
                "train --out",
                super::train::Args::augment_args(Command::new("train")),
                "out",
            ),
        ];
        for (what, cmd, id) in cmds {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id).unwrap();
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(help.contains("missing folders are created"), "{what}: {help}");
        }
    }

    #[test]
    fn outputs_that_cannot_be_written_are_refused_early() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.csv");
        std::fs::write(&file, "").unwrap();
        let check = |p: &Path, folder: bool| super::check_output("--out", p, folder).map_err(|e| e.to_string());
        assert!(check(&dir.path().join("a/b/c.csv"), false).is_ok());
        assert!(check(&file, false).is_ok());
        assert!(check(&dir.path().join("a/b"), true).is_ok());
        assert!(check(dir.path(), false).unwrap_err().contains("is a folder"));
        assert!(check(&file, true).unwrap_err().contains("exists and is not a folder"));
        let e = check(&file.join("x/y.csv"), false).unwrap_err();
        assert!(e.contains("f.csv is a file, not a folder"), "{e}");
        assert!(check(Path::new("x.csv"), false).is_ok());
        // a path ending in '/' names a folder, even one not made yet
        let e = check(&dir.path().join("new/"), false).unwrap_err();
        assert!(e.contains("ends in '/'") && e.contains("new/out.csv"), "{e}");
        // a folder that cannot be written in: refused before the work (unless this process may
        // write anywhere, as root)
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let ro = dir.path().join("ro");
            std::fs::create_dir(&ro).unwrap();
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
            let root = std::fs::write(ro.join("probe"), "").is_ok();
            let _ = std::fs::remove_file(ro.join("probe"));
            let writable =
                |p: &Path, folder: bool| super::check_writable("--out", p, folder).map_err(|e| e.to_string());
            let said = format!("cannot write in {}: ", ro.display());
            if !root {
                for p in [ro.join("p.csv"), ro.join("sub/p.csv")] {
                    assert!(check(&p, false).is_ok(), "not check_output's to say");
                    let e = writable(&p, false).unwrap_err();
                    assert!(e.contains(&said) && !e.contains(".gz-write-check"), "{e}");
                }
                assert!(writable(&ro.join("run"), true).unwrap_err().contains(&said));
                // a link into it: judged where the write lands
                let link = dir.path().join("link.csv");
                std::os::unix::fs::symlink(ro.join("p.csv"), &link).unwrap();
                assert!(writable(&link, false).unwrap_err().contains(&said));
            }
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
            // a killed process's probe is removed by the next check (a live one's is kept)
            let dead = ro.join(".gz-write-check.4294967290.17");
            let live = ro.join(format!(".gz-write-check.{}.17", std::os::unix::process::parent_id()));
            std::fs::write(&dead, b"").unwrap();
            std::fs::write(&live, b"").unwrap();
            assert!(writable(&ro.join("p.csv"), false).is_ok());
            assert!(!dead.exists() && live.exists());
            std::fs::remove_file(&live).unwrap();
            assert!(writable(&ro.join("sub/p.csv"), false).is_ok());
            assert!(writable(&ro, true).is_ok());
            assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0, "the probe is removed");
        }
        // a name longer than the file system allows (255 bytes on Linux): refused up front, with
        // the system's reason, not after the predictions were computed
        #[cfg(unix)]
        {
            let long = dir.path().join(format!("{}.csv", "a".repeat(300)));
            let e = check(&long, false).unwrap_err();
            assert!(e.contains("--out") && e.contains("too long"), "{e}");
        }
    }

    /// A CSV output replaces only a file gz could have written: a table with gz's header (or an
    /// empty file), not a checkpoint, an image, a text, nor a dataset's labels beside its images.
    #[test]
    fn csv_outputs_replace_only_files_of_their_own_kind() {
        let dir = tempfile::tempdir().unwrap();
        let check = |name: &str, text: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            super::check_output("--out", &p, false).unwrap();
            super::check_replaceable("--out", &p).map_err(|e| e.to_string())
        };
        for ok in [
            &b"GalaxyID,Class1.1,Class1.2\n100008,0.1,0.2\n"[..],
            b"file,Class1.1,Class1.2\r\nNGC 1300.jpg,0.5,0.5\r\n",
            b"\xef\xbb\xbf\"GalaxyID\",\"Class1.1\"\n",
            b"",
            b"GalaxyID,Class1.1",
        ] {
            assert!(check("ok.csv", ok).is_ok(), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"\x89PNG\r\n\x1a\n"[..],
            b"\xff\xd8\xff\xe0 a JPEG",
            b"notes about my galaxies\n",
            b"id,Class1.1\n",
            b"GalaxyID,Class1.2\n",
        ] {
            let e = check("bad.csv", bad).unwrap_err();
            assert!(e.contains("bad.csv: exists and is not a predictions CSV"), "{e}");
        }
        // a dataset's labels, though the header is gz's own (Kaggle ships them apart from the
        // images: a folder of them alone too)
        let header = b"GalaxyID,Class1.1\n";
        for name in [
            "training_solutions_rev1.csv",
            "test_solutions.csv",
            "expected_training.csv",
            "expected_test.csv",
        ] {
            let e = check(name, header).unwrap_err();
            assert!(e.contains("is the name of a dataset's labels"), "{e}");
        }
        assert!(check("mine.csv", header).is_ok());
        // nor made anew under such a name (gz would read it as the labels)
        let new = dir.path().join("sub/test_solutions.csv");
        let e = super::check_replaceable("--out", &new).unwrap_err().to_string();
        assert!(e.contains("is the name of a dataset's labels"), "{e}");
        // judged where the write lands: a link to the labels, or to a JPEG
        #[cfg(unix)]
        for (target, want) in [
            ("training_solutions_rev1.csv", "dataset's labels"),
            ("bad.csv", "not a predictions CSV"),
        ] {
            let link = dir.path().join(format!("link-{target}"));
            std::os::unix::fs::symlink(dir.path().join(target), &link).unwrap();
            let e = super::check_replaceable("--out", &link).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // a file that cannot be read cannot be told to be gz's (unless this process reads
        // anything, as root)
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let p = dir.path().join("locked.csv");
            std::fs::write(&p, "secret").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
            if std::fs::read(&p).is_err() {
                let e = super::check_replaceable("--out", &p).unwrap_err().to_string();
                assert!(e.contains("cannot be read to tell whether gz wrote it"), "{e}");
            }
        }
    }

    /// No output lands among a dataset's images (the next prep took a report there for
    /// unreadable images and built a new cache) or inside a shard cache, folders not made yet
    /// and links counted where they land.
    #[test]
    fn outputs_stay_out_of_image_folders_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("d/images_test_rev1");
        std::fs::create_dir_all(&images).unwrap();
        let cache = dir.path().join("c/0a-1b");
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(cache.join("manifest.json"), "{}").unwrap();
        std::fs::write(cache.join("train-00000.shard"), "x").unwrap();
        let check = |p: &Path| super::check_output("--report", p, true).map_err(|e| e.to_string());
        for p in [
            images.clone(),
            images.join("report"),
            images.join("new/deeper"),
            images.join("report/.."),
        ] {
            let e = check(&p).unwrap_err();
            assert!(
                e.contains("lies inside the image folder") && e.contains("images_test_rev1"),
                "{e}"
            );
        }
        let e = check(&cache.join("report")).unwrap_err();
        assert!(e.contains("lies inside the shard cache"), "{e}");
        #[cfg(unix)]
        {
            let link = dir.path().join("link");
            std::os::unix::fs::symlink(&images, &link).unwrap();
            assert!(check(&link.join("r")).unwrap_err().contains("image folder"));
        }
        assert!(check(&dir.path().join("d/reports/r")).is_ok());
        assert!(check(&dir.path().join("c/report")).is_ok());
    }

    /// An output is inside a shard cache by where it lands: `..` out of the cache into
    /// folders not made yet is outside, a folder not made yet inside it is inside.
    #[test]
    fn outputs_inside_a_cache_are_told_by_where_they_land() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        // (a folder without a manifest is no cache: said so, below)
        std::fs::write(cache.join("manifest.json"), "{}").unwrap();
        let check = |out: &Path| super::check_not_an_input("--out", out, &[], &[&cache], None);
        assert!(check(&cache.join("../preds/new/p.csv")).is_ok());
        assert!(check(&cache.join("new/../../p.csv")).is_ok());
        let e = check(&cache.join("new/sub/p.csv")).unwrap_err().to_string();
        assert!(e.contains("lies inside the shard cache"), "{e}");
        assert!(check(&dir.path().join("x/../cache/p.csv")).is_err());
        // a --cache that is no cache (here a dataset folder) is named for that, not as a cache
        // the output would land in
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("images_training_rev1")).unwrap();
        let e = super::check_not_an_input("--out", &data.join("run/p.csv"), &[], &[&data], None).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("this is a dataset folder") && !e.contains("lies inside"),
            "{e}"
        );
    }

    /// A name with a newline or a tab is shown on one line, escaped; others as they are.
    #[test]
    fn shown_paths_stay_on_one_line() {
        assert_eq!(super::shown("trunc\nevil.jpg"), "trunc\\nevil.jpg");
        assert_eq!(super::shown("a\tb\r.jpg"), "a\\tb\\r.jpg");
        assert_eq!(super::shown("/data/NGC 1300 é.jpg"), "/data/NGC 1300 é.jpg");
    }

    #[test]
    fn shell_path_quotes_what_a_shell_would_split() {
        assert_eq!(
            super::shell_path(Path::new("/data/kaggle-2014/gz_1.0")),
            "/data/kaggle-2014/gz_1.0"
        );
        assert_eq!(super::shell_path(Path::new("/my data/gz")), "'/my data/gz'");
        assert_eq!(super::shell_path(Path::new("/Bob's $HOME")), r"'/Bob'\''s $HOME'");
        assert_eq!(super::shell_path(Path::new("")), "''");
    }
}
