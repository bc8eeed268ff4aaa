//! Hostile input: every broken file gives an error naming the file and the problem and
//! exit code 1 (never a panic), and nothing is written on failure.

mod common;

use std::path::Path;

use common::*;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    // Copies of read-only golden files must be writable for the tests to break them.
    for entry in std::fs::read_dir(to).unwrap() {
        let path = entry.unwrap().path();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&path, perms).unwrap();
    }
}

/// A writable copy of the tiny llama golden checkpoint.
fn tiny_copy(test: &str) -> Scratch {
    let dir = scratch(&format!("hostile-{test}")).into_sub("model");
    copy_dir(&golden_dir().join("arch").join("llama-tied-f16"), &dir);
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut cfg = read_json(&path);
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

fn expect_error(args: &[&str], file: &Path, problem: &str) {
    let err = slmc_fails(args);
    assert!(err.contains(file.to_str().unwrap()), "error should name {}: {err}", file.display());
    assert!(err.contains(problem), "error should say {problem:?}: {err}");
}

#[test]
fn truncated_safetensors() {
    let dir = tiny_copy("truncated");
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(&["inspect", dir.to_str().unwrap()], &st, "not a valid safetensors file");
}

#[test]
fn safetensors_header_length_past_end_of_file() {
    let dir = tiny_copy("header-len");
    let st = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let lie = (bytes.len() as u64 * 4).to_le_bytes();
    bytes[..8].copy_from_slice(&lie);
    std::fs::write(&st, &bytes).unwrap();
    expect_error(&["run", dir.to_str().unwrap(), "--prompt-ids", "1,2"], &st, "not a valid safetensors file");
}

#[test]
fn safetensors_unknown_dtype() {
    let dir = tiny_copy("dtype");
    let st = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    // Same length, so every offset stays valid: only the dtype is a lie.
    let header = header.replacen("\"F16\"", "\"Q9X\"", 1);
    bytes[8..8 + header_len].copy_from_slice(header.as_bytes());
    std::fs::write(&st, &bytes).unwrap();
    expect_error(&["inspect", dir.to_str().unwrap()], &st, "Q9X");
}

/// `inspect` checks the config against the weights instead of reporting a model that
/// cannot run.
#[test]
fn inspect_refuses_a_config_that_disagrees_with_the_weights() {
    let dir = tiny_copy("inspect-layers");
    let layers = read_json(&dir.join("config.json"))["num_hidden_layers"].as_u64().unwrap();
    edit_config(&dir, |c| c["num_hidden_layers"] = (layers + 1).into());
    let err = slmc_fails(&["inspect", dir.to_str().unwrap()]);
    assert!(err.contains(&format!("model.layers.{layers}.")) && err.contains("missing tensor"), "{err}");
    let dir = tiny_copy("inspect-vocab");
    let vocab = read_json(&dir.join("config.json"))["vocab_size"].as_u64().unwrap();
    edit_config(&dir, |c| c["vocab_size"] = (vocab + 7).into());
    let err = slmc_fails(&["inspect", dir.to_str().unwrap()]);
    assert!(err.contains("model.embed_tokens.weight") && err.contains(&format!("{}", vocab + 7)), "{err}");
}

#[test]
fn tensor_shape_contradicts_config() {
    let dir = tiny_copy("shape");
    edit_config(&dir, |c| c["intermediate_size"] = 128.into());
    expect_error(
        &["run", dir.to_str().unwrap(), "--prompt-ids", "1,2"],
        &dir.join("model.safetensors"),
        "has shape [160, 64] but config.json implies [128, 64]",
    );
}

/// A layer count sizes per-layer tables before any weight is read: an absurd one is
/// refused, not allocated (4,294,967,295 layers used to fill 4 GiB).
#[test]
fn implausible_layer_counts() {
    let dir = tiny_copy("layer-count");
    for n in [4097u64, u32::MAX as u64] {
        edit_config(&dir, |c| c["num_hidden_layers"] = serde_json::json!(n));
        expect_error(&["inspect", dir.to_str().unwrap()], &dir.join("config.json"), "layers is not a plausible model");
    }
}

#[test]
fn missing_config_keys() {
    let dir = tiny_copy("missing-key");
    edit_config(&dir, |c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    expect_error(&["inspect", dir.to_str().unwrap()], &dir.join("config.json"), "missing required key `hidden_size`");
}

#[test]
fn unsupported_architecture() {
    let dir = tiny_copy("arch");
    edit_config(&dir, |c| c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]));
    expect_error(
        &["inspect", dir.to_str().unwrap()],
        &dir.join("config.json"),
        "unsupported architecture `GPTNeoXForCausalLM`",
    );
}

