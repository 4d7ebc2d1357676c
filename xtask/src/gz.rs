//! Running one `gz` subcommand: its stdout and stderr are passed through as they come and kept,
//! so the caller can read result lines (`cache: <path>`) and recognise a stage that is not built.
//!
//! While a `gz` child runs, Ctrl-C and SIGTERM do not end xtask: it passes them on to `gz` as
//! SIGTERM (a terminal's Ctrl-C reaches `gz` directly as well: one process group), and
//! `gz train` stops at a step boundary with its finished epochs saved. xtask then reports [`Failure::Interrupted`] instead of dying first
//! and leaving `gz`'s last words to a closed pipe.

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};

/// What a finished `gz` run printed.
#[derive(Debug)]
pub struct Finished {
    pub stdout: String,
    /// It ended with the status the caller allowed as a partial success (`gz prep`'s 2: some
    /// inputs skipped, the cache holds the rest).
    pub partial: bool,
}

/// Why a `gz` run did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// The subcommand exists only as a stub; the line is gz's own message.
    NotBuilt(String),
    /// It ran and failed.
    Failed { status: String, stderr_tail: String },
    /// It was stopped by Ctrl-C or SIGTERM (the signal number).
    Interrupted(i32),
}

/// A stage stopped by Ctrl-C or SIGTERM: xtask ends with status 128 + `signal`.
#[derive(Debug)]
pub struct Stopped {
    pub signal: i32,
    pub message: String,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Stopped {}

/// The signal's name, for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "Ctrl-C (SIGINT)",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// The signal xtask received while a child ran (0: none), and the child's pid.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // async-signal-safe only: atomics and kill(2)
    let _ = SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    // Ctrl-C or SIGTERM: the child gets SIGTERM, its orderly stop (`gz train` takes repeated
    // SIGTERMs as one, so a terminal's Ctrl-C that also reached it directly changes nothing,
    // and a second Ctrl-C still ends it at once)
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

/// The stop asked for while an earlier command ran (Ctrl-C or SIGTERM), if any: it holds for
/// the rest of the run.
pub fn stop_requested() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// While a child runs: SIGINT and SIGTERM go to `on_signal`, except a signal the process was
/// started with ignored (a background job's SIGINT), which stays ignored. Returns the previous
/// dispositions for [`restore_handlers`].
fn catch_signals() -> Vec<(libc::c_int, libc::sigaction)> {
    let mut old = Vec::new();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: reading the current disposition into a zeroed sigaction, then installing a
        // zeroed one with an emptied mask and a handler that only touches atomics and kill(2).
        unsafe {
            let mut was: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut was) != 0 || was.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) == 0 {
                old.push((sig, was));
            }
        }
    }
    old
}

fn restore_handlers(old: Vec<(libc::c_int, libc::sigaction)>) {
    for (sig, was) in old {
        // SAFETY: reinstalling a disposition sigaction returned.
        unsafe {
            libc::sigaction(sig, &was, std::ptr::null_mut());
        }
    }
}

/// The stopping signal, if the child ended by one (killed by Ctrl-C or SIGTERM, or `gz
/// train`'s 128 + signal); the one xtask received while it ran, if any, names it. A child that
/// ended otherwise failed on its own, even when a stop was asked for meanwhile: its error is
/// what the user needs to see.
fn stop_signal(status: &std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    let stops = [libc::SIGINT, libc::SIGTERM];
    let ended_by = status
        .signal()
        .or_else(|| status.code().map(|c| c - 128))
        .filter(|s| stops.contains(s))?;
    match SIGNAL.load(Ordering::SeqCst) {
        0 => Some(ended_by),
        received => Some(received),
    }
}

/// Runs `gz args...` in `cwd` (the stages use [`run_allowing`]).
#[cfg(test)]
pub fn run(gz: &Path, args: &[String], cwd: &Path) -> Result<std::result::Result<Finished, Failure>> {
    run_allowing(gz, args, cwd, None)
}

/// An exit status that counts as a partial success when stdout also has the result line `key:`
/// (status 2 alone is also clap's usage error).
#[derive(Debug, Clone, Copy)]
pub struct Partial {
    pub code: i32,
    pub key: &'static str,
}

/// [`run`], with `partial` (if any) counted as finished, [`Finished::partial`].
pub fn run_allowing(
    gz: &Path,
    args: &[String],
    cwd: &Path,
    partial: Option<Partial>,
) -> Result<std::result::Result<Finished, Failure>> {
    eprintln!("xtask: $ {} {}", gz.display(), shell_words(args));
    if let Some(sig) = stop_requested() {
        return Ok(Err(Failure::Interrupted(sig)));
    }
    let old = catch_signals();
    let result = run_child(gz, args, cwd, partial);
    CHILD.store(0, Ordering::SeqCst);
    restore_handlers(old);
    result
}

