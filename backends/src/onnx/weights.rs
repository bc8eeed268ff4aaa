//! Weights in the ONNX model: MatMulNBits from ggml 4- and 8-bit blocks (exact), the
//! tied table gathered from the codes the head reads, f32 initializers otherwise.

use slmc_ir::{DType, NodeId};

use super::proto::{attr_int, data_type};
use super::*;

impl<'a> Builder<'a> {
    /// `y = x w^T` for a weight `[n, k]`: MatMulNBits for 4- and 8-bit blocks, MatMul with
    /// the transposed f32 weight otherwise.
    pub(super) fn matmul(&mut self, x: &str, w: NodeId, out: &str) -> Result<(), OnnxError> {
        let (name, view) = self.weight_view(w)?;
        let [n, k] = view.shape[..] else {
            return Err(self.err(w, "a linear weight must be a matrix"));
        };
        let dtype = view.dtype;
        if self.q8_matmul_nbits(w) {
            let (codes, scales) = self.q8_codes(w)?;
            let attrs = vec![
                attr_int("K", k as i64),
                attr_int("N", n as i64),
                attr_int("bits", 8),
                attr_int("block_size", 32),
                attr_int("accuracy_level", self.accuracy_level_of(w)),
            ];
            self.node("MatMulNBits", "com.microsoft", &[x, &codes, &scales], &[out], attrs);
            return Ok(());
        }
        let nbits = match dtype {
            DType::Q4_0 | DType::Q4_0G64 | DType::Q4_0G128 | DType::Q4_1 | DType::Q4_1G64 | DType::Q4_1G128 => 4,
            _ => 0,
        };
        if nbits == 0 {
            // f32 (any other stored type is dequantized): Gemm with transB on the [n, k]
            // table itself, so a tied embedding/LM head is stored once for Gather and Gemm.
            // (MatMulNBits with 8 bits, and with float zero points, ran on ONNX Runtime's
            // slow dequantize-every-call path here.)
            let t = self.f32_initializer(w)?;
            let s2 = self.inline_i64("shape", &[-1, k as i64], false);
            let flat = self.fresh(&format!("{out}/rows"));
            self.node("Reshape", "", &[x, &s2], &[&flat], vec![]);
            let y = self.fresh(&format!("{out}/gemm"));
            self.node("Gemm", "", &[&flat, &t], &[&y], vec![attr_int("transB", 1)]);
            let s3 = self.inline_i64("shape", &[1, -1, n as i64], false);
            self.node("Reshape", "", &[&y, &s3], &[out], vec![]);
            return Ok(());
        }
        if self.opts.profile == OnnxProfile::Portable {
            return self.dequantize_matmul(x, w, out);
        }
        let key = (w, "matmul");
        let group = dtype.block_len();
        let blocks_per_row = k / group;
        let (b_name, s_name, c_name) = (format!("{name}.q"), format!("{name}.scales"), format!("{name}.block_offsets"));
        let has_min = dtype.q4_has_min() == Some(true);
        if !self.written.contains_key(&key) {
            let (codes, scales, offsets) = matmul_nbits_blocks(dtype, view.bytes, n * blocks_per_row);
            self.external(
                &b_name,
                data_type::UINT8,
                &[n as i64, blocks_per_row as i64, (group * nbits / 8) as i64],
                &codes,
            );
            let sb: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.external(&s_name, data_type::FLOAT, &[(n * blocks_per_row) as i64], &sb);
            if has_min {
                // [blocks, n] for MatMul.
                let mut tr = vec![0.0f32; offsets.len()];
                for r in 0..n {
                    for b in 0..blocks_per_row {
                        tr[b * n + r] = offsets[r * blocks_per_row + b];
                    }
                }
                let cb: Vec<u8> = tr.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.external(&c_name, data_type::FLOAT, &[blocks_per_row as i64, n as i64], &cb);
            }
            self.written.insert(key, b_name.clone());
        }
        let attrs = vec![
            attr_int("K", k as i64),
            attr_int("N", n as i64),
            attr_int("bits", nbits as i64),
            attr_int("block_size", group as i64),
            attr_int("accuracy_level", self.accuracy_level_of(w)),
        ];
        if !has_min {
            self.node("MatMulNBits", "com.microsoft", &[x, &b_name, &s_name], &[out], attrs);
            return Ok(());
        }
        // value = d q + m = d (q - 8) + (m + 8 d): symmetric MatMulNBits (default zero point 8)
        // plus each block's offset c = m + 8 d times the sum of x over that block, so the
        // 4-bit kernel stays on ONNX Runtime's fast path (float zero points leave it).
        let main = self.fresh(&format!("{out}/nbits"));
        self.node("MatMulNBits", "com.microsoft", &[x, &b_name, &s_name], &[&main], attrs);
        self.add_block_offsets(x, &main, &c_name, (blocks_per_row, group), out);
        Ok(())
    }

