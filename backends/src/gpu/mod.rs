//! The GPU backend: WGSL compute kernels from tera templates, validated with naga and
//! written as Metal (MSL, real `[[buffer(N)]]` slots) and Vulkan (SPIR-V 1.3) from the
//! same module, plus the dispatch schedule and the weights in the layouts the kernels read.
//!
//! Scope: f32 activations and accumulation, one invocation per output element (four tokens
//! per invocation in prefill), f32 / f16 / 4-bit (q4, from any Q4_0/Q4_1 group size) /
//! 8-bit (Q8_0) weights; other weight types are converted to f32. KV caches in f32, f16,
//! int8 or int4. Kernels with an f16 or subgroup variant use it when the target profile
//! has `shader-f16` / `subgroups` and fall back to plain WGSL otherwise; the artifact lists
//! the features its kernels use. Graphs must be fused by the `gpu` pipeline (`gqa`).

pub mod kernels;

use std::collections::{BTreeMap, HashMap};

use slmc_ir::{DType, Graph, NodeId, Op, Verified, WeightSource};
use slmc_targets::artifact::{
    BufferDecl, BufferKind, Count, Dispatch, GpuArtifact, KernelDecl, ModelInfo, GPU_ARTIFACT_FORMAT,
};
use slmc_targets::weight_file::{WeightContents, WeightFile};

pub use kernels::{validate_and_translate, GpuFeatures, Translated};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("%{node}: op `{op}` is not supported by the GPU backend yet (the `gpu` pipeline fuses rope/kv_append/attention into gqa)")]
    UnsupportedOp { node: String, op: &'static str },
    #[error("%{node}: {message}")]
    Shape { node: String, message: String },
    #[error("weight \"{0}\" is not in the weight store")]
    MissingWeight(String),
    #[error("kernel `{kernel}`: {message}")]
    Kernel { kernel: String, message: String },
    #[error("buffer `{name}` needs {bytes} bytes but target `{target}` binds at most {limit} bytes per storage buffer; {advice}")]
    TooLarge { name: String, bytes: u64, target: String, limit: u64, advice: String },
    #[error("the graph does not verify: {0}")]
    Verify(#[from] slmc_ir::VerifyError),
    #[error("{0}: cannot write: {1}")]
    Io(String, std::io::Error),
}

/// The weight file beside `artifact.json`.
const WEIGHTS_FILE: &str = "weights.bin";

/// What the backend needs to know beyond the graph.
pub struct GpuOptions {
    pub target: String,
    pub model_name: String,
    pub eos_token_ids: Vec<u32>,
    pub context_len: usize,
    pub max_step_tokens: usize,
    /// The target's largest storage binding and buffer, bytes.
    pub max_binding_bytes: u64,
    pub max_buffer_bytes: u64,
    /// Optional features the target offers; kernels use them where they have a variant.
    pub features: GpuFeatures,
    /// Write the weight file straight into this directory (the artifact's) instead of
    /// returning it in `files`: a large model's weights are then never held in memory.
    pub weights_dir: Option<std::path::PathBuf>,
}

/// The artifact: its manifest and every file to write beside it (relative paths).
pub struct GpuOutput {
    pub artifact: GpuArtifact,
    pub files: BTreeMap<String, Vec<u8>>,
    /// Files already written into `weights_dir` (relative paths).
    pub written: Vec<String>,
    pub conversions: slmc_targets::artifact::WeightConversions,
}

/// Rows `row_start..row_start + layout.rows` of a weight, in one buffer.
#[derive(Clone)]
struct WeightChunk {
    buffer: usize,
    layout: kernels::WeightLayout,
    row_start: usize,
}

struct Builder<'a> {
    graph: &'a Graph,
    weights: &'a dyn WeightSource,
    opts: &'a GpuOptions,
    buffers: Vec<BufferDecl>,
    weight_bytes: WeightFile,
    /// Value -> buffer holding it (reshapes share their operand's).
    value_buffer: HashMap<NodeId, usize>,
    kernels: Vec<KernelDecl>,
    kernel_sources: BTreeMap<String, String>,
    dispatches: Vec<Dispatch>,
    tables: HashMap<String, usize>,
    weight_cache: HashMap<NodeId, Vec<WeightChunk>>,
    conversions: slmc_targets::artifact::WeightConversions,
}

fn dims(graph: &Graph, id: NodeId) -> Vec<Option<usize>> {
    graph.node(id).ty.shape.iter().map(|d| d.as_const().map(|c| c as usize)).collect()
}

