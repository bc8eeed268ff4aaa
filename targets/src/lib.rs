//! Device target profiles: the catalog in `profiles/*.json` (one file per profile, schema
//! version 1, each with its own version), compiled into the binary. Facts come from
//! `../shared/notes/wgsl-and-gpu-limits.md`; what no source gave is `null` (shown as
//! "unknown"), never invented. Where a GPU limit is unknown, code generation assumes
//! WebGPU's default (see [`TargetProfile::binding_limit`]).

pub mod artifact;
pub mod bundle;
pub mod coreml;
pub mod files;
pub mod kind;
pub mod weight_file;

pub use kind::{ArtifactKind, BackendKind};

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// `enable f16;`: f16 storage and arithmetic in shaders.
pub const FEATURE_SHADER_F16: &str = "shader-f16";
/// Subgroup (SIMD-group, wave) operations such as `subgroupAdd`.
pub const FEATURE_SUBGROUPS: &str = "subgroups";
pub const KNOWN_FEATURES: &[&str] = &[FEATURE_SHADER_F16, FEATURE_SUBGROUPS];
pub const PROFILE_SCHEMA: u32 = 1;

/// WebGPU's default limits (spec): what a GPU profile gets where its own value is unknown.
pub const WEBGPU_DEFAULT_BINDING: u64 = 128 << 20;
pub const WEBGPU_DEFAULT_BUFFER: u64 = 256 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_storage_buffer_binding_size: Option<u64>,
    pub max_buffer_size: Option<u64>,
    pub max_compute_workgroup_storage_size: Option<u64>,
    pub max_compute_invocations_per_workgroup: Option<u64>,
    pub max_storage_buffers_per_shader_stage: Option<u64>,
}

/// What a Core ML profile fixes: the Neural Engine compiles static shapes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CoremlProfile {
    /// Core ML specification version: 8 (iOS 17 / macOS 14) or 9 (iOS 18 / macOS 15).
    pub specification_version: u32,
    /// Tokens per call; shorter steps are padded.
    pub step_tokens: usize,
    /// Most KV-cache positions (`--context` may lower it).
    pub max_context_len: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetProfile {
    pub schema: u32,
    pub name: String,
    /// The profile's own version: bumped whenever a fact in it changes.
    pub version: u32,
    pub description: String,
    pub family: String,
    /// Which backend generates code for it: wgsl, spirv, msl (GPU), onnx, coreml.
    pub backend: BackendKind,
    pub shader_language: Option<String>,
    pub limits: Limits,
    /// Optional GPU features the kernels may use, by their WebGPU names.
    pub features: Vec<String>,
    /// Subgroup width range [min, max] where known; kernels never assume one.
    pub subgroup_sizes: Option<[u32; 2]>,
    pub ram_bytes: Option<u64>,
    pub memory_bandwidth_gbps: Option<f64>,
    pub npu: Option<String>,
    /// How the NPU is reached (Core ML, ONNX Runtime QNN EP, ...).
    pub npu_runtime: Option<String>,
    pub min_os: Option<String>,
    pub min_runtime: Option<String>,
    /// For `onnx` profiles: `ort-contrib` or `portable`.
    pub onnx_profile: Option<String>,
    /// For `coreml` profiles: the deployment and the static shapes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coreml: Option<CoremlProfile>,
    pub sources: String,
}

impl TargetProfile {
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    pub fn is_gpu(&self) -> bool {
        self.backend.is_gpu()
    }

    /// Largest storage binding code generation may use: the profile's, else (unknown) the
    /// WebGPU default. `None` for non-GPU profiles.
    pub fn binding_limit(&self) -> Option<u64> {
        self.is_gpu().then(|| self.limits.max_storage_buffer_binding_size.unwrap_or(WEBGPU_DEFAULT_BINDING))
    }

    pub fn buffer_limit(&self) -> Option<u64> {
        self.is_gpu().then(|| self.limits.max_buffer_size.unwrap_or(WEBGPU_DEFAULT_BUFFER))
    }

