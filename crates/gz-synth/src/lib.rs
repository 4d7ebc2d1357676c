//! gz-synth: the embedded synthetic Galaxy Zoo dataset (Kaggle layout, noise-free truth, Bayes floor).
//! Not built yet: see the foundation issue.
