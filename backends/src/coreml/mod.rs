//! The Core ML backend: an `.mlpackage` holding an ML program (MIL) written from the
//! optimized IR, for the Neural Engine, checked on Linux (`interp` runs the written program).
//!
//! One function `main` with static shapes (the Neural Engine compiles fixed shapes): each
//! call takes `step_tokens` tokens (`input_ids [1, T]`, their absolute `position_ids [T]`,
//! and an additive fp16 `causal_mask` the caller builds; shorter steps are padded) and
//! returns fp16 `logits [1, T, vocab]`. Activations are fp16; RMSNorm divides by the row's
//! largest magnitude before squaring (fp16 overflow guard, as coremltools does for the ANE).
//!
//! - `coreml-ios18` (specification 9, opset CoreML8): 4-bit weights stay 4-bit through
//!   `constexpr_blockwise_shift_scale` (ggml blocks re-laid out, never requantized; a block
//!   minimum becomes an fp16 offset), 8-bit blocks likewise; the KV cache is fp16 model state
//!   (`read_state`, `slice_update` at the step's position, `write_state`) of `context_len`
//!   positions per layer; attention is `scaled_dot_product_attention`.
//! - `coreml-ios17` (specification 8, opset CoreML7): quantized weights become int8 blocks of
//!   32 columns (`constexpr_affine_dequantize` over a `[blocks, 32]` view, reshaped; ggml
//!   8-bit blocks exactly, 4-bit blocks within 1/510 of their range); the KV cache is passed in (`key_cache_N` /
//!   `value_cache_N`, `[1, kv_heads, context_len, head_dim]`) and the step's new keys and
//!   values come out (`new_key_N` / `new_value_N`, `[1, kv_heads, T, head_dim]`); the mask
//!   covers the cache and then the step (`[1, 1, T, context_len + T]`); attention is spelled
//!   with matmul and softmax.

pub mod mil;
pub mod placement;

// The package format (messages, weight blob, element types, file names) is shared with
// the runtime's reference MIL interpreter, so it lives in `slmc-targets`.
pub use slmc_targets::coreml::{
    blob, broadcast, decode_model, proto, Deployment, MIL_TEXT_FILE, MODEL_FILE, PACKAGE_DIR, PACKAGE_MANIFEST,
    WEIGHTS_FILE,
};

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use slmc_ir::{DType, Graph, KvQuant, NodeId, Op, RopeStyle, Verified, WeightSource};

use mil::{Arg, Builder, Dt, MilOp, Var};

pub use crate::lowering::LoweringError as CoremlError;

pub struct CoremlOptions {
    pub deployment: Deployment,
    pub model_name: String,
    /// Positions the KV cache holds (static).
    pub context_len: usize,
    /// Tokens per call (static; shorter steps are padded).
    pub step_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CoremlModelInfo {
    pub layers: usize,
    pub kv_heads: usize,
    pub q_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

pub struct CoremlOutput {
    pub info: CoremlModelInfo,
    /// Files relative to the artifact directory (the package is `model.mlpackage/`).
    pub files: BTreeMap<String, Vec<u8>>,
    pub placement: placement::Placement,
}

/// Columns per int8 block on iOS 17 (the ggml block size, so Q8_0 blocks stay exact).
const INT8_GROUP: usize = 32;

/// fp16's smallest normal number: the floor of the RMSNorm row scale (all-zero rows).
const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;

struct Emitter<'a> {
    graph: &'a Graph,
    weights: &'a dyn WeightSource,
    opts: &'a CoremlOptions,
    b: Builder,
    vars: HashMap<NodeId, Var>,
    weight_vars: HashMap<String, Var>,
    /// Per rotary: cos and sin gathered at the step's positions, shaped for broadcasting.
    rope: HashMap<String, (Var, Var)>,
    /// The step's cache-write begin index `[0, 0, p, 0]`.
    write_begin: Option<Var>,
    write_ends: HashMap<(usize, usize), Var>,
    tiled_masks: HashMap<usize, Var>,
    /// Sums computed inside an add_rms_norm, reused by the residual `add` of the same operands.
    sums: HashMap<(NodeId, NodeId), Var>,
    layers: BTreeMap<usize, (usize, usize, usize)>,
    input_ids: Var,
    position_ids: Var,
    causal_mask: Var,
    extra_inputs: Vec<proto::NamedValueType>,
    extra_outputs: Vec<Var>,
}

impl<'a> Emitter<'a> {
    fn err(&self, id: NodeId, message: impl Into<String>) -> CoremlError {
        CoremlError::Unsupported { node: self.graph.node(id).name.clone(), message: message.into() }
    }

    fn t(&self) -> usize {
        self.opts.step_tokens
    }

    /// The IR value's static shape with `s` = the step size.
    fn shape_of(&self, id: NodeId) -> Result<Vec<usize>, CoremlError> {
        let t = self.t() as i64;
        self.graph
            .node(id)
            .ty
            .shape
            .iter()
            .map(|d| {
                d.eval(&|s| (s == "s").then_some(t))
                    .map(|v| v as usize)
                    .map_err(|sym| self.err(id, format!("dimension depends on `{sym}`; Core ML needs static shapes")))
            })
            .collect()
    }

    fn var(&self, id: NodeId) -> Result<Var, CoremlError> {
        self.vars.get(&id).cloned().ok_or_else(|| self.err(id, "value has no MIL variable"))
    }

    fn weight_name(&self, id: NodeId) -> Result<String, CoremlError> {
        match &self.graph.node(id).op {
            Op::Weight { name } => Ok(name.clone()),
            _ => Err(self.err(id, "expected a weight operand")),
        }
    }

