//! The ONNX Runtime executor: loads an ONNX artifact (`artifact.json`, `model.onnx`,
//! `model.onnx.data`) through the `ort` crate with ONNX Runtime loaded at run time, after
//! checking every file's size and sha256 against the manifest. When every layer's attention
//! is GroupQueryAttention (`kv_buffer_shared` in the manifest), the KV cache is one buffer of
//! the artifact's context per layer, bound as both `past_key_values.N.*` and `present.N.*`,
//! which GroupQueryAttention appends to in place (as onnxruntime-genai's
//! `past_present_share_buffer`); otherwise the `present.N.*` outputs are fed back as the
//! next step's past (ONNX Runtime copies the whole cache on every step).
//!
//! The shared library: `$ORT_DYLIB_PATH`, else `$SLMC_CACHE/onnxruntime/libonnxruntime.so*`
//! (installed by scripts/setup from the PyPI wheel).

use std::path::{Path, PathBuf};

use ort::session::IoBinding;
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use slmc_targets::artifact::OnnxArtifact;
use slmc_targets::artifact::{ONNX_DATA_FILE, ONNX_MODEL_FILE};
use slmc_targets::ArtifactKind;

use crate::files::ArtifactFiles;

use crate::{ExecError, Executor};

#[derive(Debug, thiserror::Error)]
pub enum OnnxExecError {
    #[error("{path}: {message}")]
    Artifact { path: PathBuf, message: String },
    #[error("ONNX Runtime: {0}")]
    Library(String),
    #[error("ONNX Runtime: {0}")]
    Ort(String),
}

impl From<OnnxExecError> for ExecError {
    fn from(e: OnnxExecError) -> ExecError {
        ExecError::Usage(e.to_string())
    }
}

fn ort_err(e: impl std::fmt::Display) -> OnnxExecError {
    OnnxExecError::Ort(e.to_string())
}

fn artifact_err(path: &Path, message: impl Into<String>) -> OnnxExecError {
    OnnxExecError::Artifact { path: path.to_path_buf(), message: message.into() }
}

/// Reads the manifest and checks that every file it lists is held with its size and
/// sha256, so a truncated or altered model never reaches ONNX Runtime.
pub fn load_artifact(files: &ArtifactFiles) -> Result<OnnxArtifact, OnnxExecError> {
    let artifact: OnnxArtifact = crate::registry::read_manifest(files, ArtifactKind::Onnx)
        .map_err(|(file, message)| artifact_err(&file, message))?;
    files.check_listed(&artifact.files).map_err(|(file, message)| artifact_err(&file, message))?;
    Ok(artifact)
}

/// The ONNX Runtime shared library to load.
pub fn library_path() -> Result<PathBuf, OnnxExecError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(p));
    }
    let dir = crate::cache_dir().join("onnxruntime");
    let mut libs: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    libs.retain(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so")));
    libs.sort();
    libs.pop().ok_or_else(|| {
        OnnxExecError::Library(format!(
            "no libonnxruntime.so in {} (run scripts/setup, or set ORT_DYLIB_PATH)",
            dir.display()
        ))
    })
}

fn environment() -> Result<&'static ort::environment::Environment, OnnxExecError> {
    static ENV: std::sync::OnceLock<Result<ort::environment::Environment, String>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let lib = library_path().map_err(|e| e.to_string())?;
        let builder = ort::init_from(&lib).map_err(|e| format!("loading {}: {e}", lib.display()))?;
        builder.with_name("slmc").build().map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| OnnxExecError::Library(e.clone()))
}

pub struct OnnxExecutor {
    artifact: OnnxArtifact,
    session: Session,
    cache: Cache,
    past_len: usize,
}

