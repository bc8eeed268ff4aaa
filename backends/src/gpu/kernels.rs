//! Kernel sources from the tera templates in `templates/`, weight re-layout for them, and
//! naga validation + translation to MSL and SPIR-V.

use std::sync::OnceLock;

use slmc_ir::blocks::{q4_blocks, q8_blocks};
use slmc_ir::{AttnLimits, DType, KvQuant, Op};

use super::GpuError;

/// Optional GPU features a kernel may use (the target profile's `shader-f16` and
/// `subgroups`). Without them every kernel has a plain fallback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuFeatures {
    /// Native f16 storage types (`enable f16;`); without it f16 data is read in pairs
    /// from u32 words with `unpack2x16float`.
    pub shader_f16: bool,
    /// Subgroup reductions (`subgroupAdd`, `subgroupMax`, ...); the width is never assumed.
    pub subgroups: bool,
}

impl GpuFeatures {
    pub const NONE: GpuFeatures = GpuFeatures { shader_f16: false, subgroups: false };
    pub const ALL: GpuFeatures = GpuFeatures { shader_f16: true, subgroups: true };

    pub fn of_profile(profile: &slmc_targets::TargetProfile) -> GpuFeatures {
        GpuFeatures {
            shader_f16: profile.has_feature(slmc_targets::FEATURE_SHADER_F16),
            subgroups: profile.has_feature(slmc_targets::FEATURE_SUBGROUPS),
        }
    }

    /// The features a generated kernel actually uses.
    pub fn used_by(wgsl: &str) -> GpuFeatures {
        GpuFeatures { shader_f16: wgsl.starts_with("enable f16;"), subgroups: wgsl.contains("subgroup") }
    }

    pub fn union(self, other: GpuFeatures) -> GpuFeatures {
        GpuFeatures { shader_f16: self.shader_f16 || other.shader_f16, subgroups: self.subgroups || other.subgroups }
    }

    /// WebGPU feature names, in a stable order.
    pub fn names(self) -> Vec<String> {
        let mut out = Vec::new();
        if self.shader_f16 {
            out.push(slmc_targets::FEATURE_SHADER_F16.to_string());
        }
        if self.subgroups {
            out.push(slmc_targets::FEATURE_SUBGROUPS.to_string());
        }
        out
    }

    fn naga_capabilities(self) -> naga::valid::Capabilities {
        // pack2x16float / unpack2x16float are core WebGPU (wgpu's downlevel SHADER_F16_IN_F32).
        let mut caps = naga::valid::Capabilities::default() | naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
        caps.set(naga::valid::Capabilities::SHADER_FLOAT16, self.shader_f16);
        caps.set(naga::valid::Capabilities::SUBGROUP, self.subgroups);
        caps
    }
}

/// How a weight buffer is laid out for the kernels.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightLayout {
    pub kind: &'static str,
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// Word offset of the codes after the per-block scales.
    pub codes_offset: usize,
    /// 4-bit symmetric codes: value = (code - 8) * scale (the minimum word is unused).
    pub sym: bool,
}

impl WeightLayout {
    pub fn name(&self) -> String {
        match self.kind {
            "q4" => format!("q4g{}{}", self.group, if self.sym { "s" } else { "" }),
            other => other.to_string(),
        }
    }

    pub fn native(dtype: DType) -> bool {
        matches!(
            dtype,
            DType::F32
                | DType::F16
                | DType::Q8_0
                | DType::Q4_0
                | DType::Q4_0G64
                | DType::Q4_0G128
                | DType::Q4_1
                | DType::Q4_1G64
                | DType::Q4_1G128
        )
    }
}

