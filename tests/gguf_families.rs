//! GGUF files of the families slmc reads from llama.cpp's converter without a real file
//! here: each test writes the GGUF llama.cpp's `convert_hf_to_gguf.py` writes for a Hugging
//! Face checkpoint (its architecture string, metadata keys and tensor names, as read in
//! llama.cpp's converter and gguf-py), and slmc must read both the same way.
//!
//! * OLMo 2 (`olmo2`): no pre-norms, `post_attention_norm` / `post_ffw_norm`, q/k norms
//!   over the whole projection, q/k rows not permuted (llama.cpp rotates NEOX-style).
//! * Phi-4-mini-shaped Phi-3 with LongRoPE (`phi3`): fused `attn_qkv` and `ffn_up`
//!   (gate and up, 2 x ffn rows), `rope.dimension_count` of the partial rotary,
//!   `rope_factors_short/long.weight`, `rope.scaling.original_context_length` and
//!   `rope.scaling.attn_factor`; checked against transformers' goldens.

mod common;

use std::path::Path;

use common::*;
use slmc_fixtures::gguf::{read_safetensors_f32, write_gguf, GgufTensor, MetaValue};

/// The Hugging Face tensor names llama.cpp's converter renames, per block and global.
fn gguf_name(hf: &str) -> String {
    let global = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = global.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap_or_else(|| panic!("unexpected tensor {hf}"));
    let (block, part) = rest.split_once('.').unwrap();
    let part = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.qkv_proj.weight" => "attn_qkv.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.gate_up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
        other => panic!("unexpected tensor part {other}"),
    };
    format!("blk.{block}.{part}")
}

/// Writes `dir`'s checkpoint as a GGUF of `arch` (metadata keys under `arch.`);
/// `post_attention_layernorm` is
/// `post_attention_norm` for OLMo 2 (a norm after attention) and `ffn_norm` otherwise.
fn convert(dir: &Path, out: &Path, arch: &str, metadata: Vec<(&str, MetaValue)>, extra: Vec<GgufTensor>) {
    let mut tensors = read_safetensors_f32(&dir.join("model.safetensors")).unwrap();
    for t in &mut tensors {
        t.name = match t.name.strip_suffix("post_attention_layernorm.weight") {
            Some(prefix) => {
                let block = prefix.trim_start_matches("model.layers.").trim_end_matches('.');
                let norm = if arch == "olmo2" { "post_attention_norm" } else { "ffn_norm" };
                format!("blk.{block}.{norm}.weight")
            }
            None => gguf_name(&t.name),
        };
    }
    tensors.extend(extra);
    let mut keyed = vec![("general.architecture".to_string(), MetaValue::Str(arch.into()))];
    keyed.extend(metadata.into_iter().map(|(k, v)| (format!("{arch}.{k}"), v)));
    write_gguf(out, &keyed, &tensors).unwrap();
}

/// The final-position logits and greedy tokens of `run` on a prompt of ids.
fn run_ids(model: &Path, ids: &[u64], new: usize) -> (Vec<f64>, Vec<u64>) {
    let model = model.to_str().unwrap();
    let (ids, n) = (ids_arg(ids), new.to_string());
    let run = slmc_json(&[
        "run",
        model,
        "--prompt-ids",
        &ids,
        "--max-new-tokens",
        &n,
        "--ignore-eos",
        "--record-logits",
        "1",
        "--record-top-k",
        "100000",
    ]);
    let top = run["recorded_logits"][0]["top"].as_array().unwrap();
    let mut logits = vec![f64::NAN; top.len()];
    for t in top {
        logits[t["id"].as_u64().unwrap() as usize] = t["logit"].as_f64().unwrap();
    }
    assert!(logits.iter().all(|v| v.is_finite()), "{model}: every logit recorded");
    (logits, as_ids(&run["generated_ids"]))
}

#[test]
fn olmo2_gguf_reads_as_its_hugging_face_checkpoint() {
    let root = scratch("gguf-olmo2");
    for seed in [9u64, 22] {
        let mut spec = slmc_fixtures::RandomSpec::from_seed(seed);
        spec.family = slmc_fixtures::Family::Olmo2;
        let hf = root.join(format!("hf-{seed}"));
        slmc_fixtures::generate_random(&hf, &spec).unwrap();
        let config = read_json(&hf.join("config.json"));
        let a = "olmo2";
        let u = |v: usize| MetaValue::U32(v as u32);
        let metadata = vec![
            ("block_count", u(spec.layers)),
            ("context_length", u(spec.context)),
            ("embedding_length", u(spec.hidden)),
            ("feed_forward_length", u(spec.ffn)),
            ("attention.head_count", u(spec.heads)),
            ("attention.head_count_kv", u(spec.kv_heads)),
            ("attention.key_length", u(spec.head_dim)),
            ("attention.value_length", u(spec.head_dim)),
            (
                "rope.freq_base",
                MetaValue::F32(
                    config["rope_theta"].as_f64().or(config["rope_parameters"]["rope_theta"].as_f64()).unwrap() as f32,
                ),
            ),
            ("attention.layer_norm_rms_epsilon", MetaValue::F32(config["rms_norm_eps"].as_f64().unwrap() as f32)),
        ];
        let gguf = root.join(format!("olmo2-{seed}.gguf"));
        convert(&hf, &gguf, a, metadata, vec![]);
        let inspect = slmc_json(&["inspect", gguf.to_str().unwrap()]);
        assert_eq!(inspect["config"]["architecture"], "olmo2", "{inspect}");
        let prompt: Vec<u64> = (0..9).map(|i| (i * 37 + seed) % spec.vocab as u64).collect();
        let (hf_logits, hf_greedy) = run_ids(&hf, &prompt, 6);
        let (gguf_logits, gguf_greedy) = run_ids(&gguf, &prompt, 6);
        let err = hf_logits.iter().zip(&gguf_logits).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err <= 1e-5, "seed {seed}: GGUF and Hugging Face logits differ by {err}");
        assert_eq!(hf_greedy, gguf_greedy, "seed {seed}");
    }
}

