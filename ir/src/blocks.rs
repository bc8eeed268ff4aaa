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

    /// Every element's `value`, in order, into `out` (`len()` values): the same
    /// arithmetic in branch-free loops the compiler vectorizes (the interpreter
    /// dequantizes every matrix this way on every product).
    #[inline]
    pub fn decode_into(&self, out: &mut [f32]) {
        let (lo, hi) = out.split_at_mut(self.packed.len());
        let d = self.d;
        match self.m {
            Some(m) => {
                for ((l, h), b) in lo.iter_mut().zip(hi.iter_mut()).zip(self.packed) {
                    *l = (b & 0x0F) as f32 * d + m;
                    *h = (b >> 4) as f32 * d + m;
                }
            }
            None => {
                for ((l, h), b) in lo.iter_mut().zip(hi.iter_mut()).zip(self.packed) {
                    *l = ((b & 0x0F) as i32 - 8) as f32 * d;
                    *h = ((b >> 4) as i32 - 8) as f32 * d;
                }
            }
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

    /// Every element's `value`, in order, into `out` (32 values).
    #[inline]
    pub fn decode_into(&self, out: &mut [f32]) {
        for (o, q) in out.iter_mut().zip(self.codes) {
            *o = (*q as i8) as f32 * self.d;
        }
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

/// Decodes one block of `dtype` (`dtype.block_bytes()` bytes) into `out`
/// (`dtype.block_len()` values).
pub type BlockDecoder = fn(&[u8], &mut [f32]);

/// The decoder of each import-only block type (K-quants, Q5_0/Q5_1, IQ4_NL/IQ4_XS), whose
/// values every backend takes as f32. Layouts follow ggml (`ggml-common.h`); tests check
/// them against gguf-py.
pub fn decoder(dtype: DType) -> Option<BlockDecoder> {
    Some(match dtype {
        DType::Q4K => decode_q4_k,
        DType::Q6K => decode_q6_k,
        DType::Q5_0 => decode_q5_0,
        DType::Q5_1 => decode_q5_1,
        DType::Q2K => decode_q2_k,
        DType::Q3K => decode_q3_k,
        DType::Q5K => decode_q5_k,
        DType::IQ4NL => decode_iq4_nl,
        DType::IQ4XS => decode_iq4_xs,
        _ => return None,
    })
}

/// 6-bit scale and minimum of sub-block j of a Q4_K/Q5_K super-block (llama.cpp's
/// get_scale_min_k4).
fn k4_scale_min(scales: &[u8], j: usize) -> (f32, f32) {
    if j < 4 {
        ((scales[j] & 63) as f32, (scales[j + 4] & 63) as f32)
    } else {
        (
            ((scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4)) as f32,
            ((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)) as f32,
        )
    }
}

/// f16 d, f16 dmin, 12 bytes of 6-bit scales/minimums, 128 bytes of nibbles: 8 sub-blocks
/// of 32, value = d * scale * q - dmin * min.
fn decode_q4_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for chunk in 0..4 {
        let (s1, m1) = k4_scale_min(scales, 2 * chunk);
        let (s2, m2) = k4_scale_min(scales, 2 * chunk + 1);
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let y = &mut o[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            y[l] = d * s1 * (q[l] & 0x0F) as f32 - dmin * m1;
            y[32 + l] = d * s2 * (q[l] >> 4) as f32 - dmin * m2;
        }
    }
}

/// 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 i8 scales, f16 d: value =
/// d * scale * (q - 32).
fn decode_q6_k(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[half * 64..half * 64 + 64];
        let qh = &b[128 + half * 32..128 + half * 32 + 32];
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        let y = &mut o[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// The 5-bit codes of a Q5_0/Q5_1 block: element j's low nibble from byte j (j < 16) or
/// the high nibble of byte j - 16, its fifth bit from bit j of the little-endian u32 `qh`.
fn q5_codes(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    std::array::from_fn(|j| {
        let low = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
        low | ((((high >> j) & 1) as u8) << 4)
    })
}

/// f16 d, u32 high bits, 16 bytes of nibbles: value = (q - 16) * d.
fn decode_q5_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (v, q) in o.iter_mut().zip(q5_codes(&b[2..6], &b[6..22])) {
        *v = d * (q as i32 - 16) as f32;
    }
}

/// f16 d, f16 m, u32 high bits, 16 bytes of nibbles: value = q * d + m.
fn decode_q5_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (v, q) in o.iter_mut().zip(q5_codes(&b[4..8], &b[8..24])) {
        *v = d * q as f32 + m;
    }
}

/// 16 bytes of 4-bit scale/min pairs, 64 bytes of 2-bit codes, f16 d, f16 dmin: 16
/// groups of 16, value = d * scale * q - dmin * min.
fn decode_q2_k(b: &[u8], o: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (e, v) in o.iter_mut().enumerate() {
        let (chunk, shift, l) = (e / 128, 2 * ((e % 128) / 32), e % 32);
        let q = (qs[chunk * 32 + l] >> shift) & 3;
        let g = scales[e / 16];
        *v = (d * (g & 0x0F) as f32) * q as f32 - dmin * (g >> 4) as f32;
    }
}

/// 32 bytes of high-bit masks, 64 bytes of 2-bit codes, 12 bytes of 6-bit scales, f16 d:
/// value = d * (scale - 32) * (q - 4 when the mask bit is clear).
fn decode_q3_k(b: &[u8], o: &mut [f32]) {
    let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    let scale = |i: usize| -> f32 {
        let low = if i < 8 { scales[i] & 0x0F } else { scales[i - 8] >> 4 };
        let high = (scales[8 + i % 4] >> (2 * (i / 4))) & 3;
        ((low | (high << 4)) as i32 - 32) as f32
    };
    for (e, v) in o.iter_mut().enumerate() {
        let (chunk, shift, l) = (e / 128, 2 * ((e % 128) / 32), e % 32);
        let low = ((qs[chunk * 32 + l] >> shift) & 3) as i32;
        let high_clear = (hmask[l] >> (e / 32)) & 1 == 0;
        let q = low - if high_clear { 4 } else { 0 };
        *v = (d * scale(e / 16)) * q as f32;
    }
}

/// f16 d, f16 dmin, 12 bytes of 6-bit scales/minimums, 32 bytes of fifth bits, 128 bytes
/// of nibbles: 8 sub-blocks of 32, value = d * scale * q - dmin * min.
fn decode_q5_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (e, v) in o.iter_mut().enumerate() {
        let (sub, l) = (e / 32, e % 32);
        let low = (qs[(e / 64) * 32 + l] >> (4 * (sub % 2))) & 0x0F;
        let q = low | (((qh[l] >> sub) & 1) << 4);
        let (sc, m) = k4_scale_min(scales, sub);
        *v = (d * sc) * q as f32 - dmin * m;
    }
}

/// IQ4's non-linear code book (ggml's kvalues_iq4nl).
const IQ4_VALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// f16 d, 16 bytes of nibbles (element j low in byte j, j + 16 high): value = d * table[q].
fn decode_iq4_nl(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, v) in o.iter_mut().enumerate() {
        let q = if j < 16 { b[2 + j] & 0x0F } else { b[2 + j - 16] >> 4 };
        *v = d * IQ4_VALUES[q as usize] as f32;
    }
}

