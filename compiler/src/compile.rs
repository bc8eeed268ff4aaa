//! `slmc compile`: optimize once, then write one bundle per target under OUT/<target>/:
//! the backend's artifact plus `manifest.json` (see `slmc_targets::bundle`). Per-target
//! checks fail early (binding limits, the device's memory budget); the bundle's golden
//! smoke set runs on its own executor before the directory is renamed into place, so a
//! failure never leaves a half-written or disagreeing bundle.

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
    /// MatMulNBits accuracy level for ONNX targets (0: f32 activations).
    pub onnx_accuracy_level: i64,
    /// The LM head's accuracy level for ONNX targets (4: an 8-bit head on int8 activations).
    pub onnx_head_accuracy_level: i64,
    /// For the manifest: the model's version, the checkpoint's sha256, the optimizer options.
    pub model_version: String,
    pub source_sha256: String,
    pub options: std::collections::BTreeMap<String, String>,
    /// Run the smoke set on the bundle's executor before accepting it.
    pub smoke_check: bool,
    /// GPU adapter for the smoke check (as `--adapter`).
    pub adapter: Option<String>,
}

/// Share of a device's RAM a bundle may plan to use: the OS and other apps need the rest.
pub const RAM_BUDGET_FRACTION: f64 = 0.5;

/// Files of one target's artifact, relative to its directory.
enum Artifact {
    Gpu(GpuOutput),
    Onnx { manifest: slmc_targets::artifact::OnnxArtifact, files: std::collections::BTreeMap<String, Vec<u8>> },
    Coreml { manifest: slmc_targets::artifact::CoremlArtifact, files: std::collections::BTreeMap<String, Vec<u8>> },
}

fn digests_of(files: &std::collections::BTreeMap<String, Vec<u8>>) -> Vec<slmc_targets::artifact::FileDigest> {
    files
        .iter()
        .map(|(path, bytes)| slmc_targets::artifact::FileDigest {
            path: path.clone(),
            bytes: bytes.len() as u64,
            sha256: slmc_targets::artifact::sha256_hex(bytes),
        })
        .collect()
}

fn model_name(model: &Model) -> String {
    model.path.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_string()
}