fn run_child(
    gz: &Path,
    args: &[String],
    cwd: &Path,
    partial: Option<Partial>,
) -> Result<std::result::Result<Finished, Failure>> {
    let mut cmd = Command::new(gz);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // (a program still busy, ETXTBSY: see `output_retrying`)
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => break r.with_context(|| format!("starting {}", gz.display()))?,
        }
    };
    let pid = i32::try_from(child.id()).unwrap_or(0);
    CHILD.store(pid, Ordering::SeqCst);
    // a signal between catching and here found no child to pass on to
    if stop_requested().is_some() && pid > 0 {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let err_thread = std::thread::spawn(move || {
        let mut kept: Vec<String> = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            kept.push(line);
            if kept.len() > 200 {
                kept.drain(..100);
            }
        }
        kept
    });
    let mut out = String::new();
    if let Some(stdout) = child.stdout.take() {
        let mut lock = std::io::stdout();
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading gz stdout")?;
            let _ = writeln!(lock, "{line}");
            out.push_str(&line);
            out.push('\n');
        }
    }
    let status = child.wait().context("waiting for gz");
    // reaped: its pid may be reused from here on
    CHILD.store(0, Ordering::SeqCst);
    let status = status?;
    let err_lines = err_thread.join().unwrap_or_default();
    // (a run that finished counts: the stop comes before the next command, in `run`)
    if status.success() {
        return Ok(Ok(Finished {
            stdout: out,
            partial: false,
        }));
    }
    let partial_ok = partial.is_some_and(|p| status.code() == Some(p.code) && result_line(&out, p.key).is_some());
    // (a stop asked for meanwhile takes effect before the next command, as after a success)
    if partial_ok {
        return Ok(Ok(Finished {
            stdout: out,
            partial: true,
        }));
    }
    if let Some(sig) = stop_signal(&status) {
        return Ok(Err(Failure::Interrupted(sig)));
    }
    if let Some(line) = err_lines
        .iter()
        .chain(out.lines().map(String::from).collect::<Vec<_>>().iter())
        .find(|l| l.contains("not built yet"))
    {
        let msg = line.trim().trim_start_matches("error:").trim().to_string();
        return Ok(Err(Failure::NotBuilt(msg)));
    }
    let tail = err_lines
        .iter()
        .rev()
        .take(5)
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Err(Failure::Failed {
        status: status.to_string(),
        stderr_tail: tail,
    }))
}

/// The last line of `stdout` of the form `<key>: <value>`.
pub fn result_line(stdout: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}:");
    stdout
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(&prefix).map(|v| v.trim().to_string()))
        .filter(|v| !v.is_empty())
}