/// Rewrites stored bytes into the layout the kernels read: 4-bit blocks become
/// (scale, minimum) f32 pairs followed by the code bytes as they were (symmetric Q4_0
/// blocks keep a zero minimum and decode as (code - 8) * scale); Q8_0 becomes f32 scales
/// then the code bytes; f16 matrices with an even row length keep their bytes (read as
/// pairs); everything else becomes f32. `packed: false` (norm and bias vectors, which
/// their kernels read as f32) always gives f32.
pub fn relayout(dtype: DType, bytes: &[u8], rows: usize, cols: usize, packed: bool) -> (Vec<u8>, WeightLayout) {
    let g = dtype.block_len();
    let blocks = rows * cols / g;
    let dtype_here = if packed { dtype } else { DType::F32 };
    match dtype_here {
        DType::F16 if cols.is_multiple_of(2) => {
            (bytes.to_vec(), WeightLayout { kind: "f16", rows, cols, group: 1, codes_offset: 0, sym: false })
        }
        DType::Q4_0 | DType::Q4_0G64 | DType::Q4_0G128 | DType::Q4_1 | DType::Q4_1G64 | DType::Q4_1G128 => {
            // Scale/minimum pairs, then the codes, in one allocation (an embedding table is
            // tens of megabytes).
            let has_min = dtype.q4_has_min() == Some(true);
            let mut laid = Vec::with_capacity(blocks * 8 + blocks * g / 2);
            for b in q4_blocks(dtype, bytes) {
                laid.extend_from_slice(&b.d.to_le_bytes());
                laid.extend_from_slice(&b.m.unwrap_or(0.0).to_le_bytes());
            }
            let codes_offset = laid.len() / 4;
            for b in q4_blocks(dtype, bytes) {
                laid.extend_from_slice(b.packed);
            }
            (laid, WeightLayout { kind: "q4", rows, cols, group: g, codes_offset, sym: !has_min })
        }
        DType::Q8_0 => {
            let mut laid = Vec::with_capacity(blocks * 4 + blocks * 32);
            for b in q8_blocks(bytes) {
                laid.extend_from_slice(&b.d.to_le_bytes());
            }
            let codes_offset = laid.len() / 4;
            for b in q8_blocks(bytes) {
                laid.extend_from_slice(b.codes);
            }
            (laid, WeightLayout { kind: "q8", rows, cols, group: 32, codes_offset, sym: true })
        }
        _ => {
            let mut values = vec![0.0f32; rows * cols];
            slmc_ir::dtype::dequantize_into(dtype, bytes, &mut values);
            let out = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (out, WeightLayout { kind: "f32", rows, cols, group: 1, codes_offset: 0, sym: false })
        }
    }
}

/// The kernel templates, by file. A kernel is rendered from a `Template` value; the
/// templates include each other by file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Template {
    Embed,
    Linear,
    RmsNorm,
    Elementwise,
    Slice,
    RopeCache,
    Attention,
    AttentionCombine,
    Argmax,
}

macro_rules! template_files {
    ($($file:literal),* $(,)?) => {
        const TEMPLATES: &[(&str, &str)] = &[$(($file, include_str!(concat!("templates/", $file)))),*];
    };
}

template_files!(
    "common.wgsl.tera",
    "weights.wgsl.tera",
    "embed.wgsl.tera",
    "linear.wgsl.tera",
    "rms_norm.wgsl.tera",
    "elementwise.wgsl.tera",
    "slice.wgsl.tera",
    "rope_cache.wgsl.tera",
    "attention.wgsl.tera",
    "attention_combine.wgsl.tera",
    "kv_cache.wgsl.tera",
    "argmax.wgsl.tera",
);

impl Template {
    fn file(self) -> &'static str {
        match self {
            Template::Embed => "embed.wgsl.tera",
            Template::Linear => "linear.wgsl.tera",
            Template::RmsNorm => "rms_norm.wgsl.tera",
            Template::Elementwise => "elementwise.wgsl.tera",
            Template::Slice => "slice.wgsl.tera",
            Template::RopeCache => "rope_cache.wgsl.tera",
            Template::Attention => "attention.wgsl.tera",
            Template::AttentionCombine => "attention_combine.wgsl.tera",
            Template::Argmax => "argmax.wgsl.tera",
        }
    }
}

fn tera() -> &'static tera::Tera {
    static TERA: OnceLock<tera::Tera> = OnceLock::new();
    TERA.get_or_init(|| {
        let mut t = tera::Tera::default();
        t.autoescape_on(vec![]);
        t.add_raw_templates(TEMPLATES.iter().map(|(n, s)| (*n, *s))).expect("the kernel templates parse");
        t
    })
}

