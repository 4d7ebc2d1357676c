//! gz-shards: the on-disk shard format (f16 C×H×W tensors, index, labels). Knows nothing of JPEG or candle.
//! Not built yet: see the preprocessing issue.
