//! The op set: every op's attributes, operand arity and shape rule live here, so the
//! printer, parser, verifier and interpreter agree on one definition.

use std::fmt;

use crate::dtype::DType;
use crate::shape::{Dim, TensorType};

/// How rotary embedding pairs dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// Hugging Face `rotate_half`: dimension i pairs with i + rotary_dim/2.
    Half,
    /// Adjacent pairs (2i, 2i+1): the layout of GGUF llama q/k weights, whose rows
    /// llama.cpp's converter permuted so this gives the same attention scores.
    Interleaved,
}

/// Frequency scaling applied on top of `theta`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.1's piecewise scaling (`rope_scaling.rope_type = "llama3"`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: i64,
    },
}

/// A quantized (int8/int4) cache also keeps the most recent positions exact: a query at
/// position q reads the key and value of position t exactly when q - t < this window, and
/// from the codes otherwise (KIVI's full-precision residual, stated per query so the result
/// does not depend on how a prompt is split into steps). Codes alone moved SmolLM2's greedy
/// tokens at top-2 gaps up to 0.098 on unseen chat prompts; with the window none moved (see
/// the README's KV cache section).
pub const KV_EXACT_WINDOW: usize = 32;

/// How the KV cache stores its values. `f16` rounds each value to half precision (half
/// the memory of f32, no per-vector metadata). Quantized caches keep, per (position, head)
/// vector, an f32 scale and an f32 minimum, and codes 0..=255 (int8) or 0..=15 (int4):
/// value = code * scale + minimum. (Symmetric absmax codes flipped confident argmaxes on
/// SmolLM2's goldens; the asymmetric range did not.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum KvQuant {
    #[default]
    F32,
    F16,
    Int8,
    Int4,
}

impl KvQuant {
    pub fn name(self) -> &'static str {
        match self {
            KvQuant::F32 => "f32",
            KvQuant::F16 => "f16",
            KvQuant::Int8 => "int8",
            KvQuant::Int4 => "int4",
        }
    }

    /// int8/int4: integer codes with a scale and minimum per vector (and the exact window).
    pub fn is_packed(self) -> bool {
        matches!(self, KvQuant::Int8 | KvQuant::Int4)
    }

    pub fn from_name(name: &str) -> Option<KvQuant> {
        [KvQuant::F32, KvQuant::F16, KvQuant::Int8, KvQuant::Int4].into_iter().find(|q| q.name() == name)
    }

    /// Bytes of the values of one cached vector of `head_dim` elements.
    pub fn data_bytes_per_vector(self, head_dim: usize) -> usize {
        match self {
            KvQuant::F32 => 4 * head_dim,
            KvQuant::F16 => 2 * head_dim,
            KvQuant::Int8 => head_dim,
            KvQuant::Int4 => head_dim.div_ceil(2),
        }
    }

    /// Bytes of the scale and minimum of one cached vector (two f32 when quantized).
    pub fn scale_bytes_per_vector(self) -> usize {
        match self {
            KvQuant::F32 | KvQuant::F16 => 0,
            _ => 8,
        }
    }
}

