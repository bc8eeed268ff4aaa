//! The verifier: the gate every graph passes before it is printed, optimized or run.

use std::collections::HashSet;

use crate::graph::{Graph, NodeId};
use crate::op::{KvKind, Op};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VerifyError {
    #[error("%{node}: operand {slot} refers to a value that does not exist")]
    DanglingOperand { node: String, slot: usize },
    #[error("%{node} is part of a cycle")]
    Cycle { node: String },
    #[error("%{node} = {op}: {message}")]
    Type { node: String, op: &'static str, message: String },
    #[error("%{node} = {op}: declared type {declared} but the operands give {inferred}")]
    TypeMismatch { node: String, op: &'static str, declared: String, inferred: String },
    #[error("output \"{output}\" refers to a value that does not exist")]
    DanglingOutput { output: String },
    #[error("the graph has no outputs")]
    NoOutputs,
    #[error("kv_append layer {layer} kind {kind:?} appears more than once (%{node})")]
    DuplicateCacheSlot { layer: usize, kind: crate::op::KvKind, node: String },
}

/// Facts the verifier established, handed to consumers that require a verified graph.
#[derive(Debug, Clone)]
pub struct GraphInfo {
    pub order: Vec<NodeId>,
    /// Number of KV-cache layers (one past the highest `kv_append` layer).
    pub cache_layers: usize,
}

pub fn verify(graph: &Graph) -> Result<GraphInfo, VerifyError> {
    for (_, node) in graph.nodes() {
        for (slot, input) in node.inputs.iter().enumerate() {
            if !graph.contains(*input) {
                return Err(VerifyError::DanglingOperand { node: node.name.clone(), slot });
            }
        }
    }
    let order = graph.topo_order().map_err(|node| VerifyError::Cycle { node })?;
    let mut cache_slots = HashSet::new();
    let mut cache_layers = 0;
    for id in &order {
        let node = graph.node(*id);
        if node.op.is_source() {
            continue;
        }
        let tys: Vec<_> = node.inputs.iter().map(|i| &graph.node(*i).ty).collect();
        let inferred = node.op.infer(&tys).map_err(|message| VerifyError::Type {
            node: node.name.clone(),
            op: node.op.mnemonic(),
            message,
        })?;
        if inferred != node.ty {
            return Err(VerifyError::TypeMismatch {
                node: node.name.clone(),
                op: node.op.mnemonic(),
                declared: node.ty.to_string(),
                inferred: inferred.to_string(),
            });
        }
        let slots: &[(usize, KvKind)] = match node.op {
            Op::KvAppend { layer, kind, .. } => &[(layer, kind)],
            Op::Gqa { layer, .. } => &[(layer, KvKind::Key), (layer, KvKind::Value)],
            _ => &[],
        };
        for &(layer, kind) in slots {
            if !cache_slots.insert((layer, kind)) {
                return Err(VerifyError::DuplicateCacheSlot { layer, kind, node: node.name.clone() });
            }
            cache_layers = cache_layers.max(layer + 1);
        }
    }
    if graph.outputs().is_empty() {
        return Err(VerifyError::NoOutputs);
    }
    for (name, id) in graph.outputs() {
        if !graph.contains(*id) {
            return Err(VerifyError::DanglingOutput { output: name.clone() });
        }
    }
    Ok(GraphInfo { order, cache_layers })
}

/// A graph that passed [`verify`], with what verification found. Code generators take
/// this, not a `Graph`, so an unverified graph cannot reach an emitter.
pub struct Verified<'a> {
    graph: &'a Graph,
    info: GraphInfo,
}

impl<'a> Verified<'a> {
    pub fn new(graph: &'a Graph) -> Result<Verified<'a>, VerifyError> {
        let info = verify(graph)?;
        Ok(Verified { graph, info })
    }

    pub fn graph(&self) -> &'a Graph {
        self.graph
    }

    pub fn info(&self) -> &GraphInfo {
        &self.info
    }
}
