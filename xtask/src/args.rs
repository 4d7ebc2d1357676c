//! Hand-rolled argument parsing for xtask: `--flag`, `--key value`, `--key=value`, repeatable keys.
//!
//! Every option a command reads is removed from the list; [`Args::finish`] then rejects whatever
//! is left, so a typo is an error rather than silently ignored.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::str::FromStr;

/// The remaining command-line words of one xtask command.
#[derive(Debug, Clone)]
pub struct Args {
    items: Vec<String>,
}

impl Args {
    pub fn new(items: Vec<String>) -> Self {
        Self { items }
    }

    /// The words not read yet.
    pub fn words(&self) -> &[String] {
        &self.items
    }

    /// Removes `--name` if present.
    pub fn flag(&mut self, name: &str) -> bool {
        let before = self.items.len();
        self.items.retain(|a| a != name);
        before != self.items.len()
    }

    /// Removes every `--name VALUE` / `--name=VALUE` and returns the values in order.
    pub fn values(&mut self, name: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut rest = Vec::with_capacity(self.items.len());
        let prefix = format!("{name}=");
        let mut it = std::mem::take(&mut self.items).into_iter();
        while let Some(a) = it.next() {
            if a == name {
                match it.next() {
                    Some(v) => out.push(v),
                    None => bail!("option {name} needs a value"),
                }
            } else if let Some(v) = a.strip_prefix(&prefix) {
                out.push(v.to_string());
            } else {
                rest.push(a);
            }
        }
        self.items = rest;
        Ok(out)
    }

    /// [`Self::values`] for options whose values are another program's words (`--train-arg`):
    /// a value that is an option without `=` (`--max-train`) also takes the words after it up
    /// to the next `--` word (its value: `--train-arg --max-train 1000` is gz's `--max-train
    /// 1000`; xtask has no words of its own that are not options).
    pub fn passthrough(&mut self, name: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut rest = Vec::with_capacity(self.items.len());
        let prefix = format!("{name}=");
        let mut it = std::mem::take(&mut self.items).into_iter().peekable();
        while let Some(a) = it.next() {
            let v = if a == name {
                match it.next() {
                    Some(v) => v,
                    None => bail!("option {name} needs a value"),
                }
            } else if let Some(v) = a.strip_prefix(&prefix) {
                v.to_string()
            } else {
                rest.push(a);
                continue;
            };
            let takes_words = v.starts_with("--") && !v.contains('=');
            if takes_words {
                let words: Vec<String> = std::iter::from_fn(|| it.next_if(|w| !w.starts_with("--"))).collect();
                match words.as_slice() {
                    // a negative number, `--lr -1e-3`, is one word for gz with `=` (alone, gz
                    // reads `-1e-3` as short options)
                    [w] if w.starts_with('-') => out.push(format!("{v}={w}")),
                    _ => {
                        out.push(v);
                        out.extend(words);
                    }
                }
            } else {
                out.push(v);
            }
        }
        self.items = rest;
        Ok(out)
    }

    /// The last `--name VALUE`, if any.
    pub fn value(&mut self, name: &str) -> Result<Option<String>> {
        let mut v = self.values(name)?;
        // (one of two was dropped without a word; an empty one named the current folder)
        if v.len() > 1 {
            bail!(
                "option {name} is given {} times ({}): give it once",
                v.len(),
                v.join(", ")
            );
        }
        if v.first().is_some_and(String::is_empty) {
            bail!("option {name} needs a value, not an empty word");
        }
        Ok(v.pop())
    }

    pub fn path(&mut self, name: &str) -> Result<Option<PathBuf>> {
        Ok(self.value(name)?.map(PathBuf::from))
    }

    /// The last `--name VALUE` parsed as `T`.
    pub fn parsed<T: FromStr>(&mut self, name: &str) -> Result<Option<T>>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        match self.value(name)? {
            None => Ok(None),
            Some(v) => v
                .parse::<T>()
                .map(Some)
                .with_context(|| format!("option {name}: cannot read {v:?}")),
        }
    }

    /// Fails when words are left that no option consumed.
    pub fn finish(self) -> Result<()> {
        if self.items.is_empty() {
            Ok(())
        } else {
            bail!(
                "unexpected argument{}: {}{} (see `cargo xtask help`)",
                if self.items.len() == 1 { "" } else { "s" },
                self.items.join(" "),
                pass_through_hints(&self.items)
            )
        }
    }
}

