//! `genai_config.json` for ONNX artifacts (onnxruntime-genai reads the artifact directory as it is).

use anyhow::Result;

use crate::import::Model;

/// `genai_config.json` so onnxruntime-genai loads the artifact directory as it is (the
/// tokenizer files sit beside it). Greedy search by default, the artifact's context as the
/// maximum length, and shared past/present buffers when every layer's attention is
/// GroupQueryAttention (it appends in place; without sharing, every step copies the whole
/// cache into a new present tensor: 1.2x decode on SmolLM2's fastest configuration).
pub fn genai_config(
    model: &Model,
    manifest: &slmc_targets::artifact::OnnxArtifact,
    info: &slmc_backends::onnx::OnnxModelInfo,
) -> Result<Vec<u8>> {
    let c = &model.config;
    let model_type = match c.arch {
        crate::import::config::Arch::Llama => "llama",
        crate::import::config::Arch::Qwen2 => "qwen2",
        crate::import::config::Arch::Phi3 => "phi3",
        crate::import::config::Arch::Qwen3 => "qwen3",
        crate::import::config::Arch::Gemma2 => "gemma2",
        crate::import::config::Arch::Gemma3 => "gemma3_text",
        crate::import::config::Arch::StableLm => "stablelm",
        crate::import::config::Arch::Olmo2 => "olmo2",
        crate::import::config::Arch::SmolLm3 => "smollm3",
    };
    let eos = &manifest.model.eos_token_ids;
    let config = serde_json::json!({
        "model": {
            "type": model_type,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": eos.first(),
            "vocab_size": manifest.model.vocab_size,
            "context_length": manifest.model.context_len,
            "decoder": {
                "filename": slmc_targets::artifact::ONNX_MODEL_FILE,
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "provider_options": [],
                    // As slmc's executor: DequantizeLinear + MatMul fusions keep the artifact's
                    // activation precision.
                    "session.qdq_matmulnbits_accuracy_level": manifest.accuracy_level.to_string(),
                },
                "hidden_size": info.hidden,
                "head_size": manifest.head_dim,
                "num_attention_heads": c.num_heads,
                "num_key_value_heads": manifest.kv_heads,
                "num_hidden_layers": manifest.layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "max_length": manifest.model.context_len,
            "do_sample": false,
            "num_beams": 1,
            "top_k": 1,
            "top_p": 1.0,
            "temperature": 1.0,
            "past_present_share_buffer": manifest.kv_buffer_shared,
        },
    });
    Ok((serde_json::to_string_pretty(&config)? + "\n").into_bytes())
}