fn render(template: Template, name: String, ctx: tera::Context) -> Result<(String, String), GpuError> {
    let mut ctx = ctx;
    if !ctx.contains_key("enable_f16") {
        ctx.insert("enable_f16", &false);
    }
    let src = tera()
        .render(template.file(), &ctx)
        .map_err(|e| GpuError::Kernel { kernel: name.clone(), message: format!("{e:?}") })?;
    // Drop the blank lines template tags leave behind: repeated ones, ones right after an
    // opening brace or before a closing one, and trailing ones, so snapshots stay tidy.
    let lines: Vec<&str> = src.lines().map(str::trim_end).collect();
    let mut kept: Vec<&str> = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.is_empty() {
            let after_open = kept.last().is_none_or(|l| l.is_empty() || l.ends_with('{'));
            let next = lines[i + 1..].iter().find(|l| !l.is_empty());
            let before_close = next.is_none_or(|l| l.trim_start().starts_with('}'));
            if after_open || before_close {
                continue;
            }
        }
        kept.push(line);
    }
    let mut out = kept.join("\n");
    out.push('\n');
    Ok((name, out))
}

fn weight_ctx(layout: &WeightLayout, features: GpuFeatures) -> tera::Context {
    let mut ctx = tera::Context::new();
    let native_f16 = layout.kind == "f16" && features.shader_f16;
    ctx.insert("layout", layout.kind);
    ctx.insert("enable_f16", &native_f16);
    ctx.insert("w_elem", if native_f16 { "vec2<f16>" } else { "u32" });
    ctx.insert("rows", &layout.rows);
    ctx.insert("cols", &layout.cols);
    ctx.insert("group", &layout.group);
    ctx.insert("codes_offset", &layout.codes_offset);
    ctx.insert("sym", &layout.sym);
    ctx
}

/// The layout's part of a kernel name: `f16h` when f16 weights are read natively.
fn layout_tag(layout: &WeightLayout, features: GpuFeatures) -> String {
    if layout.kind == "f16" && features.shader_f16 {
        "f16h".into()
    } else {
        layout.name()
    }
}

fn float(v: f32) -> String {
    format!("{v:?}")
}

/// Gathers the rows of a table (or of the chunk of it holding rows `row0..`).
pub fn embed(layout: &WeightLayout, row0: usize, features: GpuFeatures) -> Result<(String, String), GpuError> {
    let mut ctx = weight_ctx(layout, features);
    ctx.insert("row0", &row0);
    let chunk = if row0 > 0 { format!("_r{row0}") } else { String::new() };
    render(
        Template::Embed,
        format!("embed_{}_{}x{}{chunk}", layout_tag(layout, features), layout.rows, layout.cols),
        ctx,
    )
}

/// `out_cols` outputs per token from this weight (chunk), written at columns
/// `out_offset..` of rows `out_stride` wide.
pub fn linear(
    layout: &WeightLayout,
    out_cols: usize,
    swiglu: bool,
    out_stride: usize,
    out_offset: usize,
    features: GpuFeatures,
) -> Result<(String, String), GpuError> {
    let mut ctx = weight_ctx(layout, features);
    ctx.insert("out_cols", &out_cols);
    ctx.insert("swiglu", &swiglu);
    ctx.insert("out_stride", &out_stride);
    ctx.insert("out_offset", &out_offset);
    let op = if swiglu { Op::LinearSwiglu } else { Op::Linear }.mnemonic();
    let placed = if out_stride != out_cols { format!("_o{out_offset}of{out_stride}") } else { String::new() };
    render(
        Template::Linear,
        format!("{op}_{}_{}x{}{placed}", layout_tag(layout, features), layout.rows, layout.cols),
        ctx,
    )
}

