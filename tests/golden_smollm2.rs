//! SmolLM2-135M-Instruct against the Hugging Face transformers goldens
//! (`../shared/golden/smollm2-135m-greedy.json`), from the GGUF and from its f32, f16
//! and bf16 Hugging Face conversions, all through the `slmc` CLI.

mod common;

use common::*;

/// Positions whose golden top-1/top-2 gap is below this may legitimately flip.
const NEAR_TIE: f64 = 0.01;
/// Tolerance on the recorded top-10 logits (prefill and first decode steps).
const LOGIT_TOL: f64 = 2e-3;

#[derive(Clone)]
struct Agreement {
    /// Per prompt: the greedy ids and the teacher-forced argmaxes.
    outputs: Vec<(Vec<u64>, Vec<u64>)>,
    scored: usize,
    agreed: usize,
    strict_mismatches: Vec<String>,
    greedy_prefix_ok: usize,
    max_logit_error: f64,
}

fn check_model(model: &str, check_logits: bool) -> Agreement {
    let golden = read_json(&golden_dir().join("smollm2-135m-greedy.json"));
    let mut agreement = Agreement {
        outputs: vec![],
        scored: 0,
        agreed: 0,
        strict_mismatches: vec![],
        greedy_prefix_ok: 0,
        max_logit_error: 0.0,
    };
    for prompt in golden["prompts"].as_array().unwrap() {
        let id = prompt["id"].as_str().unwrap();
        let input = as_ids(&prompt["input_ids"]);
        let expected = as_ids(&prompt["generated_ids"]);
        let gaps: Vec<f64> =
            prompt["greedy_top1_minus_top2"].as_array().unwrap().iter().map(|g| g.as_f64().unwrap()).collect();

        // Teacher-forced: every confident golden token is the argmax.
        let score =
            slmc_json(&["score", model, "--prompt-ids", &ids_arg(&input), "--continuation-ids", &ids_arg(&expected)]);
        let positions = score["positions"].as_array().unwrap();
        assert_eq!(positions.len(), expected.len());
        for (i, pos) in positions.iter().enumerate() {
            agreement.scored += 1;
            let argmax = pos["argmax"].as_u64().unwrap();
            if argmax == expected[i] {
                agreement.agreed += 1;
            } else if gaps[i] >= NEAR_TIE {
                agreement
                    .strict_mismatches
                    .push(format!("{id} step {i}: argmax {argmax}, golden {} (gap {})", expected[i], gaps[i]));
            }
        }
        let argmaxes: Vec<u64> = positions.iter().map(|p| p["argmax"].as_u64().unwrap()).collect();
        let top1 = score["top1_agreement"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&top1) && score["mean_nll"].as_f64().unwrap() > 0.0);

        // Greedy: identical up to the first near-tie.
        let run = slmc_json(&[
            "run",
            model,
            "--prompt-ids",
            &ids_arg(&input),
            "--max-new-tokens",
            "48",
            "--ignore-eos",
            "--record-logits",
            "5",
        ]);
        assert_eq!(as_ids(&run["prompt_ids"]), input);
        let generated = as_ids(&run["generated_ids"]);
        assert_eq!(generated.len(), 48, "{id}: 48 tokens with --ignore-eos");
        agreement.outputs.push((generated.clone(), argmaxes));
        let must_match = gaps.iter().position(|g| *g < NEAR_TIE).map(|i| i + 1).unwrap_or(48);
        if generated[..must_match] == expected[..must_match] {
            agreement.greedy_prefix_ok += 1;
        } else {
            agreement
                .strict_mismatches
                .push(format!("{id}: greedy {:?} != golden {:?} within the first {must_match}", generated, expected));
        }

        if check_logits {
            let mut steps = vec![&prompt["prefill_last_position"]];
            steps.extend(prompt["decode_steps"].as_array().unwrap());
            let recorded = run["recorded_logits"].as_array().unwrap();
            for (step, gold) in steps.iter().enumerate() {
                let ours: Vec<(u64, f64)> = recorded[step]["top"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| (t["id"].as_u64().unwrap(), t["logit"].as_f64().unwrap()))
                    .collect();
                for entry in gold["top10"].as_array().unwrap() {
                    let (gid, glogit) = (entry["id"].as_u64().unwrap(), entry["logit"].as_f64().unwrap());
                    let ours = ours.iter().find(|(i, _)| *i == gid).map(|(_, l)| *l);
                    let err = ours.map(|l| (l - glogit).abs()).unwrap_or(f64::INFINITY);
                    agreement.max_logit_error = agreement.max_logit_error.max(err);
                    assert!(err <= LOGIT_TOL, "{id} step {step}: token {gid} logit {ours:?} vs golden {glogit}");
                }
                let lse_err =
                    (recorded[step]["logsumexp"].as_f64().unwrap() - gold["logsumexp"].as_f64().unwrap()).abs();
                assert!(lse_err <= LOGIT_TOL, "{id} step {step}: logsumexp off by {lse_err}");
            }
        }
    }
    agreement
}

fn report(label: &str, a: &Agreement) {
    eprintln!(
        "{label}: teacher-forced top-1 {}/{} ({:.2}%), greedy prefixes {}/8, max top-10 logit error {:.2e}, strict mismatches {}",
        a.agreed,
        a.scored,
        100.0 * a.agreed as f64 / a.scored as f64,
        a.greedy_prefix_ok,
        a.max_logit_error,
        a.strict_mismatches.len()
    );
}

