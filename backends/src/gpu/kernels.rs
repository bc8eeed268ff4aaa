//! Kernel sources from the tera templates in `templates/`, weight re-layout for them, and
//! naga validation + translation to MSL and SPIR-V.

use std::sync::OnceLock;

use slmc_ir::dtype::f16_at;
use slmc_ir::DType;

use super::GpuError;

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
/// then the code bytes; everything else becomes f32.
pub fn relayout(dtype: DType, bytes: &[u8], rows: usize, cols: usize) -> (Vec<u8>, WeightLayout) {
    let g = dtype.block_len();
    let blocks = rows * cols / g;
    match dtype {
        DType::Q4_0 | DType::Q4_0G64 | DType::Q4_0G128 | DType::Q4_1 | DType::Q4_1G64 | DType::Q4_1G128 => {
            let has_min = dtype.q4_has_min() == Some(true);
            let data_at = if has_min { 4 } else { 2 };
            let mut scales = Vec::with_capacity(blocks * 8);
            let mut codes = Vec::with_capacity(blocks * g / 2);
            for b in bytes.chunks_exact(dtype.block_bytes()) {
                let d = f16_at(b, 0);
                let m = if has_min { f16_at(b, 2) } else { 0.0 };
                scales.extend_from_slice(&d.to_le_bytes());
                scales.extend_from_slice(&m.to_le_bytes());
                codes.extend_from_slice(&b[data_at..data_at + g / 2]);
            }
            let codes_offset = scales.len() / 4;
            scales.extend(codes);
            (scales, WeightLayout { kind: "q4", rows, cols, group: g, codes_offset, sym: !has_min })
        }
        DType::Q8_0 => {
            let mut scales = Vec::with_capacity(blocks * 4);
            let mut codes = Vec::with_capacity(blocks * 32);
            for b in bytes.chunks_exact(34) {
                scales.extend_from_slice(&f16_at(b, 0).to_le_bytes());
                codes.extend_from_slice(&b[2..34]);
            }
            let codes_offset = scales.len() / 4;
            scales.extend(codes);
            (scales, WeightLayout { kind: "q8", rows, cols, group: 32, codes_offset, sym: true })
        }
        _ => {
            let mut values = vec![0.0f32; rows * cols];
            slmc_ir::dtype::dequantize_into(dtype, bytes, &mut values);
            let out = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (out, WeightLayout { kind: "f32", rows, cols, group: 1, codes_offset: 0, sym: false })
        }
    }
}

const TEMPLATES: &[(&str, &str)] = &[
    ("common", include_str!("templates/common.wgsl.tera")),
    ("weights", include_str!("templates/weights.wgsl.tera")),
    ("embed", include_str!("templates/embed.wgsl.tera")),
    ("linear", include_str!("templates/linear.wgsl.tera")),
    ("rms_norm", include_str!("templates/rms_norm.wgsl.tera")),
    ("elementwise", include_str!("templates/elementwise.wgsl.tera")),
    ("slice", include_str!("templates/slice.wgsl.tera")),
    ("rope_cache", include_str!("templates/rope_cache.wgsl.tera")),
    ("attention", include_str!("templates/attention.wgsl.tera")),
    ("kv_cache", include_str!("templates/kv_cache.wgsl.tera")),
    ("argmax", include_str!("templates/argmax.wgsl.tera")),
];

fn tera() -> &'static tera::Tera {
    static TERA: OnceLock<tera::Tera> = OnceLock::new();
    TERA.get_or_init(|| {
        let mut t = tera::Tera::default();
        t.autoescape_on(vec![]);
        t.add_raw_templates(TEMPLATES.iter().map(|(n, s)| (*n, *s))).expect("the kernel templates parse");
        t
    })
}

