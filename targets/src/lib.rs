//! Device target profiles. The full catalog (issue 7) grows here; for now the generic
//! profiles the backends start with, with only facts this project has checked.

pub mod artifact;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetProfile {
    pub name: &'static str,
    /// Which backend family generates code for it.
    pub backend: &'static str,
    pub description: &'static str,
    /// Largest storage-buffer binding, bytes (None: not a GPU target).
    pub max_storage_buffer_binding_size: Option<u64>,
    /// Largest buffer, bytes.
    pub max_buffer_size: Option<u64>,
    /// Optional GPU features the kernels may use, by their WebGPU names
    /// ([`FEATURE_SHADER_F16`], [`FEATURE_SUBGROUPS`]); kernels never assume a subgroup width.
    pub features: &'static [&'static str],
}

impl TargetProfile {
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.contains(&feature)
    }
}

/// `enable f16;`: f16 storage and arithmetic in shaders.
pub const FEATURE_SHADER_F16: &str = "shader-f16";
/// Subgroup (SIMD-group, wave) operations such as `subgroupAdd`.
pub const FEATURE_SUBGROUPS: &str = "subgroups";

/// WebGPU's default limits (spec): 128 MiB per storage binding, 256 MiB per buffer. The
/// generic GPU profiles promise no more than these, so their artifacts run anywhere.
const WEBGPU_BINDING: Option<u64> = Some(128 << 20);
const WEBGPU_BUFFER: Option<u64> = Some(256 << 20);

pub const GENERIC_PROFILES: &[TargetProfile] = &[
    TargetProfile {
        name: "webgpu",
        backend: "wgsl",
        description: "WebGPU with default limits and no optional features",
        max_storage_buffer_binding_size: WEBGPU_BINDING,
        max_buffer_size: WEBGPU_BUFFER,
        features: &[],
    },
    TargetProfile {
        name: "vulkan",
        backend: "spirv",
        description: "Vulkan 1.1 (SPIR-V 1.3) with shaderFloat16 and subgroup arithmetic, WebGPU default limits",
        max_storage_buffer_binding_size: WEBGPU_BINDING,
        max_buffer_size: WEBGPU_BUFFER,
        features: &[FEATURE_SHADER_F16, FEATURE_SUBGROUPS],
    },
    TargetProfile {
        name: "metal",
        backend: "msl",
        description: "Metal (MSL) with half precision and SIMD-group functions, WebGPU default limits",
        max_storage_buffer_binding_size: WEBGPU_BINDING,
        max_buffer_size: WEBGPU_BUFFER,
        features: &[FEATURE_SHADER_F16, FEATURE_SUBGROUPS],
    },
    TargetProfile {
        name: "onnx-cpu",
        backend: "onnx",
        description: "ONNX Runtime CPU, contrib ops",
        max_storage_buffer_binding_size: None,
        max_buffer_size: None,
        features: &[],
    },
    TargetProfile {
        name: "onnx-portable",
        backend: "onnx",
        description: "ONNX, standard ops only",
        max_storage_buffer_binding_size: None,
        max_buffer_size: None,
        features: &[],
    },
    TargetProfile {
        name: "coreml-ios18",
        backend: "coreml",
        description: "Core ML ML program, iOS 18",
        max_storage_buffer_binding_size: None,
        max_buffer_size: None,
        features: &[],
    },
    TargetProfile {
        name: "coreml-ios17",
        backend: "coreml",
        description: "Core ML ML program, iOS 17",
        max_storage_buffer_binding_size: None,
        max_buffer_size: None,
        features: &[],
    },
];

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("unknown target `{name}` (known: {known})")]
pub struct UnknownTarget {
    pub name: String,
    pub known: String,
}

pub fn lookup(name: &str) -> Result<&'static TargetProfile, UnknownTarget> {
    GENERIC_PROFILES.iter().find(|p| p.name == name).ok_or_else(|| UnknownTarget {
        name: name.to_string(),
        known: GENERIC_PROFILES.iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
    })
}
