//! gz-eval from the outside: `gz submit` (writing and `--check`), and `gz eval` / `gz predict` /
//! `gz submit --run` on a tiny synthetic dataset with a tiny model trained for one epoch.

use std::path::{Path, PathBuf};

use crate::support;
use gz_schema::{csv_header, Solutions, N_ANSWERS};

fn write_test_jpeg_names(dir: &Path, ids: &[u64]) {
    std::fs::create_dir_all(dir).unwrap();
    for id in ids {
        std::fs::write(dir.join(format!("{id}.jpg")), b"not looked at").unwrap();
    }
}

fn row(id: u64, v: &str) -> String {
    format!("{id}{}", format!(",{v}").repeat(N_ANSWERS))
}

#[test]
fn submit_check_lists_every_problem() {
    let tmp = support::tempdir();
    let ids_dir = tmp.path().join("images_test_rev1");
    write_test_jpeg_names(&ids_dir, &[100, 101, 102, 103]);
    let bad = tmp.path().join("bad.csv");
    let text = [
        csv_header().replace("Class11.6", "Class11.7"),
        row(100, "0.5"),
        row(101, "nan"),
        row(100, "0.5"),
        row(102, "1.25"),
        "77,0.5".to_string(),
    ]
    .join("\n");
    std::fs::write(&bad, text).unwrap();
    let (ok, out, err) = support::run(
        support::gz()
            .args(["submit", "--check"])
            .arg(&bad)
            .arg("--ids")
            .arg(&ids_dir),
    );
    assert!(!ok, "a bad file must fail the check\n{out}\n{err}");
    for needle in [
        "line 1: header column 38 is \"Class11.7\", expected \"Class11.6\"",
        "line 3: Class1.1: NaN",
        "line 4: duplicate GalaxyID 100 (first on line 2)",
        "line 5: Class1.1: 1.25 is outside [0, 1]",
        "line 6: expected 38 fields",
        "line 6: GalaxyID 77 is not one of the test images",
        "no row for test image 103",
        "5 rows, but there are 4 test images",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    assert!(err.contains(" problems: "), "{err}");

    // a good file passes, and the completeness check uses the folder
    let good = tmp.path().join("good.csv");
    let text = [
        csv_header(),
        row(100, "0.5"),
        row(101, "0"),
        row(102, "1"),
        row(103, "0.25"),
    ]
    .join("\n");
    std::fs::write(&good, text).unwrap();
    // `--images` stands for `--ids` with --check too (as with --pred); it used to be ignored,
    // so a file missing test images passed as "valid submission"
    for flag in ["--ids", "--images"] {
        let (ok, out, err) = support::run(
            support::gz()
                .args(["submit", "--check"])
                .arg(&good)
                .arg(flag)
                .arg(&ids_dir),
        );
        assert!(ok, "{flag}: {out}\n{err}");
        assert!(
            out.contains("valid submission, 4 rows, complete for the 4 test images"),
            "{flag}: {out}"
        );
    }
    // without the test images a file cut short would pass: the line says it was not compared
    let (ok, out, err) = support::run(support::gz().args(["submit", "--check"]).arg(&good));
    assert!(
        ok && out.contains("valid submission, 4 rows (not checked for completeness: --ids FOLDER"),
        "{out}\n{err}"
    );
    write_test_jpeg_names(&ids_dir, &[104]);
    let (ok, out, _) = support::run(
        support::gz()
            .args(["submit", "--check"])
            .arg(&good)
            .arg("--images")
            .arg(&ids_dir),
    );
    assert!(!ok && out.contains("no row for test image 104"), "{out}");
}

/// A file of per-question fractions (`gz predict --conditional`) is no submission: `--check`
/// says so with the same hint as `--pred`, rounded to 2 decimals (as a spreadsheet saves it)
/// or not, while the Kaggle values of the same galaxies pass.
#[test]
fn submit_check_refuses_per_question_fractions() {
    let tmp = support::tempdir();
    let ids_dir = tmp.path().join("images_test_rev1");
    write_test_jpeg_names(&ids_dir, &[100, 101]);
    // Kaggle values: each question sums to the answer that leads to it
    let mut kaggle = [0.0f32; N_ANSWERS];
    for (i, v) in [
        (0, 0.3),
        (1, 0.6),
        (2, 0.1),
        (3, 0.2),
        (4, 0.4),
        (5, 0.1),
        (6, 0.3),
        (7, 0.25),
        (8, 0.15),
        (9, 0.4),
        (13, 0.5),
        (14, 0.5),
        (15, 0.3),
        // Q8 in thirds: "0.33" three times sums to 0.99 once rounded
        (18, 0.5 / 3.0),
        (19, 0.5 / 3.0),
        (20, 0.5 / 3.0),
        (25, 0.2),
        (28, 0.25),
        (31, 0.25),
    ] {
        kaggle[i] = v;
    }
    assert!(gz_schema::check_row(&kaggle, 1e-5).is_empty());
    let cells = gz_schema::conditional(&kaggle);
    let write = |name: &str, values: &dyn Fn(usize) -> String| {
        let p = tmp.path().join(name);
        let rows = [100u64, 101].map(|id| {
            format!(
                "{id}{}",
                (0..N_ANSWERS).map(|k| format!(",{}", values(k))).collect::<String>()
            )
        });
        std::fs::write(&p, format!("{}\n{}\n{}\n", csv_header(), rows[0], rows[1])).unwrap();
        p
    };
    let cond = |k: usize| cells[k].map_or(String::new(), |v| v.to_string());
    let cond2 = |k: usize| cells[k].map_or(String::new(), |v| format!("{v:.2}"));
    let kaggle_text = |k: usize| format!("{:.2}", kaggle[k]);
    for (file, conditional) in [
        (write("cond.csv", &cond), true),
        (write("cond2.csv", &cond2), true),
        (write("kaggle.csv", &kaggle_text), false),
    ] {
        let (ok, out, err) = support::run(
            support::gz()
                .args(["submit", "--check"])
                .arg(&file)
                .arg("--ids")
                .arg(&ids_dir),
        );
        if !conditional {
            assert!(ok, "{}: {out}\n{err}", file.display());
            continue;
        }
        assert!(!ok, "{}: {out}\n{err}", file.display());
        assert!(
            out.contains("per-question fractions (`gz predict --conditional`)")
                && out.contains("predict again without --conditional")
                && err.contains("1 problem: 1 per-question fractions"),
            "{}: {out}\n{err}",
            file.display()
        );
        let (ok, out, err) = support::run(
            support::gz()
                .args(["submit", "--pred"])
                .arg(&file)
                .arg("--ids")
                .arg(&ids_dir)
                .arg("--out")
                .arg(tmp.path().join("sub.csv")),
        );
        assert!(
            !ok && err.contains("predict again without --conditional"),
            "{}: {out}\n{err}",
            file.display()
        );
    }
}

/// The writing commands create missing folders on the way to their output, and refuse an
/// output they could not write (a folder where the file goes, a file among the folders above)
/// before any work, naming the option: `gz predict` predicted everything first.
#[test]
fn outputs_are_checked_before_any_work_and_missing_folders_created() {
    let tmp = support::tempdir();
    let file = tmp.path().join("afile");
    std::fs::write(&file, "x").unwrap();
    let missing_run = tmp.path().join("no-such-run");
    let under_file = file.join("sub").join("x.csv");
    let cases: [(&str, Vec<&std::ffi::OsStr>, &str); 4] = [
        (
            "predict",
            vec![
                "--cache".as_ref(),
                tmp.path().as_os_str(),
                "--out".as_ref(),
                tmp.path().as_os_str(),
            ],
            "is a folder; name the file to write",
        ),
        (
            "predict",
            vec![
                "--cache".as_ref(),
                tmp.path().as_os_str(),
                "--out".as_ref(),
                under_file.as_os_str(),
            ],
            "afile is a file, not a folder",
        ),
        (
            "submit",
            vec![
                "--images".as_ref(),
                tmp.path().as_os_str(),
                "--out".as_ref(),
                under_file.as_os_str(),
            ],
            "afile is a file, not a folder",
        ),
        (
            "eval",
            vec![
                "--cache".as_ref(),
                tmp.path().as_os_str(),
                "--report".as_ref(),
                under_file.as_os_str(),
            ],
            "afile is a file, not a folder",
        ),
    ];
    for (cmd, args, want) in cases {
        let (ok, out, err) = support::run(support::gz().arg(cmd).arg("--run").arg(&missing_run).args(&args));
        assert!(!ok && err.contains(want), "{cmd} {args:?}: {out}\n{err}");
        assert!(
            !err.contains("no-such-run"),
            "{cmd}: the output is checked first\n{err}"
        );
    }
    // --spread naming --out's file under another spelling is refused, not written over it
    let (ok, out, err) = support::run(
        support::gz()
            .current_dir(tmp.path())
            .args([
                "predict", "--tta", "2", "--out", "p.csv", "--spread", "./p.csv", "--cache",
            ])
            .arg(tmp.path())
            .arg("--run")
            .arg(&missing_run),
    );
    assert!(!ok && err.contains("name the same file"), "{out}\n{err}");
    // ... or through a symbolic link to it (the writers follow links: the spread replaced
    // the predictions)
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("p.csv", tmp.path().join("l.csv")).unwrap();
        let (ok, out, err) = support::run(
            support::gz()
                .current_dir(tmp.path())
                .args([
                    "predict", "--tta", "2", "--out", "p.csv", "--spread", "l.csv", "--cache",
                ])
                .arg(tmp.path())
                .arg("--run")
                .arg(&missing_run),
        );
        assert!(!ok && err.contains("name the same file"), "{out}\n{err}");
    }
    // an output never replaces an input (a checkpoint, an image, the predictions read) nor
    // lands in a shard cache; refused before anything is loaded
    let run = tmp.path().join("run");
    let (cache, images) = (tmp.path().join("cache"), tmp.path().join("im"));
    for d in [&run, &cache, &images] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(images.join("100.jpg"), "not read").unwrap();
    // (a manifest stands for a cache: a folder without one is said to be no cache)
    std::fs::write(cache.join("manifest.json"), "{}").unwrap();
    let cases: [(&str, &Path, &str, &Path, &str); 5] = [
        (
            "--cache",
            &cache,
            "--out",
            &run.join("best.safetensors"),
            "run/best.safetensors, an input",
        ),
        (
            "--cache",
            &cache,
            "--spread",
            &run.join("last.json"),
            "run/last.json, an input",
        ),
        (
            "--cache",
            &cache,
            "--out",
            &cache.join("p.csv"),
            "lies inside the shard cache",
        ),
        (
            "--images",
            &images,
            "--out",
            &images.join("100.jpg"),
            "is an image of the input folder",
        ),
        (
            "--images",
            &images,
            "--out",
            &images.join("new.JPEG"),
            "is an image of the input folder",
        ),
    ];
    for (src, dir, flag, target, want) in cases {
        let mut cmd = support::gz();
        cmd.args(["predict", "--tta", "2", "--run"]).arg(&run).arg(src).arg(dir);
        if flag == "--spread" {
            cmd.arg("--out").arg(tmp.path().join("q.csv"));
        }
        let (ok, out, err) = support::run(cmd.arg(flag).arg(target));
        assert!(!ok && err.contains(want), "{flag} {target:?}: {out}\n{err}");
    }
    assert_eq!(std::fs::read_to_string(images.join("100.jpg")).unwrap(), "not read");
    // nor a file gz would not have written, an input or not: another run's checkpoint, a
    // dataset's labels (refused before anything is loaded, and left as they were)
    let theirs = tmp.path().join("other-run.safetensors");
    std::fs::write(&theirs, "weights").unwrap();
    let labels = tmp.path().join("training_solutions_rev1.csv");
    std::fs::write(&labels, format!("{}\n", csv_header())).unwrap();
    for (target, want) in [
        (&theirs, "is not a predictions CSV"),
        (&labels, "is the name of a dataset's labels"),
    ] {
        for cmd in ["predict", "submit"] {
            let (ok, out, err) = support::run(
                support::gz()
                    .args([cmd, "--run"])
                    .arg(&missing_run)
                    .arg("--cache")
                    .arg(&cache)
                    .arg("--out")
                    .arg(target),
            );
            assert!(
                !ok && err.contains(want) && !err.contains("no-such-run"),
                "{cmd}: {out}\n{err}"
            );
        }
    }
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "weights");
    let pred = tmp.path().join("pred.csv");
    std::fs::write(&pred, format!("{}\n{}\n", csv_header(), row(100, "0.25"))).unwrap();
    let (ok, out, err) = support::run(support::gz().current_dir(tmp.path()).args([
        "submit",
        "--pred",
        "pred.csv",
        "--out",
        "./pred.csv",
    ]));
    assert!(!ok && err.contains("would replace pred.csv, an input"), "{out}\n{err}");
    // `gz eval` of a run that does not exist, reporting into `report`: the report folder is
    // checked first
    let eval_into = |report: &Path| {
        support::run(
            support::gz()
                .args(["eval", "--run"])
                .arg(&missing_run)
                .arg("--cache")
                .arg(&cache)
                .arg("--report")
                .arg(report),
        )
    };
    // a report folder whose page is a user's own: refused before the scoring, page kept
    let site = tmp.path().join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("index.html"), "<html>mine</html>").unwrap();
    let (ok, out, err) = eval_into(&site);
    assert!(
        !ok && err.contains("its index.html is not a gz report's"),
        "{out}\n{err}"
    );
    assert_eq!(
        std::fs::read_to_string(site.join("index.html")).unwrap(),
        "<html>mine</html>"
    );
    // ... or a folder of the user's figures named as a report's
    let figures = tmp.path().join("figures");
    std::fs::create_dir(&figures).unwrap();
    std::fs::write(figures.join("spread.png"), "mine").unwrap();
    let (ok, out, err) = eval_into(&figures);
    assert!(
        !ok && err.contains("it holds spread.png but no earlier report"),
        "{out}\n{err}"
    );
    // ... or a report inside the shard cache
    let (ok, out, err) = eval_into(&cache.join("report"));
    assert!(!ok && err.contains("lies inside the shard cache"), "{out}\n{err}");
    // ... but a run of gz eval stopped before its metrics.json (its marked gallery of
    // thumbnails only) is taken up again: the error is about the run, not the folder
    let stopped = tmp.path().join("stopped");
    std::fs::create_dir_all(stopped.join("gallery")).unwrap();
    std::fs::write(stopped.join("gallery/100.png"), "x").unwrap();
    let (ok, out, err) = eval_into(&stopped);
    assert!(
        !ok && err.contains("it holds gallery but no earlier report"),
        "numbered pictures without gz's mark are a user's: {out}\n{err}"
    );
    std::fs::write(stopped.join("gallery/.gz-gallery"), "").unwrap();
    // (with the temporary of the thumbnail it was writing when killed, and a user's file)
    std::fs::write(stopped.join("gallery/.101.png.4242.tmp"), "half").unwrap();
    std::fs::write(stopped.join("gallery/cover.jpg"), "mine").unwrap();
    let (ok, out, err) = eval_into(&stopped);
    assert!(
        !ok && !err.contains("--report") && err.contains("no-such-run"),
        "{out}\n{err}"
    );
    // a gallery that is a link (over an earlier report its numbered pictures are replaced,
    // wherever it points) or a file, and a report folder that links to nothing: refused
    // before the scoring, not when creating them after it
    let linked = tmp.path().join("linked");
    std::fs::create_dir(&linked).unwrap();
    std::fs::create_dir(tmp.path().join("pics")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("pics"), linked.join("gallery")).unwrap();
    let (ok, out, err) = eval_into(&linked);
    assert!(!ok && err.contains("its gallery is a link"), "{out}\n{err}");
    std::fs::remove_file(linked.join("gallery")).unwrap();
    std::fs::write(linked.join("gallery"), "x").unwrap();
    let (ok, out, err) = eval_into(&linked);
    assert!(!ok && err.contains("its gallery is not a folder"), "{out}\n{err}");
    let dangling = tmp.path().join("dangling");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
    let (ok, out, err) = eval_into(&dangling);
    assert!(!ok && err.contains("a link to nothing"), "{out}\n{err}");
    // missing folders are created
    let deep = tmp.path().join("new").join("dir").join("sub.csv");
    let (ok, out, err) = support::run(
        support::gz()
            .args(["submit", "--pred"])
            .arg(&pred)
            .arg("--out")
            .arg(&deep),
    );
    assert!(ok && deep.is_file(), "{out}\n{err}");
}

