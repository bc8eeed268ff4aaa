//! Fuzz bodies: one function per parser of untrusted input, shared by the cargo-fuzz
//! targets (fuzz/fuzz_targets/) and the stable replay of their corpora
//! (tests/fuzz_replay.rs), so both run exactly the same code. See fuzz/README.md.
//!
//! Every function must return normally on any input: errors are expected and ignored, a
//! panic is a finding. Artifacts are handed to the runtime as in-memory `ArtifactFiles`;
//! where a parser only reads from a path (the importers, the bare-artifact and bundle
//! readers), the bytes are written to a scratch directory first (removed afterwards), and
//! only once the in-memory stages have accepted them, so most inputs never touch the disk.
//! A few `assert!`s state invariants the rest of slmc relies on (tensors inside the file,
//! print -> parse -> print, manifest paths inside their directory); breaking one is a
//! finding too.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use slmc_runtime::files::{kernel_file, ArtifactFiles, ARTIFACT_FILE};
use slmc_targets::artifact::{self, ArtifactFormat, CoremlArtifact, GpuArtifact, OnnxArtifact};
use slmc_targets::coreml::blob;

use crate::import::{self, tokenizer::Message};

/// Text every tokenizer built from fuzz input encodes: words, digits, special-token
/// spellings of the supported families, multi-byte characters.
const SAMPLE_TEXT: &str =
    "Hello world! 123 <|im_start|>user\nHi<|im_end|> <start_of_turn>model <bos>\u{2581}caf\u{e9} \u{1f600}";

/// Bytes of the weights file supplied with a GPU `artifact.json` (buffer offsets and sizes
/// are checked against it).
const GPU_WEIGHTS_LEN: usize = 4096;

/// Where in-memory artifact files claim to come from (error messages only).
const MEMORY_DIR: &str = "fuzz-artifact";

/// GGUF file: header, metadata and tensor infos (`gguf::parse`), the tokenizer and chat
/// template from the metadata (`tokenizer::from_gguf`, GPT-2 BPE or Gemma SentencePiece),
/// the model configuration (`config::from_gguf`, Llama 3 `rope_freqs` included); when the
/// configuration is accepted, the whole importer (`import::load`) and lowering. Tensor data
/// is never copied, only located.
pub fn gguf(data: &[u8]) {
    let path = Path::new("fuzz.gguf");
    let Ok(file) = import::gguf::parse(path, data) else { return };
    for (name, t) in &file.tensors {
        assert!(
            t.offset.checked_add(t.len).is_some_and(|end| end <= data.len()),
            "tensor `{name}` ({} bytes at {}) lies outside the {}-byte file",
            t.len,
            t.offset,
            data.len()
        );
        let elements = t.shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
        assert_eq!(
            elements.and_then(|n| t.dtype.storage_bytes(n)),
            Some(t.len),
            "tensor `{name}`: {} bytes do not match shape {:?} of {}",
            t.len,
            t.shape,
            t.dtype
        );
    }
    let (tokenizer, _template, _bos, _eos) = import::tokenizer::from_gguf(&file.metadata);
    if let Ok(tokenizer) = tokenizer {
        exercise_tokenizer(&tokenizer, SAMPLE_TEXT);
    }
    let Ok(config) = import::config::from_gguf(path, &file, data) else { return };
    let _ = config.to_json();
    let Some(dir) = Scratch::new() else { return };
    let Some(model_path) = dir.write("model.gguf", data) else { return };
    if let Ok(model) = import::load(&model_path) {
        let _ = crate::lower::lower(&model);
    }
}

/// The first three NUL-separated parts of an input (missing ones empty).
fn nul_separated(data: &[u8]) -> [&[u8]; 3] {
    let mut parts = data.splitn(3, |b| *b == 0);
    [(); 3].map(|_| parts.next().unwrap_or_default())
}

