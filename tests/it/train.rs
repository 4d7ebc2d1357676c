//! Integration tests of `gz train` and `gz bench-train`: a real shard cache on disk (written
//! with gz-shards' writer from gz-model's toy set), the CLI end to end, the run directory
//! contract (`metrics.jsonl` fields, checkpoints, sidecars) and the learning test: a short CPU
//! run of `tiny` must clearly beat predicting the training mean.

use std::path::{Path, PathBuf};

use crate::support;

/// Writes a labelled toy cache of `n` images of side `size` and returns its directory.
fn toy_cache(root: &Path, n: usize, size: usize, seed: u64) -> PathBuf {
    use gz_model::data::ImageSource;
    let src = gz_model::data::toy_source(n, size, seed);
    let labels = src.labels().unwrap();
    let dir = root.join(format!("toy-{n}-{size}-{seed}"));
    let cfg = serde_json::json!({"toy": true, "size": size, "crop": 212});
    let mut w = gz_shards::CacheWriter::create(&dir, &cfg, "toyhash", 128).unwrap();
    let mut s = w.begin_split("train", [3, size, size], true).unwrap();
    for i in 0..n {
        s.push(100_000 + i as u64, src.image(i), Some(&labels[i * 37..(i + 1) * 37]))
            .unwrap();
    }
    w.end_split(s).unwrap();
    w.finish(serde_json::json!({})).unwrap()
}

/// `gz train` of `tiny` on `cache` into `run` for `epochs`, batch 8.
fn tiny_args(cache: &Path, run: &Path, epochs: &str) -> Vec<String> {
    let mut v: Vec<String> = vec!["train".into(), "--cache".into(), cache.display().to_string()];
    v.extend(["--model", "tiny", "--epochs", epochs, "--batch", "8"].map(String::from));
    v.extend(["--out".into(), run.display().to_string()]);
    v
}