#[test]
fn submit_from_predictions_refuses_short_files_unless_filled() {
    let tmp = support::tempdir();
    let data = tmp.path().join("data");
    let ids_dir = data.join("images_test_rev1");
    write_test_jpeg_names(&ids_dir, &[5, 6, 7]);
    // training labels for --fill-mean: mean Class1.1 = 0.5, others 0
    let mut train = Solutions::new();
    let mut r = [0f32; N_ANSWERS];
    r[0] = 1.0;
    train.push(1, &r);
    train.push(2, &[0.0; N_ANSWERS]);
    gz_schema::write_solutions(&data.join("training_solutions_rev1.csv"), &train).unwrap();

    let pred = tmp.path().join("pred.csv");
    std::fs::write(&pred, [csv_header(), row(7, "1.5"), row(5, "-0.5")].join("\n")).unwrap();
    let out_path = tmp.path().join("submission.csv");
    let (ok, out, err) = support::run(
        support::gz()
            .args(["submit", "--pred"])
            .arg(&pred)
            .arg("--ids")
            .arg(&ids_dir)
            .arg("--out")
            .arg(&out_path),
    );
    assert!(!ok, "{out}");
    assert!(err.contains("1 test image has no prediction (e.g. 6)"), "{err}");
    assert!(!out_path.exists(), "a short submission must not be written");

    let (ok, out, err) = support::run(
        support::gz()
            .args(["submit", "--fill-mean", "--pred"])
            .arg(&pred)
            .arg("--ids")
            .arg(&ids_dir)
            .arg("--out")
            .arg(&out_path),
    );
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("filled with the training mean: 6"), "{err}");
    assert!(out.lines().last().unwrap().starts_with("submission: "), "{out}");
    let sub = gz_schema::read_solutions(&out_path).unwrap();
    assert_eq!(sub.ids, vec![5, 6, 7]);
    assert_eq!(sub.row(0)[0], 0.0); // clipped from -0.5
    assert_eq!(sub.row(2)[0], 1.0); // clipped from 1.5
    assert!((sub.row(1)[0] - 0.5).abs() < 1e-6 && sub.row(1)[1] == 0.0); // the mean
    let text = std::fs::read_to_string(&out_path).unwrap();
    assert_eq!(text.lines().next().unwrap(), csv_header());
    assert_eq!(text.lines().count(), 4);

    // training labels with no rows: refused naming the file (it was "shape mismatch: training
    // labels: 0 values is not a positive multiple of 37")
    let empty = tmp.path().join("header-only.csv");
    gz_schema::write_solutions(&empty, &Solutions::new()).unwrap();
    let refused = tmp.path().join("refused.csv");
    let (ok, _, err) = support::run(
        support::gz()
            .args(["submit", "--fill-mean", "--pred"])
            .arg(&pred)
            .arg("--ids")
            .arg(&ids_dir)
            .arg("--train-labels")
            .arg(&empty)
            .arg("--out")
            .arg(&refused),
    );
    assert!(!ok && err.contains("header-only.csv: no rows"), "{err}");
    assert!(!refused.exists());

    // prediction options with --pred or --check would be ignored: refused, nothing written
    let other = tmp.path().join("other.csv");
    let (ok, _, err) = support::run(
        support::gz()
            .args(["submit", "--tta", "8", "--pred"])
            .arg(&pred)
            .arg("--ids")
            .arg(&ids_dir)
            .arg("--out")
            .arg(&other),
    );
    assert!(!ok && err.contains("--tta applies only with --run"), "{err}");
    assert!(!other.exists());
    let (ok, _, err) = support::run(
        support::gz()
            .args(["submit", "--device", "cuda", "--check"])
            .arg(&out_path),
    );
    assert!(!ok && err.contains("--device applies only with --run"), "{err}");

    // --fill-mean with nothing to fill reads no training labels (here there are none)
    let alone = tmp.path().join("alone");
    write_test_jpeg_names(&alone, &[5, 6, 7]);
    let full = tmp.path().join("full.csv");
    std::fs::write(
        &full,
        [csv_header(), row(5, "0.5"), row(6, "0.5"), row(7, "0.5")].join("\n"),
    )
    .unwrap();
    let (ok, out, err) = support::run(
        support::gz()
            .args(["submit", "--fill-mean", "--pred"])
            .arg(&full)
            .arg("--ids")
            .arg(&alone)
            .arg("--out")
            .arg(&other),
    );
    assert!(ok, "{out}\n{err}");
    assert!(other.exists());
}