/// LongRoPE keys lying or out of range (Phi-4-mini's shape): each an error naming
/// config.json and the problem, before anything is lowered.
#[test]
fn longrope_config_keys_checked() {
    let cases: [(&str, fn(&mut serde_json::Value), &str); 6] = [
        (
            "short-length",
            |c| c["rope_parameters"]["short_factor"].as_array_mut().unwrap().truncate(3),
            "longrope short_factor has 3 entries; rotary_dim 48 needs 24",
        ),
        (
            "long-missing",
            |c| drop(c["rope_parameters"]["long_factor"].take()),
            "needs `long_factor` (a list of numbers)",
        ),
        (
            "not-a-number",
            |c| c["rope_parameters"]["long_factor"][2] = serde_json::json!("x"),
            "`long_factor` holds \"x\"",
        ),
        ("negative", |c| c["rope_parameters"]["short_factor"][0] = serde_json::json!(-1.0), "positive and finite"),
        (
            "original",
            |c| {
                c["rope_parameters"]["original_max_position_embeddings"].take();
                c["original_max_position_embeddings"] = serde_json::json!(0);
            },
            "`original_max_position_embeddings` must be a positive integer, found 0",
        ),
        (
            "type",
            |c| c["rope_parameters"]["rope_type"] = serde_json::json!("yarn"),
            "rope scaling type `yarn` is not supported",
        ),
    ];
    for (name, edit, problem) in cases {
        let dir = scratch(&format!("hostile-longrope-{name}")).into_sub("model");
        copy_dir(&repo_root().join("fixtures/arch/phi4-mini-longrope-f32"), &dir);
        edit_config(&dir, edit);
        expect_error(&["inspect", dir.to_str().unwrap()], &dir.join("config.json"), problem);
    }
}

/// Gemma's config keys lying or out of range: each an error naming config.json and the key.
#[test]
fn gemma_config_keys_checked() {
    let cases: [(&str, fn(&mut serde_json::Value), &str); 5] = [
        ("layer-count", |c| c["layer_types"] = serde_json::json!(["sliding_attention"]), "`layer_types` has 1 entries"),
        ("layer-kind", |c| c["layer_types"][0] = serde_json::json!("local"), "unknown layer type"),
        ("window", |c| c["sliding_window"] = serde_json::json!(0), "`sliding_window` must be a positive integer"),
        ("scalar", |c| c["query_pre_attn_scalar"] = serde_json::json!(-4), "`query_pre_attn_scalar` must be positive"),
        ("activation", |c| c["hidden_activation"] = serde_json::json!("relu"), "activation `relu` is not supported"),
    ];
    for (name, edit, problem) in cases {
        let dir = scratch(&format!("hostile-gemma-{name}")).into_sub("model");
        copy_dir(&golden_dir().join("arch").join("gemma3-tied-f32"), &dir);
        edit_config(&dir, edit);
        expect_error(&["inspect", dir.to_str().unwrap()], &dir.join("config.json"), problem);
    }
}