    pub(super) fn accuracy_level_of(&self, w: NodeId) -> i64 {
        if Some(w) == self.head_weight {
            self.opts.head_accuracy_level
        } else {
            self.opts.accuracy_level
        }
    }

    /// Whether 8-bit blocks of `w` run as 8-bit MatMulNBits: only with int8 activations
    /// (ONNX Runtime 1.31's 8-bit kernel on f32 activations dequantizes every call, 30x slower
    /// than an f32 Gemm here).
    pub(super) fn q8_matmul_nbits(&self, w: NodeId) -> bool {
        self.opts.profile == OnnxProfile::OrtContrib
            && self.accuracy_level_of(w) == 4
            && matches!(self.weight_view(w), Ok((_, v)) if v.dtype == DType::Q8_0 && v.shape.len() == 2)
    }

    /// Q8_0 blocks of a `[n, k]` weight as MatMulNBits' 8-bit `[n, k / 32, 32]` codes (the
    /// int8 values + 128, read with the default zero point 128) and f32 scales `[n k / 32]`,
    /// written once. Exact: each value is d (c - 128) = d q.
    pub(super) fn q8_codes(&mut self, w: NodeId) -> Result<(String, String), OnnxError> {
        let (name, view) = self.weight_view(w)?;
        let (codes_name, scales_name) = (format!("{name}.q8"), format!("{name}.q8_scales"));
        if !self.written.contains_key(&(w, "q8")) {
            let [n, k] = view.shape[..] else {
                return Err(self.err(w, "8-bit blocks need a matrix"));
            };
            let codes: Vec<u8> = slmc_ir::blocks::q8_blocks(view.bytes).flat_map(|b| b.uint8_codes()).collect();
            self.external(&codes_name, data_type::UINT8, &[n as i64, (k / 32) as i64, 32], &codes);
            self.external(&scales_name, data_type::FLOAT, &[(n * k / 32) as i64], &q8_scales_le(view.bytes));
            self.written.insert((w, "q8"), codes_name.clone());
        }
        Ok((codes_name, scales_name))
    }

    /// Embedding rows gathered from the 8-bit codes MatMulNBits reads for the tied LM head
    /// (GatherBlockQuantized over `[n, k / 32, 32]`, scales `[n, k / 32, 1]`), so the table
    /// is stored once, in 8 bits. Exact, like the Q8_0 dequantization.
    pub(super) fn gather_q8(&mut self, table: NodeId, ids: &str, out: &str) -> Result<(), OnnxError> {
        let (name, view) = self.weight_view(table)?;
        let [n, k] = view.shape[..] else {
            return Err(self.err(table, "an embedding table must be a matrix"));
        };
        let (codes, _) = self.q8_codes(table)?;
        let scales = format!("{name}.q8_gather_scales");
        if !self.written.contains_key(&(table, "q8_gather")) {
            self.external(&scales, data_type::FLOAT, &[n as i64, (k / 32) as i64, 1], &q8_scales_le(view.bytes));
            self.written.insert((table, "q8_gather"), scales.clone());
        }
        let blocks = self.fresh(&format!("{out}/blocks"));
        let attrs = vec![
            attr_int("gather_axis", 0),
            attr_int("quantize_axis", 2),
            attr_int("block_size", 32),
            attr_int("bits", 8),
        ];
        self.node("GatherBlockQuantized", "com.microsoft", &[&codes, ids, &scales], &[&blocks], attrs);
        let shape = self.inline_i64("shape", &[0, -1, k as i64], false);
        self.node("Reshape", "", &[&blocks, &shape], &[out], vec![]);
        Ok(())
    }

    /// `out = main + blocksum(x) @ offsets` with `offsets` `[blocks, n]`: the per-block
    /// constant part of asymmetric 4-bit blocks.
    pub(super) fn add_block_offsets(
        &mut self,
        x: &str,
        main: &str,
        c_name: &str,
        (blocks_per_row, group): (usize, usize),
        out: &str,
    ) {
        let blocked_shape = self.inline_i64("shape", &[0, 0, blocks_per_row as i64, group as i64], false);
        let blocked = self.fresh(&format!("{out}/blocks"));
        self.node("Reshape", "", &[x, &blocked_shape], &[&blocked], vec![]);
        let axes = self.inline_i64("axes", &[-1], false);
        let sums = self.fresh(&format!("{out}/block_sums"));
        self.node("ReduceSum", "", &[&blocked, &axes], &[&sums], vec![attr_int("keepdims", 0)]);
        let correction = self.fresh(&format!("{out}/offsets"));
        self.node("MatMul", "", &[&sums, c_name], &[&correction], vec![]);
        self.node("Add", "", &[main, &correction], &[out], vec![]);
    }

