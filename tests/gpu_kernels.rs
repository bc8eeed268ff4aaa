//! Per-kernel tests: each GPU kernel family in a small graph (random token ids -> a random
//! f32 embedding -> the op under test), compiled by the GPU backend and run by the wgpu
//! executor (lavapipe here) against the reference interpreter's op semantics, over a
//! prefill of five tokens and two decode steps. Weights are random; quantized ones are
//! random matrices packed by the project's own quantizer.
//!
//! Every case runs twice: with no optional GPU features (the plain kernels) and with
//! `shader-f16` and `subgroups` (lavapipe offers both), which selects the f16 variants
//! (f16 weights and caches read natively instead of unpacked from u32 words) and the
//! subgroup variants (RMSNorm and argmax reductions).
//!
//! Tolerance: max |gpu - interpreter| / max |interpreter| <= 1e-5 for every kernel; the two
//! differ only in summation order and in the GPU's exp/sqrt.

mod common;

use std::path::Path;

use common::*;
use slmc_backends::gpu::GpuFeatures;
use slmc_ir::{DType, OwnedWeight, OwnedWeights};
use slmc_passes::quant::{quantize_matrix, QuantMethod, Scheme};
use slmc_runtime::gpu::GpuExecutor;
use slmc_runtime::{Executor, InterpreterExecutor};

const K: usize = 128;
const TOLERANCE: f32 = 1e-5;

