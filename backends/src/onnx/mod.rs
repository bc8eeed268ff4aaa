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

pub mod proto;

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use slmc_ir::{DType, Graph, KvQuant, NodeId, Op, RopeStyle, Verified, WeightSource};

use proto::{attr_float, attr_int, data_type, value_info, Dim, NodeProto, TensorProto};

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
    data: Vec<u8>,
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
    tiled_masks: HashMap<usize, String>,
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

    /// A weight dequantized to an f32 initializer of its own shape, written once (vectors
    /// such as norm scales and biases, and matrices such as an f32 table shared by Gather and
    /// Gemm).
    fn f32_initializer(&mut self, id: NodeId) -> Result<String, OnnxError> {
        if let Some(n) = self.written.get(&(id, "f32")) {
            return Ok(n.clone());
        }
        let (name, view) = self.weight_view(id)?;
        let dims: Vec<i64> = view.shape.iter().map(|d| *d as i64).collect();
        let values = self.weights.to_f32(&name).ok_or_else(|| OnnxError::MissingWeight(name.clone()))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.external(&name, data_type::FLOAT, &dims, &bytes);
        self.written.insert((id, "f32"), name.clone());
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
        if self.q8_matmul_nbits(w) {
            let (codes, scales) = self.q8_codes(w)?;
            let attrs = vec![
                attr_int("K", k as i64),
                attr_int("N", n as i64),
                attr_int("bits", 8),
                attr_int("block_size", 32),
                attr_int("accuracy_level", self.accuracy_level_of(w)),
            ];
            self.node("MatMulNBits", "com.microsoft", &[x, &codes, &scales], &[out], attrs);
            return Ok(());
        }
        let nbits = match dtype {
            DType::Q4_0 | DType::Q4_0G64 | DType::Q4_0G128 | DType::Q4_1 | DType::Q4_1G64 | DType::Q4_1G128 => 4,
            _ => 0,
        };
        if nbits == 0 {
            // f32 (any other stored type is dequantized): Gemm with transB on the [n, k]
            // table itself, so a tied embedding/LM head is stored once for Gather and Gemm.
            // (MatMulNBits with 8 bits, and with float zero points, ran on ONNX Runtime's
            // slow dequantize-every-call path here.)
            let t = self.f32_initializer(w)?;
            let s2 = self.inline_i64("shape", &[-1, k as i64], false);
            let flat = self.fresh(&format!("{out}/rows"));
            self.node("Reshape", "", &[x, &s2], &[&flat], vec![]);
            let y = self.fresh(&format!("{out}/gemm"));
            self.node("Gemm", "", &[&flat, &t], &[&y], vec![attr_int("transB", 1)]);
            let s3 = self.inline_i64("shape", &[1, -1, n as i64], false);
            self.node("Reshape", "", &[&y, &s3], &[out], vec![]);
            return Ok(());
        }
        if self.opts.profile == OnnxProfile::Portable {
            return self.dequantize_matmul(x, w, out);
        }
        let key = (w, "matmul");
        let group = dtype.block_len();
        let blocks_per_row = k / group;
        let (b_name, s_name, c_name) = (format!("{name}.q"), format!("{name}.scales"), format!("{name}.block_offsets"));
        let has_min = dtype.q4_has_min() == Some(true);
        if !self.written.contains_key(&key) {
            let (codes, scales, offsets) = matmul_nbits_blocks(dtype, view.bytes, n * blocks_per_row);
            self.external(
                &b_name,
                data_type::UINT8,
                &[n as i64, blocks_per_row as i64, (group * nbits / 8) as i64],
                &codes,
            );
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
            attr_int("accuracy_level", self.accuracy_level_of(w)),
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
        self.add_block_offsets(x, &main, &c_name, (blocks_per_row, group), out);
        Ok(())
    }

    fn accuracy_level_of(&self, w: NodeId) -> i64 {
        if Some(w) == self.head_weight {
            self.opts.head_accuracy_level
        } else {
            self.opts.accuracy_level
        }
    }

    /// Whether 8-bit blocks of `w` run as 8-bit MatMulNBits: only with int8 activations
    /// (ONNX Runtime 1.31's 8-bit kernel on f32 activations dequantizes every call, 30x slower
    /// than an f32 Gemm here).
    fn q8_matmul_nbits(&self, w: NodeId) -> bool {
        self.opts.profile == OnnxProfile::OrtContrib
            && self.accuracy_level_of(w) == 4
            && matches!(self.weight_view(w), Ok((_, v)) if v.dtype == DType::Q8_0 && v.shape.len() == 2)
    }

    /// Q8_0 blocks of a `[n, k]` weight as MatMulNBits' 8-bit `[n, k / 32, 32]` codes (the
    /// int8 values + 128, read with the default zero point 128) and f32 scales `[n k / 32]`,
    /// written once. Exact: each value is d (c - 128) = d q.
    fn q8_codes(&mut self, w: NodeId) -> Result<(String, String), OnnxError> {
        let (name, view) = self.weight_view(w)?;
        let (codes_name, scales_name) = (format!("{name}.q8"), format!("{name}.q8_scales"));
        if !self.written.contains_key(&(w, "q8")) {
            let [n, k] = view.shape[..] else {
                return Err(self.err(w, "8-bit blocks need a matrix"));
            };
            let codes: Vec<u8> = slmc_ir::blocks::q8_blocks(view.bytes).flat_map(|b| b.uint8_codes()).collect();
            self.external(&codes_name, data_type::UINT8, &[n as i64, (k / 32) as i64, 32], &codes);
            self.external(&scales_name, data_type::FLOAT, &[(n * k / 32) as i64], &q8_scales_le(view.bytes));
            self.written.insert((w, "q8"), codes_name.clone());
        }
        Ok((codes_name, scales_name))
    }

    /// Embedding rows gathered from the 8-bit codes MatMulNBits reads for the tied LM head
    /// (GatherBlockQuantized over `[n, k / 32, 32]`, scales `[n, k / 32, 1]`), so the table
    /// is stored once, in 8 bits. Exact, like the Q8_0 dequantization.
    fn gather_q8(&mut self, table: NodeId, ids: &str, out: &str) -> Result<(), OnnxError> {
        let (name, view) = self.weight_view(table)?;
        let [n, k] = view.shape[..] else {
            return Err(self.err(table, "an embedding table must be a matrix"));
        };
        let (codes, _) = self.q8_codes(table)?;
        let scales = format!("{name}.q8_gather_scales");
        if !self.written.contains_key(&(table, "q8_gather")) {
            self.external(&scales, data_type::FLOAT, &[n as i64, (k / 32) as i64, 1], &q8_scales_le(view.bytes));
            self.written.insert((table, "q8_gather"), scales.clone());
        }
        let blocks = self.fresh(&format!("{out}/blocks"));
        let attrs = vec![
            attr_int("gather_axis", 0),
            attr_int("quantize_axis", 2),
            attr_int("block_size", 32),
            attr_int("bits", 8),
        ];
        self.node("GatherBlockQuantized", "com.microsoft", &[&codes, ids, &scales], &[&blocks], attrs);
        let shape = self.inline_i64("shape", &[0, -1, k as i64], false);
        self.node("Reshape", "", &[&blocks, &shape], &[out], vec![]);
        Ok(())
    }

    /// `out = main + blocksum(x) @ offsets` with `offsets` `[blocks, n]`: the per-block
    /// constant part of asymmetric 4-bit blocks.
    fn add_block_offsets(
        &mut self,
        x: &str,
        main: &str,
        c_name: &str,
        (blocks_per_row, group): (usize, usize),
        out: &str,
    ) {
        let blocked_shape = self.inline_i64("shape", &[0, 0, blocks_per_row as i64, group as i64], false);
        let blocked = self.fresh(&format!("{out}/blocks"));
        self.node("Reshape", "", &[x, &blocked_shape], &[&blocked], vec![]);
        let axes = self.inline_i64("axes", &[-1], false);
        let sums = self.fresh(&format!("{out}/block_sums"));
        self.node("ReduceSum", "", &[&blocked, &axes], &[&sums], vec![attr_int("keepdims", 0)]);
        let correction = self.fresh(&format!("{out}/offsets"));
        self.node("MatMul", "", &[&sums, c_name], &[&correction], vec![]);
        self.node("Add", "", &[main, &correction], &[out], vec![]);
    }

    /// Standard-ops 4-bit linear: the codes as a uint4 `[k, n]` initializer, blocked
    /// DequantizeLinear (axis 0, zero point 8, opset 21) and MatMul, a pattern ONNX Runtime
    /// fuses into its 4-bit kernel; blocks with a minimum add the per-block offset term.
    fn dequantize_matmul(&mut self, x: &str, w: NodeId, out: &str) -> Result<(), OnnxError> {
        let (name, view) = self.weight_view(w)?;
        let [n, k] = view.shape[..] else {
            return Err(self.err(w, "a linear weight must be a matrix"));
        };
        let dtype = view.dtype;
        let group = dtype.block_len();
        let blocks_per_row = k / group;
        let has_min = dtype.q4_has_min() == Some(true);
        let (q_name, s_name, z_name, c_name) = (
            format!("{name}.q4"),
            format!("{name}.scales"),
            format!("{name}.zero_points"),
            format!("{name}.block_offsets"),
        );
        let key = (w, "dequantize");
        if !self.written.contains_key(&key) {
            let (codes, scales, offsets) = matmul_nbits_blocks(dtype, view.bytes, n * blocks_per_row);
            // codes: row r, element j at byte (r * k + j) / 2, low nibble when j is even.
            let nibble = |r: usize, j: usize| (codes[(r * k + j) / 2] >> (4 * (j % 2))) & 0xf;
            let mut packed = vec![0u8; (k * n).div_ceil(2)];
            for j in 0..k {
                for r in 0..n {
                    let e = j * n + r;
                    packed[e / 2] |= nibble(r, j) << (4 * (e % 2));
                }
            }
            self.external(&q_name, data_type::UINT4, &[k as i64, n as i64], &packed);
            let mut sc = vec![0.0f32; blocks_per_row * n];
            let mut off = vec![0.0f32; if has_min { blocks_per_row * n } else { 0 }];
            for r in 0..n {
                for b in 0..blocks_per_row {
                    sc[b * n + r] = scales[r * blocks_per_row + b];
                    if has_min {
                        off[b * n + r] = offsets[r * blocks_per_row + b];
                    }
                }
            }
            let sb: Vec<u8> = sc.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.external(&s_name, data_type::FLOAT, &[blocks_per_row as i64, n as i64], &sb);
            let zeros = vec![0x88u8; (blocks_per_row * n).div_ceil(2)];
            self.external(&z_name, data_type::UINT4, &[blocks_per_row as i64, n as i64], &zeros);
            if has_min {
                let cb: Vec<u8> = off.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.external(&c_name, data_type::FLOAT, &[blocks_per_row as i64, n as i64], &cb);
            }
            self.written.insert(key, q_name.clone());
        }
        let weight = self.fresh(&format!("{out}/weight"));
        self.node(
            "DequantizeLinear",
            "",
            &[&q_name, &s_name, &z_name],
            &[&weight],
            vec![attr_int("axis", 0), attr_int("block_size", group as i64)],
        );
        if !has_min {
            self.node("MatMul", "", &[x, &weight], &[out], vec![]);
            return Ok(());
        }
        let main = self.fresh(&format!("{out}/main"));
        self.node("MatMul", "", &[x, &weight], &[&main], vec![]);
        self.add_block_offsets(x, &main, &c_name, (blocks_per_row, group), out);
        Ok(())
    }

    /// `x / sqrt(mean(x^2) + eps) * w` in standard ops, which ONNX Runtime fuses into its
    /// SimplifiedLayerNormalization kernel (that op itself lives in the default domain
    /// without an ONNX schema, so onnx.checker would reject it).
    fn rms_norm(&mut self, x: &str, w: &str, eps: f32, out: &str) {
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

    /// GroupQueryAttention's sequence inputs from the attention mask, as onnxruntime-genai
    /// feeds them: `seqlens_k` = sum(mask) - 1, `total_seq_len` = mask width (int32); made
    /// once, before the first GroupQueryAttention node.
    fn gqa_sequence_inputs(&mut self) {
        if self.gqa_inputs_made {
            return;
        }
        self.gqa_inputs_made = true;
        let axes = self.inline_i64("axes", &[1], false);
        self.node("ReduceSum", "", &["attention_mask", &axes], &["mask_sum"], vec![attr_int("keepdims", 0)]);
        let one = self.inline_i64("one", &[1], true);
        self.node("Sub", "", &["mask_sum", &one], &["seqlens_k_i64"], vec![]);
        self.node("Cast", "", &["seqlens_k_i64"], &["seqlens_k"], vec![attr_int("to", data_type::INT32 as i64)]);
        self.node("Shape", "", &["attention_mask"], &["mask_shape"], vec![]);
        let idx = self.inline_i64("index", &[1], true);
        self.node("Gather", "", &["mask_shape", &idx], &["total_seq_len_i64"], vec![]);
        let to = attr_int("to", data_type::INT32 as i64);
        self.node("Cast", "", &["total_seq_len_i64"], &["total_seq_len"], vec![to]);
    }

    /// Positions of this step's tokens (`[s]`, int64) and the causal mask `[s, total]`
    /// (true where visible), from the past length of layer 0's cache; made once.
    fn positions_and_mask(&mut self) -> (String, String) {
        if self.step_positions.is_none() {
            let one_i = self.inline_i64("one", &[1], true);
            let zero_i = self.inline_i64("zero", &[0], true);
            let idx1 = self.inline_i64("index", &[1], true);
            let idx2 = self.inline_i64("index", &[2], true);
            self.node("Shape", "", &["input_ids"], &["step/ids_shape"], vec![]);
            self.node("Gather", "", &["step/ids_shape", &idx1], &["step/tokens"], vec![]);
            self.node("Shape", "", &["past_key_values.0.key"], &["step/past_shape"], vec![]);
            self.node("Gather", "", &["step/past_shape", &idx2], &["step/past_len"], vec![]);
            self.node("Add", "", &["step/past_len", "step/tokens"], &["step/total_len"], vec![]);
            self.node("Range", "", &["step/past_len", "step/total_len", &one_i], &["step/positions"], vec![]);
            self.node("Range", "", &[&zero_i, "step/total_len", &one_i], &["step/key_positions"], vec![]);
            let ax0 = self.inline_i64("axes", &[0], false);
            let ax1 = self.inline_i64("axes", &[1], false);
            self.node("Unsqueeze", "", &["step/key_positions", &ax0], &["step/key_row"], vec![]);
            self.node("Unsqueeze", "", &["step/positions", &ax1], &["step/query_column"], vec![]);
            self.node("LessOrEqual", "", &["step/key_row", "step/query_column"], &["step/causal_mask"], vec![]);
            self.step_positions = Some(("step/positions".into(), "step/causal_mask".into()));
        }
        self.step_positions.clone().expect("just set")
    }

    /// Rotary embedding of `x` `[1, s, heads, d]` in standard ops (the first `rotary_dim`
    /// dims; half or interleaved pairs), with cos/sin gathered at the step's positions.
    fn rotate(&mut self, x: &str, heads: usize, hd: usize, rotary: &slmc_ir::Rotary, out: &str) {
        let (pos, _) = self.positions_and_mask();
        let (cos_t, sin_t) = self.rope_tables(rotary);
        let rd = rotary.rotary_dim;
        let half = rd / 2;
        let interleaved = matches!(rotary.style, RopeStyle::Interleaved);
        let key = format!("{rotary:?}");
        let (cos, sin) = match self.gathered_rope.get(&key) {
            Some(t) => t.clone(),
            None => {
                // [1, s, 1, rd/2] (half) or [1, s, 1, rd/2, 1] (interleaved) to broadcast.
                let shape: Vec<i64> =
                    if interleaved { vec![1, -1, 1, half as i64, 1] } else { vec![1, -1, 1, half as i64] };
                let sh = self.inline_i64("shape", &shape, false);
                let mut names = Vec::new();
                for (table, label) in [(&cos_t, "cos"), (&sin_t, "sin")] {
                    let g = self.fresh(&format!("rope/{label}_rows"));
                    self.node("Gather", "", &[table, &pos], &[&g], vec![]);
                    let r = self.fresh(&format!("rope/{label}"));
                    self.node("Reshape", "", &[&g, &sh], &[&r], vec![]);
                    names.push(r);
                }
                let t = (names[0].clone(), names[1].clone());
                self.gathered_rope.insert(key, t.clone());
                t
            }
        };
        let slice = |b: &mut Self, src: &str, start: i64, end: i64, axis: i64, hint: &str| {
            let st = b.inline_i64("starts", &[start], false);
            let en = b.inline_i64("ends", &[end], false);
            let ax = b.inline_i64("axes", &[axis], false);
            let o = b.fresh(&format!("{out}/{hint}"));
            b.node("Slice", "", &[src, &st, &en, &ax], &[&o], vec![]);
            o
        };
        let (rot_src, axis) = if interleaved {
            let head = slice(self, x, 0, rd as i64, 3, "rotary_part");
            let sh = self.inline_i64("shape", &[0, 0, heads as i64, half as i64, 2], false);
            let pairs = self.fresh(&format!("{out}/pairs"));
            self.node("Reshape", "", &[&head, &sh], &[&pairs], vec![]);
            (pairs, 4)
        } else {
            (x.to_string(), 3)
        };
        let (a, b) = if interleaved {
            (slice(self, &rot_src, 0, 1, axis, "even"), slice(self, &rot_src, 1, 2, axis, "odd"))
        } else {
            (
                slice(self, &rot_src, 0, half as i64, axis, "first"),
                slice(self, &rot_src, half as i64, rd as i64, axis, "second"),
            )
        };
        let mul = |bl: &mut Self, p: &str, q: &str, hint: &str| {
            let o = bl.fresh(&format!("{out}/{hint}"));
            bl.node("Mul", "", &[p, q], &[&o], vec![]);
            o
        };
        let (ac, bs, bc, as_) = (
            mul(self, &a, &cos, "a_cos"),
            mul(self, &b, &sin, "b_sin"),
            mul(self, &b, &cos, "b_cos"),
            mul(self, &a, &sin, "a_sin"),
        );
        let (ra, rb) = (self.fresh(&format!("{out}/rot_a")), self.fresh(&format!("{out}/rot_b")));
        self.node("Sub", "", &[&ac, &bs], &[&ra], vec![]);
        self.node("Add", "", &[&bc, &as_], &[&rb], vec![]);
        let mut parts = Vec::new();
        if interleaved {
            let joined = self.fresh(&format!("{out}/joined"));
            self.node("Concat", "", &[&ra, &rb], &[&joined], vec![attr_int("axis", 4)]);
            let sh = self.inline_i64("shape", &[0, 0, heads as i64, rd as i64], false);
            let flat = self.fresh(&format!("{out}/rotated"));
            self.node("Reshape", "", &[&joined, &sh], &[&flat], vec![]);
            parts.push(flat);
        } else {
            parts.push(ra);
            parts.push(rb);
        }
        if rd < hd {
            parts.push(slice(self, x, rd as i64, hd as i64, 3, "pass_through"));
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        self.node("Concat", "", &refs, &[out], vec![attr_int("axis", 3)]);
    }

    /// Causal grouped-query attention in standard ops over the cache: rotary on q and k,
    /// `present = concat(past, new)` in [1, heads, positions, d], then per kv head the
    /// `group` query heads' rows at once: softmax(q k^T * scale, masked) v.
    #[allow(clippy::too_many_arguments)]
    fn explicit_attention(
        &mut self,
        q: &str,
        k: &str,
        v: &str,
        (hq, hk, hd): (usize, usize, usize),
        scale: f32,
        rotary: &slmc_ir::Rotary,
        io: AttentionIo,
    ) {
        let out = io.out.clone();
        let (_, mask) = self.positions_and_mask();
        let (q_rot, k_rot) = (self.fresh(&format!("{out}/q_rot")), self.fresh(&format!("{out}/k_rot")));
        self.rotate(q, hq, hd, rotary, &q_rot);
        self.rotate(k, hk, hd, rotary, &k_rot);
        let bnsh = [0i64, 2, 1, 3];
        let (k_t, v_t, q_t) = (
            self.fresh(&format!("{out}/k_bnsh")),
            self.fresh(&format!("{out}/v_bnsh")),
            self.fresh(&format!("{out}/q_bnsh")),
        );
        self.node("Transpose", "", &[&k_rot], &[&k_t], vec![proto::attr_ints("perm", &bnsh)]);
        self.node("Transpose", "", &[v], &[&v_t], vec![proto::attr_ints("perm", &bnsh)]);
        self.node("Transpose", "", &[&q_rot], &[&q_t], vec![proto::attr_ints("perm", &bnsh)]);
        self.node("Concat", "", &[&io.past_k, &k_t], &[&io.present_k], vec![attr_int("axis", 2)]);
        self.node("Concat", "", &[&io.past_v, &v_t], &[&io.present_v], vec![attr_int("axis", 2)]);
        let group = hq / hk;
        // Query head h uses kv head h / group: [1, hq, s, d] -> [1, hk, group * s, d].
        let sh = self.inline_i64("shape", &[1, hk as i64, -1, hd as i64], false);
        let q_g = self.fresh(&format!("{out}/q_grouped"));
        self.node("Reshape", "", &[&q_t, &sh], &[&q_g], vec![]);
        let k_tt = self.fresh(&format!("{out}/k_transposed"));
        self.node("Transpose", "", &[&io.present_k], &[&k_tt], vec![proto::attr_ints("perm", &[0, 1, 3, 2])]);
        let scores = self.fresh(&format!("{out}/scores"));
        self.node("MatMul", "", &[&q_g, &k_tt], &[&scores], vec![]);
        let sc = self.inline_f32("scale", scale);
        let scaled = self.fresh(&format!("{out}/scaled"));
        self.node("Mul", "", &[&scores, &sc], &[&scaled], vec![]);
        let rows = match self.tiled_masks.get(&group) {
            Some(m) => m.clone(),
            None => {
                let reps = self.inline_i64("repeats", &[group as i64, 1], false);
                let m = self.fresh("step/causal_mask_tiled");
                self.node("Tile", "", &[&mask, &reps], &[&m], vec![]);
                self.tiled_masks.insert(group, m.clone());
                m
            }
        };
        let neg = self.inline_f32("masked", f32::NEG_INFINITY);
        let masked = self.fresh(&format!("{out}/masked"));
        self.node("Where", "", &[&rows, &scaled, &neg], &[&masked], vec![]);
        let probs = self.fresh(&format!("{out}/probs"));
        self.node("Softmax", "", &[&masked], &[&probs], vec![attr_int("axis", -1)]);
        let ctx = self.fresh(&format!("{out}/context"));
        self.node("MatMul", "", &[&probs, &io.present_v], &[&ctx], vec![]);
        let sh = self.inline_i64("shape", &[1, hq as i64, -1, hd as i64], false);
        let heads = self.fresh(&format!("{out}/heads"));
        self.node("Reshape", "", &[&ctx, &sh], &[&heads], vec![]);
        self.node("Transpose", "", &[&heads], &[&out], vec![proto::attr_ints("perm", &bnsh)]);
    }

    fn rope_tables(&mut self, rotary: &slmc_ir::Rotary) -> (String, String) {
        let key = format!("{rotary:?}");
        if let Some(t) = self.rope_tables.get(&key) {
            return t.clone();
        }
        // cos/sin [context, rotary_dim / 2] in f32, computed as the interpreter does.
        let ctx = self.opts.context_len;
        let (cos, sin) = rotary.tables(ctx);
        let half = rotary.rotary_dim / 2;
        let (cos, sin): (Vec<u8>, Vec<u8>) =
            (cos.iter().flat_map(|v| v.to_le_bytes()).collect(), sin.iter().flat_map(|v| v.to_le_bytes()).collect());
        let i = self.rope_tables.len();
        let names = (format!("rope.{i}.cos"), format!("rope.{i}.sin"));
        let dims = [ctx as i64, half as i64];
        self.external(&names.0, data_type::FLOAT, &dims, &cos);
        self.external(&names.1, data_type::FLOAT, &dims, &sin);
        self.rope_tables.insert(key, names.clone());
        names
    }

    /// Finds gqa nodes whose q, k, v are `reshape(slice(x))` of one packed projection `x`
    /// in q, k, v order with nothing else reading the slices, and whose head shapes suit
    /// GroupQueryAttention: their slices and reshapes are skipped and GQA reads `x` packed.
    /// A gqa read only by a reshape to `[s, hq * d]` hands that reshape its flat output.
    fn find_packed_attention(&mut self) {
        let g = self.graph;
        for (id, node) in g.nodes() {
            if !matches!(node.op, Op::Gqa { quant: KvQuant::F32, .. }) {
                continue;
            }
            let qd = dims_of(g, node.inputs[0]);
            let kd = dims_of(g, node.inputs[1]);
            let (Some(hq), Some(hk), Some(hd)) = (qd[1], kd[1], qd[2]) else { continue };
            if hd % 16 != 0 {
                continue;
            }
            let mut chain = Vec::new();
            let mut source = None;
            let mut expected_start = 0i64;
            for (i, heads) in [(0usize, hq), (1, hk), (2, hk)] {
                let r = node.inputs[i];
                let ok = (|| {
                    let rn = g.node(r);
                    if !matches!(rn.op, Op::Reshape { .. }) || g.users(r) != vec![id] {
                        return None;
                    }
                    let sl = rn.inputs[0];
                    let Op::Slice { axis: 1, start, end } = g.node(sl).op else { return None };
                    if g.users(sl) != vec![r] || start != expected_start || end != start + (heads * hd) as i64 {
                        return None;
                    }
                    let x = g.node(sl).inputs[0];
                    if source.is_some_and(|s| s != x) {
                        return None;
                    }
                    Some((sl, x, end))
                })();
                let Some((sl, x, end)) = ok else {
                    chain.clear();
                    break;
                };
                source = Some(x);
                expected_start = end;
                chain.extend([r, sl]);
            }
            let Some(x) = source else { continue };
            if chain.len() != 6 || dims_of(g, x).get(1).copied().flatten() != Some((hq + 2 * hk) * hd) {
                continue;
            }
            self.skipped.extend(chain);
            self.packed_qkv.insert(id, x);
        }
    }

    fn lower_node(&mut self, id: NodeId) -> Result<(), OnnxError> {
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
                // GroupQueryAttention's CPU kernel needs head sizes that are multiples of 16.
                if self.opts.profile == OnnxProfile::Portable || hd % 16 != 0 {
                    let q = self.name_of(node.inputs[0])?;
                    let k = self.name_of(node.inputs[1])?;
                    let v = self.name_of(node.inputs[2])?;
                    let io = AttentionIo { past_k, past_v, present_k, present_v, out: out.clone() };
                    self.explicit_attention_layers += 1;
                    self.explicit_attention(&q, &k, &v, (hq, hk, hd), *scale, rotary, io);
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
                let (cos, sin) = self.rope_tables(rotary);
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
                        attr_int("do_rotary", 1),
                        attr_int("rotary_interleaved", matches!(rotary.style, RopeStyle::Interleaved) as i64),
                    ],
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

/// The f16 scale of every Q8_0 block as little-endian f32 (MatMulNBits and
/// GatherBlockQuantized each need them in their own shape).
fn q8_scales_le(bytes: &[u8]) -> Vec<u8> {
    slmc_ir::blocks::q8_blocks(bytes).flat_map(|b| b.d.to_le_bytes()).collect()
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
    for b in slmc_ir::blocks::q4_blocks(dtype, bytes) {
        if let Some(m) = b.m {
            offsets.push(m + 8.0 * b.d);
        }
        scales.push(b.d);
        for i in 0..g / 2 {
            codes.push(b.code(2 * i) | (b.code(2 * i + 1) << 4));
        }
    }
    (codes, scales, offsets)
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
        data: Vec::new(),
        names: HashMap::new(),
        written: HashMap::new(),
        counter: 0,
        layers: BTreeMap::new(),
        rope_tables: HashMap::new(),
        step_positions: None,
        gathered_rope: HashMap::new(),
        tiled_masks: HashMap::new(),
        skipped: Default::default(),
        packed_qkv: HashMap::new(),
        skip_sums: HashMap::new(),
        gqa_inputs_made: false,
        head_weight: None,
        explicit_attention_layers: 0,
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
    files.insert(DATA_FILE.to_string(), b.data);
    let kv_buffer_shareable = b.explicit_attention_layers == 0;
    let info =
        OnnxModelInfo { layers: n_layers, kv_heads: hk, q_heads: hq, head_dim: hd, hidden, vocab, kv_buffer_shareable };
    Ok(OnnxOutput { info, files })
}
