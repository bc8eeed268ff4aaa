//! `slmc convert MODEL --to hf OUT_DIR`: writes a Hugging Face directory (config.json,
//! model.safetensors at a chosen dtype, tokenizer.json, tokenizer_config.json).
//!
//! The output is written to a temporary sibling directory and renamed into place, so a
//! failed conversion never leaves a half-written OUT_DIR.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use serde_json::json;
use slmc_ir::{DType, RopeScaling, RopeStyle, WeightSource};

use crate::import::config::Role;
use crate::import::{Arch, Model, WeightNaming};

/// Hugging Face name for every stored tensor of a GGUF model.
fn hf_names(model: &Model) -> BTreeMap<String, String> {
    let cfg = &model.config;
    let mut hf_cfg = cfg.clone();
    hf_cfg.naming = WeightNaming::HuggingFace;
    let mut map = BTreeMap::new();
    let mut add = |role: Role, block: usize| {
        map.insert(cfg.weight_name(role, block), hf_cfg.weight_name(role, block));
    };
    for role in [Role::Embed, Role::FinalNorm, Role::LmHead] {
        add(role, 0);
    }
    let block_roles: &[Role] = match cfg.arch {
        Arch::Phi3 => &[Role::AttnNorm, Role::Qkv, Role::O, Role::FfnNorm, Role::GateUp, Role::Down],
        _ => &[
            Role::AttnNorm,
            Role::Q,
            Role::K,
            Role::V,
            Role::QBias,
            Role::KBias,
            Role::VBias,
            Role::QNorm,
            Role::KNorm,
            Role::O,
            Role::FfnNorm,
            Role::Gate,
            Role::Up,
            Role::Down,
        ],
    };
    for b in 0..cfg.num_blocks {
        for role in block_roles {
            add(*role, b);
        }
    }
    map
}

/// Undoes llama.cpp's q/k row permutation: within each head, GGUF row 2j + t holds
/// Hugging Face row t * head_dim/2 + j.
fn unpermute_rows(values: &[f32], rows: usize, cols: usize, n_heads: usize) -> Vec<f32> {
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..n_heads {
        for j in 0..half {
            for t in 0..2 {
                let src = h * head_dim + 2 * j + t;
                let dst = h * head_dim + t * half + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

pub fn to_hf(model: &Model, out_dir: &Path, dtype: DType, force: bool) -> Result<()> {
    if model.config.naming != WeightNaming::Gguf {
        bail!(
            "{}: convert --to hf reads a GGUF file; this model is already a Hugging Face directory",
            model.path.display()
        );
    }
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("--dtype must be f32, f16 or bf16");
    }
    if !matches!(model.config.rope_scaling, RopeScaling::None) {
        bail!("{}: converting rope scaling is not supported", model.path.display());
    }
    if matches!(model.config.arch, Arch::Gemma2 | Arch::Gemma3 | Arch::StableLm | Arch::Olmo2 | Arch::SmolLm3) {
        bail!(
            "{}: convert --to hf supports llama, qwen2, phi3 and qwen3 GGUFs; `{}` is not supported yet",
            model.path.display(),
            model.config.arch_name
        );
    }
    let tokenizer = model
        .tokenizer
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("the GGUF's tokenizer is needed for tokenizer.json")?;
    crate::output::write_dir_atomically(out_dir, force, |tmp| write_hf(model, tmp, dtype, tokenizer))
}

fn write_hf(model: &Model, dir: &Path, dtype: DType, tokenizer: &tokenizers::Tokenizer) -> Result<()> {
    let cfg = &model.config;
    let names = hf_names(model);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (gguf_name, t) in model.weights.tensors() {
        let hf = names
            .get(gguf_name)
            .with_context(|| format!("{}: tensor `{gguf_name}` has no Hugging Face name", model.path.display()))?;
        let mut values = model
            .weights
            .to_f32(gguf_name)
            .with_context(|| format!("{}: tensor `{gguf_name}` cannot be read", model.path.display()))?;
        if cfg.rope_style == RopeStyle::Interleaved && cfg.arch == Arch::Llama {
            let heads = if gguf_name.ends_with("attn_q.weight") {
                Some(cfg.num_heads)
            } else if gguf_name.ends_with("attn_k.weight") {
                Some(cfg.num_kv_heads)
            } else {
                None
            };
            if let Some(heads) = heads {
                values = unpermute_rows(&values, t.shape[0], t.shape[1], heads);
            }
        }
        let bytes = slmc_ir::dtype::encode_float(dtype, &values).expect("checked float dtype");
        tensors.push((hf.clone(), t.shape.clone(), bytes));
    }
    let st_dtype = match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        _ => safetensors::Dtype::BF16,
    };
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, shape, bytes)| Ok((n.clone(), TensorView::new(st_dtype, shape.clone(), bytes)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), &dir.join("model.safetensors"))
        .context("writing model.safetensors")?;

    let (arch, model_type) = match cfg.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Arch::Phi3 => ("Phi3ForCausalLM", "phi3"),
        Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Arch::Gemma2 | Arch::Gemma3 | Arch::StableLm | Arch::Olmo2 | Arch::SmolLm3 => unreachable!("refused by to_hf"),
    };
    let config = json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_blocks,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "partial_rotary_factor": cfg.rotary_dim as f64 / cfg.head_dim as f64,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids.first(),
        "torch_dtype": match dtype { DType::F32 => "float32", DType::F16 => "float16", _ => "bfloat16" },
    });
    write_json(&dir.join("config.json"), &config)?;
    tokenizer.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("writing tokenizer.json: {e}"))?;
    let tok_cfg = json!({
        "chat_template": model.chat_template,
        "bos_token": model.bos_token,
        "eos_token": model.eos_token,
        "add_bos_token": false,
        "tokenizer_class": "GPT2Tokenizer",
    });
    write_json(&dir.join("tokenizer_config.json"), &tok_cfg)?;
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    std::fs::write(path, text).with_context(|| format!("{}: cannot write", path.display()))
}
