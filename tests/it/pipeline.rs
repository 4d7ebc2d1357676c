//! `cargo xtask pipeline` end to end on a tiny synthetic set, in a temporary root: every stage
//! runs, the second run skips them all, a changed setting reruns only what depends on it, and
//! the last lines name the submission and the report. A stage whose `gz` subcommand is a stub
//! stops the pipeline with gz's plain "not built yet" message (checked with a stub `gz`).

use crate::support;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The xtask binary (debug), built once.
fn xtask_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = support::workspace_root();
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "-p", "xtask"])
                .current_dir(&root)
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building xtask failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            target
                .join("debug")
                .join(format!("xtask{}", std::env::consts::EXE_SUFFIX))
        })
        .clone()
}

fn pipeline(root: &Path, extra: &[&str]) -> (bool, String, String) {
    pipeline_with(&support::gz_bin(), root, extra)
}

fn pipeline_with(gz: &Path, root: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(xtask_bin());
    cmd.arg("pipeline")
        .arg("--gz")
        .arg(gz)
        .arg("--root")
        .arg(root)
        .args(["--seed", "7", "--model", "tiny", "--epochs", "1"])
        .args(extra);
    // the synthetic set's size (refused with a dataset of one's own)
    if !extra.contains(&"--data") {
        cmd.args(["--train", "32", "--test", "8"]);
    }
    support::run(&mut cmd)
}

/// A small synthetic set of seed `seed` in Kaggle layout at `dir/kaggle` (a dataset of one's
/// own, for `--data`).
fn a_dataset(dir: &Path, seed: &str) -> PathBuf {
    let data = dir.join("kaggle");
    let (ok, out, err) = support::run(
        support::gz()
            .args(["synth", "--train", "32", "--test", "8", "--seed", seed, "--out"])
            .arg(&data),
    );
    assert!(ok, "{out}\n{err}");
    data
}

/// Each of `stages` said it was up to date in xtask's stderr `err` (none of them ran again).
fn assert_up_to_date(err: &str, stages: &[&str]) {
    for s in stages {
        assert!(err.contains(&format!("xtask: {s}: up to date")), "{s} re-ran:\n{err}");
    }
}

fn last_line_value(stdout: &str, key: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")).map(PathBuf::from))
}