/// With subgroups: one workgroup per row (strided partial sums, `subgroupAdd`, one
/// barrier); otherwise one invocation per row.
/// RMSNorm over rows of `dim`, `rows` rows per token (1 for a hidden state, the head count
/// for per-head q/k norms).
/// `norm` is the op: `rms_norm`, `add_rms_norm`, or `layer_norm` (one row per token, one
/// invocation per row in both variants).
pub fn rms_norm(norm: &Op, dim: usize, rows: usize, features: GpuFeatures) -> Result<(String, String), GpuError> {
    let (eps, add, centered) = match *norm {
        Op::RmsNorm { eps } => (eps, false, false),
        Op::AddRmsNorm { eps } => (eps, true, false),
        Op::LayerNorm { eps } => (eps, false, true),
        _ => return Err(GpuError::Kernel { kernel: norm.mnemonic().into(), message: "not a norm".into() }),
    };
    let subgroups = norm_uses_subgroups(norm, features);
    let mut ctx = tera::Context::new();
    ctx.insert("dim", &dim);
    ctx.insert("rows", &rows);
    ctx.insert("eps", &float(eps));
    ctx.insert("residual", &add);
    ctx.insert("centered", &centered);
    ctx.insert("subgroups", &subgroups);
    let op = norm.mnemonic();
    let variant = if subgroups { "_sg" } else { "" };
    let per_head = if rows > 1 { format!("_r{rows}") } else { String::new() };
    render(Template::RmsNorm, format!("{op}_{dim}{per_head}_{}{variant}", eps.to_bits()), ctx)
}

/// Whether a norm's kernel is the subgroup variant (a workgroup per row) rather than an
/// invocation per row: with subgroups, except layer_norm, which has one variant.
pub fn norm_uses_subgroups(norm: &Op, features: GpuFeatures) -> bool {
    features.subgroups && !matches!(norm, Op::LayerNorm { .. })
}

/// An elementwise kernel, chosen by the IR op it lowers (never by comparing names): a
/// binary op's WGSL operator, or a unary op's expression of `v`. Its kernel names start with
/// the op's mnemonic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elementwise {
    Add,
    Mul,
    Silu,
    GeluTanh,
    /// Times a constant (the f32's bits, so kernels compare and dedupe exactly).
    Scale(u32),
    /// A soft cap c * tanh(v / c) (the f32 bits of c).
    Softcap(u32),
}

impl Elementwise {
    /// The elementwise kernel of `op`, or `None` for ops lowered by their own kernels or
    /// refused (every op is listed, so a new one must be placed here).
    pub fn of(op: &Op) -> Option<Elementwise> {
        match op {
            Op::Add => Some(Elementwise::Add),
            Op::Mul => Some(Elementwise::Mul),
            Op::Silu => Some(Elementwise::Silu),
            Op::GeluTanh => Some(Elementwise::GeluTanh),
            Op::Scale { factor } => Some(Elementwise::Scale(factor.to_bits())),
            Op::Softcap { cap } => Some(Elementwise::Softcap(cap.to_bits())),
            Op::Input { .. }
            | Op::Weight { .. }
            | Op::Positions
            | Op::Embed
            | Op::RmsNorm { .. }
            | Op::LayerNorm { .. }
            | Op::Linear
            | Op::Reshape { .. }
            | Op::Slice { .. }
            | Op::Rope { .. }
            | Op::KvAppend { .. }
            | Op::Attention { .. }
            | Op::AddRmsNorm { .. }
            | Op::LinearSwiglu
            | Op::Gqa { .. } => None,
        }
    }

    fn op(self) -> Op {
        match self {
            Elementwise::Add => Op::Add,
            Elementwise::Mul => Op::Mul,
            Elementwise::Silu => Op::Silu,
            Elementwise::GeluTanh => Op::GeluTanh,
            Elementwise::Scale(bits) => Op::Scale { factor: f32::from_bits(bits) },
            Elementwise::Softcap(bits) => Op::Softcap { cap: f32::from_bits(bits) },
        }
    }

    /// The part of the kernel name that tells kernels of one op with different constants apart.
    fn constant_tag(self) -> String {
        match self {
            Elementwise::Scale(bits) | Elementwise::Softcap(bits) => format!("_c{bits:08x}"),
            _ => String::new(),
        }
    }

