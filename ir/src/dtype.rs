//! Element types, including packed block-quantized weight types.
//!
//! Quantized types pack along the last (fastest-varying) dimension in blocks of
//! `block_len()` elements; a row's length must be a multiple of it.

use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    /// GGUF Q8_0: blocks of 32, an f16 scale then 32 i8 values.
    Q8_0,
    /// GGUF Q4_0: blocks of 32, an f16 scale then 16 bytes; value = (nibble - 8) * d.
    Q4_0,
    /// GGUF Q4_1: blocks of 32, f16 scale d, f16 minimum m, 16 bytes; value = nibble * d + m.
    Q4_1,
    /// Q4_0's layout with groups of 64 / 128 (element j and j + g/2 share byte j).
    Q4_0G64,
    Q4_0G128,
    /// Q4_1's layout with groups of 64 / 128.
    Q4_1G64,
    Q4_1G128,
    /// GGUF Q4_K: super-blocks of 256 (f16 d, f16 dmin, 12 bytes of 6-bit scales and
    /// minimums for 8 sub-blocks of 32, 128 bytes of nibbles). Import only.
    Q4K,
    /// GGUF Q6_K: super-blocks of 256 (128 bytes low nibbles, 64 bytes high bits, 16 i8
    /// scales, f16 d). Import only.
    Q6K,
    /// GGUF Q5_0 / Q5_1: blocks of 32 with a fifth bit per element in a u32. Import only.
    Q5_0,
    Q5_1,
    /// GGUF Q2_K / Q3_K / Q5_K: super-blocks of 256. Import only.
    Q2K,
    Q3K,
    Q5K,
    /// GGUF IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256): 4-bit indices into a
    /// fixed non-linear table. Import only.
    IQ4NL,
    IQ4XS,
}

pub const ALL_DTYPES: [DType; 20] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::I32,
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q4_0G64,
    DType::Q4_0G128,
    DType::Q4_1G64,
    DType::Q4_1G128,
    DType::Q4K,
    DType::Q6K,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q2K,
    DType::Q3K,
    DType::Q5K,
    DType::IQ4NL,
    DType::IQ4XS,
];

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q4_0G64 => "q4_0g64",
            DType::Q4_0G128 => "q4_0g128",
            DType::Q4_1G64 => "q4_1g64",
            DType::Q4_1G128 => "q4_1g128",
            DType::Q4K => "q4_k",
            DType::Q6K => "q6_k",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q2K => "q2_k",
            DType::Q3K => "q3_k",
            DType::Q5K => "q5_k",
            DType::IQ4NL => "iq4_nl",
            DType::IQ4XS => "iq4_xs",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        ALL_DTYPES.into_iter().find(|d| d.name() == name)
    }

    /// Elements per packed block (1 for plain types).
    pub fn block_len(self) -> usize {
        match self {
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4NL => 32,
            DType::Q4_0G64 | DType::Q4_1G64 => 64,
            DType::Q4_0G128 | DType::Q4_1G128 => 128,
            DType::Q4K | DType::Q6K | DType::Q2K | DType::Q3K | DType::Q5K | DType::IQ4XS => 256,
            _ => 1,
        }
    }

    /// For 4-bit types: whether blocks carry a minimum (asymmetric) besides the scale.
    pub fn q4_has_min(self) -> Option<bool> {
        match self {
            DType::Q4_0 | DType::Q4_0G64 | DType::Q4_0G128 => Some(false),
            DType::Q4_1 | DType::Q4_1G64 | DType::Q4_1G128 => Some(true),
            _ => None,
        }
    }

    /// Bytes per packed block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 | DType::Q4_0G64 | DType::Q4_0G128 => 2 + self.block_len() / 2,
            DType::Q4_1 | DType::Q4_1G64 | DType::Q4_1G128 => 4 + self.block_len() / 2,
            DType::Q4K => 144,
            DType::Q6K => 210,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q2K => 84,
            DType::Q3K => 110,
            DType::Q5K => 176,
            DType::IQ4NL => 18,
            DType::IQ4XS => 136,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    pub fn is_float(self) -> bool {
        !matches!(self, DType::I32)
    }

    /// Storage bytes for `n` elements, or `None` when `n` is not a whole number of
    /// blocks or the product overflows.
    pub fn storage_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The little-endian f16 at byte `at`, as f32. Through a table of every f16's value
/// (256 KiB, built once from `half`'s conversion, so the same bits): block scales are
/// converted once per 32 weights on every product the interpreter runs, and a table
/// lookup costs a fraction of a conversion call.
pub fn f16_at(bytes: &[u8], at: usize) -> f32 {
    static TABLE: std::sync::OnceLock<Box<[f32]>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| (0..=u16::MAX).map(|bits| f16::from_bits(bits).to_f32()).collect());
    table[u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize]
}