/// Hugging Face checkpoint. Input: `config.json` NUL `model.safetensors.index.json` (may be
/// empty: no index) NUL `model.safetensors`. The safetensors header alone
/// (`SafeTensors::deserialize`), `config::from_hf_json`; when the configuration is
/// accepted, the directory through `hf::load` (shard index, mapping, Gemma's folded norms,
/// `tokenizer_config.json` absent) and lowering, which checks every tensor the
/// configuration implies.
pub fn safetensors_config(data: &[u8]) {
    let [config, index, weights] = nul_separated(data);
    if let Ok(st) = safetensors::SafeTensors::deserialize(weights) {
        for (name, view) in st.tensors() {
            let elements = view.shape().iter().try_fold(1usize, |n, d| n.checked_mul(*d));
            let _ = (name.len(), view.dtype(), elements, view.data().len());
        }
    }
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(config) else { return };
    let Ok(cfg) = import::config::from_hf_json(Path::new("config.json"), &json) else { return };
    let _ = cfg.to_json();
    let Some(dir) = Scratch::new() else { return };
    if dir.write("config.json", config).is_none() || dir.write("model.safetensors", weights).is_none() {
        return;
    }
    if !index.is_empty() && dir.write("model.safetensors.index.json", index).is_none() {
        return;
    }
    if let Ok(model) = import::hf::load(dir.path()) {
        let _ = crate::lower::lower(&model);
    }
}

/// Tokenizer files, as a bundle's text side is read (`TextSide::of_artifact`). Input:
/// `tokenizer.json` NUL `tokenizer_config.json` (may be empty: absent) NUL text.
/// `Tokenizer::from_bytes` and encoding/decoding the text (its first 4 KiB) with and without
/// special tokens; `hf::parse_tokenizer_config` of the config with the text as
/// `chat_template.jinja` (used when the config names no template); and `render_chat` of
/// whichever template it found, with its BOS/EOS text.
pub fn tokenizer_files(data: &[u8]) {
    let [tokenizer_json, config, text] = nul_separated(data);
    if let Ok(tokenizer) = import::tokenizer::tokenizer_from_json(tokenizer_json, Path::new(MEMORY_DIR)) {
        exercise_tokenizer(&tokenizer, &String::from_utf8_lossy(&text[..text.len().min(4096)]));
    }
    let config = if config.is_empty() { None } else { std::str::from_utf8(config).ok() };
    let jinja = if text.is_empty() { None } else { std::str::from_utf8(text).ok().map(str::to_string) };
    let Ok((template, bos, eos)) = import::hf::parse_tokenizer_config(Path::new(MEMORY_DIR), config, jinja) else {
        return;
    };
    if let Some(template) = template {
        let messages = [
            ("system", "You are terse."),
            ("user", "Hi <|im_start|> {{ not a template }}"),
            ("assistant", "Hello."),
            ("user", "Bye"),
        ]
        .map(|(role, content)| Message { role: role.into(), content: content.into() });
        let _ = import::tokenizer::render_chat(&template, &messages, bos.as_deref(), eos.as_deref());
    }
}

/// The IR's text form: `slmc_ir::text::parse`, the verifier, and for a graph that verifies,
/// print -> parse -> print, which must be byte-identical and verify again.
pub fn ir_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(graph) = slmc_ir::text::parse(text) else { return };
    if slmc_ir::verify(&graph).is_err() {
        return;
    }
    let printed = slmc_ir::text::print(&graph);
    let again = match slmc_ir::text::parse(&printed) {
        Ok(g) => g,
        Err(e) => panic!("a verified graph prints as text that does not parse ({e}):\n{printed}"),
    };
    if let Err(e) = slmc_ir::verify(&again) {
        panic!("a verified graph, printed and parsed back, does not verify ({e}):\n{printed}");
    }
    assert_eq!(slmc_ir::text::print(&again), printed, "print -> parse -> print differs");
}

