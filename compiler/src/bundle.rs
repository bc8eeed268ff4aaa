//! Bundles: the manifest every compiled target directory carries, its golden smoke set,
//! signing keys and signatures. Verification lives in the runtime (`slmc_runtime::bundle`),
//! which must refuse bad bundles without the compiler.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use ed25519_dalek::{Signer, SigningKey};
use slmc_ir::Layered;
use slmc_runtime::bundle::{hex, parse_hex32};
use slmc_runtime::{Executor, InterpreterExecutor};
use slmc_targets::artifact::{sha256_hex, FileDigest};
use slmc_targets::bundle::{SmokePrompt, SmokeSet, MANIFEST_FILE, SIGNATURE_FILE};

use crate::import::Model;
use crate::optimize::Optimized;

/// The bundle format's requirement on the runtime (raise it when the runtime must learn
/// something new to run what the compiler writes).
/// 0.2.0: smoke prompts may carry teacher-forced prompt checks.
pub const MIN_RUNTIME_VERSION: &str = "0.2.0";
/// Smoke prompts: text for models with a tokenizer (fixed ids otherwise), and how many
/// greedy tokens each generates.
const SMOKE_TEXTS: &[&str] = &["The capital of France is", "def fibonacci(n):"];
const SMOKE_TOKENS: usize = 8;
pub const SMOKE_NEAR_TIE_GAP: f32 = 0.02;
/// Lossy configurations are held to a wider gap, and their first near-tie may flip.
/// Core ML programs compute in fp16 (and iOS 17 re-quantizes 4-bit weights to int8
/// blocks): on SmolLM2's long smoke prompt iOS 17 flipped positions whose reference gap was
/// 0.058 and 0.022 (2 of 381), and on the tiny checkpoints near-ties of 0.016-0.031.
pub const SMOKE_NEAR_TIE_GAP_FP16: f32 = 0.1;
/// ONNX with int8 activations (`--onnx-accuracy-level 4` or `--onnx-head-accuracy-level 4`,
/// named lossy options): on the same prompt they flipped positions at reference gaps up to
/// 0.248 (layers) and 0.058 (head only).
pub const SMOKE_NEAR_TIE_GAP_INT8_ACTIVATIONS: f32 = 0.5;
/// The long smoke prompt: at least this many positions (and at least a step and a tile past
/// the chunk size), or the context less the generated tokens if that is shorter. Checked
/// teacher-forced at every position, then greedily: last round a GPU bundle broke past ~330
/// positions while every short smoke prompt passed.
const SMOKE_LONG_TOKENS: usize = 384;
/// Text for the long smoke prompt (repeated as needed): plain prose, unlike any golden prompt.
const SMOKE_LONG_TEXT: &str = "Receiving procedure for the cold store. When a pallet arrives, the \
associate scans the delivery note, checks the seal number against the booking, and measures the \
temperature of three cartons from different layers. Chilled goods must read between zero and five \
degrees; frozen goods must read minus eighteen or colder. A reading outside the range is logged \
with the carrier's name, the trailer number and the time, and the pallet is held in the quarantine \
bay until a supervisor decides. Damaged cartons are photographed before they are moved. Labels that \
cannot be scanned are typed in by hand and marked for review at the end of the shift. Returns from \
shops follow the same steps, except that the associate also records the shop code and the reason \
given on the return slip. At the end of each shift, the lead counts the quarantine bay, signs the \
log, and hands open cases to the next shift in person. ";

/// The long smoke prompt's length for a target of `context` positions fed `chunk` tokens
/// at most per step, whose executor runs in fixed steps of `fixed_step` tokens (Core ML;
/// 1 otherwise): the generated tokens must still fit after it.
pub fn long_smoke_len(context: usize, chunk: usize, fixed_step: usize) -> usize {
    SMOKE_LONG_TOKENS.max(chunk + 64).min(context.saturating_sub(SMOKE_TOKENS + fixed_step.max(1) - 1))
}

