//! `run --json` scores its answer: each generated token's log-probability and the entropy it
//! was chosen from, and the sequence confidence (the geometric mean of the tokens'
//! probabilities), the same on the interpreter, an ONNX bundle and a GPU bundle, and equal
//! to what `score --decode` gives the same tokens; `--abstain-below` answers with the
//! abstention and exit code 3 below the threshold.

mod common;

use common::*;
use serde_json::Value;

const PROMPT: &str = "5,17,3,88,41,9";

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap_or_else(|| panic!("an array: {v}")).iter().map(|x| x.as_f64().unwrap()).collect()
}

fn run(model: &str) -> Value {
    slmc_json(&["run", model, "--prompt-ids", PROMPT, "--max-new-tokens", "8", "--ignore-eos"])
}

#[test]
fn token_scores_agree_with_score_and_across_executors() {
    let fixture = repo_root().join("fixtures/tiny-llama-sharded");
    let f = fixture.to_str().unwrap();
    let out = scratch("confidence");
    slmc_json(&[
        "compile",
        f,
        "--target",
        "onnx-cpu,webgpu",
        "-o",
        out.to_str().unwrap(),
        "--skip-smoke-check",
        "--context",
        "64",
    ]);
    let reference = run(f);
    let generated = as_ids(&reference["generated_ids"]);
    let logprobs = floats(&reference["token_logprobs"]);
    let entropies = floats(&reference["token_entropies"]);
    assert_eq!((logprobs.len(), entropies.len()), (8, 8));
    let vocab = slmc_json(&["inspect", f])["config"]["vocab_size"].as_u64().unwrap() as f64;
    for (lp, h) in logprobs.iter().zip(&entropies) {
        assert!(*lp <= 0.0 && lp.is_finite(), "{lp}");
        assert!(*h >= -1e-9 && *h <= vocab.ln() + 1e-9, "entropy {h} outside [0, ln {vocab}]");
    }
    let mean = logprobs.iter().sum::<f64>() / logprobs.len() as f64;
    assert!((reference["confidence"].as_f64().unwrap() - mean.exp()).abs() < 1e-12);
    assert_eq!(reference["abstained"], false);
    // score --decode feeds the same tokens one step at a time: the same log-probabilities.
    let ids: Vec<String> = generated.iter().map(|t| t.to_string()).collect();
    let scored = slmc_json(&["score", f, "--prompt-ids", PROMPT, "--continuation-ids", &ids.join(","), "--decode"]);
    let positions = scored["positions"].as_array().unwrap();
    assert_eq!(positions.len(), generated.len());
    for (p, lp) in positions.iter().zip(&logprobs) {
        assert!((p["logprob"].as_f64().unwrap() - lp).abs() < 1e-5, "score {p} vs run {lp}");
    }
    for (target, bound) in [("onnx-cpu", 1e-4), ("webgpu", 1e-3)] {
        let bundle = out.join(target);
        let other = run(bundle.to_str().unwrap());
        assert_eq!(as_ids(&other["generated_ids"]), generated, "{target}");
        for (a, b) in floats(&other["token_logprobs"]).iter().zip(&logprobs) {
            assert!((a - b).abs() < bound, "{target}: log-probability {a} vs the interpreter's {b}");
        }
        for (a, b) in floats(&other["token_entropies"]).iter().zip(&entropies) {
            assert!((a - b).abs() < bound, "{target}: entropy {a} vs the interpreter's {b}");
        }
    }
}

#[test]
fn abstain_below_answers_with_the_abstention_and_exit_code_3() {
    let fixture = repo_root().join("fixtures/tiny-llama-sharded");
    let f = fixture.to_str().unwrap();
    let args = ["run", f, "--prompt-ids", PROMPT, "--max-new-tokens", "8", "--ignore-eos", "--json"];
    let confidence = slmc_json(&args[..7])["confidence"].as_f64().unwrap();
    let with = |threshold: String| {
        let mut a = args.to_vec();
        a.extend(["--abstain-below", &threshold]);
        slmc(&a)
    };
    // Just above the answer's confidence: abstained, exit 3, the abstention in the JSON.
    let out = with(format!("{}", (confidence + 1e-6).min(1.0)));
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["abstained"], true);
    assert!(v["abstention"].as_str().unwrap().contains("enough confidence"));
    // Just below: answered.
    let out = with(format!("{}", confidence - 1e-6));
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["abstained"].clone(), v["abstention"].clone()), (Value::Bool(false), Value::Null));
    // A threshold outside [0, 1] is a usage error.
    let out = with("1.5".into());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("from 0 to 1"));
}
