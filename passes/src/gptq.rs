//! GPTQ (Frantar et al., 2022): quantizes a weight matrix column by column and spreads
//! each column's rounding error over the columns not yet quantized, weighted by the
//! inverse Hessian of the layer's squared output error, H = X^T X over calibration
//! activations X. It minimizes ||(W - Q) X^T||^2 instead of ||W - Q||^2.
//!
//! Rows are independent given H (the 4-bit groups here are per row), so rows are
//! quantized in parallel, a tile at a time so each row of the inverse factor is read once
//! per tile. Group parameters are chosen either as the walk reaches a group (from the
//! error-compensated values) or, with act-order (columns in decreasing H_ii), once up
//! front from the original row, because a group's columns are no longer visited
//! together. Each group's scale is searched over clipping ratios weighting each column's
//! error by H_ii, as GPTQ's `mse` grid does.

use half::f16;
use rayon::prelude::*;
use slmc_ir::dtype::pack_q4;
use slmc_ir::DType;

use crate::linalg::{cholesky, lower_inverse};
use crate::quant::{group_grid, level};

/// Damping added to H's diagonal, as a fraction of its mean (GPTQ's `percdamp`).
pub const DAMPING: f64 = 0.01;
/// Rows quantized together (each reads one row of the inverse factor per column).
const TILE_ROWS: usize = 16;

/// The order GPTQ visits columns in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnOrder {
    /// Left to right; each group's parameters from its error-compensated values.
    Natural,
    /// Decreasing H_ii (GPTQ's `desc_act`); groups' parameters fixed up front from the
    /// original row, since a group's columns are no longer visited together.
    ActOrder,
}

/// GPTQ's settings for one matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqConfig {
    pub group: usize,
    pub sym: bool,
    pub order: ColumnOrder,
    /// Clipping ratios searched for each group's scale (`[1.0]`: the plain range).
    pub ratios: &'static [f32],
}

/// The upper Cholesky factor U of H^-1 (H^-1 = U^T U), with H's columns in `order`.
/// Uses U = R chol(R H R)^-1 R (R reverses the order), one factorization instead of
/// inverting H and factorizing again. Damping grows tenfold until H factorizes.
fn inverse_factor(h: &[f64], n: usize, order: &[usize]) -> Result<Vec<f32>, String> {
    let mean_diag = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    let mut damp = DAMPING * mean_diag.max(f64::MIN_POSITIVE);
    for _ in 0..4 {
        let mut r = vec![0.0f64; n * n];
        for i in 0..n {
            let oi = order[n - 1 - i];
            for j in 0..n {
                r[i * n + j] = h[oi * n + order[n - 1 - j]];
            }
            r[i * n + i] += damp;
        }
        if cholesky(&mut r, n).is_ok() {
            let m = lower_inverse(&r, n);
            let mut u = vec![0.0f32; n * n];
            for i in 0..n {
                for j in i..n {
                    u[i * n + j] = m[(n - 1 - i) * n + (n - 1 - j)] as f32;
                }
            }
            return Ok(u);
        }
        damp *= 10.0;
    }
    Err("the calibration Hessian is not positive definite even with damping".into())
}

/// One group's scale and minimum (f16 as stored; minimum zero when symmetric).
#[derive(Clone, Copy)]
struct GroupParams {
    d: f32,
    m: f32,
    d16: f16,
    m16: f16,
}

impl GroupParams {
    /// Symmetric uses codes 0..=15 as (code - 8) * d; asymmetric code * d + m.
    fn code(&self, w: f32, sym: bool) -> u8 {
        if self.d == 0.0 {
            return if sym { 8 } else { 0 };
        }
        if sym {
            ((w / self.d).round().clamp(-8.0, 7.0) + 8.0) as u8
        } else {
            ((w - self.m) / self.d).round().clamp(0.0, 15.0) as u8
        }
    }

    fn value(&self, code: u8, sym: bool) -> f32 {
        level(code, self.d, self.m, sym)
    }
}

