//! The GPU artifact's manifest (`artifact.json`): the contract between the code
//! generator (backends) and the executor (runtime). Buffers, kernels and the dispatch
//! schedule; counts are symbolic in the step's token count `s`.

use serde::{Deserialize, Serialize};

pub const GPU_ARTIFACT_FORMAT: &str = "slmc-gpu-1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GpuArtifact {
    pub format: String,
    pub target: String,
    /// Optional GPU features the kernels use (WebGPU names: `shader-f16`, `subgroups`);
    /// an adapter without one of them cannot run the artifact.
    #[serde(default)]
    pub required_features: Vec<String>,
    pub model: ModelInfo,
    /// Every buffer the schedule binds.
    pub buffers: Vec<BufferDecl>,
    /// Unique kernels; each has `kernels/<name>.wgsl` (+ `.metal`, `.spv`) beside this file.
    pub kernels: Vec<KernelDecl>,
    /// Dispatches of one step, in order; binding 0 of every kernel is the step uniform
    /// (`s`, `p`), bindings 1.. are `buffers` in the order listed.
    pub dispatches: Vec<Dispatch>,
    /// The buffer holding the tokens of a step (u32 each).
    pub tokens_buffer: usize,
    /// The buffer holding the logits `[s, vocab]` after a step.
    pub logits_buffer: usize,
    /// Run after `dispatches` when only the next greedy token is wanted: writes the
    /// argmax of the last logits row to `next_token_buffer` (one u32).
    pub argmax_dispatch: Dispatch,
    pub next_token_buffer: usize,
    /// File with every weight buffer's bytes (offsets in `BufferKind::Weight`).
    pub weights_file: String,
    /// Every other file of the artifact (weights, kernels) with sha256 and size, checked
    /// before use. Absent in artifacts written before slmc 0.3 (a bundle's manifest covers
    /// them; a bare one without it is refused).
    #[serde(default)]
    pub files: Vec<FileDigest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    /// Positions the KV cache holds.
    pub context_len: usize,
    /// Most tokens one step may carry (longer prompts run in chunks).
    pub max_step_tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BufferDecl {
    pub name: String,
    pub kind: BufferKind,
    /// Bytes to allocate.
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BufferKind {
    /// Read from `weights_file` at `offset`.
    Weight { offset: u64, layout: String },
    /// Written by kernels each step.
    Activation,
    /// Persists across steps (KV cache).
    Cache,
    /// Filled once from `weights_file` at `offset` (constant tables).
    Table { offset: u64 },
    /// Written by the host each step.
    Input,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KernelDecl {
    pub name: String,
    pub entry_point: String,
    /// Storage buffers the kernel binds after the uniform.
    pub storage_bindings: usize,
}

/// `ceil((per_token * s + constant) / divisor)`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Count {
    pub per_token: u64,
    pub constant: u64,
    pub divisor: u64,
}

impl Count {
    pub fn fixed(n: u64) -> Count {
        Count { per_token: 0, constant: n, divisor: 1 }
    }

    /// Saturates instead of wrapping: the counts come from a file, and a huge result is
    /// refused by the caller's limit check.
    pub fn eval(&self, tokens: u64) -> u64 {
        self.per_token.saturating_mul(tokens).saturating_add(self.constant).div_ceil(self.divisor.max(1))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Dispatch {
    /// The graph value this dispatch computes (for profiles and errors).
    pub value: String,
    pub kernel: usize,
    pub bindings: Vec<usize>,
    pub workgroups: [Count; 3],
}

pub const ONNX_ARTIFACT_FORMAT: &str = "slmc-onnx-1";

/// The ONNX artifact's manifest (`artifact.json` beside `model.onnx`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OnnxArtifact {
    pub format: String,
    pub target: String,
    /// `ort-contrib` or `portable`.
    pub profile: String,
    pub model: ModelInfo,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// MatMulNBits accuracy level (0: f32 activations; 4: int8 activations).
    pub accuracy_level: i64,
    /// The LM head's accuracy level (4: an 8-bit head runs on int8 activations).
    #[serde(default)]
    pub head_accuracy_level: i64,
    /// Every layer's attention appends to its past buffer in place, so one buffer of the
    /// whole context can serve as past and present (`past_present_share_buffer`).
    #[serde(default)]
    pub kv_buffer_shared: bool,
    /// The graph file, its external data, with sha256 and size, checked before ONNX
    /// Runtime reads them.
    pub files: Vec<FileDigest>,
}

pub const COREML_ARTIFACT_FORMAT: &str = "slmc-coreml-1";

/// The Core ML artifact's manifest (`artifact.json` beside `model.mlpackage/`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CoremlArtifact {
    pub format: String,
    pub target: String,
    /// Core ML specification version (8: iOS 17 / macOS 14, 9: iOS 18 / macOS 15).
    pub specification_version: u32,
    /// The package directory.
    pub package: String,
    pub model: ModelInfo,
    /// Tokens per call (the static step; shorter steps are padded).
    pub step_tokens: usize,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `state` (fp16 model state) or `inputs-outputs`.
    pub kv_cache: String,
    /// Where Core ML is expected to run the program's ops (an estimate by written rules).
    pub placement: NePlacement,
    /// The package's files with sha256 and size.
    pub files: Vec<FileDigest>,
}

/// Per-op placement estimate of a Core ML program: Neural Engine versus GPU/CPU.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NePlacement {
    pub ops_total: usize,
    pub ops_on_neural_engine: usize,
    /// Per op type.
    pub by_op: std::collections::BTreeMap<String, OpCount>,
    /// Why ops stay off the Neural Engine: reason -> count.
    pub off_neural_engine: std::collections::BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OpCount {
    pub total: usize,
    pub neural_engine: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileDigest {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

impl FileDigest {
    /// The digest of `bytes` listed as `path`.
    pub fn of(path: String, bytes: &[u8]) -> FileDigest {
        FileDigest { path, bytes: bytes.len() as u64, sha256: sha256_hex(bytes) }
    }

    /// The digest of the file at `file`, listed as `path`, read in pieces (a bundle's
    /// weights are not held whole to be hashed).
    pub fn of_file(path: String, file: &std::path::Path) -> std::io::Result<FileDigest> {
        use sha2::Digest;
        use std::io::Read;
        let mut hasher = sha2::Sha256::new();
        let mut f = std::fs::File::open(file)?;
        let (mut buf, mut bytes) = (vec![0u8; 1 << 20], 0u64);
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
        }
        let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(FileDigest { path, bytes, sha256 })
    }

    /// Whether `path` stays inside the directory it is relative to.
    pub fn is_inside(&self) -> bool {
        is_relative_inside(&self.path)
    }

    /// Reads `dir/path` once (see [`crate::files::read_regular`]) and checks its size and
    /// sha256; the bytes returned are the bytes checked. The error names the file's problem.
    pub fn read_checked(&self, dir: &std::path::Path) -> Result<Vec<u8>, FileError> {
        let bytes = crate::files::read_regular(dir, &self.path, Some(self.bytes))?;
        let digest = sha256_hex(&bytes);
        if digest != self.sha256 {
            let message = format!("sha256 {digest} differs from the manifest's {} (tampered?)", self.sha256);
            return Err((dir.join(&self.path), message));
        }
        Ok(bytes)
    }
}

pub use crate::files::{is_relative_inside, FileError};

/// The digests of an emitter's files, sorted by path: those in memory and those it already
/// wrote into `dir` (see [`crate::weight_file::WeightFile`]).
pub fn file_digests(
    files: &std::collections::BTreeMap<String, Vec<u8>>,
    dir: Option<&std::path::Path>,
    written: &[String],
) -> std::io::Result<Vec<FileDigest>> {
    let mut out: Vec<FileDigest> = files.iter().map(|(path, bytes)| FileDigest::of(path.clone(), bytes)).collect();
    for path in written {
        let dir = dir.ok_or_else(|| std::io::Error::other(format!("{path}: written, but into no directory")))?;
        out.push(FileDigest::of_file(path.clone(), &dir.join(path))?);
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The `format` field of any artifact manifest, to pick its executor.
#[derive(Debug, Deserialize)]
pub struct ArtifactFormat {
    pub format: String,
}

/// The ONNX graph file and its external data file inside an ONNX artifact.
pub const ONNX_MODEL_FILE: &str = "model.onnx";
pub const ONNX_DATA_FILE: &str = "model.onnx.data";

/// Lowercase hex sha256, as manifests record file digests.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The stored weight types an artifact does not carry as they are stored, and what each
/// became (a conversion the bundle manifest states, so a quality difference can be traced
/// to it; the smoke set measures the artifact against the interpreter either way).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightConversions(std::collections::BTreeMap<String, std::collections::BTreeSet<String>>);

impl WeightConversions {
    /// Weights stored as `stored` (a dtype name) are carried as `carried_as`.
    pub fn note(&mut self, stored: &str, carried_as: &str) {
        self.0.entry(stored.to_string()).or_default().insert(carried_as.to_string());
    }

    pub fn into_map(self) -> std::collections::BTreeMap<String, Vec<String>> {
        self.0.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect()
    }
}
