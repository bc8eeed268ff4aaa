//! The graph: an SSA dataflow graph on petgraph, kept behind slmc's own [`NodeId`].
//!
//! Every node defines exactly one value, named uniquely (`%l0.q`). Operands are kept in
//! the node in operand order; petgraph edges mirror them for graph algorithms.

use std::collections::HashMap;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::op::Op;
use crate::shape::TensorType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(NodeIndex<u32>);

impl NodeId {
    pub fn index(self) -> usize {
        self.0.index()
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub ty: TensorType,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    graph: StableDiGraph<Node, usize>,
    by_name: HashMap<String, NodeId>,
    outputs: Vec<(String, NodeId)>,
}

impl Graph {
    pub fn new(name: &str) -> Graph {
        Graph { name: name.to_string(), ..Graph::default() }
    }

    /// Adds a node with an explicit type. Names must be unique; operands must exist.
    /// The verifier checks the type against the op's rule.
    pub fn add(&mut self, name: &str, op: Op, inputs: &[NodeId], ty: TensorType) -> Result<NodeId, String> {
        if self.by_name.contains_key(name) {
            return Err(format!("value %{name} is defined twice"));
        }
        if let Some(bad) = inputs.iter().find(|i| !self.graph.contains_node(i.0)) {
            return Err(format!("%{name}: operand {bad:?} does not exist"));
        }
        let id = NodeId(self.graph.add_node(Node { name: name.to_string(), op, inputs: inputs.to_vec(), ty }));
        for (slot, input) in inputs.iter().enumerate() {
            self.graph.add_edge(input.0, id.0, slot);
        }
        self.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    /// Adds a node whose type is inferred from its operands.
    pub fn push(&mut self, name: &str, op: Op, inputs: &[NodeId]) -> Result<NodeId, String> {
        let tys: Vec<&TensorType> = inputs.iter().map(|i| &self.node(*i).ty).collect();
        let ty = op.infer(&tys).map_err(|e| format!("%{name} = {}: {e}", op.mnemonic()))?;
        self.add(name, op, inputs, ty)
    }

    /// Returns the existing node for a weight name or adds one, so a weight used twice
    /// (tied embeddings, shared blocks) is one value.
    pub fn weight(&mut self, value_name: &str, weight_name: &str, ty: TensorType) -> Result<NodeId, String> {
        if let Some(existing) =
            self.nodes().find(|(_, n)| n.op.source_name() == Some(weight_name) && matches!(n.op, Op::Weight { .. }))
        {
            let (id, node) = existing;
            if node.ty != ty {
                return Err(format!("weight \"{weight_name}\" used as {} and {ty}", node.ty));
            }
            return Ok(id);
        }
        self.add(value_name, Op::Weight { name: weight_name.to_string() }, &[], ty)
    }

    /// Replaces a node's operands (the parser resolves names after reading every line,
    /// so a hand-written cycle reaches the verifier instead of failing to parse).
    pub fn set_inputs(&mut self, id: NodeId, inputs: &[NodeId]) {
        let old: Vec<_> = self.graph.edges_directed(id.0, Direction::Incoming).map(|e| e.id()).collect();
        for edge in old {
            self.graph.remove_edge(edge);
        }
        for (slot, input) in inputs.iter().enumerate() {
            self.graph.add_edge(input.0, id.0, slot);
        }
        self.graph[id.0].inputs = inputs.to_vec();
    }

    /// Makes every user (and output) of `old` use `new` instead. `old` is left unused.
    pub fn replace_all_uses(&mut self, old: NodeId, new: NodeId) {
        for user in self.users(old) {
            let inputs: Vec<NodeId> = self.node(user).inputs.iter().map(|i| if *i == old { new } else { *i }).collect();
            self.set_inputs(user, &inputs);
        }
        for (_, out) in self.outputs.iter_mut() {
            if *out == old {
                *out = new;
            }
        }
    }

    /// Renames a value; the new name must be free.
    pub fn rename(&mut self, id: NodeId, name: &str) -> Result<(), String> {
        if self.by_name.contains_key(name) {
            return Err(format!("value %{name} is defined twice"));
        }
        let old = std::mem::replace(&mut self.graph[id.0].name, name.to_string());
        self.by_name.remove(&old);
        self.by_name.insert(name.to_string(), id);
        Ok(())
    }

    /// A value name not yet used in the graph, `base` itself when free.
    pub fn fresh_name(&self, base: &str) -> String {
        if !self.by_name.contains_key(base) {
            return base.to_string();
        }
        (1..).map(|i| format!("{base}.{i}")).find(|n| !self.by_name.contains_key(n)).expect("unbounded")
    }

    pub fn set_output(&mut self, name: &str, value: NodeId) {
        self.outputs.retain(|(n, _)| n != name);
        self.outputs.push((name.to_string(), value));
    }

    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.graph[id.0]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.graph[id.0]
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.graph.contains_node(id.0)
    }

    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.by_name.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    /// Nodes in insertion order.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.graph.node_indices().map(|i| (NodeId(i), &self.graph[i]))
    }

