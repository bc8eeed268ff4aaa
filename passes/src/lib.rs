//! Graph passes. The optimizer (issue 3) grows here; for now the one clean-up every
//! importer relies on: dead-code elimination.

use slmc_ir::{Graph, Op};

/// Removes every node that no output depends on. `kv_append` nodes are kept only when
/// something reads them, because a cache nobody attends over is dead state.
/// Returns the number of nodes removed.
pub fn dead_code_elimination(graph: &mut Graph) -> usize {
    let mut live = std::collections::HashSet::new();
    let mut stack: Vec<_> = graph.outputs().iter().map(|(_, id)| *id).collect();
    while let Some(id) = stack.pop() {
        if live.insert(id) {
            stack.extend(graph.node(id).inputs.iter().copied());
        }
    }
    let dead: Vec<_> = graph.nodes().map(|(id, _)| id).filter(|id| !live.contains(id)).collect();
    // Remove users before their operands.
    let mut removed = 0;
    let mut pending = dead;
    while !pending.is_empty() {
        let before = pending.len();
        pending.retain(|id| graph.remove(*id).is_err());
        removed += before - pending.len();
        if pending.len() == before {
            break;
        }
    }
    removed
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dce_removes_unused_chains_and_keeps_outputs() {
        let text = r#"graph "g" {
  %tokens = input "tokens" : i32[s]
  %emb = weight "embed" : f32[10, 4]
  %x = embed(%emb, %tokens) : f32[s, 4]
  %dead = silu(%x) : f32[s, 4]
  %dead2 = silu(%dead) : f32[s, 4]
  %y = silu(%x) : f32[s, 4]
  output "logits" = %y
}
"#;
        let mut g = slmc_ir::text::parse(text).unwrap();
        assert_eq!(dead_code_elimination(&mut g), 2);
        slmc_ir::verify(&g).unwrap();
        assert!(!slmc_ir::text::print(&g).contains("dead"));
    }
}
