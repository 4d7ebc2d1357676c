//! The binary header shared by every gz-shards file (image shards, label files, index files).
//!
//! Layout (all integers little-endian; see `docs/shard-format.md`, which is the normative text):
//!
//! ```text
//! off  size  field
//!   0     8  magic            b"GZSHARD\0"
//!   8     4  version          FORMAT_VERSION
//!  12     4  kind             1 = images, 2 = labels, 3 = index
//!  16     4  dtype            1 = f16, 2 = f32, 3 = index entry (u64 id, u32 shard, u32 row)
//!  20    12  dims [u32; 3]    per-row shape: C,H,W for images; 37,1,1 for labels; 1,1,1 for index
//!  32     8  rows             number of rows in this file
//!  40     8  payload_len      bytes of payload = rows × row_bytes
//!  48     4  payload_crc32    CRC-32 (IEEE) of the payload
//!  52     4  header_len       bytes before the payload (multiple of 64, ≥ 128)
//!  56     4  config_len       bytes of the JSON preprocessing config at offset 128
//!  60     4  header_crc32     CRC-32 of the header bytes [0, header_len) with this field zeroed
//!  64    64  config_hash      ASCII, NUL padded
//! 128     n  config JSON      the preprocessing config (UTF-8), then zero padding
//! ```
//!
//! Neighbours: `writer` produces these headers, `reader` validates them. Nothing here knows
//! about JPEG or tensors; the payload is plain little-endian rows.

use std::path::Path;

use crate::ShardError;

/// The 8 magic bytes every gz-shards file starts with.
pub const MAGIC: [u8; 8] = *b"GZSHARD\0";
/// The on-disk format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Fixed part of the header (before the config JSON).
pub const FIXED_HEADER: usize = 128;
/// Alignment of the payload within the file.
pub const HEADER_ALIGN: usize = 64;

/// What a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Images = 1,
    Labels = 2,
    Index = 3,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Kind> {
        match v {
            1 => Some(Kind::Images),
            2 => Some(Kind::Labels),
            3 => Some(Kind::Index),
            _ => None,
        }
    }
    /// The element type that goes with this kind.
    pub fn dtype(self) -> u32 {
        self as u32
    }
    /// Bytes per element of the payload.
    pub fn elem_bytes(self) -> usize {
        match self {
            Kind::Images => 2,
            Kind::Labels => 4,
            Kind::Index => 16,
        }
    }
}

/// A parsed (or to-be-written) header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub kind: Kind,
    pub dims: [u32; 3],
    pub rows: u64,
    pub payload_len: u64,
    pub payload_crc32: u32,
    pub header_len: u32,
    pub config_hash: String,
    pub config_json: String,
}

impl Header {
    /// A header for `rows` rows of shape `dims`; `payload_crc32` is filled in later.
    pub fn new(kind: Kind, dims: [u32; 3], rows: u64, config_hash: &str, config_json: &str) -> Header {
        let payload_len = rows * row_bytes(kind, dims) as u64;
        let header_len = (FIXED_HEADER + config_json.len()).div_ceil(HEADER_ALIGN) * HEADER_ALIGN;
        Header {
            kind,
            dims,
            rows,
            payload_len,
            payload_crc32: 0,
            header_len: header_len as u32,
            config_hash: config_hash.to_string(),
            config_json: config_json.to_string(),
        }
    }

    /// Bytes per row of the payload.
    pub fn row_bytes(&self) -> usize {
        row_bytes(self.kind, self.dims)
    }

