//! Running a package the way a Core ML host does, and as an [`Executor`].

use std::collections::HashMap;
use std::path::Path;

use slmc_targets::artifact::CoremlArtifact;
use slmc_targets::coreml::{Deployment, Dt};
use slmc_targets::ArtifactKind;

use super::{MilError, MilProgram, Tensor};
use crate::files::ArtifactFiles;
use crate::{ExecError, Executor};

/// The inputs of sliding-window masks are named this plus the window.
const WINDOW_MASK_PREFIX: &str = "window_mask_";

/// Drives a program the way a Core ML host would: fixed steps of `step_tokens` (padded),
/// positions, the additive causal mask, and the KV cache (state, or inputs/outputs).
pub struct CoremlReference {
    pub program: MilProgram,
    pub deployment: Deployment,
    pub step_tokens: usize,
    pub context_len: usize,
    pub vocab: usize,
    past: usize,
    /// The tokens the cache holds: a step that would write past the context starts
    /// earlier and feeds the last of them again (iOS 18, below).
    history: Vec<u32>,
    /// iOS 17: the caches the host keeps, by input name.
    caches: HashMap<String, Tensor>,
    /// Sliding-window masks the program takes (`window_mask_<w>`), with their windows.
    window_masks: Vec<(String, usize)>,
}

impl CoremlReference {
    pub fn load(files: &ArtifactFiles) -> Result<CoremlReference, MilError> {
        let program = MilProgram::load_package(files)?;
        let ids =
            program.input("input_ids").ok_or_else(|| MilError::Usage("the model has no input `input_ids`".into()))?;
        if ids.shape.len() != 2 {
            return Err(MilError::Usage(format!("input `input_ids` is {:?}, not [1, step]", ids.shape)));
        }
        let step_tokens = ids.shape[1];
        let deployment = if program.specification_version >= 9 { Deployment::Ios18 } else { Deployment::Ios17 };
        let cache = program
            .inputs
            .iter()
            .find(|i| i.name == "key_cache_0")
            .ok_or_else(|| MilError::Usage("the model has no input or state `key_cache_0`".into()))?;
        // Every cache is [1, kv_heads, context, head_dim] over one context.
        let context_len = *cache.shape.get(2).unwrap_or(&0);
        if let Some(bad) = program
            .inputs
            .iter()
            .find(|i| i.name.contains("_cache_") && (i.shape.len() != 4 || i.shape[2] != context_len))
        {
            return Err(MilError::Usage(format!(
                "cache `{}` is {:?}, not [1, heads, context, head_dim]",
                bad.name, bad.shape
            )));
        }
        let window_masks = program
            .inputs
            .iter()
            .filter_map(|i| {
                let w = i.name.strip_prefix(WINDOW_MASK_PREFIX)?.parse::<usize>().ok().filter(|w| *w > 0)?;
                Some((i.name.clone(), w))
            })
            .collect();
        let mut r = CoremlReference {
            window_masks,
            program,
            deployment,
            step_tokens,
            context_len,
            vocab: 0,
            past: 0,
            history: Vec::new(),
            caches: HashMap::new(),
        };
        r.reset();
        Ok(r)
    }