fn render(template: &str, name: String, ctx: tera::Context) -> Result<(String, String), GpuError> {
    let src = tera()
        .render(template, &ctx)
        .map_err(|e| GpuError::Kernel { kernel: name.clone(), message: format!("{e:?}") })?;
    // Collapse the blank lines template tags leave behind, so snapshots stay tidy.
    let mut out = String::with_capacity(src.len());
    let mut blank = false;
    for line in src.lines() {
        let is_blank = line.trim().is_empty();
        if !(is_blank && blank) {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        blank = is_blank;
    }
    Ok((name, out))
}

fn weight_ctx(layout: &WeightLayout) -> tera::Context {
    let mut ctx = tera::Context::new();
    ctx.insert("layout", layout.kind);
    ctx.insert("rows", &layout.rows);
    ctx.insert("cols", &layout.cols);
    ctx.insert("group", &layout.group);
    ctx.insert("codes_offset", &layout.codes_offset);
    ctx.insert("sym", &layout.sym);
    ctx
}

fn float(v: f32) -> String {
    format!("{v:?}")
}

/// Gathers the rows of a table (or of the chunk of it holding rows `row0..`).
pub fn embed(layout: &WeightLayout, row0: usize) -> Result<(String, String), GpuError> {
    let mut ctx = weight_ctx(layout);
    ctx.insert("row0", &row0);
    let chunk = if row0 > 0 { format!("_r{row0}") } else { String::new() };
    render("embed", format!("embed_{}_{}x{}{chunk}", layout.name(), layout.rows, layout.cols), ctx)
}

/// `out_cols` outputs per token from this weight (chunk), written at columns
/// `out_offset..` of rows `out_stride` wide.
pub fn linear(
    layout: &WeightLayout,
    out_cols: usize,
    swiglu: bool,
    out_stride: usize,
    out_offset: usize,
) -> Result<(String, String), GpuError> {
    let mut ctx = weight_ctx(layout);
    ctx.insert("out_cols", &out_cols);
    ctx.insert("swiglu", &swiglu);
    ctx.insert("out_stride", &out_stride);
    ctx.insert("out_offset", &out_offset);
    let op = if swiglu { "linear_swiglu" } else { "linear" };
    let placed = if out_stride != out_cols { format!("_o{out_offset}of{out_stride}") } else { String::new() };
    render("linear", format!("{op}_{}_{}x{}{placed}", layout.name(), layout.rows, layout.cols), ctx)
}

pub fn rms_norm(dim: usize, eps: f32, add: bool) -> Result<(String, String), GpuError> {
    let mut ctx = tera::Context::new();
    ctx.insert("dim", &dim);
    ctx.insert("eps", &float(eps));
    ctx.insert("add", &add);
    let op = if add { "add_rms_norm" } else { "rms_norm" };
    render("rms_norm", format!("{op}_{dim}_{}", eps.to_bits()), ctx)
}

pub fn elementwise(op: &str, per_token: usize, b_len: usize, b_weight: bool) -> Result<(String, String), GpuError> {
    let mut ctx = tera::Context::new();
    ctx.insert("op", op);
    ctx.insert("per_token", &per_token);
    ctx.insert("b_len", &b_len);
    ctx.insert("b_weight", &b_weight);
    let kind = if b_weight { "w" } else { "a" };
    render("elementwise", format!("{op}_{per_token}_{kind}{b_len}"), ctx)
}

pub fn slice(in_cols: usize, start: usize, width: usize) -> Result<(String, String), GpuError> {
    let mut ctx = tera::Context::new();
    ctx.insert("in_cols", &in_cols);
    ctx.insert("start", &start);
    ctx.insert("width", &width);
    render("slice", format!("slice_{in_cols}_{start}_{width}"), ctx)
}

/// Template parameters of a cache storage kind: bits per code, codes per word, largest code.
fn kv_params(ctx: &mut tera::Context, kv: &str) {
    let (bits, per_word, top) = match kv {
        "int4" => (4, 8, 15),
        _ => (8, 4, 255),
    };
    ctx.insert("kv", kv);
    ctx.insert("bits", &bits);
    ctx.insert("per_word", &per_word);
    ctx.insert("top", &top);
}

/// `kv`: "f32", "int8" or "int4" cache storage.
pub fn rope_cache(
    rotary: &slmc_ir::Rotary,
    hq: usize,
    hk: usize,
    hd: usize,
    context: usize,
    kv: &str,
) -> Result<(String, String), GpuError> {
    let mut ctx = tera::Context::new();
    kv_params(&mut ctx, kv);
    let style = match rotary.style {
        slmc_ir::RopeStyle::Half => "half",
        slmc_ir::RopeStyle::Interleaved => "interleaved",
    };
    ctx.insert("style", style);
    ctx.insert("rotary_dim", &rotary.rotary_dim);
    ctx.insert("head_dim", &hd);
    ctx.insert("q_heads", &hq);
    ctx.insert("kv_heads", &hk);
    ctx.insert("context", &context);
    render("rope_cache", format!("rope_cache_{style}_{kv}_{hq}_{hk}_{hd}_{}_{context}", rotary.rotary_dim), ctx)
}

pub fn attention(
    hq: usize,
    hk: usize,
    hd: usize,
    scale: f32,
    context: usize,
    kv: &str,
) -> Result<(String, String), GpuError> {
    let mut ctx = tera::Context::new();
    kv_params(&mut ctx, kv);
    ctx.insert("context", &context);
    ctx.insert("q_heads", &hq);
    ctx.insert("kv_heads", &hk);
    ctx.insert("head_dim", &hd);
    ctx.insert("scale", &float(scale));
    render("attention", format!("attention_{kv}_{hq}_{hk}_{hd}_{context}"), ctx)
}

pub fn argmax(vocab: usize) -> Result<(String, String), GpuError> {
    let mut ctx = tera::Context::new();
    ctx.insert("vocab", &vocab);
    render("argmax", format!("argmax_{vocab}"), ctx)
}

/// A kernel in the other shader languages.
pub struct Translated {
    pub msl: String,
    pub spirv: Vec<u32>,
}

/// Parses and validates WGSL with naga, then writes MSL (each binding at
/// `[[buffer(binding)]]`, buffer sizes after them) and SPIR-V 1.3.
pub fn validate_and_translate(wgsl: &str) -> Result<Translated, String> {
    use naga::back::{msl, spv};
    let module = naga::front::wgsl::parse_str(wgsl).map_err(|e| e.emit_to_string(wgsl))?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::default())
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
