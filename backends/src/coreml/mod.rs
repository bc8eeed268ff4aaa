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
//!   positions per layer (a sliding-window layer: a ring, see `attention::ring_slots`);
//!   attention is `scaled_dot_product_attention`.
//! - `coreml-ios17` (specification 8, opset CoreML7): quantized weights become int8 blocks of
//!   32 columns (`constexpr_affine_dequantize` over a `[blocks, 32]` view, reshaped; ggml
//!   8-bit blocks exactly, 4-bit blocks within 1/510 of their range); the KV cache is passed in (`key_cache_N` /
//!   `value_cache_N`, `[1, kv_heads, context_len, head_dim]`) and the step's new keys and
//!   values come out (`new_key_N` / `new_value_N`, `[1, kv_heads, T, head_dim]`); the mask
//!   covers the cache and then the step (`[1, 1, T, context_len + T]`); attention is spelled
//!   with matmul and softmax.

mod attention;
mod lowering;
pub mod mil;
mod package;
pub mod placement;
mod weights;

// The package format (messages, weight blob, element types, file names) is shared with
// the runtime's reference MIL interpreter, so it lives in `slmc-targets`.
pub use slmc_targets::coreml::{
    blob, broadcast, decode_model, proto, Deployment, MIL_TEXT_FILE, MODEL_FILE, PACKAGE_DIR, PACKAGE_MANIFEST,
    WEIGHTS_FILE,
};

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use slmc_ir::{Graph, NodeId, Op, Verified, WeightSource};

use mil::{Arg, Builder, Dt, MilOp, Var};
use package::{array, feature, main_program, stable_uuid};
pub use weights::int8_per_row;

pub use crate::lowering::LoweringError as CoremlError;

pub struct CoremlOptions {
    pub deployment: Deployment,
    pub model_name: String,
    /// Positions the KV cache holds (static).
    pub context_len: usize,
    /// Tokens per call (static; shorter steps are padded).
    pub step_tokens: usize,
    /// Write the weight blob straight into this directory (the artifact's) instead of
    /// returning it in `files`: a large model's weights are then never held in memory.
    pub weights_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CoremlModelInfo {
    pub layers: usize,
    pub kv_heads: usize,
    pub q_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Positions each layer's cache holds: the context, or a sliding layer's ring.
    pub cache_positions: Vec<usize>,
}

pub struct CoremlOutput {
    pub info: CoremlModelInfo,
    /// Files relative to the artifact directory (the package is `model.mlpackage/`).
    pub files: BTreeMap<String, Vec<u8>>,
    /// Files already written into `weights_dir` (relative paths).
    pub written: Vec<String>,
    pub placement: placement::Placement,
    pub conversions: slmc_targets::artifact::WeightConversions,
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
    conversions: slmc_targets::artifact::WeightConversions,
    /// Per rotary: cos and sin gathered at the step's positions, shaped for broadcasting.
    rope: HashMap<String, (Var, Var)>,
    /// The step's cache-write begin index `[0, 0, p, 0]`.
    write_begin: Option<Var>,
    write_ends: HashMap<(usize, usize), Var>,
    tiled_masks: HashMap<(usize, attention::MaskKind), Var>,
    /// Sums computed inside an add_rms_norm, reused by the residual `add` of the same operands.
    sums: HashMap<(NodeId, NodeId), Var>,
    layers: BTreeMap<usize, (usize, usize, usize)>,
    input_ids: Var,
    position_ids: Var,
    causal_mask: Var,
    extra_inputs: Vec<proto::NamedValueType>,
    /// Sliding-window masks by window (inputs after `causal_mask`), then ring masks and
    /// (iOS 18) ring write slots by window.
    window_masks: BTreeMap<usize, Var>,
    ring_inputs: BTreeMap<usize, (Var, Option<Var>)>,
    /// iOS 18 ring writes' begin and end by (window, kv heads, head dim).
    ring_writes: HashMap<(usize, usize, usize), (Var, Var)>,
    /// Positions each layer's cache holds (the context, or a sliding layer's ring).
    cache_slots: BTreeMap<usize, usize>,
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

    /// `x op y`; an fp16 operand meeting an fp32 one is cast up (the fp32 residual stream).
    fn binary(&mut self, op: MilOp, hint: &str, x: &Var, y: &Var) -> Var {
        let shape = broadcast(&x.shape, &y.shape);
        let (x, y) = match (x.dt, y.dt) {
            (Dt::F32, Dt::F16) => (x.clone(), self.cast(&format!("{hint}_y32"), y, Dt::F32)),
            (Dt::F16, Dt::F32) => (self.cast(&format!("{hint}_x32"), x, Dt::F32), y.clone()),
            _ => (x.clone(), y.clone()),
        };
        self.b.op(op, hint, vec![("x", Arg::Var(&x)), ("y", Arg::Var(&y))], x.dt, &shape)
    }

