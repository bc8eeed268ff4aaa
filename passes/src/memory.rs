//! Memory planning: a liveness-based static arena for activations, sized for a prefill
//! step and a decode step, plus the weight and KV-cache footprint.
//!
//! Every value gets an offset in one arena; two values share bytes only when their
//! lifetimes (definition to last use, in the printed order) do not overlap. `reshape`
//! outputs alias their operand; `kv_append` outputs are the cache itself and live
//! outside the arena.

use std::collections::{HashMap, HashSet};

use slmc_ir::{Graph, NodeId, Op, WeightSource};

use crate::PassContext;

#[derive(Debug, Clone, PartialEq)]
pub struct ArenaPlan {
    /// Tokens in the step (`s`) and positions already cached (`p`).
    pub tokens: usize,
    pub past: usize,
    pub buffers: usize,
    /// Bytes of the planned arena.
    pub arena_bytes: usize,
    /// Bytes if every value had its own buffer.
    pub one_buffer_per_value_bytes: usize,
    /// Largest sum of simultaneously live values (no plan can go below it).
    pub live_peak_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub weight_bytes: usize,
    /// KV-cache value bytes per token (all layers, keys and values).
    pub kv_bytes_per_token: usize,
    /// Scale bytes per token of a quantized cache, on top of the values.
    pub kv_scale_bytes_per_token: usize,
    /// The same cache in f32, for comparison.
    pub kv_bytes_per_token_f32: usize,
    pub context_len: usize,
    pub prefill: ArenaPlan,
    pub decode: ArenaPlan,
}

pub fn plan_memory(graph: &mut Graph, cx: &mut PassContext) -> Result<usize, String> {
    let context = if cx.options.context_len > 0 { cx.options.context_len } else { 2048 };
    let prefill_len = if cx.options.prefill_len > 0 { cx.options.prefill_len } else { 128 }.min(context);
    let weights = cx.weights();
    let mut weight_bytes = 0;
    let mut seen = HashSet::new();
    let (mut kv, mut kv_scales, mut kv_f32) = (0, 0, 0);
    for (_, node) in graph.nodes() {
        match &node.op {
            Op::Weight { name } if seen.insert(name.clone()) => {
                weight_bytes += weights.view(name).map(|v| v.bytes.len()).unwrap_or(0);
            }
            Op::KvAppend { quant, .. } => {
                let (h, d) = heads_and_dim(&node.ty.shape);
                kv += h * quant.data_bytes_per_vector(d);
                kv_scales += h * quant.scale_bytes_per_vector();
                kv_f32 += h * 4 * d;
            }
            Op::Gqa { quant, .. } => {
                let (h, d) = heads_and_dim(&graph.node(node.inputs[1]).ty.shape);
                kv += 2 * h * quant.data_bytes_per_vector(d);
                kv_scales += 2 * h * quant.scale_bytes_per_vector();
                kv_f32 += 2 * h * 4 * d;
            }
            _ => {}
        }
    }
    cx.memory_plan = Some(MemoryPlan {
        weight_bytes,
        kv_bytes_per_token: kv,
        kv_scale_bytes_per_token: kv_scales,
        kv_bytes_per_token_f32: kv_f32,
        context_len: context,
        prefill: plan_arena(graph, prefill_len, 0)?,
        decode: plan_arena(graph, 1, context - 1)?,
    });
    Ok(0)
}

fn heads_and_dim(shape: &[slmc_ir::Dim]) -> (usize, usize) {
    let c = |i: usize| shape.get(i).and_then(|d| d.as_const()).unwrap_or(0) as usize;
    (c(1), c(2))
}

/// Plans the arena for one step shape.
pub fn plan_arena(graph: &Graph, tokens: usize, past: usize) -> Result<ArenaPlan, String> {
    let order = graph.topo_order()?;
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let bind = |s: &str| match s {
        "s" => Some(tokens as i64),
        "p" => Some(past as i64),
        _ => None,
    };
    // Buffer roots: reshapes alias their operand; sources and caches are not in the arena.
    let mut root: HashMap<NodeId, NodeId> = HashMap::new();
    let mut size: HashMap<NodeId, usize> = HashMap::new();
    let mut start: HashMap<NodeId, usize> = HashMap::new();
    let mut end: HashMap<NodeId, usize> = HashMap::new();
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    for id in &order {
        let node = graph.node(*id);
        match node.op {
            Op::Input { .. } | Op::Weight { .. } | Op::KvAppend { .. } => continue,
            Op::Reshape { .. } => {
                if let Some(r) = root.get(&node.inputs[0]).copied() {
                    root.insert(*id, r);
                }
                continue;
            }
            _ => {}
        }
        let mut elems = 1usize;
        for d in &node.ty.shape {
            elems *= d.eval(&bind).map_err(|s| format!("%{}: unbound symbol {s}", node.name))? as usize;
        }
        root.insert(*id, *id);
        size.insert(*id, elems * 4);
        start.insert(*id, pos[id]);
        end.insert(*id, pos[id]);
    }
    for id in &order {
        for input in &graph.node(*id).inputs {
            if let Some(r) = root.get(input) {
                let e = end.get_mut(r).expect("roots have lifetimes");
                *e = (*e).max(pos[id]);
            }
        }
    }
    for id in &outputs {
        if let Some(r) = root.get(id) {
            end.insert(*r, usize::MAX);
        }
    }
    let mut buffers: Vec<NodeId> = size.keys().copied().collect();
    buffers.sort_by_key(|b| (std::cmp::Reverse(size[b]), pos[b]));
    let mut placed: Vec<(usize, usize, usize, usize)> = Vec::new(); // (offset, size, start, end)
    let mut arena = 0;
    for b in &buffers {
        let (s, e, len) = (start[b], end[b], size[b]);
        let mut conflicts: Vec<(usize, usize)> =
            placed.iter().filter(|p| p.2 <= e && s <= p.3).map(|p| (p.0, p.0 + p.1)).collect();
        conflicts.sort();
        let mut offset = 0;
        for (lo, hi) in conflicts {
            if offset + len <= lo {
                break;
            }
            offset = offset.max(hi);
        }
        placed.push((offset, len, s, e));
        arena = arena.max(offset + len);
    }
    let mut live_peak = 0;
    for t in 0..order.len() {
        let live: usize = buffers.iter().filter(|b| start[*b] <= t && t <= end[*b]).map(|b| size[b]).sum();
        live_peak = live_peak.max(live);
    }
    Ok(ArenaPlan {
        tokens,
        past,
        buffers: buffers.len(),
        arena_bytes: arena,
        one_buffer_per_value_bytes: size.values().sum(),
        live_peak_bytes: live_peak,
    })
}
