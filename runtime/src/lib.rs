//! Executors and the loops that drive them.
//!
//! An [`Executor`] feeds tokens at the current cache position and returns logits; the
//! [`generate`] and [`score`] loops are written once against it, so every executor
//! (the reference interpreter now, wgpu and ONNX Runtime later) is driven the same way.

pub mod bench;
pub mod bundle;
pub mod files;
pub mod gpu;
pub mod mil;
pub mod sample;

/// This machine's physical memory (Linux's MemTotal), for refusing allocations no file
/// should be able to ask for; None where unknown.
pub fn physical_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    kib.checked_mul(1024)
}

/// slmc's cache: `$SLMC_CACHE`, else `$HOME/.cache/slmc` (the set-up script uses the same
/// rule): the model, ONNX Runtime's library, the compile cache.
pub fn cache_dir() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("SLMC_CACHE") {
        return std::path::PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_else(|| std::path::PathBuf::from("."));
    home.join(".cache").join("slmc")
}
pub mod onnx;
pub mod registry;
pub mod sensors;

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

    /// Feeds `tokens` and returns the greedy next token (the argmax of the last row).
    /// Executors that can choose it on the device override this, so only a token id
    /// crosses back.
    fn next_token(&mut self, tokens: &[u32]) -> Result<u32, ExecError> {
        let logits = self.forward(tokens)?;
        let vocab = self.vocab_size();
        Ok(argmax(&logits[logits.len() - vocab..]) as u32)
    }
}

/// The reference interpreter as an executor of a graph with input "tokens" and output "logits".
pub struct InterpreterExecutor<'a> {
    interp: Interpreter<'a>,
    vocab: usize,
    long_rope: LongRopeSequence,
}

/// LongRoPE's sequence state: a sequence is rotated with the short factors until it holds
/// more than the original length, then with the long factors at every position. The first
/// step past that length re-encodes the whole sequence, as transformers' Phi-3 does (it
/// drops its cache there), so every step's logits equal a cache-free forward pass.
#[derive(Default)]
struct LongRopeSequence {
    /// The original length, when the graph uses LongRoPE and the cache can pass it.
    switch: Option<usize>,
    /// The tokens the cache holds (kept only when `switch` is set).
    history: Vec<u32>,
    long: bool,
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
        let switch = slmc_ir::rotary::long_rope_switch(graph).filter(|limit| *limit < max_positions);
        Ok(InterpreterExecutor { interp, vocab, long_rope: LongRopeSequence { switch, ..Default::default() } })
    }

    fn run(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ExecError> {
        let ids = Tensor::i32(vec![tokens.len()], tokens.iter().map(|t| *t as i32).collect());
        let outputs = self.interp.run(&[("tokens", ids)])?;
        let (_, logits) = outputs.into_iter().find(|(n, _)| n == "logits").expect("checked in new");
        if logits.shape != [tokens.len(), self.vocab] {
            return Err(ExecError::LogitsShape(logits.shape));
        }
        // The interpreter hands the only reference back: take the logits without a copy
        // (a long prompt's logits are tens of megabytes).
        match logits.data {
            slmc_ir::interp::Data::F32(v) => {
                Ok(std::sync::Arc::try_unwrap(v).unwrap_or_else(|shared| (*shared).clone()))
            }
            _ => Err(ExecError::Usage("the logits are not f32".into())),
        }
    }
}

