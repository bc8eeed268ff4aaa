//! The bundle commands of the CLI: compile (with the compile cache and progress), keygen,
//! sign, verify, eval, install, rollback.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use slmc_compiler::bundle as bundles;
use slmc_compiler::store;

use crate::cli::run::LoadedArtifact;
use crate::{artifact_executor, load, prepare, print_json, Common, OptArgs, RunArgs, TrustArgs};
use slmc_runtime::bundle::Verified;

#[derive(clap::Args)]
pub struct CompileArgs {
    /// Target names, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub target: Vec<String>,
    /// Output root directory.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// KV-cache positions the artifact holds (capped by the model's context).
    #[arg(long, default_value_t = 2048)]
    pub context: usize,
    /// Most tokens per step (longer prompts run in chunks). Default 256, lowered for a GPU
    /// target until one step's logits fit its storage-buffer binding (a 262k vocabulary
    /// takes 1 MiB of logits per token).
    #[arg(long)]
    pub max_step_tokens: Option<usize>,
    /// Replace existing target directories.
    #[arg(long)]
    pub force: bool,
    /// GPU adapter the smoke check runs GPU bundles on: a substring of its name (else
    /// $SLMC_ADAPTER, else the first).
    #[arg(long)]
    pub adapter: Option<String>,
    /// Bind at most this many bytes per storage buffer (default: the target's limit);
    /// larger embedding tables and LM heads are split by rows.
    #[arg(long)]
    pub max_binding_bytes: Option<u64>,
    /// ONNX MatMulNBits accuracy level: 0 keeps f32 activations (reproduces the
    /// goldens); 4 quantizes activations to int8 per block (faster, flips tokens).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=4))]
    pub onnx_accuracy_level: i64,
    /// ONNX accuracy level of the LM head: 0 (default) keeps f32 activations (an f32 Gemm
    /// for 8-bit heads: exact); 4 runs an 8-bit head (SmolLM2's tied Q8_0 table) as 8-bit
    /// MatMulNBits on int8 activations, a quarter of the bytes but lossy (it flips confident
    /// tokens on prompts outside the goldens).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=4))]
    pub onnx_head_accuracy_level: i64,
    /// The model version the manifest records (default: the start of the checkpoint's sha256).
    #[arg(long)]
    pub model_version: Option<String>,
    /// Write bundles without running their golden smoke set here (no GPU adapter or
    /// ONNX Runtime on this machine); `slmc eval` runs it later.
    #[arg(long)]
    pub skip_smoke_check: bool,
    /// Compile even when the compile cache holds this exact bundle.
    #[arg(long)]
    pub no_cache: bool,
    /// Also write a self-contained HTML compile report: per-pass timings and IR sizes, each
    /// target's bundle size, memory plan and NPU placement, the quality report.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The team's eval set (JSON Lines, one item a line: id, messages or prompt, accept or
    /// abstain, max_new_tokens, tags): stored in each bundle, run on the unquantized model
    /// and on each bundle's executor; a bundle more than --max-eval-drop points less
    /// accurate is not written.
    #[arg(long)]
    pub eval_set: Option<PathBuf>,
    /// The eval gate's limit, in accuracy points.
    #[arg(long, default_value_t = 3.0, requires = "eval_set")]
    pub max_eval_drop: f64,
    /// Eval answers whose confidence (geometric mean of the tokens' probabilities) is below
    /// this count as abstentions (stored with the eval set).
    #[arg(long, value_parser = crate::cli::args::probability, requires = "eval_set")]
    pub abstain_below: Option<f64>,
    /// A phrase that counts as declining an eval item (repeatable; default: I can't, I cannot,
    /// I don't know, I do not know, not able to).
    #[arg(long, requires = "eval_set")]
    pub refusal: Vec<String>,
}

/// `$SLMC_COMPILE_CACHE`, else `$SLMC_CACHE/compile`.
fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SLMC_COMPILE_CACHE") {
        return PathBuf::from(dir);
    }
    slmc_compiler::cache_dir().join("compile")
}

/// Entries the compile cache keeps (the most recently used); older ones are removed.
const CACHE_ENTRIES: usize = 12;

