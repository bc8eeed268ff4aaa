//! One IR node at a time into ONNX nodes.

use slmc_ir::{DType, KvQuant, NodeId, Op, RopeStyle};

use super::proto::{attr_float, attr_int};
use super::*;

impl<'a> Builder<'a> {
    /// `x / sqrt(mean(x^2) + eps) * w` in standard ops, which ONNX Runtime fuses into its
    /// SimplifiedLayerNormalization kernel (that op itself lives in the default domain
    /// without an ONNX schema, so onnx.checker would reject it).
    pub(super) fn rms_norm(&mut self, x: &str, w: &str, eps: f32, out: &str) {
        let two = self.inline_f32("two", 2.0);
        let eps_c = self.inline_f32("eps", eps);
        let axes = self.inline_i64("axes", &[-1], false);
        let [sq, mean, shifted, root, normed] =
            ["pow", "mean", "add_eps", "sqrt", "normalized"].map(|h| self.fresh(&format!("{out}/{h}")));
        self.node("Pow", "", &[x, &two], &[&sq], vec![]);
        self.node("ReduceMean", "", &[&sq, &axes], &[&mean], vec![attr_int("keepdims", 1)]);
        self.node("Add", "", &[&mean, &eps_c], &[&shifted], vec![]);
        self.node("Sqrt", "", &[&shifted], &[&root], vec![]);
        self.node("Div", "", &[x, &root], &[&normed], vec![]);
        self.node("Mul", "", &[&normed, w], &[out], vec![]);
    }

    /// cap * tanh(x / cap).
    pub(super) fn softcap(&mut self, x: &str, cap: f32, out: &str) {
        let c = self.inline_f32("softcap", cap);
        let [divided, tanh] = ["divided", "tanh"].map(|h| self.fresh(&format!("{out}/{h}")));
        self.node("Div", "", &[x, &c], &[&divided], vec![]);
        self.node("Tanh", "", &[&divided], &[&tanh], vec![]);
        self.node("Mul", "", &[&tanh, &c], &[out], vec![]);
    }

