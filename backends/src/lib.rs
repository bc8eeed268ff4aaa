//! Code generators. None is implemented yet (issues 4, 5, 6): asking for one is a clear
//! error, never a placeholder artifact.

use slmc_ir::GraphInfo;
use slmc_targets::TargetProfile;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BackendError {
    #[error("the {backend} backend for target `{target}` is not implemented yet")]
    NotImplemented { backend: &'static str, target: &'static str },
}

/// Emits the artifact for `target`. Every backend is still to be written.
pub fn emit(
    _graph: &slmc_ir::Graph,
    _info: &GraphInfo,
    target: &TargetProfile,
) -> Result<Vec<(String, Vec<u8>)>, BackendError> {
    Err(BackendError::NotImplemented { backend: target.backend, target: target.name })
}
