//! One IR node at a time into MIL operations.

use slmc_ir::{KvQuant, NodeId, Op};

use super::mil::{self, Arg, Dt, MilOp};
use super::*;

impl<'a> Emitter<'a> {
    pub(super) fn lower_node(&mut self, id: NodeId) -> Result<(), CoremlError> {
        let graph = self.graph;
        let node = graph.node(id);
        let hint = node.name.clone();
        let out = match &node.op {
            Op::Input { name } if name == "tokens" => {
                let ids = self.input_ids.clone();
                self.reshape("tokens", &ids, &[self.t()])
            }
            Op::Input { name } => return Err(self.err(id, format!("unexpected graph input `{name}`"))),
            Op::Weight { .. } => return Ok(()), // read by their users
            Op::Positions => self.position_ids.clone(),
            Op::Embed => {
                let table = self.weight(node.inputs[0])?;
                let ids = self.var(node.inputs[1])?;
                let shape = self.shape_of(id)?;
                let inputs = vec![
                    ("x", Arg::Var(&table)),
                    ("indices", Arg::Var(&ids)),
                    ("axis", Arg::Value(mil::i32_value(&[], &[0]))),
                ];
                self.b.op(MilOp::Gather, &hint, inputs, Dt::F16, &shape)
            }
            Op::RmsNorm { eps } => {
                let x = self.var(node.inputs[0])?;
                let w = self.weight(node.inputs[1])?;
                self.rms_norm(&hint, &x, &w, *eps)
            }
            Op::AddRmsNorm { eps } => {
                let a = self.var(node.inputs[0])?;
                let b = self.var(node.inputs[1])?;
                let w = self.weight(node.inputs[2])?;
                let sum = self.binary(MilOp::Add, &format!("{hint}_sum"), &a, &b);
                self.sums.insert((node.inputs[0], node.inputs[1]), sum.clone());
                self.rms_norm(&hint, &sum, &w, *eps)
            }
            Op::LayerNorm { eps } => {
                // The RMS norm of the centered row is the layer norm (its mean square is the
                // variance), and keeps that norm's fp16 range scaling.
                let x = self.var(node.inputs[0])?;
                let w = self.weight(node.inputs[1])?;
                let b = self.weight(node.inputs[2])?;
                let mean = self.reduce(MilOp::ReduceMean, &format!("{hint}_mean"), &x);
                let centered = self.binary(MilOp::Sub, &format!("{hint}_centered"), &x, &mean);
                let normed = self.rms_norm(&format!("{hint}_scaled"), &centered, &w, *eps);
                self.binary(MilOp::Add, &hint, &normed, &b)
            }
            Op::Linear => {
                let x = self.var(node.inputs[0])?;
                let w = self.weight(node.inputs[1])?;
                self.linear(&hint, &x, &w)
            }
            Op::LinearSwiglu => {
                let x = self.var(node.inputs[0])?;
                let w = self.weight(node.inputs[1])?;
                let both = self.linear(&format!("{hint}_gate_up"), &x, &w);
                let f = w.shape[0] / 2;
                let axis = both.shape.len() - 1;
                let gate = self.slice(&format!("{hint}_gate"), &both, axis, 0, f);
                let up = self.slice(&format!("{hint}_up"), &both, axis, f, 2 * f);
                let act = self.unary(MilOp::Silu, &format!("{hint}_silu"), &gate);
                self.binary(MilOp::Mul, &hint, &act, &up)
            }
            Op::Add if self.sums.contains_key(&(node.inputs[0], node.inputs[1])) => {
                self.sums[&(node.inputs[0], node.inputs[1])].clone()
            }
            Op::Add | Op::Mul => {
                let a = self.var(node.inputs[0])?;
                let b = if matches!(graph.node(node.inputs[1]).op, Op::Weight { .. }) {
                    self.weight(node.inputs[1])?
                } else {
                    self.var(node.inputs[1])?
                };
                let op = if matches!(node.op, Op::Add) { MilOp::Add } else { MilOp::Mul };
                self.binary(op, &hint, &a, &b)
            }
            Op::Silu => {
                let x = self.var(node.inputs[0])?;
                self.unary(MilOp::Silu, &hint, &x)
            }
            Op::GeluTanh => {
                // x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)): in fp16 x^3 may overflow to
                // +-inf, which the sigmoid saturates correctly.
                let x = self.var(node.inputs[0])?;
                let x2 = self.binary(MilOp::Mul, &format!("{hint}_x2"), &x, &x);
                let x3 = self.binary(MilOp::Mul, &format!("{hint}_x3"), &x2, &x);
                let c = self.b.scalar_f16(&format!("{hint}_c"), 0.044715);
                let cubic = self.binary(MilOp::Mul, &format!("{hint}_cubic"), &x3, &c);
                let inner = self.binary(MilOp::Add, &format!("{hint}_inner"), &x, &cubic);
                let k = self.b.scalar_f16(&format!("{hint}_k"), 1.595_769_2);
                let scaled = self.binary(MilOp::Mul, &format!("{hint}_scaled"), &inner, &k);
                let gate = self.unary(MilOp::Sigmoid, &format!("{hint}_gate"), &scaled);
                self.binary(MilOp::Mul, &hint, &x, &gate)
            }
            Op::Scale { factor } => {
                // Gemma's scaled embeddings start its residual stream, which grows past the
                // fp16 range (measured over 65504 by layer 8 of Gemma 3 270M): from here the
                // stream is fp32 (adds cast their fp16 operand up; norms scale it back
                // into fp16 range before normalizing), every block itself fp16.
                let x = self.var(node.inputs[0])?;
                let x32 = self.cast(&format!("{hint}_x32"), &x, Dt::F32);
                let f = self.b.scalar_f32(&format!("{hint}_factor"), *factor);
                self.binary(MilOp::Mul, &hint, &x32, &f)
            }
            Op::Softcap { cap } => {
                let x = self.var(node.inputs[0])?;
                let inv = self.b.scalar_f16(&format!("{hint}_inv_cap"), 1.0 / cap);
                let divided = self.binary(MilOp::Mul, &format!("{hint}_divided"), &x, &inv);
                let t = self.unary(MilOp::Tanh, &format!("{hint}_tanh"), &divided);
                let c = self.b.scalar_f16(&format!("{hint}_cap"), *cap);
                self.binary(MilOp::Mul, &hint, &t, &c)
            }
            Op::Reshape { .. } => {
                let x = self.var(node.inputs[0])?;
                let shape = self.shape_of(id)?;
                self.reshape(&hint, &x, &shape)
            }
            Op::Slice { axis, start, end } => {
                let x = self.var(node.inputs[0])?;
                self.slice(&hint, &x, *axis, *start as usize, *end as usize)
            }
            Op::Gqa { layer, scale, rotary, quant, limits } => {
                if !matches!(quant, KvQuant::F32 | KvQuant::F16) {
                    return Err(self.err(
                        id,
                        format!(
                            "a {} KV cache has no Core ML lowering; its cache is fp16 (drop --kv-quant)",
                            quant.name()
                        ),
                    ));
                }
                let q = self.var(node.inputs[0])?;
                let k = self.var(node.inputs[1])?;
                let v = self.var(node.inputs[2])?;
                let (hq, hk, d) = (q.shape[1], k.shape[1], q.shape[2]);
                if self.layers.insert(*layer, (hq, hk, d)).is_some() {
                    return Err(self.err(id, format!("layer {layer} appears twice")));
                }
                self.attention(id, *layer, (*scale, *limits), rotary, (q, k, v), (hq, hk, d))?
            }
            op @ (Op::Rope { .. } | Op::KvAppend { .. } | Op::Attention { .. }) => {
                return Err(CoremlError::UnsupportedOp {
                    backend: "Core ML",
                    node: node.name.clone(),
                    op: op.mnemonic(),
                })
            }
        };
        self.vars.insert(id, out);
        Ok(())
    }
}