    /// Serialises the header (exactly `header_len` bytes, header CRC filled in).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.header_len as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.kind.dtype().to_le_bytes());
        for (k, d) in self.dims.iter().enumerate() {
            b[20 + 4 * k..24 + 4 * k].copy_from_slice(&d.to_le_bytes());
        }
        b[32..40].copy_from_slice(&self.rows.to_le_bytes());
        b[40..48].copy_from_slice(&self.payload_len.to_le_bytes());
        b[48..52].copy_from_slice(&self.payload_crc32.to_le_bytes());
        b[52..56].copy_from_slice(&self.header_len.to_le_bytes());
        b[56..60].copy_from_slice(&(self.config_json.len() as u32).to_le_bytes());
        let hash = self.config_hash.as_bytes();
        let n = hash.len().min(64);
        b[64..64 + n].copy_from_slice(&hash[..n]);
        b[FIXED_HEADER..FIXED_HEADER + self.config_json.len()].copy_from_slice(self.config_json.as_bytes());
        let crc = crc32fast::hash(&b);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates a header at the start of `bytes` (the whole file), checking magic,
    /// version, kind/dtype, header CRC and that the file size matches `header_len + payload_len`.
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Header, ShardError> {
        let bad = |reason: String| ShardError::BadHeader {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < FIXED_HEADER {
            return Err(bad(format!(
                "file is {} bytes, shorter than the {FIXED_HEADER}-byte header (truncated?)",
                bytes.len()
            )));
        }
        if bytes[0..8] != MAGIC {
            return Err(bad(format!("wrong magic {:?}, not a gz-shards file", &bytes[0..8])));
        }
        let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}, this build reads version {FORMAT_VERSION}; re-run `gz prep`"
            )));
        }
        let kind = Kind::from_u32(u32_at(12)).ok_or_else(|| bad(format!("unknown kind {}", u32_at(12))))?;
        let dtype = u32_at(16);
        if dtype != kind.dtype() {
            return Err(bad(format!("dtype {dtype} does not match kind {kind:?}")));
        }
        let dims = [u32_at(20), u32_at(24), u32_at(28)];
        let rows = u64_at(32);
        let payload_len = u64_at(40);
        let payload_crc32 = u32_at(48);
        let header_len = u32_at(52);
        let config_len = u32_at(56) as usize;
        let header_crc = u32_at(60);
        if (header_len as usize) < FIXED_HEADER
            || header_len as usize % HEADER_ALIGN != 0
            || FIXED_HEADER + config_len > header_len as usize
        {
            return Err(bad(format!(
                "inconsistent header length {header_len} (config {config_len} bytes)"
            )));
        }
        if bytes.len() < header_len as usize {
            return Err(bad(format!(
                "file is {} bytes, shorter than its {header_len}-byte header (truncated?)",
                bytes.len()
            )));
        }
        let mut h = bytes[..header_len as usize].to_vec();
        h[60..64].fill(0);
        let crc = crc32fast::hash(&h);
        if crc != header_crc {
            return Err(bad(format!(
                "header checksum mismatch (stored {header_crc:08x}, computed {crc:08x})"
            )));
        }
        let rb = checked_row_bytes(kind, dims)
            .ok_or_else(|| bad(format!("shape {dims:?} overflows the address space")))? as u64;
        if rows.checked_mul(rb) != Some(payload_len) {
            return Err(bad(format!(
                "payload length {payload_len} is not {rows} rows × {rb} bytes"
            )));
        }
        let expected = header_len as u64 + payload_len;
        if bytes.len() as u64 != expected {
            return Err(ShardError::Size {
                path: path.to_path_buf(),
                expected,
                found: bytes.len() as u64,
            });
        }
        let hash_bytes = &bytes[64..128];
        let hash_end = hash_bytes.iter().position(|&c| c == 0).unwrap_or(64);
        let config_hash =
            String::from_utf8(hash_bytes[..hash_end].to_vec()).map_err(|_| bad("config hash is not UTF-8".into()))?;
        let config_json = String::from_utf8(bytes[FIXED_HEADER..FIXED_HEADER + config_len].to_vec())
            .map_err(|_| bad("config JSON is not UTF-8".into()))?;
        Ok(Header {
            kind,
            dims,
            rows,
            payload_len,
            payload_crc32,
            header_len,
            config_hash,
            config_json,
        })
    }
}

/// Bytes per row for a kind and per-row shape.
pub fn row_bytes(kind: Kind, dims: [u32; 3]) -> usize {
    checked_row_bytes(kind, dims).expect("row bytes of a shape this build wrote fit usize")
}

/// [`row_bytes`], or `None` where the product overflows (a damaged or crafted header).
pub fn checked_row_bytes(kind: Kind, dims: [u32; 3]) -> Option<usize> {
    match kind {
        Kind::Index => Some(kind.elem_bytes()),
        _ => dims
            .iter()
            .try_fold(kind.elem_bytes(), |acc, &d| acc.checked_mul(d as usize)),
    }
}

/// One entry of an index file: GalaxyID → (shard, row within shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct IndexEntry {
    pub id: u64,
    pub shard: u32,
    pub row: u32,
}
