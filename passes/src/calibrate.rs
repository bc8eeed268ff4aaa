//! Calibration statistics: what reaches the input of each linear when the calibration
//! sequences run through the graph, each sequence on its own from an empty cache (as
//! prompts do). Activation-aware quantizers (clip, AWQ, GPTQ) read them.

use std::collections::HashMap;

use slmc_ir::{Graph, Interpreter, NodeId, Tensor};

use crate::linalg::gram_accumulate;
use crate::PassContext;

/// Per input channel of one activation: sums over every calibration token.
#[derive(Clone, Debug)]
pub struct ChannelStats {
    pub tokens: usize,
    pub abs_sum: Vec<f64>,
    pub sq_sum: Vec<f64>,
    /// Sum of x x^T (GPTQ's Hessian up to a factor), when asked for.
    pub gram: Option<Vec<f32>>,
}

impl ChannelStats {
    fn new(channels: usize, gram: bool) -> ChannelStats {
        ChannelStats {
            tokens: 0,
            abs_sum: vec![0.0; channels],
            sq_sum: vec![0.0; channels],
            gram: gram.then(|| vec![0.0; channels * channels]),
        }
    }

    pub fn channels(&self) -> usize {
        self.sq_sum.len()
    }

    pub fn mean_abs(&self) -> Vec<f32> {
        self.abs_sum.iter().map(|s| (*s / self.tokens.max(1) as f64) as f32).collect()
    }

    pub fn mean_sq(&self) -> Vec<f32> {
        self.sq_sum.iter().map(|s| (*s / self.tokens.max(1) as f64) as f32).collect()
    }

    /// The statistics of x / s (channel c divided by s[c]).
    pub fn divided_by(&self, s: &[f32]) -> ChannelStats {
        let k = self.channels();
        ChannelStats {
            tokens: self.tokens,
            abs_sum: self.abs_sum.iter().zip(s).map(|(a, s)| a / *s as f64).collect(),
            sq_sum: self.sq_sum.iter().zip(s).map(|(a, s)| a / (*s as f64 * *s as f64)).collect(),
            gram: self.gram.as_ref().map(|g| {
                let mut g = g.clone();
                for (i, row) in g.chunks_exact_mut(k).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v /= s[i] * s[j];
                    }
                }
                g
            }),
        }
    }
}

/// Statistics of the activation (operand 0) of each of `users`, keyed by that activation.
pub fn collect(
    graph: &Graph,
    cx: &PassContext,
    users: &[NodeId],
    with_gram: bool,
) -> Result<HashMap<NodeId, ChannelStats>, String> {
    if cx.options.calibration.is_empty() {
        return Err("activation-aware quantization needs calibration sequences".into());
    }
    let wanted: Vec<NodeId> = users.iter().map(|u| graph.node(*u).inputs[0]).collect();
    // The run stops at the last activation wanted: later layers (the LM head) are not needed.
    let order = graph.topo_order()?;
    let Some(last) = order.iter().rev().find(|id| wanted.contains(id)).copied() else {
        return Ok(HashMap::new());
    };
    let weights = cx.weights();
    let mut interp = Interpreter::new(graph, &weights).map_err(|e| format!("calibration: {e}"))?;
    let mut stats: HashMap<NodeId, ChannelStats> = HashMap::new();
    for seq in &cx.options.calibration {
        interp.reset();
        let tokens = Tensor::i32(vec![seq.len()], seq.iter().map(|t| *t as i32).collect());
        interp
            .observe_until(
                &[("tokens", tokens)],
                &mut |id, t| {
                    if !wanted.contains(&id) {
                        return;
                    }
                    let (Some(x), Some(&k)) = (t.as_f32(), t.shape.last()) else { return };
                    let entry = stats.entry(id).or_insert_with(|| ChannelStats::new(k, with_gram));
                    let rows = x.len() / k;
                    for row in x.chunks_exact(k) {
                        for ((a, s), v) in entry.abs_sum.iter_mut().zip(entry.sq_sum.iter_mut()).zip(row) {
                            *a += v.abs() as f64;
                            *s += (*v as f64) * (*v as f64);
                        }
                    }
                    entry.tokens += rows;
                    if let Some(g) = entry.gram.as_mut() {
                        gram_accumulate(x, rows, k, g);
                    }
                },
                last,
            )
            .map_err(|e| format!("calibration: {e}"))?;
    }
    Ok(stats)
}
