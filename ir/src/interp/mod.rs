//! The reference interpreter: executes a verified graph in f32 on the CPU, with a KV
//! cache that persists across calls (prefill, then token-by-token decode).
//!
//! Matrices (the weights of linear layers and embedding tables) are read in their stored
//! form, quantized and usually memory-mapped: a product dequantizes a block of rows into a
//! scratch buffer, multiplies it and drops it, and an embedding dequantizes the rows it
//! gathers, so running a model costs its stored bytes, not an f32 copy (issue 18: the 4B
//! class). Other weights (norm gains, biases) are small; they are dequantized once and
//! kept. Results are deterministic and independent of both choices: the work split across
//! threads never changes the order of any sum, and a row dequantized in a block equals the
//! same row dequantized whole.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use crate::dtype::{dequantize_into, DType};
use crate::graph::{Graph, NodeId};
use crate::op::{soft_cap, KvKind, KvQuant, Op, Rotary};

mod cache;
mod kernels;

use crate::verify::{verify, GraphInfo, VerifyError};
pub use crate::weights::{WeightSource, WeightView};
use cache::CacheBuf;
use kernels::{add_broadcast, apply_rope, attention, gelu_tanh, layer_norm, rms_norm, silu};
pub use kernels::{dot, matmul_transposed};
use kernels::{matmul_rows, Rows};

#[derive(Clone, Debug)]
pub enum Data {
    F32(Arc<Vec<f32>>),
    I32(Arc<Vec<i32>>),
    /// A weight left in its stored form for the ops that read it so (linear products,
    /// embedding lookups); no op produces one.
    Stored {
        node: NodeId,
        dtype: DType,
    },
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
            Data::I32(_) | Data::Stored { .. } => None,
        }
    }

    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            Data::I32(v) => Some(v),
            Data::F32(_) | Data::Stored { .. } => None,
        }
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::I32(_) => DType::I32,
            Data::Stored { dtype, .. } => dtype,
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
    /// Small weights, dequantized on first use.
    dequantized: HashMap<NodeId, Arc<Vec<f32>>>,
    /// Weights every user of which reads them stored (see the module doc).
    stored: std::collections::HashSet<NodeId>,
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
        let stored = stored_weights(graph);
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
            stored,
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
                    let shape = node.ty.shape.iter().map(|d| d.as_const().unwrap_or(0) as usize).collect();
                    let data = if self.stored.contains(id) {
                        self.check_stored(*id)?;
                        Data::Stored { node: *id, dtype: node.ty.dtype }
                    } else {
                        Data::F32(self.weight_f32(*id)?)
                    };
                    Tensor { shape, data }
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

    /// A weight's stored bytes as rows, after checking their length against its type.
    fn stored_rows(&self, id: NodeId) -> Result<Rows<'a>, InterpError> {
        let Op::Weight { name } = &self.graph.node(id).op else { unreachable!("stored_rows on a weight node") };
        let view = self.weights.view(name).ok_or_else(|| InterpError::MissingWeight(name.clone()))?;
        let n: usize = view.shape.iter().product();
        let row = view.shape.last().copied().unwrap_or(1).max(1);
        let row_bytes = view.dtype.storage_bytes(row).unwrap_or(0);
        if view.dtype.storage_bytes(n) != Some(view.bytes.len()) || row_bytes == 0 {
            return Err(InterpError::WeightType {
                name: name.clone(),
                expected: format!("{} bytes", view.dtype.storage_bytes(n).unwrap_or(0)),
                found: format!("{} bytes", view.bytes.len()),
            });
        }
        Ok(Rows::Stored { dtype: view.dtype, bytes: view.bytes, row_bytes })
    }

    fn check_stored(&self, id: NodeId) -> Result<(), InterpError> {
        self.stored_rows(id).map(|_| ())
    }

    fn weight_f32(&mut self, id: NodeId) -> Result<Arc<Vec<f32>>, InterpError> {
        if let Some(w) = self.dequantized.get(&id) {
            return Ok(w.clone());
        }
        let Rows::Stored { dtype, bytes, row_bytes } = self.stored_rows(id)? else { unreachable!("stored rows") };
        let row = self.graph.node(id).ty.shape.last().and_then(|d| d.as_const()).unwrap_or(1).max(1) as usize;
        let mut out = vec![0.0f32; bytes.len() / row_bytes * row];
        out.par_chunks_mut(row).zip(bytes.par_chunks(row_bytes)).for_each(|(o, b)| {
            dequantize_into(dtype, b, o);
        });
        let out = Arc::new(out);
        self.dequantized.insert(id, out.clone());
        Ok(out)
    }

    /// A matrix operand as rows: stored, or an f32 tensor.
    fn rows<'t>(&self, t: &'t Tensor) -> Result<Rows<'t>, InterpError>
    where
        'a: 't,
    {
        match &t.data {
            Data::Stored { node, .. } => self.stored_rows(*node),
            Data::F32(v) => Ok(Rows::F32(v)),
            Data::I32(_) => unreachable!("verified: f32 or stored matrix"),
        }
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
                let table = self.rows(args[0])?;
                let ids = args[1].as_i32().expect("verified: i32 ids");
                let mut out = vec![0.0f32; ids.len() * d];
                let mut scratch = Vec::new();
                for (&id, o) in ids.iter().zip(out.chunks_exact_mut(d)) {
                    if id < 0 || id as usize >= rows {
                        return Err(InterpError::TokenOutOfRange { node: node.into(), id: id as i64, rows });
                    }
                    o.copy_from_slice(table.get(id as usize, 1, d, &mut scratch));
                }
                Tensor::f32(vec![ids.len(), d], out)
            }
            Op::RmsNorm { eps } => Tensor::f32(args[0].shape.clone(), rms_norm(f(0), f(1), *eps)),
            Op::Linear => {
                let (n, k) = (args[1].shape[0], args[1].shape[1]);
                let m = f(0).len() / k;
                let mut shape = args[0].shape.clone();
                *shape.last_mut().unwrap() = n;
                Tensor::f32(shape, matmul_rows(f(0), m, k, &self.rows(args[1])?, n))
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
                let y = matmul_rows(f(0), m, k, &self.rows(args[1])?, n);
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

/// Weights every user of which takes them as a matrix read in stored form: the weight
/// operand of a linear product or the table of an embedding.
fn stored_weights(graph: &Graph) -> std::collections::HashSet<NodeId> {
    let mut weights: HashMap<NodeId, bool> = HashMap::new();
    for (id, node) in graph.nodes() {
        if matches!(node.op, Op::Weight { .. }) {
            weights.entry(id).or_insert(true);
        }
    }
    for (_, node) in graph.nodes() {
        for (i, input) in node.inputs.iter().enumerate() {
            if let Some(ok) = weights.get_mut(input) {
                *ok &= matches!((&node.op, i), (Op::Linear | Op::LinearSwiglu, 1) | (Op::Embed, 0));
            }
        }
    }
    // A graph output must be an f32 tensor.
    for (_, id) in graph.outputs() {
        weights.insert(*id, false);
    }
    weights.into_iter().filter(|(_, ok)| *ok).map(|(id, _)| id).collect()
}
