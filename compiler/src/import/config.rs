//! The model configuration, read from Hugging Face `config.json` or GGUF metadata.

use std::path::Path;

use serde_json::Value as Json;
use slmc_ir::{RopeScaling, RopeStyle};

use super::ImportError;

pub use super::gguf_config::from_gguf;

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
    /// Gemma2ForCausalLM: (1 + w) RMSNorms before and after attention and the MLP, GeGLU,
    /// embeddings scaled by sqrt(hidden), sliding-window layers, soft-capped attention
    /// scores and final logits.
    Gemma2,
    /// Gemma3ForCausalLM (text): Gemma 2's block with per-head q/k RMSNorm instead of the
    /// soft caps, and a separate RoPE base for the sliding-window layers.
    Gemma3,
    /// StableLmForCausalLM (StableLM 2): LayerNorm with bias, q/k/v biases, rotary on a
    /// fraction of each head.
    StableLm,
    /// Olmo2ForCausalLM: norms after attention and after the MLP only (none before), and
    /// q/k RMSNorm over the whole projection (before splitting into heads).
    Olmo2,
    /// SmolLM3ForCausalLM: llama blocks, some without positional encoding (NoPE).
    SmolLm3,
}

impl Arch {
    /// Whether queries and keys are RMS-normalized before the rotary embedding.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3 | Arch::Olmo2)
    }

    /// Whether that q/k norm runs over the whole projection (OLMo 2) rather than each head.
    pub fn qk_norm_over_projection(self) -> bool {
        self == Arch::Olmo2
    }

    /// Where the block's norms sit.
    pub fn norm_placement(self) -> NormPlacement {
        match self {
            Arch::Gemma2 | Arch::Gemma3 => NormPlacement::Sandwich,
            Arch::Olmo2 => NormPlacement::Post,
            _ => NormPlacement::Pre,
        }
    }

    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }

    /// The normalization of the hidden states.
    pub fn norm_kind(self) -> NormKind {
        if self == Arch::StableLm {
            NormKind::LayerNorm
        } else {
            NormKind::Rms
        }
    }
}

/// The normalization a family uses for its hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Rms,
    /// LayerNorm with a bias (StableLM).
    LayerNorm,
}

/// Where a block normalizes: before attention and the MLP (llama), before and after both
/// (Gemma), or after both only, on the sublayer's output before the residual add (OLMo 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    Pre,
    Sandwich,
    Post,
}

impl NormPlacement {
    pub fn before(self) -> bool {
        self != NormPlacement::Post
    }

    pub fn after(self) -> bool {
        self != NormPlacement::Pre
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU.
    Silu,
    /// GeGLU with tanh-approximated GELU (Gemma).
    GeluTanh,
}

/// The suffix of a norm weight with Gemma's (1 + w) folded in at import.
pub const PLUS_ONE_SUFFIX: &str = "+1";

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
    /// Gemma's norms after attention and after the MLP (before each residual add).
    PostAttnNorm,
    PostFfnNorm,
    /// LayerNorm biases (StableLM).
    AttnNormBias,
    FfnNormBias,
    FinalNormBias,
    FfnNorm,
    Gate,
    Up,
    GateUp,
    Down,
}

impl Role {
    /// The LayerNorm bias that goes with a norm weight (StableLM has biases on its input,
    /// post-attention and final norms; other norms have none).
    pub fn norm_bias(self) -> Option<Role> {
        match self {
            Role::AttnNorm => Some(Role::AttnNormBias),
            Role::FfnNorm => Some(Role::FfnNormBias),
            Role::FinalNorm => Some(Role::FinalNormBias),
            _ => None,
        }
    }
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
    /// Hugging Face Gemma checkpoints store norm weights w applied as (1 + w); the importer
    /// folds the 1 in and names the folded tensors `<name>+1` (GGUF files hold them folded).
    pub norm_weight_plus_one: bool,
    pub activation: Activation,
    /// Embeddings multiplied by this (Gemma: sqrt(hidden)).
    pub embed_scale: Option<f32>,
    /// Attention score scale (1/sqrt(head_dim), Gemma: 1/sqrt(query_pre_attn_scalar)).
    pub attn_scale: f32,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends over the sliding window only.
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the sliding-window layers when it differs (Gemma 3: 10 000).
    pub rope_theta_local: Option<f32>,
    /// Per layer: false for a layer without rotary embedding (SmolLM3's NoPE layers).
    pub rope_layers: Vec<bool>,
}