    /// Standard-ops 4-bit linear: the codes as a uint4 `[k, n]` initializer, blocked
    /// DequantizeLinear (axis 0, zero point 8, opset 21) and MatMul, a pattern ONNX Runtime
    /// fuses into its 4-bit kernel; blocks with a minimum add the per-block offset term.
    pub(super) fn dequantize_matmul(&mut self, x: &str, w: NodeId, out: &str) -> Result<(), OnnxError> {
        let (name, view) = self.weight_view(w)?;
        let [n, k] = view.shape[..] else {
            return Err(self.err(w, "a linear weight must be a matrix"));
        };
        let dtype = view.dtype;
        let group = dtype.block_len();
        let blocks_per_row = k / group;
        let has_min = dtype.q4_has_min() == Some(true);
        let (q_name, s_name, z_name, c_name) = (
            format!("{name}.q4"),
            format!("{name}.scales"),
            format!("{name}.zero_points"),
            format!("{name}.block_offsets"),
        );
        let key = (w, "dequantize");
        if !self.written.contains_key(&key) {
            let (codes, scales, offsets) = matmul_nbits_blocks(dtype, view.bytes, n * blocks_per_row);
            // codes: row r, element j at byte (r * k + j) / 2, low nibble when j is even.
            let nibble = |r: usize, j: usize| (codes[(r * k + j) / 2] >> (4 * (j % 2))) & 0xf;
            let mut packed = vec![0u8; (k * n).div_ceil(2)];
            for j in 0..k {
                for r in 0..n {
                    let e = j * n + r;
                    packed[e / 2] |= nibble(r, j) << (4 * (e % 2));
                }
            }
            self.external(&q_name, data_type::UINT4, &[k as i64, n as i64], &packed);
            let mut sc = vec![0.0f32; blocks_per_row * n];
            let mut off = vec![0.0f32; if has_min { blocks_per_row * n } else { 0 }];
            for r in 0..n {
                for b in 0..blocks_per_row {
                    sc[b * n + r] = scales[r * blocks_per_row + b];
                    if has_min {
                        off[b * n + r] = offsets[r * blocks_per_row + b];
                    }
                }
            }
            let sb: Vec<u8> = sc.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.external(&s_name, data_type::FLOAT, &[blocks_per_row as i64, n as i64], &sb);
            let zeros = vec![0x88u8; (blocks_per_row * n).div_ceil(2)];
            self.external(&z_name, data_type::UINT4, &[blocks_per_row as i64, n as i64], &zeros);
            if has_min {
                let cb: Vec<u8> = off.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.external(&c_name, data_type::FLOAT, &[blocks_per_row as i64, n as i64], &cb);
            }
            self.written.insert(key, q_name.clone());
        }
        let weight = self.fresh(&format!("{out}/weight"));
        self.node(
            "DequantizeLinear",
            "",
            &[&q_name, &s_name, &z_name],
            &[&weight],
            vec![attr_int("axis", 0), attr_int("block_size", group as i64)],
        );
        if !has_min {
            self.node("MatMul", "", &[x, &weight], &[out], vec![]);
            return Ok(());
        }
        let main = self.fresh(&format!("{out}/main"));
        self.node("MatMul", "", &[x, &weight], &[&main], vec![]);
        self.add_block_offsets(x, &main, &c_name, (blocks_per_row, group), out);
        Ok(())
    }
}

/// The f16 scale of every Q8_0 block as little-endian f32 (MatMulNBits and
/// GatherBlockQuantized each need them in their own shape).
pub(super) fn q8_scales_le(bytes: &[u8]) -> Vec<u8> {
    slmc_ir::blocks::q8_blocks(bytes).flat_map(|b| b.d.to_le_bytes()).collect()
}

/// MatMulNBits blocks from ggml 4-bit blocks: codes with element 2i in the low nibble of
/// byte i (ggml puts element i low and i + g/2 high) and f32 scales d, read with the default
/// zero point 8. For blocks with a minimum (value = d q + m) also the block offset m + 8 d,
/// since d q + m = d (q - 8) + (m + 8 d).
pub(super) fn matmul_nbits_blocks(dtype: DType, bytes: &[u8], blocks: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let g = dtype.block_len();
    let mut codes = Vec::with_capacity(blocks * g / 2);
    let mut scales = Vec::with_capacity(blocks);
    let mut offsets = Vec::new();
    for b in slmc_ir::blocks::q4_blocks(dtype, bytes) {
        if let Some(m) = b.m {
            offsets.push(m + 8.0 * b.d);
        }
        scales.push(b.d);
        for i in 0..g / 2 {
            codes.push(b.code(2 * i) | (b.code(2 * i + 1) << 4));
        }
    }
    (codes, scales, offsets)
}