#[test]
fn phi3_longrope_gguf_reproduces_transformers() {
    let dir = repo_root().join("fixtures/arch/phi4-mini-longrope-f32");
    let config = read_json(&dir.join("config.json"));
    let golden = read_json(&dir.join("golden.json"));
    let rope = &config["rope_parameters"];
    let list =
        |k: &str| -> Vec<f32> { rope[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect() };
    let metadata = metadata_of(&config);
    let factors = |name: &str, k: &str| GgufTensor { name: name.into(), shape: vec![list(k).len()], data: list(k) };
    let extra =
        vec![factors("rope_factors_long.weight", "long_factor"), factors("rope_factors_short.weight", "short_factor")];
    let root = scratch("gguf-phi3");
    // Half a LongRoPE pair, or a factor list of the wrong length, is refused by name.
    let lying = root.join("lying.gguf");
    let long_only = vec![factors("rope_factors_long.weight", "long_factor")];
    convert(&dir, &lying, "phi3", metadata_of(&config), long_only);
    let err = slmc_fails(&["inspect", lying.to_str().unwrap()]);
    assert!(
        err.contains("lying.gguf") && err.contains("rope_factors_short.weight with rope_factors_long.weight"),
        "{err}"
    );
    let mut short = factors("rope_factors_short.weight", "short_factor");
    short.data.pop();
    short.shape = vec![short.data.len()];
    convert(
        &dir,
        &lying,
        "phi3",
        metadata_of(&config),
        vec![factors("rope_factors_long.weight", "long_factor"), short],
    );
    let err = slmc_fails(&["inspect", lying.to_str().unwrap()]);
    assert!(err.contains("rope_factors_short.weight must be f32 with 24 entries"), "{err}");
    let gguf = root.join("phi4-mini-longrope.gguf");
    convert(&dir, &gguf, "phi3", metadata, extra);
    let features = slmc_json(&["inspect", gguf.to_str().unwrap()])["config"]["features"].to_string();
    assert!(features.contains("LongRoPE (short factors up to 32 positions"), "{features}");
    // Every golden case, the one whose greedy steps pass the original length included.
    for case in golden["cases"].as_array().unwrap() {
        let input = as_ids(&case["input_ids"]);
        let greedy = as_ids(&case["greedy_ids"]);
        let (logits, generated) = run_ids(&gguf, &input, greedy.len());
        let expected: Vec<f64> =
            case["final_position_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(logits.len(), expected.len());
        let err = logits.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err <= 1e-4, "len {}: max logit error {err}", input.len());
        assert_eq!(generated, greedy, "len {}", input.len());
    }
}

/// The phi3 metadata llama.cpp's converter writes for a Phi-3 config with LongRoPE.
fn metadata_of(config: &serde_json::Value) -> Vec<(&'static str, MetaValue)> {
    let rope = &config["rope_parameters"];
    let u = |k: &str| MetaValue::U32(config[k].as_u64().unwrap() as u32);
    let (hidden, heads) = (config["hidden_size"].as_u64().unwrap(), config["num_attention_heads"].as_u64().unwrap());
    let original = config["original_max_position_embeddings"].as_f64().unwrap();
    let scale = config["max_position_embeddings"].as_f64().unwrap() / original;
    // llama.cpp: rope_dims = int(partial_rotary_factor * n_embd) // n_head, and the
    // attention factor of su/longrope scaling.
    let rope_dims = (rope["partial_rotary_factor"].as_f64().unwrap() * hidden as f64) as u64 / heads;
    let attn_factor = if scale > 1.0 { (1.0 + scale.ln() / original.ln()).sqrt() } else { 1.0 };
    vec![
        ("context_length", u("max_position_embeddings")),
        ("embedding_length", u("hidden_size")),
        ("feed_forward_length", u("intermediate_size")),
        ("block_count", u("num_hidden_layers")),
        ("attention.head_count", u("num_attention_heads")),
        ("attention.head_count_kv", u("num_key_value_heads")),
        ("attention.layer_norm_rms_epsilon", MetaValue::F32(config["rms_norm_eps"].as_f64().unwrap() as f32)),
        ("rope.dimension_count", MetaValue::U32(rope_dims as u32)),
        ("rope.freq_base", MetaValue::F32(rope["rope_theta"].as_f64().unwrap() as f32)),
        ("rope.scaling.original_context_length", MetaValue::U32(original as u32)),
        ("rope.scaling.attn_factor", MetaValue::F32(attn_factor as f32)),
    ]
}
