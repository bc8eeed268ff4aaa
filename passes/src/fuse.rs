//! Fusions. Each fused op has interpreter semantics (see `slmc_ir::op`), and every
//! fusion leaves the interpreter's outputs equal up to float rounding.

use std::collections::{BTreeMap, HashSet, VecDeque};

use slmc_ir::{DType, Dim, Graph, KvKind, NodeId, Op, OwnedWeight, Rotary, TensorType, WeightSource};

use crate::cleanup::dead_code_elimination;
use crate::PassContext;

fn users(graph: &Graph, id: NodeId) -> Vec<NodeId> {
    graph.users(id)
}

fn single_user(graph: &Graph, id: NodeId) -> Option<NodeId> {
    let users = graph.users(id);
    let is_output = graph.outputs().iter().any(|(_, o)| *o == id);
    (users.len() == 1 && !is_output).then(|| users[0])
}

fn weight_name(graph: &Graph, id: NodeId) -> Option<&str> {
    match &graph.node(id).op {
        Op::Weight { name } => Some(name),
        _ => None,
    }
}

/// Whether a value flows into attention within a few ops (q/k/v projections do; the
/// MLP's gate/up do not).
fn feeds_attention(graph: &Graph, start: NodeId) -> bool {
    let mut queue = VecDeque::from([(start, 0)]);
    let mut seen = HashSet::new();
    while let Some((id, depth)) = queue.pop_front() {
        if !seen.insert(id) || depth > 4 {
            continue;
        }
        if matches!(graph.node(id).op, Op::Rope { .. } | Op::KvAppend { .. } | Op::Attention { .. } | Op::Gqa { .. }) {
            return true;
        }
        queue.extend(users(graph, id).into_iter().map(|u| (u, depth + 1)));
    }
    false
}

/// Concatenates stored weights along rows (whole rows are whole quantization blocks, so
/// the bytes concatenate as they are) into a derived weight named `a+b+c`.
fn concat_rows(cx: &mut PassContext, names: &[&str]) -> Result<(String, DType, Vec<usize>), String> {
    let fused = names.join("+");
    if let Some(w) = cx.derived.get(&fused) {
        return Ok((fused, w.dtype, w.shape.clone()));
    }
    let weights = cx.weights();
    let mut bytes = Vec::new();
    let (mut dtype, mut rows, mut rest) = (None, 0, Vec::new());
    for name in names {
        let v = weights.view(name).ok_or_else(|| format!("weight \"{name}\" is not in the weight store"))?;
        if dtype.is_some_and(|d| d != v.dtype) || (!rest.is_empty() && rest[..] != v.shape[1..]) {
            return Err(format!("cannot concatenate \"{name}\": its type differs from its siblings"));
        }
        dtype = Some(v.dtype);
        rest = v.shape[1..].to_vec();
        rows += v.shape[0];
        bytes.extend_from_slice(v.bytes);
    }
    let dtype = dtype.ok_or("nothing to concatenate")?;
    let mut shape = vec![rows];
    shape.extend(rest);
    cx.derived.insert(fused.clone(), OwnedWeight { dtype, shape: shape.clone(), bytes });
    Ok((fused, dtype, shape))
}

fn weight_type(dtype: DType, shape: &[usize]) -> TensorType {
    TensorType::new(dtype, shape.iter().map(|d| Dim::from(*d)).collect())
}

/// The bias add directly after a linear: `add(linear, weight[n])`, its only user.
fn bias_of(graph: &Graph, linear: NodeId) -> Option<(NodeId, NodeId)> {
    let user = single_user(graph, linear)?;
    let node = graph.node(user);
    if matches!(node.op, Op::Add) && node.inputs[0] == linear && weight_name(graph, node.inputs[1]).is_some() {
        Some((user, node.inputs[1]))
    } else {
        None
    }
}

/// Fuses linears that read the same input (and weights of one dtype and width) into one
/// linear on the row-concatenated weight, followed by one slice per original.
fn fuse_siblings(graph: &mut Graph, cx: &mut PassContext, attention: bool) -> Result<usize, String> {
    let mut fused = 0;
    for x in graph.topo_order()? {
        if !graph.contains(x) {
            continue;
        }
        // Group the linear users of x by weight dtype and width, in topological order.
        let mut groups: BTreeMap<(DType, String), Vec<NodeId>> = BTreeMap::new();
        for u in users(graph, x) {
            let node = graph.node(u);
            if matches!(node.op, Op::Linear) && node.inputs[0] == x && weight_name(graph, node.inputs[1]).is_some() {
                let w = &graph.node(node.inputs[1]).ty;
                groups.entry((w.dtype, w.shape[1].to_string())).or_default().push(u);
            }
        }
        for (_, members) in groups {
            if members.len() < 2 || members.iter().any(|m| feeds_attention(graph, *m)) != attention {
                continue;
            }
            fuse_group(graph, cx, x, &members)?;
            fused += 1;
        }
    }
    dead_code_elimination(graph);
    Ok(fused)
}

