//! gz-preprocess: Kaggle-layout JPEGs → centre crop → downsample → f16 shards.
//! Not built yet: see the preprocessing issue.