/// Dequantizes `bytes` (exactly `storage_bytes(out.len())` long) of type `dtype` into `out`.
///
/// Panics only on a caller bug (length mismatch); importers check sizes against the file first.
pub fn dequantize_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(Some(bytes.len()), dtype.storage_bytes(out.len()), "dequantize_into: size mismatch");
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::I32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32;
            }
        }
        DType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(crate::blocks::q8_blocks(bytes)) {
                b.decode_into(o);
            }
        }
        DType::Q4_0 | DType::Q4_0G64 | DType::Q4_0G128 | DType::Q4_1 | DType::Q4_1G64 | DType::Q4_1G128 => {
            for (o, b) in out.chunks_exact_mut(dtype.block_len()).zip(crate::blocks::q4_blocks(dtype, bytes)) {
                b.decode_into(o);
            }
        }
        DType::Q4K
        | DType::Q6K
        | DType::Q5_0
        | DType::Q5_1
        | DType::Q2K
        | DType::Q3K
        | DType::Q5K
        | DType::IQ4NL
        | DType::IQ4XS => {
            let decode = crate::blocks::decoder(dtype).expect("a decoder for every block type");
            for (o, b) in out.chunks_exact_mut(dtype.block_len()).zip(bytes.chunks_exact(dtype.block_bytes())) {
                decode(b, o);
            }
        }
    }
}

/// Packs one row of 4-bit codes (0..=15) with per-group scales (and minimums for the
/// asymmetric types) into `dtype`'s block layout. `codes.len()` is a multiple of the group.
pub fn pack_q4(dtype: DType, codes: &[u8], scales: &[f16], mins: Option<&[f16]>, out: &mut Vec<u8>) {
    let g = dtype.block_len();
    let half = g / 2;
    for (i, group) in codes.chunks_exact(g).enumerate() {
        out.extend_from_slice(&scales[i].to_le_bytes());
        if let Some(m) = mins {
            out.extend_from_slice(&m[i].to_le_bytes());
        }
        for j in 0..half {
            out.push((group[j] & 0x0F) | (group[j + half] << 4));
        }
    }
}

/// Packs one row as Q8_0: per block of 32, an f16 scale max|w|/127 and rounded i8 values.
pub fn pack_q8_0(row: &[f32], out: &mut Vec<u8>) {
    for block in row.chunks_exact(32) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / 127.0);
        let inv = if d.to_f32() > 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        out.extend_from_slice(&d.to_le_bytes());
        for v in block {
            out.push(((v * inv).round().clamp(-127.0, 127.0) as i8) as u8);
        }
    }
}

/// Encodes f32 values as `dtype` (plain float types only; used by converters).
pub fn encode_float(dtype: DType, values: &[f32]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * dtype.block_bytes());
    match dtype {
        DType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => values.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_decodes_low_nibbles_first() {
        let mut block = vec![0u8; 20];
        block[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        block[4] = 0x31; // element 0 -> 1, element 16 -> 3
        let mut out = vec![0.0; 32];
        dequantize_into(DType::Q4_1, &block, &mut out);
        assert_eq!(out[0], -0.5);
        assert_eq!(out[16], 0.5);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn q4_0_and_q8_0_are_signed() {
        let mut block = vec![0u8; 18];
        block[0..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        block[2] = 0x0F;
        let mut out = vec![0.0; 32];
        dequantize_into(DType::Q4_0, &block, &mut out);
        assert_eq!(out[0], 14.0);
        assert_eq!(out[16], -16.0);
        let mut block = vec![0u8; 34];
        block[0..2].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        block[2] = (-4i8) as u8;
        dequantize_into(DType::Q8_0, &block, &mut out);
        assert_eq!(out[0], -1.0);
    }

    #[test]
    fn q4_pack_round_trips_every_group_size() {
        for dtype in [DType::Q4_0, DType::Q4_0G64, DType::Q4_0G128, DType::Q4_1, DType::Q4_1G64, DType::Q4_1G128] {
            let g = dtype.block_len();
            let codes: Vec<u8> = (0..2 * g).map(|i| (i * 7 % 16) as u8).collect();
            let scales = [f16::from_f32(0.5), f16::from_f32(0.25)];
            let mins = [f16::from_f32(-1.0), f16::from_f32(2.0)];
            let has_min = dtype.q4_has_min().unwrap();
            let mut packed = Vec::new();
            pack_q4(dtype, &codes, &scales, has_min.then_some(&mins[..]), &mut packed);
            assert_eq!(Some(packed.len()), dtype.storage_bytes(2 * g));
            let mut out = vec![0.0; 2 * g];
            dequantize_into(dtype, &packed, &mut out);
            for (i, v) in out.iter().enumerate() {
                let (d, m) = (scales[i / g].to_f32(), mins[i / g].to_f32());
                let q = codes[i] as f32;
                let want = if has_min { q * d + m } else { (q - 8.0) * d };
                assert_eq!(*v, want, "{dtype} element {i}");
            }
        }
    }

    #[test]
    fn storage_bytes_rejects_partial_blocks() {
        assert_eq!(DType::Q4_1.storage_bytes(64), Some(40));
        assert_eq!(DType::Q4_1.storage_bytes(33), None);
        assert_eq!(DType::F32.storage_bytes(usize::MAX), None);
    }
}
