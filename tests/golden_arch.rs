//! The tiny random architectures in `../shared/golden/arch/` (llama with tied f16
//! weights, qwen2 with biases in f32, qwen3, gemma2, gemma3, stablelm2): final-position
//! logits within 1e-4 of transformers and identical greedy continuations. The 29-token
//! cases run past the Gemma fixtures' 8-token sliding window. The four newer families
//! also run compiled for every backend kind (WGSL, ONNX both profiles, Core ML on the MIL
//! reference within an fp16 bound).

mod common;

use common::*;

const LOGIT_TOL: f64 = 1e-4;
/// Core ML programs compute in fp16 (measured up to 6.5e-3 on these fixtures).
const FP16_LOGIT_TOL: f64 = 2e-2;

/// Where a fixture runs: the interpreter on the checkpoint, or a compiled target.
#[derive(Clone, Copy)]
enum On {
    Interpreter,
    Target(&'static str),
}

/// Every backend kind: WGSL on lavapipe, ONNX Runtime with both profiles, and the Core ML
/// package on the MIL reference interpreter (fp16).
const TARGETS: [&str; 4] = ["webgpu", "onnx-cpu", "onnx-portable", "coreml-ios18"];

fn check_arch(name: &str) {
    check_arch_on(name, On::Interpreter);
}

/// The fixture on the interpreter and on every target.
fn check_arch_everywhere(name: &str) {
    check_arch_on(name, On::Interpreter);
    for target in TARGETS {
        check_arch_on(name, On::Target(target));
    }
}

fn check_arch_on(name: &str, on: On) {
    let dir = golden_dir().join("arch").join(name);
    let golden = read_json(&dir.join("golden.json"));
    let checkpoint = dir.to_str().unwrap();
    let vocab = slmc_json(&["inspect", checkpoint])["config"]["vocab_size"].as_u64().unwrap();
    let (model, extra, tol) = match on {
        On::Interpreter => (dir.clone(), vec![], LOGIT_TOL),
        On::Target(target) => {
            let out = scratch(&format!("arch-{name}-{target}"));
            let root = out.to_str().unwrap();
            slmc_json(&["compile", checkpoint, "--target", target, "-o", root, "--context", "64", "--quant", "keep"]);
            let fp16 = target.starts_with("coreml");
            let extra = if fp16 { vec!["--mil-reference"] } else { vec![] };
            (out.join(target), extra, if fp16 { FP16_LOGIT_TOL } else { LOGIT_TOL })
        }
    };
    let label = match on {
        On::Interpreter => format!("{name} (interpreter)"),
        On::Target(t) => format!("{name} ({t})"),
    };
    let model = model.to_str().unwrap();
    for case in golden["cases"].as_array().unwrap() {
        let input = as_ids(&case["input_ids"]);
        let greedy = as_ids(&case["greedy_ids"]);
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
        let mut max_err = 0.0f64;
        for (i, e) in expected.iter().enumerate() {
            max_err = max_err.max((ours[i] - e.as_f64().unwrap()).abs());
        }
        assert!(max_err <= tol, "{label} len {}: max logit error {max_err}", input.len());
        let lse = run["recorded_logits"][0]["logsumexp"].as_f64().unwrap();
        assert!((lse - case["final_position_logsumexp"].as_f64().unwrap()).abs() <= tol);
        // Greedy equals the golden before the first step whose top-2 gap is within twice
        // the logit bound (there either token is a correct answer).
        let gaps: Vec<f64> =
            case["greedy_top1_minus_top2"].as_array().unwrap().iter().map(|g| g.as_f64().unwrap()).collect();
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