    pub(super) fn lower_node(&mut self, id: NodeId) -> Result<(), OnnxError> {
        if self.skipped.contains(&id) {
            return Ok(());
        }
        let graph = self.graph;
        let node = graph.node(id);
        // IR values get a prefix so they never collide with the graph's I/O names.
        let out = format!("ir.{}", node.name);
        match &node.op {
            Op::Input { name } if name == "tokens" => {
                self.names.insert(id, "input_ids".into());
            }
            Op::Input { name } => return Err(self.err(id, format!("unexpected graph input `{name}`"))),
            Op::Weight { .. } | Op::Positions => {} // read by their users; GQA derives positions
            Op::Embed => {
                let ids = self.name_of(node.inputs[1])?;
                let table = node.inputs[0];
                // Gather from the 8-bit codes when the LM head reads them anyway, or when
                // nothing needs the f32 table.
                let f32_table_needed = Some(table) == self.head_weight && !self.q8_matmul_nbits(table);
                let q8_table = matches!(self.weight_view(table), Ok((_, v)) if v.dtype == DType::Q8_0);
                if self.opts.profile == OnnxProfile::OrtContrib && q8_table && !f32_table_needed {
                    self.gather_q8(table, &ids, &out)?;
                } else {
                    let table = self.f32_initializer(table)?;
                    self.node("Gather", "", &[&table, &ids], &[&out], vec![]);
                }
            }
            Op::RmsNorm { eps } => {
                let x = self.name_of(node.inputs[0])?;
                let w = self.f32_initializer(node.inputs[1])?;
                self.rms_norm(&x, &w, *eps, &out);
            }
            Op::AddRmsNorm { eps } => {
                let a = self.name_of(node.inputs[0])?;
                let b = self.name_of(node.inputs[1])?;
                let w = self.f32_initializer(node.inputs[2])?;
                if self.opts.profile == OnnxProfile::OrtContrib {
                    let sum = format!("{out}/sum");
                    self.node(
                        "SkipSimplifiedLayerNormalization",
                        "com.microsoft",
                        &[&a, &b, &w],
                        &[&out, "", "", &sum],
                        vec![attr_float("epsilon", *eps)],
                    );
                    self.skip_sums.insert((node.inputs[0], node.inputs[1]), sum);
                } else {
                    let sum = self.fresh(&format!("{out}/sum"));
                    self.node("Add", "", &[&a, &b], &[&sum], vec![]);
                    self.rms_norm(&sum, &w, *eps, &out);
                }
            }
            Op::LayerNorm { eps } => {
                let x = self.name_of(node.inputs[0])?;
                let w = self.f32_initializer(node.inputs[1])?;
                let b = self.f32_initializer(node.inputs[2])?;
                self.node(
                    "LayerNormalization",
                    "",
                    &[&x, &w, &b],
                    &[&out],
                    vec![attr_int("axis", -1), attr_float("epsilon", *eps)],
                );
            }
            Op::Linear => {
                let x = self.name_of(node.inputs[0])?;
                self.matmul(&x, node.inputs[1], &out)?;
            }
            Op::LinearSwiglu => {
                let x = self.name_of(node.inputs[0])?;
                let both = self.fresh(&format!("{out}/gate_up"));
                self.matmul(&x, node.inputs[1], &both)?;
                let f = dims_of(graph, id).last().copied().flatten().ok_or_else(|| self.err(id, "symbolic width"))?;
                let split = self.inline_i64("split", &[f as i64, f as i64], false);
                let (g, u) = (self.fresh(&format!("{out}/gate")), self.fresh(&format!("{out}/up")));
                self.node("Split", "", &[&both, &split], &[&g, &u], vec![attr_int("axis", -1)]);
                let sg = self.fresh(&format!("{out}/sigmoid"));
                self.node("Sigmoid", "", &[&g], &[&sg], vec![]);
                let silu = self.fresh(&format!("{out}/silu"));
                self.node("Mul", "", &[&g, &sg], &[&silu], vec![]);
                self.node("Mul", "", &[&silu, &u], &[&out], vec![]);
            }
            Op::Add if self.skip_sums.contains_key(&(node.inputs[0], node.inputs[1])) => {
                let sum = self.skip_sums[&(node.inputs[0], node.inputs[1])].clone();
                self.names.insert(id, sum);
                return Ok(());
            }
            Op::Add | Op::Mul => {
                let a = self.name_of(node.inputs[0])?;
                let b_id = node.inputs[1];
                let b = if matches!(graph.node(b_id).op, Op::Weight { .. }) {
                    self.f32_initializer(b_id)?
                } else {
                    self.name_of(b_id)?
                };
                let op = if matches!(node.op, Op::Add) { "Add" } else { "Mul" };
                self.node(op, "", &[&a, &b], &[&out], vec![]);
            }
            Op::Silu => {
                let x = self.name_of(node.inputs[0])?;
                let sg = self.fresh(&format!("{out}/sigmoid"));
                self.node("Sigmoid", "", &[&x], &[&sg], vec![]);
                self.node("Mul", "", &[&x, &sg], &[&out], vec![]);
            }
            Op::GeluTanh => {
                // x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) = 0.5 x (1 + tanh(...)).
                let x = self.name_of(node.inputs[0])?;
                let [x2, x3, cubic, inner, scaled, sg] =
                    ["x2", "x3", "cubic", "inner", "scaled", "sigmoid"].map(|h| self.fresh(&format!("{out}/{h}")));
                let (c, k) = (self.inline_f32("gelu_c", 0.044715), self.inline_f32("gelu_k", 1.595_769_2));
                self.node("Mul", "", &[&x, &x], &[&x2], vec![]);
                self.node("Mul", "", &[&x2, &x], &[&x3], vec![]);
                self.node("Mul", "", &[&x3, &c], &[&cubic], vec![]);
                self.node("Add", "", &[&x, &cubic], &[&inner], vec![]);
                self.node("Mul", "", &[&inner, &k], &[&scaled], vec![]);
                self.node("Sigmoid", "", &[&scaled], &[&sg], vec![]);
                self.node("Mul", "", &[&x, &sg], &[&out], vec![]);
            }
            Op::Scale { factor } => {
                let x = self.name_of(node.inputs[0])?;
                let f = self.inline_f32("scale", *factor);
                self.node("Mul", "", &[&x, &f], &[&out], vec![]);
            }
            Op::Softcap { cap } => {
                let x = self.name_of(node.inputs[0])?;
                self.softcap(&x, *cap, &out);
            }
            Op::Reshape { .. } => {
                let x = self.name_of(node.inputs[0])?;
                let d = dims_of(graph, id);
                let mut shape = vec![0i64, -1];
                for v in &d[1..] {
                    shape.push(v.ok_or_else(|| self.err(id, "symbolic inner dimension"))? as i64);
                }
                let s = self.inline_i64("shape", &shape, false);
                self.node("Reshape", "", &[&x, &s], &[&out], vec![]);
            }
            Op::Slice { axis, start, end } => {
                let x = self.name_of(node.inputs[0])?;
                let starts = self.inline_i64("starts", &[*start], false);
                let ends = self.inline_i64("ends", &[*end], false);
                // The ONNX tensor has a leading batch dimension.
                let axes = self.inline_i64("axes", &[*axis as i64 + 1], false);
                self.node("Slice", "", &[&x, &starts, &ends, &axes], &[&out], vec![]);
            }
            Op::Gqa { layer, scale, rotary, quant, limits } => {
                if *quant != KvQuant::F32 {
                    return Err(self.err(
                        id,
                        format!(
                            "a {} KV cache has no ONNX lowering yet; the ONNX cache is f32 (drop --kv-quant)",
                            quant.name()
                        ),
                    ));
                }
                let qd = dims_of(graph, node.inputs[0]);
                let kd = dims_of(graph, node.inputs[1]);
                let (hq, hk, hd) = match (qd[1], kd[1], qd[2]) {
                    (Some(a), Some(b), Some(c)) => (a, b, c),
                    _ => return Err(self.err(id, "symbolic head shapes")),
                };
                if self.layers.insert(*layer, (hq, hk, hd)).is_some() {
                    return Err(self.err(id, format!("layer {layer} appears twice")));
                }
                let (past_k, past_v) =
                    (format!("past_key_values.{layer}.key"), format!("past_key_values.{layer}.value"));
                let (present_k, present_v) = (format!("present.{layer}.key"), format!("present.{layer}.value"));
                if self.opts.profile == OnnxProfile::Portable || !super::attention::gqa_kernel_accepts(hd, rotary) {
                    let q = self.name_of(node.inputs[0])?;
                    let k = self.name_of(node.inputs[1])?;
                    let v = self.name_of(node.inputs[2])?;
                    let io = AttentionIo { past_k, past_v, present_k, present_v, out: out.clone() };
                    self.explicit_attention_layers += 1;
                    self.explicit_attention(&q, &k, &v, (hq, hk, hd), (*scale, *limits), rotary, io);
                    self.names.insert(id, out);
                    return Ok(());
                }
                let mut flat = Vec::new();
                if let Some(x) = self.packed_qkv.get(&id).copied() {
                    // One packed [s, (hq + 2 hk) d] query; key and value omitted.
                    flat = vec![self.name_of(x)?, String::new(), String::new()];
                } else {
                    for (i, heads) in [(0, hq), (1, hk), (2, hk)] {
                        let x = self.name_of(node.inputs[i])?;
                        let s = self.inline_i64("shape", &[0, -1, (heads * hd) as i64], false);
                        let f = self.fresh(&format!("{out}/in{i}"));
                        self.node("Reshape", "", &[&x, &s], &[&f], vec![]);
                        flat.push(f);
                    }
                }
                let rotate = rotary.rotary_dim > 0;
                let (cos, sin) = if rotate { self.rope_tables(rotary) } else { Default::default() };
                self.gqa_sequence_inputs();
                let attn = self.fresh(&format!("{out}/attention"));
                self.node(
                    "GroupQueryAttention",
                    "com.microsoft",
                    &[&flat[0], &flat[1], &flat[2], &past_k, &past_v, "seqlens_k", "total_seq_len", &cos, &sin],
                    &[&attn, &present_k, &present_v],
                    vec![
                        attr_int("num_heads", hq as i64),
                        attr_int("kv_num_heads", hk as i64),
                        attr_float("scale", *scale),
                        attr_int("do_rotary", rotate as i64),
                        attr_int("rotary_interleaved", matches!(rotary.style, RopeStyle::Interleaved) as i64),
                    ]
                    .into_iter()
                    .chain(gqa_limits(limits))
                    .collect(),
                );
                // A reshape to [s, hq * d] as the only reader takes GQA's flat output as is.
                let users = graph.users(id);
                if let [r] = users[..] {
                    if matches!(graph.node(r).op, Op::Reshape { .. }) && dims_of(graph, r).len() == 2 {
                        self.skipped.insert(r);
                        self.names.insert(r, attn.clone());
                        self.names.insert(id, attn);
                        return Ok(());
                    }
                }
                let s = self.inline_i64("shape", &[0, -1, hq as i64, hd as i64], false);
                self.node("Reshape", "", &[&attn, &s], &[&out], vec![]);
            }
            op @ (Op::Rope { .. } | Op::KvAppend { .. } | Op::Attention { .. }) => {
                return Err(OnnxError::UnsupportedOp { backend: "ONNX", node: node.name.clone(), op: op.mnemonic() })
            }
        }
        if !matches!(node.op, Op::Input { .. } | Op::Weight { .. } | Op::Positions) {
            self.names.insert(id, out);
        }
        Ok(())
    }
}

/// GroupQueryAttention's attributes for a sliding window and a score soft cap. ORT's CPU
/// kernel lets a query see `local_window_size` positions including its own, as slmc's
/// window does (measured: w - 1 or no window both leave the Gemma 3 fixture's goldens
/// past its 8-token window; w reproduces them).
fn gqa_limits(limits: &slmc_ir::AttnLimits) -> Vec<super::proto::AttributeProto> {
    let mut attrs = Vec::new();
    if let Some(w) = limits.window {
        attrs.push(attr_int("local_window_size", w as i64));
    }
    if let Some(c) = limits.softcap {
        attrs.push(attr_float("softcap", c));
    }
    attrs
}