    fn cast(&mut self, hint: &str, x: &Var, dt: Dt) -> Var {
        let name = match dt {
            Dt::F32 => "fp32",
            _ => "fp16",
        };
        let inputs = vec![("x", Arg::Var(x)), ("dtype", Arg::Value(mil::string_value(name)))];
        self.b.op(MilOp::Cast, hint, inputs, dt, &x.shape.clone())
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
        if x.dt == Dt::F32 {
            return self.rms_norm_of_f32(hint, x, w, eps);
        }
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

    /// RMSNorm of an fp32 row (the residual stream of a model whose activations pass the
    /// fp16 range): scaled by its largest magnitude in fp32, then normalized in fp16 like
    /// any row. eps is scaled the same way, as (eps / m) / m so m * m cannot overflow.
    fn rms_norm_of_f32(&mut self, hint: &str, x: &Var, w: &Var, eps: f32) -> Var {
        let ax = self.unary(MilOp::Abs, &format!("{hint}_abs"), x);
        let m = self.reduce(MilOp::ReduceMax, &format!("{hint}_max"), &ax);
        let floor = self.b.scalar_f32(&format!("{hint}_floor"), F16_MIN_NORMAL);
        let m = self.binary(MilOp::Maximum, &format!("{hint}_scale"), &m, &floor);
        let xs32 = self.binary(MilOp::RealDiv, &format!("{hint}_scaled32"), x, &m);
        let xs = self.cast(&format!("{hint}_scaled"), &xs32, Dt::F16);
        let sq = self.binary(MilOp::Mul, &format!("{hint}_sq"), &xs, &xs);
        let ms = self.reduce(MilOp::ReduceMean, &format!("{hint}_mean"), &sq);
        let eps_v = self.b.scalar_f32(&format!("{hint}_eps"), eps);
        let e1 = self.binary(MilOp::RealDiv, &format!("{hint}_eps_over_scale"), &eps_v, &m);
        let e2 = self.binary(MilOp::RealDiv, &format!("{hint}_eps_scaled32"), &e1, &m);
        let e = self.cast(&format!("{hint}_eps_scaled"), &e2, Dt::F16);
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
    let capacity = crate::lowering::weight_file_capacity(graph, weights);
    let blob_file = slmc_targets::weight_file::WeightFile::at(opts.weights_dir.as_deref(), WEIGHTS_FILE, capacity)
        .map_err(|e| CoremlError::Io(WEIGHTS_FILE.into(), e))?;
    let mut b = Builder::with_blobs(blob::BlobWriter::into_file(blob_file));
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
        conversions: Default::default(),
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
        window_masks: BTreeMap::new(),
        ring_inputs: BTreeMap::new(),
        ring_writes: HashMap::new(),
        cache_slots: BTreeMap::new(),
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
    let step_inputs: Vec<Var> = [&input_ids, &position_ids, &causal_mask]
        .into_iter()
        .chain(e.window_masks.values())
        .cloned()
        .chain(e.ring_inputs.values().flat_map(|(mask, slot)| std::iter::once(mask.clone()).chain(slot.clone())))
        .collect();
    let mut fn_inputs: Vec<proto::NamedValueType> = step_inputs
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
    let mut input: Vec<_> =
        step_inputs.iter().map(|v| feature(&v.name, F::MultiArrayType(array(v.dt, &v.shape)))).collect();
    let cache_positions: Vec<usize> = (0..n_layers).map(|l| e.cache_slots.get(&l).copied().unwrap_or(c)).collect();
    let mut state = Vec::new();
    for (l, slots) in cache_positions.iter().enumerate() {
        for kind in ["key", "value"] {
            let name = format!("{kind}_cache_{l}");
            let shape = [1, hk, *slots, hd];
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
    let weight_file =
        std::mem::take(&mut e.b.blobs).finish().map_err(|err| CoremlError::Io(WEIGHTS_FILE.into(), err))?;
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
    let mut written = Vec::new();
    match weight_file {
        slmc_targets::weight_file::WeightContents::Bytes(bytes) => {
            files.insert(WEIGHTS_FILE.to_string(), bytes);
        }
        slmc_targets::weight_file::WeightContents::Written(_) => written.push(WEIGHTS_FILE.to_string()),
    }
    let info = CoremlModelInfo { layers: n_layers, kv_heads: hk, q_heads: hq, head_dim: hd, vocab, cache_positions };
    Ok(CoremlOutput { info, files, written, placement, conversions: e.conversions })
}

/// The program's text form of a written package's `model.mlmodel`.
pub fn model_text(model: &proto::Model) -> String {
    model.ml_program.as_ref().map(mil::program_text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::mil::{Arg, Builder, Dt};
    use super::weights::{q4_blockwise, q8_as_uint8};
    use super::*;
    use slmc_ir::DType;

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
