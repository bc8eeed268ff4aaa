//! The ggml block codecs: one parser per block type, used by the interpreter's
//! dequantization and by every backend's re-layout (GPU scale/code planes, ONNX
//! MatMulNBits/GatherBlockQuantized, Core ML blockwise constants), so a block's layout is
//! written once. K-quant blocks are only dequantized (`dtype::dequantize_into`).

use crate::dtype::{f16_at, DType};

/// One 4-bit block (Q4_0 / Q4_1 and their 64- and 128-element variants): value j is
/// `code(j) * d + m` with a minimum, `(code(j) - 8) * d` without.
#[derive(Clone, Copy, Debug)]
pub struct Q4Block<'a> {
    pub d: f32,
    /// The block minimum (Q4_1 family); `None` for the symmetric Q4_0 family.
    pub m: Option<f32>,
    /// `len / 2` bytes: element j in the low nibble of byte j, element j + len/2 in its
    /// high nibble.
    pub packed: &'a [u8],
}

impl Q4Block<'_> {
    /// Elements in the block.
    pub fn len(&self) -> usize {
        2 * self.packed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packed.is_empty()
    }

    /// The 4-bit code (0..=15) of element `j`.
    pub fn code(&self, j: usize) -> u8 {
        let half = self.packed.len();
        if j < half {
            self.packed[j] & 0x0F
        } else {
            self.packed[j - half] >> 4
        }
    }

    /// Element `j`'s value in f32 (the reference every re-layout must reproduce).
    pub fn value(&self, j: usize) -> f32 {
        match self.m {
            Some(m) => self.code(j) as f32 * self.d + m,
            None => (self.code(j) as i32 - 8) as f32 * self.d,
        }
    }
}

/// The 4-bit blocks of `bytes` (a whole number of `dtype` blocks; `dtype` one of the Q4
/// types, see [`DType::q4_has_min`]).
pub fn q4_blocks(dtype: DType, bytes: &[u8]) -> impl Iterator<Item = Q4Block<'_>> {
    let has_min = dtype.q4_has_min() == Some(true);
    let data_at = if has_min { 4 } else { 2 };
    let half = dtype.block_len() / 2;
    bytes.chunks_exact(dtype.block_bytes()).map(move |b| Q4Block {
        d: f16_at(b, 0),
        m: has_min.then(|| f16_at(b, 2)),
        packed: &b[data_at..data_at + half],
    })
}

/// One Q8_0 block: value j is `codes[j] as i8 * d`.
#[derive(Clone, Copy, Debug)]
pub struct Q8Block<'a> {
    pub d: f32,
    /// 32 two's-complement int8 codes, as stored.
    pub codes: &'a [u8],
}

impl<'a> Q8Block<'a> {
    pub fn value(&self, j: usize) -> f32 {
        (self.codes[j] as i8) as f32 * self.d
    }

    /// The codes as uint8 with zero point 128 (`d (c - 128) = d q` exactly), as ONNX's
    /// MatMulNBits and Core ML's uint8 constants read them.
    pub fn uint8_codes(self) -> impl Iterator<Item = u8> + 'a {
        self.codes.iter().map(|q| (*q as i8 as i16 + 128) as u8)
    }
}

/// The Q8_0 blocks of `bytes` (a whole number of blocks).
pub fn q8_blocks(bytes: &[u8]) -> impl Iterator<Item = Q8Block<'_>> {
    let n = DType::Q8_0.block_bytes();
    bytes.chunks_exact(n).map(move |b| Q8Block { d: f16_at(b, 0), codes: &b[2..n] })
}
