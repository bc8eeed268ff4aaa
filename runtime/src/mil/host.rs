//! Running a package the way a Core ML host does, and as an [`Executor`].

use std::collections::HashMap;
use std::path::Path;

use slmc_targets::artifact::CoremlArtifact;
use slmc_targets::coreml::{Deployment, Dt, RING_MASK_PREFIX, RING_SLOT_PREFIX, WINDOW_MASK_PREFIX};
use slmc_targets::ArtifactKind;

use super::{MilError, MilProgram, Tensor};
use crate::files::ArtifactFiles;
use crate::{ExecError, Executor};

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
    /// earlier and feeds the last of them again (below).
    history: Vec<u32>,
    /// iOS 17: the caches the host keeps, by input name.
    caches: HashMap<String, Tensor>,
    /// Sliding-window masks the program takes (`window_mask_<w>`), with their windows.
    window_masks: Vec<(String, usize)>,
    /// Sliding layers whose caches are rings, one per window.
    rings: Vec<Ring>,
}

/// A ring cache as the host tracks it: which position each slot holds (None: nothing the
/// mask may show). iOS 17 keeps positions before the step, p in slot p % slots, and the
/// step's own keys arrive beside them; iOS 18 writes each step's T rows into the state
/// from slot start % (slots - T), contiguously, before attention reads it.
struct Ring {
    window: usize,
    mask: String,
    /// iOS 18: the input naming the step's first slot.
    slot_input: Option<String>,
    /// Slots the cache holds (iOS 17: the ring; iOS 18: the ring plus T), allocated at the
    /// first step (like the caches: a size from the file is only recorded at load).
    slots: usize,
    holds: Vec<Option<usize>>,
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
        program
            .inputs
            .iter()
            .find(|i| i.name == "key_cache_0")
            .ok_or_else(|| MilError::Usage("the model has no input or state `key_cache_0`".into()))?;
        let mask = program
            .input("causal_mask")
            .ok_or_else(|| MilError::Usage("the model has no input `causal_mask`".into()))?;
        // The causal mask covers the context (iOS 18's state) or the context then the step.
        let width = match mask.shape[..] {
            [1, 1, t, w] if t == step_tokens => w,
            _ => {
                return Err(MilError::Usage(format!(
                    "input `causal_mask` is {:?}, not [1, 1, step, width]",
                    mask.shape
                )))
            }
        };
        let context_len = if deployment == Deployment::Ios18 { width } else { width.saturating_sub(step_tokens) };
        // Every cache is [1, kv_heads, slots, head_dim]: the context, or a ring of fewer.
        if let Some(bad) = program
            .inputs
            .iter()
            .find(|i| i.name.contains("_cache_") && (i.shape.len() != 4 || i.shape[2] == 0 || i.shape[2] > context_len))
        {
            return Err(MilError::Usage(format!(
                "cache `{}` is {:?}, not [1, heads, at most the context of {context_len}, head_dim]",
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
        let mut rings = Vec::new();
        for i in &program.inputs {
            let Some(w) = i.name.strip_prefix(RING_MASK_PREFIX).and_then(|w| w.parse::<usize>().ok()) else {
                continue;
            };
            let slots = match i.shape[..] {
                [1, 1, t, s] if t == step_tokens && s > step_tokens && w > 0 => s - step_tokens,
                _ => return Err(MilError::Usage(format!("ring mask `{}` is {:?}", i.name, i.shape))),
            };
            let slot_input = format!("{RING_SLOT_PREFIX}{w}");
            let slot_input = program.input(&slot_input).is_some().then_some(slot_input);
            if (deployment == Deployment::Ios18) != slot_input.is_some() {
                return Err(MilError::Usage(format!(
                    "ring `{}`: the write slot input does not fit the deployment",
                    i.name
                )));
            }
            let held = if deployment == Deployment::Ios18 { slots + step_tokens } else { slots };
            rings.push(Ring { window: w, mask: i.name.clone(), slot_input, slots: held, holds: Vec::new() });
        }
        let mut r = CoremlReference {
            rings,
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
        for ring in &mut self.rings {
            ring.holds.fill(None);
        }
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
            let mask = |window| additive_mask("causal_mask", (start, t), width, window, key_position);
            let mut feed = HashMap::new();
            feed.insert("input_ids".to_string(), Tensor::new(Dt::I32, vec![1, t], ids));
            feed.insert("position_ids".to_string(), Tensor::new(Dt::I32, vec![t], pos));
            feed.insert("causal_mask".to_string(), mask(None)?);
            for (name, window) in &self.window_masks {
                feed.insert(name.clone(), mask(Some(*window))?);
            }
            let real = back + n;
            for ring in &mut self.rings {
                if ring.holds.is_empty() {
                    ring.holds = super::filled(&ring.mask, &[ring.slots], ring.slots, None)?;
                }
                let (ring_mask, slot) = ring.step(self.deployment, start, t)?;
                feed.insert(ring.mask.clone(), ring_mask);
                if let (Some(name), Some(slot)) = (&ring.slot_input, slot) {
                    feed.insert(name.clone(), Tensor::new(Dt::I32, vec![1], vec![slot as f32]));
                }
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
                let (hk, slots, d) = (cache.shape[1], cache.shape[2], cache.shape[3]);
                if new.shape != [1, hk, t, d] {
                    return Err(MilError::Usage(format!("`{new_name}` is {:?}, not [1, {hk}, {t}, {d}]", new.shape)));
                }
                // A ring keeps position q in slot q % slots (a whole-context cache: slot q).
                for h in 0..hk {
                    for i in 0..n {
                        let src = (h * t + back + i) * d;
                        let dst = (h * slots + (p + i) % slots) * d;
                        cache.data[dst..dst + d].copy_from_slice(&new.data[src..src + d]);
                    }
                }
            }
            self.past += n;
            self.history.extend_from_slice(chunk);
            for ring in &mut self.rings {
                ring.stepped(self.deployment, start, t, real);
            }
        }
        Ok(logits)
    }
}

/// The additive mask `[1, 1, t, width]` of a step of t queries from position `start`: key
/// slot j (holding position `key_position(j)`, if any) is visible to query q when it is not
/// after q and, with a window, within it.
fn additive_mask(
    name: &str,
    (start, t): (usize, usize),
    width: usize,
    window: Option<usize>,
    key_position: impl Fn(usize) -> Option<usize>,
) -> Result<Tensor, MilError> {
    let mut mask = super::zeros(name, Dt::F16, &[1, 1, t, width])?.data;
    mask.fill(f32::NEG_INFINITY);
    for i in 0..t {
        let q = start + i;
        for j in 0..width {
            if key_position(j).is_some_and(|k| k <= q && window.is_none_or(|w| q - k < w)) {
                mask[i * width + j] = 0.0;
            }
        }
    }
    Ok(Tensor::new(Dt::F16, vec![1, 1, t, width], mask))
}

impl Ring {
    /// The additive mask `[1, 1, t, width]` for a step of t rows from position `start`, and
    /// on iOS 18 the slot the step is written at (padding rows are shown only to padding
    /// queries, whose outputs are dropped).
    fn step(&self, deployment: Deployment, start: usize, t: usize) -> Result<(Tensor, Option<usize>), MilError> {
        let (width, slot, holds) = match deployment {
            // Slots before the step's own keys, then the step's keys at start + (j - slots).
            Deployment::Ios17 => {
                let slots = self.holds.len();
                let mut holds: Vec<Option<usize>> = self.holds.iter().map(|h| h.filter(|k| *k < start)).collect();
                holds.extend((0..t).map(|i| Some(start + i)));
                (slots + t, None, holds)
            }
            // The state after this step's write (every row shown to the step's queries).
            Deployment::Ios18 => {
                let mut holds = self.holds.clone();
                let slot = write_state_rows(&mut holds, start, t, t);
                (holds.len(), Some(slot), holds)
            }
        };
        let mask = additive_mask(&self.mask, (start, t), width, Some(self.window), |j| holds[j])?;
        Ok((mask, slot))
    }

    /// Records what a step of t rows from `start` left in the cache: iOS 17's host wrote
    /// the `real` rows' positions into slots p % slots; iOS 18's state holds all t rows, of
    /// which the rows past `real` are padding the mask must not show.
    fn stepped(&mut self, deployment: Deployment, start: usize, t: usize, real: usize) {
        match deployment {
            Deployment::Ios17 => {
                let slots = self.holds.len();
                for q in start..start + real {
                    self.holds[q % slots] = Some(q);
                }
            }
            Deployment::Ios18 => {
                write_state_rows(&mut self.holds, start, t, real);
            }
        }
    }
}

/// An iOS 18 ring state's slots after a step of t rows from position `start` was written
/// contiguously from slot start % (slots - t): each position held once (a row written again
/// replaces its older slot), rows from `shown` on holding padding. Returns the first slot.
fn write_state_rows(holds: &mut [Option<usize>], start: usize, t: usize, shown: usize) -> usize {
    let slot = start % (holds.len() - t);
    for h in holds.iter_mut() {
        if h.is_some_and(|k| k >= start && k < start + t) {
            *h = None;
        }
    }
    for i in 0..t {
        holds[slot + i] = (i < shown).then_some(start + i);
    }
    slot
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