/// The long smoke prompt's token ids: `len` of them, from the tokenizer when there is one.
fn long_smoke_prompt(model: &Model, len: usize) -> Result<Vec<u32>> {
    let vocab = model.config.vocab_size as u64;
    let mut ids = Vec::with_capacity(len);
    match &model.tokenizer {
        Ok(tok) => {
            let once = tok.encode(SMOKE_LONG_TEXT, false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec();
            if once.is_empty() {
                bail!("the tokenizer gives no tokens for the long smoke prompt");
            }
            while ids.len() < len {
                ids.extend(once.iter().take(len - ids.len()));
            }
        }
        Err(_) => {
            let mut state = 0x2545_F491_4F6C_DD1Du64;
            while ids.len() < len {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ids.push(((state >> 33) % vocab) as u32);
            }
        }
    }
    Ok(ids)
}

/// sha256 of a checkpoint: the file itself, or for a directory the sha256 of each regular
/// file's name and digest in name order.
pub fn source_sha256(path: &Path) -> Result<String> {
    fn file_digest(path: &Path) -> Result<String> {
        use sha2::Digest;
        let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).with_context(|| format!("{}: cannot read", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hex(&hasher.finalize()))
    }
    if path.is_file() {
        return file_digest(path);
    }
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .with_context(|| format!("{}: cannot list", path.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    entries.sort();
    let mut listing = String::new();
    for e in entries {
        let name = e.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        listing.push_str(&format!("{name} {}\n", file_digest(&e)?));
    }
    Ok(sha256_hex(listing.as_bytes()))
}

/// Every file under `dir` except the manifest and its signature, sorted by path; `known`:
/// digests already taken of files in it (reused when the size agrees).
pub fn file_digests(dir: &Path, known: &[FileDigest]) -> Result<Vec<FileDigest>> {
    let mut out = Vec::new();
    for path in slmc_runtime::bundle::walk(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let rel = path.strip_prefix(dir).expect("walk stays inside dir").to_string_lossy().replace('\\', "/");
        if rel == MANIFEST_FILE || rel == SIGNATURE_FILE {
            continue;
        }
        // A digest the emitter took of the file it wrote, while the size still agrees.
        let size = std::fs::metadata(&path).with_context(|| format!("{}: cannot read", path.display()))?.len();
        if let Some(d) = known.iter().find(|d| d.path == rel && d.bytes == size) {
            out.push(d.clone());
            continue;
        }
        out.push(FileDigest::of_file(rel, &path).with_context(|| format!("{}: cannot read", path.display()))?);
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The smoke prompts' expected greedy tokens and top-2 gaps, from the reference
/// interpreter on the optimized graph: the short prompts, and a long one (see
/// `SMOKE_LONG_TOKENS`) whose every position is also checked teacher-forced.
/// `long`: the long prompt's length (`long_smoke_len`).
pub fn smoke_set(model: &Model, optimized: &Optimized, context: usize, long: usize) -> Result<SmokeSet> {
    let vocab = model.config.vocab_size as u32;
    let short: Vec<Vec<u32>> = match &model.tokenizer {
        Ok(tok) => SMOKE_TEXTS
            .iter()
            .map(|t| tok.encode(*t, false).map(|e| e.get_ids().to_vec()).map_err(|e| anyhow!("tokenizing: {e}")))
            .collect::<Result<_>>()?,
        Err(_) => vec![(1..9).map(|i| (i * 7) % vocab).collect(), (1..6).map(|i| (i * 13 + 3) % vocab).collect()],
    };
    // (prompt, checked teacher-forced at every position)
    let mut prompts: Vec<(Vec<u32>, bool)> = short.into_iter().map(|p| (p, false)).collect();
    if long > prompts.iter().map(|p| p.0.len()).max().unwrap_or(0) {
        prompts.push((long_smoke_prompt(model, long)?, true));
    }
    let weights = Layered { top: &optimized.derived, base: &model.weights };
    let mut exec = InterpreterExecutor::new(&optimized.graph, &weights, context)?;
    let mut out = Vec::new();
    for (prompt_ids, teacher_forced) in prompts {
        exec.reset();
        let (mut expected, mut gaps) = (Vec::new(), Vec::new());
        let (mut prompt_argmax, mut prompt_gaps) = (Vec::new(), Vec::new());
        let mut feed = prompt_ids.clone();
        for step in 0..SMOKE_TOKENS {
            let logits = exec.forward(&feed)?;
            if step == 0 && teacher_forced {
                for row in logits.chunks_exact(vocab as usize) {
                    let (id, gap) = slmc_runtime::top1_and_gap(row);
                    prompt_argmax.push(id);
                    prompt_gaps.push(gap);
                }
            }
            let (id, gap) = slmc_runtime::top1_and_gap(&logits[logits.len() - vocab as usize..]);
            expected.push(id);
            gaps.push(gap);
            feed = vec![id];
        }
        out.push(SmokePrompt { prompt_ids, expected_ids: expected, gaps, prompt_argmax, prompt_gaps });
    }
    Ok(SmokeSet { near_tie_gap: SMOKE_NEAR_TIE_GAP, near_tie_may_flip: false, prompts: out })
}

/// One smoke prompt's outcome on an executor.
#[derive(Debug, serde::Serialize)]
pub struct SmokeOutcome {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub expected_ids: Vec<u32>,
    pub matching_prefix: usize,
    pub required_prefix: usize,
    /// Teacher-forced prompt positions checked (reference gap at least the bound), and the
    /// positions among them whose argmax differs.
    pub prompt_positions_checked: usize,
    pub prompt_mismatches: Vec<usize>,
    pub passed: bool,
}

/// Runs the smoke set greedily on `exec`; a prompt with teacher-forced checks is fed whole
/// first (its logits at every position compared), then continued greedily.
pub fn run_smoke(exec: &mut dyn Executor, smoke: &SmokeSet) -> Result<Vec<SmokeOutcome>> {
    let bound = smoke.near_tie_gap;
    let mut out = Vec::new();
    for p in &smoke.prompts {
        exec.reset();
        let (mut checked, mut mismatches) = (0, Vec::new());
        let generated = if p.prompt_argmax.is_empty() {
            let opts = slmc_runtime::GenerateOptions {
                max_new_tokens: p.expected_ids.len(),
                stop_ids: vec![],
                record_steps: 0,
                record_top_k: 0,
                confidence: false,
                sampling: None,
            };
            slmc_runtime::generate(exec, &p.prompt_ids, &opts, |_| {})?.generated
        } else {
            let vocab = exec.vocab_size();
            let logits = exec.forward(&p.prompt_ids)?;
            let n = p.prompt_ids.len();
            if p.prompt_argmax.len() != n || p.prompt_gaps.len() != n {
                bail!(
                    "a smoke prompt of {n} tokens carries {} argmaxes and {} gaps",
                    p.prompt_argmax.len(),
                    p.prompt_gaps.len()
                );
            }
            if logits.len() != n * vocab {
                bail!("the executor returned {} logits for {n} prompt positions", logits.len());
            }
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                if p.prompt_gaps[i] >= bound {
                    checked += 1;
                    if slmc_runtime::argmax(row) as u32 != p.prompt_argmax[i] || row.iter().any(|v| v.is_nan()) {
                        mismatches.push(i);
                    }
                }
            }
            let mut generated = vec![slmc_runtime::argmax(&logits[logits.len() - vocab..]) as u32];
            while generated.len() < p.expected_ids.len() {
                let last = *generated.last().expect("one token");
                generated.push(exec.next_token(&[last])?);
            }
            generated
        };
        let matching = generated.iter().zip(&p.expected_ids).take_while(|(a, b)| a == b).count();
        let required = p.required_prefix(bound, smoke.near_tie_may_flip);
        out.push(SmokeOutcome {
            prompt_ids: p.prompt_ids.clone(),
            generated_ids: generated,
            expected_ids: p.expected_ids.clone(),
            matching_prefix: matching,
            required_prefix: required,
            prompt_positions_checked: checked,
            passed: matching >= required && mismatches.is_empty(),
            prompt_mismatches: mismatches,
        });
    }
    Ok(out)
}

/// `slmc keygen`: a new ed25519 key pair; the secret at `path` (mode 0600), the public
/// key at `path.pub`, each as hex.
pub fn keygen(path: &Path, force: bool) -> Result<(String, String)> {
    let public_path = path.with_extension(match path.extension() {
        Some(e) => format!("{}.pub", e.to_string_lossy()),
        None => "pub".into(),
    });
    for p in [path, public_path.as_path()] {
        if p.exists() && !force {
            bail!("{}: exists (pass --force to replace it)", p.display());
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow!("no randomness from the OS: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    write_private(path, &format!("ed25519-secret:{}\n", hex(&seed)))?;
    std::fs::write(&public_path, format!("ed25519:{}\n", hex(key.verifying_key().as_bytes())))
        .with_context(|| format!("{}: cannot write", public_path.display()))?;
    Ok((path.display().to_string(), public_path.display().to_string()))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| format!("{}: cannot write", path.display()))?;
    // `mode` applies only to a new file: a replaced one (--force) keeps its old
    // permissions unless they are narrowed before the secret is written.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("{}: cannot make it private", path.display()))?;
    }
    f.write_all(text.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
}

pub fn read_secret_key(path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let seed = parse_hex32(text.trim().trim_start_matches("ed25519-secret:"))
        .ok_or_else(|| anyhow!("{}: not a secret key (`slmc keygen` writes them)", path.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// `slmc sign`: checks the files against the manifest first (never sign a tampered
/// bundle), then writes `manifest.sig`.
pub fn sign(dir: &Path, key_path: &Path) -> Result<String> {
    let key = read_secret_key(key_path)?;
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest = std::fs::read(&manifest_path)
        .with_context(|| format!("{}: cannot read (not a bundle?)", manifest_path.display()))?;
    let parsed = slmc_runtime::bundle::parse_manifest(&manifest_path, &manifest)?;
    slmc_runtime::bundle::check_files(dir, &parsed)?;
    let signature = key.sign(&manifest);
    let sig_path = dir.join(SIGNATURE_FILE);
    std::fs::write(&sig_path, hex(&signature.to_bytes()) + "\n")
        .with_context(|| format!("{}: cannot write", sig_path.display()))?;
    Ok(hex(key.verifying_key().as_bytes()))
}

/// The optimizer options as the manifest records them (no paths: a calibration file is
/// recorded by its sha256).
pub fn options_record(req: &crate::optimize::OptRequest) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    put("pipeline", req.pipeline.clone());
    put("passes", (!req.passes.is_empty()).then(|| req.passes.join(",")));
    put("quant", req.quant.clone());
    put("quant_override", req.quant_override.clone());
    put("quant_method", req.quant_method.clone());
    put("kv_quant", req.kv_quant.clone());
    put("disable_pass", (!req.disable_pass.is_empty()).then(|| req.disable_pass.join(",")));
    if let Some(c) = &req.calibration {
        let bytes = std::fs::read(c).with_context(|| format!("{}: cannot read", c.display()))?;
        m.insert("calibration_sha256".into(), sha256_hex(&bytes));
    }
    Ok(m)
}

/// The manifest's quality report: the optimized graph against the unoptimized one on the
/// reference interpreter, teacher-forced over the built-in held-out text (at most 256
/// tokens; fixed token ids for models without a tokenizer). It is not calibration data, so
/// a calibrated quantizer is judged on text it did not see.
pub fn quality_report(model: &Model, optimized: &Optimized) -> Result<serde_json::Value> {
    const BUDGET: usize = 256;
    let vocab = model.config.vocab_size as u32;
    let (sequences, source) = match crate::optimize::held_out_sequences(model) {
        Ok(s) => (s, "the built-in held-out text"),
        Err(_) => (vec![(0..64u32).map(|i| (i * 31 + 7) % vocab).collect()], "fixed token ids (no tokenizer)"),
    };
    // Each case runs from an empty cache, so it must fit the model's context too.
    let ctx = model.config.max_position_embeddings.min(BUDGET + 1);
    let mut cases = Vec::new();
    let mut used = 0;
    for seq in sequences {
        if seq.len() < 2 || used >= BUDGET || ctx < 2 {
            continue;
        }
        let take = seq.len().min(BUDGET - used).min(ctx).max(2);
        used += take;
        cases.push(slmc_runtime::QualityCase { prompt: seq[..1].to_vec(), continuation: seq[1..take].to_vec() });
    }
    let base_graph = crate::lower::lower(model)?;
    let weights = Layered { top: &optimized.derived, base: &model.weights };
    let mut base = InterpreterExecutor::new(&base_graph, &model.weights, ctx)?;
    let mut opt = InterpreterExecutor::new(&optimized.graph, &weights, ctx)?;
    let r = slmc_runtime::compare_quality(&mut base, &mut opt, &cases)?;
    Ok(serde_json::json!({
        "method": format!("teacher-forced, optimized vs unoptimized graph on the reference interpreter, over {source}"),
        "positions": r.positions,
        "top1_agreement": r.top1_agreement,
        "mean_kl": r.mean_kl,
        "perplexity_base": r.perplexity_base,
        "perplexity_optimized": r.perplexity_optimized,
    }))
}
