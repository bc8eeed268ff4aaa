//! Weights in the ML program: ggml blocks as blockwise constants (exact where Core ML
//! can express them), int8 per row, or fp16, stored in the weight blob.

use slmc_ir::{DType, NodeId};

use super::mil::{self, Arg, Dt, MilOp, Var};
use super::*;

impl<'a> Emitter<'a> {
    /// A weight as an fp16 MIL value: a constant, or (quantized) a constexpr op.
    pub(super) fn weight(&mut self, id: NodeId) -> Result<Var, CoremlError> {
        let name = self.weight_name(id)?;
        if let Some(v) = self.weight_vars.get(&name) {
            return Ok(v.clone());
        }
        let view = self.weights.view(&name).ok_or_else(|| CoremlError::MissingWeight(name.clone()))?;
        let shape = view.shape.clone();
        let dtype = view.dtype;
        let quantized = !matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
        // iOS 18 takes ggml's 4-bit-with-minimum and Q8_0 blocks as they are; other block
        // types (Q5_0, K-quants, IQ4) are dequantized to fp16 there rather than re-quantized
        // to int8 blocks: on two of Gemma 3 270M's golden prompts the largest teacher-forced
        // log-probability difference to the interpreter fell from 0.068 to 0.016 (measured).
        let native_ios18 = dtype.q4_has_min().is_some() || dtype == DType::Q8_0;
        let dense = !quantized || (self.opts.deployment == Deployment::Ios18 && !native_ios18);
        let var = if shape.len() != 2 || dense {
            let values = self.weights.to_f32(&name).ok_or_else(|| CoremlError::MissingWeight(name.clone()))?;
            if dtype != DType::F16 {
                let how = if quantized { "fp16 constants, dequantized at compile time" } else { "fp16 constants" };
                self.conversions.note(dtype.name(), &format!("{how} (values rounded to fp16)"));
            }
            self.b.const_f16(&name, &shape, &values)
        } else if self.opts.deployment == Deployment::Ios18 && dtype.q4_has_min().is_some() {
            let (codes, scales, offsets) = q4_blockwise(dtype, view.bytes);
            let g = dtype.block_len();
            let sshape = [shape[0], shape[1] / g];
            let data = self.b.blob(Dt::U4, &shape, &blob::pack_u4(&codes));
            let scale = self.b.f16_value(&sshape, &scales);
            let offset = self.b.f16_value(&sshape, &offsets);
            let inputs = vec![("data", Arg::Value(data)), ("scale", Arg::Value(scale)), ("offset", Arg::Value(offset))];
            self.b.op(MilOp::ConstexprBlockwiseShiftScale, &name, inputs, Dt::F16, &shape)
        } else if self.opts.deployment == Deployment::Ios18 && dtype == DType::Q8_0 {
            let (codes, scales) = q8_blockwise(view.bytes);
            let sshape = [shape[0], shape[1] / 32];
            let data = self.b.blob(Dt::I8, &shape, &codes);
            let scale = self.b.f16_value(&sshape, &scales);
            let inputs = vec![("data", Arg::Value(data)), ("scale", Arg::Value(scale))];
            self.b.op(MilOp::ConstexprBlockwiseShiftScale, &name, inputs, Dt::F16, &shape)
        } else {
            // iOS 17: int8 per (row, 32 columns). Its affine dequantization scales along one
            // axis only, so the codes are stored as [rows * k / 32, 32] (one scale and zero
            // point per block) and reshaped, a view, to [rows, k]. Per-row int8 moved logits
            // by ~0.1 and flipped golden tokens at gaps up to 0.17 (measured).
            let n: usize = shape.iter().product();
            if shape[1] % INT8_GROUP != 0 {
                return Err(CoremlError::Unsupported {
                    node: name.clone(),
                    message: format!("{} columns are not a multiple of {INT8_GROUP} (iOS 17 int8 blocks)", shape[1]),
                });
            }
            let blocks = n / INT8_GROUP;
            let (codes, zero_points, scales) = if dtype == DType::Q8_0 {
                q8_as_uint8(view.bytes)
            } else {
                let values = self.weights.to_f32(&name).ok_or_else(|| CoremlError::MissingWeight(name.clone()))?;
                self.conversions.note(dtype.name(), "int8 blocks of 32 columns, re-quantized at compile time (lossy)");
                int8_per_row(&values, INT8_GROUP)
            };
            let data = self.b.blob(Dt::U8, &[blocks, INT8_GROUP], &codes);
            let zp = self.b.blob(Dt::U8, &[blocks], &zero_points);
            let scale = self.b.f16_value(&[blocks], &scales);
            let attrs = vec![
                ("quantized_data", data),
                ("zero_point", zp),
                ("scale", scale),
                ("axis", mil::i32_value(&[], &[0])),
            ];
            let blocked = self.b.constexpr_with_attributes(
                MilOp::ConstexprAffineDequantize,
                &format!("{name}_blocks"),
                attrs,
                Dt::F16,
                &[blocks, INT8_GROUP],
            );
            self.reshape(&name, &blocked, &shape)
        };
        self.weight_vars.insert(name, var.clone());
        Ok(var)
    }
}