/// Deterministic uniform(-1, 1) values.
fn random(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn weight(dtype: DType, rows: usize, cols: usize, seed: u64) -> OwnedWeight {
    let values: Vec<f32> = random(seed, rows * cols).iter().map(|v| v / (cols as f32).sqrt()).collect();
    let scheme = match dtype {
        DType::F32 => Scheme::F32,
        DType::F16 => Scheme::F16,
        DType::Q8_0 => Scheme::Q8,
        DType::Q4_0 => Scheme::Q4 { group: 32, sym: true },
        DType::Q4_1 => Scheme::Q4 { group: 32, sym: false },
        DType::Q4_1G64 => Scheme::Q4 { group: 64, sym: false },
        DType::Q4_0G128 => Scheme::Q4 { group: 128, sym: true },
        other => panic!("no test weights for {other}"),
    };
    let shape = if rows == 1 { vec![cols] } else { vec![rows, cols] };
    OwnedWeight { dtype, shape, bytes: quantize_matrix(&values, rows, cols, scheme, QuantMethod::Rtn, None) }
}

fn norm_weight(cols: usize, seed: u64) -> OwnedWeight {
    let values: Vec<f32> = random(seed, cols).iter().map(|v| 1.0 + 0.2 * v).collect();
    OwnedWeight {
        dtype: DType::F32,
        shape: vec![cols],
        bytes: slmc_ir::dtype::encode_float(DType::F32, &values).unwrap(),
    }
}

/// Runs `body` (IR lines reading `%x: f32[s, K]`, defining `%out`) on both executors,
/// with the plain kernels and with the f16 and subgroup variants.
fn check(name: &str, body: &str, out_cols: usize, weights: OwnedWeights) {
    check_with_limit(name, body, out_cols, weights, 128 << 20);
}

/// `check` with a given binding limit; returns the names of the artifact's buffers.
fn check_with_limit(
    name: &str,
    body: &str,
    out_cols: usize,
    weights: OwnedWeights,
    max_binding_bytes: u64,
) -> Vec<String> {
    let run = Run::SHORT;
    let plain = check_variant(name, body, out_cols, weights.clone(), max_binding_bytes, GpuFeatures::NONE, &run);
    let variants = check_variant(name, body, out_cols, weights, max_binding_bytes, GpuFeatures::ALL, &run);
    assert_eq!(plain, variants, "{name}: the variants lay out the same buffers");
    plain
}

/// The artifact's context and step size, and the steps fed (token counts).
struct Run {
    context_len: usize,
    max_step_tokens: usize,
    steps: &'static [usize],
}

impl Run {
    /// A prefill of five tokens and two decode steps.
    const SHORT: Run = Run { context_len: 32, max_step_tokens: 8, steps: &[5, 1, 1] };
}

fn check_variant(
    name: &str,
    body: &str,
    out_cols: usize,
    mut weights: OwnedWeights,
    max_binding_bytes: u64,
    features: GpuFeatures,
    run: &Run,
) -> Vec<String> {
    let label = if features == GpuFeatures::NONE { "plain" } else { "f16+subgroups" };
    let name = &format!("{name} ({label})");
    let text = format!(
        "graph \"{name}\" {{\n  %table = weight \"table\" : f32[40, {K}]\n  %tokens = input \"tokens\" : i32[s]\n  %x = embed(%table, %tokens) : f32[s, {K}]\n{body}  output \"logits\" = %out\n}}\n"
    );
    let graph = slmc_ir::text::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
    slmc_ir::verify(&graph).unwrap_or_else(|e| panic!("{name}: {e}"));
    weights.insert("table".into(), weight(DType::F32, 40, K, 7));

    let options = slmc_backends::gpu::GpuOptions {
        target: "webgpu".into(),
        model_name: name.into(),
        eos_token_ids: vec![],
        context_len: run.context_len,
        max_step_tokens: run.max_step_tokens,
        max_binding_bytes,
        max_buffer_bytes: 256 << 20,
        features,
        weights_dir: None,
    };
    let verified = slmc_ir::Verified::new(&graph).unwrap_or_else(|e| panic!("{name}: {e}"));
    let output = slmc_backends::gpu::compile(&verified, &weights, &options).unwrap_or_else(|e| panic!("{name}: {e}"));
    let dir = scratch(&format!("kernel-{}", name.replace([' ', '(', ')', '+'], "-")));
    write_artifact(&dir, &output);
    // Variants are used where they exist and declared so the executor requests them.
    let used = &output.artifact.required_features;
    assert!(features != GpuFeatures::NONE || used.is_empty(), "{name}: plain kernels use {used:?}");
    assert!(features == GpuFeatures::NONE || used.contains(&"subgroups".to_string()), "{name}: no subgroup variant");
    let files = slmc_runtime::files::ArtifactFiles::read_bare(&dir).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    let mut gpu = GpuExecutor::load(&files, None).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut interp = InterpreterExecutor::new(&graph, &weights, run.context_len).unwrap();
    assert_eq!(gpu.vocab_size(), out_cols);
    let mut fed = 0usize;
    for &n in run.steps {
        let step: Vec<u32> = (0..n).map(|i| ((fed + i) * 7 % 40) as u32).collect();
        let a = interp.forward(&step).unwrap();
        let b = gpu.forward(&step).unwrap();
        assert_eq!(a.len(), n * out_cols, "{name}: interpreter logits at {fed}+{n}");
        assert_eq!(b.len(), a.len(), "{name}: GPU logits at {fed}+{n}");
        let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        // NaN on either side fails: the comparison is written so that NaN is never "within".
        let within = a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= TOLERANCE * scale);
        let diff = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
        assert!(within, "{name}: step of {n} tokens after {fed} differs by {diff:.2e} (relative)");
        fed += n;
    }
    if fed == run.context_len {
        // A full cache refuses the next token on both executors.
        assert!(gpu.forward(&[1]).is_err() && interp.forward(&[1]).is_err(), "{name}: a full cache took a token");
    }
    // The GPU's greedy pick (argmax kernel) equals the host's argmax of its own logits.
    gpu.reset();
    let logits = gpu.forward(&[3, 1, 4]).unwrap();
    let host_pick = slmc_runtime::argmax(&logits[logits.len() - out_cols..]) as u32;
    gpu.reset();
    assert_eq!(gpu.next_token(&[3, 1, 4]).unwrap(), host_pick, "{name}: argmax kernel");
    gpu.artifact().buffers.iter().map(|b| b.name.clone()).collect()
}

