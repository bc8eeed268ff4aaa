//! The optimizer on real models: every non-quantizing pass keeps the interpreter's
//! outputs (SmolLM2 and the fixtures), quantization quality against the goldens and the
//! independent measurement, GGUF pass-through, KV-cache quantization, and the
//! instruments (--dump-ir, --time-passes).

mod common;

use std::path::Path;

use common::*;
use slmc_compiler::import;
use slmc_ir::{Layered, Tensor};
use slmc_passes::{Instruments, PassContext, PipelineOptions};

/// Logits of a prefill and two decode steps, concatenated.
fn logits(graph: &slmc_ir::Graph, weights: &dyn slmc_ir::WeightSource, prompt: &[i32]) -> Vec<f32> {
    let mut interp = slmc_ir::Interpreter::new(graph, weights).unwrap();
    let mut out = Vec::new();
    for step in [prompt.to_vec(), vec![prompt[0]], vec![prompt[1]]] {
        let t = Tensor::i32(vec![step.len()], step);
        let r = interp.run(&[("tokens", t)]).unwrap();
        out.extend_from_slice(r[0].1.as_f32().unwrap());
    }
    out
}

/// NaN (failing every bound) on a NaN, an infinity or a length mismatch.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let wide = |v: &[f32]| v.iter().map(|x| *x as f64).collect::<Vec<_>>();
    max_relative_difference(&wide(a), &wide(b)) as f32
}

fn check_non_lossy_passes(model_path: &Path, prompt: &[i32]) {
    let model = import::load(model_path).unwrap();
    let base = slmc_compiler::lower::lower(&model).unwrap();
    let reference = logits(&base, &model.weights, prompt);
    let non_lossy: Vec<&str> = slmc_passes::PASSES.iter().filter(|p| !p.lossy).map(|p| p.name).collect();
    let mut lists: Vec<Vec<&str>> = non_lossy.iter().map(|p| vec![*p]).collect();
    lists.push(non_lossy.clone());
    let default: Vec<&str> = slmc_passes::lookup_pipeline("default").unwrap().to_vec();
    lists.push(default); // without quantization options its lossy passes change nothing
    for passes in lists {
        let mut graph = base.clone();
        let mut cx = PassContext::new(&model.weights, PipelineOptions::default());
        slmc_passes::run_passes(&mut graph, &passes, &mut cx, &mut Instruments::default()).unwrap();
        let weights = Layered { top: &cx.derived, base: &model.weights };
        let diff = rel_diff(&reference, &logits(&graph, &weights, prompt));
        assert!(diff <= 1e-5, "{}: {passes:?} changed the logits by {diff} (relative)", model_path.display());
    }
}

#[test]
fn non_quantizing_passes_keep_smollm2_outputs() {
    check_non_lossy_passes(&smollm2_gguf(), &[6403, 1980, 253, 655, 28, 281, 253, 1165]);
}

#[test]
fn non_quantizing_passes_keep_fixture_outputs() {
    for name in ["tiny-llama-sharded", "tiny-phi3", "tiny-mobilellm-shared", "tiny-mobilellm-unrolled"] {
        check_non_lossy_passes(&repo_root().join("fixtures").join(name), &[5, 17, 3, 88, 41]);
    }
    let qwen = golden_dir().join("arch").join("qwen2-untied-f32");
    check_non_lossy_passes(&qwen, &[5, 17, 3, 88, 41]);
}

#[test]
fn dedup_keeps_one_copy_of_unrolled_shared_blocks() {
    let unrolled = repo_root().join("fixtures").join("tiny-mobilellm-unrolled");
    let out = slmc_json(&["opt", unrolled.to_str().unwrap(), "--passes", "dedup-weights,dce"]);
    let text = out["text"].as_str().unwrap();
    assert_eq!(text.matches("weight \"model.layers.1.self_attn.q_proj.weight\"").count(), 0);
    assert_eq!(text.matches("weight \"model.layers.0.self_attn.q_proj.weight\"").count(), 1);
    assert_eq!(out["passes"][0]["changes"], 2 * 9, "layers 1 and 3 repeat layers 0 and 2: 9 tensors each");
}

