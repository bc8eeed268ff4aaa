//! The GPU artifact executed by the wgpu executor (Mesa's lavapipe here): the project's
//! checkpoints against the interpreter on the same optimized graph, SmolLM2 against the
//! goldens, every kernel validated (naga at compile time, spirv-val here, MSL with real
//! buffer slots), and a tampered artifact refused before the GPU sees it.

mod common;

use std::path::Path;

use common::*;

/// Compiles for the generic `webgpu` profile: no optional features, the plain kernels.
fn compile(model: &Path, name: &str, extra: &[&str]) -> Scratch {
    compile_for("webgpu", model, name, extra)
}

/// `vulkan` and `metal` have shader-f16 and subgroups: the kernels' variants.
fn compile_for(target: &str, model: &Path, name: &str, extra: &[&str]) -> Scratch {
    let out = scratch(&format!("gpu-{name}"));
    let mut args = vec!["compile", model.to_str().unwrap(), "--target", target, "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    slmc_json(&args);
    out.into_sub(target)
}

#[test]
fn project_checkpoints_match_the_interpreter() {
    let models = [
        (repo_root().join("fixtures/tiny-llama-sharded"), 96),
        (repo_root().join("fixtures/tiny-phi3"), 96),
        (repo_root().join("fixtures/tiny-mobilellm-shared"), 96),
        (golden_dir().join("arch/qwen2-untied-f32"), 300),
        (golden_dir().join("arch/llama-tied-f16"), 256),
    ];
    let variants: [&[&str]; 3] =
        [&[], &["--kv-quant", "int8"], &["--quant", "q4g32-sym", "--quant-override", "lm_head=q8"]];
    let cases = models.iter().enumerate().flat_map(|(i, m)| {
        // Every model plain; the first also with an int8 cache and with 4-bit/8-bit weights.
        let n = if i == 0 { 3 } else { 1 };
        (0..n).map(move |v| (i, m, v))
    });
    for (i, (model, vocab), v) in cases {
        let flags = variants[v];
        // A small step size so the 13-token prompt also exercises chunked prefill.
        let mut compile_args = vec!["--max-step-tokens", "8"];
        compile_args.extend_from_slice(flags);
        let artifact = compile(model, &format!("fixture{i}-{v}"), &compile_args);
        assert_artifact_matches_interpreter(model, &artifact, flags, *vocab, "wgpu", 1e-4);
    }
}

#[test]
fn every_kernel_validates_as_spirv_and_has_msl_bindings() {
    let model = repo_root().join("fixtures/tiny-llama-sharded");
    let plain = compile(&model, "kernels", &[]);
    // The f16 (weights and cache) and subgroup variants.
    let variants = compile_for("vulkan", &model, "kernels-variants", &["--quant", "f16", "--kv-quant", "f16"]);
    let features = &read_json(&variants.join("artifact.json"))["required_features"];
    assert_eq!(features, &serde_json::json!(["shader-f16", "subgroups"]));
    assert_eq!(read_json(&plain.join("artifact.json"))["required_features"], serde_json::json!([]));
    for artifact in [plain, variants] {
        check_kernel_files(&artifact);
    }
}

fn check_kernel_files(artifact: &Path) {
    let manifest = read_json(&artifact.join("artifact.json"));
    let kernels = manifest["kernels"].as_array().unwrap();
    assert!(kernels.len() >= 8);
    for k in kernels {
        let name = k["name"].as_str().unwrap();
        let spv = artifact.join("kernels").join(format!("{name}.spv"));
        let out = std::process::Command::new("spirv-val")
            .args(["--target-env", "vulkan1.1"])
            .arg(&spv)
            .output()
            .expect("spirv-val runs (scripts/setup installs spirv-tools)");
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let msl = std::fs::read_to_string(artifact.join("kernels").join(format!("{name}.metal"))).unwrap();
        assert!(
            msl.contains("[[buffer(0)]]") && msl.contains("[[buffer(1)]]") && !msl.contains("fake"),
            "{name}: MSL bindings"
        );
        let wgsl = std::fs::read_to_string(artifact.join("kernels").join(format!("{name}.wgsl"))).unwrap();
        assert!(wgsl.contains("@compute") && wgsl.contains("fn run("));
    }
    let schedule = manifest["dispatches"].as_array().unwrap();
    assert!(schedule.iter().all(|d| d["workgroups"].as_array().unwrap().len() == 3));
}

#[test]
fn a_tampered_artifact_is_refused_naming_the_file() {
    let artifact = compile(&repo_root().join("fixtures/tiny-llama-sharded"), "tampered", &["--skip-smoke-check"]);
    let a = artifact.to_str().unwrap();
    let weights = artifact.join("weights.bin");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    // The bundle's manifest catches it first...
    let err = slmc_fails(&["run", a, "--prompt-ids", "1,2"]);
    assert!(err.contains(weights.to_str().unwrap()) && err.contains("the manifest says"), "{err}");
    // ...and a bare artifact (no manifest, run with --allow-unsigned) is still checked,
    // against artifact.json's own file list.
    std::fs::remove_file(artifact.join("manifest.json")).unwrap();
    let err = slmc_fails(&["run", a, "--prompt-ids", "1,2"]);
    assert!(err.contains(weights.to_str().unwrap()) && err.contains("the manifest says"), "{err}");
    // A feature the executor does not know is refused before any device is created.
    std::fs::write(&weights, &bytes).unwrap();
    let manifest_path = artifact.join("artifact.json");
    let mut manifest = read_json(&manifest_path);
    manifest["required_features"] = serde_json::json!(["shader-f64"]);
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let err = slmc_fails(&["run", a, "--prompt-ids", "1,2"]);
    assert!(err.contains("artifact.json") && err.contains("unknown GPU feature `shader-f64`"), "{err}");
    std::fs::write(artifact.join("artifact.json"), "{ not json").unwrap();
    let err = slmc_fails(&["run", a, "--prompt-ids", "1,2"]);
    assert!(err.contains("artifact.json") && err.contains("invalid manifest"), "{err}");
}

#[test]
fn unsupported_targets_and_graphs_are_clear_errors() {
    let model = repo_root().join("fixtures/tiny-llama-sharded");
    let out = scratch("gpu-unsupported");
    let m = model.to_str().unwrap();
    let o = out.to_str().unwrap();
    let err = slmc_fails(&["compile", m, "--target", "coreml-ios18", "-o", o, "--kv-quant", "int8"]);
    assert!(err.contains("no Core ML lowering"), "{err}");
    let err = slmc_fails(&["compile", m, "--target", "webgpu", "-o", o, "--pipeline", "portable"]);
    assert!(err.contains("not supported by the GPU backend yet"), "{err}");
    let err = slmc_fails(&["compile", m, "--target", "webgpu", "-o", o, "--max-step-tokens", "2000000"]);
    assert!(err.contains("binds at most 134217728 bytes") && err.contains("lower --max-step-tokens"), "{err}");
    let err = slmc_fails(&["compile", m, "--target", "tpu", "-o", o]);
    assert!(err.contains("unknown target `tpu`"), "{err}");
    assert!(std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0) == 0, "nothing is left behind");
}

