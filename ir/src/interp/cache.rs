//! The interpreter's KV cache: f32, f16-rounded, or int8/int4 codes with the recent
//! window kept exact.

use crate::op::KvQuant;

/// One KV cache (keys or values of one layer). Quantized caches hold integer codes and
/// a scale and minimum per (position, head) vector, and are dequantized when read, and the
/// exact values for the window of `KV_EXACT_WINDOW` recent positions (`plain`).
#[derive(Clone, Debug, Default)]
pub(super) struct CacheBuf {
    quant: KvQuant,
    heads: usize,
    head_dim: usize,
    pub(super) plain: Vec<f32>,
    codes: Vec<u8>,
    /// Per vector: scale and minimum (asymmetric codes, value = code * scale + min).
    scales: Vec<(f32, f32)>,
}

impl CacheBuf {
    pub(super) fn truncate(&mut self, positions: usize) {
        let vectors = positions * self.heads;
        self.plain.truncate(vectors * self.head_dim);
        self.codes.truncate(vectors * self.head_dim);
        self.scales.truncate(vectors);
    }

    pub(super) fn append(&mut self, quant: KvQuant, heads: usize, head_dim: usize, x: &[f32]) {
        (self.quant, self.heads, self.head_dim) = (quant, heads, head_dim);
        let top = match quant {
            KvQuant::F32 => return self.plain.extend_from_slice(x),
            KvQuant::F16 => return self.plain.extend(x.iter().map(|v| half::f16::from_f32(*v).to_f32())),
            KvQuant::Int8 => 255.0f32,
            KvQuant::Int4 => 15.0f32,
        };
        // Packed caches keep the exact values too, for the recent window.
        self.plain.extend_from_slice(x);
        for v in x.chunks_exact(head_dim) {
            let min = v.iter().copied().fold(f32::INFINITY, f32::min);
            let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let scale = (max - min) / top;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            self.scales.push((scale, min));
            self.codes.extend(v.iter().map(|x| ((x - min) * inv).round().clamp(0.0, top) as u8));
        }
    }

    pub(super) fn read(&self) -> Vec<f32> {
        match self.quant {
            KvQuant::F32 | KvQuant::F16 => self.plain.clone(),
            _ => self
                .codes
                .chunks_exact(self.head_dim)
                .zip(&self.scales)
                .flat_map(|(c, (s, m))| c.iter().map(move |q| *q as f32 * s + m))
                .collect(),
        }
    }
}