/// The clipping ratio (of `ratios`) whose grid gives the least `importance`-weighted error.
fn group_params(g: &[f32], importance: &[f32], sym: bool, ratios: &[f32]) -> GroupParams {
    let mut best: Option<(f64, GroupParams)> = None;
    for &r in ratios {
        let (d16, m16) = group_grid(g, sym, r);
        let p = GroupParams { d: d16.to_f32(), m: m16.to_f32(), d16, m16 };
        if ratios.len() == 1 {
            return p;
        }
        let err: f64 = g
            .iter()
            .zip(importance)
            .map(|(w, imp)| {
                let e = (w - p.value(p.code(*w, sym), sym)) as f64;
                *imp as f64 * e * e
            })
            .sum();
        if best.as_ref().is_none_or(|(b, _)| err < *b) {
            best = Some((err, p));
        }
    }
    best.expect("at least one ratio").1
}

/// Quantizes `w` (`rows` × `cols`, row-major) against the Gram matrix `h` (`cols` ×
/// `cols`) into `dtype`'s packed 4-bit blocks.
pub fn gptq_q4(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    cfg: GptqConfig,
    dtype: DType,
) -> Result<Vec<u8>, String> {
    let n = cols;
    if w.len() != rows * cols || h.len() != n * n || cfg.group == 0 || n % cfg.group != 0 {
        return Err(format!(
            "GPTQ: a {rows}x{cols} matrix with a {}-element Hessian and groups of {}",
            h.len(),
            cfg.group
        ));
    }
    // Columns no calibration token reached carry no information: H_ii = 1, weight 0.
    let mut h = h.to_vec();
    let dead: Vec<bool> = (0..n).map(|i| h[i * n + i] <= 0.0).collect();
    for (i, _) in dead.iter().enumerate().filter(|(_, d)| **d) {
        h[i * n + i] = 1.0;
    }
    let diag: Vec<f32> = (0..n).map(|i| h[i * n + i] as f32).collect();
    let mut order: Vec<usize> = (0..n).collect();
    match cfg.order {
        ColumnOrder::Natural => {}
        ColumnOrder::ActOrder => order.sort_by(|a, b| diag[*b].total_cmp(&diag[*a])),
    }
    let u = inverse_factor(&h, n, &order)?;
    let groups = n / cfg.group;
    // The damped Hessian in f32 for refitting scales.
    let mean_diag = diag.iter().map(|v| *v as f64).sum::<f64>() / n as f64;
    let hf: Vec<f32> =
        (0..n * n).map(|i| (h[i] + if i % (n + 1) == 0 { DAMPING * mean_diag } else { 0.0 }) as f32).collect();
    let tiles: Vec<(Vec<u8>, Vec<f16>, Vec<f16>)> = w
        .par_chunks(TILE_ROWS * cols)
        .map(|tile| {
            let t = tile.len() / cols;
            // Each row in visiting order.
            let mut work: Vec<Vec<f32>> = (0..t)
                .map(|r| order.iter().map(|&c| if dead[c] { 0.0 } else { tile[r * cols + c] }).collect())
                .collect();
            let mut params: Vec<Vec<Option<GroupParams>>> = vec![vec![None; groups]; t];
            if cfg.order == ColumnOrder::ActOrder {
                for (r, p) in params.iter_mut().enumerate() {
                    let row = &tile[r * cols..(r + 1) * cols];
                    for (gi, slot) in p.iter_mut().enumerate() {
                        let span = gi * cfg.group..(gi + 1) * cfg.group;
                        *slot = Some(group_params(&row[span.clone()], &diag[span], cfg.sym, cfg.ratios));
                    }
                }
            }
            let mut codes = vec![0u8; t * cols];
            let mut errs = vec![0.0f32; t];
            for i in 0..n {
                let col = order[i];
                let gi = col / cfg.group;
                let uii = u[i * n + i];
                for r in 0..t {
                    if params[r][gi].is_none() {
                        // Visited as a whole: the group's columns are at i..i + group.
                        let importance: Vec<f32> = order[i..i + cfg.group].iter().map(|c| diag[*c]).collect();
                        params[r][gi] =
                            Some(group_params(&work[r][i..i + cfg.group], &importance, cfg.sym, cfg.ratios));
                    }
                    let p = params[r][gi].expect("set above");
                    let x = work[r][i];
                    let code = p.code(x, cfg.sym);
                    codes[r * cols + col] = code;
                    errs[r] = (x - p.value(code, cfg.sym)) / uii;
                }
                let urow = &u[i * n + i + 1..(i + 1) * n];
                for r in 0..t {
                    axpy(-errs[r], urow, &mut work[r][i + 1..]);
                }
            }
            for (r, p) in params.iter_mut().enumerate() {
                let mut fitted: Vec<GroupParams> = p.iter().map(|p| p.expect("every group was visited")).collect();
                let row: Vec<f32> = (0..cols).map(|c| if dead[c] { 0.0 } else { tile[r * cols + c] }).collect();
                refit_scales(&row, &codes[r * cols..(r + 1) * cols], &mut fitted, &hf, cfg);
                for (slot, f) in p.iter_mut().zip(fitted) {
                    *slot = Some(f);
                }
            }
            let mut scales = Vec::with_capacity(t * groups);
            let mut mins = Vec::with_capacity(t * groups);
            for p in params.iter().flatten() {
                let p = p.expect("every group was visited");
                scales.push(p.d16);
                mins.push(p.m16);
            }
            (codes, scales, mins)
        })
        .collect();
    let mut out = Vec::with_capacity(dtype.storage_bytes(rows * cols).unwrap_or(0));
    for (codes, scales, mins) in tiles {
        pack_q4(dtype, &codes, &scales, (!cfg.sym).then_some(&mins[..]), &mut out);
    }
    Ok(out)
}

