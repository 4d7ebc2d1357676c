//! One module per subcommand: each owns its `Args` (clap) and its `run`.
pub mod bench_train;
pub mod cache;
pub mod eval;
pub mod predict;
pub mod prep;
pub mod submit;
pub mod synth;
pub mod train;

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

/// Opens the shard cache a user named, with a hint when the folder is not one: the caches
/// inside it (a cache root holds one folder per dataset and config), or that it is a dataset.
pub fn open_cache(dir: &std::path::Path) -> anyhow::Result<gz_shards::Cache> {
    use anyhow::Context;
    match gz_shards::Cache::open(dir) {
        Ok(c) => Ok(c),
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
                format!("; it holds the cache(s) {}: pass one of them", inside.join(", "))
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

#[cfg(test)]
mod tests {
    use std::path::Path;

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
