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
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.1's piecewise scaling (`rope_scaling.rope_type = "llama3"`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: i64,
    },
    /// LongRoPE (Phi-3.5, Phi-4-mini): frequency j is divided by `short_factor[j]` while
    /// the sequence holds at most `original_max_position` tokens and by `long_factor[j]` at
    /// every position of a longer one (transformers re-encodes the whole sequence the first
    /// time it passes that length), and cos/sin are multiplied by `attention_factor`. The
    /// set is sequence state the executor keeps ([`crate::Interpreter::set_long_rope`]).
    LongRope {
        short_factor: Vec<f32>,
        long_factor: Vec<f32>,
        original_max_position: i64,
        attention_factor: f32,
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
#[derive(Clone, Debug, PartialEq)]
pub struct Rotary {
    pub theta: f32,
    pub rotary_dim: usize,
    pub style: RopeStyle,
    pub scaling: RopeScaling,
}

/// What an attention layer does beyond causal softmax attention (Gemma 2 and 3): a
/// sliding window (a query at position q sees keys at positions j with q - j < window,
/// as transformers and llama.cpp mask) and a soft cap on the scaled scores
/// (cap * tanh(score / cap), before the mask and softmax). Both absent prints nothing.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct AttnLimits {
    pub window: Option<usize>,
    pub softcap: Option<f32>,
}

impl AttnLimits {
    pub const NONE: AttnLimits = AttnLimits { window: None, softcap: None };

    pub fn is_none(&self) -> bool {
        *self == AttnLimits::NONE
    }

    /// The first key position a query at `query_pos` sees.
    pub fn first_key(&self, query_pos: usize) -> usize {
        self.window.map_or(0, |w| (query_pos + 1).saturating_sub(w))
    }

    /// A scaled score after the soft cap.
    pub fn cap(&self, score: f32) -> f32 {
        self.softcap.map_or(score, |c| soft_cap(score, c))
    }
}