/// [`tiny_args`] with batch 16 (two parts of 8 on the CPU), on the CPU, with `seed`.
fn tiny_args_in_parts(cache: &Path, run: &Path, epochs: &str, seed: &str) -> Vec<String> {
    let mut args = tiny_args(cache, run, epochs);
    let batch = args.iter().position(|a| a == "--batch").unwrap() + 1;
    args[batch] = "16".into();
    args.extend(["--device", "cpu", "--seed", seed].map(String::from));
    args
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A CPU batch is trained in parts side by side (`gz_model::parts`): the checkpoint does not
/// depend on how many threads ran them, and the parts are a real split (one part, the whole
/// batch at once, sums in another order and gives other bits).
#[test]
fn cpu_training_in_parts_does_not_depend_on_the_thread_count() {
    let tmp = support::tempdir();
    let cache = toy_cache(tmp.path(), 96, 16, 5);
    let train = |name: &str, env: &[(&str, &str)]| -> Vec<u8> {
        let run = tmp.path().join(name);
        let args = tiny_args_in_parts(&cache, &run, "2", "1");
        let mut cmd = support::gz();
        cmd.args(&args).env_remove("GZ_CPU_PARTS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (ok, stdout, stderr) = support::run(&mut cmd);
        assert!(ok, "gz train ({name}) failed:\n{stdout}\n{stderr}");
        let parts = env.contains(&("GZ_CPU_PARTS", "1"));
        assert_eq!(
            stdout.contains("each batch in 2 parts side by side"),
            !parts,
            "{stdout}"
        );
        std::fs::read(run.join("last.safetensors")).unwrap()
    };
    let one = train("t1", &[("RAYON_NUM_THREADS", "1")]);
    // (not assert_eq: the checkpoints' bytes would fill the log)
    assert!(
        one == train("t2", &[("RAYON_NUM_THREADS", "2")]),
        "1 and 2 threads differ"
    );
    assert!(
        one == train("t3", &[("RAYON_NUM_THREADS", "3")]),
        "1 and 3 threads differ"
    );
    let whole = train("whole", &[("RAYON_NUM_THREADS", "2"), ("GZ_CPU_PARTS", "1")]);
    assert!(
        one != whole,
        "GZ_CPU_PARTS=1 trained the same bits: the batch was not split"
    );
}

/// A resumed run trains its batches as it began, whatever `GZ_CPU_PARTS` says now: a run
/// started whole (and one from before the parts, whose sidecars do not say) resumes whole, to
/// the bits of an uninterrupted whole run.
#[test]
fn a_resumed_run_keeps_the_parts_it_began_with() {
    let tmp = support::tempdir();
    let cache = toy_cache(tmp.path(), 96, 16, 6);
    let train = |run: &Path, epochs: &str, parts: Option<&str>, resume: bool| -> String {
        let mut args = tiny_args_in_parts(&cache, run, epochs, "2");
        if resume {
            args.push("--resume".into());
        }
        let mut cmd = support::gz();
        cmd.args(&args).env_remove("GZ_CPU_PARTS");
        if let Some(p) = parts {
            cmd.env("GZ_CPU_PARTS", p);
        }
        let (ok, stdout, stderr) = support::run(&mut cmd);
        assert!(ok, "gz train failed:\n{stdout}\n{stderr}");
        stdout
    };
    let whole = tmp.path().join("whole");
    train(&whole, "3", Some("1"), false);
    let config = |run: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(config(&whole)["cpu_parts"], 1);
    for old_style in [false, true] {
        let run = tmp.path().join(format!("resumed-{old_style}"));
        train(&run, "2", Some("1"), false);
        if old_style {
            // a run from before the parts: its sidecars and config name none
            for f in ["last.json", "best.json", "config.json"] {
                let p = run.join(f);
                let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                let removed = match v.get_mut("train") {
                    Some(t) => t.as_object_mut().unwrap().remove("cpu_parts"),
                    None => v.as_object_mut().unwrap().remove("cpu_parts"),
                };
                assert!(removed.is_some(), "{f} names no cpu_parts: {v}");
                std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
            }
        }
        let out = train(&run, "3", None, true);
        assert!(!out.contains("parts side by side"), "{out}");
        assert_eq!(config(&run)["cpu_parts"], 1);
        let (a, b) = (
            std::fs::read(whole.join("last.safetensors")).unwrap(),
            std::fs::read(run.join("last.safetensors")).unwrap(),
        );
        assert!(
            a == b,
            "resumed run (old style: {old_style}) differs from the uninterrupted whole run"
        );
    }
}

/// The learning test (≈1 min in the debug build on 2 cores): `tiny` on 640 toy images of
/// 32×32 for 8 epochs must reach a validation RMSE well below the training-mean baseline.
#[test]
fn tiny_learns_on_cpu_and_writes_the_run_dir() {
    let tmp = support::tempdir();
    let cache = toy_cache(tmp.path(), 640, 32, 11);
    let run = tmp.path().join("run");
    let (ok, stdout, stderr) = support::run(support::gz().args([
        "train",
        "--cache",
        cache.to_str().unwrap(),
        "--model",
        "tiny",
        "--epochs",
        "8",
        "--device",
        "cpu",
        "--out",
        run.to_str().unwrap(),
        "--batch",
        "16",
        "--no-augment",
        "--seed",
        "3",
    ]));
    assert!(ok, "gz train failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("done:") && stdout.contains("epoch"), "{stdout}");

    let m = metrics(&run);
    assert!(!m.is_empty() && m.len() <= 8, "{m:?}");
    for (k, line) in m.iter().enumerate() {
        assert_eq!(line["epoch"], k + 1);
        for field in ["train_loss", "val_rmse", "images_per_s", "elapsed_s", "lr"] {
            assert!(
                line[field].as_f64().is_some_and(f64::is_finite),
                "{field} missing in {line}"
            );
        }
    }
    for f in [
        "best.safetensors",
        "best.json",
        "last.safetensors",
        "last.json",
        "last.optim.safetensors",
        "config.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("best.json")).unwrap()).unwrap();
    let baseline = best["baseline_val_rmse"].as_f64().unwrap();
    let best_rmse = best["best_val_rmse"].as_f64().unwrap();
    assert_eq!(best["prep_config_hash"], "toyhash");
    assert_eq!(best["model"]["arch"], "tiny");
    assert!(
        best_rmse < 0.75 * baseline,
        "tiny did not learn: best val RMSE {best_rmse} vs training-mean baseline {baseline}\n{stdout}"
    );

    // The checkpoint loads (prediction round trips are unit-tested in gz-model).
    let model =
        gz_model::checkpoint::LoadedModel::load(&run, &gz_model::device::select_device("cpu").unwrap()).unwrap();
    assert_eq!(model.sidecar().epoch, best["epoch"].as_u64().unwrap() as usize);

    // A second run into the same directory is refused; --resume of a finished run too.
    let (ok, _, stderr) = support::run(support::gz().args([
        "train",
        "--cache",
        cache.to_str().unwrap(),
        "--model",
        "tiny",
        "--epochs",
        "8",
        "--out",
        run.to_str().unwrap(),
        "--batch",
        "16",
        "--no-augment",
        "--seed",
        "3",
    ]));
    assert!(!ok && stderr.contains("--resume"), "{stderr}");
}

/// `--resume` takes the options not given from the run: a run with its own model, batch, rate,
/// seed, hold-out, augmentation and subset, resumed with only `--cache`, `--out` and `--epochs`,
/// continues to the bits of the same run uninterrupted; without `--epochs` it keeps the run's
/// own (here done); an option given that differs is still refused.
#[test]
fn resume_takes_the_runs_own_options() {
    let tmp = support::tempdir();
    let cache = toy_cache(tmp.path(), 48, 32, 5);
    let own = [
        "--model",
        "tiny",
        "--batch",
        "4",
        "--lr",
        "0.003",
        "--seed",
        "5",
        "--val-fraction",
        "0.2",
        "--no-augment",
        "--max-train",
        "40",
        "--optimizer",
        "adamw",
    ];
    let gz_train = |run: &Path, extra: &[&str]| {
        let mut c = support::gz();
        c.args(["train", "--cache"])
            .arg(&cache)
            .arg("--out")
            .arg(run)
            .args(extra);
        support::run(&mut c)
    };
    let whole = tmp.path().join("whole");
    let (ok, out, err) = gz_train(&whole, &[&own[..], &["--epochs", "2"]].concat());
    assert!(ok, "{out}\n{err}");
    let run = tmp.path().join("run");
    let (ok, out, err) = gz_train(&run, &[&own[..], &["--epochs", "1"]].concat());
    assert!(ok, "{out}\n{err}");
    // the run's own epoch count: done
    let (ok, _, err) = gz_train(&run, &["--resume"]);
    assert!(!ok && err.contains("the run already completed its 1 epoch"), "{err}");
    let (ok, _, err) = gz_train(&run, &["--resume", "--epochs", "2", "--seed", "6"]);
    assert!(!ok && err.contains("seed (--seed): was 5, now 6"), "{err}");
    let (ok, out, err) = gz_train(&run, &["--resume", "--epochs", "2"]);
    assert!(ok && out.contains("resuming after epoch 1"), "{out}\n{err}");
    let read = |run: &Path, f: &str| std::fs::read(run.join(f)).unwrap();
    assert!(
        read(&run, "last.safetensors") == read(&whole, "last.safetensors"),
        "the resumed run is not the uninterrupted one"
    );
    let config: serde_json::Value = serde_json::from_slice(&read(&run, "config.json")).unwrap();
    assert_eq!(
        (config["seed"].as_u64(), config["batch"].as_u64()),
        (Some(5), Some(4)),
        "{config}"
    );
}

#[test]
fn resume_continues_a_run_from_the_cli() {
    let tmp = support::tempdir();
    let cache = toy_cache(tmp.path(), 48, 32, 5);
    let run = tmp.path().join("run");
    let args = |epochs: &str, resume: bool| {
        let mut v = tiny_args(&cache, &run, epochs);
        v.extend(["--max-train".into(), "40".into()]);
        if resume {
            v.push("--resume".into());
        }
        v
    };
    let (ok, _, stderr) = support::run(support::gz().args(args("2", true)));
    assert!(!ok && stderr.contains("nothing to resume"), "{stderr}");
    assert!(!run.exists(), "a refused resume leaves no run directory behind");
    let (ok, out, stderr) = support::run(support::gz().args(args("1", false)));
    assert!(ok, "{out}\n{stderr}");
    // another schedule than the run's is refused, not silently ignored
    let mut other = args("2", true);
    other.extend(["--schedule".into(), "step:1".into()]);
    let (ok, _, stderr) = support::run(support::gz().args(&other));
    assert!(!ok && stderr.contains("keeps its schedule"), "{stderr}");
    let (ok, out, stderr) = support::run(support::gz().args(args("2", true)));
    assert!(ok, "{out}\n{stderr}");
    assert!(out.contains("resuming after epoch 1"), "{out}");
    let m = metrics(&run);
    assert_eq!(m.len(), 2);
    assert_eq!(m[1]["epoch"], 2);
    // nothing left to train: said as it is, with the way on (a run of 2 epochs resumed with
    // --epochs 1 was "completed 2 of 1 epochs")
    let (ok, _, stderr) = support::run(support::gz().args(args("2", true)));
    assert!(
        !ok && stderr.contains("the run already completed its 2 epochs: to train on, resume with --epochs above 2"),
        "{stderr}"
    );
    let (ok, _, stderr) = support::run(support::gz().args(args("1", true)));
    assert!(
        !ok && stderr
            .contains("the run already has 2 epochs, more than --epochs 1: to train on, resume with --epochs above 2"),
        "{stderr}"
    );

    // a step-schedule run: extended with `--schedule dieleman` (its own drops, for its own epoch
    // count) or without it, it keeps its schedule and its patience (off), gaining no early stop
    std::fs::remove_dir_all(&run).unwrap();
    let dieleman = |epochs: &str, resume: bool| {
        let mut v = args(epochs, resume);
        v.extend(["--schedule".into(), "dieleman".into()]);
        v
    };
    let (ok, out, stderr) = support::run(support::gz().args(dieleman("3", false)));
    assert!(ok, "{out}\n{stderr}");
    // a refused resume says why and nothing else: no schedule note before the refusal
    let mut refused = args("5", true);
    refused.extend(["--seed".into(), "9".into()]);
    let (ok, out, stderr) = support::run(support::gz().args(&refused));
    assert!(
        !ok && stderr.contains("config differs") && stderr.contains("seed (--seed): was "),
        "{out}\n{stderr}"
    );
    assert!(!stderr.contains("note:"), "a note before the refusal:\n{stderr}");
    for extended in [dieleman("5", true), args("6", true)] {
        let (ok, out, stderr) = support::run(support::gz().args(&extended));
        assert!(ok, "{extended:?}: {out}\n{stderr}");
        assert!(stderr.contains("resuming with the run's schedule step:2"), "{stderr}");
        let side: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("last.json")).unwrap()).unwrap();
        assert!(side["train"]["patience"].is_null(), "{}", side["train"]);
        assert_eq!(
            side["train"]["schedule"]["milestones"],
            serde_json::json!([2]),
            "{}",
            side["train"]
        );
    }
    let mut other = args("7", true);
    other.extend(["--schedule".into(), "constant".into()]);
    let (ok, _, stderr) = support::run(support::gz().args(&other));
    assert!(
        !ok && stderr.contains("--schedule constant differs from the run's step:2"),
        "{stderr}"
    );
}

/// Resuming a run that ended by early stopping trains nothing and says so (not "done"), with
/// the way on: a larger `--patience`, which then trains; a finished run resumed with a patience
/// it already exceeds is said to be ended by that patience, not to have stopped early before.
#[test]
fn resuming_an_early_stopped_run_says_nothing_was_trained() {
    let tmp = support::tempdir();
    let cache = toy_cache(tmp.path(), 48, 32, 5);
    let run = tmp.path().join("run");
    // a rate too small to move any weight: epoch 1 is the best, epoch 2 no better
    let args = |patience: &str, resume: bool| {
        let mut v = tiny_args(&cache, &run, "4");
        v.extend(["--max-train", "40", "--lr", "1e-30", "--patience", patience].map(String::from));
        if resume {
            v.push("--resume".into());
        }
        v
    };
    let (ok, out, stderr) = support::run(support::gz().args(args("1", false)));
    assert!(ok && out.contains("2 epochs (early stop)"), "{out}\n{stderr}");
    let (ok, out, stderr) = support::run(support::gz().args(args("1", true)));
    assert!(ok, "{out}\n{stderr}");
    assert!(
        out.contains("nothing trained: the run had already ended by early stopping at epoch 2")
            && !out.contains("done:"),
        "{out}"
    );
    assert!(
        stderr.contains("--resume --patience 2` or more") && out.contains("in the 1 epoch after epoch 1,"),
        "{out}\n{stderr}"
    );
    assert_eq!(metrics(&run).len(), 2);
    // the way on that it names
    let (ok, out, stderr) = support::run(support::gz().args(args("0", true)));
    assert!(ok && out.contains("done: 4 epochs"), "{out}\n{stderr}");
    assert_eq!(metrics(&run).len(), 4);
    // a run that finished its epochs, resumed with more and a patience it already exceeds:
    // the new patience ends it, it had not "ended by early stopping"
    let mut more = tiny_args(&cache, &run, "6");
    more.extend(["--max-train", "40", "--lr", "1e-30", "--patience", "1", "--resume"].map(String::from));
    let (ok, out, stderr) = support::run(support::gz().args(&more));
    assert!(
        ok && out.contains("nothing trained: --patience 1 ends the run at once, at epoch 4")
            && !out.contains("already ended"),
        "{out}\n{stderr}"
    );
    // the same with the run's own patience, which its last epoch reached as the run ended: it
    // finished its epochs, it did not stop early
    let same = tmp.path().join("same");
    let with = |epochs: &str, resume: bool| {
        let mut v = tiny_args(&cache, &same, epochs);
        v.extend(["--max-train", "40", "--lr", "1e-30", "--patience", "3"].map(String::from));
        if resume {
            v.push("--resume".into());
        }
        v
    };
    let (ok, out, stderr) = support::run(support::gz().args(with("4", false)));
    assert!(ok && out.contains("done: 4 epochs,"), "{out}\n{stderr}");
    let (ok, out, stderr) = support::run(support::gz().args(with("6", true)));
    assert!(
        ok && out.contains("nothing trained: --patience 3 ends the run at once, at epoch 4"),
        "{out}\n{stderr}"
    );
}

/// The tree head with sgd-nesterov is said to be at risk when training starts (a known
/// weakness, not fixed: rare answers pushed below zero for every galaxy in the first epoch);
/// not with rmsprop.
#[test]
fn the_tree_head_with_sgd_nesterov_is_flagged() {
    let tmp = support::tempdir();
    let cache = toy_cache(tmp.path(), 48, 32, 5);
    let tree = tmp.path().join("tree");
    for (optimizer, warned) in [("sgd-nesterov", true), ("rmsprop", false)] {
        let mut v = tiny_args(&cache, &tree, "1");
        v.extend(["--max-train", "40", "--output", "tree", "--optimizer", optimizer].map(String::from));
        let _ = std::fs::remove_dir_all(&tree);
        let (ok, out, stderr) = support::run(support::gz().args(&v));
        assert!(ok, "{out}\n{stderr}");
        assert_eq!(
            stderr.contains("note: the tree head with sgd-nesterov has been seen to lose rare answers"),
            warned,
            "{optimizer}: {stderr}"
        );
    }
}

/// Ctrl-C (SIGINT) stops `gz train` at a step boundary: status 130, every finished epoch
/// saved, the run lock released, the way to continue named; `--resume` then continues it. A
/// SIGINT gz was started with ignored stays ignored, and SIGTERM stops it the same way (143);
/// the line the first signal prints says what would end gz at once.
#[test]
fn ctrl_c_stops_training_and_keeps_finished_epochs() {
    use std::io::{BufRead, BufReader};
    let tmp = support::tempdir();
    let cache = toy_cache(tmp.path(), 48, 32, 5);
    let run = tmp.path().join("run");
    let args = |epochs: &str| tiny_args(&cache, &run, epochs);
    // gz started with SIGINT at `disposition` (a test run as a background job inherits SIG_IGN)
    let start = |epochs: &str, disposition: libc::sighandler_t| {
        use std::os::unix::process::CommandExt;
        let mut cmd = support::gz();
        cmd.args(args(epochs))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // SAFETY: only signal(2), async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::signal(libc::SIGINT, disposition);
                Ok(())
            });
        }
        support::Running::spawn(&mut cmd)
    };
    let signal = |child: &std::process::Child, sig: &str| {
        let kill = std::process::Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
    };
    // a run with SIGINT caught, sent `sig` after its first epoch: (exit status, stderr, the
    // stdout lines after epoch 1)
    let stopped_after_epoch_1 = |sig: &str| {
        let mut child = start("100000", libc::SIG_DFL);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines.by_ref() {
            if line.unwrap().starts_with("epoch   1 ") {
                break;
            }
        }
        signal(&child, sig);
        let rest: Vec<String> = lines.map(Result::unwrap).collect();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            rest,
        )
    };
    let (code, stderr, rest) = stopped_after_epoch_1("-INT");
    assert_eq!(code, Some(130), "{stderr}\n{rest:?}");
    assert!(
        stderr.contains("gz train: stopped ")
            && stderr.contains(&format!(
                "to continue: `gz train --cache {} --out {} --resume` (it keeps the run's options)",
                cache.display(),
                run.display()
            )),
        "{stderr}"
    );
    assert!(!stderr.contains("error:"), "{stderr}");
    assert!(
        stderr.contains("gz: stopping before the next training step (Ctrl-C again to quit at once)"),
        "{stderr}"
    );
    assert!(!run.join(".gz-train.lock").exists(), "the run lock was left behind");
    let done = metrics(&run).len();
    assert!((1..100).contains(&done), "{done} epochs");
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("last.json")).unwrap()).unwrap();
    assert_eq!(sidecar["epoch"], done);
    let mut more = args(&(done + 1).to_string());
    more.push("--resume".into());
    let (ok, out, stderr) = support::run(support::gz().args(&more));
    assert!(ok, "{out}\n{stderr}");
    assert!(out.contains(&format!("resuming after epoch {done}")), "{out}");
    assert_eq!(metrics(&run).len(), done + 1);

    // started with SIGINT ignored (a background job): it stays ignored; SIGTERM stops the run
    std::fs::remove_dir_all(&run).unwrap();
    let mut child = start("100000", libc::SIG_IGN);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut epochs = 0;
    for line in lines.by_ref() {
        if line.unwrap().starts_with("epoch ") {
            epochs += 1;
            if epochs == 1 {
                signal(&child, "-INT");
            } else if epochs == 3 {
                break;
            }
        }
    }
    assert_eq!(epochs, 3, "the ignored SIGINT stopped the run");
    signal(&child, "-TERM");
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}\n{rest:?}");
    assert!(stderr.contains("gz train: stopped "), "{stderr}");
    // the SIGTERM's line names it, and no Ctrl-C that cannot reach gz
    assert!(
        stderr.contains("gz: SIGTERM: stopping before the next training step (further SIGTERMs change nothing)\n"),
        "{stderr}"
    );
    assert!(!stderr.contains("Ctrl-C"), "{stderr}");

    // SIGTERM with SIGINT caught: the line says it takes two Ctrl-Cs (SIGINTs count from the
    // first; it said "Ctrl-C again", which one Ctrl-C does not do)
    std::fs::remove_dir_all(&run).unwrap();
    let (code, stderr, rest) = stopped_after_epoch_1("-TERM");
    assert_eq!(code, Some(143), "{stderr}\n{rest:?}");
    assert!(
        stderr.contains(
            "gz: SIGTERM: stopping before the next training step (further SIGTERMs change nothing; Ctrl-C twice \
             quits at once)"
        ),
        "{stderr}"
    );
}