    /// `a[e] <operator> b[..]` for binary ops.
    fn binary_operator(self) -> Option<&'static str> {
        match self {
            Elementwise::Add => Some("+"),
            Elementwise::Mul => Some("*"),
            _ => None,
        }
    }

    /// The unary op's value as a WGSL expression of `v` (f32).
    fn unary_expression(self) -> String {
        match self {
            Elementwise::Silu => "v / (1.0 + exp(-v))".into(),
            // x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): saturates where tanh overflows.
            Elementwise::GeluTanh => "v / (1.0 + exp(-1.5957692 * (v + 0.044715 * v * v * v)))".into(),
            Elementwise::Scale(bits) => format!("v * {}", float(f32::from_bits(bits))),
            // c tanh(v / c) as c (1 - 2 / (exp(2v / c) + 1)): saturates where tanh may overflow.
            Elementwise::Softcap(bits) => {
                let c = f32::from_bits(bits);
                format!("{} * (1.0 - 2.0 / (exp(v * {}) + 1.0))", float(c), float(2.0 / c))
            }
            Elementwise::Add | Elementwise::Mul => String::new(),
        }
    }
}

pub fn elementwise(
    kind: Elementwise,
    per_token: usize,
    b_len: usize,
    b_weight: bool,
) -> Result<(String, String), GpuError> {
    let op = kind.op();
    let mut ctx = tera::Context::new();
    ctx.insert("op", op.mnemonic());
    ctx.insert("binary", &kind.binary_operator().is_some());
    ctx.insert("operator", kind.binary_operator().unwrap_or_default());
    ctx.insert("unary", &kind.unary_expression());
    ctx.insert("per_token", &per_token);
    ctx.insert("b_len", &b_len);
    ctx.insert("b_weight", &b_weight);
    let tag = kind.constant_tag();
    let kind = if b_weight { "w" } else { "a" };
    render(Template::Elementwise, format!("{}{tag}_{per_token}_{kind}{b_len}", op.mnemonic()), ctx)
}

pub fn slice(in_cols: usize, start: usize, width: usize) -> Result<(String, String), GpuError> {
    let mut ctx = tera::Context::new();
    ctx.insert("in_cols", &in_cols);
    ctx.insert("start", &start);
    ctx.insert("width", &width);
    render(Template::Slice, format!("slice_{in_cols}_{start}_{width}"), ctx)
}

/// Template parameters of a cache storage kind: bits per code, codes per word, largest
/// code, and the cache's WGSL element type (f16 natively with shader-f16, else pairs in
/// u32 words). Returns the kind's part of kernel names.
///
/// `ring`: for int8/int4 caches, the slots of the exact ring that serves each query's
/// `KV_EXACT_WINDOW` most recent positions (the window plus a step); it follows the codes
/// in the same buffer, f32 values as u32 words, position p in slot p % ring.
fn kv_params(ctx: &mut tera::Context, kv: KvQuant, ring: usize, features: GpuFeatures) -> String {
    ctx.insert("window", &slmc_ir::KV_EXACT_WINDOW);
    ctx.insert("ring", &ring.max(1));
    let (bits, per_word, top) = match kv {
        KvQuant::Int4 => (4, 8, 15),
        _ => (8, 4, 255),
    };
    let native_f16 = kv == KvQuant::F16 && features.shader_f16;
    let elem = match kv {
        KvQuant::F32 => "f32",
        KvQuant::F16 if native_f16 => "f16",
        _ => "u32",
    };
    ctx.insert("cache_elem", elem);
    ctx.insert("enable_f16", &native_f16);
    ctx.insert("kv", kv.name());
    ctx.insert("bits", &bits);
    ctx.insert("per_word", &per_word);
    ctx.insert("top", &top);
    if native_f16 {
        "f16h".into()
    } else if kv.is_packed() {
        format!("{}r{ring}", kv.name())
    } else {
        kv.name().into()
    }
}

/// The head dim a cache kind's kernels need a multiple of: packed codes fill u32 words
/// (8 int4 or 4 int8 codes; 8 for both keeps the scale pair aligned), f16 pairs share one.
pub fn kv_head_dim_multiple(kv: KvQuant) -> usize {
    match kv {
        KvQuant::Int8 | KvQuant::Int4 => 8,
        KvQuant::F16 => 2,
        KvQuant::F32 => 1,
    }
}

