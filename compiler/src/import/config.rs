//! The model configuration, read from Hugging Face `config.json` or GGUF metadata.

use std::path::Path;

use serde_json::Value as Json;
use slmc_ir::{RopeScaling, RopeStyle};

use super::gguf::GgufFile;
use super::ImportError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// LlamaForCausalLM and its relatives (SmolLM, TinyLlama, MobileLLM).
    Llama,
    /// Qwen2ForCausalLM: q/k/v projections carry biases.
    Qwen2,
    /// Phi3ForCausalLM: fused qkv_proj and gate_up_proj.
    Phi3,
    /// Qwen3ForCausalLM: no biases; RMSNorm of each query and key head (q_norm, k_norm)
    /// before the rotary embedding.
    Qwen3,
}

impl Arch {
    /// Whether each query and key head is RMS-normalized before the rotary embedding.
    pub fn has_qk_norm(self) -> bool {
        self == Arch::Qwen3
    }
}

/// How stored tensors are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightNaming {
    HuggingFace,
    Gguf,
}

/// One weight's role in a block or around the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embed,
    FinalNorm,
    LmHead,
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    Qkv,
    /// Per-head query / key RMSNorm weights (Qwen3).
    QNorm,
    KNorm,
    O,
    FfnNorm,
    Gate,
    Up,
    GateUp,
    Down,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    /// The architecture as the checkpoint names it (`LlamaForCausalLM`, `llama`).
    pub arch_name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Stored transformer blocks.
    pub num_blocks: usize,
    /// How many consecutive layers run each stored block (MobileLLM's immediate
    /// block-wise sharing uses 2; 1 means no sharing).
    pub block_repeat: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rope_style: RopeStyle,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub naming: WeightNaming,
}

impl ModelConfig {
    /// Layers executed (stored blocks times the sharing factor).
    pub fn num_layers(&self) -> usize {
        self.num_blocks * self.block_repeat
    }

    /// The stored tensor name for a role in stored block `block`.
    pub fn weight_name(&self, role: Role, block: usize) -> String {
        let b = block;
        match self.naming {
            WeightNaming::HuggingFace => match role {
                Role::Embed => "model.embed_tokens.weight".into(),
                Role::FinalNorm => "model.norm.weight".into(),
                Role::LmHead => "lm_head.weight".into(),
                Role::AttnNorm => format!("model.layers.{b}.input_layernorm.weight"),
                Role::Q => format!("model.layers.{b}.self_attn.q_proj.weight"),
                Role::K => format!("model.layers.{b}.self_attn.k_proj.weight"),
                Role::V => format!("model.layers.{b}.self_attn.v_proj.weight"),
                Role::QBias => format!("model.layers.{b}.self_attn.q_proj.bias"),
                Role::KBias => format!("model.layers.{b}.self_attn.k_proj.bias"),
                Role::VBias => format!("model.layers.{b}.self_attn.v_proj.bias"),
                Role::Qkv => format!("model.layers.{b}.self_attn.qkv_proj.weight"),
                Role::QNorm => format!("model.layers.{b}.self_attn.q_norm.weight"),
                Role::KNorm => format!("model.layers.{b}.self_attn.k_norm.weight"),
                Role::O => format!("model.layers.{b}.self_attn.o_proj.weight"),
                Role::FfnNorm => format!("model.layers.{b}.post_attention_layernorm.weight"),
                Role::Gate => format!("model.layers.{b}.mlp.gate_proj.weight"),
                Role::Up => format!("model.layers.{b}.mlp.up_proj.weight"),
                Role::GateUp => format!("model.layers.{b}.mlp.gate_up_proj.weight"),
                Role::Down => format!("model.layers.{b}.mlp.down_proj.weight"),
            },
            WeightNaming::Gguf => match role {
                Role::Embed => "token_embd.weight".into(),
                Role::FinalNorm => "output_norm.weight".into(),
                Role::LmHead => "output.weight".into(),
                Role::AttnNorm => format!("blk.{b}.attn_norm.weight"),
                Role::Q => format!("blk.{b}.attn_q.weight"),
                Role::K => format!("blk.{b}.attn_k.weight"),
                Role::V => format!("blk.{b}.attn_v.weight"),
                Role::QBias => format!("blk.{b}.attn_q.bias"),
                Role::KBias => format!("blk.{b}.attn_k.bias"),
                Role::VBias => format!("blk.{b}.attn_v.bias"),
                Role::Qkv => format!("blk.{b}.attn_qkv.weight"),
                Role::QNorm => format!("blk.{b}.attn_q_norm.weight"),
                Role::KNorm => format!("blk.{b}.attn_k_norm.weight"),
                Role::O => format!("blk.{b}.attn_output.weight"),
                Role::FfnNorm => format!("blk.{b}.ffn_norm.weight"),
                Role::Gate => format!("blk.{b}.ffn_gate.weight"),
                // llama.cpp stores Phi-3's fused gate/up as ffn_up.
                Role::Up | Role::GateUp => format!("blk.{b}.ffn_up.weight"),
                Role::Down => format!("blk.{b}.ffn_down.weight"),
            },
        }
    }

