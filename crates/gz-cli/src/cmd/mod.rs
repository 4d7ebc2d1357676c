//! One module per subcommand: each owns its `Args` (clap) and its `run`.
pub mod bench_train;
pub mod cache;
pub mod eval;
pub mod predict;
pub mod prep;
pub mod submit;
pub mod synth;
pub mod train;

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
