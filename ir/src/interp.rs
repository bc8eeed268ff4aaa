//! The reference interpreter: executes a verified graph in f32 on the CPU, with a KV
//! cache that persists across calls (prefill, then token-by-token decode).
//!
//! Quantized and half-precision weights are dequantized to f32 the first time a node
//! uses them and kept for the interpreter's lifetime. Results are deterministic: the
//! work split across threads never changes the order of any sum.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use crate::dtype::{dequantize_into, DType};
use crate::graph::{Graph, NodeId};
use crate::op::{soft_cap, AttnLimits, KvKind, KvQuant, Op, RopeStyle, Rotary, KV_EXACT_WINDOW};
use crate::rotary::RotaryFreqs;
use crate::verify::{verify, GraphInfo, VerifyError};
pub use crate::weights::{WeightSource, WeightView};

#[derive(Clone, Debug)]
pub enum Data {
    F32(Arc<Vec<f32>>),
    I32(Arc<Vec<i32>>),
}

/// A concrete tensor: row-major data and its shape.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        Tensor { shape, data: Data::F32(Arc::new(data)) }
    }

    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> Tensor {
        Tensor { shape, data: Data::I32(Arc::new(data)) }
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            Data::I32(_) => None,
        }
    }

    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            Data::I32(v) => Some(v),
            Data::F32(_) => None,
        }
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::I32(_) => DType::I32,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InterpError {
    #[error("the graph does not verify: {0}")]
    Verify(#[from] VerifyError),
    #[error("weight \"{0}\" is not in the weight store")]
    MissingWeight(String),
    #[error("weight \"{name}\" is stored as {found} but the graph expects {expected}")]
    WeightType { name: String, expected: String, found: String },
    #[error("input \"{0}\" was not given")]
    MissingInput(String),
    #[error("input \"{name}\": expected {expected}, got {found}")]
    InputType { name: String, expected: String, found: String },
    #[error("%{node}: dimension `{dim}` cannot be evaluated ({message})")]
    Unbound { node: String, dim: String, message: String },
    #[error("%{node}: computed shape {computed:?} differs from its type {declared}")]
    Shape { node: String, computed: Vec<usize>, declared: String },
    #[error("%{node}: token id {id} is outside the embedding table of {rows} rows")]
    TokenOutOfRange { node: String, id: i64, rows: usize },
    #[error("%{node}: produced NaN")]
    NotANumber { node: String },
    #[error("the KV cache holds {past} positions; {more} more would exceed the limit of {limit}")]
    ContextFull { past: usize, more: usize, limit: usize },
    #[error("%{node}: {message}")]
    Unsupported { node: String, message: String },
}

/// Executes one graph against one weight store, keeping the KV cache between calls.
pub struct Interpreter<'a> {
    graph: &'a Graph,
    info: GraphInfo,
    weights: &'a dyn WeightSource,
    dequantized: HashMap<NodeId, Arc<Vec<f32>>>,
    /// Per cache layer: keys and values.
    cache: Vec<[CacheBuf; 2]>,
    past: usize,
    /// Position in `info.order` after which a value is dead.
    last_use: HashMap<NodeId, usize>,
    max_positions: usize,
    /// Whether the sequence is past LongRoPE's original length (see RopeScaling::LongRope).
    long_rope: bool,
}

