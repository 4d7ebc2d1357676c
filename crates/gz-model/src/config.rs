//! `ModelConfig`: which network, which output layer, and the sizes it is built for.
//!
//! The config is a serde value written into every checkpoint sidecar (by [`crate::checkpoint`]),
//! so inference rebuilds exactly the network that was trained: [`crate::nets::build`] reads
//! nothing else. Architectures are named on the command line (`gz train --model NAME`):
//!
//! - `vgg16-blog`: the Keras blog's VGG16 baseline on 3×106×106 cached images (sigmoid output).
//! - `dieleman`: after Dieleman, Willett & Dambre (2015), "Rotation-invariant convolutional neural
//!   networks for galaxy morphology prediction" — 16 rotated/mirrored 45×45 parts of four
//!   69×69 views through one shared conv tower, maxout dense layers, decision-tree output.
//!   It takes the cached images of any size and cuts its views itself.
//! - `tiny` / `dieleman-tiny`: the same geometries with few channels, for CPU tests and the
//!   default CPU pipeline; `small`: `tiny` twice as wide, for the CPU pipeline on larger sets.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Errors of parsing model names and checking a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The architecture name is not one of [`Arch::ALL`].
    #[error("unknown model architecture {name:?}; expected one of: {}", arch_names())]
    UnknownArch { name: String },
    /// The output-layer name is not `sigmoid` or `tree`.
    #[error("unknown output layer {name:?}; expected `sigmoid` or `tree`")]
    UnknownOutput { name: String },
    /// A field has a value the network cannot be built with.
    #[error("invalid model config: {field} = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: std::borrow::Cow<'static, str>,
    },
}

/// The names of [`Arch::ALL`], comma-separated (the list an unknown name is told).
fn arch_names() -> String {
    Arch::ALL.map(Arch::name).join(", ")
}

/// The network architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arch {
    /// `vgg16-blog`: 13 conv layers (2×64, 2×128, 3×256, 3×512, 3×512), two dense 4096.
    #[serde(rename = "vgg16-blog")]
    Vgg16Blog,
    /// `dieleman`: the 2014 Kaggle winner's rotation-invariant net.
    #[serde(rename = "dieleman")]
    Dieleman,
    /// `tiny`: a VGG-like net with 8/16/32/32 channels and one dense layer of 64 (inputs of
    /// 64 px or more are average-pooled 2×2 first).
    #[serde(rename = "tiny")]
    Tiny,
    /// `dieleman-tiny`: the Dieleman geometry with 8/16/32/32 channels and maxout 128.
    #[serde(rename = "dieleman-tiny")]
    DielemanTiny,
    /// `small`: `tiny` twice as wide (16/32/64/64 channels, one dense layer of 128), for
    /// training sets of tens of thousands of images on the CPU, where `tiny` underfits.
    #[serde(rename = "small")]
    Small,
}

impl Arch {
    /// All architectures, in the order `--help` lists them.
    pub const ALL: [Arch; 5] = [
        Arch::Vgg16Blog,
        Arch::Dieleman,
        Arch::Tiny,
        Arch::Small,
        Arch::DielemanTiny,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Vgg16Blog => "vgg16-blog",
            Arch::Dieleman => "dieleman",
            Arch::Tiny => "tiny",
            Arch::DielemanTiny => "dieleman-tiny",
            Arch::Small => "small",
        }
    }

    /// True for the Dieleman geometry (views and parts cut inside the net).
    pub fn is_dieleman(self) -> bool {
        matches!(self, Arch::Dieleman | Arch::DielemanTiny)
    }

    /// The output layer the architecture was published with: sigmoid for the blog VGG (and
    /// `tiny`), the decision tree for Dieleman's net.
    pub fn default_output(self) -> OutputKind {
        if self.is_dieleman() {
            OutputKind::Tree
        } else {
            OutputKind::Sigmoid
        }
    }

    /// Dropout probability of the dense layers by default.
    pub fn default_dropout(self) -> f32 {
        match self {
            Arch::Vgg16Blog | Arch::Dieleman => 0.5,
            // the small nets underfit rather than overfit; keep a little regularisation only
            // where the dense layers are wide enough to afford it
            Arch::Tiny | Arch::Small => 0.0,
            Arch::DielemanTiny => 0.25,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == s.trim())
            .ok_or_else(|| ConfigError::UnknownArch { name: s.to_string() })
    }
}