    /// A weight as an fp16 MIL value: a constant, or (quantized) a constexpr op.
    fn weight(&mut self, id: NodeId) -> Result<Var, CoremlError> {
        let name = self.weight_name(id)?;
        if let Some(v) = self.weight_vars.get(&name) {
            return Ok(v.clone());
        }
        let view = self.weights.view(&name).ok_or_else(|| CoremlError::MissingWeight(name.clone()))?;
        let shape = view.shape.clone();
        let dtype = view.dtype;
        let quantized = !matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
        let var = if shape.len() != 2 || !quantized {
            let values = self.weights.to_f32(&name).ok_or_else(|| CoremlError::MissingWeight(name.clone()))?;
            self.b.const_f16(&name, &shape, &values)
        } else if self.opts.deployment == Deployment::Ios18 && dtype.q4_has_min().is_some() {
            let (codes, scales, offsets) = q4_blockwise(dtype, view.bytes);
            let g = dtype.block_len();
            let sshape = [shape[0], shape[1] / g];
            let data = self.b.blob(Dt::U4, &shape, &blob::pack_u4(&codes));
            let scale = self.b.f16_value(&sshape, &scales);
            let offset = self.b.f16_value(&sshape, &offsets);
            let inputs = vec![("data", Arg::Value(data)), ("scale", Arg::Value(scale)), ("offset", Arg::Value(offset))];
            self.b.op(MilOp::ConstexprBlockwiseShiftScale, &name, inputs, Dt::F16, &shape)
        } else if self.opts.deployment == Deployment::Ios18 && dtype == DType::Q8_0 {
            let (codes, scales) = q8_blockwise(view.bytes);
            let sshape = [shape[0], shape[1] / 32];
            let data = self.b.blob(Dt::I8, &shape, &codes);
            let scale = self.b.f16_value(&sshape, &scales);
            let inputs = vec![("data", Arg::Value(data)), ("scale", Arg::Value(scale))];
            self.b.op(MilOp::ConstexprBlockwiseShiftScale, &name, inputs, Dt::F16, &shape)
        } else {
            // iOS 17: int8 per (row, 32 columns). Its affine dequantization scales along one
            // axis only, so the codes are stored as [rows * k / 32, 32] (one scale and zero
            // point per block) and reshaped, a view, to [rows, k]. Per-row int8 moved logits
            // by ~0.1 and flipped golden tokens at gaps up to 0.17 (measured).
            let n: usize = shape.iter().product();
            if shape[1] % INT8_GROUP != 0 {
                return Err(CoremlError::Unsupported {
                    node: name.clone(),
                    message: format!("{} columns are not a multiple of {INT8_GROUP} (iOS 17 int8 blocks)", shape[1]),
                });
            }
            let blocks = n / INT8_GROUP;
            let (codes, zero_points, scales) = if dtype == DType::Q8_0 {
                q8_as_uint8(view.bytes)
            } else {
                let values = self.weights.to_f32(&name).ok_or_else(|| CoremlError::MissingWeight(name.clone()))?;
                int8_per_row(&values, INT8_GROUP)
            };
            let data = self.b.blob(Dt::U8, &[blocks, INT8_GROUP], &codes);
            let zp = self.b.blob(Dt::U8, &[blocks], &zero_points);
            let scale = self.b.f16_value(&[blocks], &scales);
            let attrs = vec![
                ("quantized_data", data),
                ("zero_point", zp),
                ("scale", scale),
                ("axis", mil::i32_value(&[], &[0])),
            ];
            let blocked = self.b.constexpr_with_attributes(
                MilOp::ConstexprAffineDequantize,
                &format!("{name}_blocks"),
                attrs,
                Dt::F16,
                &[blocks, INT8_GROUP],
            );
            self.reshape(&name, &blocked, &shape)
        };
        self.weight_vars.insert(name, var.clone());
        Ok(var)
    }

    fn binary(&mut self, op: MilOp, hint: &str, x: &Var, y: &Var) -> Var {
        let shape = broadcast(&x.shape, &y.shape);
        self.b.op(op, hint, vec![("x", Arg::Var(x)), ("y", Arg::Var(y))], x.dt, &shape)
    }

    fn unary(&mut self, op: MilOp, hint: &str, x: &Var) -> Var {
        self.b.op(op, hint, vec![("x", Arg::Var(x))], x.dt, &x.shape.clone())
    }

    fn reshape(&mut self, hint: &str, x: &Var, shape: &[usize]) -> Var {
        let name = self.b.fresh(hint);
        self.reshape_named(&name, x, shape)
    }

    /// A reshape whose result has exactly `name` (function outputs).
    fn reshape_named(&mut self, name: &str, x: &Var, shape: &[usize]) -> Var {
        let s: Vec<i32> = shape.iter().map(|d| *d as i32).collect();
        let sv = mil::i32_value(&[s.len()], &s);
        self.b.reserve(name);
        self.b.op_named(MilOp::Reshape, name, vec![("x", Arg::Var(x)), ("shape", Arg::Value(sv))], x.dt, shape)
    }

    fn transpose(&mut self, hint: &str, x: &Var, perm: &[usize]) -> Var {
        let shape: Vec<usize> = perm.iter().map(|p| x.shape[*p]).collect();
        let p: Vec<i32> = perm.iter().map(|v| *v as i32).collect();
        let pv = mil::i32_value(&[p.len()], &p);
        self.b.op(MilOp::Transpose, hint, vec![("x", Arg::Var(x)), ("perm", Arg::Value(pv))], x.dt, &shape)
    }