impl<'a> Builder<'a> {
    fn err(&self, id: NodeId, message: impl Into<String>) -> GpuError {
        GpuError::Shape { node: self.graph.node(id).name.clone(), message: message.into() }
    }

    fn add_buffer(&mut self, name: &str, kind: BufferKind, bytes: u64) -> usize {
        self.buffers.push(BufferDecl { name: name.to_string(), kind, bytes: bytes.max(4) });
        self.buffers.len() - 1
    }

    /// A scratch activation buffer shared by name, grown to the largest size asked for.
    fn scratch_buffer(&mut self, name: &str, bytes: u64) -> usize {
        if let Some(i) = self.buffers.iter().position(|b| b.name == name) {
            self.buffers[i].bytes = self.buffers[i].bytes.max(bytes);
            return i;
        }
        self.add_buffer(name, BufferKind::Activation, bytes)
    }

    /// Appends bytes to the weights file at a 256-byte boundary (binding offset alignment).
    fn append_weight_bytes(&mut self, bytes: &[u8]) -> u64 {
        self.weight_bytes.pad_to(256);
        let offset = self.weight_bytes.len() as u64;
        self.weight_bytes.extend_from_slice(bytes);
        offset
    }

    /// Elements per token of an activation `[s, ...]`.
    fn per_token(&self, id: NodeId) -> Result<usize, GpuError> {
        let node = self.graph.node(id);
        let first = node.ty.shape.first().map(|d| d.to_string());
        if first.as_deref() != Some("s") {
            return Err(self.err(id, format!("activations must be [s, ...], found {}", node.ty)));
        }
        node.ty.shape[1..]
            .iter()
            .map(|d| d.as_const().map(|c| c as usize))
            .product::<Option<usize>>()
            .ok_or_else(|| self.err(id, format!("symbolic inner dimensions in {}", node.ty)))
    }

    fn activation(&mut self, id: NodeId) -> Result<usize, GpuError> {
        let per = self.per_token(id)?;
        let name = self.graph.node(id).name.clone();
        let b = self.add_buffer(&name, BufferKind::Activation, (per * self.opts.max_step_tokens * 4) as u64);
        self.value_buffer.insert(id, b);
        Ok(b)
    }

    /// A weight in the layout the kernels read, as one buffer per chunk of rows: one
    /// chunk unless the weight is larger than the target's binding limit.
    /// `packed: false` for vectors their kernels read as f32 (norm weights, biases).
    fn weight_chunks(&mut self, id: NodeId, packed: bool) -> Result<Vec<WeightChunk>, GpuError> {
        if let Some(chunks) = self.weight_cache.get(&id) {
            return Ok(chunks.clone());
        }
        let Op::Weight { name } = &self.graph.node(id).op else {
            return Err(self.err(id, "expected a weight operand"));
        };
        let name = name.clone();
        // The store outlives the builder: its bytes are read in place, not copied.
        let weights: &'a dyn WeightSource = self.weights;
        let view = weights.view(&name).ok_or_else(|| GpuError::MissingWeight(name.clone()))?;
        let (rows, cols) = match view.shape[..] {
            [r, c] => (r, c),
            [c] => (1, c),
            _ => return Err(self.err(id, "weights must be vectors or matrices")),
        };
        let stored_row = view.bytes.len() / rows;
        let limit = self.opts.max_binding_bytes.min(self.opts.max_buffer_bytes);
        let laid_row = kernels::relayout(view.dtype, &view.bytes[..stored_row], 1, cols, packed).0.len() as u64;
        if laid_row > limit {
            return Err(GpuError::TooLarge {
                name: name.clone(),
                bytes: laid_row,
                target: self.opts.target.clone(),
                limit,
                advice: "a single row is larger than a binding".into(),
            });
        }
        let per_chunk = if laid_row * rows as u64 <= limit { rows } else { (limit / laid_row) as usize };
        let n_chunks = rows.div_ceil(per_chunk);
        let (bytes, dtype) = (view.bytes, view.dtype);
        let mut chunks = Vec::with_capacity(n_chunks);
        for c in 0..n_chunks {
            let (start, end) = (c * per_chunk, ((c + 1) * per_chunk).min(rows));
            let (laid, layout) =
                kernels::relayout(dtype, &bytes[start * stored_row..end * stored_row], end - start, cols, packed);
            if layout.kind == "f32" && dtype != slmc_ir::DType::F32 {
                self.conversions.note(dtype.name(), "f32, dequantized at compile time (exact)");
            }
            let offset = self.append_weight_bytes(&laid);
            let buffer_name = if n_chunks == 1 { name.clone() } else { format!("{name}#{c}") };
            let buffer =
                self.add_buffer(&buffer_name, BufferKind::Weight { offset, layout: layout.name() }, laid.len() as u64);
            chunks.push(WeightChunk { buffer, layout, row_start: start });
        }
        self.weight_cache.insert(id, chunks.clone());
        Ok(chunks)
    }

