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
//! GroupQueryAttention with rotary reading the packed q/k/v projection, and
//! SkipSimplifiedLayerNormalization whose a+b output is the next residual (GroupQueryAttention's
//! CPU kernel needs head sizes that are multiples of 16; other layers take the standard-ops
//! attention below; plain RMSNorm is spelled in primitives, which ORT fuses).
//!
//! Profile `portable` (target `onnx-portable`): standard ops only. 4-bit weights as uint4
//! initializers with blocked DequantizeLinear (opset 21) and MatMul, rotary embedding and
//! causal attention spelled out (Gather of cos/sin at the step's positions, Concat onto the
//! past cache, MatMul, Where, Softmax), RMSNorm from Pow/ReduceMean/Sqrt/Div/Mul.
//!
//! MatMulNBits `accuracy_level` defaults to 0 (f32 activations): level 4 quantizes the
//! activations to int8 per block, which is faster and flips greedy tokens. The LM head has
//! its own level (default 4): an 8-bit head (GGUF Q8_0, SmolLM2's tied table) then runs as
//! 8-bit MatMulNBits on int8 activations, a quarter of the f32 Gemm's bytes per token, and
//! the embedding gathers the same codes (GatherBlockQuantized); the goldens still hold. ONNX
//! Runtime's 8-bit kernel on f32 activations is its slow path, so level 0 keeps the f32 Gemm.

mod attention;
mod lowering;
pub mod proto;
mod weights;

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use slmc_ir::{Graph, NodeId, Op, Verified, WeightSource};
use slmc_targets::weight_file::{WeightContents, WeightFile};

use proto::{data_type, value_info, Dim, NodeProto, TensorProto};

pub use crate::lowering::LoweringError as OnnxError;

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
    /// The LM head's accuracy level (0 or 4); 8-bit heads need 4 for ONNX Runtime's fast
    /// kernel and take an f32 Gemm at 0.
    pub head_accuracy_level: i64,
    /// Write the weight file straight into this directory (the artifact's) instead of
    /// returning it in `files`: a large model's weights are then never held in memory.
    pub weights_dir: Option<std::path::PathBuf>,
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
    /// Every layer's attention is GroupQueryAttention, which can write the new keys and
    /// values into the past buffer in place (onnxruntime-genai's `past_present_share_buffer`);
    /// the standard-ops attention concatenates and cannot.
    pub kv_buffer_shareable: bool,
}

pub struct OnnxOutput {
    pub info: OnnxModelInfo,
    /// `model.onnx` and `model.onnx.data`.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Files already written into `weights_dir` (relative paths).
    pub written: Vec<String>,
    pub conversions: slmc_targets::artifact::WeightConversions,
}

pub use slmc_targets::artifact::ONNX_DATA_FILE as DATA_FILE;
pub use slmc_targets::artifact::ONNX_MODEL_FILE as MODEL_FILE;
const ALIGN: usize = 4096;

struct Builder<'a> {
    graph: &'a Graph,
    weights: &'a dyn WeightSource,
    opts: &'a OnnxOptions,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    data: WeightFile,
    /// IR value -> ONNX tensor name (activations carry a leading batch dim of 1).
    names: HashMap<NodeId, String>,
    /// Weight initializers already written, by (IR weight, use).
    written: HashMap<(NodeId, &'static str), String>,
    counter: usize,
    layers: BTreeMap<usize, (usize, usize, usize)>,
    rope_tables: HashMap<String, (String, String)>,
    /// Standard-ops attention: the step's positions and causal mask, cos/sin gathered at
    /// those positions (per rotary), the mask tiled per query-group size.
    step_positions: Option<(String, String)>,
    gathered_rope: HashMap<String, (String, String)>,
    /// Causal (and sliding-window) masks tiled for a GQA group size, by (group, window).
    tiled_masks: HashMap<(usize, Option<usize>), String>,
    /// Window sizes whose `step/window_mask_{w}` exists.
    window_masks: std::collections::BTreeSet<usize>,
    /// Contrib profile, fewer nodes: IR values never emitted because their consumer reads
    /// another tensor (q/k/v slices of a packed projection; the flattening of an attention
    /// output that GroupQueryAttention already returns flat).
    skipped: std::collections::HashSet<NodeId>,
    /// gqa -> the packed [s, (hq + 2 hk) d] projection its q, k, v are slices of.
    packed_qkv: HashMap<NodeId, NodeId>,
    /// (a, b) of an emitted SkipSimplifiedLayerNormalization -> its a + b output, which a
    /// later `add(a, b)` reuses instead of adding again.
    skip_sums: HashMap<(NodeId, NodeId), String>,
    gqa_inputs_made: bool,
    /// The LM head's weight (the matrix of the linear that produces `logits`).
    head_weight: Option<NodeId>,
    /// Layers lowered to the standard-ops attention.
    explicit_attention_layers: usize,
    conversions: slmc_targets::artifact::WeightConversions,
}