fn write_artifact(dir: &Path, output: &slmc_backends::gpu::GpuOutput) {
    std::fs::create_dir_all(dir.join("kernels")).unwrap();
    for (rel, bytes) in &output.files {
        std::fs::write(dir.join(rel), bytes).unwrap();
    }
    std::fs::write(dir.join("artifact.json"), serde_json::to_string(&output.artifact).unwrap()).unwrap();
}

fn one(name: &str, w: OwnedWeight) -> OwnedWeights {
    let mut ws = OwnedWeights::default();
    ws.insert(name.into(), w);
    ws
}

#[test]
fn linear_for_every_weight_layout() {
    for (dtype, label) in [
        (DType::F32, "f32"),
        (DType::Q4_1, "q4_1"),
        (DType::Q4_0, "q4_0"),
        (DType::Q4_1G64, "q4_1g64"),
        (DType::Q4_0G128, "q4_0g128"),
        (DType::Q8_0, "q8_0"),
        (DType::F16, "f16"),
    ] {
        let body = format!("  %w = weight \"w\" : {}[96, {K}]\n  %out = linear(%x, %w) : f32[s, 96]\n", dtype.name());
        check(&format!("linear-{label}"), &body, 96, one("w", weight(dtype, 96, K, 11)));
    }
}

#[test]
fn linear_swiglu() {
    for dtype in [DType::F32, DType::Q4_1, DType::Q8_0, DType::F16] {
        let body =
            format!("  %w = weight \"w\" : {}[128, {K}]\n  %out = linear_swiglu(%x, %w) : f32[s, 64]\n", dtype.name());
        check(&format!("swiglu-{}", dtype.name()), &body, 64, one("w", weight(dtype, 128, K, 13)));
    }
}

#[test]
fn rms_norm_and_add_rms_norm() {
    let body = format!("  %nw = weight \"norm\" : f32[{K}]\n  %out = rms_norm(%x, %nw) {{eps = 1e-5}} : f32[s, {K}]\n");
    check("rms_norm", &body, K, one("norm", norm_weight(K, 17)));
    let body = format!(
        "  %y = silu(%x) : f32[s, {K}]\n  %nw = weight \"norm\" : f32[{K}]\n  %out = add_rms_norm(%x, %y, %nw) {{eps = 1e-6}} : f32[s, {K}]\n"
    );
    check("add_rms_norm", &body, K, one("norm", norm_weight(K, 19)));
}

#[test]
fn layer_norm_with_bias() {
    let body = format!(
        "  %nw = weight \"norm\" : f32[{K}]\n  %nb = weight \"bias\" : f32[{K}]\n  %out = layer_norm(%x, %nw, %nb) {{eps = 1e-5}} : f32[s, {K}]\n"
    );
    let mut w = one("norm", norm_weight(K, 29));
    let bias: Vec<f32> = random(31, K).iter().map(|v| 0.3 * v).collect();
    let bytes = slmc_ir::dtype::encode_float(DType::F32, &bias).unwrap();
    w.insert("bias".into(), OwnedWeight { dtype: DType::F32, shape: vec![K], bytes });
    check("layer_norm", &body, K, w);
}

/// Gemma's constant ops: the embedding scale and the final-logit soft cap (a cap small
/// enough that it bites on these values).
#[test]
fn scale_and_softcap() {
    let body = format!(
        "  %s = scale(%x) {{factor = 11.3137}} : f32[s, {K}]\n  %out = softcap(%s) {{cap = 4.0}} : f32[s, {K}]\n"
    );
    check("scale-softcap", &body, K, OwnedWeights::default());
}

