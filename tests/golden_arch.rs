//! The tiny random architectures in `../shared/golden/arch/` (llama with tied f16
//! weights, qwen2 with biases in f32, qwen3, gemma2, gemma3, stablelm2): final-position
//! logits within 1e-4 of transformers and identical greedy continuations. The 29-token
//! cases run past the Gemma fixtures' 8-token sliding window.

mod common;

use common::*;

const LOGIT_TOL: f64 = 1e-4;

fn check_arch(name: &str) {
    let dir = golden_dir().join("arch").join(name);
    let golden = read_json(&dir.join("golden.json"));
    let model = dir.to_str().unwrap();
    let vocab = slmc_json(&["inspect", model])["config"]["vocab_size"].as_u64().unwrap();
    for case in golden["cases"].as_array().unwrap() {
        let input = as_ids(&case["input_ids"]);
        let greedy = as_ids(&case["greedy_ids"]);
        let run = slmc_json(&[
            "run",
            model,
            "--prompt-ids",
            &ids_arg(&input),
            "--max-new-tokens",
            &greedy.len().to_string(),
            "--ignore-eos",
            "--record-logits",
            "1",
            "--record-top-k",
            &vocab.to_string(),
        ]);
        let top = run["recorded_logits"][0]["top"].as_array().unwrap();
        assert_eq!(top.len() as u64, vocab);
        let mut ours = vec![f64::NAN; vocab as usize];
        for t in top {
            ours[t["id"].as_u64().unwrap() as usize] = t["logit"].as_f64().unwrap();
        }
        // Every id filled with a finite logit: `f64::max` below would skip a NaN.
        assert!(ours.iter().all(|v| v.is_finite()), "{name}: a logit is missing or not finite");
        let expected = case["final_position_logits"].as_array().unwrap();
        assert_eq!(expected.len(), ours.len(), "{name}: logit count");
        let mut max_err = 0.0f64;
        for (i, e) in expected.iter().enumerate() {
            max_err = max_err.max((ours[i] - e.as_f64().unwrap()).abs());
        }
        assert!(max_err <= LOGIT_TOL, "{name} len {}: max logit error {max_err}", input.len());
        assert_eq!(top[0]["id"].as_u64().unwrap(), case["final_position_argmax"].as_u64().unwrap());
        let lse = run["recorded_logits"][0]["logsumexp"].as_f64().unwrap();
        assert!((lse - case["final_position_logsumexp"].as_f64().unwrap()).abs() <= LOGIT_TOL);
        assert_eq!(as_ids(&run["generated_ids"]), greedy, "{name} len {}", input.len());
        eprintln!("{name} len {}: max logit error {max_err:.2e}, greedy identical", input.len());
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
    check_arch("qwen3-qknorm-bf16");
}

#[test]
fn gemma3_sliding_window_f32() {
    check_arch("gemma3-tied-f32");
}

#[test]
fn gemma2_softcap_f32() {
    check_arch("gemma2-softcap-f32");
}

#[test]
fn stablelm2_partial_rotary_f16() {
    check_arch("stablelm2-partial-rotary-f16");
}