/// Rotary embedding parameters, shared by `rope` and the fused `gqa`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rotary {
    pub theta: f32,
    pub rotary_dim: usize,
    pub style: RopeStyle,
    pub scaling: RopeScaling,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvKind {
    Key,
    Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input, bound by the caller (`tokens`).
    Input {
        name: String,
    },
    /// A named weight from the model's weight store; never copied into the graph.
    Weight {
        name: String,
    },
    /// (tokens[s]) -> i32[s]: absolute positions p..p+s of the tokens in this step.
    Positions,
    /// (table[v, d], ids[s]) -> f32[s, d]: row gather.
    Embed,
    /// (x[.., d], w[d]) -> x * rsqrt(mean(x^2) + eps) * w.
    RmsNorm {
        eps: f32,
    },
    /// (x[.., k], w[n, k]) -> [.., n]: x times w transposed (weights stored out x in).
    Linear,
    /// Elementwise, b broadcast over a's leading dimensions (b's shape is a suffix of a's).
    Add,
    Mul,
    Silu,
    Reshape {
        shape: Vec<Dim>,
    },
    /// Constant-bounds slice along one axis.
    Slice {
        axis: usize,
        start: i64,
        end: i64,
    },
    /// (x[s, h, d], pos[s]) -> x rotated on its first `rotary_dim` dims.
    Rope {
        theta: f32,
        rotary_dim: usize,
        style: RopeStyle,
        scaling: RopeScaling,
    },
    /// (x[s, h, d]) -> [p+s, h, d]: appends this step's keys or values to the cache of
    /// `layer` and yields the whole cache (as stored: a quantized cache gives back its
    /// dequantized values). With `gqa`, the only ops with a side effect.
    KvAppend {
        layer: usize,
        kind: KvKind,
        quant: KvQuant,
    },
    /// (q[s, hq, d], k[t, hk, d], v[t, hk, d]) -> [s, hq, d]: causal attention where query i
    /// sits at position t - s + i; hq must be a multiple of hk (grouped-query attention).
    Attention {
        scale: f32,
    },
    /// (a, b, w) -> rms_norm(a + b, w): the residual add feeding a norm, in one op.
    AddRmsNorm {
        eps: f32,
    },
    /// (x[.., k], w[2f, k]) -> [.., f]: y = x w^T, then silu(y[.., :f]) * y[.., f:]
    /// (SwiGLU as the epilogue of the fused gate/up projection).
    LinearSwiglu,
    /// (q[s, hq, d], k[s, hk, d], v[s, hk, d], pos[s]) -> [s, hq, d]: rotary embedding on
    /// q and k, k and v appended to the cache of `layer`, then causal attention: one
    /// layer's rope/kv_append/attention chain as one op (like ONNX Runtime's
    /// GroupQueryAttention).
    Gqa {
        layer: usize,
        scale: f32,
        rotary: Rotary,
        quant: KvQuant,
    },
}

/// An attribute value in the text form.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ident(String),
    Str(String),
    Dims(Vec<Dim>),
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::Int(v) => write!(f, "{v}"),
            // Debug for f32 is the shortest text that parses back to the same value and always
            // carries a `.` or an exponent, so the parser can tell floats from integers.
            Attr::Float(v) => write!(f, "{v:?}"),
            Attr::Ident(v) => f.write_str(v),
            Attr::Str(v) => write!(f, "{v:?}"),
            Attr::Dims(dims) => {
                f.write_str("[")?;
                for (i, d) in dims.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{d}")?;
                }
                f.write_str("]")
            }
        }
    }
}