impl<'a> Interpreter<'a> {
    /// Verifies the graph and checks every weight it names against the store.
    pub fn new(graph: &'a Graph, weights: &'a dyn WeightSource) -> Result<Interpreter<'a>, InterpError> {
        let info = verify(graph)?;
        for (_, node) in graph.nodes() {
            if let Op::Weight { name } = &node.op {
                let view = weights.view(name).ok_or_else(|| InterpError::MissingWeight(name.clone()))?;
                let declared: Vec<Option<i64>> = node.ty.shape.iter().map(|d| d.as_const()).collect();
                let found: Vec<Option<i64>> = view.shape.iter().map(|d| Some(*d as i64)).collect();
                if view.dtype != node.ty.dtype || declared != found {
                    return Err(InterpError::WeightType {
                        name: name.clone(),
                        expected: node.ty.to_string(),
                        found: format!("{}{:?}", view.dtype, view.shape),
                    });
                }
            }
        }
        let mut last_use = HashMap::new();
        for (pos, id) in info.order.iter().enumerate() {
            for input in &graph.node(*id).inputs {
                last_use.insert(*input, pos);
            }
        }
        for (_, id) in graph.outputs() {
            last_use.insert(*id, usize::MAX);
        }
        let cache = vec![[CacheBuf::default(), CacheBuf::default()]; info.cache_layers];
        Ok(Interpreter {
            graph,
            info,
            weights,
            dequantized: HashMap::new(),
            cache,
            past: 0,
            last_use,
            max_positions: usize::MAX,
            long_rope: false,
        })
    }

    /// Rotates with LongRoPE's long factors (a sequence past its original length) or its
    /// short ones; the caller re-encodes what the cache holds when it switches.
    pub fn set_long_rope(&mut self, long: bool) {
        self.long_rope = long;
    }

    /// Caps the number of positions the cache may hold (the model's context length).
    pub fn with_max_positions(mut self, limit: usize) -> Self {
        self.max_positions = limit;
        self
    }

    /// Positions already in the KV cache.
    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        self.past = 0;
        for layer in &mut self.cache {
            layer[0].truncate(0);
            layer[1].truncate(0);
        }
    }

    /// Runs one step. Inputs are matched by name; outputs come back in graph order.
    /// On error the KV cache is left as it was before the call: the position count only
    /// advances on success, and every append first cuts its cache back to that count.
    pub fn run(&mut self, inputs: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>, InterpError> {
        self.run_observed(inputs, &mut |_, _| {})
    }

    /// `run`, calling `observer` with every value as it is computed (calibration uses
    /// this to collect the activations that reach each weight).
    pub fn run_observed(
        &mut self,
        inputs: &[(&str, Tensor)],
        observer: &mut dyn FnMut(NodeId, &Tensor),
    ) -> Result<Vec<(String, Tensor)>, InterpError> {
        self.run_until(inputs, observer, None).map(|o| o.unwrap_or_default())
    }

    /// `run_observed` that stops once `last` is computed (calibration of the first layers
    /// needs no later ones). The cache is then partly appended and the position count not
    /// advanced: call `reset` before the next run.
    pub fn observe_until(
        &mut self,
        inputs: &[(&str, Tensor)],
        observer: &mut dyn FnMut(NodeId, &Tensor),
        last: NodeId,
    ) -> Result<(), InterpError> {
        self.run_until(inputs, observer, Some(last)).map(|_| ())
    }

    /// Runs the step; `None` when it stopped at `stop_after`.
    fn run_until(
        &mut self,
        inputs: &[(&str, Tensor)],
        observer: &mut dyn FnMut(NodeId, &Tensor),
        stop_after: Option<NodeId>,
    ) -> Result<Option<Vec<(String, Tensor)>>, InterpError> {
        let graph = self.graph;
        let mut symbols: HashMap<String, i64> = HashMap::new();
        symbols.insert("p".into(), self.past as i64);
        let mut values: HashMap<NodeId, Tensor> = HashMap::new();
        let mut step_len = None;
        let order = self.info.order.clone();
        for (pos, id) in order.iter().enumerate() {
            let node = graph.node(*id);
            let value = match &node.op {
                Op::Input { name } => {
                    let given = inputs
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, t)| t.clone())
                        .ok_or_else(|| InterpError::MissingInput(name.clone()))?;
                    let mismatch = || InterpError::InputType {
                        name: name.clone(),
                        expected: node.ty.to_string(),
                        found: format!("{}{:?}", given.dtype(), given.shape),
                    };
                    if given.dtype() != node.ty.dtype || given.shape.len() != node.ty.rank() {
                        return Err(mismatch());
                    }
                    for (dim, actual) in node.ty.shape.iter().zip(&given.shape) {
                        let mut syms = dim.symbols();
                        match (syms.next(), syms.next(), dim.as_const()) {
                            (_, _, Some(c)) if c != *actual as i64 => return Err(mismatch()),
                            (Some(sym), None, None) if dim.to_string() == sym => {
                                if let Some(prev) = symbols.insert(sym.to_string(), *actual as i64) {
                                    if prev != *actual as i64 {
                                        return Err(mismatch());
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    if let Some(s) = symbols.get("s") {
                        step_len = Some(*s as usize);
                    }
                    given
                }
                Op::Weight { .. } => {
                    let data = self.weight_f32(*id)?;
                    let shape = node.ty.shape.iter().map(|d| d.as_const().unwrap_or(0) as usize).collect();
                    Tensor { shape, data: Data::F32(data) }
                }
                op => {
                    let args: Vec<&Tensor> = node.inputs.iter().map(|i| &values[i]).collect();
                    self.eval(node.name.as_str(), op, &args)?
                }
            };
            // The computed shape must be the declared type under this step's bindings.
            let declared: Result<Vec<usize>, InterpError> = node
                .ty
                .shape
                .iter()
                .map(|d| {
                    d.eval(&|s| symbols.get(s).copied()).map(|v| v as usize).map_err(|sym| InterpError::Unbound {
                        node: node.name.clone(),
                        dim: d.to_string(),
                        message: format!("symbol `{sym}` is not bound by any input"),
                    })
                })
                .collect();
            if declared? != value.shape {
                return Err(InterpError::Shape {
                    node: node.name.clone(),
                    computed: value.shape.clone(),
                    declared: node.ty.to_string(),
                });
            }
            if !node.op.is_source() {
                if let Some(v) = value.as_f32() {
                    if v.iter().any(|x| x.is_nan()) {
                        return Err(InterpError::NotANumber { node: node.name.clone() });
                    }
                }
            }
            observer(*id, &value);
            if stop_after == Some(*id) {
                return Ok(None);
            }
            values.insert(*id, value);
            for input in &node.inputs {
                if self.last_use.get(input) == Some(&pos) {
                    values.remove(input);
                }
            }
        }
        if let Some(s) = step_len {
            self.past += s;
        }
        Ok(Some(graph.outputs().iter().map(|(name, id)| (name.clone(), values[id].clone())).collect()))
    }

    fn weight_f32(&mut self, id: NodeId) -> Result<Arc<Vec<f32>>, InterpError> {
        if let Some(w) = self.dequantized.get(&id) {
            return Ok(w.clone());
        }
        let Op::Weight { name } = &self.graph.node(id).op else { unreachable!("weight_f32 on a weight node") };
        let view = self.weights.view(name).ok_or_else(|| InterpError::MissingWeight(name.clone()))?;
        let n: usize = view.shape.iter().product();
        let mut out = vec![0.0f32; n];
        let row = view.shape.last().copied().unwrap_or(1).max(1);
        let row_bytes = view.dtype.storage_bytes(row).unwrap_or(0);
        if view.dtype.storage_bytes(n) != Some(view.bytes.len()) || row_bytes == 0 {
            return Err(InterpError::WeightType {
                name: name.clone(),
                expected: format!("{} bytes", view.dtype.storage_bytes(n).unwrap_or(0)),
                found: format!("{} bytes", view.bytes.len()),
            });
        }
        out.par_chunks_mut(row).zip(view.bytes.par_chunks(row_bytes)).for_each(|(o, b)| {
            dequantize_into(view.dtype, b, o);
        });
        let out = Arc::new(out);
        self.dequantized.insert(id, out.clone());
        Ok(out)
    }

    fn eval(&mut self, node: &str, op: &Op, args: &[&Tensor]) -> Result<Tensor, InterpError> {
        let f = |i: usize| args[i].as_f32().expect("verified: f32 operand");
        Ok(match op {
            Op::Input { .. } | Op::Weight { .. } => unreachable!("sources are handled by run"),
            Op::Positions => {
                let s = args[0].shape[0];
                Tensor::i32(vec![s], (0..s).map(|i| (self.past + i) as i32).collect())
            }
            Op::Embed => {
                let (rows, d) = (args[0].shape[0], args[0].shape[1]);
                let table = f(0);
                let ids = args[1].as_i32().expect("verified: i32 ids");
                let mut out = Vec::with_capacity(ids.len() * d);
                for &id in ids {
                    if id < 0 || id as usize >= rows {
                        return Err(InterpError::TokenOutOfRange { node: node.into(), id: id as i64, rows });
                    }
                    out.extend_from_slice(&table[id as usize * d..(id as usize + 1) * d]);
                }
                Tensor::f32(vec![ids.len(), d], out)
            }
            Op::RmsNorm { eps } => Tensor::f32(args[0].shape.clone(), rms_norm(f(0), f(1), *eps)),
            Op::Linear => {
                let (n, k) = (args[1].shape[0], args[1].shape[1]);
                let m = f(0).len() / k;
                let mut shape = args[0].shape.clone();
                *shape.last_mut().unwrap() = n;
                Tensor::f32(shape, matmul_transposed(f(0), m, k, f(1), n))
            }
            Op::Add => {
                let mut out = f(0).to_vec();
                add_broadcast(&mut out, f(1));
                Tensor::f32(args[0].shape.clone(), out)
            }
            Op::Mul => {
                let b = f(1);
                let mut out = f(0).to_vec();
                for chunk in out.chunks_exact_mut(b.len()) {
                    chunk.iter_mut().zip(b).for_each(|(o, v)| *o *= v);
                }
                Tensor::f32(args[0].shape.clone(), out)
            }
            Op::Silu => Tensor::f32(args[0].shape.clone(), f(0).iter().map(|x| silu(*x)).collect()),
            Op::GeluTanh => Tensor::f32(args[0].shape.clone(), f(0).iter().map(|x| gelu_tanh(*x)).collect()),
            Op::Scale { factor } => Tensor::f32(args[0].shape.clone(), f(0).iter().map(|x| x * factor).collect()),
            Op::Softcap { cap } => {
                Tensor::f32(args[0].shape.clone(), f(0).iter().map(|x| soft_cap(*x, *cap)).collect())
            }
            Op::LayerNorm { eps } => Tensor::f32(args[0].shape.clone(), layer_norm(f(0), f(1), f(2), *eps)),
            Op::Reshape { .. } => {
                // Shape comes from the declared type, checked by the caller.
                let shape = self.reshape_target(node, args[0])?;
                Tensor { shape, data: args[0].data.clone() }
            }
            Op::Slice { axis, start, end } => {
                let shape = &args[0].shape;
                let outer: usize = shape[..*axis].iter().product();
                let inner: usize = shape[axis + 1..].iter().product();
                let (start, end) = (*start as usize, *end as usize);
                let x = f(0);
                let mut out = Vec::with_capacity(outer * (end - start) * inner);
                for o in 0..outer {
                    let base = o * shape[*axis] * inner;
                    out.extend_from_slice(&x[base + start * inner..base + end * inner]);
                }
                let mut out_shape = shape.clone();
                out_shape[*axis] = end - start;
                Tensor::f32(out_shape, out)
            }
            Op::Rope { theta, rotary_dim, style, scaling } => {
                let rotary = Rotary { theta: *theta, rotary_dim: *rotary_dim, style: *style, scaling: scaling.clone() };
                let mut out = f(0).to_vec();
                let pos = args[1].as_i32().expect("verified: i32 positions");
                apply_rope(&mut out, pos, &args[0].shape, &rotary.freqs(self.long_rope), &rotary);
                Tensor::f32(args[0].shape.clone(), out)
            }
            Op::KvAppend { layer, kind, quant } => {
                let slot = match kind {
                    KvKind::Key => 0,
                    KvKind::Value => 1,
                };
                if quant.is_packed() {
                    // The exact window is per query: only the fused gqa can read it.
                    return Err(InterpError::Unsupported {
                        node: node.to_string(),
                        message: format!("an {} cache is read through gqa (fuse-rope-attention)", quant.name()),
                    });
                }
                let all = self.append_cache(*layer, slot, *quant, args[0])?;
                let mut shape = args[0].shape.clone();
                shape[0] = self.past + args[0].shape[0];
                Tensor::f32(shape, all)
            }
            Op::AddRmsNorm { eps } => {
                let mut sum = f(0).to_vec();
                add_broadcast(&mut sum, f(1));
                Tensor::f32(args[0].shape.clone(), rms_norm(&sum, f(2), *eps))
            }
            Op::LinearSwiglu => {
                let (n, k) = (args[1].shape[0], args[1].shape[1]);
                let m = f(0).len() / k;
                let y = matmul_transposed(f(0), m, k, f(1), n);
                let half = n / 2;
                let mut out = Vec::with_capacity(m * half);
                for row in y.chunks_exact(n) {
                    let (gate, up) = row.split_at(half);
                    out.extend(gate.iter().zip(up).map(|(g, u)| silu(*g) * u));
                }
                let mut shape = args[0].shape.clone();
                *shape.last_mut().unwrap() = half;
                Tensor::f32(shape, out)
            }
            Op::Gqa { layer, scale, rotary, quant, limits } => {
                let pos = args[3].as_i32().expect("verified: i32 positions");
                let mut q = f(0).to_vec();
                let freqs = rotary.freqs(self.long_rope);
                apply_rope(&mut q, pos, &args[0].shape, &freqs, rotary);
                let mut k = f(1).to_vec();
                apply_rope(&mut k, pos, &args[1].shape, &freqs, rotary);
                let k = Tensor::f32(args[1].shape.clone(), k);
                let k_all = self.append_cache(*layer, 0, *quant, &k)?;
                let v_all = self.append_cache(*layer, 1, *quant, args[2])?;
                let (s, hq, d) = (args[0].shape[0], args[0].shape[1], args[0].shape[2]);
                let hk = args[1].shape[1];
                let t = self.past + s;
                let [kc, vc] = &self.cache[*layer];
                let exact = quant.is_packed().then(|| (&kc.plain[..], &vc.plain[..]));
                let dims = (hq, hk, d);
                Tensor::f32(args[0].shape.clone(), attention(&q, (&k_all, &v_all), exact, s, t, dims, *scale, limits))
            }
            Op::Attention { scale, limits } => {
                let (s, hq, d) = (args[0].shape[0], args[0].shape[1], args[0].shape[2]);
                let (t, hk) = (args[1].shape[0], args[1].shape[1]);
                let dims = (hq, hk, d);
                Tensor::f32(args[0].shape.clone(), attention(f(0), (f(1), f(2)), None, s, t, dims, *scale, limits))
            }
        })
    }

    /// Appends `x[s, h, d]` to one cache of `layer` after the committed positions and
    /// returns the whole cache as f32.
    fn append_cache(&mut self, layer: usize, slot: usize, quant: KvQuant, x: &Tensor) -> Result<Vec<f32>, InterpError> {
        let s = x.shape[0];
        if self.past + s > self.max_positions {
            return Err(InterpError::ContextFull { past: self.past, more: s, limit: self.max_positions });
        }
        let buf = &mut self.cache[layer][slot];
        buf.truncate(self.past);
        buf.append(quant, x.shape[1], x.shape[2], x.as_f32().expect("verified: f32"));
        Ok(buf.read())
    }

    fn reshape_target(&self, node: &str, x: &Tensor) -> Result<Vec<usize>, InterpError> {
        let id = self.graph.find(node).expect("evaluating a node of this graph");
        let ty = &self.graph.node(id).ty;
        let total: usize = x.shape.iter().product();
        // Bind the one symbolic dim (if any) from the element count.
        let konst: usize = ty.shape.iter().filter_map(|d| d.as_const()).map(|c| c as usize).product();
        Ok(ty
            .shape
            .iter()
            .map(|d| match d.as_const() {
                Some(c) => c as usize,
                None => total / konst.max(1),
            })
            .collect())
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Hugging Face's `gelu_pytorch_tanh`. Backends may use the identity
/// 0.5 (1 + tanh(u)) = sigmoid(2u), which saturates without overflow.
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

fn add_broadcast(a: &mut [f32], b: &[f32]) {
    for chunk in a.chunks_exact_mut(b.len()) {
        for (o, v) in chunk.iter_mut().zip(b) {
            *o += v;
        }
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0.0; x.len()];
    for (o, row) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
            *o = w * (v * inv);
        }
    }
    out
}

fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0.0; x.len()];
    for (o, row) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, v), w), b) in o.iter_mut().zip(row).zip(w).zip(b) {
            *o = (v - mean) * inv * w + b;
        }
    }
    out
}