    /// Problems with the profile's facts (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.schema != PROFILE_SCHEMA {
            out.push(format!("schema {} is not {PROFILE_SCHEMA}", self.schema));
        }
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            out.push(format!("name `{}` must be lowercase letters, digits and dashes", self.name));
        }
        if self.version == 0 {
            out.push("version must be at least 1".into());
        }
        for f in &self.features {
            if !KNOWN_FEATURES.contains(&f.as_str()) {
                out.push(format!("unknown feature `{f}`"));
            }
        }
        if !self.is_gpu() && (!self.features.is_empty() || self.shader_language.is_some()) {
            out.push("only GPU profiles have shader features or a shader language".into());
        }
        if self.is_gpu() && self.shader_language.is_none() {
            out.push("a GPU profile needs its shader language".into());
        }
        if let Some([lo, hi]) = self.subgroup_sizes {
            if lo == 0 || lo > hi || !lo.is_power_of_two() || !hi.is_power_of_two() {
                out.push(format!("subgroup sizes [{lo}, {hi}] are not an increasing pair of powers of two"));
            }
            if !self.has_feature(FEATURE_SUBGROUPS) {
                out.push("subgroup sizes without the subgroups feature".into());
            }
        }
        let l = &self.limits;
        if let (Some(b), Some(m)) = (l.max_storage_buffer_binding_size, l.max_buffer_size) {
            if b > m {
                out.push(format!("binding size {b} exceeds buffer size {m}"));
            }
        }
        for (what, v, lo) in [
            ("max_storage_buffer_binding_size", l.max_storage_buffer_binding_size, 1 << 20),
            ("max_buffer_size", l.max_buffer_size, 1 << 20),
            ("max_compute_workgroup_storage_size", l.max_compute_workgroup_storage_size, 4096),
            ("max_compute_invocations_per_workgroup", l.max_compute_invocations_per_workgroup, 64),
            ("max_storage_buffers_per_shader_stage", l.max_storage_buffers_per_shader_stage, 4),
        ] {
            if v.is_some_and(|v| v < lo) {
                out.push(format!("{what} is implausibly small"));
            }
            if v.is_some() && !self.is_gpu() {
                out.push(format!("{what} on a non-GPU profile"));
            }
        }
        if self.ram_bytes.is_some_and(|r| r < (256 << 20)) {
            out.push("ram_bytes is implausibly small".into());
        }
        if self.backend == BackendKind::Onnx
            && !matches!(self.onnx_profile.as_deref(), Some("ort-contrib" | "portable"))
        {
            out.push("an onnx profile needs onnx_profile ort-contrib or portable".into());
        }
        if self.backend != BackendKind::Onnx && self.onnx_profile.is_some() {
            out.push("onnx_profile on a non-onnx profile".into());
        }
        match (&self.coreml, self.backend == BackendKind::Coreml) {
            (None, true) => out.push("a coreml profile needs its `coreml` settings".into()),
            (Some(_), false) => out.push("`coreml` settings on a non-coreml profile".into()),
            (Some(c), true) => {
                if !matches!(c.specification_version, 8 | 9) {
                    out.push(format!("Core ML specification {} is not 8 or 9", c.specification_version));
                }
                if c.step_tokens == 0 || c.step_tokens > 512 || c.max_context_len < c.step_tokens {
                    out.push("coreml step_tokens must be 1..=512 and at most max_context_len".into());
                }
            }
            (None, false) => {}
        }
        if self.description.is_empty() || self.sources.is_empty() {
            out.push("description and sources must say something".into());
        }
        out
    }
}

