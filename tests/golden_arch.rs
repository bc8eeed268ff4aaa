//! The tiny random architectures in `../shared/golden/arch/` (llama with tied f16
//! weights, qwen2 with biases in f32, qwen3, gemma2, gemma3, stablelm2): final-position
//! logits within 1e-4 of transformers and identical greedy continuations. The 29-token
//! cases run past the Gemma fixtures' 8-token sliding window. The four newer families
//! also run compiled for every backend kind (WGSL, ONNX both profiles, Core ML on the MIL
//! reference within an fp16 bound). The project's own fixtures made by transformers
//! (`fixtures/arch`: Phi-4-mini-shaped LongRoPE, OLMo 2, SmolLM3 with NoPE layers) run
//! everywhere too.

mod common;

use common::*;

const LOGIT_TOL: f64 = 1e-4;
/// Core ML programs compute in fp16 (measured up to 6.5e-3 on the public fixtures, 2.5e-2
/// on the Phi-3-shaped one whose logits reach 8, with or without LongRoPE): 2e-2, or 4e-3
/// of the largest logit (fp16 keeps 2^-11 relative; about eight roundings along the
/// residual stream), whichever is larger.
const FP16_LOGIT_TOL: f64 = 2e-2;
const FP16_RELATIVE_TOL: f64 = 4e-3;