/// Gemma's soft cap, c * tanh(x / c): the semantics of `softcap` and of attention's cap.
pub fn soft_cap(x: f32, cap: f32) -> f32 {
    cap * (x / cap).tanh()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvKind {
    Key,
    Value,
}

/// The op table's expander: from one line per op (variant, typed attribute fields,
/// mnemonic, operand count) it writes `enum Op`, `mnemonic`, `arity`, `attrs` (printer) and
/// `from_parts` (parser), so no other code spells an op's name or attributes. A field
/// prints as its own name unless the line gives the attribute key (`quant "kv": KvQuant`);
/// a `String` field is the op's quoted source name, not an attribute.
macro_rules! ops {
    ($(
        $(#[$doc:meta])*
        $variant:ident $({ $($field:ident $($key:literal)?: $fty:ty),* $(,)? })? = $mnemonic:literal, $arity:literal;
    )*) => {
        #[derive(Clone, Debug, PartialEq)]
        pub enum Op {
            $( $(#[$doc])* $variant $({ $($field: $fty),* })?, )*
        }

        impl Op {
            pub fn mnemonic(&self) -> &'static str {
                match self { $( Op::$variant { .. } => $mnemonic, )* }
            }

            /// Number of operands the op takes.
            pub fn arity(&self) -> usize {
                match self { $( Op::$variant { .. } => $arity, )* }
            }

            /// Attributes in their printed order.
            #[allow(unused_mut)]
            pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
                let mut out = Vec::new();
                match self {
                    $( Op::$variant $({ $($field),* })? => {
                        $($( AttrField::print($field, attr_key!($field $($key)?), &mut out); )*)?
                    } )*
                }
                out
            }

            /// Builds an op from its mnemonic, source name and attributes (the parser's half of
            /// `mnemonic`/`attrs`). Every attribute must be known and every required one present.
            pub fn from_parts(mnemonic: &str, source: Option<String>, attrs: Vec<(String, Attr)>) -> Result<Op, String> {
                let had_source = source.is_some();
                let mut bag = AttrBag { attrs, used: Vec::new(), source, wants_source: false };
                let op = match mnemonic {
                    $( $mnemonic => Op::$variant $({ $($field: AttrField::parse(&mut bag, attr_key!($field $($key)?))?),* })?, )*
                    other => return Err(format!("unknown op `{other}`")),
                };
                match (bag.wants_source, had_source) {
                    (true, false) => return Err(format!("`{mnemonic}` needs a quoted name")),
                    (false, true) => return Err(format!("`{mnemonic}` takes no quoted name")),
                    _ => {}
                }
                bag.finish()?;
                Ok(op)
            }
        }
    };
}

macro_rules! attr_key {
    ($field:ident) => {
        stringify!($field)
    };
    ($field:ident $key:literal) => {
        $key
    };
}

ops! {
    /// A graph input, bound by the caller (`tokens`).
    Input { name: String } = "input", 0;
    /// A named weight from the model's weight store; never copied into the graph.
    Weight { name: String } = "weight", 0;
    /// (tokens[s]) -> i32[s]: absolute positions p..p+s of the tokens in this step.
    Positions = "positions", 1;
    /// (table[v, d], ids[s]) -> f32[s, d]: row gather.
    Embed = "embed", 2;
    /// (x[.., d], w[d]) -> x * rsqrt(mean(x^2) + eps) * w.
    RmsNorm { eps: f32 } = "rms_norm", 2;
    /// (x[.., d], w[d], b[d]) -> (x - mean(x)) * rsqrt(var(x) + eps) * w + b (StableLM).
    LayerNorm { eps: f32 } = "layer_norm", 3;
    /// (x[.., k], w[n, k]) -> [.., n]: x times w transposed (weights stored out x in).
    Linear = "linear", 2;
    /// Elementwise, b broadcast over a's leading dimensions (b's shape is a suffix of a's).
    Add = "add", 2;
    Mul = "mul", 2;
    Silu = "silu", 1;
    /// GELU with the tanh approximation (Gemma's GeGLU):
    /// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    GeluTanh = "gelu_tanh", 1;
    /// x * factor (Gemma scales its embeddings by sqrt(hidden)).
    Scale { factor: f32 } = "scale", 1;
    /// cap * tanh(x / cap) (Gemma 2's final-logit soft cap).
    Softcap { cap: f32 } = "softcap", 1;
    Reshape { shape: Vec<Dim> } = "reshape", 1;
    /// Constant-bounds slice along one axis.
    Slice { axis: usize, start: i64, end: i64 } = "slice", 1;
    /// (x[s, h, d], pos[s]) -> x rotated on its first `rotary_dim` dims (0: unchanged, a
    /// layer without positional encoding).
    Rope { theta: f32, rotary_dim: usize, style: RopeStyle, scaling: RopeScaling } = "rope", 2;
    /// (x[s, h, d]) -> [p+s, h, d]: appends this step's keys or values to the cache of
    /// `layer` and yields the whole cache (as stored: a quantized cache gives back its
    /// dequantized values). With `gqa`, the only ops with a side effect.
    KvAppend { layer: usize, kind: KvKind, quant "kv": KvQuant } = "kv_append", 1;
    /// (q[s, hq, d], k[t, hk, d], v[t, hk, d]) -> [s, hq, d]: causal attention where query i
    /// sits at position t - s + i; hq must be a multiple of hk (grouped-query attention).
    /// Scores are q.k * scale, then `limits` (window, soft cap).
    Attention { scale: f32, limits: AttnLimits } = "attention", 3;
    /// (a, b, w) -> rms_norm(a + b, w): the residual add feeding a norm, in one op.
    AddRmsNorm { eps: f32 } = "add_rms_norm", 3;
    /// (x[.., k], w[2f, k]) -> [.., f]: y = x w^T, then silu(y[.., :f]) * y[.., f:]
    /// (SwiGLU as the epilogue of the fused gate/up projection).
    LinearSwiglu = "linear_swiglu", 2;
    /// (q[s, hq, d], k[s, hk, d], v[s, hk, d], pos[s]) -> [s, hq, d]: rotary embedding on
    /// q and k, k and v appended to the cache of `layer`, then causal attention: one
    /// layer's rope/kv_append/attention chain as one op (like ONNX Runtime's
    /// GroupQueryAttention).
    Gqa { layer: usize, scale: f32, rotary: Rotary, quant "kv": KvQuant, limits: AttnLimits } = "gqa", 4;
}

/// An attribute value in the text form.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ident(String),
    Str(String),
    Dims(Vec<Dim>),
    Floats(Vec<f32>),
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
            Attr::Dims(dims) => write_list(f, dims.iter().map(|d| d.to_string())),
            Attr::Floats(values) => write_list(f, values.iter().map(|v| format!("{v:?}"))),
        }
    }
}

fn write_list(f: &mut fmt::Formatter<'_>, items: impl Iterator<Item = String>) -> fmt::Result {
    f.write_str("[")?;
    for (i, item) in items.enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        f.write_str(&item)?;
    }
    f.write_str("]")
}