#[test]
fn nan_weights_are_reported_with_the_node() {
    let dir = tiny_copy("nan");
    let st = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let start = header["model.norm.weight"]["data_offsets"][0].as_u64().unwrap() as usize + 8 + header_len;
    bytes[start..start + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    std::fs::write(&st, &bytes).unwrap();
    let err = slmc_fails(&["run", dir.to_str().unwrap(), "--prompt-ids", "1,2"]);
    assert!(err.contains("%final_norm: produced NaN"), "{err}");
}

#[test]
fn token_id_outside_the_vocabulary() {
    let model = golden_dir().join("arch").join("llama-tied-f16");
    let err = slmc_fails(&["run", model.to_str().unwrap(), "--prompt-ids", "1,999"]);
    assert!(err.contains("token id 999") && err.contains("256 rows"), "{err}");
}

/// `quality --prompts` with a continuation id past the vocabulary: a clear error naming
/// the file, not a panic.
#[test]
fn quality_prompts_outside_the_vocabulary() {
    let model = golden_dir().join("arch").join("llama-tied-f16");
    let dir = scratch("hostile-quality-prompts");
    let prompts = dir.join("prompts.json");
    std::fs::write(&prompts, r#"{"prompts": [{"input_ids": [1, 2], "generated_ids": [3, 100000]}]}"#).unwrap();
    let err = slmc_fails(&["quality", model.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()]);
    assert!(err.contains("prompts.json") && err.contains("token id 100000"), "{err}");
}

/// A minimal GGUF v3 writer for hand-made hostile files.
struct GgufBuilder(Vec<u8>);

impl GgufBuilder {
    fn new(tensor_count: u64, kv_count: u64) -> Self {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(tensor_count.to_le_bytes());
        b.extend(kv_count.to_le_bytes());
        GgufBuilder(b)
    }
    fn string(&mut self, s: &str) {
        self.0.extend((s.len() as u64).to_le_bytes());
        self.0.extend(s.as_bytes());
    }
    fn kv_str(&mut self, key: &str, value: &str) {
        self.string(key);
        self.0.extend(8u32.to_le_bytes());
        self.string(value);
    }
    fn tensor(&mut self, name: &str, ne: &[u64], ggml_type: u32, offset: u64) {
        self.string(name);
        self.0.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            self.0.extend(d.to_le_bytes());
        }
        self.0.extend(ggml_type.to_le_bytes());
        self.0.extend(offset.to_le_bytes());
    }
    fn write(mut self, path: &Path, data_bytes: usize) {
        while !self.0.len().is_multiple_of(32) {
            self.0.push(0);
        }
        self.0.extend(vec![0u8; data_bytes]);
        std::fs::write(path, &self.0).unwrap();
    }
}

#[test]
fn gguf_bad_magic() {
    let path = scratch("gguf-magic").into_sub("bad.gguf");
    std::fs::write(&path, b"GGML\x03\0\0\0garbage garbage garbage").unwrap();
    expect_error(&["inspect", path.to_str().unwrap()], &path, "bad magic");
}

#[test]
fn gguf_absurd_tensor_count() {
    let path = scratch("gguf-count").into_sub("absurd.gguf");
    let mut b = GgufBuilder::new(1 << 40, 1);
    b.kv_str("general.architecture", "llama");
    b.write(&path, 64);
    expect_error(&["inspect", path.to_str().unwrap()], &path, "tensor count 1099511627776 is absurd");
}

#[test]
fn gguf_absurd_string_length() {
    let path = scratch("gguf-string").into_sub("string.gguf");
    let mut b = GgufBuilder::new(0, 1);
    b.0.extend((u64::MAX / 2).to_le_bytes());
    b.write(&path, 256);
    expect_error(&["inspect", path.to_str().unwrap()], &path, "claims");
}

/// Metadata arrays whose total element count would cost gigabytes once decoded (each
/// element ~32 bytes however small in the file) are refused, even when the file holds them.
#[test]
fn gguf_metadata_arrays_bounded_in_total() {
    let path = scratch("gguf-array-amplification").into_sub("arrays.gguf");
    let n: u64 = 9 << 20;
    let mut b = GgufBuilder::new(0, 2);
    b.kv_str("general.architecture", "llama");
    b.string("tokenizer.ggml.token_type");
    b.0.extend(9u32.to_le_bytes()); // array
    b.0.extend(0u32.to_le_bytes()); // of u8
    b.0.extend(n.to_le_bytes());
    b.0.extend(std::iter::repeat_n(1u8, n as usize));
    b.write(&path, 64);
    expect_error(&["inspect", path.to_str().unwrap()], &path, "elements in all");
}

#[test]
fn gguf_tensor_offset_past_end_of_file() {
    let path = scratch("gguf-offset").into_sub("offset.gguf");
    let mut b = GgufBuilder::new(1, 1);
    b.kv_str("general.architecture", "llama");
    b.tensor("token_embd.weight", &[8, 4], 0, 4096);
    b.write(&path, 128);
    expect_error(&["inspect", path.to_str().unwrap()], &path, "runs past the end of the file");
}

#[test]
fn truncated_real_gguf() {
    let gguf = smollm2_gguf();
    let bytes = std::fs::read(&gguf).unwrap();
    let path = scratch("gguf-truncated").into_sub("truncated.gguf");
    std::fs::write(&path, &bytes[..8 << 20]).unwrap();
    expect_error(&["run", path.to_str().unwrap(), "--prompt-ids", "1"], &path, "runs past the end of the file");
    std::fs::write(&path, &bytes[..100_000]).unwrap();
    expect_error(&["inspect", path.to_str().unwrap()], &path, "array of 49152 elements does not fit");
}

#[test]
fn failed_convert_leaves_no_output_directory() {
    let parent = scratch("convert-fail");
    let out = parent.join("out");
    let model = golden_dir().join("arch").join("llama-tied-f16");
    let err = slmc_fails(&["convert", model.to_str().unwrap(), "--to", "hf", out.to_str().unwrap()]);
    assert!(err.contains("reads a GGUF file"), "{err}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(&parent).unwrap().count(), 0, "no temporary directory is left behind");

    // An existing directory is never replaced without --force.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    let gguf = smollm2_gguf();
    let err = slmc_fails(&["convert", gguf.to_str().unwrap(), "--to", "hf", out.to_str().unwrap()]);
    assert!(err.contains("already exists"), "{err}");
    assert!(out.join("keep").exists());
}

#[test]
fn json_errors_are_machine_readable() {
    let path = scratch("json-error").into_sub("missing.gguf");
    let out = slmc(&["inspect", path.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("missing.gguf"));
}