/// With the codes fixed, moves each group's scale (and minimum) to minimize the row's
/// output error e^T H e, e = w - dequantized, one group at a time (each step is exact for
/// its group's parameters; the others are held).
fn refit_scales(w: &[f32], codes: &[u8], params: &mut [GroupParams], h: &[f32], cfg: GptqConfig) {
    let n = w.len();
    let g = cfg.group;
    // What multiplies the scale for each code (the value at scale 1, minimum 0).
    let multiplier = |c: u8| level(c, 1.0, 0.0, cfg.sym);
    let mut e: Vec<f32> = (0..n).map(|c| w[c] - params[c / g].value(codes[c], cfg.sym)).collect();
    let mut he: Vec<f32> = (0..n).map(|i| slmc_ir::interp::dot(&h[i * n..(i + 1) * n], &e)).collect();
    for (gi, p) in params.iter_mut().enumerate() {
        let span = gi * g..(gi + 1) * g;
        let q: Vec<f32> = codes[span.clone()].iter().map(|c| multiplier(*c)).collect();
        // Quadratic in (dd, dm): e_G -= dd q + dm 1.
        let (mut aqq, mut aq1, mut a11, mut bq, mut b1) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (a, ca) in span.clone().enumerate() {
            let hrow = &h[ca * n..(ca + 1) * n];
            for (b, cb) in span.clone().enumerate() {
                let v = hrow[cb] as f64;
                aqq += q[a] as f64 * v * q[b] as f64;
                aq1 += q[a] as f64 * v;
                a11 += v;
            }
            bq += q[a] as f64 * he[ca] as f64;
            b1 += he[ca] as f64;
        }
        let (dd, dm) = if cfg.sym {
            (if aqq > 0.0 { bq / aqq } else { 0.0 }, 0.0)
        } else {
            let det = aqq * a11 - aq1 * aq1;
            if det.abs() <= f64::EPSILON * aqq * a11 {
                (0.0, 0.0)
            } else {
                ((bq * a11 - b1 * aq1) / det, (aqq * b1 - aq1 * bq) / det)
            }
        };
        let d16 = f16::from_f32(p.d + dd as f32);
        let m16 = if cfg.sym { f16::ZERO } else { f16::from_f32(p.m + dm as f32) };
        let (dd, dm) = (d16.to_f32() - p.d, m16.to_f32() - p.m);
        if !d16.is_finite() || !m16.is_finite() || (dd == 0.0 && dm == 0.0) {
            continue;
        }
        *p = GroupParams { d: d16.to_f32(), m: m16.to_f32(), d16, m16 };
        for (a, ca) in span.enumerate() {
            let delta = dd * q[a] + dm;
            e[ca] -= delta;
            axpy(-delta, &h[ca * n..(ca + 1) * n], &mut he);
        }
    }
}

/// `y += a * x`.
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { axpy_avx2(a, x, y) };
        }
    }
    axpy_portable(a, x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_portable(a, x, y)
}