/// A layer's cache: the positions a sequence may reach (`context`), and the slots the cache
/// holds them in. A sliding-window layer keeps `window + step - 1` slots (a step's first
/// query still sees `window - 1` earlier positions while the step writes all of its own),
/// position p in slot p % slots; other layers keep one slot per position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLayout {
    pub context: usize,
    pub slots: usize,
}

impl CacheLayout {
    pub fn full(context: usize) -> CacheLayout {
        CacheLayout { context, slots: context }
    }

    /// The ring a layer attending over `window` positions needs with steps of at most
    /// `step` tokens, or the whole context when that is no smaller.
    pub fn for_window(context: usize, window: Option<usize>, step: usize) -> CacheLayout {
        let slots = window.map_or(context, |w| (w + step.max(1) - 1).min(context));
        CacheLayout { context, slots }
    }

    fn insert(&self, ctx: &mut tera::Context) {
        ctx.insert("context", &self.context);
        ctx.insert("slots", &self.slots);
    }

    /// The kernel-name part of a ring (none for a full cache, so those names are unchanged).
    fn tag(&self) -> String {
        if self.slots < self.context {
            format!("_ring{}", self.slots)
        } else {
            String::new()
        }
    }
}

pub fn rope_cache(
    rotary: &slmc_ir::Rotary,
    (hq, hk, hd): (usize, usize, usize),
    cache: CacheLayout,
    kv: KvQuant,
    ring: usize,
    features: GpuFeatures,
) -> Result<(String, String), GpuError> {
    let context = cache.context;
    let mut ctx = tera::Context::new();
    let kv_tag = kv_params(&mut ctx, kv, ring, features);
    let style = rotary.style.name();
    ctx.insert("style", style);
    ctx.insert("rotary_dim", &rotary.rotary_dim);
    ctx.insert("head_dim", &hd);
    ctx.insert("q_heads", &hq);
    ctx.insert("kv_heads", &hk);
    cache.insert(&mut ctx);
    render(
        Template::RopeCache,
        format!("rope_cache_{style}_{kv_tag}_{hq}_{hk}_{hd}_{}_{context}{}", rotary.rotary_dim, cache.tag()),
        ctx,
    )
}

/// How attention splits the keys of a `context`-position cache: `splits` workgroups per
/// (query, head), each over at most `keys` positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySplit {
    pub splits: usize,
    pub keys: usize,
}

/// Loop iterations llvmpipe (lavapipe) runs before it silently leaves a loop; every
/// kernel's per-invocation loops stay below it.
pub const SOFTWARE_LOOP_LIMIT: usize = 65535;

impl KeySplit {
    /// At most 16 splits (the partial buffer grows with them) of at least 256 keys, a
    /// whole number of 64-key tiles each.
    pub fn for_context(context: usize) -> KeySplit {
        let keys = context.div_ceil(16).max(256).div_ceil(64) * 64;
        KeySplit { splits: context.div_ceil(keys).max(1), keys }
    }

    /// Loop iterations of one attention invocation (its busiest path), for the limit check.
    pub fn iterations(&self, head_dim: usize) -> usize {
        let dims = head_dim.div_ceil(64);
        self.keys / 64 * (head_dim + 64 + 64 * dims + dims)
    }
}