/// Rotates `x[s, h, d]` in place at positions `pos`.
fn apply_rope(x: &mut [f32], pos: &[i32], shape: &[usize], freqs: &RotaryFreqs, rotary: &Rotary) {
    let (h, d) = (shape[1], shape[2]);
    let half = rotary.rotary_dim / 2;
    for (t, token) in x.chunks_exact_mut(h * d).enumerate() {
        let (cos, sin) = freqs.cos_sin(pos[t] as f32);
        for head in token.chunks_exact_mut(d) {
            for j in 0..half {
                let (a, b) = match rotary.style {
                    RopeStyle::Half => (j, j + half),
                    RopeStyle::Interleaved => (2 * j, 2 * j + 1),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[j] - x1 * sin[j];
                head[b] = x1 * cos[j] + x0 * sin[j];
            }
        }
    }
}

/// One KV cache (keys or values of one layer). Quantized caches hold integer codes and
/// a scale and minimum per (position, head) vector, and are dequantized when read, and the
/// exact values for the window of `KV_EXACT_WINDOW` recent positions (`plain`).
#[derive(Clone, Debug, Default)]
struct CacheBuf {
    quant: KvQuant,
    heads: usize,
    head_dim: usize,
    plain: Vec<f32>,
    codes: Vec<u8>,
    /// Per vector: scale and minimum (asymmetric codes, value = code * scale + min).
    scales: Vec<(f32, f32)>,
}

impl CacheBuf {
    fn truncate(&mut self, positions: usize) {
        let vectors = positions * self.heads;
        self.plain.truncate(vectors * self.head_dim);
        self.codes.truncate(vectors * self.head_dim);
        self.scales.truncate(vectors);
    }

    fn append(&mut self, quant: KvQuant, heads: usize, head_dim: usize, x: &[f32]) {
        (self.quant, self.heads, self.head_dim) = (quant, heads, head_dim);
        let top = match quant {
            KvQuant::F32 => return self.plain.extend_from_slice(x),
            KvQuant::F16 => return self.plain.extend(x.iter().map(|v| half::f16::from_f32(*v).to_f32())),
            KvQuant::Int8 => 255.0f32,
            KvQuant::Int4 => 15.0f32,
        };
        // Packed caches keep the exact values too, for the recent window.
        self.plain.extend_from_slice(x);
        for v in x.chunks_exact(head_dim) {
            let min = v.iter().copied().fold(f32::INFINITY, f32::min);
            let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let scale = (max - min) / top;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            self.scales.push((scale, min));
            self.codes.extend(v.iter().map(|x| ((x - min) * inv).round().clamp(0.0, top) as u8));
        }
    }

    fn read(&self) -> Vec<f32> {
        match self.quant {
            KvQuant::F32 | KvQuant::F16 => self.plain.clone(),
            _ => self
                .codes
                .chunks_exact(self.head_dim)
                .zip(&self.scales)
                .flat_map(|(c, (s, m))| c.iter().map(move |q| *q as f32 * s + m))
                .collect(),
        }
    }
}

/// Causal grouped-query attention; query i sits at position t - s + i. `exact`: a packed
/// cache's exact keys and values, read instead of `kv` for the `KV_EXACT_WINDOW` positions
/// nearest each query.
fn attention(
    q: &[f32],
    (k, v): (&[f32], &[f32]),
    exact: Option<(&[f32], &[f32])>,
    s: usize,
    t: usize,
    (hq, hk, d): (usize, usize, usize),
    scale: f32,
    limits: &AttnLimits,
) -> Vec<f32> {
    let group = hq / hk;
    let mut out = vec![0.0f32; s * hq * d];
    // One task per (query, head) row of the output.
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let (i, h) = (row / hq, row % hq);
        let kv_head = h / group;
        let qv = &q[(i * hq + h) * d..(i * hq + h + 1) * d];
        let visible = t - s + i + 1;
        let window_start = visible.saturating_sub(KV_EXACT_WINDOW);
        let pick = |j: usize| match exact {
            Some((ke, ve)) if j >= window_start => (ke, ve),
            _ => (k, v),
        };
        let at = |j: usize| (j * hk + kv_head) * d..(j * hk + kv_head + 1) * d;
        let first = limits.first_key(visible - 1);
        let mut scores: Vec<f32> = (0..visible)
            .map(|j| if j < first { f32::NEG_INFINITY } else { limits.cap(dot(qv, &pick(j).0[at(j)]) * scale) })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        for (j, p) in scores.iter().enumerate() {
            let w = p / sum;
            for (o, x) in o.iter_mut().zip(&pick(j).1[at(j)]) {
                *o += w * x;
            }
        }
    });
    out
}

