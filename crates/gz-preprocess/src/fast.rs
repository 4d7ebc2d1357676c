//! The fast path: a baseline-JPEG decoder specialised for "centre crop, area reduction by 2× or
//! more".
//!
//! Galaxy Zoo images are 424×424 baseline (SOF0) YCbCr 4:2:0 JPEGs and we keep the central
//! 212×212 at half resolution, so most of a full decode is wasted work. This decoder
//!
//! 1. Huffman-decodes every MCU row but keeps only the crop's blocks (the rows above and below
//!    it are decoded for the bit position and for the checks below, nothing more);
//! 2. dequantises and transforms only the blocks inside the crop (≈ 1/4 of the blocks), and
//! 3. transforms straight to the half-resolution grid: for luma the 8×8 coefficients go through a
//!    4×8 matrix per axis that equals "8-point IDCT, then average adjacent pairs", so each output
//!    pixel is exactly the 2×2 box average of the full-resolution IDCT output (before clamping and
//!    rounding); 4:2:0 chroma is already at half resolution and takes the plain 8×8 IDCT (no
//!    upsampling needed — chroma samples sit at the centres of the 2×2 luma boxes).
//!    Work per block is proportional to its non-zero coefficient rows; blocks with only a DC
//!    term (most of the dark sky) are a constant fill.
//!
//! Then YCbCr → RGB (JFIF / BT.601 full range) on the 106×106 output, in f32, straight to f16.
//!
//! Reductions by more than 2× (`2·size < crop`: [`PrepConfig::version`] 2, such as the CPU
//! pipeline's 32 px; `Mode::Reduce`) transform the crop's blocks at their own resolution
//! instead (plain 8×8 IDCT: luma at full resolution, subsampled chroma at its samples) and
//! area-average each plane's crop window to `size`×`size` with the generic path's exact
//! weights, then convert colours the same way.
//!
//! Anything else (progressive, arithmetic coding, 12-bit, CMYK/YCCK/Adobe RGB, sampling factors
//! other than 1× or 2×, crops that are not a whole number of pixels at an even offset, sizes
//! above half the crop, bicubic, version-1 configs on images of other sizes) is
//! [`Outcome::NotApplicable`] and goes to [`crate::generic`]. Corrupt or truncated data is
//! reported, never guessed at: besides codes that match no Huffman code and data that ends
//! early, every block's DC value and every kept AC value must lie in the range an 8-bit DCT
//! can produce, the last coefficient index must be ≤ 63, restart markers must come in
//! sequence, and the data must end where its last block ends (under a byte of padding before
//! the next marker). "Kept" AC values are those of the blocks that hold the centre crop; the
//! rest of the scan is Huffman-decoded without reading the values. [`check_scan`] runs the
//! same checks, on the same blocks, without transforming anything, for the baseline JPEGs the
//! generic path decodes (so both paths call the same file corrupt, whatever the size or
//! filter). A corruption that still decodes to valid codes
//! and values (a flipped bit inside one coefficient) is a small local change that no decoder
//! can see without a checksum.
//!
//! The idea is libjpeg's scaled IDCT (`jidctred.c`, Pillow's draft mode) plus region-of-interest
//! decoding; the 4×8 "box" matrix is exact rather than libjpeg's 4×4 low-frequency IDCT.

use half::f16;

use crate::{Filter, PrepConfig, REFERENCE_SIZE};

/// Result of trying the fast path.
#[derive(Debug)]
pub enum Outcome {
    /// `out` holds the image.
    Done,
    /// The stream is corrupt or truncated (reason).
    Corrupt(String),
    /// Not handled here: use the generic path.
    NotApplicable,
}

const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63,
];

/// The 1-D IDCT matrices: `FULL[n][k]` = ½·C(k)·cos((2n+1)kπ/16), `BOX[m][k]` = mean of rows 2m, 2m+1.
struct Matrices {
    full: [[f32; 8]; 8],
    half: [[f32; 8]; 4],
    /// Transposes: `full_t[k][n]`, `half_t[k][m]` (the horizontal pass runs over k).
    full_t: [[f32; 8]; 8],
    half_t: [[f32; 4]; 8],
}

fn matrices() -> &'static Matrices {
    static M: std::sync::OnceLock<Matrices> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let mut full = [[0f32; 8]; 8];
        for (n, row) in full.iter_mut().enumerate() {
            for (k, v) in row.iter_mut().enumerate() {
                let c = if k == 0 { std::f64::consts::FRAC_1_SQRT_2 } else { 1.0 };
                *v = (0.5 * c * ((2 * n + 1) as f64 * k as f64 * std::f64::consts::PI / 16.0).cos()) as f32;
            }
        }
        let mut half = [[0f32; 8]; 4];
        for m in 0..4 {
            for k in 0..8 {
                half[m][k] = 0.5 * (full[2 * m][k] + full[2 * m + 1][k]);
            }
        }
        let mut full_t = [[0f32; 8]; 8];
        let mut half_t = [[0f32; 4]; 8];
        for k in 0..8 {
            for n in 0..8 {
                full_t[k][n] = full[n][k];
            }
            for m in 0..4 {
                half_t[k][m] = half[m][k];
            }
        }
        Matrices {
            full,
            half,
            full_t,
            half_t,
        }
    })
}

/// Separable transform of one dequantised block `coef` (natural order; only rows flagged in
/// `rows` and columns `< ncol` may be non-zero) to `OY×OX` samples at `dst` (row stride
/// `stride`), level shift included; clears the used coefficients. `mh_t` is the horizontal
/// matrix transposed (k × OX), `mv` the vertical one (OY × k).
#[inline(always)]
fn transform<const OX: usize, const OY: usize>(
    coef: &mut [f32; 64],
    rows: u8,
    ncol: usize,
    mh_t: &[[f32; OX]; 8],
    mv: &[[f32; 8]; OY],
    dst: &mut [f32],
    stride: usize,
) {
    let mut t = [[0f32; OX]; 8];
    for vr in 0..8 {
        if rows & (1 << vr) == 0 {
            continue;
        }
        let f = &mut coef[vr * 8..vr * 8 + 8];
        let tv = &mut t[vr];
        for u in 0..ncol.min(8) {
            let fu = f[u];
            if fu != 0.0 {
                for x in 0..OX {
                    tv[x] += fu * mh_t[u][x];
                }
            }
        }
        f.fill(0.0);
    }
    for y in 0..OY {
        let mut acc = [128f32; OX];
        for vr in 0..8 {
            if rows & (1 << vr) == 0 {
                continue;
            }
            let w = mv[y][vr];
            for x in 0..OX {
                acc[x] += w * t[vr][x];
            }
        }
        dst[y * stride..y * stride + OX].copy_from_slice(&acc);
    }
}