fn last_line_value(stdout: &str, key: &str) -> PathBuf {
    let prefix = format!("{key}: ");
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in\n{stdout}"));
    PathBuf::from(line[prefix.len()..].trim())
}

/// `gz eval --pred PRED --cache CACHE --data DATA`.
fn eval_pred(pred: &Path, cache: &Path, data: &Path) -> std::process::Command {
    let mut c = support::gz();
    c.args(["eval", "--pred"])
        .arg(pred)
        .arg("--cache")
        .arg(cache)
        .arg("--data")
        .arg(data);
    c
}

fn gz_ok(args: &mut std::process::Command) -> String {
    let (ok, out, err) = support::run(args);
    assert!(ok, "command failed: {args:?}\nstdout:\n{out}\nstderr:\n{err}");
    out
}

/// The whole evaluation side on a tiny synthetic set: train one epoch of the tiny model, then
/// eval (table, report), predict from the cache and from raw JPEGs (with a corrupt one), submit,
/// and refuse a cache with other preprocessing.
#[test]
fn eval_predict_submit_end_to_end_on_tiny_synthetic_data() {
    let tmp = support::tempdir();
    let data = tmp.path().join("data");
    gz_ok(
        support::gz()
            .args(["synth", "--train", "48", "--test", "8", "--seed", "3", "--out"])
            .arg(&data),
    );
    let cache_root = tmp.path().join("cache");
    // `gz prep` of `data` at `size` px into the one cache root; the cache it wrote
    let prep = |data: &Path, size: &str| {
        let out = gz_ok(
            support::gz()
                .args(["prep", "--size", size, "--data"])
                .arg(data)
                .arg("--cache")
                .arg(&cache_root),
        );
        last_line_value(&out, "cache")
    };
    let cache = prep(&data, "32");
    let run = tmp.path().join("run");
    gz_ok(
        support::gz()
            .args([
                "train", "--model", "tiny", "--epochs", "2", "--device", "cpu", "--cache",
            ])
            .arg(&cache)
            .arg("--out")
            .arg(&run),
    );

    // eval: table with baselines and floor, metrics.json, report files
    let report = tmp.path().join("report");
    let out = gz_ok(
        support::gz()
            .args(["eval", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--data")
            .arg(&data)
            .arg("--report")
            .arg(&report),
    );
    for needle in [
        "all zeros",
        "all ones",
        "training mean",
        "central pixel",
        "Bayes floor",
        "run ",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    assert_eq!(last_line_value(&out, "report"), report.join("index.html"));
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("metrics.json")).unwrap()).unwrap();
    let rmse = metrics["model"]["scores"]["rmse"].as_f64().unwrap();
    assert!(rmse.is_finite() && rmse > 0.0 && rmse < 1.0, "{rmse}");
    assert_eq!(metrics["baselines"].as_array().unwrap().len(), 4);
    // the page's warnings are on the terminal too (too few rows here: a tiny set)
    let rows = metrics["model"]["scores"]["rows"].as_u64().unwrap();
    let (ok, _, err) = support::run(
        support::gz()
            .args(["eval", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--data")
            .arg(&data)
            .arg("--report")
            .arg(&report),
    );
    assert!(
        ok && err.contains(&format!("warning: only {rows} galax")) == (rows < 50),
        "{err}"
    );
    // how the checkpoint was trained, in metrics.json and on the page
    let trained = metrics["trained"].as_str().unwrap_or_default();
    assert!(
        trained.starts_with("tiny, sigmoid head, ") && trained.contains(" epoch"),
        "{metrics}"
    );
    // the fitted baselines name the rows they learnt from
    let n_fit = metrics["n_fit"].as_u64().unwrap();
    assert!(
        n_fit > 0
            && out.contains(&format!(
                "(training mean and central pixel fitted on {n_fit} training images)"
            )),
        "{out}"
    );
    for f in ["learning_curve.png", "per_question.png", "index.html"] {
        assert!(std::fs::metadata(report.join(f)).unwrap().len() > 1000, "{f}");
    }
    assert!(!report.join(".gz-eval.lock").exists(), "the report's lock is released");
    // a second gz eval into a report folder another one is writing (its lock held here, as the
    // first's process would) is refused before it scores, and leaves that report alone
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd as _;
        let held = std::fs::File::create(report.join(".gz-eval.lock")).unwrap();
        std::fs::write(report.join(".gz-eval.lock"), "4242\n").unwrap();
        // SAFETY: flock(2) on a descriptor this test owns
        assert_eq!(
            unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        let before = std::fs::read(report.join("index.html")).unwrap();
        let (ok, out2, err) = support::run(
            support::gz()
                .args(["eval", "--run"])
                .arg(&run)
                .arg("--cache")
                .arg(&cache)
                .arg("--report")
                .arg(&report),
        );
        assert!(!ok && out2.is_empty(), "{out2}");
        assert!(
            err.contains(&format!(
                "{} is in use: another gz eval (process 4242) is writing its report there",
                report.display()
            )),
            "{err}"
        );
        assert_eq!(std::fs::read(report.join("index.html")).unwrap(), before);
        drop(held);
        std::fs::remove_file(report.join(".gz-eval.lock")).unwrap();
    }
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    assert!(html.contains("gallery/") && html.contains("Q1 "), "gallery missing");
    // a report that fails part-way over an earlier one (a full disk; here per_question.png is
    // a folder) leaves no index.html: the earlier page, showing the earlier scores beside the
    // new metrics.json and charts with its gallery gone, is not taken for a whole report
    let eval_report = || {
        support::run(
            support::gz()
                .args(["eval", "--run"])
                .arg(&run)
                .arg("--cache")
                .arg(&cache)
                .arg("--data")
                .arg(&data)
                .arg("--report")
                .arg(&report),
        )
    };
    std::fs::remove_file(report.join("per_question.png")).unwrap();
    std::fs::create_dir(report.join("per_question.png")).unwrap();
    let (ok, _, err) = eval_report();
    assert!(!ok && err.contains("per_question.png"), "{err}");
    assert!(
        !report.join("index.html").exists(),
        "the earlier report's page stayed: {err}"
    );
    std::fs::remove_dir(report.join("per_question.png")).unwrap();
    let (ok, _, err) = eval_report();
    assert!(ok && report.join("index.html").exists(), "{err}");
    // --data naming another dataset: refused, not another set's floor
    let elsewhere = tmp.path().join("elsewhere");
    gz_ok(
        support::gz()
            .args(["synth", "--train", "4", "--test", "2", "--seed", "9", "--out"])
            .arg(&elsewhere),
    );
    let (ok, _, err) = support::run(
        support::gz()
            .args(["eval", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--data")
            .arg(&elsewhere)
            .arg("--report")
            .arg(tmp.path().join("report2")),
    );
    assert!(
        !ok && err.contains("is it the dataset the cache was built from?"),
        "{err}"
    );
    // --data naming no folder at all (a typo): refused by name, on either split. Before, the
    // validation score came without its floor and without a word, and `--split test` said
    // the folder "has no test_solutions.csv (a real Kaggle test set)"
    let typo = tmp.path().join("dta");
    for split in ["validation", "test"] {
        let (ok, out, err) = support::run(
            support::gz()
                .args(["eval", "--split", split, "--run"])
                .arg(&run)
                .arg("--cache")
                .arg(&cache)
                .arg("--data")
                .arg(&typo)
                .arg("--report")
                .arg(tmp.path().join("report3")),
        );
        assert!(
            !ok && err.contains(&format!("--data {}: no such folder", typo.display())),
            "{split}: {out}\n{err}"
        );
        assert!(!tmp.path().join("report3").exists(), "{split}: a report was written");
    }

    // predict from the cache, with 8-view TTA, then submit against the test folder
    let test_dir = data.join("images_test_rev1");
    let pred = tmp.path().join("pred.csv");
    gz_ok(
        support::gz()
            .args(["predict", "--tta", "8", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(&pred),
    );
    let p = gz_schema::read_solutions(&pred).unwrap();
    assert_eq!(p.len(), 8);
    // a run's default report folder (reports/<run name>) is told from that of another run of
    // the same name (it was replaced without a word), and replaced by the same run's
    let twin = tmp.path().join("elsewhere").join(run.file_name().unwrap());
    std::fs::create_dir_all(&twin).unwrap();
    for e in std::fs::read_dir(&run).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), twin.join(e.file_name())).unwrap();
        }
    }
    let by_default_run = |r: &Path| {
        support::run(
            support::gz()
                .current_dir(tmp.path())
                .args(["eval", "--run"])
                .arg(r)
                .arg("--cache")
                .arg(&cache),
        )
    };
    let (ok, out, err) = by_default_run(&run);
    assert!(ok, "{out}\n{err}");
    let (ok, _, err) = by_default_run(&twin);
    assert!(!ok && err.contains("it holds the report of checkpoint"), "{err}");
    let (ok, out, err) = by_default_run(&run);
    assert!(ok, "{out}\n{err}");
    // the same predictions scored from the file (`gz eval --pred`, as any tool's CSV would be):
    // the model's RMSE of the run scored here with the same views, on the same test rows
    let scored = |args: &[&str], pred: &Path, report: &str| {
        support::run(
            support::gz()
                .args(["eval"])
                .args(args)
                .arg(pred)
                .arg("--cache")
                .arg(&cache)
                .arg("--data")
                .arg(&data)
                .arg("--report")
                .arg(tmp.path().join(report)),
        )
    };
    let rmse_of = |report: &str| {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join(report).join("metrics.json")).unwrap())
                .unwrap();
        (m["model"]["scores"]["rmse"].as_f64().unwrap(), m)
    };
    let (ok, out, err) = scored(&["--split", "test", "--tta", "8", "--run"], &run, "by_run");
    assert!(ok, "{out}\n{err}");
    let (ok, out, err) = scored(&["--pred"], &pred, "by_file");
    assert!(ok && out.contains("pred — test split: 8 images"), "{out}\n{err}");
    // nothing but the report's own warnings (a tiny set, one epoch)
    assert!(
        err.lines()
            .all(|l| l.starts_with("warning: the model's RMSE") || l.starts_with("warning: only 8 galaxies")),
        "{err}"
    );
    let ((by_run, _), (by_file, m)) = (rmse_of("by_run"), rmse_of("by_file"));
    assert!((by_run - by_file).abs() < 1e-5, "{by_run} {by_file}");
    let absolute = pred.canonicalize().unwrap();
    assert_eq!(m["predictions"].as_str(), Some(absolute.to_str().unwrap()));
    let page = std::fs::read_to_string(tmp.path().join("by_file/index.html")).unwrap();
    assert!(page.contains("predictions <code>") && !page.contains("learning_curve.png"));
    // a file that is not a whole answer for these galaxies is refused, naming what is wrong
    let text = std::fs::read_to_string(&pred).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let bad = tmp.path().join("bad.csv");
    let refused = |content: String, needle: &str| {
        std::fs::write(&bad, content).unwrap();
        let (ok, out, err) = scored(&["--pred"], &bad, "by_bad");
        assert!(!ok && err.contains(needle), "{needle}: {out}\n{err}");
        assert!(!tmp.path().join("by_bad").exists());
    };
    refused(
        lines[..lines.len() - 1].join("\n"),
        "1 of the 8 galaxies scored (split test) has no row",
    );
    refused(format!("{text}{}\n", lines[1]), "has more than one row");
    let (id, rest) = lines[1].split_once(',').unwrap();
    let (_, rest) = rest.split_once(',').unwrap();
    refused(text.replace(lines[1], &format!("{id},nan,{rest}")), "Class1.1 is NaN");
    // a row for another galaxy is named and left out; the score stays
    std::fs::write(&bad, format!("{text}999999999{}\n", &lines[1][id.len()..])).unwrap();
    let (ok, out, err) = scored(&["--pred"], &bad, "by_more");
    assert!(
        ok && err.contains("1 row of") && err.contains("the cache does not hold: GalaxyID 999999999"),
        "{out}\n{err}"
    );
    assert!((rmse_of("by_more").0 - by_file).abs() < 1e-12);
    // every kind of problem at once, each counted; a number beyond f32 said as written
    let short = lines[..lines.len() - 1]
        .join("\n")
        .replace(lines[1], &format!("{id},nan,{rest}"));
    std::fs::write(&bad, format!("{short}\n{}\n", lines[2])).unwrap();
    let (ok, _, err) = scored(&["--pred"], &bad, "by_bad");
    assert!(
        !ok && err.contains("1 of the 8 galaxies scored (split test) has no row")
            && err.contains("1 galaxy has more than one row")
            && err.contains("1 of the scored rows has a value that is not a finite number"),
        "{err}"
    );
    refused(
        text.replace(lines[1], &format!("{id},1e200,{rest}")),
        "\"1e200\" is too large for a 32-bit float",
    );
    // the labels themselves score far below the floor: said
    let (ok, _, err) = scored(&["--pred"], &data.join("test_solutions.csv"), "by_labels");
    assert!(ok && err.contains("far below the Bayes floor"), "{err}");
    let (_, _, err) = scored(&["--pred"], &pred, "by_file");
    assert!(!err.contains("far below"), "{err}");
    // a report of a file over a run's report keeps no learning curve of the run's
    let (ok, _, err) = scored(&["--pred"], &pred, "by_run");
    assert!(ok && !tmp.path().join("by_run/learning_curve.png").exists(), "{err}");
    // the report never replaces what it reads, nor a user's numbered pictures, nor a user's
    // page in the default folder (reports/<name>)
    let inside = tmp.path().join("mine");
    std::fs::create_dir_all(inside.join("gallery")).unwrap();
    std::fs::copy(&pred, inside.join("gallery/123.png")).unwrap();
    let (ok, _, err) = scored(&["--pred"], &inside.join("gallery/123.png"), "mine");
    assert!(!ok && err.contains("it holds gallery but no earlier report"), "{err}");
    std::fs::copy(&pred, inside.join("metrics.json")).unwrap();
    std::fs::remove_dir_all(inside.join("gallery")).unwrap();
    let (ok, _, err) = scored(&["--pred"], &inside.join("metrics.json"), "mine");
    assert!(!ok && err.contains("is not a gz report's"), "{err}");
    std::fs::write(inside.join("index.html"), "per_question.png").unwrap();
    std::fs::write(inside.join("metrics.json"), r#"{"model": 1, "baselines": 2}"#).unwrap();
    std::fs::copy(&pred, inside.join("p.png")).unwrap();
    let (ok, _, err) = scored(&["--pred"], &inside.join("p.png"), "mine");
    assert!(!ok && err.contains("the report would replace"), "{err}");
    assert_eq!(
        std::fs::read(inside.join("p.png")).unwrap(),
        std::fs::read(&pred).unwrap()
    );
    let own = tmp.path().join("reports/pred");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::write(own.join("index.html"), "<p>mine</p>").unwrap();
    let (ok, _, err) = support::run(eval_pred(&pred, &cache, &data).current_dir(tmp.path()));
    assert!(
        !ok && err.contains("--report (by default) reports/pred: its index.html is not a gz report's"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(own.join("index.html")).unwrap(), "<p>mine</p>");
    // the default folder is named by the file's stem: a report of the same file is replaced,
    // one of another file of that name (another run's test_predictions.csv) is not
    std::fs::remove_file(own.join("index.html")).unwrap();
    let by_default = |file: &Path| support::run(eval_pred(file, &cache, &data).current_dir(tmp.path()));
    for _ in 0..2 {
        // (named relatively: the report records where it is, not how it was spelt)
        let (ok, out, err) = by_default(Path::new("pred.csv"));
        assert!(ok && out.contains("report: reports/pred/index.html"), "{out}\n{err}");
    }
    let twin = tmp.path().join("other/pred.csv");
    std::fs::create_dir_all(twin.parent().unwrap()).unwrap();
    std::fs::copy(&pred, &twin).unwrap();
    let (ok, _, err) = by_default(&twin);
    assert!(
        !ok && err.contains(&format!("it holds the report of predictions {}", absolute.display())),
        "{err}"
    );
    // the same file named from another folder is the same file (reports/ shared by a link)
    std::os::unix::fs::symlink(tmp.path().join("reports"), tmp.path().join("other/reports")).unwrap();
    let (ok, out, err) = support::run(
        support::gz()
            .current_dir(tmp.path().join("other"))
            .args(["eval", "--pred", "../pred.csv", "--cache"])
            .arg(&cache)
            .arg("--data")
            .arg(&data),
    );
    assert!(ok && out.contains("report: reports/pred/index.html"), "{out}\n{err}");
    // a killed report's half-written thumbnails go with the old ones
    let half = tmp.path().join("reports/pred/gallery/.123.png.77.tmp");
    std::fs::write(&half, "half").unwrap();
    // and so do the page's own (a chart, metrics.json), not a user's file of another name
    let half_chart = tmp.path().join("reports/pred/.spread.png.77.tmp");
    std::fs::write(&half_chart, "half").unwrap();
    let (ok, out, err) = by_default(&pred);
    assert!(ok && !half.exists() && !half_chart.exists(), "{out}\n{err}");
    // a page without its metrics.json cannot say what it scored: the default folder refuses
    std::fs::remove_file(tmp.path().join("reports/pred/metrics.json")).unwrap();
    let (ok, _, err) = by_default(&pred);
    assert!(!ok && err.contains("without its metrics.json"), "{err}");
    // options only a model predicting here reads, and the hold-out a file cannot name
    let (ok, _, err) = scored(&["--tta", "8", "--pred"], &pred, "by_bad");
    assert!(!ok && err.contains("--tta applies only to a model"), "{err}");
    let (ok, _, err) = scored(&["--split", "validation", "--pred"], &pred, "by_bad");
    assert!(!ok && err.contains("--pred with --split validation"), "{err}");
    let (ok, _, err) = scored(&["--pred"], Path::new("-"), "by_bad");
    assert!(!ok && err.contains("standard input is not read here"), "{err}");
    // with the spread of the 8 views: the same predictions to the byte, and beside them one
    // standard deviation per answer, for the same galaxies
    let pred_s = tmp.path().join("pred_spread.csv");
    let spread = tmp.path().join("out/spread.csv");
    let out = gz_ok(
        support::gz()
            .args(["predict", "--tta", "8", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(&pred_s)
            .arg("--spread")
            .arg(&spread),
    );
    assert_eq!(last_line_value(&out, "spread"), spread);
    assert_eq!(std::fs::read(&pred_s).unwrap(), std::fs::read(&pred).unwrap());
    let sd = gz_schema::read_solutions(&spread).unwrap();
    assert_eq!(sd.ids, p.ids);
    assert!(sd.values.iter().all(|v| v.is_finite() && *v >= 0.0), "{:?}", sd.values);
    // the views of an untrained-looking image differ somewhere; none strays past the range
    assert!(sd.values.iter().any(|v| *v > 1e-5) && sd.values.iter().all(|v| *v < 1.0));
    // legal cells, but no vote fractions: a submission made of it is warned about; the
    // predictions are not
    let (_, _, err) = support::run(support::gz().args(["submit", "--check"]).arg(&spread));
    assert!(
        err.contains("warning:") && err.contains("do not look like vote fractions"),
        "{err}"
    );
    let (ok, _, err) = support::run(support::gz().args(["submit", "--check"]).arg(&pred_s));
    assert!(ok && !err.contains("warning:"), "{err}");
    let (_, _, err) = support::run(
        support::gz()
            .args(["submit", "--pred"])
            .arg(&spread)
            .arg("--out")
            .arg(tmp.path().join("spread_sub.csv")),
    );
    assert!(err.contains("do not look like vote fractions"), "{err}");
    // one view of one checkpoint has nothing to spread: refused before any file is written
    let (ok, _, err) = support::run(
        support::gz()
            .args(["predict", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(tmp.path().join("none.csv"))
            .arg("--spread")
            .arg(tmp.path().join("none_spread.csv")),
    );
    assert!(!ok && err.contains("--spread needs more than one prediction"), "{err}");
    assert!(!tmp.path().join("none.csv").exists());
    // the same checkpoint twice agrees with itself: no spread
    let (ok, out, err) = support::run(
        support::gz()
            .args(["predict", "--out", "-", "--spread"])
            .arg(tmp.path().join("twice_spread.csv"))
            .arg("--run")
            .arg(&run)
            .arg("--run")
            .arg(&run)
            .arg("--cache")
            .arg(&cache),
    );
    assert!(ok && err.contains("spread: "), "{err}");
    assert!(
        err.contains("warning: --run 2 is checkpoint 1 again") && err.contains("counts twice"),
        "{err}"
    );
    assert_eq!(
        gz_schema::read_solutions_from(out.as_bytes(), Path::new("stdout"))
            .unwrap()
            .len(),
        8
    );
    let twice = gz_schema::read_solutions(&tmp.path().join("twice_spread.csv")).unwrap();
    assert!(twice.values.iter().all(|v| *v < 1e-6), "{:?}", twice.values);
    // gz eval with views says how their spread ranks the errors (and not without: above)
    assert!(metrics.get("spread").is_none());
    let report_tta = tmp.path().join("report_tta");
    let out = gz_ok(
        support::gz()
            .args(["eval", "--tta", "2", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--report")
            .arg(&report_tta),
    );
    assert!(out.contains("spread of the 2 TTA views per galaxy: mean "), "{out}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report_tta.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["spread"]["views"], 2);
    assert!(std::fs::metadata(report_tta.join("spread.png")).unwrap().len() > 1000);
    assert!(
        !report.join("spread.png").exists(),
        "a report without the spread has no chart"
    );
    let (most, least) = (
        m["spread"]["rmse_most"].as_f64().unwrap(),
        m["spread"]["rmse_least"].as_f64().unwrap(),
    );
    assert!(most.is_finite() && least.is_finite() && most > 0.0, "{m}");
    // a --max-train run: its hold-out is named as a share of its subset (it read as 10% of the
    // whole split), and its 2 galaxies are too few for the spread, which is said, not dropped
    let run_few = tmp.path().join("run_few");
    gz_ok(
        support::gz()
            .args([
                "train",
                "--model",
                "tiny",
                "--epochs",
                "1",
                "--max-train",
                "20",
                "--cache",
            ])
            .arg(&cache)
            .arg("--out")
            .arg(&run_few),
    );
    let report_few = tmp.path().join("report_few");
    let out = gz_ok(
        support::gz()
            .args(["eval", "--tta", "2", "--run"])
            .arg(&run_few)
            .arg("--cache")
            .arg(&cache)
            .arg("--report")
            .arg(&report_few),
    );
    assert!(
        out.contains(
            "validation hold-out of a 20-image --max-train subset of the training split (10%, seed 0): 2 images"
        ),
        "{out}"
    );
    assert!(
        out.contains("spread of the 2 TTA views per galaxy: not scored on 2 galaxies"),
        "{out}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report_few.join("metrics.json")).unwrap()).unwrap();
    assert!(m.get("spread").is_none_or(|s| s.is_null()), "{m}");
    // a run that asked for more epochs than it trained (as a killed one): the warning reads
    // like gz's others ("warning: …", not a log line's " WARN …")
    let config = run_few.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("\"epochs\": 1,"), "{text}");
    std::fs::write(&config, text.replace("\"epochs\": 1,", "\"epochs\": 5,")).unwrap();
    let (ok, out, err) = support::run(
        support::gz()
            .args(["eval", "--run"])
            .arg(&run_few)
            .arg("--cache")
            .arg(&cache)
            .arg("--report")
            .arg(tmp.path().join("report_few2")),
    );
    assert!(
        ok && err.contains("warning: ") && err.contains("stopped after epoch 1 of 5") && !err.contains("WARN"),
        "{out}\n{err}"
    );
    let sub = tmp.path().join("submission.csv");
    let out = gz_ok(
        support::gz()
            .args(["submit", "--pred"])
            .arg(&pred)
            .arg("--ids")
            .arg(&test_dir)
            .arg("--out")
            .arg(&sub),
    );
    assert_eq!(last_line_value(&out, "submission"), sub);
    gz_ok(
        support::gz()
            .args(["submit", "--check"])
            .arg(&sub)
            .arg("--ids")
            .arg(&test_dir),
    );

    // predict straight from JPEGs matches the cache (same preprocessing, no TTA)
    let pred_c = tmp.path().join("pred_cache.csv");
    let pred_j = tmp.path().join("pred_jpeg.csv");
    gz_ok(
        support::gz()
            .args(["predict", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(&pred_c),
    );
    gz_ok(
        support::gz()
            .args(["predict", "--run"])
            .arg(&run)
            .arg("--images")
            .arg(&test_dir)
            .arg("--out")
            .arg(&pred_j),
    );
    let (a, b) = (
        gz_schema::read_solutions(&pred_c).unwrap(),
        gz_schema::read_solutions(&pred_j).unwrap(),
    );
    let bi = b.index();
    for i in 0..a.len() {
        let j = bi[&a.ids[i]];
        for k in 0..N_ANSWERS {
            assert!((a.row(i)[k] - b.row(j)[k]).abs() < 2e-3, "id {} col {k}", a.ids[i]);
        }
    }

    // one image named by itself, the CSV on standard output: the same row as from its folder
    let one_id = b.ids[0];
    let (ok, out, err) = support::run(
        support::gz()
            .args(["predict", "--out", "-", "--run"])
            .arg(&run)
            .arg("--images")
            .arg(test_dir.join(format!("{one_id}.jpg"))),
    );
    assert!(ok && err.contains("1 row ("), "{out}\n{err}");
    let single = gz_schema::read_solutions_from(out.as_bytes(), Path::new("stdout")).unwrap();
    assert_eq!(single.ids, vec![one_id]);
    assert_eq!(single.row(0), b.row(0));
    // with standard output closed: refused before predicting (it printed its summary, wrote
    // nothing and exited 0)
    let gz = support::gz().get_program().to_owned();
    let (ok, out, err) = support::run(
        std::process::Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" >&-")
            .arg(&gz)
            .args(["predict", "--out", "-", "--run"])
            .arg(&run)
            .arg("--images")
            .arg(test_dir.join(format!("{one_id}.jpg"))),
    );
    assert!(
        !ok && err.contains("--out -: standard output is closed"),
        "{out}\n{err}"
    );

    // per-question fractions: each reached question sums to 1 and is the Kaggle answers'
    // share of their sum; such a file is refused as a submission
    let pred_q = tmp.path().join("pred_conditional.csv");
    let out = gz_ok(
        support::gz()
            .args(["predict", "--conditional", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(&pred_q),
    );
    assert!(out.contains("per-question fractions"), "{out}");
    let text = std::fs::read_to_string(&pred_q).unwrap();
    let mut n = 0;
    for (line, i) in text.lines().skip(1).zip(0..) {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells[0].parse::<u64>().unwrap(), a.ids[i]);
        let kaggle: Vec<f32> = a.row(i).iter().map(|v| v.clamp(0.0, 1.0)).collect();
        for q in &gz_schema::QUESTIONS {
            let got: Vec<Option<f32>> = q.answers().map(|k| cells[k + 1].parse::<f32>().ok()).collect();
            let reached: f32 = q.answers().map(|k| kaggle[k]).sum();
            if got.iter().all(Option::is_some) {
                let sum: f32 = got.iter().flatten().sum();
                assert!((sum - 1.0).abs() < 1e-4, "{line}");
                for (g, k) in got.iter().zip(q.answers()) {
                    assert!((g.unwrap() - kaggle[k] / reached).abs() < 1e-4, "{line}");
                }
                n += 1;
            } else {
                assert!(got.iter().all(Option::is_none) && reached < 0.0101, "{line}");
            }
        }
    }
    assert!(n > 0);
    // their spread over 8 views: empty exactly where the fractions are (too few reach the
    // question), a deviation in [0, 1] elsewhere
    let pred_q8 = tmp.path().join("pred_conditional8.csv");
    let spread_q8 = tmp.path().join("spread_conditional8.csv");
    gz_ok(
        support::gz()
            .args(["predict", "--conditional", "--tta", "8", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(&pred_q8)
            .arg("--spread")
            .arg(&spread_q8),
    );
    let (fractions, spreads) = (
        std::fs::read_to_string(&pred_q8).unwrap(),
        std::fs::read_to_string(&spread_q8).unwrap(),
    );
    assert_eq!(fractions.lines().count(), spreads.lines().count());
    let mut some = 0;
    for (f, sp) in fractions.lines().zip(spreads.lines()).skip(1) {
        let (f, sp): (Vec<&str>, Vec<&str>) = (f.split(',').collect(), sp.split(',').collect());
        assert_eq!(f[0], sp[0]);
        for (a, b) in f[1..].iter().zip(&sp[1..]) {
            assert_eq!(a.is_empty(), b.is_empty(), "{f:?}\n{sp:?}");
            if !b.is_empty() {
                let v: f32 = b.parse().unwrap();
                assert!((0.0..=1.0).contains(&v), "{v}");
                some += (v > 0.0) as usize;
            }
        }
    }
    assert!(some > 0);
    let (ok, _out, err) = support::run(
        support::gz()
            .args(["submit", "--pred"])
            .arg(&pred_q)
            .arg("--out")
            .arg(tmp.path().join("q_sub.csv")),
    );
    assert!(!ok && err.contains("--conditional"), "{err}");

    // an ensemble of the same checkpoint twice is that checkpoint
    let pred_e = tmp.path().join("pred_ens.csv");
    gz_ok(
        support::gz()
            .args(["predict", "--run"])
            .arg(&run)
            .arg("--run")
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(&pred_e),
    );
    let e = gz_schema::read_solutions(&pred_e).unwrap();
    assert_eq!(e.ids, a.ids);
    for (x, y) in e.values.iter().zip(&a.values) {
        assert!((x - y).abs() < 1e-5);
    }

    // a corrupt test JPEG: refused without --fill-mean, filled and listed with it
    let broken = tmp.path().join("broken_test");
    std::fs::create_dir_all(&broken).unwrap();
    for e in std::fs::read_dir(&test_dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
    }
    std::fs::write(broken.join("999999.jpg"), b"\xff\xd8 truncated").unwrap();
    let sub2 = tmp.path().join("sub2.csv");
    let (ok, _out, err) = support::run(
        support::gz()
            .args(["submit", "--run"])
            .arg(&run)
            .arg("--images")
            .arg(&broken)
            .arg("--out")
            .arg(&sub2),
    );
    assert!(!ok && err.contains("999999.jpg") && !sub2.exists(), "{err}");
    // (the folder may hold the user's own cutouts: "image", in the singular for one)
    assert!(
        err.contains("unreadable image ") && err.contains("1 image could not be predicted") && err.contains("its row"),
        "{err}"
    );
    let (ok, out, err) = support::run(
        support::gz()
            .args(["submit", "--fill-mean", "--run"])
            .arg(&run)
            .arg("--images")
            .arg(&broken)
            .arg("--out")
            .arg(&sub2),
    );
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("filled with the training mean: 999999"), "{err}");
    assert_eq!(gz_schema::read_solutions(&sub2).unwrap().len(), 9);
    // the same folder as a test-only dataset's, through a cache: prep skips the corrupt image,
    // and submit --cache without --ids takes the test ids from the cache, the skipped one
    // included (it wrote a short submission that passed for complete)
    let test_only = tmp.path().join("test_only");
    std::fs::create_dir_all(&test_only).unwrap();
    std::fs::rename(&broken, test_only.join("images_test_rev1")).unwrap();
    let (_, out, err) = support::run(
        support::gz()
            .args(["prep", "--size", "32", "--data"])
            .arg(&test_only)
            .arg("--cache")
            .arg(&cache_root),
    );
    assert!(out.contains("skipped: ") && out.contains("999999.jpg"), "{out}\n{err}");
    let broken_cache = last_line_value(&out, "cache");
    let sub3 = tmp.path().join("sub3.csv");
    let submit_cache = |fill: bool| {
        let mut cmd = support::gz();
        cmd.args(["submit", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&broken_cache);
        if fill {
            cmd.arg("--fill-mean");
        }
        support::run(cmd.arg("--out").arg(&sub3))
    };
    let (ok, out, err) = submit_cache(false);
    assert!(!ok && !sub3.exists(), "{out}\n{err}");
    assert!(
        err.contains("skipped the test image images_test_rev1/999999.jpg") && err.contains("needs --fill-mean"),
        "{err}"
    );
    assert!(!err.contains("predicting with"), "refused before predicting: {err}");
    let (ok, out, err) = submit_cache(true);
    assert!(
        ok && err.contains("filled with the training mean: 999999"),
        "{out}\n{err}"
    );
    assert!(!err.contains("no --ids folder"), "{err}");
    assert_eq!(gz_schema::read_solutions(&sub3).unwrap().len(), 9);
    // and so does predict --cache: the skipped image named, refused before predicting, or
    // filled with --fill-mean (it left the row out without a word)
    let pred3 = tmp.path().join("pred3.csv");
    let predict_cache = |fill: bool| {
        let mut cmd = support::gz();
        cmd.args(["predict", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&broken_cache);
        if fill {
            cmd.arg("--fill-mean");
        }
        support::run(cmd.arg("--out").arg(&pred3))
    };
    let (ok, out, err) = predict_cache(false);
    assert!(!ok && !pred3.exists(), "{out}\n{err}");
    assert!(
        err.contains("skipped the test image images_test_rev1/999999.jpg")
            && err.contains("1 of the cache's test images could not be read")
            && !err.contains("predicting with"),
        "{err}"
    );
    let (ok, out, err) = predict_cache(true);
    assert!(
        ok && err.contains("filled with the training mean: 999999"),
        "{out}\n{err}"
    );
    let p3 = gz_schema::read_solutions(&pred3).unwrap();
    assert_eq!(p3.len(), 9);
    assert!(p3.ids.contains(&999999));

    // a cache with other preprocessing is refused, naming both hashes
    let other = prep(&data, "24");
    let (ok, _out, err) = support::run(
        support::gz()
            .args(["predict", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&other)
            .arg("--out")
            .arg(tmp.path().join("x.csv")),
    );
    assert!(!ok, "a mismatched cache must be refused");
    let h_model = cache
        .file_name()
        .unwrap()
        .to_string_lossy()
        .rsplit('-')
        .next()
        .unwrap()
        .to_string();
    let h_other = other
        .file_name()
        .unwrap()
        .to_string_lossy()
        .rsplit('-')
        .next()
        .unwrap()
        .to_string();
    assert!(
        err.contains("trained on preprocessing") && err.contains(&h_other),
        "{err}"
    );
    let _ = h_model;

    // an ensemble of checkpoints that take different inputs (32 and 24 px): one cache cannot
    // feed it, JPEGs can (each member's own preprocessing, the uniform average of the members)
    let run24 = tmp.path().join("run24");
    gz_ok(
        support::gz()
            .args([
                "train", "--model", "tiny", "--epochs", "1", "--device", "cpu", "--cache",
            ])
            .arg(&other)
            .arg("--out")
            .arg(&run24),
    );
    let (ok, _out, err) = support::run(
        support::gz()
            .args(["predict", "--run"])
            .arg(&run)
            .arg("--run")
            .arg(&run24)
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(tmp.path().join("x.csv")),
    );
    assert!(!ok && err.contains("gz predict --images DIR"), "{err}");
    let pred_24 = tmp.path().join("pred_24.csv");
    let pred_mix = tmp.path().join("pred_mix.csv");
    gz_ok(
        support::gz()
            .args(["predict", "--run"])
            .arg(&run24)
            .arg("--images")
            .arg(&test_dir)
            .arg("--out")
            .arg(&pred_24),
    );
    let (ok, out, err) = support::run(
        support::gz()
            .args(["predict", "--run"])
            .arg(&run)
            .arg("--run")
            .arg(&run24)
            .arg("--run")
            .arg(&run)
            .arg("--images")
            .arg(&test_dir)
            .arg("--out")
            .arg(&pred_mix)
            .arg("--spread")
            .arg(tmp.path().join("spread_mix.csv")),
    );
    assert!(ok && out.contains("8 rows"), "{out}\n{err}");
    // the same images prepared at two sizes are the same training data (the note said
    // "trained on different images": the caches' fingerprints cover the pixels)
    assert!(!err.contains("different images"), "{err}");
    // the per-question spread pooled over the two inputs' groups too (it was refused)
    gz_ok(
        support::gz()
            .args(["predict", "--conditional", "--run"])
            .arg(&run)
            .arg("--run")
            .arg(&run24)
            .arg("--run")
            .arg(&run)
            .arg("--images")
            .arg(&test_dir)
            .arg("--out")
            .arg(tmp.path().join("q_mix.csv"))
            .arg("--spread")
            .arg(tmp.path().join("q_mix_spread.csv")),
    );
    let spread_mix = gz_schema::read_solutions(&tmp.path().join("spread_mix.csv")).unwrap();
    let (one, two, mix) = (
        gz_schema::read_solutions(&pred_j).unwrap(),
        gz_schema::read_solutions(&pred_24).unwrap(),
        gz_schema::read_solutions(&pred_mix).unwrap(),
    );
    assert_eq!(mix.ids, one.ids);
    assert_eq!(mix.ids, two.ids);
    for ((m, a), b) in mix.values.iter().zip(&one.values).zip(&two.values) {
        // three members, the 32-px one twice
        assert!((m - (2.0 * a + b) / 3.0).abs() < 1e-5, "{m} vs {a}, {b}");
    }
    // their spread, pooled over the two inputs' groups: a, a and b around (2a + b) / 3 deviate
    // by sqrt(2)/3 · |b − a|
    assert_eq!(spread_mix.ids, mix.ids);
    for ((sd, a), b) in spread_mix.values.iter().zip(&one.values).zip(&two.values) {
        let want = 2f32.sqrt() / 3.0 * (b - a).abs();
        assert!((sd - want).abs() < 1e-4, "{sd} vs {want}");
    }
    // per question: the fractions of a, a and b around those of (2a + b) / 3, over the members
    // that reach the question; empty where the ensemble's fractions are (or none reaches)
    let q_spread = std::fs::read_to_string(tmp.path().join("q_mix_spread.csv")).unwrap();
    let mut reached = 0;
    for (i, line) in q_spread.lines().skip(1).enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells[0], mix.ids[i].to_string());
        let centre = gz_schema::conditional(mix.row(i));
        let (fa, fb) = (gz_schema::conditional(one.row(i)), gz_schema::conditional(two.row(i)));
        for (k, cell) in cells[1..].iter().enumerate() {
            let members: Vec<f32> = [fa[k], fa[k], fb[k]].into_iter().flatten().collect();
            let want = centre[k]
                .filter(|_| !members.is_empty())
                .map(|c| (members.iter().map(|f| (f - c).powi(2)).sum::<f32>() / members.len() as f32).sqrt());
            match want {
                None => assert!(cell.is_empty(), "row {i} answer {k}: {cell:?}"),
                Some(w) => {
                    let got: f32 = cell.parse().unwrap();
                    assert!((got - w).abs() < 1e-4, "row {i} answer {k}: {got} vs {w}");
                    reached += 1;
                }
            }
        }
    }
    assert!(reached > 8 * 3, "{reached} cells");

    // images not named for a galaxy (an astronomer's own cutouts): rows named by file, the
    // same values as the same JPEGs under their GalaxyIDs; a submission refuses them
    let own = tmp.path().join("own");
    std::fs::create_dir_all(&own).unwrap();
    let names = ["NGC 1300.jpg", "a,\"b\".jpeg", "77.jpg"];
    for (name, id) in names.iter().zip(&mix.ids) {
        std::fs::copy(test_dir.join(format!("{id}.jpg")), own.join(name)).unwrap();
    }
    let pred_own = tmp.path().join("pred_own.csv");
    let (ok, out, err) = support::run(
        support::gz()
            .args(["predict", "--run"])
            .arg(&run)
            .arg("--run")
            .arg(&run24)
            .arg("--run")
            .arg(&run)
            .arg("--images")
            .arg(&own)
            .arg("--out")
            .arg(&pred_own),
    );
    assert!(
        ok && out.contains("3 rows") && err.contains("named by file"),
        "{out}\n{err}"
    );
    let text = std::fs::read_to_string(&pred_own).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("file,Class1.1,"), "{text}");
    // file-name order: "77.jpg", "NGC 1300.jpg", "a,\"b\".jpeg"
    let expect = [(2, "77.jpg"), (0, "NGC 1300.jpg"), (1, "\"a,\"\"b\"\".jpeg\"")];
    assert_eq!(lines.len(), 4, "{text}");
    for (line, (k, quoted)) in lines[1..].iter().zip(expect) {
        let values = line
            .strip_prefix(quoted)
            .unwrap_or_else(|| panic!("{line} does not start with {quoted}"));
        let v: Vec<f32> = values.split(',').skip(1).map(|x| x.parse().unwrap()).collect();
        assert_eq!(v.len(), N_ANSWERS);
        for (x, m) in v.iter().zip(mix.row(k)) {
            assert!((x - m).abs() < 1e-5, "{line}");
        }
    }
    let (ok, _out, err) = support::run(
        support::gz()
            .args(["submit", "--run"])
            .arg(&run)
            .arg("--images")
            .arg(&own)
            .arg("--out")
            .arg(tmp.path().join("own_sub.csv")),
    );
    // the folder came from --images (no --ids): the error says so, and points to gz predict
    assert!(
        !ok && err.contains("not named <GalaxyID>.jpg")
            && err.contains("test ids (--images)")
            && err.contains("gz predict --images"),
        "{err}"
    );

    // the same preprocessing of other training data (two galaxies' labels swapped): scoring the
    // run's validation hold-out there is refused, naming the training split's fingerprint
    let data2 = tmp.path().join("data2");
    for sub in ["images_training_rev1", "images_test_rev1"] {
        std::fs::create_dir_all(data2.join(sub)).unwrap();
        for e in std::fs::read_dir(data.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), data2.join(sub).join(e.file_name())).unwrap();
        }
    }
    let mut sol = gz_schema::read_solutions(&data.join("training_solutions_rev1.csv")).unwrap();
    // two galaxies' votes swapped: every row stays a valid set of vote fractions
    let n = N_ANSWERS;
    let (a, b) = sol.values.split_at_mut(n);
    a.swap_with_slice(&mut b[..n]);
    gz_schema::write_solutions(&data2.join("training_solutions_rev1.csv"), &sol).unwrap();
    let relabelled = prep(&data2, "32");
    assert_ne!(relabelled, cache);
    let (ok, _out, err) = support::run(
        support::gz()
            .args(["eval", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&relabelled)
            .arg("--report")
            .arg(tmp.path().join("report2")),
    );
    assert!(!ok && err.contains("fingerprint") && err.contains("hold-out"), "{err}");
    // a run trained there and the run trained on the original labels, as one ensemble: noted
    let run_relabelled = tmp.path().join("run_relabelled");
    gz_ok(
        support::gz()
            .args([
                "train", "--model", "tiny", "--epochs", "1", "--device", "cpu", "--cache",
            ])
            .arg(&relabelled)
            .arg("--out")
            .arg(&run_relabelled),
    );
    let (ok, out, err) = support::run(
        support::gz()
            .args(["predict", "--run"])
            .arg(&run)
            .arg("--run")
            .arg(&run_relabelled)
            .arg("--images")
            .arg(&test_dir)
            .arg("--out")
            .arg(tmp.path().join("pred_two_sets.csv")),
    );
    assert!(ok && err.contains("trained on different images"), "{out}\n{err}");

    // a flipped bit in a test image of the cache: predict refuses it, naming the shard
    let shard = cache.join("test-00000.shard");
    let mut bytes = std::fs::read(&shard).unwrap();
    let k = bytes.len() - 10;
    bytes[k] ^= 0x04;
    std::fs::write(&shard, &bytes).unwrap();
    let (ok, _out, err) = support::run(
        support::gz()
            .args(["predict", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(tmp.path().join("flipped.csv")),
    );
    assert!(
        !ok && err.contains("test-00000.shard") && err.contains("checksum"),
        "{err}"
    );
}

/// A cache without a test split (its dataset had no `images_test_rev1/`) is explained by
/// `gz predict` and `gz submit`; a run folder holding only `last.*` names the file to pass,
/// and that form predicts; greyscale JPEGs given to `gz predict --images` are warned of once.
#[test]
fn a_missing_test_folder_a_missing_best_checkpoint_and_greyscale_images_are_explained() {
    let tmp = support::tempdir();
    let mini = support::fixtures().join("kaggle-mini");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("images_training_rev1")).unwrap();
    for e in std::fs::read_dir(mini.join("images_training_rev1")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), data.join("images_training_rev1").join(e.file_name())).unwrap();
    }
    std::fs::copy(
        mini.join("training_solutions_rev1.csv"),
        data.join("training_solutions_rev1.csv"),
    )
    .unwrap();
    let (cache, run) = tiny_run(&data, tmp.path());
    for cmd in ["predict", "submit"] {
        let (ok, out, err) = support::run(
            support::gz()
                .args([cmd, "--run"])
                .arg(&run)
                .arg("--cache")
                .arg(&cache)
                .arg("--out")
                .arg(tmp.path().join("out.csv")),
        );
        assert!(!ok, "{cmd}: {out}");
        assert!(
            err.contains("has no test split: its dataset had no images_test_rev1/ folder when it was prepared"),
            "{cmd}: {err}"
        );
    }

    // only last.*: the message names it, and that path is taken
    for f in ["best.safetensors", "best.json"] {
        std::fs::remove_file(run.join(f)).unwrap();
    }
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for e in std::fs::read_dir(mini.join("images_test_rev1")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), images.join(e.file_name())).unwrap();
    }
    std::fs::write(images.join("242195.jpg"), crate::prep::greyscale_jpeg()).unwrap();
    // and a 40×30 px cutout: its central half, 20×15 px, is enlarged to the 32-px input
    let pixels: Vec<u8> = (0..40 * 30 * 3).map(|i| (i * 7 % 256) as u8).collect();
    let mut small = Vec::new();
    jpeg_encoder::Encoder::new(&mut small, 90)
        .encode(&pixels, 40, 30, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    std::fs::write(images.join("242196.jpg"), small).unwrap();
    let predict = |run: &Path| {
        support::run(
            support::gz()
                .args(["predict", "--run"])
                .arg(run)
                .arg("--images")
                .arg(&images)
                .arg("--out")
                .arg(tmp.path().join("pred.csv")),
        )
    };
    let (ok, out, err) = predict(&run);
    assert!(!ok, "{out}");
    let last = run.join("last.safetensors");
    assert!(
        err.contains("no best.safetensors here") && err.contains(&format!("pass --run {}", last.display())),
        "{err}"
    );
    let (ok, out, err) = predict(&last);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("4 rows"), "{out}");
    assert_eq!(err.matches("greyscale").count(), 1, "{err}");
    assert!(
        err.contains("warning: 1 image is a greyscale JPEG (one channel)"),
        "{err}"
    );
    // (the 424-px Kaggle images are not)
    assert!(
        err.contains(
            "warning: 1 image is so small that its central crop is enlarged to the model's 32×32 px input (40×30 \
             px, cropped to 20×15 px)"
        ),
        "{err}"
    );
}

/// A cache with no training images (`gz synth --train 0`) is refused by `gz eval` with what it
/// needs them for (it failed with "training labels: 0 values is not a positive multiple of 37",
/// and with `--run` while re-deriving the hold-out).
#[test]
fn eval_names_a_cache_without_training_images() {
    let tmp = support::tempdir();
    let data = tmp.path().join("d0");
    let (ok, out, err) = support::run(
        support::gz()
            .args(["synth", "--train", "0", "--test", "3", "--seed", "1", "--out"])
            .arg(&data),
    );
    assert!(ok, "{out}\n{err}");
    let (ok, out, err) = support::run(
        support::gz()
            .args(["prep", "--size", "16", "--data"])
            .arg(&data)
            .arg("--cache")
            .arg(tmp.path().join("c")),
    );
    assert!(ok, "{out}\n{err}");
    let cache = last_line_value(&out, "cache");
    let mut text = csv_header();
    for e in std::fs::read_dir(data.join("images_test_rev1")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let id = name.strip_suffix(".jpg").unwrap();
        text.push_str(&format!("\n{id}{}", ",0.1".repeat(N_ANSWERS)));
    }
    let pred = tmp.path().join("p.csv");
    std::fs::write(&pred, text + "\n").unwrap();
    let (ok, out, err) = support::run(&mut eval_pred(&pred, &cache, &data));
    assert!(
        !ok && err.contains("has no training images: gz eval fits its baselines"),
        "{out}\n{err}"
    );
}

/// `data` prepared at 32 px into `dir/cache` and `tiny` trained on it for one epoch into
/// `dir/run`: (the cache, the run).
fn tiny_run(data: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let out = gz_ok(
        support::gz()
            .args(["prep", "--size", "32", "--data"])
            .arg(data)
            .arg("--cache")
            .arg(dir.join("cache")),
    );
    let cache = last_line_value(&out, "cache");
    let run = dir.join("run");
    gz_ok(
        support::gz()
            .args(["train", "--model", "tiny", "--epochs", "1", "--cache"])
            .arg(&cache)
            .arg("--out")
            .arg(&run),
    );
    (cache, run)
}

/// CRC-32 (IEEE), bit by bit: what a sidecar's `weights_crc32` holds.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A checkpoint whose weights are finite but make the network overflow (its first dense
/// layer's weights 3e38, the checksum mended): `gz eval --run` refuses it by name, as `--pred` refuses such
/// predictions. It printed "RMSE NaN", exit status 0, and advised more epochs.
#[test]
fn eval_refuses_a_checkpoint_whose_outputs_overflow() {
    let tmp = support::tempdir();
    let mini = support::fixtures().join("kaggle-mini");
    let (cache, run) = tiny_run(&mini, tmp.path());
    // the sound checkpoint is scored
    gz_ok(
        support::gz()
            .args(["eval", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--report")
            .arg(tmp.path().join("r1")),
    );
    let w = run.join("best.safetensors");
    let mut b = std::fs::read(&w).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let mut f32s = 0;
    for (name, t) in header.as_object().unwrap() {
        if name != "fc1.weight" || t["dtype"] != "F32" {
            continue;
        }
        let (lo, hi) = (
            t["data_offsets"][0].as_u64().unwrap() as usize,
            t["data_offsets"][1].as_u64().unwrap() as usize,
        );
        for v in b[8 + n + lo..8 + n + hi].chunks_exact_mut(4) {
            v.copy_from_slice(&3e38f32.to_le_bytes());
        }
        f32s += 1;
    }
    assert_eq!(f32s, 1, "{header}");
    std::fs::write(&w, &b).unwrap();
    let side = run.join("best.json");
    let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(&side).unwrap()).unwrap();
    j["weights_crc32"] = crc32(&b).into();
    std::fs::write(&side, serde_json::to_vec_pretty(&j).unwrap()).unwrap();
    let report = tmp.path().join("r2");
    let (ok, out, err) = support::run(
        support::gz()
            .args(["eval", "--run"])
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .arg("--report")
            .arg(&report),
    );
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("predicts NaN or infinite values for 1 of the 1 galaxies scored"),
        "{err}"
    );
    assert!(!report.join("index.html").exists());
    b.clear();
}