/// The profile files, compiled in (name, text).
pub const PROFILE_FILES: &[(&str, &str)] = &[
    ("adreno-740.json", include_str!("../profiles/adreno-740.json")),
    ("adreno-750.json", include_str!("../profiles/adreno-750.json")),
    ("adreno-830.json", include_str!("../profiles/adreno-830.json")),
    ("apple-a16.json", include_str!("../profiles/apple-a16.json")),
    ("apple-a17-pro.json", include_str!("../profiles/apple-a17-pro.json")),
    ("apple-a18.json", include_str!("../profiles/apple-a18.json")),
    ("apple-m1.json", include_str!("../profiles/apple-m1.json")),
    ("apple-m2.json", include_str!("../profiles/apple-m2.json")),
    ("apple-m3.json", include_str!("../profiles/apple-m3.json")),
    ("apple-m4.json", include_str!("../profiles/apple-m4.json")),
    ("coreml-ios17.json", include_str!("../profiles/coreml-ios17.json")),
    ("coreml-ios18.json", include_str!("../profiles/coreml-ios18.json")),
    ("mali-g715.json", include_str!("../profiles/mali-g715.json")),
    ("mali-g720.json", include_str!("../profiles/mali-g720.json")),
    ("metal.json", include_str!("../profiles/metal.json")),
    ("onnx-cpu.json", include_str!("../profiles/onnx-cpu.json")),
    ("onnx-portable.json", include_str!("../profiles/onnx-portable.json")),
    ("raspberry-pi-5.json", include_str!("../profiles/raspberry-pi-5.json")),
    ("snapdragon-npu-qnn.json", include_str!("../profiles/snapdragon-npu-qnn.json")),
    ("tensor-g3.json", include_str!("../profiles/tensor-g3.json")),
    ("tensor-g4.json", include_str!("../profiles/tensor-g4.json")),
    ("vulkan.json", include_str!("../profiles/vulkan.json")),
    ("webgpu-browser.json", include_str!("../profiles/webgpu-browser.json")),
    ("webgpu.json", include_str!("../profiles/webgpu.json")),
    ("x86-64-laptop.json", include_str!("../profiles/x86-64-laptop.json")),
];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CatalogError {
    #[error("targets/profiles/{file}: {message}")]
    Invalid { file: String, message: String },
}

/// Parses and checks one profile file.
pub fn parse_profile(file: &str, text: &str) -> Result<TargetProfile, CatalogError> {
    let invalid = |message: String| CatalogError::Invalid { file: file.to_string(), message };
    let p: TargetProfile = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
    if format!("{}.json", p.name) != file {
        return Err(invalid(format!("holds profile `{}`; the file must be named after it", p.name)));
    }
    let problems = p.problems();
    if !problems.is_empty() {
        return Err(invalid(problems.join("; ")));
    }
    Ok(p)
}

/// Every profile, sorted by name. The compiled-in files are checked by the tests, so a
/// bad one is a build defect.
pub fn catalog() -> &'static [TargetProfile] {
    static CATALOG: OnceLock<Vec<TargetProfile>> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let mut all: Vec<TargetProfile> = PROFILE_FILES
            .iter()
            .map(|(file, text)| parse_profile(file, text).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    })
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("unknown target `{name}`{}; `slmc targets list` shows all {count}", suggestion_text(.suggestions))]
pub struct UnknownTarget {
    pub name: String,
    pub suggestions: Vec<String>,
    pub count: usize,
}

fn suggestion_text(s: &[String]) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", s.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "))
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + (ca != *cb) as usize).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

pub fn lookup(name: &str) -> Result<&'static TargetProfile, UnknownTarget> {
    let all = catalog();
    all.iter().find(|p| p.name == name).ok_or_else(|| {
        let mut scored: Vec<(usize, &str)> = all
            .iter()
            .map(|p| {
                let d = edit_distance(name, &p.name);
                // A shared prefix or substring is as good as a small typo.
                let d = if p.name.contains(name) || name.contains(p.name.as_str()) { d.min(1) } else { d };
                (d, p.name.as_str())
            })
            .filter(|(d, _)| *d <= 3)
            .collect();
        scored.sort();
        UnknownTarget {
            name: name.to_string(),
            suggestions: scored.iter().take(3).map(|(_, n)| n.to_string()).collect(),
            count: all.len(),
        }
    })
}
