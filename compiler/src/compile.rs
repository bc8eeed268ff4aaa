//! `slmc compile`: optimize once, then write one artifact directory per target under
//! OUT/<target>/. Each directory is written beside its final place and renamed into it,
//! so a failure never leaves a half-written artifact.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use slmc_backends::gpu::{GpuOptions, GpuOutput};
use slmc_ir::Layered;

use crate::import::Model;
use crate::optimize::Optimized;

pub struct CompileOptions {
    pub context_len: usize,
    pub max_step_tokens: usize,
    pub force: bool,
    /// Overrides the target's storage-binding limit (a smaller device, or tests).
    pub max_binding_bytes: Option<u64>,
}

/// Writes the artifact for `target` into `out_root/<target>/`; returns that directory.
pub fn compile_target(
    model: &Model,
    optimized: &Optimized,
    target: &str,
    out_root: &Path,
    opts: &CompileOptions,
) -> Result<PathBuf> {
    let profile = slmc_targets::lookup(target)?;
    let weights = Layered { top: &optimized.derived, base: &model.weights };
    let output: GpuOutput = match profile.backend {
        "wgsl" | "spirv" | "msl" => {
            let gpu = GpuOptions {
                target: profile.name.to_string(),
                model_name: model.path.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_string(),
                eos_token_ids: model.config.eos_token_ids.clone(),
                context_len: opts.context_len.min(model.config.max_position_embeddings),
                max_step_tokens: opts.max_step_tokens,
                max_binding_bytes: opts
                    .max_binding_bytes
                    .or(profile.max_storage_buffer_binding_size)
                    .unwrap_or(u64::MAX),
                max_buffer_bytes: profile.max_buffer_size.unwrap_or(u64::MAX),
                features: slmc_backends::gpu::GpuFeatures::of_profile(profile),
            };
            slmc_backends::gpu::compile(&optimized.graph, &weights, &gpu).with_context(|| format!("target {target}"))?
        }
        backend => {
            // Every other backend still reports itself as not implemented; should one start
            // returning files before its artifact writer exists here, say so, never panic.
            let info = slmc_ir::verify(&optimized.graph)?;
            slmc_backends::emit(&optimized.graph, &info, profile)?;
            bail!("target {target}: writing {backend} artifacts is not implemented yet");
        }
    };
    let dir = out_root.join(profile.name);
    crate::output::write_dir_atomically(&dir, opts.force, |tmp| write_artifact(tmp, model, optimized, &output))?;
    Ok(dir)
}

fn write_artifact(dir: &Path, model: &Model, optimized: &Optimized, output: &GpuOutput) -> Result<()> {
    std::fs::create_dir_all(dir.join("kernels")).with_context(|| format!("{}: cannot create", dir.display()))?;
    for (rel, bytes) in &output.files {
        std::fs::write(dir.join(rel), bytes).with_context(|| format!("{}: cannot write", dir.join(rel).display()))?;
    }
    let manifest = serde_json::to_string_pretty(&output.artifact)? + "\n";
    std::fs::write(dir.join("artifact.json"), manifest)?;
    std::fs::write(dir.join("graph.slir"), slmc_ir::text::print(&optimized.graph))?;
    if let Ok(tok) = &model.tokenizer {
        tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow!("writing tokenizer.json: {e}"))?;
    }
    let tok_cfg = serde_json::json!({
        "chat_template": model.chat_template,
        "bos_token": model.bos_token,
        "eos_token": model.eos_token,
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&tok_cfg)? + "\n")?;
    Ok(())
}
