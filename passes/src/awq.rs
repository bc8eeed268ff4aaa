//! AWQ-style activation-aware scaling (Lin et al., 2023): before 4-bit quantization,
//! multiply each input channel c of a linear's weight by s[c] and divide the activation
//! by s[c] where it is produced, so channels carrying large activations lose less to
//! rounding. The divide is folded into the producer, so the graph gains no op: a norm's
//! gain (rms_norm, add_rms_norm), or the up half of a fused SwiGLU projection (the
//! product silu(gate) * up is linear in up). Activations from anything else (attention
//! outputs) are left unscaled.
//!
//! s = mean|x|^alpha (normalized to a geometric mean of one), alpha searched on a grid for
//! the least calibration-weighted rounding error of the round-to-nearest grid; alpha = 0
//! (no scaling) is on the grid, so the search never does worse on the calibration data.

use std::collections::HashMap;

use rayon::prelude::*;

use slmc_ir::{DType, Dim, Graph, NodeId, Op, OwnedWeight, TensorType, WeightSource};

use crate::calibrate::ChannelStats;
use crate::quant::{level, quantize_group, QuantMethod, Scheme};
use crate::PassContext;

const ALPHAS: usize = 20;

/// Rescales the producers and users of every activation in `stats` whose users are all
/// in `targets` (linear node -> its weight's 4-bit scheme); `stats` is updated to the
/// scaled activations. Returns how many activations were rescaled.
pub fn rescale(
    graph: &mut Graph,
    cx: &mut PassContext,
    targets: &HashMap<NodeId, Scheme>,
    stats: &mut HashMap<NodeId, ChannelStats>,
) -> Result<usize, String> {
    let mut activations: Vec<NodeId> = stats.keys().copied().collect();
    // Producers before consumers: a fused gate/up weight is scaled by its own input
    // first, then by the activation its SwiGLU output feeds.
    let order = graph.topo_order()?;
    activations.sort_by_key(|a| order.iter().position(|o| o == a));
    let mut changed = 0;
    for act in activations {
        let users = graph.users(act);
        if users.is_empty() || !users.iter().all(|u| targets.contains_key(u) && graph.node(*u).inputs[0] == act) {
            continue;
        }
        let Some(fold) = producer_fold(graph, act) else { continue };
        let st = &stats[&act];
        let k = st.channels();
        let mut weights = Vec::new();
        for u in &users {
            let w = graph.node(*u).inputs[1];
            if graph.users(w).len() != 1 {
                weights.clear();
                break; // shared with another use: scaling it would change that use too
            }
            let values = read(graph, cx, w)?;
            weights.push((*u, w, values));
        }
        if weights.is_empty() {
            continue;
        }
        let s = search(st, &weights.iter().map(|(u, _, v)| (v.as_slice(), targets[u])).collect::<Vec<_>>(), k);
        let Some(s) = s else { continue };
        for (_, w, mut values) in weights {
            for row in values.chunks_exact_mut(k) {
                for (v, sc) in row.iter_mut().zip(&s) {
                    *v *= sc;
                }
            }
            replace(graph, cx, w, "awq-in", values)?;
        }
        match fold {
            Fold::Gain(g) => {
                let mut values = read(graph, cx, g)?;
                for (v, sc) in values.iter_mut().zip(&s) {
                    *v /= sc;
                }
                replace(graph, cx, g, "awq-out", values)?;
            }
            Fold::UpRows(w) => {
                let mut values = read(graph, cx, w)?;
                let cols = values.len() / (2 * k);
                for (c, row) in values[k * cols..].chunks_exact_mut(cols).enumerate() {
                    for v in row {
                        *v /= s[c];
                    }
                }
                replace(graph, cx, w, "awq-out", values)?;
            }
        }
        let scaled = stats[&act].divided_by(&s);
        stats.insert(act, scaled);
        changed += 1;
    }
    Ok(changed)
}

/// Where an activation's per-channel divide can be folded.
enum Fold {
    /// The gain weight of the norm that produced it.
    Gain(NodeId),
    /// The fused gate/up weight of the SwiGLU projection that produced it (its up rows).
    UpRows(NodeId),
}