#[test]
fn pipeline_end_to_end_on_a_tiny_synthetic_set() {
    let t = support::tempdir();
    let (ok, out, err) = pipeline(t.path(), &[]);
    assert!(ok, "pipeline failed:\n{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    let n = lines.len();
    assert!(
        n >= 3 && lines[n - 2].starts_with("submission: ") && lines[n - 1].starts_with("report: "),
        "{out}"
    );
    let sub = last_line_value(&out, "submission").expect("submission line");
    let report = last_line_value(&out, "report").expect("report line");
    assert!(report.exists(), "{}", report.display());
    let solutions = gz_schema::read_solutions(&sub).expect("the submission reads as a Kaggle file");
    assert_eq!(solutions.len(), 8, "one row per test image");
    assert!(t.path().join("data/synth/training_solutions_rev1.csv").exists());
    // the synthetic test split's labels: its own report, and both scores in one line
    assert!(report.parent().unwrap().join("test/metrics.json").is_file(), "{out}");
    let scores = lines[n - 3];
    assert!(
        scores.starts_with("RMSE: validation ") && scores.contains(", test ") && scores.contains("Bayes floor"),
        "{out}"
    );

    // Second run: every stage is up to date, the same paths come out.
    let (ok2, out2, err2) = pipeline(t.path(), &[]);
    assert!(ok2, "{out2}\n{err2}");
    assert_up_to_date(&err2, &["synth", "prep", "train", "eval", "submit"]);
    assert_eq!(last_line_value(&out2, "submission"), Some(sub.clone()));

    // The same root through a link (or `..`): the same stamps, every stage up to date (each
    // ran again, a new run trained, for another spelling of the folder)
    let link = t.path().join("link");
    std::os::unix::fs::symlink(t.path(), &link).unwrap();
    let (ok_l, out_l, err_l) = pipeline(&link, &[]);
    assert!(ok_l, "{out_l}\n{err_l}");
    assert_up_to_date(&err_l, &["synth", "prep", "train", "eval", "submit"]);

    // A changed training setting reruns train and what follows, not synth or prep.
    let (ok3, _out3, err3) = pipeline(t.path(), &["--batch", "8"]);
    assert!(ok3, "{err3}");
    assert!(
        err3.contains("xtask: prep: up to date")
            && err3.contains("xtask: train: running because its command line changed (--batch "),
        "{err3}"
    );
    assert!(
        err3.contains("xtask: eval: running because its inputs changed"),
        "{err3}"
    );

    // Another gz binary (a rebuild) reruns prep, a cache hit, and nothing after it: the
    // cache it names is the same
    let gz2 = t.path().join("gz-rebuilt");
    std::fs::copy(support::gz_bin(), &gz2).unwrap();
    let (ok4, out4, err4) = pipeline_with(&gz2, t.path(), &["--batch", "8"]);
    assert!(ok4, "{out4}\n{err4}");
    assert!(
        err4.contains("xtask: prep: running because its inputs changed"),
        "{err4}"
    );
    assert_up_to_date(&err4, &["synth", "train", "eval", "submit"]);

    // A test image touched (or added, or replaced) gives the cache another folder: prep reruns,
    // and what reads the test images, but not train (it retrained from scratch: hours at
    // Kaggle's scale), whose input is the cache's training split
    let test_dir = t.path().join("data/synth/images_test_rev1");
    let image = std::fs::read_dir(&test_dir).unwrap().next().unwrap().unwrap().path();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .append(true)
        .open(&image)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let (ok5, out5, err5) = pipeline_with(&gz2, t.path(), &["--batch", "8"]);
    assert!(ok5, "{out5}\n{err5}");
    for s in ["prep", "eval", "submit"] {
        assert!(
            err5.contains(&format!("xtask: {s}: running because")),
            "{s} did not rerun:\n{err5}"
        );
    }
    assert!(err5.contains("xtask: train: up to date"), "train re-ran:\n{err5}");
    assert!(
        err5.contains("xtask: eval: running because its command line changed (--cache "),
        "{err5}"
    );
    assert_ne!(last_line_value(&out5, "submission"), None, "{out5}");
    // another training setting still retrains, naming it (not the cache)
    let (ok6, out6, err6) = pipeline_with(&gz2, t.path(), &["--batch", "4"]);
    assert!(ok6, "{out6}\n{err6}");
    assert!(
        err6.contains("xtask: train: running because its command line changed (--batch 8 → 4)"),
        "{err6}"
    );
}

/// A root moved with `mv` keeps every stage: the stamps name paths in the root relative to it
/// (every stage ran again in the moved root, synth replacing the set and train starting over,
/// as "never run").
#[test]
fn a_moved_root_keeps_its_stages() {
    let t = support::tempdir();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let (ok, out, err) = pipeline(&a, &[]);
    assert!(ok, "{out}\n{err}");
    std::fs::rename(&a, &b).unwrap();
    let (ok, out, err) = pipeline(&b, &[]);
    assert!(ok, "{out}\n{err}");
    assert_up_to_date(&err, &["synth", "prep", "train", "eval", "submit"]);
    // what it prints is where things are now
    let sub = last_line_value(&out, "submission").expect("submission line");
    assert!(sub.starts_with(&b) && sub.exists(), "{}", sub.display());
    assert!(!out.contains(&a.display().to_string()), "{out}");
}

/// Two roots whose `data/` links to one folder (a larger disk) share `data/stamps`: each
/// keeps its own stamps (named by the path in the root alone, they were one file, and each
/// root trained again after the other ran).
#[test]
fn roots_sharing_a_data_folder_keep_their_own_stages() {
    let t = support::tempdir();
    let shared = t.path().join("disk/data");
    std::fs::create_dir_all(&shared).unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    for r in [&a, &b] {
        std::fs::create_dir_all(r).unwrap();
        std::os::unix::fs::symlink(&shared, r.join("data")).unwrap();
    }
    // (a dataset of one's own: a synthetic set in the shared folder would be one set too)
    let data = a_dataset(t.path(), "3");
    let data = data.display().to_string();
    for r in [&a, &b] {
        let (ok, out, err) = pipeline(r, &["--data", &data]);
        assert!(ok, "{out}\n{err}");
    }
    let (ok, out, err) = pipeline(&a, &["--data", &data]);
    assert!(ok, "{out}\n{err}");
    assert_up_to_date(&err, &["prep", "train", "eval", "submit"]);
}

/// An image prep could not read (its permissions), which its cache left out, is read once it
/// can be: the prep stage reruns, and gz prep rebuilds the cache with it (the stamp, by the
/// dataset's names, sizes and modification times, which a chmod does not change, said up to
/// date for ever). Root reads any file, so the unreadable run is written into the stamp and
/// the cache's manifest rather than made with chmod.
#[test]
fn an_image_prep_could_not_read_is_read_once_it_can_be() {
    let t = support::tempdir();
    let data = a_dataset(t.path(), "4");
    let root = t.path().join("root");
    let args = ["--data", data.to_str().unwrap()];
    let (ok, out, err) = pipeline(&root, &args);
    assert!(ok, "{out}\n{err}");
    let image = std::fs::read_dir(data.join("images_training_rev1"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let name = image.file_name().unwrap().to_str().unwrap().to_string();
    let reason = "cannot read: Permission denied (os error 13)";
    // the prep stamp's stdout and the cache's manifest, as a run that could not read it left them
    let stamps = root.join("data/stamps");
    let prep = std::fs::read_dir(&stamps)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("prep-"))
        .unwrap();
    let mut st: serde_json::Value = serde_json::from_slice(&std::fs::read(&prep).unwrap()).unwrap();
    let cache = std::path::PathBuf::from(
        st["outputs"][0]["path"]
            .as_str()
            .unwrap()
            .replace("<root>", root.to_str().unwrap()),
    );
    st["stdout"] = format!(
        "skipped: {}: {reason}\n{}",
        image.display(),
        st["stdout"].as_str().unwrap()
    )
    .into();
    std::fs::write(&prep, st.to_string()).unwrap();
    // (as many bytes and the same modification time: the cache's identity, the prep stamp's
    // output, stays as it was)
    let manifest = cache.join("manifest.json");
    let was = std::fs::read(&manifest).unwrap();
    let modified = std::fs::metadata(&manifest).unwrap().modified().unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&was).unwrap();
    m["extra"]["skipped"] = serde_json::json!([{"path": format!("images_training_rev1/{name}"), "reason": reason}]);
    let mut text = m.to_string();
    assert!(text.len() <= was.len());
    text.push_str(&" ".repeat(was.len() - text.len()));
    std::fs::write(&manifest, text).unwrap();
    std::fs::File::options()
        .append(true)
        .open(&manifest)
        .unwrap()
        .set_modified(modified)
        .unwrap();

    let (ok, out, err) = pipeline(&root, &args);
    assert!(ok, "{out}\n{err}");
    assert!(
        err.contains(&format!(
            "xtask: prep: running because {} could not be read when it ran, and can be read now",
            image.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("rebuilding the cache") && !out.contains("skipped:"),
        "{out}\n{err}"
    );
    // the training images are the same: no training
    assert!(err.contains("xtask: train: up to date"), "{err}");
    let (ok, out, err) = pipeline(&root, &args);
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("xtask: prep: up to date"), "{err}");
}

/// A dataset with an unreadable training image and an unreadable test image: prep skips them
/// (listed) and the pipeline goes on; the submission still has a row for every test image, the
/// skipped one filled with the training mean and named.
#[test]
fn pipeline_goes_on_past_unreadable_images() {
    let t = support::tempdir();
    let data = a_dataset(t.path(), "5");
    let first = |sub: &str| {
        let mut v: Vec<PathBuf> = std::fs::read_dir(data.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v.remove(0)
    };
    let (train_jpg, test_jpg) = (first("images_training_rev1"), first("images_test_rev1"));
    for p in [&train_jpg, &test_jpg] {
        let bytes = std::fs::read(p).unwrap();
        std::fs::write(p, &bytes[..bytes.len() / 3]).unwrap(); // truncated
    }
    let test_id = test_jpg.file_stem().unwrap().to_string_lossy().to_string();
    let (ok, out, err) = pipeline(t.path(), &["--data", data.to_str().unwrap()]);
    assert!(ok, "pipeline failed:\n{out}\n{err}");
    assert!(err.contains("prep: some inputs were skipped"), "{err}");
    assert!(
        err.contains(&format!("filled with the training mean: {test_id}")),
        "{err}"
    );
    let sub = last_line_value(&out, "submission").expect("submission line");
    let rows = gz_schema::read_solutions(&sub).unwrap();
    assert_eq!(rows.len(), 8, "one row per test image, the unreadable one included");
    // and the end of the run says so beside the scores (the last word on it was submit's "0
    // rows filled": its predictions were filled already)
    assert!(
        out.contains("note: 1 row of the submission is the training mean: test image prep could not read"),
        "{out}"
    );
}

#[test]
fn pipeline_with_data_rejects_a_folder_that_is_not_kaggle_layout() {
    let t = support::tempdir();
    let data = t.path().join("not-kaggle");
    std::fs::create_dir_all(&data).unwrap();
    let (ok, out, err) = pipeline(t.path(), &["--data", data.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("not a dataset in Kaggle layout") && err.contains("training_solutions_rev1.csv"),
        "{err}"
    );
    assert!(!err.contains("synth:"), "no synth with --data: {err}");
}

#[test]
fn pipeline_rejects_unknown_options() {
    let t = support::tempdir();
    let (ok, _out, err) = pipeline(t.path(), &["--epocs", "3"]);
    assert!(!ok);
    assert!(err.contains("unexpected arguments: --epocs 3"), "{err}");
}

#[test]
fn a_stage_that_is_not_built_stops_the_pipeline_plainly() {
    let t = support::tempdir();
    let stub = t.path().join("gz-stub");
    std::fs::write(
        &stub,
        "#!/bin/sh\necho \"error: \\`gz $1\\` is not built yet\" >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, out, err) = pipeline_with(&stub, &t.path().join("root"), &[]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("pipeline stopped at `synth`: `gz synth` is not built yet"),
        "{err}"
    );
    assert!(!out.contains("submission:"), "{out}");
}

/// Every file under `dir` (relative paths), sorted.
fn listing(dir: &Path) -> Vec<String> {
    fn walk(d: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                out.push(p.strip_prefix(base).unwrap_or(&p).display().to_string());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

#[test]
fn pipeline_on_a_real_kaggle_layout_without_synthetic_extras() {
    // The real fixture has only Kaggle's own files: no floor, no expected fractions.
    let data = support::fixtures().join("kaggle-mini");
    let before = listing(&data);
    let t = support::tempdir();
    // a test report left by an earlier dataset under the same run name
    let stale = t.path().join("reports/kaggle-mini-tiny/test");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("metrics.json"), "{}").unwrap();
    let (ok, out, err) = pipeline(t.path(), &["--data", data.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    assert!(!err.contains("xtask: synth"), "no synth with --data: {err}");
    // no test labels: no test score, and the stale test report is gone
    assert!(!stale.exists(), "{out}");
    let scores = out.lines().find(|l| l.starts_with("RMSE: ")).expect("a scores line");
    assert!(
        scores.starts_with("RMSE: validation ")
            && !scores.contains(", test ")
            && scores.ends_with("(no test score: the test images have no labels here; Kaggle scores the submission)"),
        "{scores}"
    );
    let sub = last_line_value(&out, "submission").expect("submission line");
    let rows = gz_schema::read_solutions(&sub).expect("a Kaggle submission");
    let mut ids = rows.ids.clone();
    ids.sort_unstable();
    let mut want: Vec<u64> = std::fs::read_dir(data.join("images_test_rev1"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.path().file_stem()?.to_str()?.parse().ok())
        .collect();
    want.sort_unstable();
    assert_eq!(ids, want, "one row per test image");
    assert_eq!(before, listing(&data), "the dataset folder is left untouched");
}

/// A Kaggle-layout folder where the pipeline keeps its synthetic set, but without gz synth's
/// marks (someone's download put there): refused and left alone, not deleted and regenerated.
#[test]
fn a_download_in_the_synthetic_folder_is_not_deleted() {
    let t = support::tempdir();
    let imgs = t.path().join("data/synth/images_training_rev1");
    std::fs::create_dir_all(&imgs).unwrap();
    std::fs::write(imgs.join("100008.jpg"), b"a real image").unwrap();
    let (ok, out, err) = pipeline(t.path(), &[]);
    assert!(!ok && err.contains("was not written by `gz synth`"), "{out}\n{err}");
    assert!(imgs.join("100008.jpg").exists());
}

/// A shard damaged in place after the pipeline ran (its size unchanged) is rebuilt by the next
/// run: prep reruns because its cache changed and checks every checksum (`--verify`); before,
/// gz prep took the damaged cache for good on the hit and every later stage failed on it, run
/// after run.
#[test]
fn a_damaged_cache_is_rebuilt_by_the_next_run() {
    let t = support::tempdir();
    let (ok, out, err) = pipeline(t.path(), &[]);
    assert!(ok, "{out}\n{err}");
    let caches = t.path().join("data/cache");
    let cache = std::fs::read_dir(&caches)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("manifest.json").is_file())
        .expect("a cache");
    let shard = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "shard"))
        .expect("a shard");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x10;
    std::fs::write(&shard, &bytes).unwrap();
    let (ok, out, err) = pipeline(t.path(), &[]);
    assert!(ok, "{out}\n{err}");
    assert!(
        err.contains("prep: running because its output cache") && err.contains("--verify"),
        "{err}"
    );
    assert_ne!(std::fs::read(&shard).unwrap(), bytes, "rebuilt");
}
