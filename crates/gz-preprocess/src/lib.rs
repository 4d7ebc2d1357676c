//! gz-preprocess: Kaggle-layout JPEGs → centre crop → downsample → f16 in [0, 1] → gz-shards cache.
//!
//! One config value, [`PrepConfig`], says what an image becomes; [`prep_jpeg`] applies it to one
//! JPEG; [`run`] / [`run_with`] apply it to a whole dataset directory and publish a cache keyed by
//! the dataset identity and the config hash (see [`dataset`]). Neighbours: gz-schema reads the
//! labels CSV, gz-shards owns the on-disk format, the `gz prep` CLI prints progress and the skip
//! summary. The default recipe (212×212 centre crop, 2× downsample to 106×106) is the one of the
//! Galaxy Zoo Keras blog; Dieleman et al. (2015) crop 207 and downsample 3× — also expressible.
//!
//! Two decode paths give the same result (up to decoder rounding; tested):
//! * [`fast`]: a baseline-JPEG decoder of our own that decodes only the MCU rows the crop needs,
//!   runs the IDCT only for blocks inside the crop, and computes the 2×2 box average directly from
//!   the DCT coefficients (a 4×8 matrix per axis), used when the config is an exact 2× area
//!   reduction of a crop with even offset;
//! * [`generic`]: full decode with `jpeg-decoder`, then an exact area-weighted resample of the
//!   crop (or Catmull-Rom bicubic), used for everything else (progressive, CMYK, odd sizes, other
//!   scale factors).

pub mod dataset;
pub mod fast;
pub mod generic;
mod run;

use half::f16;
use serde::{Deserialize, Serialize};

pub use run::{run, run_with, Progress, RunOptions, RunSummary, Skipped};

/// The side of a Kaggle image. The crop is specified in pixels of a `REFERENCE_SIZE` image; an
/// image of another size is cropped to the same *fraction* of its width and height (then resized
/// to `size`×`size`), so the same sky area ends up in the same output.
pub const REFERENCE_SIZE: u32 = 424;

/// The largest image gz decodes, in pixels (16,384², e.g. 12,000² passes): a JPEG header
/// claiming more is refused before anything is allocated (a 20 KB file can claim 65,500² and
/// would take tens of gigabytes to decode).
pub const MAX_PIXELS: u64 = 1 << 28;

/// Refuses image dimensions beyond [`MAX_PIXELS`] (or zero), naming them.
pub(crate) fn check_dimensions(width: usize, height: usize) -> Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("the frame header gives a {width}×{height} image"));
    }
    if width as u64 * height as u64 > MAX_PIXELS {
        return Err(format!(
            "the frame header claims {width}×{height} pixels, more than the {MAX_PIXELS} gz decodes (damaged header?)"
        ));
    }
    Ok(())
}

/// How the crop is reduced to `size`×`size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    /// Exact area average (box filter over each output pixel's footprint). For the default
    /// 212 → 106 this is the 2×2 box, computed in the DCT domain by the fast path.
    #[default]
    Area,
    /// Catmull-Rom bicubic with antialiasing (support widened by the scale), like Pillow's
    /// `BICUBIC` resize used in the blog. Always takes the generic path.
    Bicubic,
}

/// What each image becomes: a `crop`×`crop` centre crop (in pixels of a 424×424 image) reduced
/// to `size`×`size` with `filter`, as C×H×W f16 RGB in [0, 1].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepConfig {
    /// Centre crop side, pixels of a 424×424 image (1..=424).
    pub crop: u32,
    /// Output side (1..=crop).
    pub size: u32,
    /// Downsampling filter.
    #[serde(default)]
    pub filter: Filter,
}

impl Default for PrepConfig {
    /// The blog recipe: centre 212×212, 2× down to 106×106 (area = 2×2 box).
    fn default() -> Self {
        PrepConfig {
            crop: 212,
            size: 106,
            filter: Filter::Area,
        }
    }
}

impl PrepConfig {
    /// Checks the ranges; every entry point calls this.
    pub fn validate(&self) -> Result<(), PrepError> {
        if self.crop == 0 || self.crop > REFERENCE_SIZE {
            return Err(PrepError::Config(format!(
                "crop {} must be in 1..={REFERENCE_SIZE}",
                self.crop
            )));
        }
        if self.size == 0 || self.size > self.crop {
            return Err(PrepError::Config(format!(
                "size {} must be in 1..=crop ({})",
                self.size, self.crop
            )));
        }
        Ok(())
    }

    /// The version of what this config's rows hold, part of its [`hash`](Self::hash): a change
    /// in the bytes a config produces gets a new version, hence new cache names, and
    /// checkpoints trained on the old rows are not matched with the new ones. Configs whose
    /// bytes did not change keep their version, so their caches and checkpoints stay valid.
    ///
    /// * 1: the original.
    /// * 2 (twelfth session): `area` reductions by more than 2× (`2·size < crop`, such as the
    ///   CPU pipeline's 32 px) take the fast path ([`fast`]'s block-resolution decode, then the
    ///   area average) instead of a full decode by `jpeg-decoder`: values differ from version
    ///   1's by about 0.3/255 on average.
    pub fn version(&self) -> u32 {
        if self.filter == Filter::Area && 2 * self.size < self.crop {
            2
        } else {
            1
        }
    }