/// `cmd.output()`, tried again for a while when the program is "busy" (ETXTBSY): a file just
/// written may still be open for writing in a child that another thread forked meanwhile (the
/// tests' stand-in programs; a `gz` being linked), and exec refuses it until that child execs.
pub fn output_retrying(cmd: &mut std::process::Command) -> std::io::Result<std::process::Output> {
    let mut tries = 0;
    loop {
        match cmd.output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// Arguments joined as a shell would read them back, for commands to be pasted: a word
/// holding only characters no shell splits or expands as it is, any other in single quotes (a
/// `'` inside as `'\''`; as gz's `shell_path`).
pub fn shell_words(args: &[String]) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./,:@%+=".contains(c);
    args.iter()
        .map(|a| {
            if !a.is_empty() && a.chars().all(plain) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What a shell would split or expand is quoted, a quote inside too.
    #[test]
    fn shell_words_read_back_as_given() {
        let w = |v: &[&str]| shell_words(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            w(&["gz", "--out", "/a/b-c_d.e", "--lr=1e-3"]),
            "gz --out /a/b-c_d.e --lr=1e-3"
        );
        assert_eq!(
            w(&["a b", "", "x(1)", "$HOME", "it's"]),
            r"'a b' '' 'x(1)' '$HOME' 'it'\''s'"
        );
    }

    #[test]
    fn result_lines() {
        let out = "progress\ncache: /a/b\nmore\ncache: /c/d\n";
        assert_eq!(result_line(out, "cache").as_deref(), Some("/c/d"));
        assert_eq!(result_line(out, "report"), None);
        assert_eq!(result_line("report:\n", "report"), None);
    }

    /// Held by every test that calls [`run`]: the signal state is process-wide, and one test
    /// sets it.
    pub(crate) static RUNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// An executable `fake-gz` in `dir`: a shell `case "$1"` over `cases`.
    pub(crate) fn fake_gz(dir: &Path, cases: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("fake-gz");
        std::fs::write(&script, format!("#!/bin/sh\ncase \"$1\" in\n{cases}\nesac\n")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    #[test]
    fn not_built_and_failures_are_told_apart() {
        let _runs = RUNS.lock().unwrap_or_else(|e| e.into_inner());
        let t = tempfile::tempdir().unwrap();
        let script = fake_gz(
            t.path(),
            " ok) echo 'cache: /x';;\n stub) echo 'error: `gz train` is not built yet' >&2; exit 1;;\n *) echo boom >&2; exit 3;;",
        );
        let ok = run(&script, &["ok".into()], t.path()).unwrap().unwrap();
        assert_eq!(result_line(&ok.stdout, "cache").as_deref(), Some("/x"));
        match run(&script, &["stub".into()], t.path()).unwrap() {
            Err(Failure::NotBuilt(m)) => assert_eq!(m, "`gz train` is not built yet"),
            other => panic!("{other:?}"),
        }
        match run(&script, &["x".into()], t.path()).unwrap() {
            Err(Failure::Failed { stderr_tail, .. }) => assert_eq!(stderr_tail, "boom"),
            other => panic!("{other:?}"),
        }
    }

    /// A child that ends with 128 + SIGINT (`gz train` after Ctrl-C) or is killed by SIGTERM is
    /// `Interrupted`, not a failure; other statuses above 128 are failures.
    #[test]
    fn stopped_children_are_told_apart() {
        let _runs = RUNS.lock().unwrap_or_else(|e| e.into_inner());
        let t = tempfile::tempdir().unwrap();
        let script = fake_gz(t.path(), " int) exit 130;;\n term) kill -TERM $$;;\n *) exit 134;;");
        assert!(matches!(
            run(&script, &["int".into()], t.path()).unwrap(),
            Err(Failure::Interrupted(libc::SIGINT))
        ));
        assert!(matches!(
            run(&script, &["term".into()], t.path()).unwrap(),
            Err(Failure::Interrupted(libc::SIGTERM))
        ));
        assert!(matches!(
            run(&script, &["abort".into()], t.path()).unwrap(),
            Err(Failure::Failed { .. })
        ));
    }

    /// An allowed partial status counts as finished (flagged); elsewhere it is a failure.
    #[test]
    fn an_allowed_partial_status_is_finished() {
        let _runs = RUNS.lock().unwrap_or_else(|e| e.into_inner());
        let t = tempfile::tempdir().unwrap();
        let script = fake_gz(
            t.path(),
            " prep) echo 'cache: /c'; exit 2;;\n usage) echo 'error: unexpected argument' >&2; exit 2;;",
        );
        let p = |code| Some(Partial { code, key: "cache" });
        let f = run_allowing(&script, &["prep".into()], t.path(), p(2))
            .unwrap()
            .unwrap();
        assert!(f.partial && f.stdout.contains("cache: /c"));
        assert!(matches!(
            run(&script, &["prep".into()], t.path()).unwrap(),
            Err(Failure::Failed { .. })
        ));
        assert!(matches!(
            run_allowing(&script, &["prep".into()], t.path(), p(3)).unwrap(),
            Err(Failure::Failed { .. })
        ));
        // the same status without the result line (a usage error) is a failure
        assert!(matches!(
            run_allowing(&script, &["usage".into()], t.path(), p(2)).unwrap(),
            Err(Failure::Failed { .. })
        ));
    }

    /// A child that fails on its own after a stop was asked for (here: xtask's SIGTERM reaches
    /// a child that ignores it and exits 1) is a failure with its error shown, not a stop.
    #[test]
    fn a_failure_after_a_stop_request_stays_a_failure() {
        let _runs = RUNS.lock().unwrap_or_else(|e| e.into_inner());
        let t = tempfile::tempdir().unwrap();
        let script = fake_gz(
            t.path(),
            " fail) trap '' TERM; kill -TERM $PPID; sleep 0.3; echo 'error: disk full' >&2; exit 1;;",
        );
        let got = run(&script, &["fail".into()], t.path()).unwrap();
        SIGNAL.store(0, Ordering::SeqCst);
        match got {
            Err(Failure::Failed { stderr_tail, .. }) => assert!(stderr_tail.contains("disk full"), "{stderr_tail}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