    /// `x[..., start:end]` on `axis`.
    fn slice(&mut self, hint: &str, x: &Var, axis: usize, start: usize, end: usize) -> Var {
        let r = x.shape.len();
        let mut begin = vec![0i32; r];
        let mut stop: Vec<i32> = x.shape.iter().map(|d| *d as i32).collect();
        begin[axis] = start as i32;
        stop[axis] = end as i32;
        let mut shape = x.shape.clone();
        shape[axis] = end - start;
        let inputs = vec![
            ("x", Arg::Var(x)),
            ("begin", Arg::Value(mil::i32_value(&[r], &begin))),
            ("end", Arg::Value(mil::i32_value(&[r], &stop))),
        ];
        self.b.op(MilOp::SliceByIndex, hint, inputs, x.dt, &shape)
    }

    fn concat(&mut self, hint: &str, parts: &[&Var], axis: usize) -> Var {
        let mut shape = parts[0].shape.clone();
        shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
        let dt = parts[0].dt;
        let inputs = vec![
            ("values", Arg::Tuple(parts.to_vec())),
            ("axis", Arg::Value(mil::i32_value(&[], &[axis as i32]))),
            ("interleave", Arg::Value(mil::bool_value(&[], &[false]))),
        ];
        self.b.op(MilOp::Concat, hint, inputs, dt, &shape)
    }

    fn reduce(&mut self, op: MilOp, hint: &str, x: &Var) -> Var {
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = 1;
        let inputs = vec![
            ("x", Arg::Var(x)),
            ("axes", Arg::Value(mil::i32_value(&[1], &[-1]))),
            ("keep_dims", Arg::Value(mil::bool_value(&[], &[true]))),
        ];
        self.b.op(op, hint, inputs, x.dt, &shape)
    }

    /// rms_norm(x) * w with the row first divided by its largest magnitude, so squares
    /// stay inside fp16's range: x / rms(x) = xs / sqrt(mean(xs^2) + eps / m^2), xs = x / m.
    fn rms_norm(&mut self, hint: &str, x: &Var, w: &Var, eps: f32) -> Var {
        let ax = self.unary(MilOp::Abs, &format!("{hint}_abs"), x);
        let m = self.reduce(MilOp::ReduceMax, &format!("{hint}_max"), &ax);
        let floor = self.b.scalar_f16(&format!("{hint}_floor"), F16_MIN_NORMAL);
        let m = self.binary(MilOp::Maximum, &format!("{hint}_scale"), &m, &floor);
        let xs = self.binary(MilOp::RealDiv, &format!("{hint}_scaled"), x, &m);
        let sq = self.binary(MilOp::Mul, &format!("{hint}_sq"), &xs, &xs);
        let ms = self.reduce(MilOp::ReduceMean, &format!("{hint}_mean"), &sq);
        let m2 = self.binary(MilOp::Mul, &format!("{hint}_scale_sq"), &m, &m);
        let eps_v = self.b.scalar_f16(&format!("{hint}_eps"), eps);
        let e = self.binary(MilOp::RealDiv, &format!("{hint}_eps_scaled"), &eps_v, &m2);
        let tot = self.binary(MilOp::Add, &format!("{hint}_var"), &ms, &e);
        let r = self.unary(MilOp::Rsqrt, &format!("{hint}_rsqrt"), &tot);
        let y = self.binary(MilOp::Mul, &format!("{hint}_normed"), &xs, &r);
        self.binary(MilOp::Mul, hint, &y, w)
    }

    fn linear(&mut self, hint: &str, x: &Var, w: &Var) -> Var {
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = w.shape[0];
        self.b.op(MilOp::Linear, hint, vec![("x", Arg::Var(x)), ("weight", Arg::Var(w))], Dt::F16, &shape)
    }

    /// cos and sin at the step's positions, `[T, 1, r/2]` (half style) or `[T, 1, r/2, 1]`.
    fn rope_tables(&mut self, rotary: &slmc_ir::Rotary) -> (Var, Var) {
        let key = format!("{rotary:?}");
        if let Some(t) = self.rope.get(&key) {
            return t.clone();
        }
        let ctx = self.opts.context_len;
        let (cos, sin) = rotary.tables(ctx);
        let i = self.rope.len();
        let half = rotary.rotary_dim / 2;
        let t = self.t();
        let shape: Vec<usize> =
            if matches!(rotary.style, RopeStyle::Half) { vec![t, 1, half] } else { vec![t, 1, half, 1] };
        let mut out = Vec::new();
        for (what, table) in [("cos", cos), ("sin", sin)] {
            let c = self.b.const_f16(&format!("rope{i}_{what}_table"), &[ctx, half], &table);
            let ids = self.position_ids.clone();
            let inputs =
                vec![("x", Arg::Var(&c)), ("indices", Arg::Var(&ids)), ("axis", Arg::Value(mil::i32_value(&[], &[0])))];
            let g = self.b.op(MilOp::Gather, &format!("rope{i}_{what}"), inputs, Dt::F16, &[t, half]);
            out.push(self.reshape(&format!("rope{i}_{what}_b"), &g, &shape));
        }
        let pair = (out[0].clone(), out[1].clone());
        self.rope.insert(key, pair.clone());
        pair
    }

