//! What the ONNX and Core ML emitters share: one error type, and the checks both make of an
//! optimized graph (its `logits` output, its attention layers numbered 0..n).

use std::collections::BTreeMap;

use slmc_ir::{Graph, NodeId};

#[derive(Debug, thiserror::Error)]
pub enum LoweringError {
    #[error(
        "%{node}: op `{op}` has no {backend} lowering (the `gpu` pipeline fuses rope/kv_append/attention into gqa)"
    )]
    UnsupportedOp { backend: &'static str, node: String, op: &'static str },
    #[error("%{node}: {message}")]
    Unsupported { node: String, message: String },
    #[error("weight \"{0}\" is not in the weight store")]
    MissingWeight(String),
    #[error("the graph does not verify: {0}")]
    Verify(#[from] slmc_ir::VerifyError),
    #[error("{0}: cannot write: {1}")]
    Io(String, std::io::Error),
}

/// The graph's `logits` output.
pub fn logits_output(graph: &Graph) -> Result<NodeId, LoweringError> {
    graph.outputs().iter().find(|(n, _)| n == "logits").map(|(_, id)| *id).ok_or_else(|| LoweringError::Unsupported {
        node: "logits".into(),
        message: "the graph needs an output `logits`".into(),
    })
}

/// The first attention layer's (query heads, kv heads, head dim) and the number of layers,
/// which must be numbered 0..n (cache inputs and outputs are named by layer).
pub fn attention_layers(
    layers: &BTreeMap<usize, (usize, usize, usize)>,
) -> Result<((usize, usize, usize), usize), LoweringError> {
    let gqa_error =
        |message: &str| LoweringError::Unsupported { node: "attention layers".into(), message: message.into() };
    let first = *layers.values().next().ok_or_else(|| gqa_error("the graph has no attention layer"))?;
    if layers.keys().copied().ne(0..layers.len()) {
        return Err(gqa_error("layers are not numbered 0..n"));
    }
    Ok((first, layers.len()))
}

/// Bytes to reserve for an artifact's weight file: twice the graph's stored weight bytes
/// (re-layouts add scales and alignment). Reserved, not touched: only what an emitter
/// writes becomes resident, and the file never grows by copying itself.
pub fn weight_file_capacity(graph: &Graph, weights: &dyn slmc_ir::WeightSource) -> usize {
    let stored: usize = graph
        .nodes()
        .filter_map(|(_, node)| match &node.op {
            slmc_ir::Op::Weight { name } => weights.view(name).map(|v| v.bytes.len()),
            _ => None,
        })
        .sum();
    stored.saturating_mul(2).saturating_add(1 << 20)
}