/// A Huffman table and its lookup tables.
///
/// All three tables are indexed by the next [`LUT_BITS`] bits of the stream; a 0 entry means a
/// code longer than that (or no code), which [`Bits::decode`] finds by canonical search. The
/// "fast" tables consume a code *and* the magnitude bits that follow it in one lookup (as
/// stb_image does) when both fit in the lookahead:
///
/// * [`Huffman::fast`], for every DC term and for the AC terms of blocks inside the crop:
///   bits 0‥7 = bits to consume (code + magnitude), bits 8‥15 = run (AC: zeros before the
///   value), bits 16‥31 = the value (`i16`, sign-extended). An AC value is never 0, so value 0
///   flags the two size-0 AC symbols: run 16 is a zero run (ZRL, `0xF0`), run 0 is end of block
///   (EOB `0x00`; the other size-0 symbols end the block too, as in [`Bits::decode`]'s callers).
///   A DC entry's value is the difference (0 for size 0); sizes over 11 are left to the slow path,
///   which reports them.
/// * [`Huffman::skip`] (AC tables only), for blocks outside the crop whose values are dropped:
///   bits 0‥7 = bits to consume, bits 8‥15 = how far the coefficient index moves (run + 1 for a
///   value, 16 for ZRL, 0 for end of block). It needs only the code to fit in the lookahead (the
///   magnitude bits are skipped unread), so it covers every code of up to [`LUT_BITS`] bits.
#[derive(Clone)]
struct Huffman {
    /// (code length << 8) | symbol.
    lut: [u16; 1 << LUT_BITS],
    /// Code and magnitude at once, value included (layout above).
    fast: [u32; 1 << LUT_BITS],
    /// Code and magnitude at once, coefficient index advance only (layout above).
    skip: [u16; 1 << LUT_BITS],
    maxcode: [i32; 17],
    valptr: [i32; 17],
    mincode: [i32; 17],
    vals: Vec<u8>,
}

/// Lookahead of the lookup tables, in bits.
const LUT_BITS: u32 = 9;
/// Most bits one [`Huffman::skip`] entry consumes (a code of `LUT_BITS` and 15 magnitude bits).
const SKIP_MAX_BITS: u32 = LUT_BITS + 15;

/// Sign-extends `s` (1..=16) magnitude bits `v` as JPEG's size categories do (F.2.2.1 EXTEND).
#[inline(always)]
fn extend(v: i32, s: u32) -> i32 {
    if v < (1 << (s - 1)) {
        v - (1 << s) + 1
    } else {
        v
    }
}

impl Huffman {
    /// `ac`: the table decodes AC run/size symbols (else DC size categories).
    fn new(counts: &[u8; 16], vals: &[u8], ac: bool) -> Result<Huffman, String> {
        let mut h = Huffman {
            lut: [0; 1 << LUT_BITS],
            fast: [0; 1 << LUT_BITS],
            skip: [0; 1 << LUT_BITS],
            maxcode: [-1; 17],
            valptr: [0; 17],
            mincode: [0; 17],
            vals: vals.to_vec(),
        };
        let mut code: i32 = 0;
        let mut k: usize = 0;
        for l in 1..=16usize {
            let n = counts[l - 1] as usize;
            h.valptr[l] = k as i32;
            h.mincode[l] = code;
            for _ in 0..n {
                if code >= (1 << l) {
                    return Err("invalid Huffman table (code space overflow)".into());
                }
                if l as u32 <= LUT_BITS {
                    let shift = LUT_BITS - l as u32;
                    let base = (code as usize) << shift;
                    for e in &mut h.lut[base..base + (1 << shift)] {
                        *e = ((l as u16) << 8) | vals[k] as u16;
                    }
                }
                code += 1;
                k += 1;
            }
            h.maxcode[l] = if n > 0 { code - 1 } else { -1 };
            code <<= 1;
        }
        for i in 0..h.lut.len() {
            let e = h.lut[i];
            if e == 0 {
                continue;
            }
            let l = (e >> 8) as u32;
            let sym = (e & 0xFF) as u32;
            let (run, sz) = if ac { (sym >> 4, sym & 15) } else { (0, sym) };
            if ac {
                // skip: index advance (0 = end of block) and bits, magnitude bits unread
                let adv = match (run, sz) {
                    (15, 0) => 16,
                    (_, 0) => 0,
                    _ => run + 1,
                };
                h.skip[i] = ((adv << 8) | (l + sz)) as u16;
            }
            if sz == 0 {
                // EOB / ZRL (value 0, run 0 or 16), or a DC difference of 0
                let run = if ac && run == 15 { 16 } else { 0 };
                h.fast[i] = (run << 8) | l;
                continue;
            }
            if (!ac && sz > 11) || l + sz > LUT_BITS {
                continue;
            }
            let extra = ((i as u32) >> (LUT_BITS - l - sz)) & ((1 << sz) - 1);
            let v = extend(extra as i32, sz);
            h.fast[i] = ((v as u32) << 16) | (run << 8) | (l + sz);
        }
        Ok(h)
    }
}

