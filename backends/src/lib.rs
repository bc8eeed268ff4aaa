//! Code generators. The GPU backend (`gpu`: WGSL, with MSL and SPIR-V translated by naga)
//! exists; ONNX and Core ML (issues 5, 6) do not yet, and asking for them is a clear error,
//! never a placeholder artifact.

pub mod gpu;
pub mod onnx;

use slmc_ir::GraphInfo;
use slmc_targets::TargetProfile;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BackendError {
    #[error("the {backend} backend for target `{target}` is not implemented yet")]
    NotImplemented { backend: String, target: String },
}

/// Emits the artifact for `target`. Every backend is still to be written.
pub fn emit(
    _graph: &slmc_ir::Graph,
    _info: &GraphInfo,
    target: &TargetProfile,
) -> Result<Vec<(String, Vec<u8>)>, BackendError> {
    Err(BackendError::NotImplemented { backend: target.backend.clone(), target: target.name.clone() })
}