impl Op {
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Weight { .. } => "weight",
            Op::Positions => "positions",
            Op::Embed => "embed",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Linear => "linear",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Silu => "silu",
            Op::Reshape { .. } => "reshape",
            Op::Slice { .. } => "slice",
            Op::Rope { .. } => "rope",
            Op::KvAppend { .. } => "kv_append",
            Op::Attention { .. } => "attention",
            Op::AddRmsNorm { .. } => "add_rms_norm",
            Op::LinearSwiglu => "linear_swiglu",
            Op::Gqa { .. } => "gqa",
        }
    }

    /// Number of operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. } | Op::Weight { .. } => 0,
            Op::Positions | Op::Silu | Op::Reshape { .. } | Op::Slice { .. } | Op::KvAppend { .. } => 1,
            Op::Embed | Op::RmsNorm { .. } | Op::Linear | Op::Add | Op::Mul | Op::Rope { .. } | Op::LinearSwiglu => 2,
            Op::Attention { .. } | Op::AddRmsNorm { .. } => 3,
            Op::Gqa { .. } => 4,
        }
    }

    /// Ops whose type is declared rather than inferred.
    pub fn is_source(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Weight { .. })
    }

    /// The quoted name of a source op (`input "tokens"`, `weight "blk.0.attn_q.weight"`).
    pub fn source_name(&self) -> Option<&str> {
        match self {
            Op::Input { name } | Op::Weight { name } => Some(name),
            _ => None,
        }
    }

    /// Attributes in their printed order.
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        match self {
            Op::RmsNorm { eps } => vec![("eps", Attr::Float(*eps))],
            Op::Reshape { shape } => vec![("shape", Attr::Dims(shape.clone()))],
            Op::Slice { axis, start, end } => {
                vec![("axis", Attr::Int(*axis as i64)), ("start", Attr::Int(*start)), ("end", Attr::Int(*end))]
            }
            Op::Rope { theta, rotary_dim, style, scaling } => {
                rotary_attrs(&Rotary { theta: *theta, rotary_dim: *rotary_dim, style: *style, scaling: *scaling })
            }
            Op::KvAppend { layer, kind, quant } => {
                let kind = match kind {
                    KvKind::Key => "key",
                    KvKind::Value => "value",
                };
                let mut attrs = vec![("layer", Attr::Int(*layer as i64)), ("kind", Attr::Ident(kind.into()))];
                if *quant != KvQuant::F32 {
                    attrs.push(("kv", Attr::Ident(quant.name().into())));
                }
                attrs
            }
            Op::Attention { scale } => vec![("scale", Attr::Float(*scale))],
            Op::AddRmsNorm { eps } => vec![("eps", Attr::Float(*eps))],
            Op::Gqa { layer, scale, rotary, quant } => {
                let mut attrs = vec![("layer", Attr::Int(*layer as i64)), ("scale", Attr::Float(*scale))];
                attrs.extend(rotary_attrs(rotary));
                if *quant != KvQuant::F32 {
                    attrs.push(("kv", Attr::Ident(quant.name().into())));
                }
                attrs
            }
            _ => vec![],
        }
    }

    /// Builds an op from its mnemonic, source name and attributes (the parser's half of
    /// `mnemonic`/`attrs`). Every attribute must be known and every required one present.
    pub fn from_parts(mnemonic: &str, source: Option<String>, attrs: Vec<(String, Attr)>) -> Result<Op, String> {
        let mut bag = AttrBag { attrs, used: Vec::new() };
        let needs_source = matches!(mnemonic, "input" | "weight");
        if needs_source != source.is_some() {
            return Err(if needs_source {
                format!("`{mnemonic}` needs a quoted name")
            } else {
                format!("`{mnemonic}` takes no quoted name")
            });
        }
        let op = match mnemonic {
            "input" => Op::Input { name: source.unwrap_or_default() },
            "weight" => Op::Weight { name: source.unwrap_or_default() },
            "positions" => Op::Positions,
            "embed" => Op::Embed,
            "rms_norm" => Op::RmsNorm { eps: bag.float("eps")? },
            "linear" => Op::Linear,
            "add" => Op::Add,
            "mul" => Op::Mul,
            "silu" => Op::Silu,
            "reshape" => Op::Reshape { shape: bag.dims("shape")? },
            "slice" => Op::Slice { axis: bag.usize("axis")?, start: bag.int("start")?, end: bag.int("end")? },
            "rope" => bag.rotary()?.as_op(),
            "kv_append" => {
                let kind = match bag.ident("kind")?.as_str() {
                    "key" => KvKind::Key,
                    "value" => KvKind::Value,
                    other => return Err(format!("unknown kv kind `{other}` (key, value)")),
                };
                Op::KvAppend { layer: bag.usize("layer")?, kind, quant: bag.kv_quant()? }
            }
            "attention" => Op::Attention { scale: bag.float("scale")? },
            "add_rms_norm" => Op::AddRmsNorm { eps: bag.float("eps")? },
            "linear_swiglu" => Op::LinearSwiglu,
            "gqa" => Op::Gqa {
                layer: bag.usize("layer")?,
                scale: bag.float("scale")?,
                rotary: bag.rotary()?,
                quant: bag.kv_quant()?,
            },
            other => return Err(format!("unknown op `{other}`")),
        };
        bag.finish()?;
        Ok(op)
    }

    /// The output type from the operand types, or an error saying which rule failed.
    /// Source ops have declared types and are not inferred.
    pub fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        if inputs.len() != self.arity() {
            return Err(format!("`{}` takes {} operands, got {}", self.mnemonic(), self.arity(), inputs.len()));
        }
        let f32_only = |i: usize| -> Result<(), String> {
            if inputs[i].dtype == DType::F32 {
                Ok(())
            } else {
                Err(format!("operand {i} must be f32, found {}", inputs[i].dtype))
            }
        };
        let rank_is = |i: usize, r: usize| -> Result<(), String> {
            if inputs[i].rank() == r {
                Ok(())
            } else {
                Err(format!("operand {i} must have rank {r}, found {}", inputs[i]))
            }
        };
        match self {
            Op::AddRmsNorm { eps } => {
                let sum = Op::Add.infer(&inputs[..2])?;
                Op::RmsNorm { eps: *eps }.infer(&[&sum, inputs[2]])
            }
            Op::LinearSwiglu => {
                let y = Op::Linear.infer(inputs)?;
                let n = y.shape.last().and_then(|d| d.as_const()).unwrap_or(1);
                if n % 2 != 0 {
                    return Err(format!("fused gate/up weight has an odd row count {n}"));
                }
                let mut shape = y.shape;
                *shape.last_mut().unwrap() = Dim::konst(n / 2);
                Ok(TensorType::new(DType::F32, shape))
            }
            Op::Gqa { rotary, .. } => {
                let rope = rotary.as_op();
                let q = rope.infer(&[inputs[0], inputs[3]])?;
                let k = rope.infer(&[inputs[1], inputs[3]])?;
                if inputs[2].shape != k.shape || inputs[2].dtype != DType::F32 {
                    return Err(format!("values {} must match keys {}", inputs[2], k));
                }
                let all = Op::KvAppend { layer: 0, kind: KvKind::Key, quant: KvQuant::F32 }.infer(&[&k])?;
                Op::Attention { scale: 1.0 }.infer(&[&q, &all, &all])
            }
            Op::Input { .. } | Op::Weight { .. } => Err("source ops have declared types".into()),
            Op::Positions => {
                rank_is(0, 1)?;
                Ok(TensorType::new(DType::I32, inputs[0].shape.clone()))
            }
            Op::Embed => {
                rank_is(0, 2)?;
                rank_is(1, 1)?;
                if inputs[1].dtype != DType::I32 {
                    return Err(format!("ids must be i32, found {}", inputs[1].dtype));
                }
                Ok(TensorType::new(DType::F32, vec![inputs[1].shape[0].clone(), inputs[0].shape[1].clone()]))
            }
            Op::RmsNorm { .. } => {
                f32_only(0)?;
                rank_is(1, 1)?;
                if !inputs[1].dtype.is_float() {
                    return Err(format!("norm weight must be a float type, found {}", inputs[1].dtype));
                }
                let last = inputs[0].shape.last().ok_or("operand 0 must have rank >= 1")?;
                if *last != inputs[1].shape[0] {
                    return Err(format!("norm weight {} does not match last dim of {}", inputs[1], inputs[0]));
                }
                Ok(inputs[0].clone())
            }
            Op::Linear => {
                f32_only(0)?;
                rank_is(1, 2)?;
                if !inputs[1].dtype.is_float() {
                    return Err(format!("weight must be a float or quantized type, found {}", inputs[1].dtype));
                }
                let k = inputs[0].shape.last().ok_or("operand 0 must have rank >= 1")?;
                if *k != inputs[1].shape[1] {
                    return Err(format!("inner dims differ: {} x {}^T", inputs[0], inputs[1]));
                }
                let mut shape = inputs[0].shape.clone();
                *shape.last_mut().unwrap() = inputs[1].shape[0].clone();
                Ok(TensorType::new(DType::F32, shape))
            }
            Op::Add | Op::Mul => {
                f32_only(0)?;
                if inputs[1].dtype.is_quantized() || !inputs[1].dtype.is_float() {
                    return Err(format!("operand 1 must be a plain float type, found {}", inputs[1].dtype));
                }
                let (a, b) = (&inputs[0].shape, &inputs[1].shape);
                if b.len() > a.len() || a[a.len() - b.len()..] != b[..] {
                    return Err(format!("shapes do not broadcast: {} and {}", inputs[0], inputs[1]));
                }
                Ok(inputs[0].clone())
            }
            Op::Silu => {
                f32_only(0)?;
                Ok(inputs[0].clone())
            }
            Op::Reshape { shape } => {
                f32_only(0)?;
                let out = TensorType::new(DType::F32, shape.clone());
                if out.volume_signature() != inputs[0].volume_signature() {
                    return Err(format!("reshape changes the element count: {} -> {}", inputs[0], out));
                }
                Ok(out)
            }
            Op::Slice { axis, start, end } => {
                f32_only(0)?;
                let dim = inputs[0].shape.get(*axis).ok_or_else(|| format!("axis {axis} out of range"))?;
                let len = dim.as_const().ok_or_else(|| format!("slice axis {axis} is symbolic ({dim})"))?;
                if !(0 <= *start && start < end && *end <= len) {
                    return Err(format!("slice {start}..{end} out of bounds for axis {axis} of length {len}"));
                }
                let mut shape = inputs[0].shape.clone();
                shape[*axis] = Dim::konst(end - start);
                Ok(TensorType::new(DType::F32, shape))
            }
            Op::Rope { rotary_dim, .. } => {
                f32_only(0)?;
                rank_is(0, 3)?;
                rank_is(1, 1)?;
                if inputs[1].dtype != DType::I32 || inputs[1].shape[0] != inputs[0].shape[0] {
                    return Err(format!("positions must be i32[{}], found {}", inputs[0].shape[0], inputs[1]));
                }
                let d = inputs[0].shape[2].as_const().unwrap_or(0);
                if *rotary_dim == 0 || rotary_dim % 2 != 0 || *rotary_dim as i64 > d {
                    return Err(format!("rotary_dim {rotary_dim} must be even and at most the head dim {d}"));
                }
                Ok(inputs[0].clone())
            }
            Op::KvAppend { .. } => {
                f32_only(0)?;
                rank_is(0, 3)?;
                let mut shape = inputs[0].shape.clone();
                shape[0] = Dim::sym("p").add(&shape[0]);
                Ok(TensorType::new(DType::F32, shape))
            }
            Op::Attention { .. } => {
                for i in 0..3 {
                    f32_only(i)?;
                    rank_is(i, 3)?;
                }
                let (q, k, v) = (&inputs[0].shape, &inputs[1].shape, &inputs[2].shape);
                if k != v {
                    return Err(format!("keys {} and values {} differ", inputs[1], inputs[2]));
                }
                if q[2] != k[2] {
                    return Err(format!("query head dim {} differs from key head dim {}", q[2], k[2]));
                }
                match (q[1].as_const(), k[1].as_const()) {
                    (Some(hq), Some(hk)) if hk > 0 && hq % hk == 0 => {}
                    _ => return Err(format!("query heads {} are not a multiple of kv heads {}", q[1], k[1])),
                }
                Ok(inputs[0].clone())
            }
        }
    }
}