/// The entropy-coded data's bit reader. It is `Copy`: the hot loops ([`skip_blocks`],
/// [`decode_block`]) work on a local copy, and the out-of-line functions (`refill_slow`,
/// `restart`, `segment_end`) take and return it by value, so that no reference to it escapes
/// and the compiler keeps the bit buffer (`bits`, `nbits`) in registers.
#[derive(Clone, Copy)]
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    bits: u64,
    nbits: u32,
    /// Zero bytes fed after a marker or the end of data.
    padded: u32,
    marker: bool,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Bits<'a> {
        Bits {
            data,
            pos,
            bits: 0,
            nbits: 0,
            padded: 0,
            marker: false,
        }
    }

    #[inline(always)]
    fn refill(&mut self) {
        if !self.marker && self.pos + 8 <= self.data.len() {
            let mut a = [0u8; 8];
            a.copy_from_slice(&self.data[self.pos..self.pos + 8]);
            let w = u64::from_be_bytes(a);
            // no 0xFF byte among the 8: take them whole (bits below nbits repeat the stream)
            let x = !w;
            if (x.wrapping_sub(0x0101_0101_0101_0101) & !x & 0x8080_8080_8080_8080) == 0 {
                self.bits |= w >> self.nbits;
                self.pos += ((63 - self.nbits) >> 3) as usize;
                self.nbits |= 56;
                return;
            }
        }
        *self = self.refill_slow();
    }

    /// Byte by byte: undoes 0xFF00 stuffing, stops at a marker and feeds zero bytes after it.
    #[inline(never)]
    fn refill_slow(mut self) -> Self {
        while self.nbits <= 56 {
            let mut byte = 0u8;
            let mut real = false;
            if !self.marker && self.pos < self.data.len() {
                let b = self.data[self.pos];
                if b == 0xFF {
                    match self.data.get(self.pos + 1) {
                        Some(0x00) => {
                            byte = 0xFF;
                            real = true;
                            self.pos += 2;
                        }
                        _ => self.marker = true,
                    }
                } else {
                    byte = b;
                    real = true;
                    self.pos += 1;
                }
            }
            if !real {
                self.padded += 1;
            }
            self.bits |= (byte as u64) << (56 - self.nbits);
            self.nbits += 8;
        }
        self
    }

    /// The next [`LUT_BITS`] bits, as an index into [`Huffman`]'s lookup tables.
    #[inline(always)]
    fn peek(&self) -> usize {
        (self.bits >> (64 - LUT_BITS)) as usize
    }

    /// Drops `n` bits (at most `nbits`).
    #[inline(always)]
    fn consume(&mut self, n: u32) {
        self.bits <<= n;
        self.nbits -= n;
    }

    /// True when more bits were consumed than the segment holds.
    fn overrun(&self) -> bool {
        self.padded as i64 * 8 > self.nbits as i64
    }

    #[inline(always)]
    fn decode(&mut self, h: &Huffman) -> Result<u8, String> {
        if self.nbits < 16 {
            self.refill();
        }
        let e = h.lut[(self.bits >> (64 - LUT_BITS)) as usize];
        if e != 0 {
            let l = (e >> 8) as u32;
            self.bits <<= l;
            self.nbits -= l;
            return Ok(e as u8);
        }
        let peek = (self.bits >> 48) as i32;
        for l in (LUT_BITS as usize + 1)..=16 {
            let code = peek >> (16 - l);
            if code <= h.maxcode[l] {
                self.bits <<= l;
                self.nbits -= l as u32;
                let idx = (h.valptr[l] + code - h.mincode[l]) as usize;
                return h
                    .vals
                    .get(idx)
                    .copied()
                    .ok_or_else(|| "corrupt Huffman table".to_string());
            }
        }
        Err("corrupt entropy-coded data (no matching Huffman code)".into())
    }

    /// Reads `s` (1..=16) bits and sign-extends them as JPEG magnitude categories do.
    #[inline(always)]
    fn receive_extend(&mut self, s: u32) -> i32 {
        if self.nbits < s {
            self.refill();
        }
        let v = (self.bits >> (64 - s)) as i32;
        self.bits <<= s;
        self.nbits -= s;
        extend(v, s)
    }

    /// At the end of an entropy-coded segment (after the last block, or before an RSTn marker):
    /// what is left must be under a byte (the encoder's padding), followed by a marker. More
    /// means the blocks did not use the bits the encoder wrote, i.e. corrupt data (libjpeg warns
    /// "extraneous bytes before marker"; too few bits is [`Bits::overrun`], its "premature end").
    fn segment_end(self) -> Result<(), String> {
        // (a short segment: the blocks took bits the data does not hold; checked here too
        // because `restart` forgets the padding)
        if self.overrun() {
            return Err("entropy-coded data ends early (truncated or corrupt)".into());
        }
        let left = self.nbits as i64 - 8 * self.padded as i64;
        let mismatch = || Err("corrupt entropy-coded data (it does not end where its last block ends)".into());
        if left >= 8 {
            return mismatch();
        }
        if self.marker {
            return Ok(());
        }
        match (self.data.get(self.pos), self.data.get(self.pos + 1)) {
            (Some(0xFF), Some(&b)) if b != 0 => Ok(()),
            (None, _) | (Some(0xFF), None) => Err("no end-of-image marker: truncated file".into()),
            _ => mismatch(),
        }
    }

    /// Skips to after the next RSTn marker (restart interval boundary), which must be number
    /// `n` mod 8.
    fn restart(mut self, n: usize) -> Result<Self, String> {
        self.segment_end()?;
        // drop buffered bits; `pos` stands at the marker (or before stuffing-free padding)
        let mut p = self.pos;
        while p + 1 < self.data.len() && !(self.data[p] == 0xFF && (0xD0..=0xD7).contains(&self.data[p + 1])) {
            // only fill bytes (0xFF) may precede the marker legally; anything else means we are lost
            if self.data[p] != 0xFF {
                return Err("missing restart marker".into());
            }
            p += 1;
        }
        if p + 1 >= self.data.len() {
            return Err("entropy-coded data ends early (truncated?)".into());
        }
        if self.data[p + 1] != 0xD0 + (n % 8) as u8 {
            return Err(format!(
                "corrupt entropy-coded data (restart marker RST{} where RST{} belongs)",
                self.data[p + 1] - 0xD0,
                n % 8
            ));
        }
        self.pos = p + 2;
        self.bits = 0;
        self.nbits = 0;
        self.marker = false;
        self.padded = 0;
        Ok(self)
    }
}

/// How the crop reaches `size`×`size`.
#[derive(Clone, Copy)]
enum Mode {
    /// The crop is exactly `2·size` pixels: luma straight to the half-resolution grid (the 4×8
    /// box matrices), subsampled chroma at its native samples.
    Half,
    /// The crop (`cw`×`ch` pixels of this image) is more than `2·size`: every block at its own
    /// resolution (luma full, subsampled chroma native), then each plane's crop window
    /// area-averaged to `size`×`size` with the generic path's weights.
    Reduce { cw: usize, ch: usize },
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    td: usize,
    ta: usize,
}