/// Where a fixture runs: the interpreter on the checkpoint, or a compiled target.
#[derive(Clone, Copy)]
enum On {
    Interpreter,
    Target(&'static str),
}

/// Every backend kind: WGSL on lavapipe, ONNX Runtime with both profiles, and the Core ML
/// package on the MIL reference interpreter (fp16).
const TARGETS: [&str; 4] = ["webgpu", "onnx-cpu", "onnx-portable", "coreml-ios18"];

/// Compiled targets hold this many positions unless a fixture needs fewer.
const CONTEXT: usize = 64;

fn check_arch(name: &str) {
    check_arch_on(name, On::Interpreter, CONTEXT);
}

/// The fixture on the interpreter and on every target.
fn check_arch_everywhere(name: &str) {
    check_arch_everywhere_within(name, CONTEXT);
}

/// Targets compiled for `context` positions; the greedy continuations are cut to fit it.
fn check_arch_everywhere_within(name: &str, context: usize) {
    check_arch_on(name, On::Interpreter, context);
    for target in TARGETS {
        check_arch_on(name, On::Target(target), context);
    }
}

/// The public fixtures in `../shared/golden/arch`, or the project's own in
/// `fixtures/arch` (made by transformers with scripts/gen-arch-fixtures.py, same format).
fn arch_dir(name: &str) -> std::path::PathBuf {
    let own = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/arch").join(name);
    if own.exists() {
        own
    } else {
        golden_dir().join("arch").join(name)
    }
}

fn check_arch_on(name: &str, on: On, context: usize) {
    let dir = arch_dir(name);
    let golden = read_json(&dir.join("golden.json"));
    let checkpoint = dir.to_str().unwrap();
    let vocab = slmc_json(&["inspect", checkpoint])["config"]["vocab_size"].as_u64().unwrap();
    // The compiled bundle's directory lives until the checks are done.
    let mut bundle_dir = None;
    let (model, extra, fp16) = match on {
        On::Interpreter => (dir.clone(), vec![], false),
        On::Target(target) => {
            let out = bundle_dir.insert(scratch(&format!("arch-{name}-{target}")));
            let root = out.to_str().unwrap();
            let ctx = context.to_string();
            let mut args =
                vec!["compile", checkpoint, "--target", target, "-o", root, "--context", &ctx, "--quant", "keep"];
            // Steps of 4 tokens: sliding-window layers keep rings of window + 3 positions,
            // which the 29-token cases wrap around.
            if target == "webgpu" {
                args.extend(["--max-step-tokens", "4"]);
            }
            slmc_json(&args);
            let fp16 = target.starts_with("coreml");
            let extra = if fp16 { vec!["--mil-reference"] } else { vec![] };
            (out.join(target), extra, fp16)
        }
    };
    let label = match on {
        On::Interpreter => format!("{name} (interpreter)"),
        On::Target(t) => format!("{name} ({t})"),
    };
    let model = model.to_str().unwrap();
    for case in golden["cases"].as_array().unwrap() {
        let input = as_ids(&case["input_ids"]);
        let mut greedy = as_ids(&case["greedy_ids"]);
        if let On::Target(_) = on {
            greedy.truncate(context - input.len());
        }
        let (n, k) = (greedy.len().to_string(), vocab.to_string());
        let ids = ids_arg(&input);
        let mut args = vec!["run", model, "--prompt-ids", &ids, "--max-new-tokens", &n, "--ignore-eos"];
        args.extend_from_slice(&["--record-logits", "1", "--record-top-k", &k]);
        args.extend_from_slice(&extra);
        let run = slmc_json(&args);
        let top = run["recorded_logits"][0]["top"].as_array().unwrap();
        assert_eq!(top.len() as u64, vocab);
        let mut ours = vec![f64::NAN; vocab as usize];
        for t in top {
            ours[t["id"].as_u64().unwrap() as usize] = t["logit"].as_f64().unwrap();
        }
        // Every id filled with a finite logit: `f64::max` below would skip a NaN.
        assert!(ours.iter().all(|v| v.is_finite()), "{label}: a logit is missing or not finite");
        let expected = case["final_position_logits"].as_array().unwrap();
        assert_eq!(expected.len(), ours.len(), "{label}: logit count");
        let largest = expected.iter().map(|e| e.as_f64().unwrap().abs()).fold(0.0, f64::max);
        let tol = if fp16 { FP16_LOGIT_TOL.max(FP16_RELATIVE_TOL * largest) } else { LOGIT_TOL };
        let mut max_err = 0.0f64;
        for (i, e) in expected.iter().enumerate() {
            max_err = max_err.max((ours[i] - e.as_f64().unwrap()).abs());
        }
        assert!(max_err <= tol, "{label} len {}: max logit error {max_err}", input.len());
        let lse = run["recorded_logits"][0]["logsumexp"].as_f64().unwrap();
        assert!((lse - case["final_position_logsumexp"].as_f64().unwrap()).abs() <= tol);
        // Greedy equals the golden before the first step whose top-2 gap is within twice
        // the logit bound (there either token is a correct answer).
        let gaps: Vec<f64> = case["greedy_top1_minus_top2"].as_array().unwrap()[..greedy.len()]
            .iter()
            .map(|g| g.as_f64().unwrap())
            .collect();
        let must = gaps.iter().position(|g| *g < 2.0 * tol).unwrap_or(greedy.len());
        let generated = as_ids(&run["generated_ids"]);
        assert_eq!(generated.len(), greedy.len(), "{label}: greedy token count");
        assert_eq!(generated[..must], greedy[..must], "{label} len {}", input.len());
        if must > 0 {
            assert_eq!(top[0]["id"].as_u64().unwrap(), case["final_position_argmax"].as_u64().unwrap());
        }
        let same = generated.iter().zip(&greedy).take_while(|(a, b)| a == b).count();
        eprintln!(
            "{label} len {}: max logit error {max_err:.2e}, greedy {same}/{} (checked {must})",
            input.len(),
            greedy.len()
        );
    }
}

#[test]
fn llama_tied_f16() {
    check_arch("llama-tied-f16");
}

#[test]
fn qwen2_untied_f32() {
    check_arch("qwen2-untied-f32");
}

#[test]
fn qwen3_qk_norm_bf16() {
    check_arch_everywhere("qwen3-qknorm-bf16");
}

#[test]
fn gemma3_sliding_window_f32() {
    check_arch_everywhere("gemma3-tied-f32");
}

#[test]
fn gemma2_softcap_f32() {
    check_arch_everywhere("gemma2-softcap-f32");
}

#[test]
fn stablelm2_partial_rotary_f16() {
    check_arch_everywhere("stablelm2-partial-rotary-f16");
}

/// OLMo 2 (transformers-made, `fixtures/arch`): norms after attention and the MLP only,
/// q/k norms over the whole projection.
#[test]
fn olmo2_post_norms_f32() {
    check_arch_everywhere("olmo2-f32");
}

/// SmolLM3 (transformers-made, `fixtures/arch`): every second layer without RoPE.
#[test]
fn smollm3_nope_layers_f32() {
    check_arch_everywhere("smollm3-nope-f32");
}

/// Phi-4-mini's shape (fused projections, 75% partial rotary, GQA, tied) with LongRoPE: the
/// greedy steps after the 29-token prompt cross the original length (32), where the long
/// factors take over.
#[test]
fn phi4_mini_longrope_f32() {
    let name = "phi4-mini-longrope-f32";
    let original =
        read_json(&arch_dir(name).join("config.json"))["original_max_position_embeddings"].as_u64().unwrap() as usize;
    // The interpreter runs the whole envelope (the 29-token case passes 32 in its greedy
    // steps and is re-encoded there); compiled bundles hold at most the original length.
    check_arch_everywhere_within(name, original);
    // A prompt already past the original length is rotated with the long factors from its
    // first position: teacher-forced from position `original`, in one prefill or decoded
    // token by token after it, the interpreter predicts transformers' greedy tokens.
    let golden = read_json(&arch_dir(name).join("golden.json"));
    let weights = std::fs::read(arch_dir(name).join("model.safetensors")).unwrap();
    let digest: String = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&weights))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(golden["safetensors_sha256"].as_str().unwrap(), digest, "the fixture is the one its golden was made on");
    let crossing = |c: &&serde_json::Value| {
        let (prompt, greedy) = (as_ids(&c["input_ids"]).len(), as_ids(&c["greedy_ids"]).len());
        prompt < original && prompt + greedy > original + 4
    };
    let case =
        golden["cases"].as_array().unwrap().iter().find(crossing).expect("a golden case crosses the original length");
    let mut sequence = as_ids(&case["input_ids"]);
    sequence.extend(as_ids(&case["greedy_ids"]));
    let (prompt, continuation) = sequence.split_at(original + 1);
    for decode in [false, true] {
        let (p, c) = (ids_arg(prompt), ids_arg(continuation));
        let mut args =
            vec!["score".to_string(), arch_dir(name).to_str().unwrap().to_string(), "--prompt-ids".into(), p];
        args.extend(["--continuation-ids".into(), c]);
        if decode {
            args.push("--decode".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let scored = slmc_json(&args);
        let positions = scored["positions"].as_array().unwrap();
        assert_eq!(positions.len(), continuation.len());
        for (i, p) in positions.iter().enumerate() {
            assert_eq!(p["argmax"], p["token"], "position {} (decode {decode})", original + i);
        }
    }
    let out = scratch("arch-longrope-refused");
    let err = slmc_fails(&[
        "compile",
        arch_dir(name).to_str().unwrap(),
        "--target",
        "onnx-cpu",
        "-o",
        out.to_str().unwrap(),
        "--context",
        &(original + 1).to_string(),
    ]);
    for part in ["Phi3ForCausalLM", "LongRoPE", "op `rope`", "onnx-cpu", &format!("--context {original} or less")] {
        assert!(err.contains(part), "the refusal names {part}: {err}");
    }
}

/// The memory plan counts what the caches keep: a sliding-window layer holds a ring on
/// webgpu (window + step - 1 positions) and Core ML; ONNX says it keeps the whole context.
#[test]
fn sliding_window_caches_in_the_memory_plan() {
    let dir = arch_dir("gemma3-tied-f32");
    let out = scratch("arch-gemma3-memory");
    let (model, root) = (dir.to_str().unwrap(), out.to_str().unwrap());
    let args = ["--context", "64", "--max-step-tokens", "16", "--skip-smoke-check", "--quant", "keep"];
    let mut compile = vec!["compile", model, "--target", "webgpu,onnx-cpu,coreml-ios18", "-o", root];
    compile.extend(args);
    slmc_json(&compile);
    let memory = |target: &str| read_json(&out.join(target).join("manifest.json"))["memory"].clone();
    // Three layers of window 8 keep 8 + 16 - 1 = 23 positions, the global one 64: keys and
    // values of one kv head of 32 f32 values each.
    let gpu = memory("webgpu");
    assert_eq!(gpu["kv_cache_bytes"].as_u64().unwrap(), (64 + 3 * 23) * 2 * 32 * 4);
    let layout = gpu["kv_cache_layout"].as_str().unwrap();
    assert!(layout.starts_with("1 layer keeps 64 positions, 3 layers keep 23 positions"), "{layout}");
    let layout = memory("onnx-cpu")["kv_cache_layout"].as_str().unwrap().to_string();
    assert!(layout.starts_with("all 4 layers keep all 64 positions"), "onnx-cpu: {layout}");
    // Core ML (steps of 8, fp16): iOS 18 states of 8 + 2 x 8 - 1 slots.
    let coreml = memory("coreml-ios18");
    assert_eq!(coreml["kv_cache_bytes"].as_u64().unwrap(), (64 + 3 * 23) * 2 * 32 * 2);
    let layout = coreml["kv_cache_layout"].as_str().unwrap();
    assert!(layout.starts_with("1 layer keeps 64 positions, 3 layers keep 23 positions"), "{layout}");
    // A model without windows says nothing.
    let plain = scratch("arch-qwen3-memory");
    let qwen = arch_dir("qwen3-qknorm-bf16");
    let mut compile = vec!["compile", qwen.to_str().unwrap(), "--target", "webgpu", "-o", plain.to_str().unwrap()];
    compile.extend(args);
    slmc_json(&compile);
    assert!(read_json(&plain.join("webgpu").join("manifest.json"))["memory"].get("kv_cache_layout").is_none());
}