impl Executor for InterpreterExecutor<'_> {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ExecError> {
        let Some(limit) = self.long_rope.switch else {
            return self.run(tokens);
        };
        let total = self.interp.past_len() + tokens.len();
        if total <= limit || self.long_rope.long {
            let logits = self.run(tokens)?;
            self.long_rope.history.extend_from_slice(tokens);
            return Ok(logits);
        }
        let mut all = std::mem::take(&mut self.long_rope.history);
        all.extend_from_slice(tokens);
        self.interp.reset();
        self.interp.set_long_rope(true);
        self.long_rope.long = true;
        let logits = self.run(&all)?;
        let rows = (all.len() - tokens.len()) * self.vocab;
        self.long_rope.history = all;
        Ok(logits[rows..].to_vec())
    }

    fn reset(&mut self) {
        self.interp.reset();
        self.interp.set_long_rope(false);
        self.long_rope.long = false;
        self.long_rope.history.clear();
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

/// A row's chosen token's log-probability and the row's entropy, both in nats (f64).
pub fn logprob_and_entropy(row: &[f32], token: usize) -> (f64, f64) {
    let lse = logsumexp(row);
    let entropy = -row
        .iter()
        .map(|&v| {
            let lp = v as f64 - lse;
            lp.exp() * lp
        })
        .sum::<f64>();
    (row[token] as f64 - lse, entropy)
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

/// The top logit's id and its margin over the second (infinite for a single logit), in one
/// pass with `top_k`'s order (`total_cmp`, the lowest index first among equals).
pub fn top1_and_gap(row: &[f32]) -> (u32, f32) {
    let mut best = (0usize, row[0]);
    let mut second = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate().skip(1) {
        if v.total_cmp(&best.1).is_gt() {
            second = best.1;
            best = (i, v);
        } else if v.total_cmp(&second).is_gt() {
            second = v;
        }
    }
    (best.0 as u32, best.1 - second)
}

/// What one step's logits looked like, for comparing with references.
#[derive(Debug, Clone)]
pub struct StepLogits {
    pub top: Vec<(u32, f32)>,
    pub logsumexp: f64,
}

impl StepLogits {
    /// The recorded top tokens with their log-probabilities, most likely first.
    pub fn top_logprobs(&self) -> Vec<(u32, f64)> {
        self.top.iter().map(|&(id, logit)| (id, logit as f64 - self.logsumexp)).collect()
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Stop after emitting one of these (the EOS is still returned).
    pub stop_ids: Vec<u32>,
    /// Record the top logits of this many first steps (prefill is step 0).
    pub record_steps: usize,
    pub record_top_k: usize,
    /// Score every generated token (its log-probability and the step's entropy): every
    /// step's logits come back from the executor, not only the chosen id.
    pub confidence: bool,
    /// Sample instead of taking the argmax (None: greedy).
    pub sampling: Option<sample::Sampling>,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub generated: Vec<u32>,
    pub recorded: Vec<StepLogits>,
    /// With `confidence`: each generated token's log-probability (natural log) and the
    /// entropy (nats) of the distribution it was chosen from.
    pub token_logprobs: Vec<f64>,
    pub token_entropies: Vec<f64>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Decode steps timed (every generated token after the first).
    pub decode_steps: usize,
}

impl Generation {
    /// The sequence confidence: the geometric mean of the generated tokens' probabilities,
    /// exp(mean log-probability), in (0, 1]; None without `confidence` or tokens.
    pub fn confidence(&self) -> Option<f64> {
        (!self.token_logprobs.is_empty())
            .then(|| (self.token_logprobs.iter().sum::<f64>() / self.token_logprobs.len() as f64).exp())
    }

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
    generate_with(exec, prompt, opts, |id, _, _| {
        on_token(id);
        true
    })
}

/// `generate`, calling `on_token` with each token, (with `confidence`) its log-probability
/// and (while steps are recorded) its step's top logits; generation ends early when it
/// returns false (a server's client left, a stop sequence appeared).
pub fn generate_with(
    exec: &mut dyn Executor,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32, Option<f64>, Option<&StepLogits>) -> bool,
) -> Result<Generation, ExecError> {
    if prompt.is_empty() {
        return Err(ExecError::Usage("the prompt has no tokens".into()));
    }
    exec.reset();
    let vocab = exec.vocab_size();
    let mut generated = Vec::new();
    let mut recorded = Vec::new();
    let mut sampler = opts.sampling.map(sample::Sampler::new);
    // Full logits only while steps are being recorded, scored or sampled; otherwise the
    // executor picks the token (on the device, for GPU executors). One step per token.
    let (mut token_logprobs, mut token_entropies) = (Vec::new(), Vec::new());
    let mut step = |exec: &mut dyn Executor,
                    tokens: &[u32],
                    recorded: &mut Vec<StepLogits>,
                    token_logprobs: &mut Vec<f64>,
                    token_entropies: &mut Vec<f64>|
     -> Result<u32, ExecError> {
        if recorded.len() < opts.record_steps || opts.confidence || sampler.is_some() {
            let logits = exec.forward(tokens)?;
            let row = &logits[logits.len() - vocab..];
            let id = match sampler.as_mut() {
                Some(s) => s.pick(row),
                None => argmax(row),
            };
            if recorded.len() < opts.record_steps {
                recorded.push(StepLogits { top: top_k(row, opts.record_top_k), logsumexp: logsumexp(row) });
            }
            if opts.confidence {
                let (lp, entropy) = logprob_and_entropy(row, id);
                token_logprobs.push(lp);
                token_entropies.push(entropy);
            }
            Ok(id as u32)
        } else {
            exec.next_token(tokens)
        }
    };
    let start = Instant::now();
    let mut next = step(exec, prompt, &mut recorded, &mut token_logprobs, &mut token_entropies)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    let mut decode_steps = 0;
    while generated.len() < opts.max_new_tokens {
        generated.push(next);
        let logprob = opts.confidence.then(|| token_logprobs.last().copied()).flatten();
        let go_on = on_token(next, logprob, recorded.get(generated.len() - 1));
        if !go_on || opts.stop_ids.contains(&next) || generated.len() == opts.max_new_tokens {
            break;
        }
        next = step(exec, &[next], &mut recorded, &mut token_logprobs, &mut token_entropies)?;
        decode_steps += 1;
    }
    Ok(Generation {
        generated,
        recorded,
        token_logprobs,
        token_entropies,
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
    score_with(exec, prompt, continuation, false)
}

/// `score`, optionally feeding the continuation one token per step after the prompt
/// (`decode`: the path greedy generation takes, so a teacher-forced run also checks it).
pub fn score_with(
    exec: &mut dyn Executor,
    prompt: &[u32],
    continuation: &[u32],
    decode: bool,
) -> Result<Score, ExecError> {
    if prompt.is_empty() || continuation.is_empty() {
        return Err(ExecError::Usage("score needs at least one prompt and one continuation token".into()));
    }
    let vocab = exec.vocab_size();
    if let Some(bad) = continuation.iter().find(|t| **t as usize >= vocab) {
        return Err(ExecError::Usage(format!("continuation token {bad} is outside the vocabulary of {vocab}")));
    }
    exec.reset();
    // The logits row predicting each continuation token.
    let mut rows: Vec<f32> = Vec::with_capacity(continuation.len() * vocab);
    if decode {
        let logits = exec.forward(prompt)?;
        rows.extend_from_slice(&logits[logits.len() - vocab..]);
        for &token in &continuation[..continuation.len() - 1] {
            rows.extend(exec.forward(&[token])?);
        }
    } else {
        let mut all = prompt.to_vec();
        all.extend_from_slice(&continuation[..continuation.len() - 1]);
        let logits = exec.forward(&all)?;
        rows.extend_from_slice(&logits[(prompt.len() - 1) * vocab..]);
    }
    if rows.len() != continuation.len() * vocab {
        return Err(ExecError::Usage(format!(
            "the executor returned {} logits for {} positions of {vocab}",
            rows.len(),
            continuation.len()
        )));
    }
    let mut positions = Vec::with_capacity(continuation.len());
    for (&token, row) in continuation.iter().zip(rows.chunks_exact(vocab)) {
        let (argmax, top1_minus_top2) = top1_and_gap(row);
        positions.push(PositionScore {
            token,
            argmax,
            logprob: row[token as usize] as f64 - logsumexp(row),
            top1_minus_top2,
        });
    }
    let n = positions.len() as f64;
    let top1_agreement = positions.iter().filter(|p| p.argmax == p.token).count() as f64 / n;
    let mean_nll = -positions.iter().map(|p| p.logprob).sum::<f64>() / n;
    Ok(Score { positions, top1_agreement, mean_nll })
}

/// One evaluation case: a prompt and the continuation whose positions are scored.
#[derive(Debug, Clone)]
pub struct QualityCase {
    pub prompt: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// How an optimized model's next-token distributions compare with the unoptimized one's,
/// teacher-forced over every continuation position.
#[derive(Debug, Clone, Default)]
pub struct QualityReport {
    pub cases: usize,
    pub positions: usize,
    /// Optimized argmax equals the unoptimized argmax.
    pub top1_agreement: f64,
    /// Optimized argmax equals the given continuation token.
    pub top1_agreement_reference: f64,
    /// Unoptimized argmax equals the given continuation token.
    pub base_top1_agreement_reference: f64,
    /// Mean KL(P_unoptimized || P_optimized) in nats.
    pub mean_kl: f64,
    pub perplexity_base: f64,
    pub perplexity_optimized: f64,
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let lse = logsumexp(row);
    row.iter().map(|v| *v as f64 - lse).collect()
}

/// Teacher-forced comparison of two executors over `cases`.
pub fn compare_quality(
    base: &mut dyn Executor,
    optimized: &mut dyn Executor,
    cases: &[QualityCase],
) -> Result<QualityReport, ExecError> {
    let vocab = base.vocab_size();
    if optimized.vocab_size() != vocab {
        return Err(ExecError::Usage("the two executors have different vocabularies".into()));
    }
    let (mut n, mut agree, mut agree_ref, mut base_ref) = (0usize, 0usize, 0usize, 0usize);
    let (mut kl, mut nll_base, mut nll_opt) = (0.0f64, 0.0f64, 0.0f64);
    for case in cases {
        if case.prompt.is_empty() || case.continuation.is_empty() {
            return Err(ExecError::Usage("a quality case needs prompt and continuation tokens".into()));
        }
        let mut all = case.prompt.clone();
        all.extend_from_slice(&case.continuation);
        base.reset();
        optimized.reset();
        let a = base.forward(&all[..all.len() - 1])?;
        let b = optimized.forward(&all[..all.len() - 1])?;
        for (i, &token) in case.continuation.iter().enumerate() {
            let row = case.prompt.len() - 1 + i;
            let (ra, rb) = (&a[row * vocab..(row + 1) * vocab], &b[row * vocab..(row + 1) * vocab]);
            let (la, lb) = (log_softmax(ra), log_softmax(rb));
            kl += la.iter().zip(&lb).map(|(x, y)| x.exp() * (x - y)).sum::<f64>();
            let (ma, mb) = (argmax(ra), argmax(rb));
            agree += (ma == mb) as usize;
            agree_ref += (mb == token as usize) as usize;
            base_ref += (ma == token as usize) as usize;
            nll_base -= la[token as usize];
            nll_opt -= lb[token as usize];
            n += 1;
        }
    }
    let nf = n.max(1) as f64;
    Ok(QualityReport {
        cases: cases.len(),
        positions: n,
        top1_agreement: agree as f64 / nf,
        top1_agreement_reference: agree_ref as f64 / nf,
        base_top1_agreement_reference: base_ref as f64 / nf,
        mean_kl: kl / nf,
        perplexity_base: (nll_base / nf).exp(),
        perplexity_optimized: (nll_opt / nf).exp(),
    })
}
