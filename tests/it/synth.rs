//! gz-synth end to end: determinism across thread counts, the Kaggle layout, and `gz synth`.

use std::path::Path;

use gz_schema::{check_row, read_solutions, DEFAULT_TOLERANCE};
use gz_synth::{generate, SynthConfig};

use crate::support;

fn cfg(threads: usize) -> SynthConfig {
    SynthConfig {
        train: 6,
        test: 3,
        seed: 11,
        threads,
        ..SynthConfig::default()
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn same_seed_same_bytes_whatever_the_thread_count() {
    let (a, b) = (support::tempdir(), support::tempdir());
    generate(a.path(), &cfg(1), &|_| {}).unwrap();
    generate(b.path(), &cfg(2), &|_| {}).unwrap();
    for f in [
        "training_solutions_rev1.csv",
        "test_solutions.csv",
        "expected_training.csv",
        "expected_test.csv",
        "floor.json",
        "synth.json",
    ] {
        assert_eq!(
            read(&a.path().join(f)),
            read(&b.path().join(f)),
            "{f} differs between 1 and 2 threads"
        );
    }
    for d in ["images_training_rev1", "images_test_rev1"] {
        let names = sorted_names(&a.path().join(d));
        assert_eq!(names, sorted_names(&b.path().join(d)));
        for n in names {
            assert_eq!(
                read(&a.path().join(d).join(&n)),
                read(&b.path().join(d).join(&n)),
                "{d}/{n}"
            );
        }
    }
    // a different seed gives a different dataset
    let c = support::tempdir();
    generate(c.path(), &SynthConfig { seed: 12, ..cfg(0) }, &|_| {}).unwrap();
    assert_ne!(
        read(&a.path().join("training_solutions_rev1.csv")),
        read(&c.path().join("training_solutions_rev1.csv"))
    );
}

#[test]
fn kaggle_layout_and_valid_labels() {
    let dir = support::tempdir();
    let count = std::sync::atomic::AtomicU64::new(0);
    let summary = generate(dir.path(), &cfg(0), &|n| {
        count.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(count.into_inner(), 9, "progress reports every image");
    assert_eq!((summary.n_train, summary.n_test), (6, 3));
    let train = read_solutions(&dir.path().join("training_solutions_rev1.csv")).unwrap();
    let test = read_solutions(&dir.path().join("test_solutions.csv")).unwrap();
    let etrain = read_solutions(&dir.path().join("expected_training.csv")).unwrap();
    assert_eq!(train.ids, etrain.ids);
    assert_eq!((train.len(), test.len()), (6, 3));
    for (sol, d) in [(&train, "images_training_rev1"), (&test, "images_test_rev1")] {
        let mut want: Vec<String> = sol.ids.iter().map(|id| format!("{id}.jpg")).collect();
        want.sort();
        assert_eq!(
            sorted_names(&dir.path().join(d)),
            want,
            "one JPEG per labelled id in {d}"
        );
        for (i, id) in sol.ids.iter().enumerate() {
            assert!((100_000..=999_999).contains(id), "six-digit id {id}");
            assert!(check_row(sol.row(i), DEFAULT_TOLERANCE).is_empty(), "row {id}");
            let bytes = read(&dir.path().join(d).join(format!("{id}.jpg")));
            assert_eq!(&bytes[..2], &[0xFF, 0xD8], "JPEG SOI");
            // SOF0 says 424×424, 3 components
            let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).expect("baseline JPEG");
            let h = u16::from_be_bytes([bytes[sof + 5], bytes[sof + 6]]);
            let w = u16::from_be_bytes([bytes[sof + 7], bytes[sof + 8]]);
            assert_eq!((w, h, bytes[sof + 9]), (424, 424, 3));
        }
    }
    for id in &test.ids {
        assert!(!train.ids.contains(id), "train and test ids are disjoint");
    }
    let floor: serde_json::Value = serde_json::from_slice(&read(&dir.path().join("floor.json"))).unwrap();
    assert_eq!(floor["n_train"], 6);
    assert_eq!(floor["seed"], 11);
    let f = floor["train_rmse"].as_f64().unwrap();
    assert!(f > 0.01 && f < 0.2, "floor {f}");
}

/// A thread count no machine has is refused at once, for synth and prep (100,000 threads ran
/// for a quarter of an hour on 3 images and loaded the machine to a load average of 1,000).
#[test]
fn absurd_thread_counts_are_refused_at_once() {
    let dir = support::tempdir();
    support::gz_bin(); // (built before the clock starts)
    for args in [
        vec!["synth", "--train", "3", "--test", "3", "--threads", "100000", "--out"],
        vec!["prep", "--threads", "5000", "--data"],
    ] {
        let t = std::time::Instant::now();
        let (ok, _, stderr) = support::run(support::gz().args(&args).arg(dir.path().join("d")));
        assert!(!ok && stderr.contains("at most 1024"), "{args:?}: {stderr}");
        assert!(
            t.elapsed().as_secs() < 30,
            "{args:?}: refused only after {:?}",
            t.elapsed()
        );
    }
    assert!(!dir.path().join("d").exists());
}

#[test]
fn gz_synth_binary_end_to_end() {
    let dir = support::tempdir();
    let out = dir.path().join("data");
    let args = |extra: &[&str]| {
        let mut c = support::gz();
        c.args(["synth", "--out"])
            .arg(&out)
            .args(["--train", "5", "--test", "3", "--seed", "4"])
            .args(extra);
        c
    };
    let (ok, stdout, stderr) = support::run(&mut args(&["--threads", "2"]));
    assert!(ok, "gz synth failed: {stderr}");
    assert!(stdout.contains("5 train + 3 test"), "{stdout}");
    assert!(stdout.contains("Bayes floor"), "{stdout}");
    assert_eq!(
        stdout.lines().last().unwrap().trim(),
        format!("data: {}", out.display())
    );
    assert_eq!(
        read_solutions(&out.join("training_solutions_rev1.csv")).unwrap().len(),
        5
    );
    assert!(out.join("synth.json").exists());
    let csv = read(&out.join("training_solutions_rev1.csv"));

    // same dataset again: left alone
    let (ok, stdout, _) = support::run(&mut args(&[]));
    assert!(ok);
    assert!(stdout.contains("up to date"), "{stdout}");

    // a different dataset into the same directory is refused without --force ...
    let mut other = support::gz();
    other
        .args(["synth", "--out"])
        .arg(&out)
        .args(["--train", "4", "--test", "1", "--seed", "5"]);
    let (ok, _, stderr) = support::run(&mut other);
    assert!(!ok, "overwriting another dataset must be refused");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(
        read(&out.join("training_solutions_rev1.csv")),
        csv,
        "refused run left the data alone"
    );

    // ... and replaces it cleanly with --force
    let (ok, _, stderr) = support::run(other.arg("--force"));
    assert!(ok, "{stderr}");
    assert_eq!(
        sorted_names(&out.join("images_training_rev1")).len(),
        4,
        "stale images removed"
    );

    // a Kaggle-layout folder gz synth did not write (a real download: no synth.json, no
    // in-progress mark) is never replaced, --force or not
    std::fs::remove_file(out.join("synth.json")).unwrap();
    let csv = read(&out.join("training_solutions_rev1.csv"));
    for force in [false, true] {
        let (ok, _, stderr) = support::run(&mut args(if force { &["--force"] } else { &[] }));
        assert!(!ok && stderr.contains("did not write"), "{stderr}");
        assert_eq!(read(&out.join("training_solutions_rev1.csv")), csv);
        assert_eq!(sorted_names(&out.join("images_training_rev1")).len(), 4);
    }

    // an interrupted run (its in-progress mark, no synth.json) is detected, and --force redoes it
    std::fs::write(out.join("synth.in-progress"), "x").unwrap();
    let (ok, _, stderr) = support::run(&mut args(&[]));
    assert!(!ok);
    assert!(stderr.contains("incomplete"), "{stderr}");
    let (ok, _, stderr) = support::run(&mut args(&["--force"]));
    assert!(ok, "{stderr}");
    assert!(out.join("synth.json").exists() && !out.join("synth.in-progress").exists());

    // --force never removes what gz synth did not write inside the image folders (it emptied
    // them): refused, naming them, before anything is removed
    std::fs::write(out.join("images_training_rev1/README.txt"), "notes").unwrap();
    // (a desktop's clutter is not the user's: it goes with the folder)
    std::fs::write(out.join("images_training_rev1/.DS_Store"), "x").unwrap();
    std::fs::create_dir(out.join("images_test_rev1/keep")).unwrap();
    // (`other` holds --force since above)
    let (ok, _, stderr) = support::run(&mut other);
    assert!(
        !ok && stderr
            .contains("holds 2 files gz synth did not write (images_test_rev1/keep/, images_training_rev1/README.txt)"),
        "{stderr}"
    );
    assert!(out.join("synth.json").exists() && out.join("images_training_rev1/README.txt").exists());
    assert_eq!(
        sorted_names(&out.join("images_training_rev1")).len(),
        7,
        "nothing removed"
    );

    // bad arguments are clear errors
    let mut bad = support::gz();
    bad.args(["synth", "--out"])
        .arg(dir.path().join("x"))
        .args(["--min-volunteers", "9", "--max-volunteers", "3"]);
    let (ok, _, stderr) = support::run(&mut bad);
    assert!(!ok);
    assert!(stderr.contains("volunteers"), "{stderr}");
    // ... refused before the output folder is created (or locked)
    assert!(!dir.path().join("x").exists(), "a refused config created its --out");
}

/// An empty split has no Bayes floor to show (it was printed as 0.00000, and written as 0.0 in
/// floor.json); a refusal names the volunteer settings too (a set differing only in them read as
/// the same one); an in-progress mark a killed run left beside a whole set goes at the next run
/// (it stayed, saying "gz synth is writing this dataset").
#[test]
fn an_empty_split_shows_no_floor_and_refusals_name_the_volunteers() {
    let dir = support::tempdir();
    let out = dir.path().join("d");
    let mut c = support::gz();
    c.args(["synth", "--train", "0", "--test", "2", "--seed", "3", "--out"])
        .arg(&out);
    let (ok, stdout, stderr) = support::run(&mut c);
    assert!(
        ok && stdout.contains("train - (no images), test 0."),
        "{stdout}\n{stderr}"
    );
    // floor.json says so too: null, not an RMSE of 0 (which read as a perfect floor)
    let floor: serde_json::Value = serde_json::from_slice(&read(&out.join("floor.json"))).unwrap();
    assert!(floor["train_rmse"].is_null(), "{floor}");
    // a run killed between synth.json and removing its in-progress mark: the same command
    // finds the set up to date and removes the mark
    std::fs::write(out.join(gz_synth::IN_PROGRESS), "x").unwrap();
    let mut c = support::gz();
    c.args(["synth", "--train", "0", "--test", "2", "--seed", "3", "--out"])
        .arg(&out);
    let (ok, stdout, stderr) = support::run(&mut c);
    assert!(ok && stdout.contains("up to date"), "{stdout}\n{stderr}");
    assert!(!out.join(gz_synth::IN_PROGRESS).exists(), "{stderr}");
    assert!(floor["test_rmse"].as_f64().is_some_and(|f| f > 0.0), "{floor}");
    let mut c = support::gz();
    c.args([
        "synth",
        "--train",
        "0",
        "--test",
        "2",
        "--seed",
        "3",
        "--max-volunteers",
        "50",
        "--out",
    ])
    .arg(&out);
    let (ok, _, stderr) = support::run(&mut c);
    assert!(!ok && stderr.contains("25–60 volunteers per galaxy"), "{stderr}");
}

/// A run that dies writing an image leaves no truncated JPEG under a final name: the image is
/// written to a hidden temporary and renamed. The file size limit stops the first image part
/// way, as a full disk would: with SIGXFSZ the process is killed (its temporary stays: gz prep
/// does not read it as an image, and `--force` redoes the set cleanly), with the signal
/// ignored the write fails (the temporary is removed, the error names the image).
#[cfg(unix)]
#[test]
fn a_run_that_dies_writing_an_image_leaves_no_truncated_jpeg() {
    let dir = support::tempdir();
    for (how, trap) in [("killed", ""), ("failed write", "trap '' XFSZ; ")] {
        let out = dir.path().join(how.replace(' ', "-"));
        let images = out.join("images_test_rev1");
        // 4 KiB (8 blocks of 512 bytes): the in-progress mark fits, no image does
        let mut c = std::process::Command::new("sh");
        c.arg("-c")
            .arg(format!("{trap}ulimit -f 8; exec \"$0\" \"$@\""))
            .arg(support::gz_bin())
            .args([
                "synth",
                "--train",
                "0",
                "--test",
                "3",
                "--seed",
                "2",
                "--threads",
                "1",
                "--out",
            ])
            .arg(&out);
        let (ok, _, stderr) = support::run(&mut c);
        assert!(!ok, "{how}: the run must not succeed under the limit: {stderr}");
        assert!(!out.join("synth.json").exists(), "{how}");
        let left = sorted_names(&images);
        assert!(
            left.iter().all(|n| !n.ends_with(".jpg")),
            "{how}: a partly written image under its final name: {left:?}"
        );
        if how == "killed" {
            assert_eq!(left.len(), 1, "the killed run's temporary: {left:?}");
            assert!(gz_synth::is_temp_name(&left[0]), "{left:?}");
            // gz prep refuses the unfinished set; with its mark removed by hand, it passes over
            // the temporary as a hidden file: no image read from it
            let prep = || {
                let o = support::gz()
                    .args(["prep", "--data"])
                    .arg(&out)
                    .arg("--cache")
                    .arg(dir.path().join("cache"))
                    .output()
                    .unwrap();
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                (o.status.success(), text(&o.stdout), text(&o.stderr))
            };
            let (ok, _, stderr) = prep();
            assert!(!ok && stderr.contains("gz synth did not finish"), "{stderr}");
            let mark = std::fs::read(out.join(gz_synth::IN_PROGRESS)).unwrap();
            std::fs::remove_file(out.join(gz_synth::IN_PROGRESS)).unwrap();
            let (_, stdout, stderr) = prep();
            assert!(
                stdout.contains("preprocessed 0 train + 0 test images") && !stdout.contains(&left[0]),
                "{stdout}\n{stderr}"
            );
            // (the mark back: the rerun below takes the set for its own unfinished one)
            std::fs::write(out.join(gz_synth::IN_PROGRESS), mark).unwrap();
        } else {
            assert!(left.is_empty(), "{how}: the temporary is removed: {left:?}");
            assert!(
                stderr.contains("images_test_rev1/") && stderr.contains(".jpg"),
                "{how}: the error names the image: {stderr}"
            );
        }
        // a rerun with --force (without the limit) completes, with no temporary left
        let mut again = support::gz();
        again
            .args([
                "synth", "--train", "0", "--test", "3", "--seed", "2", "--force", "--out",
            ])
            .arg(&out);
        let (ok, _, stderr) = support::run(&mut again);
        assert!(ok, "{how}: {stderr}");
        let names = sorted_names(&images);
        assert!(
            names.len() == 3 && names.iter().all(|n| n.ends_with(".jpg") && !n.starts_with('.')),
            "{how}: {names:?}"
        );
    }
}

/// Two `gz synth` into one folder at once: the second, with `--force` or not, is refused naming
/// the folder and the first one's process, and leaves the first one's files alone (before, it
/// removed the first's folders with `--force`, or both wrote the same files). The first is
/// stopped (SIGSTOP) while it holds the lock, so the test does not race it; once it is killed,
/// its lock file (left behind) blocks nobody: the next run completes and removes it.
#[cfg(unix)]
#[test]
fn a_second_gz_synth_into_the_same_folder_is_refused() {
    use std::process::Stdio;
    let dir = support::tempdir();
    let out = dir.path().join("d");
    let lock = out.join(gz_synth::LOCK_FILE);
    // far more images than it writes before it is stopped
    // killed when the test ends, however it ends (stopped, it would stay for good)
    let mut first = support::Running::spawn(
        support::gz()
            .args(["synth", "--train", "100000", "--test", "0", "--threads", "1", "--out"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let pid = first.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    // its lock taken and its first folder made (after its in-progress mark)
    let busy = || {
        std::fs::read_to_string(&lock).is_ok_and(|t| t.trim() == pid.to_string())
            && out.join("images_training_rev1").is_dir()
    };
    while !busy() {
        assert!(std::time::Instant::now() < deadline, "gz synth never started writing");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) of the child this test started
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
    let second = |force: bool| {
        let mut c = support::gz();
        c.args(["synth", "--train", "2", "--test", "1", "--out"]).arg(&out);
        if force {
            c.arg("--force");
        }
        support::run(&mut c)
    };
    for force in [false, true] {
        let (ok, _, stderr) = second(force);
        assert!(!ok, "--force {force}: a second writer must be refused");
        assert!(
            stderr.contains(&format!(
                "{} is in use: another gz synth (process {pid})",
                out.display()
            )),
            "--force {force}: {stderr}"
        );
        assert!(
            out.join("synth.in-progress").exists(),
            "--force {force}: the first run's mark is gone"
        );
        assert!(
            out.join("images_training_rev1").is_dir(),
            "--force {force}: the first run's images are gone"
        );
    }
    // SAFETY: as above
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    first.wait().unwrap();
    assert!(lock.exists(), "a killed run leaves its lock file");
    // a Ctrl-C (SIGINT) ends the run as before, by the signal, but its lock file goes with it
    // (and the folder stays: it holds the run's images and in-progress mark)
    {
        use std::os::unix::process::ExitStatusExt as _;
        let fresh = dir.path().join("e");
        let lock = fresh.join(gz_synth::LOCK_FILE);
        let mut run = support::Running::spawn(
            support::gz()
                .args(["synth", "--train", "100000", "--test", "0", "--threads", "1", "--out"])
                .arg(&fresh)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let pid = run.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !(std::fs::read_to_string(&lock).is_ok_and(|t| t.trim() == pid.to_string())
            && fresh.join("images_training_rev1").is_dir())
        {
            assert!(std::time::Instant::now() < deadline, "gz synth never started writing");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // SAFETY: kill(2) of the child this test started
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        let status = run.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
        assert!(!lock.exists(), "an interrupted run left its lock file");
        assert!(fresh.join(gz_synth::IN_PROGRESS).exists());
    }
    let (ok, _, stderr) = second(true);
    assert!(ok, "a dead run's lock must not block: {stderr}");
    assert!(out.join("synth.json").exists() && !out.join("synth.in-progress").exists());
    assert_eq!(sorted_names(&out.join("images_training_rev1")).len(), 2);
    assert!(!lock.exists(), "the lock file goes when the run ends");
}

/// The same config over a set with an image or a label file deleted since is not "up to date"
/// (it was, going by `synth.json` alone, and gz prep then lacked the file): it is refused
/// naming what is missing, and `--force` regenerates it.
#[test]
fn a_set_with_a_file_deleted_is_not_up_to_date() {
    let dir = support::tempdir();
    let out = dir.path().join("d");
    let c = SynthConfig {
        train: 2,
        test: 1,
        seed: 6,
        ..SynthConfig::default()
    };
    generate(&out, &c, &|_| {}).unwrap();
    let (_, test_ids) = gz_synth::draw_ids(&c);
    let image = out.join("images_test_rev1").join(format!("{}.jpg", test_ids[0]));
    let synth = |force: bool| {
        let mut cmd = support::gz();
        cmd.args(["synth", "--train", "2", "--test", "1", "--seed", "6", "--out"])
            .arg(&out);
        if force {
            cmd.arg("--force");
        }
        support::run(&mut cmd)
    };
    let (ok, stdout, stderr) = synth(false);
    assert!(ok && stdout.contains("up to date"), "{stdout}\n{stderr}");
    let bytes = read(&image);
    for gone in [image.clone(), out.join("expected_test.csv")] {
        let kept = read(&gone);
        std::fs::remove_file(&gone).unwrap();
        let (ok, stdout, stderr) = synth(false);
        let name = gone.strip_prefix(&out).unwrap().display().to_string();
        assert!(
            !ok && stderr.contains(&format!("with 1 of its files missing ({name})")) && stderr.contains("--force"),
            "{name}: {stdout}\n{stderr}"
        );
        std::fs::write(&gone, kept).unwrap();
    }
    std::fs::remove_file(&image).unwrap();
    let (ok, _, stderr) = synth(true);
    assert!(ok, "{stderr}");
    assert_eq!(read(&image), bytes, "regenerated the same image");
    // a set an earlier gz drew (its synth.json names no generator version: version 1) is not
    // this one, whose images differ: refused naming the versions, regenerated with --force
    let marker = out.join("synth.json");
    let now: serde_json::Value = serde_json::from_slice(&read(&marker)).unwrap();
    assert_eq!(now["generator"], gz_synth::GENERATOR);
    let mut old = now.clone();
    old.as_object_mut().unwrap().remove("generator");
    std::fs::write(&marker, old.to_string()).unwrap();
    let (ok, stdout, stderr) = synth(false);
    assert!(
        !ok && stderr.contains("drawn by an earlier gz (generator version 1;") && stderr.contains("--force"),
        "{stdout}\n{stderr}"
    );
    let (ok, _, stderr) = synth(true);
    assert!(ok, "{stderr}");
    let again: serde_json::Value = serde_json::from_slice(&read(&marker)).unwrap();
    assert_eq!(again, now);
    assert_eq!(read(&image), bytes);
    // a set of a higher version is a later gz's (this one is older): not "an earlier gz"
    let mut newer = now.clone();
    newer["generator"] = (gz_synth::GENERATOR + 1).into();
    std::fs::write(&marker, newer.to_string()).unwrap();
    let (ok, stdout, stderr) = synth(false);
    assert!(
        !ok && stderr.contains(&format!(
            "drawn by a later gz (generator version {}; this one draws version {}",
            gz_synth::GENERATOR + 1,
            gz_synth::GENERATOR
        )),
        "{stdout}\n{stderr}"
    );
    let (ok, _, stderr) = synth(true);
    assert!(ok, "{stderr}");
    assert_eq!(read(&image), bytes);
    // and the version this gz draws is what --generator-version prints
    let (ok, stdout, _) = support::run(support::gz().args(["synth", "--generator-version"]));
    assert!(ok && stdout.trim() == gz_synth::GENERATOR.to_string(), "{stdout}");
}
