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
}

pub const GENERIC_PROFILES: &[TargetProfile] = &[
    TargetProfile { name: "webgpu", backend: "wgsl", description: "WebGPU with default limits" },
    TargetProfile { name: "vulkan", backend: "spirv", description: "Vulkan 1.1 (SPIR-V 1.3)" },
    TargetProfile { name: "metal", backend: "msl", description: "Metal (MSL)" },
    TargetProfile { name: "onnx-cpu", backend: "onnx", description: "ONNX Runtime CPU, contrib ops" },
    TargetProfile { name: "onnx-portable", backend: "onnx", description: "ONNX, standard ops only" },
    TargetProfile { name: "coreml-ios18", backend: "coreml", description: "Core ML ML program, iOS 18" },
    TargetProfile { name: "coreml-ios17", backend: "coreml", description: "Core ML ML program, iOS 17" },
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