    /// A weight that the op reading it needs in one binding.
    fn weight(&mut self, id: NodeId, packed: bool) -> Result<(usize, kernels::WeightLayout), GpuError> {
        let mut chunks = self.weight_chunks(id, packed)?;
        if chunks.len() > 1 {
            return Err(self.err(
                id,
                format!("this weight needs {} bindings and its user cannot read split weights yet; lower --max-step-tokens or use a target with larger bindings", chunks.len()),
            ));
        }
        let chunk = chunks.pop().expect("at least one chunk");
        Ok((chunk.buffer, chunk.layout))
    }

    fn buffer_of(&self, id: NodeId) -> Result<usize, GpuError> {
        self.value_buffer.get(&id).copied().ok_or_else(|| self.err(id, "value has no buffer"))
    }

    fn kernel(&mut self, name: String, source: String, storage_bindings: usize) -> usize {
        if let Some(i) = self.kernels.iter().position(|k| k.name == name) {
            return i;
        }
        self.kernel_sources.insert(name.clone(), source);
        self.kernels.push(KernelDecl { name, entry_point: "run".into(), storage_bindings });
        self.kernels.len() - 1
    }

    fn dispatch(&mut self, value: NodeId, kernel: usize, bindings: Vec<usize>, workgroups: [Count; 3]) {
        let value = self.graph.node(value).name.clone();
        self.dispatches.push(Dispatch { value, kernel, bindings, workgroups });
    }

    fn rope_table(&mut self, rotary: &slmc_ir::Rotary) -> usize {
        let key = format!("{rotary:?}");
        if let Some(b) = self.tables.get(&key) {
            return *b;
        }
        // cos then sin for every position and frequency, in f32 exactly as the interpreter.
        let (cos, sin) = rotary.tables(self.opts.context_len);
        let mut bytes: Vec<u8> = cos.iter().chain(&sin).flat_map(|v| v.to_le_bytes()).collect();
        if bytes.is_empty() {
            // No rotation (rotary_dim 0): a binding must not be empty; the kernel reads none.
            bytes = vec![0; 4];
        }
        let offset = self.append_weight_bytes(&bytes);
        let b = self.add_buffer(
            &format!("rope_table.{}", self.tables.len()),
            BufferKind::Table { offset },
            bytes.len() as u64,
        );
        self.tables.insert(key, b);
        b
    }