impl OnnxExecutor {
    /// `threads`: intra-op threads (0: ONNX Runtime's default).
    pub fn load(files: &ArtifactFiles, threads: usize) -> Result<OnnxExecutor, OnnxExecError> {
        let artifact = load_artifact(files)?;
        let env = environment()?;
        let model = files.path(ONNX_MODEL_FILE);
        let graph = files.bytes(ONNX_MODEL_FILE).map_err(|(file, message)| artifact_err(&file, message))?;
        // ONNX Runtime fuses DequantizeLinear + MatMul (the portable profile's 4-bit weights)
        // into its 4-bit kernel with int8 activations unless told otherwise: keep the
        // artifact's accuracy level (0: f32 activations), as MatMulNBits nodes carry it.
        let level = artifact.accuracy_level.to_string();
        let mut builder = Session::builder(env)
            .map_err(ort_err)?
            .with_config_entry("session.qdq_matmulnbits_accuracy_level", &level)
            .map_err(ort_err)?;
        if threads > 0 {
            builder = builder.with_intra_threads(threads).map_err(ort_err)?;
        }
        // ONNX Runtime gets the checked bytes, never the paths: the graph from memory and its
        // external data registered under the name the graph refers to.
        if let Some(data) = files.get(ONNX_DATA_FILE) {
            builder =
                builder.with_external_initializer_file_in_memory(ONNX_DATA_FILE, data.clone()).map_err(ort_err)?;
        }
        let session =
            builder.commit_from_memory(graph).map_err(|e| artifact_err(&model, format!("ONNX Runtime: {e}")))?;
        check_kv_dims(&artifact, &session)?;
        let cache = if artifact.kv_buffer_shared { shared_cache(&artifact, &session)? } else { Cache::Fed(Vec::new()) };
        let mut exec = OnnxExecutor { artifact, session, cache, past_len: 0 };
        exec.reset();
        Ok(exec)
    }

    pub fn artifact(&self) -> &OnnxArtifact {
        &self.artifact
    }

    fn empty_cache(&self) -> Result<Vec<(DynValue, DynValue)>, OnnxExecError> {
        let shape = [1i64, self.artifact.kv_heads as i64, 0, self.artifact.head_dim as i64];
        let empty = || Tensor::<f32>::from_array((shape, Vec::<f32>::new())).map(|t| t.into_dyn()).map_err(ort_err);
        (0..self.artifact.layers).map(|_| Ok((empty()?, empty()?))).collect()
    }
}

