//! Running one `gz` subcommand: its stdout and stderr are passed through as they come and kept,
//! so the caller can read result lines (`cache: <path>`) and recognise a stage that is not built.

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// What a finished `gz` run printed.
#[derive(Debug)]
pub struct Finished {
    pub stdout: String,
}

/// Why a `gz` run did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// The subcommand exists only as a stub; the line is gz's own message.
    NotBuilt(String),
    /// It ran and failed.
    Failed { status: String, stderr_tail: String },
}

/// Runs `gz args...` in `cwd`.
pub fn run(gz: &Path, args: &[String], cwd: &Path) -> Result<std::result::Result<Finished, Failure>> {
    eprintln!("xtask: $ {} {}", gz.display(), shell_words(args));
    let mut child = Command::new(gz)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", gz.display()))?;
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
    let status = child.wait().context("waiting for gz")?;
    let err_lines = err_thread.join().unwrap_or_default();
    if status.success() {
        return Ok(Ok(Finished { stdout: out }));
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

/// Arguments joined for display, quoting those with spaces.
pub fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines() {
        let out = "progress\ncache: /a/b\nmore\ncache: /c/d\n";
        assert_eq!(result_line(out, "cache").as_deref(), Some("/c/d"));
        assert_eq!(result_line(out, "report"), None);
        assert_eq!(result_line("report:\n", "report"), None);
    }

    #[test]
    fn not_built_and_failures_are_told_apart() {
        let t = tempfile::tempdir().unwrap();
        let script = t.path().join("fake-gz");
        std::fs::write(
            &script,
            "#!/bin/sh\ncase \"$1\" in\n ok) echo 'cache: /x';;\n stub) echo 'error: `gz train` is not built yet' >&2; exit 1;;\n *) echo boom >&2; exit 3;;\nesac\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
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
}