#[test]
fn elementwise_and_slice() {
    let body = format!(
        "  %b = weight \"bias\" : f32[{K}]\n  %a = add(%x, %b) : f32[s, {K}]\n  %m = mul(%a, %x) : f32[s, {K}]\n  %n = silu(%m) : f32[s, {K}]\n  %r = add(%n, %x) : f32[s, {K}]\n  %out = slice(%r) {{axis = 1, start = 8, end = 72}} : f32[s, 64]\n"
    );
    check("elementwise", &body, 64, one("bias", norm_weight(K, 23)));
}

/// IR lines for `gqa` over `%x`: q, k and v sliced from its first columns (hq, hk and hk
/// heads of hd), then flattened into `%out` of hq * hd columns. `kv` is the cache attribute
/// text (`""` or `", kv = int8"`).
fn gqa_body((hq, hk, hd): (usize, usize, usize), rotary_dim: usize, style: &str, kv: &str) -> String {
    let (q, k) = (hq * hd, hk * hd);
    let v_end = q + 2 * k;
    assert!(v_end <= K, "{v_end} columns of q, k and v from x of {K}");
    format!(
        "  %pos = positions(%tokens) : i32[s]\n  %q0 = slice(%x) {{axis = 1, start = 0, end = {q}}} : f32[s, {q}]\n  %q = reshape(%q0) {{shape = [s, {hq}, {hd}]}} : f32[s, {hq}, {hd}]\n  %k0 = slice(%x) {{axis = 1, start = {q}, end = {qk}}} : f32[s, {k}]\n  %k = reshape(%k0) {{shape = [s, {hk}, {hd}]}} : f32[s, {hk}, {hd}]\n  %v0 = slice(%x) {{axis = 1, start = {qk}, end = {v_end}}} : f32[s, {k}]\n  %v = reshape(%v0) {{shape = [s, {hk}, {hd}]}} : f32[s, {hk}, {hd}]\n  %att = gqa(%q, %k, %v, %pos) {{layer = 0, scale = 0.25, theta = 10000.0, rotary_dim = {rotary_dim}, style = {style}{kv}}} : f32[s, {hq}, {hd}]\n  %out = reshape(%att) {{shape = [s, {q}]}} : f32[s, {q}]\n",
        qk = q + k
    )
}

/// Gemma's attention: a sliding window shorter than the five-token prefill (so the
/// prefill's later queries and both decode steps drop keys) and a soft cap on the scores.
#[test]
fn gqa_with_sliding_window_and_softcap() {
    for (limits, label) in
        [(", window = 3", "window"), (", softcap = 0.5", "softcap"), (", window = 2, softcap = 0.7", "both")]
    {
        let body = gqa_body((4, 2, 16), 16, "half", limits);
        check(&format!("gqa-{label}"), &body, 64, OwnedWeights::default());
    }
}

#[test]
fn gqa_with_f32_f16_int8_and_int4_caches() {
    for (kv, style) in
        [("", "half"), (", kv = f16", "interleaved"), (", kv = int8", "interleaved"), (", kv = int4", "half")]
    {
        let body = gqa_body((4, 2, 16), 12, style, kv);
        let label = kv.trim_start_matches(", kv = ");
        check(
            &format!("gqa-{style}-{}", if label.is_empty() { "f32" } else { label }),
            &body,
            64,
            OwnedWeights::default(),
        );
    }
}

/// Attention over hundreds of cached positions, in several key splits, up to a full cache:
/// chunked prefill across step boundaries (63, 64, 65 tokens with steps of 64), decode,
/// the last position, then a refused token. Last round's kernel looped over every key in
/// one invocation and lavapipe cut those loops short (~330 positions on SmolLM2).
#[test]
fn gqa_over_a_long_context_up_to_a_full_cache() {
    // One head of 40 dims: the old kernel's loops passed llvmpipe's limit at ~535 positions.
    let run = Run { context_len: 1000, max_step_tokens: 64, steps: &[300, 1, 63, 64, 65, 1, 200, 5, 300, 1] };
    assert_eq!(run.steps.iter().sum::<usize>(), run.context_len);
    for kv in ["", ", kv = f16", ", kv = int8"] {
        let body = gqa_body((1, 1, 40), 40, "half", kv);
        let name = format!("gqa-long{}", kv.replace(", kv = ", "-"));
        for features in [GpuFeatures::NONE, GpuFeatures::ALL] {
            check_variant(&name, &body, 40, OwnedWeights::default(), 128 << 20, features, &run);
        }
    }
}

