//! `gz prep` end to end on a copy of the kaggle-mini fixture: cache layout and contents, cache
//! hit / miss / config change, `--verify`, and every bad-input case the CLI must report (the
//! decoder-level cases — grayscale, CMYK, odd sizes — are unit-tested in gz-preprocess).

use std::path::{Path, PathBuf};

use crate::support;

/// Copies kaggle-mini into `dst/data` and returns that path.
fn mini(dst: &Path) -> PathBuf {
    let src = support::fixtures().join("kaggle-mini");
    let data = dst.join("data");
    for sub in ["images_training_rev1", "images_test_rev1"] {
        std::fs::create_dir_all(data.join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), data.join(sub).join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(
        src.join("training_solutions_rev1.csv"),
        data.join("training_solutions_rev1.csv"),
    )
    .unwrap();
    data
}

fn prep(args: &[&str]) -> (Option<i32>, String, String) {
    let out = support::gz().arg("prep").args(args).output().expect("run gz prep");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cache_line(stdout: &str) -> PathBuf {
    let last = stdout.lines().last().unwrap_or_default();
    PathBuf::from(
        last.strip_prefix("cache: ")
            .unwrap_or_else(|| panic!("last line is not `cache: ..`: {stdout}")),
    )
}

#[test]
fn prep_kaggle_mini_then_cache_hit_then_config_change() {
    let t = support::tempdir();
    let data = mini(t.path());
    let root = t.path().join("cache");
    let (code, out, err) = prep(&[
        "--data",
        data.to_str().unwrap(),
        "--cache",
        root.to_str().unwrap(),
        "--threads",
        "2",
    ]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let dir = cache_line(&out);
    assert!(dir.starts_with(&root));
    let cache = gz_shards::Cache::open(&dir).unwrap();
    let train = cache.train().unwrap();
    assert_eq!(train.len(), 3);
    assert_eq!(train.shape(), [3, 106, 106]);
    let sol = gz_schema::read_solutions(&data.join("training_solutions_rev1.csv")).unwrap();
    assert_eq!(train.ids(), sol.ids.as_slice());
    assert_eq!(train.labels().unwrap(), sol.values.as_slice());
    let test = cache.test().unwrap();
    assert_eq!(test.ids(), &[242195, 784597, 870891]);
    assert!(test.labels().is_none());
    // a galaxy sits in the centre: the middle is brighter than the corner, values in [0, 1]
    let img = train.image(0);
    let at = |c: usize, y: usize, x: usize| img[c * 106 * 106 + y * 106 + x].to_f32();
    assert!(img.iter().all(|v| (0.0..=1.0).contains(&v.to_f32())));
    assert!(
        at(0, 53, 53) > at(0, 2, 2) + 0.05,
        "centre {} corner {}",
        at(0, 53, 53),
        at(0, 2, 2)
    );
    assert_eq!(cache.config_hash(), gz_preprocess::PrepConfig::default().hash());
    assert_eq!(cache.prep_config()["crop"], 212);

    // unchanged input: cache hit, same directory, nothing decoded
    let (code, out2, err) = prep(&[
        "--data",
        data.to_str().unwrap(),
        "--cache",
        root.to_str().unwrap(),
        "--verify",
    ]);
    assert_eq!(code, Some(0), "{out2}\n{err}");
    assert!(out2.contains("cache hit"), "{out2}");
    assert!(out2.contains("verified:"), "{out2}");
    assert_eq!(cache_line(&out2), dir);

    // another config: another cache beside the first
    let (code, out3, err) = prep(&[
        "--data",
        data.to_str().unwrap(),
        "--cache",
        root.to_str().unwrap(),
        "--crop",
        "207",
        "--size",
        "69",
    ]);
    assert_eq!(code, Some(0), "{out3}\n{err}");
    let dir3 = cache_line(&out3);
    assert_ne!(dir3, dir);
    assert_eq!(
        gz_shards::Cache::open(&dir3).unwrap().train().unwrap().shape(),
        [3, 69, 69]
    );
    assert!(gz_shards::Cache::open(&dir).is_ok());

    // changed input (a file rewritten): a new cache
    let f = data.join("images_test_rev1/242195.jpg");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::remove_file(&f).unwrap();
    std::fs::write(&f, &bytes).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let (code, out4, err) = prep(&["--data", data.to_str().unwrap(), "--cache", root.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out4}\n{err}");
    assert!(!out4.contains("cache hit"), "{out4}");
    assert_ne!(cache_line(&out4), dir);
}

#[test]
fn default_cache_root_is_beside_the_data() {
    let t = support::tempdir();
    let data = mini(t.path());
    let (code, out, err) = prep(&["--data", data.to_str().unwrap(), "--threads", "1"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let dir = cache_line(&out);
    assert_eq!(dir.parent().unwrap(), t.path().canonicalize().unwrap().join("cache"));
}

#[test]
fn bad_inputs_are_reported_skipped_and_exit_2() {
    let t = support::tempdir();
    let data = mini(t.path());
    let good = std::fs::read(data.join("images_test_rev1/242195.jpg")).unwrap();
    let test_dir = data.join("images_test_rev1");
    let train_dir = data.join("images_training_rev1");
    std::fs::write(test_dir.join("111111.jpg"), &good[..good.len() / 2]).unwrap(); // truncated
    std::fs::write(test_dir.join("222222.jpg"), b"").unwrap(); // zero bytes
    std::fs::write(test_dir.join("333333.jpg"), b"GalaxyID,not an image\n").unwrap(); // not a JPEG
    let mut corrupt = good.clone();
    let n = corrupt.len();
    for b in &mut corrupt[n / 3..n / 3 + 400] {
        *b = 0x5A; // garbage entropy data inside the crop region
    }
    std::fs::write(test_dir.join("444444.jpg"), &corrupt).unwrap();
    std::fs::write(test_dir.join("notes.txt"), b"hello").unwrap(); // not <id>.jpg
    std::fs::write(train_dir.join("555555.jpg"), &good).unwrap(); // image without a label
                                                                  // id in the CSV without an image
    let csv = data.join("training_solutions_rev1.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    let first_row = text.lines().nth(1).unwrap().to_string();
    let (_, rest) = first_row.split_once(',').unwrap();
    text.push_str(&format!("666666,{rest}\n"));
    std::fs::write(&csv, text).unwrap();

    let root = t.path().join("cache");
    let (code, out, err) = prep(&["--data", data.to_str().unwrap(), "--cache", root.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{out}\n{err}");
    for (file, why) in [
        ("111111.jpg", "truncated"),
        ("222222.jpg", "empty file"),
        ("333333.jpg", "not a JPEG"),
        ("444444.jpg", ""),
        ("notes.txt", "not <GalaxyID>.jpg"),
        ("555555.jpg", "without a label"),
        ("666666.jpg", "has no image"),
    ] {
        let line = out.lines().find(|l| l.starts_with("skipped:") && l.contains(file));
        let line = line.unwrap_or_else(|| panic!("{file} not reported:\n{out}"));
        assert!(line.contains(why), "{line}");
    }
    assert!(out.contains("summary: 7 inputs skipped"), "{out}");
    assert!(err.contains("7 inputs skipped"), "{err}");
    // the `skipped:` lines are on stdout: the warning on stderr says so ("listed above" was
    // wrong with stdout redirected)
    assert!(
        err.contains("listed on standard output") && !err.contains("listed above"),
        "{err}"
    );
    // the cache still holds exactly the good images and is valid
    let dir = cache_line(&out);
    let cache = gz_shards::Cache::open(&dir).unwrap();
    cache.verify().unwrap();
    assert_eq!(cache.train().unwrap().len(), 3);
    assert_eq!(cache.test().unwrap().ids(), &[242195, 784597, 870891]);

    // a rerun is a cache hit and still reports the skipped inputs and the status
    let (code, out2, _) = prep(&["--data", data.to_str().unwrap(), "--cache", root.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        out2.contains("cache hit") && out2.contains("summary: 7 inputs skipped"),
        "{out2}"
    );

    // strict: stops at the first problem, publishes nothing
    let root2 = t.path().join("cache-strict");
    let (code, out3, err3) = prep(&[
        "--data",
        data.to_str().unwrap(),
        "--cache",
        root2.to_str().unwrap(),
        "--strict",
    ]);
    assert_eq!(code, Some(1), "{out3}\n{err3}");
    assert!(err3.contains("strict"), "{err3}");
    let complete = std::fs::read_dir(&root2)
        .map(|rd| rd.flatten().filter(|e| e.path().join("manifest.json").exists()).count())
        .unwrap_or(0);
    assert_eq!(complete, 0, "strict failure must not leave a complete cache");
}

#[test]
fn verify_detects_a_corrupted_shard() {
    let t = support::tempdir();
    let data = mini(t.path());
    let root = t.path().join("cache");
    let (code, out, _) = prep(&["--data", data.to_str().unwrap(), "--cache", root.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    let dir = cache_line(&out);
    let shard = dir.join("test-00000.shard");
    let mut b = std::fs::read(&shard).unwrap();
    let n = b.len();
    b[n - 10] ^= 0x10;
    std::fs::write(&shard, b).unwrap();
    // the cache root named instead of the cache: its cache named (it said "not a gz cache, or
    // an incomplete one")
    let (code, _, err) = prep(&["--verify", "--cache", root.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("is a cache root holding 1 cache, not a cache")
            && err.contains(&format!("--cache {}", dir.display())),
        "{err}"
    );
    let (code, _, err) = prep(&["--verify", "--cache", dir.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("checksum mismatch") && err.contains("test-00000.shard"),
        "{err}"
    );
    // what the message says to do: `gz prep --verify` with the dataset rebuilds the cache
    assert!(
        err.contains("`gz prep --data <its dataset> --verify`, with the options that built it, rebuilds"),
        "{err}"
    );
    let args = ["--data", data.to_str().unwrap(), "--cache", root.to_str().unwrap()];
    // holding a user's files (notes, a run trained into it): refused, nothing removed (the
    // rebuild deleted them without a word)
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    std::fs::create_dir(dir.join("run1")).unwrap();
    let (code, out, err) = prep(&[&args[..], &["--verify"]].concat());
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains("is damaged") && err.contains("(notes.txt, run1/), which rebuilding it would delete"),
        "{err}"
    );
    assert!(dir.join("notes.txt").exists() && dir.join("run1").is_dir() && shard.exists());
    std::fs::remove_file(dir.join("notes.txt")).unwrap();
    std::fs::remove_dir(dir.join("run1")).unwrap();
    let (code, out, err) = prep(&[&args[..], &["--verify"]].concat());
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("is damaged") && err.contains("rebuilding it"), "{err}");
    assert!(out.contains("verified:"), "{out}");
    assert_eq!(cache_line(&out), dir);
    gz_shards::Cache::open(&dir).unwrap().verify().unwrap();
    // then a plain cache hit, verified without rebuilding
    let (code, out, err) = prep(&[&args[..], &["--verify"]].concat());
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("cache hit") && !err.contains("damaged"), "{out}\n{err}");
}

#[test]
fn missing_data_dir_is_a_clear_error() {
    let t = support::tempdir();
    let (code, _, err) = prep(&[
        "--data",
        t.path().join("nope").to_str().unwrap(),
        "--cache",
        t.path().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn killed_run_leaves_no_complete_cache_and_rerun_completes() {
    let t = support::tempdir();
    let data = mini(t.path());
    // enough images that the run is still writing when it is killed
    let jpegs = support::fixtures().join("real-test-jpegs");
    let mut n = 0u64;
    for round in 0..6u64 {
        for e in std::fs::read_dir(&jpegs).unwrap() {
            let e = e.unwrap();
            n += 1;
            let id = 900_000 + round * 1000 + n % 1000;
            std::fs::copy(e.path(), data.join("images_test_rev1").join(format!("{id}.jpg"))).unwrap();
        }
    }
    let root = t.path().join("cache");
    let complete = |root: &Path| {
        std::fs::read_dir(root)
            .map(|rd| rd.flatten().filter(|e| e.path().join("manifest.json").exists()).count())
            .unwrap_or(0)
    };
    let mut killed_mid_run = false;
    for delay_ms in [150u64, 60, 300] {
        let mut child = support::Running::spawn(
            support::gz()
                .args([
                    "prep",
                    "--data",
                    data.to_str().unwrap(),
                    "--cache",
                    root.to_str().unwrap(),
                    "--threads",
                    "1",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let finished = child.try_wait().unwrap().is_some();
        child.kill().ok();
        child.wait().unwrap();
        if !finished && complete(&root) == 0 {
            killed_mid_run = true;
            break;
        }
    }
    assert!(killed_mid_run, "could not interrupt a run (machine too fast?)");
    assert_eq!(complete(&root), 0, "a killed run left a complete-looking cache");
    let (code, out, err) = prep(&["--data", data.to_str().unwrap(), "--cache", root.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let cache = gz_shards::Cache::open(&cache_line(&out)).unwrap();
    cache.verify().unwrap();
    assert_eq!(cache.test().unwrap().len(), 3 + n as usize);
    // the killed run's temporary directory was cleaned up by the next writer
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A galaxy in both the training and the test folder is said (the test score would not be
/// held out), in plain text on a stderr that is not a terminal, and both rows stay.
#[test]
fn a_galaxy_in_both_splits_is_warned_about() {
    let t = support::tempdir();
    let data = mini(t.path());
    let train = data.join("images_training_rev1");
    let first = std::fs::read_dir(&train).unwrap().next().unwrap().unwrap().path();
    std::fs::copy(&first, data.join("images_test_rev1").join(first.file_name().unwrap())).unwrap();
    let root = t.path().join("cache");
    let (code, out, err) = prep(&["--data", data.to_str().unwrap(), "--cache", root.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("1 GalaxyID is both training and test images"), "{err}");
    // stderr is a pipe here (a log file, CI): no terminal colour codes in it
    assert!(!err.contains('\x1b'), "{err:?}");
    assert!(out.contains("preprocessed 3 train + 4 test images"), "{out}");
}

fn cache_cmd(args: &[&str]) -> (Option<i32>, String, String) {
    let out = support::gz().arg("cache").args(args).output().expect("run gz cache");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `gz cache`: a dataset whose files changed leaves its old caches superseded; `list` says so,
/// `prune` removes them and the leftovers of ended writers and keeps the current cache and
/// other datasets' caches; `remove` deletes a named cache and refuses a folder that is not one.
#[test]
fn cache_list_prune_and_remove() {
    let t = support::tempdir();
    let data = mini(t.path());
    let other = t.path().join("other");
    std::fs::rename(mini(&t.path().join("o")), &other).unwrap();
    let root = t.path().join("cache");
    let d = data.to_str().unwrap();
    let r = root.to_str().unwrap();
    let old = cache_line(&prep(&["--data", d, "--cache", r, "--size", "16"]).1);
    let theirs = cache_line(&prep(&["--data", other.to_str().unwrap(), "--cache", r, "--size", "16"]).1);
    // the dataset changes (one more test image): a new dataset key, a new cache
    add_a_test_image(&data);
    let (_, out, err) = prep(&["--data", d, "--cache", r, "--size", "16"]);
    let current = cache_line(&out);
    assert_ne!(old, current);
    // prep says the old cache is dead weight, and how to remove it
    assert!(
        err.contains("note: 1 cache of this dataset built before its files changed") && err.contains("gz cache prune"),
        "{err}"
    );
    // a mistyped root, or the dataset named as one: said, not "no caches"
    let missing = t.path().join("cahce");
    let (code, out, err) = cache_cmd(&["list", "--cache", missing.to_str().unwrap()]);
    assert!(code == Some(1) && err.contains("no such folder"), "{out}\n{err}");
    let (code, out, err) = cache_cmd(&["prune", "--cache", d]);
    assert!(code == Some(1) && err.contains("is a dataset folder"), "{out}\n{err}");
    // a killed writer's folder (a pid beyond Linux's pid_max: never running)
    let dead = root.join(".x.tmp-4194305");
    std::fs::create_dir(&dead).unwrap();

    // the root named without --cache lists the same (it was a usage error)
    let (code, bare, err) = cache_cmd(&["list", r]);
    assert_eq!(code, Some(0), "{bare}\n{err}");
    let (code, out, err) = cache_cmd(&["list", "--cache", r]);
    // (the same folders; the ages may have ticked between the two)
    let names = |t: &str| {
        t.lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!((code, names(&bare)), (Some(0), names(&out)), "{err}");
    let (code, out, err) = cache_cmd(&["list", "--data", d, "--cache", r]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let line = |p: &Path| {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        out.lines()
            .find(|l| l.starts_with(&name))
            .unwrap_or_else(|| panic!("{name} not listed:\n{out}"))
            .to_string()
    };
    assert!(line(&current).ends_with("current"), "{out}");
    assert!(line(&current).contains("crop 212 → 16 area v2"), "{out}");
    assert!(line(&old).contains("superseded"), "{out}");
    assert!(line(&theirs).contains("other dataset"), "{out}");
    assert!(line(&dead).contains("leftover"), "{out}");
    // (the leftover is counted apart, its size in the total)
    assert!(
        out.contains("3 caches and 1 other folder (damaged, incomplete or leftovers), "),
        "{out}"
    );

    // a user's file in the superseded cache: kept, the cache with it, and said so
    std::fs::write(old.join("notes.txt"), "mine").unwrap();
    let (code, out, err) = cache_cmd(&["prune", "--data", d, "--cache", r, "--dry-run"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("would keep") && out.contains("notes.txt") && out.contains("would remove"),
        "{out}"
    );
    let (code, out, err) = cache_cmd(&["list", "--data", d, "--cache", r]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("notes.txt; kept by prune and remove"), "{out}");
    let (code, out, err) = cache_cmd(&["prune", "--data", d, "--cache", r]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("kept: ") && out.contains("notes.txt") && old.join("notes.txt").exists(),
        "{out}"
    );
    assert!(!dead.exists(), "the rest is pruned: {out}");
    std::fs::remove_file(old.join("notes.txt")).unwrap();
    let (code, out, err) = cache_cmd(&["prune", "--data", d, "--cache", r, "--dry-run"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("would remove") && old.exists(), "{out}");
    let (code, out, err) = cache_cmd(&["prune", "--data", d, "--cache", r]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(!old.exists(), "{out}");
    assert!(
        current.join("manifest.json").exists() && theirs.join("manifest.json").exists(),
        "{out}"
    );
    gz_shards::Cache::open(&current).unwrap().verify().unwrap();
    // the other dataset's folder goes: its cache is an orphan, removed only with --orphans
    std::fs::remove_dir_all(&other).unwrap();
    let (_, out, _) = cache_cmd(&["prune", "--cache", r]);
    assert!(theirs.exists() && out.contains("--orphans"), "{out}");
    let (code, out, err) = cache_cmd(&["prune", "--cache", r, "--orphans"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(!theirs.exists() && current.exists(), "{out}");

    // remove: the dataset folder is not a cache and stays; the cache goes, whole (named twice,
    // `C` and `C/`: removed once, the second not a failure)
    let again = format!("{}/", current.display());
    let (code, out, err) = cache_cmd(&["remove", d, current.to_str().unwrap(), &again]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(err.contains("not a gz cache"), "{err}");
    assert!(err.contains("1 of 2 folders not removed"), "{err}");
    assert_eq!(out.matches("removed: ").count(), 1, "{out}");
    assert!(data.join("training_solutions_rev1.csv").exists());
    assert!(!current.exists(), "{out}");
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // the root named wrongly: a cache folder, or nothing at all
    let (code, _, err) = cache_cmd(&["list"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--cache DIR"), "{err}");
    // caches prep wrote into the dataset folder itself (`--cache` = `--data`) are listed there
    let inside = cache_line(&prep(&["--data", d, "--cache", d, "--size", "16"]).1);
    let (code, out, err) = cache_cmd(&["list", "--cache", d]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains(&*inside.file_name().unwrap().to_string_lossy()), "{out}");
}

/// A dataset under a path with spaces: the `gz cache prune` command that `gz prep` and `gz cache
/// list` print for the superseded cache runs as printed (the paths are quoted).
#[test]
fn printed_prune_commands_quote_paths_with_spaces() {
    let t = support::tempdir();
    let data = mini(&t.path().join("my galaxies"));
    let root = t.path().join("gz cache");
    let (d, r) = (data.to_str().unwrap(), root.to_str().unwrap());
    prep(&["--data", d, "--cache", r, "--size", "16"]);
    add_a_test_image(&data);
    let (_, _, err) = prep(&["--data", d, "--cache", r, "--size", "16"]);
    let want = format!("`gz cache prune --data '{d}' --cache '{r}'`");
    assert!(err.contains(&want), "{err}");
    let (code, out, err) = cache_cmd(&["list", "--data", d, "--cache", r]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains(&want), "{out}");
}

/// The cache root a user did not name (`<DATA>/../cache`) is said to be the default when it
/// cannot be used, with --cache as the way out (a dataset on a read-only disk, a file there).
#[test]
fn an_unusable_default_cache_root_names_the_cache_option() {
    let t = support::tempdir();
    let data = mini(t.path());
    std::fs::write(t.path().join("cache"), "not a folder").unwrap();
    let (code, out, err) = prep(&["--data", data.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains("is the default cache root") && err.contains("--cache DIR"),
        "{err}"
    );
}

/// A training-only download (no `images_test_rev1/` folder at all) is prepared without a word
/// of error, but with a note that the cache has no test split, naming what will lack it.
#[test]
fn a_dataset_without_a_test_folder_is_noted() {
    let t = support::tempdir();
    let data = mini(t.path());
    std::fs::remove_dir_all(data.join("images_test_rev1")).unwrap();
    let root = t.path().join("cache");
    let (code, out, err) = prep(&["--data", data.to_str().unwrap(), "--cache", root.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        err.contains("note: there is no ")
            && err.contains("images_test_rev1 folder: the cache has no test split")
            && err.contains("gz submit"),
        "{err}"
    );
    assert!(gz_shards::Cache::open(&cache_line(&out)).unwrap().test().is_none());
    // the full download says nothing of the kind
    let (code, _, err) = prep(&[
        "--data",
        mini(&t.path().join("full")).to_str().unwrap(),
        "--cache",
        root.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("no test split"), "{err}");
}

/// A 424×424 greyscale JPEG (one channel).
pub(crate) fn greyscale_jpeg() -> Vec<u8> {
    let pixels: Vec<u8> = (0..424 * 424).map(|i| ((i % 424 + i / 424) % 256) as u8).collect();
    let mut buf = Vec::new();
    jpeg_encoder::Encoder::new(&mut buf, 90)
        .encode(&pixels, 424, 424, jpeg_encoder::ColorType::Luma)
        .unwrap();
    buf
}

/// Greyscale JPEGs are prepared (copied to the three channels) with one warning that names
/// how many there were, also on a cache hit.
#[test]
fn greyscale_images_are_warned_of_once() {
    let t = support::tempdir();
    let data = mini(t.path());
    for id in ["242195", "784597"] {
        std::fs::write(data.join(format!("images_test_rev1/{id}.jpg")), greyscale_jpeg()).unwrap();
    }
    let root = t.path().join("cache");
    for _ in 0..2 {
        let (code, out, err) = prep(&["--data", data.to_str().unwrap(), "--cache", root.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{out}\n{err}");
        assert!(out.contains("3 train + 3 test images"), "{out}");
        assert_eq!(err.matches("greyscale").count(), 1, "{err}");
        assert!(
            err.contains("warning: 2 images are greyscale JPEGs (one channel, e.g. "),
            "{err}"
        );
    }
}

/// Changes a dataset: a copy of one of its test images as GalaxyID 999999.
fn add_a_test_image(data: &Path) {
    let img = std::fs::read_dir(data.join("images_test_rev1"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(&img, data.join("images_test_rev1/999999.jpg")).unwrap();
}

/// The small things said or refused up front: an unfinished synthetic set is not prepared; a
/// cache without training images is noted; `--rows-per-shard` on an existing cache is said to
/// change nothing; `gz synth --out` a file and `gz bench-train --warmup` beyond reason are clear
/// errors.
#[test]
fn small_refusals_and_notes() {
    let t = support::tempdir();
    let data = mini(t.path());
    let (d, c) = (data.to_str().unwrap(), t.path().join("cache"));
    let c = c.to_str().unwrap();
    // an interrupted gz synth: its mark, no synth.json
    std::fs::write(data.join("synth.in-progress"), "x").unwrap();
    let (code, out, err) = prep(&["--data", d, "--cache", c, "--size", "16"]);
    assert!(
        code == Some(1) && err.contains("gz synth did not finish"),
        "{out}\n{err}"
    );
    std::fs::remove_file(data.join("synth.in-progress")).unwrap();
    let (code, out, err) = prep(&["--data", d, "--cache", c, "--size", "16"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let (code, out, err) = prep(&["--data", d, "--cache", c, "--size", "16", "--rows-per-shard", "2"]);
    assert!(
        code == Some(0) && err.contains("--rows-per-shard 2 is not applied"),
        "{out}\n{err}"
    );
    // a cache built with another value, hit by a command that asks for none: no note (it
    // named the default 4096 the user never gave)
    let c2 = t.path().join("cache2");
    let c2 = c2.to_str().unwrap();
    let (code, out, err) = prep(&["--data", d, "--cache", c2, "--size", "16", "--rows-per-shard", "2"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let (code, out, err) = prep(&["--data", d, "--cache", c2, "--size", "16"]);
    assert!(code == Some(0) && !err.contains("rows-per-shard"), "{out}\n{err}");
    // a dataset whose labels name no image it has: a cache without training images
    let empty = mini(&t.path().join("e"));
    for e in std::fs::read_dir(empty.join("images_training_rev1")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let (_, out, err) = prep(&["--data", empty.to_str().unwrap(), "--cache", c, "--size", "16"]);
    assert!(err.contains("the cache holds no training images"), "{out}\n{err}");
    // a cache root among the images it reads (made or not yet), refused before anything is
    // written: the next build took the cache for an unreadable input
    for root in ["images_training_rev1", "images_test_rev1/new/deeper"] {
        let inside = data.join(root);
        let (code, out, err) = prep(&["--data", d, "--cache", inside.to_str().unwrap(), "--size", "16"]);
        assert!(
            code == Some(1) && err.contains("lies inside the dataset's image folder"),
            "{out}\n{err}"
        );
    }
    assert!(!data.join("images_test_rev1/new").exists());

    let file = t.path().join("afile");
    std::fs::write(&file, "x").unwrap();
    let (ok, _, err) = support::run(
        support::gz()
            .args(["synth", "--train", "1", "--test", "1", "--out"])
            .arg(&file),
    );
    assert!(!ok && err.contains("exists and is not a folder"), "{err}");
    let (ok, _, err) = support::run(support::gz().args(["bench-train", "--model", "tiny", "--warmup", "100000000000"]));
    assert!(!ok && err.contains("--warmup 100000000000: at most"), "{err}");
}

/// A named pipe called like an image is skipped by name, never opened (a pipe read waits for a
/// writer for ever; prep passed it over in silence, predict hung on it); an edited manifest
/// (its config no longer what made the images) is refused where the cache is read and listed
/// as damaged; stdout on a full disk is an error, not a panic.
#[cfg(unix)]
#[test]
fn special_files_an_edited_manifest_and_a_full_stdout() {
    let t = support::tempdir();
    let data = mini(t.path());
    let fifo = data.join("images_test_rev1/777777.jpg");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let root = t.path().join("cache");
    let (code, out, err) = prep(&["--data", data.to_str().unwrap(), "--cache", root.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("skipped:") && l.contains("777777.jpg") && l.contains("not a regular file")),
        "{out}"
    );
    let cache = cache_line(&out);
    // the readers of an images folder (predict --images, submit --ids) refuse the pipe by name
    // (predict waited on it for ever)
    let sub = t.path().join("sub.csv");
    std::fs::write(&sub, "GalaxyID\n").unwrap();
    let (ok, _, err) = support::run(
        support::gz()
            .args(["submit", "--check"])
            .arg(&sub)
            .arg("--ids")
            .arg(data.join("images_test_rev1")),
    );
    assert!(
        !ok && err.contains("777777.jpg") && err.contains("not a regular file"),
        "{err}"
    );
    std::fs::remove_file(&fifo).unwrap();

    // stdout that cannot be written: exit status 1 and a message, no panic
    if std::path::Path::new("/dev/full").exists() {
        // (exit code and stderr of a gz command whose stdout is /dev/full)
        let to_full = |cmd: &mut std::process::Command| {
            let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
            let out = cmd.stdout(full).output().unwrap();
            (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
        };
        let (code, err) = to_full(support::gz().args(["cache", "list"]).arg(&root));
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains("gz cannot write to its standard output") && !err.contains("panicked"),
            "{err}"
        );
        // a command holding a folder lock removes its lock file on the way out (it exited
        // on the spot and left it)
        let synth = t.path().join("synth-full");
        let (code, err) = to_full(
            support::gz()
                .args(["synth", "--train", "3", "--test", "1", "--out"])
                .arg(&synth),
        );
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.matches("gz cannot write to its standard output").count() == 1 && !err.contains("panicked"),
            "{err}"
        );
        assert!(!synth.join(".gz-synth.lock").exists(), "{err}");
    }

    let manifest = cache.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("\"crop\": 212"), "{text}");
    std::fs::write(&manifest, text.replace("\"crop\": 212", "\"crop\": 100")).unwrap();
    let (ok, _, err) = support::run(
        support::gz()
            .args(["train", "--model", "tiny", "--epochs", "1", "--cache"])
            .arg(&cache)
            .arg("--out")
            .arg(t.path().join("run")),
    );
    assert!(!ok && err.contains("manifest was edited"), "{err}");
    let (code, out, _) = cache_cmd(&["list", root.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert!(out.contains("damaged: manifest.json's prep_config hashes to"), "{out}");
}

/// A cache that left an input out as unreadable is rebuilt once that input can be read (its
/// permissions fixed: the dataset key, names, sizes and modification times, does not change);
/// one that still cannot be read is a plain cache hit, its skip repeated.
#[test]
fn an_input_skipped_as_unreadable_is_read_once_it_can_be() {
    let t = support::tempdir();
    let data = mini(t.path());
    let root = t.path().join("cache");
    let args = ["--data", data.to_str().unwrap(), "--cache", root.to_str().unwrap()];
    let (code, out, err) = prep(&args);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let cache = cache_line(&out);
    let manifest = cache.join("manifest.json");
    let image = std::fs::read_dir(data.join("images_training_rev1"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .into_string()
        .unwrap();
    // (what a run that could not open it recorded; root reads any file, so the skip is
    // written into the manifest rather than made with chmod)
    let record = |paths: &[&str]| {
        let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
        m["extra"]["skipped"] = paths
            .iter()
            .map(|p| serde_json::json!({"path": p, "reason": "cannot read: Permission denied (os error 13)"}))
            .collect();
        std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    };
    // still unreadable (here: gone): the cache is what this dataset gives, its skip repeated
    record(&["images_training_rev1/999999.jpg"]);
    let (code, out, err) = prep(&args);
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(
        out.contains("cache hit") && out.contains("999999.jpg: cannot read"),
        "{out}\n{err}"
    );
    assert!(!err.contains("rebuilding"), "{err}");
    // readable now: rebuilt, with the image; but not while the cache holds a user's files,
    // which the rebuild would delete: then used as it is, said so (it failed)
    record(&[
        "images_training_rev1/999999.jpg",
        &format!("images_training_rev1/{image}"),
    ]);
    std::fs::write(cache.join("notes.txt"), "mine").unwrap();
    let (code, out, err) = prep(&args);
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(
        err.contains("(notes.txt), which rebuilding it would delete") && err.contains("the cache is used as it is"),
        "{err}"
    );
    assert!(out.contains("cache hit") && cache.join("notes.txt").exists(), "{out}");
    std::fs::remove_file(cache.join("notes.txt")).unwrap();
    let (code, out, err) = prep(&args);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        err.contains("as unreadable") && err.contains(&image) && err.contains("rebuilding the cache"),
        "{err}"
    );
    assert!(!out.contains("skipped:") && !out.contains("cache hit"), "{out}");
    assert_eq!(cache_line(&out), cache);
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert_eq!(m["extra"]["skipped"], serde_json::json!([]), "{m}");
    assert_eq!(m["extra"]["train_images"], 3, "{m}");
    // the rebuild left nothing beside the cache
    let names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");

    // the real thing, where permissions bind (not as root)
    // SAFETY: geteuid(2) has no preconditions
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let file = data.join("images_training_rev1").join(&image);
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
        let (code, out, err) = prep(&args);
        assert_eq!(code, Some(2), "{out}\n{err}");
        assert!(out.contains("cannot read"), "{out}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (code, out, err) = prep(&args);
        assert_eq!(code, Some(0), "{out}\n{err}");
        assert!(
            err.contains("rebuilding the cache") && !out.contains("skipped:"),
            "{out}\n{err}"
        );
    }
}