    /// Summary for `inspect --json`.
    pub fn to_json(&self) -> Json {
        serde_json::json!({
            "architecture": self.arch_name,
            "family": format!("{:?}", self.arch).to_lowercase(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_layers": self.num_layers(),
            "num_stored_blocks": self.num_blocks,
            "block_repeat": self.block_repeat,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rotary_dim": self.rotary_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": match self.rope_scaling { RopeScaling::None => "none", RopeScaling::Llama3 { .. } => "llama3" },
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": self.eos_token_ids,
        })
    }
}

struct JsonConfig<'a> {
    path: &'a Path,
    root: &'a Json,
}

impl JsonConfig<'_> {
    fn err(&self, message: String) -> ImportError {
        ImportError::file(self.path, message)
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ImportError> {
        match self.root.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|n| *n > 0 && *n < (1 << 32))
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("`{key}` must be a positive integer, found {v}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, ImportError> {
        self.opt_usize(key)?.ok_or_else(|| self.err(format!("missing required key `{key}`")))
    }

    fn opt_f64(&self, v: Option<&Json>, key: &str) -> Result<Option<f64>, ImportError> {
        match v {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a number, found {v}"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ImportError> {
        match self.root.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => {
                v.as_bool().map(Some).ok_or_else(|| self.err(format!("`{key}` must be true or false, found {v}")))
            }
        }
    }

    fn token_ids(&self, key: &str) -> Vec<u32> {
        match self.root.get(key) {
            Some(Json::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Json::Array(items)) => items.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
            _ => vec![],
        }
    }
}

/// Reads a Hugging Face `config.json`. RoPE settings are accepted both top-level
/// (transformers 4.x) and under `rope_parameters` (transformers 5).
pub fn from_hf_json(path: &Path, root: &Json) -> Result<ModelConfig, ImportError> {
    let c = JsonConfig { path, root };
    if !root.is_object() {
        return Err(c.err("config.json must be a JSON object".into()));
    }
    let arch_name = root
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .map(str::to_string)
        .or_else(|| root.get("model_type").and_then(|m| m.as_str()).map(str::to_string))
        .ok_or_else(|| c.err("missing required key `architectures` (or `model_type`)".into()))?;
    let arch = match arch_name.as_str() {
        "LlamaForCausalLM" | "MobileLLMForCausalLM" | "llama" | "mobilellm" => Arch::Llama,
        "Qwen2ForCausalLM" | "qwen2" => Arch::Qwen2,
        "Phi3ForCausalLM" | "phi3" => Arch::Phi3,
        "Qwen3ForCausalLM" | "qwen3" => Arch::Qwen3,
        other => {
            return Err(c.err(format!(
                "unsupported architecture `{other}` (supported: LlamaForCausalLM, MobileLLMForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM, Qwen3ForCausalLM)"
            )))
        }
    };
    let hidden_size = c.usize("hidden_size")?;
    let num_heads = c.usize("num_attention_heads")?;
    let num_kv_heads = c.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
    let head_dim = c.opt_usize("head_dim")?.unwrap_or(hidden_size / num_heads);
    if num_heads % num_kv_heads != 0 {
        return Err(
            c.err(format!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"))
        );
    }
    let rope_params = root.get("rope_parameters").filter(|v| v.is_object());
    let legacy_scaling = root.get("rope_scaling").filter(|v| v.is_object());
    let rope_theta = c
        .opt_f64(root.get("rope_theta"), "rope_theta")?
        .or(c.opt_f64(rope_params.and_then(|p| p.get("rope_theta")), "rope_parameters.rope_theta")?)
        .unwrap_or(10000.0) as f32;
    let scaling_src = legacy_scaling.or(rope_params);
    let rope_type = scaling_src
        .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let rope_scaling = match rope_type {
        "default" => RopeScaling::None,
        "llama3" => {
            let s = scaling_src.expect("rope_type came from it");
            let num = |k: &str| -> Result<f32, ImportError> {
                c.opt_f64(s.get(k), k)?
                    .map(|v| v as f32)
                    .ok_or_else(|| c.err(format!("llama3 rope scaling needs `{k}`")))
            };
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position: num("original_max_position_embeddings")? as i64,
            }
        }
        other => return Err(c.err(format!("rope scaling type `{other}` is not supported (default, llama3)"))),
    };
    let partial = c.opt_f64(root.get("partial_rotary_factor"), "partial_rotary_factor")?.unwrap_or(1.0);
    let rotary_dim = ((head_dim as f64 * partial) as usize) & !1;
    let num_blocks = c.usize("num_hidden_layers")?;
    let block_repeat = if c.opt_bool("layer_sharing")?.unwrap_or(false) { 2 } else { 1 };
    let tie = c.opt_bool("tie_word_embeddings")?.or(c.opt_bool("share_embedding")?).unwrap_or(false);
    let attention_bias = match arch {
        Arch::Qwen2 => true,
        _ => c.opt_bool("attention_bias")?.unwrap_or(false),
    };
    let rms_norm_eps = c
        .opt_f64(root.get("rms_norm_eps"), "rms_norm_eps")?
        .ok_or_else(|| c.err("missing required key `rms_norm_eps`".into()))? as f32;
    Ok(ModelConfig {
        arch,
        arch_name,
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        intermediate_size: c.usize("intermediate_size")?,
        num_blocks,
        block_repeat,
        num_heads,
        num_kv_heads,
        head_dim,
        rotary_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        rope_style: RopeStyle::Half,
        tie_word_embeddings: tie,
        attention_bias,
        max_position_embeddings: c.opt_usize("max_position_embeddings")?.unwrap_or(2048),
        bos_token_id: c.token_ids("bos_token_id").first().copied(),
        eos_token_ids: c.token_ids("eos_token_id"),
        naming: WeightNaming::HuggingFace,
    })
}

