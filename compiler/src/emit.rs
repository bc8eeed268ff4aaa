//! The compiler's backend registry: one emitter per artifact kind, chosen by the target
//! profile's typed backend. Each takes the verified graph and returns an [`Emitted`]
//! artifact (files, `artifact.json`, what the bundle manifest needs to know), so the bundle
//! writer, memory check and smoke check never ask which backend ran.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use slmc_backends::gpu::kernels::CacheLayout;
use slmc_ir::{KvQuant, Op, Verified, WeightSource};
use slmc_targets::artifact::{FileDigest, ModelInfo, NePlacement};
use slmc_targets::{ArtifactKind, BackendKind, TargetProfile};

use crate::compile::CompileOptions;
use crate::import::Model;
use crate::optimize::Optimized;

/// What every emitter is handed.
pub struct EmitInput<'a> {
    pub model: &'a Model,
    pub optimized: &'a Optimized,
    pub verified: &'a Verified<'a>,
    pub weights: &'a dyn WeightSource,
    pub profile: &'a TargetProfile,
    pub opts: &'a CompileOptions,
    pub model_info: ModelInfo,
    /// The KV-cache positions asked for (`--context`, capped by the model).
    pub context_len: usize,
    /// The artifact's directory while it is written: emitters write weight files straight
    /// into it (None: every file in memory).
    pub dir: Option<&'a std::path::Path>,
}

/// One target's artifact, as the bundle writer needs it.
pub struct Emitted {
    pub kind: ArtifactKind,
    /// `artifact.json`.
    pub manifest_json: String,
    /// Files relative to the artifact directory.
    pub files: BTreeMap<String, Vec<u8>>,
    /// The digests the emitter took of its files (the artifact manifest's list), which the
    /// bundle manifest reuses rather than hash a multi-gigabyte weight file twice.
    pub digests: Vec<FileDigest>,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    pub activation_bytes: u64,
    /// GPU limits and features the artifact needs (None / empty elsewhere).
    pub max_binding_bytes: Option<u64>,
    pub features: Vec<String>,
    /// Where Core ML may place the program's ops (Core ML artifacts).
    pub placement: Option<NePlacement>,
    /// What each layer's cache keeps, for models with sliding-window layers.
    pub kv_cache_layout: Option<String>,
    /// Stored weight types the artifact does not carry as stored.
    pub weight_conversions: BTreeMap<String, Vec<String>>,
}

/// The attention layers' windows (None: the whole context), in layer order.
fn attention_windows(graph: &slmc_ir::Graph) -> Vec<Option<usize>> {
    graph
        .nodes()
        .filter_map(|(_, node)| match &node.op {
            Op::Gqa { limits, .. } | Op::Attention { limits, .. } => Some(limits.window),
            _ => None,
        })
        .collect()
}

/// "n layers keep k positions, ..." (largest first) and why, for caches of `per_layer`
/// positions; None when no layer slides (`windows`: every bundle without windows keeps its
/// bytes).
fn ring_layout(windows: &[Option<usize>], per_layer: &[usize], why: &str) -> Option<String> {
    windows.iter().any(|w| w.is_some()).then(|| {
        let mut kept: BTreeMap<usize, usize> = BTreeMap::new();
        for slots in per_layer {
            *kept.entry(*slots).or_default() += 1;
        }
        let parts: Vec<String> = kept
            .iter()
            .rev()
            .map(|(slots, n)| {
                if *n == 1 {
                    format!("1 layer keeps {slots} positions")
                } else {
                    format!("{n} layers keep {slots} positions")
                }
            })
            .collect();
        format!("{} ({why})", parts.join(", "))
    })
}

/// The cache layout of a backend that keeps the whole context in every layer, said only
/// when some layers slide (they mask what they do not see).
fn whole_context_layout(windows: &[Option<usize>], context: usize, why: &str) -> Option<String> {
    let sliding = windows.iter().filter(|w| w.is_some()).count();
    (sliding > 0).then(|| {
        format!(
            "all {} layers keep all {context} positions; the {sliding} sliding-window layers mask the positions \
             they do not see ({why})",
            windows.len()
        )
    })
}

pub type Emitter = fn(&EmitInput) -> Result<Emitted>;

/// The registry: the emitter for a profile's backend.
pub fn emitter(backend: BackendKind) -> Emitter {
    match backend.artifact() {
        ArtifactKind::Gpu => emit_gpu,
        ArtifactKind::Onnx => emit_onnx,
        ArtifactKind::Coreml => emit_coreml,
    }
}