/// ggml 4-bit blocks as `scale * (code - offset)`: codes in element order, one fp16-able
/// scale and offset per block. Q4_0: offset 8. Q4_1 (d q + m): offset -m / d; a block
/// with d = 0 holds only m, written as codes 1 with scale m and offset 0.
pub(super) fn q4_blockwise(dtype: DType, bytes: &[u8]) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let g = dtype.block_len();
    let blocks = bytes.len() / dtype.block_bytes();
    let (mut codes, mut scales, mut offsets) =
        (Vec::with_capacity(blocks * g), Vec::with_capacity(blocks), Vec::with_capacity(blocks));
    for b in slmc_ir::blocks::q4_blocks(dtype, bytes) {
        match b.m {
            Some(m) if b.d == 0.0 => {
                codes.extend(std::iter::repeat_n(1u8, g));
                scales.push(m);
                offsets.push(0.0);
            }
            m => {
                codes.extend((0..g).map(|j| b.code(j)));
                scales.push(b.d);
                offsets.push(m.map_or(8.0, |m| -m / b.d));
            }
        }
    }
    (codes, scales, offsets)
}

/// ggml Q8_0 blocks (f16 d, 32 i8) as int8 codes and one scale per block.
pub(super) fn q8_blockwise(bytes: &[u8]) -> (Vec<u8>, Vec<f32>) {
    let blocks = bytes.len() / DType::Q8_0.block_bytes();
    let (mut codes, mut scales) = (Vec::with_capacity(blocks * 32), Vec::with_capacity(blocks));
    for b in slmc_ir::blocks::q8_blocks(bytes) {
        scales.push(b.d);
        codes.extend_from_slice(b.codes);
    }
    (codes, scales)
}

/// ggml Q8_0 blocks as uint8 codes with zero point 128, exactly: d q = d ((q + 128) - 128).
pub(super) fn q8_as_uint8(bytes: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let blocks = bytes.len() / DType::Q8_0.block_bytes();
    let (mut codes, mut scales) = (Vec::with_capacity(blocks * 32), Vec::with_capacity(blocks));
    for b in slmc_ir::blocks::q8_blocks(bytes) {
        scales.push(b.d);
        codes.extend(b.uint8_codes());
    }
    (codes, vec![128u8; scales.len()], scales)
}

/// Per-row asymmetric 8-bit codes for `values [rows, cols]`: value ~ scale * (code - zero)
/// with the range widened to include 0 and the scale rounded to fp16 before coding.
pub fn int8_per_row(values: &[f32], cols: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let rows = values.len() / cols;
    let (mut codes, mut zeros, mut scales) = (Vec::with_capacity(values.len()), Vec::new(), Vec::new());
    for r in 0..rows {
        let row = &values[r * cols..(r + 1) * cols];
        let lo = row.iter().copied().fold(0.0f32, f32::min);
        let hi = row.iter().copied().fold(0.0f32, f32::max);
        let scale = half::f16::from_f32(((hi - lo) / 255.0).max(1e-7)).to_f32();
        let zero = (-lo / scale).round().clamp(0.0, 255.0);
        for v in row {
            codes.push((v / scale + zero).round().clamp(0.0, 255.0) as u8);
        }
        zeros.push(zero as u8);
        scales.push(scale);
    }
    (codes, zeros, scales)
}