impl Op {
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
                Op::Attention { scale: 1.0, limits: AttnLimits::NONE }.infer(&[&q, &all, &all])
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
            Op::LayerNorm { eps } => {
                if inputs[2] != inputs[1] {
                    return Err(format!("norm bias {} differs from norm weight {}", inputs[2], inputs[1]));
                }
                Op::RmsNorm { eps: *eps }.infer(&inputs[..2])
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
            Op::Silu | Op::GeluTanh | Op::Scale { .. } | Op::Softcap { .. } => {
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
            Op::Rope { rotary_dim, scaling, .. } => {
                f32_only(0)?;
                rank_is(0, 3)?;
                rank_is(1, 1)?;
                if inputs[1].dtype != DType::I32 || inputs[1].shape[0] != inputs[0].shape[0] {
                    return Err(format!("positions must be i32[{}], found {}", inputs[0].shape[0], inputs[1]));
                }
                let d = inputs[0].shape[2].as_const().unwrap_or(0);
                // 0 rotates nothing (a NoPE layer, so its attention still fuses into gqa).
                if rotary_dim % 2 != 0 || *rotary_dim as i64 > d {
                    return Err(format!("rotary_dim {rotary_dim} must be even and at most the head dim {d}"));
                }
                scaling.check(*rotary_dim)?;
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
        Op::Rope { theta: self.theta, rotary_dim: self.rotary_dim, style: self.style, scaling: self.scaling.clone() }
    }
}

/// How a typed attribute field prints into, and parses from, the text form's `key = value`
/// list. One impl per attribute type serves every op that has a field of it.
trait AttrField: Sized {
    fn print(&self, key: &'static str, out: &mut Vec<(&'static str, Attr)>);
    fn parse(bag: &mut AttrBag, key: &'static str) -> Result<Self, String>;
}

impl AttrField for f32 {
    fn print(&self, key: &'static str, out: &mut Vec<(&'static str, Attr)>) {
        out.push((key, Attr::Float(*self)));
    }
    fn parse(bag: &mut AttrBag, key: &'static str) -> Result<Self, String> {
        bag.float(key)
    }
}

impl AttrField for i64 {
    fn print(&self, key: &'static str, out: &mut Vec<(&'static str, Attr)>) {
        out.push((key, Attr::Int(*self)));
    }
    fn parse(bag: &mut AttrBag, key: &'static str) -> Result<Self, String> {
        bag.int(key)
    }
}

impl AttrField for usize {
    fn print(&self, key: &'static str, out: &mut Vec<(&'static str, Attr)>) {
        out.push((key, Attr::Int(*self as i64)));
    }
    fn parse(bag: &mut AttrBag, key: &'static str) -> Result<Self, String> {
        usize::try_from(bag.int(key)?).map_err(|_| format!("attribute `{key}` must not be negative"))
    }
}

impl AttrField for Vec<Dim> {
    fn print(&self, key: &'static str, out: &mut Vec<(&'static str, Attr)>) {
        out.push((key, Attr::Dims(self.clone())));
    }
    fn parse(bag: &mut AttrBag, key: &'static str) -> Result<Self, String> {
        match bag.take(key)? {
            Attr::Dims(v) => Ok(v),
            other => Err(format!("attribute `{key}` must be a dim list, found {other}")),
        }
    }
}

/// The quoted name of a source op (`weight "blk.0.attn_q.weight"`), not a `key = value`.
impl AttrField for String {
    fn print(&self, _key: &'static str, _out: &mut Vec<(&'static str, Attr)>) {}
    fn parse(bag: &mut AttrBag, _key: &'static str) -> Result<Self, String> {
        bag.wants_source = true;
        Ok(bag.source.take().unwrap_or_default())
    }
}

/// Enums written as a bare name (`style = half`).
macro_rules! ident_attr {
    ($ty:ident { $($variant:ident = $text:literal),* $(,)? }) => {
        impl $ty {
            pub fn name(self) -> &'static str {
                match self { $( $ty::$variant => $text, )* }
            }

            pub fn from_name(name: &str) -> Option<$ty> {
                match name { $( $text => Some($ty::$variant), )* _ => None }
            }
        }

        impl AttrField for $ty {
            fn print(&self, key: &'static str, out: &mut Vec<(&'static str, Attr)>) {
                out.push((key, Attr::Ident(self.name().into())));
            }
            fn parse(bag: &mut AttrBag, key: &'static str) -> Result<Self, String> {
                let name = bag.ident(key)?;
                $ty::from_name(&name).ok_or_else(|| {
                    format!("unknown {key} `{name}` ({})", [$($text),*].join(", "))
                })
            }
        }
    };
}

ident_attr!(RopeStyle { Half = "half", Interleaved = "interleaved" });
ident_attr!(KvKind { Key = "key", Value = "value" });

/// The cache type prints only when it is not the default f32.
impl AttrField for KvQuant {
    fn print(&self, key: &'static str, out: &mut Vec<(&'static str, Attr)>) {
        if *self != KvQuant::F32 {
            out.push((key, Attr::Ident(self.name().into())));
        }
    }
    fn parse(bag: &mut AttrBag, key: &'static str) -> Result<Self, String> {
        if !bag.has(key) {
            return Ok(KvQuant::F32);
        }
        let name = bag.ident(key)?;
        KvQuant::from_name(&name).ok_or_else(|| format!("unknown kv cache type `{name}` (f32, f16, int8, int4)"))
    }
}