/// Writes the artifact for `target` into `out_root/<target>/`; returns that directory.
pub fn compile_target(
    model: &Model,
    optimized: &Optimized,
    target: &str,
    out_root: &Path,
    opts: &CompileOptions,
    smoke: &slmc_targets::bundle::SmokeSet,
    quality: Option<&serde_json::Value>,
) -> Result<PathBuf> {
    let profile = slmc_targets::lookup(target)?;
    let weights = Layered { top: &optimized.derived, base: &model.weights };
    let context_len = opts.context_len.min(model.config.max_position_embeddings);
    let model_info = slmc_targets::artifact::ModelInfo {
        name: model_name(model),
        vocab_size: 0,
        eos_token_ids: model.config.eos_token_ids.clone(),
        context_len,
        max_step_tokens: opts.max_step_tokens,
    };
    let artifact = match profile.backend.as_str() {
        "wgsl" | "spirv" | "msl" => {
            let gpu = GpuOptions {
                target: profile.name.clone(),
                model_name: model_info.name.clone(),
                eos_token_ids: model_info.eos_token_ids.clone(),
                context_len,
                max_step_tokens: opts.max_step_tokens,
                max_binding_bytes: opts.max_binding_bytes.or(profile.binding_limit()).unwrap_or(u64::MAX),
                max_buffer_bytes: profile.buffer_limit().unwrap_or(u64::MAX),
                features: slmc_backends::gpu::GpuFeatures::of_profile(profile),
            };
            let out = slmc_backends::gpu::compile(&optimized.graph, &weights, &gpu)
                .with_context(|| format!("target {target}"))?;
            Artifact::Gpu(out)
        }
        "onnx" => {
            use slmc_backends::onnx::{OnnxOptions, OnnxProfile};
            let profile_kind = if profile.onnx_profile.as_deref() == Some("portable") {
                OnnxProfile::Portable
            } else {
                OnnxProfile::OrtContrib
            };
            let onnx_opts = OnnxOptions {
                profile: profile_kind,
                model_name: model_info.name.clone(),
                context_len,
                accuracy_level: opts.onnx_accuracy_level,
                head_accuracy_level: opts.onnx_head_accuracy_level,
            };
            let out = slmc_backends::onnx::compile(&optimized.graph, &weights, &onnx_opts)
                .with_context(|| format!("target {target}"))?;
            let files_meta = digests_of(&out.files);
            let manifest = slmc_targets::artifact::OnnxArtifact {
                format: slmc_targets::artifact::ONNX_ARTIFACT_FORMAT.into(),
                target: profile.name.clone(),
                profile: match profile_kind {
                    OnnxProfile::OrtContrib => "ort-contrib".into(),
                    OnnxProfile::Portable => "portable".into(),
                },
                model: slmc_targets::artifact::ModelInfo { vocab_size: out.info.vocab, ..model_info },
                layers: out.info.layers,
                kv_heads: out.info.kv_heads,
                head_dim: out.info.head_dim,
                accuracy_level: opts.onnx_accuracy_level,
                head_accuracy_level: opts.onnx_head_accuracy_level,
                kv_buffer_shared: out.info.kv_buffer_shareable,
                files: files_meta,
            };
            let mut files = out.files;
            files.insert("genai_config.json".into(), genai_config(model, &manifest, &out.info)?);
            Artifact::Onnx { manifest, files }
        }
        "coreml" => {
            use slmc_backends::coreml::{CoremlOptions, Deployment};
            let settings = profile.coreml.as_ref().with_context(|| format!("target {target}: no Core ML settings"))?;
            let deployment = if settings.specification_version >= 9 { Deployment::Ios18 } else { Deployment::Ios17 };
            // Static shapes: the profile's context unless --context asks for less.
            let context_len = context_len.min(settings.max_context_len);
            if context_len < settings.step_tokens {
                bail!(
                    "target {target}: a context of {context_len} positions is shorter than one step of {} tokens",
                    settings.step_tokens
                );
            }
            let coreml_opts = CoremlOptions {
                deployment,
                model_name: model_info.name.clone(),
                context_len,
                step_tokens: settings.step_tokens,
            };
            let out = slmc_backends::coreml::compile(&optimized.graph, &weights, &coreml_opts)
                .with_context(|| format!("target {target}"))?;
            let manifest = slmc_targets::artifact::CoremlArtifact {
                format: slmc_targets::artifact::COREML_ARTIFACT_FORMAT.into(),
                target: profile.name.clone(),
                specification_version: settings.specification_version,
                package: slmc_backends::coreml::PACKAGE_DIR.into(),
                model: slmc_targets::artifact::ModelInfo {
                    vocab_size: out.info.vocab,
                    context_len,
                    max_step_tokens: settings.step_tokens,
                    ..model_info
                },
                step_tokens: settings.step_tokens,
                layers: out.info.layers,
                kv_heads: out.info.kv_heads,
                head_dim: out.info.head_dim,
                kv_cache: deployment.kv_cache().into(),
                placement: out.placement,
                files: digests_of(&out.files),
            };
            Artifact::Coreml { manifest, files: out.files }
        }
        backend => bail!("target {target}: no backend writes `{backend}` artifacts"),
    };
    let memory = memory_plan(optimized, &artifact, context_len, profile);
    if let (Some(ram), true) = (memory.device_ram_bytes, memory.total_bytes > 0) {
        let budget = (ram as f64 * RAM_BUDGET_FRACTION) as u64;
        if memory.total_bytes > budget {
            bail!(
                "target {target}: the bundle needs {} bytes (weights {}, KV cache at {} positions {}, activations {}) but the device's budget is {budget} bytes ({:.0}% of {ram}); lower --context or quantize further",
                memory.total_bytes, memory.weight_bytes, context_len, memory.kv_cache_bytes, memory.activation_bytes, RAM_BUDGET_FRACTION * 100.0
            );
        }
    }
    let dir = out_root.join(&profile.name);
    crate::output::write_dir_atomically(&dir, opts.force, |tmp| {
        write_artifact(tmp, model, optimized, &artifact)?;
        let mut manifest = bundle_manifest(tmp, model, optimized, profile, opts, &artifact, memory, smoke)?;
        manifest.quality = quality.cloned();
        std::fs::write(tmp.join(slmc_targets::bundle::MANIFEST_FILE), serde_json::to_string_pretty(&manifest)? + "\n")?;
        if opts.smoke_check {
            check_smoke(tmp, &artifact, smoke, opts).with_context(|| format!("target {target}: golden smoke check"))?;
        }
        Ok(())
    })?;
    Ok(dir)
}