/// The size of one of an artifact's files, from the digests its manifest lists (0 when absent).
fn listed_len(digests: &[FileDigest], name: &str) -> u64 {
    digests.iter().find(|d| d.path == name).map_or(0, |d| d.bytes)
}

fn activation_bytes(optimized: &Optimized) -> u64 {
    optimized.memory_plan.as_ref().map(|m| m.prefill.arena_bytes as u64).unwrap_or(0)
}

fn emit_gpu(i: &EmitInput) -> Result<Emitted> {
    use slmc_backends::gpu::{GpuFeatures, GpuOptions};
    use slmc_targets::artifact::BufferKind;
    let gpu = GpuOptions {
        target: i.profile.name.clone(),
        model_name: i.model_info.name.clone(),
        eos_token_ids: i.model_info.eos_token_ids.clone(),
        context_len: i.context_len,
        max_step_tokens: i.opts.max_step_tokens,
        max_binding_bytes: i.opts.max_binding_bytes.or(i.profile.binding_limit()).unwrap_or(u64::MAX),
        max_buffer_bytes: i.profile.buffer_limit().unwrap_or(u64::MAX),
        features: GpuFeatures::of_profile(i.profile),
        weights_dir: i.dir.map(Path::to_path_buf),
    };
    let out = slmc_backends::gpu::compile(i.verified, i.weights, &gpu)?;
    let windows = attention_windows(&i.optimized.graph);
    let per_layer: Vec<usize> =
        windows.iter().map(|w| CacheLayout::for_window(i.context_len, *w, gpu.max_step_tokens).slots).collect();
    let why = format!(
        "a sliding-window layer keeps a ring of window + step - 1 positions, step {}; context {}",
        gpu.max_step_tokens, i.context_len
    );
    let kv_cache_layout = ring_layout(&windows, &per_layer, &why);
    let sum = |f: &dyn Fn(&BufferKind) -> bool| -> u64 {
        out.artifact.buffers.iter().filter(|b| f(&b.kind)).map(|b| b.bytes).sum()
    };
    Ok(Emitted {
        kind: ArtifactKind::Gpu,
        manifest_json: serde_json::to_string_pretty(&out.artifact)?,
        weight_bytes: sum(&|k| matches!(k, BufferKind::Weight { .. } | BufferKind::Table { .. })),
        kv_cache_bytes: sum(&|k| matches!(k, BufferKind::Cache)),
        activation_bytes: sum(&|k| matches!(k, BufferKind::Activation | BufferKind::Input)),
        max_binding_bytes: out.artifact.buffers.iter().map(|b| b.bytes).max(),
        features: out.artifact.required_features.clone(),
        placement: None,
        kv_cache_layout,
        weight_conversions: out.conversions.into_map(),
        files: out.files,
        digests: out.artifact.files.clone(),
    })
}

fn emit_onnx(i: &EmitInput) -> Result<Emitted> {
    use slmc_backends::onnx::{OnnxOptions, OnnxProfile};
    let profile_kind = if i.profile.onnx_profile.as_deref() == Some("portable") {
        OnnxProfile::Portable
    } else {
        OnnxProfile::OrtContrib
    };
    let onnx_opts = OnnxOptions {
        profile: profile_kind,
        model_name: i.model_info.name.clone(),
        context_len: i.context_len,
        accuracy_level: i.opts.onnx_accuracy_level,
        head_accuracy_level: i.opts.onnx_head_accuracy_level,
        weights_dir: i.dir.map(Path::to_path_buf),
    };
    let out = slmc_backends::onnx::compile(i.verified, i.weights, &onnx_opts)?;
    let manifest = slmc_targets::artifact::OnnxArtifact {
        format: ArtifactKind::Onnx.format().into(),
        target: i.profile.name.clone(),
        profile: match profile_kind {
            OnnxProfile::OrtContrib => "ort-contrib".into(),
            OnnxProfile::Portable => "portable".into(),
        },
        model: ModelInfo { vocab_size: out.info.vocab, ..i.model_info.clone() },
        layers: out.info.layers,
        kv_heads: out.info.kv_heads,
        head_dim: out.info.head_dim,
        accuracy_level: i.opts.onnx_accuracy_level,
        head_accuracy_level: i.opts.onnx_head_accuracy_level,
        kv_buffer_shared: out.info.kv_buffer_shareable,
        files: slmc_targets::artifact::file_digests(&out.files, i.dir, &out.written)?,
    };
    let mut files = out.files;
    files.insert("genai_config.json".into(), crate::genai::genai_config(i.model, &manifest, &out.info)?);
    let weight_bytes = listed_len(&manifest.files, slmc_targets::artifact::ONNX_DATA_FILE);
    // f32 cache of the whole context.
    let per_vector = KvQuant::F32.data_bytes_per_vector(manifest.head_dim);
    let kv_cache_bytes = (manifest.layers * 2 * manifest.kv_heads * per_vector * i.context_len) as u64;
    Ok(Emitted {
        kind: ArtifactKind::Onnx,
        manifest_json: serde_json::to_string_pretty(&manifest)?,
        files,
        digests: manifest.files.clone(),
        weight_bytes,
        kv_cache_bytes,
        activation_bytes: activation_bytes(i.optimized),
        max_binding_bytes: None,
        features: vec![],
        placement: None,
        kv_cache_layout: whole_context_layout(
            &attention_windows(&i.optimized.graph),
            i.context_len,
            match profile_kind {
                OnnxProfile::OrtContrib => {
                    "ONNX Runtime's GroupQueryAttention reads one past buffer of the whole context"
                }
                OnnxProfile::Portable => "the graph's past key/value inputs span the whole context",
            },
        ),
        weight_conversions: out.conversions.into_map(),
    })
}

