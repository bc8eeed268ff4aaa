//! KV-cache quantization: sets every cache write (`kv_append`, `gqa`) to the requested
//! storage type. The interpreter then stores integer codes with a scale and minimum per
//! (position, head) vector and attends over their dequantized values, except for the
//! `KV_EXACT_WINDOW` positions nearest each query, read exactly (so int8/int4 need `gqa`).

use slmc_ir::{Graph, KvQuant, Op};

use crate::PassContext;

pub fn kv_quant(graph: &mut Graph, cx: &mut PassContext) -> Result<usize, String> {
    let want = cx.options.kv_quant;
    if want == KvQuant::F32 {
        return Ok(0);
    }
    let mut changed = 0;
    let ids: Vec<_> = graph.nodes().map(|(id, _)| id).collect();
    for id in ids {
        if want.is_packed() && matches!(graph.node(id).op, Op::KvAppend { .. }) {
            // Its exact window of recent positions is per query: only the fused op reads it.
            return Err(format!(
                "%{}: an {} cache needs fused attention (gqa, from fuse-rope-attention); this pipeline keeps kv_append",
                graph.node(id).name,
                want.name()
            ));
        }
        match &mut graph.node_mut(id).op {
            Op::KvAppend { quant, .. } | Op::Gqa { quant, .. } if *quant != want => {
                *quant = want;
                changed += 1;
            }
            _ => {}
        }
    }
    Ok(changed)
}