/// f16 d, u16 of high scale bits, 4 bytes of low scale nibbles, 128 bytes of nibbles: 8
/// sub-blocks of 32 laid out as IQ4_NL blocks, value = d * (scale - 32) * table[q].
fn decode_iq4_xs(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let (scales_l, qs) = (&b[4..8], &b[8..136]);
    for (sub, y) in o.chunks_exact_mut(32).enumerate() {
        let low = (scales_l[sub / 2] >> (4 * (sub % 2))) & 0x0F;
        let high = ((scales_h >> (2 * sub)) & 3) as u8;
        let dl = d * ((low | (high << 4)) as i32 - 32) as f32;
        let q = &qs[sub * 16..sub * 16 + 16];
        for (j, v) in y.iter_mut().enumerate() {
            let code = if j < 16 { q[j] & 0x0F } else { q[j - 16] >> 4 };
            *v = dl * IQ4_VALUES[code as usize] as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of `blocks` blocks of `dtype` from a fixed generator, scales kept finite.
    fn blocks(dtype: DType, blocks: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut bytes: Vec<u8> = (0..blocks * dtype.block_bytes())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let scale_bytes = if dtype == DType::Q8_0 || dtype.q4_has_min() == Some(false) { 2 } else { 4 };
        for b in bytes.chunks_exact_mut(dtype.block_bytes()) {
            for h in b[..scale_bytes].chunks_exact_mut(2) {
                h[1] &= 0x3b; // an f16 exponent below the maximum: finite
            }
        }
        bytes
    }

    #[test]
    fn decode_into_gives_every_value_bit_for_bit() {
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q4_0G64, DType::Q4_1G64, DType::Q4_0G128, DType::Q4_1G128] {
            let bytes = blocks(dtype, 5);
            for b in q4_blocks(dtype, &bytes) {
                let mut out = vec![0.0f32; b.len()];
                b.decode_into(&mut out);
                assert!(out.iter().enumerate().all(|(j, v)| v.to_bits() == b.value(j).to_bits()), "{dtype}");
            }
        }
        let bytes = blocks(DType::Q8_0, 5);
        for b in q8_blocks(&bytes) {
            let mut out = [0.0f32; 32];
            b.decode_into(&mut out);
            assert!(out.iter().enumerate().all(|(j, v)| v.to_bits() == b.value(j).to_bits()));
        }
    }
}