/// JSON manifests. The same bytes as a bundle's `manifest.json`: `bundle::parse_manifest`,
/// the runtime-version comparison, the smoke prompts' required prefixes, and
/// `bundle::verify` (unsigned bundles allowed) of a directory holding only the manifest; and
/// as an `artifact.json`: `ArtifactFiles::read_bare` of a directory holding it (with the
/// weights and kernel files a GPU manifest names, where the names stay inside), else the
/// same files in memory, then the executor dispatch (`registry::artifact_kind`), the GPU
/// loader's checks (`gpu::load_artifact`: paths, buffer offsets against the weights file,
/// kernel and binding indices, the logits buffer) with the indexing and workgroup counts
/// the GPU executor then does, and the ONNX and Core ML loaders (`onnx::load_artifact`,
/// `MilReferenceExecutor::load`: listed files against the files held). Every manifest path
/// `is_relative_inside` accepts must stay inside its directory.
pub fn bundle_json(data: &[u8]) {
    use slmc_runtime::bundle::{self, Trust};
    if let Ok(m) = bundle::parse_manifest(Path::new("manifest.json"), data) {
        let _ = slmc_targets::bundle::version_at_least(bundle::RUNTIME_VERSION, &m.min_runtime_version);
        for p in &m.smoke.prompts {
            let _ = p.required_prefix(m.smoke.near_tie_gap, m.smoke.near_tie_may_flip);
            let _ = p.required_prefix(m.smoke.near_tie_gap, !m.smoke.near_tie_may_flip);
        }
        m.files.iter().for_each(|f| assert_inside(&f.path));
        if let Some(dir) = Scratch::new() {
            if dir.write(slmc_targets::bundle::MANIFEST_FILE, data).is_some() {
                let _ = bundle::verify(dir.path(), &Trust { public_key: None, allow_unsigned: true });
            }
        }
    }
    if serde_json::from_slice::<ArtifactFormat>(data).is_err() {
        return;
    }
    if let Ok(a) = serde_json::from_slice::<OnnxArtifact>(data) {
        a.files.iter().for_each(|f| assert_inside(&f.path));
    }
    if let Ok(a) = serde_json::from_slice::<CoremlArtifact>(data) {
        a.files.iter().for_each(|f| assert_inside(&f.path));
    }
    let gpu = serde_json::from_slice::<GpuArtifact>(data).ok();
    let on_disk = Scratch::new().and_then(|dir| {
        dir.write(ARTIFACT_FILE, data)?;
        if let Some(a) = &gpu {
            write_gpu_files(&dir, a);
        }
        ArtifactFiles::read_bare(dir.path()).ok()
    });
    let files = match on_disk {
        Some(files) => files,
        None => {
            let mut held = vec![(ARTIFACT_FILE.to_string(), data.to_vec())];
            if let Some(a) = &gpu {
                held.push((a.weights_file.clone(), vec![0; GPU_WEIGHTS_LEN]));
                held.extend(a.kernels.iter().take(64).map(|k| (kernel_file(&k.name), Vec::new())));
            }
            let Some(files) = memory_files(held) else { return };
            files
        }
    };
    let _ = slmc_runtime::registry::artifact_kind(&files);
    if let Ok(a) = slmc_runtime::gpu::load_artifact(&files) {
        assert_inside(&a.weights_file);
        // What GpuExecutor::load and encode_step index and compute with a checked manifest.
        for d in a.dispatches.iter().chain([&a.argmax_dispatch]) {
            assert!(d.kernel < a.kernels.len(), "dispatch `{}`: kernel {} passed the checks", d.value, d.kernel);
            assert!(d.bindings.iter().all(|b| *b < a.buffers.len()), "dispatch `{}`: bindings passed", d.value);
            for tokens in [1, a.model.max_step_tokens.max(1) as u64] {
                let _ = d.workgroups.map(|c| c.eval(tokens));
            }
        }
        for idx in [a.tokens_buffer, a.logits_buffer, a.next_token_buffer] {
            assert!(idx < a.buffers.len(), "buffer index {idx} passed the checks");
        }
    }
    let _ = slmc_runtime::onnx::load_artifact(&files);
    let _ = slmc_runtime::mil::MilReferenceExecutor::load(&files);
}

