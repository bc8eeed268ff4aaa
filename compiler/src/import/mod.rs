//! Importers: Hugging Face directories (config.json + safetensors, sharded or not) and
//! GGUF files, into one [`Model`]: a config, a memory-mapped weight store, a tokenizer
//! and a chat template.

pub mod config;
pub mod gguf;
mod gguf_config;
pub mod hf;
pub mod sentencepiece;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use slmc_ir::{DType, WeightSource, WeightView};

pub use config::{Arch, ModelConfig, WeightNaming};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

impl ImportError {
    pub fn file(path: &Path, message: impl Into<String>) -> ImportError {
        ImportError::File { path: path.display().to_string(), message: message.into() }
    }
}

/// Where one tensor's bytes live.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub dtype: DType,
    /// Row-major, slowest-varying first.
    pub shape: Vec<usize>,
    pub file: usize,
    pub offset: usize,
    pub len: usize,
}

/// The bytes behind one entry of a store: a mapped file, or tensors the importer derived
/// from one (Gemma's folded (1 + w) norm weights), kept under the source file's path.
enum Backing {
    Mapped(Mmap),
    Derived(Vec<u8>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Derived(v) => v,
        }
    }
}

/// Memory-mapped weight files and the tensors in them. Nothing is copied: views point
/// into the maps (except the few small tensors an importer derives).
#[derive(Default)]
pub struct WeightStore {
    files: Vec<(PathBuf, Backing)>,
    tensors: BTreeMap<String, StoredTensor>,
}

impl WeightStore {
    pub fn map(path: &Path) -> Result<Mmap, ImportError> {
        let file = File::open(path).map_err(|e| ImportError::file(path, format!("cannot open: {e}")))?;
        // SAFETY: the map is read-only; slmc treats a file changed under it as the
        // caller's error (as every mmap-based loader does).
        unsafe { Mmap::map(&file) }.map_err(|e| ImportError::file(path, format!("cannot map: {e}")))
    }

    /// Adds a mapped file; returns its index for `StoredTensor::file`.
    pub fn add_file(&mut self, path: PathBuf, map: Mmap) -> usize {
        self.files.push((path, Backing::Mapped(map)));
        self.files.len() - 1
    }

    /// Adds an f32 tensor derived from `source` (a stored tensor) by `f`, under `name`.
    pub fn derive_f32(&mut self, source: &str, name: String, f: impl Fn(f32) -> f32) -> Result<(), ImportError> {
        let t = self.tensors.get(source).cloned().ok_or_else(|| {
            let path = self.files.first().map(|(p, _)| p.clone()).unwrap_or_default();
            ImportError::file(&path, format!("missing tensor `{source}`"))
        })?;
        let path = self.files[t.file].0.clone();
        let values = self.to_f32(source).ok_or_else(|| {
            ImportError::file(&path, format!("tensor `{source}` cannot be read as floats ({})", t.dtype))
        })?;
        let bytes: Vec<u8> = values.into_iter().flat_map(|v| f(v).to_le_bytes()).collect();
        let len = bytes.len();
        self.files.push((path, Backing::Derived(bytes)));
        let file = self.files.len() - 1;
        self.insert(name, StoredTensor { dtype: DType::F32, shape: t.shape, file, offset: 0, len })
    }

    pub fn insert(&mut self, name: String, tensor: StoredTensor) -> Result<(), ImportError> {
        let path = self.files[tensor.file].0.clone();
        if self.tensors.insert(name.clone(), tensor).is_some() {
            return Err(ImportError::file(&path, format!("tensor `{name}` is stored twice")));
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&StoredTensor> {
        self.tensors.get(name)
    }

    pub fn tensors(&self) -> impl Iterator<Item = (&String, &StoredTensor)> {
        self.tensors.iter()
    }

    pub fn bytes(&self, t: &StoredTensor) -> &[u8] {
        &self.files[t.file].1[t.offset..t.offset + t.len]
    }

    /// The file a tensor is stored in (for error messages).
    pub fn file_of(&self, t: &StoredTensor) -> &Path {
        &self.files[t.file].0
    }

    /// Whether the importer derived this tensor (it is in no file).
    pub fn is_derived(&self, t: &StoredTensor) -> bool {
        matches!(self.files[t.file].1, Backing::Derived(_))
    }

    /// The files the store maps (each once).
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().filter(|(_, b)| matches!(b, Backing::Mapped(_))).map(|(p, _)| p.as_path())
    }
}

impl WeightSource for WeightStore {
    fn view(&self, name: &str) -> Option<WeightView<'_>> {
        let t = self.tensors.get(name)?;
        Some(WeightView { dtype: t.dtype, shape: t.shape.clone(), bytes: self.bytes(t) })
    }
}

/// The format a model was imported from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    HuggingFace,
    Gguf,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::HuggingFace => "huggingface",
            Format::Gguf => "gguf",
        }
    }
}

/// An imported model.
pub struct Model {
    pub path: PathBuf,
    pub format: Format,
    pub config: ModelConfig,
    pub weights: WeightStore,
    /// `Err` says why no tokenizer is available (commands that need text report it).
    pub tokenizer: Result<tokenizers::Tokenizer, String>,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// GGUF metadata, kept for `inspect` and `convert`.
    pub gguf_metadata: Option<BTreeMap<String, gguf::Value>>,
}

/// Imports a model from a Hugging Face directory (or its config.json / a .safetensors
/// file inside it) or a GGUF file.
pub fn load(path: &Path) -> Result<Model, ImportError> {
    let meta = std::fs::metadata(path).map_err(|e| ImportError::file(path, format!("cannot read: {e}")))?;
    if meta.is_dir() {
        return hf::load(path);
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name == "config.json" || name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
        return hf::load(path.parent().unwrap_or(Path::new(".")));
    }
    let mut magic = [0u8; 4];
    use std::io::Read;
    let read = File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| ImportError::file(path, format!("cannot read: {e}")))?;
    if read == 4 && &magic == b"GGUF" || name.ends_with(".gguf") {
        return load_gguf(path);
    }
    Err(ImportError::file(
        path,
        "not a model: expected a Hugging Face directory (config.json + safetensors) or a GGUF file",
    ))
}

fn load_gguf(path: &Path) -> Result<Model, ImportError> {
    let map = WeightStore::map(path)?;
    let parsed = gguf::parse(path, &map)?;
    let config = config::from_gguf(path, &parsed, &map)?;
    let (tokenizer, mut chat_template, bos_token, eos_token) = tokenizer::from_gguf(&parsed.metadata);
    if chat_template.is_none() && config.arch.is_gemma() {
        chat_template = Some(tokenizer::GEMMA_TURN_TEMPLATE.to_string());
    }
    let mut weights = WeightStore::default();
    let file = weights.add_file(path.to_path_buf(), map);
    for (name, mut t) in parsed.tensors {
        t.file = file;
        weights.insert(name, t)?;
    }
    Ok(Model {
        path: path.to_path_buf(),
        format: Format::Gguf,
        config,
        weights,
        tokenizer,
        chat_template,
        bos_token,
        eos_token,
        gguf_metadata: Some(parsed.metadata),
    })
}