    /// Nodes that use `id`, each once, in insertion order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut users: Vec<NodeId> =
            self.graph.edges_directed(id.0, Direction::Outgoing).map(|e| NodeId(e.target())).collect();
        users.sort();
        users.dedup();
        users
    }

    /// Removes a node that nothing uses.
    pub fn remove(&mut self, id: NodeId) -> Result<(), String> {
        if !self.users(id).is_empty() || self.outputs.iter().any(|(_, o)| *o == id) {
            return Err(format!("%{} is still used", self.node(id).name));
        }
        let node = self.graph.remove_node(id.0).expect("checked above");
        self.by_name.remove(&node.name);
        Ok(())
    }

    /// A deterministic topological order: among ready nodes, the earliest inserted first.
    /// On a cycle, returns the name of a node on it.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, String> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut pending: HashMap<NodeId, usize> = HashMap::new();
        let mut ready = BinaryHeap::new();
        for (id, node) in self.nodes() {
            let mut distinct = node.inputs.clone();
            distinct.sort();
            distinct.dedup();
            pending.insert(id, distinct.len());
            if distinct.is_empty() {
                ready.push(Reverse(id));
            }
        }
        let mut order = Vec::with_capacity(self.len());
        while let Some(Reverse(id)) = ready.pop() {
            order.push(id);
            for user in self.users(id) {
                let left = pending.get_mut(&user).expect("every node is pending");
                *left -= 1;
                if *left == 0 {
                    ready.push(Reverse(user));
                }
            }
        }
        if order.len() != self.len() {
            let stuck = self.nodes().find(|(id, _)| pending[id] > 0).map(|(_, n)| n.name.clone());
            return Err(stuck.unwrap_or_default());
        }
        Ok(order)
    }

    /// The graph in Graphviz dot form.
    pub fn to_dot(&self) -> String {
        let mut out = format!("digraph {:?} {{\n  node [shape=box, fontname=monospace];\n", self.name);
        let order = self.topo_order().unwrap_or_else(|_| self.nodes().map(|(id, _)| id).collect());
        for id in &order {
            let node = self.node(*id);
            let label = match node.op.source_name() {
                Some(src) => format!("{} {src:?}\n{}", node.op.mnemonic(), node.ty),
                None => format!("%{} = {}\n{}", node.name, node.op.mnemonic(), node.ty),
            };
            let style = if node.op.is_source() { ", style=filled, fillcolor=lightgrey" } else { "" };
            out.push_str(&format!("  n{} [label={:?}{style}];\n", id.index(), label));
        }
        for id in &order {
            for (slot, input) in self.node(*id).inputs.iter().enumerate() {
                out.push_str(&format!("  n{} -> n{} [label=\"{slot}\"];\n", input.index(), id.index()));
            }
        }
        for (name, id) in &self.outputs {
            out.push_str(&format!("  out_{name} [label={name:?}, shape=oval];\n  n{} -> out_{name};\n", id.index()));
        }
        out.push_str("}\n");
        out
    }
}
