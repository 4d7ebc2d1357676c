//! One module per subcommand: each owns its `Args` (clap) and its `run`.
pub mod bench_train;
pub mod eval;
pub mod predict;
pub mod prep;
pub mod submit;
pub mod synth;
pub mod train;