    /// Rotary embedding of `x [T, h, d]` on its first `rotary_dim` dims.
    fn rotate(&mut self, hint: &str, x: &Var, rotary: &slmc_ir::Rotary) -> Var {
        let (cos, sin) = self.rope_tables(rotary);
        let [t, h, d] = x.shape[..] else { unreachable!("attention operands are [T, heads, dim]") };
        let r = rotary.rotary_dim;
        let xr = if r < d { self.slice(&format!("{hint}_rot_in"), x, 2, 0, r) } else { x.clone() };
        let rotated = match rotary.style {
            RopeStyle::Half => {
                let x1 = self.slice(&format!("{hint}_x1"), &xr, 2, 0, r / 2);
                let x2 = self.slice(&format!("{hint}_x2"), &xr, 2, r / 2, r);
                let a = self.binary(MilOp::Mul, &format!("{hint}_x1c"), &x1, &cos);
                let b = self.binary(MilOp::Mul, &format!("{hint}_x2s"), &x2, &sin);
                let o1 = self.binary(MilOp::Sub, &format!("{hint}_o1"), &a, &b);
                let c = self.binary(MilOp::Mul, &format!("{hint}_x2c"), &x2, &cos);
                let e = self.binary(MilOp::Mul, &format!("{hint}_x1s"), &x1, &sin);
                let o2 = self.binary(MilOp::Add, &format!("{hint}_o2"), &c, &e);
                self.concat(&format!("{hint}_rot"), &[&o1, &o2], 2)
            }
            RopeStyle::Interleaved => {
                let pairs = self.reshape(&format!("{hint}_pairs"), &xr, &[t, h, r / 2, 2]);
                let xe = self.slice(&format!("{hint}_even"), &pairs, 3, 0, 1);
                let xo = self.slice(&format!("{hint}_odd"), &pairs, 3, 1, 2);
                let a = self.binary(MilOp::Mul, &format!("{hint}_ec"), &xe, &cos);
                let b = self.binary(MilOp::Mul, &format!("{hint}_os"), &xo, &sin);
                let oe = self.binary(MilOp::Sub, &format!("{hint}_oe"), &a, &b);
                let c = self.binary(MilOp::Mul, &format!("{hint}_oc"), &xo, &cos);
                let e = self.binary(MilOp::Mul, &format!("{hint}_es"), &xe, &sin);
                let oo = self.binary(MilOp::Add, &format!("{hint}_oo"), &c, &e);
                let cat = self.concat(&format!("{hint}_pairs_rot"), &[&oe, &oo], 3);
                self.reshape(&format!("{hint}_rot"), &cat, &[t, h, r])
            }
        };
        if r < d {
            let rest = self.slice(&format!("{hint}_pass"), x, 2, r, d);
            self.concat(hint, &[&rotated, &rest], 2)
        } else {
            rotated
        }
    }

