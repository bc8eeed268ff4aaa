//! The ONNX backend: a `ModelProto` (IR version 10, opset 21 + `com.microsoft` 1) written
//! from the optimized IR with hand-declared prost messages, every weight in one external
//! data file (`model.onnx.data`, each tensor at a 4 KiB boundary), and the KV cache as
//! `past_key_values.N.key/value` inputs and `present.N.key/value` outputs, the names
//! onnxruntime-genai expects.
//!
//! Profile `ort-contrib` (target `onnx-cpu`): MatMulNBits for 4-bit weights (block size
//! from the quant scheme; GGUF blocks are re-laid out, never requantized; blocks with a
//! minimum add a per-block offset term), Gemm on f32 for everything else (8-bit blocks
//! included: ONNX Runtime's 8-bit MatMulNBits ran on its slow path),
//! GroupQueryAttention with rotary, SimplifiedLayerNormalization and
//! SkipSimplifiedLayerNormalization. The standard-ops profile (`onnx-portable`) is not
//! written yet and is refused.
//!
//! MatMulNBits `accuracy_level` defaults to 0 (f32 activations): level 4 quantizes the
//! activations to int8 per block, which is faster and flips greedy tokens.

pub mod proto;

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use slmc_ir::{DType, Graph, KvQuant, NodeId, Op, RopeStyle, WeightSource};