impl ModelConfig {
    /// Layers executed (stored blocks times the sharing factor).
    pub fn num_layers(&self) -> usize {
        self.num_blocks * self.block_repeat
    }

    /// The stored tensor name for a role in stored block `block`.
    pub fn weight_name(&self, role: Role, block: usize) -> String {
        let name = self.stored_name(role, block);
        let is_norm = matches!(
            role,
            Role::AttnNorm
                | Role::FfnNorm
                | Role::FinalNorm
                | Role::QNorm
                | Role::KNorm
                | Role::PostAttnNorm
                | Role::PostFfnNorm
        );
        if self.norm_weight_plus_one && is_norm {
            format!("{name}{PLUS_ONE_SUFFIX}")
        } else {
            name
        }
    }

    /// Whether layer `layer` rotates its queries and keys (false: NoPE).
    pub fn uses_rope(&self, layer: usize) -> bool {
        self.rope_layers.get(layer).copied().unwrap_or(true)
    }

    /// Whether layer `layer` attends over the sliding window only.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_layers.get(layer).copied().unwrap_or(false)
    }

    /// The family's features beyond the llama block, for `inspect`.
    pub fn features(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.arch.qk_norm_over_projection() {
            out.push("q/k RMSNorm over the whole projection".to_string());
        } else if self.arch.has_qk_norm() {
            out.push("per-head q/k RMSNorm".to_string());
        }
        if self.arch.norm_kind() == NormKind::LayerNorm {
            out.push("LayerNorm with bias".into());
        }
        if self.norm_weight_plus_one {
            out.push("(1 + w) norm weights, folded at import (`<name>+1` tensors)".into());
        }
        match self.arch.norm_placement() {
            NormPlacement::Sandwich => out.push("norms before and after attention and MLP".into()),
            NormPlacement::Post => out.push("norms after attention and MLP only".into()),
            NormPlacement::Pre => {}
        }
        if self.activation == Activation::GeluTanh {
            out.push("GeGLU (tanh GELU)".into());
        }
        if let Some(f) = self.embed_scale {
            out.push(format!("embeddings scaled by {f}"));
        }
        if self.rotary_dim < self.head_dim {
            out.push(format!("partial rotary ({} of {} dims)", self.rotary_dim, self.head_dim));
        }
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Llama3 { factor, .. } => out.push(format!("Llama 3 rope scaling (factor {factor})")),
            RopeScaling::LongRope { original_max_position, attention_factor, .. } => out.push(format!(
                "LongRoPE (short factors up to {original_max_position} positions, long past it; attention factor {attention_factor})"
            )),
        }
        if let Some(w) = self.sliding_window {
            let n = self.sliding_layers.iter().filter(|s| **s).count();
            out.push(format!("sliding window {w} on {n} of {} layers", self.num_layers()));
        }
        if let Some(t) = self.rope_theta_local {
            out.push(format!("RoPE base {t} on sliding-window layers"));
        }
        if let Some(c) = self.attn_softcap {
            out.push(format!("attention-logit soft cap {c}"));
        }
        let nope = self.rope_layers.iter().filter(|r| !**r).count();
        if nope > 0 {
            out.push(format!("no rotary embedding (NoPE) on {nope} of {} layers", self.num_layers()));
        }
        if let Some(c) = self.final_softcap {
            out.push(format!("final-logit soft cap {c}"));
        }
        out
    }

    fn stored_name(&self, role: Role, block: usize) -> String {
        let b = block;
        let sandwich = self.arch.norm_placement() == NormPlacement::Sandwich;
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
                // Gemma's post_attention_layernorm is the norm after attention; its MLP
                // input norm is pre_feedforward_layernorm.
                Role::FfnNorm if sandwich => format!("model.layers.{b}.pre_feedforward_layernorm.weight"),
                Role::FfnNorm => format!("model.layers.{b}.post_attention_layernorm.weight"),
                Role::PostAttnNorm => format!("model.layers.{b}.post_attention_layernorm.weight"),
                Role::PostFfnNorm => format!("model.layers.{b}.post_feedforward_layernorm.weight"),
                Role::AttnNormBias => format!("model.layers.{b}.input_layernorm.bias"),
                Role::FfnNormBias => format!("model.layers.{b}.post_attention_layernorm.bias"),
                Role::FinalNormBias => "model.norm.bias".into(),
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
                Role::PostAttnNorm => format!("blk.{b}.post_attention_norm.weight"),
                Role::PostFfnNorm => format!("blk.{b}.post_ffw_norm.weight"),
                Role::AttnNormBias => format!("blk.{b}.attn_norm.bias"),
                Role::FfnNormBias => format!("blk.{b}.ffn_norm.bias"),
                Role::FinalNormBias => "output_norm.bias".into(),
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
            "rope_scaling": match self.rope_scaling {
                RopeScaling::None => "none",
                RopeScaling::Llama3 { .. } => "llama3",
                RopeScaling::LongRope { .. } => "longrope",
            },
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": self.eos_token_ids,
            "features": self.features(),
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

    /// RoPE frequency scaling from a `rope_scaling` / `rope_parameters` object.
    fn rope_scaling(&self, src: Option<&Json>) -> Result<RopeScaling, ImportError> {
        let rope_type = src.and_then(|s| s.get("rope_type").or_else(|| s.get("type"))).and_then(|t| t.as_str());
        match (rope_type.unwrap_or("default"), src) {
            ("default", _) | (_, None) => Ok(RopeScaling::None),
            ("llama3", Some(s)) => {
                let num = |k: &str| -> Result<f32, ImportError> {
                    self.opt_f64(s.get(k), k)?
                        .map(|v| v as f32)
                        .ok_or_else(|| self.err(format!("llama3 rope scaling needs `{k}`")))
                };
                Ok(RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position: num("original_max_position_embeddings")? as i64,
                })
            }
            ("longrope" | "su", Some(s)) => self.long_rope(s),
            (other, _) => {
                Err(self.err(format!("rope scaling type `{other}` is not supported (default, llama3, longrope)")))
            }
        }
    }

    /// LongRoPE as transformers computes it: the original length from the scaling object or
    /// the top level; the attention factor given, or sqrt(1 + ln(factor) / ln(original))
    /// with factor = max_position_embeddings / original length when not given.
    fn long_rope(&self, s: &Json) -> Result<RopeScaling, ImportError> {
        let list = |k: &str| -> Result<Vec<f32>, ImportError> {
            let items = s
                .get(k)
                .and_then(|v| v.as_array())
                .ok_or_else(|| self.err(format!("longrope rope scaling needs `{k}` (a list of numbers)")))?;
            items
                .iter()
                .map(|v| v.as_f64().map(|f| f as f32).ok_or_else(|| self.err(format!("`{k}` holds {v}, not a number"))))
                .collect()
        };
        let key = "original_max_position_embeddings";
        let original = match self.opt_f64(s.get(key), key)? {
            Some(v) => v,
            None => {
                self.opt_usize(key)?.ok_or_else(|| self.err(format!("longrope rope scaling needs `{key}`")))? as f64
            }
        };
        if !(original >= 1.0 && original <= i64::MAX as f64) {
            return Err(self.err(format!("`{key}` must be a positive length, found {original}")));
        }
        let attention_factor = match self.opt_f64(s.get("attention_factor"), "attention_factor")? {
            Some(a) => a,
            None => {
                let factor = match self.opt_f64(s.get("factor"), "factor")? {
                    Some(f) => f,
                    None => self.opt_usize("max_position_embeddings")?.unwrap_or(original as usize) as f64 / original,
                };
                slmc_ir::rotary::long_rope_attention_factor(factor, original)
            }
        };
        Ok(RopeScaling::LongRope {
            short_factor: list("short_factor")?,
            long_factor: list("long_factor")?,
            original_max_position: original as i64,
            attention_factor: attention_factor as f32,
        })
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
        "Gemma2ForCausalLM" | "gemma2" => Arch::Gemma2,
        "Gemma3ForCausalLM" | "gemma3_text" => Arch::Gemma3,
        "StableLmForCausalLM" | "stablelm" => Arch::StableLm,
        "Olmo2ForCausalLM" | "olmo2" => Arch::Olmo2,
        "SmolLM3ForCausalLM" | "smollm3" => Arch::SmolLm3,
        other => {
            return Err(c.err(format!(
                "unsupported architecture `{other}` (supported: LlamaForCausalLM, MobileLLMForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, StableLmForCausalLM, Olmo2ForCausalLM, SmolLM3ForCausalLM)"
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
    // transformers 5 nests RoPE per layer type for Gemma 3 (`full_attention`,
    // `sliding_attention`); other families have one flat `rope_parameters`.
    let rope_root = root.get("rope_parameters").filter(|v| v.is_object());
    let per_type = rope_root.and_then(|p| p.get("full_attention")).filter(|v| v.is_object());
    let rope_params = per_type.or(rope_root);
    let local_params = rope_root.and_then(|p| p.get("sliding_attention")).filter(|v| v.is_object());
    let legacy_scaling = root.get("rope_scaling").filter(|v| v.is_object());
    let rope_theta = c
        .opt_f64(root.get("rope_theta"), "rope_theta")?
        .or(c.opt_f64(rope_params.and_then(|p| p.get("rope_theta")), "rope_parameters.rope_theta")?)
        .unwrap_or(10000.0) as f32;
    let rope_scaling = c.rope_scaling(legacy_scaling.or(rope_params))?;
    let rope_theta_local = match arch {
        Arch::Gemma3 => {
            if let Some(p) = local_params {
                if c.rope_scaling(Some(p))? != RopeScaling::None {
                    return Err(c.err("scaled RoPE on sliding-window layers is not supported".into()));
                }
            }
            Some(
                c.opt_f64(
                    local_params.and_then(|p| p.get("rope_theta")),
                    "rope_parameters.sliding_attention.rope_theta",
                )?
                .or(c.opt_f64(root.get("rope_local_base_freq"), "rope_local_base_freq")?)
                .unwrap_or(10000.0) as f32,
            )
        }
        _ => None,
    };
    let partial = c
        .opt_f64(root.get("partial_rotary_factor"), "partial_rotary_factor")?
        .or(c.opt_f64(
            rope_params.and_then(|p| p.get("partial_rotary_factor")),
            "rope_parameters.partial_rotary_factor",
        )?)
        .unwrap_or(1.0);
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(c.err(format!("partial_rotary_factor must be in (0, 1], found {partial}")));
    }
    let rotary_dim = ((head_dim as f64 * partial) as usize) & !1;
    rope_scaling.check(rotary_dim).map_err(|m| c.err(m))?;
    let num_blocks = c.usize("num_hidden_layers")?;
    check_layer_count(num_blocks).map_err(|m| c.err(m))?;
    let block_repeat = if c.opt_bool("layer_sharing")?.unwrap_or(false) { 2 } else { 1 };
    let tie = c.opt_bool("tie_word_embeddings")?.or(c.opt_bool("share_embedding")?).unwrap_or(false);
    let attention_bias = match arch {
        Arch::Qwen2 => true,
        Arch::StableLm => c.opt_bool("use_qkv_bias")?.unwrap_or(false),
        _ => c.opt_bool("attention_bias")?.unwrap_or(false),
    };
    let eps_key = if arch == Arch::StableLm { "layer_norm_eps" } else { "rms_norm_eps" };
    let rms_norm_eps = c
        .opt_f64(root.get(eps_key), eps_key)?
        .ok_or_else(|| c.err(format!("missing required key `{eps_key}`")))? as f32;
    if arch == Arch::StableLm {
        for (key, supported) in [("use_parallel_residual", false), ("qk_layernorm", false)] {
            if c.opt_bool(key)?.unwrap_or(false) != supported {
                return Err(c.err(format!("StableLM with `{key}` = true is not supported")));
            }
        }
    }
    let act = root.get("hidden_activation").or(root.get("hidden_act")).and_then(|v| v.as_str());
    let activation = match (arch.is_gemma(), act) {
        (true, None | Some("gelu_pytorch_tanh") | Some("gelu_tanh")) => Activation::GeluTanh,
        (false, None | Some("silu")) => Activation::Silu,
        (_, Some(other)) => {
            return Err(c.err(format!(
                "activation `{other}` is not supported for {arch_name} (silu; gelu_pytorch_tanh for Gemma)"
            )))
        }
    };
    let gemma = arch.is_gemma();
    let sliding_window = if gemma { c.opt_usize("sliding_window")? } else { None };
    let sliding_layers = match (sliding_window, root.get("layer_types").and_then(|v| v.as_array())) {
        (None, _) => vec![false; num_blocks],
        (Some(_), Some(types)) => {
            if types.len() != num_blocks {
                return Err(c.err(format!("`layer_types` has {} entries for {num_blocks} layers", types.len())));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(c.err(format!("unknown layer type {t} (sliding_attention, full_attention)"))),
                })
                .collect::<Result<_, _>>()?
        }
        // Older configs: every `pattern`-th layer is global (Gemma 2: every other one).
        (Some(_), None) => {
            let pattern = c
                .opt_usize("sliding_window_pattern")?
                .or(c.opt_usize("_sliding_window_pattern")?)
                .unwrap_or(if arch == Arch::Gemma3 { 6 } else { 2 });
            (0..num_blocks).map(|i| (i + 1) % pattern != 0).collect()
        }
    };
    let softcap = |key: &str| -> Result<Option<f32>, ImportError> {
        match c.opt_f64(root.get(key), key)? {
            Some(v) if v > 0.0 => Ok(Some(v as f32)),
            Some(v) => Err(c.err(format!("`{key}` must be positive, found {v}"))),
            None => Ok(None),
        }
    };
    // SmolLM3: `no_rope_layers[i]` is 1 where layer i uses RoPE, 0 where it does not; older
    // configs give an interval (every 4th layer without RoPE by default).
    let rope_layers = match (arch, root.get("no_rope_layers").and_then(|v| v.as_array())) {
        (Arch::SmolLm3, Some(flags)) => {
            if flags.len() != num_blocks {
                return Err(c.err(format!("`no_rope_layers` has {} entries for {num_blocks} layers", flags.len())));
            }
            flags
                .iter()
                .map(|f| match f.as_u64() {
                    Some(1) => Ok(true),
                    Some(0) => Ok(false),
                    _ => Err(c.err(format!("`no_rope_layers` entries must be 0 or 1, found {f}"))),
                })
                .collect::<Result<_, _>>()?
        }
        (Arch::SmolLm3, None) => {
            let every = c.opt_usize("no_rope_layer_interval")?.unwrap_or(4);
            (0..num_blocks).map(|i| (i + 1) % every != 0).collect()
        }
        _ => vec![true; num_blocks],
    };
    if arch == Arch::SmolLm3 && c.opt_bool("use_sliding_window")?.unwrap_or(false) {
        return Err(c.err("SmolLM3 with `use_sliding_window` = true is not supported".into()));
    }
    let attn_scale = match c.opt_f64(root.get("query_pre_attn_scalar"), "query_pre_attn_scalar")? {
        Some(v) if gemma && v > 0.0 => (1.0 / v.sqrt()) as f32,
        Some(v) if gemma => return Err(c.err(format!("`query_pre_attn_scalar` must be positive, found {v}"))),
        _ => 1.0 / (head_dim as f32).sqrt(),
    };
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
        norm_weight_plus_one: gemma,
        activation,
        embed_scale: gemma.then(|| (hidden_size as f32).sqrt()),
        attn_scale,
        attn_softcap: if gemma { softcap("attn_logit_softcapping")? } else { None },
        final_softcap: if gemma { softcap("final_logit_softcapping")? } else { None },
        sliding_window,
        sliding_layers,
        rope_theta_local,
        rope_layers,
    })
}

/// More layers than any published model has by far: a count past it is a damaged or
/// hostile file, refused before anything is sized by it.
pub const MAX_LAYERS: usize = 4096;

pub fn check_layer_count(n: usize) -> Result<(), String> {
    if n == 0 || n > MAX_LAYERS {
        return Err(format!("{n} layers is not a plausible model (1 to {MAX_LAYERS})"));
    }
    Ok(())
}