#[test]
fn embed_from_packed_tables() {
    for dtype in [DType::Q8_0, DType::Q4_1, DType::F16] {
        // A second, packed table read by embed: the output is its rows for the tokens.
        let body = format!(
            "  %t2 = weight \"t2\" : {}[40, {K}]\n  %e = embed(%t2, %tokens) : f32[s, {K}]\n  %out = add(%e, %x) : f32[s, {K}]\n",
            dtype.name()
        );
        check(&format!("embed-{}", dtype.name()), &body, K, one("t2", weight(dtype, 40, K, 29)));
    }
}

/// A table and an LM head larger than the binding limit are split by rows: one gather per
/// chunk, one matmul per chunk writing its own output columns.
#[test]
fn weights_past_the_binding_limit_are_split_by_rows() {
    for dtype in [DType::F32, DType::Q8_0, DType::Q4_1, DType::F16] {
        let body = format!(
            "  %t2 = weight \"t2\" : {d}[40, {K}]\n  %e = embed(%t2, %tokens) : f32[s, {K}]\n  %a = add(%e, %x) : f32[s, {K}]\n  %head = weight \"head\" : {d}[100, {K}]\n  %out = linear(%a, %head) : f32[s, 100]\n",
            d = dtype.name()
        );
        let mut ws = one("t2", weight(dtype, 40, K, 31));
        ws.insert("head".into(), weight(dtype, 100, K, 37));
        // 16 f32 rows of 128 per binding: the table splits in 3, the head in 7.
        let buffers = check_with_limit(&format!("split-{}", dtype.name()), &body, 100, ws, 16 * K as u64 * 4);
        if dtype == DType::F32 {
            assert!(buffers.contains(&"t2#2".to_string()) && !buffers.contains(&"t2#3".to_string()), "{buffers:?}");
            assert!(buffers.contains(&"head#6".to_string()) && !buffers.contains(&"head#7".to_string()), "{buffers:?}");
        } else {
            assert!(buffers.iter().any(|b| b == "head#1"), "{dtype}: the head was not split: {buffers:?}");
        }
    }
}

/// `gelu_tanh` across its range: inputs scaled up to +-60, where x^3 and the tanh saturate
/// (the kernel's sigmoid form must neither overflow nor lose the linear tail).
#[test]
fn gelu_tanh() {
    let scale: Vec<f32> = (0..K).map(|j| -60.0 + 120.0 * j as f32 / (K - 1) as f32).collect();
    let scale = OwnedWeight {
        dtype: DType::F32,
        shape: vec![K],
        bytes: slmc_ir::dtype::encode_float(DType::F32, &scale).unwrap(),
    };
    let body = format!(
        "  %w = weight \"scale\" : f32[{K}]\n  %big = mul(%x, %w) : f32[s, {K}]\n  %out = gelu_tanh(%big) : f32[s, {K}]\n"
    );
    check("gelu_tanh", &body, K, one("scale", scale));
}

/// RMSNorm over each head (Qwen3's q/k norms): `[s, 4, 32]` normalized per row of 32.
#[test]
fn rms_norm_per_head() {
    let body = format!(
        "  %h = reshape(%x) {{shape = [s, 4, 32]}} : f32[s, 4, 32]\n  %nw = weight \"norm\" : f32[32]\n  %n = rms_norm(%h, %nw) {{eps = 1e-6}} : f32[s, 4, 32]\n  %out = reshape(%n) {{shape = [s, {K}]}} : f32[s, {K}]\n"
    );
    check("rms_norm_per_head", &body, K, one("norm", norm_weight(32, 29)));
}