fn emit_coreml(i: &EmitInput) -> Result<Emitted> {
    use slmc_backends::coreml::{CoremlOptions, Deployment};
    let target = &i.profile.name;
    let settings = i.profile.coreml.as_ref().with_context(|| format!("target {target}: no Core ML settings"))?;
    let deployment = if settings.specification_version >= 9 { Deployment::Ios18 } else { Deployment::Ios17 };
    // Static shapes: the profile's context unless --context asks for less.
    let context_len = i.context_len.min(settings.max_context_len);
    if context_len < settings.step_tokens {
        bail!(
            "target {target}: a context of {context_len} positions is shorter than one step of {} tokens",
            settings.step_tokens
        );
    }
    let coreml_opts = CoremlOptions {
        deployment,
        model_name: i.model_info.name.clone(),
        context_len,
        step_tokens: settings.step_tokens,
        weights_dir: i.dir.map(Path::to_path_buf),
    };
    let out = slmc_backends::coreml::compile(i.verified, i.weights, &coreml_opts)?;
    let manifest = slmc_targets::artifact::CoremlArtifact {
        format: ArtifactKind::Coreml.format().into(),
        target: target.clone(),
        specification_version: settings.specification_version,
        package: slmc_backends::coreml::PACKAGE_DIR.into(),
        model: ModelInfo {
            vocab_size: out.info.vocab,
            context_len,
            max_step_tokens: settings.step_tokens,
            ..i.model_info.clone()
        },
        step_tokens: settings.step_tokens,
        layers: out.info.layers,
        kv_heads: out.info.kv_heads,
        head_dim: out.info.head_dim,
        kv_cache: deployment.kv_cache().into(),
        placement: out.placement,
        files: slmc_targets::artifact::file_digests(&out.files, i.dir, &out.written)?,
    };
    let weight_bytes = listed_len(&manifest.files, slmc_backends::coreml::WEIGHTS_FILE);
    // fp16 caches: the static context, or a sliding layer's ring.
    let per_vector = KvQuant::F16.data_bytes_per_vector(manifest.head_dim);
    let kv_cache_bytes =
        out.info.cache_positions.iter().map(|slots| (2 * manifest.kv_heads * per_vector * slots) as u64).sum();
    let why = format!(
        "a sliding-window layer keeps a ring: {}; context {}",
        match deployment {
            Deployment::Ios17 => "window + step - 1 positions before the step, which comes with its own keys",
            Deployment::Ios18 => "window + 2 x step - 1 slots of state, each step written contiguously",
        },
        manifest.model.context_len
    );
    Ok(Emitted {
        kind: ArtifactKind::Coreml,
        manifest_json: serde_json::to_string_pretty(&manifest)?,
        weight_bytes,
        kv_cache_bytes,
        activation_bytes: activation_bytes(i.optimized),
        max_binding_bytes: None,
        features: vec![],
        kv_cache_layout: ring_layout(&attention_windows(&i.optimized.graph), &out.info.cache_positions, &why),
        weight_conversions: out.conversions.into_map(),
        files: out.files,
        digests: manifest.files.clone(),
        placement: Some(manifest.placement),
    })
}
