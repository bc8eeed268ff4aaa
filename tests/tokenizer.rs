//! The golden tokenizer strings (`../shared/golden/smollm2-tokenizer.json`) through the
//! GGUF's embedded tokenizer and through the `tokenizer.json` that `slmc convert` writes:
//! the same ids as transformers and llama.cpp, and decoding gives the text back.

mod common;

use common::*;

fn check(model_path: &std::path::Path) {
    check_against(model_path, "smollm2-tokenizer.json");
}

fn check_against(model_path: &std::path::Path, golden_file: &str) {
    let golden = read_json(&golden_dir().join(golden_file));
    let model = slmc_compiler::import::load(model_path).unwrap();
    let tok = model.tokenizer.as_ref().expect("the model has a tokenizer");
    for case in golden["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let enc = tok.encode(text, false).unwrap();
        let ids: Vec<u64> = enc.get_ids().iter().map(|i| *i as u64).collect();
        assert_eq!(ids, as_ids(&case["ids"]), "case {} {:?}", case["index"], text);
        let decoded = tok.decode(enc.get_ids(), false).unwrap();
        assert_eq!(decoded, case["decoded"].as_str().unwrap(), "case {} decode", case["index"]);
        assert_eq!(decoded, text, "case {} round trip", case["index"]);
        if let Some(with_bos) = case.get("ids_with_special_tokens_added") {
            let enc = tok.encode(text, true).unwrap();
            let ids: Vec<u64> = enc.get_ids().iter().map(|i| *i as u64).collect();
            assert_eq!(ids, as_ids(with_bos), "case {} with special tokens", case["index"]);
        }
    }
}

/// Gemma 3's SentencePiece-style vocabulary (BPE by token order, byte fallback, BOS added).
#[test]
fn gemma3_gguf_tokenizer_matches_golden() {
    check_against(&gemma3_gguf(), "gemma3-tokenizer.json");
}

#[test]
fn gguf_embedded_tokenizer_matches_golden() {
    check(&smollm2_gguf());
}

#[test]
fn converted_tokenizer_json_matches_golden() {
    check(&converted("f32"));
}

#[test]
fn cli_tokenize_reports_ids_and_round_trip() {
    let gguf = smollm2_gguf();
    let out =
        slmc_json(&["tokenize", gguf.to_str().unwrap(), "--text", "Hello world 123", "--text", "<|im_start|>user"]);
    let first = &out[0];
    assert_eq!(first["decoded"], "Hello world 123");
    assert_eq!(as_ids(&out[1]["ids"])[0], 1, "<|im_start|> is parsed to its id");
}

/// A tokenizer.json asking for padding or truncation is used without them: generation never
/// pads, and `padding: {"strategy": {"Fixed": N}}` would size every encoding by the file.
#[test]
fn padding_and_truncation_from_the_file_are_switched_off() {
    // A small byte-level BPE tokenizer.json: the fuzz seed's first part.
    let path = repo_root().join("fuzz/corpus/tokenizer_files/bytelevel-bpe-chatml.bin");
    let seed = std::fs::read(&path).unwrap();
    let json_part = seed.split(|b| *b == 0).next().unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(json_part).unwrap();
    json["padding"] = serde_json::json!({
        "strategy": {"Fixed": 100_000_000u64}, "direction": "Right", "pad_to_multiple_of": null,
        "pad_id": 0, "pad_type_id": 0, "pad_token": "a"
    });
    json["truncation"] =
        serde_json::json!({"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 0});
    let bytes = serde_json::to_vec(&json).unwrap();
    let tok = slmc_compiler::import::tokenizer::tokenizer_from_json(&bytes, &path).unwrap();
    let ids = tok.encode("hello world, hello", false).unwrap().get_ids().to_vec();
    assert!(ids.len() > 1 && ids.len() < 32, "{ids:?}");
}
