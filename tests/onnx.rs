//! The ONNX artifact executed by slmc's ONNX Runtime executor: the project's checkpoints
//! against the interpreter on the same optimized graph, SmolLM2 against the goldens, the
//! graph through `onnx.checker` (full check), and tampered files refused before ONNX
//! Runtime sees them.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn compile(model: &Path, target: &str, name: &str, extra: &[&str]) -> Scratch {
    let out = scratch(&format!("onnx-{name}"));
    let mut args = vec!["compile", model.to_str().unwrap(), "--target", target, "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    slmc_json(&args);
    out.into_sub(target)
}

const CHECK: &str = "import sys, onnx\nonnx.checker.check_model(sys.argv[1], full_check=True)\nprint('ok')";

/// f32, f16 and quantized weights (Gemm, symmetric MatMulNBits, and MatMulNBits plus the
/// per-block offset of asymmetric blocks), biases, fused Phi-3 projections, MobileLLM's
/// shared blocks: logits within 1e-4 of the interpreter's (relative to the largest). The
/// LM head keeps f32 activations (`--onnx-head-accuracy-level 0`) so 8-bit heads (q4g32's
/// default q8 head) are exact too; the int8-activation head has its own test below.
#[test]
fn project_checkpoints_match_the_interpreter() {
    let cases: [(PathBuf, usize, &[&str]); 6] = [
        (repo_root().join("fixtures/tiny-llama-sharded"), 96, &[]),
        (repo_root().join("fixtures/tiny-llama-sharded"), 96, &["--quant", "q4g32"]),
        (repo_root().join("fixtures/tiny-phi3"), 96, &["--quant", "q4g32-sym"]),
        (repo_root().join("fixtures/tiny-mobilellm-shared"), 96, &[]),
        (golden_dir().join("arch/qwen2-untied-f32"), 300, &[]),
        (golden_dir().join("arch/llama-tied-f16"), 256, &[]),
    ];
    let runs = cases.iter().enumerate().flat_map(|c| ["onnx-cpu", "onnx-portable"].map(|t| (c, t)));
    for ((i, (model, vocab, flags)), target) in runs {
        let compile_flags = [*flags, &["--onnx-head-accuracy-level", "0"]].concat();
        let artifact = compile(model, target, &format!("fixture{i}"), &compile_flags);
        python(CHECK, &[artifact.join("model.onnx").to_str().unwrap()]);
        assert_artifact_matches_interpreter(model, &artifact, flags, *vocab, "onnxruntime", 1e-4);
    }
}

/// 8-bit tables and heads (ort-contrib): an 8-bit embedding table is gathered from its
/// codes (GatherBlockQuantized, exact: 1e-4 like the f32 cases); an 8-bit LM head is an
/// f32 Gemm by default (1e-4), or 8-bit MatMulNBits on int8 activations with
/// `--onnx-head-accuracy-level 4` (within 2e-2).
#[test]
fn eight_bit_tables_and_heads_match_the_interpreter() {
    let model = repo_root().join("fixtures/tiny-llama-sharded");
    let cases: [(&[&str], &[&str], f64); 3] = [
        (&["--quant-override", "embed=q8"], &[], 1e-4),
        (&["--quant-override", "lm_head=q8"], &["--onnx-head-accuracy-level", "4"], 2e-2),
        (&["--quant-override", "lm_head=q8"], &[], 1e-4),
    ];
    for (i, (flags, onnx_flags, tolerance)) in cases.into_iter().enumerate() {
        let artifact = compile(&model, "onnx-cpu", &format!("q8-{i}"), &[flags, onnx_flags].concat());
        python(CHECK, &[artifact.join("model.onnx").to_str().unwrap()]);
        assert_artifact_matches_interpreter(&model, &artifact, flags, 96, "onnxruntime", tolerance);
    }
}