/// No scaling prints nothing; llama3 scaling prints `scaling = llama3` and its parameters.
impl AttrField for RopeScaling {
    fn print(&self, key: &'static str, out: &mut Vec<(&'static str, Attr)>) {
        match self {
            RopeScaling::None => {}
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => out.extend([
                (key, Attr::Ident("llama3".into())),
                ("factor", Attr::Float(*factor)),
                ("low_freq_factor", Attr::Float(*low_freq_factor)),
                ("high_freq_factor", Attr::Float(*high_freq_factor)),
                ("original_max_position", Attr::Int(*original_max_position)),
            ]),
            RopeScaling::LongRope { short_factor, long_factor, original_max_position, attention_factor } => {
                out.extend([
                    (key, Attr::Ident("longrope".into())),
                    ("short_factor", Attr::Floats(short_factor.clone())),
                    ("long_factor", Attr::Floats(long_factor.clone())),
                    ("original_max_position", Attr::Int(*original_max_position)),
                    ("attention_factor", Attr::Float(*attention_factor)),
                ])
            }
        }
    }
    fn parse(bag: &mut AttrBag, key: &'static str) -> Result<Self, String> {
        if !bag.has(key) {
            return Ok(RopeScaling::None);
        }
        match bag.ident(key)?.as_str() {
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: bag.float("factor")?,
                low_freq_factor: bag.float("low_freq_factor")?,
                high_freq_factor: bag.float("high_freq_factor")?,
                original_max_position: bag.int("original_max_position")?,
            }),
            "longrope" => Ok(RopeScaling::LongRope {
                short_factor: bag.floats("short_factor")?,
                long_factor: bag.floats("long_factor")?,
                original_max_position: bag.int("original_max_position")?,
                attention_factor: bag.float("attention_factor")?,
            }),
            other => Err(format!("unknown rope scaling `{other}` (llama3, longrope)")),
        }
    }
}

/// Prints `window = N` and `softcap = X` only when present.
impl AttrField for AttnLimits {
    fn print(&self, _key: &'static str, out: &mut Vec<(&'static str, Attr)>) {
        if let Some(w) = self.window {
            out.push(("window", Attr::Int(w as i64)));
        }
        if let Some(c) = self.softcap {
            out.push(("softcap", Attr::Float(c)));
        }
    }
    fn parse(bag: &mut AttrBag, _key: &'static str) -> Result<Self, String> {
        let window = if bag.has("window") { Some(AttrField::parse(bag, "window")?) } else { None };
        let softcap = if bag.has("softcap") { Some(bag.float("softcap")?) } else { None };
        if window == Some(0) {
            return Err("attention window must be at least 1".into());
        }
        if softcap.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
            return Err("attention softcap must be a positive number".into());
        }
        Ok(AttnLimits { window, softcap })
    }
}

/// A `Rotary` field prints flat, as `rope`'s own attributes.
impl AttrField for Rotary {
    fn print(&self, _key: &'static str, out: &mut Vec<(&'static str, Attr)>) {
        out.extend(self.as_op().attrs());
    }
    fn parse(bag: &mut AttrBag, _key: &'static str) -> Result<Self, String> {
        Ok(Rotary {
            theta: AttrField::parse(bag, "theta")?,
            rotary_dim: AttrField::parse(bag, "rotary_dim")?,
            style: AttrField::parse(bag, "style")?,
            scaling: AttrField::parse(bag, "scaling")?,
        })
    }
}

struct AttrBag {
    attrs: Vec<(String, Attr)>,
    used: Vec<String>,
    /// The quoted name after the mnemonic, taken by a `String` field.
    source: Option<String>,
    wants_source: bool,
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
            // A literal past f32's range reads as infinity, which has no text form to print
            // back (found by fuzzing).
            Attr::Float(v) if !v.is_finite() => Err(format!("attribute `{key}` must be a finite number, found {v}")),
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

    fn floats(&mut self, key: &str) -> Result<Vec<f32>, String> {
        match self.take(key)? {
            Attr::Floats(v) if v.iter().all(|x| x.is_finite()) => Ok(v),
            Attr::Dims(d) if d.is_empty() => Ok(Vec::new()),
            other => Err(format!("attribute `{key}` must be a list of finite numbers, found {other}")),
        }
    }

    fn ident(&mut self, key: &str) -> Result<String, String> {
        match self.take(key)? {
            Attr::Ident(v) => Ok(v),
            other => Err(format!("attribute `{key}` must be a name, found {other}")),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self.attrs.iter().find(|(k, _)| !self.used.contains(k)) {
            Some((k, _)) => Err(format!("unknown attribute `{k}`")),
            None => Ok(()),
        }
    }
}
