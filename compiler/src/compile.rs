//! `slmc compile`: optimize once, then write one bundle per target under OUT/<target>/:
//! the backend's artifact plus `manifest.json` (see `slmc_targets::bundle`). Per-target
//! checks fail early (binding limits, the device's memory budget); the bundle's golden
//! smoke set runs on its own executor before the directory is renamed into place, so a
//! failure never leaves a half-written or disagreeing bundle.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use slmc_ir::Layered;

use crate::emit::{EmitInput, Emitted};
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
    /// The eval set to store in the bundle and gate it on.
    pub eval: Option<std::sync::Arc<EvalGate>>,
}

/// An eval set with the unquantized model's results on it: a bundle whose accuracy falls
/// more than `max_drop` points below `base`'s is not written.
pub struct EvalGate {
    pub set: crate::evalset::EvalSet,
    pub base: Vec<crate::evalset::ItemOutcome>,
    pub max_drop: f64,
}

/// Share of a device's RAM a bundle may plan to use: the OS and other apps need the rest.
pub const RAM_BUDGET_FRACTION: f64 = 0.5;

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
    if let Some(limit) = slmc_ir::rotary::long_rope_switch(&optimized.graph).filter(|l| context_len > *l) {
        bail!(
            "target {target}: {} uses LongRoPE (op `rope`, scaling longrope): past {limit} positions a sequence \
             is re-encoded with the long factors at every position, which compiled caches do not do; compile \
             with --context {limit} or less (this bundle asked for {context_len})",
            model.config.arch_name
        );
    }
    let verified = slmc_ir::Verified::new(&optimized.graph).with_context(|| format!("target {target}"))?;
    let dir = out_root.join(&profile.name);
    crate::output::write_dir_atomically(&dir, opts.force, |tmp| {
        // The emitter writes the weight file straight into the directory; the other files
        // are written and released one at a time, so the bundle never holds its weights
        // twice (nor once beside the checkpoint).
        let input = EmitInput {
            model,
            optimized,
            verified: &verified,
            weights: &weights,
            profile,
            opts,
            model_info,
            context_len,
            dir: Some(tmp),
        };
        let mut artifact = crate::emit::emitter(profile.backend)(&input).with_context(|| format!("target {target}"))?;
        let files = std::mem::take(&mut artifact.files);
        let memory = memory_plan(&artifact, context_len, profile);
        let memory_weight_bytes = memory.weight_bytes;
        if let (Some(ram), true) = (memory.device_ram_bytes, memory.total_bytes > 0) {
            let budget = (ram as f64 * RAM_BUDGET_FRACTION) as u64;
            if memory.total_bytes > budget {
                bail!(
                    "target {target}: the bundle needs {} bytes (weights {}, KV cache at {} positions {}, activations {}) but the device's budget is {budget} bytes ({:.0}% of {ram}); lower --context or quantize further",
                    memory.total_bytes, memory.weight_bytes, context_len, memory.kv_cache_bytes, memory.activation_bytes, RAM_BUDGET_FRACTION * 100.0
                );
            }
        }
        write_artifact(tmp, model, optimized, files, &artifact.manifest_json)?;
        let eval = match &opts.eval {
            Some(gate) => {
                Some(eval_gate(tmp, model, gate, opts).with_context(|| format!("target {target}: eval gate"))?)
            }
            None => None,
        };
        let mut manifest = bundle_manifest(tmp, model, optimized, profile, opts, &artifact, memory, smoke)?;
        manifest.quality = quality.cloned();
        manifest.eval = eval;
        manifest.cost = Some(crate::cost::cost_model(&optimized.graph, memory_weight_bytes, profile, context_len));
        std::fs::write(tmp.join(slmc_targets::bundle::MANIFEST_FILE), serde_json::to_string_pretty(&manifest)? + "\n")?;
        if opts.smoke_check {
            check_smoke(tmp, smoke, opts).with_context(|| format!("target {target}: golden smoke check"))?;
        }
        Ok(())
    })?;
    Ok(dir)
}

