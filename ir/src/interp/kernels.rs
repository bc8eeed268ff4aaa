//! The interpreter's numeric kernels: elementwise functions, norms, rotary embedding,
//! attention and the matrix products. Every sum runs in a fixed order.

use rayon::prelude::*;

use crate::dtype::{dequantize_into, DType};
use crate::op::{AttnLimits, RopeStyle, Rotary, KV_EXACT_WINDOW};
use crate::rotary::RotaryFreqs;

pub(super) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Hugging Face's `gelu_pytorch_tanh`. Backends may use the identity
/// 0.5 (1 + tanh(u)) = sigmoid(2u), which saturates without overflow.
pub(super) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

pub(super) fn add_broadcast(a: &mut [f32], b: &[f32]) {
    for chunk in a.chunks_exact_mut(b.len()) {
        for (o, v) in chunk.iter_mut().zip(b) {
            *o += v;
        }
    }
}

pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0.0; x.len()];
    for (o, row) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
            *o = w * (v * inv);
        }
    }
    out
}

pub(super) fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0.0; x.len()];
    for (o, row) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, v), w), b) in o.iter_mut().zip(row).zip(w).zip(b) {
            *o = (v - mean) * inv * w + b;
        }
    }
    out
}

/// Rotates `x[s, h, d]` in place at positions `pos`.
pub(super) fn apply_rope(x: &mut [f32], pos: &[i32], shape: &[usize], freqs: &RotaryFreqs, rotary: &Rotary) {
    let (h, d) = (shape[1], shape[2]);
    let half = rotary.rotary_dim / 2;
    for (t, token) in x.chunks_exact_mut(h * d).enumerate() {
        let (cos, sin) = freqs.cos_sin(pos[t] as f32);
        for head in token.chunks_exact_mut(d) {
            for j in 0..half {
                let (a, b) = match rotary.style {
                    RopeStyle::Half => (j, j + half),
                    RopeStyle::Interleaved => (2 * j, 2 * j + 1),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[j] - x1 * sin[j];
                head[b] = x1 * cos[j] + x0 * sin[j];
            }
        }
    }
}

/// Causal grouped-query attention; query i sits at position t - s + i. `exact`: a packed
/// cache's exact keys and values, read instead of `kv` for the `KV_EXACT_WINDOW` positions
/// nearest each query.
pub(super) fn attention(
    q: &[f32],
    (k, v): (&[f32], &[f32]),
    exact: Option<(&[f32], &[f32])>,
    s: usize,
    t: usize,
    (hq, hk, d): (usize, usize, usize),
    scale: f32,
    limits: &AttnLimits,
) -> Vec<f32> {
    let group = hq / hk;
    let mut out = vec![0.0f32; s * hq * d];
    // One task per (query, head) row of the output.
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let (i, h) = (row / hq, row % hq);
        let kv_head = h / group;
        let qv = &q[(i * hq + h) * d..(i * hq + h + 1) * d];
        let visible = t - s + i + 1;
        let window_start = visible.saturating_sub(KV_EXACT_WINDOW);
        let pick = |j: usize| match exact {
            Some((ke, ve)) if j >= window_start => (ke, ve),
            _ => (k, v),
        };
        let at = |j: usize| (j * hk + kv_head) * d..(j * hk + kv_head + 1) * d;
        let first = limits.first_key(visible - 1);
        let mut scores: Vec<f32> = (0..visible)
            .map(|j| if j < first { f32::NEG_INFINITY } else { limits.cap(dot(qv, &pick(j).0[at(j)]) * scale) })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        for (j, p) in scores.iter().enumerate() {
            let w = p / sum;
            for (o, x) in o.iter_mut().zip(&pick(j).1[at(j)]) {
                *o += w * x;
            }
        }
    });
    out
}

/// The rows of a `[n, k]` matrix: f32 in memory, or stored (quantized or half precision,
/// `row_bytes` a row) and dequantized a block at a time.
pub(crate) enum Rows<'w> {
    F32(&'w [f32]),
    Stored { dtype: DType, bytes: &'w [u8], row_bytes: usize },
}

impl Rows<'_> {
    /// Rows `start..start + count` as f32, dequantized into `scratch` when stored.
    pub(crate) fn get<'s>(&'s self, start: usize, count: usize, k: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        match self {
            Rows::F32(w) => &w[start * k..(start + count) * k],
            Rows::Stored { dtype, bytes, row_bytes } => {
                scratch.resize(count * k, 0.0);
                let rows = &bytes[start * row_bytes..(start + count) * row_bytes];
                for (o, b) in scratch.chunks_exact_mut(k).zip(rows.chunks_exact(*row_bytes)) {
                    dequantize_into(*dtype, b, o);
                }
                scratch
            }
        }
    }
}

/// `x[m, k]` times `w[n, k]` transposed, into `[m, n]`.
pub fn matmul_transposed(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    matmul_rows(x, m, k, &Rows::F32(w), n)
}

/// `matmul_transposed` over rows in any form; a stored matrix is dequantized one block of
/// output rows at a time (the same values and sums as the whole matrix in f32).
pub(crate) fn matmul_rows(x: &[f32], m: usize, k: usize, w: &Rows, n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    if m == 1 {
        // 64 outputs a task, their rows dequantized 8 at a time (a scratch that stays in
        // the first-level cache).
        out.par_chunks_mut(64).enumerate().for_each_init(Vec::new, |scratch, (c, o)| {
            for (part, o) in o.chunks_mut(8).enumerate() {
                let rows = w.get(c * 64 + part * 8, o.len(), k, scratch);
                for (v, row) in o.iter_mut().zip(rows.chunks_exact(k)) {
                    *v = dot(x, row);
                }
            }
        });
        return out;
    }
    // Column blocks of the output in parallel; each block is one sgemm into a local buffer,
    // copied out a group at a time (a vocabulary-wide product never holds its result twice).
    const BLOCK: usize = 256;
    let blocks = n.div_ceil(BLOCK);
    let group = 2 * rayon::current_num_threads().max(1);
    for first in (0..blocks).step_by(group) {
        let done: Vec<(usize, Vec<f32>)> = (first..blocks.min(first + group))
            .into_par_iter()
            .map_init(Vec::new, |scratch, b| {
                let n0 = b * BLOCK;
                let nb = BLOCK.min(n - n0);
                let rows = w.get(n0, nb, k, scratch);
                let mut c = vec![0.0f32; m * nb];
                // SAFETY: the pointers cover x (m*k), the nb rows of w (nb*k), and c (m*nb),
                // with strides that stay inside those ranges.
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        nb,
                        1.0,
                        x.as_ptr(),
                        k as isize,
                        1,
                        rows.as_ptr(),
                        1,
                        k as isize,
                        0.0,
                        c.as_mut_ptr(),
                        nb as isize,
                        1,
                    );
                }
                (n0, c)
            })
            .collect();
        for (n0, c) in done {
            let nb = c.len() / m;
            for i in 0..m {
                out[i * n + n0..i * n + n0 + nb].copy_from_slice(&c[i * nb..(i + 1) * nb]);
            }
        }
    }
    out
}

/// Dot product with a fixed summation order (16 lanes, then a fixed tree).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut tail = 0.0f32;
    for i in chunks * 16..a.len() {
        tail += a[i] * b[i];
    }
    let mut width = 8;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0] + tail
}