impl Executor for OnnxExecutor {
    fn vocab_size(&self) -> usize {
        self.artifact.model.vocab_size
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ExecError> {
        let s = tokens.len();
        let total = self.past_len + s;
        if total > self.artifact.model.context_len {
            return Err(ExecError::Usage(format!(
                "{total} positions exceed the artifact's context of {}",
                self.artifact.model.context_len
            )));
        }
        let ids: Vec<i64> = tokens.iter().map(|t| *t as i64).collect();
        let input_ids = Tensor::from_array(([1i64, s as i64], ids)).map_err(ort_err)?;
        let mask = Tensor::from_array(([1i64, total as i64], vec![1i64; total])).map_err(ort_err)?;
        let logits = match &mut self.cache {
            Cache::Shared { binding, .. } => {
                binding.bind_input("input_ids", &input_ids).map_err(ort_err)?;
                binding.bind_input("attention_mask", &mask).map_err(ort_err)?;
                // Rebound every step: a bound output keeps its first shape, and steps differ.
                binding.bind_output_to_device("logits", self.session.allocator().memory_info()).map_err(ort_err)?;
                let outputs = self.session.run_binding(binding).map_err(ort_err)?;
                logits_of(&outputs)?
            }
            Cache::Fed(past) => {
                let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> =
                    vec![("input_ids".into(), input_ids.into()), ("attention_mask".into(), mask.into())];
                for (layer, (k, v)) in past.iter().enumerate() {
                    inputs.push((format!("past_key_values.{layer}.key"), k.view().into()));
                    inputs.push((format!("past_key_values.{layer}.value"), v.view().into()));
                }
                let mut outputs = self.session.run(inputs).map_err(ort_err)?;
                let logits = logits_of(&outputs)?;
                let mut present = Vec::with_capacity(self.artifact.layers);
                for layer in 0..self.artifact.layers {
                    let k =
                        outputs.remove(format!("present.{layer}.key")).ok_or_else(|| ort_err("missing present key"))?;
                    let v = outputs
                        .remove(format!("present.{layer}.value"))
                        .ok_or_else(|| ort_err("missing present value"))?;
                    present.push((k, v));
                }
                drop(outputs);
                *past = present;
                logits
            }
        };
        self.past_len = total;
        if logits.len() != s * self.vocab_size() {
            return Err(ort_err(format!("logits of {} values for {s} tokens", logits.len())).into());
        }
        Ok(logits)
    }

    fn reset(&mut self) {
        // A shared buffer needs no clearing: attention reads only the positions the mask counts.
        if let Cache::Fed(_) = self.cache {
            self.cache = Cache::Fed(self.empty_cache().expect("an empty f32 tensor is always creatable"));
        }
        self.past_len = 0;
    }

    fn past_len(&self) -> usize {
        self.past_len
    }
}

enum Cache {
    /// `present.N.key/value` of the last step, fed back as the next step's past.
    Fed(Vec<(DynValue, DynValue)>),
    /// Per layer one `[1, kv_heads, context, head_dim]` key and value buffer, bound as both
    /// past and present (the binding holds them).
    Shared { binding: Box<IoBinding> },
}

/// The KV cache's layers, heads and head size in artifact.json are the graph's: they size
/// the caches the executor makes, so they are checked against what ONNX Runtime loaded.
fn check_kv_dims(artifact: &OnnxArtifact, session: &Session) -> Result<(), OnnxExecError> {
    let past_keys: Vec<&[i64]> = session
        .inputs()
        .iter()
        .filter(|i| i.name().starts_with("past_key_values.") && i.name().ends_with(".key"))
        .filter_map(|i| i.dtype().tensor_shape().map(|s| &s[..]))
        .collect();
    let graph_dims = |d: usize| {
        past_keys.iter().all(|s| s.len() == 4 && s[d] >= 0 && s[d] == past_keys[0][d]).then(|| past_keys[0][d])
    };
    if past_keys.len() != artifact.layers
        || past_keys.is_empty()
        || graph_dims(1) != Some(artifact.kv_heads as i64)
        || graph_dims(3) != Some(artifact.head_dim as i64)
    {
        return Err(manifest(format!(
            "layers {}, kv_heads {}, head_dim {} disagree with the graph's {} past-key inputs {:?}",
            artifact.layers,
            artifact.kv_heads,
            artifact.head_dim,
            past_keys.len(),
            past_keys.first()
        )));
    }
    Ok(())
}

/// An error in what `artifact.json` says.
fn manifest(message: String) -> OnnxExecError {
    OnnxExecError::Artifact { path: "artifact.json".into(), message }
}

/// Buffers of the artifact's whole context, zeroed, bound as past and present of every layer
/// (dimensions checked by `check_kv_dims`; the whole against this machine's memory).
fn shared_cache(artifact: &OnnxArtifact, session: &Session) -> Result<Cache, OnnxExecError> {
    let bytes = [artifact.layers, 2, artifact.kv_heads, artifact.model.context_len, artifact.head_dim, 4]
        .iter()
        .try_fold(1u64, |acc, n| acc.checked_mul(*n as u64));
    let memory = crate::physical_memory_bytes();
    if bytes.is_none_or(|b| memory.is_some_and(|m| b > m)) {
        return Err(manifest(format!(
            "a KV cache of {} positions needs {} bytes, more than this machine's memory ({})",
            artifact.model.context_len,
            bytes.map(|b| b.to_string()).unwrap_or_else(|| "too many".into()),
            memory.map(|m| format!("{m} bytes")).unwrap_or_else(|| "unknown".into())
        )));
    }
    let mut binding = session.create_binding().map_err(ort_err)?;
    let shape = [1i64, artifact.kv_heads as i64, artifact.model.context_len as i64, artifact.head_dim as i64];
    for layer in 0..artifact.layers {
        for kind in ["key", "value"] {
            let mut buffer = Tensor::<f32>::new(session.allocator(), shape).map_err(ort_err)?;
            buffer.extract_tensor_mut().1.fill(0.0);
            binding.bind_input(format!("past_key_values.{layer}.{kind}"), &buffer).map_err(ort_err)?;
            binding.bind_output(format!("present.{layer}.{kind}"), buffer).map_err(ort_err)?;
        }
    }
    Ok(Cache::Shared { binding: Box::new(binding) })
}

fn logits_of(outputs: &ort::session::SessionOutputs<'_>) -> Result<Vec<f32>, OnnxExecError> {
    let logits = outputs.get("logits").ok_or_else(|| ort_err("no `logits` output"))?;
    Ok(logits.try_extract_tensor::<f32>().map_err(ort_err)?.1.to_vec())
}