    pub fn reset(&mut self) {
        self.past = 0;
        self.history.clear();
        self.program.reset_states();
        // The iOS 17 host's caches are made zeroed when the next step runs.
        self.caches.clear();
    }

    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Feeds tokens; returns logits `[tokens.len(), vocab]`.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, MilError> {
        let t = self.step_tokens;
        let c = self.context_len;
        if self.caches.is_empty() {
            for i in self.program.inputs.iter().filter(|i| !i.is_state && i.name.contains("_cache_")) {
                self.caches.insert(i.name.clone(), super::zeros(&i.name, i.dt, &i.shape)?);
            }
        }
        let mut logits = Vec::new();
        for chunk in tokens.chunks(t) {
            let p = self.past;
            let n = chunk.len();
            if p + n > c {
                return Err(MilError::Usage(format!(
                    "the context is full: {p} positions held, {n} more need {} of {c}",
                    p + n
                )));
            }
            // A step's t rows take positions from its first (iOS 18's state is written there,
            // and the rotary tables hold c positions), so a step that would pass the context
            // starts `back` positions earlier and feeds the cached tokens there again: their
            // keys and values come out as they went in (every earlier position is
            // unchanged), and the context's last positions stay usable.
            let back = (p + t).saturating_sub(c);
            if back > p {
                return Err(MilError::Usage(format!("a step of {t} tokens is longer than the context of {c}")));
            }
            let start = p - back;
            let ids: Vec<f32> = (0..t)
                .map(|i| if i < back { self.history[start + i] } else { chunk[(i - back).min(n - 1)] } as f32)
                .collect();
            let pos: Vec<f32> = (0..t).map(|i| (start + i) as f32).collect();
            let width = if self.deployment == Deployment::Ios18 { c } else { c.saturating_add(t) };
            // Key slot j holds position j (iOS 18's state, iOS 17's past caches, of which
            // the step's own positions are not read) or, for iOS 17's new keys after the c
            // cache slots, position start + (j - c).
            let key_position = |j: usize| match self.deployment {
                Deployment::Ios18 => Some(j),
                Deployment::Ios17 if j < c => (j < start).then_some(j),
                Deployment::Ios17 => Some(start + j - c),
            };
            let mask = |window: Option<usize>| -> Result<Tensor, MilError> {
                let mut mask = super::zeros("causal_mask", Dt::F16, &[1, 1, t, width])?.data;
                mask.fill(f32::NEG_INFINITY);
                for i in 0..t {
                    for j in 0..width {
                        let q = start + i;
                        let visible = key_position(j).is_some_and(|k| k <= q && window.is_none_or(|w| q - k < w));
                        if visible {
                            mask[i * width + j] = 0.0;
                        }
                    }
                }
                Ok(Tensor::new(Dt::F16, vec![1, 1, t, width], mask))
            };
            let mut feed = HashMap::new();
            feed.insert("input_ids".to_string(), Tensor::new(Dt::I32, vec![1, t], ids));
            feed.insert("position_ids".to_string(), Tensor::new(Dt::I32, vec![t], pos));
            feed.insert("causal_mask".to_string(), mask(None)?);
            for (name, window) in &self.window_masks {
                feed.insert(name.clone(), mask(Some(*window))?);
            }
            for (k, v) in &self.caches {
                feed.insert(k.clone(), v.clone());
            }
            let out = self.program.predict(feed)?;
            let l = out.get("logits").ok_or_else(|| MilError::Usage("the model has no output `logits`".into()))?;
            self.vocab = l.shape.last().copied().unwrap_or(0);
            if self.vocab == 0 || l.data.len() < (back + n) * self.vocab {
                return Err(MilError::Usage(format!("the output `logits` is {:?} for a step of {t}", l.shape)));
            }
            logits.extend_from_slice(&l.data[back * self.vocab..(back + n) * self.vocab]);
            // iOS 17: the host writes the step's new keys and values into its caches.
            for (name, cache) in self.caches.iter_mut() {
                let new_name = name.replace("key_cache_", "new_key_").replace("value_cache_", "new_value_");
                let new = out
                    .get(&new_name)
                    .ok_or_else(|| MilError::Usage(format!("the model has no output `{new_name}`")))?;
                let (hk, d) = (cache.shape[1], cache.shape[3]);
                if new.shape != [1, hk, t, d] {
                    return Err(MilError::Usage(format!("`{new_name}` is {:?}, not [1, {hk}, {t}, {d}]", new.shape)));
                }
                for h in 0..hk {
                    for i in 0..n {
                        let src = (h * t + back + i) * d;
                        let dst = (h * c + p + i) * d;
                        cache.data[dst..dst + d].copy_from_slice(&new.data[src..src + d]);
                    }
                }
            }
            self.past += n;
            self.history.extend_from_slice(chunk);
        }
        Ok(logits)
    }
}

/// Core ML artifacts where Core ML is not: Core ML runs only on Apple systems, so on any
/// other machine a package is run by this reference interpreter, which reads the package
/// back from disk. It checks numerics and serves the compile-time smoke set; it is far too
/// slow to serve users.
pub struct MilReferenceExecutor {
    inner: CoremlReference,
    artifact: CoremlArtifact,
}

impl MilReferenceExecutor {
    /// Loads `dir` (an artifact written by `slmc compile --target coreml-*`) after checking
    /// every listed file's size and sha256.
    pub fn load(files: &ArtifactFiles) -> Result<MilReferenceExecutor, MilError> {
        let bad = |path: &Path, message: String| MilError::File { path: path.display().to_string(), message };
        let artifact: CoremlArtifact = crate::registry::read_manifest(files, ArtifactKind::Coreml)
            .and_then(|a: CoremlArtifact| files.check_listed(&a.files).map(|()| a))
            .map_err(|(path, message)| bad(&path, message))?;
        let inner = CoremlReference::load(files)?;
        if inner.step_tokens != artifact.step_tokens || inner.context_len != artifact.model.context_len {
            return Err(bad(files.dir(), "the package's shapes disagree with artifact.json".into()));
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