impl Rotary {
    pub fn as_op(&self) -> Op {
        Op::Rope { theta: self.theta, rotary_dim: self.rotary_dim, style: self.style, scaling: self.scaling }
    }
}

fn rotary_attrs(r: &Rotary) -> Vec<(&'static str, Attr)> {
    let style = match r.style {
        RopeStyle::Half => "half",
        RopeStyle::Interleaved => "interleaved",
    };
    let mut attrs = vec![
        ("theta", Attr::Float(r.theta)),
        ("rotary_dim", Attr::Int(r.rotary_dim as i64)),
        ("style", Attr::Ident(style.into())),
    ];
    if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } = r.scaling {
        attrs.extend([
            ("scaling", Attr::Ident("llama3".into())),
            ("factor", Attr::Float(factor)),
            ("low_freq_factor", Attr::Float(low_freq_factor)),
            ("high_freq_factor", Attr::Float(high_freq_factor)),
            ("original_max_position", Attr::Int(original_max_position)),
        ]);
    }
    attrs
}

struct AttrBag {
    attrs: Vec<(String, Attr)>,
    used: Vec<String>,
}

impl AttrBag {
    fn has(&self, key: &str) -> bool {
        self.attrs.iter().any(|(k, _)| k == key)
    }

    fn take(&mut self, key: &str) -> Result<Attr, String> {
        self.used.push(key.to_string());
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("missing attribute `{key}`"))
    }

    fn float(&mut self, key: &str) -> Result<f32, String> {
        match self.take(key)? {
            Attr::Float(v) => Ok(v),
            Attr::Int(v) => Ok(v as f32),
            other => Err(format!("attribute `{key}` must be a number, found {other}")),
        }
    }

    fn int(&mut self, key: &str) -> Result<i64, String> {
        match self.take(key)? {
            Attr::Int(v) => Ok(v),
            other => Err(format!("attribute `{key}` must be an integer, found {other}")),
        }
    }

    fn usize(&mut self, key: &str) -> Result<usize, String> {
        usize::try_from(self.int(key)?).map_err(|_| format!("attribute `{key}` must not be negative"))
    }

    fn ident(&mut self, key: &str) -> Result<String, String> {
        match self.take(key)? {
            Attr::Ident(v) => Ok(v),
            other => Err(format!("attribute `{key}` must be a name, found {other}")),
        }
    }

    fn dims(&mut self, key: &str) -> Result<Vec<Dim>, String> {
        match self.take(key)? {
            Attr::Dims(v) => Ok(v),
            other => Err(format!("attribute `{key}` must be a dim list, found {other}")),
        }
    }

    fn rotary(&mut self) -> Result<Rotary, String> {
        let style = match self.ident("style")?.as_str() {
            "half" => RopeStyle::Half,
            "interleaved" => RopeStyle::Interleaved,
            other => return Err(format!("unknown rope style `{other}` (half, interleaved)")),
        };
        let scaling = if self.has("scaling") {
            match self.ident("scaling")?.as_str() {
                "llama3" => RopeScaling::Llama3 {
                    factor: self.float("factor")?,
                    low_freq_factor: self.float("low_freq_factor")?,
                    high_freq_factor: self.float("high_freq_factor")?,
                    original_max_position: self.int("original_max_position")?,
                },
                other => return Err(format!("unknown rope scaling `{other}` (llama3)")),
            }
        } else {
            RopeScaling::None
        };
        Ok(Rotary { theta: self.float("theta")?, rotary_dim: self.usize("rotary_dim")?, style, scaling })
    }

    fn kv_quant(&mut self) -> Result<KvQuant, String> {
        if !self.has("kv") {
            return Ok(KvQuant::F32);
        }
        let name = self.ident("kv")?;
        KvQuant::from_name(&name).ok_or_else(|| format!("unknown kv cache type `{name}` (f32, f16, int8, int4)"))
    }

    fn finish(self) -> Result<(), String> {
        match self.attrs.iter().find(|(k, _)| !self.used.contains(k)) {
            Some((k, _)) => Err(format!("unknown attribute `{k}`")),
            None => Ok(()),
        }
    }
}
