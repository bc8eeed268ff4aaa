//! Clean-ups: dead-code elimination, common-subexpression elimination, reshape folding,
//! and de-duplication of weights with identical content.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use slmc_ir::{Graph, NodeId, Op, WeightSource};

use crate::PassContext;

/// Removes every node that no output depends on. Returns the number removed.
pub fn dead_code_elimination(graph: &mut Graph) -> usize {
    let mut live = std::collections::HashSet::new();
    let mut stack: Vec<_> = graph.outputs().iter().map(|(_, id)| *id).collect();
    while let Some(id) = stack.pop() {
        if live.insert(id) {
            stack.extend(graph.node(id).inputs.iter().copied());
        }
    }
    // Remove in reverse topological order so users go before their operands.
    let order = graph.topo_order().unwrap_or_default();
    let mut removed = 0;
    for id in order.into_iter().rev() {
        if !live.contains(&id) && graph.remove(id).is_ok() {
            removed += 1;
        }
    }
    removed
}

pub fn dce(graph: &mut Graph, _cx: &mut PassContext) -> Result<usize, String> {
    Ok(dead_code_elimination(graph))
}

/// Names of the weights a graph references, sorted.
pub fn referenced_weights(graph: &Graph) -> Vec<String> {
    let mut names: Vec<String> = graph
        .nodes()
        .filter_map(|(_, n)| match &n.op {
            Op::Weight { name } => Some(name.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names
}

/// Ops whose result depends only on their operands and attributes.
fn is_pure(op: &Op) -> bool {
    !matches!(op, Op::Input { .. } | Op::KvAppend { .. } | Op::Gqa { .. })
}

/// Merges nodes with the same op, attributes and operands (weights by name) into the
/// first one in topological order.
pub fn cse(graph: &mut Graph, _cx: &mut PassContext) -> Result<usize, String> {
    let order = graph.topo_order()?;
    let mut seen: HashMap<String, NodeId> = HashMap::new();
    let mut merged = 0;
    for id in order {
        let node = graph.node(id);
        if !is_pure(&node.op) {
            continue;
        }
        // Debug text of the op covers its attributes exactly (floats included).
        let key = format!("{:?}|{:?}|{}", node.op, node.inputs, node.ty);
        match seen.get(&key) {
            Some(&first) => {
                graph.replace_all_uses(id, first);
                graph.remove(id)?;
                merged += 1;
            }
            None => {
                seen.insert(key, id);
            }
        }
    }
    Ok(merged)
}

/// `reshape(reshape(x))` becomes one reshape; a reshape to the operand's own type goes.
pub fn fold_reshape(graph: &mut Graph, _cx: &mut PassContext) -> Result<usize, String> {
    let mut folded = 0;
    for id in graph.topo_order()? {
        if !graph.contains(id) || !matches!(graph.node(id).op, Op::Reshape { .. }) {
            continue;
        }
        let input = graph.node(id).inputs[0];
        if graph.node(input).ty == graph.node(id).ty {
            graph.replace_all_uses(id, input);
            graph.remove(id)?;
            folded += 1;
        } else if matches!(graph.node(input).op, Op::Reshape { .. }) {
            let source = graph.node(input).inputs[0];
            graph.set_inputs(id, &[source]);
            folded += 1;
        }
    }
    dead_code_elimination(graph);
    Ok(folded)
}

/// Weight nodes whose stored content is identical (same dtype, shape and bytes) become
/// one node, so a model that stores shared blocks (or a tied table) twice keeps one copy.
pub fn dedup_weights(graph: &mut Graph, cx: &mut PassContext) -> Result<usize, String> {
    let weights = cx.weights();
    let mut by_hash: HashMap<u64, Vec<NodeId>> = HashMap::new();
    let mut merged = 0;
    let mut replacements = Vec::new();
    for id in graph.topo_order()? {
        let Op::Weight { name } = &graph.node(id).op else { continue };
        let view = weights.view(name).ok_or_else(|| format!("weight \"{name}\" is not in the weight store"))?;
        let mut h = DefaultHasher::new();
        (view.dtype, &view.shape, view.bytes).hash(&mut h);
        let candidates = by_hash.entry(h.finish()).or_default();
        let same = candidates.iter().copied().find(|other| {
            let Op::Weight { name: other_name } = &graph.node(*other).op else { return false };
            let o = weights.view(other_name).expect("seen before");
            o.dtype == view.dtype && o.shape == view.shape && o.bytes == view.bytes
        });
        match same {
            Some(first) => replacements.push((id, first)),
            None => candidates.push(id),
        }
    }
    for (dup, first) in replacements {
        graph.replace_all_uses(dup, first);
        graph.remove(dup)?;
        merged += 1;
    }
    Ok(merged)
}