/// SmolLM2 from the GGUF (Q4_1 blocks re-laid out, never requantized), both profiles:
/// onnx.checker passes and the goldens hold (argmax where the gap is at least 0.02, greedy
/// up to and including the first near-tie).
///
/// onnx-cpu twice: by default the head is an f32 Gemm over an f32 table (exact); with
/// `--onnx-head-accuracy-level 4` the tied Q8_0 table is stored once in 8 bits, gathered
/// from its codes and read by an 8-bit MatMulNBits head on int8 activations (a named lossy
/// option: it holds these goldens at the 0.02 bound but flips confident tokens elsewhere).
#[test]
fn smollm2_onnx_cpu_matches_the_goldens() {
    let artifact = compile(&smollm2_gguf(), "onnx-cpu", "smollm2", &[]);
    python(CHECK, &[artifact.join("model.onnx").to_str().unwrap()]);
    assert_eq!(head_ops(&artifact), "False True [4]", "GatherBlockQuantized, Gemm, MatMulNBits bits");
    check_smollm2_goldens(&artifact);

    let int8_head = compile(&smollm2_gguf(), "onnx-cpu", "smollm2-int8-head", &["--onnx-head-accuracy-level", "4"]);
    assert_eq!(head_ops(&int8_head), "True False [4, 8]", "GatherBlockQuantized, Gemm, MatMulNBits bits");
    check_smollm2_goldens_within(&int8_head, 0.02, &[]);
    let data_size = |a: &Path| std::fs::metadata(a.join("model.onnx.data")).unwrap().len();
    let (small, large) = (data_size(&int8_head), data_size(&artifact));
    eprintln!("model.onnx.data: 8-bit head {small} bytes, f32 head {large} bytes");
    assert!(small * 3 < large * 2, "the 8-bit table should save its f32 copy: {small} vs {large}");
}

/// Whether the graph has GatherBlockQuantized and Gemm, and its MatMulNBits bit widths.
fn head_ops(artifact: &Path) -> String {
    const CENSUS: &str = "import sys, onnx\n\
        m = onnx.load(sys.argv[1], load_external_data=False)\n\
        ops = {n.op_type for n in m.graph.node}\n\
        bits = sorted({a.i for n in m.graph.node if n.op_type == 'MatMulNBits' for a in n.attribute if a.name == 'bits'})\n\
        print('GatherBlockQuantized' in ops, 'Gemm' in ops, bits)";
    python(CENSUS, &[artifact.join("model.onnx").to_str().unwrap()]).lines().last().unwrap_or_default().to_string()
}

#[test]
fn smollm2_onnx_portable_matches_the_goldens() {
    let artifact = compile(&smollm2_gguf(), "onnx-portable", "smollm2-portable", &[]);
    python(CHECK, &[artifact.join("model.onnx").to_str().unwrap()]);
    let graph = std::fs::read(artifact.join("model.onnx")).unwrap();
    assert!(!String::from_utf8_lossy(&graph).contains("com.microsoft"), "the portable graph uses contrib ops");
    check_smollm2_goldens(&artifact);
}

/// onnxruntime-genai loads the artifact directory as it is (genai_config.json and the
/// tokenizer beside the model) and its greedy tokens equal slmc's ORT executor on every
/// golden prompt (up to EOS, where genai stops).
#[test]
fn onnxruntime_genai_runs_the_artifact_unchanged() {
    let out = scratch("onnx-genai");
    slmc_json(&[
        "compile",
        smollm2_gguf().to_str().unwrap(),
        "--target",
        "onnx-cpu,onnx-portable",
        "-o",
        out.to_str().unwrap(),
    ]);
    let script = repo_root().join("tests/python/genai_greedy.py");
    let golden = read_json(&golden_dir().join("smollm2-135m-greedy.json"));
    for (target, prompts) in [("onnx-cpu", 8), ("onnx-portable", 4)] {
        let dir = out.join(target);
        // GroupQueryAttention appends in place; the portable profile's Concat cannot.
        let shared = read_json(&dir.join("genai_config.json"))["search"]["past_present_share_buffer"].clone();
        assert_eq!(shared, (target == "onnx-cpu"), "{target}: past_present_share_buffer");
        let d = dir.to_str().unwrap();
        for p in golden["prompts"].as_array().unwrap().iter().take(prompts) {
            let input = ids_arg(&as_ids(&p["input_ids"]));
            let ours =
                as_ids(&slmc_json(&["run", d, "--prompt-ids", &input, "--max-new-tokens", "32"])["generated_ids"]);
            let code = std::fs::read_to_string(&script).unwrap();
            let text = python(&code, &[d, &input, "32"]);
            let line = text.lines().last().unwrap_or_default();
            let genai: Vec<u64> = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}\n{text}"));
            // Both stop at 32 tokens or at EOS.
            assert_eq!(genai, ours, "{target} {}", p["id"]);
            eprintln!("{target} {}: {} greedy tokens identical", p["id"], genai.len());
        }
    }
}