/// Options of `gz train` and `gz prep` that xtask does not take itself: a stage takes them
/// through `--train-arg` / `--prep-arg`.
const PASSED_THROUGH: [(&str, &[&str]); 2] = [
    (
        "train",
        &[
            "--lr",
            "--optimizer",
            "--schedule",
            "--patience",
            "--val-fraction",
            "--max-train",
            "--output",
        ],
    ),
    (
        "prep",
        &["--crop", "--filter", "--threads", "--strict", "--rows-per-shard"],
    ),
];

/// For leftover words that are `gz train` / `gz prep` options, how to pass them (`; --lr is a
/// gz train option: pass it as --train-arg --lr=1e-3`); empty for none.
fn pass_through_hints(items: &[String]) -> String {
    let mut hints = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (
                item.as_str(),
                items.get(i + 1).filter(|v| !v.starts_with("--")).cloned(),
            ),
        };
        for (stage, names) in PASSED_THROUGH {
            if names.contains(&name) {
                let word = value.as_ref().map_or(name.to_string(), |v| format!("{name}={v}"));
                hints.push(format!(
                    "{name} is a `gz {stage}` option: pass it as --{stage}-arg {word}"
                ));
            }
        }
    }
    hints.iter().map(|h| format!("; {h}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Args {
        Args::new(s.split_whitespace().map(String::from).collect())
    }

    #[test]
    fn flags_values_and_leftovers() {
        let mut x = a("--debug --data d1 --epochs=3 --train-arg --lr --train-arg=0.1");
        assert!(x.flag("--debug"));
        assert!(!x.flag("--cuda"));
        assert_eq!(x.path("--data").unwrap(), Some(PathBuf::from("d1")));
        assert_eq!(x.parsed::<u32>("--epochs").unwrap(), Some(3));
        assert_eq!(x.values("--train-arg").unwrap(), vec!["--lr", "0.1"]);
        x.finish().unwrap();
    }

    /// `--train-arg --max-train 1000`, as the README and xtask's own hints write it, passes
    /// both words (`1000` was "unexpected"); `--train-arg=--lr=0.1` and `--train-arg --lr
    /// --train-arg 0.1` still work, and a word after a flag is not taken for its value when
    /// the next option follows.
    #[test]
    fn passed_through_options_take_their_values() {
        let mut x = a(
            "--train-arg --max-train 1000 --epochs 3 --train-arg=--lr=0.1 --train-arg --val-fraction \
                       --train-arg 0.3 --train-arg --no-augment --train-arg --lr -1e-3 --prep-arg --crop 200",
        );
        assert_eq!(
            x.passthrough("--train-arg").unwrap(),
            vec![
                "--max-train",
                "1000",
                "--lr=0.1",
                "--val-fraction",
                "0.3",
                "--no-augment",
                "--lr=-1e-3"
            ]
        );
        assert_eq!(x.passthrough("--prep-arg").unwrap(), vec!["--crop", "200"]);
        assert_eq!(x.parsed::<u32>("--epochs").unwrap(), Some(3));
        x.finish().unwrap();
    }

    #[test]
    fn errors_are_reported() {
        assert!(a("--epochs").value("--epochs").is_err());
        // one of two values was dropped without a word; an empty one named the current folder
        let e = a("--name x --name=y").value("--name").unwrap_err().to_string();
        assert!(e.contains("--name is given 2 times (x, y)"), "{e}");
        let e = a("--root=").value("--root").unwrap_err().to_string();
        assert!(e.contains("--root needs a value, not an empty word"), "{e}");
        assert!(a("--epochs x").parsed::<u32>("--epochs").is_err());
        let err = a("--bogus 1").finish().unwrap_err().to_string();
        assert!(err.contains("--bogus") && !err.contains("option: pass"), "{err}");
    }

    /// A `gz train` / `gz prep` option given to xtask directly is refused with the way to pass
    /// it through.
    #[test]
    fn stage_options_get_the_way_to_pass_them() {
        let err = a("--lr 1e-3 --strict --crop=180").finish().unwrap_err().to_string();
        for says in [
            "--lr is a `gz train` option: pass it as --train-arg --lr=1e-3",
            "--strict is a `gz prep` option: pass it as --prep-arg --strict",
            "--crop is a `gz prep` option: pass it as --prep-arg --crop=180",
        ] {
            assert!(err.contains(says), "{says}: {err}");
        }
    }
}