/// Bytes the compile cache keeps at most (`$SLMC_COMPILE_CACHE_MAX_BYTES`, default 8 GiB):
/// a few bundles of a large model fill a disk faster than twelve entries suggest.
fn cache_max_bytes() -> u64 {
    std::env::var("SLMC_COMPILE_CACHE_MAX_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(8 << 30)
}

/// Identifies this build of slmc: the sha256 of its own executable, so a changed compiler
/// never serves a bundle an older build wrote under the same version number.
fn compiler_build_id() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let bytes = std::fs::read(exe).ok()?;
    Some(slmc_targets::artifact::sha256_hex(&bytes))
}

/// The compile cache key of one target: everything the bundle's bytes depend on.
fn cache_key(build: &str, source_sha256: &str, options: &Value, profile: &slmc_targets::TargetProfile) -> String {
    let key = json!({
        "compiler": env!("CARGO_PKG_VERSION"),
        "build": build,
        "source_sha256": source_sha256,
        "options": options,
        "profile": profile,
    });
    slmc_targets::artifact::sha256_hex(key.to_string().as_bytes())
}

/// Keeps the most recently used entries, at most `CACHE_ENTRIES` of them and
/// `cache_max_bytes()` in all, and removes temporaries of killed compiles (best effort).
fn evict(root: &Path) {
    slmc_compiler::output::remove_dead_temps(root, |name| name.strip_prefix('.')?.rsplit_once(".tmp-")?.1.parse().ok());
    let Ok(entries) = std::fs::read_dir(root) else { return };
    let entries: Vec<std::fs::DirEntry> = entries.filter_map(|e| e.ok()).collect();
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .into_iter()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    // Newest first: keep while both bounds hold, remove the rest.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    let (max_bytes, mut kept_bytes) = (cache_max_bytes(), 0u64);
    for (i, (_, d)) in dirs.into_iter().enumerate() {
        kept_bytes = kept_bytes.saturating_add(tree_bytes(&d));
        if i >= CACHE_ENTRIES || kept_bytes > max_bytes {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Bytes of the files under `dir` (symlinks not followed; unreadable parts count 0).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

pub(crate) fn progress(enabled: bool, len: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:20}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

pub fn compile_command(common: &Common, opt: OptArgs, args: CompileArgs) -> Result<()> {
    use std::io::IsTerminal;
    let started = std::time::Instant::now();
    // Every target name first: an unknown one fails before any work.
    let profiles = args.target.iter().map(|t| slmc_targets::lookup(t)).collect::<Result<Vec<_>, _>>()?;
    let model_path = common.model.clone().unwrap_or_else(slmc_compiler::default_model_path);
    if !model_path.exists() {
        bail!("{}: no such model (run scripts/setup for the default, or pass MODEL)", model_path.display());
    }
    // The eval set's bytes are part of what a bundle is made from (and of the cache key).
    let eval_text = match &args.eval_set {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("{}: cannot read the eval set", p.display()))?)
        }
        None => None,
    };
    let mut opt = opt;
    if opt.pipeline.is_none() && opt.passes.is_empty() {
        opt.pipeline = Some("gpu".into());
    }
    let request = opt.request();
    let bar = progress(!common.json && std::io::stderr().is_terminal(), profiles.len() as u64 + 1);
    bar.set_message("hashing the checkpoint");
    let source_sha256 = bundles::source_sha256(&model_path)?;
    let options = bundles::options_record(&request)?;
    let model_version = args.model_version.clone().unwrap_or_else(|| source_sha256[..12].to_string());
    let key_options = json!({
        "optimizer": options,
        "context": args.context,
        // null: the per-target default (`step_tokens_for`), not the same as asking for 256.
        "max_step_tokens": args.max_step_tokens,
        "max_binding_bytes": args.max_binding_bytes,
        "onnx_accuracy_level": args.onnx_accuracy_level,
        "onnx_head_accuracy_level": args.onnx_head_accuracy_level,
        "model_version": model_version,
        "smoke_check": !args.skip_smoke_check,
        "eval_set": eval_text.as_ref().map(|t| slmc_targets::artifact::sha256_hex(t.as_bytes())),
        "max_eval_drop": args.max_eval_drop,
        "abstain_below": args.abstain_below,
        "refusals": args.refusal,
    });
    // Debugging output (IR dumps, pass prints) only comes from a real compile.
    let build = compiler_build_id();
    let use_cache = !args.no_cache && request.dump_ir.is_none() && request.print_after.is_empty() && build.is_some();
    let build = build.unwrap_or_default();
    let mut prepared: Option<(slmc_compiler::import::Model, slmc_compiler::optimize::Optimized)> = None;
    let mut eval_gate: Option<std::sync::Arc<slmc_compiler::compile::EvalGate>> = None;
    let mut smoke = std::collections::BTreeMap::new();
    // Targets to generate (index into `profiles`, options, smoke set), after everything
    // they share is computed; `written` is filled in profile order.
    let mut jobs = Vec::new();
    let mut quality = None;
    let (mut written, mut cached): (Vec<Option<PathBuf>>, Vec<bool>) = (Vec::new(), Vec::new());
    for (index, profile) in profiles.iter().enumerate() {
        let dir = args.out.join(&profile.name);
        let key = cache_key(&build, &source_sha256, &key_options, profile);
        let cache_dir = cache_root().join(&key);
        if use_cache && cache_dir.join(slmc_targets::bundle::MANIFEST_FILE).is_file() {
            bar.set_message(format!("{}: from the compile cache", profile.name));
            // A cache entry must still match its own manifest.
            let trust = slmc_runtime::bundle::Trust { public_key: None, allow_unsigned: true };
            if let Ok(verified) = slmc_runtime::bundle::verify(&cache_dir, &trust) {
                slmc_compiler::output::write_dir_atomically(&dir, args.force, |tmp| {
                    slmc_compiler::output::write_files(tmp, verified.files.iter())
                })?;
                // Mark it recently used for eviction.
                let _ = std::fs::File::open(&cache_dir).and_then(|f| f.set_modified(std::time::SystemTime::now()));
                written.push(Some(dir));
                cached.push(true);
                bar.inc(1);
                continue;
            }
        }
        if prepared.is_none() {
            bar.set_message("importing and optimizing (once for all targets)");
            let model = load(common)?;
            let optimized = prepare(&model, &opt, true)?;
            if let (Some(path), Some(text)) = (&args.eval_set, &eval_text) {
                bar.set_message("eval set on the unquantized model (reference interpreter)");
                eval_gate = Some(std::sync::Arc::new(eval_gate_for(&model, path, text, &args)?));
            }
            prepared = Some((model, optimized));
        }
        let (model, optimized) = prepared.as_ref().expect("just prepared");
        let context_len = args.context.min(model.config.max_position_embeddings);
        // The exact configurations are held to the reference; lossy ones to a wider gap.
        let int8_activations = profile.backend == slmc_targets::BackendKind::Onnx
            && (args.onnx_accuracy_level == 4 || args.onnx_head_accuracy_level == 4);
        let smoke_gap = if profile.coreml.is_some() {
            bundles::SMOKE_NEAR_TIE_GAP_FP16
        } else if int8_activations {
            bundles::SMOKE_NEAR_TIE_GAP_INT8_ACTIVATIONS
        } else {
            bundles::SMOKE_NEAR_TIE_GAP
        };
        // The smoke set's long prompt fits the target's context (Core ML's is the profile's,
        // fed in fixed steps); one set per length, so a bundle never depends on which other
        // targets were compiled with it.
        let (target_context, fixed_step) = match &profile.coreml {
            Some(c) => (context_len.min(c.max_context_len), c.step_tokens),
            None => (context_len, 1),
        };
        let max_step_tokens = step_tokens_for(profile, model.config.vocab_size, args.max_step_tokens);
        let long = bundles::long_smoke_len(target_context, max_step_tokens, fixed_step);
        if !smoke.contains_key(&long) {
            bar.set_message("golden smoke set on the reference interpreter");
            smoke.insert(long, bundles::smoke_set(model, optimized, context_len, long)?);
        }
        if quality.is_none() {
            bar.set_message("quality report on the reference interpreter");
            quality = Some(bundles::quality_report(model, optimized)?);
        }
        let options = slmc_compiler::compile::CompileOptions {
            context_len: args.context,
            max_step_tokens,
            force: args.force,
            max_binding_bytes: args.max_binding_bytes,
            onnx_accuracy_level: args.onnx_accuracy_level,
            onnx_head_accuracy_level: args.onnx_head_accuracy_level,
            model_version: model_version.clone(),
            source_sha256: source_sha256.clone(),
            options: options.clone(),
            smoke_check: !args.skip_smoke_check,
            adapter: args.adapter.clone(),
            eval: eval_gate.clone(),
        };
        let smoke_set = slmc_targets::bundle::SmokeSet {
            near_tie_gap: smoke_gap,
            near_tie_may_flip: smoke_gap > bundles::SMOKE_NEAR_TIE_GAP,
            ..smoke[&long].clone()
        };
        jobs.push((index, key, options, smoke_set));
        written.push(None);
        cached.push(false);
    }
    // The targets' generation (and smoke checks) run two at a time: emitters are mostly
    // single-threaded, and each writes its weights straight to disk, so a second one costs
    // little memory. Every bundle is written atomically and is the same whatever the order.
    if let Some((model, optimized)) = prepared.as_ref() {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: std::sync::Mutex<Vec<(usize, Result<PathBuf>)>> = std::sync::Mutex::new(Vec::new());
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 2);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((index, _, options, smoke_set)) = jobs.get(i) else { break };
                    let profile = &profiles[*index];
                    bar.set_message(format!("{}: generating and checking", profile.name));
                    let out = slmc_compiler::compile::compile_target(
                        model,
                        optimized,
                        &profile.name,
                        &args.out,
                        options,
                        smoke_set,
                        quality.as_ref(),
                    );
                    bar.inc(1);
                    results.lock().unwrap_or_else(|p| p.into_inner()).push((i, out));
                });
            }
        });
        let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        results.sort_by_key(|(i, _)| *i);
        for (i, out) in results {
            let (index, key, _, _) = &jobs[i];
            let out = out?;
            if use_cache {
                // Best effort: a cache that cannot be written only costs the next compile time.
                let cache_dir = cache_root().join(key);
                let tmp = cache_root().join(format!(".{key}.tmp-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&tmp);
                if slmc_compiler::output::copy_dir(&out, &tmp).is_ok() {
                    let _ = std::fs::remove_dir_all(&cache_dir);
                    let _ = std::fs::rename(&tmp, &cache_dir);
                }
                let _ = std::fs::remove_dir_all(&tmp);
                evict(&cache_root());
            }
            written[*index] = Some(out);
        }
    }
    let written: Vec<PathBuf> = written.into_iter().flatten().collect();
    bar.finish_and_clear();
    if let Some(path) = &args.report {
        compile_report(path, &written, prepared.as_ref().map(|(_, optimized)| optimized))?;
    }
    if common.json {
        // Measured: the whole command's wall time and this process's peak resident set (the
        // memory a build machine must have; issue 18's bound is 1.5x the checkpoint).
        print_json(&json!({
            "targets": args.target,
            "outputs": written,
            "cached": cached,
            "wall_s": started.elapsed().as_secs_f64(),
            "peak_rss_bytes": slmc_runtime::bench::peak_rss_bytes(),
        }));
    } else {
        for (w, c) in written.iter().zip(&cached) {
            eprintln!("wrote {}{}", w.display(), if *c { " (from the compile cache)" } else { "" });
        }
    }
    Ok(())
}