/// Runs the smoke set on the bundle's own executor (the directory is not yet in place).
fn check_smoke(
    dir: &Path,
    artifact: &Artifact,
    smoke: &slmc_targets::bundle::SmokeSet,
    opts: &CompileOptions,
) -> Result<()> {
    let mut exec: Box<dyn slmc_runtime::Executor> = match artifact {
        Artifact::Gpu(_) => Box::new(
            slmc_runtime::gpu::GpuExecutor::load(dir, opts.adapter.as_deref())
                .context("cannot run the bundle here (pass --skip-smoke-check to compile without running it)")?,
        ),
        Artifact::Onnx { .. } => Box::new(
            slmc_runtime::onnx::OnnxExecutor::load(dir, 0)
                .context("cannot run the bundle here (pass --skip-smoke-check to compile without running it)")?,
        ),
        // Core ML exists only on Apple systems: the smoke set runs the package's own MIL
        // program on slmc's reference MIL interpreter instead.
        Artifact::Coreml { .. } => Box::new(crate::coreml_exec::MilReferenceExecutor::load(dir)?),
    };
    for o in crate::bundle::run_smoke(exec.as_mut(), smoke)? {
        if !o.passed {
            bail!(
                "prompt of {} tokens {:?}: generated {:?}, the reference {:?}: {} leading tokens agree, {} required; teacher-forced, {} of {} checked prompt positions differ ({:?})",
                o.prompt_ids.len(),
                &o.prompt_ids[..o.prompt_ids.len().min(16)],
                o.generated_ids,
                o.expected_ids,
                o.matching_prefix,
                o.required_prefix,
                o.prompt_mismatches.len(),
                o.prompt_positions_checked,
                o.prompt_mismatches
            );
        }
    }
    Ok(())
}

fn memory_plan(
    optimized: &Optimized,
    artifact: &Artifact,
    context_len: usize,
    profile: &slmc_targets::TargetProfile,
) -> slmc_targets::bundle::MemoryPlan {
    use slmc_targets::artifact::BufferKind;
    let (weight_bytes, kv_cache_bytes, activation_bytes) = match artifact {
        Artifact::Gpu(out) => {
            let sum = |f: &dyn Fn(&BufferKind) -> bool| -> u64 {
                out.artifact.buffers.iter().filter(|b| f(&b.kind)).map(|b| b.bytes).sum()
            };
            (
                sum(&|k| matches!(k, BufferKind::Weight { .. } | BufferKind::Table { .. })),
                sum(&|k| matches!(k, BufferKind::Cache)),
                sum(&|k| matches!(k, BufferKind::Activation | BufferKind::Input)),
            )
        }
        Artifact::Onnx { manifest, files } => {
            let weights = files.get(slmc_targets::artifact::ONNX_DATA_FILE).map(|f| f.len() as u64).unwrap_or(0);
            let kv = (manifest.layers * 2 * manifest.kv_heads * manifest.head_dim * 4 * context_len) as u64;
            let act = optimized.memory_plan.as_ref().map(|m| m.prefill.arena_bytes as u64).unwrap_or(0);
            (weights, kv, act)
        }
        Artifact::Coreml { manifest, files } => {
            let weights = files.get(slmc_backends::coreml::WEIGHTS_FILE).map(|f| f.len() as u64).unwrap_or(0);
            // fp16 cache of the static context.
            let kv =
                (manifest.layers * 2 * manifest.kv_heads * manifest.head_dim * 2 * manifest.model.context_len) as u64;
            let act = optimized.memory_plan.as_ref().map(|m| m.prefill.arena_bytes as u64).unwrap_or(0);
            (weights, kv, act)
        }
    };
    slmc_targets::bundle::MemoryPlan {
        weight_bytes,
        kv_cache_bytes,
        activation_bytes,
        total_bytes: weight_bytes + kv_cache_bytes + activation_bytes,
        context_len,
        device_ram_bytes: profile.ram_bytes,
    }
}