    fn lower_node(&mut self, id: NodeId) -> Result<(), GpuError> {
        let graph = self.graph;
        let node = graph.node(id);
        let per_tok = |n: u64, div: u64| Count { per_token: n, constant: 0, divisor: div };
        let one = Count::fixed(1);
        let s_count = Count { per_token: 1, constant: 0, divisor: 1 };
        match &node.op {
            Op::Input { .. } => {
                let b = self.add_buffer(&node.name, BufferKind::Input, (self.opts.max_step_tokens * 4) as u64);
                self.value_buffer.insert(id, b);
            }
            Op::Weight { .. } | Op::Positions => {} // bound when used; positions come from the step uniform
            Op::Reshape { .. } => {
                let b = self.buffer_of(node.inputs[0])?;
                self.value_buffer.insert(id, b);
            }
            Op::Embed => {
                // A split table: one gather per chunk, each writing the tokens in its rows.
                let chunks = self.weight_chunks(node.inputs[0], true)?;
                let ids = self.buffer_of(node.inputs[1])?;
                let out = self.activation(id)?;
                for chunk in chunks {
                    let cols = chunk.layout.cols;
                    let (name, src) = kernels::embed(&chunk.layout, chunk.row_start, self.opts.features)?;
                    let k = self.kernel(name, src, 3);
                    self.dispatch(
                        id,
                        k,
                        vec![chunk.buffer, ids, out],
                        [Count::fixed(cols.div_ceil(64) as u64), s_count, one],
                    );
                }
            }
            Op::RmsNorm { .. } | Op::AddRmsNorm { .. } | Op::LayerNorm { .. } => {
                let add = matches!(node.op, Op::AddRmsNorm { .. });
                let centered = matches!(node.op, Op::LayerNorm { .. });
                // The weight is the second operand (the third for add_rms_norm).
                let w_at = if add { 2 } else { 1 };
                // The norm runs over the last dimension (the weight's length): one row per
                // token for a hidden state, one per head for per-head q/k norms.
                let per_token = self.per_token(id)?;
                let dim = dims(graph, node.inputs[w_at])[0].unwrap_or(per_token);
                if dim == 0 || per_token % dim != 0 {
                    return Err(self.err(id, format!("norm rows of {dim} do not tile {per_token} values per token")));
                }
                let rows_per_token = per_token / dim;
                if rows_per_token > 1 && self.opts.max_step_tokens * rows_per_token > 65535 {
                    return Err(self.err(id, "more norm rows per step than one dispatch dimension holds"));
                }
                if centered && rows_per_token != 1 {
                    return Err(self.err(id, "layer_norm over part of a token's values is not lowered to WGSL"));
                }
                let mut bindings = vec![self.buffer_of(node.inputs[0])?];
                if add {
                    bindings.push(self.buffer_of(node.inputs[1])?);
                }
                for weight in &node.inputs[w_at..] {
                    let (w, _) = self.weight(*weight, false)?;
                    bindings.push(w);
                }
                bindings.push(self.activation(id)?);
                let (name, src) = kernels::rms_norm(&node.op, dim, rows_per_token, self.opts.features)?;
                let k = self.kernel(name, src, bindings.len());
                // Subgroup variant: a workgroup per row; plain: an invocation per row.
                let r = rows_per_token as u64;
                let subgroups = kernels::norm_uses_subgroups(&node.op, self.opts.features);
                let rows = if subgroups { per_tok(r, 1) } else { per_tok(r, 64) };
                self.dispatch(id, k, bindings, [rows, one, one]);
            }
            Op::Linear | Op::LinearSwiglu => {
                let swiglu = matches!(node.op, Op::LinearSwiglu);
                let x = self.buffer_of(node.inputs[0])?;
                // A split weight (an LM head past the binding limit): one matmul per chunk,
                // each writing its own range of output columns. SwiGLU pairs rows n and
                // n + f, so its weight must be whole.
                let chunks = if swiglu {
                    let (buffer, layout) = self.weight(node.inputs[1], true)?;
                    vec![WeightChunk { buffer, layout, row_start: 0 }]
                } else {
                    self.weight_chunks(node.inputs[1], true)?
                };
                let out = self.activation(id)?;
                let out_cols = self.per_token(id)?;
                let tiles = Count { per_token: 1, constant: 0, divisor: 4 };
                for chunk in chunks {
                    let cols_here = if swiglu { out_cols } else { chunk.layout.rows };
                    let (name, src) = kernels::linear(
                        &chunk.layout,
                        cols_here,
                        swiglu,
                        out_cols,
                        chunk.row_start,
                        self.opts.features,
                    )?;
                    let k = self.kernel(name, src, 3);
                    self.dispatch(
                        id,
                        k,
                        vec![x, chunk.buffer, out],
                        [Count::fixed(cols_here.div_ceil(64) as u64), tiles, one],
                    );
                }
            }
            Op::Slice { axis, start, end } => {
                let in_dims = dims(graph, node.inputs[0]);
                if *axis != in_dims.len() - 1 || in_dims.len() != 2 {
                    return Err(self.err(id, "only slices of the last axis of [s, n] are supported"));
                }
                let in_cols = in_dims[1].unwrap_or(0);
                let width = (end - start) as usize;
                let x = self.buffer_of(node.inputs[0])?;
                let out = self.activation(id)?;
                let (name, src) = kernels::slice(in_cols, *start as usize, width)?;
                let k = self.kernel(name, src, 2);
                self.dispatch(id, k, vec![x, out], [per_tok(width as u64, 64), one, one]);
            }
            Op::Gqa { layer, scale, rotary, quant, limits } => {
                let kv = *quant;
                let qd = dims(graph, node.inputs[0]);
                let kd = dims(graph, node.inputs[1]);
                let (hq, hk, hd) = (qd[1].unwrap_or(0), kd[1].unwrap_or(0), qd[2].unwrap_or(0));
                let (q, kin, v) =
                    (self.buffer_of(node.inputs[0])?, self.buffer_of(node.inputs[1])?, self.buffer_of(node.inputs[2])?);
                let table = self.rope_table(rotary);
                // Quantized: per vector an f32 scale and minimum, then the packed codes.
                let per_vector = kv.data_bytes_per_vector(hd) + kv.scale_bytes_per_vector();
                let multiple = kernels::kv_head_dim_multiple(kv);
                if hd % multiple != 0 {
                    return Err(self.err(
                        id,
                        format!("a {} cache needs a head dim divisible by {multiple}, found {hd}", kv.name()),
                    ));
                }
                // int8/int4: the exact ring of the recent window follows the codes.
                let ring = if quant.is_packed() { slmc_ir::KV_EXACT_WINDOW + self.opts.max_step_tokens } else { 0 };
                // A sliding-window layer keeps only the positions its window can still see.
                let layout =
                    kernels::CacheLayout::for_window(self.opts.context_len, limits.window, self.opts.max_step_tokens);
                let cache_bytes = (layout.slots * hk * per_vector + ring * hk * hd * 4) as u64;
                let k_cache = self.add_buffer(&format!("cache.{layer}.key"), BufferKind::Cache, cache_bytes);
                let v_cache = self.add_buffer(&format!("cache.{layer}.value"), BufferKind::Cache, cache_bytes);
                let q_rot = self.add_buffer(
                    &format!("{}.q_rope", node.name),
                    BufferKind::Activation,
                    (self.opts.max_step_tokens * hq * hd * 4) as u64,
                );
                let features = self.opts.features;
                let (name, src) = kernels::rope_cache(rotary, (hq, hk, hd), layout, kv, ring, features)?;
                let k = self.kernel(name, src, 7);
                self.dispatch(
                    id,
                    k,
                    vec![q, kin, v, table, q_rot, k_cache, v_cache],
                    [per_tok((hq + hk) as u64, 64), one, one],
                );
                let out = self.activation(id)?;
                let split = kernels::KeySplit::for_context(self.opts.context_len);
                // One scratch buffer of partial results serves every layer (they run in turn).
                let part_bytes = (self.opts.max_step_tokens * hq * split.splits * (hd + 2) * 4) as u64;
                let part = self.scratch_buffer("attention.partials", part_bytes);
                let (name, src) = kernels::attention((hq, hk, hd), *scale, *limits, layout, split, kv, ring, features)?;
                let k = self.kernel(name, src, 4);
                let splits = Count::fixed(split.splits as u64);
                self.dispatch(id, k, vec![q_rot, k_cache, v_cache, part], [splits, per_tok(hq as u64, 1), one]);
                let (name, src) = kernels::attention_combine((hq, hd), split)?;
                let k = self.kernel(name, src, 2);
                self.dispatch(id, k, vec![part, out], [per_tok((hq * hd) as u64, 64), one, one]);
            }
            // Elementwise ops, and the refusal of what the GPU backend does not lower:
            // `Elementwise::of` lists every op, so a new one is placed there.
            op => {
                let Some(kind) = kernels::Elementwise::of(op) else {
                    return Err(GpuError::UnsupportedOp { node: node.name.clone(), op: op.mnemonic() });
                };
                let per = self.per_token(id)?;
                let a = self.buffer_of(node.inputs[0])?;
                let (mut bindings, b_len, b_weight) = if node.op.arity() == 1 {
                    (vec![a], 0, false)
                } else {
                    let b_id = node.inputs[1];
                    let b_len: usize = dims(graph, b_id).iter().map(|d| d.unwrap_or(1)).product();
                    let is_weight = matches!(graph.node(b_id).op, Op::Weight { .. });
                    let b = if is_weight { self.weight(b_id, false)?.0 } else { self.buffer_of(b_id)? };
                    // 0: b has a's shape; otherwise b (a bias) repeats every b_len elements.
                    let same_shape = graph.node(b_id).ty == node.ty;
                    (vec![a, b], if same_shape { 0 } else { b_len }, is_weight)
                };
                bindings.push(self.activation(id)?);
                let (name, src) = kernels::elementwise(kind, per, b_len, b_weight)?;
                let k = self.kernel(name, src, bindings.len());
                self.dispatch(id, k, bindings, [per_tok(per as u64, 64), one, one]);
            }
        }
        Ok(())
    }
}

