//! The IR's text form: print -> parse -> print is byte-identical for every model the
//! project runs, and the verifier rejects hand-broken IR naming the node.

mod common;

use common::*;

fn round_trip(model: &str) {
    let printed = slmc_json(&["lower", model, "--emit", "ir"])["text"].as_str().unwrap().to_string();
    let graph = slmc_ir::text::parse(&printed).expect("printed IR parses");
    slmc_ir::verify(&graph).expect("printed IR verifies");
    assert_eq!(slmc_ir::text::print(&graph), printed, "{model}: print -> parse -> print differs");
    // The CLI's `cat` gives the same text back too.
    let dir = scratch(&format!("ir-{}", model.replace(['/', '.'], "_")));
    let file = dir.join("model.slir");
    std::fs::write(&file, &printed).unwrap();
    assert_eq!(slmc_json(&["cat", file.to_str().unwrap()])["text"].as_str().unwrap(), printed);
}

#[test]
fn smollm2_gguf_round_trips() {
    let gguf = smollm2_gguf();
    round_trip(gguf.to_str().unwrap());
}

#[test]
fn smollm2_hf_round_trips() {
    round_trip(converted("f32").to_str().unwrap());
}

#[test]
fn tiny_architectures_round_trip() {
    for name in ["llama-tied-f16", "qwen2-untied-f32"] {
        round_trip(golden_dir().join("arch").join(name).to_str().unwrap());
    }
}

#[test]
fn fixtures_round_trip() {
    for name in ["tiny-mobilellm-shared", "tiny-phi3", "tiny-llama-sharded"] {
        round_trip(repo_root().join("fixtures").join(name).to_str().unwrap());
    }
}

#[test]
fn tied_embeddings_are_one_weight_node() {
    let gguf = smollm2_gguf();
    let text = slmc_json(&["lower", gguf.to_str().unwrap()])["text"].as_str().unwrap().to_string();
    assert_eq!(text.matches("weight \"token_embd.weight\"").count(), 1);
    assert!(text.contains("%logits = linear(%final_norm, %embed.w)"));
    assert!(text.contains("rope(%l0.q_heads, %positions) {theta = 100000.0, rotary_dim = 64, style = interleaved}"));
    assert!(text.contains("kv_append(%l29.k_rope) {layer = 29, kind = key} : f32[p+s, 3, 64]"));
}

#[test]
fn dot_output_is_a_digraph() {
    let model = golden_dir().join("arch").join("qwen2-untied-f32");
    let dot = slmc_json(&["lower", model.to_str().unwrap(), "--emit", "dot"])["text"].as_str().unwrap().to_string();
    assert!(dot.starts_with("digraph") && dot.contains("->") && dot.trim_end().ends_with('}'));
}

const GOOD: &str = r#"graph "broken" {
  %emb = weight "embed" : f32[16, 8]
  %tokens = input "tokens" : i32[s]
  %x = embed(%emb, %tokens) : f32[s, 8]
  %norm.w = weight "norm" : f32[8]
  %y = rms_norm(%x, %norm.w) {eps = 1e-5} : f32[s, 8]
  %z = silu(%y) : f32[s, 8]
  %logits = linear(%z, %emb) : f32[s, 16]
  output "logits" = %logits
}
"#;

fn cat_error(text: &str) -> String {
    let hash = text.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let dir = scratch(&format!("broken-{hash:x}"));
    let file = dir.join("broken.slir");
    std::fs::write(&file, text).unwrap();
    let err = slmc_fails(&["cat", file.to_str().unwrap()]);
    assert!(err.contains(file.to_str().unwrap()), "the error names the file: {err}");
    err
}

#[test]
fn the_good_graph_verifies() {
    let dir = scratch("good-ir");
    let file = dir.join("good.slir");
    std::fs::write(&file, GOOD).unwrap();
    assert_eq!(slmc_json(&["cat", file.to_str().unwrap()])["text"].as_str().unwrap(), GOOD);
}

#[test]
fn verifier_rejects_dangling_value() {
    let err = cat_error(&GOOD.replace("silu(%y)", "silu(%gone)"));
    assert!(err.contains("%z") && err.contains("%gone"), "{err}");
}

#[test]
fn verifier_rejects_shape_mismatch() {
    let err = cat_error(&GOOD.replace("%norm.w = weight \"norm\" : f32[8]", "%norm.w = weight \"norm\" : f32[9]"));
    assert!(err.contains("%y") && err.contains("does not match"), "{err}");
    let err = cat_error(&GOOD.replace("%z = silu(%y) : f32[s, 8]", "%z = silu(%y) : f32[s, 7]"));
    assert!(err.contains("%z") && err.contains("declared type f32[s, 7]"), "{err}");
}

#[test]
fn verifier_rejects_dtype_mismatch() {
    let err = cat_error(&GOOD.replace("%z = silu(%y) : f32[s, 8]", "%z = silu(%y) : f16[s, 8]"));
    assert!(err.contains("%z") && err.contains("f16"), "{err}");
    let err = cat_error(&GOOD.replace("input \"tokens\" : i32[s]", "input \"tokens\" : f32[s]"));
    assert!(err.contains("%x") && err.contains("ids must be i32, found f32"), "{err}");
}

#[test]
fn verifier_rejects_cycle() {
    let err = cat_error(&GOOD.replace("rms_norm(%x, %norm.w)", "rms_norm(%z, %norm.w)"));
    assert!(err.contains("cycle") && (err.contains("%y") || err.contains("%z")), "{err}");
}

#[test]
fn parser_reports_lines() {
    let err = cat_error(&GOOD.replace("{eps = 1e-5}", "{eps = 1e-5, bogus = 3}"));
    assert!(err.contains("line 6") && err.contains("bogus"), "{err}");
    let err = cat_error(&GOOD.replace("f32[16, 8]", "f33[16, 8]"));
    assert!(err.contains("line 2") && err.contains("f33"), "{err}");
}
