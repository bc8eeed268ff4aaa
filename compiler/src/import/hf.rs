//! Hugging Face directories: `config.json`, `model.safetensors` or the shards listed in
//! `model.safetensors.index.json`, `tokenizer.json`, and the chat template from
//! `tokenizer_config.json` or `chat_template.jinja`.

use std::collections::BTreeSet;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use slmc_ir::DType;

use super::{config, Format, ImportError, Model, StoredTensor, WeightStore};

fn read_json(path: &Path) -> Result<serde_json::Value, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|e| ImportError::file(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| ImportError::file(path, format!("invalid JSON: {e}")))
}

pub fn load(dir: &Path) -> Result<Model, ImportError> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(ImportError::file(dir, "no config.json: not a Hugging Face model directory"));
    }
    let config = config::from_hf_json(&config_path, &read_json(&config_path)?)?;

    let mut weights = WeightStore::default();
    let index_path = dir.join("model.safetensors.index.json");
    let single = dir.join("model.safetensors");
    let shards: Vec<String> = if index_path.exists() {
        let index = read_json(&index_path)?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ImportError::file(&index_path, "missing `weight_map` object"))?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file =
                file.as_str()
                    .filter(|f| !f.contains('/') && !f.contains('\\') && *f != ".." && !f.is_empty())
                    .ok_or_else(|| ImportError::file(&index_path, format!("bad shard name for tensor `{tensor}`")))?;
            files.insert(file.to_string());
        }
        files.into_iter().collect()
    } else if single.exists() {
        vec!["model.safetensors".into()]
    } else {
        return Err(ImportError::file(dir, "no model.safetensors and no model.safetensors.index.json"));
    };
    for shard in &shards {
        add_safetensors(&mut weights, &dir.join(shard))?;
    }
    if index_path.exists() {
        // Every tensor the index names must be in the shard it names.
        let index = read_json(&index_path)?;
        for (tensor, _) in index["weight_map"].as_object().into_iter().flatten() {
            if weights.get(tensor).is_none() {
                return Err(ImportError::file(
                    &index_path,
                    format!("tensor `{tensor}` is listed but not stored in its shard"),
                ));
            }
        }
    }

    if config.norm_weight_plus_one {
        // Gemma applies its norm weights as (1 + w): fold the 1 in once, here, so every
        // backend sees a plain norm; the IR names the folded tensors `<name>+1`.
        let norms: Vec<String> =
            weights.tensors().map(|(n, _)| n.clone()).filter(|n| n.ends_with("norm.weight")).collect();
        for name in norms {
            let folded = format!("{name}{}", config::PLUS_ONE_SUFFIX);
            weights.derive_f32(&name, folded, |w| 1.0 + w)?;
        }
    }

    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() {
        std::fs::read(&tokenizer_path)
            .map_err(|e| format!("{}: cannot read: {e}", tokenizer_path.display()))
            .and_then(|bytes| super::tokenizer::tokenizer_from_json(&bytes, &tokenizer_path))
    } else {
        Err(format!("{} has no tokenizer.json", dir.display()))
    };
    let (chat_template, bos_token, eos_token) = read_tokenizer_config(dir)?;
    Ok(Model {
        path: dir.to_path_buf(),
        format: Format::HuggingFace,
        config,
        weights,
        tokenizer,
        chat_template,
        bos_token,
        eos_token,
        gguf_metadata: None,
    })
}

fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        obj => obj.get("content").and_then(|c| c.as_str()).map(str::to_string),
    }
}

/// Chat template, BOS text and EOS text.
pub type TokenizerConfig = (Option<String>, Option<String>, Option<String>);

/// The chat template and BOS/EOS text of a directory (`tokenizer_config.json` or
/// `chat_template.jinja`).
pub fn read_tokenizer_config(dir: &Path) -> Result<TokenizerConfig, ImportError> {
    let read = |name: &str| -> Result<Option<String>, ImportError> {
        let path = dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        std::fs::read_to_string(&path).map(Some).map_err(|e| ImportError::file(&path, format!("cannot read: {e}")))
    };
    parse_tokenizer_config(dir, read("tokenizer_config.json")?.as_deref(), read("chat_template.jinja")?)
}

/// [`read_tokenizer_config`] from the files' text (a bundle's checked bytes); `dir` names
/// them in errors.
pub fn parse_tokenizer_config(
    dir: &Path,
    tokenizer_config: Option<&str>,
    chat_template_jinja: Option<String>,
) -> Result<TokenizerConfig, ImportError> {
    let mut template = None;
    let (mut bos, mut eos) = (None, None);
    if let Some(text) = tokenizer_config {
        let path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ImportError::file(&path, format!("invalid JSON: {e}")))?;
        template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        bos = token_text(cfg.get("bos_token"));
        eos = token_text(cfg.get("eos_token"));
    }
    Ok((template.or(chat_template_jinja), bos, eos))
}

fn convert_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// Maps one safetensors file and records its tensors. The safetensors crate checks the
/// header length, JSON and every offset against the file before anything is trusted.
fn add_safetensors(store: &mut WeightStore, path: &Path) -> Result<(), ImportError> {
    let map = WeightStore::map(path)?;
    let mut found = Vec::new();
    {
        let st = SafeTensors::deserialize(&map)
            .map_err(|e| ImportError::file(path, format!("not a valid safetensors file: {e}")))?;
        let base = map.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let dtype = convert_dtype(view.dtype()).ok_or_else(|| {
                ImportError::file(
                    path,
                    format!("tensor `{name}` has unsupported dtype {:?} (f32, f16, bf16)", view.dtype()),
                )
            })?;
            let data = view.data();
            found.push((
                name,
                StoredTensor {
                    dtype,
                    shape: view.shape().to_vec(),
                    file: 0,
                    offset: data.as_ptr() as usize - base,
                    len: data.len(),
                },
            ));
        }
    }
    let file = store.add_file(path.to_path_buf(), map);
    found.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut t) in found {
        t.file = file;
        store.insert(name, t)?;
    }
    Ok(())
}