/// Reads the model configuration from GGUF metadata (`{arch}.block_count`, ...).
pub fn from_gguf(path: &Path, file: &GgufFile) -> Result<ModelConfig, ImportError> {
    let err = |m: String| ImportError::file(path, m);
    let md = &file.metadata;
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| err("missing metadata `general.architecture`".into()))?
        .to_string();
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "phi3" => Arch::Phi3,
        "qwen3" => Arch::Qwen3,
        other => {
            return Err(err(format!("unsupported GGUF architecture `{other}` (supported: llama, qwen2, phi3, qwen3)")))
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let opt_u = |k: &str| -> Result<Option<usize>, ImportError> {
        match md.get(&key(k)) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|n| *n > 0 && *n < (1 << 32))
                .map(|n| Some(n as usize))
                .ok_or_else(|| err(format!("metadata `{}` must be a positive integer", key(k)))),
        }
    };
    let req_u = |k: &str| opt_u(k)?.ok_or_else(|| err(format!("missing metadata `{}`", key(k))));
    let opt_f = |k: &str| md.get(&key(k)).and_then(|v| v.as_f64());
    let hidden_size = req_u("embedding_length")?;
    let num_heads = req_u("attention.head_count")?;
    let num_kv_heads = opt_u("attention.head_count_kv")?.unwrap_or(num_heads);
    if num_heads % num_kv_heads != 0 {
        return Err(err(format!("head_count {num_heads} is not a multiple of head_count_kv {num_kv_heads}")));
    }
    let head_dim = opt_u("attention.key_length")?.unwrap_or(hidden_size / num_heads);
    let embed = file.tensors.iter().find(|(n, _)| n == "token_embd.weight").map(|(_, t)| t);
    let vocab_size = match opt_u("vocab_size")? {
        Some(v) => v,
        None => {
            embed.map(|t| t.shape[0]).ok_or_else(|| err("no vocab_size metadata and no token_embd.weight".into()))?
        }
    };
    if file.tensors.iter().any(|(n, _)| n == "rope_freqs.weight") {
        return Err(err("llama3-style rope_freqs.weight frequency factors are not supported yet".into()));
    }
    let tied = !file.tensors.iter().any(|(n, _)| n == "output.weight");
    let u32_key = |k: &str| md.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
    Ok(ModelConfig {
        arch,
        arch_name: arch_name.clone(),
        vocab_size,
        hidden_size,
        intermediate_size: req_u("feed_forward_length")?,
        num_blocks: req_u("block_count")?,
        block_repeat: 1,
        num_heads,
        num_kv_heads,
        head_dim,
        rotary_dim: opt_u("rope.dimension_count")?.unwrap_or(head_dim),
        rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon")
            .ok_or_else(|| err(format!("missing metadata `{}`", key("attention.layer_norm_rms_epsilon"))))?
            as f32,
        rope_theta: opt_f("rope.freq_base").unwrap_or(10000.0) as f32,
        rope_scaling: RopeScaling::None,
        // llama.cpp's converter permuted llama q/k rows for adjacent-pair RoPE; other
        // architectures keep Hugging Face's layout.
        rope_style: if arch == Arch::Llama { RopeStyle::Interleaved } else { RopeStyle::Half },
        tie_word_embeddings: tied,
        attention_bias: arch == Arch::Qwen2,
        max_position_embeddings: opt_u("context_length")?.unwrap_or(2048),
        bos_token_id: u32_key("tokenizer.ggml.bos_token_id"),
        eos_token_ids: u32_key("tokenizer.ggml.eos_token_id").into_iter().collect(),
        naming: WeightNaming::Gguf,
    })
}