#[cfg(test)]
thread_local! {
    /// The largest plane this thread allocated, in samples (tests: a damaged header that claims
    /// a huge image must not cost its allocation).
    pub(crate) static LARGEST_PLANE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

thread_local! {
    /// Per-thread reusable plane and RGB buffers (avoids a large allocation, hence fresh
    /// zeroed pages, per image).
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tries the fast path (see module docs).
pub fn try_prep(bytes: &[u8], cfg: &PrepConfig, out: &mut [f16]) -> Outcome {
    match decode(bytes, cfg, out, false) {
        Ok(true) => Outcome::Done,
        Ok(false) => Outcome::NotApplicable,
        Err(reason) => Outcome::Corrupt(reason),
    }
}

/// Checks a baseline JPEG's entropy-coded data the way [`try_prep`] does (every block decoded,
/// DC values and the AC values of the blocks holding `cfg`'s centre crop in range, the data
/// ending where its last block ends, restart markers in sequence) without transforming
/// anything, for images the generic path decodes (other sizes, `bicubic`): `jpeg-decoder`
/// accepts most corrupt data. `Done`: checked and sound; `NotApplicable`: a kind this decoder
/// does not read (progressive, 12-bit, …).
pub fn check_scan(bytes: &[u8], cfg: &PrepConfig) -> Outcome {
    match decode(bytes, cfg, &mut [], true) {
        Ok(true) => Outcome::Done,
        Ok(false) => Outcome::NotApplicable,
        Err(reason) => Outcome::Corrupt(reason),
    }
}

/// A bound on |AC coefficient| for 8-bit data: the DCT of samples in [-128, 128] reaches 1024
/// (the 1-D sums of |cos| at most 8·cos(π/4) and 8, times ¼·C(0)·128; libjpeg's largest is 1020),
/// and mozjpeg's overshoot deringing feeds samples up to 31 beyond the range (1024 · 159/128 ≈
/// 1272), so 1280 plus the quantisation step.
const AC_LIMIT: f32 = 1280.0;
const INDEX_PAST_63: &str = "corrupt AC coefficients (index past 63)";
const AC_RANGE: &str = "corrupt entropy-coded data (AC coefficient out of range)";

/// Whether a dequantised DC term can come from 8-bit samples: it is 8 × the block's mean
/// level, within ±1024 give or take the quantisation step `q0` (libjpeg stays in
/// [-1024, 1016]; encoders that do not clamp chroma, like stb_image_write, reach 8 × 127.5 = 1020).
#[inline(always)]
pub(crate) fn dc_in_range(dc_value: f32, q0: f32) -> bool {
    dc_value.abs() <= 1024.0 + q0
}

/// One block of an MCU, for the entropy decoder: its component (index into the DC
/// predictors), Huffman tables and DC quantisation step.
#[derive(Clone, Copy)]
struct BlockCode<'t> {
    comp: usize,
    dc: &'t Huffman,
    ac: &'t Huffman,
    q0: f32,
}

/// Decodes a block's DC difference, updates the predictor and checks the DC value's range;
/// returns the dequantised DC value.
#[inline(always)]
fn decode_dc(bits: &mut Bits, blk: &BlockCode, pred: &mut i32) -> Result<f32, String> {
    if bits.nbits < LUT_BITS {
        bits.refill();
    }
    let e = blk.dc.fast[bits.peek()];
    let diff = if e != 0 {
        bits.consume(e & 0xFF);
        (e as i32) >> 16
    } else {
        // code and magnitude longer than the lookahead
        let t = bits.decode(blk.dc)? as u32;
        if t > 11 {
            return Err("corrupt DC coefficient".into());
        }
        if t == 0 {
            0
        } else {
            bits.receive_extend(t)
        }
    };
    *pred += diff;
    let dc_value = *pred as f32 * blk.q0;
    if !dc_in_range(dc_value, blk.q0) {
        return Err("corrupt entropy-coded data (DC coefficient out of range)".into());
    }
    Ok(dc_value)
}

/// Huffman-decodes one block's AC coefficients without keeping them: one [`Huffman::skip`]
/// lookup per code of up to [`LUT_BITS`] bits, magnitude bits unread.
#[inline(always)]
fn skip_ac(bits: &mut Bits, act: &Huffman) -> Result<(), String> {
    let mut k = 1;
    while k < 64 {
        if bits.nbits < SKIP_MAX_BITS {
            bits.refill();
        }
        let e = act.skip[bits.peek()] as u32;
        if e != 0 {
            bits.consume(e & 0xFF);
            let adv = (e >> 8) as usize;
            if adv == 0 {
                break; // end of block
            }
            // (an index past 63 shows in k > 64 below)
            k += adv;
            continue;
        }
        match long_ac(bits, act, &mut k)? {
            LongAc::End => break,
            LongAc::Zeros => {}
            LongAc::Coef(s) => {
                if bits.nbits < s {
                    bits.refill();
                }
                bits.consume(s);
                k += 1;
            }
        }
    }
    // the last coefficient sits at index 63 at most (k one past it)
    if k > 64 {
        return Err(INDEX_PAST_63.into());
    }
    Ok(())
}

/// What a code longer than the lookahead meant (after [`long_ac`]).
enum LongAc {
    /// End of block.
    End,
    /// A run of 16 zeros (ZRL), already counted in `k`.
    Zeros,
    /// A coefficient at index `k` (already advanced past its zero run and checked), with this
    /// many magnitude bits still to read.
    Coef(u32),
}

/// Decodes an AC code the lookup tables do not hold (longer than [`LUT_BITS`], with its
/// magnitude), for both AC loops.
#[inline(always)]
fn long_ac(bits: &mut Bits, act: &Huffman, k: &mut usize) -> Result<LongAc, String> {
    let rs = bits.decode(act)?;
    let (run, s) = ((rs >> 4) as usize, (rs & 15) as u32);
    if s == 0 {
        if run == 15 {
            *k += 16;
            return Ok(LongAc::Zeros);
        }
        return Ok(LongAc::End);
    }
    *k += run;
    if *k > 63 {
        return Err(INDEX_PAST_63.into());
    }
    Ok(LongAc::Coef(s))
}

/// Stores the dequantised AC term `v` at zigzag index `k` of a kept block, range-checked, and
/// notes its row and column.
#[inline(always)]
fn keep_ac(
    coef: &mut [f32; 64],
    q: &[f32; 64],
    k: usize,
    v: i32,
    rows: &mut u8,
    maxcol: &mut usize,
) -> Result<(), String> {
    let z = ZIGZAG[k];
    coef[z] = v as f32 * q[k];
    if coef[z].abs() > AC_LIMIT + q[k] {
        return Err(AC_RANGE.into());
    }
    *rows |= 1 << (z >> 3);
    *maxcol = (*maxcol).max(z & 7);
    Ok(())
}

/// Entropy-decodes `blocks` (a whole MCU outside the crop, or one block of a partly kept one)
/// for the checks only: DC predictors and range, AC structure.
///
/// This and [`decode_block`] are the hot loops. They are out of line and work on a local copy
/// of the reader, which the compiler keeps in registers (inside [`decode`], with everything
/// else live, it spills the bit buffer to the stack: a store and a load on every code's
/// dependency chain).
#[inline(never)]
fn skip_blocks(reader: &mut Bits, blocks: &[BlockCode], pred: &mut [i32; 4]) -> Result<(), String> {
    let mut bits = *reader;
    for blk in blocks {
        decode_dc(&mut bits, blk, &mut pred[blk.comp])?;
        skip_ac(&mut bits, blk.ac)?;
    }
    *reader = bits;
    Ok(())
}

/// Entropy-decodes one block inside the crop into `coef` (natural order, dequantised by `q`,
/// zigzag-indexed); returns the rows holding non-zero terms (bit mask) and the last non-zero
/// column. Every value is range-checked.
#[inline(never)]
fn decode_block(
    reader: &mut Bits,
    blk: &BlockCode,
    pred: &mut [i32; 4],
    q: &[f32; 64],
    coef: &mut [f32; 64],
) -> Result<(u8, usize), String> {
    let mut bits = *reader;
    coef[0] = decode_dc(&mut bits, blk, &mut pred[blk.comp])?;
    let act = blk.ac;
    let mut rows = 1u8;
    let mut maxcol = 0usize;
    let mut k = 1;
    while k < 64 {
        if bits.nbits < LUT_BITS {
            bits.refill();
        }
        let e = act.fast[bits.peek()];
        if e != 0 {
            bits.consume(e & 0xFF);
            let v = (e as i32) >> 16;
            let run = ((e >> 8) & 0xFF) as usize;
            if v == 0 {
                if run == 0 {
                    break; // end of block
                }
                k += run; // ZRL: 16 zeros (past the end: k > 64 below)
                continue;
            }
            k += run;
            if k > 63 {
                return Err(INDEX_PAST_63.into());
            }
            keep_ac(coef, q, k, v, &mut rows, &mut maxcol)?;
            k += 1;
            continue;
        }
        // a code, or code and magnitude, longer than the lookahead
        match long_ac(&mut bits, act, &mut k)? {
            LongAc::End => break,
            LongAc::Zeros => {}
            LongAc::Coef(s) => {
                let v = bits.receive_extend(s);
                keep_ac(coef, q, k, v, &mut rows, &mut maxcol)?;
                k += 1;
            }
        }
    }
    if k > 64 {
        // a zero run (ZRL) past the block's end
        return Err(INDEX_PAST_63.into());
    }
    *reader = bits;
    Ok((rows, maxcol))
}

fn be16(b: &[u8], p: usize) -> Result<usize, String> {
    match (b.get(p), b.get(p + 1)) {
        (Some(&x), Some(&y)) => Ok(((x as usize) << 8) | y as usize),
        _ => Err("file ends inside a marker segment (truncated?)".into()),
    }
}

/// Ok(true): done; Ok(false): not applicable; Err: corrupt. `check_only`: decode the scan for
/// [`check_scan`], with the values of the blocks holding `cfg`'s crop, whatever its size and
/// filter, and write nothing.
fn decode(b: &[u8], cfg: &PrepConfig, out: &mut [f16], check_only: bool) -> Result<bool, String> {
    decode_as(b, cfg, out, check_only, false)
}

/// [`try_prep`] through [`Mode::Reduce`] also where [`Mode::Half`] applies (tests: the two
/// agree there).
#[cfg(test)]
pub(crate) fn try_prep_reduce(bytes: &[u8], cfg: &PrepConfig, out: &mut [f16]) -> Outcome {
    match decode_as(bytes, cfg, out, false, true) {
        Ok(true) => Outcome::Done,
        Ok(false) => Outcome::NotApplicable,
        Err(reason) => Outcome::Corrupt(reason),
    }
}

/// [`decode`]; `force_reduce`: [`Mode::Reduce`] for a crop of exactly `2·size` too.
fn decode_as(
    b: &[u8],
    cfg: &PrepConfig,
    out: &mut [f16],
    check_only: bool,
    force_reduce: bool,
) -> Result<bool, String> {
    if !check_only && cfg.filter != Filter::Area {
        return Ok(false);
    }
    let mut qt = [[0f32; 64]; 4];
    let mut qt_set = [false; 4];
    let mut dc: Vec<Option<Huffman>> = vec![None, None, None, None];
    let mut ac: Vec<Option<Huffman>> = vec![None, None, None, None];
    let mut comps: Vec<Component> = Vec::new();
    let (mut width, mut height) = (0usize, 0usize);
    let mut restart_interval = 0usize;
    let mut adobe = false;
    let mut baseline = false;
    let mut p = 2;
    // marker segments up to SOS
    let scan_start = loop {
        // skip fill bytes
        while b.get(p) == Some(&0xFF) && b.get(p + 1) == Some(&0xFF) {
            p += 1;
        }
        if p + 4 > b.len() {
            return Err("file ends before the image data (truncated?)".into());
        }
        if b[p] != 0xFF {
            return Err(format!("expected a marker at byte {p}, found {:02x}", b[p]));
        }
        let marker = b[p + 1];
        let len = be16(b, p + 2)?;
        let seg_start = p + 4;
        let seg_end = p + 2 + len;
        if len < 2 || seg_end > b.len() {
            return Err(format!(
                "marker {marker:02x} segment length {len} runs past the end (truncated?)"
            ));
        }
        let seg = &b[seg_start..seg_end];
        match marker {
            0xC0 | 0xC1 => {
                if seg.len() < 6 || seg[0] != 8 {
                    return Ok(false); // not 8-bit
                }
                baseline = marker == 0xC0;
                height = be16(seg, 1)?;
                width = be16(seg, 3)?;
                crate::check_dimensions(width, height)?;
                let n = seg[5] as usize;
                if seg.len() < 6 + 3 * n {
                    return Err("short frame header".into());
                }
                for i in 0..n {
                    let c = &seg[6 + 3 * i..9 + 3 * i];
                    // refused as jpeg-decoder refuses it (accepted here, a file's fate hung
                    // on the config)
                    if comps.iter().any(|k: &Component| k.id == c[0]) {
                        return Err(format!("duplicate frame component identifier {}", c[0]));
                    }
                    comps.push(Component {
                        id: c[0],
                        h: (c[1] >> 4) as usize,
                        v: (c[1] & 15) as usize,
                        tq: c[2] as usize,
                        td: 0,
                        ta: 0,
                    });
                }
            }
            0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return Ok(false), // progressive, lossless, arithmetic
            0xC4 => {
                let mut q = 0;
                while q < seg.len() {
                    let tc = seg[q] >> 4;
                    let th = (seg[q] & 15) as usize;
                    if q + 17 > seg.len() || th > 3 || tc > 1 {
                        return Err("bad Huffman table segment".into());
                    }
                    let mut counts = [0u8; 16];
                    counts.copy_from_slice(&seg[q + 1..q + 17]);
                    let total: usize = counts.iter().map(|&c| c as usize).sum();
                    if q + 17 + total > seg.len() || total > 256 {
                        return Err("bad Huffman table segment".into());
                    }
                    let t = Huffman::new(&counts, &seg[q + 17..q + 17 + total], tc == 1)?;
                    if tc == 0 {
                        dc[th] = Some(t);
                    } else {
                        ac[th] = Some(t);
                    }
                    q += 17 + total;
                }
            }
            0xDB => {
                let mut q = 0;
                while q < seg.len() {
                    let pq = seg[q] >> 4;
                    let tq = (seg[q] & 15) as usize;
                    let n = if pq == 0 { 64 } else { 128 };
                    if tq > 3 || pq > 1 || q + 1 + n > seg.len() {
                        return Err("bad quantisation table segment".into());
                    }
                    for k in 0..64 {
                        let v = if pq == 0 {
                            seg[q + 1 + k] as f32
                        } else {
                            be16(seg, q + 1 + 2 * k)? as f32
                        };
                        if v == 0.0 {
                            // (jpeg-decoder refuses it too: the same reason on both paths)
                            return Err("quantization table contains element with a zero value".into());
                        }
                        qt[tq][k] = v; // zigzag order
                    }
                    qt_set[tq] = true;
                    q += 1 + n;
                }
            }
            0xDD => restart_interval = be16(seg, 0)?,
            0xEE => adobe = true,
            0xDA => {
                let ns = *seg.first().ok_or("empty scan header")? as usize;
                if ns != comps.len() || seg.len() < 1 + 2 * ns + 3 {
                    return Ok(false); // non-interleaved multi-scan baseline: rare, generic path
                }
                for i in 0..ns {
                    let cid = seg[1 + 2 * i];
                    let t = seg[2 + 2 * i];
                    // an interleaved scan lists the frame's components in the frame's order
                    // (ITU T.81 B.2.3), as jpeg-decoder requires on the other path: a file
                    // accepted here and refused there was prepared or skipped by config
                    if comps[i].id != cid {
                        return Err(if comps.iter().any(|c| c.id == cid) {
                            "the scan's components are not in the frame's order (a repeated or misplaced identifier)"
                                .into()
                        } else {
                            "scan names an unknown component".into()
                        });
                    }
                    let c = &mut comps[i];
                    c.td = (t >> 4) as usize;
                    c.ta = (t & 15) as usize;
                }
                let (ss, se, a) = (seg[1 + 2 * ns], seg[2 + 2 * ns], seg[3 + 2 * ns]);
                if ss != 0 || se != 63 || a != 0 {
                    return Ok(false);
                }
                break seg_end;
            }
            0xD8 | 0xD9 => return Err("unexpected SOI/EOI before the image data".into()),
            _ => {} // APPn, COM, DNL…
        }
        p = seg_end;
    };

    // applicability
    if comps.is_empty() || width == 0 || height == 0 {
        return Err("no frame header before the scan".into());
    }
    // the colour transforms and sampling layouts this decoder turns into pixels; the scan check
    // reads every baseline layout (CMYK, RGB-coded, 4:1:1, …: jpeg-decoder decoded their
    // damaged data to a wrong picture without a word)
    if !check_only && (adobe || !(comps.len() == 1 || comps.len() == 3)) {
        return Ok(false);
    }
    if !check_only && comps.len() == 3 && comps.iter().map(|c| c.id).eq(*b"RGB") {
        return Ok(false);
    }
    if comps.len() > 4 {
        return Ok(false);
    }
    let crop = cfg.crop as usize;
    let size = cfg.size as usize;
    let r = REFERENCE_SIZE as usize;
    // the crop in pixels of this image along a side of `d`, when it is whole and its offset
    // even (so that it starts on a whole chroma sample)
    let crop_px = |d: usize| {
        let num = d * crop;
        (num % r == 0 && (d - num / r) % 4 == 0).then_some(num / r)
    };
    let mode = match (crop_px(width), crop_px(height)) {
        _ if check_only => Mode::Half,
        (Some(cw), Some(ch)) if cw == 2 * size && ch == 2 * size && !force_reduce => Mode::Half,
        // (only configs that reduce by more than 2× at the reference size: the rest keep the
        // bytes of `PrepConfig::version` 1, where other image sizes went to the generic path)
        (Some(cw), Some(ch)) if cw >= 2 * size && ch >= 2 * size && (cfg.version() >= 2 || force_reduce) => {
            Mode::Reduce { cw, ch }
        }
        _ => return Ok(false),
    };
    // sampling factors outside 1..=4 are invalid even for one component (checked before the
    // single-component scan's layout ignores them)
    if comps.iter().any(|c| c.h == 0 || c.v == 0 || c.h > 4 || c.v > 4) {
        return Err("invalid sampling factor in the frame header".into());
    }
    // an interleaved scan holds at most 10 blocks per MCU (T.81 B.2.3), and a baseline frame's
    // components use Huffman tables 0 and 1 only (as jpeg-decoder checks)
    if comps.len() > 1 && comps.iter().map(|c| c.h * c.v).sum::<usize>() > 10 {
        return Err("more than 10 blocks per MCU in an interleaved scan".into());
    }
    if baseline && comps.iter().any(|c| c.td > 1 || c.ta > 1) {
        return Err("a baseline scan uses a Huffman table above 1".into());
    }
    if comps.len() == 1 {
        comps[0].h = 1;
        comps[0].v = 1;
    }
    let hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
    let vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
    for c in &comps {
        if !check_only && !((hmax == c.h || hmax == 2 * c.h) && (vmax == c.v || vmax == 2 * c.v)) {
            return Ok(false);
        }
        if c.tq > 3 || !qt_set[c.tq] || c.td > 3 || c.ta > 3 || dc[c.td].is_none() || ac[c.ta].is_none() {
            return Err("scan uses an undefined quantisation or Huffman table".into());
        }
    }

    // A header can claim a huge image in a few bytes: before allocating a large crop at full
    // resolution, check the entropy-coded data without allocating (as the route through
    // `check_scan` to the generic path does), so a damaged file costs no gigabytes.
    if let Mode::Reduce { cw, ch } = mode {
        if !check_only && cw * ch > 1 << 22 {
            decode_as(b, cfg, out, true, false)?;
        }
    }
    // output window on the half-resolution grid
    let (hx0, hy0) = if check_only {
        (0, 0)
    } else {
        ((width - 2 * size) / 4, (height - 2 * size) / 4)
    };
    let m = matrices();
    let mcux = width.div_ceil(8 * hmax);
    let mcuy = height.div_ceil(8 * vmax);

    struct Plane {
        ox: usize, // output pixels per block, horizontally (4: box, 8: full)
        oy: usize,
        bx0: usize, // first needed block column
        bx1: usize, // one past the last
        by0: usize,
        by1: usize,
        stride: usize,
        data: Vec<f32>,
        /// [`Mode::Reduce`]: the crop on this plane's own sample grid, relative to `data`'s
        /// first sample: left, top, width, height (fractional for subsampled chroma of odd crops).
        window: [f64; 4],
    }
    let mut pool = if check_only {
        Vec::new()
    } else {
        SCRATCH.with(|sc| std::mem::take(&mut *sc.borrow_mut()))
    };
    // the planes, the RGB output, and for `Mode::Reduce` a reduced plane per component and the
    // resampling's row buffer
    pool.resize_with(2 * comps.len() + 2, Vec::new);
    let mut planes: Vec<Plane> = comps
        .iter()
        .zip(pool.iter_mut())
        .map(|(c, buf)| {
            let mut window = [0f64; 4];
            let (ox, oy, (bx0, bx1), (by0, by1)) = match mode {
                // the blocks holding the crop on this plane's grid are decoded with their
                // values (range-checked), as the paths that transform them do; nothing is kept
                // (no output pixels: an empty plane)
                _ if check_only => {
                    let (fx, fy) = (c.h as f64 / hmax as f64, c.v as f64 / vmax as f64);
                    let frac = crop as f64 / r as f64;
                    let span = |d: usize, f: f64| {
                        let (x0, w) = (d as f64 * (1.0 - frac) / 2.0 * f, d as f64 * frac * f);
                        ((x0 / 8.0).floor() as usize, ((x0 + w) / 8.0).ceil() as usize)
                    };
                    (0, 0, span(width, fx), span(height, fy))
                }
                Mode::Half => {
                    let ox = if c.h == hmax { 4 } else { 8 };
                    let oy = if c.v == vmax { 4 } else { 8 };
                    (
                        ox,
                        oy,
                        (hx0 / ox, (hx0 + size).div_ceil(ox)),
                        (hy0 / oy, (hy0 + size).div_ceil(oy)),
                    )
                }
                Mode::Reduce { cw, ch } => {
                    // every block at its own resolution; the window in this plane's samples
                    let (fx, fy) = (c.h as f64 / hmax as f64, c.v as f64 / vmax as f64);
                    let (x0, y0) = ((width - cw) as f64 / 2.0 * fx, (height - ch) as f64 / 2.0 * fy);
                    let (w, h) = (cw as f64 * fx, ch as f64 * fy);
                    let bx = ((x0 / 8.0).floor() as usize, ((x0 + w) / 8.0).ceil() as usize);
                    let by = ((y0 / 8.0).floor() as usize, ((y0 + h) / 8.0).ceil() as usize);
                    window = [x0 - (bx.0 * 8) as f64, y0 - (by.0 * 8) as f64, w, h];
                    (8, 8, bx, by)
                }
            };
            let stride = (bx1 - bx0) * ox;
            let mut data = std::mem::take(buf);
            data.clear();
            data.resize(stride * (by1 - by0) * oy, 0.0);
            #[cfg(test)]
            LARGEST_PLANE.with(|l| l.set(l.get().max(data.len())));
            Plane {
                ox,
                oy,
                bx0,
                bx1,
                by0,
                by1,
                stride,
                data,
                window,
            }
        })
        .collect();
    let mut bits = Bits::new(b, scan_start);
    let mut pred = [0i32; 4];
    let mut coef = [0f32; 64];
    let mut mcus_done = 0usize;
    let qz: Vec<[f32; 64]> = comps.iter().map(|c| qt[c.tq]).collect();
    // Every MCU row is entropy-decoded, those below the crop without keeping anything: baseline
    // JPEG cannot skip them (the crop's rows are done, but the rest of the scan is where
    // corruption shows: blocks that do not end where the data ends, out-of-range values).
    // the MCU's blocks in order (component by component, rows of blocks)
    let mut mcu_blocks = Vec::new();
    for (ci, c) in comps.iter().enumerate() {
        let blk = BlockCode {
            comp: ci,
            dc: dc[c.td].as_ref().ok_or("missing table")?,
            ac: ac[c.ta].as_ref().ok_or("missing table")?,
            q0: qz[ci][0],
        };
        for _ in 0..c.v * c.h {
            mcu_blocks.push(blk);
        }
    }
    for my in 0..mcuy {
        // the MCU columns with a block in the crop: none in rows above or below it
        let (mut kx0, mut kx1) = (usize::MAX, 0);
        for (c, pl) in comps.iter().zip(&planes) {
            if pl.bx0 < pl.bx1 && (my * c.v..(my + 1) * c.v).any(|by| by >= pl.by0 && by < pl.by1) {
                kx0 = kx0.min(pl.bx0 / c.h);
                kx1 = kx1.max((pl.bx1 - 1) / c.h + 1);
            }
        }
        for mx in 0..mcux {
            if restart_interval > 0 && mcus_done > 0 && mcus_done % restart_interval == 0 {
                bits = bits.restart(mcus_done / restart_interval - 1)?;
                pred = [0; 4];
            }
            mcus_done += 1;
            if mx < kx0 || mx >= kx1 {
                skip_blocks(&mut bits, &mcu_blocks, &mut pred)?;
                continue;
            }
            let mut bi = 0;
            for (ci, c) in comps.iter().enumerate() {
                let q = &qz[ci];
                for v in 0..c.v {
                    for h in 0..c.h {
                        let blk = &mcu_blocks[bi];
                        bi += 1;
                        let bx = mx * c.h + h;
                        let by = my * c.v + v;
                        let pl = &planes[ci];
                        let needed = bx >= pl.bx0 && bx < pl.bx1 && by >= pl.by0 && by < pl.by1;
                        if !needed {
                            skip_blocks(&mut bits, std::slice::from_ref(blk), &mut pred)?;
                            continue;
                        }
                        let (rows, maxcol) = decode_block(&mut bits, blk, &mut pred, q, &mut coef)?;
                        if check_only {
                            coef = [0.0; 64];
                            continue;
                        }
                        let pl = &mut planes[ci];
                        let x0 = (bx - pl.bx0) * pl.ox;
                        let y0 = (by - pl.by0) * pl.oy;
                        let (ox, oy, stride) = (pl.ox, pl.oy, pl.stride);
                        if rows == 1 && maxcol == 0 {
                            // DC only: constant block (½·½·1/√2·1/√2·8… = DC/8)
                            let val = coef[0] * 0.125 + 128.0;
                            for y in 0..oy {
                                pl.data[(y0 + y) * stride + x0..(y0 + y) * stride + x0 + ox].fill(val);
                            }
                            coef[0] = 0.0;
                            continue;
                        }
                        let ncol = maxcol + 1;
                        let dst = &mut pl.data[y0 * stride + x0..];
                        match (ox, oy) {
                            (4, 4) => transform::<4, 4>(&mut coef, rows, ncol, &m.half_t, &m.half, dst, stride),
                            (8, 8) => transform::<8, 8>(&mut coef, rows, ncol, &m.full_t, &m.full, dst, stride),
                            (8, 4) => transform::<8, 4>(&mut coef, rows, ncol, &m.full_t, &m.half, dst, stride),
                            _ => transform::<4, 8>(&mut coef, rows, ncol, &m.half_t, &m.full, dst, stride),
                        }
                    }
                }
            }
        }
        if bits.overrun() {
            return Err("entropy-coded data ends early (truncated or corrupt)".into());
        }
    }
    bits.segment_end()?;
    // an end-of-image marker after the scan (anything may follow it: MPF images, trailers)
    if !b[bits.pos.min(b.len())..].windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err("no end-of-image marker: truncated file".into());
    }
    if check_only {
        return Ok(true);
    }

    // colour conversion of the window into C×H×W f32, then one bulk (F16C) conversion
    let plane_len = size * size;
    let nc = comps.len();
    let mut rgb = std::mem::take(&mut pool[nc]);
    rgb.clear();
    rgb.resize(3 * plane_len, 0.0);
    // `Mode::Reduce`: each plane's window area-averaged to size × size first
    let mut reduced: Vec<Vec<f32>> = Vec::new();
    if let Mode::Reduce { .. } = mode {
        let mut rows = std::mem::take(&mut pool[2 * nc + 1]);
        for (pl, buf) in planes.iter().zip(&mut pool[nc + 1..2 * nc + 1]) {
            let [x0, y0, w, h] = pl.window;
            let wx = crate::generic::area_weights(x0, w, size, pl.stride);
            let wy = crate::generic::area_weights(y0, h, size, pl.data.len() / pl.stride);
            let mut dst = std::mem::take(buf);
            dst.clear();
            dst.resize(plane_len, 0.0);
            crate::generic::area_reduce(&pl.data, pl.stride, &wx, &wy, &mut rows, &mut dst);
            reduced.push(dst);
        }
        pool[2 * nc + 1] = rows;
    }
    impl Plane {
        /// Row `y` of the output window (origin `hx0, hy0` on the half-resolution grid).
        fn row(&self, hx0: usize, hy0: usize, y: usize, size: usize) -> &[f32] {
            let px = hx0 - self.bx0 * self.ox;
            let py = hy0 + y - self.by0 * self.oy;
            &self.data[py * self.stride + px..py * self.stride + px + size]
        }
    }
    let row = |pl: usize, y: usize| match mode {
        Mode::Reduce { .. } => &reduced[pl][y * size..(y + 1) * size],
        Mode::Half => planes[pl].row(hx0, hy0, y, size),
    };
    let inv = 1.0 / 255.0;
    if comps.len() == 1 {
        for y in 0..size {
            for (o, &v) in rgb[y * size..(y + 1) * size].iter_mut().zip(row(0, y)) {
                *o = (v * inv).clamp(0.0, 1.0);
            }
        }
        let (g, rest) = rgb.split_at_mut(plane_len);
        rest[..plane_len].copy_from_slice(g);
        rest[plane_len..].copy_from_slice(g);
    } else {
        let (rp, rest) = rgb.split_at_mut(plane_len);
        let (gp, bp) = rest.split_at_mut(plane_len);
        for y in 0..size {
            let (ys, cbs, crs) = (row(0, y), row(1, y), row(2, y));
            let o = y * size..(y + 1) * size;
            for ((((r, g), b), (&yy, &cb)), &cr) in rp[o.clone()]
                .iter_mut()
                .zip(&mut gp[o.clone()])
                .zip(&mut bp[o])
                .zip(ys.iter().zip(cbs))
                .zip(crs)
            {
                let (cb, cr) = (cb - 128.0, cr - 128.0);
                *r = ((yy + 1.402 * cr) * inv).clamp(0.0, 1.0);
                *g = ((yy - 0.344_136 * cb - 0.714_136 * cr) * inv).clamp(0.0, 1.0);
                *b = ((yy + 1.772 * cb) * inv).clamp(0.0, 1.0);
            }
        }
    }
    {
        use half::slice::HalfFloatSliceExt;
        out.convert_from_f32_slice(&rgb);
    }
    // hand the buffers back for the next image on this thread
    for (buf, pl) in pool.iter_mut().zip(planes) {
        *buf = pl.data;
    }
    pool[nc] = rgb;
    for (buf, r) in pool[nc + 1..2 * nc + 1].iter_mut().zip(reduced) {
        *buf = r;
    }
    SCRATCH.with(|sc| *sc.borrow_mut() = pool);
    Ok(true)
}