/// SmolLM2 from the GGUF (Q4_1 blocks passed through to the kernels) on the 8 golden
/// prompts: teacher-forced argmax equals the golden wherever the gap is at least 0.02,
/// and greedy generation reproduces the goldens up to the first such near-tie.
#[test]
fn smollm2_on_the_gpu_matches_the_goldens() {
    let gguf = smollm2_gguf();
    // The vulkan profile: subgroup RMSNorm and argmax (Q4_1/Q8_0 weights have no f16 part).
    // The goldens here cover more than the smoke set (which tests/bundles.rs runs on the GPU).
    let artifact = compile_for("vulkan", &gguf, "smollm2", &["--skip-smoke-check"]);
    check_smollm2_goldens(&artifact);
}

/// Teacher-forced argmax of the GPU artifact against the interpreter's on the same
/// optimized graph over the golden prompts and continuations: (equal, total).
fn gpu_argmax_agreement(target: &str, name: &str, flags: &[&str]) -> (usize, usize) {
    let gguf = smollm2_gguf();
    // Every golden position is compared below: the smoke set would repeat a subset.
    let artifact = compile_for(target, &gguf, name, &[flags, &["--skip-smoke-check"]].concat());
    let golden = read_json(&golden_dir().join("smollm2-135m-greedy.json"));
    let (mut same, mut total) = (0, 0);
    for p in golden["prompts"].as_array().unwrap() {
        let (input, cont) = (ids_arg(&as_ids(&p["input_ids"])), ids_arg(&as_ids(&p["generated_ids"])));
        let gpu =
            slmc_json(&["score", artifact.to_str().unwrap(), "--prompt-ids", &input, "--continuation-ids", &cont]);
        let mut args = vec![
            "score",
            gguf.to_str().unwrap(),
            "--prompt-ids",
            &input,
            "--continuation-ids",
            &cont,
            "--pipeline",
            "gpu",
        ];
        args.extend_from_slice(flags);
        let interp = slmc_json(&args);
        let n = as_ids(&p["generated_ids"]).len();
        assert_eq!(gpu["positions"].as_array().unwrap().len(), n, "{}: GPU positions", p["id"]);
        assert_eq!(interp["positions"].as_array().unwrap().len(), n, "{}: interpreter positions", p["id"]);
        for (i, (a, b)) in
            gpu["positions"].as_array().unwrap().iter().zip(interp["positions"].as_array().unwrap()).enumerate()
        {
            total += 1;
            if a["argmax"] == b["argmax"] {
                same += 1;
            } else {
                eprintln!(
                    "{} step {i}: GPU {} vs interpreter {} (interpreter gap {})",
                    p["id"], a["argmax"], b["argmax"], b["top1_minus_top2"]
                );
            }
        }
    }
    eprintln!(
        "{target} {flags:?}: GPU argmax equals the interpreter's at {same}/{total} ({:.2}%)",
        100.0 * same as f64 / total as f64
    );
    let expected: usize = golden["prompts"].as_array().unwrap().iter().map(|p| as_ids(&p["generated_ids"]).len()).sum();
    assert_eq!(total, expected, "every golden position compared");
    (same, total)
}