/// Core ML package. Input: u32 little-endian length of the model spec, the spec
/// (`model.mlmodel`, protobuf), then the weight blob file (`weight.bin`). The blob reader
/// at the first 256 64-byte-aligned offsets (`blob::read`, `Blob::to_f32`),
/// `MilProgram::load` (spec decoding, types, constants from blobs and immediates,
/// constexpr dequantization); when it loads, the package as the reference executor opens
/// it (`CoremlReference::load` over the two files in memory: the inputs and caches it
/// expects).
pub fn coreml(data: &[u8]) {
    use slmc_targets::coreml::{MODEL_FILE, WEIGHTS_FILE};
    let (model, weights) = match data.split_first_chunk::<4>() {
        Some((len, rest)) => rest.split_at((u32::from_le_bytes(*len) as usize).min(rest.len())),
        None => (data, &[][..]),
    };
    let _ = blob::count(weights);
    for offset in (0..weights.len()).step_by(64).take(256) {
        if let Ok(b) = blob::read(weights, offset as u64) {
            let _ = b.to_f32(b.data.len() * 8 / b.ty.bits());
        }
    }
    if slmc_runtime::mil::MilProgram::load(model, weights).is_err() {
        return;
    }
    let held = [(MODEL_FILE.to_string(), model.to_vec()), (WEIGHTS_FILE.to_string(), weights.to_vec())];
    if let Some(files) = memory_files(held) {
        let _ = slmc_runtime::mil::CoremlReference::load(&files);
    }
}

fn exercise_tokenizer(tokenizer: &tokenizers::Tokenizer, text: &str) {
    for add_special in [false, true] {
        if let Ok(encoding) = tokenizer.encode(text, add_special) {
            let _ = tokenizer.decode(encoding.get_ids(), false);
            let _ = tokenizer.decode(encoding.get_ids(), true);
        }
    }
}

/// A path a manifest names that `is_relative_inside` accepts must not leave the directory
/// it is joined to (executors and `check_files` read `dir.join(path)`).
fn assert_inside(path: &str) {
    if artifact::is_relative_inside(path) {
        assert!(
            Path::new(path).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
            "manifest path `{path}` passes is_relative_inside but leaves its directory"
        );
    }
}

/// An artifact's files held in memory, as a verified bundle hands them to the executors
/// (`read_listed` of an empty list reads nothing).
fn memory_files(held: impl IntoIterator<Item = (String, Vec<u8>)>) -> Option<ArtifactFiles> {
    let mut files = ArtifactFiles::read_listed(Path::new(MEMORY_DIR), &[]).ok()?;
    for (rel, bytes) in held {
        files.insert_checked(&rel, bytes);
    }
    Some(files)
}

/// The files a bare GPU artifact's reader looks for beside the manifest: the weights file
/// (`GPU_WEIGHTS_LEN` bytes) and an empty `kernels/<name>.wgsl` per kernel (the first 64),
/// each only where the manifest's name stays inside the directory.
fn write_gpu_files(dir: &Scratch, a: &GpuArtifact) {
    if artifact::is_relative_inside(&a.weights_file) && a.weights_file.len() <= 200 {
        let path = dir.path().join(&a.weights_file);
        if !path.exists() {
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::write(&path, [0u8; GPU_WEIGHTS_LEN]);
        }
    }
    let kernels = dir.path().join("kernels");
    if std::fs::create_dir_all(&kernels).is_err() {
        return;
    }
    for k in a.kernels.iter().take(64) {
        if artifact::is_relative_inside(&k.name) && !k.name.contains('/') && k.name.len() <= 200 {
            let _ = std::fs::write(dir.path().join(kernel_file(&k.name)), b"");
        }
    }
}

/// A fresh directory under the system temp directory, removed on drop; named by process
/// and a counter, so parallel fuzzing jobs never share one.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Option<Scratch> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("slmc-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).ok()?;
        Some(Scratch(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `bytes` to `rel` (a fixed, relative name) inside the directory.
    fn write(&self, rel: &str, bytes: &[u8]) -> Option<PathBuf> {
        let path = self.0.join(rel);
        std::fs::create_dir_all(path.parent()?).ok()?;
        std::fs::write(&path, bytes).ok()?;
        Some(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