/// `x[m, k]` times `w[n, k]` transposed, into `[m, n]`.
pub fn matmul_transposed(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    if m == 1 {
        out.par_chunks_mut(64).enumerate().for_each(|(c, o)| {
            for (j, v) in o.iter_mut().enumerate() {
                let row = c * 64 + j;
                *v = dot(x, &w[row * k..(row + 1) * k]);
            }
        });
        return out;
    }
    // Column blocks of the output in parallel; each block is one sgemm into a local buffer.
    const BLOCK: usize = 256;
    let blocks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            let n0 = b * BLOCK;
            let nb = BLOCK.min(n - n0);
            let mut c = vec![0.0f32; m * nb];
            // SAFETY: the pointers cover x (m*k), the nb rows of w from n0, and c (m*nb),
            // with strides that stay inside those ranges.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    nb,
                    1.0,
                    x.as_ptr(),
                    k as isize,
                    1,
                    w.as_ptr().add(n0 * k),
                    1,
                    k as isize,
                    0.0,
                    c.as_mut_ptr(),
                    nb as isize,
                    1,
                );
            }
            (n0, c)
        })
        .collect();
    for (n0, c) in blocks {
        let nb = c.len() / m;
        for i in 0..m {
            out[i * n + n0..i * n + n0 + nb].copy_from_slice(&c[i * nb..(i + 1) * nb]);
        }
    }
    out
}

/// Dot product with a fixed summation order (16 lanes, then a fixed tree).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut tail = 0.0f32;
    for i in chunks * 16..a.len() {
        tail += a[i] * b[i];
    }
    let mut width = 8;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0] + tail
}