/// Generates the GPU artifact for a graph (input `tokens`, output `logits`).
pub fn compile(verified: &Verified<'_>, weights: &dyn WeightSource, opts: &GpuOptions) -> Result<GpuOutput, GpuError> {
    let graph = verified.graph();
    let mut b = Builder {
        graph,
        weights,
        opts,
        buffers: Vec::new(),
        weight_bytes: WeightFile::at(
            opts.weights_dir.as_deref(),
            WEIGHTS_FILE,
            crate::lowering::weight_file_capacity(graph, weights),
        )
        .map_err(|e| GpuError::Io(WEIGHTS_FILE.into(), e))?,
        value_buffer: HashMap::new(),
        kernels: Vec::new(),
        kernel_sources: BTreeMap::new(),
        dispatches: Vec::new(),
        tables: HashMap::new(),
        weight_cache: HashMap::new(),
        conversions: Default::default(),
    };
    for id in slmc_ir::text::print_order(graph) {
        b.lower_node(id)?;
    }
    let tokens = graph.find("tokens").and_then(|id| b.value_buffer.get(&id).copied());
    let logits_id = graph.outputs().iter().find(|(n, _)| n == "logits").map(|(_, id)| *id);
    let (Some(tokens_buffer), Some(logits_id)) = (tokens, logits_id) else {
        return Err(GpuError::Shape {
            node: "logits".into(),
            message: "the graph needs input `tokens` and output `logits`".into(),
        });
    };
    let logits_buffer = b.buffer_of(logits_id)?;
    let vocab = b.per_token(logits_id)?;
    let next_token_buffer = b.add_buffer("next_token", BufferKind::Activation, 4);
    let (name, src) = kernels::argmax(vocab, opts.features)?;
    let argmax_kernel = b.kernel(name, src, 2);
    let argmax_dispatch = Dispatch {
        value: "next_token".into(),
        kernel: argmax_kernel,
        bindings: vec![logits_buffer, next_token_buffer],
        workgroups: [Count::fixed(1), Count::fixed(1), Count::fixed(1)],
    };
    let limit = opts.max_binding_bytes.min(opts.max_buffer_bytes);
    if let Some(big) = b.buffers.iter().find(|buf| buf.bytes > limit) {
        let advice = match big.kind {
            BufferKind::Activation => "lower --max-step-tokens",
            BufferKind::Cache => "lower --context",
            _ => "splitting large weights across bindings is not implemented yet",
        };
        return Err(GpuError::TooLarge {
            name: big.name.clone(),
            bytes: big.bytes,
            target: opts.target.clone(),
            limit,
            advice: advice.into(),
        });
    }
    let mut files = BTreeMap::new();
    let mut used = GpuFeatures::NONE;
    for (name, src) in &b.kernel_sources {
        used = used.union(GpuFeatures::used_by(src));
        let t = validate_and_translate(src, opts.features)
            .map_err(|message| GpuError::Kernel { kernel: name.clone(), message })?;
        files.insert(format!("kernels/{name}.wgsl"), src.clone().into_bytes());
        files.insert(format!("kernels/{name}.metal"), t.msl.into_bytes());
        files.insert(format!("kernels/{name}.spv"), t.spirv.iter().flat_map(|w| w.to_le_bytes()).collect());
    }
    let mut written = Vec::new();
    let weight_file = std::mem::replace(&mut b.weight_bytes, WeightFile::in_memory(0));
    match weight_file.finish().map_err(|e| GpuError::Io(WEIGHTS_FILE.into(), e))? {
        WeightContents::Bytes(bytes) => {
            files.insert(WEIGHTS_FILE.into(), bytes);
        }
        WeightContents::Written(_) => written.push(WEIGHTS_FILE.to_string()),
    }
    let artifact = GpuArtifact {
        format: GPU_ARTIFACT_FORMAT.into(),
        target: opts.target.clone(),
        required_features: used.names(),
        model: ModelInfo {
            name: opts.model_name.clone(),
            vocab_size: vocab,
            eos_token_ids: opts.eos_token_ids.clone(),
            context_len: opts.context_len,
            max_step_tokens: opts.max_step_tokens,
        },
        buffers: b.buffers,
        kernels: b.kernels,
        dispatches: b.dispatches,
        tokens_buffer,
        logits_buffer,
        argmax_dispatch,
        next_token_buffer,
        weights_file: WEIGHTS_FILE.into(),
        files: slmc_targets::artifact::file_digests(&files, opts.weights_dir.as_deref(), &written)
            .map_err(|e| GpuError::Io(WEIGHTS_FILE.into(), e))?,
    };
    Ok(GpuOutput { artifact, files, written, conversions: b.conversions })
}

/// Weight dtypes the kernels read directly (others are converted to f32).
pub fn native_weight_dtype(dtype: DType) -> bool {
    kernels::WeightLayout::native(dtype)
}