    /// Hex hash (16 chars) of the config and its [`version`](Self::version): names the cache
    /// directory and is recorded in every shard header and in checkpoints.
    pub fn hash(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(format!("gz-prep v{}\n", self.version()).as_bytes());
        h.update(serde_json::to_string(self).unwrap_or_default().as_bytes());
        hex(&h.finalize()[..8])
    }

    /// Output shape [C, H, W].
    pub fn shape(&self) -> [usize; 3] {
        [3, self.size as usize, self.size as usize]
    }

    /// Values per output image (3·size·size).
    pub fn image_len(&self) -> usize {
        3 * self.size as usize * self.size as usize
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why one input could not be used, or why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    /// The config is out of range.
    #[error("bad preprocessing config: {0}")]
    Config(String),
    /// The bytes are not a decodable JPEG (empty, truncated, corrupt, not a JPEG).
    #[error("cannot decode JPEG: {0}")]
    Decode(String),
    /// A valid JPEG we do not handle (e.g. 16-bit samples, too small for the crop).
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// I/O on a named path.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The labels CSV is bad.
    #[error(transparent)]
    Schema(#[from] gz_schema::SchemaError),
    /// Writing or reading the cache failed.
    #[error(transparent)]
    Shard(#[from] gz_shards::ShardError),
    /// `--strict`: the first bad input stops the run.
    #[error("{path}: {reason} (stopping: strict mode)")]
    Strict { path: std::path::PathBuf, reason: String },
    /// The data directory holds nothing to preprocess.
    #[error("{0}")]
    NoInput(String),
    /// [`crate::run::RunOptions::stop_requested`] said stop (Ctrl-C): the unfinished cache
    /// was removed, nothing was published.
    #[error("interrupted after {done} of {total} {split} images: nothing was written (the unfinished cache was removed); run it again to preprocess from the start")]
    Interrupted { split: &'static str, done: u64, total: u64 },
    /// A complete cache exists, but recorded as unreadable an input that can be read now (its
    /// permissions fixed, say: the dataset key, built from names, sizes and modification
    /// times, does not change with them). Rebuild it: `gz prep` moves it aside and prepares the
    /// dataset again.
    #[error("cache {dir} is out of date: it left out {path} as unreadable ({reason}), and that file can be read now; delete the cache and re-run")]
    StaleCache {
        dir: std::path::PathBuf,
        path: std::path::PathBuf,
        reason: String,
    },
    /// A complete-looking cache exists but does not open.
    #[error("cache {dir} exists but is damaged: {source}; delete it and re-run")]
    DamagedCache {
        dir: std::path::PathBuf,
        #[source]
        source: gz_shards::ShardError,
    },
}

/// Decodes one JPEG and applies `cfg`: returns 3·size·size f16 values, C×H×W, RGB, in [0, 1].
///
/// Grayscale images are replicated to three channels, CMYK/YCCK images converted to RGB, images
/// that are not 424×424 cropped to the same fraction and resized (see [`REFERENCE_SIZE`]).
pub fn prep_jpeg(bytes: &[u8], cfg: &PrepConfig) -> Result<Vec<f16>, PrepError> {
    cfg.validate()?;
    let mut out = vec![f16::ZERO; cfg.image_len()];
    prep_jpeg_into(bytes, cfg, &mut out)?;
    Ok(out)
}

/// [`prep_jpeg`] into a caller-provided buffer of `cfg.image_len()` values (no allocation on the
/// fast path beyond the decoder's scratch).
pub fn prep_jpeg_into(bytes: &[u8], cfg: &PrepConfig, out: &mut [f16]) -> Result<(), PrepError> {
    if out.len() != cfg.image_len() {
        return Err(PrepError::Config(format!(
            "output buffer has {} values, need {}",
            out.len(),
            cfg.image_len()
        )));
    }
    if bytes.is_empty() {
        return Err(PrepError::Decode("empty file (0 bytes)".into()));
    }
    if bytes.len() < 2 || bytes[0] != 0xFF || bytes[1] != 0xD8 {
        // name what it is when it is another common image format (a file renamed .jpg)
        let kind = match bytes {
            [0x89, b'P', b'N', b'G', ..] => " (it is a PNG image)",
            [b'G', b'I', b'F', b'8', ..] => " (it is a GIF image)",
            [b'B', b'M', ..] => " (it looks like a BMP image)",
            [b'I', b'I', 42, 0, ..] | [b'M', b'M', 0, 42, ..] => " (it is a TIFF image)",
            [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => " (it is a WebP image)",
            _ => "",
        };
        return Err(PrepError::Decode(format!(
            "not a JPEG (no SOI marker FF D8 at the start){kind}"
        )));
    }
    match fast::try_prep(bytes, cfg, out) {
        fast::Outcome::Done => Ok(()),
        fast::Outcome::Corrupt(reason) => Err(PrepError::Decode(reason)),
        fast::Outcome::NotApplicable => match fast::check_scan(bytes, cfg) {
            fast::Outcome::Corrupt(reason) => Err(PrepError::Decode(reason)),
            fast::Outcome::Done | fast::Outcome::NotApplicable => generic::prep(bytes, cfg, out),
        },
    }
}

/// The number of colour channels (components) a JPEG's frame header declares: 1 for a
/// greyscale image, 3 for YCbCr, 4 for CMYK; `None` when no frame header is found before the
/// image data. Reads marker segments only (no decoding). [`prep_jpeg`] copies a greyscale
/// image into all three channels, so the commands use this to say how many inputs had no
/// colour (the models learn from colour: their predictions on such images can be far off).
pub fn jpeg_channels(bytes: &[u8]) -> Option<u8> {
    frame_header(bytes).map(|f| f.2)
}

/// The width and height a JPEG's frame header declares (`None` as for [`jpeg_channels`]):
/// `gz predict` warns about images so small that their crop is enlarged to the model's input.
pub fn jpeg_size(bytes: &[u8]) -> Option<(u32, u32)> {
    frame_header(bytes).map(|(w, h, _)| (w, h))
}

/// (width, height, components) from the first frame header (SOFn) before the image data.
fn frame_header(bytes: &[u8]) -> Option<(u32, u32, u8)> {
    if bytes.get(..2) != Some(&[0xFF, 0xD8]) {
        return None;
    }
    let mut p = 2;
    loop {
        while bytes.get(p) == Some(&0xFF) && bytes.get(p + 1) == Some(&0xFF) {
            p += 1; // fill bytes
        }
        if bytes.get(p) != Some(&0xFF) {
            return None;
        }
        let marker = *bytes.get(p + 1)?;
        let len = u16::from_be_bytes([*bytes.get(p + 2)?, *bytes.get(p + 3)?]) as usize;
        match marker {
            // SOF0..SOF15 (not DHT C4, JPG C8, DAC CC): precision, height, width, components
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                let be16 = |at: usize| Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]) as u32);
                return Some((be16(p + 7)?, be16(p + 5)?, *bytes.get(p + 9)?));
            }
            0xDA | 0xD9 => return None, // the image data (or its end) before any frame header
            _ => p += 2 + len,
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn config_hash_is_stable_and_sensitive() {
        let a = PrepConfig::default();
        assert_eq!(a.hash(), PrepConfig::default().hash());
        assert_eq!(a.hash().len(), 16);
        assert_ne!(
            a.hash(),
            PrepConfig {
                crop: 207,
                size: 69,
                ..a.clone()
            }
            .hash()
        );
        assert_ne!(
            a.hash(),
            PrepConfig {
                filter: Filter::Bicubic,
                ..a.clone()
            }
            .hash()
        );
        // the default config's name does not change with version 2 (its bytes did not)
        assert_eq!(a.version(), 1);
        assert_eq!(a.hash(), "f8f25c7e1e5ed4bb");
        // 32 px: version 2, a new name (version 1 named it 22aaffa649d212f7)
        let small = PrepConfig { size: 32, ..a.clone() };
        assert_eq!(small.version(), 2);
        assert_eq!(small.hash(), "bd482467ae5d24f1");
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json, serde_json::json!({"crop": 212, "size": 106, "filter": "area"}));
    }

    #[test]
    fn config_validation() {
        assert!(PrepConfig {
            crop: 0,
            size: 1,
            filter: Filter::Area
        }
        .validate()
        .is_err());
        assert!(PrepConfig {
            crop: 425,
            size: 1,
            filter: Filter::Area
        }
        .validate()
        .is_err());
        assert!(PrepConfig {
            crop: 100,
            size: 101,
            filter: Filter::Area
        }
        .validate()
        .is_err());
        assert!(PrepConfig::default().validate().is_ok());
    }

    #[test]
    fn other_image_formats_are_named() {
        let png = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0];
        let e = prep_jpeg(&png, &PrepConfig::default()).unwrap_err().to_string();
        assert!(e.contains("not a JPEG") && e.contains("PNG"), "{e}");
        let e = prep_jpeg(b"hello world", &PrepConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a JPEG") && !e.contains("image)"), "{e}");
    }

    #[test]
    fn rejects_non_jpeg_bytes() {
        let c = PrepConfig::default();
        assert!(prep_jpeg(b"", &c).unwrap_err().to_string().contains("empty file"));
        assert!(prep_jpeg(b"\x89PNG\r\n\x1a\n....", &c)
            .unwrap_err()
            .to_string()
            .contains("not a JPEG"));
    }
}