/// Cache inputs/outputs and the result name of one attention layer.
struct AttentionIo {
    past_k: String,
    past_v: String,
    present_k: String,
    present_v: String,
    out: String,
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
        self.external_with(name, elem_type, dims, |data| data.extend_from_slice(bytes));
    }

    /// `external`, the bytes appended by `write` (a large tensor converted a piece at a time).
    fn external_with(&mut self, name: &str, elem_type: i32, dims: &[i64], write: impl FnOnce(&mut WeightFile)) {
        self.data.pad_to(ALIGN);
        let offset = self.data.len();
        write(&mut self.data);
        let length = self.data.len() - offset;
        let entry = |k: &str, v: String| proto::StringStringEntryProto { key: k.into(), value: v };
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type: elem_type,
            name: name.into(),
            external_data: vec![
                entry("location", DATA_FILE.into()),
                entry("offset", offset.to_string()),
                entry("length", length.to_string()),
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

    /// A weight dequantized to an f32 initializer of its own shape, written once (vectors
    /// such as norm scales and biases, and matrices such as an f32 table shared by Gather and
    /// Gemm).
    fn f32_initializer(&mut self, id: NodeId) -> Result<String, OnnxError> {
        if let Some(n) = self.written.get(&(id, "f32")) {
            return Ok(n.clone());
        }
        let (name, view) = self.weight_view(id)?;
        let dims: Vec<i64> = view.shape.iter().map(|d| *d as i64).collect();
        // A row at a time: an f32 LM head is hundreds of megabytes.
        let row = view.shape.last().copied().unwrap_or(1).max(1);
        let whole = view.dtype.storage_bytes(view.shape.iter().product()) == Some(view.bytes.len());
        let row_bytes = view.dtype.storage_bytes(row).filter(|b| *b > 0 && whole);
        let row_bytes =
            row_bytes.ok_or_else(|| self.err(id, format!("weight `{name}`: bytes do not match its type")))?;
        if view.dtype != slmc_ir::DType::F32 {
            self.conversions.note(view.dtype.name(), "f32 initializer, dequantized at compile time (exact)");
        }
        self.external_with(&name, data_type::FLOAT, &dims, |data| {
            let (mut values, mut bytes) = (vec![0.0f32; row], Vec::with_capacity(row * 4));
            for stored in view.bytes.chunks_exact(row_bytes) {
                slmc_ir::dtype::dequantize_into(view.dtype, stored, &mut values);
                bytes.clear();
                bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
                data.extend_from_slice(&bytes);
            }
        });
        self.written.insert((id, "f32"), name.clone());
        Ok(name)
    }
}

/// Writes the ONNX model for a graph (input `tokens`, output `logits`).
pub fn compile(
    verified: &Verified<'_>,
    weights: &dyn WeightSource,
    opts: &OnnxOptions,
) -> Result<OnnxOutput, OnnxError> {
    let graph = verified.graph();
    let mut b = Builder {
        graph,
        weights,
        opts,
        nodes: Vec::new(),
        initializers: Vec::new(),
        data: WeightFile::at(
            opts.weights_dir.as_deref(),
            DATA_FILE,
            crate::lowering::weight_file_capacity(graph, weights),
        )
        .map_err(|e| OnnxError::Io(DATA_FILE.into(), e))?,
        names: HashMap::new(),
        written: HashMap::new(),
        counter: 0,
        layers: BTreeMap::new(),
        rope_tables: HashMap::new(),
        step_positions: None,
        gathered_rope: HashMap::new(),
        tiled_masks: HashMap::new(),
        window_masks: Default::default(),
        skipped: Default::default(),
        packed_qkv: HashMap::new(),
        skip_sums: HashMap::new(),
        gqa_inputs_made: false,
        head_weight: None,
        explicit_attention_layers: 0,
        conversions: Default::default(),
    };
    let logits_id = crate::lowering::logits_output(graph)?;
    let logits_node = graph.node(logits_id);
    if matches!(logits_node.op, Op::Linear) {
        b.head_weight = logits_node.inputs.get(1).copied();
    }
    if opts.profile == OnnxProfile::OrtContrib {
        b.find_packed_attention();
    }
    for id in slmc_ir::text::print_order(graph) {
        b.lower_node(id)?;
    }
    let logits = b.name_of(logits_id)?;
    b.node("Identity", "", &[&logits], &["logits"], vec![]);
    let vocab = dims_of(graph, logits_id).last().copied().flatten().unwrap_or(0);
    let hidden = graph
        .nodes()
        .find(|(_, n)| matches!(n.op, Op::Embed))
        .and_then(|(id, _)| dims_of(graph, id).last().copied().flatten())
        .unwrap_or(0);
    let ((hq, hk, hd), n_layers) = crate::lowering::attention_layers(&b.layers)?;

    use Dim::{Fixed, Named};
    let mut inputs = vec![
        value_info("input_ids", data_type::INT64, &[Named("batch_size"), Named("sequence_length")]),
        value_info("attention_mask", data_type::INT64, &[Named("batch_size"), Named("total_sequence_length")]),
    ];
    let mut outputs = vec![value_info(
        "logits",
        data_type::FLOAT,
        &[Named("batch_size"), Named("sequence_length"), Fixed(vocab as i64)],
    )];
    for (layer, (_, kv, d)) in &b.layers {
        for kind in ["key", "value"] {
            let past = [Named("batch_size"), Fixed(*kv as i64), Named("past_sequence_length"), Fixed(*d as i64)];
            inputs.push(value_info(&format!("past_key_values.{layer}.{kind}"), data_type::FLOAT, &past));
            let present = [Named("batch_size"), Fixed(*kv as i64), Named("total_sequence_length"), Fixed(*d as i64)];
            outputs.push(value_info(&format!("present.{layer}.{kind}"), data_type::FLOAT, &present));
        }
    }
    let mut opset_import = vec![proto::OperatorSetIdProto { domain: String::new(), version: 21 }];
    if opts.profile == OnnxProfile::OrtContrib {
        opset_import.push(proto::OperatorSetIdProto { domain: "com.microsoft".into(), version: 1 });
    }
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
        opset_import,
        ..Default::default()
    };
    let mut files = BTreeMap::new();
    files.insert(MODEL_FILE.to_string(), model.encode_to_vec());
    let mut written = Vec::new();
    match b.data.finish().map_err(|e| OnnxError::Io(DATA_FILE.into(), e))? {
        WeightContents::Bytes(bytes) => {
            files.insert(DATA_FILE.to_string(), bytes);
        }
        WeightContents::Written(_) => written.push(DATA_FILE.to_string()),
    }
    let kv_buffer_shareable = b.explicit_attention_layers == 0;
    let info =
        OnnxModelInfo { layers: n_layers, kv_heads: hk, q_heads: hq, head_dim: hd, hidden, vocab, kv_buffer_shareable };
    Ok(OnnxOutput { info, files, written, conversions: b.conversions })
}