/// `gz train` into a folder on a full disk, where its lock (`.gz-train.lock`, the first file
/// it writes) cannot be written: the error names the lock and the cause, and the empty lock is
/// not left behind. (It was: the next `gz train` into the folder was refused, "in use: another
/// gz train is writing into it", although none ran.) The full disk is a file size limit of 0
/// bytes, where every write fails ("File too large").
#[cfg(target_os = "linux")]
#[test]
fn a_lock_that_cannot_be_written_is_not_left_behind() {
    use std::os::unix::process::CommandExt;
    let t = support::tempdir();
    let cache = toy_cache(t.path(), 24, 32, 3);
    let run = t.path().join("run");
    let mut cmd = support::gz();
    cmd.args(tiny_args(&cache, &run, "1"));
    // SAFETY: only getrlimit(2), setrlimit(2) and signal(2), async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = 0;
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (ok, _, stderr) = support::run(&mut cmd);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(".gz-train.lock") && stderr.contains("File too large"),
        "{stderr}"
    );
    assert!(!run.join(".gz-train.lock").exists(), "{stderr}");
    // with room again, at once: trained
    let (ok, _, stderr) = support::run(support::gz().args(tiny_args(&cache, &run, "1")));
    assert!(ok, "{stderr}");
}

/// A shard truncated while `gz train` has it memory-mapped ends the run with SIGBUS, as any
/// reader of a shrunk mapping does; gz's handler first names the file and the way back.
#[test]
fn a_shard_truncated_under_a_running_train_is_named() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let tmp = support::tempdir();
    let cache = toy_cache(tmp.path(), 48, 32, 6);
    let run = tmp.path().join("run");
    let mut child = support::Running::spawn(
        support::gz()
            .args(tiny_args(&cache, &run, "100000"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("epoch   1 ") {
            break;
        }
    }
    let shard = cache.join("train-00000.shard");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(0)
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("gz train kept running on a truncated shard");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _: Vec<String> = lines.map(Result::unwrap).collect();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{:?}\n{stderr}", out.status);
    assert!(
        stderr.contains(&format!(
            "gz: reading the cache file {} failed (SIGBUS)",
            shard.display()
        )) && stderr.contains("`gz train --resume` continues"),
        "{stderr}"
    );
    // the finished epoch is intact
    assert!(!metrics(&run).is_empty());
}

/// Counts of one are said in the singular: a run on two images trains on 1 image in 1 step per
/// epoch (it said "1 images" and "1 steps/epoch"), and "done: 1 epoch".
#[test]
fn counts_of_one_are_singular_in_the_train_lines() {
    let tmp = support::tempdir();
    let cache = toy_cache(tmp.path(), 2, 16, 8);
    let run = tmp.path().join("run");
    let (ok, out, stderr) = support::run(support::gz().args(tiny_args(&cache, &run, "1")));
    assert!(ok, "{out}\n{stderr}");
    assert!(
        out.contains("training on 1 image, validating on 1 (1 step/epoch, "),
        "{out}"
    );
    assert!(out.contains("done: 1 epoch,"), "{out}");
}

/// A cache whose path is not UTF-8 trains: the sidecar records that path, a hint in messages
/// only, lossily (it failed to write the sidecar after the first epoch, leaving staged files).
#[cfg(target_os = "linux")]
#[test]
fn a_cache_path_that_is_not_utf8_trains() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = support::tempdir();
    let cache = toy_cache(&tmp.path().join(std::ffi::OsStr::from_bytes(b"odd\xffroot")), 16, 32, 3);
    let run = tmp.path().join("run");
    let (ok, out, stderr) = support::run(
        support::gz()
            .args(["train", "--model", "tiny", "--epochs", "1", "--batch", "8", "--cache"])
            .arg(&cache)
            .arg("--out")
            .arg(&run),
    );
    assert!(ok, "{out}\n{stderr}");
    let last: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("last.json")).unwrap()).unwrap();
    let hint = last["cache_dir"].as_str().unwrap();
    assert!(hint.contains("odd\u{fffd}root"), "{hint}");
    assert_eq!(metrics(&run).len(), 1);
}