    /// A KV-cache function input: fp16 model state (iOS 18) or a plain tensor (iOS 17).
    fn cache_input(&mut self, name: &str, shape: &[usize], state: bool) -> Var {
        self.b.reserve(name);
        let ty = if state { mil::state_type(Dt::F16, shape) } else { mil::tensor_type(Dt::F16, shape) };
        self.extra_inputs.push(proto::NamedValueType { name: name.into(), r#type: Some(ty) });
        Var { name: name.into(), dt: Dt::F16, shape: shape.to_vec() }
    }

    /// `x @ y` (or `x @ y^T`) over equal leading dimensions, fp16.
    fn matmul(&mut self, hint: &str, x: &Var, y: &Var, transpose_y: bool) -> Var {
        let r = x.shape.len();
        let mut shape = x.shape.clone();
        shape[r - 1] = if transpose_y { y.shape[r - 2] } else { y.shape[r - 1] };
        let inputs = vec![
            ("x", Arg::Var(x)),
            ("y", Arg::Var(y)),
            ("transpose_x", Arg::Value(mil::bool_value(&[], &[false]))),
            ("transpose_y", Arg::Value(mil::bool_value(&[], &[transpose_y]))),
        ];
        self.b.op(MilOp::Matmul, hint, inputs, Dt::F16, &shape)
    }

    fn tiled_mask(&mut self, group: usize) -> Var {
        if let Some(m) = self.tiled_masks.get(&group) {
            return m.clone();
        }
        let mask = self.causal_mask.clone();
        let m = if group == 1 {
            mask
        } else {
            let mut shape = mask.shape.clone();
            shape[2] *= group;
            let reps = mil::i32_value(&[4], &[1, 1, group as i32, 1]);
            self.b.op(
                MilOp::Tile,
                &format!("causal_mask_x{group}"),
                vec![("x", Arg::Var(&mask)), ("reps", Arg::Value(reps))],
                Dt::F16,
                &shape,
            )
        };
        self.tiled_masks.insert(group, m.clone());
        m
    }

    /// `[0, 0, p, 0]` and `[1, hk, p + T, d]`: where this step's keys and values go.
    fn cache_window(&mut self, hk: usize, d: usize) -> (Var, Var) {
        if self.write_begin.is_none() {
            let pos = self.position_ids.clone();
            let p0 = self.slice("step_start", &pos, 0, 0, 1);
            let zeros2 = self.b.const_i32("zeros2", &[2], &[0, 0]);
            let zero1 = self.b.const_i32("zero1", &[1], &[0]);
            self.write_begin = Some(self.concat("cache_write_begin", &[&zeros2, &p0, &zero1], 0));
        }
        let begin = self.write_begin.clone().unwrap();
        if let Some(e) = self.write_ends.get(&(hk, d)) {
            return (begin, e.clone());
        }
        let extent = self.b.const_i32("cache_write_extent", &[4], &[1, hk as i32, self.t() as i32, d as i32]);
        let end = self.binary(MilOp::Add, "cache_write_end", &begin, &extent);
        self.write_ends.insert((hk, d), end.clone());
        (begin, end)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        id: NodeId,
        layer: usize,
        scale: f32,
        rotary: &slmc_ir::Rotary,
        (q, k, v): (Var, Var, Var),
        (hq, hk, d): (usize, usize, usize),
    ) -> Result<Var, CoremlError> {
        let t = self.t();
        let c = self.opts.context_len;
        if hq % hk != 0 {
            return Err(self.err(id, format!("{hq} query heads are not a multiple of {hk} key/value heads")));
        }
        let g = hq / hk;
        let l = format!("l{layer}");
        let qr = self.rotate(&format!("{l}_q_rope"), &q, rotary);
        let kr = self.rotate(&format!("{l}_k_rope"), &k, rotary);
        let qt = self.transpose(&format!("{l}_q_heads"), &qr, &[1, 0, 2]);
        // Query heads of one key/value head are adjacent: [hq, T, d] = [hk, g * T, d].
        let mut q4 = self.reshape(&format!("{l}_q_groups"), &qt, &[1, hk, g * t, d]);
        let kt = self.transpose(&format!("{l}_k_heads"), &kr, &[1, 0, 2]);
        let vt = self.transpose(&format!("{l}_v_heads"), &v, &[1, 0, 2]);
        let mask = self.tiled_mask(g);
        let attended = match self.opts.deployment {
            Deployment::Ios18 => {
                let k4 = self.reshape(&format!("{l}_k_new"), &kt, &[1, hk, t, d]);
                let v4 = self.reshape(&format!("{l}_v_new"), &vt, &[1, hk, t, d]);
                let (begin, end) = self.cache_window(hk, d);
                let mut caches = Vec::new();
                for (kind, new) in [("key", &k4), ("value", &v4)] {
                    let state = self.cache_input(&format!("{kind}_cache_{layer}"), &[1, hk, c, d], true);
                    let cur = self.b.op(
                        MilOp::ReadState,
                        &format!("{l}_{kind}_cache"),
                        vec![("input", Arg::Var(&state))],
                        Dt::F16,
                        &[1, hk, c, d],
                    );
                    let inputs = vec![
                        ("x", Arg::Var(&cur)),
                        ("update", Arg::Var(new)),
                        ("begin", Arg::Var(&begin)),
                        ("end", Arg::Var(&end)),
                    ];
                    let upd = self.b.op(
                        MilOp::SliceUpdate,
                        &format!("{l}_{kind}_cache_new"),
                        inputs,
                        Dt::F16,
                        &[1, hk, c, d],
                    );
                    self.b.effect(
                        MilOp::WriteState,
                        &format!("{l}_{kind}_cache_write"),
                        vec![("input", Arg::Var(&state)), ("data", Arg::Var(&upd))],
                    );
                    caches.push(upd);
                }
                // The op's scale is fixed at 1/sqrt(d): fold any other scale into q.
                let default = 1.0 / (d as f32).sqrt();
                if (scale - default).abs() > 1e-7 * default {
                    let s = self.b.scalar_f16(&format!("{l}_q_scale"), scale / default);
                    q4 = self.binary(MilOp::Mul, &format!("{l}_q_scaled"), &q4, &s);
                }
                let inputs = vec![
                    ("query", Arg::Var(&q4)),
                    ("key", Arg::Var(&caches[0])),
                    ("value", Arg::Var(&caches[1])),
                    ("attn_mask", Arg::Var(&mask)),
                ];
                self.b.op(
                    MilOp::ScaledDotProductAttention,
                    &format!("{l}_attention"),
                    inputs,
                    Dt::F16,
                    &[1, hk, g * t, d],
                )
            }
            Deployment::Ios17 => {
                let k4 = self.reshape_named(&format!("new_key_{layer}"), &kt, &[1, hk, t, d]);
                let v4 = self.reshape_named(&format!("new_value_{layer}"), &vt, &[1, hk, t, d]);
                let mut all = Vec::new();
                for (kind, new) in [("key", &k4), ("value", &v4)] {
                    let past = self.cache_input(&format!("{kind}_cache_{layer}"), &[1, hk, c, d], false);
                    all.push(self.concat(&format!("{l}_{kind}_all"), &[&past, new], 2));
                }
                self.extra_outputs.push(k4.clone());
                self.extra_outputs.push(v4.clone());
                // Scaling q before the product keeps the fp16 scores small.
                let s = self.b.scalar_f16(&format!("{l}_q_scale"), scale);
                q4 = self.binary(MilOp::Mul, &format!("{l}_q_scaled"), &q4, &s);
                let n = c + t;
                let scores = self.matmul(&format!("{l}_scores"), &q4, &all[0], true);
                let masked = self.binary(MilOp::Add, &format!("{l}_scores_masked"), &scores, &mask);
                let inputs = vec![("x", Arg::Var(&masked)), ("axis", Arg::Value(mil::i32_value(&[], &[-1])))];
                let probs = self.b.op(MilOp::Softmax, &format!("{l}_probs"), inputs, Dt::F16, &[1, hk, g * t, n]);
                self.matmul(&format!("{l}_attention"), &probs, &all[1], false)
            }
        };
        let heads = self.reshape(&format!("{l}_attention_heads"), &attended, &[hq, t, d]);
        Ok(self.transpose(&format!("{l}_attention_out"), &heads, &[1, 0, 2]))
    }

    fn lower_node(&mut self, id: NodeId) -> Result<(), CoremlError> {
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
            Op::Reshape { .. } => {
                let x = self.var(node.inputs[0])?;
                let shape = self.shape_of(id)?;
                self.reshape(&hint, &x, &shape)
            }
            Op::Slice { axis, start, end } => {
                let x = self.var(node.inputs[0])?;
                self.slice(&hint, &x, *axis, *start as usize, *end as usize)
            }
            Op::Gqa { layer, scale, rotary, quant } => {
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
                self.attention(id, *layer, *scale, rotary, (q, k, v), (hq, hk, d))?
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

/// ggml 4-bit blocks as `scale * (code - offset)`: codes in element order, one fp16-able
/// scale and offset per block. Q4_0: offset 8. Q4_1 (d q + m): offset -m / d; a block
/// with d = 0 holds only m, written as codes 1 with scale m and offset 0.
fn q4_blockwise(dtype: DType, bytes: &[u8]) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let g = dtype.block_len();
    let blocks = bytes.len() / dtype.block_bytes();
    let (mut codes, mut scales, mut offsets) =
        (Vec::with_capacity(blocks * g), Vec::with_capacity(blocks), Vec::with_capacity(blocks));
    for b in slmc_ir::blocks::q4_blocks(dtype, bytes) {
        match b.m {
            Some(m) if b.d == 0.0 => {
                codes.extend(std::iter::repeat_n(1u8, g));
                scales.push(m);
                offsets.push(0.0);
            }
            m => {
                codes.extend((0..g).map(|j| b.code(j)));
                scales.push(b.d);
                offsets.push(m.map_or(8.0, |m| -m / b.d));
            }
        }
    }
    (codes, scales, offsets)
}

/// ggml Q8_0 blocks (f16 d, 32 i8) as int8 codes and one scale per block.
fn q8_blockwise(bytes: &[u8]) -> (Vec<u8>, Vec<f32>) {
    let (mut codes, mut scales) = (Vec::new(), Vec::new());
    for b in slmc_ir::blocks::q8_blocks(bytes) {
        scales.push(b.d);
        codes.extend_from_slice(b.codes);
    }
    (codes, scales)
}

/// ggml Q8_0 blocks as uint8 codes with zero point 128, exactly: d q = d ((q + 128) - 128).
fn q8_as_uint8(bytes: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let (mut codes, mut scales) = (Vec::new(), Vec::new());
    for b in slmc_ir::blocks::q8_blocks(bytes) {
        scales.push(b.d);
        codes.extend(b.uint8_codes());
    }
    (codes, vec![128u8; scales.len()], scales)
}

/// Per-row asymmetric 8-bit codes for `values [rows, cols]`: value ~ scale * (code - zero)
/// with the range widened to include 0 and the scale rounded to fp16 before coding.
pub fn int8_per_row(values: &[f32], cols: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let rows = values.len() / cols;
    let (mut codes, mut zeros, mut scales) = (Vec::with_capacity(values.len()), Vec::new(), Vec::new());
    for r in 0..rows {
        let row = &values[r * cols..(r + 1) * cols];
        let lo = row.iter().copied().fold(0.0f32, f32::min);
        let hi = row.iter().copied().fold(0.0f32, f32::max);
        let scale = half::f16::from_f32(((hi - lo) / 255.0).max(1e-7)).to_f32();
        let zero = (-lo / scale).round().clamp(0.0, 255.0);
        for v in row {
            codes.push((v / scale + zero).round().clamp(0.0, 255.0) as u8);
        }
        zeros.push(zero as u8);
        scales.push(scale);
    }
    (codes, zeros, scales)
}

fn feature(name: &str, ty: proto::feature_type::Type) -> proto::FeatureDescription {
    proto::FeatureDescription {
        name: name.into(),
        short_description: String::new(),
        r#type: Some(proto::FeatureType { r#type: Some(ty) }),
    }
}

fn array(dt: Dt, shape: &[usize]) -> proto::ArrayFeatureType {
    let data_type = match dt {
        Dt::F16 => proto::array_data_type::FLOAT16,
        Dt::I32 => proto::array_data_type::INT32,
        _ => proto::array_data_type::FLOAT32,
    };
    proto::ArrayFeatureType { shape: shape.iter().map(|d| *d as i64).collect(), data_type }
}

/// A UUID-shaped identifier derived from the package's bytes, so packages are reproducible.
fn stable_uuid(seed: &[u8], n: u8) -> String {
    let h = slmc_targets::artifact::sha256_hex(&[seed, &[n]].concat()).to_uppercase();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A program with one function `main` holding `block` for `opset`.
fn main_program(opset: &str, inputs: Vec<proto::NamedValueType>, block: proto::Block) -> proto::Program {
    let function = proto::Function {
        inputs,
        opset: opset.to_string(),
        block_specializations: [(opset.to_string(), block)].into_iter().collect(),
        attributes: BTreeMap::new(),
    };
    proto::Program {
        version: 1,
        functions: [("main".to_string(), function)].into_iter().collect(),
        doc_string: String::new(),
        attributes: BTreeMap::new(),
    }
}

/// Writes the `.mlpackage` for a graph (input `tokens`, output `logits`).
pub fn compile(
    verified: &Verified<'_>,
    weights: &dyn WeightSource,
    opts: &CoremlOptions,
) -> Result<CoremlOutput, CoremlError> {
    let graph = verified.graph();
    let (t, c) = (opts.step_tokens, opts.context_len);
    let mask_width = match opts.deployment {
        Deployment::Ios18 => c,
        Deployment::Ios17 => c + t,
    };
    let mut b = Builder::new();
    for n in ["input_ids", "position_ids", "causal_mask", "logits"] {
        b.reserve(n);
    }
    let input_ids = Var { name: "input_ids".into(), dt: Dt::I32, shape: vec![1, t] };
    let position_ids = Var { name: "position_ids".into(), dt: Dt::I32, shape: vec![t] };
    let causal_mask = Var { name: "causal_mask".into(), dt: Dt::F16, shape: vec![1, 1, t, mask_width] };
    let mut e = Emitter {
        graph,
        weights,
        opts,
        b,
        vars: HashMap::new(),
        weight_vars: HashMap::new(),
        rope: HashMap::new(),
        write_begin: None,
        write_ends: HashMap::new(),
        tiled_masks: HashMap::new(),
        sums: HashMap::new(),
        layers: BTreeMap::new(),
        input_ids: input_ids.clone(),
        position_ids: position_ids.clone(),
        causal_mask: causal_mask.clone(),
        extra_inputs: Vec::new(),
        extra_outputs: Vec::new(),
    };
    for id in slmc_ir::text::print_order(graph) {
        e.lower_node(id)?;
    }
    let logits_id = crate::lowering::logits_output(graph)?;
    let last = e.var(logits_id)?;
    let vocab = *last.shape.last().unwrap_or(&0);
    let logits = e.reshape_named("logits", &last, &[1, t, vocab]);
    let ((hq, hk, hd), n_layers) = crate::lowering::attention_layers(&e.layers)?;

    // Function inputs: the step, then (iOS 18) states or (iOS 17) past caches.
    let mut fn_inputs: Vec<proto::NamedValueType> = [&input_ids, &position_ids, &causal_mask]
        .iter()
        .map(|v| proto::NamedValueType { name: v.name.clone(), r#type: Some(mil::tensor_type(v.dt, &v.shape)) })
        .collect();
    fn_inputs.extend(e.extra_inputs.iter().cloned());
    let mut outputs = vec![logits.clone()];
    outputs.extend(e.extra_outputs.iter().cloned());

    let block = proto::Block {
        inputs: vec![],
        outputs: outputs.iter().map(|v| v.name.clone()).collect(),
        operations: std::mem::take(&mut e.b.ops),
        attributes: BTreeMap::new(),
    };
    let program = main_program(opts.deployment.opset(), fn_inputs, block);
    let placement = placement::estimate(&program);

    // The model description mirrors the function's signature.
    use proto::feature_type::Type as F;
    let mut input = vec![
        feature("input_ids", F::MultiArrayType(array(Dt::I32, &input_ids.shape))),
        feature("position_ids", F::MultiArrayType(array(Dt::I32, &position_ids.shape))),
        feature("causal_mask", F::MultiArrayType(array(Dt::F16, &causal_mask.shape))),
    ];
    let mut state = Vec::new();
    for l in 0..n_layers {
        for kind in ["key", "value"] {
            let name = format!("{kind}_cache_{l}");
            let shape = [1, hk, c, hd];
            match opts.deployment {
                Deployment::Ios18 => state.push(feature(
                    &name,
                    F::StateType(proto::StateFeatureType { array_type: Some(array(Dt::F16, &shape)) }),
                )),
                Deployment::Ios17 => input.push(feature(&name, F::MultiArrayType(array(Dt::F16, &shape)))),
            }
        }
    }
    let output = outputs.iter().map(|v| feature(&v.name, F::MultiArrayType(array(v.dt, &v.shape)))).collect();
    let metadata = proto::Metadata {
        short_description: format!("{} for the Neural Engine (slmc)", opts.model_name),
        version_string: String::new(),
        author: "slmc".into(),
        user_defined: [
            ("com.slmc.version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ("com.slmc.step_tokens".to_string(), t.to_string()),
            ("com.slmc.context_len".to_string(), c.to_string()),
        ]
        .into_iter()
        .collect(),
    };
    let model = proto::Model {
        specification_version: opts.deployment.specification_version(),
        description: Some(proto::ModelDescription { input, output, state, metadata: Some(metadata) }),
        ml_program: Some(program),
    };
    let program_text = model.ml_program.as_ref().map(mil::program_text).unwrap_or_default();
    let model_bytes = model.encode_to_vec();
    let weight_bytes = std::mem::take(&mut e.b.blobs).finish();
    let (model_id, weights_id) = (stable_uuid(&model_bytes, 0), stable_uuid(&model_bytes, 1));
    let manifest = serde_json::json!({
        "fileFormatVersion": "1.0.0",
        "itemInfoEntries": {
            model_id.clone(): {
                "author": "com.apple.CoreML",
                "description": "CoreML Model Specification",
                "name": "model.mlmodel",
                "path": "com.apple.CoreML/model.mlmodel",
            },
            weights_id: {
                "author": "com.apple.CoreML",
                "description": "CoreML Model Weights",
                "name": "weights",
                "path": "com.apple.CoreML/weights",
            },
        },
        "rootModelIdentifier": model_id,
    });
    let mut files = BTreeMap::new();
    // Indented as coremltools writes it, so a package it loads and re-saves stays identical.
    let mut manifest_bytes = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    serde::Serialize::serialize(&manifest, &mut serde_json::Serializer::with_formatter(&mut manifest_bytes, fmt))
        .expect("a JSON value serializes");
    manifest_bytes.push(b'\n');
    files.insert(PACKAGE_MANIFEST.to_string(), manifest_bytes);
    files.insert(MODEL_FILE.to_string(), model_bytes);
    // The program as text, for people reading what the compiler wrote (not read by tools).
    files.insert(MIL_TEXT_FILE.to_string(), program_text.into_bytes());
    files.insert(WEIGHTS_FILE.to_string(), weight_bytes);
    let info = CoremlModelInfo { layers: n_layers, kv_heads: hk, q_heads: hq, head_dim: hd, vocab };
    Ok(CoremlOutput { info, files, placement })
}

/// The program's text form of a written package's `model.mlmodel`.
pub fn model_text(model: &proto::Model) -> String {
    model.ml_program.as_ref().map(mil::program_text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::mil::{Arg, Builder, Dt};
    use super::*;

    /// A small program through slmc's declarations, decoded by `coreml-proto`'s full
    /// generated messages: the field numbers and types agree.
    #[test]
    fn coreml_proto_decodes_what_slmc_writes() {
        let mut b = Builder::new();
        let x = mil::Var { name: "x".into(), dt: Dt::F16, shape: vec![2, 16] };
        let w = b.const_f16("w", &[4, 16], &[0.5; 64]);
        let y = b.op(MilOp::Linear, "y", vec![("x", Arg::Var(&x)), ("weight", Arg::Var(&w))], Dt::F16, &[2, 4]);
        let state = proto::NamedValueType { name: "s".into(), r#type: Some(mil::state_type(Dt::F16, &[1, 4])) };
        let block = proto::Block {
            inputs: vec![],
            outputs: vec![y.name.clone()],
            operations: b.ops,
            attributes: Default::default(),
        };
        let inputs =
            vec![proto::NamedValueType { name: "x".into(), r#type: Some(mil::tensor_type(Dt::F16, &[2, 16])) }, state];
        let program = main_program("CoreML8", inputs, block);
        let model = proto::Model { specification_version: 9, description: None, ml_program: Some(program) };
        let bytes = model.encode_to_vec();
        let theirs = <coreml_proto::proto::Model as prost::Message>::decode(bytes.as_slice()).unwrap();
        assert_eq!(theirs.specification_version, 9);
        let Some(coreml_proto::proto::model::Type::MlProgram(p)) = theirs.r#type else { panic!("no ML program") };
        let f = &p.functions["main"];
        assert_eq!(f.opset, "CoreML8");
        let ops = &f.block_specializations["CoreML8"].operations;
        assert_eq!(ops.iter().map(|o| o.r#type.as_str()).collect::<Vec<_>>(), ["const", "linear"]);
        let val = &ops[0].attributes["val"];
        let Some(coreml_proto::proto::mil_spec::value::Value::BlobFileValue(blob)) = &val.value else {
            panic!("64 fp16 values go to the blob file")
        };
        assert_eq!((blob.file_name.as_str(), blob.offset), (mil::WEIGHT_FILE_REF, 64));
        let arg = &ops[1].inputs["weight"].arguments[0];
        assert!(matches!(
            &arg.binding,
            Some(coreml_proto::proto::mil_spec::argument::binding::Binding::Name(n)) if n == &w.name
        ));
        let state_ty = f.inputs[1].r#type.as_ref().unwrap().r#type.as_ref().unwrap();
        assert!(matches!(state_ty, coreml_proto::proto::mil_spec::value_type::Type::StateType(_)));
        // And back through slmc's own declarations.
        assert_eq!(decode_model(&bytes).unwrap(), model);
    }

    #[test]
    fn q4_blocks_become_shift_and_scale_exactly() {
        // One Q4_1 block: d = 0.5, m = -2, codes 0..15 and 15..0; and a d = 0 block holding m.
        let mut bytes = Vec::new();
        for (d, m) in [(0.5f32, -2.0f32), (0.0, 1.5)] {
            bytes.extend(half::f16::from_f32(d).to_le_bytes());
            bytes.extend(half::f16::from_f32(m).to_le_bytes());
            bytes.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        }
        let mut reference = vec![0.0f32; 64];
        slmc_ir::dtype::dequantize_into(DType::Q4_1, &bytes, &mut reference);
        let (codes, scales, offsets) = q4_blockwise(DType::Q4_1, &bytes);
        for (i, r) in reference.iter().enumerate() {
            let b = i / 32;
            assert_eq!(scales[b] * (codes[i] as f32 - offsets[b]), *r, "element {i}");
        }
    }

    #[test]
    fn q8_blocks_become_uint8_exactly() {
        let mut bytes = half::f16::from_f32(0.25).to_le_bytes().to_vec();
        bytes.extend((0..32).map(|i| (i as i8 * 8 - 127) as u8));
        let mut reference = vec![0.0f32; 32];
        slmc_ir::dtype::dequantize_into(DType::Q8_0, &bytes, &mut reference);
        let (codes, zeros, scales) = q8_as_uint8(&bytes);
        for (i, r) in reference.iter().enumerate() {
            assert_eq!(scales[0] * (codes[i] as f32 - zeros[0] as f32), *r, "element {i}");
        }
    }

    #[test]
    fn int8_rows_stay_within_half_a_step() {
        let values: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 9.0) * 0.13).collect();
        let (codes, zeros, scales) = int8_per_row(&values, 32);
        for (i, v) in values.iter().enumerate() {
            let r = i / 32;
            let back = scales[r] * (codes[i] as f32 - zeros[r] as f32);
            assert!((back - v).abs() <= scales[r] * 0.5 + 1e-6, "element {i}: {back} vs {v}");
        }
    }
}