/// The eval set parsed and rendered with the model's tokenizer and chat template, and the
/// unquantized model's results on it (the lowered graph as imported, on the interpreter).
fn eval_gate_for(
    model: &slmc_compiler::import::Model,
    path: &Path,
    text: &str,
    args: &CompileArgs,
) -> Result<slmc_compiler::compile::EvalGate> {
    use slmc_compiler::evalset;
    let tokenizer = model.tokenizer.as_ref().map_err(|e| anyhow::anyhow!("{e} (an eval set is tokenized)"))?;
    let renderer = evalset::Renderer {
        tokenizer,
        chat_template: model.chat_template.as_deref(),
        bos_token: model.bos_token.as_deref(),
        eos_token: model.eos_token.as_deref(),
    };
    let refusals = if args.refusal.is_empty() {
        evalset::DEFAULT_REFUSALS.iter().map(|s| s.to_string()).collect()
    } else {
        args.refusal.clone()
    };
    let set = evalset::parse(path, text, &renderer, args.abstain_below, refusals)?;
    let graph = slmc_compiler::lower::lower(model)?;
    let mut exec =
        slmc_runtime::InterpreterExecutor::new(&graph, &model.weights, model.config.max_position_embeddings)?;
    let base = evalset::run(&mut exec, &set, tokenizer, &model.config.eos_token_ids)?;
    Ok(slmc_compiler::compile::EvalGate { set, base, max_drop: args.max_eval_drop })
}