fn producer_fold(graph: &Graph, act: NodeId) -> Option<Fold> {
    let node = graph.node(act);
    let (slot, fold): (usize, fn(NodeId) -> Fold) = match node.op {
        Op::RmsNorm { .. } => (1, Fold::Gain),
        Op::AddRmsNorm { .. } => (2, Fold::Gain),
        Op::LinearSwiglu => (1, Fold::UpRows),
        _ => return None,
    };
    let w = node.inputs[slot];
    // The weight must be this producer's alone, and a plain weight.
    let only_user = graph.users(w) == [act];
    (matches!(graph.node(w).op, Op::Weight { .. }) && only_user).then(|| fold(w))
}

fn read(graph: &Graph, cx: &PassContext, w: NodeId) -> Result<Vec<f32>, String> {
    let Op::Weight { name } = &graph.node(w).op else { return Err("AWQ: not a weight".into()) };
    cx.weights().to_f32(name).ok_or_else(|| format!("weight \"{name}\" cannot be read"))
}

/// Stores `values` as a new f32 weight and points `w`'s users at it.
fn replace(graph: &mut Graph, cx: &mut PassContext, w: NodeId, tag: &str, values: Vec<f32>) -> Result<(), String> {
    let Op::Weight { name } = &graph.node(w).op else { return Err("AWQ: not a weight".into()) };
    let derived = format!("{name}@{tag}");
    let shape: Vec<usize> = graph.node(w).ty.shape.iter().map(|d| d.as_const().unwrap_or(0) as usize).collect();
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    cx.derived.insert(derived.clone(), OwnedWeight { dtype: DType::F32, shape: shape.clone(), bytes });
    let ty = TensorType::new(DType::F32, shape.iter().map(|d| Dim::from(*d)).collect());
    let value_name = graph.fresh_name(&format!("{}.{tag}", graph.node(w).name));
    let new_w = graph.weight(&value_name, &derived, ty)?;
    for user in graph.users(w) {
        let inputs: Vec<NodeId> = graph.node(user).inputs.iter().map(|i| if *i == w { new_w } else { *i }).collect();
        graph.set_inputs(user, &inputs);
    }
    Ok(())
}

/// The scale with the least rounding error weighted by each channel's mean x^2, or
/// `None` when no scaling is best.
fn search(st: &ChannelStats, weights: &[(&[f32], Scheme)], k: usize) -> Option<Vec<f32>> {
    let mean_abs = st.mean_abs();
    let mean_sq = st.mean_sq();
    let mut best: Option<(f64, usize, Vec<f32>)> = None;
    for step in 0..=ALPHAS {
        let alpha = step as f32 / ALPHAS as f32;
        let mut s: Vec<f32> = mean_abs.iter().map(|m| m.max(1e-6).powf(alpha)).collect();
        let log_mean = s.iter().map(|v| (*v as f64).ln()).sum::<f64>() / k as f64;
        let norm = log_mean.exp() as f32;
        s.iter_mut().for_each(|v| *v /= norm);
        let err: f64 = weights.iter().map(|(w, scheme)| scaled_error(w, k, &s, &mean_sq, *scheme)).sum();
        if best.as_ref().is_none_or(|(b, _, _)| err < *b) {
            best = Some((err, step, s));
        }
    }
    best.filter(|(_, step, _)| *step != 0).map(|(_, _, s)| s)
}

/// sum over rows and channels of mean_sq[c] * (w - Q(w s) / s)^2, Q round to nearest.
fn scaled_error(w: &[f32], k: usize, s: &[f32], mean_sq: &[f32], scheme: Scheme) -> f64 {
    let Scheme::Q4 { group, sym } = scheme else { return 0.0 };
    // Per row in parallel, summed in row order (the same total on any thread count).
    let per_row: Vec<f64> = w.par_chunks_exact(k).map(|row| row_error(row, s, mean_sq, group, sym)).collect();
    per_row.iter().sum()
}

fn row_error(row: &[f32], s: &[f32], mean_sq: &[f32], group: usize, sym: bool) -> f64 {
    let mut err = 0.0f64;
    let mut scaled = vec![0.0f32; group];
    for g0 in (0..row.len()).step_by(group) {
        for (j, v) in scaled.iter_mut().enumerate() {
            *v = row[g0 + j] * s[g0 + j];
        }
        let (d, m, codes) = quantize_group(&scaled, sym, QuantMethod::Rtn, None);
        let (d, m) = (d.to_f32(), m.to_f32());
        for (j, q) in codes.iter().enumerate() {
            let c = g0 + j;
            let e = (row[c] - level(*q, d, m, sym) / s[c]) as f64;
            err += mean_sq[c] as f64 * e * e;
        }
    }
    err
}