fn fuse_group(graph: &mut Graph, cx: &mut PassContext, x: NodeId, members: &[NodeId]) -> Result<(), String> {
    let names: Vec<String> =
        members.iter().map(|m| weight_name(graph, graph.node(*m).inputs[1]).unwrap().to_string()).collect();
    let name_refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let (wname, dtype, shape) = concat_rows(cx, &name_refs)?;
    // Value names: the members' common prefix plus their suffixes (`l0.q_k_v`).
    let member_names: Vec<String> = members.iter().map(|m| graph.node(*m).name.clone()).collect();
    let prefix = match member_names[0].rfind('.') {
        Some(i) if member_names.iter().all(|n| n.starts_with(&member_names[0][..=i])) => &member_names[0][..=i],
        _ => "",
    };
    let joined: Vec<&str> = member_names.iter().map(|n| &n[prefix.len()..]).collect();
    let base = format!("{prefix}{}", joined.join("_"));
    let w = graph.weight(&graph.fresh_name(&format!("{base}.w")), &wname, weight_type(dtype, &shape))?;
    let mut y = graph.push(&graph.fresh_name(&base), Op::Linear, &[x, w])?;

    let biases: Vec<Option<(NodeId, NodeId)>> = members.iter().map(|m| bias_of(graph, *m)).collect();
    let all_biased = biases.iter().all(|b| b.is_some());
    if all_biased {
        let bias_names: Vec<String> =
            biases.iter().map(|b| weight_name(graph, b.unwrap().1).unwrap().to_string()).collect();
        let refs: Vec<&str> = bias_names.iter().map(|s| s.as_str()).collect();
        let (bname, bdtype, bshape) = concat_rows(cx, &refs)?;
        let bw = graph.weight(&graph.fresh_name(&format!("{base}_bias.w")), &bname, weight_type(bdtype, &bshape))?;
        y = graph.push(&graph.fresh_name(&format!("{base}_biased")), Op::Add, &[y, bw])?;
    }
    let axis = graph.node(x).ty.rank() - 1;
    let mut start = 0i64;
    for (i, m) in members.iter().enumerate() {
        let rows = graph.node(graph.node(*m).inputs[1]).ty.shape[0].as_const().unwrap_or(0);
        // The value the rest of the graph used: the bias add when biases were fused.
        let target = if all_biased { biases[i].unwrap().0 } else { *m };
        let target_name = graph.node(target).name.clone();
        let slice = graph.push(
            &graph.fresh_name(&format!("{target_name}.part")),
            Op::Slice { axis, start, end: start + rows },
            &[y],
        )?;
        start += rows;
        graph.replace_all_uses(target, slice);
        graph.remove(target)?;
        if target != *m {
            graph.remove(*m)?;
        }
        graph.rename(slice, &target_name)?;
    }
    Ok(())
}

pub fn fuse_qkv(graph: &mut Graph, cx: &mut PassContext) -> Result<usize, String> {
    fuse_siblings(graph, cx, true)
}

pub fn fuse_gate_up(graph: &mut Graph, cx: &mut PassContext) -> Result<usize, String> {
    fuse_siblings(graph, cx, false)
}