fn quality(model: &str, args: &[&str]) -> (serde_json::Value, bool) {
    let golden = golden_dir().join("smollm2-135m-greedy.json");
    let mut all = vec!["quality", model, "--prompts", golden.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    let out = slmc(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("slmc {all:?}: bad JSON ({e}): {stderr}"));
    (report, out.status.success())
}

/// The f32 conversion's matrices lie on Q4_1's grid, so q4g32 (asymmetric) loses
/// (almost) nothing; and a threshold it passes is one q4g32-sym fails.
#[test]
fn q4g32_keeps_the_goldens_and_passes_the_quality_gate() {
    let hf = converted("f32");
    let (r, ok) = quality(hf.to_str().unwrap(), &["--quant", "q4g32", "--max-quality-drop", "5"]);
    eprintln!("q4g32 rtn: {r}");
    assert!(ok, "q4g32 must pass --max-quality-drop 5: {r}");
    assert!(r["top1_agreement_reference"].as_f64().unwrap() >= 0.995, "{r}");
    assert_eq!(r["positions"], 384);
}

/// The independent measurement (transformers, projections quantized, embeddings kept):
/// top-1 0.724 and mean KL 0.327 nats for q4g32-sym with round to nearest.
#[test]
fn q4g32_sym_report_matches_the_independent_measurement_and_fails_the_gate() {
    let hf = converted("f32");
    let (r, ok) = quality(hf.to_str().unwrap(), &["--quant", "q4g32-sym", "--max-quality-drop", "5"]);
    eprintln!("q4g32-sym rtn: {r}");
    assert!(!ok, "q4g32-sym must fail --max-quality-drop 5");
    assert_eq!(r["passed"], false);
    assert!(r["error"].as_str().unwrap().contains("exceeds --max-quality-drop 5"));
    let (top1, kl) = (r["top1_agreement"].as_f64().unwrap(), r["mean_kl"].as_f64().unwrap());
    assert!((top1 - 0.724).abs() <= 0.02, "top-1 {top1} vs 0.724");
    assert!((kl - 0.327).abs() <= 0.0327, "KL {kl} vs 0.327");
    assert!(r["perplexity_optimized"].as_f64().unwrap() > r["perplexity_base"].as_f64().unwrap());
}

/// GPTQ against round to nearest on symmetric q4g32 (the golden
/// prompts are not calibration data: the built-in samples are). Measured here (mean KL /
/// top-1): RTN 0.326 / 0.721; clip 0.170 / 0.807; AWQ 0.134 / 0.831; GPTQ 0.093 / 0.862
/// (the target is 0.09 / 0.90; see the closing note). The report carries its RTN
/// comparison.
#[test]
fn gptq_beats_round_to_nearest_on_q4g32_sym() {
    let hf = converted("f32");
    let (r, ok) = quality(hf.to_str().unwrap(), &["--quant", "q4g32-sym", "--quant-method", "gptq"]);
    assert!(ok, "{r}");
    let figures = |v: &serde_json::Value| (v["mean_kl"].as_f64().unwrap(), v["top1_agreement"].as_f64().unwrap());
    let ((gptq, gptq_top1), (rtn, rtn_top1)) = (figures(&r), figures(&r["rtn"]));
    eprintln!("q4g32-sym gptq: KL {gptq:.4}, top-1 {gptq_top1:.4} (rtn {rtn:.4}, {rtn_top1:.4})");
    assert!((rtn - 0.327).abs() <= 0.0327, "the RTN comparison {rtn} is not RTN's");
    assert!((r["rtn"]["mean_kl_ratio"].as_f64().unwrap() - gptq / rtn).abs() < 1e-9);
    // clip (0.170 / 0.807) and AWQ (0.134 / 0.831) are not rerun here, for the suite's time:
    // AWQ's fold is proven exact in passes/tests/filetests.rs and its bundles run on every
    // backend below.
    assert!(gptq <= 0.1 && gptq <= 0.35 * rtn, "gptq KL {gptq} (rtn {rtn})");
    assert!(gptq_top1 >= 0.85 && gptq_top1 > rtn_top1 + 0.1, "gptq top-1 {gptq_top1} (rtn {rtn_top1})");
}

fn golden_prompts() -> Vec<serde_json::Value> {
    read_json(&golden_dir().join("smollm2-135m-greedy.json"))["prompts"].as_array().unwrap().clone()
}

/// Teacher-forced argmax against the goldens at every position whose gap is at least `min_gap`.
fn argmax_mismatches(model: &str, extra: &[&str], min_gap: f64) -> Vec<String> {
    let mut bad = Vec::new();
    for p in golden_prompts() {
        let (input, cont) = (as_ids(&p["input_ids"]), as_ids(&p["generated_ids"]));
        let (a, c) = (ids_arg(&input), ids_arg(&cont));
        let mut args = vec!["score", model, "--prompt-ids", &a, "--continuation-ids", &c];
        args.extend_from_slice(extra);
        let score = slmc_json(&args);
        for (i, pos) in score["positions"].as_array().unwrap().iter().enumerate() {
            let gap = p["greedy_top1_minus_top2"][i].as_f64().unwrap();
            if gap >= min_gap && pos["argmax"].as_u64().unwrap() != cont[i] {
                bad.push(format!("{} step {i} (gap {gap})", p["id"]));
            }
        }
    }
    bad
}

/// Q4_1 blocks pass through `--quant q4g32` untouched: the packed bytes of every fused
/// weight are the concatenation of the GGUF's, and the goldens still match exactly.
#[test]
fn gguf_q4_1_passes_through_bit_identical() {
    let gguf = smollm2_gguf();
    let model = import::load(&gguf).unwrap();
    let mut graph = slmc_compiler::lower::lower(&model).unwrap();
    let options = PipelineOptions {
        quant: slmc_passes::QuantPolicy {
            scheme: Some(slmc_passes::Scheme::parse("q4g32").unwrap()),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut cx = PassContext::new(&model.weights, options);
    let passes = slmc_passes::lookup_pipeline("default").unwrap();
    slmc_passes::run_passes(&mut graph, passes, &mut cx, &mut Instruments::default()).unwrap();
    let mut checked = 0;
    for (name, w) in cx.derived.iter() {
        assert!(!name.contains('@'), "{name} was requantized");
        let original: Vec<u8> = name
            .split('+')
            .flat_map(|part| {
                let t = model.weights.get(part).unwrap();
                model.weights.bytes(t).to_vec()
            })
            .collect();
        assert_eq!(w.dtype, slmc_ir::DType::Q4_1);
        assert!(w.bytes == original, "{name}: bytes differ from the GGUF's");
        checked += 1;
    }
    assert_eq!(checked, 60, "30 fused qkv and 30 fused gate/up weights");
    let bad = argmax_mismatches(gguf.to_str().unwrap(), &["--quant", "q4g32"], 0.01);
    assert!(bad.is_empty(), "{bad:?}");
}

/// The int8 cache (codes, plus the exact window of the 32 positions nearest each query) at
/// the 0.05 bound on every golden prompt, short and long: teacher-forced argmax at
/// every golden gap of at least 0.05, greedy identical before the first smaller gap.
#[test]
fn int8_kv_cache_keeps_confident_argmaxes_and_is_4x_smaller() {
    let gguf = smollm2_gguf();
    let int8 = ["--kv-quant", "int8"];
    check_goldens(&gguf, &Goldens::short(), 0.05, false, &int8);
    let long = Goldens { file: "smollm2-135m-long.json", decode: true, greedy_tokens: 48 };
    check_goldens(&gguf, &long, 0.05, false, &int8);
    let plan = slmc_json(&["opt", gguf.to_str().unwrap(), "--kv-quant", "int8", "--emit", "none"])["memory"].clone();
    let (q, f) = (plan["kv_bytes_per_token"].as_u64().unwrap(), plan["kv_bytes_per_token_f32"].as_u64().unwrap());
    assert_eq!(f, 30 * 2 * 3 * 64 * 4);
    assert_eq!(q * 4, f, "int8 values are a quarter of f32");
    assert_eq!(
        plan["kv_scale_bytes_per_token"].as_u64().unwrap(),
        30 * 2 * 3 * 8,
        "f32 scale and minimum per token, head, k/v"
    );
    eprintln!("KV bytes per token: f32 {f}, int8 {q} + {} scale bytes", plan["kv_scale_bytes_per_token"]);
}

#[test]
fn dump_ir_writes_one_parseable_file_per_pass_and_time_passes_prints_a_table() {
    let model = repo_root().join("fixtures").join("tiny-llama-sharded");
    let dir = scratch("dump-ir");
    let out = slmc(&[
        "opt",
        model.to_str().unwrap(),
        "--quant",
        "q4g32",
        "--dump-ir",
        dir.to_str().unwrap(),
        "--time-passes",
        "--emit",
        "none",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    files.sort();
    let pipeline = slmc_passes::lookup_pipeline("default").unwrap();
    assert_eq!(files.len(), pipeline.len() + 1, "{files:?}");
    assert_eq!(files[0], "000_input.slir");
    for (i, pass) in pipeline.iter().enumerate() {
        assert_eq!(files[i + 1], format!("{:03}_{pass}.slir", i + 1));
    }
    for f in &files {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        let g = slmc_ir::text::parse(&text).unwrap_or_else(|e| panic!("{f}: {e}"));
        slmc_ir::verify(&g).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let table = String::from_utf8_lossy(&out.stderr);
    for pass in pipeline {
        assert!(table.lines().any(|l| l.starts_with(pass)), "no row for {pass}:\n{table}");
    }
    assert!(table.contains("wall ms") && table.lines().any(|l| l.starts_with("total")));

    // --print-after and --disable-pass.
    let out = slmc(&[
        "opt",
        model.to_str().unwrap(),
        "--print-after",
        "fuse-qkv",
        "--disable-pass",
        "fuse-swiglu",
        "--emit",
        "ir",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("; IR after fuse-qkv") && stderr.contains("q_proj.weight+"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("linear_swiglu") && stdout.contains("add_rms_norm"));
}

#[test]
fn memory_plan_beats_one_buffer_per_value() {
    let gguf = smollm2_gguf();
    let plan = slmc_json(&["opt", gguf.to_str().unwrap(), "--emit", "none"])["memory"].clone();
    for step in ["prefill", "decode"] {
        let arena = plan[step]["arena_bytes"].as_u64().unwrap();
        let naive = plan[step]["one_buffer_per_value_bytes"].as_u64().unwrap();
        let live = plan[step]["live_peak_bytes"].as_u64().unwrap();
        eprintln!("{step}: arena {arena} B, one buffer per value {naive} B, live peak {live} B");
        assert!(live <= arena && arena < naive / 3, "{step}: {arena} vs {naive}");
    }
    assert!(plan["weight_bytes"].as_u64().unwrap() > 90_000_000);
}

#[test]
fn bad_optimizer_options_are_clear_errors() {
    let model = repo_root().join("fixtures").join("tiny-llama-sharded");
    let m = model.to_str().unwrap();
    assert!(slmc_fails(&["opt", m, "--quant", "q5"]).contains("unknown quantization scheme `q5`"));
    assert!(slmc_fails(&["opt", m, "--passes", "fuse-everything"]).contains("unknown pass `fuse-everything`"));
    assert!(slmc_fails(&["opt", m, "--pipeline", "turbo"]).contains("unknown pipeline `turbo`"));
    assert!(slmc_fails(&["opt", m, "--kv-quant", "int3"]).contains("unknown --kv-quant"));
    // A packed cache's exact window is per query: only the fused gqa reads it.
    let err = slmc_fails(&["opt", m, "--pipeline", "minimal", "--kv-quant", "int8"]);
    assert!(err.contains("needs fused attention (gqa"), "{err}");
    let err = slmc_fails(&["opt", m, "--quant", "q4g128"]);
    assert!(err.contains("not a multiple of q4g128's group"), "{err}");
}

/// GPTQ's and AWQ's weights run on every backend: the tiny fixture compiled for ONNX, WebGPU
/// and Core ML with each (the compile-time smoke set checks every artifact against the
/// interpreter), calibrated from a token-id file since the fixture has no tokenizer.
#[test]
fn gptq_and_awq_bundles_pass_their_smoke_sets_on_every_backend_kind() {
    let model = repo_root().join("fixtures/tiny-llama-sharded");
    let vocab = read_json(&model.join("config.json"))["vocab_size"].as_u64().unwrap();
    let dir = scratch("calibrated-bundles");
    let prompts: Vec<serde_json::Value> = (0..4u64)
        .map(|s| serde_json::json!({"input_ids": (0..24u64).map(|i| (i * 37 + s * 11) % vocab).collect::<Vec<_>>(), "generated_ids": []}))
        .collect();
    let calibration = dir.join("calibration.json");
    std::fs::write(&calibration, serde_json::json!({ "prompts": prompts }).to_string()).unwrap();
    for method in ["gptq", "awq"] {
        let out = dir.join(method);
        slmc_json(&[
            "compile",
            model.to_str().unwrap(),
            "--target",
            "onnx-cpu,webgpu,coreml-ios18",
            "--quant",
            "q4g32-sym",
            "--quant-method",
            method,
            "--calibration",
            calibration.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        for target in ["onnx-cpu", "webgpu", "coreml-ios18"] {
            let manifest = read_json(&out.join(target).join("manifest.json"));
            assert_eq!(manifest["compiler"]["options"]["quant_method"], method, "{target}");
            assert!(manifest["quantization"]["weight_dtypes"]["q4_0"].as_u64().unwrap() > 0, "{target}");
        }
    }
}
