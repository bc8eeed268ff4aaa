//! The Core ML backend, checked on Linux: coremltools (PyPI) loads both SmolLM2 packages
//! and rebuilds and type-checks their MIL programs; slmc's reference MIL interpreter runs
//! the packages as written (read back from disk) against the goldens and against the IR
//! interpreter on the project's checkpoints; package sizes; the MIL text snapshot; and a
//! Core ML artifact without Core ML is a clear error.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use slmc_runtime::Executor;

/// Compiles `model` for `targets` (comma-separated) into a fresh directory.
fn compile(model: &Path, targets: &str, name: &str, extra: &[&str]) -> Scratch {
    let out = scratch(&format!("coreml-{name}"));
    let mut args = vec!["compile", model.to_str().unwrap(), "--target", targets, "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    slmc_json(&args);
    out
}

/// coremltools' view of a package (tests/python/coreml_check.py).
fn coremltools_check(package: &Path) -> serde_json::Value {
    let script = repo_root().join("tests/python/coreml_check.py");
    let out = std::process::Command::new(venv_python()).arg(&script).arg(package).output().expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "coremltools refused {}:\n{stdout}{}",
        package.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("one JSON line")
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    total
}

const MIL: &str = "--mil-reference";

/// Both profiles for SmolLM2: coremltools loads each package and type-checks its program;
/// the spec version, weight compression, states or cache inputs are what the profile says;
/// the manifest's NPU field carries the placement estimate.
#[test]
fn smollm2_packages_load_in_coremltools() {
    let out = compile(
        &smollm2_gguf(),
        "coreml-ios18,coreml-ios17",
        "smollm2-load",
        &["--context", "512", "--skip-smoke-check"],
    );
    let ios18 = coremltools_check(&out.join("coreml-ios18/model.mlpackage"));
    assert_eq!(ios18["specification_version"], 9);
    assert_eq!(ios18["ops"]["constexpr_blockwise_shift_scale"], 121, "every projection and the table stay 4/8-bit");
    assert_eq!(ios18["ops"]["scaled_dot_product_attention"], 30);
    assert_eq!(ios18["states"].as_array().unwrap().len(), 60, "one fp16 state per layer for keys and values");
    assert_eq!(ios18["outputs"], serde_json::json!(["logits"]));
    let ios17 = coremltools_check(&out.join("coreml-ios17/model.mlpackage"));
    assert_eq!(ios17["specification_version"], 8);
    assert_eq!(ios17["ops"]["constexpr_affine_dequantize"], 121);
    assert!(ios17["states"].as_array().unwrap().is_empty());
    assert_eq!(ios17["inputs"].as_array().unwrap().len(), 3 + 60, "the KV cache comes in as inputs");
    assert_eq!(ios17["outputs"].as_array().unwrap().len(), 1 + 60, "and the step's keys and values go out");
    for target in ["coreml-ios18", "coreml-ios17"] {
        let m = read_json(&out.join(target).join("manifest.json"));
        let npu = &m["npu_support"];
        let (on, total) = (npu["ops_on_npu"].as_u64().unwrap(), npu["ops_total"].as_u64().unwrap());
        eprintln!("{target}: {on} of {total} ops estimated on the Neural Engine; {}", npu["note"]);
        assert!(on > total / 2 && on < total, "{target}: {on} of {total}");
        assert_eq!(m["required"]["executor"], "coreml");
    }
}

/// The iOS 18 program (the GGUF's 4-bit blocks kept exactly), run by slmc's reference MIL
/// interpreter from the files on disk (fp16 results, static steps of 8 tokens padded, the
/// KV cache as model state), reproduces the goldens on all 8 prompts: argmax wherever the
/// golden gap is at least 0.02, greedy identical before the first near-tie (gap < 0.02).
/// (fp16 flips near-ties, so the near-tie itself may differ.)
#[test]
fn smollm2_ios18_program_matches_the_goldens() {
    // The eight golden prompts cover more than the smoke set (run for Core ML by
    // golden_arch and golden_gemma3).
    let out = compile(&smollm2_gguf(), "coreml-ios18", "smollm2-ios18", &["--context", "512", "--skip-smoke-check"]);
    check_smollm2_goldens_within(&out.join("coreml-ios18"), 0.02, &[MIL]);
}

/// The iOS 17 program (int8 blocks of 32 columns: the 8-bit table exactly, the 4-bit blocks
/// re-quantized; KV cache in and out) holds the same goldens at the same bound.
#[test]
fn smollm2_ios17_program_matches_the_goldens() {
    let out = compile(&smollm2_gguf(), "coreml-ios17", "smollm2-ios17", &["--context", "512", "--skip-smoke-check"]);
    check_smollm2_goldens_within(&out.join("coreml-ios17"), 0.02, &[MIL]);
}

/// The iOS 18 package with the GGUF's 4-bit blocks (and its 8-bit tied table) against the
/// same model with every weight in fp16 (`--quant f16 --quant-override embed=f16,lm_head=f16`): at most
/// 0.6x the size.
#[test]
fn int4_package_is_at_most_0_6x_the_f16_package() {
    let flags = ["--context", "512", "--skip-smoke-check"];
    let int4 = compile(&smollm2_gguf(), "coreml-ios18", "size-int4", &flags);
    let mut f16_flags = flags.to_vec();
    f16_flags.extend_from_slice(&["--quant", "f16", "--quant-override", "embed=f16,lm_head=f16"]);
    let f16 = compile(&smollm2_gguf(), "coreml-ios18", "size-f16", &f16_flags);
    let (a, b) =
        (dir_bytes(&int4.join("coreml-ios18/model.mlpackage")), dir_bytes(&f16.join("coreml-ios18/model.mlpackage")));
    eprintln!("SmolLM2 iOS 18 packages: int4 {a} bytes, f16 {b} bytes, ratio {:.3}", a as f64 / b as f64);
    assert!((a as f64) <= 0.6 * b as f64, "int4 {a} vs f16 {b}");
    coremltools_check(&f16.join("coreml-ios18/model.mlpackage"));
}

/// The project's checkpoints (f32 and quantized weights, fused Phi-3 projections with
/// partial rotary, MobileLLM's shared blocks, tied and untied heads): the reference MIL
/// interpreter's logits against the IR interpreter's on the same optimized graph, within
/// fp16's precision (the program's activations are fp16; iOS 17 re-quantizes 4-bit blocks
/// to 8 bits).
#[test]
fn project_checkpoints_match_the_interpreter_within_fp16() {
    let cases: [(PathBuf, usize, &[&str]); 5] = [
        (repo_root().join("fixtures/tiny-llama-sharded"), 96, &[]),
        (repo_root().join("fixtures/tiny-llama-sharded"), 96, &["--quant", "q4g32"]),
        (repo_root().join("fixtures/tiny-phi3"), 96, &["--quant", "q4g32-sym"]),
        (repo_root().join("fixtures/tiny-mobilellm-shared"), 96, &[]),
        (golden_dir().join("arch/qwen2-untied-f32"), 300, &[]),
    ];
    let prompt = "5,17,3,88,41,9,60,2,33,1,4,7,12";
    for (i, (model, vocab, flags)) in cases.iter().enumerate() {
        for target in ["coreml-ios18", "coreml-ios17"] {
            let mut cflags = vec!["--context", "64"];
            cflags.extend_from_slice(flags);
            let out = compile(model, target, &format!("fixture{i}"), &cflags);
            let artifact = out.join(target);
            coremltools_check(&artifact.join("model.mlpackage"));
            let mut interp_flags = vec!["--pipeline", "gpu"];
            interp_flags.extend_from_slice(flags);
            let (a, _, exec) = prompt_logits(model.to_str().unwrap(), prompt, *vocab, 10, &interp_flags);
            let (b, _, other) = prompt_logits(artifact.to_str().unwrap(), prompt, *vocab, 10, &[MIL]);
            assert_eq!((exec.as_str(), other.as_str()), ("interpreter", "mil-reference"));
            let diff = max_relative_difference(&a, &b);
            eprintln!("{target} {} {flags:?}: max relative logit difference {diff:.2e}", model.display());
            // fp16 activations: 1e-2. iOS 17 re-quantizes 4-bit blocks to 8 bits (each weight
            // within 1/510 of its block's range), which these random weights amplify: 6e-2.
            let tolerance = if target == "coreml-ios17" && !flags.is_empty() { 6e-2 } else { 1e-2 };
            assert!(diff <= tolerance, "{target} {} {flags:?}: logits differ by {diff}", model.display());
        }
    }
}

/// The MIL text the compiler writes beside the package for a tiny checkpoint, both
/// profiles (SLMC_UPDATE_SNAPSHOTS=1 rewrites the expected files).
#[test]
fn tiny_program_text_snapshot() {
    for target in ["coreml-ios18", "coreml-ios17"] {
        let out = compile(
            &repo_root().join("fixtures/tiny-llama-sharded"),
            target,
            &format!("snapshot-{target}"),
            &["--context", "32", "--quant", "q4g32", "--skip-smoke-check"],
        );
        let text = std::fs::read_to_string(out.join(target).join("model.mil")).unwrap();
        let expected_path = repo_root().join(format!("tests/snapshots/coreml/tiny-llama-{target}.mil"));
        if std::env::var("SLMC_UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") {
            std::fs::create_dir_all(expected_path.parent().unwrap()).unwrap();
            std::fs::write(&expected_path, &text).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e} (SLMC_UPDATE_SNAPSHOTS=1 writes it)", expected_path.display()));
        assert!(text == expected, "{target}: the MIL text differs from {}", expected_path.display());
    }
}

/// Without Core ML (this machine), running a Core ML artifact is a clear error, not a
/// silent fallback; a changed weight blob is refused before anything runs it.
#[test]
fn core_ml_artifacts_fail_clearly_without_core_ml() {
    let out = compile(
        &repo_root().join("fixtures/tiny-llama-sharded"),
        "coreml-ios18",
        "no-coreml",
        &["--context", "32", "--skip-smoke-check"],
    );
    let dir = out.join("coreml-ios18");
    let d = dir.to_str().unwrap();
    let err = slmc_fails(&["run", d, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]);
    assert!(err.contains("Core ML") && err.contains("--mil-reference"), "{err}");
    let weights = dir.join("model.mlpackage/Data/com.apple.CoreML/weights/weight.bin");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    let err = slmc_fails(&["run", d, MIL, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]);
    assert!(err.contains("weight.bin"), "{err}");
}

/// A Core ML program's declared shapes size what the reference host allocates: a wrong rank
/// is refused at load (it was indexed unchecked), and a state or cache past this machine's
/// memory is refused when the program runs (it was allocated at load, sized by the file).
#[test]
fn core_ml_programs_with_impossible_shapes_are_refused() {
    use prost::Message;
    use slmc_targets::coreml::proto::{value_type::Type, ValueType};
    use slmc_targets::coreml::{decode_model, MODEL_FILE, WEIGHTS_FILE};
    let out =
        compile(&repo_root().join("fixtures/tiny-llama-sharded"), "coreml-ios18", "shapes", &["--skip-smoke-check"]);
    let dir = out.join("coreml-ios18");
    let original = decode_model(&std::fs::read(dir.join(MODEL_FILE)).unwrap()).unwrap();
    let weights = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    fn dims(t: &mut ValueType) -> &mut Vec<slmc_targets::coreml::proto::Dimension> {
        match t.r#type.as_mut().unwrap() {
            Type::TensorType(tt) => &mut tt.dimensions,
            Type::StateType(st) => dims(st.wrapped_type.as_mut().unwrap()),
        }
    }
    let load = |edit: &dyn Fn(&mut slmc_targets::coreml::proto::NamedValueType) -> bool| {
        let mut model = original.clone();
        let main = model.ml_program.as_mut().unwrap().functions.get_mut("main").unwrap();
        assert!(main.inputs.iter_mut().map(|i| edit(i)).filter(|hit| *hit).count() > 0, "no input was edited");
        let mut files = slmc_runtime::files::ArtifactFiles::read_listed(&dir, &[]).unwrap();
        files.insert_checked(MODEL_FILE, model.encode_to_vec());
        files.insert_checked(WEIGHTS_FILE, weights.clone());
        slmc_runtime::mil::CoremlReference::load(&files)
    };
    let err = load(&|i| {
        let hit = i.name == "input_ids";
        if hit {
            dims(i.r#type.as_mut().unwrap()).truncate(1);
        }
        hit
    })
    .err()
    .expect("a rank-1 input_ids is refused");
    assert!(err.to_string().contains("input_ids"), "{err}");
    // A cache longer than the context the causal mask covers is refused at load.
    let err = load(&|i| {
        let hit = i.name.contains("_cache_");
        if hit {
            dims(i.r#type.as_mut().unwrap())[2].constant.as_mut().unwrap().size = 1 << 40;
        }
        hit
    })
    .err()
    .expect("a cache past the context is refused");
    assert!(err.to_string().contains("at most the context"), "{err}");
    // A context (mask and caches) past memory loads, since shapes are only recorded then,
    // and is refused when a step would allocate it.
    let mut host = load(&|i| {
        let hit = i.name.contains("_cache_") || i.name == "causal_mask";
        if hit {
            let axis = if i.name == "causal_mask" { 3 } else { 2 };
            dims(i.r#type.as_mut().unwrap())[axis].constant.as_mut().unwrap().size = 1 << 40;
        }
        hit
    })
    .expect("shapes are only recorded at load");
    let err = host.forward(&[1, 2]).unwrap_err();
    assert!(err.to_string().contains("more than this machine's memory"), "{err}");
    // So is a ring mask declared past memory: the host's slot table is sized from it.
    let out = compile(
        &golden_dir().join("arch/gemma3-tied-f32"),
        "coreml-ios18",
        "shapes-ring",
        &["--skip-smoke-check", "--context", "64"],
    );
    let dir = out.join("coreml-ios18");
    let mut model = decode_model(&std::fs::read(dir.join(MODEL_FILE)).unwrap()).unwrap();
    let main = model.ml_program.as_mut().unwrap().functions.get_mut("main").unwrap();
    let ring = main.inputs.iter_mut().find(|i| i.name == "ring_mask_8").expect("the fixture's layers have rings");
    dims(ring.r#type.as_mut().unwrap())[3].constant.as_mut().unwrap().size = 1 << 40;
    let mut files = slmc_runtime::files::ArtifactFiles::read_listed(&dir, &[]).unwrap();
    files.insert_checked(MODEL_FILE, model.encode_to_vec());
    files.insert_checked(WEIGHTS_FILE, std::fs::read(dir.join(WEIGHTS_FILE)).unwrap());
    let mut host = slmc_runtime::mil::CoremlReference::load(&files).expect("shapes are only recorded at load");
    let err = host.forward(&[1, 2]).unwrap_err();
    assert!(
        err.to_string().contains("ring_mask_8") && err.to_string().contains("more than this machine's memory"),
        "{err}"
    );
}

/// A sliding-window layer's cache is a ring on both Core ML profiles: the same fixture
/// compiled for a context one position past where rings start (ring layers) and for the
/// context where they start (whole-context caches) computes the same logits on the MIL
/// reference, within fp16 summation-order noise, on every row of a sequence that wraps
/// the ring: in one prefill, token by token, and prefill then decode up to the context's
/// last position (where the host starts steps early and feeds cached tokens again).
/// coremltools type-checks the ring program.
#[test]
fn ring_caches_compute_what_whole_context_caches_do() {
    let fixture = golden_dir().join("arch/gemma3-tied-f32");
    // Window 8, steps of 8: iOS 17 rings of 8 + 8 - 1 slots, iOS 18 states of 8 + 2 x 8 - 1.
    for (target, width) in [("coreml-ios17", 15usize), ("coreml-ios18", 23)] {
        let open = |context: usize| {
            let name = format!("ring-{target}-{context}");
            let ctx = context.to_string();
            let out = compile(&fixture, target, &name, &["--context", &ctx, "--skip-smoke-check", "--quant", "keep"]);
            let layout = read_json(&out.join(target).join("manifest.json"))["memory"]["kv_cache_layout"].clone();
            let options = slmc_runtime::registry::OpenOptions { adapter: None, threads: 1, mil_reference: true };
            let exec = slmc_runtime::registry::open(&out.join(target), &options).expect("the artifact loads").exec;
            // The guard keeps the bundle until the checks are done.
            (exec, layout.as_str().unwrap_or_default().to_string(), out.into_sub(target))
        };
        let (mut whole, whole_layout, _whole_dir) = open(width);
        let (mut ring, ring_layout, ring_dir) = open(width + 1);
        assert!(whole_layout.starts_with("4 layers keep"), "{target}: {whole_layout}");
        // The three sliding layers keep `width` slots; the global one the whole context.
        assert!(ring_layout.contains(&format!("3 layers keep {width} positions")), "{target}: {ring_layout}");
        let vocab = whole.vocab_size();
        let tokens: Vec<u32> = (0..width as u32).map(|i| (i * 97 + 11) % vocab as u32).collect();
        let compare = |what: &str, a: Vec<f32>, b: Vec<f32>| {
            assert_eq!(a.len(), b.len(), "{target} {what}");
            for (r, (x, y)) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)).enumerate() {
                let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 5e-3 * scale, "{target} {what}: row {r} differs by {worst} (scale {scale})");
            }
        };
        compare("one prefill", whole.forward(&tokens).unwrap(), ring.forward(&tokens).unwrap());
        for (exec, name) in [(&mut whole, "whole"), (&mut ring, "ring")] {
            exec.reset();
            assert_eq!(exec.past_len(), 0, "{name}");
        }
        for (i, t) in tokens.iter().enumerate() {
            compare(&format!("token {i}"), whole.forward(&[*t]).unwrap(), ring.forward(&[*t]).unwrap());
        }
        whole.reset();
        ring.reset();
        let split = width - 5;
        compare("prefill", whole.forward(&tokens[..split]).unwrap(), ring.forward(&tokens[..split]).unwrap());
        for (i, t) in tokens[split..].iter().enumerate() {
            compare(&format!("decode {i}"), whole.forward(&[*t]).unwrap(), ring.forward(&[*t]).unwrap());
        }
        if target == "coreml-ios18" {
            let check = coremltools_check(&ring_dir.join("model.mlpackage"));
            assert!(check.to_string().contains("ring_slot_8"), "coremltools saw the ring inputs: {check}");
        }
    }
}

/// Rings wrapped many times, up to the context's last position (where the host starts
/// steps early and feeds cached tokens again, which needs the ring's extra step of
/// positions): every row on the MIL reference within 2e-2 of the IR interpreter (fp16
/// measures below 5e-3 here; an iOS 17 ring of the window alone measured 0.12).
#[test]
fn ring_caches_hold_what_the_window_needs_to_the_end_of_the_context() {
    let fixture = golden_dir().join("arch/gemma3-tied-f32");
    let context = 96usize;
    let loaded = slmc_compiler::import::load(&fixture).unwrap();
    let graph = slmc_compiler::lower::lower(&loaded).unwrap();
    let request = slmc_compiler::optimize::OptRequest { pipeline: Some("gpu".into()), ..Default::default() };
    let optimized = slmc_compiler::optimize::optimize(&loaded, graph, &request, None).unwrap();
    let weights = slmc_ir::Layered { top: &optimized.derived, base: &loaded.weights };
    for target in ["coreml-ios17", "coreml-ios18"] {
        let ctx = context.to_string();
        let out = compile(&fixture, target, &format!("ring-end-{target}"), &["--context", &ctx, "--skip-smoke-check"]);
        let options = slmc_runtime::registry::OpenOptions { adapter: None, threads: 1, mil_reference: true };
        let mut exec = slmc_runtime::registry::open(&out.join(target), &options).expect("the artifact loads").exec;
        let mut reference = slmc_runtime::InterpreterExecutor::new(&optimized.graph, &weights, context).unwrap();
        let vocab = reference.vocab_size();
        let tokens: Vec<u32> = (0..context as u32).map(|i| (i * 131 + 7) % vocab as u32).collect();
        let compare = |what: String, a: Vec<f32>, b: Vec<f32>| {
            assert_eq!(a.len(), b.len(), "{target} {what}");
            for (r, (x, y)) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)).enumerate() {
                let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 2e-2 * scale, "{target} {what}: row {r} differs by {worst} (scale {scale})");
            }
        };
        for split in [context - 20, context - 9, context - 1] {
            exec.reset();
            reference.reset();
            compare(
                format!("prefill {split}"),
                reference.forward(&tokens[..split]).unwrap(),
                exec.forward(&tokens[..split]).unwrap(),
            );
            for t in &tokens[split..] {
                compare(
                    format!("decode after {split}"),
                    reference.forward(&[*t]).unwrap(),
                    exec.forward(&[*t]).unwrap(),
                );
            }
        }
    }
}