/// The HTML compile report from the written bundles' manifests and, when the pipeline ran
/// here (not every bundle came from the cache), its passes.
fn compile_report(
    path: &Path,
    written: &[PathBuf],
    optimized: Option<&slmc_compiler::optimize::Optimized>,
) -> Result<()> {
    let manifests = written
        .iter()
        .map(|dir| {
            let file = dir.join(slmc_targets::bundle::MANIFEST_FILE);
            let text = std::fs::read_to_string(&file).with_context(|| format!("{}: cannot read", file.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", file.display()))
        })
        .collect::<Result<Vec<serde_json::Value>>>()?;
    let passes = match optimized {
        Some(optimized) => {
            let rows = optimized
                .timings
                .iter()
                .map(|t| slmc_compiler::report::PassRow {
                    pass: t.pass,
                    wall_ms: t.wall.as_secs_f64() * 1e3,
                    changes: t.changes,
                    nodes_after: t.nodes_after,
                })
                .collect::<Vec<_>>();
            Some((optimized.lowered_nodes, rows))
        }
        None => None,
    };
    let html = slmc_compiler::report::compile_html(&manifests, passes.as_ref().map(|(n, r)| (*n, r.as_slice())))?;
    slmc_compiler::output::write_file_atomically(path, html.as_bytes())
        .with_context(|| format!("{}: writing the compile report", path.display()))
}

pub fn keygen(out: &Path, force: bool, json: bool) -> Result<()> {
    let (secret, public) = bundles::keygen(out, force)?;
    if json {
        print_json(&json!({ "secret_key": secret, "public_key": public }));
    } else {
        eprintln!("wrote {secret} (secret: keep it private) and {public}");
    }
    Ok(())
}

pub fn sign(bundle: &Path, key: &Path, json: bool) -> Result<()> {
    let public = bundles::sign(bundle, key)?;
    if json {
        print_json(&json!({ "signed": bundle, "public_key": public }));
    } else {
        eprintln!("signed {} (public key {public})", bundle.display());
    }
    Ok(())
}

pub fn verify(bundle: &Path, trust: &TrustArgs, json: bool) -> Result<()> {
    let mut trust = trust.trust()?;
    if trust.public_key.is_none() && !trust.allow_unsigned {
        bail!("give the public key to verify against (--pubkey FILE or $SLMC_PUBKEY)");
    }
    // `verify` means the signature too, unless explicitly waived.
    trust.allow_unsigned &= trust.public_key.is_none();
    let v = slmc_runtime::bundle::verify(bundle, &trust)?;
    if json {
        print_json(&json!({
            "verified": true,
            "signature_checked": v.signature_checked,
            "files": v.manifest.files.len(),
            "target": v.manifest.target.name,
            "min_runtime_version": v.manifest.min_runtime_version,
        }));
    } else {
        println!(
            "{}: {} files match the manifest{}",
            bundle.display(),
            v.manifest.files.len(),
            if v.signature_checked { ", signature valid" } else { " (signature not checked)" }
        );
    }
    Ok(())
}

/// Verifies the bundle once and runs its smoke set on the executor opened from the verified
/// bytes; the outcome as JSON, and the verified bundle.
fn smoke_outcome(common: &Common, exec: &RunArgs, bundle: &Path, calibrate: bool) -> Result<(bool, Value, Verified)> {
    let mut c = common.clone();
    c.model = Some(bundle.to_path_buf());
    let loaded = artifact_executor(&c, exec, &OptArgs::default())?;
    let Some(LoadedArtifact { mut exec, name, bundle: Some(verified), side }) = loaded else {
        bail!("{}: not a compiled bundle (no manifest.json)", bundle.display());
    };
    let outcomes = bundles::run_smoke(exec.as_mut(), &verified.manifest.smoke)?;
    let passed = outcomes.iter().all(|o| o.passed);
    let mut report = json!({ "passed": passed, "executor": name, "prompts": outcomes });
    // The team's eval set, when the bundle carries one, from the bytes verification checked.
    if let Some(bytes) = verified.files.get(slmc_compiler::evalset::EVAL_SET_FILE) {
        let shown = verified.files.path(slmc_compiler::evalset::EVAL_SET_FILE);
        let set: slmc_compiler::evalset::EvalSet =
            serde_json::from_slice(bytes).with_context(|| format!("{}: not an eval set", shown.display()))?;
        let tokenizer = side.tokenizer.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        let items = slmc_compiler::evalset::run(exec.as_mut(), &set, tokenizer, &side.eos_ids)?;
        report["totals"] = slmc_compiler::evalset::totals(&items);
        report["items"] = serde_json::to_value(&items)?;
        if calibrate {
            // Every answer judged on its own (no abstention), then the best separating cut.
            let plain = slmc_compiler::evalset::EvalSet { abstain_below: None, ..set };
            // Answers withheld by the stored threshold are asked again without it.
            let answers = if items.iter().any(|i| i.abstained) {
                slmc_compiler::evalset::run(exec.as_mut(), &plain, tokenizer, &side.eos_ids)?
            } else {
                items
            };
            report["calibration"] = serde_json::to_value(slmc_compiler::evalset::calibrate(&answers))?;
        }
    } else if calibrate {
        bail!("{}: --calibrate needs a bundle compiled with --eval-set", bundle.display());
    }
    Ok((passed, report, verified))
}

pub fn eval(common: &Common, exec: &RunArgs, calibrate: bool) -> Result<()> {
    let bundle = common.model.clone().context("give the bundle directory")?;
    let (passed, report, _) = smoke_outcome(common, exec, &bundle, calibrate)?;
    if common.json {
        print_json(&report);
    } else {
        for p in report["prompts"].as_array().into_iter().flatten() {
            println!(
                "{} {}/{} leading tokens agree ({} required)",
                if p["passed"] == true { "ok  " } else { "FAIL" },
                p["matching_prefix"],
                p["expected_ids"].as_array().map(|a| a.len()).unwrap_or(0),
                p["required_prefix"]
            );
        }
        for item in report["items"].as_array().into_iter().flatten() {
            println!(
                "{} {} (confidence {}): {}",
                if item["passed"] == true { "ok  " } else { "FAIL" },
                item["id"].as_str().unwrap_or_default(),
                item["confidence"].as_f64().map_or("n/a".into(), |c| format!("{c:.3}")),
                item["answer"].as_str().unwrap_or_default().trim()
            );
        }
        if !report["totals"].is_null() {
            let t = &report["totals"];
            println!(
                "eval set: {} of {} passed ({:.1}%)",
                t["passed"],
                t["total"],
                t["accuracy"].as_f64().unwrap_or(0.0)
            );
        }
    }
    if !passed {
        bail!("{}: the smoke set disagrees with the reference", bundle.display());
    }
    Ok(())
}

pub fn install(common: &Common, exec: &RunArgs, store_dir: &Path) -> Result<()> {
    let bundle = common.model.clone().context("give the bundle directory")?;
    let started = std::time::Instant::now();
    let trust = exec.trust.trust()?;
    // Signature and hashes once, then the smoke set on this device's executor run from the
    // verified bytes; only then are those same bytes written into the store.
    let (passed, report, verified) = smoke_outcome(common, exec, &bundle, false)?;
    if !passed {
        bail!("{}: the smoke set disagrees with the reference; the store is unchanged", bundle.display());
    }
    // The eval set's results on this device, compared with the version being replaced.
    let eval: Option<std::collections::BTreeMap<String, bool>> = report["items"].as_array().map(|items| {
        items.iter().filter_map(|i| Some((i["id"].as_str()?.to_string(), i["passed"].as_bool()?))).collect()
    });
    let id = store::install(&verified, store_dir, &trust, eval.as_ref())?;
    let state = store::read_state(store_dir)?;
    let seconds = started.elapsed().as_secs_f64();
    if common.json {
        print_json(
            &json!({ "installed": id, "current": state.current, "previous": state.previous, "seconds": seconds, "smoke": report }),
        );
    } else {
        eprintln!("installed {id} into {} in {seconds:.2} s (previous: {:?})", store_dir.display(), state.previous);
    }
    Ok(())
}

pub fn rollback(store_dir: &Path, json: bool) -> Result<()> {
    let started = std::time::Instant::now();
    let (from, to) = store::rollback(store_dir)?;
    let seconds = started.elapsed().as_secs_f64();
    if json {
        print_json(&json!({ "from": from, "current": to, "seconds": seconds }));
    } else {
        eprintln!("rolled back from {from} to {to} in {seconds:.3} s");
    }
    Ok(())
}

const DEFAULT_STEP_TOKENS: usize = 256;

/// The step size a target gets: the one asked for, else the default, lowered (to a multiple
/// of 16) for a GPU target until one step's f32 logits fit a storage-buffer binding.
fn step_tokens_for(profile: &slmc_targets::TargetProfile, vocab: usize, requested: Option<usize>) -> usize {
    if let Some(n) = requested {
        return n;
    }
    let limit = profile.binding_limit().map(|b| b as usize / (4 * vocab.max(1))).unwrap_or(usize::MAX);
    match DEFAULT_STEP_TOKENS.min(limit) {
        n if n >= 16 => n / 16 * 16,
        n => n.max(1),
    }
}