/// `--max-train` at or above the cache's image count uses every image: said, and the same run
/// as without it (one started with it resumes without it).
#[test]
fn max_train_above_the_cache_is_all_images() {
    let tmp = support::tempdir();
    let cache = toy_cache(tmp.path(), 24, 32, 7);
    let run = tmp.path().join("run");
    let mut first = tiny_args(&cache, &run, "1");
    first.extend(["--max-train", "1000"].map(String::from));
    let (ok, out, stderr) = support::run(support::gz().args(&first));
    assert!(ok, "{out}\n{stderr}");
    assert!(
        stderr.contains("--max-train 1000 is not below the cache's 24 training images: all of them are used"),
        "{stderr}"
    );
    let mut again = tiny_args(&cache, &run, "2");
    again.push("--resume".into());
    let (ok, out, stderr) = support::run(support::gz().args(&again));
    assert!(ok && out.contains("resuming after epoch 1"), "{out}\n{stderr}");
    assert_eq!(metrics(&run).len(), 2);
}

/// A SIGBUS sent by another process (`kill -BUS`: no fault, no address) is passed on to the
/// handler gz's own replaced: gz ends killed by SIGBUS, by the second signal at most (Rust's
/// runtime handler lets the first pass), and names no cache file. gz's handler used to take the
/// first itself (it only restored the previous handler, which a fault meets again on its
/// re-run but a sent signal never does), so it took three.
#[cfg(unix)]
#[test]
fn a_sigbus_sent_by_another_process_is_passed_on() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = support::tempdir();
    let data = tmp.path().join("data");
    let mut child = support::Running::spawn(
        support::gz()
            .args(["synth", "--train", "500000", "--test", "0", "--threads", "1", "--out"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    );
    let wait_for =
        |child: &mut std::process::Child, secs: u64, what: &str, done: &dyn Fn(&mut std::process::Child) -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
            while !done(child) {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("gz synth: {what}");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        };
    // `synth.in-progress` is written after the handler is installed (first thing in main)
    wait_for(&mut child, 60, "never started writing", &|c| {
        data.join("synth.in-progress").exists() || c.try_wait().unwrap().is_some()
    });
    for _ in 0..2 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        // SAFETY: kill(2) of our own child
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGBUS) }, 0);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let ended = |c: &mut std::process::Child| c.try_wait().unwrap().is_some();
    wait_for(&mut child, 10, "still running after two SIGBUS", &ended);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{:?}\n{stderr}", out.status);
    assert!(!stderr.contains("reading the cache file"), "{stderr}");
}