/// `mul(silu(slice(y, 0..f)), slice(y, f..2f))` with `y = linear(x, w[2f, k])` becomes
/// `linear_swiglu(x, w)`.
pub fn fuse_swiglu(graph: &mut Graph, _cx: &mut PassContext) -> Result<usize, String> {
    let mut fused = 0;
    for m in graph.topo_order()? {
        if !graph.contains(m) || !matches!(graph.node(m).op, Op::Mul) {
            continue;
        }
        let [a, u] = graph.node(m).inputs[..] else { continue };
        if !matches!(graph.node(a).op, Op::Silu) || single_user(graph, a).is_none() {
            continue;
        }
        let g = graph.node(a).inputs[0];
        let (Op::Slice { axis: ga, start: gs, end: ge }, Op::Slice { axis: ua, start: us, end: ue }) =
            (&graph.node(g).op, &graph.node(u).op)
        else {
            continue;
        };
        let y = graph.node(g).inputs[0];
        if graph.node(u).inputs[0] != y || !matches!(graph.node(y).op, Op::Linear) {
            continue;
        }
        let rows = graph.node(y).ty.shape.last().and_then(|d| d.as_const()).unwrap_or(-1);
        let last = graph.node(y).ty.rank() - 1;
        let f = rows / 2;
        if *ga != last || *ua != last || (*gs, *ge, *us, *ue) != (0, f, f, rows) || rows % 2 != 0 {
            continue;
        }
        let mut y_users = users(graph, y);
        y_users.sort();
        let mut expected = vec![g, u];
        expected.sort();
        if y_users != expected || single_user(graph, g) != Some(a) || single_user(graph, u) != Some(m) {
            continue;
        }
        let (x, w) = (graph.node(y).inputs[0], graph.node(y).inputs[1]);
        let name = graph.node(m).name.clone();
        let fusedn = graph.push(&graph.fresh_name(&format!("{name}.fused")), Op::LinearSwiglu, &[x, w])?;
        graph.replace_all_uses(m, fusedn);
        graph.remove(m)?;
        graph.rename(fusedn, &name)?;
        fused += 1;
    }
    dead_code_elimination(graph);
    Ok(fused)
}

/// `rms_norm(add(a, b), w)` with a and b of one shape becomes `add_rms_norm(a, b, w)`; the
/// add stays for its other users (the next residual).
pub fn fuse_add_rmsnorm(graph: &mut Graph, _cx: &mut PassContext) -> Result<usize, String> {
    let mut fused = 0;
    for n in graph.topo_order()? {
        let Op::RmsNorm { eps } = graph.node(n).op else { continue };
        let [s, w] = graph.node(n).inputs[..] else { continue };
        if !matches!(graph.node(s).op, Op::Add) {
            continue;
        }
        let [a, b] = graph.node(s).inputs[..] else { continue };
        if graph.node(a).ty != graph.node(b).ty {
            continue; // a bias add, not a residual
        }
        let name = graph.node(n).name.clone();
        let f = graph.push(&graph.fresh_name(&format!("{name}.fused")), Op::AddRmsNorm { eps }, &[a, b, w])?;
        graph.replace_all_uses(n, f);
        graph.remove(n)?;
        graph.rename(f, &name)?;
        fused += 1;
    }
    dead_code_elimination(graph);
    Ok(fused)
}

/// `attention(rope(q), kv_append(rope(k)), kv_append(v))` becomes `gqa(q, k, v, pos)`.
pub fn fuse_rope_attention(graph: &mut Graph, _cx: &mut PassContext) -> Result<usize, String> {
    let mut fused = 0;
    for at in graph.topo_order()? {
        let Op::Attention { scale, limits } = graph.node(at).op else { continue };
        let [qr, k_all, v_all] = graph.node(at).inputs[..] else { continue };
        let (
            Op::Rope { theta, rotary_dim, style, scaling },
            Op::KvAppend { layer, kind: KvKind::Key, quant },
            Op::KvAppend { layer: vl, kind: KvKind::Value, quant: vq },
        ) = (graph.node(qr).op.clone(), graph.node(k_all).op.clone(), graph.node(v_all).op.clone())
        else {
            continue;
        };
        let kr = graph.node(k_all).inputs[0];
        let rope = Op::Rope { theta, rotary_dim, style, scaling: scaling.clone() };
        if graph.node(kr).op != rope || layer != vl || quant != vq {
            continue;
        }
        let pos = graph.node(qr).inputs[1];
        if graph.node(kr).inputs[1] != pos || [qr, k_all, kr, v_all].iter().any(|v| single_user(graph, *v).is_none()) {
            continue;
        }
        let (q, k, v) = (graph.node(qr).inputs[0], graph.node(kr).inputs[0], graph.node(v_all).inputs[0]);
        let rotary = Rotary { theta, rotary_dim, style, scaling };
        let name = graph.node(at).name.clone();
        // The old chain and the new op write the same cache until the chain is removed;
        // the verifier runs only after the pass.
        let g = graph.push(
            &graph.fresh_name(&format!("{name}.new")),
            Op::Gqa { layer, scale, rotary, quant, limits },
            &[q, k, v, pos],
        )?;
        graph.replace_all_uses(at, g);
        for id in [at, qr, k_all, kr, v_all] {
            graph.remove(id)?;
        }
        graph.rename(g, &name)?;
        fused += 1;
    }
    Ok(fused)
}