#[allow(clippy::too_many_arguments)]
fn bundle_manifest(
    dir: &Path,
    model: &Model,
    optimized: &Optimized,
    profile: &slmc_targets::TargetProfile,
    opts: &CompileOptions,
    artifact: &Artifact,
    memory: slmc_targets::bundle::MemoryPlan,
    smoke: &slmc_targets::bundle::SmokeSet,
) -> Result<slmc_targets::bundle::BundleManifest> {
    use slmc_targets::bundle::*;
    let weights = Layered { top: &optimized.derived, base: &model.weights };
    let mut weight_dtypes = std::collections::BTreeMap::new();
    let mut ops_total = 0;
    let mut seen = std::collections::BTreeSet::new();
    for (_, node) in optimized.graph.nodes() {
        match &node.op {
            slmc_ir::Op::Weight { name } => {
                if seen.insert(name.clone()) {
                    if let Some(v) = slmc_ir::WeightSource::view(&weights, name) {
                        *weight_dtypes.entry(v.dtype.name().to_string()).or_insert(0u64) += v.bytes.len() as u64;
                    }
                }
            }
            slmc_ir::Op::Input { .. } | slmc_ir::Op::Positions => {}
            _ => ops_total += 1,
        }
    }
    let (required, executor) = match artifact {
        Artifact::Gpu(out) => {
            let largest = out.artifact.buffers.iter().map(|b| b.bytes).max();
            (
                BundleRequirements {
                    max_storage_buffer_binding_size: largest,
                    max_buffer_size: largest,
                    features: out.artifact.required_features.clone(),
                    executor: "wgpu".into(),
                },
                "wgpu",
            )
        }
        Artifact::Onnx { .. } => (
            BundleRequirements {
                max_storage_buffer_binding_size: None,
                max_buffer_size: None,
                features: vec![],
                executor: "onnxruntime".into(),
            },
            "onnxruntime",
        ),
        Artifact::Coreml { .. } => (
            BundleRequirements {
                max_storage_buffer_binding_size: None,
                max_buffer_size: None,
                features: vec![],
                executor: "coreml".into(),
            },
            "coreml",
        ),
    };
    let note = match (&profile.npu, artifact) {
        (Some(npu), Artifact::Coreml { manifest, .. }) => {
            let p = &manifest.placement;
            let off: Vec<String> = p.off_neural_engine.iter().map(|(why, n)| format!("{n}: {why}")).collect();
            format!(
                "estimate by slmc's written placement rules (Core ML decides at load time): {} of {} program ops on the {npu}; off it: {}",
                p.ops_on_neural_engine,
                p.ops_total,
                off.join("; ")
            )
        }
        (npu, _) => match npu {
        Some(npu) => format!(
            "the device has an NPU ({npu}, reached through {}); this {executor} bundle runs on the {}, so no op is placed on it",
            profile.npu_runtime.as_deref().unwrap_or("an unknown runtime"),
            if executor == "wgpu" { "GPU" } else { "CPU" }
        ),
        None => "the device has no known NPU".into(),
        },
    };
    let (ops_on_npu, ops_total) = match artifact {
        Artifact::Coreml { manifest, .. } => (manifest.placement.ops_on_neural_engine, manifest.placement.ops_total),
        _ => (0, ops_total),
    };
    let arch = model.config.arch_name.clone();
    Ok(BundleManifest {
        schema: BUNDLE_SCHEMA.into(),
        model: BundleModel {
            name: model_name(model),
            version: opts.model_version.clone(),
            architecture: arch,
            source_sha256: opts.source_sha256.clone(),
        },
        compiler: BundleCompiler {
            name: "slmc".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            options: opts.options.clone(),
        },
        min_runtime_version: crate::bundle::MIN_RUNTIME_VERSION.into(),
        target: BundleTarget {
            name: profile.name.clone(),
            profile_version: profile.version,
            backend: profile.backend.clone(),
            family: profile.family.clone(),
        },
        quantization: BundleQuantization {
            weights: opts.options.get("quant").cloned().unwrap_or_else(|| "as stored".into()),
            kv_cache: optimized.kv_quant.name().into(),
            weight_dtypes,
        },
        required,
        npu_support: NpuSupport { npu: profile.npu.clone(), ops_on_npu, ops_total, note },
        memory,
        quality: None,
        smoke: smoke.clone(),
        files: crate::bundle::file_digests(dir)?,
    })
}

/// `genai_config.json` so onnxruntime-genai loads the artifact directory as it is (the
/// tokenizer files sit beside it). Greedy search by default, the artifact's context as the
/// maximum length, and shared past/present buffers when every layer's attention is
/// GroupQueryAttention (it appends in place; without sharing, every step copies the whole
/// cache into a new present tensor: 1.2x decode on SmolLM2's fastest configuration).
fn genai_config(
    model: &Model,
    manifest: &slmc_targets::artifact::OnnxArtifact,
    info: &slmc_backends::onnx::OnnxModelInfo,
) -> Result<Vec<u8>> {
    let c = &model.config;
    let model_type = match c.arch {
        crate::import::config::Arch::Llama => "llama",
        crate::import::config::Arch::Qwen2 => "qwen2",
        crate::import::config::Arch::Phi3 => "phi3",
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

fn write_artifact(dir: &Path, model: &Model, optimized: &Optimized, artifact: &Artifact) -> Result<()> {
    let (files, manifest) = match artifact {
        Artifact::Gpu(output) => (&output.files, serde_json::to_string_pretty(&output.artifact)?),
        Artifact::Onnx { manifest, files } => (files, serde_json::to_string_pretty(manifest)?),
        Artifact::Coreml { manifest, files } => (files, serde_json::to_string_pretty(manifest)?),
    };
    for (rel, bytes) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("{}: cannot write", path.display()))?;
    }
    std::fs::write(dir.join("artifact.json"), manifest + "\n")?;
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
