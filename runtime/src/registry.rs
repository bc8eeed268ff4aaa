//! The one executor dispatch: an artifact directory's `artifact.json` names its kind, and
//! this opens the executor for it. `slmc run/score/eval`, the compile-time smoke check and
//! the tests all load artifacts here.

use std::path::Path;

use slmc_targets::ArtifactKind;

use crate::files::{ArtifactFiles, ARTIFACT_FILE};
use crate::Executor;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: unknown artifact format `{format}`")]
    UnknownFormat { path: String, format: String },
    #[error(
        "{path}: a Core ML artifact runs through Core ML, which exists only on macOS and iOS, and this slmc has no Core ML executor (built for {os}); pass --mil-reference to run the package's MIL program on slmc's reference interpreter (slow, for checking)"
    )]
    NoCoreml { path: String, os: &'static str },
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuExecError),
    #[error(transparent)]
    Onnx(#[from] crate::onnx::OnnxExecError),
    #[error(transparent)]
    Mil(#[from] crate::mil::MilError),
}

/// How to open an artifact: the choices that belong to the machine, not the artifact.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// GPU adapter name filter (`--adapter`).
    pub adapter: Option<String>,
    /// ONNX Runtime intra-op threads (0: its default).
    pub threads: usize,
    /// Run Core ML packages on the reference MIL interpreter (no Core ML here).
    pub mil_reference: bool,
}

/// An opened artifact.
pub struct Opened {
    pub exec: Box<dyn Executor>,
    pub kind: ArtifactKind,
    /// The executor's name for `--json` (`wgpu`, `onnxruntime`, `mil-reference`).
    pub executor_name: &'static str,
    pub eos_token_ids: Vec<u32>,
    /// What ran it, for `--verbose` (the GPU adapter, the ONNX Runtime library).
    pub detail: String,
}

/// The artifact's `artifact.json` as `T` after checking it declares `kind`'s format;
/// errors name the file. Every executor reads its manifest through this.
pub(crate) fn read_manifest<T: serde::de::DeserializeOwned>(
    files: &ArtifactFiles,
    kind: ArtifactKind,
) -> Result<T, (std::path::PathBuf, String)> {
    let path = files.path(ARTIFACT_FILE);
    let format = files.declared_format()?;
    if format != kind.format() {
        return Err((path, format!("format `{format}` is not {}", kind.format())));
    }
    serde_json::from_str(files.text(ARTIFACT_FILE)?).map_err(|e| (path, format!("invalid manifest: {e}")))
}

/// The kind an artifact's `artifact.json` declares.
pub fn artifact_kind(files: &ArtifactFiles) -> Result<ArtifactKind, OpenError> {
    let format = files
        .declared_format()
        .map_err(|(path, message)| OpenError::Read { path: path.display().to_string(), message })?;
    let path = files.path(ARTIFACT_FILE).display().to_string();
    ArtifactKind::from_format(&format).ok_or(OpenError::UnknownFormat { path, format })
}

/// Opens a bare artifact directory (no bundle manifest): its files are read once, checked
/// against `artifact.json`'s digests where it has them, and run from those bytes.
pub fn open(dir: &Path, opts: &OpenOptions) -> Result<Opened, OpenError> {
    let files = ArtifactFiles::read_bare(dir)
        .map_err(|(path, message)| OpenError::Read { path: path.display().to_string(), message })?;
    open_files(&files, opts)
}

/// Opens the executor for an artifact's files (a verified bundle's, or a bare artifact's).
pub fn open_files(files: &ArtifactFiles, opts: &OpenOptions) -> Result<Opened, OpenError> {
    let kind = artifact_kind(files)?;
    Ok(match kind {
        ArtifactKind::Gpu => {
            let exec = crate::gpu::GpuExecutor::load(files, opts.adapter.as_deref())?;
            let eos_token_ids = exec.artifact().model.eos_token_ids.clone();
            let detail = format!("adapter: {}", exec.adapter_info);
            Opened { exec: Box::new(exec), kind, executor_name: kind.executor_name(), eos_token_ids, detail }
        }
        ArtifactKind::Onnx => {
            let exec = crate::onnx::OnnxExecutor::load(files, opts.threads)?;
            let eos_token_ids = exec.artifact().model.eos_token_ids.clone();
            let detail = format!("ONNX Runtime: {}", crate::onnx::library_path()?.display());
            Opened { exec: Box::new(exec), kind, executor_name: kind.executor_name(), eos_token_ids, detail }
        }
        ArtifactKind::Coreml => {
            if !opts.mil_reference {
                return Err(OpenError::NoCoreml { path: files.dir().display().to_string(), os: std::env::consts::OS });
            }
            let exec = crate::mil::MilReferenceExecutor::load(files)?;
            let eos_token_ids = exec.artifact().model.eos_token_ids.clone();
            let detail = "slmc's reference MIL interpreter".to_string();
            Opened { exec: Box::new(exec), kind, executor_name: "mil-reference", eos_token_ids, detail }
        }
    })
}