#[allow(clippy::too_many_arguments)]
pub fn attention(
    (hq, hk, hd): (usize, usize, usize),
    scale: f32,
    limits: AttnLimits,
    cache: CacheLayout,
    split: KeySplit,
    kv: KvQuant,
    ring: usize,
    features: GpuFeatures,
) -> Result<(String, String), GpuError> {
    let context = cache.context;
    let mut ctx = tera::Context::new();
    let kv_tag = kv_params(&mut ctx, kv, ring, features);
    let mut name = format!("attention_{kv_tag}_{hq}_{hk}_{hd}_{context}{}_k{}", cache.tag(), split.keys);
    if let Some(w) = limits.window {
        name += &format!("_w{w}");
    }
    if let Some(c) = limits.softcap {
        name += &format!("_cap{:08x}", c.to_bits());
    }
    ctx.insert("attn_window", &limits.window.unwrap_or(0));
    ctx.insert("softcap", &limits.softcap.map(float).unwrap_or_default());
    ctx.insert("two_over_cap", &limits.softcap.map(|c| float(2.0 / c)).unwrap_or_default());
    if split.iterations(hd) >= SOFTWARE_LOOP_LIMIT {
        return Err(GpuError::Kernel {
            kernel: name,
            message: format!(
                "an invocation would loop {} times over {} keys (limit {SOFTWARE_LOOP_LIMIT}); lower --context",
                split.iterations(hd),
                split.keys
            ),
        });
    }
    cache.insert(&mut ctx);
    ctx.insert("q_heads", &hq);
    ctx.insert("kv_heads", &hk);
    ctx.insert("head_dim", &hd);
    ctx.insert("dims_per_thread", &hd.div_ceil(64));
    ctx.insert("split", &split.keys);
    ctx.insert("splits", &split.splits);
    ctx.insert("scale", &float(scale));
    render(Template::Attention, name, ctx)
}

/// Merges attention's key splits into the output rows.
pub fn attention_combine((hq, hd): (usize, usize), split: KeySplit) -> Result<(String, String), GpuError> {
    let mut ctx = tera::Context::new();
    ctx.insert("q_heads", &hq);
    ctx.insert("head_dim", &hd);
    ctx.insert("splits", &split.splits);
    render(Template::AttentionCombine, format!("attention_combine_{hq}_{hd}_s{}", split.splits), ctx)
}

/// With subgroups, each subgroup reduces its lanes with `subgroupMax`/`subgroupMin` and
/// only one value per subgroup goes through workgroup memory; otherwise a barrier tree.
pub fn argmax(vocab: usize, features: GpuFeatures) -> Result<(String, String), GpuError> {
    let mut ctx = tera::Context::new();
    ctx.insert("vocab", &vocab);
    ctx.insert("subgroups", &features.subgroups);
    let variant = if features.subgroups { "_sg" } else { "" };
    render(Template::Argmax, format!("argmax_{vocab}{variant}"), ctx)
}

/// A kernel in the other shader languages.
pub struct Translated {
    pub msl: String,
    pub spirv: Vec<u32>,
}

/// Parses and validates WGSL with naga, then writes MSL (each binding at
/// `[[buffer(binding)]]`, buffer sizes after them) and SPIR-V 1.3. Validation allows only
/// the optional features in `features` (a kernel needing more fails here).
pub fn validate_and_translate(wgsl: &str, features: GpuFeatures) -> Result<Translated, String> {
    use naga::back::{msl, spv};
    let module = naga::front::wgsl::parse_str(wgsl).map_err(|e| e.emit_to_string(wgsl))?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), features.naga_capabilities())
        .validate(&module)
        .map_err(|e| e.emit_to_string(wgsl))?;
    let mut resources = msl::EntryPointResources::default();
    let mut max_slot = 0u8;
    for (_, var) in module.global_variables.iter() {
        if let Some(binding) = &var.binding {
            let slot = binding.binding as u8;
            max_slot = max_slot.max(slot);
            let mutable = matches!(var.space, naga::AddressSpace::Storage { access } if access.contains(naga::StorageAccess::STORE));
            resources.resources.insert(*binding, msl::BindTarget { buffer: Some(slot), mutable, ..Default::default() });
        }
    }
    resources.sizes_buffer = Some(max_slot + 1);
    let mut options = msl::Options { lang_version: (2, 1), fake_missing_bindings: false, ..Default::default() };
    for ep in &module.entry_points {
        options.per_entry_point_map.insert(ep.name.clone(), resources.clone());
    }
    let (msl_src, _) = msl::write_string(&module, &info, &options, &msl::PipelineOptions::default())
        .map_err(|e| format!("MSL: {e}"))?;
    let spv_options = spv::Options { lang_version: (1, 3), ..Default::default() };
    let spirv = spv::write_vec(&module, &info, &spv_options, None).map_err(|e| format!("SPIR-V: {e}"))?;
    Ok(Translated { msl: msl_src, spirv })
}
