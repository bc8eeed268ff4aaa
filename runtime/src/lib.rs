//! Executors and the loops that drive them.
//!
//! An [`Executor`] feeds tokens at the current cache position and returns logits; the
//! [`generate`] and [`score`] loops are written once against it, so every executor
//! (the reference interpreter now, wgpu and ONNX Runtime later) is driven the same way.

use std::time::Instant;

use slmc_ir::{Graph, InterpError, Interpreter, Tensor, WeightSource};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Interp(#[from] InterpError),
    #[error("the graph output \"logits\" has shape {0:?}, expected [tokens, vocab]")]
    LogitsShape(Vec<usize>),
    #[error("{0}")]
    Usage(String),
}

pub trait Executor {
    fn vocab_size(&self) -> usize;
    /// Feeds `tokens` after what the cache holds; returns logits `[tokens.len(), vocab]`.
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ExecError>;
    /// Empties the KV cache.
    fn reset(&mut self);
    /// Positions already in the cache.
    fn past_len(&self) -> usize;
}

/// The reference interpreter as an executor of a graph with input "tokens" and output "logits".
pub struct InterpreterExecutor<'a> {
    interp: Interpreter<'a>,
    vocab: usize,
}

impl<'a> InterpreterExecutor<'a> {
    pub fn new(graph: &'a Graph, weights: &'a dyn WeightSource, max_positions: usize) -> Result<Self, ExecError> {
        let logits = graph
            .outputs()
            .iter()
            .find(|(n, _)| n == "logits")
            .map(|(_, id)| *id)
            .ok_or_else(|| ExecError::Usage("the graph has no output named \"logits\"".into()))?;
        let vocab = graph
            .node(logits)
            .ty
            .shape
            .last()
            .and_then(|d| d.as_const())
            .ok_or_else(|| ExecError::Usage("the logits' last dimension must be the vocabulary size".into()))?
            as usize;
        let interp = Interpreter::new(graph, weights)?.with_max_positions(max_positions);
        Ok(InterpreterExecutor { interp, vocab })
    }
}

impl Executor for InterpreterExecutor<'_> {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ExecError> {
        let ids = Tensor::i32(vec![tokens.len()], tokens.iter().map(|t| *t as i32).collect());
        let outputs = self.interp.run(&[("tokens", ids)])?;
        let (_, logits) = outputs.into_iter().find(|(n, _)| n == "logits").expect("checked in new");
        if logits.shape != [tokens.len(), self.vocab] {
            return Err(ExecError::LogitsShape(logits.shape));
        }
        Ok(logits.as_f32().expect("logits are f32").to_vec())
    }

    fn reset(&mut self) {
        self.interp.reset()
    }

    fn past_len(&self) -> usize {
        self.interp.past_len()
    }
}

/// Log-sum-exp of a logit row, accumulated in f64.
pub fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row.iter().map(|v| (*v as f64 - max).exp()).sum::<f64>().ln()
}

/// Index of the largest logit; the lowest index wins a tie (as torch.argmax does).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// The `k` largest logits as (id, logit), highest first.
pub fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|a, b| row[*b].total_cmp(&row[*a]).then(a.cmp(b)));
    idx.into_iter().take(k).map(|i| (i as u32, row[i])).collect()
}

/// What one step's logits looked like, for comparing with references.
#[derive(Debug, Clone)]
pub struct StepLogits {
    pub top: Vec<(u32, f32)>,
    pub logsumexp: f64,
}

#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Stop after emitting one of these (the EOS is still returned).
    pub stop_ids: Vec<u32>,
    /// Record the top logits of this many first steps (prefill is step 0).
    pub record_steps: usize,
    pub record_top_k: usize,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub generated: Vec<u32>,
    pub recorded: Vec<StepLogits>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Decode steps timed (every generated token after the first).
    pub decode_steps: usize,
}

impl Generation {
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_steps == 0 || self.decode_seconds <= 0.0 {
            0.0
        } else {
            self.decode_steps as f64 / self.decode_seconds
        }
    }
}

/// Greedy decoding: prefill the prompt, then one token per step. `on_token` sees each
/// new token as it is chosen (for streaming).
pub fn generate(
    exec: &mut dyn Executor,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, ExecError> {
    if prompt.is_empty() {
        return Err(ExecError::Usage("the prompt has no tokens".into()));
    }
    exec.reset();
    let vocab = exec.vocab_size();
    let mut generated = Vec::new();
    let mut recorded = Vec::new();
    let start = Instant::now();
    let logits = exec.forward(prompt)?;
    let mut row = logits[(prompt.len() - 1) * vocab..].to_vec();
    let prefill_seconds = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    let mut decode_steps = 0;
    while generated.len() < opts.max_new_tokens {
        if recorded.len() < opts.record_steps {
            recorded.push(StepLogits { top: top_k(&row, opts.record_top_k), logsumexp: logsumexp(&row) });
        }
        let next = argmax(&row) as u32;
        generated.push(next);
        on_token(next);
        if opts.stop_ids.contains(&next) || generated.len() == opts.max_new_tokens {
            break;
        }
        row = exec.forward(&[next])?;
        decode_steps += 1;
    }
    Ok(Generation {
        generated,
        recorded,
        prefill_seconds,
        decode_seconds: decode_start.elapsed().as_secs_f64(),
        decode_steps,
    })
}

#[derive(Debug, Clone)]
pub struct PositionScore {
    pub token: u32,
    pub argmax: u32,
    pub logprob: f64,
    /// Largest minus second-largest logit at this position.
    pub top1_minus_top2: f32,
}

#[derive(Debug, Clone)]
pub struct Score {
    pub positions: Vec<PositionScore>,
    pub top1_agreement: f64,
    pub mean_nll: f64,
}

/// Teacher-forced scoring: one forward pass over prompt + continuation; each
/// continuation token is scored by the logits of the position before it.
pub fn score(exec: &mut dyn Executor, prompt: &[u32], continuation: &[u32]) -> Result<Score, ExecError> {
    if prompt.is_empty() || continuation.is_empty() {
        return Err(ExecError::Usage("score needs at least one prompt and one continuation token".into()));
    }
    exec.reset();
    let vocab = exec.vocab_size();
    let mut all = prompt.to_vec();
    all.extend_from_slice(continuation);
    let logits = exec.forward(&all[..all.len() - 1])?;
    let mut positions = Vec::with_capacity(continuation.len());
    for (i, &token) in continuation.iter().enumerate() {
        let row = &logits[(prompt.len() - 1 + i) * vocab..(prompt.len() + i) * vocab];
        if token as usize >= vocab {
            return Err(ExecError::Usage(format!("continuation token {token} is outside the vocabulary of {vocab}")));
        }
        let top = top_k(row, 2);
        positions.push(PositionScore {
            token,
            argmax: top[0].0,
            logprob: row[token as usize] as f64 - logsumexp(row),
            top1_minus_top2: top[0].1 - top.get(1).map(|t| t.1).unwrap_or(f32::NEG_INFINITY),
        });
    }
    let n = positions.len() as f64;
    let top1_agreement = positions.iter().filter(|p| p.argmax == p.token).count() as f64 / n;
    let mean_nll = -positions.iter().map(|p| p.logprob).sum::<f64>() / n;
    Ok(Score { positions, top1_agreement, mean_nll })
}
