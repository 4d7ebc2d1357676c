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

    /// The last `--name VALUE`, if any.
    pub fn value(&mut self, name: &str) -> Result<Option<String>> {
        Ok(self.values(name)?.pop())
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
                "unexpected argument(s): {} (see `cargo xtask help`)",
                self.items.join(" ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Args {
        Args::new(s.split_whitespace().map(String::from).collect())
    }

    #[test]
    fn flags_values_and_leftovers() {
        let mut x = a("--debug --data d1 --epochs=3 --train-arg --lr --train-arg=0.1 --data d2");
        assert!(x.flag("--debug"));
        assert!(!x.flag("--cuda"));
        assert_eq!(x.path("--data").unwrap(), Some(PathBuf::from("d2")));
        assert_eq!(x.parsed::<u32>("--epochs").unwrap(), Some(3));
        assert_eq!(x.values("--train-arg").unwrap(), vec!["--lr", "0.1"]);
        x.finish().unwrap();
    }

    #[test]
    fn errors_are_reported() {
        assert!(a("--epochs").value("--epochs").is_err());
        assert!(a("--epochs x").parsed::<u32>("--epochs").is_err());
        let err = a("--bogus 1").finish().unwrap_err().to_string();
        assert!(err.contains("--bogus"), "{err}");
    }
}