/// f16 weights and an f16 KV cache on the `vulkan` profile: the f16 variants (native f16
/// loads) and the subgroup variants on the real model, against the interpreter.
#[test]
fn smollm2_f16_weights_and_cache_with_gpu_variants_match_the_interpreter() {
    let (same, total) = gpu_argmax_agreement("vulkan", "smollm2-f16", &["--quant", "f16", "--kv-quant", "f16"]);
    assert!(same as f64 >= 0.99 * total as f64, "{same}/{total}");
}

/// An int8 KV cache on the GPU (webgpu, the plain kernels) held to the reference at the
/// issue's 0.05 bound, as the interpreter is: on the 8 golden prompts teacher-forced argmax
/// at every golden gap of at least 0.05 and greedy identical before the first smaller gap.
/// (Last round compared the GPU with the interpreter at 99% and could not reach it: int8
/// codes turned float-level differences into code steps. With the exact window of the 32
/// positions nearest each query, the int8 cache no longer moves confident tokens.)
#[test]
fn smollm2_int8_kv_on_the_gpu_holds_the_goldens() {
    let artifact = compile(&smollm2_gguf(), "smollm2-int8", &["--kv-quant", "int8", "--skip-smoke-check"]);
    check_smollm2_goldens_within(&artifact, 0.05, &[]);
}
