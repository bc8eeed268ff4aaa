//! The release gate: an eval set (JSON Lines) compiled into SmolLM2 bundles, run on the
//! unquantized model and on each bundle's executor; a damaged quantization fails the gate
//! with the regressed items named and no bundle written; `slmc eval` lists every item; a
//! tampered eval set in a signed bundle is refused; broken eval files are named by line.
//! The items are taken from the demo set in fixtures/eval (README: its figures in full).

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// Items of the demo set that the unquantized SmolLM2 answers right (measured), so a
/// damaged quantization has something to lose.
const ITEMS: &[&str] = &["days-to-return", "refund-cite", "restocking-fee", "where", "ceo"];

fn subset(dir: &Path) -> std::path::PathBuf {
    let demo = std::fs::read_to_string(repo_root().join("fixtures/eval/smollm2-returns-policy.jsonl")).unwrap();
    let lines: Vec<&str> = demo
        .lines()
        .filter(|l| ITEMS.iter().any(|id| serde_json::from_str::<Value>(l).unwrap()["id"] == *id))
        .collect();
    assert_eq!(lines.len(), ITEMS.len());
    let path = dir.join("eval.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn the_gate_passes_the_stored_weights_and_stops_a_damaged_quantization() {
    let dir = scratch("evalset-gate");
    let set = subset(&dir);
    let gguf = smollm2_gguf();
    let (g, s) = (gguf.to_str().unwrap(), set.to_str().unwrap());
    let out = dir.join("ok");
    let report = dir.join("compile.html");
    let r = report.to_str().unwrap();
    slmc_json(&[
        "compile",
        g,
        "--target",
        "onnx-cpu",
        "-o",
        out.to_str().unwrap(),
        "--eval-set",
        s,
        "--no-cache",
        "--report",
        r,
    ]);
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.contains("Eval set (the release gate)"), "the compile report shows the gate");
    let bundle = out.join("onnx-cpu");
    let manifest = read_json(&bundle.join("manifest.json"));
    let eval = &manifest["eval"];
    assert_eq!(eval["items"], ITEMS.len());
    assert_eq!(eval["max_drop"], 3.0);
    assert!(eval["accuracy"].as_f64().unwrap() >= eval["base_accuracy"].as_f64().unwrap() - 3.0, "{eval}");
    assert!(eval["base_accuracy"].as_f64().unwrap() >= 60.0, "the chosen items pass unquantized: {eval}");
    let files = manifest["files"].as_array().unwrap();
    assert!(files.iter().any(|f| f["path"] == "eval_set.json"), "the eval set is covered by the manifest");
    // slmc eval runs the stored set on the bundle's executor: every item, totals per tag.
    let report = slmc_json(&["eval", bundle.to_str().unwrap()]);
    let items = report["items"].as_array().unwrap();
    assert_eq!(items.len(), ITEMS.len());
    for (item, id) in items.iter().zip(ITEMS) {
        assert_eq!(item["id"], *id);
        assert!(item["answer"].is_string() && item["passed"].is_boolean() && item["tags"].is_array());
        let c = item["confidence"].as_f64().unwrap();
        assert!(c > 0.0 && c <= 1.0, "{item}");
    }
    let passed = items.iter().filter(|i| i["passed"] == true).count();
    assert_eq!(report["totals"]["passed"], passed);
    assert_eq!(report["totals"]["by_tag"]["must-decline"]["total"], 1);
    assert_eq!(f64::from(passed as u32) * 100.0 / ITEMS.len() as f64, eval["accuracy"].as_f64().unwrap());

    // Calibration: the cut that best separates right answers from wrong ones is never worse
    // than not abstaining, and its counts add up.
    let c = slmc_json(&["eval", bundle.to_str().unwrap(), "--calibrate"])["calibration"].clone();
    let n = |k: &str| c[k].as_u64().unwrap();
    assert_eq!(n("right_answered") + n("right_withheld") + n("wrong_answered") + n("wrong_withheld"), n("items"));
    assert_eq!(n("separated"), n("right_answered") + n("wrong_withheld"));
    assert_eq!(n("separated_never_abstaining") as usize, passed);
    assert!(n("separated") >= n("separated_never_abstaining"));
    assert!((0.0..=1.0).contains(&c["threshold"].as_f64().unwrap()), "{c}");

    // Symmetric 4-bit groups of 64 by rounding: the gate names what regressed, writes nothing.
    let damaged = dir.join("damaged");
    let d = damaged.to_str().unwrap();
    let err = slmc_fails(&[
        "compile",
        g,
        "--target",
        "onnx-cpu",
        "-o",
        d,
        "--eval-set",
        s,
        "--quant",
        "q4g64-sym",
        "--no-cache",
    ]);
    assert!(err.contains("eval gate") && err.contains("regressed items:"), "{err}");
    assert!(ITEMS.iter().any(|id| err.contains(id)), "{err}");
    assert!(!damaged.join("onnx-cpu").exists(), "no bundle is written");

    // Let through by a wide limit, the same quantization installs only where no version is
    // better: the store keeps each version's results and refuses a regression.
    let store = dir.join("store");
    let st = store.to_str().unwrap();
    let install = slmc_json(&["install", bundle.to_str().unwrap(), "--store", st]);
    assert_eq!(install["smoke"]["items"].as_array().unwrap().len(), ITEMS.len());
    let wide = dir.join("wide");
    let w = wide.to_str().unwrap();
    let args = ["compile", g, "--target", "onnx-cpu", "-o", w, "--eval-set", s, "--quant", "q4g64-sym"];
    slmc_json(&[&args[..], &["--no-cache", "--max-eval-drop", "100"]].concat());
    let regressed = read_json(&wide.join("onnx-cpu").join("manifest.json"))["eval"]["regressed"].clone();
    assert!(!regressed.as_array().unwrap().is_empty(), "{regressed}");
    let err = slmc_fails(&["install", wide.join("onnx-cpu").to_str().unwrap(), "--store", st]);
    assert!(err.contains("regresses against the installed version") && err.contains("store is unchanged"), "{err}");
    for id in regressed.as_array().unwrap() {
        assert!(err.contains(id.as_str().unwrap()), "{id} not named: {err}");
    }
    let current = std::fs::read_link(store.join("current")).unwrap();
    assert_eq!(current.file_name().unwrap().to_str().unwrap(), install["installed"].as_str().unwrap());

    // A signed bundle whose eval set was edited is refused.
    let key = dir.join("key");
    slmc_json(&["keygen", "--out", key.to_str().unwrap()]);
    slmc_json(&["sign", bundle.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    let stored = bundle.join("eval_set.json");
    let text = std::fs::read_to_string(&stored).unwrap();
    std::fs::write(&stored, text.replacen("\"abstain\": true", "\"abstain\": false", 1)).unwrap();
    let pubkey = format!("{}.pub", key.display());
    let err = slmc_strict_fails(&["eval", bundle.to_str().unwrap(), "--pubkey", &pubkey]);
    assert!(err.contains("eval_set.json"), "{err}");
}

#[test]
fn broken_eval_sets_are_named_by_file_and_line() {
    let dir = scratch("evalset-broken");
    let gguf = smollm2_gguf();
    let item = r#"{"id": "a", "prompt": "Hi", "accept": [{"contains": "x"}]}"#;
    let cases = [
        ("not json", "{oops", "not an eval item"),
        ("both", r#"{"id": "b", "prompt": "Hi", "accept": [{"contains": "x"}], "abstain": true}"#, "not both"),
        ("neither", r#"{"id": "b", "prompt": "Hi"}"#, "needs `accept`"),
        ("duplicate", item, "unique"),
        ("regex", r#"{"id": "b", "prompt": "Hi", "accept": [{"regex": "("}]}"#, "regex"),
        ("role", r#"{"id": "b", "messages": [{"role": "robot", "content": "Hi"}], "abstain": true}"#, "unknown role"),
        ("tokens", r#"{"id": "b", "prompt": "Hi", "abstain": true, "max_new_tokens": 0}"#, "max_new_tokens"),
        ("unknown field", r#"{"id": "b", "prompt": "Hi", "abstain": true, "answer": "x"}"#, "unknown field"),
    ];
    for (name, line, expected) in cases {
        let file = dir.join(format!("{}.jsonl", name.replace(' ', "-")));
        let text = if name == "not json" { line.to_string() } else { format!("{item}\n{line}\n") };
        std::fs::write(&file, text).unwrap();
        let out = dir.join(name.replace(' ', "-"));
        let err = slmc_fails(&[
            "compile",
            gguf.to_str().unwrap(),
            "--target",
            "onnx-cpu",
            "-o",
            out.to_str().unwrap(),
            "--eval-set",
            file.to_str().unwrap(),
            "--skip-smoke-check",
            "--no-cache",
        ]);
        let line_no = if name == "not json" { ":1:" } else { ":2:" };
        assert!(err.contains(file.to_str().unwrap()) && err.contains(line_no), "{name}: {err}");
        assert!(err.contains(expected), "{name}: {err}");
        assert!(!out.exists(), "{name}: nothing written");
    }
}
