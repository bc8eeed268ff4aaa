//! What one token costs a graph: multiply-add FLOPs of its matrix products, and per
//! attention layer the work and KV-cache bytes that grow with the positions it attends to
//! (capped by a sliding window). The compiler's cost model turns these into bytes moved
//! and predicted tokens/s per target; `slmc bench` sets the prediction against a
//! measurement.

use crate::{Graph, KvQuant, Op};

/// One attention layer's shape, cache type and window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionCost {
    pub query_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// How the cache stores keys and values (a backend may store another type: Core ML
    /// keeps fp16 caches, and says so by replacing this).
    pub quant: KvQuant,
    /// Positions a token attends to at most (a sliding window), None: all of them.
    pub window: Option<usize>,
}

impl AttentionCost {
    /// FLOPs per attended position: q.k and p.v for every query head (2 + 2 per element).
    pub fn flops_per_position(&self) -> u64 {
        4 * (self.query_heads * self.head_dim) as u64
    }

    /// Cache bytes read per attended position: keys and values of every KV head, with the
    /// cache's scales.
    pub fn kv_bytes_per_position(&self) -> u64 {
        let per_vector = self.quant.data_bytes_per_vector(self.head_dim) + self.quant.scale_bytes_per_vector();
        2 * (self.kv_heads * per_vector) as u64
    }
}

/// Per-token cost of a graph (a decode step of one token).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenCost {
    /// 2 x rows x columns of every matrix product's weight (the LM head included).
    pub matmul_flops: u64,
    pub attention: Vec<AttentionCost>,
}

impl TokenCost {
    pub fn of(graph: &Graph) -> TokenCost {
        let konst = |d: &crate::Dim| d.as_const().unwrap_or(0).max(0) as u64;
        let mut cost = TokenCost::default();
        for (_, node) in graph.nodes() {
            let input = |i: usize| &graph.node(node.inputs[i]).ty.shape;
            match &node.op {
                Op::Linear | Op::LinearSwiglu => {
                    let w = input(1);
                    cost.matmul_flops += 2 * konst(&w[0]) * konst(&w[1]);
                }
                Op::Gqa { quant, limits, .. } => {
                    cost.attention.push(attention(input(0), input(1), *quant, limits.window))
                }
                Op::Attention { limits, .. } => {
                    // An unfused cache: the keys come from its kv_append.
                    let quant = match &graph.node(node.inputs[1]).op {
                        Op::KvAppend { quant, .. } => *quant,
                        _ => KvQuant::F32,
                    };
                    cost.attention.push(attention(input(0), input(1), quant, limits.window));
                }
                _ => {}
            }
        }
        cost
    }

    /// FLOPs of a token at `position` (0-based; it attends to `position + 1` positions).
    pub fn flops_at(&self, position: usize) -> u64 {
        self.matmul_flops
            + self.attention.iter().map(|a| a.flops_per_position() * attended(a.window, position)).sum::<u64>()
    }
}

/// Positions a token at `position` attends to under `window`.
fn attended(window: Option<usize>, position: usize) -> u64 {
    (position as u64 + 1).min(window.map_or(u64::MAX, |w| w as u64))
}

/// `q` is [s, hq, d], `k` is [t, hk, d].
fn attention(q: &[crate::Dim], k: &[crate::Dim], quant: KvQuant, window: Option<usize>) -> AttentionCost {
    let c = |d: &crate::Dim| d.as_const().unwrap_or(0).max(0) as usize;
    AttentionCost { query_heads: c(&q[1]), kv_heads: c(&k[1]), head_dim: c(&q[2]), quant, window }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_LAYERS: &str = r#"graph "t" {
  %tokens = input "tokens" : i32[s]
  %pos = positions(%tokens) : i32[s]
  %emb = weight "emb" : f32[10, 8]
  %wq = weight "wq" : f32[8, 8]
  %wk = weight "wk" : f32[4, 8]
  %x = embed(%emb, %tokens) : f32[s, 8]
  %q = linear(%x, %wq) : f32[s, 8]
  %k = linear(%x, %wk) : f32[s, 4]
  %q3 = reshape(%q) {shape = [s, 2, 4]} : f32[s, 2, 4]
  %k3 = reshape(%k) {shape = [s, 1, 4]} : f32[s, 1, 4]
  %a = gqa(%q3, %k3, %k3, %pos) {layer = 0, scale = 0.5, theta = 10000.0, rotary_dim = 4, style = half, window = 3} : f32[s, 2, 4]
  %b = gqa(%q3, %k3, %k3, %pos) {layer = 1, scale = 0.5, theta = 10000.0, rotary_dim = 4, style = half, kv = f16} : f32[s, 2, 4]
  %o = reshape(%b) {shape = [s, 8]} : f32[s, 8]
  %logits = linear(%o, %emb) : f32[s, 10]
  output "logits" = %logits
}
"#;

    #[test]
    fn matrix_products_and_attention_per_position() {
        let graph = crate::text::parse(TWO_LAYERS).expect("the test graph parses");
        let cost = TokenCost::of(&graph);
        assert_eq!(cost.matmul_flops, 2 * (8 * 8 + 4 * 8 + 10 * 8));
        assert_eq!(cost.attention.len(), 2);
        // 2 query heads of 4: 4 * 8 FLOPs per position; one KV head of 4 values, keys and values.
        let first = cost.attention[0];
        assert_eq!((first.query_heads, first.kv_heads, first.head_dim, first.window), (2, 1, 4, Some(3)));
        assert_eq!((first.flops_per_position(), first.kv_bytes_per_position()), (32, 2 * 16));
        assert_eq!(cost.attention[1].kv_bytes_per_position(), 2 * 8, "f16 cache");
        // Position 9 attends to 10 positions, the windowed layer to 3.
        assert_eq!(cost.flops_at(9), cost.matmul_flops + 32 * 3 + 32 * 10);
    }
}