/// The output layer applied to the net's 37 raw outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Independent sigmoids (the blog); outputs in (0,1) but not normalised.
    Sigmoid,
    /// The decision-tree layer [`crate::tree::TreeOutput`]; satisfies every Kaggle equality.
    Tree,
}

impl OutputKind {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            OutputKind::Sigmoid => "sigmoid",
            OutputKind::Tree => "tree",
        }
    }
}

impl fmt::Display for OutputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OutputKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "sigmoid" => Ok(OutputKind::Sigmoid),
            "tree" => Ok(OutputKind::Tree),
            _ => Err(ConfigError::UnknownOutput { name: s.to_string() }),
        }
    }
}

/// Side (pixels) of Dieleman's views.
pub const DIELEMAN_VIEW: usize = 69;
/// Side (pixels) of Dieleman's parts (four overlapping parts per view).
pub const DIELEMAN_PART: usize = 45;
/// Side of the centre crop of the 424×424 originals that Dieleman's 69×69 views cover
/// (he cropped 207×207 and downsampled by 3).
pub const DIELEMAN_CROP_PX: f32 = 207.0;

/// The smallest image side the Dieleman nets take (their views are 69×69).
pub const MIN_DIELEMAN_INPUT: usize = 16;

/// The largest input side [`ModelConfig::validate`] accepts, in pixels.
pub const MAX_INPUT_SIZE: usize = 1024;

/// The resolved model configuration (part of every checkpoint sidecar).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Network architecture.
    pub arch: Arch,
    /// Output layer.
    pub output: OutputKind,
    /// Channels of the input images (3: the cached RGB images).
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// Side of the square input images the net is fed (the cache's image size, 106 by default).
    /// The VGG nets' dense input size depends on it; the Dieleman nets accept any size (their
    /// views are resampled to 69×69) and only use it for [`crate::nets::describe`].
    pub input_size: usize,
    /// Dropout probability before/after the dense layers (active only when training).
    pub dropout: f32,
    /// Dieleman nets: fraction of the input image's side that a 69×69 view covers.
    /// Default 207/212: Dieleman's views cover the central 207 px of the 424 px originals, our
    /// default cache holds the central 212 px (gz-preprocess `crop`), so the view spans 207/212
    /// of the cached image. For another crop `c` use [`ModelConfig::with_prep_crop`]. Ignored by
    /// the VGG nets.
    #[serde(default = "default_view_fraction")]
    pub view_fraction: f32,
}

fn default_channels() -> usize {
    3
}

fn default_view_fraction() -> f32 {
    DIELEMAN_CROP_PX / 212.0
}

impl ModelConfig {
    /// The default config of an architecture (input 3×106×106, the arch's default dropout)
    /// with the given output layer.
    pub fn new(arch: Arch, output: OutputKind) -> Self {
        ModelConfig {
            arch,
            output,
            in_channels: 3,
            input_size: 106,
            dropout: arch.default_dropout(),
            view_fraction: default_view_fraction(),
        }
    }

    /// Parses an architecture name (`vgg16-blog`, `dieleman`, `tiny`, `small`, `dieleman-tiny`).
    pub fn from_name(name: &str, output: OutputKind) -> Result<Self, ConfigError> {
        Ok(Self::new(name.parse()?, output))
    }

    /// Parses an architecture name and uses its published output layer.
    pub fn from_name_default_output(name: &str) -> Result<Self, ConfigError> {
        let arch: Arch = name.parse()?;
        Ok(Self::new(arch, arch.default_output()))
    }

    /// Sets the input image side (the cache's `size`).
    pub fn with_input_size(mut self, size: usize) -> Self {
        self.input_size = size;
        self
    }

    /// Sets the dropout probability.
    pub fn with_dropout(mut self, p: f32) -> Self {
        self.dropout = p;
        self
    }

    /// Sets [`ModelConfig::view_fraction`] for a cache whose images are the central `crop_px`
    /// pixels of the 424×424 originals, so the views cover Dieleman's 207 px.
    pub fn with_prep_crop(mut self, crop_px: u32) -> Self {
        if crop_px > 0 {
            self.view_fraction = DIELEMAN_CROP_PX / crop_px as f32;
        }
        self
    }

    /// The input shape (C, H, W) the net expects.
    pub fn input_shape(&self) -> [usize; 3] {
        [self.in_channels, self.input_size, self.input_size]
    }