#[test]
fn bad_requests_fail_clearly() {
    let tmp = support::tempdir();
    let cache = toy_cache(tmp.path(), 16, 32, 1);
    let run = tmp.path().join("run");
    let (ok, _, stderr) = support::run(support::gz().args([
        "train",
        "--cache",
        cache.to_str().unwrap(),
        "--model",
        "tiny",
        "--epochs",
        "1",
        "--out",
        run.to_str().unwrap(),
        "--precision",
        "bf16",
    ]));
    assert!(!ok && stderr.contains("bf16") && stderr.contains("CUDA"), "{stderr}");
    let (ok, _, stderr) = support::run(support::gz().args([
        "train",
        "--cache",
        cache.to_str().unwrap(),
        "--model",
        "nope",
        "--epochs",
        "1",
        "--out",
        run.to_str().unwrap(),
    ]));
    assert!(!ok && stderr.contains("nope"), "{stderr}");
    let (ok, _, stderr) = support::run(support::gz().args([
        "train",
        "--cache",
        tmp.path().join("missing").to_str().unwrap(),
        "--model",
        "tiny",
        "--out",
        run.to_str().unwrap(),
    ]));
    assert!(!ok && stderr.contains("missing"), "{stderr}");
    // a run inside the cache it reads is refused (the cache would be kept for it ever after)
    let (ok, _, stderr) = support::run(
        support::gz()
            .args(["train", "--model", "tiny", "--epochs", "1", "--cache"])
            .arg(&cache)
            .arg("--out")
            .arg(cache.join("run")),
    );
    assert!(!ok && stderr.contains("lies inside the shard cache"), "{stderr}");
    assert!(!cache.join("run").exists());
    // a negative number is a bad value of its flag, not an unknown flag; in every subcommand
    for (args, flag) in [
        (
            vec![
                "train", "--model", "tiny", "--epochs", "-1", "--cache", "c", "--out", "r",
            ],
            "--epochs",
        ),
        (
            vec!["predict", "--run", "r", "--cache", "c", "--out", "p.csv", "--tta", "-1"],
            "--tta",
        ),
        (vec!["synth", "--train", "-5"], "--train"),
    ] {
        let (ok, _, stderr) = support::run(support::gz().args(&args));
        let value = args[args.iter().position(|a| *a == flag).unwrap() + 1];
        assert!(
            !ok && stderr.contains(&format!("invalid value '{value}' for '{flag}")),
            "{args:?}: {stderr}"
        );
    }
}