/// The GGUF's results, computed once per test binary.
fn gguf_results() -> Agreement {
    static RESULTS: std::sync::OnceLock<Agreement> = std::sync::OnceLock::new();
    RESULTS
        .get_or_init(|| {
            let gguf = smollm2_gguf();
            check_model(gguf.to_str().unwrap(), true)
        })
        .clone()
}

#[test]
fn gguf_q4_1_matches_transformers() {
    let a = gguf_results();
    report("gguf", &a);
    assert!(a.strict_mismatches.is_empty(), "{:#?}", a.strict_mismatches);
}

/// The f32 conversion holds exactly the GGUF's dequantized weights, so it must match the
/// goldens as the GGUF does and give the GGUF's own results wherever the golden
/// top-1/top-2 gap exceeds float32 noise (1e-3).
#[test]
fn hf_f32_conversion_matches_transformers_and_the_gguf() {
    let dir = converted("f32");
    let a = check_model(dir.to_str().unwrap(), true);
    report("hf-f32", &a);
    assert!(a.strict_mismatches.is_empty(), "{:#?}", a.strict_mismatches);
    let golden = read_json(&golden_dir().join("smollm2-135m-greedy.json"));
    let gguf = gguf_results();
    for (i, prompt) in golden["prompts"].as_array().unwrap().iter().enumerate() {
        let gaps: Vec<f64> =
            prompt["greedy_top1_minus_top2"].as_array().unwrap().iter().map(|g| g.as_f64().unwrap()).collect();
        let (hf_greedy, hf_argmax) = &a.outputs[i];
        let (gguf_greedy, gguf_argmax) = &gguf.outputs[i];
        let upto = gaps.iter().position(|g| *g < 1e-3).map(|p| p + 1).unwrap_or(48);
        assert_eq!(hf_greedy[..upto], gguf_greedy[..upto], "{}: greedy differs from the GGUF", prompt["id"]);
        for (step, gap) in gaps.iter().enumerate().filter(|(_, g)| **g >= 1e-3) {
            assert_eq!(hf_argmax[step], gguf_argmax[step], "{} step {step} (gap {gap})", prompt["id"]);
        }
    }
}

/// Half-precision conversions round the dequantized weights, so exactness is not
/// expected; the agreement is reported and must stay high.
#[test]
fn hf_f16_and_bf16_conversions_agree() {
    for (dtype, min_agreement) in [("f16", 0.99), ("bf16", 0.95)] {
        let dir = converted(dtype);
        let a = check_model(dir.to_str().unwrap(), false);
        report(&format!("hf-{dtype}"), &a);
        let rate = a.agreed as f64 / a.scored as f64;
        assert!(rate >= min_agreement, "{dtype}: teacher-forced agreement {rate:.3} < {min_agreement}");
    }
}

#[test]
fn chat_template_renders_the_golden_prompts() {
    let golden = read_json(&golden_dir().join("smollm2-135m-greedy.json"));
    let gguf = smollm2_gguf();
    let model = slmc_compiler::import::load(&gguf).unwrap();
    let hf = slmc_compiler::import::load(&converted("f32")).unwrap();
    for prompt in golden["prompts"].as_array().unwrap().iter().filter(|p| p["kind"] == "chat") {
        let messages: Vec<slmc_compiler::import::tokenizer::Message> =
            serde_json::from_value(prompt["messages"].clone()).unwrap();
        for m in [&model, &hf] {
            let text = slmc_compiler::import::tokenizer::render_chat(
                m.chat_template.as_deref().unwrap(),
                &messages,
                m.bos_token.as_deref(),
                m.eos_token.as_deref(),
            )
            .unwrap();
            assert_eq!(text, prompt["prompt_text"].as_str().unwrap(), "{}", prompt["id"]);
            let ids: Vec<u64> = m
                .tokenizer
                .as_ref()
                .unwrap()
                .encode(text.as_str(), false)
                .unwrap()
                .get_ids()
                .iter()
                .map(|i| *i as u64)
                .collect();
            assert_eq!(ids, as_ids(&prompt["input_ids"]), "{}", prompt["id"]);
        }
    }
}

#[test]
fn run_with_chat_prompt_and_eos_stops() {
    let gguf = smollm2_gguf();
    let golden = read_json(&golden_dir().join("smollm2-135m-greedy.json"));
    let prompt = golden["prompts"].as_array().unwrap().iter().find(|p| p["id"] == "pub-chat-short").unwrap();
    let messages = prompt["messages"].as_array().unwrap();
    // The CLI's --chat wraps one user message; use a single-user-message golden if present.
    if messages.len() == 1 {
        let text = messages[0]["content"].as_str().unwrap();
        let run = slmc_json(&["run", gguf.to_str().unwrap(), "--prompt", text, "--chat", "--max-new-tokens", "8"]);
        assert_eq!(as_ids(&run["prompt_ids"]), as_ids(&prompt["input_ids"]));
    }
    // EOS stops generation unless --ignore-eos: pub-text-short's first EOS is at step 29.
    let short = golden["prompts"].as_array().unwrap().iter().find(|p| p["id"] == "pub-text-short").unwrap();
    let run = slmc_json(&[
        "run",
        gguf.to_str().unwrap(),
        "--prompt-ids",
        &ids_arg(&as_ids(&short["input_ids"])),
        "--max-new-tokens",
        "48",
    ]);
    let generated = as_ids(&run["generated_ids"]);
    assert_eq!(generated.len(), 30);
    assert_eq!(*generated.last().unwrap(), 2);
    assert!(run["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    let text = run["text"].as_str().unwrap();
    assert!(text.starts_with(short["generated_text_until_eos"].as_str().unwrap()), "{text:?}");
}