/// Runs the smoke set on the bundle's own executor (the directory is not yet in place).
fn check_smoke(dir: &Path, smoke: &slmc_targets::bundle::SmokeSet, opts: &CompileOptions) -> Result<()> {
    // Core ML exists only on Apple systems: the smoke set runs the package's own MIL
    // program on slmc's reference MIL interpreter instead.
    let open = slmc_runtime::registry::OpenOptions { adapter: opts.adapter.clone(), threads: 0, mil_reference: true };
    let mut exec = slmc_runtime::registry::open(dir, &open)
        .context("cannot run the bundle here (pass --skip-smoke-check to compile without running it)")?
        .exec;
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

/// Stores the eval set in the bundle being written, runs it on the bundle's own executor
/// and refuses the bundle when its accuracy drops more than the gate allows below the
/// unquantized model's; returns the figures for the manifest.
fn eval_gate(dir: &Path, model: &Model, gate: &EvalGate, opts: &CompileOptions) -> Result<serde_json::Value> {
    use crate::evalset;
    std::fs::write(dir.join(evalset::EVAL_SET_FILE), serde_json::to_string_pretty(&gate.set)? + "\n")?;
    let tokenizer = model.tokenizer.as_ref().map_err(|e| anyhow!("{e}"))?;
    let open = slmc_runtime::registry::OpenOptions { adapter: opts.adapter.clone(), threads: 0, mil_reference: true };
    let mut exec = slmc_runtime::registry::open(dir, &open).context("cannot run the bundle here to evaluate it")?.exec;
    let outcomes = evalset::run(exec.as_mut(), &gate.set, tokenizer, &model.config.eos_token_ids)?;
    let (base, accuracy) = (evalset::accuracy(&gate.base), evalset::accuracy(&outcomes));
    let regressed = evalset::regressions(&gate.base, &outcomes);
    if base - accuracy > gate.max_drop {
        bail!(
            "accuracy {accuracy:.1}% on the eval set against the unquantized model's {base:.1}%: a drop of {:.1} points, more than {}; regressed items: {}",
            base - accuracy,
            gate.max_drop,
            regressed.join(", ")
        );
    }
    Ok(serde_json::json!({
        "items": outcomes.len(), "accuracy": accuracy, "base_accuracy": base, "max_drop": gate.max_drop,
        "regressed": regressed, "totals": evalset::totals(&outcomes),
    }))
}

fn memory_plan(
    artifact: &Emitted,
    context_len: usize,
    profile: &slmc_targets::TargetProfile,
) -> slmc_targets::bundle::MemoryPlan {
    let (weight_bytes, kv_cache_bytes, activation_bytes) =
        (artifact.weight_bytes, artifact.kv_cache_bytes, artifact.activation_bytes);
    slmc_targets::bundle::MemoryPlan {
        weight_bytes,
        kv_cache_bytes,
        activation_bytes,
        total_bytes: weight_bytes + kv_cache_bytes + activation_bytes,
        context_len,
        device_ram_bytes: profile.ram_bytes,
        kv_cache_layout: artifact.kv_cache_layout.clone(),
    }
}

#[allow(clippy::too_many_arguments)]
fn bundle_manifest(
    dir: &Path,
    model: &Model,
    optimized: &Optimized,
    profile: &slmc_targets::TargetProfile,
    opts: &CompileOptions,
    artifact: &Emitted,
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
    let executor = artifact.kind.executor_name();
    let required = BundleRequirements {
        max_storage_buffer_binding_size: artifact.max_binding_bytes,
        max_buffer_size: artifact.max_binding_bytes,
        features: artifact.features.clone(),
        executor: executor.into(),
    };
    let note = match (&profile.npu, &artifact.placement) {
        (Some(npu), Some(p)) => {
            let off: Vec<String> = p.off_neural_engine.iter().map(|(why, n)| format!("{n}: {why}")).collect();
            format!(
                "estimate by slmc's written placement rules (Core ML decides at load time): {} of {} program ops on the {npu}; off it: {}",
                p.ops_on_neural_engine,
                p.ops_total,
                off.join("; ")
            )
        }
        (Some(npu), None) => format!(
            "the device has an NPU ({npu}, reached through {}); this {executor} bundle runs on the {}, so no op is placed on it",
            profile.npu_runtime.as_deref().unwrap_or("an unknown runtime"),
            if artifact.kind == slmc_targets::ArtifactKind::Gpu { "GPU" } else { "CPU" }
        ),
        (None, _) => "the device has no known NPU".into(),
    };
    let (ops_on_npu, ops_total) = match &artifact.placement {
        Some(p) => (p.ops_on_neural_engine, p.ops_total),
        None => (0, ops_total),
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
            backend: profile.backend,
            family: profile.family.clone(),
        },
        quantization: BundleQuantization {
            weights: opts.options.get("quant").cloned().unwrap_or_else(|| "as stored".into()),
            kv_cache: optimized.kv_quant.name().into(),
            weight_dtypes,
            weight_conversions: artifact.weight_conversions.clone(),
        },
        required,
        npu_support: NpuSupport { npu: profile.npu.clone(), ops_on_npu, ops_total, note },
        memory,
        cost: None,
        quality: None,
        eval: None,
        smoke: smoke.clone(),
        files: crate::bundle::file_digests(dir, &artifact.digests)?,
    })
}

fn write_artifact(
    dir: &Path,
    model: &Model,
    optimized: &Optimized,
    files: std::collections::BTreeMap<String, Vec<u8>>,
    manifest: &str,
) -> Result<()> {
    for (rel, bytes) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("{}: cannot write", path.display()))?;
    }
    std::fs::write(dir.join("artifact.json"), format!("{manifest}\n"))?;
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