/// The accuracy-level decision: artifacts default to MatMulNBits accuracy level 0 (f32
/// activations), which reproduces the goldens (the tests above). Level 4 (int8
/// activations, faster) flips confident golden tokens on SmolLM2: measured 372/377
/// positions with a golden gap of at least 0.02, and greedy generation leaving the golden
/// after 1 to 42 tokens on 5 of the 8 prompts. This test keeps that evidence current.
#[test]
fn int8_activations_flip_golden_tokens_so_f32_is_the_default() {
    let gguf = smollm2_gguf();
    let default = compile(&gguf, "onnx-cpu", "accuracy-default", &[]);
    assert_eq!(read_json(&default.join("artifact.json"))["accuracy_level"], 0);
    assert_eq!(read_json(&default.join("artifact.json"))["head_accuracy_level"], 0);
    let int8 = compile(&gguf, "onnx-cpu", "accuracy-int8", &["--onnx-accuracy-level", "4"]);
    let golden = read_json(&golden_dir().join("smollm2-135m-greedy.json"));
    let (mut flipped, mut confident) = (0, 0);
    for p in golden["prompts"].as_array().unwrap() {
        let (input, cont) = (ids_arg(&as_ids(&p["input_ids"])), as_ids(&p["generated_ids"]));
        let gaps = p["greedy_top1_minus_top2"].as_array().unwrap();
        let score = slmc_json(&[
            "score",
            int8.to_str().unwrap(),
            "--prompt-ids",
            &input,
            "--continuation-ids",
            &ids_arg(&cont),
        ]);
        for (i, pos) in score["positions"].as_array().unwrap().iter().enumerate() {
            if gaps[i].as_f64().unwrap() >= 0.02 {
                confident += 1;
                flipped += (pos["argmax"].as_u64().unwrap() != cont[i]) as usize;
            }
        }
    }
    eprintln!("accuracy level 4: {flipped} of {confident} confident golden positions flipped");
    assert!(flipped > 0, "int8 activations no longer flip golden tokens: revisit the default");
}

#[test]
fn tampered_onnx_files_are_refused_before_onnx_runtime() {
    let artifact =
        compile(&repo_root().join("fixtures/tiny-llama-sharded"), "onnx-cpu", "tampered", &["--skip-smoke-check"]);
    let a = artifact.to_str().unwrap();
    let data = artifact.join("model.onnx.data");
    let bytes = std::fs::read(&data).unwrap();
    std::fs::write(&data, &bytes[..bytes.len() - 100]).unwrap();
    let err = slmc_fails(&["run", a, "--prompt-ids", "1,2"]);
    assert!(err.contains(data.to_str().unwrap()) && err.contains("the manifest says"), "{err}");
    // Without the bundle manifest the artifact's own digests still refuse it.
    let manifest = std::fs::read(artifact.join("manifest.json")).unwrap();
    std::fs::remove_file(artifact.join("manifest.json")).unwrap();
    let err = slmc_fails(&["run", a, "--prompt-ids", "1,2"]);
    assert!(err.contains(data.to_str().unwrap()) && err.contains("truncated or replaced"), "{err}");
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 1;
    std::fs::write(&data, &flipped).unwrap();
    let err = slmc_fails(&["run", a, "--prompt-ids", "1,2"]);
    assert!(err.contains(data.to_str().unwrap()) && err.contains("differs from the manifest"), "{err}");
    std::fs::write(&data, &bytes).unwrap();
    std::fs::write(artifact.join("manifest.json"), manifest).unwrap();
    slmc_json(&["run", a, "--prompt-ids", "1,2", "--max-new-tokens", "2"]);
}

#[test]
fn unsupported_onnx_requests_are_clear_errors() {
    let model = repo_root().join("fixtures/tiny-llama-sharded");
    let out = scratch("onnx-unsupported");
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let err = slmc_fails(&["compile", m, "--target", "onnx-cpu", "-o", o, "--kv-quant", "int8"]);
    assert!(err.contains("int8 KV cache has no ONNX lowering"), "{err}");
    assert!(std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0) == 0, "nothing is left behind");
}

/// Long contexts on onnx-cpu with the default (exact) configuration: the two long golden
/// prompts (986 and 667 tokens) teacher-forced (prefill and the decode path) and greedy over
/// all 48 tokens, and a 1,500-token prompt of the project's own against the interpreter.
#[test]
fn smollm2_long_prompts_on_onnx_cpu_match_the_reference() {
    let artifact = compile(&smollm2_gguf(), "onnx-cpu", "smollm2-long", &[]);
    let long = Goldens { file: "smollm2-135m-long.json", decode: true, greedy_tokens: 48 };
    check_goldens(&artifact, &long, 0.02, true, &[]);
    check_own_long_prompt(&artifact, 8, 0.02);
}
