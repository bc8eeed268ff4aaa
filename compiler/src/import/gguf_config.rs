//! The model configuration from GGUF metadata (`{arch}.block_count`, ...), Llama 3's rope
//! scaling recognized from the `rope_freqs.weight` factors llama.cpp stores, and Phi-3's
//! LongRoPE from its `rope_factors_short/long.weight` vectors.

use std::path::Path;

use slmc_ir::{RopeScaling, RopeStyle};

use super::config::{Activation, Arch, ModelConfig, WeightNaming};
use super::gguf::GgufFile;
use super::ImportError;

/// Reads the model configuration from GGUF metadata (`{arch}.block_count`, ...); `data` is
/// the whole file (for the `rope_freqs.weight` factors).
pub fn from_gguf(path: &Path, file: &GgufFile, data: &[u8]) -> Result<ModelConfig, ImportError> {
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
        "gemma2" => Arch::Gemma2,
        "gemma3" => Arch::Gemma3,
        "stablelm" => Arch::StableLm,
        "smollm3" => Arch::SmolLm3,
        "olmo2" => Arch::Olmo2,
        other => {
            return Err(err(format!(
                "unsupported GGUF architecture `{other}` (supported: llama, qwen2, phi3, qwen3, gemma2, gemma3, stablelm, smollm3, olmo2)"
            )))
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
    let rope_theta = opt_f("rope.freq_base").unwrap_or(10000.0) as f32;
    let rotary_dim = opt_u("rope.dimension_count")?.unwrap_or(head_dim);
    // Per-frequency factors llama.cpp stores as f32 vectors of rotary_dim / 2 entries.
    let factors = |name: &str| -> Result<Option<Vec<f32>>, ImportError> {
        let Some((_, t)) = file.tensors.iter().find(|(n, _)| n == name) else {
            return Ok(None);
        };
        let bytes = data.get(t.offset..t.offset + t.len).unwrap_or_default();
        match t.dtype {
            slmc_ir::DType::F32 if t.len == 4 * (rotary_dim / 2) && bytes.len() == t.len => {
                Ok(Some(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
            }
            _ => Err(err(format!(
                "{name} must be f32 with {} entries (rotary dim / 2), found {} of {} bytes",
                rotary_dim / 2,
                t.dtype,
                t.len
            ))),
        }
    };
    let long_rope = (factors("rope_factors_short.weight")?, factors("rope_factors_long.weight")?);
    let rope_scaling = match (factors("rope_freqs.weight")?, long_rope) {
        (None, (None, None)) => RopeScaling::None,
        (Some(f), (None, None)) => llama3_scaling_from_factors(rope_theta, rotary_dim, &f).ok_or_else(|| {
            err("rope_freqs.weight matches no Llama 3 rope scaling (factor 8, 16, 32 or 64; low 1, high 4, original context 8192)".into())
        })?,
        // Phi-3.5 / Phi-4-mini LongRoPE, as llama.cpp's converter writes it.
        (None, (Some(short_factor), Some(long_factor))) => {
            let original = req_u("rope.scaling.original_context_length")?;
            let attention_factor = match opt_f("rope.scaling.attn_factor") {
                Some(a) => a,
                None => {
                    let scale = opt_u("context_length")?.unwrap_or(original) as f64 / original as f64;
                    slmc_ir::rotary::long_rope_attention_factor(scale, original as f64)
                }
            };
            let scaling = RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position: original as i64,
                attention_factor: attention_factor as f32,
            };
            scaling.check(rotary_dim).map_err(err)?;
            scaling
        }
        _ => {
            return Err(err(
                "rope factors: expected rope_freqs.weight alone, or rope_factors_short.weight with rope_factors_long.weight"
                    .into(),
            ))
        }
    };
    let tied = !file.tensors.iter().any(|(n, _)| n == "output.weight");
    let u32_key = |k: &str| md.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
    let num_blocks = req_u("block_count")?;
    super::config::check_layer_count(num_blocks).map_err(|m| err(format!("metadata `{}`: {m}", key("block_count"))))?;
    if num_blocks > file.tensors.len() {
        return Err(err(format!("{num_blocks} blocks, but the file holds {} tensors", file.tensors.len())));
    }
    let gemma = arch.is_gemma();
    let eps_key =
        if arch == Arch::StableLm { "attention.layer_norm_epsilon" } else { "attention.layer_norm_rms_epsilon" };
    let sliding_window = if gemma { opt_u("attention.sliding_window")? } else { None };
    // llama.cpp: every 6th Gemma 3 layer and every 2nd Gemma 2 layer is global, unless the
    // file says otherwise.
    let pattern = opt_u("attention.sliding_window_pattern")?.unwrap_or(if arch == Arch::Gemma3 { 6 } else { 2 });
    let sliding_layers =
        (0..num_blocks).map(|i| sliding_window.is_some() && (i + 1) % pattern != 0).collect::<Vec<_>>();
    let positive = |k: &str| -> Result<Option<f32>, ImportError> {
        match opt_f(k) {
            Some(v) if v > 0.0 && v.is_finite() => Ok(Some(v as f32)),
            Some(v) => Err(err(format!("metadata `{}` must be positive, found {v}", key(k)))),
            None => Ok(None),
        }
    };
    Ok(ModelConfig {
        arch,
        arch_name: arch_name.clone(),
        vocab_size,
        hidden_size,
        intermediate_size: req_u("feed_forward_length")?,
        num_blocks,
        block_repeat: 1,
        num_heads,
        num_kv_heads,
        head_dim,
        rotary_dim,
        rms_norm_eps: opt_f(eps_key).ok_or_else(|| err(format!("missing metadata `{}`", key(eps_key))))? as f32,
        rope_theta,
        rope_scaling,
        // llama.cpp's converter permuted llama q/k rows for adjacent-pair RoPE; other
        // architectures keep Hugging Face's layout.
        rope_style: if matches!(arch, Arch::Llama | Arch::SmolLm3) { RopeStyle::Interleaved } else { RopeStyle::Half },
        tie_word_embeddings: tied,
        attention_bias: arch == Arch::Qwen2,
        max_position_embeddings: opt_u("context_length")?.unwrap_or(2048),
        bos_token_id: u32_key("tokenizer.ggml.bos_token_id"),
        eos_token_ids: u32_key("tokenizer.ggml.eos_token_id").into_iter().collect(),
        naming: WeightNaming::Gguf,
        // llama.cpp's converter adds Gemma's 1 to the stored norm weights.
        norm_weight_plus_one: false,
        activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
        embed_scale: gemma.then(|| (hidden_size as f32).sqrt()),
        // llama.cpp scales by 1/sqrt(key_length) for the Gemma sizes up to 12B (27B uses
        // hidden/heads, which slmc does not special-case).
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        attn_softcap: if gemma { positive("attn_logit_softcapping")? } else { None },
        final_softcap: if gemma { positive("final_logit_softcapping")? } else { None },
        sliding_window,
        sliding_layers,
        rope_theta_local: (arch == Arch::Gemma3).then(|| opt_f("rope.freq_base_swa").unwrap_or(10000.0) as f32),
        // llama.cpp: every 4th SmolLM3 layer has no RoPE.
        rope_layers: (0..num_blocks).map(|i| arch != Arch::SmolLm3 || (i + 1) % 4 != 0).collect(),
    })
}

/// The Llama 3 rope scaling whose per-frequency factors llama.cpp stored as `rope_freqs`
/// (the divisor of each inverse frequency), recognized among the published settings and
/// accepted only if it reproduces every factor (relative 1e-4).
fn llama3_scaling_from_factors(theta: f32, rotary_dim: usize, factors: &[f32]) -> Option<RopeScaling> {
    let base = slmc_ir::rotary::rope_inv_freq(theta, rotary_dim, &RopeScaling::None);
    [8.0f32, 16.0, 32.0, 64.0]
        .into_iter()
        .map(|factor| RopeScaling::Llama3 {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192,
        })
        .find(|scaling| {
            let scaled = slmc_ir::rotary::rope_inv_freq(theta, rotary_dim, scaling);
            factors.len() == base.len()
                && base
                    .iter()
                    .zip(&scaled)
                    .zip(factors)
                    .all(|((b, s), f)| ((b / s) - f).abs() <= 1e-4 * f.abs().max(1.0))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The factors llama.cpp's converter writes for Llama 3.2 (factor 32) are recognized;
    /// factors of no published setting are not.
    #[test]
    fn llama3_rope_freqs_are_recognized_or_refused() {
        let (theta, dim) = (500000.0f32, 64usize);
        let (factor, low, high, old) = (32.0f64, 1.0f64, 4.0f64, 8192.0f64);
        let factors: Vec<f32> = (0..dim / 2)
            .map(|j| {
                let freq = 1.0 / (theta as f64).powf((2 * j) as f64 / dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < old / high {
                    1.0
                } else if wavelen > old / low {
                    factor as f32
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect();
        assert_eq!(
            llama3_scaling_from_factors(theta, dim, &factors),
            Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position: 8192
            })
        );
        let mut off = factors.clone();
        off[20] *= 1.01;
        assert_eq!(llama3_scaling_from_factors(theta, dim, &off), None);
        assert_eq!(llama3_scaling_from_factors(theta, dim, &factors[1..]), None);
    }
}