/// `gz bench-train`'s phase lines keep one column for the times: a CPU batch trained in parts
/// (batch 8: two halves) has a "forward+backward" phase, wider than the names' column was, so
/// its time stood six places right of the others; a whole batch (4) has forward and backward.
#[test]
fn bench_train_phase_times_line_up() {
    for (batch, phases) in [
        ("8", &["batch", "forward+backward", "optimizer"][..]),
        ("4", &["batch", "forward", "backward", "optimizer"]),
    ] {
        let (ok, out, err) = support::run(support::gz().args([
            "bench-train",
            "--model",
            "tiny",
            "--batch",
            batch,
            "--steps",
            "1",
            "--warmup",
            "0",
            "--size",
            "32",
            "--device",
            "cpu",
        ]));
        assert!(ok, "{out}\n{err}");
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.ends_with(" ms/step") && l.starts_with("  "))
            .collect();
        let names: Vec<&str> = lines.iter().filter_map(|l| l.split_whitespace().next()).collect();
        assert_eq!(names, phases, "batch {batch}:\n{out}");
        let ends: Vec<usize> = lines.iter().map(|l| l.len()).collect();
        assert!(
            ends.windows(2).all(|w| w[0] == w[1]),
            "batch {batch}: times not in one column:\n{out}"
        );
    }
}

