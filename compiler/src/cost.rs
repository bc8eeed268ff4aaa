//! The cost model written into every bundle manifest (`cost`): the graph's per-token work
//! (`slmc_ir::cost`) with the target's stored weight bytes and cache type, and the decode
//! speed the profile's memory bandwidth allows.

use slmc_ir::cost::TokenCost;
use slmc_ir::{Graph, KvQuant};
use slmc_targets::bundle::{AttentionGroup, CostModel};
use slmc_targets::{BackendKind, TargetProfile};

/// `weight_bytes`: the weights as the target stores them (the memory plan's figure).
pub fn cost_model(graph: &Graph, weight_bytes: u64, profile: &TargetProfile, context_len: usize) -> CostModel {
    // Core ML programs keep their caches in fp16, whatever the graph's cache type.
    let cache = (profile.backend == BackendKind::Coreml).then_some(KvQuant::F16);
    cost_model_with(TokenCost::of(graph), weight_bytes, cache, profile.memory_bandwidth_gbps, context_len)
}

/// The reference interpreter's cost model: it multiplies by f32 copies of the weights
/// (4 bytes for each weight element, which costs 2 FLOPs).
pub fn interpreter_cost_model(graph: &Graph, context_len: usize) -> CostModel {
    let cost = TokenCost::of(graph);
    let weight_bytes = 2 * cost.matmul_flops;
    cost_model_with(cost, weight_bytes, None, None, context_len)
}

/// `cache`: the cache type the target stores when it is not the graph's.
fn cost_model_with(
    mut cost: TokenCost,
    weight_bytes: u64,
    cache: Option<KvQuant>,
    memory_bandwidth_gbps: Option<f64>,
    context_len: usize,
) -> CostModel {
    if let Some(quant) = cache {
        cost.attention.iter_mut().for_each(|a| a.quant = quant);
    }
    let mut attention: Vec<AttentionGroup> = Vec::new();
    for a in &cost.attention {
        let group = AttentionGroup {
            layers: 1,
            flops_per_position: a.flops_per_position(),
            kv_bytes_per_position: a.kv_bytes_per_position(),
            window: a.window,
        };
        let same = |g: &&mut AttentionGroup| {
            (g.flops_per_position, g.kv_bytes_per_position, g.window)
                == (group.flops_per_position, group.kv_bytes_per_position, group.window)
        };
        match attention.iter_mut().find(same) {
            Some(g) => g.layers += 1,
            None => attention.push(group),
        }
    }
    let last = context_len.saturating_sub(1);
    let mut model = CostModel {
        matmul_flops_per_token: cost.matmul_flops,
        attention,
        weight_bytes_per_token: weight_bytes,
        bytes_per_token_first: 0,
        bytes_per_token_last: 0,
        flops_per_token_first: cost.flops_at(0),
        flops_per_token_last: cost.flops_at(last),
        memory_bandwidth_gbps,
        predicted_decode_tokens_per_s_first: None,
        predicted_decode_tokens_per_s_last: None,
        unpredicted: String::new(),
    };
    model.bytes_per_token_first = model.bytes_at(0);
    model.bytes_per_token_last = model.bytes_at(last);
    let per_s = |bytes: u64| memory_bandwidth_gbps.map(|gbps| gbps * 1e9 / bytes.max(1) as f64);
    model.predicted_decode_tokens_per_s_first = per_s(model.bytes_per_token_first);
    model.predicted_decode_tokens_per_s_last = per_s(model.bytes_per_token_last);
    model.unpredicted = match memory_bandwidth_gbps {
        Some(_) => "prefill and energy per token: the profile states no compute or power figure".into(),
        None => "decode, prefill and energy per token: the profile states no memory bandwidth, compute or power \
                 figure (slmc bench measures this machine's bandwidth and predicts from it)"
            .into(),
    };
    model
}
