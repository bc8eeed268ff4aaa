//! The typed backend and artifact kinds shared by target profiles, artifact manifests,
//! the compiler's backend registry and the runtime's executor registry. The strings here
//! are the file formats' spellings; nothing else compares them.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Which code generator a target profile asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// WGSL kernels (WebGPU).
    Wgsl,
    /// The same kernels translated to SPIR-V (Vulkan).
    Spirv,
    /// The same kernels translated to MSL (Metal).
    Msl,
    /// An ONNX model for ONNX Runtime.
    Onnx,
    /// A Core ML ML-program package.
    Coreml,
}

impl BackendKind {
    pub const ALL: [BackendKind; 5] =
        [BackendKind::Wgsl, BackendKind::Spirv, BackendKind::Msl, BackendKind::Onnx, BackendKind::Coreml];

    /// The profile files' spelling.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Wgsl => "wgsl",
            BackendKind::Spirv => "spirv",
            BackendKind::Msl => "msl",
            BackendKind::Onnx => "onnx",
            BackendKind::Coreml => "coreml",
        }
    }

    pub fn from_name(name: &str) -> Option<BackendKind> {
        BackendKind::ALL.into_iter().find(|b| b.name() == name)
    }

    /// The kind of artifact the backend writes (the three GPU backends share one).
    pub fn artifact(self) -> ArtifactKind {
        match self {
            BackendKind::Wgsl | BackendKind::Spirv | BackendKind::Msl => ArtifactKind::Gpu,
            BackendKind::Onnx => ArtifactKind::Onnx,
            BackendKind::Coreml => ArtifactKind::Coreml,
        }
    }

    pub fn is_gpu(self) -> bool {
        self.artifact() == ArtifactKind::Gpu
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for BackendKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for BackendKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        BackendKind::from_name(&name).ok_or_else(|| {
            let all: Vec<&str> = BackendKind::ALL.iter().map(|b| b.name()).collect();
            serde::de::Error::custom(format!("backend `{name}` is not one of {}", all.join(", ")))
        })
    }
}

/// What an artifact directory holds, named by its `artifact.json` `format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArtifactKind {
    Gpu,
    Onnx,
    Coreml,
}

impl ArtifactKind {
    pub const ALL: [ArtifactKind; 3] = [ArtifactKind::Gpu, ArtifactKind::Onnx, ArtifactKind::Coreml];

    /// `artifact.json`'s `format`.
    pub fn format(self) -> &'static str {
        match self {
            ArtifactKind::Gpu => crate::artifact::GPU_ARTIFACT_FORMAT,
            ArtifactKind::Onnx => crate::artifact::ONNX_ARTIFACT_FORMAT,
            ArtifactKind::Coreml => crate::artifact::COREML_ARTIFACT_FORMAT,
        }
    }

    pub fn from_format(format: &str) -> Option<ArtifactKind> {
        ArtifactKind::ALL.into_iter().find(|k| k.format() == format)
    }

    /// The executor that runs it, as `--json` outputs and bundle manifests name it.
    pub fn executor_name(self) -> &'static str {
        match self {
            ArtifactKind::Gpu => "wgpu",
            ArtifactKind::Onnx => "onnxruntime",
            ArtifactKind::Coreml => "coreml",
        }
    }
}