#[test]
fn describe_and_bench_train() {
    let (ok, out, err) = support::run(support::gz().args(["train", "--model", "tiny", "--describe"]));
    assert!(ok && out.contains("total parameters"), "{out}\n{err}");
    assert!(!err.contains("warning"), "{err}");
    // options --describe does not use are refused by name, not ignored (it trains nothing)
    let (ok, out, err) = support::run(support::gz().args([
        "train",
        "--model",
        "tiny",
        "--describe",
        "--lr",
        "5",
        "--max-train",
        "3",
        "--output",
        "tree",
    ]));
    assert!(
        !ok && err.trim_end().ends_with("does not use --lr, --max-train") && out.is_empty(),
        "{out}\n{err}"
    );
    let (ok, out, err) = support::run(support::gz().args([
        "train",
        "--model",
        "small",
        "--describe",
        "--resume",
        "--out",
        "some-run",
    ]));
    assert!(
        !ok && err.contains("does not use --resume, --out") && err.contains("without --model"),
        "{out}\n{err}"
    );
    // a documented switch set to a value it does not act on is named, not ignored in silence
    let (ok, out, err) =
        support::run(
            support::gz()
                .env("GZ_CPU_WINOGRAD", "off")
                .args(["train", "--model", "tiny", "--describe"]),
        );
    assert!(
        ok && err.contains("GZ_CPU_WINOGRAD=\"off\" does nothing"),
        "{out}\n{err}"
    );
    let (ok, out, err) = support::run(support::gz().args([
        "bench-train",
        "--model",
        "tiny",
        "--batch",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--size",
        "32",
        "--device",
        "CPU",
    ]));
    assert!(
        ok && out.contains("images/s") && out.contains("forward"),
        "{out}\n{err}"
    );
    // the device by its own name, not as typed
    assert!(out.contains(" device=cpu "), "{out}");
    // inference throughput, and the pipelined mode (one synchronisation, no breakdown)
    let args = [
        "bench-train",
        "--model",
        "dieleman-tiny",
        "--batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
    ];
    let (ok, out, err) = support::run(support::gz().args(args).args(["--inference", "--json"]));
    assert!(ok, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["mode"], "inference");
    assert_eq!(v["optimizer_path"], "none");
    assert!(v["images_per_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    assert_eq!(v["phases"].as_array().map(|p| p.len()), Some(2), "{v}");
    let (ok, out, err) = support::run(support::gz().args(args).args(["--pipelined", "--json"]));
    assert!(ok, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["mode"], "train-pipelined");
    assert_eq!(v["phases"].as_array().map(|p| p.len()), Some(0), "{v}");
}

/// A bad `GZ_OPTIM_TENSORS` is refused before anything runs, naming the variable and the range.
#[test]
fn bad_optimizer_tensors_per_launch_is_refused() {
    for bad in ["0", "33", "many"] {
        let (ok, out, err) =
            support::run(
                support::gz()
                    .env("GZ_OPTIM_TENSORS", bad)
                    .args(["train", "--model", "tiny", "--describe"]),
            );
        assert!(
            !ok && err.contains("GZ_OPTIM_TENSORS") && err.contains("1 to 32"),
            "{bad}: {out}\n{err}"
        );
    }
    let (ok, out, err) =
        support::run(
            support::gz()
                .env("GZ_OPTIM_TENSORS", "1")
                .args(["train", "--model", "tiny", "--describe"]),
        );
    assert!(ok && out.contains("total parameters"), "{out}\n{err}");
}

/// Parses `done: … best val RMSE X at epoch K vs Y predicting the training mean` from `gz train`.
fn best_vs_mean(stdout: &str) -> Option<(f64, f64)> {
    let line = stdout.lines().find(|l| l.starts_with("done:"))?;
    let after = |key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    Some((after("best val RMSE ")?, after(" vs ")?))
}

/// The learning test on gz-synth data, the way the default CPU pipeline trains: synthetic
/// galaxies → `gz prep --size 32` → `tiny` for a few epochs must clearly beat predicting the
/// training mean on the validation split (a few minutes at most on 2 cores).
#[test]
fn tiny_learns_on_synthetic_galaxies() {
    let tmp = support::tempdir();
    let data = tmp.path().join("data");
    let (ok, out, err) = support::run(support::gz().args([
        "synth",
        "--out",
        data.to_str().unwrap(),
        "--train",
        "1600",
        "--test",
        "4",
        "--seed",
        "5",
    ]));
    assert!(ok, "gz synth failed:\n{out}\n{err}");
    let (ok, out, err) = support::run(support::gz().args([
        "prep",
        "--data",
        data.to_str().unwrap(),
        "--cache",
        tmp.path().join("cache").to_str().unwrap(),
        "--size",
        "32",
    ]));
    assert!(ok, "gz prep failed:\n{out}\n{err}");
    let cache = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("cache: "))
        .expect("cache line")
        .to_string();
    let run = tmp.path().join("run");
    let (ok, stdout, stderr) = support::run(support::gz().args([
        "train",
        "--cache",
        &cache,
        "--model",
        "tiny",
        "--epochs",
        "6",
        "--batch",
        "16",
        "--no-augment",
        "--device",
        "cpu",
        "--seed",
        "1",
        "--out",
        run.to_str().unwrap(),
    ]));
    assert!(ok, "gz train failed:\n{stdout}\n{stderr}");
    let (best, mean) = best_vs_mean(&stdout).unwrap_or_else(|| panic!("no summary line:\n{stdout}"));
    assert!(
        best < 0.9 * mean,
        "tiny did not clearly beat the training mean: {best} vs {mean}\n{stdout}"
    );
}

/// Every CPU fast path off: candle's convolution and ReLU, candle's gradient accumulation, the
/// generic optimizer update, candle's resampling ops, whole batches on the calling thread (the
/// switches `gz` documents for comparisons). What issue 7 asks of the GPU's fast path, for the
/// CPU's: trained on the same seed, the fast and the reference path follow the same curve.
const CPU_REFERENCE_PATH: [(&str, &str); 8] = [
    ("GZ_CONV", "candle"),
    ("GZ_CPU_CONV", "candle"),
    ("GZ_CPU_FUSED", "0"),
    ("GZ_GRAD_SINK", "0"),
    ("GZ_OPTIM", "generic"),
    ("GZ_RESAMPLE", "ops"),
    ("GZ_CPU_PARTS", "1"),
    ("GZ_RUN_ON_POOL", "0"),
];

/// The CPU's own kernels (gz's convolution with Winograd and direct loops, the fused layer ops,
/// the gradient sink, the vectorised optimizer, the resampling twin, batches in parts) against
/// candle's kernels everywhere ([`CPU_REFERENCE_PATH`]): `tiny` and `dieleman-tiny` trained on
/// the same seed, with augmentation and dropout, follow the same training loss and validation
/// RMSE epoch by epoch within 1 % (measured here: at most 0.4 %; the paths add in other orders
/// and the difference grows with the epochs). RMSprop divides each gradient by its own running
/// size, so it hides a gradient off by a constant factor; the SGD run does not: with the fused
/// op's bias gradients halved (checked by hand when the test was written) SGD's fourth-epoch
/// loss moved 3.8 % and RMSprop's validation RMSE 2.2 %, against 0.2 % and 0.04 % unbroken.
#[test]
fn the_cpu_fast_path_follows_the_reference_paths_curve() {
    let tmp = support::tempdir();
    let runs = [
        ("tiny", "rmsprop", 32, 160, "4"),
        ("tiny", "sgd", 32, 160, "4"),
        ("dieleman-tiny", "rmsprop", 48, 64, "2"),
    ];
    let mut apart = Vec::new();
    for (seed, (model, optimizer, size, n, epochs)) in (21..).zip(runs) {
        let cache = toy_cache(tmp.path(), n, size, seed);
        let train = |name: &str, env: &[(&str, &str)]| -> Vec<serde_json::Value> {
            let run = tmp.path().join(format!("{model}-{optimizer}-{name}"));
            let mut cmd = support::gz();
            cmd.args(["train", "--cache", cache.to_str().unwrap(), "--model", model])
                .args(["--epochs", epochs, "--batch", "16", "--device", "cpu", "--seed", "4"])
                .args(["--optimizer", optimizer, "--augment", "--out", run.to_str().unwrap()]);
            for (k, _) in CPU_REFERENCE_PATH {
                cmd.env_remove(k);
            }
            cmd.envs(env.iter().copied());
            let (ok, stdout, stderr) = support::run(&mut cmd);
            assert!(
                ok,
                "gz train ({model}, {optimizer}, {name}) failed:\n{stdout}\n{stderr}"
            );
            metrics(&run)
        };
        let fast = train("fast", &[]);
        let reference = train("reference", &CPU_REFERENCE_PATH);
        assert_eq!(fast.len(), reference.len(), "{model}, {optimizer}: epochs differ");
        for (a, b) in fast.iter().zip(&reference) {
            for field in ["train_loss", "val_rmse"] {
                let (x, y) = (a[field].as_f64().unwrap(), b[field].as_f64().unwrap());
                let d = (x - y).abs() / y.abs();
                let line = format!(
                    "{model}, {optimizer}, epoch {}: {field} fast {x:.6} reference {y:.6} ({d:.1e})",
                    a["epoch"]
                );
                eprintln!("{line}");
                if d.is_nan() || d > 1e-2 {
                    apart.push(line);
                }
            }
        }
    }
    assert!(
        apart.is_empty(),
        "the fast path left the reference path's curve:\n{}",
        apart.join("\n")
    );
}