    /// Checks the values the builder relies on (an input side above [`MAX_INPUT_SIZE`] is
    /// refused: the dense layers' weights grow with its square).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, value: String, reason: &'static str| {
            Err(ConfigError::Invalid {
                field,
                value,
                reason: reason.into(),
            })
        };
        if self.in_channels == 0 {
            return bad("in_channels", self.in_channels.to_string(), "must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", self.dropout.to_string(), "must be in [0, 1)");
        }
        if self.input_size > MAX_INPUT_SIZE {
            return bad(
                "input_size",
                self.input_size.to_string(),
                "larger than the 1,024 px any cache of the 424-px Galaxy Zoo images needs",
            );
        }
        if self.arch.is_dieleman() {
            if !(self.view_fraction.is_finite() && self.view_fraction > 0.0) {
                return bad(
                    "view_fraction",
                    self.view_fraction.to_string(),
                    "must be a positive number",
                );
            }
            if self.input_size < MIN_DIELEMAN_INPUT {
                return bad(
                    "input_size",
                    self.input_size.to_string(),
                    "below the 16 px from which Dieleman's 69×69 views are resampled (more than 4× \
                     upsampling: no detail left to learn from)",
                );
            }
        } else {
            // every VGG block halves the side; the last block must leave at least 1 pixel
            let spec = crate::nets::vgg::VggSpec::for_arch(self.arch);
            let fits = |side: usize| side >> (spec.blocks.len() + usize::from(spec.stem_pool(side))) > 0;
            if !fits(self.input_size) {
                let min = (1..=MAX_INPUT_SIZE).find(|&s| fits(s)).unwrap_or(MAX_INPUT_SIZE);
                return Err(ConfigError::Invalid {
                    field: "input_size",
                    value: self.input_size.to_string(),
                    reason: format!(
                        "too small for the VGG pooling stages: {} needs a side of at least {min} px",
                        self.arch
                    )
                    .into(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Arch::ALL {
            assert_eq!(a.to_string().parse::<Arch>().unwrap(), a);
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.name()));
        }
        assert!("vgg16".parse::<Arch>().unwrap_err().to_string().contains("vgg16-blog"));
        // the refusal lists every architecture (it named four after `small` came)
        let e = "smal".parse::<Arch>().unwrap_err().to_string();
        assert!(
            e.ends_with("expected one of: vgg16-blog, dieleman, tiny, small, dieleman-tiny"),
            "{e}"
        );
        assert_eq!("tree".parse::<OutputKind>().unwrap(), OutputKind::Tree);
        assert!("softmax".parse::<OutputKind>().is_err());
    }

    #[test]
    fn config_serde_round_trip() {
        let c = ModelConfig::from_name("dieleman", OutputKind::Tree)
            .unwrap()
            .with_prep_crop(240);
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"dieleman\"") && s.contains("\"tree\""));
        let back: ModelConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
        assert!((c.view_fraction - 207.0 / 240.0).abs() < 1e-6);
    }

    #[test]
    fn validate_rejects_bad_values() {
        let c = ModelConfig::new(Arch::Vgg16Blog, OutputKind::Sigmoid);
        assert!(c.validate().is_ok());
        assert!(c.clone().with_input_size(16).validate().is_err());
        let d = ModelConfig::from_name_default_output("dieleman-tiny").unwrap();
        assert!(d.clone().with_input_size(16).validate().is_ok());
        for side in [0, 1, 15] {
            let e = d.clone().with_input_size(side).validate().unwrap_err().to_string();
            assert!(e.contains("16 px"), "{side}: {e}");
        }
        assert!(c.with_dropout(1.0).validate().is_err());
    }

    /// A side too small for the VGG pooling stages says which side the net needs (the message
    /// named none, so a user had to guess what to give `gz prep --size`).
    #[test]
    fn a_too_small_vgg_input_names_the_smallest_side() {
        for (arch, min) in [(Arch::Vgg16Blog, 32), (Arch::Tiny, 16)] {
            let c = ModelConfig::new(arch, OutputKind::Sigmoid);
            let e = c.clone().with_input_size(min - 1).validate().unwrap_err().to_string();
            assert!(e.contains(&format!("at least {min} px")), "{arch}: {e}");
            c.with_input_size(min).validate().unwrap();
        }
    }
}
