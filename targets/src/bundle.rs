//! The bundle manifest (`manifest.json` in every compiled target directory): what the
//! bundle is, what it needs, and the sha256 of every file in it. A signature
//! (`manifest.sig`, ed25519 over the manifest's bytes) therefore covers every file.
//!
//! Reproducible by construction: no timestamps, no absolute paths, files sorted by path,
//! maps serialized in key order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::artifact::FileDigest;

pub const BUNDLE_SCHEMA: &str = "slmc-bundle-1";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const SIGNATURE_FILE: &str = "manifest.sig";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    pub schema: String,
    pub model: BundleModel,
    pub compiler: BundleCompiler,
    /// The oldest slmc runtime that can run this bundle.
    pub min_runtime_version: String,
    pub target: BundleTarget,
    pub quantization: BundleQuantization,
    pub required: BundleRequirements,
    pub npu_support: NpuSupport,
    pub memory: MemoryPlan,
    /// What a decode token moves and computes on this target, and the speed the profile's
    /// memory bandwidth allows (absent in bundles from before the cost model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostModel>,
    /// Teacher-forced comparison of the optimized graph with the unoptimized one on the
    /// reference interpreter (method, positions, top-1 agreement, mean KL, perplexities).
    pub quality: Option<serde_json::Value>,
    /// The eval set's figures when the bundle was compiled with one (`eval_set.json`):
    /// accuracy, the unquantized model's, the gate's limit, regressed items, totals per tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<serde_json::Value>,
    pub smoke: SmokeSet,
    /// Every file of the bundle except this manifest and its signature, sorted by path.
    pub files: Vec<FileDigest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleModel {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// sha256 of the source checkpoint (the GGUF file, or the directory's files in name order).
    pub source_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleCompiler {
    pub name: String,
    pub version: String,
    /// The optimizer request that produced the graph (pipeline, quantization, ...).
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleTarget {
    pub name: String,
    pub profile_version: u32,
    pub backend: crate::BackendKind,
    pub family: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleQuantization {
    pub weights: String,
    pub kv_cache: String,
    /// Stored bytes of the weights by dtype, as the artifact holds them.
    pub weight_dtypes: BTreeMap<String, u64>,
    /// Stored types the artifact does not carry as stored, and the forms they became.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weight_conversions: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleRequirements {
    /// Largest single buffer binding (GPU), bytes.
    pub max_storage_buffer_binding_size: Option<u64>,
    pub max_buffer_size: Option<u64>,
    pub features: Vec<String>,
    /// The executor that runs it: `wgpu` or `onnxruntime`.
    pub executor: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NpuSupport {
    /// The device's NPU, if it has one.
    pub npu: Option<String>,
    /// Ops of the graph expected on the NPU, out of all ops, by the placement rules; 0 when
    /// the bundle does not reach the NPU at all.
    pub ops_on_npu: usize,
    pub ops_total: usize,
    pub note: String,
}

/// The cost model of a decode token: every weight is read once (in the layout the target
/// stores), and each attention layer reads the keys and values it attends to. At these
/// model sizes a decode step is bound by memory bandwidth, so the prediction is the
/// profile's bandwidth over the bytes; prefill and energy need compute and power figures
/// no profile states yet (`unpredicted` says so).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CostModel {
    /// 2 x rows x columns of every matrix product (prefill costs this per prompt token too).
    pub matmul_flops_per_token: u64,
    /// Attention layers, identical ones grouped.
    pub attention: Vec<AttentionGroup>,
    pub weight_bytes_per_token: u64,
    /// Bytes and FLOPs of a decode token at the first position and at the last of the
    /// compiled context.
    pub bytes_per_token_first: u64,
    pub bytes_per_token_last: u64,
    pub flops_per_token_first: u64,
    pub flops_per_token_last: u64,
    /// The profile's figure (None: the profile states none, so nothing is predicted).
    pub memory_bandwidth_gbps: Option<f64>,
    pub predicted_decode_tokens_per_s_first: Option<f64>,
    pub predicted_decode_tokens_per_s_last: Option<f64>,
    pub unpredicted: String,
}

/// `layers` attention layers of one shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttentionGroup {
    pub layers: usize,
    pub flops_per_position: u64,
    pub kv_bytes_per_position: u64,
    /// Positions attended to at most (None: the whole context).
    pub window: Option<usize>,
}

impl CostModel {
    /// Bytes a decode token at `position` reads.
    pub fn bytes_at(&self, position: usize) -> u64 {
        self.weight_bytes_per_token + self.per_attended_position(position, |g| g.kv_bytes_per_position)
    }

    /// FLOPs of a decode token at `position`.
    pub fn flops_at(&self, position: usize) -> u64 {
        self.matmul_flops_per_token + self.per_attended_position(position, |g| g.flops_per_position)
    }

    /// Sum over attention groups of layers x `figure` x the positions a token at `position`
    /// attends (its window's, when the group has one).
    fn per_attended_position(&self, position: usize, figure: impl Fn(&AttentionGroup) -> u64) -> u64 {
        let attended = |w: Option<usize>| (position as u64 + 1).min(w.map_or(u64::MAX, |w| w as u64));
        self.attention.iter().map(|g| g.layers as u64 * figure(g) * attended(g.window)).sum()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemoryPlan {
    pub weight_bytes: u64,
    /// KV cache at `context_len` positions.
    pub kv_cache_bytes: u64,
    pub activation_bytes: u64,
    pub total_bytes: u64,
    pub context_len: usize,
    /// The device RAM the total was checked against (None: unknown).
    pub device_ram_bytes: Option<u64>,
    /// How many positions each layer's cache keeps, when not all of them keep the whole
    /// context or a sliding window could have let them keep less (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_layout: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SmokeSet {
    /// Expected greedy tokens come from the reference interpreter on the optimized graph.
    /// A bundle passes when, for every prompt, its tokens equal the expected ones up to and
    /// including the first step whose reference top-2 gap is below `near_tie_gap`.
    pub near_tie_gap: f32,
    /// Targets that compute in lower precision (Core ML's fp16 programs) may flip the first
    /// near-tie itself: their tokens must match before it, not at it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub near_tie_may_flip: bool,
    pub prompts: Vec<SmokePrompt>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SmokePrompt {
    pub prompt_ids: Vec<u32>,
    pub expected_ids: Vec<u32>,
    /// The reference's top-1 minus top-2 logit at each generated step.
    pub gaps: Vec<f32>,
    /// Teacher-forced checks over the prompt itself (the long prompt): the reference's
    /// argmax and top-2 gap at every prompt position, checked wherever the gap is at least
    /// `near_tie_gap`, so chunk boundaries and long-context positions are covered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_argmax: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_gaps: Vec<f32>,
}

impl SmokePrompt {
    /// How many leading tokens must match: through the first near-tie step (before it when
    /// `tie_may_flip`), or all.
    pub fn required_prefix(&self, near_tie_gap: f32, tie_may_flip: bool) -> usize {
        let tie = if tie_may_flip { 0 } else { 1 };
        self.gaps.iter().position(|g| *g < near_tie_gap).map(|i| i + tie).unwrap_or(self.expected_ids.len())
    }
}

/// Compares dotted versions numerically (`0.10.0` > `0.9.1`); non-numeric parts are 0.
pub fn version_at_least(have: &str, need: &str) -> bool {
    let parse = |v: &str| v.split('.').map(|p| p.parse::<u64>().unwrap_or(0)).collect::<Vec<_>>();
    let (mut a, mut b) = (parse(have), parse(need));
    let n = a.len().max(b.len());
    a.resize(n, 0);
    b.resize(n, 0);
    a >= b
}
