//! Core ML artifacts where Core ML is not: Core ML runs only on Apple systems, so on any
//! other machine a package is run by slmc's reference MIL interpreter
//! (`slmc_backends::coreml::interp`), which reads the package back from disk. It checks
//! numerics and serves the compile-time smoke set; it is far too slow to serve users.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use slmc_backends::coreml::interp::CoremlReference;
use slmc_runtime::{ExecError, Executor};
use slmc_targets::artifact::{CoremlArtifact, COREML_ARTIFACT_FORMAT};

pub struct MilReferenceExecutor {
    inner: CoremlReference,
    artifact: CoremlArtifact,
}

impl MilReferenceExecutor {
    /// Loads `dir` (an artifact written by `slmc compile --target coreml-*`) after checking
    /// every listed file's size and sha256.
    pub fn load(dir: &Path) -> Result<MilReferenceExecutor> {
        let manifest = dir.join("artifact.json");
        let text =
            std::fs::read_to_string(&manifest).with_context(|| format!("{}: cannot read", manifest.display()))?;
        let artifact: CoremlArtifact = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: invalid Core ML manifest: {e}", manifest.display()))?;
        if artifact.format != COREML_ARTIFACT_FORMAT {
            bail!("{}: format `{}` is not {COREML_ARTIFACT_FORMAT}", manifest.display(), artifact.format);
        }
        for f in &artifact.files {
            if !f.is_inside() {
                bail!("{}: file `{}` lies outside the artifact", manifest.display(), f.path);
            }
            f.check(dir).map_err(|(path, message)| anyhow!("{}: {message}", path.display()))?;
        }
        let inner = CoremlReference::load(dir)?;
        if inner.step_tokens != artifact.step_tokens || inner.context_len != artifact.model.context_len {
            bail!("{}: the package's shapes disagree with artifact.json", dir.display());
        }
        Ok(MilReferenceExecutor { inner, artifact })
    }

    pub fn artifact(&self) -> &CoremlArtifact {
        &self.artifact
    }
}

impl Executor for MilReferenceExecutor {
    fn vocab_size(&self) -> usize {
        self.artifact.model.vocab_size
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ExecError> {
        self.inner.forward(tokens).map_err(|e| ExecError::Usage(e.to_string()))
    }

    fn reset(&mut self) {
        self.inner.reset();
    }

    fn past_len(&self) -> usize {
        self.inner.past_len()
    }
}