#[inline(always)]
fn axpy_portable(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = a.mul_add(*x, *y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::gram;

    /// Activations driven by a few shared factors, with channels of unequal scale, as
    /// real layers' inputs are (low effective rank is what GPTQ exploits).
    fn activations(tokens: usize, k: usize) -> Vec<f32> {
        let mut state = 12345u64;
        let mut rand = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let loads: Vec<f32> = (0..4 * k).map(|_| rand()).collect();
        let mut x = vec![0.0f32; tokens * k];
        for t in 0..tokens {
            let factors: Vec<f32> = (0..4).map(|_| rand()).collect();
            for c in 0..k {
                let shared: f32 = (0..4).map(|f| factors[f] * loads[f * k + c]).sum();
                x[t * k + c] = (1.0 + (c % 7) as f32) * (0.2 * rand() + shared);
            }
        }
        x
    }

    fn output_error(w: &[f32], q: &[f32], x: &[f32], rows: usize, k: usize) -> f64 {
        let tokens = x.len() / k;
        let mut e = 0.0;
        for t in 0..tokens {
            for r in 0..rows {
                let d: f32 = (0..k).map(|c| (w[r * k + c] - q[r * k + c]) * x[t * k + c]).sum();
                e += (d as f64).powi(2);
            }
        }
        e
    }

    #[test]
    fn gptq_beats_round_to_nearest_on_the_output_error_it_minimizes() {
        let (rows, k, tokens) = (20, 96, 400);
        let w: Vec<f32> = (0..rows * k).map(|i| ((i * 2654435761usize % 1000) as f32 / 1000.0 - 0.5) * 0.1).collect();
        let x = activations(tokens, k);
        let h = gram(&x, tokens, k);
        for (sym, dtype) in [(true, DType::Q4_0), (false, DType::Q4_1)] {
            let deq = |bytes: &[u8]| {
                let mut out = vec![0.0f32; rows * k];
                for (o, b) in out.chunks_mut(k).zip(bytes.chunks(bytes.len() / rows)) {
                    slmc_ir::dtype::dequantize_into(dtype, b, o);
                }
                out
            };
            let rtn_cfg = GptqConfig { group: 32, sym, order: ColumnOrder::Natural, ratios: &[1.0] };
            // GPTQ with a zero Hessian off the diagonal is round to nearest; compare with
            // the real Hessian, in natural and act order.
            let diag_only: Vec<f64> = (0..k * k).map(|i| if i % (k + 1) == 0 { h[i] } else { 0.0 }).collect();
            let rtn = output_error(&w, &deq(&gptq_q4(&w, rows, k, &diag_only, rtn_cfg, dtype).unwrap()), &x, rows, k);
            for order in [ColumnOrder::Natural, ColumnOrder::ActOrder] {
                let cfg = GptqConfig { order, ..rtn_cfg };
                let g = output_error(&w, &deq(&gptq_q4(&w, rows, k, &h, cfg, dtype).unwrap()), &x, rows, k);
                assert!(g < 0.5 * rtn, "sym {sym} {order:?}: gptq {g} vs rtn {rtn}");
            }
        }
    }

    #[test]
    fn inverse_factor_inverts_the_damped_hessian_in_visiting_order() {
        let (k, tokens) = (70, 200);
        let h = gram(&activations(tokens, k), tokens, k);
        let damp = DAMPING * (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
        for order in [(0..k).collect::<Vec<_>>(), (0..k).rev().map(|i| (i * 31) % k).collect()] {
            let u = inverse_factor(&h, k, &order).unwrap();
            // (U^T U)(P H P^T + damp I) = I, with H's rows and columns in visiting order.
            for i in 0..k {
                for j in 0..k {
                    let s: f64 = (0..k)
                        .map(|m| {
                            let uu: f64 = (0..k).map(|r| u[r * k + i] as f64 * u[r * k + m] as f64).sum();
                            let hp = h[order[m] * k + order[j]] + if m == j { damp } else { 0.0 };
                            uu * hp
                        })
                        .sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((s - want).abs() < 1e-3, "({i},{j}) {s}");
                }
            }
        }
    }

    #[test]
    fn gptq_refuses_mismatched_shapes() {
        let h = vec![1.0; 4];
        assert!(gptq_q4(
            &[0.0; 64],
            2,
            32,
            &h,
            GptqConfig { group: 32, sym: true, order: ColumnOrder::Natural, ratios: &[1.0] },
            DType::Q4_0
        )
        .is_err());
    }
}