use proto::{attr_float, attr_int, data_type, value_info, Dim, NodeProto, TensorProto};

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("%{node}: op `{op}` has no ONNX lowering (the `gpu` pipeline fuses rope/kv_append/attention into gqa)")]
    UnsupportedOp { node: String, op: &'static str },
    #[error("%{node}: {message}")]
    Unsupported { node: String, message: String },
    #[error("weight \"{0}\" is not in the weight store")]
    MissingWeight(String),
    #[error("the {0} ONNX profile is not implemented yet")]
    ProfileNotImplemented(&'static str),
    #[error("the graph does not verify: {0}")]
    Verify(#[from] slmc_ir::VerifyError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnnxProfile {
    /// ONNX Runtime contrib ops (MatMulNBits, GroupQueryAttention, ...).
    OrtContrib,
    /// Standard ops only.
    Portable,
}

pub struct OnnxOptions {
    pub profile: OnnxProfile,
    pub model_name: String,
    /// Positions the rotary tables cover (the longest sequence the model serves).
    pub context_len: usize,
    /// MatMulNBits `accuracy_level`: 0 (f32 activations, the default) or 4 (int8).
    pub accuracy_level: i64,
}

/// The model's shape as the runtime and genai_config.json need it.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxModelInfo {
    pub layers: usize,
    pub kv_heads: usize,
    pub q_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub vocab: usize,
}

pub struct OnnxOutput {
    pub info: OnnxModelInfo,
    /// `model.onnx` and `model.onnx.data`.
    pub files: BTreeMap<String, Vec<u8>>,
}

pub use slmc_targets::artifact::ONNX_MODEL_FILE as MODEL_FILE;
pub use slmc_targets::artifact::ONNX_DATA_FILE as DATA_FILE;
const ALIGN: usize = 4096;

struct Builder<'a> {
    graph: &'a Graph,
    weights: &'a dyn WeightSource,
    opts: &'a OnnxOptions,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    data: Vec<u8>,
    /// IR value -> ONNX tensor name (activations carry a leading batch dim of 1).
    names: HashMap<NodeId, String>,
    /// Weight initializers already written, by (IR weight, use).
    written: HashMap<(NodeId, &'static str), String>,
    counter: usize,
    layers: BTreeMap<usize, (usize, usize, usize)>,
    rope_tables: HashMap<String, (String, String)>,
}

fn dims_of(graph: &Graph, id: NodeId) -> Vec<Option<usize>> {
    graph.node(id).ty.shape.iter().map(|d| d.as_const().map(|c| c as usize)).collect()
}

impl<'a> Builder<'a> {
    fn err(&self, id: NodeId, message: impl Into<String>) -> OnnxError {
        OnnxError::Unsupported { node: self.graph.node(id).name.clone(), message: message.into() }
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}/{}", self.counter)
    }

    fn node(&mut self, op: &str, domain: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<proto::AttributeProto>) {
        let name = format!("{op}_{}", self.nodes.len());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name,
            op_type: op.into(),
            attribute: attrs,
            domain: domain.into(),
            ..Default::default()
        });
    }

    /// An initializer in the external data file, at a 4 KiB boundary.
    fn external(&mut self, name: &str, elem_type: i32, dims: &[i64], bytes: &[u8]) {
        while !self.data.len().is_multiple_of(ALIGN) {
            self.data.push(0);
        }
        let offset = self.data.len();
        self.data.extend_from_slice(bytes);
        let entry = |k: &str, v: String| proto::StringStringEntryProto { key: k.into(), value: v };
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type: elem_type,
            name: name.into(),
            external_data: vec![
                entry("location", DATA_FILE.into()),
                entry("offset", offset.to_string()),
                entry("length", bytes.len().to_string()),
            ],
            data_location: 1,
            ..Default::default()
        });
    }

    /// A small constant kept inside model.onnx.
    fn inline_i64(&mut self, hint: &str, values: &[i64], scalar: bool) -> String {
        let name = self.fresh(hint);
        let dims = if scalar { vec![] } else { vec![values.len() as i64] };
        self.initializers.push(TensorProto {
            dims,
            data_type: data_type::INT64,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name
    }

    fn inline_f32(&mut self, hint: &str, value: f32) -> String {
        let name = self.fresh(hint);
        self.initializers.push(TensorProto {
            dims: vec![],
            data_type: data_type::FLOAT,
            name: name.clone(),
            raw_data: value.to_le_bytes().to_vec(),
            ..Default::default()
        });
        name
    }

    fn name_of(&self, id: NodeId) -> Result<String, OnnxError> {
        self.names.get(&id).cloned().ok_or_else(|| self.err(id, "value has no ONNX tensor"))
    }

    fn weight_view(&self, id: NodeId) -> Result<(String, slmc_ir::WeightView<'a>), OnnxError> {
        let Op::Weight { name } = &self.graph.node(id).op else {
            return Err(self.err(id, "expected a weight operand"));
        };
        let view = self.weights.view(name).ok_or_else(|| OnnxError::MissingWeight(name.clone()))?;
        Ok((name.clone(), view))
    }

    fn weight_f32(&self, id: NodeId) -> Result<(String, Vec<usize>, Vec<f32>), OnnxError> {
        let (name, view) = self.weight_view(id)?;
        let n: usize = view.shape.iter().product();
        let mut values = vec![0.0f32; n];
        slmc_ir::dtype::dequantize_into(view.dtype, &view.bytes, &mut values);
        Ok((name, view.shape.to_vec(), values))
    }

    /// A vector weight (norm scale, bias) as an f32 initializer.
    fn vector(&mut self, id: NodeId) -> Result<String, OnnxError> {
        if let Some(n) = self.written.get(&(id, "vector")) {
            return Ok(n.clone());
        }
        let (name, shape, values) = self.weight_f32(id)?;
        let dims: Vec<i64> = shape.iter().map(|d| *d as i64).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.external(&name, data_type::FLOAT, &dims, &bytes);
        self.written.insert((id, "vector"), name.clone());
        Ok(name)
    }

    /// `y = x w^T` for a weight `[n, k]`: MatMulNBits for 4- and 8-bit blocks, MatMul with
    /// the transposed f32 weight otherwise.
    fn matmul(&mut self, x: &str, w: NodeId, out: &str) -> Result<(), OnnxError> {
        let (name, view) = self.weight_view(w)?;
        let [n, k] = view.shape[..] else {
            return Err(self.err(w, "a linear weight must be a matrix"));
        };
        let dtype = view.dtype;
        let nbits = match dtype {
            DType::Q4_0 | DType::Q4_0G64 | DType::Q4_0G128 | DType::Q4_1 | DType::Q4_1G64 | DType::Q4_1G128 => 4,
            _ => 0,
        };
        if nbits == 0 {
            // f32 (any other stored type is dequantized): Gemm with transB on the [n, k]
            // table itself, so a tied embedding/LM head is stored once for Gather and Gemm.
            // (MatMulNBits with 8 bits, and with float zero points, ran on ONNX Runtime's
            // slow dequantize-every-call path here.)
            let t = self.f32_matrix(w)?;
            let s2 = self.inline_i64("shape", &[-1, k as i64], false);
            let flat = self.fresh(&format!("{out}/rows"));
            self.node("Reshape", "", &[x, &s2], &[&flat], vec![]);
            let y = self.fresh(&format!("{out}/gemm"));
            self.node("Gemm", "", &[&flat, &t], &[&y], vec![attr_int("transB", 1)]);
            let s3 = self.inline_i64("shape", &[1, -1, n as i64], false);
            self.node("Reshape", "", &[&y, &s3], &[out], vec![]);
            return Ok(());
        }
        let key = (w, "matmul");
        let group = dtype.block_len();
        let blocks_per_row = k / group;
        let (b_name, s_name, c_name) = (format!("{name}.q"), format!("{name}.scales"), format!("{name}.block_offsets"));
        let has_min = dtype.q4_has_min() == Some(true);
        if !self.written.contains_key(&key) {
            let (codes, scales, offsets) = matmul_nbits_blocks(dtype, &view.bytes, n * blocks_per_row);
            self.external(&b_name, data_type::UINT8, &[n as i64, blocks_per_row as i64, (group * nbits / 8) as i64], &codes);
            let sb: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.external(&s_name, data_type::FLOAT, &[(n * blocks_per_row) as i64], &sb);
            if has_min {
                // [blocks, n] for MatMul.
                let mut tr = vec![0.0f32; offsets.len()];
                for r in 0..n {
                    for b in 0..blocks_per_row {
                        tr[b * n + r] = offsets[r * blocks_per_row + b];
                    }
                }
                let cb: Vec<u8> = tr.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.external(&c_name, data_type::FLOAT, &[blocks_per_row as i64, n as i64], &cb);
            }
            self.written.insert(key, b_name.clone());
        }
        let attrs = vec![
            attr_int("K", k as i64),
            attr_int("N", n as i64),
            attr_int("bits", nbits as i64),
            attr_int("block_size", group as i64),
            attr_int("accuracy_level", self.opts.accuracy_level),
        ];
        if !has_min {
            self.node("MatMulNBits", "com.microsoft", &[x, &b_name, &s_name], &[out], attrs);
            return Ok(());
        }
        // value = d q + m = d (q - 8) + (m + 8 d): symmetric MatMulNBits (default zero point 8)
        // plus each block's offset c = m + 8 d times the sum of x over that block, so the
        // 4-bit kernel stays on ONNX Runtime's fast path (float zero points leave it).
        let main = self.fresh(&format!("{out}/nbits"));
        self.node("MatMulNBits", "com.microsoft", &[x, &b_name, &s_name], &[&main], attrs);
        let blocked_shape = self.inline_i64("shape", &[0, 0, blocks_per_row as i64, group as i64], false);
        let blocked = self.fresh(&format!("{out}/blocks"));
        self.node("Reshape", "", &[x, &blocked_shape], &[&blocked], vec![]);
        let axes = self.inline_i64("axes", &[-1], false);
        let sums = self.fresh(&format!("{out}/block_sums"));
        self.node("ReduceSum", "", &[&blocked, &axes], &[&sums], vec![attr_int("keepdims", 0)]);
        let correction = self.fresh(&format!("{out}/offsets"));
        self.node("MatMul", "", &[&sums, &c_name], &[&correction], vec![]);
        self.node("Add", "", &[&main, &correction], &[out], vec![]);
        Ok(())
    }

    /// A weight as an f32 `[rows, cols]` initializer (written once, shared by its users).
    fn f32_matrix(&mut self, id: NodeId) -> Result<String, OnnxError> {
        let key = (id, "f32");
        if let Some(t) = self.written.get(&key) {
            return Ok(t.clone());
        }
        let (name, shape, values) = self.weight_f32(id)?;
        let dims: Vec<i64> = shape.iter().map(|d| *d as i64).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.external(&name, data_type::FLOAT, &dims, &bytes);
        self.written.insert(key, name.clone());
        Ok(name)
    }

    fn rope_tables(&mut self, rotary: &slmc_ir::Rotary) -> (String, String) {
        let key = format!("{rotary:?}");
        if let Some(t) = self.rope_tables.get(&key) {
            return t.clone();
        }
        // cos/sin [context, rotary_dim / 2] in f32, computed as the interpreter does.
        let freqs = slmc_ir::interp::rope_inv_freq(rotary.theta, rotary.rotary_dim, &rotary.scaling);
        let ctx = self.opts.context_len;
        let (mut cos, mut sin) = (Vec::with_capacity(ctx * freqs.len() * 4), Vec::with_capacity(ctx * freqs.len() * 4));
        for p in 0..ctx {
            for f in &freqs {
                cos.extend_from_slice(&(p as f32 * f).cos().to_le_bytes());
                sin.extend_from_slice(&(p as f32 * f).sin().to_le_bytes());
            }
        }
        let i = self.rope_tables.len();
        let names = (format!("rope.{i}.cos"), format!("rope.{i}.sin"));
        let dims = [ctx as i64, freqs.len() as i64];
        self.external(&names.0, data_type::FLOAT, &dims, &cos);
        self.external(&names.1, data_type::FLOAT, &dims, &sin);
        self.rope_tables.insert(key, names.clone());
        names
    }

    fn lower_node(&mut self, id: NodeId) -> Result<(), OnnxError> {
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
                let table = self.f32_matrix(node.inputs[0])?;
                let ids = self.name_of(node.inputs[1])?;
                self.node("Gather", "", &[&table, &ids], &[&out], vec![]);
            }
            Op::RmsNorm { eps } => {
                // Standard ops (x / sqrt(mean(x^2) + eps) * w), which ONNX Runtime fuses into
                // its SimplifiedLayerNormalization kernel; that op itself lives in the
                // default domain without an ONNX schema, so onnx.checker would reject it.
                let x = self.name_of(node.inputs[0])?;
                let w = self.vector(node.inputs[1])?;
                let two = self.inline_f32("two", 2.0);
                let eps_c = self.inline_f32("eps", *eps);
                let axes = self.inline_i64("axes", &[-1], false);
                let [sq, mean, shifted, root, normed] =
                    ["pow", "mean", "add_eps", "sqrt", "normalized"].map(|h| self.fresh(&format!("{out}/{h}")));
                self.node("Pow", "", &[&x, &two], &[&sq], vec![]);
                self.node("ReduceMean", "", &[&sq, &axes], &[&mean], vec![attr_int("keepdims", 1)]);
                self.node("Add", "", &[&mean, &eps_c], &[&shifted], vec![]);
                self.node("Sqrt", "", &[&shifted], &[&root], vec![]);
                self.node("Div", "", &[&x, &root], &[&normed], vec![]);
                self.node("Mul", "", &[&normed, &w], &[&out], vec![]);
            }
            Op::AddRmsNorm { eps } => {
                let a = self.name_of(node.inputs[0])?;
                let b = self.name_of(node.inputs[1])?;
                let w = self.vector(node.inputs[2])?;
                self.node("SkipSimplifiedLayerNormalization", "com.microsoft", &[&a, &b, &w], &[&out], vec![
                    attr_float("epsilon", *eps),
                ]);
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
            Op::Add | Op::Mul => {
                let a = self.name_of(node.inputs[0])?;
                let b_id = node.inputs[1];
                let b = if matches!(graph.node(b_id).op, Op::Weight { .. }) {
                    self.vector(b_id)?
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
            Op::Gqa { layer, scale, rotary, quant } => {
                if *quant != KvQuant::F32 {
                    return Err(self.err(
                        id,
                        format!("a {} KV cache has no ONNX lowering yet; the ONNX cache is f32 (drop --kv-quant)", quant.name()),
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
                let mut flat = Vec::new();
                for (i, heads) in [(0, hq), (1, hk), (2, hk)] {
                    let x = self.name_of(node.inputs[i])?;
                    let s = self.inline_i64("shape", &[0, -1, (heads * hd) as i64], false);
                    let f = self.fresh(&format!("{out}/in{i}"));
                    self.node("Reshape", "", &[&x, &s], &[&f], vec![]);
                    flat.push(f);
                }
                let (cos, sin) = self.rope_tables(rotary);
                let (past_k, past_v) = (format!("past_key_values.{layer}.key"), format!("past_key_values.{layer}.value"));
                let (present_k, present_v) = (format!("present.{layer}.key"), format!("present.{layer}.value"));
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
                        attr_int("do_rotary", 1),
                        attr_int("rotary_interleaved", matches!(rotary.style, RopeStyle::Interleaved) as i64),
                    ],
                );
                let s = self.inline_i64("shape", &[0, -1, hq as i64, hd as i64], false);
                self.node("Reshape", "", &[&attn, &s], &[&out], vec![]);
            }
            op @ (Op::Rope { .. } | Op::KvAppend { .. } | Op::Attention { .. }) => {
                return Err(OnnxError::UnsupportedOp { node: node.name.clone(), op: op.mnemonic() })
            }
        }
        if !matches!(node.op, Op::Input { .. } | Op::Weight { .. } | Op::Positions) {
            self.names.insert(id, out);
        }
        Ok(())
    }
}

/// MatMulNBits blocks from ggml 4-bit blocks: codes with element 2i in the low nibble of
/// byte i (ggml puts element i low and i + g/2 high) and f32 scales d, read with the default
/// zero point 8. For blocks with a minimum (value = d q + m) also the block offset m + 8 d,
/// since d q + m = d (q - 8) + (m + 8 d).
fn matmul_nbits_blocks(dtype: DType, bytes: &[u8], blocks: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let g = dtype.block_len();
    let mut codes = Vec::with_capacity(blocks * g / 2);
    let mut scales = Vec::with_capacity(blocks);
    let mut offsets = Vec::new();
    let has_min = dtype.q4_has_min() == Some(true);
    let data_at = if has_min { 4 } else { 2 };
    for b in bytes.chunks_exact(dtype.block_bytes()) {
        let d = slmc_ir::dtype::f16_at(b, 0);
        let q = &b[data_at..data_at + g / 2];
        let nib = |j: usize| if j < g / 2 { q[j] & 0xf } else { q[j - g / 2] >> 4 };
        if has_min {
            offsets.push(slmc_ir::dtype::f16_at(b, 2) + 8.0 * d);
        }
        scales.push(d);
        for i in 0..g / 2 {
            codes.push(nib(2 * i) | (nib(2 * i + 1) << 4));
        }
    }
    (codes, scales, offsets)
}

/// Writes the ONNX model for a graph (input `tokens`, output `logits`).
pub fn compile(graph: &Graph, weights: &dyn WeightSource, opts: &OnnxOptions) -> Result<OnnxOutput, OnnxError> {
    slmc_ir::verify(graph)?;
    if opts.profile == OnnxProfile::Portable {
        return Err(OnnxError::ProfileNotImplemented("portable (standard ops)"));
    }
    let mut b = Builder {
        graph,
        weights,
        opts,
        nodes: Vec::new(),
        initializers: Vec::new(),
        data: Vec::new(),
        names: HashMap::new(),
        written: HashMap::new(),
        counter: 0,
        layers: BTreeMap::new(),
        rope_tables: HashMap::new(),
    };
    // GQA's sequence bookkeeping from the attention mask, as onnxruntime-genai feeds it:
    // seqlens_k = sum(mask) - 1, total_seq_len = mask width.
    let axes = b.inline_i64("axes", &[1], false);
    b.node("ReduceSum", "", &["attention_mask", &axes], &["mask_sum"], vec![attr_int("keepdims", 0)]);
    let one = b.inline_i64("one", &[1], true);
    b.node("Sub", "", &["mask_sum", &one], &["seqlens_k_i64"], vec![]);
    b.node("Cast", "", &["seqlens_k_i64"], &["seqlens_k"], vec![attr_int("to", data_type::INT32 as i64)]);
    b.node("Shape", "", &["attention_mask"], &["mask_shape"], vec![]);
    let idx = b.inline_i64("index", &[1], true);
    b.node("Gather", "", &["mask_shape", &idx], &["total_seq_len_i64"], vec![]);
    b.node("Cast", "", &["total_seq_len_i64"], &["total_seq_len"], vec![attr_int("to", data_type::INT32 as i64)]);

    for id in slmc_ir::text::print_order(graph) {
        b.lower_node(id)?;
    }
    let logits_id = graph.outputs().iter().find(|(n, _)| n == "logits").map(|(_, id)| *id).ok_or_else(|| {
        OnnxError::Unsupported { node: "logits".into(), message: "the graph needs an output `logits`".into() }
    })?;
    let logits = b.name_of(logits_id)?;
    b.node("Identity", "", &[&logits], &["logits"], vec![]);
    let vocab = dims_of(graph, logits_id).last().copied().flatten().unwrap_or(0);
    let hidden = graph
        .nodes()
        .find(|(_, n)| matches!(n.op, Op::Embed))
        .and_then(|(id, _)| dims_of(graph, id).last().copied().flatten())
        .unwrap_or(0);
    let (&_, &(hq, hk, hd)) = b.layers.iter().next().ok_or_else(|| OnnxError::Unsupported {
        node: "gqa".into(),
        message: "the graph has no attention layer".into(),
    })?;
    let n_layers = b.layers.len();
    if b.layers.keys().copied().ne(0..n_layers) {
        return Err(OnnxError::Unsupported { node: "gqa".into(), message: "layers are not numbered 0..n".into() });
    }

    use Dim::{Fixed, Named};
    let mut inputs = vec![
        value_info("input_ids", data_type::INT64, &[Named("batch_size"), Named("sequence_length")]),
        value_info("attention_mask", data_type::INT64, &[Named("batch_size"), Named("total_sequence_length")]),
    ];
    let mut outputs =
        vec![value_info("logits", data_type::FLOAT, &[Named("batch_size"), Named("sequence_length"), Fixed(vocab as i64)])];
    for (layer, (_, kv, d)) in &b.layers {
        for kind in ["key", "value"] {
            let past = [Named("batch_size"), Fixed(*kv as i64), Named("past_sequence_length"), Fixed(*d as i64)];
            inputs.push(value_info(&format!("past_key_values.{layer}.{kind}"), data_type::FLOAT, &past));
            let present = [Named("batch_size"), Fixed(*kv as i64), Named("total_sequence_length"), Fixed(*d as i64)];
            outputs.push(value_info(&format!("present.{layer}.{kind}"), data_type::FLOAT, &present));
        }
    }
    // input_ids is int64; Gather accepts it directly.
    let model = proto::ModelProto {
        ir_version: 10,
        producer_name: "slmc".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(proto::GraphProto {
            node: b.nodes,
            name: opts.model_name.clone(),
            initializer: b.initializers,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        opset_import: vec![
            proto::OperatorSetIdProto { domain: String::new(), version: 21 },
            proto::OperatorSetIdProto { domain: "com.microsoft".into(), version: 1 },
        ],
        ..Default::default()
    };
    let mut files = BTreeMap::new();
    files.insert(MODEL_FILE.to_string(), model.encode_to_vec());
    files.insert(DATA_FILE.to_string(), b.data);
    let info = OnnxModelInfo { layers: n_layers, kv_heads: hk, q_heads: hq, head_dim: hd, hidden, vocab };
    Ok(OnnxOutput { info, files })
}
